"""Checkpoints: exact round trips, keep-last-K, sharded restore, SIGKILL mid-save, SIGTERM, HF export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import struct

from cme_jax.checkpoint import (
    CONFIG_FILE,
    METADATA_FILE,
    CheckpointManager,
    checkpoint_dir,
    install_preemption_handler,
)
from cme_jax.errors import CmeError
from cme_jax.models.sharding import make_mesh, replicated, weight_shardings
from cme_jax.models.transformer import ModelConfig, init_weights
from tests.helpers import child_env, cli_error

TINY = ModelConfig(
    family="qwen2",
    vocab_size=96,
    dim=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    qkv_bias=True,
    qk_norm="head",
)


@struct.dataclass
class TrainState:
    params: object
    opt_state: object
    step: object
    rng: object


@jax.jit
def _updated_params(key):
    params = init_weights(TINY, key)
    opt = optax.adamw(1e-2)
    grads = jax.tree.map(lambda p: jnp.sin(p * 7.0), params)
    updates, opt_state = opt.update(grads, opt.init(params), params)
    return optax.apply_updates(params, updates), opt_state


def _train_state(seed: int = 0) -> TrainState:
    """A state after one real adamw update, so moments and counts are not their initial values."""
    # rbg keys: threefry's random.normal takes many seconds to compile on the CPU.
    params, opt_state = _updated_params(jax.random.key(seed, impl="rbg"))
    return TrainState(params, opt_state, jnp.int32(17 + seed), jax.random.key(1234 + seed))


def _host(tree):
    """Numpy copies of every leaf (key leaves as their raw data)."""
    return jax.tree.map(lambda x: np.array(jax.random.key_data(x) if _is_key(x) else x), tree)


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _abstract(tree, sharding_of=None):
    def leaf(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if sharding_of is None else sharding_of(x))

    return jax.tree.map(leaf, tree)


def _assert_tree_equal(got, want_host):
    got_host = _host(got)
    assert jax.tree.structure(got_host) == jax.tree.structure(want_host)
    for g, w in zip(jax.tree.leaves(got_host), jax.tree.leaves(want_host)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def test_round_trip_of_a_train_state(tmp_path):
    state = _train_state()
    keys = jax.random.split(jax.random.key(5, impl="rbg"), 3)  # a key array of another implementation
    tree = {"train": state, "more_keys": keys}
    want = _host(tree)
    abstract = _abstract(tree)
    config = {"policy": {"model": "some/model", "lr": 1e-6}, "steps": [1, 2], "name": "ünïcode"}
    meta = {"config": config, "data": {"epoch": 1, "position": 96, "seed": 3}, "model_spec": "some/model"}

    mngr = CheckpointManager(tmp_path, keep=None)
    assert mngr.latest_step() is None
    assert mngr.save(17, tree, meta)
    # The save has copied the arrays off the devices: deleting them (as donation would) is safe.
    for leaf in jax.tree.leaves(tree):
        leaf.delete()
    mngr.wait()
    assert mngr.latest_step() == 17

    restored = CheckpointManager(tmp_path).restore(abstract)
    assert restored.step == 17
    assert restored.metadata == meta
    assert isinstance(restored.state["train"], TrainState)
    assert isinstance(restored.state["train"].opt_state[0], optax.ScaleByAdamState)
    _assert_tree_equal(restored.state, want)
    rng = restored.state["train"].rng
    assert rng.dtype == jax.random.key(0).dtype and jax.random.key_impl(rng) == "threefry2x32"
    assert jax.random.key_impl(restored.state["more_keys"]) == "rbg"
    np.testing.assert_array_equal(jax.random.uniform(rng, (4,)), jax.random.uniform(jax.random.key(1234), (4,)))

    step_dir = checkpoint_dir(tmp_path) / "17" / "meta"
    assert json.loads((step_dir / METADATA_FILE).read_text()) == meta
    assert yaml.safe_load((step_dir / CONFIG_FILE).read_text()) == config
    with pytest.raises(TypeError, match="JSON"):
        mngr.save(18, _train_state(), {"bad": object()}, force=True)
    mngr.close()


def test_save_interval_keep_last_k_and_reopen(tmp_path):
    state = {"w": jnp.arange(6.0), "step": jnp.int32(0)}
    with CheckpointManager(tmp_path, save_every=2, keep=2) as mngr:
        started = [s for s in range(1, 10) if mngr.save(s, {**state, "step": jnp.int32(s)}, {"step": s})]
        assert started == [2, 4, 6, 8]
        assert mngr.save(9, {**state, "step": jnp.int32(9)}, {"step": 9}, force=True)
        assert not mngr.save(9, state, {"step": 9}, force=True)  # never twice for one step
        mngr.wait()
        assert mngr.all_steps() == [8, 9]
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == ["8", "9"]
    reopened = CheckpointManager(tmp_path, save_every=2, keep=2)
    assert reopened.latest_step() == 9
    assert reopened.metadata(8) == {"step": 8}
    restored = reopened.restore(_abstract(state), step=8)
    assert int(restored.state["step"]) == 8
    with pytest.raises(CmeError, match="step 5 has no complete checkpoint"):
        reopened.restore(_abstract(state), step=5)
    with pytest.raises(CmeError, match="shape"):
        reopened.restore({"w": jax.ShapeDtypeStruct((7,), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)})
    reopened.close()


def test_restore_into_sharded_abstract_state(tmp_path):
    state = _train_state(seed=1)
    want = _host(state)
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(1, state, {})

    def abstract_for(mesh):
        ws = weight_shardings(TINY, mesh)
        rep = replicated(mesh)
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state.params, ws)
        adam, rest = state.opt_state[0], state.opt_state[1:]
        opt_state = (
            optax.ScaleByAdamState(
                count=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
                mu=jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), adam.mu, ws),
                nu=jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), adam.nu, ws),
            ),
            *rest,
        )
        return TrainState(
            params,
            opt_state,
            jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((), state.rng.dtype, sharding=rep),
        )

    mesh = make_mesh(data=1, fsdp=2, tensor=2)
    abstract = abstract_for(mesh)
    restored = CheckpointManager(tmp_path).restore(abstract)
    _assert_tree_equal(restored.state, want)
    for got, asked in zip(jax.tree.leaves(restored.state), jax.tree.leaves(abstract)):
        assert got.sharding.is_equivalent_to(asked.sharding, got.ndim), (got.sharding, asked.sharding)
    assert restored.state.params.layers.wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(restored.state.params))

    # A sharded save restores into a different mesh too, one that replicates the weights over its data axis.
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(2, restored.state, {})
    other = abstract_for(make_mesh(data=2, fsdp=2, tensor=1))
    again = CheckpointManager(tmp_path).restore(other)
    assert again.step == 2
    _assert_tree_equal(again.state, want)
    for got, asked in zip(jax.tree.leaves(again.state), jax.tree.leaves(other)):
        assert got.sharding.is_equivalent_to(asked.sharding, got.ndim)


# ----------------------------------------------------------------------------------------------------------
# Faults, with real child processes. The children run this file as a script (see the bottom).

BIG = 50_000_000  # float32 elements: 200 MB, so that the background write is still running when killed


def _big_values(step: int):
    """Exactly representable float32 values that differ between steps."""
    return (np.arange(BIG, dtype=np.int32) % 1021).astype(np.float32) * step


def _big_state(step: int) -> dict:
    return {"big": jnp.asarray(_big_values(step)), "step": jnp.int32(step)}


def _child(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], env=child_env(), text=True, **kw)


def _child_sigkill_mid_save(run_dir: str) -> None:
    mngr = CheckpointManager(run_dir)
    mngr.save(1, _big_state(1), {"data": {"position": 1}})
    mngr.wait()
    mngr.save(2, _big_state(2), {"data": {"position": 2}})
    # The write of step 2 has only started in the background: die without any chance to finish it.
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_sigkill_during_save_resumes_from_last_complete_step(tmp_path):
    proc = _child("sigkill", str(tmp_path))
    assert proc.wait(timeout=300) == -signal.SIGKILL
    names = sorted(p.name for p in checkpoint_dir(tmp_path).iterdir())
    assert "1" in names and "2" not in names
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names  # killed mid-save

    abstract = {
        "big": jax.ShapeDtypeStruct((BIG,), jnp.float32, sharding=replicated(make_mesh(data=-1))),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(make_mesh(data=-1))),
    }
    mngr = CheckpointManager(tmp_path)
    assert mngr.latest_step() == 1
    restored = mngr.restore(abstract)
    assert restored.step == 1 and restored.metadata == {"data": {"position": 1}}
    assert int(restored.state["step"]) == 1
    np.testing.assert_array_equal(np.asarray(restored.state["big"]), _big_values(1))
    del restored
    # The resumed run saves step 2 again over the remains of the killed save.
    assert mngr.save(2, {"big": jnp.zeros(4), "step": jnp.int32(2)}, {})
    mngr.close()
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == ["1", "2"]


def _loop_step(x, rng):
    rng, sub = jax.random.split(rng)
    return x + jax.random.uniform(sub, x.shape), rng


def _child_training_loop(run_dir: str, total: int) -> None:
    """A miniature trainer: resumes from the run directory, checkpoints every 2 steps and on SIGTERM."""
    preempted = install_preemption_handler()
    mngr = CheckpointManager(run_dir, save_every=2, keep=2)
    state = {"x": jnp.zeros(8, jnp.float32), "rng": jax.random.key(7), "step": jnp.int32(0)}
    if mngr.latest_step() is not None:
        restored = mngr.restore(_abstract(state))
        state = restored.state
        print(f"resumed {restored.step} position {restored.metadata['data_position']}", flush=True)
    step = int(state["step"])
    while step < total:
        x, rng = _loop_step(state["x"], state["rng"])
        step += 1
        state = {"x": x, "rng": rng, "step": jnp.int32(step)}
        meta = {"data_position": 3 * step}
        mngr.save(step, state, meta)
        print(f"step {step}", flush=True)
        if preempted.any_process():
            mngr.save(step, state, meta, force=True)
            mngr.close()
            print(f"preempted {step}", flush=True)
            return
    mngr.save(step, state, {"data_position": 3 * step}, force=True)
    mngr.close()
    np.save(Path(run_dir) / "final.npy", np.asarray(state["x"]))


@pytest.mark.slow
def test_sigterm_checkpoints_exits_cleanly_and_resumes_exactly(tmp_path):
    proc = _child("loop", str(tmp_path), "1000000", stdout=subprocess.PIPE)
    for line in proc.stdout:
        if line.strip() == "step 5":
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 0
    stopped = int(rest.strip().splitlines()[-1].removeprefix("preempted "))
    assert stopped >= 5
    mngr = CheckpointManager(tmp_path)
    assert mngr.latest_step() == stopped
    assert mngr.metadata() == {"data_position": 3 * stopped}
    mngr.close()

    total = stopped + 3
    resumed = _child("loop", str(tmp_path), str(total), stdout=subprocess.PIPE)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0
    assert out.splitlines()[0] == f"resumed {stopped} position {3 * stopped}"
    assert out.splitlines()[1] == f"step {stopped + 1}"

    x, rng = jnp.zeros(8, jnp.float32), jax.random.key(7)
    for _ in range(total):
        x, rng = _loop_step(x, rng)
    np.testing.assert_array_equal(np.load(tmp_path / "final.npy"), np.asarray(x))


def test_preemption_handler_sets_flag_and_uninstalls():
    before = signal.getsignal(signal.SIGTERM)
    flag = install_preemption_handler()
    try:
        assert not flag.requested and not flag.any_process()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.signum == signal.SIGTERM and flag.any_process()
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------------------------------------
# Export to a Hugging Face directory.


@pytest.mark.slow
def test_export_of_a_trained_checkpoint_loads_in_transformers(tmp_path, capsys):
    import torch
    import transformers
    from safetensors import safe_open
    from tiny_hf import hf_logits, left_padded_batch, tiny_model, tiny_tokenizer

    from cme_jax import export
    from cme_jax.sources import load_model

    tok = tiny_tokenizer()
    base = tiny_model("llama", vocab_size=len(tok))
    base_dir, trained_dir = tmp_path / "base", tmp_path / "trained"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    # "Training" changes the weights: the export must carry the checkpoint's weights, not the spec's.
    trained = tiny_model("llama", vocab_size=len(tok))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    trained.save_pretrained(trained_dir)
    params = load_model(str(trained_dir), tokenizer=False).weights

    opt = optax.adamw(1e-3)
    state = TrainState(params, opt.init(params), jnp.int32(30), jax.random.key(0))
    run = tmp_path / "run"
    with CheckpointManager(run) as mngr:
        mngr.save(10, state.replace(params=load_model(str(base_dir), tokenizer=False).weights), {"model_spec": "x"})
        mngr.save(30, state, {"model_spec": str(base_dir), "config": {"policy": str(base_dir)}})

    out = tmp_path / "export"
    export.main([str(run), str(out)])
    assert "wrote step 30" in capsys.readouterr().err
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    toks, mask = left_padded_batch(len(tok), [9, 5], 9)
    want = hf_logits(trained, toks, mask)[mask]  # padded positions hold no defined value
    np.testing.assert_allclose(hf_logits(loaded, toks, mask)[mask], want, atol=2e-5, rtol=0)
    assert not np.allclose(hf_logits(base, toks, mask)[mask], want, atol=1e-3)
    text = "hello world, answer the question"
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tok(text)["input_ids"]

    out16 = tmp_path / "export16"
    export.main([str(run), str(out16), "--step", "30", "--dtype", "bfloat16"])
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out16 / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    loaded16 = transformers.AutoModelForCausalLM.from_pretrained(out16, dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(loaded16, toks, mask)[mask], want, atol=0.05, rtol=0)


def test_export_bad_input_is_one_line(tmp_path, capsys):
    from cme_jax import export

    def fails(*argv: str) -> str:
        return cli_error(capsys, export.main, argv)

    assert "does not exist" in fails(str(tmp_path / "missing"), str(tmp_path / "out"))
    assert "no checkpoints/" in fails(str(tmp_path), str(tmp_path / "out"))
    checkpoint_dir(tmp_path).mkdir()
    assert "no complete checkpoint" in fails(str(tmp_path), str(tmp_path / "out"))
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(4, {"params": jnp.zeros(2)}, {})
    assert "step 5 has no complete checkpoint" in fails(str(tmp_path), str(tmp_path / "out"), "--step", "5")
    assert "model_spec" in fails(str(tmp_path), str(tmp_path / "out"))


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "sigkill":
        _child_sigkill_mid_save(rest[0])
    elif mode == "loop":
        _child_training_loop(rest[0], int(rest[1]))
