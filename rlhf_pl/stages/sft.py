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
from rlhf_pl.data.chat import LengthReport, apply_length_rule, tokenize_conversation, tokenize_prompt
from rlhf_pl.data.collate import SFTCollator, batched_loader, pad_left
from rlhf_pl.data.formats import Conversation, load_conversations, train_val_split
from rlhf_pl.models.generate import generate
from rlhf_pl.models.loading import load_model_and_tokenizer, save_pretrained_atomic
from rlhf_pl.plots import plot_curves
from rlhf_pl.plugins.precision import build_for_stage
from rlhf_pl.run import make_trainer, markdown_table, record_output, tensorboard_writer
from rlhf_pl.runtime import attention_kernel

log = logging.getLogger(__name__)


# --- optimisation (shared with the other stages) --------------------------------------------------


OPTIMIZERS = {  # optim.optimizer -> (module, class)
    "adamw": ("torch.optim", "AdamW"),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit"),
    "paged_adamw8bit": ("bitsandbytes.optim", "PagedAdamW8bit"),
}


def check_optimizer(optim: OptimConfig, key: str) -> None:
    """Refuse an unknown ``<key>.optimizer`` before any model is loaded."""
    if optim.optimizer not in OPTIMIZERS:
        raise ValueError(f"{key}.optimizer={optim.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")


def make_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """``optim.optimizer`` over the parameters that require grad. The 8-bit ones (bitsandbytes) keep
    both Adam moments in 8 bits (blockwise) for tensors of >= 4096 elements, 32 bits below that;
    paging (``paged_adamw8bit``) only acts on CUDA: elsewhere it is ``adamw8bit``. torch's AdamW
    runs its fused kernel when every parameter is a floating-point tensor on the CPU or CUDA: on the
    CPU the default is a per-tensor loop, ~10× slower (0.88 s against 0.08 s per step for 135M
    parameters on 2 cores), and a PPO update takes two steps per minibatch."""
    import importlib

    check_optimizer(optim, "optim")
    trainable = [p for p in params if p.requires_grad]
    module, cls = OPTIMIZERS[optim.optimizer]
    if optim.optimizer.startswith("paged") and trainable and trainable[0].device.type != "cuda":
        log.info("optim.optimizer=%s: paging needs CUDA; on %s it runs unpaged (as adamw8bit)",
                 optim.optimizer, trainable[0].device.type)
        import warnings

        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    optimizer_cls = getattr(importlib.import_module(module), cls)
    fused = optimizer_cls is torch.optim.AdamW and fused_adamw_ok(trainable)
    optimizer = optimizer_cls(trainable, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                              weight_decay=optim.weight_decay, **({"fused": True} if fused else {}))
    if fused:
        # A fused AdamW tells GradScaler it can unscale gradients inside its kernel, and Lightning then
        # refuses gradient clipping under mixed precision (clipping needs unscaled gradients first).
        # Clearing the flag keeps the ordinary order — unscale, clip, step (skipped on inf) — with
        # the fused kernel doing only the Adam update.
        optimizer._step_supports_amp_scaling = False
    return optimizer


def fused_adamw_ok(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: floating point, on CPU or CUDA."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(params, optim: OptimConfig, total_steps: int):
    """``optim.optimizer`` (AdamW, 8-bit AdamW, paged 8-bit AdamW) + linear warm-up, then
    ``optim.schedule`` decay. Returns Lightning's optimizer dict."""
    from transformers import get_scheduler

    schedules = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    if optim.schedule not in schedules:
        raise ValueError(f"optim.schedule={optim.schedule!r}; choose one of {', '.join(schedules)}")
    optimizer = make_optimizer(params, optim)
    total_steps = max(1, int(total_steps))
    scheduler = get_scheduler(
        schedules[optim.schedule], optimizer,
        num_warmup_steps=int(optim.warmup_ratio * total_steps), num_training_steps=total_steps,
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


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

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Mean token loss over the batch's assistant tokens, and how many there were."""
        logits = self(batch["input_ids"], batch["attention_mask"])  # (b, t, v)
        labels = batch["labels"][:, 1:]  # (b, t-1): token t+1 predicted at t
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        n_tokens = int((labels != -100).sum())
        return loss / max(n_tokens, 1), n_tokens

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, n_trained = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach().clamp(max=20)))
        self.log("train/trained_tokens", float(n_trained), reduce_fx="sum")
        self._tokens_seen += int(batch["attention_mask"].sum())
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_started
        self._train_seconds += elapsed
        tokens = int(batch["attention_mask"].sum())
        self.log("train/tokens_per_s", tokens / max(elapsed, 1e-9), prog_bar=True)
        if outputs is not None:
            self.history["train/loss"][0].append(self.global_step)
            self.history["train/loss"][1].append(float(outputs["loss"]))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_tokens = self._loss(batch)
        self.val_loss.update(loss, weight=n_tokens)

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


def tokenize_split(conversations: list[Conversation], tokenizer, max_length: int, rule: str):
    """Tokenize with assistant masks, then apply the over-length rule. Returns (examples, report)."""
    examples = [tokenize_conversation(tokenizer, c.messages) for c in conversations]
    return apply_length_rule(examples, max_length, rule)


def make_loader(examples, pad_id: int, batch_size: int, seed: int, trainer: Any, *, train: bool, group_by_length: bool) -> DataLoader:
    """This rank's batches: training shuffled (length-grouped with ``group_by_length``), validation
    in order, sorted by length inside mega-batches (less padding; the order does not matter)."""
    return batched_loader(examples, [len(e.input_ids) for e in examples], SFTCollator(pad_id), batch_size, seed,
                          shuffle=train, group=group_by_length or not train, world_size=trainer.world_size, rank=trainer.global_rank)


# --- samples --------------------------------------------------------------------------------------


@torch.no_grad()
def sample_answers(model, tokenizer, conversations: list[Conversation], sampler, max_new_tokens: int) -> list[dict]:
    """Answer the first user turn(s) of each held-out conversation; rows for a sample table."""
    prompts = [c.messages[: next(i for i, m in enumerate(c.messages) if m.role == "assistant")] for c in conversations]
    ids, mask = pad_left([tokenize_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = generate(
        model, ids.to(device), mask.to(device), sampler, max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator(device=device).manual_seed(0),
    )
    model.train(was_training)
    rows = []
    for conv, prompt, response, resp_mask in zip(conversations, prompts, out.response, out.response_mask):
        answer = tokenizer.decode(response[resp_mask.bool()], skip_special_tokens=True)
        reference = next(m.content for m in conv.messages if m.role == "assistant")
        rows.append({"prompt": prompt[-1].content, "model": answer.strip(), "reference": reference})
    return rows


# --- the stage ------------------------------------------------------------------------------------


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    stage = cfg.sft
    precision = build_for_stage(cfg, "sft")  # refuses impossible combinations before any model is loaded
    check_optimizer(stage.optim, "sft.optim")

    conversations = load_conversations(cfg.data.demonstrations, split=cfg.data.split, limit=cfg.data.limit)
    train_convs, val_convs = train_val_split(conversations, cfg.data.val_fraction, cfg.seed)
    log.info("demonstrations: %d train, %d validation (%s)", len(train_convs), len(val_convs), cfg.data.demonstrations)

    model, tokenizer, _ = load_model_and_tokenizer(cfg.model)
    model = precision.prepare_trainable(model)  # lora/qlora: adapters (qlora: on an NF4 base)
    train_examples, train_report = tokenize_split(train_convs, tokenizer, cfg.data.max_length, cfg.data.overlong)
    val_examples, val_report = tokenize_split(val_convs, tokenizer, cfg.data.max_length, cfg.data.overlong)
    _report_lengths(cfg, train_report, val_report)
    if not train_examples:
        raise ValueError(f"no training examples left after data.overlong={cfg.data.overlong} at data.max_length={cfg.data.max_length}")

    module = SFTModule(model, stage.optim)
    trainer = make_trainer(cfg, run_dir, precision, use_distributed_sampler=False)  # the loaders shard themselves
    train_loader = make_loader(train_examples, tokenizer.pad_token_id, stage.batch_size, cfg.seed, trainer, train=True, group_by_length=stage.group_by_length)
    val_loader = make_loader(val_examples, tokenizer.pad_token_id, stage.eval_batch_size, cfg.seed, trainer, train=False, group_by_length=False)
    trainer.fit(module, train_loader, val_loader if val_examples else None)

    sampler = registry.build("samplers", cfg.sampler)
    rows = sample_answers(module.model, tokenizer, val_convs[: stage.num_samples], sampler, stage.max_new_tokens) if stage.num_samples and val_convs else []
    _write_samples(run_dir, trainer, rows)
    plot_curves(module.history, run_dir / "loss.png", title=f"SFT {cfg.model.name}")

    out_dir = run_dir / "model"
    if trainer.is_global_zero:
        save_pretrained_atomic(precision.export(module.model), tokenizer, out_dir)  # lora/qlora: merged
        record_output(cfg, "sft", out_dir)
    metrics = trainer.callback_metrics
    val_loss = float(metrics["val/loss"]) if "val/loss" in metrics else math.nan
    return {
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
        "model_dir": str(out_dir),
    }


def _report_lengths(cfg: DictConfig, *reports: LengthReport) -> None:
    truncated = sum(r.truncated for r in reports)
    dropped = sum(r.dropped for r in reports)
    if truncated or dropped:
        log.warning(
            "data.max_length=%d: %d examples truncated, %d dropped (data.overlong=%s)",
            cfg.data.max_length, truncated, dropped, cfg.data.overlong,
        )


def _write_samples(run_dir: Path, trainer: L.Trainer, rows: list[dict]) -> None:
    if not rows:
        return
    from rlhf_pl.run import atomic_write_text

    table = markdown_table(rows)
    atomic_write_text(run_dir / "samples.md", table + "\n")
    writer = tensorboard_writer(trainer)
    if writer is not None:
        writer.add_text("samples", table, global_step=trainer.global_step)
