"""An HTTP/1.1 proxy on loopback in front of a real API server, for the faults a network and a
load balancer cause that a healthy server never shows: a 502/503/429 answered in its place, or
a request that reaches the server but whose answer is lost (the connection drops). It counts
the client connections it accepts (keep-alive shows as few connections for many requests) and
records each request with the server's answer."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Answer:
    """Answer in the server's place, without forwarding."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None


DROP_ANSWER = "drop the answer"  # forward, then close the connection without answering


@dataclass
class Seen:
    method: str
    path: str
    body: Any
    connection: int
    status: int | None = None  # None: answered by the proxy or dropped
    answer: Any = None


Plan = Callable[[Seen, list[Seen]], "Answer | str | None"]


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        plan: Plan | None = None,
        rewrite: Callable[[Seen], Any] | None = None,
    ) -> None:
        self.upstream = urlsplit(upstream)
        self.plan: Plan = plan or (lambda seen, history: None)
        # Changes a forwarded answer (`seen.answer`, parsed): returns what the client gets.
        self.rewrite = rewrite or (lambda seen: seen.answer)
        self.seen: list[Seen] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def forward(self, method: str, path: str, raw: bytes, headers: dict[str, str]) -> Any:
        upstream = http.client.HTTPConnection(
            self.upstream.hostname, self.upstream.port, timeout=60
        )
        try:
            upstream.request(method, path, body=raw, headers=headers)
            response = upstream.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            upstream.close()


def _json(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None  # not JSON (an HTML error page): passed on as it is


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with proxy.lock:
                proxy.connections += 1
                self.number = proxy.connections

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self._handle()

        do_POST = do_PATCH = do_PUT = do_DELETE = do_GET

        def _handle(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen = Seen(self.command, self.path, json.loads(raw) if raw else None, self.number)
            with proxy.lock:
                fault = proxy.plan(seen, proxy.seen)
                proxy.seen.append(seen)
            if isinstance(fault, Answer):
                self._send(fault.status, fault.headers, json.dumps(fault.body).encode())
                return
            keep = ("Authorization", "Content-Type", "Accept")
            headers = {name: self.headers[name] for name in keep if self.headers[name]}
            status, answer_headers, body = proxy.forward(self.command, self.path, raw, headers)
            seen.status = status
            seen.answer = _json(body)
            if fault == DROP_ANSWER:
                self.close_connection = True  # the server acted; its answer never arrives
                return
            if seen.answer is not None:
                seen.answer = proxy.rewrite(seen)
                body = json.dumps(seen.answer).encode()
            wanted = ("Content-Type", "Retry-After")
            self._send(status, {k: v for k, v in answer_headers.items() if k in wanted}, body)

        def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
