"""The trainer end to end: config handling, malformed input, exact resume, kills, and the demo's outputs."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from cme_jax import train as train_mod
from cme_jax.checkpoint import CheckpointManager
from cme_jax.config import TrainConfig, config_yaml, load_config
from tests.helpers import SUITE_DEVICES, assert_one_line_error, cli_error, run_module, start_module
from tests.train_helpers import (
    ROOT,
    assert_same_params,
    metric_rows,
    run_params,
    tiny_config,
    wait_for_checkpoint,
    write_config,
)

# ---------------------------------------------------------------------------------------------------------
# Config


def test_config_round_trip_and_overrides(tiny_models, prompts_file, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tiny_models, prompts_file, tmp_path / "run"))
    cfg = load_config(path, ["grpo.beta=0.1", "sampling.top_p=0.9", "train.steps=11"])
    assert (cfg.grpo.beta, cfg.sampling.top_p, cfg.train.steps) == (0.1, 0.9, 11)
    assert cfg.reward.verifiers[0].model == tiny_models["other_vocab"]
    assert cfg.optim.learning_rate == 1e-3  # from the YAML
    assert cfg.grpo.epsilon_low == TrainConfig().grpo.epsilon_low  # a default
    again = tmp_path / "again.yaml"
    again.write_text(config_yaml(cfg))
    assert load_config(again) == cfg


def test_shipped_configs_are_valid():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        cfg = load_config(path)
        assert cfg.reward.verifiers, path


def test_print_config_prints_resolved_yaml(tiny_models, prompts_file, tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", tiny_config(tiny_models, prompts_file, tmp_path / "run"))
    train_mod.main(["--config", path, "--print-config", "optim.learning_rate=3e-4"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["learning_rate"] == 3e-4
    assert printed["reward"]["verifiers"][0]["name"] == "v"


# Each case: (name, how to break the valid tiny config, words the one-line error must contain).
def _set(section, key, value):
    def edit(cfg, tmp):
        cfg.setdefault(section, {})[key] = value
        return cfg, []

    return edit


def _override(*args):
    return lambda cfg, tmp: (cfg, list(args))


def _data_file(text, name="p.jsonl"):
    def edit(cfg, tmp):
        path = tmp / name
        path.write_text(text)
        cfg["data"]["source"] = str(path)
        return cfg, []

    return edit


MALFORMED = [
    ("unknown top-level key", _set("trian", "steps", 3), "trian"),
    ("unknown nested key with suggestion", _set("grpo", "bta", 0.1), "beta"),
    ("wrong type", _set("train", "steps", "ten"), "train.steps"),
    ("top_p out of range", _set("sampling", "top_p", 1.5), "top_p"),
    ("negative temperature", _set("sampling", "temperature", -1.0), "temperature"),
    ("max_new_tokens below 1", _set("sampling", "max_new_tokens", 0), "max_new_tokens"),
    ("greedy with groups", _set("sampling", "temperature", 0.0), "greedy"),
    ("bad loss aggregation", _set("grpo", "loss_aggregation", "mean"), "loss_aggregation"),
    ("bad kl estimator", _set("grpo", "kl_estimator", "k4"), "kl_estimator"),
    ("beta without reference", _set("model", "reference", None), "reference"),
    ("rows do not split", _set("train", "minibatches", 3), "minibatches"),
    ("mesh does not fit devices", _set("mesh", "data", 3), "devices"),
    ("batch not divisible by the mesh", _override("mesh.data=4", "mesh.tensor=1"), "prompts_per_step"),
    ("unknown reward term", _set("reward", "terms", ["cmee"]), "cmee"),
    ("plain template without {prompt}", _set("model", "template", "Question:"), "{prompt}"),
    ("override without =", _override("grpo.beta"), "grpo.beta"),
    ("override of unknown key", _override("optim.lr=0.1"), "learning_rate"),
    ("learning rate negative", _set("optim", "learning_rate", -1.0), "learning_rate"),
    ("missing data file", _set("data", "source", "/nonexistent/prompts.jsonl"), "prompts.jsonl"),
    ("malformed jsonl line", _data_file('{"prompt": "fine"}\n{"prompt": broken\n'), "p.jsonl:2"),
    ("data without a prompt field", _data_file('{"question": "a"}\n{"question": "b"}\n'), "prompt"),
    ("empty data file", _data_file(""), "no records"),
    ("too few prompts for a step", _data_file('{"prompt": "only one"}\n'), "prompts_per_step"),
]


@pytest.mark.parametrize("name,edit,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_config_or_data_is_one_line_exit_2(
    name, edit, words, tiny_models, prompts_file, tmp_path, capsys, monkeypatch
):
    def no_weights(*a, **k):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(train_mod, "load_model", no_weights)
    cfg, overrides = edit(tiny_config(tiny_models, prompts_file, tmp_path / "run"), tmp_path)
    path = write_config(tmp_path / "c.yaml", cfg)
    err = cli_error(capsys, train_mod.main, ["--config", path, *overrides])
    assert words.lower() in err.lower(), err


def test_yaml_syntax_error_and_missing_file_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3\n")
    for path in (str(bad), str(tmp_path / "missing.yaml")):
        assert Path(path).name in cli_error(capsys, train_mod.main, ["--config", path])


# ---------------------------------------------------------------------------------------------------------
# Resume


@pytest.fixture(scope="module")
def straight_run(tiny_models, prompts_file, tmp_path_factory):
    """Six steps in one go: the reference for every resume test."""
    run_dir = tmp_path_factory.mktemp("straight")
    cfg = load_config(write_config(run_dir / "c.yaml", tiny_config(tiny_models, prompts_file, run_dir / "run")))
    result = train_mod.train(cfg)
    return cfg, result


def test_straight_run_writes_logs_and_checkpoints(straight_run):
    cfg, result = straight_run
    run_dir = Path(cfg.run_dir)
    assert result.step == 6
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("reward/mean", "loss", "kl_mean", "response/length_mean", "adv/abs_mean", "optim/lr", "grad_norm"):
        assert all(r.get(key) is not None and np.isfinite(r[key]) for r in rows), key
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {3, 6} and all("reward" in s for s in samples)
    assert load_config(run_dir / "config.yaml") == cfg
    with CheckpointManager(run_dir, read_only=True) as ckpt:
        assert ckpt.all_steps() == [3, 6]
        assert ckpt.metadata(6)["config"]["train"]["steps"] == 6


def test_stop_and_resume_equals_straight_run(straight_run, tmp_path):
    cfg, ref = straight_run
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / "run"))
    first = train_mod.train(cfg, stop_after=3)
    assert first.step == 3
    second = train_mod.train(cfg)
    assert second.step == 6
    assert_same_params(second.state.params, ref.state.params)
    rows, ref_rows = metric_rows(Path(cfg.run_dir)), metric_rows(Path(ref.run_dir))
    assert len(rows) == len(ref_rows) == 6
    for a, b in zip(rows, ref_rows):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    # A finished run directory is left alone.
    assert train_mod.train(cfg).state is None


def _launch(config_path: str, *extra: str) -> subprocess.Popen:
    """The trainer in a child process on the suite's devices (the in-process runs' mesh), output in one stream."""
    return start_module(
        "cme_jax.train", "--config", config_path, *extra, devices=SUITE_DEVICES, stderr=subprocess.STDOUT
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_run_resumes_to_the_same_params(sig, straight_run, tmp_path):
    """Once a checkpoint exists, a preemption notice (SIGTERM: save the step and exit 0) or a kill at an arbitrary
    moment, a save in flight (SIGKILL); the rerun resumes from the last complete step and ends where the straight
    run ends."""
    cfg, ref = straight_run
    run_dir = tmp_path / "run"
    raw = yaml.safe_load(config_yaml(cfg))
    raw["run_dir"] = str(run_dir)
    raw["checkpoint"]["every"] = 1  # a save is in flight at almost every moment
    path = write_config(tmp_path / "c.yaml", raw)
    proc = _launch(path)
    wait_for_checkpoint(run_dir, proc, proc.stdout.read)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 0, out
        assert "termination signal: saving step" in out, out
    else:
        assert proc.returncode == -signal.SIGKILL, out
    with CheckpointManager(run_dir, read_only=True) as ckpt:
        saved = ckpt.latest_step()
    assert saved is not None and 1 <= saved < 6, (saved, out)
    proc = _launch(path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"resumed from step {saved}" in out, out
    assert_same_params(run_params(run_dir, ref.state.params, 6), ref.state.params)


@pytest.mark.slow
def test_demo_config_end_to_end_and_export_loads_in_transformers(tmp_path):
    """The shipped demo (embedded SmolLM2 policy, Gemma-3 verifier) on small settings, then its HF export."""
    import torch
    import transformers

    from cme_jax.models.transformer import forward
    from cme_jax.sources import load_model

    run_dir = tmp_path / "demo"
    overrides = [
        f"run_dir={run_dir}",
        "train.steps=3",
        "sampling.num_samples=2",
        "sampling.max_new_tokens=8",
        "logging.preview_tokens=4",
    ]
    proc = run_module("cme_jax.train", "--config", "configs/demo_cpu.yaml", *overrides, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "before:" in proc.stderr and "after:" in proc.stderr and "tensorboard --logdir" in proc.stderr
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["cme/gemma3/mean"]) and r["cme/gemma3/mean"] < 0 for r in rows)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    with CheckpointManager(run_dir, read_only=True) as ckpt:
        assert ckpt.latest_step() == 3

    out = tmp_path / "hf"
    proc = run_module("cme_jax.export", str(run_dir), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = np.asarray([tok("Explain how a refrigerator keeps food cold.")["input_ids"]], np.int32)
    with torch.no_grad():
        hf = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    trained = load_model(str(out), tokenizer=False)
    pos = np.arange(ids.shape[1], dtype=np.int32)[None]
    ours, _ = forward(trained.weights, trained.cfg, ids, pos, np.ones_like(ids, bool))
    np.testing.assert_allclose(np.asarray(ours), hf, atol=2e-3, rtol=2e-3)
    base = load_model("smollm2-135m-instruct", tokenizer=False)
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(trained.weights), jax.tree.leaves(base.weights))
    )
    assert moved > 0  # three updates changed the policy


# ---------------------------------------------------------------------------------------------------------
# The command line in a real process: one line per error, nothing at exit


def test_every_error_path_prints_exactly_one_line_in_a_real_process(straight_run, tmp_path):
    """Each way the trainer refuses to run, in its own process: stderr is the one error line and nothing else
    (no traceback from orbax's background threads at interpreter exit)."""
    cfg, _ = straight_run
    raw = yaml.safe_load(config_yaml(cfg))
    done = write_config(tmp_path / "done.yaml", raw)  # the straight run's directory: it holds checkpoints
    fresh = write_config(tmp_path / "fresh.yaml", {**raw, "run_dir": str(tmp_path / "fresh")})
    (tmp_path / "empty").mkdir()
    cases = {
        "resume without a checkpoint": ([fresh, "--resume", f"run_dir={tmp_path / 'empty'}"], "no complete checkpoint"),
        "reuse of a run directory": ([done, "--no-resume"], "already holds checkpoints"),
        "unknown key": ([fresh, "optim.lr=0.1"], "learning_rate"),
        "bad value": ([fresh, "grpo.kl_estimator=k4"], "kl_estimator"),
        "missing data file": ([fresh, "data.source=/nonexistent/p.jsonl"], "does not exist"),
        "missing policy": ([fresh, "model.policy=/nonexistent/policy"], "does not exist"),
        "missing verifier": ([fresh, "reward.verifiers=[{model: /nonexistent/verifier}]"], "does not exist"),
    }
    procs = {
        name: start_module("cme_jax.train", "--config", *args, devices=SUITE_DEVICES)
        for name, (args, _) in cases.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert_one_line_error(proc.returncode, err, cases[name][1])
        assert out == "", (name, out)
    assert not (tmp_path / "fresh" / "config.yaml").exists()  # refused before the run was recorded


def test_overrides_on_both_sides_of_a_flag(straight_run, tmp_path):
    cfg, _ = straight_run
    path = write_config(tmp_path / "c.yaml", yaml.safe_load(config_yaml(cfg)))
    args = ["--config", path, "train.steps=9", "--no-resume", "optim.learning_rate=0.5", "--print-config"]
    proc = start_module("cme_jax.train", *args, devices=SUITE_DEVICES)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    printed = yaml.safe_load(out)
    assert printed["train"]["steps"] == 9 and printed["optim"]["learning_rate"] == 0.5
