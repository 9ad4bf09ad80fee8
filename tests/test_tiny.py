"""The tiny tokenizer and the tiny random Llama."""
from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_pl.config import TinyModelConfig
from rlhf_pl.data.chat import CHATML_TEMPLATE
from rlhf_pl.models.tiny import _trained_tokenizer_json, build_tiny_model, build_tiny_tokenizer


def test_tokenizer_special_tokens_and_template(tiny_tokenizer):
    tok = tiny_tokenizer
    assert len(tok) == 512
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.eos_token_id == tok.pad_token_id == 1
    assert tok.bos_token is None and tok.convert_tokens_to_ids("<|im_start|>") == 0
    assert tok.chat_template == CHATML_TEMPLATE
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 1 and tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]


def test_tokenizer_round_trip_and_single_digits(tiny_tokenizer):
    text = "The capital of France is Paris. 17 + 25 = 42.\nÜber café!"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    pieces = [tiny_tokenizer.decode([i]) for i in tiny_tokenizer("12345", add_special_tokens=False)["input_ids"]]
    assert pieces == ["1", "2", "3", "4", "5"]
    # trained on the default data: its words take fewer tokens than half their characters
    sentence = "The capital of France is Paris."
    assert len(tiny_tokenizer(sentence, add_special_tokens=False)["input_ids"]) < len(sentence) / 2


def test_tokenizer_is_deterministic_trained_once_and_fresh_per_call(tiny_tokenizer):
    hits = _trained_tokenizer_json.cache_info().hits
    build_tiny_tokenizer()
    assert _trained_tokenizer_json.cache_info().hits == hits + 1  # trained once per process, not per call
    retrained = _trained_tokenizer_json.__wrapped__(512)  # bypass the in-process cache
    assert json.loads(retrained)["model"] == json.loads(tiny_tokenizer.backend_tokenizer.to_str())["model"]
    assert build_tiny_tokenizer(seed=1).get_vocab() == tiny_tokenizer.get_vocab()  # BPE does not depend on order
    other = build_tiny_tokenizer()
    other.padding_side = "left"
    assert other is not tiny_tokenizer and tiny_tokenizer.padding_side == "right"
    assert len(build_tiny_tokenizer(vocab_size=300)) == 300


def test_tokenizer_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="model.tiny.vocab_size: expected at least 258 .*, got 100"):
        build_tiny_tokenizer(vocab_size=100)


def test_model_config_and_parameter_count(tiny_model, tiny_tokenizer):
    c = tiny_model.config
    assert ((c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads)
            == (512, 64, 128, 2, 4))
    assert c.tie_word_embeddings and c.attention_dropout == 0.0
    assert c.eos_token_id == c.pad_token_id == tiny_tokenizer.eos_token_id and c.bos_token_id is None
    g = tiny_model.generation_config
    assert g.eos_token_id == g.pad_token_id == 1 and g.bos_token_id is None
    assert tiny_model.lm_head.weight.data_ptr() == tiny_model.model.embed_tokens.weight.data_ptr()
    per_layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64  # attention, MLP, two RMSNorms
    assert sum(p.numel() for p in tiny_model.parameters()) == 512 * 64 + 2 * per_layer + 64 == 115008


def test_model_forward_shape_and_initial_loss(tiny_model, tiny_tokenizer):
    ids = torch.tensor([tiny_tokenizer("What is 2 + 3?", add_special_tokens=False)["input_ids"]] * 2)
    with torch.no_grad():
        out = tiny_model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, ids.shape[1], 512)
    assert abs(out.loss.item() - math.log(512)) < 0.25  # random init (std 0.02): close to uniform


def test_model_is_a_function_of_the_seed_and_leaves_global_rng_alone(tiny_model, tiny_tokenizer):
    state = torch.random.get_rng_state()
    same = build_tiny_model(TinyModelConfig(), tiny_tokenizer)
    assert torch.equal(torch.random.get_rng_state(), state)
    other = build_tiny_model(TinyModelConfig(seed=1), tiny_tokenizer)
    ref = tiny_model.state_dict()
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in ref.items())
    assert not torch.equal(ref["model.embed_tokens.weight"], other.state_dict()["model.embed_tokens.weight"])


def test_model_rejects_heads_not_dividing_hidden(tiny_tokenizer):
    with pytest.raises(ValueError, match="model.tiny.hidden_size: expected a multiple of num_heads=5, got 64"):
        build_tiny_model(TinyModelConfig(num_heads=5), tiny_tokenizer)
