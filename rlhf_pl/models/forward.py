"""Forward passes over padded rows, with a prompt that several rows share run once.

Each of PPO's rollouts holds K answers per prompt, eval's best-of-n 16, a reward model's ranking K
completions of one prompt; the prompt is most of each row (an embedded prompt is ~50 tokens, an
answer ~13). :func:`forward_columns` runs every distinct prefix once, keeps its KV cache (with
gradients, when grad mode is on), indexes it to the rows, and runs each row's remaining columns
against it. A token attends to the same keys with the same positions as in one pass over the whole
row, so the result is the same up to floating-point rounding, and so are the gradients: the prefix's
share of the gradient sums over the rows that read it.

Rows layout: ``(b, t)`` ids and mask, each row's prefix in columns ``[0, prefix_length)`` (left
padding in them is part of the prefix), the rest after it (right padding allowed). Position ids come
from the mask, as everywhere in this package, so padding changes nothing.
"""
from __future__ import annotations

import inspect
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

Output = Literal["logits", "hidden"]


def position_ids_from_mask(mask: Tensor) -> Tensor:
    """Positions counting only attended tokens. Shape: (b, t) -> (b, t) long.

    ``cumsum(mask) - 1`` clamped at 0: left padding gets 0, the first real token 0, and a padded
    position after the last real token repeats the last real position.
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def accepts(model: Any, name: str) -> bool:
    """``model.forward`` takes ``name`` (an FSDP root: its wrapped model's forward, which it calls)."""
    from rlhf_pl.strategies import unwrapped

    return name in inspect.signature(unwrapped(model).forward).parameters


class PrefixGroups(NamedTuple):
    """Rows grouped by their prefix. Attributes: first (u,) long, a row holding each distinct prefix
    (its first row); inverse (b,) long, the distinct prefix of each row (an index into ``first``)."""

    first: Tensor
    inverse: Tensor


def prefix_groups(input_ids: Tensor, attention_mask: Tensor, prefix_length: int) -> PrefixGroups:
    """Rows whose first ``prefix_length`` ids and mask values are all equal share a group.

    Shapes: input_ids, attention_mask (b, t) -> first (u,), inverse (b,); groups in the order of
    their first row, so rows already grouped keep their order.
    """
    key = torch.cat([input_ids[:, :prefix_length], attention_mask[:, :prefix_length].to(input_ids.dtype)], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(key.shape[0], device=key.device)
    first = torch.full((int(inverse.max()) + 1,), key.shape[0], dtype=torch.long, device=key.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    order = torch.argsort(first)  # renumber the groups by first row
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    return PrefixGroups(first[order], rank[inverse])


def _output(out: Any, output: Output) -> Tensor:
    return out.logits if output == "logits" else out.last_hidden_state


def _keep(model: Any, output: Output, columns: int) -> dict[str, int]:
    """``logits_to_keep`` for the last ``columns`` columns where the model takes it (0 would mean all)."""
    return {"logits_to_keep": max(columns, 1)} if output == "logits" and accepts(model, "logits_to_keep") else {}


def _plain_cache(cache: Any) -> bool:
    """A cache whose every layer holds all past keys (no sliding window, no quantisation)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def shares_prefix(model: Any, groups: PrefixGroups, prefix_mask: Tensor) -> bool:
    """Whether :func:`forward_columns` splits the pass: some rows share a prefix, every row has a token
    in it (a prefix of padding alone gives its cache nothing defined to hold), and the model does not
    recompute activations in backward (transformers turns the cache off under gradient checkpointing).
    Shape: prefix_mask (b, p)."""
    from rlhf_pl.runtime import checkpoints_activations
    from rlhf_pl.strategies import unwrapped

    target = unwrapped(model)  # a PolicyReference (LoRA policy, adapters off) is no module: it never trains
    checkpoints = isinstance(target, nn.Module) and checkpoints_activations(target)
    return len(groups.first) < len(groups.inverse) and bool(prefix_mask.any(dim=1).all()) and not checkpoints


def forward_columns(model: Any, input_ids: Tensor, attention_mask: Tensor, prefix_length: int, from_column: int,
                    output: Output = "logits") -> Tensor:
    """``output`` (a causal LM's logits or a trunk's last hidden states) at columns ``from_column``
    to ``t - 1``, each distinct prefix (columns ``[0, prefix_length)``) computed once.

    Two passes when rows share prefixes (:func:`shares_prefix`): the u distinct prefixes with the
    KV cache on, then the b rows' remaining columns against the cache indexed by row. One ordinary
    pass otherwise, and also when the model's cache is not a plain dynamic cache (a sliding window
    drops keys the rows need; the prefix pass is then wasted, never the result wrong). Grad mode and
    train/eval mode are the caller's. Shapes: input_ids, attention_mask (b, t) ->
    (b, t - from_column, v) logits or (b, t - from_column, d) hidden states.
    """
    b, t = input_ids.shape
    if not 0 <= from_column <= prefix_length < t:
        raise ValueError(f"need 0 <= from_column ({from_column}) <= prefix_length ({prefix_length}) < length ({t})")
    positions = position_ids_from_mask(attention_mask)
    groups = prefix_groups(input_ids, attention_mask, prefix_length) if prefix_length > 0 else None
    if groups is not None and shares_prefix(model, groups, attention_mask[:, :prefix_length]):
        p, head_columns = prefix_length, prefix_length - from_column
        rows = groups.first
        head = model(input_ids=input_ids[rows, :p], attention_mask=attention_mask[rows, :p],
                     position_ids=positions[rows, :p], use_cache=True, **_keep(model, output, head_columns))
        cache = head.past_key_values
        if _plain_cache(cache):
            cache.batch_select_indices(groups.inverse)  # (u, ...) -> (b, ...), differentiable indexing
            tail = model(input_ids=input_ids[:, p:], attention_mask=attention_mask, position_ids=positions[:, p:],
                         past_key_values=cache, use_cache=True)
            head_out = _output(head, output)
            head_out = head_out[:, head_out.shape[1] - head_columns:]  # (u, p - from_column, ...)
            return torch.cat([head_out[groups.inverse], _output(tail, output)], dim=1)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                **_keep(model, output, t - from_column))
    full = _output(out, output)
    return full[:, full.shape[1] - (t - from_column):]
