"""Chat with the served policy: conversations, answers streamed token by token, regenerations, ratings, export.

Routes (every one needs a session; the POSTs need the CSRF header):

- ``GET  /chat?c=<id>`` — the page: the user's chats and the open one (``static/chat.js`` drives it).
- ``GET  /api/chats`` — the user's chats, most recently changed first.
- ``POST /api/chats {title?, key}`` — a new chat -> ``{"id", "title"}`` (idempotent by ``key``).
- ``GET  /api/chats/{id}`` — the chat: its messages grouped by position with every alternative, which one
  is selected, the user's rating of each assistant message, ``answerable`` (the position that
  regenerate accepts) and ``generating`` (an answer is being streamed).
- ``POST /api/chats/{id}/messages {content, key}`` — store a user message and stream the answer.
- ``POST /api/chats/{id}/regenerate {position, key}`` — stream a new alternative of the last answer
  (or the missing answer to a last user message); it becomes the selected one, older ones are kept.
- ``POST /api/chats/{id}/select {position, alternative}`` — which alternative of the last answer the
  chat goes on from.
- ``POST /api/messages/{id}/rating {value, reason}`` — thumbs up (1) or down (-1) on an assistant message of
  one's own chat, with an optional reason; one rating per user and message (a new one replaces it).
- ``GET  /api/chats/{id}/export`` — the chat in the SFT conversation format (``rlhf_pl.data.formats``):
  ``{"messages": [{"role", "content"}, ...], "source": "chat", "conversation_id", "title", "policy",
  "created_at", "turns": [...]}``: the selected alternatives up to the last answer; ``turns`` has, per
  answer on that path, its alternative, how many there are, and the user's rating and reason. It is one
  JSON line, downloaded as ``chat-<id>.jsonl``: a conversation file that ``+stage=sft`` reads unchanged.

The two streaming routes answer ``application/x-ndjson``, one JSON object a line::

    {"start": true, "position": p, "user_message_id": u, "user_position": p - 1}   (regenerate: no user_*)
    {"text": "<delta>"} ...
    {"done": true, "message_id": m, "position": p, "alternative": a, "content": "<answer>", "truncated": bool}

or, instead of ``done``, a last ``{"error": "<one sentence>"}`` (nothing stored). The deltas add up to
the stored answer (leading and trailing white space, which the worker strips, is never sent; a NUL
character, which PostgreSQL cannot store, comes from the worker as U+FFFD). Text sent in (content,
reason, title) with a NUL character or an unpaired surrogate is refused (422).
``truncated``: the answer ran into ``app.max_new_tokens``. A replayed answer (a retry, below) comes as
one text event, and its ``start`` and ``done`` say ``"repeated": true`` (``done`` without ``truncated``,
which is not stored). Errors before the stream starts are the usual
JSON ``{"error"}`` with a status (404 another user's chat, 409 conflicts, 422 bad input, 503 no model).

Design:

- A chat's positions alternate user (even) and assistant (odd) turns. A user message has one
  alternative; an assistant position collects its regenerations as alternatives 0, 1, …, exactly one
  of them ``selected``. The prompt given to the worker is the selected alternatives in order.
- Only the last answer can be regenerated or re-selected (409 otherwise): the later turns replied to
  the selected alternative, and making another one current would make them replies to text the model
  never saw. Earlier alternatives stay readable (the page browses them) and can be rated.
- An answer is stored (source ``model``; the chat's ``policy`` set to ``app.policy``) only once its
  generation finished. A stream the client closes (a closed tab, the Stop button) cancels the
  generation and stores nothing; an empty answer is not stored either. The user message then stays at
  the end, unanswered: regenerate at the position after it answers it, and a new message is refused
  (409) until then.
- One generation per chat at a time: a second request while one streams gets 409 (the app runs in one
  process, which keeps the set of chats being answered).
- Idempotency: ``messages`` stores the user message with :func:`rlhf_pl.app.common.once` under the
  client's key. A retry with that key never stores it again: if the message has an answer the retry
  streams that stored answer again (events marked ``"repeated": true``) without generating; if it has
  none (the first stream was cancelled or failed) the retry generates it; while the first one still
  streams the retry gets 409. ``regenerate`` stores the new alternative together with its key in one
  transaction (``once``), so a retry after it finished replays it and one after a cancel generates.
  A key reused for a different request gets 409. Creating a chat uses ``once``; select and rating set
  a state (a repeat changes nothing).
- The web server never blocks on generation: the streaming handlers are ``async`` and do their
  database work in the thread pool; the model runs in the inference worker's thread
  (:mod:`rlhf_pl.app.worker`). The request's read session is closed before a stream starts, so a long
  answer holds no database connection.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional

import anyio
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, StrictInt
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from rlhf_pl.app.common import (
    RequestKey,
    checked_text,
    once,
    own_conversation,
    stored_result,
    worker_of,
)
from rlhf_pl.app.db import (
    Conversation,
    Database,
    Message,
    Rating,
    User,
    by_position,
    chosen,
    once_more_on_conflict,
    selected_path,
    utcnow,
)
from rlhf_pl.app.security import DB, CurrentUser, refuse
from rlhf_pl.app.server import page
from rlhf_pl.app.worker import GenerationError, InferenceWorker, Stream
from rlhf_pl.data import formats

log = logging.getLogger("rlhf_pl.app.chat")
router = APIRouter()

KIND = "chat"
TITLE_CHARS = 60  # a chat without a title is named after the start of its first message
MAX_TITLE = 200  # the column's size
NDJSON = "application/x-ndjson"
EMPTY_ANSWER = "the model's answer was empty, so it was not stored; press regenerate for another"


# --- request bodies ---------------------------------------------------------------------------------


class NewChat(BaseModel):
    title: str = ""
    key: RequestKey


class SendBody(BaseModel):
    content: str
    key: RequestKey


class RegenerateBody(BaseModel):
    position: StrictInt
    key: RequestKey


class SelectBody(BaseModel):
    position: StrictInt
    alternative: StrictInt


class RatingBody(BaseModel):
    value: StrictInt
    reason: str = ""


def title_from(content: str, limit: int = TITLE_CHARS) -> str:
    """A chat title from its first message: white space collapsed, at most ``limit`` characters."""
    line = " ".join(content.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


# --- the shape of a chat (pure: lists of Message rows; by_position and selected_path: rlhf_pl.app.db) --


def answerable(messages: list[Message]) -> Optional[int]:
    """The one position regenerate accepts: the last position if it is an answer, the next one if the
    chat ends with an unanswered user message, None for an empty chat."""
    path = selected_path(messages)
    if not path:
        return None
    last = path[-1]
    return last.position if last.role == "assistant" else last.position + 1


def prompt_before(messages: list[Message], position: int) -> list[formats.Message]:
    """What the worker answers at ``position``: the selected messages before it."""
    return [formats.Message(m.role, m.content) for m in selected_path(messages) if m.position < position]


class Trimmed:
    """Streamed text with the ends that the worker strips from the final answer held back: leading white
    space is never sent and trailing white space waits until more text follows, so that the deltas
    sent add up to the stored answer."""

    def __init__(self) -> None:
        self.raw = ""  # everything the worker streamed
        self.sent = ""  # what was passed on: always a prefix of the final, stripped answer

    def add(self, delta: str) -> str:
        """The part of ``delta`` that can be sent now."""
        self.raw += delta
        visible = self.raw.strip()  # grows by extension: the stripped text of a longer raw text starts with it
        out, self.sent = visible[len(self.sent):], visible
        return out

    def finish(self, final: str) -> str:
        """What is still to be sent of ``final`` (e.g. a last character the worker held back)."""
        return final[len(self.sent):] if final.startswith(self.sent) else ""


# --- database work (sync; the streaming handlers run it in the thread pool) ---------------------------


def load_messages(session: Session, conversation_id: int) -> list[Message]:
    return list(session.scalars(select(Message).where(Message.conversation_id == conversation_id)
                                .order_by(Message.position, Message.alternative)))


def check_owner(db: Database, request: Request, user: User, conversation_id: int) -> None:
    """404 (logged) unless ``conversation_id`` is one of the user's chats."""
    with db.sessions() as session:
        own_conversation(request, session, user, conversation_id, KIND)


def own_message(request: Request, session: Session, user: User, message_id: int) -> Message:
    """A message of one of the user's chats; 404 (logged) for another user's or a missing one."""
    message = session.get(Message, message_id)
    if message is not None:
        conversation = session.get(Conversation, message.conversation_id)
        if conversation is not None and conversation.user_id == user.id and conversation.kind == KIND:
            return message
    raise refuse(request, 404, f"no chat message {message_id} of yours", user)


def ratings_of(session: Session, user: User, messages: list[Message]) -> dict[int, Rating]:
    """The user's ratings of ``messages`` by message id."""
    ids = [m.id for m in messages if m.role == "assistant"]
    if not ids:
        return {}
    found = session.scalars(select(Rating).where(Rating.user_id == user.id, Rating.message_id.in_(ids)))
    return {r.message_id: r for r in found}


def describe(conversation: Conversation, messages: list[Message], ratings: dict[int, Rating],
             generating: bool) -> dict[str, Any]:
    """The JSON view of a chat (GET /api/chats/{id})."""
    positions = []
    for position, alternatives in by_position(messages).items():
        positions.append({
            "position": position, "role": alternatives[0].role, "selected": chosen(alternatives).alternative,
            "alternatives": [{
                "id": m.id, "alternative": m.alternative, "content": m.content, "source": m.source,
                "selected": m is chosen(alternatives), "created_at": m.created_at.isoformat(),
                "rating": None if m.id not in ratings else {"value": ratings[m.id].value,
                                                            "reason": ratings[m.id].reason}}
                for m in alternatives]})
    return {"id": conversation.id, "title": conversation.title, "policy": conversation.policy,
            "created_at": conversation.created_at.isoformat(), "updated_at": conversation.updated_at.isoformat(),
            "answerable": answerable(messages), "generating": generating, "positions": positions}


def summary(conversation: Conversation, count: int) -> dict[str, Any]:
    return {"id": conversation.id, "title": conversation.title, "messages": count,
            "updated_at": conversation.updated_at.isoformat()}


def list_chats(session: Session, user: User) -> list[dict[str, Any]]:
    """The user's chats, most recently changed first, with their number of positions."""
    counts = (select(Message.conversation_id, func.count(func.distinct(Message.position)).label("n"))
              .group_by(Message.conversation_id).subquery())
    rows = session.execute(select(Conversation, func.coalesce(counts.c.n, 0))
                           .outerjoin(counts, counts.c.conversation_id == Conversation.id)
                           .where(Conversation.user_id == user.id, Conversation.kind == KIND)
                           .order_by(Conversation.updated_at.desc(), Conversation.id.desc()))
    return [summary(conversation, n) for conversation, n in rows]


def store_user_message(request: Request, session: Session, user: User, conversation_id: int,
                       content: str) -> dict[str, Any]:
    """Add ``content`` as the next user turn (409 if the last one is still unanswered)."""
    conversation = own_conversation(request, session, user, conversation_id, KIND)
    messages = load_messages(session, conversation_id)
    path = selected_path(messages)
    if path and path[-1].role == "user":
        raise HTTPException(409, f"the last message (position {path[-1].position}) has no answer yet: press "
                                 f"regenerate to answer it (regenerate position {path[-1].position + 1})")
    position = path[-1].position + 1 if path else 0
    message = Message(conversation_id=conversation_id, position=position, alternative=0, selected=True,
                      role="user", content=content, source="human")
    session.add(message)
    if not conversation.title:
        conversation.title = title_from(content)
    conversation.updated_at = utcnow()
    session.flush()
    return {"kind": "chat-message", "conversation_id": conversation_id, "message_id": message.id,
            "position": position}


class ChatChanged(Exception):
    """The chat is no longer where the answer was asked for (it is then not stored)."""


def store_answer(session: Session, conversation_id: int, position: int, text: str, policy: str) -> dict[str, Any]:
    """Add ``text`` as a new selected alternative at ``position`` (the others there are deselected)."""
    messages = load_messages(session, conversation_id)
    if answerable(messages) != position:
        raise ChatChanged(f"chat {conversation_id} changed while answering (position {position} is no longer the "
                          "last answer); the answer was not stored")
    alternatives = [m for m in messages if m.position == position]
    for other in alternatives:
        other.selected = False
    message = Message(conversation_id=conversation_id, position=position,
                      alternative=max((m.alternative for m in alternatives), default=-1) + 1, selected=True,
                      role="assistant", content=text, source="model")
    session.add(message)
    conversation = session.get(Conversation, conversation_id)
    conversation.policy, conversation.updated_at = policy, utcnow()
    session.flush()
    return {"kind": "chat-answer", "conversation_id": conversation_id, "message_id": message.id,
            "position": position, "alternative": message.alternative}


def replayed(message: Message) -> dict[str, Any]:
    """The done event of a stored answer sent again (whether it was truncated is not stored)."""
    return {"done": True, "message_id": message.id, "position": message.position,
            "alternative": message.alternative, "content": message.content, "repeated": True}


@dataclass
class Plan:
    """What a streaming request does: replay a stored answer, or generate the answer at ``position``."""

    conversation_id: int
    position: int
    start: dict[str, Any]
    prompt: list[formats.Message] = field(default_factory=list)
    replay: Optional[dict[str, Any]] = None  # the done event of the stored answer a retry gets again


def key_reused(key: str) -> HTTPException:
    return HTTPException(409, f"key {key!r} was already used for a different request; make a new key")


def plan_send(db: Database, request: Request, user: User, conversation_id: int, content: str, key: str) -> Plan:
    """Store the user message (once per key) and plan its answer: replay it if it exists, else generate."""
    try:
        stored = once(db, user, key, lambda s: store_user_message(request, s, user, conversation_id, content))
    except IntegrityError:  # the same position taken meanwhile by another of the user's requests
        raise HTTPException(409, f"chat {conversation_id} changed meanwhile; reload it") from None
    if stored.get("kind") != "chat-message" or stored.get("conversation_id") != conversation_id:
        raise key_reused(key)
    with db.sessions() as session:
        question = session.get(Message, stored["message_id"])
        if question is None or question.content != content:
            raise key_reused(key)
        messages = load_messages(session, conversation_id)
    position = question.position + 1
    start = {"start": True, "position": position, "user_message_id": question.id, "user_position": question.position}
    answers = by_position(messages).get(position)
    if answers:
        return Plan(conversation_id, position, dict(start, repeated=True),
                    replay=replayed(chosen(answers)))
    return Plan(conversation_id, position, start, prompt=prompt_before(messages, position))


def plan_regenerate(db: Database, request: Request, user: User, conversation_id: int, position: int,
                    key: str) -> Plan:
    """Plan a new alternative at ``position`` (409 unless it is the last answer), or the replay of the one
    already made with ``key``."""
    start = {"start": True, "position": position}
    with db.sessions() as session:
        own_conversation(request, session, user, conversation_id, KIND)
        result = stored_result(session, user, key)
        if result is not None:
            if (result.get("kind"), result.get("conversation_id"), result.get("position")) != (
                    "chat-answer", conversation_id, position):
                raise key_reused(key)
            return Plan(conversation_id, position, dict(start, repeated=True),
                        replay=replayed(session.get(Message, result["message_id"])))
        messages = load_messages(session, conversation_id)
    allowed = answerable(messages)
    if allowed is None:
        raise HTTPException(409, f"chat {conversation_id} has no message to answer yet; send one first")
    if position != allowed:
        raise HTTPException(409, f"position {position}: only the last answer (position {allowed}) can be "
                                 "regenerated; the later turns replied to the selected alternative")
    return Plan(conversation_id, position, start, prompt=prompt_before(messages, position))


# --- streaming ----------------------------------------------------------------------------------------


def line(event: dict[str, Any]) -> bytes:
    return (json.dumps(event, ensure_ascii=False) + "\n").encode()


class ClosingStream(StreamingResponse):
    """A streamed response that stops its generator as soon as the client goes away (whatever ASGI spec
    version the server speaks), closes it, and then calls ``on_close`` (also when it never started)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Optional[Callable[[], None]] = None) -> None:
        super().__init__(content, media_type=NDJSON, headers={"Cache-Control": "no-store",
                                                              "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream_then_stop() -> None:
                    with contextlib.suppress(OSError):  # the client left while a line was being sent
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)  # returns when the client disconnects
                group.cancel_scope.cancel()
        finally:
            if self.on_close is not None:
                self.on_close()
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # runs the generator's finally if it stopped at a yield


async def replay_events(plan: Plan) -> AsyncIterator[bytes]:
    """A stored answer sent again as one stream."""
    yield line(plan.start)
    yield line({"text": plan.replay["content"]})
    yield line(plan.replay)


async def answer_events(plan: Plan, stream: Stream, store: Callable[[str], dict[str, Any]]) -> AsyncIterator[bytes]:
    """The worker's tokens as NDJSON lines; the answer is stored (``store(text)``) only when it is complete."""
    trimmed = Trimmed()
    try:
        yield line(plan.start)
        async for event in stream:
            if "text" in event:
                delta = trimmed.add(event["text"])
                if delta:
                    yield line({"text": delta})
            elif "error" in event:
                yield line({"error": str(event["error"])})
                return
            elif event.get("done"):
                text = event["texts"][0].strip()
                if not text:
                    yield line({"error": EMPTY_ANSWER})
                    return
                rest = trimmed.finish(text)
                if rest:
                    yield line({"text": rest})
                try:
                    stored = await run_in_threadpool(store, text)
                except ChatChanged as err:
                    yield line({"error": str(err)})
                    return
                except Exception as err:  # the status (200) is sent already: the client learns it from the stream
                    log.exception("storing the answer of chat %d failed", plan.conversation_id)
                    yield line({"error": f"the answer could not be stored ({type(err).__name__}); try again"})
                    return
                yield line({"done": True, "message_id": stored["message_id"], "position": stored["position"],
                            "alternative": stored["alternative"], "content": text,
                            "truncated": not event["ended"][0]})
                return
        yield line({"error": "the generation ended without an answer"})
    finally:
        stream.cancel()  # a closed stream stops the generation (and stores nothing); a no-op once it ended


def generating(request: Request) -> dict[int, Optional[Stream]]:
    """The chats that are being answered now (in this process), by id. Touched on the event loop only."""
    state = request.app.state
    if not hasattr(state, "chat_generating"):
        state.chat_generating = {}
    return state.chat_generating


def claim(request: Request, conversation_id: int) -> None:
    """Mark the chat as being answered; 409 if it already is."""
    busy = generating(request)
    if conversation_id in busy:
        raise HTTPException(409, f"chat {conversation_id} is being answered already; wait for that answer "
                                 "or stop it")
    busy[conversation_id] = None


async def stream_answer(request: Request, user: User, conversation_id: int,
                        make_plan: Callable[[], Plan], store: Callable[[Plan, str], dict[str, Any]]) -> Response:
    """The shared body of the streaming routes: ownership, one generation per chat, the plan, the stream."""
    worker: InferenceWorker = worker_of(request)
    db = request.app.state.db
    await run_in_threadpool(check_owner, db, request, user, conversation_id)
    claim(request, conversation_id)
    busy = generating(request)

    def release() -> None:
        busy.pop(conversation_id, None)

    try:
        plan = await run_in_threadpool(make_plan)
        if plan.replay is not None:
            release()
            return ClosingStream(replay_events(plan))
        try:
            stream = worker.submit(plan.prompt, max_new_tokens=request.app.state.settings.max_new_tokens)
        except GenerationError as err:
            raise HTTPException(422, f"the chat cannot be answered: {err}") from None
    except BaseException:
        release()
        raise
    busy[conversation_id] = stream

    def stop() -> None:
        stream.cancel()
        release()

    return ClosingStream(answer_events(plan, stream, lambda text: store(plan, text)), on_close=stop)


def release_session(session: Session) -> None:
    """End the request's read session (the user is loaded already): a long stream then holds no connection."""
    session.close()


# --- routes -------------------------------------------------------------------------------------------


@router.get("/chat")
def chat_page(request: Request, user: CurrentUser, session: DB, c: Optional[int] = None) -> Response:
    open_id = None
    if c is not None:
        open_id = own_conversation(request, session, user, c, KIND).id
    return page(request, "chat.html", user, active="chat", conversations=list_chats(session, user), open_id=open_id)


@router.get("/api/chats")
def chats(user: CurrentUser, session: DB) -> dict[str, Any]:
    return {"chats": list_chats(session, user)}


@router.post("/api/chats")
def new_chat(request: Request, body: NewChat, user: CurrentUser) -> dict[str, Any]:
    title = " ".join(checked_text("title", body.title, MAX_TITLE, blank=True).split())

    def create(session: Session) -> dict[str, Any]:
        conversation = Conversation(user_id=user.id, kind=KIND, title=title)
        session.add(conversation)
        session.flush()
        return {"kind": "chat", "id": conversation.id, "title": title}

    result = once(request.app.state.db, user, body.key, create)
    if result.get("kind") != "chat":
        raise key_reused(body.key)
    return {k: v for k, v in result.items() if k != "kind"}


@router.get("/api/chats/{conversation_id}")
def get_chat(request: Request, conversation_id: int, user: CurrentUser, session: DB) -> dict[str, Any]:
    conversation = own_conversation(request, session, user, conversation_id, KIND)
    messages = load_messages(session, conversation_id)
    return describe(conversation, messages, ratings_of(session, user, messages),
                    conversation_id in generating(request))


@router.post("/api/chats/{conversation_id}/messages")
async def send_message(request: Request, conversation_id: int, body: SendBody, user: CurrentUser,
                       session: DB) -> Response:
    settings = request.app.state.settings
    content = checked_text("content", body.content, settings.max_message_chars, "app.max_message_chars")
    release_session(session)
    db = request.app.state.db

    def store(plan: Plan, text: str) -> dict[str, Any]:
        with db.transaction() as tx:
            return store_answer(tx, plan.conversation_id, plan.position, text, settings.policy)

    return await stream_answer(request, user, conversation_id,
                               lambda: plan_send(db, request, user, conversation_id, content, body.key), store)


@router.post("/api/chats/{conversation_id}/regenerate")
async def regenerate(request: Request, conversation_id: int, body: RegenerateBody, user: CurrentUser,
                     session: DB) -> Response:
    settings = request.app.state.settings
    release_session(session)
    db = request.app.state.db

    def store(plan: Plan, text: str) -> dict[str, Any]:
        result = once(db, user, body.key,
                      lambda tx: store_answer(tx, plan.conversation_id, plan.position, text, settings.policy))
        if result.get("repeated"):  # stored meanwhile under this key (cannot happen while the chat is claimed)
            raise ChatChanged(f"key {body.key!r} was used meanwhile; the answer was not stored")
        return result

    return await stream_answer(request, user, conversation_id,
                               lambda: plan_regenerate(db, request, user, conversation_id, body.position, body.key),
                               store)


@router.post("/api/chats/{conversation_id}/select")
def select_alternative(request: Request, conversation_id: int, body: SelectBody, user: CurrentUser) -> dict[str, Any]:
    with request.app.state.db.transaction() as session:
        conversation = own_conversation(request, session, user, conversation_id, KIND)
        messages = load_messages(session, conversation_id)
        path = selected_path(messages)
        if not path or path[-1].role != "assistant":
            raise HTTPException(409, f"position {body.position}: chat {conversation_id} does not end with an answer; "
                                     "there is nothing to select")
        if body.position != path[-1].position:
            raise HTTPException(409, f"position {body.position}: only the last answer (position "
                                     f"{path[-1].position}) can be selected; the later turns replied to the "
                                     "selected alternative")
        alternatives = by_position(messages)[body.position]
        numbers = [m.alternative for m in alternatives]
        if body.alternative not in numbers:
            raise HTTPException(422, f"alternative: {body.alternative} is not an alternative of position "
                                     f"{body.position}; choose one of {', '.join(map(str, numbers))}")
        for message in alternatives:
            message.selected = message.alternative == body.alternative
        conversation.updated_at = utcnow()
    return {"position": body.position, "selected": body.alternative}


@router.post("/api/messages/{message_id}/rating")
def rate(request: Request, message_id: int, body: RatingBody, user: CurrentUser) -> dict[str, Any]:
    settings = request.app.state.settings
    reason = checked_text("reason", body.reason, settings.max_message_chars, "app.max_message_chars", blank=True)
    if body.value not in (1, -1):
        raise HTTPException(422, f"value: {body.value} is not a rating; use 1 (thumbs up) or -1 (thumbs down)")
    db = request.app.state.db

    def upsert() -> dict[str, Any]:
        with db.transaction() as session:
            message = own_message(request, session, user, message_id)
            if message.role != "assistant":
                raise HTTPException(422, f"message {message_id} is a {message.role} message; only the "
                                         "assistant's answers are rated")
            rating = session.scalar(select(Rating).where(Rating.message_id == message_id, Rating.user_id == user.id))
            if rating is None:
                session.add(Rating(message_id=message_id, user_id=user.id, value=body.value, reason=reason))
            else:
                rating.value, rating.reason, rating.created_at = body.value, reason, utcnow()
        return {"message_id": message_id, "value": body.value, "reason": reason}

    # a concurrent first rating of the same message: the second insert becomes an update
    return once_more_on_conflict(upsert)


def export_record(conversation: Conversation, messages: list[Message], ratings: dict[int, Rating]) -> dict[str, Any]:
    """The chat in the SFT conversation format: the selected path up to its last answer, and metadata."""
    path = selected_path(messages)
    while path and path[-1].role != "assistant":
        path.pop()  # an unanswered last user message: nothing to learn from it
    grouped = by_position(messages)
    turns = [{"position": m.position, "alternative": m.alternative, "alternatives": len(grouped[m.position]),
              "source": m.source, "rating": ratings[m.id].value if m.id in ratings else None,
              "reason": ratings[m.id].reason if m.id in ratings else ""}
             for m in path if m.role == "assistant"]
    return {"messages": [{"role": m.role, "content": m.content} for m in path], "source": "chat",
            "conversation_id": conversation.id, "title": conversation.title, "policy": conversation.policy,
            "created_at": conversation.created_at.isoformat(), "turns": turns}


@router.get("/api/chats/{conversation_id}/export")
def export_chat(request: Request, conversation_id: int, user: CurrentUser, session: DB) -> Response:
    conversation = own_conversation(request, session, user, conversation_id, KIND)
    messages = load_messages(session, conversation_id)
    record = export_record(conversation, messages, ratings_of(session, user, messages))
    if not record["turns"]:
        raise HTTPException(409, f"chat {conversation_id} has no answer yet: nothing to export")
    # one JSON line: the downloaded chat-<id>.jsonl is a conversation file that +stage=sft reads as it is
    return Response(json.dumps(record, ensure_ascii=False) + "\n", media_type="application/json",
                    headers={"Content-Disposition": f'attachment; filename="chat-{conversation_id}.jsonl"'})
