"""JSON over HTTP to OpenAI-compatible servers: one POST with retries and backoff, and bounded concurrency.

Shared by the LLM judge (`/chat/completions`) and served verifiers (`/completions` with prompt log-probs).
Only the standard library is used. An API key is read from a named environment variable, sent only as a
Bearer header and kept out of repr, logs and error messages.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, as_completed
from typing import Any, TypeVar

from cme_jax.errors import CmeError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Transient(Exception):
    """A failure worth retrying: connection trouble, timeout, HTTP 408/429/5xx, a mangled body."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from a numeric Retry-After header, if the server sent one."""
    if headers is None:
        return None
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class JsonEndpoint:
    """POST JSON to one URL and read JSON back, retrying transient failures with jittered exponential backoff.

    `label` starts every message ("judge", "verifier 'big'"); `key_field` names the setting that holds
    `api_key_env` in messages. The key is a private attribute: never in repr, logs or errors.
    """

    def __init__(
        self,
        url: str,
        *,
        label: str,
        api_key_env: str | None,
        key_field: str = "api_key_env",
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float = 120.0,
    ):
        self.url = url
        self.label = label
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self._api_key: str | None = None
        if api_key_env is not None:
            key = os.environ.get(api_key_env, "")
            if not key.strip():
                raise CmeError(
                    f"{label}: environment variable {api_key_env} is not set; export the API key "
                    f"there, or set {key_field} to null for an endpoint that needs no key"
                )
            self._api_key = key.strip()
        # The default opener honours http(s)_proxy/no_proxy, as users behind proxies expect.
        self._opener = urllib.request.build_opener()

    def __repr__(self) -> str:
        return f"JsonEndpoint({self.url!r}, label={self.label!r})"

    def scrub(self, text: str) -> str:
        """Remove the key from text that may be shown (servers sometimes echo a rejected key)."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def post_once(self, body: Any) -> Any:
        """One request; the decoded JSON reply, or Transient (retry) / CmeError (give up)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                detail = self.scrub(e.read(300).decode("utf-8", "replace").strip().replace("\n", " "))
            except OSError:
                detail = ""
            if e.code in (408, 429) or e.code >= 500:
                raise Transient(f"HTTP {e.code}", retry_after(e.headers)) from None
            raise CmeError(
                f"{self.label} endpoint {self.url} answered HTTP {e.code}: {detail[:200]}"
                + (" (check the API key)" if e.code in (401, 403) else "")
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise Transient(f"{type(e).__name__}: {self.scrub(str(reason))}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise Transient("the reply is not JSON") from None

    def post(self, body: Any, parse: Callable[[Any], T]) -> T:
        """`parse(reply)` of one request with retries; `parse` raises Transient for a reply worth asking again."""
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                return parse(self.post_once(body))
            except Transient as e:
                last = str(e)
                if attempt == self.max_retries:
                    break
                delay = min(self.max_backoff, self.backoff * 2**attempt)
                delay = delay * (0.5 + random.random() / 2)  # jitter: concurrent retries do not stampede
                if e.retry_after is not None:
                    delay = min(self.max_backoff, max(delay, e.retry_after))
                log.warning(
                    "%s request failed (%s); retry %d/%d in %.2f s",
                    self.label,
                    last,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                time.sleep(delay)
        raise CmeError(f"{self.label} endpoint {self.url} failed {self.max_retries + 1} times; last error: {last}")


def map_concurrently(
    fn: Callable[[T], R],
    items: Sequence[T],
    max_workers: int,
    on_result: Callable[[int, R], None] | None = None,
) -> list[R]:
    """[fn(x) for x in items] with at most `max_workers` calls at once, reporting each result as it lands.

    When one call fails, the queued ones are cancelled but those already running are awaited and reported
    (so their results can be kept), then the first error is raised.
    """
    out: list[Any] = [None] * len(items)
    if not items:
        return []
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        futures: dict[Future[R], int] = {pool.submit(fn, x): i for i, x in enumerate(items)}
        try:
            for fut in as_completed(futures):
                try:
                    value = fut.result()
                except CancelledError:
                    continue
                except Exception as e:
                    if error is None:
                        error = e
                        for f in futures:
                            f.cancel()
                    continue
                i = futures[fut]
                out[i] = value
                if on_result is not None:
                    on_result(i, value)
        finally:
            # Covers Ctrl-C and a failing on_result too: never keep paying for queued requests.
            for f in futures:
                f.cancel()
    if error is not None:
        raise error
    return out
