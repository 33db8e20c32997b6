"""Timing and cost helpers shared by every benchmark: jit, warm up, block, median of repeats."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls after warm-up, plus the compile time."""

    median: float
    min: float
    max: float
    repeats: int
    compile_seconds: float


def time_jitted(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1) -> Timing:
    """Time `jax.jit(fn)(*args)`: compile separately, warm up, block on results, take the median.

    Args:
      fn: a function of arrays (jitted here; passing a jitted function is fine).
      *args: its arguments.
      repeats: timed calls after warm-up (at least 1).
      warmup: untimed calls after compiling.

    Returns:
      A `Timing`.
    """
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), len(times), compile_seconds)


def compiled_temp_bytes(fn: Callable[..., Any], *args: Any) -> int | None:
    """Temporary (scratch) bytes of the compiled `jax.jit(fn)`, or None if not reported."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def matmul_flops_per_second(size: int = 2048, dtype: Any = jnp.float32, repeats: int = 5) -> float:
    """Measured throughput of a `[size, size] @ [size, size]` matmul: the practical ceiling."""
    a = jnp.ones((size, size), dtype)
    return 2 * size**3 / time_jitted(lambda x: x @ x, a, repeats=repeats).median


def attention_flops(
    B: int, N: int, T: int, S: int, H: int, *, causal: bool = False, backward: bool = False
) -> float:
    """FLOPs of attention: `4·B·N·T·S·H` forward, halved if causal, ×3.5 with backward."""
    flops = 4.0 * B * N * T * S * H
    if causal:
        flops /= 2
    if backward:
        flops *= 3.5  # backward counted as 2.5x the forward, plus the forward itself
    return flops
