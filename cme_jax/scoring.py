"""Verifier scoring: the mean log-prob of a response under a frozen verifier LLM (Cross-Model Entropy).

Each verifier re-reads a response as text after its own context (its chat template, or a plain template):
the context and the response are tokenized separately with the verifier's tokenizer and concatenated, the
context left-padded to a length bucket and the response right-padded to another, so the response always
starts at the same static column and the vocabulary head runs only from there. When a verifier's tokenizer
is the policy's, `score_same_vocab` builds the same rows on device from the policy's response ids instead.
A served verifier (`VerifierConfig.url`) gets the same token ids, and an inference server scores them
(`cme_jax.remote`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import einops
import jax
import jax.numpy as jnp
import numpy as np

from cme_jax.distributed import data_shards, to_host
from cme_jax.errors import CmeError
from cme_jax.models.logprobs import DEFAULT_CHUNK_ELEMENTS, token_logprobs
from cme_jax.models.transformer import Array, ModelConfig, Weights
from cme_jax.tokens import DEFAULT_PLAIN_TEMPLATE, bucket_length, encode_context, format_prompt, has_chat_template
from cme_jax.tokens import pad_id as tokenizer_pad_id

ContextFormat = Literal["auto", "chat", "plain"]
VerifierDtype = Literal["auto", "float32", "bfloat16"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Settings of served verifiers only (see VerifierConfig.url).
_SERVED_FIELDS = ("server_model", "key_env", "timeout", "concurrency", "request_rows", "retries", "cache")
# Any text works as the probe as long as a chat template copies it verbatim into the assistant turn.
_PROBE = "cme-probe-7Qx"


def _check_choice(field: str, value: object, allowed: object) -> None:
    choices = get_args(allowed)
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not allowed; choose one of {', '.join(map(repr, choices))}")


def default_verifier_name(model: str) -> str:
    """A short name for result keys (`cme_<name>`) derived from a model spec."""
    base = Path(model.rstrip("/")).name or model
    base = base.removesuffix(".gguf").split("@")[0]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "verifier"
    return name if name[0].isalnum() else "v" + name


@dataclasses.dataclass(frozen=True)
class VerifierConfig:
    """One frozen verifier: which model, its weight in the combined reward and how it reads a response."""

    model: str
    name: str = ""  # key in results and metrics; derived from `model` when empty
    weight: float = 1.0
    context: ContextFormat = "auto"  # auto = the chat template when the tokenizer has one, else plain
    template: str = DEFAULT_PLAIN_TEMPLATE  # plain context, with {prompt}
    score_eos: bool = False  # also score the end-of-turn token after responses that stopped
    dtype: VerifierDtype = "auto"  # auto = bfloat16 on accelerators, float32 on the CPU
    max_length: int = 1024  # response tokens scored at most; longer responses are scored on their start
    contrastive: bool = False  # subtract the response's mean log-prob after an empty prompt
    # A served verifier: with `url` set, the model runs on an OpenAI-compatible server (vLLM) and `model` only
    # names its tokenizer (Hub id or local directory), with which cme_jax builds the token ids it sends.
    url: str | None = None  # base URL of the server, e.g. http://node7:8000/v1
    server_model: str | None = None  # the name the server serves the model under; default: model
    key_env: str | None = None  # environment variable holding the server's API key; null = the server needs none
    timeout: float = 300.0  # seconds one request may take
    concurrency: int = 16  # requests in flight at once
    request_rows: int = 64  # rows per request at most (fewer, so that `concurrency` requests carry them all)
    retries: int = 5  # retries of a request after a timeout, a dropped connection or HTTP 408/429/5xx
    cache: str | None = "auto"  # directory of already scored rows; auto = <cme_jax cache>/served, null = none

    def __post_init__(self) -> None:
        """Validate every field with one line naming it; fill in the default name and server model."""
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"verifier.model={self.model!r} must be a model spec (Hub id, directory, .gguf, alias)")
        if not isinstance(self.name, str):
            raise ValueError(f"verifier.name={self.name!r} must be a string")
        if not self.name:
            object.__setattr__(self, "name", default_verifier_name(self.model))
        if not _NAME_RE.match(self.name):
            raise ValueError(f"verifier.name={self.name!r} may only hold letters, digits, '_', '-' and '.'")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not np.isfinite(w):
            raise ValueError(f"verifier.weight={w!r} must be a finite number")
        _check_choice("verifier.context", self.context, ContextFormat)
        _check_choice("verifier.dtype", self.dtype, VerifierDtype)
        if not isinstance(self.template, str) or "{prompt}" not in self.template:
            raise ValueError(f"verifier.template={self.template!r} must be a string containing '{{prompt}}'")
        for flag in ("score_eos", "contrastive"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"verifier.{flag}={getattr(self, flag)!r} must be true or false")
        m = self.max_length
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"verifier.max_length={m!r} must be an integer >= 1")
        self._check_served()

    def _check_served(self) -> None:
        if self.url is None:
            for f in dataclasses.fields(self):
                if f.name in _SERVED_FIELDS and getattr(self, f.name) != f.default:
                    raise ValueError(
                        f"verifier.{f.name} applies to served verifiers only; set verifier.url to the server, "
                        f"or drop {f.name}"
                    )
            return
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ValueError(
                f"verifier.url={self.url!r} must be the http(s) base URL of an OpenAI-compatible server, "
                "e.g. http://node7:8000/v1"
            )
        if self.dtype != "auto":
            raise ValueError(
                f"verifier.dtype={self.dtype!r}: a served verifier runs in the server's dtype "
                "(vllm serve --dtype); leave dtype auto"
            )
        if self.server_model is None:
            object.__setattr__(self, "server_model", self.model)
        if not isinstance(self.server_model, str) or not self.server_model.strip():
            raise ValueError(f"verifier.server_model={self.server_model!r} must name the model the server serves")
        if self.key_env is not None and not (isinstance(self.key_env, str) and _ENV_RE.match(self.key_env)):
            raise ValueError(f"verifier.key_env={self.key_env!r} must be the name of an environment variable")
        t = self.timeout
        if isinstance(t, bool) or not isinstance(t, int | float) or not t > 0 or not np.isfinite(t):
            raise ValueError(f"verifier.timeout={t!r} must be a number of seconds > 0")
        for field, low in (("concurrency", 1), ("request_rows", 1), ("retries", 0)):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"verifier.{field}={v!r} must be an integer >= {low}")
        if self.cache is not None and (not isinstance(self.cache, str) or not self.cache.strip()):
            raise ValueError(f"verifier.cache={self.cache!r} must be a directory, 'auto' or null (no cache)")

    @property
    def served(self) -> bool:
        """Whether an inference server scores for this verifier (`url` is set)."""
        return self.url is not None


def resolve_dtype(name: VerifierDtype) -> Any:
    """bfloat16 on accelerators and float32 on the CPU for "auto"."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def same_tokenizer(a: Any, b: Any) -> bool:
    """True when two tokenizers map the same strings to the same ids with the same special tokens.

    Compares the full vocabulary (added tokens included), the BOS/EOS ids and the set of special ids, so
    token ids from one are valid, identically decoded input for a model trained with the other.
    """
    if a is b:
        return True
    if (a.bos_token_id, a.eos_token_id) != (b.bos_token_id, b.eos_token_id):
        return False
    if set(a.all_special_ids) != set(b.all_special_ids) or len(a) != len(b):
        return False
    return a.get_vocab() == b.get_vocab()


def hidden_token_ids(tokenizer: Any) -> np.ndarray:
    """Sorted int32 ids that decoding with skip_special_tokens drops (special tokens): text responses lose them."""
    candidates = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    ids = [i for i in candidates if tokenizer.decode([i], skip_special_tokens=True) == ""]
    return np.asarray(sorted(ids), np.int32)


def encode_response(tokenizer: Any, text: str) -> list[int]:
    """Response ids with special-token text kept as text ("<eos>" in a response is five characters)."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def end_of_turn_id(tokenizer: Any, chat: bool) -> int | None:
    """The token that ends a response: the chat template's end of the assistant turn, else EOS."""
    eos = tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, int) else None
    if not chat:
        return eos
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:
        return eos
    if _PROBE not in text:
        return eos
    suffix = text.split(_PROBE, 1)[1]
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    if ids and ids[0] in set(tokenizer.all_special_ids):
        return int(ids[0])
    return eos


@dataclasses.dataclass
class Verifier:
    """A loaded verifier: its config, model (weights, cfg, tokenizer) and how it builds its inputs."""

    config: VerifierConfig
    model: Any  # cme_jax.sources.LoadedModel
    chat: bool
    end_id: int | None
    pad: int
    remote: Any = None  # cme_jax.remote.ServedVerifier when an inference server scores (config.url), else None
    _contexts: dict[str, list[int]] = dataclasses.field(default_factory=dict, repr=False)
    _same_as: dict[int, bool] = dataclasses.field(default_factory=dict, repr=False)
    _hidden: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_model(cls, config: VerifierConfig, model: Any) -> Verifier:
        """Wrap an already loaded model (cme_jax.sources.LoadedModel) as a verifier."""
        tok = model.tokenizer
        if tok is None:
            raise CmeError(f"verifier {config.name!r}: the model was loaded without its tokenizer")
        if config.context == "chat" and not has_chat_template(tok):
            raise CmeError(
                f"verifier {config.name!r}: context 'chat' needs a chat template, which {config.model} lacks; "
                "use context 'plain' with a template"
            )
        chat = config.context == "chat" or (config.context == "auto" and has_chat_template(tok))
        end_id = end_of_turn_id(tok, chat)
        if config.score_eos and end_id is None:
            raise CmeError(f"verifier {config.name!r}: score_eos needs an EOS token, which {config.model} lacks")
        remote = None
        if config.served:
            from cme_jax.remote import ServedVerifier

            remote = ServedVerifier(config)
        return cls(config, model, chat, end_id, tokenizer_pad_id(tok), remote)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def context_ids(self, prompt: str) -> list[int]:
        """Token ids of the verifier's context for a prompt (cached: prompts recur across a group)."""
        ids = self._contexts.get(prompt)
        if ids is None:
            text = format_prompt(self.tokenizer, prompt, "chat" if self.chat else "plain", self.config.template)
            ids = encode_context(self.tokenizer, text, chat=self.chat)
            if not ids:
                raise CmeError(
                    f"verifier {self.name!r}: the context of prompt {prompt[:40]!r} is empty; "
                    "use a template with some text around {prompt}"
                )
            if len(self._contexts) >= 4096:  # a group's prompts repeat; a whole dataset need not stay cached
                self._contexts.clear()
            self._contexts[prompt] = ids
        return ids

    def response_ids(self, text: str, stopped: bool = True) -> tuple[list[int], bool]:
        """Scored ids of a response (cut to max_length, end token appended when configured) and whether it was cut."""
        ids = encode_response(self.tokenizer, text)
        limit = self.config.max_length
        if len(ids) > limit:
            return ids[:limit], True
        if self.config.score_eos and stopped:
            ids = [*ids, self.end_id]
        return ids, False

    @property
    def hidden_ids(self) -> np.ndarray:
        """Ids a decoded response loses (special tokens): the fast path drops them to match the text path."""
        if self._hidden is None:
            self._hidden = hidden_token_ids(self.tokenizer)
        return self._hidden

    def shares_vocabulary(self, tokenizer: Any) -> bool:
        """Whether the same-vocabulary fast path applies for a policy with this tokenizer (never when served:
        that path runs the verifier's weights on this machine)."""
        if self.remote is not None:
            return False
        key = id(tokenizer)
        if key not in self._same_as:
            self._same_as[key] = same_tokenizer(self.tokenizer, tokenizer)
        return self._same_as[key]


def load_verifier(config: VerifierConfig, *, mesh: Any = None) -> Verifier:
    """Load a verifier's model in its configured dtype (into `mesh` shardings when given); a served verifier's
    tokenizer only."""
    from cme_jax.sources import LoadedModel, load_model, load_tokenizer, resolve

    if config.served:
        src = resolve(config.model, weights=False)
        # No config or weights: the server runs the model, and only the tokenizer is used here.
        model = LoadedModel(config.model, None, None, load_tokenizer(src), src.hf_config, src)
        return Verifier.from_model(config, model)
    return Verifier.from_model(config, load_model(config.model, dtype=resolve_dtype(config.dtype), mesh=mesh))


# ----------------------------------------------------------------------------------------------------------
# Scoring on device


# Tokens per forward inside `score_rows`: bounds activation memory (about 80 KiB a token for Gemma-3-270M
# in float32) however many rows a call scores, while keeping the matmuls large.
DEFAULT_BLOCK_TOKENS = 4096


def _score_block(
    weights: Weights, cfg: ModelConfig, tokens_BxT: Array, mask_BxT: Array, start: int, chunk_budget: int
) -> tuple[Array, Array]:
    logp_BxN = token_logprobs(weights, cfg, tokens_BxT, mask_BxT, start=start, chunk_budget=chunk_budget)
    return logp_BxN.sum(axis=1), mask_BxT[:, start:].astype(jnp.int32).sum(axis=1)


def score_rows(
    weights: Weights,
    cfg: ModelConfig,
    tokens_BxT: Array,
    mask_BxT: Array,
    *,
    start: int,
    chunk_budget: int = DEFAULT_CHUNK_ELEMENTS,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
) -> tuple[Array, Array]:
    """Sum of log-probs and count of the real tokens at columns >= start: float32 [B] and int32 [B].

    Rows go through the model in blocks of about `block_tokens` tokens (a scan), so memory does not grow
    with the row count. Block j takes rows j, j + n, j + 2n, ... so that rows sharded over devices stay put.
    """
    B, T = tokens_BxT.shape
    mask_BxT = jnp.asarray(mask_BxT, bool)
    n = min(B, max(1, -(-B * T // block_tokens)))
    if n == 1:
        return _score_block(weights, cfg, tokens_BxT, mask_BxT, start, chunk_budget)
    rows = -(-B // n)
    pad = ((0, rows * n - B), (0, 0))
    # Row i goes to block i % n, so each block takes rows spread over the whole (possibly sharded) batch.
    tokens_nxRxT = einops.rearrange(jnp.pad(tokens_BxT, pad), "(r n) t -> n r t", n=n)
    mask_nxRxT = einops.rearrange(jnp.pad(mask_BxT, pad), "(r n) t -> n r t", n=n)
    total_nxR, count_nxR = jax.lax.map(
        lambda xs: _score_block(weights, cfg, xs[0], xs[1], start, chunk_budget), (tokens_nxRxT, mask_nxRxT)
    )
    unblock = lambda x_nxR: einops.rearrange(x_nxR, "n r -> (r n)")[:B]
    return unblock(total_nxR), unblock(count_nxR)


score_rows_jit = jax.jit(score_rows, static_argnames=("cfg", "start", "chunk_budget", "block_tokens"))


def join_prompts(
    prompt_tokens_PxC: Array, prompt_mask_PxC: Array, response_tokens_RxN: Array, response_mask_RxN: Array
) -> tuple[Array, Array]:
    """Full sequences [R, C + N]: each left-padded prompt repeated for its G group-major responses."""
    G = response_tokens_RxN.shape[0] // prompt_tokens_PxC.shape[0]
    prompt_tokens = jnp.repeat(jnp.asarray(prompt_tokens_PxC), G, axis=0)
    tokens = jnp.concatenate([prompt_tokens, jnp.asarray(response_tokens_RxN).astype(prompt_tokens.dtype)], axis=1)
    mask = jnp.concatenate(
        [jnp.repeat(jnp.asarray(prompt_mask_PxC, bool), G, axis=0), jnp.asarray(response_mask_RxN, bool)], axis=1
    )
    return tokens, mask


def is_member(tokens: Array, sorted_ids_K: Array | None) -> Array:
    """Whether each token is one of `sorted_ids_K` (a binary search: no [..., K] comparison array)."""
    tokens = jnp.asarray(tokens)
    if sorted_ids_K is None or sorted_ids_K.shape[0] == 0:
        return jnp.zeros(tokens.shape, bool)
    ids = jnp.asarray(sorted_ids_K, tokens.dtype)
    at = jnp.clip(jnp.searchsorted(ids, tokens), 0, ids.shape[0] - 1)
    return ids[at] == tokens


def visible_response(
    response_tokens_RxN: Array, response_mask_RxN: Array, stopped_R: Array, hidden_ids_K: Array | None, pad_id: int
) -> tuple[Array, Array]:
    """The ids decoding keeps, moved to the front of each row, and how many there are per row.

    Drops the final stop token (present when stopped) and every id in `hidden_ids_K` (sorted; the special
    tokens that decoding skips), so that for text that re-encodes to the same ids this is what the text path
    scores. Returns int32 tokens [R, N] (pad after the kept ids) and lengths [R].
    """
    tokens = jnp.asarray(response_tokens_RxN).astype(jnp.int32)
    R, N = tokens.shape
    stopped_R = jnp.asarray(stopped_R, bool)
    length_R = jnp.asarray(response_mask_RxN).astype(jnp.int32).sum(axis=1) - stopped_R.astype(jnp.int32)
    content_RxN = jnp.arange(N)[None, :] < length_R[:, None]
    if hidden_ids_K is None or hidden_ids_K.shape[0] == 0:
        return jnp.where(content_RxN, tokens, pad_id), jnp.maximum(length_R, 0)
    keep_RxN = content_RxN & ~is_member(tokens, hidden_ids_K)
    dest_RxN = jnp.where(keep_RxN, jnp.cumsum(keep_RxN, axis=1) - 1, N)  # column N is out of range: dropped
    out = jnp.full((R, N), pad_id, jnp.int32).at[jnp.arange(R)[:, None], dest_RxN].set(tokens, mode="drop")
    return out, keep_RxN.astype(jnp.int32).sum(axis=1)


def same_vocab_rows(
    context_tokens_PxC: Array,
    context_mask_PxC: Array,
    response_tokens_RxN: Array,
    response_mask_RxN: Array,
    stopped_R: Array,
    *,
    end_id: int,
    score_eos: bool,
    max_length: int,
    pad_id: int,
    hidden_ids_K: Array | None = None,
) -> dict[str, Array]:
    """Verifier rows built from policy ids on device: the text path's inputs without decoding.

    Rows are group-major (R = P * G, the G responses of prompt p at rows p*G..p*G+G-1; P may also be 1, one
    context for every row). Response rows hold the policy's ids with the stop token (present when stopped)
    last; it is dropped, as are `hidden_ids_K` (see `visible_response`), and the verifier's end token is
    appended when `score_eos` and the response stopped and was not cut. Returns tokens/mask [R, C + W] with
    the response from column C (W = min(N, max_length + 1)), and `content` (response tokens scored before the
    end token), `empty` and `truncated` per row.
    """
    N = response_tokens_RxN.shape[1]
    tokens_RxN, length_R = visible_response(response_tokens_RxN, response_mask_RxN, stopped_R, hidden_ids_K, pad_id)
    kept_R = jnp.minimum(length_R, max_length)
    W = min(N, max_length + 1)
    col_W = jnp.arange(W)[None, :]
    keep_RxW = col_W < kept_R[:, None]
    tokens_RxW = jnp.where(keep_RxW, tokens_RxN[:, :W], pad_id)
    truncated_R = length_R > max_length
    mask_RxW = keep_RxW
    if score_eos:
        ends_R = jnp.asarray(stopped_R, bool) & ~truncated_R
        at_end_RxW = (col_W == length_R[:, None]) & ends_R[:, None]
        tokens_RxW = jnp.where(at_end_RxW, end_id, tokens_RxW)
        mask_RxW = keep_RxW | at_end_RxW
    tokens, mask = join_prompts(context_tokens_PxC, context_mask_PxC, tokens_RxW, mask_RxW)
    return {
        "tokens": tokens,
        "mask": mask,
        "content": kept_R,
        "empty": length_R <= 0,
        "truncated": truncated_R,
    }


def score_same_vocab(
    weights: Weights,
    cfg: ModelConfig,
    context_tokens_PxC: Array,
    context_mask_PxC: Array,
    response_tokens_RxN: Array,
    response_mask_RxN: Array,
    stopped_R: Array,
    *,
    end_id: int,
    score_eos: bool,
    max_length: int,
    pad_id: int,
    hidden_ids_K: Array | None = None,
    chunk_budget: int = DEFAULT_CHUNK_ELEMENTS,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
) -> dict[str, Array]:
    """Mean verifier log-prob of policy responses given as ids (pure, jittable: fuses into a train step).

    Returns float32 `mean` [R] (0 where no token was scored), int32 `count` (scored tokens, end token
    included), `content`, bool `empty` and `truncated`, as the text path gives for the decoded responses
    whenever decoding and re-encoding gives back the same ids. Pass the verifier's `hidden_ids` as
    `hidden_ids_K` so that special tokens inside a response are dropped as decoding drops them.
    """
    rows = same_vocab_rows(
        context_tokens_PxC,
        context_mask_PxC,
        response_tokens_RxN,
        response_mask_RxN,
        stopped_R,
        end_id=end_id,
        score_eos=score_eos,
        max_length=max_length,
        pad_id=pad_id,
        hidden_ids_K=hidden_ids_K,
    )
    C = context_tokens_PxC.shape[1]
    total, count = score_rows(
        weights, cfg, rows["tokens"], rows["mask"], start=C, chunk_budget=chunk_budget, block_tokens=block_tokens
    )
    mean = total / jnp.maximum(count, 1).astype(jnp.float32)
    return {"mean": mean, "count": count, **{k: rows[k] for k in ("content", "empty", "truncated")}}


score_same_vocab_jit = jax.jit(
    score_same_vocab,
    static_argnames=("cfg", "end_id", "score_eos", "max_length", "pad_id", "chunk_budget", "block_tokens"),
)


# ----------------------------------------------------------------------------------------------------------
# Scoring text (any tokenizer)


@dataclasses.dataclass
class VerifierScores:
    """Per-row results of one verifier, as host numpy arrays."""

    mean: np.ndarray  # [R] float32 mean log-prob of the scored tokens (contrastive: minus the empty-prompt mean)
    count: np.ndarray  # [R] int32 scored tokens (end token included)
    empty: np.ndarray  # [R] bool, no response token to score
    truncated: np.ndarray  # [R] bool, longer than max_length and scored on its first max_length tokens
    served_seconds: float = 0.0  # a served verifier's time from its first request to its last reply


def pack_rows(
    contexts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad: int,
    *,
    rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Tokens and mask [rows, C + N]: contexts left-padded to bucket C, responses right-padded to bucket N.

    Extra rows (up to `rows`) are fully masked. Returns (tokens, mask, C), where C is the static start.
    """
    n = len(contexts) if rows is None else rows
    C = bucket_length(max(len(c) for c in contexts))
    N = bucket_length(max((len(r) for r in responses), default=0))
    tokens = np.full((n, C + N), pad, np.int32)
    mask = np.zeros((n, C + N), bool)
    for i, (c, r) in enumerate(zip(contexts, responses)):
        tokens[i, C - len(c) : C] = c
        mask[i, C - len(c) : C] = True
        tokens[i, C : C + len(r)] = r
        mask[i, C : C + len(r)] = True
    return tokens, mask, C


def _score_id_rows(
    verifier: Verifier,
    contexts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    batch_size: int | None,
    mesh: Any,
    chunk_budget: int,
    block_tokens: int,
    progress: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum and count per row, in batches of similar length; every batch padded to the same row count."""
    R = len(contexts)
    total = np.zeros(R, np.float32)
    count = np.zeros(R, np.int32)
    model = verifier.model
    size = R if batch_size is None else min(batch_size, R)
    mult = data_shards(mesh)
    size = -(-size // mult) * mult
    order = np.argsort([len(c) + len(r) for c, r in zip(contexts, responses)], kind="stable")
    if batch_size is None or batch_size >= R:
        order = np.arange(R)
    limit = model.cfg.max_position
    for lo in range(0, R, size):
        idx = order[lo : lo + size]
        tokens, mask, start = pack_rows(
            [contexts[i] for i in idx], [responses[i] for i in idx], verifier.pad, rows=size
        )
        if tokens.shape[1] > limit:
            longest = max(len(contexts[i]) + len(responses[i]) for i in idx)
            raise CmeError(
                f"verifier {verifier.name!r}: a context plus response of {longest} tokens (padded to "
                f"{tokens.shape[1]}) exceeds the model's {limit} positions; lower max_length or shorten prompts"
            )
        if mesh is not None:
            from cme_jax.models.sharding import batch_sharding

            tokens = jax.device_put(tokens, batch_sharding(mesh, 2))
            mask = jax.device_put(mask, batch_sharding(mesh, 2))
        kw = dict(start=start, chunk_budget=chunk_budget, block_tokens=block_tokens)
        s, c = score_rows_jit(model.weights, model.cfg, tokens, mask, **kw)
        total[idx] = to_host(s)[: len(idx)]
        count[idx] = to_host(c)[: len(idx)]
        if progress is not None:
            progress.update(len(idx))
    return total, count


def score_texts(
    verifier: Verifier,
    prompts: Sequence[str],
    responses: Sequence[str],
    stopped: Sequence[bool] | np.ndarray | None = None,
    *,
    batch_size: int | None = None,
    mesh: Any = None,
    chunk_budget: int = DEFAULT_CHUNK_ELEMENTS,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    progress: Any = None,
) -> VerifierScores:
    """CME of each (prompt, response) pair under one verifier, tokenizing both with its own tokenizer.

    `prompts[i]` is the prompt of `responses[i]`. `stopped[i]` says whether response i ended on its own
    (its end token is scored when score_eos); default all True. batch_size=None scores all rows at once;
    with a `mesh` rows are sharded over its data axes. `progress` is an optional tqdm-like counter.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    R = len(responses)
    stopped_R = np.ones(R, bool) if stopped is None else np.asarray(stopped, bool)
    if stopped_R.shape != (R,):
        raise ValueError(f"stopped has shape {stopped_R.shape}, expected ({R},)")
    if R == 0:
        empty = np.zeros(0, np.float32)
        return VerifierScores(empty, empty.astype(np.int32), empty.astype(bool), empty.astype(bool))
    contexts = [verifier.context_ids(p) for p in prompts]
    encoded = [verifier.response_ids(t, bool(s)) for t, s in zip(responses, stopped_R)]
    ids = [e[0] for e in encoded]
    truncated = np.array([e[1] for e in encoded], bool)
    end = 1 if verifier.config.score_eos else 0
    content = np.array([len(i) - (0 if t else end * bool(s)) for i, t, s in zip(ids, truncated, stopped_R)])
    bare = [verifier.context_ids("")] * R if verifier.config.contrastive else []
    seconds = 0.0
    if verifier.remote is not None:
        # Both passes in one call: every row in flight at once.
        sums = verifier.remote.score_rows(contexts + bare, ids + ids[: len(bare)], progress=progress, counted=R)
        total, count, seconds = sums.total[:R], sums.count[:R], sums.seconds
        base_total, base_count = sums.total[R:], sums.count[R:]
    else:
        kw = dict(batch_size=batch_size, mesh=mesh, chunk_budget=chunk_budget, block_tokens=block_tokens)
        total, count = _score_id_rows(verifier, contexts, ids, progress=progress, **kw)
        if bare:
            base_total, base_count = _score_id_rows(verifier, bare, ids, progress=None, **kw)
    mean = total / np.maximum(count, 1)
    if bare:
        mean = mean - base_total / np.maximum(base_count, 1)
    return VerifierScores(mean.astype(np.float32), count, content <= 0, truncated, seconds)


def check_finite(values: np.ndarray, valid: np.ndarray, what: str) -> None:
    """Raise CmeError naming `what` when a row that counts holds NaN or infinity."""
    bad = valid & ~np.isfinite(values)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise CmeError(
            f"{what} gave {int(bad.sum())} non-finite score(s) of {len(values)} (first at row {first}); "
            "run it in float32 (dtype: float32) or check the model"
        )


def plain_verifier(verifier: Verifier) -> Verifier:
    """The verifier in its plain form (itself unless its config is contrastive), sharing the loaded model."""
    if not verifier.config.contrastive:
        return verifier
    return Verifier.from_model(dataclasses.replace(verifier.config, contrastive=False), verifier.model)


def score_key(verifier: Verifier, prompt: str, text: str, stopped: bool) -> str:
    """Cache key of one scored row: everything in the verifier's config that changes its scores, and the row."""
    vc = verifier.config
    ident = {k: getattr(vc, k) for k in ("model", "context", "template", "max_length", "score_eos", "dtype")}
    if vc.served:  # the model that scores is the server's; `model` only names the tokenizer
        ident["server_model"] = vc.server_model
    blob = json.dumps({"verifier": ident, "prompt": prompt, "text": text, "stopped": stopped}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def score_unique(
    verifier: Verifier,
    prompts: Sequence[str],
    texts: Sequence[str],
    stopped: Sequence[bool] | np.ndarray | None = None,
    *,
    cache: Any = None,
    **kw: Any,
) -> VerifierScores:
    """`score_texts` of each row, scoring each distinct (prompt, text, stopped) row once and none found in `cache`
    (anything with get(key) -> str | None and put(key, tag, str), e.g. judging.JsonlCache)."""
    stopped = [True] * len(texts) if stopped is None else [bool(x) for x in stopped]
    keys = list(zip(prompts, texts, stopped))
    index: dict[tuple[str, str, bool], int] = {}
    for k in keys:
        index.setdefault(k, len(index))
    uniq = list(index)
    n = len(uniq)
    out = VerifierScores(np.zeros(n, np.float32), np.zeros(n, np.int32), np.zeros(n, bool), np.zeros(n, bool))
    hashes = [score_key(verifier, *k) if cache is not None else "" for k in uniq]
    todo = []
    for i, h in enumerate(hashes):
        hit = cache.get(h) if cache is not None else None
        if hit is None:
            todo.append(i)
            continue
        out.mean[i], out.count[i], out.empty[i], out.truncated[i] = json.loads(hit)
    if todo:
        s = score_texts(
            verifier, [uniq[i][0] for i in todo], [uniq[i][1] for i in todo], [uniq[i][2] for i in todo], **kw
        )
        for j, i in enumerate(todo):
            out.mean[i], out.count[i], out.empty[i], out.truncated[i] = (
                s.mean[j],
                s.count[j],
                s.empty[j],
                s.truncated[j],
            )
            if cache is not None:
                row = [float(s.mean[j]), int(s.count[j]), bool(s.empty[j]), bool(s.truncated[j])]
                cache.put(hashes[i], verifier.config.model, json.dumps(row))
    idx = np.array([index[k] for k in keys], np.int64)
    return VerifierScores(out.mean[idx], out.count[idx], out.empty[idx], out.truncated[idx])
