"""Public batched entry points: `dot_product_attention` (a drop-in for jax.nn's),
`scored_attention` (any score function) and `additive_attention` (Bahdanau)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike

from flaxattn.kernels import _registry
from flaxattn.kernels._call import Result, finish, prepare
from flaxattn.kernels._reference import reference_attention
from flaxattn.kernels._scores import ScoreFn, additive_score
from flaxattn.kernels._single_head import MaskMod, ScoreMod


def dot_product_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    scale: float | ArrayLike | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    return_residual: bool = False,
    causal_alignment: str = "top_left",
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    dropout_rate: float = 0.0,
    dropout_key: ArrayLike | None = None,
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
      implementation: the name of a registered implementation (`'reference'`, `'blocked'`,
        `'pallas'`, `'xla'`, `'cudnn'`, ...; see `flaxattn.kernels.implementations()`), or
        `None` for the rule in `choose_implementation`. One that cannot do what the call asks
        raises a `ValueError` naming the feature.
      return_residual: also return the logsumexp `[B, T, N]` (as jax.nn does).
      causal_alignment: `'top_left'` (jax.nn's default: query i is at key i) or
        `'bottom_right'` (the last valid query is at the last valid key, for decoding with a
        cache); it moves the causal and window masks when `T != S`.
      score_mod: `(score, q_idx, kv_idx) -> score`, e.g. soft-capping or a relative bias.
      mask_mod: `(q_idx, kv_idx) -> bool`, e.g. prefix-LM or document masks.
      dropout_rate: dropout on the weights (needs `dropout_key`).
      dropout_key: PRNG key for dropout.
      return_weights: also return the weights `[B, N, T, S]` (float32, after dropout).
      block_sizes: `(block_q, block_k)` for the tiled implementations (`'blocked'`,
        `'pallas'`); default chosen by shape. The others have no blocks and ignore it.

    Returns:
      `output [B, T, N, Hv]` in the input dtype; with `return_residual`, `(output, residual)`;
      with `return_weights`, `(output, weights)`; with both, `(output, residual, weights)`.
    """
    call = prepare(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, implementation=implementation,
        return_residual=return_residual, causal_alignment=causal_alignment, score_mod=score_mod,
        mask_mod=mask_mod, dropout_rate=dropout_rate, dropout_key=dropout_key,
        return_weights=return_weights, block_sizes=block_sizes,
    )
    return finish(call, _registry.run(call))


def scored_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    score_fn: ScoreFn | None = None,
    score_params: Any = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    causal_alignment: str = "top_left",
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    dropout_rate: float = 0.0,
    dropout_key: ArrayLike | None = None,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    """Batched multi-head attention with any single-head score function (always by the
    reference implementation: only it takes other scores than the dot product).

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
    call = prepare(
        query, key, value, bias, mask, caller="scored_attention", same_head_dim=score_fn is None,
        is_causal=is_causal, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
        causal_alignment=causal_alignment, score_mod=score_mod, mask_mod=mask_mod,
        dropout_rate=dropout_rate, dropout_key=dropout_key, return_weights=return_weights,
    )
    score_params = jax.tree.map(jnp.asarray, score_params)
    for i, p in enumerate(jax.tree.leaves(score_params)):
        if p.ndim == 0 or p.shape[0] != call.dims.N:
            raise ValueError(
                f"score_params[{i}] must have a leading heads axis of size N={call.dims.N}, got "
                f"shape {tuple(p.shape)}."
            )
    out, weights, lse = reference_attention(
        call.query, call.key, call.value, bias=call.bias, mask=call.mask,
        visibility=call.visibility, score_fn=score_fn, score_params=score_params,
        score_mod=score_mod, mask_mod=mask_mod, dropout_rate=call.dropout_rate,
        dropout_key=call.dropout_key,
    )
    return finish(call, Result(out, lse, weights))


def additive_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    query_weight: ArrayLike,
    key_weight: ArrayLike,
    energy_weight: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
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
      bias, mask, **kwargs: as in `scored_attention` (masks, lengths, dropout,
        return_weights, ...).

    Returns:
      As `scored_attention`.
    """
    return scored_attention(
        query, key, value, bias, mask, score_fn=additive_score,
        score_params=(query_weight, key_weight, energy_weight), **kwargs,
    )
