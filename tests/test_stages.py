"""The stage interface: run_stage(cfg, run_dir, inputs) -> StageResult; outputs chained explicitly
without the output index (as the iterate stage does), or found through it."""
from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_module

from rlhf_pl import outputs
from rlhf_pl.config import register_configs
from rlhf_pl.errors import InputError
from rlhf_pl.run import run_stage
from rlhf_pl.stages import STAGES, StageResult, stage_module

QUICK = ("experiment=quick", "data.limit=24", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
         "logger.tensorboard=false", "sft.num_samples=0", "rm.normalise_size=4")


def _compose(*overrides: str):
    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_every_stage_declares_its_inputs_and_one_entry_point():
    for name in STAGES:
        module = stage_module(name)
        assert callable(module.run)
        for spec in module.INPUTS.values():
            assert spec.stage in STAGES and spec.key.startswith(f"{name}.")


def test_stages_chain_by_explicit_outputs_without_the_index(tmp_path, one_thread):
    sft_cfg = _compose("+stage=sft", *QUICK, f"paths.output_root={tmp_path / 'a'}")
    sft = run_stage(sft_cfg, tmp_path / "sft", record=False)
    assert isinstance(sft, StageResult) and (sft.outputs["model"] / "config.json").is_file()
    assert not (tmp_path / "a" / outputs.INDEX_FILE).exists()  # nothing recorded

    # rm.init_from stays "auto" and the output root has no index: the explicit input is what it reads.
    rm_cfg = _compose("+stage=rm", *QUICK, f"paths.output_root={tmp_path / 'b'}")
    rm = run_stage(rm_cfg, tmp_path / "rm", inputs={"init": sft.outputs["model"]}, record=False)
    assert rm.metrics["init_from"] == str(sft.outputs["model"])
    assert (rm.outputs["reward_model"] / "reward_config.json").is_file()
    summary = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert summary["reward_model_dir"] == str(rm.outputs["reward_model"])
    assert not (tmp_path / "b").exists()

    with pytest.raises(InputError, match=r"input 'init': .* has no config.json"):
        run_stage(rm_cfg, tmp_path / "rm2", inputs={"init": tmp_path}, record=False)
    with pytest.raises(InputError, match=r"unknown stage input\(s\) \['policy'\]; this stage reads: init"):
        run_stage(rm_cfg, tmp_path / "rm3", inputs={"policy": sft.outputs["model"]})


def test_recorded_outputs_are_the_next_stage_s_auto_inputs(tmp_path):
    cfg = _compose("+stage=ppo", "experiment=quick", f"paths.output_root={tmp_path}")
    with pytest.raises(InputError, match=r"ppo.policy_from=auto: no \+stage=sft output recorded for model 'tiny'"):
        outputs.Inputs(cfg, stage_module("ppo").INPUTS)["policy"]
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    outputs.record(cfg, "sft", {"model": model})
    assert outputs.Inputs(cfg, stage_module("ppo").INPUTS)["policy"] == model.resolve()
    other = _compose("+stage=ppo", "model=smollm2_135m", f"paths.output_root={tmp_path}")
    assert outputs.latest(other, "sft", "model") is None  # recorded per model name


@pytest.mark.parametrize("stage, output, lr_key",
                         [("sft", "model", "sft.optim.lr"), ("rm", "reward_model", "rm.optim.lr")])
def test_a_non_finite_loss_stops_the_stage_and_nothing_is_exported_or_recorded(tmp_path, one_thread, stage, output,
                                                                               lr_key):
    from rlhf_pl.errors import NonFiniteLossError

    cfg = _compose(f"+stage={stage}", *QUICK, f"{lr_key}=1e12", f"{stage}.optim.warmup_ratio=0",
                   f"paths.output_root={tmp_path / 'out'}")
    with pytest.raises(NonFiniteLossError, match=rf"{stage}: the loss is nan at step \d+ with learning rate 1e\+12 "
                                                 rf"\({lr_key}\); training stopped and no model was exported"):
        run_stage(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / output).exists() and not (tmp_path / "out" / outputs.INDEX_FILE).exists()
