"""The one place where a one-head kernel is lifted over batch and heads.

A kernel written for one head and one example, `one_head(q [T, D], k [S, D], v [S, Dv], ...)`,
becomes multi-head and batched by three nested `jax.vmap`s: over the `G` query heads that share
a kv head (innermost, so keys and values are never repeated: GQA is the grouped reshape
`N = K·G`), over the `K` kv heads, and over the `B` examples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike, Float


def _split_heads(x: ArrayLike | None, K: int, G: int) -> tuple[ArrayLike | None, tuple]:
    """View `x [B|1, N|1, T|1, S|1]` as `[B?, K?, G?, T|1, S|1]` for the three nested vmaps.

    Singleton batch/head axes are dropped and mapped with `None`, so a bias shared by all
    heads is not copied once per head.
    """
    if x is None:
        return None, (None, None, None)
    b, n, t, s = x.shape
    x = x.reshape(b, K if n > 1 else 1, G if n > 1 else 1, t, s)
    keep = [size > 1 for size in x.shape[:3]]
    x = x.reshape(tuple(size for size, k in zip(x.shape[:3], keep, strict=True) if k) + (t, s))
    return x, tuple(0 if k else None for k in keep)


def over_heads(
    one_head: Callable[..., Any],
    query: Float[ArrayLike, "B T N D"],
    key: Float[ArrayLike, "B S K E"],
    value: Float[ArrayLike, "B S K Dv"],
    *,
    pairs: Sequence[ArrayLike | None] = (),
    per_head: Any = None,
    per_example: Any = None,
) -> Any:
    """Run `one_head` for every example and head.

    `one_head(q, k, v, *pairs, per_head, per_example)` receives:
    `q [T, D]`, `k [S, E]`, `v [S, Dv]`; each of `pairs` as its `[T|1, S|1]` slice (or None);
    the head's slice of `per_head` and the example's slice of `per_example`.

    Args:
      query: `[B, T, N, D]`.
      key: `[B, S, K, E]`; `K` divides `N`.
      value: `[B, S, K, Dv]`.
      pairs: arrays of rank 4 broadcastable to `[B, N, T, S]` (each axis 1 or full: biases,
        masks, dropout keep-masks), or None; a size-1 axis is not copied per head.
      per_head: a pytree whose leaves have a leading `N` axis (score parameters), or None.
      per_example: a pytree whose leaves have a leading `B` axis (length limits), or None.

    Returns:
      `one_head`'s outputs (a pytree), each leaf with leading axes `[B, N]`.
    """
    B, T, N, _ = query.shape
    K = key.shape[2]
    G = N // K
    q = query.reshape(B, T, K, G, query.shape[-1])  # [B, T, K, G, D]
    split = [_split_heads(x, K, G) for x in pairs]
    arrays = [x for x, _ in split]
    axes = [a for _, a in split]
    heads = jax.tree.map(lambda p: p.reshape((K, G) + p.shape[1:]), per_head)
    level = lambda i: tuple(a[i] for a in axes)
    head_axis = None if per_head is None else 0
    example_axis = None if per_example is None else 0

    def call(q, k, v, *rest):
        *pairs_, head, example = rest
        return one_head(q, k, v, *pairs_, head, example)

    # Innermost: the G query heads sharing one kv head (k, v and per_example not mapped).
    per_group = jax.vmap(call, in_axes=(1, None, None, *level(2), head_axis, None))
    per_kv_head = jax.vmap(per_group, in_axes=(1, 1, 1, *level(1), head_axis, None))
    per_batch = jax.vmap(per_kv_head, in_axes=(0, 0, 0, *level(0), None, example_axis))
    out = per_batch(q, key, value, *arrays, heads, per_example)  # leaves [B, K, G, ...]
    return jax.tree.map(lambda x: x.reshape((B, N) + x.shape[3:]), out)


def heads_to_rows(x: Float[ArrayLike, "B N T Dv"]) -> Float[Array, "B T N Dv"]:
    """`[B, N, T, Dv]` per-head outputs in the `[B, T, N, Dv]` layout."""
    return jnp.swapaxes(x, 1, 2)
