"""The Rank area of the feedback app: the task queue (overlap, skips, races), the ranking API (validation,
idempotency, other labelers' tasks), the page, and tasks made from the app's chat logs — on SQLite and
PostgreSQL."""
from __future__ import annotations

import random
import threading

import pytest
from app_helpers import make_harness, make_worker
from sqlalchemy import func, select

from rlhf_pl.app import tasks
from rlhf_pl.app.db import Assignment, Conversation, Message, RankingRecord, Submission, Task, User

KEY = "key-0000000001"


def record(i: int, k: int = 3) -> dict:
    """A task record as collect makes them; the third completion is markup (it must stay text)."""
    return {"id": f"t{i}", "prompt": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": f"What is {i} + 1?"}],
            "completions": [f"{i + 1}.", f"It is {i}.", "<script>alert(1)</script>", "Four."][:k],
            "meta": {"answer": str(i + 1), "origin": f"p.jsonl:{i}"}}




@pytest.fixture()
def harness(database_url):
    h = make_harness(database_url)
    yield h
    h.close()


def add(h, records, overlap=1, queue="q", source="collect", max_k=None):
    with h.db.transaction() as session:
        return tasks.add_tasks(session, records, queue, overlap, source, max_k=max_k)


def users(h, *names, role="labeler"):
    for name in names:
        h.add_user(name, role)
    return {name: h.client(name) for name in names}


def assignments(h) -> set[tuple[str, str, str]]:
    with h.db.sessions() as session:
        rows = session.execute(select(Assignment.task_id, User.username, Assignment.state)
                               .join(User, User.id == Assignment.user_id))
        return set(map(tuple, rows))


def stored(h) -> list[tuple]:
    with h.db.sessions() as session:
        rows = session.execute(select(RankingRecord.task_id, User.username, RankingRecord.ranking,
                                      RankingRecord.all_bad, RankingRecord.skipped, RankingRecord.reason)
                               .join(User, User.id == RankingRecord.user_id).order_by(RankingRecord.id))
        return [tuple(row) for row in rows]


def next_id(client):
    response = client.get("/api/tasks/next")
    assert response.status_code == 200, response.text
    task = response.json()["task"]
    return None if task is None else task["id"]


def rank(client, task_id, ranking, key=KEY, **extra):
    return client.post(f"/api/tasks/{task_id}/ranking", json={"ranking": ranking, "key": key, **extra})


def user_row(h, name):
    with h.db.sessions() as session:
        return session.scalars(select(User).where(User.username == name)).one()


# --- the queue --------------------------------------------------------------------------------------


def test_overlap_two_with_three_labelers_gives_a_task_to_exactly_two_never_twice_to_one(harness):
    c = users(harness, "ann", "bob", "carl")
    assert add(harness, [record(0), record(1)], overlap=2) == ["t0", "t1"]
    first = c["ann"].get("/api/tasks/next").json()
    assert first["task"] == {"id": "t0", "prompt": record(0)["prompt"], "completions": record(0)["completions"],
                             "k": 3, "queue": "q"}  # no meta: the answer key stays hidden from labelers
    assert "Keyboard" in " ".join(first["guidelines"])
    assert next_id(c["bob"]) == "t0"
    assert next_id(c["carl"]) == "t1"  # t0 has its two labelers
    assert next_id(c["ann"]) == "t0"  # her own open task again, not a new one
    assert rank(c["ann"], "t0", [[1], [0, 2]]).status_code == 200
    assert next_id(c["ann"]) == "t1"
    assert rank(c["bob"], "t0", [[0], [1], [2]]).status_code == 200
    assert c["bob"].get("/api/tasks/next").json() == {"task": None, "why": "nothing to rank",
                                                      "guidelines": first["guidelines"]}
    assert assignments(harness) == {("t0", "ann", "done"), ("t0", "bob", "done"), ("t1", "carl", "open"),
                                    ("t1", "ann", "open")}
    with harness.db.sessions() as session:
        assert tasks.finished(session, ["t0", "t1", "nope"]) == {"t0"}
        assert tasks.progress(session, ["t0", "t1"]) == {"t0": (2, 2), "t1": (0, 2)}
        given = tasks.answers(session, ["t0", "t1"])
    assert list(given) == ["t0"]
    assert [(a.username, a.ranking, a.all_bad) for a in given["t0"]] == [("ann", [[1], [0, 2]], False),
                                                                        ("bob", [[0], [1], [2]], False)]


def test_a_skip_frees_the_slot_for_someone_else_and_never_comes_back(harness):
    c = users(harness, "ann", "bob", "carl")
    add(harness, [record(0)], overlap=2)
    assert next_id(c["ann"]) == next_id(c["bob"]) == "t0"
    assert next_id(c["carl"]) is None
    skipped = c["ann"].post("/api/tasks/t0/skip", json={"reason": "I cannot judge sums", "key": KEY})
    assert skipped.status_code == 200
    assert skipped.json() == {"task": "t0", "ranking": None, "all_bad": False, "skipped": True,
                              "reason": "I cannot judge sums", "repeated": False}
    assert next_id(c["ann"]) is None  # never twice to one labeler
    assert next_id(c["carl"]) == "t0"
    assert rank(c["bob"], "t0", [[2], [1], [0]]).status_code == 200
    with harness.db.sessions() as session:
        assert tasks.finished(session, ["t0"]) == set()  # a skip is not a ranking
    assert rank(c["carl"], "t0", [[2], [0, 1]]).status_code == 200
    with harness.db.sessions() as session:
        assert tasks.finished(session, ["t0"]) == {"t0"}
        assert [a.username for a in tasks.answers(session, ["t0"])["t0"]] == ["bob", "carl"]
    assert assignments(harness) == {("t0", "ann", "skipped"), ("t0", "bob", "done"), ("t0", "carl", "done")}
    # a skipped task cannot be ranked afterwards, a ranked one cannot be skipped
    late = rank(c["ann"], "t0", [[0], [1], [2]], key="key-late-000001")
    assert late.status_code == 409 and "you skipped task 't0'" in late.json()["error"]
    undo = c["bob"].post("/api/tasks/t0/skip", json={"reason": "changed my mind", "key": "key-late-000002"})
    assert undo.status_code == 409 and "ranked task 't0' already" in undo.json()["error"]
    assert stored(harness) == [("t0", "ann", None, False, True, "I cannot judge sums"),
                               ("t0", "bob", [[2], [1], [0]], False, False, ""),
                               ("t0", "carl", [[2], [0, 1]], False, False, "")]


def test_a_skip_needs_a_reason(harness):
    c = users(harness, "ann")
    add(harness, [record(0)])
    assert next_id(c["ann"]) == "t0"
    blank = c["ann"].post("/api/tasks/t0/skip", json={"reason": "  ", "key": KEY})
    assert blank.status_code == 422 and "reason: say why you skip" in blank.json()["error"]
    missing = c["ann"].post("/api/tasks/t0/skip", json={"key": KEY})
    assert missing.status_code == 422 and "reason" in missing.json()["error"]
    assert assignments(harness) == {("t0", "ann", "open")} and stored(harness) == []


@pytest.mark.parametrize("claims", [(1, 6, 1), (2, 6, 2)], ids=["overlap1", "overlap2"])
def test_labelers_racing_for_the_last_slot_get_it_once(harness, claims):
    overlap, racers, winners = claims
    names = [f"u{i}" for i in range(racers)]
    for name in names:
        harness.add_user(name)
    add(harness, [record(0)], overlap=overlap)
    people = [user_row(harness, name) for name in names]
    got: list = [None] * racers
    start = threading.Barrier(racers)

    def race(i: int) -> None:
        start.wait()
        task = tasks.claim_next(harness.db, people[i])
        got[i] = None if task is None else task.id

    threads = [threading.Thread(target=race, args=(i,)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert got.count("t0") == winners and got.count(None) == racers - winners
    assert len(assignments(harness)) == winners


def test_one_labeler_asking_four_times_at_once_gets_one_assignment(harness):
    harness.add_user("ann")
    add(harness, [record(0), record(1)], overlap=2)
    ann = user_row(harness, "ann")
    got: list = []
    start = threading.Barrier(4)

    def ask() -> None:
        start.wait()
        got.append(tasks.claim_next(harness.db, ann).id)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(got) == 4
    # at most one assignment per task (the unique key); whoever lost a race got the one the winner made
    rows = assignments(harness)
    assert {task for task, _, _ in rows} >= set(got) and all(who == "ann" for _, who, _ in rows)
    assert len(rows) == len({task for task, _, _ in rows})


def test_add_tasks_is_idempotent_by_id_and_checks_records(harness):
    assert add(harness, [record(0), record(1)], overlap=2, queue="first") == ["t0", "t1"]
    changed = {**record(0), "completions": ["other", "texts"], "meta": {"x": 1}}
    assert add(harness, [changed, record(2), record(2)], overlap=5, queue="second", source="chat") == ["t2"]
    with harness.db.sessions() as session:
        t0 = session.get(Task, "t0")
        assert (t0.queue, t0.overlap, t0.source, t0.completions, t0.meta) == \
            ("first", 2, "collect", record(0)["completions"], record(0)["meta"])
        assert session.scalar(select(func.count()).select_from(Task)) == 3
    bad = [
        ({**record(5), "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
         "must end with a user message"),
        ({**record(5), "prompt": [{"role": "robot", "content": "Hi"}]}, "role: one of system, user, assistant"),
        ({**record(5), "completions": []}, "completions must be a non-empty list of strings"),
        ({**record(5), "id": "x" * 65}, "a string of 1 to 64 characters"),
        (record(5, k=4), "K=4 completions, more than app.max_k=3"),
    ]
    for item, problem in bad:
        with pytest.raises(tasks.BadRanking, match=problem):
            add(harness, [record(6), item], max_k=3)
    with pytest.raises(tasks.BadRanking, match="task source 'web': choose one of collect, chat"):
        add(harness, [record(6)], source="web")
    with pytest.raises(tasks.BadRanking, match="overlap=0"):
        add(harness, [record(6)], overlap=0)
    with harness.db.sessions() as session:  # nothing half-added
        assert session.scalar(select(func.count()).select_from(Task)) == 3


# --- the ranking API --------------------------------------------------------------------------------


@pytest.mark.parametrize("ranking, problem", [
    ([[0], [0], [1]], "each index once, got 0 in group 0 and in group 1"),
    ([[0], [1]], "every index 0..2, missing 2"),
    ([[0], [1], [2], [3]], "indices in 0..2, got 3 in group 3"),
    ([[0, 1], [], [2]], "group 1 to be non-empty"),
    ([[0, 1, 2, 2]], "each index once"),
    ([[-1], [0, 1, 2]], "indices in 0..2, got -1"),
    ([["0"], [1], [2]], "ranking.0.0: Input should be a valid integer"),
    ([[0.5], [1], [2]], "ranking.0.0: Input should be a valid integer"),
    ([[True], [1], [2]], "ranking.0.0: Input should be a valid integer"),
    ([0, 1, 2], "ranking.0: Input should be a valid list"),
    (None, "ranking: required"),
])
def test_a_bad_ranking_is_refused_with_a_clear_error_and_nothing_is_stored(harness, ranking, problem):
    c = users(harness, "ann")
    add(harness, [record(0)])
    assert next_id(c["ann"]) == "t0"
    response = rank(c["ann"], "t0", ranking)
    assert response.status_code == 422, response.text
    assert problem in response.json()["error"]
    assert stored(harness) == [] and assignments(harness) == {("t0", "ann", "open")}
    with harness.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Submission)) == 0
    assert rank(c["ann"], "t0", [[2], [1], [0]]).status_code == 200  # the same key works once it is right


def test_all_bad_with_and_without_a_ranking(harness):
    c = users(harness, "ann")
    add(harness, [record(0), record(1, k=4)])
    assert next_id(c["ann"]) == "t0"
    plain = rank(c["ann"], "t0", None, all_bad=True, reason="none answers")
    assert plain.status_code == 200 and plain.json()["ranking"] == [[0, 1, 2]] and plain.json()["all_bad"] is True
    assert next_id(c["ann"]) == "t1"
    ordered = rank(c["ann"], "t1", [[3], [0, 1], [2]], key="key-0000000002", all_bad=True)
    assert ordered.status_code == 200
    assert stored(harness) == [("t0", "ann", [[0, 1, 2]], True, False, "none answers"),
                               ("t1", "ann", [[3], [0, 1], [2]], True, False, "")]


def test_a_double_submit_is_stored_once(harness):
    c = users(harness, "ann")
    add(harness, [record(0), record(1)])
    assert next_id(c["ann"]) == "t0"
    first = rank(c["ann"], "t0", [[1], [0], [2]])
    again = rank(c["ann"], "t0", [[1], [0], [2]])
    assert first.status_code == again.status_code == 200
    assert first.json()["repeated"] is False and again.json() == {**first.json(), "repeated": True}
    other_key = rank(c["ann"], "t0", [[2], [1], [0]], key="key-0000000009")  # a second tab, another ranking
    assert other_key.status_code == 200 and other_key.json()["ranking"] == [[1], [0], [2]]
    assert other_key.json()["repeated"] is True
    # two requests at once with different keys: one ranking stored, both answered
    assert next_id(c["ann"]) == "t1"
    answers: list = []
    start = threading.Barrier(2)

    def submit(key: str) -> None:
        start.wait()
        answers.append(rank(c["ann"], "t1", [[0, 1], [2]], key=key))

    threads = [threading.Thread(target=submit, args=(f"key-race-00000{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(r.status_code for r in answers) == [200, 200]
    assert sorted(r.json()["repeated"] for r in answers) == [False, True]
    assert stored(harness) == [("t0", "ann", [[1], [0], [2]], False, False, ""),
                               ("t1", "ann", [[0, 1], [2]], False, False, "")]


def test_another_labelers_task_is_not_found_and_stays_unchanged(harness):
    c = users(harness, "ann", "bob")
    add(harness, [record(0), record(1)])
    assert next_id(c["ann"]) == "t0" and next_id(c["bob"]) == "t1"
    for task_id in ("t0", "missing"):  # someone else's task answers like a missing one
        for response in (rank(c["bob"], task_id, [[0], [1], [2]]),
                         c["bob"].post(f"/api/tasks/{task_id}/skip", json={"reason": "not mine", "key": KEY}),
                         c["bob"].get(f"/api/tasks/{task_id}")):
            assert response.status_code == 404, response.text
            assert response.json() == {"error": f"no task {task_id!r} assigned to you"}
    assert assignments(harness) == {("t0", "ann", "open"), ("t1", "bob", "open")} and stored(harness) == []
    own = c["ann"].get("/api/tasks/t0").json()
    assert own["state"] == "open" and own["answer"] is None and own["task"]["id"] == "t0"
    assert rank(c["ann"], "t0", [[0], [1], [2]], reason="easy").status_code == 200
    assert rank(c["bob"], "t1", [[2], [0, 1]], key="key-bob-000001").status_code == 200
    mine = c["ann"].get("/api/rankings/mine").json()
    assert mine["total"] == 1 and [(r["task"], r["ranking"], r["reason"], r["k"]) for r in mine["rankings"]] == \
        [("t0", [[0], [1], [2]], "easy", 3)]
    assert [r["task"] for r in c["bob"].get("/api/rankings/mine").json()["rankings"]] == ["t1"]
    assert c["bob"].get("/api/tasks/t0").status_code == 404  # done or not, never readable by bob
    assert c["ann"].get("/api/tasks/t0").json()["answer"]["ranking"] == [[0], [1], [2]]


def test_routes_need_a_session_and_the_csrf_token(harness):
    c = users(harness, "ann")
    add(harness, [record(0)])
    anonymous = harness.client()
    for method, url in (("get", "/api/tasks/next"), ("get", "/api/rankings/mine"), ("get", "/api/tasks/t0"),
                        ("post", "/api/tasks/t0/ranking"), ("post", "/api/tasks/t0/skip"),
                        ("post", "/api/admin/tasks/from-chats")):
        response = getattr(anonymous, method)(url, **({"json": {}} if method == "post" else {}))
        assert response.status_code == 401, url
    page = anonymous.get("/rank", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/rank"
    assert next_id(c["ann"]) == "t0"
    token = c["ann"].headers.pop("X-CSRF-Token")
    assert rank(c["ann"], "t0", [[0], [1], [2]]).status_code == 403
    c["ann"].headers["X-CSRF-Token"] = token
    assert stored(harness) == []


def test_reasons_are_bounded(database_url):
    h = make_harness(database_url, max_message_chars=12)
    try:
        c = users(h, "ann")
        add(h, [record(0), record(1)])
        assert next_id(c["ann"]) == "t0"
        long = rank(c["ann"], "t0", [[0], [1], [2]], reason="x" * 13)
        assert long.status_code == 422
        assert long.json()["error"] == "reason: 13 characters, at most 12 are allowed (app.max_message_chars)"
        skip = c["ann"].post("/api/tasks/t0/skip", json={"reason": "y" * 13, "key": KEY})
        assert skip.status_code == 422 and "at most 12 are allowed (app.max_message_chars)" in skip.json()["error"]
        assert stored(h) == []
        assert rank(c["ann"], "t0", [[0], [1], [2]], reason="x" * 12).status_code == 200
    finally:
        h.close()


def test_the_rank_page_has_its_elements_and_script(harness):
    c = users(harness, "ann")
    html = c["ann"].get("/rank").text
    for testid in ("guidelines", "groups", "prompt", "submit-ranking", "all-bad", "skip-task", "skip-reason",
                   "no-task", "status"):
        assert f'data-testid="{testid}"' in html, testid
    assert '<script src="/static/rank.js" defer></script>' in html and "ties it with the group above" in html
    script = c["ann"].get("/static/rank.js").text
    assert "innerHTML" not in script and "gap-${g}" in script and "completion-${i}" in script


# --- tasks from the chat logs -----------------------------------------------------------------------


def _chat(session, user_id: int, kind: str, turns: list[tuple], policy: str = "chat-policy") -> int:
    """A conversation of ``turns`` (role, content, source[, alternative, selected]) stored as the chat area does."""
    conversation = Conversation(user_id=user_id, kind=kind, title="t", policy=policy)
    session.add(conversation)
    session.flush()
    position = -1
    for turn in turns:
        role, content, source, alternative, selected = (*turn, 0, True)[:5] if len(turn) == 3 else turn
        position += alternative == 0
        session.add(Message(conversation_id=conversation.id, position=position, alternative=alternative,
                            selected=selected, role=role, content=content, source=source))
    session.flush()
    return conversation.id


@pytest.fixture()
def chat_harness(database_url, tiny_model, tiny_tokenizer):
    h = make_harness(database_url, make_worker(tiny_model, tiny_tokenizer, max_new_tokens=8), policy="tiny-policy",
                     max_k=4, overlap=2)
    yield h
    h.close()


def test_tasks_from_chats_cut_a_seeded_model_turn_and_sample_k_completions(chat_harness):
    h = chat_harness
    h.add_user("root", "admin")
    ann = h.add_user("ann")
    with h.db.transaction() as session:
        chat = _chat(session, ann, "chat", [("system", "Be brief.", "human"), ("user", "Hi.", "human"),
                                            ("assistant", "Hello!", "model"), ("user", "What is 2 + 2?", "human"),
                                            ("assistant", "Five.", "model", 0, False),
                                            ("assistant", "4.", "model", 1, True)])
        _chat(session, ann, "chat", [("user", "Anyone there?", "human")])  # no assistant message yet
        _chat(session, ann, "demonstration", [("user", "Hi.", "human"), ("assistant", "Hello.", "human")])
    c = {"root": h.client("root"), "ann": h.client("ann")}
    refused = c["ann"].post("/api/admin/tasks/from-chats", json={"k": 2, "key": KEY})
    assert refused.status_code == 403 and refused.json() == {"error": "admins only"}
    for k in (1, 5):
        bad = c["root"].post("/api/admin/tasks/from-chats", json={"k": k, "key": KEY})
        assert bad.status_code == 422 and f"k={k}: completions per task must be between 2 and app.max_k=4" \
            in bad.json()["error"]
    with h.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Task)) == 0
    made = c["root"].post("/api/admin/tasks/from-chats", json={"k": 3, "key": KEY})
    assert made.status_code == 200, made.text
    turn = random.Random(f"0:{chat}").choice([2, 4])  # the two model-written answers to a user turn
    task_id = f"chat-{chat}-{turn}"
    assert made.json() == {"added": [task_id], "unusable": []}  # gibberish, but distinct gibberish
    with h.db.sessions() as session:
        task = session.get(Task, task_id)
        prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 + 2?"}][:turn]
        assert (task.source, task.queue, task.overlap, task.prompt) == ("chat", "chats", 2, prompt)
        assert 2 <= len(task.completions) <= 3 and len(set(task.completions)) == len(task.completions)
        assert all(text == text.strip() and text for text in task.completions)
        assert task.meta == {"origin": f"chat:{chat}", "conversation": chat, "turn": turn,
                             "message": task.meta["message"], "original": "Hello!" if turn == 2 else "4.",
                             "chat_policy": "chat-policy", "policy": "tiny-policy", "seed": 0}
    assert c["root"].post("/api/admin/tasks/from-chats", json={"k": 3, "key": KEY}).json()["repeated"] is True
    again = c["root"].post("/api/admin/tasks/from-chats", json={"k": 3, "key": "key-0000000002"})
    assert again.json() == {"added": [], "unusable": []}  # a conversation gets one task
    # a labeler ranks it like any other task
    assert next_id(c["ann"]) == task_id
    k = len(task.completions)
    assert rank(c["ann"], task_id, [[i] for i in reversed(range(k))]).status_code == 200
    assert next_id(c["root"]) == task_id  # overlap 2: an admin may rank too


def test_from_chats_without_a_model_is_503(harness):
    harness.add_user("root", "admin")
    response = harness.client("root").post("/api/admin/tasks/from-chats", json={"k": 2, "key": KEY})
    assert response.status_code == 503 and "serves no model" in response.json()["error"]
