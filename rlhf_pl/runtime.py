"""Process-level settings that make the same computation faster on the CPU.

None changes what is computed, only how memory is served, which attention kernel runs and how
often weights are cast.

- :func:`retain_freed_memory` — glibc serves every allocation over its mmap threshold (at most
  32 MiB) with a fresh ``mmap`` and returns it to the kernel on free. A training step allocates
  and frees tensors far larger than that (the 49152 × 576 embedding gradient of SmolLM2, the
  (b, n, 49152) logits), and every fresh mapping is zero-filled by the kernel one 4 KiB page fault
  at a time: ``torch.zeros(49152, 576)`` takes 29 ms that way and 5 ms in retained memory.
  Keeping freed memory in the process (what jemalloc or tcmalloc do, and what PyTorch's CPU
  performance guide recommends them for) removes that cost once the heap has grown to the step's
  pattern, after a few steps. Measured on 10 bf16 policy steps of SmolLM2 (8 × ~70 tokens): page
  faults per step 170–200 thousand (0.7 GB zero-filled) by default, 0 from the 7th step on; peak
  RSS 3675 MiB against 3320 (the price: freed memory stays resident and aligned allocations leave
  gaps in the heap). ``tools/bench_ppo.py``: optimisation phase 3–7% faster.
- :func:`attention_kernel` — on the CPU, PyTorch's fused (flash) attention kernel in bfloat16 is
  slower than the plain matmul–softmax–matmul path for short sequences (forward + backward of one
  SmolLM2 layer, batch 8: 15.5 ms against 8.2 ms at 96 tokens, about equal at 192; in float32 the
  fused kernel is as fast or faster). PPO's sequences are prompt + a few dozen tokens, so its
  passes take the plain path in that case.
- :func:`weights_cast_once` — under bf16 autocast, sampling casts the policy's float32 weights to
  bfloat16 once instead of at every new token (16 prompts × 32 tokens on SmolLM2: 2.48 s against
  2.93 s).

:func:`matmul_peak` measures the denominator of the benchmarks' model-FLOP utilisation.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
# Free memory at the top of the heap is returned to the kernel only above this (mallopt takes an int).
TRIM_THRESHOLD = 2**31 - 1
# Sequences up to this many tokens use the plain attention path in bfloat16 on the CPU (see above).
PLAIN_ATTENTION_MAX_LENGTH = 128


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (the only one with these mallopt parameters), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):  # musl and others have no gnu_get_libc_version
        return None
    return libc


def retain_freed_memory() -> bool:
    """Serve every allocation from the heap and keep freed heap memory (up to 2 GiB free at its top).

    Returns True when the setting took effect (Linux with glibc), False elsewhere (nothing changes
    there: other allocators already keep freed memory, or the platform decides). Idempotent.
    """
    libc = _glibc()
    if libc is None:
        log.info("retain_freed_memory: not glibc, allocator left as it is")
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        raise OSError("glibc's mallopt refused M_MMAP_MAX=0 / M_TRIM_THRESHOLD; run with retain_freed_memory=false")
    return True


def uses_plain_attention(length: int, device: torch.device, model: Optional[nn.Module] = None) -> bool:
    """Whether :func:`attention_kernel` picks the plain path for ``length`` tokens on ``device``."""
    return (device.type == "cpu" and length <= PLAIN_ATTENTION_MAX_LENGTH
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not (model is not None and checkpoints_activations(model)))


def checkpoints_activations(model: nn.Module) -> bool:
    """Whether any part of ``model`` recomputes its forward during backward (gradient checkpointing)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@contextmanager
def attention_kernel(length: int, device: torch.device, model: Optional[nn.Module] = None) -> Iterator[None]:
    """Forward passes over ``length`` tokens inside this block use the faster attention kernel.

    The plain (math) scaled-dot-product path under bfloat16 autocast on the CPU for sequences of at
    most :data:`PLAIN_ATTENTION_MAX_LENGTH` tokens; PyTorch's own choice otherwise, and always when
    ``model`` checkpoints activations (its recomputation in backward runs outside this block and
    must pick the same kernel). The backward of a plain forward needs no context.
    """
    if not uses_plain_attention(length, device, model):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextmanager
def weights_cast_once(device: torch.device) -> Iterator[None]:
    """Under autocast, cast each trainable weight to the low precision once for the whole block.

    Lightning's mixed precision runs autocast with its weight cache off (weights change between
    calls inside a training step), so every call casts every float32 weight again. Sampling calls
    the policy once per new token with the weights fixed: there the cast of 135M weights (read
    540 MB, write 270 MB) costs more than the matmuls it feeds. Inside this block autocast caches
    the casts of leaf tensors that require grad; the cache is cleared on exit, so nothing stale
    reaches the optimisation that follows. The weights must not change inside the block. Outside
    autocast this does nothing.
    """
    if not torch.is_autocast_enabled(device.type):
        yield
        return
    with torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), cache_enabled=True):
        try:
            yield
        finally:
            torch.clear_autocast_cache()


def matmul_peak(dtype: torch.dtype, size: int = 1536, windows: int = 8, seconds: float = 0.5) -> float:
    """The machine's matmul peak in FLOP/s: the best of ``windows`` short windows of repeated
    (size × size) @ (size × size) products. The best, not the mean: on a shared virtual machine
    one window can run 40% below another, and a peak measured low would inflate the MFU.
    The denominator of the benchmarks' model-FLOP utilisation (tools/bench_sft.py, bench_ppo.py)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(windows):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            count += 1
        best = max(best, 2 * size ** 3 * count / (time.perf_counter() - started))
    return best
