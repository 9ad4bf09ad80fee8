"""What the app's areas share: idempotent submissions, the worker, checked text, ownership checks."""
from __future__ import annotations

from typing import Annotated, Any, Callable, Optional

from fastapi import HTTPException, Request
from pydantic import StringConstraints
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf_pl.app.db import Conversation, Submission, User
from rlhf_pl.app.security import refuse
from rlhf_pl.app.worker import InferenceWorker

# A client-made idempotency key (a UUID per submission attempt: a retry sends the same key).
RequestKey = Annotated[str, StringConstraints(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


def text_problem(text: str) -> Optional[str]:
    """Why a text typed by a person cannot be stored as it is, or None: a NUL character (PostgreSQL text
    cannot hold one; refused on SQLite too, so both behave alike) or an unpaired surrogate."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000); remove it"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate (not valid Unicode text)"
    return None


def checked_text(name: str, text: str, limit: int, setting: Optional[str] = None, *, blank: bool = False) -> str:
    """``text`` if it has at most ``limit`` characters, is not blank (unless ``blank``) and can be stored
    (:func:`text_problem`), else 422 naming the field, its length, the limit and the setting that makes it."""
    if len(text) > limit:
        where = f" ({setting})" if setting else ""
        raise HTTPException(422, f"{name}: {len(text)} characters, at most {limit} are allowed{where}")
    if not blank and not text.strip():
        raise HTTPException(422, f"{name}: must not be empty")
    problem = text_problem(text)
    if problem:
        raise HTTPException(422, f"{name}: {problem}")
    return text


def stored_result(session: Session, user: User, key: str) -> Optional[dict[str, Any]]:
    """The result stored under ``(user, key)`` by :func:`once`, or None."""
    found = session.scalar(select(Submission).where(Submission.user_id == user.id, Submission.key == key))
    return None if found is None else dict(found.result)


def once(db: Any, user: User, key: str, work: Callable[[Session], dict[str, Any]]) -> dict[str, Any]:
    """Run ``work`` and store its result under ``(user, key)`` in one transaction; a request repeating
    ``key`` gets the stored result (with ``repeated: True``) without running ``work`` again (also when
    both race: the unique key lets one commit, the other reads what it stored)."""
    def previous() -> Optional[dict[str, Any]]:
        with db.sessions() as session:
            found = stored_result(session, user, key)
        return None if found is None else dict(found, repeated=True)

    earlier = previous()
    if earlier is not None:
        return earlier
    try:
        with db.transaction() as session:
            result = work(session)
            session.add(Submission(user_id=user.id, key=key, result=result))
        return result
    except IntegrityError:
        earlier = previous()
        if earlier is None:
            raise
        return earlier


def worker_of(request: Request) -> InferenceWorker:
    worker = request.app.state.worker
    if worker is None:
        raise HTTPException(503, "this app serves no model (started without one); chat and suggestions are off")
    return worker


def own_conversation(request: Request, session: Session, user: User, conversation_id: int, kind: str) -> Conversation:
    """The user's conversation of ``kind``; 404 (logged) for another user's or a missing one — the
    same answer, so ids of other people's work reveal nothing."""
    conversation = session.get(Conversation, conversation_id)
    if conversation is None or conversation.user_id != user.id or conversation.kind != kind:
        raise refuse(request, 404, f"no {kind} {conversation_id} of yours", user)
    return conversation

