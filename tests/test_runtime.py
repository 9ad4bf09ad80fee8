"""rlhf_pl.runtime: glibc keeps freed memory (no page faults on re-allocation), the attention
kernel choice (plain path for short bf16 sequences on the CPU) and the once-per-block weight casts
change speed, not results."""
from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from rlhf_pl.models.generate import position_ids_from_mask
from rlhf_pl.models.loading import enable_gradient_checkpointing
from rlhf_pl.runtime import (
    PLAIN_ATTENTION_MAX_LENGTH,
    _glibc,
    attention_kernel,
    matmul_peak,
    uses_plain_attention,
    weights_cast_once,
)

FAULTS_PER_STEP = """
import json, resource, sys, torch
if sys.argv[1] == "retain":
    from rlhf_pl.runtime import retain_freed_memory
    assert retain_freed_memory()
faults = []
for step in range(14):  # a training loop's pattern: the same large tensor allocated, used, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 * 2**20)  # 64 MiB: far above glibc's largest mmap threshold (32 MiB)
    x.fill_(1.0)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def faults_per_step(mode: str) -> list[int]:
    """Minor page faults of each of 14 allocate-fill-free steps of a 64 MiB tensor, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason="mallopt parameters exist only in glibc (Linux)")
def test_retained_memory_is_reused_without_page_faults():
    """With freed memory retained the heap grows during the first steps (aligned allocations leave
    gaps), then the same memory is reused without a fault. By default glibc maps fresh zero pages at
    every step; how many faults that costs is the host's business (16384 with 4 KiB pages, a few
    thousand where transparent huge pages back the mapping), so the comparison with the default is
    made only where the default faults at all (checked first), and then as a ratio."""
    default, retained = faults_per_step("default"), faults_per_step("retain")
    assert max(retained[-4:]) < 100
    if min(default[-4:]) >= 1000:  # this host unmaps freed memory by default: retaining must beat it
        assert 10 * max(retained[-4:]) < min(default[-4:]), (default, retained)


def test_plain_attention_only_for_short_bf16_cpu_sequences(tiny_model):
    """Not in float32, not over the length limit, not off the CPU, and not for a model that
    recomputes its forward in backward (gradient checkpointing runs it outside the block)."""
    cpu = torch.device("cpu")
    checkpointed = copy.deepcopy(tiny_model)
    enable_gradient_checkpointing(checkpointed)  # as the stages do
    assert not uses_plain_attention(64, cpu)  # float32: the fused kernel is as fast or faster
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert uses_plain_attention(64, cpu)
        assert uses_plain_attention(PLAIN_ATTENTION_MAX_LENGTH, cpu)
        assert not uses_plain_attention(PLAIN_ATTENTION_MAX_LENGTH + 1, cpu)
        assert not uses_plain_attention(64, torch.device("meta"))
        assert uses_plain_attention(64, cpu, tiny_model)
        assert not uses_plain_attention(64, cpu, checkpointed)


def attention_ops(model, ids, mask) -> tuple[torch.Tensor, set[str]]:
    """Logits of a bf16-autocast forward + backward inside attention_kernel, and the attention ops run."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16), attention_kernel(ids.shape[1], ids.device):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        logits.float().sum().backward()
    return logits.float(), {e.key for e in prof.key_averages() if "attention" in e.key}


def test_attention_kernel_switches_kernel_not_results(tiny_model):
    """Short sequence: the plain path (no fused flash kernel, forward or backward), logits equal to
    float32 within bf16 rounding; a long one keeps PyTorch's fused kernel."""
    model = copy.deepcopy(tiny_model).train()  # the session fixture must not collect gradients
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: the mask reaches the attention kernel
    logits, ops = attention_ops(model, ids, mask)
    assert not any("flash" in op for op in ops), ops
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    valid = mask.bool()
    assert torch.allclose(logits[valid], reference[valid], atol=0.1, rtol=0.05)
    assert (logits[valid] - reference[valid]).abs().mean() < 0.02

    long_ids = torch.randint(0, model.config.vocab_size, (1, PLAIN_ATTENTION_MAX_LENGTH + 8))
    _, long_ops = attention_ops(model, long_ids, torch.ones_like(long_ids))
    assert any("flash" in op for op in long_ops), long_ops


def weight_casts(model, ids, calls: int, cached: bool) -> tuple[list[torch.Tensor], int]:
    """Logits of ``calls`` forwards under bf16 autocast with Lightning's cache-less autocast outside,
    inside weights_cast_once or not; and the number of float32 -> bf16 casts of 2-D weights."""
    outs = []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            block = weights_cast_once(torch.device("cpu")) if cached else contextlib.nullcontext()
            with block:
                for _ in range(calls):
                    outs.append(model(input_ids=ids).logits.float())
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    casts = sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                if e.key == "aten::_to_copy" and e.input_shapes and tuple(e.input_shapes[0]) in weight_shapes)
    return outs, casts


def test_weights_cast_once_casts_once_and_forgets_on_exit(tiny_model):
    """Three forwards: every weight cast three times under Lightning's autocast, once inside the block,
    same logits; after the block a changed weight is seen (no stale bf16 copy survives)."""
    model = copy.deepcopy(tiny_model).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    plain, casts_plain = weight_casts(model, ids, 3, cached=False)
    cached, casts_cached = weight_casts(model, ids, 3, cached=True)
    n_weights = sum(1 for p in model.parameters() if p.dim() == 2)
    assert casts_plain >= 3 * (n_weights - 1)  # the embedding is looked up, not cast
    assert casts_cached <= casts_plain / 3 + 1
    for a, b in zip(plain, cached):
        assert torch.equal(a, b)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    after, _ = weight_casts(model, ids, 1, cached=True)
    assert not torch.allclose(after[0], cached[0])


def test_matmul_peak_is_the_best_window(monkeypatch):
    """Three 1-second windows of 1, 4 and 2 products of 8 × 8 matrices on a fake clock: the peak is
    the best window's rate, 2·8³·4 FLOP/s, not the mean."""
    import rlhf_pl.runtime as runtime

    times: list[float] = []
    for start, products in ((0.0, 1), (10.0, 4), (20.0, 2)):
        # the window's start, `products` checks that continue, the check that stops, the end
        times += [start] + [start] * products + [start + 1.0, start + 1.0]
    clock = iter(times)
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: next(clock))
    assert matmul_peak(torch.float32, size=8, windows=3, seconds=1.0) == 2 * 8 ** 3 * 4
