"""Shared pieces of otrace's benchmarks: processes, /proc readings, wrk, and the report table."""

from __future__ import annotations

import json
import os
import platform
import py_compile
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OTRACE = ROOT / "otrace.py"
RESULTS = ROOT / "bench" / "results"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Usage:
    """CPU seconds and memory of one process, read from /proc."""

    cpu_s: float
    rss_bytes: int
    peak_rss_bytes: int

    @classmethod
    def of(cls, pid: int) -> Usage:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1]) * 1024
        peak = int(re.search(r"VmHWM:\s+(\d+)", status)[1]) * 1024
        return cls((int(fields[11]) + int(fields[12])) / TICKS, rss, peak)


def median_run(runs: list[dict[str, float]], key: str) -> dict[str, float]:
    """The round whose `key` is the median, its other figures with it: of an even number of rounds the
    upper middle one, as statistics.median_high takes for the baselines' plain figures."""
    return sorted(runs, key=lambda run: run[key])[len(runs) // 2]


def wait_listening(port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_otrace(tmp: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """otrace on a free port with a database in `tmp`; returns the process and its port."""
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")}
    full |= {"TRACE_PORT": str(port), "TRACE_DB_PATH": str(tmp / "otrace.db"), "TRACE_LOG_LEVEL": "warning"}
    full |= env or {}
    py_compile.compile(str(OTRACE))                           # as `make run` starts it: compiled,
    proc = subprocess.Popen([sys.executable, "-m", "otrace"], env=full, cwd=OTRACE.parent,
                            stdout=subprocess.DEVNULL)        # as a module
    wait_listening(port)
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_all(procs: Iterable[subprocess.Popen]) -> None:
    for proc in procs:
        stop(proc)


def threads_cpu_s(pid: int) -> float:
    """CPU seconds of a process's live threads to the nanosecond (schedstat), where /proc/<pid>/stat
    counts in 10 ms ticks; a thread that ends in between is not counted."""
    return sum(int((task / "schedstat").read_text().split()[0])
               for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9


def side_by_side(procs: dict[str, subprocess.Popen], settle: float, seconds: float,
                 precise: bool = False) -> dict[str, dict[str, float]]:
    """Processes left idle together for `seconds` after `settle`: each one's CPU over the window
    (% of a core) and RSS at its end. Stops them all. `precise`: CPU from threads_cpu_s, for a window
    too short for ticks, where no thread starts or ends."""
    cpu = threads_cpu_s if precise else (lambda pid: Usage.of(pid).cpu_s)
    try:
        time.sleep(settle)
        before, started = {n: cpu(p.pid) for n, p in procs.items()}, time.perf_counter()
        time.sleep(seconds)
        after, wall = {n: cpu(p.pid) for n, p in procs.items()}, time.perf_counter() - started
        rss = {n: Usage.of(p.pid).rss_bytes for n, p in procs.items()}
    finally:
        stop_all(procs.values())
    return {n: {"cpu_pct": 100 * (after[n] - before[n]) / wall, "rss_mib": rss[n] / 2**20} for n in procs}


def health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
        return json.load(resp)


def require(tool: str, package: str) -> str:
    """The path of `tool`, installing its Debian package first if it is missing and we are root."""
    found = shutil.which(tool)
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", package], check=False, capture_output=True)
        if not shutil.which(tool):
            subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-q", package], check=True, capture_output=True)
        found = shutil.which(tool)
    if not found:
        sys.exit(f"bench: needs {tool} (Debian package {package})")
    return found


@dataclass
class Load:
    """What one wrk run measured."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    errors: int
    requests: int


def wrk(url: str, body: str, connections: int, seconds: float) -> Load:
    """Keep-alive POSTs of `body` from `connections` connections for `seconds`, measured by wrk."""
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)  # noqa: SIM115
    with script:
        script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                     f"wrk.body = {json.dumps(body)}\n")
    command = [require("wrk", "wrk"), f"-t{min(2, connections)}", f"-c{connections}",
               f"-d{max(1, round(seconds))}s", "--latency", "-s", script.name, url]
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        Path(script.name).unlink()

    def latency(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    requests = int(re.search(r"(\d+) requests in", out)[1])
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = int(m[1]) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    return Load(float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]), latency("50%"), latency("99%"),
                non_2xx, errors, requests)


def small_tcp_table(command: list[str], buckets: int, **run: Any) -> subprocess.CompletedProcess:
    """`command` in a new network namespace (its loopback up) whose TCP table has `buckets` buckets:
    a host sample's TCP-state dump walks the whole table, which the kernel sizes at a bucket per 128 KiB
    of memory (8,192 on a 1 GiB machine). Root and Linux 6.1+; OSError where either is missing."""
    child = Path("/proc/sys/net/ipv4/tcp_child_ehash_entries")
    before = child.read_text()
    child.write_text(str(buckets))
    try:
        return subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *command],
                              check=False, **run)
    finally:
        child.write_text(before)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, markdown: str, data: dict[str, Any]) -> Path:
    """Write the result as markdown and JSON under bench/results, and print the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    header = f"## {name} ({stamp}, {machine()})\n\n"
    path = RESULTS / f"{name}.md"
    path.write_text(header + markdown + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"date": stamp, "machine": machine(), **data}, indent=2))
    print(header + markdown)
    return path
