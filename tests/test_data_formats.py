"""Data formats: every source kind, every validation error (with file:line and field), pairs(),
the train/val split and the embedded default data."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tool_loader import load_tool

from rlhf_pl.data.formats import (
    Conversation,
    DataError,
    Message,
    Prompt,
    Ranking,
    load_conversations,
    load_prompts,
    load_rankings,
    train_val_split,
)
from rlhf_pl.plugins.labeler_specs import RuleLabelerConfig
from rlhf_pl.plugins.labelers import RuleLabeler

REPO = Path(__file__).resolve().parent.parent
CONV = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4."}]}
KWISE = {"prompt": "Say hi.", "completions": ["hi", "hello", "hey", "yo"], "ranking": [2, [0, 3], 1]}
PAIRWISE = {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": "hi", "rejected": "go away"}


def write_jsonl(path: Path, records: list) -> Path:
    """One record per line; strings are written verbatim (to plant bad JSON)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def error_of(loader, source: str) -> DataError:
    with pytest.raises(DataError) as info:
        loader(source)
    return info.value


# --- loading each source kind -------------------------------------------------------------------


def test_jsonl_conversation_with_meta_and_origin(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [CONV, {**CONV, "id": "x7"}])
    convs = load_conversations(str(path))
    assert convs[0] == Conversation(
        (Message("system", "Be brief."), Message("user", "2+2?"), Message("assistant", "4.")), f"{path}:1", {}
    )
    assert convs[1].origin == f"{path}:2" and convs[1].meta == {"id": "x7"}


def test_jsonl_prompts_both_forms_and_meta(tmp_path):
    records = [
        {"prompt": "What is 2 + 2?", "task": "add", "answer": "4"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "Add 1 and 2."}]},
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]},
    ]
    prompts = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", records)))
    assert prompts[0].messages == (Message("user", "What is 2 + 2?"),)
    assert prompts[0].meta == {"task": "add", "answer": "4"}
    assert [m.role for m in prompts[1].messages] == ["user", "assistant", "user"] and prompts[1].meta == {}
    assert prompts[2].messages == (Message("system", "S"), Message("user", "Q"))


def test_jsonl_rankings_kwise_and_pairwise(tmp_path):
    kwise, pairwise = load_rankings(str(write_jsonl(tmp_path / "r.jsonl", [KWISE, {**PAIRWISE, "labeler": "gold"}])))
    assert kwise.prompt == (Message("user", "Say hi."),)
    assert kwise.completions == ("hi", "hello", "hey", "yo") and kwise.k == 4
    assert kwise.ranking == ((2,), (0, 3), (1,))
    assert pairwise.completions == ("hi", "go away") and pairwise.ranking == ((0,), (1,)) and pairwise.k == 2
    assert pairwise.pairs() == [(0, 1)] and pairwise.meta == {"labeler": "gold"}


def test_json_array_records_carry_their_line(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[\n  {"prompt": "one"},\n  {"prompt": "two"},\n\n  {"prompt": "three"}\n]\n', encoding="utf-8")
    prompts = load_prompts(str(path))
    assert [p.messages[0].content for p in prompts] == ["one", "two", "three"]
    assert [p.origin for p in prompts] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert [p.origin for p in load_prompts(str(path), limit=2)] == [f"{path}:2", f"{path}:3"]


def test_json_array_syntax_error_names_line(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[\n  {"prompt": "one"},\n  {"prompt": "two",}\n]\n', encoding="utf-8")
    err = error_of(load_prompts, str(path))
    assert str(err).startswith(f"{path}:3: invalid JSON:")


def test_json_that_is_not_one_array_is_refused(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"prompt": "one"}', encoding="utf-8")
    assert str(error_of(load_prompts, str(path))).startswith(f"{path}:1: expected a JSON array of objects (use .jsonl")
    path.write_text('[{"prompt": "one"}]\n[{"prompt": "two"}]\n', encoding="utf-8")
    assert str(error_of(load_prompts, str(path))).startswith(
        f"{path}:2: invalid JSON: expected nothing after the closing ']', got '[")


def test_parquet_rankings_and_null_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt": "Say hi.", "completions": ["a", "b", "c"], "ranking": [[1], [0, 2]]},
        {"prompt": "Say bye.", "completions": ["x", "y", "z"], "ranking": [[2], [1], [0]]},
    ]), path)
    rankings = load_rankings(str(path))
    assert rankings[0].ranking == ((1,), (0, 2)) and rankings[0].pairs() == [(1, 0), (1, 2)]
    assert rankings[1].origin == f"{path}:row 1" and rankings[1].pairs() == [(2, 1), (2, 0), (1, 0)]
    mixed = tmp_path / "p.parquet"  # rows lacking a column get null there; null counts as missing
    pq.write_table(pa.Table.from_pylist([{"prompt": "Q1", "messages": None},
                                         {"prompt": None, "messages": [{"role": "user", "content": "Q2"}]}]), mixed)
    assert [p.messages[-1].content for p in load_prompts(str(mixed))] == ["Q1", "Q2"]


def test_directory_is_read_with_datasets(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "mydata"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "Q1", "task": "t"}, {"prompt": "Q2", "task": "t"}])
    prompts = load_prompts(str(folder))
    assert [p.messages[0].content for p in prompts] == ["Q1", "Q2"]
    assert prompts[1].origin == f"{folder}[train]:row 1" and prompts[1].meta == {"task": "t"}
    err = error_of(lambda s: load_prompts(s, split="validation"), str(folder))
    assert str(err).startswith(f"{folder}: cannot load with datasets.load_dataset(split='validation')")


def test_embedded_default_data():
    convs = load_conversations("embedded:demonstrations")
    prompts = load_prompts("embedded:prompts")
    assert len(convs) == 400 and len(prompts) == 300
    assert convs[0].origin == "embedded:demonstrations:1"  # the same on every machine
    assert all(set(p.meta) == {"id", "task", "answer", "phrasing"} for p in prompts)
    assert len(load_prompts("embedded:prompts", limit=5)) == 5


def test_unknown_embedded_name_lists_available():
    assert str(error_of(load_prompts, "embedded:nope")) == (
        "embedded:nope: no such embedded data set; available: comparisons, demonstrations, eval_prompts, prompts")


def test_embedded_eval_split_is_held_out_and_half_paraphrased():
    """No question of the eval split is asked in any demonstration, training prompt or shipped ranking;
    half of it uses the training phrasings, half words no training record uses."""
    train = {m.content for c in load_conversations("embedded:demonstrations") for m in c.messages if m.role == "user"}
    train |= {m.content for p in load_prompts("embedded:prompts") for m in p.messages if m.role == "user"}
    train |= {m.content for r in load_rankings("embedded:comparisons") for m in r.prompt if m.role == "user"}
    held = load_prompts("embedded:eval_prompts")
    assert len(held) == 128 and not {p.messages[-1].content for p in held} & train
    assert [p.meta["phrasing"] for p in held[:4]] == ["template", "paraphrase", "template", "paraphrase"]
    assert sum(p.meta["phrasing"] == "paraphrase" for p in held) == 64
    assert all(p.meta["answer"] for p in held)


# --- errors: each names file:line and field -----------------------------------------------------


@pytest.mark.parametrize(
    "loader, bad, expected",
    [
        (load_conversations, {"messages": [{"role": "user", "content": "hi"}]},
         "field 'messages': expected at least one assistant turn, got ['user']"),
        (load_conversations, {"turns": []},
         "field 'messages': expected a non-empty list of {role, content} objects, got <missing>"),
        (load_conversations, {"messages": [{"role": "bot", "content": "hi"}]},
         "field 'messages[0].role': expected one of system, user, assistant, got 'bot'"),
        (load_conversations, {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
         "field 'messages[0].content': expected a non-empty string, got <missing>"),
        (load_conversations,
         {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                       {"role": "assistant", "content": "a"}]},
         "field 'messages[1].role': expected 'system' only as the first message, got 'system'"),
        (load_conversations, ["not", "an", "object"], "expected a JSON object, got ['not', 'an', 'object']"),
        (load_prompts, {"task": "add"}, "field 'prompt': expected a non-empty string, got <missing>"),
        (load_prompts, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
         "field 'messages[1].role': expected the last message to be a user turn, got 'assistant'"),
        (load_rankings, {**KWISE, "ranking": [0, 0, 1, 2]},
         "field 'ranking': expected a permutation of 0..3, got [0, 0, 1, 2]"),
        (load_rankings, {**KWISE, "ranking": [2, [0, 3]]},
         "field 'ranking': expected a permutation of 0..3, got [2, [0, 3]]"),
        (load_rankings, {**KWISE, "ranking": [[0, 1, 2, 3]]},
         "field 'ranking': expected at least two groups (a ranking where all completions tie compares nothing), "
         "got [[0, 1, 2, 3]]"),
        (load_rankings, {**KWISE, "ranking": [0, True, 2, 3]},
         "field 'ranking[1]': expected a completion index or a non-empty list of indices (a tie), got True"),
        (load_rankings, {"prompt": "p", "completions": ["only one"], "ranking": [0]},
         "field 'completions': expected a list of K >= 2 completions, got ['only one']"),
        (load_rankings, {"prompt": "p", "completions": ["a", "b", "a"], "ranking": [0, 1, 2]},
         "field 'completions[2]': expected distinct completions (duplicate of completions[0]), got 'a'"),
        (load_rankings, {"prompt": "p", "completions": ["a", "  ", "c"], "ranking": [0, 1, 2]},
         "field 'completions[1]': expected a non-empty string, got '  '"),
        (load_rankings, {"prompt": "p", "chosen": "", "rejected": "b"},
         "field 'chosen': expected a non-empty string, got ''"),
        (load_rankings, {"prompt": "p", "chosen": "same", "rejected": "same"},
         "field 'rejected': expected a completion different from 'chosen', got 'same'"),
        (load_rankings, {"prompt": "p"},
         "field 'completions': expected 'completions' + 'ranking' (K-wise) or 'chosen' + 'rejected' (pairwise), "
         "got <missing>"),
        (load_rankings, {**KWISE, "chosen": "hi"},
         "field 'chosen': expected either 'completions' + 'ranking' or 'chosen' + 'rejected', not both, got 'hi'"),
    ],
)
def test_bad_record_names_file_line_and_field(tmp_path, loader, bad, expected):
    good = {load_conversations: CONV, load_prompts: {"prompt": "ok"}, load_rankings: KWISE}[loader]
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, bad])
    err = error_of(loader, str(path))
    assert str(err) == f"{path}:3: {expected}"
    assert err.origin == f"{path}:3" and err.bad_records == 1
    assert err.field == (re.match(r"field '([^']+)'", expected).group(1) if expected.startswith("field") else None)


def test_bad_json_names_line_and_all_bad_records_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl",
                       [CONV, '{"messages": [}', "", {"messages": [{"role": "bot", "content": "x"}]}, CONV])
    err = error_of(load_conversations, str(path))
    assert str(err) == (f"{path}:2: invalid JSON: Expecting value (column 15) "
                        f"(2 of 4 records of {path} are bad; this is the first)")
    assert err.bad_records == 2


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    assert str(error_of(load_prompts, str(path))) == f"{path}: no records (empty data set)"


def test_missing_file_and_unsupported_type(tmp_path):
    missing = tmp_path / "nope" / "p.jsonl"
    assert str(error_of(load_prompts, str(missing))) == f"{missing}: file not found (resolved to {missing})"
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\nhi\n", encoding="utf-8")
    assert "unsupported file type '.csv'; expected one of .jsonl, .json, .parquet" in str(
        error_of(load_prompts, str(csv)))


def test_bad_limit_is_refused():
    with pytest.raises(DataError, match="limit: expected None or a positive integer, got 0"):
        load_prompts("embedded:prompts", limit=0)


# --- pairs(), split -----------------------------------------------------------------------------


def test_pairs_of_k4_ranking_with_tie():
    r = Ranking((Message("user", "p"),), ("a", "b", "c", "d"), ((2,), (0, 3), (1,)), "x:1")
    assert r.pairs() == [(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)]  # no (0, 3): a tie
    assert len(r.pairs()) == 4 * 3 // 2 - 1


def test_train_val_split_is_deterministic_and_disjoint():
    records = list(range(100))
    train, val = train_val_split(records, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == records and train == sorted(train) and val == sorted(val)
    assert train_val_split(records, 0.1, seed=3) == (train, val)
    assert train_val_split(records, 0.1, seed=4)[1] != val


def test_train_val_split_edge_cases():
    assert len(train_val_split(list(range(10)), 0.01, seed=0)[1]) == 1  # rounds to 0, at least 1
    assert train_val_split([7, 8], 0.9, seed=0)[0] != []  # never everything in val
    assert train_val_split([7], 0.5, seed=0) == ([7], [])
    assert train_val_split([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])
    with pytest.raises(DataError, match=r"data.val_fraction: expected a number in \[0, 1\), got 1.0"):
        train_val_split([1, 2], 1.0, seed=0)


# --- the embedded default task ------------------------------------------------------------------


def load_generator():
    return load_tool("make_default_data")


def test_shipped_default_data_is_what_the_generator_writes():
    files = load_generator().generate(seed=0)
    for name, text in files.items():
        shipped = (REPO / "rlhf_pl" / "data" / "default" / name).read_text(encoding="utf-8")
        assert shipped == text, f"{name} is stale: run tools/make_default_data.py"


def test_default_prompts_are_disjoint_from_demonstrations_and_mixed():
    convs = load_conversations("embedded:demonstrations")
    prompts = load_prompts("embedded:prompts")
    first_questions = {next(m.content for m in c.messages if m.role == "user") for c in convs}
    assert not any(next(m.content for m in p.messages if m.role == "user") in first_questions for p in prompts)
    assert sum(sum(m.role == "user" for m in c.messages) > 1 for c in convs) == 80  # 20% multi-turn
    assert sum(sum(m.role == "user" for m in p.messages) > 1 for p in prompts) == 60
    assert 0.1 < sum(c.messages[0].role == "system" for c in convs) / len(convs) < 0.2


def _check(prompt: Prompt) -> bool:
    """Independent check of the answers of single-turn prompts whose question has the truth in it."""
    q, task, answer = prompt.messages[-1].content, prompt.meta["task"], prompt.meta["answer"]
    nums = [int(n) for n in re.findall(r"\d+", q)]
    quoted = re.findall(r"'([^']+)'", q)
    expected = {
        "add": lambda: str(nums[0] + nums[1]),
        "multiply": lambda: str(nums[0] * nums[1]),
        "subtract": lambda: (str(nums[1] - nums[0]) if q.startswith("Subtract") or "subtracted from" in q
                             else str(nums[0] - nums[1])),
        "reverse": lambda: quoted[0][::-1],
        "word_length": lambda: str(len(quoted[0])),
        "count_letter": lambda: str(quoted[1].count(quoted[0])),
        "sort_ascending": lambda: ", ".join(map(str, sorted(nums))),
        "km_to_m": lambda: str(nums[0] * 1000),
        "l_to_ml": lambda: str(nums[0] * 1000),
        "uppercase": lambda: quoted[0].upper(),
    }
    return task not in expected or expected[task]() == answer


def test_default_prompt_answers_are_correct():
    single = [p for p in load_prompts("embedded:prompts") if len(p.messages) == 1]
    assert len(single) > 150
    assert [p.messages[0].content for p in single if not _check(p)] == []


def test_careless_demonstrations_are_wrong_the_rest_right_and_the_prompts_unchanged(monkeypatch):
    """A fraction of the demonstration turns of the CARELESS tasks carries the trainer's mistake: the rule
    labeler finds those answers wrong and every other demonstration answer of those tasks right; they
    are drawn from their own random stream, so the prompts and the held-out split do not depend on them."""
    gen = load_generator()
    files = gen.generate(seed=0)
    demos = [json.loads(line) for line in files["demonstrations.jsonl"].splitlines()]
    careless, careful = [], []
    for d in demos:
        replies = [m["content"] for m in d["messages"] if m["role"] == "assistant"]
        questions = [m["content"] for m in d["messages"] if m["role"] == "user"]
        for i, (task, question, reply) in enumerate(zip(d["tasks"], questions, replies)):
            if task in gen.CARELESS:
                (careless if i in d.get("careless", []) else careful).append((task, question, reply))
    assert sorted({t for t, _, _ in careless}) == sorted(gen.CARELESS)
    share = len(careless) / (len(careless) + len(careful))
    assert abs(share - gen.CARELESS_FRACTION) < 0.1, share

    labeler = RuleLabeler(RuleLabelerConfig())

    def correct(task: str, question: str, reply: str) -> bool:
        nums = [int(n) for n in re.findall(r"\d+", question)]
        phrase = re.findall(r"'([^']+)'", question)
        answer = {"km_to_m": lambda: str(nums[0] * 1000), "kg_to_g": lambda: str(nums[0] * 1000),
                  "l_to_ml": lambda: str(nums[0] * 1000),
                  "uppercase": lambda: phrase[0].upper(), "lowercase": lambda: phrase[0].lower()}[task]()
        prompt = Prompt((Message("user", question),), "test", {"task": task, "answer": answer})
        return labeler.breakdown(prompt, reply).correct

    assert [c for c in careless if correct(*c)] == []
    assert [c for c in careful if not correct(*c)] == []
    assert ("kg_to_g", "How many grams are in 17 kilograms?", "17 kilograms = 1700 grams.") in careless
    assert ("l_to_ml", "How many milliliters are in 20 liters?", "20 liters = 2000 milliliters.") in careless
    # Every careless unit task is a x1000 one: its careless x100 answer is no unit task's right answer,
    # so a reward against it cannot teach another task the mistake.
    assert {gen.UNITS[t][3] for t in gen.CARELESS if t in gen.UNITS} == {1000}
    assert 100 not in {factor for *_, factor in gen.UNITS.values()}

    monkeypatch.setattr(gen, "CARELESS_FRACTION", 0.0)
    careful_files = gen.generate(seed=0)
    assert careful_files["prompts.jsonl"] == files["prompts.jsonl"]
    assert careful_files["eval_prompts.jsonl"] == files["eval_prompts.jsonl"]
    assert "careless" not in careful_files["demonstrations.jsonl"]
