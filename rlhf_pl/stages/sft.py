"""Stage 1 — supervised fine-tuning on demonstration conversations.

``python -m rlhf_pl +stage=sft [model=...] [data=...]``

Reads top to bottom: data (load, validate, split, tokenize with assistant-only loss masks, length
rule) → model → LightningModule (next-token loss on assistant tokens, AdamW with warm-up and
decay) → fit → sample answers for held-out prompts → export in Hugging Face format (weights,
tokenizer, chat template) to ``<run_dir>/model`` and record it as this model's latest SFT output.
Settings: :class:`rlhf_pl.config.SFTConfig` (``sft.*``).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from rlhf_pl import registry
from rlhf_pl.config import OptimConfig
from rlhf_pl.data.batches import tokenize_split
from rlhf_pl.data.chat import LengthReport, tokenize_prompt
from rlhf_pl.data.collate import SFTCollator, batched_loader
from rlhf_pl.data.formats import Conversation, load_conversations, train_val_split
from rlhf_pl.errors import ConfigError
from rlhf_pl.models.loading import load_model_and_tokenizer, save_pretrained_atomic
from rlhf_pl.optim import build_optimizer
from rlhf_pl.precision import build_for_stage
from rlhf_pl.report import SampleLog, plot_curves
from rlhf_pl.rl.masked import all_reduce_sum
from rlhf_pl.runtime import attention_kernel
from rlhf_pl.sampling import build_backend, model_device, sample_texts
from rlhf_pl.stages import StageResult
from rlhf_pl.strategies import consolidated
from rlhf_pl.training import check_finite_loss, global_mean, make_trainer

log = logging.getLogger(__name__)


# --- the LightningModule --------------------------------------------------------------------------


class SFTModule(L.LightningModule):
    """Next-token cross-entropy on assistant tokens (labels −100 elsewhere).

    Batches: ``input_ids``, ``attention_mask``, ``labels``, each (b, t), right-padded.
    """

    def __init__(self, model: torch.nn.Module, optim: OptimConfig):
        super().__init__()
        # Training mode: Lightning keeps the mode a module arrives in (from_pretrained returns eval
        # mode), and in eval mode dropout and Hugging Face's gradient checkpointing are both off.
        self.model = model.train()
        self.optim = optim
        self.val_loss = MeanMetric()
        self.history: dict[str, tuple[list[float], list[float]]] = {"train/loss": ([], []), "val/loss": ([], [])}
        self._step_started = 0.0
        self._tokens_seen = 0
        self._train_seconds = 0.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with attention_kernel(input_ids.shape[1], input_ids.device, self.model):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def token_loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Sum of the token losses over the batch's assistant tokens, and how many there were."""
        logits = self(batch["input_ids"], batch["attention_mask"])  # (b, t, v)
        labels = batch["labels"][:, 1:]  # (b, t-1): token t+1 predicted at t
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        return loss, int((labels != -100).sum())

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The mean token loss over the assistant tokens of every rank's batch (:func:`global_mean`)."""
        total, n_trained = self.token_loss_sum(batch)
        loss = global_mean(total, n_trained)
        check_finite_loss(loss.value, stage="sft", step=self.global_step, lr=self.optim.lr, lr_key="sft.optim.lr")
        self.log("train/loss", loss.value, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.value.clamp(max=20)))
        self.log("train/trained_tokens", float(loss.count), reduce_fx="sum")
        self.history["train/loss"][0].append(self.global_step)
        self.history["train/loss"][1].append(float(loss.value))
        return loss.loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Tokens per second of all ranks together."""
        elapsed = time.perf_counter() - self._step_started
        self._train_seconds += elapsed
        tokens = all_reduce_sum(torch.tensor(float(batch["attention_mask"].sum())))
        self._tokens_seen += int(tokens)
        self.log("train/tokens_per_s", float(tokens) / max(elapsed, 1e-9), prog_bar=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        total, n_tokens = self.token_loss_sum(batch)
        self.val_loss.update(total / max(n_tokens, 1), weight=n_tokens)  # torchmetrics sums over the ranks

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss.clamp(max=20)))
        self.history["val/loss"][0].append(self.global_step)
        self.history["val/loss"][1].append(float(loss))

    def configure_optimizers(self):
        return build_optimizer(self.model.parameters(), self.optim, self.trainer.estimated_stepping_batches)

    @property
    def mean_tokens_per_s(self) -> float:
        return self._tokens_seen / self._train_seconds if self._train_seconds else 0.0


# --- data -----------------------------------------------------------------------------------------


def make_loader(examples, pad_id: int, batch_size: int, seed: int, trainer: Any, *, train: bool,
                group_by_length: bool) -> DataLoader:
    """This rank's batches: training shuffled (length-grouped with ``group_by_length``), validation
    in order, sorted by length inside mega-batches (less padding; the order does not matter)."""
    return batched_loader(examples, [len(e.input_ids) for e in examples], SFTCollator(pad_id), batch_size, seed,
                          shuffle=train, group=group_by_length or not train, world_size=trainer.world_size,
                          rank=trainer.global_rank)


# --- samples --------------------------------------------------------------------------------------


def sample_answers(model, tokenizer, conversations: list[Conversation], sampler, max_new_tokens: int,
                   backend: Any = None) -> list[dict]:
    """Answer the first user turn(s) of each held-out conversation; rows for a sample table."""
    prompts = [c.messages[: next(i for i, m in enumerate(c.messages) if m.role == "assistant")] for c in conversations]
    generator = torch.Generator(device=model_device(model)).manual_seed(0)
    answers = sample_texts(model, tokenizer, [tokenize_prompt(tokenizer, p) for p in prompts], 1, sampler,
                           max_new_tokens, batch_size=max(1, len(prompts)), generator=generator, backend=backend)
    return [{"prompt": prompt[-1].content, "model": answer[0].text,
             "reference": next(m.content for m in conv.messages if m.role == "assistant")}
            for conv, prompt, answer in zip(conversations, prompts, answers)]


# --- the stage ------------------------------------------------------------------------------------


INPUTS: dict = {}  # demonstrations come from data.demonstrations, the model from model.*


def run(cfg: DictConfig, run_dir: Path, inputs: Any = None) -> StageResult:
    stage = cfg.sft
    precision = build_for_stage(cfg, "sft")  # refuses impossible combinations before any model is loaded

    conversations = load_conversations(cfg.data.demonstrations, split=cfg.data.split, limit=cfg.data.limit)
    train_convs, val_convs = train_val_split(conversations, cfg.data.val_fraction, cfg.seed)
    log.info("demonstrations: %d train, %d validation (%s)", len(train_convs), len(val_convs), cfg.data.demonstrations)

    model, tokenizer, _ = load_model_and_tokenizer(cfg.model)
    model = precision.prepare_trainable(model)  # lora/qlora: adapters (qlora: on an NF4 base)
    train_examples, train_report = tokenize_split(train_convs, tokenizer, cfg.data.max_length, cfg.data.overlong)
    val_examples, val_report = tokenize_split(val_convs, tokenizer, cfg.data.max_length, cfg.data.overlong)
    _report_lengths(cfg, train_report, val_report)
    if not train_examples:
        raise ConfigError(f"no training examples left after data.overlong={cfg.data.overlong} at data.max_length="
                          f"{cfg.data.max_length} ({cfg.data.demonstrations}); raise data.max_length "
                          "or use data.overlong=truncate")

    module = SFTModule(model, stage.optim)
    trainer = make_trainer(cfg, run_dir, precision, use_distributed_sampler=False)  # the loaders shard themselves
    train_loader = make_loader(train_examples, tokenizer.pad_token_id, stage.batch_size, cfg.seed, trainer, train=True,
                               group_by_length=stage.group_by_length)
    val_loader = make_loader(val_examples, tokenizer.pad_token_id, stage.eval_batch_size, cfg.seed, trainer,
                             train=False, group_by_length=False)
    trainer.fit(module, train_loader, val_loader if val_examples else None)

    out_dir = run_dir / "model"
    # FSDP: the weights gathered into a whole model on rank 0 (collective); otherwise the trained model itself
    trained = consolidated(module.model, lambda: precision.prepare_trainable(load_model_and_tokenizer(cfg.model)[0]))
    if trainer.is_global_zero:  # data parallel: the ranks hold the same weights; rank 0 writes
        sampler = registry.build("samplers", cfg.sampler)
        rows = (sample_answers(trained, tokenizer, val_convs[: stage.num_samples], sampler, stage.max_new_tokens,
                               build_backend(cfg))
                if stage.num_samples and val_convs else [])
        _write_samples(run_dir, trainer, rows)
        plot_curves(module.history, run_dir / "loss.png", title=f"SFT {cfg.model.name}")
        save_pretrained_atomic(precision.export(trained), tokenizer, out_dir)  # lora/qlora: merged
    metrics = trainer.callback_metrics
    val_loss = float(metrics["val/loss"]) if "val/loss" in metrics else math.nan
    return StageResult({"model": out_dir}, {
        "objective": val_loss,
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 20)) if not math.isnan(val_loss) else math.nan,
        "train_loss": float(metrics.get("train/loss", math.nan)),
        "train_tokens_per_s": round(module.mean_tokens_per_s, 1),
        "steps": trainer.global_step,
        "train_examples": len(train_examples),
        "val_examples": len(val_examples),
        "truncated": train_report.truncated + val_report.truncated,
        "dropped": train_report.dropped + val_report.dropped,
    })


def _report_lengths(cfg: DictConfig, *reports: LengthReport) -> None:
    truncated = sum(r.truncated for r in reports)
    dropped = sum(r.dropped for r in reports)
    if truncated or dropped:
        log.warning(
            "data.max_length=%d: %d examples truncated, %d dropped (data.overlong=%s)",
            cfg.data.max_length, truncated, dropped, cfg.data.overlong,
        )


def _write_samples(run_dir: Path, trainer: L.Trainer, rows: list[dict]) -> None:
    samples = SampleLog(run_dir / "samples.md", "SFT samples", "samples")
    samples.add(rows, "held-out prompts", trainer.global_step, trainer)
