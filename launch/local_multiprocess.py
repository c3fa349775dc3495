"""Run the trainer as several JAX processes on this machine, the way a multi-host job runs on a cluster.

    python launch/local_multiprocess.py -n 2 --devices-per-process 2 -- --config CONFIG [key=value ...]

e.g. `-- --config configs/demo_cpu.yaml train.prompts_per_step=4` (4 prompts per step over 2 x 2 devices).

Starts N copies of `python -m cme_jax.train --distributed ARGS...` on the CPU, joined by jax.distributed
through a coordinator on 127.0.0.1 (a free port unless --port is given), each with K fake CPU devices and
gloo collectives. Every output line is prefixed with `[p<i>]`. When one process exits with an error (or is
killed), the others cannot finish their collectives, so the launcher kills them at once and exits non-zero;
restarting the same command resumes from the run's last complete checkpoint. Ctrl-C or SIGTERM is passed
on as SIGTERM, which makes the trainer save a checkpoint and stop (a second Ctrl-C kills).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port nobody listens on right now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], *, pid: int, n: int, port: int, devices: int, heartbeat: int) -> dict[str, str]:
    """The environment of process `pid`: coordinator, process count and id, CPU devices, gloo collectives."""
    flags = re.sub(rf"{DEVICE_FLAG}=\S+", "", base.get("XLA_FLAGS", "")).split()
    return {
        **base,
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(n),
        "JAX_PROCESS_ID": str(pid),
        "JAX_PLATFORMS": "cpu",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "XLA_FLAGS": " ".join([*flags, f"{DEVICE_FLAG}={devices}"]),
        # This launcher stops the others when one dies, so the heartbeat only has to tolerate a loaded machine.
        "CME_JAX_HEARTBEAT_TIMEOUT": str(heartbeat),
        "PYTHONUNBUFFERED": "1",
        # The trainer is imported as a module: this checkout, whatever the caller's directory.
        "PYTHONPATH": os.pathsep.join(x for x in (str(ROOT), base.get("PYTHONPATH", "")) if x),
    }


def _die_with_parent() -> None:
    """In the child before exec: on Linux, get SIGKILL when the launcher dies, so no orphan waits on a collective."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _how(rc: int) -> str:
    if rc >= 0:
        return f"exited with status {rc}"
    try:
        return f"was killed by {signal.Signals(-rc).name}"
    except ValueError:
        return f"was killed by signal {-rc}"


class Job:
    """N trainer processes; their output is relayed line by line with a `[p<i>]` prefix."""

    def __init__(self, argv: Sequence[str], n: int, devices: int, port: int, python: str, heartbeat: int):
        self.procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        cmd = [python, "-m", "cme_jax.train", "--distributed", *argv]
        for i in range(n):
            env = process_env(dict(os.environ), pid=i, n=n, port=port, devices=devices, heartbeat=heartbeat)
            # Own session: a Ctrl-C in the terminal reaches the launcher only, which decides what the children get.
            p = subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            self.procs.append(p)
            self.say(f"p{i} started (pid {p.pid})")
        # Relay threads start after every fork: preexec_fn is only safe while this process has one thread.
        for i, p in enumerate(self.procs):
            t = threading.Thread(target=self._relay, args=(i, p), daemon=True)
            t.start()
            self._threads.append(t)

    def say(self, msg: str) -> None:
        self._write(f"[launcher] {msg}\n")

    def _write(self, text: str) -> None:
        with self._lock:
            sys.stdout.write(text)
            sys.stdout.flush()

    def _relay(self, i: int, p: subprocess.Popen) -> None:
        for raw in iter(p.stdout.readline, b""):
            self._write(f"[p{i}] {raw.decode(errors='replace').rstrip()}\n")

    def signal_all(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)

    def wait(self) -> int:
        """Wait for all processes; the first failure kills the rest. Returns the launcher's exit status."""
        status = 0
        while any(p.poll() is None for p in self.procs):
            for i, p in enumerate(self.procs):
                rc = p.poll()
                if rc not in (None, 0) and status == 0:
                    status = rc if rc > 0 else 128 - rc
                    self.say(f"p{i} {_how(rc)}: stopping the other processes")
                    self.signal_all(signal.SIGKILL)
            time.sleep(0.1)
        for t in self._threads:
            t.join(timeout=5)
        if status == 0:
            failed = [(i, p.returncode) for i, p in enumerate(self.procs) if p.returncode != 0]
            if failed:
                i, rc = failed[0]
                status = rc if rc > 0 else 128 - rc
                self.say(f"p{i} {_how(rc)}")
        return status


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python launch/local_multiprocess.py",
        description=__doc__.split("\n")[0],
        usage="%(prog)s -n N [--devices-per-process K] [--port P] -- TRAINER_ARGS...",
    )
    p.add_argument("-n", "--num-processes", type=int, default=2, help="JAX processes to start (default 2)")
    p.add_argument("--devices-per-process", type=int, default=1, help="fake CPU devices per process (default 1)")
    p.add_argument("--port", type=int, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=600,
        metavar="S",
        help="seconds a silent process counts as alive (default 600; the launcher notices deaths itself)",
    )
    p.add_argument("--python", default=sys.executable, help="interpreter for the trainer (default: this one)")
    p.add_argument("trainer_args", nargs=argparse.REMAINDER, help="arguments for python -m cme_jax.train")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rest = list(args.trainer_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if min(args.num_processes, args.devices_per_process, args.heartbeat_timeout) < 1:
        print("error: -n, --devices-per-process and --heartbeat-timeout must be >= 1", file=sys.stderr)
        return 2
    if not rest:
        print(
            "error: no trainer arguments; pass them after --, e.g. -- --config configs/demo_cpu.yaml", file=sys.stderr
        )
        return 2
    port = args.port or free_port()
    job = Job(rest, args.num_processes, args.devices_per_process, port, args.python, args.heartbeat_timeout)
    interrupts = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            job.say(f"received {signal.Signals(signum).name}: asking every process to checkpoint and stop")
            job.signal_all(signal.SIGTERM)
        else:
            job.say("killing every process")
            job.signal_all(signal.SIGKILL)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        status = job.wait()
    finally:
        job.signal_all(signal.SIGKILL)
    job.say("all processes finished" if status == 0 else f"exit status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
