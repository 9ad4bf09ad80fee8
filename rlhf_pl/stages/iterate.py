"""Stage — iterate: InstructGPT's loop, several rounds of collect → reward model → PPO → eval.

``python -m rlhf_pl +stage=iterate [iterate.rounds=2]``; continue a stopped run with
``python -m rlhf_pl +stage=iterate +resume=<its run dir>`` (``iterate.rounds=<more>`` extends it).

Reads top to bottom: the loop's directory (this run's; on ``+resume``, that run's, whose settings
must match) → round 0, the SFT policy (``iterate.sft_from``: run here, or an existing output) → for
r = 1…R: collect K-wise rankings from policy r−1 → the reward model on every ranking gathered so far
(``iterate.initial_comparisons`` too), started from the SFT model or RM r−1 (``iterate.rm_init``) →
PPO from policy r−1 against RM r with the SFT model as the KL reference → eval of the SFT policy and
policies 1…r against the gold labeler → ``rounds.json`` (rewritten after every sub-stage: which data,
models and settings each one used, its metrics), ``rounds.png`` (gold, proxy and KL per round), and
the last eval table printed.

Each sub-stage runs through :func:`rlhf_pl.run.run_stage` in a child process of its own (spawned, so
that no model of one sub-stage is held while the next runs; killed with this process) in
``<run>/round_<r>/<stage>/``. A sub-stage is finished once its ``summary.json`` exists (the last file
a stage writes); a resumed loop never redoes one. An unfinished PPO sub-stage continues from its
checkpoint, any other unfinished one starts again in a clean directory; collected rankings are only
ever written whole (atomically), so none is lost or duplicated. Settings: ``iterate.*``
(:class:`rlhf_pl.config.IterateConfig`) and each sub-stage's own section.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from rlhf_pl.errors import ConfigError, InputError, UserError
from rlhf_pl.io import read_json_or_none, write_json, write_jsonl, write_text
from rlhf_pl.outputs import InputSpec
from rlhf_pl.report import markdown_table, plot_points
from rlhf_pl.run import peak_rss_mib, run_stage
from rlhf_pl.stages import StageResult

log = logging.getLogger(__name__)

USES_LIGHTNING = False  # run_stage runs it without Lightning or torch: its sub-stages hold the models
INPUTS = {"sft": InputSpec("iterate.sft_from", stage="sft", output="model", marker="config.json", required=False)}
OUTPUT_OF = {"sft": "model", "collect": "comparisons", "rm": "reward_model", "ppo": "policy", "eval": "eval"}
ROUNDS_FILE = "rounds.json"
CHECKPOINTS = "checkpoints"  # a stage's training state (rlhf_pl.checkpoint.CHECKPOINT_DIR; that module imports torch)
# keys a resumed loop may be given differently from the run's own config
RESUMABLE_CHANGES = ("resume", "iterate.rounds", "trainer.enable_progress_bar")


class SubStageError(UserError):
    """A sub-stage of the loop stopped on a user error (its message, where to look, how to go on)."""


@dataclass
class SubStage:
    """One finished sub-stage: where it ran, what it read (inputs and settings given by the loop),
    what it wrote, its summary's scalar metrics."""

    round: int
    stage: str
    dir: str
    inputs: dict[str, str]
    settings: dict[str, Any]
    outputs: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> Path:
        return Path(self.outputs[OUTPUT_OF[self.stage]])


# --- the stage ------------------------------------------------------------------------------------


def run(cfg: DictConfig, run_dir: Path, inputs: Any) -> StageResult:
    check_one_process(cfg.trainer)
    root, cfg = loop_root(cfg, run_dir)
    it = cfg.iterate
    ppo_settings = round_ppo_settings(cfg)
    lineage = Lineage(root)
    log.info("iterate: %d round(s) in %s (collect → rm → ppo → eval)%s", it.rounds, root,
             " — resumed" if cfg.resume else "")

    sft = sft_policy(cfg, root, inputs, lineage)
    policy, reward_model = sft, None
    comparisons: list[str] = [str(it.initial_comparisons)] if it.initial_comparisons else []
    last_eval: Optional[SubStage] = None
    for r in range(1, it.rounds + 1):
        step = f"round {r}/{it.rounds}"
        collect = lineage.run(cfg, r, "collect", step, {"policy": policy},
                              {"collect.round": r, "seed": cfg.seed + r,
                               **_budget("collect.num_prompts", it.collect_prompts),
                               **_budget("collect.k", it.collect_k),
                               **_budget("sampler.temperature", it.collect_temperature)})
        comparisons.append(str(collect.output))
        so_far = merge_comparisons(root / f"round_{r}" / "comparisons_so_far.jsonl", comparisons)
        continued = it.rm_init == "previous" and reward_model is not None
        rm_epochs = it.rm_epochs_continued if continued and it.rm_epochs_continued is not None else it.rm_epochs
        rm = lineage.run(cfg, r, "rm", step, {"init": reward_model if continued else sft},
                         {"data.comparisons": str(so_far), "seed": cfg.seed + r, **_budget("rm.epochs", rm_epochs)},
                         data={"comparisons": list(comparisons)})
        reward_model = rm.output
        ppo = lineage.run(cfg, r, "ppo", step, {"policy": policy, "reward_model": reward_model},
                          {"ppo.reference_from": str(sft), "seed": cfg.seed + r,
                           **_budget("ppo.updates", it.ppo_updates),
                           **_budget("sampler.temperature", it.ppo_temperature), **ppo_settings})
        policy = ppo.output
        if it.eval_every_round or r == it.rounds:
            policies = [f"round_{i}={lineage.get(i, 'ppo').output}" for i in range(1, r + 1)]
            last_eval = lineage.run(cfg, r, "eval", step, {"reference": sft, "reward_model": reward_model},
                                    {"eval.policy_from": "none", "eval.extra_policies": policies})

    table = final_report(root, lineage, last_eval)
    print(table, flush=True)  # the headline a user waits for, on stdout whatever the log level
    lineage.memory["orchestrator_peak_rss_mib"] = peak_rss_mib()
    lineage.save()
    metrics = {"rounds": it.rounds, "run": str(root), "memory": lineage.memory,
               **{k: v for k, v in (last_eval.metrics if last_eval else {}).items() if k == "objective"}}
    return StageResult({"policy": policy, "reward_model": reward_model, "rounds": root / ROUNDS_FILE}, metrics)


def check_one_process(trainer: DictConfig) -> None:
    """Refuse data parallel before the loop starts: Lightning starts a stage's other ranks by running the
    command line again (rlhf_pl.distributed), which for a sub-stage would be the whole loop."""
    devices = trainer.devices
    many = (isinstance(devices, int) and devices > 1) or (not isinstance(devices, (int, str)) and len(devices) > 1)
    if many or trainer.num_nodes > 1:
        raise ConfigError(f"+stage=iterate with trainer.devices={devices} trainer.num_nodes={trainer.num_nodes}: "
                          "the loop runs each sub-stage in a process of its own and cannot start data-parallel "
                          "ranks for it; run iterate on one process (e.g. trainer=cpu), or a round's stages one by "
                          "one with python -m rlhf_pl +stage=<collect|rm|ppo|eval> trainer=ddp_cpu")


def round_ppo_settings(cfg: DictConfig) -> dict[str, Any]:
    """``iterate.ppo`` as the PPO sub-stage's overrides (``{"ppo.<key>": value}``), checked before the
    loop starts: an unknown key or a bad value is a ConfigError naming ``iterate.ppo.<key>``."""
    from rlhf_pl.config import validate_config

    given = cfg.iterate.ppo
    settings = {} if given is None else {f"ppo.{k}": v for k, v in _flat(OmegaConf.to_container(given)).items()}
    sub = cfg.copy()
    for key, value in settings.items():
        found = OmegaConf.select(sub, key, default=_MISSING)
        if found is _MISSING or isinstance(found, DictConfig):  # not a setting of ppo (or a whole section)
            valid = ", ".join(sorted(cfg.ppo.keys()))
            raise ConfigError(f"iterate.{key}={value!r}: ppo has no setting {key.removeprefix('ppo.')!r}; "
                              f"valid keys: {valid} (nested ones dotted, e.g. policy_optim.lr)")
        OmegaConf.update(sub, key, value, merge=False)
    try:
        validate_config(sub)
    except ConfigError as err:
        raise ConfigError(f"iterate.ppo (every round's PPO settings): {err}") from None
    return settings


_MISSING = object()


def loop_root(cfg: DictConfig, run_dir: Path) -> tuple[Path, DictConfig]:
    """The loop's directory and config: ``run_dir`` for a new loop; for ``+resume=<dir>``, that
    directory, checked to hold an iterate run whose settings equal these (but RESUMABLE_CHANGES)."""
    if not cfg.get("resume"):
        return run_dir, cfg
    root = Path(str(cfg.resume)).expanduser().resolve()
    saved_path = root / "config.yaml"
    saved = OmegaConf.load(saved_path) if saved_path.is_file() else None
    if saved is None or saved.get("stage") != "iterate" or not (root / ROUNDS_FILE).is_file():
        raise InputError(f"resume={cfg.resume!r}: {root} is not an iterate run (no config.yaml with stage: iterate "
                         f"and {ROUNDS_FILE}); valid: a run directory written by +stage=iterate")
    given = _flat(OmegaConf.to_container(cfg, resolve=True))
    own = _flat(OmegaConf.to_container(saved, resolve=True))
    differ = sorted(k for k in set(given) | set(own)
                    if given.get(k) != own.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if differ:
        shown = "; ".join(f"{k}: run has {own.get(k)!r}, given {given.get(k)!r}" for k in differ[:8])
        raise ConfigError(f"resume={cfg.resume!r}: a resumed loop keeps its own settings, but {len(differ)} differ "
                          f"({shown}); only {', '.join(RESUMABLE_CHANGES[1:])} may change; start a new run instead")
    write_text(saved_path, OmegaConf.to_yaml(cfg, resolve=True))  # iterate.rounds may have changed
    return root, cfg


def sft_policy(cfg: DictConfig, root: Path, inputs: Any, lineage: Lineage) -> Path:
    """Round 0: an existing SFT output (``iterate.sft_from``: a directory, or ``auto`` with one
    recorded), else SFT run here as the loop's first sub-stage."""
    choice = str(cfg.iterate.sft_from)
    found = None if choice == "run" else inputs["sft"]
    if found is not None:
        lineage.note(0, "sft", SubStage(0, "sft", str(found.parent), {}, {"iterate.sft_from": choice},
                                        {"model": str(found)}))
        log.info("round 0: the SFT policy %s (iterate.sft_from=%s)", found, choice)
        return found
    return lineage.run(cfg, 0, "sft", "round 0", {}, {},
                       data={"demonstrations": str(cfg.data.demonstrations)}).output


def merge_comparisons(path: Path, sources: list[str]) -> Path:
    """Every ranking of ``sources`` (files or embedded names) in one JSONL file, in order, each
    source checked by the reward model's data validation first."""
    from rlhf_pl.data.formats import ranking_records

    # a bad source is a clear error naming the file and record, before anything is written
    return write_jsonl(path, [record for source in sources for record in ranking_records(source)])


# --- the lineage: rounds.json and the sub-stages' processes ------------------------------------------------


class Lineage:
    """``rounds.json`` of one loop: per round, the finished sub-stages (:class:`SubStage`); runs the
    missing ones."""

    def __init__(self, root: Path) -> None:
        self.root = root
        saved = read_json_or_none(root / ROUNDS_FILE) or {}
        self.rounds: dict[int, dict[str, SubStage]] = {
            int(r["round"]): {name: SubStage(**entry) for name, entry in r.items() if name != "round"}
            for r in saved.get("rounds", [])}
        self.memory: dict[str, Any] = saved.get("memory", {})
        self.save()

    def get(self, r: int, stage: str) -> SubStage:
        return self.rounds[r][stage]

    def note(self, r: int, stage: str, done: SubStage) -> None:
        self.rounds.setdefault(r, {})[stage] = done
        peaks = [s.metrics.get("peak_rss_mib") or 0 for subs in self.rounds.values() for s in subs.values()]
        self.memory["largest_stage_peak_rss_mib"] = max(peaks, default=0)
        self.save()

    def save(self) -> None:
        rounds = [{"round": r, **{name: asdict(sub) for name, sub in subs.items()}}
                  for r, subs in sorted(self.rounds.items())]
        write_json(self.root / ROUNDS_FILE, {"run": str(self.root), "rounds": rounds, "memory": self.memory})

    def run(self, cfg: DictConfig, r: int, stage: str, step: str, inputs: Mapping[str, Path],
            settings: Mapping[str, Any], data: Optional[Mapping[str, Any]] = None) -> SubStage:
        """Sub-stage ``stage`` of round ``r``: as recorded if it finished, else run in its own process."""
        sub_dir = self.root / f"round_{r}" / stage
        summary = read_json_or_none(sub_dir / "summary.json")
        if summary is None:
            overrides = dict(settings)
            if sub_dir.exists() and stage == "ppo" and (sub_dir / CHECKPOINTS).is_dir():
                overrides["resume"] = str(sub_dir)
                log.info("%s: %s continues from its checkpoint in %s", step, stage, sub_dir)
            elif sub_dir.exists():
                log.info("%s: %s did not finish; starting it again in a clean %s", step, stage, sub_dir)
                shutil.rmtree(sub_dir)
            log.info("%s: %s → %s", step, stage, sub_dir)
            run_in_child(stage_config(cfg, stage, overrides), sub_dir, inputs, f"{step} {stage}", self.root)
            summary = read_json_or_none(sub_dir / "summary.json")
        elif r in self.rounds and stage in self.rounds[r]:
            return self.rounds[r][stage]
        if not cfg.iterate.keep_checkpoints:  # here, not only after a run: a loop killed in between left them
            drop_training_state(sub_dir)
        scalars = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
        scalars.update({k: v for k, v in summary.items() if stage == "eval" and isinstance(v, dict)})
        done = SubStage(r, stage, str(sub_dir), {k: str(v) for k, v in inputs.items()},
                        {**{k: v for k, v in settings.items()}, **(data or {})},
                        {OUTPUT_OF[stage]: summary[f"{OUTPUT_OF[stage]}_dir"]}, scalars)
        self.note(r, stage, done)
        return done


def drop_training_state(sub_dir: Path) -> None:
    """Delete a finished sub-stage's ``checkpoints/`` (weights and optimiser state to continue
    training it: ~1.6 GB per 135M model). The loop never resumes a finished sub-stage; its exported
    model is what later rounds use."""
    checkpoints = sub_dir / CHECKPOINTS
    if checkpoints.is_dir():
        shutil.rmtree(checkpoints)


def stage_config(cfg: DictConfig, stage: str, overrides: Mapping[str, Any]) -> DictConfig:
    """The loop's config as one sub-stage's: ``stage`` set, no resume, ``overrides`` applied."""
    sub = cfg.copy()
    OmegaConf.update(sub, "stage", stage)
    OmegaConf.update(sub, "resume", None)
    for key, value in overrides.items():
        OmegaConf.update(sub, key, value, merge=False)
    return sub


def run_in_child(cfg: DictConfig, sub_dir: Path, inputs: Mapping[str, Path], what: str, root: Path) -> None:
    """``run_stage(cfg, sub_dir, inputs)`` in a child process; raise if it failed: a
    :class:`SubStageError` with the child's message for a user error, RuntimeError for a crash."""
    sub_dir.mkdir(parents=True, exist_ok=True)
    child = _process_context().Process(target=_child_main, name=what,
                                       args=(cfg, sub_dir, {k: Path(v) for k, v in inputs.items()}))
    child.start()
    child.join()
    if child.exitcode == 0:
        return
    error = sub_dir / "error.txt"
    again = f"continue with +resume={root} once it is fixed"
    if child.exitcode == 2 and error.is_file():
        raise SubStageError(f"{what} ({sub_dir}): {error.read_text().strip()}; {again}")
    raise RuntimeError(f"{what} stopped with exit code {child.exitcode} (its log: {sub_dir / 'stage.log'}); {again}")


# Imported once by the fork server, so that a sub-stage starts in a fraction of a second instead of
# the ~8 s these imports take (the loop's own process never imports them). Importing torch starts no
# thread and initialises no CUDA, so forking after it is safe.
PRELOAD = ["rlhf_pl.run", "rlhf_pl.stages.sft", "rlhf_pl.stages.collect", "rlhf_pl.stages.rm",
           "rlhf_pl.stages.ppo", "rlhf_pl.stages.eval"]


def _process_context() -> Any:
    """A fork server with the stages preloaded where the OS has one (Linux, macOS), else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _child_main(cfg: DictConfig, sub_dir: Path, inputs: dict[str, Path]) -> None:
    """Entry point of a sub-stage's process: die with the loop, log to the console and the
    sub-stage's ``stage.log``, run the stage; a user error is written to ``error.txt``, exit 2."""
    _die_with_the_loop()
    handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(sub_dir / "stage.log")]  # as Hydra logs
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format=f"[%(asctime)s][{cfg.stage}][%(name)s][%(levelname)s] - %(message)s")
    try:
        run_stage(cfg, sub_dir, inputs)
    except UserError as err:
        write_text(sub_dir / "error.txt", f"{err}\n")
        logging.getLogger(__name__).error("error: %s", err)
        sys.exit(2)


def _die_with_the_loop() -> None:
    """SIGKILL this process as soon as the loop's process dies: ``kill -9`` of the loop must not
    leave a sub-stage writing into the run directory that a resumed loop then uses. The parent's
    sentinel (a pipe the loop holds open) reaches EOF when it dies, whatever killed it."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-the-loop", daemon=True).start()


# --- report --------------------------------------------------------------------------------------------


def final_report(root: Path, lineage: Lineage, last_eval: Optional[SubStage]) -> str:
    """The rounds table (what every round used and measured) and the last eval's tables, as
    markdown: ``rounds.md``; ``rounds.png``: gold, proxy and KL of each round's policy."""
    rows = []
    for r, subs in sorted(lineage.rounds.items()):
        rm, ppo, collect = subs.get("rm"), subs.get("ppo"), subs.get("collect")
        policy = ppo.output if ppo else subs["sft"].output
        rows.append({"round": r, "rankings": collect.metrics.get("rankings") if collect else "—",
                     "RM held-out accuracy": _fmt(rm.metrics.get("val_accuracy")) if rm else "—",
                     "PPO score gain (first → last quarter)": _fmt(ppo.metrics.get("score_gain")) if ppo else "—",
                     "PPO KL (last update)": _fmt(ppo.metrics.get("final_kl")) if ppo else "—",
                     "policy": str(policy.relative_to(root)) if policy.is_relative_to(root) else str(policy)})
    table = f"## Rounds ({root / ROUNDS_FILE})\n\n{markdown_table(rows)}\n"
    if last_eval is not None:
        table += f"\n{(last_eval.output.parent / 'eval.md').read_text().removeprefix('# Evaluation').strip()}\n"
        plot_rounds(last_eval.output, root / "rounds.png")
    write_text(root / "rounds.md", f"# RLHF rounds\n\n{table}")
    return table


def plot_rounds(eval_json: Path, path: Path) -> Path:
    """Gold (greedy and sampled), proxy (the last reward model) and KL to the SFT policy of the
    policy of each round, from the last eval: round 0 is the SFT policy."""
    policies = json.loads(eval_json.read_text())["policies"]
    xs = list(range(len(policies)))  # sft, round_1, round_2, … in that order
    get = lambda key: [policies[name][key] for name in policies]  # noqa: E731
    panels = {"gold": {"greedy": (xs, get("gold_greedy"), "o-"), "sampled": (xs, get("gold_sampled"), "s-")},
              "proxy": {"sampled (last RM)": (xs, get("proxy_sampled"), "o-")},
              "KL to SFT": {"sampled": (xs, get("kl"), "o-")}}
    return plot_points(panels, path, title="RLHF rounds (round 0: the SFT policy)", xlabel="round")


def _budget(key: str, value: Optional[float]) -> dict[str, float]:
    return {} if value is None else {key: value}


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}
