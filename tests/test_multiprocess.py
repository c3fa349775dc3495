"""Multi-process training for real: 2 JAX processes x 2 CPU devices (gloo, coordinator on 127.0.0.1) started by
launch/local_multiprocess.py, against 1 process x 4 devices; checkpoints that move between process counts; a
killed process that stops the job; the fused step across processes.

Every run goes through the launcher. The runs share a persistent compilation cache: a 1-process run after the
first one loads its programs, a 2-process run still compiles on process 1 (JAX writes the cache from process 0).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from cme_jax.checkpoint import CheckpointManager
from cme_jax.files import read_run_log
from cme_jax.models.sharding import make_mesh, weight_shardings
from cme_jax.sources import load_model
from tests.helpers import no_proxy
from tests.train_helpers import (
    ROOT,
    assert_same_params,
    metric_rows,
    run_params,
    tiny_config,
    wait_for_checkpoint,
    write_config,
)
from tests.vllm_server import VllmLikeServer

LAUNCHER = ROOT / "launch" / "local_multiprocess.py"
STEPS = 3
# Chat-formatted, these all fall in one prompt-length bucket: one compilation per step function.
PROMPTS = [
    "the quick brown fox",
    "say hello to the world",
    "answer the question",
    "count to five",
    "a small corpus",
    "jumps over the lazy dog",
    "write one clear sentence",
    "seven eight nine ten",
]


@pytest.fixture(scope="module")
def mp_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return root


def mp_config(tiny_models, root: Path, run_dir: Path, *, fused: bool = False, **sections) -> str:
    """4 prompts x 2 samples per step on a (data 2, fsdp 2) mesh: one prompt row per device, 2 per process."""
    cfg = tiny_config(
        tiny_models,
        str(root / "prompts.jsonl"),
        run_dir,
        verifier="same_vocab" if fused else "other_vocab",
        mesh={"data": 2, "fsdp": 2, "tensor": 1},
        train={"steps": STEPS, "prompts_per_step": 4, "fused": fused},
        checkpoint={"every": 1, "keep": 5, "async_save": True},
        logging={"samples_every": 1, "samples_shown": 8, "preview_tokens": 0},
        **sections,
    )
    return write_config(run_dir.parent / f"{run_dir.name}.yaml", cfg)


class Job:
    """One launcher run; its output is collected line by line while it runs."""

    def __init__(self, root: Path, n: int, devices: int, config: str, *overrides: str):
        env = {
            **os.environ,
            "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "CME_JAX_RECORD_FED": "1",
        }
        cmd = [sys.executable, str(LAUNCHER), "-n", str(n), "--devices-per-process", str(devices)]
        cmd += ["--", "--config", config, *overrides]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")))
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"launcher still running after {timeout} s:\n{self.output[-6000:]}") from None
        self._reader.join(timeout=10)
        return rc

    def pid_of(self, i: int, timeout: float = 30) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                if m := re.match(rf"\[launcher\] p{i} started \(pid (\d+)\)", line):
                    return int(m.group(1))
            time.sleep(0.05)
        raise AssertionError(f"the launcher never reported p{i}'s pid:\n{self.output}")


def launch_ok(root: Path, n: int, devices: int, config: str, *overrides: str, timeout: float = 600) -> str:
    job = Job(root, n, devices, config, *overrides)
    rc = job.wait(timeout)
    assert rc == 0, job.output[-6000:]
    return job.output


@pytest.fixture(scope="module")
def policy(tiny_models):
    return load_model(tiny_models["policy"], tokenizer=False)


def final_params(policy, run_dir: Path, step: int = STEPS, shardings=None):
    """The policy params of a run's checkpoint, restored in this (single) process into `shardings`."""
    return run_params(run_dir, policy.weights, step, shardings)


def assert_same_logs(run_dir: Path, ref_dir: Path, steps: set[int]):
    rows = metric_rows(run_dir)
    ref = [r for r in metric_rows(ref_dir) if r["step"] in steps]
    assert [r["step"] for r in rows] == sorted(steps)
    for a, b in zip(rows, ref):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    samples, ref_samples = read_run_log(run_dir / "samples.jsonl"), read_run_log(ref_dir / "samples.jsonl")
    ref_samples = [s for s in ref_samples if s["step"] in steps]
    assert len(samples) == len(ref_samples) == 8 * len(steps)  # every row of every step: gathered from both processes
    for s, r in zip(samples, ref_samples):
        assert {k: s[k] for k in ("step", "prompt", "response", "length")} == {
            k: r[k] for k in ("step", "prompt", "response", "length")
        }
        assert s.get("reward") == pytest.approx(r.get("reward"), rel=1e-4, abs=1e-4)


def copy_checkpoint(src_run: Path, step: int, dst_run: Path) -> None:
    """A fresh run directory holding only `src_run`'s checkpoint of `step`."""
    shutil.copytree(src_run / "checkpoints" / str(step), dst_run / "checkpoints" / str(step))


# ---------------------------------------------------------------------------------------------------------
# The text-reward path (verifier with another vocabulary): 1 x 4 against 2 x 2.


@pytest.fixture(scope="module")
def single_run(tiny_models, mp_root):
    run_dir = mp_root / "single"
    out = launch_ok(mp_root, 1, 4, mp_config(tiny_models, mp_root, run_dir), "logging.preview_tokens=4")
    return run_dir, out


@pytest.fixture(scope="module")
def multi_run(tiny_models, mp_root, single_run):
    run_dir = mp_root / "multi"
    out = launch_ok(mp_root, 2, 2, mp_config(tiny_models, mp_root, run_dir), "logging.preview_tokens=4")
    return run_dir, out


def preview_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(r"\[p\d\]\s+(prompt|before|after):", line)]


@pytest.mark.slow
def test_two_processes_train_like_one(policy, single_run, multi_run):
    (one, one_out), (two, two_out) = single_run, multi_run
    assert_same_params(final_params(policy, two), final_params(policy, one))
    assert_same_logs(two, one, set(range(1, STEPS + 1)))
    # Console, metrics and TensorBoard come from process 0 only; the before/after preview gathers to it.
    assert f"[p0] step {STEPS}/{STEPS}" in two_out and "[p1] step " not in two_out
    assert preview_lines(two_out) == preview_lines(one_out) and len(preview_lines(two_out)) == 6
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_each_process_fed_its_own_half_of_the_batch(single_run, multi_run):
    (one, _), (two, _) = single_run, multi_run
    assert not (one / "fed_prompts.p1.jsonl").exists()
    whole = read_run_log(one / "fed_prompts.p0.jsonl")
    p0, p1 = read_run_log(two / "fed_prompts.p0.jsonl"), read_run_log(two / "fed_prompts.p1.jsonl")
    assert [r["step"] for r in whole] == [r["step"] for r in p0] == [r["step"] for r in p1] == [1, 2, 3]
    for w, a, b in zip(whole, p0, p1):
        assert w["rows"] == [0, 1, 2, 3]
        assert (a["rows"], b["rows"]) == ([0, 1], [2, 3])  # process 0 holds the mesh's first data row
        assert a["prompt_ids"] + b["prompt_ids"] == w["prompt_ids"]
        assert a["prompts"] + b["prompts"] == w["prompts"]
        assert not set(a["prompts"]) & set(b["prompts"])
    assert {p for r in whole for p in r["prompts"]} <= set(PROMPTS)


@pytest.mark.slow
def test_checkpoints_move_between_process_counts(tiny_models, policy, mp_root, single_run, multi_run):
    (one, _), (two, _) = single_run, multi_run
    # In this process (4 devices), a 2-process checkpoint restores into whatever shardings are asked for.
    shardings = weight_shardings(policy.cfg, make_mesh(1, 2, 2))
    restored = final_params(policy, two, shardings=shardings)
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == want
    assert_same_params(restored, final_params(policy, one))
    # Step 1 of the 1-process run, resumed by 2 processes (the other direction: the next test).
    run_dir = mp_root / "resumed_by_two"
    copy_checkpoint(one, 1, run_dir)
    out = launch_ok(mp_root, 2, 2, mp_config(tiny_models, mp_root, run_dir), "--resume")
    assert "[p0] resumed from step 1" in out
    assert_same_params(final_params(policy, run_dir), final_params(policy, one))
    assert_same_logs(run_dir, one, {2, 3})


@pytest.mark.slow
def test_killed_process_stops_the_job_and_a_rerun_resumes(tiny_models, policy, mp_root, single_run):
    one, _ = single_run
    run_dir = mp_root / "killed"
    config = mp_config(tiny_models, mp_root, run_dir)
    job = Job(mp_root, 2, 2, config)
    victim = job.pid_of(1)
    wait_for_checkpoint(run_dir, job.proc, lambda: job.output)
    os.kill(victim, signal.SIGKILL)
    # No waiting for a collective or a heartbeat to time out: the launcher stops the other process at once.
    assert job.wait(timeout=60) != 0
    assert "[launcher] p1 was killed by SIGKILL: stopping the other processes" in job.output
    with CheckpointManager(run_dir, read_only=True) as ckpt:
        saved = ckpt.latest_step()
    assert saved is not None and 1 <= saved < STEPS
    # The rerun resumes from the 2-process checkpoint with 1 process (its own shardings) and ends where a
    # straight run ends; with 2 processes it is the resume of the previous test.
    out = launch_ok(mp_root, 1, 4, config)
    assert f"[p0] resumed from step {saved}" in out
    assert_same_params(final_params(policy, run_dir), final_params(policy, one))


@pytest.mark.slow
def test_two_processes_send_each_row_to_a_served_verifier_once(tiny_models, mp_root, single_run, monkeypatch):
    """Process 0 alone asks the server; both processes train on its scores, like the local verifier's run."""
    no_proxy(monkeypatch)
    server = VllmLikeServer()
    server.models["tiny"] = load_model(tiny_models["other_vocab"])
    run_dir = mp_root / "served"
    path = mp_config(tiny_models, mp_root, run_dir)
    raw = yaml.safe_load(Path(path).read_text())
    raw["reward"]["verifiers"][0].update(url=server.url, server_model="tiny", cache=None)
    try:
        launch_ok(mp_root, 2, 2, write_config(Path(path), raw), "logging.preview_tokens=0")
    finally:
        server.close()
    served, local = metric_rows(run_dir), metric_rows(single_run[0])
    assert [r["step"] for r in served] == [r["step"] for r in local] == list(range(1, STEPS + 1))
    for a, b in zip(served, local):
        rewards = [k for k in a if k.startswith(("reward/", "cme/"))]
        assert rewards and {k: a[k] for k in rewards} == pytest.approx({k: b[k] for k in rewards}, rel=0, abs=1e-5)
        # served scores differ from local ones by ~1e-7; the loss and the advantages' mean nearly cancel
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    samples = read_run_log(run_dir / "samples.jsonl")
    texts = lambda rows: [(s["step"], s["prompt"], s["response"]) for s in rows]
    assert texts(samples) == texts(read_run_log(single_run[0] / "samples.jsonl"))
    distinct = sum(len({(s["prompt"], s["response"]) for s in samples if s["step"] == k}) for k in range(1, STEPS + 1))
    assert distinct > STEPS * 4 and len(server.scored_rows) == distinct  # twice as many with a request per process


# ---------------------------------------------------------------------------------------------------------
# The fused step (verifier with the policy's vocabulary): sample, score and update in one jit across processes.


@pytest.mark.slow
def test_fused_step_across_processes(tiny_models, mp_root, single_run):
    one, _ = single_run
    run_dir = mp_root / "fused"
    out = launch_ok(mp_root, 2, 2, mp_config(tiny_models, mp_root, run_dir, fused=True))
    assert "[p0] step: one fused jit" in out
    # The same data order as any run of this data, split between the processes.
    p0, p1 = read_run_log(run_dir / "fed_prompts.p0.jsonl"), read_run_log(run_dir / "fed_prompts.p1.jsonl")
    whole = read_run_log(one / "fed_prompts.p0.jsonl")
    assert [a["prompts"] + b["prompts"] for a, b in zip(p0, p1, strict=True)] == [w["prompts"] for w in whole]
    # Sample tables hold every row of the global batch.
    samples = read_run_log(run_dir / "samples.jsonl")
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert len([s for s in samples if s["step"] == r["step"]]) == 8
        assert np.isfinite(r["reward/mean"]) and np.isfinite(r["loss"])
    # Step 1 samples with the initial weights and the same key as the text-path run: the same responses, and
    # the same reward-independent statistics, which the fused step computes inside the jit over all processes' rows.
    first = [(s["prompt"], s["response"]) for s in samples if s["step"] == 1]
    assert first == [(s["prompt"], s["response"]) for s in read_run_log(one / "samples.jsonl") if s["step"] == 1]
    ref = metric_rows(one)[0]
    for key in ("entropy_mean", "response/length_mean", "response/length_max", "response/truncated_frac"):
        assert rows[0][key] == pytest.approx(ref[key], rel=1e-5), key


# ---------------------------------------------------------------------------------------------------------
# The launcher alone


def test_launcher_environment_per_process():
    spec = importlib.util.spec_from_file_location("local_multiprocess", LAUNCHER)
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)
    base = {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8", "PYTHONPATH": "/x"}
    env = lm.process_env(base, pid=1, n=3, port=4567, devices=2, heartbeat=600)
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4567"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"], env["JAX_PLATFORMS"]) == ("3", "1", "cpu")
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_foo=1", "--xla_force_host_platform_device_count=2"]
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/x"]


def test_launcher_passes_on_a_failure(mp_root):
    job = Job(mp_root, 2, 1, str(mp_root / "missing.yaml"))
    assert job.wait(timeout=300) == 2
    # The first process to fail stops the other, which may not get to print its own error.
    assert any(line.startswith(("[p0] error: ", "[p1] error: ")) and "missing.yaml" in line for line in job.lines)
    assert any(line.startswith("[launcher] p") and "exited with status 2" in line for line in job.lines), job.output
    assert "[launcher] exit status 2" in job.output
