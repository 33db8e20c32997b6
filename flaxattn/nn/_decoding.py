"""Decoding loops under `jit`, on a functional copy of the model (the model is untouched).

`run_on_copy` splits the model, and a jitted function merges a copy, gives it KV caches and
runs the loop. `scan_decode` is the loop: a `lax.scan` whose carry holds the caches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array
from jaxtyping import ArrayLike


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "options"))
def _run_pure(graphdef: nnx.GraphDef, state: nnx.State, args: tuple, *, method: str,
              options: tuple) -> Any:
    model = nnx.merge(graphdef, state)
    return getattr(model, method)(*args, **dict(options))


def run_on_copy(model: nnx.Module, method: str, *args: Any, **options: Any) -> Any:
    """`model.<method>(*args, **options)` jitted on a copy; `options` are static (hashable)."""
    graphdef, state = nnx.split(model)
    return _run_pure(graphdef, state, args, method=method, options=tuple(sorted(options.items())))


def scan_decode(
    model: nnx.Module,
    step: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    *,
    length: int | None = None,
) -> tuple[Any, Any]:
    """`lax.scan` of `step(model, carry, x) -> (carry, y)`, threading the model's caches.

    Only the `nnx.Cache` state is carried; parameters are loop constants.
    """
    graphdef, cache, rest = nnx.split(model, nnx.Cache, ...)

    def body(state_and_carry, x):
        cache, inner = state_and_carry
        copy = nnx.merge(graphdef, cache, rest)
        inner, y = step(copy, inner, x)
        return (nnx.state(copy, nnx.Cache), inner), y

    (_, carry), ys = jax.lax.scan(body, (cache, carry), xs, length=length)
    return carry, ys


def sample(
    logits: ArrayLike, key: ArrayLike, temperature: ArrayLike, *, top_k: int | None, greedy: bool
) -> Array:
    """Next tokens `[B]` int32 from logits `[B, V]`: argmax, or sampling at `temperature`
    from the `top_k` most likely tokens (all when None)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

