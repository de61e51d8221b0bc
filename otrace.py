#!/usr/bin/env python3
"""otrace: an observability sidecar for AI agents.

The agent POSTs LLM-call traces and error events over loopback HTTP; otrace answers 202 at once and a
single writer thread keeps every accepted event in SQLite. Beside them, loops sample the host's
metrics, follow the gateway's log, push unsynced rows to a remote API, and keep the database inside
its budget. The file reads in the order data flows: config, model, store, ingest, collectors, push,
upkeep, lifecycle, CLI.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import email.utils
import errno
import functools
import io
import json
import logging
import math
import os
import queue
import random
import re
import select
import signal
import socket
import sqlite3
import sys
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

try:
    import psutil
    from pythonjsonlogger.json import JsonFormatter
except ImportError as missing:  # pragma: no cover - depends on the environment
    sys.exit(f"otrace: missing package {missing.name!r}: pip install -r requirements.txt, or run otrace.pyz")

# Imported where first needed, not here: urllib3 and gzip (push), hashlib (log tailing), hmac (the
# ingest token), ctypes (push's buffers). hashlib, hmac and urllib3 map OpenSSL, and urllib3 brings
# some 60 modules: together about 9 MiB resident that a sidecar without push or a token does not carry.
# For the same reason ssl is kept out while http.server imports http.client, which imports ssl only to
# offer HTTPSConnection; urllib3 imports ssl itself when push needs it.
_ssl_imported = "ssl" in sys.modules
sys.modules.setdefault("ssl", None)        # type: ignore[arg-type]  # None: "import ssl" fails
from http.server import BaseHTTPRequestHandler, HTTPServer  # noqa: E402

if not _ssl_imported:
    del sys.modules["ssl"]

__version__ = "0.1.0"

log = logging.getLogger("otrace")


# ============================================================================================== config
# One table of settings drives the parsing, `--help` and the README: every setting is a field of
# Config, its environment variable is TRACE_<NAME>, and its metadata says what it accepts.


class SettingError(ValueError):
    """A setting's value is not one it accepts."""


@dataclasses.dataclass(frozen=True)
class Kind:
    """How to parse one kind of setting, and how to say what it accepts."""

    accepts: str
    parse: Callable[[str], Any]


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|kB|KB|MB|GB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
               "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3}


def _duration(raw: str) -> float:
    match = _DURATION.fullmatch(raw.strip())
    if not match or float(match[1]) <= 0:
        raise SettingError
    return float(match[1]) * _DURATION_UNITS[match[2]]


def _size(raw: str) -> int:
    match = _SIZE.fullmatch(raw.strip())
    if not match or int(match[1]) <= 0:
        raise SettingError
    return int(match[1]) * _SIZE_UNITS[match[2]]


def _count(low: int, high: int) -> Kind:
    def parse(raw: str) -> int:
        if not re.fullmatch(r"\d+", raw.strip()) or not low <= int(raw) <= high:
            raise SettingError
        return int(raw)

    return Kind(f"an integer from {low} to {high}", parse)


def _choice(*choices: str) -> Kind:
    def parse(raw: str) -> str:
        if raw.strip().lower() not in choices:
            raise SettingError
        return raw.strip().lower()

    return Kind("one of " + ", ".join(choices), parse)


def _interval(raw: str) -> float:
    return 0.0 if raw.strip().lower() == "off" else _duration(raw)


def _token(raw: str) -> str:
    if raw and not (raw.isascii() and raw.isprintable() and " " not in raw):
        raise SettingError
    return raw


def _nonempty(raw: str) -> str:
    if not raw.strip():
        raise SettingError
    return raw.strip()


def _switch(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
        raise SettingError
    return value in ("on", "true", "1", "yes")


def _url(raw: str) -> str:
    parts = urllib.parse.urlsplit(raw.strip())
    if raw.strip() and (parts.scheme not in ("http", "https") or not parts.hostname):
        raise SettingError
    return raw.strip()


TEXT = Kind("any text", str)
NAME = Kind("a non-empty value", _nonempty)
SWITCH = Kind("on or off", _switch)
URL = Kind("empty, or an http:// or https:// URL", _url)
DURATION = Kind("a duration like 500ms, 15s, 5m, 1h or 3d", _duration)
INTERVAL = Kind("a duration like 15s, or off", _interval)
SIZE = Kind("a size in bytes, or with a unit: 16KiB, 1MiB, 5MB", _size)
TOKEN = Kind("empty, or printable ASCII without spaces", _token)
LEVEL = _choice("debug", "info", "warning", "error")


def setting(default: str, kind: Kind, doc: str, *, secret: bool = False) -> Any:
    """Declare one Config field: its default as written in the environment, its kind and meaning."""
    meta = {"default": default, "kind": kind, "doc": doc, "secret": secret}
    return dataclasses.field(default=kind.parse(default), metadata=meta)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting otrace has. Read from TRACE_* environment variables by `Config.from_env`."""

    host: str = setting("127.0.0.1", NAME, "Address to listen on. Loopback by default: the agent runs on "
                        "the same machine.")
    port: int = setting("9090", _count(0, 65535), "TCP port to listen on; 0 picks a free one (logged).")
    db_path: str = setting("/data/openclaw-trace.db", NAME, "SQLite database file; its directory is "
                           "created.")
    log_level: str = setting("info", LEVEL, "Least severe log level written to stdout.")
    ingest_token: str = setting("", TOKEN, "When set, requests need `Authorization: Bearer <token>` "
                                "(all but /health and /metrics).", secret=True)
    max_body_bytes: int = setting("1MiB", SIZE, "Largest request body; a larger one is answered 413 "
                                  "unread.")
    max_text_bytes: int = setting("16KiB", SIZE, "Texts (input_text, output_text, message, stack_trace) "
                                  "and metadata are cut to this many UTF-8 bytes.")
    max_events: int = setting("1000", _count(1, 100_000), "Most events one request may carry as a JSON "
                              "array.")
    queue_size: int = setting("512", _count(1, 1_000_000), "Events waiting for the writer. A request "
                              "that does not fit whole gets 503 (one that is larger than the queue is "
                              "taken only into an empty queue).")
    batch_size: int = setting("50", _count(1, 10_000), "Most events the writer commits in one "
                              "transaction.")
    batch_window: float = setting("500ms", DURATION, "Longest an event waits in the queue for its batch "
                                  "to fill: the most a SIGKILL can lose.")
    read_timeout: float = setting("10s", DURATION, "Longest a client may take to send one whole request "
                                  "or to take its answer, and to stay idle between requests on a "
                                  "kept-alive connection.")
    max_connections: int = setting("256", _count(1, 10_000), "Open client connections; the next one is "
                                   "answered 503 and closed.")
    shutdown_timeout: float = setting("4s", DURATION, "Time from SIGTERM to exit: answer in-flight "
                                      "requests, write the queue, push what time allows, checkpoint, "
                                      "close.")
    metrics_interval: float = setting("15s", INTERVAL, "Time between host metrics samples (the first one "
                                      "only primes the counters); off stops sampling.")
    cgroup: str = setting("auto", _choice("auto", "v2", "v1", "none"), "Which cgroup hierarchy host "
                          "metrics come from; none reads /proc only (a VM).")
    procfs: str = setting("/proc", NAME, "Where procfs is mounted (a host's /proc seen from a container "
                          "can be mounted elsewhere).")
    sysfs: str = setting("/sys", NAME, "Where sysfs is mounted.")
    disk_path: str = setting("", TEXT, "A path on the filesystem whose space and I/O are reported; "
                             "empty: the database's directory.")
    log_path: str = setting("", TEXT, "The OpenClaw gateway log to follow: a file, or a directory whose "
                            "newest openclaw*-YYYY-MM-DD.log is followed; empty: off.")
    log_poll: float = setting("500ms", DURATION, "Time between looks at the log file.")
    log_start: str = setting("end", _choice("end", "beginning"), "Where to start in a log file otrace "
                             "has never read (a file it has read resumes where it stopped).")
    log_keep_all: bool = setting("off", SWITCH, "Keep INFO and DEBUG lines of no known kind too (they "
                                 "are skipped by default).")
    checkpoint_interval: float = setting("10m", DURATION, "Time between WAL checkpoints (PASSIVE; "
                                         "TRUNCATE when the WAL is over TRACE_WAL_MAX_BYTES).")
    wal_max_bytes: int = setting("50MiB", SIZE, "WAL size that makes the next checkpoint a TRUNCATE, "
                                 "and SQLite's journal_size_limit.")
    cleanup_interval: float = setting("5m", DURATION, "Time between retention passes.")
    retention: float = setting("3d", DURATION, "Age (since arrival) after which pushed rows are deleted.")
    db_max_bytes: int = setting("200MiB", SIZE, "Most the database (file + WAL) may use: past 85 % of it "
                                "the oldest rows are deleted, down to 75 % (see Storage in the README).")
    disk_reserve_bytes: int = setting("16MiB", SIZE, "Space held in a file beside the database and given "
                                      "up on the first disk-full write, so what was accepted still "
                                      "commits; ingest then answers 503 until the space is back. 0: off.")
    disk_high_pct: int = setting("80", _count(1, 100), "Disk use (as df counts it) that starts deleting "
                                 "pushed rows and unpushed metrics, down to 5 points below it.")
    push_endpoint: str = setting("", URL, "Remote API that receives unsynced events in JSON batches; "
                                 "empty turns push off.")
    push_interval: float = setting("5m", DURATION, "Time between push cycles.")
    push_token: str = setting("", TOKEN, "Sent to the push endpoint as `Authorization: Bearer "
                              "<token>`; never logged.", secret=True)
    push_max_bytes: int = setting("5MiB", SIZE, "Largest JSON body of one push request (before gzip); "
                                  "a single larger event is sent alone.")
    push_timeout: float = setting("30s", DURATION, "Longest wait for the receiver's answer to one "
                                  "request (connecting: at most 10 s).")
    push_gzip: bool = setting("off", SWITCH, "Compress push bodies (Content-Encoding: gzip).")
    push_retries: int = setting("5", _count(1, 1000), "Attempts at one batch within a cycle before the "
                                "cycle counts as failed; the rows wait for the next cycle.")
    push_backoff_base: float = setting("1s", DURATION, "First retry wait; each retry doubles the "
                                       "ceiling, and the wait is drawn uniformly below it (full "
                                       "jitter). A Retry-After answer is a floor.")
    push_backoff_cap: float = setting("1m", DURATION, "Highest retry wait ceiling.")
    push_breaker_threshold: int = setting("3", _count(1, 1000), "Failed cycles in a row that open the "
                                          "circuit breaker.")
    push_breaker_cooldown: float = setting("5m", DURATION, "Wait of an open breaker before the next "
                                           "try; it doubles with each further failed cycle, up to 1 h.")
    agent_id: str = setting("", TEXT, "Name of this agent in pushed batches; empty: the host name.")

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> Config:
        """Build a Config from TRACE_* variables, raising SettingError naming the first bad one."""
        values = {}
        for spec in dataclasses.fields(cls):
            name = env_name(spec)
            if name in environ:
                try:
                    values[spec.name] = spec.metadata["kind"].parse(environ[name])
                except (SettingError, ValueError):
                    accepts = spec.metadata["kind"].accepts
                    raise SettingError(f"{name}={environ[name]!r} is not valid: expected {accepts}") from None
        return cls(**values)

    def shown(self) -> dict[str, Any]:
        """The effective settings, secrets masked (and any user:password@ of the push URL), for the
        startup log."""
        return {spec.name: ("***" if spec.metadata["secret"] and getattr(self, spec.name) else
                            getattr(self, spec.name)) for spec in dataclasses.fields(self)} | {
            "push_endpoint": _without_userinfo(self.push_endpoint)}


def env_name(spec: dataclasses.Field) -> str:
    return "TRACE_" + spec.name.upper()


def settings_table(markdown: bool = False) -> str:
    """Every setting with its default and meaning, for --help (plain) or the README (markdown)."""
    specs = dataclasses.fields(Config)
    if markdown:
        rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
        rows += [f"| `{env_name(s)}` | `{s.metadata['default']}` | {s.metadata['doc']} "
                 f"Accepts {s.metadata['kind'].accepts}. |" for s in specs]
        return "\n".join(rows)
    lines = []
    for s in specs:
        lines.append(f"  {env_name(s)} (default: {s.metadata['default'] or 'empty'})")
        lines += textwrap.wrap(f"{s.metadata['doc']} Accepts {s.metadata['kind'].accepts}.", 96,
                               initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def setup_logging(level: str) -> None:
    """One JSON object per line on stdout: time, level, logger, message, plus the record's fields."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter("{levelname}{name}{message}", style="{", timestamp="time",
                                       rename_fields={"levelname": "level", "name": "logger"}))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class FaultLog:
    """Logs a failure that repeats (every retry) once when it starts or changes, and once when it ends."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger, self.what = logger, what
        self.error: str | None = None
        self.since = 0.0
        self.count = 0

    def failed(self, error: str) -> None:
        self.count += 1
        if error != self.error:
            self.logger.error("%s failing", self.what, extra={"error": error, "attempt": self.count})
            if self.error is None:
                self.since = time.time()
            self.error = error

    def cleared(self) -> None:
        if self.error is not None:
            self.logger.warning("%s recovered", self.what, extra={
                "failed_attempts": self.count, "failed_seconds": round(time.time() - self.since, 3)})
        self.error, self.count = None, 0


class Backoff:
    """Exponential backoff with full jitter: the n-th wait is uniform over [0, min(cap, base * 2**n)]."""

    def __init__(self, base: float, cap: float, rng: Callable[[], float] = random.random) -> None:
        self.base, self.cap, self.rng = base, cap, rng
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.attempt, 62))
        self.attempt += 1
        return ceiling * self.rng()

    def reset(self) -> None:
        self.attempt = 0


class Loop(threading.Thread):
    """A background thread that calls `tick` every `interval` seconds (or at once when woken) until
    stopped. An exception in a tick is logged (on change, through FaultLog) and the loop goes on: it
    never dies of one."""

    def __init__(self, name: str, interval: float, first_delay: float | None = None) -> None:
        super().__init__(name=f"otrace-{name}", daemon=True)
        self.interval = interval
        self.first_delay = interval if first_delay is None else first_delay
        self.stopping = threading.Event()
        self.bell = threading.Event()
        self.log = logging.getLogger(f"otrace.{name}")
        self.fault = FaultLog(self.log, name)

    def wake(self) -> None:
        """Run the next tick now instead of at its time."""
        self.bell.set()

    def stop(self) -> None:
        """Ask the loop to end; a tick under way finishes (nothing waits for it)."""
        self.stopping.set()
        self.bell.set()

    def run(self) -> None:
        delay = self.first_delay
        while True:
            self.bell.wait(delay)
            self.bell.clear()
            if self.stopping.is_set():
                return
            try:
                self.tick()
            except Exception as exc:  # a loop outlives any one failure
                if self.fault.error is None:
                    self.log.exception("%s failed", self.name)
                self.fault.failed(describe(exc))
            else:
                self.fault.cleared()
            delay = self.next_delay()

    def next_delay(self) -> float:
        return self.interval

    def tick(self) -> None:
        raise NotImplementedError



# ============================================================================================== model
# What an event is: the fields each endpoint accepts, how a JSON value becomes a column value, and the
# rows that reach SQLite. Validation is all-or-nothing per request.

MAX_INT = 2**53 - 1              # the largest integer a JavaScript agent can send exactly
MAX_NAME_CHARS = 256             # provider, model, session_id, finish_reason, ...
MAX_TRACE_ID_CHARS = 128
MAX_UNIX_MS = 253402300799999    # 9999-12-31T23:59:59.999Z


class Invalid(ValueError):
    """A request that cannot be accepted, with the field (and array index) to blame."""

    def __init__(self, message: str, field: str | None = None, index: int | None = None,
                 status: int = 400) -> None:
        super().__init__(message)
        self.field, self.index, self.status = field, index, status

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": str(self), "field": self.field}
        if self.index is not None:
            out["index"] = self.index
        return out


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_ids = random.Random()           # seeded from os.urandom once


def new_id() -> str:
    """A time-ordered UUID (version 7, RFC 9562: Unix milliseconds, then 74 random bits) for an event
    that came without a trace_id. Ordered, so new ids land at the end of the trace_id index and not on
    random pages of it. The bits come from a PRNG seeded once from os.urandom: ids must be unique, not
    secret, and getrandom(2) per event costs more than the rest of the id."""
    bits = time.time_ns() // 1_000_000 << 80 | 0x7000 << 64 | 0x8000 << 48 | _ids.getrandbits(128) & _RANDOM
    digits = f"{bits:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


_RANDOM = 0xFFF << 64 | (1 << 62) - 1        # rand_a (12 bits) and rand_b (62 bits)


def clean_text(text: str) -> str:
    """Replace lone surrogates (valid in JSON, not in UTF-8) with U+FFFD so the text can be stored."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def cut_utf8(text: str, limit: int) -> tuple[str, int, bool]:
    """Cut text to at most `limit` UTF-8 bytes on a character boundary: (text, original bytes, cut?)."""
    text = clean_text(text)
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text, len(raw), False
    return raw[:limit].decode("utf-8", "ignore"), len(raw), True


class Reader:
    """Turns the JSON values of one event into column values, raising Invalid naming the field."""

    def __init__(self, event: dict[str, Any], index: int | None, max_text: int) -> None:
        self.event, self.index, self.max_text = event, index, max_text
        self.truncated = False

    def fail(self, field: str, message: str) -> Invalid:
        return Invalid(f"{field} {message}", field, self.index)

    def name(self, field: str, required: bool = False, limit: int = MAX_NAME_CHARS) -> str | None:
        value = self.event.get(field)
        if value is None:
            if required:
                raise self.fail(field, "is required")
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(field, "must be a non-empty string")
        if len(value) > limit:
            raise self.fail(field, f"must be at most {limit} characters")
        return clean_text(value)

    def choice(self, field: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self.event.get(field)
        if value is None and default is not None:
            return default
        if value not in choices:
            raise self.fail(field, "must be one of " + ", ".join(choices))
        return value

    def text(self, field: str, required: bool = False) -> tuple[str | None, int | None]:
        """A free text, cut to max_text bytes: (text, original length in bytes)."""
        value = self.event.get(field)
        if value is None:
            if required:
                raise self.fail(field, "is required")
            return None, None
        if not isinstance(value, str):
            raise self.fail(field, "must be a string")
        if required and not value.strip():
            raise self.fail(field, "must not be empty")
        text, size, cut = cut_utf8(value, self.max_text)
        self.truncated |= cut
        return text, size

    def count(self, field: str) -> int | None:
        value = self.event.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
            raise self.fail(field, f"must be an integer from 0 to {MAX_INT}")
        return value

    def amount(self, field: str) -> float | None:
        value = self.event.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and 0 <= value <= MAX_INT):
            raise self.fail(field, "must be a non-negative number")
        return value

    def trace_id(self) -> str:
        value = self.event.get("trace_id")
        if value is None:
            return new_id()
        if not (isinstance(value, str) and 0 < len(value) <= MAX_TRACE_ID_CHARS and value.isprintable()):
            raise self.fail("trace_id", f"must be 1 to {MAX_TRACE_ID_CHARS} printable characters")
        return clean_text(value)

    def created_at(self, received: int) -> int:
        """Unix ms, from an RFC 3339 string or a number of Unix ms; the arrival time when absent."""
        value = self.event.get("created_at")
        if value is None:
            return received
        if isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                raise self.fail("created_at", "must be RFC 3339 (2026-01-31T12:00:00Z) or Unix ms") from None
            if moment.tzinfo is None:
                raise self.fail("created_at", "needs a timezone offset (Z or +hh:mm)")
            value = round(moment.timestamp() * 1000)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail("created_at", "must be RFC 3339 (2026-01-31T12:00:00Z) or Unix ms")
        if not 0 <= value <= MAX_UNIX_MS:
            raise self.fail("created_at", "is out of range (1970 to 9999)")
        return int(value)

    def metadata(self) -> str | None:
        """A JSON object (or a string holding one), stored as compact JSON."""
        value = self.event.get("metadata")
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value, parse_constant=_no_constants)
            except (ValueError, RecursionError):
                raise self.fail("metadata", "string must hold a JSON object") from None
        if not isinstance(value, dict):
            raise self.fail("metadata", "must be a JSON object")
        try:
            text = clean_text(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
        except RecursionError:      # parsed just under the limit, a few frames deeper to write back
            raise self.fail("metadata", "is nested too deeply") from None
        size = len(text.encode("utf-8"))
        if size > self.max_text:
            self.truncated = True
            return json.dumps({"_otrace_truncated": True, "original_bytes": size})
        return text


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@dataclasses.dataclass(frozen=True)
class Table:
    """One event table: the JSON fields its endpoint accepts and the columns a row fills, in order."""

    name: str
    fields: frozenset[str]
    columns: tuple[str, ...]


_COMMON = ("trace_id", "created_at", "received_at", "source")
TRACES = Table("llm_traces", frozenset({
    "provider", "model", "input_text", "output_text", "prompt_tokens", "completion_tokens", "total_tokens",
    "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "cost_usd", "latency_ms", "ttft_ms",
    "status", "error_type", "finish_reason", "session_id", "trace_id", "created_at", "metadata"}),
    (*_COMMON, "provider", "model", "status", "error_type", "finish_reason", "session_id",
               "prompt_tokens", "completion_tokens", "total_tokens", "cache_read_tokens",
               "cache_write_tokens", "reasoning_tokens", "cost_usd", "latency_ms", "ttft_ms",
               "input_text", "input_bytes", "output_text", "output_bytes", "metadata", "truncated"))
ERRORS = Table("error_events", frozenset({
    "error_type", "category", "message", "stack_trace", "severity", "provider", "model", "session_id",
    "trace_id", "created_at", "metadata"}),
    (*_COMMON, "error_type", "category", "severity", "message", "message_bytes", "stack_trace",
               "stack_trace_bytes", "provider", "model", "session_id", "metadata", "truncated"))

METRICS = Table("system_metrics", frozenset(), (
    *_COMMON, "interval_s", "cpu_pct", "cpu_cores_effective", "cpu_throttled_ms", "cpu_throttled_periods",
    "mem_used_bytes", "mem_rss_bytes", "mem_limit_bytes", "mem_available_bytes", "mem_total_bytes",
    "disk_path", "disk_device", "disk_total_bytes", "disk_used_bytes", "disk_avail_bytes", "disk_used_pct",
    "disk_read_bps", "disk_write_bps", "cgroup_read_bps", "cgroup_write_bps", "self_rss_bytes",
    "self_cpu_pct"))

LOGS = Table("log_events", frozenset(), (
    *_COMMON, "level", "subsystem", "kind", "message", "detail", "otel_trace_id", "file", "file_offset"))

ERROR_TYPES = ("llm_error", "crash", "system_error")
ERROR_CATEGORIES = ("rate_limit", "timeout", "malformed_response", "api_failure", "process_crash",
                    "oom_kill", "unhandled_exception", "disk_full", "network_failure",
                    "permission_denied", "other")
SEVERITIES = ("debug", "info", "warning", "error", "critical")


def trace_row(r: Reader, received: int, source: str = "http") -> tuple:
    """The llm_traces row for one trace event, but for the truncated flag (the Reader knows it last)."""
    prompt, completion = r.count("prompt_tokens"), r.count("completion_tokens")
    total = r.count("total_tokens")
    if total is None and (prompt is not None or completion is not None):
        total = (prompt or 0) + (completion or 0)
    input_text, input_bytes = r.text("input_text")
    output_text, output_bytes = r.text("output_text")
    return (r.trace_id(), r.created_at(received), received, source,
            r.name("provider", required=True), r.name("model", required=True),
            r.choice("status", ("ok", "error"), "ok"), r.name("error_type"), r.name("finish_reason"),
            r.name("session_id"), prompt, completion, total, r.count("cache_read_tokens"),
            r.count("cache_write_tokens"), r.count("reasoning_tokens"), r.amount("cost_usd"),
            r.amount("latency_ms"), r.amount("ttft_ms"), input_text, input_bytes, output_text,
            output_bytes, r.metadata())


def error_row(r: Reader, received: int, source: str = "http") -> tuple:
    """The error_events row for one error event, but for the truncated flag."""
    message, message_bytes = r.text("message", required=True)
    stack, stack_bytes = r.text("stack_trace")
    return (r.trace_id(), r.created_at(received), received, source,
            r.choice("error_type", ERROR_TYPES), r.choice("category", ERROR_CATEGORIES, "other"),
            r.choice("severity", SEVERITIES, "error"), message, message_bytes, stack, stack_bytes,
            r.name("provider"), r.name("model"), r.name("session_id"), r.metadata())


def own_error(category: str, message: str, metadata: dict[str, Any], severity: str = "error",
              error_type: str = "system_error") -> Row:
    """An error event otrace raises itself (disk full, an OOM kill), validated like one from HTTP."""
    reader = Reader({"error_type": error_type, "category": category, "message": message,
                     "severity": severity, "metadata": metadata}, None, 16384)
    return Row(ERRORS.name, (*error_row(reader, now_ms(), source="otrace"), int(reader.truncated)))


ROW_BUILDERS: dict[str, tuple[Table, Callable[[Reader, int], tuple]]] = {
    "/v1/traces": (TRACES, trace_row), "/v1/errors": (ERRORS, error_row)}


def parse_events(body: bytes, path: str, max_events: int, max_text: int) -> tuple[list[Row], list[str]]:
    """Validate a request body (one event or an array of them) into rows, all or nothing."""
    table, build = ROW_BUILDERS[path]
    try:
        doc = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise Invalid("body is not UTF-8") from None
    except RecursionError:
        raise Invalid("body is nested too deeply") from None
    except ValueError as exc:
        raise Invalid(f"body is not valid JSON: {exc}") from None
    events, many = (doc, True) if isinstance(doc, list) else ([doc], False)
    if not events:
        raise Invalid("array holds no events")
    if len(events) > max_events:
        raise Invalid(f"array holds {len(events)} events; at most {max_events} (TRACE_MAX_EVENTS)",
                      status=413)
    received, rows, ignored = now_ms(), [], set()
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            raise Invalid("event must be a JSON object", None, index if many else None)
        reader = Reader(event, index if many else None, max_text)
        rows.append(Row(table.name, (*build(reader, received), int(reader.truncated))))
        ignored.update(key for key in event if key not in table.fields)
    return rows, sorted(ignored)


# ============================================================================================== store
# SQLite in WAL mode. One writer thread owns the only write connection and takes its work from a
# bounded EventQueue: batches of events, and jobs (writes other threads need) in between.

SCHEMA: list[str] = [
    # 1: the event tables, host metrics and the push log.
    """
    CREATE TABLE llm_traces (
        id INTEGER PRIMARY KEY,
        trace_id TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        source TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        status TEXT NOT NULL,
        error_type TEXT,
        finish_reason TEXT,
        session_id TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        total_tokens INTEGER,
        cache_read_tokens INTEGER,
        cache_write_tokens INTEGER,
        reasoning_tokens INTEGER,
        cost_usd REAL,
        latency_ms REAL,
        ttft_ms REAL,
        input_text TEXT,
        input_bytes INTEGER,
        output_text TEXT,
        output_bytes INTEGER,
        metadata TEXT,
        truncated INTEGER NOT NULL,
        synced INTEGER NOT NULL DEFAULT 0,
        pushed_at INTEGER
    );
    CREATE INDEX llm_traces_unsynced ON llm_traces (id) WHERE synced = 0;
    CREATE TABLE error_events (
        id INTEGER PRIMARY KEY,
        trace_id TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        source TEXT NOT NULL,
        error_type TEXT NOT NULL,
        category TEXT NOT NULL,
        severity TEXT NOT NULL,
        message TEXT NOT NULL,
        message_bytes INTEGER NOT NULL,
        stack_trace TEXT,
        stack_trace_bytes INTEGER,
        provider TEXT,
        model TEXT,
        session_id TEXT,
        metadata TEXT,
        truncated INTEGER NOT NULL,
        synced INTEGER NOT NULL DEFAULT 0,
        pushed_at INTEGER
    );
    CREATE INDEX error_events_unsynced ON error_events (id) WHERE synced = 0;
    CREATE TABLE system_metrics (
        id INTEGER PRIMARY KEY,
        trace_id TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        source TEXT NOT NULL,
        interval_s REAL,
        cpu_pct REAL,
        cpu_cores_effective REAL,
        cpu_throttled_ms REAL,
        cpu_throttled_periods INTEGER,
        mem_used_bytes INTEGER,
        mem_rss_bytes INTEGER,
        mem_limit_bytes INTEGER,
        mem_available_bytes INTEGER,
        mem_total_bytes INTEGER,
        disk_path TEXT,
        disk_device TEXT,
        disk_total_bytes INTEGER,
        disk_used_bytes INTEGER,
        disk_avail_bytes INTEGER,
        disk_used_pct REAL,
        disk_read_bps REAL,
        disk_write_bps REAL,
        cgroup_read_bps REAL,
        cgroup_write_bps REAL,
        self_rss_bytes INTEGER,
        self_cpu_pct REAL,
        synced INTEGER NOT NULL DEFAULT 0,
        pushed_at INTEGER
    );
    CREATE INDEX system_metrics_unsynced ON system_metrics (id) WHERE synced = 0;
    CREATE TABLE push_log (
        id INTEGER PRIMARY KEY,
        batch_id TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        duration_ms REAL NOT NULL,
        events INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        http_status INTEGER,
        error TEXT,
        retry_after_s REAL
    );
    CREATE INDEX push_log_started ON push_log (started_at);
    """,
    # 2: rows the receiver refused one by one (their synced is set to 2), with its reason.
    """
    CREATE TABLE push_rejects (
        id INTEGER PRIMARY KEY,
        table_name TEXT NOT NULL,
        row_id INTEGER NOT NULL,
        trace_id TEXT NOT NULL,
        rejected_at INTEGER NOT NULL,
        http_status INTEGER NOT NULL,
        reason TEXT
    );
    """,
    # 3: what retention deleted, per pass, table and reason; unpushed losses are pushed once.
    """
    CREATE TABLE retention_ledger (
        id INTEGER PRIMARY KEY,
        pass_id TEXT NOT NULL,
        at INTEGER NOT NULL,
        table_name TEXT NOT NULL,
        reason TEXT NOT NULL,
        deleted INTEGER NOT NULL,
        unsynced_deleted INTEGER NOT NULL,
        oldest_received_at INTEGER,
        newest_received_at INTEGER,
        reported_at INTEGER,
        UNIQUE (pass_id, table_name, reason)
    );
    CREATE INDEX retention_ledger_unreported ON retention_ledger (id)
        WHERE reported_at IS NULL AND unsynced_deleted > 0;
    """,
    # 4: counters otrace must remember across restarts (the last OOM kill counts it has seen).
    """
    CREATE TABLE otrace_state (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    """,
    # 5: events read from the gateway's log, and how far each log file has been read.
    """
    CREATE TABLE log_events (
        id INTEGER PRIMARY KEY,
        trace_id TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        source TEXT NOT NULL,
        level TEXT NOT NULL,
        subsystem TEXT,
        kind TEXT NOT NULL,
        message TEXT,
        detail TEXT,
        otel_trace_id TEXT,
        file TEXT NOT NULL,
        file_offset INTEGER NOT NULL,
        synced INTEGER NOT NULL DEFAULT 0,
        pushed_at INTEGER
    );
    CREATE INDEX log_events_unsynced ON log_events (id) WHERE synced = 0;
    CREATE TABLE log_offsets (
        id INTEGER PRIMARY KEY,
        dev INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        fingerprint TEXT NOT NULL,
        path TEXT NOT NULL,
        position INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        UNIQUE (dev, inode, fingerprint)
    );
    """,
]

EVENT_TABLES = ("llm_traces", "error_events", "system_metrics", "log_events")
SYNCED, REJECTED = 1, 2          # values of the synced column besides 0 (not yet pushed)
CACHE_KIB = 2048                 # per connection; otrace keeps at most three open


def connect(path: str) -> sqlite3.Connection:
    """Open the database with otrace's pragmas; transactions are explicit (BEGIN ... COMMIT)."""
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def open_database(path: str) -> None:
    """Create the database file (mode 0600) and bring its schema up to date, before any thread starts."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    conn = connect(path)
    try:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes only on a new file, before WAL mode
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise RuntimeError(f"{path}: cannot use WAL mode")
        migrate(conn)
    finally:
        conn.close()


def migrate(conn: sqlite3.Connection) -> None:
    """Apply the SCHEMA steps the file has not seen yet, each in its own transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(SCHEMA):
        raise RuntimeError(f"database schema {version} is newer than this otrace ({len(SCHEMA)})")
    for number, step in enumerate(SCHEMA[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, step.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("schema migrated", extra={"version": number})


class Row(collections.namedtuple("Row", "table values")):
    """One row on its way to a table."""


@dataclasses.dataclass(slots=True)
class Unit:
    """Rows that are committed together, with statements that must commit with them (a file offset)."""

    rows: list[Row]
    extra: tuple[tuple[str, tuple], ...] = ()
    arrived: float = 0.0

    def __len__(self) -> int:
        return len(self.rows)


@dataclasses.dataclass(slots=True)
class Job:
    """A function the writer runs on its connection between batches; its result goes to `future`."""

    run: Callable[[sqlite3.Connection], Any] | None   # None asks the writer to finish
    future: Future = dataclasses.field(default_factory=Future)


class EventQueue(queue.Queue):
    """A queue.Queue of Units, bounded in events, that a request enters whole or not at all.

    Its size counts every accepted event not yet committed: the ones waiting and the ones in the
    writer's hands, until the writer calls `done`. So TRACE_QUEUE_SIZE bounds what a crash can lose
    and what otrace holds in memory. It also holds the writer's Jobs, which are not counted and go
    first.

    And it keeps a gate for the GIL. A busy HTTP thread starves the writer thread: each of its SQLite
    calls gives the GIL away and must win it back from a thread that holds it for all but the
    moments of its system calls, so the queue fills and requests get 503. So once half the queue is
    waiting, the HTTP thread waits (GATE_WAIT at most) until the writer has drained it below one
    batch. A writer that does not drain it within GATE_WAIT is stuck, not starved (a lock, a slow
    disk): the gate stays open until it commits again.
    """

    GATE_WAIT = 0.05

    def __init__(self, capacity: int, batch_size: int) -> None:
        super().__init__(capacity)
        self.batch_size = batch_size
        self.high_water = max(batch_size, capacity // 2)
        self.jobs: collections.deque[Job] = collections.deque()
        self.room = threading.Event()
        self.room.set()
        self.writer_stuck = False
        self.closed = False

    def _init(self, maxsize: int) -> None:
        self.queue: collections.deque[Unit] = collections.deque()
        self.waiting = 0         # events in self.queue
        self.uncommitted = 0     # waiting + taken by the writer and not yet done

    def _qsize(self) -> int:
        return self.uncommitted

    def _put(self, unit: Unit) -> None:
        self.queue.append(unit)
        self.waiting += len(unit)
        self.uncommitted += len(unit)

    def _get(self) -> Unit:
        unit = self.queue.popleft()
        self.waiting -= len(unit)
        return unit

    def offer(self, unit: Unit) -> bool:
        """Enqueue the unit if all its events fit (or nothing is uncommitted); never blocks."""
        with self.mutex:
            if self.closed or (self.uncommitted and self.uncommitted + len(unit) > self.maxsize):
                return False
            unit.arrived = time.monotonic()
            was_empty = not self.waiting
            self._put(unit)
            self.unfinished_tasks += 1
            if self.waiting >= self.high_water and not self.writer_stuck:
                self.room.clear()
            if was_empty or self.waiting >= self.batch_size:
                self.not_empty.notify()
            return True

    def done(self, unit: Unit) -> None:
        """The writer committed the unit (or gave up on its rows): it no longer counts."""
        with self.mutex:
            self.uncommitted -= len(unit)
        self.task_done()

    def wait_for_room(self) -> None:
        """Called by the HTTP thread before an ingest request: yield the GIL while the writer is behind."""
        if not self.room.is_set() and not self.room.wait(self.GATE_WAIT):
            with self.mutex:
                self.writer_stuck = True
            self.room.set()

    def open_gate(self) -> None:
        """The writer has committed: the HTTP thread may go on once the writer has caught up."""
        with self.mutex:
            self.writer_stuck = False
            if self.waiting < self.batch_size or self.closed:
                self.room.set()

    def submit(self, run: Callable[[sqlite3.Connection], Any] | None) -> Future:
        """Hand the writer a job; jobs are never refused and run before the next batch."""
        job = Job(run)
        with self.mutex:
            self.jobs.append(job)
            self.not_empty.notify()
        return job.future

    def next_work(self, batch_size: int, window: float, idle: float) -> Job | list[Unit]:
        """The writer's next job, or its next batch: whole units until batch_size events, waiting at
        most `window` after the oldest arrived. An empty list after `idle` seconds with nothing to do."""
        with self.not_empty:
            end = time.monotonic() + idle
            while not (self.jobs or self.queue):
                left = end - time.monotonic()
                if left <= 0:
                    return []
                self.not_empty.wait(left)     # closed or not: jobs still come, and the last is None
            if self.jobs:
                return self.jobs.popleft()
            due = self.queue[0].arrived + window
            while self.waiting < batch_size and not self.jobs and not self.closed:
                left = due - time.monotonic()
                if left <= 0:
                    break
                self.not_empty.wait(left)
            batch = [self._get()]
            taken = len(batch[0])
            while self.queue and taken + len(self.queue[0]) <= batch_size:
                taken += len(self.queue[0])
                batch.append(self._get())
            return batch

    def next_job(self, timeout: float) -> Job | None:
        """The next job, waiting at most `timeout` (the writer's wait between retries of a batch)."""
        with self.not_empty:
            if not self.jobs and timeout > 0:
                self.not_empty.wait(timeout)
            return self.jobs.popleft() if self.jobs else None

    def close(self) -> None:
        """Refuse new events from now on (shutdown); jobs are still taken."""
        with self.mutex:
            self.closed = True
            self.not_empty.notify_all()
        self.room.set()

    def wait_drained(self, timeout: float) -> bool:
        """Wait until every unit put so far has been committed (or given up on)."""
        with self.all_tasks_done:
            return self.all_tasks_done.wait_for(lambda: not self.unfinished_tasks, max(timeout, 0))


class Counters:
    """Tallies shared between threads (the handlers, the writer, /health)."""

    EVENTS = ("received", "persisted", "duplicate", "refused", "rejected", "dropped")

    def __init__(self, names: Iterable[str] = (*EVENTS, "connections_refused")) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


# SQLite result codes that mean "the environment, not this row": retry the batch as it is.
TRANSIENT_CODES = {"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY",
                   "SQLITE_CANTOPEN", "SQLITE_NOMEM", "SQLITE_PROTOCOL", "SQLITE_CORRUPT",
                   "SQLITE_NOTADB", "SQLITE_PERM", "SQLITE_INTERRUPT", "SQLITE_ABORT"}


def primary_code(name: str) -> str:
    """SQLite's primary result code of an extended one: SQLITE_IOERR_WRITE is SQLITE_IOERR."""
    return "_".join(name.split("_")[:2])


def is_transient(exc: BaseException) -> bool:
    """True when a failed write should be retried as it is; False when a row's own data is to blame
    (a constraint, or a value SQLite cannot bind)."""
    name = getattr(exc, "sqlite_errorname", None)
    if name:
        return primary_code(name) in TRANSIENT_CODES
    return isinstance(exc, (sqlite3.OperationalError, OSError, MemoryError))


class Reserve:
    """Space held back on the database's filesystem: a file of TRACE_DISK_RESERVE_BYTES beside it. On
    the first disk-full write it is deleted, so the batch and the queue behind it can commit; ingest
    answers 503 while it is released, and it is taken back once the disk has room for it four times.
    A reserve there was no room for at start is taken the same way, without holding ingest back."""

    def __init__(self, db_path: str, size: int) -> None:
        self.path, self.size = Path(db_path + "-reserve"), size
        self.held = False
        self.released = False
        self.next_try = 0.0

    def hold(self) -> bool:
        """Make sure the file holds its full size (allocated, not sparse). False if there is no room."""
        if not self.size:
            return True
        with contextlib.suppress(OSError):
            if self.path.stat().st_blocks * 512 >= self.size:
                self.held, self.released = True, False
                return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            self.path.unlink(missing_ok=True)
            return False
        self.held, self.released = True, False
        return True

    def release(self) -> bool:
        """Give the space to the database; True if it was held."""
        if not self.held:
            return False
        self.held, self.next_try = False, time.monotonic() + 1.0
        try:
            self.path.unlink()
        except OSError:              # gone: nothing to give
            return False
        self.released = True
        return True

    def retake(self) -> bool:
        """When not held: take the space (back) once the disk has room for it four times over; tried
        at most once a second."""
        if not self.size or self.held or time.monotonic() < self.next_try:
            return False
        self.next_try = time.monotonic() + 1.0
        return disk_usage(str(self.path.parent))[2] >= 4 * self.size and self.hold()


class Writer(threading.Thread):
    """The one thread that writes to SQLite: batches of events in one transaction each, and jobs.

    A failed batch never kills it: an environment fault (disk full, I/O error, lock) keeps the batch and
    retries it with backoff while /health says degraded; a row whose own data cannot be written is
    logged whole and dropped without taking its batch-mates with it.
    """

    STUCK_AFTER = 15.0           # seconds without a loop iteration before /health calls it stuck

    def __init__(self, config: Config, events: EventQueue, counters: Counters) -> None:
        super().__init__(name="otrace-writer", daemon=True)
        self.config, self.events, self.counters = config, events, counters
        self.batch_size, self.window = config.batch_size, config.batch_window
        self.pending: list[Unit] = []
        self.fault = FaultLog(logging.getLogger("otrace.writer"), "database write")
        self.backoff = Backoff(0.05, 5.0)
        self.heartbeat = time.monotonic()
        self.conn: sqlite3.Connection | None = None
        self.on_fault: Callable[[str], None] = lambda error: None   # told once per streak of failures
        self.reserve = Reserve(config.db_path, config.disk_reserve_bytes)

    # -- state for /health
    @property
    def stuck(self) -> bool:
        return time.monotonic() - self.heartbeat > self.STUCK_AFTER + self.window

    def run(self) -> None:
        self.conn = connect(self.config.db_path)
        self.conn.execute(f"PRAGMA journal_size_limit = {self.config.wal_max_bytes}")  # per connection
        page = self.conn.execute("PRAGMA page_size").fetchone()[0]
        self.conn.execute(f"PRAGMA wal_autocheckpoint = {autocheckpoint_pages(self.config, page)}")
        retry_at = 0.0
        try:
            while True:
                self.heartbeat = time.monotonic()
                if not self.pending:              # the last batch committed: the disk has room
                    self.retake_reserve()
                if self.pending:
                    work = self.events.next_job(retry_at - time.monotonic()) or []
                else:
                    work = self.events.next_work(self.batch_size, self.window, idle=1.0)
                if isinstance(work, Job):
                    if work.run is None:
                        work.future.set_result(None)
                        return
                    self.run_job(work)
                    continue
                self.pending += work
                if not self.pending or time.monotonic() < retry_at:
                    continue
                try:
                    self.flush()
                except Exception as exc:  # noqa: BLE001 - any failure keeps the batch for a retry
                    error = describe(exc)
                    if self.fault.error is None:
                        self.on_fault(error)
                    self.fault.failed(error)
                    self.events.room.set()     # nothing to gain from holding the HTTP thread back now
                    retry_at = time.monotonic() + self.backoff.next()
                    if error.startswith("SQLITE_FULL") and self.reserve.release():
                        self.fault.logger.warning("disk full: reserve released; ingest paused", extra={
                            "bytes": self.reserve.size, "queued_events": self.events.qsize()})
                        retry_at = 0.0         # the space is there now: write what was accepted
                    continue
                if self.fault.error is not None:
                    self.record_outage()
                self.fault.cleared()
                self.backoff.reset()
                self.events.open_gate()
        finally:
            self.conn.close()

    def retake_reserve(self) -> None:
        released = self.reserve.released
        if self.reserve.retake():
            self.fault.logger.warning("disk reserve held again: ingest resumes" if released else
                                      "disk reserve held", extra={"bytes": self.reserve.size})

    def record_outage(self) -> None:
        """Once writes work again, store what stopped them as an error event (ERRC-05)."""
        error, name = self.fault.error or "", (self.fault.error or "").split(":", 1)[0]
        category = {"SQLITE_FULL": "disk_full", "SQLITE_READONLY": "permission_denied",
                    "SQLITE_PERM": "permission_denied", "SQLITE_CANTOPEN": "permission_denied",
                    }.get(primary_code(name), "other")
        row = own_error(category, f"database writes failed for {time.time() - self.fault.since:.1f} s: "
                        f"{error}", {"since": _iso(self.fault.since), "attempts": self.fault.count,
                                     "db_path": self.config.db_path}, severity="critical")
        try:
            self.commit([Unit([row])])
        except Exception as exc:  # noqa: BLE001 - the outage is in the log either way
            self.fault.logger.error("could not record the write outage", extra={"error": describe(exc)})

    def run_job(self, job: Job) -> None:
        if job.future.set_running_or_notify_cancel():
            try:
                job.future.set_result(job.run(self.conn))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the job
                rollback(self.conn)
                job.future.set_exception(exc)

    def flush(self) -> None:
        """Commit the pending units, in one transaction if their data allows. Units leave `pending` as
        they commit; an environment fault raises and leaves the rest for a retry."""
        try:
            self.commit(self.pending)
        except Exception as exc:
            if is_transient(exc):
                raise
            while self.pending:          # a row's data is to blame: find it, unit by unit
                self.commit_alone(self.pending[0])
                self.events.done(self.pending.pop(0))
            return
        for unit in self.pending:
            self.events.done(unit)
        self.pending = []

    def commit_alone(self, unit: Unit) -> None:
        """Commit one unit; if its data fails, commit its rows one by one and drop the ones that fail."""
        try:
            self.commit([unit])
            return
        except Exception as exc:
            if is_transient(exc):
                raise
        for row in unit.rows:
            try:
                self.commit([Unit([row])])
            except Exception as exc:
                if is_transient(exc):
                    raise
                self.drop(row, exc)
        if unit.extra:
            self.commit([Unit([], unit.extra)])

    def commit(self, units: list[Unit]) -> None:
        conn = self.conn
        by_table: dict[str, list[tuple]] = {}
        for unit in units:
            for row in unit.rows:
                by_table.setdefault(row.table, []).append(row.values)
        conn.execute("BEGIN IMMEDIATE")
        try:
            inserted = sum(insert_rows(conn, table, values) for table, values in by_table.items())
            for unit in units:
                for sql, params in unit.extra:
                    conn.execute(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
        total = sum(map(len, by_table.values()))
        self.counters.add("persisted", inserted)
        self.counters.add("duplicate", total - inserted)

    def drop(self, row: Row, exc: BaseException) -> None:
        """Give up on a row SQLite refuses for its own data: logged whole, counted in /health."""
        self.fault.logger.error("row cannot be stored; dropped", extra={
            "table": row.table, "error": describe(exc), "row": repr(row.values)})
        self.counters.add("dropped")


TABLES = {table.name: table for table in (TRACES, ERRORS, METRICS, LOGS)}
ROWS_PER_INSERT = 32             # x 26 columns at most: under the 999 variables older SQLite allows


@functools.cache
def insert_sql(table: str, rows: int = 1) -> str:
    """An INSERT of `rows` rows into `table` that skips trace_ids already stored."""
    columns = TABLES[table].columns
    marks = ", ".join(["(" + ", ".join("?" * len(columns)) + ")"] * rows)
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {marks} ON CONFLICT(trace_id) DO NOTHING"


def insert_rows(conn: sqlite3.Connection, table: str, values: list[tuple]) -> int:
    """Insert rows 32, 16, ..., 1 at a time, a multi-row statement each; how many were new.

    Not executemany: that steps SQLite once per row, and every step gives the GIL away and must win
    it back from the busy HTTP thread. Measured under 4 clients: 18 % more events/s this way. Six
    statement shapes per table stay in sqlite3's statement cache."""
    inserted = start = 0
    while start < len(values):
        size = min(ROWS_PER_INSERT, 1 << (len(values) - start).bit_length() - 1)
        params = [value for row in values[start:start + size] for value in row]
        inserted += conn.execute(insert_sql(table, size), params).rowcount
        start += size
    return inserted


def autocheckpoint_pages(config: Config, page_size: int) -> int:
    """WAL pages after which a commit checkpoints: SQLite's 1,000 (4 MiB), or under a small cap a
    fortieth of TRACE_DB_MAX_BYTES (or a quarter of TRACE_WAL_MAX_BYTES), so the WAL stays a small
    share of what the cap counts."""
    return max(16, min(1000, config.db_max_bytes // 40 // page_size, config.wal_max_bytes // 4 // page_size))


def rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):  # no transaction was open, or it is already gone
        conn.execute("ROLLBACK")


def describe(exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    return f"{name or type(exc).__name__}: {exc}"


# ============================================================================================= ingest
# An HTTPServer on loopback whose one thread serves every connection through epoll: it reads without
# blocking until a request's head, then its body, is wholly in memory, and hands each to the stdlib's
# BaseHTTPRequestHandler machinery. So no client can hold a thread, and no crowd of handler threads
# takes the GIL from the writer: with a thread per connection, 16 and 64 clients got fewer events/s
# through than 4. A handler validates the rows, offers them to the queue whole, and answers in one
# write with TCP_NODELAY; it never waits on a full queue.

HEAD_LIMIT = 65536               # request line and headers that otrace holds while waiting for their end
READ_CHUNK = 65536


class Outbox(bytearray):
    """Bytes waiting to go to a client: the handler's wfile."""

    write = bytearray.extend


@dataclasses.dataclass(eq=False, slots=True)
class Connection:
    """One client connection: what has arrived of its next request, what is still to be sent to it."""

    sock: socket.socket
    handler: IngestHandler
    deadline: float                    # the client must finish its request or take its answer by then
    inbox: bytearray = dataclasses.field(default_factory=bytearray)
    body_length: int | None = None     # the body awaited once a head has been read; None: awaiting a head
    mask: int = 0                      # the epoll events it is registered for

    @property
    def idle(self) -> bool:
        """Between requests, with nothing received, arrived unread or left to send: at shutdown it is
        closed at once."""
        if self.inbox or self.body_length is not None or self.handler.wfile:
            return False
        try:
            return not self.sock.recv(1, socket.MSG_PEEK)     # b"": the client has hung up
        except OSError:                                       # nothing has arrived (or it is broken)
            return True

    def take_head(self, at_eof: bool) -> tuple[bytes, bool] | None:
        """The next request's head when its end is in (or can never come); else None. The flag says
        whether the head is complete."""
        inbox = self.inbox
        ends = [i for i in (inbox.find(b"\n\r\n"), inbox.find(b"\n\n")) if i >= 0]
        if ends:
            end = min(ends)                            # the last header line's \n, then \r\n or \n
            return self.take(end + (2 if inbox[end + 1] == 10 else 3)), True
        if at_eof or len(inbox) > HEAD_LIMIT:
            return self.take(len(inbox)), False
        return None

    def take(self, n: int) -> bytes:
        data = bytes(self.inbox[:n])
        self.inbox = self.inbox[n:]
        return data


ROUTES = {"/v1/traces": ("POST",), "/v1/errors": ("POST",), "/health": ("GET", "HEAD"),
          "/metrics": ("GET", "HEAD")}
STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}" for s in HTTPStatus}
_date = [0, ""]                  # [second, its Date header]: formatted once a second, not per answer


def http_date() -> str:
    second = int(time.time())
    if _date[0] != second:
        _date[:] = [second, "Date: " + email.utils.formatdate(second, usegmt=True)]
    return _date[1]


PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
EVENT_HELP = {"received": "Events accepted (answered 202).", "persisted": "Events written to SQLite.",
              "duplicate": "Events already stored under their trace_id.",
              "refused": "Events refused with 503 because the queue was full.",
              "rejected": "Requests refused for bad input (4xx).",
              "dropped": "Rows SQLite refused for their own data, logged and dropped."}
HOST_GAUGES = {   # /health "host" column -> (metric, help, scale)
    "cpu_pct": ("host_cpu_percent", "CPU used, as a share of the cgroup's allowance.", 1),
    "cpu_cores_effective": ("host_cpu_cores", "CPUs the cgroup may use (quota, cpuset, online).", 1),
    "cpu_throttled_ms": ("host_cpu_throttled_seconds", "Time throttled during the last interval.", 0.001),
    "mem_used_bytes": ("host_memory_used_bytes", "Working set: usage less inactive file cache.", 1),
    "mem_rss_bytes": ("host_memory_rss_bytes", "Anonymous memory.", 1),
    "mem_limit_bytes": ("host_memory_limit_bytes", "Memory limit (the host's total when unlimited).", 1),
    "mem_available_bytes": ("host_memory_available_bytes", "Limit less working set.", 1),
    "mem_total_bytes": ("host_memory_total_bytes", "The host's MemTotal.", 1),
    "disk_total_bytes": ("host_disk_total_bytes", "Size of the filesystem holding the database.", 1),
    "disk_used_bytes": ("host_disk_used_bytes", "Space used on it.", 1),
    "disk_avail_bytes": ("host_disk_avail_bytes", "Space free for unprivileged users.", 1),
    "disk_used_pct": ("host_disk_used_percent", "Used / (used + available), as df counts it.", 1),
    "disk_read_bps": ("host_disk_read_bytes_per_second", "Block device reads.", 1),
    "disk_write_bps": ("host_disk_write_bytes_per_second", "Block device writes.", 1),
    "cgroup_read_bps": ("host_cgroup_read_bytes_per_second", "Reads by the cgroup.", 1),
    "cgroup_write_bps": ("host_cgroup_write_bytes_per_second", "Writes by the cgroup.", 1),
    "self_rss_bytes": ("self_rss_bytes", "otrace's own resident memory.", 1),
    "self_cpu_pct": ("self_cpu_percent", "otrace's own CPU, as a share of one core.", 1),
}


def prometheus(report: dict[str, Any]) -> str:
    """The /health report as Prometheus text: otrace's own counters and the newest host sample."""
    lines: list[str] = []

    def add(name: str, kind: str, text: str, *samples: tuple[str, Any]) -> None:
        samples = tuple((labels, value) for labels, value in samples if value is not None)
        if samples:
            lines.extend((f"# HELP otrace_{name} {text}", f"# TYPE otrace_{name} {kind}"))
            lines.extend(f"otrace_{name}{labels} {float(value):g}" for labels, value in samples)

    add("info", "gauge", "otrace's version.", (f'{{version="{report["version"]}"}}', 1))
    add("healthy", "gauge", "1 when /health says ok.", ("", report["status"] == "ok"))
    add("uptime_seconds", "gauge", "Time since start.", ("", report["uptime_seconds"]))
    for name, text in EVENT_HELP.items():
        add(f"events_{name}_total", "counter", text, ("", report[f"events_{name}"]))
    add("connections_refused_total", "counter", "Connections over TRACE_MAX_CONNECTIONS.",
        ("", report["connections_refused"]))
    add("queue_depth_events", "gauge", "Events accepted and not yet committed.", ("", report["queue_depth"]))
    add("queue_capacity_events", "gauge", "TRACE_QUEUE_SIZE.", ("", report["queue_capacity"]))
    add("unsynced_events", "gauge", "Rows not yet pushed.", ("", report["unsynced_count"]))
    add("db_size_bytes", "gauge", "Database file size.", ("", report["db_size_bytes"]))
    add("wal_size_bytes", "gauge", "WAL file size.", ("", report["wal_size_bytes"]))
    if push := report["push"]:
        add("push_events_total", "counter", "Events confirmed by the receiver.", ("", push["events_pushed"]))
        add("push_consecutive_failures", "gauge", "Failed push cycles in a row.",
            ("", push["consecutive_failures"]))
        add("push_breaker_open", "gauge", "1 while the circuit breaker is open.",
            ("", push["breaker"] == "open"))
    add("retention_unpushed_deleted_total", "counter", "Rows retention deleted before they were pushed.",
        *((f'{{table="{table}"}}', n) for table, n in report["retention"]["unpushed_deleted_total"].items()))
    for column, (name, text, scale) in HOST_GAUGES.items():
        value = (report["host"] or {}).get(column)
        add(name, "gauge", text, ("", None if value is None else value * scale))
    return "\n".join(lines) + "\n"


def is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


MAX_LINE, MAX_HEADERS = 65536, 100     # the stdlib's limits: a request line or header line, headers


class IngestHandler(BaseHTTPRequestHandler):
    """The requests of one client connection: HTTP/1.1 keep-alive, JSON in and out. It never touches
    the socket: IngestServer gives it each request's head, then its body, and sends what it wrote."""

    protocol_version = "HTTP/1.1"
    server_version = f"otrace/{__version__}"
    sys_version = ""
    headers: dict[str, str]                # by lower-case name

    def __init__(self, server: IngestServer, address: Any) -> None:   # not the stdlib's: no handle()
        self.server, self.client_address = server, address
        self.wfile = Outbox()
        self.command, self.path, self.request_version = "", "", "HTTP/1.1"
        self.route = ""                    # the path without its query: a key of ROUTES
        self.close_connection = False

    def read_head(self, raw: bytes, complete: bool) -> int | None:
        """Read a request's line and headers: how many body bytes to wait for, or None once it is
        answered (an error; the connection then closes). `complete`: the head's blank line is in."""
        self.rfile = io.BytesIO(raw)
        self.command, self.request_version, self.close_connection = "", "HTTP/1.1", True
        self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
        if len(self.raw_requestline) > MAX_LINE:
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return None
        if not complete and len(raw) > HEAD_LIMIT and self.raw_requestline.endswith(b"\n"):
            self.send_error(431, f"request line and headers are over {HEAD_LIMIT} bytes")
            return None
        if not self.parse_request():
            return None
        self.route = path = self.path.split("?", 1)[0]
        if path not in ROUTES:
            self.refuse(404, f"no such path: {path}")
            return None
        if self.command not in ROUTES[path]:
            self.refuse(405, f"{self.command} is not allowed on {path}", {"Allow": ", ".join(ROUTES[path])})
            return None
        if self.command != "POST":
            return 0
        token = self.server.service.config.ingest_token
        if token and not self.authorized(token):
            self.refuse(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            return None
        length = self.body_length(self.server.service.config.max_body_bytes)
        if length and self.headers.get("expect", "").lower() == "100-continue" and \
                self.request_version == "HTTP/1.1":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return length

    def parse_request(self) -> bool:
        """The request line and headers; False once an error has been answered. Headers go into a
        dict by lower-case name (the first of a repeated one) read by a plain loop: the email parser
        the stdlib uses here costs more than all the rest of an ingest request."""
        self.requestline = self.raw_requestline.decode("latin-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or words[2] not in ("HTTP/1.1", "HTTP/1.0"):
            self.send_error(400, f"not an HTTP/1.1 request line: {self.requestline[:200]!r}")
            return False
        self.command, self.path, self.request_version = words
        self.headers = headers = {}
        for _ in range(MAX_HEADERS + 1):
            line = self.rfile.readline(MAX_LINE + 1)
            if line in (b"\r\n", b"\n"):
                break
            if len(line) > MAX_LINE:
                self.send_error(431, f"a header line is over {MAX_LINE} bytes")
                return False
            if not line.endswith(b"\n"):               # the client hung up before the blank line
                self.send_error(400, "the request ended inside its headers")
                return False
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip():
                self.send_error(400, f"bad header line: {line[:200]!r}")
                return False
            name, value = name.lower(), value.strip()
            if headers.setdefault(name, value) != value and name in ("content-length", "transfer-encoding"):
                self.send_error(400, f"conflicting {name} headers")
                return False
        else:
            self.send_error(431, f"more than {MAX_HEADERS} headers")
            return False
        connection = headers.get("connection", "").lower()
        self.close_connection = connection == "close" or (
            self.request_version == "HTTP/1.0" and connection != "keep-alive")
        return True

    def body_length(self, limit: int) -> int | None:
        """The length the body will have, or None once an error has been answered (415, 411, 400, 413):
        all of them before a byte of the body is read."""
        content_type = self.headers.get("content-type")
        length = self.headers.get("content-length")
        if content_type and not is_json_type(content_type):
            self.refuse(415, f"content type must be application/json, not {content_type}")
        elif length is None or self.headers.get("transfer-encoding"):
            self.refuse(411, "Content-Length is required")
        elif not length.isdigit():
            self.refuse(400, "Content-Length must be a number of bytes")
        elif int(length) > limit:
            self.refuse(413, f"body of {length} bytes is over {limit} (TRACE_MAX_BODY_BYTES)")
        else:
            return int(length)
        self.server.service.counters.add("rejected")
        return None

    def answer(self, body: bytes, length: int) -> None:
        """Answer the request whose head was read last, given its body (short if the client hung up)."""
        service = self.server.service
        if self.route == "/health":
            report = service.health()
            self.reply(200 if report["status"] == "ok" else 503, report)
        elif self.route == "/metrics":
            self.reply(200, prometheus(service.health()).encode(), content_type=PROMETHEUS_TYPE)
        elif len(body) < length:
            service.counters.add("rejected")
            self.refuse(400, f"body ended after {len(body)} of {length} bytes")
        else:
            self.ingest(body)

    def ingest(self, body: bytes) -> None:
        """POST /v1/traces and /v1/errors: validate, offer the rows to the queue whole, answer."""
        service = self.server.service
        config = service.config
        service.events.wait_for_room()
        try:
            rows, ignored = parse_events(body, self.route, config.max_events, config.max_text_bytes)
        except Invalid as bad:
            service.counters.add("rejected")
            self.reply(bad.status, bad.body())
            return
        if service.writer.fault.error or service.writer.reserve.released:   # a 202 promises a commit
            service.counters.add("refused", len(rows))
            self.reply(503, {"error": "database writes are failing (disk full?); retry later", "field": None},
                       {"Retry-After": "5"})
            return
        if not service.events.offer(Unit(rows)):
            service.counters.add("refused", len(rows))
            self.reply(503, {"error": "queue is full; retry later", "field": None}, {"Retry-After": "1"})
            return
        service.counters.add("received", len(rows))
        answer: dict[str, Any] = {"accepted": len(rows), "trace_ids": [row.values[0] for row in rows]}
        if ignored:
            answer["ignored_fields"] = ignored
        self.reply(202, answer)

    def authorized(self, token: str) -> bool:
        given = self.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        import hmac  # noqa: PLC0415 - imported where needed (see the imports)
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode("utf-8", "surrogateescape"), token.encode())

    def refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        """Answer an error without reading the body; the connection closes, as the body is unread."""
        self.close_connection = True
        self.reply(status, {"error": message, "field": None}, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found while parsing the request line and headers, as JSON. Never a 5xx: a request
        otrace cannot parse is the client's to fix."""
        self.close_connection = True
        if code >= 500:
            code = 400
        self.reply(code, {"error": message or HTTPStatus(code).phrase, "field": None})

    def reply(self, status: int, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        """Write the whole response, to be sent in one piece."""
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        if self.server.closing:
            self.close_connection = True
        lines = [STATUS_LINES.get(status) or f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
                 f"Server: {self.server_version}", http_date(), f"Content-Type: {content_type}",
                 f"Content-Length: {len(payload)}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if self.command == "HEAD" else head + payload)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request", extra={"method": self.command, "path": self.path, "status": status,
                                        "client": self.client_address[0]})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        log.debug(format % args)


_BUSY_BODY = b'{"error": "too many connections; retry later", "field": null}'
TOO_MANY_CONNECTIONS = b"\r\n".join([
    b"HTTP/1.1 503 Service Unavailable", b"Retry-After: 1", b"Content-Type: application/json",
    b"Content-Length: %d" % len(_BUSY_BODY), b"Connection: close", b"", _BUSY_BODY])
IN, OUT = select.EPOLLIN, select.EPOLLOUT


class IngestServer(HTTPServer):
    """The HTTP server: one thread, at most TRACE_MAX_CONNECTIONS connections. It hangs up on a client
    that takes longer than TRACE_READ_TIMEOUT to send a whole request or to take its answer, and at
    shutdown closes the idle connections and finishes the busy ones."""

    request_queue_size = 128

    def __init__(self, service: Service) -> None:
        config = service.config
        self.service = service
        self.limit, self.read_timeout = config.max_connections, config.read_timeout
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), IngestHandler)
        self.socket.setblocking(False)
        self.listener = self.socket.fileno()
        self.poller = select.epoll()
        self.poller.register(self.listener, IN)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller.register(self.wake_r, IN)
        self.open: dict[int, Connection] = {}
        self.chunk = memoryview(bytearray(READ_CHUNK))
        self.accept_fault = FaultLog(log, "accepting connections")
        self.closing = False
        self.close_by = math.inf
        self.cut = 0
        self.stopped = threading.Event()

    def serve_forever(self, poll_interval: float = 0.0) -> None:
        """The server's thread: wait for sockets, serve what is ready, hang up on clients past their
        deadline; until shutdown has closed every connection (or its time is up). `poll_interval` is
        the stdlib's and unused: a write to the wake-up pipe ends the wait."""
        tick = min(1.0, self.read_timeout / 4)
        next_reap = time.monotonic() + tick
        try:
            while not (self.closing and (not self.open or time.monotonic() >= self.close_by)):
                timeout = min(tick, self.close_by - time.monotonic()) if self.closing else tick
                for fd, events in self.poller.poll(max(0.0, timeout)):
                    self.on_ready(fd, events)
                if (now := time.monotonic()) >= next_reap:
                    next_reap = now + tick
                    for conn in [c for c in self.open.values() if c.deadline < now]:
                        self.hang_up(conn)
            self.cut = len(self.open)
            for conn in list(self.open.values()):
                self.hang_up(conn)
        except Exception:                # a bug: say so; shutdown still writes the queue
            log.exception("http server failed")
        finally:
            self.poller.close()
            self.socket.close()
            self.stopped.set()

    def on_ready(self, fd: int, events: int) -> None:
        conn = self.open.get(fd)
        try:
            if conn:
                self.serve(conn, events)
            elif fd == self.listener and not self.closing:
                self.accept()
            elif fd == self.wake_r:
                self.begin_closing()
        except Exception:                # a request never takes the server down
            log.exception("request failed", extra={"client": conn and conn.handler.client_address[0]})
            if conn:
                self.hang_up(conn)

    def accept(self) -> None:
        while True:
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.accept_fault.failed(describe(exc))   # the client waits in the backlog
                    time.sleep(0.05)                          # rather than spin on a listener ready
                    return
                continue                                      # that client gave up
            self.accept_fault.cleared()
            if len(self.open) >= self.limit:
                self.service.counters.add("connections_refused")
                with contextlib.suppress(OSError):
                    sock.sendall(TOO_MANY_CONNECTIONS)
                self.shutdown_request(sock)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            deadline = time.monotonic() + self.read_timeout
            self.open[sock.fileno()] = Connection(sock, IngestHandler(self, address), deadline, mask=IN)
            self.poller.register(sock.fileno(), IN)

    def serve(self, conn: Connection, events: int) -> None:
        """Send what is left of the last answer; read what the client sent; answer every request that
        is now whole, in order, one at a time (the next once the last is sent)."""
        handler = conn.handler
        if handler.wfile and not self.send(conn):
            return
        at_eof = False
        if events & ~OUT:
            try:
                n = conn.sock.recv_into(self.chunk)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.hang_up(conn)
                return
            conn.inbox += self.chunk[:n]
            at_eof = not n
        while True:
            if conn.body_length is None:
                head = conn.take_head(at_eof) if conn.inbox else None
                if head is None:
                    break
                conn.deadline = time.monotonic() + self.read_timeout
                conn.body_length = handler.read_head(*head)
                if (handler.wfile or conn.body_length is None) and not self.send(conn):
                    return                                 # an error answered (it closes), or 100 Continue
            if len(conn.inbox) < conn.body_length and not at_eof:
                break
            length, conn.body_length = conn.body_length, None
            handler.answer(conn.take(length), length)
            conn.deadline = time.monotonic() + self.read_timeout
            if not self.send(conn):
                return
        if at_eof or (self.closing and conn.idle):
            self.hang_up(conn)

    def send(self, conn: Connection) -> bool:
        """Send what the handler wrote. True once it is all sent and the connection stays open; False
        when the rest must wait for the client to take it, or the connection is closed."""
        out = conn.handler.wfile
        try:
            del out[:conn.sock.send(out)]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.hang_up(conn)
            return False
        if not out and conn.handler.close_connection:
            self.hang_up(conn)
            return False
        mask = OUT if out else IN
        if mask != conn.mask:
            conn.mask = mask
            self.poller.modify(conn.sock.fileno(), mask)
        return not out

    def hang_up(self, conn: Connection) -> None:
        if self.open.pop(conn.sock.fileno(), None) is not None:
            with contextlib.suppress(OSError):
                self.poller.unregister(conn.sock.fileno())
            self.shutdown_request(conn.sock)

    def begin_closing(self) -> None:
        """Shutdown: stop accepting, close the idle connections; the busy ones finish by close_by."""
        os.read(self.wake_r, 64)
        if self.closing:
            return
        self.closing = True
        self.poller.unregister(self.listener)
        for conn in [c for c in self.open.values() if c.idle]:
            self.hang_up(conn)

    def close(self, until: float) -> int:
        """Stop serving (called from another thread): returns once every connection is closed, the
        ones still busy at `until` cut off; how many were cut."""
        self.close_by = until
        os.write(self.wake_w, b"x")
        if self.stopped.wait(max(0.0, until - time.monotonic()) + 1.0):
            for fd in (self.wake_r, self.wake_w):
                os.close(fd)
        return self.cut

    def count(self) -> int:
        return len(self.open)


# ========================================================================================= collectors
# Host metrics, read from the files the kernel writes, like node_exporter's collectors: every reader
# takes its procfs and sysfs roots, so trees of files captured from real machines test it. Inside a
# container the figures are the cgroup's (v2, v1 or a hybrid of both), on a VM they come from /proc.


def read_text(path: Path) -> str | None:
    """A small kernel file's text, or None if it is missing or unreadable."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def read_int(path: Path) -> int | None:
    text = read_text(path)
    try:
        return int(text.split()[0]) if text and text.strip() else None
    except ValueError:
        return None


def read_keyed(path: Path) -> dict[str, int]:
    """A flat-keyed file ("name value" per line: cpu.stat, memory.stat, /proc/vmstat, ...)."""
    values = {}
    for line in (read_text(path) or "").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].lstrip("-").isdigit():
            values[parts[0].rstrip(":")] = int(parts[1])
    return values


def count_cpus(cpulist: str | None) -> int | None:
    """How many CPUs a list like "0-3,8" names."""
    if not cpulist or not cpulist.strip():
        return None
    count = 0
    for part in cpulist.strip().split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def disk_usage(path: str) -> tuple[int, int, int, float]:
    """(total, used, available to unprivileged users, used %) of the filesystem holding `path`, with
    the percentage as df computes it: used / (used + available), so root's reserve counts as full."""
    st = os.statvfs(path)
    total, used, avail = st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize, \
        st.f_bavail * st.f_frsize
    return total, used, avail, round(100.0 * used / (used + avail), 2) if used + avail else 0.0


@dataclasses.dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo, as far as otrace needs it."""

    device: tuple[int, int]
    root: str
    point: str
    fstype: str
    source: str
    options: frozenset[str]

    @classmethod
    def parse(cls, line: str) -> Mount | None:
        fields = line.split()
        if "-" not in fields[6:]:
            return None
        sep = fields.index("-", 6)
        major, _, minor = fields[2].partition(":")
        return cls((int(major), int(minor)), fields[3].replace("\\040", " "),
                   fields[4].replace("\\040", " "), fields[sep + 1], fields[sep + 2],
                   frozenset(fields[sep + 3].split(",")))


def mounts(procfs: Path) -> list[Mount]:
    return [m for line in (read_text(procfs / "self" / "mountinfo") or "").splitlines()
            if (m := Mount.parse(line))]


V1_CONTROLLERS = {"cpu": "cpu", "cpuacct": "cpuacct", "cpuset": "cpuset", "memory": "memory", "io": "blkio"}
V2_CONTROLLERS = {"cpu": "cpu", "cpuacct": "cpu", "cpuset": "cpuset", "memory": "memory", "io": "io"}


@dataclasses.dataclass(frozen=True)
class Cgroup:
    """Where this process's cgroup files are: per resource (cpu, cpuacct, cpuset, memory, io), the
    hierarchy ("v2" or "v1") and directory. A resource comes from the v2 unified hierarchy when our
    cgroup there has its controller, else from that controller's v1 hierarchy: a hybrid host mixes."""

    dirs: dict[str, tuple[str, Path]]

    @property
    def version(self) -> str:
        """The hierarchy the CPU usage comes from."""
        return self.dirs.get("cpuacct", ("v1", None))[0]

    @classmethod
    def find(cls, procfs: Path, sysfs: Path, mode: str = "auto") -> Cgroup | None:
        """Read <procfs>/self/cgroup and the mounts; None when no cgroup applies (or mode is none)."""
        if mode == "none":
            return None
        paths: dict[str, str] = {}           # v1 controller, or "" for v2 -> path of our cgroup
        for line in (read_text(procfs / "self" / "cgroup") or "").splitlines():
            _, controllers, path = line.split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
        v1: dict[str, tuple[str, Path]] = {}
        v2: dict[str, tuple[str, Path]] = {}
        usage_only = None                    # v2 cpu.stat has usage_usec even without the cpu controller
        for mount in mounts(procfs):
            if mount.fstype == "cgroup2" and "" in paths and mode in ("auto", "v2"):
                where = _cgroup_dir(sysfs, mount, paths[""])
                enabled = set((read_text(where / "cgroup.controllers") or "").split())
                v2 = {res: ("v2", where) for res, name in V2_CONTROLLERS.items() if name in enabled}
                usage_only = where if (where / "cpu.stat").exists() else None
            elif mount.fstype == "cgroup" and mode in ("auto", "v1"):
                for res, name in V1_CONTROLLERS.items():
                    if name in mount.options and name in paths:
                        v1[res] = ("v1", _cgroup_dir(sysfs, mount, paths[name]))
        dirs = {**v1, **v2}
        if "cpuacct" not in dirs and usage_only is not None:
            dirs["cpuacct"] = ("v2", usage_only)
        return cls(dirs) if dirs else None


def _cgroup_dir(sysfs: Path, mount: Mount, path: str) -> Path:
    """The directory of cgroup `path` in `mount`, re-rooted under `sysfs`. A mount whose root is not
    "/" (a container's own subtree) shows the path relative to that root."""
    point = Path(mount.point)
    base = sysfs / point.relative_to("/sys") if point.is_relative_to("/sys") else point
    if mount.root != "/" and (path == mount.root or path.startswith(mount.root + "/")):
        path = path[len(mount.root):]
    return base / path.lstrip("/")


@dataclasses.dataclass
class Snapshot:
    """Cumulative counters and gauges at one moment; two of them make one system_metrics row."""

    at: float                                # time.monotonic()
    source: str                              # cgroup_v2 | cgroup_v1 | proc: where the CPU figure is from
    cpu_used: float | None = None            # CPU seconds (cgroup), or busy ticks (proc)
    cpu_ticks: float | None = None           # proc only: all ticks
    cores: float | None = None
    throttled_s: float | None = None
    throttled_periods: int | None = None
    mem_used: int | None = None
    mem_rss: int | None = None
    mem_limit: int | None = None
    mem_total: int | None = None
    disk_path: str | None = None
    disk_device: str | None = None
    disk: tuple[int, int, int, float] | None = None
    disk_read: int | None = None             # bytes, cumulative
    disk_written: int | None = None
    cgroup_read: int | None = None
    cgroup_written: int | None = None
    self_cpu: float | None = None            # seconds
    self_rss: int | None = None
    cgroup_oom_kills: int | None = None
    host_oom_kills: int | None = None


class HostReader:
    """Reads a Snapshot of the host, as the cgroup otrace runs in sees it, from `procfs` and `sysfs`."""

    def __init__(self, procfs: Path, sysfs: Path, disk_path: str, mode: str = "auto",
                 disk_device: tuple[int, int] | None = None) -> None:
        self.procfs, self.sysfs, self.disk_path = procfs, sysfs, disk_path
        self.cgroup = Cgroup.find(procfs, sysfs, mode)
        self.device = disk_device or self.block_device(disk_path)
        self.process = psutil.Process()

    def block_device(self, path: str) -> tuple[int, int] | None:
        """The block device behind `path`: from st_dev, or, when that is anonymous (major 0: overlay,
        btrfs, tmpfs), from the source of the mount holding it, looked up in diskstats by name."""
        try:
            dev = Path(path).stat().st_dev
        except OSError:
            return None
        if os.major(dev):
            return os.major(dev), os.minor(dev)
        holding = max((m for m in mounts(self.procfs) if path == m.point or path.startswith(
            m.point.rstrip("/") + "/")), key=lambda m: len(m.point), default=None)
        name = holding.source.rsplit("/", 1)[-1] if holding and holding.source.startswith("/dev/") else None
        for line in (read_text(self.procfs / "diskstats") or "").splitlines():
            fields = line.split()
            if len(fields) > 9 and fields[2] == name:
                return int(fields[0]), int(fields[1])
        return None

    def snapshot(self) -> Snapshot:
        online = count_cpus(read_text(self.sysfs / "devices" / "system" / "cpu" / "online"))
        snap = Snapshot(time.monotonic(), "proc", cores=online)
        meminfo = read_keyed(self.procfs / "meminfo")
        snap.mem_total = meminfo.get("MemTotal", 0) * 1024 or None
        if self.cgroup:
            self.read_cgroup(snap)
        if snap.source == "proc":
            stat = (read_text(self.procfs / "stat") or "").split("\n", 1)[0].split()
            if len(stat) >= 9 and stat[0] == "cpu":
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, stat[1:9])
                snap.cpu_used = user + nice + system + irq + softirq + steal   # guest is inside user
                snap.cpu_ticks = snap.cpu_used + idle + iowait
        if snap.mem_used is None and "MemAvailable" in meminfo:
            snap.mem_used = (meminfo["MemTotal"] - meminfo["MemAvailable"]) * 1024
            snap.mem_rss = meminfo.get("AnonPages", 0) * 1024
        snap.host_oom_kills = read_keyed(self.procfs / "vmstat").get("oom_kill")
        self.read_disk(snap)
        try:
            with self.process.oneshot():
                times = self.process.cpu_times()
                snap.self_cpu, snap.self_rss = times.user + times.system, self.process.memory_info().rss
        except psutil.Error:
            pass
        return snap

    def read_cgroup(self, snap: Snapshot) -> None:
        dirs = self.cgroup.dirs
        if "cpuacct" in dirs:
            version, cpuacct = dirs["cpuacct"]
            usage = (read_keyed(cpuacct / "cpu.stat").get("usage_usec", -1) / 1e6 if version == "v2"
                     else (read_int(cpuacct / "cpuacct.usage") or -1) / 1e9)
            if usage >= 0:
                snap.source, snap.cpu_used = f"cgroup_{version}", usage
        if "cpu" in dirs:
            version, cpu = dirs["cpu"]
            if version == "v2":
                quota, _, period = (read_text(cpu / "cpu.max") or "max").strip().partition(" ")
                stat = read_keyed(cpu / "cpu.stat")
                snap.throttled_s = stat["throttled_usec"] / 1e6 if "throttled_usec" in stat else None
            else:
                quota = str(read_int(cpu / "cpu.cfs_quota_us"))
                period = str(read_int(cpu / "cpu.cfs_period_us"))
                stat = read_keyed(cpu / "cpu.stat")
                snap.throttled_s = stat["throttled_time"] / 1e9 if "throttled_time" in stat else None
            snap.throttled_periods = stat.get("nr_throttled")
            if quota.lstrip("-").isdigit() and int(quota) > 0 and period.isdigit() and int(period) > 0:
                snap.cores = min(int(quota) / int(period), snap.cores or math.inf)
        if "cpuset" in dirs:
            version, cpuset = dirs["cpuset"]
            names = (("cpuset.cpus.effective",) if version == "v2"
                     else ("cpuset.effective_cpus", "cpuset.cpus"))
            allowed = next((n for name in names if (n := count_cpus(read_text(cpuset / name)))), None)
            if allowed:
                snap.cores = min(allowed, snap.cores or math.inf)
        if "memory" in dirs:
            version, memory = dirs["memory"]
            self.read_cgroup_memory(snap, memory, version == "v2")
        if "io" in dirs:
            version, io = dirs["io"]
            snap.cgroup_read, snap.cgroup_written = cgroup_io(io, version == "v2")

    def read_cgroup_memory(self, snap: Snapshot, memory: Path, v2: bool) -> None:
        stat = read_keyed(memory / "memory.stat")
        if v2:
            usage, limit = read_int(memory / "memory.current"), read_text(memory / "memory.max")
            inactive, anon = stat.get("inactive_file"), stat.get("anon")
            snap.cgroup_oom_kills = read_keyed(memory / "memory.events").get("oom_kill")
        else:
            usage = read_int(memory / "memory.usage_in_bytes")
            limit = read_text(memory / "memory.limit_in_bytes")
            inactive = stat.get("total_inactive_file", stat.get("inactive_file"))
            anon = stat.get("total_rss", stat.get("rss"))
            snap.cgroup_oom_kills = read_keyed(memory / "memory.oom_control").get("oom_kill")
        if usage is None:
            return                   # e.g. the root cgroup has no memory.current: /proc speaks for it
        snap.mem_used, snap.mem_rss = max(0, usage - (inactive or 0)), anon
        if limit and limit.strip().isdigit() and int(limit) < (snap.mem_total or 2**62):
            snap.mem_limit = int(limit)          # "max", or v1's huge sentinel, means no limit

    def read_disk(self, snap: Snapshot) -> None:
        snap.disk_path = self.disk_path
        with contextlib.suppress(OSError):
            snap.disk = disk_usage(self.disk_path)
        if self.device is None:
            return
        for line in (read_text(self.procfs / "diskstats") or "").splitlines():
            fields = line.split()
            if len(fields) > 9 and (int(fields[0]), int(fields[1])) == self.device:
                snap.disk_device = f"{fields[2]} ({fields[0]}:{fields[1]})"
                snap.disk_read, snap.disk_written = int(fields[5]) * 512, int(fields[9]) * 512
                return


def cgroup_io(directory: Path, v2: bool) -> tuple[int | None, int | None]:
    """Bytes read and written by the cgroup, summed over devices: v2 io.stat, v1 blkio."""
    if v2:
        text = read_text(directory / "io.stat")
        if text is None:
            return None, None
        pairs = [field.split("=") for line in text.splitlines() for field in line.split()[1:]]
        return sum(int(v) for k, v in pairs if k == "rbytes"), sum(int(v) for k, v in pairs if k == "wbytes")
    for name in ("blkio.throttle.io_service_bytes_recursive", "blkio.throttle.io_service_bytes",
                 "blkio.io_service_bytes_recursive"):
        text = read_text(directory / name)
        if text is not None:
            rows = [line.split() for line in text.splitlines() if len(line.split()) == 3]
            return (sum(int(n) for _, op, n in rows if op == "Read"),
                    sum(int(n) for _, op, n in rows if op == "Write"))
    return None, None


def host_sample(prev: Snapshot, cur: Snapshot) -> dict[str, Any]:
    """One system_metrics row from two snapshots: rates over the interval between them."""
    wall = cur.at - prev.at
    if wall <= 0:
        raise ValueError("snapshots out of order")

    def delta(name: str) -> float | None:
        a, b = getattr(prev, name), getattr(cur, name)
        return None if a is None or b is None else max(0, b - a)

    def rate(name: str) -> float | None:
        moved = delta(name)
        return None if moved is None else round(moved / wall, 1)

    used = delta("cpu_used")
    if cur.source == "proc":
        ticks = delta("cpu_ticks")
        cpu_pct = round(100 * used / ticks, 2) if used is not None and ticks else None
    else:
        cpu_pct = round(100 * used / (wall * cur.cores), 2) if used is not None and cur.cores else None
    throttled = delta("throttled_s")
    limit = cur.mem_limit or cur.mem_total
    self_cpu = delta("self_cpu")
    total, disk_used, avail, used_pct = cur.disk or (None, None, None, None)
    return {
        "source": cur.source, "interval_s": round(wall, 3), "cpu_pct": cpu_pct,
        "cpu_cores_effective": cur.cores, "cpu_throttled_ms": None if throttled is None else round(
            throttled * 1000, 3), "cpu_throttled_periods": delta("throttled_periods"),
        "mem_used_bytes": cur.mem_used, "mem_rss_bytes": cur.mem_rss, "mem_limit_bytes": limit,
        "mem_available_bytes": None if None in (limit, cur.mem_used) else max(0, limit - cur.mem_used),
        "mem_total_bytes": cur.mem_total, "disk_path": cur.disk_path, "disk_device": cur.disk_device,
        "disk_total_bytes": total, "disk_used_bytes": disk_used, "disk_avail_bytes": avail,
        "disk_used_pct": used_pct, "disk_read_bps": rate("disk_read"), "disk_write_bps": rate("disk_written"),
        "cgroup_read_bps": rate("cgroup_read"), "cgroup_write_bps": rate("cgroup_written"),
        "self_rss_bytes": cur.self_rss,
        "self_cpu_pct": None if self_cpu is None else round(100 * self_cpu / wall, 3),
    }


STATE_SQL = ("INSERT INTO otrace_state (key, value, updated_at) VALUES (?, ?, ?) "
             "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at")


class Sampler(Loop):
    """Every TRACE_METRICS_INTERVAL: a system_metrics row through the same queue and writer as HTTP
    events, and an error event when the OOM killer struck since the last sample. The first sample
    only primes the counters (SYSM-06)."""

    def __init__(self, config: Config, events: EventQueue, oom_seen: dict[str, int]) -> None:
        super().__init__("metrics", config.metrics_interval, first_delay=0.0)
        self.events = events
        disk_path = config.disk_path or str(Path(config.db_path).resolve().parent)
        self.reader = HostReader(Path(config.procfs), Path(config.sysfs), disk_path, config.cgroup)
        self.oom_seen = oom_seen         # scope ("cgroup", "host") -> the last count committed
        self.previous: Snapshot | None = None
        self.latest: dict[str, Any] | None = None
        self.dropped = 0

    def tick(self) -> None:
        snap = self.reader.snapshot()
        rows, seen = self.oom_kills(snap)
        if self.previous is not None:
            self.latest = host_sample(self.previous, snap)
            now = now_ms()
            values = (self.latest[column] for column in METRICS.columns[3:])   # after the ids and times
            rows.append(Row(METRICS.name, (new_id(), now, now, *values)))
        self.previous = snap
        state = tuple((STATE_SQL, (f"oom_kill_count.{scope}", count, now_ms())) for scope, count in
                      seen.items())
        if not rows and not state:
            return
        if not self.events.offer(Unit(rows, state)):
            self.dropped += 1            # the queue is full: this sample is lost, an OOM kill is not
            raise RuntimeError(f"queue full: host sample dropped ({self.dropped} so far)")
        self.oom_seen.update(seen)

    def oom_kills(self, snap: Snapshot) -> tuple[list[Row], dict[str, int]]:
        """The error event for OOM kills counted since the last committed counts (none the first
        time a count is seen: otrace cannot tell when those happened), and the counts to remember."""
        seen, kills = {}, {}
        for scope, count in (("cgroup", snap.cgroup_oom_kills), ("host", snap.host_oom_kills)):
            last = self.oom_seen.get(scope)
            if count is None or count == last:
                continue
            seen[scope] = count
            if last is not None:
                kills[scope] = count - last if count > last else count   # lower: the counter was reset
        if not any(kills.values()):
            return [], seen
        memory = self.reader.cgroup and self.reader.cgroup.dirs.get("memory")
        where = {"cgroup": str(memory[1]) if memory else None, "host": "/proc/vmstat"}
        text = " and ".join(f"{n} in {'its cgroup' if scope == 'cgroup' else 'the host'}"
                            for scope, n in kills.items())
        event = own_error("oom_kill", f"OOM killer: {text}", {
            "kills": kills, "counts": seen, "seen_in": {s: where[s] for s in kills}},
            severity="critical", error_type="crash")
        return [event], seen

    def health(self) -> dict[str, Any]:
        cgroup = self.reader.cgroup
        return {"source": self.latest and self.latest["source"],
                "cgroup": cgroup and {res: f"{ver}:{path}" for res, (ver, path) in cgroup.dirs.items()},
                "samples_dropped": self.dropped, "last_error": self.fault.error}


# The OpenClaw gateway's JSON log. A file is known by its device, inode and a fingerprint of its first
# bytes; how far it was read is committed in the same transaction as the events read from it, so a
# restart (even after SIGKILL) resumes exactly there: no gap, no duplicate.

MAX_LINE = 64 * 1024             # a longer line is cut to this; the rest is skipped, never held
FINGERPRINT_BYTES = 256
LOG_NAME = re.compile(r"openclaw(?:-[\w.-]+)?-\d{4}-\d{2}-\d{2}\.log")   # not a rotated .N.log
KEY_VALUE = re.compile(r"(\w+)=(\S+)")
NETWORK_CODES = {"ECONNREFUSED", "ECONNRESET", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH",
                 "EPIPE", "UND_ERR_SOCKET"}
NOTICE = ("WARN", "ERROR", "FATAL")
OFFSET_SQL = ("INSERT INTO log_offsets (dev, inode, fingerprint, path, position, updated_at) "
              "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (dev, inode, fingerprint) DO UPDATE SET "
              "path = excluded.path, position = excluded.position, updated_at = excluded.updated_at")


@dataclasses.dataclass(frozen=True)
class LogLine:
    """One line of the gateway's log (tslog JSON), as far as otrace reads it."""

    level: str
    subsystem: str | None
    message: str
    detail: Any                  # the structured argument, when the line has one
    time_ms: int | None
    fields: dict[str, str]       # key=value pairs of the message
    otel_trace_id: str | None
    session_id: str | None

    @classmethod
    def parse(cls, raw: bytes) -> LogLine | None:
        """None for a line that is not a JSON object."""
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict):
            return None
        meta = obj.get("_meta") if isinstance(obj.get("_meta"), dict) else {}
        name = meta.get("name")
        subsystem = name if isinstance(name, str) else None
        if subsystem and subsystem.startswith("{"):
            with contextlib.suppress(ValueError, AttributeError):
                binding = json.loads(subsystem)
                subsystem = binding.get("subsystem") or binding.get("module") or binding.get("plugin") or name
        numbered = sorted((int(k), v) for k, v in obj.items() if k.isdigit())
        detail = next((v for _, v in numbered if not isinstance(v, str)), None)
        message = obj.get("message")
        if not isinstance(message, str):           # before about 2026.6: join the numbered arguments
            message = " ".join(v for k, v in numbered if isinstance(v, str) and not (k == 0 and v == name))
        trace, session = obj.get("traceId"), obj.get("session_id")
        return cls(str(meta.get("logLevelName") or "INFO").upper(), subsystem, message, detail,
                   _log_time(obj.get("time")) or _log_time(meta.get("date")),
                   dict(KEY_VALUE.findall(message)), trace if isinstance(trace, str) else None,
                   session if isinstance(session, str) else None)

    @property
    def info(self) -> dict[str, Any]:
        return self.detail if isinstance(self.detail, dict) else {}


def _log_time(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return round(moment.timestamp() * 1000) if moment.tzinfo else None


def classify(line: LogLine) -> str | None:
    """The kind of event a line is (see README, "Following the gateway log"); None for a line of no
    known kind."""
    sub, msg, notice = line.subsystem or "", line.message, line.level in NOTICE
    reload = sub == "gateway/reload"
    rules = (
        (sub == "gateway" and msg.startswith("gateway ready"), "gateway_start"),
        (sub == "gateway" and re.match(r"received SIG\w+; (shutting down|restarting)", msg), "gateway_stop"),
        (sub == "gateway/shutdown" and msg.startswith("shutdown completed"), "gateway_stopped"),
        (reload and msg.startswith(("config hot reload applied", "config change requires gateway restart")),
         "config_change"),
        (reload and msg.startswith("config reload skipped (invalid config)"), "config_invalid"),
        (sub.startswith("gateway/channels/") and sub.endswith("/inbound"), "channel_inbound"),
        (sub.endswith("/send") and "outbound send ok" in msg, "channel_outbound"),
        (sub == "gateway/health-monitor" and "health-monitor: restarting" in msg, "channel_down"),
        (sub.startswith("channels/") and "starting provider" in msg, "channel_start"),
        ((sub.startswith("channels/") or sub.endswith("/network")) and notice, "channel_error"),
        (sub == "gateway/ws" and msg.startswith("unauthorized"), "auth_failure"),
        (msg.startswith("[model-fetch] response"), "model_call"),
        (msg.startswith("[model-fetch] error"), "model_error"),
        (sub == "agent/embedded" and line.info.get("isError") is True, "model_error"),
        (sub == "model-fallback/decision" and notice, "model_error"),
        (notice, "other"),
    )
    return next((kind for matched, kind in rules if matched), None)


def model_failure(line: LogLine, kind: str) -> dict[str, Any] | None:
    """A failed model call as an error event (llm_error), in the form /v1/errors takes; else None."""
    fields, info = line.fields, line.info
    if kind == "model_call":
        status = int(fields["status"]) if fields.get("status", "").isdigit() else 0
        if status < 400:
            return None
        category = "rate_limit" if status == 429 else "timeout" if status in (408, 504) else "api_failure"
    elif line.message.startswith("[model-fetch] error"):
        cause = {fields.get("causeCode", ""), fields.get("code", "")}
        category = ("network_failure" if cause & NETWORK_CODES else
                    "timeout" if "ETIMEDOUT" in cause or fields.get("name") in ("TimeoutError", "AbortError")
                    else "api_failure")
    elif kind == "model_error":
        status, reason = info.get("status"), info.get("failoverReason") or info.get("reason")
        category = ("rate_limit" if status == 429 or reason == "rate_limit" else
                    "timeout" if status == 408 or reason == "timeout" else "api_failure")
    else:
        return None
    return {"error_type": "llm_error", "category": category, "severity": "error" if line.level in (
                "ERROR", "FATAL") else "warning",
            "message": info.get("error") or (f"{line.message}: {info['errorPreview']}" if info.get(
                "errorPreview") else line.message) or kind,
            "provider": fields.get("provider") or info.get("provider") or info.get("requestedProvider"),
            "model": fields.get("model") or info.get("model") or info.get("requestedModel"),
            "session_id": line.session_id or info.get("sessionId")}


def model_call(line: LogLine) -> dict[str, Any] | None:
    """A [model-fetch] response line as an LLM trace (no tokens: the log has none)."""
    fields = line.fields
    if not (fields.get("provider") and fields.get("model") and fields.get("status", "").isdigit()):
        return None
    status = int(fields["status"])
    elapsed = fields.get("elapsedMs", "")
    return {"provider": fields["provider"], "model": fields["model"],
            "status": "ok" if 200 <= status < 300 else "error",
            "error_type": None if 200 <= status < 300 else f"http_{status}",
            "latency_ms": int(elapsed) if elapsed.isdigit() else None, "session_id": line.session_id,
            "metadata": {"http_status": status, "api": fields.get("api")}}


class Followed:
    """A log file being read: its descriptor, identity, and the offset of the next line to read
    (always the start of a line, and what was last committed)."""

    def __init__(self, path: str, fd: int, offset: int) -> None:
        self.path, self.fd, self.offset = path, fd, offset
        st = os.fstat(fd)
        self.dev, self.inode, self.seen_size = st.st_dev, st.st_ino, st.st_size
        self.fingerprint = fingerprint(fd, st.st_size)
        self.replaced_at: float | None = None      # when another file took its name

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def rewritten(self) -> bool:
        """True when the file was truncated since the last look: it is shorter than what was read,
        or its first bytes changed (truncated, then written past the old offset). Checked only when
        the size changed."""
        size = self.size()
        if size == self.seen_size:
            return False
        self.seen_size = size
        length = fingerprint_length(self.fingerprint)
        return size < self.offset or (size >= length and fingerprint(self.fd, length) != self.fingerprint)

    def line_id(self, start: int, text: bytes) -> str:
        """The trace_id of the events from a line: the same line read again gets the same one, a line
        written at the same offset after a truncation gets another."""
        return "log-" + sha256_hex(f"{self.dev}:{self.inode}:{start}:".encode() + text)[:24]

    def refresh_fingerprint(self) -> None:
        """A file first seen shorter than FINGERPRINT_BYTES gets its full fingerprint once it grows."""
        if fingerprint_length(self.fingerprint) < FINGERPRINT_BYTES <= self.size():
            self.fingerprint = fingerprint(self.fd, FINGERPRINT_BYTES)

    def lines(self, most: int, to_end: bool = False) -> tuple[list[tuple[int, bytes, int]], int]:
        """Up to `most` whole lines from `offset`: (start, text cut to MAX_LINE, full length) each,
        and the offset after them. Reads 64 KiB at a time; a partial last line waits for its newline
        (unless `to_end`: the file is finished and it is all there will ever be)."""
        found: list[tuple[int, bytes, int]] = []
        pending, start, pos = bytearray(), self.offset, self.offset
        while len(found) < most:
            chunk = os.pread(self.fd, 65536, pos)
            if not chunk:
                if to_end and pos > start:
                    found.append((start, bytes(pending), pos - start))
                    start = pos
                break
            at = 0
            while at < len(chunk) and len(found) < most:
                newline = chunk.find(b"\n", at)
                end = len(chunk) if newline < 0 else newline
                pending += chunk[at:at + max(0, min(end - at, MAX_LINE - len(pending)))]
                if newline < 0:
                    at = len(chunk)
                    break
                length = pos + newline - start
                found.append((start, bytes(pending), length))
                pending.clear()
                start, at = pos + newline + 1, newline + 1
            pos += at
        return found, start


def sha256_hex(data: bytes) -> str:
    import hashlib  # noqa: PLC0415 - imported where needed (see the imports)
    return hashlib.sha256(data).hexdigest()


def fingerprint(fd: int, size: int) -> str:
    """"n:hash" of the file's first n bytes (n = FINGERPRINT_BYTES, or fewer in a shorter file)."""
    head = os.pread(fd, min(size, FINGERPRINT_BYTES), 0)
    return f"{len(head)}:{sha256_hex(head)[:32]}"


def fingerprint_length(mark: str) -> int:
    """How many of the file's first bytes a fingerprint covers."""
    return int(mark.split(":", 1)[0])


class LogTailer(Loop):
    """Follows the gateway's log (LOGP-01..05): every TRACE_LOG_POLL it reads the lines appended since
    the last commit and offers their events, with the new offset, to the queue as one unit. After a
    rename rotation it finishes the old file before moving on; a truncated file is read again from
    its start; a missing file is waited for quietly."""

    def __init__(self, config: Config, events: EventQueue,
                 known: dict[tuple[int, int], list[tuple[str, int]]]) -> None:
        super().__init__("logtail", config.log_poll, first_delay=0.0)
        self.config, self.events = config, events
        self.known = known               # (dev, inode) -> [(fingerprint, committed offset)]
        self.current: Followed | None = None
        self.backlog = self.unfinished()  # files read before, with lines left: finish them first
        self.started = False
        self.most = max(1, min(256, config.queue_size // 4))   # lines per unit, so that units fit the queue
        self.behind = False              # the queue refused the last offer: look again soon
        self.totals = Counters(("lines", "events", "skipped", "not_json", "cut"))

    # -- which file
    def target(self) -> str | None:
        """The file to follow now: TRACE_LOG_PATH, or the newest dated log in that directory."""
        path = Path(self.config.log_path)
        if not path.is_dir():
            return str(path)
        dated = [p for p in path.iterdir() if LOG_NAME.fullmatch(p.name)]
        return str(max(dated, key=lambda p: (p.name[-14:], p.stat().st_mtime))) if dated else None

    def unfinished(self) -> list[str]:
        """Files in the log's directory otrace has read part of, with bytes left (rotated while
        otrace was down), oldest first."""
        path = Path(self.config.log_path)
        folder = path if path.is_dir() else path.parent
        found = []
        with contextlib.suppress(OSError):
            for candidate in folder.iterdir():
                if not candidate.name.startswith("openclaw") or not candidate.name.endswith(".log"):
                    continue
                st = candidate.stat()
                offset = self.resume_at(str(candidate), st)
                if offset is not None and offset < st.st_size and str(candidate) != self.target():
                    found.append((st.st_mtime, str(candidate)))
        return [p for _, p in sorted(found)]

    def resume_at(self, path: str, st: os.stat_result) -> int | None:
        """The committed offset of this very file, if otrace has read it before."""
        for mark, offset in self.known.get((st.st_dev, st.st_ino), []):
            with contextlib.suppress(OSError), open(path, "rb") as f:
                if fingerprint(f.fileno(), fingerprint_length(mark)) == mark:
                    return offset if offset <= st.st_size else 0
        return None

    def open_next(self) -> bool:
        path = self.backlog.pop(0) if self.backlog else self.target()
        try:
            fd = os.open(path, os.O_RDONLY) if path else None
        except OSError:
            fd = None
        if fd is None:
            self.started = True      # a file that appears from now on is new: read from its start
            self.fault.failed(f"waiting for the gateway log at {self.config.log_path}")
            return False
        st = os.fstat(fd)
        offset = self.resume_at(path, st)
        if offset is None:           # never read: TRACE_LOG_START for a file there at startup, else 0
            offset = 0 if self.started or self.config.log_start == "beginning" else line_end(fd, st.st_size)
        self.started = True
        self.current = Followed(path, fd, offset)
        self.log.info("following log file", extra={"file": path, "offset": offset, "size": st.st_size})
        return True

    # -- reading
    def tick(self) -> None:
        if self.current is None and not self.open_next():
            return
        followed = self.current
        if followed.rewritten():                     # truncated in place: read it again from the top
            self.log.warning("log file was truncated: reading it again from its start", extra={
                "file": followed.path, "offset": followed.offset})
            followed.offset = 0
            followed.fingerprint = fingerprint(followed.fd, followed.size())
        read = self.drain(followed)
        if read is None or read > 0 or not self.superseded(followed):
            followed.replaced_at = None              # full queue, news, or still the file to follow
            return
        if followed.replaced_at is None:             # give a rename's last appends one more poll
            followed.replaced_at = time.monotonic()
            return
        if self.drain(followed, to_end=True) is None:
            return
        os.close(followed.fd)
        self.log.info("finished log file", extra={"file": followed.path, "offset": followed.offset})
        self.current = None
        self.open_next()

    def next_delay(self) -> float:
        """While catching up behind a full queue, look again in 2 ms rather than a whole poll."""
        return min(self.interval, 0.002) if self.behind else self.interval

    def superseded(self, followed: Followed) -> bool:
        """Another file has taken over: `followed` came from the backlog, the day moved on to a new
        file, or a rotation renamed it away and a new file took its name."""
        target = self.target()
        if not target:
            return False
        if followed.path != target:
            return True
        with contextlib.suppress(OSError):
            st = Path(target).stat()
            return (st.st_dev, st.st_ino) != (followed.dev, followed.inode)
        return False

    def drain(self, followed: Followed, to_end: bool = False) -> int | None:
        """Offer every whole line from the file's offset: how many lines, or None if the queue was
        full (the offset then stays, and the same lines are read again next tick)."""
        total = 0
        while not self.stopping.is_set():
            lines, end = followed.lines(self.most, to_end)
            if not lines:
                return total
            rows = [row for start, text, length in lines for row in self.rows(followed, start, text, length)]
            followed.refresh_fingerprint()
            state = (OFFSET_SQL, (followed.dev, followed.inode, followed.fingerprint, followed.path, end,
                                  now_ms()))
            if not self.events.offer(Unit(rows, (state,))):
                self.behind = True
                return None
            self.behind = False
            self.known[(followed.dev, followed.inode)] = [(followed.fingerprint, end)]
            followed.offset = end
            self.totals.add("lines", len(lines))
            self.totals.add("events", len(rows))
            total += len(lines)
        return total

    def rows(self, followed: Followed, start: int, text: bytes, length: int) -> list[Row]:
        """The rows one line becomes: a log event, and for a model call a trace and/or an error event.
        Their trace_ids come from the file's identity and the line's offset, so a replay adds none."""
        if length > MAX_LINE:
            self.totals.add("cut")
        line = LogLine.parse(text)
        if line is None:
            self.totals.add("not_json")
            self.log.debug("log line is not JSON", extra={"file": followed.path, "offset": start,
                                                          "sample": text[:200].decode("utf-8", "replace")})
            return []
        kind = classify(line)
        if kind is None and not self.config.log_keep_all:
            self.totals.add("skipped")
            return []
        trace_id, received = followed.line_id(start, text), now_ms()
        created = line.time_ms if line.time_ms is not None and 0 <= line.time_ms <= MAX_UNIX_MS else received
        message = cut_utf8(line.message, self.config.max_text_bytes)[0]
        rows = [Row(LOGS.name, (trace_id, created, received, "log", line.level, line.subsystem,
                                kind or "info", message, self.detail_json(line.detail), line.otel_trace_id,
                                followed.path, start))]
        derived = ((TRACES, trace_row, model_call(line) if kind == "model_call" else None),
                   (ERRORS, error_row, model_failure(line, kind or "")))
        for table, build, event in derived:
            if event is not None:
                event |= {"trace_id": f"{trace_id}-{table.name}", "created_at": created, "metadata": {
                    **(event.get("metadata") or {}), "log_file": followed.path, "log_offset": start}}
                reader = Reader({k: v for k, v in event.items() if v is not None}, None,
                                self.config.max_text_bytes)
                with contextlib.suppress(Invalid):  # a line without what a trace needs stays a log event
                    values = build(reader, received, source="log")
                    rows.append(Row(table.name, (*values, int(reader.truncated))))
        return rows

    def detail_json(self, detail: Any) -> str | None:
        if detail is None:
            return None
        text = clean_text(json.dumps(detail, ensure_ascii=False, separators=(",", ":")))
        size = len(text.encode())
        return text if size <= self.config.max_text_bytes else json.dumps(
            {"_otrace_truncated": True, "original_bytes": size})

    def health(self) -> dict[str, Any]:
        followed = self.current
        size = followed.size() if followed else None
        return {"path": self.config.log_path, "file": followed and followed.path,
                "offset": followed and followed.offset, "lag_bytes": followed and size - followed.offset,
                **self.totals.snapshot(), "last_error": self.fault.error}


def line_end(fd: int, size: int) -> int:
    """The offset just after the last newline in the file (where "the end" starts for a new reader)."""
    tail = os.pread(fd, min(size, MAX_LINE), max(0, size - MAX_LINE))
    newline = tail.rfind(b"\n")
    return size - len(tail) + newline + 1 if newline >= 0 else size


# =============================================================================================== push
# Every unsynced row reaches the receiver at least once and is marked synced only when a 2xx answer
# confirmed its batch. Rows are read page by page and packed into byte-capped batches; a batch is
# retried with full-jitter backoff, split when refused for its content, and a circuit breaker spaces
# out cycles while the receiver is down.

PUSH_TYPES = {"llm_traces": "llm_trace", "error_events": "error_event", "system_metrics": "system_metric",
              "log_events": "log_event"}
JSON_COLUMNS = frozenset({"metadata", "detail"})
INTERNAL_COLUMNS = frozenset({"synced", "pushed_at"})


@dataclasses.dataclass
class Batch:
    """Events sent in one request, encoded as JSON back to back (", " apart) in one buffer, with
    where each one is: (table, row id, start, end). One buffer, not an object per event, keeps a
    5 MiB batch at about 5 MiB."""

    data: bytearray = dataclasses.field(default_factory=bytearray)
    spans: list[tuple[str, int, int, int]] = dataclasses.field(default_factory=list)
    losses: list[dict[str, Any]] = dataclasses.field(default_factory=list)   # retention_ledger rows
    batch_id: str = dataclasses.field(default_factory=new_id)

    def __len__(self) -> int:
        return len(self.spans)

    def add(self, table: str, row_id: int, encoded: bytes) -> None:
        if self.spans:
            self.data += b", "
        self.spans.append((table, row_id, len(self.data), len(self.data) + len(encoded)))
        self.data += encoded

    def event(self, index: int) -> bytes:
        _, _, start, end = self.spans[index]
        return bytes(self.data[start:end])

    def parts(self, agent_id: str) -> list[bytes | memoryview]:
        """The request body in three parts (sent one after the other, never joined)."""
        head = {"schema": "otrace.push.v1", "batch_id": self.batch_id, "agent_id": agent_id,
                "sent_at": _iso(time.time())}
        if self.losses:
            head["losses"] = self.losses
        return [json.dumps(head)[:-1].encode() + b', "events": [', memoryview(self.data), b"]}"]

    def halves(self) -> tuple[Batch, Batch]:
        middle = len(self.spans) // 2
        first, second = Batch(losses=self.losses), Batch()
        for index, (table, row_id, _, _) in enumerate(self.spans):
            (first if index < middle else second).add(table, row_id, self.event(index))
        return first, second

    def ids(self) -> dict[str, list[int]]:
        by_table: dict[str, list[int]] = {}
        for table, row_id, _, _ in self.spans:
            by_table.setdefault(table, []).append(row_id)
        return by_table


class Packer:
    """Reads unsynced rows a page at a time (table by table, in id order) and packs them into
    batches of at most max_bytes of JSON, so a backlog of any size is never held in memory."""

    PAGE = 200
    ENVELOPE = 256               # bytes of the batch around its events, with room to spare

    def __init__(self, conn: sqlite3.Connection, max_bytes: int, tables: Iterable[str]) -> None:
        self.conn, self.max_bytes, self.tables = conn, max_bytes, tuple(tables)

    def batches(self) -> Iterator[Batch]:
        batch = Batch()
        for table, row_id, encoded in self.encoded():
            if batch.spans and self.ENVELOPE + len(batch.data) + 2 + len(encoded) > self.max_bytes:
                yield batch
                batch = Batch()
            batch.add(table, row_id, encoded)
        if batch.spans:
            yield batch

    def encoded(self) -> Iterator[tuple[str, int, bytes]]:
        for table in self.tables:
            after = 0
            while True:
                page = f"SELECT * FROM {table} WHERE synced = 0 AND id > ? ORDER BY id LIMIT {self.PAGE}"
                cursor = self.conn.execute(page, (after,))
                names = [d[0] for d in cursor.description]
                rows = cursor.fetchall()
                for row in rows:
                    data = {name: json.loads(value) if name in JSON_COLUMNS and value else value
                            for name, value in zip(names, row, strict=True)
                            if name not in INTERNAL_COLUMNS}
                    event = {"type": PUSH_TYPES[table], "trace_id": data["trace_id"], "data": data}
                    yield table, data["id"], json.dumps(event, ensure_ascii=False).encode()
                if len(rows) < self.PAGE:
                    break
                after = rows[-1][0]


@dataclasses.dataclass
class Attempt:
    """One HTTP request of a push, as push_log records it."""

    batch_id: str
    started_at: int
    events: int
    bytes: int
    duration_ms: float = 0.0
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None

    @property
    def verdict(self) -> str:
        """ok (confirmed), retry (try the same batch later), split (its content was refused) or
        config (the endpoint or token is wrong: retrying cannot help)."""
        status = self.status
        if status is None or status in (408, 429) or status >= 500:
            return "retry"
        if 200 <= status < 300:
            return "ok"
        if status in (401, 403, 404, 405, 407) or status < 200 or 300 <= status < 400:
            return "config"
        return "split"

    def describe(self) -> str:
        """"HTTP 503: why the receiver said so", or the network error."""
        if self.status is None:
            return self.error or "unknown error"
        return f"HTTP {self.status}" + (f": {self.error}" if self.error else "")


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header (seconds, or an HTTP date) as seconds from now."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Receiver:
    """The remote API: a pooled urllib3 connection with timeouts and verified TLS, no redirects and no
    retries of its own (the Pusher decides)."""

    def __init__(self, config: Config) -> None:
        self.url, self.timeout, self.gzip = config.push_endpoint, config.push_timeout, config.push_gzip
        self.headers = {"Content-Type": "application/json", "User-Agent": f"otrace/{__version__}"}
        if config.push_token:
            self.headers["Authorization"] = f"Bearer {config.push_token}"
        if config.push_gzip:
            self.headers["Content-Encoding"] = "gzip"
        import urllib3  # noqa: PLC0415 - imported where needed (see the imports)
        self.urllib3 = urllib3
        self.pool = urllib3.PoolManager(num_pools=1, maxsize=1, retries=False)

    def post(self, batch: Batch, agent_id: str, deadline: float | None) -> Attempt:
        body: list[bytes | memoryview] = batch.parts(agent_id)
        attempt = Attempt(batch.batch_id, now_ms(), len(batch), sum(map(len, body)))
        if self.gzip:
            import gzip  # noqa: PLC0415 - imported where needed (see the imports)
            body = [gzip.compress(b"".join(body), 6)]
        read = self.timeout if deadline is None else max(0.1, min(self.timeout, deadline - time.monotonic()))
        started = time.monotonic()
        try:
            headers = {**self.headers, "Idempotency-Key": batch.batch_id,
                       "Content-Length": str(sum(map(len, body)))}   # so the parts go as they are
            resp = self.pool.request("POST", self.url, body=body, headers=headers, redirect=False,
                                     timeout=self.urllib3.Timeout(connect=min(10.0, read), read=read),
                                     preload_content=False)
            try:
                attempt.status = resp.status
                attempt.retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
                reason = resp.read(4096, decode_content=False).decode("utf-8", "replace").strip()
                if not 200 <= resp.status < 300:
                    attempt.error = reason[:500] or None
                resp.drain_conn()    # the rest of a long answer, so the pooled connection is clean
            finally:
                resp.release_conn()
        except (self.urllib3.exceptions.HTTPError, OSError) as exc:
            attempt.error = describe(exc)
        attempt.duration_ms = round((time.monotonic() - started) * 1000, 3)
        return attempt


class Breaker:
    """Circuit breaker over push cycles: after `threshold` failed cycles in a row it opens, and lets
    one cycle try per cool-down, which doubles with each further failure (up to MAX_COOLDOWN)."""

    MAX_COOLDOWN = 3600.0

    def __init__(self, threshold: int, cooldown: float) -> None:
        self.threshold, self.cooldown = threshold, cooldown
        self.failures = 0
        self.retry_at = 0.0      # time.time() of the next try while open

    @property
    def state(self) -> str:
        if self.failures < self.threshold:
            return "closed"
        return "open" if time.time() < self.retry_at else "half_open"

    def allows(self) -> bool:
        return self.state != "open"

    def record(self, ok: bool) -> None:
        if ok:
            self.failures, self.retry_at = 0, 0.0
            return
        self.failures += 1
        if self.failures >= self.threshold:
            doublings = min(self.failures - self.threshold, 30)
            self.retry_at = time.time() + min(self.MAX_COOLDOWN, self.cooldown * 2**doublings)


class Pusher(Loop):
    """The one thread that pushes: a cycle every TRACE_PUSH_INTERVAL (spaced out by the breaker) and a
    last one at shutdown. A lock makes sure no two cycles ever run at once."""

    def __init__(self, config: Config, events: EventQueue, tables: Iterable[str]) -> None:
        super().__init__("push", config.push_interval, first_delay=min(config.push_interval, 5.0))
        self.config, self.events, self.tables = config, events, tuple(tables)
        self.agent_id = config.agent_id or socket.gethostname()
        self.receiver = Receiver(config)
        self.breaker = Breaker(config.push_breaker_threshold, config.push_breaker_cooldown)
        self.cycle_lock = threading.Lock()
        self.last_time: float | None = None
        self.last_status = "never"
        self.last_error: str | None = None
        self.totals = Counters(("events", "batches", "rejected"))

    def next_delay(self) -> float:
        if self.breaker.state == "open":
            return max(0.0, self.breaker.retry_at - time.time())
        return self.interval

    def tick(self) -> None:
        if self.breaker.allows():
            self.push(deadline=None)

    def push(self, deadline: float | None) -> bool:
        """One cycle: send every unsynced row, batch by batch, until done, refused or out of time."""
        wait = 0.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.cycle_lock.acquire(timeout=wait):
            return False
        try:
            with contextlib.closing(connect(self.config.db_path)) as conn:
                conn.execute("PRAGMA query_only = 1")
                ok = all(self.deliver(batch, deadline) for batch in self.batches(conn))
            if ok and self.last_status == "never":
                self.last_status = "ok"     # nothing was waiting: the receiver is not known to be down
            if not ok and self.stopping.is_set() and (deadline is None or time.monotonic() >= deadline):
                self.log.info("push cycle cut short by shutdown")
                return False
            self.breaker.record(ok)
            if not ok:
                self.log.warning("push cycle failed", extra={
                    "status": self.last_status, "error": self.last_error, "breaker": self.breaker.state,
                    "consecutive_failures": self.breaker.failures})
            return ok
        finally:
            self.cycle_lock.release()

    def batches(self, conn: sqlite3.Connection) -> Iterator[Batch]:
        """The cycle's batches; the first also reports what retention had to delete unpushed."""
        losses = [dict(zip(("ledger_id", "at", "table", "reason", "rows", "oldest_received_at",
                            "newest_received_at"), row, strict=True)) for row in conn.execute(
            "SELECT id, at, table_name, reason, unsynced_deleted, oldest_received_at, newest_received_at "
            "FROM retention_ledger WHERE reported_at IS NULL AND unsynced_deleted > 0 ORDER BY id LIMIT 100")]
        batches = Packer(conn, self.config.push_max_bytes, self.tables).batches()
        first = next(batches, None) or (Batch() if losses else None)
        if first is None:
            return
        first.losses = losses
        yield first
        yield from batches

    def deliver(self, batch: Batch, deadline: float | None) -> bool:
        """Send one batch until it is confirmed, split, or the cycle gives up on it (False)."""
        backoff = Backoff(self.config.push_backoff_base, self.config.push_backoff_cap)
        attempts = 1 if deadline is not None else self.config.push_retries
        for number in range(1, attempts + 1):
            if (self.stopping.is_set() and deadline is None) or (
                    deadline is not None and time.monotonic() >= deadline):
                return False
            attempt = self.receiver.post(batch, self.agent_id, deadline)
            verdict = attempt.verdict
            self.note(attempt, verdict)
            if verdict == "ok":
                self.record(functools.partial(record_pushed, batch, attempt), deadline)
                self.totals.add("events", len(batch))
                self.totals.add("batches")
                return True
            self.events.submit(functools.partial(record_attempt, attempt))
            if verdict == "config":
                return False
            if verdict == "split":
                if not batch.spans:       # a report of losses alone, refused: try it next cycle
                    return False
                if len(batch) == 1:
                    self.record(functools.partial(record_rejected, batch, attempt), deadline)
                    self.totals.add("rejected")
                    self.log.warning("event refused by the receiver", extra={
                        "table": batch.spans[0][0], "row_id": batch.spans[0][1],
                        "status": attempt.status, "reason": attempt.error})
                    return True
                return all(self.deliver(half, deadline) for half in batch.halves())
            wait = max(backoff.next(), attempt.retry_after or 0.0)
            if number == attempts or (deadline is not None and time.monotonic() + wait > deadline):
                return False
            if self.stopping.wait(wait):
                return False
        return False

    def flush(self, deadline: float) -> None:
        """The last push, at shutdown: what time allows. The rest stays unsynced for the next start."""
        if not self.breaker.allows():
            self.log.info("final push skipped: circuit breaker open", extra={
                "next_attempt_at": _iso(self.breaker.retry_at)})
            return
        before = self.totals.snapshot()["events"]
        try:
            complete = self.push(deadline)
        except Exception as exc:  # noqa: BLE001 - the rows stay unsynced; shutdown goes on
            self.log.warning("final push stopped", extra={"error": describe(exc)})
            complete = False
        self.log.info("final push", extra={"complete": complete, "status": self.last_status,
                                           "events_pushed": self.totals.snapshot()["events"] - before})

    def record(self, job: Callable[[sqlite3.Connection], Any], deadline: float | None) -> None:
        """Have the writer commit a push outcome, and wait for it: the next page must not see the
        rows again. Raises if it cannot be committed (the cycle then ends; the rows stay unsynced)."""
        wait = 60.0 if deadline is None else max(0.1, deadline - time.monotonic())
        self.events.submit(job).result(timeout=wait)

    def note(self, attempt: Attempt, verdict: str) -> None:
        """Remember the latest answer for /health."""
        self.last_time = time.time()
        self.last_status = {"ok": "ok", "retry": "failed", "split": "refused", "config": "config_error"}[
            verdict]
        self.last_error = None if verdict == "ok" else attempt.describe()

    def health(self) -> dict[str, Any]:
        totals = self.totals.snapshot()
        return {
            "endpoint": _without_userinfo(self.config.push_endpoint),
            "breaker": self.breaker.state,
            "consecutive_failures": self.breaker.failures,
            "next_attempt_at": _iso(self.breaker.retry_at) if self.breaker.state == "open" else None,
            "last_push_time": self.last_time and _iso(self.last_time),
            "last_push_status": self.last_status,
            "last_error": self.last_error,
            "events_pushed": totals["events"],
            "batches_pushed": totals["batches"],
            "events_refused_by_receiver": totals["rejected"],
        }


def record_attempt(attempt: Attempt, conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO push_log (batch_id, started_at, duration_ms, events, bytes, http_status, "
                 "error, retry_after_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (attempt.batch_id, attempt.started_at, attempt.duration_ms, attempt.events, attempt.bytes,
                  attempt.status, attempt.error, attempt.retry_after))


def record_pushed(batch: Batch, attempt: Attempt, conn: sqlite3.Connection) -> None:
    """Mark exactly the batch's rows synced, with its push_log row, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    for table, ids in batch.ids().items():
        conn.executemany(f"UPDATE {table} SET synced = {SYNCED}, pushed_at = ? WHERE id = ?",
                         [(attempt.started_at, row_id) for row_id in ids])
    conn.executemany("UPDATE retention_ledger SET reported_at = ? WHERE id = ?",
                     [(attempt.started_at, loss["ledger_id"]) for loss in batch.losses])
    record_attempt(attempt, conn)
    conn.execute("COMMIT")


def record_rejected(batch: Batch, attempt: Attempt, conn: sqlite3.Connection) -> None:
    """Take a row the receiver refused on its own out of the push queue, keeping why."""
    (table, row_id, _, _), = batch.spans
    encoded = batch.event(0)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(f"UPDATE {table} SET synced = {REJECTED} WHERE id = ?", (row_id,))
    conn.execute("INSERT INTO push_rejects (table_name, row_id, trace_id, rejected_at, http_status, reason) "
                 "VALUES (?, ?, ?, ?, ?, ?)", (table, row_id, json.loads(encoded)["trace_id"], now_ms(),
                                               attempt.status, attempt.error))
    record_attempt(attempt, conn)
    conn.execute("COMMIT")


def _without_userinfo(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl() if url else url


# ============================================================================================= upkeep
# Living inside a small volume for months: checkpoints that shrink the WAL, and retention that deletes
# pushed rows first and records every unpushed row it has to give up, in the same transaction.


def checkpoint(mode: str, conn: sqlite3.Connection) -> dict[str, int]:
    """A WAL checkpoint on the writer's connection. After TRUNCATE the page counts read 0."""
    busy, wal_pages, moved = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    return {"busy": busy, "wal_pages": wal_pages, "checkpointed_pages": moved}


class Checkpointer(Loop):
    """Every TRACE_CHECKPOINT_INTERVAL the writer checkpoints between two batches (no second writer
    races it): PASSIVE, or TRUNCATE once the WAL is over TRACE_WAL_MAX_BYTES, since a passive
    checkpoint reuses the WAL file but never shrinks it."""

    def __init__(self, config: Config, events: EventQueue) -> None:
        super().__init__("checkpoint", config.checkpoint_interval)
        self.events, self.limit, self.wal_path = events, config.wal_max_bytes, config.db_path + "-wal"

    def tick(self) -> None:
        before = _file_size(self.wal_path)
        mode = "TRUNCATE" if before > self.limit else "PASSIVE"
        result = self.events.submit(functools.partial(checkpoint, mode)).result(timeout=120)
        self.log.info("wal checkpoint", extra={"mode": mode.lower(), **result, "wal_bytes_before": before,
                                               "wal_bytes_after": _file_size(self.wal_path)})


@dataclasses.dataclass(frozen=True)
class Cut:
    """One kind of deletion: rows of `table` matching `where`, oldest first, for `reason` in a pass.
    Called on the writer's connection, it deletes one chunk and its ledger entry in one transaction
    and returns (rows deleted, of which never pushed)."""

    table: str
    where: str
    reason: str
    pass_id: str
    params: tuple = ()
    limit: int = 1000

    def __call__(self, conn: sqlite3.Connection) -> tuple[int, int]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            oldest = f"SELECT id FROM {self.table} WHERE {self.where} ORDER BY id LIMIT {self.limit}"
            gone = conn.execute(f"DELETE FROM {self.table} WHERE id IN ({oldest}) RETURNING synced, "
                                f"received_at", self.params).fetchall()
            lost = [received for synced, received in gone if synced == 0]
            if gone:
                conn.execute(LEDGER_SQL, (self.pass_id, now_ms(), self.table, self.reason, len(gone),
                                          len(lost), min(lost, default=None), max(lost, default=None)))
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
        return len(gone), len(lost)


LEDGER_SQL = (
    "INSERT INTO retention_ledger (pass_id, at, table_name, reason, deleted, unsynced_deleted, "
    "oldest_received_at, newest_received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (pass_id, table_name, reason) DO UPDATE SET deleted = deleted + excluded.deleted, "
    "unsynced_deleted = unsynced_deleted + excluded.unsynced_deleted, "
    "oldest_received_at = coalesce(min(oldest_received_at, excluded.oldest_received_at), "
    "oldest_received_at, excluded.oldest_received_at), "
    "newest_received_at = coalesce(max(newest_received_at, excluded.newest_received_at), "
    "newest_received_at, excluded.newest_received_at)")


def oldest_table(conn: sqlite3.Connection, tables: Iterable[str], where: str) -> str | None:
    """Which of `tables` holds the oldest row (by arrival) matching `where`; None if none does."""
    heads = [(head[0], table) for table in tables if (head := conn.execute(
        f"SELECT received_at FROM {table} WHERE {where} ORDER BY id LIMIT 1").fetchone())]
    return min(heads)[1] if heads else None


BOOKKEEPING = (("push_log", "started_at", ""), ("push_rejects", "rejected_at", ""),
               ("log_offsets", "updated_at", ""),
               ("retention_ledger", "at", "AND (reported_at IS NOT NULL OR unsynced_deleted = 0)"))


def prune(table: str, column: str, cutoff: int, extra: str, conn: sqlite3.Connection) -> int:
    """Delete one chunk of bookkeeping rows (push_log, ...) older than `cutoff`."""
    return conn.execute(f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {column} < ? "
                        f"{extra} ORDER BY id LIMIT {Retention.CHUNK})", (cutoff,)).rowcount


def shrink(conn: sqlite3.Connection) -> None:
    """Give freed pages back to the filesystem: incremental vacuum, then a TRUNCATE checkpoint."""
    conn.executescript("PRAGMA incremental_vacuum;")   # execute() would step it once: one page freed
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


@dataclasses.dataclass(frozen=True)
class Tier:
    """One step of the deletion order under pressure."""

    reason: str
    tables: tuple[str, ...]
    where: str
    for_disk: bool           # disk pressure may always use it, not only when otrace's rows can help
    chunk: int               # rows per step: small where every row deleted is a row lost


class Retention(Loop):
    """Every TRACE_CLEANUP_INTERVAL (and at once when a write fails for lack of space): deletes
    pushed rows older than TRACE_RETENTION; then, while the database is over TRACE_DB_MAX_BYTES or
    the disk over TRACE_DISK_HIGH_PCT, deletes oldest first in TIERS order down to the low mark. Every
    deletion runs in a chunk of its own between ingest batches, with its ledger row."""

    CHUNK = 1000             # rows a deletion takes at most; under a smaller cap, one row per
    CHUNK_SHARE = 200_000    # this many bytes of it: a chunk of 2 KB rows frees about 1 % of the cap
    HIGH_DB = 0.85           # past 85 % of its cap the database is under pressure (room for the
                             # WAL and what arrives while a pass runs), ...
    LOW_DB = 0.75            # ... and deletes until it is under 75 %; ...
    LOW_DISK = 5.0           # ... and the disk 5 points under TRACE_DISK_HIGH_PCT

    def __init__(self, config: Config, events: EventQueue, tables: Iterable[str]) -> None:
        super().__init__("retention", config.cleanup_interval)
        self.config, self.events, self.tables = config, events, tuple(tables)
        self.db_dir = str(Path(config.db_path).resolve().parent)
        unpushed = tuple(t for t in self.tables if t != "system_metrics")
        self.chunk = max(50, min(self.CHUNK, config.db_max_bytes // self.CHUNK_SHARE))
        self.tiers = (Tier("pressure_pushed", self.tables, "synced != 0", True, self.chunk),
                      Tier("pressure_metrics", ("system_metrics",), "synced = 0", True, self.chunk),
                      Tier("pressure_unpushed", unpushed, "synced = 0", False, 50))
        self.last_pass: dict[str, Any] | None = None

    def check_budget(self) -> None:
        """Warn when the database cap cannot be reached before the disk mark: then only pushed rows
        and host samples make room, and a receiver that stays down fills the disk."""
        total = disk_usage(self.db_dir)[0]
        budget = self.config.db_max_bytes + self.config.wal_max_bytes
        if budget > total * self.config.disk_high_pct / 100:
            self.log.warning("database cap is over the disk's budget", extra={
                "db_max_bytes": self.config.db_max_bytes, "wal_max_bytes": self.config.wal_max_bytes,
                "disk_total_bytes": total, "disk_high_pct": self.config.disk_high_pct,
                "advice": "set TRACE_DB_MAX_BYTES under TRACE_DISK_HIGH_PCT of the volume, less the WAL"})

    def run_job(self, job: Callable[[sqlite3.Connection], Any]) -> Any:
        return self.events.submit(job).result(timeout=120)

    def tick(self) -> None:
        pass_id, started = new_id(), time.monotonic()
        tally: collections.Counter[tuple[str, str, str]] = collections.Counter()
        cutoff = now_ms() - int(self.config.retention * 1000)
        for table in self.tables:
            self.delete_all(Cut(table, "synced != 0 AND received_at < ?", "age", pass_id, (cutoff,),
                                self.chunk), tally)
        self.relieve(pass_id, tally)
        pruned = sum(self.prune_all(table, column, cutoff, extra) for table, column, extra in BOOKKEEPING)
        if tally or pruned:
            self.run_job(shrink)
        self.report(tally, pruned, time.monotonic() - started)

    def delete_all(self, cut: Cut, tally: collections.Counter[tuple[str, str, str]]) -> None:
        """Delete chunk after chunk until no row matches."""
        while not self.stopping.is_set() and self.delete_chunk(cut, tally) == cut.limit:
            pass

    def prune_all(self, table: str, column: str, cutoff: int, extra: str) -> int:
        """Delete bookkeeping rows older than `cutoff`, chunk after chunk; how many went."""
        pruned = 0
        while not self.stopping.is_set():
            count = self.run_job(functools.partial(prune, table, column, cutoff, extra))
            pruned += count
            if count < self.CHUNK:
                break
        return pruned

    def delete_chunk(self, cut: Cut, tally: collections.Counter[tuple[str, str, str]]) -> int:
        deleted, lost = self.run_job(cut)
        tally[(cut.table, cut.reason, "deleted")] += deleted
        tally[(cut.table, cut.reason, "unpushed")] += lost
        return deleted

    def db_bytes(self) -> int:
        """The database's size as the cap counts it: file + WAL."""
        return _file_size(self.config.db_path) + _file_size(self.config.db_path + "-wal")

    def pressure(self) -> tuple[str, str] | None:
        """Why the database must shrink now ("db_cap" or "disk"), with the figures, or None."""
        db = self.db_bytes()
        if db > self.config.db_max_bytes * self.HIGH_DB:
            return "db_cap", f"database {db} bytes > {self.HIGH_DB:.0%} of {self.config.db_max_bytes}"
        used_pct = disk_usage(self.db_dir)[3]
        if used_pct > self.config.disk_high_pct:
            return "disk", f"disk {used_pct} % used > {self.config.disk_high_pct} %"
        return None

    def relieved(self, cause: str) -> bool:
        if cause == "db_cap":
            return self.db_bytes() <= self.config.db_max_bytes * self.LOW_DB
        return disk_usage(self.db_dir)[3] <= self.config.disk_high_pct - self.LOW_DISK

    def own_share_can_relieve(self) -> bool:
        """True when the database holds at least what the disk is over its low mark."""
        _, used, avail, _ = disk_usage(self.db_dir)
        excess = used - (self.config.disk_high_pct - self.LOW_DISK) / 100 * (used + avail)
        return self.db_bytes() >= excess

    def relieve(self, pass_id: str, tally: collections.Counter[tuple[str, str, str]]) -> None:
        """Under pressure, delete tier after tier, a chunk at a time from whichever table holds the
        oldest row, until under the low mark. Disk pressure reaches unpushed traces, errors and log
        events only when the database is big enough for deleting them to bring the disk under the
        low mark: a disk filled by something else is not helped by losing them."""
        found = self.pressure()
        if not found:
            return
        cause, detail = found
        self.log.warning("over budget: deleting oldest rows", extra={"cause": cause, "detail": detail})
        with contextlib.closing(connect(self.config.db_path)) as conn:
            for tier in self.tiers:
                if cause == "disk" and not tier.for_disk and not self.own_share_can_relieve():
                    break
                while not self.stopping.is_set() and not self.relieved(cause):
                    table = oldest_table(conn, tier.tables, tier.where)
                    if table is None:
                        break
                    self.delete_chunk(Cut(table, tier.where, tier.reason, pass_id, limit=tier.chunk), tally)
                    self.run_job(shrink)      # so the next measure sees the space given back
                if self.relieved(cause):
                    return
        self.log.error("still over budget after deleting all it may", extra={
            "cause": cause, "detail": (self.pressure() or (cause, "now under"))[1]})

    def report(self, tally: collections.Counter[tuple[str, str, str]], pruned: int, seconds: float) -> None:
        lost = {f"{t}/{r}": n for (t, r, kind), n in tally.items() if kind == "unpushed" and n}
        deleted = {f"{t}/{r}": n for (t, r, kind), n in tally.items() if kind == "deleted" and n}
        self.last_pass = {"at": _iso(time.time()), "seconds": round(seconds, 3), "deleted": deleted,
                          "unpushed_deleted": lost, "bookkeeping_pruned": pruned}
        if lost:
            self.log.warning("retention deleted rows that were never pushed", extra=self.last_pass)
        elif deleted or pruned:
            self.log.info("retention pass", extra=self.last_pass)

    def health(self, reader: Callable[[str], list[tuple]]) -> dict[str, Any]:
        _, _, avail, used_pct = disk_usage(self.db_dir)
        lost = dict(reader("SELECT table_name, sum(unsynced_deleted) FROM retention_ledger "
                           "WHERE unsynced_deleted > 0 GROUP BY table_name"))
        return {"db_max_bytes": self.config.db_max_bytes, "disk_used_pct": used_pct,
                "disk_avail_bytes": avail, "disk_high_pct": self.config.disk_high_pct,
                "unpushed_deleted_total": lost, "last_pass": self.last_pass}


# ========================================================================================== lifecycle


class Service:
    """otrace itself: the database, the writer, the HTTP server, and their orderly stop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = time.monotonic()
        self.counters = Counters()
        open_database(config.db_path)
        self.events = EventQueue(config.queue_size, config.batch_size)
        self.writer = Writer(config, self.events, self.counters)
        if not self.writer.reserve.hold():
            log.warning("disk reserve not held: no room for it", extra={
                "path": str(self.writer.reserve.path), "bytes": config.disk_reserve_bytes})
        self.reader = connect(config.db_path)
        self.reader.execute("PRAGMA query_only = 1")
        self.reader_lock = threading.Lock()
        self.retention = Retention(config, self.events, EVENT_TABLES)
        self.retention.check_budget()
        self.loops: list[Loop] = [Checkpointer(config, self.events), self.retention]
        self.sampler: Sampler | None = None
        if config.metrics_interval:
            oom_seen = {key.split(".", 1)[1]: value for key, value in self.query(
                "SELECT key, value FROM otrace_state WHERE key LIKE 'oom_kill_count.%'")}
            self.sampler = Sampler(config, self.events, oom_seen)
            self.loops.append(self.sampler)
        self.tailer: LogTailer | None = None
        if config.log_path:
            known: dict[tuple[int, int], list[tuple[str, int]]] = {}
            for dev, inode, mark, position in self.query(
                    "SELECT dev, inode, fingerprint, position FROM log_offsets ORDER BY updated_at"):
                known.setdefault((dev, inode), []).append((mark, position))
            self.tailer = LogTailer(config, self.events, known)
            self.loops.append(self.tailer)
        self.writer.on_fault = self.on_write_fault
        self.pusher: Pusher | None = None
        if config.push_endpoint:
            return_big_buffers()
            self.pusher = Pusher(config, self.events, EVENT_TABLES)
            self.loops.append(self.pusher)
        else:
            log.warning("push is off: events stay in the local database (set TRACE_PUSH_ENDPOINT)")
        self.server = IngestServer(self)    # last: a start that fails before it leaves nothing bound

    def on_write_fault(self, error: str) -> None:
        """A write has just started failing: if for lack of space, run retention now."""
        if error.startswith("SQLITE_FULL"):
            self.retention.wake()

    def query(self, sql: str) -> list[tuple]:
        """A read for /health on the shared read-only connection."""
        with self.reader_lock:
            return self.reader.execute(sql).fetchall()

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def start(self) -> None:
        self.writer.start()
        for loop in self.loops:
            loop.start()
        threading.Thread(target=self.server.serve_forever, name="otrace-http", daemon=True).start()

    def health(self) -> dict[str, Any]:
        """The /health report; cheap enough to answer within 100 ms while the writer is busy."""
        counts = self.counters.snapshot()
        problems = []
        if not self.writer.is_alive():
            problems.append("writer thread is not running")
        elif self.writer.stuck:
            problems.append("writer thread is stuck")
        if self.writer.fault.error:
            problems.append("database writes failing: " + self.writer.fault.error)
        if self.writer.reserve.released:
            problems.append("disk full: reserve released, ingest paused until there is room again")
        return {
            "status": "degraded" if problems else "ok",
            "problems": problems,
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self.started, 3),
            "db_status": "error" if self.writer.fault.error else "ok",
            "writer_alive": self.writer.is_alive() and not self.writer.stuck,
            "queue_depth": self.events.qsize(),
            "queue_capacity": self.config.queue_size,
            **{f"events_{name}": counts[name] for name in Counters.EVENTS},
            "connections_open": self.server.count(),
            "connections_refused": counts["connections_refused"],
            "db_size_bytes": _file_size(self.config.db_path),
            "wal_size_bytes": _file_size(self.config.db_path + "-wal"),
            "unsynced_count": self.unsynced_count(),
            "last_write_error": self.writer.fault.error and {
                "error": self.writer.fault.error, "since": _iso(self.writer.fault.since),
                "attempts": self.writer.fault.count},
            "last_push_time": self.pusher and self.pusher.health()["last_push_time"],
            "last_push_status": self.pusher.last_status if self.pusher else "disabled",
            "push": self.pusher.health() if self.pusher else None,
            "retention": self.retention.health(self.query),
            "host": self.sampler and self.sampler.latest,
            "metrics": self.sampler and self.sampler.health(),
            "log_tail": self.tailer and self.tailer.health(),
        }

    def unsynced_count(self) -> int | None:
        counts = " + ".join(f"(SELECT count(*) FROM {table} WHERE synced = 0)" for table in EVENT_TABLES)
        try:
            return self.query(f"SELECT {counts}")[0][0]
        except sqlite3.Error:
            return None

    def stop(self, deadline: float) -> bool:
        """Stop in order within the deadline: stop accepting, finish in-flight requests, write every
        queued event, push what time allows, checkpoint the WAL, close. False if events that got a 202
        could not be written in time."""
        reserve = 0.5                       # kept for the checkpoint and the close
        cut = self.server.close(until=deadline - reserve - 1.0)
        for loop in self.loops:             # producers offer nothing more; a refused offer loses nothing
            loop.stop()
        self.events.close()
        lost = 0 if self.events.wait_drained(deadline - reserve - time.monotonic()) else self.events.qsize()
        if not lost:
            if self.pusher:
                self.pusher.flush(deadline - reserve)
            self.checkpoint(deadline)
        self.events.submit(None)
        self.writer.join(max(0.0, deadline - time.monotonic()))
        self.reader.close()
        counts = self.counters.snapshot()
        if lost:
            log.error("shutdown deadline passed with events not written", extra={"events_lost": lost})
        log.info("stopped", extra={"events_received": counts["received"], "events_persisted":
                                   counts["persisted"], "events_lost": lost, "connections_cut": cut})
        return not lost

    def checkpoint(self, deadline: float) -> None:
        """TRUNCATE checkpoint at shutdown, so the next start finds a small WAL."""
        wal = _file_size(self.config.db_path + "-wal")
        try:
            result = self.events.submit(functools.partial(checkpoint, "TRUNCATE")).result(
                max(0.0, deadline - time.monotonic()))
            log.info("wal checkpoint", extra={"mode": "truncate", "wal_bytes_before": wal, **result})
        except Exception as exc:  # noqa: BLE001 - the data is committed; the WAL stays for next start
            log.warning("wal checkpoint at shutdown failed", extra={"error": describe(exc)})


def _file_size(path: str) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="milliseconds")


def return_big_buffers() -> None:
    """Have glibc map buffers over 128 KiB on their own, so a push's multi-megabyte batches go back to
    the system when freed. Left alone, glibc raises that threshold after the first big free and keeps
    later batches in its heap: measured, 10 MB more RSS while draining a backlog."""
    m_mmap_threshold = -3
    import ctypes  # noqa: PLC0415 - imported where needed (see the imports)
    with contextlib.suppress(OSError, AttributeError):          # not glibc: nothing to tune
        ctypes.CDLL(None).mallopt(m_mmap_threshold, 128 * 1024)


def start_service(config: Config, stop_signals: set[signal.Signals]) -> Service | signal.Signals | None:
    """The Service, once its database opens. A fault of the environment (a full disk, an I/O error)
    is retried every START_RETRY seconds, logged once, until it clears or a stop signal comes (that
    signal is returned); anything else is final (None)."""
    fault = FaultLog(log, "start")
    while True:
        try:
            service = Service(config)
        except (OSError, sqlite3.Error, RuntimeError) as exc:
            if not passing(exc):
                log.critical("cannot start", extra={"error": describe(exc)})
                return None
            fault.failed(describe(exc))
            received = signal.sigtimedwait(stop_signals, START_RETRY)
            if received:
                return signal.Signals(received.si_signo)
            continue
        fault.cleared()
        return service


START_RETRY = 5.0
START_RETRY_CODES = {"SQLITE_FULL", "SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN"}


def passing(exc: BaseException) -> bool:
    """A start failure that may clear by itself: no space, an I/O error, a lock, a volume not there yet."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT)
    return primary_code(getattr(exc, "sqlite_errorname", "") or "") in START_RETRY_CODES


def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT, then stop within TRACE_SHUTDOWN_TIMEOUT. The exit code."""
    setup_logging(config.log_level)
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)   # every thread inherits this; main waits
    log.info("starting", extra={"version": __version__, "pid": os.getpid(), "settings": config.shown()})
    service = start_service(config, stop_signals)
    if service is None:
        return 1
    if isinstance(service, signal.Signals):
        log.info("stopped before starting", extra={"signal": service.name})
        return 0
    service.start()
    log.info("listening", extra={"address": service.address})
    received = signal.sigwait(stop_signals)
    deadline = time.monotonic() + config.shutdown_timeout
    log.info("shutting down", extra={"signal": signal.Signals(received).name,
                                     "timeout_s": config.shutdown_timeout})
    return 0 if service.stop(deadline) else 1


# ================================================================================================ cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="otrace", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Observability sidecar for AI agents: takes LLM traces and error events over HTTP "
                    "and keeps them in SQLite.",
        epilog="settings (environment variables):\n" + settings_table())
    parser.add_argument("--version", action="version", version=f"otrace {__version__}")
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "settings"),
                        help="serve (the default) runs the service; settings prints the settings "
                             "table as Markdown")
    args = parser.parse_args(argv)
    if args.command == "settings":
        print(settings_table(markdown=True))
        return 0
    try:
        config = Config.from_env(dict(os.environ))
    except SettingError as bad:
        print(f"otrace: {bad}", file=sys.stderr)
        return 2
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
