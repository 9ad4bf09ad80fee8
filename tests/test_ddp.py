"""Data parallel on 2 CPU processes (``trainer=ddp_cpu``, gloo) against 1 process on the same global batch.

Every run goes through ``python -m rlhf_pl`` (Lightning starts rank 1 by running the job's command again,
see rlhf_pl.distributed). Checked: SFT and RM losses and final weights equal those of one process with
twice the batch; PPO's advantage whitening, score statistics and logged means are those of all ranks'
episodes together, each rank rolls out different prompts; a PPO run whose rank 1 is killed with SIGKILL
resumes to the weights of an uninterrupted run; one run directory with one config, summary, log file and
index entry, written by rank 0 alone. Sharded (``trainer=fsdp_cpu``): SFT and RM equal one process, PPO
(killed and resumed) equals the DDP run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from process_helpers import wait_for
from safetensors.torch import load_file

PROBE_SITE = Path(__file__).parent / "ddp_probe"
SMALL = ["experiment=quick", "data.limit=48", "trainer.enable_progress_bar=false", "sft.num_samples=0"]
PPO = ["+stage=ppo", "ppo.updates=6", "ppo.batch_size=4", "ppo.max_new_tokens=8", "ppo.checkpoint_every=2",
       "ppo.sample_every=100", "ppo.num_samples=0"]


def run(root: Path, *overrides: str, env: dict | None = None, timeout: float = 240) -> Path:
    """``python -m rlhf_pl <overrides> paths.output_root=<root>``, which must succeed; its one run directory."""
    proc = subprocess.run([sys.executable, "-m", "rlhf_pl", *SMALL, *overrides, f"paths.output_root={root}"],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((root / "runs").iterdir())
    assert len(runs) == 1, runs  # rank 1 made no run directory of its own
    return runs[0]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return {f"{f.stem}/{k}": v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, skip: tuple[str, ...] = (),
                         atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((float((a[k] - b[k]).abs().max()), k) for k in a if not k.endswith(skip))
    assert worst[0] < atol, worst


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_rank_zero_files_only(root: Path, run_dir: Path, stage: str) -> None:
    """One config, one summary, one log file (Hydra's, rank 0's) and one index entry for the run."""
    logs = sorted(p.name for p in run_dir.glob("*.log"))
    assert logs == ["__main__.log"], logs
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra").is_dir()
    assert summary(run_dir)["run_dir"] == str(run_dir.resolve())
    index = json.loads((root / "index.json").read_text())
    assert list(index) == [stage] and list(index[stage]) == ["tiny"]


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory) -> dict[str, Path]:
    """SFT on 2 processes with batch 4 each and on 1 process with batch 8."""
    root = tmp_path_factory.mktemp("sft")
    return {"two": run(root / "two", "+stage=sft", "trainer=ddp_cpu", "sft.batch_size=4"),
            "one": run(root / "one", "+stage=sft", "trainer=cpu", "sft.batch_size=8"), "root": root}


def test_sft_on_two_processes_equals_one_process_on_the_global_batch(sft_runs):
    two, one = summary(sft_runs["two"]), summary(sft_runs["one"])
    assert two["steps"] == one["steps"] > 0
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)  # logged: the mean over both ranks
    assert_close_weights(weights(sft_runs["two"] / "model"), weights(sft_runs["one"] / "model"))
    assert_rank_zero_files_only(sft_runs["root"] / "two", sft_runs["two"], "sft")


@pytest.fixture(scope="module")
def rm_runs(sft_runs, tmp_path_factory) -> dict[str, Path]:
    """RM from the same SFT model on 2 processes with batch 4 each and on 1 process with batch 8."""
    root, init = tmp_path_factory.mktemp("rm"), f"rm.init_from={sft_runs['one'] / 'model'}"
    return {"two": run(root / "two", "+stage=rm", init, "trainer=ddp_cpu", "rm.batch_size=4", "rm.epochs=1"),
            "one": run(root / "one", "+stage=rm", init, "trainer=cpu", "rm.batch_size=8", "rm.epochs=1"), "root": root}


def test_rm_on_two_processes_equals_one_process_on_the_global_batch(rm_runs):
    two, one = rm_runs["two"], rm_runs["one"]
    for key in ("val_loss", "val_accuracy", "train_loss"):
        assert summary(two)[key] == pytest.approx(summary(one)[key], rel=1e-5), key
    # Adam divides each gradient by its running RMS, so a float-rounding difference in a near-zero gradient (the
    # sums over ranks are added in another order) becomes a difference of up to a step (lr 1e-3): the tolerance
    # is 1e-4, under a tenth of one step. The ranking loss depends on reward differences only, so the head's bias
    # gets nothing but such noise and moves by whole steps: it is left out (the normalisation removes it anyway).
    assert_close_weights(weights(two / "reward_model"), weights(one / "reward_model"), skip=("score.bias",),
                         atol=1e-4)
    assert_rank_zero_files_only(rm_runs["root"] / "two", two, "rm")


# --- PPO ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ppo_inputs(sft_runs, rm_runs) -> list[str]:
    reward, model = rm_runs["one"] / "reward_model", sft_runs["one"] / "model"
    return [f"ppo.policy_from={model}", f"ppo.reward_from={reward}", "trainer=ddp_cpu"]


@pytest.fixture(scope="module")
def probed_ppo(ppo_inputs, tmp_path_factory) -> tuple[Path, Path, Path]:
    """An uninterrupted 2-process PPO run with every rank's rollouts and statistics recorded."""
    root, probe = tmp_path_factory.mktemp("ppo"), tmp_path_factory.mktemp("probe")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(PROBE_SITE), os.environ.get("PYTHONPATH")])),
           "RLHF_PL_PROBE": str(probe)}
    return root, run(root, *PPO, *ppo_inputs, env=env), probe


def probed(probe: Path, update: int) -> list[dict]:
    return [torch.load(probe / f"rank{r}_update{update}.pt", weights_only=False) for r in (0, 1)]


def padded_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(b_r, n_r) tensors -> (Σ b_r, max n_r), zero-padded on the right (masked out by the zero mask)."""
    n = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, n - t.shape[1])) for t in tensors])


def test_ppo_statistics_are_those_of_all_ranks_together(probed_ppo):
    from rlhf_pl.rl.advantages import compute_advantages
    from rlhf_pl.rl.kl import sequence_kl

    root, run_dir, probe = probed_ppo
    assert_rank_zero_files_only(root, run_dir, "ppo")
    for update in (1, 4):
        ranks = probed(probe, update)
        prompts = [set(r["rollout"].prompt_index.tolist()) for r in ranks]
        assert len(prompts[0]) == len(prompts[1]) == 4 and not prompts[0] & prompts[1]  # each rank its own prompts
        # one process over both ranks' episodes: the advantages each rank whitened with the global statistics
        args = [padded_cat([r["advantage_args"][i] for r in ranks]) if ranks[0]["advantage_args"][i].dim() == 2
                else torch.cat([r["advantage_args"][i] for r in ranks]) for i in range(5)]
        together = compute_advantages(*args, **ranks[0]["advantage_kwargs"])
        mask = args[4].bool()
        mine = padded_cat([r["advantages"].advantages for r in ranks])
        assert torch.allclose(mine[mask], together.advantages[mask], atol=1e-5)
        assert float(together.advantages[mask].mean()) == pytest.approx(0.0, abs=1e-5)  # whitened over both
        assert ranks[0]["advantages"].raw_std == pytest.approx(float(together.raw_std), rel=1e-5)
        # the logged means: equal on both ranks, and the means over all 8 episodes
        rollouts = [r["rollout"] for r in ranks]
        timings = {k: getattr(ranks[0]["stats"], k) for k in ("rollout_seconds", "train_seconds")}  # per process
        assert dataclasses.asdict(ranks[0]["stats"]) == pytest.approx(
            dataclasses.asdict(dataclasses.replace(ranks[1]["stats"], **timings)), rel=0, abs=0, nan_ok=True)
        scores = torch.cat([r.rm_scores for r in rollouts])
        assert ranks[0]["stats"].score == pytest.approx(float(scores.mean()), rel=1e-5)
        kl = torch.cat([sequence_kl(r.logprobs, r.ref_logprobs, r.mask) for r in rollouts])
        assert ranks[0]["stats"].kl == pytest.approx(float(kl.mean()), rel=1e-5, abs=1e-7)
        assert not torch.equal(rollouts[0].rm_scores, rollouts[1].rm_scores)


def rank_pid(rank: int, root: Path) -> int | None:
    """The pid of the process Lightning started as ``rank`` of the run writing below ``root``."""
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"hydra.job.name=rank_{rank}".encode() in cmdline and f"paths.output_root={root}".encode() in cmdline:
            return int(entry.name)
    return None


def killed_and_resumed(root: Path, overrides: list[str]) -> tuple[Path, Path]:
    """A 2-process PPO run whose rank 1 gets SIGKILL after the first checkpoint, then ``+resume`` of
    it: (the killed run's directory, the resumed run's)."""
    killed = root / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_pl", *SMALL, *overrides, f"paths.output_root={killed}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pointer = lambda: next(killed.glob("runs/*/checkpoints/latest.json"), None)  # noqa: E731
    wait_for(lambda: pointer() is not None, 240, "the first checkpoint", proc)
    victim = rank_pid(1, killed)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    proc.wait(timeout=60)  # Lightning's observer ends rank 0 once a rank has died
    assert proc.returncode != 0
    killed_dir = pointer().parent.parent
    done = json.loads(pointer().read_text())["rollouts_done"]
    assert 2 <= done < 6 and not (killed_dir / "policy").exists()
    resumed = run(root / "resumed", *overrides, f"+resume={killed_dir}")
    assert summary(resumed)["resumed_from"] == str(killed_dir)
    return killed_dir, resumed


def test_ppo_resumes_after_one_rank_is_killed(probed_ppo, ppo_inputs, tmp_path):
    _, uninterrupted, _ = probed_ppo
    _, resumed = killed_and_resumed(tmp_path, [*PPO, *ppo_inputs])
    assert_close_weights(weights(resumed / "policy"), weights(uninterrupted / "policy"), atol=1e-6)
    assert summary(resumed)["final_score"] == pytest.approx(summary(uninterrupted)["final_score"], rel=1e-5)


def test_a_checkpoint_of_two_processes_is_not_resumed_by_one(probed_ppo, ppo_inputs, tmp_path):
    _, uninterrupted, _ = probed_ppo
    overrides = [*SMALL, *PPO[:1], "ppo.updates=8", *PPO[2:], *ppo_inputs[:2], "trainer=cpu",
                 f"+resume={uninterrupted}", f"paths.output_root={tmp_path}"]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "rlhf_pl", *overrides], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "written by 2 data-parallel process(es), this run has 1" in proc.stderr
    assert "trainer.devices=2" in proc.stderr and time.monotonic() - started < 240


def test_collect_on_two_processes_ranks_every_prompt_once(sft_runs, tmp_path):
    from hydra import compose, initialize_config_module

    from rlhf_pl.config import register_configs
    from rlhf_pl.stages.collect import load_items

    overrides = ["+stage=collect", f"collect.policy_from={sft_runs['one'] / 'model'}", "collect.num_prompts=12"]
    run_dir = run(tmp_path, *overrides, "trainer=ddp_cpu")
    assert_rank_zero_files_only(tmp_path, run_dir, "collect")
    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        cfg = compose("config", [*SMALL, *overrides])
    c = cfg.collect
    items = load_items(list(c.sources), split=cfg.data.split, limit=cfg.data.limit, seed=cfg.seed,
                       num_prompts=c.num_prompts)
    where = {(item.source, item.turn): i for i, item in enumerate(items)}
    records = [json.loads(line) for line in (run_dir / "comparisons.jsonl").read_text().splitlines()]
    indices = [where[(r["provenance"]["source"], r["provenance"]["turn"])] for r in records]
    assert indices == sorted(set(indices))  # each prompt once, in the order of one process
    assert {i % 2 for i in indices} == {0, 1}  # rank 1's prompts (the odd ones) are there, ranked by rank 0
    s = summary(run_dir)
    assert s["prompts"] == 12 and s["rankings"] + s["all_tie"] + s["fewer_than_2_distinct"] == 12
    assert all(len(r["completions"]) == c.k for r in records)


def test_data_parallel_outside_python_m_rlhf_pl_is_refused(tmp_path):
    """From pytest, Lightning would start rank 1 by running pytest's command line again: refused, with the way out."""
    from hydra import compose, initialize_config_module

    from rlhf_pl.config import register_configs
    from rlhf_pl.errors import ConfigError
    from rlhf_pl.run import run_stage

    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        cfg = compose("config", [*SMALL, "+stage=sft", "trainer=ddp_cpu", f"paths.output_root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"with 2 processes .* not started by `python -m rlhf_pl`"):
        run_stage(cfg)
    assert not (tmp_path / "index.json").exists()


def test_iterate_on_more_than_one_process_is_refused_before_the_loop(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhf_pl", *SMALL, "+stage=iterate", "trainer=ddp_cpu",
                           f"paths.output_root={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trainer.devices=2" in proc.stderr and "+stage=<collect|rm|ppo|eval> trainer=ddp_cpu" in proc.stderr
    assert not list(tmp_path.glob("runs/*/round_*"))  # nothing of the loop ran


# --- FSDP on CPU processes (trainer=fsdp_cpu: the trained model sharded over 2 processes) ----------------------


def test_sft_and_rm_sharded_on_two_processes_equal_one_process(sft_runs, rm_runs, tmp_path):
    sft = run(tmp_path / "sft", "+stage=sft", "trainer=fsdp_cpu", "sft.batch_size=4")
    assert summary(sft)["val_loss"] == pytest.approx(summary(sft_runs["one"])["val_loss"], rel=1e-5)
    assert_close_weights(weights(sft / "model"), weights(sft_runs["one"] / "model"))  # gathered from the shards
    assert_rank_zero_files_only(tmp_path / "sft", sft, "sft")
    rm = run(tmp_path / "rm", "+stage=rm", f"rm.init_from={sft_runs['one'] / 'model'}", "trainer=fsdp_cpu",
             "rm.batch_size=4", "rm.epochs=1")
    assert summary(rm)["val_accuracy"] == pytest.approx(summary(rm_runs["one"])["val_accuracy"], rel=1e-5)
    assert_close_weights(weights(rm / "reward_model"), weights(rm_runs["one"] / "reward_model"), skip=("score.bias",),
                         atol=1e-4)  # as for DDP above


# PPO sharded: policy and critic each an FSDP root over the 2 processes; reference and reward model whole on each.
# Rollouts keep the ranks' decode steps in lockstep (every forward of a sharded model is collective); checkpoints
# gather the full weights and optimizer states. The same run as DDP's, to float tolerance.


def test_ppo_sharded_on_two_processes_killed_and_resumed_equals_ddp(probed_ppo, ppo_inputs, tmp_path):
    """A sharded run interrupted by SIGKILL of rank 1 and resumed: its checkpoints hold whole states
    gathered from the shards, and it ends with the weights and statistics of the DDP run."""
    _, ddp, _ = probed_ppo
    killed, resumed = killed_and_resumed(tmp_path, [*PPO, *ppo_inputs[:2], "trainer=fsdp_cpu"])
    assert_rank_zero_files_only(tmp_path / "resumed", resumed, "ppo")
    assert_close_weights(weights(resumed / "policy"), weights(ddp / "policy"), atol=1e-6)  # gathered from the shards
    for key in ("final_score", "final_kl", "final_beta", "initial_score"):
        assert summary(resumed)[key] == pytest.approx(summary(ddp)[key], rel=1e-5, abs=1e-6), key
    checkpoint = torch.load(killed / "checkpoints" / "last.pt", weights_only=False)
    unsharded = torch.load(ddp / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["sharded"] is True and unsharded["sharded"] is False
    policy = checkpoint["policy"]  # the whole policy, under the unwrapped model's names
    assert policy.keys() == unsharded["policy"].keys()
    assert all(policy[k].shape == unsharded["policy"][k].shape for k in policy)
    state = checkpoint["optimizers"][0]["state"]  # FSDP's optimizer state: keyed by parameter name, tensors whole
    assert state and set(state) <= set(policy)
    assert all(s["exp_avg"].shape == policy[name].shape for name, s in state.items())


def test_an_unsharded_checkpoint_is_not_resumed_sharded(probed_ppo, ppo_inputs, tmp_path):
    _, ddp, _ = probed_ppo
    overrides = [*SMALL, *PPO[:1], "ppo.updates=8", *PPO[2:], *ppo_inputs[:2], "trainer=fsdp_cpu", f"+resume={ddp}",
                 f"paths.output_root={tmp_path}"]
    proc = subprocess.run([sys.executable, "-m", "rlhf_pl", *overrides], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "written under an unsharded strategy (one process or DDP), this run has trainer.strategy=fsdp" in proc.stderr
    assert "resume with trainer=ddp, ddp_cpu or cpu" in proc.stderr and "Traceback" not in proc.stderr
