"""What a GRPO step needs in device memory before it runs: XLA's memory analysis of the rollout and update programs.

    python benchmarks/memory.py [--prompts 16] [--group 4] [--prompt-len 128] [--new 256] [--explain]

Compiles (does not run) the jitted rollout and update of a random-weight Qwen2.5-0.5B-shaped policy in bfloat16
with float32 master weights, and prints each program's argument, output and temporary bytes. With `--explain`,
XLA dumps its buffer assignment and the largest temporary allocations are listed with the values they hold,
which names the operation behind an out-of-memory error. `--quick` shrinks the model to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def largest_allocations(path: Path, top: int) -> list[str]:
    """The `top` largest allocations of one XLA buffer-assignment dump, each with its largest values (the
    temporaries share one allocation, so its biggest values name what fills it)."""
    allocs: list[tuple[int, str, list[tuple[int, str]]]] = []
    for line in path.read_text().splitlines():
        m = re.match(r"allocation \d+: size (\d+)(.*)", line)
        v = re.match(r"\s*value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): (\S+)", line)
        if m:
            allocs.append((int(m.group(1)), m.group(2).strip(" ,:")[:80], []))
        elif v and allocs:
            allocs[-1][2].append((int(v.group(2)), f"{v.group(1)} {v.group(3)}"))
    allocs.sort(key=lambda a: -a[0])
    out = []
    for size, what, values in allocs[:top]:
        biggest = sorted(values, reverse=True)[:3]
        out.append(f"{size / 2**30:8.2f} GiB {what}")
        out += [f"      {n / 2**30:8.2f} GiB  {name}" for n, name in biggest]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--explain", action="store_true", help="list the largest temporary buffers of each program")
    p.add_argument("--top", type=int, default=4)
    p.add_argument("--remat", choices=["none", "dots", "full"], default="none", help="the policy's model.remat")
    p.add_argument("--quick", action="store_true", help="a tiny model: check the script on a CPU")
    args = p.parse_args()
    dump = Path(tempfile.mkdtemp(prefix="xla_dump_"))
    if args.explain:  # must be set before the backend starts
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}"

    import jax
    import jax.numpy as jnp
    from gpu import model_config

    from cme_jax.grpo import GRPOConfig
    from cme_jax.models.transformer import init_weights
    from cme_jax.sampling import SamplingConfig
    from cme_jax.train_step import (
        OptimConfig,
        StepConfig,
        build_step,
        compute_params,
        init_state,
        join_rollout,
        make_optimizer,
    )

    cfg = dataclasses.replace(model_config(args.quick), remat=args.remat)
    R, P, N = args.prompts * args.group, args.prompt_len, args.new
    sc = StepConfig(
        grpo=GRPOConfig(beta=0.04),
        sampling=SamplingConfig(max_new_tokens=N, temperature=1.0, num_samples=args.group),
        compute_dtype="bfloat16",
    )
    opt = make_optimizer(OptimConfig(learning_rate=1e-6), 1000)
    fns = build_step(cfg, sc, opt, pad_id=0)
    params = jax.eval_shape(lambda: init_weights(cfg, jax.random.key(0), jnp.float32))
    state = jax.eval_shape(lambda p: init_state(p, opt, 0), params)
    ref = jax.eval_shape(lambda p: compute_params(p, "bfloat16"), params)
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    b = lambda *s: jax.ShapeDtypeStruct(s, jnp.bool_)
    prompts, pmask, stop = i32(args.prompts, P), b(args.prompts, P), i32(1)
    ro = jax.eval_shape(fns.rollout, state, prompts, pmask, stop)
    batch = jax.eval_shape(lambda t, m, r: join_rollout(t, m, r, args.group), prompts, pmask, ro)
    rewards = jax.ShapeDtypeStruct((R,), jnp.float32)
    programs = {
        "rollout": fns.rollout.lower(state, prompts, pmask, stop),
        "update": fns.update.lower(state, batch, rewards, ref),
    }
    print(f"{jax.devices()[0].device_kind}: {args.prompts} prompts x {args.group} samples, prompt {P}, {N} new tokens")
    print(f"{'program':10} {'arguments':>11} {'outputs':>11} {'temporaries':>12}")
    for name, lowered in programs.items():
        mem = lowered.compile().memory_analysis()
        gib = lambda n: f"{n / 2**30:8.2f} GiB"
        print(
            f"{name:10} {gib(mem.argument_size_in_bytes)} {gib(mem.output_size_in_bytes)} "
            f"{gib(mem.temp_size_in_bytes)} "
        )
    if args.explain:  # one buffer assignment per compiled module, in compile order (rollout, then update)
        for path in sorted(dump.glob("*jit__lambda*buffer-assignment.txt")):
            print(f"\n{path.name}: largest allocations")
            for line in largest_allocations(path, args.top):
                print("    " + line)


if __name__ == "__main__":
    main()
