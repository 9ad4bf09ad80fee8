"""Lightning strategies from ``trainer.strategy`` + ``trainer.strategy_options``, and the checks that
refuse combinations which cannot run, before any model is loaded (docs/scaling.md).

``trainer.strategy`` is any Lightning strategy name (``auto``, ``ddp``, …) and goes to the Trainer as
it is, except two that take options:

``fsdp``
    Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy` (PyTorch FSDP), wired by
    ``TrainedModelsFSDP`` (:func:`fsdp_classes`): every *trained* model of the stage (SFT's policy, RM's reward model,
    PPO's policy and critic) becomes its own FSDP root with each decoder layer (the model's
    ``_no_split_modules``) its own unit; the *frozen* models (PPO's reference and reward model) are
    not sharded: the precision plugin holds them (bf16 linears, …) and each process keeps a copy.
    Own roots rather than one root around the LightningModule because PPO steps its optimizers
    inside ``training_step``: a backward inside the root's forward leaves FSDP's state stuck.
    Frozen models with int8/nf4 weights are fine (FSDP never flattens them); ``qlora`` is not (its
    trained base is NF4). Options: ``sharding_strategy`` (FULL_SHARD = ZeRO-3, SHARD_GRAD_OP = ZeRO-2,
    NO_SHARD, HYBRID_SHARD),
    ``activation_checkpointing`` (recompute each trained decoder layer in backward), ``state_dict_type``
    (Lightning checkpoints: ``full`` on rank 0 or ``sharded``), ``cpu_offload`` (parameters in CPU RAM).
``deepspeed``
    Lightning's :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` (extra ``rlhf_pl[deepspeed]``,
    CUDA only). Options: ``stage`` (2 or 3), ``offload_optimizer``, ``offload_parameters`` (stage 3).

:func:`composition_problem` is one of :data:`rlhf_pl.config.CROSS_FIELD_RULES`: it imports nothing
heavy unless the config asks for a GPU, a sharded strategy or several nodes.
"""
from __future__ import annotations

import importlib.util
import os
from functools import cache
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

SHARDED = ("fsdp", "deepspeed")
# option -> valid values (a tuple) or the type of a free value
STRATEGY_OPTIONS: dict[str, dict[str, Any]] = {
    "fsdp": {
        "sharding_strategy": ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"),
        "activation_checkpointing": (False, True),
        "state_dict_type": ("full", "sharded"),
        "cpu_offload": (False, True),
    },
    "deepspeed": {
        "stage": (2, 3),
        "offload_optimizer": (False, True),
        "offload_parameters": (False, True),
    },
}
# bitsandbytes' int8/nf4 parameters cannot be flattened into FSDP's or ZeRO's shards ("Cannot flatten integer dtype
# tensors"): a trained model with them (qlora) cannot be sharded. FSDP leaves the frozen models alone, so their
# int8/nf4 weights are fine there; DeepSpeed's engine takes (and casts) the whole module.
UNSHARDABLE_PRECISIONS = {"fsdp": ("qlora",), "deepspeed": ("qlora", "int8-frozen", "nf4-frozen")}
SHARDABLE = {"fsdp": "precision=fp32, bf16-mixed, fp16-mixed (CUDA), lora (sft, rm)",
             "deepspeed": "precision=fp32, bf16-mixed, fp16-mixed, lora"}
CPU_PRESET = {"ddp": "trainer=ddp_cpu (DDP over CPU processes, gloo)",
              "fsdp": "trainer=fsdp_cpu (FSDP over CPU processes, gloo)",
              "deepspeed": "trainer=fsdp_cpu (sharded over CPU processes) or trainer=ddp_cpu; DeepSpeed has no CPU "
                           "path in Lightning"}
PPO_STAGES = ("ppo", "iterate")  # iterate runs PPO with the same trainer settings
EXTRA_DEEPSPEED = "pip install 'rlhf_pl[deepspeed]'"


# --- building --------------------------------------------------------------------------------------


def build_strategy(trainer_cfg: Any) -> Any:
    """What ``lightning.Trainer(strategy=...)`` gets for ``cfg.trainer``: the name itself, or a
    configured :class:`TrainedModelsFSDP` / ``DeepSpeedStrategy`` built from ``strategy_options``."""
    name = str(trainer_cfg.strategy)
    options = dict(_options(trainer_cfg))
    if name == "fsdp":
        return fsdp_classes()[0](**_fsdp_kwargs(options))
    if name == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=options.get("stage", 2),
                                 offload_optimizer=options.get("offload_optimizer", False),
                                 offload_parameters=options.get("offload_parameters", False))
    return name


def _fsdp_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """FSDPStrategy keyword arguments for the ``fsdp`` options (defaults: FULL_SHARD, full state dict)."""
    return {"sharding_strategy": options.get("sharding_strategy", "FULL_SHARD"),
            "state_dict_type": options.get("state_dict_type", "full"),
            "cpu_offload": bool(options.get("cpu_offload", False)),
            "activation_checkpointing": bool(options.get("activation_checkpointing", False))}


def _options(trainer_cfg: Any) -> dict[str, Any]:
    options = trainer_cfg.get("strategy_options") if hasattr(trainer_cfg, "get") else None
    if options is None:
        return {}
    return OmegaConf.to_container(options) if isinstance(options, DictConfig) else dict(options)


def decoder_layer_types(model: Any) -> tuple[type, ...]:
    """The transformer-block classes inside ``model``: the classes Hugging Face models name in
    ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``), found among ``model``'s submodules."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    return tuple(sorted({type(m) for m in model.modules() if type(m).__name__ in names}, key=lambda t: t.__name__))


def trained_children(module: Any) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """``module``'s direct children split into (trained, frozen): trained ones have a parameter
    with ``requires_grad``. PPO: (policy, critic) and (reference, scorer); SFT/RM: ([model], metrics)."""
    trained, frozen = [], []
    for name, child in module.named_children():
        (trained if any(p.requires_grad for p in child.parameters()) else frozen).append((name, child))
    return trained, frozen


def _strategy_classes() -> tuple[type, type]:
    """Lightning's FSDPStrategy and FSDPPrecision (imported only when ``fsdp`` is chosen)."""
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy, FSDPPrecision


@cache
def fsdp_classes() -> tuple[type, type]:
    """``(TrainedModelsFSDP, RootClippingPrecision)``, subclasses of Lightning's FSDPStrategy and
    FSDPPrecision; made on first use, so that importing this module imports no Lightning."""
    FSDPStrategy, FSDPPrecision = _strategy_classes()

    class RootClippingPrecision(FSDPPrecision):
        """Lightning's FSDPPrecision, with clipping by norm through FSDP's own ``clip_grad_norm_`` on
        the root that holds the optimizer's parameters (the norm over every shard). Lightning's
        refuses to clip, because ``torch.nn.utils.clip_grad_norm_`` on shards is wrong, and it has
        no reference to the roots; TrainedModelsFSDP has them."""

        def __init__(self, precision: str, roots: Callable[[], list[Any]]) -> None:
            super().__init__(precision)
            self._roots = roots

        def clip_grad_by_norm(self, optimizer: Any, clip_val: float | int) -> None:
            params = {id(p) for group in optimizer.param_groups for p in group["params"]}
            roots = [r for r in self._roots() if any(id(p) in params for p in r.parameters())]
            if not roots:
                raise RuntimeError("clipping an optimizer whose parameters belong to no FSDP root")
            for root in roots:
                root.clip_grad_norm_(clip_val)

    class TrainedModelsFSDP(FSDPStrategy):
        """Lightning's FSDPStrategy: the trained models sharded (each its own FSDP root, decoder layers
        as units), the frozen ones kept whole on every process, as the precision plugin holds them.

        ``device_id`` is the process's device as a ``torch.device`` (Lightning passes its index, None on
        CPU, which FSDP refuses), so the same class runs on CPU processes (gloo) and on GPUs.
        """

        def __init__(self, *, activation_checkpointing: bool = False, **kwargs: Any) -> None:
            from torch.distributed.fsdp.wrap import CustomPolicy

            self.roots: list[Any] = []
            self._checkpointed: set[int] = set()
            policy = CustomPolicy(lambda m: id(m) in self._checkpointed) if activation_checkpointing else None
            super().__init__(activation_checkpointing_policy=policy, **kwargs)

        @property
        def precision_plugin(self) -> Any:
            return FSDPStrategy.precision_plugin.fget(self)

        @precision_plugin.setter
        def precision_plugin(self, plugin: Any) -> None:
            if plugin is not None and type(plugin) is FSDPPrecision:  # the one the Trainer's connector makes
                plugin = RootClippingPrecision(plugin.precision, lambda: self.roots)
            FSDPStrategy.precision_plugin.fset(self, plugin)

        def _setup_model(self, model: Any) -> Any:
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            trained, frozen = trained_children(model)
            for name, child in trained:
                if isinstance(child, FullyShardedDataParallel):  # a later fit/validate of the same module
                    continue
                layers = decoder_layer_types(child)
                self._checkpointed.update(id(m) for m in child.modules() if isinstance(m, layers))
                root = FullyShardedDataParallel(
                    child, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy, device_id=self.root_device,
                    auto_wrap_policy=ModuleWrapPolicy(set(layers)) if layers else None, **self.kwargs)
                setattr(model, name, root)
                self.roots.append(root)
            for _, child in frozen:
                child.to(self.root_device)  # FSDP moves only what it wraps (Lightning leaves moving to FSDP)
            return super()._setup_model(model)  # sees the roots: no outer wrap; torchmetrics, checkpointing

    return TrainedModelsFSDP, RootClippingPrecision


def is_sharded(model: Any) -> bool:
    """``model`` is an FSDP root of :class:`TrainedModelsFSDP` (its forward and state dicts are collective)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return isinstance(model, FSDP)


def _full_state(model: Any, rank0_only: bool) -> Any:
    """FSDP's FULL_STATE_DICT context for ``model`` and its optimizer's state; gathered into CPU memory
    on GPUs, left on the device on CPU processes (FSDP's CPU offload of a CPU tensor crashes)."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload = model.compute_device.type != "cpu"
    return FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only))


def full_state_dict(model: Any) -> dict[str, Any]:
    """``model``'s whole state dict, also when it is an FSDP root of :class:`TrainedModelsFSDP`: then
    collective (every rank must call it) and the full tensors land on rank 0 only (others get ``{}``).
    Keys are the unwrapped model's (``unwrapped(model).load_state_dict`` takes them)."""
    if not is_sharded(model):
        return model.state_dict()
    with _full_state(model, rank0_only=True):
        return model.state_dict()


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The state of ``optimizer`` (over ``model``'s parameters) whole: its own ``state_dict()``, or for
    an FSDP root FSDP's full optimizer state keyed by parameter names, collective, on rank 0 only."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with _full_state(model, rank0_only=True):
        return FSDP.optim_state_dict(model, optimizer)


def load_full_state(model: Any, optimizer: Any, model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
    """Load what :func:`full_state_dict` and :func:`full_optimizer_state` returned into ``model`` and
    ``optimizer`` (an FSDP root: collective, every rank passes the whole states and keeps its shard)."""
    if not is_sharded(model):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with _full_state(model, rank0_only=False):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, optimizer_state))


def unwrapped(model: Any) -> Any:
    """The model inside an FSDP root (e.g. to ``save_pretrained(..., state_dict=full_state_dict(root))``)."""
    return model.module if is_sharded(model) else model


def consolidated(model: Any, rebuild: Callable[[], Any]) -> Any:
    """A whole, unsharded copy of a trained model after training, for what runs on rank 0 alone
    (sampling, normalisation, export): ``model`` itself unless it is an FSDP root; then (collective:
    every rank calls it) ``rebuild()`` — the model as the stage first built it — with the gathered full
    weights on rank 0, and None on the other ranks."""
    if not is_sharded(model):
        return model
    state = full_state_dict(model)
    if not state:
        return None
    whole = rebuild()
    whole.load_state_dict(state)
    return whole


# --- composition checks ------------------------------------------------------------------------------


def composition_problem(cfg: DictConfig) -> Optional[str]:
    """Why ``cfg``'s trainer, precision and stage cannot run together here, or None (every reason,
    joined). Checked: strategy options; CUDA asked for and absent; DeepSpeed missing; sharding with
    bitsandbytes precisions; PPO under sharding; several nodes without a cluster environment."""
    trainer = OmegaConf.select(cfg, "trainer")
    if trainer is None:
        return None
    problems = [p for check in CHECKS for p in [check(cfg)] if p]
    return "; ".join(problems) if problems else None


def _strategy(cfg: DictConfig) -> str:
    return str(OmegaConf.select(cfg, "trainer.strategy", default="auto"))


def _plugin_name(cfg: DictConfig, kind: str) -> Optional[str]:
    """The chosen plugin's name (``precision=<name>``, ``generation=<name>``), from the config's type or
    the registry."""
    node = OmegaConf.select(cfg, kind, throw_on_missing=False)
    if not isinstance(node, DictConfig):
        return None
    from rlhf_pl import registry

    try:
        return registry.spec_for_config(kind, node).name
    except registry.PluginError:  # an untyped node: nothing to compare (the precision checks name it later)
        return None


def check_options(cfg: DictConfig) -> Optional[str]:
    """``trainer.strategy_options`` keys and values valid for ``trainer.strategy``."""
    strategy, options = _strategy(cfg), _options(cfg.trainer)
    if not options:
        return None
    valid = STRATEGY_OPTIONS.get(strategy)
    if valid is None:
        return (f"trainer.strategy_options={options}: trainer.strategy={strategy} takes no options; only "
                f"{' and '.join(f'trainer.strategy={s}' for s in STRATEGY_OPTIONS)} do")
    problems = []
    for key, value in options.items():
        if key not in valid:
            problems.append(f"unknown key trainer.strategy_options.{key}={value!r}; valid keys for "
                            f"trainer.strategy={strategy}: {', '.join(valid)}")
        elif value not in valid[key] or type(value) is not type(valid[key][0]):
            problems.append(f"trainer.strategy_options.{key}={value!r}: choose one of: "
                            f"{', '.join(map(str, valid[key]))}")
    return "; ".join(problems) or None


def check_cuda(cfg: DictConfig) -> Optional[str]:
    """A GPU accelerator, or DeepSpeed (CUDA only in Lightning), on a machine without CUDA."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto")).lower()
    strategy = _strategy(cfg)
    if accelerator not in ("gpu", "cuda") and strategy != "deepspeed":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    what = f"trainer.strategy={strategy} with trainer.accelerator={accelerator}"
    instead = CPU_PRESET.get(strategy, "trainer=cpu")
    reason = "DeepSpeed runs on CUDA GPUs only" if strategy == "deepspeed" else "it needs a CUDA GPU"
    return f"{what}: {reason}, and this machine has none (torch.cuda.is_available() is False); here use {instead}"


def check_deepspeed_installed(cfg: DictConfig) -> Optional[str]:
    if _strategy(cfg) != "deepspeed" or importlib.util.find_spec("deepspeed") is not None:
        return None
    return f"trainer.strategy=deepspeed needs the package deepspeed, which is not installed: {EXTRA_DEEPSPEED}"


def check_sharded_precision(cfg: DictConfig) -> Optional[str]:
    """FSDP/DeepSpeed cannot shard bitsandbytes' 8/4-bit parameters (see :data:`UNSHARDABLE_PRECISIONS`)."""
    strategy, precision = _strategy(cfg), _plugin_name(cfg, "precision")
    if precision not in UNSHARDABLE_PRECISIONS.get(strategy, ()):
        return None
    held = "the trained models' 4-bit base" if precision == "qlora" else "the frozen models' 8/4-bit weights"
    return (f"trainer.strategy={strategy} with precision={precision}: bitsandbytes' integer parameters ({held}) "
            f"cannot be flattened into {strategy}'s shards; with trainer.strategy={strategy} use "
            f"{SHARDABLE[strategy]}, or keep precision={precision} with trainer=ddp (GPU) / trainer=ddp_cpu")


def check_sharded_ppo(cfg: DictConfig) -> Optional[str]:
    """A sampling or PPO stage under a sharded strategy: what the stage does that sharding cannot follow."""
    strategy, stage = _strategy(cfg), OmegaConf.select(cfg, "stage")
    if strategy in SHARDED and stage in ("collect", "eval", "app"):
        return (f"trainer.strategy={strategy} with +stage={stage}: the stage samples without training, and a "
                "sharded model's every forward is collective; use trainer=ddp_cpu or trainer=ddp (each process "
                "holds the whole policy)")
    if strategy not in SHARDED or stage not in PPO_STAGES:
        return None
    if strategy == "deepspeed":
        return (f"trainer.strategy=deepspeed with +stage={stage}: Lightning's DeepSpeedStrategy takes one optimizer "
                "and PPO steps two (policy and critic); use trainer=fsdp for PPO (deepspeed: sft, rm)")
    # What PPO does outside the FSDP roots' forward cannot follow the shards: the LoRA reference is the policy's
    # modules called with the adapters off, the shared critic's value head reads the trunk's hidden states, and the
    # static backend's compiled step calls the model's submodules with its own weights.
    problems = []
    if _plugin_name(cfg, "precision") == "lora":
        problems.append("precision=lora (the reference is the sharded policy with its adapters disabled, called "
                        "outside its FSDP root); use precision=fp32 or bf16-mixed")
    if OmegaConf.select(cfg, "ppo.critic") == "shared":
        problems.append("ppo.critic=shared (the value head reads the sharded policy's hidden states outside its "
                        "FSDP root); use ppo.critic=separate")
    if _plugin_name(cfg, "generation") == "static":
        problems.append("generation=static (its compiled step calls the model's layers with gathered weights of its "
                        "own); use generation=hf")
    if not problems:
        return None
    return (f"trainer.strategy=fsdp with +stage={stage} cannot shard PPO with " + "; ".join(problems) +
            "; or keep these settings with trainer=ddp / ddp_cpu (every process holds its models whole)")


def check_fsdp_settings(cfg: DictConfig) -> Optional[str]:
    """FSDP settings that fail here: a full state dict on CPU processes; two kinds of checkpointing."""
    if _strategy(cfg) != "fsdp":
        return None
    options = _options(cfg.trainer)
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto")).lower()
    if accelerator == "cpu" and options.get("state_dict_type", "full") == "full":
        return ("trainer.strategy=fsdp on trainer.accelerator=cpu with trainer.strategy_options.state_dict_type=full: "
                "Lightning gathers full state dicts with offload_to_cpu=True, which crashes FSDP on CPU processes "
                "(segmentation fault, torch 2.13); set trainer.strategy_options.state_dict_type=sharded "
                "(trainer=fsdp_cpu does)")
    if options.get("activation_checkpointing") and OmegaConf.select(cfg, "model.gradient_checkpointing"):
        return ("trainer.strategy_options.activation_checkpointing=true with model.gradient_checkpointing=true: "
                "both recompute the decoder layers' activations; choose one")
    return None


def check_deepspeed_settings(cfg: DictConfig) -> Optional[str]:
    """ZeRO offloads the weights only at stage 3 (stage 2 keeps them whole on every GPU)."""
    options = _options(cfg.trainer)
    if _strategy(cfg) != "deepspeed" or not options.get("offload_parameters") or options.get("stage", 2) == 3:
        return None
    return (f"trainer.strategy_options.offload_parameters=true with trainer.strategy_options.stage="
            f"{options.get('stage', 2)}: only ZeRO stage 3 partitions (and so can offload) the weights; set "
            "trainer.strategy_options.stage=3, or offload_optimizer=true at stage 2")


def check_nodes(cfg: DictConfig) -> Optional[str]:
    """Several nodes need a cluster environment Lightning recognises, set up by the launcher."""
    nodes = OmegaConf.select(cfg, "trainer.num_nodes", default=1)
    if nodes is None or nodes <= 1:
        return None
    env = cluster_environment()
    if env is not None:
        return None
    return (f"trainer.num_nodes={nodes}, but this process was not started by a multi-node launcher: start it on "
            f"every node with torchrun --nnodes {nodes} --nproc-per-node <devices> --rdzv-backend c10d "
            "--rdzv-endpoint <host>:29500 -m rlhf_pl ..., or in a SLURM allocation with srun (docs/scaling.md), or "
            "set MASTER_ADDR, MASTER_PORT and NODE_RANK on every node")


def check_slurm_tasks(cfg: DictConfig) -> Optional[str]:
    """Inside a SLURM job, Lightning wants one task per device and the job's node count."""
    if "SLURM_NTASKS" not in os.environ or cluster_environment() != "SLURMEnvironment":
        return None
    devices, nodes = OmegaConf.select(cfg, "trainer.devices"), OmegaConf.select(cfg, "trainer.num_nodes", default=1)
    tasks, job_nodes = os.environ.get("SLURM_NTASKS_PER_NODE"), os.environ.get("SLURM_NNODES")
    if tasks is not None and tasks.isdigit() and devices != int(tasks):
        return (f"trainer.devices={devices!r} in a SLURM job with --ntasks-per-node={tasks}: Lightning runs one "
                f"process per SLURM task, so set trainer.devices={tasks}")
    if job_nodes is not None and job_nodes.isdigit() and nodes != int(job_nodes):
        return f"trainer.num_nodes={nodes} in a SLURM job with --nodes={job_nodes}: set trainer.num_nodes={job_nodes}"
    return None


def cluster_environment() -> Optional[str]:
    """The cluster environment Lightning's Trainer would pick for this process (its own detection,
    in its order: torchrun/TorchElastic, SLURM, LSF, MPI), ``"LightningEnvironment"`` when the
    variables of a manual multi-node launch (MASTER_ADDR and NODE_RANK) are set, else None."""
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    for env_type in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if env_type.detect():
            return env_type.__name__
    if "MASTER_ADDR" in os.environ and "NODE_RANK" in os.environ:
        return "LightningEnvironment"
    return None


CHECKS: tuple[Callable[[DictConfig], Optional[str]], ...] = (
    check_options, check_cuda, check_deepspeed_installed, check_sharded_precision, check_sharded_ppo,
    check_fsdp_settings, check_deepspeed_settings, check_nodes, check_slurm_tasks,
)
