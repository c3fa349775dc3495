"""LoRA against full fine-tuning on the embedded pair: seconds per GRPO step and peak memory, in the same run; and the
sampler with the adapters merged into its decode copy against the adapters applied on the fly.

    python benchmarks/lora.py [--prompts 4] [--samples 4] [--new-tokens 64] [--steps 2] [--rank 16]
                               [--skip-step | --skip-sampling]

Policy SmolLM2-135M-Instruct, verifier Gemma-3-270M (plain "Question/Answer" template, re-tokenised from text),
beta 0.04, every completion exactly --new-tokens long. Full fine-tuning keeps float32 master weights, their Adam
moments and a reference copy; LoRA (rank --rank, alpha 2 x rank, every projection) keeps the base once, frozen, as
policy and reference, and trains the adapters. Each mode runs in its own child process: `peak RSS` is that process's
high-water mark (models, JAX runtime, compiled programs and the step's temporaries), `state` the bytes of the arrays
the trainer keeps between steps (trainable weights, optimizer state, reference, frozen base; verifiers excluded).

The sampling table times --prompts x --samples rows x --new-tokens greedy tokens with rank --rank adapters: one
decode loop over the stacked layers with the adapters applied on the fly (x W + s (x A) B every step) and the same
loop with them merged (x W'), then the trainer's sampler, which merges them into its decode layout's copy of the
layers, beside the base alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_time, mib, run_child, table

TEMPLATE = "Question: {prompt}\nAnswer:"
POLICY, VERIFIER = "smollm2-135m-instruct", "gemma3-270m"


def _prompts(n: int) -> list[str]:
    from cme_jax.prompts import read_prompt_texts

    return [p for p in read_prompt_texts("builtin:prompts") if len(p) < 120][:n]


def _tree_bytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _lora(rank: int):
    from cme_jax.models.lora import LoraConfig

    return LoraConfig(rank=rank, alpha=2.0 * rank)


def _encode(policy, n: int):
    from cme_jax.tokens import bucket_length, encode_prompts, left_pad, pad_id

    texts = _prompts(n)
    ids = encode_prompts(policy.tokenizer, texts)
    toks, mask = left_pad(ids, bucket_length(max(map(len, ids))), pad_id(policy.tokenizer))
    return texts, toks, mask


def child_step(args) -> dict:
    """Seconds per step (sample / score / update) and memory of one mode, `full` or `lora`."""
    import jax
    import numpy as np

    from cme_jax.grpo import GRPOConfig
    from cme_jax.models import lora as lora_lib
    from cme_jax.rewards import RewardBatch, RewardConfig, RewardTerm, compute_rewards
    from cme_jax.sampling import SamplingConfig
    from cme_jax.scoring import VerifierConfig, load_verifier
    from cme_jax.sources import load_model
    from cme_jax.tokens import pad_id
    from cme_jax.train_step import OptimConfig, StepConfig, build_step, init_state, join_rollout, make_optimizer

    lora = _lora(args.rank) if args.mode == "lora" else None
    policy = load_model(POLICY)
    vcfg = VerifierConfig(model=VERIFIER, name="gemma", context="plain", template=TEMPLATE, max_length=args.new_tokens)
    verifier = load_verifier(vcfg)
    rcfg = RewardConfig(terms=(RewardTerm("cme"),), verifiers=(vcfg,))
    sc = StepConfig(
        grpo=GRPOConfig(beta=0.04),
        sampling=SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, num_samples=args.samples),
        lora=lora,
    )
    opt = make_optimizer(OptimConfig(learning_rate=1e-5 if lora else 1e-6), 100)
    fns = build_step(policy.cfg, sc, opt, pad_id=pad_id(policy.tokenizer))
    if lora is None:
        ref, base_args = jax.tree.map(lambda x: x.copy(), policy.weights), ()
        state = init_state(jax.tree.map(lambda x: x.copy(), policy.weights), opt, 0)
    else:  # the base is the policy's frozen weights and the reference
        ref, base_args = None, (policy.weights,)
        state = init_state(lora_lib.init_adapters(policy.cfg, lora, jax.random.key(3)), opt, 0)
    kept = _tree_bytes((state.params, state.opt_state, ref, base_args))
    texts, toks, mask = _encode(policy, args.prompts)
    no_stop = np.asarray([-1], np.int32)
    splits = []
    for step in range(args.steps + 1):  # step 0 compiles
        t0 = time.perf_counter()
        ro = fns.rollout(state, toks, mask, no_stop, *base_args)
        jax.block_until_ready(ro.tokens)
        t1 = time.perf_counter()
        batch = RewardBatch.from_rollout(texts, ro, toks, mask, policy.tokenizer)
        out = compute_rewards(rcfg, batch, verifiers=[verifier])
        t2 = time.perf_counter()
        state, _ = fns.update(state, join_rollout(toks, mask, ro, sc.group_size), out.rewards, ref, *base_args)
        jax.block_until_ready(state.params)
        t3 = time.perf_counter()
        if step:
            splits.append((t1 - t0, t2 - t1, t3 - t2))
    sample, score, upd = (float(np.mean(c)) for c in zip(*splits))
    trainable = sum(x.size for x in jax.tree.leaves(state.params))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"sample": sample, "score": score, "update": upd, "state": kept, "peak": peak, "trainable": trainable}


def child_sampling(args) -> dict:
    """Best seconds per call: the same greedy decode loop with the adapters applied on the fly or merged, and the
    trainer's sampler (adapters merged into its decode layout's copy of the layers) beside the base alone."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cme_jax.models import lora as lora_lib
    from cme_jax.models.transformer import forward_hidden, init_cache, logits_from_hidden
    from cme_jax.sampling import SamplingConfig, sample
    from cme_jax.sources import load_model
    from cme_jax.tokens import pad_id

    policy = load_model(POLICY)
    cfg, base, lora = policy.cfg, policy.weights, _lora(args.rank)
    adapters = lora_lib.init_adapters(cfg, lora, jax.random.key(3))
    adapters = {t: {"a": ab["a"], "b": ab["b"] + 0.01} for t, ab in adapters.items()}  # B != 0, as after training
    _, toks, mask = _encode(policy, args.prompts)
    toks, mask = np.repeat(toks, args.samples, axis=0), np.repeat(mask, args.samples, axis=0)
    N = args.new_tokens

    def decode_loop(w, toks, mask):
        # Prefill, then N - 1 greedy single-token steps over the stacked layers (a scan), every step reading w.
        R, P = toks.shape
        pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        h, cache = forward_hidden(w, cfg, toks, pos, mask, init_cache(cfg, R, P + N, w.embed.dtype))
        tok = jnp.argmax(logits_from_hidden(w, cfg, h[:, -1:]), axis=-1)
        ones = jnp.ones((R, 1), bool)

        def body(_, carry):
            tok, cache, p = carry
            h, cache = forward_hidden(w, cfg, tok, p, ones, cache)
            return jnp.argmax(logits_from_hidden(w, cfg, h), axis=-1), cache, p + 1

        return jax.lax.fori_loop(0, N - 1, body, (tok, cache, pos[:, -1:] + 1))[0]

    scfg = SamplingConfig(max_new_tokens=N, temperature=1.0, num_samples=1)
    pad = pad_id(policy.tokenizer)
    trainer = lambda w: sample(w, cfg, toks, mask, jax.random.key(0), scfg, [-1], pad, "auto").tokens
    adapted = lora_lib.adapted(base, adapters, lora)
    merged = jax.jit(lora_lib.merge, static_argnums=2)(base, adapters, lora)
    variants = {
        "decode loop, adapters on the fly (stacked layers)": (decode_loop, adapted),
        "decode loop, adapters merged (stacked layers)": (decode_loop, merged),
        "trainer's sampler, merged into its decode copy (auto layout)": (trainer, adapted),
        "trainer's sampler, base without adapters (auto layout)": (trainer, base),
    }
    out = {}
    for name, (fn, w) in variants.items():
        f = jax.jit(fn) if fn is trainer else jax.jit(lambda w, fn=fn: fn(w, toks, mask))
        out[name] = best_time(lambda f=f, w=w: jax.block_until_ready(f(w)), args.repeats)
    out["rows"] = int(toks.shape[0])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="timed steps per mode (after one that compiles)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed sampling calls per variant (the best counts)")
    p.add_argument("--skip-step", action="store_true", help="only the sampling table")
    p.add_argument("--skip-sampling", action="store_true", help="only the step table")
    p.add_argument("--child", choices=["step", "sampling"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "step":
        print(json.dumps(child_step(args)))
        return
    if args.child == "sampling":
        print(json.dumps(child_sampling(args)))
        return
    common = [
        *("--prompts", str(args.prompts), "--samples", str(args.samples)),
        *("--new-tokens", str(args.new_tokens), "--steps", str(args.steps), "--rank", str(args.rank)),
        *("--repeats", str(args.repeats)),
    ]
    if not args.skip_step:
        results = {mode: run_child(__file__, [*common, "--child", "step", "--mode", mode]) for mode in ("full", "lora")}
        n = args.prompts * args.samples
        print(f"\nGRPO step on the embedded pair, {n} completions x {args.new_tokens} tokens, beta 0.04\n")
        rows = []
        for mode, r in results.items():
            name = "full fine-tuning" if mode == "full" else f"LoRA rank {args.rank}, every projection"
            total = r["sample"] + r["score"] + r["update"]
            times = [f"{total:.1f}", f"{r['sample']:.1f}", f"{r['score']:.1f}", f"{r['update']:.1f}"]
            rows.append([name, f"{r['trainable']:,}", *times, f"{mib(r['state']):,.0f}", f"{mib(r['peak']):,.0f}"])
        headers = ["mode", "trainable", "s/step", "sample", "score", "update", "state MiB", "peak RSS MiB"]
        print(table(headers, rows))
    if args.skip_sampling:
        return
    s = run_child(__file__, [*common, "--child", "sampling"])
    rows = s.pop("rows")
    print(
        f"\nSampling {rows} rows x {args.new_tokens} tokens with rank {args.rank} adapters (best of {args.repeats})\n"
    )
    print(table(["adapters", "s/call"], [[k, f"{v:.2f}"] for k, v in s.items()]))


if __name__ == "__main__":
    main()
