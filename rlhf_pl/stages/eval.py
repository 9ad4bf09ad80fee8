"""Stage — evaluation against a gold labeler: did the policy get better at what the labeler wants?

``python -m rlhf_pl +stage=eval [eval.prompts=...] [eval.extra_policies=[<dir>,...]] [labeler=rule]``

Reads top to bottom: the reference (the SFT output, ``eval.reference_from``), the proxy reward
model (``eval.reward_from``), the policies (the SFT output, the latest PPO output if there is one,
``eval.extra_policies``) and the gold labeler (the ``labeler`` plugin; it must give scores) →
for each policy on ``eval.num_prompts`` prompts of ``eval.prompts``: a greedy answer and
``eval.samples`` sampled answers per prompt (the ``sampler`` plugin at temperature T) → gold score,
correct rate (prompts that carry an answer), proxy score, KL to the reference (Σ_t log π − log π_ref
per sampled answer at T), length, EOS rate, win rate of the greedy answers against the SFT policy's
(gold judged, ties half) and the gain of their correct rate over the SFT policy's, paired over
prompts → best-of-n from the SFT policy for every n of ``eval.best_of`` (the
proxy-best of n samples; analytic KL log n − (n−1)/n) → Gao et al.'s forms fitted where there are
enough points → ``eval.json``, ``eval.md`` (also to TensorBoard text and the log), ``eval.png``
(gold and proxy score against √KL) and ``answers.jsonl`` (every answer the figures come from).
Settings: :class:`rlhf_pl.config.EvalConfig`.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig

from rlhf_pl import registry
from rlhf_pl.data.chat import tokenize_prompt
from rlhf_pl.data.collate import pad_left
from rlhf_pl.data.formats import Prompt, load_prompts
from rlhf_pl.errors import ConfigError
from rlhf_pl.io import write_json, write_jsonl, write_text
from rlhf_pl.models.generate import GreedySampler, response_logprobs
from rlhf_pl.models.loading import load_model_and_tokenizer
from rlhf_pl.models.reward import RewardModel
from rlhf_pl.outputs import InputSpec, check_input, model_config_at
from rlhf_pl.plugins.labelers import match_answer
from rlhf_pl.precision import build_for_stage, inference_autocast
from rlhf_pl.report import markdown_table, plot_points
from rlhf_pl.rl.eval_metrics import GaoFit, best_of_n, best_of_n_kl, fit_gao, paired_gain, pairwise_agreement, win_rate
from rlhf_pl.rl.kl import sequence_kl
from rlhf_pl.sampling import build_backend, model_device, sample, sample_texts
from rlhf_pl.stages import StageResult

log = logging.getLogger(__name__)

INPUTS = {
    "reference": InputSpec("eval.reference_from", stage="sft", output="model", marker="config.json"),
    "reward_model": InputSpec("eval.reward_from", stage="rm", output="reward_model", marker="reward_config.json"),
    "policy": InputSpec("eval.policy_from", stage="ppo", output="policy", marker="config.json", required=False),
}


@dataclass
class Answers:
    """One policy's answers to the P prompts: greedy (one per prompt) and sampled (n per prompt)."""

    greedy: list[str]
    sampled: list[list[str]]
    proxy_greedy: list[float]
    proxy_sampled: list[list[float]]
    kl: list[list[float]]  # Σ_t log π(y_t) − log π_ref(y_t) per sampled answer, at the sampling temperature
    length: list[list[int]]
    ended: list[list[bool]]


class GreedyScores(NamedTuple):
    """Per prompt: the gold score of a policy's greedy answer, and 1.0/0.0 whether it is correct
    (None where the prompt carries no answer). Each a list of P."""

    gold: list[float]
    correct: list[float | None]


@dataclass
class PolicyMetrics:
    """What ``eval.json`` reports for one policy (means over prompts and their answers)."""

    path: str
    gold_greedy: float
    gold_sampled: float
    correct_greedy: float | None  # over the prompts that carry an answer; None without any
    correct_sampled: float | None
    proxy_greedy: float
    proxy_sampled: float
    kl: float
    sqrt_kl: float
    length: float
    eos_rate: float
    win_rate_vs_sft: float
    correct_greedy_ci: float | None = None  # half-width of the 95% interval over prompts (normal approximation)
    # greedy correct rate minus the SFT policy's, paired over the same prompts, and its 95% half-width (None for SFT)
    correct_greedy_gain: float | None = None
    correct_greedy_gain_ci: float | None = None
    # eval.group_by key -> its value -> the greedy figures of the prompts with that value
    by_group: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)


# --- answers ----------------------------------------------------------------------------------


@torch.no_grad()
def sampled_answers(model: Any, reference: Any, tokenizer: Any, prompt_ids: list[list[int]], n: int, sampler: Any,
                    cfg: DictConfig, scorer: Any, backend: Any = None) -> tuple[list[list[str]], list[list[float]],
                                                                            list[list[float]], list[list[int]],
                                                                            list[list[bool]]]:
    """``n`` sampled answers per prompt (one prefill per prompt), with their proxy scores, their KL to
    ``reference`` (Σ over the answer's tokens of log π − log π_ref at the sampler's temperature),
    token counts and whether they ended. Each result: P lists of n."""
    e, temperature, device = cfg.eval, sampler.temperature, model_device(model)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out: tuple[list, ...] = ([], [], [], [], [])
    per_batch = max(1, e.batch_size // n)
    started = time.perf_counter()
    for start in range(0, len(prompt_ids), per_batch):
        ids, mask = pad_left(prompt_ids[start:start + per_batch], tokenizer.pad_token_id)
        c = sample(model, ids.to(device), mask.to(device), sampler, e.max_new_tokens, tokenizer, generator=generator,
                   scorer=scorer, num_samples=n, backend=backend)
        columns = (c.texts(tokenizer), c.scores.rewards.float().tolist(), answer_kl(model, reference, c, temperature),
                   c.mask.sum(1).tolist(), c.ended.tolist())
        for target, values in zip(out, columns):
            target.extend(values[i:i + n] for i in range(0, len(values), n))
        done = min(start + per_batch, len(prompt_ids))
        log.info("sampled answers: %d/%d prompts × %d, %.0f s", done, len(prompt_ids), n, time.perf_counter() - started)
    return out  # type: ignore[return-value]


def answer_kl(model: Any, reference: Any, c: Any, temperature: float) -> list[float]:
    """Σ over each answer's tokens of log π − log π_ref (k1) for the b rows of completions ``c``; the SFT
    policy against itself is 0 without a logprob pass. Shape: -> b floats."""
    if reference is model:
        return [0.0] * c.sequences.shape[0]
    own = response_logprobs(model, c.sequences, c.attention_mask, c.prompt_length, temperature)
    ref = response_logprobs(reference, c.sequences, c.attention_mask, c.prompt_length, temperature)
    return sequence_kl(own, ref, c.mask).tolist()


def answers_of(model: Any, reference: Any, tokenizer: Any, prompt_ids: list[list[int]], n: int, sampler: Any,
               cfg: DictConfig, scorer: Any, backend: Any = None) -> Answers:
    """Greedy and sampled answers of one policy, scored by the proxy reward model; ``backend``: the
    generation backend (None: hf)."""
    greedy = sample_texts(model, tokenizer, prompt_ids, 1, GreedySampler(), cfg.eval.max_new_tokens,
                          batch_size=cfg.eval.batch_size, scorer=scorer, progress="greedy answers", backend=backend)
    texts, proxy, kl, length, ended = sampled_answers(model, reference, tokenizer, prompt_ids, n, sampler, cfg, scorer,
                                                      backend)
    return Answers([g[0].text for g in greedy], texts, [g[0].reward for g in greedy], proxy, kl, length, ended)


# --- metrics ----------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def answer_correct(prompt: Prompt, text: str) -> float | None:
    """1.0 or 0.0: does ``text`` give the prompt's ``answer`` (the rule labeler's answer matching);
    None where the prompt carries no answer."""
    if prompt.meta.get("answer") is None:
        return None
    return float(match_answer(str(prompt.meta["answer"]), text).correct)


def correct_rate(prompts: list[Prompt], answers: list[list[str]]) -> float | None:
    """Fraction of correct answers over the prompts that carry an ``answer``; None when none does."""
    rated = [c for p, texts in zip(prompts, answers) for text in texts if (c := answer_correct(p, text)) is not None]
    return _mean(rated) if rated else None


def interval_95(successes: list[float]) -> float | None:
    """Half-width of the normal-approximation 95% interval of a rate over ``successes`` (0/1 per
    prompt): 1.96 · √(p(1 − p)/n); None for no prompt."""
    if not successes:
        return None
    p = _mean(successes)
    return 1.96 * math.sqrt(p * (1 - p) / len(successes))


def greedy_correct(prompts: list[Prompt], greedy: list[str]) -> list[float | None]:
    """:func:`answer_correct` of each prompt's greedy answer. Shape: P texts -> P entries."""
    return [answer_correct(p, t) for p, t in zip(prompts, greedy)]


def greedy_figures(correct: list[float | None], gold_greedy: list[float],
                   base: list[float | None] | None = None) -> dict[str, Any]:
    """Gold score and correct rate (with its 95% interval) of greedy answers, from their per-prompt
    :func:`greedy_correct` and gold scores; with ``base`` (the SFT policy's :func:`greedy_correct`
    on the same prompts) also the gain over it, paired over prompts, with its 95% interval."""
    rated = [c for c in correct if c is not None]
    figures = {"prompts": len(correct), "gold_greedy": _mean(gold_greedy),
               "correct_greedy": _mean(rated) if rated else None, "correct_greedy_ci": interval_95(rated)}
    if base is not None:
        gain = paired_gain(rated, [b for b in base if b is not None]) if rated else None  # same prompts carry answers
        figures["correct_greedy_gain"] = gain.mean if gain else None
        figures["correct_greedy_gain_ci"] = gain.ci if gain else None
    return figures


def group_figures(prompts: list[Prompt], correct: list[float | None], gold_greedy: list[float], key: str,
                  base: list[float | None] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`greedy_figures` per value of the prompts' ``key`` (e.g. phrasing: template | paraphrase);
    prompts without the key are left out ({} if none has it)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        if p.meta.get(key) is not None:
            groups.setdefault(str(p.meta[key]), []).append(i)
    pick = lambda values, rows: None if values is None else [values[i] for i in rows]  # noqa: E731
    return {value: greedy_figures(pick(correct, rows), pick(gold_greedy, rows), pick(base, rows))
            for value, rows in sorted(groups.items())}


def policy_metrics(path: str, prompts: list[Prompt], a: Answers, gold: Any, sft: GreedyScores | None,
                   n: int, group_by: Sequence[str] = ()) -> tuple[PolicyMetrics, GreedyScores]:
    """The metrics of one policy's answers (its first ``n`` samples per prompt), against the SFT
    policy's greedy ones (``sft``; None: this is the SFT policy), and its own greedy scores."""
    gold_greedy = [gold.score(p, t) for p, t in zip(prompts, a.greedy)]
    gold_sampled = [gold.score(p, t) for p, texts in zip(prompts, a.sampled) for t in texts[:n]]
    kl = _mean([v for row in a.kl for v in row[:n]])
    correct = greedy_correct(prompts, a.greedy)
    base = sft.correct if sft is not None else None
    greedy = greedy_figures(correct, gold_greedy, base)
    return PolicyMetrics(
        path=path, gold_greedy=greedy["gold_greedy"], gold_sampled=_mean(gold_sampled),
        correct_greedy=greedy["correct_greedy"],
        correct_sampled=correct_rate(prompts, [texts[:n] for texts in a.sampled]),
        proxy_greedy=_mean(a.proxy_greedy), proxy_sampled=_mean([v for row in a.proxy_sampled for v in row[:n]]),
        kl=kl, sqrt_kl=math.sqrt(max(kl, 0.0)), length=_mean([float(v) for row in a.length for v in row[:n]]),
        eos_rate=_mean([float(v) for row in a.ended for v in row[:n]]),
        win_rate_vs_sft=win_rate(gold_greedy, sft.gold) if sft is not None else 0.5,
        correct_greedy_ci=greedy["correct_greedy_ci"],
        correct_greedy_gain=greedy.get("correct_greedy_gain"),
        correct_greedy_gain_ci=greedy.get("correct_greedy_gain_ci"),
        by_group={key: found for key in group_by if (found := group_figures(prompts, correct, gold_greedy, key, base))},
    ), GreedyScores(gold_greedy, correct)


def best_of_n_table(prompts: list[Prompt], a: Answers, gold_scores: list[list[float]],
                    ns: list[int]) -> list[dict[str, float | None]]:
    """Gold score (``gold_scores``: of every sampled answer), correct rate (over the prompts that
    carry an answer) and proxy score of the proxy-best of n SFT samples, and its analytic KL, for each n."""
    keyed = [(p, proxy, texts) for p, proxy, texts in zip(prompts, a.proxy_sampled, a.sampled)
             if p.meta.get("answer") is not None]
    correct = [[answer_correct(p, t) for t in texts] for p, _, texts in keyed]
    return [{"n": n, "kl": best_of_n_kl(n), "sqrt_kl": math.sqrt(best_of_n_kl(n)),
             "gold": best_of_n(a.proxy_sampled, gold_scores, n),
             "correct": best_of_n([proxy for _, proxy, _ in keyed], correct, n) if keyed else None,
             "proxy": best_of_n(a.proxy_sampled, a.proxy_sampled, n)} for n in ns]


def proxy_agreement(a: Answers, gold_scores: list[list[float]]) -> dict[str, Any]:
    """The proxy reward model's pairwise accuracy against the gold labeler (``gold_scores`` of every
    sampled answer) on the SFT policy's own sampled answers to held-out prompts
    (:func:`rlhf_pl.rl.eval_metrics.pairwise_agreement`)."""
    accuracy, pairs = pairwise_agreement(a.proxy_sampled, gold_scores)
    return {"accuracy": accuracy if pairs else None, "pairs": pairs}


def gao_fits(bon: list[dict[str, float]], policies: dict[str, PolicyMetrics]) -> dict[str, Any]:
    """Gao et al.'s forms of the gold gain over the SFT policy against d = √KL: d(α − βd) through the
    best-of-n points, d(α − β log d) through the RL policies' points (None where too few)."""
    base = policies["sft"].gold_sampled
    bon_fit = fit_gao([r["sqrt_kl"] for r in bon], [r["gold"] - bon[0]["gold"] for r in bon], "bon")
    rl = [m for name, m in policies.items() if name != "sft"]
    rl_fit = fit_gao([m.sqrt_kl for m in rl], [m.gold_sampled - base for m in rl], "rl")
    return {"best_of_n_gold": bon_fit._asdict() if bon_fit else None, "rl_gold": rl_fit._asdict() if rl_fit else None}


def answer_records(prompts: list[Prompt], answers: dict[str, Answers], greedy: dict[str, GreedyScores],
                   n: int) -> list[dict[str, Any]]:
    """``answers.jsonl``, a record per prompt: its messages, origin and meta (answer key, phrasing),
    and per policy the greedy answer with its gold score and correctness, and the first ``n``
    sampled answers: what the tables are computed from, to read or to recompute them."""
    return [{"messages": [m.to_dict() for m in p.messages], "origin": p.origin,
             "meta": p.meta,
             "policies": {name: {"greedy": a.greedy[i], "gold_greedy": greedy[name].gold[i],
                                 "correct_greedy": greedy[name].correct[i], "sampled": a.sampled[i][:n]}
                          for name, a in answers.items()}}
            for i, p in enumerate(prompts)]


# --- the stage --------------------------------------------------------------------------------


def policy_dirs(cfg: DictConfig, inputs: Any) -> dict[str, Path]:
    """Name -> model directory: ``sft`` (the reference), ``ppo`` (the latest PPO output, if any,
    unless ``eval.policy_from=none``), then each of ``eval.extra_policies``: ``<name>=<dir>``, or a
    directory named after its run directory."""
    dirs = {"sft": inputs["reference"]}
    if cfg.eval.policy_from != "none" and inputs["policy"] is not None:
        dirs["ppo"] = inputs["policy"]
    for i, extra in enumerate(cfg.eval.extra_policies):
        name, sep, where = str(extra).partition("=")
        where = where if sep else name
        path = check_input(INPUTS["policy"], Path(where).expanduser(), f"eval.extra_policies[{i}]={extra!r}")
        name = name if sep else f"{path.parent.name}/{path.name}"
        if name in dirs:
            raise ConfigError(f"eval.extra_policies[{i}]={extra!r}: a policy named {name!r} is already evaluated "
                              f"({', '.join(dirs)}); name it: <name>=<dir>")
        dirs[name] = path
    return dirs


def run(cfg: DictConfig, run_dir: Path, inputs: Any) -> StageResult:
    e = cfg.eval
    precision = build_for_stage(cfg, "eval", frozen=("policy", "reference", "reward model"))
    if cfg.labeler is None:
        raise ConfigError("labeler is unset; eval judges answers with a gold labeler: labeler=rule")
    gold = registry.build("labelers", cfg.labeler)
    prompts = load_prompts(e.prompts, split=cfg.data.split, limit=e.num_prompts)
    dirs = policy_dirs(cfg, inputs)
    ns = sorted(set(e.best_of))
    pool = max([e.samples, *ns])  # the SFT policy's samples serve its own metrics and best-of-n
    log.info("eval: %d prompts of %s; policies %s; %d samples each (SFT: %d for best-of-n up to %d)",
             len(prompts), e.prompts, ", ".join(dirs), e.samples, pool, max(ns))

    reference, tokenizer, _ = load_model_and_tokenizer(model_config_at(cfg.model, dirs["sft"]))
    reference = precision.prepare_frozen(reference.eval())
    reward_model = precision.prepare_frozen(RewardModel.from_pretrained(inputs["reward_model"]))
    device = model_device(reference)
    reward_model.to(device)
    prompt_ids = [tokenize_prompt(tokenizer, p.messages)[-cfg.data.max_prompt_length:] for p in prompts]
    sampler = registry.build("samplers", cfg.sampler)
    metrics: dict[str, PolicyMetrics] = {}
    answers: dict[str, Answers] = {}
    greedy: dict[str, GreedyScores] = {}
    bon: list[dict[str, float]] = []
    agreement: dict[str, Any] = {"accuracy": None, "pairs": 0}
    backend = build_backend(cfg)
    with inference_autocast(precision, device):
        for name, path in dirs.items():
            if name == "sft":
                model = reference
            else:
                model = precision.prepare_frozen(load_model_and_tokenizer(model_config_at(cfg.model, path))[0].eval())
                model.to(device)
            answers[name] = answers_of(model, reference, tokenizer, prompt_ids, pool if name == "sft" else e.samples,
                                       sampler, cfg, reward_model, backend)
            metrics[name], greedy[name] = policy_metrics(str(path), prompts, answers[name], gold, greedy.get("sft"),
                                                         e.samples, e.group_by)
            if name == "sft":
                pool_gold = [[gold.score(p, t) for t in texts] for p, texts in zip(prompts, answers[name].sampled)]
                bon = best_of_n_table(prompts, answers[name], pool_gold, ns)
                agreement = proxy_agreement(answers[name], pool_gold)
            del model
    fits = gao_fits(bon, metrics)
    result = {"prompts": len(prompts), "source": e.prompts, "samples": e.samples, "temperature": sampler.temperature,
              "policies": {name: asdict(m) for name, m in metrics.items()}, "best_of_n": bon, "fits": fits,
              "proxy_agreement": agreement}
    write_json(run_dir / "eval.json", result)
    write_jsonl(run_dir / "answers.jsonl", answer_records(prompts, answers, greedy, e.samples))
    table = write_report(run_dir, metrics, bon, fits, e.group_by, agreement)
    log.info("eval table:\n%s", table)
    last = metrics[list(metrics)[-1]]
    return StageResult({"eval": run_dir / "eval.json"}, {
        "objective": -last.gold_greedy, "gold_greedy": {n: m.gold_greedy for n, m in metrics.items()},
        "correct_greedy": {n: m.correct_greedy for n, m in metrics.items()},
        "correct_greedy_ci": {n: m.correct_greedy_ci for n, m in metrics.items()},
        "correct_greedy_gain": {n: m.correct_greedy_gain for n, m in metrics.items() if n != "sft"},
        "correct_greedy_gain_ci": {n: m.correct_greedy_gain_ci for n, m in metrics.items() if n != "sft"},
        "correct_greedy_by_group": {n: {key: {g: v["correct_greedy"] for g, v in groups.items()}
                                        for key, groups in m.by_group.items()} for n, m in metrics.items()},
        "win_rate_vs_sft": {n: m.win_rate_vs_sft for n, m in metrics.items()},
        "kl": {n: m.kl for n, m in metrics.items()}, "best_of_n_gold": {int(r["n"]): r["gold"] for r in bon},
        "proxy_agreement": agreement["accuracy"]})


def write_report(run_dir: Path, metrics: dict[str, PolicyMetrics], bon: list[dict[str, float]],
                 fits: dict[str, Any], group_by: Sequence[str] = (), agreement: dict[str, Any] | None = None) -> str:
    """``eval.md`` (policies and best-of-n tables), TensorBoard text, and ``eval.png``."""
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    pm = lambda v, ci: "—" if v is None else f"{v:.3f} ± {ci:.3f}" if ci is not None else f"{v:.3f}"  # noqa: E731
    signed = lambda v, ci: "—" if v is None else f"{v:+.3f} ± {ci:.3f}" if ci is not None else f"{v:+.3f}"  # noqa: E731
    rows = [{"policy": name, "gold (greedy)": fmt(m.gold_greedy),
             "correct (greedy)": pm(m.correct_greedy, m.correct_greedy_ci),
             "gain over SFT (greedy, paired)": signed(m.correct_greedy_gain, m.correct_greedy_gain_ci),
             "gold (sampled)": fmt(m.gold_sampled), "correct (sampled)": fmt(m.correct_sampled),
             "proxy (sampled)": fmt(m.proxy_sampled), "KL": fmt(m.kl), "win vs SFT": fmt(m.win_rate_vs_sft),
             "length": f"{m.length:.1f}", "EOS": fmt(m.eos_rate)} for name, m in metrics.items()]
    bon_rows = [{"n": int(r["n"]), "KL": fmt(r["kl"]), "gold": fmt(r["gold"]), "correct": fmt(r.get("correct")),
                 "proxy": fmt(r["proxy"])} for r in bon]

    def group_cell(figures: dict[str, Any]) -> str:  # "rate ± ci (gain ± ci)", the gain for policies other than SFT
        cell = pm(figures["correct_greedy"], figures["correct_greedy_ci"])
        if figures.get("correct_greedy_gain") is None:
            return cell
        return f"{cell} ({signed(figures['correct_greedy_gain'], figures['correct_greedy_gain_ci'])})"

    def group_table(key: str) -> str:  # a row per value of the key, a column per policy
        # every policy answered the same prompts, so each has the same values and counts as the first
        first = next(iter(metrics.values())).by_group.get(key)
        if not first:
            return ""
        rows = [{key: f"{g} (n = {figures['prompts']})",
                 **{name: group_cell(m.by_group[key][g]) for name, m in metrics.items()}}
                for g, figures in first.items()]
        return (f"## Correct rate of greedy answers by {key} (n prompts each; ± 95% interval over prompts; in brackets "
                f"the gain over SFT, paired over prompts)\n\n{markdown_table(rows)}\n\n")

    by_group = "".join(group_table(key) for key in group_by)
    agrees = (f"The proxy reward model orders {agreement['pairs']} pairs of the SFT policy's sampled answers as the "
              f"gold labeler does {fmt(agreement['accuracy'])} of the time (0.5: chance).\n\n"
              if agreement and agreement["pairs"] else "")
    table = (f"## Policies\n\n{markdown_table(rows)}\n\n{by_group}## Best-of-n from the SFT policy\n\n"
             f"{agrees}{markdown_table(bon_rows)}\n")
    write_text(run_dir / "eval.md", f"# Evaluation\n\n{table}")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        writer.add_text("eval/table", table)
    bon_d = [r["sqrt_kl"] for r in bon]
    panels: dict[str, dict[str, tuple[list[float], list[float], str]]] = {"gold": {}, "proxy": {}}
    panels["gold"]["best-of-n (SFT)"] = (bon_d, [r["gold"] for r in bon], "o-")
    panels["proxy"]["best-of-n (SFT)"] = (bon_d, [r["proxy"] for r in bon], "o-")
    for name, m in metrics.items():
        panels["gold"][name] = ([m.sqrt_kl], [m.gold_sampled], "s")
        panels["proxy"][name] = ([m.sqrt_kl], [m.proxy_sampled], "s")
    if fits["best_of_n_gold"] is not None:
        fit = GaoFit(**fits["best_of_n_gold"])
        xs = [max(bon_d) * i / 40 for i in range(41)]
        panels["gold"]["fit d(α − βd)"] = (xs, [bon[0]["gold"] + fit.gain(x) for x in xs], "--")
    plot_points(panels, run_dir / "eval.png", title="gold and proxy score against √KL", xlabel="√KL (nats^½)")
    return table
