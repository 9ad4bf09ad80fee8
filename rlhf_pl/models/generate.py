"""Our own sampling loop and the log-probability helpers RL needs.

Used by SFT sample tables, comparison collection and PPO rollouts. Prompts are LEFT-padded; the
attention mask and position ids (``cumsum(mask) - 1``) make a sequence's logits independent of how
much padding it got, both while generating with the KV cache and in a later full forward pass.

A response ends at its first EOS. Tokens after it are padding (``pad_token_id``, which may equal
EOS): ``response_mask`` — computed from positions, never by comparing tokens with the pad id — is 1
up to and including the first EOS and 0 after.

With ``num_samples = K > 1`` the K completions of a prompt share its prefill: the ``b`` distinct
prompts run through the model once, then the last logits, the mask and the KV cache are repeated to
``b·K`` rows (row ``i·K + j`` is sample ``j`` of prompt ``i``, as ``repeat_interleave``) and decoding
goes on from there.

The loop (sampling, EOS, masks, ``on_token``) is the same for every generation backend
(:mod:`rlhf_pl.generation`); how the model is called — the KV cache — is a :class:`Decoder`:
:class:`DynamicCacheDecoder` here (transformers' ``DynamicCache``, growing by one column per token),
a static preallocated cache with a compiled step in ``generation=static``.

Shapes: ``b`` batch, ``p`` prompt length (padded), ``n`` generated tokens, ``t = p + n``,
``v`` vocabulary, ``K`` samples per prompt.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import DynamicCache

from rlhf_pl.models.forward import accepts, forward_columns, position_ids_from_mask
from rlhf_pl.plugins.samplers import Sampler
from rlhf_pl.rl.masked import AllReduce

OnToken = Callable[[Tensor, Tensor], Optional[Tensor]]  # (tokens (b,), ended (b,)) -> rows to end now, or None


class Generation(NamedTuple):
    """Result of :func:`generate`. With ``num_samples = K`` every ``b`` below is ``b·K`` (rows grouped
    per prompt; the prompt columns repeat the prompt)."""

    sequences: Tensor  # (b, p + n) long: left-padded prompt, then response (pad after EOS)
    prompt_length: int  # p: responses start at this column
    response: Tensor  # (b, n) long: sequences[:, p:]
    response_mask: Tensor  # (b, n) long: 1 up to and including the first EOS, 0 after
    ended: Tensor  # (b,) bool: the response contains EOS (False: it hit max_new_tokens)
    attention_mask: Tensor  # (b, p + n) long: cat(prompt_mask, response_mask)


def _check_prompt(prompt_ids: Tensor, prompt_mask: Tensor) -> None:
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_ids and prompt_mask must both be (batch, length); got "
                         f"{tuple(prompt_ids.shape)} and {tuple(prompt_mask.shape)}")
    mask = prompt_mask.long()
    if (mask.sum(-1) == 0).any():
        raise ValueError(f"prompt rows {(mask.sum(-1) == 0).nonzero().flatten().tolist()} have no token (mask all 0)")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("prompts must be LEFT-padded: each prompt_mask row must be zeros then ones")


class GreedySampler:
    """Always the most likely token (ties: the lowest id); ``temperature`` is 1 and only read by
    callers that evaluate logprobs. Shape: (b, v) -> (b,) long; draws nothing from a generator."""

    temperature = 1.0

    def warp(self, logits: Tensor) -> Tensor:
        return logits.float()

    def sample(self, logits: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return logits.argmax(dim=-1)

    def __repr__(self) -> str:
        return "GreedySampler()"


def _step(model: Any, input_ids: Tensor, mask: Tensor, cache: Any, keep_last: bool,
          params: Optional[dict[str, Tensor]] = None) -> tuple[Tensor, Any]:
    """One forward with the KV cache (None: the model makes a new one); ``params`` (if given) replace
    the model's tensors of the same names for this call.

    Shapes: input_ids (b, s), mask (b, past + s) -> last logits (b, v) float32, updated cache.
    """
    kwargs: dict[str, Any] = {}
    if keep_last and accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    positions = position_ids_from_mask(mask)[:, -input_ids.shape[1]:]
    kwargs.update(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                  use_cache=True)
    out = torch.func.functional_call(model, params, (), kwargs, tie_weights=False, strict=False) if params else (
        model(**kwargs))
    return out.logits[:, -1, :].float(), out.past_key_values


def response_mask_from_tokens(response: Tensor, eos_token_id: int) -> Tensor:
    """1 up to and including the first EOS, 0 after. Shape: (b, n) -> (b, n) long."""
    is_eos = (response == eos_token_id).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).long()


class Decoder(Protocol):
    """How one generation calls the model: the prompts once, then one cached step per new token. A
    decoder may also have ``keep(rows)``: drop every row but ``rows`` (positions among the rows it
    holds) from its cache; the loop then steps only those (:func:`_compact`)."""

    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int) -> Tensor:
        """Run the b distinct prompts once and make the KV cache of their b·K rows (row i·K + j: sample j
        of prompt i). Shapes: prompt_ids, prompt_mask (b, p) -> last-token logits (b·K, v) float32."""
        ...

    def step(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Feed one token per row. Shapes: tokens (b·K,), mask (b·K, p + s) over every token fed so far,
        these included -> their next-token logits (b·K, v) float32."""
        ...


class DynamicCacheDecoder:
    """``generation=hf``'s decoder: the model's own ``DynamicCache``, created by the prefill, repeated
    to b·K rows with ``batch_repeat_interleave`` and grown by one column per step."""

    def __init__(self, model: Any) -> None:
        self.model, self.cache = model, None

    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int) -> Tensor:
        """(b, p), (b, p) -> (b·K, v) float32."""
        logits, cache = _step(self.model, prompt_ids, prompt_mask, None, keep_last=True)  # the model makes the cache
        if num_samples > 1:
            logits, cache = logits.repeat_interleave(num_samples, dim=0), _repeat_cache(cache, num_samples)
        self.cache = cache
        return logits

    def step(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """(r,), (r, p + s) -> (r, v) float32 for the r rows the cache holds."""
        logits, self.cache = _step(self.model, tokens.unsqueeze(-1), mask, self.cache, keep_last=True)
        return logits

    def keep(self, rows: Tensor) -> None:
        """Hold only ``rows`` (positions among the rows held now, ascending) from now on. Shape: (r',) long."""
        self.cache.batch_select_indices(rows)


@torch.no_grad()
def generate(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    sampler: Sampler,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    generator: Optional[torch.Generator] = None,
    *,
    num_samples: int = 1,
    on_token: Optional[OnToken] = None,
    decoder: Optional[Decoder] = None,
    sync_ranks: Optional[AllReduce] = None,
    compact: bool = True,
) -> Generation:
    """Sample up to ``max_new_tokens`` tokens per prompt with the KV cache, ``num_samples`` (K) per prompt.

    prompt_ids, prompt_mask: (b, p), LEFT-padded, one row per distinct prompt. The model is put in
    eval mode for the call and its previous mode restored. Stops early once every sequence has
    produced EOS; tokens after a sequence's EOS are ``pad_token_id``. Returns a :class:`Generation`
    with n <= max_new_tokens and b·K rows: row ``i·K + j`` is sample ``j`` of prompt ``i``; its
    ``sequences`` (b·K, p + n) repeat each prompt K times. The prompts are prefilled once (b rows);
    the last logits (b, v), the mask (b, p) and the model's KV cache are then repeated to b·K rows
    (the cache with transformers' ``DynamicCache.batch_repeat_interleave``; another cache type is a
    TypeError) and each of the n steps runs on b·K rows. K = 1 is the plain loop.

    ``on_token(tokens, ended)``, if given, is called after every step with that step's tokens (b·K,)
    and the rows ended so far (b·K,) bool; it may return a (b·K,) bool tensor of rows to end now
    (a streaming caller stops cancelled requests this way) or None.

    ``decoder``: how the model is called (:class:`Decoder`, made for this call); None is
    :class:`DynamicCacheDecoder` of ``model``.

    ``compact``: once at most half of the rows the decoder holds are unended, a decoder with ``keep``
    drops the ended ones and later steps run on the rest (:func:`_compact`). Every row is still
    sampled, so the generator draws the same numbers; in float32 the tokens are the same (tested),
    under bfloat16 a step over fewer rows may round its logits differently.

    ``sync_ranks``: for a model sharded over processes (FSDP), whose every forward is collective: an
    all-reduce-max over the processes. Every process then calls the model until the rows of *all*
    processes have ended; once its own have, a process feeds padding without sampling (its generator
    draws what it would draw alone) and its result is the one it would get alone.
    """
    _check_prompt(prompt_ids, prompt_mask)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    was_training = model.training
    model.eval()
    try:
        return _sample_loop(decoder if decoder is not None else DynamicCacheDecoder(model), prompt_ids,
                            prompt_mask.long(), sampler, max_new_tokens, eos_token_id, pad_token_id, generator,
                            num_samples, on_token, sync_ranks, compact)
    finally:
        model.train(was_training)


def _repeat_cache(cache: Any, repeats: int) -> Any:
    """The model's KV cache with each row repeated ``repeats`` times (in place, as transformers does it).
    Only a :class:`DynamicCache` is repeated: another type is a TypeError, never a silent re-prefill."""
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"num_samples > 1 shares each prompt's prefill by repeating the KV cache with transformers' "
                        f"DynamicCache.batch_repeat_interleave, but the model returned a {type(cache).__name__} "
                        f"cache; use num_samples=1 with the prompts repeated instead")
    cache.batch_repeat_interleave(repeats)
    return cache


def _sample_loop(decoder: Decoder, prompt_ids: Tensor, prompt_mask: Tensor, sampler: Sampler, max_new_tokens: int,
                 eos_token_id: int, pad_token_id: int, generator: Optional[torch.Generator],
                 num_samples: int = 1, on_token: Optional[OnToken] = None,
                 sync_ranks: Optional[AllReduce] = None, compact: bool = True) -> Generation:
    """Prefill the prompts (the decoder repeats the result K = ``num_samples`` times), then one cached
    step per token. prompt_ids, prompt_mask (b, p) -> Generation with b·K rows."""
    p = prompt_ids.shape[1]
    logits = decoder.prefill(prompt_ids, prompt_mask, num_samples)  # (b·K, v)
    mask, tokens = prompt_mask, []
    if num_samples > 1:  # (b, p) -> (b·K, p), sample j of prompt i in row i·K + j
        mask, prompt_ids = mask.repeat_interleave(num_samples, dim=0), prompt_ids.repeat_interleave(num_samples, dim=0)
    ended = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    running, fed_mask = True, mask  # running: this process's rows go on; fed_mask: what the decoder has seen
    live = None  # rows the decoder still holds (None: all); see _compact
    for step in range(max_new_tokens):
        if running:
            next_tokens = sampler.sample(logits, generator=generator)  # (b,)
            next_tokens = torch.where(ended, torch.full_like(next_tokens, pad_token_id), next_tokens)
            tokens.append(next_tokens)
            mask = torch.cat([mask, (~ended).long().unsqueeze(-1)], dim=-1)  # the new token counts unless already ended
            ended = ended | (next_tokens == eos_token_id)
            if on_token is not None and (stop := on_token(next_tokens, ended)) is not None:
                ended = ended | stop.to(ended.device)
            running, fed_mask = not bool(ended.all()), mask
        else:  # only for the other processes' sake (a sharded model's forward is collective): padding, not attended
            next_tokens = torch.full_like(next_tokens, pad_token_id)
            fed_mask = F.pad(fed_mask, (0, 1))
        if step == max_new_tokens - 1 or not _any_running(running, sync_ranks, ended.device):
            break
        if running and compact:
            live = _compact(decoder, live, ended)
        logits = _step_held(decoder, live, next_tokens, fed_mask, logits)
    response = torch.stack(tokens, dim=-1)  # (b, n)
    return Generation(
        sequences=torch.cat([prompt_ids, response], dim=-1),
        prompt_length=p,
        response=response,
        response_mask=mask[:, p:],
        ended=ended,
        attention_mask=mask,
    )


def _step_held(decoder: Decoder, live: Optional[Tensor], tokens: Tensor, mask: Tensor, last: Tensor) -> Tensor:
    """One step of the rows the decoder holds (``live``; None: all), as logits of every row: zeros for
    the dropped ones, which have ended and are never used, but are still sampled, so that the generator
    draws as it would with every row. Shapes: tokens (b,), mask (b, t), last logits (b, v) -> (b, v)."""
    if live is None:
        return decoder.step(tokens, mask)
    return last.new_zeros(last.shape).index_copy_(0, live, decoder.step(tokens[live], mask[live]))


def _compact(decoder: Decoder, live: Optional[Tensor], ended: Tensor) -> Optional[Tensor]:
    """The rows the decoder should hold from now on: once at most half of the rows it holds are still
    unended, it drops the ended ones (a decoder with ``keep``), so that a few long answers do not decode
    a whole batch of finished ones. Halving at most log₂ b times keeps the cache copies few.
    Shapes: live (r,) long or None (all b rows), ended (b,) bool -> (r',) long or None."""
    keep = getattr(decoder, "keep", None)
    held = torch.arange(ended.shape[0], device=ended.device) if live is None else live
    unended = held[~ended[held]]
    if keep is None or unended.numel() == 0 or 2 * unended.numel() > held.numel():
        return live
    keep(torch.searchsorted(held, unended))  # positions among the held rows (both sorted)
    return unended


def _any_running(running: bool, sync_ranks: Optional[AllReduce], device: torch.device) -> bool:
    """Whether any process still samples: ``running`` alone, or its maximum over the processes (collective)."""
    if sync_ranks is None:
        return running
    flag = torch.tensor([float(running)], device=device)
    return bool(sync_ranks(flag).item())


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits) at ``tokens``. Shapes: logits (b, n, v), tokens (b, n) -> (b, n) float32."""
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) in nats. Shape: (b, n, v) -> (b, n) float32."""
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def response_logits(model: Any, sequences: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
    """Logits predicting each response token. Shapes: sequences, mask (b, t) -> (b, t - p, v).

    The logits at column ``p - 1 + i`` predict response token ``i``; rows with the same prompt
    columns (the K samples of a prompt) run them once (:func:`rlhf_pl.models.forward.forward_columns`).
    Grad mode and train/eval mode are the caller's.
    """
    if not 0 < prompt_length < sequences.shape[1]:
        raise ValueError(f"prompt_length must be in [1, {sequences.shape[1] - 1}] for sequences of length "
                         f"{sequences.shape[1]}, got {prompt_length}")
    return forward_columns(model, sequences, attention_mask, prompt_length, prompt_length - 1)[:, :-1]


def response_logprobs(model: Any, sequences: Tensor, attention_mask: Tensor, prompt_length: int,
                      temperature: float) -> Tensor:
    """log softmax(logits / T) at each response token, 0 where the mask is 0.

    Shapes: sequences, attention_mask (b, t) -> (b, t - p) float32. Use the sampler's temperature so
    the logprobs match the distribution the tokens were sampled from.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = response_logits(model, sequences, attention_mask, prompt_length)
    logprobs = logprobs_from_logits(logits.float() / temperature, sequences[:, prompt_length:])
    return logprobs.masked_fill(attention_mask[:, prompt_length:] == 0, 0.0)
