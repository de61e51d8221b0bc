#!/usr/bin/env python3
"""otrace: an observability sidecar for AI agents.

The agent POSTs LLM-call traces, error events and custom events over loopback HTTP, or sends
OpenTelemetry (OTLP/HTTP); otrace answers at once and a single writer thread keeps every accepted
event in SQLite. Beside them, loops sample the host's metrics, its processes and network, follow the
gateway's log and OpenClaw's session store, push unsynced rows to a remote API (otrace's JSON or OTLP),
and keep the database inside its budget. `otrace report` reads the database and says what the agent
cost and what failed.

Contents, in the order data flows. Each section opens with its constants and SQL; the thread in
brackets is the one its code runs on.

  config ............ Config, setting(), unknown_settings()                     [main, once at start]
  kit ............... FaultLog, Backoff, Loop, Stamps, QuietReader, transaction(), compact_json() [any]
  model ............. Invalid, Fields, Table, parse_events(): a POST body becomes Rows       [http]
  prices ............ PriceTable, price_call(): a call with tokens and no cost is priced   [builders]
  store ............. SCHEMA, open_database(), DatabaseLock, EventQueue, Gate, Reserve, Writer:
                      Rows become SQLite rows, in batches                                  [writer]
  ingest ............ Connection, Request, Api, IngestServer: one epoll loop for every client [http]
  otlp .............. decode_otlp(), llm_call(), Content, Series, OtlpReceiver: OTLP/HTTP traces,
                      metrics and logs become rows                                           [http]
  host metrics ...... HostReader, Cgroup, Sampler: /proc and cgroup files become
                      system_metrics                                                      [metrics]
  processes & network ProcessSampler, GatewayWatch, NetReader, DnsProbe: the process table becomes
                      process_samples; the gateway, connections, traffic and DNS join each
                      host sample                           [processes, metrics; dns: one per lookup]
  gateway log ....... LogLine, classify(), LogTailer: the gateway's log becomes log_events [logtail]
  openclaw sessions . store_events(), AgentDatabase, SessionStore: OpenClaw's transcripts become
                      llm_traces and error_events, each model call once                  [sessions]
  push .............. Packer, Batch, OtraceFormat, OtlpFormat, Receiver, Breaker, Pusher: unsynced
                      rows leave, as otrace's JSON or OTLP, at least once                     [push]
  upkeep ............ Checkpointer, Marks, Retention: the WAL shrinks, old rows are deleted
                                                                         [checkpoint, retention]
  health ............ health_report(), prometheus(), CallTally, Debug: /health, /metrics and
                      /debug/*                                  [http; a profile on its own thread]
  report ............ Report, TableView, run_report(): `otrace report`, read-only  [its own process]
  lifecycle ......... Service, serve(): start, SIGTERM, an orderly stop                      [main]
  cli ............... main()

Where a POST becomes a row: IngestServer.serve -> Api.answer -> parse_events (or OtlpReceiver.export)
-> EventQueue.offer -> Writer.flush. Where a row is pushed: Pusher.push -> Packer.batches ->
Receiver.post -> record_pushed.
Where a row is deleted: Retention.tick -> Cut. Where OpenClaw's model call becomes a row:
SessionStore.look -> read_session (or read_file) -> store_events -> EventQueue.offer.
"""

from __future__ import annotations

import binascii
import bisect
import collections
import contextlib
import dataclasses
import errno
import fcntl
import functools
import io
import itertools
import json
import logging
import math
import operator
import os
import pwd
import queue
import random
import re
import select
import signal
import socket
import sqlite3
import stat
import sys
import textwrap
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Collection, Container, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from datetime import date, datetime, timedelta
from datetime import time as dt_time
from datetime import timezone as dt_timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any, NamedTuple

try:
    from datetime import UTC
except ImportError:  # pragma: no cover - Python before 3.11, whose datetime has no UTC
    sys.exit(f"otrace: needs Python 3.11 or newer, not {sys.version.split()[0]}")
try:
    from pythonjsonlogger.json import JsonFormatter
except ImportError as missing:  # pragma: no cover - depends on the environment
    sys.exit(f"otrace: missing package {missing.name!r}: pip install -r requirements.txt, or run otrace.pyz")

# Imported where first needed, not here (see docs/design.md, "Dependencies"): urllib3 and gzip (push),
# hmac (the ingest token), difflib (a misspelled setting), argparse (arguments).

__version__ = "0.2.0"
__all__ = [
    "AgentDatabase",
    "Attempt",
    "Backoff",
    "Breaker",
    "Cgroup",
    "Config",
    "DatabaseLock",
    "EventQueue",
    "Fields",
    "GatewayWatch",
    "HostReader",
    "Invalid",
    "LogLine",
    "NetReader",
    "OtlpReceiver",
    "Point",
    "ProcessTable",
    "Receiver",
    "Row",
    "SessionStore",
    "SettingError",
    "Snapshot",
    "Unit",
    "ZombieWatch",
    "call_category",
    "classify",
    "connect",
    "cut_utf8",
    "decode_chunked",
    "decode_otlp",
    "difference",
    "failure_category",
    "host_sample",
    "insert_rows",
    "llm_call",
    "main",
    "model_failure",
    "net_sample",
    "one_per_call",
    "open_database",
    "openclaw_state_dir",
    "parse_events",
    "prometheus",
    "provider_name",
    "read_processes",
    "redact_cmdline",
    "settings_table",
    "store_events",
    "store_trace_id",
    "unknown_settings",
]

log = logging.getLogger("otrace")


# ============================================================================================== config
# One table of settings drives the parsing, `--help` and docs/settings.md: every setting is a field of
# Config, its environment variable is TRACE_<NAME>, and its metadata says what it accepts. Every
# duration, size and count has bounds; a value outside them is exit 2 naming the setting.

_DURATION = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,9})?)(ms|s|m|h|d)")   # ASCII digits only
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"([0-9]{1,15})\s*(B|KiB|MiB|GiB|TiB|kB|KB|MB|GB|TB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
               "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_RESERVED_HEADERS = {"content-type", "content-length", "content-encoding", "transfer-encoding", "host",
                     "connection", "idempotency-key"}
_DNS_NAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9-]{1,63}(?<!-))*")
_URL_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+(%[\w.-]+)?")   # a name, an IPv4 or an IPv6 address
MAX_PROBED_NAMES = 16


class SettingError(ValueError):
    """A setting's value is not one it accepts."""


@dataclasses.dataclass(frozen=True)
class Kind:
    """How to parse one kind of setting, and how to say what it accepts."""

    accepts: str
    parse: Callable[[str], Any]


def _seconds(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if not match:            # 1M is a month to some, a minute to others: refused, saying why
        raise SettingError("units are lower case" if _DURATION.fullmatch(text.strip().lower()) else "")
    return float(match[1]) * _DURATION_UNITS[match[2]]


def _bytes(text: str) -> int:
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise SettingError
    return int(match[1]) * _SIZE_UNITS[match[2]]


def duration(low: str, high: str, off: bool = False) -> Kind:
    """A duration from `low` to `high`; with `off`, also the word off (0.0)."""
    bounds = (_seconds(low), _seconds(high))

    def parse(raw: str) -> float:
        if off and raw.strip().lower() == "off":
            return 0.0
        value = _seconds(raw)
        if not bounds[0] <= value <= bounds[1]:
            raise SettingError
        return value

    return Kind(f"a duration from {low} to {high} (like 500ms, 15s, 5m, 1h, 3d)" + (", or off" * off), parse)


def size(low: str, high: str, zero_is_off: bool = False) -> Kind:
    """A size in bytes from `low` to `high`; with `zero_is_off`, also 0."""
    bounds = (_bytes(low), _bytes(high))

    def parse(raw: str) -> int:
        value = _bytes(raw)
        if not (bounds[0] <= value <= bounds[1] or (zero_is_off and value == 0)):
            raise SettingError
        return value

    return Kind(f"a size from {low} to {high} (like 16KiB, 1MiB, 5MB)" + (", or 0 for off" * zero_is_off),
                parse)


def count(low: int, high: int) -> Kind:
    def parse(raw: str) -> int:
        if not re.fullmatch(r"[0-9]{1,9}", raw.strip()) or not low <= int(raw) <= high:
            raise SettingError
        return int(raw)

    return Kind(f"an integer from {low} to {high}", parse)


def choice(*choices: str) -> Kind:
    def parse(raw: str) -> str:
        if raw.strip().lower() not in choices:
            raise SettingError
        return raw.strip().lower()

    return Kind("one of " + ", ".join(choices), parse)


def choices(*names: str) -> Kind:
    """Some of `names` (at least one), comma-separated; kept in the order of `names`."""
    def parse(raw: str) -> tuple[str, ...]:
        chosen = {item.strip().lower() for item in raw.split(",") if item.strip()}
        if not chosen or not chosen <= set(names):
            raise SettingError
        return tuple(name for name in names if name in chosen)

    return Kind("one or more of " + ", ".join(names) + ", comma-separated", parse)


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
    if not raw.strip():
        return ""
    if parts.scheme not in ("http", "https") or not _URL_HOST.fullmatch(parts.hostname or ""):
        raise SettingError
    with contextlib.suppress(ValueError):
        if parts.port != 0:                            # raises for a port that is not one
            return raw.strip()
    raise SettingError


def _headers(raw: str) -> tuple[tuple[str, str], ...]:
    """`key=value,...` as the OTLP exporters read OTEL_EXPORTER_OTLP_HEADERS (values URL-encoded)."""
    pairs = []
    for item in filter(str.strip, raw.split(",")):
        name, equals, value = item.partition("=")
        name, value = name.strip(), urllib.parse.unquote(value.strip())
        if name.lower() in _RESERVED_HEADERS:
            raise SettingError(f"{name} is set by otrace itself")
        if not equals or not _HEADER_NAME.fullmatch(name) or not (value.isprintable() and value.isascii()):
            raise SettingError
        pairs.append((name, value))
    return tuple(pairs)


def _gateway(raw: str) -> tuple:
    """`program:word,...` as (program, (word, ...)); off as ()."""
    if raw.strip().lower() == "off":
        return ()
    program, colon, words = raw.strip().partition(":")
    found = tuple(w.strip() for w in words.split(",") if w.strip())
    if not colon or not found or any(not w.isprintable() for w in (program, *found)) or "/" in program or (
            program != program.strip()):
        raise SettingError
    return program, found


def _listen_address(raw: str) -> str:
    """An IP address (IPv6 with its link's zone, if any), or a host name that resolves to an IPv4 one:
    a bad one stops the start here, not at the bind, after the database was made. A name of digits
    alone ("0", "1.5") is a typo, not a host."""
    address = raw.strip().strip("[]")
    ip, percent, zone = address.partition("%")     # an IPv6 address may name its link: fe80::1%eth0
    for family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            socket.inet_pton(family, ip)
            if percent and family == socket.AF_INET:
                raise SettingError("an IPv4 address names no interface")
            if percent and not (zone.isdigit() or zone in {name for _, name in socket.if_nameindex()}):
                raise SettingError(f"no network interface {zone!r} here")
            return address
    if not (address.isascii() and _DNS_NAME.fullmatch(address.lower().rstrip(".")) and re.search(
            r"[a-z]", address.lower())):
        raise SettingError
    with contextlib.suppress(OSError):       # "0x10", "127.1": C's old forms of an address, not names
        socket.getaddrinfo(address, None, flags=socket.AI_NUMERICHOST)
        raise SettingError
    try:                                             # a name is listened on over IPv4 (IngestServer.listen)
        socket.getaddrinfo(address, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise SettingError(f"{address} does not resolve to an IPv4 address: {exc}") from None
    return address


def _hostnames(raw: str) -> tuple[str, ...]:
    names = tuple(n.strip().rstrip(".").lower() for n in raw.split(",") if n.strip())
    if len(names) > MAX_PROBED_NAMES or not all(len(n) <= 253 and _DNS_NAME.fullmatch(n) for n in names):
        raise SettingError
    return tuple(dict.fromkeys(names))


def _price_file(raw: str) -> str:
    """A price file otrace can use, read once here so a bad one stops the start naming the setting."""
    if raw.strip():
        try:
            PriceFile.read(Path(raw.strip()))
        except (OSError, ValueError) as exc:           # UnicodeDecodeError and JSON's errors are ValueErrors
            raise SettingError(str(exc)) from None
        except (TypeError, AttributeError, LookupError, ArithmeticError, RecursionError, re.error) as exc:
            raise SettingError(f"{raw.strip()}: {exc}") from None
    return raw.strip()


def _utf8(raw: str) -> str:
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise SettingError from None
    return raw


TEXT = Kind("any text", str)
UTF8 = Kind("any UTF-8 text", _utf8)
NAME = Kind("a non-empty value", _nonempty)
ADDRESS = Kind("an IP address, or a host name that resolves to an IPv4 one", _listen_address)
SWITCH = Kind("on or off (or true/false, yes/no, 1/0)", _switch)
URL = Kind("empty, or an http:// or https:// URL", _url)
TOKEN = Kind("empty, or printable ASCII without spaces", _token)
HEADERS = Kind("empty, or key=value pairs separated by commas, values URL-encoded", _headers)
LEVEL = choice("debug", "info", "warning", "error")
GATEWAY = Kind("off, or a program name, a colon and words separated by commas (like node:openclaw,gateway)",
               _gateway)
HOSTNAMES = Kind(f"empty, or up to {MAX_PROBED_NAMES} host names separated by commas", _hostnames)
PRICES = Kind("empty, or a JSON price file shaped like prices.json", _price_file)


def _state_dir(raw: str) -> str:
    value = _nonempty(raw)
    if value.lower() in ("auto", "off"):
        return value.lower()
    if Path(value).exists() and not Path(value).is_dir():     # one not there yet is waited for
        raise SettingError(f"{value} is not a directory")
    return value


def _directory(raw: str) -> str:
    value = _nonempty(raw)
    if not Path(value).is_dir():
        raise SettingError(f"{value} is not a directory")
    return value


def _existing_or_empty(raw: str) -> str:
    if raw:
        try:
            os.stat(raw)  # noqa: PTH116 - one call, its errors told apart
        except (FileNotFoundError, NotADirectoryError):
            raise SettingError(f"{raw} does not exist") from None
        except OSError as exc:
            raise SettingError(f"{raw} cannot be looked at: {exc.strerror}") from None
    return raw


STATE_DIR = Kind("auto, off, or the path of a directory", _state_dir)
DIRECTORY = Kind("the path of a directory", _directory)
EXISTING = Kind("empty, or a path that exists", _existing_or_empty)
DISK_HIGH_MOST = 95              # TRACE_DISK_HIGH_PCT's most: room for a paused ingest to resume into
DB_HIGH_MARK = 0.85              # of TRACE_DB_MAX_BYTES: room for the WAL and what arrives while a pass runs
DB_LOW_MARK = 0.75               # a pass deletes down to here
PUSH_CAP_SHARE = 40              # a push batch holds at most this fraction of TRACE_DB_MAX_BYTES (1/40)


def setting(default: str, kind: Kind, doc: str, *, secret: bool = False) -> Any:
    """Declare one Config field: its default as written in the environment, its kind and meaning."""
    meta = {"default": default, "kind": kind, "doc": doc, "secret": secret}
    return dataclasses.field(default=kind.parse(default), metadata=meta)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting otrace has. Read from TRACE_* environment variables by `Config.from_env`."""

    host: str = setting("127.0.0.1", ADDRESS, "Address to listen on. Loopback by default: the agent runs on "
                        "the same machine. :: is every address, IPv4's too (0.0.0.0 only IPv4's).")
    port: int = setting("9090", count(0, 65535), "TCP port to listen on; 0 picks a free one (logged).")
    otlp_port: int = setting("4318", count(0, 65535), "A second TCP port, on the same host, serving the "
                             "same routes: OTLP/HTTP's own port, where an OpenTelemetry SDK with default "
                             "settings sends. 0 turns it off (OTLP is still taken on TRACE_PORT), as does "
                             "TRACE_PORT's own (logged); a port in use is logged and left out.")
    otlp_backlog: int = setting("4", count(1, 64), "OTLP export requests received and not yet answered: "
                                "they are mapped one at a time, each body held until then (up to "
                                "TRACE_MAX_BODY_BYTES once decompressed); one more is answered 503 with "
                                "Retry-After: 1.")
    otlp_content_wait: float = setting("1m", duration("1s", "1h"), "How long the content of a GenAI event "
                                       "log record waits in memory for its span to arrive: at least this, "
                                       "until the first OTLP request after it.")
    otlp_content_bytes: int = setting("4MiB", size("64KiB", "256MiB"), "Memory for GenAI event content "
                                      "waiting for its span, and for the ids of recently stored LLM "
                                      "spans; the oldest goes first when full.")
    otlp_max_series: int = setting("5000", count(100, 1_000_000), "OTLP metric series whose last point is "
                                   "kept in memory (to turn cumulative points into deltas); the least "
                                   "recently updated is read back from the database when it returns.")
    db_path: str = setting("/data/openclaw-trace.db", NAME, "SQLite database file; its directory is "
                           "created (mode 0700); one otrace cannot make or use is exit 2 (1 on a full "
                           "disk). A symlink is resolved once, at start.")
    log_level: str = setting("info", LEVEL, "Least severe log level written to stdout.")
    ingest_token: str = setting("", TOKEN, "When set, requests need `Authorization: Bearer <token>` "
                                "(all but /health and /metrics).", secret=True)
    max_body_bytes: int = setting("1MiB", size("1KiB", "256MiB"), "Largest request body, after any "
                                  "gzip is undone; a larger one is answered 413. At most "
                                  "TRACE_MAX_BUFFERED_BYTES (lowered, with a warning).")
    max_buffered_bytes: int = setting("16MiB", size("64KiB", "4GiB"), "Request bodies held in memory "
                                      "across all connections at once; a request that would pass it is "
                                      "answered 503 before its body is read.")
    max_text_bytes: int = setting("16KiB", size("64B", "16MiB"), "Texts (input_text, output_text, "
                                  "message, stack_trace) and metadata are cut to this many UTF-8 bytes.")
    prices: str = setting("", PRICES, "Your own LLM prices, over the vendored prices.json (genai-prices): "
                          "its models match first. A call that reports tokens and no cost is priced at "
                          "ingest; one no table prices keeps no cost.")
    metrics_max_models: int = setting("50", count(1, 1000), "Provider and model pairs that get series "
                                      "of their own on /metrics; calls of later pairs count under "
                                      "provider and model \"other\".")
    max_events: int = setting("1000", count(1, 100_000), "Most events one request may carry as a JSON "
                              "array.")
    queue_size: int = setting("512", count(1, 100_000), "Events waiting for the writer. A request that "
                              "does not fit whole has the writer commit what is waiting and waits up to "
                              "50 ms for room, then gets 503. One larger than the queue goes in beside "
                              "the others, one such request at a time. The gateway log's and the session "
                              "store's readers leave a quarter of it to clients.")
    batch_size: int = setting("50", count(1, 10_000), "Most events the writer commits in one "
                              "transaction; at most half of TRACE_QUEUE_SIZE (lowered, with a warning).")
    batch_window: float = setting("500ms", duration("1ms", "10s"), "Longest an event waits in the queue "
                                  "for its batch to fill: the most a SIGKILL can lose.")
    read_timeout: float = setting("10s", duration("100ms", "1h"), "Longest a client may take to send one "
                                  "whole request or to take its answer, and to stay idle between "
                                  "requests on a kept-alive connection.")
    max_connections: int = setting("256", count(1, 10_000), "Open client connections. 8 more serve only "
                                   "GET and HEAD on /health and /metrics (probes, scrapes) for as long "
                                   "as they stay open; a new one takes the place of the oldest of them "
                                   "that holds no request, else it is answered 503 and closed. Lowered "
                                   "at start to what the process's file-descriptor limit allows, the 8, "
                                   "16 refused ones closing and 64 for otrace's own files counted in "
                                   "(ulimit -n 89 or under: one).")
    shutdown_timeout: float = setting("4s", duration("500ms", "10m"), "Time from SIGTERM to exit: answer "
                                      "in-flight requests, write the queue, push what time allows, "
                                      "checkpoint, close.")
    metrics_interval: float = setting("15s", duration("100ms", "1d", off=True), "Time between host metrics "
                                      "samples (the first one only primes the counters); off stops "
                                      "sampling.")
    proc_interval: float = setting("60s", duration("1s", "1d", off=True), "Time between scans of the "
                                   "process table: the top processes into process_samples (the first scan "
                                   "only primes the CPU counters), and the zombie count; off stops both.")
    proc_top: int = setting("10", count(1, 100), "Processes by CPU in each process sample, beside the top "
                            "10 by memory.")
    zombie_alert: int = setting("5", count(0, 1_000_000), "Zombie processes that, seen in two scans of "
                                "the process table in a row, make one error event (zombie_processes) per "
                                "episode; 0: off.")
    gateway_match: tuple = setting("node:openclaw,gateway", GATEWAY, "The OpenClaw gateway's process, "
                                   "watched in every host sample: `program:word,...` is a process whose "
                                   "executable (or argv[0], or name) is program and whose command line "
                                   "holds every word, once it listens on a TCP port; an empty program "
                                   "matches any; off: no watch.")
    dns_probe: tuple = setting("api.anthropic.com,api.openai.com", HOSTNAMES, "Host names resolved every "
                               "TRACE_DNS_INTERVAL, their time and outcome kept; two failures in a row of "
                               "a name are one network_failure event. Empty: off.")
    dns_interval: float = setting("1m", duration("1s", "1d"), "Time between DNS probes.")
    dns_timeout: float = setting("5s", duration("100ms", "1m"), "Longest a DNS probe waits for a name "
                                 "(the lookup runs on a thread of its own, left to finish if it hangs).")
    debug: bool = setting("off", SWITCH, "Answer /debug/vars, /debug/threads, /debug/profile and "
                          "/debug/memory, to loopback clients only (with the ingest token when one is "
                          "set).")
    debug_tracemalloc: bool = setting("off", SWITCH, "Trace Python allocations from the start, for "
                                      "/debug/memory (costs memory and CPU while on; needs TRACE_DEBUG).")
    cgroup: str = setting("auto", choice("auto", "v2", "v1", "none"), "Which cgroup hierarchy host "
                          "metrics come from; none reads /proc only (a VM). For a systemd unit of "
                          "otrace's own, auto reads the cgroup around it that bounds the agent too, else "
                          "/proc (see docs/operations.md).")
    procfs: str = setting("/proc", DIRECTORY, "Where procfs is mounted (a host's /proc seen from a container "
                          "can be mounted elsewhere).")
    sysfs: str = setting("/sys", DIRECTORY, "Where sysfs is mounted.")
    disk_path: str = setting("", EXISTING, "A path on the filesystem whose space and I/O are reported; "
                             "empty: the database's directory.")
    log_path: str = setting("", TEXT, "The OpenClaw gateway log to follow: a file, or a directory whose "
                            "newest openclaw*-YYYY-MM-DD.log is followed (of one OpenClaw profile: "
                            "operations.md); empty: off.")
    log_poll: float = setting("500ms", duration("10ms", "1m"), "Time between looks at the log file.")
    log_start: str = setting("end", choice("end", "beginning"), "Where to start the first time otrace "
                             "follows this log; from then on it resumes where it stopped, and reads a file "
                             "of the log it has not seen (a new day, a rotation while it was down) whole.")
    log_keep_all: bool = setting("off", SWITCH, "Keep INFO and DEBUG lines of no known kind too (they "
                                 "are skipped by default).")
    log_line_max: int = setting("1MiB", size("64KiB", "64MiB"), "Longest gateway log line read whole; a "
                                "longer one is skipped (counted as cut in /health, said once per file), "
                                "never held. The lines otrace reads at once hold at most 4 MiB, or one line.")
    openclaw_state_dir: str = setting("auto", STATE_DIR, "OpenClaw's state directory, whose `agents/*/` "
                                      "session stores give every model call's tokens and cost; auto: "
                                      "$OPENCLAW_STATE_DIR, else ~/.openclaw when it exists or when "
                                      "TRACE_LOG_PATH is set (~/.openclaw-<profile> for a profile's log; "
                                      "a user with no home: not read, said at start); off: not read. A "
                                      "directory not there yet is waited for.")
    quiet_poll: float = setting("5s", duration("10ms", "10m"), "The longest wait between looks at a quiet "
                                "gateway log or session store: each look that finds nothing new doubles "
                                "the wait, from TRACE_LOG_POLL (TRACE_OPENCLAW_POLL) up to this; something "
                                "new brings it back.")
    notified_poll: float = setting("1m", duration("1s", "1d", off=True), "The longest wait between "
                                   "looks at a quiet gateway log or session store where the kernel tells "
                                   "otrace of changes to its files (inotify): a change is read when it "
                                   "happens, and this look catches one not told (a file written from "
                                   "another machine), after which that reader looks every "
                                   "TRACE_QUIET_POLL at most; off: look every TRACE_QUIET_POLL at most.")
    openclaw_poll: float = setting("2s", duration("10ms", "1h"), "Time between looks for new entries in "
                                   "OpenClaw's session stores.")
    checkpoint_interval: float = setting("10m", duration("10ms", "1d"), "Time between WAL checkpoints "
                                         "(PASSIVE; TRUNCATE when the WAL is over TRACE_WAL_MAX_BYTES).")
    wal_max_bytes: int = setting("50MiB", size("64KiB", "64GiB"), "WAL size that makes the next "
                                 "checkpoint a TRUNCATE, and the most SQLite's journal_size_limit keeps.")
    cleanup_interval: float = setting("5m", duration("10ms", "1d"), "Time between retention passes.")
    retention: float = setting("3d", duration("1s", "3650d"), "Age (since arrival) after which pushed "
                               "rows are deleted (but each table's newest row, whose id must not come "
                               "back: see operations.md).")
    db_max_bytes: int = setting("200MiB", size("1MiB", "16TiB"), "Most the database (file + WAL) may "
                                f"use: past {DB_HIGH_MARK * 100:.0f} % of it (less after a flood; the WAL "
                                f"counted at the most it reached lately) the oldest rows are deleted, down "
                                f"to {DB_LOW_MARK * 100:.0f} % less that WAL (see docs/operations.md).")
    disk_reserve_bytes: int = setting("16MiB", size("64KiB", "4GiB", zero_is_off=True), "Space held in a "
                                      "file beside the database and given up on the first disk-full "
                                      "write, so what was accepted still commits; ingest then answers "
                                      "503 until the space is back. 0: off (then a full disk stays full "
                                      "until space is freed by hand: deleting rows needs room in the WAL).")
    disk_high_pct: int = setting("80", count(1, 100), "Disk use (as df counts it) that starts deleting "
                                 "pushed rows, down to 5 points below it (rows not yet pushed only while "
                                 "otrace's own database is what fills the disk). Under it, "
                                 f"ingest paused by a full disk resumes without the reserve: at most "
                                 f"{DISK_HIGH_MOST} (lowered, with a warning).")
    push_endpoint: str = setting("", URL, "Remote API that receives unsynced events in batches (see "
                                 "TRACE_PUSH_FORMAT); empty turns push off. A user:password@ in it is "
                                 "sent as Basic auth.")
    push_format: str = setting("otrace", choice("otrace", "otlp"), "What push sends: otrace's own JSON "
                               "batches, or OTLP, for any OpenTelemetry backend (TRACE_PUSH_ENDPOINT is "
                               "then its base URL: /v1/traces, /v1/logs and /v1/metrics are appended).")
    push_otlp_protocol: str = setting("http/protobuf", choice("http/protobuf", "http/json"), "OTLP's "
                                      "encoding when TRACE_PUSH_FORMAT=otlp.")
    push_signals: tuple = setting("traces,metrics,logs", choices("traces", "metrics", "logs"), "Which rows "
                                  "push sends: traces (LLM calls), metrics (host samples, GenAI metric "
                                  "points), logs (errors, log events, and OTLP reports of rows given up). "
                                  "Name only what the receiver takes (Arize Phoenix takes traces alone): "
                                  "in OTLP a signal whose endpoint answers an error opens its own breaker "
                                  "and its rows wait while the others go. Rows left out stay in the "
                                  "local database, as with push off.")
    push_interval: float = setting("5m", duration("100ms", "1d"), "Time between push cycles.")
    push_token: str = setting("", TOKEN, "Sent to the push endpoint as `Authorization: Bearer "
                              "<token>`; never logged. Not with a user:password@ in TRACE_PUSH_ENDPOINT "
                              "(both would be that header: exit 2).", secret=True)
    push_headers: tuple = setting("", HEADERS, "Extra headers for every push request, as the OTLP "
                                  "exporters write them: `key=value,key2=value2`; never logged. Not the "
                                  "ones otrace sets (Content-Type, Content-Length, Content-Encoding, "
                                  "Transfer-Encoding, Host, Connection, Idempotency-Key), nor "
                                  "Authorization with TRACE_PUSH_TOKEN or a user:password@ in "
                                  "TRACE_PUSH_ENDPOINT.", secret=True)
    push_max_bytes: int = setting("5MiB", size("1KiB", "256MiB"), "Largest body of one push request "
                                  "(before gzip); a single larger event is sent alone. At most "
                                  f"1/{PUSH_CAP_SHARE} of TRACE_DB_MAX_BYTES (lowered, with a warning "
                                  "when push is on): marking a batch's rows pushed rewrites their pages "
                                  "into the WAL, which the cap counts.")
    push_timeout: float = setting("30s", duration("100ms", "10m"), "Longest one push request may take, "
                                  "from connecting to the last byte of the answer (one not whole by "
                                  "then is no answer: the batch goes again).")
    push_gzip: bool = setting("off", SWITCH, "Compress push bodies (Content-Encoding: gzip).")
    push_retries: int = setting("5", count(1, 1000), "Attempts at one batch within a cycle before the "
                                "cycle (in OTLP, its signal's) counts as failed; the rows wait for the "
                                "next cycle.")
    push_backoff_base: float = setting("1s", duration("1ms", "1h"), "First retry wait; each retry "
                                       "doubles the ceiling, and the wait is drawn uniformly below it "
                                       "(full jitter). A Retry-After answer is a floor (up to 1 h). At "
                                       "most TRACE_PUSH_BACKOFF_CAP (lowered, with a warning when push is "
                                       "on).")
    push_backoff_cap: float = setting("1m", duration("1ms", "1d"), "Highest retry wait ceiling.")
    push_breaker_threshold: int = setting("3", count(1, 1000), "Failed cycles in a row that open the "
                                          "circuit breaker (in OTLP each signal has its own).")
    push_breaker_cooldown: float = setting("5m", duration("100ms", "1d"), "Wait of an open breaker before "
                                           "the next try; it doubles with each further failed cycle, up "
                                           "to 1 h.")
    agent_id: str = setting("", UTF8, "Name of this agent in pushed batches; empty: the host name.")

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> Config:
        """Build a Config from TRACE_* variables, raising SettingError naming the first bad one."""
        values = {}
        for spec in dataclasses.fields(cls):
            name = env_name(spec)
            if name in environ:
                try:
                    values[spec.name] = spec.metadata["kind"].parse(environ[name])
                except (SettingError, ValueError) as exc:
                    accepts = spec.metadata["kind"].accepts
                    shown = cls.displayed(spec, environ[name])
                    shown = shown if shown == "***" else repr(shown[:200])
                    why = f" ({exc})" if isinstance(exc, SettingError) and str(exc) else ""
                    raise SettingError(f"{name}={shown} is not valid: expected {accepts}{why}") from None
        config = cls(**values)
        if config.push_token and urllib.parse.urlsplit(config.push_endpoint).username is not None:
            raise SettingError("TRACE_PUSH_ENDPOINT holds user:password@ and TRACE_PUSH_TOKEN is set: "
                               "both would be the Authorization header; keep one")
        if any(name.lower() == "authorization" for name, _ in config.push_headers) and (
                config.push_token or urllib.parse.urlsplit(config.push_endpoint).username is not None):
            raise SettingError("TRACE_PUSH_HEADERS holds Authorization, and so does " + (
                "TRACE_PUSH_TOKEN" if config.push_token else "TRACE_PUSH_ENDPOINT's user:password@") +
                ": both would be the Authorization header; keep one")
        if config.debug_tracemalloc and not config.debug:
            raise SettingError("TRACE_DEBUG_TRACEMALLOC=on needs TRACE_DEBUG=on: /debug/memory is what "
                               "reads the traces")
        return config

    def shown(self) -> dict[str, Any]:
        """The effective settings for the startup log."""
        return {spec.name: self.displayed(spec, getattr(self, spec.name))
                for spec in dataclasses.fields(self)}

    @staticmethod
    def displayed(spec: dataclasses.Field, value: Any) -> Any:
        """A setting's value as a log or an error shows it: a secret masked, the push URL redacted."""
        if spec.metadata["secret"] and value:
            return "***"
        if spec.name == "push_endpoint":
            try:
                return redact_url(value)
            except ValueError:                         # not even a URL: nothing of it is shown
                return "***"
        return value


def env_name(spec: dataclasses.Field) -> str:
    return "TRACE_" + spec.name.upper()


def unknown_settings(environ: Iterable[str]) -> list[str]:
    """A warning for every TRACE_* variable otrace does not know, naming the closest one it does."""
    known = [env_name(spec) for spec in dataclasses.fields(Config)]
    warnings = []
    for name in sorted(n for n in environ if n.startswith("TRACE_") and n not in known):
        import difflib  # noqa: PLC0415 - only for a misspelled setting: 0.1 MiB a start need not hold
        close = difflib.get_close_matches(name[6:].upper(), [k[6:] for k in known], n=1, cutoff=0.75)
        warnings.append(f"{name} is not a setting otrace knows" + (f"; did you mean TRACE_{close[0]}?"
                                                                  if close else ""))
    return warnings


def redact_url(url: str) -> str:
    """The URL without its user:password@ and fragment, every query value (a bare item whole) masked:
    fit for logs and /health."""
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    if "@" in url and "@" not in parts.netloc:      # a mistyped scheme, or a / ? # in the password
        scheme, sep, _ = url.rpartition("@")[0].partition("://")
        parts = urllib.parse.urlsplit((scheme + sep if sep else "") + "***@" + url.rpartition("@")[2])
    query = "&".join(pair.partition("=")[0] + "=***" if "=" in pair else "***"
                     for pair in parts.query.split("&") if pair)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query=query, fragment="").geturl()


def settings_table(markdown: bool = False) -> str:
    """Every setting with its default and meaning, for --help (plain) or docs/settings.md (markdown)."""
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
    logging.getLogger("urllib3").setLevel(logging.WARNING)   # its debug lines name the push URL's query


# ================================================================================================= kit
# Small pieces every section uses: one way to log a failure that repeats, to back off, to run a timer
# loop, to tell that a reader's files have not changed, to run a transaction, to tell an environment
# fault from a bad row, and to write JSON.

# SQLite result codes that mean "the environment, not this row": a write is retried as it is, and a
# start that meets one waits for it to clear.
ENVIRONMENT_CODES = frozenset({
    "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN",
    "SQLITE_NOMEM", "SQLITE_PROTOCOL", "SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_PERM",
    "SQLITE_INTERRUPT", "SQLITE_ABORT"})
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EDQUOT})
CORRUPTION = ("SQLITE_CORRUPT", "SQLITE_NOTADB")   # a fault of the file: waiting does not clear it at start
_ids = random.Random()           # seeded from os.urandom once
_UUID7_RANDOM = 0xFFF << 64 | (1 << 62) - 1        # rand_a (12 bits) and rand_b (62 bits)
STAMP_MARGIN_NS = 3_000_000_000  # stamps are trusted only when older than their look by this (see Stamps)
IN_MODIFY, IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x2, 0x4, 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_ONLYDIR = 0x400, 0x800, 0x1000000    # inotify(7)'s masks (see Changes)
FILE_CHANGES = IN_MODIFY | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF
DIRECTORY_CHANGES = (IN_ATTRIB | IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF |
                     IN_MOVE_SELF | IN_ONLYDIR)      # its entries come and go; their writes are not asked
INOTIFY_LIMITS = {errno.EMFILE: "fs.inotify.max_user_instances", errno.ENOSPC: "fs.inotify.max_user_watches"}
STUCK_TICK = 600.0               # a loop's tick with no rest and no progress this long is stuck (see Loop)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MILLISECOND = timedelta(milliseconds=1)   # made once: timedelta's keywords cost more than the division


def sqlite_code(exc: BaseException) -> str | None:
    """SQLite's primary result code of an error (SQLITE_IOERR_WRITE is SQLITE_IOERR), if it has one."""
    name = getattr(exc, "sqlite_errorname", None)
    return primary_code(name) if name else None


def primary_code(error: str) -> str:
    """The primary result code a result code's name, or an error as describe() words it, begins with."""
    return "_".join(error.split(":", 1)[0].split("_")[:2])


def is_environment(exc: BaseException) -> bool:
    """True when a failed write should be retried as it is (the disk, a lock, the file); False when a
    row's own data is to blame (a constraint, or a value SQLite cannot bind)."""
    code = sqlite_code(exc)
    if code:
        return code in ENVIRONMENT_CODES
    if isinstance(exc, OSError):
        return exc.errno in ENVIRONMENT_ERRNOS
    return isinstance(exc, (sqlite3.OperationalError, MemoryError))


class Condition(Exception):
    """A failure a loop reports in its own words (a full queue, an unreadable file): no traceback."""


def describe(exc: BaseException) -> str:
    if isinstance(exc, Condition):
        return str(exc)
    return f"{getattr(exc, 'sqlite_errorname', None) or type(exc).__name__}: {exc}"


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, immediate: bool = True) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (connections use isolation_level None).
    Not `immediate`: a deferred BEGIN, which locks only the attached databases its statements use."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):  # no transaction left to roll back
            conn.execute("ROLLBACK")
        raise


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def epoch_ms(moment: datetime) -> int:
    """An aware time as Unix ms, what is below a millisecond cut off as a number's fraction is (rounded,
    the last instant of a day fell on the next; a float's product can land a millisecond low)."""
    return (moment - EPOCH) // MILLISECOND


def new_id() -> str:
    """A time-ordered UUID (version 7: Unix milliseconds, then 74 random bits) for an event that came
    without a trace_id: new ids land at the end of the trace_id index, not on random pages of it. The
    bits come from a PRNG seeded once: ids must be unique, not secret."""
    bits = now_ms() << 80 | 0x7000 << 64 | 0x8000 << 48 | _ids.getrandbits(128) & _UUID7_RANDOM
    digits = f"{bits:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def clean_text(text: str) -> str:
    """Replace lone surrogates (valid in JSON, not in UTF-8) with U+FFFD so the text can be stored."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def host_name() -> str:
    """This machine's name, as text that can be sent (a name not UTF-8 still names it)."""
    return clean_text(socket.gethostname())


def cut_utf8(text: str, limit: int) -> tuple[str, int, bool]:
    """Cut text to at most `limit` UTF-8 bytes on a character boundary: (text, original bytes, cut?)."""
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:                   # lone surrogates: replaced first
        text = clean_text(text)
        raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text, len(raw), False
    return raw[:limit].decode("utf-8", "ignore"), len(raw), True


# json.dumps with these arguments makes a new encoder each call: one, made once
COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def compact_json(value: Any, limit: int) -> tuple[str, bool]:
    """Compact JSON of `value` for a TEXT column, and whether it was over `limit` bytes (then a small
    marker object stands in for it). Raises ValueError for NaN or infinities, RecursionError for a
    value nested too deeply to write."""
    text = COMPACT_JSON.encode(value)
    try:
        size = len(text.encode("utf-8"))         # one encoding: the size, and no lone surrogate in it
    except UnicodeEncodeError:
        text = clean_text(text)
        size = len(text.encode("utf-8"))
    if size <= limit:
        return text, False
    return json.dumps({"_otrace_truncated": True, "original_bytes": size}), True


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="milliseconds")


def wall_time(monotonic_at: float) -> float:
    """The wall-clock time of a time.monotonic() moment, to say it."""
    return time.time() + monotonic_at - time.monotonic()


def file_size(path: str | Path) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def disk_usage(path: str) -> tuple[int, int, int, float]:
    """(total, used, available to unprivileged users, used %) of the filesystem holding `path`, with
    the percentage as df computes it: used / (used + available), so root's reserve counts as full."""
    st = os.statvfs(path)
    total, used, avail = st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize, \
        st.f_bavail * st.f_frsize
    return total, used, avail, df_percent(used, avail)


def df_percent(used: int, avail: int) -> float:
    """A disk's use as df says it: used / (used + available)."""
    return round(100.0 * used / (used + avail), 2) if used + avail else 0.0


def over_low_mark(used: int, avail: int, high_pct: float) -> float:
    """The bytes a disk is over retention's low mark (Retention.LOW_DISK points under `high_pct`)."""
    return used - (high_pct - Retention.LOW_DISK) / 100 * (used + avail)


class Counters:
    """Tallies shared between threads, read whole for /health."""

    def __init__(self, names: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def add_all(self, counts: Mapping[str, int]) -> None:
        with self._lock:
            for name, n in counts.items():
                self._values[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class FaultLog:
    """Logs a failure that repeats (every retry) once when it starts or changes, and once when it ends."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger, self.what = logger, what
        self.error: str | None = None
        self.since = 0.0
        self.count = 0

    def failed(self, error: str, began: float | None = None) -> None:
        """`began`: when the failed attempt started, for one that waited (a lock) before it failed."""
        self.count += 1
        if error != self.error:              # state first: whoever read the line finds /health agreeing
            if self.error is None:
                self.since = began or time.time()
            self.error = error
            self.logger.error("%s failing", self.what, extra={"error": error, "attempt": self.count})

    def cleared(self) -> None:
        if self.error is not None:
            attempts, seconds = self.count, round(time.time() - self.since, 3)
            self.error, self.count = None, 0
            self.logger.warning("%s recovered", self.what, extra={
                "failed_attempts": attempts, "failed_seconds": seconds})

    def health(self) -> dict[str, Any] | None:
        return self.error and {"error": self.error, "since": iso(self.since), "attempts": self.count}


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
    stopped. A tick reports failure by raising: the loop logs it through FaultLog (once per change)
    and goes on; it never dies of one. One that neither ends, waits (`rest`) nor moves on (`progress`)
    for `stuck_after` seconds is stuck, and /health says so."""

    def __init__(self, name: str, interval: float, first_delay: float | None = None,
                 quiet: float = 0.0) -> None:
        super().__init__(name=f"otrace-{name}", daemon=True)
        self.interval = interval
        self.quiet = quiet               # a reader's longest wait while its looks find nothing (0: none)
        self.idle_wait = interval        # the current wait of a quiet reader
        self.news = False                # the last tick found something to read
        self.stirred = False             # the last wait ended on word of a change: waits start anew
        self.first_delay = interval if first_delay is None else first_delay
        self.stopping = threading.Event()
        self.bell = threading.Event()
        self.log = logging.getLogger(f"otrace.{name}")
        self.fault = FaultLog(self.log, name)
        self.ticks = 0
        self.behind = False              # the queue refused the last offer: look again soon
        self.busy_since: float | None = None    # in a tick: when it began, or last rested or moved on
        self.stuck_after = STUCK_TICK

    def progress(self) -> None:
        """A long tick's work moves on (a unit taken, an answer): it is not stuck."""
        if threading.current_thread() is self:      # not the final push, on the main thread
            self.busy_since = time.monotonic()

    def rest(self, seconds: float) -> bool:
        """Wait inside a tick (a backoff, a Retry-After), which is not being stuck; True if stopping."""
        resting, self.busy_since = threading.current_thread() is self, None
        try:
            return self.stopping.wait(seconds)
        finally:
            if resting:
                self.progress()

    def stuck_for(self) -> float | None:
        """Seconds in a tick with no rest and no progress, past `stuck_after`; else None."""
        since = self.busy_since
        took = 0.0 if since is None else time.monotonic() - since
        return took if took > self.stuck_after else None

    def wake(self) -> None:
        """Run the next tick now instead of at its time."""
        self.bell.set()

    def stop(self) -> None:
        """Ask the loop to end; a tick under way finishes (nothing waits for it)."""
        self.stopping.set()
        self.wake()

    def pause(self, delay: float) -> None:
        """Wait `delay` seconds between ticks, or until woken."""
        self.bell.wait(delay)
        self.bell.clear()

    def run(self) -> None:
        delay = self.first_delay
        while True:
            self.pause(delay)
            if self.stopping.is_set():
                return
            self.ticks += 1
            self.news = False
            self.progress()
            try:
                self.tick()
            except Exception as exc:  # a loop outlives any one failure
                known = isinstance(exc, (Condition, OSError)) or is_environment(exc)   # a file, a socket
                if self.fault.error is None and not known:
                    self.log.exception("%s failed", self.name)          # a bug: its traceback
                self.fault.failed(describe(exc))
            else:
                self.fault.cleared()
            finally:
                self.busy_since = None
            delay = self.next_delay()

    def next_delay(self) -> float:
        """The interval; 2 ms while catching up behind a full queue; for a reader with a quiet wait,
        twice the last wait (up to it) after a look that found nothing, unless word of a change ended
        that wait (what was told may be seen a moment later): an idle look costs a wake-up."""
        if self.behind:
            return min(self.interval, 0.002)
        self.idle_wait = (self.interval if self.news or self.stirred
                          else min(2 * self.idle_wait, max(self.interval, self.quiet)))
        self.stirred = False
        return self.idle_wait

    def tick(self) -> None:
        raise NotImplementedError


Stamp = tuple[int, int, int, int, int]   # device, inode, size, modification and change times (ns)


class Stamps:
    """What a reader's files looked like when a look that found nothing began: while every one of them
    stays the same, a look would find nothing again, and a few stat calls stand in for it. A file is
    named by its path, or by a descriptor when what is read is the open file."""

    def __init__(self, margin_ns: int = STAMP_MARGIN_NS) -> None:
        self.margin_ns = margin_ns
        self.kept: tuple[tuple[str | int, ...], list[Stamp | None]] | None = None
        self.taken: tuple[tuple[str | int, ...], list[Stamp | None]] | None = None

    def unchanged(self, watched: tuple[str | int, ...]) -> bool:
        """True when `watched` are the files kept and none changed since; else False, and the stamps
        just taken wait for `keep`. Nothing watched is never unchanged."""
        if not watched:
            self.kept = self.taken = None
            return False
        now = time.time_ns()
        taken = watched, [stamp(file) for file in watched]
        if taken == self.kept:
            return True
        # a write in the timestamp step of its stat can leave every stamp as it was (1 s on some
        # filesystems, 2 s on FAT): only stamps older than the look by more than that can tell it
        old = now - self.margin_ns
        self.kept = None
        self.taken = taken if all(s is None or (s[3] < old and s[4] < old) for s in taken[1]) else None
        return False

    def keep(self) -> None:
        """The look after `unchanged` found nothing: what it saw holds until a stamp changes."""
        self.kept, self.taken = self.taken, None

    def still(self) -> bool:
        """Whether the files kept are still as stamped."""
        return self.kept is not None and [stamp(file) for file in self.kept[0]] == self.kept[1]


def stamp(file: str | int) -> Stamp | None:
    """A file's stamp; None when it is not there (or cannot be looked at)."""
    try:
        st = os.stat(file)  # noqa: PTH116 - a path or a descriptor, and no Path object per look
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Changes:
    """The kernel's word (Linux inotify) that a file changed, or an entry of its directory: `watch` the
    files a quiet reader stamped, and `wait` returns when one changes, when rung, or at its timeout."""

    def __init__(self, libc: Any, get_errno: Callable[[], int]) -> None:
        self.libc, self.get_errno = libc, get_errno
        self.fd = -1
        self.watching: tuple[tuple[str | int, ...], list[tuple[int, ...] | None]] | None = None
        self.bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.closing = threading.Lock()

    @classmethod
    def made(cls) -> Changes | None:
        """Changes, or None where there is no inotify (not Linux; a libc without it, or no ctypes)."""
        lib = libc()
        if lib is None or not hasattr(lib, "inotify_init1") or not hasattr(os, "eventfd"):
            return None
        import ctypes  # noqa: PLC0415 - loaded at start already (see libc)
        return cls(lib, ctypes.get_errno)

    def watch(self, files: tuple[str | int, ...], stamps: list[Stamp | None]) -> bool:
        """Be told of changes to `files` (a directory's entries, a file's writes: named, or an open
        file's descriptor), as `stamps` found them, and to the entries of a named file's directory;
        False where the kernel would not watch them all (no room for more watches, a directory gone)."""
        key = files, [stamp and stamp[:2] for stamp in stamps]    # a name may hold a new file: its inode
        if key == self.watching:
            return True
        self.unwatch()       # a new instance drops every old watch at once
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd >= 0 and all(self.add(file) for file in files):
            self.watching = key
            return True
        self.unwatch()
        return False

    def add(self, file: str | int) -> bool:
        if not isinstance(file, str):
            return bool(self.watch_path(f"/proc/self/fd/{file}"))
        mask = self.watch_path(file)
        if not mask and self.get_errno() != errno.ENOENT:
            return False
        # a file named may be renamed over, or come later: its directory tells
        return mask == DIRECTORY_CHANGES or bool(self.watch_path(os.path.dirname(file) or "."))  # noqa: PTH120

    def watch_path(self, path: str) -> int:
        """Watch a directory's entries, or a file's writes: the mask it took; 0 if neither."""
        raw = os.fsencode(path)
        if self.libc.inotify_add_watch(self.fd, raw, DIRECTORY_CHANGES) >= 0:
            return DIRECTORY_CHANGES
        if self.get_errno() == errno.ENOTDIR and self.libc.inotify_add_watch(self.fd, raw, FILE_CHANGES) >= 0:
            return FILE_CHANGES
        return 0

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a change told, or a ring; whether a change was told."""
        poller = select.poll()           # not select(): a descriptor past 1023 is fine
        poller.register(self.fd, select.POLLIN)
        poller.register(self.bell, select.POLLIN)
        told = any(fd == self.fd for fd, _ in poller.poll(timeout * 1000))
        self.drain()
        self.drain(self.bell)
        return told

    def drain(self, fd: int | None = None) -> None:
        """Forget what was told (or, with the bell, rung) so far."""
        fd = self.fd if fd is None else fd
        with contextlib.suppress(BlockingIOError):
            while fd >= 0 and os.read(fd, 65536):
                pass

    def ring(self) -> None:
        with self.closing:               # from another thread: never a closed (or reused) descriptor
            if self.bell >= 0:
                os.eventfd_write(self.bell, 1)

    def unwatch(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.watching = -1, None

    def close(self) -> None:
        self.unwatch()
        with self.closing:
            os.close(self.bell)
            self.bell = -1


@functools.cache
def libc() -> Any:
    """The C library through ctypes, or None where it cannot be loaded."""
    try:
        import ctypes  # noqa: PLC0415 - imported where needed (see the imports)
        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):       # a Python built without ctypes, a static binary
        return None


def paths_among(files: tuple[str | int, ...]) -> list[str]:
    """The paths among files named or opened (a descriptor's number says nothing in a log line)."""
    return [file for file in files if isinstance(file, str)]


def int64(n: int) -> int:
    """An unsigned 64-bit number (an inode: NFS and overlayfs may set its top bit) as SQLite's signed
    INTEGER holds it; `% 2**64` of what is read back is the number again."""
    return n - (1 << 64) if n >= 1 << 63 else n


class Behind(Exception):
    """The queue refused a reader's unit: what it held is read again at the next look, which comes soon."""


class QuietReader(Loop):
    """A loop that reads what another process writes: each tick a look (`look`), or only a few stat
    calls while the files it reads (`watched`) are as they were at a look that found nothing."""

    def __init__(self, name: str, interval: float, quiet: float, notified_poll: float,
                 events: EventQueue) -> None:
        super().__init__(name, interval, first_delay=0.0, quiet=quiet)
        self.events = events
        self.stamps = Stamps()
        self.notified_poll = notified_poll   # the longest wait for the kernel's word of a change (0: none)
        self.changes: Changes | None = None
        self.told_of: tuple | None = None    # the stamps kept when the kernel last told of a change
        self.unwatched = False               # the kernel would not watch them at the last quiet wait
        # the tallies of the unit being read, counted once the queue takes it: a refused one is read again
        self.staged: collections.Counter[str] = collections.Counter()

    def tick(self) -> None:
        watched = self.watched()
        if self.stamps.unchanged(watched):
            return
        self.behind = False
        try:
            self.look()
        except Behind:
            self.behind = True
            return
        if not self.news and self.watched() == watched:
            self.stamps.keep()

    def pause(self, delay: float) -> None:
        try:
            self.wait_for_word(delay)
        except Exception as exc:  # noqa: BLE001 - a reader never dies of its wait: it looks on the timer
            self.notified_poll = 0.0
            said = self.log.warning if isinstance(exc, OSError) else self.log.exception   # a bug: traceback
            said("waiting for the kernel's word of a change failed: looking on the timer from now on",
                 extra={"error": describe(exc)})
            super().pause(delay)

    def wait_for_word(self, delay: float) -> None:
        """While the files a look would read stay as stamped, wait for the kernel to tell of a change
        (up to TRACE_NOTIFIED_POLL) rather than look again every `delay`: an idle file costs nothing."""
        kept, told_of, self.told_of = self.stamps.kept, self.told_of, None
        if kept is not None and self.notified_poll and self.changes is None:
            self.changes = Changes.made()
            self.notified_poll = self.notified_poll if self.changes else 0.0
        # told of a change to none of them (another file of a directory watched): the next wait is on
        # the timer, `delay` (TRACE_LOG_POLL) long, so a busy neighbour wakes it at most twice in one;
        # a change meanwhile is seen by its stamps when the kernel's word is waited for again
        in_vain = kept is not None and kept is told_of
        if kept is None or self.changes is None or not self.notified_poll or in_vain:
            super().pause(delay)
            return
        self.changes.drain()             # told of before the look just made, or of what it saw
        if not self.changes.watch(*kept):
            was, self.unwatched = self.unwatched, True
            if not was:
                error = self.changes.get_errno()
                self.log.info("the kernel will not watch these files: looking at them every "
                              "TRACE_QUIET_POLL at most", extra={"error": os.strerror(error), "limit":
                                  INOTIFY_LIMITS.get(error), "files": paths_among(kept[0])})
            super().pause(delay)
            return
        self.unwatched = False
        if not self.bell.is_set() and self.stamps.still():
            if self.changes.wait(self.notified_poll):
                self.stirred, self.told_of = True, kept
            elif not self.stopping.is_set() and not self.stamps.still():
                self.notified_poll = 0.0
                self.log.info("the kernel did not tell of a change to these files (a network filesystem?): "
                              "looking at them every TRACE_QUIET_POLL from now on",
                              extra={"files": paths_among(kept[0])})
        self.bell.clear()                # woken, told, or changed since the look: the next tick is now

    def notified(self) -> bool:
        """Whether a quiet wait is the kernel's word of a change, not a timer (/health)."""
        return bool(self.notified_poll) and not self.unwatched

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.changes is not None:
                self.changes.close()

    def wake(self) -> None:
        super().wake()
        if self.changes is not None:
            self.changes.ring()

    def send(self, rows: list[Row], extra: list[tuple[str, tuple]]) -> None:
        """Offer rows, and the statements that commit with them, to the writer as one unit; Behind if
        the queue is full."""
        if not self.events.offer(Unit(rows, tuple(extra), own=True, reader=True)):
            raise Behind
        self.progress()

    def watched(self) -> tuple[str | int, ...]:
        """The files a look reads now; nothing when the next look must be a whole one."""
        raise NotImplementedError

    def look(self) -> None:
        raise NotImplementedError


# =============================================================================================== model
# What an event is: the fields each endpoint accepts, how a JSON value becomes a column value, and the
# rows that reach SQLite. Validation is all-or-nothing per request.

MAX_INT = 2**53 - 1              # the largest integer a JavaScript agent can send exactly
MAX_NAME_CHARS = 256             # provider, model, session_id, finish_reason, ...
MAX_TRACE_ID_CHARS = 128
MAX_UNIX_MS = 253402300799999    # 9999-12-31T23:59:59.999Z
MAX_UNIX_NS = 2**63 - 1          # 2262-04-11T23:47:16.854775807Z: SQLite's largest integer, in ns
SECONDS_NOT_MS = 100_000_000_000  # a created_at number under it (before 1973-03-03 in ms) is Unix seconds
OWN_TEXT_BYTES = 16384           # texts of the events otrace writes itself
ERROR_TYPES = ("llm_error", "crash", "system_error")
ERROR_CATEGORIES = ("rate_limit", "timeout", "malformed_response", "api_failure", "process_crash",
                    "oom_kill", "unhandled_exception", "disk_full", "network_failure",
                    "permission_denied", "zombie_processes", "other")
SEVERITIES = ("debug", "info", "warning", "error", "critical")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


STRICT_JSON = json.JSONDecoder(parse_constant=_no_constants)   # one, not one per request: NaN refused
_NOT_PRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")   # controls and line breaks


def is_printable(text: str) -> bool:
    """Whether a name holds no control character and no line break: a joiner, a soft hyphen or a
    no-break space (which str.isprintable refuses) belong in names written in many languages."""
    return text.isprintable() or _NOT_PRINTABLE.search(text) is None


class Refusal(Exception):
    """A request otrace answers with an error, before or after reading its body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.otlp: str | None = None     # "json" once an OTLP JSON body is known to be the one refused
        self.logged = status < 500       # in the log's "request refused" lines (a 503 its own counter's)

    def body(self) -> dict[str, Any]:
        return {"error": str(self), "field": None}


def out_of_memory() -> Refusal:
    """The answer to a request that ran out of memory (a limit on the process's): retried later, it
    may fit."""
    return Refusal(503, "otrace ran out of memory for this request; retry later", {"Retry-After": "5"})


def answered(refusal: Refusal) -> Refusal:
    """A refusal to be kept until it is answered, without its traceback: the frames in it hold the
    request's body and rows, in a cycle through the frame that keeps it, which only the cyclic GC
    frees (a flood of refusals outruns it). The exception it was raised from, shown or not, holds them
    too."""
    refusal.__context__ = refusal.__cause__ = None
    return refusal.with_traceback(None)


class Invalid(Refusal):
    """A request body that cannot be accepted, with the field (and array index) to blame."""

    def __init__(self, message: str, field: str | None = None, index: int | None = None,
                 status: int = 400, *, quoted: bool = False) -> None:
        super().__init__(status, message)
        self.field, self.index = field, index
        self.quoted = quoted             # after its first ": ", a parser's words quoting the client's text

    def said(self) -> str:
        """The message as the log may hold it: otrace's own words, never what the client sent."""
        return str(self).split(": ", 1)[0] if self.quoted else str(self)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": str(self), "field": self.field}
        if self.index is not None:
            out["index"] = self.index
        return out


def _finite(value: Any) -> bool:
    """A JSON number that fits a column: no bool, no NaN or infinity, no integer too long for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return -MAX_INT <= value <= MAX_INT if isinstance(value, int) else math.isfinite(value)


class Fields:
    """Turns the JSON values of one event into column values, raising Invalid naming the field."""

    def __init__(self, event: dict[str, Any], index: int | None, max_text: int, posted: bool = False) -> None:
        self.event, self.index, self.max_text = event, index, max_text
        self.posted = posted             # sent to the JSON API, whose numbers people write by hand
        self.truncated = False

    def fail(self, field: str, message: str) -> Invalid:
        return Invalid(f"{field} {message}", field, self.index)

    def name(self, field: str, required: bool = False, printable: bool = False) -> str | None:
        value = self.event.get(field)
        if value is None:
            if required:
                raise self.fail(field, "is required")
            return None
        if not isinstance(value, str):
            raise self.fail(field, "must be a string")
        if not value.strip():
            raise self.fail(field, "must not be empty or blank")
        if len(value) > MAX_NAME_CHARS:
            raise self.fail(field, f"must be at most {MAX_NAME_CHARS} characters")
        if printable and not is_printable(value):
            raise self.fail(field, f"must be 1 to {MAX_NAME_CHARS} printable characters (no control "
                                   "characters)")
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
        if not _finite(value) or not 0 <= value <= MAX_INT:
            raise self.fail(field, f"must be a number from 0 to {MAX_INT}")
        return value

    def number(self, field: str) -> float | None:
        """Any finite number, of either sign (a metric's value)."""
        value = self.event.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(field, "must be a finite number")
        return value

    def unix_ms(self, field: str) -> int | None:
        value = self.event.get(field)
        if value is None:
            return None
        if not _finite(value) or not 0 <= value <= MAX_UNIX_MS:
            raise self.fail(field, "must be Unix ms from 1970 to 9999")
        return int(value)

    def trace_id(self) -> str:
        value = self.event.get("trace_id")
        if value is None:
            return new_id()
        if not (isinstance(value, str) and 0 < len(value) <= MAX_TRACE_ID_CHARS and is_printable(value)):
            raise self.fail("trace_id", f"must be 1 to {MAX_TRACE_ID_CHARS} printable characters")
        return clean_text(value)

    def created_at(self, received: int) -> int:
        """Unix ms, from an RFC 3339 string or a number of Unix ms; the arrival time when absent."""
        value = self.event.get("created_at")
        if value is None:
            return received
        if isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value.upper())     # RFC 3339 allows a lower-case t and z
            except ValueError:
                raise self.fail("created_at", "must be RFC 3339 (2026-01-31T12:00:00Z) or Unix ms") from None
            if moment.tzinfo is None:
                raise self.fail("created_at", "needs a timezone offset (Z or +hh:mm)")
            value = epoch_ms(moment)
        elif not _finite(value):
            raise self.fail("created_at", "must be RFC 3339 (2026-01-31T12:00:00Z) or Unix ms")
        if not 0 <= value <= MAX_UNIX_MS:
            raise self.fail("created_at", "is out of range (1970 to 9999)")
        if self.posted and not isinstance(self.event["created_at"], str) and value < SECONDS_NOT_MS:
            raise self.fail("created_at", "must be Unix ms: this looks like Unix seconds")   # else 1970
        return int(value)

    def metadata(self, field: str = "metadata") -> str | None:
        """A JSON object (or a string holding one), stored as compact JSON."""
        value = self.event.get(field)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = STRICT_JSON.decode(value)
            except (ValueError, RecursionError):
                raise self.fail(field, "string must hold a JSON object") from None
        if not isinstance(value, dict):
            raise self.fail(field, "must be a JSON object")
        try:
            text, cut = compact_json(value, self.max_text)
        except RecursionError:      # parsed just under the limit, a few frames deeper to write back
            raise self.fail(field, "is nested too deeply") from None
        except ValueError:          # 1e400 parses as an infinity, which JSON cannot carry onward
            raise self.fail(field, "holds a number too large for JSON (NaN or infinite)") from None
        self.truncated |= cut
        return text


@dataclasses.dataclass(frozen=True)
class Table:
    """One event table: the JSON fields its endpoint accepts, the columns a row fills in order, and
    the type its events have in a push."""

    name: str
    fields: frozenset[str]
    columns: tuple[str, ...]
    push_type: str


_COMMON = ("trace_id", "created_at", "received_at", "source")
TRACES = Table("llm_traces", frozenset({
    "provider", "model", "input_text", "output_text", "prompt_tokens", "completion_tokens", "total_tokens",
    "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "cost_usd", "latency_ms", "ttft_ms",
    "status", "error_type", "finish_reason", "session_id", "trace_id", "created_at", "metadata"}),
    (*_COMMON, "provider", "model", "status", "error_type", "finish_reason", "session_id",
               "prompt_tokens", "completion_tokens", "total_tokens", "cache_read_tokens",
               "cache_write_tokens", "reasoning_tokens", "cost_usd", "latency_ms", "ttft_ms",
               "input_text", "input_bytes", "output_text", "output_bytes", "metadata", "truncated",
               "cost_source", "computed_cost_usd", "price_ref"),
    "llm_trace")
ERRORS = Table("error_events", frozenset({
    "error_type", "category", "message", "stack_trace", "severity", "provider", "model", "session_id",
    "trace_id", "created_at", "metadata"}),
    (*_COMMON, "error_type", "category", "severity", "message", "message_bytes", "stack_trace",
               "stack_trace_bytes", "provider", "model", "session_id", "metadata", "truncated"),
    "error_event")
METRICS = Table("system_metrics", frozenset(), (
    *_COMMON, "interval_s", "cpu_pct", "cpu_cores_effective", "cpu_throttled_ms", "cpu_throttled_periods",
    "mem_used_bytes", "mem_rss_bytes", "mem_limit_bytes", "mem_available_bytes", "mem_total_bytes",
    "disk_path", "disk_device", "disk_total_bytes", "disk_used_bytes", "disk_avail_bytes", "disk_used_pct",
    "disk_read_bps", "disk_write_bps", "cgroup_read_bps", "cgroup_write_bps", "self_rss_bytes",
    "self_cpu_pct", "proc_count", "proc_zombies", "gateway_up", "gateway_pid", "gateway_cpu_pct",
    "gateway_rss_bytes", "gateway_threads", "gateway_fds", "gateway_uptime_s", "tcp_established",
    "tcp_time_wait", "tcp_close_wait", "tcp_listen", "net_rx_bps", "net_tx_bps", "net_rx_pps", "net_tx_pps",
    "tcp_retrans_ps", "tcp_syn_retrans_ps", "tcp_attempt_fails_ps", "tcp_estab_resets_ps", "tcp_out_rsts_ps",
    "udp_in_errors_ps", "udp_no_ports_ps", "dns"), "system_metric")
LOGS = Table("log_events", frozenset(), (
    *_COMMON, "level", "subsystem", "kind", "message", "detail", "otel_trace_id", "file", "file_offset"),
    "log_event")
GENAI_METRICS = Table("genai_metrics", frozenset(), (
    *_COMMON, "name", "kind", "unit", "window_start", "value", "count", "min", "max", "buckets", "provider",
    "model", "service", "attributes", "reset", "truncated", "monotonic"), "genai_metric")
METRIC_KINDS = ("sum", "gauge", "histogram", "exponential_histogram")
HISTOGRAMS = METRIC_KINDS[2:]
CUSTOM = Table("custom_events", frozenset({"name", "attributes", "severity", "session_id", "trace_id",
                                          "created_at"}),
               (*_COMMON, "name", "severity", "session_id", "attributes", "truncated"), "custom_event")
PROCESSES = Table("process_samples", frozenset(), (
    *_COMMON, "interval_s", "pid", "ppid", "name", "cmdline", "cmdline_bytes", "user", "uid", "state",
    "cpu_pct", "rss_bytes", "threads", "fds", "started_at", "cpu_rank", "rss_rank", "truncated"),
    "process_sample")
TABLES = {table.name: table for table in (TRACES, ERRORS, METRICS, LOGS, GENAI_METRICS, CUSTOM, PROCESSES)}
EVENT_TABLES = tuple(TABLES)


class Row(collections.namedtuple("Row", "table values")):
    """One row on its way to a table."""


def trace_row(f: Fields, received: int, source: str = "http") -> tuple:
    """The llm_traces row for one trace event: its fields, the truncated flag, then what it cost
    (see price_call): every source that builds its rows here gets them priced."""
    prompt, completion = f.count("prompt_tokens"), f.count("completion_tokens")
    cache_read, cache_write = f.count("cache_read_tokens"), f.count("cache_write_tokens")
    total = f.count("total_tokens")
    if total is None and (prompt, completion, cache_read, cache_write) != (None,) * 4:   # no generator
        # the prompt counts the cache's tokens: without it, those are what is known of it
        total = (prompt if prompt is not None else (cache_read or 0) + (cache_write or 0)) + (completion or 0)
        total = total if total <= MAX_INT else None        # a total no client may send is not made either
    if source == "http" and prompt is not None and (cache := (cache_read or 0) + (cache_write or 0)) > prompt:
        raise f.fail("prompt_tokens", f"counts the cache's tokens too: it is {prompt}, and "
                     f"cache_read_tokens + cache_write_tokens are {cache}")    # else it cannot be priced
    input_text, input_bytes = f.text("input_text")
    output_text, output_bytes = f.text("output_text")
    trace_id, created = f.trace_id(), f.created_at(received)
    provider, model = f.name("provider", required=True), f.name("model", required=True)
    tokens = (prompt, completion, cache_read, cache_write)
    cost, cost_source, computed, ref = price_call(provider, model, tokens, created, f.amount("cost_usd"))
    values = (trace_id, created, received, source, provider, model,
              f.choice("status", ("ok", "error"), "ok"), f.name("error_type"), f.name("finish_reason"),
              f.name("session_id"), prompt, completion, total, cache_read, cache_write,
              f.count("reasoning_tokens"), cost, f.amount("latency_ms"), f.amount("ttft_ms"), input_text,
              input_bytes, output_text, output_bytes, f.metadata())
    return (*values, int(f.truncated), cost_source, computed, ref)


def error_row(f: Fields, received: int, source: str = "http") -> tuple:
    """The error_events row for one error event, truncated flag last."""
    message, message_bytes = f.text("message", required=True)
    stack, stack_bytes = f.text("stack_trace")
    values = (f.trace_id(), f.created_at(received), received, source,
              f.choice("error_type", ERROR_TYPES), f.choice("category", ERROR_CATEGORIES, "other"),
              f.choice("severity", SEVERITIES, "error"), message, message_bytes, stack, stack_bytes,
              f.name("provider"), f.name("model"), f.name("session_id"), f.metadata())
    return (*values, int(f.truncated))


def metric_row(f: Fields, received: int, source: str = "otlp") -> tuple:
    """The genai_metrics row for one metric point (created_at: the end of its window): truncated, then
    (a sum's) whether it only counts up, last."""
    values = (f.trace_id(), f.created_at(received), received, source, f.name("name", required=True),
              f.choice("kind", METRIC_KINDS), f.name("unit"), f.unix_ms("window_start"), f.number("value"),
              f.count("count"), f.number("min"), f.number("max"), f.metadata("buckets"), f.name("provider"),
              f.name("model"), f.name("service"), f.metadata("attributes"), int(bool(f.event.get("reset"))))
    monotonic = f.event.get("monotonic")            # a sum's alone
    return (*values, int(f.truncated), None if monotonic is None else int(bool(monotonic)))


def custom_row(f: Fields, received: int, source: str = "http") -> tuple:
    """The custom_events row for one named event, truncated flag last."""
    values = (f.trace_id(), f.created_at(received), received, source,
              f.name("name", required=True, printable=True), f.choice("severity", SEVERITIES, "info"),
              f.name("session_id"), f.metadata("attributes"))
    return (*values, int(f.truncated))


def process_row(f: Fields, received: int, source: str = "otrace") -> tuple:
    """The process_samples row for one process of a sample, truncated flag last."""
    cmdline, cmdline_bytes = f.text("cmdline")
    values = (f.trace_id(), received, received, source, f.amount("interval_s"), f.count("pid"),
              f.count("ppid"), f.name("name"), cmdline, cmdline_bytes, f.name("user"), f.count("uid"),
              f.name("state"), f.amount("cpu_pct"), f.count("rss_bytes"), f.count("threads"), f.count("fds"),
              f.count("started_at"), f.count("cpu_rank"), f.count("rss_rank"))
    return (*values, int(f.truncated))


def event_row(table: Table, build: Callable[[Fields, int, str], tuple], event: dict[str, Any],
              source: str, *, received: int | None = None, max_text: int = OWN_TEXT_BYTES) -> Row:
    """A row from an event otrace builds itself (from a log line, a host sample, its own faults),
    validated like one from HTTP; Invalid if it lacks what the table needs."""
    fields = Fields({k: v for k, v in event.items() if v is not None}, None, max_text)
    return Row(table.name, build(fields, now_ms() if received is None else received, source))


def own_error(category: str, message: str, metadata: dict[str, Any], severity: str = "error",
              error_type: str = "system_error") -> Row:
    """An error event otrace raises itself (disk full, an OOM kill)."""
    return event_row(ERRORS, error_row, {"error_type": error_type, "category": category,
                                         "message": message, "severity": severity,
                                         "metadata": metadata}, "otrace")


ROW_BUILDERS: dict[str, tuple[Table, Callable[[Fields, int, str], tuple]]] = {
    "/v1/traces": (TRACES, trace_row), "/v1/errors": (ERRORS, error_row), "/v1/events": (CUSTOM, custom_row)}


def json_body(body: bytes) -> Any:
    """A request body as JSON; Invalid saying why it is not (not UTF-8, nested too deeply, not JSON)."""
    try:
        return STRICT_JSON.decode(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise Invalid("body is not UTF-8") from None
    except RecursionError:
        raise Invalid("body is nested too deeply") from None
    except ValueError as exc:
        if str(exc).startswith("Exceeds the limit"):     # int()'s guard against quadratic conversion
            raise Invalid(f"body holds a number of more than {sys.get_int_max_str_digits()} digits") from None
        raise Invalid(f"body is not valid JSON: {exc}") from None


def parse_events(body: bytes, route: str, max_events: int, max_text: int) -> tuple[list[Row], list[str]]:
    """Validate a request body (one event or an array of them) into rows, all or nothing; also the
    fields that were ignored."""
    table, build = ROW_BUILDERS[route]
    doc = json_body(body)
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
        rows.append(Row(table.name, build(Fields(event, index if many else None, max_text, posted=True),
                                          received)))
        ignored.update(key for key in event if key not in table.fields)
    return rows, sorted(ignored)


# ============================================================================================== prices
# What a call cost when its source sent tokens and no cost. The prices are data: prices.json beside
# otrace.py (pydantic's genai-prices, vendored by `make prices`), with the user's TRACE_PRICES file in
# the same shape over it, matched by genai-prices' own rules (see docs: provider by id or its match
# clause, model by the first clause that matches, prices in force at the call's time, cache tokens
# priced apart only where the model prices them). A row keeps the figure its source reported apart
# from the computed one: cost_source says which of them cost_usd is.

PRICES_FILE = Path(__file__).with_name("prices.json")
PRICE_KEYS = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok", "requests_kcount")
_INPUT, _OUTPUT, _CACHE_READ, _CACHE_WRITE, _REQUESTS = range(len(PRICE_KEYS))
_ALWAYS, _SINCE, _DAILY = range(3)                # a price's constraint: none, a start day, a UTC window
PRICE_MEMO = 4096                # (provider, model) pairs remembered; past it the memo starts afresh
MAX_CLAUSE_DEPTH = 16            # or/and nested in a match clause: deeper would overflow the stack at ingest
DAY_MS = 86_400_000
LAST_DAY = (date.max - date(1970, 1, 1)).days      # 9999-12-31, in days since 1970-01-01
# OpenTelemetry's provider names that genai-prices' own rules would miss or misplace (its
# provider_match sends azure.ai.openai to openai); every other well-known name finds its provider.
PROVIDER_ALIASES = {"azure.ai.openai": "azure", "azure.ai.inference": "azure", "az.ai.openai": "azure",
                    "az.ai.inference": "azure", "gcp.gen_ai": "google", "x_ai": "x-ai"}
_COMPACT_DATE = re.compile(r"-(20\d{2})(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])(?=-|:|$)")
_LAYOUT = ('{"header":', '"providers":[\n', ',"models":[')    # scripts/prices.py's line layout

Clause = tuple[str, Any]          # ("equals", "gpt-4o"), ("or", (clause, ...)), ...
Rate = float | tuple[float, tuple[tuple[int, float], ...]]     # flat, or (base, ((start, price), ...))
Price = tuple[Rate | None, ...]   # a rate or None per PRICE_KEYS
Period = tuple[int, int, int, Price]   # (_ALWAYS, 0, 0, p), (_SINCE, start ms, 0, p), (_DAILY, from, to, p)
Tokens = tuple[int | None, int | None, int | None, int | None]   # input (cache included), output, read, write


class PriceModel(NamedTuple):
    match: Clause
    id: str
    periods: tuple[Period, ...]


class _Compiler:
    """Turns the JSON of a price file into tuples, checking it: equal strings, prices and periods are
    stored once, since models share most of them."""

    def __init__(self) -> None:
        self.pool: dict[Any, Any] = {}

    def shared(self, value: Any) -> Any:
        return self.pool.setdefault(value, value)

    def clause(self, raw: Any, depth: int = 0) -> Clause:
        """A match clause as (kind, operand), its text lower-cased once here rather than at each match."""
        if not isinstance(raw, dict) or len(raw) != 1:
            raise ValueError(f"a match clause is one of equals, starts_with, ...: {raw!r}")
        [(kind, operand)] = raw.items()
        if kind in ("or", "and") and isinstance(operand, list):
            if depth == MAX_CLAUSE_DEPTH:
                raise ValueError(f"a match clause nests or/and at most {MAX_CLAUSE_DEPTH} deep")
            return kind, tuple(self.clause(item, depth + 1) for item in operand)
        if kind == "regex" and isinstance(operand, str):
            re.compile(operand)
            return kind, operand          # genai-prices searches the lower-cased name, pattern as is
        if kind in ("equals", "starts_with", "ends_with", "contains") and isinstance(operand, str):
            return kind, self.shared(operand.lower())
        raise ValueError(f"unknown match clause {raw!r}")

    def usd(self, raw: Any, where: str) -> float:
        if isinstance(raw, int | float) and not isinstance(raw, bool) and 0 <= raw < math.inf:
            return self.shared(float(raw))
        raise ValueError(f"{where}: a price is a number >= 0 or {{base, tiers}}, not {raw!r}")

    def rate(self, raw: Any, where: str) -> Rate:
        """USD per unit: a number, or {"base": n, "tiers": [{"start": tokens, "price": n}, ...]}."""
        if not (isinstance(raw, dict) and set(raw) == {"base", "tiers"} and isinstance(raw["tiers"], list)):
            return self.usd(raw, where)
        tiers = []
        for tier in raw["tiers"]:
            if not (isinstance(tier, dict) and set(tier) == {"start", "price"}
                    and type(tier["start"]) is int):
                raise ValueError(f"{where}: a tier is {{start: tokens, price: n}}, not {tier!r}")
            tiers.append((tier["start"], self.usd(tier["price"], where)))
        return self.usd(raw["base"], where), tuple(sorted(tiers))

    def price(self, raw: Any, where: str) -> Price:
        if not isinstance(raw, dict) or not set(raw) <= set(PRICE_KEYS):
            raise ValueError(f"{where}: prices take only {', '.join(PRICE_KEYS)}: {raw!r}")
        return self.shared(tuple(None if raw.get(key) is None else self.rate(raw[key], where)
                                 for key in PRICE_KEYS))

    def period(self, raw: Any, where: str) -> Period:
        """One entry of a price list: since a UTC day, or in a daily UTC window, or always."""
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: a price list holds {{constraint, prices}}, not {raw!r}")
        price, when = self.price(raw.get("prices"), where), raw.get("constraint")
        if when is None:
            return _ALWAYS, 0, 0, price
        if isinstance(when, dict) and set(when) == {"start_date"}:
            start = datetime.combine(date.fromisoformat(when["start_date"]), dt_time(), UTC)
            return _SINCE, int(start.timestamp()) * 1000, 0, price
        if isinstance(when, dict) and set(when) == {"start_time", "end_time"}:
            return _DAILY, _day_ms(when["start_time"]), _day_ms(when["end_time"]), price
        raise ValueError(f"{where}: unknown constraint {when!r}")

    def model(self, raw: Any, owner: str) -> PriceModel:
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or "match" not in raw:
            raise ValueError(f"{owner}: a model needs an id, a match clause and prices: {str(raw)[:80]!r}")
        where, prices = f"{owner}/{raw['id']}", raw.get("prices")
        if isinstance(prices, list) and prices:
            periods = tuple(self.period(item, where) for item in prices)
        else:
            periods = ((_ALWAYS, 0, 0, self.price(prices, where)),)
        return PriceModel(self.clause(raw["match"]), self.shared(raw["id"]), self.shared(periods))


def _day_ms(text: str) -> int:
    """Milliseconds since UTC midnight of a time of day ("16:30:00", or with an offset)."""
    at = dt_time.fromisoformat(text)
    if at.tzinfo is not None:
        at = datetime.combine(date(1970, 1, 1), at).astimezone(UTC).time()
    return ((at.hour * 60 + at.minute) * 60 + at.second) * 1000 + at.microsecond // 1000


def matches(clause: Clause, text: str) -> bool:
    """Whether a lower-cased name matches a clause, as genai-prices' Clause*.is_match decide."""
    kind, operand = clause
    if kind == "equals":
        return text == operand
    if kind == "starts_with":
        return text.startswith(operand)
    if kind == "contains":
        return operand in text
    if kind == "ends_with":
        return text.endswith(operand)
    if kind == "regex":
        return re.search(operand, text) is not None
    if kind == "or":
        return any(matches(item, text) for item in operand)
    return all(matches(item, text) for item in operand)


class ModelList:
    """One file's models of one provider, compiled when the provider is first asked for. Until then
    the vendored file's are kept as their JSON lines, compressed: parsed, they would take MiBs."""

    __slots__ = ("_models", "_raw", "label", "owner")

    def __init__(self, label: str, owner: str, raw: bytes | list[Any]) -> None:
        self.label, self.owner, self._raw = label, owner, raw
        self._models: tuple[PriceModel, ...] | None = None

    def models(self) -> tuple[PriceModel, ...]:
        if self._models is None:
            compiler = _Compiler()
            self._models = tuple(compiler.model(item, self.owner) for item in self.items())
            self._raw = b""
        return self._models

    def items(self) -> Iterator[Any]:
        """The models' JSON, parsed one at a time."""
        if isinstance(self._raw, list):
            yield from self._raw
            return
        for line in zlib.decompress(self._raw).decode().split("\n")[1:]:
            yield json.loads(line.removesuffix(","))


class PriceProvider(NamedTuple):
    id: str
    provider_match: Clause | None
    model_match: Clause | None
    fallback: tuple[str, ...]
    parts: tuple[ModelList, ...]     # the user's models first, then the vendored ones

    def own_model(self, ref: str) -> tuple[ModelList, PriceModel] | None:
        """The first of this provider's own models that matches (no fallback)."""
        for part in self.parts:
            for model in part.models():
                if matches(model.match, ref):
                    return part, model
        return None


class PriceFile(NamedTuple):
    """A price file read and checked: its label for refs, and each provider's fields and models."""

    label: str
    providers: list[tuple[dict[str, Any], bytes | list[Any]]]

    @classmethod
    def read(cls, path: Path) -> PriceFile:
        """scripts/prices.py's layout (models stay compressed lines) or any JSON of the same shape.
        ValueError (or OSError) for a file that cannot be used: a cut file must not load as a smaller
        table, and a bad model must fail now rather than at ingest."""
        with open(path, encoding="utf-8") as file:
            first = file.readline()
            if first.startswith(_LAYOUT[0]) and first.endswith(",\n") and file.readline() == _LAYOUT[1]:
                return cls(_label(json.loads(first[len(_LAYOUT[0]):-2]), path), _read_lines(file, path))
            file.seek(0)
            document = json.load(file)
        if not isinstance(document, dict) or not isinstance(document.get("providers"), list):
            raise ValueError(f'{path}: a price file is {{"header": {{...}}, "providers": [...]}}')
        entries = [(_provider_fields(raw), raw.get("models") or []) for raw in document["providers"]]
        for fields, models in entries:
            ModelList("", fields["id"], models).models()
        return cls(_label(document.get("header") or {}, path), entries)


def _read_lines(file: Iterable[str], path: Path) -> list[tuple[dict[str, Any], bytes | list[Any]]]:
    """The providers of scripts/prices.py's layout: a provider's fields on a line ending in
    '"models":[', its models a line each, then "]}," ("]}" for the last), then "]}". Each model is
    compiled once to check it (and dropped: no pool kept) and kept compressed, so the file is never
    whole in memory, nor its models parsed all at once."""
    entries: list[tuple[dict[str, Any], bytes | list[Any]]] = []
    fields: dict[str, Any] | None = None
    packer, packed, ended = zlib.compressobj(1), [b""], False
    for number, raw in enumerate(file, 3):
        line = raw.removesuffix("\n")
        if fields is not None and line.startswith("{"):
            _Compiler().model(json.loads(line.removesuffix(",")), fields["id"])
            packed.append(packer.compress(f"\n{line}".encode()))
        elif fields is not None and line in ("]}", "]},"):
            entries.append((fields, b"".join([*packed, packer.flush()]) if len(packed) > 1 else []))
            fields, packer, packed, ended = None, zlib.compressobj(1), [b""], line == "]}"
        elif fields is None and not ended and line.endswith(_LAYOUT[2]):
            fields = _provider_fields(json.loads(line.removesuffix(_LAYOUT[2]) + "}"))
        elif ended and line == "]}":
            return entries
        else:
            raise ValueError(f"{path}, line {number}: not the layout scripts/prices.py writes")
    raise ValueError(f"{path}: ends before its last line")


def _provider_fields(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
        raise ValueError(f"a provider needs an id: {str(raw)[:80]!r}")
    return {key: value for key, value in raw.items() if key != "models"}


def _label(header: dict[str, Any], path: Path) -> str:
    """How a price_ref names its table: "genai-prices 0.2.3", or the file's name."""
    return " ".join(str(header[key]) for key in ("source", "version") if header.get(key)) or path.name


class Priced(NamedTuple):
    cost_usd: float
    ref: str                      # "genai-prices 0.2.3: anthropic/claude-sonnet-4-20250514"


class PriceTable:
    """Prices by provider and model, matched as genai-prices matches them; lookups memoized."""

    def __init__(self, files: list[PriceFile]) -> None:
        """Files in order of precedence: a provider's models from an earlier file match first, and
        its fields there replace the later ones; providers only an earlier file has come first."""
        fields: dict[str, dict[str, Any]] = {}
        parts: dict[str, list[ModelList]] = {}
        order: list[str] = []
        for file in reversed(files):
            new = [f["id"] for f, _ in file.providers if f["id"] not in fields]
            for provider_fields, raw in file.providers:
                pid = provider_fields["id"]
                fields[pid] = {**fields.get(pid, {}), **provider_fields}
                parts.setdefault(pid, []).insert(0, ModelList(file.label, pid, raw))
            order = new + order
        self.label = " + ".join(file.label for file in files)
        self.providers = [self._provider(fields[pid], tuple(parts[pid])) for pid in order]
        self._by_id = {p.id: p for p in self.providers}
        self._memo: dict[tuple[str, str], tuple[str, tuple[Period, ...]] | None] = {}

    @staticmethod
    def _provider(fields: dict[str, Any], parts: tuple[ModelList, ...]) -> PriceProvider:
        compiler = _Compiler()
        def clause(key: str) -> Clause | None:
            return None if fields.get(key) is None else compiler.clause(fields[key])
        return PriceProvider(fields["id"], clause("provider_match"), clause("model_match"),
                             tuple(fields.get("fallback_model_providers") or ()), parts)

    @classmethod
    def load(cls, *paths: Path) -> PriceTable:
        return cls([PriceFile.read(path) for path in paths])

    def cost(self, provider: str, model: str, *, input_tokens: int | None, output_tokens: int | None,
             cache_read_tokens: int | None, cache_write_tokens: int | None, at_ms: int) -> Priced | None:
        """The cost of one call, or None: an unknown provider or model, one priced in units otrace does
        not count, or counts genai-prices would refuse. input_tokens includes the cache's tokens."""
        hit = self.find(provider, model)
        if hit is None:
            return None
        usd = price_usd(in_force(hit[1], at_ms), input_tokens, output_tokens, cache_read_tokens,
                        cache_write_tokens)
        return None if usd is None else Priced(usd, hit[0])

    def find(self, provider: str, model: str) -> tuple[str, tuple[Period, ...]] | None:
        """The ref and prices of the entry that prices (provider, model); after the first call for a
        pair, one dict lookup."""
        key = (provider, model)
        if key in self._memo:
            return self._memo[key]
        if len(self._memo) >= PRICE_MEMO:
            self._memo.clear()
        found = self._find(provider, model)
        hit = self._memo[key] = found and (f"{found[0].label}: {found[0].owner}/{found[1].id}",
                                           found[1].periods)
        return hit

    def _find(self, provider_name: str, model_name: str) -> tuple[ModelList, PriceModel] | None:
        """genai-prices' find_provider_model: the provider by its name (litellm's "provider/model"
        names both), or without one the first provider whose model_match takes the model."""
        ref, name = model_name.lower(), provider_name.strip().lower()
        if name == "litellm" and "/" in ref:
            head, rest = ref.split("/", 1)
            if head and self.provider_by_name(head):
                name, ref = head, rest
        provider = self.provider_by_name(name) if name else None
        if provider is None and name in ("", "litellm"):
            provider = next((p for p in self.providers if p.model_match and matches(p.model_match, ref)),
                            None)
        return None if provider is None else self._find_model(provider, ref)

    def provider_by_name(self, name: str) -> PriceProvider | None:
        """By id, else the first whose provider_match takes the name; OpenTelemetry's names first."""
        name = PROVIDER_ALIASES.get(name, name)
        if found := self._by_id.get(name):
            return found
        return next((p for p in self.providers if p.provider_match and matches(p.provider_match, name)), None)

    def _find_model(self, provider: PriceProvider, ref: str) -> tuple[ModelList, PriceModel] | None:
        """The name as given, then with a compact date (-20250514) written with dashes, each in the
        provider's own models and then its fallback providers' (one step, as genai-prices goes)."""
        owners = [provider, *filter(None, map(self._by_id.get, provider.fallback))]
        for candidate in dict.fromkeys((ref, _COMPACT_DATE.sub(_dashed_date, ref))):
            for owner in owners:
                if hit := owner.own_model(candidate):
                    return hit
        return None


def _dashed_date(match: re.Match[str]) -> str:
    """-20251211 as -2025-12-11 when it is a real date (LiteLLM's spelling of the same model)."""
    try:
        day = date(*(int(part) for part in match.groups()))
    except ValueError:
        return match.group(0)
    return f"-{day.isoformat()}"


def in_force(periods: tuple[Period, ...], at_ms: int) -> Price:
    """The price at at_ms: the last period whose constraint holds, else the first."""
    for kind, start, end, price in reversed(periods):
        if kind == _ALWAYS or (kind == _SINCE and at_ms >= start):
            return price
        if kind == _DAILY:
            now = at_ms % DAY_MS
            if (start <= now < end) if start <= end else (now >= start or now < end):
                return price
    return periods[0][3]


def _per_unit(rate: Rate | None, total_input: int) -> float:
    """USD per unit, a tiered rate chosen by the whole input: the highest tier it exceeds the start of."""
    if rate is None:
        return 0.0
    if isinstance(rate, float):
        return rate
    base, tiers = rate
    for start, price in reversed(tiers):
        if total_input > start:
            return price
    return base


def price_usd(price: Price, input_tokens: int | None, output_tokens: int | None,
              cache_read_tokens: int | None, cache_write_tokens: int | None) -> float | None:
    """USD for these counts at this price, or None where genai-prices would not price them."""
    if input_tokens is None and output_tokens is None and cache_read_tokens is None \
            and cache_write_tokens is None:
        return None                   # nothing counted: an unknown cost, not a free call
    if price[_INPUT] is None and price[_OUTPUT] is None and price[_REQUESTS] is None:
        return None                   # priced per audio hour, image, search...: not what otrace counts
    total_input, output = input_tokens or 0, output_tokens or 0
    read, write = cache_read_tokens or 0, cache_write_tokens or 0
    if min(total_input, output, read, write) < 0 or (input_tokens is None and (read or write)):
        return None
    read *= price[_CACHE_READ] is not None     # not priced apart: they stay input at the input price
    write *= price[_CACHE_WRITE] is not None
    fresh = total_input - read - write
    if fresh < 0:
        return None                   # more cache tokens than input tokens: the counts are wrong
    per_token = (_per_unit(price[_INPUT], total_input) * fresh
                 + _per_unit(price[_OUTPUT], total_input) * output
                 + _per_unit(price[_CACHE_READ], total_input) * read
                 + _per_unit(price[_CACHE_WRITE], total_input) * write)
    return per_token / 1_000_000 + _per_unit(price[_REQUESTS], total_input) / 1000


class Pricing:
    """The table trace rows are priced with wherever they are built (HTTP, the gateway log, other
    sources): the vendored one, read on first use, until a Service installs the configured one."""

    def __init__(self) -> None:
        self.table: PriceTable | None = None
        self.loaded = False

    def install(self, table: PriceTable | None) -> None:
        self.table, self.loaded = table, True

    def cost(self, provider: str, model: str, tokens: Tokens, at_ms: int) -> Priced | None:
        """(input with the cache's tokens, output, cache read, cache write) priced at at_ms."""
        if not self.loaded:
            self.install(load_prices(""))
        if self.table is None:
            return None
        prompt, completion, read, write = tokens
        return self.table.cost(provider, model, input_tokens=prompt, output_tokens=completion,
                               cache_read_tokens=read, cache_write_tokens=write, at_ms=at_ms)


PRICING = Pricing()


def load_prices(user_file: str) -> PriceTable | None:
    """The table a Service prices with: TRACE_PRICES (if set) over the vendored prices.json (if it
    is there: a bare otrace.py without it computes no cost, and says so at start)."""
    paths = [Path(user_file)] if user_file else []
    if PRICES_FILE.exists():
        paths.append(PRICES_FILE)
    return PriceTable.load(*paths) if paths else None


def price_call(provider: str, model: str, tokens: Tokens, at_ms: int,
               reported: float | None) -> tuple[float | None, str | None, float | None, str | None]:
    """(cost_usd, cost_source, computed_cost_usd, price_ref) of one call: the figure its source
    reported wins, and the table's stays beside it; a call the table cannot price stays null."""
    priced = PRICING.cost(provider, model, tokens, at_ms)
    computed, ref = priced or (None, None)
    if reported is not None:
        return reported, "reported", computed, ref
    return computed, None if priced is None else "computed", computed, ref


# =============================================================================================== store
# SQLite in WAL mode. One writer thread owns the only write connection and takes its work from a
# bounded EventQueue: batches of events, and jobs (writes other threads need) in between. Readers
# (/health, push, retention) get read-only connections from Database, which also notices when the
# file at the path is deleted or replaced and moves what it still holds into a new one.

# None bound as NULL, as before, but found at once: without an adapter sqlite3 formats and drops an
# AttributeError for each NULL parameter (performance.md, "An ingest request a tenth cheaper")
sqlite3.register_adapter(type(None), {}.get)

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
    # 6: a refused row is reported once (push "losses") before retention may delete it.
    """
    ALTER TABLE push_rejects ADD COLUMN reported_at INTEGER;
    CREATE INDEX push_rejects_unreported ON push_rejects (id) WHERE reported_at IS NULL;
    """,
    # 7: what a call cost by the price table beside what its source reported, and the event tables
    # by time, for `otrace report`. Older rows keep cost_source null: their cost_usd was reported.
    """
    ALTER TABLE llm_traces ADD COLUMN cost_source TEXT;
    ALTER TABLE llm_traces ADD COLUMN computed_cost_usd REAL;
    ALTER TABLE llm_traces ADD COLUMN price_ref TEXT;
    CREATE INDEX llm_traces_created ON llm_traces (created_at);
    CREATE INDEX error_events_created ON error_events (created_at);
    CREATE INDEX system_metrics_created ON system_metrics (created_at);
    CREATE INDEX log_events_created ON log_events (created_at, kind);
    """,
    # 8: how far each OpenClaw session (or session file) has been read, and the failed attempts of a
    # run that the gateway log showed, counted on the failure's error event.
    """
    CREATE TABLE openclaw_positions (
        agent TEXT NOT NULL,
        stream TEXT NOT NULL,
        mark TEXT NOT NULL,
        position INTEGER NOT NULL,
        newest INTEGER,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (agent, stream)
    );
    CREATE TABLE openclaw_attempts (
        id INTEGER PRIMARY KEY,
        trace_id TEXT NOT NULL UNIQUE,
        run_id TEXT NOT NULL,
        outcome TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX openclaw_attempts_run ON openclaw_attempts (run_id);
    CREATE INDEX error_events_openclaw_run ON error_events (json_extract(metadata, '$.run_id'))
        WHERE source = 'openclaw_session';
    """,
    # 9: GenAI usage metric points from OTLP, and the last point of each series (for deltas).
    """
    CREATE TABLE genai_metrics (
        id INTEGER PRIMARY KEY,
        trace_id TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        source TEXT NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        unit TEXT,
        window_start INTEGER,
        value REAL,
        count INTEGER,
        min REAL,
        max REAL,
        buckets TEXT,
        provider TEXT,
        model TEXT,
        service TEXT,
        attributes TEXT,
        reset INTEGER NOT NULL,
        truncated INTEGER NOT NULL,
        synced INTEGER NOT NULL DEFAULT 0,
        pushed_at INTEGER
    );
    CREATE INDEX genai_metrics_unsynced ON genai_metrics (id) WHERE synced = 0;
    CREATE TABLE otlp_series (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        series_id INTEGER NOT NULL,
        start_ns INTEGER NOT NULL,
        time_ns INTEGER NOT NULL,
        value REAL,
        count INTEGER,
        buckets TEXT,
        updated_at INTEGER NOT NULL
    );
    """,
    # 10: custom events, samples of the process table, and processes, network and DNS in host samples.
    """
    CREATE TABLE custom_events (
        id INTEGER PRIMARY KEY,
        trace_id TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        source TEXT NOT NULL,
        name TEXT NOT NULL,
        severity TEXT NOT NULL,
        session_id TEXT,
        attributes TEXT,
        truncated INTEGER NOT NULL,
        synced INTEGER NOT NULL DEFAULT 0,
        pushed_at INTEGER
    );
    CREATE INDEX custom_events_unsynced ON custom_events (id) WHERE synced = 0;
    CREATE TABLE process_samples (
        id INTEGER PRIMARY KEY,
        trace_id TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        source TEXT NOT NULL,
        interval_s REAL,
        pid INTEGER NOT NULL,
        ppid INTEGER,
        name TEXT,
        cmdline TEXT,
        cmdline_bytes INTEGER,
        user TEXT,
        uid INTEGER,
        state TEXT,
        cpu_pct REAL,
        rss_bytes INTEGER,
        threads INTEGER,
        fds INTEGER,
        started_at INTEGER,
        cpu_rank INTEGER,
        rss_rank INTEGER,
        truncated INTEGER NOT NULL,
        synced INTEGER NOT NULL DEFAULT 0,
        pushed_at INTEGER
    );
    CREATE INDEX process_samples_unsynced ON process_samples (id) WHERE synced = 0;
    ALTER TABLE system_metrics ADD COLUMN proc_count INTEGER;
    ALTER TABLE system_metrics ADD COLUMN proc_zombies INTEGER;
    ALTER TABLE system_metrics ADD COLUMN gateway_up INTEGER;
    ALTER TABLE system_metrics ADD COLUMN gateway_pid INTEGER;
    ALTER TABLE system_metrics ADD COLUMN gateway_cpu_pct REAL;
    ALTER TABLE system_metrics ADD COLUMN gateway_rss_bytes INTEGER;
    ALTER TABLE system_metrics ADD COLUMN gateway_threads INTEGER;
    ALTER TABLE system_metrics ADD COLUMN gateway_fds INTEGER;
    ALTER TABLE system_metrics ADD COLUMN gateway_uptime_s REAL;
    ALTER TABLE system_metrics ADD COLUMN tcp_established INTEGER;
    ALTER TABLE system_metrics ADD COLUMN tcp_time_wait INTEGER;
    ALTER TABLE system_metrics ADD COLUMN tcp_close_wait INTEGER;
    ALTER TABLE system_metrics ADD COLUMN tcp_listen INTEGER;
    ALTER TABLE system_metrics ADD COLUMN net_rx_bps REAL;
    ALTER TABLE system_metrics ADD COLUMN net_tx_bps REAL;
    ALTER TABLE system_metrics ADD COLUMN net_rx_pps REAL;
    ALTER TABLE system_metrics ADD COLUMN net_tx_pps REAL;
    ALTER TABLE system_metrics ADD COLUMN tcp_retrans_ps REAL;
    ALTER TABLE system_metrics ADD COLUMN tcp_syn_retrans_ps REAL;
    ALTER TABLE system_metrics ADD COLUMN tcp_attempt_fails_ps REAL;
    ALTER TABLE system_metrics ADD COLUMN tcp_estab_resets_ps REAL;
    ALTER TABLE system_metrics ADD COLUMN tcp_out_rsts_ps REAL;
    ALTER TABLE system_metrics ADD COLUMN udp_in_errors_ps REAL;
    ALTER TABLE system_metrics ADD COLUMN udp_no_ports_ps REAL;
    ALTER TABLE system_metrics ADD COLUMN dns TEXT;
    """,
    # 11: the rows retention may take as pushed, by id: with none (push off, a receiver long down),
    # finding the oldest read the whole table, on the writer, at every pass under the cap.
    """
    CREATE INDEX llm_traces_pushed ON llm_traces (id) WHERE synced IN (1, 3);
    CREATE INDEX error_events_pushed ON error_events (id) WHERE synced IN (1, 3);
    CREATE INDEX system_metrics_pushed ON system_metrics (id) WHERE synced IN (1, 3);
    CREATE INDEX log_events_pushed ON log_events (id) WHERE synced IN (1, 3);
    CREATE INDEX genai_metrics_pushed ON genai_metrics (id) WHERE synced IN (1, 3);
    CREATE INDEX custom_events_pushed ON custom_events (id) WHERE synced IN (1, 3);
    CREATE INDEX process_samples_pushed ON process_samples (id) WHERE synced IN (1, 3);
    """,
    # 12: whether a sum counts up only (a counter) or not (an up-down counter): push says it as it came.
    """
    ALTER TABLE genai_metrics ADD COLUMN monotonic INTEGER;
    """,
    # 13: the count of unpushed rows retention deleted is kept for good in otrace_state (UNPUSHED_KEY),
    # begun from the ledger's rows of them still there, where an older otrace counted them; and a run's
    # failed attempts are counted by outcome from an index alone, not a row read for each.
    """
    INSERT INTO otrace_state (key, value, updated_at)
        SELECT 'unpushed_deleted.' || table_name, sum(unsynced_deleted),
               CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
        FROM retention_ledger WHERE unsynced_deleted > 0 GROUP BY table_name
        ON CONFLICT (key) DO NOTHING;
    CREATE INDEX openclaw_attempts_run_outcome ON openclaw_attempts (run_id, outcome);
    DROP INDEX openclaw_attempts_run;
    """,
]

UNSYNCED, SYNCED, REFUSED, REFUSED_REPORTED = 0, 1, 2, 3   # values of the synced column
DELIVERED = f"synced IN ({SYNCED}, {REFUSED_REPORTED})"      # rows retention may take as pushed
UNDELIVERED = f"synced IN ({UNSYNCED}, {REFUSED})"       # rows still owed: a deletion of one is a loss
CACHE_KIB = 2048                 # per connection; otrace keeps few open
ROWS_PER_INSERT = 32             # at most, and fewer for a wide table (see insert_rows)
DB_PAGE = 4096                   # SQLite's default page size, which otrace's files keep
MAX_VARIABLES = 999              # what older SQLite allows in one statement
JOB_TIMEOUT = 120.0              # longest a loop waits for the writer to run its job
READER_WAIT = 1.0                # longest a reader's unit waits for room in the queue
GIL_SWITCH = 0.001               # longest a thread waits for the GIL from a busy one (Python's default: 5 ms)
MOVE_WAIT = 5.0                  # longest a task's reading connection waits out a move to a new file
BUSY_TIMEOUT = 10.0              # seconds a statement waits for a lock another connection holds
STATE_TABLES = ("otrace_state", "log_offsets",   # where readers keep their place: carried to a new file
                "openclaw_positions", "openclaw_attempts", "otlp_series")
CARRY = "-carry"                 # beside the database: what a replaced file owes, on its way to the new one
STATE_SQL = ("INSERT INTO otrace_state (key, value, updated_at) VALUES (?, ?, ?) "
             "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at")
ADD_SQL = ("INSERT INTO otrace_state (key, value, updated_at) VALUES (?, ?, ?) "   # a count kept for good
           "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value, updated_at = excluded.updated_at")
MAX_SQL = ("INSERT INTO otrace_state (key, value, updated_at) VALUES (?, ?, ?) "   # a high-water mark
           "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value), "
           "updated_at = excluded.updated_at")
UNPUSHED_KEY = "unpushed_deleted."   # otrace_state: the rows of a table retention deleted unpushed, ever


def sqlite_uri(path: str | Path, mode: str, immutable: bool = False) -> str:
    """A file: URI of a path, whatever bytes its name holds."""
    return f"file:{urllib.parse.quote(os.fsencode(path))}?mode={mode}" + ("&immutable=1" if immutable else "")


def connect(path: str, read_only: bool = False, create: bool = True,
            opened: Callable[[], None] | None = None) -> sqlite3.Connection:
    """Open the database with otrace's pragmas; transactions are explicit (see transaction()). A
    read-only connection, or one that must not `create` it, never creates the file. `opened` runs
    once the file is open, before its first statement opens the -wal and -shm beside the path: if it
    raises, the connection is closed having read neither."""
    mode = "ro" if read_only else None if create else "rw"
    conn = sqlite3.connect(sqlite_uri(path, mode) if mode else path, timeout=BUSY_TIMEOUT,
                           isolation_level=None, check_same_thread=False, uri=mode is not None)
    try:
        if opened is not None:
            opened()
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT * 1000:.0f}")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def open_database(path: str) -> None:
    """Create the database file (its directory 0700, the file 0600) and make it otrace's, before any
    thread starts."""
    private_folder(Path(path).parent)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    if not Path(path).stat().st_size:      # a -wal beside an empty file: SQLite would delete it
        keep_aside_wal(path)
    with contextlib.closing(connect(path)) as conn:
        prepare(conn, path)


def keep_aside_wal(path: str) -> None:
    """Rename the -wal beside `path`, which is not its file's own but that of a file moved away whose
    WAL could not be taken in (a full disk, a reader, a crash), to `<path>.left-<ms>-wal`: that file's
    last commits, kept for a hand to put beside it as its -wal. Logged; its -shm is removed."""
    kept = f"{path}.left-{now_ms()}-wal"
    with contextlib.suppress(FileNotFoundError):
        Path(path + "-wal").rename(kept)
        Path(path + "-shm").unlink(missing_ok=True)       # its index, of no use without it
        log.error("a database file moved away left its last commits in a WAL beside the path: kept aside; "
                  "put it beside that file, named as its -wal (if the file was deleted, it is of no use)",
                  extra={"db_path": path, "kept_as": kept})


SET_ASIDE = (".left-", ".damaged-", CARRY + ".aside-")   # after the database's name: never removed by otrace
SET_ASIDE_NAMED = 10                                     # names /health lists at most, in name order


def set_aside_files(path: str) -> dict[str, Any]:
    """The files otrace set aside beside the database at `path` and leaves for a hand (a moved file's
    last commits, a damaged file, a carry file it could not take in): how many, their bytes (outside
    the cap: a hand restores or removes them) and the first names."""
    folder, name = os.path.split(path)
    prefixes = tuple(name + tag for tag in SET_ASIDE)
    found: list[tuple[str, int]] = []
    with contextlib.suppress(OSError), os.scandir(folder or ".") as entries:   # the directory is gone
        for entry in entries:
            if entry.name.startswith(prefixes):
                with contextlib.suppress(OSError):                             # removed meanwhile
                    found.append((entry.name, entry.stat(follow_symlinks=False).st_size))
    found.sort()
    return {"count": len(found), "bytes": sum(size for _, size in found),
            "files": [entry for entry, _ in found[:SET_ASIDE_NAMED]]}


def private_folder(folder: Path) -> None:
    """Create `folder` and each parent it lacks, 0700 (mkdir's parents= makes them by the umask)."""
    for missing in reversed([p for p in (folder, *folder.parents) if not p.exists()]):
        missing.mkdir(mode=0o700, exist_ok=True)


def prepare(conn: sqlite3.Connection, path: str) -> None:
    """Make the file `conn` has open at `path` otrace's: 0600 (also when it was there already), in WAL
    mode, its schema up to date. A connection opens a new, empty file if the path's went away."""
    for name in (path, path + "-wal", path + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(name).chmod(0o600)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes only on a new file, before WAL mode
    if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
        raise RuntimeError(f"{path}: cannot use WAL mode")
    migrate(conn)


def schema_of(conn: sqlite3.Connection) -> tuple[int, set[str]]:
    """A database's schema version (user_version) and its tables."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    return version, {name for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}


def database_problem(path: str) -> str | None:
    """Why otrace must not write the file at `path`, read through a read-only connection (which may
    make its -shm): not SQLite, another program's database, or a newer otrace's. None for otrace's
    own, an empty file, or none; a file that cannot be read now is left to the start to report."""
    if Path(path).exists() and not Path(path).is_file():
        return f"{path} is not a regular file"
    for file in (path, path + "-wal", path + "-shm"):     # a root run's, left to a service user
        if os.path.exists(file) and not os.access(file, os.R_OK | os.W_OK):  # noqa: PTH110
            if os.statvfs(file).f_flag & os.ST_RDONLY:
                return f"{file} is on a read-only filesystem"
            return f"{file} cannot be read and written by this user (uid {os.geteuid()})"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if not head:
        return None                  # a new database
    if head != b"SQLite format 3\x00":
        return f"{path} is not an SQLite database"
    try:
        with contextlib.closing(sqlite3.connect(sqlite_uri(path, "ro"), uri=True, timeout=1.0)) as conn:
            version, tables = schema_of(conn)           # a look of a second at most: the writer may wait
    except sqlite3.Error as exc:
        if sqlite_code(exc) in ("SQLITE_BUSY", "SQLITE_LOCKED") and \
                getattr(exc, "sqlite_errorname", "") != "SQLITE_BUSY_RECOVERY":   # a WAL rebuilt: wait
            raise                    # another program writes it: whose it is cannot be told yet
        return None
    if "llm_traces" not in tables and (version or tables):
        return f"{path} is not an otrace database (another program's: it has no llm_traces table)"
    if version > len(SCHEMA):
        return f"{path} has schema {version}, newer than this otrace's ({len(SCHEMA)})"
    return None


def migrate(conn: sqlite3.Connection) -> None:
    """Apply the SCHEMA steps the file has not seen yet, each in its own transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(SCHEMA):
        raise RuntimeError(f"database schema {version} is newer than this otrace ({len(SCHEMA)})")
    for number, step in enumerate(SCHEMA[version:], start=version + 1):
        with transaction(conn):
            for statement in filter(str.strip, step.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        log.info("schema migrated", extra={"version": number})


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def rename_aside(path: str, tag: str) -> str:
    """Rename a database file to `<path>.<tag>-<ms>`, with its -wal and -shm if they are there, kept for
    a hand; the new name. OSError if the file itself cannot be renamed."""
    aside = f"{path}.{tag}-{now_ms()}"
    Path(path).rename(aside)
    for suffix in ("-wal", "-shm"):
        try:
            Path(path + suffix).rename(aside + suffix)
        except FileNotFoundError:
            pass
        except OSError:                  # never to be read as the next file's own
            Path(path + suffix).unlink(missing_ok=True)
    return aside


def copy_rows(conn: sqlite3.Connection, source: str, target: str, table: str, *, where: str = "",
              conflict: str = "IGNORE") -> int:
    """Copy a table's rows between two attached databases, all columns but the row id (the target
    numbers its own); a row whose unique key is there already is kept (IGNORE) or replaced (REPLACE).
    How many were written."""
    columns = columns_but_id(conn, source, table)
    return conn.execute(f"INSERT OR {conflict} INTO {target}.{table} ({columns}) SELECT {columns} FROM "
                        f"{source}.{table} {where}").rowcount


def carry_over(conn: sqlite3.Connection, source: str, target: str, salvage: bool = False,
               also: Callable[[], Any] | None = None) -> dict[str, int]:
    """What a database still owes the receiver (rows not yet pushed, losses not yet reported) and where
    its readers stood, copied from one attached database to another in one transaction, with `also`
    run last in it. `salvage`: the source is damaged, and the first damage a transaction meets fails
    all of it: a transaction a table (a range of rows for the event tables: salvage_rows), and a table
    whose copy meets the damage is left in the source (and said)."""
    def rejects() -> int:            # refusals not reported, naming their rows' new ids
        return sum(conn.execute(
            f"INSERT INTO {target}.push_rejects (table_name, row_id, trace_id, rejected_at, http_status, "
            f"reason) SELECT r.table_name, t.id, r.trace_id, r.rejected_at, r.http_status, r.reason FROM "
            f"{source}.push_rejects r JOIN {target}.{table} t ON t.trace_id = r.trace_id WHERE "
            f"r.table_name = ? AND r.reported_at IS NULL AND NOT EXISTS (SELECT 1 FROM "
            f"{target}.push_rejects x WHERE x.trace_id = r.trace_id AND x.rejected_at = r.rejected_at)",
            (table,)).rowcount for table in EVENT_TABLES)

    copy = functools.partial(copy_rows, conn, source, target)
    steps = [*((table, functools.partial(salvage_rows, conn, source, target, table, UNDELIVERED) if salvage
                else functools.partial(copy, table, where=f"WHERE {UNDELIVERED}")) for table in EVENT_TABLES),
             ("retention_ledger", functools.partial(
                 copy, "retention_ledger", where="WHERE reported_at IS NULL AND unsynced_deleted > 0")),
             ("push_rejects", rejects),
             *((table, functools.partial(copy, table, conflict="REPLACE")) for table in STATE_TABLES)]
    moved: dict[str, int] = {}
    left: list[str] = []
    with contextlib.nullcontext() if salvage else transaction(conn):
        for name, step in steps:
            try:
                with transaction(conn) if salvage and name not in EVENT_TABLES else contextlib.nullcontext():
                    moved[name] = step()
            except sqlite3.DatabaseError as exc:
                if not salvage or sqlite_code(exc) not in CORRUPTION:
                    raise
                left.append(name)
        if also is not None:
            also()
    if "push_rejects" in left:       # refused rows with no refusal to report: sent again instead
        with transaction(conn, immediate=False):        # the target's alone: the source may not open
            for table in EVENT_TABLES:
                conn.execute(f"UPDATE {target}.{table} SET synced = {UNSYNCED} WHERE synced = {REFUSED}")
    if left:
        log.error("tables left in the damaged database file: their rows not carried over", extra={
            "tables": left})
    return {name: n for name, n in moved.items() if name not in STATE_TABLES}


def columns_but_id(conn: sqlite3.Connection, schema: str, table: str) -> str:
    """A table's columns, as a list for SQL, all but its row id."""
    described = conn.execute(f"PRAGMA {schema}.table_info({table})")
    return ", ".join(name for _, name, *_ in described if name != "id")


def salvage_rows(conn: sqlite3.Connection, source: str, target: str, table: str, where: str) -> int:
    """copy_rows from a damaged database: by ranges of row ids, read without an index, each range in a
    transaction of its own (one that meets the damage fails whole) and halved around what cannot be
    read, so that the damage keeps only the rows it holds. How many were written."""
    columns = columns_but_id(conn, target, table)           # the source's schema may be what is damaged
    top = highest_id(conn, source, target, table)
    ranges = collections.deque((low, min(low + SALVAGE_RANGE - 1, top))
                               for low in range(1, top + 1, SALVAGE_RANGE))
    copied = 0
    while ranges:
        low, high = ranges.popleft()
        try:
            with transaction(conn):
                copied += conn.execute(
                    f"INSERT OR IGNORE INTO {target}.{table} ({columns}) SELECT {columns} FROM "
                    f"{source}.{table} NOT INDEXED WHERE id BETWEEN ? AND ? AND {where}", (low, high)
                ).rowcount
        except sqlite3.DatabaseError as exc:
            if sqlite_code(exc) not in CORRUPTION:
                raise
            if low < high:
                middle = (low + high) // 2
                ranges.extendleft(((middle + 1, high), (low, middle)))
    return copied


def highest_id(conn: sqlite3.Connection, source: str, target: str, table: str) -> int:
    """The highest row id of a damaged table: from the table (its newest page), else from any of its
    indexes (each holds every row id), the first that can be read."""
    indexes = [name for _, name, _, _, partial in conn.execute(f"PRAGMA {target}.index_list({table})")
               if not partial]                  # a partial index holds only some of the rows
    damage = None
    for hint in ("", *(f" INDEXED BY {name}" for name in indexes)):
        try:
            return conn.execute(f"SELECT max(id) FROM {source}.{table}{hint}").fetchone()[0] or 0
        except sqlite3.DatabaseError as exc:
            if sqlite_code(exc) not in CORRUPTION:
                raise
            damage = exc
    raise damage


REPLACING = "the database file is being replaced; try again"   # what a reader is told meanwhile
SALVAGE_RANGE = 1024             # row ids a salvage copies in one transaction, before halving


class Database:
    """The database file at one path, and the read-only connections other threads read it through.

    The file can be deleted or replaced while otrace runs (an rm, an mv over it): SQLite then goes on
    writing into the old inode, gone at the next start. `moved` notices it; the writer then has
    readers wait (`pause_readers`), closes every connection to the old file, and opens a new one at
    the path (`reopened`), carrying over what the old one still held unpushed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.carry_path = path + CARRY
        self.identity = _identity(path)
        self.companions: dict[str, tuple[int, int] | None] = {}   # -wal, -shm: ours, by inode
        self.replaced_pending = False                    # moved, and not yet reopened
        self.replaced: dict[str, Any] | None = None     # the last replacement, for /health
        self._state = threading.Condition()
        self._readers = 0
        self._paused = False
        self._query: sqlite3.Connection | None = None
        self._closed = False
        self.merges = Merges()

    def moved(self) -> bool:
        """True when the path no longer names the file otrace has open. Also notes the -wal and -shm
        files beside it while it still does: after a move, those of the old file are removed."""
        if _identity(self.path) == self.identity:
            self.companions = {s: _identity(self.path + s) for s in ("-wal", "-shm")}
            return False
        return True

    @contextlib.contextmanager
    def reading(self, read_only: bool = True) -> Iterator[sqlite3.Connection]:
        """A connection for one task (a push cycle, a retention pass; read-only unless it checkpoints),
        closed after it."""
        with self._state:
            self._admit(MOVE_WAIT)
            self._readers += 1
        try:
            self._still_ours()
            with contextlib.closing(connect(self.path, read_only=read_only, create=False,
                                            opened=self._still_ours)) as conn:
                yield conn
        finally:
            with self._state:
                self._readers -= 1
                self._state.notify_all()

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """A short read (/health, the OTLP series, the loops' places at start) on a connection kept open
        between calls; never waits for a move. Refused once closed at shutdown: an OTLP request still
        being mapped must not open it again."""
        with self._state:
            if self._closed:
                raise sqlite3.OperationalError("otrace is stopping")
            self._admit(0.0)
            if self._query is None:
                self._still_ours()
                self._query = connect(self.path, read_only=True, opened=self._still_ours)
            return self._query.execute(sql, params).fetchall()

    def _still_ours(self) -> None:
        """A new connection must open the file otrace writes (asked before it opens, and again once it
        has, before its first statement): one moved in over it (a backup restored with mv) would read
        the old file's WAL, still beside it, as its own, and its close, the last to that file in the
        process, would checkpoint that WAL's pages into it and remove the -wal and -shm."""
        if _identity(self.path) != self.identity:
            raise sqlite3.OperationalError(REPLACING)

    def _admit(self, wait: float) -> None:
        if not self._state.wait_for(lambda: not self._paused, wait):
            raise sqlite3.OperationalError(REPLACING)

    def pause_readers(self) -> bool:
        """Keep new readers out; True once none is left (the old file can be closed)."""
        with self._state:
            self._paused = True
            if self._readers:
                return False
            if self._query is not None:
                self._query.close()
                self._query = None
            return True

    def reopened(self, moved: dict[str, int]) -> None:
        """The new file is open for writing: readers may come back, and read it."""
        with self._state:
            self.identity = _identity(self.path)
            # the new file's -wal and -shm, noted now: a file moved in over it before a look notes them
            # must not open them as its own (forget_old_companions would find nothing to remove)
            self.companions = {s: _identity(self.path + s) for s in ("-wal", "-shm")}
            self.replaced_pending = False
            self.replaced = {"at": iso(time.time()), "carried_over": moved}
            self._paused = False
            self._state.notify_all()

    def back_in_place(self) -> None:
        """The file was put back at the path before its move began: no move, and readers may read."""
        with self._state:
            self.replaced_pending = self._paused = False
            self._state.notify_all()

    def forget_old_companions(self, keep_wal: bool = False) -> None:
        """Take the old file's -wal and -shm away from the path if they are still beside it: with no
        connection left to the old file they are stale, and a new file must not read them as its own.
        `keep_wal`: the old file lives on and its WAL still holds its last commits: kept aside."""
        for suffix, identity in self.companions.items():
            if identity is not None and _identity(self.path + suffix) == identity:
                if keep_wal and suffix == "-wal":
                    keep_aside_wal(self.path)
                else:
                    Path(self.path + suffix).unlink(missing_ok=True)
        self.companions = {}

    def close(self) -> None:
        with self._state:
            self._closed = True
            if self._query is not None:
                self._query.close()
                self._query = None


class Merges:
    """Rows a merge changed (a call's content from an OTLP log record, a later span of the call, failed
    attempts counted from the gateway's log) while a push may hold an older copy read before it: the
    writer counts each after its commit, and the push marks a row synced only if it was not merged
    after its read began (else it goes again). A new database file changes every row: the old file's
    ids name other rows in it (its pushed rows were not carried over). Unpushed rows retention deleted
    meanwhile are kept too: delivered after all, they leave the ledger's count of losses. OTLP ingest's
    deletions of unpushed rows (DELETES_UNPUSHED: an ERROR record folded into its failure, a step
    around calls) wait for the cycle's end, as the push may deliver their rows (holding_back)."""

    def __init__(self) -> None:
        self.count = 0
        self.replaced_at = 0             # the count when the writer last moved to a new file
        self.watching = False            # only while a push cycle runs: no other needs them
        self._at: dict[tuple[str, str], int] = {}      # (table, trace_id): the count at its last merge
        # unpushed rows retention deleted since the read began, by table: (first id, last id, pass, reason)
        self._gone: dict[str, list[tuple[int, int, str, str]]] = {}
        self._held: list[tuple[str, tuple]] = []       # deletions held back until the cycle ends
        self._lock = threading.Lock()

    def merged(self, keys: list[tuple[str, str]]) -> None:
        """The writer, once the merges of `keys` are committed."""
        if self.watching:
            with self._lock:
                for key in keys:
                    self.count += 1
                    self._at[key] = self.count

    def deleted(self, table: str, ids: list[int], pass_id: str, reason: str) -> None:
        """The writer, once retention's deletion of the unpushed rows `ids` is committed with its ledger
        row: a push may hold a copy of them, and if the receiver takes it, they were not lost."""
        if self.watching and ids:
            with self._lock:
                runs = self._gone.setdefault(table, [])
                for low, high in id_runs(sorted(ids)):     # chunk after chunk, oldest first: one run
                    if runs and runs[-1][1] + 1 == low and runs[-1][2:] == (pass_id, reason):
                        runs[-1] = (runs[-1][0], high, pass_id, reason)
                    else:
                        runs.append((low, high, pass_id, reason))

    def gone(self, table: str, ids: Iterable[int]) -> collections.Counter[tuple[str, str]]:
        """Of `ids`, rows found deleted when their push was confirmed: how many each pass and reason
        of retention counted lost."""
        with self._lock:
            runs = self._gone.get(table, [])
            runs.sort()                                  # mostly sorted already: cheap
        found: collections.Counter[tuple[str, str]] = collections.Counter()
        for row_id in ids:
            at = bisect.bisect_right(runs, (row_id, math.inf)) - 1
            if at >= 0 and runs[at][0] <= row_id <= runs[at][1]:
                found[runs[at][2:]] += 1
        return found

    @contextlib.contextmanager
    def holding_back(self, statements: list[tuple[str, tuple]]) -> Iterator[list[tuple[str, tuple]]]:
        """The writer's statements to run in the transaction it commits within this block: while a push
        cycle runs, without the deletions of unpushed rows, held back for cycle_ended. The lock is held
        to the commit, so a push's read begins either before it (the rows stay) or after (they are gone)."""
        if not any(sql in DELETES_UNPUSHED for sql, _ in statements):
            yield statements
            return
        with self._lock:
            if not self.watching:
                yield statements
                return
            yield [statement for statement in statements if statement[0] not in DELETES_UNPUSHED]
            self._held += [statement for statement in statements if statement[0] in DELETES_UNPUSHED]

    def read_begins(self) -> int:
        """A push's read begins (none before it still marks rows): what it reads holds every merge and
        deletion so far."""
        with self._lock:
            self._at.clear()
            self._gone.clear()
            self.watching = True
            return self.count

    def cycle_ended(self) -> list[tuple[str, tuple]]:
        """The deletions held back while the cycle ran, to be made where their rows are still unpushed
        and were never delivered (record_pushed)."""
        with self._lock:
            held, self._held = self._held, []
            self._at.clear()
            self._gone.clear()
            self.watching = False
            return held

    def replaced(self) -> None:
        """The writer, before it moves to a new file (the path's, or the carry file first)."""
        with self._lock:
            self.count += 1
            self.replaced_at = self.count

    def replaced_since(self, read_at: int) -> bool:
        with self._lock:
            return self.replaced_at > read_at

    def after(self, read_at: int, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        with self._lock:
            if not self._at:                     # no merge since the cycle's read began: `keys` unread
                return set()
            return {key for key in keys if self._at.get(key, 0) > read_at}


class DatabaseLocked(Exception):
    """Another otrace holds the database."""


class DatabaseLock:
    """Exclusive locks held for the life of the process, on <database>.lock and on the database file
    itself (a hard link gives the file a second name, and that name a lock file of its own): two
    otraces writing one database would each push, retain and checkpoint it as if alone, each with a
    WAL of its own."""

    def __init__(self, db_path: str) -> None:
        self.db_path, self.path = db_path, db_path + ".lock"
        self.fd = self.take()
        self.file_fd: int | None = None
        try:
            self.hold_file()
        except BaseException:
            os.close(self.fd)
            raise

    def take(self) -> int:
        private_folder(Path(self.db_path).parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DatabaseLocked(f"another otrace (pid {holder}) is using the database {self.db_path}"
                                 ) from None
        with contextlib.suppress(OSError):               # the pid is a courtesy, even on a full disk
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def hold_file(self) -> None:
        """Lock the database file at the path (made empty if there is none: SQLite takes an empty file
        as a new database), and let go of the one locked before (a file the writer has left). The
        descriptor stays open while the file is in use: closing one drops the process's SQLite locks
        on the file."""
        held = os.fstat(self.file_fd) if self.file_fd is not None else None
        if held and _identity(self.db_path) == (held.st_dev, held.st_ino):
            return                       # held already (a move that failed after it is tried again)
        fd = os.open(self.db_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatabaseLocked(f"another otrace is using the database {self.db_path} under another "
                                 "name (a hard link)") from None
        if self.file_fd is not None:
            os.close(self.file_fd)
        self.file_fd = fd

    def held(self) -> bool:
        """True while the lock file at the path is the one this process locked (an rm of the
        database's files takes it too, and lets another otrace start there)."""
        st = os.fstat(self.fd)
        return _identity(self.path) == (st.st_dev, st.st_ino)

    def retake(self) -> None:
        """Lock a new file at the path; DatabaseLocked if another otrace got there first."""
        fd = self.take()
        os.close(self.fd)
        self.fd = fd

    def release(self) -> None:
        if self.file_fd is not None:
            os.close(self.file_fd)
        os.close(self.fd)


@dataclasses.dataclass(slots=True)
class Unit:
    """Rows that are committed together, with statements that must commit with them (a file offset).
    `own`: otrace's own rows (a host sample, lines of a log), that no client was promised; `reader`:
    a reader's (the gateway log's, the session store's), which may have much to catch up on."""

    rows: list[Row]
    extra: tuple[tuple[str, tuple], ...] = ()
    own: bool = False
    reader: bool = False
    at_once: bool = False         # committed without waiting for its batch to fill (the run's mark)
    arrived: float = 0.0
    settled: int = 0              # its rows, then statements, stored or dropped alone (Writer.commit_alone)

    def __len__(self) -> int:
        return len(self.rows)


@dataclasses.dataclass(slots=True)
class Job:
    """A function the writer runs on its connection between batches; its result goes to `future`."""

    run: Callable[[sqlite3.Connection], Any] | None   # None asks the writer to finish
    future: Future = dataclasses.field(default_factory=Future)


class Gate:
    """Holds the HTTP thread back while the writer is behind, so the writer gets the GIL.

    A busy HTTP thread starves the writer thread: each of the writer's SQLite calls gives the GIL away
    and must win it back from a thread that holds it for all but its system calls. So once clients'
    events fill half the queue, the HTTP thread waits (WAIT at most) until the writer has drained them
    below one batch (otrace's own are not waited on: holding the HTTP thread back does not hold a reader
    back). A writer that does not drain it within WAIT is stuck, not starved (a lock, a slow disk):
    the gate then stays open until it commits again."""

    WAIT = 0.05

    def __init__(self, high_water: int, low_water: int) -> None:
        self.high_water, self.low_water = high_water, low_water
        self.opened = threading.Event()
        self.opened.set()
        self.writer_stuck = False

    def note(self, waiting: int) -> None:
        """Called with the queue's lock held, after an offer."""
        if waiting >= self.high_water and not self.writer_stuck:
            self.opened.clear()

    def committed(self, waiting: int) -> None:
        """Called with the queue's lock held, after the writer committed."""
        self.writer_stuck = False
        if waiting < self.low_water:
            self.opened.set()

    def wait(self) -> None:
        """The HTTP thread, before an ingest request: yield the GIL while the writer is behind."""
        if not self.opened.is_set() and not self.opened.wait(self.WAIT):
            self.ran_out()

    def patience(self) -> float:
        """How long the HTTP thread may wait for the writer now: not at all while it is stuck."""
        return 0.0 if self.writer_stuck else self.WAIT

    def ran_out(self) -> None:
        """The writer did not catch up within WAIT: stuck, until it commits again."""
        self.writer_stuck = True
        self.opened.set()

    def release(self) -> None:
        """Nothing to gain from holding the HTTP thread back (writes failing, shutdown)."""
        self.opened.set()


class EventQueue(queue.Queue):
    """A queue.Queue of Units, bounded in events, that a request enters whole or not at all.

    Its size counts every accepted event not yet committed: the ones waiting and the ones in the
    writer's hands, until the writer calls `done`. So TRACE_QUEUE_SIZE bounds what a crash can lose
    and what otrace holds in memory, but for one request larger than the whole queue, taken beside
    the others (the rest would wait for it to be written). It also holds the writer's Jobs, which
    are not counted and go first."""

    def __init__(self, capacity: int, batch_size: int) -> None:
        super().__init__(capacity)
        self.gate = Gate(max(batch_size, capacity // 2), batch_size)
        self.batch_size = batch_size
        self.jobs: collections.deque[Job] = collections.deque()
        self.closed = False

    def _init(self, maxsize: int) -> None:
        self.queue: collections.deque[Unit] = collections.deque()
        self.waiting = 0         # events in self.queue
        self.uncommitted = 0     # waiting + taken by the writer and not yet done
        self.uncommitted_own = 0
        self.oversized = 0       # of those, the events of a unit larger than the queue
        self.waiting_gated = 0   # of self.waiting, what the gate counts: clients' (not otrace's own,
                                 # whose readers the HTTP thread's wait would not hold back), not oversized
        self.no_room = False     # an offer did not fit, and nothing has been taken or freed since

    def _qsize(self) -> int:
        return self.uncommitted

    def _put(self, unit: Unit) -> None:
        self.queue.append(unit)
        self.waiting += len(unit)
        self.uncommitted += len(unit)
        self.uncommitted_own += len(unit) if unit.own else 0
        self.oversized += self.beyond(unit)
        self.waiting_gated += self.gated(unit)

    def _get(self) -> Unit:
        unit = self.queue.popleft()
        self.waiting -= len(unit)
        self.waiting_gated -= self.gated(unit)
        return unit

    def offer(self, unit: Unit) -> bool:
        """Enqueue the unit if all its events fit (`fits`). One that does not has the writer commit what
        is waiting, and waits for room: otrace's own up to READER_WAIT, so a reader catching up hands
        over what it has read instead of reading it again; a client's as the gate lets the HTTP thread
        wait, so a request that needs the whole queue is not refused for ever by events that wait for
        their batch to fill."""
        with self.mutex:
            if self.closed or not self.fits(unit):       # fits asked once when it fits (lock held)
                if not self.closed:
                    patience = READER_WAIT if unit.own else self.gate.patience()
                    room = self.not_full.wait_for(
                        lambda: self.closed or self.fits(unit) or self.turned_away(), patience)
                    if not room and not unit.own:
                        self.gate.ran_out()
                if self.closed or not self.fits(unit):
                    self.turned_away()
                    return False
            unit.arrived = time.monotonic()
            was_empty = not self.waiting
            self._put(unit)
            self.unfinished_tasks += 1
            self.gate.note(self.waiting_gated)
            if was_empty or self.waiting >= self.batch_size:
                self.not_empty.notify()
            return True

    def beyond(self, unit: Unit) -> int:
        """Its events, if the unit is larger than the whole queue; else 0."""
        return len(unit) if len(unit) > self.maxsize else 0

    def gated(self, unit: Unit) -> int:
        """Its events, if the gate counts them: a client's, in a unit the writer does not take alone."""
        return 0 if unit.own or self.beyond(unit) else len(unit)

    def fits(self, unit: Unit) -> bool:
        """Called with the queue's lock held. A unit larger than the queue fits while no other is in;
        the others must fit in the queue together, a reader's in `reader_room` (a reader catching up
        must not turn the agent away). A reader's unit larger than that room goes in alone: a safety
        net, as the readers cut their units to fit."""
        if not unit.rows:
            return True                                   # statements alone take no room
        if self.beyond(unit):
            return not self.oversized
        taken = self.uncommitted - self.oversized
        room = self.reader_room if unit.reader else self.maxsize
        return taken + len(unit) <= room or (unit.reader and not taken)

    @property
    def reader_room(self) -> int:
        """What readers may fill: all but a quarter of the queue, which is left to clients."""
        return self.maxsize - self.maxsize // 4

    def turned_away(self) -> bool:
        """Called with the queue's lock held, for a unit that does not fit: the batch waiting to fill
        cannot grow until the writer commits, so the writer takes it now. False, for `wait_for`."""
        if not self.no_room:
            self.no_room = True
            self.not_empty.notify()
        return False

    def done(self, unit: Unit) -> None:
        """The writer committed the unit (or gave up on its rows): it no longer counts."""
        with self.mutex:
            self.uncommitted -= len(unit)
            self.uncommitted_own -= len(unit) if unit.own else 0
            self.oversized -= self.beyond(unit)
            self.no_room = False
            self.not_full.notify_all()
        self.task_done()

    def committed(self) -> None:
        """The writer has committed: the HTTP thread may go on once the writer has caught up."""
        with self.mutex:
            self.gate.committed(0 if self.closed else self.waiting_gated)

    def unwritten(self) -> tuple[int, int]:
        """Events accepted and not committed: (promised to clients, otrace's own)."""
        with self.mutex:
            return self.uncommitted - self.uncommitted_own, self.uncommitted_own

    def submit(self, run: Callable[[sqlite3.Connection], Any] | None) -> Future:
        """Hand the writer a job; jobs are never refused and run before the next batch."""
        job = Job(run)
        with self.mutex:
            self.jobs.append(job)
            self.not_empty.notify()
        return job.future

    def call(self, run: Callable[[sqlite3.Connection], Any], timeout: float = JOB_TIMEOUT) -> Any:
        """Ask the writer to run `run` on its connection and wait for its result (or its exception)."""
        return self.submit(run).result(timeout=max(0.0, timeout))

    def next_work(self, batch_size: int, window: float, idle: float) -> Job | list[Unit]:
        """The writer's next job, or its next batch: whole units until batch_size events, waiting at
        most `window` after the oldest arrived, and no longer once an offer finds no room. An empty
        list after `idle` seconds with nothing to do."""
        with self.not_empty:
            end = time.monotonic() + idle
            while not (self.jobs or self.queue):
                left = end - time.monotonic()
                if left <= 0:
                    return []
                self.not_empty.wait(left)     # closed or not: jobs still come, and the last is None
            if self.jobs:
                return self.jobs.popleft()
            due = self.queue[0].arrived + (0.0 if self.queue[0].at_once else window)
            while self.waiting < batch_size and not (self.jobs or self.closed or self.no_room):
                left = due - time.monotonic()
                if left <= 0:
                    break
                self.not_empty.wait(left)
            self.no_room = False
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
            self.not_full.notify_all()
        self.gate.release()

    def wait_drained(self, timeout: float) -> bool:
        """Wait until every unit put so far has been committed (or given up on)."""
        with self.all_tasks_done:
            return self.all_tasks_done.wait_for(lambda: not self.unfinished_tasks, max(timeout, 0))


class Reserve:
    """Space held back on the database's filesystem: a file of TRACE_DISK_RESERVE_BYTES beside it. On
    the first disk-full write it is deleted, so the batch and the queue behind it can commit; ingest
    answers 503 while it is released, and it is taken back once the disk has room for it twice. A
    disk under TRACE_DISK_HIGH_PCT with the reserve counted used, but without that room (a reserve large
    for the volume), lets ingest resume without it. A reserve there was no room for at start is taken
    the same way, without holding ingest back."""

    RETRY = 1.0                  # seconds between tries to take it (back)

    def __init__(self, db_path: str, size: int, logger: logging.Logger, high_pct: float) -> None:
        self.path, self.size, self.log, self.high_pct = Path(db_path + "-reserve"), size, logger, high_pct
        self.db_path = db_path
        self.held = False
        self.released = False
        self.next_try = 0.0
        self.blocks = 0              # its file's when taken: fewer later is a hole (a compressing fs has few)

    def hold(self) -> bool:
        """Make sure the file holds its full size (allocated, not sparse), and no more: one an earlier,
        larger setting made is cut to it, and removed if the reserve is off. False if there is no room."""
        if not self.size:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
            return True
        with contextlib.suppress(OSError):
            st = self.path.stat()
            if st.st_blocks * 512 >= self.size:
                if st.st_size > self.size:
                    os.truncate(self.path, self.size)
                self.held, self.released, self.blocks = True, False, self.path.stat().st_blocks
                return True
        try:
            if disk_usage(str(self.path.parent))[2] < 2 * self.size:   # taking it would fill the disk
                return False
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
                os.fsync(fd)
                self.blocks = os.fstat(fd).st_blocks
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):      # a directory there, say: no reserve, which is said
                self.path.unlink(missing_ok=True)
            return False
        self.held, self.released = True, False
        return True

    def counted(self, used: int, avail: int) -> tuple[int, int]:
        """A disk's used and available bytes, with the reserve counted used while it is released and the
        database's files could make that room down to retention's low mark: where otrace's own rows fill
        the disk, ingest going on without the reserve would fill it again, and then a deletion would
        find no room to write. Another program's data is not the rows' to make up for."""
        if not self.released:
            return used, avail
        with_it = (used + self.size, max(0, avail - self.size))
        own = file_size(self.db_path) + file_size(self.db_path + "-wal")
        return with_it if own >= over_low_mark(*with_it, self.high_pct) else (used, avail)

    def in_place(self) -> bool:
        """Its file is still there, whole: its size, and the blocks it had when taken (a compressing
        filesystem counts fewer than its size; a file cut and grown again, or copied sparse, has none)."""
        try:
            st = self.path.stat()
        except OSError:
            return False
        return st.st_size >= self.size and st.st_blocks >= self.blocks

    def on_disk_full(self, queued: int) -> bool:
        """A write found the disk full: give the space to the database. True if there was some."""
        if not self.held:
            return False
        try:
            self.path.unlink()
        except OSError:              # gone (its directory wiped): nothing to give; retake says so
            return False
        self.held, self.released, self.next_try = False, True, time.monotonic() + self.RETRY
        self.log.warning("disk full: reserve released; ingest paused", extra={
            "bytes": self.size, "queued_events": queued})
        return True

    def free_for_start(self, error: str) -> bool:
        """A start failed while the disk has less free than the file a last run left holds: give it up
        so the database can open (taken back once there is room). True if it was."""
        with contextlib.suppress(OSError):
            if disk_usage(str(self.path.parent))[2] < self.path.stat().st_size:    # a disk full, not a lock
                self.path.unlink()
                self.log.warning("start failing: disk reserve released so the database can open", extra={
                    "error": error, "path": str(self.path)})
                return True
        return False

    def retake(self) -> None:
        """When not held, or its file is gone (its directory wiped): take the space (back) once the disk
        has room for it twice over (more could be more than retention ever frees: the pause would not
        end); looked at most once a second."""
        if not self.size or time.monotonic() < self.next_try:
            return
        self.next_try = time.monotonic() + self.RETRY
        gone = self.held and not self.in_place()
        if self.held and not gone:
            return
        if gone:
            self.held = False
            self.log.warning("disk reserve file gone or emptied: taking it again", extra={
                "path": str(self.path)})
        released = self.released
        try:
            _, used, room, used_pct = disk_usage(str(self.path.parent))
        except OSError:              # its directory is gone (the database's files removed): later
            return
        if self.hold():                                   # with room for it twice (hold)
            self.log.warning("disk reserve held again: ingest resumes" if released else "disk reserve held",
                             extra={"bytes": self.size})
        elif released and df_percent(*self.counted(used, room)) < self.high_pct:
            # under the mark, the reserve counted where the rows are to make room for it (retention does
            # meanwhile), and no room for it twice: large for the volume; go on without it
            self.released = False
            self.log.warning("disk has room again, not for the reserve: ingest resumes without it",
                             extra={"bytes": self.size, "disk_avail_bytes": room, "disk_used_pct": used_pct})
        elif gone:                                      # taken once there is room, as at start
            self.log.warning("disk reserve not held: no room for it", extra={"bytes": self.size,
                                                                             "disk_avail_bytes": room})


class Writer(threading.Thread):
    """The one thread that writes to SQLite: batches of events in one transaction each, and jobs.

    A failed batch never kills it: an environment fault (disk full, I/O error, lock) keeps the batch and
    retries it with backoff while /health says degraded; a row whose own data cannot be written is
    logged whole and dropped without taking its batch-mates with it."""

    STUCK_AFTER = 15.0           # seconds in one batch or job before /health calls the writer stuck
    LOOK_EVERY = 1.0             # seconds between checks that the file is still the one at the path ...
    IDLE_WAKE = 15.0             # ... while writing; idle, a look already followed the last write

    def __init__(self, config: Config, db: Database, events: EventQueue, counters: Counters,
                 lock: DatabaseLock | None = None) -> None:
        super().__init__(name="otrace-writer", daemon=True)
        self.config, self.db, self.events, self.counters, self.lock = config, db, events, counters, lock
        self.batch_size, self.window = config.batch_size, config.batch_window
        self.log = logging.getLogger("otrace.writer")
        self.pending: list[Unit] = []
        self.outages: list[Row] = []     # events of write outages and ingest pauses, until stored
        self.paused: tuple[float, int] | None = None   # a full disk's pause: since, events refused then
        self.fault = FaultLog(self.log, "database write")
        self.upkeep_faults: dict[str, FaultLog] = {}    # a step between batches that fails, by name
        self.backoff = Backoff(0.05, 5.0)
        self.heartbeat = time.monotonic()
        self.resting = False                      # waiting for work: no heartbeat is due
        self.wrote_since_look = False
        self.look_at = 0.0
        self.conn: sqlite3.Connection | None = None
        self.conn_path = config.db_path          # the carry file while the path cannot be opened
        self.reopen_fault = FaultLog(self.log, "moving to a new database file")
        self.damaged = False                     # a damaged file is being left: move with the batch
        self.damaged_file: tuple[int, int] | None = None   # its identity, never to be written again
        self.on_fault: Callable[[str], None] = lambda error: None   # told once per streak of failures
        self.on_recovered: Callable[[], None] = lambda: None        # and once when it ends
        self.on_inserted: Callable[[dict[str, list[tuple]]], None] = lambda rows: None   # what committed
        self.on_committed: Callable[[], None] = lambda: None       # after every batch that committed
        self.reserve = Reserve(config.db_path, config.disk_reserve_bytes, self.log,
                               high_pct=config.disk_high_pct)

    @property
    def failing(self) -> bool:
        """Writes are failing, the disk is full, or the file at the path could not be taken over: a
        202 would promise a commit that may not come."""
        return self.fault.error is not None or self.reserve.released or self.reopen_fault.error is not None

    def failing_because(self) -> str:
        """Why writes fail, in the few words a refused client is told (/health has the error)."""
        code = primary_code(self.fault.error or self.reopen_fault.error or "")
        if self.reserve.released or code == "SQLITE_FULL":
            return "disk full"
        if code in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            return "database locked by another program"
        return "see /health"

    @property
    def stuck(self) -> bool:
        return not self.resting and time.monotonic() - self.heartbeat > self.STUCK_AFTER + self.window

    def idle_wake(self) -> float:
        """How long to wait for work: soon while a moved file is not yet left or a reserve not yet held;
        otherwise every write was followed by a look, so only /health's account of an rm waits."""
        if self.db.replaced_pending or (self.reserve.size and not self.reserve.held):
            return self.LOOK_EVERY
        return self.IDLE_WAKE

    def connect(self, path: str) -> sqlite3.Connection:
        conn = connect(path)
        try:
            prepare(conn, path)          # rows go only where their tables are, even into a new file
        except BaseException:
            conn.close()
            raise
        # zeroing every freed page (some builds' default) writes a deleted row twice, through the WAL;
        # FAST zeroes only pages written anyway, and the shrink after a deletion drops the rest
        conn.execute("PRAGMA secure_delete = FAST")
        # statement journals (a multi-row INSERT's spill past 64 KiB) and sorts in memory, not in files
        # in SQLite's temp directory: a full /var/tmp must not read as the database's disk full
        conn.execute("PRAGMA temp_store = MEMORY")
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = autocheckpoint_pages(self.config, page)
        conn.execute(f"PRAGMA wal_autocheckpoint = {pages}")
        # a WAL a reader made grow is cut back to what one autocheckpoint needs when it restarts, so
        # a burst does not keep its share of the cap until the next TRUNCATE
        conn.execute(f"PRAGMA journal_size_limit = {wal_limit(self.config, page)}")
        return conn

    def run(self) -> None:
        while True:       # a disk that fills as the writer opens its connection is a write failure too
            began = time.time()
            try:
                self.conn = self.connect(self.conn_path)
                break
            except (sqlite3.Error, OSError, RuntimeError) as exc:   # RuntimeError: not WAL, a newer schema
                retry_at = self.failed(exc, began)
                if self.damaged_file and _identity(self.conn_path) == self.damaged_file:   # not set aside
                    self.conn_path = self.db.carry_path
                time.sleep(max(0.0, retry_at - time.monotonic()))
        self.recovered()                      # ingest waits for this: nothing queues while writes fail
        self.backoff.reset()
        retry_at = 0.0
        try:
            while True:
                self.heartbeat = time.monotonic()
                self.upkeep("the database file's upkeep", self.look_after_file if self.pending else
                            self.after_batch)
                if self.pending:
                    work = self.events.next_job(retry_at - time.monotonic()) or []
                else:
                    self.resting = True
                    work = self.events.next_work(self.batch_size, self.window, idle=self.idle_wake())
                    self.heartbeat, self.resting = time.monotonic(), False   # its batch starts now
                if isinstance(work, Job):
                    if work.run is None:             # the last job: readers are gone, move if due
                        self.look_at = 0.0
                        self.look_after_file()
                        self.record_outages()            # an outage's event, if no batch came after
                        work.future.set_result(None)
                        return
                    self.run_job(work)
                    continue
                self.pending += work
                if not self.pending or time.monotonic() < retry_at:
                    continue
                began = time.time()
                try:
                    self.flush()
                except Exception as exc:  # noqa: BLE001 - any failure keeps the batch for a retry
                    retry_at = self.failed(exc, began)
                    continue
                self.recovered()
                self.record_outages()
                self.backoff.reset()
                self.events.committed()
                self.wrote_since_look = True
                self.upkeep("what a batch makes due (retention, checkpoint)", self.on_committed)
        finally:
            self.conn.close()

    def after_batch(self) -> None:
        """The last batch committed: the disk has room for the reserve; the file is looked after."""
        self.retake_reserve()
        self.look_after_file()

    def upkeep(self, what: str, step: Callable[[], None]) -> None:
        """A step between batches, whose failure is said once and tried again at the next, never the
        writer's end: the rows are committed, or wait for their write."""
        fault = self.upkeep_faults.get(what)
        try:
            step()
        except Exception as exc:  # the writer outlives any upkeep's failure
            if fault is None:
                fault = self.upkeep_faults[what] = FaultLog(self.log, f"writer: {what}")
            if fault.error is None:
                self.log.exception("writer upkeep failed", extra={"step": what})
            fault.failed(describe(exc))
        else:
            if fault is not None:
                fault.cleared()

    def failed(self, exc: BaseException, began: float | None = None) -> float:
        """A batch could not be written (or the file opened): note it, leave a damaged file, and say
        when to try again. `began`: when the write started (a lock is waited for before it fails)."""
        error = describe(exc)
        if self.fault.error is None:
            self.on_fault(error)
        self.fault.failed(error, began)
        self.events.gate.release()
        self.damage_met(exc)
        if sqlite_code(exc) == "SQLITE_FULL" and self.reserve.on_disk_full(self.events.qsize()):
            self.paused = time.time(), self.counters.snapshot()["refused"]
            return 0.0                 # the space is there now: write what was accepted
        return time.monotonic() + self.backoff.next()

    def recovered(self) -> None:
        """A write (or the file's opening) worked: an outage before it ends, and is to be stored."""
        if self.fault.error is not None:
            self.outages.append(self.outage_row())
            self.on_recovered()
        self.fault.cleared()

    def outage_row(self) -> Row:
        """What stopped writes, now that they work again, as an error event."""
        error = self.fault.error or ""
        category = {"SQLITE_FULL": "disk_full", "SQLITE_READONLY": "permission_denied",
                    "SQLITE_PERM": "permission_denied", "SQLITE_CANTOPEN": "permission_denied",
                    }.get(primary_code(error), "other")
        return own_error(category, f"database writes failed for {time.time() - self.fault.since:.1f} s: "
                         f"{error}", {"since": iso(self.fault.since), "attempts": self.fault.count,
                                      "db_path": self.config.db_path}, severity="critical")

    def record_outages(self) -> None:
        """Store the outages' events, if not yet: after the batch that ended one, or after a later one (a
        disk with room for that batch alone has none for them yet)."""
        while self.outages:              # one at a time: each leaves once stored, or dropped for its data
            try:
                self.commit_alone(Unit(self.outages[:1]))
            except Exception:  # noqa: BLE001 - the disk, a lock: kept for the next commit
                return
            self.outages.pop(0)

    def retake_reserve(self) -> None:
        """Take the reserve (back); when that ends a full disk's pause, say and store how long it was:
        the write that released the reserve took a moment, the clients' 503s lasted this long."""
        self.reserve.retake()
        if self.paused is None or self.reserve.released:
            return
        since, refused_before = self.paused
        self.paused = None
        seconds, refused = round(time.time() - since, 1), self.counters.snapshot()["refused"] - refused_before
        said = {"since": iso(since), "seconds": seconds, "events_refused": refused}
        self.log.warning("ingest pause for a full disk ended", extra=said)
        self.on_recovered()
        text = f"ingest paused {seconds} s by a full disk: {refused} events answered 503"
        self.outages.append(own_error("disk_full", text, said, severity="critical"))
        self.record_outages()

    def run_job(self, job: Job) -> None:
        if job.future.set_running_or_notify_cancel():
            try:
                job.future.set_result(job.run(self.conn))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the job
                job.future.set_exception(exc)
                self.damage_met(exc)          # a push's mark, a retention pass: writes too

    def flush(self) -> None:
        """Commit the pending units, in one transaction if their data allows. Units leave `pending` as
        they commit; an environment fault raises and leaves the rest for a retry."""
        try:
            self.commit(self.pending)
        except Exception as exc:
            if is_environment(exc):
                raise
            while self.pending:          # a row's data is to blame: find it, unit by unit
                self.commit_alone(self.pending[0])
                self.events.done(self.pending.pop(0))
            return
        for unit in self.pending:
            self.events.done(unit)
        self.pending = []

    def commit_alone(self, unit: Unit) -> None:
        """Commit one unit; if its data fails, commit its rows and then its statements one by one (one
        whose own data breaks must not stop the writer either) and drop the ones that fail. An
        environment fault raises; the retry goes on after the last one stored or dropped."""
        if not unit.settled:
            try:
                self.commit([unit])
                return
            except Exception as exc:
                if is_environment(exc):
                    raise
        parts = [Unit([row]) for row in unit.rows] + [Unit([], (statement,)) for statement in unit.extra]
        for part in parts[unit.settled:]:
            try:
                self.commit([part])
            except Exception as exc:
                if is_environment(exc):
                    raise
                self.drop(part, exc)
            unit.settled += 1

    def commit(self, units: list[Unit]) -> None:
        by_table: dict[str, list[tuple]] = {}
        for unit in units:
            for row in unit.rows:
                by_table.setdefault(row.table, []).append(row.values)
        merged, taken = [], set()
        statements = [statement for unit in units for statement in unit.extra]
        with self.db.merges.holding_back(statements) as now, transaction(self.conn) as conn:
            new = {table: insert_new(conn, table, values) for table, values in by_table.items()}
            for sql, params in now:
                cursor = conn.execute(sql, params)
                if sql in MERGED_TABLE:
                    merged += [(MERGED_TABLE[sql], trace_id) for trace_id, in cursor]
                elif sql in TAKEN_TABLE:
                    taken |= {(TAKEN_TABLE[sql], trace_id) for trace_id, in cursor}
        if merged:
            self.db.merges.merged(merged)
        inserted = sum(map(len, new.values()))
        self.counters.add("persisted", inserted)
        self.counters.add("duplicate", sum(map(len, by_table.values())) - inserted)
        self.on_inserted({table: [row for row in rows if (table, row[0]) not in taken] for table, rows in
                          new.items()} if taken else new)

    def drop(self, part: Unit, exc: BaseException) -> None:
        """Give up on a row or a statement (`part` holds one) SQLite refuses for its own data: logged, a
        row by its trace_id (its text may be a prompt, with secrets in it), counted in /health."""
        if part.rows:
            row = part.rows[0]
            self.log.error("row cannot be stored; dropped", extra={
                "table": row.table, "trace_id": row.values[0], "error": describe(exc)})
        else:
            self.log.error("statement cannot be run; dropped", extra={
                "error": describe(exc), "statement": part.extra[0][0][:60]})
        self.counters.add("dropped")

    # -- the file at the path deleted or replaced
    def look_after_file(self) -> None:
        """Once a second while writing, and once the queue is empty after a write: is the file at the
        path still the one otrace writes? If not, move to a new one as soon as no reader holds the old
        one (until then, the old inode keeps every row)."""
        if time.monotonic() < self.look_at and not (self.wrote_since_look and not self.events.qsize()):
            return
        self.look_at, self.wrote_since_look = time.monotonic() + self.LOOK_EVERY, False
        if not self.db.moved() and not self.damaged:
            if self.db.replaced_pending and self.conn_path == self.config.db_path and not Path(
                    self.db.carry_path).exists():           # put back before its move began
                self.db.back_in_place()
                self.log.warning("database file back at its path: nothing to move", extra={
                    "db_path": self.config.db_path})
            return
        if not self.db.replaced_pending:
            self.db.replaced_pending = True
            self.log.error("database file deleted or replaced under otrace: moving to a new file at the "
                           "path", extra={"db_path": self.config.db_path})
        if (self.pending and not self.damaged) or not self.db.pause_readers():
            return
        self.db.merges.replaced()       # no reader left: a batch read before marks nothing from now on
        began = time.time()
        try:
            if self.lock is not None and not self.lock.held():
                self.lock.retake()
            moved = self.reopen()
        except Exception as exc:  # noqa: BLE001 - the rows stay in the old file or the carry file
            self.reopen_fault.failed(describe(exc), began)
            return
        self.reopen_fault.cleared()
        why = "damaged" if self.damaged else "deleted or replaced"
        self.damaged, self.damaged_file = False, None      # its inode may be a new file's one day
        self.db.reopened(moved)
        self.log.warning("database file recreated; unpushed rows carried over", extra={
            "db_path": self.config.db_path, "carried_over": moved})
        # said in the new file at once: a report over it counts nothing the old one held that was pushed
        self.outages.append(own_error("other", f"database file {why} under otrace: this file was started "
                                      "then, with the old one's unpushed rows; rows pushed before are not in "
                                      "it", {"db_path": self.config.db_path, "carried_over": moved},
                                      severity="critical"))
        self.record_outages()

    def damage_met(self, exc: BaseException) -> None:
        """A write or a job found the file at the path damaged (SQLITE_CORRUPT, SQLITE_NOTADB): waiting
        would not heal it. Rename it aside with its -wal and -shm, kept for a hand, and move to a new
        file as after an rm, carrying what can still be read, and the batch that could not be written.
        A file that cannot be renamed (a bind mount of its own) is left for the carry file, and POSTs
        are answered 503 until it is moved away."""
        if sqlite_code(exc) not in CORRUPTION or self.damaged or self.conn_path != self.config.db_path:
            return                       # no damage, being left already, or the carry file's own
        self.damaged = self.db.replaced_pending = True
        self.damaged_file, self.look_at = self.db.identity, 0.0
        said = {"error": describe(exc), "db_path": self.config.db_path}
        if self.db.moved():              # removed or replaced meanwhile: nothing at the path to set aside
            self.log.critical("database file is damaged: moving to a new file", extra=said)
            return
        try:
            aside = rename_aside(self.config.db_path, "damaged")
        except OSError as refused:
            said["rename_error"] = describe(refused)
            self.log.critical("database file is damaged and cannot be set aside: rows wait in the carry "
                              "file until it is moved away", extra=said)
            return
        self.log.critical("database file is damaged: set aside, moving to a new file", extra={
            **said, "set_aside_as": aside})

    def reopen(self) -> dict[str, int]:
        """Copy what the old file owes into the carry file, close the old file, open a new one at the
        path and take the carry file in. Until the path can be opened, rows are written to the carry
        file; a crash in between leaves it for the next start."""
        carry, moved = self.db.carry_path, {}
        if self.conn_path != carry:
            open_database(carry)
            carried = self.connect(carry)            # before the copy: failing (a full disk), none is made
            try:
                self.conn.execute("ATTACH DATABASE ? AS carry", (carry,))
                try:
                    moved = carry_over(self.conn, "main", "carry", salvage=self.damaged)
                finally:
                    self.conn.execute("DETACH DATABASE carry")
            except BaseException:
                carried.close()
                raise
            with contextlib.suppress(sqlite3.Error):     # room only: the rows are committed either way
                carried.execute("PRAGMA wal_checkpoint(TRUNCATE)")         # the copy's WAL, as big as it
            # a file that lives on (moved away, a hard link) takes its WAL in if it can now (not on a full
            # disk, nor while read): the move never waits for it; a damaged or deleted file needs none
            whole = self.damaged or not self.old_file_named()
            if not whole:
                with contextlib.suppress(sqlite3.Error), never_waiting(self.conn):
                    whole = self.conn.execute("PRAGMA main.wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
            old, self.conn, self.conn_path = self.conn, carried, carry
            old.close()
            self.db.forget_old_companions(keep_wal=not whole)
        if problem := database_problem(self.config.db_path):   # moved in: not to be written
            raise RuntimeError(problem)
        if self.damaged_file and _identity(self.config.db_path) == self.damaged_file:
            raise RuntimeError(f"{self.config.db_path} is damaged and could not be set aside: move it away")
        open_database(self.config.db_path)
        if self.lock is not None:
            self.lock.hold_file()
        conn = self.connect(self.config.db_path)
        carried, self.conn, self.conn_path = self.conn, conn, self.config.db_path
        carried.close()
        take_carried(conn, self.config.db_path)
        return moved

    def old_file_named(self) -> bool:
        """Whether the file being left still has a name (moved away, a hard link), as the lock's
        descriptor on it says; without a lock, taken to have one."""
        fd = self.lock.file_fd if self.lock is not None else None
        return fd is None or os.fstat(fd).st_nlink > 0


def take_carried(conn: sqlite3.Connection, path: str) -> bool:
    """Take in the carry file beside the database file at `path`, left by a replacement of the file
    (at once, or at the next start after a crash), then remove it. False if there is none. The run's
    mark it carries names this file from then on: a crash in it is said at the next start."""
    carry = path + CARRY
    if not Path(carry).exists():
        return False
    try:
        open_database(carry)         # a crash while it was being made leaves it empty or half made
        conn.execute("ATTACH DATABASE ? AS carry", (carry,))
    except (sqlite3.DatabaseError, RuntimeError) as exc:      # RuntimeError: a newer otrace's schema
        if isinstance(exc, sqlite3.DatabaseError) and sqlite_code(exc) not in CORRUPTION:
            raise
        return set_aside(carry, describe(exc))
    check, identity = "ok", _identity(path)
    mark = functools.partial(conn.execute, "UPDATE otrace_state SET value = ? WHERE key = ?", (
        int64(identity[1]), RUN_FILE_KEY)) if identity else None
    try:                             # the mark in the copy's transaction: failing, neither is made
        carry_over(conn, "carry", "main", also=mark)
    except sqlite3.DatabaseError as exc:    # a torn page past the schema: the carry's, or the database's?
        if sqlite_code(exc) not in CORRUPTION or (
                check := conn.execute("PRAGMA carry.quick_check(1)").fetchone()[0]) == "ok":
            raise
    finally:
        conn.execute("DETACH DATABASE carry")
    if check != "ok":
        return set_aside(carry, check)
    for suffix in ("", "-wal", "-shm"):
        Path(carry + suffix).unlink(missing_ok=True)
    return True


def set_aside(carry: str, error: str) -> bool:
    """Rename a carry file that cannot be taken in (damaged, or a newer otrace's), kept for a hand and
    out of the start's way; False."""
    try:
        aside = rename_aside(carry, "aside")
    except FileNotFoundError:            # gone meanwhile: nothing to set aside
        return False
    log.error("carry file cannot be taken in: set aside, its rows not taken in", extra={
        "file": aside, "error": error})
    return False


@functools.cache
def insert_sql(table: str, rows: int = 1) -> str:
    """An INSERT of `rows` rows into `table` that skips trace_ids already stored."""
    columns = TABLES[table].columns
    marks = ", ".join(["(" + ", ".join("?" * len(columns)) + ")"] * rows)
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {marks} ON CONFLICT(trace_id) DO NOTHING"


def insert_rows(conn: sqlite3.Connection, table: str, values: list[tuple]) -> int:
    """Insert rows 32, 16, ..., 1 at a time (fewer for a table too wide for 32 rows in MAX_VARIABLES), a
    multi-row statement each; how many were new. Not executemany: that steps SQLite once per row, and
    every step gives the GIL away and must win it back from the busy HTTP thread (see docs/design.md)."""
    inserted = start = 0
    most = min(ROWS_PER_INSERT, 1 << (MAX_VARIABLES // len(TABLES[table].columns)).bit_length() - 1)
    while start < len(values):
        size = min(most, 1 << (len(values) - start).bit_length() - 1)
        params = list(itertools.chain.from_iterable(values[start:start + size]))
        inserted += conn.execute(insert_sql(table, size), params).rowcount
        start += size
    return inserted


def insert_new(conn: sqlite3.Connection, table: str, values: list[tuple]) -> list[tuple]:
    """Insert rows (insert_rows) and return the ones that were new: all of them, unless a trace_id was
    stored already. Then the new rows are the ones with the highest ids, as SQLite gives a new row
    the id after the highest: one query, only when there were duplicates."""
    inserted = insert_rows(conn, table, values)
    if inserted == len(values):
        return values
    fresh = {trace_id for (trace_id,) in conn.execute(f"SELECT trace_id FROM {table} ORDER BY id DESC "
                                                      "LIMIT ?", (inserted,))}
    new = []
    for row in values:
        if row[0] in fresh:          # the first of a trace_id sent twice in the batch is the one stored
            fresh.discard(row[0])
            new.append(row)
    return new


def wal_limit(config: Config, page_size: int) -> int:
    """SQLite's journal_size_limit: two autocheckpoints' worth, at most TRACE_WAL_MAX_BYTES."""
    return min(config.wal_max_bytes, 2 * autocheckpoint_pages(config, page_size) * page_size)


def autocheckpoint_pages(config: Config, page_size: int) -> int:
    """WAL pages after which a commit checkpoints: SQLite's 1,000, or under a small cap a fortieth of
    TRACE_DB_MAX_BYTES (or a quarter of TRACE_WAL_MAX_BYTES), so the WAL stays a small share of what
    the cap counts."""
    return max(16, min(1000, config.db_max_bytes // 40 // page_size, config.wal_max_bytes // 4 // page_size))


# ============================================================================================== ingest
# One thread serves every client connection through epoll: it reads without blocking until a
# request's head, then its body, is wholly in memory, and only then hands the request to the Api. So
# no client can hold a thread, and no crowd of handler threads takes the GIL from the writer (see
# docs/design.md). Bodies come with a Content-Length or chunked, on every method; they are held
# within one budget across all connections. Every answer leaves in one write with TCP_NODELAY.

HEAD_LIMIT = 65536               # request line and headers that otrace holds while waiting for their end
MAX_HEADERS = 100
CHUNK_LINE_LIMIT = 4096          # a chunk's size line, with its extensions
READ_CHUNK = 65536
ROUTES = {"/v1/traces": ("POST",), "/v1/errors": ("POST",), "/v1/metrics": ("POST",), "/v1/logs": ("POST",),
          "/v1/events": ("POST",), "/health": ("GET", "HEAD"), "/metrics": ("GET", "HEAD")}
PUBLIC_ROUTES = frozenset({"/health", "/metrics"})     # answered without the ingest token
# Connections over TRACE_MAX_CONNECTIONS that serve GET and HEAD on PUBLIC_ROUTES only, so that a flood
# holding every slot does not fail the liveness probe or the scrape. A constant: a probe or a scrape is
# one short request at a time, and 8 is plenty for the few that come at once.
PROBE_RESERVE = 8
REFUSED_LINGERING = 16           # connections refused 503 that read and drop what their client sends ...
REFUSED_DISCARD = 64 << 10       # ... up to this, for up to REFUSED_WAIT, before they close (see refuse)
REFUSED_WAIT = 2.0
ACCEPT_PAUSE = 0.05              # seconds a listener rests after accept failed (no descriptor, no memory)
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
TOO_MANY = "too many connections; retry later"
_BUSY_BODY = json.dumps(Refusal(503, TOO_MANY).body()).encode()
TOO_MANY_CONNECTIONS = b"\r\n".join([
    b"HTTP/1.1 503 Service Unavailable", b"Retry-After: 1", b"Content-Type: application/json",
    b"Content-Length: %d" % len(_BUSY_BODY), b"Connection: close", b"", _BUSY_BODY])
IN, OUT, RDHUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP
HUP, ERR = select.EPOLLHUP, select.EPOLLERR
_DECIMAL = re.compile(r"[0-9]+")         # compiled once: re's cache lookup costs more than the match
_HEXADECIMAL = re.compile(rb"[0-9A-Fa-f]+")


@dataclasses.dataclass(slots=True)
class Request:
    """One HTTP request, its head parsed; `body` fills as it arrives."""

    method: str
    target: str
    route: str                   # the path without its query: a key of ROUTES
    version: str
    headers: dict[str, str]      # by lower-case name; the first of a repeated one
    close: bool                  # the client asked to close after this request
    length: int | None           # Content-Length; None when chunked
    chunked: bool
    body: bytearray = dataclasses.field(default_factory=bytearray)
    client: str = ""             # the peer's address

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)


def parse_head(raw: bytes, complete: bool) -> Request:
    """A request's line and headers, or Refusal. `complete`: the blank line that ends them is in."""
    line, _, rest = raw.partition(b"\n")
    if len(line) > HEAD_LIMIT:
        raise Refusal(414, f"request line and headers are over {HEAD_LIMIT} bytes")
    line = line.rstrip(b"\r")
    words = line.decode("latin-1").split(" ")
    if len(words) != 3 or words[2] not in ("HTTP/1.1", "HTTP/1.0") or not words[0].isalpha():
        raise Refusal(400, f"not an HTTP/1.1 request line: {line[:200].decode('latin-1')!r}")
    method, target, version = words
    if target[:1] != "/" and target[:8].lower().startswith(("http://", "https://")):   # absolute-form,
        target = "/" + target.split("://", 1)[1].partition("/")[2]   # which servers take: its path, query
    route, headers = target.split("?", 1)[0], {}
    try:
        if len(raw) > HEAD_LIMIT:
            with contextlib.suppress(Refusal):   # the headers read so far: how an OTLP exporter is told
                read_headers(rest, complete, headers)
            raise Refusal(431, f"request line and headers are over {HEAD_LIMIT} bytes")
        read_headers(rest, complete, headers)
        length, chunked = body_framing(headers, version)
    except Refusal as refusal:                    # an OTLP exporter reads a google.rpc.Status, not ours
        refusal.otlp = refusal_encoding(route, headers)
        raise
    connection = {option.strip() for option in headers["connection"].lower().split(",")} \
        if "connection" in headers else ()                # most clients send none: no set to build
    close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
    return Request(method, target, route, version, headers, close, length, chunked)


def read_headers(rest: bytes, complete: bool, headers: dict[str, str]) -> None:
    """The header lines after a request line, into `headers` as they come; Refusal for a bad one, for
    more than MAX_HEADERS, or for a head that did not end (what was read before it stays read)."""
    lines = rest.decode("latin-1").split("\n")       # decoded once: latin-1 maps byte to character
    ended = complete and lines[-2:] in (["", ""], ["\r", ""])
    for count, line in enumerate(lines[:-2] if ended else lines[:-1], 1):
        if count > MAX_HEADERS:
            raise Refusal(431, f"more than {MAX_HEADERS} headers")
        item = line.rstrip("\r")
        name, colon, value = item.partition(":")
        if not colon or not name or name != name.strip():
            raise Refusal(400, f"bad header line: {item[:200]!r}")
        name, value = name.lower(), value.strip()
        if headers.setdefault(name, value) != value and name in ("content-length", "transfer-encoding"):
            raise Refusal(400, f"conflicting {name} headers")
    if not ended:
        raise Refusal(400, "the request ended inside its headers")


def body_framing(headers: dict[str, str], version: str) -> tuple[int | None, bool]:
    """(Content-Length, chunked) of a request; Refusal for framing otrace will not guess at."""
    coding, length = headers.get("transfer-encoding"), headers.get("content-length")
    if coding is not None:
        if coding.strip().lower() != "chunked":
            raise Refusal(501, f"Transfer-Encoding {coding!r} is not supported: only chunked, on HTTP/1.1")
        if version != "HTTP/1.1":
            raise Refusal(501, f"Transfer-Encoding on {version} is not supported: only chunked, on HTTP/1.1")
        if length is not None:
            raise Refusal(400, "both Content-Length and Transfer-Encoding: chunked")
        return None, True
    if length is None:
        return 0, False
    if not _DECIMAL.fullmatch(length):
        raise Refusal(400, "Content-Length must be a number of bytes")
    digits = length.lstrip("0")
    if len(digits) > 18:
        raise Refusal(413, f"Content-Length of {len(digits)} digits is over any TRACE_MAX_BODY_BYTES")
    return int(digits or "0"), False


def decode_chunked(raw: bytearray, out: bytearray, limit: int, state: list[int]) -> int | None:
    """Move the chunks of a chunked body that have arrived in `raw` into `out`, consuming them. `state`
    holds [bytes left in the current chunk, or -1 for a size line next, or -2 once the last chunk is
    read and trailers follow; bytes of trailers so far]. The body's length once it is complete, else
    None; Refusal for a bad chunk, a body over `limit` or trailers over HEAD_LIMIT."""
    while True:
        left = state[0]
        if left > 0:                                   # inside a chunk's data
            take = min(left, len(raw))
            out += raw[:take]
            del raw[:take]
            state[0] -= take
            if state[0]:
                return None
            state[0] = -3                              # its closing CRLF next
        elif left == -3:
            if len(raw) < 2:
                return None
            if raw[:2] != b"\r\n":
                raise Refusal(400, "a chunk does not end with CRLF")
            del raw[:2]
            state[0] = -1
        else:                                          # a size line (-1) or a trailer line (-2)
            end = raw.find(b"\n")
            if end < 0:
                if len(raw) > CHUNK_LINE_LIMIT:
                    raise Refusal(400, "a chunk size line is too long" if left == -1 else
                                  "a chunked trailer line is too long")
                return None
            line = bytes(raw[:end]).rstrip(b"\r")
            del raw[:end + 1]
            if left == -2:
                if not line:
                    return len(out)
                state[1] += end + 1                    # trailers carry nothing otrace uses: bounded
                if state[1] > HEAD_LIMIT:
                    raise Refusal(431, f"chunked trailers are over {HEAD_LIMIT} bytes")
                continue
            digits = line.split(b";", 1)[0].strip()
            if not _HEXADECIMAL.fullmatch(digits):
                raise Refusal(400, "a chunk size is not hexadecimal")
            digits = digits.lstrip(b"0")
            size = int(digits or b"0", 16) if len(digits) <= 15 else limit + 1
            if len(out) + size > limit:
                raise Refusal(413, f"body is over {limit} bytes (TRACE_MAX_BODY_BYTES)")
            state[0] = size if size else -2


class Budget:
    """Bytes of request bodies held in memory across all connections (TRACE_MAX_BUFFERED_BYTES); a
    request refused for it is counted and said, as no other count shows it."""

    def __init__(self, limit: int, counters: Counters) -> None:
        self.limit, self.held, self.counters = limit, 0, counters

    def take(self, n: int) -> None:
        if self.held + n > self.limit:
            self.counters.add("bodies_refused")
            refusal = Refusal(503, "too many request bodies in flight (TRACE_MAX_BUFFERED_BYTES); "
                              "retry later", {"Retry-After": "1"})
            refusal.logged = True
            raise refusal
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n


@dataclasses.dataclass(eq=False, slots=True)
class Connection:
    """One client connection: what has arrived of its next request, what is still to be sent to it."""

    sock: socket.socket
    address: str
    deadline: float                    # the client must finish its request or take its answer by then
    inbox: bytearray = dataclasses.field(default_factory=bytearray)
    outbox: bytearray = dataclasses.field(default_factory=bytearray)
    request: Request | None = None     # the request whose body is being read
    chunk_state: list[int] = dataclasses.field(default_factory=lambda: [-1, 0])
    reserved: int = 0                  # bytes of the budget this connection holds
    close: bool = False                # hang up once the outbox is sent
    mask: int = 0                      # the epoll events it is registered for
    waiting: Future | None = None      # an answer another thread is making (OTLP, a profile)
    discard: int = 0                   # bytes of a refused body still to read and drop (see linger)

    @property
    def lingering(self) -> bool:
        """Answered and to be closed, with what the client still sends of a refused body read and
        dropped until then."""
        return self.discard > 0 and self.close and not self.outbox

    @property
    def idle(self) -> bool:
        """Between requests, with nothing received, arrived unread or left to send: at shutdown it is
        closed at once."""
        if self.inbox or self.request is not None or self.outbox:
            return False
        try:
            return not self.sock.recv(1, socket.MSG_PEEK)     # b"": the client has hung up
        except OSError:                                       # nothing has arrived (or it is broken)
            return True

    def take_head(self, at_eof: bool) -> tuple[bytes, bool] | None:
        """The next request's head when its end is in (or can never come); else None. The flag says
        whether the head is complete."""
        inbox = self.inbox
        if inbox[:1] in (b"\r", b"\n"):             # empty lines before a request line: ignored (RFC 9112)
            del inbox[:len(inbox) - len(inbox.lstrip(b"\r\n"))]
            if not inbox:
                return None
        crlf = inbox.find(b"\n\r\n")                 # then "\n\n" only before it: not through the body
        lf = inbox.find(b"\n\n", 0, crlf + 1) if crlf >= 0 else inbox.find(b"\n\n")
        if crlf >= 0 or lf >= 0:                       # the last header line's \n, then \r\n or \n
            end = lf if crlf < 0 or 0 <= lf < crlf else crlf
            size = end + (2 if end == lf else 3)
            head = bytes(inbox[:size])
            del inbox[:size]
            return head, True
        if at_eof or len(inbox) > HEAD_LIMIT:
            head = bytes(inbox)
            inbox.clear()
            return head, False
        return None

    def read_body(self, budget: Budget, limit: int) -> bool:
        """Move what has arrived of the body into the request, within the budget. True once whole."""
        request = self.request
        if request.chunked:
            before = len(request.body)
            done = decode_chunked(self.inbox, request.body, limit, self.chunk_state)
            grown = len(request.body) - before
            budget.take(grown)
            self.reserved += grown
            return done is not None
        take = min(request.length - len(request.body), len(self.inbox))
        if take == len(self.inbox) and not request.body:     # the whole inbox is the body: no copy
            request.body, self.inbox = self.inbox, request.body
            return take == request.length
        request.body += self.inbox[:take]
        del self.inbox[:take]
        return len(request.body) == request.length


def http_date(second: int) -> str:
    t = time.gmtime(second)
    return f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} " \
           f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"


@functools.lru_cache(maxsize=2)
def _date_header(second: int) -> str:
    return f"Date: {http_date(second)}\r\n"


def respond(status: int, body: dict[str, Any] | bytes, *, headers: dict[str, str] | None = None,
            content_type: str = "application/json", close: bool = False, head_only: bool = False,
            http10: bool = False) -> bytes:
    """A whole response, head and body, to be sent in one write."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = (_status_head(status, content_type) + _date_header(int(time.time())) +
            f"Content-Length: {len(payload)}\r\n")
    if headers:
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    if close:
        head += "Connection: close\r\n"
    elif http10:
        head += "Connection: keep-alive\r\n"
    data = (head + "\r\n").encode("latin-1")
    return data if head_only else data + payload


@functools.lru_cache(maxsize=64)
def _status_head(status: int, content_type: str) -> str:
    return f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nServer: otrace/{__version__}\r\n" \
           f"Content-Type: {content_type}\r\n"


Answer = tuple[int, dict[str, Any] | bytes, dict[str, str], str]   # status, body, headers, content type


def is_loopback(address: str) -> bool:
    return address.startswith(("127.", "::ffff:127.")) or address == "::1"


def is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


GZIP_FIRST_PIECE = 64                    # bytes of a gzip member inflated first: about its least


def take_body(request: Request, limit: int) -> bytearray:
    """The body, taken from the request (not copied: one held for long holds no twin), with its
    Content-Encoding undone; the decoded size counts against `limit` too."""
    coding = request.headers.get("content-encoding", "identity").strip().lower()
    if coding in ("", "identity"):
        body, request.body = request.body, bytearray()
        return body
    if coding not in ("gzip", "x-gzip"):
        raise Refusal(415, f"Content-Encoding {coding!r} is not supported: gzip or none")
    body, parts, size, at = bytes(request.body), [], 0, 0
    request.body = bytearray()
    while True:                                  # one gzip member after another, as RFC 1952 allows
        inflater, piece = zlib.decompressobj(wbits=31), GZIP_FIRST_PIECE
        while not inflater.eof:                  # pieces that double: what follows a member is copied
            if at == len(body):                  # (unused_data), so a small member copies little
                raise Refusal(400, "gzip body ends early")
            chunk = body[at:at + piece]
            try:
                parts.append(inflater.decompress(chunk, limit + 1 - size))
            except zlib.error as exc:
                raise Refusal(400, f"body is not valid gzip: {exc}") from None
            size += len(parts[-1])
            if size > limit or inflater.unconsumed_tail:
                raise Refusal(413, f"body is over {limit} bytes once decompressed (TRACE_MAX_BODY_BYTES)")
            at, piece = at + len(chunk) - len(inflater.unused_data), piece * 2
        if at == len(body):                      # else another member, or bytes that are not gzip (400)
            return bytearray().join(parts)


class Stall:
    """Since when the writer has refused events, none taken between: a refusal asks the client to come
    back about that much later (Retry-After, at least `least`, at most RETRY_AFTER_MAX s), as an
    exponential backoff would, for exporters that retry a number of times whatever their timeout
    says, so that they ride out a writer stalled longer than their first few retries."""

    RETRY_AFTER_MAX = 30

    def __init__(self) -> None:
        self.since = self.last = -math.inf     # HTTP and OTLP threads both: a race only resets it

    def retry_after(self, least: int) -> dict[str, str]:
        """The header for a refusal: one after a pause longer than any wait asked begins a new stall."""
        now = time.monotonic()
        if now - self.last > self.RETRY_AFTER_MAX:
            self.since = now
        self.last = now
        return {"Retry-After": str(min(self.RETRY_AFTER_MAX, max(least, round(now - self.since))))}

    def ended(self) -> None:
        self.last = -math.inf


_JSON_STRING = json.encoder.encode_basestring_ascii     # json.dumps' own, for strings (ensure_ascii)


def accepted_json(trace_ids: list[str], ignored: list[str]) -> bytes:
    """The 202's body, byte for byte json.dumps' of {"accepted", "trace_ids"[, "ignored_fields"]}:
    json.dumps makes an encoder for each call."""
    text = f'{{"accepted": {len(trace_ids)}, "trace_ids": [{", ".join(map(_JSON_STRING, trace_ids))}]'
    if ignored:
        text += f', "ignored_fields": [{", ".join(map(_JSON_STRING, ignored))}]'
    return (text + "}").encode()


class Api:
    """What otrace answers: the routes, the ingest token, and the refusals, all as whole responses."""

    def __init__(self, service: Service) -> None:
        self.service, self.config = service, service.config
        self.routes = ROUTES | (DEBUG_ROUTES if service.debug else {})
        self.stall = Stall()

    def begin(self, request: Request) -> None:
        """Checks made before a byte of the body is read; Refusal ends the request (and the connection,
        as its body stays unread)."""
        methods = self.routes.get(request.route)
        if methods is None:
            raise Refusal(404, f"no such path: {request.route}")
        if request.method not in methods:
            raise Refusal(405, f"{request.method} is not allowed on {request.route}",
                          {"Allow": ", ".join(methods)})
        if request.route in DEBUG_ROUTES and not is_loopback(request.client):
            raise Refusal(403, "the /debug endpoints answer loopback clients only")
        if self.config.ingest_token and request.route not in PUBLIC_ROUTES and not self.authorized(request):
            raise Refusal(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        if request.method == "POST":
            self.check_post(request)
        if request.length is not None and request.length > self.config.max_body_bytes:
            raise Refusal(413, f"body of {request.length} bytes is over {self.config.max_body_bytes} "
                          "(TRACE_MAX_BODY_BYTES)")

    def check_post(self, request: Request) -> None:
        content_type = request.headers.get("content-type")
        if content_type and not is_json_type(content_type):
            if request.route not in OTLP_SIGNALS:
                raise Refusal(415, f"content type must be application/json, not {content_type}")
            if otlp_encoding(request.headers) != "protobuf":
                raise Refusal(415, f"content type must be application/json or application/x-protobuf "
                              f"(OTLP), not {content_type}")
        if not request.has_body and "content-length" not in request.headers:
            raise Refusal(411, "Content-Length (or Transfer-Encoding: chunked) is required")

    def refused(self, request: Request | None, refusal: Refusal) -> tuple[dict[str, Any] | bytes, str]:
        """The body and content type of a refusal: otrace's JSON error, or for an OTLP request the
        google.rpc.Status its specification asks for, in the request's encoding."""
        encoding = refusal.otlp
        if encoding is None and request is not None:
            encoding = refusal_encoding(request.route, request.headers)
        if encoding is None:
            return refusal.body(), "application/json"
        return rpc_status(refusal, encoding)

    def authorized(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        import hmac  # noqa: PLC0415 - imported where needed (see the imports)
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode("utf-8", "surrogateescape"), self.config.ingest_token.encode())

    def answer(self, request: Request) -> Answer | Future:
        """(status, body, headers, content type) for a whole request, or a Future of them when another
        thread makes the answer (the HTTP thread goes on serving meanwhile)."""
        service = self.service
        if request.route == "/health":
            report = service.health()
            return (200 if report["status"] == "ok" else 503), report, {}, "application/json"
        if request.route == "/metrics":
            return 200, prometheus(service.health()).encode(), {}, PROMETHEUS_TYPE
        if request.route in DEBUG_ROUTES:
            return service.debug.answer(request)
        return self.ingest(request)

    def ingest(self, request: Request) -> Answer | Future:
        """POST /v1/traces, /v1/errors and /v1/events (and OTLP on /v1/traces, /v1/metrics, /v1/logs):
        validate, offer the rows to the queue whole, answer. OTLP is answered from its own thread."""
        service = self.service
        if encoding := service.otlp.known(request):     # refused before its body is inflated
            service.otlp.room(encoding)
        service.events.gate.wait()
        body = take_body(request, self.config.max_body_bytes)
        if encoding is None and request.route == "/v1/traces":
            encoding = service.otlp.recognise(body)
        if encoding:
            return service.otlp.submit(request, body, encoding, admit=self.admit)
        rows, ignored = parse_events(body, request.route, self.config.max_events, self.config.max_text_bytes)
        self.admit(rows)
        if request.route == "/v1/events":
            service.counters.add("custom_received", len(rows))
        return 202, accepted_json([row.values[0] for row in rows], ignored), {}, "application/json"

    def admit(self, rows: list[Row], extra: tuple[tuple[str, tuple], ...] = ()) -> None:
        """Offer rows (and statements that commit with them) to the queue whole: a 202 promises a
        commit, so Refusal (503) when the writer cannot keep that promise now."""
        service = self.service
        if not service.writer.is_alive() or service.writer.failing:
            service.counters.add("refused", len(rows))
            why = service.writer.failing_because() if service.writer.is_alive() else "the writer stopped"
            raise Refusal(503, f"database writes are failing ({why}); retry later", self.stall.retry_after(5))
        if not service.events.offer(Unit(rows, extra)):
            service.counters.add("refused", len(rows))
            raise Refusal(503, "queue is full; retry later", self.stall.retry_after(1))
        self.stall.ended()
        service.counters.add("received", len(rows))


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_said(request: Request | None) -> str | None:
    """A request's method as a log says it: another word a client sent (any text) is "other"."""
    return request and (request.method if request.method in HTTP_METHODS else "other")


def route_said(request: Request | None) -> str:
    """A request's route as a log says it: a path otrace does not serve is "other" (a client's path,
    a webhook's say, may hold a key)."""
    return request.route if request is not None and request.route in ROUTES else "other"


class MinuteLog:
    """Says a warning that recurs at WARNING at most once a minute for each kind, with how many of that
    kind came since the last line (the field `counted`); those of a burst that ended are said once its
    minute is up (`flush`). The fields named `summed` (counts, or counts by name) add up every one the
    line stands for: a line a minute still says how much was lost. Threads may share one, hence the
    lock."""

    EVERY = 60.0

    def __init__(self, logger: logging.Logger, counted: str, summed: tuple[str, ...] = ()) -> None:
        self.logger, self.counted, self.summed = logger, counted, summed
        self.last: dict[Any, list] = {}        # kind -> [said at, since, message, its line, its sums]
        self.lock = threading.Lock()

    def say(self, kind: Any, message: str, line: dict[str, Any]) -> None:
        with self.lock:
            entry = self.last.setdefault(kind, [-math.inf, 0, "", {}, {}])
            entry[1] += 1
            entry[2:4] = [message, line]
            for name in self.summed:
                if name in line:
                    entry[4][name] = added(entry[4].get(name), line[name])
        self.flush(entry)

    def flush(self, said: list | None = None, *, now: float | None = None) -> None:
        """Say each kind whose minute is up and that has lines unsaid (or only `said`)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            due = [entry for entry in ([said] if said is not None else self.last.values())
                   if entry[1] and now - entry[0] >= self.EVERY]
            lines = [(entry[2], {**entry[3], **entry[4]}, entry[1] - 1) for entry in due]
            for entry in due:
                entry[:2], entry[4] = [now, 0], {}
        for message, line, since in lines:
            self.logger.warning(message, extra={**line, self.counted: since})

    def next_due(self) -> float | None:
        """When (monotonic seconds) the first kind with lines unsaid is due, or None."""
        with self.lock:
            return min((entry[0] + self.EVERY for entry in self.last.values() if entry[1]), default=None)


def added(total: Any, more: Any) -> Any:
    """A count, or counts by name, added to another (None: none yet)."""
    if isinstance(more, dict):
        return {name: (total or {}).get(name, 0) + more.get(name, 0) for name in {*(total or {}), *more}}
    return (total or 0) + more


class RefusalLog(MinuteLog):
    """Says a request answered 4xx, or an OTLP request answered 200 with items it refused (`items`:
    partial_success, which exporters do not log), once a minute for each kind (status, route, field).
    A client that never reads its answers loses what it sends, and the log is where that shows. Only
    otrace's words are said: a body's field and its fault, else the status's phrase (a bad header's
    text is the client's, secrets and all). Used by the HTTP thread and the OTLP receiver's."""

    def __init__(self) -> None:
        super().__init__(log, "refused_since_last_line", summed=("items_refused",))

    def refused(self, request: Request | None, refusal: Refusal, client: str, items: int = 0) -> None:
        route = route_said(request)
        invalid = refusal if isinstance(refusal, Invalid) else None
        field = invalid and invalid.field
        status = 200 if items else refusal.status
        line = {"status": status, "route": route, "method": method_said(request),
                "error": invalid.said() if invalid else str(refusal) if refusal.status >= 500 else
                HTTPStatus(refusal.status).phrase,
                "field": field, "index": invalid and invalid.index, "client": client}
        if items:
            line["items_refused"] = items
        self.say((status, route, field), "request partly refused" if items else "request refused", line)


class IngestServer:
    """The HTTP server: one thread, at most TRACE_MAX_CONNECTIONS connections (and PROBE_RESERVE more
    that serve /health and /metrics only, each for as long as it stays open), on one or more listening
    sockets (an `optional` one that cannot be bound is logged and left out). It hangs up on a client
    that takes longer than TRACE_READ_TIMEOUT to send a whole request or to take its answer, and at
    shutdown closes the idle connections and finishes the busy ones."""

    BACKLOG = 128

    def __init__(self, service: Service, addresses: list[tuple[str, int]],
                 optional: list[tuple[str, int]] = ()) -> None:
        config = service.config
        self.service, self.api = service, Api(service)
        self.counters = service.counters
        self.refusals = service.refusals
        self.limit, self.read_timeout = config.max_connections, config.read_timeout
        self.max_body = config.max_body_bytes
        self.budget = Budget(config.max_buffered_bytes, service.counters)
        self.poller = select.epoll()
        self.listeners: dict[int, socket.socket] = {}
        self.unbound: list[dict[str, Any]] = []
        try:
            for host, port in addresses:
                self.listen(host, port)
            for host, port in optional:
                try:
                    self.listen(host, port)
                except OSError as exc:
                    self.unbound.append({"host": host, "port": port, "error": describe(exc)})
                    log.error("cannot listen on this port; it is left out", extra=self.unbound[-1])
        except OSError:
            self.release()
            raise
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller.register(self.wake_r, IN)
        self.wake_lock = threading.Lock()
        self.wake_closed = False
        self.close_asked = False
        self.made: collections.deque[tuple[Connection, Future]] = collections.deque()  # made by others
        self.open: dict[int, Connection] = {}
        self.reserve: dict[int, Connection] = {}   # in PROBE_RESERVE (probes only), oldest first
        self.refused: dict[int, Connection] = {}   # answered 503 as too many, closing: counted in neither
        self.chunk = memoryview(bytearray(READ_CHUNK))
        self.accept_fault = FaultLog(log, "accepting connections")
        self.paused: list[socket.socket] = []     # listeners resting until resume_at: see accept
        self.resume_at = 0.0
        self.closing = False
        self.close_by = math.inf
        self.cut = 0
        self.stopped = threading.Event()
        self.failed = False               # by a bug: nothing is served, and otrace stops
        self.on_failed: Callable[[], None] = lambda: None

    def listen(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        both = host == "::" and socket.has_dualstack_ipv6()   # every address means IPv4's too (127.0.0.1)
        sock = socket.create_server((host, port), family=family, backlog=self.BACKLOG, dualstack_ipv6=both)
        sock.setblocking(False)
        self.listeners[sock.fileno()] = sock
        self.poller.register(sock.fileno(), IN)

    def addresses(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for sock in self.listeners.values()]

    def release(self) -> None:
        for sock in self.listeners.values():
            sock.close()
        self.poller.close()

    def serve_forever(self) -> None:
        """The server's thread: wait for sockets, serve what is ready, hang up on clients past their
        deadline; until shutdown has closed every connection (or its time is up)."""
        tick = min(1.0, self.read_timeout / 4)
        next_reap = time.monotonic() + tick
        try:
            while not (self.closing and (not self.open or time.monotonic() >= self.close_by)):
                timeout = min(tick, self.close_by - time.monotonic()) if self.closing else tick
                if not self.open and not self.closing:    # nothing to reap: sleep until a client, the
                    due = self.refusals.next_due()         # wake pipe, or a burst's count is due
                    timeout = -1 if due is None else max(0.0, due - time.monotonic())
                    next_reap = next_reap if due is None else min(next_reap, due)
                if self.paused:
                    timeout = min(tick if timeout < 0 else timeout, self.resume_at - time.monotonic())
                for fd, events in self.poller.poll(timeout if timeout < 0 else max(0.0, timeout)):
                    self.on_ready(fd, events)
                if self.paused and time.monotonic() >= self.resume_at:
                    for sock in self.paused:
                        self.poller.register(sock.fileno(), IN)
                    self.paused.clear()
                if (now := time.monotonic()) >= next_reap:
                    next_reap = now + tick
                    for conn in [c for c in self.open.values() if c.deadline < now]:
                        self.time_out(conn)
                    self.refusals.flush()
            self.refusals.flush(now=math.inf)          # a burst's count, said before the stop
            self.cut = len(self.open)
            for conn in list(self.open.values()):
                self.hang_up(conn)
        except Exception:                # a bug: say so and stop, for a supervisor to start otrace again
            log.exception("http server failed: otrace stops")
            self.failed = True
            self.on_failed()
        finally:
            self.release()
            self.stopped.set()

    def on_ready(self, fd: int, events: int) -> None:
        conn = self.open.get(fd)
        try:
            if conn:
                self.serve(conn, events)
            elif fd in self.listeners and not self.closing:
                self.accept(self.listeners[fd])
            elif fd == self.wake_r:
                self.on_wake()
        except Exception as exc:         # a request never takes the server down
            if conn is None and fd in self.listeners:     # nor a bug in taking its clients spin on them
                if self.accept_fault.error is None:       # its traceback once an episode
                    log.exception("accepting connections failed")
                self.rest(self.listeners[fd], describe(exc))
                return
            log.exception("request failed", extra={"client": conn and conn.address})
            if conn and isinstance(exc, MemoryError):       # a client told to retry, if there is room
                with contextlib.suppress(Exception):
                    refusal = out_of_memory()
                    body, content_type = self.api.refused(conn.request, refusal)
                    self.finish(conn, 503, body, refusal.headers, close=True, content_type=content_type)
                    self.send(conn)
                    return
            if conn:
                self.hang_up(conn)

    def rest(self, listener: socket.socket, error: str) -> None:
        """A listener that cannot take its clients now rests ACCEPT_PAUSE: they wait in the backlog, and
        neither spins the thread serving the others nor sleeps it."""
        self.accept_fault.failed(error)
        self.poller.unregister(listener.fileno())
        self.paused.append(listener)
        self.resume_at = time.monotonic() + ACCEPT_PAUSE

    def accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                self.accept_fault.cleared()                   # every client waiting was taken
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.rest(listener, describe(exc))
                    return
                continue                                      # that client gave up
            over = len(self.open) - len(self.reserve) - len(self.refused) >= self.limit
            if over and len(self.reserve) >= PROBE_RESERVE and not self.make_room():
                self.counters.add("connections_refused")
                self.refuse(sock, address[0])
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, address[0], time.monotonic() + self.read_timeout, mask=IN)
            if over:
                self.reserve[sock.fileno()] = conn
            self.open[sock.fileno()] = conn
            self.poller.register(sock.fileno(), IN)

    def refuse(self, sock: socket.socket, address: str) -> None:
        """Answer 503 to a connection over the limit, and linger on it: its request's body may come
        after its head. At most REFUSED_LINGERING at once: the oldest goes for a new one."""
        if len(self.refused) >= REFUSED_LINGERING:
            self.hang_up(next(iter(self.refused.values())))
        sock.setblocking(False)
        conn = Connection(sock, address, time.monotonic() + min(self.read_timeout, REFUSED_WAIT), mask=IN,
                          outbox=bytearray(TOO_MANY_CONNECTIONS), close=True, discard=REFUSED_DISCARD)
        self.open[sock.fileno()] = self.refused[sock.fileno()] = conn
        self.poller.register(sock.fileno(), IN)
        self.send(conn)

    def make_room(self) -> bool:
        """Hang up on the oldest reserve connection that holds nothing of a request (silent since it
        came, or idle after its answers), so that clients that connect and send nothing cannot keep a
        probe out. False when each of them is busy."""
        silent = next((c for c in self.reserve.values() if c.idle and not c.lingering), None)
        if silent is not None:
            self.counters.add("connections_refused")
            self.hang_up(silent)
        return silent is not None

    def serve(self, conn: Connection, events: int) -> None:
        """Send what is left of the last answer; read what the client sent; answer every request that
        is now whole, in order, one at a time (the next once the last is sent)."""
        if conn.lingering:
            self.drop_unread(conn)
            return
        if conn.waiting is not None:                   # its answer is being made: nothing is read
            if events & (HUP | ERR):                   # reset: the client is gone
                self.hang_up(conn)
            elif events & RDHUP:                       # FIN: read once answered, after what came before
                conn.mask = 0
                self.poller.modify(conn.sock.fileno(), 0)
            return
        if conn.outbox and not self.send(conn):
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
        while self.step(conn, at_eof):
            if not self.send(conn):
                return
        if conn.waiting is None and (at_eof or (self.closing and conn.idle)):   # waiting: the end of
            self.hang_up(conn)                         # file is read again once it is answered

    def step(self, conn: Connection, at_eof: bool) -> bool:
        """Move the connection's next request on as far as what has arrived allows. True when it
        wrote something to send (an answer, or 100 Continue)."""
        request = conn.request
        if conn.waiting is not None:                   # its answer is being made: the next one waits
            return False
        try:
            if request is None:
                head = conn.take_head(at_eof) if conn.inbox else None
                if head is None:
                    return False
                conn.deadline = time.monotonic() + self.read_timeout
                request = conn.request = parse_head(*head)
                request.client = conn.address
                probes_only = conn.sock.fileno() in self.reserve
                if probes_only and (request.method not in ("GET", "HEAD") or request.has_body
                                    or request.route not in PUBLIC_ROUTES):
                    self.counters.add("connections_refused")
                    raise Refusal(503, TOO_MANY, {"Retry-After": "1"})
                self.api.begin(request)
                if request.length:
                    self.budget.take(request.length)
                    conn.reserved += request.length
                if (request.has_body and request.version == "HTTP/1.1"         # 1.0 has no 100
                        and request.headers.get("expect", "").lower() == "100-continue"):
                    conn.outbox += b"HTTP/1.1 100 Continue\r\n\r\n"
                    return True
            if request.has_body and not conn.read_body(self.budget, self.max_body):
                if not at_eof:
                    return False
                expected = f" of {request.length}" if request.length is not None else ""
                raise Refusal(400, f"body ended after {len(request.body)}{expected} bytes")
        except Refusal as refusal:                     # before the whole body is in: it stays unread
            self.count_refusal(refusal.status)
            if refusal.logged:
                self.refusals.refused(conn.request, refusal, conn.address)
            body, content_type = self.api.refused(conn.request, refusal)
            unread = self.unread(conn.request, conn.inbox) if not at_eof else 0
            self.finish(conn, refusal.status, body, refusal.headers, close=True, content_type=content_type)
            conn.discard = unread
            return True
        self.answer(conn, request)
        return True

    def unread(self, request: Request | None, inbox: bytearray) -> int:
        """Bytes of a refused request's body still to come that otrace reads and drops before it hangs
        up (linger), so that a client still sending gets to read the answer: the rest of a length
        declared up to TRACE_MAX_BODY_BYTES (none past it: hung up at once), or what such a body takes
        on the wire when chunked."""
        if request is None or not request.has_body:
            return 0
        if request.length is None:
            return 2 * self.max_body + HEAD_LIMIT      # its chunks' size lines come on top of the body
        left = request.length - len(request.body) - len(inbox)
        return left if 0 < left <= self.max_body else 0

    def answer(self, conn: Connection, request: Request) -> None:
        try:
            made = self.api.answer(request)
        except Refusal as refusal:
            made = answered(refusal)
        if isinstance(made, Future):
            self.defer(conn, made)
            return
        self.deliver(conn, made)

    def deliver(self, conn: Connection, made: Answer | Refusal) -> None:
        headers: dict[str, str] = {}
        content_type = "application/json"
        if isinstance(made, Refusal):
            status, headers = made.status, made.headers
            body, content_type = self.api.refused(conn.request, made)
            if made.logged:
                self.refusals.refused(conn.request, made, conn.address)
        else:
            status, body, headers, content_type = made
        self.count_refusal(status)
        self.finish(conn, status, body, headers, content_type=content_type)

    def count_refusal(self, status: int) -> None:
        """A 4xx answer counted: a client without the token (it loses what it sends), or one whose
        request otrace refused (a wrong path, type or size, a bad body, a framing it does not take). A
        503 is counted by its cause."""
        if status == 401:
            self.counters.add("unauthorized")
        elif 400 <= status < 500 or status in (501, 505):
            self.counters.add("rejected")

    def defer(self, conn: Connection, future: Future) -> None:
        """The answer comes from another thread: the connection waits without a deadline and without
        reading (a hang-up is still seen), and the wake-up pipe says when the answer is made."""
        conn.waiting, conn.deadline, conn.mask = future, math.inf, RDHUP
        self.poller.modify(conn.sock.fileno(), RDHUP)

        def made(done: Future) -> None:        # on the thread that made it
            self.made.append((conn, done))
            self.wake()

        future.add_done_callback(made)

    def wake(self) -> None:
        """Wake the server's thread, from any thread; never once the pipe is closed (an answer made
        after the server stopped), when its number may be another file's."""
        with self.wake_lock:
            if not self.wake_closed:
                with contextlib.suppress(OSError):   # a full pipe already holds a wake-up
                    os.write(self.wake_w, b"a")

    def on_wake(self) -> None:
        """The wake-up pipe: answers made by other threads are sent; a shutdown begins."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_r, 4096)
        while self.made:
            conn, done = self.made.popleft()
            if self.open.get(conn.sock.fileno()) is not conn:
                continue                                   # the client hung up meanwhile
            conn.waiting = None
            problem = done.exception()                     # not raised here: that traces it again
            if problem is None:
                made = done.result()
            elif isinstance(problem, Refusal):
                made = problem
            else:                                          # a bug: say so, answer 500 rather than hang
                log.error("answer failed", exc_info=problem, extra={"client": conn.address})
                made = out_of_memory() if isinstance(problem, MemoryError) else \
                    Refusal(500, "the answer could not be made; see otrace's log")
            self.deliver(conn, made)
            self.serve(conn, OUT)                          # send it, then any request that waited
        if self.close_asked:
            self.begin_closing()

    def finish(self, conn: Connection, status: int, body: dict[str, Any] | bytes, headers: dict[str, str],
               *, close: bool = False, content_type: str = "application/json") -> None:
        """Queue the request's answer and make the connection ready for the next request."""
        request = conn.request
        close = close or self.closing or request is None or request.close
        conn.outbox += respond(status, body, headers=headers, content_type=content_type, close=close,
                               head_only=request is not None and request.method == "HEAD",
                               http10=request is not None and request.version == "HTTP/1.0")
        conn.close |= close
        self.budget.give(conn.reserved)
        conn.reserved, conn.request, conn.chunk_state[:] = 0, None, [-1, 0]
        conn.deadline = time.monotonic() + self.read_timeout
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request", extra={"method": method_said(request), "route": route_said(request),
                                        "status": status, "client": conn.address})

    def send(self, conn: Connection) -> bool:
        """Send what is waiting for the client. True once it is all sent and the connection stays open;
        False when the rest must wait for the client to take it, or the connection is closed."""
        out = conn.outbox
        try:
            del out[:conn.sock.send(out)]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.hang_up(conn)
            return False
        if not out and conn.close:
            if conn.lingering and not self.closing:     # at a stop there is no time to read it
                self.linger(conn)
            else:
                self.hang_up(conn)
            return False
        mask = OUT if out else RDHUP if conn.waiting is not None else IN    # waiting: a hang-up only
        if mask != conn.mask:
            conn.mask = mask
            self.poller.modify(conn.sock.fileno(), mask)
        return not out

    def time_out(self, conn: Connection) -> None:
        """A client past TRACE_READ_TIMEOUT: one that was sending a request is told so (408, if its
        socket takes it now); an idle one, or one not taking its answer, is simply closed."""
        if (conn.inbox or conn.request is not None) and not conn.outbox:
            late = Refusal(408, f"the request did not arrive whole within TRACE_READ_TIMEOUT "
                                f"({self.read_timeout:g} s)")
            if conn.request is None:          # its head still coming: what came of it names its route
                try:
                    parse_head(bytes(conn.inbox), complete=False)
                except Refusal as partly:
                    late.otlp = partly.otlp
            self.refusals.refused(conn.request, late, conn.address)
            body, content_type = self.api.refused(conn.request, late)      # an OTLP route's: a Status
            with contextlib.suppress(OSError):
                conn.sock.send(respond(408, body, close=True, content_type=content_type))
        self.hang_up(conn)

    def linger(self, conn: Connection) -> None:
        """The answer to a request refused before its body was read is sent: say the end (FIN), and
        read and drop what the client still sends until it hangs up, `discard` bytes are read or its
        TRACE_READ_TIMEOUT passes (REFUSED_WAIT at most, for one refused as too many). Closed at once,
        a socket with unread data resets the connection, and a client still sending sees a broken
        pipe, never the answer."""
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        conn.inbox.clear()
        wait = self.read_timeout
        if conn.sock.fileno() in self.refused:
            wait = min(wait, REFUSED_WAIT)
        conn.deadline = time.monotonic() + wait
        conn.mask = IN
        self.poller.modify(conn.sock.fileno(), IN)

    def drop_unread(self, conn: Connection) -> None:
        """Read what a lingering client sends, and drop it; hang up at its end or past `discard`."""
        while True:
            try:
                n = conn.sock.recv_into(self.chunk)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = 0
            conn.discard -= n
            if not n or conn.discard <= 0:
                self.hang_up(conn)
                return

    def hang_up(self, conn: Connection) -> None:
        if self.open.pop(conn.sock.fileno(), None) is not None:
            self.reserve.pop(conn.sock.fileno(), None)
            self.refused.pop(conn.sock.fileno(), None)
            if conn.waiting is not None:
                conn.waiting.cancel()            # an answer not begun is not made for a client gone
            self.budget.give(conn.reserved)
            conn.reserved = 0
            with contextlib.suppress(OSError):
                self.poller.unregister(conn.sock.fileno())
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.close()

    def begin_closing(self) -> None:
        """Shutdown: stop accepting, close the idle connections; the busy ones finish by close_by."""
        if self.closing:
            return
        self.closing = True
        for sock in self.listeners.values():
            if sock not in self.paused:
                self.poller.unregister(sock.fileno())
            sock.close()                 # a new client is refused at once, not left in the backlog
        self.paused.clear()
        for conn in [c for c in self.open.values() if c.idle or c.lingering]:
            self.hang_up(conn)

    def close(self, until: float) -> int:
        """Stop serving (called from another thread): returns once every connection is closed, the
        ones still busy at `until` cut off; how many were cut."""
        self.close_by, self.close_asked = until, True
        self.wake()
        if self.stopped.wait(max(0.0, until - time.monotonic()) + 1.0):
            with self.wake_lock:
                self.wake_closed = True
                for fd in (self.wake_r, self.wake_w):
                    os.close(fd)
        return self.cut

    def count(self) -> int:
        return len(self.open)


# ================================================================================================ otlp
# OpenTelemetry's own protocol, OTLP/HTTP, on /v1/traces, /v1/metrics and /v1/logs of both ports, in
# protobuf or in JSON (a body whose top level is resourceSpans, ...). Spans of LLM calls become
# llm_traces rows (other spans are counted), GenAI usage metric points become genai_metrics rows
# (cumulative series turned into deltas), ERROR log records become error_events, and GenAI event
# records give their span's row its content. opentelemetry-proto's generated classes decode it,
# imported on the first OTLP request, so an otrace that never gets one never pays for them.

OTLP_SIGNALS = {"/v1/traces": "traces", "/v1/metrics": "metrics", "/v1/logs": "logs"}
PROTOBUF_TYPES = frozenset({"application/x-protobuf", "application/protobuf"})
OTLP_TOP = {"traces": ("resourceSpans", "resource_spans"), "metrics": ("resourceMetrics", "resource_metrics"),
            "logs": ("resourceLogs", "resource_logs")}
OTLP_REJECTED = {"traces": ("rejectedSpans", "rejected_spans"),     # partial_success's count, JSON and proto
                 "metrics": ("rejectedDataPoints", "rejected_data_points"),
                 "logs": ("rejectedLogRecords", "rejected_log_records")}
ID_FIELDS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})
SPAN_KEY = re.compile(r"[0-9a-f]{32}-[0-9a-f]{16}")     # a span's row key (span_key)
RPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 405: 12, 408: 4, 411: 3, 413: 8, 414: 3, 415: 3, 429: 8,
             431: 3, 501: 12, 503: 14}                 # google.rpc.Code of an HTTP status
MODEL_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "embeddings", "completion",
                              "embedding"})            # the last two: OpenLLMetry's llm.request.type
OPENCLAW_USAGE = "openclaw.model.usage"
ENTITY_KIND = "traceloop.span.kind"      # OpenLLMetry's mark of its workflow, task, agent and tool spans
OPENCLAW_COST = "openclaw.cost.usd"      # OpenClaw's cost metric: its usage spans carry none
USAGE_METRICS = frozenset({"openclaw.tokens", OPENCLAW_COST, "openclaw.run.duration_ms"})
PROVIDER_KEYS = ("gen_ai.provider.name", "gen_ai.system", "openclaw.provider")
MODEL_KEYS = ("gen_ai.response.model", "gen_ai.request.model", "openclaw.model")      # response first
PROVIDER_NAMES = {"az.ai.inference": "azure.ai.inference", "az.ai.openai": "azure.ai.openai",
                  "azure_openai": "azure.ai.openai", "vertex_ai": "gcp.vertex_ai",
                  "vertexai": "gcp.vertex_ai", "gemini": "gcp.gemini", "xai": "x_ai",
                  "mistralai": "mistral_ai", "mistral": "mistral_ai", "bedrock": "aws.bedrock",
                  "aws_bedrock": "aws.bedrock", "watsonx": "ibm.watsonx.ai"}
USAGE_KEYS = {   # llm_traces column: span attributes, newest convention first (input includes cached)
    "prompt_tokens": ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.usage.prompt_tokens"),
    "completion_tokens": ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens",
                          "llm.usage.completion_tokens"),
    "total_tokens": ("gen_ai.usage.total_tokens", "llm.usage.total_tokens"),
    "cache_read_tokens": ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens"),
    "cache_write_tokens": ("gen_ai.usage.cache_creation.input_tokens",
                           "gen_ai.usage.cache_write.input_tokens",
                           "gen_ai.usage.cache_creation_input_tokens"),
    "reasoning_tokens": ("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens"),
}
OPENCLAW_TOKENS = {"completion_tokens": "openclaw.tokens.output", "total_tokens": "openclaw.tokens.total",
                   "cache_read_tokens": "openclaw.tokens.cache_read",
                   "cache_write_tokens": "openclaw.tokens.cache_write"}
FINISH_KEYS = ("gen_ai.response.finish_reasons", "gen_ai.response.finish_reason",
               "llm.response.finish_reason", "anthropic.message.stop_reason")
TTFT_KEYS = ("gen_ai.response.time_to_first_chunk", "gen_ai.response.time_to_first_token")   # seconds
SESSION_KEYS = ("gen_ai.conversation.id", "openclaw.sessionId", "session.id")
COST_KEY = "gen_ai.usage.cost"                          # USD, as Langfuse reads it: no semantic convention
CONTENT_KEYS = frozenset({"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions",
                          "gen_ai.tool.definitions", "gen_ai.prompt", "gen_ai.completion"})
LEGACY_CONTENT = re.compile(r"gen_ai\.(prompt|completion)\.(\d{1,4})\.(.+)")
MAPPED_KEYS = frozenset({*PROVIDER_KEYS, "gen_ai.response.model", "openclaw.model", "openclaw.tokens.input",
                         *OPENCLAW_TOKENS.values(), *(k for keys in USAGE_KEYS.values() for k in keys),
                         *FINISH_KEYS, *TTFT_KEYS, *SESSION_KEYS, COST_KEY, *CONTENT_KEYS, "error.type"})
META_PREFIXES = ("gen_ai.", "llm.", "openclaw.")
TEXT_MESSAGES_KEY = "otrace.text_messages"      # which sides an otrace wrapped from plain text, pushing
META_KEYS = frozenset({"server.address", "http.response.status_code"})
SPAN_NAMING = frozenset({"otel_trace_id", "otel_span_id", "otel_parent_span_id", "span_name", "service_name",
                         "scope", "otel_merged_spans", "dropped"})    # kept in a call's metadata over its cap
OTLP_VALUE_DEPTH = 8                                   # levels of nested lists and objects pushed as such
TOO_DEEP_TO_SEND = "(nested deeper than otrace can send)"    # in place of JSON text too deep to write
INPUT_EVENTS = {"gen_ai.system.message": "system", "gen_ai.user.message": "user",
                "gen_ai.assistant.message": "assistant", "gen_ai.tool.message": "tool"}
CHOICE_EVENT = "gen_ai.choice"
DETAILS_EVENT = "gen_ai.client.inference.operation.details"
SEVERITY_ERROR, SEVERITY_FATAL = 17, 21
SEVERITY_NUMBERS = {"TRACE": 1, "DEBUG": 5, "INFO": 9, "WARNING": 13, "WARN": 13, "ERROR": SEVERITY_ERROR,
                    "CRITICAL": SEVERITY_FATAL, "FATAL": SEVERITY_FATAL}    # a level's, and its text's
PUSHED_ERROR = "otrace.error_event"     # the event name of an error_events row another otrace pushed
LOSS_EVENT = "otrace.loss"              # and of its report of rows it gave up: kept here as a warning
# OpenClaw's loggers whose lines tell of a model call's failure: the session store records those
OPENCLAW_FAILURE_SUBSYSTEMS = frozenset({"diagnostic", "agent/embedded", "model-fallback/decision",
                                         "provider-transport-fetch"})
HTTP_STATUS = re.compile(r"\b(?:[Ee]rror code|status(?: code)?)[:= ]+([1-5]\d\d)\b")
SERIES_SQL = ("INSERT INTO otlp_series (key, series_id, start_ns, time_ns, value, count, buckets, "
              "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
              "start_ns = excluded.start_ns, time_ns = excluded.time_ns, value = excluded.value, "
              "count = excluded.count, buckets = excluded.buckets, updated_at = excluded.updated_at")
CONTENT_SQL = ("UPDATE llm_traces SET truncated = truncated OR (input_text IS NULL AND ?) "
               "OR (output_text IS NULL AND ?), "
               "input_bytes = CASE WHEN input_text IS NULL THEN ? ELSE input_bytes END, "
               "input_text = coalesce(input_text, ?), "
               "output_bytes = CASE WHEN output_text IS NULL THEN ? ELSE output_bytes END, "
               f"output_text = coalesce(output_text, ?) WHERE trace_id = ? AND synced = {UNSYNCED} "
               "RETURNING trace_id")
# The parent span ids of the calls stored from OTLP of the traces in a JSON array, by trace: their keys
# are "<trace id>-<span id>", so each trace's rows are one range of the trace_id index.
PARENTS_SQL = ("SELECT trace.value, json_extract(metadata, '$.otel_parent_span_id') FROM json_each(?) AS "
               "trace JOIN llm_traces ON trace_id > trace.value || '-' AND trace_id < trace.value || '.' "
               "WHERE source = 'otlp'")
STORED_SQL = "SELECT trace_id, synced FROM llm_traces WHERE source = 'otlp' AND trace_id IN ({})"
# A span stored as a call before an LLM child of its came: its rows go, while never delivered.
STEP_ROWS_SQL = tuple(f"DELETE FROM {table} WHERE trace_id = ? AND source = 'otlp' AND synced = {UNSYNCED} "
                      "AND pushed_at IS NULL" for table in ("llm_traces", "error_events"))
SERIES_TOUCH_MS = 86_400_000     # an unchanged series' state is rewritten daily, so retention keeps it
SERIES_STATE_SQL = ("SELECT key, series_id, start_ns, time_ns, value, count, buckets, updated_at "
                    "FROM otlp_series WHERE key IN ({})")
KEYS_A_QUERY = 500               # keys (series, row keys) read in one query: under MAX_VARIABLES
KEY_BYTES = 200                  # what one remembered span id costs of TRACE_OTLP_CONTENT_BYTES
RECENT_CALLS = 64                # LLM calls remembered for another instrumentation's span in a later request
FAILURES_KEPT = 1024             # failed LLM spans, and spans with ERROR records, remembered for each other
PARENTS_KEPT = 4096              # parents of LLM spans remembered while their rows may be in the queue
LOG_MESSAGE_CHARS = 500          # of a record's message kept in the failure's otel_merged_logs
# An ERROR log record's row (?1) folded into the error row (?2) of the failed LLM span it was logged in:
# the span's row keeps its words, takes the record's stack trace where it has none (and a FATAL's
# severity), and names the record in otel_merged_logs; then the record's row goes. Neither changes once
# either row is pushed (the record's delivered, too: DELETES_UNPUSHED): the two stay.
FOLD_LOG_SQL = (
    "UPDATE error_events SET stack_trace = coalesce(error_events.stack_trace, log.stack_trace), "
    "stack_trace_bytes = CASE WHEN error_events.stack_trace IS NULL THEN log.stack_trace_bytes "
    "ELSE error_events.stack_trace_bytes END, "
    "truncated = error_events.truncated OR (error_events.stack_trace IS NULL AND log.truncated), "
    "severity = CASE WHEN log.severity = 'critical' THEN log.severity ELSE error_events.severity END, "
    "metadata = json_set(coalesce(error_events.metadata, '{}'), '$.otel_merged_logs', json(coalesce("
    "json_insert(json_extract(error_events.metadata, '$.otel_merged_logs'), '$[#]', json(log.said)), "
    "json_array(json(log.said))))) "
    "FROM (SELECT stack_trace, stack_trace_bytes, truncated, severity, json_object("
    f"'message', substr(message, 1, {LOG_MESSAGE_CHARS}), 'scope', json_extract(metadata, '$.scope'), "
    "'severity_text', json_extract(metadata, '$.severity_text')) AS said "
    f"FROM error_events WHERE trace_id = ?1 AND synced = {UNSYNCED} AND pushed_at IS NULL) AS log "
    f"WHERE error_events.trace_id = ?2 AND error_events.synced = {UNSYNCED} RETURNING error_events.trace_id")
FOLDED_LOG_SQL = (f"DELETE FROM error_events WHERE trace_id = ?1 AND synced = {UNSYNCED} AND pushed_at IS "
                  f"NULL AND EXISTS (SELECT 1 FROM error_events WHERE trace_id = ?2 AND synced = {UNSYNCED})")
# The statements that delete an unpushed row (the first parameter), or fold it away: held back while a
# push cycle may be carrying it (Merges.holding_back), and never made to a row once delivered.
DELETES_UNPUSHED = frozenset({FOLD_LOG_SQL, FOLDED_LOG_SQL, *STEP_ROWS_SQL})


# Texts the rows hold and a remembered call does not (RecentCalls), each with its byte count column.
MERGE_TEXTS = {"llm_traces": (("input_text", "input_bytes"), ("output_text", "output_bytes")),
               "error_events": (("stack_trace", "stack_trace_bytes"),)}


def merge_sql(table: Table, call_first: bool) -> str:
    """An UPDATE of a stored row to the merged call's, whose values are ?1, ?2, ... in the table's
    columns' order, the row's trace_id last: its id, arrival and source stay; a text the row has wins,
    unless `call_first` (the new span is the inner one), whose text then wins where it has one."""
    at = {column: f"?{n}" for n, column in enumerate(table.columns, 1)}
    texts = MERGE_TEXTS[table.name]
    sets = [f"{c} = {at[c]}" for c in table.columns
            if c not in ("trace_id", "received_at", "source", "truncated", *itertools.chain(*texts))]
    for text, size in texts:
        if call_first:       # the new span's text, where it has one
            sets += [f"{size} = CASE WHEN {at[text]} IS NULL THEN {size} ELSE {at[size]} END",
                     f"{text} = coalesce({at[text]}, {text})"]
        else:                # the row's text, where it has one
            sets += [f"{size} = CASE WHEN {text} IS NULL THEN {at[size]} ELSE {size} END",
                     f"{text} = coalesce({text}, {at[text]})"]
    sets.append(f"truncated = truncated OR {at['truncated']}")
    return (f"UPDATE {table.name} SET {', '.join(sets)} WHERE trace_id = ?{len(at) + 1} "
            f"AND synced = {UNSYNCED} RETURNING trace_id")


MERGE_SQL = {(table.name, first): merge_sql(table, first)
             for table in (TRACES, ERRORS) for first in (True, False)}
OTLP_COUNTERS = (
    "requests", "spans", "llm_spans", "spans_merged", "spans_not_llm", "spans_around_calls",
    "openclaw_usage_skipped", "openclaw_logs_skipped",
    "spans_rejected", "span_values_dropped", "metric_points", "metric_points_kept", "metric_points_unchanged",
    "metric_points_other",
    "metric_points_rejected", "metric_resets", "log_records", "log_errors", "log_errors_merged",
    "log_content", "log_content_after_span", "log_content_unlinked", "log_content_expired", "log_other",
    "log_records_rejected", "log_values_dropped", "requests_refused")


def otlp_encoding(headers: dict[str, str]) -> str:
    """How an OTLP body is encoded, by its Content-Type: "protobuf" or "json"."""
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return "protobuf" if media in PROTOBUF_TYPES else "json"


def refusal_encoding(route: str, headers: dict[str, str]) -> str | None:
    """The encoding of the google.rpc.Status a refusal on an OTLP route answers with; None for otrace's
    JSON error (on /v1/traces in JSON, otrace's own route until its body shows OTLP)."""
    if route not in OTLP_SIGNALS:
        return None
    encoding = otlp_encoding(headers)
    return None if encoding == "json" and route == "/v1/traces" else encoding


@functools.cache
def otlp_classes() -> dict[str, tuple[Any, Any]]:
    """Each signal's generated request and response classes, imported on the first OTLP request."""
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs  # noqa: PLC0415 - lazy
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics  # noqa: PLC0415
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as traces  # noqa: PLC0415
    return {"traces": (traces.ExportTraceServiceRequest, traces.ExportTraceServiceResponse),
            "metrics": (metrics.ExportMetricsServiceRequest, metrics.ExportMetricsServiceResponse),
            "logs": (logs.ExportLogsServiceRequest, logs.ExportLogsServiceResponse)}


def decode_otlp(signal: str, body: bytes, encoding: str) -> Any:
    """The signal's Export*ServiceRequest from a protobuf body, or from OTLP JSON: hex ids, 64-bit
    integers as strings or numbers, camelCase or the proto's own names."""
    request_class = otlp_classes()[signal][0]
    if encoding == "protobuf":
        from google.protobuf.message import DecodeError  # noqa: PLC0415 - loaded with the classes
        try:
            return request_class.FromString(body)
        except (DecodeError, RecursionError) as exc:
            raise Invalid(f"body is not an OTLP/protobuf {request_class.DESCRIPTOR.name}: {exc}",
                          quoted=True) from None
    doc = json_body(body)
    if not isinstance(doc, dict) or (doc and not any(key in doc for key in OTLP_TOP[signal])):
        raise Invalid(f"body is not OTLP JSON: its top level must be an object with {OTLP_TOP[signal][0]}")
    from google.protobuf import json_format  # noqa: PLC0415 - loaded with the classes
    try:
        _as_protobuf_reads(doc, request_class.DESCRIPTOR)
        return json_format.ParseDict(doc, request_class(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise Invalid(f"body is not OTLP JSON: {exc}", quoted=True) from None
    except RecursionError:
        raise Invalid("body is nested too deeply") from None


def _as_protobuf_reads(doc: dict[str, Any], descriptor: Any) -> None:
    """OTLP JSON made what protobuf's JSON mapping reads, in place, the message types followed down
    from `descriptor`: trace and span ids in hex become base64 (an id that is not hex is left to the
    parser, which takes base64); a text with a lone surrogate (valid JSON, as JavaScript cuts a string
    mid-emoji; not UTF-8, which protobuf refuses) gets U+FFFD in its place, as on the JSON API. A
    message given as anything but an object is Invalid: the parser would take a string's letters for
    field names and ignore them, so the value would be lost without a word."""
    todo = [(doc, descriptor)]
    while todo:
        node, message = todo.pop()
        fields = _message_fields(message)
        for key, value in node.items():
            if inner := fields.get(key):
                for item in value if isinstance(value, list) else (value,):
                    if isinstance(item, dict):
                        todo.append((item, inner))
                    elif item is not None:                 # null: the parser's to take or refuse
                        raise Invalid(f"body is not OTLP JSON: {key} must hold {inner.name} objects, not "
                                      f"{_JSON_KINDS.get(type(item), 'that')}")
            elif key in ID_FIELDS and isinstance(value, str):
                with contextlib.suppress(ValueError):
                    node[key] = binascii.b2a_base64(bytes.fromhex(value), newline=False).decode("ascii")
            elif isinstance(value, str) and not value.isascii():
                node[key] = clean_text(value)
            elif isinstance(value, list):                   # a repeated field of scalars
                node[key] = [clean_text(v) if isinstance(v, str) and not v.isascii() else v for v in value]


_JSON_KINDS = {str: "a string", int: "a number", float: "a number", bool: "true or false", list: "an array"}


@functools.cache
def _message_fields(message: Any) -> dict[str, Any]:
    """A message type's fields by both the names OTLP JSON may use: the message type of each that
    holds messages, None for the others."""
    return {name: field.message_type for field in message.fields for name in (field.json_name, field.name)}


def otel_value(value: Any) -> Any:
    """An AnyValue as plain Python: str, bool, int, float, list, dict; bytes as hex; None if unset."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [otel_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {pair.key: otel_value(pair.value) for pair in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return None if kind is None else getattr(value, kind)


def otel_attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: otel_value(pair.value) for pair in pairs}


def resource_attributes(pairs: Any) -> dict[str, Any]:
    """A resource's attributes, its service.name as text whatever it came as: calls are grouped, and
    pushed, by it."""
    attrs = otel_attributes(pairs)
    if (name := attrs.get("service.name")) is not None and not isinstance(name, str):
        attrs["service.name"] = json.dumps(name)
    return attrs


def _first(attrs: dict[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        value = attrs.get(key)
        if value is not None and value != "":
            return value
    return None


def _word(value: Any) -> Any:
    """A name-like attribute (a model, a session id) as text when it came as a number."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _number(value: Any) -> Any:
    """An amount as a number when it came as one written out ("0.0125")."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def count_of(text: str | None) -> int | None:
    """A whole number written in ASCII digits (at most 18 of them), else None: str.isdigit() takes
    "²", which int() refuses, and int() refuses 4,300 digits or more."""
    return int(text) if text and len(text) <= 18 and text.isascii() and text.isdigit() else None


def _integer(value: Any) -> Any:
    """A token count as an int where it is one in disguise ("3333", 23.0); anything else as it is, for
    Fields to name."""
    if isinstance(value, str) and (count := count_of(value.strip())) is not None:
        return count
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _as_text(value: Any) -> str | None:
    """Content as stored: a string as it is, anything else as compact JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def provider_name(value: Any) -> str | None:
    """The conventions' lower-case well-known name of a provider ("Anthropic" is anthropic)."""
    if not isinstance(value, str) or not value.strip():
        return None
    name = value.strip().lower().replace(" ", "_")
    return PROVIDER_NAMES.get(name, name)


def error_name(value: Any) -> str | None:
    """error.type without a Python class's wrapping and module: RateLimitError."""
    if value is None or value == "":
        return None
    name = str(value).strip()
    if match := re.fullmatch(r"<class '([^']+)'>", name):
        name = match[1]
    return name.rsplit(".", 1)[-1] or None


def http_status(attrs: dict[str, Any], *texts: str | None) -> int | None:
    """The HTTP status a failed call got: its attribute, an error.type that is one, or "Error code: 429"
    in its message (the OpenAI and Anthropic SDKs' wording)."""
    for value in (attrs.get("http.response.status_code"), attrs.get("error.type")):
        if isinstance(value, int) or (isinstance(value, str) and len(value) == 3 and count_of(value)):
            return int(value)
    for text in texts:
        if isinstance(text, str) and (match := HTTP_STATUS.search(text)):
            return int(match[1])
    return None


def call_category(error_type: str | None, status: int | None, text: Any = None) -> str:
    """The error_events category of a failed call, found as the gateway log's and the session store's
    are (failure_category), with an error type read as words too: RateLimitError is "rate limit"."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|_", " ", error_type or "")
    return failure_category(error_type, words, status and str(status), text) or "other"


def rpc_status(refusal: Refusal, encoding: str) -> tuple[dict[str, Any] | bytes, str]:
    """A refusal as the google.rpc.Status OTLP answers errors with: protobuf (written here, one int32
    and one string field), or JSON, which also keeps otrace's own error and field."""
    code, message = RPC_CODES.get(refusal.status, 2), str(refusal)
    if encoding == "json":
        return {"code": code, "message": message, **refusal.body()}, "application/json"
    text = message.encode("utf-8", "replace")
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text, "application/x-protobuf"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def otlp_answer(signal: str, encoding: str, rejected: int, problems: list[str]) -> tuple[bytes, str]:
    """The 200 answer: an Export*ServiceResponse in the request's encoding, with partial_success when
    items were refused."""
    message = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
    if encoding == "json":
        field = OTLP_REJECTED[signal][0]
        body = {"partialSuccess": {field: str(rejected), "errorMessage": message}} if rejected else {}
        return json.dumps(body).encode(), "application/json"
    answer = otlp_classes()[signal][1]()
    if rejected:
        setattr(answer.partial_success, OTLP_REJECTED[signal][1], rejected)
        answer.partial_success.error_message = message
    return answer.SerializeToString(), "application/x-protobuf"


@contextlib.contextmanager
def state_read(what: str) -> Iterator[None]:
    """A read of what a request is mapped against (series, stored calls): a database that cannot be
    read answers 503, for the exporter to retry, not 500."""
    try:
        yield
    except sqlite3.Error as exc:
        raise Refusal(503, f"cannot read {what} ({describe(exc)}); retry later",
                      {"Retry-After": "1"}) from None


def rows_in(db: Database, sql: str, keys: Sequence[str]) -> Iterator[tuple]:
    """The rows of `sql` ("... IN ({})") for `keys`, KEYS_A_QUERY keys a query: a request may bring
    thousands, and one query each held the HTTP thread for seconds."""
    for start in range(0, len(keys), KEYS_A_QUERY):
        part = tuple(keys[start:start + KEYS_A_QUERY])
        yield from db.query(sql.format(", ".join("?" * len(part))), part)


# -- spans


@dataclasses.dataclass
class Call:
    """One LLM call read from a span: the fields of its llm_traces row (None where the span said
    nothing), those of its error_events row when it failed, and what may tie it to another
    instrumentation's span of the same call."""

    key: str                         # the row's trace_id: the span's (trace id, span id)
    group: tuple[Any, str | None]    # (its service, else its resource in the request; its provider)
    scope: str
    start: int
    end: int
    response_id: str | None
    said: tuple[Any, ...]            # its kind of operation, requested model, answering model
    event: dict[str, Any]
    failure: dict[str, Any] | None
    keys: list[str]                  # the row keys of the spans it stands for, its own first
    relayed: bool = False            # pushed by an otrace, which made its spans one row per call
    parent: str | None = None        # its parent span's row key


def span_key(trace_id: bytes, span_id: bytes) -> str | None:
    """A span's row key, its ids in hex; None for ids OTLP does not allow (wrong length, all zero)."""
    if len(trace_id) != 16 or len(span_id) != 8 or not any(trace_id) or not any(span_id):
        return None
    return f"{trace_id.hex()}-{span_id.hex()}"


def llm_call(span: Any, resource: dict[str, Any], where: tuple[int, str], store_followed: bool) -> Call | str:
    """The LLM call a span records, or why it is none: "not_llm" (agent, tool, HTTP, ... spans) or
    "openclaw_usage_skipped" (OpenClaw's usage span while its session store is followed). A span is an
    LLM call when its operation is a model operation, when it names no operation but a request model
    (and is no OpenLLMetry workflow, task, agent or tool span), and for OpenClaw's openclaw.model.usage.
    Invalid for ids OTLP does not allow."""
    attrs = otel_attributes(span.attributes)
    openclaw = span.name == OPENCLAW_USAGE
    operation = _word(_first(attrs, ("gen_ai.operation.name", "llm.request.type")))
    operation = operation if isinstance(operation, str) or operation is None else "?"
    if openclaw and store_followed:
        return "openclaw_usage_skipped"
    if not openclaw and operation not in MODEL_OPERATIONS and (
            operation is not None or "gen_ai.request.model" not in attrs or ENTITY_KIND in attrs):
        return "not_llm"
    key = span_key(span.trace_id, span.span_id)
    if key is None:
        raise Invalid("span has no valid traceId and spanId")
    event = {"provider": provider_name(_first(attrs, PROVIDER_KEYS)),
             "model": _word(_first(attrs, MODEL_KEYS)), "trace_id": key,
             "created_at": span.start_time_unix_nano // 1_000_000 or None,
             "session_id": _word(_first(attrs, SESSION_KEYS)), "cost_usd": _number(attrs.get(COST_KEY))}
    if attrs.get("otrace.cost_source") == "computed":    # another otrace's price table's: priced here again
        event["cost_usd"] = None
    for column, keys in USAGE_KEYS.items():
        event[column] = _integer(_first(attrs, keys))
    if openclaw:
        usage_tokens(event, attrs)
    if span.end_time_unix_nano >= span.start_time_unix_nano > 0:
        event["latency_ms"] = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
    if isinstance(ttft := _first(attrs, TTFT_KEYS), (int, float)) and not isinstance(ttft, bool):
        event["ttft_ms"] = ttft * 1000
    finish = _first(attrs, FINISH_KEYS)
    if isinstance(finish, list):                       # ["", "stop"]: "stop", not ",stop"
        finish = ",".join(str(reason) for reason in finish if reason != "") or None
    event["finish_reason"] = finish
    event["input_text"], event["output_text"] = span_content(attrs, span.events)
    event["metadata"] = span_metadata(span, attrs, resource, where[1])
    leave_out_bad_values(event)
    cache = sum(event[column] or 0 for column in ("cache_read_tokens", "cache_write_tokens"))
    if event["prompt_tokens"] is not None and event["prompt_tokens"] < cache:   # Anthropic's own input
        event["metadata"]["input_tokens_without_cache"] = event["prompt_tokens"]   # tokens: no cache in it
        total, given = event["total_tokens"], event["prompt_tokens"] + (event["completion_tokens"] or 0)
        event["prompt_tokens"] += cache
        if total is not None and total <= given:      # the total left the cache out as well
            event["total_tokens"] = total + cache
        leave_out_bad_values(event)                   # a sum over MAX_INT: the counts go, the call stays
    failure = span_failure(span, attrs, event)
    if failure:
        event["status"], event["error_type"] = "error", failure["error_type_name"]
    response_id = attrs.get("gen_ai.response.id")
    said = ("embeddings" if operation in ("embeddings", "embedding") else operation and "generation",
            _word(attrs.get("gen_ai.request.model")), _word(attrs.get("gen_ai.response.model")))
    group = (resource.get("service.name", where[0]), event["provider"])
    return Call(key, group, where[1], span.start_time_unix_nano, span.end_time_unix_nano,
                response_id if isinstance(response_id, str) else None, said, event, failure, [key],
                relayed="otrace.trace_id" in attrs,
                parent=span_key(span.trace_id, span.parent_span_id))


def usage_tokens(event: dict[str, Any], attrs: dict[str, Any]) -> None:
    """OpenClaw's openclaw.tokens.*: its input excludes cached tokens, which prompt_tokens includes."""
    for column, key in OPENCLAW_TOKENS.items():
        if event.get(column) is None:
            event[column] = _integer(attrs.get(key))
    parts = [_integer(attrs.get(f"openclaw.tokens.{kind}")) for kind in ("input", "cache_read",
                                                                          "cache_write")]
    if event.get("prompt_tokens") is None and isinstance(parts[0], int):
        event["prompt_tokens"] = sum(part for part in parts if isinstance(part, int))


def span_content(attrs: dict[str, Any], events: Any) -> tuple[str | None, str | None]:
    """The call's messages: gen_ai.input.messages / gen_ai.output.messages (system instructions put
    first as a system message), the older gen_ai.prompt.N.* / gen_ai.completion.N.*, or the oldest
    span events gen_ai.content.prompt / gen_ai.content.completion."""
    inputs, outputs = attrs.get("gen_ai.input.messages"), attrs.get("gen_ai.output.messages")
    if (system := attrs.get("gen_ai.system_instructions")) is not None:
        with contextlib.suppress(ValueError):
            listed = json.loads(inputs) if isinstance(inputs, str) else inputs or []
            parts = json.loads(system) if isinstance(system, str) else system
            if isinstance(listed, list):
                inputs = [{"role": "system", "parts": parts}, *listed]
    legacy: dict[str, dict[int, dict[str, Any]]] = {"prompt": {}, "completion": {}}
    for name, value in attrs.items():
        if name.startswith(("gen_ai.prompt.", "gen_ai.completion.")) and (
                match := LEGACY_CONTENT.fullmatch(name)):
            legacy[match[1]].setdefault(int(match[2]), {})[match[3]] = value
    for event in events:
        if event.name in ("gen_ai.content.prompt", "gen_ai.content.completion"):
            side = event.name.rsplit(".", 1)[1]
            said = otel_attributes(event.attributes).get(f"gen_ai.{side}")
            with contextlib.suppress(ValueError, RecursionError):     # the conventions' JSON of messages
                if isinstance(said, str) and isinstance(listed := json.loads(said), list) and listed and all(
                        isinstance(message, dict) for message in listed):
                    if not any(n < 0 for n in legacy[side]):            # the first event's, as for text
                        legacy[side].update(enumerate(listed, -len(listed)))
                    continue
            legacy[side].setdefault(-1, {"content": said})
    if inputs is None and legacy["prompt"]:
        inputs = [legacy["prompt"][n] for n in sorted(legacy["prompt"])]
    if outputs is None and legacy["completion"]:
        outputs = [legacy["completion"][n] for n in sorted(legacy["completion"])]
    wrapped = attrs.get(TEXT_MESSAGES_KEY)
    wrapped = wrapped if isinstance(wrapped, list) else ()    # another otrace's list of sides
    return (_unwrapped(inputs) if "input" in wrapped else _as_text(inputs),
            _unwrapped(outputs) if "output" in wrapped else _as_text(outputs))


def text_messages(text: str | None, role: str, finish_reason: str | None = None) -> str | None:
    """Content as gen_ai.*.messages: a JSON array of the conventions' messages (each with a role and
    parts) as it is, other text (another array too: an older convention's choices) as one message of
    one text part (with the call's finish reason, on output), the shape backends display; None for no
    content."""
    if text is None:
        return None
    with contextlib.suppress(ValueError, RecursionError):
        found = json.loads(text)
        if isinstance(found, list) and found and all(
                isinstance(m, dict) and "role" in m and isinstance(m.get("parts"), list) for m in found):
            return text
    message = {"role": role, "parts": [{"type": "text", "content": text}]}
    if finish_reason:
        message["finish_reason"] = finish_reason
    return json.dumps([message], ensure_ascii=False)


def _unwrapped(messages: Any) -> str | None:
    """The text text_messages() wrapped (an otrace pushed it), else the content as stored."""
    with contextlib.suppress(ValueError, TypeError, KeyError, IndexError):
        [message] = json.loads(messages) if isinstance(messages, str) else messages
        [part] = message["parts"]
        if isinstance(part["content"], str):
            return part["content"]
    return _as_text(messages)


def metadata_own(meta: dict[str, Any], sent: Container[str] = ()) -> dict[str, Any]:
    """A call's metadata but what otrace keeps in it itself (its spans' naming, the GenAI attributes)
    and keys `sent` otherwise: a poster's or a reader's own keys, pushed as otrace.metadata. Metadata
    cut for its size has none left, only the marker of the cut."""
    if meta.keys() == {"_otrace_truncated", "original_bytes"}:
        return {}
    return {key: value for key, value in meta.items()
            if not (key in sent or key in SPAN_NAMING or key in META_KEYS
                    or key.startswith((*META_PREFIXES, "_otrace"))
                    or key in ("error.type", "input_tokens_without_cache"))}


def span_metadata(span: Any, attrs: dict[str, Any], resource: dict[str, Any], scope: str) -> dict[str, Any]:
    """The OTel ids, the service and scope, and the GenAI attributes no column holds."""
    meta: dict[str, Any] = {"otel_trace_id": span.trace_id.hex(), "otel_span_id": span.span_id.hex()}
    if span.parent_span_id:
        meta["otel_parent_span_id"] = span.parent_span_id.hex()
    meta |= {"span_name": span.name, "service_name": resource.get("service.name"), "scope": scope}
    if isinstance(kept := attrs.get("otrace.metadata"), dict):    # pushed by an otrace: the call's own
        meta = metadata_own(kept) | meta
    meta |= {key: attrs[key] for key in PUSHED_IDENTITY if isinstance(attrs.get(key), str)}
    meta |= {key: value for key, value in attrs.items() if (key not in MAPPED_KEYS and (
        key.startswith(META_PREFIXES) or key in META_KEYS) and not LEGACY_CONTENT.fullmatch(key))}
    if (raw := attrs.get("error.type")) is not None and error_name(raw) != raw:
        meta["error.type"] = raw
    return meta


def within(meta: dict[str, Any], limit: int) -> dict[str, Any]:
    """A call's metadata within `limit` bytes of JSON: its largest attributes left out first, counted
    in _otrace_left_out, so that what names its spans (ids, service, scope) stays. Metadata JSON
    cannot write is left for Fields.metadata to refuse."""
    try:
        size = len(COMPACT_JSON.encode(meta).encode())
        if size <= limit:
            return meta
        sizes = sorted(((len(COMPACT_JSON.encode({key: value}).encode()) - 1, key)   # one comma, no braces
                        for key, value in meta.items() if key not in SPAN_NAMING), reverse=True)
    except (ValueError, RecursionError):
        return meta
    kept = dict(meta)
    for size_of, key in sizes:
        if size <= limit - 32:           # room for the count
            break
        del kept[key]
        size -= size_of
    return {**kept, "_otrace_left_out": len(meta) - len(kept)}


def span_failure(span: Any, attrs: dict[str, Any], event: dict[str, Any]) -> dict[str, Any] | None:
    """The error_events fields of a failed call (span status ERROR, or error.type set); None if it
    did not fail."""
    if span.status.code != 2 and attrs.get("error.type") is None:
        return None
    exception = next((otel_attributes(e.attributes) for e in span.events if e.name == "exception"), {})
    name = error_name(attrs.get("error.type")) or error_name(exception.get("exception.type"))
    said = _as_text(exception.get("exception.message"))
    message = span.status.message or said or name or "LLM call failed"
    status = http_status(attrs, span.status.message, said)
    meta = {"otel_trace_id": span.trace_id.hex(), "otel_span_id": span.span_id.hex(), "span_name": span.name}
    meta |= {key: value for key, value in (("error.type", attrs.get("error.type")),
                                           ("http.response.status_code", status)) if value is not None}
    return {"error_type_name": name, "error_type": "llm_error",
            "category": call_category(name, status, message), "message": message,
            "stack_trace": _as_text(exception.get("exception.stacktrace")), "severity": "error",
            "trace_id": event["trace_id"], "created_at": span.end_time_unix_nano // 1_000_000 or None,
            "metadata": meta}


def severity(record: Any) -> int:
    """A log record's severity number; one left unspecified (0) read from its severity text, which
    the logs data model lets stand alone ("ERROR", "Fatal")."""
    return record.severity_number or SEVERITY_NUMBERS.get(record.severity_text.strip().upper(), 0)


PUSHED_IDENTITY = ("otrace.source", "otrace.trace_id")   # where a pushed error came from, there


def pushed_error(record: Any, attrs: dict[str, Any]) -> dict[str, Any]:
    """The columns of an error event another otrace pushed (its otrace.* attributes, its level) and
    its key (pushed_key)."""
    level = record.severity_text.lower()
    return {"trace_id": pushed_key(record, attrs),
            "severity": {"warn": "warning", "fatal": "critical"}.get(level, level),
            **{column: attrs.get(f"otrace.{column}") for column in (
                "error_type", "category", "stack_trace", "provider", "model", "session_id")}}


def pushed_key(record: Any, attrs: dict[str, Any]) -> str | None:
    """The key of a pushed error event: that of the call it is the failure of, whose span that otrace
    pushed too, with its ids or ids derived from the same trace_id, so the failure that span makes here
    is this same row. An error otrace took over OTLP says by its own key whether it was a call's
    (<trace id>-<span id>) or a log record's, which carries the ids of the span it was logged in and
    is a failure of its own: two of one span are two rows."""
    said = attrs.get("otrace.trace_id")
    said = said if isinstance(said, str) else None
    if said and attrs.get("otrace.source") == "otlp":
        return said if SPAN_KEY.fullmatch(said) else span_key(*otel_ids(said, {}))
    return span_key(record.trace_id, record.span_id) or (said and span_key(*otel_ids(said, {})))


def one_per_call(calls: list[Call]) -> tuple[list[Call], int]:
    """Two or more instrumentations in one process can each report the same call (the Anthropic SDK's
    own tracing and OpenLLMetry's do, as two root spans): a span of another scope, of the same service
    and provider, that may be the same call (may_be_one_call), is the one with the same response id,
    else one lying inside the other's time, the nearest in time when several do and as many of the
    other scope lie around them (calls made at once, each reported by both; not a span around several
    calls). The inner span's row is kept and filled in from the outer one (two spans another otrace
    relayed are two rows there: not paired). The calls left, and how many spans were merged."""
    groups: dict[tuple[Any, str | None], list[Call]] = {}
    for call in calls:
        groups.setdefault(call.group, []).append(call)
    gone: set[int] = set()
    for group in groups.values():
        if len({call.scope for call in group}) < 2:
            continue
        for outer in sorted(group, key=lambda c: c.end - c.start, reverse=True):
            others = [c for c in group if c is not outer and id(c) not in gone
                      and not scopes_of(c) & scopes_of(outer)
                      and not (c.relayed and outer.relayed) and may_be_one_call(outer, c)]
            inner = [c for c in others if outer.response_id and c.response_id == outer.response_id]
            if not inner:
                inner = [c for c in others if inside(c, outer)]
                if len(inner) > 1:          # paired only if as many of outer's scope lie around them
                    rivals = [o for o in group if o.scope == outer.scope and id(o) not in gone
                              and any(inside(c, o) and may_be_one_call(o, c) for c in inner)]
                    if len(rivals) != len(inner):         # one span around several calls
                        continue
            if inner:
                absorb(nearest(outer, inner), outer)
                gone.add(id(outer))
    return [call for call in calls if id(call) not in gone], len(gone)


def inside(call: Call, other: Call) -> bool:
    """Whether `call` lies inside `other`'s time."""
    return other.start <= call.start <= call.end <= other.end


def scopes_of(call: Call) -> set[str]:
    """The scopes of the spans a call stands for: one instrumentation reports a call once."""
    return {call.scope, *(span["scope"] for span in call.event["metadata"].get("otel_merged_spans", ()))}


def nearest(call: Call, candidates: list[Call]) -> Call:
    """Of other spans that may record `call`, the one whose start and end are nearest its own."""
    return min(candidates, key=lambda c: abs(c.start - call.start) + abs(c.end - call.end))


def leave_out_bad_values(event: dict[str, Any]) -> None:
    """A count, cost or latency of a span that no column can hold (a cost of NaN, tokens of -1), or a
    finish reason or session id that is no name (empty, over MAX_NAME_CHARS), is left out of its call,
    named with why in metadata.dropped, the call kept. One bad token count takes the span's others
    with it: counts taken in part would not add up, nor price the call, and another span of the call
    gives its whole group (absorb)."""
    fields, dropped = Fields(event, None, 0), {}
    for column in (*USAGE_KEYS, "cost_usd", "latency_ms", "ttft_ms", "finish_reason", "session_id"):
        check = (fields.count if column in USAGE_KEYS else
                 fields.name if column in ("finish_reason", "session_id") else fields.amount)
        try:
            check(column)
        except Invalid as why:
            dropped[column] = str(why)
        if event.get(column) == "":               # which the check takes for no value at all
            dropped[column] = "empty"
    if dropped.keys() & USAGE_KEYS.keys():
        dropped |= {column: "left out with the span's other token counts" for column in USAGE_KEYS
                    if event.get(column) is not None and column not in dropped}
    for column in dropped:
        event[column] = None
    name_dropped(event["metadata"], dropped | leave_out_unwritable(event["metadata"]))


def name_dropped(meta: dict[str, Any], dropped: dict[str, str]) -> None:
    """Name what was left out of an event, with why, in its metadata's `dropped`."""
    if dropped:
        said = meta.get("dropped")
        meta["dropped"] = {**(said if isinstance(said, dict) else {}), **dropped}


def leave_out_unwritable(meta: dict[str, Any]) -> dict[str, str]:
    """Leave out of `meta` the attributes JSON cannot write (a NaN or an infinity anywhere in them, as
    OTLP's doubles allow), so the call or failure is kept without them; what went, with why."""
    gone = {key: "holds NaN or an infinity, which JSON cannot write" for key, value in meta.items()
            if unwritable(value)}
    for key in gone:
        del meta[key]
    return gone


def unwritable(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(map(unwritable, value.values()))
    return isinstance(value, list) and any(map(unwritable, value))


def absorb(call: Call, other: Call) -> None:
    """Fill in what `call` does not know from `other`, a span of the same call. Token counts are
    taken as a group (from one span or the other), so that they add up."""
    has_usage = any(call.event.get(column) is not None for column in USAGE_KEYS)
    for field, value in other.event.items():
        if call.event.get(field) is None and not (has_usage and field in USAGE_KEYS):
            call.event[field] = value
    meta = call.event["metadata"]
    theirs = other.event["metadata"]
    call.event["metadata"] = {**theirs, **meta, "otel_merged_spans": [
        *meta.get("otel_merged_spans", []), {"otel_span_id": theirs["otel_span_id"],
                                             "otel_trace_id": theirs["otel_trace_id"], "scope": other.scope},
        *theirs.get("otel_merged_spans", [])]}
    if other.failure:
        mine = call.failure or {}
        call.failure = {**other.failure, **{k: v for k, v in mine.items() if v is not None},
                        "trace_id": call.key,
                        "metadata": {**other.failure["metadata"], **mine.get("metadata", {})}}
        if mine.get("message") in (None, mine.get("error_type_name")):      # only a type name: say more
            call.failure["message"] = other.failure["message"]
        call.event["status"] = "error"
        call.event["error_type"] = call.event.get("error_type") or other.failure["error_type_name"]
    call.keys += other.keys


def may_be_one_call(one: Call, other: Call) -> bool:
    """Whether two spans can record one call: they do not differ in response id, kind of operation
    (an embedding is not a chat), requested model or answering model, where both say it. The same
    response id is one call however the two spell its model."""
    if one.response_id and one.response_id == other.response_id:
        return True
    return all(a is None or b is None or a == b for a, b in zip(
        (one.response_id, *one.said), (other.response_id, *other.said), strict=True))


def service_and_provider(call: Call) -> tuple[Any, Any]:
    return call.event["metadata"].get("service_name"), call.group[1]


def same_call(stored: Call, call: Call) -> bool:
    """Whether `call`, from a later request, is another instrumentation's span of the call `stored`:
    another scope, the same service and provider, one that may be the same call (may_be_one_call),
    and the same response id (where both have one), or one lying inside the other's time. A call
    that has a span of that scope takes no other, and two spans another otrace relayed are two rows
    there."""
    if (scopes_of(stored) & scopes_of(call) or (stored.relayed and call.relayed)
            or not may_be_one_call(stored, call)
            or service_and_provider(stored) != service_and_provider(call)):
        return False
    if stored.response_id and call.response_id:
        return True
    return inside(call, stored) or inside(stored, call)


class Lately:
    """Keys with a value each, remembered for `wait` seconds, the newest `most` of them."""

    def __init__(self, wait: float, most: int) -> None:
        self.wait, self.most = wait, most
        self.kept: collections.OrderedDict[str, tuple[float, Any]] = collections.OrderedDict()

    def get(self, key: str, default: Any = None) -> Any:
        found = self.kept.get(key)
        return default if found is None or found[0] < time.monotonic() - self.wait else found[1]

    def put(self, key: str, value: Any) -> None:
        self.kept.pop(key, None)
        self.kept[key] = (time.monotonic(), value)
        deadline = time.monotonic() - self.wait
        while len(self.kept) > self.most or next(iter(self.kept.values()))[0] < deadline:
            self.kept.popitem(last=False)

    def pop(self, key: str) -> None:
        self.kept.pop(key, None)


class RecentCalls:
    """The last RECENT_CALLS LLM calls stored within TRACE_OTLP_CONTENT_WAIT, without their content: a
    span of one of them from another instrumentation, exported in a later request, fills in that row
    instead of making a second. Looked through only for a service and provider whose calls came from
    another scope too within that time."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.calls: collections.deque[tuple[float, Call]] = collections.deque(maxlen=RECENT_CALLS)
        self.scopes: dict[tuple[Any, Any], dict[str, float]] = {}   # (service, provider) -> {scope: when}

    def partner(self, call: Call) -> Call | None:
        """The stored call `call` is another span of: the one with its response id, else the one
        alone that lies inside its time or around it."""
        deadline = time.monotonic() - self.wait
        if not any(scope != call.scope and seen >= deadline
                   for scope, seen in self.scopes.get(service_and_provider(call), {}).items()):
            return None
        found = [stored for at, stored in self.calls if at >= deadline and same_call(stored, call)]
        same = [stored for stored in found if call.response_id and stored.response_id == call.response_id]
        return nearest(call, same) if same else found[0] if len(found) == 1 else None

    def remember(self, call: Call) -> None:
        now = time.monotonic()
        self.calls.append((now, self.textless(call)))
        if len(self.scopes) > RECENT_CALLS:       # groups not seen within the wait go
            self.scopes = {group: seen for group, seen in self.scopes.items()
                           if max(seen.values()) >= now - self.wait}
        self.scopes.setdefault(service_and_provider(call), {})[call.scope] = now

    def replace(self, stored: Call, merged: Call) -> None:
        """`stored`'s row is now the call of two spans, `merged`."""
        merged = self.textless(merged)
        self.calls = collections.deque(((at, merged if c is stored else c) for at, c in self.calls),
                                       maxlen=RECENT_CALLS)

    @staticmethod
    def textless(call: Call) -> Call:
        """A copy without the texts its rows hold (MERGE_TEXTS): what is kept in memory."""
        def without(fields: dict[str, Any] | None, table: str) -> dict[str, Any] | None:
            return fields and {**fields, **{text: None for text, _ in MERGE_TEXTS[table]}}
        return dataclasses.replace(call, event=without(call.event, TRACES.name),
                                   failure=without(call.failure, ERRORS.name), keys=list(call.keys))


# -- log records


Said = tuple[Any, Any, bool]    # (input, output, whole): messages of a call from a GenAI event record


def log_content(name: str, body: Any, attrs: dict[str, Any]) -> Said | None:
    """What a GenAI event record says of its call's content: input and output messages (a list to
    add to, or the whole text when the record holds all of them); None when it carries none (content
    capture off)."""
    if name in INPUT_EVENTS:
        if body is None:
            return None
        role = INPUT_EVENTS[name]
        message = {"role": role, **body} if isinstance(body, dict) else {"role": role, "content": body}
        return [message], None, False
    if name == CHOICE_EVENT:
        message = body.get("message") if isinstance(body, dict) else None
        return (None, [body], False) if isinstance(message, dict) and set(message) - {"role"} else None
    if name == DETAILS_EVENT:
        inputs, outputs = span_content(attrs, ())
        return (inputs, outputs, True) if inputs is not None or outputs is not None else None
    return None


def combine(known: tuple[Any, Any], said: Said) -> tuple[Any, Any]:
    """Content known so far with what one more record says: a whole text wins, lists add up."""
    if said[2]:
        return said[0] if said[0] is not None else known[0], said[1] if said[1] is not None else known[1]
    return tuple(new if old is None else (old + new if isinstance(old, list) and new else old)
                 for old, new in zip(known, said[:2], strict=False))


class Content:
    """Content of GenAI event records waiting for its span (for TRACE_OTLP_CONTENT_WAIT), and the row
    keys of LLM spans stored lately (to give content that comes after its span to the right row);
    both within TRACE_OTLP_CONTENT_BYTES, the oldest dropped first."""

    def __init__(self, wait: float, limit: int) -> None:
        self.wait, self.limit = wait, limit
        # span key -> [at, input, output, bytes held, digests of the requests whose content it took]
        self.waiting: collections.OrderedDict[str, list[Any]] = collections.OrderedDict()
        self.stored: collections.OrderedDict[str, tuple[float, str]] = collections.OrderedDict()  # (at, row)
        self.held = 0                # bytes, as estimated
        self.expired = 0             # waiting content no span came for

    def row_of(self, key: str) -> str | None:
        """The row a span's content belongs to, if that span was stored lately."""
        found = self.stored.get(key)
        return found and found[1]

    def peek(self, keys: list[str]) -> tuple[Any, Any]:
        """What waits for any of these span keys: (input, output)."""
        inputs = outputs = None
        for key in keys:
            if entry := self.waiting.get(key):
                inputs, outputs = inputs or entry[1], outputs or entry[2]
        return inputs, outputs

    def park(self, key: str, said: list[Said], stamps: Iterable[int] = ()) -> None:
        """Keep what one request says of a span not stored yet; the same again (an exporter's retry of
        the request) adds nothing."""
        entry = self.waiting.pop(key, None) or [time.monotonic(), None, None, 0, set()]
        self.held -= entry[3]
        digest = zlib.crc32(json.dumps([said, list(stamps)], default=str).encode())   # records' times too
        if digest not in entry[4]:
            entry[4].add(digest)
            for one in said:
                entry[1], entry[2] = combine((entry[1], entry[2]), one)
        entry[3] = len(json.dumps(entry[1:3], default=str)) + KEY_BYTES
        self.waiting[key] = entry
        self.held += entry[3]
        self.trim()

    def remember(self, row: str, keys: list[str]) -> None:
        """Spans just stored: their content is claimed, and content that comes later goes to `row`."""
        for key in keys:
            if entry := self.waiting.pop(key, None):
                self.held -= entry[3]
            if self.stored.pop(key, None) is None:
                self.held += KEY_BYTES
            self.stored[key] = (time.monotonic(), row)
        self.trim()

    def trim(self) -> None:
        """Forget what is older than the wait; then, while over the memory limit, the oldest stored
        span ids first (content that comes for them still reaches their row by its key) and then the
        oldest waiting content."""
        deadline = time.monotonic() - self.wait
        while self.stored and (next(iter(self.stored.values()))[0] < deadline or self.held > self.limit):
            self.stored.popitem(last=False)
            self.held -= KEY_BYTES
        while self.waiting and (next(iter(self.waiting.values()))[0] < deadline or self.held > self.limit):
            self.held -= self.waiting.popitem(last=False)[1][3]
            self.expired += 1

    def __len__(self) -> int:
        return len(self.waiting)


class Failures:
    """A failure told twice: a failed LLM span and an ERROR log record in that span (a logged
    exception, as the logs SDK exports it with the span's ids) are one failure, whichever comes first.
    Remembered for TRACE_OTLP_CONTENT_WAIT, the newest FAILURES_KEPT of each: the error rows of failed
    spans stored lately, by span key, and the rows of ERROR records whose span is not known failed."""

    def __init__(self, wait: float) -> None:
        self.failed = Lately(wait, FAILURES_KEPT)        # span key -> its call's error row
        self.logged = Lately(wait, FAILURES_KEPT)        # span key -> rows of records logged in it

    def row_of(self, key: str) -> str | None:
        """The error row of the failed LLM span `key`, if it was stored lately."""
        return self.failed.get(key)

    def logged_in(self, keys: list[str]) -> list[str]:
        """The rows of ERROR records stored lately in these spans."""
        return [row for key in keys for row in self.logged.get(key, ())]

    def remember_failed(self, row: str, keys: list[str]) -> None:
        """A failed call's error row, stored: the records of its spans are folded into it."""
        for key in keys:
            self.failed.put(key, row)
            self.logged.pop(key)

    def remember_logged(self, key: str, row: str) -> None:
        rows = self.logged.get(key, [])
        self.logged.put(key, rows if row in rows else [*rows, row])


def fold_log(log_row: str, failure_row: str) -> list[tuple[str, tuple]]:
    """The statements that make an ERROR record's row part of its failed span's."""
    return [(FOLD_LOG_SQL, (log_row, failure_row)), (FOLDED_LOG_SQL, (log_row, failure_row))]


# -- metric points


@dataclasses.dataclass(slots=True)
class Point:
    """A metric point as a series' state: its window, value (a histogram's sum), count and buckets."""

    start_ns: int
    time_ns: int
    value: float | None
    count: int | None
    buckets: tuple[int, ...] | None = None
    bounds: tuple[float, ...] | None = None


def difference(last: Point | None, point: Point, monotonic: bool) -> tuple[Point, bool] | None:
    """A cumulative point as the change since the series' last one: (the change, whether the series
    restarted); None for a point not newer than the last (an exporter's retry). A restart (a new start
    time, a count or monotonic sum gone down, other buckets) counts from zero, as does a first point."""
    if last is None:
        return point, False
    if point.time_ns <= last.time_ns:
        return None
    restarted = point.start_ns not in (last.start_ns, 0) or point.bounds != last.bounds or (
        point.count is not None and last.count is not None and point.count < last.count) or (
        monotonic and point.value is not None and last.value is not None and point.value < last.value)
    if restarted:
        return point, True
    buckets = tuple(a - b for a, b in zip(point.buckets, last.buckets, strict=True)) \
        if point.buckets is not None and last.buckets is not None else None
    value = None if point.value is None or last.value is None else point.value - last.value
    if isinstance(value, int) and not -2**63 <= value < 2**63:    # two int64s apart: beyond SQLite's
        value = float(value)
    return Point(last.time_ns, point.time_ns, value, None if point.count is None or last.count is None else
                 point.count - last.count, buckets, point.bounds), False


class Kept(NamedTuple):
    """A metric point otrace keeps, read from its request, with the key of its series."""

    metric: Any
    resource: dict[str, Any]
    kind: str
    cumulative: bool
    monotonic: bool
    point: Any
    current: Point
    attrs: dict[str, Any]
    key: str


class SeriesState(NamedTuple):
    series_id: int
    last: Point | None           # a cumulative series' last point
    written: int                 # ms its state was last written to otlp_series (0: never)


class Series:
    """Every metric series otrace has seen: its id (in its rows' trace_ids) and, for a cumulative one,
    its last point. The newest TRACE_OTLP_MAX_SERIES are in memory; all are in otlp_series, written
    with the rows they produced, so a restart goes on counting from the same points."""

    def __init__(self, db: Database, limit: int) -> None:
        self.db, self.limit = db, limit
        self.known: collections.OrderedDict[str, SeriesState] = collections.OrderedDict()
        self.next_id: int | None = None

    def load(self, keys: Iterable[str]) -> dict[str, SeriesState]:
        """The stored state of those of `keys` not in memory (rows_in: a few hundred a query)."""
        wanted = [key for key in dict.fromkeys(keys) if key not in self.known]
        stored: dict[str, SeriesState] = {}
        for key, series_id, begin, at, value, count, buckets, updated in rows_in(
                self.db, SERIES_STATE_SQL, wanted):
            counts, bounds = json.loads(buckets) if buckets else (None, None)
            last = Point(begin, at, value, count, None if counts is None else tuple(counts),
                         None if bounds is None else tuple(bounds))
            stored[key] = SeriesState(series_id, last, updated)
        return stored

    def get(self, key: str, fresh: dict[str, SeriesState],
            stored: dict[str, SeriesState]) -> SeriesState:
        """A series' state (`stored`: what load read for the request), new ones numbered."""
        if key in fresh:
            return fresh[key]
        if key in self.known:
            return self.known[key]
        if key in stored:
            return stored[key]
        if self.next_id is None:
            self.next_id = (self.db.query("SELECT max(series_id) FROM otlp_series")[0][0] or 0) + 1
        self.next_id += 1
        return SeriesState(self.next_id - 1, None, 0)

    def commit(self, fresh: dict[str, SeriesState]) -> None:
        for key, state in fresh.items():
            self.known.pop(key, None)
            self.known[key] = state
        while len(self.known) > self.limit:
            self.known.popitem(last=False)


def point_problem(point: Point) -> str | None:
    """Why a point cannot be kept (a time past 2262, a value or count no column holds), or None."""
    if not 0 <= point.start_ns <= point.time_ns <= MAX_UNIX_NS:     # its series keeps them, in ns
        return "startTimeUnixNano and timeUnixNano must be in order, from 1970 to 2262-04-11"
    if not all(math.isfinite(x) for x in (point.value or 0.0, *(point.bounds or ()))):
        return "value and bounds must be finite numbers"
    if not all(0 <= n <= MAX_INT for n in (point.count or 0, *(point.buckets or ()))):
        return f"counts must be integers from 0 to {MAX_INT}"
    if point.buckets and len(point.buckets) != len(point.bounds or ()) + 1:
        return "bucketCounts must hold one count more than explicitBounds has bounds"
    if point.bounds and any(low >= high for low, high in itertools.pairwise(point.bounds)):
        return "explicitBounds must rise"
    return None


def point_state(key: str, state: SeriesState, now: int) -> tuple[str, tuple]:
    point = state.last or Point(0, 0, None, None)
    buckets = json.dumps([point.buckets, point.bounds]) if point.buckets is not None else None
    return SERIES_SQL, (key, state.series_id, point.start_ns, point.time_ns, point.value, point.count,
                        buckets, now)


# -- the receiver


@dataclasses.dataclass
class Export:
    """What one OTLP request becomes: rows and statements for the queue, what it refused, and what to
    remember once the queue has taken it."""

    rows: list[Row] = dataclasses.field(default_factory=list)
    extra: list[tuple[str, tuple]] = dataclasses.field(default_factory=list)
    rejected: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    first: Invalid | None = None              # the first refusal, for the log
    counts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    stored: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)   # (row, span keys)
    calls: list[Call] = dataclasses.field(default_factory=list)                     # each with its row
    merged: list[tuple[Call, Call]] = dataclasses.field(default_factory=list)       # (stored, now)
    parked: list[tuple[str, list[Said], list[int]]] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)   # (error row, span keys)
    parents: set[str] = dataclasses.field(default_factory=set)      # of LLM spans: spans around calls
    logged: list[tuple[str, str]] = dataclasses.field(default_factory=list)         # (span key, record's row)
    series: dict[str, SeriesState] = dataclasses.field(default_factory=dict)

    def refuse(self, counter: str, where: str, why: Invalid) -> None:
        self.rejected += 1
        self.counts[counter] += 1
        self.problems.append(f"{where}: {why}")
        self.first = self.first or why


def fulfil(future: Future, make: Callable[[], Any]) -> None:
    """Make an answer the HTTP thread waits for: `make`'s result, or what it raised."""
    try:
        future.set_result(make())
    except Refusal as refusal:    # an answer: kept without the frames that hold the body (see answered)
        future.set_exception(answered(refusal))
    except BaseException as exc:  # noqa: BLE001 - handed to the HTTP thread, which answers
        future.set_exception(exc)


class Worker(threading.Thread):
    """A thread that makes answers one at a time, in the order they were asked for; started by the
    first. One whose client hung up before it began is not made."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future] | None] = queue.SimpleQueue()
        self.asked = self.ended = 0      # each counted by one thread: the asking one, this one

    def submit(self, make: Callable[[], Any]) -> Future:
        future: Future = Future()
        self.asked += 1
        self.jobs.put((make, future))
        if self.ident is None:
            self.start()
        return future

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            make, future = job
            try:
                if future.set_running_or_notify_cancel():
                    fulfil(future, functools.partial(self.counted, make))
                else:
                    self.ended += 1
            except BaseException as exc:  # noqa: BLE001 - out of memory handing an answer on: the
                with contextlib.suppress(BaseException):   # client is answered, the next job made
                    if not future.done():
                        future.set_exception(exc)

    def counted(self, make: Callable[[], Any]) -> Any:
        try:
            return make()
        finally:
            self.ended += 1          # before the answer is handed over: a client answered waits no more

    @property
    def in_progress(self) -> int:
        """Answers asked for and not yet made (or dropped)."""
        return self.asked - self.ended

    def stop(self) -> None:
        """Shutdown, once the HTTP server is closed: the answer under way, if any, is the last."""
        self.jobs.put(None)


class OtlpReceiver:
    """OTLP/HTTP export requests, one at a time on a thread of their own (a large one takes seconds,
    while the HTTP thread serves every other client): decoded, mapped to rows, offered to the queue
    whole, and answered as the specification says (200 with partial_success for refused items)."""

    def __init__(self, service: Service) -> None:
        self.service, self.config = service, service.config
        self.content = Content(self.config.otlp_content_wait, self.config.otlp_content_bytes)
        self.recent = RecentCalls(self.config.otlp_content_wait)
        self.failures = Failures(self.config.otlp_content_wait)
        self.parents = Lately(self.config.otlp_content_wait, PARENTS_KEPT)
        self.series = Series(service.db, self.config.otlp_max_series)
        self.totals = Counters(OTLP_COUNTERS)
        self.worker = Worker("otrace-otlp")

    def submit(self, request: Request, body: bytearray, encoding: str, *,
               admit: Callable[[list[Row], tuple], None]) -> Future:
        """The answer to an export request, made on the receiver's thread."""
        self.room(encoding)
        return self.worker.submit(functools.partial(self.export, request, body, encoding, admit=admit))

    def room(self, encoding: str) -> None:
        """Refusal (503) while TRACE_OTLP_BACKLOG requests wait for their answers, each holding its body."""
        if self.worker.in_progress >= self.config.otlp_backlog:
            self.totals.add("requests_refused")
            refusal = Refusal(503, f"{self.worker.in_progress} OTLP requests are waiting to be mapped "
                              "(TRACE_OTLP_BACKLOG); retry later", {"Retry-After": "1"})
            refusal.otlp = encoding                  # OTLP's answer, on /v1/traces as elsewhere
            raise refusal

    @staticmethod
    def known(request: Request) -> str | None:
        """The encoding of a request that is OTLP by its route and Content-Type alone: protobuf, or
        JSON on /v1/metrics and /v1/logs; None for JSON on /v1/traces (recognise tells by the body)."""
        if request.route not in OTLP_SIGNALS:
            return None
        if otlp_encoding(request.headers) == "protobuf":
            return "protobuf"
        return None if request.route == "/v1/traces" else "json"

    @staticmethod
    def recognise(body: bytearray) -> str | None:
        """The encoding of JSON on /v1/traces when its top level is resourceSpans (parsed to tell, and
        again when it is mapped: a parsed document waiting for its turn would hold several times its
        body); None for otrace's own."""
        if b'"resource' not in body or (b'"resourceSpans"' not in body and b'"resource_spans"' not in body):
            return None                                # one scan of the body for otrace's own events
        with contextlib.suppress(Invalid):
            doc = json_body(body)
            if isinstance(doc, dict) and any(key in doc for key in OTLP_TOP["traces"]):
                return "json"
        return None

    def export(self, request: Request, body: bytearray, encoding: str, *,
               admit: Callable[[list[Row], tuple], None]) -> tuple[int, bytes, dict, str]:
        """Answer one export request; `admit` offers its rows to the queue whole, or refuses (503)."""
        signal = OTLP_SIGNALS[request.route]
        try:
            try:
                message = decode_otlp(signal, body, encoding)
            finally:
                body.clear()            # its job holds it too: the bytes go now, not at the next job
            export = getattr(self, signal)(message, now_ms())
            del message
            if export.rows or export.extra:
                admit(export.rows, tuple(export.extra))
        except Refusal as refusal:
            refusal.otlp = refusal.otlp or (encoding if encoding == "json" else None)
            raise
        self.settle(export)
        if export.first is not None:
            self.service.refusals.refused(request, export.first, request.client, items=export.rejected)
        answer, content_type = otlp_answer(signal, encoding, export.rejected, export.problems)
        return 200, answer, {}, content_type

    def settle(self, export: Export) -> None:
        """The queue has taken the request: remember what it changed, and count it."""
        for row, keys in export.stored:
            self.content.remember(row, keys)
        for call in export.calls:
            self.recent.remember(call)
        for stored, merged in export.merged:
            self.recent.replace(stored, merged)
        for key, said, stamps in export.parked:
            self.content.park(key, said, stamps)
        for key, row in export.logged:
            self.failures.remember_logged(key, row)
        for row, keys in export.failed:
            self.failures.remember_failed(row, keys)
        for parent in export.parents:
            self.parents.put(parent, True)
        self.series.commit(export.series)
        self.content.trim()
        export.counts["requests"] += 1
        export.counts["log_content_expired"] += self.content.expired
        self.content.expired = 0
        for name, n in export.counts.items():
            self.totals.add(name, n)

    # -- traces
    def traces(self, message: Any, received: int) -> Export:
        export, calls = Export(), []
        store_followed = self.service.store is not None
        for r, resource_spans in enumerate(message.resource_spans):
            resource = resource_attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    export.counts["spans"] += 1
                    try:
                        found = llm_call(span, resource, (r, scope_spans.scope.name), store_followed)
                    except Invalid as why:
                        export.refuse("spans_rejected", f"span {span.name!r}", why)
                        continue
                    if isinstance(found, str):
                        export.counts[f"spans_{found}" if found == "not_llm" else found] += 1
                    else:
                        calls.append(found)
                        left_out = found.event["metadata"].get("dropped", {})
                        export.counts["span_values_dropped"] += len(left_out)
        export.parents = {call.parent for call in calls if call.parent}
        # a span stored lately as its own row, sent again, stays apart: its partner here, a span of
        # another instrumentation, fills that row in (partner) rather than going with it as a duplicate
        fresh, resent = [], []
        for call in calls:
            (resent if self.content.row_of(call.key) == call.key else fresh).append(call)
        calls, export.counts["spans_merged"] = one_per_call(fresh)
        calls += resent
        steps = self.steps(calls, export)
        for found in calls:
            if self.content.row_of(found.key) not in (None, found.key):   # merged into another row before:
                export.counts["spans_merged"] += 1                         # a retry
                continue
            call = dataclasses.replace(found, event=self.with_content(found))
            if stored := self.recent.partner(call):
                self.merge_rows(stored, call, export, received)
            elif call.key in steps:
                export.counts["spans_around_calls"] += 1
            else:
                self.call_rows(call, export, received)
        self.steps_stored(export)
        return export

    def steps(self, calls: list[Call], export: Export) -> set[str]:
        """The keys of the spans other LLM calls' spans are children of: an agent's, a workflow's or a
        framework's span around its model calls, whose usage is theirs added up, is no call itself
        (spans_around_calls). Its children come first (a span ends after them), in this request or an
        earlier one, whose rows are stored or, lately, still in the queue."""
        stored = self.children_stored({call.key.split("-")[0] for call in calls
                                       if not call.relayed and call.key not in export.parents})
        return {call.key for call in calls if not call.relayed and (
            call.key in export.parents or self.parents.get(call.key) or call.key in stored)}

    def steps_stored(self, export: Export) -> None:
        """Spans stored as calls before an LLM child of theirs came (it ended after them) are steps
        around calls too: their rows are deleted, while not pushed (but a row the child was merged
        into, as another instrumentation's span of its call)."""
        here = {key for call in export.calls for key in call.keys}
        here |= {stored.key for stored, _ in export.merged}
        wanted = {call.parent for call in export.calls if call.parent and not call.relayed} - here
        stored = self.rows_stored(wanted)
        found = {key for key in wanted if stored.get(key) == UNSYNCED
                 or (key not in stored and self.content.row_of(key) == key)}     # still in the queue
        export.extra += [(sql, (key,)) for key in sorted(found) for sql in STEP_ROWS_SQL]
        export.counts["spans_around_calls"] += len(found)

    def rows_stored(self, keys: set[str]) -> dict[str, int]:
        """Of these row keys, those of calls stored from OTLP, with their synced state."""
        with state_read("the calls stored"):
            return dict(rows_in(self.service.db, STORED_SQL, sorted(keys)))

    def children_stored(self, traces: set[str]) -> set[str]:
        """The row keys of spans that LLM calls of these traces stored are children of: one query."""
        if not traces:
            return set()
        with state_read("the calls of a trace"):
            return {f"{trace}-{span}" for trace, span in self.service.db.query(
                PARENTS_SQL, (json.dumps(sorted(traces)),)) if span}

    def with_content(self, call: Call) -> dict[str, Any]:
        """The call's fields, with content that waited for its spans where they had none."""
        event = dict(call.event)
        inputs, outputs = self.content.peek(call.keys)
        if event.get("input_text") is None and inputs:
            event["input_text"] = _as_text(inputs)
        if event.get("output_text") is None and outputs:
            event["output_text"] = _as_text(outputs)
        return event

    def rows_of(self, event: dict[str, Any], failure: dict[str, Any] | None, received: int) -> list[Row]:
        """The llm_traces row of a call, and its error_events row if it failed; Invalid if it cannot be
        stored."""
        max_text = self.config.max_text_bytes
        event = {**event, "provider": event.get("provider") or "unknown",
                 "model": event.get("model") or "unknown", "metadata": within(event["metadata"], max_text)}
        rows = [event_row(TRACES, trace_row, event, "otlp", received=received, max_text=max_text)]
        if failure:
            failure = {k: v for k, v in failure.items() if k != "error_type_name"}
            failure |= {"provider": event["provider"], "model": event["model"],
                        "session_id": event.get("session_id"), "metadata": {**{   # errors by service too
                            key: value for key in ("service_name", "scope")
                            if (value := event["metadata"].get(key)) is not None}, **failure["metadata"]}}
            rows.append(event_row(ERRORS, error_row, failure, "otlp", received=received, max_text=max_text))
        return rows

    def call_rows(self, call: Call, export: Export, received: int) -> None:
        """The rows of a call."""
        try:
            export.rows += self.rows_of(call.event, call.failure, received)
        except Invalid as why:
            export.refuse("spans_rejected", f"span {call.event['metadata'].get('span_name')!r}", why)
            return
        export.counts["llm_spans"] += 1
        export.stored.append((call.key, call.keys))
        export.calls.append(call)
        if call.failure:
            self.failure_told(call.key, call.keys, export)

    def failure_told(self, row: str, keys: list[str], export: Export) -> None:
        """A failed call's error row `row`, for the spans `keys`: ERROR records logged in them before are
        folded into it, and those that come later will be."""
        for logged in self.failures.logged_in(keys):
            export.extra += fold_log(logged, row)
            export.counts["log_errors_merged"] += 1
        export.failed.append((row, keys))

    def merge_rows(self, stored: Call, call: Call, export: Export, received: int) -> None:
        """`call` is another instrumentation's span of `stored`, whose rows are in: they become the call
        of both spans, as one_per_call makes it within a request (the inner span's fields first), unless
        pushed already; a failure the stored span did not have is added."""
        call_first = call.end - call.start < stored.end - stored.start
        inner, outer = (call, stored) if call_first else (stored, call)
        merged = dataclasses.replace(inner, key=stored.key, event={**inner.event, "trace_id": stored.key},
                                     keys=list(inner.keys))
        absorb(merged, outer)
        if merged.failure:
            merged.failure = {**merged.failure, "trace_id": stored.key}
        try:
            rows = self.rows_of(merged.event, merged.failure, received)
        except Invalid as why:
            export.refuse("spans_rejected", f"span {call.event['metadata'].get('span_name')!r}", why)
            return
        for row in rows:
            if row.table == TRACES.name or stored.failure:
                export.extra.append((MERGE_SQL[row.table, call_first], (*row.values, stored.key)))
            else:                                      # a failure the stored span did not have
                export.rows.append(row)
        export.counts["spans_merged"] += 1
        export.stored.append((stored.key, call.keys))
        export.merged.append((stored, merged))
        if merged.failure:
            self.failure_told(stored.key, merged.keys, export)

    # -- logs
    def logs(self, message: Any, received: int) -> Export:
        export, content, stamps = Export(), {}, {}
        keys: collections.Counter[str] = collections.Counter()   # error rows' keys made so far
        log_followed, store_followed = self.service.tailer is not None, self.service.store is not None
        for resource_logs in message.resource_logs:
            resource = resource_attributes(resource_logs.resource.attributes)
            for scope_logs in resource_logs.scope_logs:
                origin: int | None = None    # its resource and scope, in its error rows' keys (below)
                for record in scope_logs.log_records:
                    export.counts["log_records"] += 1
                    attrs = otel_attributes(record.attributes)
                    subsystem = attrs.get("openclaw.subsystem")
                    if scope_logs.scope.name == "openclaw" and (log_followed or (
                            store_followed and subsystem in OPENCLAW_FAILURE_SUBSYSTEMS)):
                        export.counts["openclaw_logs_skipped"] += 1     # its lines are read from the file,
                        continue                                        # its model failures from the store
                    name = getattr(record, "event_name", "") or attrs.get("event.name") or ""
                    name = name if isinstance(name, str) else ""
                    used = False
                    if severity(record) >= SEVERITY_ERROR or name in (PUSHED_ERROR, LOSS_EVENT):
                        if origin is None:       # two services' like failures are two rows
                            origin = zlib.crc32(resource_logs.resource.SerializeToString(deterministic=True)
                                                + scope_logs.scope.SerializeToString(deterministic=True))
                        key = f"otlp-log-{record.time_unix_nano or record.observed_time_unix_nano}-" \
                              f"{zlib.crc32(record.SerializeToString(deterministic=True), origin):08x}"
                        keys[key] += 1     # a like record in the same request is another failure
                        used = self.log_error(record, attrs, name, (resource, scope_logs.scope.name), export,
                                              key=key if keys[key] == 1 else f"{key}-{keys[key] - 1}",
                                              received=received)
                    said = log_content(name, otel_value(record.body), attrs)
                    if said:
                        used = True
                        key = span_key(record.trace_id, record.span_id)
                        if key is None:
                            export.counts["log_content_unlinked"] += 1
                            continue
                        export.counts["log_content"] += 1
                        content.setdefault(key, []).append(said)
                        stamps.setdefault(key, []).append(   # a retry's records have the same times
                            record.time_unix_nano or record.observed_time_unix_nano)
                    if not used:
                        export.counts["log_other"] += 1
        for key, said in content.items():
            self.feed(key, said, export, stamps[key])
        return export

    def log_error(self, record: Any, attrs: dict[str, Any], name: str, where: tuple[dict[str, Any], str],
                  export: Export, *, key: str, received: int) -> bool:
        """An ERROR (or FATAL) record, or another otrace's error event or report of rows it gave up (a
        warning), as an error_events row; its trace_id `key` is derived from the record, its resource
        and scope, and how many like it came before it in the request, so an exporter's retry stores
        nothing twice."""
        body = otel_value(record.body)
        text = _as_text(body) or _as_text(attrs.get("exception.message")) or name or record.severity_text \
            or "error"
        at = record.time_unix_nano or record.observed_time_unix_nano
        error_type = error_name(attrs.get("exception.type") or attrs.get("error.type"))
        meta = {"service_name": where[0].get("service.name"), "scope": where[1],
                "severity_text": record.severity_text, "event_name": name or None,
                "otel_trace_id": record.trace_id.hex() or None, "otel_span_id": record.span_id.hex() or None}
        meta |= {k: v for k, v in attrs.items() if not k.startswith("exception.")}
        llm = any(key in attrs for key in PROVIDER_KEYS)
        event = {"error_type": "llm_error" if llm else "system_error",
                 "category": call_category(error_type, http_status(attrs, text), text),
                 "severity": "critical" if severity(record) >= SEVERITY_FATAL else "warning"
                 if name == LOSS_EVENT else "error",
                 "message": text, "stack_trace": _as_text(attrs.get("exception.stacktrace")),
                 "provider": provider_name(_first(attrs, PROVIDER_KEYS)),
                 "model": _word(_first(attrs, ("gen_ai.response.model", "gen_ai.request.model"))),
                 "session_id": _word(_first(attrs, SESSION_KEYS)),
                 "trace_id": key,
                 "created_at": at // 1_000_000 or None,
                 "metadata": {k: v for k, v in meta.items() if v is not None}}
        if name == PUSHED_ERROR:       # its columns, and its own metadata, not the attributes carrying them
            event |= {k: v for k, v in pushed_error(record, attrs).items() if v is not None}
            kept = attrs.get("otrace.metadata")
            event["metadata"] = {k: v for k, v in event["metadata"].items() if k in PUSHED_IDENTITY
                                 or not k.startswith("otrace.")} | (kept if isinstance(kept, dict) else {})
        if left_out := leave_out_unwritable(event["metadata"]):     # the failure is kept without them
            name_dropped(event["metadata"], left_out)
            export.counts["log_values_dropped"] += len(left_out)
        try:
            row = event_row(ERRORS, error_row, event, "otlp", received=received,
                            max_text=self.config.max_text_bytes)
        except Invalid as why:
            export.refuse("log_records_rejected", f"log record {name or record.severity_text!r}", why)
            return True
        export.rows.append(row)
        if name == PUSHED_ERROR:        # its words over those the failed span gave the same row
            export.extra.append((MERGE_SQL[ERRORS.name, True], (*row.values, event["trace_id"])))
        elif span := span_key(record.trace_id, record.span_id):
            self.logged_in_span(span, event["trace_id"], export)
        export.counts["log_errors"] += 1
        return True

    def logged_in_span(self, span: str, row: str, export: Export) -> None:
        """An ERROR record's row, logged in the span `span`: part of that span's failure if it is a
        failed LLM call otrace stored, else its own row, to be folded into the span's if it fails."""
        if failure := self.failures.row_of(span):
            export.extra += fold_log(row, failure)
            export.counts["log_errors_merged"] += 1
        else:
            export.logged.append((span, row))

    def feed(self, key: str, said: list[Said], export: Export, stamps: list[int]) -> None:
        """Content for the span `key`: into its row if the row is there and not yet pushed (an UPDATE
        that fills only what the row lacks), and kept for the span if it has not come (to otrace's
        knowledge) yet."""
        known: tuple[Any, Any] = (None, None)
        for one in said:
            known = combine(known, one)
        limit = self.config.max_text_bytes
        cut_in, cut_out = (cut_utf8(_as_text(part), limit) if part else (None, None, False) for part in known)
        row = self.content.row_of(key)
        export.extra.append((CONTENT_SQL, (cut_in[2], cut_out[2], cut_in[1], cut_in[0], cut_out[1],
                                           cut_out[0], row or key)))
        if row is not None:
            export.counts["log_content_after_span"] += len(said)
        else:
            export.parked.append((key, said, stamps))

    # -- metrics
    def metrics(self, message: Any, received: int) -> Export:
        export, points = Export(), []
        for resource_metrics in message.resource_metrics:
            resource = resource_attributes(resource_metrics.resource.attributes)
            identity = [resource.get(k) for k in ("service.name", "service.namespace", "service.instance.id",
                                                  "host.name", "process.pid")]
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    points += self.kept_points(metric, resource, [*identity, scope_metrics.scope.name],
                                               export)
        with state_read("metric series state"):
            stored = self.series.load(point.key for point in points)
            for point in points:
                self.metric_point(point, export, stored, received)
        return export

    def kept_points(self, metric: Any, resource: dict[str, Any], identity: list[Any], export: Export
                    ) -> list[Kept]:
        """The points of a metric otrace keeps (GenAI's), each with the key of its series."""
        kind = metric.WhichOneof("data")
        points = getattr(metric, kind).data_points if kind else ()
        export.counts["metric_points"] += len(points)
        kept = metric.name.startswith("gen_ai.") or metric.name in USAGE_METRICS
        if not kept or kind in (None, "summary"):
            export.counts["metric_points_other"] += len(points)
            return []
        data = getattr(metric, kind)
        cumulative = getattr(data, "aggregation_temporality", 1) == 2
        monotonic = kind == "sum" and data.is_monotonic
        found = []
        for point in points:
            if point.flags & 1:                      # no recorded value
                export.counts["metric_points_unchanged"] += 1
                continue
            current = Point(point.start_time_unix_nano, point.time_unix_nano, *metric_value(kind, point))
            if problem := point_problem(current):
                export.refuse("metric_points_rejected", f"metric {metric.name!r}", Invalid(problem))
                continue
            attrs = otel_attributes(point.attributes)
            key = json.dumps([*identity, metric.name, sorted(attrs.items())], separators=(",", ":"),
                             default=str)
            found.append(Kept(metric, resource, kind, cumulative, monotonic, point, current, attrs, key))
        return found

    def metric_point(self, kept: Kept, export: Export, stored: dict[str, SeriesState], received: int) -> None:
        """A point's change since the last of its series (a cumulative one), as a row."""
        metric, resource, kind, cumulative, monotonic, point, current, attrs, key = kept
        state = export.series.setdefault(key, self.series.get(key, export.series, stored))
        change, reset = current, False
        if cumulative:
            found = difference(state.last, current, monotonic)
            if found is None:
                export.counts["metric_points_unchanged"] += 1
                return
            change, reset = found
        zero = not change.value and not change.count
        if cumulative:
            touch = not zero or received - state.written > SERIES_TOUCH_MS
            fresh = export.series[key] = SeriesState(state.series_id, current,
                                                     received if touch else state.written)
            if touch:
                export.extra.append(point_state(key, fresh, received))
        elif state.written == 0:                 # a new delta or gauge series: keep its id
            fresh = export.series[key] = SeriesState(state.series_id, None, received)
            export.extra.append(point_state(key, fresh, received))
        if zero and kind != "gauge":
            export.counts["metric_points_unchanged"] += 1
            return
        export.counts["metric_resets"] += reset
        self.point_row(metric, point, export, kind=kind, monotonic=monotonic, attrs=attrs,
                       service=resource.get("service.name"), change=change, reset=reset,
                       series_id=state.series_id, received=received, whole=change is current)

    def point_row(self, metric: Any, point: Any, export: Export, *, kind: str, monotonic: bool,
                  attrs: dict[str, Any], service: str | None, change: Point, reset: bool, series_id: int,
                  received: int, whole: bool) -> None:
        """`whole`: the point as sent, not its change since the last one (whose min and max are not
        known)."""
        event = {"trace_id": f"otlp-metric-{series_id}-{point.time_unix_nano}",
                 "created_at": point.time_unix_nano // 1_000_000 or None, "name": metric.name, "kind": kind,
                 "unit": metric.unit or None, "window_start": (change.start_ns // 1_000_000) or None,
                 "value": change.value, "count": change.count, "reset": reset,
                 "monotonic": monotonic if kind == "sum" else None,
                 "min": point.min if whole and kind in HISTOGRAMS and point.HasField("min") else None,
                 "max": point.max if whole and kind in HISTOGRAMS and point.HasField("max") else None,
                 "buckets": {"bounds": list(change.bounds), "counts": list(change.buckets)}
                 if change.buckets is not None else None,
                 "provider": provider_name(_first(attrs, PROVIDER_KEYS)),
                 "model": _word(_first(attrs, MODEL_KEYS)),
                 "service": _word(service), "attributes": attrs}
        if kind == "gauge":
            event["window_start"] = None
        try:
            export.rows.append(event_row(GENAI_METRICS, metric_row, event, "otlp", received=received,
                                         max_text=self.config.max_text_bytes))
        except Invalid as why:
            export.refuse("metric_points_rejected", f"metric {metric.name!r}", why)
            return
        export.counts["metric_points_kept"] += 1

    def health(self) -> dict[str, Any]:
        return {"port": self.config.otlp_port or None, "requests_in_progress": self.worker.in_progress,
                "decoder_loaded": otlp_classes.cache_info().currsize > 0, **self.totals.snapshot(),
                "content_waiting": len(self.content), "content_bytes": self.content.held,
                "series_in_memory": len(self.series.known)}


def metric_value(kind: str, point: Any) -> tuple[float | None, int | None, tuple | None, tuple | None]:
    """(value, count, bucket counts, bounds) of a point: a sum's or gauge's value, a histogram's sum."""
    if kind in ("sum", "gauge"):
        value = point.as_double if point.WhichOneof("value") == "as_double" else point.as_int
        return value, None, None, None
    total = point.sum if point.HasField("sum") else None
    if kind == "histogram":
        return total, point.count, tuple(point.bucket_counts), tuple(point.explicit_bounds)
    return total, point.count, None, None


# ======================================================================================= host metrics
# Host metrics, read from the files the kernel writes, like node_exporter's collectors: every reader
# takes its procfs and sysfs roots, so trees of files captured from real machines test it. Inside a
# container the figures are the cgroup's (v2, v1 or a hybrid of both), on a VM they come from /proc.

V1_CONTROLLERS = {"cpu": "cpu", "cpuacct": "cpuacct", "cpuset": "cpuset", "memory": "memory", "io": "blkio"}
V2_CONTROLLERS = {"cpu": "cpu", "cpuacct": "cpu", "cpuset": "cpuset", "memory": "memory", "io": "io"}
SYSTEMD_UNIT = re.compile(r".+\.(?:service|scope)")
CONTAINER_UNIT = re.compile(r"(?:docker|libpod|crio|cri-containerd|containerd|nerdctl)-\w+\.scope|kubepods"
                            r"|machine\.slice|lxc\.payload")   # a container's unit: the agent's box
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@functools.lru_cache(maxsize=256)
def under(root: str | Path, *parts: str) -> str:
    """The path of a file under a reader's root, joined once: a Path joined at each read costs more
    than reading some of these files."""
    return os.path.join(root, *parts)  # noqa: PTH118 - a str, for os.open


def read_text(path: str | Path) -> str | None:
    """A small kernel file's text, or None if it is missing or unreadable. Read with bare os calls: a
    text file object costs five times as much, and a host sample reads some twenty files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii", "replace")


def read_int(path: str | Path) -> int | None:
    text = read_text(path)
    try:
        return int(text.split()[0]) if text and text.strip() else None
    except ValueError:
        return None


def read_keyed(path: str | Path, keys: Iterable[str]) -> dict[str, int]:
    """The `keys` of a flat-keyed file ("name value" per line: cpu.stat, memory.stat, /proc/vmstat,
    ...), found without splitting the whole file (vmstat has nearly 200 lines)."""
    text = read_text(path) or ""
    found = ((key, re.search(rf"^{re.escape(key)}:?[ \t]+(-?\d+)", text, re.MULTILINE)) for key in keys)
    return {key: int(match[1]) for key, match in found if match}


def count_cpus(cpulist: str | None) -> int | None:
    """How many CPUs a list like "0-3,8" names."""
    if not cpulist or not cpulist.strip():
        return None
    count = 0
    for part in cpulist.strip().split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


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
    return [m for line in (read_text(under(procfs, "self", "mountinfo")) or "").splitlines()
            if (m := Mount.parse(line))]


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
        for line in (read_text(under(procfs, "self", "cgroup")) or "").splitlines():
            _, controllers, path = line.split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
        v1: dict[str, tuple[str, Path]] = {}
        v2: dict[str, tuple[str, Path]] = {}
        v1_roots: dict[str, Path] = {}       # per v1 resource, its hierarchy's root as this process sees it
        v2_root = Path("/")
        usage_only = None                    # v2 cpu.stat has usage_usec even without the cpu controller
        for mount in mounts(procfs):
            if mount.fstype == "cgroup2" and "" in paths and mode in ("auto", "v2"):
                where = _cgroup_dir(sysfs, mount, paths[""])
                enabled = set((read_text(under(where, "cgroup.controllers")) or "").split())
                v2 = {res: ("v2", where) for res, name in V2_CONTROLLERS.items() if name in enabled}
                usage_only = where if (where / "cpu.stat").exists() else None
                v2_root = _cgroup_dir(sysfs, mount, "/")
            elif mount.fstype == "cgroup" and mode in ("auto", "v1"):
                for res, name in V1_CONTROLLERS.items():
                    if name in mount.options and name in paths:
                        v1[res] = ("v1", _cgroup_dir(sysfs, mount, paths[name]))
                        v1_roots[res] = _cgroup_dir(sysfs, mount, "/")
        dirs = {**v1, **v2}
        if "cpuacct" not in dirs and usage_only is not None:
            dirs["cpuacct"] = ("v2", usage_only)
        used = [path for name, path in paths.items() if name in ("", *V1_CONTROLLERS.values())]
        roots = {res: v2_root if version == "v2" else v1_roots[res] for res, (version, _) in dirs.items()}
        if mode == "auto" and any(map(host_unit, used)):     # otrace's own unit: read the box around it
            container = in_container(procfs)
            dirs = {res: (version, box) for res, (version, where) in dirs.items()
                    if (box := box_of(version, where, roots[res], container)) is not None}
        elif mode == "auto" and not any(CONTAINER_UNIT.search(path) for path in used):
            # limits on a parent bind its children: each read where its limit is (a runtime's unit is
            # read as it is: above it are the other containers)
            bound = {res: (version, bound_by(res, version, where, roots[res])) for res, (version, where)
                     in dirs.items()}
            if (cpu := relative(dirs, roots, "cpu")) and cpu == relative(dirs, roots, "cpuacct") and \
                    dirs["cpu"][0] == dirs["cpuacct"][0]:    # the CPU usage from where the quota is
                bound["cpuacct"] = (dirs["cpuacct"][0], roots["cpuacct"] / bound["cpu"][1].relative_to(
                    roots["cpu"]))
            dirs = bound
        return cls(dirs) if dirs else None


def relative(dirs: dict[str, tuple[str, Path]], roots: dict[str, Path], res: str) -> Path | None:
    """A resource's cgroup path within its hierarchy; None if it has none."""
    where = dirs[res][1] if res in dirs else None
    return where.relative_to(roots[res]) if where and where.is_relative_to(roots[res]) else None


def bound_by(resource: str, version: str, where: Path, root: Path) -> Path:
    """The cgroup whose limit on `resource` (a CPU quota, a memory limit) binds `where`: of it and those
    above it up to the root it sees, the one with the tightest (a parent's tighter limit binds its
    children, whatever theirs; of two alike, the nearer); `where` for a resource with no limit read,
    or none set."""
    has = {"cpu": cpu_quota, "memory": memory_limit}.get(resource)
    limits = [(limit, n, folder) for n, folder in enumerate(upward(where, root) if has else ())
              if (limit := has(version, folder)) is not None]
    return min(limits)[2] if limits else where


def upward(where: Path, root: Path) -> list[Path]:
    """A cgroup and those above it, up to the hierarchy's root as this process sees it."""
    above = [where, *where.parents]
    return above[:above.index(root) + 1] if root in above else [where]


def host_unit(path: str) -> bool:
    """A systemd service or scope (not a container runtime's): on a host, what it uses is otrace's
    alone, not the agent's beside it."""
    return bool(SYSTEMD_UNIT.fullmatch(path.rpartition("/")[2])) and not CONTAINER_UNIT.search(path)


def in_container(procfs: Path) -> bool:
    """PID 1 says it runs in a container (`container=` in its environment, as systemd-nspawn, LXC and
    podman set it): a systemd unit there is inside the agent's box. Unreadable (not root): no."""
    return "\0container=" in "\0" + (read_text(under(procfs, "1", "environ")) or "")


def box_of(version: str, where: Path, root: Path, container: bool) -> Path | None:
    """The cgroup a systemd unit sits in that bounds the agent too: the nearest one, the unit or a
    slice above it, with a CPU quota or a memory limit; else, in a container, the container's (the
    root it sees); else none (a host: /proc speaks). A unit named for otrace holds otrace alone: its
    own limits (a sidecar's hardening) say nothing of the agent's box."""
    return nearest_limited(version, where, root, own="otrace" not in where.name) or (
        root if container else None)


def nearest_limited(version: str, where: Path, root: Path, own: bool = True) -> Path | None:
    """The nearest cgroup with a CPU quota or a memory limit: `where` (if `own`) or one above it, up
    to the hierarchy's root as this process sees it; None if none has one."""
    for folder in upward(where, root):
        if (own or folder != where) and limited(version, folder):
            return folder
    return None


def limited(version: str, folder: Path) -> bool:
    """A CPU quota or a memory limit on this cgroup."""
    return cpu_quota(version, folder) is not None or memory_limit(version, folder) is not None


def cpu_quota(version: str, folder: Path) -> float | None:
    """The cores a cgroup's CPU quota allows (cpu.max, or v1's quota over its period); None: no quota."""
    if version == "v2":
        quota, _, period = (read_text(under(folder, "cpu.max")) or "max").strip().partition(" ")
    else:
        quota, period = (str(read_int(under(folder, f"cpu.cfs_{name}_us"))) for name in ("quota", "period"))
    if quota.lstrip("-").isdigit() and int(quota) > 0 and period.isdigit() and int(period) > 0:
        return int(quota) / int(period)
    return None


def memory_limit(version: str, folder: Path, total: int | None = None) -> int | None:
    """A cgroup's memory limit in bytes; None for "max", v1's "no limit" (about 2^63), or one over
    the machine's `total`."""
    limit = read_text(under(folder, "memory.max" if version == "v2" else "memory.limit_in_bytes")) or ""
    return int(limit) if limit.strip().isdigit() and int(limit) < (total or 2**62) else None


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
    mem_host_available: int | None = None    # MemAvailable: a cgroup gets no more than the machine has
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


OOM_READS = 3        # reads of the OOM counts for one moment's, at most: kills come seconds apart


class HostReader:
    """Reads a Snapshot of the host, as the cgroup otrace runs in sees it, from `procfs` and `sysfs`."""

    def __init__(self, procfs: Path, sysfs: Path, disk_path: str, mode: str = "auto",
                 disk_device: tuple[int, int] | None = None) -> None:
        self.procfs, self.sysfs, self.disk_path = procfs, sysfs, disk_path
        self.cgroup = Cgroup.find(procfs, sysfs, mode)
        self.device = disk_device or self.block_device(disk_path)

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
        for line in (read_text(under(self.procfs, "diskstats")) or "").splitlines():
            fields = line.split()
            if len(fields) > 9 and fields[2] == name:
                return int(fields[0]), int(fields[1])
        return None

    def snapshot(self) -> Snapshot:
        online = count_cpus(read_text(under(self.sysfs, "devices", "system", "cpu", "online")))
        snap = Snapshot(time.monotonic(), "proc", cores=online)
        meminfo = read_keyed(under(self.procfs, "meminfo"), ("MemTotal", "MemAvailable", "AnonPages"))
        snap.mem_total = meminfo.get("MemTotal", 0) * 1024 or None
        snap.mem_host_available = meminfo["MemAvailable"] * 1024 if "MemAvailable" in meminfo else None
        if self.cgroup:
            self.read_cgroup(snap)
        if snap.source == "proc":
            stat = (read_text(under(self.procfs, "stat")) or "").split("\n", 1)[0].split()
            if len(stat) >= 9 and stat[0] == "cpu":
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, stat[1:9])
                snap.cpu_used = user + nice + system + irq + softirq + steal   # guest is inside user
                snap.cpu_ticks = snap.cpu_used + idle + iowait
        if snap.mem_used is None and "MemAvailable" in meminfo:
            snap.mem_used = (meminfo["MemTotal"] - meminfo["MemAvailable"]) * 1024
            snap.mem_rss = meminfo.get("AnonPages", 0) * 1024
        snap.host_oom_kills, snap.cgroup_oom_kills = self.oom_counts()
        self.read_disk(snap)
        snap.self_cpu, snap.self_rss = own_usage(self.procfs)
        return snap

    def read_cgroup(self, snap: Snapshot) -> None:
        dirs = self.cgroup.dirs
        if "cpuacct" in dirs:
            version, cpuacct = dirs["cpuacct"]
            usage = (read_keyed(under(cpuacct, "cpu.stat"), ("usage_usec",)).get("usage_usec", -1) / 1e6
                     if version == "v2" else (read_int(under(cpuacct, "cpuacct.usage")) or -1) / 1e9)
            if usage >= 0:
                snap.source, snap.cpu_used = f"cgroup_{version}", usage
        if "cpu" in dirs:
            version, cpu = dirs["cpu"]
            if version == "v2":
                stat = read_keyed(under(cpu, "cpu.stat"), ("throttled_usec", "nr_throttled"))
                snap.throttled_s = stat["throttled_usec"] / 1e6 if "throttled_usec" in stat else None
            else:
                stat = read_keyed(under(cpu, "cpu.stat"), ("throttled_time", "nr_throttled"))
                snap.throttled_s = stat["throttled_time"] / 1e9 if "throttled_time" in stat else None
            snap.throttled_periods = stat.get("nr_throttled")
            if (cores := cpu_quota(version, cpu)) is not None:
                snap.cores = min(cores, snap.cores or math.inf)
        if "cpuset" in dirs:
            version, cpuset = dirs["cpuset"]
            names = (("cpuset.cpus.effective",) if version == "v2"
                     else ("cpuset.effective_cpus", "cpuset.cpus"))
            allowed = next((n for name in names if (n := count_cpus(read_text(under(cpuset, name))))), None)
            if allowed:
                snap.cores = min(allowed, snap.cores or math.inf)
        if "memory" in dirs:
            version, memory = dirs["memory"]
            self.read_cgroup_memory(snap, memory, version)
        if "io" in dirs:
            version, io = dirs["io"]
            snap.cgroup_read, snap.cgroup_written = cgroup_io(io, version == "v2")

    def read_cgroup_memory(self, snap: Snapshot, memory: Path, version: str) -> None:
        stat = read_keyed(under(memory, "memory.stat"), ("inactive_file", "anon", "total_inactive_file",
                                                   "total_rss", "rss"))
        if version == "v2":
            usage = read_int(under(memory, "memory.current"))
            inactive, anon = stat.get("inactive_file"), stat.get("anon")
        else:
            usage = read_int(under(memory, "memory.usage_in_bytes"))
            inactive = stat.get("total_inactive_file", stat.get("inactive_file"))
            anon = stat.get("total_rss", stat.get("rss"))
        if usage is None:
            return                   # e.g. the root cgroup has no memory.current: /proc speaks for it
        snap.mem_used, snap.mem_rss = max(0, usage - (inactive or 0)), anon
        if (limit := memory_limit(version, memory, snap.mem_total)) is not None:
            snap.mem_limit = limit

    def oom_counts(self) -> tuple[int | None, int | None]:
        """The host's and the cgroup's OOM kill counts as of one moment. The kernel counts a kill on the
        host, then in its cgroup: the host's count read on both sides of the cgroup's, until it holds
        still, holds every kill the cgroup's does (one read apart, a kill between them was split in two
        events, the first said to be elsewhere on the host)."""
        def kills(path: Path) -> int | None:
            return read_keyed(path, ("oom_kill",)).get("oom_kill")

        vmstat = under(self.procfs, "vmstat")
        host = kills(vmstat)
        memory = self.cgroup and self.cgroup.dirs.get("memory")
        if not memory:
            return host, None
        version, path = memory
        events = under(path, "memory.events" if version == "v2" else "memory.oom_control")
        for _ in range(OOM_READS):
            cgroup = kills(events)
            again = kills(vmstat)
            if again == host:
                break
            host = again
        return host, cgroup

    def read_disk(self, snap: Snapshot) -> None:
        snap.disk_path = self.disk_path
        with contextlib.suppress(OSError):
            snap.disk = disk_usage(self.disk_path)
        if self.device is None:
            return
        for line in (read_text(under(self.procfs, "diskstats")) or "").splitlines():
            fields = line.split()
            if len(fields) > 9 and (int(fields[0]), int(fields[1])) == self.device:
                snap.disk_device = f"{fields[2]} ({fields[0]}:{fields[1]})"
                snap.disk_read, snap.disk_written = int(fields[5]) * 512, int(fields[9]) * 512
                return


def oom_text(kills: Mapping[str, int]) -> str:
    """OOM kills by where they were counted, as words: the host's count holds the cgroup's, so one
    kill in the cgroup is one in each."""
    inside, anywhere = kills.get("cgroup", 0), kills.get("host", 0)
    parts = [f"{inside} in its cgroup"] if inside else []
    if anywhere > inside:
        parts.append(f"{anywhere - inside} {'elsewhere on' if 'cgroup' in kills else 'on'} the host")
    return " and ".join(parts)


def own_usage(procfs: Path) -> tuple[float | None, int | None]:
    """otrace's own CPU seconds and resident bytes, from <procfs>/self/stat and statm."""
    stat_text, statm = read_text(under(procfs, "self", "stat")), read_text(under(procfs, "self", "statm"))
    cpu = rss = None
    if stat_text and ")" in stat_text:
        fields = stat_text.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS      # utime + stime
    if statm and len(statm.split()) > 1:
        rss = int(statm.split()[1]) * PAGE_SIZE
    return cpu, rss


def cgroup_io(directory: Path, v2: bool) -> tuple[int | None, int | None]:
    """Bytes read and written by the cgroup, summed over devices: v2 io.stat, v1 blkio."""
    if v2:
        text = read_text(under(directory, "io.stat"))
        if text is None:
            return None, None
        pairs = [field.split("=") for line in text.splitlines() for field in line.split()[1:]]
        return sum(int(v) for k, v in pairs if k == "rbytes"), sum(int(v) for k, v in pairs if k == "wbytes")
    for name in ("blkio.throttle.io_service_bytes_recursive", "blkio.throttle.io_service_bytes",
                 "blkio.io_service_bytes_recursive"):
        text = read_text(under(directory, name))
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
        "mem_available_bytes": None if None in (limit, cur.mem_used) else max(0, min(
            limit - cur.mem_used, cur.mem_host_available or math.inf)),
        "mem_total_bytes": cur.mem_total, "disk_path": cur.disk_path, "disk_device": cur.disk_device,
        "disk_total_bytes": total, "disk_used_bytes": disk_used, "disk_avail_bytes": avail,
        "disk_used_pct": used_pct, "disk_read_bps": rate("disk_read"), "disk_write_bps": rate("disk_written"),
        "cgroup_read_bps": rate("cgroup_read"), "cgroup_write_bps": rate("cgroup_written"),
        "self_rss_bytes": cur.self_rss,
        "self_cpu_pct": None if self_cpu is None else round(100 * self_cpu / wall, 3),
    }


OOM_WINDOW = 10.0    # seconds an OOM kill is taken as what ended a gateway seen gone (exit can be slow)


class Sampler(Loop):
    """Every TRACE_METRICS_INTERVAL: a system_metrics row through the same queue and writer as HTTP
    events, and an error event when the OOM killer struck since the last sample; with them, what the
    SystemWatch (processes, the gateway, the network) and the DNS probe saw. The first sample only
    primes the counters: a rate needs two."""

    def __init__(self, config: Config, events: EventQueue, db: Database, dns: DnsProbe | None = None,
                 processes: ProcessSampler | None = None) -> None:
        super().__init__("metrics", config.metrics_interval, first_delay=0.0)
        self.events, self.dns = events, dns
        disk_path = config.disk_path or str(Path(config.db_path).parent)
        self.host = HostReader(Path(config.procfs), Path(config.sysfs), disk_path, config.cgroup)
        self.watch = SystemWatch(config, self.log, (lambda: processes.zombies.count) if processes else
                                 (lambda: None))
        self.oom_seen = {key.split(".", 1)[1]: value for key, value in db.query(   # scope -> last count
            "SELECT key, value FROM otrace_state WHERE key LIKE 'oom_kill_count.%'")}
        self.oom_recent: collections.deque[tuple[float, dict[str, int]]] = collections.deque()  # when, kills
        self.unsent: list[Row] = []      # events of a sample the queue refused: offered with the next
        self.previous: Snapshot | None = None
        self.latest: dict[str, Any] | None = None
        self.dropped = 0

    def tick(self) -> None:
        pids, net = self.watch.read()    # first: the OOM counts read next include what ended a process
        snap = self.host.snapshot()
        rows, seen = self.oom_kills(snap)
        oom = sum((collections.Counter(kills) for _, kills in self.oom_recent), collections.Counter())
        columns, events = self.watch.observe(pids, net, dict(oom))
        events, self.unsent = self.unsent + events, []
        if self.dns is not None and (probed := self.dns.take_fresh()):
            columns["dns"] = json.dumps(probed, separators=(",", ":"))
        if self.previous is not None:
            self.latest = dict.fromkeys(METRICS.columns[3:]) | host_sample(self.previous, snap) | columns
            now = now_ms()
            values = (self.latest[column] for column in METRICS.columns[3:])   # after the ids and times
            rows.append(Row(METRICS.name, (new_id(), now, now, *values)))
        self.previous = snap
        state = tuple((STATE_SQL, (f"oom_kill_count.{scope}", count, now_ms())) for scope, count in
                      seen.items())
        if not rows and not events and not state:
            return
        if not self.events.offer(Unit(rows + events, state, own=True)):
            self.dropped += 1            # the queue is full: this sample is lost, an OOM kill is not
            self.unsent = events[-100:]
            raise Condition("queue full: host samples dropped (samples_dropped in /health)")
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
        now, window = time.monotonic(), max(OOM_WINDOW, 2 * self.interval)     # this sample and the last
        if any(kills.values()):
            self.oom_recent.append((now, {scope: n for scope, n in kills.items() if n}))
        while self.oom_recent and self.oom_recent[0][0] < now - window:
            self.oom_recent.popleft()
        if not any(kills.values()):
            return [], seen
        memory = self.host.cgroup and self.host.cgroup.dirs.get("memory")
        where = {"cgroup": str(memory[1]) if memory else None, "host": "/proc/vmstat"}
        event = own_error("oom_kill", f"OOM killer: {oom_text(kills)}", {
            "kills": kills, "counts": seen, "seen_in": {s: where[s] for s in kills}},
            severity="critical", error_type="crash")
        return [event], seen

    def health(self) -> dict[str, Any]:
        cgroup = self.host.cgroup
        return {"source": self.latest and self.latest["source"],
                "cgroup": cgroup and {res: f"{ver}:{path}" for res, (ver, path) in cgroup.dirs.items()},
                "samples_dropped": self.dropped, "last_error": self.fault.error}


# ====================================================================================== processes & network
# The process table and the network namespace, read from the files the kernel writes; every reader
# takes its procfs root, so trees captured from real machines test it, and times come from that
# root's uptime file (the clock process start times count in). The process table is scanned whole
# only on a thread of its own, every TRACE_PROC_INTERVAL (the top processes, zombies); a host sample
# lists the pids to follow the gateway and reads /proc/net (connections, traffic, errors); each DNS
# lookup runs on a thread of its own, so a resolver that hangs holds no loop longer than
# TRACE_DNS_TIMEOUT.

TCP_STATES = {"01": "established", "06": "time_wait", "08": "close_wait", "0A": "listen"}   # st, in hex
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLMSG_ERROR, NLMSG_DONE, NLM_F_REQUEST_DUMP = 2, 3, 0x301
TIME_WAIT_BIT, OTHER_STATES = 1 << 6, 1 << 1 | 1 << 8 | 1 << 10   # sock_diag's bit per TCP state
NET_RATES = {   # system_metrics column -> the kernel counters (file, section, name) it sums, per second
    "tcp_retrans_ps": (("snmp", "Tcp", "RetransSegs"),),
    "tcp_syn_retrans_ps": (("netstat", "TcpExt", "TCPSynRetrans"),),
    "tcp_attempt_fails_ps": (("snmp", "Tcp", "AttemptFails"),),
    "tcp_estab_resets_ps": (("snmp", "Tcp", "EstabResets"),),
    "tcp_out_rsts_ps": (("snmp", "Tcp", "OutRsts"),),
    "udp_in_errors_ps": (("snmp", "Udp", "InErrors"), ("snmp6", "", "Udp6InErrors")),
    "udp_no_ports_ps": (("snmp", "Udp", "NoPorts"), ("snmp6", "", "Udp6NoPorts")),
}
NET_COUNTERS = frozenset(counter for counters in NET_RATES.values() for counter in counters)
# Per namespace, with its sockets in use and in TIME_WAIT: a state changes with a segment sent or
# received, or a socket come or gone, so while they stand still the table is not walked again (but at
# least every TCP_RECOUNT s).
TCP_MARKS = tuple(("snmp", "Tcp", key) for key in ("InSegs", "OutSegs", "ActiveOpens", "PassiveOpens",
                                                     "AttemptFails", "EstabResets", "CurrEstab"))
TCP_RECOUNT = 300.0
NET_READ = NET_COUNTERS | frozenset(TCP_MARKS)        # what a sample reads of snmp and netstat ...
SNMP6_READ = tuple(key for file, _, key in NET_COUNTERS if file == "snmp6")   # ... and of snmp6
CMDLINE_READ = 8192              # bytes of a command line read (and redacted as a whole) ...
CMDLINE_KEEP = 1024              # ... and stored
TOP_RSS = 10                     # processes by memory in each process sample
DEAD = ("Z", "X")                # states of a process that has exited
REJUDGE_EVERY = 20               # host samples after which every pid is judged again (a reused pid)
EXEC_WINDOW = 60.0               # seconds a new process that did not match is watched for an exec
MAX_ZOMBIE_PARENTS = 20          # named in a zombie alert
# A name that holds one of these words, looked for first and then taken whole: a crafted argument
# costs a pass over it, not its square (and not bypass, passthrough, --session-dir, --max-tokens,
# --tokenizer, --keyboard, --author, authorized, kube's --authorization-mode, pubkey; --authorization is).
_SECRET_NAME = (r"(?=[\w.-]*?(?:token(?!s(?![a-z])|izer)|secret|(?<!by)(?<!com)(?<!sur)pass(?!thr|ive|ing"
                r"|port|age|e[sd]|enger)|pwd|(?<!pub)key(?!board)"
                r"|auth(?!or(?!ization)|enticat|orization-(?:mode|webhook|policy|config))|credential"
                r"|(?<!sa)creds?(?![a-z])|cookie|signature|session(?![\w.-])|pw(?![a-z])|jwt"
                r"|session.?(?:id|key|token|secret)))[\w.-]*+")
_SECRET_FLAG = re.compile(rf"-{{1,2}}{_SECRET_NAME}", re.IGNORECASE)     # its value is the next argument
_SECRET_ASSIGNED = re.compile(rf"(-{{0,2}}{_SECRET_NAME}\s*[=:]).+", re.IGNORECASE | re.DOTALL)  # an argument
_USER_FLAG = re.compile(r"-[uU]|--user|--proxy-user")         # curl's user:password (-U: curl's alone) ...
_USER_JOINED = re.compile(r"(--(?:proxy-)?user=|-[uU](?=[^-]))([^:]*):.+", re.DOTALL)   # ... -ualice:pw
CONTAINER_CLI = re.compile(r"docker|podman|nerdctl")           # ... not a container's uid:gid
MYSQL_CLI = re.compile(r"(?:mysql|mariadb)[\w-]*")               # -pPASSWORD, the password joined,
_DASHED_SECRET = re.compile(r"-p(?:ass(?:wd|word)?|wd|w)", re.IGNORECASE)   # not -password VALUE
CURL_CLI = re.compile(r"curl")
_NAMED_FLAG = re.compile(r"--[\w-]+|-[a-zA-Z][\w-]{3,}")   # --name mysql, -driver mysql: a value, no program
_AUTH_ARGUMENT = re.compile(r"(.*?\b(?:proxy-)?authorization\s*:\s*)((?:\w+\s+)?)\S.*",   # any scheme:
                            re.IGNORECASE | re.DOTALL)                               # Bearer, token, ...
_BEARER = (re.compile(r"\b((?:bearer|basic)\s+)(?:[\w.~+/=|:-]|%(?:2[bBfF]|3[dD]))+",   # its token, its
                      re.IGNORECASE | re.ASCII), r"\1***")                    # + / = URL-encoded too
_KEY_SHAPES = (re.compile(r"\b(?:sk|pk|rk)[-_][\w-]{16,}|\bgh[pousr]_\w{20,}|\bgithub_pat_\w{22,}"
                          r"|\bglpat-[\w-]{20,}|\bnpm_\w{36}|\bxox[abprs]-[\w-]{10,}"
                          r"|\bAIza[\w-]{30,}|\b(?:hf|gsk)_\w{30,}"
                          r"|\bAKIA[0-9A-Z]{16}\b|(?<![\w-])eyJ[\w-]{8,}+\.[\w-]{8,}+\.[\w-]{8,}+"),
               "***")                                                # API keys and JWTs, by their look
_SIGNATURE = (re.compile(r"([?&](?:sig|x-amz-signature)=)[^&\s#\"]+", re.IGNORECASE | re.ASCII),
              r"\1***")                                               # a signed URL's signature (SAS, S3)
_TELEGRAM = (re.compile(r"\bbot\d{5,}:[\w-]{30,}"), "bot***")        # a Telegram bot's token in its URL
_WEBHOOK = (re.compile(r"((?:hooks\.slack\.com/(?:services|triggers|workflows)(?:/[\w-]+)+?|discord(?:app)?"
                       r"\.com/api(?:/v\d+)?/webhooks/\d+)/)[\w-]+(?![\w/-])", re.IGNORECASE | re.ASCII),
            r"\1***")                                  # a webhook's URL: its last part is its secret
_SECRETS = (     # (pattern, replacement), applied in order to the whole command line
    _BEARER,
    (re.compile(rf"(?<![\w.-])(-{{0,2}}{_SECRET_NAME}\\?[\"']?\s*[=:]\s*)(?!(?:bearer|basic)\s|\w+ \*\*\*)"
                r"(?:\\\"(?:[^\"\\]|\\[^\"])*+(?:\\\")?|\"[^\"]*\"?|'[^']*'?|[^\s,;&\"']+)", re.IGNORECASE),
     r"\1***"),                     # JSON's "key": "v" too, escaped or not; not a masked header's scheme
    (re.compile(r"((?<![\w+.-])\w[\w+.-]*+://[^/\s:@]*:)(?!\d+(?:[/?#\s]|$))\S*?@(?=[^\s@/]*(?:[/?#\s]|$))"),
     r"\1***@"),                            # a URL's password (not a port), to the @ of its host
    (re.compile(r"(https?://)[^/\s:@]+@", re.IGNORECASE), r"\1***@"),   # a token as an http URL's user
    _SIGNATURE,
    _TELEGRAM,
    _WEBHOOK,
    _KEY_SHAPES,
)
_SECRET_VALUE = re.compile(r"((?:(?:api|auth|subscription)[_-]?key|(?:secret|private|access)[_-]?key|token"
                           r"|secret|passw(?:or)?d|passphrase|pwd|(?<=[?&])auth"
                           r"|x-auth[\w-]{0,64}+)\\?[\"']?\s*[=:]\s*)"
                           r"(\\\"(?:[^\"\\]|\\[^\"])*+(?:\\\")?|\"(?:[^\"\\]|\\.)*+\"?|'[^']*+'?"
                           r"|[^\s,;&\"'}\\]+)", re.IGNORECASE | re.ASCII)     # JSON escaped in a string too
# Its keys, with their = or :, in the lower-cased text: where _SECRET_VALUE can match. Far cheaper on a
# text with the words and no such key ("Unexpected token"): re skips to these first letters, where
# under IGNORECASE it tries every place.
_SECRET_VALUE_KEY = re.compile(r"(?:api[_-]?key|auth[_-]?key|secret[_-]?key|private[_-]?key|access[_-]?key"
                               r"|subscription[_-]?key|token|secret|passwd|password|passphrase"
                               r"|pwd|\?auth|&auth|x-auth[\w-]{0,64}+)\\?[\"']?\s*[=:]", re.ASCII)


def quoted_mask(value: str) -> str:
    """*** in place of a value, in the quotes it had: double, single, or escaped inside a JSON string."""
    quote = '\\"' if value.startswith('\\"') else value[0] if value[0] in "\"'" else ""
    return f"{quote}***{quote}"


_TEXT_SECRETS = (   # (words that must be in the lower-cased text, pattern, replacement), for prose and JSON
    (("bearer", "basic"), *_BEARER),
    (("api_key", "api-key", "apikey", "token", "secret", "passw", "pwd", "auth", "private_key", "private-key",
      "privatekey", "access_key", "access-key", "accesskey", "passphrase", "subscription-key",
      "subscription_key"),                                  # not "tokens=", "auth=x"
     _SECRET_VALUE, lambda m: m[1] + quoted_mask(m[2])),
    (("authorization", "cookie"),              # a header's whole value, to its line's end: a=1; sid="..."
     re.compile(r"((?:authorization|cookie)[\"']?\s*[=:]\s*+)(?![\"']?(?:bearer|basic)\s)"
                r"(\"(?:[^\"\\]|\\.)*+\"?|'[^']*+'?|[^\r\n]+)", re.IGNORECASE | re.ASCII),
     lambda m: m[1] + quoted_mask(m[2])),
    (("://",), re.compile(r"://([^/\s:@\"]{0,256}):(?!\d+(?:[/?#\s]|$))[^\s\"@]{0,256}@"
                          r"(?=[^\s@/]*(?:[/?#\s]|$))"), r"://\1:***@"),       # a URL's password, not a port
    (("://",), re.compile(r"://[^/\s:@\"]{1,256}@"), "://***@"),       # a token as a URL's user
    (("sig=", "signature="), *_SIGNATURE),
    (("private key-",), re.compile(r"(-----BEGIN [A-Z ]*PRIVATE KEY-----).*?(?:(-----END [A-Z ]*PRIVATE KEY"
                                   r"-----)|$)", re.DOTALL), r"\1***\2"),   # a PEM key, to its end or the end
    (("?key=", "&key=", "?pass=", "&pass="),              # a URL's pass, or its key when it looks like one
     re.compile(r"([?&](?:key=(?=[\w-]{16})|pass=))[^&\s#\"]+", re.IGNORECASE | re.ASCII), r"\1***"),
    (("bot",), *_TELEGRAM),
    (("hooks.slack.com", "discord"), *_WEBHOOK),
    (("sk-", "sk_", "pk-", "pk_", "rk-", "rk_", "gh", "github_pat_", "glpat-", "npm_", "xox", "aiza", "hf_",
      "gsk_", "akia", "eyj"),
     *_KEY_SHAPES),
)


@dataclasses.dataclass(slots=True)
class Proc:
    """One process, as its /proc/<pid>/stat shows it."""

    pid: int
    name: str
    state: str
    ppid: int
    ticks: int                   # CPU time, utime + stime, in clock ticks
    threads: int
    start: int                   # clock ticks after boot
    rss: int                     # bytes


def read_processes(procfs: Path) -> dict[int, Proc]:
    """Every process under `procfs`, from its stat file: one open and one read each, relative to the
    directory (a process that exits meanwhile is skipped)."""
    found: dict[int, Proc] = {}
    root = os.open(procfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for entry in os.listdir(root):  # noqa: PTH208 - relative to an open directory, as the opens are
            if entry.isdigit() and (proc := read_process(entry, root)):
                found[proc.pid] = proc
    finally:
        os.close(root)
    return found


def read_process(pid: str, root: int) -> Proc | None:
    """One process from its stat file, under the open procfs directory `root`; None once it is gone.
    Its name ends at the LAST ')': a name may hold ') ' itself."""
    try:
        fd = os.open(pid + "/stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=root)
        try:
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return None
    right = raw.rfind(b")")
    f = raw[right + 2:].split(None, 22)
    if right < 0 or len(f) < 22:
        return None
    return Proc(int(pid), raw[raw.find(b"(") + 1:right].decode("utf-8", "replace"),
                f[0].decode("ascii", "replace"), int(f[1]), int(f[11]) + int(f[12]), int(f[17]), int(f[19]),
                int(f[21]) * PAGE_SIZE)


def read_uptime(procfs: Path) -> float:
    """Seconds since boot, from <procfs>/uptime (the boot-time clock if it cannot be read)."""
    text = read_text(under(procfs, "uptime"))
    with contextlib.suppress(ValueError, IndexError, AttributeError):
        return float(text.split()[0])
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def read_btime(procfs: Path) -> float | None:
    """The boot time, in Unix seconds, from <procfs>/stat."""
    return read_keyed(under(procfs, "stat"), ("btime",)).get("btime")


def read_cmdline(procfs: Path, pid: int) -> tuple[bytes, ...] | None:
    """A process's arguments (its first CMDLINE_READ bytes); None if they cannot be read."""
    try:
        fd = os.open(procfs / str(pid) / "cmdline", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = b""
        while len(raw) < CMDLINE_READ and (chunk := os.read(fd, CMDLINE_READ - len(raw))):
            raw += chunk
    except OSError:
        return None
    finally:
        os.close(fd)
    return tuple(raw.rstrip(b"\0").split(b"\0")) if raw.strip(b"\0") else ()


@functools.lru_cache(maxsize=64)     # the top processes are mostly the same ones from scan to scan
def redact_cmdline(args: tuple[bytes, ...]) -> str:
    """The arguments as one line, with what looks like a secret replaced by ***: the value after a
    flag like --token or --api-key (as the next argument or after =), key=value pairs (and JSON's
    "key": "value", escaped or not) whose key names a secret, curl's user:password (-u, --user,
    --proxy-user, joined or not), mysql's -pPASSWORD (also run by sudo or docker exec), an
    Authorization header's credentials, a URL's password or token user, bearer tokens, and API keys
    and JWTs by their look."""
    words = [arg.decode("utf-8", "replace") for arg in args]
    program = words[0].rpartition("/")[2] if words else ""
    container = CONTAINER_CLI.fullmatch(program)
    curl, mysql = (next((i for i, word in enumerate(words) if cli.fullmatch(word.rpartition("/")[2]) and
                         not word.startswith("-") and not (i and _NAMED_FLAG.fullmatch(words[i - 1]))),
                        len(words)) for cli in (CURL_CLI, MYSQL_CLI))  # run by sudo -E, docker exec too
    for i, word in enumerate(words):
        if i > mysql and word.startswith("-p") and len(word) > 2 and not _DASHED_SECRET.fullmatch(word):
            words[i] = "-p***"                      # before flags: -pMyKey is no flag
        elif i + 1 < len(words) and _SECRET_FLAG.fullmatch(word):
            words[i + 1] = "***"
        elif (i + 1 < len(words) and _USER_FLAG.fullmatch(word) and (i > curl or word != "-U")
              and ":" in words[i + 1] and not (container and re.fullmatch(r"\d+:\d+", words[i + 1]))):
            words[i + 1] = words[i + 1].split(":", 1)[0] + ":***"
        elif (joined := _USER_JOINED.fullmatch(word)) and (i > curl or not word.startswith("-U")) and not (
                container and re.fullmatch(r"-u\d+:\d+", word)):
            words[i] = f"{joined[1]}{joined[2]}:***"
        elif header := _AUTH_ARGUMENT.fullmatch(word):          # its scheme kept, whatever it is
            words[i] = f"{header[1]}{header[2]}***"
        elif assigned := _SECRET_ASSIGNED.fullmatch(word):      # the whole value, spaces and all
            words[i] = assigned[1] + "***"
    line = " ".join(words)
    for pattern, replacement in _SECRETS:
        line = pattern.sub(replacement, line)
    return line


REDACT_MARGIN = 256              # bytes past a text's cut masked with it: no secret is cut in half
REDACT_DECODES = 3               # levels of URL-encoding a text is decoded through to be masked


def masked_text(text: str, limit: int) -> str:
    """Text another program wrote, cut to `limit` bytes and masked (redact_text): masked with a margin
    past the cut, so that no secret is cut in half and masking costs no more than the text kept."""
    return cut_utf8(redact_text(cut_utf8(text, limit + REDACT_MARGIN)[0]), limit)[0]


def redact_text(text: str, decodes: int = REDACT_DECODES) -> str:
    """Text another program wrote (an error it logged, with the request it quotes), with what looks
    like a secret replaced by ***: values of secret-named keys, bearer tokens, URL passwords and
    users, and API keys and JWTs by their look. A pattern runs only if its words are in the text. A
    text that holds a secret URL-encoded (a form body, a redirect URI; `decodes` levels deep at most)
    is given decoded, masked."""
    lower = text.lower()
    if holds_secret_words(lower):
        for words, pattern, replacement in _TEXT_SECRETS:
            if holds_any(lower, words) and (pattern is not _SECRET_VALUE or _SECRET_VALUE_KEY.search(lower)):
                text = pattern.sub(replacement, text)
    # masked before it is decoded: an escape in a value (password=a%26b) is of the value, not its end
    if decodes and ("%3" in lower or "%25" in lower) and (decoded := urllib.parse.unquote(text)) != text and (
            masked := redact_text(decoded, decodes - 1)) != decoded:
        return masked
    return text


def holds_any(text: str, words: tuple[str, ...]) -> bool:
    """Whether any of the words is in the text."""
    for word in words:  # noqa: SIM110 - any() over a generator costs three times this on a short text
        if word in text:
            return True
    return False


_SECRET_KEY = re.compile(r"[\w.-]*(?:(?:api|auth|private|secret|access|secret[_-]?access)[_-]?keys?|token"
                         r"|secrets?|passw(?:or)?d|(?<![a-z])pass(?:phrase)?|pwd|jwt|authorization|[_-]auth"
                         r"|cookie|credentials?)", re.IGNORECASE)
_SECRET_WORDS = tuple({word for words, _, _ in _TEXT_SECRETS for word in words}    # and every name
                      | {"authorization", "cookie", "credential", "privatekey", "private_key",   # _SECRET_KEY
                         "private-key", "accesskey", "access_key", "access-key", "pass", "jwt"})  # takes
COUNTED_SECRETS = ("secrets", "keys", "credentials", "cookies", "passwords")  # a number under these counts
_SECRET_KEY_ENDS = ("key", "keys", "token", "secret", "secrets", "passwd", "password", "pass", "passphrase",
                    "pwd", "jwt", "authorization", "auth", "cookie", "credential", "credentials")   # lowered


# The characters of the secret words, by how often they come in the gateway's log text, commonest first
_COMMON_CHARS = "easrtonid:m lcp-ufbghv/.w=yk_xjz&?"


def any_word(words: Iterable[str]) -> re.Pattern[str]:
    """A pattern that finds any of the words in one scan. re tries a match at each place that holds a
    character the pattern can start with, so each word is looked for from its rarest character (but
    its last; one not in _COMMON_CHARS is rarer still): where one is, the rest of the word after it,
    then the whole word behind. A word that holds another is left out: finding that one suffices."""
    words = set(words)
    by_anchor: dict[str, list[str]] = {}
    for word in sorted(w for w in words if not any(other != w and other in w for other in words)):
        rank = [rarity(c) for c in word[:-1] or word]
        at = rank.index(max(rank))
        behind = f"(?<={re.escape(word)})" if at else ""
        by_anchor.setdefault(word[at], []).append(re.escape(word[at + 1:]) + behind)
    return re.compile("|".join(f"{re.escape(anchor)}(?:{'|'.join(rest)})" for anchor, rest in sorted(
        by_anchor.items(), key=lambda item: rarity(item[0]))))


def rarity(char: str) -> int:
    """Where a character stands in _COMMON_CHARS, commonest first; one not there is rarest."""
    return _COMMON_CHARS.find(char) % (len(_COMMON_CHARS) + 1)


_ANY_SECRET_WORD = any_word(_SECRET_WORDS)


def holds_secret_words(lower: str) -> bool:
    """Whether any word a secret pattern needs is in the lower-cased text: most texts stop here."""
    return _ANY_SECRET_WORD.search(lower) is not None


def secret_key(key: str) -> bool:
    """Whether a key names a secret (_SECRET_KEY); an ASCII key that does not end like one is not
    (IGNORECASE matches ASCII as lower() does), without the pattern's backtracking."""
    if key.isascii() and not key.lower().endswith(_SECRET_KEY_ENDS):
        return False
    return _SECRET_KEY.fullmatch(key) is not None


def redact_json(value: Any) -> Any:
    """A structured value (parsed JSON: its keys are strings) with its strings redacted (redact_text)
    and whatever a key named like a secret holds replaced by ***: done on the value, so its JSON stays
    JSON."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list):
        return [redact_json(item) for item in value]
    if isinstance(value, dict):
        return {key: "***" if item is not None and not isinstance(item, bool) and secret_key(key)
                and not (isinstance(item, int | float) and key.lower().endswith(COUNTED_SECRETS))
                else redact_headers(item) if isinstance(item, list) and key.lower().endswith("headers")
                else redact_json(item) for key, item in value.items()}
    return value


def redact_headers(items: list[Any]) -> list[Any]:
    """A list of headers (under a key named like "headers"): Node's flat [name, value, ...], [name,
    value] pairs or {"name": ..., "value": ...} objects, a secret-named header's value masked."""
    if len(items) % 2 == 0 and all(isinstance(item, str) for item in items):
        return ["***" if i % 2 and secret_key(items[i - 1]) else redact_text(item)
                for i, item in enumerate(items)]
    return [redact_header(item) for item in items]


def redact_header(item: Any) -> Any:
    if isinstance(item, list) and len(item) == 2 and all(isinstance(part, str) for part in item):
        return [item[0], "***" if secret_key(item[0]) else redact_text(item[1])]
    if isinstance(item, dict) and isinstance(item.get("name"), str) and secret_key(item["name"]):
        return {**redact_json(item), "value": "***"}
    return redact_json(item)


def read_uid(procfs: Path, pid: int) -> int | None:
    """The real uid of a process, from the Uid: line of its status file."""
    for line in (read_text(procfs / str(pid) / "status") or "").splitlines():
        if line.startswith("Uid:"):
            with contextlib.suppress(ValueError, IndexError):
                return int(line.split()[1])
    return None


def count_fds(procfs: Path, pid: int) -> int | None:
    """Open file descriptors of a process; None when its fd directory cannot be read (another user's,
    without root)."""
    try:
        return len(os.listdir(procfs / str(pid) / "fd"))  # noqa: PTH208 - a count: no Path per entry
    except OSError:
        return None


@functools.lru_cache(maxsize=256)
def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


class ProcessTable:
    """Samples of the process table: the top processes by CPU over the interval between two scans,
    and the top TOP_RSS by resident memory, as process_samples rows (one per process, with its rank
    in each list). CPU time is told apart per process by pid and start time, so a reused pid starts
    from zero."""

    def __init__(self, procfs: Path, top: int, scrub: Callable[[str], str] = str) -> None:
        self.procfs, self.top, self.scrub = procfs, top, scrub
        self.previous: dict[tuple[int, int], int] | None = None     # (pid, start) -> ticks
        self.previous_at = 0.0
        self.btime: float | None = None
        self.count = 0

    def sample(self, procs: dict[int, Proc], at: float) -> list[Row]:
        """The rows of a scan taken at uptime `at` (none the first time: CPU needs two scans)."""
        previous, wall = self.previous, at - self.previous_at
        self.previous, self.previous_at = {(p.pid, p.start): p.ticks for p in procs.values()}, at
        self.count = len(procs)
        if previous is None or wall <= 0:
            return []
        if self.btime is None:
            self.btime = read_btime(self.procfs)
        used = {p.pid: p.ticks - previous.get((p.pid, p.start), 0) for p in procs.values()}
        by_cpu = sorted((p for p in procs.values() if used[p.pid] > 0), key=lambda p: (-used[p.pid], p.pid))
        by_rss = sorted((p for p in procs.values() if p.rss > 0), key=lambda p: (-p.rss, p.pid))
        cpu_rank = {p.pid: rank for rank, p in enumerate(by_cpu[:self.top], start=1)}
        rss_rank = {p.pid: rank for rank, p in enumerate(by_rss[:TOP_RSS], start=1)}
        received = now_ms()
        return [event_row(PROCESSES, process_row, self.describe(
            procs[pid], used[pid] / CLOCK_TICKS / wall * 100, wall, cpu_rank.get(pid), rss_rank.get(pid)),
            "otrace", received=received, max_text=CMDLINE_KEEP)
            for pid in sorted(cpu_rank.keys() | rss_rank.keys(), key=lambda pid: (
                cpu_rank.get(pid, math.inf), rss_rank.get(pid, math.inf)))]

    def describe(self, proc: Proc, cpu_pct: float, wall: float, cpu_rank: int | None,
                 rss_rank: int | None) -> dict[str, Any]:
        """One process as the event process_row takes: what its stat said, and its command line
        (redacted), user and open files."""
        args = read_cmdline(self.procfs, proc.pid)
        uid = read_uid(self.procfs, proc.pid)
        started = None if self.btime is None else round((self.btime + proc.start / CLOCK_TICKS) * 1000)
        return {"interval_s": round(wall, 3), "pid": proc.pid, "ppid": proc.ppid,
                "name": proc.name if proc.name.strip() else None,
                "cmdline": self.scrub(redact_cmdline(args)) if args else None,
                "user": None if uid is None else (user_name(uid) or str(uid)), "uid": uid,
                "state": proc.state, "cpu_pct": round(cpu_pct, 2), "rss_bytes": proc.rss,
                "threads": proc.threads, "fds": count_fds(self.procfs, proc.pid), "started_at": started,
                "cpu_rank": cpu_rank, "rss_rank": rss_rank}


class ProcessSampler(Loop):
    """Every TRACE_PROC_INTERVAL, one scan of the process table (the only one otrace makes): a
    sample of the top processes, and the zombie count (in the host samples until the next scan) with
    its alert, through the queue and the writer."""

    def __init__(self, config: Config, events: EventQueue) -> None:
        super().__init__("processes", config.proc_interval, first_delay=0.0)
        self.events, self.procfs = events, Path(config.procfs)
        self.table = ProcessTable(self.procfs, config.proc_top, Scrubber(config).own)   # its token too
        self.zombies = ZombieWatch(config.zombie_alert, self.log)
        self.samples = self.dropped = 0
        self.last_at: float | None = None

    def tick(self) -> None:
        procs, at = read_processes(self.procfs), read_uptime(self.procfs)
        alert = self.zombies.observe(procs)
        rows = self.table.sample(procs, at)
        if not rows and not alert:
            return
        if not self.events.offer(Unit(alert + rows, own=True)):
            self.dropped += 1
            self.zombies.alerted = self.zombies.alerted and not alert    # alerted again next time
            raise Condition("queue full: process samples dropped (samples_dropped in /health)")
        self.samples += bool(rows)
        self.last_at = time.time()

    def health(self) -> dict[str, Any]:
        zombies = self.zombies
        return {"interval_s": self.interval, "samples": self.samples, "processes": self.table.count,
                "last_sample_at": self.last_at and iso(self.last_at), "samples_dropped": self.dropped,
                "zombies": zombies.count, "zombie_alert_at": zombies.threshold or None,
                "zombie_alert": zombies.alerted, "last_error": self.fault.error}


class ZombieWatch:
    """Counts zombies in each scan of the process table; when there are at least TRACE_ZOMBIE_ALERT in
    two scans in a row, one error event names their parents, and the log says when the episode ends."""

    def __init__(self, threshold: int, logger: logging.Logger) -> None:
        self.threshold, self.log = threshold, logger
        self.streak = 0
        self.alerted = False
        self.count: int | None = None

    def observe(self, procs: dict[int, Proc]) -> list[Row]:
        zombies = [p for p in procs.values() if p.state == "Z"]
        self.count = len(zombies)
        if not self.threshold or len(zombies) < self.threshold:
            ended, self.streak, self.alerted = self.alerted, 0, False
            if ended:
                self.log.warning("zombie processes recovered", extra={"zombies": len(zombies),
                                                                      "alert_at": self.threshold})
            return []
        self.streak += 1
        if self.streak < 2 or self.alerted:
            return []
        by_parent = collections.Counter(p.ppid for p in zombies).most_common(MAX_ZOMBIE_PARENTS)
        parents = [{"pid": ppid, "name": procs[ppid].name if ppid in procs else None, "zombies": n}
                   for ppid, n in by_parent]
        named = ", ".join(f"{p['zombies']} of pid {p['pid']} ({p['name'] or '?'})" for p in parents)
        self.log.warning("zombie processes", extra={"zombies": len(zombies), "parents": parents})
        self.alerted = True
        return [own_error("zombie_processes", f"{len(zombies)} zombie processes in two scans in a row "
                          f"(TRACE_ZOMBIE_ALERT {self.threshold}): {named}", {
                              "zombies": len(zombies), "alert_at": self.threshold, "parents": parents,
                              "zombie_pids": sorted(p.pid for p in zombies)[:100]}, severity="warning")]


class GatewayWatch:
    """Finds the OpenClaw gateway's process at each host sample (TRACE_GATEWAY_MATCH) and reports its
    usage. A new pid or start time is a restart, a sample without it a disappearance, its return after
    that a recovery: each an error event (crash, process_crash) with the downtime (from start times),
    saying so when the OOM killer struck at that moment. A sample lists the pids and reads little:
    a pid is judged when it first shows (its stat and command line), and at each sample while it
    resembles the gateway and listens on nothing yet; the stat of a process that matched is read
    again each time, and of one under EXEC_WINDOW old (a wrapper that execs the
    gateway keeps its pid and start time: its name changes), the others' only every REJUDGE_EVERY
    samples (so a pid reused between two samples by a new gateway, while none was known, is found
    within that many)."""

    def __init__(self, match: tuple, procfs: Path, logger: logging.Logger) -> None:
        program, words = match
        self.words = [w.encode() for w in words]
        self.program = re.compile(re.escape(program) + r"(?:js)?(?:[-_.]?\d[\w.-]*)?") if program else None
        self.procfs, self.log = procfs, logger
        self.judged: dict[int, tuple[int, str, bool | None]] = {}   # pid -> (start, name, judge())
        self.starting: list[Proc] = []       # this sample's processes like it that listen on nothing yet
        self.listening: dict[str, set[str]] = {}   # this sample's listening sockets, by namespace
        self.samples = 0
        self.current: Proc | None = None
        self.seen_at = 0.0                   # uptime when it was last seen
        self.gone: Proc | None = None        # the one that disappeared, until one is back
        # gone while one like it starts (a restart?): it, the OOM kills then, and when (uptime)
        self.awaiting: tuple[Proc, dict[str, int], float] | None = None
        self.gone_seen_at = 0.0
        self.btime: float | None = None
        self.restarts = 0

    def judge(self, proc: Proc) -> bool | None:
        """The gateway: it resembles it, and it listens on a TCP port (OpenClaw's CLI commands have its
        command line, as process.title names each `openclaw-gateway`, and listen on none). None: it
        resembles it and listens on none yet (judged again at each sample)."""
        if not self.resembles(proc):
            return False
        return True if self.listens(proc.pid) else None

    def resembles(self, proc: Proc) -> bool:
        """Every word in its command line, and the program its name, argv[0] or executable."""
        args = read_cmdline(self.procfs, proc.pid)
        line = b" ".join(args or ())
        if not args or not all(w in line for w in self.words):
            return False
        if self.program is None:
            return True
        argv0 = args[0].decode("utf-8", "replace").rsplit("/", 1)[-1]
        if self.program.fullmatch(argv0) or self.program.fullmatch(proc.name):
            return True
        with contextlib.suppress(OSError):                # another user's, without root
            exe = (self.procfs / str(proc.pid) / "exe").readlink().name
            return bool(self.program.fullmatch(exe.removesuffix(" (deleted)")))
        return False

    def listens(self, pid: int) -> bool:
        """It holds a listening TCP socket (its network namespace's tcp and tcp6 say which); True when
        its descriptors cannot be read (another user's, without root): then its command line decides."""
        folder = self.procfs / str(pid) / "fd"
        try:
            names = folder.iterdir()
            sockets = set()
            for name in names:
                with contextlib.suppress(FileNotFoundError):      # closed since the listing
                    link = str(name.readlink())
                    if link.startswith("socket:["):
                        sockets.add(link[8:-1])
        except PermissionError:
            return True
        except OSError:
            return False
        if not sockets:
            return False
        own = self.procfs / str(pid) / "net"                     # its namespace's view, where there is one
        net, key = (own, "") if own.is_dir() else (self.procfs / "net", "-")
        with contextlib.suppress(OSError):
            key = str((self.procfs / str(pid) / "ns" / "net").readlink())
        if key not in self.listening:
            self.listening[key] = listening_sockets(net)         # once a sample for each namespace
        return bool(sockets & self.listening[key])

    def matching(self, pids: set[int], at: float) -> list[Proc]:
        """The live processes among `pids` that match, their stat read now (`at`: uptime)."""
        self.samples += 1
        again = self.samples % REJUDGE_EVERY == 0
        self.judged = {pid: seen for pid, seen in self.judged.items()
                       if pid in pids and (seen[2] or not again)}
        settled = (at - EXEC_WINDOW) * CLOCK_TICKS              # started before it: no exec awaited
        found, self.starting, self.listening = [], [], {}
        root = os.open(self.procfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for pid in pids:
                seen = self.judged.get(pid)
                if seen is not None and seen[2] is False and seen[0] < settled:
                    continue                                  # judged before: not the gateway
                proc = read_process(str(pid), root)
                if proc is None:
                    continue
                if seen is None or seen[0] != proc.start or seen[2] is None or (
                        not seen[2] and seen[1] != proc.name):   # new, exec'd, or not listening yet
                    verdict = self.judge(proc)
                    if verdict is False and seen and seen[2] is None and seen[0] == proc.start:
                        verdict = None           # renaming itself (process.title) rewrites its argv
                    seen = self.judged[pid] = (proc.start, proc.name, verdict)
                if seen[2] is not False and proc.state not in DEAD:
                    (found if seen[2] else self.starting).append(proc)
        finally:
            os.close(root)
        return found

    def find(self, pids: set[int], at: float) -> Proc | None:
        """The gateway: the one already known while it lives (listening or not), else the oldest match
        that listens."""
        found = self.matching(pids, at)
        if (known := self.current) is not None:
            for proc in (*found, *self.starting):
                if (proc.pid, proc.start) == (known.pid, known.start):
                    return proc
        return min(found, key=lambda p: (p.start, p.pid), default=None)

    def successor_starting(self, old: Proc) -> bool:
        """A process like the gateway that started after `old` and listens on nothing yet: the gateway
        starting again (a restart, not a disappearance), or one of OpenClaw's CLI commands run
        meanwhile, which never listens; its first listening socket tells which (waited for up to
        EXEC_WINDOW)."""
        return any(p.start > old.start for p in self.starting)

    def observe(self, pids: set[int], at: float, oom: dict[str, int]) -> tuple[dict[str, Any], list[Row]]:
        """This sample's gateway columns (usage over the interval since the last one) and events."""
        found, before = self.find(pids, at), self.current
        if self.btime is None:
            self.btime = read_btime(self.procfs)
        rows = []
        if before is not None and (found is None or (found.pid, found.start) != (before.pid, before.start)):
            if found is not None:
                rows.append(self.restarted(before, found, oom))
            elif self.successor_starting(before):          # told when it listens, or never does
                self.awaiting = (before, oom, at)
            else:
                rows.append(self.disappeared(before, at, oom))
        elif before is None and found is not None:
            if self.awaiting is not None:
                old, then, _ = self.awaiting
                rows.append(self.restarted(old, found, then))
            elif self.gone is not None:
                rows.append(self.returned(found))
            else:
                self.log.info("gateway process found", extra={"pid": found.pid})
            self.awaiting = None
        elif self.awaiting is not None and (not self.successor_starting(self.awaiting[0])
                                            or at - self.awaiting[2] > EXEC_WINDOW):
            rows.append(self.disappeared(self.awaiting[0], at, self.awaiting[1]))
            self.awaiting = None
        columns: dict[str, Any] = {"gateway_up": int(found is not None)}
        if found is not None:
            same = before is not None and before.pid == found.pid and before.start == found.start
            wall = at - self.seen_at
            used = max(0, found.ticks - before.ticks) / CLOCK_TICKS if same and wall > 0 else None
            columns |= {"gateway_pid": found.pid, "gateway_rss_bytes": found.rss,
                        "gateway_threads": found.threads, "gateway_fds": count_fds(self.procfs, found.pid),
                        "gateway_uptime_s": round(max(0.0, at - found.start / CLOCK_TICKS), 2),
                        "gateway_cpu_pct": None if used is None else round(100 * used / wall, 2)}
            self.seen_at = at
        self.current = found
        return columns, rows

    def epoch(self, uptime: float) -> str | None:
        return None if self.btime is None else iso(self.btime + uptime)

    def about(self, proc: Proc) -> dict[str, Any]:
        return {"pid": proc.pid, "started_at": self.epoch(proc.start / CLOCK_TICKS)}

    def event(self, message: str, metadata: dict[str, Any], oom: dict[str, int], severity: str) -> Row:
        if oom:
            message += f"; the OOM killer struck at that time ({oom_text(oom)})"
        level = logging.INFO if severity == "info" else logging.WARNING
        self.log.log(level, message, extra={"gateway": metadata})
        return own_error("process_crash", message, {**metadata, "oom_kill": bool(oom),
                                                    "oom_kills": oom or None}, severity=severity,
                         error_type="crash")

    def restarted(self, old: Proc, new: Proc, oom: dict[str, int]) -> Row:
        self.restarts += 1
        down = round(max(0.0, new.start / CLOCK_TICKS - self.seen_at), 2)
        how = f"pid {old.pid} gave way to pid {new.pid}" if old.pid != new.pid else \
            f"pid {new.pid} again, with a new start time"
        return self.event(f"OpenClaw gateway restarted: {how}, down at most {down} s", {
            "change": "restarted", "old": self.about(old), "new": self.about(new),
            "last_seen_at": self.epoch(self.seen_at), "downtime_s": down}, oom, "error")

    def disappeared(self, old: Proc, at: float, oom: dict[str, int]) -> Row:
        self.gone, self.gone_seen_at = old, self.seen_at
        ago = round(at - self.seen_at, 2)
        return self.event(f"OpenClaw gateway process {old.pid} is gone (last seen {ago} s before)", {
            "change": "gone", "old": self.about(old), "last_seen_at": self.epoch(self.seen_at),
            "uptime_s": round(self.seen_at - old.start / CLOCK_TICKS, 2)}, oom, "critical")

    def returned(self, new: Proc) -> Row:
        old, self.gone = self.gone, None
        self.restarts += (new.pid, new.start) != (old.pid, old.start)   # not the one that went missing
        down = round(max(0.0, new.start / CLOCK_TICKS - self.gone_seen_at), 2)
        return self.event(f"OpenClaw gateway is back as pid {new.pid}, down at most {down} s", {
            "change": "back", "old": self.about(old), "new": self.about(new),
            "last_seen_at": self.epoch(self.gone_seen_at), "downtime_s": down}, {}, "info")

    def health(self) -> dict[str, Any]:
        up = self.current
        return {"up": up is not None, "pid": up and up.pid, "restarts": self.restarts,
                "gone_since": self.gone and self.epoch(self.gone_seen_at)}


@dataclasses.dataclass
class NetSnapshot:
    """The network namespace's counters at one moment (uptime seconds); two make the rates."""

    at: float
    tcp: dict[str, int] | None = None                 # connections by state, IPv4 and IPv6
    dev: dict[str, tuple[int, int, int, int]] | None = None   # by interface: received bytes, packets; sent
    counters: dict[tuple[str, str, str], int] = dataclasses.field(default_factory=dict)


class NetReader:
    """Reads <procfs>/net: TCP connections by state (tcp, tcp6; TIME_WAIT as sockstat counts it, like
    `ss -s`: with the orphans closing in FIN_WAIT2), traffic summed over every interface but loopback
    (dev), and the error counters of snmp, netstat and snmp6. What a process sees there is its own
    network namespace: a container's. On the live /proc (`live`) the other states are counted over
    netlink instead (tcp_states_netlink): the kernel formats every socket into tcp, which takes tens of
    milliseconds once clients leave thousands of connections in TIME_WAIT. Either way the kernel walks
    its whole table, a bucket per 128 KiB of memory, so the states are counted again only when the
    namespace's sockets in use or in TIME_WAIT or its TCP_MARKS moved, or TCP_RECOUNT seconds passed."""

    def __init__(self, procfs: Path, live: bool = False, logger: logging.Logger = log) -> None:
        self.procfs, self.netlink, self.log = procfs, live, logger
        self.counted: tuple[tuple[int | None, ...], float, dict[str, int]] | None = None  # marks, at, states
        self.walks = 0

    def snapshot(self) -> NetSnapshot:
        net = under(self.procfs, "net")
        snap = NetSnapshot(read_uptime(self.procfs), None, net_dev(net))
        for name in ("snmp", "netstat"):     # before the states: a change meanwhile is counted again
            snap.counters |= keyed_rows(read_text(under(net, name)), name, NET_READ)
        snmp6 = read_keyed(under(net, "snmp6"), SNMP6_READ)
        snap.counters |= {("snmp6", "", key): value for key, value in snmp6.items()}
        tcp4 = read_keyed_row(read_text(under(net, "sockstat")), "TCP")
        tcp6 = read_keyed_row(read_text(under(net, "sockstat6")), "TCP6")
        in_use = {socket.AF_INET: tcp4.get("inuse"), socket.AF_INET6: tcp6.get("inuse")}
        time_wait = tcp4.get("tw")
        marks = (*in_use.values(), time_wait, *(snap.counters.get(key) for key in TCP_MARKS))
        known = None not in (in_use[socket.AF_INET], time_wait, *marks[3:])      # IPv6 may be off
        if (known and self.counted is not None and self.counted[0] == marks
                and 0 <= snap.at - self.counted[1] < TCP_RECOUNT):
            snap.tcp = dict(self.counted[2])
        else:
            snap.tcp = self.walk(net, in_use, time_wait)
            self.counted = None if snap.tcp is None else (marks, snap.at, dict(snap.tcp))
        if snap.tcp is not None and time_wait is not None:
            snap.tcp["time_wait"] = time_wait
        return snap

    def walk(self, net: Path, in_use: dict[int, int | None], time_wait: int | None) -> dict[str, int] | None:
        """The states from the kernel's table: over netlink, or else from tcp and tcp6."""
        self.walks += 1
        if self.netlink:
            # a family with no socket in use has none to count, and its dump walks the kernel's whole table
            families = [f for f, n in in_use.items() if n != 0 or time_wait is None]
            try:
                return tcp_states_netlink(families, with_time_wait=time_wait is None)
            except OSError as exc:
                self.netlink = False
                self.log.info("sock_diag netlink unavailable: TCP states come from /proc/net/tcp",
                              extra={"error": describe(exc)})
        return tcp_states(net)


def tcp_states(net: Path) -> dict[str, int] | None:
    """Connections by state in tcp and tcp6 (the fourth column, st, in hex); None without either."""
    counts: collections.Counter[str] = collections.Counter()
    found = False
    for name in ("tcp", "tcp6"):
        text = read_text(under(net, name))
        if text is None:
            continue
        found = True
        for line in text.splitlines()[1:]:
            fields = line.split(None, 4)
            if len(fields) > 3:
                counts[fields[3]] += 1
    return {state: counts[code] for code, state in TCP_STATES.items()} if found else None


def listening_sockets(net: Path) -> set[str]:
    """The inodes of the listening sockets in tcp and tcp6 (state 0A)."""
    found = set()
    for name in ("tcp", "tcp6"):
        for line in (read_text(under(net, name)) or "").splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":
                found.add(fields[9])
    return found


def tcp_states_netlink(families: Iterable[int] = (socket.AF_INET, socket.AF_INET6),
                       with_time_wait: bool = False) -> dict[str, int]:
    """Connections by state in this process's network namespace, over sock_diag netlink, one dump
    per family; TIME_WAIT only when asked (sockstat counts it for nothing). OSError where netlink
    cannot be had (a sandbox)."""
    counts: collections.Counter[int] = collections.Counter()
    for family in families:
        counts.update(diag_dump(family, OTHER_STATES | (TIME_WAIT_BIT if with_time_wait else 0)))
    return {name: counts[int(code, 16)] for code, name in TCP_STATES.items()}


def diag_dump(family: int, states: int) -> collections.Counter[int]:
    """TCP sockets of one family in `states` (a bit per state), counted by state."""
    order = sys.byteorder
    request = b"".join((
        (16 + 56).to_bytes(4, order), SOCK_DIAG_BY_FAMILY.to_bytes(2, order),
        NLM_F_REQUEST_DUMP.to_bytes(2, order), (1).to_bytes(4, order), bytes(4),           # nlmsghdr
        bytes((family, socket.IPPROTO_TCP, 0, 0)), states.to_bytes(4, order), bytes(48)))  # inet_diag_req_v2
    counts: collections.Counter[int] = collections.Counter()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as sock:
        sock.sendto(request, (0, 0))
        while data := sock.recv(1 << 16):
            at = 0
            while at + 16 <= len(data):
                kind = int.from_bytes(data[at + 4:at + 6], order)
                if kind == NLMSG_DONE:
                    return counts
                if kind == NLMSG_ERROR:
                    code = -int.from_bytes(data[at + 16:at + 20], order, signed=True)
                    raise OSError(code, f"sock_diag: {os.strerror(code)}")
                counts[data[at + 17]] += 1                   # idiag_state, after the 16-byte header
                at += (int.from_bytes(data[at:at + 4], order) + 3) & ~3
    return counts


def net_dev(net: Path) -> dict[str, tuple[int, int, int, int]] | None:
    """Bytes and packets received and sent, by interface but lo. Two header lines; an interface's
    name ends at its colon, with or without a space after it."""
    text = read_text(under(net, "dev"))
    if text is None:
        return None
    found = {}
    for line in text.splitlines()[2:]:
        name, colon, rest = line.partition(":")
        fields = rest.split()
        if colon and name.strip() != "lo" and len(fields) >= 10:
            found[name.strip()] = (int(fields[0]), int(fields[1]), int(fields[8]), int(fields[9]))
    return found


def read_keyed_row(text: str | None, section: str) -> dict[str, int]:
    """One line of sockstat ("TCP: inuse 4 orphan 0 tw 7 ..."): its names and values."""
    for line in (text or "").splitlines():
        name, _, rest = line.partition(":")
        if name == section:
            words = rest.split()
            return {key: int(value) for key, value in zip(words[::2], words[1::2], strict=False)
                    if value.isdigit()}
    return {}


def keyed_rows(text: str | None, name: str, wanted: Collection[tuple[str, str, str]]
               ) -> dict[tuple[str, str, str], int]:
    """The `wanted` counters (name, section, key) of snmp or netstat `name`: each section is a row of
    names and a row of values, both starting with "Section:"; which sections and columns there are
    varies with the kernel."""
    values: dict[tuple[str, str, str], int] = {}
    sections = {section for file, section, _ in wanted if file == name}
    lines = (text or "").splitlines()
    for names, numbers in zip(lines[::2], lines[1::2], strict=False):
        section, _, keys = names.partition(":")
        if section not in sections or numbers.partition(":")[0] != section:
            continue
        for key, value in zip(keys.split(), numbers.partition(":")[2].split(), strict=False):
            if (name, section, key) in wanted and value.lstrip("-").isdigit():
                values[(name, section, key)] = int(value)
    return values


def net_sample(prev: NetSnapshot, cur: NetSnapshot) -> dict[str, Any]:
    """The network columns of a system_metrics row from two snapshots: connections now, rates over
    the interval (a counter that went down was reset: 0 for that interval). Traffic is summed over
    the interfaces in both: one that came (moved into the namespace with its past on its counters)
    or went says nothing of the interval."""
    wall = cur.at - prev.at
    row: dict[str, Any] = {f"tcp_{state}": (cur.tcp or {}).get(state) for state in TCP_STATES.values()}
    both = [(prev.dev[name], now) for name, now in cur.dev.items() if name in prev.dev] \
        if prev.dev is not None and cur.dev is not None and wall > 0 else None
    for i, column in enumerate(("net_rx_bps", "net_rx_pps", "net_tx_bps", "net_tx_pps")):
        row[column] = None if both is None else round(sum(max(0, b[i] - a[i]) for a, b in both) / wall, 1)
    for column, keys in NET_RATES.items():
        moved = [cur.counters[k] - prev.counters[k] for k in keys if k in cur.counters and k in prev.counters]
        row[column] = round(sum(max(0, m) for m in moved) / wall, 3) if moved and wall > 0 else None
    return row


class SystemWatch:
    """The process and network part of each host sample: the pids (how many, and the gateway among
    them), the zombie count of the last scan of the process table, and the network counters; the
    gateway's events are offered with the sample."""

    def __init__(self, config: Config, logger: logging.Logger,
                 zombies: Callable[[], int | None] = lambda: None) -> None:
        self.procfs, self.zombies = Path(config.procfs), zombies
        self.net = NetReader(self.procfs, live=self.procfs.resolve() == Path("/proc"), logger=logger)
        self.gateway = (GatewayWatch(config.gateway_match, self.procfs, logger) if config.gateway_match
                        else None)
        self.previous: NetSnapshot | None = None

    def read(self) -> tuple[set[int] | None, NetSnapshot]:
        """The pids (None if procfs cannot be listed) and the network counters."""
        try:
            pids = {int(entry) for entry in os.listdir(self.procfs) if entry.isdigit()}  # noqa: PTH208
        except OSError:
            pids = None
        return pids, self.net.snapshot()

    def observe(self, pids: set[int] | None, net: NetSnapshot, oom: dict[str, int]
                ) -> tuple[dict[str, Any], list[Row]]:
        """This sample's columns (rates over the interval since the last one: none the first time) and
        events. `oom`: the OOM kills counted at this sample and the one before."""
        columns: dict[str, Any] = {"proc_zombies": self.zombies()}
        rows: list[Row] = []
        if pids is not None:
            columns["proc_count"] = len(pids)
            if self.gateway is not None:
                gateway, rows = self.gateway.observe(pids, net.at, oom)
                columns |= gateway
        if self.previous is not None:
            columns |= net_sample(self.previous, net)
        self.previous = net
        return columns, rows


@dataclasses.dataclass
class Lookup:
    """One getaddrinfo of a name, on a thread of its own."""

    name: str
    started: float = dataclasses.field(default_factory=time.monotonic)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    seconds: float | None = None
    outcome: str = "timeout"

    def start(self) -> Lookup:
        threading.Thread(target=self.run, name="otrace-dns-lookup", daemon=True).start()
        return self

    def run(self) -> None:
        try:
            socket.getaddrinfo(self.name, 443, proto=socket.IPPROTO_TCP)
            self.outcome = "ok"
        except socket.gaierror as exc:
            self.outcome = {socket.EAI_NONAME: "not_found", socket.EAI_AGAIN: "temporary_failure",
                            getattr(socket, "EAI_NODATA", socket.EAI_NONAME): "not_found"}.get(
                exc.errno, f"error: {exc}")
        except (OSError, UnicodeError) as exc:
            self.outcome = f"error: {describe(exc)}"
        self.seconds = time.monotonic() - self.started
        self.done.set()


class DnsProbe(Loop):
    """Every TRACE_DNS_INTERVAL, resolves each TRACE_DNS_PROBE name, all at once, each lookup on a thread
    of its own: getaddrinfo has no timeout, so the loop waits TRACE_DNS_TIMEOUT at most and leaves a
    lookup that hangs to finish alone (a name whose last lookup still hangs is not asked again meanwhile:
    it counts as timed out). Two failures in a row of a name are one network_failure event per episode;
    the log says when it resolves again."""

    FAILURES = 2

    def __init__(self, config: Config, events: EventQueue) -> None:
        super().__init__("dns", config.dns_interval, first_delay=0.0)
        self.events, self.names, self.timeout = events, config.dns_probe, config.dns_timeout
        self.lookups: dict[str, Lookup] = {}
        self.failures = dict.fromkeys(self.names, 0)
        self.alerted: set[str] = set()
        self.latest: dict[str, dict[str, Any]] = {}
        self.fresh: dict[str, dict[str, Any]] = {}   # results the next host sample has not taken yet
        self.lock = threading.Lock()
        self.probes = 0
        self.began = 0.0                 # when the last round started

    def next_delay(self) -> float:
        """The interval from the last round's start: a round that waited for a slow lookup does not
        put the next one later."""
        return max(0.0, self.interval - (time.monotonic() - self.began))

    def tick(self) -> None:
        self.began = time.monotonic()
        for name in self.names:
            last = self.lookups.get(name)
            if last is None or last.done.is_set():
                self.lookups[name] = Lookup(name).start()
        deadline = time.monotonic() + self.timeout
        for name in self.names:
            self.lookups[name].done.wait(max(0.0, deadline - time.monotonic()))
        results = {name: self.result(self.lookups[name]) for name in self.names}
        with self.lock:
            self.latest |= results
            self.fresh |= results
        self.probes += 1
        judged = [(name, row) for name, result in results.items() if (row := self.judge(name, result))]
        if judged and not self.events.offer(Unit([row for _, row in judged], own=True)):
            self.alerted.difference_update(name for name, _ in judged)      # offered again next time
            raise Condition("queue full: DNS failure events not stored yet")

    def result(self, lookup: Lookup) -> dict[str, Any]:
        if not lookup.done.is_set():
            return {"ms": None, "outcome": "timeout", "at": iso(time.time()),
                    "running_s": round(time.monotonic() - lookup.started, 3)}
        return {"ms": round(lookup.seconds * 1000, 3), "outcome": lookup.outcome, "at": iso(time.time())}

    def judge(self, name: str, result: dict[str, Any]) -> Row | None:
        """The network_failure event once a name has failed FAILURES times in a row."""
        if result["outcome"] == "ok":
            failed, self.failures[name] = self.failures[name], 0
            if name in self.alerted:
                self.alerted.discard(name)
                self.log.warning("DNS lookups recovered", extra={"host_name": name, "failed_probes": failed})
            return None
        self.failures[name] += 1
        if self.failures[name] < self.FAILURES or name in self.alerted:
            return None
        self.alerted.add(name)
        self.log.warning("DNS lookups failing", extra={"host_name": name, "outcome": result["outcome"]})
        return own_error("network_failure", f"DNS lookup of {name} failed {self.failures[name]} times in a "
                         f"row: {result['outcome']}", {"name": name, "outcome": result["outcome"],
                                                       "failures": self.failures[name],
                                                       "timeout_s": self.timeout})

    def take_fresh(self) -> dict[str, Any] | None:
        """The results since the last call (for a host sample), or None."""
        with self.lock:
            fresh, self.fresh = self.fresh, {}
        return {name: {"ms": r["ms"], "outcome": r["outcome"]} for name, r in fresh.items()} or None

    def health(self) -> dict[str, Any]:
        with self.lock:
            latest = dict(self.latest)
        return {"interval_s": self.interval, "timeout_s": self.timeout, "probes": self.probes,
                "names": {name: {**latest.get(name, {}), "failures_in_a_row": self.failures[name]}
                          for name in self.names},
                "lookups_still_running": sum(not lk.done.is_set() for lk in self.lookups.values()),
                "last_error": self.fault.error}


# ======================================================================================== gateway log
# The OpenClaw gateway's JSON log. A file is known by its device, inode and a fingerprint of its first
# bytes; how far it was read is committed in the same transaction as the events read from it, so a
# restart (even after SIGKILL) resumes exactly there: no gap, no duplicate.
# One failure, one event: each failed attempt of a run stays a log event and is counted by run in
# openclaw_attempts; the line that ends the run (model-fallback/decision) is the failure. When the
# session store is followed, its terminal error entry is the failure of record: the log then makes no
# trace and no error event, and only adds the count of failed attempts to the store's event.

LOG_UNIT_BYTES = 4 << 20         # lines read into one unit: at most this, or one line
LOG_UNIT_LINES = 1024            # and at most this many: the rows they become bound a unit first
LINE_ROWS_MOST = 2               # rows a line becomes: its log event, and a trace or an error event
FINGERPRINT_BYTES = 256
LOG_NAME = re.compile(r"openclaw(?:-(?P<profile>[\w.-]+))?-\d{4}-\d{2}-\d{2}\.log")   # not a rotated .N.log
ROTATED = re.compile(r"(?P<name>openclaw[\w.-]*?)(?:\.log)?\.\d+\.log")        # a size rotation's file
KEY_VALUE = re.compile(r"\b(\w+)=(\S+)")   # \b: each match starts a word; without, a long word costs n²
NETWORK_CODES = {"ECONNREFUSED", "ECONNRESET", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH",
                 "EPIPE", "UND_ERR_SOCKET"}
NOTICE = ("WARN", "ERROR", "FATAL")
OFFSET_SQL = ("INSERT INTO log_offsets (dev, inode, fingerprint, path, position, updated_at) "
              "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (dev, inode, fingerprint) DO UPDATE SET "
              "path = excluded.path, position = excluded.position, updated_at = excluded.updated_at")
FORGET_SQL = "DELETE FROM log_offsets WHERE dev = ? AND inode = ? AND fingerprint <> ?"   # a file's old marks
LOG_LISTED = "log_listed."       # otrace_state: when the log's directory was last listed, each file known
RUN_FAILED = "model-fallback/decision"     # its WARN line ends a run whose model calls failed
RUNS_REMEMBERED = 256                      # runs whose last failed attempt the tailer keeps in memory
_STOPPING = re.compile(r"received SIG\w+; (shutting down|restarting)")
_UNREAD = object()                         # a LogLine's JSON not parsed yet
LOG_JSON = json.JSONDecoder()
ATTEMPT_SQL = ("INSERT INTO openclaw_attempts (trace_id, run_id, outcome, created_at) VALUES (?, ?, ?, ?) "
               "ON CONFLICT (trace_id) DO NOTHING")
# A retry's row (?1) taken into its call's latest row not pushed, of those the call made before (?2, a
# JSON array): its outcome, its time, the time since the first attempt began and the attempts (?3);
# then it goes, unless each of them was pushed (it is its own row then, as the receiver holds them).
_CALL_ROW = (f"SELECT l.trace_id FROM json_each(?2) AS c JOIN llm_traces AS l ON l.trace_id = c.value WHERE "
             f"l.synced = {UNSYNCED} AND l.pushed_at IS NULL ORDER BY l.id DESC LIMIT 1")
RETRY_SQL = (
    "UPDATE llm_traces SET status = r.status, error_type = r.error_type, created_at = r.created_at, "
    "latency_ms = CASE WHEN r.latency_ms IS NULL OR llm_traces.latency_ms IS NULL THEN r.latency_ms "
    "ELSE max(r.latency_ms, r.created_at - llm_traces.created_at + llm_traces.latency_ms) END, "
    "metadata = json_set(coalesce(r.metadata, '{}'), '$.attempts', ?3) FROM (SELECT status, error_type, "
    "created_at, latency_ms, metadata FROM llm_traces WHERE trace_id = ?1) AS r "
    f"WHERE llm_traces.trace_id = ({_CALL_ROW}) RETURNING llm_traces.trace_id")
RETRIED_SQL = f"DELETE FROM llm_traces WHERE trace_id = ?1 AND EXISTS ({_CALL_ROW}) RETURNING trace_id"
RETRY_ROWS = 16                  # a call's rows a retry may be taken into: its first, and the latest
RETRY_RECALLED = 4096            # the rows a run before a restart left, looked through for failed calls
# Those calls' rows, oldest first, each with the key retry() gives its call (the run's OTel trace id is
# its answer's log event's) and the answers it holds.
FAILED_CALLS_SQL = (
    "SELECT e.otel_trace_id || '/' || l.provider || '/' || l.model, l.trace_id, "
    "coalesce(json_extract(l.metadata, '$.attempts'), 1) FROM (SELECT id, trace_id, provider, model, "
    "metadata, source, status, synced, pushed_at FROM llm_traces ORDER BY id DESC LIMIT ?) AS l "
    f"JOIN log_events AS e ON e.trace_id = substr(l.trace_id, 1, length(l.trace_id) - {len('-llm_traces')}) "
    f"WHERE l.source = 'log' AND l.status = 'error' AND l.synced = {UNSYNCED} AND l.pushed_at IS NULL "
    "AND e.otel_trace_id IS NOT NULL ORDER BY l.id")
_COUNT_ATTEMPTS = (
    "UPDATE error_events SET metadata = json_set(coalesce(metadata, '{}'), '$.failed_attempts', json(("
    "SELECT json_group_object(outcome, n) FROM (SELECT outcome, count(*) AS n FROM openclaw_attempts "
    f"WHERE run_id = ?1 GROUP BY outcome)))) WHERE <row> AND synced = {UNSYNCED} AND EXISTS (SELECT 1 FROM "
    "openclaw_attempts WHERE run_id = ?1) RETURNING trace_id")      # a pushed event is not sent twice for it
COUNT_ON_STORE_SQL = _COUNT_ATTEMPTS.replace(         # the partial index error_events_openclaw_run
    "<row>", "source = 'openclaw_session' AND json_extract(metadata, '$.run_id') = ?1")
COUNT_ON_ROW_SQL = _COUNT_ATTEMPTS.replace("<row>", "trace_id = ?2")
# The statements that change a stored row, each returning its trace_id, and their table (see Merges).
MERGED_TABLE = {CONTENT_SQL: TRACES.name, **{sql: name for (name, _), sql in MERGE_SQL.items()},
                FOLD_LOG_SQL: ERRORS.name, COUNT_ON_STORE_SQL: ERRORS.name, COUNT_ON_ROW_SQL: ERRORS.name,
                RETRY_SQL: TRACES.name}
# The statements that take a row into another, returning its trace_id, and their table: the row is no
# call of its own for /metrics, though the batch inserted it.
TAKEN_TABLE = {RETRIED_SQL: TRACES.name}


LINE_HEAD = b'{"0":'        # how every line of OpenClaw's log begins: its first argument


def log_family(name: str) -> str | None:
    """What a dated OpenClaw log's file name, or a size rotation's of one, says before the date
    ('openclaw-', 'openclaw-<profile>-'): one profile's files share it. None for another name."""
    if LOG_NAME.fullmatch(name):
        return name[:-len("YYYY-MM-DD.log")]
    rotated = ROTATED.fullmatch(name)
    if rotated and LOG_NAME.fullmatch(rotated["name"] + ".log"):
        return rotated["name"][:-len("YYYY-MM-DD")]
    return None


def whole_tail(text: bytes, tries: int = 4) -> tuple[bytes, LogLine] | None:
    """The whole log line at the end of a line that is not JSON, and what it says, if there is one: a
    writer killed in the middle of a line leaves no newline, so the next line written joins it. Only
    the last few of its starts are tried (each a parse of the rest)."""
    end = len(text)
    for _ in range(tries):
        if (at := text.rfind(LINE_HEAD, 1, end)) < 0:
            return None
        if (line := LogLine.parse(text[at:])) is not None:
            return text[at:], line
        end = at
    return None


class LogLine:
    """One line of the gateway's log (tslog JSON), as far as otrace reads it. What is not needed to
    classify a line (its time, key=value fields, structured argument) is read only when asked for:
    most lines are skipped."""

    __slots__ = ("_detail", "_fields", "_numbered", "_text", "level", "message", "obj", "subsystem")

    def __init__(self, obj: dict[str, Any]) -> None:
        meta = obj.get("_meta")
        if not isinstance(meta, dict):
            meta = {}
        name = meta.get("name")
        self.obj = obj
        self.level = str(meta.get("logLevelName") or "INFO").upper()
        self.subsystem = _subsystem(name) if isinstance(name, str) else None
        self._numbered: list[tuple[int, Any]] | None = None
        self._detail: Any = _UNREAD
        self._fields: dict[str, str] | None = None
        self._text: str | None = None
        message = obj.get("message")
        self.message = message if isinstance(message, str) else self.text   # else an older gateway's

    @property
    def text(self) -> str:
        """The text arguments, joined: the message without the structured argument's JSON."""
        if self._text is None:
            name = self.obj["_meta"].get("name") if isinstance(self.obj.get("_meta"), dict) else None
            self._text = " ".join(v for k, v in self.numbered
                                  if isinstance(v, str) and not (k == 0 and v == name))
        return self._text

    @property
    def repeats_detail(self) -> bool:
        """Whether the message is the text followed by the structured argument's JSON, as the gateway
        writes it."""
        text, opening = self.text, "{" if isinstance(self.detail, dict) else "["
        return self.message.startswith(f"{text} {opening}" if text else opening)

    @classmethod
    def parse(cls, raw: bytes) -> LogLine | None:
        """None for a line that is not a JSON object."""
        try:
            obj = log_json(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            return None
        return cls(obj) if isinstance(obj, dict) else None

    @property
    def numbered(self) -> list[tuple[int, Any]]:
        """The positional arguments "0", "1", ..., in order."""
        if self._numbered is None:
            numbered = [(n, v) for k, v in self.obj.items()    # isdigit() first: most keys are not
                        if k.isdigit() and (n := count_of(k)) is not None]
            numbered.sort(key=operator.itemgetter(0))          # "1" and "01": by number, as written
            self._numbered = numbered
        return self._numbered

    @property
    def detail(self) -> Any:
        """The structured argument, when the line has one: the lowest-numbered argument that is not a
        string (of two with one number, the first written), as `numbered` would order them."""
        if self._detail is _UNREAD:
            detail, lowest = None, None
            for key, value in self.obj.items():      # one pass, no list sorted: most lines have one
                if (not isinstance(value, str) and key.isdigit() and (n := count_of(key)) is not None
                        and (lowest is None or n < lowest)):
                    detail, lowest = value, n
            self._detail = detail
        return self._detail

    @property
    def info(self) -> dict[str, Any]:
        """The structured argument when it is an object, else {}."""
        detail = self.detail
        return detail if isinstance(detail, dict) else {}

    @property
    def fields(self) -> dict[str, str]:
        """The key=value pairs of the message."""
        if self._fields is None:
            self._fields = dict(KEY_VALUE.findall(self.message))
        return self._fields

    @property
    def time_ms(self) -> int | None:
        if logged := _log_time(self.obj.get("time")):   # _meta's date only when "time" does not read
            return logged
        meta = self.obj.get("_meta")
        return _log_time(meta.get("date") if isinstance(meta, dict) else None)

    @property
    def otel_trace_id(self) -> str | None:
        trace = self.obj.get("traceId")
        return trace if isinstance(trace, str) else None

    @property
    def session_id(self) -> str | None:
        session = self.obj.get("session_id")
        return session if isinstance(session, str) else None


def log_json(text: str) -> Any:
    """LOG_JSON.decode(text), without decode()'s two calls and two whitespace scans for a line that is a
    value with at most JSON's whitespace after it; any other line is decode()'s, to raise as it does."""
    try:
        value, end = LOG_JSON.scan_once(text, 0)      # what decode() runs when text[0] is not whitespace
    except StopIteration:                             # whitespace first, or no value at all
        return LOG_JSON.decode(text)
    if end < len(text) and text[end:].strip(" \t\n\r"):   # more than JSON's whitespace after it
        return LOG_JSON.decode(text)
    return value


@functools.lru_cache(maxsize=256)
def _subsystem(name: str) -> str:
    """The subsystem of a logger's binding ("{\\"subsystem\\":\\"gateway/reload\\"}", or a module or
    plugin), or the name itself: a handful of distinct bindings, parsed once each."""
    if name.startswith("{"):
        with contextlib.suppress(ValueError, AttributeError):
            binding = json.loads(name)
            return binding.get("subsystem") or binding.get("module") or binding.get("plugin") or name
    return name


def _log_time(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return epoch_ms(moment) if moment.tzinfo else None


def classify(line: LogLine) -> str | None:
    """The kind of event a line is (see docs/operations.md, "The gateway log"); None for a line of no
    known kind. The first rule that matches wins."""
    sub, msg, notice = line.subsystem or "", line.message, line.level in NOTICE
    if sub == "gateway":
        if msg.startswith("gateway ready"):
            return "gateway_start"
        if _STOPPING.match(msg):
            return "gateway_stop"
    elif sub == "gateway/shutdown" and msg.startswith("shutdown completed"):
        return "gateway_stopped"
    elif sub == "gateway/reload":
        if msg.startswith(("config hot reload applied", "config change requires gateway restart")):
            return "config_change"
        if msg.startswith("config reload skipped (invalid config)"):
            return "config_invalid"
    if sub.startswith("gateway/channels/") and sub.endswith("/inbound"):
        return "channel_inbound"
    if sub.endswith("/send") and "outbound send ok" in msg:
        return "channel_outbound"
    if sub == "gateway/health-monitor" and "health-monitor: restarting" in msg:
        return "channel_down"
    if sub.startswith("channels/") and "starting provider" in msg:
        return "channel_start"
    if (sub.startswith("channels/") or sub.endswith("/network")) and notice:
        return "channel_error"
    if sub == "gateway/ws" and msg.startswith("unauthorized"):
        return "auth_failure"
    if msg.startswith("[model-fetch] "):
        if msg.startswith("[model-fetch] response"):
            return "model_call"
        if msg.startswith("[model-fetch] error"):
            return "model_error"
    if (sub == "agent/embedded" and line.info.get("isError") is True) or (
            sub == RUN_FAILED and notice and line.info.get("decision") != "candidate_succeeded") or (
            sub == "diagnostic" and msg.startswith("lane task error")):
        return "model_error"
    return "other" if notice else None


def model_failure(line: LogLine, kind: str) -> dict[str, Any] | None:
    """A failed model call as an error event (llm_error), in the form /v1/errors takes; else None."""
    fields, info = line.fields, line.info
    if kind == "model_call":
        status = count_of(fields.get("status")) or 0
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
                    "timeout" if status == 408 or reason == "timeout" else
                    failure_category(info.get("error"), line.message) or "api_failure")
    else:
        return None
    preview = info.get("errorPreview")
    said = _as_text(info.get("error")) or (f"{line.message}: {preview}" if preview else line.message) or kind
    return {"error_type": "llm_error", "category": category, "severity": "error" if line.level in (
                "ERROR", "FATAL") else "warning", "message": redact_text(said),
            "provider": fields.get("provider") or info.get("provider") or info.get("candidateProvider")
            or info.get("requestedProvider"),
            "model": fields.get("model") or info.get("model") or info.get("candidateModel")
            or info.get("requestedModel"),
            "session_id": line.session_id or info.get("sessionId")}


def failure_category(*signals: Any) -> str | None:
    """The category the signals of a failed model call give (HTTP statuses, error codes and types,
    messages), checked in this order: rate_limit, network_failure, timeout, api_failure; else None."""
    text = " ".join(s for s in signals if isinstance(s, str)).lower()
    words = set(re.findall(r"[a-z0-9_]+", text))
    if "429" in words or "rate_limit" in text or "rate limit" in text:
        return "rate_limit"
    if words & {code.lower() for code in NETWORK_CODES} or "provider_transport_failure" in words or any(
            phrase in text for phrase in ("connection refused", "connection error", "fetch failed")):
        return "network_failure"
    if words & {"408", "504", "etimedout", "timeout", "aborterror", "timeouterror"} or "timed out" in text:
        return "timeout"
    if any(len(word) == 3 and word.isdigit() and word[0] in "45" for word in words):
        return "api_failure"
    return None


def attempt_outcome(line: LogLine, causes: dict[str, str]) -> tuple[str, str] | None:
    """(run id, outcome) of a failed attempt's "embedded run agent end" line: the HTTP status its
    error starts with, else the cause code of the run's last [model-fetch] error, else OpenClaw's
    failover reason. None for any other line."""
    if line.subsystem != "agent/embedded":      # most lines: no structured argument to look at
        return None
    info = line.info
    run = info.get("runId")
    if info.get("isError") is not True or not isinstance(run, str):
        return None
    preview = info.get("rawErrorPreview") or info.get("error") or ""
    status = re.match(r"([1-5]\d\d)\b", preview) if isinstance(preview, str) else None
    outcome = status[1] if status else causes.get(line.otel_trace_id or "") or info.get("failoverReason")
    return run, str(outcome or "unknown")[:MAX_NAME_CHARS]


def model_call(line: LogLine) -> dict[str, Any] | None:
    """A [model-fetch] response line as an LLM trace (no tokens: the log has none)."""
    fields = line.fields
    status = count_of(fields.get("status"))
    if not (fields.get("provider") and fields.get("model") and status is not None):
        return None
    return {"provider": fields["provider"], "model": fields["model"],
            "status": "ok" if 200 <= status < 300 else "error",
            "error_type": None if 200 <= status < 300 else f"http_{status}",
            "latency_ms": count_of(fields.get("elapsedMs")), "session_id": line.session_id,
            "metadata": {"http_status": status, "api": fields.get("api")}}


class Followed:
    """A log file being read: its descriptor, identity, and the offset of the next line to read
    (always the start of a line, and what was last committed)."""

    def __init__(self, path: str, fd: int, offset: int) -> None:
        self.path, self.fd, self.offset = path, fd, offset
        st = os.fstat(fd)
        self.dev, self.inode = st.st_dev, st.st_ino
        self.id_prefix = f"log-{self.dev:x}-{self.inode:x}-"   # of every line_id: formatted once
        self.seen = st.st_size, st.st_mtime_ns       # what the last check for a rewrite saw
        self.fingerprint = fingerprint(fd, st.st_size)
        self.replaced_at: float | None = None      # when another file took its name
        self.partial: tuple[int, bytes, int] | None = None   # an unfinished last line: start, head, end
        self.ahead: tuple[int, list[tuple[int, bytes, int]], int] | None = None   # lines read, not yet
                                                   # offered (a unit cut short): their start, them, end
        self.read = 0                              # bytes read since the tailer last counted them
        self.recorded = False                      # whether `offset` is committed for this file
        self.said: set[str] = set()                # warnings about its lines logged (once per file each)
        self.committed: str | None = None          # the fingerprint its offset was last committed under

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def rewritten(self) -> bool:
        """True when the file was truncated since the last look: it is shorter than what was read,
        or its first bytes changed (truncated, then written back to its old size or past it).
        Checked only when its size or modification time changed."""
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns) == self.seen:
            return False
        self.seen = st.st_size, st.st_mtime_ns
        length = fingerprint_length(self.fingerprint)
        return st.st_size < self.offset or (st.st_size >= length and
                                            fingerprint(self.fd, length) != self.fingerprint)

    def restart(self) -> None:
        """Read the file again from its start (it was truncated)."""
        self.offset, self.partial, self.ahead, self.recorded = 0, None, None, False
        self.fingerprint = fingerprint(self.fd, self.size())

    def line_id(self, start: int, text: bytes) -> str:
        """The trace_id of the events from a line: the same line read again gets the same one, a line
        written at the same offset after a truncation gets another."""
        return f"{self.id_prefix}{start:x}-{zlib.crc32(text):08x}"

    def refresh_fingerprint(self) -> None:
        """A file first seen shorter than FINGERPRINT_BYTES gets a longer fingerprint as it grows: an
        empty file's would match any file."""
        if fingerprint_length(self.fingerprint) < min(self.size(), FINGERPRINT_BYTES):
            self.fingerprint = fingerprint(self.fd, FINGERPRINT_BYTES)

    def lines(self, most: int, limit: int, to_end: bool = False) -> tuple[list[tuple[int, bytes, int]], int]:
        """Up to `most` whole lines from `offset` (fewer once they hold LOG_UNIT_BYTES): (start, text cut
        to `limit` bytes, full length) each, and the offset after them. Reads 64 KiB at a time; a partial
        last line waits for its newline (unless `to_end`: the file is finished), and is not read again
        while it waits; nor are lines left out of the last unit."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] == self.offset:
            return ahead[1], ahead[2]
        found: list[tuple[int, bytes, int]] = []
        held = 0
        start = self.offset
        if self.partial and self.partial[0] == start:
            pending, pos = bytearray(self.partial[1]), self.partial[2]
        else:
            pending, pos = bytearray(), start
        self.partial = None
        while len(found) < most and held < LOG_UNIT_BYTES:
            chunk = os.pread(self.fd, 65536, pos)
            self.read += len(chunk)
            if not chunk:
                if to_end and pos > start:
                    found.append((start, bytes(pending), pos - start))
                    start = pos
                elif pos > start:
                    self.partial = (start, bytes(pending), pos)
                break
            at = 0
            while at < len(chunk) and len(found) < most and held < LOG_UNIT_BYTES:
                newline = chunk.find(b"\n", at)
                if start == pos + at and at <= newline <= at + limit:   # whole in the chunk: a slice, no copy
                    found.append((start, chunk[at:newline], newline - at))
                    held += newline - at
                    start, at = pos + newline + 1, newline + 1
                    continue
                end = len(chunk) if newline < 0 else newline
                pending += chunk[at:at + max(0, min(end - at, limit - len(pending)))]
                if newline < 0:
                    at = len(chunk)
                    break
                found.append((start, bytes(pending), pos + newline - start))
                held += len(pending)
                pending.clear()
                start, at = pos + newline + 1, newline + 1
            pos += at
        return found, start


def fingerprint(fd: int, size: int) -> str:
    """"n:crc" of the file's first n bytes (n = FINGERPRINT_BYTES, or fewer in a shorter file)."""
    head = os.pread(fd, min(size, FINGERPRINT_BYTES), 0)
    return f"{len(head)}:{zlib.crc32(head):08x}"


def fingerprint_length(mark: str) -> int:
    """How many of the file's first bytes a fingerprint covers."""
    return int(mark.split(":", 1)[0])


def same_start(fd: int, mark: str) -> bool:
    """Whether the file begins as it did when `mark` was taken. Marks of otrace 0.1 hold a SHA-256."""
    length, _, digest = mark.partition(":")
    if not (length.isascii() and length.isdigit()) or len(length) > 7:   # a mark no otrace wrote (the
        return False                                                         # database edited): not it
    if len(digest) != 32:
        return fingerprint(fd, int(length)) == mark
    import hashlib  # noqa: PLC0415 - only for a database written by otrace 0.1
    return hashlib.sha256(os.pread(fd, int(length), 0)).hexdigest()[:32] == digest


class LogTailer(QuietReader):
    """Follows the gateway's log: every TRACE_LOG_POLL it reads the lines appended since the last
    commit and offers their events, with the new offset, to the queue as one unit. After a rename
    rotation it finishes the old file before moving on; a truncated file is read again from its start;
    a missing file is waited for quietly (a line when waiting starts, one when the file appears).
    `store`: the state directory of OpenClaw's session store, when followed: the store records the model
    calls and their failures, and its profile's log is the one to follow in a directory of several."""

    def __init__(self, config: Config, events: EventQueue, db: Database, store: Path | None = None) -> None:
        super().__init__("logtail", config.log_poll, config.quiet_poll, config.notified_poll, events)
        self.config, self.store_followed = config, store is not None
        # the store's profile (~/.openclaw-<profile>; "" the default's, ~/.openclaw), if it says one
        named = store is not None and (store.name == ".openclaw" or store.name.startswith(".openclaw-"))
        self.store_profile = store.name.removeprefix(".openclaw").removeprefix("-") if named else None
        self.causes: dict[str, str] = {}         # otel trace id -> cause code of its last fetch error
        self.last_outcome: dict[str, str] = {}   # run id -> outcome of its last failed attempt
        # "otel trace id/provider/model" of a call whose last answer failed -> its rows and attempts so
        # far; and the changes the unit being read makes to it, kept once the queue takes the unit
        self.failed_calls: dict[str, tuple[tuple[str, ...], int]] = {} if store is not None else (
            self.recalled_calls(db))
        self.staged_calls: dict[str, tuple[tuple[str, ...], int] | None] = {}
        self.known: dict[tuple[int, int], list[tuple[str, int]]] = {}   # (dev, inode) -> [(mark, offset)]
        folder = self.folder()
        self.followed_before = False     # this log's files were followed before: any new one is news
        # the profile whose files are followed (log_family): the store's, else the last one read, else
        # the first chosen
        self.family: str | None = None
        last_read = 0
        for dev, inode, mark, position, path, updated in db.query(
                "SELECT dev, inode, fingerprint, position, path, updated_at FROM log_offsets "
                "ORDER BY updated_at"):
            self.known.setdefault((dev % 2**64, inode % 2**64), []).append((mark, position))
            if Path(path).parent == folder:
                self.followed_before, last_read = True, max(last_read, updated)
                if self.store_profile is None:
                    self.family = log_family(Path(path).name) or self.family
        # a file of the log's written after this and never read is news: the last listing of the directory
        # whose files were all recorded (an older otrace kept none: the last read), or this start
        listed = db.query("SELECT value FROM otrace_state WHERE key = ?", (LOG_LISTED + str(folder),))
        self.since = (listed[0][0] if listed else last_read) / 1000 if self.followed_before else time.time()
        self.current: Followed | None = None
        self.chosen_by: tuple[str, ...] = ()   # what the last choice of the file to follow read
        self.unread_marks: list[tuple[str, tuple]] = []   # backlog files never read, at 0: the next unit's
        self.backlog = self.unfinished()  # files read before, with lines left: finish them first
        self.started = False
        self.waiting = False
        self.rows_most = events.reader_room // 2                # rows a unit: two units in the readers' room
        self.totals = Counters(("lines", "events", "skipped", "not_json", "cut", "unreadable", "bytes_read",
                                "failed_attempts"))

    # -- which file
    def folder(self) -> Path:
        """The directory the log's files are in."""
        path = Path(self.config.log_path)
        return path if os.path.isdir(path) else path.parent  # noqa: PTH112 - Path's raises on EACCES

    def target(self) -> str | None:
        """The file to follow now: TRACE_LOG_PATH, or the newest dated log in that directory; None
        while there is none. What the choice read goes to `chosen_by`: the file, or the directory and
        the dated logs of the newest one's day (a write to another of them can make it the newest)."""
        path = Path(self.config.log_path)
        if not os.path.isdir(path):  # noqa: PTH112 - Path's raises on EACCES
            self.chosen_by, self.family = (str(path),), self.family or log_family(path.name)
            try:
                path.stat()
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError:
                pass                     # one otrace may not look at is opened, and the fault said
            return str(path)
        dated = [p for p in path.iterdir() if LOG_NAME.fullmatch(p.name) and self.ours(p.name)]
        if self.family is None and self.store_profile is not None:     # the first choice: the store's
            dated = [p for p in dated if (log_profile(p.name) or "") == self.store_profile] or dated
        newest = max(dated, key=lambda p: (p.name[-14:], p.stat().st_mtime), default=None)
        day = newest.name[-14:] if newest else None
        self.chosen_by = (str(path), *sorted(str(p) for p in dated if p.name[-14:] == day))
        if newest and self.family is None:      # another profile's gateway may log here too: not its
            self.family = log_family(newest.name)
        return str(newest) if newest else None

    def ours(self, name: str) -> bool:
        """Whether a file in the log's directory is the followed profile's (any, until one is chosen)."""
        return self.family is None or log_family(name) in (self.family, None)

    def unfinished(self) -> list[str]:
        """The followed profile's files in the log's directory with lines otrace has not read, oldest
        first: those it read part of (rotated while otrace was down or behind), and dated or rotated
        files it never read that were written after it last listed this log, or after a file it has not
        finished was last written (rotated away unseen: twice while it was down, or while a full disk
        held it back; a day's file it was down for, the next day's there too). Those never read are
        recorded at their start with the listing's time, in the next unit (mark_unread)."""
        listed, folder = now_ms(), self.folder()
        try:
            target, names = self.target(), [p for p in folder.iterdir() if self.ours(p.name)
                                            and p.name.startswith("openclaw") and p.name.endswith(".log")]
        except OSError:
            return []
        daily = os.path.isdir(self.config.log_path)  # noqa: PTH112 - else one file, its day's alone
        found, unread = [], []
        for candidate in names:
            try:
                st = candidate.stat()
            except OSError:                  # gone since the listing: the gateway's retention
                continue
            offset = self.resume_at(str(candidate), st)
            if offset is None and (ROTATED.fullmatch(candidate.name) or (daily and LOG_NAME.fullmatch(
                    candidate.name))):
                unread.append((st.st_mtime, str(candidate), st.st_size))
            elif offset is not None and offset < st.st_size and str(candidate) != target:
                found.append((st.st_mtime, str(candidate)))
        # behind in a file: what was written after its last write is news too
        self.since = min([self.since, *(mtime for mtime, _ in found)])
        news = [(mtime, path) for mtime, path, size in unread
                if mtime > self.since and size and path != target]
        self.mark_unread(path for _, path in news)
        self.unread_marks.append((STATE_SQL, (LOG_LISTED + str(folder), listed, listed)))
        return [p for _, p in sorted(found + news)]

    def mark_unread(self, paths: Iterable[str]) -> None:
        """Files to read that otrace never read: known at offset 0 from the next commit on, so a stop
        before they are opened does not leave them unknown and older than the listing that found them."""
        for path in paths:
            try:
                fd = open_regular(path)
            except OSError:                  # gone, or not to be read: opening it will say so
                continue
            try:
                st = os.fstat(fd)
                mark = fingerprint(fd, st.st_size)
            finally:
                os.close(fd)
            self.known[(st.st_dev, st.st_ino)] = [(mark, 0)]
            self.unread_marks.append((OFFSET_SQL, (int64(st.st_dev), int64(st.st_ino), mark, path, 0,
                                                   now_ms())))

    def resume_at(self, path: str, st: os.stat_result) -> int | None:
        """The committed offset of this very file, if otrace has read it before: the newest mark
        first (one taken while the file was short may match it too)."""
        for mark, offset in reversed(self.known.get((st.st_dev, st.st_ino), [])):
            with contextlib.suppress(OSError), open(path, "rb") as f:
                if same_start(f.fileno(), mark):
                    return offset if offset <= st.st_size else 0
        return None

    def open_next(self) -> bool:
        """Open the next file to read. False while there is none yet (waiting is not a failure); a
        file that cannot be read (permissions, not a regular file) raises."""
        path = self.backlog.pop(0) if self.backlog else self.target()
        if path is None:
            was, self.started, self.waiting = self.waiting, True, True   # one appearing now is new: all read
            if not was:
                self.log.info("waiting for the gateway log", extra={"path": self.config.log_path})
            return False
        fd = open_regular(path)
        st = os.fstat(fd)
        offset = self.resume_at(path, st)
        if offset is None:   # never read: TRACE_LOG_START at the first start on this log, else all of it
            offset = (0 if self.started or self.followed_before or self.config.log_start == "beginning"
                      else line_end(fd, st.st_size, self.config.log_line_max))
        self.started, self.waiting = True, False
        self.current = Followed(path, fd, offset)
        self.log.info("following log file", extra={"file": path, "offset": offset, "size": st.st_size})
        return True

    # -- reading
    def watched(self) -> tuple[str | int, ...]:
        """What a look reads while it simply follows the file to follow: the open file, and what the
        choice of it read; nothing while it waits for a file, finishes one, or is behind."""
        followed = self.current
        if followed is None or followed.replaced_at is not None or self.backlog or self.behind:
            return ()
        return followed.fd, *self.chosen_by

    def look(self) -> None:
        if self.current is None and not self.open_next():
            return
        followed = self.current
        if followed.rewritten():                     # truncated in place: read it again from the top
            self.log.warning("log file was truncated: reading it again from its start", extra={
                "file": followed.path, "offset": followed.offset})
            followed.restart()
        read = self.drain(followed)
        if read > 0 or not self.superseded(followed):
            followed.replaced_at = None              # news, or still the file to follow
            return
        if followed.replaced_at is None:             # give a rename's last appends one more poll
            followed.replaced_at = time.monotonic()
            return
        self.drain(followed, to_end=True)
        os.close(followed.fd)
        self.log.info("finished log file", extra={"file": followed.path, "offset": followed.offset})
        self.current = None
        self.backlog = self.unfinished()
        self.open_next()

    def superseded(self, followed: Followed) -> bool:
        """Another file has taken over: `followed` came from the backlog, the day moved on to a new
        file, or a rotation renamed it away and a new file took its name."""
        target = self.target()
        if not target:              # and the file gone too (its directory removed): waiting, as at a start
            gone = not os.path.exists(followed.path)  # noqa: PTH110 - Path's raises on EACCES
            if gone and not self.waiting:
                self.log.info("waiting for the gateway log", extra={"path": self.config.log_path})
            self.waiting = gone
            return False
        if followed.path != target:
            return True
        with contextlib.suppress(OSError):
            st = Path(target).stat()
            return (st.st_dev, st.st_ino) != (followed.dev, followed.inode)
        return False

    def drain(self, followed: Followed, to_end: bool = False) -> int:
        """Offer every whole line from the file's offset: how many lines. Behind if the queue is full
        (the offset then stays, and the same lines are read again at the next look)."""
        total = 0
        while not self.stopping.is_set():
            lines, end = followed.lines(LOG_UNIT_LINES, self.config.log_line_max, to_end)
            self.totals.add("bytes_read", followed.read)
            followed.read = 0
            if not lines and followed.recorded:
                return total
            rows: list[Row] = []
            extra: list[tuple[str, tuple]] = []
            self.staged.clear()
            self.staged_calls.clear()
            for i, (start, text, length) in enumerate(lines):
                if rows and len(rows) + LINE_ROWS_MOST > self.rows_most:   # the rest in the next unit
                    followed.ahead = start, lines[i:], end
                    lines, end = lines[:i], start
                    break
                held, attempts = len(extra), self.staged["failed_attempts"]
                try:
                    rows += self.rows(followed, start, text, length, extra)
                except Exception as exc:  # noqa: BLE001 - a line otrace misreads must not hold the log
                    del extra[held:]
                    self.staged["failed_attempts"] = attempts     # its attempt is not stored either
                    self.unreadable(followed, start, exc)
            followed.refresh_fingerprint()
            file = int64(followed.dev), int64(followed.inode)
            if followed.fingerprint != followed.committed:     # one mark a file: none stale to resume at
                extra.append((FORGET_SQL, (*file, followed.fingerprint)))
            extra.append((OFFSET_SQL, (*file, followed.fingerprint, followed.path, end, now_ms())))
            self.send(rows, self.unread_marks + extra)
            self.unread_marks = []
            self.totals.add_all(self.staged)
            self.keep_staged_calls()
            followed.committed = followed.fingerprint
            self.known[(followed.dev, followed.inode)] = [(followed.fingerprint, end)]
            followed.offset, followed.recorded = end, True    # a file skipped to its end is known too
            if not lines:
                return total
            self.totals.add("lines", len(lines))
            self.news = True
            self.totals.add("events", len(rows))
            total += len(lines)
        return total

    def rows(self, followed: Followed, start: int, text: bytes, length: int,
             extra: list[tuple[str, tuple]]) -> list[Row]:
        """The rows one line becomes: a log event; without the session store, a trace for a model
        call's response and an error event for the end of a failed run. Statements that must commit
        with them (a failed attempt, its count on the failure) go to `extra`. Their trace_ids come
        from the file's identity and the line's offset, so a replay adds none."""
        if length > self.config.log_line_max:
            self.staged["cut"] += 1
            if "cut" not in followed.said:
                followed.said.add("cut")
                self.log.warning("log line over TRACE_LOG_LINE_MAX skipped (said once per file)", extra={
                    "file": followed.path, "offset": start, "bytes": length})
            return []
        line = LogLine.parse(text)
        if line is None and (torn := whole_tail(text)):   # a line cut short, the next one written after it
            self.staged["not_json"] += 1                  # the cut one's part: lost, counted as not JSON
            tail, line = torn
            start, text, length = start + len(text) - len(tail), tail, len(tail)
        if line is None:
            self.staged["not_json"] += 1
            self.log.debug("log line is not JSON", extra={"file": followed.path, "offset": start,
                                                          "bytes": length})    # its text may hold a secret
            return []
        kind = classify(line)
        if kind is None and not self.config.log_keep_all:
            self.staged["skipped"] += 1
            return []
        trace_id, received = followed.line_id(start, text), now_ms()
        logged = line.time_ms
        created = logged if logged is not None and 0 <= logged <= MAX_UNIX_MS else received
        quoted = line.level in NOTICE or kind is None   # not only OpenClaw's words: what an error quotes
        limit = self.config.max_text_bytes
        detail = self.detail_json(line.detail)
        if quoted and detail and holds_secret_words(detail.lower()):
            try:
                detail = self.detail_json(redact_json(line.detail))
            except RecursionError:               # nested deeper than the masking walks
                detail = None
        if quoted and line.detail is not None and line.repeats_detail:   # masked as JSON, not as text
            message = cut_utf8(" ".join(part for part in (masked_text(line.text, limit),
                                                          self.masked_json(line.detail)) if part), limit)[0]
        else:
            message = masked_text(line.message, limit) if quoted else cut_utf8(line.message, limit)[0]
        rows = [Row(LOGS.name, (trace_id, created, received, "log", line.level, line.subsystem,
                                kind or "info", message, detail, line.otel_trace_id, followed.path, start))]
        self.note_attempt(line, trace_id, created, extra)
        decided = kind == "model_error" and line.subsystem == RUN_FAILED
        # a candidate failed and the next is tried: the store keeps only the run's answer, if any
        candidate = decided and line.info.get("fallbackStepFinalOutcome") == "next_fallback"
        run = line.info.get("runId") if decided and isinstance(line.info.get("runId"), str) else None
        if self.store_followed and not candidate:
            if run:
                extra.append((COUNT_ON_STORE_SQL, (run,)))
            return rows
        failure = model_failure(line, kind) if decided else None
        if failure and run:
            failure["category"] = failure_category(self.last_outcome.get(run)) or failure["category"]
            failure |= {"severity": "error", "metadata": {"run_id": run}}   # that model gave no answer
            extra.append((COUNT_ON_ROW_SQL, (run, f"{trace_id}-{ERRORS.name}")))
        call = model_call(line) if kind == "model_call" else None
        if call is None and failure is None:       # most lines: their log event alone
            return rows
        if call is not None:
            self.retry(line, call, f"{trace_id}-{TRACES.name}", extra)
        for table, build, event in ((TRACES, trace_row, call), (ERRORS, error_row, failure)):
            if event is not None:
                event |= {"trace_id": f"{trace_id}-{table.name}", "created_at": created, "metadata": {
                    **(event.get("metadata") or {}), "log_file": followed.path, "log_offset": start}}
                with contextlib.suppress(Invalid):  # a line without what a trace needs stays a log event
                    rows.append(event_row(table, build, event, "log", received=received,
                                          max_text=self.config.max_text_bytes))
        return rows

    def retry(self, line: LogLine, call: dict[str, Any], row: str, extra: list[tuple[str, tuple]]) -> None:
        """A response that follows a failed one of the same run (its OTel trace id), provider and model
        is its retry: OpenClaw retries a call up to 10 times, and the call is its last answer. The retry
        is taken into the call's row (RETRY_SQL) and says how many attempts the call took."""
        if not line.otel_trace_id:
            return
        key = f"{line.otel_trace_id}/{call['provider']}/{call['model']}"
        known = self.staged_calls[key] if key in self.staged_calls else self.failed_calls.get(key)
        rows, attempts = known or ((), 0)
        if rows:
            call["metadata"]["attempts"] = attempts + 1
            before = json.dumps(rows)
            extra += [(RETRY_SQL, (row, before, attempts + 1)), (RETRIED_SQL, (row, before))]
        failed = call["status"] == "error"
        self.staged_calls.pop(key, None)          # last: the order in which the calls last failed
        self.staged_calls[key] = (call_rows(rows, row), attempts + 1) if failed else None

    @staticmethod
    def recalled_calls(db: Database) -> dict[str, tuple[tuple[str, ...], int]]:
        """The calls whose last answer failed as a run before this one left them (of its RETRY_RECALLED
        last rows), as failed_calls holds them: a retry read after a restart is taken into its call's row
        too."""
        recalled: dict[str, tuple[tuple[str, ...], int]] = {}
        for key, row, answers in db.query(FAILED_CALLS_SQL, (RETRY_RECALLED,)):
            rows, attempts = recalled.pop(key, ((), 0))        # to the end: the newest call last
            recalled[key] = call_rows(rows, row), attempts + answers
        _forget_oldest(recalled)
        return recalled

    def keep_staged_calls(self) -> None:
        """The unit read is taken: what it said of calls whose answer failed holds (a call that failed
        again goes last: the oldest failure is the first forgotten)."""
        for key, state in self.staged_calls.items():
            self.failed_calls.pop(key, None)
            if state is not None:
                self.failed_calls[key] = state
        self.staged_calls.clear()
        _forget_oldest(self.failed_calls)

    def unreadable(self, followed: Followed, start: int, exc: Exception) -> None:
        """A line whose reading raised: skipped and counted, the first of a file logged with its
        traceback (a fault of otrace's, not of the line)."""
        self.staged["unreadable"] += 1
        if "unreadable" not in followed.said:
            followed.said.add("unreadable")
            self.log.error("log line could not be read: skipped (said once per file)", exc_info=exc, extra={
                "file": followed.path, "offset": start, "error": describe(exc)})

    def note_attempt(self, line: LogLine, trace_id: str, created: int,
                     extra: list[tuple[str, tuple]]) -> None:
        """Remember a fetch error's cause for the run's next line; count a failed attempt under its
        run, once per line (a replayed line inserts nothing)."""
        if line.message.startswith("[model-fetch] error") and line.otel_trace_id:
            cause = next((c for c in (line.fields.get("causeCode"), line.fields.get("code"))
                          if c and c != "undefined"), None)
            if cause:
                self.causes[line.otel_trace_id] = cause
                _forget_oldest(self.causes)
        attempt = attempt_outcome(line, self.causes)
        if attempt is None:
            return
        run, outcome = attempt
        self.last_outcome[run] = outcome
        _forget_oldest(self.last_outcome)
        extra.append((ATTEMPT_SQL, (trace_id, run, outcome, created)))
        self.staged["failed_attempts"] += 1

    @staticmethod
    def masked_json(detail: Any) -> str:
        """A structured argument's JSON, masked as a whole and then cut with the text it follows (the
        detail column's own form may be a marker of its size): empty if it cannot be written."""
        try:
            return COMPACT_JSON.encode(redact_json(detail))
        except (ValueError, RecursionError):
            return ""

    def detail_json(self, detail: Any) -> str | None:
        if detail is None:
            return None
        try:
            return compact_json(detail, self.config.max_text_bytes)[0]
        except (ValueError, RecursionError):     # an infinity, or nested beyond what JSON can write
            return None

    def health(self) -> dict[str, Any]:
        followed = self.current
        size = followed.size() if followed else None
        return {"path": self.config.log_path, "file": followed and followed.path, "waiting": self.waiting,
                "polls": self.ticks, "notified": self.notified(),
                "offset": followed and followed.offset,
                # a file shorter than what was read was truncated: all of it is to be read again
                "lag_bytes": followed and (size - followed.offset if size >= followed.offset else size),
                **self.totals.snapshot(), "last_error": self.fault.error}


def call_rows(rows: tuple[str, ...], row: str) -> tuple[str, ...]:
    """A call's rows a retry may be taken into, with one more: the first stays a candidate (it takes
    every retry while it is not pushed), and the latest RETRY_ROWS - 1."""
    return (*rows, row) if len(rows) < RETRY_ROWS else (rows[0], *rows[2 - RETRY_ROWS:], row)


def _forget_oldest(memory: dict[str, Any]) -> None:
    """Keep a per-run memory to RUNS_REMEMBERED entries (dicts keep insertion order)."""
    while len(memory) > RUNS_REMEMBERED:
        del memory[next(iter(memory))]


def open_regular(path: str) -> int:
    """A descriptor of `path` for reading, which must be a regular file: never waits on a FIFO with
    no writer, never reads /dev/zero forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return fd


def line_end(fd: int, size: int, limit: int) -> int:
    """The offset just after the last newline in the file's last `limit` bytes (where "the end" starts
    for a new reader; a last line longer than that is skipped)."""
    tail = os.pread(fd, min(size, limit), max(0, size - limit))
    newline = tail.rfind(b"\n")
    return size - len(tail) + newline + 1 if newline >= 0 else size


# ================================================================================== openclaw sessions
# OpenClaw's session store: every model call OpenClaw made, with the tokens and cost it computed from
# its own price config. Agents are found under <state dir>/agents/*/ at every poll. An agent keeps its
# transcripts in agent/openclaw-agent.sqlite, read through SQLite (rows still in the gateway's WAL are
# seen) on a read-only connection, session by session, in short transactions; an older OpenClaw's, in
# sessions/<session>.jsonl files, followed like the gateway log (operations.md names the versions).
# An assistant entry becomes one llm_traces row, a failed call or run also an error event. A session's
# position (its rewrite generation, last seq, newest entry) or a file's (identity, offset) commits with
# the rows it produced.

STORE_SOURCE = "openclaw_session"
_ERROR_METADATA = ERRORS.columns.index("metadata")
_TRACE_SESSION, _TRACE_CREATED = TRACES.columns.index("session_id"), TRACES.columns.index("created_at")
STORE_LINE_LIMIT = 8 << 20       # an entry is at most 4 MiB in the database; a longer JSONL line is cut
STORE_CACHE_KIB = 512            # page cache of each agent database's connection
STORE_BUSY_MS = 1000             # longest wait for a lock the gateway holds; then the next poll tries
REWRITE_SLACK_MS = 60_000        # after a session is rewritten, entries older than the newest read by
                                 # more than this are ones otrace has seen (a clock step is tolerated)
REREAD = "+again"                # in a session mark while it is read again from its start: then the seq
                                 # it had been read to in that generation follows
INODE_KEY = "openclaw_db_inode."  # otrace_state: the inode of an agent's database, by agent
STORE_LIST_EVERY = 30.0          # seconds: every session is listed at least this often while commits come
STORE_MADE_GRACE = 10.0          # seconds an agent database may stay without its tables: OpenClaw makes the
                                 # file, then them at once; one left so (0 bytes, another schema) is a fault
FAILED_BEFORE_REPLY = "run-failed-before-reply"
TRANSCRIPT_ONLY = ("delivery-mirror", "gateway-injected")   # "models" of provider openclaw: no call
NO_REPLY = "[assistant turn failed before producing content]"   # a failed call's content up to 2026.7
CHECKPOINT_FILE = re.compile(r".+\.checkpoint\.[0-9a-fA-F-]{36}\.jsonl")   # a copy of a transcript
# a session file OpenClaw renamed when it reset or deleted the session (a compressed one is not read)
ARCHIVED_FILE = re.compile(r"(.+)\.jsonl\.(?:reset|deleted)\.[^/]+(?<!\.zst)")
# OpenClaw's usage spans stored while its session store was not read (it was not there, or off) are
# superseded by the store's calls of the same session and time: one call, one row. A span covers a
# run, from before its first call starts.
USAGE_SUPERSEDED_SQL = (
    "DELETE FROM llm_traces WHERE source = 'otlp' AND session_id = ?1 AND created_at BETWEEN ?2 - 86400000 "
    "AND ?3 + 60000 AND created_at + coalesce(latency_ms, 0) >= ?2 - 60000 "
    f"AND json_extract(metadata, '$.span_name') = '{OPENCLAW_USAGE}'")
# The sessions that have such rows, read once at start: none are stored while the store is followed.
USAGE_SESSIONS_SQL = ("SELECT DISTINCT session_id FROM llm_traces WHERE source = 'otlp' AND session_id "
                      f"IS NOT NULL AND json_extract(metadata, '$.span_name') = '{OPENCLAW_USAGE}'")
POSITION_SQL = ("INSERT INTO openclaw_positions (agent, stream, mark, position, newest, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (agent, stream) DO UPDATE SET mark = excluded.mark, "
                "position = excluded.position, newest = excluded.newest, updated_at = excluded.updated_at")
# Each session with its last seq and rewrite generation, one index seek per session (a loose index
# scan of the primary key): no scan of the entries themselves.
SESSIONS_SQL = """
    WITH RECURSIVE sessions(id) AS (
        SELECT min(session_id) FROM transcript_events
        UNION ALL
        SELECT (SELECT min(session_id) FROM transcript_events WHERE session_id > sessions.id)
        FROM sessions WHERE sessions.id IS NOT NULL)
    SELECT id, (SELECT max(seq) FROM transcript_events WHERE session_id = sessions.id), {generation}, NULL
    FROM sessions WHERE id IS NOT NULL"""
# The sessions with rows past a rowid, and the lowest seq among those rows: a search of the table by
# rowid, never a scan of the store.
ADDED_SQL = """
    SELECT id, (SELECT max(seq) FROM transcript_events WHERE session_id = added.id), {generation}, low
    FROM (SELECT session_id AS id, min(seq) AS low FROM transcript_events NOT INDEXED WHERE rowid > ?
          GROUP BY session_id) AS added"""
# The row with the highest rowid, and the row at a rowid, known by their content too: one deleted and
# stored again at the same rowid, seq and millisecond differs only there.
ROW_SQL = "SELECT rowid, session_id, seq, created_at, CAST({content} AS BLOB) FROM transcript_events {which}"
# A session reset or deleted: its transcript moved, in the transaction that deleted its entries, into
# an archive row (its JSONL, plain or zstd), one a (session, generation). The archives after a rowid,
# what names the one at it, and one archive's transcript.
ARCHIVES = "#archives"           # openclaw_positions: how far an agent's archives were looked through
ARCHIVED = "#archived\t"         # ... and, with the session and generation after it, one archive read
TOP = "#top"                     # ... and the row at the top when every session was read to it, for a restart
ARCHIVES_SQL = ("SELECT rowid, session_id, generation, archive_sha256 FROM session_transcript_archives "
                "WHERE rowid > ? ORDER BY rowid LIMIT 64")
ARCHIVE_MARK_SQL = ("SELECT session_id || char(9) || generation || char(9) || archive_sha256 "
                    "FROM session_transcript_archives WHERE rowid = ?")
ARCHIVE_SQL = ("SELECT encoding, archive_sha256, {} FROM session_transcript_archives "
               "WHERE session_id = ? AND generation = ?")
# Every archive there is, by name: a scan of the primary key's index, never of the transcripts.
ARCHIVE_NAMES_SQL = "SELECT session_id, generation FROM session_transcript_archives"
# The tables in which OpenClaw keeps something of a session while it may still give entries: its
# entries, its rewrite generation, its window, its transcript moved to cold storage (each by session).
SESSION_TABLES = ("transcript_events", "transcript_rewrite_watermarks", "session_windows",
                  "session_transcript_cold_archives")
# Of a JSON list of sessions, those one of them still holds: one index seek a session and table.
KNOWN_SQL = "SELECT value FROM json_each(?) WHERE {}"
FORGET_POSITION_SQL = "DELETE FROM openclaw_positions WHERE agent = ? AND stream = ?"
PART = "+part"                   # an archive's mark while it is read: the lines up to its place are done
ZSTD_MAGIC, ZSTD_SKIPPABLE = 0xFD2FB528, 0x184D2A50   # a zstd frame's first 4 bytes; a skippable one's
GENERATION_SQL = "SELECT generation FROM transcript_rewrite_watermarks WHERE session_id = {}"
# Entries after a seq, up to the look's top rowid (where there are rowids: a row past it is the next
# look's, which searches past the top); the text only of those that can be a call or a failure (the rest
# are skipped inside SQLite), compressed ones whole.
ENTRIES_SQL = """
    SELECT seq, created_at,
        CASE WHEN instr(event_json, '"assistant"') OR instr(event_json, 'run-failed-before-reply')
            THEN event_json END,
        {compressed}
    FROM transcript_events WHERE session_id = ?1 AND seq > ?2{topped} ORDER BY seq LIMIT ?3"""


def openclaw_state_dir(setting: str, environ: Mapping[str, str] = os.environ,
                       gateway_here: bool = False, log_path: str = "") -> Path | None:
    """The state directory TRACE_OPENCLAW_STATE_DIR names: a path as given; auto: $OPENCLAW_STATE_DIR
    if set, else ~/.openclaw of this user when it exists, or when otrace follows the gateway's log
    (`gateway_here`: a store the gateway makes later must not find its calls already stored from
    OpenClaw's spans and log); ~/.openclaw-<profile> instead when the log followed (TRACE_LOG_PATH's
    file, or the newest in its directory) is an OpenClaw profile's and that directory exists. None for
    off, or auto finding neither."""
    if setting == "off":
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    if environ.get("OPENCLAW_STATE_DIR"):
        return Path(environ["OPENCLAW_STATE_DIR"]).expanduser()
    try:
        home = Path.home() / ".openclaw"
    except (RuntimeError, KeyError):       # no $HOME and a uid the password database does not know
        return None
    with contextlib.suppress(OSError):
        logs = Path(log_path)
        dated = [p for p in logs.iterdir() if LOG_NAME.fullmatch(p.name)] if logs.is_dir() else [logs]
        newest = max(dated, key=lambda p: (p.name[-14:], p.stat().st_mtime), default=None)
        profile = newest and log_profile(str(newest))
        if profile and (mine := state_dir_of(home, profile)).is_dir():
            return mine
    return home if gateway_here or home.is_dir() else None


def state_dir_of(home: Path, profile: str | None) -> Path:
    """Where OpenClaw keeps a profile's state, next to ~/.openclaw (`home`), the default profile's."""
    return home.with_name(f".openclaw-{profile}") if profile else home


def log_profile(path: str | None) -> str | None:
    """The OpenClaw profile whose gateway writes the log file at `path` (openclaw-<profile>-DATE.log),
    its name as OpenClaw writes it there undone ('-' is '--', '_' '-0', a capital '-1' and the letter,
    another character '-2', its code in hex and '-'); None for the default profile, or a name written
    as a hash."""
    match = LOG_NAME.fullmatch(Path(path).name) if path else None
    written = match and match["profile"]
    if not written:
        return None
    name, at = [], 0
    try:
        while at < len(written):
            if written[at] != "-":
                name.append(written[at])
                at += 1
            elif (code := written[at + 1]) in "-0":
                name.append("-" if code == "-" else "_")
                at += 2
            elif code == "1":
                name.append(written[at + 2].upper())
                at += 3
            elif code == "2":
                end = written.index("-", at + 2)
                name.append(chr(int(written[at + 2:end], 16)))
                at = end + 1
            else:
                return None
    except (IndexError, ValueError):
        return None
    return "".join(name)


def store_trace_id(agent: str, session: str, entry: str) -> str:
    """The trace_id of an entry's rows: the entry read again (after a restart, a rewrite of its session,
    from a copy of the store) gets the same one, so the UNIQUE trace_id keeps one row. Readable when it
    fits; else the agent and a 96-bit digest of the three (hashlib would map OpenSSL)."""
    whole = f"oc:{agent}:{session}:{entry}"
    if len(whole) <= MAX_TRACE_ID_CHARS and whole.isprintable():
        return whole
    raw = whole.encode("utf-8", "surrogatepass")
    digest = f"{zlib.crc32(raw):08x}{zlib.crc32(raw[::-1]):08x}{zlib.adler32(raw):08x}"
    return f"oc:{''.join(c for c in agent if c.isprintable())[:64]}:{digest}"


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT else None


def _name(value: Any) -> str | None:
    return value[:MAX_NAME_CHARS] if isinstance(value, str) and value.strip() else None


def _text(content: Any) -> str | None:
    """The text of a message's content: a string, or its text blocks joined."""
    if isinstance(content, str):
        return content or None
    if isinstance(content, list):
        parts = [b["text"] for b in content if isinstance(b, dict) and b.get("type") == "text"
                 and isinstance(b.get("text"), str)]
        return "".join(parts) or None
    return None


def entry_time(entry: dict[str, Any]) -> int | None:
    """When the entry's call started (message.timestamp, Unix ms), else when the entry was written."""
    message = entry.get("message") if isinstance(entry.get("message"), dict) else {}
    stamp = message.get("timestamp")
    if _finite(stamp) and 0 <= stamp <= MAX_UNIX_MS:
        return int(stamp)
    return _log_time(entry.get("timestamp"))


def store_events(entry: Any, agent: str, session: str, fallback_id: str, max_text: int
                 ) -> list[tuple[Table, Callable[[Fields, int, str], tuple], dict[str, Any]]]:
    """What one transcript entry becomes, as (table, row builder, event): an assistant message (one
    model call) a trace, and when it failed an error event with the same trace_id; a run that failed
    before any reply an error event; any other entry (user messages, tool results, OpenClaw's own
    transcript-only messages) nothing. An error's text is masked as the gateway log's is, and cut to
    `max_text` bytes."""
    if not isinstance(entry, dict):
        return []
    message = entry.get("message") if isinstance(entry.get("message"), dict) else {}
    entry_id = entry["id"] if isinstance(entry.get("id"), str) and entry["id"] else fallback_id
    trace_id, created = store_trace_id(agent, session, entry_id), entry_time(entry)
    if entry.get("customType") == FAILED_BEFORE_REPLY:
        details = entry.get("details") if isinstance(entry.get("details"), dict) else {}
        error = details.get("error") if isinstance(details.get("error"), str) else None
        text = _text(entry.get("content")) or error or "the run failed before a reply"
        return [(ERRORS, error_row, {
            "trace_id": trace_id, "created_at": created, "error_type": "llm_error",
            "category": failure_category(error, text) or "other", "message": masked_text(text, max_text),
            "session_id": session,
            "metadata": {"agent_id": agent, "run_id": _name(details.get("runId")), "entry_id": entry_id}})]
    if entry.get("type") != "message" or message.get("role") != "assistant":
        return []
    provider, model = _name(message.get("provider")), _name(message.get("model"))
    if (provider == "openclaw" and model in TRANSCRIPT_ONLY) or isinstance(
            message.get("openclawDeliveryMirror"), dict):
        return []
    usage = message.get("usage") if isinstance(message.get("usage"), dict) else {}
    cost = usage.get("cost") if isinstance(usage.get("cost"), dict) else {}
    fresh, read = _count(usage.get("input")), _count(usage.get("cacheRead"))
    write = _count(usage.get("cacheWrite"))
    internal = message.get("__openclaw") if isinstance(message.get("__openclaw"), dict) else {}
    stored = _log_time(entry.get("timestamp"))
    failed = message.get("stopReason") == "error" or (      # a turn that timed out is stored aborted
        message.get("stopReason") == "aborted" and isinstance(message.get("errorMessage"), str)
        and bool(message["errorMessage"]))
    code = message.get("errorCode")          # a word or a number as OpenClaw writes it; masked as its text is
    code = None if code is None else _name(redact_text(code if isinstance(code, str) else json.dumps(code)))
    kind = _name(redact_text(message["errorType"])) if isinstance(message.get("errorType"), str) else None
    reply = _text(message.get("content"))
    metadata = {"agent_id": agent, "run_id": _name(internal.get("runId")), "entry_id": entry_id,
                "response_id": _name(message.get("responseId")), "api": _name(message.get("api")),
                # from the call's start to OpenClaw storing its entry: the call plus OpenClaw's own
                # work after it, so an upper bound on the latency, not the latency
                "stored_after_ms": stored - created if stored is not None and created is not None
                and stored >= created else None}
    trace = {"trace_id": trace_id, "created_at": created, "provider": provider or "unknown",
             "model": model or "unknown", "status": "error" if failed else "ok",
             "error_type": (kind or code) if failed else None,
             "finish_reason": _name(message.get("stopReason")), "session_id": session,
             # the prompt counts the cache's tokens too; without its fresh ones it is unknown, not the cache's
             "prompt_tokens": None if fresh is None else fresh + (read or 0) + (write or 0),
             "completion_tokens": _count(usage.get("output")),
             "total_tokens": _count(usage.get("totalTokens")),
             "cache_read_tokens": read, "cache_write_tokens": write,
             "reasoning_tokens": _count(usage.get("reasoningTokens")),
             "cost_usd": cost.get("total") if _finite(cost.get("total")) and cost["total"] >= 0 else None,
             "output_text": None if failed and reply == NO_REPLY else reply,
             "metadata": {k: v for k, v in metadata.items() if v is not None}}
    if not failed:
        return [(TRACES, trace_row, trace)]
    listed = message.get("diagnostics")
    diagnostics = [d.get("type") for d in listed if isinstance(d, dict)] if isinstance(listed, list) else []
    text = message.get("errorMessage") if isinstance(message.get("errorMessage"), str) else None
    said = masked_text(text, max_text) if text else None   # a provider's error may quote its request
    error = {"trace_id": trace_id, "created_at": created, "error_type": "llm_error",
             "category": failure_category(code, kind, *diagnostics, text) or "other",
             "message": said or f"model call failed ({kind or code or 'no reason given'})",
             "provider": trace["provider"], "model": trace["model"], "session_id": session,
             "metadata": {k: v for k, v in {**metadata, "error_code": code, "error_type": kind}.items()
                          if v is not None}}
    return [(TRACES, trace_row, trace), (ERRORS, error_row, error)]


def maybe_call(text: str) -> bool:
    """Whether an entry's JSON can be an assistant message or a failed run: the cheap test that spares
    parsing user messages and tool results."""
    return '"assistant"' in text or FAILED_BEFORE_REPLY in text


@dataclasses.dataclass(frozen=True, slots=True)
class Cursor:
    """How far a session (or session file) was read: its mark (a session's rewrite generation; a
    file's device, inode and fingerprint), the last seq read (a file's offset), and the newest entry
    time read."""

    mark: str
    position: int
    newest: int | None

    def fresh(self, created: int | None) -> bool:
        """Whether an entry met again after a rewrite can be one not read before."""
        return self.newest is None or created is None or created >= self.newest - REWRITE_SLACK_MS

    @property
    def again(self) -> bool:
        """The session is being read again from its start (see SessionStore.read_session)."""
        return REREAD in self.mark

    def read_again(self) -> Cursor:
        """The session to be read again from its start, the seq it was read to kept in the mark."""
        generation, _, past = self.mark.partition(REREAD)
        return Cursor(f"{generation}{REREAD}{past or self.position}", -1, self.newest)

    def resumed(self) -> tuple[Cursor, int]:
        """A session being read again: how far this reading got, and the seq it had been read to
        before in that generation (-1 if not known: a mark an earlier otrace kept)."""
        generation, _, past = self.mark.partition(REREAD)
        return Cursor(generation, self.position, self.newest), int(past or -1)


class AgentDatabase:
    """One agent's openclaw-agent.sqlite, read on a read-only connection kept between polls with no
    transaction open between them: a poll first asks SQLite whether anyone committed since the last
    look (PRAGMA data_version), and only then which sessions have new entries: those with rows added
    since (SQLite gives a new row a rowid above every other). Every session is listed at the first
    look, at the first look after the commits stop, and every STORE_LIST_EVERY while they go on, so a
    row that took the rowid of one deleted meanwhile is found too. A file replaced at the path is
    opened again, and so is one whose files changed by more than the commits SQLite tells the
    connection of (a checkpoint; a backup copied over it, its -wal or -shm removed), its sessions'
    places checked against it; one not there yet (before the agent's first turn) is waited for."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files = (str(path), f"{path}-wal")   # what a look reads: the gateway's rows wait in the WAL
        self.conn: sqlite3.Connection | None = None
        self.identity: tuple[int, int] | None = None
        self.stamp: tuple[Any, ...] = ()         # the files under the connection as last looked at
        self.known: tuple[int, int] | None = None   # the file last read, kept while there is none
        self.replaced = False                    # another file than that one: every session read again
        self.gone = False                        # read, then no longer at the path (deleted, moved away)
        self.checked = False                     # the cursors checked against this connection's file
        self.listed: int | None = None           # data_version when every session was last caught up
        self.seen: int | None = None             # data_version at the last look that caught up ...
        self.top: tuple | None = None            # ... and the row with the highest rowid then
        self.listed_at = -math.inf
        self.looking: tuple[int, tuple | None, bool] = (0, None, True)   # the look under way: the same three
        self.sessions_sql = self.added_sql = self.entries_sql = self.top_sql = self.row_sql = ""
        self.generation_sql = self.known_sql = ""
        self.archives = False                    # the database has session_transcript_archives
        self.making = False                      # a file without its tables yet: looked at again soon

    def open(self, tries: int = 3) -> bool:
        """Connect (again, when the file at the path is another one); False while there is no file,
        or no transcript table in it yet (a Condition once it has stayed so, see unmade), or while the
        files at the path were replaced under each of `tries` connections (the next look tries again)."""
        stamp = self.stamped()
        if stamp[0] is None:
            self.gone = self.gone or self.conn is not None
            self.close()
            return False
        if self.conn is not None and stamp == self.stamp:   # the same file, changed only by commits
            return True
        identity = stamp[0][:2]
        self.close()
        for file in (str(self.path), f"{self.path}-wal"):     # SQLite would wait on a FIFO for good
            with contextlib.suppress(FileNotFoundError):
                os.close(open_regular(file))
        conn = sqlite3.connect(sqlite_uri(self.path, "ro"), uri=True, timeout=STORE_BUSY_MS / 1000,
                               isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {STORE_BUSY_MS}")
            conn.execute(f"PRAGMA cache_size = -{STORE_CACHE_KIB}")
            conn.execute("PRAGMA query_only = 1")
            tables = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
            columns = {row[1] for row in conn.execute("PRAGMA table_info(transcript_events)")}
        except sqlite3.Error as exc:
            conn.close()
            if sqlite_code(exc) in ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM"):
                raise PermissionError(f"{describe(exc)}: a reader of a WAL database must be able to "
                                      "create or write its -shm beside it; run otrace as the gateway's "
                                      "user") from None
            raise
        # the files as the connection holds them: the database opened at connect, its -wal and -shm at
        # the first read (which made them if they were not there). One moved in or removed at the path
        # between the stat above and now (a state directory moved in) leaves unknown which ones it holds:
        # stamped as its own, the files at the path would keep it on a file gone from there, seeing no
        # commit again (or on one file's pages and another's -wal). Opened again on them, at once.
        after = self.stamped()
        if after[0] is None or after[0][:2] != identity or any(
                was is not None and was != now for was, now in zip(stamp[1:], after[1:], strict=True)):
            conn.close()
            if after[0] is None:                  # removed meanwhile: as if not there at the stat
                self.gone = self.gone or self.known is not None
                return False
            return tries > 1 and self.open(tries - 1)
        if "transcript_events" not in tables:
            conn.close()
            self.unmade(stamp[0][3])
            return False
        rewrites = "transcript_rewrite_watermarks" in tables
        self.sessions_sql = SESSIONS_SQL.format(generation=f"({GENERATION_SQL.format('sessions.id')})"
                                                if rewrites else "NULL")
        rowids = "WITHOUT ROWID" not in (tables["transcript_events"] or "").upper()
        self.added_sql = ADDED_SQL.format(generation=f"({GENERATION_SQL.format('added.id')})" if rewrites
                                          else "NULL") if rowids else ""
        self.entries_sql = ENTRIES_SQL.format(compressed="event_zstd, event_utf8_bytes" if {
            "event_zstd", "event_utf8_bytes"} <= columns else "NULL, NULL",
            topped=" AND rowid <= ?4" if rowids else "")
        content = "coalesce(event_json, event_zstd)" if "event_zstd" in columns else "event_json"
        self.top_sql = ROW_SQL.format(content=content, which="ORDER BY rowid DESC LIMIT 1")
        self.row_sql = ROW_SQL.format(content=content, which="WHERE rowid = ?")
        self.generation_sql = GENERATION_SQL.format("?") if rewrites else ""
        self.archives = "session_transcript_archives" in tables
        self.known_sql = KNOWN_SQL.format(" OR ".join(
            f"EXISTS (SELECT 1 FROM {table} WHERE session_id = value)" for table in SESSION_TABLES
            if table in tables))
        self.replaced = self.replaced or self.known not in (None, identity)   # a backup restored
        self.conn, self.identity, self.known, self.listed = conn, identity, identity, None
        self.stamp, self.checked = after, False
        return True

    def unmade(self, size: int) -> None:
        """A file at the path with no transcript table (of `size` bytes): waited for while OpenClaw may
        be making it (`making`); a Condition once it has stayed so for STORE_MADE_GRACE."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            age = 0.0
        self.making = abs(age) < STORE_MADE_GRACE     # one far ahead (a clock set back) is not waited for
        if not self.making:
            raise Condition("the agent database is empty (0 bytes): it holds no transcripts" if size == 0
                            else "the agent database has no transcript_events table: not an OpenClaw "
                                 "agent database (2026.8.1 or later)")

    def stamped(self) -> tuple[Any, ...]:
        """The database file's identity, change time and size, and its -wal's and -shm's identities: a
        change SQLite does not see through the wal-index (a copy over the file, even one that sets its
        time back; its -wal removed) changes one."""
        def stat(suffix: str) -> tuple[int, ...] | None:
            try:
                st = Path(f"{self.path}{suffix}").stat()
            except OSError:
                return None
            return (st.st_dev, st.st_ino) + ((st.st_ctime_ns, st.st_size) if not suffix else ())
        return stat(""), stat("-wal"), stat("-shm")

    def changed(self) -> int | None:
        """The database's data_version when something was committed since every session was last caught
        up (or at the first look), else None."""
        version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        return None if version == self.listed else version

    @property
    def whole(self) -> bool:
        """The look under way lists every session."""
        return self.looking[2]

    @property
    def owed(self) -> bool:
        """Commits came since every session was last listed: a look is due even if no file changed."""
        return self.listed != self.seen

    def sessions(self, version: int) -> list[tuple[str, int, str, int | None]]:
        """The sessions that may have entries not read, (id, last seq, rewrite generation or "", the
        lowest seq of its rows added since the last look, or None): those with rows past the top of
        the last look, or every session with entries when that is due, at the first look on a
        connection, or when the top came down (rows deleted from the end, or renumbered by VACUUM). A
        row added at or before where its session was read took the place of one deleted."""
        # the top first: a row committed between the two reads is past it, so listed again next time
        top = self.row(self.top_sql) if self.added_sql else None
        after = self.top and self.top[0]
        if top is not None and self.top is not None and top[0] >= after and (
                top if top[0] == after else self.row(self.row_sql, after)) != self.top:
            after -= 1           # the row at the last top deleted, its rowid maybe given to one stored since
        whole = (top is None or after is None or top[0] < after or self.listed is None or version == self.seen
                 or time.monotonic() >= self.listed_at + STORE_LIST_EVERY)
        self.looking = (version, top, whole)
        added = [] if top is None or after is None or top[0] < after else \
            self.conn.execute(self.added_sql, (after,)).fetchall()
        if whole:                # every session, and what was added as well
            lows = {session: low for session, _, _, low in added}
            added = [(session, seq, generation, lows.get(session))
                     for session, seq, generation, _ in self.conn.execute(self.sessions_sql)]
        return [(session, seq, generation or "", low) for session, seq, generation, low in added
                if isinstance(session, str) and seq is not None]

    def row(self, sql: str, *params: int) -> tuple | None:
        """(rowid, session, seq, created_at, CRC-32 of the content) of the row top_sql or row_sql finds;
        None if there is none."""
        found = self.conn.execute(sql, params).fetchone()
        return None if found is None else (*found[:4], zlib.crc32(found[4] or b""))

    def put_back(self, session: str, cursor: Cursor) -> bool:
        """The entry where the cursor stands was stored after the newest otrace read: the file was put
        back (a backup copied over it, or restored with the old inode) and written past since."""
        if cursor.again or cursor.position < 0 or cursor.newest is None:
            return False
        found = self.conn.execute("SELECT created_at FROM transcript_events WHERE session_id = ? AND seq = ?",
                                  (session, cursor.position)).fetchone()
        return found is not None and isinstance(found[0], int) and found[0] > cursor.newest

    def caught_up(self) -> None:
        """Every session the look listed was read to its end: where the next look starts from."""
        self.seen, self.top, whole = self.looking
        if whole:
            self.listed, self.listed_at = self.seen, time.monotonic()

    def entries(self, session: str, after: int, most: int) -> tuple[str, list[tuple]]:
        """Up to `most` entries after seq `after` and up to the look's top, and the generation they belong
        to, in one read transaction: (generation, [(seq, created_at, json, zstd, size), ...])."""
        top = self.looking[1]
        params = (session, after, most, top and top[0]) if self.added_sql else (session, after, most)
        with transaction(self.conn, immediate=False) as conn:
            found = conn.execute(self.generation_sql, (session,)).fetchone() if self.generation_sql else None
            rows = conn.execute(self.entries_sql, params).fetchall()
        return (found[0] or "") if found else "", rows

    def archived(self, after: int, mark: str) -> list[tuple[int, str, str, str]]:
        """Archives past rowid `after`, (rowid, session, generation, digest), a few at a time, in one
        read transaction; from the first when the row at `after` is not the one `mark` names any more
        (its archive deleted, its rowid given to another, a backup put back: those read before are
        known by their names and digests)."""
        with transaction(self.conn, immediate=False) as conn:
            if after >= 0 and (conn.execute(ARCHIVE_MARK_SQL, (after,)).fetchone() or (None,))[0] != mark:
                after = -1
            return conn.execute(ARCHIVES_SQL, (after,)).fetchall()

    def archive(self, session: str, generation: str, blob: bool = False) -> tuple[str, str, Any] | None:
        """One archive's encoding, digest and (`blob`) transcript, or None."""
        if not self.archives:
            return None
        return self.conn.execute(ARCHIVE_SQL.format("archive_blob" if blob else "NULL"),
                                 (session, generation)).fetchone()

    def archive_names(self) -> set[tuple[str, str]]:
        """(session, generation) of every archive in the database; none without the table."""
        return set(self.conn.execute(ARCHIVE_NAMES_SQL)) if self.archives else set()

    def ended(self, sessions: list[str]) -> tuple[set[str], set[tuple[str, str]]]:
        """Of `sessions`, those the database holds nothing of any more (no entry, generation, window
        or cold transcript), and every archive's name, in one read transaction: an archive is made in
        the transaction that deletes its entries, so one of a session ended is named here."""
        with transaction(self.conn, immediate=False) as conn:
            known = set(conn.execute(self.known_sql, (json.dumps(sessions),))) if sessions else set()
            return set(sessions) - {session for (session,) in known}, self.archive_names()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        # the top stays: the same file opened again (a checkpoint changed it) has the same rowids
        self.conn, self.identity, self.listed, self.seen = None, None, None, None


class SessionStore(QuietReader):
    """Follows every agent's session store under OpenClaw's state directory: every TRACE_OPENCLAW_POLL
    it offers the rows of the entries written since the last commit, with the new position, to the
    queue as units of their own. A directory, agent or database not there yet is waited for quietly;
    a database that is locked, replaced or unreadable is a fault said once, and the other agents are
    read meanwhile."""

    def __init__(self, config: Config, events: EventQueue, db: Database, root: Path) -> None:
        super().__init__("sessions", config.openclaw_poll, config.quiet_poll, config.notified_poll, events)
        self.config, self.root = config, root
        self.cursors: dict[tuple[str, str], Cursor] = {
            (agent, stream): Cursor(mark, position, newest) for agent, stream, mark, position, newest in
            db.query("SELECT agent, stream, mark, position, newest FROM openclaw_positions")}
        self.usage_sessions = {session for (session,) in db.query(USAGE_SESSIONS_SQL)}
        self.inodes = {key.removeprefix(INODE_KEY): inode % 2**64 for key, inode in db.query(
            "SELECT key, value FROM otrace_state WHERE substr(key, 1, ?) = ?", (len(INODE_KEY), INODE_KEY))}
        self.databases: dict[str, AgentDatabase] = {}
        self.followed: set[str] = set()        # what was said to be followed (an agent's db or files)
        self.agents_seen: set[str] = set()
        self.started = False
        self.most = max(1, min(256, config.queue_size // 8))   # entries per unit: 2 rows each at most
        self.waiting = False
        self.zstd: Any = None                  # zstandard.ZstdDecompressor, made at the first need
        self.zstd_error: Any = ()              # zstandard.ZstdError once it is imported
        self.totals = Counters(("entries", "calls", "failures", "undecodable", "bytes_read"))
        self.errors: dict[str, str] = {}       # agent -> why it could not be read at the last look
        self.looked_at: tuple[str, ...] = ()   # the directories and files the last whole look read

    # -- where
    def agents(self) -> list[str] | None:
        """The agents under the state directory; None while it (or its agents/) is not there."""
        try:
            found = sorted(e.name for e in os.scandir(self.root / "agents") if e.is_dir())
        except FileNotFoundError:
            was, self.waiting = self.waiting, True
            if not was:                # a warning: a wrong path loses what is said below
                self.log.warning("waiting for OpenClaw's state directory; until it is there, the model "
                                 "calls and failures in the gateway's log and OpenClaw's own OTLP usage "
                                 "spans are not stored (its session store gives them)",
                                 extra={"path": str(self.root)})
            return None
        news, self.waiting, self.started = self.waiting or not self.started, False, True
        if news:
            self.log.info("following OpenClaw's session store", extra={"path": str(self.root),
                                                                        "agents": found})
        self.agents_seen.update(found)
        return found

    def watched(self) -> tuple[str, ...]:
        """What a look reads, as the last whole look found it: the agents directory, and each agent's
        database, WAL, sessions directory and session files; nothing while behind, or while a database
        is owed a listing of every session."""
        owed = any(store.owed for store in self.databases.values())
        return () if self.behind or owed else self.looked_at

    def look(self) -> None:
        agents = self.agents()
        if agents is None:
            self.looked_at = ()
            return
        errors: dict[str, str] = {}             # kept whole: /health never sees a look's half
        looked_at = [str(self.root / "agents")]
        for agent in agents:
            try:
                self.read_database(agent)
                looked_at += self.read_files(agent)
            except (OSError, sqlite3.Error, ImportError, Condition) as exc:
                errors[agent] = describe(exc)
                if agent in self.databases and isinstance(exc, sqlite3.Error):
                    self.databases[agent].close()        # opened afresh at the next look
            looked_at += self.databases[agent].files
        self.errors = errors
        if self.errors:
            raise Condition("; ".join(f"agent {a}: {e}" for a, e in self.errors.items()))
        self.looked_at = tuple(looked_at)

    def said(self, what: str, path: Path) -> None:
        if what not in self.followed:
            self.followed.add(what)
            self.log.info("following " + what.split(":", 1)[0], extra={"path": str(path)})

    # -- the agent's database
    def read_database(self, agent: str) -> None:
        store = self.databases.get(agent)
        if store is None:
            store = self.databases[agent] = AgentDatabase(self.root / "agents" / agent / "agent" /
                                                          "openclaw-agent.sqlite")
            store.top = self.kept_top(agent)         # as the last run left it
        gone = store.gone
        store.making = False
        if not store.open():
            self.news |= store.making            # looked at again, not waited for: its tables come soon
            if store.gone and not gone:          # waited for quietly, but said: its calls stop coming
                self.log.warning("agent database gone: waiting for it", extra={"agent": agent,
                                                                              "path": str(store.path)})
            return
        if store.gone:
            store.gone = False
            self.log.info("agent database back", extra={"agent": agent, "path": str(store.path)})
        self.said(f"agent database:{agent}", store.path)
        inode = store.identity[1]
        store.replaced |= self.inodes.get(agent, inode) != inode     # a backup restored while stopped
        version = store.changed()
        if version is None:
            return
        if store.replaced:
            store.top = None                     # another file's rowids: the last top is not in it
        listed = store.sessions(version)
        missing: ImportError | None = None
        held: set[str] = set()            # sessions whose archive waits for zstandard
        try:
            self.read_archives(store, agent)   # first: an entry the sessions read next may be archived after
        except ImportError as exc:            # a zstd archive waits for the package; the sessions go on
            missing = exc
        if store.whole:                       # a look that lists every session: what ended is forgotten
            self.forget(store, agent, {session for session, _, _, _ in listed})
        again = {}                        # a backup restored: the gateway writes where otrace read past
        for session, last, _, low in listed:
            cursor = self.cursors.get((agent, session))
            # entries deleted where the session was read: its end cut, or one stored in their place
            stored_at = math.inf if low is None else low
            cut = cursor is not None and (cursor.position > last or stored_at <= cursor.position)
            if cut and not cursor.again:
                try:                      # a reset that kept the id, archived since: read where it stood
                    self.read_archive(store, agent, session, cursor.mark)
                except ImportError as exc:
                    missing = exc
                    held.add(session)
                    continue
            if cursor is not None and (store.replaced or cut or (          # one read again too
                    not store.checked and store.put_back(session, cursor))):
                again[session] = cursor.read_again()
        if again or self.inodes.get(agent) != inode:
            self.mark(agent, again, inode)
        if again:
            self.log.info("agent database put back or cut: sessions read again", extra={
                "agent": agent, "sessions": len(again), "another_file": store.replaced})
        store.replaced, store.checked = False, True
        for session, last, generation, _ in listed:
            cursor = self.cursors.get((agent, session))
            if session in held:
                continue
            if cursor is None or cursor.mark != generation or cursor.position != last:
                try:
                    self.read_session(store, agent, session, cursor)
                except ImportError as exc:       # that session waits for the package; the others go on
                    missing = exc
        if missing is not None:
            raise missing
        store.caught_up()
        self.keep_top(agent, store.top)

    def keep_top(self, agent: str, top: tuple | None) -> None:
        """The row at the top of the agent's database, kept for the next start when it moved (Behind if
        the queue is full): an entry stored where it was while otrace was stopped is found then."""
        if top is None:
            return
        rowid, session, seq, created, crc = top
        kept = Cursor(f"{session}\t{seq}\t{created}\t{crc}", rowid, None)
        if kept != self.cursors.get((agent, TOP)):
            self.send([], [(POSITION_SQL, (agent, TOP, kept.mark, kept.position, None, now_ms()))])
            self.cursors[(agent, TOP)] = kept

    def kept_top(self, agent: str) -> tuple | None:
        """The top keep_top kept, as AgentDatabase holds it; None if none was."""
        if (kept := self.cursors.get((agent, TOP))) is None:
            return None
        session, seq, created, crc = kept.mark.rsplit("\t", 3)
        return kept.position, session, count_of(seq), count_of(created), count_of(crc)

    def read_session(self, store: AgentDatabase, agent: str, session: str, cursor: Cursor | None) -> None:
        """Every entry of the session not read yet, unit by unit. A session rewritten since (another
        generation), or to be read again (its file replaced, or its end cut), is read again from its
        start, taking only entries newer than the newest read, until its end, even across looks (the
        mark says so meanwhile); an entry after the last read in the same generation is new whatever
        its time (a clock stepped back), in the file read before or in one that took its place."""
        rewritten, past = cursor is not None and cursor.again, -1
        if rewritten:
            cursor, past = cursor.resumed()
        while not self.stopping.is_set():
            after = cursor.position if cursor else -1
            generation, rows = store.entries(session, after, self.most)
            if cursor is not None and cursor.mark != generation:
                # a reset that kept the session's id archived the generation read: its rest comes first
                self.read_archive(store, agent, session, cursor.mark)
                cursor, rewritten, past = Cursor(generation, -1, cursor.newest), True, -1
                if after >= 0:
                    continue
            newest, found, held = cursor.newest if cursor else None, [], None
            self.staged.clear()
            for index, (seq, created, plain, compressed, size) in enumerate(rows):
                if rewritten and not 0 <= past < seq and not cursor.fresh(created):
                    continue
                if compressed is not None:
                    try:
                        self.decoder()
                    except ImportError as exc:    # the entries before it go; the session waits at it
                        held, rows = exc, rows[:index]
                        break
                newest = created if newest is None else max(newest, created)
                where = f"{agent}/{session}#{seq}"
                text = plain if compressed is None else self.decompress(compressed, size, where)
                if text is not None and maybe_call(text):
                    found += self.parse(text, agent, session, f"seq-{seq}", where)
            done = held is None and len(rows) < self.most
            cursor = Cursor(generation, rows[-1][0] if rows else after, newest)
            kept = cursor if done or not rewritten else Cursor(f"{generation}{REREAD}{past}", cursor.position,
                                                                  newest)
            if rows or kept != self.cursors.get((agent, session)):
                self.offer(agent, session, found, kept)
            if held is not None:
                raise held
            if done:
                return

    def read_archives(self, store: AgentDatabase, agent: str) -> None:
        """The archives of sessions OpenClaw reset or deleted since the last look, in the order made,
        each read once (known by its session and generation), and where the look got to."""
        while store.archives and not self.stopping.is_set():
            place = self.cursors.get((agent, ARCHIVES)) or Cursor("", -1, None)
            found = store.archived(place.position, place.mark)
            if not found:
                return
            for rowid, session, generation, digest in found:
                self.read_archive(store, agent, session, generation)
                if self.stopping.is_set():
                    return
                place = Cursor(f"{session}\t{generation}\t{digest}", rowid, None)
            self.offer(agent, ARCHIVES, [], place)

    def forget(self, store: AgentDatabase, agent: str, listed: set[str]) -> None:
        """Forget, as one unit (Behind if the queue is full: kept until the next whole look), what the
        agent's database can no longer give: the marks of archives gone, the positions of sessions
        ended. `listed`: the sessions with entries, as the look listed them."""
        streams = [stream for who, stream in self.cursors if who == agent]
        candidates = [stream for stream in streams if session_stream(stream) and stream not in listed]
        if not candidates and not any(stream.startswith(ARCHIVED) for stream in streams):
            return
        ended, names = store.ended(candidates)
        archives, sessions = self.archives_gone(streams, names), self.sessions_ended(agent, ended, names)
        if not archives and not sessions:
            return
        self.send([], [(FORGET_POSITION_SQL, (agent, stream)) for stream in archives + sessions])
        for stream in archives + sessions:
            del self.cursors[(agent, stream)]
        if archives:
            self.log.info("archives gone from the agent database: their marks forgotten",
                          extra={"agent": agent, "archives": len(archives)})
        if sessions:
            self.log.info("sessions ended in the agent database: their positions forgotten",
                          extra={"agent": agent, "sessions": len(sessions)})

    @staticmethod
    def archives_gone(streams: list[str], names: set[tuple[str, str]]) -> list[str]:
        """The marks of the archives read that are gone from the database (OpenClaw's pruning; a
        database put back without them): such a one cannot be read there again, and its mark would
        stay for good. Never one still there, whatever its age: the archives are listed from the first
        again when the newest is deleted, and one read would be read again."""
        there = {f"{ARCHIVED}{session}\t{generation}" for session, generation in names}
        return [stream for stream in streams if stream.startswith(ARCHIVED) and stream not in there]

    def sessions_ended(self, agent: str, ended: set[str], names: set[tuple[str, str]]) -> list[str]:
        """The sessions whose positions can go: nothing of them left in the database but archives
        read whole. An archive not read yet is read past its session's position, which stays until
        then; a session that comes back under its id (a reset that keeps it) has only new entries."""
        unread = {session for session, generation in names
                  if not self.archive_read(agent, session, generation)}
        return sorted(ended - unread)

    def archive_read(self, agent: str, session: str, generation: str) -> bool:
        mark = self.cursors.get((agent, f"{ARCHIVED}{session}\t{generation}"))
        return mark is not None and not mark.mark.endswith(PART)

    def read_archive(self, store: AgentDatabase, agent: str, session: str, generation: str) -> None:
        """One archive not read before: the entries otrace had not read of it, unit by unit, the last
        with the archive's mark. Of the generation the session's cursor stands in, those past its place
        (a line is an entry, in seq order), or written after the newest it read; of another, those its
        cursor calls fresh, as after a rewrite; of a session never read, all. A call stored, then
        archived before a look read it, is kept; one read before is not stored again, also when
        retention has deleted its row since."""
        done = (agent, f"{ARCHIVED}{session}\t{generation}")
        mark, digest = self.cursors.get(done), (store.archive(session, generation) or (None, None))[1]
        if digest is None or (mark is not None and mark.mark == digest):   # another digest: archived again
            return
        if (found := store.archive(session, generation, blob=True)) is None:
            return
        encoding, digest, blob = found
        begun = mark.position if mark is not None and mark.mark == digest + PART else -1
        read = self.cursors.get((agent, session))
        exact = read is not None and read.mark == generation
        rows: list[Row] = []
        entries = 0
        self.staged.clear()
        for number, text in self.archive_lines(blob, encoding, f"{agent}/{session}.archive"):
            where = f"{agent}/{session}.archive#{number}"
            if text is None:
                self.undecodable(where, f"a line over {STORE_LINE_LIMIT} bytes")
                continue
            if number <= begun or not maybe_call(text) or (entry := self.entry(text, where)) is None:
                continue
            written = _log_time(entry.get("timestamp"))
            if read is not None and (self.read_before(read, number, written) if exact
                                     else written is None or not read.fresh(written)):
                continue
            rows += self.rows(entry, agent, session, f"archive-{generation}-{number}", where)
            entries += 1
            if entries == self.most:        # a unit, and how far: after a stop or a full queue, on from there
                self.offer(agent, done[1], rows, Cursor(digest + PART, number, None))
                rows, entries = [], 0
                self.staged.clear()
        self.offer(agent, done[1], rows, Cursor(digest, 0, None))

    @staticmethod
    def read_before(read: Cursor, number: int, written: int | None) -> bool:
        """Whether line `number` of an archive of the generation `read` stands in was read: at or
        before its place, and not written after the newest it read."""
        return number <= read.position and (written is None or read.newest is None or written <= read.newest)

    def archive_lines(self, blob: bytes, encoding: str, where: str) -> Iterator[tuple[int, str | None]]:
        """An archive's lines, numbered, decoded as they are read (a zstd archive is not held whole);
        None for one over STORE_LINE_LIMIT. A zstd archive that does not decode, or is cut short, gives
        its whole lines up to the damage, then counts once in `undecodable`, logged."""
        damage = zstd_damage(blob) if encoding == "zstd" else None
        raw: Any = io.BytesIO(blob) if encoding != "zstd" else io.BufferedReader(
            self.decoder().stream_reader(blob, read_across_frames=True))
        number = 0
        try:
            while line := raw.readline(STORE_LINE_LIMIT + 1):
                if damage and len(line) <= STORE_LINE_LIMIT and not line.endswith(b"\n"):
                    break                                 # the line the cut went through
                if len(line) > STORE_LINE_LIMIT and not line.endswith(b"\n"):
                    while (rest := raw.readline(STORE_LINE_LIMIT + 1)) and not rest.endswith(b"\n"):
                        pass
                    yield number, None
                else:
                    yield number, line.decode("utf-8", "replace")
                number += 1
        except self.zstd_error as exc:
            damage = describe(exc)
        if damage:
            self.undecodable(where, damage)

    def decoder(self) -> Any:
        """zstandard's decompressor, made at the first need. Without the package, ImportError: a
        session waits at its first compressed entry (the agent's fault in /health) until otrace runs
        with it, not skipped past."""
        if self.zstd is None:
            try:
                import zstandard  # noqa: PLC0415 - imported where needed (see the imports)
            except ImportError as exc:
                fix = "pip install zstandard" if exc.name == "zstandard" else (    # there, but not for it:
                    f"its compiled part is not for Python {sys.version_info[0]}.{sys.version_info[1]}; "
                    "an otrace.pyz runs on the Python version it was built with")
                raise ImportError(f"{exc}: the session's compressed entries wait for it ({fix})") from None
            self.zstd, self.zstd_error = zstandard.ZstdDecompressor(), zstandard.ZstdError
        return self.zstd

    def decompress(self, blob: bytes, size: int | None, where: str) -> str | None:
        """An event_zstd entry's JSON (a plain zstd frame, as node:zlib writes it); None, counted and
        logged, if it does not decode."""
        self.decoder()
        try:
            data = self.zstd.decompress(blob, max_output_size=_count(size) or STORE_LINE_LIMIT)
            return data.decode("utf-8")
        except (self.zstd_error, UnicodeDecodeError) as exc:
            self.undecodable(where, describe(exc))
            return None

    def undecodable(self, where: str, why: str) -> None:
        self.staged["undecodable"] += 1
        self.log.warning("session entry cannot be read; skipped", extra={"entry": where, "error": why})

    def parse(self, text: str, agent: str, session: str, fallback: str, where: str) -> list[Row]:
        """The rows of one entry's JSON."""
        entry = self.entry(text, where)
        return [] if entry is None else self.rows(entry, agent, session, fallback, where)

    def entry(self, text: str, where: str) -> dict[str, Any] | None:
        """One entry's JSON, counted; None (counted undecodable) if it is none."""
        self.staged["entries"] += 1
        self.news = True
        try:
            entry = json.loads(text)
        except (ValueError, RecursionError) as exc:
            self.undecodable(where, describe(exc))
            return None
        return entry if isinstance(entry, dict) else None

    def rows(self, entry: dict[str, Any], agent: str, session: str, fallback: str, where: str) -> list[Row]:
        """The rows of one entry."""
        rows = []
        try:
            events = store_events(entry, agent, session, fallback, self.config.max_text_bytes)
        except Exception as exc:  # noqa: BLE001 - an entry otrace misreads must not hold the store
            self.undecodable(where, describe(exc))
            return rows
        for table, build, event in events:
            try:
                rows.append(event_row(table, build, event, STORE_SOURCE, max_text=self.config.max_text_bytes))
            except Invalid as exc:
                self.undecodable(where, str(exc))
        return rows

    def mark(self, agent: str, again: dict[str, Cursor], inode: int) -> None:
        """The agent's sessions to read again and the inode of its database, as one unit (Behind if
        the queue is full): a stop before they are read again keeps them, and a file that is another
        at the next start (a backup moved in while otrace was stopped) has every session read again."""
        now = now_ms()
        extra = [(POSITION_SQL, (agent, session, cursor.mark, cursor.position, cursor.newest, now))
                 for session, cursor in again.items()]
        extra.append((STATE_SQL, (INODE_KEY + agent, int64(inode), now)))
        self.send([], extra)
        self.cursors.update({(agent, session): cursor for session, cursor in again.items()})
        self.inodes[agent] = inode

    def offer(self, agent: str, stream: str, rows: list[Row], cursor: Cursor) -> None:
        """Rows with the position after them, as one unit; Behind if the queue is full. A failure
        with a run id also gets the count of its failed attempts the gateway log has seen so far."""
        extra = [(POSITION_SQL, (agent, stream, cursor.mark, cursor.position, cursor.newest, now_ms()))]
        extra += [(COUNT_ON_STORE_SQL, (run,)) for row in rows if row.table == ERRORS.name and (
            run := _run_of(row))]
        extra += [(USAGE_SUPERSEDED_SQL, (session, *times)) for session, times in call_times(rows).items()
                  if session in self.usage_sessions]
        self.send(rows, extra)
        self.cursors[(agent, stream)] = cursor
        self.totals.add_all(self.staged)
        self.totals.add("calls", sum(row.table == TRACES.name for row in rows))
        self.totals.add("failures", sum(row.table == ERRORS.name for row in rows))

    # -- an older OpenClaw's session files: sessions/<session>.jsonl
    def read_files(self, agent: str) -> list[str]:
        """Read the agent's session files; the directory and files that were read."""
        folder = self.root / "agents" / agent / "sessions"
        try:
            found = sorted(e.name for e in os.scandir(folder))
        except FileNotFoundError:
            return [str(folder)]
        names = [name for name in found if name.endswith(".jsonl") and not (
            name.endswith(".trajectory.jsonl") or CHECKPOINT_FILE.fullmatch(name))]
        store = self.databases.get(agent)
        archived = [] if store is not None and store.archives else [   # a database's: read from it
            (name, match[1]) for name in found if (match := ARCHIVED_FILE.fullmatch(name))
            and not (match[1].endswith(".trajectory") or CHECKPOINT_FILE.fullmatch(f"{match[1]}.jsonl"))]
        if names:
            self.said(f"agent session files:{agent}", folder)
        for name in names:
            self.read_file(agent, folder / name)
        for name, session in archived:
            self.read_file(agent, folder / name, session, self.cursors.get((agent, f"{session}.jsonl")))
        return [str(folder), *(str(folder / name) for name in names)]

    def read_file(self, agent: str, path: Path, session: str | None = None, was: Cursor | None = None
                  ) -> None:
        """The lines appended to one session file since the last commit (a partial last line waits
        for its newline); a file that is not the one read before is read from its start, taking only
        entries newer than the newest read from its name. A file OpenClaw renamed when it reset or
        deleted the session (`session`'s) goes on from where its live name was read (`was`) when it is
        that file, is read as a replaced one when it is another, and whole when the name was never read."""
        cursor = self.cursors.get((agent, path.name))
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        cursor = cursor or was
        dev, inode = (int(part) for part in cursor.mark.split(":", 2)[:2]) if cursor else (None, None)
        same = cursor is not None and (dev, inode) == (st.st_dev, st.st_ino)
        if same and st.st_size == cursor.position:
            return
        fd = open_regular(str(path))
        try:
            offset = cursor.position if same and st.st_size >= cursor.position and same_start(
                fd, cursor.mark.split(":", 2)[2]) else 0
            followed = Followed(str(path), fd, offset)
            rewritten = cursor is not None and offset == 0
            session = session or path.name[:-len(".jsonl")]
            newest = cursor.newest if cursor else None
            while not self.stopping.is_set():
                lines, end = followed.lines(self.most, limit=STORE_LINE_LIMIT)
                self.totals.add("bytes_read", followed.read)
                followed.read = 0
                if not lines:
                    return
                rows: list[Row] = []
                self.staged.clear()
                for start, text, length in lines:
                    where = f"{agent}/{path.name}@{start}"
                    if length > STORE_LINE_LIMIT:
                        self.undecodable(where, f"a line of {length} bytes, over {STORE_LINE_LIMIT}")
                        continue
                    if not maybe_call(raw := text.decode("utf-8", "replace")):
                        continue
                    found = self.parse(raw, agent, session, f"at-{start}", where)
                    created = found[0].values[1] if found else None
                    if created is None or (rewritten and not cursor.fresh(created)):
                        continue
                    newest = created if newest is None else max(newest, created)
                    rows += found
                followed.refresh_fingerprint()
                self.offer(agent, path.name, rows, Cursor(f"{followed.dev}:{followed.inode}:"
                                                          f"{followed.fingerprint}", end, newest))
                followed.offset = end
        finally:
            os.close(fd)

    def health(self) -> dict[str, Any]:
        sessions = sum(not stream.startswith("#") for _, stream in self.cursors)    # not the archives'
        return {"state_dir": str(self.root), "waiting": self.waiting, "polls": self.ticks,
                "notified": self.notified(), "agents": sorted(self.agents_seen),
                "sessions": sessions, **self.totals.snapshot(), "agent_errors": self.errors,
                "last_error": self.fault.error}


def session_stream(stream: str) -> bool:
    """Whether a position's stream is a session of an agent database (not an archive's mark, nor a
    session file's)."""
    return not (stream.startswith("#") or stream.endswith(".jsonl") or ARCHIVED_FILE.fullmatch(stream))


def zstd_damage(data: bytes) -> str | None:
    """Why a zstd archive is not whole, read from its frame and block headers alone (zstandard's stream
    reader ends a frame cut short as if it were complete, without an error); None when every frame ends
    where the next begins and the last at the archive's end."""
    at, end = 0, len(data)
    cut = f"cut short: the archive's {end} bytes end inside a zstd frame"
    if not data:
        return "an empty zstd archive: no frame"
    while at < end:
        magic = int.from_bytes(data[at:at + 4], "little")
        if at + 4 <= end and magic & ~0xF == ZSTD_SKIPPABLE:      # its length, then that many bytes
            at += 8 + int.from_bytes(data[at + 4:at + 8], "little")
            continue
        if at + 4 <= end and magic != ZSTD_MAGIC:
            return f"no zstd frame at byte {at} of {end}"
        if at + 5 > end:
            return cut
        descriptor = data[at + 4]
        single = descriptor >> 5 & 1
        at += 5 + (not single) + (0, 1, 2, 4)[descriptor & 3] + (single, 2, 4, 8)[descriptor >> 6]
        last = 0
        while not last and at + 3 <= end:
            header = int.from_bytes(data[at:at + 3], "little")
            last, kind = header & 1, header >> 1 & 3
            if kind == 3:
                return f"a zstd block of the reserved type at byte {at}"
            at += 3 + (1 if kind == 1 else header >> 3)        # an RLE block holds its one byte
        at += 4 * (descriptor >> 2 & 1)                       # the frame's checksum
        if not last or at > end:
            return cut
    return None if at == end else cut


def call_times(rows: list[Row]) -> dict[str, tuple[int, int]]:
    """Each session's first and last call start among these rows."""
    times: dict[str, tuple[int, int]] = {}
    for row in rows:
        if row.table == TRACES.name and (session := row.values[_TRACE_SESSION]):
            at = row.values[_TRACE_CREATED]
            first, last = times.get(session, (at, at))
            times[session] = (min(first, at), max(last, at))
    return times


def _run_of(row: Row) -> str | None:
    """The run id in an error event row's metadata."""
    metadata = row.values[_ERROR_METADATA]
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        run = json.loads(metadata).get("run_id")
        return run if isinstance(run, str) else None
    return None


# ================================================================================================ push
# Every unsynced row reaches the receiver at least once and is marked synced only when a 2xx answer
# confirmed its batch. Rows are read page by page, encoded by the push format (otrace's JSON, or
# OTLP for any OpenTelemetry backend) and packed into byte-capped batches; a batch is retried with
# full-jitter backoff, split when refused for its content, and a circuit breaker spaces out cycles
# while the receiver is down (in OTLP one a signal: a backend may lack one endpoint). A row the
# receiver refuses on its own is given up only when it accepted others in the same cycle; a receiver
# that refuses everything keeps every row.

JSON_COLUMNS = frozenset({"metadata", "detail", "attributes", "buckets", "dns"})
INTERNAL_COLUMNS = frozenset({"synced", "pushed_at"})
ANSWER_LIMIT = 4096              # bytes of a receiver's answer otrace keeps at most ...
ANSWER_DRAIN = 16 << 20          # ... and reads at most, the rest dropped, to know it came whole
LOSSES_PER_BATCH = 100
LOSS = "(loss)"                  # the table of a loss report's records: no row of its own
PUSHED_KEY = "last_push_success"   # otrace_state: when the receiver last took a batch (push_log is pruned)
# push_log rows of batches taken whole: a 2xx whose partial_success refused items has that as its error
CONFIRMED_SQL = "http_status BETWEEN 200 AND 299 AND error IS NULL"
_REJECTED_JSON = re.compile(rb'"rejected_?(?:[Ss]pans|[Dd]ata_?[Pp]oints|[Ll]og_?[Rr]ecords)"\s*:\s*"?(\d+)')
_PARTIAL_SAID_JSON = re.compile(rb'"error_?[Mm]essage"\s*:\s*"((?:[^"\\]|\\.)*)"')
OTLP_SIGNAL_OF = {"llm_traces": "traces", "system_metrics": "metrics", "genai_metrics": "metrics",
                  "process_samples": "metrics"}
OTLP_ENVELOPE = {"traces": ("resourceSpans", "scopeSpans", "spans"),     # OTLP JSON names, outside in
                 "logs": ("resourceLogs", "scopeLogs", "logRecords"),
                 "metrics": ("resourceMetrics", "scopeMetrics", "metrics")}
# system_metrics columns pushed under OpenTelemetry's names: (metric, unit, scale, attributes); the
# others go as otrace.host.<column>. A sample from a cgroup is the container's, from /proc the host's.
CORE_SHARE = "a percent of one core"    # a scale: OpenTelemetry's process.cpu.utilization is of all CPUs
HOST_METRICS = {
    "mem_used_bytes": ("system.memory.usage", "By", 1, {"system.memory.state": "used"}),
    "cpu_pct": ("system.cpu.utilization", "1", 0.01, {}),
    "disk_used_bytes": ("system.filesystem.usage", "By", 1, {"system.filesystem.state": "used"}),
    "disk_avail_bytes": ("system.filesystem.usage", "By", 1, {"system.filesystem.state": "free"}),
    "disk_used_pct": ("system.filesystem.utilization", "1", 0.01, {}),
    "self_rss_bytes": ("process.memory.usage", "By", 1, {}),
    "self_cpu_pct": ("process.cpu.utilization", "1", CORE_SHARE, {}),
    "proc_count": ("system.process.count", "{process}", 1, {}),
    **{f"tcp_{state}": ("system.network.connections", "{connection}", 1, {
        "network.transport": "tcp", "network.connection.state": state})
       for state in ("established", "time_wait", "close_wait", "listen")},
}
# process_samples columns as process.* gauges, each point named by the process's attributes
PROCESS_METRICS = {"cpu_pct": ("process.cpu.utilization", "1", CORE_SHARE),
                   "rss_bytes": ("process.memory.usage", "By", 1),
                   "threads": ("process.thread.count", "{thread}", 1),
                   "fds": ("process.unix.file_descriptor.count", "{file_descriptor}", 1)}
CONTAINER_METRICS = HOST_METRICS | {
    "mem_used_bytes": ("container.memory.usage", "By", 1, {}),
    "mem_rss_bytes": ("container.memory.rss", "By", 1, {}),
    "mem_available_bytes": ("container.memory.available", "By", 1, {}),
    "cpu_pct": ("otrace.host.cpu_pct", "%", 1, {}),    # of the allowance: container.cpu.usage is in cpus
}
OTLP_PUSH_SKIP = frozenset({"id", "trace_id", "created_at", "received_at", "truncated"})


def push_signal(table: str) -> str:
    """The signal a table's rows are pushed as (what TRACE_PUSH_SIGNALS names)."""
    return OTLP_SIGNAL_OF.get(table, "logs")


# The service and instrumentation scope an event came from over OTLP, which its resource and scope
# keep when pushed as OTLP; None: otrace's own (the log, the store, the API, the host).
Origin = tuple[str | None, str | None] | None


_FIRST = operator.itemgetter(0)


@dataclasses.dataclass
class Batch:
    """Events sent in one request, encoded back to back in one buffer (", " apart in JSON), with
    where each one is: (table, row id, trace_id, start, end). One buffer, not an object per event,
    keeps a 5 MiB batch at about 5 MiB. In OTLP a batch holds one signal (traces, logs, metrics)."""

    signal: str = ""
    separator: bytes = b", "
    data: bytearray = dataclasses.field(default_factory=bytearray)
    spans: list[tuple[str, int, str, int, int]] = dataclasses.field(default_factory=list)
    origins: list[Origin] = dataclasses.field(default_factory=list)   # each event's, as spans
    losses: list[dict[str, Any]] = dataclasses.field(default_factory=list)   # reported with this batch
    batch_id: str = dataclasses.field(default_factory=new_id)

    def __len__(self) -> int:
        return len(self.spans)

    @property
    def events(self) -> int:
        """Its rows (the records of a loss report are none)."""
        return len(self.spans) - list(map(_FIRST, self.spans)).count(LOSS)

    def add(self, table: str, row_id: int, trace_id: str, encoded: bytes, origin: Origin = None) -> None:
        data = self.data                       # grown in place
        if self.spans:
            data += self.separator
        start = len(data)
        data += encoded
        self.spans.append((table, row_id, trace_id, start, len(data)))
        self.origins.append(origin)

    def event(self, index: int) -> bytes:
        *_, start, end = self.spans[index]
        return bytes(self.data[start:end])

    def halves(self) -> tuple[Batch, Batch]:
        middle = len(self.spans) // 2
        first = Batch(self.signal, self.separator, losses=self.losses)
        second = Batch(self.signal, self.separator)
        for index, (table, row_id, trace_id, _, _) in enumerate(self.spans):
            (first if index < middle else second).add(table, row_id, trace_id, self.event(index),
                                                      self.origins[index])
        return first, second

    def groups(self) -> dict[Origin, list[int]]:
        """Its events' indexes by origin, in the order the origins first come."""
        groups: dict[Origin, list[int]] = {}
        for index, origin in enumerate(self.origins):
            groups.setdefault(origin, []).append(index)
        return groups

    def ids(self, leaving: Container[tuple[str, str]] = ()) -> dict[str, list[int]]:
        """The batch's rows by table (the records of a loss report are none), but those `leaving`."""
        by_table: dict[str, list[int]] = {}
        last, ids = None, []
        for table, row_id, trace_id, _, _ in self.spans:
            if table == LOSS or (leaving and (table, trace_id) in leaving):
                continue
            if table != last:                  # a batch's rows come table by table: looked up per run
                last, ids = table, by_table.setdefault(table, [])
            ids.append(row_id)
        return by_table


class OutOfTime(Exception):
    """The final push's deadline came, or otrace began to stop, while a batch was being packed: its
    rows go at the next push, or the next start."""


class Packer:
    """Reads unsynced rows a page at a time (table by table, in id order) and packs them, encoded by
    the push format, into batches of at most max_bytes, so a backlog of any size is never held in
    memory. A batch holds rows of one signal."""

    PAGE = 200
    SPARE = 64                   # bytes: a batch's id and time, whose lengths may vary

    def __init__(self, conn: sqlite3.Connection, max_bytes: int, tables: Iterable[str],
                 form: OtraceFormat | OtlpFormat, *, skip: Collection[tuple[str, str]] = (),
                 only: dict[str, list[str]] | None = None, deadline: float | None = None,
                 stopping: threading.Event | None = None) -> None:
        self.conn, self.max_bytes, self.tables, self.form = conn, max_bytes, tuple(tables), form
        self.deadline = math.inf if deadline is None else deadline   # the final push packs no further
        self.stopping = stopping         # a cycle's: it leaves the cycle lock to the final push
        self.skip = skip                 # (table, trace_id) of rows left out: the push's suspects
        self.only = only                 # else only these rows (trace_ids by table): the suspects
        self.dropped: set[str] = set()   # signals no longer wanted this cycle
        self.unencodable: list[tuple[str, int, str, str]] = []   # (table, row id, trace_id, why)
        self.envelopes: dict[str, int] = {}
        self.groups: dict[tuple[str, Origin], int] = {}

    def envelope(self, signal: str) -> int:
        """Bytes of a batch of `signal` around its events: the push format's, with the agent's name."""
        if signal not in self.envelopes:
            empty = Batch(signal, self.form.separator)
            self.envelopes[signal] = sum(map(len, self.form.body(empty))) + self.SPARE
        return self.envelopes[signal]

    def grouping(self, signal: str, origin: Origin, seen: Container[Origin]) -> int:
        """Bytes more around a batch's events for an event of `origin`: none for otrace's own (in the
        envelope) or an origin already in the batch, else its resource and scope (OTLP)."""
        if origin is None or origin in seen:
            return 0
        if (signal, origin) not in self.groups:
            self.groups[signal, origin] = sum(map(len, self.form.group(signal, origin, self.max_bytes))) \
                + len(self.form.separator)
        return self.groups[signal, origin]

    def batches(self) -> Iterator[Batch]:
        separator, skip, deadline, stopping = self.form.separator, self.skip, self.deadline, self.stopping
        item, signal_of, origin_of = self.form.item, self.form.signal, self.form.origin   # once, not a row
        batch, seen, grouped = Batch(separator=separator), set(), 0
        for table, row in self.rows():
            if time.monotonic() >= deadline or (stopping and stopping.is_set()):
                raise OutOfTime                          # a batch can take seconds to pack: left unsent
            if skip and (table, row["trace_id"]) in skip:
                continue
            try:
                encoded, signal = item(table, row), signal_of(table)
                origin = origin_of(table, row)
            except (ValueError, TypeError, OverflowError) as exc:   # a value the format cannot hold
                self.unencodable.append((table, row["id"], row["trace_id"], describe(exc)))
                continue
            more = 0 if origin is None or origin in seen else self.grouping(signal, origin, seen)
            if batch.spans and (signal != batch.signal or self.envelope(signal) + grouped + len(batch.data)
                                + len(separator) + len(encoded) + more > self.max_bytes):
                yield batch
                batch, seen, grouped = Batch(separator=separator), set(), 0
                more = self.grouping(signal, origin, seen)
            grouped += more
            seen.add(origin)
            batch.signal = signal
            batch.add(table, row["id"], row["trace_id"], encoded, origin)
        if batch.spans:
            yield batch

    @staticmethod
    def parsing(names: list[str]) -> Callable[[tuple], dict[str, Any]]:
        """Rows of these columns as dicts, their JSON columns parsed, without otrace's bookkeeping
        columns: which columns go and which are parsed worked out once, for a page of rows."""
        internal = [name for name in names if name in INTERNAL_COLUMNS]
        json_columns = [name for name in names if name in JSON_COLUMNS]

        def parsed(row: tuple) -> dict[str, Any]:
            fields = dict(zip(names, row, strict=True))
            for name in internal:
                del fields[name]
            for name in json_columns:
                if value := fields[name]:
                    fields[name] = json_or_text(value)
            return fields
        return parsed

    def rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Each unsynced row, its JSON columns parsed, without otrace's bookkeeping columns."""
        for table in self.tables:
            if self.form.signal(table) in self.dropped:
                continue
            if self.only is not None:
                wanted = self.only.get(table, [])
                for start in range(0, len(wanted), self.PAGE):
                    some = wanted[start:start + self.PAGE]
                    marks = ", ".join("?" * len(some))
                    cursor = self.conn.execute(f"SELECT * FROM {table} WHERE synced = {UNSYNCED} AND "
                                               f"trace_id IN ({marks}) ORDER BY id", some)
                    parsed = self.parsing([d[0] for d in cursor.description])
                    for row in cursor.fetchall():
                        yield table, parsed(row)
                continue
            after = 0
            while True:
                page = (f"SELECT * FROM {table} WHERE synced = {UNSYNCED} AND id > ? ORDER BY id "
                        f"LIMIT {self.PAGE}")
                cursor = self.conn.execute(page, (after,))
                parsed = self.parsing([d[0] for d in cursor.description])
                rows = cursor.fetchall()
                for row in rows:
                    yield table, parsed(row)
                if len(rows) < self.PAGE or self.form.signal(table) in self.dropped:
                    break
                after = rows[-1][0]


def _finite_float(text: str) -> float:
    if not math.isfinite(number := float(text)):
        raise ValueError(f"{text} is too large for JSON")
    return number


def json_or_text(value: str) -> Any:
    """A JSON column's value; its text as it is if it is not JSON (a database from elsewhere, or an
    otrace's fault): one such row must not stop every push."""
    try:
        return json.loads(value, parse_constant=_no_constants, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return value


def _request_target(url: str) -> str:
    """The path and query a request to `url` names (without its user:password@ host)."""
    parts = urllib.parse.urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class OtraceFormat:
    """otrace's own push body (schema otrace.push.v1): one JSON object with the batch's fields, the
    losses to report, and events of any table. Each event's `event_id` (type:trace_id) is unique
    across everything otrace pushes: a trace and an error may share a trace_id."""

    content_type = "application/json"
    separator = b", "

    def __init__(self, config: Config, agent_id: str) -> None:
        self.agent_id = agent_id
        self.target = _request_target(config.push_endpoint)

    def signal(self, table: str) -> str:
        return ""

    @staticmethod
    def origin(table: str, row: dict[str, Any]) -> Origin:
        return None                   # an event's service, if any, is in its data

    def item(self, table: str, row: dict[str, Any]) -> bytes:
        push_type = TABLES[table].push_type
        return json.dumps({"type": push_type, "event_id": f"{push_type}:{row['trace_id']}",
                           "trace_id": row["trace_id"], "data": row}, ensure_ascii=False).encode()

    def report(self, losses: list[dict[str, Any]]) -> Batch:
        """A batch of no events whose head reports the losses."""
        return Batch(losses=losses)

    def body(self, batch: Batch) -> list[bytes | memoryview]:
        """The request body in three parts (sent one after the other, never joined)."""
        head = {"schema": "otrace.push.v1", "batch_id": batch.batch_id, "agent_id": self.agent_id,
                "sent_at": iso(time.time())}
        if batch.losses:
            head["losses"] = batch.losses
        return [json.dumps(head)[:-1].encode() + b', "events": [', memoryview(batch.data), b"]}"]

    def path(self, batch: Batch) -> str:
        return self.target

    def rejected(self, answer: bytes) -> tuple[int, str]:
        return 0, ""


class OtlpFormat:
    """OTLP/HTTP for any OpenTelemetry backend, protobuf or JSON (TRACE_PUSH_OTLP_PROTOCOL): LLM
    calls as GenAI spans, errors, log events and other events as log records, host samples and
    GenAI metric points as metrics. Each event is encoded alone, as a repeated field of its scope
    (a protobuf field, or a JSON array element), so a batch's buffer becomes a whole
    Export*ServiceRequest by putting a few bytes of envelope before and after it (around each origin's
    events, where they came from several)."""

    def __init__(self, config: Config, agent_id: str, cpus: int | None = None) -> None:
        from google.protobuf.message import Error  # noqa: PLC0415 - imported where needed
        from opentelemetry.proto.common.v1 import common_pb2  # noqa: PLC0415
        from opentelemetry.proto.logs.v1 import logs_pb2  # noqa: PLC0415
        from opentelemetry.proto.metrics.v1 import metrics_pb2  # noqa: PLC0415
        from opentelemetry.proto.resource.v1 import resource_pb2  # noqa: PLC0415
        from opentelemetry.proto.trace.v1 import trace_pb2  # noqa: PLC0415
        self.common, self.logs, self.metrics, self.traces = common_pb2, logs_pb2, metrics_pb2, trace_pb2
        self.protobuf_error = Error
        self.json = config.push_otlp_protocol == "http/json"
        self.content_type = "application/json" if self.json else "application/x-protobuf"
        self.separator = b", " if self.json else b""
        self.base = _request_target(config.push_endpoint).split("?", 1)
        self.resource_pb2, self.agent_id, self.host = resource_pb2, agent_id, host_name()
        self.origins: dict[Origin, tuple[Any, Any]] = {}
        # a percent of one core as a share of the machine's CPUs (`cpus`: this one's, online)
        self.core_share = 0.01 / (cpus or os.cpu_count() or 1)

    def signal(self, table: str) -> str:
        return push_signal(table)

    @staticmethod
    def origin(table: str, row: dict[str, Any]) -> Origin:
        """The service and scope of an event that came over OTLP, which the resource and scope it is
        pushed under keep (a relay, as the Collector, keeps them); None: otrace's own."""
        if row.get("source") != "otlp":
            return None
        meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        service, scope = row.get("service") if table == GENAI_METRICS.name else meta.get("service_name"), \
            meta.get("scope")
        origin = tuple(clean_text(value) if isinstance(value, str) and value else None   # a database from
                       for value in (service, scope))                                     # elsewhere too
        return None if origin == (None, None) else origin

    def path(self, batch: Batch) -> str:
        """The endpoint's path with /v1/traces, /v1/metrics or /v1/logs after it, as exporters do."""
        path = self.base[0].rstrip("/") + f"/v1/{batch.signal}"
        return path + (f"?{self.base[1]}" if len(self.base) > 1 else "")

    # -- one row, as messages of its signal
    def item(self, table: str, row: dict[str, Any]) -> bytes:
        """One row encoded; what protobuf cannot hold is a ValueError, as other values the format cannot
        hold, so that the row alone is given up."""
        try:
            messages = self.messages(table, row)
            if self.json:
                return b", ".join(json.dumps(_otlp_json(m), ensure_ascii=False).encode() for m in messages)
            return b"".join(_length_delimited(2, m.SerializeToString()) for m in messages)
        except self.protobuf_error as exc:
            raise ValueError(f"protobuf: {exc}") from exc
        except RecursionError:                   # the stack is deeper here than where it was parsed
            raise ValueError("nested too deeply to encode") from None

    def messages(self, table: str, row: dict[str, Any]) -> list[Any]:
        if table == "llm_traces":
            return [self.span(row)]
        if table == "system_metrics":
            return self.host_metrics(row)
        if table == "genai_metrics":
            return [self.genai_metric(row)]
        if table == "process_samples":
            return self.process_metrics(row)
        return [self.log_record(table, row)]

    def span(self, row: dict[str, Any]) -> Any:
        """An LLM call as a GenAI client span: its OTel ids when it came over OTLP, else ids derived
        from its trace_id, so a span pushed again is the same span."""
        meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        trace_id, span_id = otel_ids(row["trace_id"], meta)
        start = unix_nano(row["created_at"])
        operation = meta.get("gen_ai.operation.name") if isinstance(meta.get("gen_ai.operation.name"), str) \
            else "chat"
        failed = row["status"] == "error"
        inputs = text_messages(row["input_text"], "user")
        outputs = text_messages(row["output_text"], "assistant", (row["finish_reason"] or "").split(",")[0])
        attrs = {"gen_ai.operation.name": operation, "gen_ai.provider.name": provider_name(row["provider"]),
                 "gen_ai.request.model": (requested := meta.get("gen_ai.request.model") or row["model"]),
                 "gen_ai.response.model": row["model"], "gen_ai.conversation.id": row["session_id"],
                 "gen_ai.usage.input_tokens": row["prompt_tokens"],
                 "gen_ai.usage.output_tokens": row["completion_tokens"],
                 "gen_ai.usage.total_tokens": row["total_tokens"],
                 "gen_ai.usage.cache_read.input_tokens": row["cache_read_tokens"],
                 "gen_ai.usage.cache_creation.input_tokens": row["cache_write_tokens"],
                 "gen_ai.usage.reasoning.output_tokens": row["reasoning_tokens"],
                 "gen_ai.response.finish_reasons": row["finish_reason"] and row["finish_reason"].split(","),
                 "gen_ai.response.time_to_first_chunk": row["ttft_ms"] and row["ttft_ms"] / 1000,
                 "gen_ai.input.messages": inputs, "gen_ai.output.messages": outputs,
                 TEXT_MESSAGES_KEY: [side for side, text, sent in (("input", row["input_text"], inputs), (
                     "output", row["output_text"], outputs)) if sent != text] or None,
                 COST_KEY: row["cost_usd"], "otrace.cost_source": row.get("cost_source"),
                 "error.type": row["error_type"] if failed else None, "otrace.trace_id": row["trace_id"],
                 "otrace.source": row["source"]}
        attrs = {key: value for key, value in meta.items()     # the GenAI attributes no column holds
                 if key.startswith(META_PREFIXES) or key in META_KEYS} | {
            key: value for key, value in attrs.items() if value is not None}
        attrs |= {"otrace.metadata": own} if (own := metadata_own(meta, attrs)) else {}
        status = self.traces.Status(code=2, message=row["error_type"] or "") if failed else None
        parent = bytes.fromhex(meta["otel_parent_span_id"]) if _hex_id(meta.get("otel_parent_span_id"), 8) \
            else b""
        return self.traces.Span(
            trace_id=trace_id, span_id=span_id, parent_span_id=parent,
            name=f"{operation} {requested}" if requested else operation,   # the conventions' span name
            kind=3, start_time_unix_nano=start,                       # 3: SPAN_KIND_CLIENT
            end_time_unix_nano=unix_nano(row["created_at"], row["latency_ms"] or 0),
            attributes=self.attributes(attrs), status=status)

    def log_record(self, table: str, row: dict[str, Any]) -> Any:
        """An error event, a log event or any other event as a log record: its text the body, its
        other columns attributes (otrace.<column>)."""
        meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        level = row.get("severity") or row.get("level") or "INFO"
        body = row.get("message") if table != "custom_events" else row.get("name")
        attrs = {f"otrace.{name}": value for name, value in row.items()
                 if name not in OTLP_PUSH_SKIP and name not in ("message", "severity", "level")}
        attrs |= {"otrace.trace_id": row["trace_id"], "otrace.table": table}
        if table == "custom_events" and isinstance(row.get("attributes"), dict):
            attrs.pop("otrace.attributes")
            attrs |= row["attributes"]
        ids = (bytes.fromhex(meta["otel_trace_id"]), bytes.fromhex(meta["otel_span_id"])) if (
            _hex_id(meta.get("otel_trace_id"), 16) and _hex_id(meta.get("otel_span_id"), 8)) else (b"", b"")
        return self.logs.LogRecord(
            time_unix_nano=unix_nano(row["created_at"]),
            observed_time_unix_nano=unix_nano(row["received_at"]),
            severity_number=SEVERITY_NUMBERS.get(str(level).upper(), 9), severity_text=str(level).upper(),
            body=self.value(body), attributes=self.attributes(attrs), trace_id=ids[0], span_id=ids[1],
            event_name=f"otrace.{TABLES[table].push_type if table in TABLES else table}")

    def host_metrics(self, row: dict[str, Any]) -> list[Any]:
        """A host sample as gauges: OpenTelemetry's system.*, container.* (a sample from a cgroup) and
        process.* names where they mean the same, the rest as otrace.host.<column>."""
        at = unix_nano(row["created_at"])
        names = CONTAINER_METRICS if str(row["source"]).startswith("cgroup") else HOST_METRICS
        mount = {"system.filesystem.mountpoint": row["disk_path"]} if row.get("disk_path") else {}
        points = [(*names.get(column, (f"otrace.host.{column}", "", 1, {})), value)
                  for column, value in row.items()
                  if _finite(value) and column not in ("id", "created_at", "received_at")]
        if names is CONTAINER_METRICS and row["cpu_pct"] is not None and row["cpu_cores_effective"]:
            cpus = row["cpu_pct"] / 100 * row["cpu_cores_effective"]
            points.append(("container.cpu.usage", "{cpu}", 1, {}, cpus))
        return [self.gauge(name, unit, self.scaled(value, scale), at, self.attributes(
                    attrs | mount if name.startswith("system.filesystem") else attrs))
                for name, unit, scale, attrs, value in points]

    def process_metrics(self, row: dict[str, Any]) -> list[Any]:
        """One process of a process-table sample as process.* gauges, the process in each point."""
        attrs = self.attributes({
            "process.pid": row["pid"], "process.parent_pid": row["ppid"],
            "process.executable.name": row["name"], "process.command_line": row["cmdline"],
            "process.owner": row["user"],
            "otrace.cpu_rank": row["cpu_rank"], "otrace.rss_rank": row["rss_rank"]})
        at = unix_nano(row["created_at"])
        return [self.gauge(name, unit, self.scaled(row[column], scale), at, attrs)
                for column, (name, unit, scale) in PROCESS_METRICS.items() if _finite(row[column])]

    def scaled(self, value: float, scale: float | str) -> float:
        """A column's value at its metric's scale (CORE_SHARE: of all the CPUs, not of one)."""
        return value if scale == 1 else value * (self.core_share if scale is CORE_SHARE else scale)

    def gauge(self, name: str, unit: str, value: float, at: int, attributes: Any) -> Any:
        """A gauge of one point, at its scale already: an integer as one, else a double."""
        point = self.metrics.NumberDataPoint(time_unix_nano=at, attributes=attributes)
        if isinstance(value, int):
            point.as_int = value
        else:
            point.as_double = value
        return self.metrics.Metric(name=name, unit=unit, gauge=self.metrics.Gauge(data_points=[point]))

    def genai_metric(self, row: dict[str, Any]) -> Any:
        """A GenAI metric point as itself: a delta sum or histogram over its window, or a gauge."""
        attrs = self.attributes(row["attributes"] if isinstance(row.get("attributes"), dict) else {})
        end, start = unix_nano(row["created_at"]), unix_nano(row["window_start"] or 0)
        metric = self.metrics.Metric(name=row["name"], unit=row["unit"] or "")
        if row["kind"] == "histogram":
            buckets = row["buckets"] if isinstance(row.get("buckets"), dict) else {}
            point = self.metrics.HistogramDataPoint(
                start_time_unix_nano=start, time_unix_nano=end, attributes=attrs, count=row["count"] or 0,
                sum=row["value"] or 0.0, bucket_counts=buckets.get("counts", []),
                explicit_bounds=buckets.get("bounds", []))
            for bound in ("min", "max"):
                if row[bound] is not None:
                    setattr(point, bound, row[bound])
            metric.histogram.CopyFrom(self.metrics.Histogram(data_points=[point], aggregation_temporality=1))
            return metric
        point = self.metrics.NumberDataPoint(start_time_unix_nano=start if row["kind"] == "sum" else 0,
                                             time_unix_nano=end, attributes=attrs,
                                             as_double=row["value"] or 0.0)
        if row["kind"] == "sum":
            monotonic = row.get("monotonic")      # None: stored before otrace kept it, told by its sign
            metric.sum.CopyFrom(self.metrics.Sum(data_points=[point], aggregation_temporality=1,   # delta
                                                 is_monotonic=bool(monotonic) if monotonic is not None
                                                 else (row["value"] or 0) >= 0))
        else:
            metric.gauge.CopyFrom(self.metrics.Gauge(data_points=[point]))
        return metric

    def report(self, losses: list[dict[str, Any]]) -> Batch:
        """What was given up, as WARN log records of its own batch (event name otrace.loss)."""
        batch = Batch("logs", self.separator, losses=losses)
        for loss in losses:
            record = self.logs.LogRecord(
                time_unix_nano=unix_nano(loss["at"]), observed_time_unix_nano=time.time_ns(),
                severity_number=13, severity_text="WARN",
                event_name=LOSS_EVENT, body=self.value(
                    f"otrace gave up {loss['rows']} {loss['table']} row(s): {loss['reason']}"),
                attributes=self.attributes({f"otrace.loss.{k}": v for k, v in loss.items()}))
            encoded = (json.dumps(_otlp_json(record)).encode() if self.json
                       else _length_delimited(2, record.SerializeToString()))
            batch.add(LOSS, 0, str(loss.get("trace_id") or loss["kind"]), encoded)
        return batch

    # -- the envelope
    def body(self, batch: Batch) -> list[bytes | memoryview]:
        """The Export*ServiceRequest around the batch's events: a resource (service.name, host.name)
        and a scope for each origin (otrace's own: the agent's name, scope otrace), each around its
        events, in parts sent one after the other."""
        groups = batch.groups() or {None: []}
        parts: list[bytes | memoryview] = []
        between = f'{{"{OTLP_ENVELOPE[batch.signal][0]}": ['.encode() if self.json else b""
        for origin, indexes in groups.items():
            events = memoryview(batch.data) if len(groups) == 1 else \
                self.separator.join(map(batch.event, indexes))
            before, after = self.group(batch.signal, origin, len(events))
            parts += [between + before, events, after]
            between = self.separator
        if self.json:
            parts[-1] += b"]}"
        return [part for part in parts if len(part)]

    def group(self, signal: str, origin: Origin, size: int) -> tuple[bytes, bytes]:
        """The bytes before and after `size` bytes of events of one origin: a Resource{Spans,Logs,
        Metrics} holding its resource and one Scope{Spans,Logs,Metrics}."""
        resource, scope = self.wrapping(origin)
        if self.json:
            _, scopes, items = OTLP_ENVELOPE[signal]
            before, after = json.dumps({"resource": _otlp_json(resource), scopes: [
                {"scope": _otlp_json(scope), items: ["@"]}]}).split('"@"')
            return before.encode(), after.encode()
        scoped = _length_delimited(1, scope.SerializeToString())
        resourced = _length_delimited(1, resource.SerializeToString()) + _field_head(2, len(scoped) + size) \
            + scoped
        return _field_head(1, len(resourced) + size) + resourced, b""

    def wrapping(self, origin: Origin) -> tuple[Any, Any]:
        """The Resource and InstrumentationScope of an origin: otrace's own (the agent's name, this
        host), or the service an event came with (else the agent's name) and the otrace that relays it
        (its host may be another), and its scope (else otrace's)."""
        if origin not in self.origins:
            if len(self.origins) >= 256:          # origins are a handful; a sender inventing more
                self.origins.clear()              # costs only their rebuilding
            service, scope = origin or (None, None)
            resource = {"service.name": self.agent_id, "host.name": self.host} if origin is None else {
                "service.name": service or self.agent_id, "otrace.agent_id": self.agent_id}
            self.origins[origin] = (
                self.resource_pb2.Resource(attributes=self.attributes(resource)),
                self.common.InstrumentationScope(name=scope) if scope else
                self.common.InstrumentationScope(name="otrace", version=__version__))
        return self.origins[origin]

    def rejected(self, answer: bytes) -> tuple[int, str]:
        """partial_success's count of items the receiver refused and its message, read from the start
        of its answer (protobuf: Export*ServiceResponse field 1, its fields 1 and 2); 0 when it says
        none."""
        if self.json:
            found, said = _REJECTED_JSON.search(answer), _PARTIAL_SAID_JSON.search(answer)
            with contextlib.suppress(ValueError):
                said = said and json.loads(b'"' + said[1] + b'"')
            return (int(found[1]) if found else 0), said if isinstance(said, str) else ""
        if answer[:1] != b"\n":
            return 0, ""
        size, at = _read_varint(answer, 1)
        end, count, said = min(len(answer), at + size), 0, b""
        while at < end:
            key, at = _read_varint(answer, at)
            if key & 7 == 0:                                  # a varint: the count, or a field to skip
                value, at = _read_varint(answer, at)
                count = value if key == 0x08 else count
            elif key & 7 == 2:                                # bytes: the message, or a field to skip
                size, at = _read_varint(answer, at)
                said = answer[at:at + size] if key == 0x12 else said
                at += size
            elif key & 7 in (1, 5):                           # a fixed 64 or 32 bits
                at += 8 if key & 7 == 1 else 4
            else:
                break
        return count, said.decode("utf-8", "replace")

    # -- values
    def attributes(self, values: dict[str, Any], depth: int = 0) -> list[Any]:
        return [self.common.KeyValue(key=key, value=self.value(value, depth)) for key, value in values.items()
                if value is not None]

    def value(self, value: Any, depth: int = 0) -> Any:
        """An OTLP AnyValue of a JSON value; nested deeper than OTLP_VALUE_DEPTH, its JSON text (protobuf
        parsers stop at 100 message levels, three a level of key-value list)."""
        common = self.common
        if isinstance(value, (list, tuple, dict)) and depth >= OTLP_VALUE_DEPTH:
            try:
                return common.AnyValue(string_value=json.dumps(value, ensure_ascii=False, default=str))
            except RecursionError:         # parsed near the API's limit, frames deeper here
                return common.AnyValue(string_value=TOO_DEEP_TO_SEND)
        if isinstance(value, bool):
            return common.AnyValue(bool_value=value)
        if isinstance(value, int) and -2**63 <= value < 2**63:
            return common.AnyValue(int_value=value)
        if isinstance(value, float):
            return common.AnyValue(double_value=value)
        if isinstance(value, (list, tuple)):
            return common.AnyValue(array_value=common.ArrayValue(values=[self.value(v, depth + 1)
                                                                         for v in value]))
        if isinstance(value, dict):
            return common.AnyValue(kvlist_value=common.KeyValueList(values=self.attributes(value, depth + 1)))
        return common.AnyValue(string_value="" if value is None else str(value))


def unix_nano(ms: float, later_ms: float = 0.0) -> int:
    """Unix ms (and `later_ms` after it) as OTLP's unsigned 64-bit nanoseconds: a time past 2554
    (otrace takes up to 9999) is held at the largest."""
    return min(max(0, round(ms * 1_000_000) + round(later_ms * 1_000_000)), 2**64 - 1)


def otel_ids(trace_id: str, meta: dict[str, Any]) -> tuple[bytes, bytes]:
    """A row's span ids: the OTel ids it came with, else 16 and 8 bytes derived from its trace_id."""
    if _hex_id(meta.get("otel_trace_id"), 16) and _hex_id(meta.get("otel_span_id"), 8):
        return bytes.fromhex(meta["otel_trace_id"]), bytes.fromhex(meta["otel_span_id"])
    import hashlib  # noqa: PLC0415 - push has OpenSSL loaded already (urllib3)
    digest = hashlib.blake2b(trace_id.encode("utf-8", "surrogatepass"), digest_size=24,
                             person=b"otrace-span").digest()
    return digest[:16], digest[16:]


def _hex_id(value: Any, size: int) -> bool:
    return isinstance(value, str) and len(value) == 2 * size and all(c in "0123456789abcdef" for c in value) \
        and value.strip("0") != ""


def _otlp_json(message: Any) -> Any:
    """A message in OTLP JSON: the proto3 JSON mapping, with enums as numbers and ids in hex."""
    from google.protobuf import json_format  # noqa: PLC0415 - loaded with the classes
    doc = json_format.MessageToDict(message, use_integers_for_enums=True)
    _ids_to_hex(doc)
    return doc


def _ids_to_hex(node: Any) -> None:
    import base64  # noqa: PLC0415 - imported where needed (see the imports)
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ID_FIELDS and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            else:
                _ids_to_hex(value)
    elif isinstance(node, list):
        for item in node:
            _ids_to_hex(item)


def _field_head(number: int, length: int) -> bytes:
    """The tag and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field_head(number, len(payload)) + payload


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint at `at` and where it ends (a cut answer reads as what was there)."""
    value = shift = 0
    while at < len(data):
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            break
    return value, at


def unreported_losses(conn: sqlite3.Connection, tables: tuple[str, ...]) -> list[dict[str, Any]]:
    """What the receiver must be told was given up of `tables`: rows retention deleted unpushed, and
    rows it refused one by one. Reported with the first batch of a cycle, marked reported on its 2xx."""
    if not tables:
        return []
    of = f"table_name IN ({', '.join('?' * len(tables))})"
    ledger = conn.execute(
        "SELECT id, at, table_name, reason, unsynced_deleted, oldest_received_at, newest_received_at "
        f"FROM retention_ledger WHERE reported_at IS NULL AND unsynced_deleted > 0 AND {of} ORDER BY id "
        f"LIMIT {LOSSES_PER_BATCH}", tables).fetchall()
    refused = conn.execute(
        "SELECT id, rejected_at, table_name, trace_id, http_status, reason FROM push_rejects "
        f"WHERE reported_at IS NULL AND {of} ORDER BY id LIMIT {LOSSES_PER_BATCH}", tables).fetchall()
    return [{"kind": "retention", "ledger_id": i, "at": at, "table": t, "reason": r, "rows": n,
             "oldest_received_at": old, "newest_received_at": new} for i, at, t, r, n, old, new in ledger] + [
            {"kind": "refused", "reject_id": i, "at": at, "table": t, "reason": "refused_by_receiver",
             "rows": 1, "trace_id": trace_id, "http_status": status, "receiver_said": said}
            for i, at, t, trace_id, status, said in refused]


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
    answer: bytes = b""                      # the start of the receiver's answer (ANSWER_LIMIT)
    rejected: int = 0                        # items a 2xx answer says it refused (OTLP partial_success)
    path: str = ""                           # where it went (OTLP: one path a signal), query aside

    @property
    def verdict(self) -> str:
        """ok (taken: a 2xx, also one whose partial_success refused items, which OTLP forbids sending
        again), retry (try the same batch later), split (its content was refused) or config (the
        endpoint or token is wrong: retrying cannot help)."""
        status = self.status
        if status is None or status in (408, 429) or status >= 500:
            return "retry"
        if 200 <= status < 300:
            return "ok"
        if status in (401, 403, 404, 405, 407) or status < 200 or 300 <= status < 400:
            return "config"
        return "split"

    def summary(self) -> str:
        """"HTTP 405 on /v1/logs: why the receiver said so", or the network error."""
        if self.status is None:
            return self.error or "unknown error"
        return f"HTTP {self.status} on {self.path}" + (f": {self.error}" if self.error else "")


class Scrubber:
    """Takes otrace's own credentials (push's, the ingest token) out of any text otrace keeps or
    shows: a receiver may echo the request's Authorization header in its error body, an error may
    quote the URL, a command line may carry the token; and what looks like a credential of any other
    (redact_text)."""

    def __init__(self, config: Config) -> None:
        import base64  # noqa: PLC0415 - imported where needed (see the imports)
        parts = urllib.parse.urlsplit(config.push_endpoint)
        secrets = {config.push_token, config.ingest_token, *(value for _, value in config.push_headers)}
        if parts.username is not None:                   # the user too: a token is often sent as one
            user, password = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
            secrets |= {parts.username, user, parts.password or "", password, f"{user}:{password}",
                        base64.b64encode(f"{user}:{password}".encode()).decode()}
        for pair in re.split("[&;]", parts.query):       # each value as sent and as meant, and a bare
            raw = pair.partition("=")[2] if "=" in pair else pair if len(pair) >= 16 else ""   # token whole
            secrets |= {raw, urllib.parse.unquote_plus(raw)}
        # and as an echo may escape them: in JSON (json_forms) or in a URL (a slash kept or not, a
        # space as +)
        secrets |= {form for s in secrets for form in (*json_forms(s), urllib.parse.quote(s, safe=""),
                                                       urllib.parse.quote(s), urllib.parse.quote_plus(s))}
        self.secrets = sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        return redact_text(self.own(text))

    def own(self, text: str) -> str:
        """The text without otrace's own credentials (whatever else it holds)."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def json_forms(text: str) -> tuple[str, ...]:
    """The text inside a JSON string, as encoders write it: Python's, with slashes escaped (PHP's), and
    with & < > escaped too (Go's)."""
    quoted = json.dumps(text)[1:-1]
    go = quoted.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    return quoted, quoted.replace("/", "\\/"), go


HEADER_FAULT = "Failed to parse headers (url=%s): %s"     # urllib3's warning (connection.py)


class Receiver:
    """The remote API: one pooled urllib3 connection with verified TLS, no redirects and no retries of
    its own (the Pusher decides). TRACE_PUSH_TIMEOUT bounds a whole request, from connecting to the
    last byte of the answer, and no more than ANSWER_LIMIT bytes of an answer are kept."""

    def __init__(self, config: Config, scrub: Scrubber) -> None:
        import urllib3  # noqa: PLC0415 - imported where needed (see the imports)
        self.urllib3, self.scrub = urllib3, scrub
        self.timeout, self.gzip = config.push_timeout, config.push_gzip
        parts = urllib.parse.urlsplit(config.push_endpoint)
        url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        self.headers = {"User-Agent": f"otrace/{__version__}", **dict(config.push_headers)}
        if config.push_token:
            self.headers["Authorization"] = f"Bearer {config.push_token}"
        elif parts.username is not None:
            self.headers["Authorization"] = urllib3.make_headers(basic_auth=(    # UTF-8, as RFC 7617 says:
                f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            ), basic_auth_encoding="utf-8")["authorization"]                  # latin-1 has no '€'
        if config.push_gzip:
            self.headers["Content-Encoding"] = "gzip"
        self.pool = urllib3.connection_from_url(url, maxsize=1, retries=False)
        self.pool.ConnectionCls = _watched(self.pool.ConnectionCls, self)
        self.sock: socket.socket | None = None          # the pooled connection's, for the watchdog
        self.timed_out = False

    def post(self, batch: Batch, form: OtraceFormat | OtlpFormat, deadline: float | None) -> Attempt:
        """Send one batch in the push format; the attempt holds what came of it."""
        body: list[bytes | memoryview] = form.body(batch)
        target = form.path(batch)
        attempt = Attempt(batch.batch_id, now_ms(), batch.events, sum(map(len, body)),
                          path=urllib.parse.urlsplit(target).path)
        if self.gzip:
            import gzip  # noqa: PLC0415 - imported where needed (see the imports)
            body = [gzip.compress(b"".join(body), 6)]
        headers = {**self.headers, "Content-Type": form.content_type, "Idempotency-Key": batch.batch_id,
                   "Content-Length": str(sum(map(len, body)))}   # so the parts go as they are
        self.send(attempt, target, body, headers, deadline)
        if attempt.status is not None and 200 <= attempt.status < 300:
            count, said = form.rejected(attempt.answer)
            # an int64: below 0 is none; of spans and log records, at most the batch's (a metric row
            # is several points)
            most = MAX_INT if batch.signal == "metrics" else len(batch)
            attempt.rejected = 0 if count >= 2**63 else min(count, most)
            if attempt.rejected:
                # of every record sent, a loss report's too (batch.events leaves them out); a metric
                # row is several points, which the receiver counts
                attempt.error = f"partial_success: {attempt.rejected} of {len(batch)} refused" if (
                    batch.signal != "metrics") else (f"partial_success: {attempt.rejected} data points "
                                                     f"refused, of {len(batch)} rows")
                attempt.error += f": {self.scrub(said.strip())[:500]}" if said.strip() else ""
        return attempt

    def send(self, attempt: Attempt, target: str, body: list[bytes | memoryview], headers: dict[str, str],
             deadline: float | None) -> None:
        """One whole exchange, cut off by a watchdog at TRACE_PUSH_TIMEOUT (or the deadline)."""
        budget = self.timeout if deadline is None else max(0.1, min(self.timeout,
                                                                     deadline - time.monotonic()))
        self.timed_out = False
        watchdog = threading.Timer(budget, self.cut)
        watchdog.daemon = True
        started = time.monotonic()
        faults: list[str] = []

        def header_fault(record: logging.LogRecord) -> bool:
            """urllib3's warning of an answer whose headers it could not parse: this exchange's fault,
            said as such, not logged with a traceback."""
            if record.msg == HEADER_FAULT:
                faults.append(str(record.args[-1]) if isinstance(record.args, tuple) and record.args else "")
                return False
            return True

        urllib3_log = logging.getLogger("urllib3.connection")
        urllib3_log.addFilter(header_fault)
        watchdog.start()
        try:
            resp = self.pool.urlopen("POST", target, body=body, headers=headers, redirect=False,
                                     retries=False, preload_content=False, release_conn=False,
                                     timeout=self.urllib3.Timeout(connect=min(10.0, budget), read=budget))
            attempt.status = resp.status
            attempt.retry_after = self.retry_after(resp.headers.get("Retry-After"))
            cut = self.read_answer(resp, attempt) or (faults and f"its headers are cut off or malformed: "
                                                                f"{self.scrub(faults[0])[:200]}")
            if cut:       # no whole answer: the receiver (or a proxy) may have died before taking it
                attempt.status, attempt.error = None, f"answer cut off after HTTP {resp.status}: {cut}"
        except (self.urllib3.exceptions.HTTPError, OSError) as exc:
            attempt.error = self.scrub(describe(exc))
        finally:
            watchdog.cancel()
            urllib3_log.removeFilter(header_fault)
        if self.timed_out:
            attempt.status, attempt.error = None, f"no whole answer within {budget:g} s (TRACE_PUSH_TIMEOUT)"
        attempt.duration_ms = round((time.monotonic() - started) * 1000, 3)

    def read_answer(self, resp: Any, attempt: Attempt) -> str | None:
        """The answer's first ANSWER_LIMIT bytes, the rest read and dropped; why it is not whole, if it
        was cut off (shorter than its Content-Length, a broken chunk, or over ANSWER_DRAIN). One cut
        off leaves the connection closed, not back in the pool."""
        try:
            answer, cut = resp.read(ANSWER_LIMIT + 1, decode_content=False), None
            dropped = len(answer) - ANSWER_LIMIT
            while dropped > 0 and (more := resp.read(READ_CHUNK, decode_content=False)):  # the rest, to
                dropped += len(more)                                                # know it whole
                if dropped > ANSWER_DRAIN:
                    cut = f"over {ANSWER_DRAIN} bytes: not read to its end"
                    break
            cut = cut or (f"{resp.length_remaining} bytes of its body missing" if resp.length_remaining
                          else None)
        except (self.urllib3.exceptions.HTTPError, OSError) as exc:
            answer, cut = b"", self.scrub(describe(exc))
        if cut:
            resp.close()
        resp.release_conn()
        attempt.answer = answer[:ANSWER_LIMIT]
        if not 200 <= resp.status < 300:
            attempt.error = self.scrub(attempt.answer.decode("utf-8", "replace").strip())[:500] or None
        return cut

    def retry_after(self, value: str | None) -> float | None:
        """A Retry-After header (seconds, or an HTTP date) as seconds from now, at most as long as the
        breaker's longest wait (a receiver's typo must not stop push for a day)."""
        if not value:
            return None
        try:
            return min(self.urllib3.util.Retry().parse_retry_after(value), Breaker.MAX_COOLDOWN)
        except self.urllib3.exceptions.InvalidHeader:
            return None

    def cut(self) -> None:
        """The watchdog: unblock the exchange under way by shutting its socket down."""
        self.timed_out = True
        with contextlib.suppress(OSError, AttributeError):
            self.sock.shutdown(socket.SHUT_RDWR)


def _watched(base: type, receiver: Receiver) -> type:
    """urllib3's connection class, telling the receiver its socket once connected, and reading answers
    past interim ones."""
    import http.client  # noqa: PLC0415 - imported where needed (see the imports)

    class PastInterim(http.client.HTTPResponse):
        """http.client skips `100 Continue` alone, and would take a `102 Processing` or `103 Early
        Hints` for the answer (101 switches protocols: left as the answer)."""

        def _read_status(self) -> tuple[str, int, str]:
            while True:
                version, status, reason = super()._read_status()
                if not 101 < status < 200:
                    return version, status, reason
                http.client.parse_headers(self.fp)         # the interim answer's headers, dropped

    class Watched(base):
        response_class = PastInterim

        def connect(self) -> None:
            super().connect()
            receiver.sock = self.sock

    Watched.__name__ = Watched.__qualname__ = base.__name__     # as urllib3's errors name it
    return Watched


class Breaker:
    """Circuit breaker over push cycles: after `threshold` failed cycles in a row it opens, and lets
    one cycle try per cool-down, which doubles with each further failure (up to MAX_COOLDOWN)."""

    MAX_COOLDOWN = 3600.0

    def __init__(self, threshold: int, cooldown: float) -> None:
        self.threshold, self.cooldown = threshold, cooldown
        self.failures = 0
        self.retry_at = 0.0      # time.monotonic() of the next try while open: a clock set back waits not
        self.last_error: str | None = None   # why its last cycle failed

    @property
    def state(self) -> str:
        if self.failures < self.threshold:
            return "closed"
        return "open" if time.monotonic() < self.retry_at else "half_open"

    def allows(self) -> bool:
        return self.state != "open"

    def cycle_ended(self, ok: bool, error: str | None = None) -> None:
        if ok:
            self.failures, self.retry_at, self.last_error = 0, 0.0, None
            return
        self.failures, self.last_error = self.failures + 1, error or "unknown error"
        if self.failures >= self.threshold:
            doublings = min(self.failures - self.threshold, 30)
            self.retry_at = time.monotonic() + min(self.MAX_COOLDOWN, self.cooldown * 2**doublings)


class Breakers:
    """A breaker for each signal pushed: an OTLP receiver may lack, or fail on, one signal's endpoint
    while it takes the others (otrace's format is one signal, named ""). A signal whose breaker is
    open is left out of the cycles until its cool-down ends."""

    def __init__(self, signals: Iterable[str], threshold: int, cooldown: float) -> None:
        self.of = {signal: Breaker(threshold, cooldown) for signal in signals}

    def open(self) -> set[str]:
        """The signals whose breaker is open: a cycle leaves them out."""
        return {name for name, breaker in self.of.items() if not breaker.allows()}

    def allows(self) -> bool:
        return any(breaker.allows() for breaker in self.of.values())

    def next_delay(self, interval: float) -> float:
        """The interval, or less when an open breaker's cool-down ends before it."""
        now = time.monotonic()
        return min(max(0.0, b.retry_at - now) if b.state == "open" else interval for b in self.of.values())

    @property
    def state(self) -> str:
        """The worst of them."""
        states = {breaker.state for breaker in self.of.values()}
        return next(state for state in ("open", "half_open", "closed") if state in states)

    @property
    def failures(self) -> int:
        return max(breaker.failures for breaker in self.of.values())

    @property
    def retry_at(self) -> float:
        """When the first open breaker lets a cycle try (0 if none is open)."""
        return min((b.retry_at for b in self.of.values() if b.state == "open"), default=0.0)

    def cycle_ended(self, ok: bool | None, held: Collection[str], failed: dict[str, Attempt],
                    error: str | None) -> None:
        """The signals in `failed` failed their cycle (their endpoint faulted, or their trial was
        refused); the others that were not held out took the cycle's outcome (None: a cycle that
        neither succeeded nor failed, see Pusher.push), and `error` with a failure."""
        for name, breaker in self.of.items():
            if name in failed:
                breaker.cycle_ended(False, failed[name].summary())
            elif ok is not None and name not in held:
                breaker.cycle_ended(ok, error)

    def health(self) -> dict[str, Any]:
        return {name: {"state": (state := breaker.state), "consecutive_failures": breaker.failures,
                       "next_attempt_at": iso(wall_time(breaker.retry_at)) if state == "open" else None,
                       "last_error": breaker.last_error}
                for name, breaker in self.of.items()}


REFUSALS_IN_A_ROW = 64      # answers refusing a signal's content with no acceptance between: it waits
MAX_SUSPECTS = 10_000       # events refused alone, kept out of batches until sent again (their keys)
SUSPECTS_A_BATCH = 16       # suspects sent again together: their search stays under REFUSALS_IN_A_ROW
SUSPECTS_A_CYCLE = 1024     # suspects sent again in one cycle (at most about twice as many requests)


@dataclasses.dataclass
class Cycle:
    """What one push cycle learned: whether the receiver accepted anything, how many events it refused
    alone (and each signal's first answer), how many of them were new suspects and which were poison,
    how many answers in a row refused content of each signal, which signals it left (for refusals, an
    open breaker or a fault of their endpoint), and the confirmed batch the writer is marking synced
    while the next one is sent."""

    accepted: bool = False
    refused: int = 0
    refused_by: dict[str, Attempt] = dataclasses.field(default_factory=dict)   # each signal's first
    poison: list[tuple[Batch, Attempt]] = dataclasses.field(default_factory=list)
    new_suspects: int = 0
    cut: set[str] = dataclasses.field(default_factory=set)   # signals left by REFUSALS_IN_A_ROW
    held: set[str] = dataclasses.field(default_factory=set)  # left out: an open breaker, a Retry-After
    faulted: dict[str, Attempt] = dataclasses.field(default_factory=dict)   # signals left by a fault
    faults: int = 0                  # the whole receiver's: no answer (in otrace's format, any fault)
    refusals_in_a_row: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    marking: Future | None = None    # its result: how many events it marked
    packer: Packer | None = None
    read_at: int = 0                 # merges counted when its read began (see Merges)
    idle: bool = False               # it had nothing new, and the receiver refused every suspect again
    stopped: bool = False            # by the whole receiver (no answer...) or out of time
    waiting: set[str] = dataclasses.field(default_factory=set)   # held by their endpoint's Retry-After
    trials_failed: dict[str, Attempt] = dataclasses.field(default_factory=dict)   # of open breakers

    @property
    def first_refusal(self) -> Attempt | None:
        return next(iter(self.refused_by.values()), None)

    @property
    def left(self) -> set[str]:
        """The signals it sends no more."""
        return self.cut | self.held | self.faulted.keys()


class Pusher(Loop):
    """The one thread that pushes: a cycle every TRACE_PUSH_INTERVAL (spaced out by the breaker) and a
    last one at shutdown. A lock makes sure no two cycles ever run at once."""

    def __init__(self, config: Config, events: EventQueue, db: Database) -> None:
        super().__init__("push", config.push_interval, first_delay=min(config.push_interval, 5.0))
        self.stuck_after = STUCK_TICK + config.push_timeout      # it moves on at each answer
        self.config, self.events, self.db = config, events, db
        self.receiver = Receiver(config, Scrubber(config))
        self.format = (OtlpFormat if config.push_format == "otlp" else OtraceFormat)(
            config, config.agent_id or host_name())
        self.tables = tuple(t for t in EVENT_TABLES if push_signal(t) in config.push_signals)
        # in OTLP a loss report is log records: sent only to a receiver that takes logs
        self.loss_tables = self.tables if config.push_format == "otrace" or "logs" in config.push_signals \
            else ()
        self.breakers = Breakers(config.push_signals if config.push_format == "otlp" else ("",),
                                 config.push_breaker_threshold, config.push_breaker_cooldown)
        # events refused alone, left out of the batches until a cycle the receiver accepts others in
        # sends them again: poison then, if refused alone again and proven (see refused_alone); else
        # a receiver that may refuse everything
        self.suspects: dict[tuple[str, str], tuple[int, bool]] = {}   # (table, trace_id): ids change
        # batches that took events, by the tables they held (a receiver may refuse one kind: all LLM
        # calls, say, or an OTLP signal); a suspect keeps its table's count
        self.acceptances: collections.Counter[str] = collections.Counter()
        self.cycle_lock = threading.Lock()
        # monotonic time a Retry-After asked to wait for: the receiver's (""), or an OTLP signal's endpoint's
        self.not_before: dict[str, float] = {}
        # a signal's Retry-After answers since its last 2xx or failure: each is one of its retries
        self.throttled: collections.Counter[str] = collections.Counter()
        self.partly = MinuteLog(self.log, "answers_since_last_line", summed=("refused",))   # by signal
        self.last_time: float | None = None
        self.last_status = "never"
        self.last_error: str | None = None
        last_ok = db.query(        # push_log too: a database whose otrace_state lacks the key
            "SELECT max(at) FROM (SELECT value AS at FROM otrace_state WHERE key = ? UNION ALL "
            f"SELECT max(started_at) FROM push_log WHERE {CONFIRMED_SQL})", (PUSHED_KEY,))
        self.last_success: float | None = last_ok[0][0] / 1000 if last_ok and last_ok[0][0] else None
        self.failing: tuple[float, int] | None = None   # since when, and how many cycles failed in a row
        self.totals = Counters(("events", "batches", "refused", "unencodable", "failed"))

    def next_delay(self) -> float:
        return self.breakers.next_delay(self.interval)

    def tick(self) -> None:
        self.partly.flush()                  # a burst of partial refusals that ended: said
        if self.breakers.allows():
            self.push(deadline=None)

    def push(self, deadline: float | None) -> bool:
        """One cycle: send every unsynced row, batch by batch, until done, refused or out of time."""
        wait = 0.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.cycle_lock.acquire(timeout=wait):
            return False
        try:
            complete = self.run_cycle(deadline)
            self.apply_held(deadline)
            return complete
        finally:
            self.db.merges.cycle_ended()      # after a fault: what it held back stays, as if pushed
            self.cycle_lock.release()

    def run_cycle(self, deadline: float | None) -> bool:
        """The cycle, under the cycle lock: True if it sent every row it could."""
        started = time.monotonic()
        waiting = {name for name, breaker in self.breakers.of.items()
                   if name and breaker.allows() and self.retry_after_left(name) > 0}
        cycle = Cycle(held=self.breakers.open() | waiting, waiting=waiting)
        try:
            with self.db.reading() as conn:
                cycle.read_at = self.db.merges.read_begins()   # once a move reading() waited out is done
                cycle.stopped = not self.send(self.batches(conn, cycle, deadline), deadline, cycle)
        finally:
            self.wait_marked(cycle, deadline)
        cut_short = bool(cycle.cut) and not cycle.accepted     # refusals ran on, nothing accepted
        ok = self.settle(cycle, deadline) and not cycle.stopped and not cut_short
        if self.suspects and ok:
            ok = self.retry_suspects(cycle, deadline)
        self.wait_out(cycle, deadline, started + self.interval if deadline is None else deadline)
        ok = ok and not cycle.stopped and not (cycle.refused and not cycle.accepted)   # its sends too
        # a cycle cut short by refusals that found new suspects got further into the queue, and the
        # next starts past them; one with nothing new tried nothing: neither counts for the breaker
        progressed = cut_short and cycle.new_suspects > 0 and cycle.faults == 0
        if ok and self.last_status == "never":
            self.last_status = "ok"     # nothing was waiting: the receiver is not known to be down
        if not ok and self.stopping.is_set() and (deadline is None or time.monotonic() >= deadline):
            self.log.info("push cycle cut short by shutdown")
            return False
        if progressed:
            self.log.info("push cycle cut short by refused events: the next goes on past them", extra={
                "new_suspects": cycle.new_suspects, "suspects": len(self.suspects)})
        self.judge(cycle, ok, progressed)
        return ok and not cycle.idle and not cycle.faulted and not cycle.held

    def apply_held(self, deadline: float | None) -> None:
        """The deletions of unpushed rows held back while the cycle ran (Merges.holding_back), once what
        it delivered is marked: applied where their rows are still unpushed, before the next cycle."""
        if held := self.db.merges.cycle_ended():
            self.events.call(functools.partial(delete_unpushed, self.db.merges, held),
                             self.job_timeout(deadline))

    def judge(self, cycle: Cycle, ok: bool, progressed: bool) -> None:
        """A cycle's outcome to the breakers, and said: the signals that failed, a failed cycle, the
        first that succeeds after failures."""
        # a cycle stopped by the whole receiver failed every signal; one in which content was refused
        # and none accepted failed the signals refused (see also retry_suspects: idle cycles)
        refusing = {} if ok or cycle.stopped or progressed or cycle.idle else {
            name: attempt for name, attempt in cycle.refused_by.items() if name not in cycle.held}
        self.breakers.cycle_ended(True if ok else False if cycle.stopped else None, cycle.held,
                                  refusing | cycle.trials_failed | cycle.faulted, self.last_error)
        for name, attempt in cycle.faulted.items():
            breaker = self.breakers.of[name]
            self.log.warning("push of a signal failed: its rows wait, the others go on", extra={
                "signal": name, "status": attempt.status, "error": attempt.summary(),
                "breaker": breaker.state, "consecutive_failures": breaker.failures})
        if not ok and not progressed and (not cycle.idle or cycle.trials_failed):
            self.log.warning("push cycle failed", extra={
                "status": self.last_status, "error": self.last_error, "breaker": self.breakers.state,
                "consecutive_failures": self.breakers.failures})
            since, failed = self.failing or (time.time(), 0)
            self.failing = since, failed + 1
        elif ok and cycle.accepted and self.failing:     # the receiver took rows again
            since, failed = self.failing
            self.log.warning("push cycles succeed again", extra={
                "failed_cycles": failed, "failed_seconds": round(time.time() - since, 3)})
            self.failing = None

    def packer(self, conn: sqlite3.Connection, tables: Iterable[str], deadline: float | None,
               **rows: Any) -> Packer:
        """A packer of this push's rows (`rows`: skip or only) that stops at the final push's deadline,
        or, in a cycle of the loop, once otrace begins to stop."""
        return Packer(conn, self.config.push_max_bytes, tables, self.format, deadline=deadline,
                      stopping=self.stopping if deadline is None else None, **rows)

    def batches(self, conn: sqlite3.Connection, cycle: Cycle, deadline: float | None) -> Iterator[Batch]:
        """The cycle's batches; first, what was given up since the last report (in otrace's format,
        in the head of its first batch of events)."""
        losses = unreported_losses(conn, self.loss_tables)
        cycle.packer = self.packer(conn, self.tables, deadline, skip=set(self.suspects))
        cycle.packer.dropped |= cycle.held
        batches = cycle.packer.batches()
        if losses:
            report = self.format.report(losses)
            if not report.spans and (first := next(batches, None)):
                first.losses = losses
                report = first
            yield report
        yield from batches

    def send(self, batches: Iterable[Batch], deadline: float | None, cycle: Cycle) -> bool:
        """Deliver the batches in order; a signal whose refusals run to REFUSALS_IN_A_ROW, or whose
        endpoint faults (in OTLP), waits for the next cycle while the others go on. False if a batch
        could not be delivered otherwise (no answer, any fault in otrace's format, out of time)."""
        try:
            for batch in batches:
                if batch.signal in cycle.left:
                    continue
                if not self.deliver(batch, deadline, cycle):
                    if batch.signal not in cycle.left:
                        return False
                    if cycle.packer:
                        cycle.packer.dropped.add(batch.signal)
        except OutOfTime:
            return False
        return True

    def deliver(self, batch: Batch, deadline: float | None, cycle: Cycle,
                split_at: collections.Counter[str] | None = None) -> bool:
        """Send one batch until it is confirmed, split, or the cycle gives up on it (False). split_at:
        the acceptances counted when the batch it is half of was refused."""
        backoff = Backoff(self.config.push_backoff_base, self.config.push_backoff_cap)
        attempts = 1 if deadline is not None else self.config.push_retries
        for number in range(1, attempts + 1):
            if (self.stopping.is_set() and deadline is None) or (
                    deadline is not None and time.monotonic() >= deadline) or not self.waited_out(deadline):
                return False
            attempt = self.receiver.post(batch, self.format, deadline)
            self.progress()
            verdict = attempt.verdict
            if attempt.retry_after and verdict == "retry":     # a 2xx asks no wait, a 4xx no retry
                whose = batch.signal if self.signal_fault(attempt) else ""
                self.not_before[whose] = time.monotonic() + attempt.retry_after
            self.note(attempt, verdict)
            in_a_row = cycle.refusals_in_a_row[batch.signal] = (
                cycle.refusals_in_a_row[batch.signal] + 1 if verdict == "split" else 0)
            cycle.faults += verdict in ("retry", "config") and not self.signal_fault(attempt)
            if verdict == "ok":
                self.wait_marked(cycle, deadline)      # the batch before, while this one was sent
                cycle.marking = self.events.submit(functools.partial(
                    record_pushed, batch, attempt, self.db.merges, cycle.read_at))
                if batch.events and attempt.rejected < batch.events:   # it took events: proof for suspects
                    cycle.accepted = True
                    self.acceptances.update({table for table, _, _, _, _ in batch.spans})
                if attempt.rejected:
                    self.partly_refused(batch, attempt)
                self.throttled.pop(batch.signal, None)
                for table, _, trace_id, _, _ in batch.spans if self.suspects else ():
                    self.suspects.pop((table, trace_id), None)
                return True
            self.events.submit(functools.partial(record_attempt, attempt))
            if verdict == "config":
                return self.faulted(batch, attempt, cycle)
            if verdict == "split":
                if not batch.ids():       # a report of losses alone, refused: the events go on, it
                    return True           # is tried again next cycle
                if len(batch) == 1:
                    self.refused_alone(batch, attempt, cycle, split_at)
                if in_a_row >= REFUSALS_IN_A_ROW:
                    cycle.cut.add(batch.signal)
                    return False                 # the receiver may refuse all of this signal
                if len(batch) == 1:
                    return True
                refused_at = self.acceptances.copy()
                return all(self.deliver(half, deadline, cycle, refused_at) for half in batch.halves())
            if attempt.retry_after and self.signal_fault(attempt):   # the signal waits, the others go
                self.throttled[batch.signal] += 1                      # on: an attempt of its retries
                if self.throttled[batch.signal] < self.config.push_retries:
                    cycle.held.add(batch.signal)
                    cycle.waiting.add(batch.signal)
                    return False
                return self.faulted(batch, attempt, cycle)
            wait = backoff.next()                # and a Retry-After is waited out by held()
            if (number == attempts or self.db.replaced_pending      # a move waits for this cycle's read
                    or (deadline is not None and time.monotonic() + wait > deadline)):
                return self.faulted(batch, attempt, cycle)
            if self.rest(wait):
                return False
        return False

    def retry_after_left(self, whose: str) -> float:
        """Seconds a Retry-After still asks to wait: the receiver's (""), or a signal's endpoint's (a
        cycle leaves that signal out meanwhile)."""
        return self.not_before.get(whose, 0.0) - time.monotonic()

    def wait_out(self, cycle: Cycle, deadline: float | None, until: float) -> None:
        """Once the other signals have gone, send those whose endpoint asked to wait (Retry-After),
        soonest first, each when its wait ends if that is before `until` (the next cycle's time, or
        the shutdown deadline); the others wait for a later cycle."""
        while cycle.waiting and not cycle.stopped:
            name = min(cycle.waiting, key=self.retry_after_left)
            cycle.waiting.discard(name)
            tables = [table for table in self.tables if self.format.signal(table) == name]
            with self.db.reading() as conn:
                if not any(conn.execute(f"SELECT 1 FROM {table} WHERE synced = {UNSYNCED} LIMIT 1").fetchone()
                           for table in tables):
                    continue             # nothing of it to send: no reason to wait
            wait = max(0.0, self.retry_after_left(name))
            if time.monotonic() + wait > until:
                return
            if deadline is not None:
                time.sleep(wait)         # the last push: stopping is already set
            elif self.rest(wait):
                return
            cycle.held.discard(name)
            with self.db.reading() as conn:
                cycle.read_at = self.db.merges.read_begins()    # what changed while it waited goes now
                batches = self.packer(conn, tables, deadline, skip=set(self.suspects)).batches()
                cycle.stopped = not self.send(batches, deadline, cycle)
            self.wait_marked(cycle, deadline)

    def signal_fault(self, attempt: Attempt) -> bool:
        """An OTLP endpoint's own fault: an HTTP answer (a 5xx, 404, 401, a 429: backends keep a quota
        for each signal) on one signal's path. No answer is the whole receiver's."""
        return isinstance(self.format, OtlpFormat) and attempt.status is not None

    def faulted(self, batch: Batch, attempt: Attempt, cycle: Cycle) -> bool:
        """A batch given up for this cycle on a fault; one of its signal's endpoint leaves the signal."""
        if self.signal_fault(attempt):
            cycle.faulted.setdefault(batch.signal, attempt)
            self.throttled.pop(batch.signal, None)
        return False

    def waited_out(self, deadline: float | None) -> bool:
        """Wait out the receiver's last Retry-After, in this cycle or a later one (a 429 on a cycle's
        last attempt holds the next cycle back too); False if stopping or the deadline comes first."""
        left = self.retry_after_left("")
        if left <= 0:
            return True
        if deadline is None:
            return not self.rest(left)
        if time.monotonic() + left > deadline:
            return False
        time.sleep(left)                 # the final push at shutdown: stopping is already set
        return True

    def wait_marked(self, cycle: Cycle, deadline: float | None) -> None:
        """Wait until the writer has marked the last confirmed batch synced. Raises if it could not
        (the cycle ends; its rows stay unsynced and go again)."""
        if cycle.marking is None:
            return
        future, cycle.marking = cycle.marking, None
        self.totals.add("events", future.result(timeout=self.job_timeout(deadline)))
        self.totals.add("batches")

    def settle(self, cycle: Cycle, deadline: float | None) -> bool:
        """Rows the push format cannot hold are given up (and reported). A cycle in which the
        receiver refused events and accepted none failed: they stay, suspects, for the next."""
        if cycle.packer and (unencodable := cycle.packer.unencodable):
            attempt = Attempt("", now_ms(), 1, 0, status=0,        # 0: never sent
                              error=f"cannot be sent as {self.config.push_format}")
            self.totals.add("unencodable", self.events.call(functools.partial(record_refused, [
                (table, row_id, trace_id, dataclasses.replace(attempt, error=f"{attempt.error}: {why}"))
                for table, row_id, trace_id, why in unencodable]), self.job_timeout(deadline)))
            self.log.error("events that cannot be sent in the push format: given up, reported in the next "
                           "push", extra={"events": len(unencodable), "first": {
                               "table": unencodable[0][0], "trace_id": unencodable[0][2],
                               "reason": unencodable[0][3]}})
        if cycle.refused and not cycle.accepted:       # for a cycle that sent new events, it failed
            self.say_kept(cycle)
            return False
        return True

    def partly_refused(self, batch: Batch, attempt: Attempt) -> None:
        """Items a batch's 2xx refused (partial_success): counted, and said at most once a minute for
        each signal."""
        refused = min(attempt.rejected, batch.events)          # rows, at most: points of metrics
        self.totals.add("refused", refused)
        self.partly.say(batch.signal, "receiver took a batch but refused some of its items: those are given "
                        "up, not sent again", {"signal": batch.signal, "error": attempt.summary(),
                                               "refused": refused})

    def refused_alone(self, batch: Batch, attempt: Attempt, cycle: Cycle,
                      split_at: collections.Counter[str] | None) -> None:
        """An event refused on its own: a suspect, proven if the receiver accepted events of its table in
        part of the batch it was split from. Poison, refused again, if proven or the receiver has
        accepted other events of its table since its last refusal: a receiver that turned to refusing
        everything, or everything of that kind, has done neither."""
        table, _, trace_id, _, _ = batch.spans[0]
        key = (table, trace_id)
        accepted = self.acceptances[table]
        refused_at, proven = self.suspects.get(key, (None, False))
        if refused_at is not None and (proven or accepted > refused_at):
            cycle.poison.append((batch, attempt))
            return
        if refused_at is not None or len(self.suspects) < MAX_SUSPECTS:
            cycle.new_suspects += refused_at is None
            self.suspects[key] = (accepted, split_at is not None and accepted > split_at[table])
        cycle.refused += 1
        cycle.refused_by.setdefault(batch.signal, attempt)

    def say_kept(self, cycle: Cycle, sent: str = "sent this cycle", level: int = logging.WARNING) -> None:
        """Events refused by a receiver that accepted none since: they stay, for the next cycle."""
        first = cycle.first_refusal
        self.log.log(level, f"receiver refused every event {sent}: keeping them for the next", extra={
            "refused": cycle.refused, "status": first and first.status, "reason": first and first.error})

    def retry_suspects(self, cycle: Cycle, deadline: float | None) -> bool:
        """After a cycle that went through, the events refused alone (in it or before) are read again
        and sent, in batches split as any batch is. One refused alone again with proof (refused_alone)
        is poison: given up, reported in the next push. Those refused without proof stay suspects;
        if the cycle had nothing new (the receiver refuses one signal, or everything, or this is poison
        with nothing else to tell them apart: the next event decides), the breakers are left as they
        were, but for an open breaker's trial whose suspects were refused again: it failed."""
        again = Cycle(held=cycle.held | cycle.faulted.keys())
        asked: set[tuple[str, str]] = set()
        found: set[tuple[str, str]] = set()
        suspects = sorted(key for key in self.suspects if self.format.signal(key[0]) not in again.held
                          )[:SUSPECTS_A_CYCLE]
        delivered = True

        def noting(batches: Iterator[Batch]) -> Iterator[Batch]:
            for batch in batches:
                found.update((table, trace_id) for table, _, trace_id, _, _ in batch.spans)
                yield batch

        try:
            with self.db.reading() as conn:
                again.read_at, taken = self.db.merges.read_begins(), None
                for start in range(0, len(suspects), SUSPECTS_A_BATCH):
                    wanted: dict[str, list[str]] = {}
                    for table, trace_id in suspects[start:start + SUSPECTS_A_BATCH]:
                        if self.format.signal(table) not in again.left:
                            wanted.setdefault(table, []).append(trace_id)
                            asked.add((table, trace_id))
                    # the few before were accepted or poison: the receiver takes events, and a run of
                    # poison must not cut the search short; else its refusals run on and may end it
                    if taken != (now := (self.acceptances.total(), len(again.poison))):
                        again.refusals_in_a_row.clear()
                    taken = now
                    batches = self.packer(conn, self.tables, deadline, only=wanted).batches()
                    if not (delivered := self.send(noting(batches), deadline, again)):
                        break
                for key in asked - found if delivered else ():       # gone, pushed or given up meanwhile
                    self.suspects.pop(key, None)
        finally:
            self.wait_marked(again, deadline)
            cycle.faulted |= again.faulted
            cycle.held |= again.held - cycle.faulted.keys()
            cycle.waiting |= again.waiting
            cycle.stopped = not delivered
        if again.poison:
            self.give_up(again.poison, deadline)
        if again.refused and not again.accepted:        # it may refuse everything, or one signal
            self.say_kept(again, "sent again", logging.INFO if cycle.accepted else logging.WARNING)
            if not cycle.accepted:                       # nothing new was tried: the breakers are left
                # alone, but for the one trial each lets through once open: refused again, it failed
                cycle.idle = delivered
                cycle.trials_failed = {name: attempt for name, attempt in again.refused_by.items()
                                       if self.breakers.of[name].state == "half_open"}
                return False
        return delivered

    def give_up(self, poison: list[tuple[Batch, Attempt]], deadline: float | None) -> None:
        refused = [(*batch.spans[0][:3], attempt) for batch, attempt in poison]
        for table, _, trace_id, _ in refused:
            self.suspects.pop((table, trace_id), None)
        self.totals.add("refused", self.events.call(functools.partial(record_refused, refused),
                                                    self.job_timeout(deadline)))
        self.log.warning("events refused by the receiver while it accepted others: given up, reported "
                         "in the next push", extra={"refused": len(refused), "first": {
                             "table": refused[0][0], "trace_id": refused[0][2],
                             "status": refused[0][3].status, "reason": refused[0][3].error}})

    def job_timeout(self, deadline: float | None) -> float:
        """How long to wait for the writer to record an outcome; the cycle ends (rows unsynced) if it
        cannot be committed."""
        return JOB_TIMEOUT if deadline is None else max(0.1, deadline - time.monotonic())

    def final_push(self, deadline: float) -> None:
        """The last push, at shutdown: what time allows. The rest stays unsynced for the next start."""
        if not self.breakers.allows():
            self.log.info("final push skipped: circuit breaker open", extra={
                "next_attempt_at": iso(wall_time(self.breakers.retry_at))})
        else:
            before = self.totals.snapshot()["events"]
            try:
                complete = self.push(deadline)
            except Exception as exc:  # noqa: BLE001 - the rows stay unsynced; shutdown goes on
                self.log.warning("final push stopped", extra={"error": describe(exc)})
                complete = False
            self.log.info("final push", extra={"complete": complete, "status": self.last_status,
                                               "events_pushed": self.totals.snapshot()["events"] - before})
        self.partly.flush(now=math.inf)           # a burst's count, said before the stop

    def note(self, attempt: Attempt, verdict: str) -> None:
        """Remember the latest answer for /health."""
        self.last_time = time.time()
        self.last_status = "refused" if attempt.rejected else {
            "ok": "ok", "retry": "failed", "split": "refused", "config": "config_error"}[verdict]
        self.last_error = None if verdict == "ok" and not attempt.rejected else attempt.summary()
        if verdict != "ok":
            self.totals.add("failed")
        elif not attempt.rejected:            # a batch taken whole: its request began then, as push_log says
            self.last_success = attempt.started_at / 1000

    def health(self) -> dict[str, Any]:
        totals = self.totals.snapshot()
        return {
            "endpoint": redact_url(self.config.push_endpoint),
            "signals": list(self.config.push_signals),
            "breaker": self.breakers.state,
            "consecutive_failures": self.breakers.failures,
            "next_attempt_at": iso(wall_time(self.breakers.retry_at)) if self.breakers.state == "open" else
            None,
            "held_by_retry_after_until": self.hold_until(""),
            "last_push_time": self.last_time and iso(self.last_time),
            "last_push_status": self.last_status,
            "last_success_time": self.last_success and iso(self.last_success),
            "last_error": self.last_error,
            "events_pushed": totals["events"],
            "batches_pushed": totals["batches"],
            "events_refused_by_receiver": totals["refused"],
            "events_refused_waiting": len(self.suspects),      # kept out of batches, not given up
            "events_unencodable": totals["unencodable"],
            **({"breakers": {name: {**breaker, "held_by_retry_after_until": self.hold_until(name)}
                             for name, breaker in self.breakers.health().items()}}
               if isinstance(self.format, OtlpFormat) else {}),
        }

    def hold_until(self, whose: str) -> str | None:
        return iso(time.time() + hold) if (hold := self.retry_after_left(whose)) > 0 else None


def delete_unpushed(merges: Merges, statements: list[tuple[str, tuple]], conn: sqlite3.Connection) -> None:
    """Deletions a push cycle held back, now that it ended (held back again if another has begun)."""
    with merges.holding_back(statements) as now, transaction(conn):
        for sql, params in now:
            conn.execute(sql, params)


def record_attempt(attempt: Attempt, conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO push_log (batch_id, started_at, duration_ms, events, bytes, http_status, "
                 "error, retry_after_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (attempt.batch_id, attempt.started_at, attempt.duration_ms, attempt.events, attempt.bytes,
                  attempt.status, attempt.error, attempt.retry_after))


def record_pushed(batch: Batch, attempt: Attempt, merges: Merges, read_at: int,
                  conn: sqlite3.Connection) -> int:
    """Mark exactly the batch's rows synced, but those merged since they were read (they go again),
    and the losses it reported, with its push_log row, in one transaction. Returns the rows marked.
    Read from a file since replaced, nothing is marked: its rows and losses go again from the new one.
    A row that goes again gets its pushed_at alone: the receiver has it, so it is never deleted unpushed."""
    if merges.replaced_since(read_at):
        changed = {(table, trace_id) for table, _, trace_id, _, _ in batch.spans if table != LOSS}
        marked, losses = {}, []
    else:
        changed = merges.after(read_at, ((table, trace_id) for table, _, trace_id, _, _ in batch.spans))
        marked, losses = batch.ids(leaving=changed), batch.losses
    with transaction(conn):
        for table, trace_id in sorted(changed):
            conn.execute(f"UPDATE {table} SET pushed_at = ? WHERE trace_id = ? AND synced = {UNSYNCED}",
                         (attempt.started_at, trace_id))
        for table, ids in marked.items():
            runs = id_runs(ids)
            if conn.executemany(f"UPDATE {table} SET synced = {SYNCED}, pushed_at = ? WHERE id BETWEEN ? "
                                "AND ?", [(attempt.started_at, low, high) for low, high in runs]
                                ).rowcount < len(ids):
                delivered_after_all(conn, table, ids, runs, merges)
        for loss in losses:   # after: a ledger row read for this report may have counted rows it carried
            if loss["kind"] == "retention":
                mark_reported(conn, loss, attempt.started_at)
            elif conn.execute("UPDATE push_rejects SET reported_at = ? WHERE id = ? RETURNING id",
                              (attempt.started_at, loss["reject_id"])).fetchone():
                conn.execute(f"UPDATE {loss['table']} SET synced = {REFUSED_REPORTED} WHERE trace_id = ? "
                             f"AND synced = {REFUSED}", (loss["trace_id"],))
        record_attempt(attempt, conn)
        if not attempt.rejected:
            conn.execute(STATE_SQL, (PUSHED_KEY, attempt.started_at, attempt.started_at))
    return sum(map(len, marked.values()))


def delivered_after_all(conn: sqlite3.Connection, table: str, ids: list[int], runs: list[tuple[int, int]],
                        merges: Merges) -> None:
    """Rows of a confirmed batch that retention deleted while it was on its way: those it counted lost
    leave the count of the ledger row they were added to, not reported yet (a report is read at a
    cycle's start, before these deletions), so the receiver is not told it lacks what it holds."""
    found = {row_id for low, high in runs for (row_id,) in conn.execute(
        f"SELECT id FROM {table} WHERE id BETWEEN ? AND ?", (low, high))}
    for (pass_id, reason), rows in merges.gone(table, (i for i in ids if i not in found)).items():
        conn.execute("UPDATE retention_ledger SET unsynced_deleted = max(0, unsynced_deleted - ?) WHERE "
                     "pass_id = ? AND table_name = ? AND reason = ?",
                     (rows, ledger_key(conn, pass_id, table, reason), table, reason))


def id_runs(ids: list[int]) -> list[tuple[int, int]]:
    """Ascending ids as runs of consecutive integers (first, last): one UPDATE per run, not per row,
    and exact, since every id inside a run is one of `ids`."""
    runs: list[tuple[int, int]] = []
    if not ids:
        return runs
    low = high = ids[0]
    for row_id in itertools.islice(ids, 1, None):
        if row_id != high + 1:
            runs.append((low, high))
            low = row_id
        high = row_id
    runs.append((low, high))
    return runs


def record_refused(refused: list[tuple[str, int, str, Attempt]], conn: sqlite3.Connection) -> int:
    """Take rows the receiver refused on their own out of the push queue, keeping why. By trace_id:
    the row's id is another in a database file that replaced the one it was read from. A row no
    longer waiting has no refusal to report: retention deleted it (its ledger reports it), or a copy
    of this batch's answer was taken already. Returns how many it filed."""
    filed = 0
    with transaction(conn):
        for table, _, trace_id, attempt in refused:
            if found := conn.execute(f"UPDATE {table} SET synced = {REFUSED} WHERE trace_id = ? AND "
                                     f"synced = {UNSYNCED} RETURNING id", (trace_id,)).fetchone():
                conn.execute("INSERT INTO push_rejects (table_name, row_id, trace_id, rejected_at, "
                             "http_status, reason) VALUES (?, ?, ?, ?, ?, ?)",
                             (table, found[0], trace_id, now_ms(), attempt.status, attempt.error))
                filed += 1
    return filed


def return_big_buffers() -> None:
    """Have glibc map buffers over 128 KiB on their own, so big ones (a push's batch, an OTLP body) go
    back to the system when freed (left alone, glibc keeps them in its heap; see docs/performance.md)."""
    m_mmap_threshold = -3
    with contextlib.suppress(AttributeError):          # not glibc: nothing to tune
        if (lib := libc()) is not None:
            lib.mallopt(m_mmap_threshold, 128 * 1024)


# ============================================================================================== upkeep
# Living inside a small volume for months: checkpoints that shrink the WAL, and retention that deletes
# pushed rows first and records every unpushed row it has to give up, in the same transaction.

LEDGER_SQL = (
    "INSERT INTO retention_ledger (pass_id, at, table_name, reason, deleted, unsynced_deleted, "
    "oldest_received_at, newest_received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (pass_id, table_name, reason) DO UPDATE SET deleted = deleted + excluded.deleted, "
    "unsynced_deleted = unsynced_deleted + excluded.unsynced_deleted, "
    "oldest_received_at = coalesce(min(oldest_received_at, excluded.oldest_received_at), "
    "oldest_received_at, excluded.oldest_received_at), "
    "newest_received_at = coalesce(max(newest_received_at, excluded.newest_received_at), "
    "newest_received_at, excluded.newest_received_at)")
HOUR_MS = 3_600_000               # a retention ledger row's span (its pass_id is the UTC hour)
SAMPLE_TABLES = ("system_metrics", "process_samples")    # otrace's own samples: the first to go unpushed
DELETED_KEY = "deleted_through."     # otrace_state: the latest arrival (received_at) of a row deleted
BOOKKEEPING = (("push_log", "started_at", ""), ("push_rejects", "rejected_at", "AND reported_at IS NOT NULL"),
               ("log_offsets", "updated_at", ""), ("openclaw_attempts", "created_at", ""),
               ("otlp_series", "updated_at", ""),
               # a ledger row holds its hour's deletions, dated by the first: kept until the last is as old
               ("retention_ledger", f"at + {HOUR_MS}",
                "AND (reported_at IS NOT NULL OR unsynced_deleted = 0)"))
# The newest row of a table stays: SQLite numbers a new row after the largest id there is, so deleting
# it would hand its id out again, and a push's 2xx, which marks its batch's rows by id, would mark a
# row it never sent.
BELOW_NEWEST = "id < (SELECT max(id) FROM {table})"
CHUNK = 1000                     # rows one deletion takes at most; under a smaller cap, one row per
CHUNK_SHARE = 200_000            # this many bytes of it: a chunk of 2 KB rows frees about 1 % of the cap
RELIEF_TIME = 0.005              # seconds of chunks one job runs under the cap: about a batch


CHECKPOINTS = threading.Lock()   # one at a time: a TRUNCATE that met the checkpointer's copy would give up
SNAPSHOT_POLL = 0.002            # seconds between the writer's copies while it waits out a brief snapshot


def checkpoint(mode: str, conn: sqlite3.Connection) -> dict[str, int]:
    """A WAL checkpoint, once no other is under way. After TRUNCATE the page counts read 0."""
    with CHECKPOINTS, never_waiting(conn):
        busy, wal_pages, moved = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    return {"busy": busy, "wal_pages": wal_pages, "checkpointed_pages": moved}


@contextlib.contextmanager
def never_waiting(conn: sqlite3.Connection) -> Iterator[None]:
    """No busy timeout for a TRUNCATE checkpoint: it would wait for every reader to finish (an `otrace
    report`, a user's sqlite3 shell), holding the writer. Meeting one, it checkpoints what it can and
    says busy; a later one truncates."""
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT * 1000:.0f}")


class Checkpointer(Loop):
    """Keeps the WAL copied into the database without holding the writer through the copy. The writer's
    own autocheckpoint copies an autocheckpoint's worth of pages and fsyncs twice while requests queue
    up; so the writer wakes this loop (`watch`) each time it has changed half that many rows (a changed
    row dirties a page: a rough count of the WAL's), and the loop copies on a connection of its own
    (PASSIVE: nobody waits for it), then has the writer copy what it appended meanwhile, between two
    batches: SQLite starts the WAL over only once a checkpoint has copied all of it, and only the
    writer's can (when the copies fall behind, the writer copies on its own: `watch`). Every
    TRACE_CHECKPOINT_INTERVAL it does the same; once the WAL is over TRACE_WAL_MAX_BYTES, the writer
    checkpoints with TRUNCATE instead, since a passive checkpoint reuses the WAL file but never shrinks
    it."""

    def __init__(self, config: Config, events: EventQueue, db: Database) -> None:
        super().__init__("checkpoint", config.checkpoint_interval)
        self.events, self.db, self.limit, self.wal_path = events, db, config.wal_max_bytes, db.path + "-wal"
        self.step = autocheckpoint_pages(config, DB_PAGE) // 2
        self.most = wal_limit(config, DB_PAGE)
        self.seen = 0              # the writer's changes when it last woke the loop
        self.woken = False
        # since when (monotonic) the writer's copies leave frames under a snapshot, a batch longer: the
        # WAL stays as large as the reader made it until the next write starts it over
        self.held_since: float | None = None
        self.left = False          # the writer's last copy left frames

    def watch(self, conn: sqlite3.Connection, room: int = 0) -> None:
        """On the writer's thread, after each batch, with its connection. A WAL past the journal size
        limit was not started over since it grew there (SQLite cuts it back to that then): the copies
        fall behind, so the writer copies too, as its autocheckpoint did, and the WAL keeps to its
        share of the cap. Past `room` too (what it may take: Retention.wal_room), a snapshot that leaves
        frames uncopied is waited out while it is brief (LONG_HOLD from when it began: a push's read,
        a look at /health, this loop's copy): every batch committed under it is appended to a WAL that
        cannot start over, and a queue's worth of them lands within milliseconds, past the cap. A
        reader's, held longer, is let be."""
        if self.db.replaced_pending:
            return
        if (changes := conn.total_changes) < self.seen:      # a new connection (a replaced file)
            self.seen = 0
        if changes - self.seen >= self.step:
            self.seen, self.woken = changes, True
            self.wake()
        if file_size(self.wal_path) <= self.most:
            self.held_since, self.left = None, False   # started over (cut back to the limit), or small
            return
        if (left := self.copy_left(conn)) is None:
            return
        if left and self.held_since is None:
            self.held_since = time.monotonic()
        elif not (left or self.left):
            self.held_since = None
        while left and file_size(self.wal_path) > max(self.most, room) and (
                time.monotonic() - self.held_since < LONG_HOLD):
            time.sleep(SNAPSHOT_POLL)
            if (again := self.copy_left(conn)) is None:
                break
            left = again
        self.left = left

    def copy_left(self, conn: sqlite3.Connection) -> bool | None:
        """The writer's own copy: whether it left frames (with no write beside it, only a snapshot makes
        it), None if it failed (as SQLite's own autocheckpoint: the batch stands, the next tries)."""
        try:
            result = checkpoint("PASSIVE", conn)
        except sqlite3.Error as exc:
            self.log.debug("wal checkpoint failed", extra={"by": "writer", "error": describe(exc)})
            return None
        return result["checkpointed_pages"] < result["wal_pages"]

    def tick(self) -> None:
        woken, self.woken = self.woken, False
        before = file_size(self.wal_path)
        if before > self.limit:
            mode, result = "truncate", self.events.call(functools.partial(checkpoint, "TRUNCATE"))
        else:
            aside = self.copy_aside()
            mode, result = "passive", {**self.events.call(functools.partial(checkpoint, "PASSIVE")),
                                       "copied_aside": aside}
        # a burst's copies are many, and so are the TRUNCATEs a long reader keeps busy: debug
        say = self.log.debug if woken and (mode == "passive" or result.get("busy")) else self.log.info
        say("wal checkpoint", extra={"mode": mode, **result, "wal_bytes_before": before,
                                     "wal_bytes_after": file_size(self.wal_path)})

    def copy_aside(self) -> int:
        """A PASSIVE checkpoint on a connection of the loop's own: how many pages it copied."""
        with self.db.reading(read_only=False) as conn:
            return checkpoint("PASSIVE", conn)["checkpointed_pages"]


@dataclasses.dataclass(frozen=True)
class Cut:
    """One kind of deletion: rows matching `where`, oldest first, from whichever of `tables` holds the
    oldest, for `reason` in a pass. Called on the writer's connection, it deletes one chunk and its
    ledger entry in one transaction and returns what it did, with the bytes the rows left still use:
    a pass needs no reading connection of its own, whose snapshot would keep the WAL growing."""

    tables: tuple[str, ...]
    where: str
    reason: str
    pass_id: str
    params: tuple = ()
    limit: int = CHUNK
    merges: Merges | None = None     # told of the unpushed rows deleted: a push may be delivering them

    def __call__(self, conn: sqlite3.Connection) -> Chunk:
        with transaction(conn):
            table = oldest_table(conn, self.tables, self.where, self.params)
            gone = [] if table is None else conn.execute(
                f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {self.where} AND "
                f"{BELOW_NEWEST.format(table=table)} ORDER BY id LIMIT {self.limit}) "
                "RETURNING id, synced, received_at", self.params).fetchall()
            # a refused row is not counted lost: its refusal is reported on its own (push_rejects)
            lost = [(row_id, received) for row_id, synced, received in gone if synced == UNSYNCED]
            if gone:
                times = [received for _, received in lost]
                conn.execute(LEDGER_SQL, (ledger_key(conn, self.pass_id, table, self.reason), now_ms(), table,
                                          self.reason, len(gone), len(lost), min(times, default=None),
                                          max(times, default=None)))
            if lost:        # the ledger's count goes down as losses are delivered after all, or age out
                conn.execute(ADD_SQL, (UNPUSHED_KEY + table, len(lost), now_ms()))
            if gone:        # kept for good, where the ledger's rows go with age: see Report.calls_incomplete
                newest = max(received for _, _, received in gone)
                conn.execute(MAX_SQL, (DELETED_KEY + table, newest, now_ms()))
        if self.merges and lost:
            self.merges.deleted(table, [row_id for row_id, _ in lost], self.pass_id, self.reason)
        return Chunk(table, self.reason, len(gone), len(lost), live_bytes(conn))


def ledger_hour() -> str:
    """The pass_id a pass files its deletions under: the UTC hour. Under a small cap a pass may come
    every few seconds, and a ledger row for each would crowd the cap it keeps."""
    return time.strftime("%Y-%m-%dT%H", time.gmtime())


def ledger_key(conn: sqlite3.Connection, pass_id: str, table: str, reason: str) -> str:
    """The pass_id of the pass's ledger row a chunk adds to: once a push reported that row, a new row
    keyed after it, so that what the pass deletes after the report is reported too. At most one row
    of a pass, table and reason is unreported, the last (see mark_reported)."""
    key = pass_id
    while True:
        row = conn.execute("SELECT id, reported_at FROM retention_ledger WHERE pass_id = ? AND "
                           "table_name = ? AND reason = ?", (key, table, reason)).fetchone()
        if row is None or row[1] is None:
            return key
        key = f"{pass_id}.{row[0]}"


def mark_reported(conn: sqlite3.Connection, loss: dict[str, Any], at: int) -> None:
    """Mark a ledger row reported as the push read it, and add the pass's reported row to it: a pass
    reported at every push cycle keeps two rows, not one a cycle. Rows a chunk of its pass added
    since the read move to the pass's next row, reported next (every reported row has only unpushed
    rows: deleted = lost, but for those a push delivered as they went: delivered_after_all)."""
    found = conn.execute("SELECT pass_id, table_name, reason, unsynced_deleted, oldest_received_at, "
                         "newest_received_at FROM retention_ledger WHERE id = ? AND at = ? AND "
                         "reported_at IS NULL", (loss["ledger_id"], loss["at"])).fetchone()
    if found is None:                            # marked by a copy of this batch
        return
    key, table, reason, rows, oldest, newest = found
    pass_id = key.partition(".")[0]              # a later row's key is the pass's, a dot, and more
    conn.execute("UPDATE retention_ledger SET reported_at = ?, deleted = deleted - ?, unsynced_deleted = ?, "
                 "oldest_received_at = ?, newest_received_at = ? WHERE id = ?", (
                     at, rows - loss["rows"], loss["rows"], loss["oldest_received_at"],
                     loss["newest_received_at"], loss["ledger_id"]))
    if key != pass_id and (first := conn.execute(
            "DELETE FROM retention_ledger WHERE pass_id = ? AND table_name = ? AND reason = ? AND "
            "reported_at IS NOT NULL RETURNING at, deleted, unsynced_deleted, oldest_received_at, "
            "newest_received_at", (pass_id, table, reason)).fetchone()):
        # the later row takes the pass's key: the older id goes, never handed out again as a newer one
        conn.execute("UPDATE retention_ledger SET pass_id = ?, at = ?, deleted = deleted + ?, "
                     "unsynced_deleted = unsynced_deleted + ?, oldest_received_at = min(oldest_received_at, "
                     "?), newest_received_at = max(newest_received_at, ?) WHERE id = ?",
                     (pass_id, *first, loss["ledger_id"]))
    if rows > loss["rows"]:
        conn.execute(LEDGER_SQL, (ledger_key(conn, pass_id, table, reason), now_ms(), table, reason,
                                  rows - loss["rows"], rows - loss["rows"], oldest, newest))


class Chunk(NamedTuple):
    """What one Cut did."""

    table: str | None        # None: no row matched
    reason: str
    deleted: int
    lost: int                # of the deleted rows, the ones never pushed
    live_bytes: int          # after it


def oldest_table(conn: sqlite3.Connection, tables: Iterable[str], where: str, params: tuple = ()
                 ) -> str | None:
    """Which of `tables` holds the oldest row (by arrival) matching `where`, its newest row aside
    (BELOW_NEWEST); None if none does."""
    heads = [(head[0], table) for table in tables if (head := conn.execute(
        f"SELECT received_at FROM {table} WHERE {where} AND {BELOW_NEWEST.format(table=table)} ORDER BY id "
        "LIMIT 1", params).fetchone())]
    return min(heads)[1] if heads else None


def prune(table: str, column: str, cutoff: int, extra: str, conn: sqlite3.Connection) -> int:
    """Delete one chunk of bookkeeping rows (push_log, ...) older than `cutoff`."""
    return conn.execute(f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {column} < ? "
                        f"{extra} ORDER BY id LIMIT {CHUNK})", (cutoff,)).rowcount


def live_bytes(conn: sqlite3.Connection) -> int:
    """The bytes of the pages in use as of the last commit (WAL included): what the file shrinks to."""
    (pages,), (free,), (size,) = (conn.execute(f"PRAGMA {name}").fetchone()
                                  for name in ("page_count", "freelist_count", "page_size"))
    return (pages - free) * size


def shrink(pages: int, conn: sqlite3.Connection) -> dict[str, int]:
    """Give up to `pages` freed pages back to the filesystem: incremental vacuum, then a TRUNCATE
    checkpoint; "free" is how many free pages the file still holds."""
    conn.executescript(f"PRAGMA incremental_vacuum({pages});")   # execute() would step it once
    return {**checkpoint("TRUNCATE", conn), "free": conn.execute("PRAGMA freelist_count").fetchone()[0]}


@dataclasses.dataclass(frozen=True)
class Tier:
    """One step of the deletion order under pressure."""

    reason: str
    tables: tuple[str, ...]
    where: str
    for_disk: bool           # disk pressure may always use it: it holds no row whose deletion is a loss
    chunk: int               # rows per transaction: small where every row deleted is a row lost
    merges: Merges | None = None

    def cut(self, pass_id: str) -> Cut:
        return Cut(self.tables, self.where, self.reason, pass_id, limit=self.chunk, merges=self.merges)


class Relief(NamedTuple):
    """What one relief job did under the cap."""

    chunks: list[Chunk]
    live_bytes: int                  # after it
    tiers: tuple[Tier, ...]          # those not run out yet, for the next job (looking is not free)
    failed: Exception | None = None  # what stopped it after `chunks` committed


def relief(tiers: tuple[Tier, ...], until: int, pass_id: str, conn: sqlite3.Connection) -> Relief:
    """Under the cap: tier after tier, chunk after chunk (each a transaction of its own), until the
    rows use at most `until` bytes, every tier has run out, or RELIEF_TIME has passed after one
    chunk at least. One chunk a job, between two batches, would only keep pace with a burst."""
    chunks: list[Chunk] = []
    live, end = live_bytes(conn), time.monotonic() + RELIEF_TIME
    try:
        while tiers and live > until and not (chunks and time.monotonic() >= end):
            chunks.append(chunk := tiers[0].cut(pass_id)(conn))
            live = chunk.live_bytes
            if chunk.table is None:
                tiers = tiers[1:]
    except Exception as exc:
        if not chunks or sqlite_code(exc) in CORRUPTION:    # damage: the writer sets the file aside
            raise
        return Relief(chunks, live, tiers, exc)   # the chunks before it are gone: the pass says so
    return Relief(chunks, live, tiers)


def disk_relief(tiers: tuple[Tier, ...], excess: int, pass_id: str, conn: sqlite3.Connection) -> Relief:
    """Over the disk's mark, the rows what fills it: as `relief`, until they have given up `excess`
    bytes (the next rows reuse the freed pages; the pass gives the rest back to the disk)."""
    return relief(tiers, live_bytes(conn) - excess, pass_id, conn)


class Hold(NamedTuple):
    """A snapshot that keeps the WAL from starting over, as the writer saw it after a batch."""

    since: float                     # monotonic seconds: when the writer's copies began to leave frames
    live_bytes: int                  # the bytes the rows use: the main file grows only once they outgrow it


# seconds: a snapshot held longer is a reader's (a report, a shell, a backup), not a push's read or a
# look at /health, whose WAL is a swing to keep room for
LONG_HOLD = 1.0


# otrace_state: what the marks had learned (Marks.overshoot, Marks.wal), in millionths of the cap
MARKS_KEYS = ("retention_overshoot_ppm", "retention_wal_room_ppm")


class Marks:
    """The database's high and low marks, as shares of its cap, lowered together by as much as the
    database recently got past the high mark before a pass relieved it (a flood, a slow disk), so
    that it peaks near the high mark all the same. The WAL counts at the most it reached lately
    (`wal`, halved every WAL_HALF_LIFE), not at its size of the moment: it swings within milliseconds
    (a push cycle's marks, a burst's batches while a push's read keeps it from starting over, a
    vacuum's moved pages) far faster than a pass answers, so its room under the cap is kept free
    beforehand, the rows held under the marks by that much (a reader's WAL is no lesson: Retention)."""

    HIGH, LOW = DB_HIGH_MARK, DB_LOW_MARK
    FLOOR = 0.70             # the high mark never comes lower: a burst larger than the cap is no lesson
    FORGET = 0.98            # a past overshoot weighs this much less at each pass
    WAL_HALF_LIFE = 120.0    # seconds: a swing is kept through a busy spell's next ones, a reader's not
    WAL_MOST = 0.25          # the WAL's room counts at most this share of the cap (TRACE_WAL_MAX_BYTES
                             # bounds it too): a reader holding the WAL is no lesson either

    def __init__(self, wal_most: float = WAL_MOST) -> None:
        self.overshoot = 0.0     # share of the cap
        self.peak = 0.0          # the largest share seen since the last pass
        self.wal = 0.0           # the largest WAL seen lately, as a share of the cap
        self.wal_at = 0.0        # when `wal` was last brought up to date (monotonic seconds)
        self.wal_most = min(wal_most, self.WAL_MOST)

    def count(self, main: float, wal: float, now: float | None = None) -> float:
        """The database's share as the marks count it: the main file's, and the WAL's at the most it
        reached lately (both shares of the cap)."""
        now = time.monotonic() if now is None else now
        share = self.counted(main, wal, now)
        self.wal, self.wal_at = max(self.faded(now), min(wal, self.wal_most)), now
        return share

    def counted(self, main: float, wal: float, now: float | None = None) -> float:
        """The same share, learning nothing from it (a look from another thread: /health's)."""
        return main + max(wal, self.faded(now))

    def faded(self, now: float | None = None) -> float:
        """The WAL's room as of `now`, halved every WAL_HALF_LIFE since it was brought up to date."""
        now = time.monotonic() if now is None else now
        return self.wal * 0.5 ** (max(0.0, now - self.wal_at) / self.WAL_HALF_LIFE)

    def recall(self, overshoot: float, wal: float, age: float) -> None:
        """What a run before this one had learned, `age` seconds ago: the overshoot as it was (it fades
        pass by pass, and none ran meanwhile), the WAL's room faded as if time had run on here."""
        self.overshoot = min(max(overshoot, 0.0), 1.0)
        self.wal, self.wal_at = min(max(wal, 0.0), self.wal_most), time.monotonic() - max(0.0, age)

    @property
    def high(self) -> float:
        return max(self.FLOOR, self.HIGH - self.overshoot)

    @property
    def low(self) -> float:
        return self.high - (self.HIGH - self.LOW)

    def seen(self, share: float) -> None:
        self.peak = max(self.peak, share)

    def passed(self, share: float) -> None:
        """A pass under pressure is over, and the database is now at `share`."""
        self.overshoot = max(self.peak - self.high, self.overshoot * self.FORGET)
        self.peak = share


class Retention(Loop):
    """Every TRACE_CLEANUP_INTERVAL, and at once when a batch takes the database past its high mark or
    the disk past TRACE_DISK_HIGH_PCT, or a write fails for lack of space: while the database is over
    its high mark or the disk over TRACE_DISK_HIGH_PCT, deletes oldest first in tier order down to the
    low mark; then, on the interval, deletes pushed rows older than TRACE_RETENTION. Every deletion
    runs in a chunk of its own, a transaction with its ledger row, between ingest batches; under
    pressure, chunk after chunk for up to RELIEF_TIME a job, the first of them queued by the writer
    itself (`watch`)."""

    LOW_DISK = 5.0           # a pass deletes until the disk is 5 points under TRACE_DISK_HIGH_PCT

    def __init__(self, config: Config, events: EventQueue, db: Database,
                 kept: dict[str, tuple[int, int]] | None = None, reserve: Reserve | None = None) -> None:
        super().__init__("retention", config.cleanup_interval)
        self.config, self.events, self.db, self.tables = config, events, db, EVENT_TABLES
        self.db_dir, self.reserve = str(Path(config.db_path).parent), reserve
        unpushed = tuple(t for t in self.tables if t not in SAMPLE_TABLES)
        self.chunk = max(50, min(CHUNK, config.db_max_bytes // CHUNK_SHARE))
        self.step = autocheckpoint_pages(config, DB_PAGE)    # pages given back per shrink
        self.tiers = (Tier("pressure_pushed", self.tables, DELIVERED, True, self.chunk),
                      Tier("pressure_metrics", SAMPLE_TABLES, UNDELIVERED, False, self.chunk, db.merges),
                      Tier("pressure_unpushed", unpushed, UNDELIVERED, False, 50, db.merges))
        self.last_pass: dict[str, Any] | None = None
        self.housekept_at = -math.inf            # when the age deletions and pruning last ran
        # relief jobs begun: watch()'s head starts, and one a pass stopped waiting for, still to be tallied
        self.begun: collections.deque[Future] = collections.deque()
        self.marks = Marks(config.wal_max_bytes / config.db_max_bytes)
        self.recall(kept or {})
        self.hold: Hold | None = None            # a snapshot holding the WAL, as of the writer's last batch
        self.hold_wal = 0.0                      # the largest WAL it made, as a share of the cap
        self.main = 0.0                          # the main file's share of the cap when last read
        self.passes = 0
        self.over: str | None = None             # the pressure said, until a pass finds none
        self.stuck: str | None = None            # over budget after deleting all it may: why
        self.unpushed = MinuteLog(self.log, "passes_since_last_line",   # a flood's passes: one line a minute
                                  summed=("deleted", "unpushed_deleted", "bookkeeping_pruned"))
        self.stretches = MinuteLog(self.log, "stretches_since_last_line")   # and its stretches of pressure

    def recall(self, kept: dict[str, tuple[int, int]]) -> None:
        """Take up what the marks had learned when the last run kept it (remember; `kept`: otrace_state's
        rows as the start read them, by key: value and time): the first busy spell after a restart would
        otherwise take the database past where they had learned to stop."""
        if all(key in kept for key in MARKS_KEYS):
            (overshoot, at), (wal, _) = (kept[key] for key in MARKS_KEYS)
            self.marks.recall(overshoot / 1e6, wal / 1e6, (now_ms() - at) / 1000)

    def remember(self) -> None:
        """Keep what the marks have learned for the next start (at the stop, before the queue closes:
        a unit of its own after each pass would be a batch, which may queue a relief job)."""
        now, learned = now_ms(), (self.marks.overshoot, self.marks.faded())
        self.events.offer(Unit([], tuple((STATE_SQL, (key, round(value * 1e6), now)) for key, value in zip(
            MARKS_KEYS, learned, strict=True)), own=True))

    def check_budget(self) -> None:
        """Warn when the database cap cannot be reached before the disk mark: the disk mark then
        bounds the database in the cap's place, and the rest of the disk decides what it may keep."""
        total = disk_usage(self.db_dir)[0]
        budget = self.config.db_max_bytes + self.config.disk_reserve_bytes    # the cap holds the WAL
        if budget > total * self.config.disk_high_pct / 100:
            config = self.config
            self.log.warning("database cap is over the disk's budget", extra={
                "db_max_bytes": config.db_max_bytes, "disk_reserve_bytes": config.disk_reserve_bytes,
                "disk_total_bytes": total, "disk_high_pct": config.disk_high_pct,
                "advice": "lower TRACE_DB_MAX_BYTES or TRACE_DISK_RESERVE_BYTES: together they must fit "
                          "under TRACE_DISK_HIGH_PCT of the volume"})
        if (aside := set_aside_files(self.config.db_path))["count"]:     # outside the cap, never removed
            self.log.warning("files set aside beside the database take disk space: restore or remove them",
                             extra=aside)

    def watch(self, hold: Hold | None = None) -> None:
        """On the writer's thread, after each batch it commits: a database past its high mark wakes
        a pass now, not at the next interval, and the writer's next job deletes down to the low mark
        before the next batch (a head start, which the pass takes over; it deletes nothing while
        the rows are under the low mark). So every batch past the mark is paired with a deletion on
        the writer itself: a burst (a stalled client catching up, a machine too busy to run the
        pass thread) cannot outgrow the mark by more than a batch while the pass waits its turn.
        `hold`: a snapshot keeps the WAL from starting over (Checkpointer.held_since). A brief one (a
        push's read, a look at /health) made a swing the marks keep room for once it ends; a long one,
        a reader's (a report, a shell, a backup), teaches them nothing."""
        if hold is None and self.hold is not None:
            if not self.held_long():
                self.marks.count(0.0, self.hold_wal)
            self.hold_wal = 0.0
        self.hold = hold
        if self.share() > self.marks.high:
            self.head_start(functools.partial(relief, self.tiers, self.low_bytes(), ledger_hour()))
        elif self.stuck is None:
            self.watch_disk()

    def watch_disk(self) -> None:
        """The disk too, after each batch, where the rows fill it: a deletion must run while it still
        has room to write, not at the next pass."""
        try:
            used, avail, used_pct = self.disk()
            if used_pct <= self.config.disk_high_pct:
                return
            if (excess := int(over_low_mark(used, avail, self.config.disk_high_pct))) <= sum(self.sizes()):
                self.head_start(functools.partial(disk_relief, self.tiers, excess, ledger_hour()))
                return
        except OSError:              # its directory is gone: the writer makes it again
            return
        self.wake()

    def head_start(self, job: Callable[[sqlite3.Connection], Relief]) -> None:
        """The writer's next job deletes (unless one still waits to run), and the pass runs now."""
        if not (self.begun and not self.begun[-1].done()):
            self.begun.append(self.events.submit(job))
        self.wake()

    def tick(self) -> None:
        pass_id, started = ledger_hour(), time.monotonic()
        tally: collections.Counter[tuple[str, str, str]] = collections.Counter()
        pruned: list[int] = []                        # bookkeeping rows pruned, table by table
        failed = None
        try:
            self.run_pass(pass_id, started, tally, pruned)
        except Exception as exc:
            failed = describe(exc)
            raise
        finally:                     # one that fails still says what it deleted: those rows are gone
            self.report(tally, sum(pruned), time.monotonic() - started, failed)
            self.passes += 1
            for said in (self.unpushed, self.stretches):
                said.flush()                          # the count of a flood's passes that ended

    def stop(self) -> None:
        for said in (self.unpushed, self.stretches):
            said.flush(now=math.inf)                  # said before the stop
        self.remember()
        super().stop()

    def run_pass(self, pass_id: str, started: float, tally: collections.Counter[tuple[str, str, str]],
                 pruned: list[int]) -> None:
        tiers = self.tiers
        if self.begun:
            tiers = self.finish(tally).tiers
        cause = self.relieve(pass_id, tally, tiers)
        given = cause is not None and self.stuck is not None    # relieve gave back all it could, just now
        relieved = sum(tally.values())
        if started >= self.housekept_at + self.interval:   # a pass woken by watch() only relieves
            self.housekept_at = started
            cutoff = now_ms() - int(self.config.retention * 1000)
            for table in self.tables:
                self.delete_all(Cut((table,), f"{DELIVERED} AND received_at < ?", "age", pass_id,
                                    (cutoff,), self.chunk), tally)
            for table, column, extra in BOOKKEEPING:
                pruned.append(self.prune_all(table, column, cutoff, extra))
        # over budget with nothing to delete, it gives back too: free pages alone, or a WAL grown
        housekept = any(pruned) or sum(tally.values()) != relieved
        if (tally or any(pruned) or cause) and not (given and not housekept):
            self.give_back()
        if cause == "db_cap":
            self.marks.passed(self.share())

    def delete_all(self, cut: Cut, tally: collections.Counter[tuple[str, str, str]]) -> None:
        """Delete chunk after chunk until no row matches."""
        while not self.stopping.is_set() and self.delete_chunk(cut, tally).deleted == cut.limit:
            pass

    def prune_all(self, table: str, column: str, cutoff: int, extra: str) -> int:
        """Delete bookkeeping rows older than `cutoff`, chunk after chunk; how many went."""
        pruned = 0
        while not self.stopping.is_set():
            count = self.events.call(functools.partial(prune, table, column, cutoff, extra))
            self.progress()
            pruned += count
            if count < CHUNK:
                break
        return pruned

    def delete_chunk(self, cut: Cut, tally: collections.Counter[tuple[str, str, str]]) -> Chunk:
        chunk = self.events.call(cut)
        self.progress()
        self.tally([chunk], tally)
        return chunk

    def finish(self, tally: collections.Counter[tuple[str, str, str]], job: Future | None = None) -> Relief:
        """The relief jobs begun, oldest first, up to `job` (all of them without one), once the writer
        has run them, their chunks counted; the last one's Relief. Raise what stopped one, if anything
        did. One still running after JOB_TIMEOUT stays begun (TimeoutError): it deletes all the same,
        and the pass that sees it end says what."""
        while True:
            self.begun[0].exception(JOB_TIMEOUT)
            ended = self.begun.popleft()
            done = ended.result()
            self.tally(done.chunks, tally)
            if done.failed is not None:
                raise done.failed
            if ended is job or not self.begun:
                return done

    @staticmethod
    def tally(chunks: list[Chunk], tally: collections.Counter[tuple[str, str, str]]) -> None:
        for chunk in chunks:
            if chunk.table is not None:
                tally[(chunk.table, chunk.reason, "deleted")] += chunk.deleted
                tally[(chunk.table, chunk.reason, "unpushed")] += chunk.lost

    def share(self) -> float:
        """The database's size as a share of its cap as the marks count it (the WAL at the most it
        reached lately, the WAL a pass writes too), which they learn from. While a snapshot holds the
        WAL, the rows and the room as it was: deleting cannot shrink a WAL that cannot start over (it
        grows by the pages deleted), only keep the main file, whose freed pages the next rows reuse,
        from growing; what the WAL reached counts once the snapshot ends (watch)."""
        main, wal = self.shares()
        self.main = main
        if (hold := self.hold) is not None:
            self.hold_wal = max(self.hold_wal, wal)
            share = max(main, hold.live_bytes / self.config.db_max_bytes) + self.marks.wal
        else:
            share = self.marks.count(main, wal)
        self.marks.seen(share)
        return share

    def sizes(self) -> tuple[int, int]:
        """The main file's and the WAL's sizes in bytes: the database as the cap counts it."""
        return file_size(self.config.db_path), file_size(self.config.db_path + "-wal")

    def shares(self) -> tuple[float, float]:
        """The main file's and the WAL's sizes, as shares of the cap."""
        main, wal = self.sizes()
        return main / self.config.db_max_bytes, wal / self.config.db_max_bytes

    def pressure(self, learn: bool = True) -> tuple[str, str] | None:
        """Why the database must shrink now ("db_cap" or "disk"), with the figures, or None. `learn`:
        the marks learn from the size read (not from /health's look, on another thread)."""
        share = self.share() if learn else self.marks.counted(*self.shares())   # as a pass counts it
        if share > self.marks.high:
            return "db_cap", (f"database {share:.0%} of {self.config.db_max_bytes} bytes > high mark "
                              f"{self.marks.high:.0%}")
        used_pct = self.disk()[2]
        if used_pct > self.config.disk_high_pct:
            return "disk", f"disk {used_pct} % used > {self.config.disk_high_pct} %"
        return None

    def disk(self) -> tuple[int, int, float]:
        """The disk's (used, available, used %), a released reserve counted used where the rows are to
        make room for it (Reserve.counted)."""
        _, used, avail, _ = disk_usage(self.db_dir)
        if self.reserve is not None:
            used, avail = self.reserve.counted(used, avail)
        return used, avail, df_percent(used, avail)

    def wal_room(self) -> int:
        """The bytes the WAL may take before the writer waits out a brief snapshot: the room the marks
        keep for it (`Marks.wal`), or half of what the main file (as of the last batch) leaves under the
        high mark, whichever is more (the other half for the batches committed before the wait begins):
        a report beside a database far under its cap does not hold the writer."""
        return int(self.config.db_max_bytes * max(self.marks.wal, (self.marks.high - self.main) / 2))

    def low_bytes(self) -> int:
        """The low mark, in the bytes rows use: freed pages go back at the end of a pass, in one
        shrink, not one per chunk. The WAL's room (`Marks.wal`) is left under it, as the high mark
        counts it."""
        return int(self.config.db_max_bytes * (self.marks.low - self.marks.wal))

    def disk_relieved(self) -> bool:
        return self.disk()[2] <= self.config.disk_high_pct - self.LOW_DISK

    def own_share_can_relieve(self) -> bool:
        """True when the database holds at least what the disk is over its low mark."""
        used, avail, _ = self.disk()
        return sum(self.sizes()) >= over_low_mark(used, avail, self.config.disk_high_pct)

    def relieve(self, pass_id: str, tally: collections.Counter[tuple[str, str, str]],
                tiers: tuple[Tier, ...]) -> str | None:
        """Under pressure, delete tier after tier (from `tiers` on, under the cap: those a head start
        left), a chunk at a time from whichever table holds the oldest row, until under the low mark.
        Disk pressure reaches rows not yet pushed (samples too) only while the database is big enough
        for deleting them to bring the disk under the low mark, asked before each chunk: a disk filled
        by something else is not helped by losing them, nor is one whose freed space another program
        takes as it appears. Returns the cause of the pressure, if there was some."""
        found = self.pressure()
        if not found:
            self.over = None
            return self.relieved(None)
        cause, detail = found
        if self.over != cause:                 # said once a stretch: a pass may run every few seconds
            self.over = cause
            self.stretches.say(cause, "over budget: deleting oldest rows", {"cause": cause, "detail": detail})
        if cause == "db_cap":
            until = self.low_bytes()
            while tiers and not self.stopping.is_set():
                self.begun.append(job := self.events.submit(functools.partial(relief, tiers, until, pass_id)))
                done = self.finish(tally, job)         # and a head start watch() began meanwhile
                tiers, live = done.tiers, done.live_bytes
                self.share()                   # the marks learn from the WAL a job writes too
                if live <= until:
                    return self.relieved(cause)
        else:
            for tier in self.tiers:
                while not self.stopping.is_set() and not self.disk_relieved() and (
                        tier.for_disk or self.own_share_can_relieve()):
                    chunk = self.delete_chunk(tier.cut(pass_id), tally)
                    if chunk.table is None:
                        break
                    self.give_back()           # the disk sees freed pages only once given back
                if self.disk_relieved():
                    return self.relieved(cause)
        if self.stopping.is_set():             # cut short: not the end of what it may delete
            return cause
        self.give_back()
        if (found := self.pressure()) is None:           # what it gave back was enough
            return self.relieved(cause)
        detail = found[1]
        was, self.stuck = self.stuck, detail     # state first: /health agrees with the line
        if was is None:
            self.log.error("still over budget after deleting all it may", extra={"cause": cause,
                                                                                 "detail": detail})
        return cause

    def relieved(self, cause: str | None) -> str | None:
        was, self.stuck = self.stuck, None
        if was:
            self.log.warning("under budget again", extra={"was": was})
        return cause

    def give_back(self) -> None:
        """Shrink the file, so the space freed is the filesystem's again. In steps of a WAL's worth:
        the pages a vacuum moves pass through the WAL, which the cap counts too, before the file
        shrinks. While a reader keeps the WAL (a look at /health, a push's read), try again here, not in
        the writer, as long as the writer would once have waited; not at all while one holds it so long
        that it grew past its limit for LONG_HOLD (a reader's): the pages a vacuum moves would only
        grow it, and the next rows reuse the freed pages."""
        end, free = time.monotonic() + BUSY_TIMEOUT, None
        while not self.stopping.is_set() and not self.held_long():
            result = self.events.call(functools.partial(shrink, self.step))
            self.progress()
            if result["busy"]:
                if time.monotonic() >= end or self.stopping.wait(0.05):
                    return
            elif result["free"] == 0 or result["free"] == free:
                return
            free = result["free"]

    def held_long(self) -> bool:
        """Whether a snapshot has held the WAL for LONG_HOLD at least, as of the writer's last batch."""
        return (hold := self.hold) is not None and time.monotonic() - hold.since >= LONG_HOLD

    def report(self, tally: collections.Counter[tuple[str, str, str]], pruned: int, seconds: float,
               failed: str | None = None) -> None:
        lost = {f"{t}/{r}": n for (t, r, kind), n in tally.items() if kind == "unpushed" and n}
        deleted = {f"{t}/{r}": n for (t, r, kind), n in tally.items() if kind == "deleted" and n}
        self.last_pass = {"at": iso(time.time()), "seconds": round(seconds, 3), "deleted": deleted,
                          "unpushed_deleted": lost, "bookkeeping_pruned": pruned,
                          **({"failed": failed} if failed else {})}
        if lost:
            self.unpushed.say("unpushed", "retention deleted rows that were never pushed", self.last_pass)
        elif deleted or pruned:
            self.log.info("retention pass", extra=self.last_pass)

    def health(self) -> dict[str, Any]:
        try:
            _, _, avail, used_pct = disk_usage(self.db_dir)
        except OSError:                  # the directory is gone: the writer makes it again
            avail = used_pct = None
        try:
            lost = {key.removeprefix(UNPUSHED_KEY): n for key, n in self.db.query(
                "SELECT key, value FROM otrace_state WHERE key > ? AND key < ?",
                (UNPUSHED_KEY, UNPUSHED_KEY[:-1] + "/"))}
        except sqlite3.Error:
            lost = None
        return {"db_max_bytes": self.config.db_max_bytes, "db_high_mark": round(self.marks.high, 3),
                "db_wal_room": round(self.marks.wal, 3), "disk_used_pct": used_pct,
                "disk_avail_bytes": avail, "disk_high_pct": self.config.disk_high_pct,
                "unpushed_deleted_total": lost, "last_pass": self.last_pass, "passes": self.passes,
                "still_over_budget": self.still_over()}

    def still_over(self) -> str | None:
        """Why the last pass ended over budget, while it still is (room may come before the next pass)."""
        try:
            return self.stuck and (found := self.pressure(learn=False)) and found[1]
        except OSError:                  # the directory is gone: the writer makes it again
            return None


# ============================================================================================== health
# What otrace says about itself: /health as JSON, /metrics as Prometheus text from the same report;
# with TRACE_DEBUG, what Go's expvar and pprof would say: counters, stacks, a sampling profile and
# the top allocations. A profile or an allocation snapshot is made on a thread of its own while the
# HTTP thread goes on serving.

EVENT_COUNTERS = ("received", "persisted", "duplicate", "refused", "rejected", "dropped")
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
EVENT_HELP = {"received": "Events accepted (answered 202).", "persisted": "Events written to SQLite.",
              "duplicate": "Events already stored under their trace_id.",
              "refused": "Events refused with 503: the queue was full, or writes are failing.",
              "rejected": "Requests refused for bad input (4xx but 401), their body read or not.",
              "dropped": "Rows SQLite refused for their own data, logged and dropped."}
HOST_GAUGES = {   # /health "host" column -> (metric, help, scale)
    "cpu_pct": ("host_cpu_percent", "CPU used, as a share of the cgroup's allowance.", 1),
    "cpu_cores_effective": ("host_cpu_cores", "CPUs the cgroup may use (quota, cpuset, online).", 1),
    "cpu_throttled_ms": ("host_cpu_throttled_seconds", "Time throttled during the last interval.", 0.001),
    "mem_used_bytes": ("host_memory_used_bytes", "Working set: usage less inactive file cache.", 1),
    "mem_rss_bytes": ("host_memory_rss_bytes", "Anonymous memory.", 1),
    "mem_limit_bytes": ("host_memory_limit_bytes", "Memory limit (the host's total when unlimited).", 1),
    "mem_available_bytes": ("host_memory_available_bytes", "Limit less working set, up to MemAvailable.", 1),
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
    "proc_count": ("host_processes", "Processes otrace sees (its PID namespace).", 1),
    "proc_zombies": ("host_zombie_processes", "Processes that exited, not yet reaped by their parent.", 1),
    "gateway_up": ("gateway_up", "1 while the OpenClaw gateway's process runs.", 1),
    "gateway_cpu_pct": ("gateway_cpu_percent", "The gateway's CPU over the last interval, as a share of "
                        "one core.", 1),
    "gateway_rss_bytes": ("gateway_resident_memory_bytes", "The gateway's resident memory.", 1),
    "gateway_threads": ("gateway_threads", "The gateway's threads.", 1),
    "gateway_fds": ("gateway_open_fds", "The gateway's open file descriptors.", 1),
    "gateway_uptime_s": ("gateway_uptime_seconds", "Time since the gateway's process started.", 1),
    "net_rx_bps": ("net_receive_bytes_per_second", "Received on every interface but loopback.", 1),
    "net_tx_bps": ("net_transmit_bytes_per_second", "Sent on every interface but loopback.", 1),
    "net_rx_pps": ("net_receive_packets_per_second", "Packets received on every interface but loopback.", 1),
    "net_tx_pps": ("net_transmit_packets_per_second", "Packets sent on every interface but loopback.", 1),
    "tcp_retrans_ps": ("net_tcp_retransmitted_segments_per_second", "TCP segments sent again.", 1),
    "tcp_syn_retrans_ps": ("net_tcp_syn_retransmits_per_second", "Connection attempts (SYNs) sent again.", 1),
    "tcp_attempt_fails_ps": ("net_tcp_failed_connection_attempts_per_second", "Connection attempts that "
                             "failed (refused, timed out).", 1),
    "tcp_estab_resets_ps": ("net_tcp_established_resets_per_second", "Established connections reset.", 1),
    "tcp_out_rsts_ps": ("net_tcp_resets_sent_per_second", "TCP resets sent.", 1),
    "udp_in_errors_ps": ("net_udp_receive_errors_per_second", "UDP datagrams that could not be delivered "
                         "(full buffers, bad checksums).", 1),
    "udp_no_ports_ps": ("net_udp_no_port_per_second", "UDP datagrams to a port nothing listens on.", 1),
}


# OpenTelemetry's bucket boundaries for gen_ai.client.operation.duration, in seconds.
LATENCY_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_TYPES = {"input": "prompt_tokens", "output": "completion_tokens",     # gen_ai.token.type values
               "cache_read": "cache_read_tokens", "cache_creation": "cache_write_tokens"}
_TRACE_AT = {name: index for index, name in enumerate(TRACES.columns)}
_ERROR_AT = {name: index for index, name in enumerate(ERRORS.columns)}
_LOG_KIND_AT = LOGS.columns.index("kind")
_TOKENS_AT = tuple((kind, _TRACE_AT[column]) for kind, column in TOKEN_TYPES.items())   # looked up once


class CallSeries:
    """The tallies of one provider and model."""

    __slots__ = ("buckets", "calls", "cost", "failures", "latency_count", "latency_sum", "tokens", "unpriced")

    def __init__(self) -> None:
        self.calls = self.failures = self.unpriced = self.latency_count = 0
        self.latency_sum = 0.0
        self.tokens = dict.fromkeys(TOKEN_TYPES, 0)
        self.cost = {"reported": 0.0, "computed": 0.0}
        self.buckets = [0] * len(LATENCY_BUCKETS)       # calls at or under each bound (not cumulative)

    def add(self, row: tuple) -> None:
        at = _TRACE_AT
        self.calls += 1
        self.failures += row[at["status"]] == "error"
        for kind, index in _TOKENS_AT:
            self.tokens[kind] += row[index] or 0
        source = row[at["cost_source"]]
        if source is not None:
            self.cost[source] += row[at["cost_usd"]]
        elif row[at["total_tokens"]] or any(row[index] for _, index in _TOKENS_AT):  # as HAS_TOKENS_SQL
            self.unpriced += 1
        latency = row[at["latency_ms"]]
        if latency is not None:
            seconds = latency / 1000
            self.latency_count += 1
            self.latency_sum += seconds
            bound = bisect.bisect_left(LATENCY_BUCKETS, seconds)      # the first bound at or over it
            if bound < len(LATENCY_BUCKETS):
                self.buckets[bound] += 1

    def report(self, provider: str, model: str) -> dict[str, Any]:
        cumulative = list(itertools.accumulate(self.buckets))
        return {"provider": provider, "model": model, "calls": self.calls, "failures": self.failures,
                "unpriced": self.unpriced, "tokens": dict(self.tokens), "cost_usd": dict(self.cost),
                "latency_seconds": {"buckets": dict(zip(map(str, LATENCY_BUCKETS), cumulative, strict=True)),
                                    "count": self.latency_count, "sum": self.latency_sum}}


class CallTally:
    """What the writer committed since start, for /metrics: per provider and model LLM calls,
    failures, tokens, cost and latency; error events by type and category; log events by kind. Only
    rows really inserted count (a trace_id sent twice is one call). The first TRACE_METRICS_MAX_MODELS
    pairs get series of their own; later ones count as provider and model "other", so a client
    inventing names cannot grow /metrics without bound."""

    def __init__(self, max_models: int) -> None:
        self.max_models = max_models
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, str], CallSeries] = {}
        self._errors: collections.Counter[tuple[str, str]] = collections.Counter()
        self._logs: collections.Counter[str] = collections.Counter()

    def add(self, inserted: dict[str, list[tuple]]) -> None:
        """The writer's rows of one commit, by table."""
        with self._lock:
            for row in inserted.get(TRACES.name, ()):
                self._series(row[_TRACE_AT["provider"]], row[_TRACE_AT["model"]]).add(row)
            self._errors.update((row[_ERROR_AT["error_type"]], row[_ERROR_AT["category"]])
                                for row in inserted.get(ERRORS.name, ()))
            self._logs.update(row[_LOG_KIND_AT] for row in inserted.get(LOGS.name, ()))

    def _series(self, provider: str, model: str) -> CallSeries:
        key = (provider, model)
        if key not in self._calls and len(self._calls) >= self.max_models:
            key = ("other", "other")
        if key not in self._calls:
            self._calls[key] = CallSeries()
        return self._calls[key]

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {"calls": [series.report(*key) for key, series in self._calls.items()],
                    "errors": [{"error_type": kind, "category": category, "count": n}
                               for (kind, category), n in self._errors.items()],
                    "log_events": dict(self._logs)}


def seconds_until(moment: str | None) -> float:
    """Seconds from now to an ISO time (0 for none, or one past)."""
    return max(0.0, datetime.fromisoformat(moment).timestamp() - time.time()) if moment else 0.0


def prometheus_labels(**labels: str) -> str:
    """{name="value",...}, the values escaped as the text format requires."""
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{name}="{escape(value)}"' for name, value in labels.items()) + "}"


def prometheus(report: dict[str, Any]) -> str:
    """The /health report as Prometheus text: otrace's own counters and the newest host sample."""
    lines: list[str] = []

    def add(name: str, kind: str, text: str, *samples: tuple[str, Any]) -> None:
        """A family; a sample's first item follows the name: its labels, or a suffix and labels."""
        samples = tuple((labels, value) for labels, value in samples if value is not None)
        if samples:
            lines.extend((f"# HELP otrace_{name} {text}", f"# TYPE otrace_{name} {kind}"))
            lines.extend(f"otrace_{name}{labels} {prometheus_number(value)}" for labels, value in samples)

    add("info", "gauge", "otrace's version.", (f'{{version="{report["version"]}"}}', 1))
    add("healthy", "gauge", "1 when /health says ok.", ("", report["status"] == "ok"))
    add("uptime_seconds", "gauge", "Time since start.", ("", report["uptime_seconds"]))
    add("loop_failing", "gauge", "1 while a loop's ticks fail (a log or store it cannot read, a full disk).",
        *((prometheus_labels(loop=loop), 1) for loop in report["loops_failing"]))
    for name, text in EVENT_HELP.items():
        add(f"events_{name}_total", "counter", text, ("", report[f"events_{name}"]))
    add("connections_refused_total", "counter", "Connections, and requests on the probes' reserve, "
        "refused over TRACE_MAX_CONNECTIONS.",
        ("", report["connections_refused"]))
    add("bodies_refused_total", "counter", "Requests answered 503 with TRACE_MAX_BUFFERED_BYTES of bodies "
        "in flight.", ("", report["bodies_refused"]))
    add("requests_unauthorized_total", "counter", "Requests answered 401: no or a wrong TRACE_INGEST_TOKEN.",
        ("", report["requests_unauthorized"]))
    add("queue_depth_events", "gauge", "Events accepted and not yet committed.", ("", report["queue_depth"]))
    add("queue_capacity_events", "gauge", "TRACE_QUEUE_SIZE.", ("", report["queue_capacity"]))
    add("unsynced_events", "gauge", "Rows not yet pushed.", ("", report["unsynced_count"]))
    add("db_size_bytes", "gauge", "Database file size.", ("", report["db_size_bytes"]))
    add("wal_size_bytes", "gauge", "WAL file size.", ("", report["wal_size_bytes"]))
    add("db_set_aside_bytes", "gauge", "Files set aside beside the database for a hand (never removed by "
        "otrace, not counted against TRACE_DB_MAX_BYTES).", ("", report["db_set_aside"]["bytes"]))
    if push := report["push"]:
        add("push_events_total", "counter", "Events confirmed by the receiver.", ("", push["events_pushed"]))
        add("push_consecutive_failures", "gauge", "Failed push cycles in a row (OTLP: a signal's most).",
            ("", push["consecutive_failures"]))
        add("push_breaker_open", "gauge", "1 while a circuit breaker is open (OTLP: any signal's).",
            ("", push["breaker"] == "open"))
        add("push_last_success_timestamp_seconds", "gauge", "When the receiver last took a whole batch "
            "(a 2xx refusing nothing).",
            ("", (ok := push["last_success_time"]) and datetime.fromisoformat(ok).timestamp()))
        breakers = push.get("breakers") or {}
        held = {"": push["held_by_retry_after_until"]} | {
            name: breaker["held_by_retry_after_until"] for name, breaker in breakers.items()}
        add("push_held_by_retry_after_seconds", "gauge", "Seconds a receiver's Retry-After still holds push "
            "back (signal: an OTLP signal's endpoint; empty: the whole receiver).",
            *((prometheus_labels(signal=name), seconds_until(until)) for name, until in held.items()))
    add("retention_unpushed_deleted_total", "counter", "Rows retention deleted before they were pushed.",
        *((f'{{table="{table}"}}', n) for table, n in (report["retention"]["unpushed_deleted_total"] or {}
                                                      ).items()))
    if tail := report["log_tail"]:
        add("log_tail_waiting", "gauge", "1 while the gateway log is not there (a mistyped path stays 1).",
            ("", tail["waiting"]))
        add("log_tail_lag_bytes", "gauge", "Bytes of the followed log file not read yet.",
            ("", tail["lag_bytes"]))
        add("log_tail_lines_total", "counter", "Gateway log lines read.", ("", tail["lines"]))
    if store := report["openclaw_sessions"]:
        add("sessions_waiting", "gauge", "1 while OpenClaw's state directory is not there.",
            ("", store["waiting"]))
        add("sessions_calls_total", "counter", "Model calls read from OpenClaw's session store.",
            ("", store["calls"]))
    otlp = report["otlp"]
    add("otlp_items_total", "counter", "OTLP requests and items, by what became of them (see /health otlp).",
        *((f'{{item="{name}"}}', otlp[name]) for name in OTLP_COUNTERS))
    for column, (name, text, scale) in HOST_GAUGES.items():
        value = (report["host"] or {}).get(column)
        add(name, "gauge", text, ("", None if value is None else value * scale))
    host, system = report["host"] or {}, report["system"]
    add("net_tcp_connections", "gauge", "TCP connections by state, IPv4 and IPv6.",
        *((prometheus_labels(state=state), host.get(f"tcp_{state}")) for state in TCP_STATES.values()))
    add("custom_events_received_total", "counter", "Custom events accepted on /v1/events.",
        ("", system["custom_events_received"]))
    if gateway := system["gateway"]:
        add("gateway_restarts_total", "counter", "Restarts of the gateway seen since otrace started.",
            ("", gateway["restarts"]))
    probed = [(prometheus_labels(name=name), r) for name, r in (system["dns"] or {}).get("names", {}).items()]
    add("dns_probe_success", "gauge", "1 when the last lookup of the name succeeded.",
        *((labels, r["outcome"] == "ok") for labels, r in probed if "outcome" in r))
    add("dns_probe_duration_seconds", "gauge", "Time the last lookup of the name took.",
        *((labels, r["ms"] / 1000) for labels, r in probed if r.get("ms") is not None))
    llm_metrics(report["llm_calls"], add)
    return "\n".join(lines) + "\n"


def llm_metrics(tally: dict[str, Any], add: Callable[..., None]) -> None:
    """The LLM call families, named after OpenTelemetry's GenAI conventions (gen_ai_client_token_usage,
    gen_ai_client_operation_duration) with otrace_ before them: an agent exporting its own gen_ai_*
    metrics to the same Prometheus must not be counted twice."""
    series = [({"gen_ai_provider_name": c["provider"], "gen_ai_request_model": c["model"]}, c)
              for c in tally["calls"]]
    add("gen_ai_calls_total", "counter", "LLM calls stored (a trace_id sent twice, or a retry taken into "
        "its call's row, is no other call).",
        *((prometheus_labels(**pair), c["calls"]) for pair, c in series))
    add("gen_ai_call_failures_total", "counter", "LLM calls stored with status error (counted as stored: "
        "a retry that answers later takes none back).",
        *((prometheus_labels(**pair), c["failures"]) for pair, c in series))
    add("gen_ai_client_token_usage_total", "counter", "Tokens of the calls stored, by gen_ai_token_type; "
        "input counts the cache's tokens too, as OpenTelemetry's gen_ai.usage.input_tokens does.",
        *((prometheus_labels(**pair, gen_ai_token_type=kind), n)
          for pair, c in series for kind, n in c["tokens"].items()))
    add("gen_ai_cost_usd_total", "counter", "USD of the calls stored, by cost_source: reported by the "
        "source, or computed from the price table.",
        *((prometheus_labels(**pair, cost_source=source), usd)
          for pair, c in series for source, usd in c["cost_usd"].items()))
    add("gen_ai_unpriced_calls_total", "counter", "Calls stored with tokens and no cost: none reported, "
        "and no price for the model (or a total of tokens alone).",
        *((prometheus_labels(**pair), c["unpriced"]) for pair, c in series))
    histogram = []
    for pair, c in series:
        latency = c["latency_seconds"]
        histogram += [("_bucket" + prometheus_labels(**pair, le=bound), n)
                      for bound, n in (*latency["buckets"].items(), ("+Inf", latency["count"]))]
        histogram += [("_sum" + prometheus_labels(**pair), latency["sum"]),
                      ("_count" + prometheus_labels(**pair), latency["count"])]
    add("gen_ai_client_operation_duration_seconds", "histogram", "Latency of the calls stored that have "
        "one.", *histogram)
    add("error_events_total", "counter", "Error events stored, by type and category.",
        *((prometheus_labels(error_type=e["error_type"], category=e["category"]), e["count"])
          for e in tally["errors"]))
    add("log_events_total", "counter", "Gateway log events stored, by kind.",
        *((prometheus_labels(kind=kind), n) for kind, n in tally["log_events"].items()))


def prometheus_number(value: Any) -> str:
    """A sample value as Prometheus reads it back exactly: integers in full, floats as Python's
    shortest round-trip form (never %g, which keeps 6 digits)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def folder_device(path: str) -> int | None:
    """The device of the filesystem holding the file's directory; None if it cannot be looked at."""
    try:
        return Path(path).parent.stat().st_dev
    except OSError:
        return None


def health_problems(service: Service, main: int, wal: int) -> list[str]:
    """What makes /health degraded, each in a sentence an operator can act on (`main`, `wal`: the
    database's file and WAL sizes)."""
    writer, db = service.writer, service.db
    problems = []
    if not writer.is_alive():
        problems.append("writer thread is not running")
    elif writer.stuck:
        problems.append("writer thread is stuck")
    if writer.fault.error:
        problems.append("database writes failing: " + writer.fault.error)
    if folder_device(service.config.db_path) not in (None, service.db_device):
        problems.append("the database's directory is on another filesystem than at start (a volume "
                        "unmounted under otrace?): otrace writes there now, and fills that disk")
    for step, fault in list(writer.upkeep_faults.items()):
        if fault.error:
            problems.append(f"writer: {step} failing ({fault.error}): rows are still written; it is tried "
                            "again after each batch")
    for loop in service.loops:
        if (took := loop.stuck_for()) is not None:
            problems.append(f"{loop.name} is stuck: {took:.0f} s in one step with no progress (a file, a "
                            "socket or a lock that never answers?); its work waits until it ends")
    if fault := service.server.accept_fault.error:
        problems.append(f"accepting connections failing ({fault}): new clients wait unanswered until it "
                        "ends (for descriptors: ulimit -n, TRACE_MAX_CONNECTIONS)")
    if writer.reserve.released:
        since = f" since {iso(paused[0])}" if (paused := writer.paused) else ""
        problems.append(f"disk full{since}: reserve released, ingest paused until there is room again")
    if service.store and service.store.waiting:
        problems.append(f"OpenClaw's state directory {service.store.root} is not there (or has no agents/ "
                        "yet): the model calls and failures the gateway logs come from its session store, "
                        "and are not stored until it is (TRACE_OPENCLAW_STATE_DIR)")
    elif service.store and service.store.fault.error:       # OpenClaw's usage spans are skipped meanwhile
        problems.append(f"OpenClaw's session store cannot be read ({service.store.fault.error}): the model "
                        "calls it holds are not stored until it can be (TRACE_OPENCLAW_STATE_DIR)")
    if service.tailer and service.tailer.fault.error and not service.store:   # their calls are read there
        problems.append(f"the gateway log cannot be read ({service.tailer.fault.error}): the model calls and "
                        "failures it logs are not stored until it can be (TRACE_LOG_PATH)")
    followed = service.tailer and service.tailer.current
    if followed and service.store and service.config.openclaw_state_dir == "auto" and \
            not os.environ.get("OPENCLAW_STATE_DIR") and \
            service.store.root != (want := state_dir_of(service.store.root.with_name(".openclaw"),
                                                          profile := log_profile(followed.path))):
        problems.append(f"the gateway log followed is OpenClaw profile {profile or 'default'}'s, whose "
                        f"session store is {want}, not {service.store.root} (set TRACE_OPENCLAW_STATE_DIR)")
    if db.replaced_pending:
        problems.append(("database file is damaged: moving to a new one" if writer.damaged else
                         "database file was deleted or replaced: moving to a new one") + (
            f" failing: {writer.reopen_fault.error}" if writer.reopen_fault.error else ""))
    if stuck := service.retention.still_over():
        problems.append(f"still over budget after deleting all retention may ({stuck})")
    if main + wal > service.config.db_max_bytes and wal > service.config.wal_max_bytes:
        problems.append(f"database over TRACE_DB_MAX_BYTES with a WAL past TRACE_WAL_MAX_BYTES (file {main} "
                        f"+ WAL {wal} bytes): the next retention pass shrinks them, unless a reader holding "
                        "one snapshot keeps the WAL from starting over")
    return problems


def health_report(service: Service) -> dict[str, Any]:
    """The /health report; no query in it waits for the writer, so a probe is answered while it is busy."""
    counts = service.counters.snapshot()
    writer, db, pusher = service.writer, service.db, service.pusher
    main, wal = file_size(service.config.db_path), file_size(service.config.db_path + "-wal")
    problems = health_problems(service, main, wal)
    push = pusher and pusher.health()
    return {
        "status": "degraded" if problems else "ok",
        "problems": problems,
        "loops_failing": {loop.fault.what: loop.fault.health() for loop in service.loops if loop.fault.error},
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - service.started, 3),
        "db_status": "error" if writer.fault.error else "ok",
        "db_path": service.config.db_path,
        "db_replaced": db.replaced,
        "writer_alive": writer.is_alive() and not writer.stuck,
        "queue_depth": service.events.qsize(),
        "queue_capacity": service.config.queue_size,
        **{f"events_{name}": counts[name] for name in EVENT_COUNTERS},
        "connections_open": service.server.count(),
        "connections_refused": counts["connections_refused"],
        "bodies_refused": counts["bodies_refused"],
        "requests_unauthorized": counts["unauthorized"],
        "db_size_bytes": main,
        "wal_size_bytes": wal,
        "db_set_aside": set_aside_files(service.config.db_path),
        "disk_reserve": {"bytes": writer.reserve.size, "held": writer.reserve.held,
                         "released": writer.reserve.released},
        "unsynced_count": unsynced_count(db, pusher.tables if pusher else EVENT_TABLES),
        "last_write_error": writer.fault.health(),
        "last_push_time": push and push["last_push_time"],
        "last_push_status": pusher.last_status if pusher else "disabled",
        "push": push,
        "retention": service.retention.health(),
        "host": (latest := service.sampler and service.sampler.latest) and {   # its JSON column an object
            **latest, "dns": latest["dns"] and json.loads(latest["dns"])},
        "metrics": service.sampler and service.sampler.health(),
        "log_tail": service.tailer and service.tailer.health(),
        "llm_calls": {"prices": service.prices and service.prices.label, **service.tally.report()},
        "openclaw_sessions": service.store and service.store.health(),
        "otlp": service.otlp.health() | {"listening": service.otlp_address is not None, "listen_error": next(
            (unbound["error"] for unbound in service.server.unbound), None)},
        "system": {"custom_events_received": counts["custom_received"],
                   "processes": service.processes and service.processes.health(),
                   "gateway": service.sampler and service.sampler.watch.gateway and
                   service.sampler.watch.gateway.health(),
                   "dns": service.dns and service.dns.health(), "debug": service.debug is not None},
    }


def unsynced_count(db: Database, tables: tuple[str, ...]) -> int | None:
    """Rows waiting to be pushed: those of the tables push sends (all of them while push is off)."""
    counts = " + ".join(f"(SELECT count(*) FROM {table} WHERE synced = {UNSYNCED})" for table in tables)
    try:
        return db.query(f"SELECT {counts}")[0][0]
    except sqlite3.Error:
        return None


DEBUG_ROUTES = {"/debug/vars": ("GET", "HEAD"), "/debug/threads": ("GET", "HEAD"), "/debug/profile": ("GET",),
                "/debug/memory": ("GET",)}
PROFILE_HZ = 100
PROFILE_MAX_SECONDS = 60.0
TRACEMALLOC_FRAMES = 1           # frames kept per allocation: each one costs memory per traced block
TEXT_TYPE = "text/plain; charset=utf-8"


def query_number(request: Request, name: str, default: float, low: float, high: float) -> float:
    """A number from the request's query string, or Invalid naming it."""
    values = urllib.parse.parse_qs(request.target.partition("?")[2]).get(name)
    if not values:
        return default
    try:
        value = float(values[-1])
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise Invalid(f"{name} must be a number from {low:g} to {high:g}", name)
    return value


class Debug:
    """The /debug endpoints (TRACE_DEBUG): vars and threads are answered at once; a profile or an
    allocation snapshot is made on a thread of its own, one of each at a time, and answered through
    a Future, so the HTTP thread never waits for one."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.profiling, self.snapshotting = threading.Lock(), threading.Lock()
        self.stopping = threading.Event()

    def stop(self) -> None:
        """Shutdown: a profile under way ends now, with the samples it has."""
        self.stopping.set()

    def answer(self, request: Request) -> Answer | Future:
        route = request.route
        if route == "/debug/vars":
            return 200, self.vars(), {}, "application/json"
        if route == "/debug/threads":
            return 200, self.threads().encode(), {}, TEXT_TYPE
        if route == "/debug/profile":
            seconds = query_number(request, "seconds", 10.0, 0.01, PROFILE_MAX_SECONDS)
            return self.elsewhere(self.profiling, "a profile", functools.partial(self.profile, seconds))
        if not tracemalloc_tracing():
            raise Refusal(409, "tracemalloc is off: start otrace with TRACE_DEBUG_TRACEMALLOC=on")
        top = int(query_number(request, "top", 25, 1, 1000))
        return self.elsewhere(self.snapshotting, "a memory snapshot", functools.partial(self.memory, top))

    def elsewhere(self, lock: threading.Lock, what: str, make: Callable[[], Answer]) -> Future:
        """Run `make` on a thread of its own, one at a time per lock; its answer comes as a Future."""
        if not lock.acquire(blocking=False):
            raise Refusal(409, f"{what} is being made already; try again once it is done",
                          {"Retry-After": "5"})
        future: Future = Future()
        future.set_running_or_notify_cancel()     # begun: a client's hang-up does not cancel it

        def run() -> None:
            try:
                fulfil(future, make)
            finally:
                lock.release()

        threading.Thread(target=run, name="otrace-debug", daemon=True).start()
        return future

    def vars(self) -> dict[str, Any]:
        """expvar-style: every internal counter and gauge, in one flat-ish JSON object."""
        import gc  # noqa: PLC0415 - imported where needed (see the imports)
        service, counts = self.service, self.service.counters.snapshot()
        push = service.pusher.totals.snapshot() if service.pusher else {}
        cpu, rss = own_usage(Path(service.config.procfs))
        return {
            "version": __version__, "pid": os.getpid(), "cmdline": sys.argv, "python": sys.version,
            "uptime_seconds": round(time.monotonic() - service.started, 3),
            "events_accepted": counts["received"], "events_refused": counts["refused"],
            "events_received": counts["received"] + counts["refused"],
            "requests_rejected": counts["rejected"],
            "events_persisted": counts["persisted"], "events_duplicate": counts["duplicate"],
            "events_dropped": counts["dropped"], "custom_events_received": counts["custom_received"],
            "events_pushed": push.get("events", 0), "push_batches": push.get("batches", 0),
            "push_failures": push.get("failed", 0), "events_refused_by_receiver": push.get("refused", 0),
            "queue_depth": service.events.qsize(), "queue_capacity": service.config.queue_size,
            "connections_open": service.server.count(), "connections_refused": counts["connections_refused"],
            "threads": threading.active_count(),
            "thread_names": sorted(t.name for t in threading.enumerate()),
            "rss_bytes": rss, "cpu_seconds": cpu,
            "gc": {"counts": gc.get_count(), "collections": [g["collections"] for g in gc.get_stats()],
                   "collected": [g["collected"] for g in gc.get_stats()], "frozen": gc.get_freeze_count()},
            "tracemalloc": tracemalloc_tracing(),
        }

    @staticmethod
    def threads() -> str:
        """Every thread's stack, innermost call last, as a traceback prints it."""
        import traceback  # noqa: PLC0415 - imported where needed (see the imports)
        frames = sys._current_frames()
        out = []
        for thread in sorted(threading.enumerate(), key=lambda t: t.name):
            frame = frames.get(thread.ident)
            out.append(f"Thread {thread.name} (ident {thread.ident}, native id {thread.native_id}"
                       f"{', daemon' if thread.daemon else ''}):\n"
                       + ("".join(traceback.format_stack(frame)) if frame else "  (no Python frame)\n"))
        return "\n".join(out)

    def profile(self, seconds: float) -> Answer:
        """Sample every thread's stack PROFILE_HZ times a second for `seconds` (less if otrace stops):
        collapsed stacks, root first, one line per distinct stack with its count, as flame graph
        tools read them. The profiler's own CPU time is in the X-Profile-* headers."""
        me, labels = threading.get_ident(), {}      # (id(code), line) -> (code, label)
        stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
        began, cpu_began, samples = time.monotonic(), time.thread_time(), 0
        due = began
        while not self.stopping.is_set() and due < began + seconds:
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, top in sys._current_frames().items():
                if ident == me:
                    continue
                stack, frame = [], top
                while frame is not None:        # by id: a code object's hash (the module's holds
                    code = frame.f_code             # every function's) is computed anew each time
                    key = (id(code), frame.f_lineno)
                    known = labels.get(key)
                    if known is None or known[0] is not code:
                        where = f"{Path(code.co_filename).name}:{frame.f_lineno}"
                        known = labels[key] = (code, f"{code.co_name} ({where})".replace(";", ":"))
                    stack.append(known[1])
                    frame = frame.f_back
                stack.append(names.get(ident, f"thread-{ident}").replace(";", ":"))
                stacks[tuple(reversed(stack))] += 1
            samples += 1
            due += 1 / PROFILE_HZ
            self.stopping.wait(max(0.0, due - time.monotonic()))
        elapsed, cpu = time.monotonic() - began, time.thread_time() - cpu_began
        body = "".join(f"{';'.join(stack)} {n}\n" for stack, n in stacks.most_common())
        return 200, body.encode(), {
            "X-Profile-Seconds": f"{elapsed:.3f}", "X-Profile-Samples": str(samples),
            "X-Profile-Hz": str(PROFILE_HZ), "X-Profile-CPU-Seconds": f"{cpu:.3f}",
            "X-Profile-Overhead-Percent": f"{100 * cpu / elapsed if elapsed else 0:.3f}"}, TEXT_TYPE

    @staticmethod
    def memory(top: int) -> Answer:
        """tracemalloc's top allocations by source line, with what is traced in all."""
        import tracemalloc  # noqa: PLC0415 - imported where needed (see the imports)
        snapshot = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__),))
        stats = snapshot.statistics("lineno")
        current, peak = tracemalloc.get_traced_memory()
        return 200, {"traced_bytes": current, "traced_peak_bytes": peak,
                     "tracemalloc_own_bytes": tracemalloc.get_tracemalloc_memory(), "blocks": sum(
                         s.count for s in stats), "frames_per_block": tracemalloc.get_traceback_limit(),
                     "top": [{"file": s.traceback[0].filename, "line": s.traceback[0].lineno,
                              "bytes": s.size, "blocks": s.count} for s in stats[:top]]}, {}, \
            "application/json"


def tracemalloc_tracing() -> bool:
    """Whether tracemalloc runs, without importing it when it was never started."""
    module = sys.modules.get("tracemalloc")
    return bool(module and module.is_tracing())


# ============================================================================================== report
# `otrace report`: what the agent did and cost in a window, read while the service runs without
# disturbing it: a read-only connection (never the lock file, never a write), one read transaction
# for a snapshot every section agrees with, and queries on the created_at indexes. A readable table,
# or --json (whose usage_cost has the shape of OpenClaw's `gateway usage-cost --json`) or --csv.

REPORT_SCHEMA = "otrace.report.v2"
REPORT_BY = ("model", "provider", "day", "hour", "session", "source")
REPORT_SOURCES = ("http", "otlp", "log", STORE_SOURCE, "otrace")   # what calls and errors come from
COST_MODES = ("auto", "computed", "reported")
TOP_SESSIONS = 10
PERCENTILES = (50, 95, 99)        # of latency, by nearest rank
REPORT_LABEL_MIN = 16            # a row's label keeps this much on any terminal (an hour is 16 wide)
# A call's cost in each mode: auto takes the figure its source reported, else the computed one.
COST_SQL = {"auto": "cost_usd", "reported": "CASE WHEN cost_source IS NOT 'computed' THEN cost_usd END",
            "computed": "computed_cost_usd"}
COMPUTED_SQL = {"auto": "CASE WHEN cost_source = 'computed' THEN cost_usd END", "reported": "NULL",
                "computed": "computed_cost_usd"}
HAS_TOKENS_SQL = ("max(coalesce(prompt_tokens, 0), coalesce(completion_tokens, 0), "  # as /metrics' unpriced
                  "coalesce(total_tokens, 0), coalesce(cache_read_tokens, 0), "
                  "coalesce(cache_write_tokens, 0)) > 0")
# Input as OpenClaw and ccusage count it: the prompt's tokens less the cache's (never below 0).
INPUT_SQL = ("max(coalesce(prompt_tokens, 0) - coalesce(cache_read_tokens, 0) "
             "- coalesce(cache_write_tokens, 0), 0)")
# Summed beside the calls for the report's notes (Aside): calls reported at $0 that the table prices,
# the log's calls and the span of the store's, to the last one's end (a store's call is dated at its
# start, the log's at its answer).
ASIDE_SQL = ("sum(cost_usd = 0 AND cost_source IS NOT 'computed' AND computed_cost_usd > 0), "
             "total(CASE WHEN cost_usd = 0 AND cost_source IS NOT 'computed' THEN computed_cost_usd END), "
             f"sum(source = 'log'), min(CASE WHEN source = '{STORE_SOURCE}' THEN created_at END), "
             f"max(CASE WHEN source = '{STORE_SOURCE}' THEN created_at "
             "+ coalesce(json_extract(metadata, '$.stored_after_ms'), 0) END)")
CSV_FIELDS = ("calls", "failures", "failure_rate", "input_tokens", "output_tokens", "cache_read_tokens",
              "cache_write_tokens", "total_tokens", "cost_usd", "computed_usd", "unpriced_calls",
              "latency_p50_ms", "latency_p95_ms", "latency_p99_ms")


@dataclasses.dataclass(slots=True)
class Aside:
    """What the notes below a report's table need, summed beside its calls (ASIDE_SQL): calls their
    source reported at $0 that the price table prices (OpenClaw's figure for a model it has no cost
    configured for, which `auto` takes at its word), and the log's calls and the span of the store's."""

    zero_calls: int = 0
    zero_usd: float = 0.0
    log_calls: int = 0
    store_first: int | None = None
    store_last: int | None = None
    unmeasured: int = 0                 # calls that did not fail, with neither tokens nor a cost: not known

    def add(self, sums: Sequence[Any]) -> None:
        """One group's: ASIDE_SQL's sums, then its calls with neither tokens nor a cost."""
        zero_calls, zero_usd, log_calls, store_first, store_last, unmeasured = sums
        self.unmeasured += unmeasured or 0
        self.zero_calls += zero_calls or 0
        self.zero_usd += zero_usd
        self.log_calls += log_calls or 0
        if store_first is not None and store_last is not None:
            self.store_first = store_first if self.store_first is None else min(self.store_first, store_first)
            self.store_last = store_last if self.store_last is None else max(self.store_last, store_last)

    def reported_zero(self) -> dict[str, Any]:
        return {"calls": self.zero_calls, "computed_usd": round(self.zero_usd, 9)}


class ReportError(Exception):
    """A report that cannot be made as asked (exit 2): a bad window, no database, an unknown zone."""


class Zone:
    """The time zone days and hours are counted in: the machine's (the C library's local time, as
    `date` shows it, so days match what OpenClaw counts on the same machine) or a named one."""

    def __init__(self, name: str | None) -> None:
        """A named zone, or None for the machine's."""
        if name is None and (lost := self.unknown_tz(os.environ.get("TZ", ""))):
            raise ReportError(f"TZ={lost!r} names no time zone this machine has (the C library would "
                              "count in UTC): set TZ to one, like Europe/Berlin, or give --timezone")
        offset = time.strftime("%z")                # the name alone can mislead: TZ=UTC-3 is "UTC"
        self.name, self.tz = f"local ({time.strftime('%Z')}, {offset[:3]}:{offset[3:]})", None
        if name is not None:
            self.name, self.tz = name, self.named(name)

    @staticmethod
    def unknown_tz(tz: str) -> str | None:
        """TZ if it names a zone file (`Area/City`, `:name`, a name with no offset) that is not there,
        which the C library takes silently as UTC; None for a POSIX rule (`CET-1CEST`, `UTC-3`), UTC
        itself, or a file that is there."""
        file = tz[1:] if tz.startswith(":") else tz
        rule = not tz.startswith(":") and "/" not in tz and any(c.isdigit() for c in tz)
        if rule or file.upper() in ("", "UTC", "GMT"):
            return None
        zones = Path(os.environ.get("TZDIR") or "/usr/share/zoneinfo")
        return None if (zones / file).is_file() else tz           # an absolute file: zones is ignored

    @staticmethod
    def named(name: str) -> Any:
        """The tzinfo of an IANA name, UTC, or a fixed offset like +05:30."""
        from zoneinfo import ZoneInfo  # noqa: PLC0415 - imported where needed (see the imports)
        fixed = re.fullmatch(r"([+-])(\d\d):(\d\d)", name)
        try:
            if name.upper() in ("UTC", "Z"):
                return UTC
            if fixed:
                offset = timedelta(hours=int(fixed[2]), minutes=int(fixed[3]))
                return dt_timezone(-offset if fixed[1] == "-" else offset)
            return ZoneInfo(name)
        except (ValueError, KeyError, OSError):       # KeyError: ZoneInfoNotFoundError
            raise ReportError(f"--timezone {name!r} is not a time zone (like Europe/Berlin, UTC, "
                              "+05:30)") from None

    def offset_ms(self, at_ms: int) -> int:
        at_ms = min(at_ms, MAX_UNIX_MS - DAY_MS)      # later is past year 9999 east of UTC: no offset
        if self.tz is None:
            return time.localtime(at_ms // 1000).tm_gmtoff * 1000
        return int(datetime.fromtimestamp(at_ms / 1000, self.tz).utcoffset().total_seconds() * 1000)

    def instant(self, wall: datetime) -> int:
        """The Unix ms of a wall-clock time here."""
        if self.tz is None:     # a time lived twice is its first, as zoneinfo reads it (fold 0)
            fields = wall.timetuple()[:8]
            lived = [at for at in (int(time.mktime((*fields, dst))) for dst in (1, 0))
                     if time.localtime(at)[:6] == fields[:6]]
            at = min(lived) if lived else int(time.mktime((*fields, -1)))    # none: in a gap
            return at * 1000 + wall.microsecond // 1000
        return epoch_ms(wall.replace(tzinfo=self.tz))

    def midnight(self, day: date) -> int:
        return self.instant(datetime.combine(day, dt_time()))

    def today(self, now: int) -> date:
        return date(1970, 1, 1) + timedelta(days=(now + self.offset_ms(now)) // DAY_MS)

    def iso(self, at_ms: int, exact: bool = False) -> str:
        """The moment in this zone, to the second; `exact`, to the millisecond when it has some (a
        window's edges, which count to the millisecond)."""
        offset = timedelta(milliseconds=self.offset_ms(at_ms))
        try:
            moment = datetime.fromtimestamp(at_ms // 1000, dt_timezone(offset))   # whole: a float of
        except (OverflowError, ValueError):                                       # year 9999 is not exact
            at_ms = min(at_ms, MAX_UNIX_MS)           # the end of time, past year 9999 here: said in UTC
            moment = datetime.fromtimestamp(at_ms // 1000, dt_timezone(timedelta(0)))
        if exact and at_ms % 1000:
            return (moment + timedelta(milliseconds=at_ms % 1000)).isoformat(timespec="milliseconds")
        return moment.isoformat(timespec="seconds")

    def local_sql(self, since_ms: int, until_ms: int) -> tuple[str, list[int]]:
        """SQL for created_at as local Unix ms, with its parameters: the offset in force, in pieces
        where it changes inside the window (daylight saving time; at most once a day), looked for up
        to a year from now (a row dated far ahead, a clock's error, takes the offset then)."""
        pieces = [(since_ms, self.offset_ms(since_ms))]
        at, until_ms = since_ms, min(until_ms, now_ms() + 366 * DAY_MS)
        while at < until_ms:
            step = min(at + DAY_MS, until_ms)
            if self.offset_ms(step) != pieces[-1][1]:
                low, high = at, step                  # the offset changes in between: find the ms
                while high - low > 1:
                    middle = (low + high) // 2
                    low, high = (middle, high) if self.offset_ms(middle) == pieces[-1][1] else (low, middle)
                pieces.append((high, self.offset_ms(high)))
            at = step
        if len(pieces) == 1:
            return "created_at + ?", [pieces[0][1]]
        cases = " ".join("WHEN created_at < ? THEN ?" for _ in pieces[1:])
        params = [value for (_, offset), (start, _) in itertools.pairwise(pieces)
                  for value in (start, offset)]
        return f"created_at + CASE {cases} ELSE ? END", [*params, pieces[-1][1]]


def moment(text: str, zone: Zone, now: int, end: bool, back_from: int | None = None) -> int:
    """A --since or --until as Unix ms: a duration back from `back_from` (24h, 7d, 90m; default now),
    "now", "today", a date (its start; for --until its end, so the day is in), or an RFC 3339 time
    (without an offset: local)."""
    text, flag = text.strip(), "--until" if end else "--since"
    back_from = now if back_from is None else back_from
    try:
        # before 1970: all; the end of time: past the last moment a row can have
        return min(max(0, _moment(text, zone, now, end, back_from)), MAX_UNIX_MS + int(end))
    except OverflowError:
        raise ReportError(f"{flag} {text!r} is out of range (1970 to 9999)") from None
    except ValueError as bad:
        said = f" ({bad})" if isinstance(bad, SettingError) and str(bad) else ""
        raise ReportError(f"{flag} {text!r} is not a duration (24h, 7d), today, a date (2026-11-30) or an "
                          f"RFC 3339 time{said}") from None


def _moment(text: str, zone: Zone, now: int, end: bool, back_from: int) -> int:
    if text.lower() == "now":
        return now
    if text.lower() == "today":
        return zone.midnight(zone.today(now) + timedelta(days=int(end)))
    try:
        return back_from - int(_seconds(text) * 1000)
    except SettingError as bad:
        if str(bad):                       # a duration with its unit in upper case
            raise
    text = text.upper()                    # RFC 3339 allows t and z: 2026-11-30t10:00:00z
    try:
        day = date.fromisoformat(text)     # any ISO 8601 date: 2026-11-30, 20261130, 2026-W48-1
    except ValueError:
        at = datetime.fromisoformat(text)
        return zone.instant(at) if at.tzinfo is None else epoch_ms(at)
    return MAX_UNIX_MS + 1 if end and day == date.max else zone.midnight(day + timedelta(days=int(end)))


def open_snapshot(path: str, sorts_in_memory: bool = False) -> sqlite3.Connection:
    """The database read-only, in one read transaction. A copy in a directory otrace cannot write, or
    on a full disk (no -shm can be made), is read as immutable when it has no WAL beside it (on a full
    disk, an empty one), which is then exact.
    A sort larger than the connection's cache spills to files in SQLite's temp directory, unless
    `sorts_in_memory` (see run_report)."""
    try:
        if not stat.S_ISREG(Path(path).stat().st_mode):
            raise FileNotFoundError
    except (FileNotFoundError, NotADirectoryError):
        raise ReportError(f"no database at {path} (set --db, or TRACE_DB_PATH)") from None
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {describe(exc)} (run as otrace's user, or root)") from None
    try:
        conn = connect(path, read_only=True)
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
    except sqlite3.DatabaseError as exc:
        full = getattr(exc, "sqlite_errorname", None) in ("SQLITE_FULL", "SQLITE_IOERR_SHMSIZE")
        if not full and sqlite_code(exc) not in ("SQLITE_READONLY", "SQLITE_CANTOPEN"):
            raise ReportError(f"cannot read {path}: {describe(exc)}") from None
        # a -wal's frames are read through a -shm; on a full disk the open that failed left an empty -wal
        # (and no writer is there: a running otrace's -shm needs no room)
        if file_size(path + "-wal") if full else Path(path + "-wal").exists():
            raise ReportError(f"cannot read {path}: {describe(exc)} (a reader of its -wal makes a -shm "
                              "beside it, which " + ("a full disk has no room for: free some space, or copy "
                              "the file and its -wal to another disk" if full else "this user cannot: run as "
                              "otrace's user, or copy the file and its -wal into a directory you can write")
                              + ")") from None
        try:
            conn = sqlite3.connect(sqlite_uri(path, "ro", immutable=True), uri=True, isolation_level=None)
            conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
        except sqlite3.DatabaseError as again:
            raise ReportError(f"cannot read {path}: {describe(again)} (run as otrace's user, or root)"
                              ) from None
    version, tables = schema_of(conn)
    if "llm_traces" not in tables:
        conn.close()
        raise ReportError(f"{path} is not an otrace database (it has no llm_traces table)")
    if version < len(SCHEMA):
        conn.close()
        raise ReportError(f"{path} is from an older otrace (schema {version} of {len(SCHEMA)}): start this "
                          "otrace on it once to bring its schema up to date")
    if version > len(SCHEMA):       # its columns may mean what this report does not know
        conn.close()
        raise ReportError(f"{path} is from a newer otrace (schema {version}; this one knows {len(SCHEMA)}): "
                          "report with that otrace")
    if sorts_in_memory:
        conn.execute("PRAGMA temp_store = MEMORY")
    conn.execute("BEGIN")
    return conn


TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "total_tokens")


@dataclasses.dataclass(slots=True)
class Tally:
    """The sums of a group of calls."""

    calls: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0
    computed_usd: float = 0.0
    unpriced_calls: int = 0
    timed_calls: int = 0                        # those with a latency

    @classmethod
    def of(cls, values: Sequence[Any]) -> Tally:
        """A group's sums as SQL gives them, its tokens by total(): sum() fails past 2^63, which some
        thousand calls of the largest count the API takes reach."""
        tally = cls(*(value or 0 for value in values))
        for name in TOKEN_FIELDS:
            setattr(tally, name, int(getattr(tally, name)))
        return tally

    def add(self, other: Tally) -> None:
        for name in self.__slots__:             # the fields, in order
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def out(self, latency: dict[str, float | None]) -> dict[str, Any]:
        """As the report gives it: costs to the nano-dollar, with the group's latency percentiles."""
        return {"calls": self.calls, "failures": self.failures,
                "failure_rate": round(self.failures / self.calls, 4) if self.calls else None,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cache_read_tokens": self.cache_read_tokens, "cache_write_tokens": self.cache_write_tokens,
                "total_tokens": self.total_tokens, "cost_usd": round(self.cost_usd, 9),
                "computed_usd": round(self.computed_usd, 9), "unpriced_calls": self.unpriced_calls,
                "latency_ms": latency}


class Ranks:
    """A group's latency percentiles by nearest rank, taken from its latencies as they pass in order:
    the report keeps a few numbers per group, never the calls' latencies."""

    __slots__ = ("ranks", "seen", "values")

    def __init__(self, n: int) -> None:
        self.ranks = tuple((share * n + 99) // 100 for share in PERCENTILES)
        self.seen, self.values = 0, [None] * len(PERCENTILES)

    def see(self, latency: float) -> None:
        self.seen += 1
        if self.seen in self.ranks:
            self.values = [latency if rank == self.seen else value
                           for rank, value in zip(self.ranks, self.values, strict=True)]

    def found(self) -> dict[str, float | None]:
        return {f"p{share}": value for share, value in zip(PERCENTILES, self.values, strict=True)}


Summed = list[tuple[Any, Any, Any, Any, Tally]]   # a row per group of calls (see Report.groups_sql)


class Report:
    """The report's document, read from one snapshot of the database."""

    def __init__(self, conn: sqlite3.Connection, since_ms: int, until_ms: int, zone: Zone, *,
                 by: str = "model", breakdown: bool = False, cost: str = "auto",
                 source: str | None = None) -> None:
        self.conn, self.since, self.until, self.zone = conn, since_ms, until_ms, zone
        self.by, self.breakdown, self.cost, self.source = by, breakdown, cost, source

    def where(self, by_source: bool = True) -> tuple[str, list[Any]]:
        """The window as a WHERE clause for an event table, and --source (for calls and errors)."""
        sql, params = "created_at >= ? AND created_at < ?", [self.since, self.until]
        if self.source is not None and by_source:
            sql, params = sql + " AND source = ?", [*params, self.source]
        return sql, params

    def document(self) -> dict[str, Any]:
        groups = self.groups_sql(self.by)
        summed, aside = self.sums(*groups)
        calls = self.calls(summed, groups)
        return {"schema": REPORT_SCHEMA, "generated_at": self.zone.iso(now_ms()),
                "window": {"since": self.zone.iso(self.since, exact=True),
                           "until": self.zone.iso(self.until, exact=True), "timezone": self.zone.name},
                "by": self.by, "breakdown": self.breakdown, "cost": self.cost, "source": self.source,
                "calls": {**calls, "reported_zero": aside.reported_zero(),
                          "unmeasured_calls": aside.unmeasured,
                          "log_calls_beside_the_store": self.log_beside_store(aside),
                          "openclaw_cost_metric_usd":
                              self.openclaw_cost() if calls["totals"]["unpriced_calls"] else None},
                "top_sessions": self.top_sessions(),
                "errors": self.errors(), "host": self.host(), "log_events": self.log_events(),
                "push": self.push(), "retention": self.retention(), "usage_cost": self.usage_cost(summed)}

    def groups_sql(self, by: str) -> tuple[str, list[int]]:
        """SQL of a call's group, with its parameters: its row's key, local day, provider and model, each
        NULL where not needed. Not the day by session (a group per call, at worst): usage_cost then
        sums the days by itself."""
        where, params = self.where()
        first, last = self.conn.execute(f"SELECT min(created_at), max(created_at) FROM llm_traces "
                                        f"WHERE {where}", params).fetchone()
        local, offsets = self.zone.local_sql(first or self.since, (last or self.since) + 1)
        day = f"({local}) / {DAY_MS}"
        key = {"session": "session_id", "source": "source", "day": day,
               "hour": f"({local}) / {HOUR_MS}"}.get(by, "NULL")
        split = self.breakdown or by == "model"
        sql = (f"{key}, {'NULL' if by == 'session' else day}, "
               f"{'provider' if split or by == 'provider' else 'NULL'}, {'model' if split else 'NULL'}")
        return sql, offsets * ((by in ("day", "hour")) + (by != "session"))

    def sums(self, groups: str, group_params: list[Any]) -> tuple[Summed, Aside]:
        """The window's calls summed by group (see groups_sql), and in the same pass what the notes
        below the table need: memory grows with the groups, never with the calls."""
        where, params = self.where()
        cost, computed = COST_SQL[self.cost], COMPUTED_SQL[self.cost]
        summed, aside, fields = [], Aside(), len(Tally.__slots__)
        sql = (f"SELECT {groups}, count(*), sum(status = 'error'), total({INPUT_SQL}), "
               "total(completion_tokens), total(cache_read_tokens), total(cache_write_tokens), "
               f"total(total_tokens), total({cost}), "
               f"total({computed}), sum({HAS_TOKENS_SQL} AND ({cost}) IS NULL), count(latency_ms), "
               f"{ASIDE_SQL}, sum(status IS NOT 'error' AND NOT ({HAS_TOKENS_SQL}) AND ({cost}) IS NULL) "
               f"FROM llm_traces WHERE {where} GROUP BY 1, 2, 3, 4")
        for call in self.conn.execute(sql, [*group_params, *params]):
            summed.append((*call[:4], Tally.of(call[4:4 + fields])))
            aside.add(call[4 + fields:])
        return summed, aside

    def units(self) -> set[int]:
        """The local days or hours (as groups_sql keys them) from the window's start, or the oldest call
        kept if later (before it nothing is known), to its end or now."""
        by_source = " WHERE source = ?" if self.source is not None else ""
        oldest = self.conn.execute(f"SELECT created_at FROM llm_traces{by_source} ORDER BY created_at "
                                   "LIMIT 1", [self.source] if by_source else []).fetchone()
        if oldest is None:
            return set()
        unit = DAY_MS if self.by == "day" else HOUR_MS
        first, end = max(self.since, oldest[0], 0), min(self.until, now_ms() + 1)
        at_times = [*range(first, end, unit // 2), end - 1] if first < end else []   # half a unit: DST
        return {(at + self.zone.offset_ms(at)) // unit for at in at_times}             # days are 23 h

    def calls(self, summed: Summed, groups: tuple[str, list[int]]) -> dict[str, Any]:
        """Totals and rows of LLM calls; with --breakdown each row split by model. Latency percentiles
        from one pass over the calls in order of latency, fed to the Ranks of each group they are in."""
        totals, rows_summed = Tally(), {}
        parts: dict[tuple, dict[tuple[Any, Any], Tally]] = collections.defaultdict(dict)
        rows_of: dict[tuple, tuple] = {}
        for key, day, provider, model, tally in summed:
            row = rows_of[key, day, provider, model] = {"model": (provider, model),
                                                        "provider": (provider,)}.get(self.by, (key,))
            rows_summed.setdefault(row, Tally()).add(tally)
            parts[row].setdefault((provider, model), Tally()).add(tally)
            totals.add(tally)
        if self.by in ("day", "hour"):        # a day or hour of no calls is a row of none: it shows
            rows_summed |= {(key,): Tally() for key in self.units() - {row[0] for row in rows_summed}}
        total_ranks = Ranks(totals.timed_calls)
        row_ranks = {row: Ranks(tally.timed_calls) for row, tally in rows_summed.items()}
        model_ranks = {(row, *model): Ranks(tally.timed_calls) for row, models in parts.items()
                       for model, tally in models.items()} if self.breakdown else {}
        feeds = {group: (total_ranks, row_ranks[row], model_ranks[(row, *group[2:])]) if self.breakdown
                 else (total_ranks, row_ranks[row]) for group, row in rows_of.items()}
        where, params = self.where()
        for call in self.conn.execute(f"SELECT {groups[0]}, latency_ms FROM llm_traces WHERE {where} AND "
                                      "latency_ms IS NOT NULL ORDER BY latency_ms", [*groups[1], *params]):
            for ranks in feeds[call[:4]]:
                ranks.see(call[4])
        if self.by in ("day", "hour"):
            order = sorted(rows_summed)
        else:
            order = sorted(rows_summed, key=lambda k: (-rows_summed[k].cost_usd, -rows_summed[k].calls,
                                                       tuple(map(str, k))))
        rows = []
        for key in order:
            row = {**self.group_key(key), **rows_summed[key].out(row_ranks[key].found())}
            if self.breakdown:
                models = sorted(parts[key].items(), key=lambda item: (-item[1].cost_usd, item[0]))
                row["models"] = [{"provider": p, "model": m, **tally.out(model_ranks[key, p, m].found())}
                                 for (p, m), tally in models]
            rows.append(row)
        return {"totals": totals.out(total_ranks.found()), "groups": rows}

    def group_key(self, key: tuple) -> dict[str, Any]:
        if self.by == "model":
            return {"provider": key[0], "model": key[1]}
        if self.by in ("day", "hour"):
            unit = DAY_MS if self.by == "day" else HOUR_MS
            start = datetime(1970, 1, 1) + timedelta(milliseconds=key[0] * unit)
            return {self.by: start.date().isoformat() if self.by == "day" else
                    start.isoformat(timespec="minutes")}
        return {{"session": "session_id"}.get(self.by, self.by): key[0]}

    def openclaw_cost(self) -> float | None:
        """What OpenClaw's own cost metric (openclaw.cost.usd, over OTLP) adds up to in the window, or
        None without its points: the cost of the calls its usage spans give without one. Looked up only
        for a window with calls of unknown cost (the table has no index on its time)."""
        if self.source not in (None, "otlp"):
            return None
        where, params = self.where(by_source=False)
        usd, points = self.conn.execute(f"SELECT total(value), count(*) FROM genai_metrics WHERE {where} AND "
                                        "name = ?", [*params, OPENCLAW_COST]).fetchone()
        return usd if points else None

    def log_beside_store(self, aside: Aside) -> int:
        """Calls taken from the gateway's log while the session store was not followed, in the time the
        store's calls span: the store read later holds the same calls, so both count them. A look only
        when the window holds calls of both."""
        if not aside.log_calls or aside.store_first is None:
            return 0
        where, params = self.where()
        return self.conn.execute(f"SELECT count(*) FROM llm_traces WHERE {where} AND source = 'log' AND "
                                 "created_at BETWEEN ? AND ?",
                                 [*params, aside.store_first, aside.store_last]).fetchone()[0]

    def top_sessions(self) -> list[dict[str, Any]]:
        where, params = self.where()
        cost, computed = COST_SQL[self.cost], COMPUTED_SQL[self.cost]
        rows = self.conn.execute(
            f"SELECT session_id, count(*), sum(status = 'error'), total({cost}) AS usd, total({computed}), "
            f"sum({HAS_TOKENS_SQL} AND ({cost}) IS NULL), total(total_tokens), min(created_at), "
            f"max(created_at) FROM llm_traces WHERE {where} AND session_id IS NOT NULL GROUP BY session_id "
            f"ORDER BY usd DESC, count(*) DESC, session_id LIMIT {TOP_SESSIONS}", params).fetchall()
        return [{"session_id": session, "calls": calls, "failures": failures, "cost_usd": round(usd, 9),
                 "computed_usd": round(part, 9), "unpriced_calls": unpriced, "total_tokens": int(tokens),
                 "first": self.zone.iso(first), "last": self.zone.iso(last)}
                for session, calls, failures, usd, part, unpriced, tokens, first, last in rows]

    def errors(self) -> list[dict[str, Any]]:
        where, params = self.where()
        return [{"error_type": kind, "category": category, "count": n} for kind, category, n in
                self.conn.execute(f"SELECT error_type, category, count(*) AS n FROM error_events WHERE "
                                  f"{where} GROUP BY error_type, category ORDER BY n DESC, error_type, "
                                  "category", params)]

    def host(self) -> dict[str, Any]:
        """Peaks of the host samples in the window, and the OOM kills otrace saw (one a client posted
        is among the errors)."""
        where, params = self.where(by_source=False)
        samples, cpu, memory, limit, disk, own = self.conn.execute(
            "SELECT count(*), max(cpu_pct), max(mem_used_bytes), max(mem_limit_bytes), max(disk_used_pct), "
            f"max(self_rss_bytes) FROM system_metrics WHERE {where}", params).fetchone()
        kills = self.conn.execute(     # the kills of one sample: the host's count holds the cgroup's
            "SELECT total(max(1, coalesce(json_extract(metadata, '$.kills.host'), 0), "
            "coalesce(json_extract(metadata, '$.kills.cgroup'), 0))) FROM error_events "
            f"WHERE {where} AND category = 'oom_kill' AND source = 'otrace'", params).fetchone()[0]
        return {"samples": samples, "cpu_pct_max": cpu, "mem_used_bytes_max": memory,
                "mem_limit_bytes": limit, "disk_used_pct_max": disk, "otrace_rss_bytes_max": own,
                "oom_kills": int(kills)}

    def log_events(self) -> dict[str, int]:
        where, params = self.where(by_source=False)
        return dict(self.conn.execute(f"SELECT kind, count(*) AS n FROM log_events WHERE {where} "
                                      "GROUP BY kind ORDER BY n DESC, kind", params))

    def push(self) -> dict[str, Any]:
        """Rows not pushed yet (now, whatever the window) and the last push attempt and success (its
        time alone once the push log no longer holds it)."""
        waiting = {table: self.conn.execute(f"SELECT count(*) FROM {table} WHERE synced = {UNSYNCED}")
                   .fetchone()[0] for table in EVENT_TABLES}

        def last(where: str) -> dict[str, Any] | None:
            row = self.conn.execute("SELECT started_at, http_status, error, events FROM push_log "
                                    f"{where} ORDER BY id DESC LIMIT 1").fetchone()
            return row and {"at": self.zone.iso(row[0]), "http_status": row[1], "error": row[2],
                            "events": row[3]}

        success = last(f"WHERE {CONFIRMED_SQL}")
        if success is None and (kept := self.conn.execute("SELECT value FROM otrace_state WHERE key = ?",
                                                          (PUSHED_KEY,)).fetchone()):
            success = {"at": self.zone.iso(kept[0]), "http_status": None, "error": None, "events": None}
        return {"unsynced": waiting, "unsynced_total": sum(waiting.values()), "last_attempt": last(""),
                "last_success": success}

    def retention(self) -> dict[str, Any]:
        """What retention deleted in the window, and what of it had never been pushed."""
        rows = self.conn.execute(
            "SELECT table_name, reason, sum(deleted), sum(unsynced_deleted) FROM retention_ledger "
            "WHERE at >= ? AND at < ? GROUP BY table_name, reason ORDER BY table_name, reason",
            (self.since, self.until)).fetchall()
        refused = self.conn.execute("SELECT count(*) FROM push_rejects WHERE rejected_at >= ? AND "
                                    "rejected_at < ?", (self.since, self.until)).fetchone()[0]
        return {"deleted": sum(r[2] for r in rows), "unpushed_deleted": sum(r[3] for r in rows),
                "refused_by_receiver": refused,
                "by_table": [{"table": t, "reason": r, "deleted": d, "unpushed_deleted": u}
                             for t, r, d, u in rows],
                "calls_incomplete": self.calls_incomplete(),
                "calls_deleted_through": (through := self.deleted_through()) and iso(through / 1000)}

    def deleted_through(self) -> int | None:
        """The latest arrival of a call retention deleted (by age or pressure), ever."""
        found = self.conn.execute("SELECT value FROM otrace_state WHERE key = ?",
                                  (DELETED_KEY + TRACES.name,)).fetchone()
        return found and found[0]

    def calls_incomplete(self) -> bool:
        """Whether retention may have deleted calls of the window: it deletes the oldest rows of a kind
        (pushed, or not) first, so it did if a call it deleted arrived after the window began. A
        database from before that arrival was kept: each pressure tier did if it deleted calls after
        the window began (then or later: a ledger row holds an hour's, dated by its first) while the
        oldest call of that kind kept arrived after the window began."""
        if (through := self.deleted_through()) is not None:
            return through > self.since
        for reason, kind in (("pressure_pushed", DELIVERED), ("pressure_unpushed", UNDELIVERED)):
            if self.conn.execute("SELECT 1 FROM retention_ledger WHERE table_name = 'llm_traces' AND "
                                 "reason = ? AND at >= ? AND deleted > 0 LIMIT 1",
                                 (reason, self.since - HOUR_MS)).fetchone():
                oldest = self.conn.execute(f"SELECT received_at FROM llm_traces WHERE {kind} ORDER BY id "
                                           "LIMIT 1").fetchone()
                if oldest is None or oldest[0] > self.since:
                    return True
        return False

    def usage_cost(self, summed: Summed) -> dict[str, Any]:
        """The window's calls by day in OpenClaw's `gateway usage-cost --json` shape and names (input
        without the cache's tokens, totalTokens as stored), so its totals compare directly."""
        days: dict[int, Tally] = {}
        for _, day, _, _, tally in summed if self.by != "session" else self.sums(*self.groups_sql("day"))[0]:
            days.setdefault(min(day, LAST_DAY), Tally()).add(tally)     # a local day past 9999: its last
        daily = [{"date": (date(1970, 1, 1) + timedelta(days=day)).isoformat(), **usage_cost_sums(days[day])}
                 for day in sorted(days)]
        totals = Tally()
        for tally in days.values():
            totals.add(tally)
        return {"updatedAt": now_ms(), "days": len(daily), "daily": daily, "totals": usage_cost_sums(totals)}


def usage_cost_sums(tally: Tally) -> dict[str, Any]:
    """A Tally under OpenClaw's names."""
    return {"input": tally.input_tokens, "output": tally.output_tokens, "cacheRead": tally.cache_read_tokens,
            "cacheWrite": tally.cache_write_tokens, "totalTokens": tally.total_tokens,
            "totalCost": round(tally.cost_usd, 9), "missingCostEntries": tally.unpriced_calls}


# -- output

def csv_text(doc: dict[str, Any]) -> str:
    """The groups as CSV, one row per group (per group and model with --breakdown)."""
    import csv  # noqa: PLC0415 - imported where needed (see the imports)
    import io  # noqa: PLC0415 - imported where needed (see the imports)
    key = ["provider", "model"] if doc["by"] == "model" else [
        {"session": "session_id"}.get(doc["by"], doc["by"])]
    split = doc["breakdown"] and doc["by"] != "model"
    named = [name for name in ("provider", "model") if split and name not in key]   # each column once
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*key, *named, *CSV_FIELDS])
    for group in doc["calls"]["groups"]:
        for row in group["models"] if split else [group]:
            flat = {**row, **{f"latency_{p}_ms": v for p, v in row["latency_ms"].items()}}
            names = [group[k] for k in key] + [row[name] for name in named]
            writer.writerow([*map(spreadsheet_safe, names), *(flat[field] for field in CSV_FIELDS)])
    return out.getvalue()


def spreadsheet_safe(value: Any) -> Any:
    """A name as a spreadsheet shows it, not as a formula it runs (=, +, -, @ first get a quote), on
    one row and harmless to a terminal: control characters as "?", as in the table (a CR, which the
    csv module leaves unquoted, would start a row of its own, past the quote)."""
    if not isinstance(value, str):
        return value
    value = terminal_safe(value)
    return "'" + value if value[:1] in ("=", "+", "-", "@") else value


CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """Text from the data as a terminal shows it: control characters (an escape sequence, a newline,
    a bidirectional override) as "?", so a model name cannot move the cursor or split a row."""
    return CONTROL.sub("?", text)


def columns_of(text: str) -> list[int]:
    """The terminal columns each character takes: two for a wide one (CJK, most emoji), none for a
    combining mark."""
    import unicodedata  # noqa: PLC0415 - imported where needed (see the imports)
    return [0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
            for c in text]


def fit(text: str, width: int) -> str:
    """`text` in `width` terminal columns: padded, or cut in its middle with "…", keeping its start
    and its end (two models apart by their date only stay apart)."""
    columns = columns_of(text)
    if sum(columns) <= width:
        return text + " " * (width - sum(columns))
    head, tail, room = 0, len(text), width - 1 - (width - 1) // 2      # the start's share, then the end's
    while columns[head] <= room:
        room, head = room - columns[head], head + 1
    room += (width - 1) // 2
    while tail > head and columns[tail - 1] <= room:
        room, tail = room - columns[tail - 1], tail - 1
    return text[:head] + "…" + text[tail:] + " " * room


def tokens_text(n: int) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size * 0.99995:               # what rounds up to a thousand of one is one of the next
            return f"{n / size:.1f}{unit}"
    return str(n)


def percent_text(rate: float) -> str:
    """A failure rate, never 0.0% for failures that happened."""
    return "<0.1%" if rate < 0.0005 else f"{100 * rate:.1f}%"


def usd_text(usd: float) -> str:
    """Four decimals up to $100, so a call's fraction of a cent shows (rows rounded so may miss the
    total as printed by a digit or two in the last place)."""
    return "$0" if not usd else "<$0.0001" if usd < 0.00005 else f"${usd:,.2f}" if usd >= 100 else \
        f"${usd:.4f}"


def cost_text(sums: dict[str, Any]) -> str:
    """A group's cost, marked * where the price table computed part of it, ? where calls with tokens
    have none."""
    return usd_text(sums["cost_usd"]) + "*" * bool(sums["computed_usd"]) + "?" * bool(sums["unpriced_calls"])


def ms_text(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f}ms" if ms < 999.5 else f"{ms / 1000:.1f}s"


def bytes_text(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' * (n != 1)}"


def bar(value: float, top: float, width: int) -> str:
    """A bar of `width` cells for value/top, in eighths of a cell."""
    eighths = round(8 * width * value / top) if top > 0 else 0
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]


class TableView:
    """The report as text for a terminal `width` columns wide: every column where it fits, else a
    compact table; with --by day or hour, each row's cost as a bar scaled to the largest."""

    FULL = (("CALLS", 7), ("FAILED", 12), ("INPUT", 8), ("OUTPUT", 8), ("CACHE R", 8), ("CACHE W", 8),
            ("COST", 11), ("P50", 7), ("P95", 7), ("P99", 7))
    COMPACT = (("CALLS", 7), ("FAILED", 7), ("TOKENS", 8), ("COST", 10), ("P95", 7))

    def __init__(self, doc: dict[str, Any], width: int) -> None:
        self.doc, self.width = doc, max(40, width)

    def cells(self, row: dict[str, Any], compact: bool) -> list[str]:
        rate = f"{row['failures']:,}" + (f" {percent_text(row['failure_rate'])}" if row["failures"] else "")
        cost = cost_text(row)
        latency = row["latency_ms"]
        tokens = [row[f"{kind}_tokens"] for kind in ("input", "output", "cache_read", "cache_write")]
        if compact:
            return [f"{row['calls']:,}", f"{row['failures']:,}", tokens_text(row["total_tokens"]), cost,
                    ms_text(latency["p95"])]
        return [f"{row['calls']:,}", rate, *map(tokens_text, tokens), cost,
                *(ms_text(latency[p]) for p in ("p50", "p95", "p99"))]

    def label(self, row: dict[str, Any]) -> str:
        by = self.doc["by"]
        if by == "model":
            return terminal_safe(f"{row['provider']}/{row['model']}")
        value = row[{"session": "session_id"}.get(by, by)]
        return "(none)" if value is None else terminal_safe(str(value))

    def render(self) -> str:
        doc, calls = self.doc, self.doc["calls"]
        groups = calls["groups"]
        labels = [self.label(g) for g in groups]
        sub = [[terminal_safe(f"  {m['provider']}/{m['model']}") for m in g.get("models", [])]
               for g in groups]
        key_width = max([len(doc["by"]) + 1, 5, *(sum(columns_of(s)) for s in labels),
                         *(sum(columns_of(s)) for part in sub for s in part)])
        compact = key_width + sum(w for _, w in self.FULL) > self.width
        columns = self.COMPACT if compact else self.FULL
        rows: list[tuple[str, list[str], float | None]] = []
        for group, label, models in zip(groups, labels, sub, strict=True):
            rows.append((label, self.cells(group, compact), group["cost_usd"]))
            rows += [(name, self.cells(m, compact), None) for name, m in zip(models, group.get("models", []),
                                                                            strict=True)]
        total = ("TOTAL", self.cells(calls["totals"], compact), None)
        widths = [max(w, *(len(cells[i]) + 1 for _, cells, _ in (*rows, total)))   # a value wider than
                  for i, (_, w) in enumerate(columns)]                               # its column: wider
        key_width = min(key_width, max(REPORT_LABEL_MIN, self.width - sum(widths) - 1))
        bars = doc["by"] in ("day", "hour") and bool(groups)
        bar_width = max(0, self.width - key_width - sum(widths) - 2) if bars else 0
        top = max((g["cost_usd"] for g in groups), default=0)

        def line(key: str, cells: list[str], cost: float | None = None) -> str:
            text = fit(key, key_width) + "".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
            drawn = "  " + bar(cost, top, bar_width) if bar_width and cost is not None else ""
            return (text + drawn).rstrip()          # an empty bar leaves no blanks

        window = doc["window"]
        title = (f"otrace report: {window['since']} to {window['until']} ({window['timezone']}), "
                 f"by {doc['by']}" + (f", source {doc['source']}" if doc["source"] else ""))
        out = [*textwrap.wrap(title, self.width, subsequent_indent="  "), ""]
        out.append(line(doc["by"].upper(), [name for name, _ in columns]))
        out += [line(*row) for row in rows]
        if not groups:
            out.append("(no LLM calls in this window)")
        out.append(line(*total))
        out += [line for note in self.notes() for line in textwrap.wrap(note, self.width,
                                                                         subsequent_indent="  ")]
        out += ["", *self.sections()]
        return "\n".join(out) + "\n"

    def notes(self) -> list[str]:
        totals, mode = self.doc["calls"]["totals"], self.doc["cost"]
        notes = []
        if totals["computed_usd"]:
            notes.append(f"* {usd_text(totals['computed_usd'])} of the cost computed from the price table "
                         + ("(the source reported none)" if mode == "auto" else "(--cost computed)"))
        if totals["unpriced_calls"]:
            notes.append(f"? {plural(totals['unpriced_calls'], 'call')} with tokens and no cost: no price "
                         "for the model, or a total of tokens alone" + (
                             " (or none reported: --cost reported)" if mode == "reported" else ""))
        if (metric := self.doc["calls"]["openclaw_cost_metric_usd"]) is not None:
            notes.append(f"? OpenClaw's own cost metric ({OPENCLAW_COST}) adds up to {usd_text(metric)} in "
                         "this window: its calls over OTLP carry no cost of their own")
        if unmeasured := self.doc["calls"]["unmeasured_calls"]:
            whose = "its" if unmeasured == 1 else "their"
            notes.append(f"? {plural(unmeasured, 'call')} with neither tokens nor a cost (as the gateway's "
                         f"log gives calls): counted at $0, {whose} cost not known")
        if (zero := self.doc["calls"]["reported_zero"])["calls"] and mode != "computed":
            notes.append(f"{plural(zero['calls'], 'call')} reported at $0 by the source: the price table "
                         f"puts {'it' if zero['calls'] == 1 else 'them'} at {usd_text(zero['computed_usd'])} "
                         "(--cost computed)")
        if beside := self.doc["calls"]["log_calls_beside_the_store"]:     # 0 with --source
            notes.append(f"! {plural(beside, 'call')} from the gateway's log, stored while the session store "
                         "was off, fall in the time the store's calls span: both may count the same calls, "
                         f"and ERRORS their failures (--source {STORE_SOURCE} gives the store's alone)")
        if self.doc["retention"]["calls_incomplete"]:
            through = self.doc["retention"]["calls_deleted_through"]
            notes.append("! totals may miss calls: retention deleted the oldest calls since the window "
                         "began" + (f" (calls that arrived up to {through})" if through else
                                    ", and the oldest kept arrived after it began (RETENTION below)"))
        return notes

    def sections(self) -> list[str]:
        doc = self.doc
        host, push, retention = doc["host"], doc["push"], doc["retention"]
        sessions = [f"{s['session_id']} {cost_text(s)} ({plural(s['calls'], 'call')})"
                    for s in doc["top_sessions"]]
        errors = [f"{e['error_type']}/{e['category']} {e['count']:,}" for e in doc["errors"]]
        logs = [f"{kind} {n:,}" for kind, n in doc["log_events"].items()]
        host_text = "no samples" if not host["samples"] else (
            f"CPU peak {host['cpu_pct_max'] or 0:.1f} % · memory peak "
            f"{bytes_text(host['mem_used_bytes_max'])} of {bytes_text(host['mem_limit_bytes'])} · disk peak "
            f"{host['disk_used_pct_max'] or 0:.1f} %")
        host_text += f" · OOM kills {host['oom_kills']}"
        last, success = push["last_attempt"], push["last_success"]
        unsynced = push["unsynced_total"]
        pushes = [f"{unsynced:,} row{'s' * (unsynced != 1)} not pushed"]
        if last:
            pushes.append(f"last push {last['at']}: " + (
                f"HTTP {status}" + (f", {last['error']}" if last["error"] and 200 <= status < 300 else "")
                if (status := last["http_status"]) else last["error"] or "failed"))   # a 2xx refusing some
        if success and success != last:
            pushes.append(f"last success {success['at']}")
        if not last and not success:
            pushes.append("no push in the push log")
        push_text = " · ".join(pushes)
        deleted: collections.Counter[str] = collections.Counter()
        for part in retention["by_table"]:
            deleted[part["table"]] += part["deleted"]
        tables = ", ".join(f"{table} {n:,}" for table, n in deleted.items() if n)
        lost = (f"{retention['deleted']:,} rows deleted ({tables}), {retention['unpushed_deleted']:,} never "
                "pushed" if retention["deleted"] else "nothing deleted")
        if retention["refused_by_receiver"]:
            lost += f" · {retention['refused_by_receiver']:,} refused by the receiver"
        rows = [("ERRORS", " · ".join(errors) or "none"), ("TOP SESSIONS", " · ".join(sessions) or "none"),
                ("HOST", host_text), ("LOG EVENTS", " · ".join(logs) or "none"), ("PUSH", push_text),
                ("RETENTION", lost)]
        return [line for name, text in rows for line in textwrap.wrap(      # never within an id or a name
            terminal_safe(text), self.width, initial_indent=name.ljust(14), subsequent_indent=" " * 14,
            break_on_hyphens=False, break_long_words=False)]


TEMP_FULL = ("SQLite's temporary directory (SQLITE_TMPDIR, else TMPDIR, else /var/tmp, /usr/tmp or /tmp) has "
             "no room for this report's sorts: they were done in memory; free some space there")


def run_report(argv: list[str]) -> int:
    """`otrace report`: print the report, or exit 2 saying what is wrong with the question."""
    import argparse  # noqa: PLC0415 - imported where needed (see the imports)
    parser = argparse.ArgumentParser(
        prog="otrace report", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="What the agent did and cost in a window: LLM calls, failures, tokens, cost, latency; "
                    "errors, top sessions, host peaks, log events, push and retention. Reads the database "
                    "read-only, also while otrace runs.",
        epilog="examples:\n  otrace report                       the last 24 hours by model\n"
               "  otrace report --since 7d --by day   a week, a row and a cost bar per day\n"
               "  otrace report --since today --json  today, machine-readable\n"
               "  otrace report --since 2026-11-01 --until 2026-11-30 --by day --breakdown --csv")
    parser.add_argument("--db", default=os.environ.get("TRACE_DB_PATH") or Config.db_path,
                        help="the database (default: TRACE_DB_PATH, else %(default)s)")
    parser.add_argument("--since", default="24h", help="start: 24h, 7d (before --until), today, "
                        "2026-11-30, or an RFC 3339 time (default: 24h)")
    parser.add_argument("--until", default=None, help="end, in the same forms (a date counts whole); "
                        "default: now")
    parser.add_argument("--by", choices=REPORT_BY, default="model", help="a row per (default: model)")
    parser.add_argument("--breakdown", action="store_true", help="split each row by model")
    parser.add_argument("--cost", choices=COST_MODES, default="auto", help="auto (default): the figure the "
                        "source reported, else computed from the price table; computed: always the price "
                        "table's; reported: only the sources' figures")
    parser.add_argument("--timezone", help="the zone days and hours are counted in: Europe/Berlin, UTC, "
                        "+05:30 (a negative offset as --timezone=-03:00); default: the machine's")
    parser.add_argument("--source", choices=REPORT_SOURCES, help="only calls and errors from this "
                        "source: http (the API), otlp, log (the gateway's), openclaw_session, otrace (its "
                        "own errors)")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help=f"the report as JSON (schema {REPORT_SCHEMA})")
    shape.add_argument("--csv", action="store_true", help="the rows as CSV")
    args = parser.parse_args(argv)
    for warning in unknown_settings(os.environ):       # TRACE_DB_PAHT would otherwise go unsaid
        print(f"otrace report: {warning}", file=sys.stderr)
    try:
        if args.breakdown and args.by == "model":
            raise ReportError("--breakdown splits rows by model: use it with --by provider, day, hour, "
                              "session or source")
        zone, now = Zone(args.timezone), now_ms()
        until = now if args.until is None else moment(args.until, zone, now, end=True)
        since = moment(args.since, zone, now, end=False, back_from=until)
        if since >= until:
            raise ReportError(f"--since ({zone.iso(since, exact=True)}) is not before --until "
                              f"({zone.iso(until, exact=True)})")
        conn = open_snapshot(args.db)
    except ReportError as bad:
        print(f"otrace report: {bad}", file=sys.stderr)
        return 2
    asked = functools.partial(Report, since_ms=since, until_ms=until, zone=zone, by=args.by,
                              breakdown=args.breakdown, cost=args.cost, source=args.source)
    try:
        try:
            with contextlib.closing(conn):
                doc = asked(conn).document()
        except sqlite3.Error as exc:
            # a read-only connection writes nothing but its sorts' spill files: SQLite's temp directory
            # (often another disk than the database's) is full; kept in memory, the sorts cost RSS only
            if sqlite_code(exc) != "SQLITE_FULL":
                raise
            with contextlib.closing(open_snapshot(args.db, sorts_in_memory=True)) as conn:
                doc = asked(conn).document()
            print(f"otrace report: {TEMP_FULL}", file=sys.stderr)
    except sqlite3.Error as exc:
        print(f"otrace report: cannot read {args.db}: {describe(exc)}", file=sys.stderr)
        return 1
    except ReportError as bad:      # the file replaced or removed since it was first opened
        print(f"otrace report: {bad}", file=sys.stderr)
        return 2
    doc["database"] = args.db
    try:
        with contextlib.suppress(BrokenPipeError):
            if args.json:       # written as it is encoded: a report of many rows is never held as one text
                json.dump(doc, sys.stdout, indent=2, ensure_ascii=False)
                sys.stdout.write("\n")
            elif args.csv:
                sys.stdout.write(csv_text(doc))
            else:
                width = int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else (
                    os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else 160)
                sys.stdout.write(TableView(doc, width).render())
            sys.stdout.flush()
    except OSError as exc:      # `> file` on a full disk: said, and what is left unwritten dropped
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"otrace report: cannot write the report: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


# =========================================================================================== lifecycle
# Start: the lock, the database, the threads. Stop, on SIGTERM: stop accepting, finish in-flight
# requests, write every queued event, push what time allows, checkpoint, close.

START_RETRY = 5.0                # seconds between tries of a start the environment holds up
SPARE_DESCRIPTORS = 64           # for the database, its WAL, the log files, push, epoll
RUN_KEY = "running_pid"          # otrace_state: the pid of the run under way; a clean stop removes it ...
RUN_FILE_KEY = "running_inode"   # ... and its file's inode: a backup taken meanwhile holds both, not this


def http_url(host: str, port: int) -> str:
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


class Service:
    """otrace itself: the database, the writer, the loops, the HTTP server, and their orderly stop."""

    def __init__(self, config: Config, lock: DatabaseLock | None = None) -> None:
        if config.debug_tracemalloc:
            import tracemalloc  # noqa: PLC0415 - imported where needed (see the imports)
            tracemalloc.start(TRACEMALLOC_FRAMES)
        self.config = config
        self.started = time.monotonic()
        return_big_buffers()
        self.counters = Counters((*EVENT_COUNTERS, "connections_refused", "bodies_refused", "unauthorized",
                                  "custom_received"))
        self.refusals = RefusalLog()
        open_database(config.db_path)
        self.db_device = folder_device(config.db_path)
        with contextlib.closing(connect(config.db_path)) as conn:
            if take_carried(conn, config.db_path):
                log.warning("rows carried over from a replaced database file taken in")
            # what the last run left: its mark, and retention's lessons (read here, at once, where a
            # read by each loop as it starts would wait out another program's lock in turn)
            kept = {key: (value, updated) for key, value, updated in conn.execute(
                "SELECT key, value, updated_at FROM otrace_state WHERE key IN (?, ?, ?, ?)",
                (RUN_KEY, RUN_FILE_KEY, *MARKS_KEYS))}
        self.db = Database(config.db_path)
        self.run_file = int64((self.db.identity or (0, 0))[1])   # the inode this run marks
        # a run that did not stop cleanly, in this very file (a backup restored holds its run's mark)
        self.last_run = kept.get(RUN_KEY) if kept.get(RUN_FILE_KEY, (None,))[0] == self.run_file else None
        self.events = EventQueue(config.queue_size, config.batch_size)
        self.writer = Writer(config, self.db, self.events, self.counters, lock)
        self.prices = load_prices(config.prices)
        PRICING.install(self.prices)
        if not PRICES_FILE.exists():
            log.warning("prices.json is not beside otrace.py: costs are computed only from TRACE_PRICES",
                        extra={"expected_at": str(PRICES_FILE), "prices": config.prices or None})
        self.tally = CallTally(config.metrics_max_models)
        self.writer.on_inserted = self.tally.add
        if not self.writer.reserve.hold():
            log.warning("disk reserve not held: no room for it", extra={
                "path": str(self.writer.reserve.path), "bytes": config.disk_reserve_bytes})
        self.retention = Retention(config, self.events, self.db, kept, self.writer.reserve)
        self.retention.check_budget()
        self.writer.on_fault = self.on_write_fault
        self.writer.on_recovered = self.on_write_recovered
        self.checkpointer = Checkpointer(config, self.events, self.db)
        self.writer.on_committed = self.committed
        self.loops: list[Loop] = [self.checkpointer, self.retention]
        self.dns = DnsProbe(config, self.events) if config.dns_probe else None
        self.processes = ProcessSampler(config, self.events) if config.proc_interval else None
        self.sampler = Sampler(config, self.events, self.db, self.dns, self.processes) \
            if config.metrics_interval else None
        self.debug = Debug(self) if config.debug else None
        state_dir = openclaw_state_dir(config.openclaw_state_dir, gateway_here=bool(config.log_path),
                                       log_path=config.log_path)
        if state_dir is None and config.openclaw_state_dir == "auto" and config.log_path:
            log.warning("OpenClaw's session store is not followed: auto looks in this user's home, and it "
                        "has none (no HOME, no password entry); set TRACE_OPENCLAW_STATE_DIR",
                        extra={"uid": os.getuid()})
        self.store = SessionStore(config, self.events, self.db, state_dir) if state_dir else None
        self.tailer = LogTailer(config, self.events, self.db, self.store and self.store.root) \
            if config.log_path else None
        self.pusher: Pusher | None = None
        if config.push_endpoint:
            self.pusher = Pusher(config, self.events, self.db)
        else:
            log.warning("push is off: events stay in the local database (set TRACE_PUSH_ENDPOINT)")
        self.loops += [loop for loop in (self.sampler, self.processes, self.dns, self.tailer, self.store,
                                         self.pusher) if loop]
        self.otlp = OtlpReceiver(self)
        otlp = [(config.host, config.otlp_port)] if config.otlp_port not in (0, config.port) else []
        if config.otlp_port and config.otlp_port == config.port:
            log.info("TRACE_OTLP_PORT is TRACE_PORT: that one port serves OTLP with every other route")
        # last, so that a failed start binds nothing
        self.server = IngestServer(self, [(config.host, config.port)], otlp)

    def committed(self) -> None:
        """After each batch, on the writer's thread: what the batch grew may be due for a deletion or a
        copy."""
        conn = self.writer.conn
        # first: whether a snapshot holds the WAL, as of this batch
        self.checkpointer.watch(conn, self.retention.wal_room())
        since = self.checkpointer.held_since
        self.retention.watch(None if since is None else Hold(since, live_bytes(conn)))

    def on_write_fault(self, error: str) -> None:
        """A write has just started failing: run retention now, which acts if space is short (a full
        disk shows as SQLITE_FULL, or as an I/O error growing the -shm)."""
        self.retention.wake()

    def on_write_recovered(self) -> None:
        """Writes work again: loops that failed with them try now, not at their next interval (their
        faults would stay listed for minutes after the disk was fixed)."""
        for loop in (self.retention, self.checkpointer):
            if loop.fault.error is not None:
                loop.wake()

    def health(self) -> dict[str, Any]:
        return health_report(self)

    @property
    def address(self) -> str:
        return http_url(*self.server.addresses()[0])

    @property
    def otlp_address(self) -> str | None:
        """Where TRACE_OTLP_PORT is served, if it is."""
        listening = self.server.addresses()[1:]
        return http_url(*listening[0]) if listening else None

    def start(self) -> None:
        self.writer.start()
        self.mark_run()
        # marked before the first 202, so a kill after it is reported; failing writes (a full disk,
        # another program's lock) are no reason to stay closed: /health says so, ingest answers 503
        until = time.monotonic() + BUSY_TIMEOUT
        while not (self.events.wait_drained(0.05) or self.writer.failing) and time.monotonic() < until:
            pass
        for loop in self.loops:
            loop.start()
        threading.Thread(target=self.server.serve_forever, name="otrace-http", daemon=True).start()

    def stop(self, deadline: float) -> bool:
        """Stop in order within the deadline. False if events that got a 202 could not be written in
        time (otrace's own rows left unwritten are logged, not counted: no client was promised them)."""
        timeout = self.config.shutdown_timeout
        reserve = min(0.5, timeout / 8)     # kept for the checkpoint and the close
        if self.debug:
            self.debug.stop()               # a profile under way is answered with what it has
        cut = self.server.close(until=deadline - min(1.5, timeout / 2))   # then the queue's turn
        self.otlp.worker.stop()
        self.otlp.content.trim()
        if unjoined := len(self.otlp.content):      # kept in memory only: its span, if it comes, has none
            log.warning("OTLP content waiting for its span dropped at the stop", extra={"spans": unjoined})
        for loop in self.loops:             # producers offer nothing more; a refused offer loses nothing
            loop.stop()
        self.events.close()
        drained = self.events.wait_drained(deadline - reserve - time.monotonic())
        lost, own = (0, 0) if drained else self.events.unwritten()
        if not lost:                        # every event a client was answered 202 for is written
            self.unmark_run(deadline)
        if drained:
            if self.pusher:
                self.pusher.final_push(deadline - reserve)
            self.checkpoint(deadline)
        # what the next start pushes (a receiver down at the stop): None with push off, or unread
        unpushed = unsynced_count(self.db, self.pusher.tables) if self.pusher and drained else None
        self.db.close()                     # the writer's connection closes last: it removes the WAL
        self.events.submit(None)
        self.writer.join(max(0.0, deadline - time.monotonic()))
        counts = self.counters.snapshot()
        if lost:
            log.error("shutdown deadline passed with accepted events not written",
                      extra={"events_lost": lost})
        if own:
            log.warning("shutdown deadline passed with otrace's own rows not written (a host sample is "
                        "lost; log lines are read again at the next start)", extra={"rows": own})
        log.info("stopped", extra={"events_received": counts["received"], "events_persisted":
                                   counts["persisted"], "events_duplicate": counts["duplicate"],
                                   "events_lost": lost, "own_rows_unwritten": own, "connections_cut": cut,
                                   "rows_unpushed": unpushed})
        return not lost

    def mark_run(self) -> None:
        """Mark this run as under way, which only a clean stop undoes; and say, in the log and as an
        error event, if the last run was not undone: killed, or out of time at its stop with events
        unwritten."""
        rows = []
        if self.last_run:
            said = {"pid": self.last_run[0], "started_at": iso(self.last_run[1] / 1000)}
            log.warning("the last run did not stop cleanly: what it accepted in its last moments may be "
                        "lost", extra=said)
            rows.append(own_error("process_crash", "otrace's last run did not stop cleanly: the events it "
                                  "answered 202 for in its last moments may be lost", said))
        now = now_ms()
        self.events.offer(Unit(rows, ((STATE_SQL, (RUN_KEY, os.getpid(), now)),
                                      (STATE_SQL, (RUN_FILE_KEY, self.run_file, now))),
                               own=True, at_once=True))

    def unmark_run(self, deadline: float) -> None:
        """A clean stop: every event a client was answered 202 for is written."""
        def unmark(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute("DELETE FROM otrace_state WHERE key IN (?, ?)", (RUN_KEY, RUN_FILE_KEY))
        try:
            self.events.call(unmark, deadline - time.monotonic())
        except Exception as exc:  # noqa: BLE001 - the next start then says this one did not stop cleanly
            log.warning("could not mark the stop as clean", extra={"error": describe(exc)})

    def checkpoint(self, deadline: float) -> None:
        """TRUNCATE checkpoint at shutdown, so the next start finds a small WAL."""
        wal = file_size(self.config.db_path + "-wal")
        try:
            result = self.events.call(functools.partial(checkpoint, "TRUNCATE"), deadline - time.monotonic())
            log.info("wal checkpoint", extra={"mode": "truncate", "wal_bytes_before": wal, **result})
        except Exception as exc:  # noqa: BLE001 - the data is committed; the WAL stays for next start
            log.warning("wal checkpoint at shutdown failed", extra={"error": describe(exc)})


def settled(config: Config) -> Config:
    """The settings as this process can honour them: the database path resolved once (a symlink's
    target, so the WAL and reserve are found beside the real file), no more connections than file
    descriptors allow (the soft limit raised toward the hard one first), bodies no larger than the
    memory all may hold, push batches of at most a share of the cap, a first push retry no longer than
    the longest, and batches of at most half the queue (the writer commits while the other half takes
    requests)."""
    import resource  # noqa: PLC0415 - imported where needed (see the imports)
    config = dataclasses.replace(config, db_path=os.path.realpath(config.db_path))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = PROBE_RESERVE + REFUSED_LINGERING + SPARE_DESCRIPTORS     # besides the connections served
    needed = config.max_connections + held
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft != resource.RLIM_INFINITY and soft < needed:
        allowed = max(1, soft - held)
        log.warning("TRACE_MAX_CONNECTIONS is over what the file-descriptor limit allows: lowered", extra={
            "max_connections": config.max_connections, "lowered_to": allowed, "nofile_limit": soft})
        config = dataclasses.replace(config, max_connections=allowed)
    if config.max_body_bytes > config.max_buffered_bytes:    # else such a body is answered 503 for ever
        log.warning("TRACE_MAX_BODY_BYTES is over TRACE_MAX_BUFFERED_BYTES: lowered", extra={
            "max_body_bytes": config.max_body_bytes, "lowered_to": config.max_buffered_bytes})
        config = dataclasses.replace(config, max_body_bytes=config.max_buffered_bytes)
    if config.disk_high_pct > DISK_HIGH_MOST:     # else a full disk's pause ends at once, reserve or not
        log.warning(f"TRACE_DISK_HIGH_PCT is over {DISK_HIGH_MOST}: lowered", extra={
            "disk_high_pct": config.disk_high_pct, "lowered_to": DISK_HIGH_MOST})
        config = dataclasses.replace(config, disk_high_pct=DISK_HIGH_MOST)
    # else marking one backlog's batch pushed rewrites most of a small cap into the WAL at once
    if config.push_max_bytes > (share := config.db_max_bytes // PUSH_CAP_SHARE):
        if config.push_endpoint:
            log.warning(f"TRACE_PUSH_MAX_BYTES is over 1/{PUSH_CAP_SHARE} of TRACE_DB_MAX_BYTES: lowered",
                        extra={"push_max_bytes": config.push_max_bytes, "lowered_to": share,
                               "db_max_bytes": config.db_max_bytes})
        config = dataclasses.replace(config, push_max_bytes=share)
    if config.push_backoff_base > config.push_backoff_cap:    # else the cap sets every wait, unsaid
        if config.push_endpoint:
            log.warning("TRACE_PUSH_BACKOFF_BASE is over TRACE_PUSH_BACKOFF_CAP: lowered", extra={
                "push_backoff_base": config.push_backoff_base, "lowered_to": config.push_backoff_cap})
        config = dataclasses.replace(config, push_backoff_base=config.push_backoff_cap)
    if config.batch_size > (half := max(1, config.queue_size // 2)):   # else a full queue refuses first
        log.warning("TRACE_BATCH_SIZE is over half TRACE_QUEUE_SIZE: lowered", extra={
            "batch_size": config.batch_size, "lowered_to": half, "queue_size": config.queue_size})
        config = dataclasses.replace(config, batch_size=half)
    return config


def cannot_start(error: str, said: str = "cannot start: ") -> None:
    """A start that will not happen: logged, and said in one line on stderr after `said`."""
    log.critical("cannot start", extra={"error": error})
    print(f"otrace: {said}{error}", file=sys.stderr)


def full_disk_note(path: str) -> str:
    """What SQLite's error may not say (it can name a step, SQLITE_IOERR_SHMSIZE): the disk holding
    the database has no room left for otrace (root may use the blocks kept for it)."""
    with contextlib.suppress(OSError):
        st = os.statvfs(Path(path).parent)
        if (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize < 1 << 20:
            return "; the disk holding the database is full"    # no count: the line is said once
    return ""


def start_service(config: Config, stop_signals: set[signal.Signals],
                  lock: DatabaseLock) -> Service | signal.Signals | None:
    """The Service, once its database opens. A fault of the environment (a full disk, an I/O error) is
    retried every START_RETRY seconds, logged once, until it clears or a stop signal comes (that
    signal is returned); anything else is final (None)."""
    fault = FaultLog(log, "start")
    while True:
        try:
            service = Service(config, lock)
        except (OSError, sqlite3.Error, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) or not is_environment(exc) or sqlite_code(exc) in CORRUPTION:
                cannot_start(describe(exc))
                return None
            if Reserve(config.db_path, config.disk_reserve_bytes, log, config.disk_high_pct).free_for_start(
                    describe(exc)):                       # otrace's own room, left by its last run
                continue
            fault.failed(describe(exc) + full_disk_note(config.db_path))
            received = signal.sigtimedwait(stop_signals, START_RETRY)
            if received:
                return signal.Signals(received.si_signo)
            continue
        fault.cleared()
        return service


def serve(config: Config, warnings: Iterable[str] = ()) -> int:
    """Run until SIGTERM or SIGINT, then stop within TRACE_SHUTDOWN_TIMEOUT. The exit code."""
    setup_logging(config.log_level)
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:   # the terminal went away; not under nohup
        stop_signals.add(signal.SIGHUP)
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)   # every thread inherits this; main waits
    for warning in warnings:
        log.warning(warning)
    config = settled(config)
    log.info("starting", extra={"version": __version__, "pid": os.getpid(), "settings": config.shown()})
    try:
        problem = database_problem(config.db_path)
    except sqlite3.Error as exc:
        cannot_start(f"{config.db_path} is locked by another program ({describe(exc)})")
        return 1
    if problem:
        cannot_start(problem, said="TRACE_DB_PATH: ")
        return 2
    try:
        lock = DatabaseLock(config.db_path)
    except DatabaseLocked as exc:
        cannot_start(str(exc), said="")
        return 1
    except OSError as exc:               # its directory cannot be made, or a file opened there
        cannot_start(f"{config.db_path} cannot be used ({describe(exc)})", said="TRACE_DB_PATH: ")
        return 1 if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO) else 2   # else: the path's fault
    service = start_service(config, stop_signals, lock)
    if service is None:
        return 1
    if isinstance(service, signal.Signals):
        log.info("stopped before starting", extra={"signal": service.name})
        return 0
    # the HTTP thread after each send, the writer after each SQLite call, win the GIL back sooner from
    # a thread busy in Python (an OTLP decode, a log's catch-up)
    sys.setswitchinterval(GIL_SWITCH)
    main_thread = threading.get_ident()        # the HTTP thread failing wakes it as a SIGTERM would
    service.server.on_failed = lambda: signal.pthread_kill(main_thread, signal.SIGTERM)
    service.start()
    log.info("listening", extra={"address": service.address, "otlp_address": service.otlp_address})
    received = signal.sigwait(stop_signals)
    deadline = time.monotonic() + config.shutdown_timeout
    cause = "none: the http server failed" if service.server.failed else signal.Signals(received).name
    log.info("shutting down", extra={"signal": cause, "timeout_s": config.shutdown_timeout})
    stopped = service.stop(deadline)
    lock.release()
    return 0 if stopped and not service.server.failed else 1


# ================================================================================================= cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return run_report(argv[1:])
    if argv and command(argv) == "settings":      # none: serve, without argparse held resident for good
        try:
            print(settings_table(markdown=True), flush=True)
        except BrokenPipeError:                 # `| head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    try:
        config = Config.from_env(dict(os.environ))
    except SettingError as bad:
        print(f"otrace: {bad}", file=sys.stderr)
        return 2
    return serve(config, unknown_settings(os.environ))


def command(argv: list[str]) -> str:
    """The command the arguments name (serve, settings); --help, --version and a wrong one exit here."""
    import argparse  # noqa: PLC0415 - imported where needed (see the imports)
    parser = argparse.ArgumentParser(
        prog="otrace", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Observability sidecar for AI agents: takes LLM traces and error events over HTTP "
                    "and keeps them in SQLite.",
        epilog="settings (environment variables):\n" + settings_table())
    parser.add_argument("--version", action="version", version=f"otrace {__version__}")
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "settings", "report"),
                        help="serve (the default) runs the service; settings prints the settings "
                             "table as Markdown; report answers what the agent did and cost (see "
                             "`otrace report --help`)")
    return parser.parse_args(argv).command


if __name__ == "__main__":
    sys.exit(main())
