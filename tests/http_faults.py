"""A local HTTP server that misbehaves on purpose, to test download code offline.

    with FaultServer() as server:
        url = server.route("/data.tgz", body, status(500), reset_after(1000), serve)
        fetch(url)
        assert server.range_headers("/data.tgz") == [None, None, "bytes=1000-"]

Each route has a script of behaviours: the n-th request to the path is answered by the n-th
behaviour, and the last one answers every request after that. A behaviour is a function of a
`Reply` (the request handler, the route's body and the Range start asked for); the factories
below make the usual faults, and a new fault is one more small function.

Listens on 127.0.0.1 on a free port; nothing leaves the machine.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

# A stalled reply waits at most this long (or until the server stops), so a test that forgets
# a timeout still ends.
MAX_STALL_S = 30.0


@dataclass
class Reply:
    handler: BaseHTTPRequestHandler
    body: bytes
    range_start: int | None  # from `Range: bytes=N-`; None when no Range was asked for
    stopping: threading.Event

    def send_head(self, code: int, headers: dict[str, str | int]) -> None:
        self.handler.send_response(code)
        for name, value in headers.items():
            self.handler.send_header(name, str(value))
        self.handler.end_headers()

    def send_range_head(self, announced: int | None = None) -> bytes:
        """Send 200 or 206 headers for the asked range; return the bytes that range holds."""
        start = self.range_start or 0
        data = self.body[start:]
        length = len(data) if announced is None else announced
        if self.range_start is None:
            self.send_head(200, {"Content-Length": length})
        else:
            last = len(self.body) - 1
            self.send_head(206, {"Content-Length": length,
                                 "Content-Range": f"bytes {start}-{last}/{len(self.body)}"})
        return data

    def write(self, data: bytes) -> None:
        self.handler.wfile.write(data)

    def reset(self) -> None:
        """Abort the connection with a TCP RST, as a dropped link looks to the client."""
        conn = self.handler.connection
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.handler.rfile.close()  # the socket closes for real only once its files are closed
        conn.close()


Behaviour = Callable[[Reply], None]


def serve(reply: Reply) -> None:
    """Behave: honour Range with 206, answer 416 past the end."""
    if reply.range_start is not None and reply.range_start >= len(reply.body):
        reply.send_head(416, {"Content-Range": f"bytes */{len(reply.body)}",
                              "Content-Length": 0})
        return
    reply.write(reply.send_range_head())


def ignore_range(reply: Reply) -> None:
    """Send the whole body with 200, whatever Range asked for."""
    reply.send_head(200, {"Content-Length": len(reply.body)})
    reply.write(reply.body)


def status(code: int, retry_after: str | None = None) -> Behaviour:
    def behaviour(reply: Reply) -> None:
        text = f"status {code}\n".encode()
        headers = {"Content-Length": len(text), "Content-Type": "text/plain"}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        reply.send_head(code, headers)
        reply.write(text)

    return behaviour


def redirect(location: str, code: int = 302) -> Behaviour:
    def behaviour(reply: Reply) -> None:
        reply.send_head(code, {"Location": location, "Content-Length": 0})

    return behaviour


def reset_after(count: int) -> Behaviour:
    """Announce the full length, send `count` bytes, then reset the connection."""

    def behaviour(reply: Reply) -> None:
        reply.write(reply.send_range_head()[:count])
        reply.reset()

    return behaviour


def close_after(count: int) -> Behaviour:
    """Content-Length says more than is sent: `count` bytes, then a clean close."""

    def behaviour(reply: Reply) -> None:
        reply.write(reply.send_range_head()[:count])

    return behaviour


def understate_length(missing: int) -> Behaviour:
    """Content-Length says `missing` bytes fewer than the body that is then sent in full."""

    def behaviour(reply: Reply) -> None:
        size = len(reply.body) - (reply.range_start or 0)
        reply.write(reply.send_range_head(announced=size - missing))

    return behaviour


def stall_after(count: int) -> Behaviour:
    """Send `count` bytes, then nothing, keeping the connection open."""

    def behaviour(reply: Reply) -> None:
        reply.write(reply.send_range_head()[:count])
        reply.stopping.wait(MAX_STALL_S)

    return behaviour


def trickle(interval_s: float = 0.02) -> Behaviour:
    """Send one byte every `interval_s`: never silent long enough for a socket timeout."""

    def behaviour(reply: Reply) -> None:
        data = reply.send_range_head()
        deadline = time.monotonic() + MAX_STALL_S
        for i in range(len(data)):
            if reply.stopping.wait(interval_s) or time.monotonic() > deadline:
                return
            reply.write(data[i : i + 1])

    return behaviour


class FaultServer:
    """A threaded HTTP server on 127.0.0.1 whose routes follow scripts of behaviours."""

    def __init__(self) -> None:
        self._routes: dict[str, tuple[bytes, list[Behaviour]]] = {}
        self._log: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def route(self, path: str, body: bytes = b"", *script: Behaviour) -> str:
        """Answer requests for `path` with `script` (default: `serve`); return its URL."""
        self._routes[path] = (body, list(script) or [serve])
        return self.url(path)

    def url(self, path: str) -> str:
        assert self._httpd is not None, "start the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def requests(self, path: str) -> list[dict[str, str]]:
        """The headers of each request made for `path`, in order."""
        with self._lock:
            return [headers for logged, headers in self._log if logged == path]

    def range_headers(self, path: str) -> list[str | None]:
        return [headers.get("Range") for headers in self.requests(path)]

    def start(self) -> FaultServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.handle_error = lambda request, address: None  # client aborts are expected
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?")[0]
        with self._lock:
            count = sum(1 for logged, _ in self._log if logged == path)
            self._log.append((path, dict(handler.headers)))
        body, script = self._routes.get(path, (b"", [status(404)]))
        behaviour = script[min(count, len(script) - 1)]
        behaviour(Reply(handler, body, _range_start(handler.headers.get("Range")),
                        self._stopping))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
                try:
                    server._answer(self)
                except OSError:
                    pass  # the client went away (or we reset the connection on purpose)

            def log_message(self, format, *args) -> None:  # noqa: A002
                pass

        return Handler


def _range_start(value: str | None) -> int | None:
    if not value or not value.startswith("bytes=") or not value.endswith("-"):
        return None
    first = value[len("bytes="):-1]
    return int(first) if first.isdigit() else None


@pytest.fixture
def fault_server():
    """A started FaultServer, stopped after the test. Use from a test module with
    `fault_server = http_faults.fault_server` (or define a fixture that enters FaultServer)."""
    with FaultServer() as server:
        yield server
