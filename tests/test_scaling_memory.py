"""tools/scaling_memory.py: parameter counts from config dimensions, bytes per model and GPU, activations,
what fits, and the CPU profile's time per phase, on hand-computed examples."""
from __future__ import annotations

import pytest
from tool_loader import load_tool

sm = load_tool("scaling_memory")
GIB = 2**30

# SmolLM2-135M by hand: embedding 49152·576; per layer q, o 576·576, k, v 576·192, gate, up, down 576·1536,
# two norms of 576; 30 layers; final norm 576; output layer tied
SMOL_LAYER_LINEAR = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536  # 3,538,944
SMOL_TOTAL = 49152 * 576 + 30 * (SMOL_LAYER_LINEAR + 2 * 576) + 576
# Llama-2-7B by hand: 32 layers of 4·4096² + 3·4096·11008; untied embedding and output layer of 32000·4096
L7_LINEAR = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
L7_OTHER = 2 * 32000 * 4096 + 2 * 4096 * 32 + 4096


def test_parameter_counts_match_the_published_models():
    assert SMOL_TOTAL == 134_515_008
    assert sm.param_counts(sm.ARCHITECTURES["135M"]).total == SMOL_TOTAL
    seven = sm.param_counts(sm.ARCHITECTURES["7B"])
    assert (seven.linear, seven.other, seven.total) == (L7_LINEAR, L7_OTHER, 6_738_415_616)
    # the counts the hub reports for these checkpoints
    assert sm.param_counts(sm.ARCHITECTURES["1B"]).total == 1_235_814_400
    assert sm.param_counts(sm.ARCHITECTURES["70B"]).total == 68_976_648_192
    # reward model / critic: the trunk without the output layer, plus a scalar head of hidden + 1
    assert sm.param_counts(sm.ARCHITECTURES["7B"], head=True).total == 6_738_415_616 - 32000 * 4096 + 4097
    assert sm.param_counts(sm.ARCHITECTURES["135M"], head=True).total == SMOL_TOTAL + 577  # tied: nothing removed


def test_lora_adapter_count():
    # r·(in + out) per linear: (576+576)·2 + (576+192)·2 + (576+1536)·2 + (1536+576) = 10,176 per layer
    assert sm.param_counts(sm.ARCHITECTURES["135M"], lora_r=8).adapters == 8 * 10_176 * 30 == 2_442_240


def test_trained_fp32_adam_is_16_bytes_per_parameter_under_ddp_and_shards_under_zero3():
    counts = sm.param_counts(sm.ARCHITECTURES["135M"])
    ddp = sm.trained_bytes(counts, "fp32", "ddp", 8)
    assert (ddp.weights, ddp.gradients, ddp.optimizer, ddp.compute_copy) == (4 * SMOL_TOTAL, 4 * SMOL_TOTAL,
                                                                              8 * SMOL_TOTAL, 0)
    assert ddp.total == 16 * SMOL_TOTAL
    zero3 = sm.trained_bytes(counts, "fp32", "zero3", 8)
    assert zero3.total == 16 * SMOL_TOTAL / 8 + 2 * (SMOL_LAYER_LINEAR + 2 * 576) * 4  # + two gathered layers
    zero2 = sm.trained_bytes(counts, "fp32", "zero2", 8)
    assert zero2.total == 4 * SMOL_TOTAL + 12 * SMOL_TOTAL / 8  # weights whole, gradients and Adam sharded
    mixed = sm.trained_bytes(counts, "bf16-mixed", "ddp", 1)
    assert mixed.total == 18 * SMOL_TOTAL  # fp32 master 4 + bf16 copy 2 + fp32 gradients 4 + Adam 8


def test_frozen_bytes_per_precision():
    counts = sm.param_counts(sm.ARCHITECTURES["7B"])
    assert sm.frozen_bytes(counts, "fp32") == 4 * 6_738_415_616
    assert sm.frozen_bytes(counts, "bf16-mixed") == 2 * L7_LINEAR + 4 * L7_OTHER
    rows = 32 * (4096 + 4096 + 4096 + 4096 + 11008 + 11008 + 4096)  # one fp32 scale per output row
    assert sm.frozen_bytes(counts, "int8-frozen") == L7_LINEAR + 4 * rows + 4 * L7_OTHER
    # NF4: 0.5 byte per linear weight + 8-bit absmax per 64 + fp32 per 64·256, the rest fp32
    nf4 = sm.frozen_bytes(counts, "nf4-frozen")
    assert nf4 == pytest.approx((0.5 + 1 / 64 + 4 / 16384) * L7_LINEAR + 4 * L7_OTHER)
    assert 0.5 * L7_LINEAR < nf4 - 4 * L7_OTHER < 0.52 * L7_LINEAR
    assert nf4 / 6_738_415_616 == pytest.approx(0.652, abs=0.001)  # ≈ 0.5 B/param + the fp32 remainder


def test_activations_by_hand():
    toy = sm.Architecture("toy", hidden=4, layers=2, heads=2, kv_heads=1, intermediate=8, vocab=10, tied=True)
    # per layer and token 6·4 + 2·2 + 4·8 = 60 elements of 2 bytes; 3 tokens; logits 10 bytes · 10 · 3
    assert sm.activation_bytes(toy, 1, 3, checkpointing=False) == 2 * 60 * 2 * 3 + 300
    assert sm.activation_bytes(toy, 1, 3, checkpointing=True) == 2 * 4 * 2 * 3 + 60 * 2 * 3 + 300
    assert sm.activation_bytes(toy, 1, 3, checkpointing=True, logits=False) == 48 + 360
    assert sm.kv_cache_bytes(toy, 1, 3) == 2 * 2 * 2 * 2 * 3  # k and v, 2 layers, kv_dim 2, bf16, 3 tokens


def test_ppo_memory_and_what_fits():
    m = sm.ppo_memory("135M", "fp32", "ddp", 1, batch=1, length=8)
    assert m.policy == 16 * SMOL_TOTAL and m.reference == 4 * SMOL_TOTAL
    assert m.critic == 16 * (SMOL_TOTAL + 577) and m.reward_model == 4 * (SMOL_TOTAL + 577)
    assert m.total == m.models + m.activations and m.fits
    lora = sm.ppo_memory("135M", "lora", "ddp", 1)
    assert lora.reference == 0  # the policy with its adapters off
    # FSDP shards the trained models only; zero3-all shards the frozen ones too
    z3, z3all = sm.ppo_memory("7B", "bf16-mixed", "zero3", 8), sm.ppo_memory("7B", "bf16-mixed", "zero3-all", 8)
    assert z3.reference == 8 * z3all.reference and z3.policy == z3all.policy
    assert sm.fewest_gpus("135M", "fp32", "ddp") == 1
    assert sm.fewest_gpus("7B", "fp32", "ddp") is None  # the policy's 100 GiB alone is over 80 GB
    assert sm.fewest_gpus("7B", "qlora", "ddp") == 1
    assert sm.fewest_gpus("70B", "bf16-mixed", "zero3") is None  # two unsharded bf16 frozen 70B models: 258 GiB
    assert sm.fewest_gpus("70B", "bf16-mixed", "zero3-all") is not None


def test_time_per_phase_reproduces_the_profile_and_scales():
    at_profile = sm.scaled_seconds("135M", **sm.PROFILE_SETTING)
    assert at_profile == pytest.approx(sm.CPU_PROFILE)
    flops = sm.phase_flops("135M", **sm.PROFILE_SETTING)
    prefill = flops["prefill"] / (flops["reference"] / sm.CPU_PROFILE["reference"])
    step = (sm.CPU_PROFILE["generation"] - prefill) / 32
    # decode steps are memory-bound at 8 prompts: time per step ∝ bytes read (weights + KV cache at the mean context)
    longer = sm.scaled_seconds("135M", **{**sm.PROFILE_SETTING, "new_tokens": 64})
    arch = sm.ARCHITECTURES["135M"]
    bytes_at = lambda context: 2 * SMOL_TOTAL + 2 * 30 * 192 * 2 * 8 * context  # noqa: E731
    assert sm.decode_step_bytes("135M", 8, 62 + 16) == bytes_at(78) == 2 * SMOL_TOTAL + sm.kv_cache_bytes(arch, 8, 78)
    assert longer["generation"] - prefill == pytest.approx(64 * step * bytes_at(62 + 32) / bytes_at(78))
    seven = sm.scaled_seconds("7B", **sm.PROFILE_SETTING)
    assert seven["optimisation"] / sm.CPU_PROFILE["optimisation"] == pytest.approx(
        sm.phase_flops("7B", **sm.PROFILE_SETTING)["optimisation"] / flops["optimisation"])


def test_cli_writes_the_markdown(tmp_path, capsys):
    out = tmp_path / "tables.md"
    assert sm.main(["--gpus", "8", "--markdown", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "| 7B | Llama-2-7B | 4096 | 32 | 32 (32) | 11008 | 32000 | no | 6,738,415,616 |" in text
    assert "| fp32 | ddp | 2.0 | 2.0 | 0.5 | 0.5 |" in text  # 135M: 16 and 4 bytes per parameter
    assert "| qlora | zero3 |" not in text  # refused by the presets: not offered
    with pytest.raises(SystemExit):
        sm.main(["--gpus", "0"])
