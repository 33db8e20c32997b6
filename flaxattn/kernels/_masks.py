"""Mask helpers: dense boolean masks (True = attend) and composable `mask_mod`/`score_mod`s.

Dense helpers return arrays that broadcast against `[B, N, T, S]`. Index mods are functions
of `(q_idx, kv_idx)` that every implementation evaluates blockwise, so they never need a
`[T, S]` array.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike, Bool, Int

from flaxattn.kernels._single_head import MaskMod, ScoreMod
from flaxattn.kernels._validate import check_window
from flaxattn.kernels._visibility import Limits, Visibility


def _dense(visibility: Visibility, T: int, S: int) -> Bool[Array, "T S"]:
    limits = Limits(jnp.int32(T), jnp.int32(S), jnp.int32(S - T))
    if visibility.causal_alignment == "top_left":
        limits = limits._replace(offset=jnp.int32(0))
    return visibility.visible(jnp.arange(T)[:, None], jnp.arange(S)[None, :], limits)


def causal_mask(
    T: int, S: int | None = None, alignment: str = "top_left"
) -> Bool[Array, "T S"]:
    """`[T, S]` causal mask; `'bottom_right'` aligns the last query with the last key."""
    S = T if S is None else S
    return _dense(Visibility(is_causal=True, causal_alignment=alignment), T, S)


def window_mask(
    T: int, S: int | None, window: int | tuple[int, int], alignment: str = "top_left"
) -> Bool[Array, "T S"]:
    """`[T, S]` local-window mask: query at position p sees keys in `[p - left, p + right]`."""
    S = T if S is None else S
    return _dense(Visibility(window=check_window(window), causal_alignment=alignment), T, S)


def padding_mask(
    query_lengths: Int[ArrayLike, " B"] | None,
    key_lengths: Int[ArrayLike, " B"] | None,
    T: int,
    S: int,
) -> Bool[Array, "B 1 T S"]:
    """`[B, 1, T, S]` mask hiding query rows and key columns past each example's length."""
    q, k = True, True
    if query_lengths is not None:
        q = jnp.arange(T)[None, :, None] < query_lengths[:, None, None]  # [B, T, 1]
    if key_lengths is not None:
        k = jnp.arange(S)[None, None, :] < key_lengths[:, None, None]  # [B, 1, S]
    batch = _batch(query_lengths, key_lengths)
    return jnp.broadcast_to(jnp.logical_and(q, k), (batch, T, S))[:, None]


def _batch(*lengths: ArrayLike | None) -> int:
    sizes = [x.shape[0] for x in lengths if x is not None]
    return sizes[0] if sizes else 1


def combine_masks(*masks: ArrayLike | None) -> Array | None:
    """Logical "and" of broadcastable masks, skipping `None`s (None if all are None)."""
    present = [jnp.asarray(m, bool) for m in masks if m is not None]
    return functools.reduce(jnp.logical_and, present) if present else None


def and_masks(*mods: MaskMod) -> MaskMod:
    """A `mask_mod` that attends where every one of `mods` does."""
    return lambda q_idx, kv_idx: functools.reduce(
        jnp.logical_and, [m(q_idx, kv_idx) for m in mods]
    )


def or_masks(*mods: MaskMod) -> MaskMod:
    """A `mask_mod` that attends where any one of `mods` does."""
    return lambda q_idx, kv_idx: functools.reduce(jnp.logical_or, [m(q_idx, kv_idx) for m in mods])


def causal_mask_mod(q_idx: ArrayLike, kv_idx: ArrayLike) -> Array:
    """`mask_mod`: key index at most the query index."""
    return kv_idx <= q_idx


def prefix_lm_mask_mod(prefix_length: int | Array) -> MaskMod:
    """`mask_mod` for prefix-LM: the first `prefix_length` keys are visible to all queries."""
    return lambda q_idx, kv_idx: kv_idx < prefix_length


def document_mask_mod(
    query_document_ids: Int[ArrayLike, " T"], key_document_ids: Int[ArrayLike, " S"] | None = None
) -> MaskMod:
    """`mask_mod` for packed sequences: queries see only keys of the same document."""
    kv_ids = query_document_ids if key_document_ids is None else key_document_ids
    return lambda q_idx, kv_idx: query_document_ids[q_idx] == kv_ids[kv_idx]


def soft_cap_score_mod(cap: float) -> ScoreMod:
    """`score_mod` that soft-caps logits to `(-cap, cap)` with `cap · tanh(score / cap)`."""
    return lambda score, q_idx, kv_idx: cap * jnp.tanh(score / cap)


def alibi_score_mod(slope: float | Array) -> ScoreMod:
    """`score_mod` adding ALiBi's `slope · (kv_idx - q_idx)` (one head; Press et al. 2022)."""
    return lambda score, q_idx, kv_idx: score + slope * (kv_idx - q_idx).astype(jnp.float32)


def relative_bias_score_mod(table: ArrayLike, max_distance: int) -> ScoreMod:
    """`score_mod` adding a learned bias by clipped relative distance.

    Args:
      table: `[2 * max_distance + 1]` biases for `kv_idx - q_idx` in `[-max, max]`.
      max_distance: distances beyond it share the end entries.
    """
    def mod(score: ArrayLike, q_idx: ArrayLike, kv_idx: ArrayLike) -> Array:
        rel = jnp.clip(kv_idx - q_idx, -max_distance, max_distance) + max_distance
        return score + table[rel]

    return mod
