"""The ranking task queue: adding tasks, handing them to labelers, storing their rankings (no HTTP).

A task is K completions of a conversation cut before a model-written message (:class:`~rlhf_pl.app.db.Task`).
It comes from the collect stage (``labeler=human labeler.database_url=...``, source ``collect``) or from
the app's own chat logs (:func:`tasks_from_chats`, source ``chat``). Each task wants ``overlap``
rankings, each by a different labeler:

- :func:`next_task` gives a labeler their own open assignment first, else the oldest task that has
  fewer than ``overlap`` open or done assignments and none of theirs (a new
  :class:`~rlhf_pl.app.db.Assignment`). The unique (task, user) key means never twice to one
  labeler. A skipped assignment does not count, so the task goes to someone else. Two labelers
  racing for the last slot: on PostgreSQL the task row is locked (``SELECT ... FOR UPDATE``) before
  counting; on SQLite the insert takes the database's write lock, and the slots are counted again
  after it (a loser removes its own assignment and tries the next task).
- :func:`submit_ranking` stores a ranking (tie groups, best first; checked against the task's K) and
  marks the assignment done; :func:`skip` marks it skipped with a reason. Both need an open
  assignment of that labeler (else :class:`TaskNotFound`: another labeler's task looks like a
  missing one); repeating a done one returns what was stored.
- "All bad": ``all_bad=True`` with a ranking stores that ranking and the flag (the labeler still
  orders the bad completions); ``all_bad=True`` without a ranking stores the all-tie ranking (one
  group of every completion: no preference, which collect drops as comparing nothing).
- :func:`answers` / :func:`progress` / :func:`finished`: the non-skipped rankings per task; a task is
  finished when it has ``overlap`` of them.

Callers hold the transaction (``Database.transaction()``): one call, one transaction. :func:`claim_next`
runs one for you and retries once when a racing request of the same labeler hit a unique key first.
"""
from __future__ import annotations

import asyncio
import logging
import random
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Optional, Sequence

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from rlhf_pl.app.agreement import check_groups
from rlhf_pl.app.db import (
    TASK_SOURCES,
    Assignment,
    Conversation,
    Database,
    RankingRecord,
    Task,
    User,
    once_more_on_conflict,
    selected_path,
    storable,
    utcnow,
)
from rlhf_pl.data.formats import Message
from rlhf_pl.plugins.labelers import ranking_problem

log = logging.getLogger("rlhf_pl.app.tasks")

LIVE = ("open", "done")  # assignment states that hold one of a task's ``overlap`` slots
ROLES = ("system", "user", "assistant")
MAX_ID = 64  # Task.id's column width
CHAT_ID = re.compile(r"^chat-(\d+)-(\d+)$")
IN_CHUNK = 500  # ids per IN (...) list


class TaskNotFound(LookupError):
    """No such task assigned to this labeler (also: another labeler's task — the same answer)."""


class BadRanking(ValueError):
    """The ranking (or the task record) is not valid; the message names the field, the value and what is valid."""


class TaskConflict(ValueError):
    """The labeler's assignment is in a state that does not allow this (ranking a skipped task, skipping a done one)."""


@dataclass(frozen=True)
class Answer:
    """One labeler's (non-skipped) ranking of one task."""

    task_id: str
    user_id: int
    username: str
    ranking: list[list[int]]
    all_bad: bool
    reason: str


# --- adding tasks ---------------------------------------------------------------------------------


def check_record(record: Any, max_k: Optional[int]) -> dict[str, Any]:
    """A task record ``{"id", "prompt": [{"role", "content"}, ...], "completions": [str, ...], "meta": {...}}``
    as a clean dict, or :class:`BadRanking` naming the field. The prompt ends with a user turn; K >= 1
    (at most ``max_k`` when given)."""
    if not isinstance(record, dict):
        raise BadRanking(f"task record: expected an object with id, prompt, completions, meta; got {record!r:.80}")
    task_id = record.get("id")
    if not (isinstance(task_id, str) and 1 <= len(task_id) <= MAX_ID):
        raise BadRanking(f"task id {task_id!r:.80}: expected a string of 1 to {MAX_ID} characters")
    prompt = record.get("prompt")
    if not (isinstance(prompt, list) and prompt):
        raise BadRanking(f"task {task_id}: prompt must be a non-empty list of {{role, content}} messages, "
                         f"got {prompt!r:.80}")
    messages = []
    for i, m in enumerate(prompt):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise BadRanking(f"task {task_id}: prompt message {i} must be {{role: one of {', '.join(ROLES)}, "
                             f"content: a string}}, got {m!r:.80}")
        messages.append({"role": m["role"], "content": storable(m["content"])})
    if messages[-1]["role"] != "user":
        raise BadRanking(f"task {task_id}: the prompt must end with a user message (the completions answer it), "
                         f"it ends with {messages[-1]['role']!r}")
    completions = record.get("completions")
    if not (isinstance(completions, list) and completions and all(isinstance(c, str) for c in completions)):
        raise BadRanking(f"task {task_id}: completions must be a non-empty list of strings, got {completions!r:.80}")
    if max_k is not None and len(completions) > max_k:
        raise BadRanking(f"task {task_id}: K={len(completions)} completions, more than app.max_k={max_k}")
    meta = record.get("meta") or {}
    if not isinstance(meta, dict):
        raise BadRanking(f"task {task_id}: meta must be an object, got {meta!r:.80}")
    # model text as it can be stored (a NUL becomes U+FFFD); rankings refer to completions by index
    return {"id": task_id, "prompt": messages, "completions": [storable(c) for c in completions], "meta": dict(meta)}


def _insert(session: Session) -> Callable[..., Any]:
    """The dialect's INSERT that can say ON CONFLICT DO NOTHING."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def add_tasks(session: Session, records: Iterable[Any], queue: str, overlap: int, source: str,
              max_k: Optional[int] = None) -> list[str]:
    """Add the task ``records`` (see :func:`check_record`) to ``queue``, each wanting ``overlap`` rankings;
    returns the ids added. Idempotent by id: a task that exists already is left as it is (its queue,
    overlap and answers too), also when another process adds it at the same moment (ON CONFLICT DO
    NOTHING). Tasks are handed out in the order of ``records``."""
    if source not in TASK_SOURCES:
        raise BadRanking(f"task source {source!r}: choose one of {', '.join(TASK_SOURCES)}")
    if not (isinstance(overlap, int) and not isinstance(overlap, bool) and overlap >= 1):
        raise BadRanking(f"overlap={overlap!r}: expected an integer >= 1 (labelers per task)")
    if not (isinstance(queue, str) and 1 <= len(queue.strip()) <= 200):
        raise BadRanking(f"queue {queue!r:.80}: expected a name of 1 to 200 characters")
    rows, seen = [], set()
    now = utcnow()
    for record in records:
        clean = check_record(record, max_k)
        if clean["id"] in seen:
            continue
        seen.add(clean["id"])
        # a microsecond apart: "oldest first" keeps the order of the records
        rows.append({**clean, "source": source, "queue": queue.strip(), "overlap": overlap,
                     "created_at": now + timedelta(microseconds=len(rows))})
    added: list[str] = []
    for start in range(0, len(rows), IN_CHUNK):
        chunk = rows[start:start + IN_CHUNK]
        statement = _insert(session)(Task).values(chunk).on_conflict_do_nothing(index_elements=["id"])
        added += session.scalars(statement.returning(Task.id)).all()
    session.flush()
    order = {row["id"]: i for i, row in enumerate(rows)}
    return sorted(added, key=order.__getitem__)


# --- handing tasks out ----------------------------------------------------------------------------


def _live_count(session: Session, task_id: str) -> int:
    return session.scalar(select(func.count()).select_from(Assignment)
                          .where(Assignment.task_id == task_id, Assignment.state.in_(LIVE)))


def _candidates(session: Session, user_id: int, limit: int = 20) -> list[str]:
    """Ids of the oldest tasks with a free slot and no assignment of this user."""
    live = (select(func.count()).select_from(Assignment)
            .where(Assignment.task_id == Task.id, Assignment.state.in_(LIVE)).correlate(Task).scalar_subquery())
    mine = select(Assignment.id).where(Assignment.task_id == Task.id, Assignment.user_id == user_id).correlate(Task)
    return list(session.scalars(select(Task.id).where(~mine.exists(), live < Task.overlap)
                                .order_by(Task.created_at, Task.id).limit(limit)))


def _claim(session: Session, user_id: int, task_id: str) -> bool:
    """Give ``task_id`` to the user if a slot is still free; False if another labeler took the last one."""
    task = session.execute(select(Task).where(Task.id == task_id).with_for_update()).scalar_one_or_none()
    if task is None or _live_count(session, task_id) >= task.overlap:
        return False
    assignment = Assignment(task_id=task_id, user_id=user_id, state="open", assigned_at=utcnow())
    session.add(assignment)
    session.flush()
    if _live_count(session, task_id) > task.overlap:  # SQLite: a racer counted before our insert, inserted first
        session.delete(assignment)
        session.flush()
        return False
    return True


def next_task(session: Session, user: User) -> Optional[Task]:
    """The user's own open assignment (oldest first), else a newly assigned task (module docstring), else None."""
    own = session.scalars(select(Assignment.task_id)
                          .where(Assignment.user_id == user.id, Assignment.state == "open")
                          .order_by(Assignment.assigned_at, Assignment.id).limit(1)).first()
    if own is not None:
        return session.get(Task, own)
    while True:
        candidates = _candidates(session, user.id)
        if not candidates:
            return None
        for task_id in candidates:  # a failed claim leaves that task full, so the next query skips it
            if _claim(session, user.id, task_id):
                return session.get(Task, task_id)


def claim_next(db: Database, user: User) -> Optional[Task]:
    """:func:`next_task` in its own transaction, retried once in a new one when a racing request of the
    same user hit the (task, user) key first: the retry sees what the winner stored."""
    def claim() -> Optional[Task]:
        with db.transaction() as session:
            return next_task(session, user)

    return once_more_on_conflict(claim)


def own_assignment(session: Session, user: User, task_id: str, *, lock: bool = False) -> Assignment:
    """The user's assignment of ``task_id`` (any state), or :class:`TaskNotFound`."""
    query = select(Assignment).where(Assignment.task_id == task_id, Assignment.user_id == user.id)
    assignment = session.execute(query.with_for_update() if lock else query).scalar_one_or_none()
    if assignment is None:
        raise TaskNotFound(f"no task {task_id!r} assigned to you")
    return assignment


def task_view(task: Task) -> dict[str, Any]:
    """What a labeler sees of a task (not its meta: provenance stays with admins)."""
    return {"id": task.id, "prompt": list(task.prompt), "completions": list(task.completions),
            "k": len(task.completions), "queue": task.queue}


# --- answers --------------------------------------------------------------------------------------


def _stored(session: Session, user: User, task_id: str) -> RankingRecord:
    return session.scalars(select(RankingRecord)
                           .where(RankingRecord.task_id == task_id, RankingRecord.user_id == user.id)).one()


def record_view(record: RankingRecord, *, repeated: bool = False) -> dict[str, Any]:
    """A stored answer as the API shows it."""
    return {"task": record.task_id, "ranking": record.ranking, "all_bad": record.all_bad,
            "skipped": record.skipped, "reason": record.reason, "repeated": repeated}


def check_ranking(groups: Optional[Sequence[Sequence[int]]], all_bad: bool, k: int) -> list[list[int]]:
    """The tie groups to store: ``groups`` checked against ``k``; with ``all_bad`` and no groups, one
    group of all K (no preference)."""
    if not groups:
        if all_bad:
            return [list(range(k))]
        raise BadRanking(f"ranking: required (best-first tie groups of the completions 0..{k - 1}, e.g. "
                         f"{[[i] for i in range(k)]}), or all_bad=true to mark every completion bad")
    problem = ranking_problem(groups, k)
    if problem:
        raise BadRanking(f"ranking {[list(g) for g in groups]!r:.200}: expected best-first tie groups of the "
                         f"completions 0..{k - 1} (every index exactly once): {problem}")
    return check_groups(groups, k)


def submit_ranking(session: Session, user: User, task_id: str, groups: Optional[Sequence[Sequence[int]]],
                   all_bad: bool = False, reason: str = "") -> dict[str, Any]:
    """Store the user's ranking of ``task_id`` and mark the assignment done. Needs an open assignment
    of this user (:class:`TaskNotFound`); a task the user ranked already returns the stored answer
    (``repeated``); a skipped one is a :class:`TaskConflict`; a bad ranking a :class:`BadRanking`."""
    assignment = own_assignment(session, user, task_id, lock=True)
    if assignment.state == "done":
        return record_view(_stored(session, user, task_id), repeated=True)
    if assignment.state == "skipped":
        raise TaskConflict(f"you skipped task {task_id!r}; it is no longer yours to rank")
    task = session.get(Task, task_id)
    record = RankingRecord(task_id=task_id, user_id=user.id, all_bad=bool(all_bad), skipped=False, reason=reason,
                           ranking=check_ranking(groups, all_bad, len(task.completions)), created_at=utcnow())
    session.add(record)
    assignment.state = "done"
    session.flush()
    return record_view(record)


def skip(session: Session, user: User, task_id: str, reason: str) -> dict[str, Any]:
    """Skip the user's open assignment of ``task_id`` with ``reason``; the slot goes to another labeler.
    A task skipped already returns the stored skip; a ranked one is a :class:`TaskConflict`."""
    assignment = own_assignment(session, user, task_id, lock=True)
    if assignment.state == "skipped":
        return record_view(_stored(session, user, task_id), repeated=True)
    if assignment.state == "done":
        raise TaskConflict(f"you ranked task {task_id!r} already; a ranked task cannot be skipped")
    if not reason.strip():
        raise BadRanking("reason: say why you skip the task (it must not be empty)")
    record = RankingRecord(task_id=task_id, user_id=user.id, ranking=None, all_bad=False, skipped=True,
                           reason=reason, created_at=utcnow())
    session.add(record)
    assignment.state = "skipped"
    session.flush()
    return record_view(record)


def _chunks(ids: Sequence[str]) -> Iterable[list[str]]:
    ids = list(dict.fromkeys(ids))
    for start in range(0, len(ids), IN_CHUNK):
        yield ids[start:start + IN_CHUNK]


def answers(session: Session, task_ids: Sequence[str]) -> dict[str, list[Answer]]:
    """task id -> its non-skipped rankings, oldest first (tasks without any are left out)."""
    out: dict[str, list[Answer]] = {}
    for chunk in _chunks(task_ids):
        rows = session.execute(select(RankingRecord, User.username).join(User, User.id == RankingRecord.user_id)
                               .where(RankingRecord.task_id.in_(chunk), RankingRecord.skipped.is_(False))
                               .order_by(RankingRecord.created_at, RankingRecord.id))
        for record, username in rows:
            out.setdefault(record.task_id, []).append(Answer(record.task_id, record.user_id, username,
                                                             [list(g) for g in record.ranking], record.all_bad,
                                                             record.reason))
    return out


def progress(session: Session, task_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """task id -> (non-skipped rankings, overlap) for the tasks that exist."""
    out: dict[str, tuple[int, int]] = {}
    for chunk in _chunks(task_ids):
        counts = dict(session.execute(select(RankingRecord.task_id, func.count())
                                      .where(RankingRecord.task_id.in_(chunk), RankingRecord.skipped.is_(False))
                                      .group_by(RankingRecord.task_id)).all())
        for task_id, overlap in session.execute(select(Task.id, Task.overlap).where(Task.id.in_(chunk))):
            out[task_id] = (counts.get(task_id, 0), overlap)
    return out


def finished(session: Session, task_ids: Sequence[str]) -> set[str]:
    """The tasks among ``task_ids`` that have ``overlap`` non-skipped rankings."""
    return {task_id for task_id, (done, overlap) in progress(session, task_ids).items() if done >= overlap}


# --- tasks from the app's chat logs ---------------------------------------------------------------


@dataclass(frozen=True)
class ChatCut:
    """A chat conversation cut before one of its model-written assistant turns."""

    conversation_id: int
    turn: int  # index of the picked turn in the conversation's selected messages
    message_id: int
    prompt: list[Message]
    original: str
    chat_policy: Optional[str]


def pick_model_turn(conversation: Conversation, seed: int) -> Optional[ChatCut]:
    """One model-written assistant turn that answers a user turn, picked with ``random.Random`` seeded by
    (seed, conversation id) — the same pick whichever other chats exist; None when there is none.
    (Collect's ``pick_turn`` picks among all assistant turns: it cannot know which ones a model wrote.)"""
    messages = selected_path(conversation.messages)
    turns = [i for i in range(1, len(messages)) if messages[i].role == "assistant"
             and messages[i].source == "model" and messages[i - 1].role == "user"]
    if not turns:
        return None
    turn = random.Random(f"{seed}:{conversation.id}").choice(turns)
    prompt = [Message(m.role, m.content) for m in messages[:turn]]
    return ChatCut(conversation.id, turn, messages[turn].id, prompt, messages[turn].content, conversation.policy)


def chat_cuts(session: Session, seed: int, limit: Optional[int] = None) -> list[ChatCut]:
    """A cut of every chat conversation that has a model-written answer and no task yet (oldest first)."""
    have = {int(m.group(1)) for m in map(CHAT_ID.match, session.scalars(select(Task.id).where(Task.source == "chat")))
            if m}
    cuts = []
    query = (select(Conversation).where(Conversation.kind == "chat").order_by(Conversation.id)
             .options(selectinload(Conversation.messages)))
    for conversation in session.scalars(query):
        if conversation.id in have:
            continue
        cut = pick_model_turn(conversation, seed)
        if cut is not None:
            cuts.append(cut)
            if limit is not None and len(cuts) >= limit:
                break
    return cuts


async def sample_distinct(worker: Any, prompt: list[Message], k: int, rounds: int = 2,
                          max_new_tokens: Optional[int] = None) -> list[str]:
    """Up to ``k`` distinct non-empty (stripped) completions of ``prompt`` from ``worker``: k samples, then up
    to ``rounds`` more rounds for the empty and duplicate ones (requests of at most the worker's batch size)."""
    kept: list[str] = []
    for _ in range(rounds + 1):
        missing = k - len(kept)
        if missing <= 0:
            break
        sizes = [min(worker.max_batch, missing - start) for start in range(0, missing, worker.max_batch)]
        streams = [worker.submit(prompt, n=n, max_new_tokens=max_new_tokens) for n in sizes]
        for texts in await asyncio.gather(*(s.result() for s in streams)):
            for text in texts:
                text = text.strip()
                if text and text not in kept and len(kept) < k:
                    kept.append(text)
    return kept


async def tasks_from_chats(db: Database, worker: Any, k: int, seed: int, overlap: int, *, queue: str = "chats",
                           policy: Optional[str] = None, max_k: Optional[int] = None,
                           max_new_tokens: Optional[int] = None, limit: Optional[int] = None) -> dict[str, Any]:
    """Ranking tasks from the app's chat logs: for each chat conversation with a model-written assistant
    message and no task yet, one such turn picked at random (seeded), the conversation cut before it, K
    completions sampled by ``worker`` (the served ``policy``), added as source ``chat`` with provenance
    meta (conversation, turn, message, the policy that chatted and the one that sampled, the original
    message). A conversation whose samples give fewer than 2 distinct completions is reported, not added.
    Returns ``{"added": [ids], "unusable": [{"conversation", "why"}]}``."""
    def read() -> list[ChatCut]:
        with db.sessions() as session:
            return chat_cuts(session, seed, limit)

    cuts = await asyncio.to_thread(read)
    samples = await asyncio.gather(*(sample_distinct(worker, cut.prompt, k, max_new_tokens=max_new_tokens)
                                     for cut in cuts), return_exceptions=True)
    records, unusable = [], []
    for cut, texts in zip(cuts, samples):
        if isinstance(texts, BaseException):
            unusable.append({"conversation": cut.conversation_id, "why": f"sampling failed: {texts}"})
        elif len(texts) < 2:
            unusable.append({"conversation": cut.conversation_id,
                             "why": f"{len(texts)} distinct non-empty completion(s) of {k} samples"})
        else:
            records.append({"id": f"chat-{cut.conversation_id}-{cut.turn}",
                            "prompt": [m.to_dict() for m in cut.prompt], "completions": texts,
                            "meta": {"origin": f"chat:{cut.conversation_id}", "conversation": cut.conversation_id,
                                     "turn": cut.turn, "message": cut.message_id, "original": cut.original,
                                     "chat_policy": cut.chat_policy, "policy": policy, "seed": seed}})

    def write() -> list[str]:
        with db.transaction() as session:
            return add_tasks(session, records, queue, overlap, "chat", max_k=max_k)

    added = await asyncio.to_thread(write)
    log.info("tasks from chats: %d added, %d unusable, queue %r", len(added), len(unusable), queue)
    return {"added": added, "unusable": unusable}
