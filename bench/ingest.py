"""Ingest: otrace against a bare stdlib server that only answers 202, measured in the same run.

    python bench/ingest.py [--seconds 10] [--rounds 3] [--idle 60] [--idle-only]

For 1, 4, 16 and 64 keep-alive connections, wrk posts the same 2 KB trace to a fresh bare
ThreadingHTTPServer (which reads the body and answers 202 in one write) and to a fresh otrace, one
after the other, --rounds times (with the storing baseline below, the three take turns; a level's
figures are each server's median round, by requests/s: one round's ratio moves with a shared host).
Printed: requests/s (otrace's: those answered 202), p50/p99, CPU per 1,000 requests, the otrace/bare
ratio, and how many of otrace's events were persisted and refused (503).
A second baseline stores what it is sent: the same bare server, which also json-parses each body and
inserts it as one llm_traces row (raw sqlite3, otrace's schema, WAL, synchronous=NORMAL), committed
before it answers, one request at a time under a lock: the plain way to store each event.
otrace's database cap is raised to 2 GiB for these runs: a fast machine fills the default 200 MiB
within one, and deleting unpushed rows under the cap is the month's measurement, not this one's.
Then otrace's latency at a steady 100 events/s and the bare server's, from a bare paced client (a
prebuilt request, one send, the response read to its Content-Length); otrace's again while another
client posts OTLP log requests of about 1 MB (18,000 ERROR records, each stored) back to back, with
how many of the paced events were answered 503 (a request larger than the queue holds it until it is
written); and otrace's idle RSS and CPU beside the bare server's
(--idle-only: just that, for the 10-minute footprint run of `make soak`).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (
    Usage,
    free_port,
    health,
    median_run,
    save,
    start_otrace,
    stop,
    stop_all,
    table,
    wait_listening,
    wrk,
)

TRACE = {"provider": "openai", "model": "gpt-5", "input_text": "x" * 1000, "output_text": "y" * 1000,
         "prompt_tokens": 250, "completion_tokens": 240, "cost_usd": 0.0031, "latency_ms": 812,
         "session_id": "bench"}
ANSWER = b'{"accepted": 1}'
RESPONSE = (b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(ANSWER), ANSWER))


class Bare(BaseHTTPRequestHandler):
    """The baseline: read the body, answer 202 in one write. Nothing else."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.wfile.write(RESPONSE)

    def log_message(self, *args: object) -> None:
        pass

    def handle(self) -> None:
        with contextlib.suppress(OSError):       # wrk closes its connections hard at the end
            super().handle()


class BareStore(Bare):
    """The storing baseline: the bare server, and each body json-parsed and committed as one
    llm_traces row before the answer."""

    conn: sqlite3.Connection
    lock = threading.Lock()
    insert = ""
    empty: ClassVar[dict[str, None]] = {}

    def do_POST(self) -> None:
        trace = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        now = int(time.time() * 1000)
        row = {**self.empty, **trace, "trace_id": str(uuid.uuid4()), "created_at": now, "received_at": now,
               "source": "http", "status": "ok", "input_bytes": len(trace["input_text"].encode()),
               "output_bytes": len(trace["output_text"].encode()), "truncated": 0}
        with self.lock:
            self.conn.execute(self.insert, row)
        self.wfile.write(RESPONSE)


def serve_bare(port: int, db: str | None = None) -> None:
    handler = Bare
    if db:
        import otrace  # noqa: PLC0415 - its schema, for the storing baseline only

        otrace.open_database(db)
        columns = otrace.TABLES["llm_traces"].columns
        BareStore.empty = dict.fromkeys(columns)
        BareStore.insert = (f"INSERT INTO llm_traces ({', '.join(columns)}) VALUES "
                            f"({', '.join(':' + c for c in columns)})")
        BareStore.conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        BareStore.conn.execute("PRAGMA synchronous = NORMAL")
        handler = BareStore
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    server.request_queue_size = 128
    server.serve_forever()


def start_bare(db: Path | None = None) -> tuple[subprocess.Popen, int]:
    """The bare server; with `db`, the storing one, writing there."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-bare", str(port),
                             *(["--bare-db", str(db)] if db else [])])
    wait_listening(port)
    return proc, port


def drained(port: int) -> dict[str, object]:
    """otrace's /health once its queue is empty."""
    end = time.monotonic() + 30
    while (report := health(port))["queue_depth"] and time.monotonic() < end:
        time.sleep(0.05)
    return report


def measure(proc: subprocess.Popen, port: int, connections: int, seconds: float, is_otrace: bool
            ) -> dict[str, float]:
    body = json.dumps(TRACE)
    url = f"http://127.0.0.1:{port}/v1/traces"
    wrk(url, body, connections, 1.0)                             # warm up: threads, caches
    start = drained(port) if is_otrace else {}
    before = Usage.of(proc.pid)
    load = wrk(url, body, connections, seconds)
    after = Usage.of(proc.pid)
    if is_otrace:
        end = drained(port)
        extra = {"persisted": end["events_persisted"] - start["events_persisted"],
                 "refused": end["events_refused"] - start["events_refused"]}
    else:
        extra = {}
    return {**extra, "rps": load.requests_per_s, "p50_ms": load.p50_ms, "p99_ms": load.p99_ms,
            "non_2xx": load.non_2xx, "errors": load.errors, "requests": load.requests,
            "cpu_ms_per_1k": 1e6 * (after.cpu_s - before.cpu_s) / max(load.requests, 1),
            "peak_rss_mb": after.peak_rss_bytes / 2**20}


def compare(levels: list[int], seconds: float, rounds: int
            ) -> tuple[list[list[object]], list[dict[str, object]]]:
    rows, raw = [], []
    for connections in levels:
        runs: dict[str, list[dict[str, float]]] = {"bare": [], "storing": [], "otrace": []}
        for _ in range(rounds):                                     # the three take turns
            bare_proc, bare_port = start_bare()
            try:
                runs["bare"].append(measure(bare_proc, bare_port, connections, seconds, is_otrace=False))
            finally:
                stop(bare_proc)
            with tempfile.TemporaryDirectory() as tmp:
                store_proc, store_port = start_bare(Path(tmp) / "bare.db")
                try:
                    runs["storing"].append(measure(store_proc, store_port, connections, seconds,
                                                   is_otrace=False))
                finally:
                    stop(store_proc)
            with tempfile.TemporaryDirectory() as tmp:
                proc, port = start_otrace(Path(tmp), {"TRACE_DB_MAX_BYTES": "2GiB"})
                try:
                    ours = measure(proc, port, connections, seconds, is_otrace=True)
                finally:
                    stop(proc)
            ours["accepted_rps"] = ours["rps"] * (1 - ours["non_2xx"] / max(ours["requests"], 1))
            runs["otrace"].append(ours)
            print(f"  {connections:>2} connections, round {len(runs['otrace'])}: bare "
                  f"{runs['bare'][-1]['rps']:.0f}/s, storing {runs['storing'][-1]['rps']:.0f}/s, otrace "
                  f"{ours['accepted_rps']:.0f}/s accepted", flush=True)
        bare, storing = median_run(runs["bare"], "rps"), median_run(runs["storing"], "rps")
        ours = median_run(runs["otrace"], "accepted_rps")
        ratio = ours["accepted_rps"] / bare["rps"]                 # a 503 is not a request served
        store_ratio = ours["accepted_rps"] / storing["rps"]
        raw.append({"connections": connections, "bare": bare, "otrace": ours, "ratio": ratio,
                    "bare_store": storing, "store_ratio": store_ratio, "rounds": runs})
        rows.append([connections, f"{bare['rps']:.0f}", f"{ours['accepted_rps']:.0f}", f"**{ratio:.2f}**",
                     f"{storing['rps']:.0f}", f"{store_ratio:.2f}",
                     f"{bare['p50_ms']:.2f} / {bare['p99_ms']:.2f}",
                     f"{ours['p50_ms']:.2f} / {ours['p99_ms']:.2f}",
                     f"{bare['cpu_ms_per_1k']:.0f}", f"{ours['cpu_ms_per_1k']:.0f}",
                     f"{ours['persisted'] / seconds:.0f}", ours["refused"]])
        print(f"  {connections:>2} connections, the median rounds: bare {bare['rps']:.0f}/s, storing "
              f"{storing['rps']:.0f}/s, otrace {ours['accepted_rps']:.0f}/s accepted ({ratio:.2f}x, "
              f"{store_ratio:.2f}x), persisted {ours['persisted'] / seconds:.0f}/s, "
              f"refused {ours['refused']}", flush=True)
    return rows, raw


def steady(rate: float, seconds: float, otlp: bool = False) -> dict[str, float]:
    """otrace's latency when the agent sends `rate` events/s on one kept-alive connection; `otlp`:
    while another client posts large OTLP requests back to back (otlp_load)."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_otrace(Path(tmp))
        done, exports = threading.Event(), []
        loader = threading.Thread(target=otlp_load, args=(port, done, exports))
        try:
            if otlp:
                loader.start()
            latencies, refused = paced(port, rate, seconds, refusals=otlp)
            usage = Usage.of(proc.pid)
        finally:
            done.set()
            if otlp:
                loader.join()
            stop(proc)
    beside = {"otlp_exports": len(exports), "otlp_export_s": sum(exports) / max(1, len(exports)),
              "refused": refused} if otlp else {}
    return {**percentiles(latencies), "rss_mb": usage.rss_bytes / 2**20, **beside}


OTLP_RECORDS = 18_000                    # ERROR log records in one export request: about 1 MB


def otlp_load(port: int, done: threading.Event, took: list[float]) -> None:
    """Post one OTLP logs export request of OTLP_RECORDS distinct ERROR records after another on its
    own connection, each answered 200, until `done`; the seconds each took go to `took`."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest  # noqa: PLC0415
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for n in itertools.count():
        request = ExportLogsServiceRequest()
        scope = request.resource_logs.add().scope_logs.add()
        for i in range(OTLP_RECORDS):                 # distinct each time: each is stored
            record = scope.log_records.add()
            record.time_unix_nano, record.severity_number = time.time_ns(), 17
            record.body.string_value = f"tool failed: {n}.{i}"
        body = request.SerializeToString()
        sent = time.perf_counter()
        conn.request("POST", "/v1/logs", body, headers={"Content-Type": "application/x-protobuf"})
        answer = conn.getresponse()
        answer.read()
        assert answer.status in (200, 503), answer.status   # 503: the queue had no room for it whole
        took.append(time.perf_counter() - sent)
        if done.is_set():
            break
    conn.close()


def steady_bare(rate: float, seconds: float) -> dict[str, float]:
    """The same paced client against the bare server: otrace's baseline, in the same run."""
    proc, port = start_bare()
    try:
        return percentiles(paced(port, rate, seconds)[0])
    finally:
        stop(proc)


def paced(port: int, rate: float, seconds: float, refusals: bool = False) -> tuple[list[float], int]:
    """Milliseconds per request, each answered 202, sent at `rate` a second on one kept-alive connection
    by a bare client: the request written in one send, the response read to its Content-Length. What
    the server takes, not what a client library adds (http.client writes a request's head and body in
    two sends: docs/performance.md). `refusals`: a 503 is allowed too, and counted (a request larger
    than the queue, taken whole into an empty one, holds the queue until it is written)."""
    body = json.dumps(TRACE).encode()
    request = (f"POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    latencies, refused = [], 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        start = time.perf_counter()
        for n in range(int(rate * seconds)):
            time.sleep(max(0.0, start + n / rate - time.perf_counter()))
            sent = time.perf_counter()
            sock.sendall(request)
            status = read_response(sock)
            latencies.append((time.perf_counter() - sent) * 1000)
            refused += status == 503
            assert status == 202 or (refusals and status == 503), status
    return latencies, refused


def read_response(sock: socket.socket) -> int:
    """One response read whole, its head and then Content-Length bytes of body; its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += receive(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    status, *fields = head.split(b"\r\n")
    length = next((int(value) for name, _, value in (field.partition(b":") for field in fields)
                   if name.strip().lower() == b"content-length"), 0)
    while len(body) < length:
        body += receive(sock)
    return int(status.split()[1])


def receive(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("the server closed the connection before its whole response")
    return chunk


def percentiles(latencies: list[float]) -> dict[str, float]:
    latencies = sorted(latencies)
    return {"p50_ms": latencies[len(latencies) // 2], "p99_ms": latencies[int(len(latencies) * 0.99)],
            "max_ms": latencies[-1], "requests": len(latencies)}


def idle(seconds: float) -> dict[str, float]:
    """RSS and CPU share of otrace (defaults: metrics every 15 s, push off) and of the bare server,
    side by side while nothing is sent."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = {"otrace": start_otrace(Path(tmp))[0], "bare": start_bare()[0]}
        try:
            time.sleep(1.0)                                      # let startup settle
            before, started = {n: Usage.of(p.pid) for n, p in procs.items()}, time.monotonic()
            time.sleep(seconds)
            after, elapsed = {n: Usage.of(p.pid) for n, p in procs.items()}, time.monotonic() - started
        finally:
            stop_all(procs.values())
    return {"rss_mb": after["otrace"].rss_bytes / 2**20,
            "cpu_pct": 100 * (after["otrace"].cpu_s - before["otrace"].cpu_s) / elapsed,
            "bare_rss_mb": after["bare"].rss_bytes / 2**20,
            "bare_cpu_pct": 100 * (after["bare"].cpu_s - before["bare"].cpu_s) / elapsed,
            "seconds": seconds}


def idle_line(rest: dict[str, float]) -> str:
    return (f"Idle for {rest['seconds']:.0f} s with metrics every 15 s: RSS {rest['rss_mb']:.1f} MiB "
            f"(bare server {rest['bare_rss_mb']:.1f} MiB, **{rest['rss_mb'] / rest['bare_rss_mb']:.2f}×**), "
            f"CPU {rest['cpu_pct']:.3f} % of a core (bare {rest['bare_cpu_pct']:.3f} %).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="wrk run per server and level")
    parser.add_argument("--rounds", type=int, default=3, help="turns the three servers take per level")
    parser.add_argument("--idle", type=float, default=60, help="idle window for RSS and CPU")
    parser.add_argument("--idle-only", action="store_true", help="only the idle window (make soak)")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--bare-db", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare, args.bare_db)
        return
    if args.idle_only:
        rest = idle(args.idle)
        save("idle", idle_line(rest), {"idle": rest})
        return
    rows, raw = compare([1, 4, 16, 64], args.seconds, args.rounds)
    calm, calm_bare = steady(100, 20), steady_bare(100, 20)
    beside_otlp = steady(100, 20, otlp=True)
    rest = idle(args.idle)
    markdown = table(["conns", "bare req/s", "otrace 202/s", "ratio", "bare storing each event, req/s",
                      "ratio to it", "bare p50/p99 ms", "otrace p50/p99 ms",
                      "bare CPU ms/1k", "otrace CPU ms/1k", "otrace persisted/s", "otrace 503s"], rows)
    markdown += (f"\n\nAt a steady 100 events/s on one connection: p50 {calm['p50_ms']:.2f} ms, "
                 f"p99 {calm['p99_ms']:.2f} ms, max {calm['max_ms']:.2f} ms (the bare server: p50 "
                 f"{calm_bare['p50_ms']:.2f} ms, p99 {calm_bare['p99_ms']:.2f} ms, max "
                 f"{calm_bare['max_ms']:.2f} ms).\n"
                 f"The same while another client posts OTLP log requests of {OTLP_RECORDS:,} records "
                 f"(about 1 MB) back to back ({beside_otlp['otlp_exports']}, "
                 f"{beside_otlp['otlp_export_s']:.2f} s each): p50 {beside_otlp['p50_ms']:.2f} ms, "
                 f"p99 {beside_otlp['p99_ms']:.2f} ms, max {beside_otlp['max_ms']:.2f} ms, "
                 f"{beside_otlp['refused']} answered 503.\n" + idle_line(rest))
    save("ingest", markdown, {"levels": raw, "steady_100": calm, "steady_100_bare": calm_bare,
                              "steady_100_otlp": beside_otlp, "idle": rest, "seconds": args.seconds})


if __name__ == "__main__":
    main()
