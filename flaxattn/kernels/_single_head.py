"""The unit of the design: attention for one head and one example.

    weights = softmax(score_mod(score_fn(q, k) + bias) restricted to mask)   # [T, S]
    output  = dropout(weights) @ v                                            # [T, Dv]
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike, Bool, Float

from flaxattn.kernels._scores import ScoreFn, scaled_dot_product_score
from flaxattn.kernels._softmax import masked_softmax
from flaxattn.kernels._validate import check_dropout

ScoreMod = Callable[[Array, Array, Array], Array]
"""`score_mod(score, q_idx, kv_idx) -> score`, elementwise on broadcast index arrays."""
MaskMod = Callable[[Array, Array], Array]
"""`mask_mod(q_idx, kv_idx) -> bool`, True = attend, elementwise on broadcast index arrays."""


def dropout_keep_mask(
    key: ArrayLike, rate: float, shape: tuple[int, ...]
) -> Bool[Array, "..."]:
    """Booleans of `shape`, each True (kept) with probability `1 - rate`.

    Drawn flat and reshaped: with JAX's partitionable threefry, compiling the draw of a
    rank-5 shape (or of a rank-2 one under three vmaps) costs seconds on CPU; rank 1 does not.
    """
    size = 1
    for n in shape:
        size *= n
    return jax.random.bernoulli(key, 1.0 - rate, (size,)).reshape(shape)


def attention_parts(
    query: Float[ArrayLike, "T D"],
    key: Float[ArrayLike, "S Dk"],
    value: Float[ArrayLike, "S Dv"],
    *,
    score_fn: ScoreFn | None = None,
    bias: Float[ArrayLike, "#T #S"] | None = None,
    mask: Bool[ArrayLike, "#T #S"] | None = None,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    dropout_rate: float = 0.0,
    dropout_key: ArrayLike | None = None,
) -> tuple[Float[ArrayLike, "T Dv"], Float[ArrayLike, "T S"], Float[ArrayLike, " T"]]:
    """One head of attention, returning the output, the weights and the logsumexp.

    Args:
      query: `[T, D]`.
      key: `[S, D]` (or whatever `score_fn` takes).
      value: `[S, Dv]`.
      score_fn: `(query, key) -> [T, S]` logits; default scaled dot product.
      bias: added to the logits, broadcastable to `[T, S]`.
      mask: booleans broadcastable to `[T, S]`, True = attend.
      score_mod: `(score, q_idx, kv_idx) -> score`, applied after the bias.
      mask_mod: `(q_idx, kv_idx) -> bool`, combined with `mask` by "and".
      dropout_rate: probability of dropping each weight (inverted dropout).
      dropout_key: PRNG key; required when `dropout_rate > 0`.

    Returns:
      `(output [T, Dv] in value's dtype, weights [T, S] float32 as applied to the values,
      logsumexp [T] float32, -inf for a row with nothing visible)`.
    """
    check_dropout(dropout_rate, dropout_key)
    keep = None
    if dropout_rate > 0.0:
        keep = dropout_keep_mask(dropout_key, dropout_rate, (query.shape[0], key.shape[0]))
    return attention_parts_with_keep(
        query, key, value, score_fn=score_fn, bias=bias, mask=mask, score_mod=score_mod,
        mask_mod=mask_mod, dropout_rate=dropout_rate, keep=keep,
    )


def attention_parts_with_keep(
    query: Float[ArrayLike, "T D"],
    key: Float[ArrayLike, "S Dk"],
    value: Float[ArrayLike, "S Dv"],
    *,
    score_fn: ScoreFn | None = None,
    bias: Float[ArrayLike, "#T #S"] | None = None,
    mask: Bool[ArrayLike, "#T #S"] | None = None,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    dropout_rate: float = 0.0,
    keep: Bool[ArrayLike, "#T #S"] | None = None,
) -> tuple[Float[ArrayLike, "T Dv"], Float[ArrayLike, "T S"], Float[ArrayLike, " T"]]:
    """`attention_parts` with the dropout decided by `keep` (True = kept, drawn by the
    caller: the batched reference draws every head's mask at once), not by a key."""
    score_fn = scaled_dot_product_score if score_fn is None else score_fn
    logits = score_fn(query, key).astype(jnp.float32)  # [T, S]
    T, S = logits.shape
    q_idx = jnp.arange(T)[:, None]
    kv_idx = jnp.arange(S)[None, :]
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if score_mod is not None:
        logits = score_mod(logits, q_idx, kv_idx)
    if mask_mod is not None:
        mod_mask = jnp.broadcast_to(mask_mod(q_idx, kv_idx), (T, S))
        mask = mod_mask if mask is None else mask & mod_mask
    if mask is not None:
        mask = jnp.broadcast_to(mask, (T, S))
    weights, lse = masked_softmax(logits, mask)
    if dropout_rate > 0.0:
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    output = jnp.einsum(
        "ts,sv->tv", weights, value.astype(jnp.float32), preferred_element_type=jnp.float32
    )
    return output.astype(value.dtype), weights, lse


def attention(
    query: Float[ArrayLike, "T D"],
    key: Float[ArrayLike, "S Dk"],
    value: Float[ArrayLike, "S Dv"],
    **kwargs,
) -> Float[Array, "T Dv"]:
    """One head of attention: `softmax(score(q, k) + bias, mask) @ v`.

    Takes the keyword arguments of `attention_parts` (score_fn, bias, mask, score_mod,
    mask_mod, dropout_rate, dropout_key).

    Returns:
      Output `[T, Dv]` in value's dtype; a row with no visible key is 0.
    """
    return attention_parts(query, key, value, **kwargs)[0]


def attention_weights(
    query: Float[ArrayLike, "T D"], key: Float[ArrayLike, "S Dk"], **kwargs
) -> Float[Array, "T S"]:
    """The attention weights `[T, S]` (float32) of one head; rows sum to 1, or 0 if empty.

    Takes the keyword arguments of `attention_parts` except value.
    """
    value = jnp.zeros((key.shape[0], 1), jnp.float32)
    return attention_parts(query, key, value, **kwargs)[1]
