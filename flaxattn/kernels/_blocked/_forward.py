"""The blocked forward: online softmax over the key blocks the block plan lists."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import Array, lax
from jaxtyping import ArrayLike

from flaxattn.kernels._blocked._setup import Mods, Tiling
from flaxattn.kernels._blocked._tiles import (
    At,
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


def _step(t: Tiling, qs, k, v, bias, mask, scale, mods: Mods, at: At, carry, masked: bool):
    """One key block of the online softmax: `carry = (m, total, acc)` updated."""
    m, total, acc = carry  # [K, M], [K, M], [K, M, Hv]
    kb = heads_major(rows(k, at.b, at.kv_start, t.bk), t.K, t.dtype)  # [K, bk, H]
    vb = heads_major(rows(v, at.b, at.kv_start, t.bk), t.K, t.dtype)  # [K, bk, Hv]
    s, _, _ = logits(t, qs, kb, scale, bias, mods, mask, at, masked)  # [K, M, bk]
    row_max = s.max(axis=-1)
    if t.scale_at == "softmax":
        row_max = row_max * scale
    m_new = jnp.maximum(m, row_max)
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all hidden so far: keep 0s
    p = jnp.exp(softmax_scores(t, s, scale) - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    total = alpha * total + p.sum(axis=-1)
    pv = jnp.einsum("kms,ksv->kmv", p.astype(t.dtype), vb, preferred_element_type=jnp.float32)
    return m_new, total, alpha[..., None] * acc + pv


def forward(
    t: Tiling, q, k, v, bias, mask, limits: Limits, scale: ArrayLike, mods: Mods, plan: BlockPlan
) -> tuple[Array, Array]:
    """`(out [B, T, N, Hv], lse [B, N, T] float32)` of the padded operands.

    A `lax.map` over the `B · nq` query blocks; each runs a `fori_loop` over exactly the key
    blocks its plan lists (`plan.kv_count` of them), with the mask only on those not full.
    """
    K, bq, M = t.K, t.bq, t.M
    shared = plan.kv_count.shape[0] == 1

    def one_query_block(index):
        b, i = index // t.nq, index % t.nq
        p = 0 if shared else b
        lim = example_limits(limits, b)
        q_start = i * bq
        qs = query_block(t, rows(q, b, q_start, bq), scale)  # [K, M, H]

        def body(n, carry):
            at = At(b, q_start, plan.kv_index[p, i, n] * t.bk, lim)
            step = functools.partial(_step, t, qs, k, v, bias, mask, scale, mods, at)
            return masked_or_not(t, step, plan.kv_full[p, i, n], carry)

        init = (
            jnp.full((K, M), -jnp.inf, jnp.float32),
            jnp.zeros((K, M), jnp.float32),
            jnp.zeros((K, M, t.Hv), jnp.float32),
        )
        m, total, acc = lax.fori_loop(0, plan.kv_count[p, i], body, init)
        empty = total == 0.0
        total = jnp.where(empty, 1.0, total)
        out = acc / total[..., None]  # [K, M, Hv]
        lse = jnp.where(empty, -jnp.inf, m + jnp.log(total))  # [K, M]
        return rows_major(out, bq).astype(q.dtype), lse

    out, lse = lax.map(one_query_block, jnp.arange(t.B * t.nq))
    # out [B·nq, bq, N, Hv]; lse [B·nq, K, G·bq] = [B·nq, N, bq]
    out = out.reshape(t.B, t.T, t.N, t.Hv)
    lse = lse.reshape(t.B, t.nq, t.N, bq).transpose(0, 2, 1, 3)
    return out, lse.reshape(t.B, t.N, t.T)
