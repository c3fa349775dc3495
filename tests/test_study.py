"""Smoke run of the offline study script: every arm, two steps each, on tiny random models; then a rerun skips."""

from __future__ import annotations

import importlib.util
import json

from tests.train_helpers import ROOT


def load_study():
    spec = importlib.util.spec_from_file_location("offline_pair_run", ROOT / "studies" / "offline_pair" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_arm_two_steps_then_a_rerun_skips(tiny_models, prompts_file, tmp_path, monkeypatch, capsys):
    study = load_study()
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # the trainers: one device
    results, runs = tmp_path / "results", tmp_path / "runs"
    argv = [
        *("--results", str(results), "--runs", str(runs), "--steps", "2", "--judge", "none", "--eval-limit", "3"),
        *("--policy", tiny_models["policy"], "--verifier-model", tiny_models["other_vocab"]),
        *("--set", f"data.source={prompts_file}", "--set", "data.heldout_fraction=0.4"),
        *("--set", "data.max_prompt_tokens=200", "--set", "sampling.max_new_tokens=8", "--eval-tokens", "8"),
    ]
    study.main(argv)
    table = (results / "table.md").read_text()
    for arm in study.ARMS:
        s = json.loads((results / arm / "summary.json").read_text())
        assert s["steps"] == 2 and [r["step"] for r in s["heldout_curve"]] == [0, 2]
        for mode in ("greedy", "sampled"):
            iv = s["eval"][mode]["automatic"]["intervals"]
            assert iv["kl"]["model"]["n"] == 3 and iv[f"cme_{s['verifier']}_plain"]["difference"]["n"] == 3
        assert (results / arm / "metrics.jsonl").exists() and (results / arm / "train.log").exists()
        assert f"| {study.LABELS[arm]} |" in table
    assert "| base (absolute values) |" in table and (results / "curves.png").stat().st_size > 10_000
    # The contrastive arm trains on the contrastive verifier only; its weight-0 plain monitor is scored on the
    # held-out prompts, the quantity every arm is compared on.
    rows = [json.loads(line) for line in (results / "contrastive_cme" / "metrics.jsonl").read_text().splitlines()]
    assert all("cme/gemma3_contrastive/mean" in r and "cme/gemma3/mean" not in r for r in rows)
    curve = json.loads((results / "contrastive_cme" / "summary.json").read_text())["heldout_curve"]
    assert all("heldout/cme/gemma3/mean" in r for r in curve)
    log = capsys.readouterr().err
    assert log.count("training (2 steps)") == len(study.ARMS)

    study.main(argv)  # every arm is done: nothing trains or evaluates again
    log = capsys.readouterr().err
    assert "to run: []" in log and "training (" not in log
