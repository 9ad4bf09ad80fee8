"""Resuming PPO: an interrupted run continues exactly; kill -9 (also during a save) never leaves an
unloadable latest checkpoint; data position and RNG states are restored."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from ppo_helpers import make_cfg, ppo_run
from process_helpers import wait_for

from rlhf_pl.checkpoint import CHECKPOINT_FILE, find_checkpoint, load_checkpoint, restore_rng_state, rng_state
from rlhf_pl.data.batches import RolloutBatchSampler
from rlhf_pl.errors import ConfigError, InputError

TIMING = {"rollout_seconds", "train_seconds"}  # wall-clock fields: the only ones allowed to differ

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class Interrupted(Exception):
    """Raised by StopAfter to cut a run short, as a crash would."""


class StopAfter(L.Callback):
    """Raises after update ``k`` (after its checkpoint was written), like a crash between updates."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module.rollouts_done == self.k:
            raise Interrupted(f"stopped after update {self.k}")


# The settings of the exact-resume runs: every source of randomness and state is in play
# (several epochs and minibatches, shuffling, running score statistics, the PI controller's integrator).
SETTINGS = ("ppo.updates=5", "ppo.batch_size=4", "ppo.num_minibatches=2", "ppo.ppo_epochs=2", "ppo.max_new_tokens=6",
            "ppo.checkpoint_every=1", "ppo.score_norm=standardise", "ppo.policy_optim.lr=1e-2", "kl_controller=pi",
            "kl_controller.horizon=50")


@pytest.mark.parametrize("critic", ["separate", "none"])
def test_interrupted_and_resumed_run_reaches_the_same_metrics_and_weights(tmp_path, ppo_inputs, critic):
    settings = (*SETTINGS, f"ppo.critic={critic}")
    full = make_cfg(ppo_inputs, tmp_path, *settings)
    ppo_run(full, tmp_path / "full")  # run_stage seeds everything with cfg.seed

    with pytest.raises(Interrupted):
        ppo_run(full, tmp_path / "first", callbacks=[StopAfter(2)])
    assert load_checkpoint(tmp_path / "first" / "checkpoints" / CHECKPOINT_FILE)["rollouts_done"] == 2

    resumed = make_cfg(ppo_inputs, tmp_path, *settings, f"+resume={tmp_path / 'first'}")
    resumed_summary = ppo_run(resumed, tmp_path / "second")
    assert resumed_summary["resumed_from"] == str(tmp_path / "first") and resumed_summary["updates"] == 5
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / CHECKPOINT_FILE)
    b = load_checkpoint(tmp_path / "second" / "checkpoints" / CHECKPOINT_FILE)
    assert a["history"]["update"] == b["history"]["update"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    for name, values in a["history"].items():
        if name not in TIMING:
            assert torch.allclose(torch.tensor(values), torch.tensor(b["history"][name]), rtol=0, atol=1e-6,
                                  equal_nan=True), name
    assert a["history"]["score"] == b["history"]["score"] and a["history"]["kl"] == b["history"]["kl"]  # bit for bit
    assert a["kl_controller"] == b["kl_controller"] and a["score_moments"] == b["score_moments"]
    for key, tensor in a["policy"].items():
        assert torch.equal(tensor, b["policy"][key]), key
    assert (a["critic"] is None) == (b["critic"] is None) == (critic == "none")
    for key, tensor in (a["critic"] or {}).items():
        assert torch.equal(tensor, b["critic"][key]), key
    assert len(a["optimizers"]) == len(b["optimizers"]) == (1 if critic == "none" else 2)


def test_resume_refuses_a_finished_run_and_names_a_missing_checkpoint(tmp_path, ppo_inputs):
    cfg = make_cfg(ppo_inputs, tmp_path, "ppo.updates=1", "ppo.batch_size=2", "ppo.max_new_tokens=3",
                   "ppo.ppo_epochs=1")
    ppo_run(cfg, tmp_path / "done")
    with pytest.raises(ConfigError, match=r"has done 1 updates and ppo.updates=1; raise ppo.updates"):
        ppo_run(make_cfg(ppo_inputs, tmp_path, "ppo.updates=1", f"+resume={tmp_path / 'done'}"), tmp_path / "again")
    with pytest.raises(InputError, match=r"no checkpoint at .*checkpoints/last.pt"):
        find_checkpoint(str(tmp_path / "nowhere"))


def test_rollout_batches_skip_exactly_the_done_rollouts():
    full = list(RolloutBatchSampler(10, 3, seed=5, updates=7))
    assert len(full) == 7 and all(len(b) == 3 for b in full)
    assert list(RolloutBatchSampler(10, 3, seed=5, updates=7, start=4)) == full[4:]
    epoch0 = [i for b in full[:3] for i in b]
    assert len(set(epoch0)) == 9  # one pass over the data without repeats (the incomplete last batch is dropped)
    assert full[3:6] != full[:3]  # the next pass is shuffled differently (seed + epoch)
    ranks = [list(RolloutBatchSampler(10, 2, seed=5, updates=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert not set(ranks[0][0]) & set(ranks[1][0])  # ranks take disjoint slices of the global batch
    with pytest.raises(ValueError, match="fewer than ppo.batch_size=8"):
        RolloutBatchSampler(5, 8, seed=0, updates=1)


def test_rng_states_round_trip_through_a_checkpoint_file(tmp_path):
    generator = torch.Generator().manual_seed(11)
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    torch.save(rng_state(generator), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=generator))
    torch.manual_seed(99), random.seed(99), np.random.seed(99), generator.manual_seed(99)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), generator)
    again = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=generator))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1] and expected[2] == again[2]
    assert torch.equal(expected[3], again[3])


def test_killed_with_sigkill_mid_run_then_resumed_from_the_command_line(tmp_path, ppo_inputs):
    out, env = tmp_path / "outputs", {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    common = [sys.executable, "-m", "rlhf_pl", "+stage=ppo", "experiment=quick", f"paths.output_root={out}",
              f"ppo.policy_from={ppo_inputs / 'sft'}", f"ppo.reward_from={ppo_inputs / 'rm'}", "ppo.updates=6",
              "ppo.batch_size=4", "ppo.max_new_tokens=6", "ppo.checkpoint_every=1", "trainer.enable_progress_bar=false"]
    first_dir = out / "runs" / "first"
    proc = subprocess.Popen([*common, f"hydra.run.dir={first_dir}"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    pointer = first_dir / "checkpoints" / "latest.json"
    wait_for(lambda: pointer.is_file() and json.loads(pointer.read_text())["rollouts_done"] >= 2, 240, "update 2",
              proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(find_checkpoint(str(first_dir)))
    done = state["rollouts_done"]
    assert 2 <= done < 6 and len(state["history"]["score"]) == done

    second_dir = out / "runs" / "second"
    resumed = subprocess.run([*common, f"+resume={first_dir}", f"hydra.run.dir={second_dir}"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((second_dir / "summary.json").read_text())
    assert summary["updates"] == 6 and summary["resumed_from"] == str(first_dir)
    final = load_checkpoint(second_dir / "checkpoints" / CHECKPOINT_FILE)
    assert final["history"]["update"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert final["history"]["score"][:done] == state["history"]["score"]  # the first part carried over
    assert (second_dir / "policy" / "model.safetensors").is_file() and (second_dir / "ppo_curves.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(second_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("ppo/score")] == list(range(done, 6))  # logger steps continue
