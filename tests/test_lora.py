"""LoRA: adapters beside a frozen base. Zero adapters are the base exactly, only the adapters learn, the reference is
the base, resume is exact, and the PEFT export loads in `peft` with the logits of cme_jax's merged model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cme_jax import export
from cme_jax import train as train_mod
from cme_jax.checkpoint import CheckpointManager
from cme_jax.config import load_config
from cme_jax.errors import CmeError
from cme_jax.grpo import GRPOConfig, kl_penalty
from cme_jax.models import lora as lora_lib
from cme_jax.models.logprobs import token_logprobs
from cme_jax.models.sharding import is_spec
from cme_jax.models.transformer import ModelConfig, default_positions, forward, init_weights
from cme_jax.sampling import SamplingConfig, sample_jit
from cme_jax.sources import load_model
from cme_jax.train_step import StepConfig, build_step, init_state, join_rollout, update
from tests.tiny_hf import hf_logits, left_padded_batch, tiny_model
from tests.train_helpers import metric_rows, tiny_config, write_config

LORA = lora_lib.LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """Tiny random HF checkpoints of four families (biases, tied embeddings, sandwich norms, QK norms)."""
    root = tmp_path_factory.mktemp("lora_families")
    dirs = {}
    for family in ("llama", "qwen2", "gemma3_text", "olmo2"):
        tiny_model(family, seed=3).save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


def random_adapters(cfg: ModelConfig, lora: lora_lib.LoraConfig, seed: int, std: float = 0.2):
    """Adapters far from zero in both factors, so a wrong layout or scale shows in the logits."""
    specs = lora_lib.abstract_adapters(cfg, lora)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [std * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])


def logits_of(weights, cfg, toks, mask):
    pos = default_positions(jnp.asarray(mask))
    return np.asarray(jax.jit(forward, static_argnums=1)(weights, cfg, toks, pos, mask)[0])


# ---------------------------------------------------------------------------------------------------------
# The model with adapters


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_zero_adapters_give_the_base_logits_and_samples_exactly(family, family_dirs):
    model = load_model(str(family_dirs[family]), tokenizer=False)
    cfg, base = model.cfg, model.weights
    adapters = lora_lib.init_adapters(cfg, LORA, jax.random.key(0))
    assert all(float(jnp.abs(ab["a"]).max()) > 0 and not ab["b"].any() for ab in adapters.values())
    with_adapters = lora_lib.adapted(base, adapters, LORA)
    toks, mask = left_padded_batch(cfg.vocab_size, [9, 5, 7], 9)
    np.testing.assert_array_equal(logits_of(with_adapters, cfg, toks, mask), logits_of(base, cfg, toks, mask))
    # The sampler prefills with the adapters on the fly and decodes with them merged: the same draws as the base.
    scfg = SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=2)
    key = jax.random.key(5)
    ours = sample_jit(with_adapters, cfg, toks, mask, key, scfg, jnp.asarray([2]), 0)
    base_ro = sample_jit(base, cfg, toks, mask, key, scfg, jnp.asarray([2]), 0)
    np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(base_ro.tokens))
    np.testing.assert_array_equal(np.asarray(ours.logprobs), np.asarray(base_ro.logprobs))


CFG = ModelConfig(
    family="llama", vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48
)


def _dot_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every matrix product in a jaxpr, inner jaxprs (scan, cond, remat, jit) included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out.extend(_dot_shapes(inner))
    return out


def _batch(policy, sc):
    prompts = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, 6)), jnp.int32)
    pmask = jnp.asarray(np.arange(6)[None, :] >= np.array([[0], [2]]))
    ro = sample_jit(policy, CFG, prompts, pmask, jax.random.key(1), sc.sampling, jnp.asarray([2]), 0)
    rewards = jnp.asarray(np.random.default_rng(1).normal(size=ro.tokens.shape[0]), jnp.float32)
    return join_rollout(prompts, pmask, ro, sc.group_size), rewards


def test_gradients_reach_only_the_adapters():
    base = init_weights(CFG, jax.random.key(0), std=0.1)
    scfg = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=4)
    sc = StepConfig(grpo=GRPOConfig(beta=0.04), sampling=scfg, lora=LORA)
    opt = optax.adam(1e-2)
    adapters = lora_lib.init_adapters(CFG, LORA, jax.random.key(2))
    batch, rewards = _batch(base, sc)
    fns = build_step(CFG, sc, opt, pad_id=0)
    state = init_state(jax.tree.map(jnp.copy, adapters), opt, 0)  # the update donates its state
    # No product in the update has the shape of a base matrix (its gradient), while full fine-tuning forms them all.
    per_layer = [w.shape[1:] for w in jax.tree.leaves(base.layers) if w.ndim >= 3]  # matrices, not norm scales
    weight_shapes = {tuple(sorted(shape)) for shape in (base.embed.shape, *per_layer)}
    lora_dots = {tuple(sorted(s)) for s in _dot_shapes(jax.make_jaxpr(fns.update)(state, batch, rewards, None, base))}
    assert not lora_dots & weight_shapes, lora_dots & weight_shapes
    full = build_step(CFG, dataclasses.replace(sc, lora=None), opt, pad_id=0)
    full_jaxpr = jax.make_jaxpr(full.update)(init_state(base, opt, 0), batch, rewards, base)
    assert weight_shapes <= {tuple(sorted(s)) for s in _dot_shapes(full_jaxpr)}
    # The state holds the adapters and their optimizer moments only; two updates move every factor (the first
    # moves B alone: with B = 0 the gradient of A is zero).
    first, _ = fns.update(state, batch, rewards, None, base)
    after_one = jax.device_get(first.params)
    second, metrics = fns.update(first, batch, rewards, None, base)
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    n_opt = sum(x.size for x in jax.tree.leaves(second.opt_state) if x.ndim)
    assert jax.tree.structure(second.params) == jax.tree.structure(adapters) and n_opt == 2 * n_adapter
    for target in LORA.targets:
        np.testing.assert_array_equal(after_one[target]["a"], np.asarray(adapters[target]["a"]))
        assert np.abs(after_one[target]["b"]).max() > 0
        assert float(jnp.abs(second.params[target]["a"] - adapters[target]["a"]).max()) > 0
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_reference_logprobs_under_lora_are_the_base_models():
    """The KL term's reference is the base without adapters: the step's KL equals the closed form against the
    base's own log-probs (and is far from zero, the KL against the adapted policy itself)."""
    base = init_weights(CFG, jax.random.key(0), std=0.1)
    scfg = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=4)
    sc = StepConfig(grpo=GRPOConfig(beta=0.04), sampling=scfg, lora=LORA)
    adapters = random_adapters(CFG, LORA, seed=3, std=0.3)
    policy = lora_lib.adapted(base, adapters, LORA)
    batch, rewards = _batch(policy, sc)
    opt = optax.sgd(0.0)
    step = jax.jit(lambda st, b, r, w: update(st, b, r, None, cfg=CFG, sc=sc, optimizer=opt, base=w))
    _, metrics = step(init_state(adapters, opt, 0), batch, rewards, base)
    P = batch.tokens.shape[1] - batch.response_mask.shape[1]
    logp = token_logprobs(policy, CFG, batch.tokens, batch.mask, start=P)
    ref = token_logprobs(base, CFG, batch.tokens, batch.mask, start=P)
    m = np.asarray(batch.response_mask, bool)
    want = float(np.asarray(kl_penalty(logp, ref))[m].mean())
    assert want > 1e-3
    np.testing.assert_allclose(float(metrics["kl_mean"]), want, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# PEFT's format


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "olmo2"])
def test_peft_adapter_loads_in_peft_with_the_merged_logits(family, family_dirs, tmp_path):
    import peft
    import transformers

    model = load_model(str(family_dirs[family]), tokenizer=False)
    lora = lora_lib.LoraConfig(rank=4, alpha=6.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    adapters = random_adapters(model.cfg, lora, seed=7, std=0.15)
    out = lora_lib.save_peft(tmp_path / "adapter", adapters, model.cfg, lora, str(family_dirs[family]))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 6.0, "LORA")

    hf = transformers.AutoModelForCausalLM.from_pretrained(family_dirs[family]).eval()
    with_peft = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    toks, mask = left_padded_batch(model.cfg.vocab_size, [9, 6], 9)
    theirs = hf_logits(with_peft, toks, mask)[mask]
    merged = logits_of(lora_lib.merge(model.weights, adapters, lora), model.cfg, toks, mask)[mask]
    on_the_fly = logits_of(lora_lib.adapted(model.weights, adapters, lora), model.cfg, toks, mask)[mask]
    np.testing.assert_allclose(merged, theirs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(on_the_fly, merged, atol=1e-4, rtol=0)
    # The adapters matter: the base alone is far from both.
    assert np.abs(logits_of(model.weights, model.cfg, toks, mask)[mask] - theirs).max() > 0.1


# ---------------------------------------------------------------------------------------------------------
# Training runs: resume, checkpoints, export


def lora_config(tiny_models, prompts_file, run_dir, **sections):
    raw = tiny_config(tiny_models, prompts_file, run_dir, **sections)
    raw["model"]["lora"] = {"rank": 4, "alpha": 8, "targets": ["q", "v", "o", "up", "down"]}
    raw["optim"]["learning_rate"] = 1e-2
    return raw


@pytest.fixture(scope="module")
def lora_run(tiny_models, prompts_file, tmp_path_factory):
    """Six LoRA steps in one go: the reference for the resume test, and the run the export tests read."""
    root = tmp_path_factory.mktemp("lora_run")
    cfg = load_config(write_config(root / "c.yaml", lora_config(tiny_models, prompts_file, root / "run")))
    return cfg, train_mod.train(cfg)


def test_lora_run_checkpoints_the_adapters_and_resumes_exactly(lora_run, tmp_path):
    cfg, ref = lora_run
    lora = cfg.model.lora
    with CheckpointManager(cfg.run_dir, read_only=True) as ckpt:
        assert ckpt.all_steps() == [3, 6]
        meta = ckpt.metadata(6)
    assert meta["model_spec"] == cfg.model.policy and lora_lib.lora_from_config(meta["config"]) == lora
    assert sorted(ref.state.params) == sorted(lora.targets)
    policy_cfg = load_model(cfg.model.policy, tokenizer=False).cfg
    want = lora_lib.abstract_adapters(policy_cfg, lora)
    for target in lora.targets:
        for name in ("a", "b"):
            assert ref.state.params[target][name].shape == want[target][name].shape
    # The step's state on disk is exactly the adapter state (a restore refuses a tree with any other leaf).
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), ref.state)
    with CheckpointManager(cfg.run_dir, read_only=True) as ckpt:
        saved = ckpt.restore(abstract, 6).state
    arrays = lambda st: jax.tree.leaves((st.params, st.opt_state, st.step))
    for x, y in zip(arrays(saved), arrays(ref.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    again = dataclasses.replace(cfg, run_dir=str(tmp_path / "run"))
    assert train_mod.train(again, stop_after=3).step == 3
    resumed = train_mod.train(again)
    assert resumed.step == 6
    for x, y in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(ref.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows, ref_rows = metric_rows(Path(again.run_dir)), metric_rows(Path(ref.run_dir))
    assert len(rows) == len(ref_rows) == 6
    for a, b in zip(rows, ref_rows):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert max(float(jnp.abs(x["b"]).max()) for x in ref.state.params.values()) > 0  # the adapters learned


def test_export_of_a_lora_run_merged_and_as_a_peft_adapter(lora_run, tmp_path, capsys):
    import peft
    import torch
    import transformers

    cfg, ref = lora_run
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    export.main([cfg.run_dir, str(merged_dir)])
    export.main([cfg.run_dir, str(adapter_dir), "--format", "peft"])
    err = capsys.readouterr().err
    assert "wrote step 6" in err and "wrote the PEFT adapter of step 6" in err
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    policy = load_model(cfg.model.policy, tokenizer=False)
    toks, mask = left_padded_batch(policy.cfg.vocab_size, [9, 4], 9)
    trained = lora_lib.merge(policy.weights, jax.device_get(ref.state.params), cfg.model.lora)
    ours = logits_of(trained, policy.cfg, toks, mask)[mask]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(loaded, toks, mask)[mask], ours, atol=1e-4, rtol=0)
    base = transformers.AutoModelForCausalLM.from_pretrained(cfg.model.policy, dtype=torch.float32).eval()
    with_peft = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    np.testing.assert_allclose(hf_logits(with_peft, toks, mask)[mask], ours, atol=1e-4, rtol=0)
    assert np.abs(logits_of(policy.weights, policy.cfg, toks, mask)[mask] - ours).max() > 1e-3


def test_lora_run_shares_the_base_as_its_reference(tiny_models, prompts_file, tmp_path):
    raw = lora_config(tiny_models, prompts_file, tmp_path / "run")
    run = train_mod.load_run(load_config(write_config(tmp_path / "c.yaml", raw)))
    assert all(r is b for r, b in zip(jax.tree.leaves(run.ref_params), jax.tree.leaves(run.policy.weights)))
    assert run.base_args == (run.policy.weights,)


def test_lora_input_errors_are_one_line(tiny_models, prompts_file, tmp_path, capsys):
    raw = lora_config(tiny_models, prompts_file, tmp_path / "run")
    raw["model"]["reference"] = tiny_models["policy"]
    with pytest.raises(CmeError, match=r"with model.lora the reference is the frozen base itself"):
        load_config(write_config(tmp_path / "c.yaml", raw))
    run = tmp_path / "full"
    with CheckpointManager(run) as mngr:
        mngr.save(2, {"params": jnp.zeros(2)}, {"model_spec": tiny_models["policy"], "config": {"model": {}}})
    with pytest.raises(SystemExit) as e:
        export.main([str(run), str(tmp_path / "out"), "--format", "peft"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert "fine-tuned every weight (its config has no model.lora)" in err and "--format merged" in err
