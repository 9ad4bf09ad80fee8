"""The "Write a demonstration" area: edit distance, turn validation, the SFT record, and the API
(create, suggestions from the worker, save, export, validation, other users' ids, sessions, CSRF)
against SQLite and PostgreSQL."""
from __future__ import annotations

import json
import random

import pytest
from app_helpers import make_harness, make_worker
from sqlalchemy import func, select

from rlhf_pl.app.db import Conversation, Message, User
from rlhf_pl.app.demos import MAX_TURNS, check_turns, demonstration_record, edit_distance
from rlhf_pl.data.formats import load_conversations, parse_conversation

# --- edit distance ---------------------------------------------------------------------------------


def table_distance(a: str, b: str) -> int:
    """The textbook Levenshtein table, the reference for the bit-parallel version."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


@pytest.mark.parametrize("a, b, expected", [
    ("", "", 0),
    ("abc", "", 3),
    ("", "abc", 3),
    ("abc", "abc", 0),
    ("abc", "abd", 1),  # one substitution
    ("kitten", "sitting", 3),  # k->s, e->i, +g
    ("flaw", "lawn", 2),  # -f, +n
    ("saturday", "sunday", 3),  # -a, -t, r->n
    ("ab", "ba", 2),  # no transpositions in Levenshtein
    ("The answer is 4.", "The answer is four.", 4),  # 4->f, +o, +u, +r
    ("Hello, world", "Hello world!", 2),  # -",", +"!"
    ("café", "cafe", 1),  # characters, not bytes
])
def test_edit_distance_hand_computed(a, b, expected):
    assert edit_distance(a, b) == expected
    assert edit_distance(b, a) == expected


def test_edit_distance_agrees_with_the_table():
    rng = random.Random(0)
    for _ in range(200):
        # short and long (> 64 characters: several machine words) strings over a small alphabet
        a = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 100)))
        b = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 100)))
        assert edit_distance(a, b) == table_distance(a, b), (a, b)
        if a:  # an edited copy: shares a prefix and a suffix with the original
            cut = rng.randint(0, len(a))
            c = a[:cut] + "".join(rng.choice("abcd") for _ in range(rng.randint(0, 6))) + a[cut + rng.randint(0, 5):]
            assert edit_distance(a, c) == table_distance(a, c), (a, c)


def test_edit_distance_of_long_texts():
    rng = random.Random(1)
    text = "".join(rng.choice("abcdefghij klmnop") for _ in range(4000))
    spots = sorted(rng.sample(range(4000), 7))
    edited = text
    for spot in reversed(spots):  # 7 insertions: the distance is 7 (at most 7 edits; at least the length gap)
        edited = edited[:spot] + "#" + edited[spot:]
    assert edit_distance(text, edited) == 7
    assert edit_distance(edited, text) == 7
    assert edit_distance(text, "") == 4000


# --- turn validation (pure) ------------------------------------------------------------------------


def turns(*pairs, suggestion=None):
    return [{"role": role, "content": content, "suggestion": suggestion if role == "assistant" else None}
            for role, content in pairs]


def test_check_turns_computes_source_and_distance():
    checked = check_turns([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "The answer is four.", "suggestion": "The answer is 4."},
                           {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."}],
                          max_chars=100)
    assert [(t.role, t.source, t.suggestion, t.edit_distance) for t in checked] == [
        ("system", "human", None, None), ("user", "human", None, None),
        ("assistant", "suggestion", "The answer is 4.", 4), ("user", "human", None, None),
        ("assistant", "human", None, None)]


@pytest.mark.parametrize("given, message", [
    ([], "the conversation has no turns"),
    (turns(("user", "hi"), ("user", "again")), "the conversation has no assistant turn"),
    (turns(("user", "hi"), ("bot", "hello")), "turn 1: role 'bot' is not one of system, user, assistant"),
    (turns(("user", "hi"), ("system", "x"), ("assistant", "y")), "turn 1: a system turn can only be the first turn"),
    (turns(("user", "hi"), ("assistant", "   ")), "turn 1 (assistant): the text is empty"),
    (turns(("user", "x" * 41), ("assistant", "y")), "turn 0 (user): 41 characters, more than the 40 allowed"),
    ([{"role": "user", "content": "hi", "suggestion": "hello"}, {"role": "assistant", "content": "y"}],
     "turn 0 (user): only an assistant turn can start from a suggestion"),
    (turns(("user", "hi"), ("assistant", "y"), suggestion="s" * 41),
     "turn 1 (assistant): the suggestion has 41 characters, more than the 40 allowed"),
    (turns(*[("user", "u"), ("assistant", "a")] * (MAX_TURNS // 2 + 1)), f"{MAX_TURNS + 2} turns: a demonstration "
                                                                          f"has at most {MAX_TURNS}"),
])
def test_check_turns_names_the_turn_and_the_problem(given, message):
    with pytest.raises(ValueError) as err:
        check_turns(given, max_chars=40)
    assert str(err.value).startswith(message)


def test_check_turns_for_a_suggestion_request_ends_with_a_user_turn():
    assert [t.role for t in check_turns(turns(("user", "hi")), max_chars=40, last_role="user")] == ["user"]
    with pytest.raises(ValueError, match="turn 1 is a assistant turn: the conversation must end with a user turn"):
        check_turns(turns(("user", "hi"), ("assistant", "y")), max_chars=40, last_role="user")


# --- the record ------------------------------------------------------------------------------------


def test_demonstration_record_is_an_sft_conversation():
    conversation = Conversation(id=7, user_id=1, kind="demonstration", title="Sums", messages=[
        Message(position=0, alternative=0, selected=True, role="user", content="2+2?", source="human"),
        Message(position=1, alternative=0, selected=True, role="assistant", content="The answer is four.",
                source="suggestion", suggestion="The answer is 4.", edit_distance=4),
        Message(position=2, alternative=0, selected=True, role="user", content="And 3+3?", source="human"),
        Message(position=3, alternative=0, selected=True, role="assistant", content="Six.", source="human")])
    record = demonstration_record(conversation, "ann")
    assert record["messages"] == [{"role": "user", "content": "2+2?"},
                                  {"role": "assistant", "content": "The answer is four."},
                                  {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."}]
    assert (record["demonstration_id"], record["author"], record["title"]) == (7, "ann", "Sums")
    assert record["turns_from_suggestion"] == [1]
    assert record["edit_distance"] == {"1": 4}
    assert record["suggestions"] == {"1": "The answer is 4."}
    assert json.loads(json.dumps(record)) == record
    parsed = parse_conversation(record, "export:1")
    assert [m.content for m in parsed.messages] == ["2+2?", "The answer is four.", "And 3+3?", "Six."]
    assert parsed.meta["turns_from_suggestion"] == [1] and parsed.meta["author"] == "ann"
    with pytest.raises(ValueError, match="demonstration 8 has no saved turns"):
        demonstration_record(Conversation(id=8, user_id=1, kind="demonstration", title="", messages=[]), "ann")


# --- the API ---------------------------------------------------------------------------------------


@pytest.fixture()
def harness(database_url, tiny_model, tiny_tokenizer):
    h = make_harness(database_url, worker=make_worker(tiny_model, tiny_tokenizer, max_new_tokens=8),
                     suggestions=3, max_message_chars=60)
    h.add_user("ann")
    h.add_user("bob")
    yield h
    h.close()


def stored(h, demo_id):
    """The demonstration's title and message rows as tuples."""
    with h.db.sessions() as session:
        conversation = session.get(Conversation, demo_id)
        if conversation is None:
            return None
        rows = session.scalars(select(Message).where(Message.conversation_id == demo_id)
                               .order_by(Message.position, Message.alternative))
        return conversation.title, [(m.position, m.alternative, m.selected, m.role, m.content, m.source, m.suggestion,
                                     m.edit_distance) for m in rows]


def counts(h):
    with h.db.sessions() as session:
        return (session.scalar(select(func.count()).select_from(Conversation)),
                session.scalar(select(func.count()).select_from(Message)))


def new_demo(client, key="demo-key-1", title=""):
    response = client.post("/api/demos", json={"key": key, "title": title})
    assert response.status_code == 200, response.text
    return response.json()["id"]


SAVED = [{"role": "user", "content": "2+2?", "suggestion": None},
         {"role": "assistant", "content": "The answer is four.", "suggestion": "The answer is 4."},
         {"role": "user", "content": "And 3+3?", "suggestion": None},
         {"role": "assistant", "content": "Six.", "suggestion": None}]
SAVED_ROWS = [(0, 0, True, "user", "2+2?", "human", None, None),
              (1, 0, True, "assistant", "The answer is four.", "suggestion", "The answer is 4.", 4),
              (2, 0, True, "user", "And 3+3?", "human", None, None),
              (3, 0, True, "assistant", "Six.", "human", None, None)]


def test_write_a_demonstration_from_an_edited_suggestion(harness, tmp_path):
    ann = harness.client("ann")
    first = ann.post("/api/demos", json={"key": "demo-key-1"})
    again = ann.post("/api/demos", json={"key": "demo-key-1"})  # a double click
    demo_id = first.json()["id"]
    assert first.json() == {"id": demo_id} and again.json() == {"id": demo_id, "repeated": True}
    assert counts(harness) == (1, 0)

    prompt = [{"role": "user", "content": "2+2?"}]
    requests_before = harness.worker.stats.requests
    asked = ann.post(f"/api/demos/{demo_id}/suggestions", json={"messages": prompt, "k": 2})
    assert asked.status_code == 200, asked.text
    texts = asked.json()["suggestions"]
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    default = ann.post(f"/api/demos/{demo_id}/suggestions", json={"messages": prompt})
    assert len(default.json()["suggestions"]) == 3  # app.suggestions
    assert harness.worker.stats.requests == requests_before + 2
    assert counts(harness) == (1, 0)  # suggestions store nothing

    # turn 1 starts from a model suggestion and gets 8 characters appended: the distance is exactly 8
    chosen = texts[0][:40]
    messages = [{"role": "user", "content": "2+2?", "suggestion": None},
                {"role": "assistant", "content": chosen + " Thanks!", "suggestion": chosen},
                {"role": "user", "content": "And 3+3?", "suggestion": None},
                {"role": "assistant", "content": "Six.", "suggestion": None}]
    saved = ann.put(f"/api/demos/{demo_id}", json={"messages": messages})
    assert saved.status_code == 200, saved.text
    view = saved.json()
    assert view["id"] == demo_id and view["title"] == "2+2?"  # no title given: the first user turn
    assert [(m["source"], m["edit_distance"]) for m in view["messages"]] == [
        ("human", None), ("suggestion", 8), ("human", None), ("human", None)]
    rows = [(0, 0, True, "user", "2+2?", "human", None, None),
            (1, 0, True, "assistant", chosen + " Thanks!", "suggestion", chosen, 8),
            (2, 0, True, "user", "And 3+3?", "human", None, None),
            (3, 0, True, "assistant", "Six.", "human", None, None)]
    assert stored(harness, demo_id) == ("2+2?", rows)

    repeat = ann.put(f"/api/demos/{demo_id}", json={"messages": messages})  # a retried save stores the same
    assert repeat.status_code == 200 and stored(harness, demo_id) == ("2+2?", rows)
    assert counts(harness) == (1, 4)

    # an edit replaces the turns, and the title when one is given
    edited = ann.put(f"/api/demos/{demo_id}", json={"messages": SAVED, "title": "  Sums  "})
    assert edited.status_code == 200, edited.text
    assert stored(harness, demo_id) == ("Sums", SAVED_ROWS)
    assert ann.get(f"/api/demos/{demo_id}").json() == edited.json()
    assert ann.put(f"/api/demos/{demo_id}", json={"messages": SAVED[:2]}).status_code == 200
    assert stored(harness, demo_id) == ("Sums", SAVED_ROWS[:2])  # the title stays
    assert ann.put(f"/api/demos/{demo_id}", json={"messages": SAVED}).status_code == 200

    listed = ann.get("/api/demos").json()["demos"]
    assert [(d["id"], d["title"], d["turns"], d["assistant_turns"], d["from_suggestion"]) for d in listed] == [
        (demo_id, "Sums", 4, 2, 1)]

    # the export record reads into the SFT loader as it is
    with harness.db.sessions() as session:
        conversation = session.get(Conversation, demo_id)
        record = demonstration_record(conversation, session.get(User, conversation.user_id).username)
    assert record["turns_from_suggestion"] == [1] and record["edit_distance"] == {"1": 4}
    assert record["author"] == "ann" and record["demonstration_id"] == demo_id
    path = tmp_path / "demos.jsonl"
    path.write_text(json.dumps(record) + "\n")
    [loaded] = load_conversations(str(path))
    assert [(m.role, m.content) for m in loaded.messages] == [(m["role"], m["content"]) for m in SAVED]
    assert loaded.meta["suggestions"] == {"1": "The answer is 4."}


def test_bad_demonstrations_are_refused_and_nothing_is_stored(harness):
    ann = harness.client("ann")
    demo_id = new_demo(ann)
    assert ann.put(f"/api/demos/{demo_id}", json={"messages": SAVED, "title": "Sums"}).status_code == 200
    before = stored(harness, demo_id)
    bad = {
        "no assistant": ([{"role": "user", "content": "hi"}], "the conversation has no assistant turn"),
        "bad role": ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}],
                     "turn 1: role 'bot' is not one of system, user, assistant"),
        "user suggestion": ([{"role": "user", "content": "hi", "suggestion": "hello"},
                             {"role": "assistant", "content": "x"}],
                            "turn 0 (user): only an assistant turn can start from a suggestion"),
        "too long": ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 61}],
                     "turn 1 (assistant): 61 characters, more than the 60 allowed (app.max_message_chars)"),
        "system later": ([{"role": "user", "content": "hi"}, {"role": "system", "content": "s"},
                          {"role": "assistant", "content": "x"}], "turn 1: a system turn can only be the first turn"),
        "blank": ([{"role": "user", "content": "\n "}, {"role": "assistant", "content": "x"}],
                  "turn 0 (user): the text is empty"),
        "no turns": ([], "the conversation has no turns"),
    }
    for name, (messages, message) in bad.items():
        response = ann.put(f"/api/demos/{demo_id}", json={"messages": messages, "title": "changed"})
        assert response.status_code == 422, name
        assert response.json()["error"].startswith(message), (name, response.json())
        assert stored(harness, demo_id) == before, name
    wrong_type = ann.put(f"/api/demos/{demo_id}", json={"messages": [{"role": "user", "content": 3}]})
    assert wrong_type.status_code == 422 and "messages.0.content" in wrong_type.json()["error"]
    unknown = ann.put(f"/api/demos/{demo_id}", json={"messages": SAVED, "extra": 1})
    assert unknown.status_code == 422 and "extra" in unknown.json()["error"]
    assert stored(harness, demo_id) == before
    assert ann.post("/api/demos", json={"key": "x"}).status_code == 422  # a key is 8 to 64 characters
    assert ann.post("/api/demos", json={"title": "t"}).status_code == 422
    assert counts(harness) == (1, 4)


def test_bad_suggestion_requests(harness):
    ann = harness.client("ann")
    demo_id = new_demo(ann)
    url = f"/api/demos/{demo_id}/suggestions"
    prompt = [{"role": "user", "content": "2+2?"}]
    for k in (0, 9):  # 1..min(app.max_k = 9, the worker's batch size 8)
        response = ann.post(url, json={"messages": prompt, "k": k})
        assert response.status_code == 422
        assert response.json()["error"] == (f"k={k}: ask for 1 to 8 suggestions (app.max_k and the worker's "
                                             "batch size)")
    ends_with_answer = ann.post(url, json={"messages": SAVED[:2]})
    assert ends_with_answer.status_code == 422
    assert ends_with_answer.json()["error"].startswith("turn 1 is a assistant turn: the conversation must end with "
                                                       "a user turn")
    too_long = ann.post(url, json={"messages": [{"role": "user", "content": "y" * 61}]})
    assert too_long.status_code == 422 and too_long.json()["error"].startswith("turn 0 (user): 61 characters")
    assert ann.post(url, json={"messages": []}).json()["error"].startswith("the conversation has no turns")
    assert counts(harness) == (1, 0)


def test_suggestions_without_a_model_answer_503(database_url):
    h = make_harness(database_url)
    try:
        h.add_user("ann")
        ann = h.client("ann")
        demo_id = new_demo(ann)
        response = ann.post(f"/api/demos/{demo_id}/suggestions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 503
        assert "serves no model" in response.json()["error"]
        page = ann.get("/write")
        assert page.status_code == 200 and 'data-has-worker="no"' in page.text
    finally:
        h.close()


def test_another_users_demonstration_is_out_of_reach(harness):
    ann, bob = harness.client("ann"), harness.client("bob")
    demo_id = new_demo(ann)
    assert ann.put(f"/api/demos/{demo_id}", json={"messages": SAVED, "title": "Sums"}).status_code == 200
    with harness.db.transaction() as session:  # and a chat of ann's: not a demonstration
        chat = Conversation(user_id=session.scalar(select(User.id).where(User.username == "ann")), kind="chat",
                            title="a chat")
        session.add(chat)
        session.flush()
        chat_id = chat.id
    before, before_counts = stored(harness, demo_id), counts(harness)
    prompt = {"messages": [{"role": "user", "content": "hi"}]}
    requests_before = harness.worker.stats.requests
    for client, target in ((bob, demo_id), (ann, chat_id), (bob, 999_999)):
        for method, url, body in (("GET", f"/api/demos/{target}", None),
                                  ("PUT", f"/api/demos/{target}", {"messages": SAVED[:2], "title": "mine"}),
                                  ("POST", f"/api/demos/{target}/suggestions", prompt),
                                  ("DELETE", f"/api/demos/{target}", None)):
            response = client.request(method, url, json=body)
            assert response.status_code == 404, (method, url)
            assert response.json() == {"error": f"no demonstration {target} of yours"}
        page = client.get(f"/write?d={target}")
        assert page.status_code == 404 and 'data-testid="demo-missing"' in page.text
        assert "2+2?" not in page.text and ("Sums" not in page.text or client is ann)  # ann sees her own list
    assert stored(harness, demo_id) == before and counts(harness) == before_counts
    assert harness.worker.stats.requests == requests_before  # no generation for someone else's id
    assert bob.get("/api/demos").json() == {"demos": []}
    assert "Sums" not in bob.get("/write").text
    assert ann.get(f"/api/demos/{demo_id}").status_code == 200


def test_sessions_and_csrf_are_required(harness):
    ann = harness.client("ann")
    demo_id = new_demo(ann)
    assert ann.put(f"/api/demos/{demo_id}", json={"messages": SAVED}).status_code == 200
    before, before_counts = stored(harness, demo_id), counts(harness)
    anonymous = harness.client()
    routes = (("GET", "/api/demos", None), ("POST", "/api/demos", {"key": "demo-key-2"}),
              ("GET", f"/api/demos/{demo_id}", None), ("PUT", f"/api/demos/{demo_id}", {"messages": SAVED[:2]}),
              ("POST", f"/api/demos/{demo_id}/suggestions", {"messages": SAVED[:1]}),
              ("DELETE", f"/api/demos/{demo_id}", None))
    for method, url, body in routes:
        response = anonymous.request(method, url, json=body)
        assert response.status_code == 401 and response.json() == {"error": "log in first"}, (method, url)
    login_redirect = anonymous.get("/write", follow_redirects=False)
    assert login_redirect.status_code == 303 and login_redirect.headers["location"] == "/login?next=/write"
    token = ann.headers.pop("X-CSRF-Token")
    for method, url, body in routes:
        if method == "GET":
            continue
        response = ann.request(method, url, json=body)
        assert response.status_code == 403 and "CSRF" in response.json()["error"], (method, url)
    ann.headers["X-CSRF-Token"] = "not-the-token"
    assert ann.put(f"/api/demos/{demo_id}", json={"messages": SAVED[:2]}).status_code == 403
    ann.headers["X-CSRF-Token"] = token
    assert stored(harness, demo_id) == before and counts(harness) == before_counts


def test_delete_and_the_page(harness):
    ann = harness.client("ann")
    keep = new_demo(ann, key="demo-key-keep", title="<script>alert(1)</script>")
    drop = new_demo(ann, key="demo-key-drop")
    assert ann.put(f"/api/demos/{drop}", json={"messages": SAVED}).status_code == 200
    assert ann.delete(f"/api/demos/{drop}").json() == {"deleted": drop}
    assert stored(harness, drop) is None and counts(harness) == (1, 0)
    assert ann.delete(f"/api/demos/{drop}").status_code == 404  # gone: a repeat finds nothing

    page = ann.get(f"/write?d={keep}")
    assert page.status_code == 200
    html = page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert(1)" not in html  # escaped
    assert f'data-demo-id="{keep}"' in html and 'data-k-default="3"' in html and 'data-max-chars="60"' in html
    for testid in ("add-user", "add-assistant", "add-system", "save-demo", "demo-title", "turns", "demo-list",
                   "new-demo", "suggest-k", f"demo-link-{keep}"):
        assert f'data-testid="{testid}"' in html, testid
    assert '<script src="/static/write.js" defer></script>' in html
    script = ann.get("/static/write.js")
    assert script.status_code == 200 and "innerHTML" not in script.text
    assert ann.get("/write").status_code == 200


def test_concurrent_saves_of_one_demonstration_store_it_once(harness):
    from concurrent.futures import ThreadPoolExecutor

    clients = [harness.client("ann") for _ in range(4)]  # four tabs (or retries) saving at once
    demo_id = new_demo(clients[0])
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda c: c.put(f"/api/demos/{demo_id}", json={"messages": SAVED, "title": "Sums"})
                                 .status_code, clients))
    assert statuses == [200] * 4
    assert stored(harness, demo_id) == ("Sums", SAVED_ROWS) and counts(harness) == (1, 4)
