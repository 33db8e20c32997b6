"""Tile math shared by every Pallas kernel: masks, the online-softmax step, the backward steps.

Everything here runs *inside* a kernel on 2-D tiles, with operations that the Triton and
Mosaic TPU lowerings both support (2-D iotas, `dot_general` with a float32 accumulator,
`exp2`, row reductions). Logits are carried in base 2 (`s · log2 e`), as in FlashAttention-2,
so the exponentials are `exp2`.

Tiles come in two orientations: `[bq, bk]` (forward, dq) and `[bk, bq]` (dk/dv, so that both
of its matmuls are plain `A @ B`). Masks and modifiers are elementwise on broadcast index
arrays, so they do not care which.

Which blocks a kernel visits, and which of them need no mask, comes from the block plan
(`flaxattn.kernels._plan`), computed outside the kernels and passed in as index arrays.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jaxtyping import ArrayLike

from flaxattn.kernels._single_head import MaskMod, ScoreMod
from flaxattn.kernels._visibility import Limits, Visibility

# A finite "minus infinity": exp2 of it is 0 and differences of two of them are 0, not NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class TileMath:
    """The static description of one attention problem, as each tile sees it.

    Attributes:
      visibility: causal / window structure (its length arrays are dropped: per-example limits
        reach the kernel as scalars).
      scale: logit multiplier.
      score_mod: `(score, q_idx, kv_idx) -> score`, or None.
      mask_mod: `(q_idx, kv_idx) -> bool`, or None (the plan then marks no block full).
      precision: `dot_general` precision (HIGHEST for float32 inputs: no TF32 / bf16 passes).
    """

    visibility: Visibility
    scale: float
    score_mod: ScoreMod | None = None
    mask_mod: MaskMod | None = None
    precision: lax.Precision | None = None


def dot(a: ArrayLike, b: ArrayLike, *, trans_b: bool = False, precision=None) -> Array:
    """`a @ b` (or `a @ bᵀ`) of 2-D tiles with a float32 accumulator."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def tile_indices(
    shape: tuple[int, int], q_axis: int, q_start: ArrayLike, k_start: ArrayLike
) -> tuple[Array, Array]:
    """Absolute query and key indices of a tile, each of the full 2-D `shape` (int32)."""
    q_idx = lax.broadcasted_iota(jnp.int32, shape, q_axis) + q_start
    k_idx = lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis) + k_start
    return q_idx, k_idx


def visible(math_: TileMath, q_idx: ArrayLike, k_idx: ArrayLike, limits: Limits) -> Array:
    """Boolean visibility of a tile: lengths, causal, window, then `mask_mod`."""
    ok = math_.visibility.visible(q_idx, k_idx, limits)
    if math_.mask_mod is not None:
        ok = ok & math_.mask_mod(q_idx, k_idx)
    return ok


def logits2(math_: TileMath, qk: ArrayLike, q_idx: ArrayLike, k_idx: ArrayLike) -> Array:
    """Base-2 logits `score_mod(scale · qk) · log2 e` of a tile of raw dot products."""
    if math_.score_mod is None:
        return qk * (math_.scale * LOG2E)
    return math_.score_mod(qk * math_.scale, q_idx, k_idx).astype(jnp.float32) * LOG2E


def _through_score_mod(
    math_: TileMath, ds: ArrayLike, qk: ArrayLike, q_idx: ArrayLike, k_idx: ArrayLike
):
    """Map `dL/d(modded score)` to `dL/d(scale · qk)` (the identity without `score_mod`)."""
    if math_.score_mod is None:
        return ds
    # Elementwise, so the vjp is the derivative times ds; traced into the kernel.
    _, pullback = jax.vjp(lambda s: math_.score_mod(s, q_idx, k_idx), qk * math_.scale)
    return pullback(ds)[0]


def forward_step(
    math_: TileMath, q, k, v, carry, q_idx, k_idx, limits: Limits, *, masked: bool
):
    """One online-softmax step over a key tile (orientation `[bq, bk]`).

    Args:
      q: `[bq, H]`; k: `[bk, H]`; v: `[bk, Hv]` (input dtype).
      carry: `(acc [bq, Hv] f32, running base-2 max [bq, 1], running row sum [bq, 1])`.
      masked: apply the visibility mask (False for tiles known to be fully visible).
    """
    acc, m, row_sum = carry
    s = logits2(math_, dot(q, k, trans_b=True, precision=math_.precision), q_idx, k_idx)
    if masked:
        ok = visible(math_, q_idx, k_idx, limits)
        s = jnp.where(ok, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp2(s - m_new)
    if masked:
        p = jnp.where(ok, p, 0.0)  # a fully-masked row keeps a zero sum: output 0, no average
    alpha = jnp.exp2(m - m_new)
    row_sum = alpha * row_sum + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + dot(p.astype(v.dtype), v, precision=math_.precision)
    return acc, m_new, row_sum


def forward_finish(acc: ArrayLike, m: ArrayLike, row_sum: ArrayLike) -> tuple[Array, Array]:
    """`(output [bq, Hv] f32, lse [bq, 1] natural log)`; an empty row gives 0 and -inf."""
    has = row_sum > 0.0
    safe_sum = jnp.where(has, row_sum, 1.0)
    out = jnp.where(has, acc / safe_sum, 0.0)
    lse = jnp.where(has, (m + jnp.log2(safe_sum)) * LN2, -jnp.inf)
    return out, lse


def dq_step(
    math_: TileMath, q, k, v, do, lse2, delta, dq, q_idx, k_idx, limits, *, masked: bool
):
    """Accumulate `dq [bq, H]` (unscaled: multiply by `scale` at the end) over a key tile.

    `lse2` `[bq, 1]` is the logsumexp in base 2 (+inf for empty rows), `delta` `[bq, 1]` is
    `rowsum(out · dout) - dlse`.
    """
    qk = dot(q, k, trans_b=True, precision=math_.precision)  # [bq, bk]
    p = jnp.exp2(logits2(math_, qk, q_idx, k_idx) - lse2)
    if masked:
        ok = visible(math_, q_idx, k_idx, limits)
        p = jnp.where(ok, p, 0.0)
    dp = dot(do, v, trans_b=True, precision=math_.precision)  # [bq, bk]
    ds = _through_score_mod(math_, p * (dp - delta), qk, q_idx, k_idx)
    if masked and math_.score_mod is not None:
        ds = jnp.where(ok, ds, 0.0)
    return dq + dot(ds.astype(k.dtype), k, precision=math_.precision)


def dkv_step(
    math_: TileMath, q, k, v, do, lse2, delta, carry, q_idx, k_idx, limits, *, masked: bool
):
    """Accumulate `(dk [bk, H] unscaled, dv [bk, Hv])` over a query tile, orientation `[bk, bq]`.

    `lse2` and `delta` are rows `[1, bq]`.
    """
    dk, dv = carry
    qk_t = dot(k, q, trans_b=True, precision=math_.precision)  # [bk, bq]
    p_t = jnp.exp2(logits2(math_, qk_t, q_idx, k_idx) - lse2)
    if masked:
        ok = visible(math_, q_idx, k_idx, limits)
        p_t = jnp.where(ok, p_t, 0.0)
    dv = dv + dot(p_t.astype(do.dtype), do, precision=math_.precision)  # [bk, Hv]
    dp_t = dot(v, do, trans_b=True, precision=math_.precision)  # [bk, bq]
    ds_t = _through_score_mod(math_, p_t * (dp_t - delta), qk_t, q_idx, k_idx)
    if masked and math_.score_mod is not None:
        ds_t = jnp.where(ok, ds_t, 0.0)
    dk = dk + dot(ds_t.astype(q.dtype), q, precision=math_.precision)  # [bk, H]
    return dk, dv
