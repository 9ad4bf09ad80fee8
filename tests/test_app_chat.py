"""The chat area of the feedback app (rlhf_pl/app/chat.py): API tests on SQLite and PostgreSQL with the
tiny model, and live-server tests (uvicorn on loopback) for a closed stream cancelling its generation and
for the server answering while a long answer streams.

The workers sample with EOS banned (NoEOSSampler), so that an answer is never empty by chance and a
long one runs for its whole budget unless it is cancelled.
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Iterator

import pytest
import torch
from app_helpers import live_server, login, make_harness, wait_until
from sqlalchemy import func, select

from rlhf_pl.app.db import Conversation, Message, Rating, Submission
from rlhf_pl.data import formats
from rlhf_pl.data.formats import Message as Turn

POLICY = "tiny-policy"
MAX_CHARS = 200


# --- helpers --------------------------------------------------------------------------------------


class FixedSampler:
    """Always draws ``token`` (EOS: every answer is empty)."""

    temperature = 1.0

    def __init__(self, token: int) -> None:
        self.token = token

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        warped = torch.full_like(logits, float("-inf"), dtype=torch.float32)
        warped[:, self.token] = 0.0
        return warped

    def sample(self, logits: torch.Tensor, generator: Any = None) -> torch.Tensor:
        return torch.full((logits.shape[0],), self.token, dtype=torch.long)


def chat_worker(model: Any, tokenizer: Any, sampler: Any = None, **kwargs: Any) -> Any:
    """A started worker on ``model`` (like app_helpers.make_worker) that samples with EOS banned, and
    records the prompt of every request in ``worker.prompts``."""
    from rlhf_pl.app.worker import InferenceWorker
    from rlhf_pl.plugins.samplers import NoEOSSampler

    kwargs.setdefault("max_new_tokens", 16)
    worker = InferenceWorker(model, tokenizer, sampler or NoEOSSampler(1.0, tokenizer.eos_token_id), **kwargs)
    worker.prompts = []
    submit = worker.submit

    def recording_submit(messages: Any, *args: Any, **kw: Any) -> Any:
        worker.prompts.append(list(messages))
        return submit(messages, *args, **kw)

    worker.submit = recording_submit
    worker.start()
    return worker




def harness_for(url: str, worker: Any, *users: str, **settings: Any) -> Any:
    """An app on ``url`` with ``worker`` and the accounts alice and ``users``."""
    settings.setdefault("policy", POLICY)
    settings.setdefault("max_message_chars", MAX_CHARS)
    harness = make_harness(url, worker, **settings)
    for name in ("alice", *users):
        harness.add_user(name)
    return harness


@pytest.fixture()
def app(database_url, tiny_model, tiny_tokenizer, one_thread):
    harness = harness_for(database_url, chat_worker(tiny_model, tiny_tokenizer))
    yield harness
    harness.close()


def events_of(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def new_chat(client: Any, key: str = "chat-key-1", **body: Any) -> int:
    response = client.post("/api/chats", json={"key": key, **body})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def send(client: Any, chat: int, content: str, key: str) -> list[dict[str, Any]]:
    return events_of(client.post(f"/api/chats/{chat}/messages", json={"content": content, "key": key}))


def regenerate(client: Any, chat: int, position: int, key: str) -> list[dict[str, Any]]:
    return events_of(client.post(f"/api/chats/{chat}/regenerate", json={"position": position, "key": key}))


def streamed_text(events: list[dict[str, Any]]) -> str:
    """The concatenated deltas, checking the stream's shape: start, texts, done."""
    assert events[0]["start"] is True
    assert "done" in events[-1], events[-1]
    middle = events[1:-1]
    assert middle and all(set(e) == {"text"} for e in middle), middle
    return "".join(e["text"] for e in middle)


def rows(harness: Any, chat: int) -> list[tuple]:
    """The chat's messages as (position, alternative, selected, role, content, source), in order."""
    with harness.db.sessions() as session:
        found = session.scalars(select(Message).where(Message.conversation_id == chat)
                                .order_by(Message.position, Message.alternative))
        return [(m.position, m.alternative, m.selected, m.role, m.content, m.source) for m in found]


def count(harness: Any, model: Any) -> int:
    with harness.db.sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def snapshot(harness: Any) -> dict[str, Any]:
    """Everything the chat routes can change."""
    with harness.db.sessions() as session:
        return {
            "messages": sorted((m.id, m.conversation_id, m.position, m.alternative, m.selected, m.content)
                               for m in session.scalars(select(Message))),
            "ratings": sorted((r.message_id, r.user_id, r.value, r.reason) for r in session.scalars(select(Rating))),
            "conversations": sorted((c.id, c.user_id, c.title, c.policy)
                                    for c in session.scalars(select(Conversation))),
            "submissions": count(harness, Submission),
        }


# --- sending and streaming ------------------------------------------------------------------------


def test_send_streams_the_answer_and_stores_it(app):
    alice = app.client("alice")
    chat = new_chat(alice)
    events = send(alice, chat, "Hello there", "send-key-01")
    first = rows(app, chat)
    assert events[0] == {"start": True, "position": 1, "user_message_id": events[0]["user_message_id"],
                         "user_position": 0}
    answer = streamed_text(events)
    assert answer and answer == answer.strip()
    done = events[-1]
    assert done == {"done": True, "message_id": done["message_id"], "position": 1, "alternative": 0,
                    "content": answer, "truncated": True}  # EOS banned: it ran to max_new_tokens
    assert first == [(0, 0, True, "user", "Hello there", "human"), (1, 0, True, "assistant", answer, "model")]
    assert app.worker.prompts == [[Turn("user", "Hello there")]]

    second = streamed_text(send(alice, chat, "And then?", "send-key-02"))
    assert app.worker.prompts[1] == [Turn("user", "Hello there"), Turn("assistant", answer), Turn("user", "And then?")]
    assert rows(app, chat)[2:] == [(2, 0, True, "user", "And then?", "human"),
                                   (3, 0, True, "assistant", second, "model")]
    with app.db.sessions() as session:
        conversation = session.get(Conversation, chat)
        assert (conversation.title, conversation.policy, conversation.kind) == ("Hello there", POLICY, "chat")

    view = alice.get(f"/api/chats/{chat}").json()
    assert (view["id"], view["title"], view["policy"], view["answerable"], view["generating"]) == (
        chat, "Hello there", POLICY, 3, False)
    assert [(p["position"], p["role"], p["selected"], [a["content"] for a in p["alternatives"]])
            for p in view["positions"]] == [(0, "user", 0, ["Hello there"]), (1, "assistant", 0, [answer]),
                                            (2, "user", 0, ["And then?"]), (3, "assistant", 0, [second])]
    assert view["positions"][1]["alternatives"][0]["rating"] is None
    listed = alice.get("/api/chats").json()["chats"]
    assert [(c["id"], c["title"], c["messages"]) for c in listed] == [(chat, "Hello there", 4)]


def test_regenerate_keeps_alternatives_and_select_switches(app):
    alice = app.client("alice")
    chat = new_chat(alice, title="  A   titled chat ")
    first = streamed_text(send(alice, chat, "Tell me a story", "send-key-01"))
    events = regenerate(alice, chat, 1, "regen-key-01")
    assert events[0] == {"start": True, "position": 1}
    second = streamed_text(events)
    assert events[-1]["alternative"] == 1 and events[-1]["content"] == second
    assert app.worker.prompts[1] == [Turn("user", "Tell me a story")]  # the selected messages before it
    assert rows(app, chat) == [(0, 0, True, "user", "Tell me a story", "human"),
                               (1, 0, False, "assistant", first, "model"), (1, 1, True, "assistant", second, "model")]
    view = alice.get(f"/api/chats/{chat}").json()
    assert view["title"] == "A titled chat"  # a given title is kept (white space collapsed)
    assert view["positions"][1]["selected"] == 1
    assert [a["selected"] for a in view["positions"][1]["alternatives"]] == [False, True]

    before = snapshot(app)
    for position in (0, 2, 3):  # a user message, a position past the end
        response = alice.post(f"/api/chats/{chat}/regenerate",
                              json={"position": position, "key": f"regen-bad-{position}"})
        assert response.status_code == 409, response.text
        assert "only the last answer (position 1)" in response.json()["error"]
    response = alice.post(f"/api/chats/{chat}/select", json={"position": 1, "alternative": 5})
    assert response.status_code == 422
    assert response.json()["error"] == "alternative: 5 is not an alternative of position 1; choose one of 0, 1"
    assert alice.post(f"/api/chats/{chat}/select", json={"position": 0, "alternative": 0}).status_code == 409
    assert snapshot(app) == before

    response = alice.post(f"/api/chats/{chat}/select", json={"position": 1, "alternative": 0})
    assert response.status_code == 200 and response.json() == {"position": 1, "selected": 0}
    assert [r[2] for r in rows(app, chat)] == [True, True, False]
    streamed_text(send(alice, chat, "Go on", "send-key-02"))
    assert app.worker.prompts[2] == [Turn("user", "Tell me a story"), Turn("assistant", first), Turn("user", "Go on")]

    # position 1 is no longer the last answer: the turns after it replied to the selected alternative
    before = snapshot(app)
    assert alice.post(f"/api/chats/{chat}/regenerate", json={"position": 1, "key": "regen-key-02"}).status_code == 409
    response = alice.post(f"/api/chats/{chat}/select", json={"position": 1, "alternative": 1})
    assert response.status_code == 409 and "only the last answer (position 3)" in response.json()["error"]
    assert snapshot(app) == before

    # a retried regenerate (same key) gets its stored answer again, generating nothing
    requests = len(app.worker.prompts)
    again = regenerate(alice, chat, 1, "regen-key-01")
    assert again[0] == {"start": True, "position": 1, "repeated": True}
    assert streamed_text(again) == second and again[-1]["repeated"] is True
    assert again[-1]["message_id"] == events[-1]["message_id"]
    assert len(app.worker.prompts) == requests and snapshot(app) == before


def test_rating_is_one_per_user_and_message(app):
    alice = app.client("alice")
    chat = new_chat(alice)
    done = send(alice, chat, "Rate me", "send-key-01")[-1]
    answer, question = done["message_id"], done["message_id"] - 1
    response = alice.post(f"/api/messages/{answer}/rating", json={"value": 1, "reason": "clear"})
    assert response.status_code == 200 and response.json() == {"message_id": answer, "value": 1, "reason": "clear"}
    assert alice.post(f"/api/messages/{answer}/rating", json={"value": 1, "reason": "clear"}).status_code == 200
    response = alice.post(f"/api/messages/{answer}/rating", json={"value": -1})
    assert response.status_code == 200
    with app.db.sessions() as session:
        found = [(r.message_id, r.value, r.reason) for r in session.scalars(select(Rating))]
    assert found == [(answer, -1, "")]
    view = alice.get(f"/api/chats/{chat}").json()
    assert view["positions"][1]["alternatives"][0]["rating"] == {"value": -1, "reason": ""}

    before = snapshot(app)
    bad = [({"value": 2}, "value: 2 is not a rating; use 1 (thumbs up) or -1 (thumbs down)"),
           ({"value": 0, "reason": "meh"}, "value: 0 is not a rating; use 1 (thumbs up) or -1 (thumbs down)"),
           ({"value": 1, "reason": "x" * (MAX_CHARS + 1)},
            f"reason: {MAX_CHARS + 1} characters, at most {MAX_CHARS} are allowed (app.max_message_chars)")]
    for body, error in bad:
        response = alice.post(f"/api/messages/{answer}/rating", json=body)
        assert (response.status_code, response.json()["error"]) == (422, error)
    response = alice.post(f"/api/messages/{question}/rating", json={"value": 1})
    assert response.status_code == 422
    assert response.json()["error"] == f"message {question} is a user message; only the assistant's answers are rated"
    assert alice.post("/api/messages/999999/rating", json={"value": 1}).status_code == 404
    assert snapshot(app) == before


def test_export_is_an_sft_conversation(app, tmp_path):
    alice = app.client("alice")
    chat = new_chat(alice)
    assert alice.get(f"/api/chats/{chat}/export").status_code == 409  # nothing answered yet
    a1 = streamed_text(send(alice, chat, "First question", "send-key-01"))
    streamed_text(send(alice, chat, "Second question", "send-key-02"))
    a2 = streamed_text(regenerate(alice, chat, 3, "regen-key-01"))
    answer = alice.get(f"/api/chats/{chat}").json()["positions"][3]["alternatives"][1]["id"]
    assert alice.post(f"/api/messages/{answer}/rating", json={"value": -1, "reason": "rambles"}).status_code == 200

    response = alice.get(f"/api/chats/{chat}/export")
    assert response.status_code == 200
    assert response.headers["content-disposition"] == f'attachment; filename="chat-{chat}.jsonl"'
    record = response.json()
    parsed = formats.parse_conversation(record, "export")
    assert parsed.messages == (Turn("user", "First question"), Turn("assistant", a1),
                               Turn("user", "Second question"), Turn("assistant", a2))
    assert parsed.meta["source"] == "chat" and parsed.meta["conversation_id"] == chat
    assert parsed.meta["policy"] == POLICY and parsed.meta["title"] == "First question"
    assert parsed.meta["turns"] == [
        {"position": 1, "alternative": 0, "alternatives": 1, "source": "model", "rating": None, "reason": ""},
        {"position": 3, "alternative": 1, "alternatives": 2, "source": "model", "rating": -1, "reason": "rambles"}]
    # the downloaded file is a conversation file the SFT stage reads as it is
    (tmp_path / "chat.jsonl").write_bytes(response.content)
    loaded = formats.load_conversations(str(tmp_path / "chat.jsonl"))
    assert [c.messages for c in loaded] == [parsed.messages]


def test_a_retried_send_stores_once_and_replays_the_answer(app):
    alice = app.client("alice")
    assert new_chat(alice, key="chat-key-1") == new_chat(alice, key="chat-key-1")  # a double click: one chat
    chat = new_chat(alice, key="chat-key-1")
    assert count(app, Conversation) == 1
    first = send(alice, chat, "Only once", "send-key-01")
    stored = rows(app, chat)
    again = send(alice, chat, "Only once", "send-key-01")
    assert again[0] == dict(first[0], repeated=True)
    assert streamed_text(again) == streamed_text(first)
    assert again[-1] == {**{k: v for k, v in first[-1].items() if k != "truncated"}, "repeated": True}
    assert rows(app, chat) == stored and len(stored) == 2
    assert len(app.worker.prompts) == 1  # generated once

    before = snapshot(app)
    for url, body in [(f"/api/chats/{chat}/messages", {"content": "Something else", "key": "send-key-01"}),
                      (f"/api/chats/{chat}/messages", {"content": "Only once", "key": "chat-key-1"}),
                      (f"/api/chats/{chat}/regenerate", {"position": 1, "key": "send-key-01"})]:
        response = alice.post(url, json=body)
        assert response.status_code == 409, (url, body, response.text)
        assert "was already used for a different request" in response.json()["error"]
    assert snapshot(app) == before and len(app.worker.prompts) == 1


def test_message_length_is_bounded(app):
    alice = app.client("alice")
    chat = new_chat(alice)
    before = snapshot(app)
    for content, error in [("x" * (MAX_CHARS + 1),
                            f"content: {MAX_CHARS + 1} characters, at most {MAX_CHARS} are allowed "
                            "(app.max_message_chars)"),
                           ("  \n ", "content: must not be empty"),
                           ("a\x00b", "content: contains a NUL character (\\u0000); remove it")]:
        response = alice.post(f"/api/chats/{chat}/messages", json={"content": content, "key": "send-key-01"})
        assert (response.status_code, response.json()["error"]) == (422, error)
    response = alice.post(f"/api/chats/{chat}/messages", content=b'{"content": "a\\ud800", "key": "send-key-01"}',
                          headers={"Content-Type": "application/json"})
    assert (response.status_code, response.json()["error"]) == (
        422, "content: contains an unpaired surrogate (not valid Unicode text)")
    response = alice.post("/api/chats", json={"key": "chat-key-2", "title": "t" * 201})
    assert (response.status_code, response.json()["error"]) == (422, "title: 201 characters, at most 200 are allowed")
    assert alice.post(f"/api/chats/{chat}/messages", json={"content": "no key"}).status_code == 422
    assert snapshot(app) == before and app.worker.prompts == []
    longest = "y" * MAX_CHARS
    streamed_text(send(alice, chat, longest, "send-key-02"))
    assert rows(app, chat)[0][4] == longest


def test_an_empty_answer_is_not_stored_and_nul_becomes_u_fffd(database_url, tiny_model, tiny_tokenizer,
                                                               one_thread):
    sampler = FixedSampler(tiny_tokenizer.eos_token_id)  # first every answer ends at once
    harness = harness_for(database_url, chat_worker(tiny_model, tiny_tokenizer, sampler))
    try:
        alice = harness.client("alice")
        chat = new_chat(alice)
        events = send(alice, chat, "Say nothing", "send-key-01")
        assert [set(e) for e in events] == [{"start", "position", "user_message_id", "user_position"}, {"error"}]
        assert "answer was empty" in events[-1]["error"]
        assert rows(harness, chat) == [(0, 0, True, "user", "Say nothing", "human")]
        assert alice.get(f"/api/chats/{chat}").json()["answerable"] == 1
        response = alice.post(f"/api/chats/{chat}/messages", json={"content": "Hello?", "key": "send-key-02"})
        assert response.status_code == 409 and "has no answer yet" in response.json()["error"]
        assert alice.post(f"/api/chats/{chat}/select", json={"position": 0, "alternative": 0}).status_code == 409
        assert "error" in regenerate(alice, chat, 1, "regen-key-01")[-1]
        assert rows(harness, chat) == [(0, 0, True, "user", "Say nothing", "human")]
        assert count(harness, Submission) == 2  # the chat and the user message; the failed answers stored nothing

        # now the model says NUL characters (PostgreSQL text cannot hold them): regenerate answers the message
        sampler.token = next(i for i in range(len(tiny_tokenizer)) if tiny_tokenizer.decode([i]) == "\x00")
        events = regenerate(alice, chat, 1, "regen-key-02")
        assert streamed_text(events) == "\ufffd" * 16 == events[-1]["content"]
        assert rows(harness, chat)[1] == (1, 0, True, "assistant", "\ufffd" * 16, "model")
    finally:
        harness.close()


def test_without_a_model_chat_answers_503(database_url):
    harness = harness_for(database_url, None)
    try:
        alice = harness.client("alice")
        chat = new_chat(alice)
        before = snapshot(harness)
        for url, body in [(f"/api/chats/{chat}/messages", {"content": "Hi", "key": "send-key-01"}),
                          (f"/api/chats/{chat}/regenerate", {"position": 1, "key": "regen-key-01"})]:
            response = alice.post(url, json=body)
            assert response.status_code == 503 and "serves no model" in response.json()["error"]
        assert snapshot(harness) == before
        assert alice.get("/api/chats").status_code == 200
    finally:
        harness.close()


# --- security ---------------------------------------------------------------------------------------


def alice_with_a_chat(app: Any) -> tuple[Any, int, int]:
    """Alice's client, her chat (one question, two answers) and the id of its selected answer."""
    alice = app.client("alice")
    chat = new_chat(alice)
    send(alice, chat, "Private question", "send-key-01")
    done = regenerate(alice, chat, 1, "regen-key-01")[-1]
    rated = alice.post(f"/api/messages/{done['message_id']}/rating", json={"value": 1, "reason": "mine"})
    assert rated.status_code == 200
    return alice, chat, done["message_id"]


def routes(chat: int, message: int) -> list[tuple[str, str, Any]]:
    """Every chat route that takes an id, with a valid body."""
    return [("GET", f"/chat?c={chat}", None), ("GET", f"/api/chats/{chat}", None),
            ("POST", f"/api/chats/{chat}/messages", {"content": "Hi", "key": "other-key-01"}),
            ("POST", f"/api/chats/{chat}/regenerate", {"position": 1, "key": "other-key-02"}),
            ("POST", f"/api/chats/{chat}/select", {"position": 1, "alternative": 0}),
            ("POST", f"/api/messages/{message}/rating", {"value": -1, "reason": "not yours"}),
            ("GET", f"/api/chats/{chat}/export", None)]


def test_another_users_chat_is_not_found(app):
    alice, chat, message = alice_with_a_chat(app)
    app.add_user("bob")
    with app.db.transaction() as session:  # alice's written demonstration is no chat either
        alice_id = session.scalar(select(Conversation.user_id).where(Conversation.id == chat))
        demo = Conversation(user_id=alice_id, kind="demonstration", title="demo")
        session.add(demo)
        session.flush()
        session.add(Message(conversation_id=demo.id, position=0, role="user", content="q"))
        session.add(Message(conversation_id=demo.id, position=1, role="assistant", content="a", source="human"))
    before, requests = snapshot(app), len(app.worker.prompts)
    bob = app.client("bob")
    for method, url, body in routes(chat, message):
        response = bob.request(method, url, json=body)
        assert response.status_code == 404, (method, url, response.status_code, response.text)
        assert "Private question" not in response.text
    with app.db.sessions() as session:
        demo_answer = session.scalar(select(Message.id).where(Message.conversation_id == demo.id,
                                                              Message.position == 1))
    for method, url, body in routes(demo.id, demo_answer):
        response = alice.request(method, url, json=body)
        assert response.status_code == 404, (method, url, response.status_code, response.text)
    assert bob.get("/api/chats").json() == {"chats": []}
    assert snapshot(app) == before and len(app.worker.prompts) == requests


def test_anonymous_requests_and_missing_csrf_tokens_are_refused(app):
    alice, chat, message = alice_with_a_chat(app)
    before = snapshot(app)
    anonymous = app.client()
    page = anonymous.get(f"/chat?c={chat}", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    everything = routes(chat, message)[1:] + [("GET", "/api/chats", None),
                                              ("POST", "/api/chats", {"key": "chat-key-9"})]
    for method, url, body in everything:
        response = anonymous.request(method, url, json=body)
        assert response.status_code == 401, (method, url, response.text)

    token = alice.headers.pop("X-CSRF-Token")
    for method, url, body in [r for r in everything if r[0] == "POST"]:
        response = alice.request(method, url, json=body)
        assert response.status_code == 403 and "CSRF" in response.json()["error"], (url, response.text)
    alice.headers["X-CSRF-Token"] = "not-the-token"
    assert alice.post("/api/chats", json={"key": "chat-key-9"}).status_code == 403
    assert snapshot(app) == before
    alice.headers["X-CSRF-Token"] = token
    assert alice.post("/api/chats", json={"key": "chat-key-9"}).status_code == 200  # the same request, with it


def test_the_page_lists_own_chats_escaped(app):
    alice = app.client("alice")
    chat = new_chat(alice, title="<script>alert(1)</script>")
    app.add_user("bob")
    new_chat(app.client("bob"), key="chat-key-2", title="bob's secret")
    html = alice.get(f"/chat?c={chat}").text
    for element in ('id="chat-input"', 'id="chat-send"', 'id="chat-stop"', 'id="new-chat"', 'id="chat-list"',
                    'id="chat-messages"', 'id="chat-export"', 'id="chat-title"', f'data-chat-id="{chat}"',
                    'src="/static/chat.js"'):
        assert element in html, element
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert(1)" not in html
    assert "bob&#39;s secret" not in html and "bob's secret" not in html
    assert 'data-chat-id=""' in alice.get("/chat").text  # no chat open
    script = alice.get("/static/chat.js")
    assert script.status_code == 200 and ".innerHTML" not in script.text and "AbortController" in script.text


# --- a live server ----------------------------------------------------------------------------------


@contextlib.contextmanager
def live_client(harness: Any, name: str) -> Iterator[Any]:
    """An httpx client of a live server on ``harness.app``, logged in as ``name`` through the API."""
    import httpx

    with live_server(harness.app) as url, httpx.Client(base_url=url, timeout=30) as client:
        login(client, name)
        yield client


LONG = 400  # tokens: an answer that takes a while on the tiny model


@pytest.fixture()
def long_app(tmp_path, tiny_model, tiny_tokenizer, one_thread):
    worker = chat_worker(tiny_model, tiny_tokenizer, max_new_tokens=LONG)
    harness = harness_for(f"sqlite:///{tmp_path / 'app.db'}", worker, max_new_tokens=LONG)
    yield harness
    harness.close()


def test_closing_the_stream_cancels_the_generation(long_app):
    worker = long_app.worker
    with live_client(long_app, "alice") as client:
        chat = new_chat(client)
        body = {"content": "Talk for a long time", "key": "send-key-01"}
        with client.stream("POST", f"/api/chats/{chat}/messages", json=body) as response:
            assert response.status_code == 200
            texts = 0
            for raw in response.iter_lines():
                texts += "text" in json.loads(raw)
                if texts == 3:
                    break  # leaving the block closes the connection: the client is gone
        wait_until(lambda: worker.stats.cancelled == 1, 30, "the generation to be cancelled")
        assert worker.stats.tokens < LONG  # it stopped early
        assert rows(long_app, chat) == [(0, 0, True, "user", "Talk for a long time", "human")]  # no answer stored
        wait_until(lambda: not client.get(f"/api/chats/{chat}").json()["generating"], 10, "the chat to be free")

        response = client.post(f"/api/chats/{chat}/messages", json={"content": "Hello?", "key": "send-key-02"})
        assert response.status_code == 409 and "has no answer yet" in response.json()["error"]
        # the client's retry (same key) answers the stored message: it is not stored a second time
        tokens = worker.stats.tokens
        retried = [json.loads(raw) for raw in client.post(f"/api/chats/{chat}/messages", json=body).text.splitlines()]
        answer = streamed_text(retried)
        assert retried[0].get("repeated") is None and retried[-1]["truncated"] is True
        assert worker.stats.tokens - tokens == LONG
        assert rows(long_app, chat) == [(0, 0, True, "user", "Talk for a long time", "human"),
                                        (1, 0, True, "assistant", answer, "model")]


def test_the_server_answers_while_a_long_answer_streams(long_app):
    worker = long_app.worker
    with live_client(long_app, "alice") as client:
        chat = new_chat(client)
        body = {"content": "Talk for a long time", "key": "send-key-01"}
        events = []
        with client.stream("POST", f"/api/chats/{chat}/messages", json=body) as response:
            lines = response.iter_lines()
            while not any("text" in e for e in events):
                events.append(json.loads(next(lines)))
            started = time.monotonic()
            health = client.get("/api/health")
            waited = time.monotonic() - started
            assert health.status_code == 200 and waited < 2.0, waited
            during = health.json()["worker"]["tokens"]
            assert client.get(f"/api/chats/{chat}").json()["generating"] is True
            # a retry and a regeneration while it streams are refused, not generated a second time
            assert client.post(f"/api/chats/{chat}/messages", json=body).status_code == 409
            response2 = client.post(f"/api/chats/{chat}/regenerate", json={"position": 1, "key": "regen-key-01"})
            assert response2.status_code == 409 and "being answered already" in response2.json()["error"]
            events.extend(json.loads(raw) for raw in lines)
        assert events[-1].get("done") is True
        assert during < worker.stats.tokens == LONG  # the health check was answered mid-generation
        assert worker.stats.requests == 1
        assert rows(long_app, chat)[1][4] == streamed_text(events)
