"""OTLP ingest: GenAI spans/s persisted from the official OpenTelemetry SDK, Arize Phoenix and otrace.

    python bench/otlp.py [--seconds 10] [--processes 2] [--batch 512] [--drain 600]
                         [--only phoenix|otrace]

Load: --processes processes of the OpenTelemetry Python SDK (the interpreter of .venv, or
$OTLP_SDK_PYTHON), each a TracerProvider with a BatchSpanProcessor (--batch spans per export, a
queue of four batches) and the OTLP/HTTP protobuf exporter, configured only through
OTEL_EXPORTER_OTLP_ENDPOINT (every other OTEL_* variable is removed). Each makes `chat {model}`
CLIENT spans with current GenAI semantic-convention attributes (gen_ai.operation.name,
gen_ai.provider.name, request and response model, input and output tokens, finish reasons) as fast
as its processor exports them: it waits while four batches are queued or in flight, so the processor
drops none. After --seconds it stops making spans and shuts the provider down, which exports the
rest. The exporter's own result (after its retries) counts the spans of exports that succeeded and
that failed.

Targets, one after the other, each fresh:
- Arize Phoenix in SQLite mode, installed as for bench/peers.py; persisted = rows of its spans
  table once every accepted span is there, or the count stopped growing; "complete" = those LLM rows
  that carry the model (llm.model_name) and both token counts (Phoenix translates gen_ai.* into
  OpenInference itself). Phoenix answers 200 at once and writes later, at about 100-150 spans/s on
  2 cores: a 10 s load leaves it minutes of writing (--drain bounds the wait; use a short --seconds
  where time is short).
- otrace, started compiled as `make run` does, with TRACE_OTLP_PORT on a free port; persisted = rows
  of llm_traces with source 'otlp', "complete" = those with the model and both token counts. Before
  the load it also measures what its first OTLP request costs in RSS (the protobuf classes are
  imported then): RSS before and after one small export.

Printed: seconds to ready, spans/s persisted (rows over the time from the first span to the last
row; when rows still come --drain seconds after the load, the rows written by then, marked *), the
exporter's successes and failures, idle RSS after start, peak RSS under load (Phoenix: its
whole process tree), and CPU seconds of the target (from before the load to the last row) and of
the load. The JSON adds the rows-over-time timeline, the exporter's logged retries and give-ups,
and the load average. Every process started here is stopped at the end, and every wait has a
bound. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Usage, free_port, save, start_otrace, stop, table
from peers import PHOENIX_VENV, PHOENIX_VERSION, phoenix_python

SDK_PYTHON = Path(os.environ.get("OTLP_SDK_PYTHON", ROOT / ".venv" / "bin" / "python"))
MODELS = [("openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", "api.openai.com"),
          ("anthropic", "claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "api.anthropic.com"),
          ("openai", "gpt-4.1", "gpt-4.1-2025-04-14", "api.openai.com")]
QUEUED_BATCHES = 4
SETTLE_S = {"phoenix": 10.0, "otrace": 2.0}       # after ready, before idle RSS is read
QUIET_S = 10.0                                     # no new row this long after the load: done


# -------------------------------------------------------------------- load (runs in SDK_PYTHON)

def load(seconds: float, batch: int) -> None:
    """One load process: make GenAI spans as fast as the BatchSpanProcessor exports them.

    Prints "ready" once the SDK is set up, waits for a line on stdin, makes spans for `seconds`,
    shuts the provider down (exporting what is left) and prints its counts as one JSON line."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.trace import SpanKind  # noqa: PLC0415

    room = threading.Semaphore(QUEUED_BATCHES * batch)   # spans queued or being exported
    counts = {"created": 0, "ok": 0, "failed": 0, "ok_exports": 0, "failed_exports": 0,
              "last_export_end": 0.0}

    class Counting(SpanExporter):
        """The SDK's OTLP/HTTP exporter, counting what it reports; frees room in the queue."""

        def __init__(self) -> None:
            self.inner = OTLPSpanExporter()          # endpoint from OTEL_EXPORTER_OTLP_ENDPOINT

        def export(self, spans: Any) -> SpanExportResult:
            try:
                result = self.inner.export(spans)
            finally:
                room.release(len(spans))
            good = result is SpanExportResult.SUCCESS
            counts["ok" if good else "failed"] += len(spans)
            counts["ok_exports" if good else "failed_exports"] += 1
            counts["last_export_end"] = time.monotonic()
            return result

        def shutdown(self) -> None:
            self.inner.shutdown()

    provider = TracerProvider(resource=Resource.create({"service.name": f"otrace-bench-{os.getpid()}"}))
    provider.add_span_processor(BatchSpanProcessor(Counting(), max_queue_size=QUEUED_BATCHES * batch,
                                                   max_export_batch_size=batch))
    tracer = provider.get_tracer("otrace.bench.otlp")
    print("ready", flush=True)
    sys.stdin.readline()
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        if not room.acquire(timeout=0.2):
            continue
        system, model, version, host = MODELS[n % len(MODELS)]
        now = time.time_ns()
        span = tracer.start_span(f"chat {model}", kind=SpanKind.CLIENT, start_time=now - 800_000_000,
                                 attributes={"gen_ai.operation.name": "chat", "gen_ai.provider.name": system,
                                             "gen_ai.request.model": model, "server.address": host,
                                             "server.port": 443})
        span.set_attributes({"gen_ai.response.model": version, "gen_ai.response.id": f"resp-{n}",
                             "gen_ai.usage.input_tokens": 200 + n % 800,
                             "gen_ai.usage.output_tokens": 20 + n % 300,
                             "gen_ai.response.finish_reasons": ("stop",)})
        span.end(end_time=now)
        n += 1
    counts["created"] = n
    provider.shutdown()                              # exports the rest (bounded: 30 s, then gives up)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({**counts, "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)


@dataclass
class Sent:
    """What the load processes made and what their exporters reported."""

    created: int
    ok: int
    failed: int
    ok_exports: int
    failed_exports: int
    exporting_s: float        # from the first span to the end of the last export
    cpu_s: float


def start_load(endpoint: str, processes: int, seconds: float, batch: int,
               log: Path) -> list[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    python = SDK_PYTHON if SDK_PYTHON.exists() else Path(sys.executable)
    with log.open("ab") as err:
        procs = [subprocess.Popen([str(python), __file__, "--load", "--seconds", str(seconds), "--batch",
                                   str(batch)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=err) for _ in range(processes)]
    for proc in procs:
        if proc.stdout.readline().strip() != b"ready":
            kill_all(procs)
            sys.exit(f"otlp: a load process did not start (is opentelemetry-sdk in {python}?); see {log}")
    return procs


def finish_load(procs: list[subprocess.Popen], started: float) -> Sent:
    totals = dict.fromkeys(("created", "ok", "failed", "ok_exports", "failed_exports", "cpu_s"), 0.0)
    last = started
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=60)        # its shutdown gives up after 30 s
        except subprocess.TimeoutExpired:
            kill_all(procs)
            raise
        if proc.returncode:
            raise RuntimeError(f"load process exited {proc.returncode}")
        result = json.loads(out)
        last = max(last, result.pop("last_export_end"))
        for key in totals:
            totals[key] += result[key]
    return Sent(**{k: int(v) for k, v in totals.items() if k != "cpu_s"}, exporting_s=last - started,
                cpu_s=totals["cpu_s"])


def kill_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- process trees

def tree(pid: int) -> list[int]:
    """`pid` and every process descended from it."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += parents.get(current, [])
    return found


def tree_usage(pid: int) -> tuple[float, int]:
    """CPU seconds and RSS bytes of `pid` and its descendants (the living ones)."""
    cpu, rss = 0.0, 0
    for member in tree(pid):
        try:
            usage = Usage.of(member)
        except (OSError, TypeError):               # gone, or a zombie without VmRSS
            continue
        cpu, rss = cpu + usage.cpu_s, rss + usage.rss_bytes
    return cpu, rss


def end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this script started `proc` in; SIGKILL to what is left at 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# -------------------------------------------------------------------------------------- targets

@dataclass
class Target:
    """A started target: its process, where to send OTLP, and how to count what it persisted."""

    proc: subprocess.Popen
    endpoint: str
    ready_s: float
    count: Callable[[], int]
    complete: Callable[[], int]
    stop: Callable[[], None]
    extra: dict[str, Any] = field(default_factory=dict)     # figures of this target alone


PHOENIX_COMPLETE = """SELECT count(*) FROM spans WHERE span_kind = 'LLM'
    AND json_extract(attributes, '$.llm.model_name') IS NOT NULL
    AND llm_token_count_prompt > 0 AND llm_token_count_completion > 0"""


def phoenix_count(db: Path, sql: str = "SELECT count(*) FROM spans") -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute(sql).fetchone()[0]


def start_phoenix(work: Path) -> Target:
    python = phoenix_python()
    site = next((PHOENIX_VENV / "lib").glob("python3*/site-packages"))
    compileall.compile_dir(str(site), quiet=2, workers=2)     # started as installed: compiled
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PHOENIX_", "OTEL_"))},
           "PHOENIX_WORKING_DIR": str(work), "PHOENIX_HOST": "127.0.0.1", "PHOENIX_PORT": str(port),
           "PHOENIX_GRPC_PORT": str(free_port()), "PHOENIX_TELEMETRY_ENABLED": "false"}
    began = time.monotonic()
    with (work / "phoenix.log").open("wb") as log:
        proc = subprocess.Popen([str(python), str(PHOENIX_VENV / "bin" / "phoenix"), "serve"], env=env,
                                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None or time.monotonic() - began > 180:
                raise RuntimeError(f"Phoenix did not start; see {work / 'phoenix.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except OSError:
                time.sleep(0.1)
    except BaseException:
        end_group(proc)
        raise
    db = work / "phoenix.db"
    return Target(proc, f"http://127.0.0.1:{port}", time.monotonic() - began, lambda: phoenix_count(db),
                  lambda: phoenix_count(db, PHOENIX_COMPLETE), lambda: end_group(proc))


def otrace_persisted(db_path: Path) -> int:
    """Spans otrace has persisted from OTLP: its llm_traces rows with source 'otlp'."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute("SELECT count(*) FROM llm_traces WHERE source = 'otlp'").fetchone()[0]


def otrace_complete(db_path: Path) -> int:
    """Of those, the rows with the model and both token counts."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute("SELECT count(*) FROM llm_traces WHERE source = 'otlp' AND model <> '' "
                            "AND prompt_tokens > 0 AND completion_tokens > 0").fetchone()[0]


def one_span() -> bytes:
    """A small OTLP/HTTP protobuf export: one chat span (built with opentelemetry-proto)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: PLC0415
        ExportTraceServiceRequest,
    )
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = os.urandom(16), os.urandom(8), "chat gpt-4o-mini"
    span.start_time_unix_nano, span.end_time_unix_nano = time.time_ns() - 10**9, time.time_ns()
    for key, value in (("gen_ai.operation.name", "chat"), ("gen_ai.request.model", "gpt-4o-mini")):
        attribute = span.attributes.add()
        attribute.key, attribute.value.string_value = key, value
    return request.SerializeToString()


def start_otrace_otlp(work: Path) -> Target:
    """otrace with OTLP ingest on its own port; the RSS its first OTLP request adds is measured."""
    otlp_port = free_port()
    began = time.monotonic()
    proc, _ = start_otrace(work, {"TRACE_OTLP_PORT": str(otlp_port), "TRACE_METRICS_INTERVAL": "off"})
    ready = time.monotonic() - began
    time.sleep(SETTLE_S["otrace"])
    before = Usage.of(proc.pid).rss_bytes
    request = urllib.request.Request(f"http://127.0.0.1:{otlp_port}/v1/traces", data=one_span(),
                                     headers={"Content-Type": "application/x-protobuf"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        answer.read()
    time.sleep(1.0)
    after = Usage.of(proc.pid).rss_bytes
    db = work / "otrace.db"
    return Target(proc, f"http://127.0.0.1:{otlp_port}", ready, lambda: otrace_persisted(db),
                  lambda: otrace_complete(db), lambda: stop(proc),
                  {"rss_before_otlp_mib": before / 2**20, "rss_after_first_otlp_mib": after / 2**20})


# ------------------------------------------------------------------------------------ the run

def measure(name: str, target: Target, processes: int, seconds: float, batch: int, drain: float,
            work: Path) -> dict[str, Any]:
    """Idle footprint, then the load, then wait until every accepted span is persisted, or the count
    stopped growing for QUIET_S after the load, or `drain` seconds after the load (Phoenix writes
    what it accepted minutes later, and starts only once it has decoded it)."""
    try:
        time.sleep(SETTLE_S[name])
        cpu_before, idle = tree_usage(target.proc.pid)
        before = target.count()
        procs = start_load(target.endpoint, processes, seconds, batch, work / "load.log")
        try:
            started = changed = time.monotonic()
            for proc in procs:
                proc.stdin.write(b"go\n")
                proc.stdin.flush()
            persisted, peak, sent, load_end, drained = before, idle, None, 0.0, True
            timeline: list[tuple[float, int]] = []                # (s since the first span, rows)
            while True:
                time.sleep(0.25)
                now = time.monotonic()
                peak = max(peak, tree_usage(target.proc.pid)[1])
                count = target.count()
                if count != persisted:
                    persisted, changed = count, now
                if not timeline or now - started - timeline[-1][0] >= 1:
                    timeline.append((round(now - started, 1), count - before))
                if sent is None and all(p.poll() is not None for p in procs):
                    sent, load_end = finish_load(procs, started), now
                if sent is not None and (persisted - before >= sent.ok      # all written, or it wrote
                                         or (persisted > before                 # and then stopped
                                             and now - max(changed, load_end) >= QUIET_S)):
                    break
                late = sent is not None and now - load_end >= drain
                if late or now - started > seconds + 120 + drain:     # load processes end by then
                    drained = False
                    break
            if sent is None:
                sent = finish_load(procs, started)
        finally:
            kill_all(procs)
        log = (work / "load.log").read_text(errors="replace")
        retries, gave_up = log.count("Transient error"), log.count("Failed to export")
        cpu_after, _ = tree_usage(target.proc.pid)
        persisted -= before
        took = max(changed - started, 1e-9)
        if not drained:
            print(f"  {name}: still persisting {drain:g} s after the load; the rate is of what it had "
                  f"persisted by then ({sent.ok - persisted:,} accepted spans not yet written)", flush=True)
        return {"ready_s": target.ready_s, "persisted": persisted, "complete": target.complete(),
                "drained": drained, "backlog": sent.ok - persisted,
                "persisted_per_s": persisted / took, "persist_s": took,
                "exported_per_s": sent.ok / max(sent.exporting_s, 1e-9), **asdict(sent),
                "load_cpu_s": sent.cpu_s, "idle_rss_mib": idle / 2**20, "peak_rss_mib": peak / 2**20,
                "cpu_s": cpu_after - cpu_before,
                "cpu_ms_per_1k": 1e6 * (cpu_after - cpu_before) / persisted if persisted else None,
                "exporter_retries": retries, "exporter_gave_up": gave_up,
                "loadavg_1m": os.getloadavg()[0], "timeline": timeline, **target.extra}
    finally:
        target.stop()


def row(label: str, r: dict[str, Any]) -> list[str]:
    per_1k = f"{r['cpu_ms_per_1k']:.0f}" if r["cpu_ms_per_1k"] is not None else "–"
    return [label, f"{r['ready_s']:.1f}", f"{r['persisted_per_s']:,.0f}" + ("" if r["drained"] else " *"),
            f"{r['persisted']:,} ({r['complete']:,})", f"{r['ok']:,} / {r['failed']:,}",
            f"{r['idle_rss_mib']:.0f}", f"{r['peak_rss_mib']:.0f}", f"{r['cpu_s']:.1f} ({per_1k})",
            f"{r['load_cpu_s']:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="load for each target")
    parser.add_argument("--processes", type=int, default=2, help="load processes, one exporter each")
    parser.add_argument("--batch", type=int, default=512, help="spans per export")
    parser.add_argument("--drain", type=float, default=600,
                        help="longest wait after the load for the persisted count to stop growing")
    parser.add_argument("--only", choices=["phoenix", "otrace"])
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)   # a load process
    args = parser.parse_args()
    if args.load:
        load(args.seconds, args.batch)
        return
    results: dict[str, dict[str, Any]] = {}
    starts = {"phoenix": start_phoenix, "otrace": start_otrace_otlp}
    with tempfile.TemporaryDirectory(prefix="otrace-otlp-") as tmp:
        for name, start in starts.items():
            if args.only not in (None, name):
                continue
            work = Path(tmp) / name
            work.mkdir()
            target = start(work)
            results[name] = measure(name, target, args.processes, args.seconds, args.batch, args.drain,
                                    work)
            print(f"  {name}: {({k: v for k, v in results[name].items() if k != 'timeline'})}", flush=True)
    labels = {"phoenix": f"Arize Phoenix {PHOENIX_VERSION} (SQLite)", "otrace": "otrace"}
    rows = [row(labels[n], r) for n, r in results.items()]
    markdown = table([f"OTLP/HTTP protobuf, {args.processes} SDK processes, {args.batch} spans an export, "
                      f"{args.seconds:g} s", "ready s", "spans/s persisted",
                      "persisted (with model + tokens)", "exporter ok / failed spans", "idle RSS MiB",
                      "peak RSS MiB", "CPU s (ms per 1k spans)", "load CPU s"], rows)
    data: dict[str, Any] = {**results, "seconds": args.seconds, "processes": args.processes,
                            "batch": args.batch}
    ours, theirs = results.get("otrace"), results.get("phoenix")
    if ours and theirs:
        data["speed_ratio"] = ours["persisted_per_s"] / theirs["persisted_per_s"]
        data["rss_ratio"] = ours["idle_rss_mib"] / theirs["idle_rss_mib"]
        markdown += (f"\n\notrace/Phoenix: **{data['speed_ratio']:.1f}×** the OTLP spans/s persisted at "
                     f"**{data['rss_ratio']:.2f}×** the idle RSS.")
    if late := [f"{n} had {r['backlog']:,} accepted spans to go" for n, r in results.items()
                if r and not r["drained"]]:
        markdown += (f"\n\n\\* still persisting {args.drain:g} s after the load ended: the rate is of the "
                     f"rows written by then; {', '.join(late)}.")
    if ours:
        markdown += (f"\n\notrace's first OTLP request (the protobuf classes imported): RSS "
                     f"{ours['rss_before_otlp_mib']:.1f} → {ours['rss_after_first_otlp_mib']:.1f} MiB "
                     f"(+{ours['rss_after_first_otlp_mib'] - ours['rss_before_otlp_mib']:.1f}).")
    if loads := [f"{n} {r['loadavg_1m']:.1f}" for n, r in results.items()]:
        markdown += f"\n\nLoad average (1 min) as each run ended: {', '.join(loads)}."
    save("otlp", markdown, data)


if __name__ == "__main__":
    main()
