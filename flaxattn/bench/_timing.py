"""Timing and cost helpers shared by every benchmark: jit, warm up, block, median of repeats."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike


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
    call, compile_seconds = compiled_call(fn, *args)
    timing = time_interleaved({"call": call}, repeats=repeats, warmup=warmup)["call"]
    return dataclasses.replace(timing, compile_seconds=compile_seconds)


def time_interleaved(
    calls: dict[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1
) -> dict[str, Timing]:
    """Time several ready-to-run calls in alternation: A, B, C, A, B, C, ...

    On a shared machine the load changes from second to second; alternating the calls exposes
    every one of them to the same conditions, so ratios between them stay meaningful even
    when absolute times drift. Each call must block on its result (wrap JAX calls in
    `jax.block_until_ready`); compile before passing them (`compiled_call`).

    Args:
      calls: name -> a zero-argument function that runs one call to completion.
      repeats: timed rounds (each runs every call once).
      warmup: untimed rounds first.

    Returns:
      name -> `Timing` (compile_seconds 0: compile time is the caller's to record).
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(max(repeats, 1)):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {
        name: Timing(statistics.median(t), min(t), max(t), len(t), 0.0)
        for name, t in times.items()
    }


def compiled_call(fn: Callable[..., Any], *args: Any) -> tuple[Callable[[], Any], float]:
    """`(call, compile_seconds)`: `fn` jitted and compiled for `args`, as a blocking
    zero-argument call for `time_interleaved`."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    return (lambda: jax.block_until_ready(compiled(*args))), compile_seconds


def compiled_temp_bytes(fn: Callable[..., Any], *args: Any) -> int | None:
    """Temporary (scratch) bytes of the compiled `jax.jit(fn)`, or None if not reported."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def square_matmul(x: ArrayLike) -> Array:
    """`x @ x` accumulated and returned in float32, as attention's products are: on CPU a bf16
    matmul with a bf16 result takes a path about 4x slower than with a float32 one (AMX), so a
    bf16-result ceiling would flatter every 16-bit kernel."""
    return jnp.matmul(x, x, preferred_element_type=jnp.float32)


def matmul_flops_per_second(size: int = 2048, dtype: Any = jnp.float32, repeats: int = 5) -> float:
    """Measured throughput of a `[size, size] @ [size, size]` matmul (`square_matmul`): the
    practical ceiling."""
    a = jnp.ones((size, size), dtype)
    return 2 * size**3 / time_jitted(square_matmul, a, repeats=repeats).median


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
