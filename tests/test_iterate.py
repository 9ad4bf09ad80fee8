"""The iterate stage: rounds of collect → RM → PPO → eval, their lineage, and resuming after kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from process_helpers import wait_for

from rlhf_pl.data.formats import DataError
from rlhf_pl.errors import ConfigError, InputError
from rlhf_pl.stages import iterate

REPO = Path(__file__).resolve().parent.parent
SUB_STAGES = ("collect", "rm", "ppo", "eval")
# a small loop: 2 rounds of the quick experiment on 48 prompts; PPO checkpoints every 2 of 8 updates; the
# loop's own collect and RM budgets (iterate.collect_k, iterate.rm_epochs[_continued]) replace collect.k and rm.epochs,
# and PPO samples at iterate.ppo_temperature
LOOP = ["+stage=iterate", "experiment=quick", "iterate.rounds=2", "data.limit=48", "ppo.updates=8",
        "ppo.checkpoint_every=2", "eval.num_prompts=8", "eval.best_of=[1,2,4]", "trainer.enable_progress_bar=false",
        "iterate.collect_k=3", "collect.k=5", "iterate.rm_epochs=2", "iterate.ppo_temperature=0.9"]


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited: only its parent's wait is missing


def _start(tmp_path: Path, name: str, *extra: str) -> subprocess.Popen:
    """The loop, its output in files (a pipe nobody reads would fill and block it)."""
    args = [sys.executable, "-m", "rlhf_pl", *LOOP, f"paths.output_root={tmp_path / 'out'}",
            f"hydra.run.dir={tmp_path / name}", *extra]
    with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
        return subprocess.Popen(args, cwd=tmp_path, stdout=out, stderr=err, env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def _kill_when(proc: subprocess.Popen, marker: Path, sub_dir: Path) -> None:
    """kill -9 the loop once ``marker`` exists; its sub-stage's process must die with it, unfinished."""
    wait_for(marker.exists, 300, str(marker), proc)
    children = _descendants(proc.pid)
    assert children, "the sub-stage runs in a child process"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    deadline = time.monotonic() + 30
    while any(map(_alive, children)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, children)), "a sub-stage outlived the killed loop"
    assert not (sub_dir / "summary.json").exists(), f"{sub_dir.name} finished before the kill: the test proves nothing"


def test_two_rounds_killed_in_every_sub_stage_resume_without_redoing_or_losing_anything(tmp_path):
    run = tmp_path / "run"
    kills = [(run / "round_0" / "sft" / "config.yaml", run / "round_0" / "sft")]
    kills += [(run / "round_1" / s / ("checkpoints/last.pt" if s == "ppo" else "config.yaml"), run / "round_1" / s)
              for s in SUB_STAGES]
    finished: dict[Path, float] = {}
    for i, (marker, sub_dir) in enumerate(kills):
        proc = _start(tmp_path, "run") if i == 0 else _start(tmp_path, f"resume_{i}", f"+resume={run}")
        _kill_when(proc, marker, sub_dir)
        for summary in run.glob("round_*/*/summary.json"):
            finished.setdefault(summary, summary.stat().st_mtime_ns)
    proc = _start(tmp_path, "resume_last", f"+resume={run}")
    proc.wait(600)
    out, err = (tmp_path / "resume_last.out").read_text(), (tmp_path / "resume_last.err").read_text()
    assert proc.returncode == 0, err[-4000:]

    for summary, mtime in finished.items():  # finished sub-stages were never run again
        assert summary.stat().st_mtime_ns == mtime, summary
    rounds = json.loads((run / "rounds.json").read_text())
    by_round = {r["round"]: r for r in rounds["rounds"]}
    assert sorted(by_round) == [0, 1, 2] and list(by_round[0]) == ["round", "sft"]
    assert all(set(by_round[r]) == {"round", *SUB_STAGES} for r in (1, 2))
    sft = by_round[0]["sft"]["outputs"]["model"]
    policy_1 = by_round[1]["ppo"]["outputs"]["policy"]
    # lineage: round 2 collects from and starts PPO at policy 1; the reference is always the SFT model
    assert by_round[1]["collect"]["inputs"] == {"policy": sft}
    assert by_round[2]["collect"]["inputs"] == {"policy": policy_1}
    assert by_round[2]["ppo"]["inputs"]["policy"] == policy_1
    assert all(by_round[r]["ppo"]["settings"]["ppo.reference_from"] == sft for r in (1, 2))
    summary_1 = json.loads((run / "round_1" / "ppo" / "summary.json").read_text())
    assert summary_1["resumed_from"] == str(run / "round_1" / "ppo") and summary_1["updates"] == 8
    # every round's PPO runs with iterate.ppo's settings (experiment=quick keeps them, at its own learning rate)
    for r in (1, 2):
        settings = by_round[r]["ppo"]["settings"]
        assert (settings["ppo.critic"], settings["ppo.samples_per_prompt"], settings["ppo.score_baseline"],
                settings["ppo.batch_size"], settings["ppo.policy_optim.lr"]) == ("none", 4, "group", 8, 1e-4)
        # PPO rolls out at iterate.ppo_temperature; eval keeps sampler.temperature
        assert settings["sampler.temperature"] == 0.9
        assert OmegaConf.load(run / f"round_{r}" / "ppo" / "config.yaml").sampler.temperature == 0.9
        rows = json.loads((run / f"round_{r}" / "ppo" / "summary.json").read_text())["rows_forwarded"]
        assert "critic_rollout" not in rows and "critic_train" not in rows
        if r == 2:  # not interrupted: updates × prompts × answers
            assert rows["reward"] == 8 * 8 * 4
    assert summary_1["reference_from"] == sft and summary_1["policy_from"] == sft

    # every ranking kept once: round 2's reward model reads round 1's and round 2's, in order
    files = [by_round[r]["collect"]["outputs"]["comparisons"] for r in (1, 2)]
    assert by_round[2]["rm"]["settings"]["comparisons"] == files
    lines = [Path(f).read_text().splitlines() for f in files]
    assert (run / "round_2" / "comparisons_so_far.jsonl").read_text().splitlines() == lines[0] + lines[1]
    for r, rows in zip((1, 2), lines):
        records = [json.loads(line) for line in rows]
        assert len(records) == by_round[r]["collect"]["metrics"]["rankings"]
        assert len({rec["provenance"]["source"] for rec in records}) == len(records)
        assert {rec["provenance"]["round"] for rec in records} == {r}
        assert {len(rec["completions"]) for rec in records} <= {2, 3}  # iterate.collect_k=3, not collect.k=5
        # round 1's reward model starts from the SFT model for iterate.rm_epochs=2 passes; round 2's continues it
        # (iterate.rm_init=previous) for iterate.rm_epochs_continued=1 pass over both rounds' rankings
        passes, init = (2, sft) if r == 1 else (1, by_round[1]["rm"]["outputs"]["reward_model"])
        assert by_round[r]["collect"]["settings"]["collect.k"] == 3
        assert by_round[r]["rm"]["settings"]["rm.epochs"] == passes and by_round[r]["rm"]["inputs"] == {"init": init}
        rm = by_round[r]["rm"]["metrics"]
        assert rm["steps"] == passes * -(-rm["train_prompts"] // 8)  # passes of batches of 8 prompts (quick's rm)
        assert rm["init_from"] == (init if r == 1 else f"reward model {init}")

    assert set(by_round[2]["eval"]["metrics"]["gold_greedy"]) == {"sft", "round_1", "round_2"}
    assert OmegaConf.load(run / "round_2" / "eval" / "config.yaml").sampler.temperature == 0.7
    assert (run / "rounds.png").stat().st_size > 0 and "| round |" in (run / "rounds.md").read_text()
    # the rounds table shows the gain of PPO's own score (every baseline measures it; group: no reference score)
    gain_2 = json.loads((run / "round_2" / "ppo" / "summary.json").read_text())["score_gain"]
    assert f"| 2 | {by_round[2]['collect']['metrics']['rankings']} |" in out and f"| {gain_2:.3f} |" in out
    assert "## Rounds" in out and "## Policies" in out and "round_2" in out
    # round 1's PPO continued from its checkpoint; once finished, no sub-stage keeps its training state
    assert not list(run.glob("round_*/*/checkpoints")) and (run / "round_1" / "ppo" / "policy").is_dir()
    memory = rounds["memory"]  # the loop's own process holds no model
    stage_peaks = [s["metrics"]["peak_rss_mib"] for r in by_round.values() for k, s in r.items() if k != "round"]
    assert memory["orchestrator_peak_rss_mib"] < min(stage_peaks)
    assert memory["largest_stage_peak_rss_mib"] == max(stage_peaks)


def _saved_loop(tmp_path: Path, **changes) -> Path:
    from rlhf_pl.config import Config

    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"stage": "iterate", **changes})
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (tmp_path / "rounds.json").write_text('{"rounds": []}')
    return tmp_path


def test_resume_keeps_the_run_s_settings_but_may_change_the_number_of_rounds(tmp_path):
    from rlhf_pl.config import Config

    root = _saved_loop(tmp_path, seed=3)
    given = OmegaConf.merge(OmegaConf.structured(Config), {"stage": "iterate", "seed": 3, "resume": str(root),
                                                           "iterate": {"rounds": 5}})
    assert iterate.loop_root(given, tmp_path / "new")[0] == root.resolve()
    assert OmegaConf.load(root / "config.yaml").iterate.rounds == 5
    given.seed = 4
    with pytest.raises(ConfigError, match=r"seed: run has 3, given 4.*iterate.rounds"):
        iterate.loop_root(given, tmp_path / "new")


def test_resume_of_a_directory_that_is_not_an_iterate_run_names_it(tmp_path):
    from rlhf_pl.config import Config

    given = OmegaConf.merge(OmegaConf.structured(Config), {"stage": "iterate", "resume": str(tmp_path)})
    with pytest.raises(InputError, match=r"is not an iterate run.*\+stage=iterate"):
        iterate.loop_root(given, tmp_path / "new")


def test_merge_keeps_every_ranking_in_order_and_checks_each_source_first(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"prompt": "p", "completions": ["x", "y"], "ranking": [1, 0]}) + "\n")
    b.write_text(json.dumps({"prompt": "q", "completions": ["u", "v", "w"], "ranking": [0, 2, 1]}) + "\n")
    merged = iterate.merge_comparisons(tmp_path / "all.jsonl", [str(a), str(b), str(a)])
    assert merged.read_text().splitlines() == [*a.read_text().splitlines(), *b.read_text().splitlines(),
                                              *a.read_text().splitlines()]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completions": ["x", "y"], "ranking": [0, 0]}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl"):
        iterate.merge_comparisons(tmp_path / "none.jsonl", [str(a), str(bad)])
    assert not (tmp_path / "none.jsonl").exists()


def _loop_cfg(*overrides: str):
    from hydra import compose, initialize_config_module

    from rlhf_pl.config import register_configs

    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        return compose("config", overrides=["+stage=iterate", *overrides])


def test_iterate_ppo_becomes_the_ppo_sub_stage_s_settings_and_bad_ones_are_refused_before_the_loop():
    assert iterate.round_ppo_settings(_loop_cfg()) == {
        "ppo.batch_size": 8, "ppo.samples_per_prompt": 4, "ppo.score_baseline": "group", "ppo.critic": "none",
        "ppo.policy_optim.lr": 3e-5}
    assert iterate.round_ppo_settings(_loop_cfg("iterate.ppo=null")) == {}
    assert iterate.round_ppo_settings(_loop_cfg("iterate.ppo.critic=separate"))["ppo.critic"] == "separate"
    with pytest.raises(ConfigError, match=r"iterate\.ppo\.nokey=3: ppo has no setting 'nokey'; valid keys: .*critic"):
        iterate.round_ppo_settings(_loop_cfg("+iterate.ppo.nokey=3"))
    with pytest.raises(ConfigError, match=r"iterate\.ppo .*ppo\.critic='both': choose one of: separate, shared, none"):
        iterate.round_ppo_settings(_loop_cfg("iterate.ppo.critic=both"))
    with pytest.raises(ConfigError, match=r"ppo\.num_minibatches=3 must divide"):  # a rule across fields
        iterate.round_ppo_settings(_loop_cfg("+iterate.ppo.num_minibatches=3"))


def test_a_sub_stage_s_config_is_the_loop_s_with_its_stage_and_settings(tmp_path):
    from rlhf_pl.config import Config

    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"stage": "iterate", "resume": str(tmp_path)})
    sub = iterate.stage_config(cfg, "ppo", {"ppo.reference_from": "/sft", "seed": 7})
    assert (sub.stage, sub.resume, sub.seed, sub.ppo.reference_from) == ("ppo", None, 7, "/sft")
    assert (cfg.stage, cfg.seed, cfg.ppo.reference_from) == ("iterate", 0, "policy")  # the loop's own is unchanged


@pytest.mark.parametrize("keep", [False, True])
def test_a_finished_sub_stage_s_training_state_is_deleted_unless_kept(tmp_path, monkeypatch, keep):
    def fake_stage(cfg, sub_dir, inputs, what, root):  # a stage that checkpoints, exports its model and finishes
        (sub_dir / "checkpoints").mkdir()
        (sub_dir / "checkpoints" / "last.pt").write_bytes(b"state")
        (sub_dir / "policy").mkdir()
        (sub_dir / "summary.json").write_text(json.dumps({"policy_dir": str(sub_dir / "policy"), "updates": 1}))

    monkeypatch.setattr(iterate, "run_in_child", lambda cfg, sub_dir, *rest: (sub_dir.mkdir(parents=True),
                                                                               fake_stage(cfg, sub_dir, *rest)))
    cfg = _loop_cfg(f"iterate.keep_checkpoints={str(keep).lower()}")
    done = iterate.Lineage(tmp_path).run(cfg, 1, "ppo", "round 1/1", {}, {})
    sub_dir = tmp_path / "round_1" / "ppo"
    assert done.outputs == {"policy": str(sub_dir / "policy")} and (sub_dir / "policy").is_dir()
    assert (sub_dir / "checkpoints" / "last.pt").is_file() == keep


def test_training_state_left_by_a_loop_killed_after_the_sub_stage_finished_is_deleted_on_resume(tmp_path, monkeypatch):
    sub_dir = tmp_path / "round_1" / "ppo"  # finished (summary.json), killed before its checkpoints/ went
    (sub_dir / "checkpoints").mkdir(parents=True)
    (sub_dir / "checkpoints" / "last.pt").write_bytes(b"state")
    (sub_dir / "summary.json").write_text(json.dumps({"policy_dir": str(sub_dir / "policy")}))
    monkeypatch.setattr(iterate, "run_in_child", lambda *args: pytest.fail("a finished sub-stage ran again"))
    done = iterate.Lineage(tmp_path).run(_loop_cfg(), 1, "ppo", "round 1/1", {}, {})
    assert done.outputs == {"policy": str(sub_dir / "policy")} and not (sub_dir / "checkpoints").exists()
