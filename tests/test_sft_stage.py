"""SFT stage end to end on the tiny model: files written, loss falls, export reloads, sweeps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from rlhf_pl.config import register_configs


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlhf_pl", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )


def only_run_dir(root: Path) -> Path:
    runs = sorted((root / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    """One quick SFT run from the command line (tiny model, 200 demonstrations, 3 epochs)."""
    root = tmp_path_factory.mktemp("sft")
    proc = cli("+stage=sft", "experiment=quick", "trainer.enable_progress_bar=false", "logger=csv", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run_dir(root / "outputs")


def test_run_directory_has_everything(quick_run):
    for name in ("config.yaml", "summary.json", "loss.png", "samples.md", "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json", "checkpoints/last.ckpt", "csv/metrics.csv"):
        assert (quick_run / name).is_file(), name
    assert list((quick_run / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((quick_run / "summary.json").read_text())
    assert summary["stage"] == "sft" and summary["model"] == "tiny"
    assert summary["train_examples"] + summary["val_examples"] == 200
    assert summary["steps"] == 3 * -(-summary["train_examples"] // 8)  # 3 epochs of ceil(n/8) batches
    assert summary["train_tokens_per_s"] > 0
    index = json.loads((quick_run.parents[1] / "index.json").read_text())
    assert Path(index["sft"]["tiny"]["model"]) == (quick_run / "model").resolve()


def test_loss_falls_well_below_chance(quick_run):
    """Uniform guessing over the 512-token vocabulary is ln 512 = 6.24 nats; the logged curve must fall."""
    import csv

    rows = list(csv.DictReader((quick_run / "csv/metrics.csv").open()))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert train[0] > 5.5
    summary = json.loads((quick_run / "summary.json").read_text())
    assert summary["val_loss"] < 4.0 < train[0]


def test_exported_model_reloads_with_chat_template(quick_run):
    from rlhf_pl.config import ModelConfig
    from rlhf_pl.data.chat import tokenize_prompt
    from rlhf_pl.data.formats import Message
    from rlhf_pl.models.loading import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(ModelConfig(name="sft", name_or_path=str(quick_run / "model")))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    ids = torch.tensor([tokenize_prompt(tok, [Message("user", "What is 2 + 3?")])])
    assert "<|im_start|>assistant" in tok.decode(ids[0])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    samples = (quick_run / "samples.md").read_text()
    assert samples.startswith("# SFT samples\n\n## held-out prompts\n\n| prompt | model | reference |")


def test_multirun_sweep(tmp_path):
    proc = cli("-m", "+stage=sft", "experiment=quick", "data.limit=40", "trainer.max_epochs=1",
               "trainer.enable_progress_bar=false", "sft.optim.lr=1e-3,1e-4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    configs = [(sweep / str(i) / "config.yaml").read_text() for i in (0, 1)]
    assert "lr: 0.001" in configs[0] and "lr: 0.0001" in configs[1]
    assert summaries[0]["val_loss"] < summaries[1]["val_loss"]  # 10x the learning rate learns faster here


def _compose(*overrides: str):
    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_gradient_checkpointing_and_dropout_switches(tmp_path):
    from rlhf_pl.models.loading import load_model_and_tokenizer

    cfg = _compose("+stage=sft", "experiment=quick", "model.gradient_checkpointing=true", "model.dropout=0.2")
    model = load_model_and_tokenizer(cfg.model).model
    name = ("is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing")
            else "is_gradient_checkpointing")
    assert getattr(model, name)
    assert model.config.attention_dropout == pytest.approx(0.2)


def test_the_model_trains_in_training_mode_so_dropout_and_checkpointing_act(tiny_tokenizer):
    from rlhf_pl.data.chat import tokenize_conversation
    from rlhf_pl.data.collate import SFTCollator
    from rlhf_pl.data.formats import load_conversations
    from rlhf_pl.models.loading import load_model_and_tokenizer
    from rlhf_pl.stages.sft import SFTModule

    cfg = _compose("+stage=sft", "experiment=quick", "model.gradient_checkpointing=true", "model.dropout=0.3")
    loaded = load_model_and_tokenizer(cfg.model)
    module = SFTModule(loaded.model.eval(), cfg.sft.optim)  # arrives in eval mode, as from_pretrained returns it
    assert module.model.training
    examples = [tokenize_conversation(loaded.tokenizer, c.messages)
                for c in load_conversations("embedded:demonstrations", limit=2)]
    batch = SFTCollator(loaded.tokenizer.pad_token_id)(examples)
    first, second = module.token_loss_sum(batch)[0], module.token_loss_sum(batch)[0]
    assert not torch.equal(first, second)  # dropout is active: two passes differ


def test_bad_overlong_rule_names_key_and_choices(tmp_path):
    from rlhf_pl.run import run_stage

    cfg = _compose("+stage=sft", "experiment=quick", "data.overlong=shorten", f"paths.output_root={tmp_path}")
    with pytest.raises(ValueError, match=r"shorten.*truncate.*drop|truncate.*drop.*shorten"):
        run_stage(cfg)


def test_fp16_on_cpu_refused_before_loading(tmp_path):
    from rlhf_pl.run import run_stage

    cfg = _compose("+stage=sft", "experiment=quick", "precision=fp16-mixed", f"paths.output_root={tmp_path}")
    with pytest.raises(ValueError, match="bf16-mixed"):
        run_stage(cfg)
