"""The jitted GRPO step: exact gradient accumulation, sharded == single device, non-finite updates skipped."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cme_jax.grpo import GRPOConfig
from cme_jax.models.logprobs import token_logprobs
from cme_jax.models.sharding import batch_sharding, make_mesh, replicated, weight_shardings
from cme_jax.models.transformer import ModelConfig, init_weights
from cme_jax.sampling import SamplingConfig
from cme_jax.train_step import (
    OptimConfig,
    StepConfig,
    StepShardings,
    build_step,
    init_state,
    join_rollout,
    make_optimizer,
    rollout,
    state_shardings,
    update,
)

CFG = ModelConfig(
    family="llama", vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)


def verifier_reward(params, ro, prompts, pmask, verifier):
    """Mean log-prob of each response under a frozen verifier of the same vocabulary."""
    toks = jnp.concatenate([prompts, ro.tokens], 1)
    mask = jnp.concatenate([pmask, ro.mask], 1)
    lp = token_logprobs(verifier, CFG, toks, mask, start=prompts.shape[1])
    r = lp.sum(1) / jnp.maximum(ro.mask.sum(1), 1)
    return r, {"reward/cme": r.mean()}


@pytest.fixture(scope="module")
def setup():
    policy = init_weights(CFG, jax.random.key(0), std=0.1)
    verifier = init_weights(CFG, jax.random.key(1), std=0.3)
    prompts = jnp.asarray(np.random.default_rng(0).integers(3, 64, (4, 6)), jnp.int32)
    pmask = jnp.asarray(np.arange(6)[None, :] >= np.array([[0], [1], [2], [0]]))
    return policy, verifier, prompts, pmask


def _rollout_batch(state, prompts, pmask, sc):
    stops = jnp.asarray([2], jnp.int32)
    ro = jax.jit(lambda st, p, m: rollout(st, p, m, stops, cfg=CFG, sc=sc, pad_id=0))(state, prompts, pmask)
    rewards, _ = verifier_reward(None, ro, jnp.repeat(prompts, 4, 0), jnp.repeat(pmask, 4, 0), _rollout_batch.verifier)
    return join_rollout(prompts, pmask, ro, sc.group_size), rewards


def test_four_micro_batches_give_the_same_update_as_one_batch(setup):
    """Plain SGD makes the update proportional to the accumulated gradient, so any accumulation error shows."""
    policy, verifier, prompts, pmask = setup
    grpo = GRPOConfig(beta=0.04, loss_aggregation="seq_mean_token_mean")
    scfg = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=4)
    opt = optax.sgd(1.0)
    _rollout_batch.verifier = verifier
    state = init_state(policy, opt, 0)
    batch, rewards = _rollout_batch(state, prompts, pmask, StepConfig(grpo=grpo, sampling=scfg))
    assert batch.tokens.shape[0] == 16 and bool(batch.response_mask.any())
    results = []
    for micro in (1, 4):
        sc = StepConfig(grpo=grpo, sampling=scfg, micro_batches=micro, num_iterations=2)
        step = jax.jit(lambda st, b, r, ref, sc=sc: update(st, b, r, ref, cfg=CFG, sc=sc, optimizer=opt))
        new, metrics = step(init_state(policy, opt, 0), batch, rewards, policy)
        results.append((new, metrics))
    (a, ma), (b, mb) = results
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
    for key in ("loss", "grad_norm", "kl_mean", "clip_frac", "entropy_mean"):
        np.testing.assert_allclose(float(ma[key]), float(mb[key]), rtol=1e-4, atol=1e-6)
    # The update moved the weights (num_iterations=2 makes the second pass see ratios != 1).
    assert max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(policy))) > 1e-4


def test_non_finite_update_is_skipped_and_state_unchanged(setup):
    policy, verifier, prompts, pmask = setup
    scfg = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=4)
    sc = StepConfig(grpo=GRPOConfig(), sampling=scfg)
    opt = make_optimizer(OptimConfig(learning_rate=1e-2), 10)
    _rollout_batch.verifier = verifier
    state = init_state(policy, opt, 0)
    batch, rewards = _rollout_batch(state, prompts, pmask, sc)
    bad = rewards.at[3].set(jnp.nan)  # one NaN reward poisons its group's advantages and the loss
    new, metrics = jax.jit(lambda st, b, r: update(st, b, r, None, cfg=CFG, sc=sc, optimizer=opt))(state, batch, bad)
    assert float(metrics["skipped_updates"]) == 1.0
    for x, y in zip(jax.tree.leaves(new.params), jax.tree.leaves(policy)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(state.opt_state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(new.step) == 1


@pytest.mark.devices(8)  # the whole step with rows over data x fsdp and weights over fsdp x tensor at once
def test_sharded_fused_step_equals_single_device(setup):
    policy, verifier, prompts, pmask = setup
    scfg = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=4)
    sc = StepConfig(grpo=GRPOConfig(beta=0.04), sampling=scfg, minibatches=2)
    # SGD keeps the update proportional to the gradient; Adam's first step would turn float32 reduction-order
    # noise in near-zero gradients into +-lr differences.
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    stops = jnp.asarray([2], jnp.int32)

    ref = jax.tree.map(jnp.copy, policy)  # the state is donated, so the reference must not share its buffers
    single = build_step(CFG, sc, opt, pad_id=0, reward_fn=verifier_reward)
    s1, m1, r1 = single.fused(init_state(jax.tree.map(jnp.copy, policy), opt, 0), prompts, pmask, stops, ref, verifier)

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    wsh = weight_shardings(CFG, mesh)
    rep = replicated(mesh)
    state = init_state(jax.tree.map(jnp.copy, policy), opt, 0)  # donated below: not the fixture's buffers
    ssh = state_shardings(state, opt, wsh, rep)
    shard = StepShardings(state=ssh, rows=batch_sharding(mesh, 1), replicated=rep, ref=wsh, frozen=wsh)
    sharded = build_step(CFG, sc, opt, pad_id=0, reward_fn=verifier_reward, shardings=shard)
    put = lambda tree, sh: jax.tree.map(jax.device_put, tree, sh)
    s8, m8, r8 = sharded.fused(
        put(state, ssh), put(prompts, shard.rows), put(pmask, shard.rows), stops, put(ref, wsh), put(verifier, wsh)
    )
    np.testing.assert_array_equal(np.asarray(r8.tokens), np.asarray(r1.tokens))
    assert s8.params.layers.w_up.sharding == wsh.layers.w_up
    for x, y in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-4, atol=1e-6)


def test_optimizer_schedule_and_clipping():
    """Adam's first step is g / (|g| + eps) (bias-corrected moments are g and g^2), scaled by the learning rate:
    with eps = 1 it depends on the size of g, so the step shows whether the gradient was clipped first."""
    grads = {"w": jnp.array([3.0, 4.0, 0.0])}  # norm 5 -> clipped to norm 0.5: [0.3, 0.4, 0]

    def first_update(max_grad_norm):
        cfg = OptimConfig(learning_rate=1.0, schedule="cosine", warmup_steps=2, max_grad_norm=max_grad_norm, eps=1.0)
        opt = make_optimizer(cfg, total_updates=10)
        params = {"w": jnp.zeros(3)}
        updates, _ = opt.update(grads, opt.init(params), params)
        return np.asarray(updates["w"])

    lr = 0.5  # warmup: update 0 of 2 runs at peak / warmup_steps
    np.testing.assert_allclose(first_update(0.5), [-lr * 0.3 / 1.3, -lr * 0.4 / 1.4, 0.0], rtol=1e-5)
    np.testing.assert_allclose(first_update(0.0), [-lr * 3.0 / 4.0, -lr * 4.0 / 5.0, 0.0], rtol=1e-5)  # no clipping


# ---------------------------------------------------------------------------------------------------------
# An injected loss, one traced update body, the sampler/learner mismatch and its correction


def reinforce_loss(batch, cfg):
    """Plain REINFORCE with the group mean as baseline (advantage_mode group_mean): -A * log p, token mean.

    Written outside the package, as a research fork would: it reads only the LossBatch.
    """
    mask = batch.mask.astype(jnp.float32)
    adv = jax.lax.stop_gradient(batch.advantages)[:, None]
    per_token = -adv * jnp.where(mask > 0, batch.logp, 0.0)
    n = mask.sum()
    mean_logp = (jax.lax.stop_gradient(jnp.where(mask > 0, batch.logp, 0.0)).sum(), n)
    return per_token.sum(), n, {"reinforce/logp_mean": mean_logp}


def test_a_loss_from_outside_the_package_trains(setup):
    policy, verifier, prompts, pmask = setup
    scfg = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=4)
    sc = StepConfig(grpo=GRPOConfig(advantage_mode="group_mean"), sampling=scfg)
    opt = optax.adam(3e-2)
    fns = build_step(CFG, sc, opt, pad_id=0, reward_fn=verifier_reward, loss_fn=reinforce_loss)
    state = init_state(jax.tree.map(jnp.copy, policy), opt, 0)
    stops = jnp.asarray([2], jnp.int32)
    rewards = []
    for _ in range(30):
        state, metrics, _ = fns.fused(state, prompts, pmask, stops, None, verifier)
        rewards.append(float(metrics["reward/mean"]))
    assert "reinforce/logp_mean" in metrics and "clip_frac" not in metrics  # the GRPO loss never ran
    first, last = np.mean(rewards[:8]), np.mean(rewards[-8:])
    noise = np.std(rewards[:8]) / np.sqrt(8) + np.std(rewards[-8:]) / np.sqrt(8)
    assert last - first > max(4 * noise, 0.2), rewards


def _count_calls(jaxpr, name: str) -> int:
    """Equations of a nested jit named `name`, in a jaxpr and every sub-jaxpr (scan and cond bodies, calls)."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.params.get("name") == name:
            n += 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, list | tuple) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _count_calls(inner, name)
    return n


def test_the_update_traces_forward_and_backward_once(setup):
    policy, verifier, prompts, pmask = setup
    scfg = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=4)
    opt = optax.sgd(0.1)
    _rollout_batch.verifier = verifier
    state = init_state(policy, opt, 0)
    batch, rewards = _rollout_batch(state, prompts, pmask, StepConfig(grpo=GRPOConfig(), sampling=scfg))
    for iters, minibatches, micro in ((1, 1, 1), (2, 2, 2)):
        sc = StepConfig(
            grpo=GRPOConfig(beta=0.04),
            sampling=scfg,
            num_iterations=iters,
            minibatches=minibatches,
            micro_batches=micro,
        )
        fn = lambda st, b, r, ref, sc=sc: update(st, b, r, ref, cfg=CFG, sc=sc, optimizer=opt)
        jaxpr = jax.make_jaxpr(fn)(state, batch, rewards, policy).jaxpr
        assert _count_calls(jaxpr, "microbatch_grad") == 1, (iters, minibatches, micro)


def _one_update(policy, batch, rewards, grpo, compute_dtype="float32"):
    scfg = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=4)
    sc = StepConfig(grpo=grpo, sampling=scfg, compute_dtype=compute_dtype)
    opt = optax.sgd(0.0)
    fn = jax.jit(lambda st, b, r: update(st, b, r, None, cfg=CFG, sc=sc, optimizer=opt))
    return fn(init_state(policy, opt, 0), batch, rewards)[1]


def test_sampler_learner_mismatch_is_measured_and_visible_in_bfloat16(setup):
    policy, verifier, prompts, pmask = setup
    _rollout_batch.verifier = verifier
    metrics = {}
    for dtype in ("float32", "bfloat16"):
        scfg = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=4)
        sc = StepConfig(grpo=GRPOConfig(), sampling=scfg, compute_dtype=dtype)
        opt = optax.sgd(0.0)
        batch, rewards = _rollout_batch(init_state(policy, opt, 0), prompts, pmask, sc)
        metrics[dtype] = _one_update(policy, batch, rewards, GRPOConfig(), dtype)
    f32, bf16 = metrics["float32"], metrics["bfloat16"]
    assert float(f32["mismatch/abs_diff"]) < 1e-5 and float(f32["mismatch/ratio_outside"]) == 0.0
    assert abs(float(f32["mismatch/kl"])) < 1e-8
    # bfloat16 has 8 bits of mantissa: the sampler's cached decode and the learner's full forward round apart.
    assert float(bf16["mismatch/abs_diff"]) > 1e-3 and float(bf16["mismatch/kl"]) > 1e-7


def test_truncated_importance_weights_are_min_of_the_ratio_and_the_cap(setup):
    from cme_jax.grpo import tis_weights

    policy, verifier, prompts, pmask = setup
    _rollout_batch.verifier = verifier
    scfg = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=4)
    batch, rewards = _rollout_batch(init_state(policy, optax.sgd(0.0), 0), prompts, pmask, StepConfig(sampling=scfg))
    # A sampler whose log-probs are off by known amounts, so the weights are far from 1 and some are capped.
    shift = np.random.default_rng(0).normal(0.0, 0.5, batch.sampler_logp.shape).astype(np.float32)
    off = batch.replace(sampler_logp=batch.sampler_logp + shift)
    P = batch.tokens.shape[1] - batch.response_mask.shape[1]
    learner = np.asarray(token_logprobs(policy, CFG, batch.tokens, batch.mask, start=P))
    mask = np.asarray(batch.response_mask)
    want_w = np.minimum(np.exp(learner - np.asarray(off.sampler_logp)), 1.5)[mask]
    got_w = np.asarray(tis_weights(jnp.asarray(learner), off.sampler_logp, batch.response_mask, 1.5))[mask]
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5)
    assert (want_w == 1.5).any() and (want_w < 1.0).any()

    m = _one_update(policy, off, rewards, GRPOConfig(sampler_correction="tis", tis_cap=1.5))
    np.testing.assert_allclose(float(m["tis/weight_mean"]), want_w.mean(), rtol=1e-4)
    np.testing.assert_allclose(float(m["tis/capped_frac"]), (want_w >= 1.5).mean(), rtol=1e-6)
    np.testing.assert_allclose(
        float(m["mismatch/abs_diff"]), np.abs(learner - np.asarray(off.sampler_logp))[mask].mean(), rtol=1e-4
    )
    # The weights scale each token's policy-gradient term: with them the loss differs from the uncorrected one.
    plain = _one_update(policy, off, rewards, GRPOConfig())
    assert "tis/weight_mean" not in plain and float(plain["loss"]) != pytest.approx(float(m["loss"]), rel=1e-3)
    with pytest.raises(ValueError, match="old_logp=recompute"):
        GRPOConfig(sampler_correction="tis", old_logp="sampler")
