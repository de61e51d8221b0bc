"""Storage upkeep: a month of the seed's traffic under a database cap, and the cost of one cleanup.

    python bench/month.py [--scale 30] [--cleanup-mib 200]

Month: the seed's rate is 100 LLM calls a minute plus a host sample every 15 s: 4,320,000 traces a
month. Scaled down by --scale (traffic and the database cap alike: TRACE_DB_MAX_BYTES = 200 MiB /
scale, and TRACE_WAL_MAX_BYTES and TRACE_PUSH_MAX_BYTES with it; TRACE_QUEUE_SIZE is 64, the least
that keeps the rate, since what waits in the queue while a checkpoint's fsync holds the writer lands
in the file at once: 512 traces are 17 % of the cap, 64 are 2 %; TRACE_BATCH_SIZE 32, half of it, the
most otrace takes from such a queue), and compressed in time:
--rate traces/s, with the retention, push and checkpoint intervals shrunk so that what arrives between
two passes is the same share of the cap as 5 (and 10) minutes of the seed's traffic is of 200 MiB (at
1:30 and 1,500/s: 11, 22 and 100 ms, the push interval's floor). The push interval matters to the WAL:
marking a cycle's rows synced rewrites their pages into it, so a cycle of 100 ms puts 5 % of the cap in
the WAL at once, where a real 5-minute cycle puts half a percent. otrace pushes to a local receiver
and samples the host every 100 ms. The file and WAL sizes are read every 20 ms; the ratio is the
largest seen against the cap.

Cleanup: a 200 MiB database of pushed traces past TRACE_RETENTION; otrace's retention pass (chunks of
1,000 rows between batches, incremental vacuum, TRUNCATE checkpoint) against one raw DELETE plus the
same vacuum and checkpoint on a copy of the same file.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import free_port, health, save, start_otrace, stop, table, wait_listening
from ingest import TRACE

import otrace

MONTH_TRACES = 100 * 60 * 24 * 30
SEED_RATE = 100 / 60             # traces/s: 100 LLM calls a minute


def db_size(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


def file_size(db: Path) -> int:
    return db.stat().st_size if db.exists() else 0


def scaled_ms(seconds: float, scale: int, rate: float) -> int:
    """An interval of the seed's defaults, shrunk so that the share of the cap that arrives within
    it is the same as at the seed's rate with the full cap (at least 10 ms, the settings' floor)."""
    return max(10, round(1000 * seconds * SEED_RATE / (rate * scale)))


def month(work: Path, scale: int, rate: float) -> dict[str, float]:
    cap, traces = 200 * 2**20 // scale, MONTH_TRACES // scale
    cleanup, checkpoint = scaled_ms(300, scale, rate), scaled_ms(600, scale, rate)
    push = max(100, scaled_ms(300, scale, rate))              # TRACE_PUSH_INTERVAL's floor
    sink = free_port()
    here = str(Path(__file__).parent)
    receiver = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); "
                                 f"import push; push.serve({sink})"])
    wait_listening(sink)
    proc, port = start_otrace(work, {
        "TRACE_DB_MAX_BYTES": str(cap), "TRACE_WAL_MAX_BYTES": str(cap // 4),
        "TRACE_PUSH_MAX_BYTES": str(5 * 2**20 // scale), "TRACE_QUEUE_SIZE": "64", "TRACE_BATCH_SIZE": "32",
        "TRACE_CLEANUP_INTERVAL": f"{cleanup}ms", "TRACE_CHECKPOINT_INTERVAL": f"{checkpoint}ms",
        "TRACE_PUSH_ENDPOINT": f"http://127.0.0.1:{sink}/ingest", "TRACE_PUSH_INTERVAL": f"{push}ms",
        "TRACE_METRICS_INTERVAL": "100ms"})
    db, sizes, files, done = work / "otrace.db", [], [], threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            sizes.append(db_size(db))
            files.append(file_size(db))

    def client(share: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        began = time.monotonic()
        for start in range(0, share, 20):
            time.sleep(max(0.0, began + start / (rate / 4) - time.monotonic()))   # this client's pace
            body = json.dumps([TRACE] * min(20, share - start))
            while True:
                conn.request("POST", "/v1/traces", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                if resp.status == 202:
                    break
                time.sleep(0.05)                  # 503: the queue is full, as an agent would retry

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    try:
        clients = [threading.Thread(target=client, args=(traces // 4,)) for _ in range(4)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        took = time.monotonic() - started
        while (report := health(port))["unsynced_count"] > 100 or report["queue_depth"]:
            time.sleep(0.5)
        time.sleep(2.5)                           # one more retention pass
        done.set()
        watcher.join()
        report = health(port)
        with sqlite3.connect(db) as conn:
            kept = conn.execute("SELECT count(*) FROM llm_traces").fetchone()[0]
            metrics = conn.execute("SELECT count(*) FROM system_metrics").fetchone()[0]
        return {"scale": scale, "cap": cap, "cleanup_ms": cleanup, "checkpoint_ms": checkpoint,
                "push_ms": push, "traces": traces, "seconds": took, "max_size": max(sizes),
                "max_file": max(files), "max_wal": max(s - f for s, f in zip(sizes, files, strict=True)),
                "final_size": db_size(db), "kept": kept, "metric_rows": metrics,
                "pushed": report["push"]["events_pushed"],
                "unpushed_deleted": sum(report["retention"]["unpushed_deleted_total"].values())}
    finally:
        done.set()
        stop(proc)
        receiver.terminate()
        receiver.wait()


def seed_pushed(db: Path, mib: int) -> int:
    """A database of pushed traces that arrived ten days ago, about `mib` MiB; how many rows."""
    otrace.open_database(str(db))
    template = otrace.parse_events(json.dumps(TRACE).encode(), "/v1/traces", 1, 16384)[0][0]
    columns = otrace.TRACES.columns
    old = otrace.now_ms() - 10 * 86_400_000
    rows = 0
    with sqlite3.connect(db) as conn:
        while db_size(db) < mib * 2**20:
            values = [(f"old-{rows + i}", old, old, *template.values[3:]) for i in range(5000)]
            conn.executemany(f"INSERT INTO llm_traces ({', '.join(columns)}, synced) VALUES "
                             f"({', '.join('?' * len(columns))}, 1)", values)
            conn.commit()
            rows += len(values)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return rows


def cleanup(work: Path, mib: int) -> dict[str, float]:
    base = work / "seed" / "otrace.db"
    base.parent.mkdir()
    rows = seed_pushed(base, mib)
    size = db_size(base)
    raw_copy = work / "raw.db"
    shutil.copy(base, raw_copy)
    started = time.perf_counter()
    with sqlite3.connect(raw_copy, isolation_level=None) as conn:
        conn.execute("DELETE FROM llm_traces WHERE synced != 0 AND received_at < ?", (otrace.now_ms(),))
        conn.executescript("PRAGMA incremental_vacuum;")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    raw = time.perf_counter() - started
    proc, port = start_otrace(base.parent, {"TRACE_RETENTION": "1d", "TRACE_CLEANUP_INTERVAL": "1s",
                                            "TRACE_METRICS_INTERVAL": "off"})
    try:
        while not (last := health(port)["retention"]["last_pass"]):
            time.sleep(0.1)
    finally:
        stop(proc)
    return {"rows": rows, "size": size, "raw_s": raw, "otrace_s": last["seconds"],
            "after": db_size(base)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=30)
    parser.add_argument("--rate", type=float, default=1500, help="traces/s sent")
    parser.add_argument("--cleanup-mib", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="otrace-month-") as tmp:
        work = Path(tmp)
        (work / "month").mkdir()
        sim = month(work / "month", args.scale, args.rate)
        print(f"  month: {sim}", flush=True)
        cost = cleanup(work, args.cleanup_mib)
        print(f"  cleanup: {cost}", flush=True)
    mib = 2**20
    markdown = table([f"a month at 1:{args.scale}", "value"], [
        ["traces sent (a month is 4,320,000)", f"{sim['traces']:,} in {sim['seconds']:.0f} s"],
        ["host samples stored", f"{sim['metric_rows']:,}"],
        ["cap (200 MiB / scale)", f"{sim['cap'] / mib:.1f} MiB"],
        ["largest file + WAL seen",
         f"{sim['max_size'] / mib:.1f} MiB (**{sim['max_size'] / sim['cap']:.2f}** × cap)"],
        ["largest main file seen (WAL aside)",
         f"{sim['max_file'] / mib:.1f} MiB (**{sim['max_file'] / sim['cap']:.2f}** × cap)"],
        ["largest WAL seen", f"{sim['max_wal'] / mib:.1f} MiB (**{sim['max_wal'] / sim['cap']:.2f}** × cap)"],
        ["at the end", f"{sim['final_size'] / mib:.1f} MiB, {sim['kept']:,} traces kept"],
        ["pushed / deleted before being pushed", f"{sim['pushed']:,} / {sim['unpushed_deleted']}"]])
    markdown += "\n\n" + table([f"cleanup of a {args.cleanup_mib} MiB database", "seconds", "ratio"], [
        [f"raw DELETE + incremental_vacuum + TRUNCATE checkpoint of {cost['rows']:,} rows (baseline)",
         f"{cost['raw_s']:.2f}", "1.00"],
        ["otrace retention pass (1,000-row chunks between ingest batches)", f"{cost['otrace_s']:.2f}",
         f"**{cost['otrace_s'] / cost['raw_s']:.2f}**"]])
    save("month", markdown, {"month": sim, "cleanup": cost})


if __name__ == "__main__":
    main()
