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
    state = init_state(policy, opt, 0)
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
    cfg = OptimConfig(learning_rate=1.0, schedule="cosine", warmup_steps=2, max_grad_norm=0.5)
    opt = make_optimizer(cfg, total_updates=10)
    params = {"w": jnp.zeros(3)}
    state = opt.init(params)
    grads = {"w": jnp.array([3.0, 4.0, 0.0])}  # norm 5 -> clipped to 0.5
    updates, state = opt.update(grads, state, params)
    # First Adam step moves each coordinate by ~lr * sign(g); warmup lr at update 0 is 1/2.
    np.testing.assert_allclose(np.asarray(updates["w"])[:2], [-0.5, -0.5], rtol=1e-3)
    assert float(optax.tree.norm(updates)) > 0
