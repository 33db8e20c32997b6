"""The reference implementation: the single-head kernel, vmapped over groups, kv heads, batch.

This is the one place where heads and batch are added. GQA is a grouped reshape of the query
heads, `N = K·G`: the innermost vmap runs over the G query heads that share one kv head, so
keys and values are never repeated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Bool, Float

from flaxattn.kernels._scores import ScoreFn
from flaxattn.kernels._single_head import (
    MaskMod,
    ScoreMod,
    attention_parts_with_keep,
    dropout_keep_mask,
)
from flaxattn.kernels._visibility import Visibility


def _split_heads(x: Array | None, K: int, G: int) -> tuple[Array | None, tuple]:
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


def reference_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S K H"],
    value: Float[Array, "B S K Hv"],
    *,
    bias: Float[Array, "B N T S"] | None = None,
    mask: Bool[Array, "B N T S"] | None = None,
    visibility: Visibility | None = None,
    score_fn: ScoreFn | None = None,
    score_params: Any = None,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B N T S"], Float[Array, "B N T"]]:
    """Multi-head, batched attention from the single-head kernel (inputs already validated).

    Args:
      query: `[B, T, N, H]`.
      key: `[B, S, K, H]`, `K` divides `N`.
      value: `[B, S, K, Hv]`.
      bias: rank 4, each axis 1 or full, broadcastable to `[B, N, T, S]`.
      mask: booleans, same broadcasting as `bias`.
      visibility: causal / window / length masks.
      score_fn: `(q [T, H], k [S, H], *params) -> [T, S]`.
      score_params: pytree whose leaves have a leading `N` axis; head `n` gets slice `n`.
      score_mod, mask_mod, dropout_rate, dropout_key: as in `attention_parts`.

    Returns:
      `(output [B, T, N, Hv], weights [B, N, T, S] float32, logsumexp [B, N, T] float32)`.
    """
    visibility = Visibility() if visibility is None else visibility
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    G = N // K
    q = query.reshape(B, T, K, G, H)  # [B, T, K, G, H]
    limits = visibility.limits(B, T, S)
    bias, bias_axes = _split_heads(bias, K, G)
    mask, mask_axes = _split_heads(mask, K, G)
    params = jax.tree.map(lambda p: p.reshape((K, G) + p.shape[1:]), score_params)
    # Every head's dropout mask in one flat draw (much cheaper to compile than per-head keys
    # under three vmaps).
    keep = None
    if dropout_rate > 0.0:
        keep = dropout_keep_mask(dropout_key, dropout_rate, (B, K, G, T, S))
    q_idx = jnp.arange(T)[:, None]
    kv_idx = jnp.arange(S)[None, :]

    def one_head(q, k, v, bias, mask, params, keep, limits):
        visible = None if visibility.is_trivial else visibility.visible(q_idx, kv_idx, limits)
        if mask is not None:
            visible = mask if visible is None else visible & mask
        fn = None
        if score_fn is not None:
            fn = lambda q, k: score_fn(q, k, *(params or ()))
        return attention_parts_with_keep(
            q, k, v, score_fn=fn, bias=bias, mask=visible, score_mod=score_mod,
            mask_mod=mask_mod, dropout_rate=dropout_rate, keep=keep,
        )

    # Innermost: the G query heads sharing one kv head (k, v, limits not mapped).
    per_group = jax.vmap(one_head, in_axes=(1, None, None, bias_axes[2], mask_axes[2], 0, 0, None))
    per_kv_head = jax.vmap(per_group, in_axes=(1, 1, 1, bias_axes[1], mask_axes[1], 0, 0, None))
    per_example = jax.vmap(per_kv_head, in_axes=(0, 0, 0, bias_axes[0], mask_axes[0], None, 0, 0))
    out, weights, lse = per_example(q, key, value, bias, mask, params, keep, limits)
    # out [B, K, G, T, Hv]; weights [B, K, G, T, S]; lse [B, K, G, T]
    out = jnp.moveaxis(out, 3, 1).reshape(B, T, N, value.shape[-1])  # [B, T, N, Hv]
    return out, weights.reshape(B, N, T, S), lse.reshape(B, N, T)
