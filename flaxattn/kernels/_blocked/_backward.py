"""The blocked backward: gradients by recomputation, key block by key block.

On key-major tiles (`ᵀ`: `[K, bk, G·bq]`), for every query block the plan lists for a key block:

    pᵀ = exp(sᵀ - lse)   dV += pᵀ dO   dpᵀ = V dOᵀ   dsᵀ = pᵀ ⊙ (dpᵀ - rowsum(dO ⊙ O) + dlse)
    dK += dsᵀ q·scale    dQᵀ += scale · Kᵀ dsᵀ

Key blocks are outside and query blocks inside, so dK and dV accumulate in block-sized carries
and only dQ (and dbias) are updated in place. The cotangent of the logsumexp (`∂lse/∂s = p`)
is honoured, so that callers such as ring attention can merge partial results by their
logsumexp.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp
from jax import Array, lax
from jaxtyping import ArrayLike

from flaxattn.kernels._blocked._setup import Mods, Tiling
from flaxattn.kernels._blocked._tiles import (
    At,
    add_bias_block,
    add_rows,
    bias_block_grad,
    example_limits,
    heads_major,
    logits,
    masked_or_not,
    query_block,
    rows,
    rows_major,
    softmax_scores,
)
from flaxattn.kernels._plan import BlockPlan
from flaxattn.kernels._visibility import Limits


class _Inputs(NamedTuple):
    """What every block of the backward reads (padded, as the forward saw them)."""

    q: ArrayLike  # [B, T, N, H]
    k: ArrayLike  # [B, S, K, H]
    v: ArrayLike  # [B, S, K, Hv]
    bias: ArrayLike | None
    mask: ArrayLike | None
    limits: Limits
    scale: ArrayLike
    mods: Mods
    d_out: ArrayLike  # [B, T, N, Hv]
    lse: ArrayLike  # [B, K, G, T] float32, +inf for empty rows (so that exp(s - lse) is 0)
    delta: ArrayLike  # [B, K, G, T] float32: rowsum(dO ⊙ O) - dlse


def _row_terms(x: ArrayLike, b: ArrayLike, q_start: ArrayLike, t: Tiling) -> Array:
    """A `[B, K, G, T]` row term's `[K, 1, G·bq]` slice for query block `q_start`."""
    x = lax.dynamic_slice(x, (b, 0, 0, q_start), (1, t.K, t.G, t.bq))
    return x.reshape(t.K, 1, t.G * t.bq)


def _step(t: Tiling, x: _Inputs, kb, k_t, vb, at: At, carry, masked: bool):
    """One (query block, key block) pair: its shares of dK, dV, the score_mod arrays' gradient
    (carried), and of dQ and dbias (returned, to be added in place by the caller)."""
    dk, dv, dconsts = carry
    qs = query_block(t, rows(x.q, at.b, at.q_start, t.bq), x.scale)  # [K, M, H]
    do = heads_major(rows(x.d_out, at.b, at.q_start, t.bq), t.K, t.dtype)  # [K, M, Hv]
    s_t, visible, mod_vjp = logits(
        t, qs, kb, x.scale, x.bias, x.mods, x.mask, at, masked, cols=True
    )  # [K, bk, M]
    p_t = jnp.exp(softmax_scores(t, s_t, x.scale) - _row_terms(x.lse, at.b, at.q_start, t))
    dv = dv + jnp.einsum(
        "ksm,kmv->ksv", p_t.astype(t.dtype), do, preferred_element_type=jnp.float32
    )
    dp_t = jnp.einsum("ksv,kmv->ksm", vb, do, preferred_element_type=jnp.float32)
    ds_t = p_t * (dp_t - _row_terms(x.delta, at.b, at.q_start, t))
    if mod_vjp is not None:
        ds_t, *d_block_consts = mod_vjp(ds_t.reshape(t.K, t.bk, t.G, t.bq))
        dconsts = tuple(a + c for a, c in zip(dconsts, d_block_consts, strict=True))
        if visible is not None:  # hidden entries may hold anything, even NaN
            ds_t = jnp.where(visible, ds_t, 0.0)
        ds_t = ds_t.reshape(t.K, t.bk, t.G * t.bq)
    ds_p = ds_t.astype(t.dtype)
    dk = dk + jnp.einsum("ksm,kmh->ksh", ds_p, qs, preferred_element_type=jnp.float32)
    if k_t is None:
        dq_t = jnp.einsum("ksh,ksm->khm", kb, ds_p, preferred_element_type=jnp.float32)
    else:
        dq_t = jnp.einsum("khs,ksm->khm", k_t, ds_p, preferred_element_type=jnp.float32)
    dq_block = (dq_t * x.scale).reshape(t.K, t.H, t.G, t.bq).transpose(3, 0, 2, 1)
    dbias_block = None if x.bias is None else bias_block_grad(t, ds_t, x.bias.shape)
    return (dk, dv, dconsts), (dq_block.reshape(t.bq, t.N, t.H), dbias_block)


def _key_block(t: Tiling, x: _Inputs, plan: BlockPlan, carry, index):
    """All query blocks that see key block `index` (of `B · nk`): that key block's dK and dV,
    and its shares of dQ, dbias and the score_mod arrays' gradient added to `carry`."""
    b, j = index // t.nk, index % t.nk
    p = 0 if plan.q_count.shape[0] == 1 else b
    lim = example_limits(x.limits, b)
    kv_start = j * t.bk
    kb = heads_major(rows(x.k, b, kv_start, t.bk), t.K, t.dtype)  # [K, bk, H]
    vb = heads_major(rows(x.v, b, kv_start, t.bk), t.K, t.dtype)  # [K, bk, Hv]
    # A transposed copy of the key block, made once for all its query blocks, makes the 16-bit
    # dQ products about 1.3x faster at T=4096. With a single query block XLA:CPU folds the copy
    # into a dot layout it has no bf16 x bf16 -> f32 kernel for (UNIMPLEMENTED at run time),
    # so there the product reads kb itself.
    k_t = kb.transpose(0, 2, 1) if t.nq > 1 else None  # [K, H, bk]

    def body(n, carry):
        dk, dv, dq, dbias, dconsts = carry
        at = At(b, plan.q_index[p, j, n] * t.bq, kv_start, lim)
        step = functools.partial(_step, t, x, kb, k_t, vb, at)
        (dk, dv, dconsts), (dq_block, dbias_block) = masked_or_not(
            t, step, plan.q_full[p, j, n], (dk, dv, dconsts)
        )
        # dQ and dbias are whole-length arrays: they are updated here, outside the masked /
        # unmasked branches, because a buffer passed through a conditional is copied each step.
        dq = add_rows(dq, dq_block, b, at.q_start)
        if dbias is not None:
            dbias = add_bias_block(dbias, dbias_block, at)
        return dk, dv, dq, dbias, dconsts

    dq, dbias, dconsts = carry
    init = (
        jnp.zeros((t.K, t.bk, t.H), jnp.float32),
        jnp.zeros((t.K, t.bk, t.Hv), jnp.float32),
        dq,
        dbias,
        dconsts,
    )
    dk, dv, dq, dbias, dconsts = lax.fori_loop(0, plan.q_count[p, j], body, init)
    if t.scale_at != "query":  # the products used unscaled queries
        dk = dk * x.scale
    return (dq, dbias, dconsts), (rows_major(dk, t.bk), rows_major(dv, t.bk))  # [bk, K, ·]


def backward(
    t: Tiling, q, k, v, bias, mask, limits, scale, mods: Mods, out, lse, d_out, d_lse,
    plan: BlockPlan, *, dtype=None,
):
    """`(dq, dk, dv, dbias | None, d_score_mod_arrays)` of the padded operands.

    `t` and `plan` have the backward's blocks. With `dtype` the gradients come in that dtype
    (float32 for callers that sum several blocks' shares), else in their inputs' dtypes.
    """
    K, G = t.K, t.G
    delta = jnp.einsum(
        "btnv,btnv->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32)
    ) - d_lse.astype(jnp.float32)
    x = _Inputs(
        q, k, v, bias, mask, limits, scale, mods, d_out,
        lse=jnp.where(lse == -jnp.inf, jnp.inf, lse).reshape(t.B, K, G, t.T),
        delta=delta.reshape(t.B, K, G, t.T),
    )
    dq = jnp.zeros((t.B, t.T, t.N, t.H), jnp.float32)
    dbias = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
    dconsts = tuple(jnp.zeros(c.shape, jnp.float32) for c in mods.score_cols)
    (dq, dbias, dconsts), (dk, dv) = lax.scan(
        functools.partial(_key_block, t, x, plan), (dq, dbias, dconsts), jnp.arange(t.B * t.nk)
    )
    dk = dk.reshape(t.B, t.S, K, t.H)
    dv = dv.reshape(t.B, t.S, K, t.Hv)
    dconsts = tuple(d.astype(c.dtype) for d, c in zip(dconsts, mods.score_cols, strict=True))
    if dtype is not None:
        return dq.astype(dtype), dk.astype(dtype), dv.astype(dtype), dbias, dconsts
    dbias = None if dbias is None else dbias.astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, dconsts
