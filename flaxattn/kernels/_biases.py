"""Positional biases added to the logits: ALiBi and T5's bucketed relative positions."""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike, Float, Int


def alibi_slopes(num_heads: int) -> Float[Array, " N"]:
    """ALiBi head slopes (Press et al., "Train Short, Test Long", 2022).

    For a power of two `n` heads the slopes are `2^(-8/n · i)`, `i = 1..n`; other counts take
    the closest power of two and interleave the slopes of twice that, as in the paper.
    """
    def powers(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(closest)
    if closest < num_heads:
        slopes += powers(2 * closest)[0::2][: num_heads - closest]
    return jnp.asarray(slopes, jnp.float32)


def alibi_bias(
    num_heads: int, T: int, S: int | None = None, *, symmetric: bool = False,
    offset: int | ArrayLike = 0,
) -> Float[Array, "1 N T S"]:
    """ALiBi bias `-slope_n · distance`, for the `bias` argument.

    Args:
      num_heads: N.
      T: query length. S: key length (default T).
      symmetric: use `|q - k|` (encoders) instead of the causal `q - k`.
      offset: position of query 0 on the key axis (`S - T` for bottom-right decoding).

    Returns:
      `[1, N, T, S]` float32.
    """
    S = T if S is None else S
    distance = (jnp.arange(T)[:, None] + offset) - jnp.arange(S)[None, :]  # [T, S]
    if symmetric:
        distance = jnp.abs(distance)
    return (-alibi_slopes(num_heads)[:, None, None] * distance[None])[None].astype(jnp.float32)


def relative_position_buckets(
    relative_position: Int[ArrayLike, "..."],
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Int[Array, "..."]:
    """T5's bucketing of `key_pos - query_pos` (Raffel et al. 2020, "Exploring the Limits").

    Half the buckets (per direction) hold exact small distances; the rest grow logarithmically
    up to `max_distance`, beyond which distances share the last bucket.
    """
    buckets = jnp.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        buckets += (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, n, large)


def t5_relative_bias(
    table: Float[ArrayLike, "R N"],
    T: int,
    S: int | None = None,
    *,
    bidirectional: bool = True,
    max_distance: int = 128,
    offset: int | Array = 0,
) -> Float[Array, "1 N T S"]:
    """T5 relative position bias for the `bias` argument, from a learned `[R, N]` table.

    Args:
      table: `[num_buckets, N]` per-bucket, per-head biases.
      T: query length. S: key length (default T).
      bidirectional: encoder (True) or causal decoder (False) bucketing.
      max_distance: distance at which buckets saturate.
      offset: position of query 0 on the key axis (for decoding with a cache).

    Returns:
      `[1, N, T, S]`.
    """
    S = T if S is None else S
    relative = jnp.arange(S)[None, :] - (jnp.arange(T)[:, None] + offset)  # [T, S]
    buckets = relative_position_buckets(
        relative, bidirectional=bidirectional, num_buckets=table.shape[0],
        max_distance=max_distance,
    )
    return jnp.moveaxis(table[buckets], -1, 0)[None]  # [1, N, T, S]
