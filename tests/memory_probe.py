"""Measure a training step's memory on the CPU, for tests/test_memory.py (run as a separate process).

    MALLOC_MMAP_THRESHOLD_=65536 python tests/memory_probe.py CONFIG [key=value ...]

Loads the run as the trainer does, runs two steps, and prints one JSON line: the bytes of every live JAX array
after the second step (the persistent state) and how far the second step's resident set rose above the resident
set before it (its temporaries; the first step compiles). With a fixed mmap threshold glibc returns every large
buffer to the system when it is freed, so the resident set follows what is allocated.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

from cme_jax import train
from cme_jax.config import load_config
from cme_jax.distributed import put_global
from cme_jax.models.sharding import replicated, weight_shardings
from cme_jax.prompts import PromptSampler
from cme_jax.train_step import init_state, make_optimizer, state_shardings


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(argv: list[str]) -> None:
    cfg = load_config(argv[0], argv[1:])
    run = train.load_run(cfg)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    state = init_state(run.policy.weights, optimizer, cfg.train.seed)
    ssh = state_shardings(state, optimizer, weight_shardings(run.policy.cfg, run.mesh), replicated(run.mesh))
    state = jax.tree.map(put_global, state, ssh)
    stepper = train.make_stepper(run, optimizer, ssh)
    sampler = PromptSampler(len(run.prompts), cfg.data.seed, fingerprint=run.data.fingerprint)
    idx, sampler = sampler.global_batch(cfg.train.prompts_per_step)
    state, *_ = stepper(state, 0, [run.prompts[i] for i in idx])  # compiles
    jax.block_until_ready(state)
    gc.collect()
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the current resident set
    idx, sampler = sampler.global_batch(cfg.train.prompts_per_step)
    state, *_ = stepper(state, 1, [run.prompts[i] for i in idx])
    jax.block_until_ready(state)
    peak = status_kib("VmHWM")
    live = sum(x.nbytes for x in jax.live_arrays())
    print(json.dumps({"live_bytes": live, "step_bytes": (peak - before) * 1024}))


if __name__ == "__main__":
    main(sys.argv[1:])
