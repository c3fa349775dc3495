"""Shared fixtures: eight fake CPU devices, float32-exact matmuls, the two embedded real models."""

import os
import tempfile

# Must be set before jax initialises its backends: sharding tests use 8 fake CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One on-disk compilation cache for the session, inherited by the trainer subprocesses the tests start:
# they compile the same programs as the in-process runs, and compilation dominates their time on a CPU.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="cme_jax_test_xla_"))
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")  # subprocesses too, so their programs match

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def smollm():
    from cme_jax.sources import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma():
    from cme_jax.sources import load_model

    return load_model("gemma3-270m")


def _hf_from_gguf(alias):
    import torch
    from transformers import AutoModelForCausalLM

    from cme_jax.sources import fetch_embedded

    path = fetch_embedded(alias)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_smollm():
    """transformers' own GGUF loader: the independent reference for the SmolLM2 numbers."""
    return _hf_from_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_gemma():
    return _hf_from_gguf("gemma3-270m")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Random HF model directories: a tiny policy and two tiny verifiers (see tests/train_helpers.py)."""
    from tests.train_helpers import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    from tests.train_helpers import write_prompts

    return write_prompts(tmp_path_factory.mktemp("data") / "prompts.jsonl")
