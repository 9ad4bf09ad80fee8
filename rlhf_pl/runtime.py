"""Process-level settings that make the same computation faster on the CPU.

None changes what is computed, only how memory is served, which attention kernel runs and how
often weights are cast. Measured effects: docs/benchmarks.md ("Speed on the CPU").

- :func:`retain_freed_memory` — glibc serves every allocation over its mmap threshold (at most
  32 MiB) with a fresh ``mmap`` and returns it to the kernel on free; a training step allocates
  and frees tensors far larger than that (the embedding gradient, the (b, n, vocabulary) logits),
  and the kernel zero-fills every fresh mapping one page fault at a time. Keeping freed memory in
  the process (what jemalloc or tcmalloc do) removes that cost once the heap has grown to the
  step's pattern; the price is a somewhat higher resident size.
- :func:`attention_kernel` — on the CPU, PyTorch's fused attention kernel in bfloat16 is slower
  than the plain matmul–softmax–matmul path for short sequences (in float32 it is not); PPO's
  sequences are prompt + a few dozen tokens, so their passes take the plain path there.
- :func:`weights_cast_once` — under bf16 autocast, sampling casts the policy's float32 weights to
  bfloat16 once instead of at every new token.

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
    one window can run far below another, and a peak measured low would inflate the MFU.
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
