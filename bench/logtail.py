"""Gateway log follower: lines/s through otrace's tailer, and what following an idle log costs.

    python bench/logtail.py [--lines 100000] [--rounds 3] [--idle 30]

Throughput: the 62 real gateway lines of ../shared/fixtures/openclaw, repeated to --lines, appear at
once in the directory a fresh otrace follows, which commits each unit of lines with its offset; the
committed offset is read every 10 ms until it is the file's end (every event before it is then in
SQLite). The pace, the ratio's figure: lines committed from the first commit past 5 % of the file to
the first past 95 %, over the time between them. Beside it, lines/s to the last commit, which holds
the last lines' wait for their batch to fill (up to TRACE_BATCH_WINDOW: latency by design). otrace
looks every 10 ms here, so neither holds the wait for its next look (up to TRACE_QUIET_POLL on a
quiet log). The baseline, in the same run: a bare loop that reads the same file line by line and
json-parses each line. A second baseline does the same job as otrace without its judgement: the bare
loop, and every 256 lines (otrace's unit) one transaction of raw sqlite3 `executemany` that inserts
the very rows otrace stored from those lines (read back from its database after its run) into a
fresh database of otrace's schema, with the file's offset: reading, parsing and storing, nothing
classified. The three take turns, --rounds times, and each figure is its median round (one round's
ratio moves with a shared host).
The sample is measured twice: repeated as it is (the goal's row), where each copy starts 15 minutes
before the last one ended, and with each copy moved on in time, as a real log's times rise (the
timestamps decide where a row lands in the created_at index). Then a real debug log, repeated as it is.

Idle: otrace with no log to follow, and otrace following an idle file, side by side for --idle
seconds at the default TRACE_LOG_POLL: their CPU (share of one core, summed over their threads to the
nanosecond: a 10 ms tick of /proc/<pid>/stat is 0.05 % of 20 s, five times the goal) and RSS.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import ROOT, Usage, health, median_run, save, side_by_side, start_otrace, stop, table

import otrace

FIXTURES = ROOT.parent / "shared" / "fixtures" / "openclaw"
SAMPLE = FIXTURES / "gateway-2026.9.6-sample.jsonl"     # a line of each kind: about half become events
DEBUG_LOG = FIXTURES / "gateway-2026.9.6-debug.log"     # a gateway's debug log as written: about a fifth


UNIT = 256                                              # lines otrace commits together, at most
POLL = 0.01                                             # seconds between reads of the committed offset
STAMP = re.compile(rb'"(time|date)":"([^"]+)"')        # tslog's two timestamps of a line


def write_sample(path: Path, lines: int, sample_file: Path = SAMPLE, rising: bool = False) -> int:
    """The sample's lines repeated to `lines` lines; the file's size. `rising`: each copy's timestamps
    are moved on past the copy before it, as a real log's times rise."""
    sample = sample_file.read_bytes().splitlines(keepends=True)
    if rising:
        times = [stamp_time(m) for m in STAMP.finditer(b"".join(sample))]
        step = max(times) - min(times) + timedelta(seconds=1)
    with open(path, "wb") as out:
        for copy, start in enumerate(range(0, lines, len(sample))):
            text = b"".join(sample[:lines - start])
            if rising and copy:
                text = STAMP.sub(lambda m, by=copy * step: moved(m, by), text)
            out.write(text)
    return path.stat().st_size


def stamp_time(stamp: re.Match[bytes]) -> datetime:
    return datetime.fromisoformat(stamp[2].decode().replace("Z", "+00:00"))


def moved(stamp: re.Match[bytes], by: timedelta) -> bytes:
    """A timestamp `by` later, written as it was (Z or +00:00, milliseconds)."""
    later = (stamp_time(stamp) + by).isoformat(timespec="milliseconds")
    if stamp[2].endswith(b"Z"):
        later = later.replace("+00:00", "Z")
    return b'"%s":"%s"' % (stamp[1], later.encode())


def bare_loop(path: Path) -> float:
    """Lines/s of the baseline: read line by line, json.loads each."""
    started, count = time.perf_counter(), 0
    with open(path, "rb") as lines:
        for line in lines:
            json.loads(line)
            count += 1
    return count / (time.perf_counter() - started)


# Where each stored row came from in the file: the offset of its line.
ROW_OFFSETS = {"log_events": "file_offset", "llm_traces": "json_extract(metadata, '$.log_offset')",
               "error_events": "json_extract(metadata, '$.log_offset')"}


def stored_rows(db: Path) -> dict[int, list[tuple[str, tuple]]]:
    """The rows otrace stored, by the offset of the line each came from: what the storing baseline
    writes (the failed attempts' rows too, by the offset in their trace_id)."""
    rows: dict[int, list[tuple[str, tuple]]] = {}
    with sqlite3.connect(db) as conn:
        for name, offset in ROW_OFFSETS.items():
            columns = ", ".join(otrace.TABLES[name].columns)
            for found in conn.execute(f"SELECT {offset}, {columns} FROM {name}"):
                rows.setdefault(found[0], []).append((name, found[1:]))
        for found in conn.execute("SELECT trace_id, run_id, outcome, created_at FROM openclaw_attempts"):
            rows.setdefault(int(found[0].split("-")[3], 16), []).append(("openclaw_attempts", found))
    return rows


def bare_store_loop(path: Path, rows: dict[int, list[tuple[str, tuple]]], db: Path) -> float:
    """Lines/s of the storing baseline: the bare loop, and a transaction of raw executemany every UNIT
    lines that stores the rows otrace made of them, with the offset, in a fresh otrace database."""
    for name in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        name.unlink(missing_ok=True)
    otrace.open_database(str(db))
    inserts = {name: f"INSERT INTO {name} ({', '.join(otrace.TABLES[name].columns)}) VALUES "
                     f"({', '.join('?' * len(otrace.TABLES[name].columns))})" for name in ROW_OFFSETS}
    inserts["openclaw_attempts"] = ("INSERT INTO openclaw_attempts (trace_id, run_id, outcome, created_at) "
                                    "VALUES (?, ?, ?, ?)")
    st = path.stat()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous = NORMAL")
    pending: dict[str, list[tuple]] = {}

    def commit(offset: int) -> None:
        conn.execute("BEGIN")
        for name, values in pending.items():
            conn.executemany(inserts[name], values)
        conn.execute(otrace.OFFSET_SQL, (st.st_dev, st.st_ino, "bench", str(path), offset, 0))
        conn.execute("COMMIT")
        pending.clear()

    started, count, offset = time.perf_counter(), 0, 0
    with open(path, "rb") as lines:
        for line in lines:
            json.loads(line)
            for name, values in rows.get(offset, ()):
                pending.setdefault(name, []).append(values)
            offset += len(line)
            count += 1
            if count % UNIT == 0:
                commit(offset)
    commit(offset)
    took = time.perf_counter() - started
    conn.close()
    return count / took


def committed(db: Path) -> int | None:
    with sqlite3.connect(db, timeout=10) as conn:
        row = conn.execute("SELECT max(position) FROM log_offsets").fetchone()
    return row[0] if row else None


def through_otrace(work: Path, source: Path, size: int, lines: int) -> dict[str, float]:
    logs = work / "logs"
    logs.mkdir()
    proc, port = start_otrace(work, {"TRACE_LOG_PATH": str(logs), "TRACE_METRICS_INTERVAL": "off",
                                     "TRACE_LOG_POLL": "10ms", "TRACE_QUIET_POLL": "10ms",
                                     "TRACE_OPENCLAW_STATE_DIR": "off"})   # the log alone: its traces too
    try:
        deadline = time.monotonic() + 60
        while not health(port)["log_tail"]["waiting"]:   # a file there at the first look is read from its end
            if time.monotonic() > deadline:
                raise RuntimeError("otrace's tailer never looked for the log")
            time.sleep(0.01)
        before, started = Usage.of(proc.pid), time.perf_counter()
        os.link(source, logs / "openclaw-2026-11-24.log")        # all of it there at once
        seen = [(0.0, 0)]                                        # (seconds, offset committed)
        while seen[-1][1] != size:
            time.sleep(POLL)
            seen.append((time.perf_counter() - started, committed(work / "otrace.db") or 0))
        took, after = seen[-1][0], Usage.of(proc.pid)
        with sqlite3.connect(work / "otrace.db") as conn:
            events = conn.execute("SELECT count(*) FROM log_events").fetchone()[0]
        return {"lines_per_s": pace(seen, source), "to_end_lines_per_s": lines / took, "events": events,
                "rss_mib": after.peak_rss_bytes / 2**20,
                "cpu_s_per_100k_lines": (after.cpu_s - before.cpu_s) * 100_000 / lines}
    finally:
        stop(proc)


def pace(seen: list[tuple[float, int]], source: Path) -> float:
    """Lines/s while catching up: the lines committed from the first commit past 5 % of the file to the
    first past 95 %, over the time between them. The last lines of a burst wait up to
    TRACE_BATCH_WINDOW for more, by design: latency, which the time to the last commit holds and a pace
    does not."""
    ends = list(itertools.accumulate(len(line) for line in source.read_bytes().splitlines(keepends=True)))
    size = ends[-1]
    (t5, at5), (t95, at95) = (next((t, o) for t, o in seen if o >= share * size) for share in (0.05, 0.95))
    return (bisect.bisect_right(ends, at95) - bisect.bisect_right(ends, at5)) / max(t95 - t5, POLL)


def idle_costs(work: Path, seconds: float) -> dict[str, dict[str, float]]:
    log = work / "idle.log"
    log.write_bytes(SAMPLE.read_bytes())
    runs = {"no log (baseline)": (work / "none", {}),
            "following an idle file": (work / "file", {"TRACE_LOG_PATH": str(log)})}
    procs = {}
    for name, (folder, env) in runs.items():
        folder.mkdir()
        procs[name] = start_otrace(folder, {"TRACE_METRICS_INTERVAL": "off", "TRACE_PROC_INTERVAL": "off",
                                            "TRACE_DNS_PROBE": "", "TRACE_GATEWAY_MATCH": "off",
                                            "TRACE_OPENCLAW_STATE_DIR": "off", **env})[0]
    return side_by_side(procs, 1.0, seconds, precise=True)   # a 10 ms tick is 0.05 % of 20 s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3, help="turns the three loops take per log")
    parser.add_argument("--idle", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="otrace-bench-") as tmp:
        work = Path(tmp)
        runs = {}
        for name, sample_file, rising in (("sample", SAMPLE, False), ("sample, rising", SAMPLE, True),
                                          ("debug log", DEBUG_LOG, False)):
            source = work / f"{name}.log"
            size = write_sample(source, args.lines, sample_file, rising)
            bare_runs, otrace_runs, store_runs = [], [], []
            for turn in range(args.rounds):                     # the three take turns
                bare_runs.append(bare_loop(source))
                (work / f"{name}-{turn}").mkdir()
                otrace_runs.append(through_otrace(work / f"{name}-{turn}", source, size, args.lines))
                rows = stored_rows(work / f"{name}-{turn}" / "otrace.db")
                store_runs.append(bare_store_loop(source, rows, work / "bare-store.db"))
            bare, storing = statistics.median_high(bare_runs), statistics.median_high(store_runs)
            ours = median_run(otrace_runs, "lines_per_s")
            runs[name] = {"bare_lines_per_s": bare, "bare_store_lines_per_s": storing, **ours,
                          "ratio": ours["lines_per_s"] / bare, "store_ratio": ours["lines_per_s"] / storing,
                          "rounds": {"bare": bare_runs, "otrace": [r["lines_per_s"] for r in otrace_runs],
                                     "bare_store": store_runs},
                          "mib": size / 2**20}
            print(f"  tailer, {name}: {ours['lines_per_s']:.0f} lines/s catching up, "
                  f"{ours['to_end_lines_per_s']:.0f} to the last commit (bare {bare:.0f}, bare and "
                  f"storing the same rows {storing:.0f})", flush=True)
        idle = idle_costs(work, args.idle)
    ours, debug = runs["sample"], runs["debug log"]
    markdown = table(["lines", "bare loop: read + json.loads (baseline), lines/s", "otrace tailer (classify, "
                      "rows, offset in the same transaction), lines/s catching up", "ratio",
                      "bare loop storing the same rows (second baseline), lines/s", "ratio to it",
                      "lines/s to the last commit", "CPU s / 100k lines", "RSS MiB", "became log events"], [
        [f"{name}: {args.lines} lines ({run['mib']:.1f} MiB)", f"{run['bare_lines_per_s']:.0f}",
         f"{run['lines_per_s']:.0f}", f"**{run['ratio']:.2f}**", f"{run['bare_store_lines_per_s']:.0f}",
         f"{run['store_ratio']:.2f}", f"{run['to_end_lines_per_s']:.0f}",
         f"{run['cpu_s_per_100k_lines']:.2f}", f"{run['rss_mib']:.1f}", f"{run['events']}"]
        for name, run in runs.items()])
    markdown += ("\n\nsample: the real gateway sample, a line of each kind (about half become events), "
                 "repeated as it is; sample, rising: each copy moved on in time, as a real log's times rise; "
                 "debug log: a real gateway debug log as written (about a fifth do). Catching up: from "
                 "the first commit past 5 % of the file to the first past 95 %; to the last commit: from "
                 "the file's appearance, with the last lines' wait for their batch (TRACE_BATCH_WINDOW). "
                 "Bare loop storing the same rows: the bare loop, and every 256 lines one raw sqlite3 "
                 "transaction (executemany) of the rows otrace made of them, and the offset."
                 "\n\n" + table(
                     [f"otrace, idle for {args.idle:.0f} s", "CPU % of a core", "RSS MiB"],
                     [[n, f"{c['cpu_pct']:.3f}", f"{c['rss_mib']:.1f}"] for n, c in idle.items()]))
    save("logtail", markdown, {"lines": args.lines, **ours, "rising": runs["sample, rising"],
                               "debug_log": debug, "idle": idle})


if __name__ == "__main__":
    main()
