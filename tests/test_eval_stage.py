"""+stage=eval: gold-labeler metrics, best-of-n, Gao et al.'s fits — math against hand-computed
values, the stage end to end on tiny models."""
from __future__ import annotations

import json
import math

import pytest
from hydra import compose, initialize_config_module

from rlhf_pl.config import register_configs
from rlhf_pl.data.formats import Message, Prompt
from rlhf_pl.rl.eval_metrics import GaoFit, best_of_n, best_of_n_kl, fit_gao, paired_gain, pairwise_agreement, win_rate
from rlhf_pl.run import run_stage
from rlhf_pl.stages.eval import correct_rate, greedy_correct, group_figures, interval_95, policy_dirs


def test_best_of_n_kl_is_log_n_minus_n_minus_1_over_n():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(2.772588722 - 0.9375)
    with pytest.raises(ValueError, match="n >= 1"):
        best_of_n_kl(0)


def test_best_of_n_takes_the_gold_score_of_the_proxy_best_of_the_first_n():
    proxy = [[1.0, 3.0, 2.0], [5.0, 0.0, 9.0]]
    gold = [[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]]
    assert best_of_n(proxy, gold, 1) == 25.0  # the first sample of each
    assert best_of_n(proxy, gold, 2) == 30.0  # 20 (proxy 3 > 1) and 40 (proxy 5 > 0)
    assert best_of_n(proxy, gold, 3) == 40.0  # 20 and 60
    with pytest.raises(ValueError, match="best-of-4 needs >= 4 samples"):
        best_of_n(proxy, gold, 4)


def test_pairwise_agreement_counts_pairs_the_gold_labeler_separates_and_proxy_ties_half():
    # prompt 1: gold 2 > 1 > 0 — proxy orders (a,b) right, (a,c) right, (b,c) wrong: 2 of 3
    # prompt 2: gold ties (no pair); prompt 3: gold 1 > 0, proxy tie: half
    accuracy, pairs = pairwise_agreement([[0.9, 0.1, 0.5], [1.0, 2.0], [0.3, 0.3]], [[2, 1, 0], [1, 1], [1, 0]])
    assert pairs == 4 and accuracy == pytest.approx(2.5 / 4)
    assert math.isnan(pairwise_agreement([[1.0, 2.0]], [[0, 0]])[0]) and pairwise_agreement([[1.0]], [[0]])[1] == 0


def test_win_rate_counts_ties_half():
    assert win_rate([3.0, 1.0, 2.0], [1.0, 1.0, 3.0]) == pytest.approx(0.5)  # win, tie, loss
    assert win_rate([1.0], [0.0]) == 1.0


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_gao_forms_are_recovered_by_least_squares(form):
    truth = GaoFit(form, alpha=2.0, beta=0.5, points=4)
    d = [0.0, 0.5, 1.0, 1.5, 2.0]
    fit = fit_gao(d, [truth.gain(x) for x in d], form)
    assert fit.points == 4 and fit.alpha == pytest.approx(2.0) and fit.beta == pytest.approx(0.5)
    assert fit_gao([0.0, 1.0], [0.0, 0.3], form) is None  # one point with d > 0: nothing to fit


def test_paired_gain_is_the_mean_difference_with_the_interval_of_the_differences():
    gain = paired_gain([1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0])  # differences 1, 0, 0, 1
    assert gain.mean == 0.5 and gain.prompts == 4
    assert gain.ci == pytest.approx(1.96 * math.sqrt((4 * 0.25 / 3) / 4))  # sample variance 1/3 over 4 prompts
    same = paired_gain([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert same.mean == 0.0 and same.ci == 0.0  # unpaired intervals would be ±0.53 each
    assert paired_gain([1.0], [0.0]) == (1.0, None, 1)
    with pytest.raises(ValueError, match="equally long"):
        paired_gain([1.0, 0.0], [1.0])


def test_correct_rate_over_prompts_that_carry_an_answer():
    ask = lambda answer: Prompt((Message("user", "2 + 2?"),), "p", {"answer": answer} if answer else {})  # noqa: E731
    assert correct_rate([ask("4"), ask(None)], [["It is 4.", "five"], ["anything"]]) == 0.5
    assert correct_rate([ask(None)], [["4"]]) is None


def test_interval_and_figures_per_group_against_hand_computed_values():
    assert interval_95([1.0, 0.0, 1.0, 1.0]) == pytest.approx(1.96 * math.sqrt(0.75 * 0.25 / 4))
    assert interval_95([]) is None and interval_95([1.0, 1.0]) == 0.0
    ask = lambda answer, phrasing: Prompt((Message("user", "q"),), "p", {"answer": answer,  # noqa: E731
                                                                          "phrasing": phrasing})
    prompts = [ask("4", "template"), ask("9", "paraphrase"), ask("7", "template")]
    correct = greedy_correct(prompts, ["4", "ten", "8"])  # 1, 0, 0
    figures = group_figures(prompts, correct, [4.0, 0.0, -1.0], "phrasing")
    assert list(figures) == ["paraphrase", "template"]
    assert figures["template"] == {"prompts": 2, "gold_greedy": 1.5, "correct_greedy": 0.5,
                                   "correct_greedy_ci": pytest.approx(1.96 * math.sqrt(0.25 / 2))}
    assert figures["paraphrase"]["correct_greedy"] == 0.0 and group_figures(prompts, [1.0] * 3, [0.0] * 3, None) == {}
    # against the SFT policy's correctness on the same prompts: template 1, 0 vs 0, 0; paraphrase 0 vs 1
    gains = group_figures(prompts, correct, [4.0, 0.0, -1.0], "phrasing", base=[0.0, 1.0, 0.0])
    assert gains["template"]["correct_greedy_gain"] == 0.5
    assert gains["template"]["correct_greedy_gain_ci"] == pytest.approx(1.96 * math.sqrt(0.5 / 2))
    assert (gains["paraphrase"]["correct_greedy_gain"], gains["paraphrase"]["correct_greedy_gain_ci"]) == (-1.0, None)


def test_extra_policies_are_named_by_their_run_or_explicitly_and_never_twice(tmp_path, ppo_inputs):
    from omegaconf import OmegaConf

    from rlhf_pl.errors import ConfigError

    sft = ppo_inputs / "sft"
    cfg = OmegaConf.create({"eval": {"policy_from": "none", "extra_policies": [f"round_1={sft}", str(sft)]}})
    assert policy_dirs(cfg, {"reference": sft, "policy": None}) == {
        "sft": sft, "round_1": sft, f"{ppo_inputs.name}/sft": sft}
    cfg.eval.extra_policies = [f"a={sft}", f"a={sft}"]
    with pytest.raises(ConfigError, match="a policy named 'a' is already evaluated"):
        policy_dirs(cfg, {"reference": sft, "policy": None})


def test_eval_end_to_end_on_tiny_models(tmp_path, ppo_inputs, one_thread, monkeypatch):
    """The SFT model evaluated again as an extra policy: KL to itself exactly 0, all greedy answers
    tie with the SFT's (win rate exactly 0.5); best-of-n rows carry the analytic KL. The SFT policy's
    own KL takes no log-prob pass (the extra policy, a separate model, takes two per batch: own and ref)."""
    import rlhf_pl.stages.eval as eval_stage

    passes = []
    real_logprobs = eval_stage.response_logprobs
    monkeypatch.setattr(eval_stage, "response_logprobs",
                        lambda model, *a: passes.append(model) or real_logprobs(model, *a))
    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        cfg = compose("config", overrides=[
            "+stage=eval", "experiment=quick", f"paths.output_root={tmp_path / 'out'}",
            f"eval.reference_from={ppo_inputs / 'sft'}", f"eval.reward_from={ppo_inputs / 'rm'}",
            f"eval.extra_policies=[{ppo_inputs / 'sft'}]", "eval.num_prompts=4", "eval.samples=2",
            "eval.best_of=[1,2,4]", "eval.max_new_tokens=5", "sampler.temperature=1.2"])
    assert cfg.eval.prompts == "embedded:eval_prompts" and list(cfg.eval.group_by) == ["phrasing", "task"]
    result = run_stage(cfg, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result.outputs["eval"] == tmp_path / "run" / "eval.json"
    batches = lambda n: math.ceil(4 / max(1, cfg.eval.batch_size // n))  # noqa: E731
    assert len(passes) == 2 * batches(2)  # SFT against itself: none; the extra: own and ref
    sft, extra = report["policies"]["sft"], report["policies"][f"{ppo_inputs.name}/sft"]
    assert report["prompts"] == 4 and sft["kl"] == 0.0 and extra["kl"] == 0.0
    assert extra["win_rate_vs_sft"] == 0.5 and extra["gold_greedy"] == sft["gold_greedy"]
    assert (extra["correct_greedy_gain"], extra["correct_greedy_gain_ci"]) == (0.0, 0.0)  # same answers: exactly 0 ± 0
    assert sft["correct_greedy_gain"] is None
    assert result.metrics["correct_greedy_gain"] == {f"{ppo_inputs.name}/sft": 0.0}
    records = [json.loads(line) for line in (tmp_path / "run" / "answers.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(set(r["policies"]) == {"sft", f"{ppo_inputs.name}/sft"} for r in records)
    assert [r["messages"][-1]["role"] for r in records] == ["user"] * 4 and "answer" in records[0]["meta"]
    rows = [r["policies"]["sft"] for r in records]
    assert all(len(row["sampled"]) == 2 for row in rows)  # eval.samples, not the best-of-n pool of 4
    assert sum(row["correct_greedy"] for row in rows) / 4 == sft["correct_greedy"]
    assert sum(row["gold_greedy"] for row in rows) / 4 == pytest.approx(sft["gold_greedy"])
    assert 0.0 <= sft["correct_greedy"] <= 1.0 and 0.0 <= sft["eos_rate"] <= 1.0 and sft["length"] > 0
    assert {g: v["prompts"] for g, v in sft["by_group"]["phrasing"].items()} == {"template": 2, "paraphrase": 2}
    tasks = [r["meta"]["task"] for r in records]
    assert {g: v["prompts"] for g, v in sft["by_group"]["task"].items()} == {t: tasks.count(t) for t in set(tasks)}
    for task, figures in sft["by_group"]["task"].items():  # each task's rate is its prompts' mean
        right = [r["policies"]["sft"]["correct_greedy"] for r in records if r["meta"]["task"] == task]
        assert figures["correct_greedy"] == pytest.approx(sum(right) / len(right))
    assert [r["n"] for r in report["best_of_n"]] == [1, 2, 4]
    assert all(0.0 <= r["correct"] <= 1.0 for r in report["best_of_n"])
    assert report["proxy_agreement"]["pairs"] >= 0
    assert [r["kl"] for r in report["best_of_n"]] == pytest.approx([best_of_n_kl(n) for n in (1, 2, 4)])
    proxies = [r["proxy"] for r in report["best_of_n"]]
    assert proxies == sorted(proxies)  # the proxy-best of more samples scores at least as high on the proxy
    text = (tmp_path / "run" / "eval.md").read_text()
    assert "## Policies" in text and "## Best-of-n from the SFT policy" in text and "| sft |" in text
    assert "## Correct rate of greedy answers by phrasing" in text and "| template (n = 2) |" in text
    assert "## Correct rate of greedy answers by task" in text  # a row per task, with its number of prompts
    assert all(f"| {t} (n = {tasks.count(t)}) |" in text for t in set(tasks))
    assert "gain over SFT (greedy, paired)" in text and "| +0.000 ± 0.000 |" in text
    assert (tmp_path / "run" / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
