"""Masked softmax where a row with nothing visible gives zeros, with finite gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike, Bool, Float


def masked_softmax(
    logits: Float[ArrayLike, "*rows S"], mask: Bool[ArrayLike, "*#rows #S"] | None = None
) -> tuple[Float[Array, "*rows S"], Float[Array, "*rows"]]:
    """Softmax over the last axis, restricted to `mask`, in float32.

    Masked logits are replaced by the dtype's minimum *before* the exponent, so neither the
    value nor its gradient can overflow; a row with no visible key gets weights 0 (not the
    uniform average that a large negative bias gives, and not NaN).

    Args:
      logits: `[..., S]`, any float dtype; computed in float32.
      mask: `[..., S]` booleans, True = visible; `None` = all visible.

    Returns:
      `(weights [..., S], logsumexp [...])`; the logsumexp of an empty row is `-inf`.
    """
    logits = logits.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    # `initial` keeps the max finite for S = 0 and for rows whose logits are all -inf.
    min_value = jnp.finfo(jnp.float32).min
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True, initial=min_value))
    unnormalised = jnp.exp(logits - row_max)
    if mask is not None:
        unnormalised = jnp.where(mask, unnormalised, 0.0)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    weights = unnormalised / jnp.where(total == 0.0, 1.0, total)
    lse = jnp.where(total > 0.0, jnp.log(jnp.where(total > 0.0, total, 1.0)) + row_max, -jnp.inf)
    return weights, lse[..., 0]
