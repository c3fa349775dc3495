"""Tiny random transformers (PyTorch) models of every supported family, the references for parity tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

BASE = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Each family with the flags that make it different switched on.
FAMILIES = {
    "llama": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rope_theta=5000.0,
    ),
    "mistral": dict(sliding_window=5),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(),
    "gemma": dict(),
    "gemma2": dict(
        sliding_window=5, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=24
    ),
    "gemma3_text": dict(
        sliding_window=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
        },
    ),
    "olmo2": dict(),
}


def tiny_model(model_type: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random model whose norms and biases are perturbed so that none of them is a no-op."""
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(model_type, **{**BASE, **FAMILIES[model_type], **overrides})
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def left_padded_batch(vocab: int, lengths: list[int], total: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens [B, total] with row i holding lengths[i] real tokens on the right."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, vocab, (len(lengths), total)).astype(np.int32)
    mask = np.zeros((len(lengths), total), bool)
    for i, n in enumerate(lengths):
        mask[i, total - n :] = True
        toks[i, : total - n] = 0
    return toks, mask


def hf_logits(model, toks: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """PyTorch logits with HF's left-padding position ids (cumsum of the mask)."""
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(toks, dtype=torch.long),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(pos, dtype=torch.long),
        )
    return out.logits.float().numpy()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
    """transformers' greedy `generate` for one unpadded prompt: the new tokens, a stop token included."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]).long(),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=stops[0],
        )
    return out[0, len(prompt_ids) :].tolist()


CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a small corpus for a tiny tokenizer",
    "answer the question with a short and clear sentence",
    "one two three four five six seven eight nine ten",
]


def tiny_tokenizer(vocab: int = 320, chat: bool = True) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences; ids 0/1/2 are <|endoftext|>/<|im_start|>/<|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(CORPUS * 10, trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat:
        tok.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    return tok
