"""The ``human`` labeler: people rank completions through a file queue.

``rank_batch`` writes each task not answered yet to ``<queue_dir>/pending/<id>.json`` and waits
for ``<queue_dir>/done/<id>.json`` (written by whoever ranks: ``python -m
rlhf_pl.plugins.label_queue``, later the feedback app). Answers are data: nothing is moved or
deleted, so a re-run of the same command takes the answers given so far. Settings:
:class:`rlhf_pl.plugins.labeler_specs.HumanLabelerConfig`.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from rlhf_pl.data.formats import Prompt, as_dicts
from rlhf_pl.io import write_json
from rlhf_pl.plugins.labeler_specs import HumanLabelerConfig
from rlhf_pl.plugins.labelers import LabelerError, LabelTask, Ranking, make_task, ranking_from_json

log = logging.getLogger(__name__)

PENDING, DONE = "pending", "done"
ANSWER_FORMAT = '{"id": "<id>", "ranking": [2, [0, 3], 1], "labeler": "<who>"} (best first; an inner list is a tie)'
LABEL_TOOL = "python -m rlhf_pl.plugins.label_queue"


def pending_path(queue_dir: Path | str, task_id: str) -> Path:
    """``<queue_dir>/pending/<id>.json``: a task waiting for an answer."""
    return Path(queue_dir) / PENDING / f"{task_id}.json"


def done_path(queue_dir: Path | str, task_id: str) -> Path:
    """``<queue_dir>/done/<id>.json``: the answer to a task."""
    return Path(queue_dir) / DONE / f"{task_id}.json"


def task_record(task: LabelTask) -> dict[str, Any]:
    """What ``pending/<id>.json`` holds."""
    return {"id": task.id, "prompt": as_dicts(task.prompt.messages), "completions": list(task.completions),
            "meta": dict(task.prompt.meta), "origin": task.prompt.origin}


def _bad_answer(path: Path, problem: str) -> LabelerError:
    return LabelerError(f"answer file {path}: {problem}; expected {ANSWER_FORMAT}. Fix or remove the file, then re-run")


def read_answer(path: Path | str, task_id: str, k: int) -> Optional[Ranking]:
    """The ranking in the answer file ``path`` for task ``task_id`` of K = ``k`` completions; None when
    there is no such file; a :class:`LabelerError` naming the file and the problem when it is bad."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise _bad_answer(path, f"cannot be read ({type(err).__name__}: {err})") from err
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise _bad_answer(path, f"invalid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(record, dict):
        raise _bad_answer(path, f"expected a JSON object, got {record!r:.80}")
    if record.get("id") != task_id:
        raise _bad_answer(path, f"field 'id' is {record.get('id', '<missing>')!r}, not the task's id {task_id!r}")
    who = record.get("labeler")
    if who is not None and not (isinstance(who, str) and who.strip()):
        raise _bad_answer(path, f"field 'labeler' must be a non-empty string (who ranked), got {who!r:.80}")
    if "ranking" not in record:
        raise _bad_answer(path, "field 'ranking' is missing")
    try:
        return ranking_from_json(record["ranking"], k, "field 'ranking'")
    except LabelerError as err:
        raise _bad_answer(path, str(err)) from None


class LabelsPendingError(LabelerError):
    """Some tasks were not answered in time. The answers given so far stay in ``done/``.

    Attributes:
        answered: task id -> ranking of the tasks answered so far.
        pending: ids of the tasks still waiting, in task order.
        queue_dir: the (absolute) queue directory.
    """

    def __init__(self, message: str, *, answered: dict[str, Ranking], pending: list[str], queue_dir: Path):
        super().__init__(message)
        self.answered, self.pending, self.queue_dir = answered, pending, queue_dir


class HumanLabeler:
    """People rank through a file queue (module docstring); config
    :class:`~rlhf_pl.plugins.labeler_specs.HumanLabelerConfig`. ``queue_dir`` is resolved against the
    current directory when the labeler is built."""

    def __init__(self, config: HumanLabelerConfig) -> None:
        if not isinstance(config, HumanLabelerConfig):
            raise LabelerError(f"labeler 'human' expects a HumanLabelerConfig, got {type(config).__name__}")
        config.__post_init__()
        self.config = config
        self.queue_dir = Path(config.queue_dir).expanduser().absolute()

    def answer(self, task: LabelTask) -> Optional[Ranking]:
        """The ranking already given for ``task`` (``done/<id>.json``), or None."""
        return read_answer(done_path(self.queue_dir, task.id), task.id, len(task.completions))

    def rank_batch(self, tasks: Sequence[LabelTask]) -> list[Ranking]:
        """Queue the tasks not answered yet, wait up to ``timeout_s`` for every answer, return the
        rankings in task order. Moves and deletes nothing. Raises :class:`LabelsPendingError` when
        answers are still missing at the deadline (immediately with ``timeout_s = 0``)."""
        unique = {task.id: task for task in tasks}
        answers: dict[str, Ranking] = {}
        for task in unique.values():
            ranking = self.answer(task)
            if ranking is not None:
                answers[task.id] = ranking
            elif not pending_path(self.queue_dir, task.id).exists():
                write_json(pending_path(self.queue_dir, task.id), task_record(task))
        missing = [t for t in unique.values() if t.id not in answers]
        timeout, poll = float(self.config.timeout_s), float(self.config.poll_s)
        if missing and timeout > 0:
            log.info("human labeler: waiting up to %gs for %d of %d answers in %s (answer with: %s %s)",
                     timeout, len(missing), len(unique), self.queue_dir / DONE, LABEL_TOOL, self.queue_dir)
        deadline = time.monotonic() + timeout
        while missing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._pending_error(missing, answers, len(unique))
            time.sleep(min(poll, remaining))
            for task in missing:
                ranking = self.answer(task)
                if ranking is not None:
                    answers[task.id] = ranking
            missing = [t for t in missing if t.id not in answers]
        return [answers[task.id] for task in tasks]

    def _pending_error(self, missing: list[LabelTask], answers: dict[str, Ranking], total: int) -> LabelsPendingError:
        waited = (f"after waiting {self.config.timeout_s:g}s" if self.config.timeout_s > 0
                  else "(labeler.timeout_s=0: not waiting)")
        return LabelsPendingError(
            f"human labeler: {len(missing)} of {total} tasks are still unanswered {waited}; they wait in "
            f"{self.queue_dir / PENDING} (answer them with `{LABEL_TOOL} {self.queue_dir}` or the feedback app). "
            f"The {len(answers)} answers given so far are kept in {self.queue_dir / DONE}: re-running the same "
            "command picks them up (labeler.timeout_s sets how long to wait)",
            answered=dict(answers), pending=[t.id for t in missing], queue_dir=self.queue_dir)

    def rank(self, prompt: Prompt, completions: list[str]) -> Ranking:
        """One task through :meth:`rank_batch`."""
        return self.rank_batch([make_task(prompt, completions)])[0]

    def score(self, prompt: Prompt, completion: str) -> float:
        """Not available: people rank, they do not score."""
        raise LabelerError(
            "the human labeler ranks completions but cannot score one: scoring (e.g. the eval stage's gold "
            "reward) needs a simulated gold labeler such as labeler=rule"
        )

    def __repr__(self) -> str:
        return f"HumanLabeler(queue_dir={str(self.queue_dir)!r}, timeout_s={self.config.timeout_s})"
