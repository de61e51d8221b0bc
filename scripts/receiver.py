"""A real push receiver on loopback, for otrace's tests and its fault soak.

    from receiver import Receiver       (scripts/ on sys.path)

Each POST is read whole (gzip undone), recorded, and answered by the next scripted answer, or by
`default`: an HTTP status, (status, headers, text), None to hang up, or a callable taking
(receiver, request) and returning one of those (it may also write to request["socket"] itself and
return None). `reset_unread` hangs up at once, with a TCP reset, before reading anything;
`unlisten()` closes the port and `listen()` opens it again. It also notes whether two pushes ever
overlapped (`max_active`).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = int | tuple[int, dict[str, str], str] | None
Action = Callable[["Receiver", dict[str, Any]], Answer] | Answer


class Receiver:
    """See the module docstring. Requests are dicts: path (with its query), headers, raw_bytes, bytes,
    body (gzip undone), json, at (monotonic), socket, and answered (the status sent, None until then
    or if it hung up)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, path: str = "/ingest") -> None:
        self.script: list[Action] = []
        self.default: Action = 200
        self.reset_unread = False
        self.resets = 0
        self.requests: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        self.active: list[dict[str, Any]] = []       # requests being answered
        self.max_active = 0
        self.on_request: Callable[[dict[str, Any]], None] = lambda request: None
        self.host, self.path = host, path
        self.server: ThreadingHTTPServer | None = None
        self.port = port
        self.listen()
        self.url = f"http://{host}:{self.port}{path}"

    def listen(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                receiver.handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        for _ in range(100):         # the port was ours a moment ago; a lingering socket may hold it
            try:
                self.server = ThreadingHTTPServer((self.host, self.port), Handler)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"receiver: cannot listen on {self.host}:{self.port} again")
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name="receiver", daemon=True).start()

    def unlisten(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        if self.reset_unread:                        # hang up hard, nothing read
            with self.changed:
                self.resets += 1
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                h.connection.close()
            return
        declared = int(h.headers.get("Content-Length", 0))
        raw = h.rfile.read(declared)
        if len(raw) < declared:                      # the client died mid-body: nothing to answer
            h.close_connection = True
            return
        body = gzip.decompress(raw) if h.headers.get("Content-Encoding") == "gzip" else raw
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        request = {"path": h.path, "headers": dict(h.headers), "raw_bytes": len(raw), "bytes": len(body),
                   "body": body, "answered": None, "json": doc, "at": time.monotonic(),
                   "socket": h.connection}
        self.on_request(request)
        with self.changed:                           # overlapping: still answered, its client still there
            live = [r for r in self.active if not _hung_up(r["socket"])]
            self.max_active = max(self.max_active, len(live) + 1)
            self.active.append(request)
            self.requests.append(request)
            action = self.script.pop(0) if self.script else self.default
        try:
            answer = action(self, request) if callable(action) else action
        finally:
            with self.changed:
                self.active.remove(request)
        if answer is None:                           # no answer: hang up
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        status, headers, text = (answer, {}, "") if isinstance(answer, int) else answer
        with self.changed:                           # before it is sent: otrace acts on it at once
            request["answered"] = status
            self.changed.notify_all()
        payload = text.encode()
        try:
            h.send_response(status)
            for name, value in headers.items():
                h.send_header(name, value)
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
        except OSError:                              # otrace gave up waiting and hung up
            h.close_connection = True

    def wait(self, check: Callable[[list[dict[str, Any]]], Any], timeout: float = 30.0) -> Any:
        with self.changed:
            found = self.changed.wait_for(lambda: check(self.requests), timeout)
        assert found, f"receiver never saw what was awaited; got {len(self.requests)} requests"
        return found

    def trace_ids(self, answered: tuple[int, ...] = (200, 201, 202, 204)) -> list[str]:
        """The trace_ids of the requests answered with one of `answered`."""
        with self.changed:
            return [e["trace_id"] for r in self.requests if r["answered"] in answered
                    for e in r["json"]["events"]]

    def close(self) -> None:
        self.unlisten()


def _hung_up(sock: socket.socket) -> bool:
    """True when the client has closed its side (what it sent is read: only the end remains)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
