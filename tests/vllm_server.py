"""A vLLM-compatible completions server on 127.0.0.1 that returns prompt log-probs from cme_jax's own model code.

It implements the part of vLLM's OpenAI-compatible `POST /v1/completions` a served verifier uses: `prompt` as
a list of token-id lists, `max_tokens`, `temperature`, `prompt_logprobs: 0` (each position after the first
gets `{token id: {logprob, rank, decoded_token}}` for the token that was sent), `return_token_ids` (echoes
`prompt_token_ids`), `model` naming a served model (404 otherwise, as vLLM answers) and an optional API key
(401 without it). Faults can be switched on to test a client: first attempts failing with 5xx, 429 or a
dropped connection, replies delayed past the client's timeout, every request failing after a number of
answers, and replies for other token ids than were sent. It records what it received, and how many requests
were in flight at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from typing import Any

import jax
import numpy as np

from cme_jax.models.logprobs import token_logprobs
from cme_jax.tokens import bucket_length
from tests.json_server import JsonServer, send_json

_logprobs_jit = jax.jit(token_logprobs, static_argnames=("cfg", "start", "chunk_budget"))


def prompt_logprobs(model: Any, rows: list[list[int]]) -> list[list[float]]:
    """log p(row[t] | row[:t]) for t >= 1 of each row, from one padded forward of the cme_jax model."""
    T = bucket_length(max(map(len, rows)))
    tokens = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    logp = np.asarray(_logprobs_jit(model.weights, model.cfg, tokens, mask, start=1), np.float64)
    return [logp[i, : len(r) - 1].tolist() for i, r in enumerate(rows)]


@dataclasses.dataclass
class Faults:
    """What goes wrong, decided per request from a hash of its prompts (so a retry can behave differently)."""

    flaky: bool = False  # first attempts: a third 503, a third dropped connections, a third 429 with Retry-After 0
    delay_first: float = 0.0  # first attempts of every other request wait this long before answering
    down_after: int | None = None  # answer this many requests, then 503 for everything
    wrong_ids: str | None = None  # "echo": prompt_token_ids differ; "keys": log-probs keyed by another token
    hold: float = 0.0  # every request waits this long before computing (to see requests overlap)


@dataclasses.dataclass
class Records:
    """What the server received and answered since its last reset."""

    attempts: dict[str, int] = dataclasses.field(default_factory=dict)  # per request body's prompts
    statuses: list[int] = dataclasses.field(default_factory=list)  # 0 = dropped, -1 = held past the client's timeout
    scored_rows: list[list[int]] = dataclasses.field(default_factory=list)  # every row answered with status 200
    bodies: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    auth: list[str | None] = dataclasses.field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0
    answered: int = 0


class VllmLikeServer:
    """The server on 127.0.0.1 (`url`); `models` maps a served name to a cme_jax LoadedModel."""

    def __init__(self, api_key: str | None = None):
        self.models: dict[str, Any] = {}
        self.api_key = api_key
        self.lock = threading.Lock()
        self.compute = threading.Lock()  # one accelerator: requests are computed one after another
        self.reset()
        self.http = JsonServer(self.handle)
        self.url = self.http.base_url

    def reset(self) -> None:
        """Healthy again, with fresh records (requests still running from before write to their own)."""
        with self.lock:
            self.faults = Faults()
            self.rec = Records()

    # What tests read, from the current records.
    statuses = property(lambda self: self.rec.statuses)
    scored_rows = property(lambda self: self.rec.scored_rows)
    bodies = property(lambda self: self.rec.bodies)
    auth = property(lambda self: self.rec.auth)
    attempts = property(lambda self: self.rec.attempts)
    max_inflight = property(lambda self: self.rec.max_inflight)

    def close(self) -> None:
        self.http.close()

    def _send(self, h: Any, rec: Records, status: int, payload: Any, headers: tuple = ()) -> None:
        send_json(h, status, payload, headers)
        with self.lock:
            rec.statuses.append(status)

    def _error(self, h: Any, rec: Records, status: int, message: str) -> None:
        # vLLM's ErrorResponse shape
        error = {"message": message, "type": "BadRequestError", "param": None, "code": status}
        self._send(h, rec, status, {"error": error})

    def handle(self, h: Any, body: dict[str, Any]) -> None:
        with self.lock:
            rec, faults = self.rec, self.faults
            rec.inflight += 1
            rec.max_inflight = max(rec.max_inflight, rec.inflight)
        try:
            self._handle(h, body, rec, faults)
        finally:
            with self.lock:
                rec.inflight -= 1

    def _handle(self, h: Any, body: dict[str, Any], rec: Records, f: Faults) -> None:
        key = json.dumps(body.get("prompt"), sort_keys=True)
        digest = int(hashlib.sha256(key.encode()).hexdigest(), 16)
        with self.lock:
            rec.bodies.append(body)
            rec.auth.append(h.headers.get("Authorization"))
            attempt = rec.attempts[key] = rec.attempts.get(key, 0) + 1
            down = f.down_after is not None and rec.answered >= f.down_after
            if not down and f.down_after is not None:
                rec.answered += 1  # reserved under the lock: exactly down_after requests get answers
        if h.path != "/v1/completions":
            return self._error(h, rec, 404, f"no route {h.path}")
        if self.api_key is not None and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            sent = (h.headers.get("Authorization") or "").removeprefix("Bearer ")
            return self._error(h, rec, 401, f"Unauthorized: invalid API key {sent}")
        model = self.models.get(body.get("model"))
        if model is None:
            return self._error(h, rec, 404, f"The model `{body.get('model')}` does not exist.")
        prompt = body.get("prompt")
        if not (isinstance(prompt, list) and prompt and all(isinstance(r, list) and r for r in prompt)):
            return self._error(h, rec, 400, "this server takes prompts as lists of token ids")
        if body.get("max_tokens") != 1 or body.get("temperature") != 0 or body.get("prompt_logprobs") != 0:
            return self._error(h, rec, 400, "expected max_tokens 1, temperature 0 and prompt_logprobs 0")
        limit = model.cfg.max_position
        if max(map(len, prompt)) + 1 > limit:
            longest = max(map(len, prompt))
            return self._error(h, rec, 400, f"This model's maximum context length is {limit} tokens; got {longest} + 1")
        if down:
            return self._error(h, rec, 503, "overloaded")
        if f.flaky and attempt == 1:
            if digest % 3 == 0:
                h.close_connection = True
                with self.lock:
                    rec.statuses.append(0)
                return None
            if digest % 3 == 1:
                return self._error(h, rec, 503, "Service Unavailable")
            return self._send(h, rec, 429, {"error": {"message": "rate limited"}}, (("Retry-After", "0"),))
        if f.delay_first and attempt == 1 and digest % 2 == 0:
            with self.lock:
                rec.statuses.append(-1)
            time.sleep(f.delay_first)  # past the client's timeout: it has given up, nobody reads an answer
            h.close_connection = True
            return None
        time.sleep(f.hold)
        with self.compute:
            lps = prompt_logprobs(model, prompt)
        tok = model.tokenizer
        choices = []
        for i, (ids, lp) in enumerate(zip(prompt, lps)):
            echoed, keyed = list(ids), list(ids)
            if f.wrong_ids == "echo":  # the server re-tokenized: its ids differ from those sent
                echoed = [*ids[:-1], (ids[-1] + 1) % len(tok)]
            if f.wrong_ids == "keys":
                keyed = [*ids[:-1], (ids[-1] + 1) % len(tok)]
            entries = [None] + [
                {str(t): {"logprob": v, "rank": None, "decoded_token": tok.decode([t])}} for t, v in zip(keyed[1:], lp)
            ]
            choice = {
                "index": i,
                "text": "",
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": entries,
            }
            if body.get("return_token_ids") and f.wrong_ids != "keys":
                choice["prompt_token_ids"] = echoed
                choice["token_ids"] = [0]
            choices.append(choice)
        n_prompt = sum(map(len, prompt))
        with self.lock:
            rec.scored_rows.extend(list(r) for r in prompt)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": len(prompt), "total_tokens": n_prompt + len(prompt)}
        reply = {
            "id": "cmpl-test",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": choices,
            "usage": usage,
        }
        return self._send(h, rec, 200, reply)
