"""FAVOR+: softmax attention approximated with positive random features (Performer).

For `x = q·√scale` and `y = k·√scale`, the softmax similarity `exp(x·y)` is the expectation of
`φ(x)·φ(y)` over Gaussian projections `w_1..w_M`, with the positive features

    φ(x) = exp(W x - |x|²/2) / √M                                               # [M]

so softmax attention becomes kernelised attention (`flaxattn.kernels._linear`): O(T·M·Hv)
instead of O(T·S·H), with an error that shrinks as `M` grows (about `1/√M`). Orthogonal
projections (blocks of a random orthogonal matrix with chi-distributed row norms) lower the
variance further.

Numerical stability: each query's features are divided by their own maximum and each head's
key features by the maximum over its (valid) keys; both factors cancel between numerator and
denominator, so they change nothing but the range.

Masks, lengths and biases are honoured as in `linear_attention` (a bias multiplies the
similarity by `exp(bias)`, exactly as it does in softmax attention), unlike some public
versions that drop them.

Reference: Choromanski et al., "Rethinking Attention with Performers" (ICLR 2021).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike, Float

from flaxattn.kernels._call import Call, Result, finish, prepare
from flaxattn.kernels._linear import (
    DEFAULT_CHUNK_SIZE,
    KERNELIZED_SUPPORTS,
    kernelized_attention,
    window_below_length,
)
from flaxattn.kernels._registry import Implementation, register

DEFAULT_NUM_FEATURES = 256


def favor_projection(
    key: ArrayLike, num_features: int, head_dim: int, *, orthogonal: bool = True
) -> Float[Array, "M H"]:
    """Random projection `W [M, H]` for FAVOR+ features, rows distributed as `N(0, I_H)`.

    Args:
      key: PRNG key.
      num_features: `M`.
      head_dim: `H`.
      orthogonal: draw rows in orthogonal blocks of `H` (each block from the QR of a Gaussian
        matrix, rows rescaled to chi-distributed norms); else i.i.d. Gaussian rows.

    Returns:
      `[M, H]` float32.
    """
    if num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features}.")
    gauss_key, norm_key = jax.random.split(key)
    if not orthogonal:
        return jax.random.normal(gauss_key, (num_features, head_dim), jnp.float32)
    blocks = -(-num_features // head_dim)
    g = jax.random.normal(gauss_key, (blocks, head_dim, head_dim), jnp.float32)
    qr_q, qr_r = jnp.linalg.qr(g)
    # Fix the signs (diag(R) > 0) so that Q is Haar-distributed and its rows unbiased.
    qr_q = qr_q * jnp.sign(jnp.diagonal(qr_r, axis1=1, axis2=2))[:, None, :]
    rows = jnp.swapaxes(qr_q, 1, 2).reshape(-1, head_dim)[:num_features]
    norms = jnp.linalg.norm(
        jax.random.normal(norm_key, (num_features, head_dim), jnp.float32), axis=-1
    )
    return rows * norms[:, None]


def _log_features(x: Float[ArrayLike, "... H"], projection: Float[ArrayLike, "M H"]) -> Array:
    """`log φ(x) + log √M = W x - |x|²/2`, float32."""
    return x @ projection.T - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)


def favor_attention(
    query: Float[ArrayLike, "*B T N H"],
    key: Float[ArrayLike, "*B S K H"],
    value: Float[ArrayLike, "*B S K Hv"],
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    num_features: int = DEFAULT_NUM_FEATURES,
    feature_key: ArrayLike | None = None,
    projection: Float[ArrayLike, "M H"] | None = None,
    orthogonal: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **keywords: Any,
) -> Float[Array, "*B T N Hv"]:
    """Softmax attention approximated by FAVOR+ positive random features, O(T·M).

    Same calling convention as `dot_product_attention`, plus the random features: pass either
    `feature_key` (a projection of `num_features` rows is drawn, shared by all heads) or a
    fixed `projection` from `favor_projection` (what a module does, so that the features stay
    put between steps). Masks, lengths and biases are honoured; those that couple queries and
    keys cost O(T·S) (see `kernelized_attention`). A query with nothing visible gives 0.

    Args:
      query: `[B, T, N, H]` (or `[T, N, H]`).
      key: `[B, S, K, H]`; `K` divides `N`.
      value: `[B, S, K, Hv]`.
      bias: broadcastable to `[B, N, T, S]`, added to the (approximated) logits.
      mask: booleans, broadcastable to `[B, N, T, S]`, True = attend.
      num_features: `M`, when drawing from `feature_key`.
      feature_key: PRNG key for the projection.
      projection: `[M, H]`, overrides `feature_key` and `num_features`.
      orthogonal: orthogonal blocks when drawing from `feature_key`.
      chunk_size: chunk length of the causal prefix sums.
      **keywords: `dot_product_attention`'s keywords `scale` (default `1 / sqrt(H)`),
        `is_causal`, `query_seq_lengths`, `key_value_seq_lengths`, `local_window_size`,
        `causal_alignment`; others it does not support raise a `ValueError`.

    Returns:
      `[B, T, N, Hv]` in the input dtype.
    """
    call = prepare(query, key, value, bias, mask, caller="favor_attention", **keywords)
    if projection is None:
        if feature_key is None:
            raise ValueError(
                "favor_attention needs random features: pass feature_key (a PRNG key) or a "
                "projection from favor_projection."
            )
        projection = favor_projection(
            feature_key, num_features, call.dims.H, orthogonal=orthogonal
        )
    return finish(call, FAVOR(call, projection=projection, chunk_size=chunk_size))


def _run_favor(
    call: Call, *, projection: ArrayLike, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Result:
    window_below_length(call, "favor_attention")
    dims = call.dims
    projection = jnp.asarray(projection, jnp.float32)
    if projection.ndim != 2 or projection.shape[1] != dims.H:
        raise ValueError(
            f"projection must have shape [M, H] with H={dims.H}, got {tuple(projection.shape)}."
        )
    root = jnp.sqrt(jnp.asarray(call.scale, jnp.float32))
    log_q = _log_features(call.query.astype(jnp.float32) * root, projection)  # [B, T, N, M]
    log_k = _log_features(call.key.astype(jnp.float32) * root, projection)  # [B, S, K, M]
    # Stabilisers (they cancel): each query row by its max; each head's keys by their max
    # over valid keys, so that padding cannot push the real keys into underflow.
    phi_q = jnp.exp(log_q - jax.lax.stop_gradient(jnp.max(log_q, axis=-1, keepdims=True)))
    kv_len = call.visibility.limits(dims.B, dims.T, dims.S).kv_len
    valid = jnp.arange(dims.S)[None, :, None, None] < kv_len[:, None, None, None]
    key_max = jnp.max(jnp.where(valid, log_k, -jnp.inf), axis=(1, 3), keepdims=True)
    key_max = jnp.where(jnp.isfinite(key_max), key_max, 0.0)
    phi_k = jnp.exp(log_k - jax.lax.stop_gradient(key_max))
    out = kernelized_attention(
        phi_q, phi_k, call.value, bias=call.bias, mask=call.mask, visibility=call.visibility,
        chunk_size=chunk_size,
    )
    return Result(out.astype(call.query.dtype))


FAVOR = register(
    Implementation(
        "favor", _run_favor, "FAVOR+ positive random features approximating softmax, O(T·M)",
        supports=KERNELIZED_SUPPORTS, kind="approximate", options=("projection", "chunk_size"),
        required=("projection",),
    )
)
