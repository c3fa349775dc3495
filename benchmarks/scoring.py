"""Verifier scoring throughput and peak memory: cme_jax `score_rows` beside transformers, Gemma-3-270M.

    python benchmarks/scoring.py                          # 64+64 and 128+128 tokens, batch 16
    python benchmarks/scoring.py --batches 16 64 --repeats 2 --rounds 2

Rows hold C context + N response tokens; the score is the mean log-prob of the response tokens. cme_jax
runs the vocabulary head only at the N response positions, in chunks; transformers runs forward +
log_softmax + gather over the whole row (in micro-batches of at most --hf-max-rows rows, so that its
[rows, C + N, 262144] float32 arrays fit in memory). Each side runs in its own child process; peak memory
is that process's ru_maxrss over the timed calls (the high-water mark is reset after loading and one
warm-up call), so it includes the weights; "working" subtracts the RSS right after loading (weights paged
in, freed loader memory returned to the OS). FLOP rates count the matmul work each side executes, against
this machine's float32 matmul rate measured in the same run. The CPU may be shared: compare the ratios,
which come from the same run, and repeat with --rounds (rounds alternate which side runs first; the table
shows the 1-minute load average when each pair started). A child that fails (e.g. killed for memory) is
reported as a failed row and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_time, matmul_gflops, mib, rss_bytes, run_child, table
from forward import _hf_dir

ALIAS = "gemma3-270m"


def reset_peak() -> None:
    """Restart ru_maxrss from the current RSS (Linux: writing 5 to clear_refs resets the high-water mark)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def settle() -> int:
    """RSS once the loader's freed memory is back with the OS (glibc keeps freed heap otherwise)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def flops(cfg, batch: int, context: int, response: int, head_positions: int) -> float:
    """Matmul FLOPs of a forward over batch x (context + response) tokens with the head at head_positions."""
    D, F, L, V = cfg.dim, cfg.mlp_dim, cfg.num_layers, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    T = context + response
    per_token_layer = 2 * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + 4 * T * N * H
    return batch * (T * L * per_token_layer + head_positions * 2 * D * V)


def _rows(vocab: int, batch: int, context: int, response: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(10, vocab, (batch, context + response)).astype(np.int32)


def child_jax(batch: int, context: int, response: int, repeats: int, chunk_budget: int) -> dict:
    import jax
    import jax.numpy as jnp

    from cme_jax.scoring import score_rows_jit
    from cme_jax.sources import load_model

    model = load_model(ALIAS, tokenizer=False)
    toks = jnp.asarray(_rows(model.cfg.vocab_size, batch, context, response))
    mask = jnp.ones_like(toks, bool)
    jax.block_until_ready(model.weights)
    loaded = settle()

    def run():
        s, c = score_rows_jit(model.weights, model.cfg, toks, mask, start=context, chunk_budget=chunk_budget)
        return (s / c).block_until_ready()

    means = run()  # compiles
    reset_peak()
    seconds = best_time(run, repeats)
    return {
        "seconds": seconds,
        "peak": peak_bytes(),
        "loaded": loaded,
        "flops": flops(model.cfg, batch, context, response, response),
        "means": [float(x) for x in means],
    }


def child_torch(batch: int, context: int, response: int, repeats: int, max_rows: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from cme_jax.models.families import config_from_hf

    model = AutoModelForCausalLM.from_pretrained(_hf_dir(ALIAS), dtype=torch.float32).eval()
    cfg = config_from_hf(model.config)
    toks = torch.tensor(_rows(model.config.vocab_size, batch, context, response)).long()
    with torch.no_grad():  # page the memory-mapped weights in, so that they count as loaded
        sum(float(p.sum()) for p in model.parameters())
    loaded = settle()

    def run():
        out = []
        with torch.no_grad():
            for lo in range(0, batch, max_rows):
                ids = toks[lo : lo + max_rows]
                logits = model(input_ids=ids).logits
                lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
                out.append(lp[:, context - 1 :].mean(-1))
        return torch.cat(out)

    run()
    reset_peak()
    seconds = best_time(run, repeats)
    T = context + response
    return {
        "seconds": seconds,
        "peak": peak_bytes(),
        "loaded": loaded,
        "flops": flops(cfg, batch, context, response, T),
        "means": [float(x) for x in run()],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["64x64", "128x128"], help="CONTEXTxRESPONSE tokens per row")
    p.add_argument("--batches", nargs="+", type=int, default=[16], help="rows per call")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per child after a warm-up (best is reported)")
    p.add_argument("--rounds", type=int, default=1, help="child pairs per size (ratios per round)")
    p.add_argument("--hf-max-rows", type=int, default=16, help="rows per transformers forward")
    p.add_argument("--chunk-budget", type=int, default=2**24, help="cme_jax logits elements per chunk")
    p.add_argument("--child", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes]
    if args.child:
        (context, response), batch = sizes[0], args.batches[0]
        if args.child == "jax":
            out = child_jax(batch, context, response, args.repeats, args.chunk_budget)
        else:
            out = child_torch(batch, context, response, args.repeats, args.hf_max_rows)
        print(json.dumps(out))
        return

    _hf_dir(ALIAS)  # the safetensors copy transformers loads (made once, ~1 min)
    peak = matmul_gflops()
    rows = []
    for context, response in sizes:
        for batch in args.batches:
            common = ["--sizes", f"{context}x{response}", "--batches", str(batch), "--repeats", str(args.repeats)]
            shape = f"{batch} x ({context}+{response})"
            for r in range(args.rounds):
                load = os.getloadavg()[0]
                try:
                    j, t = _pair(common, args, torch_first=bool(r % 2))
                except RuntimeError as e:  # e.g. a child killed for memory on a shared machine: keep the rest
                    lines = [x for x in str(e).splitlines() if x.strip()]
                    reason = (lines[-1] if len(lines) > 1 else "exited without output (killed?)")[:80]
                    rows.append([shape, r + 1, "failed", "", "", "", "", reason, "", f"{load:.1f}"])
                    print(f"failed {shape} round {r + 1}: {reason}", file=sys.stderr)
                    continue
                new = _table_rows(shape, r + 1, batch * (context + response), j, t, peak, load)
                rows.extend(new)
                print(f"done {shape} round {r + 1}: " + " | ".join(map(str, new[-1][3:9])), file=sys.stderr)
    print(f"\nverifier scoring, {ALIAS}; float32 matmul peak {peak:,.1f} GFLOP/s (measured in this run)\n")
    headers = [
        "rows x tokens",
        "round",
        "side",
        "seconds",
        "tokens/s",
        "peak MiB",
        "working MiB",
        "GFLOP/s",
        "of peak",
        "load avg",
    ]
    print(table(headers, rows))


def _pair(common: list[str], args: argparse.Namespace, torch_first: bool) -> tuple[dict, dict]:
    """One cme_jax child and one transformers child (alternating which goes first, as the load drifts)."""
    jax_args = [*common, "--child", "jax", "--chunk-budget", str(args.chunk_budget)]
    torch_args = [*common, "--child", "torch", "--hf-max-rows", str(args.hf_max_rows)]
    if torch_first:
        t = run_child(__file__, torch_args)
        return run_child(__file__, jax_args), t
    j = run_child(__file__, jax_args)
    return j, run_child(__file__, torch_args)


def _table_rows(shape: str, round_: int, tokens: int, j: dict, t: dict, peak: float, load: float) -> list[list]:
    """Table rows of one pair: each side, then the ratios (tokens/s gain, peak and working memory fractions)."""
    out = []
    for name, res in (("cme_jax", j), ("transformers", t)):
        gflops = res["flops"] / res["seconds"] / 1e9
        out.append(
            [
                shape,
                round_,
                name,
                f"{res['seconds']:.2f}",
                f"{tokens / res['seconds']:,.0f}",
                f"{mib(res['peak']):,.0f}",
                f"{mib(res['peak'] - res['loaded']):,.0f}",
                f"{gflops:,.1f}",
                f"{gflops / peak:.0%}",
                f"{load:.1f}",
            ]
        )
    diff = max(abs(a - b) for a, b in zip(j["means"], t["means"]))
    speed = t["seconds"] / j["seconds"]
    mem = j["peak"] / t["peak"]
    work = (j["peak"] - j["loaded"]) / max(t["peak"] - t["loaded"], 1)
    note = f"max abs diff {diff:.1e}"
    out.append([shape, round_, "ratio", "", f"{speed:.2f}x", f"{mem:.2f}", f"{work:.3f}", note, "", ""])
    return out


if __name__ == "__main__":
    main()
