"""Forward + per-token log-probs of the embedded models: cme_jax (JAX) beside transformers (PyTorch).

    python benchmarks/forward.py [--batch 16] [--length 128] [--models smollm2-135m-instruct gemma3-270m]

Each side runs in its own child process so that peak memory is measured honestly; the table reports
tokens/s, working memory (peak RSS during compute minus RSS before it) and the FLOP rate as a fraction of
this machine's float32 matmul throughput measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PeakMemory, best_time, matmul_gflops, mib, rss_bytes, run_child, table

ROOT = Path(__file__).resolve().parents[1]


def model_flops(cfg, batch: int, length: int) -> float:
    """FLOPs of a forward over batch x length tokens with the vocabulary head at every position."""
    D, F, L, V = cfg.dim, cfg.mlp_dim, cfg.num_layers, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_token_layer = 2 * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F)
    attention = 4 * length * N * H  # QK^T and PV against every key (no causal skipping here)
    return batch * length * (L * (per_token_layer + attention) + 2 * D * V)


def _inputs(vocab: int, batch: int, length: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(10, vocab, (batch, length)).astype(np.int32)


def child_jax(alias: str, batch: int, length: int) -> dict:
    import jax
    import jax.numpy as jnp

    from cme_jax.models.logprobs import token_logprobs
    from cme_jax.sources import load_model

    model = load_model(alias, tokenizer=False)
    toks = jnp.asarray(_inputs(model.cfg.vocab_size, batch, length))
    mask = jnp.ones_like(toks, bool)
    fn = jax.jit(lambda w, t, m: token_logprobs(w, model.cfg, t, m))
    fn(model.weights, toks, mask).block_until_ready()
    with PeakMemory() as mem:
        seconds = best_time(lambda: fn(model.weights, toks, mask).block_until_ready())
    return {
        "seconds": seconds,
        "working": mem.working,
        "rss": rss_bytes(),
        "flops": model_flops(model.cfg, batch, length),
    }


def _hf_dir(alias: str) -> Path:
    """A safetensors copy of the embedded model for transformers (GGUF loading there takes ~1 min)."""
    from cme_jax.models.weights import save_hf_checkpoint
    from cme_jax.sources import cache_root, load_model

    out = cache_root() / "bench" / f"{alias}-hf"
    if not (out / "config.json").exists():
        m = load_model(alias)
        save_hf_checkpoint(out, m.weights, m.cfg, m.hf_config, m.tokenizer)
    return out


def child_torch(alias: str, batch: int, length: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_hf_dir(alias), dtype=torch.float32).eval()
    toks = torch.tensor(_inputs(model.config.vocab_size, batch, length)).long()

    def run():
        with torch.no_grad():
            logits = model(input_ids=toks).logits
            lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, toks[:, 1:, None])[..., 0]
        return lp

    run()
    with PeakMemory() as mem:
        seconds = best_time(run)
    return {"seconds": seconds, "working": mem.working, "rss": rss_bytes()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    p.add_argument("--child", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fn = child_jax if args.child == "jax" else child_torch
        print(json.dumps(fn(args.models[0], args.batch, args.length)))
        return

    peak = matmul_gflops()
    rows = []
    for alias in args.models:
        common = ["--models", alias, "--batch", str(args.batch), "--length", str(args.length)]
        run_child(__file__, [*common, "--child", "torch"])  # builds the safetensors copy once
        j = run_child(__file__, [*common, "--child", "jax"])
        t = run_child(__file__, [*common, "--child", "torch"])
        tokens = args.batch * args.length
        for name, r in (("cme_jax", j), ("transformers", t)):
            gflops = j["flops"] / r["seconds"] / 1e9
            rows.append(
                [
                    alias,
                    name,
                    f"{r['seconds']:.2f}",
                    f"{tokens / r['seconds']:,.0f}",
                    f"{mib(r['working']):,.0f}",
                    f"{gflops:,.1f}",
                    f"{gflops / peak:.0%}",
                ]
            )
        rows.append([alias, "speed-up", f"{t['seconds'] / j['seconds']:.2f}x", "", "", "", ""])
    print(f"\nforward + token log-probs, batch {args.batch} x {args.length} tokens; matmul peak {peak:,.1f} GFLOP/s\n")
    headers = ["model", "implementation", "seconds", "tokens/s", "working MiB", "GFLOP/s", "of matmul peak"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
