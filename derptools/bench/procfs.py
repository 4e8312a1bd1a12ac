"""What the benchmark learns about the server from outside: CPU and RSS from /proc, worker identity
from the admin unix sockets in the run dir.

CPU comes from /proc/PID/stat (utime + stime, in clock ticks) rather than wall time, because on a
2-core box shared by load generator and server the wall clock says little about what the server
itself spent per packet.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.status import fetch_unix

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (threads included, children not)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces and parentheses: split after its closing paren.
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state), so utime (field 14) and stime (15) are at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def total_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores; idle and iowait excluded).

    Set beside the server's and the generator's own CPU it shows what else ran during the window:
    softirq time the kernel does not charge to a process, and whatever other jobs share the box.
    """
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / CLOCK_TICKS


@dataclass(slots=True)
class ClusterInfo:
    """A running `cluster up` found through its run dir."""

    run_dir: Path
    worker_pids: list[int]
    worker_indexes: list[int]

    @classmethod
    def load(cls, run_dir: Path) -> ClusterInfo:
        state_file = run_dir / "supervisor.json"
        try:
            doc = json.loads(state_file.read_text())
        except FileNotFoundError as exc:
            raise SystemExit(f"cluster bench: no {state_file}; is `cluster up --run-dir {run_dir}` running?") from exc
        workers = doc["workers"]
        return cls(run_dir, [int(w["pid"]) for w in workers], [int(w["index"]) for w in workers])

    def varz(self, index: int) -> dict[str, Any]:
        return json.loads(fetch_unix(self.run_dir / f"worker-{index}.sock", "/debug/varz"))

    def accepts(self) -> dict[int, int]:
        """Each worker's accepted-connection counter: it grows by one on the worker a new client lands on."""
        return {index: int(self.varz(index)["worker"]["accepts"]) for index in self.worker_indexes}
