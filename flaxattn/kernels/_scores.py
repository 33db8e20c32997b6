"""Score functions: how much query `t` attends to key `s`, before the softmax.

Each takes one head, `query [T, D]` and `key [S, D]` (parameters, when it has any, are given
explicitly), and returns float32 logits `[T, S]`. Bind parameters with `functools.partial` to
get the `score_fn(query, key)` that the kernels take.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike, Float

ScoreFn = Callable[[Array, Array], Array]


def _f32(x: ArrayLike) -> Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def dot_product_score(
    query: Float[ArrayLike, "T D"], key: Float[ArrayLike, "S D"]
) -> Float[Array, "T S"]:
    """Dot-product score `q · k` (Luong "dot").

    Args:
      query: `[T, D]`.
      key: `[S, D]`.

    Returns:
      Logits `[T, S]` in float32.
    """
    return jnp.einsum("td,sd->ts", query, key, preferred_element_type=jnp.float32)


def scaled_dot_product_score(
    query: Float[ArrayLike, "T D"], key: Float[ArrayLike, "S D"], scale: float | None = None
) -> Float[Array, "T S"]:
    """Scaled dot-product score `scale · q · k`, with `scale = 1/sqrt(D)` by default.

    Vaswani et al., "Attention Is All You Need" (2017).

    Args:
      query: `[T, D]`.
      key: `[S, D]`.
      scale: multiplier of the logits; `None` means `1 / sqrt(D)`.

    Returns:
      Logits `[T, S]` in float32.
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    return dot_product_score(query, key) * jnp.float32(scale)


def general_score(
    query: Float[ArrayLike, "T D"], key: Float[ArrayLike, "S E"], weight: Float[ArrayLike, "D E"]
) -> Float[Array, "T S"]:
    """Multiplicative ("general") score `q W kᵀ`.

    Luong et al., "Effective Approaches to Attention-based NMT" (2015).

    Args:
      query: `[T, D]`.
      key: `[S, E]`.
      weight: `[D, E]`.

    Returns:
      Logits `[T, S]` in float32.
    """
    return jnp.einsum(
        "td,de,se->ts", _f32(query), _f32(weight), _f32(key), preferred_element_type=jnp.float32
    )


def additive_score(
    query: Float[ArrayLike, "T D"],
    key: Float[ArrayLike, "S E"],
    query_weight: Float[ArrayLike, "D A"],
    key_weight: Float[ArrayLike, "E A"],
    energy_weight: Float[ArrayLike, " A"],
) -> Float[Array, "T S"]:
    """Additive (Bahdanau) score `vᵀ tanh(W_q q + W_k k)`.

    Bahdanau et al., "Neural Machine Translation by Jointly Learning to Align and Translate"
    (2015). `A` is the attention (energy) dimension.

    Args:
      query: `[T, D]`.
      key: `[S, E]`.
      query_weight: `W_q`, `[D, A]`.
      key_weight: `W_k`, `[E, A]`.
      energy_weight: `v`, `[A]`.

    Returns:
      Logits `[T, S]` in float32.
    """
    q = _f32(query) @ _f32(query_weight)  # [T, A]
    k = _f32(key) @ _f32(key_weight)  # [S, A]
    return jnp.tanh(q[:, None, :] + k[None, :, :]) @ _f32(energy_weight)  # [T, S]


def cosine_score(
    query: Float[ArrayLike, "T D"],
    key: Float[ArrayLike, "S D"],
    temperature: float | Array = 1.0,
    eps: float = 1e-6,
) -> Float[Array, "T S"]:
    """Cosine-similarity score `cos(q, k) / temperature`.

    As in Graves et al., "Neural Turing Machines" (2014) content addressing and Henry et al.,
    "Query-Key Normalization for Transformers" (2020). `eps` keeps zero vectors finite.

    Args:
      query: `[T, D]`.
      key: `[S, D]`.
      temperature: divides the cosines; smaller is sharper.
      eps: floor on the vector norms.

    Returns:
      Logits `[T, S]` in float32, in `[-1/temperature, 1/temperature]`.
    """
    def unit(x: ArrayLike) -> Array:
        # max(|x|, eps) as sqrt(max(|x|², eps²)): same value, and the gradient stays finite
        # at x = 0, where the gradient of jnp.linalg.norm is NaN.
        squared_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps**2))

    return (unit(_f32(query)) @ unit(_f32(key)).T) / temperature
