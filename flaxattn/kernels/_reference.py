"""The reference implementation: the single-head kernel lifted over heads and batch.

It forms the `[T, S]` weights of every head (so it alone returns them and applies dropout to
them) and is what the other implementations are tested against.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from jaxtyping import ArrayLike, Bool, Float

from flaxattn.kernels._call import Call, Result
from flaxattn.kernels._heads import heads_to_rows, over_heads
from flaxattn.kernels._registry import ALL_FEATURES, Implementation, register
from flaxattn.kernels._scores import ScoreFn, scaled_dot_product_score
from flaxattn.kernels._single_head import (
    MaskMod,
    ScoreMod,
    attention_parts_with_keep,
    dropout_keep_mask,
)
from flaxattn.kernels._visibility import Visibility


def reference_attention(
    query: Float[ArrayLike, "B T N H"],
    key: Float[ArrayLike, "B S K E"],
    value: Float[ArrayLike, "B S K Hv"],
    *,
    bias: Float[ArrayLike, "#B #N #T #S"] | None = None,
    mask: Bool[ArrayLike, "#B #N #T #S"] | None = None,
    visibility: Visibility | None = None,
    score_fn: ScoreFn | None = None,
    score_params: Any = None,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    dropout_rate: float = 0.0,
    dropout_key: ArrayLike | None = None,
) -> tuple[Float[ArrayLike, "B T N Hv"], Float[ArrayLike, "B N T S"], Float[ArrayLike, "B N T"]]:
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
    B, T, N, _ = query.shape
    S = key.shape[1]
    limits = visibility.limits(B, T, S)
    # Every head's dropout mask in one flat draw (much cheaper to compile than per-head keys
    # under three vmaps).
    keep = None
    if dropout_rate > 0.0:
        keep = dropout_keep_mask(dropout_key, dropout_rate, (B, N, T, S))
    q_idx = jnp.arange(T)[:, None]
    kv_idx = jnp.arange(S)[None, :]

    def one_head(q, k, v, bias, mask, keep, params, limits):
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

    out, weights, lse = over_heads(
        one_head, query, key, value, pairs=(bias, mask, keep), per_head=score_params,
        per_example=limits,
    )  # out [B, N, T, Hv]; weights [B, N, T, S]; lse [B, N, T]
    return heads_to_rows(out), weights, lse


def run(call: Call) -> Result:
    """The registry's entry: scaled dot-product scores."""
    out, weights, lse = reference_attention(
        call.query, call.key, call.value, bias=call.bias, mask=call.mask,
        visibility=call.visibility,
        score_fn=functools.partial(scaled_dot_product_score, scale=call.scale),
        score_mod=call.score_mod, mask_mod=call.mask_mod, dropout_rate=call.dropout_rate,
        dropout_key=call.dropout_key,
    )
    return Result(out, lse, weights)


register(
    Implementation(
        "reference",
        run,
        "the single-head kernel vmapped over heads and batch; forms the [T, S] weights",
        supports=ALL_FEATURES,
        quadratic_memory=True,
    )
)
