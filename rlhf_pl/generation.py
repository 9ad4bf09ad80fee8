"""Generation backends: the plugin kind ``generation`` (``generation=hf`` | ``generation=static``).

Every sampler call of the project (PPO rollouts, collect, eval, SFT / RM samples, the app's worker)
goes through one :class:`GenerationBackend`; the sampling loop itself — sampler plugin, EOS, masks,
K samples per prompt, ``on_token`` — is :func:`rlhf_pl.models.generate.generate` for both backends,
which differ only in how the model is called (a :class:`~rlhf_pl.models.generate.Decoder`):

- ``hf`` (:class:`HFGeneration`): transformers' ``DynamicCache``, one eager forward per token.
- ``static`` (:class:`StaticGeneration`): the prompts are prefilled once (eagerly, as ``hf``: the
  first token's logits are the same), their KV cache is copied into a preallocated cache of b·K rows
  of transformers' ``StaticLayer`` (length: prompt + ``max_new_tokens`` rounded up to
  ``cache_bucket``), and every later step is one call of a decode step compiled with
  ``torch.compile`` (``dynamic=False``: a graph per batch rows × cache length × dtype, shared by all
  prompt lengths of a bucket). Under autocast the linear weights are cast to the autocast dtype once
  per call (as :func:`rlhf_pl.runtime.weights_cast_once` does for ``hf``) and passed to the step as
  inputs, so the compiled graph does not re-cast them at every token.

Never stale weights: nothing derived from the weights outlives a call. The compiled graph takes the
model's parameters as inputs (torch.compile lifts module parameters to graph inputs), the bf16
copies are made at the start of each call from the current parameters, and dynamo's guards recompile
when the module structure changes (LoRA adapters added, disabled or merged). Tested in
tests/test_generation_backends.py by stepping an optimizer (plain and LoRA) between calls.

Shapes: ``b`` distinct prompts, ``K`` samples each, ``p`` prompt length, ``T`` cache length, ``v`` vocabulary.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, StaticLayer, get_layer_types_and_kwargs

from rlhf_pl.errors import UserError
from rlhf_pl.models.adapters import PolicyReference, adapters_disabled
from rlhf_pl.models.generate import Generation, OnToken, _step, generate
from rlhf_pl.plugins.samplers import Sampler
from rlhf_pl.plugins.specs import HFGenerationConfig, StaticGenerationConfig
from rlhf_pl.rl.masked import AllReduce


class GenerationError(UserError, ValueError):
    """The chosen generation backend cannot run this model (the message names the model and the way out)."""


class GenerationBackend(Protocol):
    """Samples completions of LEFT-padded prompts from a causal LM's current weights."""

    def generate(self, model: Any, prompt_ids: Tensor, prompt_mask: Tensor, sampler: Sampler, max_new_tokens: int,
                 eos_token_id: int, pad_token_id: int, generator: Optional[torch.Generator] = None, *,
                 num_samples: int = 1, on_token: Optional[OnToken] = None,
                 sync_ranks: Optional[AllReduce] = None) -> Generation:
        """As :func:`rlhf_pl.models.generate.generate`. Shapes: prompt_ids, prompt_mask (b, p) ->
        :class:`Generation` with b·K rows (row i·K + j: sample j of prompt i) and n <= max_new_tokens
        response columns; ``on_token(tokens (b·K,), ended (b·K,))`` after every step may return rows to end;
        ``sync_ranks``: the all-reduce that keeps processes sharing a sharded model in lockstep."""
        ...


class HFGeneration:
    """``generation=hf``: today's loop on transformers' ``DynamicCache``."""

    def __init__(self, config: HFGenerationConfig) -> None:
        self.config = config

    def generate(self, model: Any, prompt_ids: Tensor, prompt_mask: Tensor, sampler: Sampler, max_new_tokens: int,
                 eos_token_id: int, pad_token_id: int, generator: Optional[torch.Generator] = None, *,
                 num_samples: int = 1, on_token: Optional[OnToken] = None,
                 sync_ranks: Optional[AllReduce] = None) -> Generation:
        """See :class:`GenerationBackend`."""
        return generate(model, prompt_ids, prompt_mask, sampler, max_new_tokens, eos_token_id, pad_token_id,
                        generator, num_samples=num_samples, on_token=on_token, sync_ranks=sync_ranks,
                        compact=self.config.compact)

    def __repr__(self) -> str:
        return f"HFGeneration(compact={self.config.compact})"


class _StaticLayer(StaticLayer):
    """transformers' ``StaticLayer`` storing every update in its own dtype: under autocast a Llama's
    keys leave the rotary embedding in float32 while its values leave ``v_proj`` in bfloat16 (the
    ``DynamicCache`` of ``hf`` holds both in float32: ``torch.cat`` promotes)."""

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return super().update(key_states.to(self.dtype), value_states.to(self.dtype), *args, **kwargs)


def cache_length(prompt_length: int, max_new_tokens: int, bucket: int) -> int:
    """Static cache length T: p + max_new_tokens rounded up to a multiple of ``bucket``."""
    return -(-(prompt_length + max_new_tokens) // bucket) * bucket


def cache_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the static cache stores ``dtype`` keys and values in: under autocast its dtype (the
    attention casts keys and values to it at every call — SDPA and matmul are autocast ops — so
    rounding them once when they are written gives the attention the same numbers, and saves
    converting the whole float32 cache at every step and layer); else ``dtype``."""
    if dtype.is_floating_point and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def static_cache_from(prefill: DynamicCache, num_samples: int, length: int) -> Cache:
    """A static cache of b·K rows and ``length`` columns holding the prefill's keys and values, each
    prompt's repeated K times (row i·K + j from row i), positioned after the p prompt columns, in
    :func:`cache_dtype`.

    Shapes: prefill layers (b, h, p, d) -> layers (b·K, h, T, d), ``cumulative_length`` p.
    """
    layers = []
    for source in prefill.layers:
        keys, values = source.keys, source.values  # (b, h, p, d)
        rows, heads, p = keys.shape[0] * num_samples, keys.shape[1], keys.shape[2]
        layer = _StaticLayer(max_cache_len=length)
        layer.lazy_initialization(
            keys.new_empty(rows, heads, 0, keys.shape[-1], dtype=cache_dtype(keys.device, keys.dtype)),
            values.new_empty(rows, heads, 0, values.shape[-1], dtype=cache_dtype(values.device, values.dtype)),
        )  # allocates (b·K, h, T, d)
        layer.keys[:, :, :p].copy_(keys.repeat_interleave(num_samples, dim=0))
        layer.values[:, :, :p].copy_(values.repeat_interleave(num_samples, dim=0))
        layer.cumulative_length.fill_(p)
        layers.append(layer)
    return Cache(layers=layers)


def autocast_linear_weights(model: nn.Module, device: torch.device) -> dict[str, Tensor]:
    """Under autocast: every floating weight and bias of the model's ``nn.Linear`` layers, cast to the
    autocast dtype (what autocast would cast them to at every call), by their full names (a weight
    tied to the input embedding is cast for the linear layer only). Outside autocast: {}."""
    if not torch.is_autocast_enabled(device.type):
        return {}
    dtype = torch.get_autocast_dtype(device.type)
    cast: dict[str, Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear):
            for name, param in module.named_parameters(recurse=False):
                if param.is_floating_point():  # quantised weights (int8, NF4) stay as they are
                    cast[f"{module_name}.{name}" if module_name else name] = param.detach().to(dtype)
    return cast


# transformers' switch for grouped-query attention in SDPA (transformers.integrations.sdpa_attention.use_gqa_in_sdpa)
FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def sdpa_grouped_query_attention() -> Iterator[None]:
    """Inside the block transformers' SDPA attention passes ``enable_gqa=True`` to torch for models with
    fewer key/value heads than query heads. Eager decoding (``hf``) avoids repeating the keys and
    values per query head by folding the heads of a single query (``pack_gqa``), but not while dynamo
    traces: there it falls back to ``repeat_kv``, which copies the whole static cache (b·K, h_kv, T, d)
    to h_q heads in every layer at every step — on the CPU several times the cost of the attention
    itself. torch's SDPA with ``enable_gqa`` reads each key/value head once, as ``pack_gqa`` does."""
    previous = os.environ.get(FORCE_GQA)
    os.environ[FORCE_GQA] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[FORCE_GQA]
        else:
            os.environ[FORCE_GQA] = previous


def decode_step(model: nn.Module, params: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor,
                position_ids: Tensor, cache: Cache) -> Tensor:
    """One decode step on the static cache (the function ``torch.compile`` compiles); ``params``
    replace the model's tensors of the same names for this call.

    Shapes: input_ids (b·K, 1), attention_mask (b·K, T), position_ids (b·K, 1) -> logits (b·K, v) float32.
    """
    out = torch.func.functional_call(
        model, params, (),
        {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
         "past_key_values": cache, "use_cache": True},
        tie_weights=False, strict=False)
    return out.logits[:, -1, :].float()


class StaticCacheDecoder:
    """``generation=static``'s :class:`~rlhf_pl.models.generate.Decoder`: eager prefill on a
    ``DynamicCache`` (as ``hf``, with the weights cast once for prefill and steps alike), copied into
    a static cache of b·K rows; then ``step_fn`` per token."""

    def __init__(self, model: nn.Module, step_fn: Callable[..., Tensor], max_new_tokens: int, bucket: int) -> None:
        self.model, self.step_fn, self.max_new_tokens, self.bucket = model, step_fn, max_new_tokens, bucket
        self.cache: Optional[Cache] = None
        self.length = 0
        self.params: dict[str, Tensor] = {}

    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int) -> Tensor:
        """(b, p), (b, p) -> (b·K, v) float32."""
        self.params = autocast_linear_weights(self.model, prompt_ids.device)  # from the current weights, this call only
        logits, prefill = _step(self.model, prompt_ids, prompt_mask, None, keep_last=True, params=self.params)
        if not isinstance(prefill, DynamicCache) or any(
                not isinstance(layer.keys, Tensor) for layer in getattr(prefill, "layers", [])):
            raise GenerationError(f"generation=static copies the prompts' KV cache into a static cache, but "
                                  f"{type(self.model).__name__} returned a {type(prefill).__name__} cache; use "
                                  f"generation=hf")
        self.length = cache_length(prompt_ids.shape[1], self.max_new_tokens, self.bucket)
        self.cache = static_cache_from(prefill, num_samples, self.length)
        return logits.repeat_interleave(num_samples, dim=0) if num_samples > 1 else logits

    def step(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """(b·K,), (b·K, p + s) -> (b·K, v) float32. The mask is padded with zeros to the cache length T;
        the position of the new token is that of ``position_ids_from_mask(mask)[:, -1]``."""
        full_mask = F.pad(mask, (0, self.length - mask.shape[1]))  # (b·K, T)
        positions = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)  # (b·K, 1)
        with sdpa_grouped_query_attention():
            return self.step_fn(self.model, self.params, tokens.unsqueeze(-1).contiguous(), full_mask, positions,
                                self.cache)


def check_static_support(model: Any) -> None:
    """A clear error unless ``model`` is a transformers causal LM whose forward takes a static cache
    (``_can_compile_fullgraph``) and whose layers are all full attention (this backend's cache)."""
    from transformers import PreTrainedModel

    name = type(model).__name__
    if not isinstance(model, PreTrainedModel) or not getattr(model, "_can_compile_fullgraph", False):
        raise GenerationError(f"generation=static needs a transformers model whose forward supports a static KV "
                              f"cache (transformers' StaticCache); {name} does not: use generation=hf")
    layer_types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    other = sorted(set(layer_types) - {"full_attention"})
    if other:
        raise GenerationError(f"generation=static supports full-attention layers only; {name} has {', '.join(other)} "
                              f"layers: use generation=hf")


class StaticGeneration:
    """``generation=static``: preallocated static KV cache, decode step compiled with ``torch.compile``."""

    def __init__(self, config: StaticGenerationConfig) -> None:
        config.__post_init__()  # a ConfigError naming the key (also for a config changed after it was built)
        self.config = config
        self.step_fn: Callable[..., Tensor] = decode_step
        if config.compile:
            self.step_fn = torch.compile(decode_step, backend=config.backend, dynamic=False,
                                         mode=config.mode if config.backend == "inductor" else None)

    def generate(self, model: Any, prompt_ids: Tensor, prompt_mask: Tensor, sampler: Sampler, max_new_tokens: int,
                 eos_token_id: int, pad_token_id: int, generator: Optional[torch.Generator] = None, *,
                 num_samples: int = 1, on_token: Optional[OnToken] = None,
                 sync_ranks: Optional[AllReduce] = None) -> Generation:
        """See :class:`GenerationBackend`. PPO's LoRA reference (a :class:`PolicyReference`) runs as
        its policy with the adapters disabled for the whole call."""
        if isinstance(model, PolicyReference):
            with adapters_disabled(model.policy):
                return self.generate(model.policy, prompt_ids, prompt_mask, sampler, max_new_tokens, eos_token_id,
                                     pad_token_id, generator, num_samples=num_samples, on_token=on_token,
                                     sync_ranks=sync_ranks)
        check_static_support(model)
        decoder = StaticCacheDecoder(model, self.step_fn, max_new_tokens, self.config.cache_bucket)
        with self._graph_limit():
            return generate(model, prompt_ids, prompt_mask, sampler, max_new_tokens, eos_token_id, pad_token_id,
                            generator, num_samples=num_samples, on_token=on_token, decoder=decoder,
                            sync_ranks=sync_ranks)

    @contextlib.contextmanager
    def _graph_limit(self) -> Iterator[None]:
        """At most ``recompile_limit`` compiled decode graphs in this process (dynamo's limit per code
        object); one more is an error, never a silent fall-back to eager code."""
        if not self.config.compile:
            yield
            return
        from torch._dynamo.exc import FailOnRecompileLimitHit

        try:
            with torch._dynamo.config.patch(recompile_limit=self.config.recompile_limit,
                                            fail_on_recompile_limit_hit=True):
                yield
        except FailOnRecompileLimitHit as err:
            raise GenerationError(
                f"generation=static needs more than generation.recompile_limit={self.config.recompile_limit} "
                f"compiled decode graphs in this process (one per model structure × batch rows × cache length × "
                f"dtype); raise generation.recompile_limit, or a larger generation.cache_bucket (now "
                f"{self.config.cache_bucket}), or keep batch sizes fixed") from err

    def __repr__(self) -> str:
        c = self.config
        return (f"StaticGeneration(compile={c.compile}, backend={c.backend!r}, mode={c.mode!r}, "
                f"cache_bucket={c.cache_bucket}, recompile_limit={c.recompile_limit})")
