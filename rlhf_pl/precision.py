"""Built-in precision strategies: how each model of a stage is held and trained.

``precision=<name>`` (the ``rlhf_pl.precision`` plugin kind) decides, per experiment:

================  ===================  ============================  ====================  ===============
strategy          trained models       frozen models (PPO: ref, RM)  PPO reference         Lightning
================  ===================  ============================  ====================  ===============
``auto``          ``bf16-mixed`` where the device has native bfloat16 matmuls, else ``fp32`` (the default)
``fp32``          float32, all params  float32                       frozen copy           32-true
``bf16-mixed``    float32, all params  linear weights bfloat16 [1]_  frozen copy           bf16-mixed
``fp16-mixed``    float32, all params  linear weights float16 [1]_   frozen copy           16-mixed (CUDA)
``int8-frozen``   float32, all params  8-bit LLM.int8                frozen copy, 8-bit    ``compute``
``nf4-frozen``    float32, all params  4-bit NF4                     frozen copy, NF4      ``compute``
``lora``          LoRA on float32      float32                       policy, adapter off   ``compute``
``qlora``         LoRA on NF4          4-bit NF4                     policy, adapter off   ``compute``
================  ===================  ============================  ====================  ===============

.. [1] The frozen models only run under autocast, which would cast each float32 linear weight to
   the autocast dtype at every call: the weight is stored cast once instead (bit-identical outputs,
   half the memory of those weights). Embeddings, norms, the output layer and heads stay float32.

"Trained models" are the policy (SFT, PPO), the reward model (RM) and the critic (PPO); heads
(reward, value) are always float32 and fully trained. ``compute`` (fp32 | bf16-mixed |
fp16-mixed) is the autocast of the quantising/adapter strategies. An 8-bit optimizer is a separate
choice (``<stage>.optim.optimizer=adamw8bit | paged_adamw8bit``), and so is activation
checkpointing (``model.gradient_checkpointing=true``, applied when a trained model is loaded).

The interface a stage uses (:class:`PrecisionStrategy`), in call order::

    precision = build_for_stage(cfg, "ppo", frozen=("reference", "reward model"))  # checks; loads nothing
    policy = precision.prepare_trainable(load_causal_lm(policy_cfg))    # qlora: NF4 base; lora/qlora: adapters
    reference = (precision.reference_from_policy(policy) if precision.shares_reference
                 else precision.prepare_frozen(load_causal_lm(policy_cfg)))   # int8/nf4: quantised, frozen
    reward_model = RewardModel.from_pretrained(reward_dir)
    # copy the FLOAT trunk first
    critic = precision.prepare_trainable(Critic(copy.deepcopy(reward_model.trunk), ValueHead(d)))
    reward_model = precision.prepare_frozen(reward_model)               # then quantise the reward model
    trainer = make_trainer(cfg, run_dir, precision, ...)                # Trainer(precision=precision.trainer_precision)
    ...
    save_pretrained_atomic(precision.export(policy), tokenizer, run_dir / "model")   # merged float model

``reference_from_policy`` returns a :class:`rlhf_pl.models.adapters.PolicyReference`: callable like
the model (``response_logprobs(reference, ...)`` works), not an ``nn.Module`` (it adds nothing to a
LightningModule's state dict), ``eval()``/``train()``/``requires_grad_()`` are no-ops — do not pass
it to functions that change dropout or freeze parameters. ``state_dict()`` of a prepared model
loads back strictly into a model prepared the same way (NF4 statistics included), so checkpoints
and resume work unchanged; :func:`rlhf_pl.models.adapters.trainable_state_dict` gives the much
smaller adapter-only state when that is all a checkpoint needs.

``check`` refuses impossible combinations *before any model is loaded*, naming the combination and
what to use instead: fp16 compute anywhere but CUDA; a ``trainer.precision`` that disagrees with
the plugin; int8/nf4 on an accelerator bitsandbytes does not support; ``int8-frozen`` /
``nf4-frozen`` in a stage that has no frozen model (sft, rm: their only model is fully fine-tuned,
and 8/4-bit weights cannot be trained — use ``qlora``); lora/qlora without peft installed.

The heavy imports (peft, bitsandbytes) happen in :mod:`rlhf_pl.models.adapters`, only when a
strategy that needs them prepares a model.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
from typing import Any, Optional, Protocol, Sequence, Union, runtime_checkable

import torch

from rlhf_pl.errors import UserError
from rlhf_pl.plugins.specs import (
    AutoPrecisionConfig,
    BF16MixedConfig,
    FP16MixedConfig,
    FP32Config,
    Int8FrozenConfig,
    LoRAPrecisionConfig,
    NF4FrozenConfig,
    QLoRAPrecisionConfig,
)

log = logging.getLogger(__name__)

# Lightning's aliases for the values the built-in strategies use.
_LIGHTNING_ALIASES: dict[str, str] = {
    "32": "32-true", "32-true": "32-true",
    "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
    "16": "16-mixed", "16-mixed": "16-mixed",
}
_CHOICES = "precision=fp32, precision=bf16-mixed, precision=fp16-mixed"
# `compute` of the quantising / adapter strategies -> (Lightning precision, dtype of dequantized weights)
COMPUTE: dict[str, tuple[str, torch.dtype]] = {
    "fp32": ("32-true", torch.float32),
    "bf16-mixed": ("bf16-mixed", torch.bfloat16),
    "fp16-mixed": ("16-mixed", torch.float16),
}
BNB_ACCELERATORS = ("cpu", "cuda", "xpu")  # where bitsandbytes 0.50 has kernels


class PrecisionError(UserError, ValueError):
    """The precision plugin cannot work with this accelerator, stage or trainer.precision."""


@runtime_checkable
class PrecisionStrategy(Protocol):
    """What the stages need from a precision plugin (see the module docstring for the call order)."""

    name: str  # the plugin name used in the config (precision=<name>)
    trainer_precision: str  # Lightning's Trainer(precision=...) value
    shares_reference: bool  # PPO: the reference is the policy with its adapters disabled (no copy)

    def check(self, accelerator: str, trainer_precision: Optional[Union[str, int]], *,
              stage: Optional[str] = None, frozen: Optional[Sequence[str]] = None) -> None:
        """Raise :class:`PrecisionError` if this strategy cannot work; call before loading models.

        ``stage`` and ``frozen`` (the roles of the stage's frozen models, e.g. ``("reference",
        "reward model")``; empty for sft and rm) enable the stage-dependent checks.
        """
        ...

    def prepare_trainable(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model about to be trained (causal LM, reward model, critic): quantise its base and/or
        add adapters as the strategy says; returns the model to train (same object)."""
        ...

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model that never trains (reference, reward model in PPO): quantise if the strategy
        says so, ``requires_grad=False``, eval mode; returns it."""
        ...

    def reference_from_policy(self, policy: torch.nn.Module) -> Any:
        """PPO's reference when :attr:`shares_reference`: the policy with its adapters disabled."""
        ...

    def export(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to save at the end of a stage: merged plain float weights under lora/qlora
        (changes ``model`` in place: call once, after training); ``model`` itself otherwise."""
        ...


def inference_autocast(strategy: PrecisionStrategy, device: torch.device) -> Any:
    """The autocast a stage without a Lightning trainer (sampling only) runs its forwards under:
    the one Lightning would use for the strategy's ``trainer_precision``; a no-op for 32-bit."""
    dtypes = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
    dtype = dtypes.get(strategy.trainer_precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def resolve_accelerator(accelerator: str) -> str:
    """``"auto"`` → ``"cuda"`` when a CUDA device is available, else ``"cpu"``; ``"gpu"`` → ``"cuda"``."""
    value = str(accelerator).lower()
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if value == "gpu" else value


def _where(accelerator: str) -> str:
    return "CPU" if accelerator == "cpu" else f"accelerator={accelerator}"


def _check_agreement(name: str, own: str, trainer_precision: Optional[Union[str, int]]) -> None:
    """A trainer.precision that is set must mean the same as the plugin's value."""
    if trainer_precision is None:
        return
    given = str(trainer_precision)
    if _LIGHTNING_ALIASES.get(given, given) != own:
        raise PrecisionError(
            f"trainer.precision={given} disagrees with precision={name} (Lightning precision {own}); "
            f"drop trainer.precision and choose the precision plugin instead ({_CHOICES}, or precision.compute "
            "of int8-frozen, nf4-frozen, lora, qlora)"
        )


def build_for_stage(cfg: Any, stage: str, frozen: Sequence[str] = ()) -> PrecisionStrategy:
    """The precision plugin of ``cfg``, checked against the accelerator, ``trainer.precision`` and
    the stage's models before any model is loaded. ``frozen``: roles of the stage's frozen models."""
    from rlhf_pl import registry

    strategy = registry.build("precision", cfg.precision)
    strategy.check(cfg.trainer.accelerator, cfg.trainer.precision, stage=stage, frozen=tuple(frozen))
    log.info("precision=%s: %s", strategy.name, strategy.describe())
    return strategy


class _Strategy:
    """Full fine-tuning of trained models, frozen models as they are: the fp32/bf16/fp16 behaviour."""

    name = ""
    trainer_precision = ""
    shares_reference = False
    frozen_quantization: Optional[str] = None  # None | "int8" | "nf4"
    accelerator: Optional[str] = None  # resolved by check()
    needs: tuple[str, ...] = ()  # python packages the strategy imports

    def check(self, accelerator: str, trainer_precision: Optional[Union[str, int]], *,
              stage: Optional[str] = None, frozen: Optional[Sequence[str]] = None) -> None:
        _check_agreement(self.name, self.trainer_precision, trainer_precision)
        resolved = resolve_accelerator(accelerator)
        self.accelerator = resolved
        self._check_device(resolved)
        self._check_packages()
        if stage is not None:
            self._check_stage(stage, tuple(frozen or ()))

    def _check_device(self, accelerator: str) -> None:
        """Refuse an accelerator this precision cannot run on (default: any is fine)."""

    def _check_packages(self) -> None:
        for package in self.needs:
            if importlib.util.find_spec(package) is None:
                raise PrecisionError(f"precision={self.name} needs the package {package!r}: pip install {package} "
                                     "(or choose precision=fp32 / bf16-mixed)")

    def _check_stage(self, stage: str, frozen: tuple[str, ...]) -> None:
        """Refuse a stage whose models this strategy cannot hold (default: any is fine)."""

    # --- models ---------------------------------------------------------------------------------

    def prepare_trainable(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(False)
        dtype = self.frozen_linear_dtype()
        if dtype is not None:
            from rlhf_pl.models.adapters import store_linears_in_

            names = store_linears_in_(model, dtype)
            log.info("precision=%s: %s frozen with %d linear layers stored in %s (bit-identical under autocast)",
                     self.name, type(model).__name__, len(names), dtype)
        return model.eval()

    def frozen_linear_dtype(self) -> Optional[torch.dtype]:
        """The dtype the frozen models' linear weights are stored in: the autocast dtype of a mixed
        precision strategy (the cast autocast would make at every call, made once), else None."""
        return None

    def reference_from_policy(self, policy: torch.nn.Module) -> Any:
        raise PrecisionError(
            f"precision={self.name} keeps no adapters: the PPO reference is a frozen copy "
            "(load it and call prepare_frozen); only precision=lora / qlora share the policy's weights"
        )

    def export(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def frozen_load_kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` keyword arguments that load a frozen model as :meth:`prepare_frozen`
        would hold it (bit-identical weights); ``{}`` when frozen models stay float."""
        return {}

    def describe(self) -> str:
        return f"trained models: all parameters, Lightning precision {self.trainer_precision}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(trainer_precision={self.trainer_precision!r})"


class FullPrecision(_Strategy):
    """float32 weights and compute; works everywhere."""

    name = "fp32"
    trainer_precision = "32-true"

    def __init__(self, config: FP32Config) -> None:
        self.config = config


class BF16Mixed(_Strategy):
    """float32 weights, bfloat16 autocast (CPU, and CUDA devices with bfloat16 support)."""

    name = "bf16-mixed"
    trainer_precision = "bf16-mixed"

    def __init__(self, config: BF16MixedConfig) -> None:
        self.config = config

    def _check_device(self, accelerator: str) -> None:
        _check_bf16(self.name, accelerator)

    def frozen_linear_dtype(self) -> Optional[torch.dtype]:
        return torch.bfloat16


class FP16Mixed(_Strategy):
    """float32 weights, float16 autocast with loss scaling; CUDA only."""

    name = "fp16-mixed"
    trainer_precision = "16-mixed"

    def __init__(self, config: FP16MixedConfig) -> None:
        self.config = config

    def _check_device(self, accelerator: str) -> None:
        if accelerator != "cuda":
            raise PrecisionError(
                f"precision=fp16-mixed needs a CUDA GPU; on {_where(accelerator)} use precision=bf16-mixed "
                "or precision=fp32"
            )

    def frozen_linear_dtype(self) -> Optional[torch.dtype]:
        return torch.float16


def native_bf16(accelerator: str) -> tuple[bool, str]:
    """Whether ``accelerator`` (resolved: cpu | cuda | …) multiplies bfloat16 matrices natively, and
    the evidence: a CUDA device's bf16 support, or the CPU's AVX512-BF16 / AMX-BF16 instructions.
    (Elsewhere bfloat16 autocast is emulated and slower than float32.)"""
    if accelerator == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"CUDA device {torch.cuda.get_device_name() if torch.cuda.is_available() else '(none)'} " + (
            "supports bfloat16" if ok else "has no native bfloat16")
    if accelerator == "cpu":
        capabilities = torch.cpu.get_capabilities()
        flags = [flag for flag in ("amx_bf16", "avx512_bf16") if capabilities.get(flag)]
        return bool(flags), f"CPU with {' and '.join(flags)}" if flags else "CPU without avx512_bf16 or amx_bf16"
    return False, f"accelerator={accelerator}"


class AutoPrecision(_Strategy):
    """The default: ``bf16-mixed`` where bfloat16 matmuls are native (about twice the float32 speed,
    float32 master weights), ``fp32`` elsewhere. Decided in :meth:`check` and logged."""

    name = "auto"

    def __init__(self, config: AutoPrecisionConfig) -> None:
        self.config = config
        self.trainer_precision = ""  # set by check()
        self.reason = ""

    def check(self, accelerator: str, trainer_precision: Optional[Union[str, int]], *,
              stage: Optional[str] = None, frozen: Optional[Sequence[str]] = None) -> None:
        self.accelerator = resolve_accelerator(accelerator)
        native, self.reason = native_bf16(self.accelerator)
        self.trainer_precision = "bf16-mixed" if native else "32-true"
        _check_agreement(f"auto (here {self.chosen})", self.trainer_precision, trainer_precision)

    @property
    def chosen(self) -> str:
        """The strategy ``auto`` stands for once checked: ``bf16-mixed`` or ``fp32``."""
        if not self.trainer_precision:
            raise PrecisionError("precision=auto has not been resolved yet: call check() (build_for_stage does)")
        return "bf16-mixed" if self.trainer_precision == "bf16-mixed" else "fp32"

    def frozen_linear_dtype(self) -> Optional[torch.dtype]:
        return torch.bfloat16 if self.chosen == "bf16-mixed" else None

    def describe(self) -> str:
        return f"{self.chosen} ({self.reason}); {super().describe()}"


def _check_bf16(label: str, accelerator: str) -> None:
    if accelerator == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise PrecisionError(
            f"precision={label} needs a CUDA GPU with bfloat16 support; "
            f"{torch.cuda.get_device_name()} has none: use precision=fp16-mixed or precision=fp32"
        )


# --- quantising and adapter strategies ------------------------------------------------------------------


class _ComputeStrategy(_Strategy):
    """A strategy whose autocast is its ``compute`` setting."""

    def __init__(self, config: Any) -> None:
        if config.compute not in COMPUTE:
            raise PrecisionError(f"precision.compute={config.compute!r} (precision={self.name}); "
                                 f"choose one of: {', '.join(COMPUTE)}")
        self.config = config
        self.trainer_precision, self.compute_dtype = COMPUTE[config.compute]

    @property
    def _label(self) -> str:
        return f"{self.name} with precision.compute={self.config.compute}"

    def _check_device(self, accelerator: str) -> None:
        if self.config.compute == "fp16-mixed" and accelerator != "cuda":
            raise PrecisionError(
                f"precision={self._label} needs a CUDA GPU (float16 autocast); on {_where(accelerator)} use "
                f"precision.compute=bf16-mixed or precision.compute=fp32"
            )
        if self.config.compute == "bf16-mixed":
            _check_bf16(self._label, accelerator)
        if self.frozen_quantization or getattr(self, "base_quantization", None):
            if accelerator not in BNB_ACCELERATORS:
                raise PrecisionError(
                    f"precision={self.name} quantises with bitsandbytes, which has no kernels for "
                    f"{_where(accelerator)} (it supports {', '.join(BNB_ACCELERATORS)}); use precision=lora "
                    "(adapters on float weights) or precision=fp32 / bf16-mixed"
                )

    def _quantize(self, model: torch.nn.Module, kind: str) -> list[str]:
        from rlhf_pl.models.adapters import quantize_linears_

        return quantize_linears_(model, kind, compute_dtype=self.compute_dtype,
                                 double_quant=getattr(self.config, "double_quant", True),
                                 threshold=getattr(self.config, "threshold", 6.0), device=self._device())

    def _device(self) -> Optional[torch.device]:
        """Quantise straight onto the GPU when the run uses one (bitsandbytes' usual path); else in place."""
        if self.accelerator == "cuda" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return None

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.frozen_quantization:
            names = self._quantize(model, self.frozen_quantization)
            log.info("precision=%s: %s frozen in %s (%d linear layers)", self.name, type(model).__name__,
                     self.frozen_quantization, len(names))
        return super().prepare_frozen(model)

    def frozen_load_kwargs(self) -> dict[str, Any]:
        if not self.frozen_quantization:
            return {}
        from rlhf_pl.models.adapters import bnb_config

        return {"quantization_config": bnb_config(
            self.frozen_quantization, compute_dtype=self.compute_dtype,
            double_quant=getattr(self.config, "double_quant", True), threshold=getattr(self.config, "threshold", 6.0))}


class _FrozenOnly(_ComputeStrategy):
    """Quantises frozen models only; trained models are fully fine-tuned in float32."""

    needs = ("bitsandbytes",)

    def _check_stage(self, stage: str, frozen: tuple[str, ...]) -> None:
        if not frozen:
            bits = "8 bits" if self.frozen_quantization == "int8" else "4 bits"
            raise PrecisionError(
                f"precision={self.name} holds only frozen models in {bits} (PPO's reference and reward model), and "
                f"stage {stage} has none: it fully fine-tunes its model, whose weights cannot train in {bits}. "
                "Use precision=qlora (4-bit NF4 base + LoRA adapters) or precision=lora to save memory while "
                "training, or precision=fp32 / bf16-mixed"
            )

    def describe(self) -> str:
        return (f"frozen models in {self.frozen_quantization}; trained models: all parameters in float32; "
                f"Lightning precision {self.trainer_precision}")


class Int8Frozen(_FrozenOnly):
    """Frozen models in 8 bits (LLM.int8); trained models float32."""

    name = "int8-frozen"
    frozen_quantization = "int8"

    def __init__(self, config: Int8FrozenConfig) -> None:
        super().__init__(config)
        if config.threshold < 0:
            raise PrecisionError(f"precision.threshold={config.threshold} (precision=int8-frozen); must be >= 0")


class NF4Frozen(_FrozenOnly):
    """Frozen models in 4-bit NF4; trained models float32."""

    name = "nf4-frozen"
    frozen_quantization = "nf4"

    def __init__(self, config: NF4FrozenConfig) -> None:
        super().__init__(config)


class LoRA(_ComputeStrategy):
    """LoRA adapters on the trained models' frozen float32 weights; frozen models float32."""

    name = "lora"
    shares_reference = True
    base_quantization: Optional[str] = None
    needs = ("peft",)

    def __init__(self, config: LoRAPrecisionConfig) -> None:
        super().__init__(config)
        for key, ok, rule in (("r", config.r >= 1, ">= 1"), ("alpha", config.alpha > 0, "> 0"),
                              ("dropout", 0.0 <= config.dropout < 1.0, "in [0, 1)"),
                              ("target_modules", len(config.target_modules) > 0, "a non-empty list")):
            if not ok:
                raise PrecisionError(f"precision.{key}={getattr(config, key)!r} (precision={self.name}); "
                                     f"must be {rule}")

    def prepare_trainable(self, model: torch.nn.Module) -> torch.nn.Module:
        from rlhf_pl.models.adapters import add_lora_, lora_parameter_count

        if self.base_quantization:
            self._quantize(model, self.base_quantization)
        c = self.config
        add_lora_(model, r=c.r, alpha=c.alpha, dropout=c.dropout, target_modules=list(c.target_modules))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log.info("precision=%s: %s gets LoRA r=%d alpha=%g on %s: %d adapter parameters, %d trainable of %d",
                 self.name, type(model).__name__, c.r, c.alpha, list(c.target_modules), lora_parameter_count(model),
                 trainable, total)
        return model

    def reference_from_policy(self, policy: torch.nn.Module) -> Any:
        from rlhf_pl.models.adapters import reference_from_policy

        return reference_from_policy(policy)

    def export(self, model: torch.nn.Module) -> torch.nn.Module:
        from rlhf_pl.models.adapters import merge_adapters_

        if not self.config.merge_on_export:
            log.warning("precision.merge_on_export=false: %s is exported as its adapter only (peft format); later "
                        "stages cannot start from it", type(model).__name__)
            return model
        return merge_adapters_(model)

    def describe(self) -> str:
        c = self.config
        base = "4-bit NF4" if self.base_quantization else "float32"
        frozen = f"; frozen models in {self.frozen_quantization}" if self.frozen_quantization else ""
        return (f"trained models: LoRA r={c.r} alpha={c.alpha:g} dropout={c.dropout:g} on {list(c.target_modules)} "
                f"of a frozen {base} base{frozen}; PPO reference = policy with adapters disabled; "
                f"Lightning precision {self.trainer_precision}")


class QLoRA(LoRA):
    """LoRA adapters on a 4-bit NF4 base; frozen models NF4."""

    name = "qlora"
    base_quantization = "nf4"
    frozen_quantization = "nf4"
    needs = ("peft", "bitsandbytes")

    def __init__(self, config: QLoRAPrecisionConfig) -> None:
        super().__init__(config)
