"""The paper-table study: its twelve cells are valid configs, and one cell runs end to end offline in two steps."""

from __future__ import annotations

import importlib.util
import json

import pytest

from cme_jax.config import load_config
from tests.train_helpers import ROOT

STUDY = ROOT / "studies" / "paper_table"
FAMILY_OF = {"Qwen/": "qwen", "meta-llama/": "llama", "google/gemma": "gemma", "allenai/OLMo": "olmo"}


def load_study():
    spec = importlib.util.spec_from_file_location("paper_table_run", STUDY / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def family(spec: str) -> str | None:
    return next((f for prefix, f in FAMILY_OF.items() if spec.startswith(prefix)), None)


def test_every_cell_is_a_valid_config_with_a_verifier_from_another_family():
    study = load_study()
    assert sorted(p.stem for p in (STUDY / "configs").glob("*.yaml")) == sorted(study.CELLS)
    for cell in study.CELLS:
        fam, regime = cell.split("-")
        cfg = load_config(STUDY / "configs" / f"{cell}.yaml")
        (verifier,) = cfg.reward.verifiers
        assert family(verifier.model) not in (None, fam), cell
        assert family(cfg.model.policy) in (fam, None), cell  # None: a local SFT checkpoint of that family
        plain = cfg.model.prompt_format == "plain"
        assert plain == (regime == "pretrained") and (verifier.context == "plain") == plain, cell
        assert cfg.grpo.beta > 0 and cfg.model.lora is None and cfg.mesh.fsdp == 8, cell


@pytest.mark.slow
def test_one_cell_trains_two_steps_and_fills_its_row_offline(tmp_path, monkeypatch, capsys):
    """The same script and command as a real cell, with the embedded models, shipped prompts and a local judge."""
    study = load_study()
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # the subprocesses: one device
    results, runs = tmp_path / "results", tmp_path / "runs"
    argv = [
        "qwen-pretrained",
        *("--results", str(results), "--runs", str(runs), "--steps", "2"),
        *("--policy", "smollm2-135m-instruct", "--verifier-model", "gemma3-270m", "--train-prompts", "builtin:prompts"),
        *("--eval-prompts", "builtin:prompts", "--eval-limit", "3", "--eval-tokens", "8"),
        *("--judge-model", "smollm2-135m-instruct"),
        *("--set", "mesh.fsdp=1", "--set", "mesh.data=-1", "--set", "train.prompts_per_step=1"),
        *("--set", "sampling.num_samples=2", "--set", "sampling.max_new_tokens=8", "--set", "train.minibatches=1"),
        *("--set", "train.micro_batches=1", "--set", "data.max_prompt_tokens=64"),
        *("--set", "reward.verifiers.0.max_length=16"),
    ]
    study.main(argv)
    summary = json.loads((results / "qwen-pretrained" / "summary.json").read_text())
    assert summary["n"] == 3 and summary["steps"] == 2 and summary["policy"] == "smollm2-135m-instruct"
    assert 0 <= summary["win_rate_tie_adjusted"] <= 1
    rows = [json.loads(line) for line in (results / "qwen-pretrained" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("cme/llama3.1-8b-base/mean" in r for r in rows)
    table = (results / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| qwen-pretrained |"))
    assert f"{100 * summary['win_rate_tie_adjusted']:.1f}%" in row and row.endswith("| 52.5%-71.4% |")
    assert table.count("| not run |") == len(study.CELLS) - 1
    # The evaluation read both sides through the cell's plain template and stop string.
    generation = json.loads((results / "qwen-pretrained" / "eval" / "baseline" / "generation.json").read_text())
    assert "Question: {prompt}" in json.dumps(generation)
    capsys.readouterr()
    study.main(argv)  # done: a rerun trains and evaluates nothing
    assert "to run: []" in capsys.readouterr().err
