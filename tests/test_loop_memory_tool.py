"""tools/loop_memory.py: the PSS of a process tree against its largest process (Linux /proc)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tool_loader import load_tool

tool = load_tool("loop_memory")
pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps_rollup").is_file(), reason="needs Linux smaps_rollup")

CHILD = "import time; x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(1.5)"
PARENT = ("import subprocess, sys, time; y = bytearray(100 * 2**20); y[::4096] = b'1' * len(y[::4096]); "
          f"subprocess.run([sys.executable, '-c', {CHILD!r}]); time.sleep(0.2)")


def test_a_parent_and_its_child_are_summed_and_the_largest_is_the_child(tmp_path):
    out = tmp_path / "mem.json"
    assert tool.main(["--every", "0.1", "--json", str(out), "--", sys.executable, "-c", PARENT]) == 0
    result = json.loads(out.read_text())
    assert 300 <= result["process_pss_mib"] < 400  # the child's 300 MiB, touched page by page
    assert result["tree_pss_mib"] >= result["process_pss_mib"] + 90  # + the parent's 100 MiB while both live
    assert result["ratio"] == pytest.approx(result["tree_pss_mib"] / result["process_pss_mib"], abs=1e-3)
    assert result["samples"] >= 5 and result["exit_code"] == 0
