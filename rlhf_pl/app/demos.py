"""Write a demonstration: trainers write both sides of a conversation, with model suggestions.

A demonstration is a :class:`~rlhf_pl.app.db.Conversation` of kind ``"demonstration"`` whose messages
are one alternative (0) per position. For each assistant turn the trainer may ask the served policy
for k suggestions, insert one and edit it, or write the turn from scratch. The client sends back,
with each assistant turn, the suggestion text it started from (or null); the server stores it and
computes the turn's ``source`` (``"suggestion"`` or ``"human"``) and ``edit_distance`` (the
Levenshtein distance, in characters, from the suggestion to the final text: :func:`edit_distance`).
Exports (:func:`demonstration_record`) are SFT conversation records that ``+stage=sft`` reads as
they are; the provenance rides along as extra keys (the SFT loader keeps them as ``meta``).

Routes (every one needs a session; the state-changing ones the CSRF header):

- ``GET /write`` — the page: the user's demonstrations and the editor (``?d=<id>`` opens one;
  another user's or a missing id gives the page with status 404 and an error, never their text).
- ``GET /api/demos`` — the user's demonstrations, newest first:
  ``{"demos": [{id, title, turns, assistant_turns, from_suggestion, created_at, updated_at}]}``.
- ``POST /api/demos`` ``{key, title?}`` -> ``{"id": n}``; idempotent by ``key`` (a repeat returns the
  same id with ``"repeated": true``).
- ``GET /api/demos/{id}`` -> ``{id, title, created_at, updated_at, messages: [{position, role, content,
  source, suggestion, edit_distance}]}``.
- ``PUT /api/demos/{id}`` ``{messages: [{role, content, suggestion}], title?}`` -> the stored
  demonstration (as GET). Replaces all its messages in one transaction, so a repeat stores the same.
  422 names the turn and the problem (:func:`check_turns`); nothing is stored then.
- ``POST /api/demos/{id}/suggestions`` ``{messages, k?}`` -> ``{"suggestions": [k texts]}``: k samples
  of the next assistant turn after ``messages`` (the conversation so far, ending with a user turn)
  from the inference worker. ``k`` defaults to ``app.suggestions`` and is at most ``app.max_k`` and
  the worker's batch size. 503 when the app serves no model. Nothing is stored: the client sends the
  suggestion it started from back with the turn when it saves.
- ``DELETE /api/demos/{id}`` -> ``{"deleted": id}`` (a repeat gets 404: it is gone).

Another user's demonstration id gets the same 404 as a missing one on every route (logged).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, selectinload
from starlette.concurrency import run_in_threadpool

from rlhf_pl.app.common import RequestKey, once, own_conversation, text_problem, worker_of
from rlhf_pl.app.db import Conversation, Message, Rating, User, selected_path, utcnow
from rlhf_pl.app.security import DB, CurrentUser, refuse
from rlhf_pl.app.server import page
from rlhf_pl.app.worker import GenerationError
from rlhf_pl.data import formats

router = APIRouter()

KIND = "demonstration"
MAX_TURNS = 64  # turns of one demonstration
TITLE_CHARS = 200  # the title column's width
ROLES = formats.ROLES  # system | user | assistant


# --- pure logic -------------------------------------------------------------------------------------


def edit_distance(a: str, b: str) -> int:
    """The Levenshtein distance between ``a`` and ``b``: the fewest single-character insertions,
    deletions and substitutions that turn one into the other (``edit_distance("kitten", "sitting") == 3``).

    Myers' bit-parallel algorithm (Hyyrö's formulation for the global distance) on Python integers
    as bit vectors of the shorter string's length, after dropping the common prefix and suffix: one
    pass over the longer string, so two 4000-character texts take milliseconds, not the 16 million
    steps of the textbook table.
    """
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    end_a, end_b = len(a), len(b)
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a, end_b = end_a - 1, end_b - 1
    a, b = a[start:end_a], b[start:end_b]
    if len(a) < len(b):
        a, b = b, a  # b is the shorter: its length is the bit vectors' width
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict[str, int] = {}  # per character, the bits of b's positions that hold it
    for i, char in enumerate(b):
        peq[char] = peq.get(char, 0) | (1 << i)
    mask, top = (1 << m) - 1, 1 << (m - 1)
    pv, mv, score = mask, 0, m  # vertical deltas +1 / -1 of the current column; score = D[m][j]
    for char in a:
        eq = peq.get(char, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | (~(xh | pv) & mask)  # horizontal +1 deltas
        mh = pv & xh  # horizontal -1 deltas
        if ph & top:
            score += 1
        elif mh & top:
            score -= 1
        ph = ((ph << 1) | 1) & mask  # row 0 grows by one per character of a (global distance)
        mh = (mh << 1) & mask
        pv = mh | (~(xv | ph) & mask)
        mv = ph & xv
    return score


@dataclass(frozen=True)
class Turn:
    """One validated turn as it is stored: ``source`` "suggestion" (started from ``suggestion``) or "human"."""

    role: str
    content: str
    suggestion: Optional[str] = None
    source: str = "human"
    edit_distance: Optional[int] = None


def check_turns(turns: Sequence[dict[str, Any]], *, max_chars: int, max_turns: int = MAX_TURNS,
                last_role: Optional[str] = None) -> list[Turn]:
    """Validate a demonstration's turns (dicts with ``role``, ``content`` and, for an assistant turn,
    an optional ``suggestion``) and compute each turn's source and edit distance.

    The SFT format's rules (:func:`rlhf_pl.data.formats.parse_conversation`: roles system, user,
    assistant; system only first; non-blank contents; at least one assistant turn, unless
    ``last_role`` is asked for instead) plus: at most ``max_turns`` turns, contents and suggestions of
    at most ``max_chars`` characters, a suggestion only on an assistant turn. Raises ValueError naming
    the turn index and the problem.
    """
    if not turns:
        raise ValueError("the conversation has no turns: add a user turn and an assistant turn")
    if len(turns) > max_turns:
        raise ValueError(f"{len(turns)} turns: a demonstration has at most {max_turns}")
    checked = [_check_turn(i, turn, max_chars) for i, turn in enumerate(turns)]
    if last_role is not None and checked[-1].role != last_role:
        raise ValueError(f"turn {len(checked) - 1} is a {checked[-1].role} turn: the conversation must end "
                         f"with a {last_role} turn here")
    if last_role is None and not any(t.role == "assistant" for t in checked):
        raise ValueError("the conversation has no assistant turn: a demonstration needs at least one")
    if last_role is None:
        try:  # the export's own parser is the last word: what is stored must read into +stage=sft
            formats.parse_conversation({"messages": [{"role": t.role, "content": t.content} for t in checked]},
                                       "demonstration")
        except formats._RecordError as err:
            raise ValueError(str(err)) from None
    return checked


def _check_turn(i: int, turn: dict[str, Any], max_chars: int) -> Turn:
    """Turn ``i`` validated (see :func:`check_turns`)."""
    role, content, suggestion = turn.get("role"), turn.get("content"), turn.get("suggestion")
    if role not in ROLES:
        raise ValueError(f"turn {i}: role {role!r} is not one of {', '.join(ROLES)}")
    if role == "system" and i != 0:
        raise ValueError(f"turn {i}: a system turn can only be the first turn")
    if not isinstance(content, str) or not content.strip():
        raise ValueError(f"turn {i} ({role}): the text is empty; write something or remove the turn")
    if len(content) > max_chars:
        raise ValueError(f"turn {i} ({role}): {len(content)} characters, more than the {max_chars} allowed "
                         "(app.max_message_chars)")
    if text_problem(content):
        raise ValueError(f"turn {i} ({role}): the text {text_problem(content)}")
    if suggestion is None:
        return Turn(role, content)
    if role != "assistant":
        raise ValueError(f"turn {i} ({role}): only an assistant turn can start from a suggestion")
    if not isinstance(suggestion, str):
        raise ValueError(f"turn {i} (assistant): the suggestion must be a text or null, "
                         f"got {type(suggestion).__name__}")
    if text_problem(suggestion):
        raise ValueError(f"turn {i} (assistant): the suggestion {text_problem(suggestion)}")
    if len(suggestion) > max_chars:
        raise ValueError(f"turn {i} (assistant): the suggestion has {len(suggestion)} characters, more than the "
                         f"{max_chars} allowed (app.max_message_chars)")
    return Turn(role, content, suggestion, "suggestion", edit_distance(suggestion, content))


def default_title(turns: Sequence[Turn], limit: int = 80) -> str:
    """A title from the first user turn's first line (at most ``limit`` characters)."""
    for turn in turns:
        if turn.role == "user":
            line = turn.content.strip().splitlines()[0].strip()
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return "Untitled demonstration"


def _iso(moment: Optional[datetime]) -> Optional[str]:
    """ISO 8601 in UTC (SQLite hands back naive datetimes: they were stored in UTC)."""
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()


def demonstration_record(conversation: Conversation, author: str) -> dict[str, Any]:
    """The SFT conversation record of a demonstration (its messages must be loadable: an open session
    or eagerly loaded), which :func:`rlhf_pl.data.formats.parse_conversation` accepts as it is.

    ``{"messages": [{role, content}], "demonstration_id", "title", "author", "turns_from_suggestion":
    [turn indices], "edit_distance": {"<turn>": chars}, "suggestions": {"<turn>": the suggestion it
    started from}, "created_at", "updated_at"}`` — the turn keys are strings so that the record is the
    same after a JSON round trip. Raises ValueError for a demonstration that was never saved (no
    messages): there is nothing to train on.
    """
    turns = selected_path(conversation.messages)
    if not turns:
        raise ValueError(f"demonstration {conversation.id} has no saved turns")
    from_suggestion = [i for i, m in enumerate(turns) if m.source == "suggestion"]
    return {
        "messages": [{"role": m.role, "content": m.content} for m in turns],
        "demonstration_id": conversation.id,
        "title": conversation.title,
        "author": author,
        "turns_from_suggestion": from_suggestion,
        "edit_distance": {str(i): turns[i].edit_distance for i in from_suggestion},
        "suggestions": {str(i): turns[i].suggestion for i in from_suggestion},
        "created_at": _iso(conversation.created_at),
        "updated_at": _iso(conversation.updated_at),
    }


def demo_view(conversation: Conversation) -> dict[str, Any]:
    """What ``GET /api/demos/{id}`` answers."""
    return {
        "id": conversation.id, "title": conversation.title,
        "created_at": _iso(conversation.created_at), "updated_at": _iso(conversation.updated_at),
        "messages": [{"position": m.position, "role": m.role, "content": m.content, "source": m.source,
                      "suggestion": m.suggestion, "edit_distance": m.edit_distance}
                     for m in selected_path(conversation.messages)],
    }


def demo_summary(conversation: Conversation) -> dict[str, Any]:
    """One row of the demonstrations list."""
    turns = selected_path(conversation.messages)
    return {"id": conversation.id, "title": conversation.title, "turns": len(turns),
            "assistant_turns": sum(m.role == "assistant" for m in turns),
            "from_suggestion": sum(m.source == "suggestion" for m in turns),
            "created_at": _iso(conversation.created_at), "updated_at": _iso(conversation.updated_at)}


# --- request bodies ---------------------------------------------------------------------------------


class NewDemo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: RequestKey
    title: str = Field("", max_length=TITLE_CHARS)


class TurnIn(BaseModel):
    """A turn as the editor sends it; the rules are checked by :func:`check_turns` (readable errors)."""

    model_config = ConfigDict(extra="forbid")
    role: str = Field(max_length=16)
    content: str
    suggestion: Optional[str] = None


class SaveDemo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[TurnIn] = Field(max_length=MAX_TURNS)
    title: Optional[str] = Field(None, max_length=TITLE_CHARS)


class SuggestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[TurnIn] = Field(max_length=MAX_TURNS)
    k: Optional[int] = None


# --- database work ----------------------------------------------------------------------------------


def own_demos(session: Session, user: User) -> list[Conversation]:
    """The user's demonstrations, most recently changed first (messages loaded)."""
    query = (select(Conversation).where(Conversation.user_id == user.id, Conversation.kind == KIND)
             .options(selectinload(Conversation.messages))
             .order_by(Conversation.updated_at.desc(), Conversation.id.desc()))
    return list(session.scalars(query))


def replace_turns(session: Session, conversation: Conversation, turns: Sequence[Turn]) -> None:
    """Put ``turns`` in place of the conversation's messages (inside the caller's transaction)."""
    old = select(Message.id).where(Message.conversation_id == conversation.id)
    session.execute(delete(Rating).where(Rating.message_id.in_(old)))  # none expected on a demonstration
    session.execute(delete(Message).where(Message.conversation_id == conversation.id))
    session.expire(conversation, ["messages"])  # the collection held the rows just deleted
    now = utcnow()
    session.add_all(Message(conversation_id=conversation.id, position=i, alternative=0, selected=True,
                            role=t.role, content=t.content, source=t.source, suggestion=t.suggestion,
                            edit_distance=t.edit_distance, created_at=now) for i, t in enumerate(turns))
    conversation.updated_at = now
    session.flush()


def _locked(session: Session, request: Request, user: User, demo_id: int) -> Conversation:
    """The user's demonstration, its row locked for the transaction (PostgreSQL: concurrent saves of
    one demonstration queue up; SQLite serialises writers anyway)."""
    session.scalar(select(Conversation).where(Conversation.id == demo_id).with_for_update())
    return own_conversation(request, session, user, demo_id, KIND)


def _unprocessable(request: Request, user: User, err: ValueError) -> HTTPException:
    return refuse(request, 422, str(err), user)


# --- routes -----------------------------------------------------------------------------------------


@router.get("/write")
def write_page(request: Request, user: CurrentUser, db: DB, d: Optional[int] = None) -> Response:
    """The page: the user's demonstrations and the editor (``?d=<id>`` opens one of them)."""
    demos = [demo_summary(c) for c in own_demos(db, user)]
    missing = d is not None and not any(row["id"] == d for row in demos)
    if missing:
        refuse(request, 404, f"no {KIND} {d} of yours", user)  # logged; the page still shows the user's own list
    settings = request.app.state.settings
    worker = request.app.state.worker
    k_max = _k_limit(settings, worker)
    return page(request, "write.html", user, status_code=404 if missing else 200, active="write", demos=demos,
                selected=None if missing else d, missing=d if missing else None, has_worker=worker is not None,
                k_default=min(settings.suggestions, k_max), k_max=k_max, max_turns=MAX_TURNS)


@router.get("/api/demos")
def list_demos(user: CurrentUser, db: DB) -> dict[str, Any]:
    return {"demos": [demo_summary(c) for c in own_demos(db, user)]}


@router.post("/api/demos")
def create_demo(request: Request, body: NewDemo, user: CurrentUser) -> dict[str, Any]:
    """A new, empty demonstration (idempotent by ``key``)."""
    policy = request.app.state.settings.policy

    def work(session: Session) -> dict[str, Any]:
        conversation = Conversation(user_id=user.id, kind=KIND, title=body.title.strip(), policy=policy)
        session.add(conversation)
        session.flush()
        return {"id": conversation.id}

    return once(request.app.state.db, user, body.key, work)


@router.get("/api/demos/{demo_id}")
def get_demo(request: Request, demo_id: int, user: CurrentUser, db: DB) -> dict[str, Any]:
    return demo_view(own_conversation(request, db, user, demo_id, KIND))


@router.put("/api/demos/{demo_id}")
def save_demo(request: Request, demo_id: int, body: SaveDemo, user: CurrentUser) -> dict[str, Any]:
    """Replace the demonstration's turns (and title, if given) in one transaction."""
    settings = request.app.state.settings
    try:
        turns = check_turns([t.model_dump() for t in body.messages], max_chars=settings.max_message_chars)
    except ValueError as err:
        raise _unprocessable(request, user, err) from None
    with request.app.state.db.transaction() as session:
        conversation = _locked(session, request, user, demo_id)
        if body.title is not None:
            conversation.title = body.title.strip()
        if not conversation.title:
            conversation.title = default_title(turns)
        replace_turns(session, conversation, turns)
        return demo_view(conversation)


@router.delete("/api/demos/{demo_id}")
def delete_demo(request: Request, demo_id: int, user: CurrentUser) -> dict[str, Any]:
    with request.app.state.db.transaction() as session:
        conversation = _locked(session, request, user, demo_id)
        replace_turns(session, conversation, [])
        session.delete(conversation)
    return {"deleted": demo_id}


def _k_limit(settings: Any, worker: Any) -> int:
    """The most suggestions one request may ask for."""
    return max(1, min(settings.max_k, worker.max_batch)) if worker is not None else max(1, settings.max_k)


@router.post("/api/demos/{demo_id}/suggestions")
async def suggest(request: Request, demo_id: int, body: SuggestIn, user: CurrentUser, db: DB) -> dict[str, Any]:
    """k samples of the next assistant turn from the served policy (nothing stored)."""
    await run_in_threadpool(own_conversation, request, db, user, demo_id, KIND)
    worker = worker_of(request)
    settings = request.app.state.settings
    limit = _k_limit(settings, worker)
    k = min(settings.suggestions, limit) if body.k is None else body.k
    if not 1 <= k <= limit:
        raise refuse(request, 422, f"k={k}: ask for 1 to {limit} suggestions (app.max_k and the worker's batch size)",
                     user)
    try:
        turns = check_turns([t.model_dump() for t in body.messages], max_chars=settings.max_message_chars,
                            last_role="user")
    except ValueError as err:
        raise _unprocessable(request, user, err) from None
    messages = [formats.Message(t.role, t.content) for t in turns]
    try:
        stream = worker.submit(messages, n=k, max_new_tokens=settings.max_new_tokens)
    except GenerationError as err:
        raise refuse(request, 422, f"cannot ask the model: {err}", user) from None
    try:
        texts = await stream.result()
    except GenerationError as err:
        raise refuse(request, 503, f"the suggestions failed: {err}", user) from None
    except asyncio.CancelledError:
        stream.cancel()  # the client went away: free the worker's rows
        raise
    return {"suggestions": texts}
