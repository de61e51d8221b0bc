"""Idle footprint with every feature on: otrace's RSS and CPU beside a bare stdlib server's.

    python bench/idle.py [--idle 300] [--only all|push|log]

otrace is started as `make run` starts it (compiled, as a module) with everything a deployment beside
the gateway turns on, each at its default: the gateway log (a directory holding a captured OpenClaw
log, read to its end first), OpenClaw's session store (a captured state directory), the OTLP port,
host metrics, the process table, DNS probes, and push configured (otrace's JSON to a local sink that
answers 200). The baseline is a stdlib ThreadingHTTPServer that serves nothing, started in the same
run from the stdlib alone; a second one, the floor, also imports what otrace cannot do without: sqlite3
and the design card's urllib3 and python-json-logger, to show how much of the
difference is otrace's own.
All settle for 10 s; then RSS is read at the end of --idle seconds and CPU over them. The default
window is the push interval's default, 5 min, so the idle CPU is a steady state's: every loop runs in
it at its own pace (push at 5 s and 5 min 5 s, retention at 5 min, metrics 20 times, and so on).

Further rows, each against the same bare server: everything but the process table and DNS probes
(the seed's v2 samplers), push configured and nothing else (to see what the push client's imports
cost), the log alone (a tailer following an idle file), and every optional feature off.

--tcp-table BUCKETS runs it all in a new network namespace whose TCP table has that many buckets
(root, Linux 6.1+; results saved as idle-tcp-BUCKETS): a host sample's TCP-state dump walks the whole
table, which the kernel sizes at a bucket per 128 KiB of memory, so a large machine's CPU figures
are not a small one's; 8192 is a 1 GiB machine's table.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    free_port,
    save,
    side_by_side,
    small_tcp_table,
    start_otrace,
    stop,
    stop_all,
    table,
    wait_listening,
)

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "openclaw"
QUIET = {"TRACE_METRICS_INTERVAL": "off", "TRACE_PROC_INTERVAL": "off", "TRACE_DNS_PROBE": "",
         "TRACE_OPENCLAW_STATE_DIR": "off", "TRACE_OTLP_PORT": "0", "TRACE_GATEWAY_MATCH": "off"}


BARE = ("import sys; from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer; "
        "ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), BaseHTTPRequestHandler).serve_forever()")
FLOOR = "import sqlite3, urllib3, pythonjsonlogger.json; " + BARE


def start_bare(code: str = BARE) -> subprocess.Popen:
    """The stdlib server and nothing else: no bench module imported, so nothing compiled at start."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)])
    wait_listening(port)
    return proc


def sink() -> tuple[subprocess.Popen, int]:
    """bench/push.py's receiver: answers every push 200."""
    port = free_port()
    here = str(Path(__file__).resolve().parent)
    proc = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); "
                             f"import push; push.serve({port})"])
    wait_listening(port)
    return proc, port


def setups(work: Path, sink_port: int) -> dict[str, dict[str, str]]:
    logs, state = work / "logs", work / "state"
    logs.mkdir()
    shutil.copy(FIXTURES / "gateway-2026.9.6-debug.log", logs / "openclaw-2026-11-30.log")
    shutil.copytree(FIXTURES / "state-2026.9.6", state)
    push = {"TRACE_PUSH_ENDPOINT": f"http://127.0.0.1:{sink_port}/ingest"}
    everything = {"TRACE_LOG_PATH": str(logs), "TRACE_OPENCLAW_STATE_DIR": str(state),
                  "TRACE_OTLP_PORT": str(free_port()), **push}
    return {"all": everything,
            "core": {**everything, "TRACE_OTLP_PORT": str(free_port()), "TRACE_PROC_INTERVAL": "off",
                     "TRACE_DNS_PROBE": "", "TRACE_GATEWAY_MATCH": "off"},
            "push": {**QUIET, **push},
            "log": {**QUIET, "TRACE_LOG_PATH": str(logs)},
            "none": dict(QUIET)}


def measure(names: list[str], seconds: float) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="otrace-idle-") as tmp:
        work = Path(tmp)
        receiver, port = sink()
        procs: dict[str, subprocess.Popen] = {"bare": start_bare(), "floor": start_bare(FLOOR)}
        try:
            for name, env in setups(work, port).items():
                if name in names:
                    (work / name).mkdir()
                    procs[name] = start_otrace(work / name, env)[0]
            return side_by_side(procs, 10.0, seconds)       # startup and the first reads settle first
        finally:
            stop_all(procs.values())
            stop(receiver)


LABELS = {"all": "everything on: log, session store, OTLP port, metrics, processes, DNS, push",
          "core": "everything on but the process table and DNS probes",
          "push": "push configured, nothing else", "log": "following an idle log file, nothing else",
          "none": "every optional feature off"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=float, default=300)
    parser.add_argument("--only", choices=sorted(LABELS))
    parser.add_argument("--tcp-table", type=int, metavar="BUCKETS")
    parser.add_argument("--name", default="idle", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tcp_table:
        at = sys.argv.index("--tcp-table")            # this benchmark again, in that namespace
        sys.exit(small_tcp_table([sys.executable, __file__, *sys.argv[1:at], *sys.argv[at + 2:], "--name",
                                  f"idle-tcp-{args.tcp_table}"], args.tcp_table).returncode)
    names = [args.only] if args.only else list(LABELS)
    got = measure(names, args.idle)
    bare, floor = got["bare"], got["floor"]
    rows = [["bare ThreadingHTTPServer (baseline)", f"{bare['rss_mib']:.1f}", "1.00",
             f"{bare['cpu_pct']:.3f}"],
            ["the floor: that server importing sqlite3, urllib3, python-json-logger",
             f"{floor['rss_mib']:.1f}", f"{floor['rss_mib'] / bare['rss_mib']:.2f}",
             f"{floor['cpu_pct']:.3f}"]]
    rows += [[f"otrace, {LABELS[name]}", f"{got[name]['rss_mib']:.1f}",
              f"**{got[name]['rss_mib'] / bare['rss_mib']:.2f}**", f"{got[name]['cpu_pct']:.3f}"]
             for name in names]
    markdown = table([f"idle {args.idle:.0f} s", "RSS MiB", "RSS ratio", "CPU % of a core"], rows)
    markdown += (f"\n\nCPU is counted in the kernel's 10 ms ticks: over {args.idle:.0f} s one tick is "
                 f"{1 / args.idle:.3f} % of a core.")
    for line in markdown.splitlines():
        print(" ", line)
    save(args.name, markdown, {"idle_s": args.idle, **got})


if __name__ == "__main__":
    main()
