"""Served verifiers: CME from an inference server (vLLM) that holds a verifier too large to sit beside the policy.

cme_jax builds every row's token ids itself (`cme_jax.scoring.score_texts`: the verifier's context, then the
response, with the verifier's tokenizer), so token boundaries and scored positions are those of the local
path. Rows go to vLLM's OpenAI-compatible `POST {url}/completions` as lists of token ids, with
`max_tokens: 1`, `temperature: 0` and vLLM's `prompt_logprobs: 0`: the reply's `choices[i].prompt_logprobs`
holds, for every position after the first, a map from token id (a JSON string) to `{logprob, rank,
decoded_token}` that includes the token that was sent. The response positions' log-probs are summed here.

Requests carry several rows each and run concurrently (at most `concurrency` at once, sized so that up to
`concurrency * request_rows` rows are all in flight together); timeouts, dropped connections and HTTP
408/429/5xx are retried with backoff (`cme_jax.endpoints`); a 4xx, or a reply whose token ids are not those
sent, stops with one line. Every scored row is appended to an on-disk cache keyed by (server model, token
ids), so an interrupted `score` or `audit` asks the server only for what it has not answered yet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cme_jax.endpoints import JsonEndpoint, Transient, map_concurrently
from cme_jax.errors import CmeError

if TYPE_CHECKING:
    from cme_jax.scoring import VerifierConfig

# vLLM sends a log-prob of -inf (a token the model can never produce) as this number: JSON has no infinity.
VLLM_NEG_INF = -9999.0


@dataclasses.dataclass
class RowSums:
    """Per row: the sum of the response tokens' log-probs and their count; the time the requests took."""

    total: np.ndarray  # [R] float64
    count: np.ndarray  # [R] int32
    seconds: float  # from the first request sent to the last reply (0 when every row came from the cache)


def cache_path(directory: str | Path, server_model: str) -> Path:
    """The cache file of one served model: a readable name plus a hash (names may hold '/' and ':')."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", server_model).strip("-.")[:60] or "model"
    digest = hashlib.sha256(server_model.encode("utf-8")).hexdigest()[:12]
    return Path(directory) / f"{slug}-{digest}.jsonl"


def row_key(server_model: str, context: Sequence[int], response: Sequence[int]) -> str:
    """Cache key of one scored row: the served model and the exact ids (the context's length marks the split)."""
    blob = json.dumps([server_model, len(context), [*context, *response]], separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def completion_request(server_model: str, rows: Sequence[Sequence[int]]) -> dict[str, Any]:
    """vLLM's completions body that returns every prompt token's log-prob and generates one token."""
    return {
        "model": server_model,
        "prompt": [list(map(int, r)) for r in rows],
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": 0,
        "return_token_ids": True,  # newer vLLM echoes prompt_token_ids; older versions ignore the field
    }


def response_sums(reply: Any, rows: Sequence[Sequence[int]], starts: Sequence[int], label: str) -> list[float]:
    """Sum of the log-probs at positions start.. of each row from a completions reply (CmeError on a mismatch).

    A reply that is not a completion at all raises Transient (a proxy's error page is worth asking again).
    """
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list):
        raise Transient("the reply is not a completion")
    if len(choices) != len(rows):
        raise CmeError(f"{label}: the server answered {len(choices)} choices for {len(rows)} prompts in one request")
    try:
        choices = sorted(choices, key=lambda c: c["index"])
    except (KeyError, TypeError):
        raise CmeError(f"{label}: a choice of the server's reply has no index") from None
    sums = []
    for r, (choice, ids, start) in enumerate(zip(choices, rows, starts)):
        echoed = choice.get("prompt_token_ids")
        if echoed is not None and list(echoed) != list(ids):
            at = next((i for i, (a, b) in enumerate(zip(ids, echoed)) if a != b), min(len(ids), len(echoed)))
            raise CmeError(
                f"{label}: the server read other token ids than were sent ({len(echoed)} ids for {len(ids)}, first "
                f"difference at position {at}); serve the model whose tokenizer is verifier.model, and a vLLM that "
                "takes token-id prompts as they are"
            )
        lps = choice.get("prompt_logprobs")
        if not isinstance(lps, list):
            raise CmeError(
                f"{label}: the reply holds no prompt_logprobs; the server must support vLLM's prompt_logprobs "
                "extension of /completions"
            )
        if len(lps) != len(ids):
            raise CmeError(f"{label}: the reply has {len(lps)} prompt log-probs for a prompt of {len(ids)} tokens")
        total = 0.0
        for p in range(start, len(ids)):
            entry = lps[p]
            hit = entry.get(str(ids[p])) if isinstance(entry, dict) else None
            if not isinstance(hit, dict) or not isinstance(hit.get("logprob"), int | float):
                got = sorted(entry)[:3] if isinstance(entry, dict) else entry
                raise CmeError(
                    f"{label}: the reply gives no log-prob for token {ids[p]} at position {p} of prompt {r} "
                    f"(it has {got}); the server read other token ids than were sent"
                )
            lp = float(hit["logprob"])
            total += -math.inf if lp <= VLLM_NEG_INF else lp  # non-finite, as locally: the caller reports it
        sums.append(total)
    return sums


class ServedVerifier:
    """The client of one served verifier (a `VerifierConfig` with `url`): requests, retries and the cache."""

    def __init__(self, config: VerifierConfig):
        self.config = config
        self.label = f"verifier {config.name!r}"
        self.endpoint = JsonEndpoint(
            config.url.rstrip("/") + "/completions",
            label=self.label,
            api_key_env=config.key_env,
            key_field="key_env",
            max_retries=config.retries,
            timeout=config.timeout,
        )
        self.cache_file: Path | None = None
        if config.cache is not None:
            from cme_jax.sources import cache_root

            directory = cache_root() / "served" if config.cache == "auto" else Path(config.cache).expanduser()
            self.cache_file = cache_path(directory, config.server_model)
        self._cache: Any = None  # opened on first use, then shared by every call
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        c = self.config
        return f"ServedVerifier({c.name!r}, url={c.url!r}, server_model={c.server_model!r})"

    def _open_cache(self) -> Any:
        """The on-disk cache (loaded once); without one, a map for this call only (a run's rows would pile up)."""
        from cme_jax.files import JsonlCache  # an append-only JSONL map of finished answers

        if self.cache_file is None:
            return JsonlCache(None)
        with self._lock:
            if self._cache is None:
                self._cache = JsonlCache(self.cache_file)
            return self._cache

    def score_rows(
        self,
        contexts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        *,
        progress: Any = None,
        counted: int | None = None,
    ) -> RowSums:
        """Sum and count of each response's token log-probs after its context, as `scoring` does locally.

        Identical rows are sent once, cached rows not at all. `progress` (tqdm-like) advances by the rows
        below index `counted` (default all) as their replies land.
        """
        n = len(contexts)
        counted = n if counted is None else counted
        model = self.config.server_model
        total = np.zeros(n, np.float64)
        count = np.array([len(r) for r in responses], np.int32)
        cache = self._open_cache()
        keys: dict[str, list[int]] = {}  # row key -> the indices that hold that row
        for i, (c, r) in enumerate(zip(contexts, responses)):
            if r:  # nothing to score in an empty response: sum and count 0, as locally
                keys.setdefault(row_key(model, c, r), []).append(i)
        todo = []
        for key, idx in keys.items():
            hit = cache.get(key)
            if hit is None:
                todo.append(key)
                continue
            total[idx] = float(hit)
        waiting = sum(i < counted for k in todo for i in keys[k])
        if progress is not None and min(n, counted) > waiting:
            progress.update(min(n, counted) - waiting)
        if not todo:
            return RowSums(total, count, 0.0)

        # As many requests as needed to carry at most request_rows rows each, and at least `concurrency` of them
        # when there are enough rows, so that every row is in flight at once.
        size = max(1, min(self.config.request_rows, math.ceil(len(todo) / self.config.concurrency)))
        batches = [todo[i : i + size] for i in range(0, len(todo), size)]

        def ask(batch: list[str]) -> list[float]:
            first = [keys[k][0] for k in batch]
            rows = [[*contexts[i], *responses[i]] for i in first]
            starts = [len(contexts[i]) for i in first]
            body = completion_request(model, rows)
            return self.endpoint.post(body, lambda reply: response_sums(reply, rows, starts, self.label))

        def landed(b: int, sums: list[float]) -> None:
            for key, value in zip(batches[b], sums):
                total[keys[key]] = value
                if math.isfinite(value):  # a non-finite score is reported by the caller, never kept
                    cache.put(key, model, repr(value))
            if progress is not None:
                progress.update(sum(i < counted for k in batches[b] for i in keys[k]))

        t0 = time.perf_counter()
        map_concurrently(ask, batches, self.config.concurrency, landed)
        return RowSums(total, count, time.perf_counter() - t0)
