"""The app killed with ``kill -9`` while labelers submit loses no acknowledged ranking, and restarts
on the same database; the load-test tool's own checks hold on a small load."""
from __future__ import annotations

import os
import signal
import threading

import httpx
from sqlalchemy import select
from tool_loader import load_tool

from rlhf_pl.app.db import Database, RankingRecord, User

load = load_tool("app_load_test")


def _client(base: str, name: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=30, follow_redirects=True)
    page = client.get("/login").text
    token = page.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    client.post("/login", data={"username": name, "password": load.PASSWORD, "csrf_token": token})
    client.headers["X-CSRF-Token"] = client.get("/api/me").json()["csrf"]
    return client


def _rank_until_refused(client: httpx.Client, name: str, acked: list, stop: threading.Event) -> None:
    """Rank tasks until the server goes away; a ranking counts as acknowledged only on a 200."""
    n = 0
    while not stop.is_set():
        try:
            task = client.get("/api/tasks/next").json()["task"]
            if task is None:
                return
            body = {"ranking": [[1], [0, 2], [3]], "all_bad": False, "key": f"{name}-{n}"}
            if client.post(f"/api/tasks/{task['id']}/ranking", json=body).status_code == 200:
                acked.append((task["id"], name))
        except (httpx.HTTPError, KeyError, ValueError):
            return  # the server is gone (or answered half)
        n += 1


def _stored(url: str) -> list[tuple[str, str]]:
    db = Database(url)
    with db.sessions() as session:
        rows = session.execute(select(RankingRecord.task_id, User.username)
                               .join(User, User.id == RankingRecord.user_id)).all()
    db.dispose()
    return [tuple(r) for r in rows]


def test_kill_9_while_labelers_submit_loses_no_acknowledged_ranking(tmp_path, database_url):
    labelers = 4
    load.prepare(database_url, labelers, 400)
    server, base = load.start_server(tmp_path, database_url)
    acked: list = []
    stop = threading.Event()
    try:
        clients = [_client(base, f"labeler{i}") for i in range(labelers)]
        threads = [threading.Thread(target=_rank_until_refused, args=(c, f"labeler{i}", acked, stop))
                   for i, c in enumerate(clients)]
        for thread in threads:
            thread.start()
        deadline = 120
        while len(acked) < 40 and deadline > 0 and server.poll() is None:
            threading.Event().wait(0.1)
            deadline -= 0.1
        os.kill(server.pid, signal.SIGKILL)  # mid-submission: the threads are still posting
        server.wait(30)
        stop.set()
        for thread in threads:
            thread.join(30)
    finally:
        if server.poll() is None:
            server.kill()
    assert len(acked) >= 40
    stored = _stored(database_url)
    assert set(acked) <= set(stored)  # every acknowledged ranking survived
    assert len(stored) == len(set(stored)) and len(stored) - len(acked) <= labelers  # at most the in-flight ones

    server, base = load.start_server(tmp_path, database_url)  # the same database, after the crash
    try:
        client = _client(base, "labeler0")
        mine = client.get("/api/rankings/mine", params={"limit": 1000}).json()
        assert {row["task"] for row in mine["rankings"]} == {t for t, who in stored if who == "labeler0"}
        task = client.get("/api/tasks/next").json()["task"]
        response = client.post(f"/api/tasks/{task['id']}/ranking",
                               json={"ranking": [[0], [1], [2], [3]], "all_bad": False, "key": "after-restart"})
        assert response.status_code == 200
    finally:
        server.terminate()
        server.wait(30)
    assert len(_stored(database_url)) == len(stored) + 1


def test_the_load_tool_stores_every_ranking_once_and_shows_each_labeler_only_their_own(tmp_path, capsys):
    assert load.main(["--labelers", "6", "--per-labeler", "4", "--chats", "2", "--json", str(tmp_path / "f.json")]) == 0
    figures = __import__("json").loads((tmp_path / "f.json").read_text())
    assert figures["submitted"] == 24 and figures["problems"] == [] and figures["chats"] == 2
    assert 0 < figures["submit_p50_ms"] <= figures["submit_p95_ms"]
    assert load.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and load.percentile([5.0], 0.95) == 5.0
