"""Exports: exact records from hand-made rows, they load with rlhf_pl.data.formats, and they train
``+stage=rm`` / ``+stage=sft experiment=quick`` without editing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from app_helpers import make_harness
from sqlalchemy import select

from rlhf_pl.app import export
from rlhf_pl.app.db import Conversation, Message, RankingRecord, Rating, Task, User
from rlhf_pl.data.formats import load_conversations, load_prompts_or_conversations, load_rankings

WHEN = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)


def add_account(session, name: str, role: str = "labeler") -> int:
    """An account that never logs in (argon2 is slow on purpose; these need no password)."""
    user = User(username=name, password_hash="not a hash", role=role, active=True)
    session.add(user)
    session.flush()
    return user.id


def conversation(session, user_id: int, kind: str, turns: list[tuple], title: str = "") -> int:
    """A conversation from (position, alternative, selected, role, content[, source, suggestion, distance])."""
    made = Conversation(user_id=user_id, kind=kind, title=title, policy="tiny-policy" if kind == "chat" else None,
                        created_at=WHEN, updated_at=WHEN)
    session.add(made)
    session.flush()
    for position, alternative, selected, role, content, *rest in turns:
        source, suggestion, distance = rest or ("model" if role == "assistant" else "human", None, None)
        session.add(Message(conversation_id=made.id, position=position, alternative=alternative, selected=selected,
                            role=role, content=content, source=source, suggestion=suggestion, edit_distance=distance))
    session.flush()
    return made.id


def message_id(session, conversation_id: int, position: int, alternative: int) -> int:
    return session.scalar(select(Message.id).where(Message.conversation_id == conversation_id,
                                                   Message.position == position, Message.alternative == alternative))


def rate(session, conversation_id: int, position: int, alternative: int, user_id: int, value: int, reason: str = ""):
    session.add(Rating(message_id=message_id(session, conversation_id, position, alternative), user_id=user_id,
                       value=value, reason=reason))


def build(db) -> dict[str, int]:
    """Chats, demonstrations and ranked tasks, with every case an export leaves out."""
    with db.transaction() as session:
        ids = {name: add_account(session, name) for name in ("ann", "bob", "cat")}
        ann, bob, cat = ids["ann"], ids["bob"], ids["cat"]
        ids["c1"] = conversation(session, ann, "chat", [
            (0, 0, True, "user", "What colour is the sky?"),
            (1, 0, False, "assistant", "Blue."), (1, 1, False, "assistant", "Green."),
            (1, 2, True, "assistant", "It is blue."),
            (2, 0, True, "user", "And grass?"), (3, 0, True, "assistant", "Green.")], title="sky")
        rate(session, ids["c1"], 1, 0, ann, 1, "right")
        rate(session, ids["c1"], 1, 1, ann, -1, "wrong")
        rate(session, ids["c1"], 1, 2, ann, 1)
        rate(session, ids["c1"], 3, 0, ann, -1)  # one alternative: nothing to compare
        rate(session, ids["c1"], 1, 1, bob, 1)  # another rater's opinion is its own pair
        rate(session, ids["c1"], 1, 0, bob, -1)
        ids["c2"] = conversation(session, ann, "chat", [(0, 0, True, "user", "Hi")])  # no answer yet
        ids["c3"] = conversation(session, bob, "chat", [
            (0, 0, True, "system", "Be brief."), (1, 0, True, "user", "Name a fruit."),
            (2, 0, True, "assistant", "Apple."), (2, 1, False, "assistant", "Apple. "),
            (3, 0, True, "user", "Another?")])  # not answered (yet): not exported
        rate(session, ids["c3"], 2, 0, bob, 1)
        rate(session, ids["c3"], 2, 1, bob, -1)  # the same text: compares nothing
        ids["d1"] = conversation(session, ann, "demonstration", [
            (0, 0, True, "user", "Add 2 and 3."), (1, 0, True, "assistant", "5.", "suggestion", "4.", 1),
            (2, 0, True, "user", "Thanks!"), (3, 0, True, "assistant", "You are welcome.", "human", None, None)],
            title="sums")
        ids["d2"] = conversation(session, bob, "demonstration", [(0, 0, True, "user", "A draft")], title="draft")
        session.add_all([
            Task(id="r1", source="collect", queue="collect-1", prompt=[{"role": "user", "content": "Pick one."}],
                 completions=["a", "b", "c", "d"], meta={"policy": "sft", "turn": 1}, overlap=3),
            Task(id="r2", source="chat", queue="chat", prompt=[{"role": "user", "content": "Say hi."}],
                 completions=["hi", "hello", "hey"], meta={"conversation": 1}, overlap=2),
            Task(id="r3", source="collect", queue="collect-1", prompt=[{"role": "user", "content": "Yes or no?"}],
                 completions=["yes", "no"], meta={}, overlap=2),
            Task(id="r4", source="collect", queue="collect-1", prompt=[{"role": "user", "content": "Unranked."}],
                 completions=["x", "y"], meta={}, overlap=1)])
        session.flush()
        session.add_all([
            RankingRecord(task_id="r1", user_id=ann, ranking=[[2], [0, 3], [1]]),
            RankingRecord(task_id="r1", user_id=bob, ranking=[[2], [0], [3], [1]], reason="close call"),
            RankingRecord(task_id="r1", user_id=cat, ranking=None, skipped=True, reason="unclear"),
            RankingRecord(task_id="r2", user_id=ann, ranking=[[0, 1, 2]], all_bad=True),  # ties everything
            RankingRecord(task_id="r2", user_id=bob, ranking=[[1], [0], [2]], all_bad=True),
            RankingRecord(task_id="r3", user_id=ann, ranking=[[0], [1]]),
            RankingRecord(task_id="r3", user_id=bob, ranking=[[1], [0]])])  # merged: a tie of everything
    return ids


@pytest.fixture
def db(database_url):
    harness = make_harness(database_url)
    yield harness.db
    harness.close()


def exported(db, what: str, mode: str = "per_labeler") -> export.Export:
    with db.sessions() as session:
        return export.export(session, what, mode)


def write(tmp_path: Path, name: str, result: export.Export) -> str:
    path = tmp_path / name
    path.write_text(export.to_jsonl(result.records), encoding="utf-8")
    return str(path)


R1 = {"prompt": [{"role": "user", "content": "Pick one."}], "completions": ["a", "b", "c", "d"]}
R2 = {"prompt": [{"role": "user", "content": "Say hi."}], "completions": ["hi", "hello", "hey"]}
R3 = {"prompt": [{"role": "user", "content": "Yes or no?"}], "completions": ["yes", "no"]}
P1 = {"task": "r1", "queue": "collect-1", "source": "collect", "meta": {"policy": "sft", "turn": 1}}
P2 = {"task": "r2", "queue": "chat", "source": "chat", "meta": {"conversation": 1}}
P3 = {"task": "r3", "queue": "collect-1", "source": "collect", "meta": {}}


def test_rankings_per_labeler_exactly(db, tmp_path):
    build(db)
    result = exported(db, "rankings", "per_labeler")
    assert result.records == [
        {**R1, "ranking": [2, [0, 3], 1], "all_bad": False, "provenance": {**P1, "labeler": "ann"}},
        {**R1, "ranking": [2, 0, 3, 1], "all_bad": False, "provenance": {**P1, "labeler": "bob", "note": "close call"}},
        {**R2, "ranking": [1, 0, 2], "all_bad": True, "provenance": {**P2, "labeler": "bob"}},
        {**R3, "ranking": [0, 1], "all_bad": False, "provenance": {**P3, "labeler": "ann"}},
        {**R3, "ranking": [1, 0], "all_bad": False, "provenance": {**P3, "labeler": "bob"}},
    ]
    assert result.left_out == {"skipped": 1, "all_tie": 1}
    loaded = load_rankings(write(tmp_path, "per_labeler.jsonl", result))
    assert [r.ranking for r in loaded] == [((2,), (0, 3), (1,)), ((2,), (0,), (3,), (1,)), ((1,), (0,), (2,)),
                                           ((0,), (1,)), ((1,), (0,))]
    assert loaded[0].meta == {"all_bad": False, "provenance": {**P1, "labeler": "ann"}}


def test_rankings_merged_by_mean_rank_position(db, tmp_path):
    build(db)
    result = exported(db, "rankings", "merged")
    # r1: ann's positions (a..d) 1.5, 3, 0, 1.5 and bob's 1, 3, 0, 2 -> means 1.25, 3, 0, 1.75
    # r2: ann ties all (1, 1, 1), bob 1, 0, 2 -> 1, 0.5, 1.5; both flagged all bad
    # r3: ann 0, 1 and bob 1, 0 -> 0.5, 0.5: a tie of everything, left out
    rule = export.MERGE_RULE
    assert result.records == [
        {**R1, "ranking": [2, 0, 3, 1], "all_bad": False, "all_bad_votes": 0,
         "provenance": {**P1, "labelers": ["ann", "bob"], "merge": rule}},
        {**R2, "ranking": [1, 0, 2], "all_bad": True, "all_bad_votes": 2,
         "provenance": {**P2, "labelers": ["ann", "bob"], "merge": rule}},
    ]
    assert result.left_out == {"skipped": 1, "all_tie": 1}
    assert [r.ranking for r in load_rankings(write(tmp_path, "merged.jsonl", result))] == [
        ((2,), (0,), (3,), (1,)), ((1,), (0,), (2,))]


def test_demonstrations_to_sft_conversations(db, tmp_path):
    ids = build(db)
    result = exported(db, "demonstrations")
    assert len(result.records) == 1 and result.left_out == {"no_assistant_turn": 1}
    record = dict(result.records[0])
    for key in ("created_at", "updated_at"):
        assert datetime.fromisoformat(record.pop(key)).replace(tzinfo=None) == WHEN.replace(tzinfo=None)
    assert record == {
        "messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5."},
                     {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}],
        "demonstration_id": ids["d1"], "title": "sums", "author": "ann", "turns_from_suggestion": [1],
        "edit_distance": {"1": 1}, "suggestions": {"1": "4."}}
    loaded = load_conversations(write(tmp_path, "demos.jsonl", result))
    assert [m.content for m in loaded[0].messages] == ["Add 2 and 3.", "5.", "Thanks!", "You are welcome."]
    assert loaded[0].meta["turns_from_suggestion"] == [1]


def test_chats_to_conversations_for_collect(db, tmp_path):
    ids = build(db)
    result = exported(db, "chats")
    records = [dict(r) for r in result.records]
    for record in records:
        assert datetime.fromisoformat(record.pop("created_at")).replace(tzinfo=None) == WHEN.replace(tzinfo=None)
    model = {"source": "model", "reason": ""}
    assert records == [
        {"messages": [{"role": "user", "content": "What colour is the sky?"},
                      {"role": "assistant", "content": "It is blue."},
                      {"role": "user", "content": "And grass?"}, {"role": "assistant", "content": "Green."}],
         "source": "chat", "conversation_id": ids["c1"], "title": "sky", "policy": "tiny-policy", "user": "ann",
         "turns": [{"position": 1, "alternative": 2, "alternatives": 3, "rating": 1, **model},  # ann's, not bob's
                   {"position": 3, "alternative": 0, "alternatives": 1, "rating": -1, **model}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
                      {"role": "assistant", "content": "Apple."}],  # the unanswered last user turn is cut
         "source": "chat", "conversation_id": ids["c3"], "title": "", "policy": "tiny-policy", "user": "bob",
         "turns": [{"position": 2, "alternative": 0, "alternatives": 2, "rating": 1, **model}]},
    ]
    assert result.left_out == {"no_assistant_turn": 1}
    loaded = load_prompts_or_conversations(write(tmp_path, "chats.jsonl", result))
    assert [[m.content for m in r.messages] for r in loaded] == [[m["content"] for m in r["messages"]] for r in records]
    assert loaded[1].meta["user"] == "bob" and loaded[1].meta["turns"] == records[1]["turns"]
    assert len(load_conversations(str(tmp_path / "chats.jsonl"))) == 2  # and SFT reads them too


def test_rated_regenerations_to_pairwise_comparisons(db, tmp_path):
    ids = build(db)
    result = exported(db, "pairwise")
    prompt = [{"role": "user", "content": "What colour is the sky?"}]
    base = {"conversation": ids["c1"], "position": 1, "policy": "tiny-policy"}
    assert result.records == [
        {"prompt": prompt, "chosen": "Blue.", "rejected": "Green.",
         "provenance": {**base, "labeler": "ann", "chosen_alternative": 0, "rejected_alternative": 1,
                        "chosen_reason": "right", "rejected_reason": "wrong"}},
        {"prompt": prompt, "chosen": "It is blue.", "rejected": "Green.",
         "provenance": {**base, "labeler": "ann", "chosen_alternative": 2, "rejected_alternative": 1,
                        "rejected_reason": "wrong"}},
        {"prompt": prompt, "chosen": "Green.", "rejected": "Blue.",
         "provenance": {**base, "labeler": "bob", "chosen_alternative": 1, "rejected_alternative": 0}},
    ]
    assert result.left_out == {"same_or_empty_texts": 1}
    loaded = load_rankings(write(tmp_path, "pairwise.jsonl", result))
    assert [(r.completions, r.ranking) for r in loaded] == [
        (("Blue.", "Green."), ((0,), (1,))), (("It is blue.", "Green."), ((0,), (1,))),
        (("Green.", "Blue."), ((0,), (1,)))]


def test_a_record_the_loaders_would_refuse_is_left_out_and_counted(db, caplog):
    with db.transaction() as session:
        ann = add_account(session, "ann")
        session.add(Task(id="dup", source="collect", queue="q", prompt=[{"role": "user", "content": "Twice?"}],
                         completions=["same", "same", "other"], meta={}, overlap=1))
        session.add(Task(id="bad", source="collect", queue="q", prompt=[{"role": "user", "content": "K?"}],
                         completions=["a", "b"], meta={}, overlap=1))
        session.flush()
        session.add(RankingRecord(task_id="dup", user_id=ann, ranking=[[0], [1], [2]]))
        session.add(RankingRecord(task_id="bad", user_id=ann, ranking=[[0], [1], [2]]))  # index 2 of K = 2
        session.add(RankingRecord(task_id="bad", user_id=add_account(session, "bob"), ranking=None))
    result = exported(db, "rankings")
    assert result.records == [] and result.left_out == {"invalid": 2, "no_ranking": 1}
    assert "export: task dup by ann left out: field 'completions[1]'" in caplog.text
    with pytest.raises(ValueError, match="mode 'both': choose one of per_labeler, merged"):
        exported(db, "rankings", "both")
    with pytest.raises(ValueError, match="export 'votes': choose one of demonstrations, rankings, chats, pairwise"):
        exported(db, "votes")


def test_jsonl_keeps_each_record_on_one_line_whatever_the_text(tmp_path):
    texts = ["line\u2028break", "next\x85line", "para\u2029graph", "tab\tand\nnewline", "ünïcödé ✓"]
    record = {"prompt": "Which?", "completions": texts, "ranking": [0, [1, 2, 3], 4]}
    text = export.to_jsonl([record, record])
    assert text.count("\n") == 2 and "ünïcödé ✓" in text  # UTF-8, not escaped
    path = tmp_path / "odd.jsonl"
    path.write_text(text, encoding="utf-8")
    assert [r.completions for r in load_rankings(str(path))] == [tuple(texts)] * 2


# --- the exports train the stages -----------------------------------------------------------------

COLOURS = ["red", "blue", "green", "yellow", "white", "black"]


def build_training_data(db) -> None:
    """12 ranking tasks (K = 3 or 4) ranked by two labelers, and 12 demonstrations, in a tiny vocabulary."""
    with db.transaction() as session:
        labelers = [add_account(session, name) for name in ("ann", "bob")]
        for i in range(12):
            right, k = COLOURS[i % 6], 3 + i % 2
            wrong = [c for c in COLOURS if c != right][i % 3: i % 3 + k - 1]
            completions = [f"It is {c}." for c in [*wrong[:1], right, *wrong[1:]]]  # the right one is index 1
            session.add(Task(id=f"t{i:02d}", source="collect", queue="colours", overlap=2, meta={},
                             prompt=[{"role": "user", "content": f"Name the colour {right}, please."}],
                             completions=completions))
            session.flush()
            rest = [j for j in range(k) if j != 1]
            session.add(RankingRecord(task_id=f"t{i:02d}", user_id=labelers[0], ranking=[[1], rest]))
            session.add(RankingRecord(task_id=f"t{i:02d}", user_id=labelers[1], ranking=[[1], *[[j] for j in rest]]))
            conversation(session, labelers[i % 2], "demonstration", [
                (0, 0, True, "user", f"Name the colour {right}, please."),
                (1, 0, True, "assistant", f"It is {right}.", "suggestion", f"It is {wrong[0]}.", 3)])


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_pl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HYDRA_FULL_ERROR": "1"})


def test_admin_exports_train_the_reward_model_and_sft_quick(tmp_path):
    harness = make_harness(f"sqlite:///{tmp_path / 'app.db'}")
    try:
        build_training_data(harness.db)
        harness.add_user("root", "admin")
        admin = harness.client("root")
        rankings = admin.get("/api/admin/export/rankings.jsonl?mode=per_labeler")
        demos = admin.get("/api/admin/export/demonstrations.jsonl")
    finally:
        harness.close()
    assert rankings.headers["x-export-records"] == "24" and demos.headers["x-export-records"] == "12"
    (tmp_path / "rankings.jsonl").write_bytes(rankings.content)
    (tmp_path / "demos.jsonl").write_bytes(demos.content)
    fast = ["experiment=quick", "trainer.enable_progress_bar=false", "trainer.max_epochs=1"]
    rm = cli("+stage=rm", *fast, f"data.comparisons={tmp_path / 'rankings.jsonl'}", "rm.normalise_size=8",
             f"paths.output_root={tmp_path / 'out'}", cwd=tmp_path)
    assert rm.returncode == 0, rm.stderr[-3000:]
    (reward_model,) = (tmp_path / "out").glob("runs/*/reward_model")
    assert (reward_model / "config.json").is_file() or any(reward_model.iterdir())
    summary = json.loads((reward_model.parent / "summary.json").read_text())
    assert summary["stage"] == "rm" and summary["train_prompts"] + summary["val_prompts"] == 24
    sft = cli("+stage=sft", *fast, f"data.demonstrations={tmp_path / 'demos.jsonl'}", "sft.num_samples=1",
              f"paths.output_root={tmp_path / 'out'}", cwd=tmp_path)
    assert sft.returncode == 0, sft.stderr[-3000:]
    (model,) = (tmp_path / "out").glob("runs/*/model")
    assert (model / "config.json").is_file()
