"""What the app's areas share: idempotent submissions, the worker, bounded text, ownership checks."""
from __future__ import annotations

from typing import Annotated, Any, Callable, Optional

from fastapi import HTTPException, Request
from pydantic import AfterValidator, StringConstraints
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf_pl.app.db import Conversation, Submission, User
from rlhf_pl.app.security import refuse
from rlhf_pl.app.worker import InferenceWorker

# A client-made idempotency key (a UUID per submission attempt: a retry sends the same key).
RequestKey = Annotated[str, StringConstraints(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def bounded_text(limit: int, *, blank: bool = False) -> Any:
    """A str type of at most ``limit`` characters (and not blank unless ``blank``), for request models."""
    constraints = StringConstraints(max_length=limit)
    return Annotated[str, constraints] if blank else Annotated[str, constraints, AfterValidator(_not_blank)]


def once(db: Any, user: User, key: str, work: Callable[[Session], dict[str, Any]]) -> dict[str, Any]:
    """Run ``work`` and store its result under ``(user, key)`` in one transaction; a request repeating
    ``key`` gets the stored result without running ``work`` again (also when both race: the unique
    key lets one commit, the other reads what it stored)."""
    def stored() -> Optional[dict[str, Any]]:
        with db.sessions() as session:
            found = session.scalar(select(Submission).where(Submission.user_id == user.id, Submission.key == key))
            return None if found is None else dict(found.result, repeated=True)

    previous = stored()
    if previous is not None:
        return previous
    try:
        with db.transaction() as session:
            result = work(session)
            session.add(Submission(user_id=user.id, key=key, result=result))
        return result
    except IntegrityError:
        previous = stored()
        if previous is None:
            raise
        return previous


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
