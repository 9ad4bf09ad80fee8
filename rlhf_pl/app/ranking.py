"""The Rank area: labelers rank K completions of a conversation cut before a model-written message.

The queue logic is :mod:`rlhf_pl.app.tasks` (no HTTP there); these routes wrap it. Every route
needs a session; a task id of a task not assigned to the caller answers 404 (the same as a missing
one), and nothing changes.

Routes:

- ``GET /rank`` — the page (``templates/rank.html``, ``static/rank.js``), guidelines beside the task.
- ``GET /api/tasks/next`` — ``{"task": {id, prompt, completions, k, queue}, "guidelines": [...]}``: the
  caller's open task, else a newly assigned one (each task goes to ``overlap`` different labelers,
  never twice to one); ``{"task": null, "why": "nothing to rank", ...}`` when there is none.
- ``GET /api/tasks/{id}`` — one of the caller's tasks with the state of the assignment and the
  caller's answer (404 for anyone else's).
- ``POST /api/tasks/{id}/ranking`` ``{"ranking": [[2], [0, 3], [1]], "all_bad": false, "reason": "", "key"}``
  — tie groups, best first, every completion exactly once (422 naming the problem otherwise).
  ``all_bad: true`` with a ranking stores both (the labeler still orders the bad ones); with
  ``ranking: null`` it stores the all-tie ranking (no preference). ``reason`` is an optional note.
  Idempotent: a repeated ``key``, or ranking a task already ranked, returns the stored answer
  (``repeated: true``). 409 for a task the caller skipped.
- ``POST /api/tasks/{id}/skip`` ``{"reason", "key"}`` — skip with a (non-empty) reason; the task goes
  to another labeler. 409 for a task the caller ranked.
- ``GET /api/rankings/mine?limit=&offset=`` — the caller's own answers (rankings and skips), newest first.
- ``POST /api/admin/tasks/from-chats`` ``{"k", "key", "limit"?, "queue"?}`` (admins) — ranking tasks
  from the chat logs (:func:`rlhf_pl.app.tasks.tasks_from_chats`), K completions each from the served
  policy, ``app.overlap`` labelers per task.

Bounds: K between 2 and ``app.max_k``; reasons at most ``app.max_message_chars`` characters.
"""
from __future__ import annotations

import asyncio
from typing import Annotated, Any, Callable, Optional, TypeVar

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from sqlalchemy import func, select

from rlhf_pl.app import tasks
from rlhf_pl.app.common import RequestKey, checked_text, once, stored_result, worker_of
from rlhf_pl.app.db import RankingRecord, Task, once_more_on_conflict
from rlhf_pl.app.security import DB, AdminUser, CurrentUser, refuse
from rlhf_pl.app.server import page

router = APIRouter()
T = TypeVar("T")

GUIDELINES = (
    "Read the whole conversation first: rank how well each completion continues it as the assistant's next "
    "message.",
    "A correct answer beats a wrong one, whatever else it does. Then prefer the answer that is direct and "
    "brief: it says what was asked early and stops.",
    "Penalise repetition, text that stops mid-sentence, gibberish, and anything harmful, rude or untrue.",
    "Completions that are equally good (or equally bad) belong in one tie group; do not invent a difference.",
    "If every completion is bad, tick \"all bad\" — you may still order them if some are less bad.",
    "Skip (saying why) only when you cannot judge: a language you do not read, a question outside your "
    "knowledge, a broken prompt.",
    "Keyboard: Tab to a completion, ArrowUp / ArrowDown move it, t ties it with the group above, u unties it.",
)
NOTHING = "nothing to rank"
MAX_GROUPS = 64  # the largest K collect allows; app.max_k bounds the tasks the app makes itself

TaskId = Annotated[str, Path(min_length=1, max_length=tasks.MAX_ID)]
Groups = Annotated[list[Annotated[list[StrictInt], Field(max_length=MAX_GROUPS)]], Field(max_length=MAX_GROUPS)]


class RankingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ranking: Optional[Groups] = None
    all_bad: StrictBool = False
    reason: str = ""
    key: RequestKey


class SkipBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str
    key: RequestKey


class FromChatsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: StrictInt
    key: RequestKey
    limit: Optional[Annotated[int, Field(ge=1, le=10_000)]] = None  # at most this many conversations
    queue: Annotated[str, Field(min_length=1, max_length=200)] = "chats"


def _check_reason(request: Request, reason: str) -> str:
    return checked_text("reason", reason, request.app.state.settings.max_message_chars, "app.max_message_chars",
                        blank=True)


def _answering(request: Request, user: Any, work: Callable[[], T]) -> T:
    """Run ``work``, turning the queue's refusals into HTTP errors (404 and 409 are logged)."""
    try:
        return work()
    except tasks.TaskNotFound as err:
        raise refuse(request, 404, str(err), user) from None
    except tasks.TaskConflict as err:
        raise refuse(request, 409, str(err), user) from None
    except tasks.BadRanking as err:
        raise HTTPException(422, str(err)) from None


def _submit(request: Request, user: Any, key: str, work: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """``work`` once per ``key`` (:func:`~rlhf_pl.app.common.once`); a racing request of the same user on
    the same task that committed first makes the unique key fail: then the retry returns its answer."""
    db = request.app.state.db

    return _answering(request, user, lambda: once_more_on_conflict(lambda: once(db, user, key, work)))


@router.get("/rank")
def rank_page(request: Request, user: CurrentUser) -> Response:
    return page(request, "rank.html", user, active="rank", guidelines=GUIDELINES)


@router.get("/api/tasks/next")
def next_task(request: Request, user: CurrentUser) -> dict[str, Any]:
    task = tasks.claim_next(request.app.state.db, user)
    if task is None:
        return {"task": None, "why": NOTHING, "guidelines": list(GUIDELINES)}
    return {"task": tasks.task_view(task), "guidelines": list(GUIDELINES)}


@router.get("/api/tasks/{task_id}")
def get_task(request: Request, user: CurrentUser, db: DB, task_id: TaskId) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        assignment = tasks.own_assignment(db, user, task_id)
        record = db.scalars(select(RankingRecord).where(RankingRecord.task_id == task_id,
                                                        RankingRecord.user_id == user.id)).first()
        return {"task": tasks.task_view(db.get(Task, task_id)), "state": assignment.state,
                "answer": None if record is None else tasks.record_view(record)}

    return _answering(request, user, read)


@router.post("/api/tasks/{task_id}/ranking")
def submit_ranking(request: Request, user: CurrentUser, task_id: TaskId, body: RankingBody) -> dict[str, Any]:
    reason = _check_reason(request, body.reason)
    return _submit(request, user, body.key,
                   lambda session: tasks.submit_ranking(session, user, task_id, body.ranking, body.all_bad, reason))


@router.post("/api/tasks/{task_id}/skip")
def skip_task(request: Request, user: CurrentUser, task_id: TaskId, body: SkipBody) -> dict[str, Any]:
    reason = _check_reason(request, body.reason)
    return _submit(request, user, body.key, lambda session: tasks.skip(session, user, task_id, reason))


@router.get("/api/rankings/mine")
def my_rankings(user: CurrentUser, db: DB, limit: Annotated[int, Query(ge=1, le=1000)] = 200,
                offset: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
    mine = RankingRecord.user_id == user.id
    total = db.scalar(select(func.count()).select_from(RankingRecord).where(mine))
    rows = db.execute(select(RankingRecord, Task).join(Task, Task.id == RankingRecord.task_id).where(mine)
                      .order_by(RankingRecord.created_at.desc(), RankingRecord.id.desc())
                      .limit(limit).offset(offset))
    return {"total": total, "rankings": [{**tasks.record_view(record), "k": len(task.completions),
                                          "queue": task.queue, "at": record.created_at.isoformat()}
                                         for record, task in rows]}


@router.post("/api/admin/tasks/from-chats")
async def tasks_from_chats(request: Request, user: AdminUser, body: FromChatsBody) -> dict[str, Any]:
    settings, db = request.app.state.settings, request.app.state.db
    if not 2 <= body.k <= settings.max_k:
        raise HTTPException(422, f"k={body.k}: completions per task must be between 2 and app.max_k={settings.max_k}")
    worker = worker_of(request)

    def stored() -> Optional[dict[str, Any]]:  # a retried request: its tasks exist, sample nothing again
        with db.sessions() as session:
            found = stored_result(session, user, body.key)
        return None if found is None else dict(found, repeated=True)

    previous = await asyncio.to_thread(stored)
    if previous is not None:
        return previous
    result = await tasks.tasks_from_chats(db, worker, body.k, settings.seed, settings.overlap, queue=body.queue,
                                          policy=settings.policy, max_k=settings.max_k,
                                          max_new_tokens=settings.max_new_tokens, limit=body.limit)
    return await asyncio.to_thread(once, db, user, body.key, lambda session: result)
