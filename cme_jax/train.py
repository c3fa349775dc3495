"""Train a policy with GRPO on a label-free reward (Cross-Model Entropy by default).

    python -m cme_jax.train --config configs/demo_cpu.yaml [key.sub=value ...] [--resume | --no-resume]

The run directory (`run_dir`) receives checkpoints, `config.yaml`, `metrics.jsonl`, `samples.jsonl` and
TensorBoard events. A run restarted with the same run_dir resumes from its last complete checkpoint.
SIGTERM (e.g. TPU preemption) saves a checkpoint and exits cleanly. Multi-host: pass --distributed on every
host (see launch/ and the README).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cme_jax import rewards as rewards_lib
from cme_jax.checkpoint import CheckpointManager, install_preemption_handler
from cme_jax.config import TrainConfig, check_mesh_fits, config_to_dict, config_yaml, load_config, step_config
from cme_jax.distributed import agree, initialize_distributed, put_global, to_host
from cme_jax.errors import CmeError, cli_main
from cme_jax.files import read_run_log
from cme_jax.memory import start_check
from cme_jax.metrics import RunLogger
from cme_jax.models import lora as lora_lib
from cme_jax.models.sharding import batch_sharding, make_mesh, replicated, weight_shardings
from cme_jax.prompts import PromptSampler, PromptSet, load_prompts
from cme_jax.sampling import Rollout, SamplingConfig, response_token_lists, sample_jit
from cme_jax.scoring import Verifier, load_verifier
from cme_jax.sources import LoadedModel, cache_root, load_model, load_tokenizer, resolve
from cme_jax.tokens import bucket_length, encode_prompts, left_pad, pad_id, stop_token_ids
from cme_jax.train_step import (
    StepConfig,
    StepFunctions,
    StepShardings,
    TrainState,
    build_step,
    compute_params,
    init_state,
    join_rollout,
    lr_schedule,
    make_optimizer,
    policy_weights,
    state_shardings,
)
from cme_jax.watchdog import WATCHDOG_FILE, Event, Watchdog, last_row_per_step, read_metrics, verdict, write_events

# Console columns: the numbers a person watches while a run goes.
PROGRESS_KEYS = ("reward/mean", "loss", "kl_mean", "response/length_mean", "time/step")


def is_main() -> bool:
    return jax.process_index() == 0


def log(msg: str) -> None:
    if is_main():
        print(msg, file=sys.stderr, flush=True)


def compute_dtype(cfg: TrainConfig) -> str:
    if cfg.model.compute_dtype != "auto":
        return cfg.model.compute_dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def record_fed(run_dir: Path, step: int, ids: Sequence[int], texts: Sequence[str], rows: Sequence[int]) -> None:
    """Append the prompts this process fed at `step` to RUN_DIR/fed_prompts.p<process>.jsonl (CME_JAX_RECORD_FED=1)."""
    row = {
        "step": step,
        "rows": list(rows),
        "prompt_ids": [int(ids[r]) for r in rows],
        "prompts": [texts[r] for r in rows],
    }
    with open(run_dir / f"fed_prompts.p{jax.process_index()}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


@dataclasses.dataclass
class Run:
    """Everything loaded for a run."""

    cfg: TrainConfig
    policy: LoadedModel  # with LoRA its weights are the frozen base, in the compute dtype
    ref_params: Any
    verifiers: list[Verifier]
    data: PromptSet
    mesh: jax.sharding.Mesh
    sc: StepConfig
    prompt_len: int | None = None  # fixed padded prompt length (train.prompt_padding=max)

    @property
    def prompts(self) -> list[str]:
        return list(self.data.train)

    @property
    def base_args(self) -> tuple[Any, ...]:
        """The step functions' trailing arguments: the frozen base with LoRA, none otherwise."""
        return () if self.sc.lora is None else (self.policy.weights,)

    def weights(self, params: Any) -> Any:
        """The policy's weights for the trainable `params` (with LoRA, the base with the adapters applied)."""
        return policy_weights(params, self.policy.weights, self.sc)


def encode_batch(run: Run, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded policy prompt ids in a length bucket (every process encodes the whole batch alike)."""
    m = run.cfg.model
    ids = encode_prompts(run.policy.tokenizer, texts, m.prompt_format, m.template, m.system_prompt)
    length = bucket_length(max(map(len, ids)))
    if run.prompt_len is not None:
        length = max(length, run.prompt_len)
    return left_pad(ids, length, pad_id(run.policy.tokenizer))


def greedy_rollout(run: Run, params: Any, prompts: Sequence[str], max_new_tokens: int) -> tuple[Rollout, Any, Any]:
    """Greedy responses of `params` to prompts: the host rollout and the left-padded prompt ids and mask."""
    toks, mask = encode_batch(run, prompts)
    scfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    stops = np.asarray(stop_token_ids(run.policy.tokenizer, run.cfg.model.stop_strings) or [-1], np.int32)
    params = compute_params(params, run.sc.compute_dtype)
    ro = sample_jit(params, run.policy.cfg, toks, mask, jax.random.key(0), scfg, stops, pad_id(run.policy.tokenizer))
    return jax.tree.map(to_host, ro), toks, mask


def preview(run: Run, params: Any, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy responses of `params` to a few prompts (the demo's before/after)."""
    ro, _, _ = greedy_rollout(run, params, prompts, max_new_tokens)
    return [run.policy.tokenizer.decode(t, skip_special_tokens=True) for t in response_token_lists(ro)]


HELDOUT_FILE = "heldout.jsonl"


def heldout_eval(run: Run, params: Any, step: int) -> dict[str, Any]:
    """The policy's greedy responses to the first train.heldout_prompts held-out prompts, scored with the
    training reward (per response, no group z-scoring: a group of one), and their exact per-token KL to the
    reference and entropy when a reference is loaded. One row of RUN_DIR/heldout.jsonl."""
    from cme_jax.models.logprobs import token_kl_jit

    cfg = run.cfg
    texts = list(run.data.heldout[: cfg.train.heldout_prompts])
    ro, toks, mask = greedy_rollout(run, params, texts, cfg.sampling.max_new_tokens)
    weights = compute_params(params, run.sc.compute_dtype)
    out = rewards_lib.compute_rewards(
        dataclasses.replace(cfg.reward, zscore=False),
        rewards_lib.RewardBatch.from_rollout(texts, ro, toks, mask, run.policy.tokenizer),
        verifiers=run.verifiers,
        policy=dataclasses.replace(run.policy, weights=weights),
        rng=jax.random.fold_in(jax.random.key(cfg.train.seed + 2), step),
        mesh=run.mesh,
    )
    scalars = {f"heldout/{k}": v for k, v in out.diagnostics.items()}
    if run.ref_params is not None:
        tokens, full = np.concatenate([toks, ro.tokens], 1), np.concatenate([mask, ro.mask.astype(bool)], 1)
        stats = token_kl_jit(weights, run.ref_params, run.policy.cfg, tokens, full, start=toks.shape[1])
        n = max(float(ro.mask.sum()), 1.0)
        scalars.update({f"heldout/{k}": float(np.asarray(v).sum()) / n for k, v in stats.items()})
    responses = [run.policy.tokenizer.decode(t, skip_special_tokens=True) for t in response_token_lists(ro)]
    return {
        "step": step,
        "scalars": scalars,
        "prompts": texts,
        "rewards": [float(r) for r in out.rewards],
        "responses": responses,
    }


def reward_curve(rows: Sequence[dict[str, Any]], key: str = "reward/mean") -> str:
    """The training reward of every step as one console line (the evidence when nothing else moved)."""
    values = [f"{r[key]:.2f}" if r.get(key) is not None else "nan" for r in rows]
    return f"training reward by step ({len(values)} steps, {key}): " + " ".join(values)


def changed_responses(first: dict[str, Any], last: dict[str, Any], shown: int = 2) -> list[str]:
    """Before/after greedy responses of held-out prompts, preferring those that training changed."""
    pairs = list(zip(first["prompts"], first["responses"], last["responses"]))
    changed = [p for p in pairs if p[1].strip() != p[2].strip()]
    head = (
        f"greedy responses changed on {len(changed)} of {len(pairs)} held-out prompts between step "
        f"{first['step']} and step {last['step']}"
    )
    lines = [head + (":" if changed else "; two of them:")]
    for prompt, b, a in (changed or pairs)[:shown]:
        lines.append(f"\nprompt: {prompt}\n  before: {b.strip()[:300]}\n  after:  {a.strip()[:300]}")
    return lines


def heldout_report(rows: Sequence[dict[str, Any]], seed: int = 0) -> list[str]:
    """Console lines: the held-out reward at every evaluation, and first -> last with a paired bootstrap interval."""
    from cme_jax.eval.stats import bootstrap_ci

    if len(rows) < 1:
        return []
    n = len(rows[0]["rewards"])
    curve = ", ".join(f"{r['step']}: {r['scalars']['heldout/reward/mean']:.3f}" for r in rows)
    lines = [f"held-out reward ({n} prompts, greedy) by step: {curve}"]
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        diff = np.asarray(last["rewards"]) - np.asarray(first["rewards"])
        ci = bootstrap_ci(diff, seed=seed) or (float("nan"), float("nan"))
        kl = last["scalars"].get("heldout/kl")
        lines.append(
            f"held-out reward: step {first['step']} {np.mean(first['rewards']):.3f} -> step {last['step']} "
            f"{np.mean(last['rewards']):.3f}, difference {diff.mean():+.3f} [95% CI {ci[0]:+.3f}, {ci[1]:+.3f}] "
            f"(paired bootstrap over the {n} prompts, optimistic with few prompts; an interval that spans 0 is no "
            "evidence of a change)" + (f"; KL to the reference {kl:.4f} nats/token" if kl is not None else "")
        )
    return lines


def load_run(cfg: TrainConfig) -> Run:
    """Mesh, policy, reference, verifiers and prompts, in that order (prompt problems surface before models load)."""
    sizes = check_mesh_fits(cfg, jax.device_count())
    mesh = make_mesh(*sizes)
    dtype = compute_dtype(cfg)
    # The tokenizer and the prompts first: a bad data file fails in seconds, before any weights load.
    src = resolve(cfg.model.policy)
    tok = load_tokenizer(src)
    encode = lambda texts: encode_prompts(
        tok, texts, cfg.model.prompt_format, cfg.model.template, cfg.model.system_prompt
    )
    data = load_prompts(cfg.data, encode_fn=encode)
    if len(data.train) < cfg.train.prompts_per_step:
        raise CmeError(
            f"only {len(data.train)} training prompts remain after filtering, fewer than train.prompts_per_step="
            f"{cfg.train.prompts_per_step}; use more data or raise data.max_prompt_tokens"
        )
    if cfg.train.heldout_every and not data.heldout:
        raise CmeError(
            "train.heldout_every needs held-out prompts, and none remain after filtering; raise "
            "data.heldout_fraction or data.max_prompt_tokens"
        )
    # Every other model spec resolves too (local files exist, Hub snapshots and embedded files are fetched), so a
    # wrong path fails here, in one line, not after the policy has loaded.
    others = [(vc.model, not vc.served) for vc in cfg.reward.verifiers]
    if cfg.model.reference not in (None, "policy"):
        others.append((cfg.model.reference, True))
    for spec, weights in others:
        resolve(spec, weights=weights)
    if is_main():  # the input is valid: record it before the (slow) model loads
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml(cfg))
        print("resolved config:\n" + config_yaml(cfg), file=sys.stderr)
    log(f"prompts: {data.stats}")
    log(f"loading policy {cfg.model.policy} ...")
    lora = cfg.model.lora
    # With LoRA the policy's weights are the frozen base, kept in the compute dtype (bfloat16 on accelerators).
    policy_dtype = jnp.float32 if lora is None else jnp.dtype(dtype)
    policy = dataclasses.replace(
        load_model(cfg.model.policy, dtype=policy_dtype, mesh=mesh, tokenizer=False), tokenizer=tok
    )
    if cfg.model.remat != "none":
        policy = dataclasses.replace(policy, cfg=dataclasses.replace(policy.cfg, remat=cfg.model.remat))
    ref = None
    # The held-out evaluation measures KL to the reference, so it loads one even when grpo.beta is 0.
    if cfg.grpo.beta > 0 or (cfg.train.heldout_every and cfg.model.reference is not None):
        if lora is not None:
            ref = policy.weights  # the base without adapters, the same buffers (never donated)
        elif cfg.model.reference == "policy":
            # Its own buffers: the policy's are donated to the first update.
            ref = jax.tree.map(jnp.copy, compute_params(policy.weights, dtype))
        else:
            log(f"loading reference {cfg.model.reference} ...")
            ref_model = load_model(cfg.model.reference, dtype=jnp.float32, mesh=mesh, tokenizer=False)
            if ref_model.cfg != dataclasses.replace(policy.cfg, remat=ref_model.cfg.remat):
                raise CmeError(f"model.reference {cfg.model.reference!r} must have the policy's architecture")
            ref = compute_params(ref_model.weights, dtype)
    verifiers = []
    for vc in cfg.reward.verifiers:
        log(f"loading verifier {vc.name} ({vc.model}) ...")
        verifiers.append(load_verifier(vc, mesh=mesh))
    sc = step_config(cfg, dtype)
    prompt_len = None
    if cfg.train.prompt_padding == "max":
        prompt_len = bucket_length(max(len(ids) for ids in encode(list(data.train))))
    return Run(cfg, policy, ref, verifiers, data, mesh, sc, prompt_len)


@dataclasses.dataclass
class Stepper:
    """Runs one RL step: fused on device when the reward allows it, else rollout | host rewards | update."""

    run: Run
    fns: StepFunctions
    rows: jax.sharding.NamedSharding
    stops: np.ndarray
    device_reward: Any  # rewards.DeviceReward or None
    frozen_shardings: Any
    fed_rows: list[int] = dataclasses.field(default_factory=list)  # prompt rows this process fed last step

    def __call__(self, state: TrainState, step: int, texts: Sequence[str]) -> tuple[TrainState, dict, Any, dict]:
        """Returns (new state, metrics, host rollout, host reward components per row)."""
        run, cfg = self.run, self.run.cfg
        t0 = time.perf_counter()
        toks_np, mask_np = encode_batch(run, texts)
        fed: set[int] = set()
        toks, mask = put_global(toks_np, self.rows, fed), put_global(mask_np, self.rows)
        self.fed_rows = sorted(fed)
        stops = put_global(self.stops, replicated(run.mesh))
        reward_rng = jax.random.fold_in(jax.random.key(cfg.train.seed + 1), step)
        if self.device_reward is not None:
            frozen = self.device_reward.frozen(list(texts), reward_rng)
            frozen = jax.tree.map(put_global, frozen, self.frozen_shardings)
            state, metrics, ro = self.fns.fused(state, toks, mask, stops, run.ref_params, frozen, *run.base_args)
            metrics = self.device_reward.check(jax.device_get(metrics))
            ro_host = jax.tree.map(to_host, ro)
            return state, metrics, ro_host, {"time/step": time.perf_counter() - t0}
        ro = self.fns.rollout(state, toks, mask, stops, *run.base_args)
        ro_host: Rollout = jax.tree.map(to_host, ro)
        t1 = time.perf_counter()
        weights = compute_params(run.weights(state.params), run.sc.compute_dtype)
        policy = dataclasses.replace(run.policy, weights=weights)
        out = rewards_lib.compute_rewards(
            cfg.reward,
            rewards_lib.RewardBatch.from_rollout(texts, ro_host, toks_np, mask_np, run.policy.tokenizer),
            verifiers=run.verifiers,
            policy=policy,
            rng=reward_rng,
            mesh=run.mesh,
            skip_unweighted=True,
        )
        t2 = time.perf_counter()
        batch = join_rollout(toks, mask, ro, run.sc.group_size)
        rewards = put_global(out.rewards, self.rows)
        state, metrics = self.fns.update(state, batch, rewards, run.ref_params, *run.base_args)
        metrics = jax.device_get(metrics)
        t3 = time.perf_counter()
        metrics.update(out.diagnostics)
        metrics.update(out.timings)  # time/score_remote: the network's share of time/score
        metrics.update({"time/sample": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2, "time/step": t3 - t0})
        return state, metrics, ro_host, {"rewards": out.rewards}


def make_stepper(run: Run, optimizer: Any, ssh: TrainState) -> Stepper:
    cfg = run.cfg
    tok = run.policy.tokenizer
    rows = batch_sharding(run.mesh, 1)
    rep = replicated(run.mesh)
    device_reward = None
    if cfg.train.fused:
        device_reward = rewards_lib.device_reward_fn(
            cfg.reward, run.verifiers, run.policy.cfg, tok, cfg.sampling.num_samples
        )
    frozen_sh = device_reward.frozen_shardings(run.mesh) if device_reward is not None else None
    wsh = weight_shardings(run.policy.cfg, run.mesh)
    ref_sh = wsh if run.ref_params is not None else None
    base_sh = wsh if run.base_args else None
    shard = StepShardings(state=ssh, rows=rows, replicated=rep, ref=ref_sh, frozen=frozen_sh, base=base_sh)
    fns = build_step(
        run.policy.cfg,
        run.sc,
        optimizer,
        pad_id=pad_id(tok),
        shardings=shard,
        reward_fn=device_reward.fn if device_reward is not None else None,
    )
    stops = np.asarray(stop_token_ids(tok, cfg.model.stop_strings) or [-1], np.int32)
    log("step: one fused jit (sample + score + update)" if device_reward else "step: rollout | host rewards | update")
    return Stepper(run, fns, rows, stops, device_reward, frozen_sh)


def start_watchdog(cfg: TrainConfig, start_step: int) -> tuple[Watchdog | None, list[Event]]:
    """The watchdog with its history rebuilt from metrics.jsonl up to `start_step`, and the events so far.

    Steps after the last checkpoint are re-run and logged again, so their old rows and events are dropped:
    watchdog.jsonl is rewritten with the replayed events, and the last row logged for a step wins.
    """
    if not cfg.watch.enabled:
        return None, []
    run_dir = Path(cfg.run_dir)
    dog = Watchdog(cfg.watch)
    rows = [r for r in read_metrics(run_dir) if r["step"] <= start_step] if start_step else []
    _, events = dog.feed(rows)
    if len(dog.rows) != start_step:
        log(
            f"warning: watchdog: {run_dir / 'metrics.jsonl'} holds {len(dog.rows)} of the {start_step} steps before "
            "the resume; its windows start from those"
        )
    if is_main():
        write_events(run_dir / WATCHDOG_FILE, events, append=False)
    return dog, events


def report_events(run_dir: Path, events: Sequence[Event]) -> None:
    """One warning line per firing, and its row in watchdog.jsonl."""
    for e in events:
        log(f"warning: {e.message}")
    if events and is_main():
        write_events(run_dir / WATCHDOG_FILE, events)


def stop_message(cfg: TrainConfig, step: int, good: int | None) -> str:
    """Where the last good policy is, for the run ended by the watchdog at `step`."""
    head = f"watchdog: stopping at step {step} (train.stop_on_hacking); its final checkpoint is step {step}"
    if good is None:
        return f"{head}; none was saved before the warning: the base model {cfg.model.policy} is the last good policy"
    path = Path(cfg.run_dir) / "checkpoints" / str(good)
    return f"{head}; the last good checkpoint, saved before the warning, is step {good} ({path})"


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    state: TrainState | None  # None when the run directory was already complete
    step: int


def train(cfg: TrainConfig, resume: bool | None = None, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) training; `stop_after` ends this session after that many steps with a checkpoint."""
    run_dir = Path(cfg.run_dir)
    mode = cfg.checkpoint.resume if resume is None else ("require" if resume else "never")
    ckpt = CheckpointManager(
        run_dir, save_every=cfg.checkpoint.every, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
    )
    # Every way out (an error, SIGTERM, Ctrl-C) closes the checkpoint manager: pending saves finish and orbax's
    # threads stop before the interpreter does.
    try:
        return _train(cfg, ckpt, mode, stop_after)
    finally:
        ckpt.close()


def lora_params(run: Run) -> tuple[Any, Any]:
    """Fresh adapters (B = 0: the run starts at the base) on the host, and their shardings."""
    lora, pcfg = run.cfg.model.lora, run.policy.cfg
    adapters = lora_lib.init_adapters(pcfg, lora, jax.random.key(run.cfg.train.seed + 3))
    n = sum(x.size for x in jax.tree.leaves(adapters))
    log(f"LoRA: rank {lora.rank} on {', '.join(lora.targets)}: {n:,} trainable parameters on a frozen base")
    return adapters, lora_lib.adapter_shardings(pcfg, lora, run.mesh)


def _train(cfg: TrainConfig, ckpt: CheckpointManager, mode: str, stop_after: int | None) -> TrainResult:
    run_dir = Path(cfg.run_dir)
    latest = ckpt.latest_step()
    if mode == "require" and latest is None:
        raise CmeError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
    if mode == "never" and latest is not None:
        raise CmeError(
            f"{run_dir} already holds checkpoints (latest step {latest}); resume it, or choose a new run_dir"
        )
    if latest is not None and latest >= cfg.train.steps:
        log(f"{run_dir} is complete (step {latest} of train.steps={cfg.train.steps}); raise train.steps to go on")
        return TrainResult(run_dir, None, latest)
    plan_line = start_check(cfg)  # refuses, before any weight loads, a run that cannot fit in device memory
    if plan_line:
        log(plan_line)
    run = load_run(cfg)
    if cfg.audit_at_start and run.verifiers:
        from cme_jax.eval.audit import start_audit

        log(f"auditing the verifiers on {cfg.audit_pairs} preference pairs (audit_at_start) ...")
        cme_w = next((t.weight for t in cfg.reward.terms if t.name == "cme"), 1.0)
        weights = [cme_w * v.weight for v in cfg.reward.verifiers]
        lines = start_audit(
            run.verifiers, weights, run_dir / "audit", limit=cfg.audit_pairs, zscore=cfg.reward.zscore, mesh=run.mesh
        )
        for line in lines:
            log(f"warning: {line}")
        log(f"audit report: {run_dir / 'audit' / 'report.md'}")
    total_updates = cfg.train.steps * cfg.train.num_iterations * cfg.train.minibatches
    optimizer = make_optimizer(cfg.optim, total_updates)
    schedule = lr_schedule(cfg.optim, total_updates)
    if cfg.model.lora is None:
        params, psh = run.policy.weights, weight_shardings(run.policy.cfg, run.mesh)
    else:
        params, psh = lora_params(run)
    state = init_state(params, optimizer, cfg.train.seed)
    ssh = state_shardings(state, optimizer, psh, replicated(run.mesh))
    sampler = PromptSampler(len(run.prompts), cfg.data.seed, fingerprint=run.data.fingerprint)
    start_step = 0
    if latest is not None:
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, ssh)
        restored = ckpt.restore(abstract, latest)
        state, start_step = restored.state, latest
        sampler = PromptSampler.from_state(restored.metadata["data"], len(run.prompts), run.data.fingerprint)
        log(f"resumed from step {start_step} of {run_dir}")
    state = jax.tree.map(put_global, state, ssh)
    stepper = make_stepper(run, optimizer, ssh)

    logger = RunLogger(run_dir, cfg.logging, cfg.train.steps, start_step, active=is_main())
    dog, events = start_watchdog(cfg, start_step)
    heldout_rows = [r for r in last_row_per_step(read_run_log(run_dir / HELDOUT_FILE)) if r["step"] <= start_step]
    every = cfg.train.heldout_every

    def evaluate_heldout(step: int) -> None:
        row = heldout_eval(run, run.weights(state.params), step)
        heldout_rows.append(row)
        logger.record(HELDOUT_FILE, step, row["scalars"], row)

    if every and start_step == 0:
        n = min(cfg.train.heldout_prompts, len(run.data.heldout))
        log(f"held-out evaluation every {every} steps on {n} prompts")
        evaluate_heldout(0)
    flag = install_preemption_handler()
    preview_prompts = list((run.data.heldout or run.data.train)[:2])
    before = None
    # With held-out evaluation on, its first and last greedy responses are the before/after preview.
    if start_step == 0 and cfg.logging.preview_tokens and not every:
        before = preview(run, run.weights(state.params), preview_prompts, cfg.logging.preview_tokens)
    n_updates = cfg.train.num_iterations * cfg.train.minibatches
    nonfinite = 0
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start_step + stop_after)
    done = start_step
    try:
        for step in range(start_step, end):
            idx, sampler = sampler.global_batch(cfg.train.prompts_per_step)
            texts = [run.prompts[i] for i in idx]
            state, metrics, ro, extra = stepper(state, step, texts)
            if os.environ.get("CME_JAX_RECORD_FED") == "1":
                record_fed(run_dir, step + 1, idx, texts, stepper.fed_rows)
            metrics.update({k: v for k, v in extra.items() if k.startswith("time/")})
            n_tokens = float(np.asarray(ro.lengths).sum())
            metrics["throughput/tokens_per_s"] = n_tokens / metrics["time/step"]
            metrics["optim/lr"] = float(schedule((step + 1) * n_updates - 1))
            fired: list[Event] = []
            if dog is not None:
                watch, fired = dog.observe(step + 1, metrics)
                metrics.update(watch)
            values = logger.scalars(step + 1, metrics)
            logger.progress(step + 1, values, PROGRESS_KEYS)
            report_events(run_dir, fired)
            events.extend(fired)
            stop = cfg.train.stop_on_hacking and agree(bool(fired))
            nonfinite = nonfinite + 1 if values.get("skipped_updates", 0) >= n_updates else 0
            if nonfinite >= cfg.train.max_nonfinite_steps:
                raise CmeError(
                    f"{nonfinite} steps in a row had non-finite loss or gradients (all updates skipped); the last "
                    f"good weights are in {run_dir / 'checkpoints'}; lower optim.learning_rate or check the rewards"
                )
            if cfg.logging.samples_every and (step + 1) % cfg.logging.samples_every == 0:
                _log_samples(logger, step + 1, texts, ro, run.policy.tokenizer, extra.get("rewards"), cfg)
            meta = {"data": sampler.state_dict(), "config": config_to_dict(cfg), "model_spec": cfg.model.policy}
            if stop:
                ckpt.wait()  # a save still in flight counts as saved before the warning
                good = ckpt.latest_step()
            ckpt.save(step + 1, state, meta, force=(step + 1 == end) or stop)
            done = step + 1
            if every and ((step + 1) % every == 0 or step + 1 == cfg.train.steps or stop):
                evaluate_heldout(step + 1)
            if stop:
                log(stop_message(cfg, step + 1, good))
                break
            if flag.any_process():
                log(f"termination signal: saving step {step + 1} and stopping")
                ckpt.save(step + 1, state, meta, force=True)
                break
    finally:
        ckpt.close()
        logger.close()
        flag.uninstall()
    if done > start_step:
        log(reward_curve(last_row_per_step(read_metrics(run_dir))))
    for line in heldout_report(heldout_rows, cfg.train.seed):
        log(line)
    if dog is not None:
        log(verdict(events, done))
    if before is not None:
        after = preview(run, run.weights(state.params), preview_prompts, cfg.logging.preview_tokens)
        for p, b, a in zip(preview_prompts, before, after):
            log(f"\nprompt: {p}\n  before: {b.strip()[:300]}\n  after:  {a.strip()[:300]}")
    elif len(heldout_rows) >= 2 and cfg.logging.preview_tokens:
        for line in changed_responses(heldout_rows[0], heldout_rows[-1]):
            log(line)
    log(f"\nrun directory: {run_dir}  (TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'})")
    return TrainResult(run_dir, state, done)


def _log_samples(logger: RunLogger, step: int, texts, ro, tok, rewards, cfg: TrainConfig) -> None:
    G = cfg.sampling.num_samples
    responses = [tok.decode(t, skip_special_tokens=True) for t in response_token_lists(ro)]
    rows = []
    for i in range(min(cfg.logging.samples_shown, len(responses))):
        row = {"prompt": texts[i // G], "response": responses[i], "length": int(np.asarray(ro.lengths)[i])}
        if rewards is not None:
            row["reward"] = round(float(rewards[i]), 4)
        rows.append(row)
    logger.samples(step, rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cme_jax.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the YAML")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", default=None, help="require a checkpoint to resume from")
    g.add_argument("--no-resume", dest="resume", action="store_false", help="refuse to reuse a run_dir")
    p.add_argument("--distributed", action="store_true", help="join a multi-process job (jax.distributed)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop (with a checkpoint) after N steps of this session")
    return p


def enable_compilation_cache() -> None:
    """Keep compiled programs on disk so a restarted or repeated run skips most compilation."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    # Overrides may stand on either side of a flag: --config F a.b=1 --no-resume c.d=2.
    args = build_parser().parse_intermixed_args(argv)
    enable_compilation_cache()
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(config_yaml(cfg))
        return
    if args.distributed:
        initialize_distributed()
    if args.stop_after is not None and args.stop_after < 1:
        raise CmeError(f"--stop-after {args.stop_after}: give a number of steps >= 1")
    train(cfg, resume=args.resume, stop_after=args.stop_after)


if __name__ == "__main__":
    main()
