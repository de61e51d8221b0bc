"""Peers, side by side on this machine: Arize Phoenix for ingest, collectd and node_exporter for the
cost of host metrics. Every ratio is measured in the same run.

    python bench/peers.py [--seconds 20] [--window 120]

Ingest: the same multi-process Python load generator sends LLM calls to otrace (POST /v1/traces, a
2 KB JSON trace) and to Phoenix in SQLite mode (OTLP/HTTP, one LLM span of the same content per
request), from 4 kept-alive connections for --seconds each. Counted: events each one has persisted
(otrace's /health; the rows of Phoenix's spans table once it stops growing), and idle RSS after
start (Phoenix: its whole process tree).

Host metrics: collectd (cpu, memory, df, disk plugins, csv writer), node_exporter (default collectors,
scraped by this script over one kept-alive connection, as Prometheus scrapes) and otrace
(TRACE_METRICS_INTERVAL) run at the same time for --window seconds, all sampling every --interval
seconds (default 1 s: at 15 s one sample costs less than the 10 ms tick that /proc/<pid>/stat counts
CPU in, so collectd reads as 0). Printed: CPU per sample, the share of one core that makes at a 15 s
interval, and RSS. A second otrace with metrics off is the baseline that separates the sampler's cost
from the rest of the process.

Phoenix is installed into .cache/peers/venv-phoenix on first use (pip), collectd and node_exporter
from Debian's packages. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ROOT,
    Usage,
    free_port,
    health,
    require,
    save,
    start_otrace,
    stop,
    stop_all,
    table,
    wait_listening,
)
from ingest import TRACE

PHOENIX_VENV = Path(os.environ.get("PHOENIX_VENV", ROOT / ".cache" / "peers" / "venv-phoenix"))
PHOENIX_VERSION = "20.26.1"
SPAN_BUILDER = '''
import os, time
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

def kv(key, value):
    text = isinstance(value, str)
    return KeyValue(key=key, value=AnyValue(string_value=value) if text else AnyValue(int_value=value))

def request(trace):
    now = time.time_ns()
    attributes = [kv("openinference.span.kind", "LLM"), kv("llm.provider", trace["provider"]),
                  kv("llm.model_name", trace["model"]), kv("input.value", trace["input_text"]),
                  kv("output.value", trace["output_text"]),
                  kv("llm.token_count.prompt", trace["prompt_tokens"]),
                  kv("llm.token_count.completion", trace["completion_tokens"]),
                  kv("llm.token_count.total", trace["prompt_tokens"] + trace["completion_tokens"])]
    span = Span(trace_id=os.urandom(16), span_id=os.urandom(8), name="llm", attributes=attributes,
                start_time_unix_nano=now - 800_000_000, end_time_unix_nano=now)
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])]
                                     ).SerializeToString()
'''


# ---------------------------------------------------------------------------- load generator

def _worker(port: int, path: str, content_type: str, bodies: list[bytes], seconds: float,
            results: multiprocessing.Queue) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    ok = failed = 0
    start = time.perf_counter()
    for body in bodies:
        if time.perf_counter() - start > seconds:
            break
        conn.request("POST", path, body, {"Content-Type": content_type})
        resp = conn.getresponse()
        resp.read()
        ok, failed = (ok + 1, failed) if 200 <= resp.status < 300 else (ok, failed + 1)
    results.put((ok, failed))


def blast(port: int, path: str, content_type: str, make_bodies: Callable[[int], list[bytes]],
          connections: int, seconds: float) -> tuple[int, int]:
    """POST pre-built bodies from `connections` processes for `seconds`: (2xx answers, others)."""
    results: multiprocessing.Queue = multiprocessing.Queue()
    per_worker = make_bodies(connections)
    workers = [multiprocessing.Process(target=_worker, args=(port, path, content_type, bodies, seconds,
                                                             results)) for bodies in per_worker]
    for worker in workers:
        worker.start()
    totals = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    return sum(t[0] for t in totals), sum(t[1] for t in totals)


def json_bodies(connections: int, each: int = 60_000) -> list[list[bytes]]:
    return [[json.dumps({**TRACE, "trace_id": f"bench-{c}-{i}"}).encode() for i in range(each)]
            for c in range(connections)]


# --------------------------------------------------------------------------------------- Phoenix

def phoenix_python() -> Path:
    python = PHOENIX_VENV / "bin" / "python"
    if not (PHOENIX_VENV / "bin" / "phoenix").exists():
        subprocess.run([sys.executable, "-m", "venv", str(PHOENIX_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"arize-phoenix=={PHOENIX_VERSION}",
                        "opentelemetry-proto"], check=True)
    return python


def span_bodies(connections: int, each: int = 20_000) -> list[list[bytes]]:
    """One OTLP request per call, built by Phoenix's own venv (it has opentelemetry-proto)."""
    code = SPAN_BUILDER + ("import json, sys\ntrace = json.loads(sys.argv[1])\n"
                           "out = open(sys.argv[2], 'wb')\n"
                           f"for _ in range({each * connections}):\n    body = request(trace)\n"
                           "    out.write(len(body).to_bytes(4, 'big') + body)\n")
    with tempfile.NamedTemporaryFile() as out:
        subprocess.run([str(phoenix_python()), "-c", code, json.dumps(TRACE), out.name], check=True)
        data, bodies, at = Path(out.name).read_bytes(), [], 0
    while at < len(data):
        size = int.from_bytes(data[at:at + 4], "big")
        bodies.append(data[at + 4:at + 4 + size])
        at += 4 + size
    return [bodies[c::connections] for c in range(connections)]


def tree_rss(pid: int) -> int:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    pids = [pid] + [int(p) for p in children.stdout.split()]
    return sum(Usage.of(p).rss_bytes for p in pids if Path(f"/proc/{p}").exists())


def phoenix(work: Path, connections: int, seconds: float) -> dict[str, float]:
    port = free_port()
    env = {**os.environ, "PHOENIX_WORKING_DIR": str(work), "TMPDIR": str(work),   # its pid files too
           "PHOENIX_HOST": "127.0.0.1",
           "PHOENIX_PORT": str(port), "PHOENIX_GRPC_PORT": str(free_port()),
           "PHOENIX_TELEMETRY_ENABLED": "false"}
    bodies = span_bodies(connections)
    proc = subprocess.Popen([str(PHOENIX_VENV / "bin" / "phoenix"), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(10)                                    # settled
        idle = tree_rss(proc.pid)
        ok, failed = blast(port, "/v1/traces", "application/x-protobuf", lambda _: bodies, connections,
                           seconds)
        started = changed = time.monotonic()
        persisted = 0
        while time.monotonic() - changed < 3:                 # ingestion is asynchronous: wait for it
            time.sleep(0.2)
            with sqlite3.connect(work / "phoenix.db", timeout=30) as conn:
                count = conn.execute("SELECT count(*) FROM spans").fetchone()[0]
            if count != persisted:
                persisted, changed = count, time.monotonic()
        drained = changed - started
        return {"accepted_per_s": ok / seconds, "persisted": persisted, "failed": failed,
                "persisted_per_s": persisted / (seconds + drained), "idle_rss_mib": idle / 2**20,
                "peak_rss_mib": tree_rss(proc.pid) / 2**20}
    finally:
        proc.terminate()
        proc.wait(30)


def otrace_ingest(work: Path, connections: int, seconds: float) -> dict[str, float]:
    proc, port = start_otrace(work, {"TRACE_METRICS_INTERVAL": "off"})
    try:
        time.sleep(2)
        idle = Usage.of(proc.pid).rss_bytes
        ok, failed = blast(port, "/v1/traces", "application/json", json_bodies, connections, seconds)
        started = time.monotonic()
        while health(port)["queue_depth"]:
            time.sleep(0.05)
        persisted = health(port)["events_persisted"]
        return {"accepted_per_s": ok / seconds, "persisted": persisted, "failed": failed,
                "persisted_per_s": persisted / (seconds + time.monotonic() - started),
                "idle_rss_mib": idle / 2**20, "peak_rss_mib": Usage.of(proc.pid).peak_rss_bytes / 2**20}
    finally:
        stop(proc)


# -------------------------------------------------------------------------------- host metrics

COLLECTD_CONF = """Interval {interval}
BaseDir "{work}"
PIDFile "{work}/collectd.pid"
TypesDB "/usr/share/collectd/types.db"
LoadPlugin cpu
LoadPlugin memory
LoadPlugin df
LoadPlugin disk
LoadPlugin csv
<Plugin csv>
  DataDir "{work}/csv"
</Plugin>
"""


def metric_costs(work: Path, window: float, interval: float) -> dict[str, dict[str, float]]:
    collectd = require("collectd", "collectd-core")
    exporter = require("prometheus-node-exporter", "prometheus-node-exporter")
    (work / "collectd.conf").write_text(COLLECTD_CONF.format(work=work, interval=interval))
    (work / "on").mkdir()
    (work / "off").mkdir()
    exporter_port = free_port()
    procs = {
        "collectd": subprocess.Popen([collectd, "-f", "-C", str(work / "collectd.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        "node_exporter": subprocess.Popen([exporter, f"--web.listen-address=127.0.0.1:{exporter_port}"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        "otrace": start_otrace(work / "on", {"TRACE_METRICS_INTERVAL": f"{interval * 1000:.0f}ms"})[0],
        "otrace, metrics off": start_otrace(work / "off", {"TRACE_METRICS_INTERVAL": "off"})[0],
    }
    try:
        wait_listening(exporter_port)
        scraper = http.client.HTTPConnection("127.0.0.1", exporter_port, timeout=10)   # kept alive, as
        time.sleep(2)                                                               # Prometheus keeps it
        before, samples = {n: Usage.of(p.pid) for n, p in procs.items()}, {n: [] for n in procs}
        started = next_scrape = time.monotonic()
        while time.monotonic() - started < window:
            if time.monotonic() >= next_scrape:             # node_exporter works only when scraped
                scraper.request("GET", "/metrics")
                scraper.getresponse().read()
                next_scrape += interval
            for name, proc in procs.items():
                samples[name].append(Usage.of(proc.pid).rss_bytes)
            time.sleep(1)
        wall = time.monotonic() - started
        samples_taken = wall / interval
        return {n: {"cpu_ms_per_sample": 1000 * (Usage.of(p.pid).cpu_s - before[n].cpu_s) / samples_taken,
                    "rss_mib": sum(samples[n]) / len(samples[n]) / 2**20,
                    "max_rss_mib": max(samples[n]) / 2**20}
                for n, p in procs.items()}
    finally:
        stop_all(procs.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20, help="ingest run for each")
    parser.add_argument("--window", type=float, default=90, help="host-metrics window")
    parser.add_argument("--interval", type=float, default=1, help="host-metrics sampling interval")
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="otrace-peers-") as tmp:
        work = Path(tmp)
        for name in ("phoenix", "otrace", "metrics"):
            (work / name).mkdir()
        theirs = phoenix(work / "phoenix", args.connections, args.seconds)
        print(f"  phoenix: {theirs}", flush=True)
        ours = otrace_ingest(work / "otrace", args.connections, args.seconds)
        print(f"  otrace: {ours}", flush=True)
        costs = metric_costs(work / "metrics", args.window, args.interval)
        print(f"  host metrics: {costs}", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    speed = ours["persisted_per_s"] / theirs["persisted_per_s"]
    memory = ours["idle_rss_mib"] / theirs["idle_rss_mib"]
    markdown = table([f"ingest, {args.connections} connections", "accepted/s", "persisted/s",
                      "idle RSS MiB", "peak RSS MiB"], [
        [f"Arize Phoenix {PHOENIX_VERSION} (SQLite, OTLP/HTTP)", f"{theirs['accepted_per_s']:.0f}",
         f"{theirs['persisted_per_s']:.0f}", f"{theirs['idle_rss_mib']:.0f}",
         f"{theirs['peak_rss_mib']:.0f}"],
        ["otrace", f"{ours['accepted_per_s']:.0f}", f"{ours['persisted_per_s']:.0f}",
         f"{ours['idle_rss_mib']:.1f}", f"{ours['peak_rss_mib']:.1f}"]])
    markdown += (f"\n\notrace/Phoenix: **{speed:.1f}×** the persisted events/s at **{memory:.2f}×** the idle "
                 f"RSS (goals: ≥ 50× at ≤ 0.10×).\n\n")
    sampler = costs["otrace"]["cpu_ms_per_sample"] - costs["otrace, metrics off"]["cpu_ms_per_sample"]
    costs["otrace's sampler (on less off)"] = {"cpu_ms_per_sample": sampler, "rss_mib": 0, "max_rss_mib": 0}
    base = costs["collectd"]["cpu_ms_per_sample"]
    markdown += table([f"host metrics, a sample every {args.interval:g} s for {args.window:.0f} s",
                       "CPU ms per sample", "% of a core at 15 s", "× collectd", "RSS MiB (avg / max)"],
                      [[n, f"{c['cpu_ms_per_sample']:.2f}", f"{c['cpu_ms_per_sample'] / 150:.4f}",
                        f"{c['cpu_ms_per_sample'] / base:.1f}" if base else "–",
                        f"{c['rss_mib']:.1f} / {c['max_rss_mib']:.1f}" if c["rss_mib"] else "–"]
                       for n, c in costs.items()])
    markdown += ("\n\nGoal: otrace's sampler within 2× collectd's CPU. node_exporter's CPU includes "
                 "answering each scrape (not the scraper's); otrace's includes writing samples to SQLite.")
    save("peers", markdown, {"phoenix": theirs, "otrace": ours, "speed_ratio": speed, "rss_ratio": memory,
                             "host_metrics": costs, "seconds": args.seconds, "window": args.window,
                             "interval": args.interval})


if __name__ == "__main__":
    main()
