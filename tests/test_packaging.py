"""The wheel ships every module, config, template and data file, and pyproject declares every directory."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = {"rlhf_pl": REPO / "rlhf_pl", "rlhf_pl.conf": REPO / "conf"}  # pyproject's package-dir


def _tree() -> dict[str, Path]:
    """Every directory that ships, by its package name (``__pycache__`` excluded)."""
    found = {}
    for package, root in SOURCES.items():
        for folder in [root, *root.rglob("*")]:
            if folder.is_dir() and "__pycache__" not in folder.parts:
                found[".".join([package, *folder.relative_to(root).parts])] = folder
    return found


def test_pyproject_declares_every_directory_of_the_package():
    from setuptools.config.pyprojecttoml import read_configuration  # tomllib is 3.11+; the project runs on 3.10

    declared = read_configuration(REPO / "pyproject.toml")["tool"]["setuptools"]["packages"]
    assert sorted(declared) == sorted(_tree()), "pyproject.toml [tool.setuptools] packages differs from the tree"


def test_the_wheel_holds_every_file_of_the_tree(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools builds in the source tree (build/, *.egg-info)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("rlhf_pl", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path),
                            str(source)], capture_output=True, text=True, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    for warning in ("Package would be ignored", "deprecated"):  # setuptools' warnings turn into errors later
        assert warning not in built.stdout + built.stderr
    (wheel,) = tmp_path.glob("rlhf_pl-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {"/".join([*package.split("."), file.name])
                for package, folder in _tree().items() for file in folder.iterdir()
                if file.is_file() and file.suffix != ".pyc"}
    assert {"rlhf_pl/conf/config.yaml", "rlhf_pl/conf/stage/iterate.yaml",
            "rlhf_pl/app/templates/base.html"} <= expected
    assert expected - shipped == set()
