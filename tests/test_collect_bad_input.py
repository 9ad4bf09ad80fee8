"""+stage=collect on bad input: each case a UserError naming the source, the record and the bad value,
raised before anything is written — no comparisons.jsonl, no summary.json, the output index untouched.

The stage is run through :func:`rlhf_pl.run.run_stage` on ``experiment=quick`` (the tiny model);
the cases that must fail before any model is loaded replace the loader with one that fails the test.
One case goes through the command line for the single ``error:`` line and exit code 2."""
from __future__ import annotations

import json
import re

import pytest
from hydra import compose, initialize_config_module
from test_cli import assert_user_error, run_cli

from rlhf_pl import outputs, registry
from rlhf_pl.config import register_configs
from rlhf_pl.data.formats import DataError
from rlhf_pl.errors import ConfigError, InputError, UserError
from rlhf_pl.plugins.labelers import LabelerError
from rlhf_pl.run import run_stage

CHAT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]


def _compose(out, *overrides: str):
    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        return compose("config", overrides=["+stage=collect", "experiment=quick", f"paths.output_root={out}",
                                            "trainer.enable_progress_bar=false", *overrides])


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture()
def index(tmp_path, ppo_inputs):
    """An output index with an earlier run recorded in it; returns (output root, the index's bytes)."""
    out = tmp_path / "out"
    cfg = _compose(out)
    outputs.record(cfg, "sft", {"model": ppo_inputs / "sft"})
    return out, outputs.index_path(cfg).read_bytes()


@pytest.fixture()
def no_model(monkeypatch):
    """Any attempt of the stage to load a model fails the test (the error must come first)."""
    def load(*args, **kwargs):
        raise AssertionError("collect loaded a model before reporting the bad input")

    monkeypatch.setattr("rlhf_pl.stages.collect.load_model_and_tokenizer", load)


def _collect_overrides(ppo_inputs, *more: str) -> tuple[str, ...]:
    """2 distinct completions per prompt from the tiny SFT policy; the rule labeler ranks at random (no ties)."""
    return (f"collect.policy_from={ppo_inputs / 'sft'}", "collect.k=2", "collect.max_new_tokens=4",
            "sampler.temperature=1.5", "collect.resample_rounds=4", "labeler.noise=1.0", *more)


def _fails(cfg, run_dir, index, error: type[UserError], *parts: str) -> str:
    """Run the stage, expect ``error`` whose message holds every part; check nothing was written."""
    with pytest.raises(error) as caught:
        run_stage(cfg, run_dir)
    message = str(caught.value)
    for part in parts:
        assert part in message, message
    assert_nothing_written(run_dir, index)
    return message


def assert_nothing_written(run_dir, index) -> None:
    out, before = index
    for name in ("comparisons.jsonl", "summary.json", "samples.md"):
        assert not (run_dir / name).exists(), name
    assert not list(run_dir.glob(".comparisons.jsonl.*"))  # no temp file of the atomic writer left either
    assert (out / outputs.INDEX_FILE).read_bytes() == before


# --- 1. a conversation with no assistant turn to pick ------------------------------------------------


@pytest.mark.parametrize("messages, parts", [
    ([{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hello."}],
     ("no assistant turn that answers a user turn to pick", "roles ['system', 'assistant']")),
    ([{"role": "system", "content": "Be brief."}],
     ("field 'messages': expected at least one assistant turn", "got ['system']")),
], ids=["assistant-without-user", "system-only"])
def test_a_conversation_without_an_assistant_turn_to_pick_names_file_and_line(tmp_path, index, no_model, messages,
                                                                              parts):
    chats = _write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}, {"messages": messages}, {"messages": CHAT}])
    cfg = _compose(index[0], f"collect.sources=[embedded:prompts,{chats}]", "data.limit=3")
    _fails(cfg, tmp_path / "run", index, DataError, f"{chats}:2: ", *parts)


def test_a_record_of_only_a_user_message_is_a_prompt_not_an_error(tmp_path):
    """The prompt format: messages ending with a user turn are a prompt (nothing to cut)."""
    from rlhf_pl.stages.collect import load_items

    source = _write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT[:1]}])
    [item] = load_items([source], split="train", limit=None, seed=0)
    assert item.turn is None and item.prompt.messages[-1].content == "What is 2 + 2?"


# --- 2. K < 2 -------------------------------------------------------------------------------------


def test_k_below_2_names_the_key_and_range_before_any_model_is_loaded(tmp_path, index, no_model):
    _fails(_compose(index[0], "collect.k=1"), tmp_path / "run", index, ConfigError, "collect.k=1",
           "must be an integer in [2, 64]")


def test_k_below_2_on_the_command_line_is_one_error_line_and_exit_2(tmp_path, index):
    run_dir = tmp_path / "run"
    proc = run_cli("+stage=collect", "experiment=quick", "collect.k=0", f"paths.output_root={index[0]}",
                   f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_user_error(proc, "collect.k=0", "[2, 64]")
    assert_nothing_written(run_dir, index)


# --- 3. a policy directory that is not a model -------------------------------------------------------


def test_a_policy_directory_without_a_model_names_key_path_and_what_is_valid(tmp_path, index, no_model):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "notes.txt").write_text("no model here")
    _fails(_compose(index[0], f"collect.policy_from={folder}"), tmp_path / "run", index, InputError,
           f"collect.policy_from='{folder}'", "has no config.json", "valid: 'auto'",
           "directory written by +stage=ppo or +stage=sft")


# --- 4. a labeler that returns an invalid ranking ------------------------------------------------


class Duplicating:
    """Not a permutation: completion 0 twice, the others never."""

    def rank(self, prompt, completions):
        return ((0,), (0,))

    def score(self, prompt, completion):
        return 0.0


class Short(Duplicating):
    """Wrong length: the last completion left out."""

    def rank(self, prompt, completions):
        return tuple((i,) for i in range(len(completions) - 1))


class Long(Duplicating):
    """Wrong length: one index more than there are completions."""

    def rank(self, prompt, completions):
        return tuple((i,) for i in range(len(completions) + 1))


class OneRankingShort(Duplicating):
    """A batch labeler that answers one task fewer than it was given."""

    def rank_batch(self, tasks):
        return [tuple((i,) for i in range(len(t.completions))) for t in tasks][1:]


TASK = r"ranked task [0-9a-f]{16} \(embedded:prompts:\d+, K = 2\) wrongly"


@pytest.mark.parametrize("labeler, pattern", [
    (Duplicating, TASK + r".*each index once, got 0 in group 0 and in group 1; got \(\(0,\), \(0,\)\)"),
    (Short, TASK + r".*every index 0\.\.1, missing 1; got \(\(0,\),\)"),
    (Long, TASK + r".*indices in 0\.\.1, got 2 in group 2; got \(\(0,\), \(1,\), \(2,\)\)"),
    (OneRankingShort, r"rank_batch of (\d+) tasks must return a list of \1 rankings, got \d+ rankings"),
], ids=["not-a-permutation", "too-short", "too-long", "too-few-rankings"])
def test_a_labeler_s_invalid_ranking_names_labeler_task_and_value(tmp_path, index, ppo_inputs, one_thread,
                                                                  monkeypatch, labeler, pattern):
    build = registry.build
    monkeypatch.setattr(registry, "build",
                        lambda kind, cfg: labeler() if kind == "labelers" else build(kind, cfg))
    cfg = _compose(index[0], "data.limit=2", *_collect_overrides(ppo_inputs))
    message = _fails(cfg, tmp_path / "run", index, LabelerError,
                     f"labeler {labeler.__qualname__} ({labeler.__module__})")
    assert re.search(pattern, message), message


# --- 5. an empty prompt source ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n  \n"], ids=["empty", "blank-lines"])
def test_an_empty_prompt_source_names_the_file(tmp_path, index, no_model, text):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(text)
    _fails(_compose(index[0], f"collect.sources=[embedded:prompts,{empty}]", "data.limit=3"), tmp_path / "run",
           index, DataError, f"{empty}: no records (empty data set)")


# --- records are checked before they are written ------------------------------------------------------


def test_a_comparison_file_as_prompt_source_gives_its_prompts_not_its_own_comparison(tmp_path, index, ppo_inputs,
                                                                                    one_thread):
    """A pairwise file read for its prompts: its ``chosen``/``rejected`` stay out of the K-wise records
    (a record with both would be refused by the reward model's data validation)."""
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"What is {i} + 2?", "task": "add", "answer": str(i + 2), "chosen": f"{i + 2}.", "rejected": "0."}
        for i in range(2)])
    cfg = _compose(index[0], f"collect.sources=[{pairs}]", *_collect_overrides(ppo_inputs))
    result = run_stage(cfg, tmp_path / "run")
    records = [json.loads(line) for line in result.outputs["comparisons"].read_text().splitlines()]
    assert records and all(r["answer"] and "chosen" not in r and "rejected" not in r for r in records)


def test_a_record_the_reward_model_would_refuse_is_never_written(tmp_path, index, ppo_inputs, one_thread,
                                                                 monkeypatch):
    from rlhf_pl.stages import collect

    make_record = collect.make_record
    monkeypatch.setattr(collect, "make_record", lambda *args: {**make_record(*args), "completions": ["one"]})
    run_dir = tmp_path / "run"
    _fails(_compose(index[0], "data.limit=2", *_collect_overrides(ppo_inputs)), run_dir, index, DataError,
           f"{run_dir / 'comparisons.jsonl'}:1: field 'completions': expected a list of K >= 2 completions")


def test_check_rankings_names_the_line_a_record_would_have():
    from rlhf_pl.data.formats import check_rankings

    good = {"prompt": "Hi?", "completions": ["a", "b"], "ranking": [1, 0]}
    assert [r.ranking for r in check_rankings([good], "c.jsonl")] == [((1,), (0,))]
    with pytest.raises(DataError, match=r"^c\.jsonl:2: field 'ranking': expected a permutation of 0\.\.1"):
        check_rankings([good, {**good, "ranking": [0, 0]}], "c.jsonl")
