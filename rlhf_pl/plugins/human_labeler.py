"""The ``human`` labeler: people rank completions, through a file queue or the feedback app.

Chosen by ``labeler.database_url`` (settings: :class:`rlhf_pl.plugins.labeler_specs.HumanLabelerConfig`):

- **File queue** (``database_url: null``, the default): ``rank_batch`` writes each task not answered
  yet to ``<queue_dir>/pending/<id>.json`` and waits for ``<queue_dir>/done/<id>.json`` (written by
  whoever ranks: ``python -m rlhf_pl.plugins.label_queue``). Answers are data: nothing is moved or
  deleted, so a re-run of the same command takes the answers given so far.
- **The feedback app** (``labeler.database_url=sqlite:///outputs/app/app.db`` or ``postgresql://…``):
  ``rank_batch`` migrates that database, adds the tasks (id = :attr:`LabelTask.id`, the prompt, the
  completions, ``meta`` = the prompt's meta and its ``origin``) to queue ``labeler.queue`` (source
  ``collect``), each for ``labeler.overlap`` different labelers, who rank them on the app's Rank page
  (:mod:`rlhf_pl.app.ranking`). It polls until every task has ``overlap`` rankings (skips do not
  count: a skipped task goes to another labeler) and returns, per task, the labelers' rankings merged
  by :func:`rlhf_pl.app.agreement.merge` (mean rank position; equal means tie). Rankings stay in the
  database: a re-run meets the same task ids and takes them. The app's modules (SQLAlchemy) are
  imported only in this mode.

Both: ``labeler.timeout_s`` bounds the wait; then :class:`LabelsPendingError` names what is still
pending (0 = do not wait).
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
    """Some tasks were not answered in time. The answers given so far stay in ``done/`` (or the database).

    Attributes:
        answered: task id -> ranking of the tasks answered so far (merged, in the app's case).
        pending: ids of the tasks still waiting, in task order.
        queue_dir: the (absolute) queue directory; None with the feedback app.
        database_url: the feedback app's database (password hidden); None with the file queue.
        queue: the app's queue name; None with the file queue.
    """

    def __init__(self, message: str, *, answered: dict[str, Ranking], pending: list[str],
                 queue_dir: Optional[Path] = None, database_url: Optional[str] = None, queue: Optional[str] = None):
        super().__init__(message)
        self.answered, self.pending, self.queue_dir = answered, pending, queue_dir
        self.database_url, self.queue = database_url, queue


def default_queue() -> str:
    """The app queue's name when ``labeler.queue`` is null: the Hydra run directory's name, else ``collect``."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir).name[:200]
    return "collect"


def app_record(task: LabelTask) -> dict[str, Any]:
    """The task as the feedback app stores it (:func:`rlhf_pl.app.tasks.add_tasks`)."""
    return {"id": task.id, "prompt": as_dicts(task.prompt.messages), "completions": list(task.completions),
            "meta": {**task.prompt.meta, "origin": task.prompt.origin}}


class HumanLabeler:
    """People rank through a file queue or the feedback app (module docstring); config
    :class:`~rlhf_pl.plugins.labeler_specs.HumanLabelerConfig`. ``queue_dir`` is resolved against the
    current directory when the labeler is built; so is a relative SQLite ``database_url``."""

    def __init__(self, config: HumanLabelerConfig) -> None:
        if not isinstance(config, HumanLabelerConfig):
            raise LabelerError(f"labeler 'human' expects a HumanLabelerConfig, got {type(config).__name__}")
        config.__post_init__()
        self.config = config
        self.queue_dir = Path(config.queue_dir).expanduser().absolute()
        self.database_url = None if config.database_url is None else checked_url(config.database_url)
        self.queue = (config.queue or default_queue()).strip()

    def answer(self, task: LabelTask) -> Optional[Ranking]:
        """The ranking already given for ``task`` (``done/<id>.json``), or None."""
        return read_answer(done_path(self.queue_dir, task.id), task.id, len(task.completions))

    def rank_batch(self, tasks: Sequence[LabelTask]) -> list[Ranking]:
        """Queue the tasks not answered yet, wait up to ``timeout_s`` for every answer, return the
        rankings in task order. Moves and deletes nothing. Raises :class:`LabelsPendingError` when
        answers are still missing at the deadline (immediately with ``timeout_s = 0``). With
        ``database_url``: through the feedback app (:meth:`rank_in_app`)."""
        if self.database_url is not None:
            return self.rank_in_app(tasks)
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

    # --- the feedback app -------------------------------------------------------------------------

    def rank_in_app(self, tasks: Sequence[LabelTask]) -> list[Ranking]:
        """Add the tasks to the app's database (idempotent by id), wait until each has ``overlap``
        rankings, return their merged rankings in task order (module docstring)."""
        from rlhf_pl.app import tasks as app_tasks  # the app (SQLAlchemy) only when database_url is set

        unique = {task.id: task for task in tasks}
        db = open_app_database(self.database_url)
        try:
            with db.transaction() as session:
                added = app_tasks.add_tasks(session, [app_record(t) for t in unique.values()], self.queue,
                                            self.config.overlap, "collect")
            answers: dict[str, Ranking] = {}
            missing = self._collect_merged(db, unique, answers)
            timeout, poll = float(self.config.timeout_s), float(self.config.poll_s)
            if missing and timeout > 0:
                log.info("human labeler: %d new task(s) in the feedback app's queue %r (%s); waiting up to %gs for "
                         "%d of %d to get %d ranking(s) each on its Rank page", len(added), self.queue,
                         shown_url(self.database_url), timeout, len(missing), len(unique), self.config.overlap)
            deadline = time.monotonic() + timeout
            while missing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._app_pending_error(db, missing, answers, len(unique))
                time.sleep(min(poll, remaining))
                missing = self._collect_merged(db, unique, answers)
        finally:
            db.dispose()
        return [answers[task.id] for task in tasks]

    def _collect_merged(self, db: Any, unique: dict[str, LabelTask], answers: dict[str, Ranking]) -> list[str]:
        """Add the merged ranking of every newly finished task to ``answers``; return the ids still missing."""
        from rlhf_pl.app import tasks as app_tasks
        from rlhf_pl.app.agreement import merge

        waiting = [task_id for task_id in unique if task_id not in answers]
        with db.sessions() as session:
            done = app_tasks.finished(session, waiting)
            given = app_tasks.answers(session, sorted(done))
        for task_id in done:
            k = len(unique[task_id].completions)
            merged = merge([answer.ranking for answer in given[task_id]], k)
            answers[task_id] = ranking_from_json(merged, k, f"the feedback app's rankings of task {task_id}")
        return [task_id for task_id in waiting if task_id not in answers]

    def _app_pending_error(self, db: Any, missing: list[str], answers: dict[str, Ranking],
                           total: int) -> LabelsPendingError:
        from rlhf_pl.app import tasks as app_tasks

        with db.sessions() as session:
            counts = app_tasks.progress(session, missing)
        shown = ", ".join(f"{task_id} ({counts.get(task_id, (0, self.config.overlap))[0]} of "
                          f"{counts.get(task_id, (0, self.config.overlap))[1]} rankings)" for task_id in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        waited = (f"after waiting {self.config.timeout_s:g}s" if self.config.timeout_s > 0
                  else "(labeler.timeout_s=0: not waiting)")
        url = shown_url(self.database_url)
        return LabelsPendingError(
            f"human labeler: {len(missing)} of {total} tasks are still not ranked by enough labelers {waited}: "
            f"{shown}{more}. They wait in the feedback app's queue {self.queue!r} ({url}): rank them on its Rank "
            f"page (python -m rlhf_pl +stage=app app.database_url={url}). The rankings given so far are kept in the "
            "database: re-running the same command picks them up (labeler.timeout_s sets how long to wait)",
            answered=dict(answers), pending=list(missing), database_url=url, queue=self.queue)

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
        if self.database_url is not None:
            return (f"HumanLabeler(database_url={shown_url(self.database_url)!r}, queue={self.queue!r}, "
                    f"overlap={self.config.overlap}, timeout_s={self.config.timeout_s})")
        return f"HumanLabeler(queue_dir={str(self.queue_dir)!r}, timeout_s={self.config.timeout_s})"


# --- the feedback app's database ------------------------------------------------------------------


def checked_url(url: str) -> str:
    """``labeler.database_url`` normalised (a relative SQLite file made absolute against the current
    directory), or a :class:`LabelerError` naming it."""
    from sqlalchemy.engine import make_url

    from rlhf_pl.app.db import normalise_url
    from rlhf_pl.errors import ConfigError

    try:
        normal = normalise_url(url.strip())
    except ConfigError as err:
        raise LabelerError(f"labeler.database_url: {err}".replace("app.database_url=", "")) from None
    parsed = make_url(normal)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        parsed = parsed.set(database=str(Path(parsed.database).expanduser().absolute()))
    return parsed.render_as_string(hide_password=False)


def shown_url(url: str) -> str:
    """``url`` with its password hidden (for messages and logs)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_app_database(url: str) -> Any:
    """The feedback app's :class:`~rlhf_pl.app.db.Database` at ``url``, migrated to the newest schema
    (a SQLite file's directory is made); a :class:`LabelerError` naming the URL if it cannot be opened."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from rlhf_pl.app.db import Database

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    db = Database(url)
    try:
        db.migrate()
    except OperationalError as err:
        db.dispose()
        raise LabelerError(f"labeler.database_url: cannot open the feedback app's database {shown_url(url)}: "
                           f"{str(err.orig).strip()}") from None
    return db
