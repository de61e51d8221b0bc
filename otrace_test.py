"""otrace's tests: a real otrace subprocess on loopback, real SQLite files, real signals.

Nothing here mocks otrace. Where a test needs to wait, it waits for something otrace says or writes
(a log line, a row, a /health figure), polled with a deadline, never for a fixed time.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import csv
import errno
import fcntl
import functools
import gzip
import hashlib
import http.client
import http.server
import io
import ipaddress
import itertools
import json
import logging
import mmap
import os
import py_compile
import random
import re
import selectors
import shutil
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.parse
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import otrace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "scripts"))
from receiver import Receiver  # noqa: E402 - the one push receiver, shared with scripts/soak.py

OTRACE = HERE / "otrace.py"
# Children run otrace as a module, compiled once here (py_compile writes under PYTHONDONTWRITEBYTECODE
# too): run as a script, each of them would compile the whole file first, most of its start.
py_compile.compile(str(OTRACE), doraise=True)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
START = [sys.executable, "-m", "otrace"]
if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:     # under nohup: the otraces started here would
    signal.signal(signal.SIGHUP, lambda *_: None)         # inherit it ignored, where a handler is reset
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="mounting a small tmpfs needs root")
# tests that read or change what the whole host shows (its OOM kills, zombies, processes like a
# gateway, its cgroup's memory): `make test` runs them one after the other, on one pytest-xdist worker
HOST_WIDE = pytest.mark.xdist_group("host")


# ------------------------------------------------------------------------------------------ harness


def task_state(task: Path) -> str | None:
    """The state letter of a thread (/proc/<pid>/task/<tid>); None once it is gone."""
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


class Otrace:
    """A real otrace process with its own database, on a port it picked itself."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, db: Path | None = None,
                 command: list[str] | None = None) -> None:
        self.command = command or START
        self.db_path = db or tmp / "otrace.db"
        self.env = {"TRACE_PORT": "0", "TRACE_OTLP_PORT": "0", "TRACE_DB_PATH": str(self.db_path),
                    "TRACE_BATCH_WINDOW": "20ms", "TRACE_LOG_LEVEL": "info", "TRACE_METRICS_INTERVAL": "off",
                    "TRACE_PROC_INTERVAL": "off", "TRACE_DNS_PROBE": "", "TRACE_ZOMBIE_ALERT": "0",
                    "TRACE_GATEWAY_MATCH": "off", "TRACE_QUIET_POLL": "10ms",   # polls counted by tests
                    "TRACE_OPENCLAW_STATE_DIR": "off", **(env or {})}
        self.lines: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self.changed = threading.Condition()
        self.proc: subprocess.Popen | None = None
        self.readers: list[threading.Thread] = []
        self.port = 0

    def start(self, wait: bool = True) -> Otrace:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")} | self.env
        self.proc = subprocess.Popen(self.command, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.readers = [threading.Thread(target=self._read, args=(stream, is_stdout), daemon=True)
                        for stream, is_stdout in ((self.proc.stdout, True), (self.proc.stderr, False))]
        for reader in self.readers:
            reader.start()
        if wait:                                   # a start on a busy machine can take seconds
            line = self.wait_log(lambda e: e.get("message") == "listening", timeout=30.0)
            self.port = int(line["address"].rsplit(":", 1)[1])
        return self

    def _read(self, stream: Any, is_stdout: bool) -> None:
        for raw in stream:
            with self.changed:
                if is_stdout:
                    try:
                        self.lines.append(json.loads(raw))
                    except ValueError:
                        self.lines.append({"message": "<not json>", "raw": raw})
                else:
                    self.stderr.append(raw)
                self.changed.notify_all()

    def wait_log(self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """Wait for a log line matching `match` and return it."""
        with self.changed:
            found = self.changed.wait_for(lambda: next((e for e in self.lines if match(e)), None), timeout)
        if not found:
            raise AssertionError(f"no such log line; got {self.lines[-10:]} stderr={self.stderr[-10:]}")
        return found

    def logs(self, message: str) -> list[dict[str, Any]]:
        with self.changed:
            return [e for e in self.lines if e.get("message") == message]

    # -- HTTP
    def request(self, method: str, path: str, body: bytes | str | Any = None, *,
                headers: dict[str, str] | None = None, conn: http.client.HTTPConnection | None = None,
                timeout: float = 10.0) -> Response:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        hdrs |= headers or {}
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            if own:
                conn.close()

    def post(self, path: str, body: Any, **kw: Any) -> Response:
        return self.request("POST", path, body, **kw)

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health").json

    def wait_persisted(self, n: int, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until the writer has committed n events (new or duplicate)."""
        return wait_until(lambda: (h := self.health())["events_persisted"] + h["events_duplicate"] >= n
                          and h, timeout, f"{n} events persisted")

    # -- database and process
    def query(self, sql: str, *params: Any) -> list[tuple]:
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=10)) as conn:
            return conn.execute(sql, params).fetchall()

    def rows(self, table: str) -> list[dict[str, Any]]:
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=10)) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY id")]

    def signal(self, sig: int) -> None:
        """Send `sig`; a SIGSTOP returns once every thread has stopped (each stops as it next leaves
        the kernel, which on a busy machine can be after kill() has returned)."""
        assert self.proc
        self.proc.send_signal(sig)
        if sig == signal.SIGSTOP:
            tasks = Path(f"/proc/{self.proc.pid}/task")
            wait_until(lambda: all(task_state(t) in ("T", "t", None) for t in tasks.iterdir()),
                       what="every thread to stop")

    def exited(self, timeout: float = 10.0) -> int:
        """Wait for the exit code, then for the last of its output: the process can be reaped before
        the threads reading its pipes have taken its last lines ("stopped")."""
        assert self.proc
        code = self.proc.wait(timeout)
        for reader in self.readers:
            reader.join(timeout)
        return code

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait for the exit code (and the last of the log)."""
        assert self.proc
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.exited(timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., Otrace]]:
    """Start otrace processes for a test; every one is stopped afterwards."""
    started: list[Otrace] = []

    def start(env: dict[str, str] | None = None, wait: bool = True, **kw: Any) -> Otrace:
        node = Otrace(tmp_path, env, **kw).start(wait=wait)
        started.append(node)
        return node

    yield start
    for node in started:
        node.kill()


@pytest.fixture
def svc(run: Callable[..., Otrace]) -> Otrace:
    return run()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A really small filesystem, unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Fill the filesystem holding `path` until a write fails; the filler file is returned."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 16, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


TRACE = {"provider": "anthropic", "model": "claude-sonnet-4", "prompt_tokens": 10, "completion_tokens": 5}


def trace(**fields: Any) -> dict[str, Any]:
    return {**TRACE, "trace_id": str(uuid.uuid4()), **fields}


def request_head(length: int | str, path: str = "/v1/traces") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def read_to_end(sock: socket.socket) -> bytes:
    """All a peer sends until it hangs up (a reset counts as hanging up); a timeout fails the test."""
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    return answer


def answer_of(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def begun(sock: socket.socket) -> None:
    """Send the start of a request, and wait until otrace's side has it (nothing left unacknowledged):
    the connection is then busy to otrace, not idle."""
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    wait_until(lambda: struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)))[0] == 0,
               what="the request's start received")


def readable(sock: socket.socket, timeout: float) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(timeout))


# ------------------------------------------------------------------------------------------- config


def test_help_lists_every_setting_with_default() -> None:
    out = subprocess.run([sys.executable, str(OTRACE), "--help"], capture_output=True, text=True, check=True)
    for spec in otrace.dataclasses.fields(otrace.Config):
        name = otrace.env_name(spec)
        assert name in out.stdout
        assert f"{name} (default: {spec.metadata['default'] or 'empty'})" in out.stdout


OLDER_PYTHONS = sorted(Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")).glob("versions/3.10*/bin/python3"))


@pytest.mark.skipif(not OLDER_PYTHONS, reason="needs a Python 3.10 (pyenv's)")
def test_an_older_python_is_told_what_otrace_needs() -> None:
    out = subprocess.run([str(OLDER_PYTHONS[0]), "-I", str(OTRACE)], capture_output=True, text=True,
                         timeout=60, check=False)
    version = OLDER_PYTHONS[0].parent.parent.name
    assert (out.returncode, out.stderr) == (1, f"otrace: needs Python 3.11 or newer, not {version}\n")


def test_version() -> None:
    out = subprocess.run([sys.executable, str(OTRACE), "--version"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == f"otrace {otrace.__version__}"


@pytest.mark.parametrize(("name", "value", "accepts"), [
    ("TRACE_PORT", "abc", "an integer from 0 to 65535"),
    ("TRACE_PORT", "70000", "an integer from 0 to 65535"),
    ("TRACE_QUEUE_SIZE", "\u0661\u0660\u0660", "an integer from 1 to"),     # Arabic-Indic digits: not ASCII
    ("TRACE_BATCH_WINDOW", "-5ms", "a duration"),
    ("TRACE_SHUTDOWN_TIMEOUT", "4", "a duration"),
    ("TRACE_RETENTION", "1M", "(units are lower case)"),   # a month to its writer, a minute if lower-cased
    ("TRACE_LOG_LEVEL", "loud", "one of debug, info, warning, error"),
    ("TRACE_MAX_BODY_BYTES", "lots", "a size from 1KiB to 256MiB"),
    ("TRACE_INGEST_TOKEN", "has space", "printable ASCII"),
    # values that parse but overflow a thread's arithmetic, or spin a loop: bounded
    ("TRACE_BATCH_WINDOW", "106752d", "a duration from 1ms to 10s"),
    ("TRACE_CLEANUP_INTERVAL", "200000d", "a duration from 10ms to 1d"),
    ("TRACE_SHUTDOWN_TIMEOUT", "200000d", "a duration from 500ms to 10m"),
    ("TRACE_DISK_RESERVE_BYTES", "99999999999999GiB", "a size from 64KiB to 4GiB"),
    ("TRACE_DB_MAX_BYTES", "512KiB", "a size from 1MiB to 16TiB"),       # an empty database is 224 KiB
    ("TRACE_METRICS_INTERVAL", "1ms", "a duration from 100ms to 1d"),
    ("TRACE_PUSH_TIMEOUT", "9" * 400 + "s", "a duration from 100ms to 10m"),
    ("TRACE_PUSH_HEADERS", "x-api-key", "key=value pairs"),
    ("TRACE_PUSH_ENDPOINT", "http://a b/", "an http:// or https:// URL"),      # no such host name
    ("TRACE_PUSH_ENDPOINT", "http://h:0/", "an http:// or https:// URL"),      # no such port
    ("TRACE_AGENT_ID", "agent-\udcff", "any UTF-8 text"),     # byte 0xff: no push could name it
])
def test_bad_setting_exits_2_naming_it(tmp_path: Path, name: str, value: str, accepts: str) -> None:
    env = {**os.environ, "TRACE_DB_PATH": str(tmp_path / "x.db"), name: value}
    out = subprocess.run(START, env=env, capture_output=True, text=True, timeout=10, check=False)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert name in lines[0] and accepts in lines[0]
    assert not (tmp_path / "x.db").exists()  # it stopped before touching anything


@pytest.mark.skipif(not ROOT, reason="looking as another user needs root to become one")
def test_a_disk_path_otrace_may_not_look_at_exits_2_saying_so_not_that_it_is_missing() -> None:
    """TRACE_DISK_PATH below a directory otrace's user may not enter: exit 2 naming why it cannot be
    looked at (it was said not to exist, which sends an operator looking for a typo)."""
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="otrace-disk-"))     # outside pytest's 0700 directory
    try:
        folder.chmod(0o777)                                     # the database's directory: writable
        (closed := folder / "closed").mkdir(mode=0o000)
        (disk := closed / "data").mkdir()
        env = {**os.environ, "TRACE_DB_PATH": str(folder / "otrace.db"), "TRACE_DISK_PATH": str(disk)}
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *START],
                             env=env, capture_output=True, text=True, timeout=10, check=False)
        assert (out.returncode, out.stdout) == (2, "")
        assert out.stderr.splitlines() == [
            f"otrace: TRACE_DISK_PATH='{disk}' is not valid: expected empty, or a path that exists ({disk} "
            "cannot be looked at: Permission denied)"]
        assert not (folder / "otrace.db").exists()              # it stopped before touching anything
    finally:
        shutil.rmtree(folder)


def test_durations_and_sizes_parse() -> None:
    config = otrace.Config.from_env({"TRACE_BATCH_WINDOW": "250ms", "TRACE_SHUTDOWN_TIMEOUT": "1m",
                                     "TRACE_MAX_BODY_BYTES": "2MiB", "TRACE_MAX_TEXT_BYTES": "100"})
    assert config.batch_window == 0.25
    assert config.shutdown_timeout == 60
    assert config.max_body_bytes == 2 * 1024 * 1024
    assert config.max_text_bytes == 100
    assert otrace.Config().port == 9090 and otrace.Config().host == "127.0.0.1"


def test_settings_name_what_they_accept_and_keep_secrets() -> None:
    assert otrace.Config.from_env({"TRACE_DISK_RESERVE_BYTES": "0"}).disk_reserve_bytes == 0
    assert otrace.Config.from_env({"TRACE_PUSH_HEADERS": "x-api-key=a%2Cb, tenant=t1"}).push_headers == (
        ("x-api-key", "a,b"), ("tenant", "t1"))
    for bad in ("content-type=x", "x=\u00e9", "no-equals"):
        with pytest.raises(otrace.SettingError, match="TRACE_PUSH_HEADERS=\\*\\*\\*"):
            otrace.Config.from_env({"TRACE_PUSH_HEADERS": bad})
    with pytest.raises(otrace.SettingError, match="keep one"):
        otrace.Config.from_env({"TRACE_PUSH_ENDPOINT": "https://u:p@h/x", "TRACE_PUSH_TOKEN": "t"})
    with pytest.raises(otrace.SettingError, match=r"TRACE_PUSH_HEADERS holds Authorization, .* keep one"):
        otrace.Config.from_env({"TRACE_PUSH_HEADERS": "Authorization=Basic%20YQ", "TRACE_PUSH_TOKEN": "t"})
    with pytest.raises(otrace.SettingError, match=r"TRACE_PUSH_HEADERS holds Authorization, and so does "
                                                  r"TRACE_PUSH_ENDPOINT's user:password@: .* keep one"):
        otrace.Config.from_env({"TRACE_PUSH_HEADERS": "Authorization=Bearer%20t", "TRACE_PUSH_ENDPOINT":
                                "https://u:p@h/x"})             # one would silently replace the other
    with pytest.raises(otrace.SettingError, match="content-type is set by otrace itself"):
        otrace.Config.from_env({"TRACE_PUSH_HEADERS": "content-type=x"})
    for typo in ("0", "-1", "1.5", "0x10", "127.1", "\uff11\uff10", "no-such-host.invalid",   # not 0.0.0.0
                 "127.0.0.1%lo", "::1%nosuchif", "fe80::1%"):
        with pytest.raises(otrace.SettingError, match=r"TRACE_HOST=.* is not valid: expected an IP address"):
            otrace.Config.from_env({"TRACE_HOST": typo})
    hosts = ("localhost", "::", "[::1]", "10.0.0.1", "fe80::1%lo")
    assert [otrace.Config.from_env({"TRACE_HOST": host}).host for host in hosts] == [
        "localhost", "::", "::1", "10.0.0.1", "fe80::1%lo"]
    assert otrace.redact_url("https://u:p@h:8443/in?key=s3&x=1") == "https://h:8443/in?key=***&x=***"
    assert otrace.redact_url("https://h/in?key=s3&bare-token#frag-token") == "https://h/in?key=***&***"
    for name, value in (("TRACE_PROCFS", "/nonexistent"), ("TRACE_SYSFS", "/nonexistent"),
                        ("TRACE_OPENCLAW_STATE_DIR", "/etc/hostname")):
        with pytest.raises(otrace.SettingError, match=f"{name}='{value}' is not valid: expected .* directory "
                                                      f"\\({value} is not a directory\\)"):
            otrace.Config.from_env({name: value})
    assert otrace.Config.from_env({"TRACE_OPENCLAW_STATE_DIR": "/not/yet"}).openclaw_state_dir == "/not/yet"
    missing = r"TRACE_DISK_PATH='/no/such/disk' is not valid: expected empty, or a path that exists \(/no/su"
    with pytest.raises(otrace.SettingError, match=missing + r"ch/disk does not exist\)"):
        otrace.Config.from_env({"TRACE_DISK_PATH": "/no/such/disk"})    # else its columns stay empty, unsaid
    assert otrace.Config.from_env({"TRACE_DISK_PATH": "/etc/hostname"}).disk_path == "/etc/hostname"
    for bad, shown in (("https://u:Sup3rS3cret@h.example:99999/v1?api_key=Sup3rS3cret",
                        "'https://h.example:99999/v1?api_key=***'"),
                       ("http://[::1/x?key=Sup3rS3cret", "***"),
                       ("u:Sup3rS3cret@h:8080/x", "'***@h:8080/x'"),               # no scheme: no netloc
                       ("http:/u:Sup3rS3cret@h/x", "'***@h/x'"),
                       ("https://u:Sup3r#S3cret@h/x", "'https://h/x'"),            # a # / ? in the password
                       ("https://u:Sup3r/S3cret@h:0/x", "'https://h:0/x'"),
                       ("http://h:99999/x?Sup3rS3cret#Sup3rS3cret", "'http://h:99999/x?***'")):
        with pytest.raises(otrace.SettingError) as refused:
            otrace.Config.from_env({"TRACE_PUSH_ENDPOINT": bad})
        assert str(refused.value).startswith(f"TRACE_PUSH_ENDPOINT={shown} is not valid")
        assert "Sup3rS3cret" not in str(refused.value)
    assert otrace.unknown_settings({"TRACE_PORTT": "1", "TRACE_port": "1", "TRACE_PORT": "2", "HOME": "/"}
                                   ) == [
        "TRACE_PORTT is not a setting otrace knows; did you mean TRACE_PORT?",
        "TRACE_port is not a setting otrace knows; did you mean TRACE_PORT?"]


def test_settings_doc_is_generated_from_config() -> None:
    doc = (HERE / "docs" / "settings.md").read_text()
    begin, end = "<!-- settings:begin -->\n", "\n<!-- settings:end -->"
    assert doc[doc.index(begin) + len(begin):doc.index(end)] == otrace.settings_table(markdown=True)


def test_the_settings_table_into_a_reader_that_stopped_early_is_no_error() -> None:
    """`otrace settings | head -3`: the reader gone (here before otrace writes at all), otrace says
    nothing of it (it printed a BrokenPipeError traceback)."""
    read, write = os.pipe()
    os.close(read)
    try:
        out = subprocess.run([*START, "settings"], stdout=write, stderr=subprocess.PIPE, text=True,
                             timeout=30, cwd=HERE, check=False)
    finally:
        os.close(write)
    assert (out.returncode, out.stderr) == (0, "")


def test_a_misspelled_setting_is_warned_about_with_the_closest_name(run: Callable[..., Otrace]) -> None:
    node = run({"TRACE_INGEST_TOKNE": "s3cret", "TRACE_WHATEVER": "1"})
    warnings = [line["message"] for line in node.lines if line["level"] == "WARNING"]
    assert "TRACE_INGEST_TOKNE is not a setting otrace knows; did you mean TRACE_INGEST_TOKEN?" in warnings
    assert "TRACE_WHATEVER is not a setting otrace knows" in warnings
    assert "s3cret" not in json.dumps(node.lines)


def test_a_loops_file_fault_is_one_line_without_a_traceback(tmp_path: Path, run: Callable[..., Otrace]
                                                           ) -> None:
    """A state directory whose agents/ is a file: the store's loop fails on it, says so, and lives."""
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "agents").write_text("not a directory")
    node = run({"TRACE_OPENCLAW_STATE_DIR": str(tmp_path / "state")})
    failing = node.wait_log(lambda e: e.get("message") == "sessions failing")
    assert failing["error"].startswith("NotADirectoryError")
    assert not [line for line in node.lines if "exc_info" in line]
    health = node.request("GET", "/health")                # serving; degraded: the store's calls are not kept
    assert health.status == 503 and "session store cannot be read" in health.json["problems"][0]
    assert "sessions" in health.json["loops_failing"]


def test_startup_log_is_json_with_masked_token(run: Callable[..., Otrace]) -> None:
    node = run({"TRACE_INGEST_TOKEN": "s3cret-token"})
    starting = node.logs("starting")[0]
    assert starting["version"] == otrace.__version__
    assert starting["settings"]["ingest_token"] == "***"
    assert starting["settings"]["db_path"] == str(node.db_path)
    listening = node.logs("listening")[0]
    assert listening["address"] == f"http://127.0.0.1:{node.port}"
    for line in node.lines:
        assert {"time", "level", "logger", "message"} <= line.keys()
    assert not any("s3cret-token" in json.dumps(line) for line in node.lines)
    assert node.stderr == []


# ---------------------------------------------------------------------------------------------- kit


def test_backoff_is_full_jitter_and_capped() -> None:
    ceilings = []
    backoff = otrace.Backoff(0.1, 2.0, rng=lambda: 1.0)
    for _ in range(8):
        ceilings.append(backoff.next())
    assert ceilings == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    assert otrace.Backoff(0.1, 2.0, rng=lambda: 0.0).next() == 0.0
    backoff.reset()
    assert backoff.next() == 0.1


def test_transaction_commits_or_rolls_back_whole(tmp_path: Path) -> None:
    with contextlib.closing(otrace.connect(str(tmp_path / "t.db"))) as conn:
        conn.execute("CREATE TABLE t (x UNIQUE)")
        with otrace.transaction(conn):
            conn.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(sqlite3.IntegrityError), otrace.transaction(conn):
            conn.execute("INSERT INTO t VALUES (2)")
            conn.execute("INSERT INTO t VALUES (1)")
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
        assert not conn.in_transaction


def test_environment_faults_are_told_from_bad_rows(tmp_path: Path) -> None:
    with contextlib.closing(otrace.connect(str(tmp_path / "t.db"))) as conn:
        conn.execute("CREATE TABLE t (x NOT NULL)")
        with pytest.raises(sqlite3.IntegrityError) as bad_row:
            conn.execute("INSERT INTO t VALUES (NULL)")
    assert not otrace.is_environment(bad_row.value)
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorname = "SQLITE_FULL"                  # as SQLite names it on a full disk
    assert otrace.is_environment(full) and otrace.sqlite_code(full) == "SQLITE_FULL"
    assert otrace.is_environment(OSError(errno.ENOSPC, "no space"))
    assert not otrace.is_environment(OSError(errno.EACCES, "denied"))


def test_compact_json_cuts_whole_and_refuses_what_json_cannot_carry() -> None:
    assert otrace.compact_json({"a": [1, "é"]}, 100) == ('{"a":[1,"é"]}', False)
    marker, cut = otrace.compact_json({"a": "x" * 200}, 100)
    assert cut and json.loads(marker) == {"_otrace_truncated": True, "original_bytes": 208}
    with pytest.raises(ValueError):
        otrace.compact_json({"x": float("inf")}, 100)


def test_an_inode_past_sqlites_signed_range_is_stored_and_read_back_as_itself() -> None:
    """An inode with its top bit set (NFS, overlayfs) would make SQLite refuse the statement that keeps
    the log's offset or the agent database's inode: each is stored as int64 and read back % 2**64."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE kept (value INTEGER)")
    inodes = [0, 12, 2**63 - 1, 2**63, 2**64 - 1]
    with pytest.raises(OverflowError):
        conn.execute("INSERT INTO kept VALUES (?)", (2**63,))
    conn.executemany("INSERT INTO kept VALUES (?)", [(otrace.int64(n),) for n in inodes])
    assert [value % 2**64 for (value,) in conn.execute("SELECT value FROM kept ORDER BY rowid")] == inodes


def test_a_refusal_kept_for_its_answer_holds_no_frame_of_the_request() -> None:
    """A refusal made on the OTLP thread waits in its Future for the HTTP thread: kept with its
    traceback, the frames in it (the request's body, message and rows) sat in a cycle through the
    frame that set it, freed only by the cyclic GC, which a flood of 503s outran."""
    import gc
    import weakref
    from concurrent.futures import Future

    class Body:
        """Stands for a request's body: what a weak reference can watch."""

    held: list[weakref.ref] = []

    def full() -> None:
        body = Body()
        held.append(weakref.ref(body))
        raise otrace.Refusal(503, "the queue is full")

    def unparsable() -> None:                 # `from None` hides the error it came from, still kept
        body = Body()
        held.append(weakref.ref(body))
        try:
            json.loads("{")
        except ValueError:
            raise otrace.Invalid("body is not valid JSON") from None

    gc.disable()
    try:
        for make in (full, unparsable):
            future: Future = Future()
            otrace.fulfil(future, make)
            assert isinstance(future.exception(), otrace.Refusal)
            del future
            assert held[-1]() is None, make           # freed by its count, with no collection
    finally:
        gc.enable()


def test_fault_log_says_a_repeating_failure_once() -> None:
    logger = logging.getLogger("otrace.test.faults")
    records: list[logging.LogRecord] = []
    seen: list[str | None] = []                            # what /health would say as each line is written
    handler = logging.Handler()
    handler.emit = lambda record: (records.append(record), seen.append(fault.error))  # type: ignore
    logger.addHandler(handler)
    fault = otrace.FaultLog(logger, "thing")
    for _ in range(5):
        fault.failed("EIO")
    fault.failed("ENOSPC")
    fault.cleared()
    fault.cleared()
    assert [r.getMessage() for r in records] == ["thing failing", "thing failing", "thing recovered"]
    assert records[-1].failed_attempts == 6
    assert seen == ["EIO", "ENOSPC", None]     # a reader of the line who asks /health finds it agreeing


def test_stamps_see_every_change_and_trust_only_stamps_older_than_their_look(tmp_path: Path) -> None:
    """A look that found nothing holds while every watched file stays as it was; an append, a missing
    file that appears, a change of metadata or of what is watched each mean a whole look again. Stamps
    as young as their look are not trusted: a same-size rewrite in the same timestamp step would leave
    them as they were."""
    log, later = tmp_path / "a.log", tmp_path / "b.log"
    log.write_bytes(b"one\n")
    watched = (str(tmp_path), str(log), str(later))
    stamps = otrace.Stamps(margin_ns=0)                # files written just now are trusted here

    def look(files: tuple[str | int, ...] = watched) -> bool:
        """A quiet reader's turn: True for the stat calls alone, False for a whole look (finding nothing)."""
        if stamps.unchanged(files):
            return True
        stamps.keep()
        return False

    assert [look(), look(), look()] == [False, True, True]
    append(log, b"two\n")
    assert [look(), look()] == [False, True]
    later.write_bytes(b"")                              # a missing file appears
    assert [look(), look()] == [False, True]
    with open(log, "rb") as f:                          # a descriptor: the open file
        assert [look((f.fileno(),)), look((f.fileno(),))] == [False, True]
        append(log, b"three\n")
        assert look((f.fileno(),)) is False
    log.chmod(0o400)                                    # metadata only: the change time moves
    assert [look(), look()] == [False, True]
    append(log, b"five\n")
    assert not stamps.unchanged(watched)                # a look that finds it keeps nothing:
    assert not stamps.unchanged(watched)                # the next one is whole too
    assert [look(()), look(())] == [False, False]       # nothing watched: always a whole look

    young = otrace.Stamps()
    log.write_bytes(b"four\n")                         # a same-size rewrite, just now
    assert not young.unchanged(watched)
    young.keep()
    assert not young.unchanged(watched)                 # unchanged, but too young to tell: a whole look
    written = log.stat().st_mtime_ns
    os.utime(log, ns=(written - 10**10, written - 10**10))
    young.keep()
    assert not young.unchanged(watched)                 # an old mtime, but the change time is now
    library = (os.__file__,)                            # written long before this test
    assert not young.unchanged(library)
    young.keep()
    assert young.unchanged(library)


def test_cut_utf8_never_splits_a_character() -> None:
    for limit in range(12):
        text, size, cut = otrace.cut_utf8("añ日🙂b", limit)
        assert len(text.encode()) <= limit and "añ日🙂b".startswith(text)
        assert size == 11 and cut == (limit < 11)


# -------------------------------------------------------------------------------------------- model


def test_parse_events_is_all_or_nothing_in_process() -> None:
    rows, ignored = otrace.parse_events(json.dumps([trace(extra=1), trace()]).encode(), "/v1/traces", 10, 100)
    assert [r.table for r in rows] == ["llm_traces", "llm_traces"] and ignored == ["extra"]
    assert len(rows[0].values) == len(otrace.TRACES.columns)
    with pytest.raises(otrace.Invalid) as bad:
        otrace.parse_events(json.dumps([trace(), trace(cost_usd=-1)]).encode(), "/v1/traces", 10, 100)
    assert (bad.value.status, bad.value.field, bad.value.index) == (400, "cost_usd", 1)
    with pytest.raises(otrace.Invalid) as many:
        otrace.parse_events(json.dumps([trace()] * 11).encode(), "/v1/traces", 10, 100)
    assert many.value.status == 413
    whole, _ = otrace.parse_events(json.dumps(trace(latency_ms=10**15)).encode(), "/v1/traces", 10, 100)
    assert dict(zip(otrace.TRACES.columns, whole[0].values, strict=True))["latency_ms"] == 10**15   # 2^53-1
    with pytest.raises(otrace.Invalid, match="from 0 to 9007199254740991"):
        otrace.parse_events(json.dumps(trace(latency_ms=2**53)).encode(), "/v1/traces", 10, 100)


def test_a_total_of_tokens_past_what_a_client_may_send_is_not_made_in_process() -> None:
    """Two counts at the limit sum past it: the counts are kept, the total left out, not stored past
    the bound every client's total_tokens is held to."""
    most = otrace.MAX_INT
    rows, _ = otrace.parse_events(json.dumps(trace(prompt_tokens=most, completion_tokens=most)).encode(),
                                  "/v1/traces", 1, 100)
    row = dict(zip(otrace.TRACES.columns, rows[0].values, strict=False))
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (most, most, None)
    rows, _ = otrace.parse_events(json.dumps(trace(prompt_tokens=most - 1, completion_tokens=1)).encode(),
                                  "/v1/traces", 1, 100)
    assert dict(zip(otrace.TRACES.columns, rows[0].values, strict=False))["total_tokens"] == most


def test_names_in_any_script_are_printable_and_controls_are_not_in_process() -> None:
    """A joiner (emoji sequences, Persian), a soft hyphen or a no-break space is part of a name;
    a control character or a line break is not, and a blank name is said to be blank."""
    names = ["deploy \U0001f469\u200d\U0001f4bb", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
             "a\u00a0b", "soft\u00adhyphen"]
    body = [{"name": name, "trace_id": f"run\u00a0{i}"} for i, name in enumerate(names)]
    rows, _ = otrace.parse_events(json.dumps(body).encode(), "/v1/events", 10, 100)
    stored = [dict(zip(otrace.CUSTOM.columns, row.values, strict=False)) for row in rows]
    assert [(r["name"], r["trace_id"]) for r in stored] == [(n, f"run\u00a0{i}") for i, n in enumerate(names)]
    for name in ("two\nlines", "esc\x1b[31m", "c1\x85", "line\u2028break", "del\x7f"):
        with pytest.raises(otrace.Invalid, match="printable characters") as bad:
            otrace.parse_events(json.dumps({"name": name}).encode(), "/v1/events", 10, 100)
        assert bad.value.field == "name"
    with pytest.raises(otrace.Invalid, match="name must not be empty or blank"):
        otrace.parse_events(json.dumps({"name": " "}).encode(), "/v1/events", 10, 100)
    with pytest.raises(otrace.Invalid, match="trace_id must be 1 to 128 printable"):
        otrace.parse_events(json.dumps({"name": "n", "trace_id": "a\tb"}).encode(), "/v1/events", 10, 100)


def test_trace_is_stored_with_every_field(svc: Otrace) -> None:
    event = {
        "provider": "openai", "model": "gpt-5", "input_text": "What is 2+2?", "output_text": "4",
        "prompt_tokens": 12, "completion_tokens": 1, "cache_read_tokens": 3, "cache_write_tokens": 4,
        "reasoning_tokens": 5, "cost_usd": 0.00042, "latency_ms": 812.5, "ttft_ms": 120,
        "status": "error", "error_type": "rate_limit", "finish_reason": "stop", "session_id": "sess-1",
        "trace_id": "trace-abc", "created_at": "2026-03-01T12:00:00.250Z", "metadata": {"run": 7},
    }
    resp = svc.post("/v1/traces", event)
    assert resp.status == 202
    assert resp.json == {"accepted": 1, "trace_ids": ["trace-abc"]}
    svc.wait_persisted(1)
    row = svc.rows("llm_traces")[0]
    for key in ("provider", "model", "input_text", "output_text", "prompt_tokens", "completion_tokens",
                "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "cost_usd", "latency_ms",
                "ttft_ms", "status", "error_type", "finish_reason", "session_id", "trace_id"):
        assert row[key] == event[key], key
    assert row["total_tokens"] == 13                       # computed: 12 + 1
    assert row["created_at"] == 1772366400250              # 2026-03-01T12:00:00.250Z in Unix ms
    assert abs(row["received_at"] - time.time() * 1000) < 60_000
    assert json.loads(row["metadata"]) == {"run": 7}
    assert row["source"] == "http" and row["truncated"] == 0 and row["synced"] == 0
    assert row["input_bytes"] == 12 and row["output_bytes"] == 1


def test_defaults_and_optional_fields(svc: Otrace) -> None:
    resp = svc.post("/v1/traces", {"provider": "p", "model": "m", "created_at": 1700000000123,
                                   "metadata": '{"from": "a string"}', "total_tokens": 9})
    assert resp.status == 202
    generated = resp.json["trace_ids"][0]
    assert uuid.UUID(generated).version == 7
    svc.wait_persisted(1)
    row = svc.rows("llm_traces")[0]
    assert row["trace_id"] == generated
    assert 0 <= (uuid.UUID(generated).int >> 80) - row["received_at"] < 60_000   # its Unix ms come first
    assert row["status"] == "ok"
    assert row["created_at"] == 1700000000123
    assert row["total_tokens"] == 9 and row["prompt_tokens"] is None
    assert json.loads(row["metadata"]) == {"from": "a string"}


def test_error_event_is_stored_with_defaults(svc: Otrace) -> None:
    resp = svc.post("/v1/errors", [
        {"error_type": "llm_error", "category": "rate_limit", "message": "429 from provider",
         "severity": "warning", "provider": "openai", "model": "gpt-5", "session_id": "s",
         "stack_trace": "at call()", "metadata": {"status": 429}},
        {"error_type": "crash", "message": "agent exited"},
    ])
    assert resp.status == 202 and resp.json["accepted"] == 2
    svc.wait_persisted(2)
    first, second = svc.rows("error_events")
    assert (first["error_type"], first["category"], first["severity"]) == \
        ("llm_error", "rate_limit", "warning")
    assert first["stack_trace"] == "at call()" and json.loads(first["metadata"]) == {"status": 429}
    assert first["message_bytes"] == len("429 from provider")
    assert (second["category"], second["severity"]) == ("other", "error")
    assert second["provider"] is None


@pytest.mark.parametrize(("event", "field"), [
    ({"model": "m"}, "provider"),
    ({"provider": "p"}, "model"),
    ({"provider": "", "model": "m"}, "provider"),
    ({"provider": "p", "model": 5}, "model"),
    ({**TRACE, "prompt_tokens": True}, "prompt_tokens"),
    ({**TRACE, "prompt_tokens": -1}, "prompt_tokens"),
    ({**TRACE, "prompt_tokens": 1.5}, "prompt_tokens"),
    ({**TRACE, "completion_tokens": 2**63}, "completion_tokens"),
    ({**TRACE, "prompt_tokens": 999, "cache_read_tokens": 900, "cache_write_tokens": 100}, "prompt_tokens"),
    ({**TRACE, "cost_usd": -0.01}, "cost_usd"),
    ({**TRACE, "cost_usd": "1"}, "cost_usd"),
    ('{"provider": "p", "model": "m", "cost_usd": 1e400}', "cost_usd"),   # parses as infinity
    ({**TRACE, "latency_ms": False}, "latency_ms"),
    ({**TRACE, "status": "fine"}, "status"),
    ({**TRACE, "input_text": 42}, "input_text"),
    ({**TRACE, "trace_id": ""}, "trace_id"),
    ({**TRACE, "trace_id": "x" * 129}, "trace_id"),
    ({**TRACE, "created_at": "yesterday"}, "created_at"),
    ({**TRACE, "created_at": "2026-03-01T12:00:00"}, "created_at"),
    ({**TRACE, "created_at": -5}, "created_at"),
    ({**TRACE, "created_at": 1796169600}, "created_at"),     # Unix seconds: stored, 1970 and no report
    ({**TRACE, "metadata": [1, 2]}, "metadata"),
    ({**TRACE, "metadata": "not json"}, "metadata"),
    ({**TRACE, "model": "m" * 300}, "model"),
])
def test_bad_trace_field_is_named(svc: Otrace, event: dict[str, Any] | str, field: str) -> None:
    resp = svc.post("/v1/traces", event)
    assert resp.status == 400, resp
    assert resp.json["field"] == field
    assert "index" not in resp.json


@pytest.mark.parametrize(("event", "field"), [
    ({"message": "m"}, "error_type"),
    ({"error_type": "oops", "message": "m"}, "error_type"),
    ({"error_type": "crash"}, "message"),
    ({"error_type": "crash", "message": "  "}, "message"),
    ({"error_type": "crash", "message": "m", "category": "gremlins"}, "category"),
    ({"error_type": "crash", "message": "m", "severity": "meh"}, "severity"),
])
def test_bad_error_field_is_named(svc: Otrace, event: dict[str, Any], field: str) -> None:
    resp = svc.post("/v1/errors", event)
    assert resp.status == 400, resp
    assert resp.json["field"] == field


def test_array_is_all_or_nothing_with_index(svc: Otrace) -> None:
    resp = svc.post("/v1/traces", [trace(), trace(), {"provider": "p"}, trace()])
    assert resp.status == 400
    assert resp.json == {"error": "model is required", "field": "model", "index": 2}
    good = svc.post("/v1/traces", [trace(), trace()])
    assert good.status == 202 and good.json["accepted"] == 2
    svc.wait_persisted(2)
    assert len(svc.rows("llm_traces")) == 2      # nothing of the refused array
    health = svc.health()
    assert health["events_rejected"] == 1 and health["events_received"] == 2
    assert svc.post("/v1/trace", trace()).status == 404                         # refused before its body:
    assert svc.post("/v1/traces", "x", headers={"Content-Type": "text/plain"}).status == 415   # counted
    with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as big:                 # too
        big.sendall(request_head(2 << 20))                  # a body over TRACE_MAX_BODY_BYTES, unsent
        assert read_to_end(big).startswith(b"HTTP/1.1 413 ")
    assert svc.health()["events_rejected"] == 4


@pytest.mark.parametrize("written", ["2026-11-30T12:00:00Z", "2026-11-30t12:00:00z",
                                     "2026-11-30T13:00:00+01:00", "2026-11-30 12:00:00.000+00:00"])
def test_created_at_reads_rfc_3339_in_each_of_its_forms(written: str) -> None:
    rows, _ = otrace.parse_events(json.dumps({**TRACE, "created_at": written}).encode(), "/v1/traces", 1, 100)
    assert rows[0].values[1] == 1796040000000              # 2026-11-30T12:00:00Z


@pytest.mark.parametrize("written", ["2026-11-30T11:59:59.9999Z", "2026-11-30T11:59:59.999999+00:00",
                                     "2026-11-30T12:59:59.999999+01:00", 1796039999999.7])
def test_created_at_below_a_millisecond_is_cut_off_in_each_form(written: str | float) -> None:
    """As a number's fraction is: rounded up, the last instant of a day was counted on the next."""
    rows, _ = otrace.parse_events(json.dumps({**TRACE, "created_at": written}).encode(), "/v1/traces", 1, 100)
    assert rows[0].values[1] == 1796039999999              # 2026-11-30T11:59:59.999Z


def test_unknown_fields_are_listed_back_and_not_stored(svc: Otrace) -> None:
    resp = svc.post("/v1/traces", [trace(colour="blue"), trace(synced=1, id=5)])
    assert resp.status == 202
    assert resp.json["ignored_fields"] == ["colour", "id", "synced"]
    svc.wait_persisted(2)
    assert [r["synced"] for r in svc.rows("llm_traces")] == [0, 0]


def test_texts_are_cut_on_a_character_boundary(run: Callable[..., Otrace]) -> None:
    node = run({"TRACE_MAX_TEXT_BYTES": "100"})
    long_text = "a" + "é" * 80          # 161 bytes; byte 100 falls inside an "é"
    resp = node.post("/v1/traces", trace(input_text=long_text, output_text="short"))
    assert resp.status == 202
    err = node.post("/v1/errors", {"error_type": "crash", "message": "日本語" * 20, "stack_trace": "ok"})
    assert err.status == 202
    node.wait_persisted(2)
    row = node.rows("llm_traces")[0]
    assert row["input_text"] == "a" + "é" * 49   # 99 bytes: the 50th "é" would end at byte 101
    assert len(row["input_text"].encode()) == 99
    assert row["input_bytes"] == 161 and row["output_bytes"] == 5
    assert row["truncated"] == 1
    error = node.rows("error_events")[0]
    assert error["message"] == "日本語" * 11        # 33 characters of 3 bytes = 99 bytes
    assert error["message_bytes"] == 180 and error["truncated"] == 1


def test_lone_surrogates_are_stored_as_replacement_characters(svc: Otrace) -> None:
    body = '{"provider": "p", "model": "m", "input_text": "bad \\ud800 half", "metadata": {"k": "\\udfff"}}'
    assert svc.post("/v1/traces", body).status == 202
    svc.wait_persisted(1)
    row = svc.rows("llm_traces")[0]
    assert row["input_text"] == "bad \ufffd half"
    assert json.loads(row["metadata"]) == {"k": "\ufffd"}


def test_retry_with_same_trace_id_is_stored_once(svc: Otrace) -> None:
    event = trace(trace_id="retry-me")
    assert svc.post("/v1/traces", event).status == 202
    assert svc.post("/v1/traces", event).status == 202
    assert svc.post("/v1/traces", [event, event]).status == 202
    health = svc.wait_persisted(4)
    assert svc.query("SELECT count(*) FROM llm_traces") == [(1,)]
    assert health["events_persisted"] == 1 and health["events_duplicate"] == 3


def test_a_batch_of_any_size_is_stored_once_per_trace_id(svc: Otrace) -> None:
    """The writer inserts up to 32 rows a statement (75 = 32 + 32 + 8 + 2 + 1), repeats included."""
    ids = [f"batch-{i}" for i in range(70)]
    body = [trace(trace_id=t) for t in ids] + [trace(trace_id=ids[i]) for i in (0, 31, 32, 69, 5)]
    assert svc.post("/v1/traces", body).status == 202
    health = svc.wait_persisted(75)
    assert health["events_persisted"] == 70 and health["events_duplicate"] == 5
    assert [row[0] for row in svc.query("SELECT trace_id FROM llm_traces ORDER BY id")] == ids


@pytest.mark.parametrize(("body", "needle"), [
    (b"{not json", "not valid JSON"),
    (b'{"provider": "p", "model": "m", "cost_usd": NaN}', "NaN"),
    (b'{"provider": "p", "model": "m", "cost_usd": Infinity}', "Infinity"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"provider": "\xff\xfe", "model": "m"}', "not UTF-8"),
    (b"[]", "no events"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"just a string"', "must be a JSON object"),
    (b'{"provider": "p", "model": "m", "prompt_tokens": ' + b"9" * 5000 + b"}", "more than 4300 digits"),
])
def test_bad_body_is_400_and_the_service_lives_on(svc: Otrace, body: bytes, needle: str) -> None:
    resp = svc.post("/v1/traces", body)
    assert resp.status == 400, resp
    assert needle in resp.json["error"]
    assert svc.post("/v1/traces", trace()).status == 202


DIGITS_400 = int("9" * 400)


@pytest.mark.parametrize(("fields", "field"), [
    ({"cost_usd": DIGITS_400}, "cost_usd"), ({"latency_ms": DIGITS_400}, "latency_ms"),
    ({"ttft_ms": -DIGITS_400}, "ttft_ms"),
    ({"created_at": DIGITS_400}, "created_at"), ({"cost_usd": float("9" * 400 + ".5")}, "cost_usd"),
    ({"metadata": {"x": 1e400}}, "metadata"), ({"metadata": '{"x": 1e400}'}, "metadata"),
])
def test_numbers_json_cannot_carry_are_400_naming_the_field(svc: Otrace, fields: dict[str, Any],
                                                            field: str) -> None:
    """Hundreds of digits, or 1e400 (which JSON parsers read as an infinity): never a traceback, never
    Infinity stored and pushed."""
    body = json.dumps(trace(**fields)).replace("Infinity", "1e400")
    resp = svc.post("/v1/traces", body)
    assert resp.status == 400 and resp.json["field"] == field, resp
    assert svc.post("/v1/traces", trace()).status == 202
    assert not any("Traceback" in json.dumps(line) or "exc_info" in line for line in svc.lines)


# -------------------------------------------------------------------------------------------- store


def test_a_full_multi_row_insert_fits_every_sqlite(tmp_path: Path) -> None:
    """The widest table's 32-row INSERT runs on an SQLite held to the old 999-variable limit."""
    otrace.open_database(str(tmp_path / "x.db"))
    with contextlib.closing(otrace.connect(str(tmp_path / "x.db"))) as conn:
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        widest = max(otrace.TABLES.values(), key=lambda t: len(t.columns))
        rows = [tuple(f"id-{i}" if c == "trace_id" else 0 for c in widest.columns) for i in range(75)]
        with otrace.transaction(conn):
            assert otrace.insert_rows(conn, widest.name, rows) == 75


def test_schema_pragmas_and_file_mode(svc: Otrace) -> None:
    assert svc.post("/v1/traces", trace()).status == 202
    svc.wait_persisted(1)
    assert svc.query("PRAGMA journal_mode") == [("wal",)]
    assert svc.query("PRAGMA auto_vacuum") == [(2,)]              # incremental
    assert svc.query("PRAGMA user_version") == [(len(otrace.SCHEMA),)]
    tables = {name for (name,) in svc.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"llm_traces", "error_events", "system_metrics", "push_log"} <= tables
    plan = " ".join(str(r) for r in svc.query(
        "EXPLAIN QUERY PLAN SELECT * FROM llm_traces WHERE synced = 0 ORDER BY id LIMIT 100"))
    assert "llm_traces_unsynced" in plan
    assert (svc.db_path.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("whose", ["db", "db-wal", "db-shm"])
def test_a_database_file_its_user_cannot_write_exits_2_naming_it(whose: str) -> None:
    """A -wal and -shm left by a run as root, or a file made read-only: the service user's start
    exits 2 naming the file and TRACE_DB_PATH (it retried "unable to open database file" every 5 s for
    ever, serving nothing, or exited 1 with a bare PermissionError)."""
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="otrace-perm-"))     # outside pytest's 0700 directory
    try:
        db = folder / "otrace.db"
        otrace.open_database(str(db))
        folder.chmod(0o777)
        os.chown(db, 65534, 65534)
        denied = Path(f"{db}{whose.removeprefix('db')}")
        if whose == "db":
            db.chmod(0o444)
        else:
            denied.write_bytes(b"")                            # root's, 0644, as a root run killed left it
            denied.chmod(0o644)
        env = {**os.environ, "TRACE_DB_PATH": str(db), "TRACE_PORT": "0", "TRACE_OTLP_PORT": "0"}
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *START],
                             env=env, capture_output=True, text=True, timeout=30, check=False)
        assert out.returncode == 2, out.stderr
        assert out.stderr.splitlines() == [
            f"otrace: TRACE_DB_PATH: {denied} cannot be read and written by this user (uid 65534)"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_database_otrace_must_not_write_is_refused_as_it_was(tmp_path: Path, run: Callable[..., Otrace]
                                                               ) -> None:
    """A newer otrace's, another program's, or not SQLite: exit 2 naming TRACE_DB_PATH before anything
    is written (its bytes, mode, journal and schema as they were), as for a path under a file; a
    corrupt one exits 1 at once."""
    newer, foreign, junk = tmp_path / "newer.db", tmp_path / "foreign.db", tmp_path / "junk.db"
    with contextlib.closing(sqlite3.connect(newer)) as conn:
        for step in otrace.SCHEMA:
            conn.executescript(step)
        conn.execute(f"PRAGMA user_version = {len(otrace.SCHEMA) + 1}")
    with contextlib.closing(sqlite3.connect(foreign)) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("PRAGMA user_version = 3")              # its own migrations' count: not to be moved
    junk.write_text("hello\n")
    for db, says in ((newer, "newer than this otrace"), (foreign, "is not an otrace database"),
                     (junk, "is not an SQLite database")):
        db.chmod(0o644)
        before = db.read_bytes()
        node = run(wait=False, db=db)
        assert node.exited(10) == 2
        assert len(node.stderr) == 1 and node.stderr[0].startswith(f"otrace: TRACE_DB_PATH: {db} ")
        assert says in node.stderr[0]
        assert db.read_bytes() == before and db.stat().st_mode & 0o777 == 0o644
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(db.name + ".") or
                    p.name.startswith(db.name + "-")]          # no lock, WAL or reserve beside it
    under_a_file = junk / "otrace.db"                       # a directory that cannot be made
    node = run(wait=False, db=under_a_file)
    assert node.exited(10) == 2
    assert node.stderr == [f"otrace: TRACE_DB_PATH: {under_a_file} cannot be used (NotADirectoryError: "
                           f"[Errno 20] Not a directory: '{under_a_file}.lock')\n"]
    corrupt = tmp_path / "corrupt.db"
    otrace.open_database(str(corrupt))
    with open(corrupt, "r+b") as f:                          # the schema's page header
        f.seek(100)
        f.write(b"\xff" * 8)
    node = run(wait=False, db=corrupt)
    assert node.exited(10) == 1
    assert "SQLITE_CORRUPT" in node.wait_log(lambda e: e.get("message") == "cannot start")["error"]
    assert node.stderr == ["otrace: cannot start: SQLITE_CORRUPT: database disk image is malformed\n"]


def test_a_database_another_program_is_writing_is_not_taken_for_a_new_one(tmp_path: Path) -> None:
    """Its schema cannot be read while its program holds the write lock: that is no answer."""
    db = tmp_path / "theirs.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE foo (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError):
            otrace.database_problem(str(db))
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert "not an otrace database" in otrace.database_problem(str(db))


def test_a_database_path_that_is_not_utf8_opens_read_only_too(tmp_path: Path) -> None:
    path = os.fsdecode(os.fsencode(tmp_path) + b"/bad\xff.db")       # a name Linux allows
    otrace.open_database(path)
    with contextlib.closing(otrace.connect(path, read_only=True)) as conn:
        assert otrace.schema_of(conn)[0] == len(otrace.SCHEMA)
    assert otrace.database_problem(path) is None


def test_parent_directory_is_created_private_and_an_existing_file_made_private(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    node = run(db=tmp_path / "a" / "b" / "otrace.db")
    assert node.post("/v1/traces", trace()).status == 202
    node.wait_persisted(1)
    assert node.stop() == 0
    assert (tmp_path / "a").stat().st_mode & 0o777 == (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700
    node.db_path.chmod(0o644)                               # an older otrace, or a careless copy
    node2 = run(db=node.db_path)
    assert node.db_path.stat().st_mode & 0o777 == 0o600
    assert node2.stop() == 0


def test_a_symlinked_database_path_finds_its_wal_and_reserve_beside_the_real_file(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    real = tmp_path / "volume" / "otrace.db"
    real.parent.mkdir()
    link = tmp_path / "otrace.db"
    link.symlink_to(real)
    node = run({"TRACE_WAL_MAX_BYTES": "64KiB", "TRACE_CHECKPOINT_INTERVAL": "200ms"}, db=link)
    assert node.health()["db_path"] == str(real)
    assert (real.parent / "otrace.db-reserve").stat().st_size == 16 * 2**20

    def wal_seen() -> bool:               # between two checkpoints, which may truncate it
        assert node.post("/v1/traces", [trace(input_text="x" * 2000) for _ in range(20)]).status == 202
        return node.health()["wal_size_bytes"] > 0

    wait_until(wal_seen, what="the WAL seen beside the real file")
    node.wait_log(lambda e: e.get("message") == "wal checkpoint" and e.get("mode") == "truncate")
    assert node.stop() == 0


def test_disk_reserve_of_zero_is_off_and_a_smaller_one_gives_back_the_rest(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A reserve an earlier setting made is cut to the new one, or removed with the reserve off: else
    its space is neither free nor given back on a full disk."""
    reserve = tmp_path / "otrace.db-reserve"
    assert run({"TRACE_DISK_RESERVE_BYTES": "2MiB"}).stop() == 0
    assert reserve.stat().st_size == 2 << 20
    assert run({"TRACE_DISK_RESERVE_BYTES": "64KiB"}).stop() == 0
    assert reserve.stat().st_size == 64 << 10
    node = run({"TRACE_DISK_RESERVE_BYTES": "0"})
    assert node.post("/v1/traces", trace()).status == 202
    node.wait_persisted(1)
    assert not reserve.exists()
    assert node.stop() == 0


@pytest.mark.parametrize("how", ["removed", "emptied"])
def test_a_reserve_file_removed_or_emptied_under_otrace_is_taken_again(tmp_path: Path,
                                                                       run: Callable[..., Otrace],
                                                                       how: str) -> None:
    """A reserve thought held but gone, or a file of its size with no blocks (cut and grown again, a
    sparse copy), would give nothing to the next full disk: the batch would wait in memory. The
    writer looks at its file and takes it again."""
    reserve = tmp_path / "otrace.db-reserve"
    node = run({"TRACE_DISK_RESERVE_BYTES": "2MiB"})
    assert node.health()["disk_reserve"] == {"bytes": 2 << 20, "held": True, "released": False}
    if how == "removed":
        reserve.unlink()                                 # a cleaner, or a data directory wiped
    else:                                                # its size, and no space behind it
        sparse = tmp_path / "sparse"
        with sparse.open("wb") as file:
            file.truncate(2 << 20)
        assert sparse.stat().st_blocks == 0
        sparse.replace(reserve)
    wait_until(lambda: node.post("/v1/traces", trace()).status == 202 and reserve.exists() and
               reserve.stat().st_blocks * 512 >= 2 << 20, timeout=30, what="the reserve taken again")
    node.wait_log(lambda e: e.get("message") == "disk reserve held")     # the file is there just before
    assert node.logs("disk reserve file gone or emptied: taking it again")
    assert node.health()["disk_reserve"]["held"] and node.stop() == 0


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_deleted_or_replaced_under_otrace_loses_nothing_that_got_202(
        tmp_path: Path, run: Callable[..., Otrace], how: str) -> None:
    """rm of the file and its WAL, or an mv of another database over it: otrace notices, says so, and
    moves to a new file at the path, carrying over what the old one held unpushed."""
    node = run({"TRACE_BATCH_WINDOW": "5ms"})
    before = node.post("/v1/traces", [trace() for _ in range(50)]).json["trace_ids"]
    node.wait_persisted(50)
    if how == "deleted":
        for suffix in ("", "-wal", "-shm"):
            Path(str(node.db_path) + suffix).unlink(missing_ok=True)
    else:                                                    # a backup of it, or another otrace's
        other = tmp_path / "other.db"
        otrace.open_database(str(other))
        with contextlib.closing(sqlite3.connect(other)) as conn:
            conn.execute(otrace.insert_sql("llm_traces"), otrace.parse_events(
                json.dumps(trace(trace_id="moved-in")).encode(), "/v1/traces", 1, 1024)[0][0].values)
            conn.commit()
        other.replace(node.db_path)
    during = node.post("/v1/traces", [trace() for _ in range(20)]).json["trace_ids"]
    node.wait_log(lambda e: e.get("message") == "database file recreated; unpushed rows carried over")
    after = node.post("/v1/traces", [trace() for _ in range(20)]).json["trace_ids"]
    node.wait_persisted(90)
    health = node.health()
    assert health["db_replaced"]["carried_over"]["llm_traces"] >= 50
    assert health["status"] == "ok"
    assert node.stop() == 0
    stored = {r[0] for r in node.query("SELECT trace_id FROM llm_traces")}
    assert set(before + during + after) <= stored
    said = node.query("SELECT category, severity, message, metadata FROM error_events")   # for the report
    assert [s[:2] for s in said] == [("other", "critical")] and said[0][2].startswith(
        "database file deleted or replaced under otrace: this file was started then")
    assert json.loads(said[0][3])["carried_over"] == health["db_replaced"]["carried_over"]
    if how == "replaced":                                   # the database moved in was kept, not wiped
        assert "moved-in" in stored


def test_another_programs_database_moved_in_is_not_written_until_it_is_gone(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """As at start, otrace does not write into another program's database: rows go to the carry file,
    /health says why, POSTs are 503; once the file is taken away, a new one gets them all."""
    node = run({"TRACE_BATCH_WINDOW": "5ms"})
    before = node.post("/v1/traces", [trace() for _ in range(20)]).json["trace_ids"]
    node.wait_persisted(20)
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE users (name)")
        conn.execute("PRAGMA user_version = 3")
    other.replace(node.db_path)
    kept = node.db_path.read_bytes()
    meanwhile = node.post("/v1/traces", trace())                          # before or after it noticed
    assert meanwhile.status in (202, 503)
    before += meanwhile.json.get("trace_ids", [])
    problem = wait_until(lambda: [p for p in node.health()["problems"] if "not an otrace database" in p],
                         timeout=otrace.Writer.IDLE_WAKE + 15, what="the refusal")
    assert "moving to a new one failing" in problem[0]
    assert node.post("/v1/traces", trace()).status == 503
    assert node.db_path.read_bytes() == kept                               # not written
    node.db_path.unlink()
    node.wait_log(lambda e: e.get("message") == "database file recreated; unpushed rows carried over",
                  timeout=30)
    after = node.post("/v1/traces", [trace() for _ in range(5)]).json["trace_ids"]
    assert node.stop() == 0
    assert set(before + after) <= {r[0] for r in node.query("SELECT trace_id FROM llm_traces")}


def test_a_backup_restored_with_mv_under_load_is_not_corrupted(tmp_path: Path, run: Callable[..., Otrace]
                                                               ) -> None:
    """The old file's WAL stays beside the path until the writer moves on: no other connection may
    open the file moved in meanwhile (a checkpoint through one wrote the old WAL's pages into it)."""
    node = run({"TRACE_CHECKPOINT_INTERVAL": "10ms"})
    before = [i for _ in range(3) for i in node.post("/v1/traces", [trace() for _ in range(100)]
                                                      ).json["trace_ids"]]
    node.wait_persisted(len(before))
    backup = tmp_path / "backup.db"
    with contextlib.closing(sqlite3.connect(f"file:{node.db_path}?mode=ro", uri=True)) as source, \
            contextlib.closing(sqlite3.connect(backup)) as copy:
        source.backup(copy)
        copy.execute("PRAGMA journal_mode = WAL")
    stop = threading.Event()
    result: list[tuple[list[str], list[int]]] = []
    loader = threading.Thread(target=lambda: result.append(post_flat_out(node, 2, stop, per_request=20)))
    loader.start()
    try:
        wait_until(lambda: node.health()["events_persisted"] >= len(before) + 2000, timeout=60, what="load")
        backup.rename(node.db_path)
        node.wait_log(lambda e: e.get("message") == "database file recreated; unpushed rows carried over",
                      timeout=60)
    finally:
        stop.set()
        loader.join()
    assert node.stop() == 0
    assert not [line for line in node.lines if "CORRUPT" in json.dumps(line)]
    assert node.query("PRAGMA integrity_check") == [("ok",)]
    stored = {r[0] for r in node.query("SELECT trace_id FROM llm_traces")}
    assert set(before) | set(result[0][0]) <= stored


def test_a_reader_opening_as_a_backup_is_moved_in_leaves_the_old_wal_and_the_new_file_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mv lands between a reader's look at the path and its open (the checkpointer's, or /health's
    first query): its first statement would read the old file's WAL as the new file's, and its close
    wrote those pages into the backup and removed the -wal and -shm under the writer. Refused before it
    reads anything, it touches neither file."""
    path, old, backup = tmp_path / "otrace.db", tmp_path / "old.db", tmp_path / "backup.db"
    otrace.open_database(str(path))
    with contextlib.closing(otrace.connect(str(path))) as writer:
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        insert = "INSERT INTO otrace_state (key, value, updated_at) VALUES (?, ?, 0)"
        writer.executemany(insert, ((f"a{i}", "x" * 500) for i in range(300)))
        with contextlib.closing(sqlite3.connect(backup)) as copy:
            writer.backup(copy)
            copy.execute("PRAGMA journal_mode = WAL")
        writer.executemany(insert, ((f"b{i}", "y" * 500) for i in range(300)))
        otrace.checkpoint("TRUNCATE", writer)                # the old file moves on from the backup,
        writer.executemany(insert, ((f"c{i}", "z" * 500) for i in range(300)))    # these in its WAL only
        companions = [Path(f"{path}{suffix}") for suffix in ("-wal", "-shm")]
        identity = otrace._identity
        for read in (lambda db: db.reading(read_only=False).__enter__(), lambda db: db.query("SELECT 1")):
            db = otrace.Database(str(path))
            assert not db.moved()
            backup_bytes = backup.stat().st_size
            before = [(f.stat().st_ino, f.stat().st_size) if f.exists() else None for f in companions]
            moved: list[str] = []

            def look_then_mv(at: str, moved: list[str] = moved) -> tuple[int, int]:
                seen = identity(at)
                if at == str(path) and not moved:            # the reader's first look, then the mv
                    moved.append(at)
                    path.rename(old)                         # the old file, as the writer still has it
                    backup.rename(path)
                return seen

            monkeypatch.setattr(otrace, "_identity", look_then_mv)
            with pytest.raises(sqlite3.OperationalError, match=re.escape(otrace.REPLACING)):
                read(db)
            monkeypatch.setattr(otrace, "_identity", identity)
            assert moved and [(f.stat().st_ino, f.stat().st_size) if f.exists() else None
                              for f in companions] == before and None not in before
            assert path.stat().st_size == backup_bytes
            with contextlib.closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as alone:
                assert alone.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            path.rename(backup)                              # the next reader meets the same move
            old.rename(path)


def test_a_carry_file_left_empty_or_half_made_by_a_crash_is_taken_in(tmp_path: Path,
                                                                     run: Callable[..., Otrace]) -> None:
    """A crash while the carry file was made leaves it empty, or with its first schema steps only."""
    node = run()
    ids = post_some(node, 3)
    node.wait_persisted(len(ids))
    assert node.stop() == 0
    carry = Path(f"{node.db_path}-carry")
    for steps in (0, 4):
        carry.touch()
        with contextlib.closing(sqlite3.connect(carry)) as conn:
            for step in otrace.SCHEMA[:steps]:
                conn.executescript(step)
            conn.execute(f"PRAGMA user_version = {steps}")
        again = run(db=node.db_path)
        again.wait_log(lambda e: e["message"] == "rows carried over from a replaced database file taken in")
        assert again.stop() == 0 and not carry.exists()
    assert sorted(ids) == sorted(r[0] for r in node.query("SELECT trace_id FROM llm_traces UNION ALL "
                                                          "SELECT trace_id FROM error_events"))


@needs_root
def test_an_rm_of_the_database_directory_without_a_reserve_held_is_taken_over(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A reserve too big for the disk is never held, so the writer keeps trying to take it: with the
    directory gone, that look must not kill the writer (nor /health's look at the disk)."""
    with tmpfs(tmp_path / "vol", "8m") as vol:
        node = run({"TRACE_DISK_RESERVE_BYTES": "16MiB"}, db=vol / "data" / "otrace.db")
        ids = post_some(node, 5)
        node.wait_persisted(len(ids))
        shutil.rmtree(vol / "data")
        assert node.request("GET", "/health").status in (200, 503)
        ids += post_some(node, 5)
        node.wait_log(lambda e: e.get("message") == "database file recreated; unpushed rows carried over",
                      timeout=otrace.Writer.IDLE_WAKE + 15)
        assert node.stop() == 0
        assert not [line for line in node.lines if "exc_info" in line]
        assert set(ids) <= {r[0] for r in node.query("SELECT trace_id FROM llm_traces UNION ALL "
                                                     "SELECT trace_id FROM error_events")}


def test_the_database_file_lock_is_taken_again_without_conflict(tmp_path: Path) -> None:
    """A move to a new file that failed after the lock was taken is tried again: the same file is
    held already, not another otrace's."""
    lock = otrace.DatabaseLock(str(tmp_path / "o.db"))
    try:
        lock.hold_file()
        lock.hold_file()
        with pytest.raises(otrace.DatabaseLocked, match="under another name"):
            os.link(tmp_path / "o.db", tmp_path / "link.db")
            otrace.DatabaseLock(str(tmp_path / "link.db"))
    finally:
        lock.release()


def test_a_damaged_carry_file_is_set_aside_and_the_start_goes_on(tmp_path: Path,
                                                               run: Callable[..., Otrace]) -> None:
    node = run()
    ids = post_some(node, 2)
    node.wait_persisted(len(ids))
    assert node.stop() == 0
    carry = Path(f"{node.db_path}-carry")
    with contextlib.closing(sqlite3.connect(node.db_path)) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'llm_traces'").fetchone()[0]
    for torn in (100, (root - 1) * 4096):                    # the schema's page, or a table's
        shutil.copy(node.db_path, carry)
        with open(carry, "r+b") as f:
            f.seek(torn)
            f.write(b"\xff" * 12)
        again = run(db=node.db_path)
        aside = again.wait_log(lambda e: e.get("message") == "carry file cannot be taken in: set aside, its "
                               "rows not taken in")["file"]
        assert Path(aside).exists() and not carry.exists() and aside.startswith(f"{carry}.aside-")
        assert again.post("/v1/traces", trace()).status == 202 and again.stop() == 0
    assert set(ids) <= {r[0] for r in node.query("SELECT trace_id FROM llm_traces UNION ALL "
                                                 "SELECT trace_id FROM error_events")}


def test_a_carry_files_companion_that_cannot_follow_it_aside_is_removed_not_left_for_the_next(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """The carry file's own new name fits in NAME_MAX (255 bytes) and its -wal's and -shm's, four bytes
    longer, do not (ENAMETOOLONG): the carry goes aside alone, and its companions, kept by another
    program that has it open (otrace's close would have removed them), are removed, never to be read as
    the -wal and -shm of the next carry file at that path."""
    db = tmp_path / ("o" * 224 + ".db")                           # 227 bytes: its carry's aside 253
    carry = Path(f"{db}{otrace.CARRY}")
    aside_name = f"{carry.name}.aside-{otrace.now_ms()}"
    assert len(aside_name) <= 255 < len(f"{aside_name}-wal")      # NAME_MAX
    node = run(db=db)
    node.wait_persisted(len(post_some(node, 2)))
    assert node.stop() == 0
    with contextlib.closing(sqlite3.connect(db)) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'llm_traces'").fetchone()[0]
    shutil.copy(db, carry)
    with open(carry, "r+b") as f:                                 # a table's page: its rows cannot be read
        f.seek((root - 1) * 4096)
        f.write(b"\xff" * 12)
    with contextlib.closing(sqlite3.connect(carry)) as looker:    # someone looking at it, as otrace starts
        looker.execute("SELECT count(*) FROM sqlite_schema").fetchone()
        assert Path(f"{carry}-wal").exists() and Path(f"{carry}-shm").exists()
        again = run(db=db)
        aside = again.wait_log(lambda e: e.get("message") == "carry file cannot be taken in: set aside, its "
                               "rows not taken in")["file"]
        assert aside.startswith(f"{carry}.aside-")
        beside = [p.name.removeprefix(carry.name) for p in tmp_path.iterdir()
                  if p.name.startswith(carry.name)]
        assert beside == [aside.removeprefix(str(carry))]         # no -wal, no -shm, under either name
    assert again.post("/v1/traces", trace()).status == 202
    again.wait_persisted(1)
    assert again.stop() == 0


def test_a_damaged_carry_file_removed_while_it_is_read_is_nothing_to_set_aside(
        tmp_path: Path, run: Callable[..., Otrace], caplog: pytest.LogCaptureFixture) -> None:
    """take_carried finds the carry file damaged, and by the time it would rename it aside the file is
    gone (removed meanwhile, here by the connection's trace callback as the carry is detached, after
    its damage was found): nothing was taken in, nothing is set aside, and no error is raised."""
    node = run()
    node.wait_persisted(len(post_some(node, 3)))
    assert node.stop() == 0
    db, carry = str(node.db_path), Path(f"{node.db_path}{otrace.CARRY}")
    with contextlib.closing(sqlite3.connect(db)) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'llm_traces'").fetchone()[0]
    shutil.copy(db, carry)
    with open(carry, "r+b") as f:                                 # a table's page: carry_over meets it
        f.seek((root - 1) * 4096)
        f.write(b"\xff" * 12)
    detached = []

    def remove_at_detach(statement: str) -> None:
        if statement.startswith("DETACH DATABASE carry"):
            detached.append(statement)
            carry.unlink()

    with contextlib.closing(otrace.connect(db)) as conn, caplog.at_level(logging.INFO, logger="otrace"):
        conn.set_trace_callback(remove_at_detach)
        assert otrace.take_carried(conn, db) is False
    assert detached and not carry.exists()
    assert [p.name for p in node.db_path.parent.iterdir() if ".aside-" in p.name] == []
    assert "carry file cannot be taken in" not in caplog.text
    assert len(node.query("SELECT trace_id FROM llm_traces")) == 3            # nothing taken in


def test_after_an_rm_of_its_files_otrace_takes_its_lock_again_or_stands_down(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """rm of the database and its lock file lets a second otrace lock the path: the first takes the
    lock again when it moves to a new file, or, if the second was there first, answers 503 rather
    than share the file."""
    first = run({"TRACE_BATCH_WINDOW": "5ms"})
    assert first.post("/v1/traces", trace()).status == 202
    first.wait_persisted(1)
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(str(first.db_path) + suffix).unlink(missing_ok=True)
    idle = otrace.Writer.IDLE_WAKE + 10                       # an idle writer looks that often
    first.wait_log(lambda e: e.get("message") == "database file recreated; unpushed rows carried over",
                   timeout=idle)
    second = run(wait=False, db=first.db_path)
    assert second.exited(10) == 1 and "another otrace" in second.stderr[0]
    os.link(first.db_path, tmp_path / "link.db")
    linked = run(wait=False, db=tmp_path / "link.db")       # the new file itself is locked too
    assert linked.exited(10) == 1 and "under another name" in linked.stderr[0]
    assert first.stop() == 0
    lone = run({"TRACE_BATCH_WINDOW": "5ms"}, db=tmp_path / "lone.db")
    lone.signal(signal.SIGSTOP)                              # it cannot look before the other starts
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(str(lone.db_path) + suffix).unlink(missing_ok=True)
    usurper = run(db=lone.db_path)
    lone.signal(signal.SIGCONT)
    fault = wait_until(lambda: [p for p in lone.health()["problems"] if "another otrace" in p],
                       timeout=idle, what="it")
    assert "deleted or replaced" in fault[0]
    assert lone.post("/v1/traces", trace()).status == 503
    assert usurper.post("/v1/traces", trace()).status == 202 and usurper.stop() == 0


def test_a_dead_writer_means_503(tmp_path: Path) -> None:
    """The writer is never started here, as if it had died: no 202 can promise a commit then."""
    config = otrace.Config(db_path=str(tmp_path / "x.db"), port=0, otlp_port=0, metrics_interval=0.0)
    service = otrace.Service(config)
    try:
        with pytest.raises(otrace.Refusal) as refused:
            service.server.api.admit([otrace.Row("llm_traces", ())])
        assert refused.value.status == 503
        assert service.health()["problems"] == ["writer thread is not running"]
    finally:
        service.server.release()
        service.db.close()


def test_a_loop_stuck_in_one_tick_is_a_health_problem_and_one_resting_is_not(tmp_path: Path) -> None:
    """A tick that never returns (a file, a socket or a lock that never answers) is listed in /health's
    problems once past its loop's stuck_after, and no longer once it ends; a tick waiting out a backoff
    (rest) is not stuck however long it waits."""
    config = otrace.Config(db_path=str(tmp_path / "x.db"), port=0, otlp_port=0, metrics_interval=0.0,
                           openclaw_state_dir="off")
    service = otrace.Service(config)
    release, entered = threading.Event(), threading.Event()

    class Hung(otrace.Loop):
        def tick(self) -> None:
            release.wait(60)

    class Resting(otrace.Loop):
        def tick(self) -> None:
            entered.set()
            self.rest(60)

    hung, resting = Hung("hung", 3600, first_delay=0), Resting("resting", 3600, first_delay=0)
    service.loops += [hung, resting]
    try:
        service.writer.start()
        hung.stuck_after = resting.stuck_after = 0.05
        resting.start()
        assert entered.wait(30)
        hung.start()
        wait_until(lambda: any(p.startswith("otrace-hung is stuck: ") for p in service.health()["problems"]),
                   timeout=60, what="the hung loop listed")
        wait_until(lambda: resting.busy_since is None, timeout=60, what="the resting loop not busy")
        assert not any("resting" in p for p in service.health()["problems"])
        release.set()
        wait_until(lambda: service.health()["problems"] == [], timeout=60, what="the hung loop's tick ended")
    finally:
        release.set()
        for loop in (hung, resting):
            loop.stop()
        stopped(service)


def test_a_writer_waiting_for_work_is_not_stuck_however_long_it_waits(tmp_path: Path) -> None:
    """Idle, the writer wakes only every IDLE_WAKE, so its heartbeat ages past STUCK_AFTER; that is not
    a stuck writer. One whose last iteration is that old and that is not waiting for work is."""
    config = otrace.Config(db_path=str(tmp_path / "x.db"), port=0, otlp_port=0, metrics_interval=0.0,
                           openclaw_state_dir="off")
    service = otrace.Service(config)
    writer = service.writer
    try:
        writer.start()
        assert service.events.offer(otrace.Unit([otrace.event_row(otrace.TRACES, otrace.trace_row, {
            "provider": "p", "model": "m", "trace_id": "t"}, "http")]))
        assert service.events.wait_drained(30)
        wait_until(lambda: writer.resting and writer.idle_wake() == writer.IDLE_WAKE, what="a resting writer")
        writer.heartbeat -= 10 * writer.STUCK_AFTER
        assert not writer.stuck and service.health()["problems"] == []
        # a batch after a long wait, held by another program's write lock: its time counts from its start
        with contextlib.closing(sqlite3.connect(tmp_path / "x.db", isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            assert service.events.offer(otrace.Unit([otrace.event_row(otrace.TRACES, otrace.trace_row, {
                "provider": "p", "model": "m", "trace_id": "u"}, "http")]))
            wait_until(lambda: not writer.resting, what="the writer in its batch")
            assert not writer.stuck and service.health()["problems"] == []
            writer.heartbeat -= 10 * writer.STUCK_AFTER
            assert writer.stuck and service.health()["problems"] == ["writer thread is stuck"]
            other.execute("ROLLBACK")
        assert service.events.wait_drained(30)
    finally:
        service.events.submit(None)
        writer.join(10)
        service.server.release()
        service.db.close()


def test_a_loop_that_failed_with_the_writes_tries_again_once_they_work(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention's pass on a write fault fails with it (a full disk, another program's lock); when the
    writer commits again it wakes the pass, so the fault is not listed for minutes after its cause."""
    monkeypatch.setattr(otrace, "BUSY_TIMEOUT", 0.2)       # another program's lock fails a write soon
    config = otrace.Config(db_path=str(tmp_path / "x.db"), port=0, otlp_port=0, metrics_interval=0.0,
                           openclaw_state_dir="off")
    service = otrace.Service(config)
    writer, retention = service.writer, service.retention

    def offer(trace_id: str) -> None:
        assert service.events.offer(otrace.Unit([otrace.event_row(otrace.TRACES, otrace.trace_row, {
            "provider": "p", "model": "m", "trace_id": trace_id}, "http")]))

    try:
        writer.start()
        offer("t")
        assert service.events.wait_drained(30)              # the writer has the file open
        with contextlib.closing(sqlite3.connect(tmp_path / "x.db", isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            offer("u")
            wait_until(lambda: writer.fault.error, what="writes failing on the lock")
            with pytest.raises(sqlite3.OperationalError) as failed:
                retention.tick()                            # its deletions are writes too
            retention.fault.failed(otrace.describe(failed.value))     # as its loop does
            retention.bell.clear()                          # the wake the write fault gave it is spent
            other.execute("ROLLBACK")
        assert service.events.wait_drained(30)
        wait_until(retention.bell.is_set, what="retention woken by the recovery")
    finally:
        service.events.submit(None)
        writer.join(10)
        service.server.release()
        service.db.close()


def test_the_queue_tells_promised_events_from_otraces_own() -> None:
    events = otrace.EventQueue(capacity=10, batch_size=5)
    assert events.offer(otrace.Unit([otrace.Row("t", ())] * 3))
    assert events.offer(otrace.Unit([otrace.Row("t", ())] * 2, own=True))
    assert not events.offer(otrace.Unit([otrace.Row("t", ())] * 6))          # whole or not at all
    assert events.unwritten() == (3, 2) and events.qsize() == 5
    batch = events.next_work(batch_size=5, window=0.0, idle=0.0)
    for unit in batch:
        events.done(unit)
    assert events.unwritten() == (0, 0)

def test_a_request_larger_than_the_queue_goes_in_beside_the_others_one_at_a_time() -> None:
    """Other requests do not wait for one larger than the queue to be written (nor it for them to be):
    it goes in beside them, one such at a time, and the rest still fit the queue together."""
    events = otrace.EventQueue(capacity=8, batch_size=4)
    def unit(n: int) -> otrace.Unit:
        return otrace.Unit([otrace.Row("t", ())] * n)
    assert events.offer(unit(3))
    big = unit(20)
    assert events.offer(big)                                   # beside the 3 waiting
    assert events.gate.opened.is_set()          # the writer takes it alone: no reason to hold clients
    assert events.offer(unit(5))                               # 3 + 5: the queue, the big one aside
    assert not events.offer(unit(1)) and not events.offer(unit(9))
    assert events.unwritten() == (28, 0)
    for batch in (events.next_work(batch_size=4, window=0.0, idle=0.0) for _ in range(3)):
        for taken in batch:
            if taken is big:
                events.done(taken)
    assert events.offer(unit(9)) and events.unwritten() == (17, 0)    # the next large one, once it is done


def test_a_readers_unit_waits_for_room_where_a_clients_is_refused_at_once() -> None:
    """A reader catching up hands over what it read once room is made, instead of reading it again."""
    events = otrace.EventQueue(capacity=4, batch_size=4)
    assert events.offer(otrace.Unit([otrace.Row("t", ())] * 4))
    assert not events.offer(otrace.Unit([otrace.Row("t", ())]))                # a client's: at once
    answers: list[bool] = []
    reader = threading.Thread(target=lambda: answers.append(
        events.offer(otrace.Unit([otrace.Row("t", ())] * 2, own=True))))
    reader.start()
    wait_until(lambda: len(events.not_full._waiters) == 1, what="the reader waiting for room")
    events.done(events.next_work(batch_size=4, window=0.0, idle=0.0)[0])
    reader.join(10)
    assert answers == [True] and events.unwritten() == (0, 2)
    events.close()                                       # shutdown: a waiting reader is let go at once
    assert not events.offer(otrace.Unit([otrace.Row("t", ())], own=True))


def writer_waiting_for_a_batch(events: otrace.EventQueue) -> tuple[threading.Thread, list[Any]]:
    """A thread taking the next batch of 6 with an hour's window, once it waits; its batch lands in
    the list."""
    taken: list[Any] = []
    writer = threading.Thread(target=lambda: taken.append(events.next_work(batch_size=6, window=3600,
                                                                           idle=3600)), daemon=True)
    writer.start()
    wait_until(lambda: len(events.not_empty._waiters) == 1, what="the writer waiting for its batch to fill")
    return writer, taken


@pytest.mark.parametrize("own", [False, True], ids=["client-refused", "reader-waiting"])
def test_a_batch_that_cannot_fill_is_taken_once_an_offer_finds_no_room(own: bool) -> None:
    """A batch larger than the queue can hold would otherwise wait out its whole window, each time."""
    events = otrace.EventQueue(capacity=6, batch_size=6)
    assert events.offer(otrace.Unit([otrace.Row("t", ())] * 4))
    writer, taken = writer_waiting_for_a_batch(events)
    reader = threading.Thread(target=events.offer, args=(otrace.Unit([otrace.Row("t", ())] * 3, own=own),),
                              daemon=True)
    reader.start()
    writer.join(60)
    assert [len(batch[0]) for batch in taken] == [4]
    if not own:
        reader.join(60)                                    # a client's unit waits a moment, then is refused
    events.done(taken[0][0])                               # room again: a waiting reader's unit goes in
    reader.join(60)
    assert events.unwritten() == ((0, 3) if own else (0, 0))


def test_a_request_refused_while_the_writer_commits_does_not_cut_its_next_batch_short() -> None:
    events = otrace.EventQueue(capacity=6, batch_size=6)
    assert events.offer(otrace.Unit([otrace.Row("t", ())] * 4))
    committing = events.next_work(batch_size=6, window=0.0, idle=0.0)
    assert not events.offer(otrace.Unit([otrace.Row("t", ())] * 3))
    events.done(committing[0])                                   # room again: the batch can fill
    assert events.offer(otrace.Unit([otrace.Row("t", ())] * 2))
    writer, taken = writer_waiting_for_a_batch(events)
    assert events.offer(otrace.Unit([otrace.Row("t", ())] * 4))
    writer.join(60)
    assert [[len(unit) for unit in batch] for batch in taken] == [[2, 4]]


def test_a_request_that_needs_the_whole_queue_goes_in_while_single_events_wait_for_their_batch(
        run: Callable[..., Otrace]) -> None:
    """An event waits in the queue for its batch to fill, up to TRACE_BATCH_WINDOW: a request that needs
    the whole queue has the writer commit it and goes in, rather than being refused each time it is
    sent again while single events trickle in."""
    node = run({"TRACE_QUEUE_SIZE": "8", "TRACE_BATCH_SIZE": "4", "TRACE_BATCH_WINDOW": "10s"})
    statuses, accepted = [], 0
    for _ in range(10):                       # on a busy machine the writer may miss the wait once
        assert node.post("/v1/traces", trace()).status == 202          # waits: its batch cannot fill
        statuses.append(node.post("/v1/traces", [trace() for _ in range(8)]).status)
        accepted += 1 + 8 * (statuses[-1] == 202)
        if statuses[-1] == 202:
            break
    assert statuses[-1] == 202 and set(statuses) <= {202, 503}
    node.wait_persisted(accepted, timeout=30)


def test_a_stall_asks_a_wait_as_long_as_its_refusals_have_lasted_and_ends_at_an_event_taken() -> None:
    stall = otrace.Stall()
    assert stall.retry_after(1) == {"Retry-After": "1"} and stall.retry_after(5) == {"Retry-After": "5"}
    stall.since -= 12                                       # refused for 12 s
    assert stall.retry_after(1) == {"Retry-After": "12"} and stall.retry_after(20) == {"Retry-After": "20"}
    stall.since -= 600
    assert stall.retry_after(1) == {"Retry-After": "30"}    # at most
    stall.ended()                                           # an event taken
    assert stall.retry_after(1) == {"Retry-After": "1"}
    stall.since -= 12
    stall.last -= 31                                        # no refusal for longer than any wait asked
    assert stall.retry_after(1) == {"Retry-After": "1"}


def test_an_empty_session_id_or_finish_reason_of_a_span_is_named_where_it_was_left_out() -> None:
    event = {"session_id": "", "finish_reason": "", "prompt_tokens": 5, "metadata": {}}
    otrace.leave_out_bad_values(event)
    assert (event["session_id"], event["finish_reason"], event["prompt_tokens"]) == (None, None, 5)
    assert event["metadata"]["dropped"] == {"finish_reason": "empty", "session_id": "empty"}


STALLED_CLIENT = r"""
import json, sys
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

provider = TracerProvider(resource=Resource.create({"service.name": "otrace-stalled-client"}))
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=3_600_000))
tracer = provider.get_tracer("otrace.test")
for _ in range(int(sys.argv[1])):
    with tracer.start_as_current_span("chat gpt-4o", attributes={
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 10}):
        pass
print(json.dumps({"flushed": provider.force_flush(120_000)}))
provider.shutdown()
"""


def test_an_sdk_exporter_rides_out_a_stalled_writer_as_its_refusals_ask_it_to_wait_longer(
        run: Callable[..., Otrace]) -> None:
    """The writer held up by another program's write lock: each 503 "queue is full" asks the client
    to wait as long as the refusals have lasted (Retry-After), so the Python SDK's exporter, which
    retries six times whatever its timeout, sends its spans once the lock goes. (Retry-After: 1 every
    time had it give its batches up after about 6 s.)"""
    node = run()
    blocker = sqlite3.connect(node.db_path, isolation_level=None, timeout=10)
    blocker.execute("BEGIN IMMEDIATE")
    filled = 0
    while node.post("/v1/traces", [trace() for _ in range(50)]).status == 202:
        filled += 50                                            # the queue, full
    env = {**client_env(f"http://127.0.0.1:{node.port}"), "OTEL_EXPORTER_OTLP_TIMEOUT": "30"}
    client = subprocess.Popen([sys.executable, "-c", STALLED_CLIENT, "1500"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: int(node.post("/v1/traces", trace()).headers.get("retry-after", 0)) >= 8,
                   timeout=60, what="refusals for 8 s, the SDK's batches refused meanwhile")
        blocker.execute("ROLLBACK")
        out, err = client.communicate(timeout=120)
    finally:
        blocker.close()
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0 and json.loads(out) == {"flushed": True}, err[-3000:]
    assert "Failed to export" not in err, err[-3000:]
    node.wait_persisted(filled + 1500, timeout=60)
    assert node.health()["events_refused"] >= 2 * 512


def test_host_samples_dropped_on_a_full_queue_are_one_failure_logged_once(run: Callable[..., Otrace]) -> None:
    """The writer held up by another program's lock, the queue full: each host sample is dropped and
    counted in /health, and the failure is logged when it starts and when it ends, not at each sample
    (its text carried the running count, so each sample's read as a new failure)."""
    node = run({"TRACE_METRICS_INTERVAL": "100ms", "TRACE_QUEUE_SIZE": "20"})
    blocker = sqlite3.connect(node.db_path, isolation_level=None, timeout=10)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        while node.post("/v1/traces", [trace() for _ in range(5)]).status == 202:
            pass
        wait_until(lambda: node.health()["metrics"]["samples_dropped"] >= 3, what="three samples dropped")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    node.wait_log(lambda e: e.get("message") == "metrics recovered")
    assert [line["error"] for line in node.logs("metrics failing")] == [
        "queue full: host samples dropped (samples_dropped in /health)"]
    assert node.stop() == 0


def test_queue_full_answers_503_and_keeps_nothing_of_that_request(run: Callable[..., Otrace]) -> None:
    node = run({"TRACE_QUEUE_SIZE": "20", "TRACE_BATCH_SIZE": "5"})
    # another process holds the write lock: the writer cannot commit, so the queue really fills
    blocker = sqlite3.connect(node.db_path, isolation_level=None, timeout=10)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        accepted: list[str] = []
        statuses = []
        for _ in range(30):
            resp = node.post("/v1/traces", [trace(), trace(), trace()])
            statuses.append(resp.status)
            if resp.status == 202:
                accepted += resp.json["trace_ids"]
            else:
                assert resp.status == 503 and 1 <= int(resp.headers["retry-after"]) <= 30
        assert 503 in statuses
        health = node.health()
        assert health["queue_depth"] <= 20 and health["events_refused"] >= 3
        assert statuses.count(202) * 3 == len(accepted) <= 21
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    node.wait_persisted(len(accepted), timeout=30)
    stored = {r[0] for r in node.query("SELECT trace_id FROM llm_traces")}
    assert stored == set(accepted)


def post_flat_out(node: Otrace, clients: int, stop: threading.Event, per_request: int = 1
                  ) -> tuple[list[str], list[int]]:
    """Clients posting as fast as they can over keep-alive connections until `stop`; returns the
    trace_ids that got a 202 and every status seen."""
    accepted: list[str] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
        while not stop.is_set():
            events = [trace() for _ in range(per_request)]
            try:
                resp = node.post("/v1/traces", events, conn=conn)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
                if node.proc.poll() is not None:
                    return
                continue
            with lock:
                statuses.append(resp.status)
                if resp.status == 202:
                    accepted.extend(resp.json["trace_ids"])
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(30)
    return accepted, statuses


def test_flat_out_load_loses_nothing_that_got_202(svc: Otrace) -> None:
    stop = threading.Event()
    result: list[Any] = []
    runner = threading.Thread(target=lambda: result.append(post_flat_out(svc, 16, stop)))
    runner.start()
    wait_until(lambda: svc.health()["events_received"] >= 2000, timeout=60, what="2000 events in")
    stop.set()
    runner.join()
    accepted, statuses = result[0]
    assert set(statuses) <= {202, 503}
    svc.wait_persisted(len(accepted), timeout=30)
    stored = {r[0] for r in svc.query("SELECT trace_id FROM llm_traces")}
    assert set(accepted) <= stored
    assert svc.health()["events_dropped"] == 0


@needs_root
def test_full_disk_degrades_health_and_recovers_without_loss(tmp_path: Path, run: Callable[..., Otrace]
                                                             ) -> None:
    with tmpfs(tmp_path / "vol", "3m") as vol:
        node = run({"TRACE_QUEUE_SIZE": "200", "TRACE_MAX_TEXT_BYTES": "64KiB"}, db=vol / "otrace.db")
        assert node.post("/v1/traces", trace()).status == 202
        node.wait_persisted(1)
        filler = fill(vol)
        accepted: list[str] = []
        statuses: list[int] = []
        for _ in range(100):
            resp = node.post("/v1/traces", [trace(input_text="x" * 8000) for _ in range(10)])
            statuses.append(resp.status)
            if resp.status == 202:
                accepted += resp.json["trace_ids"]
            if resp.status == 503:
                break
        assert statuses[-1] == 503, statuses
        degraded = node.request("GET", "/health")
        assert degraded.status == 503
        report = degraded.json
        assert report["status"] == "degraded" and report["db_status"] == "error"
        assert "SQLITE_FULL" in report["last_write_error"]["error"]
        assert any("database writes failing" in p for p in report["problems"])
        refused = node.post("/v1/traces", trace())                 # no 202 it could not keep
        assert refused.json == {"error": "database writes are failing (disk full); retry later",
                                "field": None}
        attempts = wait_until(lambda: (n := node.health()["last_write_error"]["attempts"]) >= 5 and n,
                              timeout=30, what="several retries")
        assert len(node.logs("database write failing")) < attempts    # logged on change, not each retry
        filler.unlink()
        node.wait_persisted(1 + len(accepted), timeout=30)
        healed = wait_until(lambda: (r := node.request("GET", "/health")).status == 200 and r, timeout=30,
                            what="/health ok again")    # the fault clears after the outage is recorded
        assert healed.json["last_write_error"] is None
        node.wait_log(lambda e: e.get("message") == "database write recovered")
        stored = {r[0] for r in node.query("SELECT trace_id FROM llm_traces")}
        assert set(accepted) <= stored
        assert node.stop() == 0


@needs_root
def test_a_full_temp_directory_is_not_a_full_disk(tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """SQLite spills a statement's journal past 64 KiB (a batch's multi-row INSERT, its trace_ids spread
    over the index's pages) to a file in its temp directory (/var/tmp, or SQLITE_TMPDIR), often on
    another disk than the database's. Full, it failed the writes with SQLITE_FULL: the reserve given up
    and ingest paused for a disk with room. The writer keeps those journals in memory."""
    path = tmp_path / "otrace.db"
    seed(path, [("trace", 5000, 1)], age_days=0.01)    # an index of trace_ids a batch's inserts spread over
    with tmpfs(tmp_path / "tmp", "64k") as temp:
        fill(temp)
        node = run({"SQLITE_TMPDIR": str(temp)}, db=path)
        ids = []
        for _ in range(10):
            resp = node.post("/v1/traces", [trace(input_text="x" * 1000, output_text="y" * 1000)
                                            for _ in range(50)])
            assert resp.status == 202, resp.json
            ids += resp.json["trace_ids"]
        node.wait_persisted(len(ids))
        health = node.health()
        assert health["last_write_error"] is None and health["disk_reserve"]["held"], health
        assert not list(temp.glob("etilqs_*"))
        assert node.stop() == 0


@needs_root
def test_a_start_on_a_full_disk_takes_its_own_reserve(tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """The reserve a stopped otrace left beside its database is otrace's own room: a start that fails
    on a full disk (opening the WAL index needs room) gives it up and starts, and says so."""
    with tmpfs(tmp_path / "vol", "8m") as vol:
        db = vol / "otrace.db"
        env = {"TRACE_DISK_RESERVE_BYTES": "1MiB"}
        first = run(env, db=db)
        assert first.post("/v1/traces", trace()).status == 202
        assert first.stop() == 0
        fill(vol)
        node = run(env, db=db, wait=False)
        node.wait_log(lambda e: e.get("message") == "start failing: disk reserve released so the database "
                                                    "can open", timeout=60)
        node.wait_log(lambda e: e.get("message") == "listening", timeout=60)
        assert node.query("SELECT count(*) FROM llm_traces") == [(1,)]
        assert node.stop() == 0


@needs_root
def test_disk_reserve_commits_what_was_accepted_when_the_disk_fills(tmp_path: Path,
                                                                    run: Callable[..., Otrace]) -> None:
    """The reserve is given up on the first disk-full write, so every 202'd event is committed while
    the disk is still full (a SIGKILL then loses nothing); ingest answers 503 until there is room."""
    with tmpfs(tmp_path / "vol", "24m") as vol:
        db = vol / "otrace.db"
        node = run({"TRACE_DISK_RESERVE_BYTES": "2MiB", "TRACE_BATCH_WINDOW": "200ms"}, db=db)
        reserve = vol / "otrace.db-reserve"
        assert reserve.stat().st_blocks * 512 >= 2 * 2**20
        filler = fill(vol)
        accepted: list[str] = []
        batch = [trace(input_text="x" * 4000) for _ in range(20)]
        while (resp := node.post("/v1/traces", batch)).status == 202:
            accepted += resp.json["trace_ids"]
            batch = [trace(input_text="x" * 4000) for _ in range(20)]
        assert resp.status == 503 and "disk full" in resp.json["error"]
        released = node.wait_log(lambda e: e.get("message") == "disk full: reserve released; ingest paused")
        assert released["queued_events"] > 0 and not reserve.exists()
        wait_until(lambda: node.health()["queue_depth"] == 0, what="the queue committed on a full disk")
        report = node.request("GET", "/health")
        assert report.status == 503 and any("reserve released" in p for p in report.json["problems"])
        stored = {r[0] for r in node.query("SELECT trace_id FROM llm_traces")}    # committed: a SIGKILL
        assert set(accepted) <= stored                                             # now would lose none
        assert node.post("/v1/traces", batch).status == 503                        # during the pause
        os.truncate(filler, filler.stat().st_size - 3 * 2**20 - (2**20 // 2))  # room for it 3.5 times:
        node.wait_log(lambda e: e.get("message") == "disk reserve held again: ingest resumes")  # enough
        assert reserve.stat().st_blocks * 512 >= 2 * 2**20
        ended = node.wait_log(lambda e: e.get("message") == "ingest pause for a full disk ended")
        assert ended["events_refused"] >= 20 and ended["seconds"] > 0     # the 503s, not the one write's
        assert node.post("/v1/traces", trace()).status == 202
        paused = wait_until(lambda: node.query("SELECT message, severity, metadata FROM error_events WHERE "
                                               "message LIKE 'ingest paused%'"), what="the pause's event")
        seconds, refused = ended["seconds"], ended["events_refused"]
        assert paused[0][:2] == (f"ingest paused {seconds} s by a full disk: {refused} events answered 503",
                                 "critical")
        assert json.loads(paused[0][2]) == {k: ended[k] for k in ("since", "seconds", "events_refused")}
        assert node.stop() == 0


def traces_kept_and_deleted(db: Path) -> tuple[int, int]:
    """The traces a database holds, and those retention deleted before they were pushed."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        deleted = conn.execute("SELECT total(unsynced_deleted) FROM retention_ledger WHERE table_name = "
                               "'llm_traces'").fetchone()[0]
        return conn.execute("SELECT count(*) FROM llm_traces").fetchone()[0], int(deleted)


@needs_root
def test_a_disk_its_own_rows_fill_is_relieved_and_the_reserve_taken_back(tmp_path: Path,
                                                                          run: Callable[..., Otrace]) -> None:
    """otrace's own rows fill a small volume (a cap over the disk's budget, warned at start; requests of
    1 MB, more than the room over the disk's mark): the reserve is released so the queue commits, and
    counted used while released, so the pass deletes the oldest rows to make room for it; it is taken
    back and ingest resumes, and what was answered 202 is written. (Ingest went on without it once its
    release alone brought the disk under its mark; the rows filled it again and a deletion found no
    room to write: writes failed for good.)"""
    with tmpfs(tmp_path / "vol", "12m") as vol:
        node = run({"TRACE_DISK_RESERVE_BYTES": "3MiB", "TRACE_DISK_HIGH_PCT": "90",
                    "TRACE_CLEANUP_INTERVAL": "5s", "TRACE_METRICS_INTERVAL": "off"}, db=vol / "otrace.db")
        accepted: list[str] = []

        def post() -> int:
            text = "x" * 16000
            resp = node.post("/v1/traces", [trace(input_text=text, output_text=text) for _ in range(30)])
            accepted.extend(resp.json["trace_ids"] if resp.status == 202 else [])
            return resp.status

        wait_until(lambda: post() == 503 and node.health()["disk_reserve"]["released"], timeout=120,
                   what="the disk filled by otrace's own rows")
        wait_until(lambda: post() == 202 and node.health()["disk_reserve"]["held"], timeout=120,
                   what="the reserve taken back and ingest resumed")
        assert node.logs("retention deleted rows that were never pushed")
        assert node.stop() == 0                                  # every 202 written
        kept, deleted = traces_kept_and_deleted(vol / "otrace.db")
        assert kept + deleted == len(accepted) and kept > 0


@needs_root
def test_rows_that_fill_the_disk_between_passes_are_deleted_before_it_is_full(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A flood of twice a small volume, the pass interval an hour: each batch that leaves the disk past
    its mark begins a deletion on the writer and wakes the pass, so the disk never fills and the
    reserve is never needed. (The disk was looked at only by the pass: the rows filled it, the
    reserve's room went to the queue, and every write, the deletions' too, failed for good.)"""
    with tmpfs(tmp_path / "vol", "32m") as vol:
        node = run({"TRACE_DISK_RESERVE_BYTES": "512KiB", "TRACE_DISK_HIGH_PCT": "60",
                    "TRACE_CLEANUP_INTERVAL": "1h", "TRACE_METRICS_INTERVAL": "off"}, db=vol / "otrace.db")
        accepted: list[str] = []

        def post() -> bool:
            resp = node.post("/v1/traces", [trace(input_text="x" * 4000) for _ in range(20)])
            accepted.extend(resp.json["trace_ids"] if resp.status == 202 else [])
            return resp.status == 202

        while len(accepted) < 16000:                         # 4 KB each: 64 MB
            wait_until(post, timeout=60, what="the flood's next request taken")
        assert node.logs("retention deleted rows that were never pushed")
        assert not node.logs("disk full: reserve released; ingest paused")
        assert node.stop() == 0                                  # every 202 written
        kept, deleted = traces_kept_and_deleted(vol / "otrace.db")
        assert kept + deleted == len(accepted) and kept > 0


@needs_root
def test_a_volume_unmounted_under_otrace_is_said_while_it_writes_beneath_it(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """The database's volume unmounted (a detached disk): otrace moves its rows into a new file in the
    bare directory beneath, on another disk, and /health says so while it writes there (it said ok)."""
    with tmpfs(tmp_path / "vol", "8m") as vol:
        node = run(db=vol / "otrace.db")
        assert node.post("/v1/traces", trace()).status == 202
        node.wait_persisted(1)
        assert node.health()["status"] == "ok"
        subprocess.run(["umount", "-l", str(vol)], check=True)
        health = wait_until(lambda: (h := node.health())["status"] == "degraded" and h, what="degraded")
        assert any("another filesystem than at start" in p for p in health["problems"])
        assert node.post("/v1/traces", trace()).status == 202
        assert node.stop() == 0


@needs_root
def test_a_cap_that_with_the_reserve_is_over_the_disk_mark_is_warned_about(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """The cap holds the WAL: it is the cap and the reserve that must fit under the disk's mark (the
    WAL's most was once counted a second time)."""
    with tmpfs(tmp_path / "vol", "32m") as vol:                   # its 80 %: 25.6 MiB
        for cap, reserve, warned in (("20MiB", "16MiB", True), ("20MiB", "1MiB", False),
                                     ("24MiB", "1MiB", False)):   # 36, 21 and 25 MiB (with an 8 MiB WAL)
            node = run({"TRACE_DB_MAX_BYTES": cap, "TRACE_WAL_MAX_BYTES": "8MiB",
                        "TRACE_DISK_RESERVE_BYTES": reserve}, db=vol / f"{cap}-{reserve}.db")
            assert node.stop() == 0
            assert bool(node.logs("database cap is over the disk's budget")) == warned, (cap, reserve)


@needs_root
def test_a_reserve_too_big_for_what_retention_frees_lets_ingest_resume_without_it(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """8 MiB on 24 MiB: room for it twice (16 MiB) is more than a disk at retention's low mark has."""
    with tmpfs(tmp_path / "vol", "24m") as vol:
        node = run({"TRACE_DISK_RESERVE_BYTES": "8MiB", "TRACE_BATCH_WINDOW": "200ms"}, db=vol / "o.db")
        filler = fill(vol)
        batch = [trace(input_text="x" * 4000) for _ in range(20)]
        while node.post("/v1/traces", batch).status == 202:
            batch = [trace(input_text="x" * 4000) for _ in range(20)]
        node.wait_log(lambda e: e.get("message") == "disk full: reserve released; ingest paused")
        wait_until(lambda: node.health()["queue_depth"] == 0, what="the queue committed")
        st = os.statvfs(vol)                 # 5.3 MiB free: 78 % used, between retention's two marks
        os.truncate(filler, filler.stat().st_size - max(0, int(5.3 * 2**20) - st.f_bavail * st.f_frsize))
        resumed = node.wait_log(lambda e: e.get("message") == "disk has room again, not for the reserve: "
                                "ingest resumes without it")
        assert resumed["disk_avail_bytes"] < 16 << 20
        assert node.post("/v1/traces", trace()).status == 202 and node.health()["status"] == "ok"
        assert node.stop() == 0


@needs_root
def test_a_reserve_there_was_no_room_for_at_start_is_taken_once_there_is(tmp_path: Path,
                                                                          run: Callable[..., Otrace]) -> None:
    with tmpfs(tmp_path / "vol", "24m") as vol:
        filler = fill(vol)
        os.truncate(filler, filler.stat().st_size - (1 << 20))        # room for the database, not the reserve
        node = run({"TRACE_DISK_RESERVE_BYTES": "2MiB"}, db=vol / "otrace.db")
        node.wait_log(lambda e: e.get("message") == "disk reserve not held: no room for it")
        assert node.post("/v1/traces", trace()).status == 202          # ingest goes on without it
        filler.unlink()
        node.wait_log(lambda e: e.get("message") == "disk reserve held")
        assert (vol / "otrace.db-reserve").stat().st_blocks * 512 >= 2 << 20
        assert node.health()["status"] == "ok"
        node.wait_persisted(1)


@needs_root
def test_a_reserve_removed_under_otrace_with_no_room_to_take_it_again_is_said_not_held(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A full disk whose reserve file was wiped: the room it freed is less than twice its size, so it is
    not taken again; the log says so and why, /health that it is not held (it said "taking it again"
    and then nothing). So too when a write met the full disk first and found the file gone (it said
    nothing, and held it lost for good)."""
    with tmpfs(tmp_path / "vol", "24m") as vol:
        node = run({"TRACE_DISK_RESERVE_BYTES": "2MiB"}, db=vol / "otrace.db")
        assert node.health()["disk_reserve"] == {"bytes": 2 << 20, "held": True, "released": False}
        node.signal(signal.SIGSTOP)                         # a write of its start's must not give it up
        try:
            fill(vol)
            (vol / "otrace.db-reserve").unlink()             # a data directory wiped: 2 MiB free
        finally:
            node.signal(signal.SIGCONT)
        wait_until(lambda: node.post("/v1/traces", trace()).status == 202 and      # the writer looks
                   node.logs("disk reserve not held: no room for it"), timeout=30,   # after a batch
                   what="the reserve looked for")
        said = node.logs("disk reserve not held: no room for it")
        assert len(said) == 1 and said[0]["bytes"] == 2 << 20 and said[0]["disk_avail_bytes"] < 4 << 20
        assert node.logs("disk reserve file gone or emptied: taking it again")
        assert node.health()["disk_reserve"] == {"bytes": 2 << 20, "held": False, "released": False}
        assert node.stop() == 0


def test_a_reserve_found_gone_by_a_write_that_met_the_full_disk_is_said_not_held(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """The reserve's file wiped and the disk filled while otrace was stopped: the next write meets the
    full disk and finds nothing to give. Once there is room for writes, not for the reserve twice, the
    log says it is gone and not held, and /health so (it said nothing, and took it as given up)."""
    with tmpfs(tmp_path / "vol", "24m") as vol:
        node = run({"TRACE_DISK_RESERVE_BYTES": "2MiB"}, db=vol / "otrace.db")
        node.signal(signal.SIGSTOP)
        try:
            (vol / "otrace.db-reserve").unlink()
            filler = fill(vol)
        finally:
            node.signal(signal.SIGCONT)
        wait_until(lambda: node.post("/v1/traces", trace()).status == 503, timeout=30,
                   what="writes failing on the full disk")
        assert not node.logs("disk full: reserve released; ingest paused")
        os.truncate(filler, filler.stat().st_size - (3 << 20))   # room, less than the reserve twice
        wait_until(lambda: node.post("/v1/traces", trace()).status == 202 and node.logs(
            "disk reserve not held: no room for it"), timeout=30, what="the reserve looked for")
        assert node.logs("disk reserve file gone or emptied: taking it again")
        assert node.health()["disk_reserve"] == {"bytes": 2 << 20, "held": False, "released": False}
        assert node.stop() == 0


def test_a_client_refused_while_another_program_locks_the_database_is_told_so(
        run: Callable[..., Otrace]) -> None:
    """A 503 names the lock; the failure's `since` is when the write began waiting for it, which
    SQLite gives up on only after BUSY_TIMEOUT."""
    node = run()
    blocker = sqlite3.connect(node.db_path, isolation_level=None, timeout=10)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        assert node.post("/v1/traces", trace()).status == 202
        refused = wait_until(lambda: (resp := node.post("/v1/traces", trace())).status == 503 and resp,
                             timeout=60, what="writes failing on the lock")
        assert refused.json["error"] == ("database writes are failing (database locked by another "
                                         "program); retry later") and refused.headers["retry-after"] == "5"
        failing = node.health()["last_write_error"]
        assert "SQLITE_BUSY" in failing["error"]
        said = node.wait_log(lambda e: e.get("message") == "database write failing")   # may trail /health
        assert len(node.logs("database write failing")) == 1
        waited = datetime.fromisoformat(said["time"]) - datetime.fromisoformat(failing["since"])
        assert waited.total_seconds() >= otrace.BUSY_TIMEOUT - 1         # SQLite's last sleep may be cut
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_until(lambda: node.post("/v1/traces", trace()).status == 202, timeout=60, what="writes again")
    node.wait_persisted(2)


def serve_fifo(fifo: Path, content: bytes, before: Callable[[], None] = lambda: None,
               timeout: float = 30.0) -> None:
    """Once a reader opens the FIFO (waited for, with a deadline), run `before`, write `content` and
    close: the reader is held in its read until then."""
    def opened() -> int | None:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:                  # ENXIO: no reader yet
                raise
            return None
    fd = wait_until(opened, timeout, f"a reader of {fifo}")
    try:
        before()
        os.set_blocking(fd, True)
        with os.fdopen(fd, "wb", closefd=False) as pipe:
            pipe.write(content)
    finally:
        os.close(fd)


def lock_out_readers(db: Path | str) -> sqlite3.Connection:
    """Another program's connection holding the database file's lock until it closes: in WAL mode with
    locking_mode EXCLUSIVE, otrace cannot even read it (SQLITE_BUSY after its busy timeout)."""
    holder = sqlite3.connect(db, isolation_level=None, timeout=10)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("COMMIT")
    return holder


def test_a_lock_met_by_the_writers_first_connection_is_failing_since_that_attempt_began(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """Another program locks the database just after otrace opened it at its start, before the writer
    opens its own connection: that connection waits BUSY_TIMEOUT for the lock and fails, and the
    failure's `since` is when it began waiting, not when it gave up. TRACE_PRICES is a FIFO so that
    the lock is taken at that very moment: otrace reads the price file once to check the setting, and
    once more after the start's own work on the database, before its threads start."""
    prices = tmp_path / "prices.fifo"
    os.mkfifo(prices)
    table = otrace.PRICES_FILE.read_bytes()
    node = run({"TRACE_PRICES": str(prices)}, wait=False)
    serve_fifo(prices, table)                            # the setting's check, which ends before
    node.wait_log(lambda e: e.get("message") == "starting")    # this line: its reader has closed
    holders: list[sqlite3.Connection] = []
    began = 0.0

    def lock() -> None:
        nonlocal began
        holders.append(lock_out_readers(node.db_path))
        began = time.time()

    try:
        serve_fifo(prices, table, before=lock)           # Service(): the database is ready, no thread yet
        said = node.wait_log(lambda e: e.get("message") == "database write failing", timeout=60)
        assert "SQLITE_BUSY" in said["error"]
        listening = node.wait_log(lambda e: e.get("message") == "listening")
        node.port = int(listening["address"].rsplit(":", 1)[1])
        # /health counts unpushed rows through a read that waits out the lock too (then says null)
        failing = node.request("GET", "/health", timeout=60).json["last_write_error"]
        since = datetime.fromisoformat(failing["since"])
        assert since.timestamp() >= began - 0.001             # its attempt began once the lock was held
        waited = datetime.fromisoformat(said["time"]) - since
        assert waited.total_seconds() >= otrace.BUSY_TIMEOUT - 1         # SQLite's last sleep may be cut
    finally:
        for holder in holders:
            holder.close()
    node.wait_log(lambda e: e.get("message") == "database write recovered", timeout=60)
    assert node.post("/v1/traces", trace()).status == 202
    node.wait_persisted(1)
    assert node.stop() == 0


def test_a_lock_met_moving_to_a_new_database_file_is_failing_since_that_attempt_began(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """The database file is replaced by another program's new, empty one, which it holds locked: the
    writer's move to it waits BUSY_TIMEOUT for the lock and fails, and the failure is timed from when
    that attempt began, not from when it gave up (the recovery's failed_seconds says so)."""
    node = run()
    assert node.post("/v1/traces", trace()).status == 202
    node.wait_persisted(1)
    theirs = tmp_path / "theirs.db"
    theirs.touch()
    holder = sqlite3.connect(theirs, isolation_level=None, timeout=10)
    try:
        holder.execute("BEGIN EXCLUSIVE")           # an empty file, in rollback mode: no reader gets in
        replaced = time.time()
        theirs.replace(node.db_path)
        assert node.post("/v1/traces", trace()).status == 202     # written to the old file; then a look
        said = node.wait_log(lambda e: e.get("message") == "moving to a new database file failing",
                             timeout=60)
        assert "SQLITE_BUSY" in said["error"]
    finally:
        holder.close()
    recovered = node.wait_log(lambda e: e.get("message") == "moving to a new database file recovered",
                              timeout=60)
    since = datetime.fromisoformat(recovered["time"]).timestamp() - recovered["failed_seconds"]
    gave_up = datetime.fromisoformat(said["time"]).timestamp()
    assert replaced - 0.01 <= since <= gave_up - (otrace.BUSY_TIMEOUT - 1)    # from before the wait
    node.wait_log(lambda e: e.get("message") == "database file recreated; unpushed rows carried over")
    wait_until(lambda: node.post("/v1/traces", trace()).status == 202, timeout=30, what="writes again")
    node.wait_persisted(3)
    assert node.stop() == 0


def test_health_answers_while_the_writer_is_blocked(run: Callable[..., Otrace]) -> None:
    node = run()
    blocker = sqlite3.connect(node.db_path, isolation_level=None, timeout=10)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        assert node.post("/v1/traces", trace()).status == 202
        resp = node.request("GET", "/health", timeout=30)     # the writer is stuck in its busy wait
        assert resp.status == 200 and resp.json["queue_depth"] == 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    node.wait_persisted(1)


def test_database_from_every_older_schema_migrates_keeping_rows(tmp_path: Path,
                                                                run: Callable[..., Otrace]) -> None:
    for version in range(1, len(otrace.SCHEMA)):
        db = tmp_path / f"v{version}.db"
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            for step in otrace.SCHEMA[:version]:
                conn.executescript(step)
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("INSERT INTO llm_traces (trace_id, created_at, received_at, source, provider, "
                         "model, status, truncated) VALUES ('kept', 1, 1, 'http', 'p', 'm', 'ok', 0)")
        node = run(db=db)
        assert node.query("PRAGMA user_version") == [(len(otrace.SCHEMA),)]
        assert node.query("SELECT trace_id FROM llm_traces") == [("kept",)]
        assert node.logs("schema migrated")[-1]["version"] == len(otrace.SCHEMA)
        assert node.stop() == 0


def test_a_runs_failed_attempts_are_counted_from_an_index_alone(tmp_path: Path) -> None:
    """The count of a run's failed attempts by outcome, run for each failure the log ends a run with,
    reads openclaw_attempts' (run_id, outcome) index and no row: a run repeated through a log was a
    row read for each attempt before it, at each count."""
    db = tmp_path / "o.db"
    otrace.open_database(str(db))
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for sql, params in ((otrace.COUNT_ON_ROW_SQL, ("run", "row")), (otrace.COUNT_ON_STORE_SQL, ("run",))):
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
            reads = [step for step in plan if "openclaw_attempts" in step]
            assert len(reads) == 2 and all("COVERING INDEX openclaw_attempts_run_outcome" in step
                                           for step in reads), plan
        assert [name for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'index' AND "
                                                 "tbl_name = 'openclaw_attempts' AND sql IS NOT NULL")] == [
            "openclaw_attempts_run_outcome"]


def test_database_wal_and_shm_are_private_even_under_umask_0(run: Callable[..., Otrace]) -> None:
    old = os.umask(0)                          # otrace must not rely on the umask it is given
    try:
        node = run()
    finally:
        os.umask(old)
    assert node.post("/v1/traces", trace()).status == 202
    node.wait_persisted(1)
    files = [Path(f"{node.db_path}{suffix}") for suffix in ("", "-wal", "-shm")]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o600" for f in files}


# ------------------------------------------------------------------------------------------- ingest


def test_request_heads_are_parsed_or_refused_in_process() -> None:
    head = b"POST /v1/traces?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\nCONNECTION: close\r\n\r\n"
    request = otrace.parse_head(head, complete=True)
    assert (request.method, request.route, request.length, request.chunked, request.close) == (
        "POST", "/v1/traces", 12, False, True)
    for raw, status in ((b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
                        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
                        (b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
                        (b"GET / HTTP/1.1\r\n Folded: x\r\n\r\n", 400), (b"get me\r\n\r\n", 400)):
        with pytest.raises(otrace.Refusal) as refused:
            otrace.parse_head(raw, complete=True)
        assert refused.value.status == status, raw
    with pytest.raises(otrace.Refusal, match=r"^Transfer-Encoding on HTTP/1\.0 is not supported"):
        otrace.parse_head(b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", complete=True)


def test_chunked_bodies_decode_in_pieces_of_any_size_in_process() -> None:
    body = json.dumps([trace() for _ in range(5)]).encode()
    wire = chunked(body, 13)[:-2] + b"X-Checksum: 1\r\n\r\n"
    for step in (1, 2, 7, len(wire)):                     # however the bytes arrive
        raw, out, state, done = bytearray(), bytearray(), [-1, 0], None
        for start in range(0, len(wire), step):
            raw += wire[start:start + step]
            done = otrace.decode_chunked(raw, out, 10_000, state)
        assert done == len(body) and bytes(out) == body and raw == b""
    with pytest.raises(otrace.Refusal) as big:
        otrace.decode_chunked(bytearray(chunked(body)), bytearray(), 100, [-1, 0])
    assert big.value.status == 413
    for wire, said in ((b"f" * 5000, "a chunk size line is too long"),
                       (b"0\r\n" + b"X-Long: " + b"a" * 5000, "a chunked trailer line is too long")):
        with pytest.raises(otrace.Refusal, match=said):
            otrace.decode_chunked(bytearray(wire), bytearray(), 10_000, [-1, 0])
    endless = bytearray(chunked(body)[:-2] + b"X-Padding: 0123456789\r\n" * 4000)   # trailers never end
    with pytest.raises(otrace.Refusal) as trailers:
        otrace.decode_chunked(endless, bytearray(), 10_000, [-1, 0])
    assert trailers.value.status == 431


@pytest.mark.parametrize(("length", "status"), [("\u00b2", 400), ("1\u00b9", 400), ("-1", 400), ("1e3", 400),
                                               ("0x10", 400), ("9" * 19, 413), ("9" * 4301, 413)])
def test_a_content_length_that_is_not_ascii_digits_is_400_and_one_past_any_body_413(
        svc: Otrace, length: str, status: int) -> None:
    with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{{}}"
                     .encode("latin-1"))                 # \xb2, as a client would send it
        answered, error = answer_of(read_to_end(sock))
    assert answered == status and "Content-Length" in error["error"]
    assert svc.health()["status"] == "ok" and svc.stderr == []


def chunked(body: bytes, size: int = 7) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


def test_chunked_bodies_are_decoded_within_the_body_limit(run: Callable[..., Otrace]) -> None:
    node = run({"TRACE_MAX_BODY_BYTES": "1KiB"})
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    conn.request("POST", "/v1/traces", body=iter([json.dumps(trace(model="chunked")).encode()]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 202, resp.read()
    resp.read()
    conn.close()
    head = b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    for body, status, needle in (
            (chunked(json.dumps([trace()] * 20).encode())[:-2] + b"X-Sum: 1\r\n\r\n", 413, "1024"),
            (b"zz\r\nab\r\n0\r\n\r\n", 400, "hexadecimal"),
            (b"1" + b"0" * 16 + b"\r\nab\r\n0\r\n\r\n", 413, "1024"),
            (b"2\r\nabXX0\r\n\r\n", 400, "CRLF")):
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
            sock.sendall(head + body)
            code, error = answer_of(read_to_end(sock))
        assert code == status and needle in error["error"], error
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:    # trailers, then more
        sock.sendall(head + chunked(json.dumps(trace()).encode())[:-2] + b"X-Sum: 1\r\n\r\n" +
                     b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = read_to_end(sock)
    assert answers.count(b"HTTP/1.1 202 ") == 1 and answers.count(b"HTTP/1.1 200 ") == 1
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:    # sizes zero-padded
        sock.sendall(head + b"".join(b"%016x\r\n%s\r\n" % (len(part), part) for part in (
            json.dumps(trace()).encode(), b"")))
        sock.shutdown(socket.SHUT_WR)                      # the answer, then the close: no keep-alive wait
        assert answer_of(read_to_end(sock))[0] == 202
    node.wait_persisted(3)
    assert node.query("SELECT count(*) FROM llm_traces") == [(3,)]


@pytest.mark.parametrize("smuggler", [
    "GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n{hidden}",
    "HEAD /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n{hidden}",
    "GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunked}",
    "POST /v1/errors HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
    "{chunked}",
    "POST /v1/errors HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n{chunked}",
], ids=["GET-with-length", "HEAD-with-length", "GET-chunked", "length-and-chunked", "unknown-coding"])
def test_a_request_hidden_in_a_body_is_never_acted_on(svc: Otrace, smuggler: str) -> None:
    """A body is read (or the request refused) on every method; its bytes are never parsed as a
    request of their own."""
    hidden = (request_head(len(SMALL_EVENT)) + SMALL_EVENT).decode()
    raw = smuggler.format(n=len(hidden), hidden=hidden, chunked=chunked(hidden.encode()).decode())
    with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as sock:
        sock.sendall(raw.encode())
        answers = read_to_end(sock)
    assert answers.count(b"HTTP/1.1 ") == 1, answers
    assert b"HTTP/1.1 202" not in answers
    assert svc.health()["events_received"] == 0


def test_bodies_held_across_connections_stay_within_their_budget(run: Callable[..., Otrace]) -> None:
    """With TRACE_MAX_BUFFERED_BYTES at 256 KiB, two slow 100 KB bodies fit and a third is answered 503
    before a byte of it is read; once they are done there is room again."""
    node = run({"TRACE_MAX_BUFFERED_BYTES": "256KiB", "TRACE_MAX_BODY_BYTES": "128KiB",
                "TRACE_READ_TIMEOUT": "1h"})
    body = json.dumps(trace()).encode()
    body += b" " * (100_000 - len(body))
    slow = [socket.create_connection(("127.0.0.1", node.port), timeout=10) for _ in range(2)]
    for sock in slow:
        sock.sendall(request_head(len(body)) + body[:10])
    wait_until(lambda: node.health()["connections_open"] == 3, what="two bodies under way (and /health)")
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as third:
        third.sendall(request_head(len(body)))
        status, error = answer_of(read_to_end(third))
    assert status == 503 and "TRACE_MAX_BUFFERED_BYTES" in error["error"]
    for sock in slow:
        sock.sendall(body[10:])
        assert answer_of(sock.recv(65536))[0] == 202
        sock.close()
    assert node.post("/v1/traces", body).status == 202
    assert node.health()["bodies_refused"] == 1                    # seen: counted and said
    assert "\notrace_bodies_refused_total 1\n" in node.request("GET", "/metrics").body.decode()
    said = node.wait_log(lambda e: e.get("message") == "request refused")
    assert said["status"] == 503 and "TRACE_MAX_BUFFERED_BYTES" in said["error"]


def test_a_client_still_sending_a_refused_body_reads_the_answer(run: Callable[..., Otrace]) -> None:
    """Refused before its body is read (no room among the bodies in flight, no token), a request whose
    client goes on sending the body, as an HTTP client does before it reads, gets its answer, not a
    broken pipe: otrace reads and drops the rest before it hangs up. The body is larger than what
    loopback's buffers hold."""
    token = f"tok-{uuid.uuid4().hex}"
    node = run({"TRACE_MAX_BUFFERED_BYTES": "8MiB", "TRACE_MAX_BODY_BYTES": "8MiB",
                "TRACE_INGEST_TOKEN": token, "TRACE_READ_TIMEOUT": "1h"})
    body = json.dumps([trace(input_text="x" * 60_000) for _ in range(100)]).encode()    # 6 MB
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as holder:      # 5 MB in flight
        holder.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Authorization: Bearer %s\r\nContent-Length: 5000000\r\n\r\n[" % token.encode())
        wait_until(lambda: node.health()["connections_open"] == 2, what="the body under way (and /health)")
        for auth, status in ((token, 503), ("wrong", 401)):
            client = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
            client.request("POST", "/v1/traces", body, headers={"Content-Type": "application/json",
                                                                "Authorization": f"Bearer {auth}"})
            answer = client.getresponse()
            assert (answer.status, answer.getheader("connection")) == (status, "close")
            assert json.loads(answer.read())["error"]
            client.close()
    # chunked, 8 bytes a chunk: 13 MB on the wire for 8 MB of body, the size lines on top
    chunked = re.sub(rb"(?s)(.{8})", rb"8\r\n\1\r\n", b"x" * 8_000_000) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nAuthorization: Bearer wrong\r\n\r\n" + chunked)
        assert read_to_end(sock).startswith(b"HTTP/1.1 401 ")
    assert node.post("/v1/traces", trace(), headers={"Authorization": f"Bearer {token}"}).status == 202


def test_http_errors(run: Callable[..., Otrace]) -> None:
    node = run({"TRACE_MAX_BODY_BYTES": "1KiB", "TRACE_MAX_EVENTS": "3"})
    assert node.request("GET", "/nope").status == 404
    wrong = node.request("GET", "/v1/traces")
    assert wrong.status == 405 and wrong.headers["allow"] == "POST"
    assert node.request("DELETE", "/health").headers["allow"] == "GET, HEAD"
    assert node.request("BREW", "/v1/traces").status == 405           # any method, never a 501
    assert node.post("/v1/traces", b"{}", headers={"Content-Type": "text/plain"}).status == 415
    assert node.post("/v1/traces", trace(), headers={"Content-Type": "application/json; charset=utf-8"}) \
        .status == 202
    assert node.post("/v1/traces", [trace()] * 4).status == 413
    big = node.post("/v1/traces", json.dumps(trace(input_text="x" * 2000)))
    assert big.status == 413 and "TRACE_MAX_BODY_BYTES" in big.json["error"]
    assert big.headers["connection"] == "close"


def test_missing_content_length_is_411_and_huge_one_is_not_read(svc: Otrace) -> None:
    with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 411 ")
    with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as sock:
        # announces 10 GB and sends none of it: answered at once, connection closed
        sock.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 413 ")


def test_bad_request_lines_get_4xx_json_not_5xx(svc: Otrace) -> None:
    for raw in (b"GET /health HTTP/2.0\r\n\r\n", b"garbage\r\n\r\n", b"GET /health HTTP/1.1\r\n" +
                b"X: y\r\n" * 200 + b"\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as sock:
            sock.sendall(raw)
            answer = sock.recv(65536)
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, answer[:100]
        assert b"application/json" in answer
    assert svc.health()["status"] == "ok"


def test_keep_alive_answers_in_one_piece(svc: Otrace) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=30)
    for _ in range(50):
        resp = svc.post("/v1/traces", trace(), conn=conn)
        assert resp.status == 202
        assert "connection" not in resp.headers
    sock = conn.sock
    assert sock is not None
    conn.close()
    svc.wait_persisted(50)
    # one write per response: headers and body arrive in the same segment on loopback
    with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = raw.recv(65536)
        head, _, body = first.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        assert len(body) == length


def test_http_1_0_client_is_answered(svc: Otrace) -> None:
    with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"status": "ok"' in answer


def test_request_headers_are_read_as_http_1_1_says(svc: Otrace) -> None:
    """otrace reads the request headers itself: names in any case, HTTP/1.0 keep-alive, 100-continue,
    an absolute-form target, and a 4xx naming what it cannot trust (two lengths, a line without a colon,
    a folded line), quoting a line without its CR."""
    def exchange(raw: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            return read_to_end(sock)

    event = b'{"provider":"p","model":"m"}'
    head = b"POST /v1/traces HTTP/1.%d\r\ncontent-TYPE: application/json\r\nCONTENT-length: 28\r\n"
    assert exchange(head % 1 + b"\r\n" + event).startswith(b"HTTP/1.1 202 ")
    kept = exchange((head % 0 + b"Connection: Keep-Alive\r\n\r\n" + event) * 2)
    assert kept.count(b"HTTP/1.1 202 ") == 2, kept
    closed = exchange((head % 0 + b"\r\n" + event) * 2)
    assert closed.count(b"HTTP/1.1 202 ") == 1 and b"Connection: close" in closed, closed
    listed = exchange((head % 1 + b"Connection: keep-alive, close\r\n\r\n" + event) * 2)   # options
    assert listed.count(b"HTTP/1.1 202 ") == 1 and b"Connection: close" in listed, listed
    assert exchange(head % 0 + b"Expect: 100-continue\r\n\r\n" + event).startswith(b"HTTP/1.1 202 ")  # 1.0
    stray = exchange(b"\r\n" + head % 1 + b"\r\n" + event + b"\r\n\n" + head % 1 + b"\r\n" + event)
    assert stray.count(b"HTTP/1.1 202 ") == 2, stray        # empty lines before a request: RFC 9112 2.2
    padded = head.replace(b"28", b"00000000000000000000028")
    assert exchange(padded % 1 + b"\r\n" + event).startswith(b"HTTP/1.1 202 ")
    for extra, needle in ((b"Content-Length: 29\r\n", "conflicting content-length"),
                          (b"Bogus header line\r\n", "bad header line"),
                          (b"X-Folded: a\r\n b\r\n", "bad header line")):
        status, error = answer_of(exchange(head % 1 + extra + b"\r\n" + event))
        assert status == 400 and needle in error["error"] and "\\r" not in error["error"], (extra, error)
    status, error = answer_of(exchange(b"GET /health HTTP/2.0\r\n\r\n"))
    assert status == 400 and error["error"] == "not an HTTP/1.1 request line: 'GET /health HTTP/2.0'"
    absolute = b"POST http://127.0.0.1:%d/v1/traces HTTP/1.1\r\nContent-Length: 28\r\n\r\n" % svc.port
    assert exchange(absolute + event).startswith(b"HTTP/1.1 202 ")        # RFC 9112 3.2.2: taken too
    over = b"X-Big: " + b"a" * 70_000 + b"\r\n"                  # over 64 KiB, however it is read
    assert answer_of(exchange(head % 1 + over + b"\r\n" + event))[0] == 431
    assert answer_of(exchange(b"POST /v1/traces?" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n"))[0] == 414
    with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as sock:
        sock.sendall(head % 1 + b"Expect: 100-continue\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(event)
        assert sock.recv(4096).startswith(b"HTTP/1.1 202 ")
    svc.wait_persisted(11)
    assert svc.health()["events_received"] == 11


def test_openssl_stays_out_of_memory_without_push_or_token(svc: Otrace) -> None:
    """urllib3, hashlib and hmac are imported where first needed and ssl is kept out of http.server's
    import, so a sidecar that neither pushes nor checks a token does not map OpenSSL (about 4 MiB)."""
    assert svc.post("/v1/traces", trace()).status == 202
    svc.wait_persisted(1)
    maps = Path(f"/proc/{svc.proc.pid}/maps").read_text()
    assert "libssl" not in maps and "libcrypto" not in maps


def test_argparse_and_difflib_stay_out_of_a_start_without_arguments_or_misspellings() -> None:
    """Imported where needed: argparse for arguments, difflib for a misspelled setting (0.5 MiB)."""
    code = ("import sys; import otrace; otrace.unknown_settings({'TRACE_PORT': '1'}); "
            "print(sorted({'argparse', 'difflib'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=HERE)
    assert out.stdout.strip() == "[]"


def test_token_is_required_when_set(run: Callable[..., Otrace]) -> None:
    node = run({"TRACE_INGEST_TOKEN": "tok-123"})
    assert node.post("/v1/traces", trace()).status == 401
    wrong = node.post("/v1/traces", trace(), headers={"Authorization": "Bearer tok-124"})
    assert wrong.status == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert node.post("/v1/errors", {"error_type": "crash", "message": "m"},
                     headers={"Authorization": "Basic tok-123"}).status == 401
    assert node.post("/v1/traces", trace(), headers={"Authorization": "Bearer tok-123"}).status == 202
    assert node.request("GET", "/health").status == 200     # health stays open for probes
    node.wait_persisted(1)


def test_slow_client_is_cut_off_and_others_are_served(run: Callable[..., Otrace]) -> None:
    node = run({"TRACE_READ_TIMEOUT": "500ms"})
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as slow:
        slow.sendall(b"POST /v1/traces HTTP/1.1\r\n")
        assert node.post("/v1/traces", trace()).status == 202     # not blocked by the slow one
        slow.sendall(b"Host: x\r\n")                               # keeps trickling
        status, error = answer_of(read_to_end(slow))               # told, and closed, at its deadline
        assert status == 408 and "TRACE_READ_TIMEOUT (0.5 s)" in error["error"]
    said = node.wait_log(lambda e: e.get("message") == "request refused")
    assert (said["status"], said["route"], said["error"]) == (408, "other", "Request Timeout")
    node.wait_persisted(1)


def test_a_slow_body_holds_no_one_up_and_is_answered_once_whole(svc: Otrace) -> None:
    event = json.dumps(trace()).encode()
    with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as slow:
        slow.sendall(request_head(len(event)) + event[:10])
        assert svc.post("/v1/traces", trace()).status == 202       # served while the body trickles
        slow.sendall(event[10:])
        status, answer = answer_of(slow.recv(65536))
        assert status == 202 and answer["accepted"] == 1
    svc.wait_persisted(2)


def test_a_client_that_does_not_read_its_answers_holds_no_one_up(svc: Otrace) -> None:
    """Requests sent ahead are answered in order; answers a client does not take wait for it, and
    otrace reads nothing more from it meanwhile, while it serves everyone else."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    payload = memoryview(request * 20_000)
    with socket.socket() as greedy:
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        greedy.connect(("127.0.0.1", svc.port))
        greedy.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < len(payload):
                sent += greedy.send(payload[sent:sent + 65536])
        assert sent < len(payload), "otrace should stop reading from a client that takes no answers"
        assert svc.post("/v1/traces", trace()).status == 202      # everyone else is served meanwhile
        whole = -(-sent // len(request))
        answers = bytearray()

        def last_answer_whole() -> bool:
            start = answers.rfind(b"HTTP/1.1 ")
            if (end := answers.find(b"\r\n\r\n", start)) < 0:
                return False
            length = re.search(rb"\r\nContent-Length: (\d+)", answers[start:end])
            return length is not None and len(answers) >= end + 4 + int(length[1])

        def take_answers() -> None:              # until the last answer's body is in, not just its start
            while not (answers.count(b"HTTP/1.1 ") >= whole and last_answer_whole()) \
                    and (chunk := greedy.recv(65536)):
                answers.extend(chunk)

        greedy.settimeout(10)
        reader = threading.Thread(target=take_answers)
        reader.start()
        greedy.sendall(payload[sent:whole * len(request)])          # the last request, made whole
        reader.join(30)
        assert answers.count(b"HTTP/1.1 200 OK") == whole
    svc.wait_persisted(1)


def test_connection_limit_answers_503(run: Callable[..., Otrace]) -> None:
    node = run({"TRACE_MAX_CONNECTIONS": "2"})
    held = [socket.create_connection(("127.0.0.1", node.port), timeout=30)
            for _ in range(2 + otrace.PROBE_RESERVE)]
    try:
        # the server accepts in arrival order, so the held connections hold both slots and the reserve,
        # each busy with a request begun (an idle one in the reserve gives way to a newcomer)
        for sock in held:
            begun(sock)
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as extra:
            answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in answer
        for _ in range(40):                 # a client that sends its request at once still reads the
            with socket.create_connection(("127.0.0.1", node.port), timeout=30) as eager:   # 503, no reset
                eager.sendall(request_head(len(SMALL_EVENT)) + SMALL_EVENT)
                assert read_to_end(eager).startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: node.request("GET", "/health").status == 200, what="slots free again")


def test_probes_are_answered_over_the_connection_limit(run: Callable[..., Otrace]) -> None:
    """Clients holding every connection do not get a busy otrace restarted by its liveness probe: a
    reserve of connections over TRACE_MAX_CONNECTIONS serves GET and HEAD on /health and /metrics, and
    refuses anything else as over the limit, for as long as the connection lasts; past a reserve busy
    with requests, every connection is refused as before."""
    node = run({"TRACE_MAX_CONNECTIONS": "2"})
    # the server accepts in arrival order, so the two held connections hold both slots
    held = [socket.create_connection(("127.0.0.1", node.port), timeout=30) for _ in range(2)]
    probe = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    probes: list[http.client.HTTPConnection] = []
    try:
        assert node.request("GET", "/health", conn=probe).status == 200      # over the limit
        head = node.request("HEAD", "/metrics", conn=probe)                  # kept alive
        assert (head.status, head.body) == (200, b"")
        assert node.request("GET", "/metrics", conn=probe).status == 200
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as eager:   # a reserve one
            body = b"x" * (256 << 10)               # still being sent when refused: read and dropped
            eager.sendall(request_head(len(body)) + body)
            refused = read_to_end(eager)
        status, error = answer_of(refused)
        assert (status, error["error"]) == (503, "too many connections; retry later")
        assert b"\r\nRetry-After: 1\r\n" in refused and b"\r\nConnection: close\r\n" in refused
        probe.sock.sendall(request_head(len(SMALL_EVENT)) + SMALL_EVENT)     # its probes answered,
        refused = read_to_end(probe.sock)                                    # the probe posts
        assert answer_of(refused) == (503, {"error": "too many connections; retry later", "field": None})
        assert b"\r\nRetry-After: 1\r\n" in refused
        probe.close()                               # the server hung up (read to its end): reserve free
        for _ in range(otrace.PROBE_RESERVE):
            probes.append(http.client.HTTPConnection("127.0.0.1", node.port, timeout=30))
            assert node.request("GET", "/health", conn=probes[-1]).status == 200
            begun(probes[-1].sock)                  # its next request begun: busy, it keeps its place
        for request in (b"", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"):   # past the reserve
            with socket.create_connection(("127.0.0.1", node.port), timeout=30) as extra:
                extra.sendall(request)
                assert read_to_end(extra) == otrace.TOO_MANY_CONNECTIONS
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as late:   # a body sent apart
            late.sendall(request_head(len(SMALL_EVENT)))       # from its head, after the answer came:
            assert readable(late, 30)                           # read and dropped, where a socket closed
            late.sendall(SMALL_EVENT)                           # would answer it with a reset
            late.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := late.recv(65536):                    # a reset raises
                answer += chunk
            assert answer == otrace.TOO_MANY_CONNECTIONS
        probes[0].sock.sendall(b"\r\n")            # its GET /metrics ended
        scrape = http.client.HTTPResponse(probes[0].sock)
        scrape.begin()
        assert "\notrace_connections_refused_total 5\n" in scrape.read().decode()
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: node.request("GET", "/health").json["connections_open"] == otrace.PROBE_RESERVE + 1,
               what="the held connections closed")      # the reserve, and this request's own
    assert node.post("/v1/traces", trace()).status == 202          # a slot is free: a new client's
    probes[1].sock.sendall(b"\r\n" + request_head(len(SMALL_EVENT)) + SMALL_EVENT)   # a reserve one's
    answers = read_to_end(probes[1].sock)                                          # is not
    assert answers.startswith(b"HTTP/1.1 200 ")                   # its GET, then the POST refused
    assert answer_of(answers[answers.rindex(b"HTTP/1.1 "):])[0] == 503
    for conn in probes:
        conn.close()


def test_connections_that_send_nothing_do_not_keep_a_probe_out(run: Callable[..., Otrace]) -> None:
    """With every connection and the probes' reserve held by clients that send nothing, a probe takes
    the place of the oldest of them; a request with a body is no probe."""
    node = run({"TRACE_MAX_CONNECTIONS": "2"})
    # the server accepts in arrival order: two slots, then the reserve, then the probe
    held = [socket.create_connection(("127.0.0.1", node.port), timeout=30) for _ in range(2)]
    silent = [socket.create_connection(("127.0.0.1", node.port), timeout=30)
              for _ in range(otrace.PROBE_RESERVE)]
    probe = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    try:
        assert node.request("GET", "/health", conn=probe).status == 200
        assert silent[0].recv(1) == b""                     # the oldest silent one was hung up on
        assert node.request("GET", "/health", conn=probe).json["connections_open"] == 2 + otrace.PROBE_RESERVE
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sending:
            sending.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            assert answer_of(read_to_end(sending)) == (503, {"error": "too many connections; retry later",
                                                             "field": None})
        assert silent[1].recv(1) == b""                     # its place was taken in turn
        assert node.request("GET", "/health", conn=probe).json["connections_refused"] == 3   # and counted
    finally:
        probe.close()
        for sock in held + silent:
            sock.close()


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs prlimit (util-linux)")
def test_no_descriptor_left_for_a_connection_is_logged_once_and_passes(svc: Otrace) -> None:
    """Out of file descriptors, a new client waits in the listen backlog; otrace says so once, goes
    on serving the connections it has, and takes the waiting one once descriptors are free."""
    kept = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=30)
    assert svc.request("GET", "/health", conn=kept).status == 200
    pid = svc.proc.pid
    in_use = {int(fd.name) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    # a new descriptor takes the lowest free number, a closed one's if any: a limit of the count of
    # those open would leave it, and the accept after the client's took the last one would fail
    lowest_free = min(set(range(len(in_use) + 1)) - in_use)
    soft = Path(f"/proc/{pid}/limits").read_text().split("Max open files")[1].split()[0]
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={lowest_free}:"], check=True)   # the soft limit
    with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as waiting:
        svc.wait_log(lambda e: e.get("message") == "accepting connections failing")
        health = svc.request("GET", "/health", conn=kept)              # the open ones are served
        assert health.status == 503 and health.json["problems"][0].startswith(
            "accepting connections failing (OSError: [Errno 24] Too many open files)")
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:"], check=True)
        waiting.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert waiting.recv(65536).startswith(b"HTTP/1.1 200 ")
    # a descriptor otrace held for a moment as the limit came down may have let the waiting client in
    # then (recovered), and failed the accept after it (failing again): the next client's accept is
    # the one that says recovered. Each episode is one line each way, never one per retry.
    assert svc.request("GET", "/health").status == 200

    def said(what: str) -> int:
        return len(svc.logs(f"accepting connections {what}"))

    wait_until(lambda: said("recovered") == said("failing"), what="each failing episode said recovered")
    assert 1 <= said("failing") <= 2
    kept.close()


def with_a_bug(method: str, message: str) -> list[str]:
    """A command serving otrace whose `method` ("Class.name") raises `message` while the file named
    by BUG_MARK exists."""
    owner, name = method.split(".")
    return [sys.executable, "-c", f"""
import os, sys, otrace
real = otrace.{owner}.{name}
def with_a_bug(self, *args, **kwargs):
    if os.path.exists(os.environ["BUG_MARK"]):
        raise RuntimeError({message!r})
    return real(self, *args, **kwargs)
otrace.{owner}.{name} = with_a_bug
sys.exit(otrace.main(["serve"]))
"""]


def test_the_http_thread_ended_by_a_bug_stops_otrace_with_exit_1(run: Callable[..., Otrace],
                                                                   tmp_path: Path) -> None:
    """A bug in the HTTP thread's own loop leaves nothing served: otrace says so, writes what it
    accepted, and exits 1, for its supervisor to start it again, rather than stay up deaf."""
    mark = tmp_path / "bug"
    node = run({"BUG_MARK": str(mark)},            # the HTTP thread's own upkeep, outside any request
               command=with_a_bug("RefusalLog.flush", "a bug in the http loop"))
    ids = post_some(node, 3)
    mark.touch()
    kept = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    with contextlib.suppress(OSError):                   # its answer, or the hang-up of a failed server
        node.request("GET", "/health", conn=kept)
    assert node.exited(60) == 1                          # (a connection open brings the loop round)
    kept.close()
    failed = node.logs("http server failed: otrace stops")
    assert len(failed) == 1 and "a bug in the http loop" in failed[0]["exc_info"]
    assert node.logs("shutting down")[0]["signal"] == "none: the http server failed"
    assert node.logs("stopped")[0]["events_lost"] == 0
    assert len(synced(node)) == len(ids)


def test_a_bug_in_taking_clients_rests_the_listener_and_is_logged_once(run: Callable[..., Otrace],
                                                                       tmp_path: Path) -> None:
    """A bug that fails every accept left the listener ready at each poll: the HTTP thread spun on it,
    logging a traceback each time (millions a minute). The listener rests as on EMFILE: one traceback,
    the fault said once, and the client waiting in the backlog is served once the fault ends."""
    mark = tmp_path / "bug"
    node = run({"BUG_MARK": str(mark)},            # before a client is taken: it stays in the backlog
               command=with_a_bug("IngestServer.accept", "a bug in accept"))
    mark.touch()
    waiting = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    waiting.request("GET", "/health")                     # in the backlog while accept fails
    node.wait_log(lambda e: e.get("message") == "accepting connections failing", timeout=60)
    mark.unlink()
    assert waiting.getresponse().status == 200
    waiting.close()
    recovered = node.wait_log(lambda e: e.get("message") == "accepting connections recovered", timeout=60)
    assert recovered["failed_attempts"] >= 1
    failed = node.logs("accepting connections failed")
    assert len(failed) == 1 and "a bug in accept" in failed[0]["exc_info"]
    assert not node.logs("request failed") and len(node.logs("accepting connections failing")) == 1


def big_body_refused_unread(node: Otrace) -> None:
    body = b"x" * (10 << 20)
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
        sock.sendall(request_head(len(body)) + body[:64 << 10])
        status, error = answer_of(sock.recv(65536))           # answered before the other 9.9 MB are sent
        assert status == 413 and "TRACE_MAX_BODY_BYTES" in error["error"]
        with pytest.raises((BrokenPipeError, ConnectionResetError)):   # and hung up rather than read them
            sock.sendall(body[64 << 10:])


SMALL_EVENT = b'{"provider":"p","model":"m"}'


FOREVER = {"TRACE_READ_TIMEOUT": "1h"}     # no client here comes near it


def slow_body_in_time(node: Otrace) -> None:
    """28 bytes at one per 50 ms: slow, and inside TRACE_READ_TIMEOUT."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request_head(len(SMALL_EVENT)))
        for byte in SMALL_EVENT:
            sock.sendall(bytes([byte]))
            time.sleep(0.05)                                   # the client's own pace, not a wait
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 202
        trace_id = json.loads(resp.read())["trace_ids"][0]
    node.wait_persisted(1)
    assert node.query("SELECT provider, model FROM llm_traces WHERE trace_id = ?", trace_id) == [("p", "m")]


def slow_body_too_slow(node: Otrace) -> None:
    """One byte per 100 ms with TRACE_READ_TIMEOUT=1s: cut off at the deadline, not served, not kept."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
        connected = time.monotonic()
        sock.sendall(request_head(len(SMALL_EVENT)))
        answer = None
        for byte in SMALL_EVENT:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
                break
            if readable(sock, 0.1):
                answer = read_to_end(sock)
                break
        took = time.monotonic() - connected
    assert answer is not None, "the whole slow body went through"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert took >= 1.0, took                             # not before its deadline
    assert node.health()["events_received"] == 0


def half_closed(sent: bytes, status: int | None, needle: str = "") -> Callable[[Otrace], None]:
    """The client sends `sent`, then shuts its sending side: otrace sees the end of input at once."""
    def case(node: Otrace) -> None:
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
            sock.sendall(sent)
            sock.shutdown(socket.SHUT_WR)
            answer = read_to_end(sock)     # TRACE_READ_TIMEOUT is 1 h: the end of input ended it
        if status is None:
            assert answer == b""
        else:
            code, error = answer_of(answer)
            assert code == status and needle in error["error"], answer
    return case


@pytest.mark.parametrize(("env", "case"), [
    ({}, big_body_refused_unread),
    (FOREVER, slow_body_in_time),
    ({"TRACE_READ_TIMEOUT": "1s"}, slow_body_too_slow),
    (FOREVER, half_closed(request_head(100) + b'{"provider": "p"', 400, "body ended after 16 of 100 bytes")),
    (FOREVER, half_closed(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Le", 400, "inside its headers")),
    (FOREVER, half_closed(b"", None)),
], ids=["10MB-body", "slow-body-in-time", "slow-body-too-slow", "half-closed-mid-body",
        "half-closed-mid-headers", "half-closed-at-once"])
def test_nasty_client_is_answered_or_cut_off_and_the_service_lives(
        run: Callable[..., Otrace], env: dict[str, str], case: Callable[[Otrace], None]) -> None:
    node = run(env)
    case(node)
    wait_until(lambda: node.health()["connections_open"] == 1, what="the client's handler to finish")
    assert node.post("/v1/traces", trace()).status == 202
    assert not node.logs("request failed")


class Slowloris(threading.Thread):
    """`n` connections that each send one more byte of a request line every `every` seconds, noting
    when otrace hangs up on each and anything it answers. Stops by itself after `lifetime` seconds or
    once every connection is closed; close() stops it and closes the sockets."""

    LINE = b"POST /v1/traces HTTP/1.1\r\n"

    def __init__(self, port: int, n: int, every: float = 1.0, lifetime: float = 20.0,
                 taken: Callable[[int], Any] = lambda opened: None) -> None:
        super().__init__(daemon=True)
        self.every, self.lifetime = every, lifetime
        self.socks: list[socket.socket] = []
        self.opened: dict[socket.socket, float] = {}
        self.closed: dict[socket.socket, float] = {}
        self.answers: dict[socket.socket, bytes] = {}
        self.halt = threading.Event()
        for i in range(n):
            if i and i % 100 == 0:
                taken(i)          # waits until otrace accepted the `i` opened: its listen backlog is 128,
                                  # and a connection past it waits a SYN retransmit (1 s, then 3 s)
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            self.opened[sock] = time.monotonic()
            sock.setblocking(False)
            self.socks.append(sock)

    def run(self) -> None:
        sent, next_byte, end = 0, time.monotonic(), time.monotonic() + self.lifetime
        with selectors.DefaultSelector() as sel:
            for sock in self.socks:
                sel.register(sock, selectors.EVENT_READ)
            while not self.halt.is_set() and len(self.closed) < len(self.socks) and time.monotonic() < end:
                if time.monotonic() >= next_byte:
                    byte = self.LINE[sent % len(self.LINE):][:1]
                    sent, next_byte = sent + 1, next_byte + self.every
                    for sock in self.socks:
                        if sock not in self.closed:
                            with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                                sock.send(byte)      # a hang-up shows on the reading side below
                for key, _ in sel.select(max(0.0, min(0.05, next_byte - time.monotonic()))):
                    sock = key.fileobj
                    try:
                        data = sock.recv(4096)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        data = b""
                    if data:
                        self.answers[sock] = self.answers.get(sock, b"") + data
                    else:
                        self.closed[sock] = time.monotonic()
                        sel.unregister(sock)

    def close(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(10)
        for sock in self.socks:
            sock.close()


def test_slowloris_crowd_does_not_starve_a_normal_client(run: Callable[..., Otrace]) -> None:
    """200 connections trickle a request line at a byte a second: a normal client still gets its 202
    at once, and otrace hangs up on each slow one at TRACE_READ_TIMEOUT, though it keeps sending."""
    node = run({"TRACE_READ_TIMEOUT": "3s"})       # TRACE_MAX_CONNECTIONS stays 256
    crowd = Slowloris(node.port, 200, taken=lambda opened: wait_until(
        lambda: node.health()["connections_open"] >= opened + 1, what=f"{opened} of the crowd accepted"))
    try:
        crowd.start()
        wait_until(lambda: node.health()["connections_open"] == 201, timeout=60, what="the crowd admitted")
        resp = node.post("/v1/traces", trace(), timeout=30)
        assert resp.status == 202
        assert not crowd.closed                       # served while every slow one was still open
        node.wait_persisted(1)
        wait_until(lambda: len(crowd.closed) == 200, timeout=60, what="otrace to hang up on the crowd")
        for sock, at in crowd.closed.items():
            assert at - crowd.opened[sock] >= 3.0                        # not before its deadline
        assert not [a for a in crowd.answers.values() if not a.startswith(b"HTTP/1.1 4")]
        wait_until(lambda: node.health()["connections_open"] == 1, what="every handler finished")
        assert node.post("/v1/traces", trace()).status == 202
    finally:
        crowd.close()


def non_loopback_addresses() -> list[str]:
    """This machine's own addresses that are not loopback (nor IPv6 link-local, which needs a scope)."""
    found: set[str] = set()
    if shutil.which("hostname"):
        found.update(subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False)
                     .stdout.split())
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("198.51.100.1", 9))       # picks the address a packet would leave from; sends none
        found.add(probe.getsockname()[0])
    return sorted(a for a in found if not ((ip := ipaddress.ip_address(a)).is_loopback or ip.is_link_local
                                           or ip.is_unspecified))


def test_default_bind_is_loopback_only(run: Callable[..., Otrace]) -> None:
    node = run()
    assert "TRACE_HOST" not in node.env
    assert node.logs("starting")[0]["settings"]["host"] == "127.0.0.1"
    assert node.logs("listening")[0]["address"] == f"http://127.0.0.1:{node.port}"
    assert node.request("GET", "/health").status == 200
    addresses = non_loopback_addresses()
    if not addresses:
        pytest.skip("this machine has no address but loopback")
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.create_server((address, 0), family=family) as control:   # the address does take
            socket.create_connection(control.getsockname()[:2], timeout=5).close()   # connections ...
        with pytest.raises(ConnectionRefusedError):                           # ... but not otrace's
            socket.create_connection((address, node.port), timeout=30).close()


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="no IPv6 here")
def test_host_of_every_ipv6_address_takes_ipv4_too(run: Callable[..., Otrace]) -> None:
    """TRACE_HOST=:: (deploy.md's Fly recipe): the agent beside it still sends to 127.0.0.1."""
    node = run({"TRACE_HOST": "::", "TRACE_OTLP_PORT": str(free_port())})
    listening = node.logs("listening")[0]
    for address in (listening["address"], listening["otlp_address"]):
        port = int(address.rsplit(":", 1)[1])
        for host in ("127.0.0.1", "::1"):
            with contextlib.closing(http.client.HTTPConnection(host, port, timeout=30)) as conn:
                conn.request("GET", "/health")
                assert conn.getresponse().status == 200, (host, port)


def test_a_refused_request_is_logged_once_a_minute_by_kind_without_what_the_client_wrote(
        run: Callable[..., Otrace]) -> None:
    """An agent that never reads its answers loses each event refused: the log says so, once a minute
    for each (status, route, field), with otrace's words, never the client's (a header's secret)."""
    token, secret = f"tok-{uuid.uuid4().hex}", f"s3cret-{uuid.uuid4().hex}"
    node = run({"TRACE_INGEST_TOKEN": token})
    auth = {"Authorization": f"Bearer {token}"}
    for _ in range(3):
        assert node.post("/v1/traces", trace(status="success"), headers=auth).status == 400
    assert node.post("/v1/traces", trace(), headers={"Authorization": f"Bearer {secret}"}).status == 401
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/errors HTTP/1.1\r\nx-token %s\r\n\r\n" % secret.encode())
        assert read_to_end(sock).startswith(b"HTTP/1.1 400 ")
    node.wait_log(lambda e: e.get("message") == "request refused" and e["status"] == 400 and
                  e["route"] == "other")                     # the head was not read: its route is not known
    said = node.logs("request refused")
    assert [(e["status"], e["route"], e["field"]) for e in said] == [
        (400, "/v1/traces", "status"), (401, "/v1/traces", None), (400, "other", None)]
    assert said[0]["error"].startswith("status ") and said[0]["index"] is None
    assert said[1]["error"] == "Unauthorized" and said[2]["error"] == "Bad Request"
    assert [e["client"] for e in said] == ["127.0.0.1"] * 3     # also who sent a head that was not read
    assert secret not in json.dumps(node.lines)


def test_refusal_log_says_each_kind_once_a_minute_with_how_many_since(caplog: pytest.LogCaptureFixture
                                                                      ) -> None:
    refusals, fault = otrace.RefusalLog(), "status must be ok or error"
    secret = "sk-live-SECRET-1111"
    with caplog.at_level(logging.WARNING, logger="otrace"):
        for _ in range(4):
            refusals.refused(None, otrace.Invalid(fault, "status"), "127.0.0.1")
        refusals.refused(None, otrace.Refusal(413, "body is over 10 bytes"), "127.0.0.1")
        refusals.last[(400, "other", "status")][0] -= refusals.EVERY                # a minute later
        refusals.refused(None, otrace.Invalid(fault, "status"), "127.0.0.1")
        for _ in range(3):                                   # a burst, then none: said when its minute is up
            refusals.refused(None, otrace.Invalid(f"body is not OTLP JSON: {secret!r}", quoted=True),
                             "127.0.0.1")
        refusals.flush()
        refusals.flush(now=time.monotonic() + refusals.EVERY)
    said = [r for r in caplog.records if r.getMessage() == "request refused"]
    assert [(r.status, r.error, r.refused_since_last_line) for r in said] == [
        (400, fault, 0), (413, "Request Entity Too Large", 0), (400, fault, 3),
        (400, "body is not OTLP JSON", 0), (400, "body is not OTLP JSON", 1)]
    assert secret not in caplog.text


def test_a_line_a_minute_adds_up_what_it_stands_for(caplog: pytest.LogCaptureFixture) -> None:
    """A warning said once a minute carries, in its summed fields, every occurrence since the last line,
    not the latest one's alone: the log still says how much was lost."""
    said = otrace.MinuteLog(logging.getLogger("otrace.test"), "since", summed=("rows", "by_table"))
    with caplog.at_level(logging.WARNING, logger="otrace"):
        for rows, by_table in ((5, {"a": 5}), (2, {"a": 1, "b": 1}), (3, {"b": 3})):
            said.say("kind", "rows lost", {"rows": rows, "by_table": by_table, "latest": rows})
        said.flush(now=time.monotonic() + said.EVERY)
    lines = [(r.rows, r.by_table, r.latest, r.since) for r in caplog.records if r.getMessage() == "rows lost"]
    assert lines == [(5, {"a": 5}, 5, 0), (5, {"a": 1, "b": 4}, 3, 1)]


def test_a_bursts_refusals_are_said_when_its_minute_is_up_with_no_client_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """With no connection open the HTTP thread sleeps until a client comes; a burst's count of refused
    requests is said when its minute is up all the same, not at the next client's arrival."""
    monkeypatch.setattr(otrace.MinuteLog, "EVERY", 0.5)
    service = service_at(tmp_path / "o.db")
    serving = threading.Thread(target=service.server.serve_forever, daemon=True)
    serving.start()
    try:
        with caplog.at_level(logging.WARNING, logger="otrace"):
            for _ in range(3):
                client = http.client.HTTPConnection("127.0.0.1", service.server.addresses()[0][1], timeout=30)
                client.request("POST", "/v1/traces", b"{", {"Content-Type": "application/json",
                                                            "Connection": "close"})
                assert client.getresponse().status == 400
                client.close()
            wait_until(lambda: [r.refused_since_last_line for r in caplog.records
                                if r.getMessage() == "request refused"] == [0, 1],
                       what="the burst's count, said with no client connected")
    finally:
        service.server.close(until=time.monotonic() + 5)
        serving.join(10)
        service.db.close()


def test_ingest_token_guards_every_route_but_health_and_metrics(run: Callable[..., Otrace]) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    node = run({"TRACE_INGEST_TOKEN": token})
    opened = {"/health", "/metrics"}
    assert opened < set(otrace.ROUTES)
    posted = 0
    for path, methods in otrace.ROUTES.items():                  # any route added later is checked too
        for method in methods:
            if path in opened:
                resp = node.request(method, path)
                assert resp.status == 200, (method, path, resp)
                assert (resp.body == b"") == (method == "HEAD")
                continue
            good = {"/v1/errors": {"error_type": "crash", "message": "m"}, "/v1/traces": trace(),
                    "/v1/metrics": sums_body(1, 10),                        # OTLP: a usage point,
                    "/v1/logs": log_body("1" * 32, "1" * 16, "", severity=17),   # an ERROR record
                    "/v1/events": {"name": "deploy"}}[path]
            for auth in (None, f"Bearer {token}x", f"Bearer {token[:-1]}", f"Basic {token}", token,
                         f"Token {token}", "Bearer "):
                resp = node.request(method, path, good, headers={"Authorization": auth} if auth else {})
                assert resp.status == 401, (method, path, auth, resp)
                assert resp.json["error"] and resp.headers["www-authenticate"] == "Bearer"
            for query in (f"?token={token}", f"?access_token={token}"):
                assert node.request(method, path + query, good).status == 401
            assert node.request(method, path, b"{bad json").status == 401       # not read, so not judged
            resp = node.request(method, path, good, headers={"Authorization": f"Bearer {token}"})
            assert resp.status == (200 if path in ("/v1/metrics", "/v1/logs") else 202), (method, path, resp)
            posted += 1
    health = node.wait_persisted(posted)
    assert health["events_received"] == posted                # nothing of the refused requests kept
    assert node.request("HEAD", "/metrics").status == 200


# ------------------------------------------------------------------------------------- host metrics


HOSTS = HERE / "fixtures" / "hosts"


MEM_TOTAL = 24684096 * 1024          # MemTotal of the machine the real trees were captured on


def sample_case(case: str, disk_path: Path, mode: str = "auto", hosts: Path = HOSTS
                ) -> tuple[dict[str, Any], otrace.HostReader]:
    """The system_metrics row from a fixture's t0 and t1, the interval taken from its meta.json."""
    meta = json.loads((hosts / case / "meta.json").read_text())
    snaps = []
    for moment in ("t0", "t1"):
        root = hosts / case / moment
        reader = otrace.HostReader(root / "proc", root / "sys", str(disk_path), mode,
                                   disk_device=tuple(meta["disk_device"]))
        snaps.append(reader.snapshot())
    snaps[1].at = snaps[0].at + meta["interval_s"]
    return otrace.host_sample(*snaps), reader


def picked(row: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: row[name] for name in names}


CPU_MEM = ("source", "cpu_pct", "cpu_cores_effective", "cpu_throttled_ms", "cpu_throttled_periods",
           "mem_used_bytes", "mem_rss_bytes", "mem_limit_bytes", "mem_available_bytes", "mem_total_bytes")


def test_fixture_v2_with_cpu_quota_and_memory_limit(tmp_path: Path) -> None:
    row, reader = sample_case("v2-quota", tmp_path)
    nested = HOSTS / "v2-quota/t1/sys/fs/cgroup/system.slice/agent.service"
    assert reader.cgroup.dirs["memory"] == ("v2", nested)
    assert picked(row, *CPU_MEM) == {
        "source": "cgroup_v2",
        "cpu_pct": 75.0,                   # usage_usec +750,000 over 2.0 s at cpu.max 50000/100000 = 0.5 core
        "cpu_cores_effective": 0.5,        # min(0.5 quota, 2 in cpuset.cpus.effective, 2 online)
        "cpu_throttled_ms": 200.0,         # throttled_usec 250,000 -> 450,000
        "cpu_throttled_periods": 4,        # nr_throttled 10 -> 14
        "mem_used_bytes": 120_000_000,     # memory.current 160,000,000 - inactive_file 40,000,000
        "mem_rss_bytes": 110_000_000,      # anon
        "mem_limit_bytes": 268_435_456,    # memory.max
        "mem_available_bytes": 148_435_456,    # 268,435,456 - 120,000,000
        "mem_total_bytes": MEM_TOTAL,
    }
    assert row["cgroup_read_bps"] == 200_000.0     # rbytes +400,000 (254:0) over 2.0 s
    assert row["cgroup_write_bps"] == 500_000.0    # wbytes +1,000,000 (254:16) over 2.0 s


def test_fixture_v2_unlimited_at_the_namespace_root(tmp_path: Path) -> None:
    row, reader = sample_case("v2-unlimited", tmp_path)
    assert reader.cgroup.dirs["cpu"] == ("v2", HOSTS / "v2-unlimited/t1/sys/fs/cgroup")   # "0::/"
    assert picked(row, *CPU_MEM) == {
        "source": "cgroup_v2",
        "cpu_pct": 25.0,                   # usage_usec +1,000,000 over 2.0 s on 2 cores (cpu.max "max")
        "cpu_cores_effective": 2,
        "cpu_throttled_ms": 0.0, "cpu_throttled_periods": 0,
        "mem_used_bytes": 310_000_000,     # 410,000,000 - inactive_file 100,000,000
        "mem_rss_bytes": 260_000_000,
        "mem_limit_bytes": MEM_TOTAL,      # memory.max "max": the host's MemTotal
        "mem_available_bytes": MEM_TOTAL - 310_000_000,   # under MemAvailable 24,395,328 kB
        "mem_total_bytes": MEM_TOTAL,
    }
    assert (row["cgroup_read_bps"], row["cgroup_write_bps"]) == (0.0, 300_000.0)   # wbytes +600,000 / 2 s


def test_fixture_v1_with_cpu_quota_and_memory_limit(tmp_path: Path) -> None:
    row, reader = sample_case("v1-quota", tmp_path)      # captured: interval 2.005694 s
    child = HOSTS / "v1-quota/t1/sys/fs/cgroup/cpuacct/otrace-fixture-quota"
    assert reader.cgroup.dirs["cpuacct"] == ("v1", child)
    assert picked(row, *CPU_MEM) == {
        "source": "cgroup_v1",
        "cpu_pct": 100.48,                 # cpuacct.usage 286,370,912 -> 1,294,055,601 ns: 1.007684689 s
                                           # / (2.005694 s * 0.5 core) = 100.48 % of the allowance
        "cpu_cores_effective": 0.5,        # cfs_quota_us 50000 / cfs_period_us 100000
        "cpu_throttled_ms": 999.483,       # throttled_time 212,822,270 -> 1,212,305,537 ns
        "cpu_throttled_periods": 20,       # nr_throttled 5 -> 25
        "mem_used_bytes": 3_227_648,       # usage_in_bytes 3,227,648 - total_inactive_file 0
        "mem_rss_bytes": 3_096_576,        # total_rss
        "mem_limit_bytes": 268_435_456,
        "mem_available_bytes": 265_207_808,
        "mem_total_bytes": MEM_TOTAL,
    }


def test_fixture_v1_unlimited_pure_v1(tmp_path: Path) -> None:
    row, reader = sample_case("v1-unlimited", tmp_path)  # captured: interval 2.003482 s
    assert {version for version, _ in reader.cgroup.dirs.values()} == {"v1"}
    assert picked(row, *CPU_MEM) == {
        "source": "cgroup_v1",
        "cpu_pct": 50.01,                  # 499,640,839 -> 2,503,453,928 ns: 2.003813089 s / (2.003482 s * 2)
        "cpu_cores_effective": 2,          # quota -1: the cpuset's 2 CPUs
        "cpu_throttled_ms": 0.0, "cpu_throttled_periods": 0,
        "mem_used_bytes": 4_554_752, "mem_rss_bytes": 4_460_544,
        "mem_limit_bytes": MEM_TOTAL,      # 9223372036854771712 is v1's "no limit"
        "mem_available_bytes": 24_407_176 * 1024,    # the machine's MemAvailable: under MemTotal - used
        "mem_total_bytes": MEM_TOTAL,
    }
    # vda (254:0) sectors written 65,753,904 -> 65,756,560: 2,656 * 512 = 1,359,872 bytes in 2.003482 s
    assert (row["disk_read_bps"], row["disk_write_bps"]) == (0.0, 678754.3)
    assert row["disk_device"] == "vda (254:0)"


def test_fixture_hybrid_reads_v1_controllers_beside_an_empty_v2(tmp_path: Path) -> None:
    row, reader = sample_case("hybrid", tmp_path)         # captured: interval 2.00568 s
    assert {res: version for res, (version, _) in reader.cgroup.dirs.items()} == dict.fromkeys(
        ("cpu", "cpuacct", "cpuset", "memory", "io"), "v1")
    assert reader.cgroup.dirs["memory"][1].name == "2314ed9f1114ab0fdeb5730a3c78d3d6"   # nested path
    assert picked(row, *CPU_MEM) == {
        "source": "cgroup_v1",
        "cpu_pct": 50.37,                  # 1,420,747,467,636 -> 1,422,768,064,376 ns: 2.02059674 s
                                           # / (2.00568 s * 2 cores) = 50.37 %
        "cpu_cores_effective": 2,
        "cpu_throttled_ms": 0.0, "cpu_throttled_periods": 0,
        "mem_used_bytes": 78_073_856,      # 93,306,880 - total_inactive_file 15,233,024
        "mem_rss_bytes": 17_833_984,
        "mem_limit_bytes": MEM_TOTAL,
        "mem_available_bytes": 24_409_372 * 1024,    # MemAvailable: what runs outside the cgroup uses memory
        "mem_total_bytes": MEM_TOTAL,
    }


@pytest.mark.parametrize("case", ["v1-quota", "v2-quota"])
def test_limits_on_a_parent_cgroup_are_the_ones_read(tmp_path: Path, case: str) -> None:
    """otrace in a child cgroup with no limits of its own (a container's init moved into `init`, a
    pod's container without its own): the parent's quota and limit bind it, so its figures are the
    parent's (they once were the machine's: 25 GB available to a cgroup with 64 MB left)."""
    copy = tmp_path / "hosts"
    shutil.copytree(HOSTS / case, copy / case)
    parent = "otrace-fixture-quota" if case == "v1-quota" else "system.slice/agent.service"
    for moment in ("t0", "t1"):
        root = copy / case / moment
        cgroup = root / "proc" / "self" / "cgroup"
        cgroup.write_text(cgroup.read_text().replace(f":/{parent}\n", f":/{parent}/init\n"))
        for folder in (root / "sys" / "fs" / "cgroup").rglob(parent.rpartition("/")[2]):
            child = folder / "init"                  # its own cgroup: no limits, its own usage
            child.mkdir()
            for file in folder.iterdir():
                if file.is_file():
                    text = {"cpu.cfs_quota_us": "-1\n", "cpu.max": "max 100000\n", "memory.max": "max\n",
                            "memory.limit_in_bytes": "9223372036854771712\n", "cpuacct.usage": "5\n",
                            "memory.usage_in_bytes": "7\n", "memory.current": "7\n"}
                    (child / file.name).write_text(text.get(file.name, file.read_text()))
    row, reader = sample_case(case, tmp_path, hosts=copy)
    bounds = {reader.cgroup.dirs[res][1].name for res in ("cpu", "cpuacct", "memory")}
    assert bounds == {parent.rpartition("/")[2]}
    expected, _ = sample_case(case, tmp_path)
    assert picked(row, *CPU_MEM) == picked(expected, *CPU_MEM) and row["mem_limit_bytes"] < MEM_TOTAL


@pytest.mark.parametrize(("own", "limits", "cpu", "memory"), [
    ("pod/ctr", {"pod/ctr": ("50000 100000", "max"), "pod": ("max 100000", "1073741824")}, "pod/ctr", "pod"),
    ("pod/ctr", {"pod/ctr": ("max 100000", "max"), "pod": ("max 100000", "max")}, "pod/ctr", "pod/ctr"),
    # a parent's tighter limit binds, whatever the child's own (the child's 2 GiB was read: 1.9 GB
    # available where 140 MB were, and the agent was OOM-killed)
    ("pod/ctr", {"pod/ctr": ("200000 100000", "2147483648"), "pod": ("50000 100000", "419430400")}, "pod",
     "pod"),
    ("pod/ctr", {"pod/ctr": ("50000 100000", "419430400"), "pod": ("200000 100000", "2147483648")},
     "pod/ctr", "pod/ctr"),
    ("kubepods.slice/pod1.slice/cri-containerd-4f2a.scope",               # a runtime's unit: as it is
     {"kubepods.slice/pod1.slice/cri-containerd-4f2a.scope": ("max 100000", "max"),
      "kubepods.slice/pod1.slice": ("max 100000", "1073741824")}, "cri-containerd-4f2a.scope",
     "cri-containerd-4f2a.scope"),
])
def test_each_limit_is_read_where_it_is_set(tmp_path: Path, own: str, limits: dict[str, tuple[str, str]],
                                            cpu: str, memory: str) -> None:
    """A CPU quota on the cgroup itself and a memory limit on its parent: each figure from where its
    limit is (one limit once hid the other); none set: its own; limits on both: the tighter; a container
    runtime's unit is read as it is (above it are the other containers of the node)."""
    root = tmp_path / "host"
    shutil.copytree(HOSTS / "v2-quota" / "t0", root)
    cgroups = root / "sys" / "fs" / "cgroup"
    (cgroups / "system.slice" / "agent.service").rename(moved := cgroups / own.replace("/", "_tmp_"))
    (cgroups / own).parent.mkdir(parents=True, exist_ok=True)
    moved.rename(cgroups / own)
    for path, (quota, limit) in limits.items():
        (cgroups / path / "cpu.max").write_text(quota + "\n")
        (cgroups / path / "memory.max").write_text(limit + "\n")
    (root / "proc" / "self" / "cgroup").write_text(f"0::/{own}\n")
    found = otrace.Cgroup.find(root / "proc", root / "sys", "auto")
    assert (found.dirs["cpu"][1].name, found.dirs["cpuacct"][1].name, found.dirs["memory"][1].name) == (
        cpu.rpartition("/")[2], cpu.rpartition("/")[2], memory.rpartition("/")[2])


def test_fixture_mount_root_below_the_cgroup_root(tmp_path: Path) -> None:
    """A container without its own cgroup namespace: mountinfo's root is the cgroup's path."""
    row, reader = sample_case("v1-subtree-root", tmp_path)   # captured: interval 2.011379 s
    assert reader.cgroup.dirs["cpuacct"] == ("v1", HOSTS / "v1-subtree-root/t1/sys/fs/cgroup/cpuacct")
    # the top mount's cpuacct.usage: 1,554,211,052 -> 2,564,589,189 ns = 1.010378137 s over 2.011379 s
    # at 0.5 core = 100.47 % (the shadowed /otrace-fixture-quota copy would give 100.07 %)
    assert (row["cpu_pct"], row["cpu_cores_effective"]) == (100.47, 0.5)
    assert (row["cpu_throttled_ms"], row["cpu_throttled_periods"]) == (1000.971, 20)
    assert (row["mem_used_bytes"], row["mem_limit_bytes"]) == (7_426_048, 268_435_456)


def test_fixture_proc_only(tmp_path: Path) -> None:
    row, reader = sample_case("proc-only", tmp_path)
    assert reader.cgroup is None
    assert picked(row, *CPU_MEM) == {
        "source": "proc",
        "cpu_pct": 50.25,                  # /proc/stat busy (user+nice+system+irq+softirq+steal)
                                           # 136,589 -> 136,790 (+201) of all ticks 913,333 -> 913,733 (+400)
        "cpu_cores_effective": 2,
        "cpu_throttled_ms": None, "cpu_throttled_periods": None,
        "mem_used_bytes": 286_756_864,     # MemTotal 24,684,096 - MemAvailable 24,404,060 kB
        "mem_rss_bytes": 29_310_976,       # AnonPages 28,624 kB
        "mem_limit_bytes": MEM_TOTAL,
        "mem_available_bytes": 24_404_060 * 1024,
        "mem_total_bytes": MEM_TOTAL,
    }


def test_fixture_oom_kill_counters(tmp_path: Path) -> None:
    for moment, cgroup_kills, host_kills in (("t0", 0, 3), ("t1", 1, 4)):   # one real OOM kill
        root = HOSTS / "v1-oom" / moment
        snap = otrace.HostReader(root / "proc", root / "sys", str(tmp_path)).snapshot()
        assert (snap.cgroup_oom_kills, snap.host_oom_kills) == (cgroup_kills, host_kills)
    root = HOSTS / "v2-unlimited" / "t1"
    assert otrace.HostReader(root / "proc", root / "sys", str(tmp_path)).snapshot().cgroup_oom_kills == 3


def test_oom_counts_are_of_one_moment_when_a_kill_lands_between_reads(tmp_path: Path) -> None:
    """The real t0 -> t1 kill lands just after otrace read the cgroup's count (t0's), before it reads
    the host's (t1's): the sample holds it on neither side or both, not "1 on the host" now and "1 in
    its cgroup" a sample later. The cgroup's file is a FIFO the "kernel" answers once, with t0's text,
    then puts t1's files in place."""
    t0, t1 = HOSTS / "v1-oom" / "t0", HOSTS / "v1-oom" / "t1"
    root, memory = tmp_path / "host", Path("sys/fs/cgroup/memory/otrace-fixture-oom/memory.oom_control")
    shutil.copytree(t0, root)
    (root / memory).unlink()
    os.mkfifo(root / memory)

    def kernel() -> None:
        with open(root / memory, "w") as fifo:          # waits for otrace to open it
            fifo.write((t0 / memory).read_text())
            for path in (memory, Path("proc/vmstat")):  # the kill, counted in both
                shutil.copy(t1 / path, root / f"{path}.new")
                (root / f"{path}.new").replace(root / path)

    writer = threading.Thread(target=kernel, daemon=True)
    writer.start()
    try:
        snap = otrace.HostReader(root / "proc", root / "sys", str(tmp_path)).snapshot()
    finally:
        with contextlib.suppress(OSError):              # a writer left waiting gives up
            os.close(os.open(root / memory, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(10)
    assert (snap.cgroup_oom_kills, snap.host_oom_kills) == (1, 4)


@pytest.mark.parametrize(("case", "mode", "expected"), [
    ("hybrid", "none", None),
    ("hybrid", "v1", "v1"),
    ("hybrid", "v2", "v2"),            # the empty v2 hierarchy still counts usage_usec, nothing else
    ("v1-unlimited", "v2", None),      # no cgroup2 mounted: /proc speaks
    ("v2-quota", "v1", None),          # no v1 hierarchy mounted
    ("v2-quota", "auto", "v2"),
    ("proc-only", "auto", None),
])
def test_forced_cgroup_modes(tmp_path: Path, case: str, mode: str, expected: str | None) -> None:
    root = HOSTS / case / "t0"
    found = otrace.Cgroup.find(root / "proc", root / "sys", mode)
    assert (found and found.version) == expected
    if case == "hybrid" and mode == "v2":
        assert set(found.dirs) == {"cpuacct"}


@pytest.mark.parametrize(("unit", "limits", "box"), [
    ("system.slice/agent.service", "unit", "system.slice/agent.service"),   # the capture: its limits
    ("system.slice/agent.service", None, None),           # a VM's service without limits: the host's
    ("user.slice/user-0.slice/session-3.scope", None, None),   # started by hand in a login session
    ("agent.slice/otrace.service", "slice", "agent.slice"),    # a memory limit on the slice it is in
    ("system.slice/docker-4f2a9c.scope", None, "system.slice/docker-4f2a9c.scope"),   # a container's
    ("system.slice/nerdctl-4f2a9c.scope", None, "system.slice/nerdctl-4f2a9c.scope"),
    ("system.slice/otrace.service", "container", ""),     # systemd inside a container: the container's
    ("system.slice/otrace.service", "unit", None),         # otrace's own unit's limits: a sidecar's, not
])                                                          # the agent's box
def test_auto_reads_the_box_around_a_systemd_unit_of_its_own(tmp_path: Path, unit: str, limits: str | None,
                                                             box: str | None) -> None:
    """otrace in a systemd unit of its own reads the cgroup that bounds the agent too: the unit or a
    slice with limits, a container's, or none (a host: /proc)."""
    root = tmp_path / "host"
    shutil.copytree(HOSTS / "v2-quota" / "t0", root)
    cgroups = root / "sys" / "fs" / "cgroup"
    moved = cgroups / unit
    moved.parent.mkdir(parents=True, exist_ok=True)
    if moved != cgroups / "system.slice" / "agent.service":
        (cgroups / "system.slice" / "agent.service").rename(moved)
    (root / "proc" / "self" / "cgroup").write_text(f"0::/{unit}\n")
    (root / "proc" / "1").mkdir()
    pid1 = b"PATH=/bin\0" + (b"container=lxc\0" if limits == "container" else b"")
    (root / "proc" / "1" / "environ").write_bytes(pid1)
    if limits != "unit":
        (moved / "cpu.max").write_text("max 100000\n")
        (moved / "memory.max").write_text("max\n")
    if limits == "slice":
        (moved.parent / "memory.max").write_text("1073741824\n")
    found = otrace.Cgroup.find(root / "proc", root / "sys", "auto")
    assert ({where for _, where in found.dirs.values()} if found else None) == (
        {cgroups / box} if box is not None else None)
    assert otrace.Cgroup.find(root / "proc", root / "sys", "v2").dirs["memory"] == ("v2", moved)   # forced


def test_auto_finds_the_box_on_a_hybrid_host_whatever_the_order_of_its_mounts(tmp_path: Path) -> None:
    """The captured hybrid host mounts its v2 tree after the v1 ones: each v1 resource walks up to
    its own hierarchy's root (here, systemd inside a container: the container's)."""
    root = tmp_path / "host"
    shutil.copytree(HOSTS / "hybrid" / "t0", root)
    cgroup = root / "proc" / "self" / "cgroup"
    cgroup.write_text(re.sub(r"memory:/\S+", "memory:/system.slice/otrace.service", cgroup.read_text()))
    unit = root / "sys" / "fs" / "cgroup" / "memory" / "system.slice" / "otrace.service"
    unit.mkdir(parents=True)
    (unit / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (root / "proc" / "1").mkdir()
    (root / "proc" / "1" / "environ").write_bytes(b"container=lxc\0")
    found = otrace.Cgroup.find(root / "proc", root / "sys", "auto")
    assert found.dirs["memory"] == ("v1", root / "sys" / "fs" / "cgroup" / "memory")


def test_oom_kill_becomes_one_error_event_and_is_never_reported_twice(tmp_path: Path,
                                                                      run: Callable[..., Otrace]) -> None:
    """The real service reads a copy of the v1-oom tree; the tree then moves from t0 to t1."""
    live = tmp_path / "host"
    shutil.copytree(HOSTS / "v1-oom" / "t0", live)
    env = {"TRACE_METRICS_INTERVAL": "100ms", "TRACE_PROCFS": str(live / "proc"),
           "TRACE_SYSFS": str(live / "sys"), "TRACE_DISK_PATH": str(tmp_path)}
    node = run(env)
    wait_until(lambda: node.query("SELECT count(*) FROM system_metrics")[0][0] >= 1, what="samples")
    assert node.rows("error_events") == []                        # the counts at start are a baseline
    shutil.copytree(HOSTS / "v1-oom" / "t1", live, dirs_exist_ok=True)  # a sample may see half of it

    def kills() -> collections.Counter[str]:
        found = [collections.Counter(json.loads(e["metadata"])["kills"]) for e in node.rows("error_events")]
        return sum(found, collections.Counter())

    wait_until(lambda: kills() == {"cgroup": 1, "host": 1}, what="both OOM kills")
    events = node.rows("error_events")                            # one, or one a scope
    assert {(e["error_type"], e["category"], e["severity"], e["source"]) for e in events} == \
        {("crash", "oom_kill", "critical", "otrace")}
    assert any(json.loads(e["metadata"])["seen_in"].get("cgroup", "").endswith("memory/otrace-fixture-oom")
               for e in events)
    row = node.rows("system_metrics")[-1]
    assert row["source"] == "cgroup_v1" and row["mem_limit_bytes"] == 64 << 20
    assert node.stop() == 0
    assert dict(node.query("SELECT key, value FROM otrace_state WHERE key LIKE 'oom_kill_count.%'")) == {
        "oom_kill_count.cgroup": 1, "oom_kill_count.host": 4}
    again = run(env, db=node.db_path)                              # restart: same counts, no news
    wait_until(lambda: again.health()["host"], what="a sample after the restart")
    assert len(again.rows("error_events")) == len(events)


@HOST_WIDE
def test_live_readings_agree_with_the_files(tmp_path: Path) -> None:
    reader = otrace.HostReader(Path("/proc"), Path("/sys"), str(tmp_path))
    memory = reader.cgroup and reader.cgroup.dirs.get("memory")
    if not memory or memory[0] != "v1":
        pytest.skip("this check reads the v1 memory files of the capturing kind of machine")
    before = int((memory[1] / "memory.usage_in_bytes").read_text())
    snap = reader.snapshot()
    after = int((memory[1] / "memory.usage_in_bytes").read_text())
    inactive = otrace.read_keyed(memory[1] / "memory.stat", ("total_inactive_file",))["total_inactive_file"]
    slack = 8 << 20
    assert min(before, after) - inactive - slack <= snap.mem_used <= max(before, after) - inactive + slack
    usage = int((reader.cgroup.dirs["cpuacct"][1] / "cpuacct.usage").read_text()) / 1e9
    assert 0 < usage - snap.cpu_used < 5                            # read just after, so a little more


@HOST_WIDE
def test_live_child_burning_a_core_shows_in_cpu_pct(tmp_path: Path) -> None:
    reader = otrace.HostReader(Path("/proc"), Path("/sys"), str(tmp_path))
    first = reader.snapshot()
    burn = subprocess.run([sys.executable, "-c", "import time\nwhile time.process_time() < 1.5: pass"],
                          check=True)                                  # 1.5 s of one core's time
    assert burn.returncode == 0
    row = otrace.host_sample(first, reader.snapshot())
    busy = row["cpu_pct"] * row["cpu_cores_effective"] * row["interval_s"] / 100   # core-seconds used
    assert busy >= 1.4, row


V1_ROOT = Path("/sys/fs/cgroup")


needs_v1 = pytest.mark.skipif(not (ROOT and (V1_ROOT / "cpu" / "cgroup.procs").exists()
                                   and (V1_ROOT / "memory" / "cgroup.procs").exists()),
                              reason="needs root and cgroup v1 cpu and memory hierarchies")


@contextlib.contextmanager
def v1_cgroup(name: str, quota_us: int, memory_bytes: int) -> Iterator[str]:
    """A real child cgroup in the v1 cpu, cpuacct and memory hierarchies, removed afterwards."""
    controllers = ("cpu", "cpuacct", "memory")
    for c in controllers:
        (V1_ROOT / c / name).mkdir(exist_ok=True)
    (V1_ROOT / "cpu" / name / "cpu.cfs_quota_us").write_text(str(quota_us))
    (V1_ROOT / "memory" / name / "memory.limit_in_bytes").write_text(str(memory_bytes))
    try:
        yield " ".join(f"echo $$ > {V1_ROOT / c / name / 'cgroup.procs'};" for c in controllers)
    finally:
        for c in controllers:
            for pid in (V1_ROOT / c / name / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            wait_until(lambda c=c: not (V1_ROOT / c / name / "cgroup.procs").read_text().split(),
                       what="the cgroup to empty")
            (V1_ROOT / c / name).rmdir()


@contextlib.contextmanager
def oom_decoy(enter: str) -> Iterator[None]:
    """A sleeping process in the cgroup that the OOM killer takes after the hog and before otrace: the
    kernel can kill a second time before the first victim's memory is freed (its log once showed otrace
    taken 5 ms after the hog), and root here lacks CAP_SYS_RESOURCE for the oom_score_adj -1000 a
    deployment gives otrace (docs/deploy.md); raising a score needs no privilege. At 500 its score is
    half the limit's pages: under the hog's (nearly all of them), over otrace's (a tenth)."""
    decoy = subprocess.Popen(["sh", "-c", f"{enter} echo 500 > /proc/self/oom_score_adj && exec sleep 600"])
    try:
        wait_until(lambda: Path(f"/proc/{decoy.pid}/oom_score_adj").read_text().strip() == "500",
                   what="the decoy in the cgroup")
        yield
    finally:
        decoy.kill()
        decoy.wait(10)


@HOST_WIDE
@needs_v1
def test_live_cgroup_quota_and_a_real_oom_kill(tmp_path: Path) -> None:
    """otrace runs in a real child cgroup (0.5 core, 256 MiB); a process beside it burns CPU, then
    another allocates until the OOM killer kills it: both show in what otrace records."""
    with v1_cgroup(f"otrace-test-{os.getpid()}", 50_000, 256 << 20) as enter:
        node = Otrace(tmp_path, {"TRACE_METRICS_INTERVAL": "200ms"})
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")} | node.env
        node.proc = subprocess.Popen(["sh", "-c", f'{enter} exec "$0" -m otrace', sys.executable],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=node._read, args=(node.proc.stdout, True), daemon=True).start()
        threading.Thread(target=node._read, args=(node.proc.stderr, False), daemon=True).start()
        try:
            listening = node.wait_log(lambda e: e.get("message") == "listening")
            node.port = int(listening["address"].rsplit(":", 1)[1])
            wait_until(lambda: node.health()["host"], what="a first sample")
            assert node.health()["host"]["cpu_cores_effective"] == 0.5
            burner = subprocess.Popen(["sh", "-c", f'{enter} exec "$0" -c "$1"', sys.executable,
                                       "while True: pass"])
            try:                                  # it burns until a sample shows the quota biting
                busy = wait_until(lambda: [r for r in node.rows("system_metrics") if (r["cpu_pct"] or 0) > 80
                                           and r["cpu_throttled_periods"]], timeout=120,
                                  what="a throttled sample near the quota")
            finally:
                burner.kill()
                burner.wait(10)
            assert busy[0]["source"] == "cgroup_v1"
            with oom_decoy(enter):
                hog = subprocess.run(["sh", "-c", f'{enter} exec "$0" -c "$1"', sys.executable,
                                      "x = []\nwhile True: x.append(bytearray(16 << 20))"], check=False)
            assert hog.returncode == -signal.SIGKILL                       # the OOM killer's doing
            event = wait_until(lambda: node.rows("error_events"), what="the OOM event")[0]
            assert event["category"] == "oom_kill"
            assert json.loads(event["metadata"])["kills"]["cgroup"] in (1, 2)   # 2: the decoy too
            assert node.stop() == 0
        finally:
            node.kill()


# -------------------------------------------------------------------------------------- gateway log


GATEWAY_LOG = HERE.parent / "shared" / "fixtures" / "openclaw" / "gateway-2026.9.6-sample.jsonl"


# The kind each line of the 62-line real sample becomes (lines not listed are INFO/DEBUG of no kind).
EXPECTED_KINDS = {
    10: "gateway_start", 15: "config_change", 16: "config_invalid", 17: "channel_error", 18: "channel_start",
    19: "channel_error", 20: "channel_error", 22: "other", 27: "model_call", 30: "model_error",
    31: "model_error", 32: "other", 33: "other", 34: "model_error", 35: "model_error", 37: "other",
    38: "other", 39: "model_call", 40: "other", 41: "other", 42: "auth_failure", 43: "other",
    44: "channel_down", 46: "channel_error", 47: "config_change", 48: "gateway_stop", 53: "channel_inbound",
    57: "channel_outbound", 60: "gateway_stop", 61: "gateway_stopped",
}


needs_gateway_log = pytest.mark.skipif(not GATEWAY_LOG.exists(), reason="needs ../shared beside the repo")


def gateway_lines() -> list[bytes]:
    return GATEWAY_LOG.read_bytes().splitlines(keepends=True)


def logged(node: Otrace) -> list[tuple[str, str]]:
    return [(r["kind"], r["message"]) for r in node.rows("log_events")]


def expected(indexes: Iterable[int]) -> list[tuple[str, str]]:
    lines = gateway_lines()
    return [(EXPECTED_KINDS[i], json.loads(lines[i])["message"]) for i in indexes if i in EXPECTED_KINDS]


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


@needs_gateway_log
def test_log_replay_through_rotation_truncation_and_a_new_day(tmp_path: Path,
                                                             run: Callable[..., Otrace]) -> None:
    logs = tmp_path / "openclaw"
    logs.mkdir()
    today = logs / "openclaw-2026-11-24.log"
    lines = gateway_lines()
    node = run({"TRACE_LOG_PATH": str(logs), "TRACE_LOG_POLL": "50ms", "TRACE_LOG_START": "beginning"})
    node.wait_log(lambda e: e.get("message") == "waiting for the gateway log")   # missing: waits
    seen: list[int] = []

    def feed(indexes: range, path: Path, *extra: bytes) -> None:
        for i in indexes:                                       # slowly: a few lines at a time
            append(path, lines[i])
            seen.append(i)
            if i % 7 == 0:
                wait_until(lambda: sorted(logged(node)) == sorted(expected(seen)), what=f"line {i}")
        for data in extra:
            append(path, data)
        wait_until(lambda: sorted(logged(node)) == sorted(expected(seen)), what=f"lines up to {seen[-1]}")

    feed(range(20), today, b"this is not json\n")
    today.rename(logs / "openclaw-2026-11-24.1.log")            # size rotation: rename, then a new file
    append(logs / "openclaw-2026-11-24.1.log", lines[20])       # a last append lands in the renamed file
    seen.append(20)
    feed(range(21, 35), today)
    node.signal(signal.SIGSTOP)                                 # while otrace is paused, the file is
    with open(today, "wb") as f:                                # truncated and rewritten past its old
        f.writelines(lines[35:51])                              # offset: only its first bytes tell
    assert today.stat().st_size > sum(map(len, lines[21:35]))
    node.signal(signal.SIGCONT)
    seen.extend(range(35, 51))
    wait_until(lambda: sorted(logged(node)) == sorted(expected(seen)), what="the rewritten file")
    huge = b'{"0": "' + b"x" * 1_100_000 + b'", "_meta": {"logLevelName": "ERROR"}}\n'   # cut, not kept
    feed(range(51, 62), logs / "openclaw-2026-11-25.log", huge)   # the next day's file
    assert sorted(logged(node)) == sorted(expected(range(62)))  # every expected event, exactly once
    health = wait_until(lambda: (tail := node.health()["log_tail"])["cut"] and tail,    # appended after
                        what="the huge line counted cut")                              # the last line
    assert health["not_json"] >= 1 and health["cut"] == 1 and health["file"].endswith("2026-11-25.log")
    traces = node.rows("llm_traces")
    assert [(t["provider"], t["status"], t["latency_ms"], t["source"]) for t in traces] == [
        ("mock", "ok", 13.0, "log"), ("rlmock", "error", 35.0, "log")]
    errors = [(e["category"], e["provider"]) for e in node.rows("error_events")]
    assert errors == [("network_failure", "deadmock")]         # the run that failed; rlmock's had not yet
    assert node.stop() == 0


@needs_gateway_log
@pytest.mark.parametrize("behind", [False, True])
def test_a_file_rotated_away_before_otrace_saw_it_is_read(tmp_path: Path, run: Callable[..., Otrace],
                                                          behind: bool) -> None:
    """The gateway's size rotation twice while otrace was down (the file read renamed .1 then .2, and a
    file otrace never saw renamed .1): each is read, the unseen one too (it was skipped: a gap); the
    rotated files of before are not read again. `behind`: otrace stopped with lines of its file left,
    so the file it never saw was last written before otrace's last read, but after the file it had not
    finished: news all the same (it was skipped: only files written after the last read were)."""
    logs = tmp_path / "openclaw"
    logs.mkdir()
    day = "openclaw-2026-12-01"
    lines = gateway_lines()

    def rotate() -> None:
        for n in (1, 0):
            name = logs / (f"{day}.{n}.log" if n else f"{day}.log")
            if name.exists():
                name.rename(logs / f"{day}.{n + 1}.log")

    (logs / f"{day}.2.log").write_bytes(b"".join(lines[40:44]))          # rotated long before: not news
    os.utime(logs / f"{day}.2.log", (1, 1))
    (logs / f"{day}.log").touch()
    env = {"TRACE_LOG_PATH": str(logs), "TRACE_LOG_POLL": "20ms"}
    node = run(env)
    node.wait_log(lambda e: e.get("message") == "following log file")
    began = time.time()
    append(logs / f"{day}.log", b"".join(lines[10:15]))
    wait_until(lambda: sorted(logged(node)) == sorted(expected(range(10, 15))), what="the first lines")
    assert node.stop() == 0
    append(logs / f"{day}.log", b"".join(lines[15:20]))
    rotate()
    append(logs / f"{day}.log", b"".join(lines[20:30]))                  # never seen by otrace
    rotate()
    append(logs / f"{day}.log", b"".join(lines[30:40]))
    if behind:                                      # as if written before otrace's last read, the file
        os.utime(logs / f"{day}.2.log", (began - 60,) * 2)   # it never saw after the one it had not
        os.utime(logs / f"{day}.1.log", (began - 30,) * 2)   # finished
    node = run(env, db=node.db_path)
    wait_until(lambda: sorted(logged(node)) == sorted(expected(range(10, 40))), what="every file's lines")
    assert node.health()["events_duplicate"] == 0


@needs_gateway_log
def test_a_log_catch_up_never_turns_a_client_away(tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A reader's units leave a quarter of the queue to clients, the tailer's cut to half the rest in
    rows: while it catches up on a log of model calls (two rows a line without the store), every batch
    of a client that posts one at a time is taken. It has at most five batches unstored: a client that
    outpaces a writer the machine's load slows is turned away by design, log or not, and five (50
    events, 100 while the writer's last commit is not yet counted) are within the quarter."""
    logs = tmp_path / "logs"
    logs.mkdir()
    calls = [line for i, line in enumerate(gateway_lines()) if EXPECTED_KINDS.get(i) == "model_call"]
    log = logs / "openclaw-2026-12-03.log"
    log.write_bytes(b"".join(calls) * 10_000)                        # 20,000 lines, 40,000 rows
    node = run({"TRACE_LOG_PATH": str(logs), "TRACE_LOG_START": "beginning", "TRACE_LOG_POLL": "20ms"})
    wait_until(lambda: node.health()["log_tail"]["offset"] is not None, what="the log followed")  # none yet
    answers: collections.Counter[int] = collections.Counter()
    during = 0
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
    deadline = time.monotonic() + 120
    while (tail := node.health()["log_tail"])["offset"] < log.stat().st_size and time.monotonic() < deadline:
        answer = node.post("/v1/traces", [trace() for _ in range(10)], conn=conn)
        answers[answer.status] += 1
        during += tail["offset"] > 0
        wait_until(lambda: node.query("SELECT count(*) FROM llm_traces WHERE source = 'http'")[0][0]
                   >= 10 * (answers[202] - 4), timeout=60, what="all but four batches stored")
    conn.close()
    assert during >= 5, f"only {during} batches posted while the log was read"
    assert answers == {202: sum(answers.values())}, answers
    wait_until(lambda: node.query("SELECT source, count(*) FROM llm_traces GROUP BY 1 ORDER BY 1") == [
        ("http", 10 * answers[202]), ("log", 10_001)], timeout=60, what="every trace stored")
    # (each copy's 429 is a retry of the one before: the same run, provider and model)
    read = node.health()["log_tail"]["bytes_read"]
    assert read < 1.5 * log.stat().st_size, read     # lines past a unit's cut are not read again


@needs_gateway_log
def test_log_tail_survives_sigkill_without_gap_or_duplicate(tmp_path: Path,
                                                            run: Callable[..., Otrace]) -> None:
    import random
    log = tmp_path / "gateway.log"
    log.touch()
    lines = gateway_lines()
    env = {"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "20ms", "TRACE_LOG_START": "beginning",
           "TRACE_BATCH_WINDOW": "5ms"}
    written: list[int] = []                  # fixture index of every line written, in file order
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            i = n % len(lines)
            append(log, lines[i])
            written.append(i)
            n += 1
            time.sleep(0.002)

    thread = threading.Thread(target=writer)
    thread.start()
    rng = random.Random(11)
    try:
        for _ in range(10):
            node = run(env, db=tmp_path / "otrace.db")
            time.sleep(rng.uniform(0.05, 0.4))          # the kill lands at a random moment of the reading
            node.kill()
    finally:
        stop.set()
        thread.join()
    node = run(env, db=tmp_path / "otrace.db")
    size = log.stat().st_size
    wait_until(lambda: (h := node.health()["log_tail"])["offset"] == size and h["lag_bytes"] == 0,
               timeout=30, what="caught up")
    node.wait_persisted(0)
    wait_until(lambda: node.health()["queue_depth"] == 0, what="queue drained")
    rows = node.rows("log_events")
    offsets = [r["file_offset"] for r in rows]
    assert len(offsets) == len(set(offsets))                                   # no duplicate
    assert sorted((r["kind"], r["message"]) for r in rows) == sorted(expected(written))    # no gap


@needs_gateway_log
def test_log_start_end_skips_what_was_there(tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A file never read starts after its last whole line; the line being written is new, and read."""
    log = tmp_path / "gateway.log"
    lines = gateway_lines()
    log.write_bytes(b"".join(lines[:30]) + lines[30][:50])    # ends inside line 30
    node = run({"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "50ms"})
    assert node.wait_log(lambda e: e.get("message") == "following log file")["offset"] == \
        sum(map(len, lines[:30]))
    append(log, lines[30][50:] + b"".join(lines[31:40]))
    wait_until(lambda: sorted(logged(node)) == sorted(expected(range(30, 40))), what="new lines only")


@needs_gateway_log
def test_a_log_that_appears_after_start_is_read_from_its_beginning(tmp_path: Path,
                                                                   run: Callable[..., Otrace]) -> None:
    """TRACE_LOG_START=end (the default) is for a file already there: one the gateway creates later
    is new from its first line."""
    logs = tmp_path / "openclaw"
    logs.mkdir()
    node = run({"TRACE_LOG_PATH": str(logs), "TRACE_LOG_POLL": "50ms"})
    node.wait_log(lambda e: e.get("message") == "waiting for the gateway log")
    (logs / "openclaw-2026-11-24.log").write_bytes(b"".join(gateway_lines()[:20]))
    wait_until(lambda: sorted(logged(node)) == sorted(expected(range(20))), what="the first lines too")


def committed_offsets(node: Otrace) -> list[tuple[str, int]]:
    with contextlib.closing(sqlite3.connect(node.db_path, timeout=10)) as conn:
        return conn.execute("SELECT path, position FROM log_offsets ORDER BY path").fetchall()


@needs_gateway_log
def test_a_file_skipped_to_its_end_resumes_there_after_a_restart(tmp_path: Path,
                                                                 run: Callable[..., Otrace]) -> None:
    """TRACE_LOG_START=end skips what the file held at the first start, and commits that offset: the
    lines written while otrace is down are read at the next start."""
    log = tmp_path / "gateway.log"
    lines = gateway_lines()
    log.write_bytes(b"".join(lines[:20]))
    env = {"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "50ms"}
    node = run(env)
    wait_until(lambda: committed_offsets(node) == [(str(log), sum(map(len, lines[:20])))],
               what="the skipped-to offset committed")
    assert node.stop() == 0
    append(log, b"".join(lines[20:40]))
    node = run(env)
    wait_until(lambda: sorted(logged(node)) == sorted(expected(range(20, 40))), what="the downtime's lines")


@needs_gateway_log
def test_a_log_mark_no_otrace_wrote_is_no_mark_of_the_file(tmp_path: Path,
                                                            run: Callable[..., Otrace]) -> None:
    """A log_offsets row edited by hand, its fingerprint no mark otrace writes: the start goes on, and
    the file is one not read before (it was a traceback, exit 1)."""
    log = tmp_path / "gateway.log"
    log.write_bytes(b"".join(gateway_lines()[:20]))
    env = {"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "50ms"}
    node = run(env)
    wait_until(lambda: committed_offsets(node), what="the offset committed")
    assert node.stop() == 0
    for n, mark in enumerate(("garbage", "\u00b2:0", "99999999999:" + "0" * 32)):
        db = tmp_path / f"edited-{n}.db"
        shutil.copy(node.db_path, db)
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("UPDATE log_offsets SET fingerprint = ?", (mark,))
        edited = run(env, db=db)
        edited.wait_log(lambda e: e.get("message") == "following log file")
        assert edited.stop() == 0, mark


@needs_gateway_log
def test_files_rotated_or_begun_while_otrace_was_down_are_read(tmp_path: Path,
                                                               run: Callable[..., Otrace]) -> None:
    """Once otrace has followed a log, a file of it that it has not seen is news from its first line:
    the file that took a rotated one's name, or the next day's, both made while otrace was down."""
    logs = tmp_path / "openclaw"
    logs.mkdir()
    today = logs / "openclaw-2026-11-24.log"
    lines = gateway_lines()
    today.write_bytes(b"".join(lines[:10]))
    env = {"TRACE_LOG_PATH": str(logs), "TRACE_LOG_POLL": "50ms"}
    node = run(env)
    wait_until(lambda: committed_offsets(node), what="the skipped-to offset committed")
    assert node.stop() == 0 and node.rows("log_events") == []
    append(today, b"".join(lines[10:20]))                        # while down: appended, rotated,
    today.rename(logs / "openclaw-2026-11-24.1.log")             # and a new file under its name
    today.write_bytes(b"".join(lines[20:30]))
    node = run(env)
    wait_until(lambda: sorted(logged(node)) == sorted(expected(range(10, 30))), what="both files")
    assert node.stop() == 0
    (logs / "openclaw-2026-11-25.log").write_bytes(b"".join(lines[30:45]))   # the next day, while down
    node = run(env)
    wait_until(lambda: sorted(logged(node)) == sorted(expected(range(10, 45))), what="the new day's file")
    assert node.stop() == 0
    (logs / "openclaw-2026-11-26.log").write_bytes(b"".join(lines[45:60]))   # two days while down: the
    (logs / "openclaw-2026-11-27.log").write_bytes(b"".join(lines[60:75]))   # first was skipped whole
    node = run(env)
    wait_until(lambda: sorted(logged(node)) == sorted(expected(range(10, 75))), what="both days' files")
    assert node.health()["events_duplicate"] == 0


def test_a_file_rotated_away_unread_is_read_after_a_stop_that_came_before_it(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """Rotated twice while otrace was down: at the next start it reads the older file, and a SIGKILL
    then, before it opened the newer one, left that one unknown and older than the reads of the first,
    so the start after took it for read and skipped it whole. A file found unread is recorded at its
    start with the first lines read after, and the directory's listing with it."""
    logs = tmp_path / "openclaw"
    logs.mkdir()
    live, lines = logs / "openclaw-2026-11-24.log", gateway_lines()
    live.write_bytes(b"".join(lines[:10]))
    env = {"TRACE_LOG_PATH": str(logs), "TRACE_LOG_POLL": "1s", "TRACE_LOG_START": "beginning"}
    node = run(env)
    wait_until(lambda: sorted(logged(node)) == sorted(expected(range(10))), timeout=60,
               what="the first lines")
    assert node.stop() == 0
    append(live, b"".join(lines[10:20]))                             # while down: rotated, written,
    live.rename(logs / "openclaw-2026-11-24.1.log")                  # and rotated again
    live.write_bytes(b"".join(lines[20:40]))
    (logs / "openclaw-2026-11-24.1.log").rename(logs / "openclaw-2026-11-24.2.log")
    live.rename(logs / "openclaw-2026-11-24.1.log")
    live.write_bytes(b"".join(lines[40:50]))
    node = run(env, db=node.db_path)
    wait_until(lambda: set(expected(range(20))) <= set(logged(node)), timeout=60,
               what="the older file's lines")
    node.kill()                                                      # before the newer file is opened
    node = run(env, db=node.db_path)
    wait_until(lambda: sorted(logged(node)) == sorted(expected(range(50))), timeout=60, what="every file")
    assert node.health()["events_duplicate"] == 0


@needs_gateway_log
def test_waiting_for_a_missing_log_is_one_line_when_it_starts_and_one_when_it_ends(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    log = tmp_path / "openclaw-2026-11-24.log"
    node = run({**POLLED, "TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "10ms",
                "TRACE_OPENCLAW_STATE_DIR": str(tmp_path / "state")})
    node.wait_log(lambda e: e.get("message") == "waiting for the gateway log")
    wait_until(lambda: node.health()["log_tail"]["polls"] > 50, what="50 polls")
    assert node.health()["log_tail"]["waiting"]

    def scraped() -> set[str]:                         # alerts on a path that never appears read these
        return {line for line in node.request("GET", "/metrics").body.decode().splitlines()
                if line.startswith(("otrace_log_tail_", "otrace_sessions_"))}

    assert scraped() == {"otrace_log_tail_waiting 1", "otrace_log_tail_lines_total 0",
                         "otrace_sessions_waiting 1", "otrace_sessions_calls_total 0"}
    log.write_bytes(b"".join(gateway_lines()[:5]))
    node.wait_log(lambda e: e.get("message") == "following log file")
    assert [e["message"] for e in node.lines if e.get("logger") == "otrace.logtail"] == [
        "waiting for the gateway log", "following log file"]
    assert node.health()["log_tail"]["last_error"] is None
    wait_until(lambda: "otrace_log_tail_lines_total 5" in scraped(), what="the lines counted")
    assert {"otrace_log_tail_waiting 0", "otrace_log_tail_lag_bytes 0"} <= scraped()
    assert node.stop() == 0


@needs_gateway_log
def test_a_line_cut_short_by_its_writer_does_not_take_the_next_whole_line_with_it(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A writer killed in the middle of a line leaves no newline: the next line written joins it. The
    cut line is lost (counted not JSON); the whole one after it is stored, at its own offset (it was
    read with the cut one as one line that is not JSON)."""
    log = tmp_path / "openclaw-2026-12-01.log"
    lines = gateway_lines()
    log.write_bytes(lines[15] + lines[16][:200])                       # the writer killed mid-line
    append(log, lines[17] + lines[18])
    node = run({"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "20ms", "TRACE_LOG_START": "beginning",
                "TRACE_OPENCLAW_STATE_DIR": "off"})
    wait_until(lambda: sorted(logged(node)) == sorted(expected([15, 17, 18])), what="the whole lines")
    assert node.health()["log_tail"]["not_json"] == 1
    offsets = {r["message"]: r["file_offset"] for r in node.rows("log_events")}
    assert offsets[json.loads(lines[17])["message"]] == len(lines[15]) + 200
    assert node.stop() == 0


@needs_gateway_log
def test_a_followed_log_whose_directory_is_removed_is_waited_for_as_at_a_start(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """The log's directory removed under otrace (a /tmp cleaned): /health says waiting, which the alert
    the docs give reads, until the gateway writes a new file (it said waiting only after a restart)."""
    logs = tmp_path / "openclaw"
    logs.mkdir()
    lines = gateway_lines()
    (logs / "openclaw-2026-12-01.log").write_bytes(b"".join(lines[10:20]))
    node = run({"TRACE_LOG_PATH": str(logs), "TRACE_LOG_POLL": "20ms", "TRACE_LOG_START": "beginning",
                "TRACE_OPENCLAW_STATE_DIR": "off"})
    wait_until(lambda: sorted(logged(node)) == sorted(expected(range(10, 20))), what="the first lines")
    assert not node.health()["log_tail"]["waiting"]
    shutil.rmtree(logs)
    wait_until(lambda: node.health()["log_tail"]["waiting"], what="waiting for the log again")
    assert node.logs("waiting for the gateway log")
    logs.mkdir()
    (logs / "openclaw-2026-12-02.log").write_bytes(b"".join(lines[20:30]))
    wait_until(lambda: sorted(logged(node)) == sorted(expected(range(10, 30))), what="the new file's lines")
    assert not node.health()["log_tail"]["waiting"]
    assert node.stop() == 0


@pytest.mark.parametrize("strange", ["fifo", "/dev/zero"])
def test_a_log_path_that_is_not_a_file_is_a_fault_said_once(tmp_path: Path, run: Callable[..., Otrace],
                                                            strange: str) -> None:
    """A FIFO with no writer, or /dev/zero: a fault, said once and shown in /health, that never holds
    the tail thread."""
    path = tmp_path / "fifo" if strange == "fifo" else Path(strange)
    if strange == "fifo":
        os.mkfifo(path)
    node = run({**POLLED, "TRACE_LOG_PATH": str(path), "TRACE_LOG_POLL": "10ms"})
    fault = wait_until(lambda: node.health()["log_tail"]["last_error"], what="the fault in /health")
    assert "not a regular file" in fault
    wait_until(lambda: node.health()["log_tail"]["polls"] > 50, what="50 polls")
    assert len(node.logs("logtail failing")) == 1
    assert node.post("/v1/traces", trace()).status == 202 and node.stop() == 0


@needs_gateway_log
def test_a_line_longer_than_64_kib_is_read_whole(tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """The line that ends a failed run, with a provider's 70 KB error body beside its message (OpenClaw
    cuts messages, not the values beside them): its log event and the run's error event are there."""
    log = tmp_path / "gateway.log"
    lines = gateway_lines()
    line = json.loads(lines[35])
    assert line["message"] == "model fallback decision"
    line["1"]["errorBody"] = "x" * 70_000
    log.write_bytes(b"".join(lines[:35]) + json.dumps(line).encode() + b"\n")
    node = run({"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "50ms", "TRACE_LOG_START": "beginning"})
    wait_until(lambda: sorted(logged(node)) == sorted(expected(range(36))), what="every line's event")
    wait_until(lambda: len(node.rows("error_events")) == 1, what="the run's failure")
    assert node.health()["log_tail"]["cut"] == 0


def fetch_answer(trace_id: str, status: int) -> bytes:
    """A captured `[model-fetch] response` line, of the run `trace_id`, answered `status`."""
    fetch = json.loads(gateway_lines()[27])
    text = fetch["message"].replace("status=200", f"status={status}")
    return json.dumps({**fetch, "1": text, "message": text, "traceId": trace_id}).encode() + b"\n"


@needs_gateway_log
def test_a_retried_call_read_again_behind_a_full_queue_is_one_row(tmp_path: Path,
                                                                    run: Callable[..., Otrace]) -> None:
    """Another program holds the write lock while the gateway logs a burst: the units read are turned
    away by the full queue and read again, the retry among them. The call is still one row, its last
    answer, with its attempts counted once each."""
    log = tmp_path / "gateway.log"
    log.touch()
    node = run({"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "20ms", "TRACE_QUEUE_SIZE": "8"})
    node.wait_log(lambda e: e.get("message") == "following log file")     # from its end: then empty
    retried = "ab" * 16
    with log.open("ab") as out:
        out.write(fetch_answer(retried, 429))
    wait_until(lambda: len(node.rows("llm_traces")) == 1, timeout=60, what="the first answer stored")
    with contextlib.closing(sqlite3.connect(node.db_path, timeout=30)) as lock:
        lock.execute("BEGIN IMMEDIATE")
        with log.open("ab") as out:     # the queue takes three units of one line, then turns the rest away
            others = [fetch_answer(f"{i:032x}", 200) for i in range(5)]
            retries = [fetch_answer(retried, 429), fetch_answer(retried, 200)]
            out.write(b"".join([*others[:2], *retries, *others[2:]]))
        size = log.stat().st_size
        wait_until(lambda: node.health()["log_tail"]["bytes_read"] > 4 * size, timeout=60,
                   what="units read again")
        lock.rollback()
    wait_until(lambda: node.health()["log_tail"]["lag_bytes"] == 0 and node.health()["queue_depth"] == 0,
               timeout=60, what="the log read")
    calls = [(r["status"], json.loads(r["metadata"]).get("attempts")) for r in node.rows("llm_traces")
             if r["status"] != "ok" or json.loads(r["metadata"]).get("attempts")]
    assert calls == [("ok", 3)]
    fetched = pair(*node.query("SELECT provider, model FROM llm_traces LIMIT 1")[0])
    samples = metric_samples(node)                 # the call once, its first answer's failure once
    assert (samples[f"otrace_gen_ai_calls_total{fetched}"], samples[
        f"otrace_gen_ai_call_failures_total{fetched}"]) == (6, 1)


@needs_gateway_log
def test_a_retry_read_after_a_restart_is_taken_into_its_calls_row(tmp_path: Path,
                                                                   run: Callable[..., Otrace]) -> None:
    """otrace stops between a call's failed answers and its retry's: the next run takes the retry into the
    call's row, as one run would, while another run's first answer stays a row of its own."""
    log = tmp_path / "gateway.log"
    log.touch()
    env = {"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "20ms"}
    node = run(env)
    node.wait_log(lambda e: e.get("message") == "following log file")     # from its end: then empty
    retried, other = "ef" * 16, "12" * 16
    with log.open("ab") as out:
        out.write(fetch_answer(retried, 429) + fetch_answer(retried, 503))
    wait_until(lambda: node.query("SELECT status, json_extract(metadata, '$.attempts') FROM llm_traces") == [
        ("error", 2)], timeout=60, what="the two failed answers, one row")
    assert node.stop() == 0
    with log.open("ab") as out:
        out.write(fetch_answer(other, 200) + fetch_answer(retried, 200))
    second = run(env, db=Path(node.db_path))
    wait_until(lambda: second.health()["log_tail"]["lines"] == 2 and second.health()["queue_depth"] == 0,
               timeout=60, what="the retry read")
    calls = "SELECT status, json_extract(metadata, '$.attempts') FROM llm_traces ORDER BY id"
    assert second.query(calls) == [("ok", 3), ("ok", None)]
    assert second.stop() == 0


@needs_gateway_log
def test_a_call_that_failed_again_is_remembered_from_its_last_failure(tmp_path: Path,
                                                                     run: Callable[..., Otrace]) -> None:
    """otrace remembers the last RUNS_REMEMBERED calls whose last answer failed: a call that failed again
    counts from then, so its retry is taken into its row though as many other calls failed since its
    first answer."""
    log = tmp_path / "gateway.log"
    log.touch()
    node = run({"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "20ms"})
    node.wait_log(lambda e: e.get("message") == "following log file")     # from its end: then empty
    retried, others = "ab" * 16, [f"{i:032x}" for i in range(otrace.RUNS_REMEMBERED)]
    meanwhile = [fetch_answer(other, 500) for other in others]
    for answers in ([fetch_answer(retried, 429), *meanwhile[:-1], fetch_answer(retried, 503), meanwhile[-1]],
                    [fetch_answer(retried, 200)]):
        lines = node.health()["log_tail"]["lines"] + len(answers)
        with log.open("ab") as out:
            out.write(b"".join(answers))
        wait_until(lambda n=lines: (h := node.health())["log_tail"]["lines"] == n and h["queue_depth"] == 0,
                   timeout=60, what="the answers read")
    assert node.query("SELECT status, json_extract(metadata, '$.attempts') FROM llm_traces WHERE status = "
                      "'ok'") == [("ok", 3)]
    assert node.query("SELECT count(*) FROM llm_traces") == [(len(others) + 1,)]


@needs_gateway_log
def test_a_retry_taken_into_a_row_the_receiver_may_hold_leaves_it_no_row_otrace_lacks(
        tmp_path: Path, run: Callable[..., Otrace], receiver: Receiver) -> None:
    """The first answer's row reaches the receiver, which says nothing until TRACE_PUSH_TIMEOUT (otrace
    counts it unpushed); the run's retry then answers 200 and is taken into that row, which goes again:
    the receiver holds no row otrace deleted."""
    log = tmp_path / "gateway.log"
    log.touch()
    on_wire, release = threading.Event(), threading.Event()
    receiver.script = [hang(5.0)]
    receiver.default = held(on_wire, release)          # later pushes wait until the retry is read
    node = run(push_env(receiver, TRACE_LOG_PATH=str(log), TRACE_LOG_POLL="20ms", TRACE_PUSH_TIMEOUT="1s",
                        TRACE_PUSH_INTERVAL="200ms"))
    node.wait_log(lambda e: e.get("message") == "following log file")     # from its end: then empty
    retried = "cd" * 16
    with log.open("ab") as out:
        out.write(fetch_answer(retried, 429))
    wait_until(lambda: node.query("SELECT count(*) FROM push_log WHERE error LIKE 'no whole answer%'")[0][0],
               timeout=60, what="the first answer's row sent, its answer never whole")
    with log.open("ab") as out:
        out.write(fetch_answer(retried, 200))
    wait_until(lambda: node.query("SELECT status, json_extract(metadata, '$.attempts') FROM llm_traces") == [
        ("ok", 2)], timeout=60, what="the retry taken into the first answer's row")
    release.set()
    wait_until(lambda: node.query("SELECT synced FROM llm_traces") == [(1,)], timeout=60,
               what="the call pushed")
    sent = {e["trace_id"] for r in receiver.requests for e in r["json"]["events"]
            if e["event_id"].startswith("llm_trace:")}
    assert sent == {node.rows("llm_traces")[0]["trace_id"]}


@needs_gateway_log
def test_lines_with_numbers_int_refuses_are_read_and_the_log_goes_on(tmp_path: Path,
                                                                      run: Callable[..., Otrace]) -> None:
    """"status=²" (a digit to str.isdigit(), not to int()), a status of 5,000 digits, an argument keyed
    "²": each stays a log event, and the lines after them are read (each held the log at it for good)."""
    fetch = json.loads(gateway_lines()[27])
    assert fetch["message"].startswith("[model-fetch] response")
    assert "status=200 elapsedMs=13" in fetch["message"]

    def fetch_line(said: str) -> bytes:
        text = fetch["message"].replace("status=200 elapsedMs=13", said)
        return json.dumps({**fetch, "1": text, "message": text}).encode() + b"\n"

    keyed = {"\u00b2": {"weird": True}, "message": "odd argument", "_meta": {"logLevelName": "ERROR"}}
    log = tmp_path / "gateway.log"
    log.write_bytes(fetch_line("status=\u00b2 elapsedMs=13") + fetch_line("status=200 elapsedMs=\u00b2")
                    + fetch_line(f"status={'9' * 5000} elapsedMs=1") + json.dumps(keyed).encode() + b"\n"
                    + gateway_lines()[10])
    node = run({"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "20ms", "TRACE_LOG_START": "beginning"})
    wait_until(lambda: [r["kind"] for r in node.rows("log_events")] == [
        "model_call", "model_call", "model_call", "other", "gateway_start"], what="every line's event")
    traces = node.rows("llm_traces")
    assert [(t["status"], t["latency_ms"]) for t in traces] == [("ok", None)]   # the one with a status
    health = node.health()["log_tail"]
    assert health["last_error"] is None and health["unreadable"] == 0


@pytest.mark.skipif(not ROOT, reason="reading as another user needs root to become one")
@pytest.mark.parametrize("store", [False, True], ids=["log-alone", "store-followed"])
def test_a_log_in_a_directory_otrace_may_not_enter_is_a_fault_not_a_failed_start(
        run: Callable[..., Otrace], store: bool) -> None:
    """The gateway's log directory is 0700: an otrace of another user starts, serves, and says why it
    reads no log; /health is degraded when the log is the one source of the gateway's model calls,
    and ok when its session store is followed (it holds them)."""
    if store and not STATE_9.exists():
        pytest.skip("needs ../shared beside the repo")
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="otrace-log-"))      # outside pytest's 0700 directory
    try:
        folder.chmod(0o777)
        (logs := folder / "openclaw").mkdir(mode=0o700)
        (logs / "openclaw-2026-12-01.log").write_bytes(b"{}\n")
        env = {"TRACE_LOG_PATH": str(logs / "openclaw-2026-12-01.log"), "TRACE_LOG_POLL": "20ms"}
        if store:
            state = state_copy(folder)
            for path in (state, *state.rglob("*")):
                os.chown(path, 65534, 65534)
            env |= {**STORE_ENV, "TRACE_OPENCLAW_STATE_DIR": str(state)}
        node = run(env, db=folder / "otrace.db", command=["setpriv", "--reuid=65534", "--regid=65534",
                                                          "--clear-groups", *START])
        fault = wait_until(lambda: node.health()["log_tail"]["last_error"], what="the fault in /health")
        assert "PermissionError" in fault
        health = node.request("GET", "/health")                 # serving is fine either way
        assert "PermissionError" in health.json["loops_failing"]["logtail"]["error"]
        said = [p for p in health.json["problems"] if p.startswith("the gateway log cannot be read")]
        if store:
            assert health.status == 200 and not said, health.json["problems"]
        else:
            assert health.status == 503 and said and "PermissionError" in said[0] and \
                "TRACE_LOG_PATH" in said[0]
        assert 'otrace_loop_failing{loop="logtail"} 1' in node.request("GET", "/metrics").body.decode()
        assert node.post("/v1/traces", trace()).status == 202 and node.stop() == 0
    finally:
        shutil.rmtree(folder)


@needs_gateway_log
def test_a_log_first_seen_short_is_not_read_again_after_a_restart(tmp_path: Path,
                                                                   run: Callable[..., Otrace]) -> None:
    """A new day's file is empty when otrace first opens it: the mark of its first bytes grows with
    it, and a restart resumes at the committed offset (it read the file again from the first mark,
    and rows retention had deleted came back)."""
    log = tmp_path / "openclaw-2026-12-01.log"
    log.touch()
    env = {"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "20ms"}
    node = run(env)
    node.wait_log(lambda e: e.get("message") == "following log file")
    lines = gateway_lines()
    for i in (10, *range(11, 30)):                   # one line, then many: short first, long after
        append(log, lines[i])
        if i == 10:
            wait_until(lambda: len(node.rows("log_events")) == 1, what="the first line")
    wait_until(lambda: sorted(logged(node)) == sorted(expected(range(10, 30))), what="every line")
    assert node.stop() == 0
    assert len(node.query("SELECT * FROM log_offsets")) == 1             # one mark a file
    with contextlib.closing(sqlite3.connect(node.db_path)) as conn, conn:  # and one an older otrace left
        conn.execute("INSERT INTO log_offsets (dev, inode, fingerprint, path, position, updated_at) "
                     "SELECT dev, inode, '0:00000000', path, 0, 1 FROM log_offsets")
    node = run(env, db=node.db_path)
    assert node.wait_log(lambda e: e.get("message") == "following log file")["offset"] == log.stat().st_size
    append(log, lines[44])
    wait_until(lambda: sorted(logged(node)) == sorted(expected([*range(10, 30), 44])), what="the new line")
    assert node.health()["events_duplicate"] == 0


@needs_gateway_log
def test_secrets_a_gateway_error_quotes_stay_out_of_the_database_and_the_log(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A channel's failed request with its bot token in the URL, a request's headers, a provider's
    error ending a run: stored with *** in place of each secret; a line that is not JSON is logged at
    debug without its text. OpenClaw's own words (a model call's line) are stored as written."""
    bot, key = "123456789:AAHsecretTelegramBotTokenXYZ0123456789", "sk-proj-QAsecretKEY0123456789abcdef"
    other = "hunter2x"
    channel = {"0": '{"subsystem":"channels/telegram"}', "_meta": {"logLevelName": "ERROR",
               "name": '{"subsystem":"channels/telegram"}'}, "message": f"getUpdates failed: request to "
               f"https://api.telegram.org/bot{bot}/getUpdates failed, reason: ECONNRESET"}
    headers = {"_meta": {"logLevelName": "ERROR", "name": '{"subsystem":"gateway"}'},
               "message": f"request headers {{authorization: 'Bearer {key}'}}",
               "1": {"request": {"headers": {"x-api-key": key, "password": f"{other} and more"},
                                 "token": None, "tokens": 12, "url": f"https://x.blob/c?sv=1&sig={other}"}}}
    decision = json.loads(gateway_lines()[35])
    decision["1"]["errorPreview"] = f"401 invalid api_key={other} for https://user:{other}@proxy.local/v1"
    binding = '{"subsystem":"agent/embedded"}'               # as the gateway writes it: the message is the
    sent = {"rawHeaders": ["Accept", "json", "X-Api-Key", key], "jwt": other}    # text, then the JSON
    repeated = {"0": binding, "1": "provider request failed", "2": sent, "_meta": {
        "logLevelName": "WARN", "name": binding}, "message": f"provider request failed {json.dumps(sent)}"}
    large = {"apiKey": key, "body": "x" * 20_000}              # past TRACE_MAX_TEXT_BYTES as JSON
    big = {**repeated, "2": large, "message": f"provider request failed {json.dumps(large)}"}
    log = tmp_path / "gateway.log"
    log.write_bytes(b"".join(json.dumps(line).encode() + b"\n" for line in (channel, headers, decision))
                    + f"curl -H 'Authorization: Bearer {key}'\n".encode() + gateway_lines()[27]
                    + b"".join(json.dumps(line).encode() + b"\n" for line in (repeated, big)))
    node = run({"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "20ms", "TRACE_LOG_START": "beginning",
                "TRACE_LOG_LEVEL": "debug"})
    wait_until(lambda: len(node.rows("log_events")) == 6 and len(node.rows("error_events")) == 1,
               what="the events")
    assert node.stop() == 0
    stored = node.db_path.read_bytes() + json.dumps(node.lines).encode()
    for secret in (bot, key, other):
        assert secret.encode() not in stored
    events = node.rows("log_events")
    assert "https://api.telegram.org/bot***/getUpdates" in events[0]["message"]
    assert "Bearer ***" in events[1]["message"] and json.loads(events[1]["detail"])["request"] == {
        "headers": {"x-api-key": "***", "password": "***"}, "token": None, "tokens": 12,
        "url": "https://x.blob/c?sv=1&sig=***"}                      # JSON still, and only secrets masked
    assert node.rows("error_events")[0]["message"] == \
        "model fallback decision: 401 invalid api_key=*** for https://user:***@proxy.local/v1"
    assert events[3]["message"] == json.loads(gateway_lines()[27])["message"]
    assert events[4]["message"] == ('provider request failed {"rawHeaders":["Accept","json","X-Api-Key",'
                                    '"***"],"jwt":"***"}')          # masked as the JSON it is, not as text
    assert events[5]["message"].startswith('provider request failed {"apiKey":"***","body":"xxx')   # its
    assert json.loads(events[5]["detail"])["_otrace_truncated"]            # words kept, the detail too big
    assert node.logs("log line is not JSON")


@needs_gateway_log
@pytest.mark.parametrize("store", [False, True])
def test_a_candidate_that_failed_before_a_fallback_answered_is_one_error_event(
        tmp_path: Path, run: Callable[..., Otrace], store: bool) -> None:
    """A run whose primary model failed and whose fallback answered: the primary's failure is one
    error event from its "candidate_failed ... next_fallback" line, with or without the session store
    (which keeps only the answer); the fallback's "candidate_succeeded" line is no failure."""
    decision = json.loads(gateway_lines()[35])
    info = decision["1"]
    failed = {**info, "decision": "candidate_failed", "candidateProvider": "primary",
              "candidateModel": "big", "status": 500, "reason": "server_error",
              "fallbackStepFinalOutcome": "next_fallback",
              "nextCandidateProvider": "backup", "nextCandidateModel": "small"}
    succeeded = {**info, "decision": "candidate_succeeded", "candidateProvider": "backup",
                 "candidateModel": "small", "fallbackStepFinalOutcome": "succeeded"}
    log = tmp_path / "gateway.log"
    log.write_bytes(b"".join(json.dumps({**decision, "1": one}).encode() + b"\n"
                             for one in (failed, succeeded)))
    env = {"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "20ms", "TRACE_LOG_START": "beginning"}
    if store:
        env |= {**STORE_ENV, "TRACE_OPENCLAW_STATE_DIR": str(state_copy(tmp_path))}
    node = run(env)
    wait_until(lambda: len(node.rows("log_events")) == 2, what="both lines")
    node.wait_persisted(0)
    wait_until(lambda: node.health()["log_tail"]["lines"] == 2 and node.health()["queue_depth"] == 0,
               what="both lines committed")
    errors = [(e["provider"], e["model"], e["category"]) for e in node.rows("error_events")
              if e["source"] == "log"]
    assert errors == [("primary", "big", "api_failure")]
    assert [e["kind"] for e in node.rows("log_events")] == ["model_error", "other"]


@needs_gateway_log
def test_a_last_line_that_never_ends_is_not_read_again_and_again(tmp_path: Path,
                                                                 run: Callable[..., Otrace]) -> None:
    """8 MiB with no newline: held back (cut at TRACE_LOG_LINE_MAX once it ends), and the lines after
    it are read."""
    log = tmp_path / "openclaw-2026-11-24.log"
    log.write_bytes(gateway_lines()[0])
    node = run({**POLLED, "TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "10ms",
                "TRACE_LOG_START": "beginning"})
    wait_until(lambda: node.health()["log_tail"]["lines"] == 1, what="the first line")
    append(log, b"x" * (8 << 20))
    whole = (8 << 20) + len(gateway_lines()[0])
    read = wait_until(lambda: (t := node.health()["log_tail"])["bytes_read"] == whole and t, what="all once")
    polls = read["polls"]
    wait_until(lambda: node.health()["log_tail"]["polls"] > polls + 100, what="100 polls more")
    assert node.health()["log_tail"]["bytes_read"] == read["bytes_read"]     # none of it read again
    append(log, b"\n" + gateway_lines()[1])
    wait_until(lambda: node.health()["log_tail"]["lines"] == 3, what="the lines after it")
    assert node.health()["log_tail"]["cut"] == 1


@needs_gateway_log
def test_a_quiet_log_is_looked_at_less_and_less_often_until_a_line_comes(tmp_path: Path) -> None:
    """Each look that finds nothing doubles the wait, up to TRACE_QUIET_POLL; a line resets it."""
    log = tmp_path / "openclaw-2026-11-24.log"
    log.write_bytes(gateway_lines()[0])
    config = otrace.Config(db_path=str(tmp_path / "o.db"), log_path=str(log), log_poll=0.1,
                           quiet_poll=1.0, log_start="beginning")
    otrace.open_database(config.db_path)
    tailer = otrace.LogTailer(config, otrace.EventQueue(512, 50), otrace.Database(config.db_path))

    def look() -> float:
        """One turn of the loop (Loop.run): a tick, then the wait before the next."""
        tailer.news = False
        tailer.tick()
        return tailer.next_delay()

    assert look() == 0.1 and tailer.totals.snapshot()["lines"] == 1            # it read a line
    assert [look() for _ in range(6)] == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    append(log, gateway_lines()[1])
    assert look() == 0.1 and tailer.totals.snapshot()["lines"] == 2


def held_by_a_client(capacity: int) -> otrace.EventQueue:
    """A queue whose room a client's events fill: a reader's unit of rows is refused (after READER_WAIT)."""
    events = otrace.EventQueue(capacity, 50)
    assert events.offer(otrace.Unit([otrace.Row("llm_traces", ())] * capacity))
    return events


def taken(events: otrace.EventQueue) -> list[otrace.Unit]:
    """Every unit waiting, taken and done as the writer would after committing them."""
    units = []
    while batch := events.next_work(10**6, 0, idle=0):
        for unit in batch:
            events.done(unit)
        units += batch
    return units


@needs_gateway_log
def test_lines_read_again_after_a_full_queue_are_counted_once(tmp_path: Path) -> None:
    """A unit the queue refuses is read again: /health counts each line once, in one place."""
    lines = gateway_lines()
    kept = [i for i in EXPECTED_KINDS if not EXPECTED_KINDS[i].startswith("model_")][:3]   # a row each
    skipped = [i for i in range(len(lines)) if i not in EXPECTED_KINDS][:6]
    log = tmp_path / "openclaw-2026-11-24.log"
    log.write_bytes(b"not json\n" + b"".join(lines[i] for i in skipped[:2] + kept[:1] + skipped[2:]
                                             + kept[1:]))
    config = otrace.Config(db_path=str(tmp_path / "o.db"), log_path=str(log), log_start="beginning",
                           queue_size=8)
    otrace.open_database(config.db_path)
    events = held_by_a_client(8)
    tailer = otrace.LogTailer(config, events, otrace.Database(config.db_path))
    tailer.tick()
    assert tailer.behind and tailer.totals.snapshot()["lines"] == 0    # its first unit was refused
    units = taken(events)
    tailer.tick()
    units += taken(events)
    assert not tailer.behind
    totals = tailer.totals.snapshot()
    stored = sum(row.table == "log_events" for unit in units for row in unit.rows)
    assert (totals["lines"], totals["not_json"], totals["skipped"], stored) == (10, 1, 6, 3)


@needs_gateway_log
def test_a_model_fetch_line_with_a_very_long_word_is_read_at_once(tmp_path: Path,
                                                                  run: Callable[..., Otrace]) -> None:
    """Its key=value fields are found from word starts only: tried at every place of a word with no =,
    a 300,000-character one took minutes (a megabyte's, hours), and held the whole log back."""
    line = json.loads(gateway_lines()[27])                 # a [model-fetch] response line
    line["message"] = line["message"].replace("response ", "response " + "x" * 300_000 + " ")
    log = tmp_path / "openclaw-2026-11-24.log"
    log.write_bytes(json.dumps(line).encode() + b"\n" + gateway_lines()[39])
    node = run({"TRACE_LOG_PATH": str(log), "TRACE_LOG_START": "beginning", "TRACE_LOG_POLL": "10ms",
                "TRACE_OPENCLAW_STATE_DIR": "off"})
    wait_until(lambda: node.health()["log_tail"]["lines"] == 2, timeout=60, what="both lines read")
    calls = wait_until(lambda: node.query("SELECT model, status FROM llm_traces"), what="their calls")
    assert sorted(calls) == [("mock-model", "error"), ("mock-model", "ok")]    # the long line's: ok


@needs_gateway_log
def test_a_line_numbering_an_argument_twice_is_read(tmp_path: Path) -> None:
    """"1" and "01" both name argument 1: taken in the order written, not compared (a structure and
    another would not compare, and the line was lost as unreadable)."""
    line = json.loads(gateway_lines()[37])                 # a WARN line
    line |= {"01": {"b": 2}, "2": {"a": 1}, "02": [1]}
    log = tmp_path / "openclaw-2026-11-24.log"
    log.write_bytes(json.dumps(line).encode() + b"\n")
    config = otrace.Config(db_path=str(tmp_path / "o.db"), log_path=str(log), log_start="beginning")
    otrace.open_database(config.db_path)
    events = otrace.EventQueue(512, 50)
    tailer = otrace.LogTailer(config, events, otrace.Database(config.db_path))
    tailer.look()
    totals = tailer.totals.snapshot()
    assert (totals["lines"], totals["unreadable"], totals["events"]) == (1, 0, 1)
    assert otrace.LogLine(line).numbered[-2:] == [(2, {"a": 1}), (2, [1])]


@needs_gateway_log
def test_a_log_written_back_to_the_size_read_is_read_again_from_its_start(tmp_path: Path) -> None:
    """Truncated and rewritten to exactly the size already read: the size cannot tell, the
    modification time and the first bytes do."""
    first = gateway_lines()[0]
    other = first.replace(b"loading configuration", b"Loading configuration")
    assert len(other) == len(first) and other != first
    log = tmp_path / "openclaw-2026-11-24.log"
    log.write_bytes(first)
    config = otrace.Config(db_path=str(tmp_path / "o.db"), log_path=str(log), log_start="beginning")
    otrace.open_database(config.db_path)
    tailer = otrace.LogTailer(config, otrace.EventQueue(512, 50), otrace.Database(config.db_path))
    tailer.tick()
    assert tailer.totals.snapshot()["lines"] == 1 and tailer.current.offset == len(first)
    read = log.stat()
    log.write_bytes(other)
    os.utime(log, ns=(read.st_atime_ns, read.st_mtime_ns + 1_000_000))   # later, whatever the clock's step
    tailer.tick()
    assert tailer.totals.snapshot()["lines"] == 2 and tailer.current.offset == len(other)


@needs_gateway_log
def test_a_log_truncated_under_otrace_shows_its_whole_size_as_lag_before_it_is_looked_at(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """Between a truncation and the look that finds it, the file is shorter than the offset read:
    /health and /metrics show the whole file as lag, to be read again from its start; not minus the
    bytes cut (an alert would read the tail ahead), nor none (nothing would show it behind)."""
    log = tmp_path / "openclaw-2026-11-24.log"
    lines = gateway_lines()
    log.write_bytes(b"".join(lines))
    node = run({"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "1m"})   # a look at start, the next in a minute
    wait_until(lambda: node.health()["log_tail"]["offset"] == log.stat().st_size, what="the file followed")
    log.write_bytes(cut := b"".join(lines[:5]))                # the gateway starts it again, in place

    def cut_not_yet_seen() -> dict[str, Any] | None:
        tail = node.health()["log_tail"]
        return tail if tail["offset"] > log.stat().st_size else None

    before = wait_until(cut_not_yet_seen, what="the truncation, not yet looked at")
    scraped = metric_samples(node)["otrace_log_tail_lag_bytes"]
    after = wait_until(cut_not_yet_seen, what="the truncation, still not looked at")   # around the scrape
    assert (before["lag_bytes"], scraped, after["lag_bytes"]) == (len(cut),) * 3
    assert node.stop() == 0


@functools.cache
def listings() -> list[int]:
    """The threads that list a directory from now on, once per listing: os.listdir and os.scandir
    raise audit events, and an audit hook cannot be taken back, so one serves every test."""
    listed: list[int] = []
    sys.addaudithook(lambda event, _: listed.append(threading.get_ident()) if event in (
        "os.listdir", "os.scandir") else None)
    return listed


def quick_look(reader: otrace.Loop) -> bool:
    """One turn of a quiet reader's loop (Loop.run): True when it took the stat calls alone, without a
    look (which finds something, or lists a directory to find that there is nothing)."""
    listed, me = listings(), threading.get_ident()
    before = listed.count(me)
    reader.news = False
    reader.tick()
    return not reader.news and listed.count(me) == before



def look_until_quiet(reader: otrace.Loop) -> None:
    """Turns of a quiet reader's loop until one takes the stat calls alone (what there was is read)."""
    wait_until(lambda: quick_look(reader), what="a turn with the stat calls alone")

@needs_gateway_log
def test_a_quiet_log_takes_a_few_stat_calls_until_a_file_it_reads_changes(tmp_path: Path) -> None:
    """After a look that found nothing, a look at the same files lists no directory and reads nothing;
    a line, the next day's file and a rename rotation are each what the next look sees; another
    profile's log of that day, written last, is not followed (its gateway's lines are not this one's)."""
    logs = tmp_path / "openclaw"
    logs.mkdir()
    lines = gateway_lines()
    today = logs / "openclaw-2026-11-24.log"
    today.write_bytes(lines[0])
    config = otrace.Config(db_path=str(tmp_path / "o.db"), log_path=str(logs), log_start="beginning")
    otrace.open_database(config.db_path)
    tailer = otrace.LogTailer(config, otrace.EventQueue(512, 50), otrace.Database(config.db_path))
    tailer.stamps = otrace.Stamps(margin_ns=0)           # files written just now are trusted here

    def read() -> int:
        return tailer.totals.snapshot()["lines"]

    def until_quiet() -> list[bool]:
        """Turns until one takes the stat calls alone (a rotation takes a few: see LogTailer.look)."""
        turns = [quick_look(tailer)]
        while not turns[-1] and len(turns) < 6:
            turns.append(quick_look(tailer))
        return turns

    assert until_quiet() == [False, False, True] and read() == 1     # read, then found nothing
    assert [quick_look(tailer), quick_look(tailer)] == [True, True] and read() == 1
    append(today, lines[1])
    assert until_quiet() == [False, False, True] and read() == 2
    tomorrow = logs / "openclaw-2026-11-25.log"
    tomorrow.write_bytes(lines[2])
    assert not until_quiet()[0] and read() == 3 and tailer.health()["file"] == str(tomorrow)
    tomorrow.rename(logs / "openclaw-2026-11-25.1.log")               # size rotation
    tomorrow.write_bytes(lines[3])
    assert not until_quiet()[0] and read() == 4 and tailer.health()["file"] == str(tomorrow)
    other = logs / "openclaw-ops-2026-11-25.log"                       # another profile's log, older
    other.write_bytes(lines[4])
    os.utime(other, ns=(tomorrow.stat().st_mtime_ns - 10**9,) * 2)
    assert until_quiet()[-1] and tailer.health()["file"] == str(tomorrow) and read() == 4
    append(other, lines[5])                                            # now the newest of the day
    assert until_quiet()[-1] and read() == 4 and tailer.health()["file"] == str(tomorrow)
    append(tomorrow, lines[5])
    assert not until_quiet()[0] and read() == 5 and tailer.health()["file"] == str(tomorrow)


def in_select(task: Path) -> bool:
    """Whether a thread (/proc/<pid>/task/<tid>) sleeps in select or poll: a quiet reader waiting for
    the kernel's word, where a wait on its timer is a futex's."""
    with contextlib.suppress(OSError):
        return (task / "wchan").read_text().startswith(("poll_schedule_timeout", "do_select", "do_sys_poll"))
    return False


def changed_during_the_wait(reader: otrace.QuietReader, change: Callable[[], Any]) -> None:
    """`change` made while a quiet reader waits for the kernel's word (a day, by its poll): the wait
    ends (told of it, or at the reader's own timeout)."""
    ended = threading.Event()
    waiting = threading.Thread(target=lambda: (reader.pause(86400.0), ended.set()), daemon=True)
    waiting.start()
    try:
        wait_until(lambda: in_select(Path(f"/proc/self/task/{waiting.native_id}")),
                   what="the reader waiting on the kernel's word (a poll, not its timer)")
        change()
        assert ended.wait(60), "the change was not told"
    finally:
        if not ended.is_set():
            reader.wake()                # a wait the test failed to end ends here
        waiting.join(60)


@needs_gateway_log
def test_a_quiet_log_waits_for_the_kernels_word_that_a_file_it_reads_changed(tmp_path: Path) -> None:
    """Once a look finds nothing, the tailer waits for inotify's word rather than its next poll: a line,
    the next day's file and a rename rotation each end the wait, and are what the next look reads; a
    wake (a stop) ends it too."""
    logs = tmp_path / "openclaw"
    logs.mkdir()
    lines = gateway_lines()
    today = logs / "openclaw-2026-11-24.log"
    today.write_bytes(lines[0])
    config = otrace.Config(db_path=str(tmp_path / "o.db"), log_path=str(logs), log_start="beginning",
                           notified_poll=86400.0)
    otrace.open_database(config.db_path)
    tailer = otrace.LogTailer(config, otrace.EventQueue(512, 50), otrace.Database(config.db_path))
    tailer.stamps = otrace.Stamps(margin_ns=0)           # files written just now are trusted here

    def read_when_quiet() -> int:
        look_until_quiet(tailer)
        return tailer.totals.snapshot()["lines"]

    assert read_when_quiet() == 1
    changed_during_the_wait(tailer, lambda: append(today, lines[1]))
    assert read_when_quiet() == 2
    tomorrow = logs / "openclaw-2026-11-25.log"
    changed_during_the_wait(tailer, lambda: tomorrow.write_bytes(lines[2]))
    assert read_when_quiet() == 3 and tailer.health()["file"] == str(tomorrow)
    changed_during_the_wait(tailer, lambda: (tomorrow.rename(logs / "openclaw-2026-11-25.1.log"),
                                             tomorrow.write_bytes(lines[3])))
    assert read_when_quiet() == 4 and tailer.health()["file"] == str(tomorrow)
    changed_during_the_wait(tailer, lambda: append(tomorrow, lines[4]))  # the new file, under the same
    assert read_when_quiet() == 5                                          # name and descriptor
    changed_during_the_wait(tailer, tailer.wake)
    assert read_when_quiet() == 5 and tailer.notified_poll == 86400.0


@needs_gateway_log
def test_word_of_a_change_restarts_the_tailers_pace_and_a_neighbours_costs_one_short_timer_wait(
        tmp_path: Path) -> None:
    """Word of a change has the next look come TRACE_LOG_POLL later, not at the quiet wait's pace, also
    when the look it brought found nothing (what was told may show a moment later: a SQLite commit's
    index follows its last write). Word of a change to another file of the directory finds the stamps
    as they were: the next wait is on the timer, TRACE_LOG_POLL long (a busy neighbour wakes the tailer
    at most twice in one), and a line written meanwhile ends the wait for the kernel's word at once."""
    logs = tmp_path / "openclaw"
    logs.mkdir()
    lines = gateway_lines()
    today, neighbour = logs / "openclaw-2026-11-24.log", logs / "notes.txt"
    today.write_bytes(lines[0])
    neighbour.write_bytes(b"")
    config = otrace.Config(db_path=str(tmp_path / "o.db"), log_path=str(logs), log_start="beginning",
                           notified_poll=86400.0)
    otrace.open_database(config.db_path)
    tailer = otrace.LogTailer(config, otrace.EventQueue(512, 50), otrace.Database(config.db_path))
    tailer.stamps = otrace.Stamps(margin_ns=0)
    look_until_quiet(tailer)
    changed_during_the_wait(tailer, lambda: today.chmod(0o640))     # its times change, not its lines
    assert not quick_look(tailer) and tailer.totals.snapshot()["lines"] == 1
    assert tailer.next_delay() == config.log_poll                   # not twice the wait before
    look_until_quiet(tailer)
    changed_during_the_wait(tailer, lambda: os.utime(neighbour))
    assert quick_look(tailer)                                       # what it reads is as it was
    tailer.quiet = 86400.0               # were the timer's wait the quiet one, it would last a day
    append(today, lines[1])              # written while the tailer waits on its timer
    for _ in range(2):                   # the timer's wait (TRACE_LOG_POLL), then the kernel's: at once
        waiting = threading.Thread(target=tailer.pause, args=(config.log_poll,), daemon=True)
        waiting.start()
        waiting.join(60)
        if waiting.is_alive():
            tailer.wake()
            pytest.fail("a line written after word of a neighbour's change waited for more than its poll")
    assert not quick_look(tailer) and tailer.totals.snapshot()["lines"] == 2


@needs_gateway_log
def test_a_running_otrace_reads_a_quiet_log_on_the_kernels_word(tmp_path: Path,
                                                                run: Callable[..., Otrace]) -> None:
    """As otrace runs by default: once the log is quiet its tailer waits for the kernel's word, not a
    timer (/health says `notified`), and a line appended then is read."""
    log = tmp_path / "openclaw.log"
    log.write_bytes(gateway_lines()[0])
    os.utime(log, (time.time() - 60,) * 2)          # older than the stamps' margin: trusted at once
    node = run({"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "50ms", "TRACE_QUIET_POLL": "10m"})
    wait_until(lambda: any(in_select(task) for task in Path(f"/proc/{node.proc.pid}/task").iterdir()),
               what="the tailer waiting on the kernel's word")
    assert node.health()["log_tail"]["lines"] == 0 and node.health()["log_tail"]["notified"]
    append(log, gateway_lines()[1])
    wait_until(lambda: node.health()["log_tail"]["lines"] == 1, what="the line appended read")


@needs_gateway_log
def test_a_wait_for_the_kernels_word_that_fails_leaves_the_tailer_polling(tmp_path: Path,
                                                                         run: Callable[..., Otrace]) -> None:
    """A bug in the wait for the kernel's word is said with its traceback, and the tailer looks on its
    timer from then on: a line is still read, and /health says it is not notified."""
    log = tmp_path / "openclaw.log"
    log.write_bytes(gateway_lines()[0])
    os.utime(log, (time.time() - 60,) * 2)
    mark = tmp_path / "bug"
    mark.touch()
    node = run({"BUG_MARK": str(mark), "TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "50ms"},
               command=with_a_bug("Changes.wait", "a bug in the wait"))
    said = node.wait_log(lambda line: line["message"].startswith("waiting for the kernel's word of a change"))
    assert said["level"] == "ERROR" and "a bug in the wait" in said["exc_info"]   # a bug: its traceback
    assert not node.health()["log_tail"]["notified"]
    append(log, gateway_lines()[1])
    wait_until(lambda: node.health()["log_tail"]["lines"] == 1, what="the line read on the timer")
    assert node.health()["loops_failing"] == {}


@needs_gateway_log
def test_a_change_the_kernel_does_not_tell_of_has_the_tailer_poll(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A write through a shared mapping changes the file's times but makes no inotify event (so does a
    write from another machine over NFS): the wait for the kernel's word ends at its timeout, sees the
    file changed, says so once, and from then on the tailer polls."""
    log = tmp_path / "openclaw-2026-11-24.log"
    log.write_bytes(gateway_lines()[0])
    config = otrace.Config(db_path=str(tmp_path / "o.db"), log_path=str(log), log_start="beginning")
    otrace.open_database(config.db_path)
    tailer = otrace.LogTailer(config, otrace.EventQueue(512, 50), otrace.Database(config.db_path))
    tailer.stamps = otrace.Stamps(margin_ns=0)
    look_until_quiet(tailer)
    tailer.notified_poll = 0.05          # the wait's timeout, shortened below the setting's least (1 s)
    tailer.pause(0.0)
    assert tailer.notified_poll == 0.05  # nothing changed: its word is still waited for
    tailer.notified_poll = 2.0

    def write_through_a_mapping() -> None:
        with open(log, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
            mapped[0:1] = b" "
            mapped.flush()

    with caplog.at_level(logging.INFO, logger="otrace"):
        changed_during_the_wait(tailer, write_through_a_mapping)
    assert tailer.notified_poll == 0.0
    assert [r.getMessage() for r in caplog.records if "did not tell" in r.getMessage()] == [
        "the kernel did not tell of a change to these files (a network filesystem?): looking at them every "
        "TRACE_QUIET_POLL from now on"]


def test_changes_are_told_for_a_file_a_directory_gains_and_not_for_a_directory_not_there(tmp_path: Path
                                                                                        ) -> None:
    changes = otrace.Changes.made()
    assert changes is not None
    try:
        assert not changes.watch((str(tmp_path / "gone" / "x.log"),), [None])   # its directory is not there
        log = tmp_path / "x.log"
        assert changes.watch((str(log),), [None]) and not changes.wait(0.01)
        log.write_bytes(b"a line\n")                                            # not there when watched
        assert changes.wait(60) and not changes.wait(0.01)
        assert changes.watch((str(log),), [otrace.stamp(str(log))])             # watched anew: itself
        append(log, b"a line\n")
        assert changes.wait(60) and not changes.wait(0.01)
    finally:
        changes.close()


@needs_gateway_log
def test_every_captured_line_is_classified_as_the_gateway_meant_it() -> None:
    kinds = {i: otrace.classify(line) for i, raw in enumerate(gateway_lines())
             if (line := otrace.LogLine.parse(raw)) and otrace.classify(line)}
    assert kinds == EXPECTED_KINDS
    failures = {i: otrace.model_failure(otrace.LogLine.parse(gateway_lines()[i]), kind)
                for i, kind in kinds.items() if kind in ("model_call", "model_error")}
    assert {i: f and f["category"] for i, f in failures.items()} == {   # 31, 35: OpenClaw's own reason
        27: None, 30: "network_failure", 31: "timeout", 34: "network_failure", 35: "timeout",
        39: "rate_limit"}


def test_old_gateway_lines_without_message_are_joined() -> None:
    line = otrace.LogLine.parse(json.dumps({
        "0": '{"subsystem":"gateway/reload"}', "1": "config reload skipped (invalid config):", "2": "bad key",
        "_meta": {"logLevelName": "WARN", "name": '{"subsystem":"gateway/reload"}',
                  "date": "2026-05-01T10:00:00Z"},
    }).encode())
    assert line.message == "config reload skipped (invalid config): bad key"
    assert (line.subsystem, line.level, line.time_ms) == ("gateway/reload", "WARN", 1777629600000)
    assert otrace.classify(line) == "config_invalid"
    for raw in (b"not json", b"[1, 2]", b'"text"', b"{" * 10_000):
        assert otrace.LogLine.parse(raw) is None


# --------------------------------------------------------------------------------------------- push


def hang(seconds: float) -> Callable[[Receiver, dict[str, Any]], None]:
    """Say nothing until the client gives up (or `seconds` pass), then hang up."""
    def act(_: Receiver, request: dict[str, Any]) -> None:
        request["socket"].settimeout(seconds)
        with contextlib.suppress(OSError):
            request["socket"].recv(1)                # returns b"" when the client hangs up
    return act


def held(on_wire: threading.Event, release: threading.Event, answer: int = 200
         ) -> Callable[[Receiver, dict[str, Any]], int]:
    """Say the request is here (`on_wire`), then answer (200) once `release` is set: a push in flight."""
    def act(_: Receiver, __: dict[str, Any]) -> int:
        on_wire.set()
        release.wait(60)
        return answer
    return act


def reset(_: Receiver, __: dict[str, Any]) -> None:
    return None


def cut_off(answer: bytes) -> Callable[[Receiver, dict[str, Any]], None]:
    """Begin a 200 answer and hang up before its end: a receiver (or a proxy) dying mid-answer."""
    def act(_: Receiver, request: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            request["socket"].sendall(answer)
    return act


CUT_OFF = {"in its headers": cut_off(b"HTTP/1.1 200 OK\r\nContent-Le"),
           "in its body": cut_off(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"ok\""),
           "in a chunk": cut_off(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"ok\""),
           "past its first 4 KiB": cut_off(b"HTTP/1.1 200 OK\r\nContent-Length: 9999\r\n\r\n" + b" " * 5000)}


def refuse_trace(trace_id: str) -> Callable[[Receiver, dict[str, Any]], Any]:
    """400 for any batch holding `trace_id`, 200 otherwise: one poison event."""
    def act(_: Receiver, request: dict[str, Any]) -> Any:
        if any(e["trace_id"] == trace_id for e in request["json"]["events"]):
            return 400, {"Content-Type": "text/plain"}, f"event {trace_id} is malformed"
        return 200
    return act


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rx = Receiver()
    yield rx
    rx.close()
    assert rx.max_active <= 1, "two pushes ran at once"


PUSH = {"TRACE_PUSH_INTERVAL": "100ms", "TRACE_PUSH_BACKOFF_BASE": "10ms", "TRACE_PUSH_BACKOFF_CAP": "50ms"}


def push_env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return {**PUSH, "TRACE_PUSH_ENDPOINT": receiver.url, **extra}


def otlp_push_env(receiver: Receiver, **extra: str) -> dict[str, str]:
    """OTLP/HTTP JSON to the receiver, whose base URL the signals' paths are appended to."""
    return push_env(receiver, TRACE_PUSH_FORMAT="otlp", TRACE_PUSH_OTLP_PROTOCOL="http/json",
                    TRACE_PUSH_ENDPOINT=receiver.url.rsplit("/", 1)[0], **extra)


def logs_answer(answer: Any, until: threading.Event | None = None) -> Callable[..., Any]:
    """A receiver's answers: `answer` on /v1/logs (until `until` is set), 200 on the other paths."""
    def act(_: Receiver, request: dict[str, Any]) -> Any:
        return answer if request["path"].endswith("/v1/logs") and not (until and until.is_set()) else 200
    return act


def post_some(node: Otrace, n: int = 5) -> list[str]:
    ids = node.post("/v1/traces", [trace() for _ in range(n)]).json["trace_ids"]
    ids += node.post("/v1/errors", {"error_type": "crash", "message": "boom"}).json["trace_ids"]
    return ids


def synced(node: Otrace) -> dict[str, int]:
    return {trace_id: flag for table in ("llm_traces", "error_events")
            for trace_id, flag in node.query(f"SELECT trace_id, synced FROM {table}")}


def wait_synced(node: Otrace, ids: list[str], timeout: float = 20.0) -> None:
    """Wait until every one of `ids` is in the database and marked synced."""
    wait_until(lambda: (flags := synced(node)) and all(flags.get(i) == 1 for i in ids), timeout,
               f"{len(ids)} rows synced")


@pytest.mark.parametrize(("status", "verdict"), [
    (None, "retry"), (200, "ok"), (204, "ok"), (408, "retry"), (429, "retry"), (500, "retry"), (503, "retry"),
    (301, "config"), (401, "config"), (403, "config"), (404, "config"), (400, "split"), (413, "split"),
    (422, "split")])
def test_each_answer_has_one_verdict(status: int | None, verdict: str) -> None:
    assert otrace.Attempt("b", 0, 1, 1, status=status).verdict == verdict


def test_breaker_opens_after_its_threshold_and_doubles_its_cooldown() -> None:
    breaker = otrace.Breaker(threshold=2, cooldown=10.0)
    breaker.cycle_ended(False)
    assert breaker.state == "closed" and breaker.allows()
    breaker.cycle_ended(False)
    assert breaker.state == "open" and not breaker.allows()
    first = breaker.retry_at - time.monotonic()
    assert 0 < first <= 10                        # on the monotonic clock: a wall clock set back waits not
    breaker.cycle_ended(False)
    assert breaker.retry_at - time.monotonic() > first + 5            # 10 s, then 20 s
    breaker.retry_at = time.monotonic() - 1
    assert breaker.state == "half_open" and breaker.allows()
    breaker.cycle_ended(True)
    assert (breaker.state, breaker.failures) == ("closed", 0)


def test_a_batch_halves_into_the_same_events_in_order() -> None:
    batch = otrace.Batch(losses=[{"kind": "retention"}])
    for i in range(5):
        batch.add("llm_traces", i, f"t{i}", json.dumps({"n": i}).encode())
    first, second = batch.halves()
    assert [json.loads(first.event(i))["n"] for i in range(len(first))] == [0, 1]
    assert [json.loads(second.event(i))["n"] for i in range(len(second))] == [2, 3, 4]
    assert first.losses == batch.losses and second.losses == []          # reported once
    assert [span[2] for span in second.spans] == ["t2", "t3", "t4"]
    form = otrace.OtraceFormat(otrace.Config(push_endpoint="http://h/in"), "agent")
    body = json.loads(b"".join(bytes(p) for p in form.body(batch)))
    assert [e["n"] for e in body["events"]] == [0, 1, 2, 3, 4] and body["agent_id"] == "agent"


@pytest.mark.parametrize("protocol", ["http/protobuf", "http/json"])
def test_an_otlp_push_body_is_a_whole_export_request(protocol: str) -> None:
    """The envelope around a batch's pre-encoded events decodes, with OpenTelemetry's own classes, to
    one resource, one scope, and the events in order; a loss report is log records of its own."""
    from google.protobuf import json_format
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    form = otrace.OtlpFormat(otrace.Config(push_endpoint="http://h:4318/base/?k=1", push_format="otlp",
                                           push_otlp_protocol=protocol, agent_id="a1"), "a1")
    rows = [dict(zip(otrace.TRACES.columns, otrace.parse_events(json.dumps(trace(
        trace_id=f"call-{i}", latency_ms=1500.5, finish_reason="stop,length", session_id="s1",
        input_text="Summarise this", output_text='[{"role": "assistant", "parts": []}]')).encode(),
        "/v1/traces", 1, 1000)[0][0].values, strict=True)) | {"id": i, "metadata": None} for i in range(3)]
    rows[0] |= {"provider": "Mistral", "metadata": {"gen_ai.request.model": "claude-sonnet"}}
    batch = otrace.Batch("traces", form.separator)
    for row in rows:
        batch.add("llm_traces", row["id"], row["trace_id"], form.item("llm_traces", row))
    raw = b"".join(bytes(part) for part in form.body(batch))
    if protocol == "http/protobuf":
        request = ExportTraceServiceRequest.FromString(raw)
    else:
        doc = json.loads(raw)
        assert len(doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"]) == 32   # hex, not base64
        request = otrace.decode_otlp("traces", raw, "json")
    [resource] = request.resource_spans
    assert {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"] == "a1"
    [scoped] = resource.scope_spans
    assert scoped.scope.name == "otrace" and [s.name for s in scoped.spans] == [     # {operation} {request}
        "chat claude-sonnet", "chat claude-sonnet-4", "chat claude-sonnet-4"]
    span = scoped.spans[0]
    attrs = {a.key: json_format.MessageToDict(a.value) for a in span.attributes}
    assert (attrs["gen_ai.provider.name"], attrs["gen_ai.response.model"]) == (
        {"stringValue": "mistral_ai"}, {"stringValue": "claude-sonnet-4"})     # the conventions' name
    assert attrs["gen_ai.usage.input_tokens"] == {"intValue": "10"} and attrs["otrace.trace_id"] == {
        "stringValue": "call-0"}
    assert json.loads(attrs["gen_ai.input.messages"]["stringValue"]) == [     # plain text: one message
        {"role": "user", "parts": [{"type": "text", "content": "Summarise this"}]}]
    assert attrs["gen_ai.output.messages"]["stringValue"] == '[{"role": "assistant", "parts": []}]'  # as sent
    assert attrs["otrace.text_messages"]["arrayValue"]["values"] == [{"stringValue": "input"}]
    assert attrs["gen_ai.response.finish_reasons"]["arrayValue"]["values"] == [
        {"stringValue": "stop"}, {"stringValue": "length"}]
    assert span.end_time_unix_nano - span.start_time_unix_nano == 1_500_500_000 and span.kind == 3
    assert otrace.otel_ids("call-0", {}) == (span.trace_id, span.span_id)        # stable, from the id
    assert form.path(batch) == "/base/v1/traces?k=1"
    mixed = otrace.Batch("traces", form.separator)              # each origin its resource and scope
    for n, origin in enumerate([None, ("billing", "sdk"), None, ("billing", "sdk"), (None, "x")]):
        meta = dict(zip(("service_name", "scope"), origin, strict=True)) if origin else {}
        row = rows[n % 3] | {"trace_id": f"m{n}", "source": "otlp" if origin else "http", "metadata": meta}
        assert form.origin("llm_traces", row) == origin
        mixed.add("llm_traces", n, row["trace_id"], form.item("llm_traces", row), origin)
    raw = b"".join(bytes(part) for part in form.body(mixed))
    request = (ExportTraceServiceRequest.FromString(raw) if protocol == "http/protobuf"
               else otrace.decode_otlp("traces", raw, "json"))
    grouped = [({a.key: a.value.string_value for a in r.resource.attributes}["service.name"],
                r.scope_spans[0].scope.name, [a.value.string_value for s in r.scope_spans[0].spans
                                              for a in s.attributes if a.key == "otrace.trace_id"])
               for r in request.resource_spans]
    assert grouped == [("a1", "otrace", ["m0", "m2"]), ("billing", "sdk", ["m1", "m3"]), ("a1", "x", ["m4"])]
    assert [sorted(a.key for a in r.resource.attributes) for r in request.resource_spans] == [
        ["host.name", "service.name"], *[["otrace.agent_id", "service.name"]] * 2]   # relayed: host unknown
    odd = {"source": "otlp", "metadata": {"service_name": "bad\ud800", "scope": 5}}   # another's database
    assert form.origin("llm_traces", odd) == ("bad\ufffd", None)
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(50):                                       # past what protobuf parsers take: JSON text
        deep = {"k": deep}
    pushed = form.messages("llm_traces", rows[0] | {"metadata": {"deep": deep, "customer": "acme"}})[0]
    kept = otrace.otel_value(next(a.value for a in pushed.attributes if a.key == "otrace.metadata"))
    below = otrace.OTLP_VALUE_DEPTH - 1                         # levels: otrace.metadata's, then deep's
    assert kept["customer"] == "acme" and json.loads(functools.reduce(
        lambda value, _: value["k"], range(below), kept["deep"])) == functools.reduce(
        lambda value, _: value["k"], range(below), deep)
    report = form.report([{"kind": "retention", "ledger_id": 1, "at": 1_000, "table": "llm_traces",
                           "reason": "pressure_unpushed", "rows": 50}])
    logs_raw = b"".join(bytes(part) for part in form.body(report))
    logs = (ExportLogsServiceRequest.FromString(logs_raw) if protocol == "http/protobuf"
            else otrace.decode_otlp("logs", logs_raw, "json"))
    [record] = logs.resource_logs[0].scope_logs[0].log_records
    assert record.event_name == "otrace.loss" and record.severity_text == "WARN" and report.ids() == {}
    assert record.time_unix_nano == 1_000_000_000 and record.observed_time_unix_nano > 10**18   # when said


@pytest.mark.parametrize(("case", "memory", "cpu"), [
    ("v2-quota", "container.memory.usage", "container.cpu.usage"),
    ("proc-only", "system.memory.usage", "system.cpu.utilization")])
def test_a_host_sample_is_pushed_as_container_or_system_gauges(tmp_path: Path, case: str, memory: str,
                                                                cpu: str) -> None:
    """A sample read from a cgroup is the container's, one from /proc the host's: real captured trees."""
    row, _ = sample_case(case, tmp_path)
    row |= {"id": 1, "trace_id": "m1", "created_at": 1_000, "received_at": 1_000, "self_cpu_pct": 150.0}
    form = otrace.OtlpFormat(otrace.Config(push_endpoint="http://h/", push_format="otlp"), "a", cpus=2)
    batch = otrace.Batch("metrics", form.separator)
    batch.add("system_metrics", 1, "m1", form.item("system_metrics", row))
    request = otrace.decode_otlp("metrics", b"".join(bytes(part) for part in form.body(batch)), "protobuf")
    gauges = request.resource_metrics[0].scope_metrics[0].metrics
    metrics = {m.name: m.gauge.data_points[0] for m in gauges}
    assert metrics[memory].as_int == row["mem_used_bytes"]
    cpus = row["cpu_cores_effective"] if case == "v2-quota" else 1        # container.cpu.usage is in cpus
    assert metrics[cpu].as_double == pytest.approx(row["cpu_pct"] / 100 * cpus)
    assert metrics["otrace.host.mem_total_bytes"].as_int == MEM_TOTAL
    assert metrics["process.cpu.utilization"].as_double == pytest.approx(0.75)   # 150 % of a core, of 2
    usage = [m for m in gauges if m.name == "system.filesystem.usage"]
    assert {p.attributes[0].value.string_value for m in usage for p in m.gauge.data_points
            if p.attributes[0].key == "system.filesystem.state"} == {"used", "free"}


def test_a_process_sample_is_pushed_as_process_gauges_naming_the_process() -> None:
    """Captured procs-many: each process of the sample is process.* gauges with its pid and command;
    its CPU, a percent of one core, as OpenTelemetry's utilization, a share of all the CPUs (it was of
    one: 1.98 for a process busy on both of two)."""
    form = otrace.OtlpFormat(otrace.Config(push_endpoint="http://h/", push_format="otlp"), "a", cpus=4)
    rows = sample_procs()
    batch = otrace.Batch("metrics", form.separator)
    for i, row in enumerate(rows):
        batch.add("process_samples", i, row["trace_id"], form.item("process_samples", row | {"id": i}))
    request = otrace.decode_otlp("metrics", b"".join(bytes(part) for part in form.body(batch)), "protobuf")
    points = collections.defaultdict(dict)
    for metric in request.resource_metrics[0].scope_metrics[0].metrics:
        point = metric.gauge.data_points[0]
        attrs = {a.key: a.value for a in point.attributes}
        points[attrs["process.pid"].int_value][metric.name] = point
    assert len(points) == len(rows)
    gateway = next(r for r in rows if r["pid"] == 12)
    memory = points[12]["process.memory.usage"]
    assert memory.as_int == gateway["rss_bytes"]
    named = {a.key: a.value.string_value for a in memory.attributes}
    assert named["process.command_line"] == gateway["cmdline"]
    assert points[12]["process.cpu.utilization"].as_double == pytest.approx(gateway["cpu_pct"] / 100 / 4)


@pytest.mark.parametrize(("answer", "protocol", "rejected"), [
    (b"", "http/protobuf", (0, "")), (b"\n\x03\x08\x87\x01", "http/protobuf", (135, "")),
    (b"\n\x10\x08\x02\x12\x0cbad", "http/protobuf", (2, "bad")),         # cut inside its message
    (b"\n\x07\x12\x03bad\x08\x05", "http/protobuf", (5, "bad")),          # the message first
    (b"\n\x11\x18\x01\x1a\x02zz\x21" + b"\x00" * 8 + b"\x08\x04", "http/protobuf", (4, "")),  # fields to skip
    (b'{"partialSuccess": {"rejectedSpans": "3", "errorMessage": "x \\"y\\""}}', "http/json", (3, 'x "y"')),
    (b'{"partial_success": {"rejected_log_records": 1}}', "http/json", (1, "")),
    (b"{}", "http/json", (0, ""))])
def test_partial_success_is_read_from_the_start_of_an_answer(answer: bytes, protocol: str,
                                                             rejected: tuple[int, str]) -> None:
    form = otrace.OtlpFormat(otrace.Config(push_endpoint="http://h/", push_otlp_protocol=protocol), "a")
    assert form.rejected(answer) == rejected


@given(st.sets(st.integers(1, 300), max_size=60))
def test_id_runs_cover_exactly_the_ids(ids: set[int]) -> None:
    runs = otrace.id_runs(sorted(ids))
    assert {i for low, high in runs for i in range(low, high + 1)} == ids
    assert all(b[0] > a[1] + 1 for a, b in itertools.pairwise(runs))      # maximal: no two runs touch


def test_the_scrubber_takes_out_every_form_of_a_credential() -> None:
    config = otrace.Config(push_endpoint="https://agent:pa%24s@h/in?key=k3y-value", push_headers=(
        ("x-api-key", "hdr-secret"),))
    scrub = otrace.Scrubber(config)
    import base64
    text = f"Basic {base64.b64encode(b'agent:pa$s').decode()} pa$s k3y-value hdr-secret"
    assert scrub(text) == "Basic *** *** *** ***"
    token = otrace.Scrubber(otrace.Config(push_endpoint="https://t0ken-as-user@h/in?k=val1&pretty&bare-token-"
                                                        "0123456789"))          # a short bare item is a flag
    assert token("unknown api key t0ken-as-user; path /in?k=val1&pretty&bare-token-0123456789") == \
        "unknown api key ***; path /in?k=***&pretty&***"
    quoted = otrace.Scrubber(otrace.Config(push_endpoint="https://h/", push_token='tok"en/with+odd'))
    echoes = (json.dumps({"authorization": 'Bearer tok"en/with+odd'}), "tok%22en%2Fwith%2Bodd",
              'tok\\"en\\/with+odd')                                   # JSON, a URL, PHP's JSON
    assert [quoted(echo) for echo in echoes] == ['{"authorization": "Bearer ***"}', "***", "***"]
    slash = otrace.Scrubber(otrace.Config(push_endpoint="https://h/", push_token="tok/en+odd x"))
    assert [slash(echo) for echo in ("tok/en%2Bodd%20x", "tok%2Fen%2Bodd+x")] == ["***", "***"]   # quote()
    euro = otrace.Scrubber(otrace.Config(push_endpoint="https://agent:p%C3%A9%E2%82%AC@h/in"))
    sent = base64.b64encode("agent:pé€".encode()).decode()               # UTF-8, as it is sent
    assert euro(f"Authorization: Basic {sent}") == "Authorization: Basic ***"
    other = otrace.Scrubber(otrace.Config(push_endpoint="https://h/in"))    # no credential of otrace's
    assert "sekret123" not in other("bad event poison; Authorization: Bearer sekret123")
    go = otrace.Scrubber(otrace.Config(push_endpoint="https://h/", push_token="tok&en<x>"))
    assert go('{"auth":"Bearer tok\\u0026en\\u003cx\\u003e"}') == '{"auth":"Bearer ***"}'   # Go's JSON
    own = otrace.Scrubber(otrace.Config(ingest_token="ingest-tok-0123")).own    # a command line may hold it
    assert own("my-agent http://127.0.0.1:9090 ingest-tok-0123") == "my-agent http://127.0.0.1:9090 ***"


def test_push_off_by_default_says_so(svc: Otrace) -> None:
    assert svc.wait_log(lambda e: "push is off" in e["message"])["level"] == "WARNING"
    health = svc.health()
    assert health["last_push_status"] == "disabled" and health["push"] is None


def test_push_delivers_every_row_and_marks_it_synced(run: Callable[..., Otrace], receiver: Receiver) -> None:
    node = run(push_env(receiver, TRACE_PUSH_TOKEN="push-secret", TRACE_AGENT_ID="agent-7"))
    ids = post_some(node)
    wait_synced(node, ids)
    request = receiver.requests[0]
    body = request["json"]
    assert body["schema"] == "otrace.push.v1" and body["agent_id"] == "agent-7"
    assert uuid.UUID(body["batch_id"]) and body["sent_at"]
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["authorization"] == "Bearer push-secret"
    assert headers["idempotency-key"] == body["batch_id"]
    assert headers["user-agent"] == f"otrace/{otrace.__version__}"
    assert headers["content-type"] == "application/json"
    kinds = {e["trace_id"]: e["type"] for r in receiver.requests for e in r["json"]["events"]}
    assert kinds[ids[-1]] == "error_event" and kinds[ids[0]] == "llm_trace"
    first = next(e for e in body["events"] if e["trace_id"] == ids[0])
    assert first["data"]["model"] == TRACE["model"] and first["data"]["id"] >= 1
    assert "synced" not in first["data"]
    assert set(synced(node).values()) == {1}
    assert all(pushed for (pushed,) in node.query("SELECT pushed_at FROM llm_traces"))
    log = node.query("SELECT batch_id, http_status, events FROM push_log")
    assert (body["batch_id"], 200, len(body["events"])) in log
    health = node.health()
    assert health["last_push_status"] == "ok" and health["push"]["breaker"] == "closed"
    assert not any("push-secret" in json.dumps(line) for line in node.lines)


def interim(status: int) -> Callable[[Receiver, dict[str, Any]], int]:
    """An interim answer (102 Processing, 103 Early Hints) before the 200."""
    def act(_: Receiver, request: dict[str, Any]) -> int:
        request["socket"].sendall(f"HTTP/1.1 {status} Interim\r\nLink: </a.css>\r\n\r\n".encode())
        return 200
    return act


@pytest.mark.parametrize("status", [201, 202, 204, (200, {}, " " * 100_000), "102", "103"])  # a long one
def test_any_2xx_confirms(run: Callable[..., Otrace], receiver: Receiver, status: Any) -> None:
    receiver.default = interim(int(status)) if isinstance(status, str) else status
    node = run(push_env(receiver))
    wait_synced(node, post_some(node, 2))


@pytest.mark.parametrize("failure", [500, 503, 408, 429, "reset", "hang", *CUT_OFF])
def test_failed_attempt_is_retried_as_the_same_batch(run: Callable[..., Otrace], receiver: Receiver,
                                                     failure: Any) -> None:
    """A 5xx, 408 or 429, no answer, and a 200 cut off before its end (no whole answer: the receiver
    may have died before it kept the batch) are tried again, as the same batch."""
    receiver.script = [{"reset": reset, "hang": hang(1.0), **CUT_OFF}.get(failure, failure)] * 2
    node = run(push_env(receiver, TRACE_PUSH_TIMEOUT="300ms"))
    ids = post_some(node, 3)
    wait_synced(node, ids)
    first, second, third = receiver.requests[:3]
    assert first["json"]["batch_id"] == second["json"]["batch_id"] == third["json"]["batch_id"]
    assert third["answered"] == 200
    assert set(receiver.trace_ids()) >= set(ids)
    statuses = [status for (status,) in node.query("SELECT http_status FROM push_log ORDER BY id")]
    if isinstance(failure, int):
        assert statuses[:3] == [failure, failure, 200]
    else:
        assert statuses[:3] == [None, None, 200]
        errors = [e for (e,) in node.query("SELECT error FROM push_log ORDER BY id LIMIT 2")]
        assert all(errors), errors
        assert failure not in CUT_OFF or all(e.startswith("answer cut off after HTTP 200: ") for e in errors)
    assert not [line for line in node.lines if "Traceback" in line]          # urllib3's warnings too


def test_no_row_is_synced_without_a_2xx(run: Callable[..., Otrace], receiver: Receiver) -> None:
    receiver.default = 503
    node = run(push_env(receiver, TRACE_PUSH_RETRIES="2"))
    post_some(node, 3)
    receiver.wait(lambda reqs: len(reqs) >= 6)
    assert set(synced(node).values()) == {0}
    health = node.health()
    assert health["last_push_status"] == "failed" and "HTTP 503" in health["push"]["last_error"]
    assert health["status"] == "ok"          # a receiver being down is not otrace being down
    assert node.stop() == 0 and node.logs("stopped")[0]["rows_unpushed"] == 4    # for the next start


def test_the_last_successful_push_is_known_through_failures_and_restarts(tmp_path: Path,
                                                                        run: Callable[..., Otrace],
                                                                        receiver: Receiver) -> None:
    """An alert on "no push for an hour" needs the last 2xx, not the last try: /health and /metrics
    keep it while the receiver fails, and a restart finds it in push_log."""
    db = tmp_path / "o.db"
    node = run(push_env(receiver, TRACE_PUSH_RETRIES="1"), db=db)
    assert node.health()["push"]["last_success_time"] is None
    wait_synced(node, post_some(node, 1))
    ok = wait_until(lambda: node.health()["push"]["last_success_time"], what="the success")
    receiver.default = 503
    post_some(node, 1)
    wait_until(lambda: node.health()["last_push_status"] == "failed", what="a failed cycle")
    health = node.health()
    assert health["push"]["last_success_time"] == ok and health["last_push_time"] > ok
    scraped = node.request("GET", "/metrics").body.decode()
    stamp = datetime.fromisoformat(ok).timestamp()
    assert f"otrace_push_last_success_timestamp_seconds {otrace.prometheus_number(stamp)}\n" in scraped
    assert node.stop() == 0
    with contextlib.closing(sqlite3.connect(db)) as conn:      # pruned by retention, days later
        conn.execute("DELETE FROM push_log")
        conn.commit()
    again = run(push_env(receiver, TRACE_PUSH_RETRIES="1"), db=db)
    started = again.health()["push"]["last_success_time"]       # the request's start, kept apart
    assert started == ok                                        # as it was said live (not its answer's)


def test_a_2xx_refusing_items_is_no_success_after_a_restart_either(tmp_path: Path, run: Callable[..., Otrace],
                                                                     receiver: Receiver) -> None:
    """A receiver that answers 200 with partial_success refusing items took no batch whole: neither
    the running otrace, nor one started again over its push_log, nor the report calls that a success."""
    def answer(_: Receiver, request: dict[str, Any]) -> Any:
        field = "rejectedSpans" if "resourceSpans" in request["json"] else "rejectedLogRecords"
        return 200, {"Content-Type": "application/json"}, json.dumps(
            {"partialSuccess": {field: "1", "errorMessage": "bad"}})

    receiver.default = answer
    db = tmp_path / "o.db"
    node = run(otlp_push_env(receiver), db=db)
    post_some(node, 1)
    wait_until(lambda: node.query("SELECT count(*) FROM push_log WHERE http_status = 200")[0][0] == 2,
               what="the span and the error taken, each refused")
    assert node.health()["push"]["last_success_time"] is None
    assert node.stop() == 0
    again = run(otlp_push_env(receiver, TRACE_PUSH_INTERVAL="1h"), db=db)
    assert again.health()["push"]["last_success_time"] is None
    assert report_json(db, "--since", "1h")["push"]["last_success"] is None
    assert "HTTP 200, partial_success: 1 of 1 refused" in report(db, "--since", "1h").stdout


@pytest.mark.parametrize("retries", ["5", "1"])
def test_retry_after_is_a_floor_on_the_wait(run: Callable[..., Otrace], receiver: Receiver,
                                            retries: str) -> None:
    """Within a cycle, and across cycles: a 429 on a cycle's last attempt holds the next one back."""
    receiver.script = [(429, {"Retry-After": "2"}, "slow down")]
    node = run(push_env(receiver, TRACE_PUSH_RETRIES=retries))
    ids = post_some(node, 1)
    receiver.wait(lambda reqs: len(reqs) >= 2)
    gap = receiver.requests[1]["at"] - receiver.requests[0]["at"]
    assert gap >= 2.0                           # backoff alone would wait at most 10 ms
    assert node.query("SELECT retry_after_s FROM push_log ORDER BY id LIMIT 1") == [(2.0,)]
    wait_synced(node, ids)


@pytest.mark.parametrize("later", ["99999999", "Wed, 21 Oct 2099 07:28:00 GMT"])
def test_a_retry_after_holds_push_back_an_hour_at_most_and_health_says_until_when(
        run: Callable[..., Otrace], receiver: Receiver, later: str) -> None:
    receiver.script = [(429, {"Retry-After": later}, "come back much later")]
    node = run(push_env(receiver))
    post_some(node, 1)
    wait_until(lambda: node.query("SELECT retry_after_s FROM push_log"), what="the 429 recorded")
    assert node.query("SELECT retry_after_s FROM push_log") == [(3600.0,)]
    until = datetime.fromisoformat(node.health()["push"]["held_by_retry_after_until"])
    assert timedelta(minutes=59) < until - datetime.now(UTC) <= timedelta(hours=1)
    assert node.stop() == 0


def test_refused_batch_is_split_down_to_the_poison_event(run: Callable[..., Otrace],
                                                         receiver: Receiver) -> None:
    """A row the receiver refuses alone while it accepts its siblings is given up, and reported in the
    next push's losses before anything may delete it."""
    node = run({**PUSH, "TRACE_PUSH_INTERVAL": "1h"}, wait=True)   # nothing pushed before the rows exist
    ids = node.post("/v1/traces", [trace() for _ in range(9)]).json["trace_ids"]
    node.wait_persisted(9)
    poison = ids[4]
    assert node.stop() == 0
    receiver.default = refuse_trace(poison)
    node2 = run(push_env(receiver), db=node.db_path)
    wait_synced(node2, [i for i in ids if i != poison])
    assert set(receiver.trace_ids()) == set(ids) - {poison}
    sizes = [len(r["json"]["events"]) for r in receiver.requests]
    assert sizes[0] == 9 and 1 in sizes          # halved until the poison event went alone
    rejects = wait_until(lambda: node2.query("SELECT trace_id, http_status, reason FROM push_rejects"),
                         what="the refusal recorded")      # at the end of the cycle, after the marking
    assert rejects == [(poison, 400, f"event {poison} is malformed")]
    wait_until(lambda: node2.health()["push"]["events_refused_by_receiver"] == 1, what="it counted")
    wait_until(lambda: synced(node2)[poison] == 3, what="the refusal reported")   # refused, reported
    reports = [loss for r in receiver.requests if r["answered"] == 200
               for loss in r["json"].get("losses", [])]
    assert [(x["kind"], x["trace_id"], x["http_status"]) for x in reports] == [("refused", poison, 400)]
    assert node2.query("SELECT count(*) FROM push_rejects WHERE reported_at IS NULL") == [(0,)]


def test_events_refused_while_the_receiver_refused_everything_are_not_given_up_when_it_heals(
        run: Callable[..., Otrace], receiver: Receiver) -> None:
    """A receiver that answers 400 to everything for a while and then heals, in one cycle: the events
    it refused alone are kept (an event is poison only if the answer right after its refusal was an
    acceptance, and it is refused again when sent once more), and every row arrives."""
    node = run({**PUSH, "TRACE_PUSH_INTERVAL": "1h"})          # nothing pushed before the rows exist
    ids = node.post("/v1/traces", [trace() for _ in range(40)]).json["trace_ids"]
    node.wait_persisted(40)
    assert node.stop() == 0
    receiver.script = [400] * 7                                  # [8] [4] [2] [1] [1] [2] [1]: then healed
    node = run(push_env(receiver, TRACE_PUSH_MAX_BYTES="8KiB"), db=node.db_path)
    wait_synced(node, ids)
    assert node.query("SELECT count(*) FROM push_rejects") == [(0,)]
    assert set(receiver.trace_ids()) == set(ids) and node.health()["push"]["events_refused_by_receiver"] == 0


def test_a_receiver_refusing_every_llm_call_and_taking_the_rest_gives_up_none(
        run: Callable[..., Otrace], receiver: Receiver) -> None:
    """Proof that an event refused alone is poison is the receiver taking others of its kind: of its
    table. A receiver whose schema for LLM calls broke takes the error events and refuses every call;
    the calls stay (they were all given up, the errors taken as proof), refused alone again and again."""
    def act(_: Receiver, request: dict[str, Any]) -> Any:
        if any(e["type"] == "llm_trace" for e in request["json"]["events"]):
            return 400, {"Content-Type": "text/plain"}, "llm_trace: unknown field"
        return 200
    receiver.default = act
    node = run(push_env(receiver, TRACE_PUSH_INTERVAL="200ms"))
    ids = node.post("/v1/traces", [trace() for _ in range(6)]).json["trace_ids"]
    errors = node.post("/v1/errors", [{"error_type": "crash", "message": f"m{i}"} for i in range(3)]
                       ).json["trace_ids"]
    wait_synced(node, errors)

    def refused_alone_thrice() -> bool:          # one given up after its second is never sent again
        alone = collections.Counter(r["json"]["events"][0]["trace_id"] for r in receiver.requests
                                    if r["answered"] == 400 and len(r["json"]["events"]) == 1)
        return all(alone[i] >= 3 for i in ids)
    wait_until(refused_alone_thrice, timeout=60, what="each call refused alone three times")
    assert node.query("SELECT count(*) FROM push_rejects") == [(0,)]
    assert {synced(node)[i] for i in ids} == {0}
    assert node.health()["push"]["events_refused_by_receiver"] == 0


@pytest.mark.parametrize("bad, good", [(40, 20), (0, 5)])
def test_events_the_receiver_refuses_alone_are_given_up_and_the_rest_goes(
        run: Callable[..., Otrace], receiver: Receiver, bad: int, good: int) -> None:
    """40 events a receiver refuses, then 20 it takes (the search for them passes REFUSALS_IN_A_ROW:
    those found wait out of the batches, so the next cycle gets further); or one refused event last of
    six: every good row goes, every bad one is given up once refused alone again, and the breaker
    stays closed."""
    node = run({**PUSH, "TRACE_PUSH_INTERVAL": "1h"})
    ids = node.post("/v1/traces", [trace() for _ in range(bad + good + (0 if bad else 1))]).json["trace_ids"]
    node.wait_persisted(len(ids))
    assert node.stop() == 0
    refused = set(ids[:bad]) if bad else {ids[-1]}

    def act(_: Receiver, request: dict[str, Any]) -> Any:
        if refused & {e["trace_id"] for e in request["json"]["events"]}:
            return 400, {"Content-Type": "text/plain"}, "malformed"
        return 200

    receiver.default = act
    node = run(push_env(receiver), db=node.db_path)
    wait_synced(node, [i for i in ids if i not in refused], timeout=60)
    wait_until(lambda: {i for i, v in synced(node).items() if v in (2, 3)} == refused, timeout=60,
               what="every refused row given up")
    assert set(receiver.trace_ids()) >= set(ids) - refused
    wait_until(lambda: node.health()["push"]["events_refused_by_receiver"] == len(refused),
               what="counted once written")                 # the count follows the rows' commit
    assert node.health()["push"]["breaker"] == "closed"


def test_a_receiver_that_turns_to_refusing_everything_mid_cycle_keeps_every_row(
        run: Callable[..., Otrace], receiver: Receiver) -> None:
    """It takes the first batch and then refuses all: an event refused alone after that was neither
    part of a batch the receiver took part of, nor refused again after it took others, so none is
    given up (they were, the rest of the queue); once it heals every row goes."""
    node = run({**PUSH, "TRACE_PUSH_INTERVAL": "1h"})
    ids = node.post("/v1/traces", [trace() for _ in range(30)]).json["trace_ids"]
    node.wait_persisted(len(ids))
    assert node.stop() == 0
    healed = threading.Event()

    def act(_: Receiver, request: dict[str, Any]) -> Any:
        if healed.is_set() or not receiver.trace_ids():
            return 200
        return 400, {"Content-Type": "text/plain"}, "schema changed"

    receiver.default = act
    node = run(push_env(receiver, TRACE_PUSH_MAX_BYTES="4KiB", TRACE_PUSH_INTERVAL="300ms"), db=node.db_path)
    node.wait_log(lambda e: e.get("message") == "receiver refused every event sent again: keeping them "
                  "for the next" and e.get("refused") == len(ids) - len(receiver.trace_ids()))
    assert node.query("SELECT count(*) FROM push_rejects") == [(0,)]
    assert set(synced(node).values()) == {0, 1} and 0 < len(receiver.trace_ids()) < len(ids)
    healed.set()
    wait_synced(node, ids)
    assert node.health()["push"]["events_refused_by_receiver"] == 0


def test_an_otlp_receiver_refusing_one_signal_keeps_its_rows(run: Callable[..., Otrace],
                                                              receiver: Receiver) -> None:
    """It takes spans and refuses every log record: its acceptance of spans proves nothing about the
    errors it refuses (log records), so none is given up, and their refusals, however many, hold
    neither the spans nor the breaker; they all go once it takes logs."""
    takes_logs = threading.Event()
    receiver.default = logs_answer((415, {"Content-Type": "text/plain"}, "logs not enabled"), takes_logs)
    node = run(otlp_push_env(receiver, TRACE_PUSH_MAX_BYTES="4KiB"))
    errors = [node.post("/v1/errors", {"error_type": "crash", "message": f"boom {n}"}).json["trace_ids"][0]
              for n in range(48)]
    refused_alone = "SELECT count(*) FROM push_log WHERE http_status = 415 AND events = 1"
    for _ in range(500):                 # spans taken between the refusals
        if node.query(refused_alone)[0][0] >= 3 * len(errors):
            break
        wait_synced(node, node.post("/v1/traces", trace()).json["trace_ids"])
    else:
        pytest.fail("the errors were not refused alone three times each")
    assert node.query("SELECT count(*) FROM push_rejects") == [(0,)]
    assert {synced(node)[i] for i in errors} == {0}
    idle = len(node.logs("receiver refused every event sent again: keeping them for the next"))
    wait_until(lambda: len(node.logs("receiver refused every event sent again: keeping them for the "
                                     "next")) >= idle + 3, timeout=60, what="cycles re-sending the errors")
    push = node.health()["push"]
    assert (push["events_refused_waiting"], push["breaker"], push["consecutive_failures"]) == (
        len(errors), "closed", 0)
    wait_synced(node, node.post("/v1/traces", trace()).json["trace_ids"])
    takes_logs.set()
    wait_synced(node, errors)
    assert node.health()["push"]["events_refused_by_receiver"] == 0
    wait_until(lambda: node.health()["push"]["events_refused_waiting"] == 0, what="none waiting")


def test_an_idle_agent_whose_one_error_is_refused_keeps_the_breaker_closed(run: Callable[..., Otrace],
                                                                           receiver: Receiver) -> None:
    """A span is taken, then an error refused alone (that cycle failed: it accepted nothing); the
    cycles after, with nothing new, only send the error again: they leave the breaker as it was, and
    the next span goes at its time, not after a cool-down."""
    receiver.default = logs_answer((415, {"Content-Type": "text/plain"}, "logs not enabled"))
    node = run(otlp_push_env(receiver))
    wait_synced(node, node.post("/v1/traces", trace()).json["trace_ids"])
    node.post("/v1/errors", {"error_type": "crash", "message": "boom"})
    wait_until(lambda: len(node.logs("receiver refused every event sent again: keeping them for the next"))
               >= 4, timeout=60, what="idle cycles sending the error again")
    push = node.health()["push"]
    assert (push["breaker"], push["consecutive_failures"], push["events_refused_waiting"]) == ("closed", 1, 1)
    wait_synced(node, node.post("/v1/traces", trace()).json["trace_ids"])


def test_an_otlp_endpoint_that_faults_holds_back_its_signal_alone(run: Callable[..., Otrace],
                                                                 receiver: Receiver) -> None:
    """A backend without a logs pipeline answers 405 on /v1/logs (as Arize Phoenix does): that
    signal's breaker opens and its rows wait, while spans posted after, on an otherwise idle agent,
    go at their time; /v1/logs is not asked again in the cool-down."""
    receiver.default = logs_answer((405, {"Content-Type": "application/json"},
                                    '{"detail": "Method Not Allowed"}'))
    node = run(otlp_push_env(receiver, TRACE_PUSH_BREAKER_THRESHOLD="2", TRACE_PUSH_BREAKER_COOLDOWN="1h"))
    error = node.post("/v1/errors", {"error_type": "crash", "message": "boom"}).json["trace_ids"][0]
    push = wait_until(lambda: (p := node.health()["push"])["breakers"]["logs"]["state"] == "open" and p,
                      what="the logs breaker open")
    assert push["breakers"]["logs"]["consecutive_failures"] == 2
    assert push["breakers"]["logs"]["last_error"].startswith("HTTP 405 on /v1/logs")
    assert (push["breakers"]["traces"]["state"], push["breaker"]) == ("closed", "open")
    asked = sum(r["path"].endswith("/v1/logs") for r in receiver.requests)
    for _ in range(3):                   # cycles on, the logs left out of them
        wait_synced(node, node.post("/v1/traces", trace()).json["trace_ids"])
    assert sum(r["path"].endswith("/v1/logs") for r in receiver.requests) == asked == 2
    assert synced(node)[error] == 0 and node.query("SELECT count(*) FROM push_rejects") == [(0,)]
    assert len(node.logs("push of a signal failed: its rows wait, the others go on")) == 2
    assert node.logs("push cycle failed") == []


def test_a_faulted_signal_goes_again_when_its_breaker_lets_it_try(run: Callable[..., Otrace],
                                                                  receiver: Receiver) -> None:
    """/v1/logs answers 503 while spans are taken: the errors wait, and go once the endpoint heals
    and the logs breaker's cool-down lets a cycle try them; the breaker closes and forgets the fault."""
    healed = threading.Event()
    receiver.default = logs_answer((503, {"Content-Type": "text/plain"}, "logs pipeline down"), healed)
    node = run(otlp_push_env(receiver, TRACE_PUSH_RETRIES="2", TRACE_PUSH_BREAKER_THRESHOLD="1",
                             TRACE_PUSH_BREAKER_COOLDOWN="1s"))
    ids = post_some(node, 2)
    wait_synced(node, ids[:2])
    logs = wait_until(lambda: (b := node.health()["push"]["breakers"]["logs"])["last_error"] and b,
                      what="the logs fault recorded")
    assert logs["last_error"] == "HTTP 503 on /v1/logs: logs pipeline down"
    assert synced(node)[ids[2]] == 0
    healed.set()
    wait_synced(node, ids)
    wait_until(lambda: node.health()["push"]["breakers"]["logs"] == {
        "state": "closed", "consecutive_failures": 0, "next_attempt_at": None, "last_error": None,
        "held_by_retry_after_until": None},
        what="the logs breaker closed")


@pytest.mark.parametrize("status", [503, 429])             # a pipeline down; a quota of logs spent
def test_a_retry_after_from_one_otlp_endpoint_holds_back_its_signal_alone(
        run: Callable[..., Otrace], receiver: Receiver, status: int) -> None:
    """/v1/logs answers 503 or 429 with Retry-After: 60: the logs wait that long (shown in /health), an
    attempt of their retries, while spans posted after go at their time, and the last push at
    shutdown sends the spans."""
    receiver.default = logs_answer((status, {"Content-Type": "text/plain", "Retry-After": "60"},
                                    "logs pipeline down"))
    node = run(otlp_push_env(receiver))
    error = node.post("/v1/errors", {"error_type": "crash", "message": "boom"}).json["trace_ids"][0]
    logs = wait_until(lambda: (b := node.health()["push"]["breakers"]["logs"])["held_by_retry_after_until"]
                      and b, what="the logs held by their Retry-After")
    assert (logs["state"], logs["consecutive_failures"]) == ("closed", 0)   # one of its retries
    assert node.health()["push"]["held_by_retry_after_until"] is None     # the receiver's own: none
    scraped = node.request("GET", "/metrics").body.decode()                 # and a scrape says so
    held = dict(re.findall(r'otrace_push_held_by_retry_after_seconds\{signal="(\w*)"\} (\S+)', scraped))
    assert float(held["logs"]) > 30 and held.keys() == {"", "traces", "metrics", "logs"} and held[""] == "0"
    wait_synced(node, node.post("/v1/traces", trace()).json["trace_ids"])
    late = node.post("/v1/traces", trace()).json["trace_ids"]
    node.wait_persisted(3)
    assert node.stop() == 0
    assert {synced(node)[i] for i in late} == {1} and synced(node)[error] == 0
    assert sum(r["path"].endswith("/v1/logs") for r in receiver.requests) == 1


def test_a_failed_trial_of_one_signals_breaker_counts_on_no_other(run: Callable[..., Otrace],
                                                                   receiver: Receiver) -> None:
    """/v1/logs is down while a lone span the receiver refuses waits on an idle agent: each trial of
    the logs breaker fails, and the cycle's re-sent span (refused, not a fault) counts on no breaker,
    so a good span goes at its time."""
    def rule(_: Receiver, request: dict[str, Any]) -> Any:
        if request["path"].endswith("/v1/logs"):
            return 503, {"Content-Type": "text/plain"}, "logs pipeline down"
        if "poison-model" in json.dumps(request["json"]):
            return 400, {"Content-Type": "text/plain"}, "span malformed"
        return 200

    receiver.default = rule
    node = run(otlp_push_env(receiver, TRACE_PUSH_RETRIES="1", TRACE_PUSH_BREAKER_THRESHOLD="2",
                             TRACE_PUSH_BREAKER_COOLDOWN="100ms"))
    node.post("/v1/errors", {"error_type": "crash", "message": "boom"})
    node.post("/v1/traces", trace(model="poison-model"))
    wait_until(lambda: sum(r["path"].endswith("/v1/logs") for r in receiver.requests) >= 6, timeout=60,
               what="three failed trials of the logs breaker")
    push = node.health()["push"]
    assert push["breakers"]["logs"]["consecutive_failures"] >= 5
    assert push["breakers"]["traces"]["state"] == "closed"     # failed once at most: the cycle that
    assert push["breakers"]["traces"]["consecutive_failures"] <= 1     # refused the span, nothing taken
    assert push["events_refused_waiting"] == 1
    wait_synced(node, node.post("/v1/traces", trace()).json["trace_ids"])


def test_a_signal_throttled_with_retry_after_rides_it_out(run: Callable[..., Otrace],
                                                           receiver: Receiver) -> None:
    """/v1/traces answers 503 with Retry-After: 1 three times, then takes the span: each such answer is
    one of the signal's TRACE_PUSH_RETRIES attempts, the next cycle comes when it asked (not after an
    hour's interval), and it is not a failed cycle (a breaker that one failed cycle opens stays closed)."""
    answers = iter([(503, {"Content-Type": "text/plain", "Retry-After": "1"}, "busy")] * 3)

    def throttling(_: Receiver, request: dict[str, Any]) -> Any:
        return next(answers, 200) if request["path"].endswith("/v1/traces") else 200

    receiver.default = throttling
    node = run(otlp_push_env(receiver, TRACE_PUSH_INTERVAL="1h", TRACE_PUSH_BREAKER_THRESHOLD="1",
                             TRACE_PUSH_BREAKER_COOLDOWN="1h"))     # the first cycle 5 s after start
    wait_synced(node, node.post("/v1/traces", trace()).json["trace_ids"], timeout=60)
    assert [r["answered"] for r in receiver.requests if r["path"].endswith("/v1/traces")] == [503] * 3 + [200]
    traces = node.health()["push"]["breakers"]["traces"]
    assert (traces["state"], traces["consecutive_failures"]) == ("closed", 0)


def test_a_signal_whose_content_is_all_refused_fails_its_own_breaker_alone(run: Callable[..., Otrace],
                                                                           receiver: Receiver) -> None:
    """/v1/logs refuses every log record (400) while spans are taken: a cycle that sent only errors and
    had them refused fails the logs breaker, not the traces one, and spans go at their time."""
    receiver.default = logs_answer((400, {"Content-Type": "text/plain"}, "log records refused"))
    node = run(otlp_push_env(receiver, TRACE_PUSH_BREAKER_THRESHOLD="1", TRACE_PUSH_BREAKER_COOLDOWN="1h"))
    node.post("/v1/errors", {"error_type": "crash", "message": "boom"})
    push = wait_until(lambda: (p := node.health()["push"])["breakers"]["logs"]["state"] == "open" and p,
                      what="the logs breaker open")
    assert push["breakers"]["logs"]["last_error"] == "HTTP 400 on /v1/logs: log records refused"
    assert (push["breakers"]["traces"]["state"], push["events_refused_waiting"]) == ("closed", 1)
    wait_synced(node, node.post("/v1/traces", trace()).json["trace_ids"])
    assert node.query("SELECT count(*) FROM push_rejects") == [(0,)]


def test_the_last_push_waits_for_a_signal_whose_retry_after_ends_in_time(run: Callable[..., Otrace],
                                                                         receiver: Receiver) -> None:
    """/v1/logs answered 503 with Retry-After: 1 in the first cycle; a SIGTERM right after: the last
    push sends the span, waits out the second, and sends the error too, within the deadline."""
    answers = iter([(503, {"Content-Type": "text/plain", "Retry-After": "1"}, "busy")])

    def rule(_: Receiver, request: dict[str, Any]) -> Any:
        return next(answers, 200) if request["path"].endswith("/v1/logs") else 200

    receiver.default = rule
    node = run(otlp_push_env(receiver, TRACE_PUSH_INTERVAL="1h"))      # one cycle, 5 s after start
    ids = node.post("/v1/errors", {"error_type": "crash", "message": "boom"}).json["trace_ids"]
    receiver.wait(lambda requests: any(r["answered"] == 503 for r in requests))
    ids += node.post("/v1/traces", trace()).json["trace_ids"]
    assert node.stop() == 0
    assert {synced(node)[i] for i in ids} == {1}
    assert node.logs("final push")[0]["complete"] is True


def test_a_signal_waited_out_in_its_cycle_sends_no_other_signal_again(run: Callable[..., Otrace],
                                                                      receiver: Receiver) -> None:
    """/v1/traces is down (503) while /v1/logs asks three times to wait a second: the cycle waits the
    logs out once the spans have failed, and the spans are not tried again before the next interval."""
    busy = iter([(503, {"Content-Type": "text/plain", "Retry-After": "1"}, "busy")] * 3)

    def rule(_: Receiver, request: dict[str, Any]) -> Any:
        if request["path"].endswith("/v1/logs"):
            return next(busy, 200)
        return 503, {"Content-Type": "text/plain"}, "traces down"

    receiver.default = rule
    node = run(otlp_push_env(receiver, TRACE_PUSH_INTERVAL="1h"))
    span = node.post("/v1/traces", trace()).json["trace_ids"]
    error = node.post("/v1/errors", {"error_type": "crash", "message": "boom"}).json["trace_ids"]
    wait_synced(node, error, timeout=60)
    assert [r["answered"] for r in receiver.requests if r["path"].endswith("/v1/traces")] == [503] * 5
    traces = node.health()["push"]["breakers"]["traces"]
    assert traces["consecutive_failures"] == 1 and synced(node)[span[0]] == 0


def test_a_refusal_asking_to_wait_is_split_at_once(run: Callable[..., Otrace], receiver: Receiver) -> None:
    """A 400 with Retry-After: 1h for a batch holding one bad event: the wait is no reason to hold back
    its halves (only an answer that is retried waits), so the good event goes at once."""
    def rule(_: Receiver, request: dict[str, Any]) -> Any:
        if "poison-model" in json.dumps(request["json"]):
            return 400, {"Content-Type": "text/plain", "Retry-After": "3600"}, "bad event"
        return 200

    receiver.default = rule
    node = run(push_env(receiver))
    ids = node.post("/v1/traces", [trace(model="poison-model"), trace()]).json["trace_ids"]
    wait_synced(node, ids[1:])
    assert node.health()["push"]["held_by_retry_after_until"] is None


def test_no_answer_after_a_signal_was_waited_out_fails_the_cycle(run: Callable[..., Otrace],
                                                                  receiver: Receiver) -> None:
    """/v1/traces asks to wait a second, then hangs up: the cycle that waited it out was stopped by the
    whole receiver, so every breaker counts it (one failed cycle opens them here)."""
    traces = iter([(503, {"Content-Type": "text/plain", "Retry-After": "1"}, "busy")])

    def rule(_: Receiver, request: dict[str, Any]) -> Any:
        return next(traces, None) if request["path"].endswith("/v1/traces") else 200   # None: no answer

    receiver.default = rule
    node = run(otlp_push_env(receiver, TRACE_PUSH_INTERVAL="1h", TRACE_PUSH_RETRIES="2",
                             TRACE_PUSH_BREAKER_THRESHOLD="1", TRACE_PUSH_BREAKER_COOLDOWN="1h"))
    span = node.post("/v1/traces", trace()).json["trace_ids"]
    wait_synced(node, node.post("/v1/errors", {"error_type": "crash", "message": "boom"}).json["trace_ids"])
    node.wait_log(lambda e: e.get("message") == "push cycle failed", timeout=30)   # the breakers opened first
    push = node.health()["push"]
    assert push["breakers"]["traces"]["state"] == "open" == push["breakers"]["logs"]["state"]
    assert synced(node)[span[0]] == 0 and len(node.logs("push cycle failed")) == 1


def test_a_row_whose_json_column_is_not_json_is_pushed_as_text(run: Callable[..., Otrace],
                                                                receiver: Receiver) -> None:
    """A metadata value that is not JSON (a database from elsewhere, a fault) goes as its text; the
    rows beside it go too (its json.loads stopped every push cycle)."""
    node = run({**PUSH, "TRACE_PUSH_INTERVAL": "1h"})
    ids = node.post("/v1/traces", [trace() for _ in range(3)]).json["trace_ids"]
    node.wait_persisted(3)
    assert node.stop() == 0
    with contextlib.closing(sqlite3.connect(node.db_path)) as conn, conn:
        conn.execute("UPDATE llm_traces SET metadata = '{\"token\":***}' WHERE trace_id = ?", (ids[1],))
    node = run(push_env(receiver), db=node.db_path)
    wait_synced(node, ids)
    sent = {e["trace_id"]: e for r in receiver.requests for e in r["json"]["events"]}
    assert sent[ids[1]]["data"]["metadata"] == '{"token":***}'


def test_a_lone_refused_event_waits_for_an_acceptance_to_be_given_up(
        run: Callable[..., Otrace], receiver: Receiver) -> None:
    """An idle agent whose one waiting event the receiver refuses: nothing tells poison from a receiver
    at fault, so it stays (not given up; the cycles count as failed); the next event the receiver takes
    proves it poison, and it is given up."""
    node = run(push_env(receiver, TRACE_PUSH_BREAKER_THRESHOLD="2", TRACE_PUSH_BREAKER_COOLDOWN="100ms"))
    poison = node.post("/v1/traces", trace()).json["trace_ids"][0]
    receiver.default = refuse_trace(poison)
    wait_until(lambda: len(receiver.requests) >= 6, what="several cycles")
    assert synced(node)[poison] == 0 and node.query("SELECT count(*) FROM push_rejects") == [(0,)]
    good = node.post("/v1/traces", trace()).json["trace_ids"]
    wait_synced(node, good)
    wait_until(lambda: synced(node)[poison] in (2, 3), what="the poison given up")


def test_a_loss_report_accepted_alone_proves_no_event_poison(tmp_path: Path, run: Callable[..., Otrace],
                                                              receiver: Receiver) -> None:
    """A receiver that takes a batch with no events (a loss report alone) and refuses every event:
    nothing it refused is given up, since it accepted no event."""
    node = run({**PUSH, "TRACE_PUSH_INTERVAL": "1h"})
    ids = node.post("/v1/traces", [trace() for _ in range(30)]).json["trace_ids"]
    node.wait_persisted(30)
    assert node.stop() == 0
    with contextlib.closing(sqlite3.connect(node.db_path)) as conn, conn:   # a refusal not yet reported
        conn.execute("INSERT INTO push_rejects (table_name, row_id, trace_id, rejected_at, http_status, "
                     "reason) VALUES ('llm_traces', 999, 'gone-before', 1796000000000, 400, 'malformed')")
    receiver.default = lambda _, request: 400 if request["json"]["events"] else 200
    node = run(push_env(receiver, TRACE_PUSH_MAX_BYTES="8KiB", TRACE_PUSH_BREAKER_COOLDOWN="100ms"),
               db=node.db_path)
    wait_until(lambda: len(receiver.requests) >= 150 or set(synced(node).values()) != {0}, timeout=30,
               what="many cycles, or a row given up")
    assert set(synced(node).values()) == {0} and len(synced(node)) == len(ids)
    assert node.health()["push"]["events_refused_by_receiver"] == 0


def test_a_retry_after_on_an_acceptance_holds_nothing_back(run: Callable[..., Otrace],
                                                          receiver: Receiver) -> None:
    """An accepting receiver's Retry-After (asynchronous ingest APIs send one with 202) is no reason
    to wait: the next cycle goes at its time."""
    receiver.script = [(202, {"Retry-After": "600"}, "queued")]
    node = run(push_env(receiver))
    wait_synced(node, post_some(node, 1))
    assert node.health()["push"]["held_by_retry_after_until"] is None
    wait_synced(node, post_some(node, 1))


def test_a_receiver_refusing_everything_is_not_sent_every_event_alone(run: Callable[..., Otrace],
                                                                        receiver: Receiver) -> None:
    """The search for poison stops after REFUSALS_IN_A_ROW refusals with no acceptance between: a
    receiver that refuses all gets that many requests a cycle, not two for every event waiting."""
    receiver.default = 400
    node = run(push_env(receiver, TRACE_PUSH_MAX_BYTES="8KiB", TRACE_PUSH_INTERVAL="1h"))
    ids = node.post("/v1/traces", [trace() for _ in range(300)]).json["trace_ids"]
    node.wait_persisted(300)
    node.wait_log(lambda e: e.get("message") == "push cycle cut short by refused events: the next goes on "
                  "past them", timeout=30)
    assert len(receiver.requests) == 64                           # REFUSALS_IN_A_ROW, then the cycle ends
    assert set(synced(node).values()) == {0} and node.query("SELECT count(*) FROM push_rejects") == [(0,)]
    assert len(ids) == 300


@pytest.mark.parametrize("status", [400, 413])
def test_a_receiver_refusing_everything_keeps_every_row_until_it_heals(run: Callable[..., Otrace],
                                                                       receiver: Receiver,
                                                                       status: int) -> None:
    """Refused with nothing accepted in the same cycle is the receiver's fault: rows stay unsynced
    (retention keeps them, however short TRACE_RETENTION), cycles count as failed, and all of them go
    once it heals."""
    receiver.default = status
    node = run(push_env(receiver, TRACE_PUSH_BREAKER_THRESHOLD="2", TRACE_PUSH_BREAKER_COOLDOWN="100ms",
                        TRACE_RETENTION="1s", TRACE_CLEANUP_INTERVAL="200ms"))
    ids = post_some(node)
    node.wait_log(lambda e: e.get("message") == "receiver refused every event sent this cycle: keeping "
                  "them for the next")
    ids += post_some(node)                  # cycles that try new events fail (not those that re-send)
    wait_until(lambda: node.health()["push"]["consecutive_failures"] >= 2, what="failed cycles counted")
    wait_until(lambda: node.health()["retention"]["last_pass"], what="a retention pass")
    health = node.health()
    assert health["unsynced_count"] == len(ids)
    assert set(synced(node).values()) == {0}
    assert node.query("SELECT count(*) FROM push_rejects") == [(0,)]
    receiver.default = 200
    wait_synced(node, ids)
    assert set(receiver.trace_ids()) == set(ids)
    assert node.health()["push"]["events_refused_by_receiver"] == 0


def test_a_2xx_whose_body_never_ends_does_not_stall_push(run: Callable[..., Otrace],
                                                         receiver: Receiver) -> None:
    """TRACE_PUSH_TIMEOUT bounds the whole exchange: an answer that trickles in (a byte at a time, or
    an endless chunked body) is cut off, its connection closed, the batch sent again (no whole answer
    is no answer), and pushing goes on."""
    def trickle(chunked: bool) -> Callable[[Receiver, dict[str, Any]], None]:
        def act(_: Receiver, request: dict[str, Any]) -> None:
            sock = request["socket"]
            head = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 1000000"
            with contextlib.suppress(OSError):
                sock.sendall(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n")
                while True:
                    sock.sendall(b"1\r\nx\r\n" if chunked else b"x")
                    time.sleep(0.05)
        return act

    receiver.script = [trickle(False), trickle(True)]
    node = run(push_env(receiver, TRACE_PUSH_TIMEOUT="1s", TRACE_PUSH_INTERVAL="100ms"))
    ids = []
    for _ in range(3):                  # each batch after the last was answered (or cut off): one POST,
        ids += node.post("/v1/traces", [trace()]).json["trace_ids"]     # so a cycle cannot split it
        wait_synced(node, ids, timeout=30)
    batches = [request["json"]["batch_id"] for request in receiver.requests]
    assert len(batches) == 5 and len(set(batches[:3])) == 1 and receiver.requests[2]["answered"] == 200
    errors = [e for (e,) in node.query("SELECT error FROM push_log ORDER BY id LIMIT 2")]
    assert errors == ["no whole answer within 1 s (TRACE_PUSH_TIMEOUT)"] * 2
    assert node.health()["status"] == "ok"


def test_push_credentials_never_leave_the_process(run: Callable[..., Otrace], receiver: Receiver) -> None:
    """A key in the URL's query is redacted in /health and the start log, and a receiver that echoes
    the Authorization header back puts the token nowhere: not in /health, the log, push_log or
    push_rejects."""
    token, key = "push-" + uuid.uuid4().hex, "key+" + uuid.uuid4().hex + "=="    # sent as key%2B...%3D%3D
    team, answers = "team-" + uuid.uuid4().hex, itertools.count()

    def echo(_: str, request: dict[str, Any]) -> tuple[int, dict[str, str], str]:
        if next(answers) % 2:               # one where the 500 characters kept end inside a credential
            return 400, {}, "x" * 470 + f" invalid team key {team}"
        return 400, {}, f"bad: {json.dumps(request['headers'])} {request['path']}"

    receiver.default = echo
    node = run(push_env(receiver, TRACE_PUSH_TOKEN=token, TRACE_PUSH_RETRIES="1",
                        TRACE_PUSH_HEADERS=f"x-team={team}",
                        TRACE_PUSH_ENDPOINT=f"{receiver.url}?api_key={urllib.parse.quote(key, safe='')}&x=1"))
    post_some(node, 2)
    receiver.wait(lambda requests: len(requests) >= 4)
    node.wait_log(lambda e: e.get("message") == "receiver refused every event sent this cycle: keeping "
                  "them for the next")
    assert receiver.requests[0]["headers"]["Authorization"] == f"Bearer {token}"
    health = json.dumps(node.health())
    assert node.health()["push"]["endpoint"].endswith("/ingest?api_key=***&x=***")
    assert "Bearer ***" in health                            # the echo is there, the token is not
    kept = (health + json.dumps(node.lines) + json.dumps(node.query("SELECT error FROM push_log")) +
            json.dumps(node.query("SELECT reason FROM push_rejects")))
    assert "/ingest?api_key=***&x=1" in kept                 # the echoed query, its key taken out
    assert "x invalid team key ***" in kept
    assert token not in kept and key not in kept and urllib.parse.quote(key, safe="") not in kept
    assert team[:7] not in kept


def test_a_password_in_the_push_url_is_sent_as_basic_auth(run: Callable[..., Otrace],
                                                          receiver: Receiver) -> None:
    node = run(push_env(receiver, TRACE_PUSH_ENDPOINT=receiver.url.replace("://", "://agent:p%40ss@")))
    ids = post_some(node, 1)
    wait_synced(node, ids)
    import base64
    assert receiver.requests[0]["headers"]["Authorization"] == "Basic " + base64.b64encode(
        b"agent:p@ss").decode()
    assert "p%40ss" not in json.dumps(node.lines) and "p@ss" not in json.dumps(node.health())
    euro = run(push_env(receiver, TRACE_PUSH_ENDPOINT=receiver.url.replace("://", "://agent:p%E2%82%AC@")),
               db=node.db_path.with_name("euro.db"))          # no latin-1 form: it stopped the start
    wait_synced(euro, post_some(euro, 1))
    assert receiver.requests[-1]["headers"]["Authorization"] == "Basic " + base64.b64encode(
        "agent:p€".encode()).decode()


ROUND_TRIP = ("created_at", "provider", "model", "status", "error_type", "finish_reason", "session_id",
              "prompt_tokens", "completion_tokens", "total_tokens", "cache_read_tokens", "cache_write_tokens",
              "reasoning_tokens", "cost_usd", "cost_source", "input_text", "output_text")


@pytest.mark.parametrize("protocol", ["http/protobuf", "http/json"])
def test_otlp_push_into_another_otrace_reproduces_every_llm_row(tmp_path: Path, run: Callable[..., Otrace],
                                                                 protocol: str) -> None:
    """One otrace pushing OTLP to another's OTLP routes: each LLM call is one row there with the same
    fields (a call that came in over OTLP keeps its OTel ids, so its trace_id too); each error event
    is one row there with its columns, the failure of a call too (its failed span makes the same
    row); nothing is marked synced before the receiver's 200."""
    receiving = run(db=tmp_path / "receiving.db")
    pushing = run({**PUSH, "TRACE_PUSH_FORMAT": "otlp", "TRACE_PUSH_OTLP_PROTOCOL": protocol,
                   "TRACE_PUSH_ENDPOINT": f"http://127.0.0.1:{receiving.port}", "TRACE_PUSH_INTERVAL": "1h"})
    calls = [trace(trace_id="full", input_text="Summarise this", output_text='[{"role": "assistant"}]',
                   metadata={"customer": "acme", "n": 3, "tags": ["a", "b"]}, prompt_tokens=812,
                   completion_tokens=95, total_tokens=1000, cache_read_tokens=400,
                   cache_write_tokens=12, reasoning_tokens=30, cost_usd=0.0039, latency_ms=1840.25,
                   ttft_ms=250, finish_reason="stop", session_id="s-1", created_at=1796000000123),
             trace(trace_id="failed", status="error", error_type="http_429", finish_reason="error,length"),
             trace(trace_id="priced", provider="openai", model="gpt-4o", prompt_tokens=1000,
                   completion_tokens=100),
             trace(trace_id="deep", metadata=functools.reduce(lambda inner, _: {"k": inner}, range(50), {}))]
    assert pushing.post("/v1/traces", calls).status == 202
    assert pushing.post("/v1/errors", [
        {"error_type": "crash", "message": "segfault", "severity": "critical",
         "metadata": {"core": "dumped"}},
        {"error_type": "llm_error", "category": "timeout", "message": "slow", "severity": "warning",
         "provider": "anthropic", "model": "claude", "session_id": "s-2", "stack_trace": "at f()"}]
    ).status == 202
    span = chat_span("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", **{
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 7, "gen_ai.usage.output_tokens": 3, "gen_ai.request.temperature": 0.2,
        "gen_ai.response.id": "chatcmpl-1", "server.address": "api.openai.com"})
    failed = chat_span("0af7651916cd43dd8448eb211c80319d", "b7ad6b7169203332", **{
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "error.type": "RateLimitError"})
    failed["status"] = {"code": 2, "message": "Error code: 429 - rate limit reached"}
    other = chat_span("0af7651916cd43dd8448eb211c80319e", "b7ad6b7169203333", **{
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude"})
    assert pushing.post("/v1/traces", spans_body(span, failed)).status == 200
    assert pushing.post("/v1/traces", spans_body(other, service="billing", scope="anthropic-sdk")
                        ).status == 200
    pushing.wait_persisted(10)
    assert pushing.stop() == 0                                 # the last push sends them all
    assert set(synced(pushing).values()) == {1}
    sent = {row["trace_id"]: row for row in pushing.rows("llm_traces")}
    got = {row["trace_id"]: row for row in receiving.rows("llm_traces")}
    assert len(got) == len(sent) == 7                         # metadata too deep for protobuf: cut
    origins = {trace_id[-4:]: (meta["service_name"], meta["scope"]) for trace_id, row in got.items()
               if (meta := json.loads(row["metadata"]))}
    assert (origins["3331"], origins["3332"], origins["3333"]) == (    # each under the resource and
        ("svc", "test"), ("svc", "test"), ("billing", "anthropic-sdk"))     # scope it came with
    full = next(row for trace_id, row in got.items() if trace_id == "-".join(
        x.hex() for x in otrace.otel_ids("full", {})))
    assert json.loads(full["metadata"])["customer"] == "acme" and json.loads(full["metadata"])["tags"] == [
        "a", "b"]                                              # a poster's own metadata goes too
    assert set(origins.values()) == {("svc", "test"), ("billing", "anthropic-sdk"), (socket.gethostname(),
                                                                                      "otrace")}
    for trace_id, row in sent.items():
        ids = otrace.otel_ids(trace_id, json.loads(row["metadata"] or "{}"))
        there = got[f"{ids[0].hex()}-{ids[1].hex()}"]
        assert {k: there[k] for k in ROUND_TRIP} == {k: row[k] for k in ROUND_TRIP}, trace_id
        assert there["latency_ms"] == pytest.approx(row["latency_ms"] or 0, abs=1e-6)
        assert there["ttft_ms"] == pytest.approx(row["ttft_ms"]) if row["ttft_ms"] else True
        meta = json.loads(there["metadata"])                          # where it came from, kept
        assert there["source"] == "otlp" and (meta["otrace.trace_id"], meta["otrace.source"]) == (
            trace_id, row["source"])
    assert "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331" in got      # its own ids, kept
    kept = json.loads(got["0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"]["metadata"])
    assert (kept["gen_ai.request.temperature"], kept["gen_ai.response.id"], kept["server.address"]) == (
        0.2, "chatcmpl-1", "api.openai.com")                  # the attributes no column holds go too
    columns = ("error_type", "category", "severity", "message", "stack_trace", "provider", "model",
               "session_id")
    crash = next(row for row in receiving.rows("error_events") if row["error_type"] == "crash")
    kept = json.loads(crash["metadata"])
    assert kept["core"] == "dumped" and kept["otrace.source"] == "http"    # its own, not its carriers
    assert not {k for k in kept if k.startswith("otrace.")} - {"otrace.source", "otrace.trace_id"}, kept
    there = collections.Counter(tuple(row[k] for k in columns) for row in receiving.rows("error_events"))
    here = collections.Counter(tuple(row[k] for k in columns) for row in pushing.rows("error_events"))
    assert there == here + collections.Counter([("llm_error", "rate_limit", "error", "http_429", None,
                                                 "anthropic", "claude-sonnet-4", None)])  # "failed"'s span


def test_error_records_of_one_span_pushed_over_otlp_stay_rows_of_their_own(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """Two ERROR records logged in one span that is no failed call are two failures: pushed over OTLP
    with that span's ids, they are two rows on the receiving otrace too; a record folded into its failed
    call's row goes there as that row."""
    receiving = run(db=tmp_path / "receiving.db")
    pushing = run({**PUSH, "TRACE_PUSH_FORMAT": "otlp", "TRACE_PUSH_INTERVAL": "1h",
                   "TRACE_PUSH_ENDPOINT": f"http://127.0.0.1:{receiving.port}"})
    trace_hex = "0af7651916cd43dd8448eb211c8031aa"
    chat = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "error.type": "APITimeoutError"}
    failed = chat_span(trace_hex, f"{1:016x}", **chat)
    assert pushing.post("/v1/traces", spans_body(failed)).status == 200
    pushing.wait_persisted(2)
    for span_hex, message in ((f"{1:016x}", "request timed out"), (f"{2:016x}", "tool crashed"),
                              (f"{2:016x}", "tool crashed again")):
        assert pushing.post("/v1/logs", log_body(trace_hex, span_hex, "", {"message": message}, severity=17)
                            ).status == 200
    pushing.wait_persisted(5)
    assert pushing.stop() == 0                                 # the last push sends them all
    sent = sorted(row["message"] for row in pushing.rows("error_events"))
    assert sent == ["APITimeoutError", '{"message":"tool crashed again"}', '{"message":"tool crashed"}']
    assert sorted(row["message"] for row in receiving.rows("error_events")) == sent


def test_a_spans_otrace_metadata_adds_its_keys_and_none_otrace_keeps_itself(
        run: Callable[..., Otrace]) -> None:
    """otrace.metadata (how an otrace pushes the rest of a call's metadata) adds a poster's keys to the
    row's metadata, never one otrace keeps itself: another sender can neither name the span's parent
    nor break the request with a value of the wrong kind."""
    node = run()
    span = chat_span("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", **{
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"})
    span["attributes"].append({"key": "otrace.metadata", "value": {"kvlistValue": {"values": [
        {"key": "customer", "value": {"stringValue": "acme"}}, {"key": "dropped", "value": {"intValue": "1"}},
        {"key": "otel_merged_spans", "value": {"intValue": "5"}},
        {"key": "otel_parent_span_id", "value": {"stringValue": "1111111111111111"}},
        {"key": "gen_ai.request.model", "value": {"stringValue": "other"}}]}}})
    assert node.post("/v1/traces", spans_body(span)).status == 200
    node.wait_persisted(1)
    meta = json.loads(node.rows("llm_traces")[0]["metadata"])
    assert (meta["customer"], meta["service_name"], meta["gen_ai.request.model"]) == ("acme", "svc", "gpt-4o")
    assert not {"dropped", "otel_merged_spans", "otel_parent_span_id"} & set(meta), meta


def test_metadata_cut_for_its_size_has_no_keys_to_push() -> None:
    """Metadata over TRACE_MAX_TEXT_BYTES is stored as the marker of the cut alone: none of it is a
    poster's key for otrace.metadata (its size would arrive as one)."""
    assert otrace.metadata_own({"_otrace_truncated": True, "original_bytes": 20000}) == {}
    assert otrace.metadata_own({"customer": "acme", "_otrace_left_out": 2}) == {"customer": "acme"}
    assert otrace.metadata_own({"customer": "acme", "_otrace_truncated": True}) == {"customer": "acme"}


def test_otlp_push_holds_times_past_its_range_at_their_largest(run: Callable[..., Otrace],
                                                               receiver: Receiver) -> None:
    """otrace takes times up to 9999; OTLP's nanoseconds end in 2554. A row past that, or a latency
    that ends past it, is pushed with those times held at the largest, and holds no other row back."""
    node = run(otlp_push_env(receiver))
    ids = node.post("/v1/traces", [trace(trace_id="future", created_at="9999-12-31T23:59:59Z"),
                                   trace(trace_id="long", latency_ms=1e15), trace(trace_id="plain")]
                    ).json["trace_ids"]
    ids += node.post("/v1/errors", {"error_type": "crash", "message": "late",
                                    "created_at": "2600-01-01T00:00:00Z"}).json["trace_ids"]
    wait_synced(node, ids)
    spans = {a["value"]["stringValue"]: s for r in receiver.requests for rs in (r["json"] or {}).get(
             "resourceSpans", []) for ss in rs["scopeSpans"] for s in ss["spans"] for a in s["attributes"]
             if a["key"] == "otrace.trace_id"}
    largest = str(2**64 - 1)
    assert (spans["future"]["startTimeUnixNano"], spans["future"]["endTimeUnixNano"]) == (largest, largest)
    assert spans["long"]["endTimeUnixNano"] == largest and spans["long"]["startTimeUnixNano"] != largest
    assert spans["plain"]["endTimeUnixNano"] != largest
    records = [rec for r in receiver.requests for rl in (r["json"] or {}).get("resourceLogs", [])
               for sl in rl["scopeLogs"] for rec in sl["logRecords"]]
    assert [rec["timeUnixNano"] for rec in records if rec["body"]["stringValue"] == "late"] == [largest]
    assert node.health()["push"]["last_error"] is None


def test_a_row_otlp_cannot_hold_is_given_up_and_reported_not_stopping_push(
        tmp_path: Path, run: Callable[..., Otrace], receiver: Receiver) -> None:
    """A stored row whose value OTLP has no room for (here a histogram bucket count below zero, as a
    database from elsewhere might hold) is given up and reported as a loss; the rows beside it go."""
    db = tmp_path / "otrace.db"
    otrace.open_database(str(db))
    columns = otrace.GENAI_METRICS.columns

    def point(trace_id: str, counts: list[int]) -> tuple:
        fields = dict.fromkeys(columns) | {
            "trace_id": trace_id, "created_at": 1796000000000, "received_at": 1796000000000, "source": "otlp",
            "name": "gen_ai.client.token.usage", "kind": "histogram", "unit": "{token}", "value": 3.0,
            "count": 1, "window_start": 1795999990000, "reset": 0, "truncated": 0,
            "buckets": json.dumps({"bounds": [1.0], "counts": counts})}
        return tuple(fields[c] for c in columns)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(otrace.insert_sql("genai_metrics"), [point("bad", [-1, 2]), point("good", [1, 0])])
    node = run(otlp_push_env(receiver))
    wait_until(lambda: dict(node.query("SELECT trace_id, synced FROM genai_metrics")) == {
        "bad": 3, "good": 1}, what="the good point pushed, the bad one given up and reported")
    assert node.query("SELECT trace_id, reason FROM push_rejects") == [
        ("bad", "cannot be sent as otlp: ValueError: Value out of range: -1")]
    receiver.wait(lambda requests: any("otrace.loss" in json.dumps(r["json"]) for r in requests))
    assert node.health()["push"]["events_unencodable"] == 1
    assert node.logs("events that cannot be sent in the push format: given up, reported in the next push")


def test_an_otrace_receiving_relayed_spans_keeps_the_senders_rows(tmp_path: Path,
                                                                  run: Callable[..., Otrace]) -> None:
    """Two instrumentations' spans that one otrace could not tell apart as one call (an outer span
    and two inner ones) stay three rows in the otrace it pushes them to, one span per request, as
    they are in the first: merging was the sender's to do, and a second guess counts other tokens."""
    receiving, pushing = relaying_pair(tmp_path, run)
    body = spans_body(call_span("b7ad6b71692033a1", 0, 3 * SECOND), scope="langchain")
    body["resourceSpans"][0]["scopeSpans"].append({"scope": {"name": "openai"}, "spans": [
        call_span("b7ad6b71692033a2", SECOND // 2, SECOND),
        call_span("b7ad6b71692033a3", 3 * SECOND // 2, 2 * SECOND)]})
    assert pushing.post("/v1/traces", body).status == 200
    wait_until(lambda: len(synced(pushing)) == 3 and set(synced(pushing).values()) == {1}, what="3 pushed")
    assert spans_stored(receiving, 3) == (3, 15, 0)


def test_a_relayed_span_and_one_straight_from_its_sdk_are_one_call(tmp_path: Path,
                                                                   run: Callable[..., Otrace]) -> None:
    """The inner span of a call reaches an otrace relayed by another, its outer span straight from
    the SDK: one call, one row, as two instrumentations' spans sent straight are."""
    receiving, pushing = relaying_pair(tmp_path, run)
    assert pushing.post("/v1/traces", spans_body(call_span("b7ad6b71692033a2", SECOND // 2, SECOND),
                                                 scope="openai")).status == 200
    wait_until(lambda: set(synced(pushing).values()) == {1}, what="the inner span pushed")
    assert spans_stored(receiving, 1) == (1, 5, 0)
    assert receiving.post("/v1/traces", spans_body(call_span("b7ad6b71692033a1", 0, 3 * SECOND),
                                                   scope="langchain")).status == 200
    assert spans_stored(receiving, 2) == (1, 5, 1)


SECOND = 1_000_000_000


def relaying_pair(tmp_path: Path, run: Callable[..., Otrace]) -> tuple[Otrace, Otrace]:
    """An otrace, and one pushing OTLP to it a row a request."""
    receiving = run(db=tmp_path / "receiving.db")
    return receiving, run({**PUSH, "TRACE_PUSH_FORMAT": "otlp", "TRACE_PUSH_MAX_BYTES": "1KiB",
                           "TRACE_PUSH_ENDPOINT": f"http://127.0.0.1:{receiving.port}",
                           "TRACE_PUSH_INTERVAL": "300ms"})


def call_span(span_hex: str, begins: int, ends: int) -> dict[str, Any]:
    """A span of one chat call (5 input tokens), `begins` and `ends` nanoseconds into its trace."""
    found = chat_span("0af7651916cd43dd8448eb211c80beef", span_hex, **{
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 5})
    start = 1796000000000000000
    return found | {"startTimeUnixNano": str(start + begins), "endTimeUnixNano": str(start + ends)}


def spans_stored(node: Otrace, spans: int) -> tuple[int, int, int]:
    """Once `spans` spans are mapped and stored: the rows, their input tokens, the spans merged."""
    mapped = wait_until(lambda: (h := node.health()["otlp"])["llm_spans"] + h["spans_merged"] >= spans
                        and h, what=f"{spans} spans mapped")
    node.wait_persisted(mapped["llm_spans"])
    rows = node.rows("llm_traces")
    return len(rows), sum(row["prompt_tokens"] for row in rows), node.health()["otlp"]["spans_merged"]


def test_a_call_nested_as_deep_as_the_api_takes_is_pushed_over_otlp(run: Callable[..., Otrace],
                                                                    receiver: Receiver) -> None:
    """Metadata nested as deep as the API parses is deeper than push can write back as JSON text (its
    stack is deeper there): the call goes, that value marked, and so does the call after it."""
    node = run(otlp_push_env(receiver))
    for depth in range(1000, 0, -1):                 # the deepest the API takes, nesting lists
        body = '[{"trace_id": "deep", "provider": "p", "model": "m", "metadata": {"m": ' + "[" * depth + \
            "]" * depth + "}}]"
        if exchange(node.port, "POST", "/v1/traces", body.encode(), {"Content-Type": "application/json"}
                    ).status == 202:
            break
    assert depth > 900
    wait_synced(node, [*node.post("/v1/traces", trace(trace_id="plain")).json["trace_ids"], "deep"])
    spans = {a["value"]["stringValue"]: s for r in receiver.requests for rs in (r["json"] or {}).get(
             "resourceSpans", []) for ss in rs["scopeSpans"] for s in ss["spans"] for a in s["attributes"]
             if a["key"] == "otrace.trace_id"}
    assert set(spans) == {"deep", "plain"}
    assert otrace.TOO_DEEP_TO_SEND in json.dumps(spans["deep"])
    assert node.health()["push"]["events_unencodable"] == 0 and not node.logs("push failed")


def test_otlp_push_outlasts_a_dead_port_a_429_and_partial_success(run: Callable[..., Otrace],
                                                                 receiver: Receiver) -> None:
    """A dead port, then a 429, then partial_success refusing one span of a batch: the batch was taken
    (OTLP forbids sending it again: its other items would be stored twice, a metric's change counted
    twice), the refusal said in push_log, /health and the log; the 429 is retried after its
    Retry-After; no row is synced early."""
    poison = "poison-call"

    def answer(_: Receiver, request: dict[str, Any]) -> Any:
        spans = [s for rs in request["json"].get("resourceSpans", []) for ss in rs["scopeSpans"]
                 for s in ss["spans"]]
        named = [a["value"]["stringValue"] for s in spans for a in s["attributes"]
                 if a["key"] == "otrace.trace_id"]
        rejected = named.count(poison)
        return 200, {"Content-Type": "application/json"}, json.dumps(
            {"partialSuccess": {"rejectedSpans": str(rejected), "errorMessage": "bad"}} if rejected else {})

    receiver.script = [(429, {"Retry-After": "1"}, "slow down")]
    receiver.default = answer
    receiver.unlisten()                                           # a dead port first
    node2 = run(otlp_push_env(receiver))
    ids = node2.post("/v1/traces", [trace(trace_id=poison if i == 4 else f"call-{i}") for i in range(9)]
                     ).json["trace_ids"]
    wait_until(lambda: node2.query("SELECT count(*) FROM push_log WHERE http_status IS NULL AND error LIKE "
                                   "'%refused%'")[0][0] >= 2, what="pushes to the dead port")
    assert set(synced(node2).values()) == {0}
    said = node2.query("SELECT error FROM push_log WHERE http_status IS NULL")[0][0]
    assert said.startswith("NewConnectionError: HTTPConnection(host="), said     # urllib3's own words
    receiver.listen()
    receiver.wait(lambda requests: requests and requests[0]["answered"] == 429)
    assert set(synced(node2).values()) == {0}                     # a 429 marks nothing
    wait_synced(node2, ids, timeout=30)
    first, second = receiver.requests[0], receiver.requests[1]
    assert first["answered"] == 429 and second["at"] - first["at"] >= 1.0   # Retry-After, not sooner
    assert receiver.requests[0]["headers"]["Content-Type"] == "application/json"
    assert all(r["headers"].get("Idempotency-Key") for r in receiver.requests)
    assert node2.query("SELECT events, error FROM push_log WHERE http_status = 200") == [
        (9, "partial_success: 1 of 9 refused: bad")]
    push = node2.health()["push"]
    assert (push["last_push_status"], push["events_refused_by_receiver"], push["last_success_time"]) == (
        "refused", 1, None)
    said = node2.logs("receiver took a batch but refused some of its items: those are given up, "
                      "not sent again")
    assert [(e["signal"], e["error"], e["refused"]) for e in said] == [
        ("traces", "HTTP 200 on /v1/traces: partial_success: 1 of 9 refused: bad", 1)]
    assert node2.stop() == 0                                     # its final push has nothing to send
    taken = [a["value"]["stringValue"] for r in receiver.requests if r["answered"] == 200
             for rs in r["json"]["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]
             for a in s["attributes"] if a["key"] == "otrace.trace_id"]
    assert sorted(taken) == sorted(ids)                                    # each sent once: none again
    assert not node2.query("SELECT * FROM push_rejects")


def test_a_trace_and_an_error_sharing_a_trace_id_push_as_two_events(run: Callable[..., Otrace],
                                                                    receiver: Receiver) -> None:
    node = run(push_env(receiver))
    shared = "call-" + uuid.uuid4().hex
    assert node.post("/v1/traces", trace(trace_id=shared)).status == 202
    assert node.post("/v1/errors", {"error_type": "llm_error", "message": "429", "trace_id": shared}
                     ).status == 202
    wait_until(lambda: len(receiver.trace_ids()) == 2, what="both pushed")
    events = [e for r in receiver.requests for e in r["json"]["events"]]
    assert sorted(e["event_id"] for e in events) == [f"error_event:{shared}", f"llm_trace:{shared}"]


@pytest.mark.parametrize("status", [401, 403, 404])
def test_configuration_fault_stops_the_cycle_and_touches_no_row(run: Callable[..., Otrace],
                                                                receiver: Receiver, status: int) -> None:
    receiver.default = status
    node = run(push_env(receiver, TRACE_PUSH_INTERVAL="200ms"))
    post_some(node, 3)
    receiver.wait(lambda reqs: len(reqs) >= 2)
    first = receiver.requests[0]["json"]["batch_id"]
    assert receiver.requests[1]["json"]["batch_id"] != first    # no retry within the cycle
    assert set(synced(node).values()) == {0}
    push = node.health()["push"]
    assert node.health()["last_push_status"] == "config_error"
    assert push["last_error"].startswith(f"HTTP {status} on /ingest")   # which path: OTLP has three


def test_batches_respect_the_byte_cap(run: Callable[..., Otrace], receiver: Receiver) -> None:
    node = run({**PUSH, "TRACE_PUSH_INTERVAL": "1h"})
    small = node.post("/v1/traces", [trace(input_text="x" * 500) for _ in range(40)]).json["trace_ids"]
    big = node.post("/v1/traces", trace(input_text="y" * 12000)).json["trace_ids"]
    node.wait_persisted(41)
    assert node.stop() == 0
    node2 = run(push_env(receiver, TRACE_PUSH_MAX_BYTES="4KiB"), db=node.db_path)
    wait_synced(node2, small + big)
    for request in receiver.requests:
        if len(request["json"]["events"]) > 1:
            assert request["bytes"] <= 4096
        else:
            assert request["json"]["events"][0]["trace_id"] in big or request["bytes"] <= 4096
    assert any(r["bytes"] > 4096 and len(r["json"]["events"]) == 1 for r in receiver.requests)
    assert sorted(receiver.trace_ids()) == sorted(small + big)


def test_a_backlog_as_large_as_most_of_a_small_cap_is_marked_pushed_a_small_share_at_a_time(
        tmp_path: Path, run: Callable[..., Otrace], receiver: Receiver) -> None:
    """Marking a confirmed batch's rows pushed rewrites their pages into the WAL in one transaction,
    which the cap counts. Under a cap smaller than 40 times TRACE_PUSH_MAX_BYTES a batch holds a
    fortieth of the cap, so a backlog (a receiver down a while) is not marked in one go: that put more
    than half the cap in the WAL at once, far past the room the marks keep for it. The setting is
    lowered as start says."""
    cap, path = 8 << 20, tmp_path / "otrace.db"
    ids = seed(path, [("trace", 1200, 0)], age_days=0.01)["trace/0"]       # 0.6 of the cap, unpushed
    wal, largest, done = f"{path}-wal", [0], threading.Event()

    def watch() -> None:
        while not done.wait(0.001):
            largest[0] = max(largest[0], otrace.file_size(wal))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        node = run(push_env(receiver, TRACE_DB_MAX_BYTES=str(cap)), db=path)
        wait_synced(node, ids, timeout=60)
    finally:
        done.set()
        watcher.join()
    assert max(request["bytes"] for request in receiver.requests) <= cap // otrace.PUSH_CAP_SHARE
    assert largest[0] < cap / 2, largest[0] / cap        # batches' marks may meet under a reader
    lowered = node.logs("TRACE_PUSH_MAX_BYTES is over 1/40 of TRACE_DB_MAX_BYTES: lowered")
    assert [(e["push_max_bytes"], e["lowered_to"]) for e in lowered] == [(5 << 20, cap // 40)]
    assert node.logs("starting")[0]["settings"]["push_max_bytes"] == cap // 40


def test_gzip_bodies(run: Callable[..., Otrace], receiver: Receiver) -> None:
    node = run(push_env(receiver, TRACE_PUSH_GZIP="on"))
    ids = post_some(node, 20)
    wait_synced(node, ids)
    request = receiver.requests[0]
    assert request["headers"]["Content-Encoding"] == "gzip" and request["raw_bytes"] < request["bytes"]
    assert set(receiver.trace_ids()) >= set(ids)


def test_breaker_opens_after_failed_cycles_and_closes_on_success(run: Callable[..., Otrace],
                                                                 receiver: Receiver) -> None:
    receiver.default = 503
    node = run(push_env(receiver, TRACE_PUSH_RETRIES="1", TRACE_PUSH_BREAKER_THRESHOLD="2",
                        TRACE_PUSH_BREAKER_COOLDOWN="3s"))
    ids = post_some(node, 2)
    push = wait_until(lambda: (p := node.health()["push"])["breaker"] == "open" and p, what="breaker open")
    assert push["consecutive_failures"] >= 2 and push["next_attempt_at"]   # more if a trial came between
    opened = len(receiver.requests)
    receiver.default = 200
    wait_synced(node, ids)
    wait_until(lambda: (p := node.health()["push"])["breaker"] == "closed" and p["consecutive_failures"] == 0,
               what="the breaker closed by the successful cycle")
    # while open, it waited: no request in the cool-down before the successful one
    assert receiver.requests[opened]["at"] - receiver.requests[opened - 1]["at"] >= 2.9
    recovered = node.wait_log(lambda e: e.get("message") == "push cycles succeed again")   # the outage ended
    assert recovered["failed_cycles"] == len(node.logs("push cycle failed")) >= 2
    assert "failed_seconds" in recovered
    wait_synced(node, post_some(node, 1))
    assert len(node.logs("push cycles succeed again")) == 1


def test_sigterm_pushes_what_is_left(run: Callable[..., Otrace], receiver: Receiver) -> None:
    node = run({**push_env(receiver), "TRACE_PUSH_INTERVAL": "1h"})
    ids = post_some(node, 10)
    assert node.stop() == 0
    assert set(receiver.trace_ids()) == set(ids)
    assert set(synced(node).values()) == {1}
    assert node.logs("final push")[0]["complete"] is True


def test_shutdown_with_a_hanging_receiver_keeps_its_deadline(run: Callable[..., Otrace],
                                                             receiver: Receiver) -> None:
    receiver.default = hang(120)                   # far past any wait of the test: only a deadline ends it
    node = run({**push_env(receiver), "TRACE_PUSH_INTERVAL": "1h", "TRACE_SHUTDOWN_TIMEOUT": "2s"})
    post_some(node, 3)
    node.wait_persisted(4)
    assert node.stop(timeout=60) == 0
    assert set(synced(node).values()) == {0}       # not confirmed: left for the next start


def test_shutdown_with_a_backlog_keeps_its_deadline(run: Callable[..., Otrace], receiver: Receiver) -> None:
    """A healthy receiver and more batches than the deadline allows: the final push stops sending at
    the deadline and what it did not send stays unsynced."""
    def slowly(_: Receiver, __: dict[str, Any]) -> int:
        time.sleep(0.5)                              # 400 batches: 200 s to send them all
        return 200
    receiver.default = slowly
    node = run({**push_env(receiver), "TRACE_PUSH_INTERVAL": "1h", "TRACE_SHUTDOWN_TIMEOUT": "2s",
                "TRACE_PUSH_MAX_BYTES": "4KiB"})
    for n in range(1, 21):
        post_some(node, 200)
        node.wait_persisted(201 * n)
    assert node.stop(timeout=60) == 0
    flags = list(synced(node).values())
    assert 0 < flags.count(1) < len(flags), flags.count(1)    # some pushed, the rest left for next start
    assert node.logs("final push")[0]["complete"] is False
    assert not node.logs("push cycle failed")


def test_the_final_push_packs_nothing_past_its_deadline(tmp_path: Path) -> None:
    """A batch of a large backlog can take seconds to pack (OTLP's JSON, a big TRACE_PUSH_MAX_BYTES, a
    busy machine): the final push's packer stops at the deadline, not at the end of a batch, and its
    rows stay for the next start; a cycle of the loop stops packing once otrace begins to stop, so
    the final push does not wait for it."""
    path = tmp_path / "otrace.db"
    seed(path, [("trace", 50, 0)], age_days=0.01)
    form = otrace.OtlpFormat(otrace.Config(db_path=str(path), push_format="otlp"), "agent")
    with contextlib.closing(otrace.connect(str(path))) as conn:
        def packed(deadline: float | None) -> int:
            batches = otrace.Packer(conn, 1 << 30, ["llm_traces"], form, deadline=deadline).batches()
            return sum(len(batch.spans) for batch in batches)

        assert packed(None) == packed(time.monotonic() + 600) == 50
        with pytest.raises(otrace.OutOfTime):
            packed(time.monotonic())
        stopping = threading.Event()
        stopping.set()                           # a cycle of the loop as otrace stops: the final push's turn
        with pytest.raises(otrace.OutOfTime):
            sum(1 for _ in otrace.Packer(conn, 1 << 30, ["llm_traces"], form, stopping=stopping).batches())


@pytest.mark.parametrize(("push_format", "protocol", "origins"), [
    ("otrace", "", False), ("otlp", "http/protobuf", False), ("otlp", "http/json", False),
    ("otlp", "http/protobuf", True), ("otlp", "http/json", True)])
def test_a_batch_body_stays_within_push_max_bytes_whatever_the_agents_name(
        tmp_path: Path, push_format: str, protocol: str, origins: bool) -> None:
    """TRACE_PUSH_MAX_BYTES caps the whole body: the envelope counted is the format's own, which holds
    the agent's name (any text), not a fixed guess, and in OTLP each origin's resource and scope."""
    path = tmp_path / "otrace.db"
    seed(path, [("trace", 40, 0)], age_days=0.01)
    if origins:                                        # each call from a service of its own, over OTLP
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("UPDATE llm_traces SET source = 'otlp', metadata = json_object('service_name', "
                         "'service-' || id || printf('%.700c', 'y'), 'scope', 'scope-' || (id % 3))")
    agent, limit = "agent-" + "x" * 900, 16384
    config = otrace.Config(db_path=str(path), push_format=push_format, push_endpoint="http://h:4318/",
                           **({"push_otlp_protocol": protocol} if protocol else {}))
    form = otrace.OtlpFormat(config, agent) if push_format == "otlp" else otrace.OtraceFormat(config, agent)
    with contextlib.closing(otrace.connect(str(path))) as conn:
        batches = list(otrace.Packer(conn, limit, ["llm_traces"], form).batches())
    sizes = [sum(map(len, form.body(batch))) for batch in batches]
    assert sum(len(batch.spans) for batch in batches) == 40 and len(batches) > 1
    assert max(sizes) <= limit and min(len(batch.spans) for batch in batches[:-1]) > 1, sizes


def test_confirmed_batch_killed_before_marking_is_sent_again(run: Callable[..., Otrace],
                                                            receiver: Receiver) -> None:
    got_it = threading.Event()
    release = threading.Event()

    def confirm_then_stall(_: Receiver, request: dict[str, Any]) -> None:
        got_it.set()                 # the receiver has stored the batch ...
        release.wait(20)             # ... and otrace dies before it hears the 200
        request["answered"] = 200

    collector = run({**PUSH, "TRACE_PUSH_INTERVAL": "1h"})
    ids = post_some(collector, 4)
    assert collector.stop() == 0
    receiver.script = [confirm_then_stall]
    node = run(push_env(receiver), db=collector.db_path)
    assert got_it.wait(20)
    node.kill()
    release.set()
    node2 = run(push_env(receiver), db=collector.db_path)
    wait_synced(node2, ids)
    seen = [e["trace_id"] for r in receiver.requests for e in r["json"]["events"]]
    assert len(receiver.requests[0]["json"]["events"]) == len(ids)
    duplicated = {t for t in seen if seen.count(t) > 1}
    assert duplicated == set(ids)    # the documented crash case, and only it: the receiver dedups


@pytest.mark.parametrize("move", ["deleted", "another program's database moved in"])
def test_a_batch_read_from_a_file_since_replaced_marks_nothing_where_the_writer_moved(
        tmp_path: Path, move: str) -> None:
    """The writer carries the old file's unpushed rows into a new one (the path's, or the carry file
    while another program's database sits at the path), numbered anew: its pushed rows stay behind.
    The ids of a batch read from the old file then name other rows, so its 2xx, marked after the move,
    must mark none of them (a row never sent would pass for pushed), nor its loss reports."""
    path = tmp_path / "otrace.db"
    made = seed(path, [("trace", 50, 1), ("trace", 150, 0)], age_days=0.01)    # ids 1-50 pushed
    db, writer = writer_at(path)
    try:
        cut = otrace.Cut(("llm_traces",), otrace.UNDELIVERED, "pressure_unpushed", "pass-1", limit=10)
        assert cut(writer.conn).lost == 10                       # ids 51-60 gone, reported below
        read_at = db.merges.read_begins()
        with db.reading() as conn:
            batch = otrace.Batch(losses=otrace.unreported_losses(conn, ("llm_traces",)))
            for trace_id, row_id in conn.execute("SELECT trace_id, id FROM llm_traces WHERE synced = 0 "
                                                 "ORDER BY id LIMIT 100"):
                batch.add("llm_traces", row_id, trace_id, b"{}")   # ids 61-160, in flight
            batch.add(otrace.LOSS, 0, "pass-1", b"{}")            # OTLP sends the losses as records
        if move == "deleted":
            path.unlink()
        else:
            foreign = tmp_path / "foreign.db"
            with contextlib.closing(sqlite3.connect(foreign)) as other:
                other.execute("CREATE TABLE notes (x)")
            foreign.replace(path)
        look_now(writer)                                  # 140 rows there, ids 1-140
        writer.run_job(job := otrace.Job(functools.partial(otrace.record_pushed, batch, otrace.Attempt(
            batch.batch_id, otrace.now_ms(), 0, 0, status=200), db.merges, read_at)))
        job.future.result()
        if move != "deleted":
            assert writer.conn_path == db.carry_path              # until the path is free again
            path.unlink()
            look_now(writer)
        assert writer.conn_path == str(path)
        unsynced = {t for (t,) in writer.conn.execute("SELECT trace_id FROM llm_traces WHERE synced = 0")}
        assert unsynced == set(made["trace/0"][10:])             # all go again
        assert [x["rows"] for x in otrace.unreported_losses(writer.conn, ("llm_traces",))] == [10]
    finally:
        writer.conn.close()


def writer_at(path: Path, lock: otrace.DatabaseLock | None = None,
              **settings: str) -> tuple[otrace.Database, otrace.Writer]:
    """A writer of the database at `path`, its connection open, run by the test (no thread)."""
    db = otrace.Database(str(path))
    writer = otrace.Writer(otrace.Config.from_env({"TRACE_DB_PATH": str(path), **settings}), db,
                           otrace.EventQueue(512, 50), otrace.Counters(otrace.EVENT_COUNTERS), lock)
    writer.conn = writer.connect(str(path))
    return db, writer


@contextlib.contextmanager
def writer_holding(path: Path, **settings: str) -> Iterator[tuple[otrace.Database, otrace.Writer]]:
    """writer_at a new database at `path`, holding otrace's lock as a running otrace does (the file it
    leaves in a move stays open, so its inode is no new file's); closed and let go after."""
    otrace.open_database(str(path))
    lock = otrace.DatabaseLock(str(path))
    db, writer = writer_at(path, lock, **settings)
    try:
        yield db, writer
    finally:
        writer.conn.close()
        lock.release()


def look_now(writer: otrace.Writer) -> None:
    """The writer's look after its file, due now (as a batch's end or the idle wake makes it)."""
    writer.look_at = 0.0
    writer.look_after_file()


def moved_to_the_carry(db: otrace.Database, writer: otrace.Writer) -> None:
    """Another program's database takes the path: the writer moves to the carry file, and a batch is
    written there ("in-carry")."""
    path = Path(db.path)
    foreign = path.with_name("foreign.db")
    with contextlib.closing(sqlite3.connect(foreign)) as other:
        other.execute("CREATE TABLE notes (x)")
    foreign.replace(path)
    look_now(writer)
    assert writer.conn_path == db.carry_path
    writer.commit([one_call("in-carry")])


def moved_back_with(db: otrace.Database, writer: otrace.Writer, unsynced: list[str]) -> None:
    """The writer's next look takes the carry file into a new file at the path, which then holds
    `unsynced` as its rows not pushed; the carry file is gone."""
    look_now(writer)
    assert writer.reopen_fault.error is None and not db.replaced_pending
    assert writer.conn_path == db.path and not Path(db.carry_path).exists()
    rows = [t for (t,) in writer.conn.execute("SELECT trace_id FROM llm_traces WHERE synced = 0")]
    assert sorted(rows) == sorted(unsynced)


def test_a_database_file_put_back_before_its_move_began_is_written_on(tmp_path: Path) -> None:
    """Moved away while a batch kept its move waiting, then put back: nothing is moved, and the writer
    goes on in it. It used to wait for the move for ever (pushes refused, /health saying a move)."""
    path = tmp_path / "otrace.db"
    with writer_holding(path) as (db, writer):
        writer.commit([one_call("before")])
        look_now(writer)
        aside = tmp_path / "aside.db"
        path.rename(aside)
        writer.pending = [one_call("pending")]
        look_now(writer)                           # the move waits for the batch
        assert db.replaced_pending
        writer.pending = []
        aside.rename(path)
        look_now(writer)
        assert not db.replaced_pending and writer.reopen_fault.error is None
        writer.commit([one_call("after")])
        with db.reading() as conn:                         # readers are let in again
            stored = {t for (t,) in conn.execute("SELECT trace_id FROM llm_traces")}
            moves = conn.execute("SELECT count(*) FROM error_events").fetchone()[0]    # a move says so
        assert stored == {"before", "after"} and moves == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "otrace.db", "otrace.db-shm", "otrace.db-wal", "otrace.db.lock"]


def test_a_carry_file_a_hand_holds_locked_when_it_is_taken_in_keeps_its_rows_until_it_can_be(
        tmp_path: Path) -> None:
    """Another program's database took the path, so the writer moved to the carry file and wrote there.
    The path is free again, but a hand's sqlite3 holds a write lock on the carry file: taking it in
    fails (database locked) and the carry file keeps its rows. Once the hand lets go the move is made
    again: every unpushed row is in the file at the path once, and the carry file is gone."""
    path = tmp_path / "otrace.db"
    made = seed(path, [("trace", 20, 1), ("trace", 30, 0)], age_days=0.01)
    db, writer = writer_at(path)
    held = os.open(path, os.O_RDONLY)      # as otrace's lock file does: no new file takes the old inode
    try:
        moved_to_the_carry(db, writer)
        with contextlib.closing(sqlite3.connect(db.carry_path, isolation_level=None)) as hand:
            hand.execute("BEGIN IMMEDIATE")
            path.unlink()
            look_now(writer)                       # waits BUSY_TIMEOUT for the lock
            assert otrace.primary_code(writer.reopen_fault.error or "") == "SQLITE_BUSY"
            assert db.replaced_pending
            carried = {t for (t,) in hand.execute("SELECT trace_id FROM llm_traces")}
            assert carried == {*made["trace/0"], "in-carry"}
            hand.execute("ROLLBACK")
        moved_back_with(db, writer, [*made["trace/0"], "in-carry"])
        assert writer.counters.snapshot()["dropped"] == 0
    finally:
        writer.conn.close()
        os.close(held)


@needs_root
def test_a_carry_file_taken_in_on_a_full_disk_keeps_its_rows_until_there_is_room(tmp_path: Path) -> None:
    """The writer wrote to the carry file while another program's database held the path. The path is
    free again, and the disk has room for the new file's tables but not for the carry's rows: taking
    them in fails (disk full) and the carry file keeps them. With room, every unpushed row is in the
    file at the path once, and the carry file is gone."""
    with tmpfs(tmp_path / "vol", "16m") as vol:
        path = vol / "otrace.db"
        made = seed(path, [("trace", 20, 1), ("trace", 1000, 0)], age_days=0.01)   # 4 MB to carry
        db, writer = writer_at(path, TRACE_DISK_RESERVE_BYTES="0")
        try:
            moved_to_the_carry(db, writer)
            path.unlink()
            filler = fill(vol)
            os.truncate(filler, filler.stat().st_size - (1 << 20))     # 1 MiB: the new file's tables
            look_now(writer)
            assert otrace.primary_code(writer.reopen_fault.error or "") == "SQLITE_FULL"
            assert db.replaced_pending and path.exists()                # made, then the carry failed
            carry = otrace.sqlite_uri(db.carry_path, "ro")
            with contextlib.closing(sqlite3.connect(carry, uri=True)) as conn:
                carried = {t for (t,) in conn.execute("SELECT trace_id FROM llm_traces")}
            assert carried == {*made["trace/0"], "in-carry"}
            filler.unlink()
            moved_back_with(db, writer, [*made["trace/0"], "in-carry"])
        finally:
            writer.conn.close()


@needs_root
@pytest.mark.parametrize("hold", ["full disk", "reader"])
def test_a_database_file_moved_away_keeps_the_commits_its_wal_holds(tmp_path: Path, hold: str) -> None:
    """`mv otrace.db elsewhere` while its last commits are only in its WAL (beside the path), and the
    WAL cannot be taken into it (a full disk, a reader in a transaction): the move does not wait, and
    that WAL is kept aside, not removed (which left the moved file malformed, or without them); put
    beside the moved file, it makes it whole."""
    with tmpfs(tmp_path / "vol", "32m") as vol:
        path, moved = vol / "otrace.db", vol / "moved.db"
        with writer_holding(path, TRACE_DISK_RESERVE_BYTES="0") as (db, writer), \
                contextlib.closing(sqlite3.connect(path, isolation_level=None)) as reader:
            writer.conn.execute("PRAGMA wal_autocheckpoint = 0")       # its commits stay in the WAL
            writer.commit([otrace.Unit([otrace.event_row(otrace.TRACES, otrace.trace_row, {
                "provider": "p", "model": "m", "trace_id": f"t-{n}", "input_text": "t" * 2000}, "http")
                for n in range(1500)])])
            writer.conn.execute("UPDATE llm_traces SET synced = 1 WHERE trace_id <> 't-0'")   # pushed
            look_now(writer)
            if hold == "reader":
                reader.execute("BEGIN")
                assert reader.execute("SELECT count(*) FROM llm_traces").fetchone() == (1500,)
            path.rename(moved)
            filler = fill(vol) if hold == "full disk" else None
            if filler:
                os.truncate(filler, filler.stat().st_size - (1 << 20))
            look_now(writer)                 # on a full disk the new file waits for room
            [kept] = vol.glob("otrace.db.left-*-wal")
            assert kept.stat().st_size > 3 << 20
            if filler:
                filler.unlink()
            moved_back_with(db, writer, ["t-0"])
        kept.rename(f"{moved}-wal")
        with contextlib.closing(sqlite3.connect(moved)) as conn:
            assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
            assert conn.execute("SELECT count(*) FROM llm_traces").fetchone() == (1500,)


def test_a_backup_moved_in_right_after_a_move_does_not_read_the_new_files_wal(tmp_path: Path) -> None:
    """A file moved in over the path before the writer's next look after a move (`mv backup.db
    otrace.db` within a second or so): the WAL beside it is the file it replaced's, known from the
    move on, and never read as the backup's own (which corrupted it)."""
    path, backup = tmp_path / "otrace.db", tmp_path / "backup.db"
    made = seed(backup, [("trace", 30, 1)], age_days=0.01)
    with writer_holding(path) as (db, writer):
        writer.commit([one_call("before")])
        look_now(writer)
        path.unlink()
        look_now(writer)                           # moved to a new file
        assert not db.replaced_pending and Path(f"{path}-wal").exists()
        writer.conn.execute("PRAGMA wal_autocheckpoint = 0")
        writer.commit([one_call(f"after-{n}") for n in range(50)])   # its WAL holds them, at the path
        backup.rename(path)
        look_now(writer)
        assert not db.replaced_pending and writer.reopen_fault.error is None
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        stored = {t for (t,) in conn.execute("SELECT trace_id FROM llm_traces")}
    assert stored == {*made["trace/1"], "before", *(f"after-{n}" for n in range(50))}


def moved_with_wal_left(path: Path, moved: Path) -> bytes:
    """A database at `path` moved to `moved` while its last commit was in the WAL, which a crash then
    left beside `path` (with its -shm): that WAL's bytes."""
    otrace.open_database(str(path))
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute(otrace.OFFSET_SQL, (1, 2, "f", "/log", 10, 0))
        path.rename(moved)
        wal = Path(f"{path}-wal").read_bytes()               # as a crash leaves it: the process gone
        shm = Path(f"{path}-shm").read_bytes()
    Path(f"{path}-wal").write_bytes(wal)
    Path(f"{path}-shm").write_bytes(shm)
    return wal


def test_a_wal_beside_a_new_empty_database_file_is_kept_aside_not_deleted(tmp_path: Path) -> None:
    """A start after a crash while a file moved away had its last commits in the WAL beside the path:
    the new file at the path is empty, and SQLite would delete that WAL as its own. It is kept aside."""
    path, moved = tmp_path / "otrace.db", tmp_path / "moved.db"
    wal = moved_with_wal_left(path, moved)
    otrace.open_database(str(path))
    [kept] = tmp_path.glob("otrace.db.left-*-wal")
    assert kept.read_bytes() == wal
    kept.rename(f"{moved}-wal")
    with contextlib.closing(sqlite3.connect(moved)) as conn:
        assert conn.execute("SELECT position FROM log_offsets").fetchall() == [(10,)]


def test_health_names_the_files_set_aside_beside_the_database_and_their_bytes(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A moved file's last commits kept aside (here by a start after a crash), a damaged file: otrace
    never removes them, and on a small volume they add up. The start says so; /health and /metrics
    say how many and how big, outside the cap, until a hand removes them."""
    path = tmp_path / "otrace.db"
    wal = moved_with_wal_left(path, tmp_path / "moved.db")
    Path(f"{path}.damaged-1700000000000").write_bytes(b"x" * 5000)
    node = run({}, db=path)
    [kept] = tmp_path.glob("otrace.db.left-*-wal")
    [said] = node.logs("files set aside beside the database take disk space: restore or remove them")
    assert said["count"] == 2
    aside = node.health()["db_set_aside"]
    assert aside == {"count": 2, "bytes": len(wal) + 5000,
                     "files": sorted(["otrace.db.damaged-1700000000000", kept.name])}
    assert f"otrace_db_set_aside_bytes {len(wal) + 5000}" in node.request("GET", "/metrics").body.decode()
    kept.unlink()
    assert node.health()["db_set_aside"]["count"] == 1


def test_a_database_file_deleted_before_the_writer_opens_it_is_made_anew_and_no_row_is_dropped(
        tmp_path: Path) -> None:
    """The file checked at the start is gone when the writer connects: SQLite makes an empty file at
    the path, which the writer must make otrace's before it writes there (its tables, WAL mode)."""
    path = tmp_path / "otrace.db"
    service = service_at(path)
    try:
        path.unlink()
        assert service.events.offer(one_call("after"))
        service.writer.start()
        assert service.events.wait_drained(30)
        wait_until(lambda: not service.db.replaced_pending, 30, "the writer at home in the new file")
        assert service.counters.snapshot()["dropped"] == 0
        wait_until(lambda: service.writer.reopen_fault.error is None and service.writer.fault.error is None,
                   30, "the write fault cleared")      # the batch is done a moment before that
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("SELECT trace_id FROM llm_traces").fetchall() == [("after",)]
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        stopped(service)


def damage(path: Path, table: str) -> None:
    """Overwrite the root page of `table` in the database file at `path` (checkpointed, not open)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        [(root,)] = conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = ?", (table,)).fetchall()
    damage_page(path, root)


def test_a_damaged_database_file_is_set_aside_and_what_it_owes_that_can_be_read_goes_on_in_a_new_one(
        tmp_path: Path) -> None:
    """A write that finds the file damaged (SQLITE_CORRUPT) does not wait for it to heal: the file is
    renamed aside for a hand, and the writer moves to a new file with the rows it could not write,
    carrying what the damaged file owes where it can still be read."""
    path = tmp_path / "otrace.db"
    made = seed(path, [("trace", 100, 0), ("metric", 20, 0)], age_days=0.01)
    service = service_at(path)
    try:
        damage(path, "llm_traces")
        assert service.events.offer(one_call("after"))
        service.writer.start()
        assert service.events.wait_drained(60)
        wait_until(lambda: not service.db.replaced_pending, 30, "the writer in a new file")
        [aside] = tmp_path.glob("otrace.db.damaged-*[0-9]")
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("SELECT trace_id FROM llm_traces").fetchall() == [("after",)]
            metrics = {t for (t,) in conn.execute("SELECT trace_id FROM system_metrics")}
            assert metrics == set(made["metric/0"])
            assert conn.execute("PRAGMA quick_check").fetchone() == ("ok",)
        with contextlib.closing(sqlite3.connect(aside)) as conn:
            assert conn.execute("PRAGMA quick_check").fetchone() != ("ok",)     # kept as it was
        assert service.counters.snapshot()["dropped"] == 0
        wait_until(lambda: service.writer.fault.error is None and service.writer.reopen_fault.error is None,
                   30, "the write fault cleared")      # the batch is done a moment before that
    finally:
        stopped(service)


def test_a_file_whose_header_is_damaged_is_left_for_a_new_one_though_nothing_in_it_can_be_read(
        tmp_path: Path) -> None:
    """Damage to the first bytes (the header), seen once another connection has checkpointed: nothing
    of the old file can be carried, and moving to a new file still goes on, with the batch that met the
    damage (it was retried for ever, every POST answered 503 and the batch lost at the stop)."""
    path = tmp_path / "otrace.db"
    service = service_at(path)
    try:
        service.writer.start()
        assert service.events.offer(one_call("before"))
        assert service.events.wait_drained(60)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with open(path, "r+b") as f:
            f.write(b"GARBAGE" * 3)
        assert service.events.offer(one_call("after"))
        assert service.events.wait_drained(60)
        wait_until(lambda: not service.db.replaced_pending, 30, "the writer in a new file")
        [aside] = tmp_path.glob("otrace.db.damaged-*[0-9]")
        assert aside.read_bytes().startswith(b"GARBAGE")                   # kept as it was, for a hand
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("SELECT trace_id FROM llm_traces").fetchall() == [("after",)]
    finally:
        stopped(service)


def service_at(path: Path, **settings: Any) -> otrace.Service:
    """otrace in this process on the database at `path`, its threads not started."""
    return otrace.Service(otrace.Config(db_path=str(path), port=0, otlp_port=0, metrics_interval=0.0,
                                        openclaw_state_dir="off", **settings))


def stopped(service: otrace.Service) -> None:
    service.events.submit(None)
    service.writer.join(10)
    service.server.release()
    service.db.close()


def one_call(trace_id: str) -> otrace.Unit:
    return otrace.Unit([otrace.event_row(otrace.TRACES, otrace.trace_row, {
        "provider": "p", "model": "m", "trace_id": trace_id}, "http")])


def damage_page(path: Path, number: int) -> None:
    """Overwrite page `number` of the database file at `path`."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        [(page,)] = conn.execute("PRAGMA page_size").fetchall()
    with open(path, "r+b") as f:
        f.seek((number - 1) * page)
        f.write(b"\xff" * page)


def test_damage_a_push_marking_its_rows_meets_is_left_and_its_rows_go_once_more(
        tmp_path: Path, receiver: Receiver) -> None:
    """A job is a write too: the push's mark meets damage (an index it updates), the file is set aside
    and the batch goes once more, from the new file, where it is marked."""
    path = tmp_path / "otrace.db"
    made = seed(path, [("trace", 20, 0)], age_days=0.01)["trace/0"]
    service = service_at(path, push_endpoint=receiver.url)
    damage(path, "llm_traces_pushed")
    service.writer.start()
    try:
        wait_until(lambda: service.writer.conn, 30, "the writer's connection")
        for _ in range(3):
            with contextlib.suppress(Exception):         # the first cycle's mark fails: it says so
                service.pusher.push(None)
            wait_until(lambda: not service.db.replaced_pending, 30, "the writer in a new file")
        assert list(tmp_path.glob("otrace.db.damaged-*[0-9]"))
        sent = [e["trace_id"] for r in receiver.requests if r["answered"] == 200 for e in r["json"]["events"]]
        said = [t for (t,) in service.db.query("SELECT trace_id FROM error_events")]    # the move's event
        assert len(said) == 1 and collections.Counter(sent) == collections.Counter(made * 2 + said)
        assert service.db.query("SELECT count(*) FROM llm_traces WHERE synced = 0") == [(0,)]
    finally:
        stopped(service)


def test_damage_keeps_only_the_rows_it_holds_and_refused_rows_without_their_refusal_go_again(
        tmp_path: Path) -> None:
    """The salvage reads a damaged table by ranges of ids, halved around the damage: a damaged page of
    rows pushed long ago keeps none of the unpushed rows back. A refused row whose refusal could not
    be carried (push_rejects damaged) is sent again, not kept refused with nothing to report."""
    path = tmp_path / "otrace.db"
    made = seed(path, [("trace", 400, 1), ("trace", 10, 2), ("trace", 30, 0)], age_days=0.01)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("INSERT INTO push_rejects (table_name, row_id, trace_id, rejected_at, http_status, "
                     "reason) SELECT 'llm_traces', id, trace_id, 1, 400, 'x' FROM llm_traces "
                     "WHERE synced = 2")
        conn.commit()
        conn.execute("VACUUM")
    leaf = path.read_bytes().find(made["trace/1"][200].encode()) // 4096 + 1
    service = service_at(path)
    try:
        damage(path, "llm_traces_created")                        # what the next insert meets
        damage(path, "push_rejects")
        damage_page(path, leaf)                                   # rows pushed long ago
        assert service.events.offer(one_call("after"))
        service.writer.start()
        assert service.events.wait_drained(60)
        wait_until(lambda: not service.db.replaced_pending, 30, "the writer in a new file")
        with contextlib.closing(sqlite3.connect(path)) as conn:
            flags = dict(conn.execute("SELECT trace_id, synced FROM llm_traces"))
        assert flags == dict.fromkeys((*made["trace/2"], *made["trace/0"], "after"), 0)
    finally:
        stopped(service)


@contextlib.contextmanager
def a_damaged_file_moved_on_a_full_disk(tmp_path: Path, room: int) -> Iterator[tuple[otrace.Service, Path]]:
    """A damaged database (7 MB, 6 of them unpushed rows) on a tmpfs with `room` bytes left, and a batch
    that meets the damage: yields (service, vol) once the move to a new file fails for the full disk.
    Then the disk is given room: the move is made, nothing dropped, every unpushed row carried and the
    batch written."""
    with tmpfs(tmp_path / "vol", "32m") as vol:
        path = vol / "otrace.db"
        made = seed(path, [("trace", 100, 1), ("trace", 1500, 0)], age_days=0.01)
        service = service_at(path, disk_reserve_bytes=0)
        try:
            damage(path, "llm_traces_created")                       # what the next insert meets
            filler = fill(vol)
            os.truncate(filler, filler.stat().st_size - room)
            assert service.events.offer(one_call("after"))
            service.writer.start()
            wait_until(lambda: "SQLITE_FULL" in (service.writer.reopen_fault.error or ""), 60,
                       "the move failing for the full disk")
            yield service, vol
            filler.unlink()
            assert service.events.wait_drained(60)
            assert service.counters.snapshot()["dropped"] == 0
            wait_until(lambda: not service.db.replaced_pending, 60, "the writer in a new file")
            with contextlib.closing(sqlite3.connect(path)) as conn:
                unsynced = {t for (t,) in conn.execute("SELECT trace_id FROM llm_traces WHERE synced = 0")}
            assert unsynced == {*made["trace/0"], "after"}
            wait_until(lambda: service.writer.reopen_fault.error is None and not service.writer.failing, 30,
                       "the write fault cleared")
        finally:
            stopped(service)


@needs_root
def test_a_salvage_that_meets_a_full_disk_is_retried_and_loses_no_row(tmp_path: Path) -> None:
    """The disk has room for the carry file's tables but not for the rows the salvage copies into it.
    A full disk is not damage: the move fails whole (said in /health), the damaged file keeps every
    row, and once the disk has room the move is made again."""
    with a_damaged_file_moved_on_a_full_disk(tmp_path, 2 << 20) as (service, vol):
        assert service.db.replaced_pending and list(vol.glob("otrace.db.damaged-*[0-9]"))
        carry = otrace.sqlite_uri(service.db.carry_path, "ro")
        with contextlib.closing(sqlite3.connect(carry, uri=True)) as conn:
            assert conn.execute("SELECT count(*) FROM llm_traces").fetchone() == (0,)   # tables, no row


@needs_root
def test_a_move_with_room_for_the_carry_alone_writes_in_the_carry_file_and_drops_no_row(
        tmp_path: Path) -> None:
    """The disk has room for the carry, not for a new file at the path. The writer goes on in the
    carry file: never in the old file beside a copy of its rows, which a retry would copy again (rows
    deleted meanwhile back, the ledger's counts stale). It drops nothing, and once the disk has room
    the new file is made."""
    with a_damaged_file_moved_on_a_full_disk(tmp_path, 8 << 20) as (service, _):
        assert service.db.replaced_pending and service.writer.conn_path == service.db.carry_path


def test_damage_on_the_newest_page_keeps_back_no_unpushed_row_of_the_pages_before(tmp_path: Path) -> None:
    """The highest id of a table whose newest page is damaged comes from one of its indexes."""
    path = tmp_path / "otrace.db"
    made = seed(path, [("trace", 30, 0), ("trace", 400, 1)], age_days=0.01)
    leaf = path.read_bytes().find(made["trace/1"][-1].encode()) // 4096 + 1
    service = service_at(path)
    try:
        damage(path, "llm_traces_created")                       # what the next insert meets
        damage_page(path, leaf)                                  # the newest page: pushed rows only
        assert service.events.offer(one_call("after"))
        service.writer.start()
        assert service.events.wait_drained(60)
        wait_until(lambda: not service.db.replaced_pending, 30, "the writer in a new file")
        with contextlib.closing(sqlite3.connect(path)) as conn:
            unsynced = {t for (t,) in conn.execute("SELECT trace_id FROM llm_traces WHERE synced = 0")}
        assert unsynced == {*made["trace/0"], "after"}
        for aside in tmp_path.glob("otrace.db.damaged-*"):       # a hand deletes it; its inode may be
            aside.unlink()                                       # the next file's: a good one restored
        otrace.open_database(str(backup := tmp_path / "restored.db"))
        backup.rename(path)
        assert service.events.offer(one_call("after the restore"))
        assert service.events.wait_drained(60)
        wait_until(lambda: not service.db.replaced_pending, 30, "the restored file taken")
        wait_until(lambda: service.writer.reopen_fault.error is None and not service.writer.failing, 30,
                   "the write fault cleared")
    finally:
        stopped(service)


@pytest.mark.parametrize("how", ["removed too", "header"])
def test_damage_is_left_whether_the_file_was_removed_too_or_the_writer_cannot_open_it(
        tmp_path: Path, how: str) -> None:
    """Damage on a file also rm'd: nothing to rename, the batch still goes to a new file. Damage in the
    header (SQLITE_NOTADB) that the writer's own connection meets: set aside, and a new file made."""
    path = tmp_path / "otrace.db"
    seed(path, [("trace", 50, 0)], age_days=0.01)
    service = service_at(path)
    try:
        if how == "header":
            damage_page(path, 1)
        else:
            service.writer.start()
            wait_until(lambda: service.writer.conn, 30, "the writer's connection")
            damage(path, "llm_traces")
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        assert service.events.offer(one_call("after"))
        if how == "header":
            service.writer.start()
        assert service.events.wait_drained(60)
        wait_until(lambda: not service.db.replaced_pending, 30, "the writer in a new file")
        wait_until(lambda: not service.writer.failing, 30, "the write fault cleared")
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("SELECT trace_id FROM llm_traces").fetchall() == [("after",)]
    finally:
        stopped(service)


def test_a_push_retrying_a_silent_receiver_lets_a_move_to_a_new_file_go_after_its_attempt(
        tmp_path: Path, receiver: Receiver) -> None:
    """A move waits for readers to leave the old file, and a push cycle reads it while it sends: one
    retrying a receiver that does not answer gives up its retries once a move waits (a damaged file
    takes no rows meanwhile), and its rows go from the new file."""
    path = tmp_path / "otrace.db"
    made = seed(path, [("metric", 20, 0)], age_days=0.01)["metric/0"]
    damage(path, "log_offsets")                          # no push reads it; the tailer's next commit does
    receiver.default = hang(60)
    service = service_at(path, push_endpoint=receiver.url, push_timeout=1.0, push_retries=5,
                         push_backoff_base=0.01, push_backoff_cap=0.05)
    service.writer.start()
    cycle = threading.Thread(target=service.pusher.push, args=(None,), daemon=True)
    try:
        wait_until(lambda: service.writer.conn, 30, "the writer's connection")
        cycle.start()
        wait_until(lambda: receiver.requests, 30, "the push's first attempt")
        offset = (otrace.OFFSET_SQL, (1, 2, "f", "/log", 10, 0))
        assert service.events.offer(otrace.Unit([], (offset,), own=True))
        wait_until(lambda: list(tmp_path.glob("otrace.db.damaged-*[0-9]"))
                   and not service.db.replaced_pending, 60, "the writer in a new file")
        assert len(receiver.requests) <= 2     # the attempt under way, and one begun as the move came
        cycle.join(60)
        # the offsets' retry in the new file ends the outage, whose error event goes with the rows, as
        # does the move's
        wait_until(lambda: service.writer.fault.error is None and not service.writer.outages, 60,
                   "the outage recorded")
        outage = [t for (t,) in service.db.query("SELECT trace_id FROM error_events")]
        receiver.default = 200
        service.pusher.push(None)
        sent = [e["trace_id"] for r in receiver.requests if r["answered"] == 200 for e in r["json"]["events"]]
        assert len(outage) == 2 and sorted(sent) == sorted(made + outage)
    finally:
        stopped(service)


def test_a_damaged_file_that_cannot_be_renamed_leaves_rows_in_the_carry_file_until_it_is_moved(
        tmp_path: Path) -> None:
    """A database file that is a mount of its own (`docker run -v host.db:/data/otrace.db`) cannot be
    renamed (EBUSY): the writer lives on, writes to the carry file, ingest is refused and /health says
    why, until the file is moved away (here: unmounted); then the rows go to a new file at the path."""
    host = tmp_path / "host.db"
    seed(host, [("trace", 50, 0)], age_days=0.01)
    path = tmp_path / "data" / "otrace.db"
    path.parent.mkdir()
    path.touch()
    subprocess.run(["mount", "--bind", str(host), str(path)], check=True)
    mounted = True
    service = service_at(path)
    try:
        damage(path, "llm_traces")
        assert service.events.offer(one_call("after"))
        service.writer.start()
        assert service.events.wait_drained(60)                   # committed to the carry file
        wait_until(lambda: service.writer.reopen_fault.error, 30, "the move refused")
        assert "is damaged and could not be set aside" in service.writer.reopen_fault.error
        assert service.writer.is_alive() and service.writer.failing
        assert any("database file is damaged" in problem for problem in service.health()["problems"])
        wait_until(lambda: subprocess.run(["umount", str(path)], check=False).returncode == 0, 30,
                   "the mount released")               # the writer looks at the file once a second
        mounted = False
        wait_until(lambda: not service.db.replaced_pending, 30, "the writer in a new file")
        wait_until(lambda: not service.writer.failing, 30, "the write fault cleared")
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("SELECT trace_id FROM llm_traces").fetchall() == [("after",)]
    finally:
        stopped(service)                                         # its files closed: nothing holds the mount
        if mounted:
            subprocess.run(["umount", "--lazy", str(path)], check=False)


def waits_in(thread: threading.Thread, function: str) -> bool:
    """`thread` is inside `function` now (blocked there, as far as the caller waits for it)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None and frame.f_code.co_name != function:
        frame = frame.f_back
    return frame is not None


def test_a_push_that_waited_out_a_move_marks_the_rows_it_read_from_the_new_file(
        tmp_path: Path, receiver: Receiver) -> None:
    """A push cycle that begins while the writer moves to a new database file waits to read until the
    move is done, and reads the new file: its 2xx marks those rows (they are not sent again)."""
    path = tmp_path / "otrace.db"
    made = seed(path, [("trace", 100, 0)], age_days=0.01)["trace/0"]
    service = service_at(path, push_endpoint=receiver.url)
    service.writer.start()
    try:
        wait_until(lambda: service.writer.conn, 30, "the writer's connection")
        assert service.db.pause_readers()                     # the writer has begun a move
        pushing = threading.Thread(target=service.pusher.push, args=(None,))
        pushing.start()
        wait_until(lambda: waits_in(pushing, "_admit"), 30, "the push waiting to read")
        path.unlink()                                        # what the writer moves for
        assert service.events.offer(one_call("after"))   # it looks after a write
        pushing.join(60)
        assert not pushing.is_alive()
        assert service.writer.conn_path == str(path)
        sent = [e["trace_id"] for r in receiver.requests if r["answered"] == 200 for e in r["json"]["events"]]
        assert len(sent) == len(set(sent)) and set(made) <= set(sent)    # "after" too, if written in time
        unsynced = {t for (t,) in service.db.query("SELECT trace_id FROM llm_traces WHERE synced = 0")}
        assert unsynced == {"after"} - set(sent)
    finally:
        stopped(service)


def carried(path: Path, new: Path) -> None:
    """What the writer does when the file at the path was replaced: carry what it owes to a new file."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("ATTACH DATABASE ? AS carry", (str(new),))
        otrace.open_database(str(new))
        otrace.carry_over(conn, "main", "carry")
        conn.execute("DETACH DATABASE carry")


def test_refusals_not_yet_reported_go_to_a_new_file_and_are_marked_by_trace_id_there(tmp_path: Path) -> None:
    """A new database file numbers the carried rows anew: a refusal not yet reported goes with its row
    (it was left behind: the row stayed refused, never reported), and a refusal recorded, or
    reported, after the move finds its row by trace_id (by the old id it named another row)."""
    path, new = tmp_path / "otrace.db", tmp_path / "new.db"
    made = seed(path, [("trace", 50, 1), ("trace", 100, 0)], age_days=0.01)["trace/0"]   # ids 51-150
    refusal = otrace.Attempt("b", otrace.now_ms(), 1, 0, status=400, error="bad")
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        otrace.record_refused([("llm_traces", 121, made[70], refusal)], conn)
    carried(path, new)                                             # ids 51-150 -> 1-100 there
    with contextlib.closing(sqlite3.connect(new, isolation_level=None)) as conn:
        otrace.record_refused([("llm_traces", 71, made[20], refusal)], conn)   # read before the move
        losses = otrace.unreported_losses(conn, ("llm_traces",))
        assert sorted(loss["trace_id"] for loss in losses) == sorted([made[70], made[20]])
        report_losses(conn, losses)
        flags = dict(conn.execute("SELECT trace_id, synced FROM llm_traces WHERE synced <> 0"))
        assert flags == {made[70]: otrace.REFUSED_REPORTED, made[20]: otrace.REFUSED_REPORTED}
    carried(path, tmp_path / "again.db")                          # carried twice (a crash in between)
    carried(path, tmp_path / "again.db")
    with contextlib.closing(sqlite3.connect(tmp_path / "again.db")) as conn:
        assert conn.execute("SELECT count(*) FROM push_rejects").fetchone() == (1,)


# ------------------------------------------------------------------------------------------- upkeep


def seed(db: Path, groups: list[tuple[str, int, int]], text: int = 2000, age_days: float = 10
         ) -> dict[str, list[str]]:
    """Write rows straight into a fresh otrace database, oldest first and a millisecond apart, as if
    they arrived `age_days` ago: (kind, count, synced) groups, kind "trace" or "metric". Returns the
    trace_ids of each group, keyed "kind/synced"."""
    otrace.open_database(str(db))
    made: dict[str, list[str]] = {}
    received = otrace.now_ms() - int(age_days * 86_400_000)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for kind, count, synced_flag in groups:
            ids = made.setdefault(f"{kind}/{synced_flag}", [])
            for _ in range(count):
                received += 1
                trace_id = str(uuid.uuid4())
                if kind == "trace":
                    rows, _ = otrace.parse_events(json.dumps(trace(trace_id=trace_id, input_text="t" * text))
                                                  .encode(), "/v1/traces", 1, 16384)
                    conn.execute(otrace.insert_sql("llm_traces"), rows[0].values)
                    conn.execute("UPDATE llm_traces SET received_at = ?, synced = ? WHERE trace_id = ?",
                                 (received, synced_flag, trace_id))
                else:
                    conn.execute("INSERT INTO system_metrics (trace_id, created_at, received_at, source, "
                                 "cpu_pct, synced) VALUES (?, ?, ?, 'proc', 12.5, ?)",
                                 (trace_id, received, received, synced_flag))
                ids.append(trace_id)
        conn.commit()
        conn.execute("VACUUM")
    return made


@contextlib.contextmanager
def relief_near_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                            ) -> Iterator[tuple[otrace.Service, Path, dict[str, list[str]], Path]]:
    """A service whose database (4.3 MB, all unpushed) is over a 4 MiB cap, its writer running, on a
    tmpfs filled but for a few pages of WAL: (service, database, the rows made, the filler file)."""
    monkeypatch.setattr(otrace, "RELIEF_TIME", 600.0)     # one job to the low mark, on a busy machine too
    with tmpfs(tmp_path / "vol", "16m") as vol:
        path = vol / "otrace.db"
        made = seed(path, [("metric", 5, 0), ("trace", 1000, 0)], age_days=0.01)
        service = service_at(path, db_max_bytes=4 << 20, disk_reserve_bytes=0)
        try:
            service.writer.start()
            wait_until(lambda: service.writer.conn, 30, "the writer's connection")
            filler = fill(vol)
            os.truncate(filler, filler.stat().st_size - (128 << 10))
            yield service, path, made, filler
        finally:
            stopped(service)


def said_failed_after(service: otrace.Service, path: Path, gone: dict[str, int]) -> None:
    """The pass failed on the full disk, and what was deleted before is in the ledger, /health's total
    and the pass's report."""
    said = {table: n for table, n in gone.items() if n}
    assert ledger_of(path) == {(t, TIER_OF[t]): (n, n) for t, n in said.items()}
    health = service.retention.health()
    assert health["last_pass"]["failed"].startswith("SQLITE_FULL")
    assert health["last_pass"]["unpushed_deleted"] == {f"{t}/{TIER_OF[t]}": n for t, n in said.items()}
    assert health["unpushed_deleted_total"] == said


@needs_root
def test_a_relief_job_that_fails_after_a_chunk_says_what_it_deleted_and_the_next_pass_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the cap, one relief job deletes chunk after chunk, each in its own transaction with its
    ledger row. One that commits a chunk and then meets a full disk keeps what it did: those rows are
    gone and are in the ledger, in /health's total and in the pass's report, which says why it
    failed. Once the disk has room, the next pass deletes the rest down to the low mark, every row it
    deletes in the ledger too."""
    with relief_near_a_full_disk(tmp_path, monkeypatch) as (service, path, made, filler):
        retention = service.retention
        with pytest.raises(sqlite3.OperationalError) as raised:     # a chunk or more, then the disk
            retention.tick()
        assert otrace.sqlite_code(raised.value) == "SQLITE_FULL"
        gone = rows_gone(service, made)
        assert gone["llm_traces"] < 1000 and sum(gone.values()) > 0
        said_failed_after(service, path, gone)
        filler.unlink()
        retention.tick()
        health = retention.health()
        assert "failed" not in health["last_pass"] and not health["still_over_budget"]
        assert sum(retention.sizes()) < 0.85 * (4 << 20)
        now_gone = rows_gone(service, made)
        assert now_gone["llm_traces"] > gone["llm_traces"]
        assert ledger_of(path) == {(t, TIER_OF[t]): (n, n) for t, n in now_gone.items() if n}
        assert health["unpushed_deleted_total"] == {t: n for t, n in now_gone.items() if n}
        assert health["last_pass"]["unpushed_deleted"] == {
            f"{t}/{TIER_OF[t]}": n - gone[t] for t, n in now_gone.items() if n - gone[t]}


@needs_root
def test_a_head_start_that_fails_after_a_chunk_is_said_by_the_pass_that_takes_it_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The relief job the writer queues after a batch that took the database past its high mark (the
    head start) deletes a chunk or more, then meets a full disk. The disk has room again by the time
    the pass takes the job over: the pass still counts what the job deleted and says that it failed;
    the pass after it deletes down to the low mark."""
    with relief_near_a_full_disk(tmp_path, monkeypatch) as (service, path, made, filler):
        retention = service.retention
        assert service.events.offer(one_call("after"))
        assert service.events.wait_drained(30)
        wait_until(lambda: retention.begun and retention.begun[0].done(), 60, "the head start to end")
        gone = rows_gone(service, made)
        assert gone["llm_traces"] < 1000 and sum(gone.values()) > 0
        filler.unlink()
        with pytest.raises(sqlite3.OperationalError) as raised:
            retention.tick()
        assert otrace.sqlite_code(raised.value) == "SQLITE_FULL"
        assert rows_gone(service, made) == gone                 # the failing pass deleted no more
        said_failed_after(service, path, gone)
        retention.tick()
        assert "failed" not in retention.health()["last_pass"] and sum(retention.sizes()) < 0.85 * (4 << 20)
        assert ledger_of(path) == {(t, TIER_OF[t]): (n, n)
                                   for t, n in rows_gone(service, made).items() if n}


TIER_OF = {"system_metrics": "pressure_metrics", "llm_traces": "pressure_unpushed"}   # for unpushed rows


def rows_gone(service: otrace.Service, made: dict[str, list[str]]) -> dict[str, int]:
    """How many of the rows `seed` made are no longer there, by table."""
    return {table: len(set(made[group]) - {t for (t,) in service.db.query(f"SELECT trace_id FROM {table}")})
            for table, group in (("system_metrics", "metric/0"), ("llm_traces", "trace/0"))}


def ledger_of(path: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """retention_ledger at `path`, summed by table and reason: (deleted, unpushed deleted)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT table_name, reason, sum(deleted), sum(unsynced_deleted) FROM "
                            "retention_ledger GROUP BY table_name, reason").fetchall()
    return {(table, reason): (deleted, lost) for table, reason, deleted, lost in rows}


def db_bytes(db: Path) -> int:
    """The database's size on disk: file plus WAL."""
    files = (Path(f"{db}{suffix}") for suffix in ("", "-wal"))
    return sum(f.stat().st_size for f in files if f.exists())


def hours_past(node: Otrace) -> bool:
    """Date the retention ledger's rows two hours back, as if their hours had long ended: a row is
    aged from the end of its hour, so with a short TRACE_RETENTION the next pass prunes it (a reported
    one). True, for wait_until."""
    with contextlib.closing(sqlite3.connect(node.db_path, timeout=30)) as conn, conn:
        conn.execute("UPDATE retention_ledger SET at = min(at, ?)", (otrace.now_ms() - 2 * otrace.HOUR_MS,))
    return True


def ledger(node: Otrace) -> dict[tuple[str, str], tuple[int, int]]:
    rows = node.query("SELECT table_name, reason, sum(deleted), sum(unsynced_deleted) FROM retention_ledger "
                      "GROUP BY table_name, reason")
    return {(table, reason): (deleted, lost) for table, reason, deleted, lost in rows}


def present(node: Otrace, table: str) -> set[str]:
    return {t for (t,) in node.query(f"SELECT trace_id FROM {table}")}


def test_wal_past_its_limit_is_truncated(run: Callable[..., Otrace]) -> None:
    node = run({"TRACE_WAL_MAX_BYTES": "256KiB", "TRACE_CHECKPOINT_INTERVAL": "200ms"})
    node.wait_log(lambda e: e.get("message") == "wal checkpoint" and e["mode"] == "passive")
    reader = sqlite3.connect(node.db_path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM llm_traces").fetchone()    # holds a snapshot: no checkpoint
    try:                                                                # can get past it, the WAL grows
        for _ in range(10):
            assert node.post("/v1/traces", [trace(input_text="w" * 4000) for _ in range(20)]).status == 202
        node.wait_persisted(200)
        wal = Path(f"{node.db_path}-wal")
        assert wal.stat().st_size > 256 * 1024
    finally:
        reader.execute("COMMIT")
        reader.close()
    done = node.wait_log(lambda e: e.get("message") == "wal checkpoint" and e["mode"] == "truncate"
                         and e["wal_bytes_after"] == 0)
    assert done["wal_bytes_before"] > 256 * 1024 and done["busy"] == 0
    assert len(node.rows("llm_traces")) == 200
    assert node.query("PRAGMA integrity_check") == [("ok",)]


def test_a_wal_a_reader_holds_past_the_cap_is_a_problem_in_health(run: Callable[..., Otrace]) -> None:
    """SQLite cannot start a WAL over under a reader's snapshot, so the cap cannot hold meanwhile:
    /health says so, and why, until the reader lets go."""
    node = run({"TRACE_DB_MAX_BYTES": "1MiB", "TRACE_WAL_MAX_BYTES": "256KiB",
                "TRACE_CHECKPOINT_INTERVAL": "200ms", "TRACE_CLEANUP_INTERVAL": "200ms"})
    reader = sqlite3.connect(node.db_path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM llm_traces").fetchone()
    try:
        for _ in range(100):
            if (health := node.health())["db_size_bytes"] + health["wal_size_bytes"] > 1 << 20:
                break
            assert node.post("/v1/traces", [trace(input_text="w" * 4000) for _ in range(20)]).status == 202
            node.wait_persisted(health["events_received"] + 20)
        report = node.request("GET", "/health")
        assert report.status == 503 and report.json["status"] == "degraded"
        [problem] = report.json["problems"]
        assert problem.startswith("database over TRACE_DB_MAX_BYTES") and "a reader holding" in problem
    finally:
        reader.execute("COMMIT")
        reader.close()
    wait_until(lambda: node.health()["problems"] == [], timeout=60, what="the WAL started over")


def test_a_reader_holding_the_wal_costs_no_rows_beyond_what_the_file_needs(
        run: Callable[..., Otrace]) -> None:
    """A reader's snapshot (an `otrace report`, a sqlite3 shell) keeps the WAL from starting over: it
    grows with every write, and deleting rows only grows it more. Retention counts the file as it will
    be once the WAL is copied in, so the rows stay under the mark they were held under before the
    reader (they went down to half the cap and under, the WAL's room rising to a quarter of it), and
    the file stays under the cap once the reader lets go."""
    cap = 8 << 20
    node = run({"TRACE_DB_MAX_BYTES": str(cap)})
    posted, deadline = 0, time.monotonic() + 120

    def post() -> None:
        nonlocal posted
        assert time.monotonic() < deadline, "the database never reached its mark, or the WAL never grew"
        if node.post("/v1/traces", [trace(input_text="x" * 2000) for _ in range(20)]).status == 202:
            posted += 20

    while not ledger(node):                                   # past the high mark once: rows deleted
        post()
    node.wait_persisted(posted, timeout=60)
    # a pass under pressure has ended: the marks learned from the fill's flood (awaiting one more pass
    # by the count of passes raced the pass that ended before the count was read)
    node.wait_log(lambda e: e.get("message") == "retention deleted rows that were never pushed", timeout=60)
    before = node.health()["retention"]
    low = before["db_high_mark"] - (otrace.Marks.HIGH - otrace.Marks.LOW)
    reader = sqlite3.connect(node.db_path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM llm_traces").fetchone()      # a snapshot the WAL must keep
        while node.health()["wal_size_bytes"] < cap:
            post()
        node.wait_persisted(posted, timeout=60)
        with contextlib.closing(sqlite3.connect(node.db_path)) as look:
            kept = otrace.live_bytes(look) / cap
        during = node.health()["retention"]
    finally:
        reader.execute("COMMIT")
        reader.close()
    assert kept >= low - before["db_wal_room"] - 0.1, (kept, before)      # a batch or two of slack
    assert during["db_wal_room"] <= max(before["db_wal_room"], 0.1)        # no room kept for its WAL
    while (settled := node.health())["wal_size_bytes"] >= cap / 4:      # the agent goes on: SQLite
        post()                                                          # starts the WAL over
    assert settled["db_size_bytes"] <= cap


def test_age_retention_deletes_pushed_rows_only(tmp_path: Path, run: Callable[..., Otrace],
                                                receiver: Receiver) -> None:
    db = tmp_path / "aged.db"
    old = seed(db, [("trace", 20, 0)])["trace/0"]
    offline = run({"TRACE_CLEANUP_INTERVAL": "200ms", "TRACE_RETENTION": "1h"}, db=db)
    wait_until(lambda: offline.health()["retention"]["last_pass"], what="a retention pass")
    assert present(offline, "llm_traces") == set(old)       # ten days old, but never pushed: kept
    assert offline.stop() == 0
    node = run(push_env(receiver, TRACE_CLEANUP_INTERVAL="200ms", TRACE_RETENTION="1h"), db=db)
    fresh = post_some(node, 3)
    wait_until(lambda: not present(node, "llm_traces") & set(old), what="old rows deleted once pushed")
    assert set(receiver.trace_ids()) >= set(old)
    wait_synced(node, fresh)                                 # pushed, but young: kept
    assert ledger(node)[("llm_traces", "age")] == (20, 0)


def test_database_cap_deletes_in_order_and_reports_the_losses(
        tmp_path: Path, run: Callable[..., Otrace], receiver: Receiver) -> None:
    db = tmp_path / "capped.db"
    made = seed(db, [("trace", 150, 0), ("metric", 100, 0), ("trace", 150, 1)], age_days=0.01, text=6000)
    cap = int(db_bytes(db) * 0.6)      # the unpushed traces are the oldest: the order is by tier first
    assert cap >= 1 << 20                                  # TRACE_DB_MAX_BYTES' least
    receiver.default = 503
    node = run(push_env(receiver, TRACE_DB_MAX_BYTES=str(cap), TRACE_CLEANUP_INTERVAL="300ms",
                        TRACE_PUSH_RETRIES="1", TRACE_PUSH_BREAKER_THRESHOLD="1000"), db=db)  # no cool-down
    node.wait_log(lambda e: e.get("message") == "retention deleted rows that were never pushed")
    assert db_bytes(db) <= cap * otrace.Marks.LOW
    assert present(node, "llm_traces") & set(made["trace/1"]) == {made["trace/1"][-1]}   # 1. pushed rows
    assert present(node, "system_metrics") == {made["metric/0"][-1]}     # 2. unpushed metrics (all but
                                                                          # a table's newest: its id stays)
    kept = present(node, "llm_traces")                                    # 3. unpushed traces, oldest first
    lost = [t for t in made["trace/0"] if t not in kept]
    assert 0 < len(lost) < 150 and lost == made["trace/0"][:len(lost)]
    assert ledger(node) == {("llm_traces", "pressure_pushed"): (149, 0),
                            ("system_metrics", "pressure_metrics"): (99, 99),
                            ("llm_traces", "pressure_unpushed"): (len(lost), len(lost))}
    assert node.health()["retention"]["unpushed_deleted_total"] == {"system_metrics": 99,
                                                                   "llm_traces": len(lost)}
    receiver.default = 200                                  # the receiver comes back: it is told
    wait_until(lambda: node.query("SELECT count(*) FROM retention_ledger WHERE unsynced_deleted > 0 "
                                  "AND reported_at IS NULL") == [(0,)], what="losses marked reported")
    # (the rows kept may be gone again by now: once pushed, they are the first to go under pressure)
    losses = [loss for r in receiver.requests if r["answered"] == 200 for loss in r["json"].get("losses", [])]
    assert sorted((x["table"], x["reason"], x["rows"]) for x in losses) == [
        ("llm_traces", "pressure_unpushed", len(lost)), ("system_metrics", "pressure_metrics", 99)]
    assert all(x["oldest_received_at"] <= x["newest_received_at"] for x in losses)


def test_an_event_retention_deletes_on_its_way_is_delivered_or_reported_lost_never_both(
        run: Callable[..., Otrace], receiver: Receiver) -> None:
    """The receiver is slow with the first batch while a flood takes the database past its cap, and
    retention deletes the oldest unpushed rows: the batch's. Every accepted event ends up either at the
    receiver or in a loss report it was sent, and none in both."""
    on_wire, flooded = threading.Event(), threading.Event()
    receiver.script = [held(on_wire, flooded)]
    # 2 MiB: the first 100 traces (a page each) and the room the WAL they wrote keeps under the cap
    # (Marks.wal) stay under the high mark, so the batch held is all of them
    node = run(push_env(receiver, TRACE_DB_MAX_BYTES="2MiB", TRACE_PUSH_INTERVAL="300ms",
                        TRACE_CLEANUP_INTERVAL="300ms"))
    first = node.post("/v1/traces", [trace(input_text="f" * 2000) for _ in range(100)]).json["trace_ids"]
    accepted = set(first)
    assert on_wire.wait(30)
    deadline = time.monotonic() + 60

    def lost_so_far() -> int:          # the held batch's deleted rows count here until its 2xx
        return node.query("SELECT coalesce(sum(unsynced_deleted), 0) FROM retention_ledger "
                          "WHERE table_name = 'llm_traces'")[0][0]

    # until retention took the batch's rows, and a row of the flood too (off the wire: truly lost)
    while present(node, "llm_traces") & set(first) or lost_so_far() <= len(first):
        assert time.monotonic() < deadline, "retention never reached the rows on their way"
        answer = node.post("/v1/traces", [trace(input_text="x" * 2000) for _ in range(20)])
        accepted |= set(answer.json["trace_ids"]) if answer.status == 202 else set()
    flooded.set()
    node.wait_persisted(len(accepted), timeout=60)       # none still queued as the last look is taken

    def settled() -> bool:
        return node.query("SELECT (SELECT count(*) FROM llm_traces WHERE synced = 0) + (SELECT count(*) FROM "
                          "retention_ledger WHERE unsynced_deleted > 0 AND reported_at IS NULL)") == [(0,)]

    wait_until(settled, timeout=60, what="every row pushed or reported lost")
    answered = [r["json"] for r in receiver.requests if r["answered"] == 200]
    delivered = {e["trace_id"] for doc in answered for e in doc["events"]}
    told_lost = sum(x["rows"] for doc in answered for x in doc.get("losses", [])
                    if x["table"] == "llm_traces")
    assert delivered <= accepted and set(first) <= delivered
    assert told_lost == len(accepted - delivered) > 0
    # a count that never goes down: the rows the receiver took after all stay counted as deleted unpushed
    assert node.health()["retention"]["unpushed_deleted_total"]["llm_traces"] >= told_lost + len(first)


def test_the_ledger_keeps_a_row_or_two_an_hour_however_many_passes_and_reports(
        run: Callable[..., Otrace], receiver: Receiver) -> None:
    """Under a small cap a pass runs every few seconds and a push may report losses at every cycle:
    the ledger files deletions by hour, and adds each report to the hour's first reported row, so
    it does not grow into the cap it keeps (a row each pass and report once took most of a 1 MiB cap
    and every new event with it). The counts still add up to every row deleted and reported."""
    receiver.default = 503
    node = run(push_env(receiver, TRACE_DB_MAX_BYTES="1MiB", TRACE_CLEANUP_INTERVAL="100ms",
                        TRACE_PUSH_RETRIES="1", TRACE_PUSH_BREAKER_THRESHOLD="1000"))
    accepted: set[str] = set()
    for _ in range(2):                       # two stretches of a receiver down, each then reported
        receiver.default = 503
        lost_before = lost_so_far(node)
        while lost_so_far(node) < lost_before + 100:                   # passes with losses
            answer = node.post("/v1/traces", [trace(input_text="x" * 2000) for _ in range(20)])
            accepted |= set(answer.json["trace_ids"]) if answer.status == 202 else set()
        node.wait_persisted(len(accepted), timeout=60)    # none still queued as the last look is taken
        receiver.default = 200
        wait_until(lambda: node.query("SELECT count(*) FROM llm_traces WHERE synced = 0") == [(0,)] and
                   node.query("SELECT count(*) FROM retention_ledger WHERE reported_at IS NULL AND "
                              "unsynced_deleted > 0") == [(0,)], timeout=60, what="all pushed or reported")
    rows = node.query("SELECT count(DISTINCT at / 3600000), count(*), sum(unsynced_deleted) "
                      "FROM retention_ledger WHERE table_name = 'llm_traces'")[0]
    hours, count, lost = rows
    assert count <= 3 * hours                # pushed rows deleted, lost ones reported, one left over
    answered = [r["json"] for r in receiver.requests if r["answered"] == 200]
    delivered = {e["trace_id"] for doc in answered for e in doc["events"]}
    told = [x for doc in answered for x in doc.get("losses", [])]
    assert len({x["ledger_id"] for x in told}) == len(told)            # each report an id of its own
    assert lost == sum(x["rows"] for x in told) == len(accepted - delivered) > 0
    for message in ("retention deleted rows that were never pushed", "over budget: deleting oldest rows"):
        said = [datetime.fromisoformat(line["time"]) for line in node.lines if line.get("message") == message]
        assert said and all((b - a).total_seconds() >= 59 for a, b in itertools.pairwise(said)), message


def test_the_count_of_unpushed_rows_deleted_never_goes_down(run: Callable[..., Otrace],
                                                            receiver: Receiver) -> None:
    """/health's and /metrics' count of the rows retention deleted unpushed is a counter: it stays once
    push has reported the loss and the ledger rows behind the report are gone with age, and across a
    restart (a Prometheus counter that went down would read as a reset, and its increase as a flood)."""
    receiver.default = 503
    env = push_env(receiver, TRACE_DB_MAX_BYTES="1MiB", TRACE_CLEANUP_INTERVAL="100ms", TRACE_RETENTION="1s",
                   TRACE_PUSH_INTERVAL="200ms", TRACE_PUSH_RETRIES="1", TRACE_PUSH_BREAKER_THRESHOLD="1000")
    node = run(env)
    while lost_so_far(node) < 100:
        node.post("/v1/traces", [trace(input_text="x" * 2000) for _ in range(20)])
    receiver.default = 200
    ledger = "SELECT count(*) FROM retention_ledger WHERE unsynced_deleted > 0"
    wait_until(lambda: hours_past(node) and node.query(ledger)[0][0] == 0, timeout=60,
               what="the losses reported, and their ledger rows gone with age")
    counted = lost_so_far(node)
    assert counted >= 100
    assert f'\notrace_retention_unpushed_deleted_total{{table="llm_traces"}} {counted}\n' in node.request(
        "GET", "/metrics").body.decode()
    assert node.stop() == 0
    assert lost_so_far(run(env)) == counted


def test_the_count_of_unpushed_rows_deleted_begins_from_the_ledger_on_an_older_database(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A database an otrace that kept no count last wrote (schema 12: its ledger counted the losses, no
    otrace_state key did): the count begins from the ledger's rows, once, not from 0."""
    db = tmp_path / "older.db"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:    # as the older otrace left it
        for step in otrace.SCHEMA[:12]:
            conn.executescript(step)
        conn.execute("PRAGMA user_version = 12")
        conn.executemany("INSERT INTO retention_ledger (pass_id, at, table_name, reason, deleted, "
                         "unsynced_deleted) VALUES (?, 1, ?, 'pressure_unpushed', ?, ?)",
                         [("p1", "llm_traces", 40, 30), ("p2", "llm_traces", 12, 12),
                          ("p2", "system_metrics", 9, 5), ("p3", "error_events", 7, 0)])
    node = run(db=db)
    assert node.health()["retention"]["unpushed_deleted_total"] == {"llm_traces": 42, "system_metrics": 5}
    assert node.stop() == 0
    again = run(db=db)
    assert again.health()["retention"]["unpushed_deleted_total"] == {"llm_traces": 42, "system_metrics": 5}


def lost_so_far(node: Otrace) -> int:
    """The rows retention deleted before they were pushed, as /health counts them."""
    return sum((node.health()["retention"]["unpushed_deleted_total"] or {}).values())


def confirm(conn: sqlite3.Connection, batch: otrace.Batch, merges: otrace.Merges, read_at: int) -> int:
    """What push does once the receiver answered 2xx to `batch`, read when `read_at` was taken."""
    return otrace.record_pushed(batch, otrace.Attempt(batch.batch_id, otrace.now_ms(), 0, 0, status=200),
                                merges, read_at, conn)


def report_losses(conn: sqlite3.Connection, losses: list[dict[str, Any]]) -> None:
    """What push does once the receiver answered 2xx to a batch carrying `losses`."""
    merges = otrace.Merges()
    confirm(conn, otrace.Batch(losses=losses), merges, merges.read_begins())


@pytest.mark.parametrize("chunk_between", ["the report and its 2xx", "two reports"])
def test_every_row_a_pass_deletes_is_reported_when_push_reports_during_the_pass(
        tmp_path: Path, chunk_between: str) -> None:
    """A pass's chunks add to one ledger row; a push may read it between two chunks, and mark it
    reported on its 2xx after more were added. What came after the read is reported next, once."""
    db = tmp_path / "otrace.db"
    made = seed(db, [("trace", 200, 0)], age_days=0.01)["trace/0"]
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        received = dict(conn.execute("SELECT trace_id, received_at FROM llm_traces"))
        cut = otrace.Cut(("llm_traces",), otrace.UNDELIVERED, "pressure_unpushed", "pass-1", limit=50)
        told: list[dict[str, Any]] = []
        assert cut(conn).lost == 50
        losses = otrace.unreported_losses(conn, ("llm_traces",))
        if chunk_between == "the report and its 2xx":
            assert cut(conn).lost == 50                  # in flight: the row grows under the report
        report_losses(conn, losses)
        told += losses
        if chunk_between == "two reports":
            assert cut(conn).lost == 50                  # after the report: into a row already reported
        assert cut(conn).lost == 50
        while losses := otrace.unreported_losses(conn, ("llm_traces",)):
            report_losses(conn, losses)
            told += losses
        assert sum(loss["rows"] for loss in told) == 150
        assert len({loss["ledger_id"] for loss in told}) == len(told)          # each report once
        gone = sorted(received[t] for t in made[:150])
        assert min(x["oldest_received_at"] for x in told) == gone[0]
        assert max(x["newest_received_at"] for x in told) == gone[-1]
        assert conn.execute("SELECT sum(deleted), sum(unsynced_deleted), count(*) FROM retention_ledger "
                            "WHERE reported_at IS NOT NULL").fetchone() == (150, 150, 1)   # added up


@pytest.mark.parametrize("run_seed", range(12))
def test_no_two_passes_tables_or_reasons_share_a_ledger_row_and_every_loss_is_told_once(
        tmp_path: Path, run_seed: int) -> None:
    """A pass's ledger row is keyed by its hour, then `hour.<id>` once reported. Chunks of three
    kinds (two tables, two reasons of one) and two hours, push cycles that read the report at their
    start and confirm one or two batches (some not at all) while chunks delete rows on their way, and
    the reported rows of the hour pruned (a TRACE_RETENTION under an hour), at random: the ledger
    counts (what /health sums) and the reports add up to the rows deleted unpushed and never
    delivered, table by table, and no ledger row is told twice."""
    rng = random.Random(run_seed)
    db = tmp_path / "o.db"
    otrace.open_database(str(db))
    merges, tables = otrace.Merges(), ("llm_traces", "system_metrics")
    kinds = [("llm_traces", "pressure_unpushed"), ("llm_traces", "pressure_other"),
             ("system_metrics", "pressure_metrics")]
    hour = ["2026-12-04T10"]
    gone: dict[str, set[int]] = {table: set() for table in tables}          # deleted unpushed
    delivered: dict[str, set[int]] = {table: set() for table in tables}
    told: list[dict[str, Any]] = []
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        with otrace.transaction(conn):
            for n in range(1000):
                conn.execute("INSERT INTO llm_traces (trace_id, created_at, received_at, source, status, "
                             "truncated, provider, model) VALUES (?, ?, ?, 'http', 'ok', 0, 'p', 'm')",
                             (f"t{n}", n, n))
                conn.execute("INSERT INTO system_metrics (trace_id, created_at, received_at, source, "
                             "cpu_pct) VALUES (?, ?, ?, 'proc', 1.0)", (f"m{n}", n, n))

        def unpushed(table: str) -> set[int]:
            return {row_id for (row_id,) in conn.execute(f"SELECT id FROM {table} WHERE synced = 0")}

        def chunk() -> None:
            if rng.random() < 0.05:
                hour[0] = "2026-12-04T11"                                   # the hour turns
            table, reason = rng.choice(kinds)
            before = unpushed(table)
            otrace.Cut((table,), otrace.UNDELIVERED, reason, hour[0], limit=rng.randint(1, 30),
                       merges=merges)(conn)
            gone[table] |= before - unpushed(table)

        def cycle(last: bool = False) -> None:
            read_at = merges.read_begins()
            batches = [otrace.Batch(losses=otrace.unreported_losses(conn, tables))]
            batches += [otrace.Batch() for _ in range(rng.randint(0, 1))]
            for table in tables:
                rows = conn.execute(f"SELECT id, trace_id FROM {table} WHERE synced = 0 ORDER BY id LIMIT "
                                    f"{rng.randint(0, 40)}").fetchall()
                for n, (row_id, trace_id) in enumerate(rows):
                    batches[n * len(batches) // len(rows)].add(table, row_id, trace_id, b"{}")
            for batch in batches:
                for _ in range(0 if last else rng.randint(0, 3)):          # deleted on their way
                    chunk()
                if not last and rng.random() < 0.15:                         # no 2xx: the cycle ends
                    break
                confirm(conn, batch, merges, read_at)
                for table, row_id, *_ in batch.spans:
                    delivered[table].add(row_id)
                told.extend(batch.losses)
            merges.cycle_ended()

        prunes = run_seed % 3 == 0
        for _ in range(150):
            if (step := rng.random()) < 0.55:
                chunk()
            elif step < 0.95 or not prunes:
                cycle()
            else:
                conn.execute("DELETE FROM retention_ledger WHERE reported_at IS NOT NULL")
        lost = {table: len(gone[table] - delivered[table]) for table in tables}
        if not prunes:
            counted = dict(conn.execute("SELECT table_name, sum(unsynced_deleted) FROM retention_ledger "
                                        "GROUP BY table_name"))
            assert {table: counted.get(table, 0) for table in tables} == lost
        while otrace.unreported_losses(conn, tables):
            cycle(last=True)
    assert {table: sum(x["rows"] for x in told if x["table"] == table) for table in tables} == lost
    assert len({(x["ledger_id"], x["at"]) for x in told}) == len(told)


@pytest.mark.parametrize("batches", [1, 2])
def test_rows_deleted_while_their_push_is_in_flight_are_not_counted_lost_once_it_is_confirmed(
        tmp_path: Path, batches: int) -> None:
    """Retention deletes the oldest unpushed rows, which are the ones a push reads first: those a push
    had read and the receiver then took were delivered, not lost. The receiver is told of, and the
    ledger counts, only the rows it lacks, each once: with one batch, whose loss report's ledger row
    grew under it, or two, the second confirmed after the first's report moved that growth to a row of
    its own. A row refused alone is reported as refused, not also as lost when retention takes it."""
    db = tmp_path / "otrace.db"
    made = seed(db, [("trace", 200, 0)], age_days=0.01)["trace/0"]
    merges = otrace.Merges()
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("UPDATE llm_traces SET synced = ? WHERE trace_id = ?", (otrace.REFUSED, made[198]))
        cut = otrace.Cut(("llm_traces",), otrace.UNDELIVERED, "pressure_unpushed", "pass-1", limit=50,
                         merges=merges)
        assert cut(conn).lost == 50                                   # ids 1-50: lost for sure
        read_at = merges.read_begins()
        told = otrace.unreported_losses(conn, ("llm_traces",))
        in_flight = [otrace.Batch(losses=told)] + [otrace.Batch() for _ in range(batches - 1)]
        rows = conn.execute("SELECT trace_id, id FROM llm_traces WHERE synced = 0 ORDER BY id LIMIT 100")
        for n, (trace_id, row_id) in enumerate(rows.fetchall()):    # ids 51-150
            in_flight[n * batches // 100].add("llm_traces", row_id, trace_id, b"{}")
        assert cut(conn).lost == 50 and cut(conn).lost == 50           # ids 51-150, on their way
        assert [confirm(conn, batch, merges, read_at) for batch in in_flight] == [100 // batches] * batches
        merges.cycle_ended()
        assert [(x["rows"], x["oldest_received_at"]) for x in told] == [(50, told[0]["oldest_received_at"])]
        assert otrace.unreported_losses(conn, ("llm_traces",)) == []    # nothing more to tell
        totals = conn.execute("SELECT sum(deleted), sum(unsynced_deleted) FROM retention_ledger").fetchone()
        assert totals == (150, 50)
        conn.execute("DELETE FROM llm_traces WHERE synced = 0 AND id < 199")
        chunk = otrace.Cut(("llm_traces",), otrace.UNDELIVERED, "pressure_unpushed", "pass-2", limit=50,
                           merges=merges)(conn)
        assert (chunk.deleted, chunk.lost) == (1, 0)                  # the refused row is not lost
        assert otrace.unreported_losses(conn, ("llm_traces",)) == []  # (the newest, 200, stays)


def test_an_event_retention_deleted_before_the_receiver_refused_it_is_reported_once(tmp_path: Path) -> None:
    """Sent alone (a suspect tried again), deleted by retention on its way (a loss in the ledger), then
    refused: the refusal finds no row to take out of the queue, and files none, so the receiver is
    told of the event once, as lost, not also as refused."""
    db = tmp_path / "otrace.db"
    made = seed(db, [("trace", 2, otrace.UNSYNCED)], age_days=0.01)["trace/0"]
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        assert otrace.Cut(("llm_traces",), otrace.UNDELIVERED, "pressure_unpushed", "p1")(conn).lost == 1
        attempt = otrace.Attempt("b", otrace.now_ms(), 1, 0, status=400, error="bad event")
        otrace.record_refused([("llm_traces", 1, made[0], attempt)], conn)
        assert [(x["kind"], x["rows"]) for x in otrace.unreported_losses(conn, ("llm_traces",))] == [
            ("retention", 1)]


def test_retention_keeps_each_tables_newest_row_so_no_id_is_handed_out_twice(tmp_path: Path) -> None:
    """A push's batch of samples is on its way when retention deletes every unpushed sample: had the
    table been emptied, the next samples would get the ids 1, 2, ... again (SQLite numbers after the
    largest id there is), and the batch's 2xx, which marks rows by id, would mark them pushed unsent.
    The newest row stays: the next ones are numbered after it, and stay unpushed."""
    db = tmp_path / "otrace.db"
    otrace.open_database(str(db))
    merges = otrace.Merges()
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        def sample(trace_id: str) -> None:
            conn.execute("INSERT INTO system_metrics (trace_id, created_at, received_at, source, cpu_pct) "
                         "VALUES (?, ?, ?, 'proc', 1.0)", (trace_id, otrace.now_ms(), otrace.now_ms()))

        for n in range(10):
            sample(f"old-{n}")
        read_at, batch = merges.read_begins(), otrace.Batch("metrics")
        for row_id, trace_id in conn.execute("SELECT id, trace_id FROM system_metrics").fetchall():
            batch.add("system_metrics", row_id, trace_id, b"{}")
        cut = otrace.Cut(otrace.SAMPLE_TABLES, otrace.UNDELIVERED, "pressure_metrics", otrace.ledger_hour(),
                         merges=merges)
        assert (cut(conn).deleted, cut(conn).table) == (9, None)       # all but the newest
        for n in range(3):
            sample(f"new-{n}")
        assert confirm(conn, batch, merges, read_at) == 10
        rows = dict(conn.execute("SELECT trace_id, synced FROM system_metrics"))
        assert rows == {"old-9": 1, "new-0": 0, "new-1": 0, "new-2": 0}
        assert otrace.unreported_losses(conn, ("system_metrics",)) == []    # the 9 were delivered


def test_a_database_over_its_cap_in_free_pages_alone_is_given_back_without_deleting(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """Its rows are under the low mark, its file over the high one: pages freed and not yet given
    back (rows deleted by another connection, or a pass cut short). A pass has nothing to delete; it
    must still shrink the file, or the database stays over its cap until something else is written."""
    db = tmp_path / "otrace.db"
    made = seed(db, [("trace", 700, 0)], age_days=0.01)["trace/0"]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("DELETE FROM llm_traces WHERE id > 100")
        conn.commit()
    assert db_bytes(db) > 1 << 20
    node = run({"TRACE_DB_MAX_BYTES": "1MiB", "TRACE_CLEANUP_INTERVAL": "200ms"}, db=db)
    wait_until(lambda: db_bytes(db) < (1 << 20) * otrace.Marks.LOW, what="the free pages given back")
    assert present(node, "llm_traces") == set(made[:100]) and ledger(node) == {}


def test_a_database_past_its_high_mark_wakes_retention_before_its_interval(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """The writer looks at the size after each batch: a burst is met within a batch or two, not at
    the next TRACE_CLEANUP_INTERVAL (a day here, so no pass runs on its own)."""
    cap = 1 << 20
    node = run({"TRACE_DB_MAX_BYTES": str(cap), "TRACE_CLEANUP_INTERVAL": "1d"})
    sent, deadline = 0, time.monotonic() + 60    # a pass woken by a WAL the checkpoints let grow may
    while not node.logs("retention deleted rows that were never pushed"):      # only shrink it: go on
        assert sent < 5000 and time.monotonic() < deadline, "the database never reached its high mark"
        answer = node.post("/v1/traces", [trace(input_text="t" * 2000) for _ in range(20)])
        sent += 20 if answer.status == 202 else 0        # 503: the queue is full while the pass runs
    assert ledger(node)[("llm_traces", "pressure_unpushed")][0] > 0


def test_the_marks_come_down_by_how_far_the_database_got_past_them_and_return() -> None:
    marks = otrace.Marks()
    assert (marks.high, marks.low) == (0.85, 0.75)
    marks.seen(0.99)                              # a flood got 14 points past it before the pass
    marks.passed(0.70)
    assert marks.high == pytest.approx(0.71) and marks.low == pytest.approx(0.61)
    for _ in range(300):                          # the flood is over: passes meet the mark again
        marks.seen(marks.high)
        marks.passed(marks.low)
    assert marks.high == pytest.approx(0.85, abs=0.001)
    marks.seen(2.0)                               # a stalled disk: never below the floor
    marks.passed(0.5)
    assert marks.high == otrace.Marks.FLOOR


def test_the_marks_keep_room_for_the_most_the_wal_reached_lately() -> None:
    """The WAL swings within milliseconds (a push cycle's marks, a burst while a reader holds it):
    the marks count it at the most it reached lately, so the rows are held under them by that much
    beforehand; at most a quarter of the cap (or TRACE_WAL_MAX_BYTES), halved every two minutes."""
    marks, half = otrace.Marks(wal_most=0.5), otrace.Marks.WAL_HALF_LIFE
    assert marks.count(0.60, 0.02, now=1000.0) == pytest.approx(0.62)
    assert marks.count(0.60, 0.20, now=1000.1) == pytest.approx(0.80)       # a swing
    assert marks.count(0.60, 0.01, now=1000.2) == pytest.approx(0.80, abs=0.001)  # back small: room kept
    assert marks.count(0.60, 0.90, now=1000.3) == pytest.approx(1.50)       # a reader holding it: as is,
    assert marks.wal == otrace.Marks.WAL_MOST                               # its room at most a quarter
    assert marks.count(0.60, 0.01, now=1000.3 + half) == pytest.approx(0.725)      # half of it, later
    assert marks.count(0.60, 0.01, now=1000.3 + 10 * half) == pytest.approx(0.61, abs=0.001)  # gone
    assert otrace.Marks(wal_most=0.1).count(0.5, 0.3, now=0.0) == pytest.approx(0.8)
    assert otrace.Marks(wal_most=0.1).wal_most == 0.1           # TRACE_WAL_MAX_BYTES' share of the cap


def test_what_the_marks_learned_is_taken_up_again_after_a_restart(run: Callable[..., Otrace]) -> None:
    """A flood into a small cap teaches the marks (the high mark comes down by the overshoot, the WAL
    keeps room): a stop keeps both (otrace_state), and the next start takes them up, the room faded by
    the time between, so the first busy spell after a restart stops where the last one had learned to."""
    node = run({"TRACE_DB_MAX_BYTES": str(2 << 20)})
    deadline = time.monotonic() + 120
    while (learned := node.health()["retention"])["db_high_mark"] >= otrace.Marks.HIGH or not (
            learned["db_wal_room"] >= 0.01):
        assert time.monotonic() < deadline, learned
        node.post("/v1/traces", [trace(input_text="x" * 2000) for _ in range(20)])
    assert node.stop() == 0
    stopped = time.monotonic()
    # what the stop kept (a pass may have run after the last look at /health: it fades the overshoot)
    kept = dict(node.query("SELECT key, value / 1e6 FROM otrace_state WHERE key IN (?, ?)",
                           *otrace.MARKS_KEYS))
    overshoot, room = (kept[key] for key in otrace.MARKS_KEYS)
    assert overshoot > 0 and room >= 0.005                      # learned, as /health said before the stop
    again = run(db=node.db_path).health()["retention"]
    faded = 0.5 ** ((time.monotonic() - stopped) / otrace.Marks.WAL_HALF_LIFE)
    high = max(otrace.Marks.FLOOR, otrace.Marks.HIGH - overshoot)          # it comes no lower
    assert again["db_high_mark"] == pytest.approx(high, abs=0.001)
    assert room * faded / 2 <= again["db_wal_room"] <= room + 0.001


def test_health_counts_the_database_as_the_passes_do_with_the_wal_at_its_room(tmp_path: Path) -> None:
    """A pass counts the WAL at the most it reached lately; /health's look at whether the database is
    still over budget counts it so too, not at its size of the moment (they disagreed: a pass ended
    over budget, /health said it no longer was)."""
    db = tmp_path / "o.db"
    seed(db, [("trace", 300, 1)])
    cap = int(db_bytes(db) / 0.8)                            # file + WAL at 80 % of it: under the high mark
    config = otrace.Config.from_env({"TRACE_DB_PATH": str(db), "TRACE_DB_MAX_BYTES": str(cap)})
    retention = otrace.Retention(config, otrace.EventQueue(512, 50), otrace.Database(str(db)))
    retention.marks.count(0.0, 0.1)                           # a swing: the WAL reached a tenth of the cap
    assert db_bytes(db) / cap < retention.marks.high
    retention.stuck = "over budget after deleting all it may"    # as the last pass ended
    assert retention.pressure(learn=False) == retention.pressure() and retention.pressure()[0] == "db_cap"
    assert retention.still_over() and "of " in retention.still_over()


def test_retention_holds_the_rows_under_the_low_mark_less_the_wal_room(tmp_path: Path) -> None:
    _, config, _, retention = retention_at_its_high_mark(tmp_path)
    plain = retention.low_bytes()
    retention.marks.count(0.5, 0.2)
    assert retention.low_bytes() == pytest.approx(plain - 0.2 * config.db_max_bytes, abs=1)


@pytest.mark.parametrize("held", ["briefly", "long"])
def test_a_brief_snapshots_wal_is_kept_room_for_and_a_readers_teaches_the_marks_nothing(
        tmp_path: Path, held: str) -> None:
    """While a snapshot holds the WAL, the marks count the rows and the room as it was. Once it ends,
    a brief one's WAL (a push's read) was a swing, kept room for; a reader's (held a second or more)
    is no lesson: the rows would be held under half the cap for minutes after it."""
    db, config, _, retention = retention_at_its_high_mark(tmp_path)
    cap = config.db_max_bytes
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("PRAGMA wal_autocheckpoint = 0")                    # the WAL a snapshot would keep
        conn.execute("CREATE TABLE filler (data BLOB)")
        while otrace.file_size(f"{db}-wal") < 0.2 * cap:
            conn.execute("INSERT INTO filler VALUES (randomblob(8000))")
        live = otrace.live_bytes(conn)
        began = time.monotonic() - (otrace.LONG_HOLD if held == "long" else 0.0)
        retention.watch(otrace.Hold(began, live))
        assert retention.share() == pytest.approx(max(otrace.file_size(db), live) / cap)   # not the WAL
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")                # let go: the WAL starts over
        retention.watch(None)
    assert retention.marks.wal == (pytest.approx(0.2, abs=0.05) if held == "briefly" else 0.0)


@pytest.mark.parametrize("cap", ["near", "far"])
def test_past_its_room_the_writer_waits_out_a_brief_snapshot_so_the_wal_starts_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: str) -> None:
    """A snapshot keeps the WAL from starting over: each batch committed under it is appended, and a
    queue's worth of batches lands within milliseconds (under a push's read, or the checkpoint loop's
    copy on its own connection, the WAL went past the cap). Past the journal size limit and the room
    the WAL has under the high mark, the writer's copy after a batch waits a brief snapshot out, so
    the next batch starts the WAL over instead of growing it. Far under the cap it does not wait: an
    `otrace report` run over and over beside a flood had a second of the writer's each time, and the
    queue answered half the posts 503."""
    monkeypatch.setattr(otrace, "LONG_HOLD", 60.0)               # brief, however busy the machine is
    db = tmp_path / "o.db"
    otrace.open_database(str(db))
    size = 4 << 20 if cap == "near" else 256 << 20
    config = otrace.Config.from_env({"TRACE_DB_PATH": str(db), "TRACE_DB_MAX_BYTES": str(size),
                                     "TRACE_WAL_MAX_BYTES": str(4 << 20)})
    database, events = otrace.Database(str(db)), otrace.EventQueue(512, 50)
    writer = otrace.Writer(config, database, events, otrace.Counters(otrace.EVENT_COUNTERS))
    checkpointer, wal = otrace.Checkpointer(config, events, database), f"{db}-wal"
    retention = otrace.Retention(config, events, database)
    with (contextlib.closing(writer.connect(str(db))) as conn,
          contextlib.closing(sqlite3.connect(db, isolation_level=None)) as reader):
        conn.execute("CREATE TABLE filler (data BLOB)")
        for _ in range(2_000 if cap == "near" else 1):      # near: the main file at most of the cap
            with otrace.transaction(conn):
                conn.execute("INSERT INTO filler VALUES (randomblob(1500))")
        otrace.checkpoint("TRUNCATE", conn)
        retention.watch()                                                  # the main file, as a batch sees it
        room = retention.wal_room()
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM filler").fetchall()           # a snapshot the WAL must keep
        while otrace.file_size(wal) <= (max(checkpointer.most, room) if cap == "near" else checkpointer.most):
            with otrace.transaction(conn):
                conn.execute("INSERT INTO filler VALUES (randomblob(8000))")
        assert (otrace.file_size(wal) < room) == (cap == "far")
        watching = threading.Thread(target=checkpointer.watch, args=(conn, room))
        watching.start()
        wait_until(lambda: checkpointer.held_since is not None, what="the writer's copy leaving frames")
        if cap == "far":
            watching.join(30)                                              # LONG_HOLD is a minute
            assert not watching.is_alive() and reader.in_transaction       # it let the snapshot be
            return
        reader.rollback()                                                  # the snapshot ends
        watching.join(30)
        grown = otrace.file_size(wal)
        with otrace.transaction(conn):                                     # the next batch
            conn.execute("INSERT INTO filler VALUES (randomblob(8000))")
        assert not watching.is_alive() and otrace.file_size(wal) <= grown


def test_a_wal_a_reader_made_grow_is_cut_back_when_it_restarts(tmp_path: Path) -> None:
    """The cap counts the WAL file: one that grew while a reader held a snapshot keeps no more than
    two autocheckpoints' worth once SQLite starts it over, not up to TRACE_WAL_MAX_BYTES."""
    db = tmp_path / "o.db"
    otrace.open_database(str(db))
    config = otrace.Config.from_env({"TRACE_DB_PATH": str(db), "TRACE_DB_MAX_BYTES": str(4 << 20)})
    limit = 2 * otrace.autocheckpoint_pages(config, 4096) * 4096
    writer = otrace.Writer(config, otrace.Database(str(db)), otrace.EventQueue(512, 50),
                           otrace.Counters(otrace.EVENT_COUNTERS))
    with (contextlib.closing(writer.connect(str(db))) as conn,
          contextlib.closing(sqlite3.connect(db)) as reader):
        conn.execute("CREATE TABLE filler (data BLOB)")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM filler").fetchall()           # a snapshot the WAL must keep
        for _ in range(100):
            with otrace.transaction(conn):
                conn.execute("INSERT INTO filler VALUES (randomblob(8000))")
        grown = (tmp_path / "o.db-wal").stat().st_size
        reader.rollback()
        for _ in range(20):                                # a checkpoint completes; the WAL starts over
            with otrace.transaction(conn):
                conn.execute("INSERT INTO filler VALUES (randomblob(8000))")
        assert grown > 2 * limit and (tmp_path / "o.db-wal").stat().st_size <= limit


def test_a_row_sqlite_refuses_is_dropped_alone_and_logged_by_its_id(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A unit whose commit fails for one row's own data is committed row by row: the others are kept,
    the refused one is counted dropped and logged by its trace_id, never with its text."""
    db = tmp_path / "o.db"
    otrace.open_database(str(db))
    config = otrace.Config.from_env({"TRACE_DB_PATH": str(db)})
    events, counters = otrace.EventQueue(512, 50), otrace.Counters(otrace.EVENT_COUNTERS)
    writer = otrace.Writer(config, otrace.Database(str(db)), events, counters)
    good = otrace.event_row(otrace.TRACES, otrace.trace_row, {
        "provider": "p", "model": "m", "trace_id": "good", "input_text": "sk-live-prompt-secret"}, "http")
    values = list(good.values)
    values[0], values[otrace.TRACES.columns.index("provider")] = "refused", None   # NOT NULL: a bug alone
    refused = otrace.Row(good.table, tuple(values))
    writer.start()
    try:
        assert events.offer(otrace.Unit([good, refused]))
        assert events.wait_drained(30)
    finally:
        events.submit(None)
        writer.join(30)
    assert [r[0] for r in sqlite3.connect(db).execute("SELECT trace_id FROM llm_traces")] == ["good"]
    assert {k: counters.snapshot()[k] for k in ("persisted", "dropped")} == {"persisted": 1, "dropped": 1}
    [said] = [r for r in caplog.records if r.getMessage() == "row cannot be stored; dropped"]
    assert (said.trace_id, said.table) == ("refused", "llm_traces")
    assert "sk-live" not in repr(vars(said))


@needs_root
def test_an_outage_event_sqlite_refuses_is_dropped_alone_and_once(tmp_path: Path) -> None:
    """The outages' events are stored one by one: one whose data SQLite refuses (a bug) is dropped and
    counted once; one that meets a full disk waits for room and is stored then."""
    with tmpfs(tmp_path / "vol", "4m") as vol:
        db = vol / "o.db"
        otrace.open_database(str(db))
        config = otrace.Config.from_env({"TRACE_DB_PATH": str(db)})
        counters = otrace.Counters(otrace.EVENT_COUNTERS)
        writer = otrace.Writer(config, otrace.Database(str(db)), otrace.EventQueue(512, 50), counters)
        good = otrace.own_error("disk_full", "ingest paused 1.0 s by a full disk", {}, severity="critical")
        refused = otrace.own_error("other", "a bug's event", {})
        values = list(refused.values)
        values[otrace.ERRORS.columns.index("error_type")] = None                 # NOT NULL: a bug alone
        writer.outages = [otrace.Row(refused.table, tuple(values)), good]
        with contextlib.closing(writer.connect(str(db))) as writer.conn:
            filler = fill(vol)
            writer.record_outages()
            assert writer.outages == [good] and counters.snapshot()["dropped"] == 1   # the disk is full
            filler.unlink()
            writer.record_outages()
        assert writer.outages == [] and counters.snapshot()["dropped"] == 1
        with contextlib.closing(sqlite3.connect(db)) as conn:
            assert conn.execute("SELECT message FROM error_events").fetchall() == [
                ("ingest paused 1.0 s by a full disk",)]


def call_row(trace_id: str, provider: str | None = "p") -> otrace.Row:
    """A trace row as ingest makes it; with provider None, one SQLite refuses for its own data (NOT NULL)."""
    fields = {"provider": "p", "model": "m", "trace_id": trace_id}
    row = otrace.event_row(otrace.TRACES, otrace.trace_row, fields, "http")
    values = list(row.values)
    values[otrace.TRACES.columns.index("provider")] = provider
    return otrace.Row(row.table, tuple(values))


@contextlib.contextmanager
def writer_on(db: Path, counters: otrace.Counters, *units: otrace.Unit) -> Iterator[otrace.Writer]:
    """A writer (not started) on `db`, its connection open, holding `units` as its batch, taken from its queue
    as its thread takes them; the reserve is off, so a full disk stays full."""
    otrace.open_database(str(db))
    config = otrace.Config.from_env({"TRACE_DB_PATH": str(db), "TRACE_DISK_RESERVE_BYTES": "0"})
    events = otrace.EventQueue(512, 50)
    writer = otrace.Writer(config, otrace.Database(str(db)), events, counters)
    for unit in units:
        assert events.offer(unit)
    writer.pending = events.next_work(50, 0.0, 0.0)
    with contextlib.closing(writer.connect(str(db))) as writer.conn:
        yield writer


def flushed_past_a_full_disk(writer: otrace.Writer, vol: Path, counters: otrace.Counters, unit: otrace.Unit,
                             tries: int = 1) -> None:
    """Each flush while the disk is full raises SQLITE_FULL with the unit kept and nothing dropped;
    once the disk has room, a flush commits it."""
    filler = fill(vol)
    for _ in range(tries):
        with pytest.raises(sqlite3.OperationalError) as raised:
            writer.flush()
        assert otrace.sqlite_code(raised.value) == "SQLITE_FULL"
        assert writer.pending == [unit] and counters.snapshot()["dropped"] == 0
    filler.unlink()
    writer.flush()
    assert writer.pending == []


@needs_root
def test_a_full_disk_met_while_a_refused_row_is_sought_drops_no_good_row(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A batch fails for one row's data; committing its rows one by one then meets a full disk. That is
    the disk, not the rows: the writer raises with the whole batch kept, nothing dropped. Once the disk has
    room, the good rows are stored and the refused one alone is dropped, logged once."""
    counters = otrace.Counters(otrace.EVENT_COUNTERS)
    unit = otrace.Unit([call_row("good-1"), call_row("refused", None), call_row("good-2")])
    with tmpfs(tmp_path / "vol", "4m") as vol, writer_on(vol / "o.db", counters, unit) as writer:
        flushed_past_a_full_disk(writer, vol, counters, unit, tries=2)
        assert writer.events.wait_drained(0)
        with contextlib.closing(sqlite3.connect(vol / "o.db")) as conn:
            assert sorted(conn.execute("SELECT trace_id FROM llm_traces")) == [("good-1",), ("good-2",)]
    assert {k: counters.snapshot()[k] for k in ("persisted", "dropped")} == {"persisted": 2, "dropped": 1}
    said = [r.trace_id for r in caplog.records if r.getMessage() == "row cannot be stored; dropped"]
    assert said == ["refused"]


@needs_root
def test_a_full_disk_met_while_a_refused_statement_is_sought_drops_no_good_statement(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The same for the statements that commit with a unit's rows (a reader's offset, a count): one
    refused for its data, a full disk met while the others are run one by one, raises with the unit kept;
    with room, the good statement is run and the refused one alone dropped."""
    counters = otrace.Counters(otrace.EVENT_COUNTERS)
    good, refused = (otrace.STATE_SQL, ("test.good", 7, 1)), (otrace.STATE_SQL, ("test.refused", None, 1))
    unit = otrace.Unit([], (good, refused), own=True, reader=True)
    with tmpfs(tmp_path / "vol", "4m") as vol, writer_on(vol / "o.db", counters, unit) as writer:
        flushed_past_a_full_disk(writer, vol, counters, unit)
        with contextlib.closing(sqlite3.connect(vol / "o.db")) as conn:
            assert conn.execute("SELECT key, value FROM otrace_state WHERE key LIKE 'test.%'").fetchall() == [
                ("test.good", 7)]
    assert counters.snapshot()["dropped"] == 1
    assert [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()] == [
        "statement cannot be run; dropped"]


@needs_root
def test_a_refused_row_is_dropped_once_however_often_its_batch_is_retried(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The refused row comes first in its batch: it is dropped, then the next row meets a full disk and
    the batch is kept for a retry. The retries must not drop it again: one row refused, one dropped."""
    counters = otrace.Counters(otrace.EVENT_COUNTERS)
    unit = otrace.Unit([call_row("refused", None), call_row("good")])
    with tmpfs(tmp_path / "vol", "4m") as vol, writer_on(vol / "o.db", counters, unit) as writer:
        filler = fill(vol)
        for _ in range(3):
            with pytest.raises(sqlite3.OperationalError):
                writer.flush()
        filler.unlink()
        writer.flush()
        with contextlib.closing(sqlite3.connect(vol / "o.db")) as conn:
            assert conn.execute("SELECT trace_id FROM llm_traces").fetchall() == [("good",)]
    said = [r.trace_id for r in caplog.records if r.getMessage() == "row cannot be stored; dropped"]
    assert (counters.snapshot()["dropped"], said) == (1, ["refused"])


def rows_in_file_alone(db: Path, table: str) -> int:
    """The rows of `table` in the database file itself, as a checkpoint left it (its WAL aside)."""
    alone = db.with_name("alone.db")
    shutil.copyfile(db, alone)
    try:
        with contextlib.closing(sqlite3.connect(alone)) as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{alone}{suffix}").unlink(missing_ok=True)


def test_the_checkpointer_copies_the_wal_on_a_connection_of_its_own(tmp_path: Path) -> None:
    """The writer wakes the checkpointer once it has changed half an autocheckpoint's worth of rows:
    not before, not while the file is being replaced, and counting afresh on a new connection. The
    copy aside puts the rows into the database file without the writer (no writer thread runs here)."""
    db = tmp_path / "o.db"
    otrace.open_database(str(db))
    config = otrace.Config.from_env({"TRACE_DB_PATH": str(db), "TRACE_DB_MAX_BYTES": str(4 << 20)})
    database, events = otrace.Database(str(db)), otrace.EventQueue(512, 50)
    writer = otrace.Writer(config, database, events, otrace.Counters(otrace.EVENT_COUNTERS))
    checkpointer = otrace.Checkpointer(config, events, database)
    assert 0 < checkpointer.step < otrace.autocheckpoint_pages(config, 4096)
    with contextlib.closing(writer.connect(str(db))) as conn:
        conn.execute("CREATE TABLE filler (data BLOB)")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        def insert(n: int) -> None:
            with otrace.transaction(conn):
                conn.executemany("INSERT INTO filler VALUES (randomblob(100))", [()] * n)
            checkpointer.watch(conn)

        insert(checkpointer.step - 1)
        assert not checkpointer.bell.is_set()
        database.replaced_pending = True
        insert(1)
        assert not checkpointer.bell.is_set()
        database.replaced_pending = False
        insert(1)
        assert checkpointer.bell.is_set() and checkpointer.woken
        assert rows_in_file_alone(db, "filler") == 0
        assert checkpointer.copy_aside() > 0
        assert rows_in_file_alone(db, "filler") == checkpointer.step + 1
    checkpointer.bell.clear()
    with contextlib.closing(writer.connect(str(db))) as conn:   # a new connection counts from 0
        checkpointer.watch(conn)
        assert checkpointer.seen == 0 and not checkpointer.bell.is_set()


def test_a_wal_past_its_limit_after_a_batch_is_copied_by_the_writer(tmp_path: Path) -> None:
    """When the copies fall behind (a slow disk), the WAL passes the journal size limit: after that
    batch the writer copies it itself, as its autocheckpoint did, so it keeps to its share of the cap.
    A copy that fails (here SQLite refuses it; a full disk would) fails no batch: the next tries again."""
    db = tmp_path / "o.db"
    otrace.open_database(str(db))
    config = otrace.Config.from_env({"TRACE_DB_PATH": str(db), "TRACE_DB_MAX_BYTES": str(4 << 20)})
    database, events = otrace.Database(str(db)), otrace.EventQueue(512, 50)
    checkpointer = otrace.Checkpointer(config, events, database)
    writer = otrace.Writer(config, database, events, otrace.Counters(otrace.EVENT_COUNTERS))
    with contextlib.closing(writer.connect(str(db))) as conn:
        conn.execute("PRAGMA wal_autocheckpoint = 0")                  # only watch() copies here
        conn.execute("CREATE TABLE filler (data BLOB)")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows = 0
        while Path(f"{db}-wal").stat().st_size <= checkpointer.most:
            with otrace.transaction(conn):
                conn.execute("INSERT INTO filler VALUES (randomblob(8000))")
            rows += 1
        assert rows_in_file_alone(db, "filler") == 0

        def no_checkpoint(action: int, name: str | None, *_: Any) -> int:
            refused = action == sqlite3.SQLITE_PRAGMA and name == "wal_checkpoint"
            return sqlite3.SQLITE_DENY if refused else sqlite3.SQLITE_OK

        conn.set_authorizer(no_checkpoint)
        checkpointer.watch(conn)                                        # does not raise
        assert rows_in_file_alone(db, "filler") == 0
        conn.set_authorizer(None)
        checkpointer.watch(conn)
        assert rows_in_file_alone(db, "filler") == rows


def test_a_truncating_checkpoint_waits_for_a_copy_under_way(tmp_path: Path) -> None:
    """A TRUNCATE checkpoint (the writer's, at a shrink or past TRACE_WAL_MAX_BYTES) that met the
    checkpointer's copy would give up busy, and the file would keep its freed pages: it waits."""
    db = tmp_path / "o.db"
    otrace.open_database(str(db))
    done: list[dict[str, int]] = []
    with contextlib.closing(otrace.connect(str(db))) as conn:
        with otrace.transaction(conn):
            conn.execute("CREATE TABLE filler (data BLOB)")
            conn.execute("INSERT INTO filler VALUES (randomblob(100000))")
        with otrace.CHECKPOINTS:                                   # a copy under way
            truncate = threading.Thread(target=lambda: done.append(otrace.checkpoint("TRUNCATE", conn)))
            truncate.start()
            truncate.join(0.2)
            assert truncate.is_alive() and not done
        truncate.join(10)
        assert done == [{"busy": 0, "wal_pages": 0, "checkpointed_pages": 0}]
        assert Path(f"{db}-wal").stat().st_size == 0


def test_a_burst_is_copied_into_the_database_by_the_checkpoint_thread(run: Callable[..., Otrace]) -> None:
    """Under a small cap an autocheckpoint is a few dozen pages: a burst makes the writer wake the
    checkpoint thread long before its 10-minute interval. It copies the WAL aside, then the writer
    copies the rest (logged at debug): the whole WAL, so that SQLite starts it over."""
    node = run({"TRACE_LOG_LEVEL": "debug", "TRACE_DB_MAX_BYTES": "4MiB"})
    for _ in range(5):
        assert node.post("/v1/traces", [trace(input_text="c" * 2000) for _ in range(20)]).status == 202
    # awaited in the log before the rows are read: a reader's snapshot would leave frames uncopied
    copy = node.wait_log(lambda e: e.get("message") == "wal checkpoint" and e["mode"] == "passive"
                         and e["copied_aside"] > 0)
    assert copy["logger"] == "otrace.checkpoint" and copy["level"] == "DEBUG"
    assert copy["checkpointed_pages"] == copy["wal_pages"]      # the writer copied the rest: none left
    node.wait_persisted(100)
    assert node.query("PRAGMA integrity_check") == [("ok",)]


def test_retention_finds_the_oldest_pushed_rows_through_an_index(tmp_path: Path) -> None:
    """With no pushed rows (push off, a receiver long down), finding the oldest read the whole table,
    on the writer, at every pass under the cap: the pushed tier's statements seek a partial index."""
    db = tmp_path / "o.db"
    seed(db, [("trace", 2, otrace.SYNCED), ("trace", 3, otrace.UNSYNCED), ("metric", 2, otrace.UNSYNCED)])
    statements: list[str] = []
    with contextlib.closing(otrace.connect(str(db))) as conn:
        conn.set_trace_callback(statements.append)
        chunk = otrace.Cut(otrace.EVENT_TABLES, otrace.DELIVERED, "pressure_pushed", "p1")(conn)
        conn.set_trace_callback(None)
        assert (chunk.table, chunk.deleted, chunk.lost) == ("llm_traces", 2, 0)
        looked = [sql for sql in statements if otrace.DELIVERED in sql]
        assert len(looked) == len(otrace.EVENT_TABLES) + 1          # the oldest in each table, the delete
        for sql in looked:
            table = sql.split(" FROM ", 1)[1].split()[0]
            plan = " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
            assert f"INDEX {table}_pushed" in plan, plan          # USING (COVERING) INDEX


def test_a_relief_job_deletes_tier_after_tier_chunk_after_chunk_down_to_its_mark(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the cap the writer deletes chunk after chunk in one job, each its own transaction with
    its ledger entry, tier after tier, and stops at the mark, not a chunk later; when every tier has
    run out; or when RELIEF_TIME is up, after one chunk at least (here a minute, then none). It says
    which tiers have rows left, so the next job does not look again where none are."""
    db = tmp_path / "o.db"
    seed(db, [("trace", 60, 0), ("metric", 100, 0), ("trace", 300, 1)])
    pushed = otrace.Tier("pressure_pushed", ("llm_traces",), "synced = 1", True, 10)
    samples = otrace.Tier("pressure_metrics", ("system_metrics",), "synced = 0", True, 10)
    monkeypatch.setattr(otrace, "RELIEF_TIME", 60.0)
    with contextlib.closing(otrace.connect(str(db))) as conn:
        live = otrace.live_bytes(conn)
        assert otrace.relief((pushed,), live, "p1", conn) == ([], live, (pushed,), None)
        chunks, left, tiers, failed = otrace.relief((pushed, samples), live // 2, "p2", conn)
        assert left <= live // 2 < chunks[-2].live_bytes and tiers == (pushed, samples) and failed is None
        assert {(c.table, c.reason, c.deleted) for c in chunks} == {("llm_traces", "pressure_pushed", 10)}
        assert conn.execute("SELECT count(*), sum(deleted) FROM retention_ledger").fetchone() == (
            1, 10 * len(chunks))                         # the pass's entry, added to by each chunk
        monkeypatch.setattr(otrace, "RELIEF_TIME", 0.0)
        assert [c.deleted for c in otrace.relief((pushed,), 0, "p3", conn).chunks] == [10]
        monkeypatch.setattr(otrace, "RELIEF_TIME", 60.0)
        chunks, _, tiers, _ = otrace.relief((pushed, samples), 0, "p4", conn)
        tables = [c.table for c in chunks]                # the pushed traces, then the samples
        first = tables.index(None)
        assert not tiers and tables == ["llm_traces"] * first + [None] + ["system_metrics"] * 10 + [None]
        assert conn.execute("SELECT synced, count(*) FROM llm_traces GROUP BY synced").fetchall() == [
            (0, 60), (1, 1)]                              # each table's newest stays (BELOW_NEWEST)
        assert conn.execute("SELECT count(*) FROM system_metrics").fetchone() == (1,)


def retention_at_its_high_mark(tmp_path: Path) -> tuple[Path, otrace.Config, otrace.EventQueue,
                                                         otrace.Retention]:
    """A database of 300 pushed traces at 90 % of its cap, and a retention over it (no writer yet)."""
    db = tmp_path / "o.db"
    seed(db, [("trace", 300, 1)])
    cap = int(db_bytes(db) / 0.9)
    config = otrace.Config.from_env({"TRACE_DB_PATH": str(db), "TRACE_DB_MAX_BYTES": str(cap)})
    events = otrace.EventQueue(512, 50)
    return db, config, events, otrace.Retention(config, events, otrace.Database(str(db)))


def test_a_batch_that_grows_the_database_past_its_high_mark_starts_a_deletion_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer, after such a batch, queues a relief job itself, ahead of the next batch, and wakes
    the pass to take it over; one at a time, and another after each batch while the database is
    still past the mark, whatever the pass is doing (a pass thread the machine does not run yet, or
    one whose own job is still begun, must not leave a burst to grow the file unchecked)."""
    db, config, events, retention = retention_at_its_high_mark(tmp_path)
    retention.watch()                                    # from nothing to 90 % of the cap
    retention.watch()                                    # the first has not run yet: no second
    assert len(events.jobs) == 1 and len(retention.begun) == 1 and retention.bell.is_set()
    writer = otrace.Writer(config, otrace.Database(str(db)), events, otrace.Counters(otrace.EVENT_COUNTERS))
    monkeypatch.setattr(otrace, "RELIEF_TIME", 60.0)     # the first job goes all the way to the low mark
    with contextlib.closing(writer.connect(str(db))) as writer.conn:
        writer.run_job(events.jobs.popleft())
        chunks = retention.begun[0].result().chunks
        assert {c.reason for c in chunks} == {"pressure_pushed"} and chunks[0].deleted == retention.chunk
        retention.bell.clear()
        retention.watch()             # still past the mark (the file gives its pages back later), the
        assert len(events.jobs) == 1 and len(retention.begun) == 2 and retention.bell.is_set()  # job begun
        writer.run_job(events.jobs.popleft())     # under the low mark already: it deletes nothing
        assert retention.begun[1].result().chunks == []


def test_a_relief_job_a_pass_stopped_waiting_for_is_counted_by_the_next_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relief job the writer runs after its pass stopped waiting (JOB_TIMEOUT) deletes all the
    same: the next pass counts its rows, so what it deleted unpushed is said, not only in the ledger."""
    db, config, events, retention = retention_at_its_high_mark(tmp_path)
    retention.watch()                                    # a head start, with no writer to run it yet
    [job] = events.jobs
    tally: collections.Counter[tuple[str, str, str]] = collections.Counter()
    monkeypatch.setattr(otrace, "RELIEF_TIME", 60.0)     # the head start goes all the way to the low mark
    monkeypatch.setattr(otrace, "JOB_TIMEOUT", 0.2)
    with pytest.raises(TimeoutError):
        retention.run_pass("p1", time.monotonic(), tally, [])
    writer = otrace.Writer(config, otrace.Database(str(db)), events, otrace.Counters(otrace.EVENT_COUNTERS))
    writer.start()
    try:
        deleted = sum(c.deleted for c in job.future.result(30).chunks)
        monkeypatch.setattr(otrace, "JOB_TIMEOUT", 30.0)
        retention.run_pass("p2", time.monotonic(), tally, [])
    finally:
        events.submit(None)
        writer.join(30)
    assert deleted >= retention.chunk and tally[("llm_traces", "pressure_pushed", "deleted")] == deleted


def test_a_deletion_costs_the_wal_a_few_pages_and_the_file_shrinks_a_step_at_a_time(tmp_path: Path) -> None:
    """The writer deletes without copying every freed page through the WAL (builds that zero freed
    pages by default would, and the cap counts the WAL); the file is then given back in steps, each a
    WAL's worth, each leaving the file smaller."""
    db = tmp_path / "o.db"
    seed(db, [("trace", 400, 1)])
    config = otrace.Config.from_env({"TRACE_DB_PATH": str(db)})
    writer = otrace.Writer(config, otrace.Database(str(db)), otrace.EventQueue(512, 50),
                           otrace.Counters(otrace.EVENT_COUNTERS))
    with contextlib.closing(writer.connect(str(db))) as conn:
        _, _, deleted, lost, _ = otrace.Cut(("llm_traces",), "synced = 1", "test", "pass-1", limit=300)(conn)
        freed = conn.execute("PRAGMA freelist_count").fetchone()[0]
        assert (deleted, lost) == (300, 0) and freed >= 250                 # a page or so per row
        assert (tmp_path / "o.db-wal").stat().st_size < freed * 4096 // 5
        sizes = [db.stat().st_size]
        while (result := otrace.shrink(64, conn))["free"]:
            assert result["free"] < freed and result["busy"] == 0
            freed = result["free"]
            sizes.append(db.stat().st_size)
        sizes.append(db.stat().st_size)
    assert len(sizes) >= 5 and sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


def test_a_failed_retention_pass_still_says_the_unpushed_rows_it_deleted(tmp_path: Path,
                                                                         run: Callable[..., Otrace]) -> None:
    """Chunks commit one by one: rows a pass deleted before a later chunk failed are gone, and said so
    (the warning, /health's last_pass), not forgotten with the pass."""
    db = tmp_path / "o.db"
    made = seed(db, [("trace", 1500, 0)], age_days=0.01)
    with contextlib.closing(sqlite3.connect(db)) as conn:      # a row SQLite will not delete: a real fault
        conn.execute(f"CREATE TRIGGER poison BEFORE DELETE ON llm_traces WHEN old.trace_id = "
                     f"'{made['trace/0'][120]}' BEGIN SELECT RAISE(ABORT, 'poisoned row'); END")
    node = run({"TRACE_DB_MAX_BYTES": str(db_bytes(db) // 2), "TRACE_CLEANUP_INTERVAL": "200ms",
                "TRACE_METRICS_INTERVAL": "off"}, db=db)
    said = node.wait_log(lambda e: e.get("message") == "retention deleted rows that were never pushed")
    assert said["unpushed_deleted"] == {"llm_traces/pressure_unpushed": 100}   # two chunks of 50 before it
    assert node.wait_log(lambda e: e.get("message") == "retention failing")["error"].endswith("poisoned row")
    retention = node.health()["retention"]
    assert retention["unpushed_deleted_total"] == {"llm_traces": 100}
    assert retention["last_pass"]["failed"].endswith("poisoned row")
    assert present(node, "llm_traces") == set(made["trace/0"][100:])


@needs_root
def test_disk_pressure_spares_unpushed_rows_it_cannot_help_with(tmp_path: Path,
                                                               run: Callable[..., Otrace]) -> None:
    """A disk filled by the agent's files: pushed rows go, rows not yet pushed stay, host samples
    too (losing them would free nothing that matters, as the disk trouble builds)."""
    with tmpfs(tmp_path / "vol", "8m") as vol:
        db = vol / "otrace.db"
        made = seed(db, [("metric", 50, 0), ("trace", 100, 0), ("trace", 100, 1)], age_days=0.01)
        filler = vol / "agent-data"
        total, _, _, _ = otrace.disk_usage(str(vol))
        with open(filler, "wb") as out:                     # the agent's own files take the disk to ~90 %
            out.write(b"\0" * (int(total * 0.9) - db_bytes(db)))
        node = run({"TRACE_CLEANUP_INTERVAL": "200ms", "TRACE_DISK_HIGH_PCT": "80"}, db=db)
        node.wait_log(lambda e: e.get("message") == "still over budget after deleting all it may")
        assert present(node, "llm_traces") == {*made["trace/0"], made["trace/1"][-1]}
        assert set(made["metric/0"]) <= present(node, "system_metrics")
        assert ledger(node) == {("llm_traces", "pressure_pushed"): (99, 0)}    # the newest stays
        health = node.health()
        assert health["status"] == "degraded" and "disk" in health["retention"]["still_over_budget"]
        passes = health["retention"]["passes"]
        wait_until(lambda: node.health()["retention"]["passes"] >= passes + 5, what="five more passes")
        filler.unlink()
        node.wait_log(lambda e: e.get("message") == "under budget again")
        wait_until(lambda: node.health()["status"] == "ok", what="healthy again")
        said = collections.Counter(e["message"] for e in node.lines)
        assert said["over budget: deleting oldest rows"] == 1                  # once, not once a pass
        assert said["still over budget after deleting all it may"] == 1
        assert node.stop() == 0


@needs_root
def test_disk_filled_by_unpushed_rows_deletes_the_oldest_and_reports_them(tmp_path: Path,
                                                                          run: Callable[..., Otrace]) -> None:
    """A dead receiver and a disk over its mark mostly because of otrace's own rows: unpushed host
    samples, then unpushed traces, oldest first, go for the disk too, counted in the ledger."""
    with tmpfs(tmp_path / "vol", "48m") as vol:
        db = vol / "otrace.db"
        made = seed(db, [("metric", 50, 0), ("trace", 2000, 0)], age_days=0.01)
        total, _, _, _ = otrace.disk_usage(str(vol))
        with open(vol / "agent-data", "wb") as out:           # the rest of the disk, to ~90 % in all
            out.write(b"\0" * max(0, int(total * 0.9) - db_bytes(db)))
        node = run({"TRACE_CLEANUP_INTERVAL": "200ms", "TRACE_DISK_HIGH_PCT": "80",
                    "TRACE_METRICS_INTERVAL": "off"}, db=db)
        node.wait_log(lambda e: e.get("message") == "retention deleted rows that were never pushed")
        assert otrace.disk_usage(str(vol))[3] <= 75
        kept = present(node, "llm_traces")
        lost = [t for t in made["trace/0"] if t not in kept]
        assert 0 < len(lost) < 2000 and lost == made["trace/0"][:len(lost)]     # oldest first
        assert present(node, "system_metrics") == {made["metric/0"][-1]}        # the newest stays
        assert ledger(node) == {("system_metrics", "pressure_metrics"): (49, 49),
                                ("llm_traces", "pressure_unpushed"): (len(lost), len(lost))}
        assert node.health()["retention"]["unpushed_deleted_total"] == {"system_metrics": 49,
                                                                       "llm_traces": len(lost)}
        assert node.stop() == 0


KEEP_FULL = """
import os, sys, time
vol, free = sys.argv[1], int(sys.argv[2])
with open(os.path.join(vol, "agent-data"), "ab") as out:
    while True:
        st = os.statvfs(vol)
        if (room := st.f_bavail * st.f_frsize - free) > 0:
            out.write(bytes(room))
            out.flush()
        time.sleep(0.002)
"""


@contextlib.contextmanager
def kept_full(vol: Path, free: int) -> Iterator[None]:
    """Another program that takes whatever space appears on `vol` as it appears (a log growing), so
    that no more than `free` bytes stay available: a process of its own, ahead of the others on the
    CPU (nice -10), as a thread of the tests' was starved on a busy machine while otrace freed it all."""
    taker = subprocess.Popen(["nice", "-n", "-10", sys.executable, "-c", KEEP_FULL, str(vol), str(free)])
    try:
        wait_until(lambda: otrace.disk_usage(str(vol))[2] <= free + (1 << 20),
                   what="the other program holding the disk")
        yield
    finally:
        taker.kill()
        taker.wait(10)


@needs_root
def test_disk_pressure_stops_deleting_unpushed_traces_once_another_program_takes_the_room(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """Unpushed traces go for the disk only while the database holds what the disk is over its low
    mark: checked before each chunk, so space another program takes back as it is freed ends the
    deleting, where a pass that checked once gave up every unpushed row to it."""
    with tmpfs(tmp_path / "vol", "48m") as vol:
        db = vol / "otrace.db"
        made = seed(db, [("trace", 3000, 0)], age_days=0.01)
        node = run({"TRACE_CLEANUP_INTERVAL": "200ms", "TRACE_DISK_HIGH_PCT": "80",
                    "TRACE_DISK_RESERVE_BYTES": "0", "TRACE_METRICS_INTERVAL": "off"}, db=db)
        free = 4 << 20                                # what the other program leaves
        over = otrace.disk_usage(str(vol))[0] * 0.25 - free            # the disk over its low mark (75 %)
        assert db_bytes(db) > over                    # so it is otrace's rows that put it there
        with kept_full(vol, free):
            node.wait_log(lambda e: e.get("message") == "retention deleted rows that were never pushed")
            node.wait_log(lambda e: e.get("message") == "still over budget after deleting all it may")
            kept, left = present(node, "llm_traces"), db_bytes(db)
        lost = len(made["trace/0"]) - len(kept)
        # how many go depends on how soon the other program takes the room (a starved one takes it
        # late, and the disk looks relieved): never all but the newest, which one look a pass gave up
        assert 0 < lost < len(made["trace/0"]) - 1 and left <= over + (1 << 20)   # down to about `over`
        assert kept == set(made["trace/0"][-len(kept):])                      # the newest stay
        assert ledger(node) == {("llm_traces", "pressure_unpushed"): (lost, lost)}
        assert node.stop() == 0


@needs_root
def test_a_write_outage_is_recorded_as_an_error_event(tmp_path: Path, run: Callable[..., Otrace]) -> None:
    with tmpfs(tmp_path / "vol", "2m") as vol:
        node = run(db=vol / "otrace.db")
        assert node.post("/v1/traces", trace()).status == 202
        node.wait_persisted(1)                        # the writer has its connection: a write fails
        filler = fill(vol)
        assert node.post("/v1/traces", trace()).status == 202
        node.wait_log(lambda e: e.get("message") == "database write failing")
        over = node.wait_log(lambda e: e.get("message") == "over budget: deleting oldest rows")
        assert over["cause"] == "disk"                       # retention ran at once, not in 5 minutes
        filler.unlink()
        node.wait_persisted(2)
        event = wait_until(lambda: [e for e in node.rows("error_events") if e["source"] == "otrace"],
                           what="the outage event")[0]
        assert (event["error_type"], event["category"], event["severity"]) == \
            ("system_error", "disk_full", "critical")
        assert "SQLITE_FULL" in event["message"] and json.loads(event["metadata"])["attempts"] >= 1
        assert node.stop() == 0


@needs_root
def test_an_outage_the_reserve_ended_is_recorded_once_the_disk_has_room(tmp_path: Path,
                                                                        run: Callable[..., Otrace]) -> None:
    """On a full disk the reserve gives the accepted events their room, and may leave none for the
    outage's own event: that one is stored after a later commit, once the disk has room again."""
    with tmpfs(tmp_path / "vol", "3m") as vol:
        node = run({"TRACE_DISK_RESERVE_BYTES": "256KiB", "TRACE_DB_MAX_BYTES": "2MiB",
                    "TRACE_WAL_MAX_BYTES": "256KiB"}, db=vol / "otrace.db")
        assert node.post("/v1/traces", trace()).status == 202
        node.wait_persisted(1)                              # the writer has its connection (and -shm)
        filler = fill(vol)
        assert node.post("/v1/traces", [trace(input_text="x" * 8000) for _ in range(20)]).status == 202
        node.wait_persisted(21)                             # in the reserve's room, most of it
        filler.unlink()
        wait_until(lambda: node.post("/v1/traces", trace()).status == 202, timeout=30,
                   what="ingest open again (the reserve taken back)")
        node.wait_persisted(22)
        event = wait_until(lambda: [e for e in node.rows("error_events") if e["source"] == "otrace"],
                           what="the outage event")[0]
        assert (event["category"], event["severity"]) == ("disk_full", "critical")
        assert node.stop() == 0


# ------------------------------------------------------------------------------------------- health


def test_health_reports_and_head_has_no_body(svc: Otrace) -> None:
    assert svc.post("/v1/traces", [trace(), trace()]).status == 202
    # the writer counts a commit's events persisted before it hands their unit back to the queue: a
    # report between the two says 2 persisted and 2 still queued
    health = wait_until(lambda: (h := svc.wait_persisted(2))["queue_depth"] == 0 and h, what="the queue done")
    assert health["status"] == "ok" and health["db_status"] == "ok" and health["writer_alive"] is True
    assert health["queue_capacity"] == 512 and health["queue_depth"] == 0
    assert health["unsynced_count"] == 2
    assert health["version"] == otrace.__version__
    assert health["db_size_bytes"] > 0
    assert health["last_push_status"] == "disabled" and health["last_push_time"] is None
    for key in ("uptime_seconds", "events_received", "events_persisted", "events_refused",
                "events_rejected", "wal_size_bytes", "last_write_error"):
        assert key in health
    head = svc.request("HEAD", "/health")
    assert head.status == 200 and head.body == b"" and int(head.headers["content-length"]) > 0


def test_health_and_prometheus_show_the_newest_sample(run: Callable[..., Otrace]) -> None:
    node = run({"TRACE_METRICS_INTERVAL": "100ms"})
    host = wait_until(lambda: node.health()["host"], what="a host sample")
    assert host["source"] in ("cgroup_v1", "cgroup_v2", "proc") and host["self_rss_bytes"] > 0
    metrics = node.request("GET", "/metrics")
    assert metrics.status == 200 and metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics.body.decode()
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert {"otrace_events_received_total", "otrace_queue_depth_events", "otrace_unsynced_events",
            "otrace_host_cpu_percent", "otrace_host_memory_used_bytes", "otrace_host_disk_used_percent",
            "otrace_self_rss_bytes"} <= names
    for line in text.splitlines():
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])                           # every sample is a number
    assert node.request("HEAD", "/metrics").body == b""
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    total = node.health()["host"]["mem_total_bytes"]                # 25 GB here: %g would print 2.5e+10
    assert samples["otrace_host_memory_total_bytes"] == str(total)
    assert samples["otrace_db_size_bytes"].isdigit() and int(samples["otrace_db_size_bytes"]) > 0
    assert otrace.prometheus_number(1_234_567_891) == "1234567891"
    assert otrace.prometheus_number(0.1 + 0.2) == "0.30000000000000004"


def test_metrics_read_by_the_prometheus_parser_with_labels_a_client_chose(run: Callable[..., Otrace]) -> None:
    """The exposition as Prometheus's own Python parser reads it: each family typed once, a histogram's
    buckets whole, and a model name with a quote, a backslash and a non-ASCII letter read back as sent."""
    from prometheus_client.parser import text_string_to_metric_families

    node = run({"TRACE_METRICS_INTERVAL": "100ms"})
    odd = 'gpt "4o" \\ mini ü'
    assert node.post("/v1/traces", [trace(provider="openai", model=odd, prompt_tokens=10, completion_tokens=2,
                                          latency_ms=120.0, status=status) for status in ("ok", "error")]
                     ).status == 202
    node.wait_persisted(2)
    wait_until(lambda: node.health()["host"], what="a host sample")
    families = list(text_string_to_metric_families(node.request("GET", "/metrics").body.decode()))
    names = [family.name for family in families]
    assert len(names) == len(set(names)) and all(family.documentation for family in families)
    kinds = {family.name: family.type for family in families}
    assert (kinds["otrace_gen_ai_calls"], kinds["otrace_gen_ai_client_operation_duration_seconds"]) == (
        "counter", "histogram")
    samples = {(sample.name, sample.labels.get("gen_ai_request_model")): sample.value
               for family in families for sample in family.samples}
    assert samples[("otrace_gen_ai_calls_total", odd)] == 2
    assert samples[("otrace_gen_ai_call_failures_total", odd)] == 1
    buckets = sorted((float(sample.labels["le"]), sample.value) for family in families
                     for sample in family.samples if sample.name.endswith("_bucket")
                     and sample.labels.get("gen_ai_request_model") == odd)
    assert buckets[-1] == (float("inf"), 2) and [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert samples[("otrace_gen_ai_client_operation_duration_seconds_count", odd)] == 2


# ---------------------------------------------------------------------------------------- lifecycle


def test_max_connections_over_the_descriptor_limit_is_lowered_and_said(tmp_path: Path,
                                                                      run: Callable[..., Otrace]) -> None:
    node = run({"TRACE_MAX_CONNECTIONS": "10000"},
               command=["prlimit", "--nofile=200:200", *START])
    lowered = node.wait_log(lambda e: e.get("message", "").startswith("TRACE_MAX_CONNECTIONS is over"))
    allowed = 200 - otrace.PROBE_RESERVE - otrace.REFUSED_LINGERING - otrace.SPARE_DESCRIPTORS
    assert lowered["lowered_to"] == allowed
    started = node.logs("starting")[0]["settings"]["max_connections"]
    assert (lowered["nofile_limit"], started) == (200, allowed)
    socks = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(allowed - 1)]
    wait_until(lambda: node.health()["connections_open"] == allowed, what="all but one connection open")
    socks.append(socket.create_connection(("127.0.0.1", node.port)))
    probes = [http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
              for _ in range(otrace.PROBE_RESERVE)]
    for probe in probes:                        # the reserve has descriptors of its own
        assert node.request("GET", "/health", conn=probe).status == 200
        begun(probe.sock)                       # busy: it keeps its place
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as extra:
        assert read_to_end(extra).startswith(b"HTTP/1.1 503 ")         # refused by the limit, not EMFILE
    for sock in socks:
        sock.close()
    for probe in probes:
        probe.close()
    assert node.logs("accepting connections failing") == []


def test_settings_that_could_not_work_together_are_lowered_and_said(run: Callable[..., Otrace]) -> None:
    """A batch the queue cannot hold twice would make the writer wait for requests the full queue
    refuses: lowered to half the queue, as the gate holds requests back once half of it waits. A body
    larger than the memory for all bodies would be answered 503 for ever: 413 names the limit. A disk
    mark over 95 % would end a full disk's pause at once, the reserve given up for nothing. A first push
    retry longer than the longest would be the longest, unsaid."""
    node = run({"TRACE_QUEUE_SIZE": "9", "TRACE_BATCH_SIZE": "10000", "TRACE_MAX_BUFFERED_BYTES": "64KiB",
                "TRACE_DISK_HIGH_PCT": "100", "TRACE_PUSH_ENDPOINT": f"http://127.0.0.1:{free_port()}/",
                "TRACE_PUSH_BACKOFF_BASE": "1h", "TRACE_PUSH_BACKOFF_CAP": "2s", "TRACE_PUSH_INTERVAL": "1h"})
    lowered = node.wait_log(lambda e: e.get("message", "").startswith("TRACE_BATCH_SIZE is over half"))
    assert (lowered["lowered_to"], lowered["queue_size"]) == (4, 9)
    body = node.wait_log(lambda e: e.get("message", "").startswith("TRACE_MAX_BODY_BYTES is over"))
    assert (body["max_body_bytes"], body["lowered_to"]) == (1 << 20, 64 << 10)
    disk = node.wait_log(lambda e: e.get("message", "").startswith("TRACE_DISK_HIGH_PCT is over 95"))
    assert (disk["disk_high_pct"], disk["lowered_to"]) == (100, 95)
    backoff = node.wait_log(lambda e: e.get("message", "").startswith("TRACE_PUSH_BACKOFF_BASE is over"))
    assert (backoff["push_backoff_base"], backoff["lowered_to"]) == (3600, 2)
    settings = node.logs("starting")[0]["settings"]
    assert {k: settings[k] for k in ("batch_size", "max_body_bytes", "disk_high_pct", "push_backoff_base")
            } == {"batch_size": 4, "max_body_bytes": 64 << 10, "disk_high_pct": 95, "push_backoff_base": 2}
    big = node.post("/v1/traces", json.dumps(trace(input_text="x" * 70_000)))
    assert big.status == 413 and "TRACE_MAX_BODY_BYTES" in big.json["error"]


def test_make_run_stops_with_the_make_that_started_it(tmp_path: Path) -> None:
    """make run execs otrace: SIGTERM to make reaches otrace, which stops cleanly, not orphaned."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")} | {
        "TRACE_DB_PATH": str(tmp_path / "run.db"), "TRACE_PORT": "0", "TRACE_METRICS_INTERVAL": "off"}
    make = subprocess.Popen(["make", "-s", "run"], cwd=HERE, env=env, stdout=subprocess.PIPE, text=True)
    lines: list[dict[str, Any]] = []
    for raw in make.stdout:
        lines.append(json.loads(raw))
        if lines[-1]["message"] == "listening":
            break
    pid = lines[0]["pid"]
    assert Path(f"/proc/{pid}/status").read_text().split("PPid:")[1].split()[0] == str(make.pid)
    make.send_signal(signal.SIGTERM)
    rest = [json.loads(raw) for raw in make.stdout]
    make.wait(10)
    assert rest[-1]["message"] == "stopped" and rest[-1]["events_lost"] == 0
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), what="otrace gone")


@pytest.mark.parametrize("timeout", ["4s", "2s"])     # 2s: the request in flight gets half of it
def test_sigterm_closes_idle_connections_and_finishes_a_request_in_flight(run: Callable[..., Otrace],
                                                                          timeout: str) -> None:
    svc = run({"TRACE_SHUTDOWN_TIMEOUT": timeout})
    idle = socket.create_connection(("127.0.0.1", svc.port), timeout=30)
    event = json.dumps(trace()).encode()
    first = json.dumps(trace()).encode()
    idle.sendall(request_head(len(first)) + first)
    assert answer_of(idle.recv(65536))[0] == 202                   # a keep-alive, now idle
    with idle, socket.create_connection(("127.0.0.1", svc.port), timeout=30) as busy:
        busy.sendall(request_head(len(event)) + event[:10])         # a request in flight
        svc.signal(signal.SIGTERM)
        assert idle.recv(100) == b""                                # closed at once
        with pytest.raises(ConnectionRefusedError):                 # a new client refused at once, not
            socket.create_connection(("127.0.0.1", svc.port), timeout=30).close()  # left in the backlog
        busy.sendall(event[10:])
        answer = read_to_end(busy)
    status, body = answer_of(answer)
    assert status == 202 and b"Connection: close" in answer
    assert svc.exited(10) == 0
    assert svc.logs("stopped")[0]["connections_cut"] == 0
    stored = {r[0] for r in svc.query("SELECT trace_id FROM llm_traces")}
    assert body["trace_ids"][0] in stored and len(stored) == 2


def test_a_second_otrace_on_the_same_database_exits_naming_it(run: Callable[..., Otrace]) -> None:
    first = run()
    second = run(wait=False, db=first.db_path)
    assert second.exited(10) == 1
    assert second.stderr == [f"otrace: another otrace (pid {first.proc.pid}) is using the database "
                             f"{first.db_path}\n"]
    assert first.health()["status"] == "ok"
    assert first.stop() == 0
    third = run(db=first.db_path)                           # the lock went with its holder
    assert third.stop() == 0


def test_a_second_otrace_on_a_hard_link_of_the_database_exits_naming_it(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A hard link names the file twice, with a lock file beside each name: the file itself is locked."""
    first = run()
    assert first.post("/v1/traces", trace()).status == 202
    first.wait_persisted(1)
    link = tmp_path / "other-name.db"
    os.link(first.db_path, link)
    second = run(wait=False, db=link)
    assert second.exited(10) == 1
    assert second.stderr == [f"otrace: another otrace is using the database {link} under another name "
                             "(a hard link)\n"]
    assert first.health()["status"] == "ok"
    assert first.stop() == 0
    third = run(db=link)                                   # the lock went with its holder
    assert third.query("SELECT count(*) FROM llm_traces") == [(1,)]
    assert third.stop() == 0


def test_sigterm_during_a_burst_keeps_every_202(svc: Otrace) -> None:
    stop = threading.Event()
    result: list[Any] = []
    runner = threading.Thread(target=lambda: result.append(post_flat_out(svc, 8, stop, per_request=5)))
    runner.start()
    wait_until(lambda: svc.health()["events_received"] >= 1000, timeout=60, what="burst under way")
    svc.signal(signal.SIGTERM)
    code = svc.exited(30)                       # it stops by itself, with its 4 s deadline
    stop.set()
    runner.join()
    accepted, _ = result[0]
    assert code == 0, svc.lines[-5:]
    stored = {r[0] for r in svc.query("SELECT trace_id FROM llm_traces")}
    missing = set(accepted) - stored
    assert not missing, f"{len(missing)} of {len(accepted)} accepted events lost"
    stopped = svc.logs("stopped")[0]
    assert stopped["events_lost"] == 0                 # every 202 counted as stored, or as stored before
    assert stopped["events_persisted"] + stopped["events_duplicate"] >= len(accepted)
    assert svc.logs("wal checkpoint")[0]["mode"] == "truncate"
    assert not Path(f"{svc.db_path}-wal").exists() or Path(f"{svc.db_path}-wal").stat().st_size == 0


def test_a_clean_stop_after_health_was_asked_leaves_no_wal(run: Callable[..., Otrace]) -> None:
    """/health reads through a connection of its own; the writer's must close last to remove the WAL
    (deploy.md: no WAL left; a read-only copy without one reads exactly)."""
    node = run()
    assert node.post("/v1/traces", trace()).status == 202
    node.wait_persisted(1)
    assert node.request("GET", "/health").status == 200
    assert node.stop() == 0
    assert [p.name for p in node.db_path.parent.iterdir() if p.name.startswith(node.db_path.name + "-")
            and p.name != node.db_path.name + "-reserve"] == []


def test_events_a_lock_keeps_unwritten_past_the_deadline_are_counted_lost_and_the_exit_is_1(
        run: Callable[..., Otrace]) -> None:
    """A 202 is a promise: when another program holds the write lock past the shutdown deadline, the
    accepted events not written are named by count (events_lost), and otrace exits 1, not 0."""
    node = run({"TRACE_SHUTDOWN_TIMEOUT": "1s"})
    blocker = sqlite3.connect(node.db_path, isolation_level=None, timeout=10)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        assert node.post("/v1/traces", [trace() for _ in range(5)]).status == 202
        assert node.stop(timeout=30) == 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert node.logs("shutdown deadline passed with accepted events not written")[0]["events_lost"] == 5
    assert node.logs("stopped")[0]["events_lost"] == 5 and node.rows("llm_traces") == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])   # SIGHUP: `make run`'s terminal closed
def test_sigint_and_sighup_stop_cleanly_too(run: Callable[..., Otrace], sig: signal.Signals) -> None:
    svc = run({"TRACE_BATCH_WINDOW": "10s"})                    # the events still queued at the signal
    assert svc.post("/v1/traces", [trace() for _ in range(5)]).status == 202
    svc.signal(sig)
    assert svc.exited(10) == 0
    assert len(svc.rows("llm_traces")) == 5 and svc.logs("stopped")[0]["events_lost"] == 0


def test_started_under_nohup_a_sighup_does_not_stop_it(run: Callable[..., Otrace]) -> None:
    """nohup starts otrace ignoring SIGHUP: a terminal that closes leaves it running, and SIGTERM
    stops it (it took SIGHUP as a stop signal whatever its start said)."""
    svc = run(command=["nohup", *START])
    svc.signal(signal.SIGHUP)
    svc.signal(signal.SIGTERM)
    assert svc.exited(10) == 0
    assert [line["signal"] for line in svc.logs("shutting down")] == ["SIGTERM"]


@needs_root
def test_start_on_a_full_disk_waits_for_space(tmp_path: Path, run: Callable[..., Otrace]) -> None:
    with tmpfs(tmp_path / "vol", "2m") as vol:
        db = vol / "otrace.db"
        first = run(db=db)
        ids = post_some(first, 20)
        first.wait_persisted(len(ids))                          # 20 traces and an error
        first.kill()                                             # the WAL is left to recover
        filler = fill(vol)
        node = run(db=db, wait=False)
        failing = node.wait_log(lambda e: e.get("message") == "start failing")
        assert "SQLITE_FULL" in failing["error"] or "SQLITE_IOERR" in failing["error"], failing
        assert "the disk holding the database is full" in failing["error"]    # whichever step SQLite names
        filler.unlink()
        node.wait_log(lambda e: e.get("message") == "listening", timeout=15)
        node.port = int(node.logs("listening")[0]["address"].rsplit(":", 1)[1])
        assert node.logs("start recovered")
        assert node.post("/v1/traces", trace()).status == 202
        assert node.stop() == 0
        stored = node.query("SELECT trace_id FROM llm_traces UNION ALL SELECT trace_id FROM error_events")
        assert {r[0] for r in stored} >= set(ids)


def test_a_kill_right_after_the_first_202_is_said_at_the_next_start(tmp_path: Path,
                                                                   run: Callable[..., Otrace]) -> None:
    """The run's mark is committed before otrace answers anything, not with the first batch: a SIGKILL
    that loses the events of the first batch window is said at the next start too."""
    db = tmp_path / "o.db"
    first = run({"TRACE_BATCH_WINDOW": "10s"}, db=db)               # the first batch waits to fill
    assert first.post("/v1/traces", trace()).status == 202
    first.kill()
    second = run(db=db)
    said = second.wait_log(lambda e: e.get("message", "").startswith("the last run did not stop cleanly"))
    assert said["pid"] == first.proc.pid and second.stop() == 0


def test_a_run_that_did_not_stop_cleanly_is_said_at_the_next_start(tmp_path: Path,
                                                                  run: Callable[..., Otrace]) -> None:
    """A SIGKILL can lose what was accepted in the last batch window: the next start says so, in its
    log and as an error event the report counts; after a clean stop it says nothing."""
    db = tmp_path / "o.db"
    first = run(db=db)
    assert first.post("/v1/traces", trace()).status == 202
    first.wait_persisted(1)
    with contextlib.closing(sqlite3.connect(db)) as live, contextlib.closing(
            sqlite3.connect(tmp_path / "backup.db")) as backup:
        live.backup(backup)                                # as operations.md's backup, the run's mark in it
    first.kill()
    second = run(db=db)
    said = second.wait_log(lambda e: e.get("message", "").startswith("the last run did not stop cleanly"))
    assert said["level"] == "WARNING" and said["pid"] == first.proc.pid
    crash = wait_until(lambda: second.query("SELECT category, severity, metadata FROM error_events"),
                       what="the error event")
    assert crash[0][:2] == ("process_crash", "error") and json.loads(crash[0][2])["pid"] == first.proc.pid
    assert second.stop() == 0
    third = run(db=db)
    assert third.post("/v1/traces", trace()).status == 202
    third.wait_persisted(1)
    assert third.stop() == 0 and not third.logs("the last run did not stop cleanly: what it accepted in "
                                                 "its last moments may be lost")
    assert len(third.query("SELECT id FROM error_events")) == 1
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    (tmp_path / "backup.db").replace(db)                   # restored while otrace is stopped: no crash
    restored = run(db=db)
    restored.wait_log(lambda e: e.get("message") == "listening")
    assert restored.stop() == 0 and not restored.query("SELECT id FROM error_events")


def test_a_run_killed_after_its_file_was_replaced_is_said_at_the_next_start(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """The run's mark moves with the rows to the new file at the path: a SIGKILL after the file was
    deleted under otrace is said at the next start, as one before it is."""
    db = tmp_path / "o.db"
    first = run(db=db)
    assert first.post("/v1/traces", trace()).status == 202
    first.wait_persisted(1)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    assert first.post("/v1/traces", trace()).status == 202
    first.wait_log(lambda e: e.get("message") == "database file recreated; unpushed rows carried over")
    first.wait_persisted(2)
    first.kill()
    second = run(db=db)
    said = second.wait_log(lambda e: e.get("message", "").startswith("the last run did not stop cleanly"))
    assert said["pid"] == first.proc.pid
    assert second.stop() == 0


@needs_root
@needs_gateway_log
def test_a_stop_that_leaves_only_otraces_own_rows_unwritten_is_a_clean_one(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A full disk holds the gateway log's lines (otrace's own rows, read again at the next start) past
    the shutdown deadline: no event that got a 202 is lost, so the run's mark is removed and the next
    start says no crash."""
    log = tmp_path / "openclaw-2026-11-24.log"
    log.touch()
    env = {"TRACE_LOG_PATH": str(log), "TRACE_LOG_POLL": "50ms", "TRACE_DISK_RESERVE_BYTES": "0",
           "TRACE_SHUTDOWN_TIMEOUT": "4s"}                 # its last 0.5 s for the mark's removal
    marks = "SELECT key FROM otrace_state WHERE key IN ('running_pid', 'running_inode')"
    with tmpfs(tmp_path / "vol", "8m") as vol:
        node = run(env, db=vol / "otrace.db")
        wait_until(lambda: len(node.query(marks)) == 2, what="the run's mark")
        filler = fill(vol)
        os.truncate(filler, filler.stat().st_size - (256 << 10))   # room for a small write, not the log's
        append(log, b"".join(gateway_lines()) * 100)
        node.wait_log(lambda e: e.get("message") == "database write failing", timeout=30)
        assert node.stop(timeout=30) == 0
        stopped = node.logs("stopped")[0]
        said = [(e.get("level"), e.get("message")) for e in node.lines if e.get("level") != "DEBUG"]
        assert stopped["events_lost"] == 0 and stopped["own_rows_unwritten"] > 0, (stopped, said[-30:])
        assert node.query(marks) == [], node.logs("could not mark the stop as clean")
        filler.unlink()
        second = run(env, db=vol / "otrace.db")
        assert second.stop() == 0
        assert not second.logs("the last run did not stop cleanly: what it accepted in its last moments may "
                               "be lost")
        assert not second.query("SELECT id FROM error_events WHERE category = 'process_crash'")


def test_sigkill_at_random_moments_keeps_every_committed_row(tmp_path: Path, run: Callable[..., Otrace],
                                                             receiver: Receiver) -> None:
    """Twenty SIGKILLs under load, with checkpoints, retention and push all busy: each time the file
    opens, passes integrity_check, and holds every row that was committed before the kill."""
    import random
    db = tmp_path / "crash.db"
    env = push_env(receiver, TRACE_CHECKPOINT_INTERVAL="100ms", TRACE_WAL_MAX_BYTES="64KiB",
                   TRACE_CLEANUP_INTERVAL="100ms", TRACE_RETENTION="1s", TRACE_BATCH_WINDOW="5ms")
    committed: set[str] = set()
    accepted_total = 0
    rng = random.Random(7)
    for _ in range(20):
        node = run(env, db=db)
        stop = threading.Event()
        result: list[Any] = []
        runner = threading.Thread(target=lambda n=node, s=stop, r=result: r.append(post_flat_out(n, 4, s, 3)))
        runner.start()
        time.sleep(rng.uniform(0.05, 0.6))             # the kill lands at a random moment of the work
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
            committed |= {t for (t,) in conn.execute("SELECT trace_id FROM llm_traces")}
            deleted = {t for (t,) in conn.execute("SELECT trace_id FROM llm_traces WHERE synced = 1")}
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        stop.set()
        runner.join()
        accepted_total += len(result[0][0])
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            now = {t for (t,) in conn.execute("SELECT trace_id FROM llm_traces")}
        # what was committed is there, unless retention deleted it after it was pushed
        gone = committed - now
        pushed = set(receiver.trace_ids())
        assert gone <= pushed | deleted, f"{len(gone - pushed - deleted)} committed rows lost"
        committed = now
    assert accepted_total > 0


@pytest.mark.parametrize("level", ["info", "debug"])
def test_logs_never_hold_event_texts_or_secrets(run: Callable[..., Otrace], level: str) -> None:
    """Event texts, the ingest and push tokens, and a password in the push URL never reach stdout or
    stderr, at the default level or at debug, through ingest, a failing push and a shutdown."""
    mark = uuid.uuid4().hex[:12]
    secrets = {name: f"{name}-{mark}" for name in (
        "INPUT", "OUTPUT", "MESSAGE", "STACK", "META", "REFUSEDFIELD", "BADJSON", "WRONGTOKEN",
        "INGESTTOKEN", "PUSHTOKEN", "URLPASSWORD")}
    secrets["PATHKEY"] = f"sk-proj-{mark}{'x' * 30}"      # a key a client put in a path, by its look
    secrets["PATHTOKEN"] = f"hook-{mark}"                   # and one of no known look
    secrets["METHOD"] = "LEAK" + mark.translate(str.maketrans("0123456789", "ghijklmnop")).upper()
    with socket.socket() as free:                   # a port nothing listens on: every push fails
        free.bind(("127.0.0.1", 0))
        closed_port = free.getsockname()[1]
    credentials = ({"TRACE_PUSH_TOKEN": secrets["PUSHTOKEN"], "TRACE_PUSH_ENDPOINT":
                    f"http://127.0.0.1:{closed_port}/in?key={secrets['URLPASSWORD']}"} if level == "info" else
                   {"TRACE_PUSH_ENDPOINT": f"http://agent:{secrets['URLPASSWORD']}@127.0.0.1:{closed_port}/in"})
    node = run({"TRACE_LOG_LEVEL": level, "TRACE_INGEST_TOKEN": secrets["INGESTTOKEN"],
                "TRACE_PUSH_INTERVAL": "100ms", "TRACE_PUSH_RETRIES": "1", "TRACE_PUSH_BACKOFF_BASE": "10ms",
                **credentials})
    auth = {"Authorization": f"Bearer {secrets['INGESTTOKEN']}"}
    assert node.post("/v1/traces", trace(input_text=secrets["INPUT"], output_text=secrets["OUTPUT"],
                                         metadata={"note": secrets["META"]}), headers=auth).status == 202
    assert node.post("/v1/errors", {"error_type": "crash", "message": secrets["MESSAGE"],
                                    "stack_trace": secrets["STACK"]}, headers=auth).status == 202
    assert node.post("/v1/traces", trace(status=secrets["REFUSEDFIELD"]), headers=auth).status == 400
    assert node.post("/v1/traces", "{" + secrets["BADJSON"], headers=auth).status == 400
    assert node.post("/v1/traces", trace(), headers={"Authorization": f"Bearer {secrets['WRONGTOKEN']}"}
                     ).status == 401
    assert node.request("GET", f"/v1/{secrets['PATHKEY']}", headers=auth).status == 404
    assert node.request("POST", f"/hooks/{secrets['PATHTOKEN']}/in", headers=auth).status == 404
    assert node.request(secrets["METHOD"], "/v1/traces", headers=auth).status == 405   # a word as a method
    node.wait_persisted(2)
    failed = node.wait_log(lambda e: e.get("message") == "push cycle failed")
    assert "refused" in failed["error"].lower()        # the push really ran, and failed, and said so
    assert node.stop() == 0
    node.wait_log(lambda e: e.get("message") == "stopped")
    out = "\n".join(json.dumps(line) for line in node.lines) + "".join(node.stderr)
    assert [name for name, value in secrets.items() if value in out] == []
    stored = json.dumps(node.rows("llm_traces") + node.rows("error_events"))
    assert all(secrets[n] in stored for n in ("INPUT", "OUTPUT", "MESSAGE", "STACK", "META"))


def test_a_secret_in_the_push_urls_query_stays_out_of_a_debug_log(run: Callable[..., Otrace],
                                                                    receiver: Receiver) -> None:
    """At debug level too: urllib3's own debug lines name each request's path and query."""
    secret = f"key-{uuid.uuid4().hex[:12]}"
    node = run(push_env(receiver, TRACE_LOG_LEVEL="debug",
                        TRACE_PUSH_ENDPOINT=f"{receiver.url}?api_key={secret}"))
    wait_synced(node, post_some(node, 1))
    assert receiver.requests[0]["path"].endswith(f"?api_key={secret}")     # the receiver got it
    assert node.stop() == 0
    assert secret not in "\n".join(json.dumps(line) for line in node.lines) + "".join(node.stderr)


def test_pyz_serves_on_a_bare_interpreter(tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """make pyz builds one file that a python3 with no site-packages at all (-I -S) runs: --help, a
    real serve that stores traces, OTLP protobuf (protobuf's compiled extension loaded from the shiv
    root) and host samples (its own RSS read from /proc) and prices them from the prices.json it
    carries, and a report."""
    subprocess.run(["make", "-s", "pyz"], cwd=HERE, check=True, capture_output=True, timeout=240)
    pyz = HERE / "dist" / "otrace.pyz"
    with zipfile.ZipFile(pyz) as packed:                       # otrace's licence with it, the table's too
        assert {"site-packages/LICENSE", "site-packages/prices.LICENSE"} <= set(packed.namelist())
    bare = [sys._base_executable, "-I", "-S"]         # the interpreter under the venv, nothing installed
    shiv_root = tmp_path / "shiv"
    clean_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHIV_ROOT": str(shiv_root)}
    helped = subprocess.run([*bare, str(pyz), "--help"], env=clean_env, capture_output=True, text=True,
                            timeout=60, check=True)
    assert "TRACE_DB_PATH" in helped.stdout
    node = run({"SHIV_ROOT": str(shiv_root), "TRACE_METRICS_INTERVAL": "100ms"}, command=[*bare, str(pyz)])
    priced = trace(provider="openai", model="gpt-4o", prompt_tokens=1_000, completion_tokens=100)
    ids = node.post("/v1/traces", [trace(), trace(), priced]).json["trace_ids"]
    span = chat_span("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331",
                     **{"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"})
    otlp = node.post("/v1/traces", otlp_message("/v1/traces", spans_body(span)).SerializeToString(),
                     headers=PROTOBUF)
    assert (otlp.status, otlp.headers["content-type"]) == (200, "application/x-protobuf")
    maps = Path(f"/proc/{node.proc.pid}/maps").read_text()
    assert "_upb" in maps and str(shiv_root) in maps           # the compiled decoder, from the pyz
    wait_until(lambda: len(node.query("SELECT 1 FROM system_metrics WHERE self_rss_bytes > 0")) > 0,
               what="a host sample with self_rss_bytes")
    assert node.stop() == 0
    assert {r[0] for r in node.query("SELECT trace_id FROM llm_traces")} == {
        *ids, "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"}
    assert cost_columns(node, priced["trace_id"])[:2] == (0.0035, "computed")
    done = subprocess.run([*bare, str(pyz), "report", "--db", str(node.db_path), "--json", "--since",
                           "2026-01-01"], env=clean_env,          # the span's own time is a fixed day
                          capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout)["calls"]["totals"]["calls"] == 4


# --------------------------------------------------------------------------------------------- fuzz


# Hostile and broken clients against a real otrace: fuzzed bodies, slow and half-closed sockets, a
# slowloris crowd, and what an attacker on the machine (or its network) could get at.

FUZZ_TOKEN = "fuzz-token-7f3a"


FUZZ_MAX_BODY, FUZZ_MAX_EVENTS = 64 * 1024, 4


FUZZ_ENV = {"TRACE_INGEST_TOKEN": FUZZ_TOKEN, "TRACE_MAX_BODY_BYTES": str(FUZZ_MAX_BODY),
            "TRACE_MAX_EVENTS": str(FUZZ_MAX_EVENTS), "TRACE_MAX_TEXT_BYTES": "1KiB"}


# Every status otrace answers a request with (refuse, reply and send_error in otrace.py), but 414 and
# 431, which only an over-long request line or header section gets, and this fuzz sends neither.
ANSWERS = {202, 400, 401, 404, 405, 411, 413, 415, 503}


TABLE_OF = {"/v1/traces": otrace.TRACES, "/v1/errors": otrace.ERRORS}


class Raw(str):
    """JSON text that goes into a body as it is: NaN, Infinity, a lone surrogate escape, a deep nest."""


def to_json(value: Any) -> str:
    """The JSON text of `value`, with every Raw inside it written verbatim."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(to_json, value)) + "]"
    return json.dumps(value)


def nested(depth: int) -> str:
    return '{"m": ' * depth + "1" + "}" * depth


# values of any type, and the nastiest bits of JSON text
NASTY = st.sampled_from([
    Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("-0"), Raw('"\\ud800"'),
    Raw('"tail \\udfff"'), Raw('"\\ud83d\\ude00"'), Raw("9" * 5000), Raw("[" * 10_000 + "]" * 10_000),
    Raw("[" * 10_000), Raw('"' + "x" * 70_000 + '"'),
]) | st.integers(900, 1000).map(lambda depth: Raw(nested(depth)))   # around json's recursion limit


HUGE = st.sampled_from([10**30, -(10**30), -1, 2**53 - 1, 2**53, 2**63, 2**64, -(2**63) - 1, 1e308, -0.0])


SCALARS = (st.none() | st.booleans() | st.integers() | HUGE | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=20))


WILD = st.recursive(SCALARS | NASTY, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


# values each field accepts
NAME_OK = st.text(max_size=40).map("n".__add__)


TEXT_OK = st.text(max_size=60) | st.just("é" * 700) | st.sampled_from(
    [Raw('"\\ud800 lone"'), Raw('"\\udfff"'), Raw('"pair \\ud83d\\ude00"')])


MESSAGE_OK = st.text(max_size=60).map("m".__add__) | st.just(Raw('"lone \\ud800"'))


COUNT_OK = st.integers(0, otrace.MAX_INT)


AMOUNT_OK = st.floats(0, 1e9) | st.integers(0, 10**6)


TRACE_ID_OK = st.uuids().map(str) | st.text(st.characters(categories=("L", "N", "P", "S")), min_size=1,
                                             max_size=otrace.MAX_TRACE_ID_CHARS)


CREATED_OK = st.integers(otrace.SECONDS_NOT_MS, otrace.MAX_UNIX_MS) | st.datetimes(
    datetime(1970, 1, 2), datetime(9999, 12, 30),
    timezones=st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))).map(datetime.isoformat)


METADATA_OK = st.dictionaries(st.text(max_size=8), SCALARS, max_size=4)


OPTIONAL_COMMON = {"trace_id": TRACE_ID_OK, "created_at": CREATED_OK, "session_id": NAME_OK,
                   "metadata": METADATA_OK | METADATA_OK.map(json.dumps), "colour": SCALARS}


VALID_EVENT = {
    "/v1/traces": st.fixed_dictionaries({"provider": NAME_OK, "model": NAME_OK}, optional={
        "input_text": TEXT_OK, "output_text": TEXT_OK, "prompt_tokens": COUNT_OK,
        "completion_tokens": COUNT_OK, "total_tokens": COUNT_OK, "cache_read_tokens": COUNT_OK,
        "cache_write_tokens": COUNT_OK, "reasoning_tokens": COUNT_OK, "cost_usd": AMOUNT_OK,
        "latency_ms": AMOUNT_OK, "ttft_ms": AMOUNT_OK, "status": st.sampled_from(["ok", "error"]),
        "error_type": NAME_OK, "finish_reason": NAME_OK, **OPTIONAL_COMMON}).filter(
            lambda e: e.get("prompt_tokens") is None   # prompt_tokens counts the cache's tokens
            or (e.get("cache_read_tokens") or 0) + (e.get("cache_write_tokens") or 0) <= e["prompt_tokens"]),
    "/v1/errors": st.fixed_dictionaries({"error_type": st.sampled_from(otrace.ERROR_TYPES),
                                         "message": MESSAGE_OK}, optional={
        "category": st.sampled_from(otrace.ERROR_CATEGORIES), "severity": st.sampled_from(otrace.SEVERITIES),
        "stack_trace": TEXT_OK, "provider": NAME_OK, "model": NAME_OK, **OPTIONAL_COMMON}),
}


NEVER_UTF8 = [b"\xff", b"\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]


@st.composite
def fuzz_event(draw: st.DrawFn, path: str) -> tuple[dict[str, Any], bool]:
    """An event for `path`, and whether it is valid: a valid one, or one with wild fields or without
    a required one (which may still happen to be valid: then it is not known to be)."""
    event = draw(VALID_EVENT[path])
    if draw(st.booleans()):
        return event, True
    fields = sorted(TABLE_OF[path].fields | {"colour", "synced", "id"})
    for field in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True)):
        event[field] = draw(WILD)
    for field in draw(st.sets(st.sampled_from(sorted(event)), max_size=1)):
        del event[field]
    return event, False


@st.composite
def fuzz_body(draw: st.DrawFn, path: str) -> tuple[str, bytes, int | None, list[dict[str, Any]] | None]:
    """(kind, body, the status it must get if the request is otherwise in order or None when any
    answer will do, the events when they are all valid)."""
    kind = draw(st.sampled_from(["event", "array", "json", "bytes", "not-utf8", "nest"]))
    if kind in ("event", "array"):
        drawn = draw(st.lists(fuzz_event(path), max_size=FUZZ_MAX_EVENTS + 2)) if kind == "array" \
            else [draw(fuzz_event(path))]
        events = [event for event, _ in drawn]
        valid = all(ok for _, ok in drawn)
        text = to_json(events if kind == "array" else events[0])
        if not events:
            return kind, text.encode(), 400, None
        if valid:
            return kind, text.encode(), 413 if len(events) > FUZZ_MAX_EVENTS else 202, events
        return kind, text.encode(), None, None
    if kind == "json":
        return kind, to_json(draw(WILD)).encode(), None, None
    if kind == "bytes":
        return kind, draw(st.binary(max_size=300)), None, None
    if kind == "not-utf8":
        text = to_json(draw(VALID_EVENT[path])).encode()
        at = draw(st.integers(0, len(text)))
        return kind, text[:at] + draw(st.sampled_from(NEVER_UTF8)) + text[at:], 400, None
    depth = draw(st.integers(1, 20_000))          # [[[...]]] at any depth, closed or not: never an event
    return kind, b"[" * depth + b"]" * draw(st.sampled_from([0, depth])), 400, None


def exchange(port: int, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request(method, path, body=body, headers=headers)   # otrace may answer (413, 401, ...)
        resp = conn.getresponse()                                     # and hang up before the body is in
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    except (OSError, http.client.HTTPException) as exc:
        raise AssertionError(f"{method} {path} got no answer: {exc!r}") from None
    finally:
        conn.close()


def test_fuzzed_requests_get_a_4xx_naming_the_problem_or_a_202_that_is_kept(run: Callable[..., Otrace]
                                                                           ) -> None:
    """One otrace for every example. Each gets a status otrace documents (never a 5xx but a full
    queue's 503), the very status its envelope calls for, a JSON error naming the field or problem,
    and /health still answers; every event that got a 202 is in the database at the end."""
    node = run(FUZZ_ENV)
    accepted: dict[str, list[str]] = {"/v1/traces": [], "/v1/errors": []}

    @settings(max_examples=1000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(st.data())
    def example(data: st.DataObject) -> None:
        # a request in order but for its body, or one with a single part of its envelope wrong
        wrong = data.draw(st.sampled_from([None] * 7 + ["path", "method", "auth", "content type"]), "wrong")
        path = data.draw(st.sampled_from(["/v1/traces", "/v1/errors", "/v1/traces?x=1"] if wrong != "path"
                                         else ["/v1/trace", "/v1/errors/", "/V1/TRACES", "/health"]), "path")
        route = path.split("?")[0]
        method = "POST" if wrong != "method" else data.draw(st.sampled_from(["GET", "PUT", "DELETE"]))
        kind, body, must, events = data.draw(fuzz_body(route if route in TABLE_OF else "/v1/traces"),
                                             "body")
        auth = data.draw(st.sampled_from([f"Bearer {FUZZ_TOKEN}", f"bearer {FUZZ_TOKEN}"] if wrong != "auth"
                                         else [None, "Bearer wrong", f"Basic {FUZZ_TOKEN}",
                                               f"Bearer {FUZZ_TOKEN}x", "Bearer ", FUZZ_TOKEN]), "auth")
        content_type = data.draw(st.sampled_from(
            ["application/json", "application/json; charset=utf-8", "application/problem+json", None]
            if wrong != "content type" else ["text/plain", "application/x-www-form-urlencoded"]), "type")
        headers = {name: value for name, value in (("Authorization", auth), ("Content-Type", content_type))
                   if value is not None}
        # the envelope is judged in this order, before the body is read
        if route not in otrace.ROUTES:
            must = 404
        elif method not in otrace.ROUTES[route]:
            must = 405
        elif wrong == "auth":
            must = 401
        elif wrong == "content type":
            must = 415
        elif len(body) > FUZZ_MAX_BODY:
            must = 413
        resp = exchange(node.port, method, path, body, headers)
        assert resp.status in ANSWERS, resp
        if must is not None and not (must == 202 and resp.status == 503):
            assert resp.status == must, (kind, resp)
        if resp.status == 202:
            answer = resp.json
            ids = answer["trace_ids"]
            assert answer["accepted"] == len(ids) >= 1 and all(isinstance(i, str) and i for i in ids)
            if events is not None:
                assert len(ids) == len(events)
                assert [e.get("trace_id", i) for e, i in zip(events, ids, strict=True)] == ids
            assert set(answer.get("ignored_fields", [])) <= {"colour", "synced", "id"}
            accepted[route] += ids
        else:
            assert resp.headers["content-type"] == "application/json"
            error = resp.json
            assert isinstance(error["error"], str) and error["error"].strip(), resp
            if error["field"] is not None:                  # names a field of this endpoint first
                assert error["field"] in TABLE_OF[route].fields and error["error"].startswith(
                    error["field"] + " "), resp
            if "index" in error:
                assert body.lstrip().startswith(b"[") and 0 <= error["index"] < FUZZ_MAX_EVENTS, resp
            needle = {401: "token", 404: "no such path", 405: "not allowed", 411: "Content-Length",
                      415: "content type", 503: "retry later"}.get(resp.status)
            if resp.status == 413:
                needle = "TRACE_MAX_BODY_BYTES" if len(body) > FUZZ_MAX_BODY else "TRACE_MAX_EVENTS"
            elif resp.status == 400 and kind == "not-utf8":
                needle = "not UTF-8"
            assert needle is None or needle in error["error"], resp
            if resp.status == 401:
                assert resp.headers["www-authenticate"] == "Bearer"
        assert node.request("GET", "/health").status == 200, "otrace stopped answering"

    example()
    total = sum(map(len, accepted.values()))
    assert total >= 20, "too few examples got through to be worth checking"
    health = node.wait_persisted(total, timeout=20)
    assert health["events_received"] == total and health["events_dropped"] == 0
    for route, ids in accepted.items():
        stored = {t for (t,) in node.query(f"SELECT trace_id FROM {TABLE_OF[route].name}")}
        assert set(ids) <= stored, f"{len(set(ids) - stored)} accepted {route} events not stored"
    assert not node.logs("request failed"), node.logs("request failed")[0]


def test_metadata_nested_around_the_parsers_limit_is_always_answered(svc: Otrace) -> None:
    """Depth by depth across json's recursion limit, as an object and as a string holding one: each
    gets a 202, or a 400 naming the problem; none is left without an answer."""
    statuses = []
    for path, base in (("/v1/traces", '"provider": "p", "model": "m"'),
                       ("/v1/errors", '"error_type": "crash", "message": "m"')):
        for depth in range(900, 1000):
            for metadata in (nested(depth), json.dumps(nested(depth))):
                body = "{" + base + ', "metadata": ' + metadata + "}"
                resp = exchange(svc.port, "POST", path, body.encode(), {"Content-Type": "application/json"})
                assert resp.status in (202, 400), (path, depth, resp)
                if resp.status == 400:
                    assert "deeply" in resp.json["error"] or resp.json["field"] == "metadata", resp
                statuses.append(resp.status)
    assert {202, 400} <= set(statuses)       # the sweep does straddle the limit
    svc.wait_persisted(statuses.count(202))
    assert not svc.logs("request failed")


# ------------------------------------------------------------------------ prices, llm metrics, report
# Expected costs are worked out by hand from prices.json (the arithmetic is beside each); when `make
# prices` brings a new price for a model used here, its test fails: read the diff, update the number.

PRICES_HEADER = json.loads(otrace.PRICES_FILE.read_text().split("\n", 1)[0]
                           .removeprefix('{"header":').removesuffix(","))
LABEL = f"{PRICES_HEADER['source']} {PRICES_HEADER['version']}"
NOV_30 = datetime(2026, 11, 30, 12, tzinfo=UTC)


def unix_ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


@pytest.fixture(scope="module")
def prices() -> otrace.PriceTable:
    return otrace.PriceTable.load(otrace.PRICES_FILE)


def cost(table: otrace.PriceTable, provider: str, model: str, inp: int | None, out: int | None, *,
         read: int | None = None, write: int | None = None, at: datetime = NOV_30) -> otrace.Priced | None:
    return table.cost(provider, model, input_tokens=inp, output_tokens=out, cache_read_tokens=read,
                      cache_write_tokens=write, at_ms=unix_ms(at))


def test_the_vendored_price_file_names_its_source_version_date_and_license() -> None:
    assert PRICES_HEADER["source"] == "genai-prices" and PRICES_HEADER["license"] == "MIT"
    assert PRICES_HEADER["copyright"].startswith("Copyright (c) Pydantic")
    assert PRICES_HEADER["currency"] == "USD" and PRICES_HEADER["vendored"]
    assert (HERE / PRICES_HEADER["license_file"]).read_text().startswith("The MIT License")


def test_a_dated_gpt_4o_with_cache_reads(prices: otrace.PriceTable) -> None:
    # openai/gpt-4o: input 2.5, output 10, cache_read 1.25 per MTok; no cache write price.
    # 6,000 fresh x 2.5 + 4,000 read x 1.25 + 1,000 out x 10 = 15,000 + 5,000 + 10,000 = 30,000 / 1e6
    priced = cost(prices, "openai", "gpt-4o-2024-08-06", 10_000, 1_000, read=4_000)
    assert priced == otrace.Priced(pytest.approx(0.03, rel=1e-12), f"{LABEL}: openai/gpt-4o")
    assert cost(prices, "openai", "gpt-4o", 10, 1, read=20) is None      # more read than input: counts wrong


def test_cache_writes_without_their_own_price_cost_the_input_price(prices: otrace.PriceTable) -> None:
    # gpt-4o has no cache_write_mtok: the 500 written stay input tokens. 10,000 x 2.5 = 25,000 / 1e6
    assert cost(prices, "openai", "gpt-4o", 10_000, 0, read=0, write=500).cost_usd == pytest.approx(0.025)


def test_a_dated_claude_in_any_spelling_with_cache_reads_and_writes(prices: otrace.PriceTable) -> None:
    # anthropic/claude-3-5-sonnet: input 3, output 15, cache_read 0.3, cache_write 3.75. 10,000 input =
    # 5,000 fresh + 2,000 read + 3,000 written: 15,000 + 600 + 11,250 + 1,000 out x 15 = 41,850 / 1e6
    for provider in ("Anthropic", "anthropic", " ANTHROPIC "):
        priced = cost(prices, provider, "claude-3-5-sonnet-20241022", 10_000, 1_000, read=2_000, write=3_000)
        assert priced == otrace.Priced(pytest.approx(0.04185, rel=1e-12),
                                       f"{LABEL}: anthropic/claude-3-5-sonnet")


def test_a_tiered_price_applies_to_all_tokens_once_input_exceeds_its_start(prices: otrace.PriceTable) -> None:
    # google/gemini-2.5-pro: input 1.25 (2.5 above 200,000 input tokens), output 10 (15), read 0.125 (0.25)
    at_start = cost(prices, "gcp.gemini", "gemini-2.5-pro", 200_000, 1_000)
    assert at_start.cost_usd == pytest.approx((200_000 * 1.25 + 1_000 * 10) / 1e6)
    # 200,001 input, 50,000 of them read: 150,001 x 2.5 + 50,000 x 0.25 + 1,000 x 15 = 402,502.5
    above = cost(prices, "gcp.gemini", "gemini-2.5-pro", 200_001, 1_000, read=50_000)
    assert above == otrace.Priced(pytest.approx(0.4025025, rel=1e-12), f"{LABEL}: google/gemini-2.5-pro")


def test_a_price_change_on_a_start_date(prices: otrace.PriceTable) -> None:
    # openai/o3: 10 / 40 per MTok, then 2 / 8 from 2025-06-10 (a UTC day)
    before = datetime(2025, 6, 9, 23, 59, 59, 999_000, tzinfo=UTC)
    assert cost(prices, "openai", "o3", 1_000, 1_000, at=before).cost_usd == pytest.approx(0.05)
    since = datetime(2025, 6, 10, tzinfo=UTC)
    assert cost(prices, "openai", "o3-2025-04-16", 1_000, 1_000, at=since).cost_usd == pytest.approx(0.01)


def test_a_price_in_a_daily_window(prices: otrace.PriceTable) -> None:
    # deepseek/deepseek-chat: 0.27 / 1.1 from 00:30 to 16:30 UTC, else its first entry, 0.135 / 0.55
    day = datetime(2026, 11, 30, tzinfo=UTC)

    def at(hours: float) -> float:
        return cost(prices, "deepseek", "deepseek-chat", 1_000_000, 1_000_000,
                    at=day + timedelta(hours=hours)).cost_usd

    assert [at(12), at(0.5), at(16.5), at(20), at(0.25)] == pytest.approx([1.37, 1.37, 0.685, 0.685, 0.685])


def test_a_price_per_request(prices: otrace.PriceTable) -> None:
    # perplexity/sonar: 1 / 1 per MTok and 12 per 1000 requests: 0.001 + 0.001 + 0.012
    assert cost(prices, "perplexity", "sonar", 1_000, 1_000).cost_usd == pytest.approx(0.014)


@pytest.mark.parametrize(("provider", "model", "ref"), [
    ("gcp.vertex_ai", "claude-sonnet-4@20250514", "google/claude-4-sonnet"),
    ("aws.bedrock", "us.anthropic.claude-3-5-sonnet-20241022-v2:0",
     "aws/regional.anthropic.claude-3-5-sonnet-20241022-v2:0"),
    ("azure.ai.openai", "gpt-4o", "openai/gpt-4o"),          # azure has no gpt-4o: its fallback, openai
    ("x_ai", "grok-4", "x-ai/grok-4-0709"),
    ("xai", "grok-4", "x-ai/grok-4-0709"),
    ("mistral_ai", "mistral-large-latest", "mistral/mistral-large"),
    ("OpenAI", "gpt-4o-mini", "openai/gpt-4o-mini"),
    ("openai", "gpt-4o-20240806", "openai/gpt-4o"),          # LiteLLM's compact date
    ("litellm", "anthropic/claude-3-haiku-20240307", "anthropic/claude-3-haiku"),
    ("", "claude-opus-4-1", "anthropic/claude-opus-4-1"),    # no provider: the first model_match
])
def test_provider_spellings_and_fallbacks_find_their_price(prices: otrace.PriceTable, provider: str,
                                                           model: str, ref: str) -> None:
    assert cost(prices, provider, model, 1_000, 100).ref == f"{LABEL}: {ref}"


@pytest.mark.parametrize(("provider", "model"), [
    ("openai", "gpt-nonexistent-9"), ("ibm.watsonx.ai", "granite-3-8b-instruct"), ("nope", "gpt-4o"),
    ("anthropic", "gpt-4o"), ("", "totally-unknown"),
])
def test_an_unknown_provider_or_model_has_no_price(prices: otrace.PriceTable, provider: str,
                                                   model: str) -> None:
    assert cost(prices, provider, model, 1_000, 100) is None


def test_counts_that_cannot_be_priced_have_no_price(prices: otrace.PriceTable) -> None:
    assert cost(prices, "openai", "whisper-1", 1_000, 100) is None            # priced per audio minute
    assert cost(prices, "openai", "gpt-4o", None, None) is None               # nothing counted
    assert cost(prices, "openai", "gpt-4o", 100, 10, read=200) is None        # more cache than input
    assert cost(prices, "openai", "gpt-4o", None, 10, read=5) is None         # cache without input
    assert cost(prices, "openai", "gpt-4o", None, 1_000).cost_usd == pytest.approx(0.01)   # as genai-prices


def test_lookups_are_memoized_and_the_memo_is_bounded() -> None:
    table = otrace.PriceTable.load(otrace.PRICES_FILE)
    first = table.find("openai", "gpt-4o")
    assert table.find("openai", "gpt-4o") is first
    for n in range(otrace.PRICE_MEMO + 10):
        table.find("nope", f"model-{n}")
        assert len(table._memo) <= otrace.PRICE_MEMO


def test_a_users_price_file_wins_over_the_vendored_one(prices: otrace.PriceTable, tmp_path: Path) -> None:
    user = tmp_path / "my-prices.json"
    user.write_text(json.dumps({"providers": [
        {"id": "openai", "models": [
            {"id": "gpt-4o-negotiated",
             "match": {"or": [{"equals": "gpt-4o"}, {"equals": "gpt-4o-2024-08-06"}]},
             "prices": {"input_mtok": 1, "output_mtok": 4}}]},
        {"id": "mycorp", "provider_match": {"contains": "mycorp"}, "models": [
            {"id": "house-model", "match": {"starts_with": "house-"},
             "prices": {"input_mtok": 0.5, "output_mtok": 1}}]},
    ]}, indent=2))
    both = otrace.PriceTable.load(user, otrace.PRICES_FILE)
    # 1,000 x 1 + 1,000 x 4 = 5,000 / 1e6 instead of 1,000 x 2.5 + 1,000 x 10
    assert cost(both, "openai", "gpt-4o-2024-08-06", 1_000, 1_000) == otrace.Priced(
        pytest.approx(0.005), "my-prices.json: openai/gpt-4o-negotiated")
    assert cost(both, "azure.ai.openai", "gpt-4o", 1_000, 1_000).cost_usd == pytest.approx(0.005)
    mini = cost(prices, "openai", "gpt-4o-mini", 1_000, 1_000)
    assert cost(both, "openai", "gpt-4o-mini", 1_000, 1_000) == mini
    assert cost(both, "MyCorp-EU", "house-7b", 2_000, 1_000).cost_usd == pytest.approx(0.002)
    assert cost(prices, "openai", "gpt-4o", 1_000, 1_000).cost_usd == pytest.approx(0.0125)


def test_a_price_files_header_names_its_refs_and_a_bad_file_fails_at_load(tmp_path: Path) -> None:
    user = tmp_path / "p.json"
    o3 = {"id": "o3", "match": {"equals": "o3"}, "prices": {"input_mtok": 1}}
    user.write_text(json.dumps({"header": {"source": "acme contract", "version": "7"},
                                "providers": [{"id": "openai", "models": [o3]}]}))
    ref = otrace.PriceTable.load(user, otrace.PRICES_FILE).find("openai", "o3")[0]
    assert ref == "acme contract 7: openai/o3"
    glob = {"id": "x", "match": {"glob": "x*"}, "prices": {}}
    unknown_price = {"id": "x", "match": {"equals": "x"}, "prices": {"input_usd": 1}}
    for bad in ({"providers": [{"id": "openai", "models": [glob]}]},
                {"providers": [{"id": "openai", "models": [unknown_price]}]}, {"models": []}):
        user.write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            otrace.PriceTable.load(user)


def test_any_json_layout_reads_the_same_and_a_cut_file_fails(prices: otrace.PriceTable,
                                                             tmp_path: Path) -> None:
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(json.loads(otrace.PRICES_FILE.read_text()), indent=1))
    again = otrace.PriceTable.load(pretty)
    for provider, model in (("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4-5"),
                            ("deepseek", "deepseek-chat")):
        assert cost(again, provider, model, 300_000, 10, read=1_000).cost_usd == cost(
            prices, provider, model, 300_000, 10, read=1_000).cost_usd
    cut = tmp_path / "cut.json"
    cut.write_text("".join(otrace.PRICES_FILE.read_text().splitlines(keepends=True)[:500]))
    with pytest.raises(ValueError):
        otrace.PriceTable.load(cut)


def test_prices_agree_with_genai_prices_own_calc_price(prices: otrace.PriceTable) -> None:
    """Every model of the table, by the names its clauses give, against genai-prices itself (where that
    package is installed; it is not a dependency of otrace)."""
    genai = pytest.importorskip("genai_prices")
    import warnings
    warnings.simplefilter("ignore")
    data = json.loads(otrace.PRICES_FILE.read_text())
    usages = [(1_000, 500, 0, 0), (300_000, 1_000, 100_000, 50_000), (5_000, 200, 4_000, None),
              (250_000, 2_000, 0, 240_000)]
    times = [datetime(2024, 3, 1, 3, tzinfo=UTC), datetime(2025, 9, 10, 17, tzinfo=UTC),
             NOV_30, datetime(2027, 2, 1, 8, tzinfo=UTC)]

    def names(clause: dict[str, Any]) -> list[str]:
        [(kind, operand)] = clause.items()
        if kind in ("or", "and"):
            return [name for item in operand for name in names(item)]
        return [operand] if kind in ("equals", "starts_with") else []

    compared = 0
    pairs = [(p["id"], name) for p in data["providers"] for m in p["models"]
             for name in {m["id"], *names(m["match"])}]
    for n, (provider, model) in enumerate(pairs):
        inp, out, read, write = usages[n % len(usages)]
        when = times[n // len(usages) % len(times)]
        mine = cost(prices, provider, model, inp, out, read=read, write=write, at=when)
        try:
            theirs = genai.calc_price(genai.Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=read,
                                                  cache_write_tokens=write), model, provider_id=provider,
                                      genai_request_timestamp=when)
        except (LookupError, ValueError):
            assert mine is None, (provider, model)
            continue
        if mine is None:       # priced in units otrace does not count: genai-prices says 0 for these tokens
            assert theirs.total_price == 0, (provider, model)
            continue
        expected = pytest.approx(float(theirs.total_price), rel=1e-9, abs=1e-15)
        assert mine.cost_usd == expected, (provider, model)
        assert mine.ref.endswith(f"/{theirs.model.id}")
        compared += 1
    assert compared > 3000


def cost_columns(node: Otrace, trace_id: str) -> tuple:
    return node.query("SELECT cost_usd, cost_source, computed_cost_usd, price_ref FROM llm_traces "
                      "WHERE trace_id = ?", trace_id)[0]


def test_a_call_with_tokens_and_no_cost_is_priced_at_ingest_and_a_reported_cost_kept(svc: Otrace) -> None:
    events = [
        trace(provider="openai", model="gpt-4o", prompt_tokens=1_000, completion_tokens=100),
        trace(provider="openai", model="gpt-4o", prompt_tokens=2_000, completion_tokens=200,
              cache_read_tokens=1_000, cost_usd=0.05),
        trace(provider="mystery", model="unknown-9", prompt_tokens=10, completion_tokens=1),
        trace(provider="openai", model="gpt-4o", prompt_tokens=None, completion_tokens=None),
    ]
    assert svc.post("/v1/traces", events).status == 202
    svc.wait_persisted(len(events))
    ids = [e["trace_id"] for e in events]
    ref = f"{LABEL}: openai/gpt-4o"
    assert cost_columns(svc, ids[0]) == (0.0035, "computed", 0.0035, ref)          # 1,000 x 2.5 + 100 x 10
    assert cost_columns(svc, ids[1]) == (0.05, "reported", 0.00575, ref)   # 2,500 + 1,000 x 1.25 + 200 x 10
    assert cost_columns(svc, ids[2]) == (None, None, None, None)                  # no price: never guessed
    assert cost_columns(svc, ids[3]) == (None, None, None, None)                  # nothing counted
    assert svc.health()["llm_calls"]["prices"] == LABEL


def test_trace_prices_overrides_the_table_and_a_bad_file_is_exit_2(tmp_path: Path, run: Callable[..., Otrace]
                                                                   ) -> None:
    user = tmp_path / "contract.json"
    user.write_text(json.dumps({"header": {"source": "contract", "version": "2026"}, "providers": [
        {"id": "openai", "models": [{"id": "gpt-4o", "match": {"equals": "gpt-4o"},
                                     "prices": {"input_mtok": 1, "output_mtok": 2}}]}]}))
    node = run({"TRACE_PRICES": str(user)})
    event = trace(provider="openai", model="gpt-4o", prompt_tokens=1_000, completion_tokens=1_000)
    assert node.post("/v1/traces", event).status == 202
    node.wait_persisted(1)
    assert cost_columns(node, event["trace_id"]) == (0.003, "computed", 0.003, "contract 2026: openai/gpt-4o")
    model = '{"providers": [{"id": "x", "models": [{"id": "m", "match": %s, "prices": %s}]}]}'
    for content, needle in (("{not json", "Expecting property name"), (None, "No such file"),
                            ('{"providers": [{"models": []}]}', "a provider needs an id"),
                            (model % ('{"regex": "("}', "{}"), "unterminated subpattern"),
                            (model % ('{"or": [' * 17 + '{"equals": "m"}' + "]}" * 17, "{}"),   # would
                             "nests or/and at most 16 deep"),                   # overflow at ingest
                            (model % ('{"equals": "m"}', '{"input_mtok": 1%s}' % ("0" * 400)), "too large"),
                            ('{"providers": [{"id": "x", "models": 5}]}', "bytes-like"),
                            ('{"header": [1], "providers": []}', "no attribute"),
                            ("[" * 100_000 + "]" * 100_000, "recursion")):
        bad = tmp_path / "bad.json"
        bad.unlink(missing_ok=True)
        if content is not None:
            bad.write_text(content)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")}
        done = subprocess.run(START, env={**env, "TRACE_PRICES": str(bad),
                                          "TRACE_DB_PATH": str(tmp_path / "x.db")},
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2 and "TRACE_PRICES=" in done.stderr and needle in done.stderr, done.stderr
        assert not (tmp_path / "x.db").exists()


def metric_samples(node: Otrace) -> dict[str, float]:
    text = node.request("GET", "/metrics").body.decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def pair(provider: str, model: str, **more: str) -> str:
    return otrace.prometheus_labels(gen_ai_provider_name=provider, gen_ai_request_model=model, **more)


@needs_gateway_log
def test_metrics_count_what_the_writer_stored_per_model_and_match_the_rows(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    log = tmp_path / "gateway.log"
    log.write_bytes(b"".join(gateway_lines()))
    node = run({"TRACE_LOG_PATH": str(log), "TRACE_LOG_START": "beginning"})
    events = [trace(provider="openai", model="gpt-4o", prompt_tokens=1_000 * n, completion_tokens=10 * n,
                    cache_read_tokens=n, latency_ms=30.0 * n, status="error" if n % 3 == 0 else "ok")
              for n in range(1, 8)]
    events += [trace(provider="anthropic", model="claude-sonnet-4-5", prompt_tokens=500, completion_tokens=50,
                     cost_usd=0.25, cache_write_tokens=100, latency_ms=90_000.0),
               trace(provider="mystery", model="m", prompt_tokens=5),
               trace(provider="mystery", model="m", prompt_tokens=None, completion_tokens=None,
                     total_tokens=40)]
    assert node.post("/v1/traces", events).status == 202
    assert node.post("/v1/traces", events[:3]).status == 202             # a retry: stored once, counted once
    errors = [{"error_type": "llm_error", "category": "rate_limit", "message": "429"}] * 2 + [
        {"error_type": "crash", "category": "oom_kill", "message": "killed"}]
    assert node.post("/v1/errors", errors).status == 202
    wait_until(lambda: node.query("SELECT count(*) FROM log_events")[0][0] == 30, what="the log's 30 events")
    wait_until(lambda: node.query("SELECT count(*) FROM llm_traces WHERE source = 'http'") == [(len(events),)]
               and node.query("SELECT count(*) FROM error_events WHERE source = 'http'") == [(3,)]
               and node.health()["events_duplicate"] == 3, what="every event stored")
    samples = metric_samples(node)
    rows = node.query("SELECT provider, model, count(*), sum(status = 'error'), total(prompt_tokens), "
                      "total(completion_tokens), total(cache_read_tokens), total(cache_write_tokens), "
                      "total(CASE WHEN cost_source = 'reported' THEN cost_usd END), "
                      "total(CASE WHEN cost_source = 'computed' THEN cost_usd END), "
                      f"sum(cost_source IS NULL AND {otrace.HAS_TOKENS_SQL}), count(latency_ms), "
                      "total(latency_ms / 1000) FROM llm_traces GROUP BY provider, model")
    assert {r[0] for r in rows} == {"openai", "anthropic", "mystery", "mock", "rlmock"}   # the log's too
    for provider, model, calls, failures, *tokens, reported, computed, unpriced, timed, seconds in rows:
        labels = pair(provider, model)
        assert samples[f"otrace_gen_ai_calls_total{labels}"] == calls
        assert samples[f"otrace_gen_ai_call_failures_total{labels}"] == failures
        for kind, n in zip(("input", "output", "cache_read", "cache_creation"), tokens, strict=True):
            typed = pair(provider, model, gen_ai_token_type=kind)
            assert samples[f"otrace_gen_ai_client_token_usage_total{typed}"] == n
        reported_labels = pair(provider, model, cost_source="reported")
        assert samples[f"otrace_gen_ai_cost_usd_total{reported_labels}"] == reported
        assert samples[f"otrace_gen_ai_cost_usd_total{pair(provider, model, cost_source='computed')}"] == \
            pytest.approx(computed, rel=1e-12)
        assert samples[f"otrace_gen_ai_unpriced_calls_total{labels}"] == unpriced
        assert samples[f"otrace_gen_ai_client_operation_duration_seconds_count{labels}"] == timed
        summed = samples[f"otrace_gen_ai_client_operation_duration_seconds_sum{labels}"]
        assert summed == pytest.approx(seconds)
    gpt = pair("openai", "gpt-4o")
    assert samples[f"otrace_gen_ai_calls_total{gpt}"] == 7
    assert samples[f"otrace_gen_ai_call_failures_total{gpt}"] == 2
    bucket = "otrace_gen_ai_client_operation_duration_seconds_bucket"
    buckets = {le: samples[bucket + pair("openai", "gpt-4o", le=le)]
               for le in ("0.02", "0.04", "0.08", "0.16", "0.32", "+Inf")}
    assert buckets == {"0.02": 0, "0.04": 1, "0.08": 2, "0.16": 5, "0.32": 7, "+Inf": 7}   # 30 ... 210 ms
    claude = pair("anthropic", "claude-sonnet-4-5", le="81.92")            # 90 s: over the last bound
    assert samples[bucket + claude] == 0
    assert samples[f"otrace_gen_ai_unpriced_calls_total{pair('mystery', 'm')}"] == 2   # a total alone too
    stored = node.query("SELECT error_type, category, count(*) FROM error_events GROUP BY 1, 2")
    for kind, category, n in stored:
        labels = otrace.prometheus_labels(error_type=kind, category=category)
        assert samples[f"otrace_error_events_total{labels}"] == n
    assert samples['otrace_error_events_total{error_type="llm_error",category="rate_limit"}'] >= 2
    for kind, n in node.query("SELECT kind, count(*) FROM log_events GROUP BY kind"):
        assert samples[f"otrace_log_events_total{otrace.prometheus_labels(kind=kind)}"] == n


def test_metrics_fold_models_past_the_cap_and_escape_their_names(run: Callable[..., Otrace]) -> None:
    node = run({"TRACE_METRICS_MAX_MODELS": "2"})
    odd = 'new\nline "quoted" back\\slash'
    events = [trace(provider="p", model=model, prompt_tokens=1) for model in ("a", odd, "c", "d", "a")]
    assert node.post("/v1/traces", events).status == 202
    node.wait_persisted(len(events))
    samples = metric_samples(node)
    calls = {name: n for name, n in samples.items() if name.startswith("otrace_gen_ai_calls_total")}
    assert calls == {f"otrace_gen_ai_calls_total{pair('p', 'a')}": 2,
                     'otrace_gen_ai_calls_total{gen_ai_provider_name="p",gen_ai_request_model='
                     '"new\\nline \\"quoted\\" back\\\\slash"}': 1,
                     f"otrace_gen_ai_calls_total{pair('other', 'other')}": 2}


# A database with known rows: every source, failures, computed and reported costs, two days (three in
# Europe/Berlin terms, where the 23:30 UTC call is already the next day), and what else the report reads.
REPORT_CALLS = [
    ("http", {"provider": "openai", "model": "gpt-4o", "prompt_tokens": 1_000, "completion_tokens": 100,
              "latency_ms": 100, "session_id": "s1", "created_at": "2026-11-02T10:00:00Z"}),   # 0.0035
    ("http", {"provider": "openai", "model": "gpt-4o", "prompt_tokens": 2_000, "completion_tokens": 200,
              "cache_read_tokens": 1_000, "cost_usd": 0.05, "latency_ms": 300, "session_id": "s1",
              "created_at": "2026-11-02T11:00:00Z"}),                  # reported; the table says 0.00575
    ("otlp", {"provider": "anthropic", "model": "claude-sonnet-4-20250514", "prompt_tokens": 10_000,
              "completion_tokens": 1_000, "cache_read_tokens": 2_000, "cache_write_tokens": 3_000,
              "latency_ms": 2_000, "session_id": "s2", "created_at": "2026-11-02T23:30:00Z"}),  # 0.04185
    ("openclaw_session", {"provider": "mock", "model": "mock-model", "prompt_tokens": 5_000,
                          "completion_tokens": 300, "total_tokens": 5_300, "cache_read_tokens": 4_096,
                          "cache_write_tokens": 0, "cost_usd": 0.0084408, "session_id": "s3",
                          "created_at": "2026-11-03T09:00:00Z"}),     # OpenClaw's own figure; no table price
    ("openclaw_session", {"provider": "mock", "model": "mock-model", "status": "error", "prompt_tokens": 0,
                          "completion_tokens": 0, "total_tokens": 0, "cache_read_tokens": 0,
                          "cache_write_tokens": 0, "cost_usd": 0, "session_id": "s3",
                          "created_at": "2026-11-03T09:05:00Z"}),
    ("log", {"provider": "anthropic", "model": "claude-sonnet-4", "status": "error", "error_type": "http_429",
             "latency_ms": 50, "created_at": "2026-11-03T10:00:00Z"}),                        # no tokens
    ("http", {"provider": "mystery", "model": "unknown-model", "prompt_tokens": 100, "completion_tokens": 10,
              "latency_ms": 700, "created_at": "2026-11-03T12:00:00Z"}),                      # unpriced
    ("http", {"provider": "openai", "model": "gpt-4o", "prompt_tokens": 9, "completion_tokens": 9,
              "cost_usd": 9, "trace_id": "later", "created_at": "2026-11-05T12:00:00Z"}),    # out of window
]
# (key, calls, failures, input, output, cache read, cache write, total tokens, cost, computed, unpriced,
#  p50, p95, p99): by model, --cost auto. Input is the prompt less the cache's tokens.
BY_MODEL = [
    ("openai/gpt-4o", 2, 0, 2_000, 300, 1_000, 0, 3_300, 0.0535, 0.0035, 0, 100.0, 300.0, 300.0),
    ("anthropic/claude-sonnet-4-20250514", 1, 0, 5_000, 1_000, 2_000, 3_000, 11_000, 0.04185, 0.04185, 0,
     2000.0, 2000.0, 2000.0),
    ("mock/mock-model", 2, 1, 904, 300, 4_096, 0, 5_300, 0.0084408, 0.0, 0, None, None, None),
    ("anthropic/claude-sonnet-4", 1, 1, 0, 0, 0, 0, 0, 0.0, 0.0, 0, 50.0, 50.0, 50.0),
    ("mystery/unknown-model", 1, 0, 100, 10, 0, 0, 110, 0.0, 0.0, 1, 700.0, 700.0, 700.0),
]
TOTALS = ("TOTAL", 7, 2, 8_004, 1_610, 7_096, 3_000, 19_710, 0.1037908, 0.04535, 1, 300.0, 2000.0, 2000.0)


def metric_row(row: dict[str, Any], key: str) -> tuple:
    latency = row["latency_ms"]
    return (key, row["calls"], row["failures"], row["input_tokens"], row["output_tokens"],
            row["cache_read_tokens"], row["cache_write_tokens"], row["total_tokens"], row["cost_usd"],
            row["computed_usd"], row["unpriced_calls"], latency["p50"], latency["p95"], latency["p99"])


def build_report_database(path: Path) -> Path:
    """REPORT_CALLS priced by otrace's own code as at ingest, with error events, log events, host
    samples, push attempts and retention losses, written as otrace writes rows."""
    otrace.open_database(str(path))
    calls = [otrace.event_row(otrace.TRACES, otrace.trace_row, event, source)
             for source, event in REPORT_CALLS]
    errors = [otrace.event_row(otrace.ERRORS, otrace.error_row, {
        "error_type": kind, "category": category, "message": "m", "created_at": when}, source)
        for kind, category, when, source in (("llm_error", "rate_limit", "2026-11-02T10:00:01Z", "http"),
                                             ("llm_error", "rate_limit", "2026-11-02T10:00:02Z", "http"),
                                             ("crash", "oom_kill", "2026-11-03T01:00:00Z", "otrace"))]
    logs = [otrace.Row("log_events", (f"log-{n}", unix_ms(datetime.fromisoformat(when)), 0, "log", "INFO",
                                      "gateway", kind, "m", None, None, "/x.log", n))
            for n, (kind, when) in enumerate((("model_call", "2026-11-02T10:00:00Z"),
                                              ("model_call", "2026-11-03T10:00:00Z"),
                                              ("channel_inbound", "2026-11-03T10:00:00Z"),
                                              ("channel_inbound", "2026-11-05T10:00:00Z")))]
    samples = []
    for n, (when, cpu, memory, disk) in enumerate((("2026-11-02T12:00:00Z", 10.5, 2**30, 40.0),
                                                   ("2026-11-03T12:00:00Z", 93.25, 3 * 2**29, 45.5))):
        values = dict.fromkeys(otrace.METRICS.columns) | {
            "trace_id": f"m-{n}", "created_at": unix_ms(datetime.fromisoformat(when)), "received_at": 0,
            "source": "proc", "cpu_pct": cpu, "mem_used_bytes": memory, "mem_limit_bytes": 2**31,
            "disk_used_pct": disk, "self_rss_bytes": 25 * 2**20}
        samples.append(otrace.Row("system_metrics", tuple(values.values())))
    with contextlib.closing(otrace.connect(str(path))) as conn, otrace.transaction(conn):
        for table in otrace.EVENT_TABLES:
            otrace.insert_rows(conn, table, [row.values for row in calls + errors + logs + samples
                                             if row.table == table])
        conn.execute("UPDATE llm_traces SET synced = 1 WHERE trace_id = 'later'")
        for when, status, error, events in (("2026-11-03T12:00:00Z", 200, None, 10),
                                            ("2026-11-03T18:00:00Z", 503, "HTTP 503: busy", 4)):
            conn.execute("INSERT INTO push_log (batch_id, started_at, duration_ms, events, bytes, "
                         "http_status, error) VALUES ('b', ?, 1, ?, 100, ?, ?)",
                         (unix_ms(datetime.fromisoformat(when)), events, status, error))
        for when, table, reason, deleted, lost in (
                ("2026-11-02T05:00:00Z", "llm_traces", "age", 10, 0),
                ("2026-11-03T06:00:00Z", "llm_traces", "pressure_unpushed", 5, 5),
                ("2026-11-03T06:00:00Z", "log_events", "pressure_pushed", 20, 0),
                ("2026-11-09T06:00:00Z", "log_events", "age", 7, 0)):
            conn.execute("INSERT INTO retention_ledger (pass_id, at, table_name, reason, deleted, "
                         "unsynced_deleted) VALUES (?, ?, ?, ?, ?, ?)",
                         (when, unix_ms(datetime.fromisoformat(when)), table, reason, deleted, lost))
        conn.execute("INSERT INTO push_rejects (table_name, row_id, trace_id, rejected_at, http_status) "
                     "VALUES ('llm_traces', 1, 'x', ?, 422)",
                     (unix_ms(datetime.fromisoformat("2026-11-03T07:00:00Z")),))
    return path


def report(db: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_") and k != "COLUMNS"}
    return subprocess.run([*START, "report", "--db", str(db), *args],
                          env=clean | (env or {}), capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(not ROOT, reason="reading as another user needs root to become one")
def test_the_report_says_why_a_user_may_not_read_the_database(tmp_path: Path) -> None:
    """In a directory the user may not enter, or a file it may not read: exit 2 saying so (it was a
    traceback, exit 1)."""
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="otrace-report-"))    # outside pytest's 0700 directory
    try:
        (folder / "private").mkdir()
        db = build_report_database(folder / "private" / "otrace.db")
        for directory, file in ((0o700, 0o644), (0o755, 0o600)):
            (folder / "private").chmod(directory)
            db.chmod(file)
            done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                   *START, "report", "--db", str(db)],
                                  capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 2 and f"otrace report: cannot read {db}" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr and "run as otrace's user, or root" in done.stderr
        (folder / "private").chmod(0o755)                 # a live database's copy, its -wal beside it
        db.chmod(0o644)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute("PRAGMA journal_mode = wal")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("UPDATE llm_traces SET model = model")
            conn.commit()
            shutil.copy(db, folder / "copy.db")
            shutil.copy(f"{db}-wal", folder / "copy.db-wal")
        folder.chmod(0o755)
        copy = folder / "copy.db"
        for part in (copy, Path(f"{copy}-wal")):
            part.chmod(0o644)
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               *START, "report", "--db", str(copy)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 2 and "copy the file and its -wal into a directory you can write" in \
            done.stderr, done.stderr
    finally:
        shutil.rmtree(folder)


@needs_root
def test_the_report_reads_a_stopped_database_on_a_full_disk(tmp_path: Path,
                                                            run: Callable[..., Otrace]) -> None:
    """otrace stopped, its disk full: the report reads the database as immutable (it has no -wal), where
    it exited 2 saying "disk I/O error" (SQLite could not make the -shm a WAL database is read with)."""
    with tmpfs(tmp_path / "vol", "8m") as vol:
        node = run(db=vol / "otrace.db")
        node.post("/v1/traces", [trace() for _ in range(3)])
        node.wait_persisted(3)
        assert node.stop() == 0 and not (vol / "otrace.db-wal").exists()
        fill(vol)
        done = report(vol / "otrace.db", "--json")
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert json.loads(done.stdout)["calls"]["totals"]["calls"] == 3


@needs_root
def test_a_report_with_no_room_for_its_sorts_sorts_in_memory(tmp_path: Path) -> None:
    """A week of a large database sorts past the connection's cache (the log events by kind), into
    files in SQLite's temp directory. With that directory full, the report failed with "database or
    disk is full" about a database disk with room; it is made in memory instead, and says so."""
    db = build_report_database(tmp_path / "otrace.db")
    now, logs = otrace.now_ms(), 150_000
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO log_events (trace_id, created_at, received_at, source, level, subsystem, kind, "
            "file, file_offset) SELECT 'spill-' || i, ? - i * 100, ?, 'log', 'INFO', 'gateway', "
            "iif(i % 3, 'channel_inbound', 'channel_outbound'), '/var/log/openclaw.log', i * 200 FROM n",
            (logs, now, now))
    with tmpfs(tmp_path / "tmp", "64k") as temp:
        fill(temp)
        done = report(db, "--since", "7d", "--json", env={"SQLITE_TMPDIR": str(temp)})
        assert done.returncode == 0, done.stderr
        assert done.stderr == f"otrace report: {otrace.TEMP_FULL}\n"
        kinds = json.loads(done.stdout)["log_events"]
        assert kinds["channel_inbound"] >= logs * 2 // 3 and kinds["channel_outbound"] >= logs // 3, kinds
        (tmp_path / "room").mkdir()
        roomy = report(db, "--since", "7d", "--json", env={"SQLITE_TMPDIR": str(tmp_path / "room")})
        assert roomy.returncode == 0 and roomy.stderr == "", roomy.stderr
        assert json.loads(roomy.stdout)["log_events"] == kinds
        assert not list(temp.glob("etilqs_*"))


def test_a_report_that_cannot_be_written_says_so(tmp_path: Path) -> None:
    """`> file` on a full disk: a line saying so and exit 1, not a traceback."""
    db = build_report_database(tmp_path / "otrace.db")
    for form in ((), ("--json",), ("--csv",)):
        with open("/dev/full", "w") as full:                # a device, written by the child
            done = subprocess.run([*START, "report", "--db", str(db), "--since", "30d", *form], stdout=full,
                                  stderr=subprocess.PIPE, text=True, timeout=120, check=False)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip() == "otrace report: cannot write the report: No space left on device"


def test_a_call_with_neither_tokens_nor_cost_is_said_unknown_not_free(tmp_path: Path) -> None:
    """A call from the gateway's log carries no tokens and no cost: the report counts it at $0 and
    says its cost is not known (a log followed alone read as "$0 today")."""
    db = tmp_path / "otrace.db"
    otrace.open_database(str(db))
    now = int(time.time() * 1000)
    calls = [({"provider": "anthropic", "model": "claude", "created_at": now - 1000}, "log"),
             ({"provider": "anthropic", "model": "claude", "cost_usd": 0.5, "prompt_tokens": 10,
               "created_at": now - 2000}, "http"),
             ({"provider": "p", "model": "m", "status": "error", "cost_usd": 0, "created_at": now - 3000},
              "http"),
             ({"provider": "p", "model": "m", "status": "error", "created_at": now - 4000}, "log")]
    rows = [otrace.event_row(otrace.TRACES, otrace.trace_row, event, source).values
            for event, source in calls]
    with contextlib.closing(otrace.connect(str(db))) as conn, otrace.transaction(conn):
        otrace.insert_rows(conn, "llm_traces", rows)
    assert report_json(db, "--since", "1h")["calls"]["unmeasured_calls"] == 1     # a failure costs nothing
    text = report(db, "--since", "1h").stdout
    assert "? 1 call with neither tokens nor a cost (as the gateway's log gives calls): counted at $0, its " \
        "cost not known" in " ".join(text.split()), text


def test_pushed_content_is_the_conventions_messages_or_wrapped_text() -> None:
    """An array of the conventions' messages goes as it is; any other text, an older convention's
    choices or an array of numbers too, goes as one message of one text part."""
    messages = '[{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]'
    assert otrace.text_messages(messages, "user") == messages
    for other in ('[{"index": 0, "finish_reason": "stop", "message": {"content": "hi"}}]', "[1, 2, 3]", "[]",
                  "plain"):
        assert json.loads(otrace.text_messages(other, "assistant", "stop")) == [
            {"role": "assistant", "parts": [{"type": "text", "content": other}], "finish_reason": "stop"}]


def test_a_narrow_reports_labels_stay_apart_and_in_line(tmp_path: Path) -> None:
    """On a narrow terminal a long label is cut in its middle, so two models apart by their date stay
    apart; a wide character (CJK, emoji) takes two columns, so its row's figures line up too."""
    db = tmp_path / "otrace.db"
    otrace.open_database(str(db))
    now = int(time.time() * 1000)
    rows = [otrace.event_row(otrace.TRACES, otrace.trace_row, {
        "provider": provider, "model": model, "cost_usd": 1, "created_at": now - 1000}, "http").values
        for provider, model in (("anthropic", "claude-sonnet-4-5-20250929"),
                                ("anthropic", "claude-sonnet-4-20250514"), ("qwen", "通义千问-max-🚀"))]
    with contextlib.closing(otrace.connect(str(db))) as conn, otrace.transaction(conn):
        otrace.insert_rows(conn, "llm_traces", rows)
    lines = report(db, "--since", "1h", env={"COLUMNS": "55"}).stdout.splitlines()
    table = [line for line in lines if line.startswith(("anthrop", "qwen", "TOTAL"))]
    assert len(table) == 4 and len({line[:16] for line in table}) == 4, table
    assert len({sum(otrace.columns_of(line)) for line in table}) == 1, table      # one width, in columns


def test_the_reports_rounding_never_reads_as_another_figure() -> None:
    """One failure in 21,001 calls is not 0.0%; 999.6 ms is 1.0s, not 1000ms; 999,950 tokens are 1.0M,
    as their total shows them, not 1000.0k."""
    assert [otrace.percent_text(r) for r in (round(1 / 21001, 4), 0.0005, 0.5)] == ["<0.1%", "0.1%", "50.0%"]
    assert [otrace.ms_text(ms) for ms in (999.4, 999.6, 1500)] == ["999ms", "1.0s", "1.5s"]
    assert [otrace.tokens_text(n) for n in (999, 999_949, 999_950, 12_345)] == [
        "999", "999.9k", "1.0M", "12.3k"]


def test_the_report_sums_the_largest_counts_the_api_takes(tmp_path: Path) -> None:
    """Some thousand calls of 2^53-1 tokens (the API's largest count) pass what SQLite's sum() holds:
    the report still answers (it failed whole, "integer overflow")."""
    db = tmp_path / "otrace.db"
    otrace.open_database(str(db))
    most, now = 2**53 - 1, int(time.time() * 1000)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1100) "
            "INSERT INTO llm_traces (trace_id, created_at, received_at, source, provider, model, status, "
            "session_id, prompt_tokens, completion_tokens, total_tokens, truncated, synced) "
            "SELECT 'c' || i, ? - i, 0, 'http', 'p', 'm', 'ok', 's', ?, ?, ?, 0, 0 FROM n",
            (now, most, most, most))
    for by in ("model", "session"):
        totals = report_json(db, "--since", "1h", "--by", by)["calls"]["totals"]
        assert totals["calls"] == 1100 and totals["total_tokens"] == pytest.approx(1100 * most, rel=1e-9)
    assert report_json(db, "--since", "1h")["top_sessions"][0]["total_tokens"] == pytest.approx(1100 * most)


def test_a_row_dated_far_ahead_does_not_hold_the_report(svc: Otrace) -> None:
    """A clock's error put a row in the year 9000: the offsets are looked for up to a year from now,
    a day at a time (the window was walked an hour at a time to its last row: minutes, and a CASE of
    14,000 pieces), and the report over all time answers."""
    berlin, far = otrace.Zone("Europe/Berlin"), int(datetime(9000, 1, 1, tzinfo=UTC).timestamp() * 1000)
    sql, params = berlin.local_sql(0, far)
    years = datetime.now(UTC).year + 1 - 1970
    assert sql.count("WHEN") <= 2 * years and len(params) == 2 * sql.count("WHEN") + 1
    assert svc.post("/v1/traces", [trace(created_at="9000-01-01T00:00:00Z"), trace()]).status == 202
    svc.wait_persisted(2)
    done = report(svc.db_path, "--since", "1970-01-01", "--until", "9998-12-31", "--json",
                  "--timezone", "Europe/Berlin")
    assert done.returncode == 0 and json.loads(done.stdout)["calls"]["totals"]["calls"] == 2, done.stderr


def test_the_report_shows_control_characters_from_the_data_as_question_marks(svc: Otrace) -> None:
    """A model or session named with an escape sequence or a newline cannot recolour the operator's
    terminal or split a row."""
    sent = [trace(model="x\u001b[31mRED\u001b[0m", session_id="s\u202eevil"), trace(model="new\nline")]
    assert svc.post("/v1/traces", sent).status == 202
    svc.wait_persisted(2)
    for by in ("model", "session"):
        done = report(svc.db_path, "--by", by)
        assert done.returncode == 0 and not any(c in done.stdout for c in "\u001b\u202e"), done.stdout
    lines = report(svc.db_path).stdout.splitlines()
    assert any(line.startswith("anthropic/x?[31mRED?[0m ") for line in lines)
    assert any(line.startswith("anthropic/new?line ") for line in lines)
    assert svc.post("/v1/traces", [trace(provider="=cmd", model="@SUM(A1)"),         # formulas
                                   trace(provider="p", model="m", session_id="\r=2+2")]).status == 202
    svc.wait_persisted(4)
    rows = list(csv.reader(io.StringIO(report(svc.db_path, "--csv").stdout)))
    assert ["'=cmd", "'@SUM(A1)"] in [row[:2] for row in rows]
    assert ["anthropic", "x?[31mRED?[0m"] in [row[:2] for row in rows]
    sessions = list(csv.reader(io.StringIO(report(svc.db_path, "--by", "session", "--csv").stdout)))
    assert [row[0] for row in sessions if "2+2" in ",".join(row)] == ["?=2+2"]     # on one row


def test_the_report_says_its_totals_may_miss_calls_retention_deleted(tmp_path: Path) -> None:
    """Retention deletes the oldest rows of a kind (pushed, unpushed) first: when it deleted calls
    after the window began and the oldest call of that kind kept arrived after the window began, some
    of the window's calls are gone, and the totals say so (they once read as the whole): also with an
    older unpushed call kept, and for a window that ended before the deletion. A window that begins
    after the oldest call kept of the kind deleted is whole."""
    db = tmp_path / "otrace.db"
    seed(db, [("trace", 1, otrace.UNSYNCED)], age_days=0.1)          # unpushed, 2.4 hours ago
    seed(db, [("trace", 30, otrace.SYNCED)], age_days=0.01)          # pushed, 15 minutes ago
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        cut = otrace.Cut(("llm_traces",), otrace.DELIVERED, "pressure_pushed", otrace.ledger_hour(), limit=10)
        assert cut(conn).deleted == 10
        kept_at = conn.execute("SELECT min(received_at) FROM llm_traces WHERE synced = 1").fetchone()[0]
    whole_hour = report_json(db, "--since", "1h")
    assert whole_hour["calls"]["totals"]["calls"] == 21 and whole_hour["retention"]["calls_incomplete"]
    text = report(db, "--since", "1h").stdout
    assert "! totals may miss calls: retention deleted the oldest calls since the window began" in " ".join(
        text.split()), text
    assert report_json(db, "--since", "1h", "--until", "1m")["retention"]["calls_incomplete"]   # ended before
    after = datetime.fromtimestamp(kept_at / 1000 + 1, UTC).isoformat()
    assert not report_json(db, "--since", after)["retention"]["calls_incomplete"]


def test_a_ledger_row_stays_until_its_hours_last_deletion_is_as_old_as_the_retention(
        run: Callable[..., Otrace], receiver: Receiver) -> None:
    """A retention ledger row holds its hour's deletions and is dated by the first: it is pruned once its
    hour is TRACE_RETENTION old, not its first deletion (the hour's later ones went with it, unsaid)."""
    node = run(push_env(receiver, TRACE_RETENTION="1s", TRACE_CLEANUP_INTERVAL="100ms",
                        TRACE_PUSH_INTERVAL="200ms"))
    wait_synced(node, node.post("/v1/traces", [trace() for _ in range(5)]).json["trace_ids"])
    wait_until(lambda: ledger(node).get(("llm_traces", "age")) == (4, 0), timeout=60,
               what="the pushed calls but the newest deleted by age")   # the newest stays: BELOW_NEWEST
    first = node.query("SELECT min(at) FROM retention_ledger")[0][0]
    wait_until(lambda: otrace.now_ms() > first + 2000, what="the first deletion older than TRACE_RETENTION")
    passes = node.health()["retention"]["passes"]
    wait_until(lambda: node.health()["retention"]["passes"] >= passes + 2, what="a pass begun since")
    assert ledger(node)[("llm_traces", "age")] == (4, 0)
    week = report_json(node.db_path, "--since", "7d")["retention"]
    assert (week["deleted"], week["unpushed_deleted"]) == (4, 0)


def test_the_report_says_its_totals_miss_calls_retention_deleted_by_age(run: Callable[..., Otrace],
                                                                       receiver: Receiver) -> None:
    """Calls pushed and then deleted by age (TRACE_RETENTION) leave a window reaching back before them
    partial: the report says so, with the arrival of the last call deleted, after the ledger's rows of
    the deletions are gone with age too; a window that begins after it is whole."""
    node = run(push_env(receiver, TRACE_RETENTION="1s", TRACE_CLEANUP_INTERVAL="100ms",
                        TRACE_PUSH_INTERVAL="200ms"))
    two_days_ago = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    wait_synced(node, node.post("/v1/traces", [trace(created_at=two_days_ago) for _ in range(10)]
                                ).json["trace_ids"])
    node.post("/v1/traces", trace())                          # the newest row stays: see BELOW_NEWEST
    wait_until(lambda: node.query("SELECT count(*) FROM llm_traces")[0][0] == 1 and
               node.query("SELECT count(*) FROM retention_ledger")[0][0] > 0, timeout=60,
               what="the old calls deleted by age")
    wait_until(lambda: hours_past(node) and node.query("SELECT count(*) FROM retention_ledger")[0][0] == 0,
               timeout=60, what="the ledger's rows of the deletions gone with age too")
    week = report_json(node.db_path, "--since", "7d")
    assert week["calls"]["totals"]["calls"] == 1 and week["retention"]["calls_incomplete"]
    through = datetime.fromisoformat(week["retention"]["calls_deleted_through"])
    assert "! totals may miss calls" in report(node.db_path, "--since", "7d").stdout
    after = (through + timedelta(seconds=1)).isoformat()
    assert not report_json(node.db_path, "--since", after)["retention"]["calls_incomplete"]


def report_json(db: Path, *args: str) -> dict[str, Any]:
    done = report(db, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


WINDOW = ("--since", "2026-11-02", "--until", "2026-11-03")          # both days whole


def test_report_numbers_are_exact_in_json_csv_and_the_table(tmp_path: Path) -> None:
    db = build_report_database(tmp_path / "otrace.db")
    doc = report_json(db, *WINDOW, "--timezone", "UTC")
    assert doc["schema"] == "otrace.report.v2"
    assert (doc["by"], doc["cost"], doc["breakdown"], doc["source"]) == ("model", "auto", False, None)
    assert doc["window"] == {"since": "2026-11-02T00:00:00+00:00", "until": "2026-11-04T00:00:00+00:00",
                             "timezone": "UTC"}
    groups = doc["calls"]["groups"]
    assert [metric_row(g, f"{g['provider']}/{g['model']}") for g in groups] == BY_MODEL
    assert metric_row(doc["calls"]["totals"], "TOTAL") == TOTALS
    assert doc["calls"]["totals"]["failure_rate"] == 0.2857 and groups[2]["failure_rate"] == 0.5
    assert [(s["session_id"], s["calls"], s["failures"], s["cost_usd"], s["total_tokens"], s["first"])
            for s in doc["top_sessions"]] == [("s1", 2, 0, 0.0535, 3_300, "2026-11-02T10:00:00+00:00"),
                                     ("s2", 1, 0, 0.04185, 11_000, "2026-11-02T23:30:00+00:00"),
                                     ("s3", 2, 1, 0.0084408, 5_300, "2026-11-03T09:00:00+00:00")]
    assert doc["errors"] == [{"error_type": "llm_error", "category": "rate_limit", "count": 2},
                             {"error_type": "crash", "category": "oom_kill", "count": 1}]
    assert doc["host"] == {"samples": 2, "cpu_pct_max": 93.25, "mem_used_bytes_max": 3 * 2**29,
                           "mem_limit_bytes": 2**31, "disk_used_pct_max": 45.5,
                           "otrace_rss_bytes_max": 25 * 2**20, "oom_kills": 1}
    assert doc["log_events"] == {"model_call": 2, "channel_inbound": 1}
    assert doc["push"] == {
        "unsynced": {"llm_traces": 7, "error_events": 3, "system_metrics": 2, "log_events": 4,
                     "genai_metrics": 0, "custom_events": 0, "process_samples": 0},
        "unsynced_total": 16,
        "last_attempt": {"at": "2026-11-03T18:00:00+00:00", "http_status": 503, "error": "HTTP 503: busy",
                         "events": 4},
        "last_success": {"at": "2026-11-03T12:00:00+00:00", "http_status": 200, "error": None, "events": 10}}
    assert doc["retention"] == {"deleted": 35, "unpushed_deleted": 5, "refused_by_receiver": 1, "by_table": [
        {"table": "llm_traces", "reason": "age", "deleted": 10, "unpushed_deleted": 0},
        {"table": "llm_traces", "reason": "pressure_unpushed", "deleted": 5, "unpushed_deleted": 5},
        {"table": "log_events", "reason": "pressure_pushed", "deleted": 20, "unpushed_deleted": 0}],
        "calls_incomplete": True, "calls_deleted_through": None}   # seeded ledger rows: no mark

    done = report(db, *WINDOW, "--timezone", "UTC", "--csv")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == ("provider,model,calls,failures,failure_rate,input_tokens,output_tokens,"
                        "cache_read_tokens,cache_write_tokens,total_tokens,cost_usd,computed_usd,unpriced_calls,"
                        "latency_p50_ms,latency_p95_ms,latency_p99_ms")
    import csv
    integers = ("calls", "failures", "input_tokens", "output_tokens", "cache_read_tokens",
                "cache_write_tokens", "total_tokens")
    parsed = [(f"{r['provider']}/{r['model']}", *(int(r[name]) for name in integers), float(r["cost_usd"]),
               float(r["computed_usd"]), int(r["unpriced_calls"]),
               *(float(r[f"latency_{p}_ms"]) if r[f"latency_{p}_ms"] else None
                 for p in ("p50", "p95", "p99")))
              for r in csv.DictReader(lines)]
    assert parsed == BY_MODEL

    done = report(db, *WINDOW, "--timezone", "UTC", env={"COLUMNS": "150"})
    assert done.returncode == 0, done.stderr
    table = done.stdout.splitlines()
    assert table[0] == "otrace report: 2026-11-02T00:00:00+00:00 to 2026-11-04T00:00:00+00:00 (UTC), by model"
    assert table[2].split() == ["MODEL", "CALLS", "FAILED", "INPUT", "OUTPUT", "CACHE", "R", "CACHE", "W",
                                "COST", "P50", "P95", "P99"]
    assert [line.split() for line in table[3:9]] == [
        ["openai/gpt-4o", "2", "0", "2.0k", "300", "1.0k", "0", "$0.0535*", "100ms", "300ms", "300ms"],
        ["anthropic/claude-sonnet-4-20250514", "1", "0", "5.0k", "1.0k", "2.0k", "3.0k", "$0.0418*", "2.0s",
         "2.0s", "2.0s"],
        ["mock/mock-model", "2", "1", "50.0%", "904", "300", "4.1k", "0", "$0.0084", "-", "-", "-"],
        ["anthropic/claude-sonnet-4", "1", "1", "100.0%", "0", "0", "0", "0", "$0", "50ms", "50ms", "50ms"],
        ["mystery/unknown-model", "1", "0", "100", "10", "0", "0", "$0?", "700ms", "700ms", "700ms"],
        ["TOTAL", "7", "2", "28.6%", "8.0k", "1.6k", "7.1k", "3.0k", "$0.1038*?", "300ms", "2.0s", "2.0s"]]
    assert table[9] == "* $0.0454 of the cost computed from the price table (the source reported none)"
    assert table[10] == "? 1 call with tokens and no cost: no price for the model, or a total of tokens alone"
    assert "llm_error/rate_limit 2 · crash/oom_kill 1" in done.stdout
    assert "s1 $0.0535* (2 calls) · s2 $0.0418* (1 call) · s3 $0.0084 (2 calls)" in done.stdout   # as rows
    assert "CPU peak 93.2 % · memory peak 1.5 GiB of 2.0 GiB · disk peak 45.5 % · OOM kills 1" in done.stdout
    assert ("16 rows not pushed · last push 2026-11-03T18:00:00+00:00: HTTP 503 · last success "
            "2026-11-03T12:00:00+00:00") in done.stdout
    assert "35 rows deleted (llm_traces 15, log_events 20), 5 never pushed · 1 refused by the receiver" in (
        done.stdout)

    copy = tmp_path / "copy" / "otrace.db"                     # a copy reads the same (the WAL is in it)
    copy.parent.mkdir()
    shutil.copy(db, copy)
    again = report_json(copy, *WINDOW, "--timezone", "UTC")
    for varying in ("generated_at", "database"):
        doc.pop(varying), again.pop(varying)
    doc["usage_cost"].pop("updatedAt"), again["usage_cost"].pop("updatedAt")
    assert again == doc


def test_report_costs_print_four_decimals_up_to_100_dollars() -> None:
    costs = (0, 0.00004, 0.125, 0.25, 0.75, 1.125, 99.5, 1234.5)
    assert [otrace.usd_text(usd) for usd in costs] == [
        "$0", "<$0.0001", "$0.1250", "$0.2500", "$0.7500", "$1.1250", "$99.5000", "$1,234.50"]


def test_report_days_and_hours_follow_the_timezone_and_breakdown_splits_by_model(tmp_path: Path) -> None:
    db = build_report_database(tmp_path / "otrace.db")
    utc = report_json(db, *WINDOW, "--timezone", "UTC", "--by", "day")
    assert [(g["day"], g["calls"], g["cost_usd"]) for g in utc["calls"]["groups"]] == [
        ("2026-11-02", 3, 0.09535), ("2026-11-03", 4, 0.0084408)]
    berlin = report_json(db, *WINDOW, "--timezone", "Europe/Berlin", "--by", "day", "--breakdown")
    assert berlin["window"]["since"] == "2026-11-02T00:00:00+01:00"       # 23:00 UTC the day before
    assert [(g["day"], g["calls"], g["cost_usd"]) for g in berlin["calls"]["groups"]] == [
        ("2026-11-02", 2, 0.0535), ("2026-11-03", 5, 0.0502908)]        # the 23:30 UTC call is the 3rd here
    assert [(m["provider"], m["model"], m["calls"]) for m in berlin["calls"]["groups"][1]["models"]] == [
        ("anthropic", "claude-sonnet-4-20250514", 1), ("mock", "mock-model", 2),
        ("anthropic", "claude-sonnet-4", 1), ("mystery", "unknown-model", 1)]
    kolkata = report_json(db, "--since", "2026-11-02T10:00:00Z", "--until", "2026-11-02T12:00:00Z",
                          "--timezone", "Asia/Kolkata", "--by", "hour")  # +05:30: hours start at :30 UTC
    assert [(g["hour"], g["calls"]) for g in kolkata["calls"]["groups"]] == [
        ("2026-11-02T15:00", 1), ("2026-11-02T16:00", 1), ("2026-11-02T17:00", 0)]   # 17:00-17:30: none
    fixed = report_json(db, *WINDOW, "--timezone=-03:00", "--by", "day")
    assert [(g["day"], g["calls"]) for g in fixed["calls"]["groups"]] == [
        ("2026-11-02", 3), ("2026-11-03", 4)]
    by_source = report_json(db, *WINDOW, "--timezone", "UTC", "--by", "source")
    assert [(g["source"], g["calls"], g["cost_usd"]) for g in by_source["calls"]["groups"]] == [
        ("http", 3, 0.0535), ("otlp", 1, 0.04185), ("openclaw_session", 2, 0.0084408), ("log", 1, 0.0)]
    sessions = report_json(db, *WINDOW, "--by", "session", "--source", "http", "--breakdown")
    assert [(g["session_id"], g["calls"]) for g in sessions["calls"]["groups"]] == [("s1", 2), (None, 1)]
    assert sessions["errors"] == [{"error_type": "llm_error", "category": "rate_limit", "count": 2}]
    done = report(db, *WINDOW, "--timezone", "UTC", "--by", "day", "--breakdown", "--csv")
    assert done.stdout.splitlines()[0].startswith("day,provider,model,calls,")
    assert [line.split(",")[:4] for line in done.stdout.splitlines()[1:]] == [
        ["2026-11-02", "openai", "gpt-4o", "2"], ["2026-11-02", "anthropic", "claude-sonnet-4-20250514", "1"],
        ["2026-11-03", "mock", "mock-model", "2"], ["2026-11-03", "anthropic", "claude-sonnet-4", "1"],
        ["2026-11-03", "mystery", "unknown-model", "1"]]


def test_report_days_across_a_daylight_saving_change(tmp_path: Path) -> None:
    """Europe/Berlin leaves summer time at 01:00 UTC on 2026-10-25: its days are 23 h before it and 25 h
    long on it; an hour of clock time is lived twice."""
    db = tmp_path / "otrace.db"
    otrace.open_database(str(db))
    moments = ["2026-10-24T21:59:00Z", "2026-10-24T22:00:00Z", "2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z",
               "2026-10-25T22:59:00Z", "2026-10-25T23:00:00Z", "2026-03-27T12:00:00Z"]
    rows = [otrace.event_row(otrace.TRACES, otrace.trace_row, {"provider": "p", "model": "m", "cost_usd": 1,
                                                               "created_at": when}, "http").values
            for when in moments]
    with contextlib.closing(otrace.connect(str(db))) as conn, otrace.transaction(conn):
        otrace.insert_rows(conn, "llm_traces", rows)
    window = ("--since", "2026-10-24", "--until", "2026-10-26", "--timezone", "Europe/Berlin")
    days = report_json(db, *window, "--by", "day")
    assert [(g["day"], g["calls"]) for g in days["calls"]["groups"]] == [
        ("2026-10-24", 1), ("2026-10-25", 4), ("2026-10-26", 1)]
    assert days["window"] == {"since": "2026-10-24T00:00:00+02:00", "until": "2026-10-27T00:00:00+01:00",
                              "timezone": "Europe/Berlin"}
    hours = report_json(db, *window, "--by", "hour")
    assert [(g["hour"], g["calls"]) for g in hours["calls"]["groups"] if g["calls"]] == [
        ("2026-10-24T23:00", 1), ("2026-10-25T00:00", 1), ("2026-10-25T02:00", 2),   # 02:30 CEST and CET
        ("2026-10-25T23:00", 1), ("2026-10-26T00:00", 1)]
    shown = [g["hour"] for g in hours["calls"]["groups"]]    # every hour of the clock, the empty ones too
    assert shown == sorted(set(shown)) and len(shown) == 3 * 24 and shown[-1] == "2026-10-26T23:00"
    spring = report_json(db, "--since", "2026-03-29", "--until", "2026-03-29", "--timezone", "Europe/Berlin",
                         "--by", "hour")["calls"]["groups"]    # 02:00 is never lived that day
    assert [g["hour"][11:] for g in spring] == [f"{h:02}:00" for h in range(24) if h != 2]
    before = report_json(db, "--since", "2026-03-20", "--until", "2026-03-28", "--timezone", "UTC",
                         "--by", "day")["calls"]["groups"]     # nothing known before the oldest call
    assert [(g["day"], g["calls"]) for g in before] == [("2026-03-27", 1), ("2026-03-28", 0)]
    local = report(db, "--since", "2026-10-24", "--until", "2026-10-26", "--json", env={"TZ": "UTC-3"})
    assert json.loads(local.stdout)["window"] == {         # POSIX UTC-3 is 3 h ahead, and named "UTC"
        "since": "2026-10-24T00:00:00+03:00", "until": "2026-10-27T00:00:00+03:00",
        "timezone": "local (UTC, +03:00)"}
    twice = ("--since", "2026-10-25T02:30", "--until", "2026-10-25T03:30", "--json")   # 02:30 is lived twice
    named = json.loads(report(db, *twice, "--timezone", "Europe/Berlin").stdout)
    machine = json.loads(report(db, *twice, env={"TZ": "Europe/Berlin"}).stdout)
    assert named["window"]["since"] == machine["window"]["since"] == "2026-10-25T02:30:00+02:00"
    assert named["calls"]["totals"]["calls"] == machine["calls"]["totals"]["calls"] == 2


def test_a_month_of_calls_in_many_sessions_reports_exact_percentiles_in_little_memory(tmp_path: Path) -> None:
    """The report keeps a few numbers per group, never every call's latency: 200,000 calls over 2,000
    sessions, 21 models and 30 days; percentiles exact to the stored value."""
    db = tmp_path / "otrace.db"
    otrace.open_database(str(db))
    start = unix_ms(datetime.fromisoformat("2026-11-01T00:00:00Z"))
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000) "
            "INSERT INTO llm_traces (trace_id, created_at, received_at, source, provider, model, status, "
            "session_id, prompt_tokens, completion_tokens, total_tokens, cost_usd, latency_ms, truncated, "
            "synced) SELECT 'c' || i, ? + (i - 1) * 12960, 0, 'http', 'p' || (i % 3), 'm' || (i % 7), 'ok', "
            "'s' || (i % 2000), 10, 1, 11, 0.001, CASE WHEN i % 11 THEN (i * 7919 % 20000) / 3.0 END, 0, 0 "
            "FROM n", (start,))
        latencies = conn.execute("SELECT session_id, provider, model, latency_ms FROM llm_traces "
                                 "WHERE latency_ms IS NOT NULL").fetchall()

    def ranked(values: list[float]) -> dict[str, float]:
        values = sorted(values)
        return {f"p{p}": values[-(-p * len(values) // 100) - 1] for p in (50, 95, 99)}

    window = ("--since", "2026-11-01", "--until", "2026-11-30", "--timezone", "UTC")
    measured = subprocess.run(
        [sys.executable, "-c", "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], "
         "stdout=subprocess.PIPE); sys.stderr.write(str(resource.getrusage(resource.RUSAGE_CHILDREN)"
         ".ru_maxrss)); sys.stdout.buffer.write(done.stdout)",
         *START, "report", "--db", str(db), *window, "--by", "session", "--json"],
        capture_output=True, timeout=120, check=True)
    doc = json.loads(measured.stdout)
    assert doc["calls"]["totals"]["calls"] == 200_000
    assert doc["calls"]["totals"]["latency_ms"] == ranked([row[3] for row in latencies])
    groups = {group["session_id"]: group for group in doc["calls"]["groups"]}
    assert len(groups) == 2_000
    for session in ("s0", "s1", "s1999"):
        assert groups[session]["latency_ms"] == ranked([row[3] for row in latencies if row[0] == session])
    split = report_json(db, *window, "--by", "source", "--breakdown")["calls"]["groups"][0]["models"]
    assert len(split) == 21
    for model in split:
        assert model["latency_ms"] == ranked([row[3] for row in latencies if row[1:3] == (
            model["provider"], model["model"])])
    assert int(measured.stderr) < 100 * 1024, "peak RSS of the report in KiB"


def test_report_cost_modes_choose_the_reported_or_the_computed_figure(tmp_path: Path) -> None:
    db = build_report_database(tmp_path / "otrace.db")
    expected = {"auto": (0.1037908, 0.04535, 1), "computed": (0.0511, 0.0511, 2),   # not the 0-token failure
                "reported": (0.0584408, 0.0, 3)}
    for mode, (usd, computed, unpriced) in expected.items():
        doc = report_json(db, *WINDOW, "--timezone", "UTC", "--cost", mode)
        totals = doc["calls"]["totals"]
        assert (doc["cost"], totals["cost_usd"], totals["computed_usd"], totals["unpriced_calls"]) == (
            mode, usd, computed, unpriced)
        usage_cost = doc["usage_cost"]["totals"]
        assert (usage_cost["totalCost"], usage_cost["missingCostEntries"]) == (usd, unpriced)
    done = report(db, *WINDOW, "--timezone", "UTC", "--cost", "reported", env={"COLUMNS": "150"})
    assert "3 calls with tokens and no cost: no price for the model, or a total of tokens alone (or none " \
           "reported: --cost reported)" in \
        done.stdout


def test_report_says_what_the_price_table_puts_on_calls_reported_at_0(tmp_path: Path) -> None:
    """OpenClaw writes a cost of 0 for a model it has no cost configured for: `auto` keeps that figure,
    and the report says what the price table puts on those calls instead of showing $0 alone."""
    db = tmp_path / "otrace.db"
    otrace.open_database(str(db))
    mini = {"provider": "openai", "model": "gpt-4o-mini", "created_at": "2026-11-02T10:00:00Z"}
    events = [mini | {"prompt_tokens": 2048, "completion_tokens": 128, "cost_usd": 0},   # priced: $0.000384
              mini | {"prompt_tokens": 1000, "completion_tokens": 100, "cost_usd": 0},   # $0.00021
              mini | {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0},        # nothing to price
              mini | {"prompt_tokens": 1000, "completion_tokens": 100},                  # computed
              mini | {"prompt_tokens": 1000, "completion_tokens": 100, "cost_usd": 0.5},
              {**mini, "model": "acme-9", "prompt_tokens": 10, "cost_usd": 0}]           # no price
    rows = [otrace.event_row(otrace.TRACES, otrace.trace_row, event, "http").values for event in events]
    with contextlib.closing(otrace.connect(str(db))) as conn, otrace.transaction(conn):
        otrace.insert_rows(conn, "llm_traces", rows)
    window = ("--since", "2026-11-02", "--until", "2026-11-02", "--timezone", "UTC")
    for mode in ("auto", "reported", "computed"):
        doc = report_json(db, *window, "--cost", mode)
        assert doc["calls"]["reported_zero"] == {"calls": 2, "computed_usd": 0.000594}
        text = report(db, *window, "--cost", mode, env={"COLUMNS": "150"}).stdout
        note = "2 calls reported at $0 by the source: the price table puts them at $0.0006 (--cost computed)"
        assert (note in text) is (mode != "computed"), text
    assert report_json(db, "--since", "2026-11-03", "--until", "2026-11-03", "--timezone", "UTC")[
        "calls"]["reported_zero"] == {"calls": 0, "computed_usd": 0}


def test_report_warns_of_log_calls_in_the_time_the_stores_calls_span(tmp_path: Path) -> None:
    """Calls the log gave while the store was off are stored again when the store is read: the report
    says how many of the log's fall in the time the store's calls span."""
    db = tmp_path / "otrace.db"
    otrace.open_database(str(db))
    at = "2026-11-02T10:{:02d}:00Z".format
    calls = [("log", at(0)), ("log", at(10)), ("log", at(20)), ("log", at(50)),
             (otrace.STORE_SOURCE, at(5)), (otrace.STORE_SOURCE, at(20)), ("http", at(30))]
    rows = [otrace.event_row(otrace.TRACES, otrace.trace_row, {"provider": "p", "model": "m",
                                                               "created_at": when}, source).values
            for source, when in calls]
    with contextlib.closing(otrace.connect(str(db))) as conn, otrace.transaction(conn):
        otrace.insert_rows(conn, "llm_traces", rows)
    window = ("--since", "2026-11-02", "--until", "2026-11-02", "--timezone", "UTC")
    assert report_json(db, *window)["calls"]["log_calls_beside_the_store"] == 2        # 10:10 and 10:20
    note = ("! 2 calls from the gateway's log, stored while the session store was off, fall in the time the "
            "store's calls span")
    assert note in " ".join(report(db, *window, env={"COLUMNS": "200"}).stdout.split())
    assert note not in " ".join(report(db, *window, "--source", "log", env={"COLUMNS": "200"}).stdout.split())
    with contextlib.closing(otrace.connect(str(db))) as conn, otrace.transaction(conn):   # the store's last
        conn.execute("UPDATE llm_traces SET metadata = ? WHERE source = ? AND created_at = ?",   # call, dated
                     ('{"stored_after_ms": 1800000}', otrace.STORE_SOURCE,               # at its start,
                      otrace.epoch_ms(datetime.fromisoformat(at(20)))))                  # ended at 10:50
    assert report_json(db, *window)["calls"]["log_calls_beside_the_store"] == 3        # and the log's 10:50
    with contextlib.closing(otrace.connect(str(db))) as conn, otrace.transaction(conn):
        conn.execute("DELETE FROM llm_traces WHERE source = ?", (otrace.STORE_SOURCE,))
    assert report_json(db, *window)["calls"]["log_calls_beside_the_store"] == 0


def test_report_usage_cost_equals_openclaws_own_sums_of_its_store(tmp_path: Path) -> None:
    """The captured 2026.9.6 store's assistant entries as the session-store reader maps them (prompt =
    input + cacheRead + cacheWrite), summed by the report, against OpenClaw's own summing of the same
    entries (its loadCostUsageSummary: usage fields and cost.total, per local day) and its README's
    figures: 6 calls, 8,768 tokens, 0.021065 USD."""
    store = HERE.parent / "shared" / "fixtures" / "openclaw" / "state-2026.9.6" / "agents" / "main" / "agent"
    if not store.exists():
        pytest.skip("needs ../shared beside the repo")
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    with contextlib.closing(sqlite3.connect(copy / "openclaw-agent.sqlite")) as conn:
        entries = [(session, json.loads(text)) for session, text in conn.execute(
            "SELECT session_id, event_json FROM transcript_events ORDER BY created_at, seq")]
    calls = [(session, e["message"]) for session, e in entries
             if e.get("type") == "message" and e["message"].get("role") == "assistant"]
    ours = []
    theirs: dict[str, dict[str, float]] = {}
    for session, message in calls:
        usage = message["usage"]
        ours.append(otrace.event_row(otrace.TRACES, otrace.trace_row, {
            "provider": message["provider"], "model": message["model"], "session_id": session,
            "status": "error" if message["stopReason"] == "error" else "ok",
            "created_at": message["timestamp"],
            "prompt_tokens": usage["input"] + usage["cacheRead"] + usage["cacheWrite"],
            "completion_tokens": usage["output"], "total_tokens": usage["totalTokens"],
            "cache_read_tokens": usage["cacheRead"], "cache_write_tokens": usage["cacheWrite"],
            "cost_usd": usage["cost"]["total"]}, "openclaw_session").values)
        day = datetime.fromtimestamp(message["timestamp"] / 1000).date().isoformat()   # the machine's zone
        bucket = theirs.setdefault(day, dict.fromkeys(("input", "output", "cacheRead", "cacheWrite",
                                                       "totalTokens", "totalCost", "missingCostEntries"), 0))
        for name in ("input", "output", "cacheRead", "cacheWrite", "totalTokens"):
            bucket[name] += usage[name]
        bucket["totalCost"] += usage["cost"]["total"]
    db = tmp_path / "otrace.db"
    otrace.open_database(str(db))
    with contextlib.closing(otrace.connect(str(db))) as conn, otrace.transaction(conn):
        otrace.insert_rows(conn, "llm_traces", ours)
    first, last = min(m["timestamp"] for _, m in calls), max(m["timestamp"] for _, m in calls)
    doc = report_json(db, "--source", "openclaw_session", "--cost", "reported", "--since",
                      datetime.fromtimestamp(first / 1000 - 1, UTC).isoformat(), "--until",
                      datetime.fromtimestamp(last / 1000 + 1, UTC).isoformat())
    usage_cost = doc["usage_cost"]
    for entry in theirs.values():
        entry["totalCost"] = round(entry["totalCost"], 9)
    assert [{k: v for k, v in d.items() if k != "date"} for d in usage_cost["daily"]] == list(theirs.values())
    assert [d["date"] for d in usage_cost["daily"]] == list(theirs)
    totals = usage_cost["totals"]
    assert (len(calls), totals["totalTokens"], round(totals["totalCost"], 6)) == (6, 8_768, 0.021065)
    assert (totals["input"], totals["output"], totals["cacheRead"], totals["cacheWrite"]) == (
        4_187, 485, 4_096, 0)
    assert doc["calls"]["totals"]["failures"] == 2 and doc["calls"]["totals"]["calls"] == 6


def test_report_until_alone_looks_at_the_day_before_it(tmp_path: Path) -> None:
    """--until with no --since: the 24 hours before it (the flag table's own example), not before now;
    a duration in --since counts back from --until too."""
    db = build_report_database(tmp_path / "otrace.db")
    for since, start in (((), "2026-11-02"), (("--since", "48h"), "2026-11-01")):
        window = report_json(db, *since, "--until", "2026-11-02", "--timezone", "UTC")["window"]
        assert (window["since"], window["until"]) == (f"{start}T00:00:00+00:00", "2026-11-03T00:00:00+00:00")
    last = report_json(db, "--since", "2026-11-01", "--until", "9999-12-31", "--timezone", "UTC")   # its end
    assert last["window"]["until"] == "9999-12-31T23:59:59.999+00:00" and last["calls"]["totals"]["calls"] > 0
    exact = report_json(db, "--since", "2026-11-01T00:00:00.5Z", "--until", "2026-11-02", "--timezone", "UTC")
    assert exact["window"]["since"] == "2026-11-01T00:00:00.500+00:00"          # as it was counted
    assert report_json(db, "--since", "2026-11-01t00:00:00.5z", "--until", "2026-11-02", "--timezone",
                       "UTC")["window"] == exact["window"]                       # RFC 3339 allows t and z
    assert report_json(db, "--since", "2026-11-01", "--until", "now")["calls"] == report_json(
        db, "--since", "2026-11-01")["calls"]                               # the default, said
    basic = report_json(db, "--until", "20261102", "--timezone", "UTC")["window"]    # ISO 8601's basic form
    assert basic["until"] == "2026-11-03T00:00:00+00:00"                           # is a date too: whole
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:         # the last moment a row can have
        conn.execute("UPDATE llm_traces SET created_at = ? WHERE id = 1", (otrace.MAX_UNIX_MS,))
    for zone in ("UTC", "+05:30", "Asia/Kolkata"):                      # year 10000 east of UTC
        end = report_json(db, "--since", "9999-12-31", "--until", "9999-12-31", "--timezone", zone)
        assert end["window"]["until"] == "9999-12-31T23:59:59.999+00:00", zone
        assert end["calls"]["totals"]["calls"] == 1 and len(end["usage_cost"]["daily"]) == 1, zone


def test_report_refuses_a_bad_question_with_exit_2(tmp_path: Path) -> None:
    db = build_report_database(tmp_path / "otrace.db")
    for args, needle in ((("--since", "soon"), "--since 'soon' is not a duration"),
                         (("--since", "1M"), "RFC 3339 time (units are lower case)"),   # a month? a minute?
                         (("--since", "24H"), "--since '24H' is not a duration"),
                         (("--since", "2026-11-04", "--until", "2026-11-03"), "is not before --until"),
                         (("--until", "2026-11-31"), "--until '2026-11-31' is not"),
                         (("--timezone", "Mars/Olympus"), "--timezone 'Mars/Olympus' is not a time zone"),
                         (("--breakdown",), "--breakdown splits rows by model"),
                         (("--by", "week"), "invalid choice: 'week'"),
                         (("--source", "api"), "argument --source: invalid choice: 'api' (choose from "
                                               "'http', 'otlp', 'log', 'openclaw_session', 'otrace')"),
                         (("--json", "--csv"), "not allowed with argument")):
        done = report(db, *args)
        assert done.returncode == 2 and needle in done.stderr and not done.stdout, (args, done.stderr)
    for tz in ("Europe/Berln", ":Nope", "Nope"):                 # which the C library takes as UTC
        done = report(db, env={"TZ": tz})
        assert done.returncode == 2 and f"TZ={tz!r} names no time zone" in done.stderr, done.stderr
    for tz in ("Europe/Berlin", "UTC-3", "UTC", ":UTC"):
        assert report(db, "--json", env={"TZ": tz}).returncode == 0
    assert report(db, "--json", "--timezone", "UTC", env={"TZ": "Nope"}).returncode == 0
    done = report(db, "--json", env={"TRACE_DB_PAHT": "/data/otrace.db"})      # said, as `serve` says it
    assert done.returncode == 0 and done.stderr == ("otrace report: TRACE_DB_PAHT is not a setting otrace "
                                                    "knows; did you mean TRACE_DB_PATH?\n"), done.stderr
    done = report(tmp_path / "nowhere.db")
    assert (done.returncode, done.stderr) == (2, f"otrace report: no database at {tmp_path / 'nowhere.db'} "
                                                 "(set --db, or TRACE_DB_PATH)\n")
    assert not (tmp_path / "nowhere.db").exists()
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    done = report(tmp_path / "junk.db")
    assert done.returncode == 2 and "cannot read" in done.stderr and "file is not a database" in done.stderr
    (tmp_path / "empty.db").touch()
    done = report(tmp_path / "empty.db")
    assert done.returncode == 2 and "is not an otrace database" in done.stderr, done.stderr
    for steps in (next(n for n, step in enumerate(otrace.SCHEMA) if "cost_source" in step), 9):
        old = tmp_path / f"old-{steps}.db"                 # the schema of an otrace before
        with contextlib.closing(sqlite3.connect(old)) as conn:
            for step in otrace.SCHEMA[:steps]:
                conn.executescript(step)
            conn.execute(f"PRAGMA user_version = {steps}")
        done = report(old)
        assert done.returncode == 2 and f"from an older otrace (schema {steps} of" in done.stderr
    newer = tmp_path / "newer.db"                                  # as the server, which will not open it
    shutil.copyfile(db, newer)
    with contextlib.closing(sqlite3.connect(newer)) as conn:
        conn.execute(f"PRAGMA user_version = {len(otrace.SCHEMA) + 1}")
    done = report(newer)
    assert done.returncode == 2 and f"from a newer otrace (schema {len(otrace.SCHEMA) + 1};" in done.stderr
    env = {"TRACE_DB_PATH": str(db)}                              # the default database
    done = subprocess.run([*START, "report", *WINDOW, "--json"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env}, check=False)
    assert done.returncode == 0 and json.loads(done.stdout)["calls"]["totals"]["calls"] == 7


def run_in_terminal(args: list[str], columns: int) -> str:
    """otrace report on a real pseudo-terminal `columns` wide: what it printed."""
    import fcntl
    import pty
    import struct
    import termios
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS" and not k.startswith("TRACE_")}
    proc = subprocess.Popen([*START, "report", *args], stdout=follower, stderr=follower,
                            env=env)
    os.close(follower)
    out = b""
    with contextlib.suppress(OSError):                 # EIO once the report has exited and closed its side
        while chunk := os.read(leader, 65536):
            out += chunk
    os.close(leader)
    assert proc.wait(60) == 0, out
    return out.decode().replace("\r\n", "\n")


def test_report_on_a_terminal_is_compact_when_narrow_and_draws_cost_bars_by_day(tmp_path: Path) -> None:
    db = build_report_database(tmp_path / "otrace.db")
    window = ["--db", str(db), *WINDOW, "--timezone", "UTC"]

    def table(out: str) -> list[str]:
        """The table's lines, from its header on (a narrow terminal wraps the title)."""
        lines = out.splitlines()
        return lines[lines.index("") + 1:]

    wide = run_in_terminal(window, 140)
    assert table(wide)[0].split()[:5] == ["MODEL", "CALLS", "FAILED", "INPUT", "OUTPUT"]
    assert all(len(line) <= 140 for line in wide.splitlines())
    narrow = run_in_terminal(window, 72)
    assert table(narrow)[0].split() == ["MODEL", "CALLS", "FAILED", "TOKENS", "COST", "P95"]
    assert table(narrow)[1].split()[-4:] == ["0", "3.3k", "$0.0535*", "300ms"]   # 2,000 + 300 + 1,000 tokens
    assert all(len(line) <= 72 for line in narrow.splitlines())
    days = table(run_in_terminal([*window, "--by", "day"], 120))
    bars = {line.split()[0]: line.rsplit("  ", 1)[1] for line in days[1:3]}
    full = len(bars["2026-11-02"])
    assert set(bars["2026-11-02"]) == {"█"} and full == 120 - len(days[1].rsplit("  ", 1)[0]) - 2
    eighths = sum(8 if c == "█" else "▏▎▍▌▋▊▉".index(c) + 1 for c in bars["2026-11-03"])
    assert eighths == round(8 * full * 0.0084408 / 0.09535)                 # its cost against the top day's
    tiny = table(run_in_terminal([*window, "--by", "day"], 20))             # rows still say which day
    assert [line.split()[0] for line in tiny[1:3]] == ["2026-11-02", "2026-11-03"]


def test_report_says_the_last_success_the_pruned_push_log_no_longer_holds(tmp_path: Path) -> None:
    """The push log keeps TRACE_RETENTION; otrace_state keeps when the receiver last took a batch."""
    db = tmp_path / "otrace.db"
    otrace.open_database(str(db))
    at = unix_ms(datetime.fromisoformat("2026-11-02T10:00:00Z"))
    with contextlib.closing(otrace.connect(str(db))) as conn, otrace.transaction(conn):
        conn.execute(otrace.STATE_SQL, (otrace.PUSHED_KEY, at, at))
    doc = report_json(db, *WINDOW, "--timezone", "UTC")
    assert doc["push"]["last_attempt"] is None
    assert doc["push"]["last_success"] == {"at": "2026-11-02T10:00:00+00:00", "http_status": None,
                                           "error": None, "events": None}
    assert "PUSH          0 rows not pushed · last success 2026-11-02T10:00:00+00:00\n" in report(
        db, *WINDOW, "--timezone", "UTC").stdout


def test_report_counts_the_oom_kills_otrace_saw_not_their_events(tmp_path: Path) -> None:
    """One event holds a sample's kills, the host's count holding the cgroup's; an OOM error a client
    posted is among the errors, not a kill counted again."""
    db = tmp_path / "otrace.db"
    otrace.open_database(str(db))
    events = [otrace.own_error("oom_kill", "OOM killer", {"kills": kills}, "critical", "crash")
              for kills in ({"cgroup": 1, "host": 3}, {"cgroup": 2}, {"host": 1})]
    events.append(otrace.event_row(otrace.ERRORS, otrace.error_row, {
        "error_type": "system_error", "category": "oom_kill", "message": "oom"}, "http"))
    with contextlib.closing(otrace.connect(str(db))) as conn, otrace.transaction(conn):
        otrace.insert_rows(conn, "error_events", [row.values for row in events])
    doc = report_json(db, "--since", "1h")
    assert doc["host"]["oom_kills"] == 6
    assert {(e["category"], e["count"]) for e in doc["errors"]} == {("oom_kill", 3), ("oom_kill", 1)}


def test_report_compact_tokens_are_the_calls_totals(tmp_path: Path) -> None:
    """A call that gave only its total counts it: the four kinds of token summed left it out."""
    db = tmp_path / "otrace.db"
    otrace.open_database(str(db))
    calls = [otrace.event_row(otrace.TRACES, otrace.trace_row, {
        "provider": "openai", "model": "gpt-4o", "created_at": "2026-11-02T10:00:00Z", **tokens}, "http")
        for tokens in ({"prompt_tokens": 1000, "completion_tokens": 200}, {"total_tokens": 500},
                       {"cache_read_tokens": 4000, "completion_tokens": 50})]    # a prompt of 4,000 at least
    with contextlib.closing(otrace.connect(str(db))) as conn, otrace.transaction(conn):
        otrace.insert_rows(conn, "llm_traces", [row.values for row in calls])
    narrow = run_in_terminal(["--db", str(db), *WINDOW, "--timezone", "UTC"], 72).splitlines()
    header = next(line.split() for line in narrow if line.startswith("MODEL"))
    row = next(line.split() for line in narrow if line.startswith("openai/gpt-4o"))
    assert row[header.index("TOKENS")] == "5.8k"


def test_report_sections_wrap_between_ids_never_within_one(tmp_path: Path) -> None:
    """A session id copied from the terminal is the id: wrapped at its hyphens, it was two pieces."""
    db = tmp_path / "otrace.db"
    otrace.open_database(str(db))
    sessions = ["4ffeb0fa-fdbe-4aba-bba1-abf62a653faa", "988a486c-e9f0-4797-80b2-2641d808ab0d"]
    calls = [otrace.event_row(otrace.TRACES, otrace.trace_row, {
        "provider": "openai", "model": "gpt-4o", "created_at": "2026-11-02T10:00:00Z", "cost_usd": 0.01,
        "session_id": session}, "http") for session in sessions]
    with contextlib.closing(otrace.connect(str(db))) as conn, otrace.transaction(conn):
        otrace.insert_rows(conn, "llm_traces", [row.values for row in calls])
    doc = report_json(db, *WINDOW, "--timezone", "UTC")
    for width in range(40, 140):
        text = otrace.TableView(doc, width).render()
        assert all(session in text for session in sessions), text


def test_report_columns_widen_for_the_largest_values_the_api_takes(tmp_path: Path) -> None:
    """2^53-1 tokens and milliseconds (the API's largest integer) still print as separate columns."""
    db = tmp_path / "otrace.db"
    otrace.open_database(str(db))
    most = otrace.MAX_INT
    rows, _ = otrace.parse_events(json.dumps([
        trace(trace_id="big", created_at="2026-11-02T10:00:00Z", prompt_tokens=most, completion_tokens=0,
              latency_ms=most, cost_usd=most / 1e3),              # a total at the most, not past it
        trace(trace_id="small", created_at="2026-11-02T11:00:00Z", status="error", error_type="rate_limit",
              prompt_tokens=5, latency_ms=5)]).encode(), "/v1/traces", 10, 16384)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for row in rows:
            conn.execute(otrace.insert_sql("llm_traces"), row.values)
        conn.commit()
    for columns in (140, 72):
        out = run_in_terminal(["--db", str(db), *WINDOW, "--timezone", "UTC"], columns)
        lines = out.splitlines()
        header = lines.index("") + 1
        shown = otrace.TableView.FULL if "INPUT" in lines[header] else otrace.TableView.COMPACT
        for line in lines[header + 1:header + 3]:             # the model's row and TOTAL
            assert len(line.split()) == 1 + len(shown) + ("%" in line), (columns, line)   # one a column
        assert "9.0P" in out and "$9,007,199,254,740.99" in out, out


def hold_read_transaction(pid: int, shm: Path) -> bool:
    """Whether process `pid` holds a WAL read lock on the database (a byte of the -shm's read marks, as
    /proc/locks shows it): it is inside its read transaction."""
    inode = shm.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields:
            continue
        if fields[4] == str(pid) and fields[3] == "READ" and fields[5].endswith(f":{inode}") and \
                123 <= int(fields[6]) <= 127:
            return True
    return False


def report_state(proc: subprocess.Popen, shm: Path) -> str | None:
    if hold_read_transaction(proc.pid, shm):
        return "reading"
    return "ended" if proc.poll() is not None else None


def stopped_mid_read(command: list[str], shm: Path, env: dict[str, str]) -> subprocess.Popen:
    """A report process stopped (SIGSTOP) while it holds its read transaction: tried until one is caught."""
    for _ in range(50):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        seen = wait_until(functools.partial(report_state, proc, shm), timeout=60, what="the report reading")
        if seen == "reading":
            proc.send_signal(signal.SIGSTOP)
            if hold_read_transaction(proc.pid, shm):
                return proc
            proc.send_signal(signal.SIGCONT)            # it left its transaction before it stopped
        proc.communicate(timeout=60)
    pytest.fail("no report was caught inside its read transaction")


def test_a_report_stopped_mid_read_never_makes_the_writer_wait(run: Callable[..., Otrace]) -> None:
    """A report paused inside its read transaction (Ctrl-Z, a full pipe) while the service takes load,
    and checkpoints keep wanting to truncate the WAL: every event still gets its 202 and is stored,
    checkpoints that meet the reader go on (busy), and the report, resumed, answers from its snapshot.
    The writer waits out a snapshot once, for LONG_HOLD (a second), while it may be brief: the queue
    holds more posts than one client sends in that second. A checkpoint that waited for the reader
    (BUSY_TIMEOUT, ten seconds, at every try) would fill it (503)."""
    node = run({"TRACE_CHECKPOINT_INTERVAL": "100ms", "TRACE_WAL_MAX_BYTES": "64KiB",
                "TRACE_QUEUE_SIZE": "8000"})
    seeded = [trace(prompt_tokens=n, latency_ms=float(n)) for n in range(2_000)]
    for start in range(0, len(seeded), 500):
        assert node.post("/v1/traces", seeded[start:start + 500]).status == 202
    node.wait_persisted(len(seeded), timeout=60)
    shm = Path(str(node.db_path) + "-shm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")}
    command = [*START, "report", "--db", str(node.db_path), "--since", "1h", "--json"]
    proc = stopped_mid_read(command, shm, env)
    try:
        before = node.query("SELECT count(*) FROM llm_traces")[0][0]
        statuses = [node.post("/v1/traces", trace()).status for _ in range(12_000)]
        assert statuses == [202] * len(statuses)
        node.wait_persisted(len(seeded) + len(statuses), timeout=60)
        busy = wait_until(lambda: [e for e in node.logs("wal checkpoint") if e["mode"] == "truncate"
                                   and e["busy"]], what="a truncating checkpoint that met the reader")
        assert busy and node.health()["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert before <= json.loads(out)["calls"]["totals"]["calls"] < len(seeded) + len(statuses)
    for _ in range(3):                                   # and reports run to the end while it takes load
        done = report(node.db_path, "--since", "1h", "--json")
        assert done.returncode == 0 and json.loads(done.stdout)["calls"]["totals"]["calls"] >= before
    assert node.stop() == 0


# -------------------------------------------------------------------------------- openclaw sessions


OPENCLAW = HERE.parent / "shared" / "fixtures" / "openclaw"
STATE_9 = OPENCLAW / "state-2026.9.6"      # the gateway that wrote gateway-2026.9.6-debug.log
STATE_7 = OPENCLAW / "state-2026.7.35"
DEBUG_LOG = OPENCLAW / "gateway-2026.9.6-debug.log"
needs_stores = pytest.mark.skipif(not STATE_9.exists(), reason="needs ../shared beside the repo")
STORE_ENV = {"TRACE_OPENCLAW_POLL": "50ms"}
POLLED = {"TRACE_NOTIFIED_POLL": "off"}   # looks counted by the test: every poll, not on the kernel's word
NAVIGATION = json.dumps({"version": 1, "report": {"kind": "canonical"}, "navigation": {}, "reset": {},
                         "model": {}, "modelBytes": 0, "modelWithoutCheckpointBytes": 0,
                         "withoutCustomDataBytes": 0})    # what the CHECK on a compressed row demands


def state_copy(tmp: Path, source: Path = STATE_9, name: str = "state") -> Path:
    """A writable copy of a captured state directory: the shared one is never opened."""
    target = tmp / name
    shutil.copytree(source, target)
    for path in (target, *target.rglob("*")):
        path.chmod(0o700 if path.is_dir() else 0o600)
    return target


def agent_db(state: Path, agent: str = "main") -> Path:
    return state / "agents" / agent / "agent" / "openclaw-agent.sqlite"


def store_entries(db: Path) -> list[tuple[str, int, dict[str, Any]]]:
    """(session, seq, entry) of every transcript entry, in the order they were written."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return transcript(conn, "created_at, seq")


def transcript(conn: sqlite3.Connection, order: str = "seq") -> list[tuple[str, int, dict[str, Any]]]:
    """(session, seq, entry) of every transcript entry a connection sees, in `order`."""
    import zstandard
    return [(session, seq, json.loads(text or zstandard.ZstdDecompressor().decompress(frame)))
            for session, seq, text, frame in conn.execute(
                f"SELECT session_id, seq, event_json, event_zstd FROM transcript_events ORDER BY {order}")]


def assistant_template(db: Path) -> dict[str, Any]:
    """The first real successful assistant entry of the store."""
    return next(e for _, _, e in store_entries(db) if e.get("type") == "message"
                and e["message"]["role"] == "assistant" and e["message"]["stopReason"] == "stop")


def a_call(template: dict[str, Any], tokens: int, cost: float, text: str = "a reply") -> dict[str, Any]:
    """A new model call shaped like a real one: its own id, time, usage and reply."""
    entry = json.loads(json.dumps(template))
    now = int(time.time() * 1000)
    entry["id"] = str(uuid.uuid4())
    entry["timestamp"] = otrace.iso((now + 40) / 1000)
    message = entry["message"]
    message.update({"timestamp": now, "content": [{"type": "text", "text": text}],
                    "responseId": f"resp-{entry['id'][:8]}"})
    message["usage"] = {"input": tokens, "output": 10, "cacheRead": 0, "cacheWrite": 0, "reasoningTokens": 0,
                        "totalTokens": tokens + 10, "cost": {"input": cost, "output": 0.0, "cacheRead": 0,
                                                             "cacheWrite": 0, "total": cost}}
    return entry


def gateway_connection(db: Path) -> sqlite3.Connection:
    """A connection writing to an agent database as the gateway does: WAL, held open (what it commits
    stays in the -wal until a checkpoint), with the octet_length() the CHECK constraints call."""
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.create_function("octet_length", 1, lambda v: None if v is None else len(
        v if isinstance(v, bytes) else str(v).encode()), deterministic=True)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    return conn


def append_entry(conn: sqlite3.Connection, session: str, entry: dict[str, Any],
                 compressed: bool = False, created: int | None = None) -> int:
    """One entry at the session's next seq, plain or as a zstd frame (as node:zlib writes it), stored
    `created` (by default its timestamp, as OpenClaw stores it, else now); its seq."""
    seq = conn.execute("SELECT coalesce(max(seq), -1) + 1 FROM transcript_events WHERE session_id = ?",
                       (session,)).fetchone()[0]
    text = json.dumps(entry, separators=(",", ":"))
    if created is None:
        stamp = entry.get("timestamp")
        created = otrace.epoch_ms(datetime.fromisoformat(stamp)) if isinstance(stamp, str) else int(
            time.time() * 1000)
    if compressed:
        import zstandard
        frame = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True).compress(
            text.encode())
        conn.execute("INSERT INTO transcript_events (session_id, seq, event_json, created_at, event_zstd, "
                     "event_utf8_bytes, navigation_json) VALUES (?, ?, NULL, ?, ?, ?, ?)",
                     (session, seq, created, frame, len(text.encode()), NAVIGATION))
    else:
        conn.execute("INSERT INTO transcript_events (session_id, seq, event_json, created_at) "
                     "VALUES (?, ?, ?, ?)", (session, seq, text, created))
    return seq


def session_traces(node: Otrace) -> list[dict[str, Any]]:
    return [r for r in node.rows("llm_traces") if r["source"] == "openclaw_session"]


def wait_traces(node: Otrace, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    return wait_until(lambda: len(rows := session_traces(node)) >= n and rows, timeout,
                      f"{n} openclaw_session rows")


def store_followed(tmp_path: Path, run: Callable[..., Otrace], **env: str
                   ) -> tuple[Otrace, Path, dict[str, Any]]:
    """otrace following a copy of the captured 2026.9.6 store (`env`: more of its environment), its six
    calls read: the node, agent main's database, and a real call's entry to shape new ones on."""
    state = state_copy(tmp_path)
    db = agent_db(state)
    template = assistant_template(db)
    node = run({**STORE_ENV, "TRACE_OPENCLAW_STATE_DIR": str(state), **env})
    wait_traces(node, 6)
    return node, db, template


def new_generation(gateway: sqlite3.Connection, session: str) -> None:
    """The session rewritten, as OpenClaw marks it: a new rewrite generation."""
    gateway.execute("UPDATE transcript_rewrite_watermarks SET generation = ? WHERE session_id = ?",
                    (uuid.uuid4().hex, session))


def look_cut_short_by_a_lock(store: otrace.SessionStore, at: int) -> None:
    """One look of `store` whose `at`-th read of entries meets the gateway's lock (the database is
    opened afresh at the next look)."""
    agent_db_of = store.databases["main"]
    entries, reads = agent_db_of.entries, []

    def locked(*args: Any) -> tuple[str, list[tuple]]:
        reads.append(args)
        if len(reads) == at:
            raise sqlite3.OperationalError("database is locked")
        return entries(*args)

    agent_db_of.entries = locked
    try:
        with pytest.raises(otrace.Condition, match="database is locked"):
            store.look()
    finally:
        del agent_db_of.entries


def test_transcript_entries_become_rows_as_openclaw_counts_them() -> None:
    entry = {"type": "message", "id": "e1", "timestamp": "2026-11-30T11:41:58.092Z", "message": {
        "role": "assistant",
        "content": [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": "Hi"}],
        "api": "openai-completions", "provider": "mock", "model": "m1", "stopReason": "stop",
        "timestamp": 1796038916358, "responseId": "r1", "__openclaw": {"runId": "run1"},
        "usage": {"input": 904, "output": 300, "cacheRead": 4096, "cacheWrite": 7, "reasoningTokens": 12,
                  "totalTokens": 5307, "cost": {"total": 0.0084408}}}}
    (table, build, trace), = otrace.store_events(entry, "main", "s1", "seq-5", 16384)
    assert table is otrace.TRACES and build is otrace.trace_row
    assert trace["trace_id"] == "oc:main:s1:e1" and trace["created_at"] == 1796038916358
    assert (trace["prompt_tokens"], trace["completion_tokens"], trace["total_tokens"]) == (5007, 300, 5307)
    assert (trace["cache_read_tokens"], trace["cache_write_tokens"], trace["reasoning_tokens"]) == (
        4096, 7, 12)
    assert (trace["cost_usd"], trace["status"], trace["finish_reason"], trace["output_text"]) == (
        0.0084408, "ok", "stop", "Hi")
    assert trace["metadata"] == {"agent_id": "main", "run_id": "run1", "entry_id": "e1", "response_id": "r1",
                                 "api": "openai-completions", "stored_after_ms": 1734}
    for fresh in ({"input": -5}, {"input": "904"}, {}):         # the prompt is unknown, not the cache's
        odd = json.loads(json.dumps(entry))
        del odd["message"]["usage"]["input"]
        odd["message"]["usage"] |= fresh
        (_, _, trace), = otrace.store_events(odd, "main", "s1", "seq-5", 16384)
        assert (trace["prompt_tokens"], trace["cache_read_tokens"], trace["total_tokens"]) == (
            None, 4096, 5307)
    failed = json.loads(json.dumps(entry))
    failed["message"].update({"stopReason": "error", "errorCode": "429", "errorType": "rate_limit_exceeded",
                              "errorMessage": "429 Rate limit reached", "content": []})
    (_, _, trace), (table, _, error) = otrace.store_events(failed, "main", "s1", "seq-5", 16384)
    assert (trace["status"], trace["error_type"], table) == ("error", "rate_limit_exceeded", otrace.ERRORS)
    assert (error["trace_id"], error["category"], error["message"], error["provider"]) == (
        "oc:main:s1:e1", "rate_limit", "429 Rate limit reached", "mock")
    assert error["metadata"]["run_id"] == "run1" and error["metadata"]["error_code"] == "429"
    assert trace["output_text"] is None
    key = "sk-proj-" + "k" * 24
    odd = json.loads(json.dumps(failed))                     # an error's type and code masked as its text
    odd["message"].update({"errorType": f"invalid key {key}", "errorCode": {"token": "t1"}})
    (_, _, trace), (_, _, error) = otrace.store_events(odd, "main", "s1", "seq-5", 16384)
    assert (trace["error_type"], error["metadata"]["error_code"]) == ("invalid key ***", '{"token": "***"}')
    for odd in (1, "x", {"type": "timeout"}):                  # diagnostics that are no list: none
        failed["message"]["diagnostics"] = odd
        (_, _, trace), (_, _, error) = otrace.store_events(failed, "main", "s1", "seq-5", 16384)
        assert error["category"] == "rate_limit"
    del failed["message"]["diagnostics"]
    failed["message"]["content"] = [{"type": "text",        # up to 2026.7, OpenClaw's words for no reply
                                     "text": "[assistant turn failed before producing content]"}]
    (_, _, trace), _ = otrace.store_events(failed, "main", "s1", "seq-5", 16384)
    assert trace["output_text"] is None
    failed["message"]["errorMessage"] = "401 Unauthorized: Authorization: Bearer s3cr3t-b x-api-key: s3cr3t-k"
    (_, _, trace), (_, _, error) = otrace.store_events(failed, "main", "s1", "seq-5", 16384)
    assert error["message"] == "401 Unauthorized: Authorization: Bearer *** x-api-key: ***"
    timed_out = json.loads(json.dumps(entry))                  # a turn that timed out is stored aborted
    timed_out["message"].update({"stopReason": "aborted", "errorMessage": "request timed out", "content": []})
    (_, _, trace), (_, _, error) = otrace.store_events(timed_out, "main", "s1", "seq-5", 16384)
    assert (trace["status"], error["category"], error["message"]) == ("error", "timeout", "request timed out")
    aborted = json.loads(json.dumps(entry))
    aborted["message"]["stopReason"] = "aborted"               # stopped with no error: not a failure
    assert [event["status"] for _, _, event in otrace.store_events(aborted, "main", "s1", "seq-5", 16384)
            ] == ["ok"]
    before_reply = {"type": "custom_message", "customType": "run-failed-before-reply", "id": "e2",
                    "content": "This turn ended before a reply: LLM request timed out.", "display": True,
                    "details": {"runId": "run2", "error": "LLM request timed out."},
                    "timestamp": "2026-11-30T11:41:58.092Z"}
    (table, _, error), = otrace.store_events(before_reply, "main", "s1", "x", 16384)
    assert (table, error["category"], error["metadata"]["run_id"]) == (otrace.ERRORS, "timeout", "run2")
    before_reply["content"] = "This turn ended before a reply: 401 for https://u:s3cr3t-p@proxy/v1."
    (_, _, error), = otrace.store_events(before_reply, "main", "s1", "x", 16384)
    assert error["message"] == "This turn ended before a reply: 401 for https://u:***@proxy/v1."
    mirror = json.loads(json.dumps(entry))
    mirror["message"].update({"provider": "openclaw", "model": "delivery-mirror"})
    user = {"type": "message", "id": "u", "message": {"role": "user", "content": "assistant, help"}}
    assert otrace.store_events(mirror, "main", "s1", "x", 16384) == []
    assert otrace.store_events(user, "main", "s1", "x", 16384) == []
    assert otrace.store_events("not an entry", "main", "s1", "x", 16384) == []
    long_id = otrace.store_trace_id("a" * 100, "s" * 100, "e")
    assert len(long_id) <= otrace.MAX_TRACE_ID_CHARS and long_id.isprintable()
    assert long_id == otrace.store_trace_id("a" * 100, "s" * 100, "e") != otrace.store_trace_id(
        "a" * 100, "s" * 100, "f")


@pytest.mark.parametrize(("signals", "category"), [
    (("429",), "rate_limit"), (("rate_limit_exceeded",), "rate_limit"),
    (("⚠️ Rate limit reached for requests",), "rate_limit"),
    (("ECONNREFUSED", "Connection error."), "network_failure"),
    ((None, None, "provider_transport_failure"), "network_failure"), (("ETIMEDOUT",), "timeout"),
    (("504",), "timeout"), (("LLM request timed out.",), "timeout"), (("500", "server_error"), "api_failure"),
    (("401 Incorrect API key",), "api_failure"), (("something else",), None), ((), None)])
def test_failure_categories_follow_the_error(signals: tuple, category: str | None) -> None:
    assert otrace.failure_category(*signals) == category


def test_openclaw_settings_and_where_auto_looks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert otrace.Config().openclaw_state_dir == "auto" and otrace.Config().openclaw_poll == 2.0
    assert otrace.Config.from_env({"TRACE_OPENCLAW_STATE_DIR": " OFF "}).openclaw_state_dir == "off"
    assert otrace.openclaw_state_dir("off") is None
    assert otrace.openclaw_state_dir(str(tmp_path / "x")) == tmp_path / "x"     # waited for if missing
    monkeypatch.setenv("HOME", str(tmp_path))
    assert otrace.openclaw_state_dir("auto", {}) is None                          # no ~/.openclaw: off
    assert otrace.openclaw_state_dir("auto", {}, gateway_here=True) == tmp_path / ".openclaw"   # awaited
    (tmp_path / ".openclaw").mkdir()
    assert otrace.openclaw_state_dir("auto", {}) == tmp_path / ".openclaw"
    assert otrace.openclaw_state_dir("auto", {"OPENCLAW_STATE_DIR": "/srv/oc"}) == Path("/srv/oc")
    logs = tmp_path / "logs"                                  # `openclaw --profile work` writes its own log
    logs.mkdir()
    (logs / "openclaw-2026-12-01.log").touch()
    (logs / "openclaw-work-2026-12-02.log").touch()
    assert otrace.openclaw_state_dir("auto", {}, True, str(logs)) == tmp_path / ".openclaw"   # none there
    (tmp_path / ".openclaw-work").mkdir()
    assert otrace.openclaw_state_dir("auto", {}, True, str(logs)) == tmp_path / ".openclaw-work"
    mine = str(logs / "openclaw-2026-12-01.log")              # TRACE_LOG_PATH naming one file: its own
    assert otrace.openclaw_state_dir("auto", {}, True, mine) == tmp_path / ".openclaw"
    (logs / "openclaw-work--bot-2026-12-03.log").touch()      # the name OpenClaw writes for work-bot
    (tmp_path / ".openclaw-work-bot").mkdir()
    assert otrace.openclaw_state_dir("auto", {}, True, str(logs)) == tmp_path / ".openclaw-work-bot"
    assert [otrace.log_profile(f"openclaw-{written}-2026-12-02.log") for written in (
        "work", "work--bot", "my-0bot", "-1work", "a-22e-b", "-3c0ffee")] == [
        "work", "work-bot", "my_bot", "Work", "a.b", None]                 # a hashed name: None
    assert otrace.log_profile(str(logs / "openclaw-2026-12-01.log")) is None
    for name, value, accepts in (("TRACE_OPENCLAW_POLL", "5ms", "a duration from 10ms to 1h"),
                                 ("TRACE_OPENCLAW_STATE_DIR", " ", "auto, off, or the path of a directory")):
        out = subprocess.run(START, capture_output=True, text=True, timeout=10,
                             env={**os.environ, "TRACE_DB_PATH": str(tmp_path / "x.db"), name: value},
                             check=False)
        assert out.returncode == 2 and name in out.stderr and accepts in out.stderr


@needs_stores
def test_the_captured_2026_9_6_store_gives_openclaws_own_figures(tmp_path: Path,
                                                                 run: Callable[..., Otrace]) -> None:
    """OpenClaw's own figures for agent main: 6 calls, 8,768 tokens, 0.021065 USD, 2 failed; read once,
    also by the same otrace started again."""
    state = state_copy(tmp_path)
    env = {**STORE_ENV, **POLLED, "TRACE_OPENCLAW_STATE_DIR": str(state)}
    node = run(env)
    rows = wait_traces(node, 6)
    node.wait_persisted(8)
    assert len(rows) == 6 and sum(r["total_tokens"] for r in rows) == 8768
    assert round(sum(r["cost_usd"] for r in rows), 6) == 0.021065
    assert sorted((r["provider"], r["status"], r["error_type"]) for r in rows if r["status"] != "ok") == [
        ("deadmock", "error", "ECONNREFUSED"), ("mock", "error", "server_error")]
    cached = next(r for r in rows if r["cache_read_tokens"])
    assert (cached["prompt_tokens"], cached["completion_tokens"], cached["cache_read_tokens"]) == (
        5000, 300, 4096)
    assert all(r["latency_ms"] is None and json.loads(r["metadata"])["stored_after_ms"] >= 0 for r in rows)
    errors = node.rows("error_events")
    assert sorted((e["category"], e["provider"], e["error_type"], e["source"]) for e in errors) == [
        ("api_failure", "mock", "llm_error", "openclaw_session"),
        ("network_failure", "deadmock", "llm_error", "openclaw_session")]
    assert {e["trace_id"] for e in errors} < {r["trace_id"] for r in rows}        # the call's own trace_id
    health = node.health()["openclaw_sessions"]
    assert (health["calls"], health["failures"], health["agents"], health["last_error"]) == (
        6, 2, ["main"], None)
    assert node.stop() == 0
    node = run(env, db=node.db_path)
    wait_until(lambda: node.health()["openclaw_sessions"]["polls"] > 5, what="a few polls")
    assert len(session_traces(node)) == 6 and len(node.rows("error_events")) == 2
    assert node.health()["events_duplicate"] == 0                        # not even offered again


@needs_stores
def test_the_captured_2026_7_35_session_files_give_three_rows(tmp_path: Path,
                                                               run: Callable[..., Otrace]) -> None:
    state = state_copy(tmp_path, STATE_7)
    node = run({**STORE_ENV, **POLLED, "TRACE_OPENCLAW_STATE_DIR": str(state)})
    rows = wait_traces(node, 3)
    assert sorted((r["prompt_tokens"], r["completion_tokens"], r["total_tokens"], r["cost_usd"])
                  for r in rows) == [(1234, 56, 1290, 0.004542), (1500, 77, 1577, 0.005655),
                                     (3000, 150, 3150, 0.0057204000000000005)]
    assert {r["trace_id"].split(":")[3] for r in rows} == {"d4bac086", "3dad41e6", "c8ab804b"}
    wait_until(lambda: node.health()["openclaw_sessions"]["polls"] > 5, what="a few polls")
    assert len(session_traces(node)) == 3                  # the .trajectory.jsonl files are not transcripts
    assert not node.logs("sessions failing")


@needs_stores
def test_an_agent_database_that_is_not_one_is_said_once_and_the_others_are_read(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A fault of the store's files is said in its own words (a line, /health), without a traceback."""
    state = state_copy(tmp_path)
    broken = agent_db(state, "broken")
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a database at all" * 100)
    node = run({**STORE_ENV, "TRACE_OPENCLAW_STATE_DIR": str(state)})
    wait_traces(node, 6)                                   # agent main's six calls
    failing = node.wait_log(lambda e: e.get("message") == "sessions failing")
    assert "agent broken" in failing["error"] and "SQLITE_NOTADB" in failing["error"]
    health = node.health()
    assert "broken" in health["openclaw_sessions"]["agent_errors"]
    assert health["status"] == "degraded"                  # its calls are not stored, nor its usage spans
    assert any("session store cannot be read" in p and "agent broken" in p for p in health["problems"])
    assert not [line for line in node.lines if "exc_info" in line]
    broken.unlink()                                        # the agent taken away: healthy at the next look
    wait_until(lambda: node.health()["status"] == "ok", what="healthy again")


@needs_stores
def test_an_agent_database_left_empty_or_without_transcripts_is_a_fault(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """An agent database of 0 bytes, or one with no transcript table, that has stayed so (OpenClaw
    makes the file, then its tables at once) holds nothing otrace can read: /health is degraded and
    says why, while the other agents are read; a real database put in its place is read."""
    state = state_copy(tmp_path)
    empty, other = agent_db(state, "empty"), agent_db(state, "other")
    for db in (empty, other):
        db.parent.mkdir(parents=True)
    empty.touch()
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    for db in (empty, other):
        os.utime(db, (time.time() - 3600, time.time() - 3600))
    node = run({**STORE_ENV, "TRACE_OPENCLAW_STATE_DIR": str(state)})
    wait_traces(node, 6)                                   # agent main's six calls
    health = wait_until(lambda: len((h := node.health())["openclaw_sessions"]["agent_errors"]) == 2 and h,
                        what="both agents' faults")
    errors = health["openclaw_sessions"]["agent_errors"]
    assert "is empty (0 bytes)" in errors["empty"] and "no transcript_events table" in errors["other"]
    assert health["status"] == "degraded"
    assert any("session store cannot be read" in p and "agent empty" in p for p in health["problems"])
    assert empty.stat().st_size == 0 and not [line for line in node.lines if "exc_info" in line]
    other.unlink()
    shutil.copyfile(agent_db(state), empty)                # the agent's database, made whole
    wait_until(lambda: len([r for r in session_traces(node) if r["trace_id"].startswith("oc:empty:")]) == 6,
               what="the database put in place read")
    wait_until(lambda: node.health()["status"] == "ok", what="healthy again")


@needs_stores
def test_entries_still_in_the_wal_of_an_open_gateway_connection_are_read(tmp_path: Path,
                                                                        run: Callable[..., Otrace]) -> None:
    """Calls committed by a connection held open like the gateway's, plain or zstd-compressed, in a
    session otrace has read and in a new one; then a rewrite of a session's suffix: only its new
    entries are new rows."""
    node, db, template = store_followed(tmp_path, run)
    gateway = gateway_connection(db)
    session = store_entries(db)[0][0]
    plain = a_call(template, 1000, 0.003)
    long = a_call(template, 2000, 0.006, text="long " * 400)           # over 1 KiB: stored compressed
    append_entry(gateway, session, plain)
    append_entry(gateway, session, long, compressed=True)
    other = a_call(template, 3000, 0.009)
    append_entry(gateway, "new-session", other)
    assert plain["id"].encode() in Path(str(db) + "-wal").read_bytes()
    assert plain["id"].encode() not in db.read_bytes()                 # only in the WAL, not checkpointed
    rows = wait_traces(node, 9)
    new = {r["trace_id"]: r for r in rows[6:]}
    assert new[f"oc:main:{session}:{long['id']}"]["output_text"] == "long " * 400
    assert sorted(r["total_tokens"] for r in new.values()) == [1010, 2010, 3010]
    assert f"oc:main:new-session:{other['id']}" in new
    # a suffix rewrite: the last two entries deleted, put back under a new generation, one new call after
    gateway.execute("BEGIN")
    last = gateway.execute("SELECT max(seq) FROM transcript_events WHERE session_id = ?",
                           (session,)).fetchone()[0]
    kept = gateway.execute("SELECT seq, event_json, event_zstd, event_utf8_bytes, navigation_json, "
                           "created_at FROM transcript_events WHERE session_id = ? AND seq >= ?",
                           (session, last - 1)).fetchall()
    gateway.execute("DELETE FROM transcript_events WHERE session_id = ? AND seq >= ?", (session, last - 1))
    gateway.executemany("INSERT INTO transcript_events (session_id, seq, event_json, event_zstd, "
                        "event_utf8_bytes, navigation_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(session, *row) for row in kept])
    new_generation(gateway, session)
    gateway.execute("COMMIT")
    after = a_call(template, 4000, 0.012)
    append_entry(gateway, session, after)
    rows = wait_traces(node, 10)
    assert rows[-1]["trace_id"] == f"oc:main:{session}:{after['id']}"
    wait_until(lambda: node.health()["queue_depth"] == 0, what="queue drained")
    health = node.health()
    assert len(session_traces(node)) == 10 and health["openclaw_sessions"]["undecodable"] == 0
    assert health["events_duplicate"] == 2       # the rewritten entries newer than a minute, read again;
    gateway.close()                              # the session's older entries are not


def new_session(gateway: sqlite3.Connection, session: str) -> None:
    """A session as OpenClaw starts one: its rewrite generation, before any entry."""
    gateway.execute("INSERT INTO transcript_rewrite_watermarks (session_id, generation, updated_at) "
                    "VALUES (?, ?, ?)", (session, uuid.uuid4().hex, int(time.time() * 1000)))


def archive_session(gateway: sqlite3.Connection, session: str, encoding: str = "identity",
                    last: dict[str, Any] | None = None,
                    damage: Callable[[bytes], bytes] | None = None) -> None:
    """A session reset or deleted as OpenClaw does it: its transcript's JSONL, in seq order, into an
    archive row of its generation, and its window, entries and generation deleted (OpenClaw deletes
    the window, which the others cascade from), in one transaction (with `last` written
    in it first: a call no look can have read). A zstd archive is one frame with its size, as node:zlib's
    zstdCompressSync writes it; `damage` makes of it what is stored (and digested)."""
    import zstandard
    gateway.execute("BEGIN IMMEDIATE")
    if last is not None:
        append_entry(gateway, session, last)
    lines = [json.dumps(entry, separators=(",", ":")) for s, _, entry in transcript(gateway)
             if s == session]
    blob = "\n".join(lines).encode() + b"\n"
    if encoding == "zstd":
        blob = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(blob)
    if damage is not None:
        blob = damage(blob)
    generation = gateway.execute("SELECT generation FROM transcript_rewrite_watermarks WHERE session_id = ?",
                                 (session,)).fetchone()[0]
    gateway.execute("INSERT INTO session_transcript_archives (session_id, generation, session_key, reason, "
                    "encoding, archive_blob, archive_sha256, archive_name, created_at) VALUES "
                    "(?, ?, ?, 'reset', ?, ?, ?, ?, ?)",
                    (session, generation, f"agent:main:{session}", encoding, blob,
                     hashlib.sha256(blob).hexdigest(), f"{session}.jsonl.reset.{generation}",
                     int(time.time() * 1000)))
    gateway.execute("DELETE FROM session_windows WHERE session_id = ?", (session,))
    gateway.execute("DELETE FROM transcript_events WHERE session_id = ?", (session,))
    gateway.execute("DELETE FROM transcript_rewrite_watermarks WHERE session_id = ?", (session,))
    gateway.execute("COMMIT")


@needs_stores
def test_calls_of_a_session_archived_before_they_were_read_are_stored_once(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """OpenClaw moves a session it resets or deletes into an archive row, in the transaction that
    deletes its entries: calls made while otrace was stopped (or between two looks) are read from
    there, once; a session never read whole, compressed too. An entry read before is not stored again,
    also when retention has deleted its row since (the session's newest call too), nor when the newest
    archive is deleted (the place otrace kept names another)."""
    node, db, template = store_followed(tmp_path, run)
    env = node.env                                        # to start otrace on the same store again
    gateway = gateway_connection(db)
    for session in ("reset-later", "never-seen", "archived-at-once", "after-a-delete"):
        new_session(gateway, session)
    read = a_call(template, 1000, 0.001)
    append_entry(gateway, "reset-later", read)
    wait_traces(node, 7)
    assert node.stop() == 0
    unread = [a_call(template, n, 0.001) for n in (2000, 3000)]
    for entry in unread:
        append_entry(gateway, "reset-later", entry)
    never_seen = a_call(template, 4000, 0.004)
    append_entry(gateway, "never-seen", never_seen, compressed=True)
    old_session = store_entries(db)[0][0]                 # a real session, read whole
    with contextlib.closing(sqlite3.connect(node.db_path)) as conn, conn:    # retention took some rows
        gone = conn.execute("DELETE FROM llm_traces WHERE trace_id = (SELECT trace_id FROM llm_traces WHERE "
                            "session_id = ? LIMIT 1) RETURNING trace_id", (old_session,)).fetchall()
        gone += conn.execute("DELETE FROM llm_traces WHERE trace_id = ? RETURNING trace_id",
                             (f"oc:main:reset-later:{read['id']}",)).fetchall()     # a second ago
    archive_session(gateway, "reset-later")
    archive_session(gateway, "never-seen", "zstd")
    archive_session(gateway, old_session)
    again = run(env, db=node.db_path)
    later = a_call(template, 5000, 0.005)                 # archived while otrace runs
    append_entry(gateway, "archived-at-once", later)
    archive_session(gateway, "archived-at-once")
    wanted = {f"oc:main:{session}:{entry['id']}" for session, entry in (
        ("reset-later", unread[0]), ("reset-later", unread[1]), ("never-seen", never_seen),
        ("archived-at-once", later))}
    wait_until(lambda: wanted <= {r["trace_id"] for r in session_traces(again)}, what="the archived calls")
    wait_until(lambda: again.health()["queue_depth"] == 0, what="queue drained")
    duplicates = again.health()["events_duplicate"]
    gateway.execute("DELETE FROM session_transcript_archives WHERE session_id = 'archived-at-once'")
    last = a_call(template, 6000, 0.006)                  # takes the deleted archive's rowid
    append_entry(gateway, "after-a-delete", last)
    archive_session(gateway, "after-a-delete")
    gateway.close()
    wait_until(lambda: f"oc:main:after-a-delete:{last['id']}" in {
        r["trace_id"] for r in session_traces(again)}, what="the archive after a delete")
    wait_until(lambda: again.health()["queue_depth"] == 0, what="queue drained")
    traces = {r["trace_id"] for r in session_traces(again)}
    assert len(gone) == 2 and not {trace_id for (trace_id,) in gone} & traces     # not brought back
    assert len(traces) == 7 - len(gone) + 5 and again.health()["events_duplicate"] == duplicates
    assert again.health()["openclaw_sessions"]["undecodable"] == 0
    with contextlib.closing(sqlite3.connect(db)) as store:         # each archive there marked read whole
        archives = {(f"#archived\t{s}\t{g}", digest) for s, g, digest in store.execute(
            "SELECT session_id, generation, archive_sha256 FROM session_transcript_archives")}
    wait_until(lambda: archives <= set(again.query("SELECT stream, mark FROM openclaw_positions")),
               what="every archive read whole")         # the last call may come from the session first
    assert again.stop() == 0
    assert len(archives) == 4 and archives <= set(again.query("SELECT stream, mark FROM openclaw_positions"))


def archive_marks(node: Otrace) -> set[str]:
    """The sessions of the archives otrace keeps a mark of (read, or being read)."""
    return {stream.split("\t")[1] for (stream,) in node.query(
        "SELECT stream FROM openclaw_positions WHERE substr(stream, 1, 10) = '#archived' || char(9)")}


@needs_stores
def test_the_mark_of_an_archive_read_is_forgotten_once_the_archive_is_gone(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """An archive read leaves a mark in openclaw_positions, which keeps it from being read again: once
    OpenClaw deletes the archive (its pruning), its mark goes too, said once. The mark of an archive
    still there stays, also when deleting the newest has the archives listed from the first again:
    that one is not read again, and its call retention deleted does not come back, nor at a restart."""
    node, db, template = store_followed(tmp_path, run, **POLLED)
    env = node.env
    gateway = gateway_connection(db)
    calls = {}
    for session in ("kept", "pruned"):                    # archived as they are written: read there only
        new_session(gateway, session)
        calls[session] = a_call(template, 1000, 0.001)
        archive_session(gateway, session, last=calls[session])
    stored = {session: f"oc:main:{session}:{call['id']}" for session, call in calls.items()}
    wait_until(lambda: archive_marks(node) == {"kept", "pruned"}, what="both archives read")
    wait_until(lambda: set(stored.values()) <= {r["trace_id"] for r in session_traces(node)},
               what="their calls")
    with contextlib.closing(sqlite3.connect(node.db_path)) as conn, conn:    # retention took one
        assert conn.execute("DELETE FROM llm_traces WHERE trace_id = ?", (stored["kept"],)).rowcount == 1
    gateway.execute("DELETE FROM session_transcript_archives WHERE session_id = 'pruned'")   # the newest
    gateway.close()
    wait_until(lambda: archive_marks(node) == {"kept"}, what="the deleted archive's mark forgotten")
    wait_until(lambda: node.health()["queue_depth"] == 0, what="queue drained")
    said = node.logs("archives gone from the agent database: their marks forgotten")
    assert len(said) == 1 and said[0]["archives"] == 1 and said[0]["agent"] == "main"
    assert stored["kept"] not in {r["trace_id"] for r in session_traces(node)}
    assert node.health()["events_duplicate"] == 0 and node.stop() == 0
    again = run(env, db=node.db_path)
    wait_until(lambda: again.health()["openclaw_sessions"]["polls"] > 5, what="a few polls")
    wait_until(lambda: again.health()["queue_depth"] == 0, what="queue drained")
    assert archive_marks(again) == {"kept"} and not again.logs("archives gone from the agent database: "
                                                               "their marks forgotten")
    assert {r["trace_id"] for r in session_traces(again)} & set(stored.values()) == {stored["pruned"]}


def session_positions(node: Otrace) -> set[str]:
    """The sessions otrace keeps a position of (not the archives' marks)."""
    return {stream for (stream,) in node.query("SELECT stream FROM openclaw_positions WHERE agent = 'main' "
                                               "AND substr(stream, 1, 1) != '#'")}


@needs_stores
def test_the_position_of_a_session_ended_is_forgotten_and_nothing_is_read_twice(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A session OpenClaw resets or deletes leaves nothing in the agent database but its archive: once
    that is read, the session's position goes too (said once). Its calls are not stored again, not even
    those retention deleted, also by otrace started again, and none is missed: the call archived before
    a look read it is stored, and so are those of a session that comes back under the same id. A
    session emptied by a rewrite (its generation left) keeps its position."""
    node, db, template = store_followed(tmp_path, run, **POLLED)
    env = node.env
    gateway = gateway_connection(db)
    captured = gateway.execute("SELECT session_id FROM session_windows WHERE session_key = 'agent:main:s2'"
                               ).fetchone()[0]                      # a real session, with its window
    calls = {session: a_call(template, 1000, 0.001) for session in ("ended", "emptied")}
    for session, call in calls.items():
        new_session(gateway, session)
        append_entry(gateway, session, call)
    wait_traces(node, 8)
    assert {captured, "ended", "emptied"} < session_positions(node)
    stored = {r["trace_id"] for r in session_traces(node)}
    with contextlib.closing(sqlite3.connect(node.db_path)) as conn, conn:    # retention took these
        taken = {t for (t,) in conn.execute("SELECT trace_id FROM llm_traces WHERE session_id IN (?, ?)",
                                            (captured, "ended"))}
        conn.execute("DELETE FROM llm_traces WHERE session_id IN (?, ?)", (captured, "ended"))
    assert len(taken) >= 2
    unread = a_call(template, 2000, 0.002)
    archive_session(gateway, captured)
    archive_session(gateway, "ended", last=unread)
    gateway.execute("DELETE FROM transcript_events WHERE session_id = 'emptied'")   # rewritten to nothing
    new_generation(gateway, "emptied")
    wait_until(lambda: not {captured, "ended"} & session_positions(node), what="the ended sessions forgotten")
    assert {"emptied", captured} & session_positions(node) == {"emptied"}
    said = node.logs("sessions ended in the agent database: their positions forgotten")
    assert len(said) == 1 and (said[0]["agent"], said[0]["sessions"]) == ("main", 2)
    back = a_call(template, 3000, 0.003)
    new_session(gateway, "ended")                         # the same id again: a new generation from seq 0
    append_entry(gateway, "ended", back)
    gateway.close()
    want = stored - taken | {f"oc:main:ended:{unread['id']}", f"oc:main:ended:{back['id']}"}
    wait_until(lambda: {r["trace_id"] for r in session_traces(node)} >= want, what="the calls not read")
    wait_until(lambda: node.health()["queue_depth"] == 0, what="queue drained")
    assert sorted(r["trace_id"] for r in session_traces(node)) == sorted(want)
    assert node.health()["events_duplicate"] == 0
    positions = set(node.query("SELECT agent, stream, mark, position FROM openclaw_positions"))
    assert node.stop() == 0
    again = run(env, db=node.db_path)
    wait_until(lambda: again.health()["openclaw_sessions"]["polls"] > 5, what="a few polls")
    wait_until(lambda: again.health()["queue_depth"] == 0, what="queue drained")
    assert sorted(r["trace_id"] for r in session_traces(again)) == sorted(want)
    assert set(again.query("SELECT agent, stream, mark, position FROM openclaw_positions")) == positions
    assert again.health()["events_duplicate"] == 0 and not again.logs("sessions ended")


def without_zstandard(tmp_path: Path, compiled_part: bool = True) -> Path:
    """A directory that, first on PYTHONPATH, makes `import zstandard` fail as where it is not installed;
    without `compiled_part`, as in an otrace.pyz on another Python: the package's Python files alone."""
    stub = tmp_path / "no-zstandard"
    stub.mkdir()
    if compiled_part:
        (stub / "zstandard.py").write_text("raise ModuleNotFoundError(\"No module named 'zstandard'\", "
                                           "name='zstandard')\n")
    else:
        import zstandard
        shutil.copytree(Path(zstandard.__file__).parent, stub / "zstandard",
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return stub


@needs_stores
def test_a_session_ended_keeps_its_position_until_its_archive_is_read(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """The archive of a session ended is read past where its position stands: while it waits (a zstd
    one, otrace without the zstandard package) the position stays, across a restart; read at last,
    it gives only the call not read before (not the one retention deleted), and the position goes."""
    stub = without_zstandard(tmp_path)
    node, db, template = store_followed(tmp_path, run, **POLLED, PYTHONPATH=str(stub))
    env = {key: value for key, value in node.env.items() if key != "PYTHONPATH"}     # with the package
    gateway = gateway_connection(db)
    read, unread = a_call(template, 1000, 0.001), a_call(template, 2000, 0.002)
    new_session(gateway, "zipped")
    append_entry(gateway, "zipped", read)
    wait_traces(node, 7)
    assert node.stop() == 0
    with contextlib.closing(sqlite3.connect(node.db_path)) as conn, conn:    # retention took it
        assert conn.execute("DELETE FROM llm_traces WHERE session_id = 'zipped'").rowcount == 1
    archive_session(gateway, "zipped", "zstd", last=unread)
    gateway.close()
    waiting = run({**env, "PYTHONPATH": str(stub)}, db=node.db_path)      # its first look lists all
    wait_until(lambda: "pip install zstandard" in str(waiting.health()["openclaw_sessions"]["agent_errors"]),
               what="the archive waiting for zstandard")
    wait_until(lambda: waiting.health()["openclaw_sessions"]["polls"] > 5, what="a few polls")
    assert "zipped" in session_positions(waiting) and not waiting.logs("sessions ended")
    assert waiting.stop() == 0
    again = run(env, db=node.db_path)
    wait_until(lambda: "zipped" not in session_positions(again), what="the position forgotten")
    wait_until(lambda: again.health()["queue_depth"] == 0, what="queue drained")
    assert {r["trace_id"] for r in session_traces(again) if r["session_id"] == "zipped"} == {
        f"oc:main:zipped:{unread['id']}"}


def test_a_zstd_archive_is_whole_only_when_its_last_frame_ends_at_its_end() -> None:
    """Frames as zstandard and node:zlib write them (a content size or not, a checksum or not, a
    trailing empty frame, a skippable one) are whole; every prefix of one frame is cut short, and
    bytes that are no frame are said so."""
    import zstandard
    text = b"".join(b'{"type":"message","n":%d,"pad":"%s"}\n' % (n, os.urandom(n % 97).hex().encode())
                    for n in range(4000))
    frames = [zstandard.ZstdCompressor(level=level, write_checksum=checksum, write_content_size=size
                                       ).compress(text)
              for level, checksum, size in ((1, False, True), (3, True, False), (19, True, True))]
    streamed = zstandard.ZstdCompressor().compressobj()
    frames.append(streamed.compress(text) + streamed.flush())
    frames.append(frames[0] + zstandard.ZstdCompressor().compress(b""))
    frames.append(frames[1] + (0x184D2A53).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"xyz")
    assert [otrace.zstd_damage(blob) for blob in frames] == [None] * len(frames)
    one = frames[0]
    assert len(one) > 3 * 4096 and all("cut short" in (otrace.zstd_damage(one[:end]) or "")
                                       for end in (*range(1, 64), *range(64, len(one), 97), len(one) - 1))
    assert otrace.zstd_damage(b"") == "an empty zstd archive: no frame"
    assert otrace.zstd_damage(b"not zstd") == "no zstd frame at byte 0 of 8"
    assert otrace.zstd_damage(one + b"junk!") == f"no zstd frame at byte {len(one)} of {len(one) + 5}"


@needs_stores
@pytest.mark.parametrize("cut", ["in-a-block", "in-the-frame-header"])
def test_a_zstd_archive_cut_short_is_counted_undecodable_and_said_once(
        tmp_path: Path, run: Callable[..., Otrace], cut: str) -> None:
    """A zstd archive whose frame stops before its end (zstandard's stream reader ends it without an
    error): its calls before the cut are stored, the archive counts once in `undecodable` and is said
    once, the archive after it is read, and neither is read again at the next start."""
    node, db, template = store_followed(tmp_path, run, **POLLED)
    env = node.env
    assert node.stop() == 0
    gateway = gateway_connection(db)
    for session in ("cut-short", "whole"):
        new_session(gateway, session)
    before = [a_call(template, n, 0.001) for n in (1000, 2000)]
    for entry in before:
        append_entry(gateway, "cut-short", entry)
    filler = {"type": "message", "id": str(uuid.uuid4()), "timestamp": otrace.iso(time.time()),
              "message": {"role": "user", "content": os.urandom(150_000).hex()}}   # past a 128 KiB block
    append_entry(gateway, "cut-short", filler)
    lost = a_call(template, 3000, 0.003)
    append_entry(gateway, "cut-short", lost)
    whole = a_call(template, 4000, 0.004)
    append_entry(gateway, "whole", whole)
    archive_session(gateway, "cut-short", "zstd",
                    damage=lambda blob: blob[:-9] if cut == "in-a-block" else blob[:5])
    archive_session(gateway, "whole", "zstd")
    gateway.close()
    node = run(env, db=node.db_path)
    wanted = {f"oc:main:whole:{whole['id']}"} | ({f"oc:main:cut-short:{e['id']}" for e in before}
                                                  if cut == "in-a-block" else set())
    wait_until(lambda: wanted <= {r["trace_id"] for r in session_traces(node)}, what="the archived calls")
    wait_until(lambda: node.health()["queue_depth"] == 0, what="queue drained")
    said = node.wait_log(lambda e: e.get("message") == "session entry cannot be read; skipped")
    assert said["entry"] == "main/cut-short.archive" and "cut short" in said["error"]
    health = node.health()
    assert health["openclaw_sessions"]["undecodable"] == 1
    assert f"oc:main:cut-short:{lost['id']}" not in {r["trace_id"] for r in session_traces(node)}
    assert len(session_traces(node)) == 6 + len(wanted)
    assert node.stop() == 0
    again = run(env, db=node.db_path)                     # marked read: not read, counted or said again
    wait_until(lambda: again.health()["openclaw_sessions"]["polls"] > 5, what="a few polls")
    assert again.health()["openclaw_sessions"]["undecodable"] == 0
    assert not again.logs("session entry cannot be read; skipped")
    assert len(session_traces(again)) == 6 + len(wanted)


@needs_stores
@pytest.mark.parametrize("stopped", [True, False])
def test_a_reset_that_keeps_the_session_id_stores_each_call_once(tmp_path: Path, run: Callable[..., Otrace],
                                                                 stopped: bool) -> None:
    """A reset that keeps the session's id: its generation read goes to an archive and the new one
    starts at seq 0 again. The archive is read where otrace stood (not the last minute again, whose
    rows retention took), then the new entries; with otrace stopped across it, or between two looks."""
    node, db, template = store_followed(tmp_path, run)
    env = node.env                                        # to start otrace on the same store again
    gateway = gateway_connection(db)
    new_session(gateway, "kept")
    read = [a_call(template, n, 0.001) for n in (1000, 2000, 3000)]
    for entry in read:
        append_entry(gateway, "kept", entry)
    wait_traces(node, 9)
    if stopped:
        assert node.stop() == 0
    with contextlib.closing(sqlite3.connect(node.db_path)) as conn, conn:    # retention took them
        conn.execute("DELETE FROM llm_traces WHERE session_id = 'kept'")
    unread, after = a_call(template, 4000, 0.004), a_call(template, 5000, 0.005)
    archive_session(gateway, "kept", last=unread)
    new_session(gateway, "kept")                          # the same id, a new generation from seq 0
    append_entry(gateway, "kept", after)
    gateway.close()
    node = run(env, db=node.db_path) if stopped else node
    want = {f"oc:main:kept:{unread['id']}", f"oc:main:kept:{after['id']}"}
    wait_until(lambda: want <= {r["trace_id"] for r in session_traces(node)}, what="the calls not read")
    wait_until(lambda: node.health()["queue_depth"] == 0, what="queue drained")
    assert {r["trace_id"] for r in session_traces(node) if r["session_id"] == "kept"} == want


@needs_stores
def test_a_fifo_at_an_agents_database_is_that_agents_fault_not_a_hang(tmp_path: Path,
                                                                      run: Callable[..., Otrace]) -> None:
    """SQLite opening a FIFO waits for a writer for good: the path is checked first, and the other
    agents are read meanwhile."""
    state = state_copy(tmp_path)
    fifo = agent_db(state, "other")
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    node = run({**STORE_ENV, "TRACE_OPENCLAW_STATE_DIR": str(state)})
    wait_traces(node, 6)
    errors = wait_until(lambda: node.health()["openclaw_sessions"]["agent_errors"], what="its fault")
    assert "not a regular file" in errors["other"] and node.stop() == 0


def test_a_directory_where_the_reserve_goes_leaves_the_writer_writing(tmp_path: Path,
                                                                      run: Callable[..., Otrace]) -> None:
    """No reserve file can be made (a directory at its path): no reserve, said at start, and the
    writer goes on (its cleanup raised, and the writer thread died)."""
    (tmp_path / "otrace.db-reserve").mkdir()
    node = run()
    node.wait_log(lambda e: e.get("message") == "disk reserve not held: no room for it")
    assert node.post("/v1/traces", trace()).status == 202
    node.wait_persisted(1)
    assert node.health()["writer_alive"] and node.stop() == 0


@needs_stores
def test_a_compressed_entry_zstandard_cannot_load_says_why(tmp_path: Path,
                                                         run: Callable[..., Otrace]) -> None:
    """zstandard there without its compiled part for this Python (an otrace.pyz started on another
    Python version): the entry waits, and the fault says so, not to install the package."""
    node, db, template = store_followed(tmp_path, run, PYTHONPATH=str(without_zstandard(tmp_path, False)))
    gateway = gateway_connection(db)
    append_entry(gateway, next(s for s, _, _ in store_entries(db)), a_call(template, 1000, 0.001),
                 compressed=True)
    gateway.close()
    fault = wait_until(lambda: node.health()["openclaw_sessions"]["agent_errors"].get("main"),
                       what="the agent's fault")
    assert "zstandard.backend_c" in fault and "not for Python 3." in fault and "otrace.pyz" in fault
    assert "pip install" not in fault


@needs_stores
def test_a_compressed_entry_read_without_zstandard_waits_for_it(tmp_path: Path,
                                                                run: Callable[..., Otrace]) -> None:
    """otrace dropped beside the agent without the zstandard package: a session's compressed entry is
    the agent's fault in /health and its session waits there, after the entries before it, as a zstd
    archive waits, while the other sessions are read; run again with the package, the calls are
    stored (they used to be skipped for good)."""
    stub = without_zstandard(tmp_path)
    node, db, template = store_followed(tmp_path, run, PYTHONPATH=str(stub))
    env = {key: value for key, value in node.env.items() if key != "PYTHONPATH"}     # with the package
    gateway = gateway_connection(db)
    session, archived = dict.fromkeys(s for s, _, _ in store_entries(db))
    before, squeezed, after, elsewhere, unread = (a_call(template, n, 0.001) for n in range(1000, 6000, 1000))
    archive_session(gateway, archived, "zstd", last=unread)
    append_entry(gateway, session, before)
    append_entry(gateway, session, squeezed, compressed=True)
    append_entry(gateway, session, after)
    append_entry(gateway, "another-session", elsewhere)
    gateway.close()
    wait_traces(node, 8)                                  # the other session, and the call before it
    health = wait_until(lambda: (h := node.health())["openclaw_sessions"]["agent_errors"] and h,
                        what="the agent's fault")
    assert "pip install zstandard" in health["openclaw_sessions"]["agent_errors"]["main"]
    assert health["status"] == "degraded" and health["openclaw_sessions"]["undecodable"] == 0
    assert node.stop() == 0
    stored = {r["trace_id"] for r in session_traces(node)}
    assert len(stored) == 8 and {f"oc:main:another-session:{elsewhere['id']}",
                                 f"oc:main:{session}:{before['id']}"} <= stored
    again = run(env, db=node.db_path)
    rows = wait_traces(again, 11)
    assert {f"oc:main:{session}:{squeezed['id']}", f"oc:main:{session}:{after['id']}",
            f"oc:main:{archived}:{unread['id']}"} <= {r["trace_id"] for r in rows}
    wait_until(lambda: not again.health()["openclaw_sessions"]["agent_errors"], what="the fault cleared")


@needs_stores
def test_calls_stored_after_the_gateways_clock_stepped_back_are_read(tmp_path: Path,
                                                                    run: Callable[..., Otrace]) -> None:
    """A clock a day fast at boot, then set right (NTP, a resume from suspend): the calls stored after
    it, at times before the newest read, come at new seqs of the same generation, and are calls."""
    node, db, template = store_followed(tmp_path, run)
    gateway = gateway_connection(db)
    session = store_entries(db)[0][0]
    now = int(time.time() * 1000)
    calls = [a_call(template, 1000 * n, 0.003) for n in (1, 2, 3)]
    append_entry(gateway, session, calls[0], created=now + 86_400_000)
    wait_traces(node, 7)                                      # read: the newest entry a day ahead
    append_entry(gateway, session, calls[1], created=now)
    append_entry(gateway, session, calls[2], created=now + 5_000)
    rows = wait_traces(node, 9, timeout=30)
    assert {r["trace_id"] for r in rows[6:]} == {f"oc:main:{session}:{call['id']}" for call in calls}
    gateway.close()


@needs_stores
def test_a_store_moved_in_anew_keeps_calls_past_where_otrace_read_whatever_their_time(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A copy of the agent database moved over it (a state directory moved to another disk) holds a call
    written after the last one otrace read, at a later seq, but stamped minutes before it (the
    gateway's clock set back meanwhile): a call all the same, as it would be in the same file (it was
    dropped: a session read again took only entries less than a minute older than the newest read)."""
    node, db, template = store_followed(tmp_path, run)
    session = store_entries(db)[0][0]
    gateway = gateway_connection(db)
    now = int(time.time() * 1000)
    append_entry(gateway, session, a_call(template, 1000, 0.003), created=now)
    wait_traces(node, 7)
    gateway.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    gateway.close()
    copy = tmp_path / "copy.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as source, contextlib.closing(sqlite3.connect(copy)) as into:
        source.backup(into)
    late = a_call(template, 2000, 0.003)
    with contextlib.closing(gateway_connection(copy)) as writing:        # written there, not read before
        append_entry(writing, session, late, created=now - 180_000)      # the clock set back 3 minutes
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    copy.rename(db)
    with contextlib.closing(gateway_connection(db)) as gateway:          # the gateway started again
        after = a_call(template, 3000, 0.003)
        append_entry(gateway, session, after)
        rows = wait_traces(node, 9, timeout=60)
    assert {f"oc:main:{session}:{call['id']}" for call in (late, after)} <= {r["trace_id"] for r in rows}
    assert len(session_traces(node)) == 9
    # said before the rows were offered, but read off otrace's stdout by another thread here: waited for
    node.wait_log(lambda e: e.get("message") == "agent database put back or cut: sessions read again")


@needs_stores
@pytest.mark.parametrize("restore", ["mv", "mv-while-stopped", "copied", "copied-sidecars-removed",
                                     "sidecars-removed", "copied-while-stopped", "cut"])
def test_calls_written_after_a_backup_of_the_store_is_restored_are_read(tmp_path: Path, restore: str,
                                                                       run: Callable[..., Otrace]) -> None:
    """A backup moved over the agent database ends its sessions below where otrace read to, as does a
    session's end cut in place with its generation kept: the gateway's next calls take seqs otrace had
    read past. Also when the backup is copied over the file (its inode kept, which SQLite's wal-index
    does not see), with or without its -wal and -shm removed, or only those removed (otrace's connection
    held the removed ones); and when it is moved in or copied over while otrace is stopped, and the
    calls are written before it starts again."""
    node, db, template = store_followed(tmp_path, run, **POLLED)
    session = store_entries(db)[0][0]
    backup = tmp_path / "backup.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as source, \
            contextlib.closing(sqlite3.connect(backup)) as copy:
        source.backup(copy)
    gateway = gateway_connection(db)
    end = append_entry(gateway, session, a_call(template, 1000, 0.003)) - 1
    append_entry(gateway, session, a_call(template, 2000, 0.003))
    wait_traces(node, 8)
    if restore.startswith("mv"):
        if restore == "mv-while-stopped":
            assert node.stop() == 0
        gateway.close()                                      # the gateway stopped for the restore
        for suffix in ("-wal", "-shm"):                      # which takes the backup alone
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        backup.rename(db)
        gateway = gateway_connection(db)
    elif restore == "copied-while-stopped":
        assert node.stop() == 0
        with contextlib.closing(sqlite3.connect(backup)) as source:
            source.backup(gateway)                           # into the same file: its inode kept
    elif restore != "cut":                                   # while otrace reads on
        gateway.execute("PRAGMA wal_checkpoint(TRUNCATE)")   # the gateway stopped: otrace keeps its WAL
        polls = node.health()["openclaw_sessions"]["polls"]  # a checkpoint has otrace open the file anew:
        wait_until(lambda: node.health()["openclaw_sessions"]["polls"] >= polls + 2, what="a look after it")
        gateway.close()                                      # closed meanwhile, it would remove the WAL
        if restore.endswith("sidecars-removed"):
            for suffix in ("-wal", "-shm"):
                Path(f"{db}{suffix}").unlink()
        if restore.startswith("copied"):
            shutil.copyfile(backup, db)                      # as cp does: the same inode, its bytes anew
        gateway = gateway_connection(db)
    else:
        polls = node.health()["openclaw_sessions"]["polls"]
        gateway.execute("DELETE FROM transcript_events WHERE session_id = ? AND seq > ?", (session, end))
        wait_until(lambda: node.health()["openclaw_sessions"]["polls"] >= polls + 2, what="a look after it")
    calls = [a_call(template, 1000 * n, 0.003) for n in (3, 4, 5)]
    for call in calls:
        append_entry(gateway, session, call)
    if restore.endswith("while-stopped"):
        node = run(node.env)
    rows = wait_traces(node, 11, timeout=60)
    assert {f"oc:main:{session}:{call['id']}" for call in calls} <= {r["trace_id"] for r in rows}
    assert len(session_traces(node)) == 11
    said = "agent database put back or cut: sessions read again"
    if restore != "sidecars-removed":              # read off otrace's stdout by another thread: waited for
        node.wait_log(lambda e: e.get("message") == said)
    else:
        assert not node.logs(said)
    gateway.close()


@needs_stores
def test_an_agent_database_overwritten_in_place_degrades_health_until_it_is_good_again(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """Garbage written over the file's first pages (its inode, size and modification time kept, its
    -wal and -shm untouched): otrace's cached pages must not hide it; /health is degraded while no one
    can read the file, and the calls written once a good copy is back are read."""
    node, db, template = store_followed(tmp_path, run, **POLLED)
    gateway = gateway_connection(db)
    gateway.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    gateway.close()
    good = tmp_path / "good.sqlite"
    shutil.copyfile(db, good)
    polls = node.health()["openclaw_sessions"]["polls"]       # the checkpoint looked at: nothing new
    wait_until(lambda: node.health()["openclaw_sessions"]["polls"] >= polls + 2, what="a look after it")
    before = db.stat()
    with db.open("r+b") as file:
        file.write(os.urandom(8192))
    os.utime(db, ns=(before.st_atime_ns, before.st_mtime_ns))   # as cp -p or touch -r would
    degraded = wait_until(lambda: (h := node.request("GET", "/health")).status == 503 and h.json, timeout=30,
                          what="/health degraded")
    assert "SQLITE_NOTADB" in degraded["openclaw_sessions"]["agent_errors"]["main"]
    shutil.copyfile(good, db)                                 # a good copy back, in place too
    gateway = gateway_connection(db)
    session = store_entries(db)[0][0]
    call = a_call(template, 4000, 0.003)
    append_entry(gateway, session, call)
    assert wait_traces(node, 7)[-1]["trace_id"] == f"oc:main:{session}:{call['id']}"
    wait_until(lambda: node.request("GET", "/health").status == 200, what="/health ok again")
    gateway.close()


@needs_stores
def test_a_session_file_line_written_in_two_pieces_waits_for_its_end(tmp_path: Path,
                                                                     run: Callable[..., Otrace]) -> None:
    state = state_copy(tmp_path, STATE_7)
    sessions = state / "agents" / "main" / "sessions"
    transcript = next(p for p in sessions.glob("*.jsonl") if not p.name.endswith(".trajectory.jsonl"))
    template = next(json.loads(line) for line in transcript.read_text().splitlines()
                    if '"assistant"' in line)
    node = run({**STORE_ENV, **POLLED, "TRACE_OPENCLAW_STATE_DIR": str(state)})
    wait_traces(node, 3)
    line = json.dumps(a_call(template, 700, 0.002)).encode() + b"\n"
    append(transcript, line[:100])
    polls = node.health()["openclaw_sessions"]["polls"]
    wait_until(lambda: node.health()["openclaw_sessions"]["polls"] > polls + 10, what="10 polls")
    assert len(session_traces(node)) == 3
    append(transcript, line[100:])
    assert wait_traces(node, 4)[-1]["total_tokens"] == 710
    new = sessions / "77777777-0000-4000-8000-000000000000.jsonl"    # a new session file, picked up
    new.write_bytes(json.dumps(a_call(template, 800, 0.002)).encode() + b"\n")
    assert wait_traces(node, 5)[-1]["session_id"] == new.stem
    assert not node.logs("sessions failing")


@needs_stores
def test_a_session_file_renamed_at_a_reset_is_read_on_from_where_it_was(tmp_path: Path,
                                                                        run: Callable[..., Otrace]) -> None:
    """OpenClaw before 2026.8 renames a session's file when it resets or deletes it: lines added while
    otrace was stopped are read from the renamed file, from where its live name was read (a line whose
    row retention deleted meanwhile does not come back); a renamed file never read is read whole."""
    state = state_copy(tmp_path, STATE_7)
    sessions = state / "agents" / "main" / "sessions"
    transcript = next(p for p in sessions.glob("*.jsonl") if not p.name.endswith(".trajectory.jsonl"))
    template = next(json.loads(line) for line in transcript.read_text().splitlines()
                    if '"assistant"' in line)
    env = {**STORE_ENV, "TRACE_OPENCLAW_STATE_DIR": str(state)}
    node = run(env)
    wait_traces(node, 3)
    assert node.stop() == 0
    with contextlib.closing(sqlite3.connect(node.db_path)) as conn, conn:    # retention took one of its rows
        gone = conn.execute("DELETE FROM llm_traces WHERE session_id = ? RETURNING trace_id",
                            (transcript.stem,)).fetchall()[:1]
    late, never = a_call(template, 700, 0.002), a_call(template, 800, 0.002)
    append(transcript, json.dumps(late).encode() + b"\n")
    transcript.rename(sessions / f"{transcript.name}.reset.2026-12-03T22-00-00.000Z")
    (sessions / "77777777-0000-4000-8000-000000000000.jsonl.deleted.2026-12-03T22-00-01.000Z").write_bytes(
        json.dumps(never).encode() + b"\n")
    again = run(env, db=node.db_path)
    wanted = {f"oc:main:{transcript.stem}:{late['id']}", f"oc:main:77777777-0000-4000-8000-000000000000:"
                                                         f"{never['id']}"}
    wait_until(lambda: wanted <= {r["trace_id"] for r in session_traces(again)}, what="both calls")
    wait_until(lambda: again.health()["queue_depth"] == 0, what="queue drained")
    traces = {r["trace_id"] for r in session_traces(again)}
    assert gone and gone[0][0] not in traces and len(traces) == 3 - len(gone) + 2


@needs_stores
def test_an_agent_that_appears_later_is_followed_and_waited_for_quietly(tmp_path: Path,
                                                                        run: Callable[..., Otrace]) -> None:
    """The state directory, then an agent directory, then its database before its first turn: each is
    waited for without a fault; the second agent's calls are its own rows."""
    state = tmp_path / "state"
    node = run({**STORE_ENV, **POLLED, "TRACE_OPENCLAW_STATE_DIR": str(state)})
    waiting = node.wait_log(lambda e: e.get("message", "").startswith("waiting for OpenClaw's state"))
    assert waiting["level"] == "WARNING" and "usage spans are not stored" in waiting["message"]
    state_copy(tmp_path, name="first").rename(state)             # appears whole
    wait_traces(node, 6)
    (state / "agents" / "ops" / "agent").mkdir(parents=True)
    polls = node.health()["openclaw_sessions"]["polls"]
    wait_until(lambda: node.health()["openclaw_sessions"]["polls"] > polls + 10, what="10 polls")
    shutil.copy(agent_db(state), tmp_path / "ops.sqlite")
    (tmp_path / "ops.sqlite").rename(agent_db(state, "ops"))      # its first turn made it
    rows = wait_traces(node, 12)
    assert sorted(r["trace_id"].split(":")[1] for r in rows) == ["main"] * 6 + ["ops"] * 6
    assert node.health()["openclaw_sessions"]["agents"] == ["main", "ops"]
    assert [e["message"] for e in node.lines if e.get("logger") == "otrace.sessions"] == [
        waiting["message"], "following OpenClaw's session store", "following agent database",
        "following agent database"]


@needs_stores
def test_sigkill_while_following_a_live_store_loses_and_repeats_nothing(tmp_path: Path,
                                                                         run: Callable[..., Otrace]) -> None:
    """A gateway connection keeps adding calls across sessions while otrace is killed at random moments
    of its reading; the otrace started last holds every call exactly once."""
    import random
    state = state_copy(tmp_path)
    db = agent_db(state)
    template = assistant_template(db)
    gateway = gateway_connection(db)
    gateway.execute("BEGIN")
    for n in range(12_000):                              # a backlog to be caught up on while killed
        append_entry(gateway, f"backlog-{n % 7}", a_call(template, n, n / 1e6), compressed=n % 5 == 0)
    gateway.execute("COMMIT")
    stop = threading.Event()

    def gateway_writes() -> None:
        n = 0
        while not stop.is_set():
            append_entry(gateway, f"live-{n % 3}", a_call(template, n, n / 1e6))
            n += 1
            time.sleep(0.003)

    writer = threading.Thread(target=gateway_writes)
    writer.start()
    env = {**STORE_ENV, "TRACE_OPENCLAW_STATE_DIR": str(state), "TRACE_QUEUE_SIZE": "64",
           "TRACE_BATCH_WINDOW": "5ms"}
    rng = random.Random(19)
    try:
        for _ in range(8):
            node = run(env, db=tmp_path / "otrace.db")
            time.sleep(rng.uniform(0.05, 0.5))
            node.kill()
    finally:
        stop.set()
        writer.join()
    calls = {f"oc:main:{session}:{entry['id']}" for session, _, entry in store_entries(db)
             if entry.get("type") == "message" and entry["message"]["role"] == "assistant"}
    gateway.close()
    node = run(env, db=tmp_path / "otrace.db")
    wait_until(lambda: len(session_traces(node)) >= len(calls), timeout=60, what=f"{len(calls)} calls")
    wait_until(lambda: node.health()["queue_depth"] == 0, what="queue drained")
    stored = [r["trace_id"] for r in session_traces(node)]
    assert len(stored) == len(set(stored)) and set(stored) == calls


@needs_stores
def test_a_store_deleted_then_replaced_by_a_fresh_one_is_read_without_repeats(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    state = state_copy(tmp_path)
    db = agent_db(state)
    template = assistant_template(db)
    fresh = tmp_path / "fresh.sqlite"                    # the agent's store started over: no transcript
    shutil.copy(db, fresh)
    with contextlib.closing(gateway_connection(fresh)) as conn:
        conn.execute("DELETE FROM transcript_events")
        call = a_call(template, 900, 0.0027)
        append_entry(conn, "after-reset", call)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    node = run({**STORE_ENV, **POLLED, "TRACE_OPENCLAW_STATE_DIR": str(state)})
    wait_traces(node, 6)
    for suffix in ("", "-wal", "-shm"):                  # deleted: waited for, said once
        Path(str(db) + suffix).unlink(missing_ok=True)
    gone = node.wait_log(lambda e: e.get("message") == "agent database gone: waiting for it")
    assert (gone["level"], gone["agent"], gone["path"]) == ("WARNING", "main", str(db))
    polls = node.health()["openclaw_sessions"]["polls"]
    wait_until(lambda: node.health()["openclaw_sessions"]["polls"] > polls + 10, what="10 polls")
    assert len(node.logs("agent database gone: waiting for it")) == 1 and node.health()["status"] == "ok"
    fresh.replace(db)                                    # a new file at the path
    rows = wait_traces(node, 7)
    node.wait_log(lambda e: e.get("message") == "agent database back")
    assert rows[-1]["trace_id"] == f"oc:main:after-reset:{call['id']}" and len(rows) == 7
    shutil.copy(agent_db(state_copy(tmp_path, name="again")), str(db) + ".new")
    Path(str(db) + ".new").replace(db)                   # the old store put back: nothing is new
    polls = node.health()["openclaw_sessions"]["polls"]
    wait_until(lambda: node.health()["openclaw_sessions"]["polls"] > polls + 10, what="10 polls")
    assert len(session_traces(node)) == 7 and not node.logs("sessions failing")


def store_in_process(tmp_path: Path, state: Path) -> otrace.SessionStore:
    """A SessionStore following `state` in this process, its rows offered to a queue no writer takes."""
    config = otrace.Config(db_path=str(tmp_path / "o.db"))
    otrace.open_database(config.db_path)
    return otrace.SessionStore(config, otrace.EventQueue(4096, 50), otrace.Database(config.db_path), state)


@needs_stores
def test_entries_read_again_after_a_full_queue_are_counted_once(tmp_path: Path) -> None:
    """A unit the queue refuses is read again: /health counts each entry once."""
    state = state_copy(tmp_path)
    (tmp_path / "alone").mkdir()
    alone = store_in_process(tmp_path / "alone", state)
    alone.look()
    config = otrace.Config(db_path=str(tmp_path / "o.db"))
    otrace.open_database(config.db_path)
    events = held_by_a_client(8)
    store = otrace.SessionStore(config, events, otrace.Database(config.db_path), state)
    store.tick()
    assert store.behind and store.totals.snapshot()["calls"] == 0       # its first unit was refused
    while store.behind:
        taken(events)
        store.tick()
    assert store.totals.snapshot() == alone.totals.snapshot() and alone.totals.snapshot()["calls"] > 0


@needs_stores
def test_a_quiet_store_takes_a_few_stat_calls_until_a_file_it_reads_changes(tmp_path: Path) -> None:
    """After a look that found nothing, a look at the same files lists no directory; a call committed
    into the WAL of a connection held open like the gateway's, and a new agent, are each what the
    next look sees."""
    state = state_copy(tmp_path)
    db = agent_db(state)
    template = assistant_template(db)
    store = store_in_process(tmp_path, state)
    store.stamps = otrace.Stamps(margin_ns=0)            # files written just now are trusted here

    def calls() -> int:
        return store.totals.snapshot()["calls"]

    assert [quick_look(store), quick_look(store), quick_look(store), quick_look(store)] == [
        False, False, True, True] and calls() == 6
    gateway = gateway_connection(db)
    append_entry(gateway, "s1", a_call(template, 1000, 0.003))   # the look after it lists every session
    assert [quick_look(store), quick_look(store), quick_look(store), quick_look(store)] == [
        False, False, False, True]
    assert calls() == 7
    shutil.copytree(agent_db(state).parent, state / "agents" / "ops" / "agent")
    assert [quick_look(store), quick_look(store), quick_look(store)] == [False, False, True]
    assert calls() == 14 and store.health()["agents"] == ["main", "ops"]
    gateway.close()


@needs_stores
def test_a_quiet_store_waits_for_the_kernels_word_that_a_file_it_reads_changed(tmp_path: Path) -> None:
    """Once a look finds nothing, the store's reader waits for inotify's word rather than its next poll:
    a call committed into the WAL of a connection held open like the gateway's, and a new agent, each
    end the wait and are what the next look reads."""
    state = state_copy(tmp_path)
    db = agent_db(state)
    template = assistant_template(db)
    store = store_in_process(tmp_path, state)
    store.stamps = otrace.Stamps(margin_ns=0)            # files written just now are trusted here
    store.notified_poll = 86400.0

    def calls_when_quiet() -> int:
        look_until_quiet(store)
        return store.totals.snapshot()["calls"]

    with contextlib.closing(gateway_connection(db)) as gateway:       # held open, as the gateway's
        assert calls_when_quiet() == 6
        changed_during_the_wait(store, lambda: append_entry(gateway, "s1", a_call(template, 1000, 0.003)))
        assert calls_when_quiet() == 7
    changed_during_the_wait(store, lambda: shutil.copytree(db.parent, state / "agents" / "ops" / "agent"))
    assert calls_when_quiet() == 14 and store.health()["agents"] == ["main", "ops"]


@needs_stores
def test_a_rewritten_session_read_again_across_looks_takes_its_old_entries_at_none(tmp_path: Path) -> None:
    """A session OpenClaw rewrote is read again from its start, its entries older than the newest read
    by a minute left out (read before; retention may have deleted their rows). A read cut short (the
    gateway's lock, a stop) goes on at the next look with the same judgement, not as new entries: it
    takes what a read in one go takes."""
    state = state_copy(tmp_path)
    db = agent_db(state)
    (tmp_path / "whole").mkdir()
    (tmp_path / "cut").mkdir()
    whole, cut = store_in_process(tmp_path / "whole", state), store_in_process(tmp_path / "cut", state)
    for store in (whole, cut):
        store.look()
    assert whole.totals.snapshot()["calls"] == cut.totals.snapshot()["calls"] == 6
    session = max(store_entries(db), key=lambda e: e[1])[0]           # the longest session
    with contextlib.closing(gateway_connection(db)) as gateway:
        new_generation(gateway, session)
    for store in (whole, cut):
        store.look()                     # rows added since the last look: none (the whole list is next)
        store.most = 2                                               # entries a unit: several units
    # the first read meets the new generation, the second reads a unit from the start, the third a lock
    look_cut_short_by_a_lock(cut, at=3)
    assert cut.cursors["main", session].position >= 0                  # cut short after a unit
    for store in (whole, cut):
        store.look()                                                 # (cut's database opened afresh)
    assert cut.totals.snapshot()["calls"] == whole.totals.snapshot()["calls"]    # its last minute's


@needs_stores
def test_a_session_cut_while_it_is_read_again_is_read_again_from_its_start(tmp_path: Path) -> None:
    """A rewrite's reading again, cut short by a lock, then the session's end cut in place below where
    it got to, and a new call written there: the next look reads the session again from its start."""
    state = state_copy(tmp_path)
    db = agent_db(state)
    store = store_in_process(tmp_path, state)
    store.look()
    session = max(store_entries(db), key=lambda e: e[1])[0]           # the longest session
    gateway = gateway_connection(db)
    new_generation(gateway, session)
    store.look()                         # rows added since the last look: none (the whole list is next)
    store.most = 2
    look_cut_short_by_a_lock(store, at=4)
    got_to = store.cursors["main", session].position
    gateway.execute("DELETE FROM transcript_events WHERE session_id = ? AND seq > ?", (session, got_to - 3))
    before = store.totals.snapshot()["calls"]
    append_entry(gateway, session, a_call(assistant_template(db), 1000, 0.003))
    store.look()                                                     # the database opened afresh
    assert store.totals.snapshot()["calls"] == before + 1
    gateway.close()


@needs_stores
def test_a_look_after_a_commit_lists_only_the_sessions_with_rows_added(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first look, a commit makes a look search the rows past the last top by rowid, not list
    every session. Every session is listed when the commits stop, at once when rows were deleted from
    the end, and every STORE_LIST_EVERY while commits go on. A row that took the top's rowid, one
    deleted meanwhile, is found at once (its row at the top is not the one before), and so is an entry
    stored at the seq of one deleted where a session was read (the session is read again), even in
    the same millisecond: both were found only at the next listing or start."""
    state = state_copy(tmp_path)
    db = agent_db(state)
    template = assistant_template(db)
    store = store_in_process(tmp_path, state)
    store.look()
    ran: list[str] = []
    store.databases["main"].conn.set_trace_callback(ran.append)

    def look() -> tuple[str | None, int]:
        """Which listing a look ran, and the calls found so far."""
        ran.clear()
        store.look()
        listing = next((kind for kind, sql in (("every session", otrace.SESSIONS_SQL[:30]),
                                               ("added", "AS added")) if any(sql in s for s in ran)), None)
        return listing, store.totals.snapshot()["calls"]

    gateway = gateway_connection(db)
    assert look() == (None, 6)                                           # nothing committed
    append_entry(gateway, "s1", a_call(template, 1000, 0.003))
    assert look() == ("added", 7) and store.watched() == ()              # no quiet look until ...
    assert look() == ("every session", 7) and store.watched()            # ... the commits stop
    assert look() == (None, 7)
    gateway.execute("INSERT INTO cache_entries (scope, key, updated_at) VALUES ('t', 'k1', 0)")
    assert look() == ("added", 7)
    gateway.execute("DELETE FROM transcript_events WHERE rowid >= (SELECT max(rowid) - 1 FROM "
                    "transcript_events)")
    append_entry(gateway, "s2", a_call(template, 1000, 0.003))
    # the top came down; the session that lost its last entry is read again from its start, and the
    # calls of its last minute are counted again (their rows are stored once)
    assert look() == ("every session", 11)
    gateway.execute("DELETE FROM transcript_events WHERE rowid = (SELECT max(rowid) FROM transcript_events)")
    append_entry(gateway, "s3", a_call(template, 1000, 0.003))           # it takes s2's rowid
    assert look() == ("added", 12)
    append_entry(gateway, "s1", a_call(template, 1000, 0.003))
    last = "DELETE FROM transcript_events WHERE session_id = 's3' AND seq = (SELECT max(seq) FROM " \
           "transcript_events WHERE session_id = 's3')"
    gateway.execute(last)
    append_entry(gateway, "s3", a_call(template, 1000, 0.003))           # at the seq read, a new rowid
    assert look() == ("added", 14)
    created = gateway.execute("SELECT created_at FROM transcript_events ORDER BY rowid DESC").fetchone()[0]
    gateway.execute(last)
    # at the seq read, the same rowid, in the same millisecond: only its content tells it from the one before
    append_entry(gateway, "s3", a_call(template, 1000, 0.003), created=created)
    assert look() == ("added", 15)
    gateway.execute("INSERT INTO cache_entries (scope, key, updated_at) VALUES ('t', 'k2', 0)")
    assert look() == ("added", 15)                                       # while the commits go on
    monkeypatch.setattr(otrace, "STORE_LIST_EVERY", 0.0)
    gateway.execute("INSERT INTO cache_entries (scope, key, updated_at) VALUES ('t', 'k3', 0)")
    assert look() == ("every session", 15)
    gateway.close()


@needs_stores
def test_a_look_reads_no_row_past_its_top_so_the_next_one_sees_no_cut(tmp_path: Path) -> None:
    """The gateway commits between a look's read of the top and its read of the entries: the entry past
    the top is the next look's, whose search past the top finds it, and no session is taken for cut
    and read again (each time the gateway committed meanwhile, before: /health counted its calls again)."""
    state = state_copy(tmp_path)
    db = agent_db(state)
    template = assistant_template(db)
    store = store_in_process(tmp_path, state)
    store.look()
    gateway = gateway_connection(db)
    top_sql, after_the_top = store.databases["main"].top_sql, []

    def commit_after_the_top(sql: str) -> None:
        """The gateway's commit as the look begins reading entries, its top read."""
        if sql == top_sql:
            after_the_top.append(sql)
        elif after_the_top and sql == "BEGIN":
            after_the_top.clear()
            append_entry(gateway, "s1", a_call(template, 1000, 0.003))

    store.databases["main"].conn.set_trace_callback(commit_after_the_top)
    for n in range(1, 6):
        append_entry(gateway, "s1", a_call(template, 1000, 0.003))
        store.look()                                  # reads one call more than the commits before it
        assert store.totals.snapshot()["calls"] == 6 + 2 * n - 1, n
    store.databases["main"].conn.set_trace_callback(None)
    store.look()
    assert store.totals.snapshot()["calls"] == 6 + 10
    gateway.close()


@needs_stores
def test_an_entry_stored_where_the_last_top_was_is_found_when_more_came_after_it_or_a_checkpoint(
        tmp_path: Path) -> None:
    """A session's last entry, the top, deleted and another stored at its seq in the same millisecond
    (SQLite gives it the top's rowid), then another entry after it, or a checkpoint that has the store
    open the file again: the row at the last top is compared, and kept across the reopening."""
    state = state_copy(tmp_path)
    db = agent_db(state)
    template = assistant_template(db)
    store = store_in_process(tmp_path, state)
    gateway = gateway_connection(db)
    last = ("DELETE FROM transcript_events WHERE session_id = 's1' AND seq = (SELECT max(seq) FROM "
            "transcript_events WHERE session_id = 's1')")

    def replace_the_top() -> None:
        top = "SELECT session_id, created_at FROM transcript_events ORDER BY rowid DESC"
        session, created = gateway.execute(top).fetchone()
        assert session == "s1"
        gateway.execute(last)
        append_entry(gateway, "s1", a_call(template, 1000, 0.003, "again"), created=created)

    calls: set[str] = set()

    def look() -> int:
        """The calls offered so far, each once (a session read again offers some again)."""
        store.look()
        calls.update(row.values[0] for unit in taken(store.events) for row in unit.rows
                     if row.table == "llm_traces")
        return len(calls)

    append_entry(gateway, "s1", a_call(template, 1000, 0.003))
    assert look() == 7
    replace_the_top()
    append_entry(gateway, "s2", a_call(template, 1000, 0.003))          # past the rowid it took
    assert look() == 9
    append_entry(gateway, "s1", a_call(template, 1000, 0.003))
    assert look() == 10
    opened = store.databases["main"].conn
    replace_the_top()
    assert gateway.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    assert look() == 11 and store.databases["main"].conn is not opened
    gateway.close()


@needs_stores
def test_an_entry_stored_where_the_top_was_while_otrace_was_stopped_is_found_at_the_next_start(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """While otrace is stopped, the gateway deletes the last entry it read, the top, and stores another
    call at its seq in the same millisecond (SQLite gives it the top's rowid): the top the last run
    kept has the next start read it."""
    node, db, template = store_followed(tmp_path, run)
    gateway = gateway_connection(db)
    append_entry(gateway, "s1", a_call(template, 1000, 0.003))
    wait_traces(node, 7)
    top = gateway.execute("SELECT rowid FROM transcript_events WHERE session_id = 's1'").fetchall()
    wait_until(lambda: node.query("SELECT position FROM openclaw_positions WHERE stream = '#top'") == top,
               what="the top kept")
    assert node.stop() == 0
    (created,), = gateway.execute("SELECT created_at FROM transcript_events WHERE session_id = 's1'")
    gateway.execute("DELETE FROM transcript_events WHERE session_id = 's1'")
    append_entry(gateway, "s1", a_call(template, 2000, 0.006, "again"), created=created)
    second = run({**STORE_ENV, "TRACE_OPENCLAW_STATE_DIR": str(db.parents[3])}, db=Path(node.db_path))
    rows = wait_traces(second, 8)
    assert sorted(r["prompt_tokens"] for r in rows if r["session_id"] == "s1") == [1000, 2000]
    assert second.stop() == 0
    gateway.close()


def test_a_store_without_rowids_lists_every_session_at_each_look(tmp_path: Path) -> None:
    db = tmp_path / "agent.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE transcript_events (session_id TEXT NOT NULL, seq INTEGER NOT NULL, "
                     "event_json TEXT, created_at INTEGER NOT NULL, PRIMARY KEY (session_id, seq)) "
                     "WITHOUT ROWID")
        conn.execute("INSERT INTO transcript_events VALUES ('s1', 0, '{}', 1)")
        conn.commit()
    store = otrace.AgentDatabase(db)
    assert store.open()
    ran: list[str] = []
    store.conn.set_trace_callback(ran.append)
    for _ in range(2):
        assert store.sessions(store.changed()) == [("s1", 0, "", None)]
        store.caught_up()
    assert sum(otrace.SESSIONS_SQL[:30] in s for s in ran) == 2 and not any("rowid" in s for s in ran)
    store.close()


@needs_stores
@pytest.mark.parametrize("moment", ["before the connect", "after the first read"])
def test_a_store_moved_in_while_otrace_opens_it_is_the_one_it_reads(tmp_path: Path, moment: str) -> None:
    """A copy of the agent database renamed over it while otrace opens the path, before its connect or
    between its first read and its stamp of the files: otrace reads the file at the path, and says it
    was put back. (Stamped after the first read as its own, the new file kept the connection on the
    old one, gone from the path, for good: no commit comes to a deleted file.)"""
    db = agent_db(state_copy(tmp_path))
    copy = tmp_path / "copy.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as source, contextlib.closing(sqlite3.connect(copy)) as into:
        source.backup(into)
    with contextlib.closing(gateway_connection(copy)) as writing:           # one entry the old file lacks
        append_entry(writing, store_entries(db)[0][0], {"type": "custom", "id": "only-in-the-copy"})
    store = otrace.AgentDatabase(db)
    assert store.open()
    store.close()
    store.stamp = None
    stamped, calls = store.stamped, []

    def move() -> None:
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        copy.rename(db)

    def stamped_as_the_copy_moves_in() -> tuple[Any, ...]:
        calls.append(1)                          # the first stamp is before the connect, the second after
        if len(calls) == 2 and moment == "after the first read":
            move()
        seen = stamped()
        if len(calls) == 1 and moment == "before the connect":
            move()
        return seen

    store.stamped = stamped_as_the_copy_moves_in              # type: ignore[method-assign]
    try:
        assert store.open() and store.replaced
        count = "SELECT count(*) FROM transcript_events WHERE event_json LIKE '%only-in-the-copy%'"
        assert store.conn.execute(count).fetchone() == (1,)
        assert store.identity == (db.stat().st_dev, db.stat().st_ino)
    finally:
        store.close()


@contextlib.contextmanager
def whole_seconds_filesystem(path: Path) -> Iterator[Path]:
    """A small ext4 whose 128-byte inodes keep whole seconds only, on a loop device, unmounted
    afterwards: a write in the second of a stat can leave every stamp as it was."""
    image = path.with_suffix(".img")
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-I", "128", str(image)], check=True, capture_output=True)
    path.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@needs_root
@needs_stores
@pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="needs mkfs.ext4")
def test_a_same_size_wal_rewrite_in_the_second_of_a_look_is_read(tmp_path: Path) -> None:
    """The gateway's first commit after a checkpoint writes its WAL again from the start: same size.
    In the second of otrace's look on whole-second timestamps, it leaves every stamp as the look saw
    it; stamps that young are not trusted, so the next look reads the call."""
    with whole_seconds_filesystem(tmp_path / "fs") as fs:
        state = state_copy(fs)
        db = agent_db(state)
        template = assistant_template(db)
        config = otrace.Config(db_path=str(tmp_path / "o.db"))
        otrace.open_database(config.db_path)
        store = otrace.SessionStore(config, otrace.EventQueue(4096, 50), otrace.Database(config.db_path),
                                    state)
        gateway = gateway_connection(db)
        for _ in range(10):                    # until the commit lands in the second of the WAL's last write
            for n in range(20):
                append_entry(gateway, "s1", a_call(template, n, 0.001))
            gateway.execute("PRAGMA wal_checkpoint(PASSIVE)")
            quick_look(store)
            assert not quick_look(store)       # found nothing, its stamps too young to keep
            seen, calls = [otrace.stamp(file) for file in store.watched()], store.totals.snapshot()["calls"]
            append_entry(gateway, "s1", a_call(template, 1, 0.001))
            if [otrace.stamp(file) for file in store.watched()] == seen:
                break
            quick_look(store)
        else:
            pytest.fail("no commit landed in the second of the WAL's last write")
        quick_look(store)
        assert store.totals.snapshot()["calls"] == calls + 1
        gateway.close()


@needs_stores
def test_a_locked_store_is_a_fault_said_once_and_reading_resumes(tmp_path: Path,
                                                                 run: Callable[..., Otrace]) -> None:
    state = state_copy(tmp_path)
    holder = gateway_connection(agent_db(state))
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")     # held until it closes: readers get SQLITE_BUSY
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("COMMIT")
    node = run({**STORE_ENV, **POLLED, "TRACE_OPENCLAW_STATE_DIR": str(state)})
    fault = wait_until(lambda: node.health()["openclaw_sessions"]["last_error"], what="the fault in /health")
    assert "SQLITE_BUSY" in fault and "agent main" in fault
    polls = node.health()["openclaw_sessions"]["polls"]
    wait_until(lambda: node.health()["openclaw_sessions"]["polls"] > polls + 3, what="3 polls more")
    assert len(node.logs("sessions failing")) == 1 and session_traces(node) == []
    assert node.post("/v1/traces", trace()).status == 202          # otrace itself is not held up
    holder.close()
    wait_traces(node, 6)
    node.wait_log(lambda e: e.get("message") == "sessions recovered")
    assert node.health()["openclaw_sessions"]["last_error"] is None


@pytest.mark.skipif(not ROOT, reason="reading as another user needs root to become one")
def test_a_store_otrace_may_not_open_says_why() -> None:
    """As a user who may read the database but not create its -shm, SQLite refuses to read it at all:
    the fault says what to do."""
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="otrace-store-"))      # outside pytest's 0700 directory
    try:
        with contextlib.closing(sqlite3.connect(folder / "x.sqlite")) as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("CREATE TABLE transcript_events (session_id TEXT, seq INTEGER)")
        folder.chmod(0o755)
        code = ("import os, sys, pathlib; sys.path.insert(0, sys.argv[1]); import otrace; os.setgid(65534); "
                "os.setuid(65534); otrace.AgentDatabase(pathlib.Path(sys.argv[2])).open()")
        out = subprocess.run([sys.executable, "-c", code, str(HERE), str(folder / "x.sqlite")],
                             capture_output=True, text=True, timeout=30, check=False)
    finally:
        shutil.rmtree(folder)
    assert out.returncode == 1 and "PermissionError: SQLITE_READONLY" in out.stderr, out.stderr
    assert "run otrace as the gateway's user" in out.stderr


@needs_stores
def test_one_failure_is_one_event_from_the_log_alone_or_with_the_store(tmp_path: Path,
                                                                       run: Callable[..., Otrace]) -> None:
    """The captured run's log (10 runs, 4 of them failed after 7 to 10 attempts): alone, each call is
    a trace, its last HTTP answer (a failed one the run retried is no call: 6 answered 200, 3 failed
    after 7 to 10 answers, and the refused connections answered nothing), and each failed run one
    error event carrying its failed attempts; beside its store, the store's terminal error entries are
    the failures of record and the log only adds the count to them, whichever of the two otrace reads
    first."""
    lines = DEBUG_LOG.read_bytes()
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "openclaw-2026-11-30.log").write_bytes(lines)
    alone = run({"TRACE_LOG_PATH": str(logs), "TRACE_LOG_START": "beginning", "TRACE_LOG_POLL": "50ms"},
                db=tmp_path / "alone.db")
    wait_until(lambda: alone.health()["log_tail"]["lag_bytes"] == 0 and alone.health()["queue_depth"] == 0,
               what="the log read")
    traces = alone.rows("llm_traces")
    assert sorted((t["status"], t["error_type"] or "", json.loads(t["metadata"]).get("attempts", 1))
                  for t in traces) == [("error", "http_429", 10), ("error", "http_429", 10),
                                       ("error", "http_500", 7), *[("ok", "", 1)] * 6]
    failures = sorted((e["category"], e["severity"], e["session_id"][:8],
                       json.loads(e["metadata"])["failed_attempts"]) for e in alone.rows("error_events"))
    assert failures == [("api_failure", "error", "988a486c", {"500": 7}),
                        ("network_failure", "error", "8b33866a", {"ECONNREFUSED": 7}),
                        ("rate_limit", "error", "8fbbb485", {"429": 10}),
                        ("rate_limit", "error", "ecdc0c34", {"429": 10})]
    assert alone.health()["log_tail"]["failed_attempts"] == 34
    expected = [("api_failure", {"500": 7}), ("network_failure", {"ECONNREFUSED": 7})]

    def failures_of_record(node: Otrace) -> list[tuple[str, dict]]:
        return sorted((e["category"], json.loads(e["metadata"]).get("failed_attempts"))
                      for e in node.rows("error_events"))

    # the store read first, the log after
    (tmp_path / "empty").mkdir()
    store_first = run({**STORE_ENV, "TRACE_OPENCLAW_STATE_DIR": str(state_copy(tmp_path, name="s1")),
                       "TRACE_LOG_PATH": str(tmp_path / "empty"), "TRACE_LOG_POLL": "50ms"},
                      db=tmp_path / "store-first.db")
    wait_traces(store_first, 6)
    wait_until(lambda: len(store_first.rows("error_events")) == 2, what="the store's failures")
    assert [e for _, e in failures_of_record(store_first)] == [None, None]
    (tmp_path / "empty" / "openclaw-2026-11-30.log").write_bytes(lines)
    wait_until(lambda: failures_of_record(store_first) == expected, what="the log's counts on them")
    # the log read first, the store after
    state = tmp_path / "s2"
    log_first = run({**STORE_ENV, "TRACE_OPENCLAW_STATE_DIR": str(state), "TRACE_LOG_PATH": str(logs),
                     "TRACE_LOG_START": "beginning", "TRACE_LOG_POLL": "50ms"}, db=tmp_path / "log-first.db")
    wait_until(lambda: log_first.health()["log_tail"]["lag_bytes"] == 0, what="the log read")
    state_copy(tmp_path, name="s2-whole").rename(state)          # appears whole
    wait_traces(log_first, 6)
    wait_until(lambda: failures_of_record(log_first) == expected, what="the store's failures, counted")
    for node in (store_first, log_first):
        wait_until(lambda n=node: n.health()["queue_depth"] == 0, what="queue drained")
        assert {t["source"] for t in node.rows("llm_traces")} == {"openclaw_session"}
        assert len(node.rows("llm_traces")) == 6 and len(node.rows("error_events")) == 2
        assert sum(r["kind"] == "model_call" for r in node.rows("log_events")) == 33    # still log events


@needs_stores
def test_failed_attempts_counted_while_their_error_is_pushed_go_with_it(tmp_path: Path,
                                                                        run: Callable[..., Otrace],
                                                                        receiver: Receiver) -> None:
    """The store's two failures are on their way to the receiver when the log that counts their failed
    attempts is read: the counts reach the rows, which go again; a row is marked pushed only as the
    receiver has it (an error event pushed before its count keeps what was sent)."""
    on_wire, counted = threading.Event(), threading.Event()

    def hold_the_errors(_: Receiver, request: dict[str, Any]) -> Any:
        if not on_wire.is_set() and any(e["type"] == "error_event" for e in request["json"]["events"]):
            on_wire.set()
            counted.wait(60)
        return 200

    receiver.default = hold_the_errors
    (tmp_path / "logs").mkdir()
    node = run({**STORE_ENV, **push_env(receiver), "TRACE_OPENCLAW_STATE_DIR": str(state_copy(tmp_path)),
                "TRACE_LOG_PATH": str(tmp_path / "logs"), "TRACE_LOG_POLL": "50ms"})
    assert on_wire.wait(30)
    (tmp_path / "logs" / "openclaw-2026-11-30.log").write_bytes(DEBUG_LOG.read_bytes())
    wait_until(lambda: node.health()["log_tail"]["failed_attempts"] == 34, what="the log read")
    wait_until(lambda: node.health()["queue_depth"] == 0, what="its counts written")
    counted.set()

    def as_received() -> dict[str, Any]:        # the last copy of each error event the receiver took
        return {e["trace_id"]: e["data"]["metadata"].get("failed_attempts") for r in receiver.requests
                if r["answered"] == 200 for e in r["json"]["events"] if e["type"] == "error_event"}

    def as_stored() -> dict[str, Any]:
        return {e["trace_id"]: json.loads(e["metadata"]).get("failed_attempts")
                for e in node.rows("error_events") if e["synced"] == 1}

    wait_until(lambda: len(as_stored()) == 2 and as_stored() == as_received(), what="pushed as stored")
    assert {"500": 7} in as_received().values() or {"ECONNREFUSED": 7} in as_received().values()


@needs_stores
def test_retention_prunes_counted_attempts_and_keeps_where_the_store_was_read(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """A failed attempt's count is bookkeeping, gone after TRACE_RETENTION; a session's position is
    not: without it, an old session that wakes up would be read again from its start."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "openclaw-2026-11-30.log").write_bytes(DEBUG_LOG.read_bytes())
    node = run({**STORE_ENV, "TRACE_OPENCLAW_STATE_DIR": str(state_copy(tmp_path)),
                "TRACE_LOG_PATH": str(logs), "TRACE_LOG_START": "beginning", "TRACE_RETENTION": "1s",
                "TRACE_CLEANUP_INTERVAL": "200ms"})
    wait_traces(node, 6)
    wait_until(lambda: (h := node.health())["log_tail"]["lag_bytes"] == 0 and h["queue_depth"] == 0,
               what="the log read and its 34 failed attempts committed")
    assert node.health()["log_tail"]["failed_attempts"] == 34
    wait_until(lambda: node.query("SELECT count(*) FROM openclaw_attempts") == [(0,)], what="attempts pruned")
    assert node.query("SELECT count(*) FROM openclaw_positions WHERE stream <> '#top'") == [(2,)]
    assert not node.logs("retention failing")


# ------------------------------------------------------------------------------------------------- otlp


# OTLP/HTTP ingest: every captured body replayed with its original framing (and once more, as an
# exporter's retry would send it), the real OpenTelemetry exporters (Python protobuf and JSON,
# JavaScript), refusals as the specification words them, cumulative metrics across a restart, and
# GenAI event content reaching its span's row whichever arrives first.

OTLP_FIXTURES = HERE.parent / "shared" / "fixtures"
needs_otlp_fixtures = pytest.mark.skipif(not (OTLP_FIXTURES / "otel-genai" / "index.jsonl").exists(),
                                         reason="needs ../shared beside the repo")
PROTOBUF = {"Content-Type": "application/x-protobuf"}


def otlp_classes() -> dict[str, tuple[Any, Any]]:
    """opentelemetry-proto's own request and response classes, by path: the tests decode with them,
    never with otrace's code."""
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as traces
    return {"/v1/traces": (traces.ExportTraceServiceRequest, traces.ExportTraceServiceResponse),
            "/v1/metrics": (metrics.ExportMetricsServiceRequest, metrics.ExportMetricsServiceResponse),
            "/v1/logs": (logs.ExportLogsServiceRequest, logs.ExportLogsServiceResponse)}


def otlp_message(path: str, doc: dict[str, Any]) -> Any:
    """An export request built from its OTLP JSON form (ids in hex), as protobuf."""
    from google.protobuf import json_format

    def base64_ids(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (base64.b64encode(bytes.fromhex(v)).decode() if k in ("traceId", "spanId",
                                                                             "parentSpanId")
                        else base64_ids(v)) for k, v in node.items()}
        return [base64_ids(item) for item in node] if isinstance(node, list) else node
    return json_format.ParseDict(base64_ids(doc), otlp_classes()[path][0]())


def captured_otlp() -> list[dict[str, Any]]:
    """Every captured OTLP request in the order it was sent: path, body, headers, framing, run."""
    found = []
    for line in (OTLP_FIXTURES / "otel-genai" / "index.jsonl").read_text().splitlines():
        entry = json.loads(line)
        headers = {"Content-Type": entry["content_type"], "User-Agent": entry["user_agent"]}
        if entry["content_encoding"]:
            headers["Content-Encoding"] = entry["content_encoding"]
        found.append({"path": "/v1/" + entry["path"].rsplit("/", 1)[1], "run": entry["run"],
                      "headers": headers, "body": (OTLP_FIXTURES / "otel-genai" / entry["file"]).read_bytes(),
                      "chunked": entry["transfer_encoding"] == "chunked"})
    for line in (OTLP_FIXTURES / "openclaw" / "otlp-2026.3.31" / "index.jsonl").read_text().splitlines():
        entry = json.loads(line)
        found.append({"path": entry["path"], "run": "openclaw",
                      "headers": {"Content-Type": entry["content_type"],
                                  "User-Agent": entry["headers"]["User-Agent"]},
                      "body": (OTLP_FIXTURES / "openclaw" / "otlp-2026.3.31" / entry["file"]).read_bytes(),
                      "chunked": entry["headers"].get("Transfer-Encoding") == "chunked"})
    return found


def decoded(entry: dict[str, Any]) -> Any:
    """A captured body decoded by opentelemetry-proto itself (JSON ids turned from hex first)."""
    body = entry["body"]
    if entry["headers"].get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    if "protobuf" in entry["headers"]["Content-Type"]:
        return otlp_classes()[entry["path"]][0].FromString(body)
    return otlp_message(entry["path"], json.loads(body))


def otlp_post(port: int, path: str, body: bytes, headers: dict[str, str], chunked: bool = False) -> Response:
    """One POST on its own connection, framed as given: Content-Length, or chunks of 1,000 bytes."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items())
    if chunked:
        pieces = [body[i:i + 1000] for i in range(0, len(body), 1000)]
        raw = head.encode() + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
            b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
    else:
        raw = head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(raw)
        answer = read_to_end(sock)
    top, _, rest = answer.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    return Response(int(lines[0].split()[1]), {name.lower(): value.strip() for name, _, value in
                                               (line.partition(":") for line in lines[1:])}, rest)


def replay(node: Otrace, entries: list[dict[str, Any]]) -> None:
    """Send captured requests as they were sent; each must get an empty 200 in its own encoding."""
    for entry in entries:
        resp = otlp_post(node.port, entry["path"], entry["body"], entry["headers"], entry["chunked"])
        protobuf = "protobuf" in entry["headers"]["Content-Type"]
        assert resp.status == 200, (entry["run"], entry["path"], resp)
        assert resp.headers["content-type"] == ("application/x-protobuf" if protobuf else "application/json")
        assert resp.body == (b"" if protobuf else b"{}"), resp


@needs_stores
def test_usage_spans_stored_before_the_store_was_read_give_way_to_its_calls(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """OpenClaw's usage spans are stored while its session store is not read (off, or not there at a
    start without the gateway's log); once the store is read, its calls of the same session and time
    take their place: one call, one row. A span of a session the store does not hold stays."""
    def usage(span_hex: str, session: str, start_ms: int) -> dict[str, Any]:
        span = chat_span("5b8aa5a2d2c872e8321cf37308d69df2", span_hex, **{
            "openclaw.provider": "mock", "openclaw.model": "mock-model", "openclaw.sessionId": session,
            "openclaw.tokens.input": 1234, "openclaw.tokens.output": 56})
        return {**span, "name": "openclaw.model.usage", "startTimeUnixNano": str(start_ms * 10**6),
                "endTimeUnixNano": str((start_ms + 2_500) * 10**6)}

    called = 1796038916928                     # the store's call of 1234 + 56 tokens in that session
    session = "8b33866a-7e6a-4c29-af85-1bb854d75296"
    first = run({"TRACE_OPENCLAW_STATE_DIR": "off"})
    spans = [usage("051581bf3cb55c13", session, called - 400), usage("051581bf3cb55c14", "elsewhere", called)]
    assert first.post("/v1/traces", spans_body(*spans, scope="openclaw")).status == 200
    first.wait_persisted(2)
    assert first.stop() == 0
    node = run({**STORE_ENV, "TRACE_OPENCLAW_STATE_DIR": str(state_copy(tmp_path))})
    stored = wait_traces(node, 6)
    assert any(r["session_id"] == session and r["created_at"] == called and r["completion_tokens"] == 56
               for r in stored)
    wait_until(lambda: len(node.rows("llm_traces")) == 7, what="the span of the store's call gone")
    assert [r["session_id"] for r in node.rows("llm_traces") if r["source"] == "otlp"] == ["elsewhere"]
    assert node.stop() == 0


@needs_stores
@needs_otlp_fixtures
def test_a_default_state_dir_not_there_yet_is_waited_for_so_no_call_counts_twice(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """TRACE_OPENCLAW_STATE_DIR=auto beside a gateway (its log followed) whose ~/.openclaw is made after
    otrace starts (a first boot): the store is waited for from the start, so OpenClaw's usage spans
    are not stored meanwhile (the store will hold those calls); once it is there its calls are read,
    once, across a restart. (auto read no store at all then, stored the spans, and after a restart read
    the store as well: every call twice.) Without the gateway's log, auto needs the directory there."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**STORE_ENV, **POLLED, "TRACE_OPENCLAW_STATE_DIR": "auto", "HOME": str(home),
           "OPENCLAW_STATE_DIR": "", "TRACE_LOG_PATH": str(tmp_path / "openclaw")}
    assert run({**env, "TRACE_LOG_PATH": ""}, db=tmp_path / "alone.db").health()["openclaw_sessions"] is None
    node = run(env)
    wait_until(lambda: node.health()["openclaw_sessions"]["waiting"] is True, what="the store waited for")
    assert node.health()["status"] == "degraded"           # what the gateway logs is not stored meanwhile
    assert f"OpenClaw's state directory {home / '.openclaw'} is not there" in node.health()["problems"][0]
    replay(node, [e for e in captured_otlp() if e["run"] == "openclaw" and e["path"] == "/v1/traces"])
    assert node.health()["otlp"]["openclaw_usage_skipped"] > 0 and node.rows("llm_traces") == []
    state_copy(home, name=".openclaw")
    calls = len(wait_traces(node, 6))
    assert node.health()["status"] == "ok"
    (tmp_path / "openclaw").mkdir()                        # a gateway run as `openclaw --profile work`
    (tmp_path / "openclaw" / "openclaw-work-2026-12-02.log").write_text("")
    problems = wait_until(lambda: node.health()["problems"], what="the other profile's log followed")
    assert problems == [f"the gateway log followed is OpenClaw profile work's, whose session store is "
                        f"{home / '.openclaw-work'}, not {home / '.openclaw'} (set TRACE_OPENCLAW_STATE_DIR)"]
    assert node.stop() == 0
    node = run(env, db=node.db_path)
    node.wait_log(lambda e: e.get("message") == "following OpenClaw's session store")
    wait_until(lambda: node.health()["openclaw_sessions"]["polls"] > 3, what="looks after the restart")
    assert len(node.rows("llm_traces")) == calls == len(session_traces(node))


def test_auto_with_no_home_to_look_in_says_so_at_start(run: Callable[..., Otrace]) -> None:
    """A uid with no password entry and no HOME beside a gateway: auto cannot find ~/.openclaw, and the
    start says the store is not followed (it was off with no word)."""
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="otrace-home-"))      # outside pytest's 0700 directory
    try:
        folder.chmod(0o777)
        env = {"TRACE_OPENCLAW_STATE_DIR": "auto", "OPENCLAW_STATE_DIR": "",
               "TRACE_LOG_PATH": str(folder / "openclaw")}
        node = run(env, db=folder / "otrace.db", command=["env", "-u", "HOME", "setpriv", "--reuid=54321",
                                                          "--regid=54321", "--clear-groups", *START])
        said = node.wait_log(lambda e: "session store is not followed" in e.get("message", ""))
        assert said["uid"] == 54321 and "TRACE_OPENCLAW_STATE_DIR" in said["message"]
        assert node.health()["openclaw_sessions"] is None and node.stop() == 0
    finally:
        shutil.rmtree(folder)


@needs_otlp_fixtures
def test_the_report_names_openclaws_own_cost_metric_for_its_calls_without_a_cost(
        run: Callable[..., Otrace]) -> None:
    """OpenClaw's usage spans carry tokens and no cost; its openclaw.cost.usd metric has the cost. A
    model the price table does not know leaves the calls at "$0?": the report says what the metric
    adds up to in the window (OpenClaw's mock provider priced at 3, 15 and 0.3 USD per 1M tokens)."""
    node = run({"TRACE_OPENCLAW_STATE_DIR": "off"})
    replay(node, [e for e in captured_otlp() if e["run"] == "openclaw"])
    window = ("--since", "2026-11-30", "--until", "2026-11-30", "--timezone", "UTC")
    doc = wait_until(lambda: (doc := report_json(node.db_path, *window))["calls"]["openclaw_cost_metric_usd"]
                     == pytest.approx(0.029127) and doc, what="every point of the metric stored")
    assert doc["calls"]["totals"]["unpriced_calls"] == doc["calls"]["totals"]["calls"] == 3
    text = " ".join(report(node.db_path, *window, env={"COLUMNS": "200"}).stdout.split())
    assert "? OpenClaw's own cost metric (openclaw.cost.usd) adds up to $0.0291 in this window" in text
    assert report_json(node.db_path, *window, "--source", "http")["calls"]["openclaw_cost_metric_usd"] is None


@needs_stores
@needs_otlp_fixtures
@pytest.mark.parametrize("follows", ["log", "store", "neither"])
def test_openclaws_own_error_records_over_otlp_are_not_a_second_event(
        tmp_path: Path, run: Callable[..., Otrace], follows: str) -> None:
    """OpenClaw's diagnostics export sends each gateway log line as a log record: while otrace reads the
    gateway log those records are skipped (the file's lines are the events); while it reads only the
    session store, the records of a model's failure are (the store's event is the failure); else each
    ERROR record is an error event."""
    entry = next(e for e in captured_otlp() if e["run"] == "openclaw" and e["path"] == "/v1/logs")
    message = decoded(entry)
    template = message.resource_logs[0].scope_logs[0].log_records[0]
    records = message.resource_logs[0].scope_logs[0].log_records
    del records[:]
    for subsystem, text in (("diagnostic", "lane task error: lane=main error=\"LLM request failed\""),
                            ("gateway/ws", "closed before connect")):
        record = records.add()
        record.CopyFrom(template)
        record.severity_number, record.severity_text = 17, "ERROR"
        record.body.string_value = text
        for attribute in record.attributes:
            if attribute.key == "openclaw.subsystem":
                attribute.value.string_value = subsystem
        if not any(a.key == "openclaw.subsystem" for a in record.attributes):
            record.attributes.add(key="openclaw.subsystem").value.string_value = subsystem
    env = {"log": {"TRACE_LOG_PATH": str(tmp_path / "gateway.log")},
           "store": {**STORE_ENV, "TRACE_OPENCLAW_STATE_DIR": str(state_copy(tmp_path))},
           "neither": {}}[follows]
    node = run(env)
    assert node.post("/v1/logs", message.SerializeToString(), headers=PROTOBUF).status == 200
    stored = {"log": [], "store": ["closed before connect"],
              "neither": ["lane task error: lane=main error=\"LLM request failed\"", "closed before connect"]}
    wait_until(lambda: node.health()["otlp"]["log_records"] == 2, what="both records")
    node.wait_persisted(0)
    wait_until(lambda: node.health()["queue_depth"] == 0, what="written")
    assert sorted(e["message"] for e in node.rows("error_events") if e["source"] == "otlp") == sorted(
        stored[follows])
    assert node.health()["otlp"]["openclaw_logs_skipped"] == 2 - len(stored[follows])


# The calls of each captured run, in the order their spans were sent: model, status, error_type,
# finish_reason, prompt, completion, total, cache read and write, reasoning tokens, ttft_ms.
OPENAI_V2 = [
    ("gpt-4o-mini-2024-07-18", "ok", None, "stop", 23, 7, 30, None, None, None, None),
    ("gpt-4o-mini-tool-2024-07-18", "ok", None, "tool_calls", 23, 7, 30, None, None, None, None),
    ("gpt-4o-mini-2024-07-18", "ok", None, None, 23, 7, 30, None, None, None, None),        # streamed
    ("gpt-4o-mini-err-429", "error", "RateLimitError", None, None, None, None, None, None, None, None),
    ("gpt-4o-mini-err-500", "error", "InternalServerError", None, None, None, None, None, None, None, None),
    ("text-embedding-3-small-2024-01-01", "ok", None, None, 5, None, 5, None, None, None, None)]
OPENLLMETRY_OPENAI = [
    ("gpt-4o-mini-2024-07-18", "ok", None, "stop", 23, 7, 30, 11, None, 0, None),
    ("gpt-4o-mini-tool-2024-07-18", "ok", None, "tool_call", 23, 7, 30, 11, None, 0, None),
    ("gpt-4o-mini-2024-07-18", "ok", None, "stop", 23, 7, 30, 11, None, None, None),
    ("gpt-4o-mini-err-429", "error", "RateLimitError", None, None, None, None, None, None, None, None),
    ("gpt-4o-mini-err-500", "error", "InternalServerError", None, None, None, None, None, None, None, None),
    ("text-embedding-3-small-2024-01-01", "ok", None, None, 5, None, 5, 0, None, None, None)]


def anthropic_calls(ttft_3: float, ttft_4: float) -> list[tuple]:
    """The Anthropic SDK's own spans, each filled in from OpenLLMetry's span of the same call."""
    return [("claude-sonnet-4-5", "ok", None, "end_turn", 42, 9, 51, 13, 4, None, None),
            ("claude-haiku-4-5", "ok", None, "end_turn", 42, 9, 51, 13, 4, None, None),
            ("claude-sonnet-4-5", "ok", None, "end_turn", 42, 9, 51, 13, 4, None, ttft_3),
            ("claude-sonnet-4-5", "ok", None, "end_turn", 42, 9, 51, 13, 4, None, ttft_4),
            ("claude-err-429", "error", "rate_limit_error", None, None, None, None, None, None, None, None),
            ("claude-err-500", "error", "api_error", None, None, None, None, None, None, None, None)]


# run: (its calls, which of them have input and output content: i = input, o = output, - = none)
CAPTURED_CALLS = {
    "py-openai-v2-legacy-nocontent": (OPENAI_V2, "-- -o -- -- -- --"),    # a tool call's name is no content,
    "py-openai-v2-legacy-content": (OPENAI_V2, "io io io i- i- --"),      # but is all the choice event says
    "py-openai-v2-legacyutil-optin-span_and_event": (OPENAI_V2, "io io io i- i- --"),
    "py-openai-v2-nocontent": (OPENAI_V2, "-- -- -- -- -- --"),
    "py-openai-v2-content-true": (OPENAI_V2, "-- -- -- -- -- --"),
    "py-openai-v2-span_and_event": (OPENAI_V2, "io io io i- i- --"),
    "py-openai-v2-span_and_event-gzip": (OPENAI_V2, "io io io i- i- --"),
    "py-openai-v2-json-span_and_event": (OPENAI_V2, "io io io i- i- --"),
    "py-openai-v2-json-gzip-event_only": (OPENAI_V2, "io io io i- i- --"),   # content from the logs only
    "openllmetry-0.62.4-openai-content": (OPENLLMETRY_OPENAI, "io io io i- i- i-"),
    "openllmetry-0.62.4-openai-nocontent": (OPENLLMETRY_OPENAI, "-- -- -- -- -- --"),
    "openllmetry-0.62.4-openai-events": (OPENLLMETRY_OPENAI, "io io i- i- i- io"),  # the stream's choice
    "openllmetry-0.62.4-anthropic-content": (anthropic_calls(158.5, 69.5), "io io io io i- i-"),  # has no ids
    "openllmetry-0.62.4-anthropic-events": (anthropic_calls(169.6, 68.3), "-- -- -- -- -- --"),  # none have
    "openclaw": ([("mock-model", "ok", None, None, 3333, 111, 3444, 0, 0, None, None),
                  ("mock-model", "ok", None, None, 8000, 400, 8400, 6000, 0, None, None),   # input + cached
                  ("mock-model", "ok", None, None, 1111, 22, 1133, 0, 0, None, None)], "-- -- --"),
}
CALL_COLUMNS = ("model", "status", "error_type", "finish_reason", "prompt_tokens", "completion_tokens",
                "total_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "ttft_ms")


def call_spans(entries: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The spans each run's rows come from: its LLM spans, less OpenLLMetry's Anthropic spans (each
    merged into the SDK's own span of the same call)."""
    spans: dict[str, list[Any]] = {}
    for entry in entries:
        if entry["path"] != "/v1/traces":
            continue
        for resource_spans in decoded(entry).resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    names = {a.key for a in span.attributes}
                    if span.name == "openclaw.model.usage" or ("gen_ai.operation.name" in names and (
                            scope_spans.scope.name != "opentelemetry.instrumentation.anthropic")):
                        spans.setdefault(entry["run"], []).append(span)
    return spans


def metric_totals(entries: list[dict[str, Any]]) -> dict[tuple, list[float]]:
    """(service, metric, attributes): the sum over processes of each cumulative series' last value
    (and count), for the metrics otrace keeps; the sum of its stored deltas must equal it."""
    last: dict[tuple, tuple[int, float, int | None]] = {}
    for entry in entries:
        if entry["path"] != "/v1/metrics":
            continue
        for resource_metrics in decoded(entry).resource_metrics:
            resource = {a.key: a.value.string_value for a in resource_metrics.resource.attributes}
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    if not (metric.name.startswith("gen_ai.") or metric.name in otrace.USAGE_METRICS):
                        continue
                    for point in getattr(metric, kind).data_points:
                        attrs = tuple(sorted((a.key, otrace.otel_value(a.value)) for a in point.attributes))
                        series = (resource.get("service.name"), metric.name, attrs,
                                  resource.get("service.instance.id") or resource.get("process.pid"),
                                  scope_metrics.scope.name)
                        value = point.sum if kind == "histogram" else point.as_double or point.as_int
                        count = point.count if kind == "histogram" else None
                        if series not in last or last[series][0] < point.time_unix_nano:
                            last[series] = (point.time_unix_nano, value, count)
    totals: dict[tuple, list[float]] = {}
    for (service, name, attrs, _, _), (_, value, count) in last.items():
        total = totals.setdefault((service, name, attrs), [0.0, 0])
        total[0] += value
        total[1] += count or 0
    return totals


@needs_otlp_fixtures
def test_every_captured_otlp_body_becomes_the_rows_it_means_and_a_retry_adds_none(
        run: Callable[..., Otrace]) -> None:
    """All 105 captured bodies (OpenTelemetry's and OpenLLMetry's Python instrumentations, protobuf and
    JSON, gzip or not; OpenClaw's chunked protobuf) replayed twice into one otrace, then the metrics
    once more into a restarted one: one row per real call, field by field; one error event per failed
    call; content from span attributes or from log events, before or after their span; every
    cumulative series' deltas adding up to its last value; nothing stored twice."""
    entries = captured_otlp()
    node = run()
    replay(node, entries)
    first = node.health()
    replay(node, entries)                                      # every export retried
    otlp = first["otlp"]
    health = node.wait_persisted(2 * first["events_received"] - otlp["metric_points_kept"])
    assert node.stop() == 0
    expected_spans = sum(len(s.spans) for e in entries if e["path"] == "/v1/traces"
                         for r in decoded(e).resource_spans for s in r.scope_spans)
    expected_points = sum(len(getattr(m, m.WhichOneof("data")).data_points) for e in entries
                          if e["path"] == "/v1/metrics" for r in decoded(e).resource_metrics
                          for s in r.scope_metrics for m in s.metrics)
    assert (otlp["requests"], otlp["spans"], otlp["llm_spans"], otlp["spans_merged"], otlp["spans_not_llm"],
            otlp["spans_rejected"], otlp["metric_points"], otlp["log_records"], otlp["log_errors"]) == (
        105, expected_spans, 87, 12, 4, 0, expected_points, 93, 0)
    assert (otlp["log_content"], otlp["log_content_unlinked"], otlp["metric_resets"]) == (51, 12, 0)
    assert health["otlp"]["metric_points_kept"] == otlp["metric_points_kept"]   # the retry added none
    assert health["events_duplicate"] == first["events_received"] - otlp["metric_points_kept"]

    rows = {r["trace_id"]: r for r in node.rows("llm_traces")}
    spans = call_spans(entries)
    assert len(rows) == sum(map(len, spans.values())) == 87
    for name, (calls, content) in CAPTURED_CALLS.items():
        for span, call, has in zip(spans[name], calls, content.split(), strict=True):
            row = rows[f"{span.trace_id.hex()}-{span.span_id.hex()}"]
            got = (*(row[c] for c in CALL_COLUMNS[:-1]), row["ttft_ms"] and round(row["ttft_ms"], 1))
            assert got == call, (name, span.name)
            assert (row["input_text"] is not None, row["output_text"] is not None) == (
                has[0] == "i", has[1] == "o"), (name, call[0])
            assert row["source"] == "otlp"
            assert row["provider"] == ("mock" if name == "openclaw" else "anthropic" if "anthropic" in name
                                       else "openai")
            assert row["latency_ms"] == (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
            assert row["created_at"] == span.start_time_unix_nano // 1_000_000
            meta = json.loads(row["metadata"])
            assert (meta["otel_trace_id"], meta["otel_span_id"]) == (span.trace_id.hex(), span.span_id.hex())
            assert ("otel_merged_spans" in meta) == ("anthropic" in name)
    def priced(run_name: str, index: int) -> tuple[float, str]:
        span = spans[run_name][index]
        row = rows[f"{span.trace_id.hex()}-{span.span_id.hex()}"]
        return round(row["cost_usd"], 10), row["cost_source"]
    # 23 in, 7 out at 0.15 and 0.60 USD per 1M; 25 fresh, 13 cache read, 4 cache write in and 9 out at
    # 3, 0.30, 3.75 and 15; OpenLLMetry's 23 in hold 11 cache reads at 0.075
    assert priced("py-openai-v2-legacy-nocontent", 0) == (7.65e-06, "computed")
    assert priced("openllmetry-0.62.4-anthropic-content", 0) == (0.0002289, "computed")
    assert priced("openllmetry-0.62.4-openai-content", 0) == (6.825e-06, "computed")
    openclaw = [rows[f"{s.trace_id.hex()}-{s.span_id.hex()}"] for s in spans["openclaw"]]
    assert [r["session_id"] for r in openclaw] == ["b03477d4-35a8-4550-853b-385bbb0e240a",
                                                   "ba195bba-38b2-4e64-94b7-fbd912420405",
                                                   "ef56bbbb-5ba3-4582-90db-cdfc62cda851"]
    assert json.loads(openclaw[0]["metadata"])["openclaw.channel"] == "webchat"

    def content_of(run_name: str, index: int) -> tuple[Any, Any]:
        span = spans[run_name][index]
        row = rows[f"{span.trace_id.hex()}-{span.span_id.hex()}"]
        return json.loads(row["input_text"]), json.loads(row["output_text"])
    terse = [{"content": "You are a terse assistant.", "type": "text"}]
    hello = [{"content": "Say hello to the trace sidecar.", "type": "text"}]
    assert content_of("py-openai-v2-legacy-content", 0) == (     # from gen_ai.*.message / choice events
        [{"role": "system", "content": "You are a terse assistant."},
         {"role": "user", "content": "Say hello to the trace sidecar."}],
        [{"index": 0, "finish_reason": "stop",
          "message": {"role": "assistant", "content": "Hello from the mock. Tracing is fun!"}}])
    assert content_of("py-openai-v2-json-gzip-event_only", 0) == (   # from the details event, spans first
        [{"role": "system", "parts": terse}, {"role": "user", "parts": hello}],
        [{"role": "assistant", "parts": [{"content": "Hello from the mock. Tracing is fun!", "type": "text"}],
          "finish_reason": "stop"}])
    assert content_of("openllmetry-0.62.4-anthropic-content", 0)[0] == [   # system instructions first
        {"role": "system", "parts": [{"type": "text", "content": "You are terse."}]},
        {"role": "user", "parts": [{"type": "text", "content": "Say hello to the trace sidecar."}]}]

    errors = {r["trace_id"]: r for r in node.rows("error_events")}
    failed = {key: row for key, row in rows.items() if row["status"] == "error"}
    assert set(errors) == set(failed) and len(errors) == 28
    for key, error in errors.items():
        rate_limited = failed[key]["model"].endswith("429")
        assert (error["error_type"], error["category"], error["source"], error["provider"], error["model"]) \
            == ("llm_error", "rate_limit" if rate_limited else "api_failure", "otlp", failed[key]["provider"],
                failed[key]["model"])
        assert error["message"].startswith("Error code: 429" if rate_limited else "Error code: 500"), error
        openllmetry = "openllmetry" in json.loads(failed[key]["metadata"]).get("service_name", "")
        assert (error["stack_trace"] is not None) == openllmetry, error

    metrics = node.rows("genai_metrics")
    stored: dict[tuple, list[float]] = {}
    for row in metrics:
        attrs = tuple(sorted(json.loads(row["attributes"]).items()))
        total = stored.setdefault((row["service"], row["name"], tuple(
            (k, tuple(v) if isinstance(v, list) else v) for k, v in attrs)), [0.0, 0])
        total[0] += row["value"]
        total[1] += row["count"] or 0
    expected = {(s, n, tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in a)): t
                for (s, n, a), t in metric_totals(entries).items()}
    assert {k: [round(v, 9), c] for k, (v, c) in stored.items() if v or c} == {
        k: [round(v, 9), c] for k, (v, c) in expected.items() if v or c}
    openclaw_tokens: dict[str, float] = {}
    for r in metrics:
        if r["name"] == "openclaw.tokens":
            kind = json.loads(r["attributes"])["openclaw.token"]
            openclaw_tokens[kind] = openclaw_tokens.get(kind, 0) + r["value"]
    assert openclaw_tokens == {"input": 6444, "output": 533, "prompt": 12444, "total": 12977,
                               "cache_read": 6000}
    assert round(sum(r["value"] for r in metrics if r["name"] == "openclaw.cost.usd"), 6) == 0.029127
    assert {(r["provider"], r["model"]) for r in metrics if r["name"] == "openclaw.cost.usd"} == {
        ("mock", "mock-model")}

    again = run(db=node.db_path)                  # the series' last points were kept with their rows
    replay(again, [e for e in entries if e["path"] == "/v1/metrics"])
    assert again.stop() == 0
    assert len(again.rows("genai_metrics")) == len(metrics)


def chat_span(trace_hex: str, span_hex: str, **attributes: Any) -> dict[str, Any]:
    """An OTLP JSON span of a chat call, one second long, with these attributes."""
    values = [{"key": k, "value": {"intValue": v} if isinstance(v, int) and not isinstance(v, bool) else
               {"doubleValue": v} if isinstance(v, float) else {"stringValue": v}}
              for k, v in attributes.items()]
    return {"traceId": trace_hex, "spanId": span_hex, "name": "chat", "kind": 3,
            "startTimeUnixNano": "1796000000000000000", "endTimeUnixNano": "1796000001000000000",
            "attributes": values}


def spans_body(*spans: dict[str, Any], scope: str = "test", service: str = "svc") -> dict[str, Any]:
    return {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name",
                                                            "value": {"stringValue": service}}]},
                               "scopeSpans": [{"scope": {"name": scope}, "spans": list(spans)}]}]}


def test_otlp_pieces_decode_and_map_as_the_conventions_say_in_process() -> None:
    """Pure pieces, in process: OTLP JSON in all its spellings decodes as protobuf does; which spans
    are LLM calls; provider names, error types and categories; deltas of cumulative points and their
    restarts; one row for a call two instrumentations both reported; content waiting for its span. A
    lone surrogate in a text is U+FFFD, as on the JSON API; a message that is not an object is refused."""
    canonical = spans_body(chat_span("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331",
                                     **{"gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 7}))
    snake = json.loads(json.dumps(canonical).replace("resourceSpans", "resource_spans").replace(
        "scopeSpans", "scope_spans").replace("startTimeUnixNano", "start_time_unix_nano"))
    snake["resource_spans"][0]["scope_spans"][0]["spans"][0]["endTimeUnixNano"] = 1796000001000000000
    snake["resource_spans"][0]["scope_spans"][0]["spans"][0]["kind"] = "SPAN_KIND_CLIENT"
    want = otlp_message("/v1/traces", canonical)
    for doc in (canonical, snake):
        got = otrace.decode_otlp("traces", json.dumps(doc).encode(), "json")
        assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)
    assert otrace.decode_otlp("traces", want.SerializeToString(), "protobuf") == want
    cut = json.loads(json.dumps(canonical))
    cut["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"].append(
        {"key": "note", "value": {"stringValue": "cut mid-emoji \ud83d"}})   # as JavaScript may cut it
    span = otrace.decode_otlp("traces", json.dumps(cut).encode(), "json").resource_spans[0] \
        .scope_spans[0].spans[0]
    assert otrace.otel_attributes(span.attributes)["note"] == "cut mid-emoji \ufffd"    # as the JSON API
    bare = json.loads(json.dumps(canonical))          # a value written without its {"stringValue": ...}
    bare["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"][0]["value"] = "openai"
    for body, needle in ((b"\x0a\x05\x0a\x03", "not an OTLP/protobuf"), (b"[1]", "top level"),
                         (b'{"resourceSpans": 5}', "must hold ResourceSpans objects, not a number"),
                         (b'{"resourceSpans": ["x"]}', "must hold ResourceSpans objects, not a string"),
                         (json.dumps(bare).encode(), "value must hold AnyValue objects, not a string"),
                         (b"{", "not valid JSON")):
        with pytest.raises(otrace.Invalid, match=needle):
            otrace.decode_otlp("traces", body, "protobuf" if body.startswith(b"\x0a") else "json")

    def call(name: str = "chat", scope: str = "s", follow: bool = False, **attributes: Any) -> Any:
        span = otlp_message("/v1/traces", spans_body(dict(chat_span(
            "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", **attributes), name=name))
                            ).resource_spans[0].scope_spans[0].spans[0]
        return otrace.llm_call(span, {"service.name": "svc"}, (0, scope), follow)
    assert call(**{"gen_ai.operation.name": "invoke_agent", "gen_ai.request.model": "m"}) == "not_llm"
    assert call(**{"http.request.method": "POST"}) == "not_llm"
    assert call(name="openclaw.model.usage", follow=True, **{"openclaw.model": "m"}) == \
        "openclaw_usage_skipped"
    older = call(**{"llm.request.type": "completion", "gen_ai.system": "Anthropic",
                    "gen_ai.request.model": "c",
                    "gen_ai.usage.prompt_tokens": 10, "gen_ai.usage.completion_tokens": 2,
                    "gen_ai.prompt.0.role": "user", "gen_ai.prompt.0.content": "hi",
                    "gen_ai.completion.0.content": "yo", "gen_ai.response.time_to_first_chunk": 0.25})
    assert (older.event["provider"], older.event["model"], older.event["prompt_tokens"],
            older.event["completion_tokens"], older.event["ttft_ms"], older.event["latency_ms"]) == (
        "anthropic", "c", 10, 2, 250.0, 1000.0)
    assert json.loads(older.event["input_text"]) == [{"role": "user", "content": "hi"}]
    assert json.loads(older.event["output_text"]) == [{"content": "yo"}]
    # Anthropic's own input_tokens, passed through: the cache's tokens are not in them
    fresh = call(**{"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                    "gen_ai.request.model": "claude-sonnet-4-5", "gen_ai.usage.input_tokens": 25,
                    "gen_ai.usage.cache_read.input_tokens": 5000,
                    "gen_ai.usage.cache_creation.input_tokens": 4})
    assert (fresh.event["prompt_tokens"], fresh.event["metadata"]["input_tokens_without_cache"]) == (5029, 25)
    totalled = call(**{"gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 25,   # its total left
                       "gen_ai.usage.output_tokens": 9, "gen_ai.usage.total_tokens": 34,  # the cache out too
                       "gen_ai.usage.cache_read.input_tokens": 5000})
    assert (totalled.event["prompt_tokens"], totalled.event["total_tokens"]) == (5025, 5034)
    row = otrace.event_row(otrace.TRACES, otrace.trace_row, fresh.event, "otlp", received=1, max_text=1000)
    assert dict(zip(otrace.TRACES.columns, row.values, strict=False))["cost_usd"] > 0      # priced
    bare = call(**{"gen_ai.request.model": "m", "gen_ai.provider.name": "az.ai.openai"})   # no operation
    assert (bare.event["provider"], bare.failure) == ("azure.ai.openai", None)
    broken = call(**{"gen_ai.operation.name": "chat", "error.type": "<class 'openai.APIConnectionError'>"})
    assert (broken.event["status"], broken.event["error_type"], broken.failure["category"]) == (
        "error", "APIConnectionError", "network_failure")
    assert [otrace.provider_name(n) for n in ("OpenAI", " Vertex AI ", "xai", "mock")] == [
        "openai", "gcp.vertex_ai", "x_ai", "mock"]
    assert [otrace.call_category(t, s, m) for t, s, m in (
        ("RateLimitError", None, None), ("rate_limit_error", None, None), (None, 429, None),
        ("APITimeoutError", None, None), (None, 504, None), ("APIConnectionError", None, None),
        ("InternalServerError", None, "Error code: 500 - boom"), ("AuthenticationError", 401, None),
        ("ValueError", None, "bad"))] == [
        "rate_limit", "rate_limit", "rate_limit", "timeout", "timeout", "network_failure", "api_failure",
        "api_failure", "other"]

    point = otrace.Point
    assert otrace.difference(None, point(1, 10, 5.0, None), True) == (point(1, 10, 5.0, None), False)
    assert otrace.difference(point(1, 10, 5.0, None), point(1, 20, 8.0, None), True) == (
        point(10, 20, 3.0, None), False)
    assert otrace.difference(point(1, 20, 8.0, None), point(1, 20, 8.0, None), True) is None   # a retry
    assert otrace.difference(point(1, 20, 8.0, None), point(30, 40, 2.0, None), True) == (     # restarted
        point(30, 40, 2.0, None), True)
    assert otrace.difference(point(1, 20, 8.0, None), point(1, 40, 2.0, None), True)[1] is True
    assert otrace.difference(point(1, 20, 8.0, None), point(1, 40, 2.0, None), False) == (  # up-down sum
        point(20, 40, -6.0, None), False)
    assert otrace.difference(point(1, 20, -2**63, None), point(1, 40, 2**63 - 1, None), False) == (
        point(20, 40, float(2**64 - 1), None), False)               # beyond an int64: a float
    assert otrace.difference(point(1, 10, 9.0, 2, (1, 1, 0), (5.0, 10.0)),
                             point(1, 20, 14.0, 3, (1, 2, 0), (5.0, 10.0)), True) == (
        point(10, 20, 5.0, 1, (0, 1, 0), (5.0, 10.0)), False)

    content = otrace.Content(wait=60.0, limit=700)
    content.park("a", [([{"role": "user", "content": "q"}], None, False)])
    content.park("a", [(None, [{"message": {"content": "r"}}], False)])
    assert content.peek(["x", "a"]) == ([{"role": "user", "content": "q"}], [{"message": {"content": "r"}}])
    content.park("a", [(None, [{"message": {"content": "r"}}], False)])          # a retry: nothing more
    content.park("c", [([{"role": "user", "content": "go on"}], None, False)], [1])
    content.park("c", [([{"role": "user", "content": "go on"}], None, False)], [2])   # said again, later
    assert content.peek(["c"])[0] == [{"role": "user", "content": "go on"}] * 2
    content.park("b", [("x" * 400, None, True)])                   # over the limit: the oldest goes
    assert (content.peek(["a"]), len(content), content.expired) == ((None, None), 1, 2)   # and "c"
    content.remember("row-b", ["b", "b2"])
    assert (len(content), content.row_of("b2")) == (0, "row-b")

    wrapped = otrace.text_messages("q", "user")                     # as another otrace pushes it
    assert otrace.span_content({"gen_ai.input.messages": wrapped, "otrace.text_messages": ["input"]}, []) \
        == ("q", None)
    for odd in (1.5, 7, True, None, "no-input"):                    # the attribute, mistyped: content as sent
        assert otrace.span_content({"gen_ai.input.messages": wrapped, "otrace.text_messages": odd}, []) \
            == (wrapped, None)
    prompt = '[{"role": "user", "content": "hi"}, {"role": "user", "content": "and"}]'    # the oldest form
    said = [{"name": "gen_ai.content.prompt", "attributes": [{"key": "gen_ai.prompt",
                                                              "value": {"stringValue": prompt}}]},
            {"name": "gen_ai.content.completion", "attributes": [{"key": "gen_ai.completion",
                                                                  "value": {"stringValue": "not JSON"}}]}]
    span = otlp_message("/v1/traces", spans_body(dict(chat_span(f"{5:032x}", f"{5:016x}"), events=said))
                        ).resource_spans[0].scope_spans[0].spans[0]
    inputs, outputs = otrace.span_content({}, span.events)
    assert json.loads(inputs) == [{"role": "user", "content": "hi"}, {"role": "user", "content": "and"}]
    assert json.loads(outputs) == [{"content": "not JSON"}]
    said[1]["attributes"][0]["value"]["stringValue"] = "[1, 2, 3]"   # a text that is a list, not messages
    said.append({"name": "gen_ai.content.prompt", "attributes": [{"key": "gen_ai.prompt", "value": {
        "stringValue": '[{"role": "user", "content": "again"}]'}}]})      # a second event: the first's stays
    span = otlp_message("/v1/traces", spans_body(dict(chat_span(f"{5:032x}", f"{5:016x}"), events=said))
                        ).resource_spans[0].scope_spans[0].spans[0]
    inputs, outputs = otrace.span_content({}, span.events)
    assert len(json.loads(inputs)) == 2 and json.loads(outputs) == [{"content": "[1, 2, 3]"}]


def test_two_instrumentations_of_one_call_make_one_row_in_process() -> None:
    """The Anthropic SDK's own span and OpenLLMetry's span of the same call (another scope, around it
    in time, or with the same response id) are one row: the inner span's, filled in from the outer."""
    def make(scope: str, start: int, end: int, **attributes: Any) -> Any:
        span = otlp_message("/v1/traces", spans_body(dict(chat_span(
            f"{start:032x}", f"{end:016x}", **attributes), startTimeUnixNano=str(start),
            endTimeUnixNano=str(end)))).resource_spans[0].scope_spans[0].spans[0]
        return otrace.llm_call(span, {}, (0, scope), False)
    sdk = make("sdk", 110, 190, **{"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                                   "gen_ai.response.model": "claude", "gen_ai.usage.input_tokens": 42,
                                   "gen_ai.usage.output_tokens": 9})
    wrapper = make("openllmetry", 100, 200, **{"gen_ai.operation.name": "chat", "gen_ai.provider.name":
                                               "anthropic", "gen_ai.usage.output_tokens": 10,
                                               "gen_ai.usage.total_tokens": 52,
                                               "gen_ai.input.messages": '[{"role":"user"}]'})
    later = make("openllmetry", 300, 400, **{"gen_ai.operation.name": "chat", "gen_ai.provider.name":
                                             "anthropic", "gen_ai.request.model": "claude"})
    same_scope = make("sdk", 120, 180, **{"gen_ai.operation.name": "chat",
                                          "gen_ai.provider.name": "anthropic"})
    calls, merged = otrace.one_per_call([sdk, wrapper, later])
    assert (calls, merged) == ([sdk, later], 1)
    assert (sdk.event["model"], sdk.event["completion_tokens"], sdk.event["total_tokens"],
            sdk.event["input_text"]) == ("claude", 9, None, '[{"role":"user"}]')   # tokens from one span
    assert sdk.keys == [sdk.key, wrapper.key]
    assert otrace.one_per_call([same_scope, later])[1] == 0       # one library's spans are never merged
    # calls made at once: an embedding during a chat, another model's call, another response id
    chat = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic"}
    long_chat = make("openllmetry", 100, 900, **{**chat, "gen_ai.request.model": "claude",
                                                 "gen_ai.response.id": "msg_a"})
    for other in ({"gen_ai.operation.name": "embeddings", "gen_ai.provider.name": "anthropic"},
                  {**chat, "gen_ai.request.model": "claude-haiku"}, {**chat, "gen_ai.response.id": "msg_b"}):
        assert otrace.one_per_call([long_chat, make("sdk", 200, 300, **other)])[1] == 0, other
    # two calls at once, each reported by both: each pair by its response id
    pairs = [make("openllmetry", 100, 900, **{**chat, "gen_ai.response.id": "msg_a"}),
             make("sdk", 110, 890, **{**chat, "gen_ai.response.id": "msg_a"}),
             make("openllmetry", 200, 500, **{**chat, "gen_ai.response.id": "msg_b"}),
             make("sdk", 210, 490, **{**chat, "gen_ai.response.id": "msg_b"})]
    assert otrace.one_per_call(pairs) == ([pairs[1], pairs[3]], 2)
    # a third instrumentation of a call: one row of the three
    three = [make("openllmetry", 100, 1000, **{**chat, "gen_ai.response.id": "msg_t"}),
             make("openinference", 105, 950, **{**chat, "gen_ai.response.id": "msg_t"}),
             make("sdk", 110, 900, **{**chat, "gen_ai.response.id": "msg_t"})]
    assert otrace.one_per_call(three) == ([three[2]], 2)
    assert [s["scope"] for s in three[2].event["metadata"]["otel_merged_spans"]] == [
        "openinference", "openllmetry"]
    # two calls at once that failed (no response id), each reported by both, each span of one library
    # inside both of the other's: paired by the nearest times, each row taking one span of each library
    both = [make("openllmetry", 100, 900, **chat), make("openllmetry", 101, 950, **chat),
            make("sdk", 110, 890, **chat), make("sdk", 112, 940, **chat)]
    assert otrace.one_per_call(both) == ([both[2], both[3]], 2)
    assert [c.keys for c in both[2:]] == [[both[2].key, both[0].key], [both[3].key, both[1].key]]
    dated = [make("openllmetry", 100, 900, **{**chat, "gen_ai.response.model": "claude-4-20250514",
                                              "gen_ai.response.id": "msg_c"}),
             make("sdk", 110, 890, **{**chat, "gen_ai.response.model": "claude-4",      # one call, two names
                                      "gen_ai.response.id": "msg_c"})]
    assert otrace.one_per_call(dated) == ([dated[1]], 1)
    assert [c.keys for c in (pairs[1], pairs[3])] == [[p.key, q.key] for p, q in ((pairs[1], pairs[0]),
                                                                               (pairs[3], pairs[2]))]

    recent = otrace.RecentCalls(wait=60.0)                        # and in a later request:
    recent.remember(later)
    assert recent.partner(make("openllmetry", 310, 390, **chat)) is None      # its own scope
    assert recent.partner(make("sdk", 310, 390, **chat)).key == later.key     # inside its time
    assert recent.partner(make("sdk", 500, 600, **chat)) is None              # another time
    assert recent.partner(make("sdk", 310, 390, **{**chat, "gen_ai.provider.name": "openai"})) is None
    assert recent.partner(make("sdk", 310, 390, **{**chat, "gen_ai.request.model": "claude-haiku"})) is None
    assert recent.partner(make("sdk", 310, 390, **{**chat, "gen_ai.operation.name": "embeddings"})) is None
    recent.replace(recent.partner(make("sdk", 310, 390, **chat)), sdk)        # merged: takes no third
    assert recent.partner(make("sdk", 310, 390, **chat)) is None

    # a count no column holds leaves with the span's other counts, so the other span's whole group is
    # taken, and a span alone is not priced from a part of its tokens
    bad = make("sdk", 110, 190, **{"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                                   "gen_ai.usage.input_tokens": -1, "gen_ai.usage.output_tokens": 9,
                                   "gen_ai.usage.cost": -0.5})
    assert (bad.event["prompt_tokens"], bad.event["completion_tokens"], bad.event["cost_usd"]) == (None,) * 3
    assert set(bad.event["metadata"]["dropped"]) == {"prompt_tokens", "completion_tokens", "cost_usd"}
    good = make("openllmetry", 100, 200, **{"gen_ai.operation.name": "chat", "gen_ai.provider.name":
                                            "anthropic", "gen_ai.usage.input_tokens": 42,
                                            "gen_ai.usage.output_tokens": 10})
    assert otrace.one_per_call([bad, good]) == ([bad], 1)
    assert (bad.event["prompt_tokens"], bad.event["completion_tokens"]) == (42, 10)


@needs_otlp_fixtures
@pytest.mark.parametrize("first", ["sdk", "openllmetry"])
def test_two_instrumentations_of_one_call_in_two_requests_make_one_row(
        tmp_path: Path, run: Callable[..., Otrace], first: str) -> None:
    """The Anthropic SDK's spans and OpenLLMetry's spans of the same calls, exported in two requests (a
    batch boundary between them), in either order, make the rows the one request makes; so does one
    half followed by the whole requests (a sender that regroups spans when it resends: the stored span
    came again with its partner, which was dropped with it as a duplicate)."""
    wrapper = "opentelemetry.instrumentation.anthropic"
    entries = [e for e in captured_otlp()
               if e["run"] == "openllmetry-0.62.4-anthropic-content" and e["path"] == "/v1/traces"]
    halves: dict[str, list[bytes]] = {"sdk": [], "openllmetry": []}
    for entry in entries:
        for name, bodies in halves.items():
            message = decoded(entry)
            for resource_spans in message.resource_spans:
                kept = [s for s in resource_spans.scope_spans if (s.scope.name == wrapper) == (name != "sdk")]
                del resource_spans.scope_spans[:]
                resource_spans.scope_spans.extend(kept)
            bodies.append(message.SerializeToString())

    def calls(node: Otrace) -> tuple[list[tuple], list[tuple]]:
        traces = sorted(((*(r[c] for c in CALL_COLUMNS[:-1]), r["ttft_ms"] and round(r["ttft_ms"], 1),
                          r["input_text"] is not None, r["output_text"] is not None, r["cost_usd"],
                          r["latency_ms"], r["created_at"]) for r in node.rows("llm_traces")), key=repr)
        errors = sorted((e["category"], e["model"], e["message"]) for e in node.rows("error_events"))
        return traces, errors

    whole = run(db=tmp_path / "whole.db")
    replay(whole, entries)
    reference = wait_until(lambda: (got := calls(whole)) and len(got[0]) == 6 and len(got[1]) == 2 and got,
                           what="the calls of the whole requests")
    node = run()
    second = ({"sdk", "openllmetry"} - {first}).pop()
    for body in halves[first] + halves[second]:
        assert otlp_post(node.port, "/v1/traces", body, PROTOBUF).status == 200
    wait_until(lambda: calls(node) == reference, what="the same calls from the split requests")
    assert node.health()["otlp"]["spans_merged"] == 6
    for body in halves[second]:                                   # the exporter retries the second half
        assert otlp_post(node.port, "/v1/traces", body, PROTOBUF).status == 200
    assert node.post("/v1/traces", trace(model="after-the-retry")).status == 202
    wait_until(lambda: any(r["model"] == "after-the-retry" for r in node.rows("llm_traces")), what="a mark")
    assert calls(node)[1] == reference[1] and len(node.rows("llm_traces")) == 7
    regrouped = run(db=tmp_path / "regrouped.db")
    for body in halves[first]:
        assert otlp_post(regrouped.port, "/v1/traces", body, PROTOBUF).status == 200
    replay(regrouped, entries)
    wait_until(lambda: calls(regrouped) == reference, what="the same calls from a regrouping resend")


def test_one_calls_spans_over_a_services_resources_and_a_service_named_in_no_text(
        run: Callable[..., Otrace]) -> None:
    """A Collector's batch sets exports of one process side by side, each its own resource of the same
    service: two instrumentations' spans of one call there are one row, as in one resource (they were
    two rows). A service.name that is no string (an array, a number) is its JSON text: its spans and
    metric points are taken (the spans were answered 500 with a traceback, the points refused)."""
    node = run()
    chat = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic", "gen_ai.response.id": "r1"}
    trace_hex = "4bf92f3577b34da6a3ce929d0e0e4736"
    outer = chat_span(trace_hex, "00000000000000b1", **chat, **{"gen_ai.usage.input_tokens": 10})
    inner = dict(chat_span(trace_hex, "00000000000000b2", **chat), startTimeUnixNano="1796000000100000000",
                 endTimeUnixNano="1796000000900000000")
    body = {"resourceSpans": [*spans_body(outer, scope="openllmetry", service="agent")["resourceSpans"],
                              *spans_body(inner, scope="sdk", service="agent")["resourceSpans"]]}
    assert node.post("/v1/traces", body).status == 200
    odd = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}
    named = spans_body(chat_span(trace_hex, "00000000000000c1", **odd), scope="a")
    named["resourceSpans"][0]["scopeSpans"].append({"scope": {"name": "b"}, "spans": [
        chat_span(trace_hex, "00000000000000c2", **odd)]})
    listed = {"arrayValue": {"values": [{"stringValue": "agent"}]}}
    named["resourceSpans"][0]["resource"]["attributes"][0]["value"] = listed
    assert node.post("/v1/traces", named).status == 200
    points = sums_body(5, 1796000000)
    points["resourceMetrics"][0]["resource"]["attributes"][0]["value"] = {"intValue": 7}
    assert "partialSuccess" not in node.post("/v1/metrics", points).json
    node.wait_persisted(3)
    rows = {r["trace_id"].rsplit("-", 1)[1]: r for r in node.rows("llm_traces")}
    assert set(rows) == {"00000000000000b2", "00000000000000c2"}
    assert (rows["00000000000000b2"]["prompt_tokens"], json.loads(rows["00000000000000c2"]["metadata"])[
        "service_name"]) == (10, '["agent"]')
    assert [r["service"] for r in node.rows("genai_metrics")] == ["7"]
    assert not node.logs("answer failed")


SDK_CLIENT = r'''
import json, sys
if sys.argv[1] == "protobuf":
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
else:
    from opentelemetry.exporter.otlp.json.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.json.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.json.http.trace_exporter import OTLPSpanExporter
from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, StatusCode, set_span_in_context

results = []

def recorded(exporter_class):
    """The exporter as configured by the environment alone, its every result noted."""
    class Recorded(exporter_class):
        def export(self, *args, **kwargs):
            result = super().export(*args, **kwargs)
            results.append([exporter_class.__name__, result.name])
            return result
    return Recorded()

resource = Resource.create({"service.name": "otrace-sdk-client"})
tracer_provider = TracerProvider(resource=resource)
tracer_provider.add_span_processor(SimpleSpanProcessor(recorded(OTLPSpanExporter)))
logger_provider = LoggerProvider(resource=resource)
logger_provider.add_log_record_processor(SimpleLogRecordProcessor(recorded(OTLPLogExporter)))
reader = PeriodicExportingMetricReader(recorded(OTLPMetricExporter), export_interval_millis=3_600_000)
meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
tracer, logger = tracer_provider.get_tracer("otrace.test"), logger_provider.get_logger("otrace.test")
meter = meter_provider.get_meter("otrace.test")
usage = meter.create_histogram("gen_ai.client.token.usage", unit="{token}")
requests = meter.create_counter("http.client.requests")
chat_attributes = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                   "gen_ai.request.model": "gpt-4o"}

agent = tracer.start_span("invoke_agent helper", attributes={"gen_ai.operation.name": "invoke_agent",
                                                             "gen_ai.request.model": "gpt-4o"})
chat = tracer.start_span("chat gpt-4o", context=set_span_in_context(agent), kind=SpanKind.CLIENT,
                         attributes=chat_attributes)
logger.emit(event_name="gen_ai.user.message", body={"content": "What is 2+2?"},    # before its span
            context=set_span_in_context(chat), attributes={"gen_ai.provider.name": "openai"})
chat.set_attributes({"gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.usage.input_tokens": 14,
                     "gen_ai.usage.output_tokens": 2, "gen_ai.usage.cache_read.input_tokens": 4,
                     "gen_ai.response.finish_reasons": ["stop"], "gen_ai.conversation.id": "conv-7"})
chat.end()
logger.emit(event_name="gen_ai.choice", context=set_span_in_context(chat),             # after it
            body={"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "4"}})
failed = tracer.start_span("chat gpt-4o", context=set_span_in_context(agent), kind=SpanKind.CLIENT,
                           attributes=chat_attributes)
failed.record_exception(TimeoutError("Request timed out."))
failed.set_attribute("error.type", "APITimeoutError")
failed.set_status(StatusCode.ERROR, "Request timed out.")
failed.end()
agent.end()
logger.emit(severity_number=SeverityNumber.ERROR, severity_text="ERROR", body="tool 'search' crashed",
            attributes={"exception.type": "ValueError", "exception.stacktrace": "Traceback\nValueError: q"})
token_attributes = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                    "gen_ai.response.model": "gpt-4o-2024-08-06"}
usage.record(14, {**token_attributes, "gen_ai.token.type": "input"})
usage.record(2, {**token_attributes, "gen_ai.token.type": "output"})
requests.add(1)
meter_provider.force_flush()
usage.record(30, {**token_attributes, "gen_ai.token.type": "input"})
meter_provider.force_flush()
keys = {name: f"{s.get_span_context().trace_id:032x}-{s.get_span_context().span_id:016x}"
        for name, s in (("chat", chat), ("failed", failed), ("agent", agent))}
tracer_provider.shutdown()
logger_provider.shutdown()
meter_provider.shutdown()
print(json.dumps({"results": results, **keys}))
'''


def client_env(endpoint: str, headers: str | None = None) -> dict[str, str]:
    """A client's environment: configured only through OTEL_EXPORTER_OTLP_ENDPOINT (and _HEADERS)."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
           "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    if headers:
        env["OTEL_EXPORTER_OTLP_HEADERS"] = headers
    return env


def run_client(command: list[str], endpoint: str, cwd: Path | None = None, headers: str | None = None
               ) -> dict[str, Any]:
    """A client process configured only through OTEL_EXPORTER_OTLP_ENDPOINT (and _HEADERS); its JSON
    report."""
    out = subprocess.run(command, env=client_env(endpoint, headers), capture_output=True, text=True,
                         timeout=120, cwd=cwd, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_with_an_ingest_token_the_sdk_sends_it_as_the_docs_say_and_one_without_is_counted(
        run: Callable[..., Otrace]) -> None:
    """OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer%20<token> (README, deploy.md) gets the SDK's
    exports in; without it every export fails 401 (the SDK does not retry it), which /health and
    /metrics count, as the request never reaches a count of events."""
    token = f"tok-{uuid.uuid4().hex}"
    node = run({"TRACE_INGEST_TOKEN": token})
    endpoint = f"http://127.0.0.1:{node.port}"
    client = [sys.executable, "-c", SDK_CLIENT, "protobuf"]
    refused = run_client(client, endpoint)
    assert {result for _, result in refused["results"]} == {"FAILURE"}
    assert node.health()["requests_unauthorized"] == len(refused["results"])
    metrics = node.request("GET", "/metrics").body.decode()
    assert f"otrace_requests_unauthorized_total {len(refused['results'])}" in metrics
    taken = run_client(client, endpoint, headers=f"Authorization=Bearer%20{token}")
    assert {result for _, result in taken["results"]} == {"SUCCESS"}
    assert {r["trace_id"] for r in node.rows("llm_traces")} == {taken["chat"], taken["failed"]}


@pytest.mark.parametrize("encoding", ["protobuf", "json"])
def test_the_opentelemetry_python_sdk_exports_to_otrace_with_success(run: Callable[..., Otrace],
                                                                     encoding: str) -> None:
    """The SDK's own OTLP/HTTP exporters (protobuf, and the JSON one), pointed at otrace by
    OTEL_EXPORTER_OTLP_ENDPOINT alone, export GenAI spans, log events and metrics: every export
    succeeds, and each becomes what it means."""
    node = run()
    report = run_client([sys.executable, "-c", SDK_CLIENT, encoding], f"http://127.0.0.1:{node.port}")
    assert report["results"] and all(result == "SUCCESS" for _, result in report["results"]), report
    assert sorted({name for name, _ in report["results"]}) == ["OTLPLogExporter", "OTLPMetricExporter",
                                                               "OTLPSpanExporter"]
    health = node.health()["otlp"]
    assert node.stop() == 0
    assert (health["spans"], health["llm_spans"], health["spans_not_llm"], health["log_errors"],
            health["log_content"], health["log_content_after_span"]) == (3, 2, 1, 1, 2, 1)
    rows = {r["trace_id"]: r for r in node.rows("llm_traces")}
    assert set(rows) == {report["chat"], report["failed"]}           # the agent span is counted, not kept
    chat, failed = rows[report["chat"]], rows[report["failed"]]
    assert (chat["provider"], chat["model"], chat["status"], chat["prompt_tokens"], chat["completion_tokens"],
            chat["total_tokens"], chat["cache_read_tokens"], chat["finish_reason"], chat["session_id"],
            chat["source"]) == ("openai", "gpt-4o-2024-08-06", "ok", 14, 2, 16, 4, "stop", "conv-7", "otlp")
    assert json.loads(chat["input_text"]) == [{"role": "user", "content": "What is 2+2?"}]   # waited for it
    assert json.loads(chat["output_text"]) == [{"index": 0, "finish_reason": "stop",            # filled in
                                                "message": {"role": "assistant", "content": "4"}}]
    meta = json.loads(chat["metadata"])
    assert (meta["otel_parent_span_id"], meta["gen_ai.request.model"], meta["service_name"],
            meta["scope"]) == (report["agent"].split("-")[1], "gpt-4o", "otrace-sdk-client", "otrace.test")
    assert (failed["status"], failed["error_type"], failed["model"], failed["latency_ms"] > 0) == (
        "error", "APITimeoutError", "gpt-4o", True)
    errors = {r["trace_id"]: r for r in node.rows("error_events")}
    call_error = errors.pop(report["failed"])
    assert (call_error["error_type"], call_error["category"], call_error["message"],
            call_error["provider"]) == ("llm_error", "timeout", "Request timed out.", "openai")
    assert "TimeoutError: Request timed out." in call_error["stack_trace"]
    [log_error] = errors.values()
    assert (log_error["error_type"], log_error["category"], log_error["severity"], log_error["message"],
            log_error["stack_trace"], log_error["source"]) == (
        "system_error", "other", "error", "tool 'search' crashed", "Traceback\nValueError: q", "otlp")
    points = [(r["name"], json.loads(r["attributes"])["gen_ai.token.type"], r["value"], r["count"],
               r["reset"]) for r in node.rows("genai_metrics")]
    assert points == [("gen_ai.client.token.usage", "input", 14.0, 1, 0),
                      ("gen_ai.client.token.usage", "output", 2.0, 1, 0),
                      ("gen_ai.client.token.usage", "input", 30.0, 1, 0)]      # a delta, not 44


NAN_CLIENT = r'''
import json, sys
if sys.argv[1] == "protobuf":
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
else:
    from opentelemetry.exporter.otlp.json.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.json.http.trace_exporter import OTLPSpanExporter
from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

tracer_provider, logger_provider = TracerProvider(), LoggerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
logger_provider.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter()))
with tracer_provider.get_tracer("otrace.test").start_as_current_span("chat gpt-4o") as chat:
    chat.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                         "gen_ai.request.temperature": float("nan"), "gen_ai.request.top_p": 0.9,
                         "gen_ai.usage.input_tokens": 14, "gen_ai.usage.output_tokens": 2})
    logger_provider.get_logger("otrace.test").emit(
        severity_number=SeverityNumber.ERROR, severity_text="ERROR", body="retry budget spent",
        attributes={"retry.delay_s": float("inf"), "retry.attempts": 3})
context = chat.get_span_context()
tracer_provider.shutdown()
logger_provider.shutdown()
print(json.dumps({"chat": f"{context.trace_id:032x}-{context.span_id:016x}"}))
'''


@pytest.mark.parametrize("encoding", ["protobuf", "json"])
def test_a_nan_attribute_from_the_sdk_is_left_out_and_its_call_and_failure_are_kept(
        run: Callable[..., Otrace], encoding: str) -> None:
    """OTLP's doubles may be NaN or infinite, which JSON cannot write: such an attribute of a call's span
    or of an ERROR record is left out, named in metadata.dropped and counted, and the call (its
    tokens) and the failure are stored, not refused whole."""
    node = run()
    report = run_client([sys.executable, "-c", NAN_CLIENT, encoding], f"http://127.0.0.1:{node.port}")
    [call] = wait_until(lambda: node.rows("llm_traces"), what="the call")
    [failure] = wait_until(lambda: node.rows("error_events"), what="the failure")
    meta = json.loads(call["metadata"])
    assert (call["trace_id"], call["prompt_tokens"], call["completion_tokens"]) == (report["chat"], 14, 2)
    assert "gen_ai.request.temperature" not in meta and meta["gen_ai.request.top_p"] == 0.9
    assert list(meta["dropped"]) == ["gen_ai.request.temperature"]
    meta = json.loads(failure["metadata"])
    assert (failure["message"], meta["retry.attempts"], list(meta["dropped"])) == (
        "retry budget spent", 3, ["retry.delay_s"])
    health = node.health()["otlp"]
    assert (health["spans_rejected"], health["span_values_dropped"], health["log_records_rejected"],
            health["log_values_dropped"]) == (0, 1, 0, 1)


# How the clients below begin: the Python SDK sending spans and the root logger's records over
# OTLP/HTTP only when flushed, a tracer, a logger, and a span's row key (SERVICE: their service.name).
FLUSHED_CLIENT = r"""
import json, logging, sys
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, StatusCode

resource = Resource.create({"service.name": "SERVICE"})
tracer_provider, logger_provider = TracerProvider(resource=resource), LoggerProvider(resource=resource)
tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=3_600_000))
logger_provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter(),
                                                                 schedule_delay_millis=3_600_000))
logging.getLogger().addHandler(LoggingHandler(level=logging.INFO, logger_provider=logger_provider))
log, tracer = logging.getLogger("app"), tracer_provider.get_tracer("otrace.test")


def key(span):
    return f"{span.get_span_context().trace_id:032x}-{span.get_span_context().span_id:016x}"
"""


LOGGED_FAILURE_CLIENT = FLUSHED_CLIENT.replace("SERVICE", "otrace-logging-client") + r"""
chat = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o"}
keys = {}

class RateLimitError(Exception):
    pass

agent = {"gen_ai.operation.name": "invoke_agent"}
with tracer.start_as_current_span("invoke_agent helper", attributes=agent):
    with tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes=chat,
                                      record_exception=False, set_status_on_exception=False) as span:
        keys["failed"] = key(span)
        try:
            raise RateLimitError("Error code: 429 - rate limited")
        except RateLimitError:
            log.exception("chat request failed")        # the call's own failure, logged in its span
            span.set_attribute("error.type", "RateLimitError")
            span.set_status(StatusCode.ERROR, "Error code: 429 - rate limited")
    with tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes=chat) as span:
        keys["ok"] = key(span)
        log.error("cache write failed")                  # in a call that went well: a failure of its own
    with tracer.start_as_current_span("execute_tool search",
                                      attributes={"gen_ai.operation.name": "execute_tool"}) as span:
        keys["tool"] = key(span)
        log.critical("tool search crashed")              # in a span that is no call
log.error("outside any span")
first, second = ((logger_provider, tracer_provider) if sys.argv[1] == "logs_first"
                 else (tracer_provider, logger_provider))
first.force_flush()
second.force_flush()
tracer_provider.shutdown()
logger_provider.shutdown()
print(json.dumps(keys))
"""


@pytest.mark.parametrize("first", ["logs_first", "spans_first"])
def test_a_failure_logged_inside_its_failed_llm_span_is_one_error_row(run: Callable[..., Otrace],
                                                                      first: str) -> None:
    """An app's logger.exception inside a chat call's span, exported by the Python SDK's logs
    pipeline with the span's ids, is that failed call's detail, whichever signal comes first: the
    span's one error row takes its stack trace and names it; ERROR records in an ok call's span, in a
    span that is no call, or in none, are failures of their own."""
    node = run()
    keys = run_client([sys.executable, "-c", LOGGED_FAILURE_CLIENT, first], f"http://127.0.0.1:{node.port}")
    node.wait_persisted(2 + 1 + 4)                   # two calls, the failure, four records
    errors = {r["message"]: r for r in node.rows("error_events")}
    assert set(errors) == {"Error code: 429 - rate limited", "cache write failed", "tool search crashed",
                           "outside any span"}
    failure = errors.pop("Error code: 429 - rate limited")
    assert (failure["trace_id"], failure["error_type"], failure["category"], failure["severity"]) == (
        keys["failed"], "llm_error", "rate_limit", "error")
    assert failure["stack_trace"].startswith("Traceback") and "RateLimitError" in failure["stack_trace"]
    assert json.loads(failure["metadata"])["otel_merged_logs"] == [
        {"message": "chat request failed", "scope": "app", "severity_text": "ERROR"}]
    spans = {message: json.loads(r["metadata"]).get("otel_span_id") for message, r in errors.items()}
    assert spans == {"cache write failed": keys["ok"].split("-")[1],
                     "tool search crashed": keys["tool"].split("-")[1], "outside any span": None}
    assert errors["tool search crashed"]["severity"] == "critical"
    assert node.health()["otlp"]["log_errors_merged"] == 1


def test_an_error_record_in_a_failed_spans_pushed_row_stays_a_row_of_its_own(run: Callable[..., Otrace]
                                                                             ) -> None:
    """A pushed row is not changed: an ERROR record of its failed span that comes after the push is
    kept as a row of its own, not lost."""
    node = run()
    trace_hex, span_hex = f"{7:032x}", f"{7:016x}"
    chat = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "error.type": "APITimeoutError"}
    failed = chat_span(trace_hex, span_hex, **chat)
    assert node.post("/v1/traces", spans_body(failed)).status == 200
    node.wait_persisted(2)
    with contextlib.closing(sqlite3.connect(node.db_path, timeout=10)) as conn, conn:    # pushed, as if
        conn.execute("UPDATE error_events SET synced = 1")
    record = log_body(trace_hex, span_hex, "", {"message": "timed out"}, severity=17)
    assert node.post("/v1/logs", record).status == 200
    node.wait_persisted(3)
    rows = sorted((r["trace_id"] == f"{trace_hex}-{span_hex}", r["synced"],
                   "otel_merged_logs" in r["metadata"]) for r in node.rows("error_events"))
    assert rows == [(False, 0, False), (True, 1, False)]


AGENT_USAGE_CLIENT = r"""
import json, sys
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

tracer_provider = TracerProvider(resource=Resource.create({"service.name": "otrace-agent-client"}))
tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=3_600_000))
tracer = tracer_provider.get_tracer("otrace.test")
chat = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o"}
parents = {"invoke_agent": {"gen_ai.operation.name": "invoke_agent", "gen_ai.provider.name": "openai"},
           "openllmetry_agent": {"traceloop.span.kind": "agent", "gen_ai.system": "openai"},
           "model_only": {"gen_ai.provider.name": "openai"}}
keys = {}
for name, attributes in parents.items():
    attributes["gen_ai.request.model"] = "gpt-4o"
    with tracer.start_as_current_span(name, attributes=attributes) as agent:
        for n in (1, 2):
            with tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes={
                    **chat, "gen_ai.usage.input_tokens": 1000 * n, "gen_ai.usage.output_tokens": 100 * n}):
                pass
        agent.set_attributes({"gen_ai.usage.input_tokens": 3000, "gen_ai.usage.output_tokens": 300})
        keys[name] = f"{agent.get_span_context().trace_id:032x}-{agent.get_span_context().span_id:016x}"
        if sys.argv[1] == "apart":
            tracer_provider.force_flush()        # the calls in one request, their agent's in the next
tracer_provider.shutdown()
print(json.dumps(keys))
"""


@pytest.mark.parametrize("export", ["together", "apart"])
def test_an_agent_span_with_its_calls_usage_is_no_call_of_its_own(run: Callable[..., Otrace],
                                                                   export: str) -> None:
    """Spans around model calls that carry their usage added up (an invoke_agent span, an OpenLLMetry
    agent span, a span naming a request model and no operation), exported by the Python SDK with their
    calls or in a later request: each call is one row, and the report counts each token once."""
    node = run()
    keys = run_client([sys.executable, "-c", AGENT_USAGE_CLIENT, export], f"http://127.0.0.1:{node.port}")
    node.wait_persisted(6)
    rows = node.rows("llm_traces")
    assert sorted((r["prompt_tokens"], r["completion_tokens"]) for r in rows) == [(1000, 100)] * 3 + [
        (2000, 200)] * 3
    assert not {r["trace_id"] for r in rows} & set(keys.values())
    health = node.health()["otlp"]
    assert (health["spans"], health["llm_spans"], health["spans_not_llm"], health["spans_around_calls"]) == (
        9, 6, 2, 1)
    assert node.stop() == 0
    totals = json.loads(report(node.db_path, "--json", "--since", "2000-01-01").stdout)["calls"]["totals"]
    assert (totals["calls"], totals["input_tokens"], totals["output_tokens"]) == (6, 9000, 900)


def test_a_span_around_calls_stored_before_a_restart_is_no_call_either(run: Callable[..., Otrace]) -> None:
    """The calls' rows say whose children they are: their parent coming after a restart of otrace
    (which forgot them) is still no call; a span naming a request model with no call under it is one."""
    node = run()
    trace_hex, agent_hex = f"{9:032x}", f"{9:016x}"
    chat = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 10}
    calls = [{**chat_span(trace_hex, f"{n:016x}", **chat), "parentSpanId": agent_hex} for n in (1, 2)]
    assert node.post("/v1/traces", spans_body(*calls)).status == 200
    node.wait_persisted(2)
    assert node.stop() == 0
    node = run(db=node.db_path)
    agent = chat_span(trace_hex, agent_hex, **{"gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 20})
    alone = chat_span(f"{10:032x}", agent_hex, **{"gen_ai.request.model": "m",
                                                   "gen_ai.usage.input_tokens": 5})
    assert node.post("/v1/traces", spans_body(agent, alone)).status == 200
    node.wait_persisted(1)                                  # the new process's: the call alone
    assert sorted(r["prompt_tokens"] for r in node.rows("llm_traces")) == [5, 10, 10]
    assert node.health()["otlp"]["spans_around_calls"] == 1


def test_a_span_taken_for_a_call_before_its_calls_came_is_deleted_while_not_pushed(
        run: Callable[..., Otrace]) -> None:
    """A span around calls that came before them (a child ended after it) was stored as a call: its
    calls delete its rows, unless pushed already."""
    node = run()
    agent = {"gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 20, "error.type": "ValueError"}
    first, pushed = (chat_span(f"{trace:032x}", f"{1:016x}", **agent) for trace in (11, 12))
    assert node.post("/v1/traces", spans_body(first, pushed)).status == 200
    node.wait_persisted(4)
    with contextlib.closing(sqlite3.connect(node.db_path, timeout=10)) as conn, conn:    # pushed, as if
        for table in ("llm_traces", "error_events"):
            conn.execute(f"UPDATE {table} SET synced = 1 WHERE trace_id = ?", (f"{12:032x}-{1:016x}",))
    chat = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 10}
    calls = [{**chat_span(f"{trace:032x}", f"{2:016x}", **chat), "parentSpanId": f"{1:016x}"}
             for trace in (11, 12)]
    assert node.post("/v1/traces", spans_body(*calls)).status == 200
    node.wait_persisted(6)
    assert sorted((r["prompt_tokens"], r["synced"]) for r in node.rows("llm_traces")) == [(10, 0), (10, 0),
                                                                                         (20, 1)]
    assert [r["synced"] for r in node.rows("error_events")] == [1]
    assert node.health()["otlp"]["spans_around_calls"] == 1


IN_TWO_CLIENT = FLUSHED_CLIENT.replace("SERVICE", "otrace-in-two-client") + r"""
from opentelemetry import trace

chat = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 1000, "gen_ai.usage.output_tokens": 100}


def go_on(first):
    first.force_flush()                         # the first export is at otrace: its push may begin
    print("sent", flush=True)
    sys.stdin.readline()


class RateLimitError(Exception):
    pass


if sys.argv[1] == "fold":                     # the failure's ERROR record first, then its failed span
    with tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes=chat,
                                      record_exception=False, set_status_on_exception=False) as span:
        keys = {"first": None, "then": key(span)}
        try:
            raise RateLimitError("Error code: 429 - rate limited")
        except RateLimitError:
            log.exception("chat request failed")
            span.set_attribute("error.type", "RateLimitError")
            span.set_status(StatusCode.ERROR, "Error code: 429 - rate limited")
    go_on(logger_provider)
else:                                           # a step that ended before its call, then the call
    step = tracer.start_span("plan", attributes={
        "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 1000, "gen_ai.usage.output_tokens": 100})
    call = tracer.start_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes=chat,
                             context=trace.set_span_in_context(step))
    keys = {"first": key(step), "then": key(call)}
    step.end()
    go_on(tracer_provider)
    call.end()
tracer_provider.shutdown()
logger_provider.shutdown()
print(json.dumps(keys))
"""


@pytest.mark.parametrize("answer", [200, 503])
@pytest.mark.parametrize("rule", ["fold", "step"])
def test_a_row_a_push_carries_is_not_folded_or_deleted_as_a_step_until_it_ends(
        run: Callable[..., Otrace], receiver: Receiver, rule: str, answer: int) -> None:
    """A failure's ERROR record, or a span stored as a call before its LLM child came, is on its way to
    the receiver when the Python SDK exports what makes it part of another row (its failed span) or no
    call (the child): the push may deliver it, so it stays a row until the cycle ends, which applies the
    rule only if the push failed. Whatever the answer, the receiver holds what the database holds."""
    on_wire, release = threading.Event(), threading.Event()
    receiver.script = [held(on_wire, release, answer)]
    node = run(push_env(receiver, TRACE_PUSH_INTERVAL="500ms", TRACE_PUSH_RETRIES="1"))
    client = subprocess.Popen([sys.executable, "-c", IN_TWO_CLIENT, rule],
                              env=client_env(f"http://127.0.0.1:{node.port}"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline() == "sent\n"
        assert on_wire.wait(30)
        out, err = client.communicate("go on\n", timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, err[-3000:]
    keys = json.loads(out.strip().splitlines()[-1])
    [carried] = receiver.requests[0]["json"]["events"]
    if rule == "step":
        assert carried["event_id"] == f"llm_trace:{keys['first']}"
    else:
        assert (carried["type"], carried["data"]["message"]) == ("error_event", "chat request failed")
        keys["first"] = carried["trace_id"]
    wait_until(lambda: node.query("SELECT 1 FROM llm_traces WHERE trace_id = ?", keys["then"]),
               what="the second export's rows written, while the first is on its way")
    release.set()

    def stored() -> set[str]:
        return {f"{kind}:{row['trace_id']}" for table, kind in (("llm_traces", "llm_trace"),
                                                                ("error_events", "error_event"))
                for row in node.rows(table)}

    wait_until(lambda: node.query("SELECT synced FROM llm_traces WHERE trace_id = ?", keys["then"]) == [(1,)]
               and node.query("SELECT count(*) FROM llm_traces WHERE synced = 0")[0][0]
               + node.query("SELECT count(*) FROM error_events WHERE synced = 0")[0][0] == 0,
               timeout=30, what="every row pushed")
    received = {e["event_id"] for r in receiver.requests if r["answered"] == 200 for e in r["json"]["events"]}
    assert received == stored()
    first = f"{'llm_trace' if rule == 'step' else 'error_event'}:{keys['first']}"
    assert (first in received) is (answer == 200)           # delivered: a row; else folded, or a step
    if rule == "fold":
        [failure] = [r for r in node.rows("error_events") if r["trace_id"] == keys["then"]]
        assert ("otel_merged_logs" in json.loads(failure["metadata"])) is (answer != 200)


def test_a_step_row_delivered_and_going_again_is_never_deleted(run: Callable[..., Otrace],
                                                               receiver: Receiver) -> None:
    """A span stored as a call is delivered while its prompt fills it in, so it goes again unmarked; its
    LLM child comes while that second push is under way, which fails: the receiver has the row from the
    first, so it stays a row, and goes again."""
    on_wire, release, again, release_again = (threading.Event() for _ in range(4))
    receiver.script = [held(on_wire, release), held(again, release_again, 503)]
    node = run(push_env(receiver, TRACE_PUSH_INTERVAL="500ms", TRACE_PUSH_RETRIES="1"))
    trace_hex, step_hex = f"{13:032x}", f"{1:016x}"
    step = chat_span(trace_hex, step_hex, **{"gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 20})
    assert node.post("/v1/traces", spans_body(step)).status == 200
    assert on_wire.wait(30)
    assert node.post("/v1/logs", log_body(trace_hex, step_hex, "gen_ai.user.message", {"content": "plan"})
                     ).status == 200
    wait_until(lambda: node.query("SELECT input_text IS NOT NULL FROM llm_traces") == [(1,)],
               what="the prompt merged into the row on its way")
    release.set()
    assert again.wait(30)
    chat = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 10}
    call = {**chat_span(trace_hex, f"{2:016x}", **chat), "parentSpanId": step_hex}
    assert node.post("/v1/traces", spans_body(call)).status == 200
    wait_until(lambda: node.query("SELECT 1 FROM llm_traces WHERE trace_id = ?", f"{trace_hex}-{2:016x}"),
               what="the child's row written, while the row goes again")
    release_again.set()
    wait_until(lambda: node.query("SELECT synced FROM llm_traces WHERE trace_id = ?", f"{trace_hex}-{2:016x}")
               == [(1,)] and node.query("SELECT count(*) FROM llm_traces WHERE synced = 0") == [(0,)],
               timeout=30, what="every row pushed")
    sent = [[e["event_id"] for e in r["json"]["events"]] for r in receiver.requests]
    assert sent[:2] == [[f"llm_trace:{trace_hex}-{step_hex}"]] * 2
    received = {e for r, ids in zip(receiver.requests, sent, strict=True) if r["answered"] == 200
                for e in ids}
    assert received == {f"llm_trace:{r['trace_id']}" for r in node.rows("llm_traces")}


JS_PACKAGES = ["@opentelemetry/api@1", "@opentelemetry/sdk-trace-base@2", "@opentelemetry/resources@2",
               "@opentelemetry/exporter-trace-otlp-proto@0"]
JS_CLIENT = r'''
const { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } =
  require("@opentelemetry/sdk-trace-base");
const { OTLPTraceExporter } = require("@opentelemetry/exporter-trace-otlp-proto");
const { resourceFromAttributes } = require("@opentelemetry/resources");
const memory = new InMemorySpanExporter();
const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({"service.name": "otrace-js-client"}),
  spanProcessors: [new SimpleSpanProcessor(memory)]});
const span = provider.getTracer("otrace.js").startSpan("chat claude-sonnet-4-5", {kind: 2, attributes: {
  "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
  "gen_ai.request.model": "claude-sonnet-4-5", "gen_ai.usage.input_tokens": 1200,
  "gen_ai.usage.output_tokens": 80, "gen_ai.response.finish_reasons": ["end_turn"]}});
span.end();
const spans = memory.getFinishedSpans();
const exporter = new OTLPTraceExporter();               // OTEL_EXPORTER_OTLP_ENDPOINT, protobuf
exporter.export(spans, (result) => {
  const context = spans[0].spanContext();
  console.log(JSON.stringify({code: result.code, error: result.error ? String(result.error) : null,
                              key: `${context.traceId}-${context.spanId}`}));
  exporter.shutdown();
});
'''


def javascript_exporter() -> Path:
    """A scratch directory under .cache/ with the OpenTelemetry JavaScript SDK and its OTLP/HTTP
    protobuf exporter from npm; the test is skipped without node, npm or the registry."""
    folder = HERE / ".cache" / "js-otlp"
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("needs node and npm")
    if not (folder / "node_modules" / "@opentelemetry" / "exporter-trace-otlp-proto").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"name": "otrace-js-otlp", "private": true}\n')
        out = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", *JS_PACKAGES],
                             cwd=folder, capture_output=True, text=True, timeout=300, check=False)
        if out.returncode:
            pytest.skip(f"npm install failed (registry unreachable?): {out.stderr[-300:]}")
    return folder


def test_the_opentelemetry_javascript_exporter_sends_chunked_protobuf_that_is_stored(
        run: Callable[..., Otrace]) -> None:
    folder = javascript_exporter()
    node = run()
    script = folder / "client.js"
    script.write_text(JS_CLIENT)
    report = run_client(["node", str(script)], f"http://127.0.0.1:{node.port}", cwd=folder)
    assert (report["code"], report["error"]) == (0, None), report             # ExportResultCode.SUCCESS
    node.wait_persisted(1)
    [row] = node.rows("llm_traces")
    assert (row["trace_id"], row["provider"], row["model"], row["prompt_tokens"], row["completion_tokens"],
            row["finish_reason"], row["source"]) == (
        report["key"], "anthropic", "claude-sonnet-4-5", 1200, 80, "end_turn", "otlp")
    assert json.loads(row["metadata"])["service_name"] == "otrace-js-client"


def rpc_status(body: bytes) -> tuple[int, str]:
    """(code, message) of a google.rpc.Status, decoded by hand: field 1 varint, field 2 string."""
    assert body[0] == 0x08
    code, at, shift = 0, 1, 0
    while True:
        code |= (body[at] & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not body[at - 1] & 0x80:
            break
    assert body[at] == 0x12
    length, at, shift = 0, at + 1, 0
    while True:
        length |= (body[at] & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not body[at - 1] & 0x80:
            break
    return code, body[at:at + length].decode()


def test_otlp_refusals_follow_the_specification(run: Callable[..., Otrace]) -> None:
    """A body that can never be taken gets 400 (a google.rpc.Status in the request's encoding, naming
    the problem); a bad item in a good body gets 200 with partial_success; the token, the body limit
    (counted after gzip) and the content type apply as elsewhere; otrace's own JSON still works."""
    node = run({"TRACE_INGEST_TOKEN": "tok", "TRACE_MAX_BODY_BYTES": "64KiB"})
    auth = {"Authorization": "Bearer tok"}
    bad = node.post("/v1/traces", b"\x0a\x05\x0a\x03", headers={**PROTOBUF, **auth})
    assert (bad.status, bad.headers["content-type"]) == (400, "application/x-protobuf")
    code, message = rpc_status(bad.body)
    assert code == 3 and "not an OTLP/protobuf ExportTraceServiceRequest" in message
    json_bad = node.post("/v1/metrics", {"resourceMetrics": "no"}, headers=auth)
    assert (json_bad.status, json_bad.json["code"]) == (400, 3)
    assert "not OTLP JSON" in json_bad.json["message"]
    assert node.post("/v1/logs", {"hello": 1}, headers=auth).json["message"].startswith(
        "body is not OTLP JSON: its top level must be an object with resourceLogs")
    unauthorized = node.post("/v1/logs", b"", headers=PROTOBUF)
    assert unauthorized.status == 401
    assert rpc_status(unauthorized.body) == (16, "missing or wrong bearer token")
    assert node.post("/v1/traces", b"x", headers={"Content-Type": "text/plain", **auth}).status == 415
    assert node.post("/v1/errors", b"", headers={**PROTOBUF, **auth}).status == 415    # not an OTLP path
    bomb = gzip.compress(b"\x00" * (1 << 20))
    big = node.post("/v1/traces", bomb, headers={**PROTOBUF, **auth, "Content-Encoding": "gzip"})
    assert big.status == 413 and "TRACE_MAX_BODY_BYTES" in rpc_status(big.body)[1]
    empty = node.post("/v1/traces", b"", headers={**PROTOBUF, **auth})
    assert (empty.status, empty.body) == (200, b"")
    coding = exchange(node.port, "POST", "/v1/logs", b"", {**PROTOBUF, **auth, "Transfer-Encoding": "br"})
    assert (coding.status, coding.headers["content-type"]) == (501, "application/x-protobuf")  # framing
    assert rpc_status(coding.body) == (
        12, "Transfer-Encoding 'br' is not supported: only chunked, on HTTP/1.1")
    both = {**auth, "Content-Length": "5", "Transfer-Encoding": "chunked", "Content-Type": "application/json"}
    framed = exchange(node.port, "POST", "/v1/metrics", b"0\r\n\r\n", both)
    assert (framed.status, framed.json["code"]) == (400, 3), framed
    assert exchange(node.port, "POST", "/v1/traces", b"0\r\n\r\n", both).json == {     # otrace's own
        "error": "both Content-Length and Transfer-Encoding: chunked", "field": None}

    good = chat_span("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331",
                     **{"gen_ai.operation.name": "chat", "gen_ai.request.model": "m",
                        "gen_ai.system": "openai"})
    huge = chat_span("0af7651916cd43dd8448eb211c80319c", "00000000000000a1",
                     **{"gen_ai.operation.name": "chat", "gen_ai.request.model": "m",
                        "gen_ai.usage.input_tokens": 2**60})
    no_ids = chat_span("00000000000000000000000000000000", "00000000000000a2",
                       **{"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"})
    odd_names = chat_span("0af7651916cd43dd8448eb211c80319c", "00000000000000a3",
                          **{"gen_ai.operation.name": "chat", "gen_ai.request.model": "m",
                             "gen_ai.usage.input_tokens": 40, "gen_ai.conversation.id": "c" * 300})
    odd_names["attributes"].append({"key": "gen_ai.response.finish_reasons",      # a stream cut short
                                    "value": {"arrayValue": {"values": []}}})
    partial = node.post("/v1/traces", spans_body(good, huge, no_ids, odd_names), headers=auth)
    assert partial.status == 200, partial
    assert partial.json["partialSuccess"]["rejectedSpans"] == "1"          # a call with a bad count stays
    assert "no valid traceId and spanId" in partial.json["partialSuccess"]["errorMessage"]
    protobuf = node.post("/v1/traces", otlp_message("/v1/traces", spans_body(no_ids)).SerializeToString(),
                         headers={**PROTOBUF, **auth})
    answer = otlp_classes()["/v1/traces"][1].FromString(protobuf.body)
    assert (protobuf.status, answer.partial_success.rejected_spans) == (200, 1)
    assert node.post("/v1/traces", trace(), headers=auth).status == 202          # otrace's own JSON
    own = node.post("/v1/traces", {"provider": "p", "metadata": {"resourceSpans": []}}, headers=auth)
    assert own.status == 400 and own.json["field"] == "model"            # not OTLP: still otrace's JSON
    otlp = node.post("/v1/traces", {"resourceSpans": "x", "provider": "p"}, headers=auth)   # top level
    assert otlp.status == 400 and otlp.json["code"] == 3 and "resourceSpans" in otlp.json["message"]
    node.wait_persisted(4)
    rows = {r[0]: r[1:] for r in node.query("SELECT trace_id, prompt_tokens, metadata, session_id, "
                                            "finish_reason FROM llm_traces WHERE source = 'otlp'")}
    assert set(rows) == {"0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
                         "0af7651916cd43dd8448eb211c80319c-00000000000000a1",
                         "0af7651916cd43dd8448eb211c80319c-00000000000000a3"}
    prompt, metadata, _, _ = rows["0af7651916cd43dd8448eb211c80319c-00000000000000a1"]
    assert prompt is None and "must be an integer" in json.loads(metadata)["dropped"]["prompt_tokens"]
    prompt, metadata, session, finish = rows["0af7651916cd43dd8448eb211c80319c-00000000000000a3"]
    assert (prompt, session, finish) == (40, None, None)                  # the call kept, its tokens too
    assert json.loads(metadata)["dropped"] == {"session_id": "session_id must be at most 256 characters"}
    assert (node.health()["otlp"]["spans_rejected"], node.health()["otlp"]["span_values_dropped"]) == (2, 2)
    assert not node.logs("request failed")
    said = node.wait_log(lambda e: e.get("message") == "request partly refused")   # exporters do not say it
    assert (said["status"], said["route"], said["items_refused"], said["client"]) == (
        200, "/v1/traces", 1, "127.0.0.1")
    assert "no valid traceId and spanId" in said["error"]
    assert len(node.logs("request partly refused")) == 1        # the protobuf one: within the same minute


def test_otlp_refusals_of_a_late_body_or_an_oversized_head_are_a_status_too(run: Callable[..., Otrace]
                                                                            ) -> None:
    """On /v1/metrics and /v1/logs every refusal is a google.rpc.Status in the request's encoding: also
    a body or head late past TRACE_READ_TIMEOUT (it was otrace's own JSON), more than 100 headers (it was
    JSON for a protobuf request) and a head over 64 KiB whose request line names the route (otrace's
    JSON)."""
    node = run({"TRACE_READ_TIMEOUT": "500ms"})
    body_late = "Content-Length: 100\r\n\r\nabc"
    for content_type, route, rest in (("application/x-protobuf", "/v1/metrics", body_late),
                                      ("application/json", "/v1/logs", body_late),
                                      ("application/x-protobuf", "/v1/logs", "X-More: ")):   # its head late
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as late:
            late.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                         f"{rest}".encode())
            head, _, body = read_to_end(late).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and f"Content-Type: {content_type}".encode() in head, head
        code, message = rpc_status(body) if content_type != "application/json" else (
            json.loads(body)["code"], json.loads(body)["message"])
        assert code == 4 and "TRACE_READ_TIMEOUT (0.5 s)" in message, (route, body)
    many = exchange(node.port, "POST", "/v1/metrics", b"", PROTOBUF | {f"x-{i}": "1" for i in range(101)})
    assert (many.status, many.headers["content-type"]) == (431, "application/x-protobuf")
    assert rpc_status(many.body) == (3, "more than 100 headers")
    big = exchange(node.port, "POST", "/v1/logs", b"{}", {"Content-Type": "application/json",
                                                          "x-big": "y" * 70_000})
    assert big.status == 431 and (big.json["code"], big.json["message"]) == (
        3, "request line and headers are over 65536 bytes"), big
    assert exchange(node.port, "POST", "/v1/traces", b"", {**PROTOBUF, "x-big": "y" * 70_000}).headers[
        "content-type"] == "application/x-protobuf"
    assert node.post("/v1/metrics", b"", headers=PROTOBUF).status == 200      # and it serves on


def test_a_spans_empty_finish_reasons_are_left_out_of_its_list(run: Callable[..., Otrace]) -> None:
    """gen_ai.response.finish_reasons ["", "stop", ""] is "stop" (it was ",stop,"); all empty, none."""
    node = run()
    spans = []
    for n, reasons in enumerate((["", "stop", ""], ["", ""])):
        span = chat_span(f"{n + 1:032x}", f"{n + 1:016x}", **{"gen_ai.operation.name": "chat",
                                                              "gen_ai.request.model": "m"})
        span["attributes"].append({"key": "gen_ai.response.finish_reasons", "value": {"arrayValue": {
            "values": [{"stringValue": reason} for reason in reasons]}}})
        spans.append(span)
    assert node.post("/v1/traces", spans_body(*spans)).json == {}
    node.wait_persisted(2)
    assert node.query("SELECT finish_reason FROM llm_traces ORDER BY trace_id") == [("stop",), (None,)]


def test_a_calls_metadata_over_its_cap_keeps_what_names_its_spans(run: Callable[..., Otrace]) -> None:
    """A call whose attributes are over TRACE_MAX_TEXT_BYTES as metadata (OpenLLMetry's definitions of
    an agent's twenty tools): its largest attributes are left out, and counted, and the span's ids,
    service and scope stay (the whole metadata used to give way to a marker); its failure's row names
    the service and scope too."""
    node = run()
    schema = {f"p{i}": {"type": "string", "description": "d" * 80} for i in range(10)}
    tools = {f"llm.request.functions.{n}.parameters": json.dumps(schema) for n in range(20)}
    chat = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.provider.name": "openai"}
    span = chat_span(f"{9:032x}", f"{9:016x}", **chat, **{"llm.request.functions.0.name": "search"}, **tools)
    span["status"] = {"code": 2, "message": "rate limited"}
    scope = "opentelemetry.instrumentation.openai.v1"
    assert node.post("/v1/traces", spans_body(span, scope=scope, service="agent")).status == 200
    node.wait_persisted(2)
    [(text,)] = node.query("SELECT metadata FROM llm_traces")
    meta = json.loads(text)
    assert len(text.encode()) <= 16384 and 0 < meta["_otrace_left_out"] < 20
    assert (meta["otel_span_id"], meta["service_name"], meta["scope"], meta["llm.request.functions.0.name"]
            ) == (f"{9:016x}", "agent", scope, "search")
    [(error,)] = node.query("SELECT metadata FROM error_events")
    assert (json.loads(error)["service_name"], json.loads(error)["scope"]) == ("agent", scope)


def test_a_full_queue_answers_otlp_with_503_and_retry_after(run: Callable[..., Otrace]) -> None:
    """Overload is 503 with Retry-After: 1, which both generations of the Python exporter retry, and
    nothing of that request is kept; the next one, once the writer is back, is."""
    node = run({"TRACE_QUEUE_SIZE": "4", "TRACE_BATCH_SIZE": "2"})
    def body(n: int) -> bytes:
        return otlp_message("/v1/traces", spans_body(*(chat_span(
            f"{n:032x}", f"{i + 1:016x}", **{"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"})
            for i in range(3)))).SerializeToString()
    blocker = sqlite3.connect(node.db_path, isolation_level=None, timeout=10)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        assert node.post("/v1/traces", body(1), headers=PROTOBUF).status == 200     # into an empty queue
        full = node.post("/v1/traces", body(2), headers=PROTOBUF)
        assert (full.status, full.headers["retry-after"], full.headers["content-type"]) == (
            503, "1", "application/x-protobuf")
        assert rpc_status(full.body) == (14, "queue is full; retry later")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    node.wait_persisted(3)
    assert node.post("/v1/traces", body(2), headers=PROTOBUF).status == 200         # the exporter's retry
    node.wait_persisted(6)
    assert len(node.rows("llm_traces")) == 6


def error_records(count: int, tag: str) -> bytes:
    """An OTLP logs export request (protobuf) of `count` distinct ERROR records: about 48 bytes each."""
    request = otlp_classes()["/v1/logs"][0]()
    scope = request.resource_logs.add().scope_logs.add()
    for i in range(count):
        record = scope.log_records.add()
        record.time_unix_nano = 1_700_000_000 * 10**9 + i
        record.severity_number, record.severity_text = 17, "ERROR"
        record.body.string_value = f"tool {tag} failed: {i}"
    return request.SerializeToString()


def test_a_large_otlp_request_holds_only_its_own_client(run: Callable[..., Otrace]) -> None:
    """An export request that takes long to map (10,000 log records, about half a MiB) is mapped on
    the OTLP receiver's thread: /health and the JSON API answer meanwhile, and it is answered 200 with
    every record stored. A SIGTERM while the next one is mapped stops otrace cleanly, nothing that was
    accepted lost (given the time to write it: a CPU-starved machine can take more than the default 4 s)."""
    node = run({"TRACE_SHUTDOWN_TIMEOUT": "60s"})
    big = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    big.request("POST", "/v1/logs", error_records(10_000, "a"), headers=PROTOBUF)
    wait_until(lambda: node.health()["otlp"].get("requests_in_progress"), 30, "/health while it is mapped")
    assert node.post("/v1/traces", {"provider": "p", "model": "m", "trace_id": "agent-1"}).status == 202
    answer = big.getresponse()
    assert (answer.status, answer.read()) == (200, b"")          # no partial_success: all taken
    node.wait_persisted(10_001, timeout=60)
    assert node.query("SELECT count(*) FROM error_events WHERE source = 'otlp'") == [(10_000,)]
    big.request("POST", "/v1/logs", error_records(10_000, "b"), headers=PROTOBUF)
    wait_until(lambda: node.health()["otlp"]["requests_in_progress"], 30, "the next request mapped")
    assert node.stop(timeout=30) == 0
    assert node.logs("stopped")[0]["events_lost"] == 0
    assert not [e for e in node.lines if e.get("level") in ("ERROR", "CRITICAL")], node.lines[-5:]
    big.close()


def test_otlp_requests_waiting_past_the_backlog_are_answered_503_and_a_half_closed_client_is_answered(
        run: Callable[..., Otrace]) -> None:
    """Each OTLP request waiting for the thread that maps them holds its body: past TRACE_OTLP_BACKLOG
    one more is answered 503 with Retry-After, in OTLP's form, without its body inflated. A client
    that sends its request and closes its side (shutdown(SHUT_WR)) still gets its answer, and then the
    answers to what it sent behind it."""
    node = run({"TRACE_OTLP_BACKLOG": "1"})
    big = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    big.request("POST", "/v1/logs", error_records(20_000, "a"), headers=PROTOBUF)
    wait_until(lambda: node.health()["otlp"].get("requests_in_progress"), 30, "the request being mapped")
    refused = node.post("/v1/logs", error_records(1, "b"), headers=PROTOBUF)
    assert (refused.status, refused.headers["retry-after"]) == (503, "1")
    assert rpc_status(refused.body)[1].endswith("(TRACE_OTLP_BACKLOG); retry later")
    span = chat_span("1" * 32, "1" * 16, **{"gen_ai.request.model": "m"})
    as_json = node.post("/v1/traces", spans_body(span))
    assert (as_json.status, as_json.json["code"]) == (503, 14)                 # OTLP's answer, in JSON
    gzipped = {**PROTOBUF, "Content-Encoding": "gzip"}
    unread = node.post("/v1/metrics", b"\x1f\x8b not gzip", headers=gzipped)
    assert unread.status == 503                         # refused before its body is inflated (not a 400)
    assert node.health()["otlp"]["requests_refused"] == 3
    assert big.getresponse().status == 200
    node.wait_persisted(20_000, timeout=60)                   # one request larger than the queue at a time
    posted = json.dumps(trace()).encode()                        # pipelined behind one, then a FIN
    behind = (b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(posted) + posted + b"GET /health HTTP/1.1\r\n\r\n")
    for records, pipelined in ((1, b""), (10_000, b""), (10, behind)):
        body = error_records(records, f"c{records}")
        with socket.create_connection(("127.0.0.1", node.port), timeout=60) as sock:
            sock.sendall(b"POST /v1/logs HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body + pipelined)
            sock.shutdown(socket.SHUT_WR)
            answer = b"".join(iter(lambda: sock.recv(65536), b""))
        statuses = re.findall(rb"HTTP/1.1 (\d+) ", answer)
        assert statuses == ([b"200"] if not pipelined else [b"200", b"202", b"200"]), answer[:300]
    node.wait_persisted(20_000 + 1 + 10_000 + 10 + 1, timeout=60)


def sums_body(value: float, time_s: int, start_s: int = 1, *, temporality: int = 2,
              name: str = "openclaw.tokens", attributes: dict[str, str] | None = None) -> dict[str, Any]:
    """One OTLP JSON sum point of a series of the OpenClaw gateway."""
    return {"resourceMetrics": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "openclaw-gateway"}}]},
        "scopeMetrics": [{"scope": {"name": "openclaw"}, "metrics": [{"name": name, "unit": "1", "sum": {
            "aggregationTemporality": temporality, "isMonotonic": True, "dataPoints": [{
                "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in (attributes or {
                    "openclaw.token": "input", "openclaw.provider": "anthropic"}).items()],
                "startTimeUnixNano": str(start_s * 10**9), "timeUnixNano": str(time_s * 10**9),
                "asDouble": value}]}}]}]}]}


def test_cumulative_metrics_become_deltas_across_restarts_and_resets(run: Callable[..., Otrace]) -> None:
    """Each point of a cumulative series is stored as its change since the last: across a restart
    (the last point is kept in the database), never twice for a retried point, from zero after the
    series restarted (a reset, flagged); delta points as they come; other metrics counted only."""
    node = run()
    for value, at in ((100, 10), (100, 20), (150, 30), (150, 30)):          # unchanged, then a retry
        assert node.post("/v1/metrics", sums_body(value, at)).status == 200
    node.post("/v1/metrics", sums_body(5, 12, name="http.server.requests"))
    node.wait_persisted(2)
    assert node.stop() == 0
    node = run(db=node.db_path)
    for value, at, start in ((175, 40, 1), (20, 50, 45), (20, 50, 45)):     # restarted at 45, retried
        assert node.post("/v1/metrics", sums_body(value, at, start)).status == 200
    node.post("/v1/metrics", sums_body(7, 50, 49, temporality=1, name="gen_ai.client.calls"))
    node.post("/v1/metrics", sums_body(7, 50, 49, temporality=1, name="gen_ai.client.calls"))
    health = node.wait_persisted(4)
    assert node.stop() == 0
    rows = [(r["name"], r["value"], r["window_start"], r["created_at"], r["reset"], r["provider"],
             r["service"]) for r in node.rows("genai_metrics")]
    assert rows == [("openclaw.tokens", 100.0, 1000, 10000, 0, "anthropic", "openclaw-gateway"),
                    ("openclaw.tokens", 50.0, 20000, 30000, 0, "anthropic", "openclaw-gateway"),
                    ("openclaw.tokens", 25.0, 30000, 40000, 0, "anthropic", "openclaw-gateway"),
                    ("openclaw.tokens", 20.0, 45000, 50000, 1, "anthropic", "openclaw-gateway"),
                    ("gen_ai.client.calls", 7.0, 49000, 50000, 0, "anthropic", "openclaw-gateway")]
    assert (health["otlp"]["metric_resets"], health["otlp"]["metric_points_other"]) == (1, 0)
    assert len({r["trace_id"] for r in node.rows("genai_metrics")}) == 5


def test_a_histogram_point_whose_buckets_do_not_fit_its_bounds_is_refused(run: Callable[..., Otrace]) -> None:
    """OTLP: a histogram's bucketCounts hold one count more than its explicitBounds, which rise; a point
    otherwise is refused by partial_success, and the request's other points are kept."""
    def point(counts: list[int], bounds: list[float], model: str) -> dict[str, Any]:
        return {"startTimeUnixNano": "1796160000000000000", "timeUnixNano": "1796160010000000000",
                "count": str(sum(counts)), "sum": 1.0, "bucketCounts": [str(n) for n in counts],
                "explicitBounds": bounds,
                "attributes": [{"key": "gen_ai.request.model", "value": {"stringValue": model}}]}

    points = [point([1, 2], [0.5], "fits"), point([], [], "no buckets"), point([1, 2], [], "short"),
              point([1, 0, 2], [0.5, 0.5], "flat")]
    metric = {"name": "gen_ai.client.operation.duration", "unit": "s",
              "histogram": {"aggregationTemporality": 1, "dataPoints": points}}
    node = run()
    answer = node.post("/v1/metrics", {"resourceMetrics": [{"resource": {}, "scopeMetrics": [
        {"scope": {"name": "s"}, "metrics": [metric]}]}]})
    assert answer.status == 200 and answer.json["partialSuccess"]["rejectedDataPoints"] == "2", answer
    message = answer.json["partialSuccess"]["errorMessage"]
    assert "one count more than explicitBounds" in message and "must rise" in message, message
    node.wait_persisted(2)
    assert sorted(r["model"] for r in node.rows("genai_metrics")) == ["fits", "no buckets"]


def test_a_metric_point_past_what_its_series_can_keep_is_refused(run: Callable[..., Otrace]) -> None:
    """A point timed at or past 2^63 ns (2262-04-11: a clock far off) was answered 200 and stored, but
    its series' state could not be (the statement dropped, an ERROR logged), so after a restart the
    next point counted the whole series again. It is refused, by partial_success; the last
    nanosecond SQLite holds is taken."""
    node = run()
    last = (2**63 - 1) // 10**9                              # whole seconds: the body's times
    late = node.post("/v1/metrics", sums_body(10, last + 1, start_s=last + 1))
    assert late.status == 200 and late.json["partialSuccess"]["rejectedDataPoints"] == "1", late
    assert "from 1970 to 2262-04-11" in late.json["partialSuccess"]["errorMessage"]
    assert node.post("/v1/metrics", sums_body(10, last, start_s=last)).json == {}
    node.wait_persisted(1)
    assert node.query("SELECT time_ns FROM otlp_series") == [(last * 10**9,)]
    assert node.health()["events_dropped"] == 0 and not node.logs("statement cannot be run; dropped")


def test_like_error_records_of_two_services_or_one_request_are_rows_of_their_own(
        run: Callable[..., Otrace]) -> None:
    """An ERROR record's key is the record's, its resource's and scope's, and how many like it came
    before it in the request: two services' same failure at the same nanosecond, or one request's two,
    are two rows (they were one, the second counted a duplicate); the exporter's retry adds none."""
    record = {"timeUnixNano": "1796000000000000000", "severityNumber": 17, "severityText": "ERROR",
              "body": {"stringValue": "tool call failed: timeout"}}
    def resource(service: str, records: int) -> dict[str, Any]:
        return {"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
                "scopeLogs": [{"scope": {"name": "app"}, "logRecords": [record] * records}]}
    node = run()
    services = {"resourceLogs": [resource("billing-agent", 1), resource("search-agent", 1)]}
    twice = {"resourceLogs": [resource("ops-agent", 2)]}
    for _ in range(2):                                            # sent, then retried as it was
        assert node.post("/v1/logs", services).status == 200 and node.post("/v1/logs", twice).status == 200
    health = node.wait_persisted(8)
    assert (health["events_persisted"], health["events_duplicate"]) == (4, 4)
    assert sorted(json.loads(r["metadata"])["service_name"] for r in node.rows("error_events")) == [
        "billing-agent", "ops-agent", "ops-agent", "search-agent"]


def test_a_series_out_of_memory_goes_on_from_its_stored_point(run: Callable[..., Otrace]) -> None:
    """Past TRACE_OTLP_MAX_SERIES the oldest series leaves memory; its next point is a change from the
    last one stored, under its own id, as after a restart."""
    node = run({"TRACE_OTLP_MAX_SERIES": "100"})
    body = sums_body(100, 10)
    points = body["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["sum"]["dataPoints"]
    points[:] = [json.loads(json.dumps(points[0]).replace('"input"', f'"kind-{n}"')) for n in range(101)]
    assert node.post("/v1/metrics", body).status == 200
    assert node.wait_persisted(101)["otlp"]["series_in_memory"] == 100
    assert node.post("/v1/metrics", sums_body(150, 20, attributes={
        "openclaw.token": "kind-0", "openclaw.provider": "anthropic"})).status == 200
    node.wait_persisted(102)
    first = [r for r in node.rows("genai_metrics") if '"kind-0"' in (r["attributes"] or "")]
    assert [(r["value"], r["window_start"]) for r in first] == [(100.0, 1000), (50.0, 10000)]
    assert first[0]["trace_id"].rsplit("-", 1)[0] == first[1]["trace_id"].rsplit("-", 1)[0]   # its id


@pytest.mark.parametrize("kind", ["histogram", "exponentialHistogram"])
def test_a_cumulative_histograms_change_has_no_min_or_max(run: Callable[..., Otrace], kind: str) -> None:
    """OTLP's min and max cover a point's whole window: a change since the last point has neither,
    also when the first point's time was its start time (a millisecond clock, as the JS SDK's)."""
    def histogram(at: int, count: int, total: float, low: float, high: float) -> dict[str, Any]:
        point = {"startTimeUnixNano": "1796160000000000000", "timeUnixNano": str(at), "count": str(count),
                 "sum": total, "min": low, "max": high,
                 "attributes": [{"key": "gen_ai.request.model", "value": {"stringValue": "m"}}]}
        point |= {"bucketCounts": [str(count)], "explicitBounds": []} if kind == "histogram" else {
            "scale": 0, "zeroCount": "0", "positive": {"offset": 0, "bucketCounts": [str(count)]}}
        metric = {"name": "gen_ai.client.operation.duration", "unit": "s",
                  kind: {"aggregationTemporality": 2, "dataPoints": [point]}}
        return {"resourceMetrics": [{"resource": {}, "scopeMetrics": [{"scope": {"name": "s"},
                                                                        "metrics": [metric]}]}]}

    node = run()
    assert node.post("/v1/metrics", histogram(1796160000000000000, 1, 1.5, 1.5, 1.5)).status == 200
    assert node.post("/v1/metrics", histogram(1796160010000000000, 2, 2.0, 0.5, 1.5)).status == 200
    node.wait_persisted(2)
    rows = [(r["count"], r["value"], r["min"], r["max"]) for r in node.rows("genai_metrics")]
    assert rows == [(1, 1.5, 1.5, 1.5), (1, 0.5, None, None)]


def log_body(trace_hex: str, span_hex: str, event: str, body: dict[str, Any] | None = None,
             severity: int = 0) -> dict[str, Any]:
    record: dict[str, Any] = {"timeUnixNano": "0", "observedTimeUnixNano": "1796000000500000000",
                              "eventName": event, "severityNumber": severity, "traceId": trace_hex,
                              "spanId": span_hex}
    if body is not None:
        record["body"] = {"kvlistValue": {"values": [{"key": k, "value": {"stringValue": v}}
                                                     for k, v in body.items()]}}
    return {"resourceLogs": [{"resource": {},
                              "scopeLogs": [{"scope": {"name": "t"}, "logRecords": [record]}]}]}


def test_another_otraces_report_of_rows_it_gave_up_is_kept_as_a_warning(run: Callable[..., Otrace]) -> None:
    """An otrace pushing OTLP tells its receiver what it gave up in otrace.loss records (WARN): pushed
    into another otrace, each is an error event there, a warning with the report's words and details,
    not a log record counted and dropped; a retry of the request stores nothing twice."""
    node = run()
    form = otrace.OtlpFormat(otrace.Config(push_endpoint=f"http://127.0.0.1:{node.port}",
                                           push_format="otlp"), "edge-1")
    losses = [{"kind": "retention", "ledger_id": 3, "at": 1796000000000, "table": "llm_traces",
               "reason": "pressure_unpushed", "rows": 50, "oldest_received_at": 1795990000000,
               "newest_received_at": 1795999000000},
              {"kind": "refused", "reject_id": 9, "at": 1796000001000, "table": "error_events",
               "reason": "refused_by_receiver", "rows": 1, "trace_id": "e-1", "http_status": 400,
               "receiver_said": "too big"}]
    body = b"".join(form.body(form.report(losses)))
    for _ in range(2):
        assert node.post("/v1/logs", body, headers=PROTOBUF).status == 200
    assert node.post("/v1/traces", trace(model="a-mark")).status == 202         # every record before it
    node.wait_persisted(3)
    rows = sorted(node.rows("error_events"), key=lambda r: r["created_at"])
    assert [(r["error_type"], r["severity"], r["message"]) for r in rows] == [
        ("system_error", "warning", "otrace gave up 50 llm_traces row(s): pressure_unpushed"),
        ("system_error", "warning", "otrace gave up 1 error_events row(s): refused_by_receiver")]
    first = json.loads(rows[0]["metadata"])
    assert (first["event_name"], first["otrace.loss.rows"], first["otrace.loss.reason"]) == (
        "otrace.loss", 50, "pressure_unpushed")
    assert node.health()["otlp"]["log_other"] == 0


def test_a_log_records_severity_text_alone_says_an_error(run: Callable[..., Otrace]) -> None:
    """The logs data model lets a record give its severity as text alone (number 0, unspecified):
    "Error" and "FATAL" are error events, the second critical; "WARN" is not."""
    node = run()
    for text in ("Error", "FATAL", "WARN"):
        body = log_body("", "", "", {"message": f"said at {text}"})
        body["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]["severityText"] = text
        assert node.post("/v1/logs", body).status == 200
    assert node.post("/v1/traces", trace(model="a-mark")).status == 202         # every record before it
    node.wait_persisted(3)
    rows = sorted((r["severity"], r["metadata"] and json.loads(r["metadata"])["severity_text"])
                  for r in node.rows("error_events"))
    assert rows == [("critical", "FATAL"), ("error", "Error")]


def test_event_content_reaches_its_span_row_whichever_comes_first_until_it_is_pushed(
        run: Callable[..., Otrace]) -> None:
    """A GenAI event record that comes before its span waits for it (in memory, within
    TRACE_OTLP_CONTENT_WAIT and TRACE_OTLP_CONTENT_BYTES; what still waits at a stop is said); one that
    comes after fills the row in, if the row has not been pushed yet; content of a pushed row stays
    out of it (counted as late)."""
    node = run()
    chat = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.provider.name": "openai"}
    ids = [(f"{n:032x}", f"{n:016x}") for n in (1, 2, 3)]
    for _ in range(2):                                    # the exporter retries: the same content once
        node.post("/v1/logs", log_body(*ids[0], "gen_ai.user.message", {"content": "before"}))
    node.post("/v1/traces", spans_body(*(chat_span(t, s, **chat) for t, s in ids)))
    node.post("/v1/logs", log_body(*ids[1], "gen_ai.user.message", {"content": "after"}))
    node.wait_persisted(3)
    with contextlib.closing(sqlite3.connect(node.db_path, timeout=10)) as conn, conn:   # pushed, as if
        conn.execute("UPDATE llm_traces SET synced = 1 WHERE trace_id = ?", (f"{ids[2][0]}-{ids[2][1]}",))
    node.post("/v1/logs", log_body(*ids[2], "gen_ai.user.message", {"content": "too late"}))
    node.post("/v1/logs", log_body(*ids[0], "gen_ai.choice", {"finish_reason": "stop"}))  # no message: none
    node.post("/v1/logs", log_body(f"{4:032x}", f"{4:016x}", "gen_ai.user.message", {"content": "alone"}))
    health = node.health()["otlp"]
    assert node.stop() == 0
    assert [e["spans"] for e in node.logs("OTLP content waiting for its span dropped at the stop")] == [1]
    inputs = {r["trace_id"]: r["input_text"] and json.loads(r["input_text"]) for r in node.rows("llm_traces")}
    assert inputs == {f"{ids[0][0]}-{ids[0][1]}": [{"role": "user", "content": "before"}],
                      f"{ids[1][0]}-{ids[1][1]}": [{"role": "user", "content": "after"}],
                      f"{ids[2][0]}-{ids[2][1]}": None}
    assert (health["log_content"], health["log_content_after_span"], health["log_other"]) == (5, 2, 1)


def test_content_merged_into_a_row_while_its_push_is_in_flight_goes_again(run: Callable[..., Otrace],
                                                                          receiver: Receiver) -> None:
    """The span's row is on its way to the receiver when the call's prompt arrives and fills it in: the
    receiver's 2xx marks the copy it got, not the row, so the row goes again, with the prompt."""
    on_wire, merged = threading.Event(), threading.Event()
    receiver.script = [held(on_wire, merged)]
    node = run(push_env(receiver, TRACE_PUSH_INTERVAL="500ms"))
    chat = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.provider.name": "openai"}
    trace_hex, span_hex = f"{7:032x}", f"{7:016x}"
    assert node.post("/v1/traces", spans_body(chat_span(trace_hex, span_hex, **chat))).status == 200
    assert on_wire.wait(30)
    assert node.post("/v1/logs", log_body(trace_hex, span_hex, "gen_ai.user.message",
                                          {"content": "the prompt"})).status == 200
    wait_until(lambda: node.query("SELECT input_text IS NOT NULL FROM llm_traces") == [(1,)],
               what="the prompt merged into the row")
    merged.set()

    def sent() -> list[str | None]:
        return [e["data"]["input_text"] for r in receiver.requests if r["answered"] == 200
                for e in r["json"]["events"]]

    wait_until(lambda: len(sent()) == 2, what="the row pushed again")
    assert sent()[0] is None and json.loads(sent()[1]) == [{"role": "user", "content": "the prompt"}]
    wait_until(lambda: node.query("SELECT synced FROM llm_traces") == [(1,)], what="the row marked pushed")
    wait_until(lambda: node.health()["push"]["events_pushed"] == 1,   # counted once written
               what="marked once, though sent twice")
    merges = otrace.Merges()                   # what it keeps: merges during a push's cycle, only
    merges.merged([("llm_traces", "a")])
    read_at = merges.read_begins()
    merges.merged([("llm_traces", "b")])
    assert merges.after(read_at, [("llm_traces", "a"), ("llm_traces", "b")]) == {("llm_traces", "b")}
    merges.cycle_ended()
    merges.merged([("llm_traces", "c")])
    assert merges.after(0, [("llm_traces", "b"), ("llm_traces", "c")]) == set()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_otlp_port_serves_the_same_routes_and_a_taken_one_is_left_out(run: Callable[..., Otrace]) -> None:
    port = free_port()
    node = run({"TRACE_OTLP_PORT": str(port)})
    assert node.logs("listening")[0]["otlp_address"] == f"http://127.0.0.1:{port}"
    node.port, main = port, node.port
    span = chat_span("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", **{"gen_ai.request.model": "m"})
    assert node.post("/v1/traces", spans_body(span)).status == 200
    assert node.post("/v1/traces", trace()).status == 202 and node.health()["otlp"]["listening"] is True
    node.port = main
    second = run({"TRACE_OTLP_PORT": str(port)}, db=node.db_path.with_name("second.db"))   # port taken
    left_out = second.logs("cannot listen on this port; it is left out")[0]
    assert left_out["port"] == port and "in use" in left_out["error"], left_out
    assert second.logs("listening")[0]["otlp_address"] is None
    health = second.health()
    assert (health["otlp"]["listening"], health["status"]) == (False, "ok")
    assert "in use" in health["otlp"]["listen_error"]
    assert otrace.Config.from_env({"TRACE_OTLP_PORT": "0"}).otlp_port == 0
    assert otrace.Config().otlp_port == 4318
    same = free_port()
    one = run({"TRACE_PORT": str(same), "TRACE_OTLP_PORT": str(same)}, db=node.db_path.with_name("one.db"))
    assert one.logs("TRACE_OTLP_PORT is TRACE_PORT: that one port serves OTLP with every other route")
    assert one.post("/v1/traces", spans_body(span)).status == 200 and one.health()["status"] == "ok"


def test_the_otlp_decoder_is_loaded_on_the_first_otlp_request_only(svc: Otrace) -> None:
    """An otrace that never gets OTLP never maps protobuf's extension; the first request loads it."""
    assert svc.post("/v1/traces", trace()).status == 202
    svc.wait_persisted(1)
    maps = Path(f"/proc/{svc.proc.pid}/maps")
    assert "_upb" not in maps.read_text() and svc.health()["otlp"]["decoder_loaded"] is False
    assert svc.post("/v1/logs", b"", headers=PROTOBUF).status == 200
    assert "_upb" in maps.read_text() and svc.health()["otlp"]["decoder_loaded"] is True
    exposed = svc.request("GET", "/metrics").body.decode()
    assert 'otrace_otlp_items_total{item="requests"} 1\n' in exposed
    assert 'otrace_otlp_items_total{item="spans"} 0\n' in exposed


def test_an_up_down_counter_is_pushed_as_one_and_a_counter_as_a_counter(tmp_path: Path,
                                                                         run: Callable[..., Otrace]) -> None:
    """A sum keeps whether it only counts up: pushed over OTLP into another otrace, an up-down counter
    (+3, then -2) stays one in every point, and a counter a counter (the sign of a point told them
    apart, so one series flipped between the two)."""
    receiving = run(db=tmp_path / "receiving.db")
    pushing = run({**PUSH, "TRACE_PUSH_FORMAT": "otlp", "TRACE_PUSH_INTERVAL": "1h",
                   "TRACE_PUSH_ENDPOINT": f"http://127.0.0.1:{receiving.port}"})
    up_down = sums_body(3, 10, temporality=1, name="gen_ai.agent.active_requests")
    up_down["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["sum"]["isMonotonic"] = False
    for body in (up_down, json.loads(json.dumps(up_down).replace('"asDouble": 3', '"asDouble": -2')
                                     .replace('"10000000000"', '"20000000000"')), sums_body(5, 10)):
        assert pushing.post("/v1/metrics", body).status == 200
    pushing.wait_persisted(3)
    assert pushing.stop() == 0                                 # the last push sends them all
    assert sorted((r["name"], r["value"], r["monotonic"]) for r in pushing.rows("genai_metrics")) == [
        ("gen_ai.agent.active_requests", -2.0, 0), ("gen_ai.agent.active_requests", 3.0, 0),
        ("openclaw.tokens", 5.0, 1)]
    got = wait_until(lambda: len(rows := receiving.rows("genai_metrics")) == 3 and rows, what="3 points")
    assert sorted((r["name"], r["value"], r["monotonic"]) for r in got) == [
        ("gen_ai.agent.active_requests", -2.0, 0), ("gen_ai.agent.active_requests", 3.0, 0),
        ("openclaw.tokens", 5.0, 1)]


def test_usage_metric_points_are_pushed_like_the_other_tables(run: Callable[..., Otrace],
                                                             receiver: Receiver) -> None:
    node = run(push_env(receiver))
    node.post("/v1/metrics", sums_body(0.25, 10, name="openclaw.cost.usd",
                                       attributes={"openclaw.model": "claude-sonnet-4-5"}))
    event = receiver.wait(lambda requests: [e for r in requests if r["answered"] == 200
                                            for e in r["json"]["events"] if e["type"] == "genai_metric"])[0]
    data = event["data"]
    assert (data["name"], data["value"], data["model"], data["attributes"], data["source"]) == (
        "openclaw.cost.usd", 0.25, "claude-sonnet-4-5", {"openclaw.model": "claude-sonnet-4-5"}, "otlp")
    wait_until(lambda: node.query("SELECT synced FROM genai_metrics") == [(1,)], what="the point synced")


def any_value(value: Any) -> dict[str, Any]:
    """A Python value as an OTLP JSON AnyValue."""
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, list):
        return {"arrayValue": {"values": [any_value(item) for item in value]}}
    if isinstance(value, dict):
        return {"kvlistValue": {"values": [{"key": k, "value": any_value(v)} for k, v in value.items()]}}
    return {"stringValue": str(value)}


OTLP_KEYS = st.sampled_from([
    "gen_ai.operation.name", "gen_ai.request.model", "gen_ai.response.model", "gen_ai.provider.name",
    "gen_ai.system", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.usage.cost",
    "gen_ai.response.finish_reasons", "gen_ai.response.time_to_first_chunk", "gen_ai.conversation.id",
    "gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions",
    "gen_ai.prompt.0.content", "gen_ai.completion.1.role", "openclaw.tokens.input", "openclaw.model",
    "error.type", "event.name", "exception.type", "exception.message", "http.response.status_code",
    "gen_ai.token.type", "otrace.text_messages"]) | st.text(max_size=8)
OTLP_VALUES = st.recursive(
    SCALARS | st.sampled_from(["chat", "embeddings", "invoke_agent", "[]", "[{}]", "429"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
OTLP_ATTRIBUTES = st.dictionaries(OTLP_KEYS, OTLP_VALUES, max_size=6).map(
    lambda attrs: [{"key": k, "value": any_value(v)} for k, v in attrs.items()])
VALID_ID = st.uuids().map(lambda u: u.hex)
HEX_IDS = st.one_of(VALID_ID, VALID_ID, VALID_ID,
                    st.sampled_from(["", "00" * 16, "zz", "ab" * 8, "AB" * 16, "q0fw"]))
NANO = st.integers(0, 2**63)
NANOS = st.one_of(NANO, NANO, NANO, st.sampled_from([0, 1796000000000000000, 2**64 - 1, -1, "12", "x"]))


@st.composite
def otlp_request(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """An OTLP JSON export request, wild in its values but mostly OTLP in its shape."""
    path = draw(st.sampled_from(["/v1/traces", "/v1/metrics", "/v1/logs"]))
    scope = {"scope": {"name": draw(st.text(max_size=6))}}
    if path == "/v1/traces":
        spans = draw(st.lists(st.fixed_dictionaries({
            "traceId": HEX_IDS, "spanId": HEX_IDS.map(lambda h: h[:16]), "name": st.sampled_from(
                ["chat", "openclaw.model.usage", "openclaw.model.usage", "x"]),
            "attributes": st.one_of(OTLP_ATTRIBUTES, OTLP_ATTRIBUTES.map(lambda attrs: [   # an LLM call's
                {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}}, *attrs])),  # or not
            "startTimeUnixNano": NANOS,
            "endTimeUnixNano": NANOS,
            "status": st.fixed_dictionaries({"code": st.sampled_from([0, 1, 2, 7])}),
            "events": st.lists(st.fixed_dictionaries({"name": st.sampled_from(
                ["exception", "gen_ai.content.prompt"]), "attributes": OTLP_ATTRIBUTES}), max_size=2)}),
            max_size=4))
        if draw(st.booleans()):                                  # and a plain one, to reach the writer
            model = draw(st.text(min_size=1, max_size=9))
            spans.append(chat_span(draw(VALID_ID), draw(VALID_ID)[:16], **{
                "gen_ai.operation.name": "chat", "gen_ai.request.model": model}))
        return path, {"resourceSpans": [{"resource": {"attributes": draw(OTLP_ATTRIBUTES)},
                                         "scopeSpans": [{**scope, "spans": spans}]}]}
    if path == "/v1/logs":
        records = draw(st.lists(st.fixed_dictionaries({
            "traceId": HEX_IDS, "spanId": HEX_IDS.map(lambda h: h[:16]), "attributes": OTLP_ATTRIBUTES,
            "eventName": st.sampled_from(["gen_ai.user.message", "gen_ai.choice", "x",
                                          "gen_ai.client.inference.operation.details"]),
            "severityNumber": st.sampled_from([0, 9, 17, 21, 24, 99]), "body": OTLP_VALUES.map(any_value),
            "timeUnixNano": NANOS}), max_size=4))
        return path, {"resourceLogs": [{"resource": {}, "scopeLogs": [{**scope, "logRecords": records}]}]}
    point = st.fixed_dictionaries({
        "attributes": OTLP_ATTRIBUTES, "startTimeUnixNano": st.one_of(st.just(10**18), st.just(0), NANOS),
        "timeUnixNano": st.one_of(st.integers(10**18 + 1, 2 * 10**18), NANOS),
        "asDouble": st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(["NaN", "Infinity"]),
        "count": st.one_of(st.integers(1, 99), st.integers(0, 2**64 - 1)).map(str)}, optional={
        "asInt": st.integers(-(2**63), 2**63 - 1).map(str),
        "sum": st.floats(allow_nan=False), "bucketCounts": st.lists(st.integers(0, 9).map(str), max_size=3),
        "explicitBounds": st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=2),
        "flags": st.sampled_from([0, 1])})
    kind = draw(st.sampled_from(["sum", "gauge", "histogram", "summary"]))
    data: dict[str, Any] = {"dataPoints": draw(st.lists(point, max_size=3))}
    if kind in ("sum", "histogram"):
        data["aggregationTemporality"] = draw(st.sampled_from([0, 1, 2]))
    metric = {"name": draw(st.sampled_from(["gen_ai.client.token.usage", "openclaw.tokens", "other"])),
              kind: data}
    return path, {"resourceMetrics": [{"resource": {}, "scopeMetrics": [{**scope, "metrics": [metric]}]}]}


def test_fuzzed_otlp_requests_get_an_otlp_answer_and_never_take_otrace_down(run: Callable[..., Otrace]
                                                                             ) -> None:
    """Wild values in OTLP's shape, in JSON and (where they encode) in protobuf: each gets a 200 (with
    partial_success for refused items) or a 400 naming the problem; never a 5xx, a dropped connection
    or a traceback; every row accepted is written."""
    node = run({"TRACE_MAX_TEXT_BYTES": "1KiB"})
    statuses: list[int] = []

    # the same examples every run: whether every mapping is reached must not be left to chance
    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(otlp_request(), st.booleans())
    def example(request: tuple[str, dict[str, Any]], protobuf: bool) -> None:
        path, doc = request
        body, headers = json.dumps(doc).encode(), {"Content-Type": "application/json"}
        if protobuf:
            with contextlib.suppress(Exception):               # not all of it is valid OTLP to encode
                body, headers = otlp_message(path, doc).SerializeToString(), PROTOBUF
        resp = exchange(node.port, "POST", path, body, headers)
        statuses.append(resp.status)
        assert resp.status in (200, 400), resp
        if resp.status == 400 and headers is PROTOBUF:
            assert rpc_status(resp.body)[0] == 3
        elif resp.status == 400:
            assert resp.json["code"] == 3 and resp.json["message"], resp

    example()
    assert statuses.count(200) >= 30 and 400 in statuses
    health = node.health()
    otlp = health["otlp"]
    made = (otlp["llm_spans"], otlp["log_errors"], otlp["metric_points_kept"])
    assert all(made), made                                        # the mapping was reached
    node.wait_persisted(health["events_received"], timeout=30)
    assert not node.logs("request failed"), node.logs("request failed")[0]
    assert node.health()["status"] == "ok"


def test_a_statement_its_own_data_breaks_is_dropped_and_the_writer_goes_on(tmp_path: Path) -> None:
    """A statement that commits with rows (a reader's position, a series' last point) and that SQLite
    cannot run for its own data is logged and dropped like a row, never retried forever."""
    service = service_at(tmp_path / "x.db")
    try:
        service.writer.start()
        bad = ("INSERT INTO otrace_state (key, value, updated_at) VALUES (?, ?, ?)", ("big", 2**70, 1))
        good = ("INSERT INTO otrace_state (key, value, updated_at) VALUES (?, ?, ?)", ("small", 7, 1))
        assert service.events.offer(otrace.Unit([], (bad, good)))
        assert service.events.offer(one_call("after"))
        assert service.events.wait_drained(30)
        assert service.counters.snapshot()["dropped"] == 1
        assert service.writer.fault.error is None and not service.writer.failing
        assert service.db.query("SELECT key, value FROM otrace_state") == [("small", 7)]
        assert service.db.query("SELECT trace_id FROM llm_traces") == [("after",)]
    finally:
        stopped(service)


@needs_otlp_fixtures
def test_openclaw_usage_spans_are_not_stored_again_while_its_session_store_is_followed(tmp_path: Path
                                                                                       ) -> None:
    """One real call, one row: with OpenClaw's session store followed (Service.store set), OpenClaw's
    openclaw.model.usage spans are counted, not stored; its usage metrics are kept all the same."""
    config = otrace.Config(db_path=str(tmp_path / "x.db"), port=0, otlp_port=0, metrics_interval=0.0,
                           openclaw_state_dir="off")
    service = otrace.Service(config)
    try:
        service.store = otrace.Loop("store", 1.0)                 # as if the session store were followed
        entries = [e for e in captured_otlp() if e["run"] == "openclaw"]
        traces = [service.otlp.traces(decoded(e), 0) for e in entries if e["path"] == "/v1/traces"]
        assert [row for export in traces for row in export.rows] == []
        assert (sum(e.counts["openclaw_usage_skipped"] for e in traces),
                sum(e.counts["spans_not_llm"] for e in traces)) == (3, 4)
        metrics = service.otlp.metrics(decoded(next(e for e in entries if e["path"] == "/v1/metrics"
                                                    and b"openclaw.tokens" in e["body"])), 0)
        assert {row.table for row in metrics.rows} == {"genai_metrics"}
    finally:
        service.server.release()
        service.db.close()


# ------------------------------------------------------- custom events, processes, network, /debug
# The v2 seed: POST /v1/events; the process table, zombies and the gateway; /proc/net and DNS probes;
# the /debug endpoints. Captured trees (fixtures/hosts/procs-*, net) for the readers; real processes,
# zombies, a real node gateway, a stub resolver and a profile under load for the service.


PROCS = HOSTS / "procs-many"
PROCS_META = json.loads((PROCS / "meta.json").read_text())


def error_rows(node: Otrace, category: str) -> list[dict[str, Any]]:
    return [r for r in node.rows("error_events") if r["category"] == category]


def test_v2_settings_parse_and_bad_ones_are_refused_naming_them(tmp_path: Path) -> None:
    parse = otrace.Config.from_env
    assert otrace.Config().gateway_match == ("node", ("openclaw", "gateway"))
    assert parse({"TRACE_GATEWAY_MATCH": ":openclaw"}).gateway_match == ("", ("openclaw",))
    assert parse({"TRACE_GATEWAY_MATCH": "OFF"}).gateway_match == ()
    assert otrace.Config().dns_probe == ("api.anthropic.com", "api.openai.com")
    assert parse({"TRACE_DNS_PROBE": " API.Example.com., b.test,b.test"}).dns_probe == ("api.example.com",
                                                                                      "b.test")
    assert parse({"TRACE_DNS_PROBE": ""}).dns_probe == ()
    assert parse({"TRACE_PROC_INTERVAL": "off"}).proc_interval == 0.0
    assert parse({"TRACE_DEBUG": "on", "TRACE_DEBUG_TRACEMALLOC": "on"}).debug_tracemalloc is True
    for name, value, accepts in (
            ("TRACE_GATEWAY_MATCH", "node", "a program name, a colon"),
            ("TRACE_GATEWAY_MATCH", "node:", "a program name, a colon"),
            ("TRACE_GATEWAY_MATCH", "/usr/bin/node:openclaw", "a program name, a colon"),
            ("TRACE_DNS_PROBE", "bad_name.example", "host names"),
            ("TRACE_DNS_PROBE", ",".join(f"h{i}.test" for i in range(17)), "up to 16 host names"),
            ("TRACE_PROC_INTERVAL", "10ms", "a duration from 1s to 1d"),
            ("TRACE_PROC_TOP", "0", "an integer from 1 to 100"),
            ("TRACE_DNS_TIMEOUT", "5m", "a duration from 100ms to 1m"),
            ("TRACE_ZOMBIE_ALERT", "-1", "an integer from 0 to 1000000")):
        out = subprocess.run(START, env={**os.environ, name: value,
                             "TRACE_DB_PATH": str(tmp_path / "x.db")}, capture_output=True, text=True,
                             timeout=10, check=False)
        assert out.returncode == 2 and name in out.stderr and accepts in out.stderr, (name, value, out.stderr)
    alone = subprocess.run(START, env={**os.environ, "TRACE_DEBUG_TRACEMALLOC": "on",
                           "TRACE_DB_PATH": str(tmp_path / "x.db")}, capture_output=True, text=True,
                           timeout=10, check=False)
    assert alone.returncode == 2 and "TRACE_DEBUG_TRACEMALLOC=on needs TRACE_DEBUG=on" in alone.stderr
    assert not (tmp_path / "x.db").exists()


# -- custom events


def test_custom_event_is_stored_with_every_field(svc: Otrace) -> None:
    event = {"name": "deploy finished", "attributes": {"version": "1.4.2", "ok": True, "n": [1, 2]},
             "severity": "warning", "session_id": "sess-9", "trace_id": "evt-1",
             "created_at": "2026-03-01T12:00:00.250Z", "colour": "blue"}
    resp = svc.post("/v1/events", [event, {"name": "ping"}])
    assert resp.status == 202, resp
    assert resp.json["accepted"] == 2 and resp.json["trace_ids"][0] == "evt-1"
    assert resp.json["ignored_fields"] == ["colour"]
    svc.wait_persisted(2)
    first, second = svc.rows("custom_events")
    assert (first["name"], first["severity"], first["session_id"], first["trace_id"]) == \
        ("deploy finished", "warning", "sess-9", "evt-1")
    assert json.loads(first["attributes"]) == event["attributes"]
    assert first["created_at"] == 1772366400250 and first["source"] == "http" and first["truncated"] == 0
    assert (second["severity"], second["attributes"], second["session_id"]) == ("info", None, None)
    assert uuid.UUID(second["trace_id"]).version == 7
    health = svc.health()
    assert health["system"]["custom_events_received"] == 2 and health["unsynced_count"] == 2
    samples = dict(line.rsplit(" ", 1) for line in svc.request("GET", "/metrics").body.decode().splitlines()
                   if not line.startswith("#"))
    assert samples["otrace_custom_events_received_total"] == "2"


@pytest.mark.parametrize(("event", "field"), [
    ({"attributes": {}}, "name"),
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": 7}, "name"),
    ({"name": "n" * 257}, "name"),
    ({"name": "two\nlines"}, "name"),
    ({"name": "bell\x07"}, "name"),
    ({"name": "n", "attributes": [1, 2]}, "attributes"),
    ({"name": "n", "attributes": "not json"}, "attributes"),
    ({"name": "n", "attributes": {"x": 1e400}}, "attributes"),
    ({"name": "n", "severity": "loud"}, "severity"),
    ({"name": "n", "trace_id": ""}, "trace_id"),
    ({"name": "n", "created_at": "yesterday"}, "created_at"),
    ({"name": "n", "session_id": 5}, "session_id"),
])
def test_bad_custom_event_field_is_named(svc: Otrace, event: dict[str, Any], field: str) -> None:
    body = json.dumps([{"name": "fine"}, event]).replace("Infinity", "1e400")
    resp = svc.post("/v1/events", body)
    assert resp.status == 400, resp
    assert (resp.json["field"], resp.json["index"]) == (field, 1)
    assert svc.post("/v1/events", {"name": "n" * 256}).status == 202      # 256 characters: fine
    svc.wait_persisted(1)
    assert [r["name"] for r in svc.rows("custom_events")] == ["n" * 256]  # nothing of the bad array


def test_custom_events_share_the_limits_and_idempotency_of_traces(run: Callable[..., Otrace]) -> None:
    node = run({"TRACE_MAX_TEXT_BYTES": "100", "TRACE_MAX_EVENTS": "3", "TRACE_MAX_BODY_BYTES": "1KiB"})
    again = {"name": "retry-me", "trace_id": "same-id"}
    assert node.post("/v1/events", again).status == 202
    assert node.post("/v1/events", again).status == 202
    big = node.post("/v1/events", {"name": "big", "attributes": {"text": "x" * 200}})
    assert big.status == 202
    assert node.post("/v1/events", [{"name": "n"}] * 4).status == 413
    assert node.post("/v1/events", {"name": "n", "attributes": {"t": "y" * 2000}}).status == 413
    gzipped = gzip.compress(json.dumps({"name": "zipped"}).encode())
    assert node.post("/v1/events", gzipped, headers={"Content-Encoding": "gzip"}).status == 202
    members = gzip.compress(b'[{"name": "two"}') + gzip.compress(b', {"name": "members"}]')  # RFC 1952
    assert node.post("/v1/events", members, headers={"Content-Encoding": "gzip"}).status == 202
    junk = node.post("/v1/events", gzipped + b"junk", headers={"Content-Encoding": "gzip"})
    assert junk.status == 400 and "not valid gzip" in junk.json["error"]
    health = node.wait_persisted(6)
    assert health["events_persisted"] == 5 and health["events_duplicate"] == 1
    rows = {r["name"]: r for r in node.rows("custom_events")}
    assert set(rows) == {"retry-me", "big", "zipped", "two", "members"}
    assert json.loads(rows["big"]["attributes"]) == {"_otrace_truncated": True, "original_bytes": 211}
    assert rows["big"]["truncated"] == 1


def test_a_gzip_body_of_many_members_is_inflated_in_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each member is given a piece of what follows it, not all of it: a body of thousands of tiny
    members (valid gzip) costs the single HTTP thread what its size does, not its size times their
    number. Members large and small, cut anywhere, and a body that ends inside one."""
    fed: list[int] = []
    inflater = zlib.decompressobj

    class Counted:
        def __init__(self, **settings: Any) -> None:
            self.inner = inflater(**settings)

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            fed.append(len(data))
            return self.inner.decompress(data, max_length)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    monkeypatch.setattr(zlib, "decompressobj", Counted)
    large = os.urandom(20_000).hex().encode()
    body = gzip.compress(b"", mtime=0) * 5000 + gzip.compress(b'{"a": "', mtime=0) + gzip.compress(
        large, mtime=0) + gzip.compress(b'"}', mtime=0)

    def request(raw: bytes) -> otrace.Request:
        return otrace.Request("POST", "/v1/events", "/v1/events", "HTTP/1.1", {"content-encoding": "gzip"},
                              False, len(raw), False, bytearray(raw))

    assert otrace.take_body(request(body), 1 << 20) == b'{"a": "' + large + b'"}'
    assert sum(fed) <= 4 * len(body)                    # 64 bytes for each 20-byte member
    with pytest.raises(otrace.Refusal, match="ends early"):
        otrace.take_body(request(body[:-5]), 1 << 20)
    with pytest.raises(otrace.Refusal, match="over 1000 bytes"):
        otrace.take_body(request(body), 1000)


def test_custom_events_are_pushed_and_retained_like_the_others(run: Callable[..., Otrace],
                                                                receiver: Receiver) -> None:
    node = run(push_env(receiver, TRACE_CLEANUP_INTERVAL="200ms", TRACE_RETENTION="1s"))
    ids = node.post("/v1/events", [{"name": "tool_call", "attributes": {"tool": "browser", "ms": 812}},
                                   {"name": "deploy"}]).json["trace_ids"]
    events = receiver.wait(lambda reqs: [e for r in reqs if r["answered"] == 200 for e in r["json"]["events"]
                                         if e["trace_id"] in ids])
    first = next(e for e in events if e["trace_id"] == ids[0])
    assert first["type"] == "custom_event" and first["event_id"] == f"custom_event:{ids[0]}"
    assert first["data"]["attributes"] == {"tool": "browser", "ms": 812}          # an object, not a string
    assert first["data"]["name"] == "tool_call" and "synced" not in first["data"]
    wait_until(lambda: len(node.rows("custom_events")) == 1, what="pushed events past retention deleted")
    assert [r["trace_id"] for r in node.rows("custom_events")] == [ids[1]]    # the newest stays
    assert ledger(node)[("custom_events", "age")] == (1, 0)


# -- the process table


def sample_procs(top: int = 10) -> list[dict[str, Any]]:
    """The process_samples rows ProcessTable makes from procs-many t0 and t1."""
    table = otrace.ProcessTable(PROCS / "t0" / "proc", top)
    scan = [(otrace.read_processes(root), otrace.read_uptime(root)) for root in (PROCS / "t0" / "proc",
                                                                                PROCS / "t1" / "proc")]
    assert table.sample(*scan[0]) == []                        # the first scan only primes
    table.procfs = PROCS / "t1" / "proc"
    return [dict(zip(otrace.PROCESSES.columns, row.values, strict=True)) for row in table.sample(*scan[1])]


def test_the_process_table_of_500_captured_processes() -> None:
    procs = otrace.read_processes(PROCS / "t1" / "proc")
    assert len(procs) == PROCS_META["process_count"]["t1"] == 500
    assert collections.Counter(p.state for p in procs.values()) == PROCS_META["state_counts"]["t1"]
    assert (procs[180].name, procs[180].state, procs[180].ppid) == ("evil) R 1 (x", "S", 56)
    assert procs[178].name == "pool worker" and procs[181].name == "(sd-pam)"
    assert procs[8].threads == 8 and procs[12].rss == PROCS_META["gateway"]["observed"]["t1"]["rss_bytes"]
    assert procs[34].state == "Z" and procs[34].rss == 0
    assert otrace.read_cmdline(PROCS / "t1" / "proc", 34) == ()                 # a zombie has none
    rows = sample_procs()
    by_cpu = sorted((r for r in rows if r["cpu_rank"]), key=lambda r: r["cpu_rank"])
    for burner, row in zip(PROCS_META["burners"], by_cpu, strict=False):        # the top 3, in order
        low, high = burner["assert_range"]
        assert row["pid"] == burner["pid"] and row["name"] == burner["comm"] and low <= row["cpu_pct"] <= high
    by_rss = sorted((r for r in rows if r["rss_rank"]), key=lambda r: r["rss_rank"])
    assert [(r["pid"], r["rss_bytes"]) for r in by_rss] == [(p["pid"], p["rss_bytes"])
                                                            for p in PROCS_META["top_rss_t1"]]
    assert len(rows) == len({r["pid"] for r in rows})          # in both lists: one row, two ranks
    gateway = next(r for r in rows if r["pid"] == 12)
    assert gateway["cmdline"] == "node /app/openclaw.mjs gateway run --port 18789"
    assert (gateway["threads"], gateway["fds"], gateway["user"], gateway["uid"]) == (7, 19, "root", 0)
    assert gateway["started_at"] == round(PROCS_META["gateway"]["start_epoch"] * 1000)
    assert {r["interval_s"] for r in rows} == {3.0}            # the tree's own clock: proc/uptime
    assert {r["source"] for r in rows} == {"otrace"}


def test_a_process_row_says_who_runs_it_and_what_it_holds() -> None:
    table = otrace.ProcessTable(PROCS / "t1" / "proc", 10)
    procs = otrace.read_processes(table.procfs)
    holder = table.describe(procs[9], 0.0, 3.0, None, 1)
    assert (holder["fds"], holder["name"]) == (PROCS_META["fd_holder"]["fds"], "fd-holder")
    assert table.describe(procs[160], 0.0, 3.0, None, 1)["uid"] == 65534
    stranger = table.describe(procs[185], 0.0, 3.0, None, 1)
    assert (stranger["uid"], stranger["user"]) == (1234, "1234")               # no passwd entry
    odd = table.describe(procs[45], 0.0, 3.0, None, 1)["cmdline"]
    assert odd.endswith("--name café ☕ \ufffd\ufffd-not-utf8")                 # bytes ff fe


@needs_gateway_log
def test_the_quick_secret_checks_agree_with_the_patterns() -> None:
    """holds_secret_words looks for every word in one scan, and secret_key tries _SECRET_KEY only on a
    key that ends like a secret: the answers of the plain rules, also where IGNORECASE matches what
    lower() leaves alone (long s, dotless i, dotted I, the Kelvin sign)."""
    long_s, dotless_i, dotted_i, kelvin = "\u017f", "\u0131", "\u0130", "\u212a"
    texts = [json.loads(line)["message"] for line in gateway_lines()] + [
        f"token {long_s}ecret=abc", f"ap{dotted_i}_key=k1", "Authorization: Bearer abc.def", "tokens=12",
        "see https://github.com/o/r", "key ghp_" + "a" * 36, "bot123456:" + "A" * 35, "AKIA", "", "x"]
    # each word is looked for from one of its characters: the words whole at a text's ends, cut by one,
    # and pieces of them joined (a word made across two, or one piece short of one)
    texts += [f"{pad}{cut}{end}" for word in otrace._SECRET_WORDS for cut in (word, word[1:], word[:-1])
              for pad in ("", "x ") for end in ("", " y")]
    pieces = [word[i:j] for word in otrace._SECRET_WORDS for i in range(len(word))
              for j in range(i + 1, len(word) + 1)]
    rng = random.Random(40)
    texts += ["".join(rng.choices(pieces, k=rng.randint(1, 4))) for _ in range(5000)]
    assert [otrace.holds_secret_words(text.lower()) for text in texts] == [
        any(word in text.lower() for word in otrace._SECRET_WORDS) for text in texts]
    assert sum(map(otrace.holds_secret_words, (text.lower() for text in texts))) > 10
    keys = ["token", "x-api-key", "privateKey", "secret_access_key", "passwd", "Password", "cookie",
            "credentials", "tokens", "tokenCount", "monkey", f"{long_s}ecret", f"ap{dotted_i}_key",
            f"ap{dotless_i}_key", f"{kelvin}ey", f"api_{kelvin}ey", "name", ""]
    assert [otrace.secret_key(key) for key in keys] == [bool(otrace._SECRET_KEY.fullmatch(key))
                                                         for key in keys]
    assert [key for key in keys if otrace.secret_key(key)][:8] == keys[:8]
    for key in [*keys, "private_key", "secretAccessKey", "AWS_ACCESS_KEY", "sessionToken", "apiKey", "pass",
                "passphrase", "smtp_pass", "jwt"]:
        if key.isascii() and otrace.secret_key(key):     # an argument with it is walked by the masking
            assert otrace.holds_secret_words(json.dumps({key: "v"}).lower()), key


def test_a_log_line_masks_what_the_command_line_masks() -> None:
    """The gateway log's WARN and ERROR lines and the process table mask the same secrets: a pwd=, a
    URL's ?auth=, an X-Auth header, a chat webhook's URL; OAuth settings, an author, OpenClaw's
    auth=token (how a client authenticated) and sessionKey (a session's name, agent:main:...) are what
    an operator needs, and stay."""
    hook = "https://hooks.slack.com/services/T01/B02/" + "x" * 24
    assert otrace.redact_text(f"pwd=p1 url https://h/x?auth=a2&v=1 X-Auth: a3 post {hook} failed "
                              "oauth=kept author: kept auth=token sessionKey=agent:main:main") == (
        "pwd=*** url https://h/x?auth=***&v=1 X-Auth: *** post https://hooks.slack.com/services/T01/B02/*** "
        "failed oauth=kept author: kept auth=token sessionKey=agent:main:main")     # auth=: a mode's name
    assert otrace.redact_text("X-Auth-Key: k1 https://discord.com/api/v10/webhooks/1/" + "t" * 60 +
                              " https://hooks.slack.com/triggers/T01/123/" + "t" * 40 +
                              " https://hooks.slack.com/workflows/T01/A02/345/" + "t" * 40) == (
        "X-Auth-Key: *** https://discord.com/api/v10/webhooks/1/*** "
        "https://hooks.slack.com/triggers/T01/123/*** https://hooks.slack.com/workflows/T01/A02/345/***")
    assert otrace.redact_json({"X-Auth-Key": "k2", "authKey": "k3"}) == {"X-Auth-Key": "***",
                                                                        "authKey": "***"}
    assert otrace.redact_json({"pass": "p7", "passphrase": "p8", "jwt": "j9", "bypass": "kept", "headers": [
        ["x-api-key", "k10"], ["accept", "kept"], {"name": "Authorization", "value": "a11"}, {
            "name": "accept", "value": "kept"}]}) == {
        "pass": "***", "passphrase": "***", "jwt": "***", "bypass": "kept", "headers": [
            ["x-api-key", "***"], ["accept", "kept"], {"name": "Authorization", "value": "***"}, {
                "name": "accept", "value": "kept"}]}                   # a header as a pair, as an object
    assert otrace.redact_json({"headers": {"X-Auth": "a4", "proxy_auth": "a5"}, "pwd": "p6", "oauth": {
        "scope": "read"}, "author": "me", "auth": "token", "sessionKey": "agent:main:main"}) == {
        "headers": {"X-Auth": "***", "proxy_auth": "***"}, "pwd": "***", "oauth": {"scope": "read"},
        "author": "me", "auth": "token", "sessionKey": "agent:main:main"}


def test_every_key_the_docs_name_is_masked_in_a_log_lines_text() -> None:
    """What keys named like api_key, secret_key, private_key, access keys, token, password, authorization
    or cookie hold, in prose, JSON or a header dump; a quoted value cut before its closing quote, or
    longer than any bound, to its end."""
    said = ('failed: secret_key=s1 aws_secret_access_key=s2 {"private_key": "s4"} '
            '{"cookie": "sid=s5", "authorization": "s6"} No API key: configure one')
    assert otrace.redact_text(said) == (
        'failed: secret_key=*** aws_secret_access_key=*** {"private_key": "***"} '
        '{"cookie": "***", "authorization": "***"} No API key: configure one')
    assert otrace.redact_text("upstream: Cookie: a=1; sid=s7\r\nAuthorization: s8 s9\nHost: h") == \
        "upstream: Cookie: ***\r\nAuthorization: ***\nHost: h"
    assert otrace.redact_text("sent Authorization: Bearer s10 and {authorization: 'Basic s11'}") == \
        "sent Authorization: Bearer *** and {authorization: 'Basic ***'}"       # the scheme stays
    kept = "x" * 100 + ' token="***"'                                 # masked, then cut at 112 bytes
    assert otrace.masked_text("x" * 100 + ' token="' + "s20" * 40 + '" after', 112) == kept
    for cut in ('x "token": "s12-cut-here', '"password": "' + "p" * 5000 + '" after'):
        assert "s12" not in otrace.redact_text(cut) and "p" * 100 not in otrace.redact_text(cut)
    pat, lab, npm = "github_pat_11ABCDEFG0" + "a" * 40, "glpat-" + "b" * 20, "npm_" + "c" * 36
    assert otrace.redact_text(f"keys {pat} {lab} {npm} https://b.s3.amazonaws.com/k?X-Amz-Signature=d1&x=1") \
        == "keys *** *** *** https://b.s3.amazonaws.com/k?X-Amz-Signature=***&x=1"
    assert otrace.redact_text('Cookie: sid="s13"; csrf=s14\nAuthorization: Digest username="bob", '
                              'response="s15"\nAuthorization: Bearer 12|s16') == (
        "Cookie: ***\nAuthorization: ***\nAuthorization: Bearer ***")
    for folded in ("Cook\u0131e: sid=s17", "acce\u017fs_key=s17"):   # no header's name: the patterns fold
                                                                     # case in ASCII, as the pre-check does
        assert otrace.redact_text(folded) == folded and not otrace.holds_secret_words(folded.lower())
    listed = {"rawHeaders": ["Host", "h", "Cookie", "s18", "x-api-key", "s19"],          # Node's flat list
              "paths": ["gateway.auth.token", "gateway.port"], "changed": ["apiKey", "model"]}   # not headers
    assert otrace.redact_json(listed) == {**listed, "rawHeaders": [
        "Host", "h", "Cookie", "***", "x-api-key", "***"]}
    said = 'GET /m?key=q1q1q1q1q1q1q1q1q1&pass=q2 body="{\\"api_key\\":\\"q3\\"}" bearer u:q4 /l?key=gpt-4o'
    assert otrace.redact_text(said) == (                  # JSON in a string; a key that looks like one
        'GET /m?key=***&pass=*** body="{\\"api_key\\":\\"***\\"}" bearer *** /l?key=gpt-4o')
    pem = "-----BEGIN RSA PRIVATE KEY-----q5\n-----END RSA PRIVATE KEY-----"
    said = f"{pem} passphrase=q6 credentials: 3 loaded Ocp-Apim-Subscription-Key: q8"
    assert otrace.redact_text(said) == ("-----BEGIN RSA PRIVATE KEY-----***-----END RSA PRIVATE KEY----- "
                                        "passphrase=*** credentials: 3 loaded Ocp-Apim-Subscription-Key: ***")
    encoded = "cb=https%3A%2F%2Fu%3Aq11%40h%2Fcb password%3Dq12 Authorization%3A%20Bearer%20q13"
    assert otrace.redact_text(encoded) == "cb=https://u:***@h/cb password=*** Authorization: Bearer ***"
    assert otrace.redact_text("GET /q?x=1%3A2 ok") == "GET /q?x=1%3A2 ok"     # decoded only to mask
    named = {"secrets": {"openai": "q9"}, "api_keys": ["q10"], "monkeys": 3, "tokens": 12}
    assert otrace.redact_json(named) == {"secrets": "***", "api_keys": "***", "monkeys": 3, "tokens": 12}
    assert otrace.redact_text("authorization failed; cookies: 3; tokens=12; author: me") == \
        "authorization failed; cookies: 3; tokens=12; author: me"             # no value of one: kept


def test_a_url_encoded_secret_is_masked_whole_and_a_count_named_like_secrets_is_kept() -> None:
    """An escape inside a value is of the value: masked before the text is decoded, the value goes
    whole (decoded first, it ended at its decoded &, ; or space). Encoded a level down (a redirect URI),
    the secret shows decoded, masked. A number under a plural secret name counts them."""
    for text, expected in (
            ("body grant_type=password&username=bob&password=Tr0ub%26dor%3B3xyz",
             "body grant_type=password&username=bob&password=***"),
            ("login failed: password=my%20secret%3Dphrase token=xyz%2Cqq",
             "login failed: password=*** token=***"),
            ("redirect_uri=https%3A%2F%2Fapp%2Fcb%3Ftoken%3Dabc%2520def", "redirect_uri=https://app/cb?token=***"),
            ("headers={'Authorization': 'Bearer ya29.A0%2BaM8kq%3D%3D'}",
             "headers={'Authorization': 'Bearer ***'}"),
            ("Authorization: Basic abc%0Anext-header: kept", "Authorization: Basic ***%0Anext-header: kept"),
            ("fmt basic %s here", "fmt basic %s here"),
            ("q=password%253Dhunter2", "q=password=***"),                     # encoded twice
            ("progress 100%3 files", "progress 100%3 files")):
        assert otrace.redact_text(text) == expected, text
    deep = "token " + " ".join("%" + "25" * depth + "3D" for depth in range(1000))   # decoded 3 levels down:
    assert otrace.redact_text(deep).startswith("token = *** %253D %25253D")          # no RecursionError
    assert otrace.redact_json({"num_secrets": 3, "rotated_api_keys": 2, "secrets": ["s1"], "password": 1234,
                               "api_keys": "k1"}) == \
        {"num_secrets": 3, "rotated_api_keys": 2, "secrets": "***", "password": "***", "api_keys": "***"}


def test_no_secret_in_a_captured_command_line_survives() -> None:
    secrets = PROCS_META["secret_values"]
    root = PROCS / "t1" / "proc"
    shown = {pid: otrace.redact_cmdline(otrace.read_cmdline(root, pid) or ())
             for pid in otrace.read_processes(root)}
    assert not [(pid, s) for pid, line in shown.items() for s in secrets if s in line]
    assert shown[24] == "node /app/bot.mjs --token *** --port 3000"
    assert shown[26] == "node /app/client.mjs --api-key=*** --verbose"
    assert shown[31] == "node /app/sync.mjs host=db user=app password=*** dbname=prod"
    assert shown[33] == "node /app/migrate.mjs DATABASE_URL=postgres://u:***@h/db --dry-run"
    assert shown[37].endswith("--role idle --key *** --token=***")
    assert shown[43].endswith("--token=***") and len(shown[43]) > 5000          # read whole, then redacted
    assert shown[12] == "node /app/openclaw.mjs gateway run --port 18789"       # nothing else touched
    for line, expected in (
            ("curl -H Authorization: Bearer abc.def-123 x", "curl -H Authorization: Bearer *** x"),
            ("x --secret s1 --client-secret=s2", "x --secret *** --client-secret=***"),
            ("ghp_" + "a" * 36, "***"), ("run AKIAABCDEFGHIJKLMNOP", "run ***")):
        assert otrace.redact_cmdline(tuple(line.encode().split(b" "))) == expected
    for args, expected in (                                  # each argument as the process has it
            (["app", "--password=horse battery staple"], "app --password=***"),
            (["app", "--config", '{"apiKey":"k1","password": "p 2"}'],
             'app --config {"apiKey":***,"password": ***}'),
            (["psql", "postgresql://app:p@ss@db:5432/app"], "psql postgresql://app:***@db:5432/app"),
            (["psql", "postgres://admin:Ab3/9xK+q@db:5432/app"], "psql postgres://admin:***@db:5432/app"),
            (["app", "--dbpass", "h1", "PGPASS=h2", "--awscreds=h3", "--session=h4"],
             "app --dbpass *** PGPASS=*** --awscreds=*** --session=***"),
            (["curl", "-u", "1234:5678", "https://h"], "curl -u 1234:*** https://h"),
            (["git", "clone", "https://t0ken@github.com/o/r"], "git clone https://***@github.com/o/r"),
            (["curl", "-u", "alice:pw", "https://h/p?sig=s1g&se=1"],
             "curl -u alice:*** https://h/p?sig=***&se=1"),
            (["openssl", "enc", "-pass", "pass:x"], "openssl enc -pass ***"),
            (["app", "--passphrase=x", "--creds=c", "AIza" + "x" * 35],
             "app --passphrase=*** --creds=*** ***"),
            (["app", "--pw", "p1", "--jwt", "j1", "--pwsh", "kept"], "app --pw *** --jwt *** --pwsh kept"),
            (["curl", "https://api.telegram.org/bot123456789:" + "A" * 35 + "/getUpdates"],   # as the
             "curl https://api.telegram.org/bot***/getUpdates"),                              # log's are
            (["notify", "--slack-webhook", "https://hooks.slack.com/services/T01/B02/" + "x" * 24,
              "--hook", "https://discord.com/api/webhooks/1234/" + "y" * 40],
             "notify --slack-webhook https://hooks.slack.com/services/T01/B02/*** "
             "--hook https://discord.com/api/webhooks/1234/***"),
            (["curl", "--user=alice:pw1", "-ubob:pw2", "--proxy-user", "carol:pw3", "-U", "dan:pw4"],
             "curl --user=alice:*** -ubob:*** --proxy-user carol:*** -U dan:***"),
            (["curl", "--header=Authorization: token t1", "-H", "Proxy-Authorization: Basic t2"],
             "curl --header=Authorization: token *** -H Proxy-Authorization: Basic ***"),   # any scheme
            (["mysql", "-uroot", "-pp5", "db"], "mysql -uroot -p*** db"),
            (["mysql", "-h", "db", "-pMyKey99", "appdb"], "mysql -h db -p*** appdb"),   # a word: no flag
            (["docker", "exec", "db", "mysql", "-uroot", "-pS3cret", "appdb"],
             "docker exec db mysql -uroot -p*** appdb"),
            (["sudo", "/usr/bin/mariadb", "-pAuthx1"], "sudo /usr/bin/mariadb -p***"),
            (["tool", "--authorization", "a1", "--proxy-authorization", "a2", "AUTHORIZATION=a3"],
             "tool --authorization *** --proxy-authorization *** AUTHORIZATION=***"),
            (["client", "--bearer", "user:t3", "--json", '{\"api_key\":\"t4\"}'],
             'client --bearer *** --json {\"api_key\":***}'),
            # what an operator needs is kept: ports, paths, a URL's own @, uid:gid, ordinary flags
            (["node", "gw.js", "--model-url", "http://localhost:8080/v1/models/llama@main"],
             "node gw.js --model-url http://localhost:8080/v1/models/llama@main"),
            (["docker", "run", "-u", "1000:1000", "-v", "/var/lib/openclaw/sessions:/data/sessions"],
             "docker run -u 1000:1000 -v /var/lib/openclaw/sessions:/data/sessions"),
            (["node", "gw.js", "--session-dir=/s", "--passthrough", "x", "--signal", "TERM", "--bypass", "y"],
             "node gw.js --session-dir=/s --passthrough x --signal TERM --bypass y"),
            (["vllm", "--max-tokens", "4096", "--tokenizer", "/m", "--author", "a", "--keyboard", "us",
              "-o", "PubkeyAuthentication=yes"],
             "vllm --max-tokens 4096 --tokenizer /m --author a --keyboard us -o PubkeyAuthentication=yes"),
            (["docker", "run", "-u1000:1000", "img"], "docker run -u1000:1000 img"),
            (["pip", "install", "-U", "git+https://github.com/o/r.git"],      # -U is curl's user alone
             "pip install -U git+https://github.com/o/r.git"),
            (["sudo", "curl", "-U", "alice:pw"], "sudo curl -U alice:***"),   # curl's, run by another
            (["sudo", "-E", "mysql", "-uroot", "-pS3cret", "app"], "sudo -E mysql -uroot -p*** app"),
            (["stdbuf", "-oL", "mysql", "-pS3cret"], "stdbuf -oL mysql -p***"),
            (["migrate", "-driver", "mysql", "-pwd", "p1", "up"], "migrate -driver mysql -pwd *** up"),
            (["docker", "run", "--name", "mysql", "-p3306:3306", "mysql:8"],   # mysql a flag's value
             "docker run --name mysql -p3306:3306 mysql:8"),
            (["kubelet", "--authorization-mode=Webhook", "--authorization-webhook-cache-authorized-ttl=5m"],
             "kubelet --authorization-mode=Webhook --authorization-webhook-cache-authorized-ttl=5m"),
            (["gcc", "-Umacro:x", "a.c"], "gcc -Umacro:x a.c")):
        assert otrace.redact_cmdline(tuple(a.encode() for a in args)) == expected
    rows = sample_procs(top=100)
    stored = json.dumps(rows)
    assert not [s for s in secrets if s in stored]
    assert all(len(r["cmdline"].encode()) <= otrace.CMDLINE_KEEP for r in rows if r["cmdline"])


# -- zombies and the gateway, from captured trees


def test_zombies_make_one_alert_per_episode_naming_their_parents(caplog: pytest.LogCaptureFixture) -> None:
    watch = otrace.ZombieWatch(5, logging.getLogger("otrace.test"))
    t0, t1 = (otrace.read_processes(PROCS / moment / "proc") for moment in ("t0", "t1"))
    with caplog.at_level(logging.WARNING):
        assert watch.observe(t0) == []                       # once is not yet an episode
        [alert] = watch.observe(t1)
        assert watch.observe(t1) == []                       # the same episode
        assert watch.observe({1: t1[1]}) == []               # they were reaped
        assert watch.observe(t0) == [] and len(watch.observe(t1)) == 1    # a new episode
    row = dict(zip(otrace.ERRORS.columns, alert.values, strict=True))
    assert (row["error_type"], row["category"], row["severity"], row["source"]) == \
        ("system_error", "zombie_processes", "warning", "otrace")
    assert "3 of pid 10 (zmaker-alpha), 2 of pid 11 (zmaker-beta)" in row["message"]
    meta = json.loads(row["metadata"])
    assert meta["parents"] == [{"pid": 10, "name": "zmaker-alpha", "zombies": 3},
                               {"pid": 11, "name": "zmaker-beta", "zombies": 2}]
    assert meta["zombie_pids"] == [34, 35, 36, 105, 116]
    assert [r.message for r in caplog.records].count("zombie processes recovered") == 1
    assert otrace.ZombieWatch(6, logging.getLogger("x")).observe(t1) == []
    off = otrace.ZombieWatch(0, logging.getLogger("x"))
    assert off.observe(t1) == [] and off.observe(t1) == []


def gateway_over(case: str, moments: list[str], match: tuple = ("node", ("openclaw", "gateway")),
                 oom: dict[str, int] | None = None) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """What a GatewayWatch says at each moment of a captured case: its columns and its events."""
    watch = otrace.GatewayWatch(match, HOSTS / case / moments[0] / "proc", logging.getLogger("otrace.test"))
    seen = []
    for moment in moments:
        watch.procfs = root = HOSTS / case / moment / "proc"
        pids = {int(entry.name) for entry in root.iterdir() if entry.name.isdigit()}
        columns, rows = watch.observe(pids, otrace.read_uptime(root), oom or {})
        seen.append((columns, [dict(zip(otrace.ERRORS.columns, r.values, strict=True)) for r in rows]))
    return seen


def test_the_default_match_finds_the_gateway_and_not_its_decoys() -> None:
    (first, events), (second, _) = gateway_over("procs-many", ["t0", "t1"])
    assert events == [] and first["gateway_cpu_pct"] is None            # usage needs two samples
    assert second == {"gateway_up": 1, "gateway_pid": 12, "gateway_rss_bytes": 42598400,
                      "gateway_threads": 7, "gateway_fds": 19, "gateway_uptime_s": 8.44,
                      "gateway_cpu_pct": 0.0}
    titled = gateway_over("procs-gateway-titled", ["t0"])[0][0]         # process.title: node only in exe
    assert (titled["gateway_up"], titled["gateway_pid"]) == (1, 7)
    assert gateway_over("procs-gateway-titled", ["t0"], ("node", ("openclaw", "gateway", "run")))[0][0] == \
        {"gateway_up": 0}                                              # its argv is gone
    assert gateway_over("procs-many", ["t1"], ("bun", ("openclaw", "gateway")))[0][0] == {"gateway_up": 0}
    for match in (("", ("openclaw-gateway-watchdog",)), ("node", ("gateway", "8080"))):   # the sh decoy,
        assert gateway_over("procs-many", ["t1"], match)[0][0] == {"gateway_up": 0}   # a node: no listener


def test_an_openclaw_command_titled_as_the_gateway_is_not_the_gateway(tmp_path: Path) -> None:
    """`openclaw gateway call health` names itself openclaw-gateway as the gateway does, and listens on
    no port: neither taken for the gateway while it runs, nor a crash when it ends; once it listens, it
    is the gateway."""
    case = HOSTS / "procs-gateway-titled" / "t0" / "proc"
    cli = tmp_path / "proc"
    shutil.copytree(case, cli, symlinks=True)
    for fd in (cli / "7" / "fd").iterdir():
        if str(fd.readlink()).startswith("socket:"):
            fd.unlink()
    watch = otrace.GatewayWatch(("node", ("openclaw", "gateway")), cli, logging.getLogger("otrace.test"))
    pids = {int(p.name) for p in cli.iterdir() if p.name.isdigit()}
    assert watch.observe(pids, 1290.0, {}) == ({"gateway_up": 0}, [])
    assert watch.observe(pids - {7}, 1291.0, {}) == ({"gateway_up": 0}, [])       # it ended: no event
    watch.procfs = case
    assert watch.observe(pids, 1292.0, {})[0]["gateway_pid"] == 7                  # a gateway listening


def test_a_restart_and_a_disappearance_are_crash_events_with_the_downtime() -> None:
    seen = gateway_over("procs-gateway-restart", ["t0", "t1", "t2"])
    (_, none), (restarted, [restart]), (gone_columns, [gone]) = seen
    assert none == [] and restarted["gateway_pid"] == 20 and gone_columns == {"gateway_up": 0}
    assert (restart["error_type"], restart["category"], restart["severity"]) == ("crash", "process_crash",
                                                                                 "error")
    meta = json.loads(restart["metadata"])
    # last seen at uptime 1274.27 (t0); the new one started at 127448 ticks = 1274.48 s
    assert (meta["change"], meta["old"]["pid"], meta["new"]["pid"], meta["downtime_s"]) == \
        ("restarted", 7, 20, 0.21)
    assert "pid 7 gave way to pid 20, down at most 0.21 s" in restart["message"]
    assert meta["oom_kill"] is False
    assert gone["severity"] == "critical" and json.loads(gone["metadata"])["change"] == "gone"
    assert "process 20 is gone" in gone["message"]
    (_, _), (reused, [again]) = gateway_over("procs-gateway-pid-reuse", ["t0", "t1"], oom={"cgroup": 1})
    assert reused["gateway_pid"] == 6 and reused["gateway_cpu_pct"] is None     # a new process: no delta
    meta = json.loads(again["metadata"])
    assert (meta["old"]["pid"], meta["new"]["pid"], meta["oom_kill"], meta["oom_kills"]) == \
        (6, 6, True, {"cgroup": 1})
    assert "with a new start time" in again["message"] and "OOM killer" in again["message"]


def test_a_pid_reused_by_a_new_gateway_is_found_when_every_pid_is_judged_again(tmp_path: Path) -> None:
    """pid 6 is a sleep when first judged; then a gateway holds pid 6 (a new start time) while none
    was known: its pid is not read again until every pid is judged again."""
    sleeper, gateway = (HOSTS / "procs-gateway-restart" / "t2" / "proc",
                        HOSTS / "procs-gateway-restart" / "t1" / "proc")
    reused = tmp_path / "proc"
    shutil.copytree(sleeper, reused, symlinks=True)
    shutil.rmtree(reused / "6")
    shutil.copytree(gateway / "20", reused / "6", symlinks=True)
    shutil.copytree(gateway / "net", reused / "6" / "net")       # its listener, in its namespace's view
    watch = otrace.GatewayWatch(("node", ("openclaw", "gateway")), sleeper, logging.getLogger("otrace.test"))
    pids, settled = {1, 3, 4, 5, 6}, 1278.27 + otrace.EXEC_WINDOW      # no exec awaited of pid 6 then
    assert watch.observe(pids, settled, {})[0] == {"gateway_up": 0}
    watch.procfs = reused
    seen = [watch.observe(pids, settled + n, {})[0]["gateway_up"] for n in range(otrace.REJUDGE_EVERY)]
    assert seen == [0] * (otrace.REJUDGE_EVERY - 2) + [1, 1]     # its sample count reaches REJUDGE_EVERY


def test_a_wrapper_that_execs_the_gateway_is_found_at_the_next_sample(tmp_path: Path) -> None:
    """`sh -c 'exec node openclaw.mjs gateway'`: judged as sh, then the same pid and start time are
    node. A process watched past EXEC_WINDOW is judged again only with every pid."""
    def tree(name: str, args: list[bytes], exe: str) -> Path:
        root = tmp_path / name / "proc"
        shutil.copytree(HOSTS / "procs-gateway-restart" / "t2" / "proc", root, symlinks=True)
        stat = root / "6" / "stat"
        stat.write_text(stat.read_text().replace("(node)", f"({name})"))
        (root / "6" / "cmdline").write_bytes(b"\0".join(args) + b"\0")
        (root / "6" / "exe").unlink()
        (root / "6" / "exe").symlink_to(exe)
        listening = HOSTS / "procs-gateway-restart" / "t1" / "proc"             # pid 20's listener
        shutil.copytree(listening / "net", root / "6" / "net")
        (root / "6" / "fd" / "99").symlink_to((listening / "20" / "fd" / "18").readlink())
        return root
    wrapper = tree("sh", [b"sh", b"-c", b"exec node /app/openclaw.mjs gateway"], "/usr/bin/dash")
    execd = tree("node", [b"node", b"/app/openclaw.mjs", b"gateway"], "/usr/local/bin/node")
    started = 127321 / otrace.CLOCK_TICKS                                # pid 6's start, in its stat
    pids = {1, 3, 4, 5, 6}
    for first_seen, expected in ((started + 5, 1), (started + otrace.EXEC_WINDOW + 5, 0)):
        watch = otrace.GatewayWatch(("node", ("openclaw", "gateway")), wrapper, logging.getLogger("t"))
        assert watch.observe(pids, first_seen, {})[0] == {"gateway_up": 0}
        watch.procfs = execd
        assert watch.observe(pids, first_seen + 1, {})[0]["gateway_up"] == expected


LATE_LISTENER = ("import socket, sys, time; time.sleep(float(sys.argv[1])); s = socket.socket(); "
                 "s.bind(('127.0.0.1', 0)); s.listen(); time.sleep(120)")
LISTENS_WHEN = ("import os, socket, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.01)\n"
                "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); time.sleep(120)")


def test_a_gateway_restarted_is_one_restart_once_the_new_one_listens_and_a_command_is_no_gateway(
        tmp_path: Path) -> None:
    """A restart whose new gateway takes a while to listen (OpenClaw's: seconds, a minute cold) is one
    `restarted` event once it listens, not the gateway gone (critical) and back; meanwhile it is not
    up. A process like it that never listens (one of OpenClaw's CLI commands, run as the gateway died)
    is no successor: when it ends, the gateway is gone, and the next one that listens is it back."""
    word = f"otrace-restart-{uuid.uuid4().hex[:8]}"
    watch = otrace.GatewayWatch(("", (word,)), Path("/proc"), logging.getLogger("otrace.test"))

    def sample() -> tuple[dict[str, Any], list[tuple[str, str, int | None]]]:
        pids = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}
        columns, rows = watch.observe(pids, otrace.read_uptime(Path("/proc")), {})
        meta = [json.loads(dict(zip(otrace.ERRORS.columns, r.values, strict=True))["metadata"]) for r in rows]
        return columns, [(m["change"], m["old"]["pid"], m.get("new", {}).get("pid")) for m in meta]

    def running(proc: subprocess.Popen) -> None:
        wait_until(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes().count(word.encode()), 30,
                   what="it running")

    started: list[subprocess.Popen] = []

    def start(code: str, arg: str) -> subprocess.Popen:
        started.append(proc := subprocess.Popen([sys.executable, "-c", code, arg, word]))
        running(proc)
        return proc

    try:
        first = start(LATE_LISTENER, "0")
        wait_until(lambda: sample()[0]["gateway_up"], 30, "the first gateway listening")
        first.kill()
        first.wait()
        second = start(LISTENS_WHEN, str(tmp_path / "listen"))
        assert sample() == ({"gateway_up": 0}, []) and sample() == ({"gateway_up": 0}, [])   # starting
        (tmp_path / "listen").touch()
        columns, events = wait_until(lambda: (found := sample())[0]["gateway_up"] and found,
                                     what="it listening")
        assert columns["gateway_pid"] == second.pid and events == [("restarted", first.pid, second.pid)]
        second.kill()
        second.wait()
        command = start(LATE_LISTENER, "3600")                   # like it, and never listens
        assert sample() == ({"gateway_up": 0}, [])
        command.kill()
        command.wait()
        assert sample() == ({"gateway_up": 0}, [("gone", second.pid, None)])
        third = start(LATE_LISTENER, "0")
        _, events = wait_until(lambda: (found := sample())[0]["gateway_up"] and found, what="it back")
        assert events == [("back", second.pid, third.pid)] and watch.restarts == 2
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


def gateway_gone_and_successor_starting(tmp_path: Path) -> tuple[otrace.GatewayWatch, Path, dict[str, Path]]:
    """A watch that knew procs-gateway-restart's gateway (pid 7, t0), turned to a copy of t1 whose new
    gateway (pid 20) listens on nothing yet: the watch, the copy's proc, and pid 20's sockets taken."""
    before, after = HOSTS / "procs-gateway-restart" / "t0" / "proc", tmp_path / "proc"
    shutil.copytree(HOSTS / "procs-gateway-restart" / "t1" / "proc", after, symlinks=True)
    sockets = {fd.name: fd.readlink() for fd in (after / "20" / "fd").iterdir()
               if str(fd.readlink()).startswith("socket:")}
    for name in sockets:
        (after / "20" / "fd" / name).unlink()
    watch = otrace.GatewayWatch(("node", ("openclaw", "gateway")), before, logging.getLogger("otrace.test"))
    assert watch.observe({1, 3, 4, 5, 6, 7}, 1274.3, {})[0]["gateway_pid"] == 7
    watch.procfs = after
    return watch, after, sockets


def test_a_successor_rewriting_its_command_line_as_it_starts_stays_the_gateway(tmp_path: Path) -> None:
    """The known gateway gone, the one like it that started after it is its successor starting; while
    it renames itself (process.title rewrites its argv: for a moment the command line reads empty) it
    stays so, and once it listens it is the gateway, restarted."""
    watch, after, sockets = gateway_gone_and_successor_starting(tmp_path)
    assert watch.observe({1, 3, 4, 5, 6, 20}, 1275.0, {}) == ({"gateway_up": 0}, [])
    cmdline = (after / "20" / "cmdline").read_bytes()
    (after / "20" / "cmdline").write_bytes(b"")
    assert watch.observe({1, 3, 4, 5, 6, 20}, 1276.0, {}) == ({"gateway_up": 0}, [])
    (after / "20" / "cmdline").write_bytes(cmdline)          # renamed, and listening
    for name, target in sockets.items():
        (after / "20" / "fd" / name).symlink_to(target)
    columns, [event] = watch.observe({1, 3, 4, 5, 6, 20}, 1277.0, {})
    assert columns["gateway_pid"] == 20 and json.loads(event.values[otrace.ERRORS.columns.index(
        "metadata")])["change"] == "restarted"
    assert watch.observe({1, 3, 4, 5, 6, 20}, 1278.0, {})[1] == []


def test_a_restart_seen_by_samples_a_minute_apart_is_one_restart(tmp_path: Path) -> None:
    """TRACE_METRICS_INTERVAL of a minute or more: the successor, not listening at the first sample
    after the old one went, is waited for from that sample, not from the old one's last."""
    watch, after, sockets = gateway_gone_and_successor_starting(tmp_path)
    assert watch.observe({1, 3, 4, 5, 6, 20}, 1364.3, {}) == ({"gateway_up": 0}, [])    # 90 s later
    for name, target in sockets.items():
        (after / "20" / "fd" / name).symlink_to(target)
    _, [event] = watch.observe({1, 3, 4, 5, 6, 20}, 1454.3, {})
    assert json.loads(event.values[otrace.ERRORS.columns.index("metadata")])["change"] == "restarted"


def test_a_gateway_that_renames_itself_stays_the_gateway(tmp_path: Path) -> None:
    """process.title: the name and command line change, the pid and start time do not."""
    root = tmp_path / "proc"
    shutil.copytree(HOSTS / "procs-gateway-restart" / "t1" / "proc", root, symlinks=True)
    watch = otrace.GatewayWatch(("node", ("openclaw", "gateway")), root, logging.getLogger("t"))
    pids = {int(p.name) for p in root.iterdir() if p.name.isdigit()}
    assert watch.observe(pids, 1275.0, {})[0]["gateway_pid"] == 20
    stat = root / "20" / "stat"
    stat.write_text(stat.read_text().replace("(node)", "(openclaw-gw)"))
    (root / "20" / "cmdline").write_bytes(b"openclaw-gw\0")
    (root / "20" / "exe").unlink()                            # another user's: not readable
    columns, events = watch.observe(pids, 1276.0, {})
    assert columns["gateway_pid"] == 20 and events == []


# -- the network


def test_captured_proc_net_becomes_connections_traffic_and_error_rates() -> None:
    meta = json.loads((HOSTS / "net" / "meta.json").read_text())
    before, after = (otrace.NetReader(HOSTS / "net" / moment / "proc").snapshot() for moment in ("t0", "t1"))
    assert after.at - before.at == pytest.approx(5.0)                  # proc/uptime: 1287.14 -> 1292.14
    states = {s: meta["tcp_states"]["tcp_t1"].get(s.upper(), 0) + meta["tcp_states"]["tcp6_t1"].get(
        s.upper(), 0) for s in ("established", "close_wait", "listen")}
    # TIME_WAIT as sockstat (and ss -s) counts it: 5 + 1 in TIME_WAIT and the client orphaned in FIN_WAIT2
    assert after.tcp == {**states, "time_wait": 5 + 1 + 1} == {"established": 23, "time_wait": 7,
                                                               "close_wait": 1, "listen": 5}
    row = otrace.net_sample(before, after)
    moved = meta["expected_deltas"]
    veth = moved["dev_non_loopback"]["otfx-a"]                        # lo's traffic is left out
    assert (row["net_rx_bps"], row["net_rx_pps"], row["net_tx_bps"], row["net_tx_pps"]) == (
        veth["rx_bytes"] / 5, veth["rx_packets"] / 5, veth["tx_bytes"] / 5, veth["tx_packets"] / 5)
    assert row["tcp_attempt_fails_ps"] == moved["Tcp"]["AttemptFails"] / 5
    assert row["tcp_estab_resets_ps"] == moved["Tcp"]["EstabResets"] / 5
    assert row["tcp_out_rsts_ps"] == moved["Tcp"]["OutRsts"] / 5
    assert row["tcp_retrans_ps"] >= moved["Tcp"]["RetransSegs_at_least"] / 5
    assert row["tcp_syn_retrans_ps"] == moved["TcpExt"]["TCPSynRetrans"] / 5
    assert row["udp_in_errors_ps"] == moved["Udp"]["InErrors"] / 5            # no Udp6InErrors moved
    assert row["udp_no_ports_ps"] == (moved["Udp"]["NoPorts"] + moved["snmp6"]["Udp6NoPorts"]) / 5
    assert set(row) == {c for c in otrace.METRICS.columns if c.startswith(("tcp_", "net_", "udp_"))}


NETNS_SOCKETS = r"""
import json, socket, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import otrace
def listener(family, host):
    sock = socket.socket(family)
    sock.bind((host, 0))
    sock.listen()
    return sock
def settled(expected):
    files, netlink = otrace.NetReader(Path("/proc")), otrace.NetReader(Path("/proc"), live=True)
    end = time.monotonic() + 20
    while files.snapshot().tcp != expected and time.monotonic() < end:
        time.sleep(0.01)
    return {"files": files.snapshot().tcp, "netlink": netlink.snapshot().tcp}
v4 = listener(socket.AF_INET, "127.0.0.1")
held = [v4, socket.create_connection(v4.getsockname()), v4.accept()[0]]
ipv4_only = settled({"established": 2, "time_wait": 0, "close_wait": 0, "listen": 1})  # no IPv6 dump
v6 = listener(socket.AF_INET6, "::1")
held.append(v6)
for server in (v4, v6):                        # 3 connections in all: 6 established sockets
    held += [socket.create_connection(server.getsockname()[:2]), server.accept()[0]]
for _ in range(2):                             # closed by the client first: TIME_WAIT on its side
    client = socket.create_connection(v4.getsockname())
    peer = v4.accept()[0]
    client.close()
    peer.recv(1)
    peer.close()
client = socket.create_connection(v4.getsockname())
held.append(v4.accept()[0])                    # never closed: CLOSE_WAIT (the client in FIN_WAIT2)
client.close()
expected = {"established": 6, "time_wait": 3, "close_wait": 1, "listen": 2}   # the FIN_WAIT2 orphan too
print(json.dumps({**settled(expected), "ipv4_only": ipv4_only, "raw": otrace.tcp_states(Path("/proc/net")),
                  "dump": otrace.tcp_states_netlink(with_time_wait=True)}))
"""


needs_a_netns = pytest.mark.skipif(not (ROOT and shutil.which("unshare") and shutil.which("ip")),
                                   reason="needs root, unshare and ip for a network namespace of its own")


def in_a_netns(script: str) -> Any:
    """What `script` (given this directory) prints as JSON, run in a new network namespace."""
    out = subprocess.run(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1" "$2"',
                          sys.executable, script, str(HERE)], capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout)


@needs_a_netns
def test_tcp_states_over_netlink_agree_with_the_files_in_a_namespace_of_known_sockets() -> None:
    seen = in_a_netns(NETNS_SOCKETS)
    assert seen["files"] == seen["netlink"] == {"established": 6, "time_wait": 3, "close_wait": 1,
                                                "listen": 2}
    assert seen["ipv4_only"]["files"] == seen["ipv4_only"]["netlink"] == {
        "established": 2, "time_wait": 0, "close_wait": 0, "listen": 1}
    assert seen["raw"] == seen["dump"] == {**seen["files"], "time_wait": 2}    # TIME_WAIT proper


NETNS_QUIET = r"""
import json, socket, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import otrace
reader, seen = otrace.NetReader(Path("/proc"), live=True), []
def look(step, established, time_wait, close_wait, listen):    # once the kernel shows them
    expected = {"established": established, "time_wait": time_wait, "close_wait": close_wait,
                "listen": listen}
    end = time.monotonic() + 20
    while otrace.NetReader(Path("/proc"), live=True).snapshot().tcp != expected and time.monotonic() < end:
        time.sleep(0.01)
    seen.append([step, reader.snapshot().tcp == expected, reader.walks])
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
look("listening", 0, 0, 0, 1)
for _ in range(3):
    look("quiet", 0, 0, 0, 1)
client = socket.create_connection(server.getsockname())
peer = server.accept()[0]
look("connected", 2, 0, 0, 1)
client.shutdown(socket.SHUT_WR)                # half closed: CLOSE_WAIT, and no socket came or went
assert peer.recv(1) == b""
look("half closed", 0, 0, 1, 1)
client.close()                                 # FIN_WAIT2 to TIME_WAIT with no segment, while a
other = socket.socket()                        # listener comes: sockets in use -1 +1
other.bind(("127.0.0.1", 0))
other.listen()
look("a listener for a FIN_WAIT2", 0, 1, 1, 2)
server.close()
other.close()
look("no listener", 0, 1, 1, 0)
print(json.dumps(seen))
"""


@needs_a_netns
def test_a_quiet_namespace_walks_its_tcp_table_once_and_a_change_of_state_walks_it_again() -> None:
    seen = in_a_netns(NETNS_QUIET)
    assert [step for step, right, _ in seen if not right] == [], seen   # each as a reader with no memory
    assert {step: walks for step, _, walks in seen} == {
        "listening": 1, "quiet": 1, "connected": 2, "half closed": 3, "a listener for a FIN_WAIT2": 4,
        "no listener": 5}


def test_the_tcp_table_is_walked_again_when_its_counters_move_or_the_recount_is_due(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    shutil.copytree(HOSTS / "net" / "t1" / "proc", proc)
    reader = otrace.NetReader(proc)
    first = reader.snapshot().tcp
    assert first == {"established": 23, "time_wait": 7, "close_wait": 1, "listen": 5} and reader.walks == 1
    tcp = (proc / "net" / "tcp").read_text()
    closing = tcp.splitlines()[1].replace(" 0A ", " 08 ").replace(":2454 ", ":2455 ")   # a CLOSE_WAIT
    (proc / "net" / "tcp").write_text(f"{tcp}{closing}\n")    # that no counter tells of: not seen yet
    assert reader.snapshot().tcp == first and reader.walks == 1
    (proc / "uptime").write_text(f"{1292.14 + otrace.TCP_RECOUNT:.2f} 50.00\n")
    assert reader.snapshot().tcp == {**first, "close_wait": 2} and reader.walks == 2
    (proc / "net" / "tcp").write_text(tcp)
    snmp = (proc / "net" / "snmp").read_text()
    (proc / "net" / "snmp").write_text(snmp.replace("\nTcp: 1 200 120000 -1 29 20 7 4 24 103 ",
                                                    "\nTcp: 1 200 120000 -1 29 20 7 4 24 104 "))
    assert reader.snapshot().tcp == first and reader.walks == 3                  # a segment came
    (proc / "net" / "sockstat").unlink()                      # no TIME_WAIT count: each look walks
    assert [reader.snapshot().tcp["time_wait"] for _ in range(2)] == [6, 6] and reader.walks == 5


def test_net_files_in_other_shapes_are_read_or_left_null(tmp_path: Path) -> None:
    net = tmp_path / "proc" / "net"
    net.mkdir(parents=True)
    (tmp_path / "proc" / "uptime").write_text("100.00 50.00\n")
    (net / "dev").write_text("Inter-|   Receive\n face |bytes\n    lo:9 9 0 0 0 0 0 0 9 9 0 0 0 0 0 0\n"
                             "eth0:100 2 0 0 0 0 0 0 300 4 0 0 0 0 0 0\n"        # no space after the colon
                             "  wg0: 5 1 0 0 0 0 0 0 7 1 0 0 0 0 0 0\n")
    (net / "snmp").write_text("Tcp: RetransSegs AttemptFails\nTcp: 10 -1\nUdp: NoPorts\nUdp: 3\n")
    first = otrace.NetReader(tmp_path / "proc").snapshot()
    assert first.dev == {"eth0": (100, 2, 300, 4), "wg0": (5, 1, 7, 1)} and first.tcp is None
    assert first.counters[("snmp", "Tcp", "AttemptFails")] == -1
    (tmp_path / "proc" / "uptime").write_text("110.00 50.00\n")
    (net / "snmp").write_text("Tcp: AttemptFails RetransSegs\nTcp: 4 20\n")            # columns moved
    (net / "dev").write_text("Inter-|   Receive\n face |bytes\n"                        # wg0 went, and
                             "eth0:1100 12 0 0 0 0 0 0 300 4 0 0 0 0 0 0\n"           # veth1 came with
                             "veth1: 9000000 9000 0 0 0 0 0 0 52000000 40000 0 0 0 0 0 0\n")  # its past
    row = otrace.net_sample(first, otrace.NetReader(tmp_path / "proc").snapshot())
    assert (row["tcp_retrans_ps"], row["tcp_attempt_fails_ps"], row["udp_no_ports_ps"]) == (1.0, 0.5, None)
    assert row["tcp_established"] is None
    traffic = (row["net_rx_bps"], row["net_rx_pps"], row["net_tx_bps"], row["net_tx_pps"])
    assert traffic == (100.0, 1.0, 0.0, 0.0)                   # eth0's alone


# -- the service, on real and captured trees


def live_tree(tmp_path: Path) -> Callable[[str, str, str], None]:
    """A tree that moves from moment to moment: the processes of procs-gateway-restart beside the
    cgroup of v1-oom (its OOM count; the host's stays) and the network of the net case, under
    tmp_path/host. Each moment is a whole tree, swapped in at once (a symlink replaced), so no sample
    sees half of one."""
    live = tmp_path / "host"
    live.mkdir()

    def swap(procs: str, oom: str, net: str) -> None:
        tree = tmp_path / f"{procs}-{oom}-{net}"
        if not tree.exists():
            shutil.copytree(HOSTS / "v1-oom" / oom, tree)
            shutil.copy(HOSTS / "v1-oom" / "t0" / "proc" / "vmstat", tree / "proc")    # host: no kill
            for entry in (HOSTS / "procs-gateway-restart" / procs / "proc").iterdir():
                if entry.name.isdigit():                   # each with its namespace's view, as in /proc
                    shutil.copytree(entry, tree / "proc" / entry.name, symlinks=True)
                    shutil.copytree(entry.parent / "net", tree / "proc" / entry.name / "net")
            shutil.copy(HOSTS / "procs-gateway-restart" / procs / "proc" / "uptime", tree / "proc")
            shutil.copytree(HOSTS / "net" / net / "proc" / "net", tree / "proc" / "net")
        for part in ("sys", "proc"):                       # the OOM counts first, then the processes
            (live / "next").symlink_to(tree / part)
            (live / "next").replace(live / part)

    return swap


def live_tree_env(tmp_path: Path) -> dict[str, str]:
    return {"TRACE_METRICS_INTERVAL": "100ms", "TRACE_PROCFS": str(tmp_path / "host" / "proc"),
            "TRACE_SYSFS": str(tmp_path / "host" / "sys"), "TRACE_DISK_PATH": str(tmp_path),
            "TRACE_GATEWAY_MATCH": otrace.Config.__dataclass_fields__["gateway_match"].metadata["default"],
            "TRACE_PROC_INTERVAL": "1s"}


def test_a_live_tree_gives_every_column_and_the_gateway_events_with_the_oom_killer(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """otrace reads a live tree (live_tree): each column, the gateway gone with an OOM kill, back."""
    swap = live_tree(tmp_path)
    swap("t1", "t0", "t0")
    node = run(live_tree_env(tmp_path))
    row = wait_until(lambda: (h := node.health()["host"]) and h["proc_zombies"] is not None and h,
                     what="a host sample after a scan of the process table")
    assert (row["gateway_up"], row["gateway_pid"], row["proc_count"], row["proc_zombies"]) == (1, 20, 6, 0)
    assert row["tcp_listen"] == 3 + 2 and row["tcp_established"] == 16 + 5
    assert row["net_rx_bps"] is None and row["gateway_cpu_pct"] is None     # the tree's clock stood still
    swap("t2", "t1", "t1")                                               # gone, with an OOM kill
    gone = wait_until(lambda: error_rows(node, "process_crash"), what="the gateway's disappearance")[0]
    meta = json.loads(gone["metadata"])
    assert (gone["error_type"], gone["severity"], meta["change"], meta["old"]["pid"]) == \
        ("crash", "critical", "gone", 20)
    assert meta["oom_kill"] is True and meta["oom_kills"] == {"cgroup": 1}
    assert "the OOM killer struck at that time (1 in its cgroup)" in gone["message"]
    assert [r["category"] for r in node.rows("error_events")] == ["oom_kill", "process_crash"]
    row = wait_until(lambda: (h := node.health()["host"]) and h["gateway_up"] == 0 and h, what="up 0")
    assert row["gateway_pid"] is None
    gateway = node.health()["system"]["gateway"]
    assert (gateway["up"], gateway["pid"], gateway["restarts"]) == (False, None, 0) and gateway["gone_since"]
    swap("t1", "t1", "t1")                                               # the same one, back
    back = wait_until(lambda: [r for r in error_rows(node, "process_crash") if r["severity"] == "info"],
                      what="the gateway back")[0]
    assert json.loads(back["metadata"])["change"] == "back" and "back as pid 20" in back["message"]
    wait_until(lambda: node.health()["host"]["gateway_up"] == 1, what="up again")
    text = node.request("GET", "/metrics").body.decode()
    assert 'otrace_net_tcp_connections{state="listen"} 5' in text
    assert "otrace_gateway_up 1" in text and "otrace_host_processes 6" in text
    assert "otrace_gateway_restarts_total 0" in text
    stored = node.rows("system_metrics")
    assert all(r["tcp_established"] is not None for r in stored)
    assert {r["gateway_up"] for r in stored} == {0, 1}
    # the one interval in which the tree's clock moved forward and its net files changed: t0 to t1 of
    # the net case over the 2 s from procs t1 to t2 (4 SYNs resent); every other rate is 0 or None
    assert [r["tcp_syn_retrans_ps"] for r in stored if r["tcp_syn_retrans_ps"]] == [4 / 2.0]
    assert len(error_rows(node, "process_crash")) == 2


def test_a_gateway_slow_to_exit_after_an_oom_kill_is_still_said_killed_by_it(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """The OOM killer's count rises while the gateway it killed is still exiting (freeing a large heap
    on a loaded machine takes a while): the samples between do not part the kill from the crash."""
    swap = live_tree(tmp_path)
    swap("t1", "t0", "t0")
    node = run(live_tree_env(tmp_path))
    wait_until(lambda: (h := node.health()["host"]) and h["gateway_up"] == 1, what="the gateway found")
    swap("t1", "t1", "t0")                                               # killed, not yet gone
    wait_until(lambda: error_rows(node, "oom_kill"), what="the kill counted")
    samples = len(node.rows("system_metrics"))
    wait_until(lambda: len(node.rows("system_metrics")) >= samples + 3, what="three samples more")
    swap("t2", "t1", "t0")                                               # now gone
    gone = wait_until(lambda: error_rows(node, "process_crash"), what="the gateway's disappearance")[0]
    meta = json.loads(gone["metadata"])
    assert meta["change"] == "gone" and meta["oom_kill"] is True and meta["oom_kills"] == {"cgroup": 1}


def test_real_processes_are_sampled_without_their_secrets(run: Callable[..., Otrace]) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass", "--token", secret,
                               f"password={secret}"])
    try:
        node = run({"TRACE_PROC_INTERVAL": "1s", "TRACE_PROC_TOP": "100", "TRACE_METRICS_INTERVAL": "200ms",
                    "TRACE_LOG_LEVEL": "debug"})
        row = wait_until(lambda: [r for r in node.rows("process_samples") if r["pid"] == burner.pid],
                         timeout=30, what="the burner in a process sample")[0]
        assert row["cpu_pct"] > 0 and row["cpu_rank"] >= 1 and row["uid"] == os.getuid()
        assert row["cmdline"] == f"{sys.executable} -c while True: pass --token *** password=***"
        assert row["started_at"] <= otrace.now_ms() and row["threads"] == 1 and row["fds"] >= 3
        assert row["name"] == Path(sys.executable).name[:15] and row["state"] in ("R", "S")
        mine = [r for r in node.rows("process_samples") if r["pid"] == node.proc.pid]
        assert not mine or mine[0]["cmdline"].endswith("-m otrace")
        health = node.health()
        sampler = health["system"]["processes"]
        assert sampler["samples"] >= 1 and sampler["processes"] > 1
        host = wait_until(lambda: node.health()["host"], what="a host sample")
        assert host["proc_count"] >= 2 and host["tcp_listen"] >= 1          # otrace's own listener at least
        seen = json.dumps(node.lines) + node.request("GET", "/metrics").body.decode() + json.dumps(health)
        with contextlib.closing(sqlite3.connect(node.db_path)) as conn:
            seen += "".join(line for line in conn.iterdump())
        assert secret not in seen
    finally:
        burner.kill()
        burner.wait(10)


ZOMBIE_MAKER = """
import os, sys
for _ in range(int(sys.argv[1])):
    if os.fork() == 0:
        os._exit(0)
print("made", flush=True)
sys.stdin.readline()              # then reap them all
for _ in range(int(sys.argv[1])):
    os.wait()
print("reaped", flush=True)
sys.stdin.readline()
"""


@HOST_WIDE
def test_real_zombies_alert_once_and_recover(run: Callable[..., Otrace]) -> None:
    count = 7
    maker = subprocess.Popen([sys.executable, "-c", ZOMBIE_MAKER, str(count)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert maker.stdout.readline() == "made\n"
        node = run({"TRACE_METRICS_INTERVAL": "100ms", "TRACE_PROC_INTERVAL": "1s",
                    "TRACE_ZOMBIE_ALERT": str(count)})
        alert = wait_until(lambda: error_rows(node, "zombie_processes"), what="the zombie alert")[0]
        meta = json.loads(alert["metadata"])
        assert {"pid": maker.pid, "name": Path(sys.executable).name[:15], "zombies": count} in meta["parents"]
        assert f"of pid {maker.pid}" in alert["message"] and alert["severity"] == "warning"
        assert wait_until(lambda: node.health()["host"])["proc_zombies"] >= count   # in host samples too
        scans = node.health()["system"]["processes"]["samples"]
        wait_until(lambda: node.health()["system"]["processes"]["samples"] >= scans + 2, what="more scans")
        assert len(error_rows(node, "zombie_processes")) == 1                # one per episode
        maker.stdin.write("\n")
        maker.stdin.flush()
        assert maker.stdout.readline() == "reaped\n"
        node.wait_log(lambda e: e.get("message") == "zombie processes recovered")
        assert node.health()["system"]["processes"]["zombie_alert"] is False
    finally:
        maker.kill()
        maker.wait(10)


NODE_GATEWAY = "require('net').createServer().listen(0, '127.0.0.1')"     # a gateway listens


@HOST_WIDE
def test_a_real_gateway_killed_and_restarted(run: Callable[..., Otrace]) -> None:
    """A real node process that matches the gateway pattern (a unique word keeps other tests' out)."""
    word = f"otrace-test-{uuid.uuid4().hex[:8]}"
    start = [shutil.which("node") or pytest.skip("needs node"), "-e", NODE_GATEWAY, "openclaw", "gateway",
             word]
    node = run({"TRACE_METRICS_INTERVAL": "100ms", "TRACE_GATEWAY_MATCH": f"node:openclaw,gateway,{word}"})
    first = subprocess.Popen(start)
    second = third = None
    try:
        row = wait_until(lambda: (h := node.health()["host"]) and h["gateway_pid"] == first.pid and h,
                         what="the gateway found")
        assert row["gateway_up"] == 1 and row["gateway_threads"] >= 1 and row["gateway_rss_bytes"] > 1 << 20
        assert row["gateway_fds"] >= 3 and row["gateway_uptime_s"] >= 0
        first.kill()                                   # killed, not yet reaped: a zombie is not up
        gone = wait_until(lambda: error_rows(node, "process_crash"), what="the gateway gone")[0]
        assert json.loads(gone["metadata"])["old"]["pid"] == first.pid and gone["severity"] == "critical"
        first.wait(10)
        second = subprocess.Popen(start)
        back = wait_until(lambda: [r for r in error_rows(node, "process_crash") if r["severity"] == "info"],
                          what="the gateway back")[0]
        meta = json.loads(back["metadata"])
        assert (meta["change"], meta["new"]["pid"]) == ("back", second.pid) and meta["downtime_s"] > 0
        assert node.health()["system"]["gateway"]["restarts"] == 1          # gone and back: a restart
        third = subprocess.Popen(start)                # a second match: the known one is kept ...
        samples = len(node.rows("system_metrics"))
        wait_until(lambda: len(node.rows("system_metrics")) >= samples + 2, what="samples seeing both")
        assert node.health()["host"]["gateway_pid"] == second.pid
        second.kill()                                  # ... until it dies: the other one took over
        restart = wait_until(lambda: [r for r in error_rows(node, "process_crash")
                                      if r["severity"] == "error"], what="the restart")[0]
        meta = json.loads(restart["metadata"])
        assert (meta["change"], meta["old"]["pid"], meta["new"]["pid"]) == ("restarted", second.pid,
                                                                            third.pid)
        assert node.health()["system"]["gateway"]["restarts"] == 2
        assert len(error_rows(node, "process_crash")) == 3
    finally:
        for proc in (first, second, third):
            if proc:
                proc.kill()
                proc.wait(10)


@HOST_WIDE
@needs_v1
def test_a_real_gateway_killed_by_the_oom_killer_says_so(tmp_path: Path) -> None:
    """otrace and a node gateway share a real cgroup (256 MiB); the gateway is told to eat memory."""
    word = f"otrace-oom-{uuid.uuid4().hex[:8]}"
    hog = ("process.on('SIGUSR2', () => { const kept = []; "
           "setInterval(() => kept.push(Buffer.alloc(8 << 20, 1)), 5) }); " + NODE_GATEWAY)
    with v1_cgroup(f"otrace-test-{os.getpid()}", -1, 256 << 20) as enter:
        node = Otrace(tmp_path, {"TRACE_METRICS_INTERVAL": "200ms",
                                 "TRACE_GATEWAY_MATCH": f"node:openclaw,gateway,{word}"})
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")} | node.env
        node.proc = subprocess.Popen(["sh", "-c", f'{enter} exec "$0" -m otrace', sys.executable],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=node._read, args=(node.proc.stdout, True), daemon=True).start()
        threading.Thread(target=node._read, args=(node.proc.stderr, False), daemon=True).start()
        gateway = subprocess.Popen(["sh", "-c", f'{enter} exec "$@"', "sh", shutil.which("node") or "node",
                                    "-e", hog, "openclaw", "gateway", word])
        try:
            listening = node.wait_log(lambda e: e.get("message") == "listening")
            node.port = int(listening["address"].rsplit(":", 1)[1])
            wait_until(lambda: (h := node.health()["host"]) and h["gateway_pid"] == gateway.pid,
                       what="the gateway found")
            with oom_decoy(enter):
                gateway.send_signal(signal.SIGUSR2)
                assert gateway.wait(60) == -signal.SIGKILL, node.lines[-5:]   # the OOM killer's doing
            gone = wait_until(lambda: error_rows(node, "process_crash"), what="the gateway gone")[0]
            meta = json.loads(gone["metadata"])
            said = (gone["message"], error_rows(node, "oom_kill"), node.lines[-8:])   # shown if it fails
            assert meta["old"]["pid"] == gateway.pid and meta["oom_kill"] is True, said
            assert meta["oom_kills"]["cgroup"] in (1, 2) and "OOM killer" in gone["message"], said
            assert error_rows(node, "oom_kill"), said
            assert node.stop() == 0, node.lines[-5:]
        finally:
            gateway.kill()
            gateway.wait(10)
            node.kill()


# -- DNS probes


class DnsStub(threading.Thread):
    """A DNS server on a loopback address, port 53: an A record for the names in `answers`, NXDOMAIN
    for the others, and no answer at all for the names in `hang`."""

    def __init__(self, address: str, hang: set[str]) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 53))
        self.sock.settimeout(0.2)
        self.answers: dict[str, str] = {}
        self.hang = hang
        self.queries: collections.Counter[str] = collections.Counter()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                query, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            labels, at = [], 12
            while query[at]:
                labels.append(query[at + 1:at + 1 + query[at]].decode())
                at += 1 + query[at]
            name, qtype = ".".join(labels).lower(), int.from_bytes(query[at + 1:at + 3], "big")
            self.queries[name] += 1
            if name in self.hang:
                continue
            found = self.answers.get(name)
            answer = found is not None and qtype == 1
            head = query[:2] + (0x8180 | (0 if found else 3)).to_bytes(2, "big") + bytes(
                [0, 1, 0, int(answer), 0, 0, 0, 0])
            reply = head + query[12:at + 5]
            if answer:
                reply += b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04" + socket.inet_aton(found)
            self.sock.sendto(reply, peer)

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)
        self.sock.close()


needs_namespaces = pytest.mark.skipif(not (ROOT and shutil.which("unshare")),
                                      reason="needs root and unshare: a private /etc/hosts and resolv.conf")


@needs_namespaces
def test_dns_probes_time_a_name_in_hosts_one_that_cannot_resolve_and_one_that_hangs(
        tmp_path: Path, run: Callable[..., Otrace]) -> None:
    """otrace runs in a mount namespace of its own, with an /etc/hosts and a resolv.conf pointing at a
    stub resolver on loopback that never answers hang.test (glibc would wait minutes)."""
    address = f"127.53.{os.getpid() % 250}.{threading.get_ident() % 250 + 1}"
    stub = DnsStub(address, {"hang.test"})
    stub.start()
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n10.9.8.7 in-hosts.test\n")
    (tmp_path / "resolv.conf").write_text(f"nameserver {address}\noptions timeout:30 attempts:5\n")
    command = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && mount --bind "$1" '
               '/etc/resolv.conf && exec "$2" -m otrace', str(tmp_path / "hosts"),
               str(tmp_path / "resolv.conf"), sys.executable]
    try:
        node = run({"TRACE_DNS_PROBE": "in-hosts.test,missing.test,hang.test", "TRACE_DNS_INTERVAL": "1s",
                    "TRACE_DNS_TIMEOUT": "300ms", "TRACE_METRICS_INTERVAL": "200ms"}, command=command)

        def outcomes() -> dict[str, str]:
            return {n: r.get("outcome") for n, r in node.health()["system"]["dns"]["names"].items()}

        wait_until(lambda: outcomes() == {"in-hosts.test": "ok", "missing.test": "not_found",
                                          "hang.test": "timeout"}, what="the three outcomes")
        failures = wait_until(lambda: len(rows := error_rows(node, "network_failure")) == 2 and rows,
                              what="one event per failing name")
        said = [json.loads(r["metadata"]) for r in failures]
        assert {m["name"]: m["outcome"] for m in said} == {"missing.test": "not_found",
                                                           "hang.test": "timeout"}
        assert all(r["error_type"] == "system_error" and r["severity"] == "error" for r in failures)
        probes = node.health()["system"]["dns"]["probes"]
        wait_until(lambda: node.health()["system"]["dns"]["probes"] >= probes + 3, what="probes go on")
        dns = node.health()["system"]["dns"]
        assert dns["lookups_still_running"] == 1                  # the hung one, never a pile of them
        assert stub.queries["hang.test"] <= 2                     # asked once (A and AAAA), left hanging
        assert dns["names"]["hang.test"]["running_s"] > 0.3 and dns["names"]["in-hosts.test"]["ms"] >= 0
        assert len(error_rows(node, "network_failure")) == 2       # one per episode
        stub.answers["missing.test"] = "10.1.1.1"                  # it resolves now
        node.wait_log(lambda e: e.get("message") == "DNS lookups recovered"
                      and e["host_name"] == "missing.test")
        probed = [json.loads(r["dns"]) for r in node.rows("system_metrics") if r["dns"]]
        assert probed and {"in-hosts.test", "missing.test", "hang.test"} <= set(probed[0])
        sample = wait_until(lambda: node.health()["host"]["dns"], what="a sample a probe ended in")
        assert sample["in-hosts.test"]["outcome"] == "ok"     # an object, as system.dns (was a string)
        text = node.request("GET", "/metrics").body.decode()
        assert 'otrace_dns_probe_success{name="in-hosts.test"} 1' in text
        assert 'otrace_dns_probe_success{name="hang.test"} 0' in text
        assert 'otrace_dns_probe_duration_seconds{name="in-hosts.test"}' in text
        assert node.stop() == 0                                    # a hung lookup does not hold the exit
    finally:
        stub.stop()


def test_a_dns_round_that_waited_for_a_hanging_lookup_does_not_put_the_next_later_in_process() -> None:
    """Rounds start every TRACE_DNS_INTERVAL: the wait for a lookup that hangs (up to
    TRACE_DNS_TIMEOUT) comes out of the interval, not on top of it."""
    probe = otrace.DnsProbe(otrace.Config(dns_interval=60.0, dns_probe=("a.test",)), events=None)
    began = probe.began = time.monotonic() - 5.0              # a round that waited 5 s
    delay = probe.next_delay()
    assert 60.0 - (time.monotonic() - began) <= delay <= 55.0
    probe.began = time.monotonic() - 90.0                     # one longer than the interval
    assert probe.next_delay() == 0.0


# -- /debug


def debug_node(run: Callable[..., Otrace], **env: str) -> Otrace:
    return run({"TRACE_DEBUG": "on", **env})


def test_debug_endpoints_are_off_unless_asked_for(svc: Otrace) -> None:
    for path in otrace.DEBUG_ROUTES:
        resp = svc.request("GET", path)
        assert resp.status == 404 and resp.json["error"] == f"no such path: {path}"
    assert svc.health()["system"]["debug"] is False


def test_debug_vars_and_threads(run: Callable[..., Otrace]) -> None:
    node = debug_node(run)
    assert node.post("/v1/traces", [trace(), trace()]).status == 202
    node.post("/v1/events", {"name": ""})                          # rejected
    node.wait_persisted(2)
    # persisted is counted just before the writer hands the unit back (queue_depth 0), and /debug/vars
    # is read after: the writer may not have got there yet on a busy machine
    wait_until(lambda: node.health()["queue_depth"] == 0, what="the queue done")
    data = node.request("GET", "/debug/vars").json
    assert (data["events_accepted"], data["events_persisted"], data["requests_rejected"]) == (2, 2, 1)
    assert data["events_received"] == 2 and data["events_refused"] == 0 and data["events_dropped"] == 0
    assert data["queue_depth"] == 0 and data["queue_capacity"] == 512 and data["rss_bytes"] > 1 << 20
    assert {"otrace-writer", "otrace-http", "MainThread"} <= set(data["thread_names"])
    assert data["threads"] == len(data["thread_names"]) and len(data["gc"]["collections"]) == 3
    assert data["pid"] == node.proc.pid and data["uptime_seconds"] > 0 and data["tracemalloc"] is False
    assert node.request("HEAD", "/debug/vars").body == b""
    stacks = node.request("GET", "/debug/threads")
    assert stacks.status == 200 and stacks.headers["content-type"].startswith("text/plain")
    text = stacks.body.decode()
    assert "Thread otrace-writer (ident" in text and "in next_work" in text and "in serve_forever" in text


def test_a_profile_under_load_leaves_ingest_free_and_ends_at_shutdown(run: Callable[..., Otrace]) -> None:
    node = debug_node(run, TRACE_SHUTDOWN_TIMEOUT="20s")
    profile: dict[str, Response] = {}

    def take() -> None:
        profile["answer"] = node.request("GET", "/debug/profile?seconds=60", timeout=90)

    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    wait_until(lambda: "otrace-debug" in node.request("GET", "/debug/vars").json["thread_names"],
               what="the profile under way")
    posted = 0
    for _ in range(50):        # load while it samples; a 503 (a busy machine's full queue) is sent again
        batch = [trace() for _ in range(20)]
        wait_until(lambda batch=batch: node.post("/v1/traces", batch).status == 202, timeout=30,
                   what="the batch accepted while the profile (60 s) samples")
        posted += 20
    assert node.wait_persisted(posted)["status"] == "ok"
    assert node.request("GET", "/debug/profile?seconds=1").status == 409      # one at a time
    assert "answer" not in profile                                 # still sampling: nothing waited on it
    node.signal(signal.SIGTERM)                                    # shutdown answers it with what it has
    taker.join(30)
    answer = profile["answer"]
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/plain")
    assert node.proc.wait(30) == 0
    lines = answer.body.decode().splitlines()
    counts = collections.Counter()
    for line in lines:
        stack, count = line.rsplit(" ", 1)
        counts[stack.split(";")[0]] += int(count)
    assert {"otrace-writer", "otrace-http", "MainThread"} <= set(counts)
    samples = int(answer.headers["x-profile-samples"])
    assert samples >= 1 and counts["otrace-writer"] == samples
    assert float(answer.headers["x-profile-seconds"]) < 60
    assert float(answer.headers["x-profile-cpu-seconds"]) > 0
    assert 0 < float(answer.headers["x-profile-overhead-percent"]) < 100


def test_a_profile_is_answered_and_bad_seconds_are_named(run: Callable[..., Otrace]) -> None:
    node = debug_node(run)
    for bad in ("0", "61", "abc", "nan", "-1", "inf"):
        resp = node.request("GET", f"/debug/profile?seconds={bad}")
        assert resp.status == 400 and resp.json["field"] == "seconds", (bad, resp)
    answer = node.request("GET", "/debug/profile?seconds=0.3")
    assert answer.status == 200
    first = answer.body.decode().splitlines()[0]
    assert first.rsplit(" ", 1)[1].isdigit() and ";" in first
    assert int(answer.headers["x-profile-hz"]) == otrace.PROFILE_HZ
    assert node.request("GET", "/debug/memory").status == 409                  # tracemalloc is off
    assert node.post("/debug/vars", {}).status == 405


def test_debug_memory_shows_the_top_allocations_with_tracemalloc(run: Callable[..., Otrace]) -> None:
    node = debug_node(run, TRACE_DEBUG_TRACEMALLOC="on")
    assert node.post("/v1/traces", [trace(input_text="x" * 1000) for _ in range(50)]).status == 202
    node.wait_persisted(50)
    resp = node.request("GET", "/debug/memory?top=5")
    assert resp.status == 200, resp
    data = resp.json
    assert len(data["top"]) == 5 and data["traced_bytes"] > 0 and data["frames_per_block"] == 1
    assert all(r["bytes"] > 0 and r["line"] >= 0 and r["file"] for r in data["top"])
    assert data["top"][0]["bytes"] >= data["top"][-1]["bytes"]
    assert node.request("GET", "/debug/memory?top=0").json["field"] == "top"
    assert node.request("GET", "/debug/vars").json["tracemalloc"] is True


def test_debug_needs_the_token_and_a_loopback_client(run: Callable[..., Otrace]) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    node = debug_node(run, TRACE_INGEST_TOKEN=token, TRACE_HOST="0.0.0.0")
    for path in ("/debug/vars", "/debug/threads", "/debug/profile?seconds=0.1"):
        assert node.request("GET", path).status == 401
        assert node.request("GET", path, headers={"Authorization": f"Bearer {token}"}).status == 200
    addresses = [a for a in non_loopback_addresses() if ":" not in a]
    if not addresses:
        pytest.skip("this machine has no IPv4 address but loopback")
    conn = http.client.HTTPConnection(addresses[0], node.port, timeout=10)
    resp = node.request("GET", "/debug/vars", headers={"Authorization": f"Bearer {token}"}, conn=conn)
    assert resp.status == 403 and "loopback" in resp.json["error"]
    assert node.request("GET", "/health", conn=http.client.HTTPConnection(addresses[0], node.port,
                                                                          timeout=10)).status == 200


def test_schema_has_the_v2_tables_and_a_wide_metrics_insert_fits(tmp_path: Path) -> None:
    otrace.open_database(str(tmp_path / "x.db"))
    with contextlib.closing(otrace.connect(str(tmp_path / "x.db"))) as conn:
        for table in ("custom_events", "process_samples", "system_metrics"):
            columns = [name for _, name, *_ in conn.execute(f"PRAGMA table_info({table})")]
            assert set(otrace.TABLES[table].columns) <= set(columns), table
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        rows = [tuple(f"m-{i}" if c == "trace_id" else 0 for c in otrace.METRICS.columns) for i in range(40)]
        with otrace.transaction(conn):
            assert otrace.insert_rows(conn, "system_metrics", rows) == 40
    assert "process_samples" in otrace.EVENT_TABLES and "custom_events" in otrace.EVENT_TABLES


# ------------------------------------------------------------------------------ otlp push: signals


def test_push_signals_are_some_of_three_and_nothing_else() -> None:
    assert otrace.Config().push_signals == ("traces", "metrics", "logs")
    assert otrace.Config.from_env({"TRACE_PUSH_SIGNALS": " LOGS, traces,"}).push_signals == ("traces", "logs")
    for bad in ("", " , ", "traces,spans"):
        with pytest.raises(otrace.SettingError) as refused:
            otrace.Config.from_env({"TRACE_PUSH_SIGNALS": bad})
        assert "TRACE_PUSH_SIGNALS=" in str(refused.value)
        assert "one or more of traces, metrics, logs" in str(refused.value)


def test_a_traces_only_backend_gets_traces_alone_and_every_cycle_succeeds(tmp_path: Path,
                                                                          run: Callable[..., Otrace],
                                                                          receiver: Receiver) -> None:
    """A backend that takes only traces (Arize Phoenix answers 405 on /v1/logs and /v1/metrics) with
    TRACE_PUSH_SIGNALS=traces: no error, host sample or loss report is sent, so no cycle fails (with a
    breaker that one failed cycle opens), and what is not pushed is not counted as waiting."""
    def traces_only(_: Receiver, request: dict[str, Any]) -> Any:
        if "resourceSpans" in (request["json"] or {}):
            return 200
        return 405, {"Content-Type": "application/json"}, '{"detail": "Method Not Allowed"}'

    receiver.default = traces_only
    db = tmp_path / "traces-only.db"
    run(db=db).stop()
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:      # a loss to report: it would go first
        conn.execute("INSERT INTO retention_ledger (pass_id, at, table_name, reason, deleted, "
                     "unsynced_deleted) VALUES ('p', 1, 'error_events', 'pressure_unpushed', 3, 3)")
    node = run(otlp_push_env(receiver, TRACE_PUSH_SIGNALS="traces", TRACE_PUSH_BREAKER_THRESHOLD="1",
                             TRACE_METRICS_INTERVAL="100ms"), db=db)
    first = post_some(node, 3)                                           # 3 traces and an error
    wait_synced(node, first[:3])
    wait_until(lambda: node.query("SELECT count(*) FROM system_metrics")[0][0] >= 1, what="a host sample")
    later = node.post("/v1/traces", [trace() for _ in range(2)]).json["trace_ids"]
    wait_synced(node, later)
    push = node.health()["push"]
    assert (push["signals"], push["breaker"], push["consecutive_failures"]) == (["traces"], "closed", 0)
    assert node.health()["unsynced_count"] == 0
    assert all("resourceSpans" in r["json"] and r["answered"] == 200 for r in receiver.requests)
    assert synced(node)[first[3]] == 0                                   # the error stays local
    assert node.query("SELECT reported_at FROM retention_ledger") == [(None,)]
