"""Push: otrace draining a 200,000-row backlog to a local receiver, against a bare client, same run.

    python bench/push.py [--rows 200000] [--rounds 3]

A database is seeded with unpushed traces (about 700 bytes of JSON each). The baseline is a bare
client that pages the same rows out of SQLite and POSTs them as the same 5 MiB JSON batches with
urllib3, written the plain way (a dict a row, json.dumps an event) with none of otrace's code, and
marks nothing. Then otrace starts on a copy of the database and pushes the backlog
itself (reading pages, packing, marking each confirmed batch synced). The receiver, in a process of
its own, reads each body and answers 200. The two take turns, --rounds times, each otrace on a fresh
copy, and every file is written back to disk before either is timed: neither pays for the other's
writeback, and the ratio is of the two medians (one round's ratio moves with a shared host).
Printed: events/s of both in each round, the ratio, and otrace's RSS before and during the drain.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import Usage, free_port, health, save, start_otrace, stop, table, wait_listening

import otrace

EVENT = {"provider": "anthropic", "model": "claude-sonnet-4", "input_text": "q" * 200,
         "output_text": "a" * 200, "prompt_tokens": 80, "completion_tokens": 40, "cost_usd": 0.0004,
         "latency_ms": 900}


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def log_message(self, *args: object) -> None:
        pass


def seed(path: Path, n: int) -> None:
    otrace.open_database(str(path))
    template = otrace.parse_events(json.dumps(EVENT).encode(), "/v1/traces", 1, 16384)[0][0]
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:   # closed: the rows in the main file,
        conn.executemany(otrace.insert_sql("llm_traces"),            # which is what each round copies
                         ((f"backlog-{i}", *template.values[1:]) for i in range(n)))


def bare_push(path: Path, url: str, max_bytes: int) -> float:
    """Page the rows out and post them as byte-capped batches of the same JSON, written the plain way
    (a dict a row, json.dumps an event), with none of otrace's code: transport and packing. Returns
    events/s."""
    pool = urllib3.PoolManager(maxsize=1, retries=False)
    started, sent, after = time.perf_counter(), 0, 0
    events: list[bytes] = []
    size = 0

    def post() -> None:
        head = json.dumps({"schema": "otrace.push.v1", "batch_id": str(uuid.uuid4()), "agent_id": "bench",
                           "sent_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        body = head[:-1].encode() + b', "events": [' + b", ".join(events) + b"]}"
        resp = pool.request("POST", url, body=body, headers={"Content-Type": "application/json"})
        assert resp.status == 200

    with contextlib.closing(sqlite3.connect(path)) as conn:
        names = [d[0] for d in conn.execute("SELECT * FROM llm_traces LIMIT 0").description]
        while rows := conn.execute("SELECT * FROM llm_traces WHERE synced = 0 AND id > ? ORDER BY id "
                                   "LIMIT 1000", (after,)).fetchall():
            for values in rows:
                row = {name: json.loads(value) if name in ("metadata", "detail") and value else value
                       for name, value in zip(names, values, strict=True)
                       if name not in ("synced", "pushed_at")}
                event = json.dumps({"type": "llm_trace", "event_id": f"llm_trace:{row['trace_id']}",
                                    "trace_id": row["trace_id"], "data": row}, ensure_ascii=False).encode()
                if events and size + len(event) + 2 > max_bytes - 256:     # 256: the envelope's room
                    post()
                    sent, events, size = sent + len(events), [], 0
                events.append(event)
                size += len(event) + 2
            after = rows[-1][0]
        if events:
            post()
            sent += len(events)
    return sent / (time.perf_counter() - started)


def otrace_push(path: Path, url: str, n: int) -> tuple[float, float, float]:
    """otrace pushing the backlog: (events/s, RSS before it starts, peak RSS while pushing)."""
    proc, port = start_otrace(path.parent, {"TRACE_PUSH_ENDPOINT": url, "TRACE_PUSH_INTERVAL": "1h",
                                            "TRACE_METRICS_INTERVAL": "off"})
    try:
        time.sleep(2.0)                                   # the first cycle begins 5 s after start
        idle = Usage.of(proc.pid).rss_bytes
        peak, started, done = idle, None, None
        while done is None:
            rss = Usage.of(proc.pid).rss_bytes
            peak = max(peak, rss)
            report = health(port)
            if started is None and report["push"]["events_pushed"]:
                started, first_batch = time.perf_counter(), report["push"]["events_pushed"]
            if report["push"]["events_pushed"] >= n:
                done = time.perf_counter()
            time.sleep(0.1)
        if first_batch >= n:        # the pace is of the batches after the first seen: there were none
            raise SystemExit(f"bench/push.py: --rows {n} went in the first batch seen; give more rows")
        return (n - first_batch) / (done - started), idle, peak
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3, help="turns the two take")
    args = parser.parse_args()
    port = free_port()
    here = str(Path(__file__).parent)
    sink = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); "
                             f"import push; push.serve({port})"])
    wait_listening(port)
    url = f"http://127.0.0.1:{port}/ingest"
    rounds = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "seed" / "otrace.db"
            base.parent.mkdir()
            seed(base, args.rows)
            for n in range(args.rounds):
                os.sync()
                bare = bare_push(base, url, 5 * 2**20)
                copy = Path(tmp) / f"run{n}" / "otrace.db"
                copy.parent.mkdir()
                shutil.copy(base, copy)
                os.sync()
                ours, idle, peak = otrace_push(copy, url, args.rows)
                shutil.rmtree(copy.parent)
                rounds.append({"bare_events_per_s": bare, "otrace_events_per_s": ours, "rss_idle": idle,
                               "rss_peak": peak})
                print(f"  round {n + 1}: bare client {bare:.0f} events/s, otrace {ours:.0f} events/s, "
                      f"RSS {idle / 2**20:.1f} -> {peak / 2**20:.1f} MiB", flush=True)
    finally:
        sink.terminate()
        sink.wait()
    bare = statistics.median_high(r["bare_events_per_s"] for r in rounds)
    ours = statistics.median_high(r["otrace_events_per_s"] for r in rounds)
    most = max(rounds, key=lambda r: r["rss_peak"] - r["rss_idle"])     # the largest growth seen
    idle, peak, ratio = most["rss_idle"], most["rss_peak"], ours / bare
    each = ", ".join(f"{r['otrace_events_per_s'] / r['bare_events_per_s']:.2f}" for r in rounds)
    markdown = table(["path", "events/s (median)", "ratio", "RSS idle → peak while pushing"], [
        ["bare client: page + POST 5 MiB batches (baseline)", f"{bare:.0f}", "1.00", ""],
        ["otrace push (pages, packs, marks synced)", f"{ours:.0f}", f"**{ratio:.2f}**",
         f"{idle / 2**20:.1f} → {peak / 2**20:.1f} MiB (+{(peak - idle) / 2**20:.1f} MiB)"]])
    markdown += (f"\n\n{args.rows} unpushed traces of ~700 bytes, to a receiver on loopback answering 200; "
                 f"{len(rounds)} round{'s' * (len(rounds) > 1)} taking turns, each round's ratio: {each}.")
    save("push", markdown, {"rows": args.rows, "bare_events_per_s": bare, "otrace_events_per_s": ours,
                            "ratio": ratio, "rss_idle": idle, "rss_peak": peak, "rounds": rounds})


def serve(port: int) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), Sink)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever).start()


if __name__ == "__main__":
    main()
