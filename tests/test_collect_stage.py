"""+stage=collect: a model-written turn picked and cut before, K completions sampled, deduplicated,
ranked by the labeler plugin, written as K-wise rankings with provenance."""
from __future__ import annotations

import json
import random

import pytest
import torch
from hydra import compose, initialize_config_module

from rlhf_pl import outputs
from rlhf_pl.config import register_configs, validate_config
from rlhf_pl.data.formats import Conversation, DataError, Message, Prompt, load_rankings
from rlhf_pl.errors import ConfigError, InputError
from rlhf_pl.models.generate import GreedySampler
from rlhf_pl.run import run_stage
from rlhf_pl.sampling import Sample
from rlhf_pl.stages.collect import INPUTS, Item, Pool, load_items, pick_turn, sample_pool


def _compose(*overrides: str):
    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        return compose("config", overrides=["+stage=collect", "experiment=quick", *overrides])


CONVERSATION = Conversation((Message("system", "Be brief."), Message("user", "Hi."), Message("assistant", "Hello."),
                             Message("user", "2 + 2?"), Message("assistant", "4.")), "c.jsonl:1", {"task": "add"})


def test_a_conversation_is_cut_before_a_seeded_random_assistant_turn():
    picks = {pick_turn(CONVERSATION, random.Random(seed)).turn for seed in range(20)}
    assert picks == {2, 4}  # both assistant turns that answer a user turn, and nothing else
    item = pick_turn(CONVERSATION, random.Random(0))
    assert item.prompt.messages == CONVERSATION.messages[:item.turn] and item.prompt.messages[-1].role == "user"
    assert item.original == CONVERSATION.messages[item.turn].content and item.prompt.meta == {"task": "add"}
    assert pick_turn(CONVERSATION, random.Random(5)) == pick_turn(CONVERSATION, random.Random(5))
    lone = Conversation((Message("system", "Be brief."), Message("assistant", "Hello.")), "c.jsonl:2")
    with pytest.raises(DataError, match=r"c.jsonl:2: no assistant turn that answers a user turn to pick"):
        pick_turn(lone, random.Random(0))


def test_sources_mix_prompts_and_conversations(tmp_path):
    items = load_items(["embedded:prompts", "embedded:demonstrations"], split="train", limit=3, seed=0)
    assert len(items) == 6 and [i.turn is None for i in items] == [True] * 3 + [False] * 3
    assert all(i.prompt.messages[-1].role == "user" for i in items)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        load_items([str(empty)], split="train", limit=None, seed=0)
    with pytest.raises(DataError, match="collect.sources is empty"):
        load_items([], split="train", limit=None, seed=0)


def test_num_prompts_is_a_seeded_sample_in_source_order():
    every = [i.source for i in load_items(["embedded:prompts"], split="train", limit=None, seed=0)]
    picked = [i.source for i in load_items(["embedded:prompts"], split="train", limit=None, seed=3, num_prompts=20)]
    again = [i.source for i in load_items(["embedded:prompts"], split="train", limit=None, seed=3, num_prompts=20)]
    other = [i.source for i in load_items(["embedded:prompts"], split="train", limit=None, seed=4, num_prompts=20)]
    assert len(picked) == 20 and picked == again and picked != other
    assert picked == [s for s in every if s in set(picked)]  # in source order


def test_the_pool_keeps_k_distinct_non_empty_completions_and_counts_the_rest():
    pool = Pool(k=2)
    pool.add([Sample(0, t, (1,), True) for t in ("a", "", "a", "b", "c")] + [Sample(1, "x", (2,), False)])
    assert [s.text for s in pool.kept[0]] == ["a", "b"] and (pool.empty, pool.duplicates) == (1, 1)
    assert pool.missing(3) == [0, 1, 2]


class _Always(GreedySampler):
    """A sampler that always picks ``token``. Shape: (b, v) -> (b,)."""

    def __init__(self, token: int) -> None:
        self.token = token

    def sample(self, logits, generator=None):
        return torch.full(logits.shape[:-1], self.token, dtype=torch.long)


def test_resampling_asks_each_prompt_once_for_all_it_lacks(tiny_model, tiny_tokenizer, one_thread):
    """A policy that always writes "a" repeats itself: of k=3 samples 2 are duplicates, in the first round and in
    each of the 2 resampling rounds. Each round prefills every prompt once (forward calls counted: 3 prompt rows per
    round, never one per missing slot), and the duplicates are counted."""
    cfg = _compose("collect.k=3", "collect.resample_rounds=2", "collect.batch_size=6", "collect.max_new_tokens=4")
    items = [Item(Prompt((Message("user", q),), f"p.jsonl:{i}"), f"p.jsonl:{i}")
             for i, q in enumerate(["Hi.", "What is 2 + 3?", "Spell 'cat', please."])]
    prefill_rows: list[int] = []
    handle = tiny_model.register_forward_pre_hook(
        lambda _, args, kwargs: prefill_rows.append(kwargs["input_ids"].shape[0]) if kwargs["input_ids"].shape[1] > 1
        else None, with_kwargs=True)
    try:
        pool = sample_pool(tiny_model, tiny_tokenizer, items, cfg, _Always(tiny_tokenizer.encode("a")[0]), seed=0)
    finally:
        handle.remove()
    assert sum(prefill_rows) == 3 * 3  # 3 prompts, once in each of 3 rounds
    assert [len(pool.kept[i]) for i in range(3)] == [1, 1, 1] and pool.duplicates == 3 * 2 * 3
    assert pool.missing(3) == [2, 2, 2]


def test_policy_auto_prefers_the_latest_ppo_output_then_sft(tmp_path, ppo_inputs):
    cfg = _compose(f"paths.output_root={tmp_path}")
    with pytest.raises(InputError, match=r"collect.policy_from=auto: no \+stage=ppo or \+stage=sft output recorded"):
        outputs.Inputs(cfg, INPUTS)["policy"]
    outputs.record(cfg, "sft", {"model": ppo_inputs / "sft"})
    assert outputs.Inputs(cfg, INPUTS)["policy"] == (ppo_inputs / "sft").resolve()
    outputs.record(cfg, "ppo", {"policy": ppo_inputs / "sft"})  # any model directory will do as a "PPO output"
    cfg_ppo = _compose(f"paths.output_root={tmp_path}")
    assert outputs.latest(cfg_ppo, "ppo", "policy") == outputs.Inputs(cfg_ppo, INPUTS)["policy"]
    with pytest.raises(InputError, match=r"collect.policy_from=.*has no config.json"):
        outputs.Inputs(_compose(f"collect.policy_from={tmp_path}"), INPUTS)["policy"]


def test_settings_are_checked_at_composition():
    with pytest.raises(ConfigError, match=r"collect.k=1: must be an integer in \[2, 64\]"):
        validate_config(_compose("collect.k=1"))
    with pytest.raises(ConfigError, match=r"collect.resample_rounds=-1"):
        validate_config(_compose("collect.resample_rounds=-1"))


def _chat_log(path, n: int) -> str:
    """Chat logs in the conversation format, one answer per record (the rule labeler needs it)."""
    with path.open("w") as f:
        for i in range(n):
            messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": f"What is {i} + 2?"}, {"role": "assistant", "content": f"{i + 2}."}]
            f.write(json.dumps({"messages": messages, "task": "add", "answer": str(i + 2)}) + "\n")
    return str(path)


def test_end_to_end_rankings_with_provenance_read_by_the_reward_model(tmp_path, ppo_inputs, one_thread):
    chats = _chat_log(tmp_path / "chats.jsonl", 4)
    cfg = _compose(f"paths.output_root={tmp_path / 'out'}", f"collect.policy_from={ppo_inputs / 'sft'}",
                   f"collect.sources=[embedded:prompts,{chats}]", "data.limit=4", "collect.k=3",
                   "collect.max_new_tokens=6", "collect.round=2", "collect.include_original=true",
                   "sampler.temperature=1.5", "labeler.noise=1.0", "trainer.enable_progress_bar=false")
    result = run_stage(cfg, tmp_path / "run")
    path = result.outputs["comparisons"]
    assert path == tmp_path / "run" / "comparisons.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    rankings = load_rankings(str(path))
    assert len(rankings) == len(records) == result.metrics["rankings"] >= 1
    assert result.metrics["prompts"] == 8 and result.metrics["fewer_than_2_distinct"] + len(records) \
        + result.metrics["all_tie"] == 8
    for record, ranking in zip(records, rankings):
        prov = record["provenance"]
        assert prov["policy"] == str(ppo_inputs / "sft") and prov["round"] == 2 and prov["labeler"] == "rule"
        assert prov["seed"] == 0 and prov["source"].rsplit(":", 1)[0] in ("embedded:prompts", chats)
        assert 2 <= ranking.k <= 3 and len(set(record["completions"])) == ranking.k
        if prov["turn"] is not None:  # a conversation: its own message is one of the completions
            assert record["completions"][prov["original"]] and record["prompt"][-1]["role"] == "user"
    assert (tmp_path / "run" / "samples.md").is_file()
    assert outputs.latest(cfg, "collect", "comparisons") == path.resolve()


def test_ranking_json_is_the_data_formats_best_first_list():
    from rlhf_pl.stages.collect import ranking_json

    assert ranking_json(((2,), (0, 3), (1,))) == [2, [0, 3], 1]


def test_make_comparisons_is_a_thin_call_of_the_stage(ppo_inputs, tmp_path, capsys):
    """tools/make_comparisons.py --policy: on-policy comparisons from a model directory (here a tiny
    random 'SFT' model), through +stage=collect, without touching any output index."""
    from tool_loader import load_tool

    tool = load_tool("make_comparisons")
    out = tmp_path / "c.jsonl"
    code = tool.main(["--policy", str(ppo_inputs / "sft"), "--num-prompts", "8", "--k", "2", "--max-new-tokens", "6",
                      "--dtype", "float32", "--threads", "1", "--noise", "1.0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rankings = load_rankings(str(out))
    assert 1 <= len(rankings) <= 8 and {r.k for r in rankings} == {2}
    assert f"comparisons written to {out}" in printed and "best_ranked_correct" in printed
    with pytest.raises(SystemExit):
        tool.main(["--policy", str(tmp_path), "--out", str(tmp_path / "never.jsonl")])
    assert "not a model directory" in capsys.readouterr().err and not (tmp_path / "never.jsonl").exists()


def test_people_rank_through_the_human_labeler_s_queue_and_a_rerun_reuses_their_answers(tmp_path, ppo_inputs,
                                                                                         one_thread):
    """labeler=human: the stage queues every task and waits; a 'person' (a thread using the terminal
    tool's answer function) ranks the last completion first; the records carry those rankings. A
    re-run with the same seed asks the same tasks and takes the answers already given, at once."""
    import threading

    from rlhf_pl.plugins.label_queue import write_answer

    queue = tmp_path / "queue"
    stop = threading.Event()

    def person() -> None:
        answered: set[str] = set()
        while not stop.is_set():
            for task in sorted((queue / "pending").glob("*.json")) if (queue / "pending").is_dir() else []:
                if task.stem not in answered:
                    k = len(json.loads(task.read_text())["completions"])
                    write_answer(queue, task.stem, list(reversed(range(k))), who="tester")
                    answered.add(task.stem)
            stop.wait(0.02)

    overrides = (f"collect.policy_from={ppo_inputs / 'sft'}", "data.limit=3", "collect.k=2", "collect.max_new_tokens=5",
                 "sampler.temperature=1.5", "labeler=human", f"labeler.queue_dir={queue}", "labeler.poll_s=0.02",
                 "trainer.enable_progress_bar=false")
    thread = threading.Thread(target=person, daemon=True)
    thread.start()
    try:
        first = run_stage(_compose(*overrides, "labeler.timeout_s=60"), tmp_path / "run1", record=False)
    finally:
        stop.set()
        thread.join(timeout=10)
    records = [json.loads(line) for line in first.outputs["comparisons"].read_text().splitlines()]
    assert records and all(r["provenance"]["labeler"] == "human" for r in records)
    assert all(r["ranking"] == list(reversed(range(len(r["completions"])))) for r in records)
    again = run_stage(_compose(*overrides, "labeler.timeout_s=0"), tmp_path / "run2", record=False)
    assert again.outputs["comparisons"].read_text() == first.outputs["comparisons"].read_text()
