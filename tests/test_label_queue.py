"""The human labeler's file queue: rank_batch waits for answers, keeps them, and the terminal tool answers."""
from __future__ import annotations

import io
import json
import threading
import time

import pytest

from rlhf_pl import registry
from rlhf_pl.data.formats import Message, Prompt
from rlhf_pl.plugins import label_queue
from rlhf_pl.plugins.human_labeler import HumanLabeler, LabelsPendingError, done_path, pending_path
from rlhf_pl.plugins.labeler_specs import HumanLabelerConfig
from rlhf_pl.plugins.labelers import LabelerError, make_task, rank_all


def _task(i: int, k: int = 3):
    p = Prompt((Message("system", "Be brief."), Message("user", f"What is {i} + 1?")), f"p.jsonl:{i}",
               {"task": "add", "answer": str(i + 1)})
    return make_task(p, [f"{i + 1}.", f"It is {i}.", f"[{i}] maybe"][:k])


def human(queue, **overrides) -> HumanLabeler:
    return HumanLabeler(HumanLabelerConfig(queue_dir=str(queue), **{"poll_s": 0.01, "timeout_s": 2.0, **overrides}))


def _wait_for(predicate, seconds: float = 2.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_rank_batch_waits_for_answers_and_returns_them_in_task_order(tmp_path):
    queue = tmp_path / "q"
    tasks = [_task(i) for i in range(3)]
    answers = {tasks[0].id: "2 0 1", tasks[1].id: "[0 1] 2", tasks[2].id: "1,[2,0]"}

    def person():  # answers in reverse order, as the files appear
        for task in reversed(tasks):
            _wait_for(pending_path(queue, task.id).exists)
            label_queue.write_answer(queue, task.id, answers[task.id], "ann")

    thread = threading.Thread(target=person)
    thread.start()
    rankings = rank_all(human(queue), tasks)
    thread.join()
    assert rankings == [((2,), (0,), (1,)), ((0, 1), (2,)), ((1,), (2, 0))]
    record = json.loads(pending_path(queue, tasks[0].id).read_text())
    assert record["id"] == tasks[0].id and record["completions"] == list(tasks[0].completions)
    assert record["prompt"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "What is 0 + 1?"}]
    assert record["meta"] == {"task": "add", "answer": "1"}
    answer = json.loads(done_path(queue, tasks[1].id).read_text())
    assert (answer["id"], answer["ranking"], answer["labeler"]) == (tasks[1].id, [[0, 1], 2], "ann")
    assert all(pending_path(queue, t.id).exists() for t in tasks)  # nothing moved or deleted


def test_timeout_keeps_the_answers_given_and_a_rerun_returns_at_once(tmp_path):
    queue = tmp_path / "q"
    tasks = [_task(i) for i in range(3)]
    with pytest.raises(LabelsPendingError) as info:
        human(queue, timeout_s=0).rank_batch(tasks)
    message = str(info.value)
    assert "3 of 3 tasks are still unanswered" in message and str(queue / "pending") in message
    assert "re-running the same command picks them up" in message
    label_queue.write_answer(queue, tasks[0].id, "0 1 2", "ann")
    label_queue.write_answer(queue, tasks[2].id, "2 1 0", "ann")
    with pytest.raises(LabelsPendingError) as info:
        human(queue, timeout_s=0.05).rank_batch(tasks)
    err = info.value
    assert "1 of 3 tasks are still unanswered after waiting 0.05s" in str(err)
    assert err.pending == [tasks[1].id] and set(err.answered) == {tasks[0].id, tasks[2].id}
    assert done_path(queue, tasks[0].id).exists() and done_path(queue, tasks[2].id).exists()
    label_queue.write_answer(queue, tasks[1].id, "[1 2] 0", "bob")
    start = time.monotonic()
    assert human(queue, timeout_s=30).rank_batch(tasks) == [((0,), (1,), (2,)), ((1, 2), (0,)), ((2,), (1,), (0,))]
    assert time.monotonic() - start < 1.0  # everything answered: no wait


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", r"invalid JSON"),
        ('{"id": "ID", "ranking": [0, 1]}', r"field 'ranking'.*every index 0\.\.2, missing 2"),
        ('{"id": "ID", "ranking": [0, 0, [1, 2]]}', r"each index once"),
        ('{"id": "ID", "ranking": "0 1 2"}', r"field 'ranking'.*got '0 1 2'"),
        ('{"id": "ID"}', r"field 'ranking' is missing"),
        ('{"id": "other", "ranking": [0, 1, 2]}', r"field 'id' is 'other'"),
        ('[0, 1, 2]', r"expected a JSON object"),
    ],
)
def test_a_bad_answer_file_is_reported_with_its_path(tmp_path, content, problem):
    task = _task(0)
    path = done_path(tmp_path, task.id)
    path.parent.mkdir(parents=True)
    path.write_text(content.replace("ID", task.id))
    with pytest.raises(LabelerError, match=problem) as info:
        human(tmp_path).rank_batch([task])
    assert f"answer file {path}:" in str(info.value)
    assert path.read_text() == content.replace("ID", task.id)  # left for the user to fix


def test_rank_one_prompt_and_duplicates_in_a_batch(tmp_path):
    task = _task(4, k=2)
    labeler = human(tmp_path / "q", timeout_s=0)
    with pytest.raises(LabelsPendingError, match="1 of 1 tasks"):
        labeler.rank_batch([task, task])
    label_queue.write_answer(tmp_path / "q", task.id, "1 0", "ann")
    assert labeler.rank_batch([task, task]) == [((1,), (0,))] * 2
    assert labeler.rank(task.prompt, list(task.completions)) == ((1,), (0,))


# --- the terminal tool -----------------------------------------------------------------------


def _queued(queue, n: int = 3):
    tasks = [_task(i) for i in range(n)]
    with pytest.raises(LabelsPendingError):
        human(queue, timeout_s=0).rank_batch(tasks)
    return tasks


def test_interactive_tool_reasks_skips_and_saves(tmp_path):
    queue = tmp_path / "q"
    tasks = _queued(queue)
    stdin = io.StringIO("0 1\n0 0 1 2\n2 [0 1]\ns\n\n1,0,2\n")
    out = io.StringIO()
    assert label_queue.main([str(queue), "--who", "ann"], stdin=stdin, stdout=out) == 0
    text = out.getvalue()
    assert "What is 0 + 1?" in text and "[0] maybe" in text  # the prompt and the completions (no markup eaten)
    assert text.count("not saved:") == 2 and "missing 2" in text and "each index once" in text
    assert "answered 2, skipped 1; 1 still pending" in text
    assert human(queue, timeout_s=0).answer(tasks[0]) == ((2,), (0, 1))
    assert human(queue, timeout_s=0).answer(tasks[1]) is None
    assert json.loads(done_path(queue, tasks[2].id).read_text())["labeler"] == "ann"
    # again: only the skipped task is shown; q quits
    out = io.StringIO()
    assert label_queue.main([str(queue)], stdin=io.StringIO("q\n"), stdout=out) == 0
    assert "task 1/1" in out.getvalue() and "answered 0, skipped 0; 1 still pending" in out.getvalue()


def test_list_and_answer_options(tmp_path, capsys):
    queue = tmp_path / "q"
    tasks = _queued(queue, 2)
    out = io.StringIO()
    assert label_queue.main([str(queue), "--list"], stdout=out) == 0
    lines = out.getvalue().splitlines()
    assert sorted(lines) == sorted(f"{t.id}  K=3  What is {i} + 1?" for i, t in enumerate(tasks))
    out = io.StringIO()
    assert label_queue.main([str(queue), "--answer", tasks[0].id[:6], "2 1 0", "--who", "bob"], stdout=out) == 0
    assert str(done_path(queue, tasks[0].id)) in out.getvalue()
    assert json.loads(done_path(queue, tasks[0].id).read_text())["ranking"] == [2, 1, 0]
    out = io.StringIO()
    label_queue.main([str(queue), "--list"], stdout=out)
    assert out.getvalue().split()[0] == tasks[1].id
    capsys.readouterr()
    assert label_queue.main([str(queue), "--answer", tasks[0].id, "0 1 2"]) == 2  # never overwritten
    assert "already answered" in capsys.readouterr().err
    assert label_queue.main([str(queue), "--answer", tasks[1].id, "0 1 5"]) == 2
    assert "indices in 0..2, got 5" in capsys.readouterr().err


def test_tool_errors_exit_2(tmp_path, capsys):
    assert label_queue.main([str(tmp_path / "nope"), "--list"]) == 2
    assert f"no label queue at {tmp_path / 'nope'}" in capsys.readouterr().err
    assert label_queue.main([str(tmp_path), "--list"]) == 2
    assert "has no pending/ directory" in capsys.readouterr().err
    queue = tmp_path / "q"
    _queued(queue, 1)
    for bad_id in ("0123456789abcdef", "../x", ""):
        assert label_queue.main([str(queue), "--answer", bad_id, "0 1 2"]) == 2
        assert "unknown task id" in capsys.readouterr().err


def test_built_by_name_from_the_registry(tmp_path):
    labeler = registry.build_by_name("labelers", "human", queue_dir=str(tmp_path / "q"), timeout_s=0)
    assert isinstance(labeler, HumanLabeler) and labeler.queue_dir == tmp_path / "q"
    (plugin,) = [p for p in registry.installed("labelers") if p.name == "human"]
    assert plugin.distribution == "rlhf_pl" and plugin.spec().config is HumanLabelerConfig
