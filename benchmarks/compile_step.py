"""Compile time of the GRPO update (the jitted `train_step.update`) for several iteration / minibatch / micro-batch
shapes, in CPU seconds of this process (less sensitive to other load than wall time).

    python benchmarks/compile_step.py [--layers 4] [--dim 256]

Each shape is lowered and compiled once with no compilation cache; the table lists the jaxpr size, the lowering
and the XLA compile time.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cme_jax.grpo import GRPOConfig
from cme_jax.models.transformer import ModelConfig, init_weights
from cme_jax.sampling import Rollout, SamplingConfig
from cme_jax.train_step import StepConfig, init_state, join_rollout, update


def count_eqns(jaxpr) -> int:
    """Equations of a jaxpr and all its sub-jaxprs: how much program XLA is given."""
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, list | tuple) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += count_eqns(inner)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    args = ap.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    cfg = ModelConfig(
        family="llama",
        vocab_size=4096,
        dim=args.dim,
        num_layers=args.layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=args.dim // 4,
        mlp_dim=4 * args.dim,
    )
    P, N, B, G = 32, 32, 2, 4
    rng = np.random.default_rng(0)
    ro = Rollout(
        tokens=jnp.asarray(rng.integers(3, 4096, (B * G, N)), jnp.int32),
        mask=jnp.ones((B * G, N), bool),
        logprobs=jnp.full((B * G, N), -2.0, jnp.float32),
        lengths=jnp.full((B * G,), N, jnp.int32),
        stopped=jnp.zeros((B * G,), bool),
        truncated=jnp.ones((B * G,), bool),
    )
    prompts = jnp.asarray(rng.integers(3, 4096, (B, P)), jnp.int32)
    batch = join_rollout(prompts, jnp.ones((B, P), bool), ro, G)
    rewards = jnp.asarray(rng.normal(size=B * G), jnp.float32)
    params = init_weights(cfg, jax.random.key(0))
    opt = optax.adamw(1e-5)
    state = init_state(params, opt, 0)
    print("| iterations x minibatches x micro-batches | jaxpr equations | lower (CPU s) | compile (CPU s) |")
    print("|---|---|---|---|")
    for mu, m, k in ((1, 1, 1), (1, 2, 2), (2, 2, 2)):
        sc = StepConfig(
            grpo=GRPOConfig(beta=0.04),
            sampling=SamplingConfig(max_new_tokens=N, num_samples=G),
            num_iterations=mu,
            minibatches=m,
            micro_batches=k,
        )
        fn = jax.jit(lambda st, b, r, ref, sc=sc: update(st, b, r, ref, cfg=cfg, sc=sc, optimizer=opt))
        eqns = count_eqns(jax.make_jaxpr(fn)(state, batch, rewards, params).jaxpr)
        t0 = time.process_time()
        lowered = fn.lower(state, batch, rewards, params)
        t1 = time.process_time()
        lowered.compile()
        t2 = time.process_time()
        print(f"| {mu} x {m} x {k} | {eqns} | {t1 - t0:.2f} | {t2 - t1:.2f} |")


if __name__ == "__main__":
    main()
