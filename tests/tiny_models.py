"""Tiny random causal LMs built in code for the sampling tests (imported as a plain module: pytest puts
tests/ on sys.path): Llama (rotary positions: invariant to a constant shift) and GPT-2 (learned absolute
positions: wrong position ids after left padding change its logits)."""
from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB, EOS, PAD = 48, 2, 0


def tiny_causal_lm(kind: str) -> nn.Module:
    """A seeded tiny ``llama`` or ``gpt2`` in eval mode."""
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3, eos_token_id=EOS,
            pad_token_id=PAD, bos_token_id=None)).eval()
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.3,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS)).eval()
