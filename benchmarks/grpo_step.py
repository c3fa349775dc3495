"""Seconds per GRPO step on the embedded pair: cme_jax beside TRL's GRPOTrainer, same models and settings.

    python benchmarks/grpo_step.py [--prompts 4] [--samples 4] [--new-tokens 64] [--steps 3] [--micro-batches 1]

Policy SmolLM2-135M-Instruct (chat template), verifier Gemma-3-270M (plain "Question/Answer" template,
re-tokenised from text), beta 0.04 with the initial policy as reference, every completion exactly
--new-tokens long on both sides (no early stop) so both do the same work. Each side runs in its own child
process. --micro-batches splits the policy gradient into that many passes on both sides (cme_jax's `micro_batches`,
TRL's gradient accumulation over the same generation batch). The table splits cme_jax's step into sample / score /
update and prints the step's minimum FLOPs over this machine's measured matmul rate: the floor no implementation
beats.

On a GPU, `benchmarks/gpu.py` times the fused step of a random-weight Qwen2.5-0.5B-sized policy with a
same-vocabulary verifier and reports the update's model-FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import matmul_gflops, run_child, table

TEMPLATE = "Question: {prompt}\nAnswer:"
POLICY, VERIFIER = "smollm2-135m-instruct", "gemma3-270m"


def _prompts(n: int) -> list[str]:
    from cme_jax.prompts import read_prompt_texts

    short = [p for p in read_prompt_texts("builtin:prompts") if len(p) < 120]
    return short[:n]


def forward_flops(cfg, tokens: int, context: int, head_tokens: int) -> float:
    """Matmul FLOPs of a forward over `tokens` tokens attending to `context` keys, head at `head_tokens`."""
    D, F, L, V = cfg.dim, cfg.mlp_dim, cfg.num_layers, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = 2 * L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F)
    return tokens * (dense + L * 4 * context * N * H) + head_tokens * 2 * D * V


def floor_flops(pcfg, vcfg, rows: int, prompt_len: int, new: int, ctx_v: int, resp_v: int) -> dict[str, float]:
    """Minimum FLOPs of one step: sampling, verifier, reference, policy forward + backward."""
    seq = prompt_len + new
    sample = forward_flops(pcfg, rows * prompt_len // 4, prompt_len, rows // 4)  # prefill once per prompt
    sample += sum(forward_flops(pcfg, rows, prompt_len + t, rows) for t in range(new))
    verifier = forward_flops(vcfg, rows * (ctx_v + resp_v), (ctx_v + resp_v) // 2, rows * resp_v)
    reference = forward_flops(pcfg, rows * seq, seq // 2, rows * new)
    policy = 3 * reference  # forward + backward (twice the forward)
    return {"sample": sample, "score": verifier, "update": reference + policy}


def child_jax(args) -> dict:
    import jax
    import numpy as np

    from cme_jax.grpo import GRPOConfig
    from cme_jax.rewards import RewardBatch, RewardConfig, RewardTerm, compute_rewards
    from cme_jax.sampling import SamplingConfig
    from cme_jax.scoring import VerifierConfig, load_verifier
    from cme_jax.sources import load_model
    from cme_jax.tokens import bucket_length, encode_prompts, left_pad, pad_id
    from cme_jax.train_step import OptimConfig, StepConfig, build_step, init_state, join_rollout, make_optimizer

    policy = load_model(POLICY)
    vcfg = VerifierConfig(model=VERIFIER, name="gemma", context="plain", template=TEMPLATE, max_length=args.new_tokens)
    verifier = load_verifier(vcfg)
    rcfg = RewardConfig(terms=(RewardTerm("cme"),), verifiers=(vcfg,))
    sc = StepConfig(
        grpo=GRPOConfig(beta=0.04),
        sampling=SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, num_samples=args.samples),
        micro_batches=args.micro_batches,
    )
    opt = make_optimizer(OptimConfig(learning_rate=1e-6), 100)
    fns = build_step(policy.cfg, sc, opt, pad_id=pad_id(policy.tokenizer))
    ref = jax.tree.map(lambda x: x.copy(), policy.weights)
    state = init_state(jax.tree.map(lambda x: x.copy(), policy.weights), opt, 0)
    texts = _prompts(args.prompts)
    ids = encode_prompts(policy.tokenizer, texts)
    toks, mask = left_pad(ids, bucket_length(max(map(len, ids))), pad_id(policy.tokenizer))
    no_stop = np.asarray([-1], np.int32)  # every completion runs to --new-tokens, as on the TRL side
    splits = []
    for step in range(args.steps + 1):  # step 0 compiles
        t0 = time.perf_counter()
        ro = fns.rollout(state, toks, mask, no_stop)
        jax.block_until_ready(ro.tokens)
        t1 = time.perf_counter()
        out = compute_rewards(
            rcfg, RewardBatch.from_rollout(texts, ro, toks, mask, policy.tokenizer), verifiers=[verifier]
        )
        t2 = time.perf_counter()
        state, _ = fns.update(state, join_rollout(toks, mask, ro, sc.group_size), out.rewards, ref)
        jax.block_until_ready(state.params)
        t3 = time.perf_counter()
        if step:
            splits.append((t1 - t0, t2 - t1, t3 - t2))
    sample, score, upd = (float(np.mean(c)) for c in zip(*splits))
    ctx_v = int(np.mean([len(verifier.context_ids(t)) for t in texts]))
    flops = floor_flops(
        policy.cfg,
        verifier.model.cfg,
        len(texts) * args.samples,
        toks.shape[1],
        args.new_tokens,
        ctx_v,
        args.new_tokens,
    )
    return {
        "sample": sample,
        "score": score,
        "update": upd,
        "flops": flops,
        "tokens": int(np.asarray(ro.lengths).sum()),
    }


def child_trl(args) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from forward import _hf_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    policy_dir, verifier_dir = _hf_dir(POLICY), _hf_dir(VERIFIER)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    vtok = AutoTokenizer.from_pretrained(verifier_dir)
    verifier = AutoModelForCausalLM.from_pretrained(verifier_dir, dtype=torch.float32).eval()

    def cme(prompts, completions, **_):
        """Batched CME: verifier context and response tokenised separately, mean response log-prob."""
        rows, starts = [], []
        for p, c in zip(prompts, completions):
            question = p[-1]["content"] if isinstance(p, list) else p
            text = c[0]["content"] if isinstance(c, list) else c
            ctx = vtok(TEMPLATE.replace("{prompt}", question))["input_ids"]
            resp = vtok(text, add_special_tokens=False)["input_ids"][: args.new_tokens] or [vtok.eos_token_id]
            rows.append(ctx + resp)
            starts.append(len(ctx))
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), vtok.pad_token_id)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            att[i, : len(r)] = 1
        with torch.no_grad():
            lp = torch.log_softmax(verifier(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
            lp = lp.gather(-1, ids[:, 1:, None])[..., 0]
        out = []
        for i, (r, s) in enumerate(zip(rows, starts)):
            out.append(float(lp[i, s - 1 : len(r) - 1].mean()))
        return out

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t = [], 0.0

        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t)

    texts = _prompts(args.prompts)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": t}]} for t in texts] * (args.steps + 1))
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.prompts * args.samples // args.micro_batches,
        gradient_accumulation_steps=args.micro_batches,
        num_generations=args.samples,
        max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens},
        beta=0.04,
        learning_rate=1e-6,
        temperature=1.0,
        max_steps=args.steps + 1,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        shuffle_dataset=False,
    )
    timer = Timer()
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model, reward_funcs=cme, args=cfg, train_dataset=data, processing_class=tok, callbacks=[timer]
    )
    trainer.train()
    return {"step": float(sum(timer.times[1:]) / max(1, len(timer.times) - 1))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batches", type=int, default=1, help="gradient passes per update, on both sides")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--child", choices=["jax", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if (args.prompts * args.samples) % args.micro_batches:
        p.error(f"--micro-batches {args.micro_batches} must divide the {args.prompts * args.samples} completions")
    if args.child:
        print(json.dumps(child_jax(args) if args.child == "jax" else child_trl(args)))
        return
    peak = matmul_gflops()
    common = [
        "--prompts",
        str(args.prompts),
        "--samples",
        str(args.samples),
        "--new-tokens",
        str(args.new_tokens),
        "--steps",
        str(args.steps),
        "--micro-batches",
        str(args.micro_batches),
    ]
    j = run_child(__file__, [*common, "--child", "jax"])
    t = None if args.skip_trl else run_child(__file__, [*common, "--child", "trl"])
    ours = j["sample"] + j["score"] + j["update"]
    floor = {k: v / (peak * 1e9) for k, v in j["flops"].items()}
    rows = [
        ["cme_jax", f"{ours:.1f}", f"{j['sample']:.1f}", f"{j['score']:.1f}", f"{j['update']:.1f}"],
        [
            "FLOP floor",
            f"{sum(floor.values()):.1f}",
            f"{floor['sample']:.1f}",
            f"{floor['score']:.1f}",
            f"{floor['update']:.1f}",
        ],
    ]
    if t is not None:
        rows.insert(1, ["TRL GRPOTrainer", f"{t['step']:.1f}", "", "", ""])
    n = args.prompts * args.samples
    print(
        f"\nGRPO step, {n} completions x {args.new_tokens} tokens, beta 0.04, {args.micro_batches} micro-batches; "
        f"matmul peak {peak:,.1f} GFLOP/s\n"
    )
    print(table(["implementation", "s/step", "sample", "score", "update"], rows))
    if t is not None:
        print(f"\ncme_jax is {t['step'] / ours:.2f}x faster than TRL; {ours / sum(floor.values()):.2f}x the FLOP floor")


if __name__ == "__main__":
    main()
