"""LoRA adapters (peft) and bitsandbytes quantisation of already-loaded models.

The precision strategies (:mod:`rlhf_pl.precision`) call these; stages normally go
through a strategy rather than calling them directly. Everything works on any ``nn.Module`` that
contains Hugging Face transformers (a causal LM, a bare trunk, a :class:`RewardModel` = trunk +
head): the *transformers* inside are quantised / adapted, everything else (reward and value heads)
stays float32 and trainable.

Quantisation (:func:`quantize_linears_`) replaces each ``nn.Linear`` of a transformer — except its
output layer (``lm_head``, often tied to the input embeddings) — by a bitsandbytes
``Linear8bitLt`` (LLM.int8) or ``Linear4bit`` (NF4), in place, one layer at a time. It works for
every model source (tiny, hub, local directory, GGUF) and gives bit-identical weights to
``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` (tested), which
:func:`bnb_config` builds for code that prefers to quantise while loading.

Measured on this project's CPU machine (bitsandbytes 0.50, peft 0.21, transformers 5.x, no GPU):
``Linear8bitLt`` and NF4 ``Linear4bit`` run forward and backward on CPU; LoRA trains on top of
both; ``AdamW8bit`` keeps uint8 states on CPU; paged optimizers fall back to unpaged on CPU.
One trap: on a CPU with AVX512-BF16, an NF4 layer that sees an eval-mode, no-grad forward
repacks its weight in place for a bf16 inference kernel, and from then on *no gradient flows
through it* (``gemv_4bit`` has no autograd; torch only warns). A PPO rollout or a validation pass
followed by training would silently train QLoRA with wrong gradients, and rollout logprobs would
come from a different (bf16) kernel than training logprobs. :func:`quantize_linears_` therefore
switches that repacking off (``support_avx512bf16_for_cpu = False``): NF4 layers always compute
``x @ dequant(W).T`` in the compute dtype.

LoRA (:func:`add_lora_`) uses transformers' own PEFT integration (``model.add_adapter``), so the
model keeps its class, its ``forward`` signature (``logits_to_keep`` still works), ``trunk_of``
and ``save_pretrained``. The base weights are frozen; only the adapters (and any head outside the
transformer) train. :func:`adapters_disabled` is the reference-model trick of PPO: the policy
with its adapters switched off *is* the frozen initial policy. :func:`merge_adapters_` produces the
plain float model to export: ``W + (alpha / r)·B·A`` per adapted layer, NF4 bases dequantized
first, so the export's outputs equal the adapter model's.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

QUANT_KINDS = ("int8", "nf4")
ALL_LINEAR = "all-linear"


# --- finding the transformers inside a module --------------------------------------------------------


class TransformerSlot(NamedTuple):
    """A Hugging Face model inside a module tree: its parent (None at the root), attribute, object."""

    parent: Optional[nn.Module]
    name: str
    model: nn.Module


def transformers_in(module: nn.Module) -> list[TransformerSlot]:
    """The outermost Hugging Face ``PreTrainedModel`` s in ``module`` (``module`` itself if it is one).

    A :class:`~rlhf_pl.models.reward.RewardModel` yields its trunk; a causal LM yields itself.
    """
    from transformers import PreTrainedModel

    if isinstance(module, PreTrainedModel):
        return [TransformerSlot(None, "", module)]
    found: list[TransformerSlot] = []

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, PreTrainedModel):
                found.append(TransformerSlot(parent, name, child))
            else:
                visit(child)

    visit(module)
    if not found:
        raise TypeError(f"{type(module).__name__} contains no Hugging Face PreTrainedModel to quantise or adapt")
    return found


def _linear_children(root: nn.Module, skip: Optional[nn.Module]) -> Iterator[tuple[nn.Module, str, str, nn.Linear]]:
    """(parent, attribute, dotted name, layer) for each plain ``nn.Linear`` of ``root`` but ``skip``.

    Only names are collected up front, so a layer the caller replaces is freed right away (at most
    one float layer is alive besides the model while quantising)."""
    names = [(parent_name, name) for parent_name, parent in root.named_modules()
             for name, child in parent.named_children() if type(child) is nn.Linear and child is not skip]
    for parent_name, name in names:
        parent = root.get_submodule(parent_name) if parent_name else root
        yield parent, name, f"{parent_name}.{name}" if parent_name else name, getattr(parent, name)


# --- quantisation ----------------------------------------------------------------------------------


def bnb_config(kind: str, *, compute_dtype: torch.dtype = torch.float32, double_quant: bool = True,
               threshold: float = 6.0):
    """The ``transformers.BitsAndBytesConfig`` equivalent to :func:`quantize_linears_` with these settings."""
    from transformers import BitsAndBytesConfig

    _check_kind(kind)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=double_quant)


def _check_kind(kind: str) -> None:
    if kind not in QUANT_KINDS:
        raise ValueError(f"quantisation kind {kind!r}; choose one of: {', '.join(QUANT_KINDS)}")


def quantize_linears_(module: nn.Module, kind: str, *, compute_dtype: torch.dtype = torch.float32,
                      double_quant: bool = True, threshold: float = 6.0,
                      device: Optional[torch.device | str] = None) -> list[str]:
    """Replace the linear layers of every transformer in ``module`` by bitsandbytes layers, in place.

    ``kind``: ``"int8"`` (``Linear8bitLt``, LLM.int8 with outlier ``threshold``) or ``"nf4"``
    (``Linear4bit``, NF4 with blocks of 64, per-block scales quantised again when ``double_quant``,
    compute in ``compute_dtype``). The output layer and everything outside the transformers stay
    float. Quantised weights are frozen. ``device``: where the quantised weights go (default: where
    the float weight is). Layers quantised already (a model loaded with ``quantization_config``)
    are kept, with the CPU repacking switched off. Returns the dotted names of the replaced layers.
    """
    import bitsandbytes as bnb

    _check_kind(kind)
    replaced: list[str] = []
    already = 0
    for slot in transformers_in(module):
        root = slot.model
        if _has_adapters(root):
            raise ValueError(f"{type(root).__name__} already has LoRA adapters: quantise before adding them")
        for layer in root.modules():  # quantised while loading (from_pretrained(quantization_config=...))
            if is_quantized(layer):
                already += 1
                if isinstance(layer, bnb.nn.Linear4bit):
                    _tame_nf4(layer)
        skip = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
        for parent, name, dotted, layer in _linear_children(root, skip):
            weight, bias = layer.weight.data, layer.bias
            target = torch.device(device) if device is not None else weight.device
            if kind == "nf4":
                q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=double_quant,
                                      quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                             quant_type="nf4", module=q)._quantize(target)
                _tame_nf4(q)
            else:
                _quiet_int8_notice()
                q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias is not None,
                                        has_fp16_weights=False, threshold=threshold, device="meta")
                q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)._quantize(target)
            if bias is not None:
                q.bias = nn.Parameter(bias.data.to(target), requires_grad=False)
            q.train(layer.training)
            setattr(parent, name, q)
            del layer, weight, bias  # the float weight is freed here
            replaced.append(f"{slot.name}.{dotted}" if slot.name else dotted)
        # peft picks its bitsandbytes LoRA layers by these flags (transformers sets them when it quantises)
        setattr(root, "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit", True)
    if not replaced and not already:
        raise ValueError(f"{type(module).__name__}: no linear layer to quantise")
    return replaced


def store_linears_in_(module: nn.Module, dtype: torch.dtype) -> list[str]:
    """Hold the weights (and biases) of the plain linear layers of every transformer in ``module``
    in ``dtype``, in place, for a frozen model that only ever runs under autocast to ``dtype``.

    Autocast casts a linear layer's float32 weight to ``dtype`` at every call; a weight stored
    in ``dtype`` gives the same bits without the cast, in half the memory. The output layer (often
    tied to the input embedding, which feeds the float32 residual stream outside autocast) and
    everything outside the transformers stay float32, so outputs under autocast are bit-identical.
    Outside autocast such a model fails with a dtype mismatch. Returns the dotted names of the layers.
    """
    stored: list[str] = []
    for slot in transformers_in(module):
        root = slot.model
        skip = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
        for _, _, dotted, layer in _linear_children(root, skip):
            if layer.weight.requires_grad:
                raise ValueError(f"{slot.name or type(root).__name__}.{dotted} requires grad: only frozen "
                                 f"layers can be stored in {dtype} (call requires_grad_(False) first)")
            layer.weight.data = layer.weight.data.to(dtype)
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.to(dtype)
            stored.append(f"{slot.name}.{dotted}" if slot.name else dotted)
    return stored


class _DropCastNotice(logging.Filter):
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16" as a
    warning on *every* 8-bit matmul with float32 inputs (i.e. every forward on CPU): drop that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


def _quiet_int8_notice() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in logger.filters):
        logger.addFilter(_DropCastNotice())


def _tame_nf4(layer: nn.Module) -> None:
    """No CPU repacking (see the module docstring: it stops gradients and changes the numerics);
    state dicts load back strictly (:func:`_load_nf4_quant_state`). Idempotent."""
    layer.support_avx512bf16_for_cpu = False
    if not getattr(layer, "_rlhf_pl_state_hook", False):
        layer.register_load_state_dict_pre_hook(_load_nf4_quant_state)
        layer._rlhf_pl_state_hook = True


def _load_nf4_quant_state(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook of NF4 layers: take the saved quantisation statistics (absmax,
    quant map, ... that ``Linear4bit`` writes next to ``weight``) out of ``state_dict`` and install
    them as the layer's quant state; ``weight`` (the packed 4-bit data) then loads as usual. Without
    it bitsandbytes 0.50 refuses its own keys, so a QLoRA model's ``state_dict()`` (Lightning
    checkpoints, PPO's ``last.pt``) would not load back strictly."""
    from bitsandbytes.functional import QuantState

    head = prefix + "weight."
    keys = [k for k in state_dict if k.startswith(head)]
    if not keys:
        return
    stats = {k[len(head):]: state_dict.pop(k) for k in keys}
    quant_state = QuantState.from_dict(stats, device=module.weight.device)
    module.weight.quant_state = quant_state
    module.quant_state = quant_state


def is_quantized(layer: nn.Module) -> bool:
    """A bitsandbytes 8-bit or 4-bit linear layer."""
    name = type(layer).__name__
    return name in {"Linear8bitLt", "Linear4bit"} and type(layer).__module__.startswith("bitsandbytes")


def float_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight (out, in) a plain, 8-bit or 4-bit linear layer computes with."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        weight = layer.weight
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        cb = layer.weight.CB if layer.weight.CB is not None else layer.state.CB
        scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        cb = layer.weight.data if cb is None else cb
        return (cb.float() * scb.float().unsqueeze(1) / 127.0).to(dtype)
    if isinstance(layer, nn.Linear):
        return layer.weight.data.to(dtype)
    raise TypeError(f"{type(layer).__name__} is not a linear layer")


# --- LoRA --------------------------------------------------------------------------------------------


def _has_adapters(model: nn.Module) -> bool:
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def linear_module_names(model: nn.Module) -> list[str]:
    """Last name components of the linear layers (plain or quantised) of each transformer, sorted."""
    names = set()
    for slot in transformers_in(model):
        skip = slot.model.get_output_embeddings() if hasattr(slot.model, "get_output_embeddings") else None
        for name, layer in slot.model.named_modules():
            if isinstance(layer, nn.Linear) and layer is not skip and "lora_" not in name:
                names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(*, r: int, alpha: float, dropout: float, target_modules: Sequence[str]):
    """A ``peft.LoraConfig`` (no bias training, adapters initialised so that B·A = 0)."""
    from peft import LoraConfig

    targets: Any = list(target_modules)
    if targets == [ALL_LINEAR]:
        targets = ALL_LINEAR
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")


def add_lora_(module: nn.Module, *, r: int, alpha: float, dropout: float, target_modules: Sequence[str]) -> nn.Module:
    """Add a LoRA adapter to every transformer in ``module`` (in place); returns ``module``.

    The transformers' own weights are frozen; parameters outside them (reward / value heads) keep
    their ``requires_grad``. ``target_modules``: ``["all-linear"]`` or names of linear layers.
    """
    targets = list(target_modules)
    if targets != [ALL_LINEAR]:
        available = linear_module_names(module)
        missing = sorted(set(targets) - set(available))
        if missing:
            raise ValueError(f"precision.target_modules: {missing} not found in {type(module).__name__}; "
                             f"its linear layers are: {', '.join(available)} (or use [all-linear])")
    for slot in transformers_in(module):
        if _has_adapters(slot.model):
            raise ValueError(f"{type(slot.model).__name__} already has LoRA adapters")
        slot.model.add_adapter(lora_config(r=r, alpha=alpha, dropout=dropout, target_modules=targets))
        for name, param in slot.model.named_parameters():
            param.requires_grad_("lora_" in name)
    return module


def lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, peft LoRA layer) pairs of ``module``."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


def lora_parameter_count(module: nn.Module) -> int:
    """Σ r·(in + out) over the adapted layers: the number of LoRA parameters."""
    total = 0
    for _, layer in lora_layers(module):
        for adapter in layer.active_adapters:
            total += layer.r[adapter] * (layer.in_features + layer.out_features)
    return total


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every transformer of ``module`` runs without its adapters.

    For a LoRA policy this *is* the frozen initial policy: PPO's reference without a second copy.
    On exit the adapters are on again and trainable (``requires_grad`` restored).
    """
    roots = [slot.model for slot in transformers_in(module) if _has_adapters(slot.model)]
    if not roots:
        raise ValueError(f"{type(module).__name__} has no LoRA adapters to disable (precision is not lora/qlora)")
    trainable = {id(p): p.requires_grad for root in roots for p in root.parameters()}
    for root in roots:
        root.disable_adapters()
    try:
        yield module
    finally:
        for root in roots:
            root.enable_adapters()
            for p in root.parameters():
                p.requires_grad_(trainable[id(p)])


class PolicyReference:
    """The PPO reference model as a view of a LoRA policy: the policy, adapters disabled, eval mode,
    no gradient. Holds no weights of its own (it is not an ``nn.Module``: registering it in a
    LightningModule adds nothing to the state dict or the optimizer).

    Call it like the model (``ref(input_ids=..., attention_mask=..., position_ids=...)``); its
    ``forward`` has the policy's signature, so :func:`rlhf_pl.models.generate.response_logprobs`
    works unchanged (``logits_to_keep`` included). ``eval()``, ``train()``, ``requires_grad_()``
    and ``to()`` are no-ops: the policy owns its mode and device.
    """

    def __init__(self, policy: nn.Module) -> None:
        if not any(_has_adapters(slot.model) for slot in transformers_in(policy)):
            raise ValueError(f"reference_from_policy: {type(policy).__name__} has no LoRA adapters; "
                             "with precision other than lora/qlora load a frozen reference instead")
        self.policy = policy

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._forward(*args, **kwargs)

        forward.__signature__ = inspect.signature(policy.forward)  # what forward.accepts inspects
        self.forward = forward

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad(), adapters_disabled(self.policy):
                return self.policy(*args, **kwargs)
        finally:
            self.policy.train(was_training)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)

    @property
    def training(self) -> bool:
        return False

    @property
    def config(self) -> Any:
        return self.policy.config

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The policy's parameters (for device lookups); the reference owns none."""
        return self.policy.parameters(recurse)

    def eval(self) -> PolicyReference:
        return self

    def train(self, mode: bool = True) -> PolicyReference:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> PolicyReference:
        return self

    def to(self, *args: Any, **kwargs: Any) -> PolicyReference:
        return self

    def __repr__(self) -> str:
        return f"PolicyReference({type(self.policy).__name__} with adapters disabled)"


def reference_from_policy(policy: nn.Module) -> PolicyReference:
    """PPO's reference for a LoRA/QLoRA policy: the same object with its adapters disabled."""
    return PolicyReference(policy)


def merge_adapters_(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Merge every LoRA adapter into its layer and drop all quantisation, in place; returns ``module``.

    Each adapted layer becomes a plain ``nn.Linear`` with weight ``W + Σ (alpha/r)·B·A`` where ``W``
    is the layer's float weight (NF4/int8 weights dequantized to ``dtype``); quantised layers
    without an adapter are dequantized too. Afterwards the transformers are ordinary float models
    that ``save_pretrained`` writes in full. The adapters are gone: call it once, after training.
    """
    for slot in transformers_in(module):
        root = slot.model
        for name, layer in lora_layers(root):
            base = layer.get_base_layer()
            weight = float_weight(base, dtype)
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    weight = weight + layer.get_delta_weight(adapter).to(dtype)
            _replace(root, name, _plain_linear(weight, base.bias, dtype))
        for name, layer in list(root.named_modules()):
            if is_quantized(layer):
                _replace(root, name, _plain_linear(float_weight(layer, dtype), layer.bias, dtype))
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            if flag in vars(root):
                delattr(root, flag)
        if _has_adapters(root):
            root._hf_peft_config_loaded = False
            if hasattr(root, "peft_config"):
                del root.peft_config
        for param in root.parameters():
            param.requires_grad_(True)
    return module


def _plain_linear(weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().to(dtype).contiguous())
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype).clone())
    return layer


def _replace(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    new.train(getattr(parent, attr).training)
    setattr(parent, attr, new)


# --- trainable state (small checkpoints, resume) --------------------------------------------------------


def trainable_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Detached copies of the parameters that train (LoRA adapters and heads under lora/qlora)."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy the trainable parameters of ``module`` from ``state`` (which may hold more, e.g. a full
    Lightning state dict with the same names); every trainable parameter must be present.

    The frozen base is rebuilt identically by loading and quantising the same model again, so a
    LoRA/QLoRA checkpoint only needs the trainable tensors.
    """
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise ValueError(f"checkpoint tensor {name}: shape {tuple(state[name].shape)}, model {tuple(p.shape)}")
            p.copy_(state[name])
