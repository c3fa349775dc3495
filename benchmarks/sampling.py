"""Sampling throughput: cme_jax's jitted sampler beside transformers `generate` (PyTorch) on SmolLM2-135M-Instruct.

    python benchmarks/sampling.py                        # 16 x 64 and 64 x 128 (rows x new tokens)
    python benchmarks/sampling.py --sizes 16x64 --rounds 3 --cpus 1
    python benchmarks/sampling.py --gpu-only             # on a GPU: decode roofline of a Qwen2.5-0.5B-sized model

Both sides draw with temperature 1 (no top-k / top-p / min-p) from the same left-padded batch of chat prompts
(padded to cme_jax's prompt bucket, as `generate` does), and both generate exactly `new tokens` per row:
transformers gets `min_new_tokens = max_new_tokens` (its EOS logit is masked until then) and cme_jax an empty
stop-token set, so the token counts are equal. Each side runs in its own child process: its peak memory is
that process's `ru_maxrss` (model loading included) and its working memory the peak RSS during generation
minus the RSS before it. With `--rounds`, the sides alternate over several child processes and keep their
best time, so a shared machine's load falls on both alike; `--cpus N` pins everything to N cores. The FLOP
rate counts the same model FLOPs for both sides (prefill of the padded prompts, decode, the vocabulary head
where tokens are drawn, attention against the context) against this machine's float32 matmul rate measured
in the same run.

On a GPU (`jax.default_backend() == "gpu"`) the script also reports decode tokens/s of a random-weight model
with Qwen2.5-0.5B's shape in bfloat16 at batch 64 and 256 as a fraction of the HBM-bandwidth roofline (weights
plus the filled part of the KV cache read once per step, at the copy bandwidth measured in the same run); that
part is the function `gpu_table()`, which loads no model files and takes about a minute on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PeakMemory, matmul_gflops, mib, run_child, table

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"

QUESTIONS = [
    "Name three prime numbers.",
    "Write a haiku about the sea.",
    "What is the capital of France? Answer in one word.",
    "Explain in two sentences why the sky is blue, for a child who keeps asking questions.",
    "Give me a short recipe for pancakes.",
    "Translate 'good morning' into Spanish and German.",
    "List the planets of the solar system in order from the sun, with one fact about each.",
    "Why do cats purr?",
]


def prompts(rows: int) -> list[str]:
    """`rows` chat prompts of varied lengths (so the batch is left-padded)."""
    return [
        f"{QUESTIONS[i % len(QUESTIONS)]}" + (f" (variant {i // len(QUESTIONS)})" if i >= len(QUESTIONS) else "")
        for i in range(rows)
    ]


def model_flops(cfg, prompt_len: int, rows: int, new_tokens: int) -> float:
    """Prefill of the padded prompts + decode: 2 x matmul params per token (layers, and the vocabulary head at
    the positions that are sampled from) plus attention against the context."""
    D, F, L, V = cfg.dim, cfg.mlp_dim, cfg.num_layers, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_token = 2 * L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F)
    attn = lambda context: 4 * L * N * H * context  # QK^T and PV
    prefill = prompt_len * per_token + sum(attn(c + 1) for c in range(prompt_len))
    decode = sum(per_token + attn(prompt_len + t + 1) for t in range(new_tokens - 1))
    return rows * (prefill + decode + new_tokens * 2 * D * V)


def matmul_floor(cfg, prompt_len: int, rows: int, new_tokens: int) -> float:
    """Seconds that the run's weight matmuls alone take at the rate XLA reaches for their exact shapes here: each
    distinct [rows, in] x [in, out] product is timed once (best of 5) and counted as often as the run does it.
    Attention, the draw and everything else come on top: no implementation on this CPU goes below it."""
    import jax
    import jax.numpy as jnp

    D, F, L, V = cfg.dim, cfg.mlp_dim, cfg.num_layers, cfg.vocab_size
    layer = [(D, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim), (cfg.num_heads * cfg.head_dim, D)]
    layer += [(D, 2 * F), (F, D)]
    # (rows of the product, in, out, times): prefill over the padded prompts, then one decode step per token.
    work = [(rows * prompt_len, i, o, L) for i, o in layer] + [(rows, D, V, 1)]
    work += [(rows, i, o, L * (new_tokens - 1)) for i, o in layer] + [(rows, D, V, new_tokens - 1)]

    def best_of(f, *args) -> float:
        f(*args).block_until_ready()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            f(*args).block_until_ready()
            best = min(best, time.perf_counter() - t)
        return best

    total = 0.0
    for m, i, o, times in work:
        x, w = jnp.ones((m, i), jnp.float32), jnp.ones((i, o), jnp.float32)
        # Whichever orientation of the product XLA runs faster (few rows favour an output-major result).
        rows_major = best_of(jax.jit(lambda x, w: x @ w), x, w)
        out_major = best_of(jax.jit(lambda x, w: jnp.einsum("oi,mi->om", w, x)), x, w.T)
        total += min(rows_major, out_major) * times
    return total


def _padded_batch(tok, rows: int):
    """The left-padded batch both sides get: cme_jax's bucketed prompt length (what `generate` uses)."""
    from cme_jax.tokens import bucket_length, encode_prompts, left_pad

    ids = encode_prompts(tok, prompts(rows))
    return left_pad(ids, bucket_length(max(map(len, ids))), 0)


def _hf_dir() -> Path:
    """A safetensors copy of the embedded model for transformers (its GGUF loader is slow)."""
    from cme_jax.models.weights import save_hf_checkpoint
    from cme_jax.sources import cache_root, load_model

    out = cache_root() / "bench" / f"{MODEL}-hf"
    if not (out / "config.json").exists():
        m = load_model(MODEL)
        save_hf_checkpoint(out, m.weights, m.cfg, m.hf_config, m.tokenizer)
    return out


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_jax(rows: int, new: int, repeats: int) -> dict:
    import jax
    import numpy as np

    from cme_jax.sampling import SamplingConfig, prepare_decode, sample_jit
    from cme_jax.sources import load_model

    m = load_model(MODEL)
    toks, mask = _padded_batch(m.tokenizer, rows)
    scfg = SamplingConfig(max_new_tokens=new, temperature=1.0)
    no_stop = np.asarray([], np.int32)
    t = time.perf_counter()
    # As `generate` does: the decode copy of the weights is built once per model, like loading them.
    step_weights = prepare_decode(m.weights, m.cfg)

    def run(seed: int):
        key = jax.random.key(seed)
        return sample_jit(m.weights, m.cfg, toks, mask, key, scfg, no_stop, 0, decode_weights=step_weights)

    first = run(0)
    first.tokens.block_until_ready()
    first_s = time.perf_counter() - t
    assert int(np.asarray(first.lengths).sum()) == rows * new
    times = []
    with PeakMemory() as mem:
        for r in range(repeats):
            t = time.perf_counter()
            run(r + 1).tokens.block_until_ready()
            times.append(time.perf_counter() - t)
    return {
        "seconds": min(times),
        "first": first_s,
        "working": mem.working,
        "peak": _peak_rss(),
        "flops": model_flops(m.cfg, toks.shape[1], rows, new),
        "padded_prompt": int(toks.shape[1]),
    }


def child_torch(rows: int, new: int, repeats: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _hf_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    toks, mask = _padded_batch(tok, rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    P = toks.shape[1]
    input_ids = torch.tensor(np.where(mask, toks, pad)).long()
    attn = torch.tensor(mask.astype(np.int64))

    def run(n: int, seed: int):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.generate(
                input_ids=input_ids,
                attention_mask=attn,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=pad,
            )

    run(4, 0)  # warm-up: first-call allocations and lazy initialisation
    times = []
    with PeakMemory() as mem:
        for r in range(repeats):
            t = time.perf_counter()
            out = run(new, r + 1)
            times.append(time.perf_counter() - t)
    assert out.shape == (rows, P + new), out.shape
    return {"seconds": min(times), "first": None, "working": mem.working, "peak": _peak_rss()}


CPU_HEADERS = [
    "rows x new",
    "implementation",
    "seconds",
    "first call s",
    "new tokens/s",
    "peak RSS MiB",
    "working MiB",
    "GFLOP/s",
    "of matmul peak",
]


def cpu_table(sizes: list[tuple[int, int]], repeats: int, rounds: int, sides: list[str]) -> None:
    """The CPU comparison; each size's rows are printed as soon as they are measured."""
    # The machine may be shared: the two sides alternate over `rounds` child processes each and keep their best.
    peak = matmul_gflops()
    cpus = len(os.sched_getaffinity(0))
    print(
        f"\nsampling {MODEL}, temperature 1, float32, {cpus} CPU core(s), best of {repeats} x {rounds} round(s); "
        f"matmul peak {peak:,.1f} GFLOP/s (2048^2 float32 through XLA, best so far of the run, before each size)",
        flush=True,
    )
    for rows, new in sizes:
        args = ["--rows", str(rows), "--new", str(new), "--repeats", str(repeats)]
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        for _ in range(rounds):
            for side in sides:
                runs[side].append(run_child(__file__, [*args, "--child", side]))
                print(f"{rows} x {new} {side}: {runs[side][-1]['seconds']:.2f}s", file=sys.stderr, flush=True)
        res = {s: min(r, key=lambda x: x["seconds"]) for s, r in runs.items()}
        counted = run_child(__file__, [*args, "--child", "flops"])
        flops = counted["flops"]
        peak = max(peak, matmul_gflops())
        rows_out = []
        for side in sides:
            r = res[side]
            gflops = flops / r["seconds"] / 1e9
            rows_out.append(
                [
                    f"{rows} x {new}",
                    "cme_jax" if side == "jax" else "transformers",
                    f"{r['seconds']:.2f}",
                    "" if r["first"] is None else f"{r['first']:.1f}",
                    f"{rows * new / r['seconds']:,.0f}",
                    f"{mib(max(x['peak'] for x in runs[side])):,.0f}",
                    f"{mib(r['working']):,.0f}",
                    f"{gflops:,.1f}",
                    f"{gflops / peak:.1%}",
                ]
            )
        if len(sides) == 2:
            ratio = res["torch"]["seconds"] / res["jax"]["seconds"]
            rows_out.append([f"{rows} x {new}", "speed-up", f"{ratio:.2f}x", "", "", "", "", "", ""])
        floor = counted["floor"]
        rows_out.append([f"{rows} x {new}", "weight matmuls alone", f"{floor:.2f}", "", f"{rows * new / floor:,.0f}"])
        rows_out[-1] += ["", "", "", ""]
        print(f"\nmatmul peak {peak:,.1f} GFLOP/s\n\n{table(CPU_HEADERS, rows_out)}", flush=True)
    print(
        "\n'first call' is cme_jax's compilation plus one run. GFLOP/s counts the same model FLOPs for both sides "
        "(prefill of the padded prompts + decode + vocabulary head). 'weight matmuls alone' is the time of the "
        "run's layer and vocabulary products at the rate XLA reaches for each of their exact shapes on this machine: "
        "a floor below which no implementation here goes."
    )


def qwen25_05b_config():
    """Qwen2.5-0.5B's shape (random weights stand in for the real ones: decode speed depends only on shapes)."""
    from cme_jax.models.transformer import ModelConfig, RopeConfig

    return ModelConfig(
        family="qwen2",
        vocab_size=151936,
        dim=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        mlp_dim=4864,
        norm_eps=1e-6,
        rope=RopeConfig(theta=1e6),
        qkv_bias=True,
        tie_embeddings=True,
        max_position=32768,
    )


def hbm_bandwidth(nbytes: int = 2**30) -> float:
    """Device copy bandwidth in bytes/s (read + write of an `nbytes` buffer, best of 10)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes / best


def gpu_table(
    batches: Sequence[int] = (64, 256),
    prompt_len: int = 128,
    new: int = 128,
    repeats: int = 3,
    layouts: Sequence[str] = ("auto",),
    cfg=None,
) -> str:
    """Decode tokens/s of a random-weight Qwen2.5-0.5B-sized model in bfloat16 and its fraction of the HBM roofline.

    Prints and returns the table. A decode step's time is the difference of two generation lengths (new and
    new / 4) divided by the extra steps, which cancels prefill and launch overhead. Its roofline is the layer
    weights and the vocabulary head plus the filled part of the KV cache, each read once, at the copy bandwidth
    measured here; the sampler's per-step logits traffic is not in it. The programs are compiled up front on a
    thread pool (most of the run time); with the defaults the whole table takes about a minute on an H100.
    `layouts` picks the decode paths to time ("auto" is the sampler's default; "stacked" and "per_layer" compare
    the two). `cfg` replaces the model shape (smaller ones are for checking the script on a CPU).
    """
    from concurrent.futures import ThreadPoolExecutor

    import jax
    import jax.numpy as jnp
    import numpy as np

    from cme_jax.models.transformer import init_weights
    from cme_jax.sampling import SamplingConfig, sample

    t_start = time.perf_counter()
    cfg = cfg or qwen25_05b_config()
    dtype = jnp.bfloat16
    weights = init_weights(cfg, jax.random.key(0), dtype)
    # Every matrix is read once per step; an untied input embedding is only gathered (a few rows).
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(weights)) - weights.embed.nbytes * (not cfg.tie_embeddings)
    short = max(1, new // 4)
    no_stop = np.asarray([], np.int32)
    fn = jax.jit(sample, static_argnames=("cfg", "scfg", "pad_id", "layout"))
    inputs, lowered = {}, {}
    for B in batches:
        toks = np.random.default_rng(B).integers(10, cfg.vocab_size, (B, prompt_len)).astype(np.int32)
        inputs[B] = (toks, np.ones_like(toks, bool))
        for layout in layouts:
            for n in (short, new):
                scfg = SamplingConfig(max_new_tokens=n, temperature=1.0)
                args = (weights, cfg, *inputs[B], jax.random.key(0), scfg, no_stop, 0, layout)
                lowered[layout, B, n] = fn.lower(*args)
    with ThreadPoolExecutor(max_workers=len(lowered)) as pool:  # XLA compiles outside the GIL
        compiled = dict(zip(lowered, pool.map(lambda lw: lw.compile(), lowered.values())))
    t_compiled = time.perf_counter() - t_start

    def run(layout: str, B: int, n: int, seed: int) -> float:
        t = time.perf_counter()
        compiled[layout, B, n](weights, *inputs[B], jax.random.key(seed), no_stop).tokens.block_until_ready()
        return time.perf_counter() - t

    bw = hbm_bandwidth()
    rows_out = []
    for layout in layouts:
        for B in batches:
            run(layout, B, short, 0), run(layout, B, new, 0)  # first runs allocate
            t_short = min(run(layout, B, short, 1 + r) for r in range(repeats))
            t_long = min(run(layout, B, new, 1 + r) for r in range(repeats))
            step = (t_long - t_short) / (new - short)
            ctx = prompt_len + (short + new) / 2  # mean filled context over the timed steps
            kv_bytes = 2 * cfg.num_layers * B * ctx * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
            roofline = (weight_bytes + kv_bytes) / bw
            rows_out.append(
                [layout, B, f"{step * 1e3:.2f}", f"{B / step:,.0f}", f"{roofline * 1e3:.3f}", f"{roofline / step:.0%}"]
            )
    headers = ["decode layout", "batch", "ms / step", "decode tokens/s", "roofline ms / step", "of HBM roofline"]
    out = (
        f"\ndecode, random Qwen2.5-0.5B-sized weights (bf16, {weight_bytes / 2**30:.2f} GiB read per step), "
        f"prompt {prompt_len}, {short} vs {new} new tokens, temperature 1, {jax.devices()[0].device_kind}; "
        f"copy bandwidth {bw / 1e9:,.0f} GB/s; compiled {len(compiled)} programs in {t_compiled:.0f}s, "
        f"table in {time.perf_counter() - t_start:.0f}s\n\n{table(headers, rows_out)}"
    )
    print(out, flush=True)
    return out


def _size(s: str) -> tuple[int, int]:
    try:
        rows, new = s.lower().split("x")
        return int(rows), int(new)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {s!r} must look like 16x64 (rows x new tokens)") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", type=_size, default=[(16, 64), (64, 128)], help="rows x new tokens")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per child process")
    p.add_argument("--rounds", type=int, default=1, help="child processes per side, alternating between the sides")
    p.add_argument("--sides", nargs="+", choices=["jax", "torch"], default=["jax", "torch"])
    p.add_argument("--cpus", type=int, help="pin both sides (and the matmul peak) to this many cores")
    p.add_argument("--gpu-only", action="store_true", help="skip the CPU comparison")
    p.add_argument("--gpu-batches", nargs="+", type=int, default=[64, 256])
    p.add_argument("--gpu-prompt", type=int, default=128)
    p.add_argument("--gpu-new", type=int, default=128)
    p.add_argument(
        "--gpu-layouts",
        nargs="+",
        choices=["auto", "stacked", "per_layer"],
        default=["auto"],
        help="decode paths to time on the GPU (auto = per_layer there)",
    )
    p.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    p.add_argument("--new", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=["jax", "torch", "flops"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cpus]))
    if args.child == "flops":
        from cme_jax.sources import load_model

        m = load_model(MODEL)
        toks, _ = _padded_batch(m.tokenizer, args.rows)
        P = toks.shape[1]
        out = {
            "flops": model_flops(m.cfg, P, args.rows, args.new),
            "floor": matmul_floor(m.cfg, P, args.rows, args.new),
        }
        print(json.dumps(out))
        return
    if args.child:
        fn = child_jax if args.child == "jax" else child_torch
        print(json.dumps(fn(args.rows, args.new, args.repeats)))
        return
    import jax

    if not args.gpu_only:
        cpu_table(args.sizes, args.repeats, args.rounds, args.sides)
    if jax.default_backend() == "gpu":
        gpu_table(args.gpu_batches, args.gpu_prompt, args.gpu_new, max(args.repeats, 3), args.gpu_layouts)
    elif args.gpu_only:
        print("no GPU: jax.default_backend() is", jax.default_backend())


if __name__ == "__main__":
    main()
