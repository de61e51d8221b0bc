"""Processes, network, DNS and /debug: what each new sampler costs, the sidecar idle with all of it on
against otrace as it was before them, and the profiler's own overhead, measured in the same run.

    python bench/system.py [--processes 500] [--samples 100] [--idle 65] [--seconds 5]

1. With at least --processes processes on the box (sleepers started here, each with a command line of
   a few arguments, and measured once they are older than a minute, as a box's processes mostly are:
   a younger one is looked at again at each sample, for an exec that would make it the gateway), the
   CPU time (process_time, so lookup threads count) of one call of:
   - a scan of the process table (ProcessSampler.tick: every /proc/<pid>/stat, the zombie count, the
     top rows in full, offered to a queue),
   - the process and network part of a host sample (SystemWatch.read and .observe: the pids, the
     gateway's stat, /proc/net),
   - a DNS probe of the default names (DnsProbe.tick, its lookup threads included),
   beside the host sample otrace already took (HostReader snapshot and row). Each is also given as a
   share of one core at its default interval. Then the TCP-state dump alone, as a sampler's look
   finds it (cold, each after a pause): the kernel walks its whole table of established sockets,
   sized by the machine's memory, so it is given here and, where the kernel lets a new network
   namespace have a smaller table (6.1+, root), in one sized as on a 1 GiB machine.
2. Idle for --idle seconds with those processes still there: otrace with everything on (defaults, and
   TRACE_DEBUG=on) beside otrace as it was before (otrace.py of BEFORE, from git), both started from
   their compiled modules: RSS and CPU.
3. wrk posting to /v1/traces on 4 connections for --seconds, with and without a /debug/profile running
   meanwhile (twice each, alternating): 202s/s, p99, and the profiler thread's own CPU (its
   X-Profile-CPU-Seconds).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import py_compile
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (
    ROOT,
    Usage,
    free_port,
    save,
    small_tcp_table,
    start_otrace,
    stop,
    stop_all,
    table,
    wait_listening,
    wrk,
)
from metrics import host_sampler, per_call

import otrace

BEFORE = "e7a636146bbc2970131784e420b75f6c3bfc3fc3"     # main before processes, network, DNS and /debug
TRACE = {"provider": "openai", "model": "gpt-5", "input_text": "x" * 1000, "output_text": "y" * 1000,
         "prompt_tokens": 250, "completion_tokens": 240, "cost_usd": 0.0031, "latency_ms": 812}
EVERYTHING = {"TRACE_DEBUG": "on"}                       # the rest is on by default


def crowd(at_least: int) -> list[subprocess.Popen]:
    """Sleepers until /proc lists at least `at_least` processes."""
    have = sum(entry.name.isdigit() for entry in Path("/proc").iterdir())
    return [subprocess.Popen(["sleep", "3600", f"{i}s"]) for i in range(max(0, at_least - have))]


def samplers(samples: int) -> dict[str, float]:
    """CPU seconds per call of each sampler, on this machine's /proc."""
    config = otrace.Config.from_env({"TRACE_DNS_TIMEOUT": "5s"})
    procfs = Path("/proc")
    with tempfile.TemporaryDirectory() as tmp:
        host_sample = host_sampler(otrace.HostReader(procfs, Path("/sys"), tmp))

        processes = otrace.ProcessSampler(config, otrace.EventQueue(100_000, 50))   # room for every sample
        process_sample = processes.tick
        process_sample()
        watch = otrace.SystemWatch(config, logging.getLogger("bench"))

        def system_part() -> None:
            watch.observe(*watch.read(), {})

        system_part()
        dns = otrace.DnsProbe(config, otrace.EventQueue(100_000, 50))
        return {"host": per_call(host_sample, samples), "processes": per_call(process_sample, samples),
                "system": per_call(system_part, samples), "dns": per_call(dns.tick, max(5, samples // 20)),
                "process_count": processes.table.count}


EHASH = Path("/proc/sys/net/ipv4/tcp_ehash_entries")
SMALL_EHASH = 8192                   # the kernel sizes its TCP table at a bucket per 128 KiB of memory
DUMP = ("import os, socket, sys, time; sys.path.insert(0, {root!r}); import otrace\n"
        "took = []\n"
        "for _ in range({samples}):\n"
        "    time.sleep(0.05)\n"
        "    started = time.thread_time()\n"
        "    otrace.tcp_states_netlink([socket.AF_INET])\n"
        "    took.append(time.thread_time() - started)\n"
        "ehash = open({ehash!r}).read().strip() if os.path.exists({ehash!r}) else '?'\n"
        "print(sum(took) / len(took), ehash)")


def tcp_dumps(samples: int) -> dict[str, float | str | None]:
    """CPU seconds of one TCP-state dump (the largest part of a host sample on a large machine: the
    kernel walks its whole table of established sockets, sized by the machine's memory), each after a
    50 ms pause as a sampler's look comes cold: in this network namespace, and, where the kernel can
    size a new namespace's table (6.1+, as root), in one with a 1 GiB machine's table."""
    run = [sys.executable, "-c", DUMP.format(root=str(ROOT), samples=samples, ehash=str(EHASH))]
    here = subprocess.run(run, capture_output=True, text=True, check=True).stdout.split()
    got: dict[str, float | str | None] = {"host_s": float(here[0]), "host_buckets": here[1],
                                          "small_s": None, "small_buckets": None}
    try:
        small = small_tcp_table(run, SMALL_EHASH, capture_output=True, text=True)
    except OSError:                                        # not root, an older kernel, no unshare
        return got
    if small.returncode == 0:
        got["small_s"], got["small_buckets"] = float(small.stdout.split()[0]), small.stdout.split()[1]
    return got


def start_before(tmp: Path) -> tuple[subprocess.Popen, int] | None:
    """otrace.py of BEFORE, compiled, on a free port with its own database; None without git."""
    source = tmp / "before"
    source.mkdir()
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE}:otrace.py"], capture_output=True,
                           check=False)
    if shown.returncode:
        return None
    (source / "otrace.py").write_bytes(shown.stdout)
    py_compile.compile(str(source / "otrace.py"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")} | {
        "TRACE_PORT": str(port), "TRACE_DB_PATH": str(source / "otrace.db"), "TRACE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "otrace"], env=env, cwd=source, stdout=subprocess.DEVNULL)
    wait_listening(port)
    return proc, port


def idle(seconds: float) -> dict[str, dict[str, float]]:
    """RSS and CPU share of otrace with everything on, and of otrace before, side by side."""
    with tempfile.TemporaryDirectory() as tmp:
        now = Path(tmp) / "now"
        now.mkdir()
        procs = {"now": start_otrace(now, EVERYTHING)[0]}
        before = start_before(Path(tmp))
        if before:
            procs["before"] = before[0]
        try:
            time.sleep(1.0)
            first, started = {n: Usage.of(p.pid) for n, p in procs.items()}, time.monotonic()
            time.sleep(seconds)
            last, took = {n: Usage.of(p.pid) for n, p in procs.items()}, time.monotonic() - started
        finally:
            stop_all(procs.values())
    return {name: {"rss_mib": last[name].rss_bytes / 2**20,
                   "cpu_pct": 100 * (last[name].cpu_s - first[name].cpu_s) / took} for name in procs}


def profiled(seconds: float, rounds: int = 2) -> dict[str, float]:
    """wrk on 4 connections without, then with, a profile running in otrace; `rounds` times each,
    alternating, and averaged (this machine's noise is of the size of what is measured)."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_otrace(Path(tmp), {"TRACE_DEBUG": "on", "TRACE_METRICS_INTERVAL": "off",
                                              "TRACE_PROC_INTERVAL": "off", "TRACE_DNS_PROBE": ""})
        url, body = f"http://127.0.0.1:{port}/v1/traces", json.dumps(TRACE)
        bare, during, answers = [], [], []
        try:
            wrk(url, body, 4, 1.0)                                    # warm up
            for _ in range(rounds):
                bare.append(wrk(url, body, 4, seconds))
                answer: dict[str, object] = {}

                def take(answer: dict[str, object] = answer) -> None:
                    profile = f"http://127.0.0.1:{port}/debug/profile?seconds={seconds + 2}"
                    with urllib.request.urlopen(profile, timeout=seconds + 30) as resp:
                        answer["headers"] = dict(resp.headers)
                        answer["lines"] = len(resp.read().splitlines())

                taker = threading.Thread(target=take)
                taker.start()
                time.sleep(0.5)
                during.append(wrk(url, body, 4, seconds))
                taker.join()
                answers.append(answer)
        finally:
            stop(proc)
    headers = [a["headers"] for a in answers]
    return {"rps": sum(r.requests_per_s for r in bare) / rounds,
            "p99_ms": sum(r.p99_ms for r in bare) / rounds,
            "profiled_rps": sum(r.requests_per_s for r in during) / rounds,
            "profiled_p99_ms": sum(r.p99_ms for r in during) / rounds,
            "profile_s": sum(float(h["X-Profile-Seconds"]) for h in headers),
            "profile_cpu_s": sum(float(h["X-Profile-CPU-Seconds"]) for h in headers),
            "stacks": max(a["lines"] for a in answers),
            "samples": sum(int(h["X-Profile-Samples"]) for h in headers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=500)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--idle", type=float, default=65, help="idle window; past 60 s it holds a process "
                                                               "sample")
    parser.add_argument("--seconds", type=float, default=5, help="wrk run, with and without a profile")
    args = parser.parse_args()
    logging.disable(logging.WARNING)          # the samplers' own alerts about this box are not results
    sleepers = crowd(args.processes)
    crowded = time.monotonic()
    try:
        dumps = tcp_dumps(args.samples)
        time.sleep(max(0.0, otrace.EXEC_WINDOW + 1 - (time.monotonic() - crowded)))  # a box's steady state
        cost = samplers(args.samples)
        rest = idle(args.idle)
    finally:
        stop_all(sleepers)
    load = profiled(args.seconds)
    config = otrace.Config()
    share = {"host": 100 * cost["host"] / config.metrics_interval,
             "processes": 100 * cost["processes"] / config.proc_interval,
             "system": 100 * cost["system"] / config.metrics_interval,
             "dns": 100 * cost["dns"] / config.dns_interval}
    n = cost["process_count"]
    rows = [[f"host sample (before this work; {n} processes on the box)", f"{cost['host'] * 1e6:.0f}",
             "15 s", f"{share['host']:.4f} %"],
            ["process table scan: every stat, zombies, the top rows", f"{cost['processes'] * 1e6:.0f}",
             "60 s", f"{share['processes']:.4f} %"],
            ["process and network part of a host sample", f"{cost['system'] * 1e6:.0f}", "15 s",
             f"{share['system']:.4f} %"]]
    for key, label in (("host", "its TCP-state dump, cold, in this machine's TCP table"),
                       ("small", "the same in a network namespace with a 1 GiB machine's table")):
        if dumps[f"{key}_s"] is not None:
            rows.append([f"{label} ({dumps[f'{key}_buckets']} buckets)", f"{dumps[f'{key}_s'] * 1e6:.0f}",
                         "15 s", f"{100 * dumps[f'{key}_s'] / config.metrics_interval:.4f} %"])
    rows.append([f"DNS probe of {', '.join(config.dns_probe)}", f"{cost['dns'] * 1e6:.0f}", "60 s",
                 f"{share['dns']:.4f} %"])
    markdown = table(["sampler", "CPU µs per call", "default interval", "share of a core"], rows)
    everything = sum(share[key] for key in ("processes", "system", "dns"))
    markdown += (f"\n\nThe process sample is PROC-01's cost (goal < 0.05 % of a core at 60 s): "
                 f"{share['processes']:.4f} %. All three together, a minute at the defaults: "
                 f"{everything:.4f} % of a core, beside {share['host']:.4f} % for the host sample.\n\n")
    markdown += table([f"otrace, idle {args.idle:.0f} s with {n} processes", "RSS MiB", "CPU % of a core"],
                      [[name, f"{r['rss_mib']:.1f}", f"{r['cpu_pct']:.3f}"] for name, r in rest.items()])
    overhead = 100 * load["profile_cpu_s"] / load["profile_s"]
    markdown += (f"\n\nwrk, 4 connections, {args.seconds:.0f} s: {load['rps']:,.0f} 202s/s (p99 "
                 f"{load['p99_ms']:.2f} ms) without a profile, {load['profiled_rps']:,.0f} (p99 "
                 f"{load['profiled_p99_ms']:.2f} ms) while /debug/profile sampled at {otrace.PROFILE_HZ} "
                 f"Hz; the profiler thread used {load['profile_cpu_s']:.3f} s of CPU in "
                 f"{load['profile_s']:.1f} s ({overhead:.2f} % of a core; {load['samples']} samples, "
                 f"{load['stacks']} distinct stacks).")
    save("system", markdown, {"cost": cost, "tcp_dumps": dumps, "share_pct": share,
                              "all_share_pct": everything, "idle": rest, "idle_seconds": args.idle,
                              "profile": load, "profile_overhead_pct": overhead})


if __name__ == "__main__":
    main()
