"""Public batched entry points: `dot_product_attention` (a drop-in for jax.nn's),
`attention` (any score function) and `additive_attention` (Bahdanau)."""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import Array

from flaxattn.kernels import _validate as V
from flaxattn.kernels._reference import reference_attention
from flaxattn.kernels._scores import ScoreFn, additive_score, scaled_dot_product_score
from flaxattn.kernels._single_head import MaskMod, ScoreMod
from flaxattn.kernels._visibility import CAUSAL_ALIGNMENTS, Visibility

Implementation = Literal["reference", "blocked", "pallas", "xla", "cudnn"]
IMPLEMENTATIONS = ("reference", "blocked", "pallas", "xla", "cudnn")
# Below this many keys the blocked kernel's loop overhead outweighs the [T, S] it saves.
BLOCKED_MIN_KV_LENGTH = 256


def choose_implementation(
    *, kv_length: int, needs_weights: bool, dropout: bool, backend: str | None = None
) -> str:
    """The rule that `implementation=None` follows; cheap and deterministic.

    1. Returning weights or applying dropout needs the `[T, S]` weights: `'reference'`.
    2. Fewer than `BLOCKED_MIN_KV_LENGTH` keys: `'reference'` (one fused softmax is fastest).
    3. Otherwise `'blocked'`: O(T) memory, skips masked blocks, on every backend.
    """
    del backend  # Same rule on every backend until an accelerator kernel is preferred.
    if needs_weights or dropout:
        return "reference"
    if kv_length < BLOCKED_MIN_KV_LENGTH:
        return "reference"
    return "blocked"


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation | None = None,
    return_residual: bool = False,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
    return_weights: bool = False,
    block_sizes: tuple[int, int] | None = None,
) -> Array | tuple[Array, ...]:
    """Scaled dot-product attention; a drop-in for `jax.nn.dot_product_attention`.

        output = softmax(scale · Q Kᵀ + bias, masked) V        per head, float32 inside

    The arguments up to `return_residual` mean what they mean in jax.nn. One deliberate
    difference: a query row with no visible key gets output 0 (weights 0, finite gradients),
    where jax.nn and flax return the average of all values.

    Args:
      query: `[B, T, N, H]` (or `[T, N, H]`).
      key: `[B, S, K, H]`; `K` must divide `N` (GQA; `K = 1` is MQA).
      value: `[B, S, K, Hv]`.
      bias: added to the logits, broadcastable to `[B, N, T, S]`.
      mask: booleans broadcastable to `[B, N, T, S]`, True = attend.
      scale: logit multiplier; default `1 / sqrt(H)`.
      is_causal: hide keys after each query's position.
      query_seq_lengths: `[B]` int; rows past the length are output 0.
      key_value_seq_lengths: `[B]` int; keys past the length are hidden.
      local_window_size: `w` or `(left, right)`: each query sees keys in `[pos-left, pos+right]`.
      implementation: `'reference'`, `'blocked'`, `'pallas'`, `'xla'`, `'cudnn'`, or `None`
        for the rule in `choose_implementation`.
      return_residual: also return the logsumexp `[B, T, N]` (as jax.nn does).
      causal_alignment: `'top_left'` (jax.nn's default: query i is at key i) or
        `'bottom_right'` (the last valid query is at the last valid key, for decoding with a
        cache); it moves the causal and window masks when `T != S`.
      score_mod: `(score, q_idx, kv_idx) -> score`, e.g. soft-capping or a relative bias.
      mask_mod: `(q_idx, kv_idx) -> bool`, e.g. prefix-LM or document masks.
      dropout_rate: dropout on the weights (needs `dropout_key`).
      dropout_key: PRNG key for dropout.
      return_weights: also return the weights `[B, N, T, S]` (float32, after dropout).
      block_sizes: `(block_q, block_k)` for `'blocked'`; default chosen by shape.

    Returns:
      `output [B, T, N, Hv]` in the input dtype; with `return_residual`, `(output, residual)`;
      with `return_weights`, `(output, weights)`; with both, `(output, residual, weights)`.
    """
    V.check_arrays(query=query, key=key, value=value)
    if not query.ndim == key.ndim == value.ndim:
        raise ValueError(
            "query, key and value must all have rank 4 [batch, length, heads, head_dim] or all "
            f"rank 3 (unbatched), got shapes {tuple(query.shape)}, {tuple(key.shape)} and "
            f"{tuple(value.shape)}."
        )
    if query.ndim == 3 and key.ndim == 3 and value.ndim == 3:
        # Unbatched: bias and mask keep their shapes; like any rank < 4 mask they broadcast
        # from the right against [1, N, T, S], and a rank-4 one (as jax.nn takes) stays as is.
        results = dot_product_attention(
            query[None], key[None], value[None], bias, mask,
            scale=scale, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
            implementation=implementation, return_residual=return_residual,
            causal_alignment=causal_alignment, score_mod=score_mod, mask_mod=mask_mod,
            dropout_rate=dropout_rate, dropout_key=dropout_key, return_weights=return_weights,
            block_sizes=block_sizes,
        )
        return jax.tree.map(lambda x: x[0], results)
    dims = V.check_qkv(query, key, value)
    if implementation is not None:
        V.check_choice("implementation", implementation, IMPLEMENTATIONS)
    V.check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    V.check_static("is_causal", is_causal, "bool")
    V.check_dropout(dropout_rate, dropout_key)
    bias = V.check_broadcastable("bias", bias, dims, boolean=False)
    mask = V.check_broadcastable("mask", mask, dims, boolean=True)
    visibility = Visibility(
        is_causal=bool(is_causal),
        window=V.check_window(local_window_size),
        q_lengths=V.check_lengths("query_seq_lengths", query_seq_lengths, dims.B),
        kv_lengths=V.check_lengths("key_value_seq_lengths", key_value_seq_lengths, dims.B),
        causal_alignment=causal_alignment,
    )
    scale = V.check_scale(scale, dims.H)
    if implementation is None:
        implementation = choose_implementation(
            kv_length=dims.S, needs_weights=return_weights, dropout=dropout_rate > 0.0
        )

    if implementation in ("xla", "cudnn"):
        unsupported = {
            "score_mod": score_mod is not None,
            "mask_mod": mask_mod is not None,
            "dropout_rate": dropout_rate > 0.0,
            "return_weights": return_weights,
            "causal_alignment='bottom_right'": causal_alignment == "bottom_right",
        }
        for name, used in unsupported.items():
            if used:
                raise ValueError(f"implementation={implementation!r} does not support {name}.")
        return jax.nn.dot_product_attention(
            query, key, value, bias, mask, scale=scale, is_causal=is_causal,
            query_seq_lengths=visibility.q_lengths,
            key_value_seq_lengths=visibility.kv_lengths, local_window_size=visibility.window,
            implementation=implementation, return_residual=return_residual,
        )

    if implementation == "reference":
        out, weights, lse = reference_attention(
            query, key, value, bias=bias, mask=mask, visibility=visibility,
            score_fn=functools.partial(scaled_dot_product_score, scale=scale),
            score_mod=score_mod, mask_mod=mask_mod, dropout_rate=dropout_rate,
            dropout_key=dropout_key,
        )
    else:
        if return_weights or dropout_rate > 0.0:
            raise ValueError(
                f"implementation={implementation!r} never forms the [T, S] weights, so it "
                "supports neither return_weights nor dropout_rate; use 'reference'."
            )
        if implementation == "blocked":
            from flaxattn.kernels._blocked import blocked_attention as kernel
        else:
            from flaxattn.kernels._pallas import pallas_attention as kernel
        out, lse = kernel(
            query, key, value, bias=bias, mask=mask, visibility=visibility, scale=scale,
            score_mod=score_mod, mask_mod=mask_mod, block_sizes=block_sizes,
        )
        weights = None
    results = (out,)
    if return_residual:
        results += (jnp.swapaxes(lse, 1, 2).astype(query.dtype),)  # [B, T, N]
    if return_weights:
        results += (weights,)
    return results[0] if len(results) == 1 else results


def attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    score_fn: ScoreFn | None = None,
    score_params: Any = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    """Batched multi-head attention with any single-head score function.

    Args:
      query: `[B, T, N, D]`.
      key: `[B, S, K, E]` (`E` may differ from `D` when `score_fn` maps between them).
      value: `[B, S, K, Hv]`.
      bias, mask, is_causal, query_seq_lengths, key_value_seq_lengths, local_window_size,
        causal_alignment, score_mod, mask_mod, dropout_rate, dropout_key: as in
        `dot_product_attention`.
      score_fn: `(q [T, D], k [S, E], *params) -> [T, S]`; default scaled dot product.
      score_params: tuple of arrays each with a leading `N` axis: head `n` calls
        `score_fn(q, k, *[p[n] for p in score_params])`.
      return_weights: also return the weights `[B, N, T, S]`.

    Returns:
      `output [B, T, N, Hv]`, or `(output, weights)` with `return_weights`.
    """
    dims = V.check_qkv(query, key, value, same_head_dim=score_fn is None)
    V.check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    V.check_static("is_causal", is_causal, "bool")
    V.check_dropout(dropout_rate, dropout_key)
    score_params = jax.tree.map(jnp.asarray, score_params)
    for i, p in enumerate(jax.tree.leaves(score_params)):
        if p.ndim == 0 or p.shape[0] != dims.N:
            raise ValueError(
                f"score_params[{i}] must have a leading heads axis of size N={dims.N}, got "
                f"shape {tuple(p.shape)}."
            )
    visibility = Visibility(
        is_causal=bool(is_causal),
        window=V.check_window(local_window_size),
        q_lengths=V.check_lengths("query_seq_lengths", query_seq_lengths, dims.B),
        kv_lengths=V.check_lengths("key_value_seq_lengths", key_value_seq_lengths, dims.B),
        causal_alignment=causal_alignment,
    )
    out, weights, _ = reference_attention(
        query, key, value,
        bias=V.check_broadcastable("bias", bias, dims, boolean=False),
        mask=V.check_broadcastable("mask", mask, dims, boolean=True),
        visibility=visibility, score_fn=score_fn, score_params=score_params,
        score_mod=score_mod, mask_mod=mask_mod, dropout_rate=dropout_rate,
        dropout_key=dropout_key,
    )
    return (out, weights) if return_weights else out


def additive_attention(
    query: Array,
    key: Array,
    value: Array,
    query_weight: Array,
    key_weight: Array,
    energy_weight: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    **kwargs: Any,
) -> Array | tuple[Array, Array]:
    """Batched multi-head additive (Bahdanau) attention, `vᵀ tanh(W_q q + W_k k)` per head.

    Args:
      query: `[B, T, N, D]`.
      key: `[B, S, K, E]`.
      value: `[B, S, K, Hv]`.
      query_weight: `W_q`, `[N, D, A]`, one per query head.
      key_weight: `W_k`, `[N, E, A]`.
      energy_weight: `v`, `[N, A]`.
      bias, mask, **kwargs: as in `attention` (masks, lengths, dropout, return_weights, ...).

    Returns:
      As `attention`.
    """
    return attention(
        query, key, value, bias, mask, score_fn=additive_score,
        score_params=(query_weight, key_weight, energy_weight), **kwargs,
    )
