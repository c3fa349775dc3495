"""Tiny trainer runs shared by the trainer, learning and multi-process tests: random HF models and configs, and
reading a run back (its metrics, its checkpointed params)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import yaml

from cme_jax.checkpoint import CheckpointManager
from tests.tiny_hf import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "the quick brown fox",
    "say hello to the world",
    "answer the question",
    "count from one to five",
    "a small corpus",
    "jumps over the lazy dog",
    "write one clear sentence",
    "seven eight nine ten",
]


def write_tiny(path: Path, model_type: str, seed: int, vocab: int, sharpen: float = 1.0) -> str:
    """A random HF model directory (safetensors + tokenizer) cme_jax loads like any local model.

    `sharpen` scales the output head: a random model is nearly uniform over its vocabulary, a verifier needs
    preferences strong enough for a policy to learn from.
    """
    import torch

    tok = tiny_tokenizer(vocab)
    # As real checkpoints do, the model's vocabulary is padded past the tokenizer's to a multiple of 8, so that
    # every test mesh's tensor axis splits it.
    padded = -(-len(tok) // 8) * 8
    model = tiny_model(model_type, seed=seed, vocab_size=padded, max_position_embeddings=512)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_tiny_models(root: Path) -> dict[str, str]:
    """The policy, a verifier with its vocabulary (fused path) and one with another vocabulary (text path)."""
    return {
        "policy": write_tiny(root / "policy", "llama", 0, 320),
        "same_vocab": write_tiny(root / "same_vocab", "qwen2", 1, 320, sharpen=8.0),
        "other_vocab": write_tiny(root / "other_vocab", "qwen3", 2, 400, sharpen=8.0),
    }


def write_prompts(path: Path) -> str:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return str(path)


def tiny_config(tiny_models, prompts_file, run_dir, verifier="other_vocab", **sections) -> dict:
    """A few-second run: tiny policy, tiny verifier, 2 prompts x 2 samples x 8 tokens per step."""
    cfg = {
        "run_dir": str(run_dir),
        "model": {"policy": tiny_models["policy"], "reference": "policy"},
        "reward": {"verifiers": [{"name": "v", "model": tiny_models[verifier], "context": "chat", "max_length": 16}]},
        "sampling": {"num_samples": 2, "max_new_tokens": 8, "temperature": 1.0},
        "grpo": {"beta": 0.04},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 1},
        "train": {"steps": 6, "prompts_per_step": 2, "fused": False},
        # Data and tensor parallel on any even device count: 2 x 2 on the suite's 4 devices, 2 x 4 on 8.
        "mesh": {"data": 2, "fsdp": 1, "tensor": -1},
        "data": {"source": prompts_file, "max_prompt_tokens": 64},
        "checkpoint": {"every": 3, "keep": 5, "async_save": True},
        "logging": {"samples_every": 3, "preview_tokens": 0, "tensorboard": True},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, output: Callable[[], str], timeout: float = 600) -> None:
    """Wait until the running trainer `proc` has completed the checkpoint of step 1 in `run_dir`.

    A step directory appears under its final name only once every file of it is written (cme_jax.checkpoint).
    """
    step_dir = Path(run_dir) / "checkpoints" / "1"
    deadline = time.time() + timeout
    while not step_dir.is_dir():
        assert proc.poll() is None, f"the trainer exited before its first checkpoint:\n{output()[-6000:]}"
        assert time.time() < deadline, f"no checkpoint in {run_dir} after {timeout} s"
        time.sleep(0.02)


def run_params(run_dir: Path, like, step: int, shardings=None):
    """The policy params of a run's checkpoint at `step`, restored here in the structure of the params `like`
    (into `shardings`, default those of `like`)."""
    if shardings is None:
        shardings = jax.tree.map(lambda x: x.sharding, like)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings)
    with CheckpointManager(run_dir, read_only=True) as ckpt:
        return ckpt.restore({"params": abstract}, step, partial=True).state["params"]


def assert_same_params(a, b) -> None:
    """Two param trees equal to float32 reduction-order noise."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
