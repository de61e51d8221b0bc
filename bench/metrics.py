"""Host metrics: what one sample costs, against just reading the same files, in the same run.

    python bench/metrics.py [--samples 2000]

otrace's HostReader takes a snapshot of this machine (cgroup files, /proc, statvfs of the database
directory, its own process via psutil) and turns two of them into a system_metrics row. The
baseline opens and reads the same kernel files without parsing them. Printed: CPU time per sample,
the ratio, and the share of one core at the default 15 s interval (goal: at most 0.05 %).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import save, table

import otrace

CGROUP_FILES = ("cpu.stat", "cpuacct.usage", "cpu.max", "cpu.cfs_quota_us", "cpu.cfs_period_us",
                "cpuset.cpus.effective", "cpuset.effective_cpus", "memory.current", "memory.usage_in_bytes",
                "memory.max", "memory.limit_in_bytes", "memory.stat", "memory.events", "memory.oom_control",
                "io.stat", "blkio.throttle.io_service_bytes_recursive")


def files_read(reader: otrace.HostReader) -> list[Path]:
    """The kernel files a snapshot opens on this machine."""
    paths = [reader.procfs / name for name in ("stat", "meminfo", "vmstat", "diskstats")]
    paths.append(reader.sysfs / "devices" / "system" / "cpu" / "online")
    for _, directory in (reader.cgroup.dirs.values() if reader.cgroup else ()):
        paths += [directory / name for name in CGROUP_FILES if (directory / name).exists()]
    return [p for p in dict.fromkeys(paths) if p.exists()]


def host_sampler(reader: otrace.HostReader) -> Callable[[], None]:
    """One host sample per call (a snapshot, and the row it makes with the last), each as if taken
    15 s after the one before."""
    previous = reader.snapshot()

    def sample() -> None:
        nonlocal previous
        current = reader.snapshot()
        current.at = previous.at + 15.0
        otrace.host_sample(previous, current)
        previous = current

    return sample


def per_call(fn: Callable[[], object], n: int) -> float:
    """CPU seconds of one call of `fn`, over `n` calls."""
    started = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        reader = otrace.HostReader(Path("/proc"), Path("/sys"), tmp)
        paths = files_read(reader)
        sample = host_sampler(reader)

        def read_files() -> None:
            for path in paths:
                with open(path) as f:
                    f.read()

        ours, bare = per_call(sample, args.samples), per_call(read_files, args.samples)
    share = 100 * ours / 15.0
    markdown = table(["path", "CPU µs per sample", "ratio", "share of a core at 15 s"], [
        [f"open + read the same {len(paths)} kernel files (baseline)", f"{bare * 1e6:.0f}", "1.00",
         f"{100 * bare / 15:.4f} %"],
        ["otrace HostReader snapshot + row", f"{ours * 1e6:.0f}", f"**{ours / bare:.2f}**",
         f"{share:.4f} %"]])
    kind = reader.cgroup.version if reader.cgroup else "none (proc)"
    markdown += f"\n\nCgroup: {kind}; goal ≤ 0.05 % of a core."
    save("metrics", markdown, {"sample_cpu_s": ours, "baseline_cpu_s": bare, "share_pct": share,
                               "files": [str(p) for p in paths]})


if __name__ == "__main__":
    main()
