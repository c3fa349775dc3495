"""JSON over HTTP on 127.0.0.1 for the tests' fake OpenAI-compatible servers: the listening thread and replies."""

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
