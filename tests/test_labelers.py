"""The rule-based simulated labeler, its noise option and config checks, and the shipped comparisons."""
from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from rlhf_pl import registry
from rlhf_pl.config import register_configs
from rlhf_pl.data.formats import Message, Prompt, load_rankings
from rlhf_pl.plugins.human_labeler import HumanLabeler
from rlhf_pl.plugins.labeler_specs import HumanLabelerConfig, RuleLabelerConfig
from rlhf_pl.plugins.labelers import (
    BatchLabeler,
    Labeler,
    LabelerError,
    LabelTask,
    RuleLabeler,
    find_numbers,
    make_task,
    match_answer,
    rank_all,
    ranking_from_scores,
)


def prompt(question: str, task: str, answer: str, origin: str = "test.jsonl:1") -> Prompt:
    return Prompt((Message("user", question),), origin, {"task": task, "answer": answer})


def rule(**overrides) -> RuleLabeler:
    return RuleLabeler(RuleLabelerConfig(**overrides))


KG = prompt("Convert 23 kilograms to grams.", "kg_to_g", "23000")
RAMBLING = (
    "Well, to convert kilograms to grams you should first think about what a kilogram is, and "
    "then about what a gram is, and then you multiply the kilograms by a factor that I will now"
)


# --- scores and rankings ---------------------------------------------------------------------


def test_score_parts_of_a_correct_short_answer():
    b = rule().breakdown(KG, "23 kilograms = 23,000 grams.")
    assert b.correct and b.words == 5
    assert (b.answer, b.direct, b.length, b.repetition, b.unfinished, b.garbage) == (4.0, 0.5, 0.0, 0.0, 0.0, 0.0)
    assert b.total == 4.5


def test_rambling_unfinished_answer_is_penalised_exactly():
    b = rule().breakdown(KG, RAMBLING)
    assert not b.correct and b.words == 35
    assert b.length == pytest.approx(-0.05 * (35 - 15))  # 20 words beyond max_words
    assert b.unfinished == -1.0  # > 6 words, no closing punctuation
    assert b.repetition == pytest.approx(-2.0 * 2 / 33)  # "about what a", "is, and then" repeat: 2 of 33 trigrams
    assert b.total == pytest.approx(-2.12)


def test_correct_short_beats_wrong_beats_rambling_beats_garbage():
    completions = ["ÄÖÜ ßðþ ŋŧ ĸł ¶ŧ ←↓→", RAMBLING, "23 kilograms = 2300 grams.", "23 kilograms = 23000 grams."]
    labeler = rule()
    scores = [labeler.score(KG, c) for c in completions]
    assert scores == sorted(scores)  # listed worst first
    assert scores[0] < scores[1] < scores[2] < scores[3]
    assert labeler.rank(KG, completions) == ((3,), (2,), (1,), (0,))


def test_correct_but_late_answer_loses_the_directness_bonus():
    late = "Let me think about this one carefully for a moment, step by step: the result is 23000."
    b = rule().breakdown(KG, late)
    assert b.correct and b.direct == 0.0 and b.words == 17
    assert b.total == pytest.approx(4.0 - 0.05 * (17 - 15))


def test_equal_scores_tie_and_ranking_groups_are_best_first():
    labeler = rule()
    ranking = labeler.rank(KG, ["23000", "It is 9.", "23000 grams.", "It is 7."])
    assert ranking == ((0, 2), (1, 3))
    assert ranking_from_scores([1.0, 3.0, 1.0, 2.0]) == ((1,), (3,), (0, 2))


def test_repetition_is_penalised():
    labeler = rule()
    repeated = "The answer is 5. The answer is 5. The answer is 5."
    b = labeler.breakdown(prompt("How many letters are in 'apple'?", "word_length", "5"), repeated)
    # 12 words -> 10 trigrams, 4 distinct: (1 - 4/10) of them repeat
    assert b.repetition == pytest.approx(-2.0 * (1 - 4 / 10))


@pytest.mark.parametrize(
    "answer, task, completion, correct",
    [
        ("8", "subtract", "18 - 10 = 8.", True),
        ("8", "subtract", "8 is it, not 18 - 9", False),  # the last number counts
        ("-3", "subtract", "5 - 8 = -3", True),
        ("3", "count_letter", "The letter 'a' appears three times.", True),
        ("23000", "kg_to_g", "That is 23,000 grams.", True),
        ("3, 17, 42", "sort_ascending", "From smallest to largest: 3, 17, 42.", True),
        ("3, 17, 42", "sort_ascending", "Sorted: 3, 42, 17.", False),
        ("a-p-p-l-e", "spell", "apple is spelled A - P - P - L - E.", True),
        ("a-p-p-l-e", "spell", "apple", False),
        ("Santiago", "capital", "The capital of Chile is santiago.", True),
        ("New Delhi", "capital", "It is Delhi.", False),
        ("FRESH BREAD", "uppercase", "In uppercase: 'FRESH BREAD'", True),
        ("FRESH BREAD", "uppercase", "fresh bread", False),  # case matters for the case tasks
        ("enigne", "reverse", "'engine' reversed is 'enigne'.", True),
    ],
)
def test_answer_matching_rules(answer, task, completion, correct):
    labeler = rule()
    assert labeler.breakdown(prompt("q?", task, answer), completion).correct is correct


def test_number_reading():
    values = [n.value for n in find_numbers("18-10 = 8, = -3, twelve, 1,000 and 2.5")]
    assert values == [18, 10, 8, -3, 12, 1000, 2.5]
    assert match_answer("12", "a dozen is 12").start == 11


def test_prompt_without_answer_is_an_error_naming_the_origin():
    bare = Prompt((Message("user", "Hi"),), "mine.jsonl:7", {})
    with pytest.raises(LabelerError, match=r"mine\.jsonl:7.*'answer'"):
        rule().score(bare, "Hello")


# --- noise -----------------------------------------------------------------------------------


def _prompts(n: int) -> list[Prompt]:
    return [prompt(f"What is {i} + 1?", "add", str(i + 1), f"p.jsonl:{i}") for i in range(n)]


COMPLETIONS = ["It is {}.", "It is {} or maybe not, who knows, since numbers are hard for me to add up", "no",
               "¿¿ ÄÖ {} ??"]
EXPECTED = ((0,), (1,), (3,), (2,))  # correct+direct 4.5 > rambling 3.4 > garbage ~2.8-3.0 > wrong 0


def test_noise_zero_is_the_deterministic_score_ranking():
    labeler = rule(noise=0.0)
    for p in _prompts(20):
        texts = [c.format(p.meta["answer"]) for c in COMPLETIONS]
        labeling = labeler.label(p, texts)
        assert not labeling.noisy
        assert labeling.ranking == ranking_from_scores(labeling.scores) == EXPECTED


def test_noise_one_gives_seeded_random_permutations():
    prompts = _prompts(40)
    texts = [[c.format(p.meta["answer"]) for c in COMPLETIONS] for p in prompts]
    first = [rule(noise=1.0, seed=7).rank(p, t) for p, t in zip(prompts, texts)]
    again = [rule(noise=1.0, seed=7).rank(p, t) for p, t in reversed(list(zip(prompts, texts)))][::-1]
    other = [rule(noise=1.0, seed=8).rank(p, t) for p, t in zip(prompts, texts)]
    assert first == again  # reproducible, whatever the order of labelling
    assert first != other
    for ranking in first:
        assert all(len(g) == 1 for g in ranking) and sorted(i for (i,) in ranking) == [0, 1, 2, 3]
    perms = {tuple(i for (i,) in r) for r in first}
    assert len(perms) >= 15  # 40 draws from 24 permutations: not one fixed order
    assert sum(r != EXPECTED for r in first) >= 30


def test_fraction_of_replaced_rankings_matches_noise():
    labeler = rule(noise=0.3, seed=0)
    prompts = _prompts(2000)
    noisy = sum(labeler.label(p, ["a.", "b b."]).noisy for p in prompts)
    assert abs(noisy / 2000 - 0.3) < 0.035  # ~3.4 standard deviations


# --- config and plugin -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("noise", 1.5, r"labeler\.noise must be in \[0, 1\], got 1\.5"),
        ("noise", -0.1, r"labeler\.noise must be in \[0, 1\], got -0\.1"),
        ("max_words", 0, r"labeler\.max_words must be an integer >= 1, got 0"),
        ("correct", -1.0, r"labeler\.correct must be a finite number >= 0, got -1\.0"),
        ("decimals", 9, r"labeler\.decimals must be an integer in \[0, 6\], got 9"),
    ],
)
def test_bad_config_values_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        RuleLabelerConfig(**{key: value})


def _compose(*overrides: str):
    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_labeler_group_composes_builds_and_checks():
    cfg = _compose("+stage=rm", "labeler.noise=0.25", "labeler.seed=3")
    assert OmegaConf.get_type(cfg.labeler) is RuleLabelerConfig
    labeler = registry.build("labelers", cfg.labeler)
    assert isinstance(labeler, RuleLabeler) and isinstance(labeler, Labeler)
    assert (labeler.config.noise, labeler.config.seed, labeler.config.max_words) == (0.25, 3, 15)
    with pytest.raises(ValueError, match=r"labeler\.noise must be in \[0, 1\], got 2\.0"):
        registry.build("labelers", _compose("+stage=rm", "labeler.noise=2.0").labeler)
    with pytest.raises((ConfigCompositionException, ValidationError), match="noise"):
        _compose("+stage=rm", "labeler.noise=lots")


def test_rule_is_listed_with_its_package():
    (plugin,) = [p for p in registry.installed("labelers") if p.name == "rule"]
    assert plugin.distribution == "rlhf_pl" and plugin.spec().config is RuleLabelerConfig
    built = registry.build_by_name("labelers", "rule", noise=0.5)
    assert built.config.noise == 0.5


# --- tasks and rank_all ----------------------------------------------------------------------


def test_task_id_is_a_stable_hash_of_messages_and_completions():
    task = make_task(KG, ["a", "b"])
    assert isinstance(task, LabelTask) and task.completions == ("a", "b") and task.prompt is KG
    same = make_task(Prompt(KG.messages, "elsewhere.jsonl:9", {"other": "meta"}), ("a", "b"))
    assert same.id == task.id and len(task.id) == 16  # origin and meta do not count
    assert make_task(KG, ["b", "a"]).id != task.id
    assert make_task(prompt("Convert 24 kilograms to grams.", "kg_to_g", "24000"), ["a", "b"]).id != task.id
    with pytest.raises(LabelerError, match="completion 1 is a int"):
        make_task(KG, ["a", 3])


def test_rank_all_calls_rank_per_task_and_checks_it():
    tasks = [make_task(p, [c.format(p.meta["answer"]) for c in COMPLETIONS]) for p in _prompts(3)]
    assert rank_all(rule(), tasks) == [EXPECTED] * 3


class Batch:
    """A third-party batch labeler returning whatever it is told to."""

    def __init__(self, rankings):
        self.rankings, self.calls = rankings, []

    def rank(self, prompt, completions):
        raise AssertionError("rank_all must use rank_batch")

    def score(self, prompt, completion):
        return 0.0

    def rank_batch(self, tasks):
        self.calls.append(list(tasks))
        return self.rankings


TASK = make_task(KG, ["a", "b", "c"])


def test_rank_all_prefers_rank_batch_and_normalises():
    labeler = Batch([[[2], [0, 1]], ((1,), (0,), (2,))])
    assert isinstance(labeler, BatchLabeler) and not isinstance(rule(), BatchLabeler)
    assert rank_all(labeler, [TASK, TASK]) == [((2,), (0, 1)), ((1,), (0,), (2,))]
    assert labeler.calls == [[TASK, TASK]]


@pytest.mark.parametrize(
    "ranking, problem",
    [
        (((0,), (0, 1)), r"each index once, got 0 in group 0 and in group 1"),  # duplicate
        (((0,), (1,)), r"every index 0\.\.2, missing 2"),  # wrong length / missing index
        (((0, 1, 2, 3),), r"indices in 0\.\.2, got 3"),  # not a permutation of 0..K-1
        (((0,), (1.0,), (2,)), r"int indices, got 1\.0 \(float\)"),
        (((0,), ("1",), (2,)), r"int indices, got '1' \(str\)"),
        (((0,), (True,), (2,)), r"int indices, got True \(bool\)"),
        ((0, 1, 2), r"group 0 to be a tuple of indices, got 0"),  # not groups
        ((), r"at least one group"),
        (((0, 1), ()), r"group 1 to be non-empty"),
        ("012", r"a sequence of groups, got a str"),
    ],
)
def test_rank_all_rejects_a_bad_ranking_naming_labeler_task_value_and_expectation(ranking, problem):
    with pytest.raises(LabelerError) as info:
        rank_all(Batch([ranking]), [TASK])
    message = str(info.value)
    assert f"labeler Batch ({__name__}) ranked task {TASK.id}" in message
    assert "expected best-first groups of the completion indices 0..2, each index exactly once" in message
    assert re.search(problem, message), message
    assert f"got {ranking!r}" in message


def test_rank_all_rejects_a_wrong_number_of_rankings():
    with pytest.raises(LabelerError, match=r"rank_batch of 2 tasks must return a list of 2 rankings, got 1 rankings"):
        rank_all(Batch([((0,), (1,), (2,))]), [TASK, TASK])


# --- the human labeler's plugin ----------------------------------------------------------------


def test_human_labeler_composes_checks_and_builds(tmp_path):
    from rlhf_pl.config import validate_config

    cfg = _compose("+stage=rm", "labeler=human", f"labeler.queue_dir={tmp_path}/q", "labeler.timeout_s=0")
    assert OmegaConf.get_type(cfg.labeler) is HumanLabelerConfig
    validate_config(cfg)
    labeler = registry.build("labelers", cfg.labeler)
    assert isinstance(labeler, HumanLabeler) and isinstance(labeler, BatchLabeler)
    assert labeler.queue_dir == tmp_path / "q" and labeler.config.timeout_s == 0
    with pytest.raises(ValueError, match=r"labeler\.poll_s"):
        validate_config(_compose("+stage=rm", "labeler=human", "labeler.poll_s=0"))
    with pytest.raises(ValueError, match=r"labeler\.timeout_s must be a finite number >= 0, got -1"):
        HumanLabelerConfig(timeout_s=-1)


def test_human_labeler_cannot_score():
    with pytest.raises(LabelerError, match=r"cannot score.*gold labeler such as labeler=rule"):
        HumanLabeler(HumanLabelerConfig()).score(KG, "23000")


# --- the shipped comparison set ----------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    return load_rankings("embedded:comparisons")


def test_shipped_comparisons_load_with_k4_and_a_few_hundred_prompts(shipped):
    """Made by tools/make_comparisons.py (a collect stage): K = 4, or fewer where the resampling rounds left
    duplicates; every record with its provenance."""
    assert 200 <= len(shipped) <= 300
    assert {r.k for r in shipped} <= {2, 3, 4} and sum(r.k == 4 for r in shipped) > 0.9 * len(shipped)
    assert all(len(r.ranking) >= 2 for r in shipped)  # no all-tie prompt
    assert len({r.meta["id"] for r in shipped}) == len(shipped)
    assert {r.meta["provenance"]["labeler"] for r in shipped} == {"rule"}


def test_shipped_rankings_are_the_rule_labelers_and_informative(shipped):
    labeler = rule()
    best = worst = 0.0
    for r in shipped:
        p = Prompt(r.prompt, r.origin, {"task": r.meta["task"], "answer": r.meta["answer"]})
        labeling = labeler.label(p, list(r.completions))
        assert labeling.ranking == r.ranking, r.origin
        correct = [b.correct for b in labeling.breakdowns]
        best += sum(correct[i] for i in r.ranking[0]) / len(r.ranking[0])
        worst += sum(correct[i] for i in r.ranking[-1]) / len(r.ranking[-1])
    assert best > worst
