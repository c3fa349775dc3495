"""Tokenizer helpers: prompt formatting (chat template or plain), stop tokens, left padding and buckets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from cme_jax.errors import CmeError

Message = dict[str, str]  # one chat turn: {"role": ..., "content": ...}

PromptFormat = Literal["auto", "chat", "plain"]

# End-of-turn markers of common chat formats; any that exist in a vocabulary stop generation.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eom_id|>",
)

DEFAULT_PLAIN_TEMPLATE = "{prompt}\n"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(
    tokenizer: Any,
    prompt: str,
    fmt: PromptFormat = "auto",
    template: str = DEFAULT_PLAIN_TEMPLATE,
    system: str | None = None,
) -> str:
    """The text a model sees before its response: its chat template, or a plain `{prompt}` template."""
    use_chat = fmt == "chat" or (fmt == "auto" and has_chat_template(tokenizer))
    if use_chat:
        if not has_chat_template(tokenizer):
            raise CmeError("prompt format 'chat' needs a tokenizer with a chat template; use format 'plain'")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if "{prompt}" not in template:
        raise CmeError(f"plain prompt template {template!r} must contain '{{prompt}}'")
    return template.replace("{prompt}", prompt)


def encode_context(tokenizer: Any, text: str, *, chat: bool) -> list[int]:
    """Token ids of a formatted context; chat templates already spell out BOS, plain text gets the default."""
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    fmt: PromptFormat = "auto",
    template: str = DEFAULT_PLAIN_TEMPLATE,
    system: str | None = None,
) -> list[list[int]]:
    """Token ids of each prompt after formatting."""
    chat = fmt == "chat" or (fmt == "auto" and has_chat_template(tokenizer))
    return [encode_context(tokenizer, format_prompt(tokenizer, p, fmt, template, system), chat=chat) for p in prompts]


def stop_token_ids(tokenizer: Any, extra: Sequence[str] = ()) -> list[int]:
    """EOS ids plus every known end-of-turn token in the vocabulary, plus user stop strings (single tokens)."""
    ids: set[int] = set()
    eos = tokenizer.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    vocab = tokenizer.get_vocab()
    for t in END_OF_TURN_TOKENS:
        if t in vocab:
            ids.add(vocab[t])
    for s in extra:
        if s in vocab:
            ids.add(vocab[s])
            continue
        enc = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise CmeError(f"stop string {s!r} is {len(enc)} tokens for this tokenizer; stop strings must be one token")
        ids.add(enc[0])
    return sorted(ids)


def pad_id(tokenizer: Any) -> int:
    """A padding id (the tokenizer's, else EOS, else 0); padded slots are masked so its value is inert."""
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(v, int):
            return v
    return 0


def bucket_length(n: int, minimum: int = 16, multiple: int = 64) -> int:
    """Padded length for n tokens: powers of two up to `multiple`, then multiples of it (few compilations)."""
    if n <= minimum:
        return minimum
    size = minimum
    while size < n and size < multiple:
        size *= 2
    if size >= n:
        return size
    return -(-n // multiple) * multiple


def left_pad(seqs: Sequence[Sequence[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded int32 tokens [B, length] and their bool mask."""
    toks = np.full((len(seqs), length), pad, np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence of {len(s)} tokens does not fit in {length}")
        if len(s):
            toks[i, length - len(s) :] = s
            mask[i, length - len(s) :] = True
    return toks, mask


def as_verbatim_prompt(tokenizer: Any, text: str, chat: bool) -> str:
    """`text` adjusted so plain encoding gives exactly the ids of `text` encoded as a (chat) context.

    Chat templates spell out BOS themselves while plain encoding adds the tokenizer's default specials,
    so a leading BOS in a rendered chat text is dropped when plain encoding would add it again.
    """
    if not chat:
        return text
    want = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token
    candidates = [text] + ([text[len(bos) :]] if bos and text.startswith(bos) else [])
    for cand in candidates:
        if list(tokenizer(cand, add_special_tokens=True)["input_ids"]) == want:
            return cand
    raise CmeError(
        "this tokenizer adds special tokens that a chat-formatted prompt cannot reproduce; use a plain prompt "
        "format (--format plain) for it"
    )


def render_conversation(tokenizer: Any, messages: Sequence[Message]) -> str:
    """A conversation as the prompt a model continues: its chat template, else a plain role transcript."""
    if has_chat_template(tokenizer):
        msgs = [dict(m) for m in messages]
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:
            # Some templates refuse a system turn; fold it into the first user turn instead.
            if not msgs or msgs[0]["role"] != "system" or len(msgs) < 2:
                raise
            system, first = msgs[0], msgs[1]
            merged = [{"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}, *msgs[2:]]
            text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
        return as_verbatim_prompt(tokenizer, text, chat=True)
    labels = {"user": "User: ", "assistant": "Assistant: ", "system": ""}
    return "\n\n".join(labels.get(m["role"], f"{m['role']}: ") + m["content"] for m in messages) + "\n\nAssistant:"


# Plain prompts go through `generate_responses` verbatim: the caller has already formatted them.
VERBATIM_TEMPLATE = "{prompt}"
