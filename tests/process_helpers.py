"""Waiting on a child process in tests (imported as a plain module: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import subprocess
import time
from typing import Callable


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen) -> None:
    """Poll ``predicate`` until it holds; fail (killing ``proc`` on a time-out) if ``proc`` ends first
    or ``timeout`` seconds pass. ``proc`` must have been started with ``stderr=PIPE``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (code {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
