"""labeler=human with labeler.database_url: the tasks go to the feedback app, people rank them there
(through its API, as the Rank page does), rank_batch returns their merged rankings; time-outs and
re-runs; and +stage=collect end to end in a subprocess, answered through the app."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from app_helpers import make_harness, wait_until
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError, ProgrammingError

from rlhf_pl.app.db import Task
from rlhf_pl.data.formats import Message, Prompt, load_rankings
from rlhf_pl.plugins.human_labeler import HumanLabeler, LabelsPendingError
from rlhf_pl.plugins.labeler_specs import HumanLabelerConfig
from rlhf_pl.plugins.labelers import LabelerError, make_task, rank_all


def _task(i: int):
    prompt = Prompt((Message("system", "Be brief."), Message("user", f"What is {i} + 1?")), f"p.jsonl:{i}",
                    {"task": "add", "answer": str(i + 1)})
    return make_task(prompt, [f"{i + 1}.", f"It is {i}.", f"[{i}] maybe"])


TASKS = [_task(i) for i in range(3)]
# what each person answers per task (None: "all bad" without a ranking = everything tied)
ANSWERS = {
    "ann": [[[0], [1], [2]], [[2], [0, 1]], None],
    "bob": [[[1], [0], [2]], [[2], [0], [1]], [[1], [2], [0]]],
}
# merged by mean rank position: task 0 (0, 1, 2) and (1, 0, 2) -> 0 and 1 tie at 0.5, 2 last; task 1: 2 at 0,
# 0 at (1.5 + 1) / 2, 1 at (1.5 + 2) / 2; task 2: all at 1 and (2, 0, 1) -> 1 at 0.5, 2 at 1, 0 at 1.5
MERGED = [((0, 1), (2,)), ((2,), (0,), (1,)), ((1,), (2,), (0,))]


def labeler(url: str, **overrides) -> HumanLabeler:
    settings = {"database_url": url, "overlap": 2, "poll_s": 0.05, "timeout_s": 60.0, "queue": "round 1",
                **overrides}
    return HumanLabeler(HumanLabelerConfig(**settings))


def answer_all(client, name: str, only: set[str] | None = None) -> list[str]:
    """Rank every task the app gives ``name`` (the tasks in ``only``, if given), as the Rank page does."""
    done = []
    index = {task.id: i for i, task in enumerate(TASKS)}
    while True:
        task = client.get("/api/tasks/next").json()["task"]
        if task is None or (only is not None and task["id"] not in only):
            return done
        ranking = ANSWERS[name][index[task["id"]]]
        response = client.post(f"/api/tasks/{task['id']}/ranking",
                               json={"ranking": ranking, "all_bad": ranking is None, "key": f"key-{name}-{task['id']}"})
        assert response.status_code == 200, response.text
        done.append(task["id"])


def task_count(url: str) -> int:
    """Tasks in the app's database (0 while it is not made yet)."""
    from rlhf_pl.app.db import Database

    db = Database(url)
    try:
        with db.sessions() as session:
            return session.scalar(select(func.count()).select_from(Task))
    except (OperationalError, ProgrammingError):  # no tasks table yet
        return 0
    finally:
        db.dispose()


def test_two_labelers_rank_in_the_app_while_rank_batch_waits(database_url):
    h = make_harness(database_url)
    try:
        for name in ANSWERS:
            h.add_user(name)
        clients = {name: h.client(name) for name in ANSWERS}
        problems: list[BaseException] = []

        def people() -> None:
            try:
                wait_until(lambda: task_count(database_url) == 3, 30, "the labeler's tasks")
                for name, client in clients.items():
                    assert answer_all(client, name) == [t.id for t in TASKS]
            except BaseException as err:  # noqa: BLE001 - reported by the test below
                problems.append(err)

        thread = threading.Thread(target=people)
        thread.start()
        rankings = rank_all(labeler(database_url), TASKS + [TASKS[0]])  # a repeated task is ranked once
        thread.join(30)
        assert not problems, problems
        assert rankings == MERGED + [MERGED[0]]
        with h.db.sessions() as session:
            stored = session.get(Task, TASKS[0].id)
            assert (stored.source, stored.queue, stored.overlap) == ("collect", "round 1", 2)
            assert stored.prompt == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "What is 0 + 1?"}]
            assert stored.completions == list(TASKS[0].completions)
            assert stored.meta == {"task": "add", "answer": "1", "origin": "p.jsonl:0"}
    finally:
        h.close()


def test_a_timeout_names_what_is_pending_and_a_rerun_takes_the_rankings_given(database_url):
    with pytest.raises(LabelsPendingError) as info:
        labeler(database_url, timeout_s=0).rank_batch(TASKS)  # on a fresh database: migrated, tasks added
    err = info.value
    assert err.pending == [t.id for t in TASKS] and err.answered == {} and err.queue == "round 1"
    message = str(err)
    assert "3 of 3 tasks are still not ranked by enough labelers (labeler.timeout_s=0: not waiting)" in message
    assert f"{TASKS[0].id} (0 of 2 rankings)" in message and "queue 'round 1'" in message
    assert "re-running the same command picks them up" in message
    h = make_harness(database_url)
    try:
        for name in ANSWERS:
            h.add_user(name)
        ann, bob = h.client("ann"), h.client("bob")
        assert answer_all(ann, "ann") == [t.id for t in TASKS]
        assert answer_all(bob, "bob", only={TASKS[0].id}) == [TASKS[0].id]
        with pytest.raises(LabelsPendingError) as info:
            labeler(database_url, timeout_s=0.2).rank_batch(TASKS)
        err = info.value
        assert err.pending == [TASKS[1].id, TASKS[2].id] and err.answered == {TASKS[0].id: MERGED[0]}
        assert "2 of 3 tasks are still not ranked by enough labelers after waiting 0.2s" in str(err)
        assert f"{TASKS[1].id} (1 of 2 rankings)" in str(err)
        assert answer_all(bob, "bob") == [TASKS[1].id, TASKS[2].id]
        start = time.monotonic()
        assert labeler(database_url, timeout_s=600).rank_batch(TASKS) == MERGED
        assert time.monotonic() - start < 60  # everything ranked: no waiting for the time-out
        assert task_count(database_url) == 3  # re-adding changed nothing
    finally:
        h.close()


def test_bad_database_urls_are_named():
    with pytest.raises(LabelerError, match=r"labeler.database_url: 'nonsense' is not a database URL"):
        labeler("nonsense")
    with pytest.raises(LabelerError, match=r"backend 'mysql' is not supported"):
        labeler("mysql://u@h/db")
    with pytest.raises(ValueError, match=r"labeler\.overlap must be an integer in \[1, 16\], got 0"):
        HumanLabelerConfig(database_url="sqlite:///x.db", overlap=0)
    assert labeler("sqlite:///relative/app.db").database_url == f"sqlite:///{os.getcwd()}/relative/app.db"


def test_collect_with_people_ranking_in_the_app_end_to_end(tmp_path, ppo_inputs):
    """+stage=collect labeler=human labeler.database_url=... in its own process; two labelers rank its
    tasks through the app's API (both put the last completion first); comparisons.jsonl holds that."""
    url = f"sqlite:///{tmp_path / 'app' / 'app.db'}"
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlhf_pl", "+stage=collect", "experiment=quick", f"paths.output_root={tmp_path}",
           f"hydra.run.dir={run_dir}", f"collect.policy_from={ppo_inputs / 'sft'}", "data.limit=4", "collect.k=2",
           "collect.max_new_tokens=5", "sampler.temperature=1.5", "labeler=human", f"labeler.database_url={url}",
           "labeler.overlap=2", "labeler.poll_s=0.1", "labeler.timeout_s=300", "trainer.enable_progress_bar=false"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "collect.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while task_count(url) == 0:
                assert proc.poll() is None, (tmp_path / "collect.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "collect made no tasks in time"
                time.sleep(0.2)
            h = make_harness(url)
            try:
                given: dict[str, list] = {}
                for name in ("ann", "bob"):
                    h.add_user(name)
                    client = h.client(name)
                    while (task := client.get("/api/tasks/next").json()["task"]) is not None:
                        ranking = [[i] for i in reversed(range(task["k"]))]
                        response = client.post(f"/api/tasks/{task['id']}/ranking",
                                               json={"ranking": ranking, "key": f"key-{name}-{task['id']}"})
                        assert response.status_code == 200, response.text
                        given.setdefault(task["id"], []).append(name)
                with h.db.sessions() as session:  # labeler.queue unset: the queue is named after the run directory
                    assert set(session.scalars(select(Task.queue))) == {"run"}
            finally:
                h.close()
            assert proc.wait(timeout=240) == 0, (tmp_path / "collect.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert given and all(names == ["ann", "bob"] for names in given.values())
    path = run_dir / "comparisons.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len(given) == len(load_rankings(str(path)))
    for r in records:
        assert r["ranking"] == [1, 0] and r["provenance"]["labeler"] == "human"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rankings"] == len(given)


def test_the_file_queue_does_not_import_the_app():
    """The app's modules (SQLAlchemy) are imported only when labeler.database_url is set."""
    code = ("import sys; from rlhf_pl.plugins.human_labeler import HumanLabeler; "
            "from rlhf_pl.plugins.labeler_specs import HumanLabelerConfig; HumanLabeler(HumanLabelerConfig()); "
            "print(sorted(m for m in sys.modules if m.startswith(('rlhf_pl.app', 'sqlalchemy'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
