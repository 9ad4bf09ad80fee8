"""Text that a database cannot store as it is: a person's NUL or unpaired surrogate is refused (422)
in every area; a model's NUL is stored as U+FFFD (SQLite and PostgreSQL alike)."""
from __future__ import annotations

from app_helpers import make_harness
from sqlalchemy import select

from rlhf_pl.app import tasks
from rlhf_pl.app.db import Message, Task, storable


def test_storable_replaces_only_nul():
    assert storable("a\x00b\x00") == "a\ufffdb\ufffd" and storable("ok ünïcode") == "ok ünïcode"


def test_people_cannot_send_nul_and_model_nul_is_stored_as_u_fffd(database_url):
    harness = make_harness(database_url)
    try:
        harness.add_user("ada")
        client = harness.client("ada")
        with harness.db.transaction() as session:
            tasks.add_tasks(session, [{"id": "t1", "prompt": [{"role": "user", "content": "q\x00?"}],
                                       "completions": ["a\x00", "b"], "meta": {}}], "q", 1, "collect")
        with harness.db.sessions() as session:
            task = session.get(Task, "t1")
            assert task.completions == ["a\ufffd", "b"] and task.prompt[0]["content"] == "q\ufffd?"
        assert client.get("/api/tasks/next").json()["task"]["id"] == "t1"
        skip = client.post("/api/tasks/t1/skip", json={"reason": "bad\x00", "key": "skip-key-1"})
        assert skip.status_code == 422
        assert skip.json()["error"] == "reason: contains a NUL character (\\u0000); remove it"

        demo = client.post("/api/demos", json={"key": "demo-key-1"}).json()["id"]
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x\x00", "suggestion": None}]
        saved = client.put(f"/api/demos/{demo}", json={"messages": turns})
        assert saved.status_code == 422
        assert "turn 1 (assistant): the text contains a NUL character" in saved.json()["error"]
        turns[1] = {"role": "assistant", "content": "fine", "suggestion": "y\x00"}
        saved = client.put(f"/api/demos/{demo}", json={"messages": turns})
        assert saved.status_code == 422 and "the suggestion contains a NUL character" in saved.json()["error"]
        with harness.db.sessions() as session:
            assert session.scalars(select(Message)).all() == []  # nothing stored half
    finally:
        harness.close()
