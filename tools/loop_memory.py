"""Peak memory of a command's whole process tree against its largest process: does the iterate
loop hold no more than its largest sub-stage (+ the loop's own small process and the fork server)?

Runs the command, samples every process below it every ``--every`` seconds (Linux
``/proc/<pid>/smaps_rollup``) and reports the largest sum of PSS over the tree (shared pages
counted once, split between the processes that map them) against the largest PSS of one process.
The loop meets its memory bound when the ratio is at most 1.10.

Usage::

    python tools/loop_memory.py -- python -m rlhf_pl +stage=iterate experiment=quick
    python tools/loop_memory.py --json mem.json -- python -m rlhf_pl +stage=iterate
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple


class Peak(NamedTuple):
    """The tree's largest total PSS and its largest single-process PSS (MiB), over ``samples`` samples."""

    tree_pss_mib: float
    process_pss_mib: float
    samples: int

    @property
    def ratio(self) -> float:
        return self.tree_pss_mib / self.process_pss_mib if self.process_pss_mib else float("nan")


def tree(pid: int) -> list[int]:
    """``pid`` and every live descendant of it."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:  # the task ended while we looked
            continue
        for child in children:
            found += tree(int(child))
    return found


def pss_mib(pid: int) -> float | None:
    """Proportional set size of ``pid`` in MiB, None if it has ended."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def watch(proc: subprocess.Popen, every: float) -> Peak:
    """Sample ``proc``'s tree until it exits."""
    tree_peak = process_peak = 0.0
    samples = 0
    while proc.poll() is None:
        sizes = [s for s in map(pss_mib, tree(proc.pid)) if s is not None]
        if sizes:
            tree_peak, process_peak = max(tree_peak, sum(sizes)), max(process_peak, max(sizes))
            samples += 1
        time.sleep(every)
    return Peak(round(tree_peak, 1), round(process_peak, 1), samples)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    if not Path("/proc/self/smaps_rollup").is_file():
        parser.error("needs Linux /proc/<pid>/smaps_rollup (kernel >= 4.14)")
    proc = subprocess.Popen(command)
    peak = watch(proc, args.every)
    result = {**peak._asdict(), "ratio": round(peak.ratio, 3), "exit_code": proc.returncode, "command": command}
    print(f"tree peak {peak.tree_pss_mib:.0f} MiB PSS; largest process {peak.process_pss_mib:.0f} MiB; "
          f"ratio {peak.ratio:.3f} over {peak.samples} samples (exit code {proc.returncode})")
    if args.json:
        from rlhf_pl.io import write_json

        write_json(args.json, result)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
