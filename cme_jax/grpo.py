"""GRPO pieces as pure array functions: group advantages, KL estimators, the loss batch and the clipped policy loss.

A loss is any function `loss_fn(batch: LossBatch, cfg: GRPOConfig) -> (loss_sum, denominator, metrics)`;
`policy_loss` is the default, and `train_step.build_step(..., loss_fn=...)` takes another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array

AdvantageMode = Literal["group_std", "group_mean", "batch_std", "rloo"]
KLEstimator = Literal["k1", "k2", "k3"]
ImportanceLevel = Literal["token", "sequence"]
LossAggregation = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]
OldLogp = Literal["recompute", "sampler"]
SamplerCorrection = Literal["none", "tis"]

# A metric is (sum, count); summing both over micro-batches and dividing once keeps means exact.
Metrics = dict[str, tuple[Array, Array]]

# Rewards are float32 means of log-probs: equal rewards are bit-identical, so any spread this small is
# noise and must not be blown up into +-1 advantages by the std division.
ZERO_SPREAD_TOL = 1e-12


def _check_choice(name: str, value: object, allowed: object) -> None:
    """Raise one-line ValueError unless value is one of the Literal's choices."""
    choices = get_args(allowed)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, choices))}")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Options of the GRPO objective (clipping, KL, importance level, aggregation, advantages)."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # larger than epsilon_low = DAPO clip-higher
    beta: float = 0.0  # KL coefficient; 0 means the reference model is never run
    kl_estimator: KLEstimator = "k3"
    importance_level: ImportanceLevel = "token"  # "sequence" = GSPO
    loss_aggregation: LossAggregation = "seq_mean_token_mean"
    max_response_length: int = 512  # Dr. GRPO's constant normaliser for seq_mean_token_sum_norm
    mask_truncated: bool = False
    advantage_mode: AdvantageMode = "group_std"
    advantage_eps: float = 1e-6
    # The old policy's log-probs in the ratio: the learner's own forward at the weights that sampled
    # (recompute; free when the step makes one update) or the sampler's (equal only when their numerics are).
    old_logp: OldLogp = "recompute"
    # tis: weight each token's policy-gradient term by min(pi_old / pi_sampler, tis_cap) (truncated importance
    # sampling), correcting for the sampler's numerics differing from the learner's.
    sampler_correction: SamplerCorrection = "none"
    tis_cap: float = 2.0

    def __post_init__(self) -> None:
        """Validate every field, failing with one line that names the field and what is allowed."""
        for name in ("epsilon_low", "epsilon_high", "beta", "advantage_eps", "tis_cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"grpo.{name}={value!r} must be a number >= 0")
        mrl = self.max_response_length
        if isinstance(mrl, bool) or not isinstance(mrl, int) or mrl < 1:
            raise ValueError(f"grpo.max_response_length={mrl!r} must be an integer >= 1")
        if not isinstance(self.mask_truncated, bool):
            raise ValueError(f"grpo.mask_truncated={self.mask_truncated!r} must be true or false")
        _check_choice("grpo.kl_estimator", self.kl_estimator, KLEstimator)
        _check_choice("grpo.importance_level", self.importance_level, ImportanceLevel)
        _check_choice("grpo.loss_aggregation", self.loss_aggregation, LossAggregation)
        _check_choice("grpo.advantage_mode", self.advantage_mode, AdvantageMode)
        _check_choice("grpo.old_logp", self.old_logp, OldLogp)
        _check_choice("grpo.sampler_correction", self.sampler_correction, SamplerCorrection)
        if self.sampler_correction == "tis" and self.old_logp == "sampler":
            raise ValueError(
                "grpo.sampler_correction=tis needs grpo.old_logp=recompute (with the sampler's log-probs as the old "
                "ones every weight is 1)"
            )
        if self.sampler_correction == "tis" and not self.tis_cap >= 1:
            raise ValueError(f"grpo.tis_cap={self.tis_cap!r} must be >= 1")


def group_advantages(
    rewards_N: Array, group_size: int, mode: AdvantageMode = "group_std", eps: float = 1e-6
) -> tuple[Array, dict[str, Array]]:
    """Group-relative advantages of group-major rewards [p0 g0..gG-1, p1 ...]; zero-spread groups get 0."""
    _check_choice("mode", mode, AdvantageMode)
    rewards_N = jnp.asarray(rewards_N)
    if rewards_N.ndim != 1 or group_size < 1 or rewards_N.shape[0] % group_size:
        raise ValueError(f"rewards of shape {rewards_N.shape} do not split into groups of {group_size}")
    if mode == "rloo" and group_size < 2:
        raise ValueError("advantage mode 'rloo' needs group_size >= 2")
    G = group_size
    r_PxG = rewards_N.reshape(-1, G).astype(jnp.result_type(float, rewards_N.dtype))
    mean_Px1 = r_PxG.mean(axis=1, keepdims=True)
    centred_PxG = r_PxG - mean_Px1
    # Unbiased (ddof=1) std like TRL's torch.std; max(G-1, 1) keeps G=1 finite (such groups are zero-spread).
    std_Px1 = jnp.sqrt((centred_PxG**2).sum(axis=1, keepdims=True) / max(G - 1, 1))
    zero_P = (r_PxG.max(axis=1) - r_PxG.min(axis=1)) <= ZERO_SPREAD_TOL

    if mode == "group_std":
        adv_PxG = centred_PxG / (std_Px1 + eps)
    elif mode == "group_mean":
        adv_PxG = centred_PxG
    elif mode == "batch_std":
        n = r_PxG.size
        batch_std = jnp.sqrt(((r_PxG - r_PxG.mean()) ** 2).sum() / max(n - 1, 1))  # ddof=1, as TRL
        adv_PxG = centred_PxG / (batch_std + eps)
    else:  # rloo: r_i - mean of the other G-1 rewards = G/(G-1) * (r_i - group mean)
        adv_PxG = centred_PxG * (G / (G - 1))
    adv_PxG = jnp.where(zero_P[:, None], 0.0, adv_PxG)
    adv_N = adv_PxG.reshape(-1)
    stats = {
        "zero_spread_groups": zero_P.sum().astype(jnp.int32),
        "adv_mean": adv_N.mean(),
        "adv_std": adv_N.std(),
        "reward_std_in_group_mean": std_Px1.mean(),
    }
    return adv_N, stats


def kl_penalty(logp: Array, ref_logp: Array, estimator: KLEstimator = "k3") -> Array:
    """Per-token estimate of KL(pi || ref) from sampled-token log-probs (Schulman's k1, k2, k3)."""
    _check_choice("kl_estimator", estimator, KLEstimator)
    log_r = ref_logp - logp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    return jnp.exp(log_r) - log_r - 1.0


@struct.dataclass
class LossBatch:
    """Everything a loss may read for B response rows of T tokens; optional fields are None when not computed."""

    logp: Array  # [B, T] the learner's log-probs of the sampled tokens (carries the gradient)
    old_logp: Array  # [B, T] the old policy's (grpo.old_logp), no gradient
    sampler_logp: Array  # [B, T] what the sampler reported for the same tokens
    advantages: Array  # [B]
    mask: Array  # [B, T] response tokens
    truncated: Array  # [B] responses cut at the generation limit
    ref_logp: Array | None = None  # [B, T] the reference model's, when grpo.beta > 0
    entropy: Array | None = None  # [B, T] the learner's token entropy, when logged
    is_weight: Array | None = None  # [B, T] sampler correction weights (grpo.sampler_correction), else None
    token_rewards: Array | None = None  # [B, T] a per-token reward slot for losses that use one (GRPO does not)


LossFn = Callable[[LossBatch, "GRPOConfig"], tuple[Array, Array, Metrics]]


# loss = loss_sum / denominator, summed over micro-batches before dividing. The denominator is 0 only when
# no row of the whole batch has a response token, so callers divide by max(denominator, 1).
def policy_loss(batch: LossBatch, cfg: GRPOConfig) -> tuple[Array, Array, Metrics]:
    """Clipped GRPO surrogate (+ beta * KL) as (loss_sum, denominator, metrics of (sum, count))."""
    logp_BxT, old_logp_BxT, ref_logp_BxT = batch.logp, batch.old_logp, batch.ref_logp
    advantages_B, mask_BxT, truncated_B, entropy_BxT = batch.advantages, batch.mask, batch.truncated, batch.entropy
    if cfg.beta > 0 and ref_logp_BxT is None:
        raise ValueError("grpo.beta > 0 needs ref_logp (the reference model's log-probs)")
    if cfg.mask_truncated and truncated_B is None:
        raise ValueError("grpo.mask_truncated=true needs truncated")
    dtype = logp_BxT.dtype
    B = logp_BxT.shape[0]
    mask_BxT = jnp.asarray(mask_BxT).astype(dtype)
    if cfg.mask_truncated:
        mask_BxT = mask_BxT * (1.0 - jnp.asarray(truncated_B).astype(dtype))[:, None]
    valid_BxT = mask_BxT > 0
    n_tokens_B = mask_BxT.sum(axis=1)
    # Padding may hold any log-prob (even -inf); zero it first so no inf or NaN reaches a product,
    # where a zero cotangent times an infinite derivative would still give NaN gradients.
    logp_BxT = jnp.where(valid_BxT, logp_BxT, 0.0)
    old_logp_BxT = jnp.where(valid_BxT, jax.lax.stop_gradient(old_logp_BxT), 0.0)
    adv_Bx1 = jax.lax.stop_gradient(jnp.asarray(advantages_B).astype(dtype))[:, None]

    log_ratio_BxT = logp_BxT - old_logp_BxT
    if cfg.importance_level == "sequence":
        seq_log_ratio_B = (log_ratio_BxT * mask_BxT).sum(axis=1) / jnp.maximum(n_tokens_B, 1.0)
        log_ratio_BxT = jnp.broadcast_to(seq_log_ratio_B[:, None], log_ratio_BxT.shape)
    ratio_BxT = jnp.exp(log_ratio_BxT)
    clipped_BxT = jnp.clip(ratio_BxT, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
    per_token_BxT = -jnp.minimum(ratio_BxT * adv_Bx1, clipped_BxT * adv_Bx1)
    if batch.is_weight is not None:
        per_token_BxT = per_token_BxT * jnp.where(valid_BxT, jax.lax.stop_gradient(batch.is_weight), 0.0)

    kl_BxT = None
    if cfg.beta > 0:
        ref_BxT = jnp.where(valid_BxT, jax.lax.stop_gradient(ref_logp_BxT), 0.0)
        kl_BxT = kl_penalty(logp_BxT, ref_BxT, cfg.kl_estimator)
        per_token_BxT = per_token_BxT + cfg.beta * kl_BxT
    per_token_BxT = jnp.where(valid_BxT, per_token_BxT, 0.0)

    token_sum_B = per_token_BxT.sum(axis=1)
    if cfg.loss_aggregation == "token_mean":
        loss_sum, denominator = token_sum_B.sum(), n_tokens_B.sum()
    elif cfg.loss_aggregation == "seq_mean_token_mean":
        has_tokens_B = n_tokens_B > 0
        loss_sum = jnp.where(has_tokens_B, token_sum_B / jnp.maximum(n_tokens_B, 1.0), 0.0).sum()
        denominator = has_tokens_B.sum().astype(dtype)
    else:  # seq_mean_token_sum_norm: every row counts, so the scale is independent of response lengths
        loss_sum = token_sum_B.sum()
        denominator = jnp.asarray(B * cfg.max_response_length, dtype)

    n_tok = n_tokens_B.sum()
    ratio_sg_BxT = jax.lax.stop_gradient(ratio_BxT)
    low_BxT = (ratio_sg_BxT < 1.0 - cfg.epsilon_low) & (adv_Bx1 < 0)
    high_BxT = (ratio_sg_BxT > 1.0 + cfg.epsilon_high) & (adv_Bx1 > 0)

    def token_sum(x_BxT: Array) -> Array:
        """Masked sum of a per-token quantity, outside the gradient."""
        return jax.lax.stop_gradient(jnp.where(valid_BxT, x_BxT, 0.0).astype(dtype).sum())

    metrics: Metrics = {
        "clip_frac_low": (token_sum(low_BxT), n_tok),
        "clip_frac_high": (token_sum(high_BxT), n_tok),
        "clip_frac": (token_sum(low_BxT | high_BxT), n_tok),
        "ratio_mean": (token_sum(ratio_sg_BxT), n_tok),
    }
    if kl_BxT is not None:
        metrics["kl_mean"] = (token_sum(kl_BxT), n_tok)
    if entropy_BxT is not None:
        metrics["entropy_mean"] = (token_sum(entropy_BxT), n_tok)
    metrics = {k: (s, jax.lax.stop_gradient(c)) for k, (s, c) in metrics.items()}
    return loss_sum, denominator, metrics


def tis_weights(old_logp_BxT: Array, sampler_logp_BxT: Array, mask_BxT: Array, cap: float) -> Array:
    """Truncated importance weights min(pi_old / pi_sampler, cap) per token (0 at padding), without gradient."""
    valid_BxT = jnp.asarray(mask_BxT) > 0
    log_w = jnp.where(valid_BxT, old_logp_BxT - sampler_logp_BxT, 0.0)
    return jax.lax.stop_gradient(jnp.where(valid_BxT, jnp.minimum(jnp.exp(log_w), cap), 0.0))


# A token whose learner/sampler probability ratio leaves [1 - band, 1 + band] counts as mismatched.
MISMATCH_BAND = 0.1


def sampler_mismatch(learner_logp_BxT: Array, sampler_logp_BxT: Array, mask_BxT: Array) -> Metrics:
    """How far the sampler's log-probs are from the learner's on the same tokens, as (sum, count) metrics.

    mismatch/abs_diff: mean |log p_learner - log p_sampler|; mismatch/ratio_outside: the share of tokens whose
    ratio p_learner / p_sampler leaves [0.9, 1.1]; mismatch/kl: the k3 estimate of KL(sampler || learner).
    """
    valid_BxT = jnp.asarray(mask_BxT) > 0
    d_BxT = jax.lax.stop_gradient(jnp.where(valid_BxT, learner_logp_BxT - sampler_logp_BxT, 0.0)).astype(jnp.float32)
    n = valid_BxT.sum().astype(jnp.float32)
    outside_BxT = valid_BxT & (jnp.abs(jnp.exp(d_BxT) - 1.0) > MISMATCH_BAND)
    k3_BxT = kl_penalty(jnp.zeros_like(d_BxT), d_BxT, "k3")  # samples from the sampler: log r = learner - sampler
    return {
        "mismatch/abs_diff": (jnp.abs(d_BxT).sum(), n),
        "mismatch/ratio_outside": (outside_BxT.astype(jnp.float32).sum(), n),
        "mismatch/kl": (jnp.where(valid_BxT, k3_BxT, 0.0).sum(), n),
    }


def sum_metrics(a: Metrics, b: Metrics) -> Metrics:
    """Add two micro-batches' (sum, count) metrics key by key."""
    return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in a}


def aggregate_metrics(metrics: Metrics) -> dict[str, Array]:
    """Turn (sum, count) metrics into means; a metric with count 0 reads 0, never NaN."""
    return {k: jnp.where(c > 0, s / jnp.maximum(c, 1), 0.0) for k, (s, c) in metrics.items()}
