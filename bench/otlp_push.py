"""OTLP push: otrace's LLM traces checked field by field in Arize Phoenix, and otrace's push measured
against the OpenTelemetry SDK's own exporter into the same bare sink, in the same run.

    python bench/otlp_push.py [--traces 500] [--spans 40000] [--late 15] [--only proof|throughput]

Proof. Arize Phoenix in SQLite mode (started as bench/otlp.py starts it) is otrace's push endpoint:
TRACE_PUSH_FORMAT=otlp, http/protobuf, TRACE_PUSH_INTERVAL 1 s, host metrics every second. First with
the default TRACE_PUSH_SIGNALS: 50 LLM calls and an error event, then, once the logs have failed
three cycles (their breaker opens), 50 more calls; recorded: what Phoenix answered on /v1/logs and
/v1/metrics, otrace's push_log and /health, and how many of the later calls reached Phoenix within
--late seconds. Then a second otrace on the same Phoenix with TRACE_PUSH_SIGNALS=traces gets
--traces LLM calls (four providers, six models, varied prompt, completion, cache and reasoning
tokens, a tenth failed) and a few error events; once all its rows are synced and Phoenix's spans
table holds every call as an LLM span with the model and both token counts, each span is compared
with the call as it was posted: name, model, provider, prompt / completion / cache tokens, session,
ERROR status and error type for the failures, start and end time, the cost otrace computed, and
the prompt and response text.
A call missing from Phoenix or differing in any field makes the run exit 1 (after saving).

Throughput. A bare OTLP sink (stdlib http.server in a process of its own, answering 200 with an
empty ExportTraceServiceResponse, counting spans by decoding every request with opentelemetry-proto,
or json for OTLP JSON) receives --spans GenAI spans (a) from the official OpenTelemetry SDK: spans
already made, fed to a BatchSpanProcessor with its defaults (512 spans an export) and the OTLP/HTTP
exporter, protobuf and JSON (the "bare client"); (b) from otrace pushing the same calls from its
database (loaded through /v1/traces with push off, then started with push on: its first cycle begins
5 s after start), protobuf and JSON. spans/s = the spans after the first request over the time from
the first request's arrival to the last span's, as bench/push.py counts (no side is charged for
filling its first batch). Printed: spans/s, bytes a span, the ratio otrace/SDK for each encoding,
otrace's time to every row synced, its RSS before and at peak while pushing, and the CPU seconds of
each sender while it sent. Every process started here is stopped at the end; every wait has a bound.
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Usage, free_port, health, save, start_otrace, stop, table, wait_listening
from otlp import PHOENIX_COMPLETE, SDK_PYTHON, Target, phoenix_count, start_phoenix
from peers import PHOENIX_VERSION

MODELS = [("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4-5"), ("openai", "gpt-4.1"),
          ("anthropic", "claude-haiku-4-5"), ("gcp.gemini", "gemini-2.5-flash"),
          ("openrouter", "deepseek/deepseek-chat-v3")]
ERRORS = ["http_429", "timeout", "http_500", "context_length_exceeded"]
FINISH = ["stop", "length", "tool_calls"]
BASE_MS = 1_796_000_000_000                 # created_at of the first call: fixed, so runs compare
PROOF_ENV = {"TRACE_PUSH_FORMAT": "otlp", "TRACE_PUSH_OTLP_PROTOCOL": "http/protobuf",
             "TRACE_PUSH_INTERVAL": "1s", "TRACE_METRICS_INTERVAL": "1s", "TRACE_OTLP_PORT": "0",
             "TRACE_OPENCLAW_STATE_DIR": "off"}
QUIET_ENV = {"TRACE_METRICS_INTERVAL": "off", "TRACE_OTLP_PORT": "0", "TRACE_OPENCLAW_STATE_DIR": "off"}
PROTOCOLS = ("http/protobuf", "http/json")
WAIT_S = 180.0                              # longest wait for anything to be pushed or persisted


# ------------------------------------------------------------------------------------------- calls

def call(i: int, prefix: str) -> dict[str, Any]:
    """LLM call number `i` as an agent posts it to /v1/traces: varied, and the same in every run."""
    provider, model = MODELS[i % len(MODELS)]
    failed = i % 10 == 3
    event = {"trace_id": f"{prefix}-{i}", "provider": provider, "model": model,
             "created_at": BASE_MS + i * 1_337, "latency_ms": 150 + (i * 7_919 % 9_000) + (i % 1000) / 1000,
             "prompt_tokens": 40 + i * 131 % 30_000, "completion_tokens": 1 + i * 17 % 2_500,
             "session_id": f"session-{i % 17}", "finish_reason": "error" if failed else FINISH[i % 3],
             "input_text": f"question {i}: " + "q" * (i % 300),
             "output_text": f"answer {i}: " + "a" * (i % 200)}
    if i % 3 == 0:
        event["cache_read_tokens"] = i * 53 % 20_000
    if i % 4 == 1:
        event["cache_write_tokens"] = i * 29 % 5_000
    event["prompt_tokens"] += event.get("cache_read_tokens", 0) + event.get("cache_write_tokens", 0)  # in it
    if i % 5 == 2:
        event["reasoning_tokens"] = i * 11 % 1_000
    if failed:
        event |= {"status": "error", "error_type": ERRORS[i % len(ERRORS)]}
    return event


def post_all(port: int, path: str, events: list[dict[str, Any]], chunk: int = 1000) -> None:
    """POST `events` in arrays of `chunk` over one kept-alive connection; every answer must be 202."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for at in range(0, len(events), chunk):
            conn.request("POST", path, json.dumps(events[at:at + chunk]),
                         {"Content-Type": "application/json"})
            answer = conn.getresponse()
            body = answer.read()
            if answer.status != 202:
                raise RuntimeError(f"otrace answered {answer.status} to {path}: {body[:300]!r}")
    finally:
        conn.close()


def wait_for(check: Any, what: str, timeout: float = WAIT_S, every: float = 0.25) -> Any:
    end = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
    return value


def otrace_query(db: Path, sql: str, *params: Any) -> list[tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute(sql, params).fetchall()


def synced_of(db: Path, prefix: str) -> int:
    return otrace_query(db, "SELECT count(*) FROM llm_traces WHERE synced = 1 AND trace_id LIKE ?",
                        f"{prefix}-%")[0][0]


# ------------------------------------------------------------------------------------ the proof

def phoenix_complete_of(phoenix: Target, prefix: str) -> int:
    """LLM spans of this run's calls with the model and both token counts."""
    return phoenix_count(phoenix.extra["db"], PHOENIX_COMPLETE.replace(
        "FROM spans WHERE", f"FROM spans WHERE json_extract(attributes, '$.otrace.trace_id') LIKE "
        f"'{prefix}-%' AND"))


def phoenix_spans(db: Path, prefix: str) -> dict[str, dict[str, Any]]:
    """This run's spans in Phoenix's table, by span id."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT s.span_id, t.trace_id, s.name, s.span_kind, s.start_time, s.end_time, s.attributes, "
            "s.status_code, s.status_message, s.llm_token_count_prompt, s.llm_token_count_completion "
            "FROM spans s JOIN traces t ON t.id = s.trace_rowid "
            "WHERE json_extract(s.attributes, '$.otrace.trace_id') LIKE ?", (f"{prefix}-%",)).fetchall()
    return {row["span_id"]: dict(row) | {"attributes": json.loads(row["attributes"])} for row in rows}


def at(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def utc_us(text: str) -> int:
    """A Phoenix timestamp (UTC, microseconds) as microseconds since the epoch."""
    moment = datetime.fromisoformat(text)
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
    return round(moment.timestamp() * 1_000_000)


def message_text(attrs: dict[str, Any], key: str) -> str | None:
    """The text of the one message Phoenix shows under `key` (OpenInference's flattened messages)."""
    messages = at(attrs, key)
    if not isinstance(messages, list) or len(messages) != 1:
        return None
    return (messages[0].get("message") or {}).get("content")


def differences(sent: dict[str, Any], cost: float | None, span: dict[str, Any] | None,
                trace_hex: str) -> dict[str, tuple[Any, Any]]:
    """Each field where Phoenix's span differs from the call as posted: {field: (expected, found)}."""
    if span is None:
        return {"span": ("present", None)}
    attrs, failed = span["attributes"], sent.get("status") == "error"
    start_us = sent["created_at"] * 1000
    latency_us = round(sent["latency_ms"] * 1000)
    expected = {
        "trace_id": trace_hex, "name": f"chat {sent['model']}", "span_kind": "LLM",
        "llm.model_name": sent["model"], "gen_ai.provider.name": sent["provider"],
        "prompt_tokens": sent["prompt_tokens"], "completion_tokens": sent["completion_tokens"],
        "cache_read_tokens": sent.get("cache_read_tokens"),
        "cache_write_tokens": sent.get("cache_write_tokens"),
        "reasoning_tokens": sent.get("reasoning_tokens"), "session.id": sent["session_id"],
        "status_code": "ERROR" if failed else "UNSET", "status_message": sent.get("error_type", ""),
        "start_us": start_us, "latency_us": latency_us, "cost_usd": cost,
        "input_text": sent["input_text"], "output_text": sent["output_text"]}
    found = {
        "trace_id": span["trace_id"], "name": span["name"], "span_kind": span["span_kind"],
        "llm.model_name": at(attrs, "llm.model_name"),
        "gen_ai.provider.name": at(attrs, "gen_ai.provider.name"),
        "prompt_tokens": span["llm_token_count_prompt"],
        "completion_tokens": span["llm_token_count_completion"],
        "cache_read_tokens": at(attrs, "llm.token_count.prompt_details.cache_read"),
        "cache_write_tokens": at(attrs, "llm.token_count.prompt_details.cache_write"),
        "reasoning_tokens": at(attrs, "gen_ai.usage.reasoning.output_tokens"),
        "session.id": at(attrs, "session.id"), "status_code": span["status_code"],
        "status_message": span["status_message"], "start_us": utc_us(span["start_time"]),
        "latency_us": utc_us(span["end_time"]) - utc_us(span["start_time"]),
        "cost_usd": at(attrs, "gen_ai.usage.cost"),
        "input_text": message_text(attrs, "llm.input_messages"),
        "output_text": message_text(attrs, "llm.output_messages")}
    near = {"start_us": 2, "latency_us": 2}      # Phoenix turns nanoseconds into a float of seconds
    return {key: (value, found[key]) for key, value in expected.items()
            if not (found[key] == value or (key in near and abs(found[key] - value) <= near[key])
                    or (key == "cost_usd" and value is not None and found[key] is not None
                        and abs(found[key] - value) <= 1e-12))}


def compare(db: Path, phoenix_db: Path, prefix: str, sent: list[dict[str, Any]]) -> dict[str, Any]:
    """Every call of the run against its span in Phoenix."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import otrace  # noqa: PLC0415 - here, not in the sink's and the SDK client's processes
    costs = dict(otrace_query(db, "SELECT trace_id, cost_usd FROM llm_traces WHERE trace_id LIKE ?",
                              f"{prefix}-%"))
    spans = phoenix_spans(phoenix_db, prefix)
    fields: collections.Counter[str] = collections.Counter()
    examples: list[dict[str, Any]] = []
    matched = 0
    for event in sent:
        trace_id, span_id = otrace.otel_ids(event["trace_id"], {})
        diff = differences(event, costs.get(event["trace_id"]), spans.get(span_id.hex()), trace_id.hex())
        matched += not diff
        fields.update(diff)
        if diff and len(examples) < 5:
            examples.append({"trace_id": event["trace_id"], **{k: list(v) for k, v in diff.items()}})
    return {"calls": len(sent), "matched": matched, "mismatched": len(sent) - matched,
            "spans_in_phoenix": len(spans),
            "fields_differing": dict(fields), "examples": examples,
            "errors_sent": sum(e.get("status") == "error" for e in sent),
            "with_cache_tokens": sum("cache_read_tokens" in e or "cache_write_tokens" in e for e in sent)}


def probe(endpoint: str, signal: str) -> str:
    """What a receiver answers to an empty OTLP/HTTP protobuf export of `signal`."""
    request = urllib.request.Request(f"{endpoint}/v1/{signal}", data=b"", method="POST",
                                     headers={"Content-Type": "application/x-protobuf"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return f"{answer.status}"
    except urllib.error.HTTPError as refused:
        return f"{refused.code} {refused.read(200).decode('utf-8', 'replace').strip()}"


def push_state(port: int, db: Path) -> dict[str, Any]:
    """otrace's own account of its pushes: /health's push section and push_log by answer."""
    report = health(port)
    answers = otrace_query(db, "SELECT http_status, error, count(*), sum(events) FROM push_log "
                               "GROUP BY 1, 2 ORDER BY 1")
    return {"health": {k: report["push"].get(k) for k in ("signals", "breaker", "consecutive_failures",
                                                          "last_push_status", "last_error", "events_pushed",
                                                          "next_attempt_at", "breakers")},
            "unsynced_count": report["unsynced_count"],
            "push_log": [{"http_status": s, "error": e, "requests": n, "events": ev}
                         for s, e, n, ev in answers],
            "unsynced_by_table": {
                table: otrace_query(db, f"SELECT count(*) FROM {table} WHERE synced = 0")[0][0]
                for table in ("llm_traces", "error_events", "system_metrics")},
            "error_events": dict(otrace_query(db, "SELECT error_type || '/' || category, count(*) "
                                                  "FROM error_events GROUP BY 1"))}


def default_signals(work: Path, phoenix: Target, late_s: float) -> dict[str, Any]:
    """All signals (the default) to a traces-only backend: what becomes of traces once it refuses the
    others."""
    proc, port = start_otrace(work, {**PROOF_ENV, "TRACE_PUSH_ENDPOINT": phoenix.endpoint})
    db = work / "otrace.db"
    try:
        first = [call(i, "proof-a") for i in range(50)]
        post_all(port, "/v1/traces", first)
        post_all(port, "/v1/errors", [{"error_type": "llm_error", "message": "provider answered 529"}])
        wait_for(lambda: synced_of(db, "proof-a") == len(first), "the first calls synced")
        wait_for(lambda: health(port)["push"]["breakers"]["logs"]["state"] == "open",
                 "the logs breaker to open", 60)
        opened = push_state(port, db)
        retry_at = datetime.fromisoformat(opened["health"]["next_attempt_at"]).timestamp()
        opened["next_attempt_in_s"] = round(retry_at - time.time())
        late = [call(i, "proof-a") for i in range(len(first), 2 * len(first))]
        post_all(port, "/v1/traces", late)
        end = time.monotonic() + late_s
        while time.monotonic() < end and synced_of(db, "proof-a") < len(first) + len(late):
            time.sleep(0.25)
        reached = synced_of(db, "proof-a") - len(first)
        in_phoenix = ("SELECT count(*) FROM spans WHERE json_extract(attributes, '$.otrace.trace_id') "
                      "LIKE 'proof-a-%'")
        end = time.monotonic() + 30                      # Phoenix persists what it accepted a little later
        while time.monotonic() < end and phoenix_count(phoenix.extra["db"], in_phoenix) < 2 * len(first):
            time.sleep(0.25)
        return {"first_calls": len(first), "first_synced": len(first), "when_breaker_opened": opened,
                "late_calls": len(late), "late_wait_s": late_s, "late_synced": reached,
                "after": push_state(port, db),
                "in_phoenix": phoenix_count(phoenix.extra["db"], in_phoenix)}
    finally:
        stop(proc)


def traces_only(work: Path, phoenix: Target, n: int) -> dict[str, Any]:
    """TRACE_PUSH_SIGNALS=traces: every call posted, pushed, and compared in Phoenix."""
    proc, port = start_otrace(work, {**PROOF_ENV, "TRACE_PUSH_ENDPOINT": phoenix.endpoint,
                                     "TRACE_PUSH_SIGNALS": "traces"})
    db = work / "otrace.db"
    try:
        sent = [call(i, "proof-b") for i in range(n)]
        began = time.monotonic()
        post_all(port, "/v1/traces", sent, chunk=100)
        post_all(port, "/v1/errors", [{"error_type": "llm_error", "message": f"provider answered 529 ({i})"}
                                      for i in range(5)])
        wait_for(lambda: synced_of(db, "proof-b") == n, f"{n} calls synced")
        synced_s = time.monotonic() - began
        wait_for(lambda: phoenix_complete_of(phoenix, "proof-b") >= n, f"{n} complete LLM spans in Phoenix")
        in_phoenix_s = time.monotonic() - began
        samples = otrace_query(db, "SELECT count(*) FROM system_metrics")[0][0]
        state = push_state(port, db)
    finally:
        stop(proc)
    return {"synced_s": synced_s, "in_phoenix_s": in_phoenix_s, "host_samples_kept_local": samples,
            "state": state, **compare(db, phoenix.extra["db"], "proof-b", sent)}


def proof(work: Path, n: int, late_s: float) -> dict[str, Any]:
    (work / "phoenix").mkdir()
    phoenix = start_phoenix(work / "phoenix")
    phoenix.extra["db"] = work / "phoenix" / "phoenix.db"
    try:
        print(f"  Phoenix ready in {phoenix.ready_s:.1f} s", flush=True)
        answers = {signal: probe(phoenix.endpoint, signal) for signal in ("traces", "metrics", "logs")}
        (work / "a").mkdir()
        refused = default_signals(work / "a", phoenix, late_s)
        print(f"  default signals: {json.dumps(refused)}", flush=True)
        (work / "b").mkdir()
        checked = traces_only(work / "b", phoenix, n)
        print(f"  TRACE_PUSH_SIGNALS=traces: {json.dumps(checked)}", flush=True)
    finally:
        phoenix.stop()
    return {"phoenix_version": PHOENIX_VERSION, "phoenix_ready_s": phoenix.ready_s,
            "phoenix_answers_empty_export": answers, "default_signals": refused, "traces_only": checked}


# ----------------------------------------------------------------------- the sink (its own process)

class Tally:
    """What the sink has received since its last reset."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.spans = self.requests = self.bytes = self.first_spans = 0
        self.first_at = self.last_at = 0.0

    def add(self, spans: int, size: int, arrived: float) -> None:
        with self.lock:
            if not self.requests:
                self.first_at, self.first_spans = arrived, spans
            self.requests, self.spans, self.bytes = self.requests + 1, self.spans + spans, self.bytes + size
            self.last_at = time.monotonic()

    def report(self) -> dict[str, Any]:
        with self.lock:
            return {k: getattr(self, k) for k in ("spans", "requests", "bytes", "first_spans", "first_at",
                                                  "last_at")}


def serve_sink(port: int) -> None:
    """The bare OTLP/HTTP sink: decode, count, answer 200 with an empty Export*ServiceResponse."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: PLC0415
        ExportTraceServiceRequest,
    )
    tally = Tally()

    class Sink(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            arrived = time.monotonic()
            body = self.rfile.read(int(self.headers["Content-Length"]))
            as_json = self.headers.get("Content-Type", "").startswith("application/json")
            if self.path.endswith("/v1/traces"):
                if as_json:
                    spans = sum(len(scoped.get("spans", []))
                                for rs in json.loads(body).get("resourceSpans", [])
                                for scoped in rs.get("scopeSpans", []))
                else:
                    request = ExportTraceServiceRequest.FromString(body)
                    spans = sum(len(scoped.spans) for rs in request.resource_spans
                                for scoped in rs.scope_spans)
                tally.add(spans, len(body), arrived)
            answer = b"{}" if as_json else b""
            self.send_response(200)
            self.send_header("Content-Type", "application/json" if as_json else "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def do_GET(self) -> None:
            if self.path == "/reset":
                with tally.lock:
                    tally.reset()
            answer = json.dumps(tally.report()).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Sink)
    server.daemon_threads = True
    server.serve_forever()


def sink_report(port: int, reset: bool = False) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{'reset' if reset else 'count'}", timeout=30) as r:
        return json.load(r)


def rate(report: dict[str, Any]) -> float:
    """Spans after the first request over the time from its arrival to the last span's."""
    return (report["spans"] - report["first_spans"]) / max(report["last_at"] - report["first_at"], 1e-9)


# ------------------------------------------------------------------- the SDK client (its own process)

def sdk_attributes(event: dict[str, Any]) -> dict[str, Any]:
    """The attributes otrace gives the same call's span (OtlpFormat.span), as an instrumented client
    would set them."""
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": event["provider"],
             "gen_ai.request.model": event["model"], "gen_ai.response.model": event["model"],
             "gen_ai.conversation.id": event["session_id"],
             "gen_ai.usage.input_tokens": event["prompt_tokens"],
             "gen_ai.usage.output_tokens": event["completion_tokens"],
             "gen_ai.usage.total_tokens": event["prompt_tokens"] + event["completion_tokens"],
             "gen_ai.usage.cache_read.input_tokens": event.get("cache_read_tokens"),
             "gen_ai.usage.cache_creation.input_tokens": event.get("cache_write_tokens"),
             "gen_ai.usage.reasoning.output_tokens": event.get("reasoning_tokens"),
             "gen_ai.response.finish_reasons": event["finish_reason"].split(","),
             "gen_ai.input.messages": event["input_text"], "gen_ai.output.messages": event["output_text"],
             "gen_ai.usage.cost": 0.0001 * (event["prompt_tokens"] % 97), "otrace.cost_source": "computed",
             "error.type": event.get("error_type"), "otrace.trace_id": event["trace_id"],
             "otrace.source": "http"}
    return {key: value for key, value in attrs.items() if value is not None}


def sdk_send(protocol: str, n: int, endpoint: str) -> None:
    """Make n spans (kept in memory), print "ready", wait for a line, then hand them all to a
    BatchSpanProcessor with the OTLP/HTTP exporter and flush; print what it took as one JSON line."""
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: PLC0415
    from opentelemetry.trace import SpanKind, Status, StatusCode  # noqa: PLC0415
    if protocol == "http/json":
        from opentelemetry.exporter.otlp.json.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

    made = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "otrace-bench",
                                                        "host.name": os.uname().nodename}))
    provider.add_span_processor(SimpleSpanProcessor(made))
    tracer = provider.get_tracer("otrace.bench.otlp_push")
    for i in range(n):
        event = call(i, "throughput")
        start = event["created_at"] * 1_000_000
        span = tracer.start_span(f"chat {event['model']}", kind=SpanKind.CLIENT, start_time=start,
                                 attributes=sdk_attributes(event))
        if event.get("status") == "error":
            span.set_status(Status(StatusCode.ERROR, event["error_type"]))
        span.end(end_time=start + round(event["latency_ms"] * 1_000_000))
    spans = made.get_finished_spans()
    counts = {"ok": 0, "failed": 0}

    class Counting(SpanExporter):
        def __init__(self) -> None:
            self.inner = OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")

        def export(self, batch: Any) -> SpanExportResult:
            result = self.inner.export(batch)
            counts["ok" if result is SpanExportResult.SUCCESS else "failed"] += len(batch)
            return result

        def shutdown(self) -> None:
            self.inner.shutdown()

    processor = BatchSpanProcessor(Counting(), max_queue_size=n)       # the rest: the SDK's defaults
    print("ready", flush=True)
    sys.stdin.readline()
    before, began = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    for span in spans:
        processor.on_end(span)
    processor.force_flush(timeout_millis=600_000)
    after, took = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - began
    rss = Usage.of(os.getpid()).rss_bytes
    processor.shutdown()
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(json.dumps({**counts, "seconds": took, "rss_mib": rss / 2**20, "cpu_s": cpu}), flush=True)


def sdk_run(protocol: str, n: int, sink: int) -> dict[str, Any]:
    python = SDK_PYTHON if SDK_PYTHON.exists() else Path(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.Popen([str(python), __file__, "--sdk", protocol, "--spans", str(n), "--sink",
                             str(sink)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the SDK client did not start (is opentelemetry-sdk in {python}?)")
        sink_report(sink, reset=True)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    sent, got = json.loads(out), sink_report(sink)
    return {**sent, "received": got["spans"], "requests": got["requests"], "spans_per_s": rate(got),
            "bytes_per_span": got["bytes"] / max(got["spans"], 1)}


# -------------------------------------------------------------------------------- otrace's push

def seed(work: Path, n: int) -> Path:
    """A database holding n unpushed calls, loaded through /v1/traces with push off."""
    proc, port = start_otrace(work, QUIET_ENV)
    try:
        post_all(port, "/v1/traces", [call(i, "throughput") for i in range(n)])
        wait_for(lambda: health(port)["events_persisted"] >= n, f"{n} calls persisted")
    finally:
        stop(proc)
    return work / "otrace.db"


def otrace_run(protocol: str, seeded: Path, n: int, sink: int, work: Path) -> dict[str, Any]:
    """otrace started on a copy of the seeded database with push on: from its first push request to
    every row synced."""
    work.mkdir()
    shutil.copy(seeded, work / "otrace.db")
    sink_report(sink, reset=True)
    proc, port = start_otrace(work, {**QUIET_ENV, "TRACE_PUSH_FORMAT": "otlp",
                                     "TRACE_PUSH_OTLP_PROTOCOL": protocol, "TRACE_PUSH_INTERVAL": "1h",
                                     "TRACE_PUSH_ENDPOINT": f"http://127.0.0.1:{sink}"})
    try:
        time.sleep(1.0)                                  # settled; the first cycle begins 5 s after start
        idle = Usage.of(proc.pid)
        peak, early = idle.rss_bytes, bool(sink_report(sink)["requests"])
        end = time.monotonic() + WAIT_S
        while (pushed := health(port)["push"]["events_pushed"]) < n:
            if time.monotonic() > end:
                raise RuntimeError(f"otrace pushed {pushed} of {n} in {WAIT_S:g} s")
            peak = max(peak, Usage.of(proc.pid).rss_bytes)
            time.sleep(0.1)
        done, busy = time.monotonic(), Usage.of(proc.pid)
        failed = otrace_query(work / "otrace.db",
                              "SELECT count(*) FROM push_log WHERE http_status <> 200")[0][0]
    finally:
        stop(proc)
    got = sink_report(sink)
    return {"received": got["spans"], "requests": got["requests"], "spans_per_s": rate(got),
            "bytes_per_span": got["bytes"] / max(got["spans"], 1), "all_synced_s": done - got["first_at"],
            "rss_idle_mib": idle.rss_bytes / 2**20, "rss_peak_mib": peak / 2**20,
            "cpu_s": busy.cpu_s - idle.cpu_s, "failed_requests": failed, "idle_read_after_first_push": early}


def throughput(work: Path, n: int) -> dict[str, Any]:
    sink = free_port()
    proc = subprocess.Popen([str(SDK_PYTHON if SDK_PYTHON.exists() else sys.executable), __file__, "--sink",
                             str(sink)])
    try:
        wait_listening(sink)
        seed_dir = work / "seed"
        seed_dir.mkdir()
        seeded = seed(seed_dir, n)
        results: dict[str, Any] = {}
        for protocol in PROTOCOLS:
            results[f"sdk {protocol}"] = sdk_run(protocol, n, sink)
            print(f"  SDK {protocol}: {json.dumps(results[f'sdk {protocol}'])}", flush=True)
            results[f"otrace {protocol}"] = otrace_run(protocol, seeded, n, sink,
                                                       work / protocol.replace("/", "-"))
            print(f"  otrace {protocol}: {json.dumps(results[f'otrace {protocol}'])}", flush=True)
    finally:
        proc.terminate()
        proc.wait(15)
    return results


# ------------------------------------------------------------------------------------ the report

def proof_markdown(p: dict[str, Any]) -> str:
    a, b = p["default_signals"], p["traces_only"]
    differing = ", ".join(f"{k} ({v})" for k, v in b["fields_differing"].items()) or "none"
    answers = ", ".join(f"/v1/{s} → {a_}" for s, a_ in p["phoenix_answers_empty_export"].items())
    opened = a["when_breaker_opened"]
    breakers = "; ".join(f"{signal} {b['state']} after {b['consecutive_failures']} failed cycles"
                         + (f" ({b['last_error']!r})" if b["last_error"] else "")
                         for signal, b in opened["health"]["breakers"].items())
    refusals = "; ".join(f"{r['http_status']}{' ' + r['error'] if r['error'] else ''} ×{r['requests']}"
                         for r in opened["push_log"])
    lines = [
        f"Arize Phoenix {p['phoenix_version']} (SQLite) as otrace's OTLP push endpoint (http/protobuf). "
        f"Phoenix answers an empty export: {answers}.",
        "",
        table(["TRACE_PUSH_SIGNALS", "LLM calls", "in Phoenix", "field by field", "push_log", "breaker"], [
            ["traces,metrics,logs (default)",
             f"{a['first_calls']} + {a['late_calls']} after the logs breaker opened",
             f"{a['in_phoenix']} ({a['late_synced']} of the later {a['late_calls']} within "
             f"{a['late_wait_s']:g} s)",
             "", refusals, f"{breakers}; next try in {opened['next_attempt_in_s']} s"],
            ["traces",
             f"{b['calls']} ({b['errors_sent']} failed, {b['with_cache_tokens']} with cache tokens)",
             f"{b['spans_in_phoenix']}", f"**{b['matched']} match, {b['mismatched']} differ**",
             "; ".join(f"{r['http_status']} ×{r['requests']}" for r in b["state"]["push_log"]),
             f"{b['state']['health']['breaker']}, {b['state']['health']['consecutive_failures']} "
             "failed cycles"]]),
        "",
        f"Compared for every call: span name, llm.model_name, gen_ai.provider.name, prompt and completion "
        f"tokens (Phoenix's columns), cache read / write tokens (llm.token_count.prompt_details), "
        f"reasoning tokens, session.id, status (ERROR with the error type for failures, UNSET otherwise), "
        f"start time and latency (to 2 µs), gen_ai.usage.cost against otrace's computed cost, and the "
        f"prompt and response text (llm.input_messages, llm.output_messages: Phoenix's reading of "
        f"gen_ai.input.messages and gen_ai.output.messages). Fields that differed: {differing}. All synced "
        f"{b['synced_s']:.1f} s after the first POST; complete in Phoenix after {b['in_phoenix_s']:.1f} s. "
        f"Host samples kept local (not pushed): {b['host_samples_kept_local']}; unsynced_count "
        f"{b['state']['unsynced_count']}."]
    return "\n".join(lines)


def throughput_markdown(t: dict[str, Any], n: int) -> str:
    rows = []
    for protocol in PROTOCOLS:
        sdk, ours = t[f"sdk {protocol}"], t[f"otrace {protocol}"]
        rows.append([f"OpenTelemetry SDK exporter, BatchSpanProcessor ({protocol}; baseline)",
                     f"{sdk['spans_per_s']:,.0f}", "1.00", f"{sdk['bytes_per_span']:.0f}",
                     f"{sdk['requests']}", "", "", f"{sdk['cpu_s']:.1f} ({1e6 * sdk['cpu_s'] / n:.0f})"])
        rows.append([f"otrace push from its database ({protocol})", f"{ours['spans_per_s']:,.0f}",
                     f"**{ours['spans_per_s'] / sdk['spans_per_s']:.2f}**", f"{ours['bytes_per_span']:.0f}",
                     f"{ours['requests']}", f"{ours['all_synced_s']:.1f}",
                     f"{ours['rss_idle_mib']:.1f} → {ours['rss_peak_mib']:.1f}",
                     f"{ours['cpu_s']:.1f} ({1e6 * ours['cpu_s'] / n:.0f})"])
    return (table([f"{n:,} GenAI spans to a bare OTLP sink", "spans/s", "ratio", "bytes/span", "requests",
                   "s to all synced", "RSS MiB", "CPU s (µs a span)"], rows)
            + "\n\nspans/s: spans after the first request over the time from its arrival to the last "
            "span's. otrace sends batches of up to TRACE_PUSH_MAX_BYTES (5 MiB); the SDK 512 spans an "
            "export. CPU s: the sender's, while sending (otrace: from before its first cycle to every row "
            "synced; the SDK: from its first span handed to the processor to the flush). The SDK's JSON "
            "exporter is opentelemetry-exporter-otlp-json-http, a beta.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=int, default=500, help="LLM calls compared in Phoenix")
    parser.add_argument("--spans", type=int, default=40_000, help="spans each sender pushes to the sink")
    parser.add_argument("--late", type=float, default=15,
                        help="seconds to wait for calls posted after the breaker opened")
    parser.add_argument("--only", choices=["proof", "throughput"])
    parser.add_argument("--sdk", help=argparse.SUPPRESS)                      # the SDK client process
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)           # the sink's port
    args = parser.parse_args()
    if args.sdk:
        sdk_send(args.sdk, args.spans, f"http://127.0.0.1:{args.sink}")
        return
    if args.sink:
        serve_sink(args.sink)
        return
    data: dict[str, Any] = {"traces": args.traces, "spans": args.spans}
    parts = []
    with tempfile.TemporaryDirectory(prefix="otrace-otlp-push-") as tmp:
        if args.only in (None, "proof"):
            (Path(tmp) / "proof").mkdir()
            data["proof"] = proof(Path(tmp) / "proof", args.traces, args.late)
            parts.append(proof_markdown(data["proof"]))
        if args.only in (None, "throughput"):
            (Path(tmp) / "throughput").mkdir()
            data["throughput"] = throughput(Path(tmp) / "throughput", args.spans)
            parts.append(throughput_markdown(data["throughput"], args.spans))
    save("otlp_push", "\n\n".join(parts), data)
    if "proof" in data and data["proof"]["traces_only"]["mismatched"]:
        sys.exit(f"otlp_push: {data['proof']['traces_only']['mismatched']} calls differ in Phoenix")


if __name__ == "__main__":
    main()
