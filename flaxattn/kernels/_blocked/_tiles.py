"""The pieces every blocked pass uses on one block: slicing, layouts, the score tile."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array, lax
from jaxtyping import ArrayLike

from flaxattn.kernels._blocked._setup import Mods, Tiling
from flaxattn.kernels._visibility import Limits


def example_limits(limits: Limits, b: ArrayLike) -> Limits:
    return Limits(limits.q_len[b], limits.kv_len[b], limits.offset[b])


def rows(x: ArrayLike, b: ArrayLike, start: ArrayLike, size: int) -> Array:
    """`x[b, start:start + size]` of a `[B, L, ...]` array, without copying the example."""
    starts = (b, start) + (0,) * (x.ndim - 2)
    return lax.dynamic_slice(x, starts, (1, size) + x.shape[2:])[0]


def add_rows(x: ArrayLike, block: ArrayLike, b: ArrayLike, start: ArrayLike) -> Array:
    """`x[b, start:start + len(block)] += block`, in place."""
    starts = (b, start) + (0,) * (x.ndim - 2)
    current = lax.dynamic_slice(x, starts, (1,) + block.shape)
    return lax.dynamic_update_slice(x, current + block[None], starts)


def heads_major(x: ArrayLike, K: int, dtype: Any) -> Array:
    """`[L, N, H]` -> `[K, G·L, H]` (the rows of one kv head's G query heads) in `dtype`."""
    L, N, H = x.shape
    x = x.astype(dtype).reshape(L, K, N // K, H).transpose(1, 2, 0, 3)  # [K, G, L, H]
    return x.reshape(K, N // K * L, H)


def query_block(t: Tiling, x: ArrayLike, scale: ArrayLike) -> Array:
    """`[bq, N, H]` -> the `[K, G·bq, H]` query operand of the products, scaled if
    `t.scale_at == "query"`."""
    qs = heads_major(x, t.K, t.dtype)
    return qs * scale if t.scale_at == "query" else qs


def softmax_scores(t: Tiling, s: ArrayLike, scale: ArrayLike) -> Array:
    """The scores the softmax exponentiates: `logits`' tile, scaled if
    `t.scale_at == "softmax"` (which left it unscaled)."""
    return s * scale if t.scale_at == "softmax" else s


def rows_major(x: ArrayLike, L: int) -> Array:
    """`[K, G·L, H]` -> `[L, N, H]`, the inverse of `heads_major`."""
    K, M, H = x.shape
    return x.reshape(K, M // L, L, H).transpose(2, 0, 1, 3).reshape(L, M // L * K, H)


def broadcast_block(x: ArrayLike, t: Tiling, b, q_start, kv_start) -> Array:
    """The `[K|1, G|1, bq|1, bk|1]` block of a `[B|1, N|1, T|1, S|1]` bias or mask."""
    nb, nn, nt, ns = x.shape
    starts = (b if nb > 1 else 0, 0, q_start if nt > 1 else 0, kv_start if ns > 1 else 0)
    sizes = (1, nn, t.bq if nt > 1 else 1, t.bk if ns > 1 else 1)
    block = lax.dynamic_slice(x, starts, sizes)[0]
    heads = (t.K, t.G) if nn > 1 else (1, 1)
    return block.reshape(heads + block.shape[1:])



@dataclasses.dataclass(frozen=True)
class At:
    """Where a block sits: example `b`, first query `q_start`, first key `kv_start`."""

    b: ArrayLike
    q_start: ArrayLike
    kv_start: ArrayLike
    limits: Limits


def logits(t: Tiling, qs, kb, scale, bias, mods: Mods, mask, at: At, masked: bool,
            cols: bool = False):
    """One block's scores, hidden entries -inf; also, for the backward, the visible mask (or
    None) and score_mod's VJP (or None).

    `qs` is the query block `[K, G·bq, H]` from `query_block`, `kb` the key block `[K, bk, H]`
    (both in `t.dtype`); `scale` multiplies the scores if `t.scale_at == "scores"`. The
    tile is `[K, G·bq, bk]` (rows: queries down, as the forward's softmax wants) or, with `cols`,
    `[K, bk, G·bq]` (keys down: every backward matmul is then a plain or NT product, which are
    about twice as fast on CPU as products that contract a tile's leading axis).
    """
    K, G, bq, bk = t.K, t.G, t.bq, t.bk
    if cols:
        s = jnp.einsum("ksh,kmh->ksm", kb, qs, preferred_element_type=jnp.float32)
        tile = (K, bk, G, bq)
        q_idx = at.q_start + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
        kv_idx = at.kv_start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
        orient = lambda block: block.transpose(0, 3, 1, 2)  # [K|1, G|1, bq|1, bk|1] -> tile
        spread = lambda visible: visible[None, :, None, :]  # [bk, bq] -> [1, bk, 1, bq]
    else:
        s = jnp.einsum("kmh,ksh->kms", qs, kb, preferred_element_type=jnp.float32)
        tile = (K, G, bq, bk)
        q_idx = at.q_start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        kv_idx = at.kv_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        orient = lambda x: x
        spread = lambda visible: visible[None, None]  # [bq, bk] -> [1, 1, bq, bk]
    if t.scale_at == "scores":
        s = s * scale
    flat = s.shape
    if bias is not None:
        block = broadcast_block(bias, t, at.b, at.q_start, at.kv_start)
        s = s.reshape(tile) + orient(block).astype(jnp.float32)
    mod_vjp = None
    if t.score_mod is not None:
        fn, consts = t.score_mod[cols], (mods.score_cols if cols else mods.score_rows)
        s, mod_vjp = jax.vjp(lambda s, *c: fn(s, q_idx, kv_idx, *c), s.reshape(tile), *consts)
        s = s.astype(jnp.float32)
    visible = None
    if masked:
        visible = t.visibility.visible(q_idx, kv_idx, at.limits)
        if t.mask_mod is not None:
            consts = mods.mask_cols if cols else mods.mask_rows
            visible = visible & t.mask_mod[cols](q_idx, kv_idx, *consts)
        visible = spread(visible)
        if mask is not None:
            visible = visible & orient(broadcast_block(mask, t, at.b, at.q_start, at.kv_start))
        s = jnp.where(visible, s.reshape(tile), -jnp.inf)
    return s.reshape(flat), visible, mod_vjp


def masked_or_not(t: Tiling, step: Callable, full: ArrayLike, carry: Any):
    """Run `step(carry, masked)` with the mask only where the block needs it: never when no
    mask can hide anything, always when a dense mask or a `mask_mod` applies, and otherwise
    where the block plan says the block is not `full`."""
    if t.masking != "edges":
        return step(carry, masked=t.masking == "always")
    branches = [functools.partial(step, masked=True), functools.partial(step, masked=False)]
    return lax.cond(full, branches[1], branches[0], carry)


def bias_block_grad(t: Tiling, ds_t: ArrayLike, bias_shape: tuple[int, ...]) -> Array:
    """A block's `dsᵀ [K, bk, G·bq]` as its `[N|1, bq|1, bk|1]` share of the gradient of a
    `[B|1, N|1, T|1, S|1]` bias: summed over the axes along which the bias broadcasts."""
    _, nn, nt, ns = bias_shape
    ds = ds_t.reshape(t.K, t.bk, t.G, t.bq).transpose(0, 2, 3, 1)
    ds = ds.reshape(t.N, t.bq, t.bk)
    axes = tuple(a for a, size in enumerate((nn, nt, ns)) if size == 1)
    return ds.sum(axis=axes, keepdims=True) if axes else ds


def add_bias_block(dbias: ArrayLike, block: ArrayLike, at: At) -> Array:
    """`dbias[b, :, q_start:, kv_start:] += block` (offsets only along the axes dbias has)."""
    nb, _, nt, ns = dbias.shape
    starts = (at.b if nb > 1 else 0, 0, at.q_start if nt > 1 else 0, at.kv_start if ns > 1 else 0)
    current = lax.dynamic_slice(dbias, starts, (1,) + block.shape)
    return lax.dynamic_update_slice(dbias, current + block[None], starts)


# ----------------------------------------------------------------------------- registry
