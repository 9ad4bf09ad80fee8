"""Shared fixtures: the tiny tokenizer and tiny random Llama (built once per test session)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE (512 entries) trained on the embedded data; eos = pad = <|im_end|>; ChatML."""
    from rlhf_pl.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """A random 2-layer Llama (hidden 64) for ``tiny_tokenizer``, in eval mode. Shared: do not train it
    in place (copy it with ``copy.deepcopy`` first)."""
    from rlhf_pl.config import TinyModelConfig
    from rlhf_pl.models.tiny import build_tiny_model

    return build_tiny_model(TinyModelConfig(), tiny_tokenizer).eval()
