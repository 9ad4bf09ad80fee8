"""rlhf_pl.io: every write is atomic — a kill or a failure leaves the previous complete version."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from process_helpers import wait_for

from rlhf_pl import io

WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from rlhf_pl.io import torch_save
    path, i = Path(sys.argv[1]), 0
    while True:
        i += 1
        torch_save({"i": i, "x": torch.full((4_000_000,), float(i))}, path)  # 16 MB per save
""")


def test_sigkill_during_saves_leaves_a_loadable_latest_file(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stderr=subprocess.PIPE, text=True)
        wait_for(path.is_file, 120, "the first save", proc)
        time.sleep(0.2 + 0.15 * attempt)  # lands in the middle of a later save
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        state = torch.load(path, weights_only=True)
        assert state["i"] >= 1 and torch.equal(state["x"], torch.full((4_000_000,), float(state["i"])))


def test_a_failed_write_names_the_file_and_free_space_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    io.torch_save({"i": 1}, path)
    real_save = torch.save

    def disk_full(obj, handle):  # writes part of the file, then fails as torch does on a full disk
        handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 318843200 vs 318843088")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"writing .*last\.pt failed \(RuntimeError: .*unexpected pos.*\); "
                                      r"\d+ MiB free on its disk; the previous version is untouched"):
        io.torch_save({"i": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True) == {"i": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left behind


def test_text_json_and_jsonl_round_trip_with_usual_permissions(tmp_path):
    io.write_json(tmp_path / "a" / "s.json", {"b": torch.tensor(1.5), "a": tmp_path})
    assert json.loads((tmp_path / "a" / "s.json").read_text()) == {"a": str(tmp_path), "b": 1.5}
    io.write_jsonl(tmp_path / "r.jsonl", [{"x": "é"}, {"x": 2}])
    assert (tmp_path / "r.jsonl").read_text(encoding="utf-8") == '{"x": "é"}\n{"x": 2}\n'
    io.write_text(tmp_path / "t.md", "new")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "t.md").stat().st_mode & 0o777 == 0o666 & ~mask


def test_an_error_while_writing_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    io.write_text(tmp_path / "t.md", "old")

    def broken():
        yield {"x": 1}
        raise KeyError("boom")

    with pytest.raises(KeyError):
        io.write_jsonl(tmp_path / "t.md", broken())
    assert (tmp_path / "t.md").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["t.md"]


def test_atomic_dir_replaces_a_directory_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with io.atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(out) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("killed half way")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    with io.atomic_dir(out) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp or old copy left
