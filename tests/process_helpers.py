"""Child processes in tests: waiting on one, and running Python with a plugin package installed the way
a user would (imported as a plain module: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen) -> None:
    """Poll ``predicate`` until it holds; fail (killing ``proc`` on a time-out) if ``proc`` ends first
    or ``timeout`` seconds pass. With ``stderr=PIPE``, the failure shows the end of its stderr."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            output = proc.stderr.read()[-3000:] if proc.stderr is not None else "(its output went to a file)"
            raise AssertionError(f"process ended (code {proc.returncode}) before {what}: {output}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Installed:
    """Where a plugin package was installed, and how to run Python with it on the path."""

    def __init__(self, site: Path) -> None:
        self.site = site
        self.env = {**os.environ,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
                    "HYDRA_FULL_ERROR": "0"}

    def run(self, *args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def listed_rows(self, name: str, cwd: Path) -> list[str]:
        """The rows of ``python -m rlhf_pl.plugins`` (which must succeed) that name plugin ``name``."""
        proc = self.run("-m", "rlhf_pl.plugins", cwd=cwd)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return [line for line in proc.stdout.splitlines() if f" {name} " in line]


def install_plugin(src: Path, root: Path) -> Installed:
    """pip-install the package at ``src`` into ``root/site`` (``--target``; never into the test
    environment), building it from a copy in ``root/src``: an in-tree build would leave build/ and
    *.egg-info in the repository. No index, no dependencies: rlhf_pl comes from the test environment."""
    copy = root / "src"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--target", str(root / "site"), str(copy)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return Installed(root / "site")
