"""Decoder parity with transformers (PyTorch) for every family, KV-cache decode, token log-probs, sharding."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tiny_hf import FAMILIES, hf_logits, left_padded_batch, tiny_model

from cme_jax.models import decode_layout
from cme_jax.models.logprobs import chunk_length, token_logprobs, token_stats
from cme_jax.models.sharding import make_mesh, weight_shardings
from cme_jax.models.transformer import default_positions, forward, init_cache, logits_from_hidden
from cme_jax.models.weights import save_hf_checkpoint
from cme_jax.sources import load_model

LENGTHS = [12, 8, 5]  # three rows, two of them left-padded


def rel_err(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask].max() / np.abs(b[mask]).max())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(family name, torch model, cme_jax LoadedModel read back from a saved safetensors directory)."""
    hf = tiny_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, load_model(str(path), tokenizer=False)


def test_logits_match_transformers(family):
    name, hf, m = family
    toks, mask = left_padded_batch(m.cfg.vocab_size, LENGTHS, 12)
    ref = hf_logits(hf, toks, mask)
    pos = default_positions(jnp.asarray(mask))
    ours, _ = forward(m.weights, m.cfg, jnp.asarray(toks), pos, jnp.asarray(mask))
    assert rel_err(np.asarray(ours), ref, mask) < 1e-4, name


def test_kv_cache_decode_equals_full_forward(family):
    _name, _, m = family
    toks, mask = left_padded_batch(m.cfg.vocab_size, LENGTHS, 12, seed=1)
    pos = default_positions(jnp.asarray(mask))
    full, _ = forward(m.weights, m.cfg, jnp.asarray(toks), pos, jnp.asarray(mask))
    cache = init_cache(m.cfg, len(LENGTHS), 16)
    prefill = 7  # past the padding of every row, so decode steps cover the sliding window too
    logits, cache = forward(m.weights, m.cfg, toks[:, :prefill], pos[:, :prefill], mask[:, :prefill], cache)
    steps = [np.asarray(logits)]
    for t in range(prefill, 12):
        logits, cache = forward(m.weights, m.cfg, toks[:, t : t + 1], pos[:, t : t + 1], mask[:, t : t + 1], cache)
        steps.append(np.asarray(logits))
    assert int(cache.length) == 12
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[mask], np.asarray(full)[mask], atol=2e-5, rtol=0)


def test_decode_layouts_equal_the_stacked_forward(family):
    """Per-layer and fused weights, run unrolled with per-layer cache buffers, give the stacked model's logits."""
    _name, _, m = family
    toks, mask = left_padded_batch(m.cfg.vocab_size, LENGTHS, 12, seed=6)
    pos = default_positions(jnp.asarray(mask))
    full, _ = forward(m.weights, m.cfg, jnp.asarray(toks), pos, jnp.asarray(mask))
    for layout in ("per_layer", "fused"):
        weights = decode_layout.to_layout(m.weights, m.cfg, layout)
        cache = decode_layout.split_cache(init_cache(m.cfg, len(LENGTHS), 16))
        steps = []
        for a, b in [(0, 7), *((t, t + 1) for t in range(7, 12))]:
            args = (toks[:, a:b], pos[:, a:b], mask[:, a:b], cache)
            h, cache = decode_layout.forward_unrolled(weights, m.cfg, layout, *args)
            steps.append(np.asarray(logits_from_hidden(weights, m.cfg, h)))
        got = np.concatenate(steps, axis=1)[mask]
        np.testing.assert_allclose(got, np.asarray(full)[mask], atol=2e-5, rtol=0, err_msg=layout)


def test_token_logprobs_equal_log_softmax_gather(family):
    _name, hf, m = family
    toks, mask = left_padded_batch(m.cfg.vocab_size, LENGTHS, 12, seed=2)
    ref_logits = torch.tensor(hf_logits(hf, toks, mask))
    ref = torch.log_softmax(ref_logits, -1)[:, :-1].gather(-1, torch.tensor(toks[:, 1:, None]).long())[..., 0]
    ref = ref.numpy() * mask[:, 1:]
    # A small budget forces several chunks, including a ragged last one.
    ours = token_logprobs(m.weights, m.cfg, jnp.asarray(toks), jnp.asarray(mask), chunk_budget=3 * 160 * 4)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    start = 6
    tail = token_logprobs(m.weights, m.cfg, jnp.asarray(toks), jnp.asarray(mask), start=start)
    np.testing.assert_allclose(np.asarray(tail), ref[:, start - 1 :], atol=1e-4, rtol=0)


def test_token_stats_entropy_and_temperature(family):
    _name, hf, m = family
    toks, mask = left_padded_batch(m.cfg.vocab_size, LENGTHS, 12, seed=3)
    temp = 0.7
    lp = torch.log_softmax(torch.tensor(hf_logits(hf, toks, mask))[:, :-1] / temp, -1)
    ent = -(lp.exp() * lp).sum(-1).numpy() * mask[:, 1:]
    mean_lp = lp.mean(-1).numpy() * mask[:, 1:]
    s = token_stats(m.weights, m.cfg, jnp.asarray(toks), jnp.asarray(mask), temperature=temp, entropy=True)
    np.testing.assert_allclose(np.asarray(s["entropy"]), ent, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(s["mean_logp"]), mean_lp, atol=1e-4, rtol=0)


def test_export_round_trip_loads_in_transformers(family, tmp_path):
    _name, hf, m = family
    # Without `architectures` in the source config (as from GGUF metadata) the export still names the class.
    source = {k: v for k, v in m.hf_config.items() if k != "architectures"}
    out = save_hf_checkpoint(tmp_path / "export", m.weights, m.cfg, source)
    assert json.loads((out / "config.json").read_text())["architectures"] == [type(hf).__name__]
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    toks, mask = left_padded_batch(m.cfg.vocab_size, LENGTHS, 12, seed=4)
    got, want = hf_logits(back, toks, mask)[mask], hf_logits(hf, toks, mask)[mask]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_sharded_load_matches_single_device(family):
    _name, _, m = family
    mesh = make_mesh(data=1, fsdp=2, tensor=2)  # the weights' axes; the data axis only replicates them
    sharded = load_model(m.spec, mesh=mesh, tokenizer=False)
    shardings = weight_shardings(m.cfg, mesh)
    for leaf, want in zip(jax.tree.leaves(sharded.weights), jax.tree.leaves(shardings)):
        assert leaf.sharding == want
    # At least the MLP and embedding are split (every tiny dimension divides by 2).
    assert len(sharded.weights.layers.w_up.addressable_shards[0].data.reshape(-1)) < m.weights.layers.w_up.size
    toks, mask = left_padded_batch(m.cfg.vocab_size, [12, 8, 5, 12], 12, seed=5)
    pos = default_positions(jnp.asarray(mask))
    fwd = jax.jit(forward, static_argnums=1)
    one, _ = fwd(m.weights, m.cfg, toks, pos, mask)
    many, _ = fwd(sharded.weights, m.cfg, toks, pos, mask)
    np.testing.assert_allclose(np.asarray(many), np.asarray(one), atol=1e-5, rtol=0)


def _all_shapes(jaxpr):
    """Every intermediate shape in a jaxpr, descending into scan/cond/checkpoint bodies."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            if hasattr(v.aval, "shape"):
                yield tuple(v.aval.shape)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_shapes(inner)


def test_no_full_vocabulary_float32_array_in_token_logprobs():
    """The jaxpr of token_logprobs holds no [B, T, V] array: the head runs in chunks."""
    hf = tiny_model("gemma3_text", vocab_size=4096)
    from cme_jax.models.families import config_from_hf
    from cme_jax.models.weights import DictStore, load_weights

    cfg = config_from_hf(hf.config)
    w = load_weights(cfg, DictStore({k: v.numpy() for k, v in hf.state_dict().items()}))
    B, T = 4, 64
    toks = jnp.zeros((B, T), jnp.int32)
    mask = jnp.ones((B, T), bool)
    budget = B * 8 * 4096
    fn = lambda w: token_logprobs(w, cfg, toks, mask, start=16, chunk_budget=budget).sum()
    for closed in (jax.make_jaxpr(fn)(w), jax.make_jaxpr(jax.grad(fn))(w)):
        shapes = set(_all_shapes(closed.jaxpr))
        assert (B, 8, 4096) in shapes  # the chunked logits exist ...
        big = [s for s in shapes if s and s[-1] == 4096 and np.prod(s) > budget]
        assert not big, f"arrays larger than one chunk: {big}"  # ... and nothing bigger
    assert chunk_length(B, T - 16, 4096, budget) == 8


def test_gradient_does_not_keep_attention_scores_of_every_layer():
    """XLA's memory plan for the gradient of a long-sequence log-likelihood stays below one [L, B, N, T, T] float32
    stack: attention scores are recomputed layer by layer in the backward pass, not saved for every layer (saving
    them plans about 2.5 stacks here)."""
    from cme_jax.models.transformer import ModelConfig, init_weights

    cfg = ModelConfig(
        family="llama", vocab_size=64, dim=32, num_layers=16, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
    )
    B, T = 2, 512
    w = init_weights(cfg, jax.random.key(0))
    toks = jnp.zeros((B, T), jnp.int32)
    mask = jnp.ones((B, T), bool)
    loss = lambda w: token_logprobs(w, cfg, toks, mask).sum()
    temp = jax.jit(jax.grad(loss)).lower(w).compile().memory_analysis().temp_size_in_bytes
    scores_stack = cfg.num_layers * B * cfg.num_heads * T * T * 4
    assert temp < scores_stack, (temp, scores_stack)
