"""OpenClaw session store: entries/s when catching up on a big store, and what following an idle one costs.

    python bench/session_store.py [--entries 100000] [--idle 60]

The store: a copy of the real 2026.9.6 agent database in ../shared/fixtures/openclaw, grown to
--entries transcript entries by copying its 39 real entries (user and assistant messages, custom and
model-change entries) with new ids into sessions of 200 entries; every tenth copied assistant entry
gets a 3 KiB reply and is stored zstd-compressed, as OpenClaw stores entries over 1 KiB.

Catch-up: a fresh otrace follows the store, which appears whole; the llm_traces rows are counted every
20 ms until every call is a row and every session's position is committed. The pace, the ratio's
figure: calls stored from the first count past 5 % of them to the first past 95 %, over the time
between, in entries/s (the store's entries are its calls repeated evenly). Beside it, entries/s to
the end, which hold the first look's wait (TRACE_OPENCLAW_POLL) and the last unit's wait for its
batch (up to TRACE_BATCH_WINDOW). The baseline, in the same run: a bare loop that reads the same
entries through sqlite3 and json-parses (decompressing where needed) each of them.

Idle: otrace with the store off, and otrace following the caught-up store at the default
TRACE_OPENCLAW_POLL, side by side for --idle seconds: their CPU. And in process, each as the store's
loop takes it: the CPU of one look at the store when nothing was committed (a few stat calls), of one
look after the gateway committed something that is no transcript entry (the rows past the last top,
searched by rowid), and of one that lists every session (once the commits stop, and every
STORE_LIST_EVERY while they go on), per hour at the default poll; against the host sampler's CPU per
hour at its default 15 s (one HostReader snapshot and row per sample).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import ROOT, Usage, save, side_by_side, start_otrace, stop, table
from metrics import host_sampler, per_call

import otrace

STATE = ROOT.parent / "shared" / "fixtures" / "openclaw" / "state-2026.9.6"
SESSION_ENTRIES = 200
HOUR = 3600.0


def octet_length(value: object) -> int | None:
    return None if value is None else len(value if isinstance(value, bytes) else str(value).encode())


def build_store(state: Path, entries: int) -> int:
    """Grow the copied agent database to `entries` entries; how many of them are model calls."""
    compress = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True).compress
    navigation = json.dumps({"version": 1, "report": {"kind": "canonical"}, "navigation": {}, "reset": {},
                             "model": {}, "modelBytes": 0, "modelWithoutCheckpointBytes": 0,
                             "withoutCustomDataBytes": 0})
    db = state / "agents" / "main" / "agent" / "openclaw-agent.sqlite"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.create_function("octet_length", 1, octet_length, deterministic=True)
    real = [json.loads(t) for (t,) in conn.execute("SELECT event_json FROM transcript_events ORDER BY rowid")]
    have = conn.execute("SELECT count(*) FROM transcript_events").fetchone()[0]
    calls = sum(1 for e in real if (e.get("message") or {}).get("role") == "assistant")
    now = int(time.time() * 1000) - entries
    rows = []
    for n in range(entries - have):
        entry = json.loads(json.dumps(real[n % len(real)]))
        entry["id"] = str(uuid.uuid4())
        message = entry.get("message") or {}
        long = message.get("role") == "assistant" and n % 10 == 0
        if message.get("role") == "assistant":
            calls += 1
            if long:
                message["content"] = [{"type": "text", "text": "A longer reply. " * 200}]
        text = json.dumps(entry, separators=(",", ":"))
        session, seq = f"bench-{n // SESSION_ENTRIES}", n % SESSION_ENTRIES
        if long:
            raw = text.encode()
            rows.append((session, seq, None, now + n, compress(raw), len(raw), navigation))
        else:
            rows.append((session, seq, text, now + n, None, None, None))
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO transcript_events (session_id, seq, event_json, created_at, event_zstd, "
                     "event_utf8_bytes, navigation_json) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return calls


def bare_loop(db: Path) -> float:
    """Entries/s of the baseline: read every entry through sqlite3, json.loads each."""
    decompress = zstandard.ZstdDecompressor().decompress
    started, count = time.perf_counter(), 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        for text, frame in conn.execute("SELECT event_json, event_zstd FROM transcript_events"):
            json.loads(text if frame is None else decompress(frame))
            count += 1
    return count / (time.perf_counter() - started)


POLL = 0.02                                    # seconds between counts of the rows stored


def stored(db: Path) -> tuple[int, int]:
    """(llm_traces rows, session positions committed) in otrace's database so far."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            return (conn.execute("SELECT count(*) FROM llm_traces").fetchone()[0],
                    conn.execute("SELECT count(*) FROM openclaw_positions").fetchone()[0])
    except sqlite3.OperationalError:
        return 0, 0


def pace(seen: list[tuple[float, int]], total: int) -> float:
    """Rows/s from the first count past 5 % of `total` to the first past 95 %."""
    (t5, n5), (t95, n95) = (next((t, n) for t, n in seen if n >= share * total) for share in (0.05, 0.95))
    return (n95 - n5) / max(t95 - t5, POLL)


def catch_up(work: Path, state: Path, entries: int, calls: int, sessions: int) -> dict[str, float]:
    """A fresh otrace waiting for the state directory; timed from the store appearing whole."""
    watched = work / "state"
    proc, _ = start_otrace(work, {"TRACE_OPENCLAW_STATE_DIR": str(watched), "TRACE_OPENCLAW_POLL": "100ms",
                                  "TRACE_METRICS_INTERVAL": "off"})
    try:
        before, started = Usage.of(proc.pid), time.perf_counter()
        state.rename(watched)
        seen = [(0.0, 0)]                          # (seconds, llm_traces rows)
        while (now := stored(work / "otrace.db")) != (calls, sessions):
            time.sleep(POLL)
            seen.append((time.perf_counter() - started, now[0]))
        took, after = time.perf_counter() - started, Usage.of(proc.pid)
        watched.rename(state)
        rows_per_s = pace(seen, calls)
        return {"entries_per_s": rows_per_s * entries / calls, "rows_per_s": rows_per_s,
                "to_end_entries_per_s": entries / took, "seconds": took,
                "cpu_s": after.cpu_s - before.cpu_s, "rss_mib": after.peak_rss_bytes / 2**20}
    finally:
        stop(proc)


def per_look(work: Path, state: Path) -> dict[str, float]:
    """CPU seconds of one turn of the store's loop at the caught-up store, in process, each as the loop
    takes it (Loop.run clears `news` first): with nothing committed since the last look (the files
    older than the stamps' margin, as an idle store's are: a few stat calls), the look after the
    gateway committed to another table of its database (the rows past the last top, searched by
    rowid), and the look that lists every session (the first after the commits stop, and one every
    STORE_LIST_EVERY while they go on)."""
    config = otrace.Config(db_path=str(work / "otrace.db"))
    database = otrace.Database(config.db_path)
    store = otrace.SessionStore(config, otrace.EventQueue(64, 8), database, state)

    def turn() -> float:
        started = time.process_time()
        store.news = False
        store.tick()
        return time.process_time() - started

    turn()                                         # connects and lists the sessions once
    time.sleep(otrace.STAMP_MARGIN_NS / 1e9 + 0.5)
    turn()                                         # a look that found nothing: its stamps kept
    n = 2000
    idle = sum(turn() for _ in range(n)) / n
    gateway = sqlite3.connect(state / "agents" / "main" / "agent" / "openclaw-agent.sqlite",
                              isolation_level=None)
    gateway.execute("CREATE TABLE IF NOT EXISTS bench_touch (n INTEGER)")
    turn()
    turn()
    added = listed = 0.0
    m = 200
    for i in range(m):
        gateway.execute("INSERT INTO bench_touch VALUES (?)", (i,))
        added += turn()
        listed += turn()                           # nothing committed since: every session listed
    gateway.close()
    if store.fault.error or store.errors:
        sys.exit(f"bench: the store reader failed: {store.fault.error or store.errors}")
    database.close()
    return {"idle_look_s": idle, "changed_look_s": added / m, "listing_look_s": listed / m}


def sampler_sample_s(work: Path) -> float:
    """CPU seconds of one host sample (snapshot and row), as bench/metrics.py measures it."""
    return per_call(host_sampler(otrace.HostReader(Path("/proc"), Path("/sys"), str(work))), 500)


def idle_processes(work: Path, state: Path, seconds: float) -> dict[str, dict[str, float]]:
    """Two otraces side by side: the store off, and following the caught-up store at the default poll."""
    (work / "off").mkdir()
    shutil.copy(work / "catchup" / "otrace.db", work / "on.db")
    runs = {"store off (baseline)": (work / "off", {"TRACE_OPENCLAW_STATE_DIR": "off"}),
            "following the idle store, 2 s poll": (work / "on", {"TRACE_OPENCLAW_STATE_DIR": str(state)})}
    (work / "on").mkdir()
    (work / "on.db").rename(work / "on" / "otrace.db")
    procs = {name: start_otrace(folder, {"TRACE_METRICS_INTERVAL": "off", **env})[0]
             for name, (folder, env) in runs.items()}
    return {n: {"cpu_s_per_hour": got["cpu_pct"] / 100 * HOUR, "rss_mib": got["rss_mib"]}
            for n, got in side_by_side(procs, 3.0, seconds).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--idle", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="otrace-bench-") as tmp:
        work = Path(tmp)
        state = work / "state"
        shutil.copytree(STATE, state)
        for path in (state, *state.rglob("*")):
            path.chmod(0o700 if path.is_dir() else 0o600)
        calls = build_store(state, args.entries)
        db = state / "agents" / "main" / "agent" / "openclaw-agent.sqlite"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            sessions, size = conn.execute(
                "SELECT count(DISTINCT session_id), sum(coalesce(length(event_json), length(event_zstd))) "
                "FROM transcript_events").fetchone()
        bare = max(bare_loop(db) for _ in range(3))
        (work / "catchup").mkdir()
        ours = catch_up(work / "catchup", state, args.entries, calls, sessions)
        print(f"  catch-up: {ours['entries_per_s']:.0f} entries/s, {ours['to_end_entries_per_s']:.0f} to the "
              f"end (bare {bare:.0f})", flush=True)
        looks = per_look(work / "catchup", state)
        sample = sampler_sample_s(work)
        idle = idle_processes(work, state, args.idle)
    polls = HOUR / otrace.Config().openclaw_poll
    listings = HOUR / otrace.STORE_LIST_EVERY      # while the gateway commits before every look
    idle_hour = looks["idle_look_s"] * polls
    changed_hour = looks["changed_look_s"] * (polls - listings) + looks["listing_look_s"] * listings
    sampler_hour = sample * HOUR / otrace.Config().metrics_interval
    ratio = ours["entries_per_s"] / bare
    markdown = table(["path", "entries/s", "ratio", "calls/s", "entries/s to the end", "CPU s",
                      "peak RSS MiB"], [
        ["bare loop: sqlite3 read + json.loads (baseline)", f"{bare:.0f}", "1.00", "", "", "", ""],
        ["otrace catching up (parse, rows, positions in the same transactions)",
         f"{ours['entries_per_s']:.0f}", f"**{ratio:.2f}**", f"{ours['rows_per_s']:.0f}",
         f"{ours['to_end_entries_per_s']:.0f}", f"{ours['cpu_s']:.2f}", f"{ours['rss_mib']:.1f}"]])
    markdown += (f"\n\n{args.entries:,} entries ({size / 2**20:.1f} MiB of JSON and zstd) in {sessions} "
                 f"sessions, {calls:,} of them model calls; caught up in {ours['seconds']:.1f} s. "
                 "Entries/s: the pace from 5 % of the calls stored to 95 %; to the end: from the store's "
                 "appearance to the last commit.\n\n")
    markdown += table(["following the caught-up store", "CPU per look", "CPU s per hour at 2 s",
                       "against the host sampler (15 s)"], [
        ["nothing committed since the last look", f"{looks['idle_look_s'] * 1e6:.0f} µs",
         f"{idle_hour:.3f}", f"{idle_hour / sampler_hour:.2f}×"],
        ["the gateway committed something else (rows past the last top searched by rowid)",
         f"{looks['changed_look_s'] * 1e6:.0f} µs", "", ""],
        [f"every session listed (once the commits stop, and every {otrace.STORE_LIST_EVERY:g} s while "
         "they go on)", f"{looks['listing_look_s'] * 1e6:.0f} µs", "", ""],
        ["the gateway committing before every look: both, at their rates", "", f"{changed_hour:.3f}",
         f"{changed_hour / sampler_hour:.2f}×"],
        ["host sampler: one snapshot + row", f"{sample * 1e6:.0f} µs", f"{sampler_hour:.3f}", "1.00×"]])
    markdown += "\n\n" + table(
        [f"otrace processes, idle for {args.idle:.0f} s", "CPU s per hour", "RSS MiB"],
        [[n, f"{c['cpu_s_per_hour']:.2f}", f"{c['rss_mib']:.1f}"] for n, c in idle.items()])
    save("session_store", markdown, {
        "entries": args.entries, "calls": calls, "sessions": sessions, "bare_entries_per_s": bare, **ours,
        "ratio": ratio, **looks, "sample_s": sample, "idle_cpu_s_per_hour": idle_hour,
        "changed_cpu_s_per_hour": changed_hour, "sampler_cpu_s_per_hour": sampler_hour, "processes": idle})


if __name__ == "__main__":
    main()
