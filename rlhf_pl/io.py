"""The one atomic writer: files and directories appear complete or not at all.

Everything a run writes (configs, summaries, indices, checkpoints, plots, sample tables, data
sets, exported models) goes through here: the content is written to a hidden temp sibling,
fsynced and renamed over the target with ``os.replace``, so a reader — or a run killed with
``kill -9`` at any moment — sees the previous complete version or the new one, never a part.
A failed write (a full disk) raises an ``OSError`` naming the file and the free space, and leaves
the previous version untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator


@contextmanager
def atomic_file(path: Path | str, mode: str = "w") -> Iterator[IO]:
    """Open a temp sibling of ``path`` for writing (``mode`` "w" text/UTF-8 or "wb"); on a clean
    exit fsync it and rename it over ``path``, then fsync the directory. On an error the temp
    file is removed and ``path`` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file mode={mode!r}; valid: 'w', 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except Exception as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) or "unexpected pos" in str(err):  # torch reports a full disk so
            raise _write_failed(path, err) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_failed(path: Path, err: Exception) -> OSError:
    free = shutil.disk_usage(path.parent).free / 2**20
    kept = "the previous version is untouched" if path.exists() else "there is no previous version"
    return OSError(f"writing {path} failed ({type(err).__name__}: {err}); {free:.0f} MiB free on its disk; {kept}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text(path: Path | str, text: str) -> Path:
    """``text`` to ``path``, atomically."""
    with atomic_file(path) as handle:
        handle.write(text)
    return Path(path)


def json_default(obj: Any) -> Any:
    """JSON for tensors and numpy scalars (``.item()``) and paths."""
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: Path | str, obj: Any) -> Path:
    """``obj`` as indented, key-sorted JSON, atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def read_json_or_none(path: Path | str) -> Any:
    """The JSON value in ``path``, or None if there is no such file. Files written here are whole
    (atomic), so a partly written one is a bug or a foreign file: that raises."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def write_jsonl(path: Path | str, records: Iterable[dict]) -> Path:
    """One JSON object per line (UTF-8, not ASCII-escaped), atomically."""
    with atomic_file(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, default=json_default) + "\n")
    return Path(path)


def torch_save(obj: Any, path: Path | str) -> Path:
    """``torch.save(obj)`` to ``path``, atomically (checkpoints)."""
    import torch

    with atomic_file(path, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)


def save_figure(fig: Any, path: Path | str, **savefig_kwargs: Any) -> Path:
    """A matplotlib figure as PNG, atomically."""
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", **savefig_kwargs)
    return Path(path)


@contextmanager
def atomic_dir(out_dir: Path | str) -> Iterator[Path]:
    """Yield an empty temp sibling directory; on a clean exit it replaces ``out_dir``.

    An existing ``out_dir`` is moved aside first (a non-empty directory cannot be replaced in one
    rename) and deleted afterwards; on an error the temp directory is removed and ``out_dir`` is
    untouched.
    """
    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}") if out.exists() else None
    if old is not None:
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)
