"""Accelerator checks and benchmarks in one run: correctness first, then forward MFU, decode and the GRPO step.

    python benchmarks/gpu.py [--quick] [--out FILE]

Everything uses random weights with Qwen2.5-0.5B's shapes (speed depends only on shapes), so nothing is
downloaded. Correctness: the accelerator's float32 forward against the CPU's on the same weights, the
sampler's log-probs against a full recompute, and one fused GRPO step that must stay finite and move the
weights. Then: forward + chunked token log-probs (MFU), decode tokens/s against the HBM roofline at batch 64
and 256 (benchmarks/sampling.py), and the fused GRPO step (sample + same-vocabulary CME + update) with the
update's model-FLOPs utilisation. `--quick` shrinks the model to check the script itself on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
from common import table

# Dense bfloat16 peak FLOP/s by device kind (vendor figures, no sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5 lite": 197e12, "TPU v4": 275e12}


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def forward_flops(cfg, tokens: int, context: float, head_tokens: int) -> float:
    """Matmul FLOPs of a forward over `tokens` tokens attending to `context` keys on average."""
    D, F, L, V = cfg.dim, cfg.mlp_dim, cfg.num_layers, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = 2 * L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F)
    return tokens * (dense + L * 4 * context * N * H) + head_tokens * 2 * D * V


def timed(fn, repeats: int = 3) -> float:
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def model_config(quick: bool):
    from sampling import qwen25_05b_config

    cfg = qwen25_05b_config()
    if quick:
        cfg = dataclasses.replace(
            cfg, vocab_size=512, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128
        )
    return cfg


def check_correctness(cfg) -> list[list[str]]:
    """The accelerator agrees with the CPU and with itself; returns table rows (check, value, limit, ok)."""
    from cme_jax.models.logprobs import token_logprobs
    from cme_jax.models.transformer import forward, init_weights
    from cme_jax.sampling import SamplingConfig, sample

    small = dataclasses.replace(cfg, num_layers=2)
    rows = []
    with jax.default_matmul_precision("highest"):
        w = init_weights(small, jax.random.key(1), jnp.float32)
        toks = np.random.default_rng(0).integers(3, small.vocab_size, (4, 48)).astype(np.int32)
        mask = np.ones_like(toks, bool)
        mask[1, :7] = False  # a left-padded row
        pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
        acc = np.asarray(jax.jit(forward, static_argnames="cfg")(w, small, toks, pos, mask)[0])
        cpu = jax.devices("cpu")[0]
        w_cpu = jax.device_put(w, cpu)
        with jax.default_device(cpu):
            ref = np.asarray(jax.jit(forward, static_argnames="cfg")(w_cpu, small, toks, pos, mask)[0])
        err = float(np.abs(acc - ref)[mask].max())
        rows.append(["forward f32 vs CPU, max |dlogit|", f"{err:.2e}", "1e-3", str(err < 1e-3)])

        scfg = SamplingConfig(max_new_tokens=24, temperature=0.8)
        ro = jax.jit(sample, static_argnames=("cfg", "scfg", "pad_id"))(
            w, small, toks, mask, jax.random.key(2), scfg, np.asarray([-1], np.int32), 0
        )
        full = np.concatenate([toks, np.asarray(ro.tokens)], 1)
        fmask = np.concatenate([mask, np.asarray(ro.mask)], 1)
        lp = np.asarray(token_logprobs(w, small, full, fmask, start=toks.shape[1], temperature=0.8))
        err = float(np.abs(lp - np.asarray(ro.logprobs))[np.asarray(ro.mask)].max())
        rows.append(["sampler log-probs vs recompute", f"{err:.2e}", "1e-3", str(err < 1e-3)])
    return rows


def bench_forward(cfg, batch: int, length: int, peak: float | None) -> list[str]:
    from cme_jax.models.logprobs import token_logprobs
    from cme_jax.models.transformer import init_weights

    w = init_weights(cfg, jax.random.key(0), jnp.bfloat16)
    toks = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, length)).astype(np.int32)
    mask = np.ones_like(toks, bool)
    fn = jax.jit(lambda w, t, m: token_logprobs(w, cfg, t, m))
    t = timed(lambda: fn(w, toks, mask))
    flops = forward_flops(cfg, batch * length, length / 2, batch * length)
    mfu = f"{flops / t / peak:.1%}" if peak else "n/a"
    return [f"forward+logprobs {batch}x{length}", f"{t * 1e3:.1f} ms", f"{batch * length / t:,.0f}", mfu]


def bench_grpo(cfg, prompts: int, group: int, prompt_len: int, new: int, peak: float | None) -> list[list[str]]:
    """Fused step (sample + same-vocabulary CME + update) and its parts, bf16 compute, f32 master weights."""
    from cme_jax.grpo import GRPOConfig
    from cme_jax.models.transformer import init_weights
    from cme_jax.sampling import SamplingConfig
    from cme_jax.scoring import score_same_vocab
    from cme_jax.train_step import (
        OptimConfig,
        StepConfig,
        build_step,
        compute_params,
        init_state,
        join_rollout,
        make_optimizer,
    )

    R = prompts * group

    def reward_fn(params, ro, prompts_R, pmask_R, frozen):
        out = score_same_vocab(
            frozen["weights"],
            cfg,
            frozen["ctx"],
            frozen["ctx_mask"],
            ro.tokens,
            ro.mask,
            ro.stopped,
            end_id=0,
            score_eos=False,
            max_length=new,
            pad_id=0,
        )
        return out["mean"], {"cme/mean": out["mean"].mean()}

    sc = StepConfig(
        grpo=GRPOConfig(beta=0.04),
        sampling=SamplingConfig(max_new_tokens=new, temperature=1.0, num_samples=group),
        compute_dtype="bfloat16",
    )
    opt = make_optimizer(OptimConfig(learning_rate=1e-6), 1000)
    fns = build_step(cfg, sc, opt, pad_id=0, reward_fn=reward_fn)
    params = init_weights(cfg, jax.random.key(0), jnp.float32)
    ref = compute_params(jax.tree.map(jnp.copy, params), "bfloat16")
    frozen = {
        "weights": init_weights(cfg, jax.random.key(1), jnp.bfloat16),
        "ctx": np.random.default_rng(1).integers(3, cfg.vocab_size, (prompts, prompt_len)).astype(np.int32),
        "ctx_mask": np.ones((prompts, prompt_len), bool),
    }
    toks = np.random.default_rng(2).integers(3, cfg.vocab_size, (prompts, prompt_len)).astype(np.int32)
    mask = np.ones_like(toks, bool)
    no_stop = np.asarray([-1], np.int32)
    state = init_state(params, opt, 0)
    before = np.asarray(state.params.layers.w_down[0])
    holder = {"state": state}

    def fused():
        holder["state"], metrics, _ = fns.fused(holder["state"], toks, mask, no_stop, ref, frozen)
        return metrics

    out = {}
    for name, fn in (("update", None), ("sample", None), ("fused", fused)):
        try:
            if name == "sample":
                out[name] = timed(lambda: fns.rollout(holder["state"], toks, mask, no_stop))
            elif name == "update":
                ro = fns.rollout(holder["state"], toks, mask, no_stop)
                batch = join_rollout(toks, mask, ro, group)
                rewards = jax.random.normal(jax.random.key(3), (R,))

                def upd(batch=batch, rewards=rewards):
                    holder["state"], m = fns.update(holder["state"], batch, rewards, ref)
                    return m

                out[name] = timed(upd)
            else:
                out[name] = timed(fn)
        except Exception as e:  # report and go on: one part running out of memory should not hide the others
            print(f"{name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            out[name] = float("nan")
    metrics = jax.device_get(fused()) if np.isfinite(out["fused"]) else {}
    finite = all(np.isfinite(np.asarray(v)).all() for v in metrics.values()) if metrics else "n/a"
    t_fused, t_sample, t_update = out["fused"], out["sample"], out["update"]
    seq = prompt_len + new
    ref_fwd = forward_flops(cfg, R * seq, seq / 2, R * new)
    update_flops = 3 * ref_fwd + ref_fwd  # policy forward + backward, reference forward
    mfu = f"{update_flops / t_update / peak:.1%}" if peak else "n/a"
    moved = bool(np.abs(np.asarray(holder["state"].params.layers.w_down[0]) - before).max() > 0)
    return [
        [
            f"fused GRPO step {prompts}x{group} rows, prompt {prompt_len}, {new} new",
            f"{t_fused:.3f} s",
            f"{R * new / t_fused:,.0f}",
            f"finite={finite} moved={moved}",
        ],
        ["  sample (rollout jit)", f"{t_sample:.3f} s", f"{R * new / t_sample:,.0f}", ""],
        ["  update (policy fwd+bwd, reference fwd)", f"{t_update:.3f} s", f"{R * seq / t_update:,.0f}", f"MFU {mfu}"],
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model: check the script on a CPU")
    p.add_argument("--out", help="also write the report to this file")
    p.add_argument("--skip", nargs="*", default=[], choices=["correctness", "forward", "decode", "grpo"])
    p.add_argument(
        "--grpo",
        nargs="+",
        default=["16x4x128x128"],
        help="GRPO step shapes, prompts x samples x prompt length x new tokens",
    )
    args = p.parse_args()
    cfg = model_config(args.quick)
    peak = peak_flops()
    lines = [
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
        f"bf16 peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s"
    ]
    print(lines[0], flush=True)

    def emit(title, headers, rows):
        text = f"\n{title}\n{table(headers, rows)}"
        print(text, flush=True)
        lines.append(text)

    if "correctness" not in args.skip:
        emit("correctness", ["check", "value", "limit", "ok"], check_correctness(cfg))
    if "forward" not in args.skip:
        sizes = [(4, 64)] if args.quick else [(16, 1024), (64, 512)]
        emit(
            "forward (bf16, Qwen2.5-0.5B shape)",
            ["case", "time", "tokens/s", "MFU"],
            [bench_forward(cfg, b, t, peak) for b, t in sizes],
        )
    if "grpo" not in args.skip:
        shapes = [(2, 2, 16, 8)] if args.quick else [tuple(map(int, s.split("x"))) for s in args.grpo]
        emit(
            "GRPO step (bf16 compute, f32 master weights, beta 0.04)",
            ["case", "time", "tokens/s", "notes"],
            [row for shape in shapes for row in bench_grpo(cfg, *shape, peak)],
        )
    if "decode" not in args.skip:
        from sampling import gpu_table

        text = gpu_table(batches=(4, 8), prompt_len=16, new=16, cfg=cfg) if args.quick else gpu_table()
        lines.append(str(text))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
