"""Report: `otrace report` on a database at its cap, against hand-written SQL of the same sums, and
what pricing adds at ingest; measured in the same run.

    python bench/report.py [--mib 200] [--days 3] [--runs 5]

The database is filled to --mib (file + WAL, TRACE_DB_MAX_BYTES' default) with --days of an agent's
life, in the order rows arrive: LLM calls from OpenClaw's session store (a short reply text), OTLP
(attributes only) and HTTP clients (1.5 KB prompt, 500 B reply), priced by otrace's own trace_row;
four gateway log events a call, an error event for one call in fifty, and a host sample every 15 s. Each
query is timed as a user runs it, a process from start to exit, the median of --runs:

- otrace: `python -m otrace report` (compiled, as `make run` and the .pyz start it): the default
  (last 24 h by model), --json, and a week by day with --breakdown (the whole database);
- baseline: a python3 process running the hand-written SQL of the per-model sums (calls, tokens,
  cost) over the same 24 h: the least a user would type, without percentiles or the other sections.

Also: the bytes the created_at indexes take (the database vacuumed with and without them), the CPU
pricing adds per trace at ingest (parse_events with and without a price table), and an idle otrace's
RSS after pricing calls of six models beside one started without prices.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import py_compile
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import OTRACE, Usage, free_port, save, stop, table, wait_listening

import otrace

MODELS = [("anthropic", "claude-sonnet-4-5"), ("anthropic", "claude-haiku-4-5"), ("openai", "gpt-4o"),
          ("openai", "gpt-4o-mini"), ("google", "gemini-2.5-pro"), ("deepseek", "deepseek-chat")]
HAND_SQL = ("SELECT provider, model, count(*), sum(prompt_tokens), sum(completion_tokens), total(cost_usd) "
            "FROM llm_traces WHERE created_at >= ? GROUP BY provider, model")
KINDS = ("model_call", "channel_inbound", "channel_outbound", "other")


def minute(rng: random.Random, at: int, n: int) -> list[otrace.Row]:
    """Three LLM calls from the three sources, with their log and error events."""
    rows = []
    for k in range(3):
        created = at + rng.randint(0, 59_999)
        provider, model = rng.choice(MODELS)
        source = ("openclaw_session", "otlp", "http")[k]
        prompt, cached = rng.randint(500, 30_000), 0
        event = {"provider": provider, "model": model, "prompt_tokens": prompt,
                 "completion_tokens": rng.randint(20, 2_000), "latency_ms": rng.uniform(300, 30_000),
                 "session_id": f"session-{n // 30 % 400}", "created_at": created,
                 "status": "error" if rng.random() < 0.02 else "ok", "metadata": {"agent": "main", "run": n}}
        if source == "openclaw_session":
            cached = rng.randint(0, prompt)
            event |= {"cache_read_tokens": cached, "cost_usd": prompt * 2e-6, "output_text": "r" * 600}
        elif source == "otlp":
            event["metadata"] |= {"gen_ai.operation.name": "chat", "otel_trace_id": "0" * 32,
                                  "span_id": "0" * 16, "service.name": "agent", "gen_ai.request.model": model}
        else:
            event |= {"input_text": "p" * 1500, "output_text": "r" * 500}
        rows.append(otrace.event_row(otrace.TRACES, otrace.trace_row, event, source))
        if event["status"] == "error":
            rows.append(otrace.event_row(otrace.ERRORS, otrace.error_row, {
                "error_type": "llm_error", "category": "rate_limit", "message": "429 Too Many Requests",
                "provider": provider, "model": model, "created_at": created}, source))
    for k in range(12):
        created = at + 5_000 * k
        rows.append(otrace.Row("log_events", (f"log-{n}-{k}", created, created, "log", "INFO", "gateway",
                                              KINDS[k % 4], "a gateway message " * 4, None, None,
                                              "/tmp/openclaw/openclaw.log", n * 12 + k)))
    return rows


def samples(rng: random.Random, start: int, end: int) -> list[otrace.Row]:
    """A host sample every 15 s from start to end."""
    rows = []
    for at in range(start - start % 15_000 + 15_000, end, 15_000):
        values = dict.fromkeys(otrace.METRICS.columns) | {
            "trace_id": f"m-{at}", "created_at": at, "received_at": at, "source": "proc",
            "cpu_pct": rng.uniform(1, 90), "mem_used_bytes": rng.randint(2**29, 2**30), "disk_used_pct": 40.0,
            "mem_limit_bytes": 2**31, "self_rss_bytes": 24 * 2**20}
        rows.append(otrace.Row("system_metrics", tuple(values.values())))
    return rows


def size(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def fill(path: Path, mib: int, days: float) -> int:
    """The database at `mib` MiB holding `days` of minutes up to now; how many LLM calls it holds."""
    rng = random.Random(20)
    probe = Path(tempfile.mkdtemp()) / "probe.db"        # bytes per minute, to spread the cap over the days
    write(probe, [row for n in range(200) for row in minute(rng, n * 60_000, n)])
    per_minute = size(probe) / 200
    shutil.rmtree(probe.parent)
    step = max(1, round(per_minute * days * 1440 / (mib * 2**20) * 60_000))    # ms between minutes
    at, n, calls = otrace.now_ms() - int(days * 86_400_000), 0, 0
    while not path.exists() or size(path) < mib * 2**20:
        batch = [row for k in range(200) for row in minute(rng, at + (n + k) * step, n + k)]
        batch += samples(rng, at + n * step, at + (n + 200) * step)
        calls += sum(row.table == "llm_traces" for row in batch)
        write(path, batch)
        n += 200
    return calls


def write(path: Path, rows: list[otrace.Row]) -> None:
    otrace.open_database(str(path))
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn, otrace.transaction(conn):
        for name in otrace.EVENT_TABLES:
            otrace.insert_rows(conn, name, [row.values for row in rows if row.table == name])


def timed(command: list[str], runs: int) -> tuple[float, str]:
    """The median wall time of `command`, from start to exit, and its last output."""
    times, out = [], ""
    for _ in range(runs):
        started = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=OTRACE.parent).stdout
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def index_bytes(db: Path) -> tuple[int, int]:
    """The database's size vacuumed with its created_at indexes, and without them."""
    with tempfile.TemporaryDirectory() as tmp:
        sizes = []
        for drop in (False, True):
            copy = Path(tmp) / f"copy-{drop}.db"
            shutil.copy(db, copy)
            with contextlib.closing(sqlite3.connect(copy, isolation_level=None)) as conn:
                if drop:
                    for name in ("llm_traces", "error_events", "system_metrics", "log_events"):
                        conn.execute(f"DROP INDEX {name}_created")
                conn.execute("VACUUM")
            sizes.append(copy.stat().st_size)
            copy.unlink()
    return sizes[0], sizes[1]


def pricing_cpu(events: int = 20_000, rounds: int = 5) -> tuple[float, float]:
    """CPU µs per trace through parse_events with the vendored table, and with none: the least of
    `rounds` rounds taken in turns, so a busy neighbour weighs on both alike."""
    body = json.dumps([{"provider": provider, "model": model, "prompt_tokens": 1200 + n,
                        "completion_tokens": 80, "cache_read_tokens": 100}
                       for n, (provider, model) in zip(range(100), MODELS * 17, strict=False)]).encode()
    tables = {"priced": otrace.load_prices(""), "unpriced": None}
    best = dict.fromkeys(tables, float("inf"))
    for _ in range(rounds):
        for name, prices in tables.items():
            otrace.PRICING.install(prices)
            otrace.parse_events(body, "/v1/traces", 100, 16384)          # warm: compile, memoize
            started = time.process_time()
            for _ in range(events // 100):
                otrace.parse_events(body, "/v1/traces", 100, 16384)
            best[name] = min(best[name], 1e6 * (time.process_time() - started) / events)
    return best["priced"], best["unpriced"]


def priced_rss() -> tuple[float, float]:
    """RSS of an otrace that priced calls of six models, beside one run from a directory without
    prices.json (it prices nothing), after the same calls."""
    body = json.dumps([{"provider": p, "model": m, "prompt_tokens": 1000, "completion_tokens": 100}
                       for p, m in MODELS]).encode()
    rss = []
    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp) / "bare"
        bare.mkdir()
        shutil.copy(OTRACE, bare / "otrace.py")
        for where in (OTRACE.parent, bare):
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")} | {
                "TRACE_PORT": str(port), "TRACE_DB_PATH": f"{tmp}/otrace.db", "TRACE_METRICS_INTERVAL": "off",
                "TRACE_LOG_LEVEL": "warning"}
            py_compile.compile(str(where / "otrace.py"))
            proc = subprocess.Popen([sys.executable, "-m", "otrace"], env=env, cwd=where,
                                    stdout=subprocess.DEVNULL)
            try:
                wait_listening(port)
                for _ in range(10):
                    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/traces", body,
                                                     {"Content-Type": "application/json"})
                    urllib.request.urlopen(request, timeout=10).read()
                time.sleep(2)
                rss.append(Usage.of(proc.pid).rss_bytes / 2**20)
            finally:
                stop(proc)
            Path(f"{tmp}/otrace.db").unlink()
    return rss[0], rss[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--days", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "otrace.db"
        started = time.monotonic()
        calls = fill(db, args.mib, args.days)
        print(f"  filled {size(db) / 2**20:.0f} MiB with {calls:,} LLM calls over {args.days} days in "
              f"{time.monotonic() - started:.0f} s", flush=True)
        report = [sys.executable, "-m", "otrace", "report", "--db", str(db)]
        subprocess.run([sys.executable, "-m", "py_compile", str(OTRACE)], check=True)
        runs = {}
        for name, extra in (("24 h by model (the default)", []), ("24 h by model, --json", ["--json"]),
                            ("7 days by day, --breakdown", ["--since", "7d", "--by", "day", "--breakdown"])):
            runs[name] = timed([*report, *extra], args.runs)[0]
            print(f"  otrace report, {name}: {runs[name]:.3f} s", flush=True)
        day_calls = json.loads(timed([*report, "--json"], 1)[1])["calls"]["totals"]["calls"]
        since = otrace.now_ms() - 86_400_000
        hand = [sys.executable, "-c", f"import sqlite3; c = sqlite3.connect('file:{db}?mode=ro', uri=True); "
                f"print(c.execute({HAND_SQL!r}, ({since},)).fetchall())"]
        baseline = timed(hand, args.runs)[0]
        print(f"  hand-written SQL, 24 h by model: {baseline:.3f} s", flush=True)
        with_indexes, without = index_bytes(db)
        db_size = size(db)
    priced_us, unpriced_us = pricing_cpu()
    rss_priced, rss_bare = priced_rss()
    index_mib, index_pct = (with_indexes - without) / 2**20, 100 * (with_indexes - without) / with_indexes
    markdown = table(["query (a process, start to exit, median of runs)", "seconds", "ratio to hand SQL"], [
        *([f"otrace report, {name}", f"{seconds:.3f}", f"{seconds / baseline:.1f}×"]
          for name, seconds in runs.items()),
        ["hand-written SQL of the per-model sums, 24 h (baseline)", f"{baseline:.3f}", "1.0×"]])
    markdown += (
        f"\n\n{db_size / 2**20:.0f} MiB database (file + WAL), {calls:,} LLM calls over {args.days} days, "
        f"{day_calls:,} in the last 24 h. The created_at indexes take {index_mib:.1f} MiB ({index_pct:.1f} % "
        f"of the vacuumed file).\n\nPricing at ingest: {priced_us:.1f} µs of CPU per trace through "
        f"parse_events, {unpriced_us:.1f} µs without a price table (+{priced_us - unpriced_us:.1f} µs). RSS "
        f"after pricing calls of six models: {rss_priced:.1f} MiB, {rss_bare:.1f} MiB for otrace run without "
        f"prices.json (+{rss_priced - rss_bare:.1f} MiB).")
    save("report", markdown, {"mib": args.mib, "days": args.days, "calls": calls, "calls_24h": day_calls,
                              "db_bytes": db_size, "runs": runs, "baseline_s": baseline,
                              "index_bytes": with_indexes - without, "vacuumed_bytes": with_indexes,
                              "pricing_us": priced_us, "unpriced_us": unpriced_us,
                              "rss_priced_mib": rss_priced, "rss_bare_mib": rss_bare})


if __name__ == "__main__":
    main()
