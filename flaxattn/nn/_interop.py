"""Interop with flax: flaxattn kernels inside flax's attention modules, and weight conversion.

`flax_attention_fn` adapts `flaxattn.dot_product_attention` to the `attention_fn` protocol
of `flax.nnx.MultiHeadAttention` and `flax.linen.MultiHeadDotProductAttention` (the keyword
arguments they pass are in `flax/nnx/nn/attention.py` and `flax/linen/attention.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax import Array
from jaxtyping import ArrayLike

from flaxattn.kernels import dot_product_attention
from flaxattn.nn._attention import MultiHeadAttention


def flax_attention_fn(implementation: str | None = None, **kernel_kwargs: Any) -> Callable:
    """An `attention_fn` for flax's multi-head attention modules, backed by flaxattn.

    Outputs match flax's default `dot_product_attention` except on query rows with no visible
    key (flaxattn gives 0 there, flax the average of the values). Differences, by design:
    the softmax is always float32 (`force_fp32_for_softmax` is accepted and implied);
    `precision` is accepted and unused (accumulation is float32); dropout draws its own
    mask per batch and head (`broadcast_dropout` is accepted; the mask differs from flax's,
    the distribution is the same); with `module` (flax's `sow_weights=True`) the weights
    sown as `attention_weights` are those applied to the values (after dropout).

    Args:
      implementation: passed to `flaxattn.dot_product_attention` (None = its rule; sowing
        or dropout need the weights and use `'reference'`).
      **kernel_kwargs: further keywords for the kernel, e.g. `local_window_size`,
        `causal_alignment`, `score_mod`, `mask_mod`.

    Returns:
      `attention_fn(query, key, value, bias=None, mask=None, **flax_kwargs)` on
      `[batch..., length, heads, head_dim]` arrays (any number of batch dims, or none).
    """

    def attention_fn(
        query: ArrayLike,
        key: ArrayLike,
        value: ArrayLike,
        bias: ArrayLike | None = None,
        mask: ArrayLike | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: ArrayLike | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: Any = None,
        is_causal: bool = False,
        force_fp32_for_softmax: bool = False,
        qk_attn_weights_einsum: Any = None,
        attn_weights_value_einsum: Any = None,
    ) -> Array:
        del broadcast_dropout, precision, force_fp32_for_softmax
        if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
            raise ValueError(
                "flax_attention_fn does not support custom einsums (qk_attn_weights_einsum, "
                "attn_weights_value_einsum); use flax's own dot_product_attention."
            )
        dtype = jnp.result_type(query, key, value) if dtype is None else dtype
        query, key, value = (x.astype(dtype) for x in (query, key, value))
        batch = query.shape[:-3]
        query, key, value = (_flatten_batch(x, batch) for x in (query, key, value))
        bias = None if bias is None else _flatten_batch(bias, batch)
        mask = None if mask is None else _flatten_batch(jnp.asarray(mask, bool), batch)
        dropout = not deterministic and dropout_rate > 0.0
        kwargs = dict(kernel_kwargs, is_causal=is_causal, implementation=implementation)
        if dropout:
            kwargs.update(dropout_rate=dropout_rate, dropout_key=dropout_rng)
        if module is None:
            out = dot_product_attention(query, key, value, bias, mask, **kwargs)
        else:
            out, weights = dot_product_attention(
                query, key, value, bias, mask, return_weights=True, **kwargs
            )
            weights = weights.reshape(batch + weights.shape[1:])  # [batch..., N, T, S]
            if isinstance(module, nnx.Module):
                module.sow(nnx.Intermediate, "attention_weights", weights)
            else:
                module.sow("intermediates", "attention_weights", weights)
        return out.reshape(batch + out.shape[1:])

    return attention_fn


def _flatten_batch(x: ArrayLike, batch: tuple[int, ...]) -> Array:
    """`[batch..., a, b, c]` as `[prod(batch), a, b, c]`. A mask or bias with fewer axes gets
    leading singletons; one whose batch axes are not all 1 is broadcast to the batch."""
    x = jnp.asarray(x)
    x = x.reshape((1,) * (len(batch) + 3 - x.ndim) + x.shape)
    rest = x.shape[len(batch):]
    if math.prod(x.shape[: len(batch)]) != 1:
        x = jnp.broadcast_to(x, batch + rest)
    return x.reshape((-1,) + rest)


def from_flax_nnx(mha: nnx.Module, *, rngs: nnx.Rngs) -> MultiHeadAttention:
    """A flaxattn `MultiHeadAttention` with the weights of a `flax.nnx.MultiHeadAttention`.

    Both hold the same `nnx.LinearGeneral` projections (query, key, value, out) and, with
    `normalize_qk`, the same LayerNorms, so the parameters are copied as they are. Given the
    same inputs the two give the same outputs (apart from fully-masked rows); flax's
    `inputs_k`/`inputs_v` pair becomes `inputs_kv` (flaxattn projects k and v from one input).

    Args:
      mha: the flax module (its `attention_fn` is not carried over: the result uses flaxattn's).
      rngs: for the new module's dropout stream (its parameters are overwritten).
    """
    if not isinstance(mha, nnx.MultiHeadAttention):
        raise TypeError(f"mha must be a flax.nnx.MultiHeadAttention, got {type(mha).__name__}.")
    converted = MultiHeadAttention(
        mha.num_heads, mha.in_features, num_kv_heads=mha.num_kv_heads,
        qkv_features=mha.qkv_features, out_features=mha.out_features,
        in_kv_features=mha.in_kv_features, use_bias=mha.use_bias,
        dropout_rate=mha.dropout_rate, normalize_qk=mha.normalize_qk, dtype=mha.dtype,
        param_dtype=mha.param_dtype, rngs=rngs,
    )
    for name in ("query", "key", "value", "out", "query_ln", "key_ln"):
        source = getattr(mha, name)
        if source is not None:
            nnx.update(getattr(converted, name), nnx.clone(nnx.state(source, nnx.Param)))
    return converted
