"""JSON over HTTP on 127.0.0.1 for the tests' fake OpenAI-compatible servers: the listening thread, replies, and the
chat-completions server the judge tests build on."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable
from typing import Any


class JsonServer:
    """A ThreadingHTTPServer in a daemon thread that passes every POST's decoded JSON body to `handle(h, body)`."""

    def __init__(self, handle: Callable[[http.server.BaseHTTPRequestHandler, Any], None]):
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                handle(self, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send_json(h: http.server.BaseHTTPRequestHandler, status: int, payload: Any, headers: Any = ()) -> None:
    """Answer with `payload` as JSON (bytes are sent as they are: a body that is not JSON)."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    for k, v in headers:
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)


def completion(model: str, text: str) -> dict[str, Any]:
    """An OpenAI chat-completions reply carrying `text`."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    return {"id": "chatcmpl-test", "object": "chat.completion", "model": model, "choices": [choice], "usage": usage}


class ChatServer:
    """An OpenAI-compatible `POST /v1/chat/completions` on 127.0.0.1 that records what a client's tests check.

    A subclass says what a conversation gets (`reply`) and which attempts fail first (`fault`, which answers the
    request itself and returns True). After `down_after` answered conversations every other request gets 503.
    Records: each request's Authorization header (`auth`), attempts per conversation (`attempts`), each reply's
    status (`statuses`, 0 for a dropped connection) and the conversations answered with a completion (`answered`).
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.auth: list[str | None] = []
        self.attempts: dict[str, int] = {}
        self.answered: list[str] = []
        self.statuses: list[int] = []
        self.down_after: int | None = None
        self.http = JsonServer(self.handle)
        self.base_url = self.http.base_url

    @property
    def requests(self) -> int:
        return len(self.auth)

    def reply(self, body: dict[str, Any]) -> str:
        raise NotImplementedError

    def fault(self, h: http.server.BaseHTTPRequestHandler, conv: str, attempt: int) -> bool:
        return False

    def send(self, h: http.server.BaseHTTPRequestHandler, status: int, payload: Any, headers: Any = ()) -> None:
        send_json(h, status, payload, headers)
        with self.lock:
            self.statuses.append(status)

    def drop(self, h: http.server.BaseHTTPRequestHandler) -> None:
        """Close the connection without an answer."""
        h.close_connection = True
        with self.lock:
            self.statuses.append(0)

    def handle(self, h: http.server.BaseHTTPRequestHandler, body: Any) -> None:
        if h.path != "/v1/chat/completions":
            return self.send(h, 404, {"error": {"message": f"no route {h.path}"}})
        conv = json.dumps(body["messages"], sort_keys=True)
        with self.lock:
            self.auth.append(h.headers.get("Authorization"))
            attempt = self.attempts[conv] = self.attempts.get(conv, 0) + 1
        if self.fault(h, conv, attempt):
            return None
        with self.lock:  # reserved under the lock: exactly down_after conversations get answers
            down = self.down_after is not None and len(self.answered) >= self.down_after
            if not down:
                self.answered.append(conv)
        if down:
            return self.send(h, 503, {"error": {"message": "overloaded"}})
        return self.send(h, 200, completion(body["model"], self.reply(body)))

    def close(self) -> None:
        self.http.close()
