"""The admin area: who may use it, accounts, queues and overlap, agreement (hand-computed), stats, export routes."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from app_helpers import PASSWORD, login, make_harness
from sqlalchemy import select

from rlhf_pl.app.db import Assignment, Conversation, Message, RankingRecord, Rating, Task, User
from rlhf_pl.app.worker import WorkerStats

PAIRS_OF_3 = 3


@pytest.fixture
def harness(database_url):
    h = make_harness(database_url)
    h.add_user("root", "admin")
    h.add_user("ann", "labeler")
    yield h
    h.close()


def add_account(h, name: str, role: str = "labeler") -> int:
    """An account that never logs in (no password hash worth computing: argon2 is slow on purpose)."""
    with h.db.transaction() as session:
        user = User(username=name, password_hash="not a hash", role=role, active=True)
        session.add(user)
        session.flush()
        return user.id


def uid(h, name: str) -> int:
    with h.db.sessions() as session:
        return session.scalar(select(User.id).where(User.username == name))


def add_task(session, task_id: str, queue: str = "q1", k: int = 3, overlap: int = 2) -> None:
    session.add(Task(id=task_id, source="collect", queue=queue, prompt=[{"role": "user", "content": f"say {task_id}"}],
                     completions=[f"{task_id} answer {i}" for i in range(k)], meta={"n": task_id}, overlap=overlap))
    session.flush()


def add_ranking(session, task_id: str, user_id: int, ranking, skipped: bool = False, all_bad: bool = False,
                state: str | None = None) -> None:
    session.add(Assignment(task_id=task_id, user_id=user_id, state=state or ("skipped" if skipped else "done")))
    session.add(RankingRecord(task_id=task_id, user_id=user_id, ranking=None if skipped else ranking,
                              skipped=skipped, all_bad=all_bad, reason="unclear" if skipped else ""))


def snapshot(h) -> dict:
    """Everything an admin route could change."""
    with h.db.sessions() as session:
        return {"users": sorted((u.username, u.role, u.active, u.password_hash) for u in session.scalars(select(User))),
                "tasks": sorted((t.id, t.overlap) for t in session.scalars(select(Task))),
                "assignments": sorted((a.task_id, a.user_id, a.state) for a in session.scalars(select(Assignment)))}


# --- who may use it -------------------------------------------------------------------------------

ROUTES = [
    ("GET", "/admin", None),
    ("GET", "/api/admin/users", None),
    ("POST", "/api/admin/users", {"username": "eve", "password": PASSWORD, "role": "admin", "key": "k" * 12}),
    ("PATCH", "/api/admin/users/{ann}", {"role": "admin"}),
    ("PATCH", "/api/admin/users/{root}", {"role": "labeler", "active": False}),  # another user's id
    ("GET", "/api/admin/queues", None),
    ("PATCH", "/api/admin/queues/q1", {"overlap": 5}),
    ("GET", "/api/admin/agreement", None),
    ("GET", "/api/admin/stats", None),
    ("GET", "/api/admin/export/summary", None),
    ("GET", "/api/admin/export/demonstrations.jsonl", None),
    ("GET", "/api/admin/export/rankings.jsonl?mode=per_labeler", None),
    ("GET", "/api/admin/export/rankings.jsonl?mode=merged", None),
    ("GET", "/api/admin/export/chats.jsonl", None),
    ("GET", "/api/admin/export/pairwise.jsonl", None),
]


def test_every_route_refuses_labelers_403_and_anonymous_401_and_changes_nothing(harness, caplog):
    with harness.db.transaction() as session:
        add_task(session, "t1")
    before = snapshot(harness)
    labeler, anonymous, admin = harness.client("ann"), harness.client(), harness.client("root")
    anonymous.headers["X-CSRF-Token"] = "x"
    ids = {"ann": uid(harness, "ann"), "root": uid(harness, "root")}
    for method, url, body in ROUTES:
        url = url.format(**ids)
        refused = labeler.request(method, url, json=body)
        assert refused.status_code == 403, (method, url, refused.text)
        assert refused.json() == {"error": "admins only"}
        nobody = anonymous.request(method, url, json=body, follow_redirects=False)
        if url == "/admin":  # a page: to the login form
            assert nobody.status_code == 303 and nobody.headers["location"] == "/login?next=/admin"
        else:
            assert nobody.status_code == 401 and nobody.json() == {"error": "log in first"}, (method, url)
        assert snapshot(harness) == before, (method, url)
    assert "refused PATCH /api/admin/queues/q1 (403) for ann: admins only" in caplog.text
    for method, url, _ in ROUTES:  # ... and the admin gets every GET
        if method == "GET":
            assert admin.get(url).status_code == 200, url


def test_the_page_has_its_sections_and_controls(harness):
    html = harness.client("root").get("/admin").text
    for element in ("new-username", "new-password", "new-role", "create-user", "users-table", "queues-table",
                    "labelers-table", "stats-table", "agreement-table", "tab-users", "tab-queues", "tab-agreement",
                    "tab-export", "export-demonstrations", "export-rankings-per-labeler",
                    "export-rankings-merged", "export-chats", "export-pairwise", "export-summary"):
        assert f'id="{element}"' in html, element
    assert '<script src="/static/admin.js" defer></script>' in html
    assert ".innerHTML" not in harness.client("root").get("/static/admin.js").text


# --- accounts -------------------------------------------------------------------------------------


def test_accounts_are_listed_without_password_hashes_and_created_once_per_key(harness):
    admin = harness.client("root")
    with harness.db.sessions() as session:
        hashes = [u.password_hash for u in session.scalars(select(User))]
    listed = admin.get("/api/admin/users")
    assert [(u["username"], u["role"], u["active"]) for u in listed.json()["users"]] == [
        ("ann", "labeler", True), ("root", "admin", True)]
    assert set(listed.json()["users"][0]) == {"id", "username", "role", "active", "created_at"}
    assert not any(h in listed.text for h in hashes) and "argon2" not in listed.text

    body = {"username": "bob", "password": PASSWORD, "role": "labeler", "key": "create-bob-1"}
    first = admin.post("/api/admin/users", json=body)
    assert first.status_code == 200 and first.json()["user"]["username"] == "bob"
    again = admin.post("/api/admin/users", json=body)  # a double click: the same answer, one account
    assert again.json() == {**first.json(), "repeated": True}
    assert "argon2" not in first.text
    with harness.db.sessions() as session:
        assert session.scalars(select(User.username).order_by(User.username)).all() == ["ann", "bob", "root"]
    login(harness.client(), "bob")  # the account works


BAD_ACCOUNTS = [
    ({"username": "ann", "password": PASSWORD, "role": "labeler"}, 409, "the account 'ann' exists already"),
    ({"username": "zed", "password": PASSWORD, "role": "boss"}, 422, "role 'boss': choose one of admin, labeler"),
    ({"username": "zed", "password": "short", "role": "labeler"}, 422, "the password must have at least 8 characters"),
    ({"username": "z d", "password": PASSWORD, "role": "labeler"}, 422,
     "username 'z d': 1 to 64 characters of letters, digits, '.', '_' and '-'"),
]


def test_bad_new_accounts_get_one_clear_error_and_nothing_is_stored(harness):
    admin = harness.client("root")
    before = snapshot(harness)
    for i, (body, status, error) in enumerate(BAD_ACCOUNTS):
        answer = admin.post("/api/admin/users", json={**body, "key": f"bad-account-{i}"})
        assert answer.status_code == status and answer.json() == {"error": error}
    assert snapshot(harness) == before


def test_a_missing_key_or_an_unknown_field_is_refused(harness):
    admin = harness.client("root")
    answer = admin.post("/api/admin/users", json={"username": "zed", "password": PASSWORD, "role": "labeler"})
    assert answer.status_code == 422 and answer.json()["error"] == "key: Field required"
    answer = admin.patch(f"/api/admin/users/{uid(harness, 'ann')}", json={"rol": "admin"})
    assert answer.status_code == 422 and "rol: Extra inputs are not permitted" in answer.json()["error"]
    answer = admin.patch(f"/api/admin/users/{uid(harness, 'ann')}", json={})
    assert answer.status_code == 422 and answer.json()["error"] == "nothing to change: send role, active or password"


def test_role_changes_and_an_unknown_id_404(harness):
    admin, ann = harness.client("root"), uid(harness, "ann")
    answer = admin.patch(f"/api/admin/users/{ann}", json={"role": "admin"})
    assert answer.status_code == 200 and answer.json()["user"]["role"] == "admin"
    assert admin.patch(f"/api/admin/users/{ann}", json={"role": "admin"}).json()["user"]["role"] == "admin"  # a setter
    assert harness.client("ann").get("/api/admin/users").status_code == 200  # now an admin
    bad = admin.patch(f"/api/admin/users/{ann}", json={"role": "owner"})
    assert bad.status_code == 422 and bad.json() == {"error": "role 'owner': choose one of admin, labeler"}
    missing = admin.patch("/api/admin/users/9999", json={"role": "admin"})
    assert missing.status_code == 404 and missing.json() == {"error": "no account with id 9999"}


def test_an_admin_cannot_demote_or_deactivate_themself(harness):
    admin, root = harness.client("root"), uid(harness, "root")
    before = snapshot(harness)
    answer = admin.patch(f"/api/admin/users/{root}", json={"role": "labeler"})
    assert answer.status_code == 400
    assert answer.json() == {"error": "you cannot demote your own account (another admin can)"}
    answer = admin.patch(f"/api/admin/users/{root}", json={"active": False, "password": "a new password"})
    assert answer.status_code == 400
    assert answer.json() == {"error": "you cannot deactivate your own account (another admin can)"}
    assert snapshot(harness) == before  # neither the role nor the password changed
    # their own password they may change, and stay logged in
    assert admin.patch(f"/api/admin/users/{root}", json={"password": "a new password"}).status_code == 200
    assert admin.get("/api/admin/users").status_code == 200
    login(harness.client(), "root", "a new password")


def test_deactivating_ends_sessions_and_gives_open_assignments_back(harness):
    admin, ann = harness.client("root"), uid(harness, "ann")
    ann_client = harness.client("ann")
    with harness.db.transaction() as session:
        add_task(session, "t1")
        add_task(session, "t2")
        add_ranking(session, "t1", ann, [[0], [1], [2]])
        session.add(Assignment(task_id="t2", user_id=ann, state="open"))
    answer = admin.patch(f"/api/admin/users/{ann}", json={"active": False})
    assert answer.status_code == 200
    assert answer.json()["user"]["active"] is False and answer.json()["released_assignments"] == 1
    assert ann_client.get("/api/me").status_code == 401
    with harness.db.sessions() as session:
        assert [(a.task_id, a.state) for a in session.scalars(select(Assignment))] == [("t1", "done")]
        assert session.scalar(select(RankingRecord.task_id)) == "t1"  # the ranking stays
    assert admin.patch(f"/api/admin/users/{ann}", json={"active": True}).json()["user"]["active"] is True
    login(harness.client(), "ann")


def test_a_new_password_ends_the_old_sessions(harness):
    admin, ann_client = harness.client("root"), harness.client("ann")
    short = admin.patch(f"/api/admin/users/{uid(harness, 'ann')}", json={"password": "short"})
    assert short.status_code == 422
    assert short.json() == {"error": "password: the password must have at least 8 characters"}
    assert ann_client.get("/api/me").status_code == 200
    answer = admin.patch(f"/api/admin/users/{uid(harness, 'ann')}", json={"password": "another password"})
    assert answer.status_code == 200 and "argon2" not in answer.text
    assert ann_client.get("/api/me").status_code == 401
    login(harness.client(), "ann", "another password")


# --- queues ---------------------------------------------------------------------------------------


def build_queues(h) -> dict[str, int]:
    for name in ("bob", "cat"):
        add_account(h, name)
    ids = {name: uid(h, name) for name in ("ann", "bob", "cat")}
    with h.db.transaction() as session:
        for t in ("a1", "a2", "a3"):
            add_task(session, t, queue="alpha", overlap=2)
        add_task(session, "b1", queue="runs/beta", overlap=1)
        add_ranking(session, "a1", ids["ann"], [[0], [1, 2]])
        add_ranking(session, "a1", ids["bob"], [[1], [0], [2]])
        add_ranking(session, "a2", ids["ann"], None, skipped=True)
        add_ranking(session, "a2", ids["cat"], [[2], [0], [1]])
        session.add(Assignment(task_id="a3", user_id=ids["bob"], state="open"))
        add_ranking(session, "b1", ids["cat"], [[0], [1], [2]])
    return ids


def test_queue_progress_per_queue_and_per_labeler(harness):
    ids = build_queues(harness)
    answer = harness.client("root").get("/api/admin/queues").json()
    assert answer["queues"] == [
        {"queue": "alpha", "tasks": 3, "wanted": 6, "done": 3, "skipped": 1, "open": 1, "complete": 1,
         "overlap_min": 2, "overlap_max": 2, "progress": 3 / 6},
        {"queue": "runs/beta", "tasks": 1, "wanted": 1, "done": 1, "skipped": 0, "open": 0, "complete": 1,
         "overlap_min": 1, "overlap_max": 1, "progress": 1.0},
    ]
    assert answer["labelers"] == [
        {"id": ids["ann"], "username": "ann", "active": True, "assigned": 2, "open": 0, "done": 1, "skipped": 1},
        {"id": ids["bob"], "username": "bob", "active": True, "assigned": 2, "open": 1, "done": 1, "skipped": 0},
        {"id": ids["cat"], "username": "cat", "active": True, "assigned": 2, "open": 0, "done": 2, "skipped": 0},
    ]


def test_overlap_is_set_for_the_queue_but_never_below_the_labelers_holding_a_slot(harness):
    build_queues(harness)
    admin = harness.client("root")
    answer = admin.patch("/api/admin/queues/alpha", json={"overlap": 1})
    # a1: ann and bob ranked it -> 2; a2: ann skipped (a skip frees its slot), cat ranked -> 1; a3: bob holds it -> 1
    assert answer.json() == {"queue": "alpha", "overlap": 1, "tasks": 3, "changed": 2,
                             "kept_higher": [{"task": "a1", "overlap": 2}]}
    assert snapshot(harness)["tasks"] == [("a1", 2), ("a2", 1), ("a3", 1), ("b1", 1)]
    answer = admin.patch("/api/admin/queues/alpha", json={"overlap": 4})
    assert answer.json()["changed"] == 3 and answer.json()["kept_higher"] == []
    again = admin.patch("/api/admin/queues/alpha", json={"overlap": 4})  # a setter: a repeat changes nothing
    assert again.json()["changed"] == 0
    assert admin.patch("/api/admin/queues/runs/beta", json={"overlap": 3}).json()["changed"] == 1  # a name with '/'
    assert snapshot(harness)["tasks"] == [("a1", 4), ("a2", 4), ("a3", 4), ("b1", 3)]
    assert admin.get("/api/admin/queues").json()["queues"][0]["wanted"] == 12


def test_bad_overlap_changes_are_refused(harness):
    build_queues(harness)
    admin = harness.client("root")
    before = snapshot(harness)
    missing = admin.patch("/api/admin/queues/gamma", json={"overlap": 2})
    assert missing.status_code == 404
    assert missing.json() == {"error": "no queue 'gamma' (a queue is the tasks that share its name)"}
    for bad, why in ((0, "greater than or equal to 1"), (51, "less than or equal to 50"), ("two", "valid integer")):
        answer = admin.patch("/api/admin/queues/alpha", json={"overlap": bad})
        assert answer.status_code == 422 and answer.json()["error"].startswith("overlap: ") and why in answer.text
    assert snapshot(harness) == before


# --- agreement ------------------------------------------------------------------------------------


def build_agreement(h) -> None:
    """t1 (queue q1) and t2 (queue q2) ranked by ann, bob and cat; cat reverses the others."""
    for name in ("bob", "cat", "dan"):
        add_account(h, name)
    ids = {name: uid(h, name) for name in ("ann", "bob", "cat", "dan")}
    with h.db.transaction() as session:
        add_task(session, "t1", queue="q1")
        add_task(session, "t2", queue="q2")
        add_task(session, "t3", queue="q1")
        add_ranking(session, "t1", ids["ann"], [[0], [1], [2]])
        add_ranking(session, "t1", ids["bob"], [[0], [1], [2]])
        add_ranking(session, "t1", ids["cat"], [[2], [1], [0]])
        add_ranking(session, "t1", ids["dan"], None, skipped=True)  # not counted
        add_ranking(session, "t2", ids["ann"], [[0], [1, 2]])
        add_ranking(session, "t2", ids["bob"], [0, 1, 2])  # the data files' form of [[0], [1], [2]]
        add_ranking(session, "t2", ids["cat"], [[1, 2], [0]], all_bad=True)
        add_ranking(session, "t3", ids["ann"], [[1], [0], [2]])  # ranked once: not shared
        add_ranking(session, "t3", ids["bob"], None, skipped=True)


def test_agreement_by_hand(harness):
    build_agreement(harness)
    answer = harness.client("root").get("/api/admin/agreement").json()
    r6 = math.sqrt(6)
    # pairs (agreement, tau): t1 ann-bob (1, 1), ann-cat (0, -1), bob-cat (0, -1);
    # t2 ann-bob (2/3, 2/sqrt 6), ann-cat (1/3, -1), bob-cat (0, -2/sqrt 6)
    assert answer["overall"] == {"tasks": 2, "pairs": 6, "agreement": pytest.approx(2 / 6),
                                 "tau": pytest.approx(-2 / 6)}
    rows = {row["username"]: row for row in answer["labelers"]}
    assert list(rows) == ["ann", "bob", "cat"]
    assert rows["ann"] == {"username": "ann", "tasks": 2, "pairs": 4, "agreement": pytest.approx(2 / 4),
                           "tau": pytest.approx((-1 + 2 / r6) / 4), "others": pytest.approx(0.0), "flagged": False}
    assert rows["bob"] == {"username": "bob", "tasks": 2, "pairs": 4, "agreement": pytest.approx(5 / 12),
                           "tau": pytest.approx(0.0), "others": pytest.approx(1 / 6), "flagged": False}
    assert rows["cat"] == {"username": "cat", "tasks": 2, "pairs": 4, "agreement": pytest.approx(1 / 12),
                           "tau": pytest.approx((-3 - 2 / r6) / 4), "others": pytest.approx(5 / 6), "flagged": True}
    assert answer["rule"].startswith("flagged: at least 3 pairs")
    only_q1 = harness.client("root").get("/api/admin/agreement?queue=q1").json()
    assert only_q1["overall"] == {"tasks": 1, "pairs": PAIRS_OF_3, "agreement": pytest.approx(1 / 3),
                                  "tau": pytest.approx(-1 / 3)}
    assert [row["flagged"] for row in only_q1["labelers"]] == [False, False, False]  # 2 pairs each: too few


def test_agreement_without_shared_tasks_is_empty(harness):
    answer = harness.client("root").get("/api/admin/agreement").json()
    assert answer["overall"] == {"tasks": 0, "pairs": 0, "agreement": None, "tau": None}
    assert answer["labelers"] == []


# --- stats ----------------------------------------------------------------------------------------


def test_stats_count_rows_and_show_the_workers_counters(harness):
    build_agreement(harness)
    ann = uid(harness, "ann")
    with harness.db.transaction() as session:
        chat = Conversation(user_id=ann, kind="chat", title="hi")
        session.add(chat)
        session.flush()
        first = Message(conversation_id=chat.id, position=0, role="user", content="hi")
        answer = Message(conversation_id=chat.id, position=1, role="assistant", content="hello", source="model")
        session.add_all([first, answer])
        session.flush()
        session.add(Rating(message_id=answer.id, user_id=ann, value=-1))
    harness.client("root").patch(f"/api/admin/users/{uid(harness, 'dan')}", json={"active": False})
    stats = harness.client("root").get("/api/admin/stats").json()
    assert stats == {"users": {"admin": 1, "labeler": 4}, "inactive_users": 1, "conversations": {"chat": 1},
                     "messages": 2, "ratings": {"down": 1}, "tasks": 3, "assignments": {"done": 7, "skipped": 2},
                     "rankings": {"ranked": 7, "skipped": 2, "all_bad": 1}, "worker": None}
    harness.app.state.worker = SimpleNamespace(stats=WorkerStats(requests=4, batches=2, max_batch_rows=3, tokens=50))
    assert harness.client("root").get("/api/admin/stats").json()["worker"] == {
        "requests": 4, "batches": 2, "max_batch_rows": 3, "cancelled": 0, "tokens": 50}


# --- the export routes ----------------------------------------------------------------------------


def test_export_routes_are_attachments_with_their_counts(harness):
    build_agreement(harness)
    admin = harness.client("root")
    answer = admin.get("/api/admin/export/rankings.jsonl?mode=per_labeler")
    assert answer.status_code == 200
    assert answer.headers["content-disposition"] == 'attachment; filename="rankings-per_labeler.jsonl"'
    lines = [json.loads(line) for line in answer.text.splitlines()]
    assert [(r["provenance"]["task"], r["provenance"]["labeler"]) for r in lines] == [
        ("t1", "ann"), ("t1", "bob"), ("t1", "cat"), ("t2", "ann"), ("t2", "bob"), ("t2", "cat"), ("t3", "ann")]
    assert answer.headers["x-export-records"] == "7"
    assert json.loads(answer.headers["x-export-left-out"]) == {"skipped": 2}
    merged = admin.get("/api/admin/export/rankings.jsonl?mode=merged")
    assert merged.headers["content-disposition"] == 'attachment; filename="rankings-merged.jsonl"'
    assert [json.loads(line)["ranking"] for line in merged.text.splitlines()] == [[0, 1, 2], [0, 1, 2], [1, 0, 2]]
    assert admin.get("/api/admin/export/rankings.jsonl").headers["x-export-records"] == "7"  # per_labeler by default
    bad = admin.get("/api/admin/export/rankings.jsonl?mode=both")
    assert bad.status_code == 422 and bad.json() == {"error": "mode 'both': choose one of per_labeler, merged"}
    for what in ("demonstrations", "chats", "pairwise"):
        empty = admin.get(f"/api/admin/export/{what}.jsonl")
        assert empty.status_code == 200 and empty.text == "" and empty.headers["x-export-records"] == "0"
        assert empty.headers["content-disposition"] == f'attachment; filename="{what}.jsonl"'
    summary = admin.get("/api/admin/export/summary").json()
    assert summary["rankings_per_labeler"] == {"records": 7, "left_out": {"skipped": 2}}
    assert summary["rankings_merged"] == {"records": 3, "left_out": {"skipped": 2}}
    assert summary["chats"] == {"records": 0, "left_out": {}}
