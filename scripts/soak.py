"""Fault soak: otrace must lose nothing it answered 202 to, with every fault happening at once.

    python scripts/soak.py [--minutes 3] [--clients 4] [--seed N] [--format otrace|otlp] [--out FILE]
                           [--log FILE]

(or: make soak). Needs root, for a tmpfs; all traffic stays on 127.0.0.1. For --minutes, together:

- client threads POST traces and errors flat out, each event with a trace_id of their own, and note
  every answer by id. 503, a refused connection and a lost answer mean "not accepted": the same ids
  are sent again (otrace keeps one row per trace_id), at most five times;
- otrace's database lives on a 512 MiB tmpfs (TRACE_DB_MAX_BYTES below it, so otrace's own rows never
  fill it) that a filler file fills to ENOSPC every 8-20 s, keeps full for 5-10 s (taking back
  whatever otrace frees) and then frees;
- the push receiver, a stdlib ThreadingHTTPServer, goes round healthy, dead (port closed), healthy,
  slow (answers after 1.5-5 s; TRACE_PUSH_TIMEOUT is 3 s), healthy, dead (connections reset), and
  records the id of every event it is sent. With --format otlp otrace pushes OTLP (http/protobuf: the
  LLM calls as spans, their OTel ids checked, errors as log records), and the round has three more
  phases where one signal's endpoint faults while the others answer 200: /v1/logs answers 503, then
  /v1/traces 503 with Retry-After: 1 (the signal waits, the others go on), then /v1/traces 429 with
  Retry-After: 1 (a quota of that signal's: it waits, the others go on); the events of a request answered so
  are not counted as received;
- every 20-40 s otrace is restarted on the same database, alternately after SIGTERM (it must exit 0
  within TRACE_SHUTDOWN_TIMEOUT) and after SIGKILL.

Then the load stops, the disk is freed, the receiver stays healthy, otrace pushes everything and is
stopped, and the tally is printed. Lost: answered 202, yet neither in the database nor seen by the
receiver. The one loss allowed is the documented one:
events answered 202 within TRACE_BATCH_WINDOW before a SIGKILL ("accepted but not yet committed").
Counted apart, as the docs describe them: unpushed traces and errors retention deleted under
pressure (the full disk, when otrace's rows are what puts it over its mark), which otrace reports
with the received_at range of each deletion (in its ledger, and once reported and pruned from it,
in the loss reports pushed: the union is the whole truth), so an id answered within one, up to the
rows it reported, is that deletion's (a bound, not an identity: rows of the deletion that are not
lost ids, such as ones the receiver took after otrace gave up waiting, leave room for a loss of
another cause in the same seconds); events accepted just before a write outage that a
SIGTERM during it could not write, which otrace reports itself (exit 1, events_lost: at least as many),
and those a SIGKILL during a write outage takes from the queue (otrace answers 503 once writes fail, so
they were accepted before it began). The outage is the disk's being full at the signal, or otrace's
own log saying its writes fail and not yet that they recovered (a disk freed a moment before the
signal is not written to before the writer's next try, up to 5 s later).
Exit code 0 when nothing else was lost and every row was pushed once the faults ended, 1 otherwise;
the other checks (SIGTERM exits 0 in time, ...) are printed. --log keeps otrace's log lines, the
receiver's pushes and the faults, in time order.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import http.client
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from receiver import Answer, Receiver

from otrace import TABLES as OTRACE_TABLES
from otrace import otel_attributes, otel_ids

ROOT = Path(__file__).resolve().parent.parent
OTRACE = ROOT / "otrace.py"
HOST = "127.0.0.1"

BATCH_WINDOW = 0.1               # seconds; TRACE_BATCH_WINDOW, the SIGKILL window
WINDOW_SLACK = 0.05              # a 202 is read after otrace accepted it; a full batch still commits
SHUTDOWN_TIMEOUT = 4.0           # TRACE_SHUTDOWN_TIMEOUT
EXIT_SLACK = 0.5                 # interpreter teardown after otrace's own deadline
READ_LATE = 0.2                  # a 202 read this long after its process exited is still its (no
                                 # new otrace listens that soon)
PUSH_TIMEOUT = 3.0
SETTINGS = {
    "TRACE_HOST": HOST, "TRACE_LOG_LEVEL": "info", "TRACE_AGENT_ID": "soak",
    "TRACE_BATCH_WINDOW": f"{BATCH_WINDOW * 1000:.0f}ms", "TRACE_SHUTDOWN_TIMEOUT": f"{SHUTDOWN_TIMEOUT:g}s",
    "TRACE_PUSH_INTERVAL": "1s", "TRACE_PUSH_TIMEOUT": f"{PUSH_TIMEOUT:g}s", "TRACE_PUSH_MAX_BYTES": "1MiB",
    "TRACE_PUSH_RETRIES": "3", "TRACE_PUSH_BACKOFF_BASE": "200ms", "TRACE_PUSH_BACKOFF_CAP": "2s",
    "TRACE_PUSH_BREAKER_THRESHOLD": "3", "TRACE_PUSH_BREAKER_COOLDOWN": "1s",
    "TRACE_RETENTION": "20s", "TRACE_CLEANUP_INTERVAL": "5s", "TRACE_CHECKPOINT_INTERVAL": "10s",
    "TRACE_METRICS_INTERVAL": "5s",
    "TRACE_DB_MAX_BYTES": "320MiB",    # under the volume: otrace's own rows alone never fill it
}
TMPFS_SIZE = "512m"
RESTART_EVERY = (20.0, 40.0)
DISK_GAP, DISK_HOLD = (8.0, 20.0), (5.0, 10.0)
PHASES = ("healthy", "dead: port closed", "healthy", "slow", "healthy", "dead: reset")
SIGNAL_FAULTS = {"logs: 503": ("/v1/logs", (503, {}, "")),            # OTLP: one signal's endpoint
                 "traces: 503, Retry-After": ("/v1/traces", (503, {"Retry-After": "1"}, "")),
                 "traces: 429": ("/v1/traces", (429, {"Retry-After": "1"}, ""))}   # a quota of the signal's
PHASE_SECONDS = {"healthy": (6.0, 12.0), "slow": (6.0, 12.0), "dead: port closed": (5.0, 10.0),
                 "dead: reset": (5.0, 10.0), **dict.fromkeys(SIGNAL_FAULTS, (5.0, 10.0))}
TABLES = {"t": "llm_traces", "e": "error_events"}       # our id prefix -> its table
PUSH_TYPES = {prefix: OTRACE_TABLES[table].push_type for prefix, table in TABLES.items()}   # ... its event
ANSWER_LAG = 2.0                 # seconds from otrace's received_at to the client's reading the 202, at most
LOG_NOTES = ("database write failing", "database write recovered", "push cycle failed", "final push",
             "shutdown deadline passed with accepted events not written", "stopped", "cannot start",
             "retention deleted rows that were never pushed", "over budget: deleting oldest rows")


def ours(trace_id: str) -> bool:
    """True for an id the clients made (t-... or e-...), not one otrace made for its own events."""
    return trace_id[:2] in ("t-", "e-")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Journal:
    """The --log file, if any: otrace's log lines and the runner's own notes, one JSON object a line,
    each after [its source]."""

    def __init__(self, path: Path | None) -> None:
        self.file = path.open("a") if path else None
        self.lock = threading.Lock()

    def write(self, source: str, line: str) -> None:
        with self.lock:
            if self.file:
                self.file.write(f"[{source}] {line.rstrip()}\n")

    def note(self, source: str, message: str, **fields: Any) -> None:
        if self.file:
            now = datetime.now().astimezone().isoformat(timespec="milliseconds")
            self.write(source, json.dumps({"message": message, **fields, "time": now}))

    def close(self) -> None:
        with self.lock:
            if self.file:
                self.file.close()
            self.file = None


# ============================================================================================ clients


class Ledger:
    """What the clients sent and how otrace answered, by event id. Times are time.monotonic()."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wall = time.time() - time.monotonic()       # add to a time here for the wall clock's
        self.sent = 0
        self.accepted: dict[str, float] = {}      # id -> when its 202 was read
        self.answers: collections.Counter[str] = collections.Counter()      # per request
        self.answers_full: collections.Counter[str] = collections.Counter()  # ... while the disk was full
        self.never: collections.Counter[str] = collections.Counter()   # ids given up, by last answer
        self.mismatches = 0          # a 202 whose trace_ids are not the ones sent

    def answer(self, outcome: str, disk_full: bool) -> None:
        with self.lock:
            self.answers[outcome] += 1
            if disk_full:
                self.answers_full[outcome] += 1

    def accept(self, ids: list[str], answer: dict[str, Any]) -> None:
        now = time.monotonic()
        with self.lock:
            if answer.get("trace_ids") != ids or answer.get("accepted") != len(ids):
                self.mismatches += 1
            for trace_id in ids:
                self.accepted.setdefault(trace_id, now)


def trace_event(trace_id: str, rng: random.Random) -> dict[str, Any]:
    return {"trace_id": trace_id, "provider": "soak", "model": "soak-1", "session_id": trace_id[:5],
            "input_text": "q" * rng.randint(10, 200), "output_text": "a" * rng.randint(10, 200),
            "prompt_tokens": rng.randint(1, 5000), "completion_tokens": rng.randint(1, 2000),
            "latency_ms": rng.randint(50, 9000)}


def error_event(trace_id: str, rng: random.Random) -> dict[str, Any]:
    return {"trace_id": trace_id, "error_type": "llm_error",
            "category": rng.choice(("timeout", "rate_limit")),
            "severity": "warning", "message": "soak " * rng.randint(1, 40), "provider": "soak"}


class Clients:
    """Threads that POST batches of 1 to 8 events as fast as otrace answers."""

    ATTEMPTS = 5

    def __init__(self, count: int, port: int, ledger: Ledger, disk_full: Callable[[], bool],
                 seed: int) -> None:
        self.port, self.ledger, self.disk_full, self.seed = port, ledger, disk_full, seed
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(n,), name=f"client-{n}", daemon=True)
                        for n in range(count)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(15)

    def run(self, number: int) -> None:
        rng = random.Random(self.seed * 1000 + number)
        conn: http.client.HTTPConnection | None = None
        seq = 0
        while not self.stopping.is_set():
            path, prefix, make = (("/v1/traces", "t", trace_event) if rng.random() < 0.8 else
                                  ("/v1/errors", "e", error_event))
            ids = [f"{prefix}-{number}-{seq + i}" for i in range(rng.randint(1, 8))]
            seq += len(ids)
            body = json.dumps([make(trace_id, rng) for trace_id in ids]).encode()
            with self.ledger.lock:
                self.ledger.sent += len(ids)
            outcome = "not sent"
            for attempt in range(self.ATTEMPTS):
                if attempt and self.stopping.wait(0.05 * 2**attempt):
                    break
                conn, outcome = self.post(conn, path, body, ids)
                if outcome == "202":
                    break
            if outcome != "202":
                with self.ledger.lock:
                    self.ledger.never[outcome] += len(ids)
        if conn:
            conn.close()

    def post(self, conn: http.client.HTTPConnection | None, path: str, body: bytes,
             ids: list[str]) -> tuple[http.client.HTTPConnection | None, str]:
        """One request on a kept-alive connection: (the connection to use next, the outcome)."""
        conn = conn or http.client.HTTPConnection(HOST, self.port, timeout=10)
        full = self.disk_full()
        try:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except ConnectionRefusedError:
            conn.close()
            self.ledger.answer("refused", full)
            return None, "refused"
        except (OSError, http.client.HTTPException):
            conn.close()                 # reset, or closed before the answer: unknown, sent again
            self.ledger.answer("no answer", full)
            return None, "no answer"
        outcome = str(resp.status)
        if resp.status == 202:
            self.ledger.accept(ids, json.loads(data))
        self.ledger.answer(outcome, full)
        return conn, outcome


# =========================================================================================== the disk


class Disk:
    """otrace's volume: a small tmpfs, and a filler file that fills it to ENOSPC now and then."""

    def __init__(self, path: Path, size: str, rng: random.Random, journal: Journal) -> None:
        self.path, self.size, self.rng, self.journal = path, size, rng, journal
        self.filler = path / "filler"
        self.full = threading.Event()
        self.stopping = threading.Event()
        self.episodes: list[tuple[float, float]] = []
        self.mounted = False
        self.thread = threading.Thread(target=self.run, name="disk", daemon=True)

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)],
                       check=True)
        self.mounted = True

    def unmount(self) -> None:
        if self.mounted and subprocess.run(["umount", str(self.path)], check=False).returncode:
            subprocess.run(["umount", "-l", str(self.path)], check=False)   # still busy: detach it
        self.mounted = False

    def fill_up(self) -> None:
        """Write to the filler until the filesystem says ENOSPC."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 4096):
                with contextlib.suppress(OSError):
                    chunk = b"\0" * size
                    while True:
                        os.write(fd, chunk)
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
        self.full.clear()

    def is_full(self) -> bool:
        """The filler holds it full, or less than 1 MiB is left anyway."""
        if self.full.is_set():
            return True
        try:
            st = os.statvfs(self.path)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < 1 << 20

    def run(self) -> None:
        while not self.stopping.wait(self.rng.uniform(*DISK_GAP)):
            started = time.monotonic()
            until = started + self.rng.uniform(*DISK_HOLD)
            self.fill_up()
            self.full.set()
            self.journal.note("disk", "full", hold_s=round(until - started, 1))
            while time.monotonic() < until and not self.stopping.wait(0.2):
                self.fill_up()           # take back what otrace's retention frees
            self.free()
            self.journal.note("disk", "freed")
            self.episodes.append((started, time.monotonic()))

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)
        self.free()


# ======================================================================================= the receiver


class PushReceiver:
    """The push endpoint: the tests' Receiver (a real ThreadingHTTPServer on loopback), going through
    phases, recording every event id it is sent (on arrival: a slow answer may never reach otrace, a
    duplicate follows)."""

    def __init__(self, rng: random.Random, journal: Journal, otlp: bool) -> None:
        self.rng, self.journal, self.otlp = rng, journal, otlp
        self.round = PHASES + (("healthy", *SIGNAL_FAULTS, "healthy") if otlp else ())
        self.lock = threading.Lock()
        self.phase = "healthy"
        self.phases: collections.Counter[str] = collections.Counter()
        self.seen: collections.Counter[str] = collections.Counter()       # our ids
        self.others: collections.Counter[str] = collections.Counter()     # otrace's own events, by kind
        self.requests: collections.Counter[str] = collections.Counter()
        self.batch_ids: set[str] = set()
        self.losses: list[dict[str, Any]] = []
        self.malformed = 0
        self.server = Receiver(HOST, free_port())
        self.server.default = self.answer
        self.server.on_request = self.arrived
        self.url, self.port = self.server.url, self.server.port
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="receiver-phases", daemon=True)

    def enter(self, phase: str) -> None:
        """Switch phase: "dead: port closed" stops listening; every dead phase resets connections."""
        self.phase = phase
        self.phases[phase] += 1
        self.journal.note("receiver", "phase", phase=phase)
        self.server.reset_unread = phase.startswith("dead")
        if phase == "dead: port closed":
            self.server.unlisten()
        elif self.server.server is None:
            self.server.listen()

    def run(self) -> None:
        index = 0
        self.phases[self.phase] += 1
        while not self.stopping.wait(self.rng.uniform(*PHASE_SECONDS[self.round[index]])):
            index = (index + 1) % len(self.round)
            self.enter(self.round[index])

    def settle(self) -> None:
        """Stop cycling and stay healthy."""
        self.stopping.set()
        self.thread.join(10)
        if self.phase != "healthy":
            self.enter("healthy")
        self.requests["reset"] = self.server.resets

    def arrived(self, request: dict[str, Any]) -> None:
        """Record a request's events, unless its answer is to be a fault (decided here, once)."""
        batch_id = request["headers"].get("Idempotency-Key", "")
        body = request.pop("body")               # not kept: the receiver keeps every request
        request["phase"] = phase = self.phase
        path, fault = SIGNAL_FAULTS.get(phase, ("", None))
        request["fault"] = fault if path and request["path"].split("?", 1)[0].endswith(path) else None
        events = 0 if request["fault"] else self.record(request["path"], request["json"], body, batch_id)
        self.journal.note("receiver", "push", phase=phase, path=request["path"], batch_id=batch_id,
                          events=events, bytes=request["bytes"], fault=bool(request["fault"]))

    def answer(self, _: Receiver, request: dict[str, Any]) -> Answer:
        phase = request["phase"]
        if phase == "slow":
            time.sleep(self.rng.uniform(PUSH_TIMEOUT / 2, PUSH_TIMEOUT * 5 / 3))
        with self.lock:
            self.requests[phase] += 1
        return request["fault"] or 200

    def record(self, path: str, doc: Any, body: bytes, batch_id: str) -> int:
        """Note the events of one push; how many it held."""
        try:
            events, losses = otlp_events(path, body) if self.otlp else otrace_events(doc)
        except (ValueError, KeyError, TypeError):
            with self.lock:
                self.malformed += 1
            return 0
        with self.lock:
            self.batch_ids.add(batch_id)
            self.losses += losses
            for kind, trace_id, named, what in events:
                if ours(trace_id) and PUSH_TYPES[trace_id[0]] == kind and named == trace_id:
                    self.seen[trace_id] += 1
                elif ours(trace_id):
                    self.malformed += 1
                else:
                    self.others[f"{kind} ({what})"] += 1
        return len(events)

    def close(self) -> None:
        self.stopping.set()
        self.server.close()


Event = tuple[str, str, str, str]      # push type, trace_id, the trace_id its data names, what it is


def otrace_events(doc: Any) -> tuple[list[Event], list[dict[str, Any]]]:
    """The events and loss reports of one push in otrace's format; ValueError if it is not soak's."""
    if doc["schema"] != "otrace.push.v1" or doc["agent_id"] != "soak":
        raise ValueError("not otrace.push.v1 from soak")
    events = [(e["type"], e["trace_id"], e["data"]["trace_id"],
               f"{e['data'].get('source')}, {e['data'].get('category', '-')}") for e in doc["events"]]
    return events, doc.get("losses") or []


def otlp_events(path: str, body: bytes) -> tuple[list[Event], list[dict[str, Any]]]:
    """The events and loss reports of one OTLP/protobuf push (spans, log records, metrics; a record
    named otrace.loss is a loss report); ValueError if it does not decode or is not from soak."""
    signal = path.split("?", 1)[0].rsplit("/", 1)[-1]
    kinds = {"traces": (trace_service_pb2.ExportTraceServiceRequest, "resource_spans", "scope_spans",
                        "spans"),
             "logs": (logs_service_pb2.ExportLogsServiceRequest, "resource_logs", "scope_logs",
                      "log_records"),
             "metrics": (metrics_service_pb2.ExportMetricsServiceRequest, "resource_metrics",
                         "scope_metrics", "metrics")}
    try:
        kind, resources, scopes, items = kinds[signal]
        request = kind.FromString(body)
    except (KeyError, DecodeError) as exc:
        raise ValueError(f"not OTLP {signal}") from exc
    events: list[Event] = []
    losses: list[dict[str, Any]] = []
    for resource in getattr(request, resources):
        if otel_attributes(resource.resource.attributes).get("service.name") != "soak":
            raise ValueError("not from soak")
        for item in (i for scope in getattr(resource, scopes) for i in getattr(scope, items)):
            attrs = otel_attributes(getattr(item, "attributes", ()))
            if signal == "metrics":
                events.append(("metric", "", "", item.name.split(".", 1)[0]))
            elif signal == "traces":          # its ids derived from its trace_id, as otrace derives them
                named = attrs["otrace.trace_id"] if otel_ids(attrs["otrace.trace_id"], {}) == (
                    item.trace_id, item.span_id) else "(other OTel ids)"
                events.append(("llm_trace", attrs["otrace.trace_id"], named,
                               f"{attrs.get('otrace.source')}, -"))
            elif item.event_name == "otrace.loss":
                losses.append({key.removeprefix("otrace.loss."): value for key, value in attrs.items()})
            else:
                events.append((item.event_name.removeprefix("otrace."), attrs["otrace.trace_id"],
                               attrs["otrace.trace_id"],
                               f"{attrs.get('otrace.source')}, {attrs.get('otrace.category', '-')}"))
    return events, losses



# ========================================================================================= the node


@dataclasses.dataclass
class Stop:
    """One end of an otrace process."""

    kind: str                    # SIGTERM, SIGKILL, crash, final SIGTERM
    at: float                    # time.monotonic() of the signal (or of noticing the crash)
    seconds: float               # from the signal to the exit
    code: int | None             # None: it had to be killed after all
    disk_full: bool
    phase: str
    writes_failing: bool = False  # otrace's writer in an outage at the signal (by its own log)

    @property
    def exited(self) -> float:
        return self.at + self.seconds


class Node:
    """The otrace process under test, restarted again and again on the same database."""

    def __init__(self, env: dict[str, str], journal: Journal) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")} | env
        self.journal = journal
        self.proc: subprocess.Popen | None = None
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.life = 0
        self.warnings: collections.Counter[str] = collections.Counter()   # "LEVEL message"
        self.notes: list[tuple[int, dict[str, Any]]] = []                 # (life, log line)
        self.stderr: list[str] = []
        self.failed_starts = 0
        self.stops: list[Stop] = []

    def start(self, timeout: float = 120.0) -> None:
        """Start otrace and wait until it listens; a start that fails (a full disk) is tried again."""
        end = time.monotonic() + timeout
        while True:
            self.life += 1
            self.ready.clear()
            self.proc = subprocess.Popen([sys.executable, str(OTRACE)], env=self.env, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         start_new_session=True)     # Ctrl-C is ours to pass on
            for stream, read in ((self.proc.stdout, self.read_log), (self.proc.stderr, self.read_stderr)):
                threading.Thread(target=read, args=(stream, self.life), daemon=True).start()
            while not self.ready.wait(0.05) and self.proc.poll() is None:
                pass
            if self.ready.is_set():
                return
            self.failed_starts += 1
            if time.monotonic() > end:
                raise RuntimeError(f"otrace did not start in {timeout:.0f} s; stderr: {self.stderr[-5:]}")
            time.sleep(0.5)

    def read_log(self, stream: Any, life: int) -> None:
        for raw in stream:
            self.journal.write(f"otrace {life}", raw)
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"level": "ERROR", "message": "<not JSON>", "raw": raw.rstrip()}
            message = line.get("message", "")
            if message == "listening" and life == self.life:
                self.ready.set()
            with self.lock:
                if line.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                    self.warnings[f"{line['level']} {message}"] += 1
                if message in LOG_NOTES:
                    self.notes.append((life, line))

    def read_stderr(self, stream: Any, life: int) -> None:
        for raw in stream:
            self.journal.write(f"otrace {life} stderr", json.dumps({"stderr": raw.rstrip()}))
            with self.lock:
                self.stderr.append(f"[{life}] {raw.rstrip()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: signal.Signals, kind: str, disk_full: bool, phase: str) -> Stop:
        """Signal otrace and wait for it to exit (killing it if it overstays by 10 s)."""
        assert self.proc
        self.journal.note("runner", f"sending {sig.name}", life=self.life)
        failing = self.writes_failing()
        at = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code: int | None = self.proc.wait(SHUTDOWN_TIMEOUT + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        stop = Stop(kind, at, time.monotonic() - at, code, disk_full, phase, failing)
        self.stops.append(stop)
        self.journal.note("runner", kind, exit_code=code, seconds=round(stop.seconds, 3), disk_full=disk_full,
                          receiver=phase)
        return stop

    def writes_failing(self) -> bool:
        """Whether this otrace's last word on its writes was that they fail: a disk freed a moment
        ago is not written to before the writer's next try."""
        with self.lock:
            said = [line["message"] for life, line in self.notes if life == self.life and line.get("message")
                    in ("database write failing", "database write recovered")]
        return bool(said) and said[-1] == "database write failing"

    def crashed(self, disk_full: bool, phase: str) -> None:
        assert self.proc
        self.stops.append(Stop("crash", time.monotonic(), 0.0, self.proc.returncode, disk_full, phase))

    def close(self) -> None:
        """Make sure no otrace is left running."""
        if self.alive():
            assert self.proc
            self.proc.terminate()
            try:
                self.proc.wait(SHUTDOWN_TIMEOUT + 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def health(self, port: int) -> tuple[int, dict[str, Any]] | None:
        """/health's status and report, or None when nothing answers."""
        conn = http.client.HTTPConnection(HOST, port, timeout=3)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            conn.close()


class Monitor:
    """Polls /health twice a second: how often it said ok or degraded, with the disk full or not."""

    def __init__(self, node: Node, port: int, disk_full: Callable[[], bool]) -> None:
        self.node, self.port, self.disk_full = node, port, disk_full
        self.samples: collections.Counter[tuple[bool, str]] = collections.Counter()
        self.breaker: collections.Counter[str] = collections.Counter()
        self.max_queue = self.max_unsynced = self.max_db = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="monitor", daemon=True)

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            full = self.disk_full()
            answer = self.node.health(self.port)
            if answer is None:
                self.samples[(full, "down")] += 1
                continue
            status, report = answer
            self.samples[(full, f"{report['status']} ({status})")] += 1
            self.breaker[(report.get("push") or {}).get("breaker", "-")] += 1
            self.max_queue = max(self.max_queue, report["queue_depth"])
            self.max_unsynced = max(self.max_unsynced, report["unsynced_count"] or 0)
            self.max_db = max(self.max_db, report["db_size_bytes"] + report["wal_size_bytes"])


# ============================================================================================ the run


def drain(node: Node, port: int, timeout: float) -> bool:
    """Wait until otrace has written its queue and pushed every row."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        answer = node.health(port)
        if answer and answer[0] == 200 and answer[1]["queue_depth"] == 0 and answer[1]["unsynced_count"] == 0:
            return True
        time.sleep(0.2)
    return False


def stored_ids(db: Path) -> tuple[set[str], int, list[dict[str, Any]]]:
    """Our ids in the database, how many of them were never pushed, and the ledger's rows of
    retention's unpushed deletions, in the shape of a loss report."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT trace_id, synced FROM llm_traces UNION ALL "
                            "SELECT trace_id, synced FROM error_events").fetchall()
        ledger = conn.execute("SELECT id, at, table_name, reason, unsynced_deleted, oldest_received_at, "
                              "newest_received_at FROM retention_ledger WHERE unsynced_deleted > 0"
                              ).fetchall()
    mine = [(trace_id, synced) for trace_id, synced in rows if ours(trace_id)]
    deleted = [{"kind": "retention", "ledger_id": i, "at": at, "table": t, "reason": r, "rows": n,
                "oldest_received_at": old, "newest_received_at": new} for i, at, t, r, n, old, new in ledger]
    return {trace_id for trace_id, _ in mine}, sum(1 for _, synced in mine if synced == 0), deleted


def retention_deleted(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Retention's unpushed deletions, each once: from the loss reports the receiver got and the
    ledger at the end (which keeps a reported row only TRACE_RETENTION long, 20 s here)."""
    once: dict[tuple, dict[str, Any]] = {}
    for report in reports:
        key = (report.get("ledger_id"), report.get("at"), report.get("table"), report.get("reason"))
        if report.get("kind") == "retention" and report.get("oldest_received_at") is not None and \
                report["rows"] > once.get(key, {}).get("rows", -1):       # a row unmarked may have grown
            once[key] = report
    return list(once.values())


def by_table(reports: list[dict[str, Any]]) -> dict[str, int]:
    rows: collections.Counter[str] = collections.Counter()
    for report in reports:
        rows[f"{report['table']}/{report['reason']}"] += report["rows"]
    return dict(rows)


@dataclasses.dataclass
class Loss:
    """Events answered 202 that are nowhere, sorted by what ended the process that accepted them."""

    WINDOW = "in the SIGKILL window"
    DELETED = "deleted unpushed by retention, and reported"
    REPORTED = "at a SIGTERM that could not write them (exit 1, events_lost logged)"
    OUTAGE_KILL = "at a SIGKILL during a write outage"

    causes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    ages: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # cause -> s before

    def add(self, cause: str, age: float) -> None:
        self.causes[cause] += 1
        low, high = self.ages.get(cause, (age, age))
        self.ages[cause] = (min(low, age), max(high, age))

    @property
    def allowed(self) -> int:
        return self.causes[self.WINDOW]

    @property
    def reported(self) -> int:
        return self.causes[self.REPORTED]

    @property
    def outage_killed(self) -> int:
        return self.causes[self.OUTAGE_KILL]

    @property
    def deleted(self) -> int:
        return self.causes[self.DELETED]

    @property
    def total(self) -> int:
        """Every loss but the documented ones: the SIGKILL window, what otrace reported at exit, what
        a SIGKILL took from the queue while writes were failing, and what retention deleted unpushed."""
        return self.causes.total() - self.allowed - self.reported - self.outage_killed - self.deleted

    def detail(self, cause: str) -> str:
        return f"answered 202 {describe_ages(*self.ages[cause])} the signal"


def reported_losses(node: Node) -> list[int]:
    """The events_lost otrace logged at each shutdown that could not write its queue."""
    return [line.get("events_lost", 0) for _, line in node.notes
            if line.get("message") == "shutdown deadline passed with accepted events not written"]


def losses(ledger: Ledger, kept: set[str], stops: list[Stop], deleted: list[dict[str, Any]]) -> Loss:
    """Sort every lost id by the stop that ended the process that answered it 202 (the one alive when
    the answer was read: processes never overlap), and by how long before the signal that was. A 202
    read after the signal came from a process that was shutting down. An id whose answer falls in the
    received_at range of a retention deletion of its table is that deletion's, up to the rows it
    reported."""
    loss = Loss()
    ends = sorted(stops, key=lambda s: s.exited)
    budget = [dict(report) for report in deleted]
    for trace_id, answered_at in sorted(ledger.accepted.items(), key=lambda item: item[1]):
        if trace_id in kept:
            continue
        stop = next((s for s in ends if s.exited + READ_LATE >= answered_at), None)
        age = stop.at - answered_at if stop else 0.0
        wall_ms = (answered_at + ledger.wall) * 1000
        report = min((r for r in budget if r["rows"] > 0 and r["table"] == TABLES[trace_id[0]]
                      and r["oldest_received_at"] <= wall_ms <= r["newest_received_at"] + ANSWER_LAG * 1000),
                     key=lambda r: r["newest_received_at"], default=None)   # the range ending first
        if report:
            report["rows"] -= 1
            loss.add(loss.DELETED, age)
        elif stop and stop.kind == "SIGKILL" and age <= BATCH_WINDOW + WINDOW_SLACK:
            loss.add(loss.WINDOW, age)
        elif stop and stop.kind == "SIGTERM" and stop.code == 1:
            loss.add(loss.REPORTED, age)
        elif stop and stop.kind == "SIGKILL" and (stop.disk_full or stop.writes_failing):
            loss.add(loss.OUTAGE_KILL, age)
        elif stop:
            loss.add(f"at {stop.kind}" + (", disk full" if stop.disk_full else ""), age)
        else:
            loss.add("no restart after it", age)
    return loss


class Soak:
    """One run: the parts, the schedule of faults, and the tally."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.journal = Journal(args.log)
        self.disk = Disk(work / "vol", TMPFS_SIZE, random.Random(self.rng.random()), self.journal)
        self.ledger = Ledger()
        self.port = free_port()
        self.receiver: PushReceiver | None = None
        self.node: Node | None = None
        self.clients: Clients | None = None
        self.monitor: Monitor | None = None
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        print(f"  {time.monotonic() - self.started:6.1f} s  {text}", flush=True)
        self.journal.note("runner", text)

    def run(self) -> int:
        """Mount, start everything, inject faults for --minutes, drain, count; the exit code."""
        args, disk = self.args, self.disk
        try:
            disk.mount()
            otlp = args.format == "otlp"
            self.receiver = receiver = PushReceiver(random.Random(self.rng.random()), self.journal, otlp)
            self.node = node = Node({**SETTINGS, "TRACE_PORT": str(self.port),
                                     "TRACE_PUSH_FORMAT": args.format,
                                     "TRACE_DB_PATH": str(disk.path / "otrace.db"),
                                     "TRACE_PUSH_ENDPOINT": receiver.url}, self.journal)
            node.start()
            self.clients = clients = Clients(args.clients, self.port, self.ledger, disk.is_full, args.seed)
            self.monitor = monitor = Monitor(node, self.port, disk.is_full)
            print(f"soak: otrace on {HOST}:{self.port}, database on a {TMPFS_SIZE} tmpfs, receiver on "
                  f"{receiver.port}, {args.clients} clients, {args.minutes:g} min, seed {args.seed}, "
                  f"push {args.format}", flush=True)
            self.started = time.monotonic()
            clients.start()
            for thread in (receiver.thread, disk.thread, monitor.thread):
                thread.start()
            self.faults(self.started + args.minutes * 60)
            self.say("load stops; disk freed, receiver healthy, draining")
            clients.stop()
            disk.stop()
            receiver.settle()
            if not node.alive():
                node.crashed(False, receiver.phase)
                node.start()
            drained = drain(node, self.port, timeout=180)
            monitor.stopping.set()
            final = node.stop(signal.SIGTERM, "final SIGTERM", False, receiver.phase)
            self.say(f"drained: {drained}; final SIGTERM: exit {final.code} after {final.seconds:.2f} s")
            stored = stored_ids(disk.path / "otrace.db")
            deleted = retention_deleted(stored[2] + receiver.losses)
            loss = losses(self.ledger, stored[0] | set(receiver.seen), node.stops, deleted)
            text = self.report(final, drained, stored, deleted, loss)
            print(text, flush=True)
            if args.out:
                args.out.write_text(text + "\n")
            return 1 if loss.total or loss.reported > sum(reported_losses(node)) or not drained else 0
        finally:
            self.close()

    def faults(self, end: float) -> None:
        """Restart otrace every 20-40 s, SIGTERM and SIGKILL in turn, until `end`; restart it if it
        exits by itself. The disk and the receiver run their own schedules."""
        node, receiver, disk = self.node, self.receiver, self.disk
        assert node and receiver
        restart_at, kill_next = time.monotonic() + self.rng.uniform(*RESTART_EVERY), False
        while time.monotonic() < end:
            time.sleep(0.1)
            if not node.alive():
                node.crashed(disk.is_full(), receiver.phase)
                self.say(f"otrace exited by itself (code {node.stops[-1].code}); starting it again")
                node.start()
            elif time.monotonic() >= restart_at:
                sig = signal.SIGKILL if kill_next else signal.SIGTERM
                stop = node.stop(sig, sig.name, disk.is_full(), receiver.phase)
                self.say(f"{sig.name}: exit {stop.code} after {stop.seconds:.2f} s (disk "
                         f"{'full' if stop.disk_full else 'free'}, receiver {stop.phase})")
                node.start()
                kill_next, restart_at = not kill_next, time.monotonic() + self.rng.uniform(*RESTART_EVERY)

    def close(self) -> None:
        """Stop every thread and process, and unmount; safe to call at any point (Ctrl-C too)."""
        for part in (self.clients, self.monitor):
            if part:
                part.stopping.set()
        if self.node:
            self.node.close()
        if self.receiver:
            self.receiver.close()
        self.disk.stopping.set()
        if self.disk.thread.is_alive():
            self.disk.thread.join(10)
        self.disk.unmount()
        self.journal.close()

    # -- the report
    def report(self, final: Stop, drained: bool, stored: tuple[set[str], int, list[dict[str, Any]]],
               deleted: list[dict[str, Any]], loss: Loss) -> str:
        """The tally as Markdown tables."""
        args, ledger, receiver, node, disk, monitor = (self.args, self.ledger, self.receiver, self.node,
                                                       self.disk, self.monitor)
        assert receiver and node and monitor
        kept_in_db, unpushed, _ = stored
        accepted, pushed = set(ledger.accepted), set(receiver.seen)
        never = ", ".join(f"{n} {outcome}" for outcome, n in ledger.never.most_common()) or "none"
        causes = "; ".join(f"{n} {cause} ({loss.detail(cause)})" for cause, n in loss.causes.items()
                           if cause not in (loss.WINDOW, loss.REPORTED, loss.OUTAGE_KILL, loss.DELETED))
        unwritten = reported_losses(node)
        window = (f"at most {(BATCH_WINDOW + WINDOW_SLACK) * 1000:.0f} ms before a SIGKILL"
                  + (f"; {loss.detail(loss.WINDOW)}" if loss.allowed else ""))
        rows = [
            ("events sent (distinct ids)", ledger.sent, ""),
            ("answered 202", len(accepted), f"{ledger.mismatches} answers with other ids than sent"),
            ("never answered 202 (503 / other)", ledger.sent - len(accepted), f"by last answer: {never}"),
            ("persisted (in the database at the end)", len(kept_in_db), f"{unpushed} of them never pushed"),
            ("pushed (seen by the receiver, distinct)", len(pushed), ""),
            ("duplicates seen by the receiver (at-least-once)", sum(receiver.seen.values()) - len(pushed),
             ""),
            ("answered 202 and persisted or pushed", len(accepted & (kept_in_db | pushed)), ""),
            ("persisted or pushed without a 202 (its answer was lost)", len((kept_in_db | pushed) - accepted),
             ""),
            ("lost in SIGKILL window (allowed)", loss.allowed, window),
            ("lost at a SIGTERM during a write outage, reported by otrace", loss.reported,
             f"otrace logged events_lost {unwritten or 'never'}"
             + (f"; {loss.detail(loss.REPORTED)}" if loss.reported else "")),
            ("lost at a SIGKILL during a write outage (accepted before it began: otrace answers 503 "
             "once writes fail)", loss.outage_killed,
             loss.detail(loss.OUTAGE_KILL) if loss.outage_killed else ""),
            ("deleted unpushed by retention (the disk or the cap), and reported", loss.deleted,
             f"of {sum(r['rows'] for r in deleted if r['table'] in TABLES.values())} such rows reported"
             + (f"; {loss.detail(loss.DELETED)}" if loss.deleted else "")),
            ("**lost**", f"**{loss.total}**", causes),
        ]
        out = [f"## otrace fault soak, {datetime.now().astimezone():%Y-%m-%d %H:%M}, {args.minutes:g} min, "
               f"{args.clients} clients, seed {args.seed}, push {args.format}", "",
               "| Events | Count | Detail |", "|---|---:|---|"]
        out += [f"| {name} | {value} | {detail} |" for name, value, detail in rows]

        terms = [s for s in node.stops if s.kind == "SIGTERM"]
        kills = [s for s in node.stops if s.kind == "SIGKILL"]
        crashes = [s for s in node.stops if s.kind == "crash"]
        phases = ", ".join(f"{name} {n}" for name, n in receiver.phases.items())
        out += ["", "| Faults | Count | Detail |", "|---|---:|---|",
                f"| SIGTERM restarts | {len(terms)} | {exits(terms)} |",
                f"| SIGKILL restarts | {len(kills)} | {sum(s.disk_full for s in kills)} with the disk full |",
                f"| final SIGTERM (after draining) | 1 | {exits([final])}; drained first: {drained} |",
                f"| exits nobody asked for | {len(crashes)} | codes {[s.code for s in crashes]} |",
                f"| starts that failed (tried again) | {node.failed_starts} | |",
                f"| disk-full episodes | {len(disk.episodes)} | "
                f"{sum(b - a for a, b in disk.episodes):.0f} s full in all |",
                f"| receiver phases | {sum(receiver.phases.values())} | {phases} |"]

        health: collections.Counter[str] = collections.Counter()
        for (full, status), n in monitor.samples.items():
            health[f"{'disk full' if full else 'disk free'}: {status}"] += n
        out += ["", "| Also seen | Count | Detail |", "|---|---:|---|",
                f"| ingest requests | {ledger.answers.total()} | {counts(ledger.answers)} |",
                f"| ... while the disk was full | {ledger.answers_full.total()} | "
                f"{counts(ledger.answers_full)} |",
                f"| /health samples | {health.total()} | {counts(health)} |",
                f"| push breaker, in /health samples | {monitor.breaker.total()} | "
                f"{counts(monitor.breaker)} |",
                f"| largest queue_depth / unsynced_count | {monitor.max_queue} / {monitor.max_unsynced} | |",
                f"| largest database + WAL, MiB | {monitor.max_db / 2**20:.1f} | on a {TMPFS_SIZE} tmpfs |",
                f"| push requests the receiver got | {receiver.requests.total()} | "
                f"{counts(receiver.requests)}; {len(receiver.batch_ids)} distinct batches |",
                f"| otrace's own events pushed | {receiver.others.total()} | {counts(receiver.others)} |",
                f"| malformed pushes or events | {receiver.malformed} | |",
                f"| unpushed rows retention deleted | {sum(r['rows'] for r in deleted)} | "
                f"{by_table(deleted)}; losses reported in pushes: {len(receiver.losses)} |"]
        out += ["", "| otrace said (warnings and errors) | Count |", "|---|---:|"]
        out += [f"| {message} | {n} |" for message, n in node.warnings.most_common()]
        final_pushes = [line for _, line in node.notes if line.get("message") == "final push"]
        out += ["", f"Final pushes at SIGTERM: {len(final_pushes)}, complete "
                f"{sum(1 for line in final_pushes if line.get('complete'))}; shutdowns with events not "
                f"written: {unwritten or 'none'}."]
        if node.stderr:
            out += ["", "otrace wrote to stderr:", "", *(f"    {line}" for line in node.stderr[-20:])]
        terms = [*terms, final]
        checks = [
            (loss.total == 0 and loss.reported <= sum(unwritten),
             "nothing answered 202 was lost but in the documented cases: the SIGKILL window, a SIGTERM "
             "during a write outage that otrace reports (events_lost; its own unwritten rows are "
             "logged apart), a SIGKILL during a write outage (the exit code), retention's unpushed "
             "deletions (reported)"),
            (drained, "once the faults ended, otrace pushed every row (no row left unpushed)"),
            (all(s.code == 0 for s in terms), "every SIGTERM exited 0"),
            (all(s.seconds <= SHUTDOWN_TIMEOUT + EXIT_SLACK for s in terms),
             f"every SIGTERM exited within TRACE_SHUTDOWN_TIMEOUT ({SHUTDOWN_TIMEOUT:g} s, "
             f"+ {EXIT_SLACK:g} s)"),
            (not disk.episodes or any(full and status.startswith("degraded")
                                      for (full, status) in monitor.samples),
             "/health said degraded while the disk was full"),
            (not crashes and not node.stderr, "otrace never exited by itself nor wrote to stderr"),
            (ledger.mismatches == 0 and receiver.malformed == 0,
             "every 202 and every push held the right ids"),
        ]
        out += ["", "Checks (only the first two set the exit code):", ""]
        out += [f"- {'PASS' if ok else 'FAIL'}: {text}" for ok, text in checks]
        return "\n".join(out)


def exits(stops: list[Stop]) -> str:
    """Exit codes and times of some stops, against the shutdown deadline."""
    codes = collections.Counter(s.code for s in stops)
    slowest = max((s.seconds for s in stops), default=0.0)
    late = sum(1 for s in stops if s.seconds > SHUTDOWN_TIMEOUT + EXIT_SLACK)
    return (f"exit codes {dict(codes)}, slowest {slowest:.2f} s of {SHUTDOWN_TIMEOUT:g} s, {late} late, "
            f"{sum(s.disk_full for s in stops)} with the disk full")


def describe_ages(low: float, high: float) -> str:
    """"0.12 to 3.40 s before", or "0.20 s after to 1.50 s before" for ages in seconds before."""
    def one(age: float) -> str:
        return f"{abs(age):.2f} s {'before' if age >= 0 else 'after'}"
    return f"{one(high)} to {one(low)}" if low != high else one(low)


def counts(counter: collections.Counter[str]) -> str:
    return ", ".join(f"{what} {n}" for what, n in counter.most_common()) or "none"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long the load and faults last")
    parser.add_argument("--clients", type=int, default=4, help="client threads posting")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000, help="for the schedule")
    parser.add_argument("--out", type=Path, help="also write the tally (Markdown) to this file")
    parser.add_argument("--log", type=Path, help="append otrace's log lines to this file")
    parser.add_argument("--format", choices=("otrace", "otlp"), default="otrace",
                        help="what otrace pushes (TRACE_PUSH_FORMAT); otlp adds faults of one signal")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("soak: needs root, to mount a tmpfs")
    work = Path(tempfile.mkdtemp(prefix="otrace-soak-"))
    try:
        return Soak(args, work).run()
    except KeyboardInterrupt:
        print("soak: interrupted; cleaned up", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
