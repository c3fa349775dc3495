"""The trainer's held-out evaluation: greedy responses to held-out prompts, scored with the training reward."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cme_jax import train as train_mod
from cme_jax.config import load_config
from cme_jax.sampling import SamplingConfig, generate_responses
from cme_jax.scoring import VerifierConfig, load_verifier, score_texts
from cme_jax.sources import load_model
from tests.train_helpers import metric_rows, tiny_config, write_config

VERIFIER = {"name": "v", "context": "chat", "max_length": 16}


def heldout_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "heldout.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def heldout_run(tiny_models, prompts_file, tmp_path_factory):
    """A 4-step run (stopped after 3 and resumed) evaluated on 3 held-out prompts every 2 steps."""
    root = tmp_path_factory.mktemp("heldout")
    raw = tiny_config(
        tiny_models,
        prompts_file,
        root / "run",
        train={"steps": 4, "prompts_per_step": 2, "heldout_every": 2, "heldout_prompts": 3},
        reward={
            "verifiers": [
                {**VERIFIER, "model": tiny_models["other_vocab"]},
                # A monitor: weight 0, so training does not score it; the held-out evaluation does.
                {**VERIFIER, "name": "monitor", "model": tiny_models["same_vocab"], "weight": 0.0},
            ]
        },
        grpo={"beta": 0.0},  # no KL term, but the reference is still loaded for the held-out KL
        optim={"learning_rate": 1e-2, "warmup_steps": 0},
        data={"heldout_fraction": 0.4},
        logging={"samples_every": 0, "tensorboard": True},
    )
    cfg = load_config(write_config(root / "c.yaml", raw))
    train_mod.train(cfg, stop_after=3)
    train_mod.train(cfg)
    return cfg, root / "run"


def test_heldout_rows_at_their_steps_and_no_duplicates_after_resume(heldout_run):
    _cfg, run_dir = heldout_run
    rows = heldout_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 2, 4]  # before training, every 2 steps, the resume adds none twice
    assert all(len(r["prompts"]) == len(r["rewards"]) == len(r["responses"]) == 3 for r in rows)
    assert rows[0]["prompts"] == rows[-1]["prompts"]
    s0, s4 = rows[0]["scalars"], rows[-1]["scalars"]
    assert s0["heldout/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is its reference before any update
    assert s4["heldout/kl"] > 1e-4 and s4["heldout/entropy"] > 0
    assert s0["heldout/reward/mean"] == pytest.approx(np.mean(rows[0]["rewards"]), rel=1e-5)
    # The monitor is scored on held-out responses only; training scores the weighted verifier alone.
    assert "heldout/cme/monitor/mean" in s0 and "heldout/cme/v/mean" in s0
    train_rows = metric_rows(run_dir)
    assert all("cme/v/mean" in r and "cme/monitor/mean" not in r for r in train_rows)


def test_heldout_reward_equals_an_independent_greedy_generation_and_score(heldout_run, tiny_models):
    cfg, run_dir = heldout_run
    row = heldout_rows(run_dir)[0]
    policy = load_model(tiny_models["policy"])
    scfg = SamplingConfig(max_new_tokens=cfg.sampling.max_new_tokens, temperature=0.0)
    out = generate_responses(policy, row["prompts"], scfg, fmt="auto", template=cfg.model.template, batch_size=4)
    assert [s[0]["response"] for s in out] == row["responses"]
    verifier = load_verifier(VerifierConfig(model=tiny_models["other_vocab"], **VERIFIER))
    direct = score_texts(verifier, row["prompts"], row["responses"], [s[0]["stopped"] for s in out])
    assert not direct.empty.any()
    np.testing.assert_allclose(row["rewards"], direct.mean, rtol=1e-4, atol=1e-5)


def test_heldout_report_line(heldout_run, capsys):
    _cfg, run_dir = heldout_run
    rows = heldout_rows(run_dir)
    lines = train_mod.heldout_report(rows)
    diff = np.asarray(rows[-1]["rewards"]) - np.asarray(rows[0]["rewards"])
    assert lines[0].startswith("held-out reward (3 prompts, greedy) by step: 0: ")
    assert f"difference {diff.mean():+.3f} [95% CI" in lines[1] and "step 0" in lines[1] and "step 4" in lines[1]
    assert "KL to the reference" in lines[1]


def test_heldout_needs_heldout_prompts(tiny_models, prompts_file, tmp_path):
    raw = tiny_config(tiny_models, prompts_file, tmp_path / "run", train={"heldout_every": 2})
    with pytest.raises(train_mod.CmeError, match="heldout_fraction"):
        load_config(write_config(tmp_path / "c.yaml", raw))
