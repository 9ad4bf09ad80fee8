"""The headline table of one or more iterate runs (e.g. seeds of a sweep): per run, the greedy
correct rate of the SFT policy and of each round's policy on the held-out prompts (per phrasing),
each round's gain over SFT with its 95% interval (paired over prompts), the gain of best-of-16
over the SFT policy's samples, each round's reward-model accuracy, KL and wall time; then the mean
over runs.

Usage::

    python -m rlhf_pl -m +stage=iterate seed=0,1,2          # three seeds, into outputs/multirun/<time>/
    python tools/summarise_rounds.py outputs/multirun/<time>/*  # one row per run, then the mean
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def loop_dir(path: Path) -> Path:
    """The iterate run directory: ``path`` itself, or the run a resumed one continued."""
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    root = Path(summary.get("run", path))
    if not (root / "rounds.json").is_file():
        raise SystemExit(f"error: {path}: no rounds.json (not an iterate run directory)")
    return root


def row_of(root: Path) -> dict[str, Any]:
    """One run's figures: from its rounds.json and its last eval.json."""
    rounds = {r["round"]: r for r in json.loads((root / "rounds.json").read_text())["rounds"]}
    last = max(r for r, subs in rounds.items() if "eval" in subs)
    report = json.loads(Path(rounds[last]["eval"]["outputs"]["eval"]).read_text())
    policies, bon = report["policies"], {int(b["n"]): b for b in report["best_of_n"]}
    row: dict[str, Any] = {"run": root.name, "seed": _seed(root)}
    for name, m in sorted(policies.items(), key=lambda item: _policy_order(item[0])):
        row[f"{name} correct"] = m["correct_greedy"]
        for group, g in phrasings(m.get("by_group", {})).items():
            row[f"{name} correct ({group})"] = g["correct_greedy"]
        if name != "sft":
            if m.get("correct_greedy_gain") is not None:  # paired over prompts: the interval the targets are read from
                row[f"{name} gain over SFT"] = m["correct_greedy_gain"]
                row[f"{name} gain ±95%"] = m.get("correct_greedy_gain_ci")
            row[f"{name} KL"] = m["kl"]
    if 16 in bon:  # over the SFT policy's sampled answers, what best-of-16 adds
        sft = policies["sft"]
        row["best-of-16 correct gain"] = (bon[16]["correct"] - sft["correct_sampled"]
                                          if bon[16].get("correct") is not None else None)
        row["best-of-16 gold gain"] = bon[16]["gold"] - sft["gold_sampled"]
    if report.get("proxy_agreement"):
        row["last RM agreement with gold"] = report["proxy_agreement"]["accuracy"]
    for r, subs in sorted(rounds.items()):
        if "rm" in subs:
            row[f"RM {r} accuracy"] = subs["rm"]["metrics"].get("val_accuracy")
    row["minutes"] = sum(s["metrics"].get("wall_time_s", 0) for subs in rounds.values()
                         for k, s in subs.items() if k != "round") / 60
    return {k: v for k, v in row.items() if v is not None}


def phrasings(by_group: dict[str, Any]) -> dict[str, Any]:
    """The figures per phrasing (template | paraphrase) of a policy's ``by_group``: keyed by eval.group_by key
    (``{"phrasing": {value: figures}, "task": …}``), or by phrasing alone as eval.json had it before 2026-12-07."""
    if all(isinstance(v, dict) and "correct_greedy" in v for v in by_group.values()):
        return by_group
    return by_group.get("phrasing", {})


def _policy_order(name: str) -> tuple[int, int, str]:
    """SFT first, then round_1, round_2, … by number (eval.json's keys are sorted as text), then others."""
    if name == "sft":
        return (0, 0, name)
    number = name.removeprefix("round_")
    return (1, int(number), name) if number.isdigit() else (2, 0, name)


def _seed(root: Path) -> Any:
    from omegaconf import OmegaConf

    config = root / "config.yaml"
    return OmegaConf.load(config).get("seed") if config.is_file() else None


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per run, then the mean (± the standard deviation over runs)."""
    from rlhf_pl.report import markdown_table

    keys = list(dict.fromkeys(k for row in rows for k in row))
    numeric = [k for k in keys if k not in ("run", "seed") and all(isinstance(r.get(k), (int, float)) for r in rows)]
    shown = [{k: (f"{r[k]:.3f}" if isinstance(r.get(k), float) else r.get(k, "—")) for k in keys} for r in rows]
    if len(rows) > 1:
        mean = {"run": "mean ± sd", "seed": "—"}
        for k in numeric:
            values = [float(r[k]) for r in rows]
            mean[k] = f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
        shown.append(mean)
    return markdown_table(shown)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="iterate run directories (or sweep job directories)")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.runs if not path.is_dir()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)}: not a directory (give iterate run directories)")
    rows = [row_of(loop_dir(path)) for path in args.runs]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
