"""Storage: otrace's writer against raw sqlite3 executemany of the same rows, in the same run.

    python bench/storage.py [--rows 50000]

Both write the same 2 KB trace rows to a fresh database with otrace's schema and pragmas, 50 rows a
transaction. The baseline is a bare loop of executemany + commit; otrace's path is the real one: each
row offered to the EventQueue as one unit (as one HTTP request would), committed by the Writer thread.
Printed: rows/s, CPU per row, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import save, table
from ingest import TRACE

import otrace


def rows(n: int) -> list[otrace.Row]:
    body = json.dumps(TRACE).encode()
    template = otrace.parse_events(body, "/v1/traces", 1, 16384)[0][0]
    return [otrace.Row(template.table, (f"bench-{i}", *template.values[1:])) for i in range(n)]


def raw(path: str, batch: list[otrace.Row], size: int) -> tuple[float, float]:
    otrace.open_database(path)
    conn = otrace.connect(path)
    sql = otrace.insert_sql("llm_traces")
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(batch), size):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, [row.values for row in batch[start:start + size]])
        conn.execute("COMMIT")
    return time.perf_counter() - wall, time.process_time() - cpu


def through_otrace(path: str, batch: list[otrace.Row], size: int) -> tuple[float, float]:
    config = otrace.Config(db_path=path, batch_size=size, queue_size=len(batch))
    otrace.open_database(path)
    events = otrace.EventQueue(config.queue_size, config.batch_size)
    writer = otrace.Writer(config, otrace.Database(path), events, otrace.Counters(otrace.EVENT_COUNTERS))
    writer.start()
    wall, cpu = time.perf_counter(), time.process_time()
    for row in batch:
        events.offer(otrace.Unit([row]))
    events.wait_drained(600)
    took = time.perf_counter() - wall, time.process_time() - cpu
    events.submit(None).result(10)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args()
    batch = rows(args.rows)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in (("raw sqlite3 executemany", raw), ("otrace writer", through_otrace)):
            wall, cpu = run(f"{tmp}/{name.split()[0]}.db", batch, 50)
            results[name] = {"rows_per_s": args.rows / wall, "cpu_us_per_row": 1e6 * cpu / args.rows}
            print(f"  {name}: {results[name]['rows_per_s']:.0f} rows/s", flush=True)
    base, ours = results["raw sqlite3 executemany"], results["otrace writer"]
    ratio = ours["rows_per_s"] / base["rows_per_s"]
    markdown = table(["path", "rows/s", "CPU µs/row", "ratio"], [
        ["raw sqlite3 executemany (baseline)", f"{base['rows_per_s']:.0f}", f"{base['cpu_us_per_row']:.1f}",
         "1.00"],
        ["otrace EventQueue + Writer", f"{ours['rows_per_s']:.0f}", f"{ours['cpu_us_per_row']:.1f}",
         f"**{ratio:.2f}**"]])
    markdown += f"\n\n{args.rows} rows of 2 KB traces, 50 per transaction, WAL, synchronous=NORMAL."
    save("storage", markdown, {"rows": args.rows, **results, "ratio": ratio})


if __name__ == "__main__":
    main()
