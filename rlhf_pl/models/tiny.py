"""A tiny random Llama and a small byte-level BPE tokenizer, built without any download.

The tokenizer is trained with the ``tokenizers`` library on the text of the embedded default data
(``rlhf_pl/data/default``), so the default task is encoded compactly. Digits are split one per token
(as in SmolLM2), which keeps arithmetic learnable. ``pad_token`` is deliberately the same as
``eos_token`` (``<|im_end|>``): code that builds masks from ``token == pad_id`` breaks on it.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlhf_pl.config import TinyModelConfig
from rlhf_pl.data.chat import CHATML_TEMPLATE
from rlhf_pl.data.formats import read_records

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (IM_START, IM_END)
CORPUS_SOURCES = ("embedded:demonstrations", "embedded:prompts")


def _texts(record: dict) -> Iterator[str]:
    """Every piece of text a record holds (message contents, prompt), with the ChatML role line."""
    if isinstance(record.get("prompt"), str):
        yield f"user\n{record['prompt']}"
    for message in record.get("messages", []):
        yield f"{message['role']}\n{message['content']}"


def training_corpus() -> list[str]:
    """The embedded demonstrations and prompts as text lines (file order)."""
    return [text for source in CORPUS_SOURCES for raw in read_records(source) for text in _texts(raw.value)]


@lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Train the BPE once per vocab_size in this process; returns its JSON serialisation."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    return tokenizer.to_str()


def build_tiny_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``vocab_size`` entries (incl. ``<|im_start|>``, ``<|im_end|>``).

    eos = pad = ``<|im_end|>``, no bos, ChatML chat template. Training is cached per process; every
    call returns a fresh tokenizer object, so changing one (e.g. ``padding_side``) affects no other.

    ``seed`` completes the ``TinyModelConfig`` contract (tokenizer and weights are a function of the
    seed). BPE merges depend only on the corpus's pair counts, so the tokenizer is in fact the same
    for every seed, and identical across processes (both tested).
    """
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"model.tiny.vocab_size: expected at least {minimum} (256 bytes + special tokens), "
                         f"got {vocab_size}")
    backend = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=IM_END,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.name_or_path = f"tiny-bpe-{vocab_size}"
    return tokenizer


def tiny_llama_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The Llama architecture of ``cfg`` with the vocabulary and special ids of ``tokenizer``."""
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"model.tiny.hidden_size: expected a multiple of num_heads={cfg.num_heads}, "
                         f"got {cfg.hidden_size}")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama; the weights are a function of ``cfg`` and ``cfg.seed`` only.

    The global torch RNG is seeded inside a fork, so building a model does not disturb it.
    """
    config = tiny_llama_config(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def describe(model: LlamaForCausalLM) -> str:
    """One line: parameter count and shape of the tiny model (for logs)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return json.dumps({"params": n, "vocab": c.vocab_size, "hidden": c.hidden_size, "layers": c.num_hidden_layers,
                       "heads": c.num_attention_heads})
