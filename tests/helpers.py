"""Helpers shared by the test modules: fake CPU device counts, commands in child processes, one-line errors.

Importing this module does not import jax (tests/conftest.py uses it before jax reads XLA_FLAGS).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICE_FLAG = "--xla_force_host_platform_device_count"
DEVICES_ENV = "CME_TEST_DEVICES"  # how many fake CPU devices the test process has (tests/conftest.py)
SUITE_DEVICES = int(os.environ.get(DEVICES_ENV, "4"))


def with_device_count(xla_flags: str, devices: int) -> str:
    """XLA_FLAGS asking for `devices` fake CPU devices, other flags kept."""
    flags = re.sub(rf"{DEVICE_FLAG}=\S+", "", xla_flags).split()
    return " ".join([*flags, f"{DEVICE_FLAG}={devices}"])


def child_env(devices: int = 1, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child `python` on `devices` fake CPU devices that imports this checkout's cme_jax.

    It inherits the test process's environment (the compilation cache, rank promotion, matmul precision), then
    `env` on top.
    """
    out = dict(os.environ)
    out["XLA_FLAGS"] = with_device_count(out.get("XLA_FLAGS", ""), devices)
    out["JAX_PLATFORMS"] = "cpu"
    # A child started outside ROOT would otherwise import whichever cme_jax is installed.
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), out.get("PYTHONPATH")) if p)
    out.update(env or {})
    return out


def start_module(
    module: str,
    *args: str,
    devices: int = 1,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike = ROOT,
    stderr: int = subprocess.PIPE,
) -> subprocess.Popen:
    """`python -m module args` started in a child process (text stdout and stderr piped, or stderr into stdout)."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=child_env(devices, env),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def run_module(
    module: str,
    *args: str,
    devices: int = 1,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike = ROOT,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`python -m module args` run to the end in a child process, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=child_env(devices, env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(returncode: int, stderr: str, *words: str) -> str:
    """A refused command's outcome: exit status 2 and one line `error: ...` holding `words`; returns the line."""
    lines = stderr.strip().splitlines()
    assert returncode == 2 and len(lines) == 1, (returncode, stderr[-3000:])
    assert lines[0].startswith("error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def cli_error(capsys: pytest.CaptureFixture, main: Callable[[Sequence[str]], object], argv: Sequence[str]) -> str:
    """A command's `main(argv)` in this process that must refuse its input in one line; returns the line."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return assert_one_line_error(e.value.code, capsys.readouterr().err)


def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests to the tests' servers on 127.0.0.1 go straight there, whatever proxy the machine sets."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


# Every pairwise evaluation's results.json holds these.
EVAL_RESULT_KEYS = (
    "n",
    "wins",
    "ties",
    "losses",
    "unparsed",
    "win_rate_tie_adjusted",
    "ci95_low",
    "ci95_high",
    "position_consistency",
    "model_mean_length",
    "base_mean_length",
)
