"""GRPO advantages, KL estimators and policy loss against independent numpy references."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cme_jax.grpo import (
    GRPOConfig,
    LossBatch,
    aggregate_metrics,
    group_advantages,
    kl_penalty,
    sum_metrics,
)
from cme_jax.grpo import policy_loss as batch_loss


def policy_loss(logp, old, ref, adv, mask, cfg, truncated_B=None, entropy_BxT=None):
    """The GRPO loss from positional arrays (a LossBatch with the sampler's log-probs equal to the old ones)."""
    batch = LossBatch(
        logp=logp,
        old_logp=old,
        sampler_logp=old,
        advantages=adv,
        mask=mask,
        truncated=truncated_B,
        ref_logp=ref,
        entropy=entropy_BxT,
    )
    return batch_loss(batch, cfg)


AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (finite differences need it)."""
    with jax.enable_x64(True):
        yield


# ----------------------------------------------------------------------------- numpy references


def np_advantages(rewards, G, mode, eps=1e-6):
    """Reference advantages written group by group with numpy."""
    r = np.asarray(rewards, np.float64).reshape(-1, G)
    out = np.zeros_like(r)
    batch_std = np.std(r.reshape(-1), ddof=1)
    zero = 0
    for p in range(r.shape[0]):
        g = r[p]
        if g.max() == g.min():
            zero += 1
            continue
        if mode == "group_std":
            out[p] = (g - g.mean()) / (np.std(g, ddof=1) + eps)
        elif mode == "group_mean":
            out[p] = g - g.mean()
        elif mode == "batch_std":
            out[p] = (g - g.mean()) / (batch_std + eps)
        elif mode == "rloo":
            out[p] = [g[i] - np.delete(g, i).mean() for i in range(G)]
    return out.reshape(-1), zero


def np_kl(logp, ref, estimator):
    """Schulman's estimators of KL(pi || ref) from log-probs of tokens sampled from pi."""
    logp, ref = np.asarray(logp, np.float64), np.asarray(ref, np.float64)
    if estimator == "k1":
        return logp - ref
    if estimator == "k2":
        return 0.5 * (logp - ref) ** 2
    ratio = np.exp(ref) / np.exp(logp)
    return ratio - np.log(ratio) - 1


def np_policy_loss(logp, old, ref, adv, mask, cfg, truncated=None):
    """Reference loss and metric means, token by token in plain Python/numpy."""
    logp, old = np.asarray(logp, np.float64), np.asarray(old, np.float64)
    mask = np.asarray(mask, np.float64).copy()
    adv = np.asarray(adv, np.float64)
    if cfg.mask_truncated:
        mask[np.asarray(truncated, bool)] = 0.0
    B, T = logp.shape
    per = np.zeros((B, T))
    ratios = np.zeros((B, T))
    kls = np.zeros((B, T))
    for b in range(B):
        n = mask[b].sum()
        seq_ratio = np.exp(((logp[b] - old[b]) * mask[b]).sum() / n) if n > 0 else 1.0
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = seq_ratio if cfg.importance_level == "sequence" else np.exp(logp[b, t] - old[b, t])
            clipped = min(max(ratio, 1 - cfg.epsilon_low), 1 + cfg.epsilon_high)
            per[b, t] = -min(ratio * adv[b], clipped * adv[b])
            if cfg.beta > 0:
                kls[b, t] = np_kl(logp[b, t], ref[b, t], cfg.kl_estimator)
                per[b, t] += cfg.beta * kls[b, t]
            ratios[b, t] = ratio
    n_b = mask.sum(1)
    if cfg.loss_aggregation == "token_mean":
        loss = per.sum() / n_b.sum()
    elif cfg.loss_aggregation == "seq_mean_token_mean":
        seq = [per[b].sum() / n_b[b] for b in range(B) if n_b[b] > 0]
        loss = sum(seq) / len(seq)
    else:
        loss = per.sum() / (B * cfg.max_response_length)
    on = mask > 0
    low = on & (ratios < 1 - cfg.epsilon_low) & (adv[:, None] < 0)
    high = on & (ratios > 1 + cfg.epsilon_high) & (adv[:, None] > 0)
    metrics = {
        "clip_frac_low": low.sum() / on.sum(),
        "clip_frac_high": high.sum() / on.sum(),
        "clip_frac": (low | high).sum() / on.sum(),
        "ratio_mean": ratios[on].mean(),
    }
    if cfg.beta > 0:
        metrics["kl_mean"] = kls[on].mean()
    return loss, metrics


def make_batch(seed, B=6, T=7, dtype=np.float32, empty_rows=()):
    """Random log-probs near each other, a ragged right-padded mask, advantages of both signs."""
    rng = np.random.default_rng(seed)
    old = -rng.uniform(0.1, 3.0, (B, T))
    logp = old + rng.normal(0.0, 0.3, (B, T))
    ref = old + rng.normal(0.0, 0.3, (B, T))
    lengths = rng.integers(1, T + 1, B)
    for b in empty_rows:
        lengths[b] = 0
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(dtype)
    adv = rng.normal(0.0, 1.0, B)
    return [np.asarray(x, dtype) for x in (logp, old, ref, adv)] + [mask]


_jit_loss = jax.jit(policy_loss, static_argnames=("cfg",))


def run_loss(batch, cfg, truncated=None, entropy=None):
    """policy_loss on numpy inputs, returning floats and aggregated metric means."""
    logp, old, ref, adv, mask = (jnp.asarray(x) for x in batch)
    s, d, m = _jit_loss(
        logp,
        old,
        ref,
        adv,
        mask,
        cfg,
        truncated_B=None if truncated is None else jnp.asarray(truncated),
        entropy_BxT=None if entropy is None else jnp.asarray(entropy),
    )
    return float(s), float(d), {k: float(v) for k, v in aggregate_metrics(m).items()}


# ----------------------------------------------------------------------------- advantages

REWARDS = np.array([1.0, 2.0, 3.0, 4.0, 0.7, 0.7, 0.7, 0.7, 0.0, 0.0, 1.0, 1.0, -2.5, 3.0, 0.5, 0.1], np.float32)


@pytest.mark.parametrize("mode", ["group_std", "group_mean", "batch_std", "rloo"])
def test_advantage_modes_match_numpy(mode):
    want, zero = np_advantages(REWARDS, 4, mode)
    adv, stats = group_advantages(jnp.asarray(REWARDS), 4, mode)
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-6)
    assert zero == 1
    assert int(stats["zero_spread_groups"]) == 1 and stats["zero_spread_groups"].dtype == jnp.int32
    assert np.all(np.asarray(adv)[4:8] == 0.0)  # exactly zero, not 1e-8
    np.testing.assert_allclose(float(stats["adv_mean"]), want.mean(), atol=1e-6)
    np.testing.assert_allclose(float(stats["adv_std"]), want.std(), rtol=1e-5)
    group_std = np.std(REWARDS.reshape(-1, 4).astype(np.float64), axis=1, ddof=1).mean()
    np.testing.assert_allclose(float(stats["reward_std_in_group_mean"]), group_std, rtol=1e-5)


def test_rloo_closed_form_and_group_std_scale():
    r = np.array([0.2, -1.0, 3.5, 0.9, 2.0, 4.0], np.float32)  # G=3, two groups
    adv, _ = group_advantages(jnp.asarray(r), 3, "rloo")
    g = r.reshape(2, 3).astype(np.float64)
    loo = (g.sum(1, keepdims=True) - g) / 2.0
    np.testing.assert_allclose(np.asarray(adv), (g - loo).reshape(-1), rtol=1e-5)
    std_adv, _ = group_advantages(jnp.asarray(r), 3, "group_std", eps=0.0)
    np.testing.assert_allclose(np.std(np.asarray(std_adv).reshape(2, 3), axis=1, ddof=1), 1.0, rtol=1e-5)


def test_group_advantages_jit_all_zero_spread_and_errors():
    f = jax.jit(group_advantages, static_argnames=("group_size", "mode"))
    adv, stats = f(jnp.full((8,), -1.7, jnp.float32), group_size=4, mode="batch_std")
    assert np.all(np.asarray(adv) == 0.0) and int(stats["zero_spread_groups"]) == 2
    assert np.isfinite(float(stats["adv_std"]))
    adv1, stats1 = group_advantages(jnp.arange(3.0), 1, "group_std")  # G=1: every group is zero-spread
    assert np.all(np.asarray(adv1) == 0.0) and int(stats1["zero_spread_groups"]) == 3
    with pytest.raises(ValueError, match="rloo"):
        group_advantages(jnp.arange(3.0), 1, "rloo")
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(jnp.arange(6.0), 4)
    with pytest.raises(ValueError, match="mode"):
        group_advantages(jnp.arange(4.0), 2, "median")


# ----------------------------------------------------------------------------- KL


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators(estimator):
    rng = np.random.default_rng(0)
    logp = -rng.uniform(0.1, 4.0, (3, 5))
    ref = -rng.uniform(0.1, 4.0, (3, 5))
    got = kl_penalty(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32), estimator)
    np.testing.assert_allclose(np.asarray(got), np_kl(logp, ref, estimator), rtol=1e-4, atol=1e-5)
    same = kl_penalty(jnp.asarray(logp, jnp.float32), jnp.asarray(logp, jnp.float32), estimator)
    assert np.all(np.asarray(same) == 0.0)
    if estimator != "k1":
        assert np.all(np.asarray(got) >= 0.0)
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(jnp.zeros(2), jnp.zeros(2), "k4")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_term_in_loss(estimator):
    logp, old, ref, _, mask = make_batch(1)
    adv = np.zeros(logp.shape[0], np.float32)  # surrogate vanishes: loss is beta * mean KL
    cfg = GRPOConfig(beta=0.04, kl_estimator=estimator, loss_aggregation="token_mean")
    s, d, m = run_loss((logp, old, ref, adv, mask), cfg)
    kl = np_kl(logp, ref, estimator)[mask > 0]
    np.testing.assert_allclose(s / d, 0.04 * kl.mean(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(m["kl_mean"], kl.mean(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(*(jnp.asarray(x) for x in (logp, old)), None, jnp.asarray(adv), jnp.asarray(mask), cfg)


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_aggregations_match_numpy(aggregation, level):
    batch = make_batch(2)
    cfg = GRPOConfig(loss_aggregation=aggregation, importance_level=level, max_response_length=11, epsilon_high=0.28)
    s, d, m = run_loss(batch, cfg)
    want, want_m = np_policy_loss(*batch, cfg)
    np.testing.assert_allclose(s / d, want, rtol=1e-5, atol=1e-7)
    for k, v in want_m.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    n_rows, n_tok = batch[4].shape[0], batch[4].sum()
    want_d = {"token_mean": n_tok, "seq_mean_token_mean": n_rows, "seq_mean_token_sum_norm": n_rows * 11}
    assert d == want_d[aggregation]


@pytest.mark.parametrize("eps_high", [0.2, 0.28])
def test_clipping_active_on_both_sides(eps_high):
    cfg = GRPOConfig(epsilon_low=0.2, epsilon_high=eps_high, loss_aggregation="token_mean")
    old = np.full((3, 3), -1.0, np.float32)
    ratio = np.array([[1.5, 1.6, 1.1], [0.5, 0.6, 1.5], [0.5, 1.5, 1.0]])  # last row: A=0, never clipped
    logp = (old + np.log(ratio)).astype(np.float32)
    adv = np.array([1.0, -1.0, 0.0], np.float32)
    mask = np.ones((3, 3), np.float32)
    s, d, m = run_loss((logp, old, old, adv, mask), cfg)
    hi = 1 + eps_high
    # A>0 above the band: gain capped at (1+eps_high)*A; A<0 below the band: capped at (1-eps_low)*A;
    # A<0 with ratio above the band is never clipped (the pessimistic branch keeps the full ratio).
    per_token = [-hi, -hi, -1.1, 0.8, 0.8, 1.5, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(s, sum(per_token), rtol=1e-5)
    assert d == 9
    np.testing.assert_allclose(m["clip_frac_high"], 2 / 9, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac_low"], 2 / 9, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac"], 4 / 9, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_mean"], ratio.mean(), rtol=1e-5)
    # The clipped tokens carry no gradient; the unclipped ones carry -A * ratio.
    consts = [jnp.asarray(x) for x in (old, old, adv, mask)]
    g = jax.jit(jax.grad(lambda lp: policy_loss(lp, *consts, cfg)[0]))(jnp.asarray(logp))
    np.testing.assert_allclose(np.asarray(g), [[0, 0, -1.1], [0, 0, 1.5], [0, 0, 0]], rtol=1e-5, atol=1e-7)


def test_sequence_level_ratio_is_geometric_mean():
    old = np.array([[-1.0, -2.0, -0.5, -3.0]], np.float32)
    delta = np.array([[0.3, -0.1, 0.2, 5.0]])  # last position is padding and must be ignored
    logp = (old + delta).astype(np.float32)
    mask = np.array([[1, 1, 1, 0]], np.float32)
    cfg = GRPOConfig(importance_level="sequence", epsilon_low=10.0, epsilon_high=10.0)
    s, d, m = run_loss((logp, old, old, np.array([2.0], np.float32), mask), cfg)
    seq_ratio = np.exp(delta[0, :3].mean())
    np.testing.assert_allclose(m["ratio_mean"], seq_ratio, rtol=1e-6)
    np.testing.assert_allclose(s / d, -2.0 * seq_ratio, rtol=1e-6)
    # Per-token ratios would differ token by token; here one clip decision covers the whole sequence.
    cfg = dataclasses.replace(cfg, epsilon_low=0.2, epsilon_high=0.05)
    _, _, m = run_loss((logp, old, old, np.array([2.0], np.float32), mask), cfg)
    assert m["clip_frac_high"] == 1.0


def test_truncated_rows_are_masked():
    batch = make_batch(3, B=4)
    truncated = np.array([False, True, False, True])
    cfg = GRPOConfig(mask_truncated=True)
    s, d, m = run_loss(batch, cfg, truncated=truncated)
    want, want_m = np_policy_loss(*batch, cfg, truncated=truncated)
    np.testing.assert_allclose(s / d, want, rtol=1e-5)
    assert d == 2
    for k, v in want_m.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    masked = list(batch)
    masked[4] = batch[4] * ~truncated[:, None]
    s2, d2, _ = run_loss(masked, GRPOConfig())
    np.testing.assert_allclose((s, d), (s2, d2), rtol=1e-6)
    s3, d3, _ = run_loss(batch, GRPOConfig(), truncated=truncated)  # mask_truncated off: ignored
    assert (s3, d3) == run_loss(batch, GRPOConfig())[:2] and d3 == 4
    with pytest.raises(ValueError, match="truncated"):
        run_loss(batch, cfg)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_rows_without_tokens_give_no_nan_and_are_not_counted(aggregation):
    logp, old, ref, adv, mask = make_batch(4, empty_rows=(1, 3))
    logp[mask == 0] = -np.inf  # padding may hold anything
    old[mask == 0] = np.nan
    ref[mask == 0] = np.nan
    cfg = GRPOConfig(loss_aggregation=aggregation, beta=0.1, importance_level="sequence")
    ent = np.where(mask > 0, 1.0, np.nan).astype(np.float32)
    s, d, m = run_loss((logp, old, ref, adv, mask), cfg, entropy=ent)
    assert np.isfinite(s) and all(np.isfinite(v) for v in m.values())
    assert m["entropy_mean"] == 1.0
    clean = [np.where(mask > 0, x, -1.0).astype(np.float32) for x in (logp, old, ref)]
    want, _ = np_policy_loss(*clean, adv, mask, cfg)
    np.testing.assert_allclose(s / d, want, rtol=1e-5)
    if aggregation == "seq_mean_token_mean":
        assert d == mask.shape[0] - 2
    consts = [jnp.asarray(x) for x in (old, ref, adv, mask)]
    g = jax.jit(jax.grad(lambda lp: policy_loss(lp, *consts, cfg)[0]))(jnp.asarray(logp))
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[mask == 0] == 0.0)
    # A micro-batch made only of empty rows: zero sums, zero counts, metrics read 0.
    s0, d0, m0 = run_loss((logp[[1, 3]], old[[1, 3]], ref[[1, 3]], adv[[1, 3]], mask[[1, 3]]), cfg)
    assert s0 == 0.0 and all(v == 0.0 for v in m0.values())
    assert d0 == (2 * cfg.max_response_length if aggregation == "seq_mean_token_sum_norm" else 0)


CONFIGS = [
    GRPOConfig(loss_aggregation="token_mean"),
    GRPOConfig(loss_aggregation="seq_mean_token_mean", beta=0.05, kl_estimator="k3", epsilon_high=0.28),
    GRPOConfig(loss_aggregation="seq_mean_token_sum_norm", max_response_length=9, beta=0.1, kl_estimator="k2"),
    GRPOConfig(importance_level="sequence", beta=0.02, kl_estimator="k1"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.loss_aggregation}-{c.importance_level}")
def test_gradient_matches_finite_differences(x64, cfg):
    logp, old, ref, adv, mask = (jnp.asarray(x) for x in make_batch(5, B=4, T=5, dtype=np.float64))
    assert logp.dtype == jnp.float64

    @jax.jit
    def f(lp, o, r, a):
        s, d, _ = policy_loss(lp, o, r, a, mask, cfg)
        return s / d

    grads = jax.grad(f, argnums=(0, 1, 2, 3))(logp, old, ref, adv)
    h = 1e-6
    fd = np.zeros(logp.shape)
    base = np.asarray(logp)
    for idx in np.ndindex(*logp.shape):
        e = np.zeros(logp.shape)
        e[idx] = h
        fd[idx] = float(f(jnp.asarray(base + e), old, ref, adv)) - float(f(jnp.asarray(base - e), old, ref, adv))
        fd[idx] /= 2 * h
    np.testing.assert_allclose(np.asarray(grads[0]), fd, rtol=1e-5, atol=1e-8)
    assert np.abs(fd).max() > 1e-3  # the check is not vacuous
    for g in grads[1:]:  # old log-probs, reference and advantages are constants
        assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.loss_aggregation}-{c.importance_level}")
def test_micro_batch_accumulation_is_exact(cfg):
    cfg = dataclasses.replace(cfg, mask_truncated=True)
    logp, old, ref, adv, mask = (jnp.asarray(x) for x in make_batch(6, B=16, T=6, empty_rows=(2, 9)))
    truncated = jnp.asarray(np.arange(16) % 5 == 0)

    @jax.jit
    def value_and_grad(lp, o, r, a, mk, tr):
        """Gradient of loss_sum alone, with the denominator and metrics as aux outputs."""
        part = lambda x: (lambda s, d, m: (s, (d, m)))(*policy_loss(x, o, r, a, mk, cfg, tr))
        return jax.value_and_grad(part, has_aux=True)(lp)

    @jax.jit
    def full_loss_and_grad(lp):
        """Gradient of the full batch's loss_sum / denominator, computed in one piece."""
        full = lambda x: (lambda s, d, m: (s / d, (s, d, m)))(*policy_loss(x, old, ref, adv, mask, cfg, truncated))
        return jax.grad(full, has_aux=True)(lp)

    grad_full, (s_full, d_full, m_full) = full_loss_and_grad(logp)

    sums, dens, grads, metrics = [], [], [], None
    for i in range(4):
        sl = slice(4 * i, 4 * i + 4)
        (s, (d, m)), g = value_and_grad(logp[sl], old[sl], ref[sl], adv[sl], mask[sl], truncated[sl])
        sums.append(float(s))
        dens.append(float(d))
        grads.append(np.asarray(g))
        metrics = m if metrics is None else sum_metrics(metrics, m)
    np.testing.assert_allclose(sum(sums) / sum(dens), float(s_full) / float(d_full), rtol=1e-6)
    assert sum(dens) == float(d_full)
    np.testing.assert_allclose(np.concatenate(grads) / sum(dens), np.asarray(grad_full), rtol=1e-5, atol=1e-9)
    got_m, want_m = aggregate_metrics(metrics), aggregate_metrics(m_full)
    assert got_m.keys() == want_m.keys()
    for k in want_m:
        np.testing.assert_allclose(float(got_m[k]), float(want_m[k]), rtol=1e-6, err_msg=k)


def test_jit_matches_eager_and_entropy_metric():
    batch = make_batch(7)
    cfg = GRPOConfig(beta=0.04)
    ent = np.random.default_rng(0).uniform(0, 3, batch[0].shape).astype(np.float32)
    args = [jnp.asarray(x) for x in batch]
    eager = policy_loss(*args, cfg, entropy_BxT=jnp.asarray(ent))
    jitted = jax.jit(policy_loss, static_argnames=("cfg",))(*args, cfg, entropy_BxT=jnp.asarray(ent))
    np.testing.assert_allclose(float(eager[0]), float(jitted[0]), rtol=1e-6)
    np.testing.assert_allclose(float(aggregate_metrics(jitted[2])["entropy_mean"]), ent[batch[4] > 0].mean(), rtol=1e-5)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"epsilon_low": -0.1}, "epsilon_low"),
        ({"epsilon_high": -1}, "epsilon_high"),
        ({"beta": -0.01}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"max_response_length": 0}, "max_response_length"),
        ({"max_response_length": 2.5}, "max_response_length"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"importance_level": "batch"}, "importance_level"),
        ({"loss_aggregation": "sum"}, "loss_aggregation"),
        ({"advantage_mode": "std"}, "advantage_mode"),
        ({"advantage_eps": -1e-6}, "advantage_eps"),
        ({"mask_truncated": "yes"}, "mask_truncated"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        GRPOConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_config_defaults_and_hashable():
    cfg = GRPOConfig()
    assert (cfg.epsilon_low, cfg.epsilon_high, cfg.beta, cfg.kl_estimator) == (0.2, 0.2, 0.0, "k3")
    assert (cfg.importance_level, cfg.loss_aggregation, cfg.max_response_length) == (
        "token",
        "seq_mean_token_mean",
        512,
    )
    assert (cfg.mask_truncated, cfg.advantage_mode, cfg.advantage_eps) == (False, "group_std", 1e-6)
    assert hash(cfg) == hash(GRPOConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta = 1.0  # type: ignore[misc]
