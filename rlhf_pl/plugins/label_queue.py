"""Answer the ``human`` labeler's queue in a terminal.

::

    python -m rlhf_pl.plugins.label_queue <queue_dir>                       # rank the pending tasks one by one
    python -m rlhf_pl.plugins.label_queue <queue_dir> --list                # ids + last prompt turn of each
    python -m rlhf_pl.plugins.label_queue <queue_dir> --answer ID "2 0 [1 3]" [--who NAME]

A ranking lists the completion indices best first; brackets group ties: ``2 0 [1 3]`` or
``2,0,[1,3]`` means 2 is best, then 0, then 1 and 3 tie. ``ID`` may be a unique prefix of a task id.
Interactively, ``s`` skips a task and ``q`` (or end of input) quits; a bad ranking is explained and
asked again. Each answer is written atomically to ``<queue_dir>/done/<id>.json`` (the format of
:mod:`rlhf_pl.plugins.human_labeler`); an answer is never overwritten (remove the file to answer again).
Pending tasks are those of ``<queue_dir>/pending`` without an answer. Errors (no queue, an unknown
id, a bad ranking with ``--answer``) exit with code 2.
"""
from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Sequence

from rlhf_pl.io import write_json
from rlhf_pl.plugins.human_labeler import DONE, PENDING, done_path, pending_path
from rlhf_pl.plugins.labelers import LabelerError, ranking_from_json, ranking_to_json

_ID = re.compile(r"[0-9A-Za-z_-]+")  # task ids are hex; anything else (a path, a glob) is unknown
_TOKEN = re.compile(r"\s*(?:(\d+)|(\[)|(\])|(,))")
RANKING_HELP = "completion indices best first, brackets group ties: '2 0 [1 3]' or '2,0,[1,3]'"


def parse_ranking_text(text: str) -> list:
    """``"2 0 [1 3]"`` / ``"2,0,[1,3]"`` -> ``[2, 0, [1, 3]]`` (syntax only; indices are checked against K later)."""
    out: list = []
    group: list[int] | None = None
    pos, text = 0, text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            bad = text[pos:].strip()[:1]
            raise LabelerError(f"unexpected {bad!r} at position {text.index(bad, pos) + 1} of {text!r} "
                               f"({RANKING_HELP})")
        pos = m.end()
        index, opening, closing = m.group(1), m.group(2), m.group(3)
        if index is not None:
            (out if group is None else group).append(int(index))
        elif opening and group is not None:
            raise LabelerError(f"nested '[' in {text!r}: a tie group holds indices only ({RANKING_HELP})")
        elif opening:
            group = []
        elif closing and group is None:
            raise LabelerError(f"']' without '[' in {text!r} ({RANKING_HELP})")
        elif closing:
            if not group:
                raise LabelerError(f"empty tie group '[]' in {text!r} ({RANKING_HELP})")
            out.append(group)
            group = None
    if group is not None:
        raise LabelerError(f"unclosed '[' in {text!r} ({RANKING_HELP})")
    if not out:
        raise LabelerError(f"no ranking given ({RANKING_HELP})")
    return out


# --- the queue -------------------------------------------------------------------------------


def check_queue(queue_dir: Path | str) -> Path:
    """``queue_dir`` as a Path, or a :class:`LabelerError` when it is not a label queue."""
    queue = Path(queue_dir)
    if not queue.is_dir():
        raise LabelerError(f"no label queue at {queue}: the directory does not exist (the human labeler creates it, "
                           f"with {PENDING}/ inside, when it queues tasks)")
    if not (queue / PENDING).is_dir():
        raise LabelerError(f"{queue} is not a label queue: it has no {PENDING}/ directory")
    return queue


def load_task(path: Path) -> dict[str, Any]:
    """A pending task record, checked enough to show and answer it."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LabelerError(f"task file {path}: cannot be read ({type(err).__name__}: {err})") from err
    ok = (isinstance(record, dict) and record.get("id") == path.stem
          and isinstance(record.get("completions"), list) and len(record["completions"]) >= 1
          and all(isinstance(c, str) for c in record["completions"])
          and isinstance(record.get("prompt"), list) and len(record["prompt"]) >= 1
          and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in record["prompt"]))
    if not ok:
        raise LabelerError(f"task file {path}: expected {{'id': {path.stem!r}, 'prompt': [{{role, content}}, ...], "
                           "'completions': [str, ...]}} as the human labeler writes it")
    return record


def pending_tasks(queue_dir: Path | str) -> list[dict[str, Any]]:
    """The tasks of ``pending/`` that have no answer in ``done/``, in the order they were queued."""
    queue = check_queue(queue_dir)
    paths = [p for p in (queue / PENDING).glob("*.json") if not done_path(queue, p.stem).exists()]
    paths.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
    return [load_task(p) for p in paths]


def find_task(queue_dir: Path | str, task_id: str) -> dict[str, Any]:
    """The pending task whose id is ``task_id`` or starts with it (a unique prefix)."""
    queue = check_queue(queue_dir)
    matches: list[Path] = []
    if _ID.fullmatch(task_id):
        exact = pending_path(queue, task_id)
        matches = [exact] if exact.is_file() else sorted((queue / PENDING).glob(f"{task_id}*.json"))
    if not matches:
        raise LabelerError(f"unknown task id {task_id!r}: no such task in {queue / PENDING} (--list shows them)")
    if len(matches) > 1:
        raise LabelerError(f"task id {task_id!r} is ambiguous in {queue / PENDING}: "
                           f"{', '.join(p.stem for p in matches[:5])}{' ...' if len(matches) > 5 else ''}")
    return load_task(matches[0])


def write_answer(queue_dir: Path | str, task_id: str, ranking: str | Sequence[Any], who: str) -> Path:
    """Answer one pending task: ``ranking`` as text (``"2 0 [1 3]"``) or a list (``[2, 0, [1, 3]]``, or
    tuples of groups), checked against the task's K; written atomically to ``done/<id>.json``. Refuses
    to overwrite an answer. Returns the answer file."""
    queue = check_queue(queue_dir)
    task = find_task(queue, task_id)
    k, full_id = len(task["completions"]), task["id"]
    value = parse_ranking_text(ranking) if isinstance(ranking, str) else [
        list(g) if isinstance(g, (list, tuple)) else g for g in ranking]
    checked = ranking_from_json(value, k, f"ranking for task {full_id} (K = {k})")
    if not isinstance(who, str) or not who.strip():
        raise LabelerError(f"--who must name who ranked, got {who!r}")
    target = done_path(queue, full_id)
    if target.exists():
        raise LabelerError(f"task {full_id} is already answered in {target} (answers are kept; remove that file "
                           "to answer again)")
    record = {"id": full_id, "ranking": ranking_to_json(checked), "labeler": who.strip(),
              "answered_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return write_json(target, record)


def last_turn(task: dict[str, Any], width: int = 100) -> str:
    text = " ".join(str(task["prompt"][-1].get("content", "")).split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --- the commands ----------------------------------------------------------------------------


def list_pending(queue_dir: Path | str, out: IO[str]) -> int:
    tasks = pending_tasks(queue_dir)
    for task in tasks:
        out.write(f"{task['id']}  K={len(task['completions'])}  {last_turn(task)}\n")
    if not tasks:
        out.write(f"nothing pending in {Path(queue_dir) / PENDING}\n")
    return 0


def _show(console: Any, task: dict[str, Any], number: int, total: int) -> None:
    from rich.panel import Panel
    from rich.text import Text

    console.rule(Text(f"task {number}/{total}  {task['id']}  ({task.get('origin', '?')})"))
    for message in task["prompt"]:
        console.print(Panel(Text(message["content"]), title=Text(str(message.get("role", "?"))), title_align="left"))
    for i, completion in enumerate(task["completions"]):
        console.print(Panel(Text(completion), title=Text(f"[{i}]"), title_align="left", border_style="cyan"))


def interactive(queue_dir: Path | str, who: str, stdin: IO[str], out: IO[str]) -> int:
    """Show each pending task and read its ranking from ``stdin`` (``s`` skips, ``q`` / end of input quits)."""
    from rich.console import Console
    from rich.text import Text

    console = Console(file=out, highlight=False)
    queue = check_queue(queue_dir)
    tasks = pending_tasks(queue)
    answered = skipped = 0
    if not tasks:
        console.print(Text(f"nothing pending in {queue / PENDING}"))
        return 0
    quit_now = False
    for number, task in enumerate(tasks, start=1):
        if quit_now:
            break
        if done_path(queue, task["id"]).exists():  # answered meanwhile (the feedback app)
            continue
        _show(console, task, number, len(tasks))
        k = len(task["completions"])
        while True:
            out.write(f"ranking of 0..{k - 1}, best first, [ ] groups ties (s = skip, q = quit): ")
            out.flush()
            line = stdin.readline()
            reply = line.strip()
            if not line or reply.lower() == "q":
                quit_now = True
                break
            if reply.lower() == "s":
                skipped += 1
                break
            if not reply:
                continue
            try:
                path = write_answer(queue, task["id"], reply, who)
            except LabelerError as err:
                out.write(f"not saved: {err}\n")
                continue
            answered += 1
            out.write(f"saved {path}\n")
            break
    left = len(pending_tasks(queue))
    out.write(f"answered {answered}, skipped {skipped}; {left} still pending in {queue / PENDING}\n")
    return 0


def _default_who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        return "human"


def main(argv: Sequence[str] | None = None, *, stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_pl.plugins.label_queue",
                                     description="Answer the human labeler's queue (see the module docstring).")
    parser.add_argument("queue_dir", help=f"the labeler's queue_dir (holding {PENDING}/ and {DONE}/)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="print the pending task ids and their prompt's last turn")
    action.add_argument("--answer", nargs=2, metavar=("ID", "RANKING"),
                        help=f"answer one task non-interactively; RANKING: {RANKING_HELP}")
    parser.add_argument("--who", default=None, help="who ranks (stored as 'labeler'; default: the login name)")
    args = parser.parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    who = args.who if args.who is not None else _default_who()
    try:
        if args.list:
            return list_pending(args.queue_dir, stdout)
        if args.answer:
            path = write_answer(args.queue_dir, args.answer[0], args.answer[1], who)
            stdout.write(f"saved {path}\n")
            return 0
        return interactive(args.queue_dir, who, stdin, stdout)
    except LabelerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
