"""Every benchmark, one after the other, and one summary table: what `make bench` runs.

    python bench/run_all.py [--quick]

Each benchmark runs as its own process with a budget that keeps the whole run near 15 minutes on
2 cores, and saves its own table under bench/results/. This script then reads their JSON and writes
bench/results/summary.md: one row per measurement, otrace against the baseline measured in the same
run, the goal where an issue set one, and whether it was met. --quick shortens every run (a smoke
check of the benchmarks themselves, not numbers to quote).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, table

BENCH = Path(__file__).resolve().parent

RUNS: dict[str, tuple[list[str], list[str]]] = {    # name: (full budget, --quick budget)
    "storage": ([], ["--rows", "5000"]),
    "metrics": ([], ["--samples", "200"]),
    "push": ([], ["--rows", "20000", "--rounds", "1"]),
    "logtail": (["--lines", "50000", "--idle", "60"], ["--lines", "5000", "--rounds", "1", "--idle", "3"]),
    "session_store": (["--entries", "100000", "--idle", "30"], ["--entries", "5000", "--idle", "3"]),
    "ingest": (["--seconds", "5", "--idle", "60"], ["--seconds", "1", "--rounds", "1", "--idle", "3"]),
    "month": ([], ["--scale", "200", "--cleanup-mib", "20"]),
    "peers": (["--seconds", "10", "--window", "60"], ["--seconds", "2", "--window", "5"]),
    "report": ([], ["--mib", "20", "--runs", "2"]),
    "otlp": (["--seconds", "2", "--drain", "60"], ["--seconds", "1", "--drain", "10"]),
    "system": ([], ["--processes", "200", "--samples", "10", "--idle", "3", "--seconds", "1"]),
    "otlp_push": ([], ["--traces", "100", "--spans", "5000", "--late", "5"]),
    "idle": (["--idle", "300"], ["--idle", "3"]),
}


def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def verdict(met: bool) -> str:
    return "yes" if met else "**no**"


def summary() -> list[list[str]]:
    """Rows of the summary: measurement, otrace, baseline, ratio, goal, met."""
    rows: list[list[str]] = []
    ingest = load("ingest")
    for level in ingest["levels"]:
        ours, bare, n = level["otrace"], level["bare"], level["connections"]
        goal = {4: 0.9, 64: 1.0}.get(n)
        persisted = ours["persisted"] / ingest["seconds"]
        accepted = ours.get("accepted_rps", ours["rps"])
        rows.append([f"ingest 202s/s, {n} connection{'s' * (n > 1)} (2 KB trace; {persisted:,.0f} "
                     f"persisted/s, {ours['refused']} refused)", f"{accepted:,.0f}",
                     f"{bare['rps']:,.0f} bare stdlib 202 server",
                     f"{level['ratio']:.2f}", f"≥ {goal:.2f}" if goal else "",
                     verdict(level["ratio"] >= goal) if goal else ""])
    for level in ingest["levels"]:
        n = level["connections"]
        if n in (4, 64) and "bare_store" in level:      # the goals' levels (older results lack it)
            rows.append([f"ingest 202s/s, {n} connection{'s' * (n > 1)}, against a server that stores each "
                         "event", f"{level['otrace'].get('accepted_rps', level['otrace']['rps']):,.0f}",
                         f"{level['bare_store']['rps']:,.0f} bare stdlib server, a sqlite3 commit a request",
                         f"{level['store_ratio']:.2f}", "", ""])
    steady, idle = ingest["steady_100"], ingest["idle"]
    bare_steady = ingest.get("steady_100_bare")
    requests = f", {steady['requests']:,} requests" if "requests" in steady else ""
    rows.append([f"ingest p99 at 100 events/s (one connection{requests})", f"{steady['p99_ms']:.1f} ms",
                 f"{bare_steady['p99_ms']:.1f} ms bare stdlib 202 server" if bare_steady else "",
                 f"{steady['p99_ms'] / bare_steady['p99_ms']:.2f}" if bare_steady else "", "≤ 5 ms",
                 verdict(steady["p99_ms"] <= 5)])
    if beside := ingest.get("steady_100_otlp"):        # older results lack it
        rows.append([f"ingest p99 at 100 events/s while another client posts 1 MB OTLP requests back to "
                     f"back ({beside['otlp_exports']} in {beside['requests'] / 100:.0f} s; "
                     f"{beside['refused']:,} of the events answered 503)", f"{beside['p99_ms']:.1f} ms",
                     f"{steady['p99_ms']:.1f} ms otrace without them",
                     f"{beside['p99_ms'] / steady['p99_ms']:.2f}", "", ""])
    rows.append([f"idle RSS, metrics every 15 s ({idle['seconds']:.0f} s)", f"{idle['rss_mb']:.1f} MiB",
                 f"{idle['bare_rss_mb']:.1f} MiB bare stdlib server",
                 f"{idle['rss_mb'] / idle['bare_rss_mb']:.2f}", "≤ 25 MB",
                 verdict(idle["rss_mb"] * 2**20 <= 25e6)])
    rows.append(["idle CPU", f"{idle['cpu_pct']:.3f} % of a core", f"{idle['bare_cpu_pct']:.3f} %",
                 "", "", ""])
    storage = load("storage")
    rows.append(["writer rows/s (50-row transactions)", f"{storage['otrace writer']['rows_per_s']:,.0f}",
                 f"{storage['raw sqlite3 executemany']['rows_per_s']:,.0f} raw executemany",
                 f"{storage['ratio']:.2f}", "", ""])
    push = load("push")
    grow = (push["rss_peak"] - push["rss_idle"]) / 2**20
    rows.append([f"push events/s, {push['rows']:,}-row backlog", f"{push['otrace_events_per_s']:,.0f}",
                 f"{push['bare_events_per_s']:,.0f} bare urllib3 client", f"{push['ratio']:.2f}", "≥ 0.80",
                 verdict(push["ratio"] >= 0.8)])
    rows.append(["RSS growth while pushing the backlog", f"{grow:.0f} MiB", "", "", "≤ 30 MB",
                 verdict(grow * 2**20 <= 30e6)])
    metrics = load("metrics")
    rows.append(["host sample CPU", f"{metrics['sample_cpu_s'] * 1e6:.0f} µs",
                 f"{metrics['baseline_cpu_s'] * 1e6:.0f} µs reading the same files",
                 f"{metrics['sample_cpu_s'] / metrics['baseline_cpu_s']:.2f}×",
                 "≤ 0.05 % of a core at 15 s", verdict(metrics["share_pct"] <= 0.05)
                 + f" ({metrics['share_pct']:.4f} %)"])
    logtail = load("logtail")
    for what, run, goal in (("the sample: a line of each kind", logtail, True),
                            ("the sample, its times rising as a real log's", logtail.get("rising"), False),
                            ("a real debug log as written", logtail.get("debug_log"), False)):
        if not run:
            continue
        ours = f"{run['lines_per_s']:,.0f}"
        if "to_end_lines_per_s" in run:                 # results from before the pace was measured lack it
            ours += f" ({run['to_end_lines_per_s']:,.0f} to the last commit)"
        rows.append([f"gateway log lines/s catching up ({what})", ours,
                     f"{run['bare_lines_per_s']:,.0f} bare read + json.loads", f"{run['ratio']:.2f}",
                     "≥ 0.25" if goal else "", verdict(run["ratio"] >= 0.25) if goal else ""])
        if "store_ratio" in run:                        # results from before the storing baseline lack it
            rows.append([f"gateway log lines/s catching up ({what}), against a loop that stores the same "
                         "rows", f"{run['lines_per_s']:,.0f}", f"{run['bare_store_lines_per_s']:,.0f} bare "
                         "read + json.loads + raw sqlite3 executemany", f"{run['store_ratio']:.2f}", "", ""])
    without, following = logtail["idle"]["no log (baseline)"], logtail["idle"]["following an idle file"]
    rows.append(["CPU following an idle log file", f"{following['cpu_pct']:.3f} % of a core",
                 f"{without['cpu_pct']:.3f} % without the log", "", "≤ 0.01 %",
                 verdict(following["cpu_pct"] <= 0.01)])
    rows.append(["RSS following an idle log file", f"{following['rss_mib']:.1f} MiB",
                 f"{without['rss_mib']:.1f} MiB without the log",
                 f"{following['rss_mib'] / without['rss_mib']:.2f}", "no more than without (± 0.25 MiB)",
                 verdict(following["rss_mib"] <= without["rss_mib"] + 0.25)])
    store = load("session_store")
    ours = f"{store['entries_per_s']:,.0f}"
    if "to_end_entries_per_s" in store:                 # results from before the pace was measured lack it
        ours += f" ({store['to_end_entries_per_s']:,.0f} to the end)"
    rows.append([f"OpenClaw store catch-up entries/s ({store['entries']:,} entries, "
                 f"{store['calls']:,} calls)", ours,
                 f"{store['bare_entries_per_s']:,.0f} bare sqlite3 read + json.loads",
                 f"{store['ratio']:.2f}", "", ""])
    idle, sampler = store["idle_cpu_s_per_hour"], store["sampler_cpu_s_per_hour"]
    rows.append(["following an idle OpenClaw store: CPU per hour at 2 s",
                 f"{idle:.3f} s ({store['changed_cpu_s_per_hour']:.2f} s if the gateway commits before "
                 "every look)", f"{sampler:.3f} s host sampler at 15 s", f"{idle / sampler:.2f}",
                 "negligible next to host metrics", verdict(idle <= sampler)])
    month = load("month")
    sim, cleanup = month["month"], month["cleanup"]
    rows.append([f"a month at 1:{sim['scale']}: largest file + WAL against the cap",
                 f"{sim['max_size'] / 2**20:.1f} MiB", f"{sim['cap'] / 2**20:.1f} MiB cap",
                 f"{sim['max_size'] / sim['cap']:.2f}", "< 0.95",
                 verdict(sim["max_size"] < 0.95 * sim["cap"])])
    rows.append([f"a month at 1:{sim['scale']}: largest main file (WAL aside) against the cap",
                 f"{sim['max_file'] / 2**20:.1f} MiB", f"{sim['cap'] / 2**20:.1f} MiB cap",
                 f"{sim['max_file'] / sim['cap']:.2f}", "under the cap",
                 verdict(sim["max_file"] <= sim["cap"])])
    rows.append([f"cleanup pass on {cleanup['size'] / 2**20:.0f} MiB", f"{cleanup['otrace_s']:.2f} s",
                 f"{cleanup['raw_s']:.2f} s raw DELETE + vacuum",
                 f"{cleanup['otrace_s'] / cleanup['raw_s']:.2f}", "", ""])
    peers = load("peers")
    rows.append(["persisted events/s against Arize Phoenix", f"{peers['otrace']['persisted_per_s']:,.0f}",
                 f"{peers['phoenix']['persisted_per_s']:,.0f} Phoenix (SQLite)",
                 f"{peers['speed_ratio']:.1f}×", "≥ 50×", verdict(peers["speed_ratio"] >= 50)])
    rows.append(["idle RSS against Arize Phoenix", f"{peers['otrace']['idle_rss_mib']:.0f} MiB",
                 f"{peers['phoenix']['idle_rss_mib']:.0f} MiB", f"{peers['rss_ratio']:.2f}", "≤ 0.10",
                 verdict(peers["rss_ratio"] <= 0.10)])
    otlp = load("otlp")
    ours, theirs = otlp["otrace"], otlp["phoenix"]
    rows.append(["OTLP spans/s persisted against Arize Phoenix (SDK exporter, protobuf)",
                 f"{ours['persisted_per_s']:,.0f}", f"{theirs['persisted_per_s']:,.0f} Phoenix (SQLite)"
                 + ("" if theirs["drained"] else " *"), f"{otlp['speed_ratio']:.1f}×", "≥ 30×",
                 verdict(otlp["speed_ratio"] >= 30)])
    rows.append(["OTLP spans the exporter sent and otrace did not persist",
                 f"{ours['ok'] - ours['persisted']:,} of {ours['ok']:,}", "", "", "0",
                 verdict(ours["ok"] == ours["persisted"] and ours["failed"] == 0)])
    rows.append(["idle RSS against Arize Phoenix, after otrace's first OTLP request",
                 f"{ours['idle_rss_mib']:.0f} MiB", f"{theirs['idle_rss_mib']:.0f} MiB",
                 f"{otlp['rss_ratio']:.2f}", "≤ 0.10", verdict(otlp["rss_ratio"] <= 0.10)])
    rows.append(["RSS added by the first OTLP request (protobuf imported)",
                 f"{ours['rss_after_first_otlp_mib'] - ours['rss_before_otlp_mib']:.1f} MiB",
                 f"{ours['rss_before_otlp_mib']:.1f} MiB before it", "", "", ""])
    pushed = load("otlp_push")
    proof, refused = pushed["proof"]["traces_only"], pushed["proof"]["default_signals"]
    rows.append(["OTLP push into Arize Phoenix (TRACE_PUSH_SIGNALS=traces): calls identical there, field by "
                 "field", f"{proof['matched']:,} of {proof['calls']:,}", "", "", "all",
                 verdict(proof["mismatched"] == 0)])
    rows.append(["OTLP push into Arize Phoenix, default signals: calls pushed after its 405 on /v1/logs "
                 "opened the breaker", f"{refused['late_synced']} of {refused['late_calls']} within "
                 f"{refused['late_wait_s']:g} s", "", "", "", ""])
    for protocol in ("http/protobuf", "http/json"):
        sdk, ours = pushed["throughput"][f"sdk {protocol}"], pushed["throughput"][f"otrace {protocol}"]
        rows.append([f"OTLP push spans/s, {pushed['spans']:,}-row backlog ({protocol})",
                     f"{ours['spans_per_s']:,.0f}", f"{sdk['spans_per_s']:,.0f} OpenTelemetry SDK exporter",
                     f"{ours['spans_per_s'] / sdk['spans_per_s']:.2f}", "", ""])
    grow = max(pushed["throughput"][f"otrace {p}"]["rss_peak_mib"] - pushed["throughput"][f"otrace {p}"]
               ["rss_idle_mib"] for p in ("http/protobuf", "http/json"))
    rows.append(["RSS growth while pushing the backlog as OTLP", f"{grow:.0f} MiB", "", "", "≤ 30 MB",
                 verdict(grow * 2**20 <= 30e6)])
    costs = peers["host_metrics"]
    ours, theirs = costs["otrace's sampler (on less off)"], costs["collectd"]
    ratio = ours["cpu_ms_per_sample"] / max(theirs["cpu_ms_per_sample"], 1e-9)   # 0 in a --quick window
    rows.append(["host-metrics CPU per sample against collectd", f"{ours['cpu_ms_per_sample']:.2f} ms",
                 f"{theirs['cpu_ms_per_sample']:.2f} ms collectd", f"{ratio:.1f}×", "≤ 2×",
                 verdict(ratio <= 2)])
    report = load("report")
    for name, seconds in report["runs"].items():
        if name.endswith("--json"):
            continue
        rows.append([f"otrace report, {name}, {report['db_bytes'] / 2**20:.0f} MiB database "
                     f"({report['calls_24h']:,} calls in 24 h, {report['calls']:,} in all)",
                     f"{seconds:.2f} s",
                     f"{report['baseline_s']:.2f} s hand-written SQL of the per-model sums",
                     f"{seconds / report['baseline_s']:.1f}×", "< 1 s", verdict(seconds < 1)])
    added = report["pricing_us"] - report["unpriced_us"]
    rows.append(["pricing at ingest, CPU per trace", f"+{added:.1f} µs",
                 f"{report['unpriced_us']:.1f} µs parse_events without prices", "", "", ""])
    rows.append(["RSS with the price table, six models priced", f"{report['rss_priced_mib']:.1f} MiB",
                 f"{report['rss_bare_mib']:.1f} MiB without prices.json",
                 f"+{report['rss_priced_mib'] - report['rss_bare_mib']:.1f} MiB", "", ""])
    rows.append(["created_at indexes (for the report)", f"{report['index_bytes'] / 2**20:.1f} MiB",
                 f"{report['vacuumed_bytes'] / 2**20:.0f} MiB database",
                 f"{report['index_bytes'] / report['vacuumed_bytes']:.3f}", "", ""])
    rows += system_rows(load("system"))
    rows += idle_rows(load("idle"))
    return rows


def idle_rows(idle: dict[str, Any]) -> list[list[str]]:
    """The idle sidecar as deployed beside the gateway, against a bare stdlib server in the same run."""
    bare, seconds, rows = idle["bare"], idle["idle_s"], []
    if "floor" in idle:
        floor = idle["floor"]["rss_mib"]
        rows.append([f"idle RSS of the floor: that server importing otrace's libraries ({seconds:.0f} s)",
                     f"{floor:.1f} MiB", f"{bare['rss_mib']:.1f} MiB bare stdlib server",
                     f"{floor / bare['rss_mib']:.2f}", "", ""])
    for name, what in (("all", "everything on (log, store, OTLP, metrics, processes, DNS, push)"),
                       ("core", "everything on but the process table and DNS probes"),
                       ("push", "push configured, nothing else"), ("none", "every optional feature off")):
        got = idle[name]
        ratio = got["rss_mib"] / bare["rss_mib"]
        rows.append([f"idle RSS, {what} ({seconds:.0f} s)", f"{got['rss_mib']:.1f} MiB",
                     f"{bare['rss_mib']:.1f} MiB bare stdlib server", f"{ratio:.2f}", "≤ 1.25",
                     verdict(ratio <= 1.25)])
        rows.append([f"idle CPU, {what}", f"{got['cpu_pct']:.3f} % of a core", f"{bare['cpu_pct']:.3f} %",
                     "", "≤ 0.05 %", verdict(got["cpu_pct"] <= 0.05)])
    return rows


def system_rows(system: dict[str, Any]) -> list[list[str]]:
    """Processes, network, DNS and /debug: each sampler against the host sample, the idle sidecar with
    all of it on against otrace before it, and the profiler's overhead."""
    cost, share, n = system["cost"], system["share_pct"], system["cost"]["process_count"]
    host = cost["host"]
    rows = [[f"{what} CPU per call ({n} processes)", f"{cost[key] * 1e6:.0f} µs", f"{host * 1e6:.0f} µs host "
             "sample", f"{cost[key] / host:.2f}×", "", f"{share[key]:.4f} % of a core at {interval}"]
            for what, key, interval in (("process sample", "processes", "60 s"),
                                        ("processes and network in a host sample", "system", "15 s"),
                                        ("DNS probe", "dns", "60 s"))]
    rows[0][4:] = ["< 0.05 % of a core at 60 s", verdict(share["processes"] < 0.05)
                   + f" ({share['processes']:.4f} %)"]
    rows.append(["all of them, per minute at the defaults", f"{system['all_share_pct']:.4f} % of a core", "",
                 "", "", ""])
    idle, seconds = system["idle"], system["idle_seconds"]
    if "before" in idle:
        now, before = idle["now"], idle["before"]
        rows.append([f"idle RSS, everything on, {n} processes ({seconds:.0f} s)",
                     f"{now['rss_mib']:.1f} MiB", f"{before['rss_mib']:.1f} MiB otrace before",
                     f"{now['rss_mib'] / before['rss_mib']:.2f}", "≤ 25 MB",
                     verdict(now["rss_mib"] * 2**20 <= 25e6)])
        rows.append(["idle CPU, everything on", f"{now['cpu_pct']:.3f} % of a core",
                     f"{before['cpu_pct']:.3f} % otrace before", "", "", ""])
    profile = system["profile"]
    rows.append(["ingest 202s/s, 4 connections, while /debug/profile samples",
                 f"{profile['profiled_rps']:,.0f}", f"{profile['rps']:,.0f} without a profile",
                 f"{profile['profiled_rps'] / profile['rps']:.2f}", "",
                 f"profiler: {system['profile_overhead_pct']:.2f} % of a core"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs: check the benchmarks work")
    parser.add_argument("--summary-only", action="store_true", help="rebuild the summary from saved results")
    args = parser.parse_args()
    began = time.monotonic()
    failed = []
    for name, (full, quick) in {} if args.summary_only else RUNS.items():
        print(f"# {name}", flush=True)
        command = [sys.executable, str(BENCH / f"{name}.py"), *(quick if args.quick else full)]
        if subprocess.run(command, check=False).returncode:
            failed.append(name)            # the others still run; the summary is not written
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")
    took = f"{(time.monotonic() - began) / 60:.1f} minutes"
    if args.summary_only:
        took = "rebuilt from saved results"
    markdown = (f"## otrace benchmarks ({time.strftime('%Y-%m-%d')}, {machine()}; "
                f"{took}{', --quick' if args.quick else ''})\n\n"
                + table(["measurement", "otrace", "baseline, same run", "ratio", "goal", "met"], summary()))
    (RESULTS / "summary.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
