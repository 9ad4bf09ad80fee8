"""Admin: accounts and roles, task queues and their overlap, progress, agreement between labelers, exports.

Every route needs an admin session (a labeler gets 403, no session 401; both logged). The pure
summaries (:func:`queue_progress`, :func:`flag_labelers`) are separate from the routes; the export
records come from :mod:`rlhf_pl.app.export`.

Routes:

- ``GET /admin`` — the page (Users, Queues, Agreement, Export).
- ``GET /api/admin/users`` -> ``{"users": [{id, username, role, active, created_at}]}`` (never a
  password hash).
- ``POST /api/admin/users`` ``{username, password, role, key}`` -> ``{"user": {...}}``; idempotent by
  ``key`` (a repeat answers the stored result with ``"repeated": true``). 409 for a taken name, 422
  for a bad name, role or short password.
- ``PATCH /api/admin/users/{id}`` ``{role?, active?, password?}`` -> ``{"user": {...},
  "released_assignments": n}``. An admin cannot demote or deactivate their own account (400).
  Deactivating an account ends its sessions and gives its open assignments back to the queue (they
  are deleted, so other labelers can take the tasks); its rankings stay. A new password ends the
  account's other sessions (the admin's own session is kept when they change their own password).
- ``GET /api/admin/queues`` -> ``{"queues": [...], "labelers": [...]}``, see :func:`queue_progress`.
- ``PATCH /api/admin/queues/{queue}`` ``{overlap}`` -> ``{queue, overlap, tasks, changed, kept_higher}``:
  sets the overlap (rankings wanted, each by a different labeler) of every task of the queue. The rule:
  a task's overlap never goes below the number of labelers holding one of its slots — an open or
  done assignment, or a ranking that is not a skip (a skip frees its slot, as
  :func:`rlhf_pl.app.tasks.next_task` counts): nobody's ranking or open task is made surplus. Such
  tasks get that number instead (``kept_higher`` lists them). A setter: repeating it stores the same.
- ``GET /api/admin/agreement[?queue=]`` -> overall and per-labeler agreement over every task with two
  or more rankings that are not skipped (:func:`rlhf_pl.app.agreement.agreement_report`), and which
  labelers are flagged (:func:`flag_labelers`).
- ``GET /api/admin/stats`` -> row counts and the inference worker's counters (``worker``: null without one).
- ``GET /api/admin/export/summary`` -> for each export, how many records it has and what it leaves out.
- ``GET /api/admin/export/demonstrations.jsonl``, ``/rankings.jsonl?mode=per_labeler|merged``,
  ``/chats.jsonl``, ``/pairwise.jsonl`` — the exports as attachments (formats: :mod:`rlhf_pl.app.export`);
  headers ``X-Export-Records`` (records written) and ``X-Export-Left-Out`` (JSON: reason -> count).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from datetime import datetime
from typing import Any, Iterable, Mapping, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf_pl.app import export as exports
from rlhf_pl.app.agreement import AgreementReport, agreement_report, check_groups
from rlhf_pl.app.common import RequestKey, once
from rlhf_pl.app.db import (
    ROLES,
    Assignment,
    Conversation,
    Message,
    RankingRecord,
    Rating,
    Task,
    User,
)
from rlhf_pl.app.security import DB, AdminUser, check_new_password, create_user, fingerprint, hash_password, refuse
from rlhf_pl.app.server import page

router = APIRouter()

MAX_OVERLAP = 50  # rankings wanted of one task
FLAG_MARGIN = 0.2  # how far below the other labelers' agreement a labeler must be to be flagged
FLAG_MIN_PAIRS = 3  # pairs a labeler needs before being flagged (one shared task says little)
FLAG_RULE = (f"flagged: at least {FLAG_MIN_PAIRS} pairs, and a mean pairwise agreement more than {FLAG_MARGIN:g} "
             "below the mean agreement of the pairs of labelers without them")


# --- pure summaries -------------------------------------------------------------------------------


def public_user(user: User) -> dict[str, Any]:
    """What the admin sees of an account (never the password hash)."""
    created = user.created_at.isoformat() if isinstance(user.created_at, datetime) else None
    return {"id": user.id, "username": user.username, "role": user.role, "active": user.active, "created_at": created}


def queue_progress(tasks: Iterable[tuple[str, str, int]], rankings: Iterable[tuple[str, int, bool]],
                   assignments: Iterable[tuple[str, int, str]],
                   users: Mapping[int, tuple[str, bool]]) -> dict[str, Any]:
    """Progress per queue and per labeler.

    ``tasks``: (id, queue, overlap); ``rankings``: (task id, user id, skipped); ``assignments``: (task
    id, user id, state); ``users``: id -> (username, active). Per queue: ``tasks``, ``wanted`` (Σ
    overlap), ``done`` (rankings, not skipped), ``skipped``, ``open`` (open assignments), ``complete``
    (tasks with at least ``overlap`` rankings), ``progress`` (Σ min(rankings, overlap) / wanted),
    ``overlap_min`` / ``overlap_max``. Per labeler (every account with an assignment or a ranking):
    ``assigned`` (assignments in any state), ``open``, ``done``, ``skipped``."""
    queue_of: dict[str, str] = {}
    overlap_of: dict[str, int] = {}
    queues: dict[str, dict[str, Any]] = {}
    for task_id, queue, overlap in tasks:
        queue_of[task_id], overlap_of[task_id] = queue, overlap
        row = queues.setdefault(queue, {"queue": queue, "tasks": 0, "wanted": 0, "done": 0, "skipped": 0, "open": 0,
                                        "complete": 0, "overlap_min": overlap, "overlap_max": overlap})
        row["tasks"] += 1
        row["wanted"] += overlap
        row["overlap_min"], row["overlap_max"] = min(row["overlap_min"], overlap), max(row["overlap_max"], overlap)
    labelers: dict[int, Counter] = {}
    ranked: Counter = Counter()
    for task_id, user_id, skipped in rankings:
        labelers.setdefault(user_id, Counter())["skipped" if skipped else "done"] += 1
        if task_id in queue_of:
            queues[queue_of[task_id]]["skipped" if skipped else "done"] += 1
            ranked[task_id] += not skipped
    for task_id, user_id, state in assignments:
        counts = labelers.setdefault(user_id, Counter())
        counts["assigned"] += 1
        counts["open"] += state == "open"
        if state == "open" and task_id in queue_of:
            queues[queue_of[task_id]]["open"] += 1
    got: Counter = Counter()
    for task_id, queue in queue_of.items():
        queues[queue]["complete"] += ranked[task_id] >= overlap_of[task_id]
        got[queue] += min(ranked[task_id], overlap_of[task_id])
    for queue, row in queues.items():
        row["progress"] = got[queue] / row["wanted"] if row["wanted"] else 1.0
    people = [{"id": uid, "username": users.get(uid, ("?", False))[0], "active": users.get(uid, ("?", False))[1],
               **{key: counts[key] for key in ("assigned", "open", "done", "skipped")}}
              for uid, counts in labelers.items()]
    return {"queues": [queues[q] for q in sorted(queues)], "labelers": sorted(people, key=lambda p: p["username"])}


def flag_labelers(report: AgreementReport) -> dict[str, dict[str, Any]]:
    """Per labeler: their agreement, ``others`` (the mean agreement of the labeler pairs without them:
    every pair with them is among their own, so it is the overall sum less theirs) and ``flagged``
    (:data:`FLAG_RULE`)."""
    total, pairs = (report.overall.agreement or 0.0) * report.overall.pairs, report.overall.pairs
    out = {}
    for who, mine in report.per_labeler.items():
        rest = pairs - mine.pairs
        others = (total - (mine.agreement or 0.0) * mine.pairs) / rest if rest > 0 else None
        flagged = (others is not None and mine.agreement is not None and mine.pairs >= FLAG_MIN_PAIRS
                   and mine.agreement < others - FLAG_MARGIN)
        out[who] = {**asdict(mine), "others": others, "flagged": flagged}
    return out


def agreement_answers(rows: Iterable[tuple[str, list[Any], str, list[Any]]]) -> tuple[dict[str, dict[str, Any]],
                                                                                        dict[str, int]]:
    """``rows`` (task id, completions, username, ranking) of non-skipped rankings -> (task -> labeler ->
    tie groups, task -> k) for :func:`agreement_report`; malformed rankings are left out."""
    answers: dict[str, dict[str, Any]] = {}
    ks: dict[str, int] = {}
    for task_id, completions, username, ranking in rows:
        try:
            groups = check_groups([g if isinstance(g, list) else [g] for g in ranking], len(completions))
        except (TypeError, ValueError):
            continue
        answers.setdefault(task_id, {})[username] = groups
        ks[task_id] = len(completions)
    return answers, ks


# --- request bodies -------------------------------------------------------------------------------


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(max_length=64)
    password: str = Field(max_length=256)
    role: str = Field(max_length=16)
    key: RequestKey


class UserChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Optional[str] = Field(default=None, max_length=16)
    active: Optional[bool] = None
    password: Optional[str] = Field(default=None, max_length=256)


class OverlapChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    overlap: int = Field(ge=1, le=MAX_OVERLAP)


# --- routes: the page and accounts ----------------------------------------------------------------


@router.get("/admin")
def admin_page(request: Request, user: AdminUser) -> Response:
    """The admin page (``templates/admin.html``, driven by ``static/admin.js``)."""
    return page(request, "admin.html", user, active="admin", flag_rule=FLAG_RULE, merge_rule=exports.MERGE_RULE,
                max_overlap=MAX_OVERLAP, roles=ROLES)


@router.get("/api/admin/users")
def list_users(user: AdminUser, db: DB) -> dict[str, Any]:
    """Every account, by name (no password hashes)."""
    return {"users": [public_user(u) for u in db.scalars(select(User).order_by(User.username))]}


@router.post("/api/admin/users")
def add_user(request: Request, body: NewUser, user: AdminUser) -> dict[str, Any]:
    """A new account (idempotent by ``key``; 409 for a taken name, 422 for a bad field)."""
    taken = f"the account {body.username.strip()!r} exists already"

    def work(session: Session) -> dict[str, Any]:
        if session.scalar(select(User.id).where(User.username == body.username.strip())) is not None:
            raise refuse(request, 409, taken, user)
        try:
            made = create_user(session, body.username, body.password, body.role)
        except ValueError as err:
            raise refuse(request, 422, str(err), user) from None
        return {"user": public_user(made)}

    try:
        return once(request.app.state.db, user, body.key, work)
    except IntegrityError:  # the same name created by a concurrent request (with another key)
        raise refuse(request, 409, taken, user) from None


def _change_user(request: Request, session: Session, admin: User, target: User, body: UserChange) -> int:
    """Apply ``body`` to ``target`` (checked first: nothing changes on an error); returns the open
    assignments given back when the account is deactivated."""
    if body.role is not None and body.role not in ROLES:
        raise refuse(request, 422, f"role {body.role!r}: choose one of {', '.join(ROLES)}", admin)
    if target.id == admin.id and body.role is not None and body.role != "admin":
        raise refuse(request, 400, "you cannot demote your own account (another admin can)", admin)
    if target.id == admin.id and body.active is False:
        raise refuse(request, 400, "you cannot deactivate your own account (another admin can)", admin)
    if body.password is not None:
        try:
            check_new_password(body.password)
        except ValueError as err:
            raise refuse(request, 422, f"password: {err}", admin) from None
        target.password_hash = hash_password(body.password)
    if body.role is not None:
        target.role = body.role
    released = 0
    if body.active is not None:
        target.active = body.active
        if not body.active:
            released = session.execute(delete(Assignment).where(Assignment.user_id == target.id,
                                                                Assignment.state == "open")).rowcount
    return released


@router.patch("/api/admin/users/{user_id}")
def change_user(request: Request, user_id: int, body: UserChange, user: AdminUser) -> dict[str, Any]:
    """Change an account's role, active flag or password (one transaction; never one's own role or active flag)."""
    if body.role is None and body.active is None and body.password is None:
        raise refuse(request, 422, "nothing to change: send role, active or password", user)
    with request.app.state.db.transaction() as session:
        target = session.get(User, user_id)
        if target is None:
            raise refuse(request, 404, f"no account with id {user_id}", user)
        released = _change_user(request, session, user, target, body)
        session.flush()
        answer = {"user": public_user(target), "released_assignments": released}
        new_hash = target.password_hash
    if target.id == user.id and body.password is not None:  # keep the admin's own session (it holds the fingerprint)
        request.session["pw"] = fingerprint(new_hash)
    return answer


# --- routes: queues, agreement, stats -------------------------------------------------------------


@router.get("/api/admin/queues")
def queues(user: AdminUser, db: DB) -> dict[str, Any]:
    """Progress per queue and per labeler (:func:`queue_progress`)."""
    users = {uid: (name, active) for uid, name, active in db.execute(select(User.id, User.username, User.active))}
    rankings = select(RankingRecord.task_id, RankingRecord.user_id, RankingRecord.skipped)
    assignments = select(Assignment.task_id, Assignment.user_id, Assignment.state)
    return queue_progress(db.execute(select(Task.id, Task.queue, Task.overlap)).tuples(),
                          db.execute(rankings).tuples(), db.execute(assignments).tuples(), users)


def _slots_held(session: Session, queue: str) -> Counter:
    """Task id -> how many different labelers hold one of its slots (an open or done assignment, or a
    ranking that is not a skip), for the tasks of ``queue``."""
    held: dict[str, set[int]] = {}
    queries = (select(Assignment.task_id, Assignment.user_id).where(Assignment.state.in_(("open", "done"))),
               select(RankingRecord.task_id, RankingRecord.user_id).where(RankingRecord.skipped.is_(False)))
    for query in queries:
        for task_id, user_id in session.execute(query.join(Task, Task.id == query.selected_columns[0])
                                                .where(Task.queue == queue)):
            held.setdefault(task_id, set()).add(user_id)
    return Counter({task_id: len(people) for task_id, people in held.items()})


@router.patch("/api/admin/queues/{queue:path}")
def set_overlap(request: Request, queue: str, body: OverlapChange, user: AdminUser) -> dict[str, Any]:
    """Set the overlap of the queue's tasks, never below the labelers holding a slot (:func:`_slots_held`)."""
    with request.app.state.db.transaction() as session:
        tasks = list(session.scalars(select(Task).where(Task.queue == queue).order_by(Task.id)))
        if not tasks:
            raise refuse(request, 404, f"no queue {queue!r} (a queue is the tasks that share its name)", user)
        held = _slots_held(session, queue)
        changed, kept_higher = 0, []
        for task in tasks:
            overlap = max(body.overlap, held[task.id])
            if overlap > body.overlap:
                kept_higher.append({"task": task.id, "overlap": overlap})
            if task.overlap != overlap:
                task.overlap, changed = overlap, changed + 1
        return {"queue": queue, "overlap": body.overlap, "tasks": len(tasks), "changed": changed,
                "kept_higher": kept_higher}


@router.get("/api/admin/agreement")
def agreement(user: AdminUser, db: DB, queue: Optional[str] = Query(default=None, max_length=200)) -> dict[str, Any]:
    """Agreement over the shared, non-skipped rankings (of one queue if given), flagged labelers."""
    query = (select(Task.id, Task.completions, User.username, RankingRecord.ranking)
             .join(RankingRecord, RankingRecord.task_id == Task.id).join(User, User.id == RankingRecord.user_id)
             .where(RankingRecord.skipped.is_(False), RankingRecord.ranking.is_not(None)))
    if queue is not None:
        query = query.where(Task.queue == queue)
    answers, ks = agreement_answers(db.execute(query).tuples())
    report = agreement_report(answers, ks)
    labelers = flag_labelers(report)
    return {"queue": queue, "overall": asdict(report.overall), "rule": FLAG_RULE,
            "labelers": [{"username": who, **row} for who, row in labelers.items()]}


def _counts(db: Session, column: Any) -> dict[str, int]:
    """Rows per value of ``column``."""
    return {str(value): n for value, n in db.execute(select(column, func.count()).group_by(column))}


@router.get("/api/admin/stats")
def stats(request: Request, user: AdminUser, db: DB) -> dict[str, Any]:
    """Row counts and the inference worker's counters."""
    worker = request.app.state.worker
    rankings = {"ranked": db.scalar(select(func.count()).where(RankingRecord.skipped.is_(False))),
                "skipped": db.scalar(select(func.count()).where(RankingRecord.skipped.is_(True))),
                "all_bad": db.scalar(select(func.count()).where(RankingRecord.all_bad.is_(True)))}
    return {
        "users": _counts(db, User.role),
        "inactive_users": db.scalar(select(func.count()).where(User.active.is_(False))),
        "conversations": _counts(db, Conversation.kind),
        "messages": db.scalar(select(func.count()).select_from(Message)),
        "ratings": {{1: "up", -1: "down"}.get(int(v), v): n for v, n in _counts(db, Rating.value).items()},
        "tasks": db.scalar(select(func.count()).select_from(Task)),
        "assignments": _counts(db, Assignment.state),
        "rankings": rankings,
        "worker": None if worker is None else dict(vars(worker.stats)),
    }


# --- routes: exports ------------------------------------------------------------------------------


def _attachment(result: exports.Export, filename: str) -> Response:
    """The records as a ``.jsonl`` download, with what was left out in the headers."""
    return Response(exports.to_jsonl(result.records), media_type="application/jsonl; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"',
                             "X-Export-Records": str(len(result.records)),
                             "X-Export-Left-Out": json.dumps(dict(sorted(result.left_out.items())))})


@router.get("/api/admin/export/summary")
def export_summary(user: AdminUser, db: DB) -> dict[str, Any]:
    """Records and left-out counts of every export (what the Export tab shows)."""
    return {"demonstrations": exports.export(db, "demonstrations").summary(),
            "rankings_per_labeler": exports.export(db, "rankings", "per_labeler").summary(),
            "rankings_merged": exports.export(db, "rankings", "merged").summary(),
            "chats": exports.export(db, "chats").summary(),
            "pairwise": exports.export(db, "pairwise").summary(),
            "merge_rule": exports.MERGE_RULE}


@router.get("/api/admin/export/rankings.jsonl")
def export_rankings(request: Request, user: AdminUser, db: DB,
                    mode: str = Query(default="per_labeler", max_length=32)) -> Response:
    """Rankings in the K-wise format, one record per labeler or merged per task."""
    if mode not in exports.RANKING_MODES:
        raise refuse(request, 422, f"mode {mode!r}: choose one of {', '.join(exports.RANKING_MODES)}", user)
    return _attachment(exports.export(db, "rankings", mode), f"rankings-{mode}.jsonl")


@router.get("/api/admin/export/demonstrations.jsonl")
def export_demonstrations(user: AdminUser, db: DB) -> Response:
    """Demonstrations as SFT conversations."""
    return _attachment(exports.export(db, "demonstrations"), "demonstrations.jsonl")


@router.get("/api/admin/export/chats.jsonl")
def export_chats(user: AdminUser, db: DB) -> Response:
    """Chats as conversations for collect."""
    return _attachment(exports.export(db, "chats"), "chats.jsonl")


@router.get("/api/admin/export/pairwise.jsonl")
def export_pairwise(user: AdminUser, db: DB) -> Response:
    """Rated regenerations as pairwise comparisons."""
    return _attachment(exports.export(db, "pairwise"), "pairwise.jsonl")
