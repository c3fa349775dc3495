"""GRPO on CME learns: a tiny random policy raises its reward under a tiny frozen verifier, on both step paths."""

from __future__ import annotations

import numpy as np
import pytest

from cme_jax import train as train_mod
from cme_jax.config import load_config
from tests.train_helpers import metric_rows, tiny_config, write_config

STEPS = 30


@pytest.mark.parametrize(
    "verifier,fused,banner",
    [("other_vocab", False, "rollout | host rewards | update"), ("same_vocab", True, "one fused jit")],
    ids=["text_path_other_vocabulary", "fused_path_same_vocabulary"],
)
def test_cme_reward_rises(verifier, fused, banner, tiny_models, prompts_file, tmp_path, capsys):
    raw = tiny_config(
        tiny_models,
        prompts_file,
        tmp_path / "run",
        verifier=verifier,
        train={"steps": STEPS, "prompts_per_step": 2, "fused": fused, "seed": 4},
        sampling={"num_samples": 8, "max_new_tokens": 8},
        optim={"learning_rate": 1e-2, "warmup_steps": 1},
        grpo={"beta": 0.01},
        checkpoint={"every": STEPS, "keep": 1},
        logging={"samples_every": 0, "tensorboard": False, "console": False},
    )
    cfg = load_config(write_config(tmp_path / "c.yaml", raw))
    train_mod.train(cfg)
    assert banner in capsys.readouterr().err
    rows = metric_rows(tmp_path / "run")
    reward = np.array([r["reward/mean"] for r in rows])
    kl = np.array([r["kl_mean"] for r in rows])
    assert len(reward) == STEPS and np.isfinite(kl).all()
    first, last = reward[:8], reward[-8:]
    # The step-to-step spread of the early rewards is the noise a rise has to clear.
    noise = first.std() / np.sqrt(len(first)) + last.std() / np.sqrt(len(last))
    assert last.mean() - first.mean() > max(4 * noise, 0.5), (first, last)
