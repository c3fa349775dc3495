"""The GRPO step: sample -> score -> group advantages -> num_iterations x minibatch updates, as jitted functions.

When every reward is computed on device (verifiers sharing the policy's vocabulary, policy-side baselines),
`fused` runs the whole step as ONE jitted, sharded function with the state donated. Otherwise the step is
`rollout` (jit) -> host re-tokenisation and scoring -> `update` (jit), the same update code either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import einops
import jax
import jax.numpy as jnp
import optax
from flax import struct

from cme_jax.grpo import (
    GRPOConfig,
    LossBatch,
    LossFn,
    Metrics,
    aggregate_metrics,
    group_advantages,
    policy_loss,
    sampler_mismatch,
    sum_metrics,
    tis_weights,
)
from cme_jax.models.logprobs import token_stats
from cme_jax.models.lora import LoraConfig, adapted
from cme_jax.models.transformer import Array, ModelConfig, Weights
from cme_jax.sampling import Rollout, SamplingConfig, sample

ComputeDtype = Literal["float32", "bfloat16"]
Schedule = Literal["constant", "cosine", "linear"]

# reward_fn(policy compute params, rollout, prompt tokens [R,P], prompt mask [R,P], frozen pytree)
#   -> (rewards [R] float32, metrics dict of scalars); must be jittable.
DeviceRewardFn = Callable[[Weights, Rollout, Array, Array, Any], tuple[Array, dict[str, Array]]]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and a warmup + constant/cosine/linear schedule (per optimizer update)."""

    learning_rate: float = 1e-6
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # floor of cosine/linear decay, as a fraction of learning_rate
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"optim.learning_rate={self.learning_rate} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("optim.weight_decay and optim.max_grad_norm must be >= 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError("optim.b1 and optim.b2 must be in [0, 1)")


def lr_schedule(cfg: OptimConfig, total_updates: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer update count."""
    peak = cfg.learning_rate
    decay_steps = max(1, total_updates - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(peak, peak * cfg.min_lr_ratio, decay_steps)
    else:
        main = optax.constant_schedule(peak)
    if cfg.warmup_steps == 0:
        return main
    warm = optax.linear_schedule(peak / max(1, cfg.warmup_steps), peak, cfg.warmup_steps)
    return optax.join_schedules([warm, main], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig, total_updates: int) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    parts.append(
        optax.adamw(lr_schedule(cfg, total_updates), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    )
    return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static shape of one RL step."""

    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    num_iterations: int = 1  # mu: passes over the rollout batch
    minibatches: int = 1  # optimizer updates per pass
    micro_batches: int = 1  # gradient accumulation inside one update
    compute_dtype: ComputeDtype = "float32"
    log_entropy: bool = True
    # Adapters on a frozen base: the state's params are the adapters and every step function takes the base as
    # its last argument.
    lora: LoraConfig | None = None

    def __post_init__(self):
        for name in ("num_iterations", "minibatches", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")

    @property
    def group_size(self) -> int:
        return self.sampling.num_samples

    @property
    def temperature(self) -> float:
        return self.sampling.temperature if self.sampling.temperature > 0 else 1.0

    def check_rows(self, rows: int) -> None:
        per = self.minibatches * self.micro_batches
        if rows % per:
            raise ValueError(
                f"{rows} rollout rows (prompts x num_samples) do not split into {self.minibatches} minibatches x "
                f"{self.micro_batches} micro-batches; make prompts x num_samples a multiple of {per}"
            )


@struct.dataclass
class TrainState:
    params: Any  # float32 master weights, or with LoRA the float32 adapters (`lora.Adapters`)
    opt_state: Any
    step: Array  # int32 RL steps completed
    rng: Array  # base key; step s samples with fold_in(rng, s)


def init_state(params: Weights, optimizer: optax.GradientTransformation, seed: int | Array) -> TrainState:
    rng = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32), rng=rng)


@struct.dataclass
class UpdateBatch:
    """What the update needs from a rollout, with prompt and response joined as one sequence."""

    tokens: Array  # [R, P+N]
    mask: Array  # [R, P+N]
    response_mask: Array  # [R, N]
    sampler_logp: Array  # [R, N]
    truncated: Array  # [R]
    lengths: Array  # [R]


def compute_params(params: Weights, dtype: ComputeDtype) -> Weights:
    """Weights in the compute dtype (float32 master weights stay untouched)."""
    if dtype == "float32":
        return params
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def policy_weights(params: Any, base: Weights | None, sc: StepConfig) -> Weights:
    """The policy the trainable `params` define: themselves, or with LoRA the frozen base with the adapters
    applied on the fly (`lora.adapted`)."""
    if sc.lora is None:
        return params
    if base is None:
        raise ValueError("a LoRA step needs the frozen base weights")
    return adapted(base, params, sc.lora)


def join_rollout(prompts_BxP: Array, pmask_BxP: Array, ro: Rollout, group_size: int) -> UpdateBatch:
    """Repeat each prompt for its G samples and append the responses."""
    p = jnp.repeat(prompts_BxP, group_size, axis=0)
    pm = jnp.repeat(pmask_BxP.astype(bool), group_size, axis=0)
    return UpdateBatch(
        tokens=jnp.concatenate([p, ro.tokens], axis=1),
        mask=jnp.concatenate([pm, ro.mask], axis=1),
        response_mask=ro.mask,
        sampler_logp=ro.logprobs,
        truncated=ro.truncated,
        lengths=ro.lengths,
    )


def response_logprobs(
    params: Weights,
    cfg: ModelConfig,
    tokens: Array,
    mask: Array,
    prompt_len: int,
    sc: StepConfig,
    entropy: bool = False,
) -> dict[str, Array]:
    """Per-token stats of the response tokens under `params` (temperature-scaled like the sampler)."""
    return token_stats(
        compute_params(params, sc.compute_dtype),
        cfg,
        tokens,
        mask,
        start=prompt_len,
        temperature=sc.temperature,
        entropy=entropy,
    )


def _split_rows(x: Array, minibatches: int, micro: int) -> Array:
    """[R, ...] -> [M, K, R/(M*K), ...] with row i in minibatch i % M, so every minibatch spans all devices."""
    return einops.rearrange(x, "(r k m) ... -> m k r ...", k=micro, m=minibatches)


def _zeros_like_tree(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)


def update(
    state: TrainState,
    batch: UpdateBatch,
    rewards_R: Array,
    ref_params: Weights | None,
    *,
    cfg: ModelConfig,
    sc: StepConfig,
    optimizer: optax.GradientTransformation,
    loss_fn: LossFn = policy_loss,
    rewards_ok: Array | None = None,
    base: Weights | None = None,
) -> tuple[TrainState, dict[str, Array]]:
    """Advantages, old/ref log-probs, then num_iterations x minibatches optimizer updates (pure, jittable).

    `loss_fn(LossBatch, GRPOConfig) -> (loss_sum, denominator, metrics)` is the objective; `rewards_ok` (a bool
    scalar) false skips every update of the step, as a non-finite loss does. With LoRA (`sc.lora`) `base` is the
    frozen base: only the adapters get gradients, and the reference is the base itself unless `ref_params` is given.
    """
    G, grpo = sc.group_size, sc.grpo
    R, N = batch.response_mask.shape
    P = batch.tokens.shape[1] - N
    sc.check_rows(R)
    M, K = sc.minibatches, sc.micro_batches
    n_updates = sc.num_iterations * M
    adv_R, adv_stats = group_advantages(rewards_R.astype(jnp.float32), G, grpo.advantage_mode, grpo.advantage_eps)
    data = {
        "tokens": batch.tokens,
        "mask": batch.mask,
        "response_mask": batch.response_mask,
        "sampler": batch.sampler_logp,
        "adv": adv_R,
        "truncated": batch.truncated,
    }
    # With one update, the weights being trained are the old policy: its log-probs come from the loss's own
    # forward (stop_gradient), so recomputing them costs nothing. Otherwise one forward before the updates.
    if grpo.old_logp == "recompute" and n_updates > 1:
        with jax.named_scope("old_logprobs"):
            data["old"] = jax.lax.stop_gradient(
                response_logprobs(policy_weights(state.params, base, sc), cfg, batch.tokens, batch.mask, P, sc)["logp"]
            )
    if ref_params is None and sc.lora is not None:
        ref_params = base  # the base without adapters: no second copy of the weights
    if grpo.beta > 0:
        if ref_params is None:
            raise ValueError("grpo.beta > 0 needs reference weights")
        with jax.named_scope("ref_logprobs"):
            data["ref"] = jax.lax.stop_gradient(
                response_logprobs(ref_params, cfg, batch.tokens, batch.mask, P, sc)["logp"]
            )
    data = jax.tree.map(lambda x: _split_rows(x, M, K), data)

    def loss_of(
        params: Any, x: dict[str, Array], first: Array, base: Weights | None
    ) -> tuple[Array, tuple[Array, Metrics]]:
        """The loss of one micro-batch; `first` is 1.0 in the step's first update (the weights that sampled)."""
        weights = policy_weights(params, base, sc)
        stats = response_logprobs(weights, cfg, x["tokens"], x["mask"], P, sc, entropy=sc.log_entropy)
        logp = stats["logp"]
        if "old" in x:
            old, at_old = x["old"], jnp.ones(())
        elif grpo.old_logp == "recompute":
            old, at_old = jax.lax.stop_gradient(logp), first
        else:
            old, at_old = x["sampler"], first
        learner_old = jax.lax.stop_gradient(old if "old" in x else logp)
        weight = None
        if grpo.sampler_correction == "tis":
            weight = tis_weights(old, x["sampler"], x["response_mask"], grpo.tis_cap)
        lb = LossBatch(
            logp=logp,
            old_logp=old,
            sampler_logp=x["sampler"],
            advantages=x["adv"],
            mask=x["response_mask"],
            truncated=x["truncated"],
            ref_logp=x.get("ref"),
            entropy=stats.get("entropy"),
            is_weight=weight,
        )
        loss_sum, den, metrics = loss_fn(lb, grpo)
        # Sampler/learner mismatch, measured where the learner's weights are the sampler's.
        for k, (v, n) in sampler_mismatch(learner_old, x["sampler"], x["response_mask"]).items():
            metrics[k] = (v * at_old, n * at_old)
        if weight is not None:
            n_tok = x["response_mask"].astype(jnp.float32).sum()
            clipped = (weight >= grpo.tis_cap) & (x["response_mask"] > 0)
            metrics["tis/weight_mean"] = (weight.sum(), n_tok)
            metrics["tis/capped_frac"] = (clipped.astype(jnp.float32).sum(), n_tok)
        return loss_sum, (den, metrics)

    # One traced copy of forward + backward: every micro-batch of every update goes through this function. The
    # gradient is taken with respect to the trainable params only (with LoRA, not the base).
    @jax.jit
    def microbatch_grad(params: Any, x: dict[str, Array], first: Array, base: Weights | None) -> Any:
        return jax.value_and_grad(loss_of, has_aux=True)(params, x, first, base)

    x0 = jax.tree.map(lambda x: x[0, 0], data)
    shapes = jax.eval_shape(microbatch_grad, state.params, x0, jnp.ones(()), base)
    (loss_shape, (den_shape, met_shape)), grad_shape = shapes
    skip_all = jnp.zeros((), bool) if rewards_ok is None else ~jnp.asarray(rewards_ok, bool)

    def one_update(carry, i):
        params, opt_state, totals = carry
        mb = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i % M, keepdims=False), data)
        first = (i == 0).astype(jnp.float32)

        def micro(acc, x):
            g_acc, loss_acc, den_acc, met_acc = acc
            (loss_sum, (den, met)), g = microbatch_grad(params, x, first, base)
            return (
                jax.tree.map(jnp.add, g_acc, g),
                loss_acc + loss_sum,
                den_acc + den,
                sum_metrics(met_acc, met),
            ), None

        init = _zeros_like_tree((grad_shape, loss_shape, den_shape, met_shape))
        (g_sum, loss_sum, den_sum, met), _ = jax.lax.scan(micro, init, mb)
        denom = jnp.maximum(den_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        loss = loss_sum / denom
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm) & ~skip_all

        def apply(params, opt_state):
            updates, new_opt = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt

        # A non-finite update leaves params and optimizer state exactly as they were. A branch rather than a
        # select, so a normal step does not read and rewrite every parameter and moment a second time.
        params, opt_state = jax.lax.cond(finite, apply, lambda p, o: (p, o), params, opt_state)
        f = finite.astype(jnp.float32)
        step_metrics: Metrics = {
            **met,
            "loss": (jnp.where(finite, loss, 0.0), f),
            "grad_norm": (jnp.where(finite, gnorm, 0.0), f),
            "skipped_updates": (1.0 - f, jnp.ones(())),
        }
        return (params, opt_state, sum_metrics(totals, step_metrics)), None

    totals0 = {
        **_zeros_like_tree(met_shape),
        **{k: (jnp.zeros(()), jnp.zeros(())) for k in ("loss", "grad_norm", "skipped_updates")},
    }
    (params, opt_state, totals), _ = jax.lax.scan(
        one_update, (state.params, state.opt_state, totals0), jnp.arange(n_updates, dtype=jnp.int32)
    )
    metrics = aggregate_metrics(totals)
    metrics["skipped_updates"] = totals["skipped_updates"][0]
    metrics.update(rollout_metrics(batch, rewards_R, adv_R, G))
    metrics.update({f"adv/{k}": v.astype(jnp.float32) for k, v in adv_stats.items()})
    new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
    return new_state, metrics


def _average_ranks(x_BxG: Array) -> Array:
    """0-based ranks inside each row, ties sharing their average rank (pairwise: G is small)."""
    less = (x_BxG[:, None, :] < x_BxG[:, :, None]).sum(-1)
    equal = (x_BxG[:, None, :] == x_BxG[:, :, None]).sum(-1)
    return less + 0.5 * (equal - 1)


def group_spearman(a_R: Array, b_R: Array, group_size: int) -> Array:
    """Mean over groups (consecutive blocks of group_size rows) of the Spearman correlation of a and b.

    Groups where a or b is constant have no correlation and are left out; 0 when no group is left.
    """
    ranks = [_average_ranks(jnp.asarray(x, jnp.float32).reshape(-1, group_size)) for x in (a_R, b_R)]
    ca, cb = (r - r.mean(axis=1, keepdims=True) for r in ranks)
    var_a, var_b = (ca * ca).sum(axis=1), (cb * cb).sum(axis=1)
    ok = (var_a > 0) & (var_b > 0)
    rho = (ca * cb).sum(axis=1) / jnp.sqrt(jnp.where(ok, var_a * var_b, 1.0))
    return jnp.where(ok, rho, 0.0).sum() / jnp.maximum(ok.sum(), 1)


def rollout_metrics(batch: UpdateBatch, rewards_R: Array, adv_R: Array, group_size: int) -> dict[str, Array]:
    """Reward, length and truncation statistics of one rollout batch (rows group-major, `group_size` per group).

    reward/length_spearman, the within-group rank correlation of reward and length, is the watchdog's
    length-exploitation signal.
    """
    lengths = batch.lengths.astype(jnp.float32)
    return {
        "reward/mean": jnp.mean(rewards_R),
        "reward/std": jnp.std(rewards_R),
        "reward/length_spearman": group_spearman(rewards_R, lengths, group_size),
        "response/length_mean": jnp.mean(lengths),
        "response/length_max": jnp.max(lengths),
        "response/truncated_frac": jnp.mean(batch.truncated.astype(jnp.float32)),
        "response/empty_frac": jnp.mean((batch.lengths == 0).astype(jnp.float32)),
        "adv/abs_mean": jnp.mean(jnp.abs(adv_R)),
    }


def rollout(
    state: TrainState,
    prompts_BxP: Array,
    pmask_BxP: Array,
    stop_ids: Array,
    *,
    cfg: ModelConfig,
    sc: StepConfig,
    pad_id: int,
    base: Weights | None = None,
) -> Rollout:
    """Sample G responses per prompt with the current policy; the key depends only on (seed, step).

    With LoRA the sampler merges the adapters into its one copy of the decode weights (see `sampling.sample`).
    """
    key = jax.random.fold_in(state.rng, state.step)
    params = compute_params(policy_weights(state.params, base, sc), sc.compute_dtype)
    return sample(params, cfg, prompts_BxP, pmask_BxP, key, sc.sampling, stop_ids, pad_id)


def fused_step(
    state: TrainState,
    prompts_BxP: Array,
    pmask_BxP: Array,
    stop_ids: Array,
    ref_params: Weights | None,
    frozen: Any,
    *,
    cfg: ModelConfig,
    sc: StepConfig,
    optimizer: optax.GradientTransformation,
    reward_fn: DeviceRewardFn,
    pad_id: int,
    loss_fn: LossFn = policy_loss,
    base: Weights | None = None,
) -> tuple[TrainState, dict[str, Array], Rollout]:
    """Sample, score on device, and update: the whole RL step in one function.

    A step whose reward metrics count non-finite scores (`reward/nonfinite`) skips its updates.
    """
    ro = rollout(state, prompts_BxP, pmask_BxP, stop_ids, cfg=cfg, sc=sc, pad_id=pad_id, base=base)
    G = sc.group_size
    prompts_R = jnp.repeat(prompts_BxP, G, axis=0)
    pmask_R = jnp.repeat(pmask_BxP, G, axis=0)
    with jax.named_scope("score"):
        rewards, reward_metrics = reward_fn(
            compute_params(policy_weights(state.params, base, sc), sc.compute_dtype), ro, prompts_R, pmask_R, frozen
        )
    batch = join_rollout(prompts_BxP, pmask_BxP, ro, G)
    ok = reward_metrics["reward/nonfinite"] == 0 if "reward/nonfinite" in reward_metrics else None
    kw = {"cfg": cfg, "sc": sc, "optimizer": optimizer, "loss_fn": loss_fn, "rewards_ok": ok, "base": base}
    state, metrics = update(state, batch, rewards, ref_params, **kw)
    metrics.update(reward_metrics)
    return state, metrics, ro


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where each argument of the step lives. `rows` shards the leading (batch) axis over the data axes."""

    state: Any
    rows: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding
    ref: Any = None  # Weights of NamedSharding when a reference model is used
    frozen: Any = None  # pytree of NamedSharding for the device reward's frozen inputs
    base: Any = None  # Weights of NamedSharding for the frozen base under LoRA


@dataclasses.dataclass
class StepFunctions:
    """The jitted pieces of a step, compiled with explicit shardings and the state donated."""

    rollout: Callable[..., Rollout]
    update: Callable[..., tuple[TrainState, dict[str, Array]]]
    fused: Callable[..., tuple[TrainState, dict[str, Array], Rollout]] | None


def build_step(
    cfg: ModelConfig,
    sc: StepConfig,
    optimizer: optax.GradientTransformation,
    *,
    pad_id: int,
    shardings: StepShardings | None = None,
    reward_fn: DeviceRewardFn | None = None,
    loss_fn: LossFn = policy_loss,
) -> StepFunctions:
    """jit the step functions; without shardings everything runs on the default device.

    `loss_fn(LossBatch, GRPOConfig) -> (loss_sum, denominator, metrics)` replaces the GRPO objective. With LoRA
    (`sc.lora`) each function takes the frozen base weights as one more, last, argument.
    """
    sh = shardings
    tail = (sh.base,) if sh is not None and sc.lora is not None else ()
    kw = lambda ins, outs: {} if sh is None else {"in_shardings": (*ins, *tail), "out_shardings": outs}
    the_base = lambda base: base[0] if base else None

    roll = jax.jit(
        lambda state, p, m, s, *base: rollout(state, p, m, s, cfg=cfg, sc=sc, pad_id=pad_id, base=the_base(base)),
        **kw(() if sh is None else (sh.state, sh.rows, sh.rows, sh.replicated), None if sh is None else sh.rows),
    )
    # The state is donated: its buffers become the new state's, so a step never holds two copies of it.
    upd = jax.jit(
        lambda state, batch, rewards, ref, *base: update(
            state, batch, rewards, ref, cfg=cfg, sc=sc, optimizer=optimizer, loss_fn=loss_fn, base=the_base(base)
        ),
        donate_argnums=0,
        **kw(
            () if sh is None else (sh.state, sh.rows, sh.rows, sh.ref),
            None if sh is None else (sh.state, sh.replicated),
        ),
    )
    fused = None
    if reward_fn is not None:
        fused = jax.jit(
            lambda state, p, m, s, ref, frozen, *base: fused_step(
                state,
                p,
                m,
                s,
                ref,
                frozen,
                cfg=cfg,
                sc=sc,
                optimizer=optimizer,
                reward_fn=reward_fn,
                pad_id=pad_id,
                loss_fn=loss_fn,
                base=the_base(base),
            ),
            donate_argnums=0,
            **kw(
                () if sh is None else (sh.state, sh.rows, sh.rows, sh.replicated, sh.ref, sh.frozen),
                None if sh is None else (sh.state, sh.replicated, sh.rows),
            ),
        )
    return StepFunctions(rollout=roll, update=upd, fused=fused)


def state_shardings(
    state: TrainState,
    optimizer: optax.GradientTransformation,
    param_shardings: Any,
    replicated: jax.sharding.NamedSharding,
) -> TrainState:
    """Shardings of a TrainState: params by the rules, optimizer moments like their params, the rest replicated."""
    opt = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        state.opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(params=param_shardings, opt_state=opt, step=replicated, rng=replicated)
