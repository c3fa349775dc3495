"""The two real embedded models against transformers' own GGUF loading: logits and greedy generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cme_jax.models.transformer import default_positions, forward
from cme_jax.sampling import SamplingConfig, generate_responses
from cme_jax.tokens import encode_prompts, left_pad, stop_token_ids
from tests.tiny_hf import hf_greedy

pytestmark = pytest.mark.slow

CHAT_PROMPTS = [
    "What is the boiling point of water at sea level?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering.",
]
PLAIN_PROMPTS = [
    "The three primary colours are",
    "Question: Who wrote Pride and Prejudice?\nAnswer:",
    "def fibonacci(n):\n    ",
]


def _case(request):
    if request.param == "smollm":
        return request.getfixturevalue("smollm"), request.getfixturevalue("hf_smollm"), "chat", CHAT_PROMPTS
    return request.getfixturevalue("gemma"), request.getfixturevalue("hf_gemma"), "plain", PLAIN_PROMPTS


@pytest.fixture(scope="module", params=["smollm", "gemma"])
def case(request):
    return _case(request)


def test_logits_match_transformers_on_real_prompts(case):
    model, hf, fmt, prompts = case
    ids = encode_prompts(model.tokenizer, prompts, fmt, "{prompt}")
    length = max(map(len, ids))
    toks, mask = left_pad(ids, length, 0)
    pos = np.asarray(default_positions(jnp.asarray(mask)))
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(toks).long(),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(pos).long(),
        ).logits.numpy()
    ours, _ = jax.jit(forward, static_argnums=1)(model.weights, model.cfg, toks, pos, mask)
    ours = np.asarray(ours)
    scale = np.abs(ref[mask]).max()
    assert np.abs(ours[mask] - ref[mask]).max() / scale < 1e-4
    np.testing.assert_array_equal(ours[mask].argmax(-1), ref[mask].argmax(-1))


def test_greedy_32_tokens_identical_to_transformers_generate(case):
    model, hf, fmt, prompts = case
    tok = model.tokenizer
    results = generate_responses(
        model, prompts, SamplingConfig(max_new_tokens=32, temperature=0.0), fmt=fmt, template="{prompt}"
    )
    stops = stop_token_ids(tok)
    for prompt_ids, res in zip(encode_prompts(tok, prompts, fmt, "{prompt}"), results):
        ref = hf_greedy(hf, prompt_ids, 32, stops)
        ref_stopped = ref[-1] in stops
        assert res[0]["stopped"] == ref_stopped
        assert res[0]["tokens"] == (ref[:-1] if ref_stopped else ref)
