"""The sharding vocabulary: mesh sizes, the one-line error for a mesh that cannot split a model dimension, and
activations, the KV cache and the decode layouts placed by the rules on fake CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cme_jax import sources
from cme_jax import train as train_mod
from cme_jax.errors import CmeError
from cme_jax.models import decode_layout
from cme_jax.models.sharding import make_mesh, mesh_sizes, weight_shardings
from cme_jax.models.transformer import ModelConfig, default_positions, forward, init_cache, init_weights
from cme_jax.sampling import prepare_decode
from tests.tiny_hf import left_padded_batch, tiny_model, tiny_tokenizer
from tests.train_helpers import tiny_config, write_config

ROWS = ("data", "fsdp")


def _cfg(**kw) -> ModelConfig:
    base = dict(family="llama", vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    return ModelConfig(**{**base, "mlp_dim": 48, **kw})


def test_mesh_sizes_resolve_the_free_axis_and_reject_misfits():
    assert mesh_sizes(-1, 2, 2, 8) == (2, 2, 2)
    assert mesh_sizes(1, 1, -1, 8) == (1, 1, 8)
    assert make_mesh(data=-1, tensor=2).shape == {"data": 2, "fsdp": 1, "tensor": 2}  # the suite's 4 devices
    for sizes, words in [((3, -1, 1), "does not divide the 8"), ((2, 2, 1), "product"), ((-1, -1, 1), "one -1")]:
        with pytest.raises(CmeError, match=words):
            mesh_sizes(*sizes, 8)


def test_a_mesh_that_cannot_split_a_model_dimension_fails_in_one_line():
    cfg = _cfg(num_heads=6, num_kv_heads=3)
    with pytest.raises(CmeError) as err:
        weight_shardings(cfg, make_mesh(data=2, tensor=2))
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("kv_heads=3 does not split over mesh axis tensor=2;"), str(err.value)
    with pytest.raises(CmeError, match="mlp=42 does not split over mesh axis tensor=4"):
        weight_shardings(_cfg(num_heads=8, num_kv_heads=8, mlp_dim=42), make_mesh(data=1, tensor=4))
    with pytest.raises(CmeError, match="embed=34 does not split over mesh axis fsdp=4"):
        weight_shardings(_cfg(dim=34), make_mesh(data=1, fsdp=4), layout="fused")


def test_fewer_kv_heads_than_tensor_shards_stay_whole_on_every_shard():
    mesh = make_mesh(data=2, tensor=2)
    cfg = _cfg(num_kv_heads=1)
    sh = weight_shardings(cfg, mesh)  # 4 query heads over tensor=2, 1 K/V head
    assert sh.layers.wq.spec == P(None, None, "tensor", None)
    assert sh.layers.wk.spec == P(None, None, None, None)
    batch = _batch(4)
    cache = jax.jit(lambda w: forward(w, cfg, *batch, init_cache(cfg, 4, 8))[1])(
        jax.device_put(init_weights(cfg, jax.random.key(0)), sh)
    )
    assert cache.k.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data", None, None, None)), 5)


def test_the_trainer_stops_at_start_up_on_a_mesh_that_cannot_split_the_policy(
    tiny_models, prompts_file, tmp_path, capsys, monkeypatch
):
    def no_weights(*a, **k):
        raise AssertionError("weights were read before the mesh was checked")

    monkeypatch.setattr(sources, "load_weights", no_weights)
    tok = tiny_tokenizer()
    policy = tiny_model("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=3, vocab_size=len(tok))
    policy.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    cfg = tiny_config(tiny_models, prompts_file, tmp_path / "run", mesh={"data": 1, "fsdp": 2, "tensor": 2})
    cfg["model"]["policy"] = str(tmp_path / "policy")
    cfg["train"]["prompts_per_step"] = 4
    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--config", write_config(tmp_path / "c.yaml", cfg)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: kv_heads=3 does not split over mesh axis tensor=2"), err[-1]
    assert not any("Traceback" in line for line in err)


def _batch(rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    toks, mask = left_padded_batch(64, [6, 4, 6, 3, 6, 5, 2, 6][:rows], 6, seed=3)
    return toks, np.asarray(default_positions(jnp.asarray(mask))), mask


@pytest.fixture(scope="module")
def gemma3():
    """A tiny Gemma 3 (sliding and full layers, q/k norms) with its weights, unsharded."""
    from cme_jax.models.families import config_from_hf
    from cme_jax.models.weights import DictStore, load_weights

    hf = tiny_model("gemma3_text", vocab_size=64)
    cfg = config_from_hf(hf.config)
    return cfg, load_weights(cfg, DictStore({k: v.numpy() for k, v in hf.state_dict().items()}))


@pytest.mark.devices(8)  # rows over data x fsdp beside the tensor axis: all three axes at once
def test_sharded_forward_matches_one_device_and_places_logits_and_cache_by_the_rules(gemma3):
    cfg, weights = gemma3
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    toks, pos, mask = _batch(8)
    fwd = jax.jit(lambda w, t, p, m: forward(w, cfg, t, p, m, init_cache(cfg, 8, 8, w.embed.dtype)))
    one, one_cache = fwd(weights, toks, pos, mask)
    many, cache = fwd(jax.device_put(weights, weight_shardings(cfg, mesh)), toks, pos, mask)
    np.testing.assert_allclose(np.asarray(many), np.asarray(one), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(cache.k), np.asarray(one_cache.k), atol=1e-5, rtol=0)
    expected = {
        "logits": (many, P(ROWS, None, "tensor")),  # vocabulary over tensor
        "k": (cache.k, P(None, ROWS, "tensor", None, None)),  # [L, B, K, H, S]: rows and K/V heads
        "v": (cache.v, P(None, ROWS, "tensor", None, None)),  # [L, B, K, S, H]
        "valid": (cache.valid, P(ROWS, None)),
        "pos": (cache.pos, P(ROWS, None)),
    }
    for name, (x, spec) in expected.items():
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (name, x.sharding)
    # Placement follows the weights' mesh: the unsharded run stays on one device.
    assert len(one.sharding.device_set) == 1


def test_decode_layouts_are_described_and_placed_by_the_rules(gemma3):
    cfg, weights = gemma3
    mesh = make_mesh(data=1, fsdp=2, tensor=2)  # the weights' axes
    sharded = jax.device_put(weights, weight_shardings(cfg, mesh))
    for layout in ("stacked", "per_layer", "fused"):
        specs = decode_layout.abstract(cfg, layout, jnp.float32)
        arrays = decode_layout.to_layout(weights, cfg, layout)
        assert jax.tree.structure(arrays) == jax.tree.structure(jax.tree.map(lambda s: 0, specs))
        for s, a in zip(jax.tree.leaves(specs), jax.tree.leaves(arrays)):
            assert (s.shape, jnp.dtype(s.dtype)) == (a.shape, a.dtype)
    prepared = prepare_decode(sharded, cfg, "per_layer")  # "fused" on a CPU
    want = weight_shardings(cfg, mesh, layout=decode_layout.resolve("per_layer"))
    for a, sh in zip(jax.tree.leaves(prepared), jax.tree.leaves(want)):
        assert a.sharding.is_equivalent_to(sh, a.ndim), (a.shape, a.sharding, sh)
    fused = want.layers[0]
    assert fused.wqkv.spec == P(None, "fsdp") and fused.wo.spec == P("fsdp", "tensor", None)
