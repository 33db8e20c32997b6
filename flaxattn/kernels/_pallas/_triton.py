"""The GPU kernels, written with the Pallas Triton lowering's conventions.

One program per `(query block, batch, head)` for the forward and dq kernels and per
`(key block, batch, kv head)` for dk/dv. Each program walks its key (or query) blocks with
`fori_loop`s over three ranges: the masked blocks before the fully visible ones, the fully
visible ones (no mask is computed), and the masked ones after; blocks outside the visible
range are never touched (causal, window and length block skipping). K and V are indexed by
`n // G`, so GQA never repeats them; dk/dv loop over the `G` query heads of their kv head.

Layout is `[B, T, N, H]` throughout; sequences arrive padded to the block sizes and head dims
to a power of two (>= 16, the smallest `tl.dot`), as the Triton lowering needs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from flaxattn.kernels._pallas._config import KernelConfig
from flaxattn.kernels._pallas._tiles import (
    MASK_VALUE,
    TileMath,
    dkv_step,
    dq_step,
    forward_finish,
    forward_step,
    key_blocks,
    query_blocks,
    tile_indices,
)
from flaxattn.kernels._visibility import Limits


def _limits(q_len_ref, kv_len_ref, offset_ref) -> Limits:
    return Limits(q_len_ref[...], kv_len_ref[...], offset_ref[...])


def _three_ranges(ranges, make_body, carry):
    """Run `make_body(masked)` over `[lo, full_lo)`, `[full_lo, full_hi)`, `[full_hi, hi)`."""
    lo, hi, full_lo, full_hi = ranges
    carry = lax.fori_loop(lo, full_lo, make_body(True), carry)
    carry = lax.fori_loop(full_lo, full_hi, make_body(False), carry)
    return lax.fori_loop(full_hi, hi, make_body(True), carry)


def _forward_kernel(
    q_len_ref, kv_len_ref, offset_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
    math: TileMath, bq: int, bk: int,
):
    limits = _limits(q_len_ref, kv_len_ref, offset_ref)
    q_start = pl.program_id(0) * bq
    q = q_ref[...]  # [bq, H]

    def make_body(masked):
        def body(j, carry):
            k_start = pl.multiple_of(j * bk, bk)
            k = k_ref[pl.ds(k_start, bk), :]  # [bk, H]
            v = v_ref[pl.ds(k_start, bk), :]  # [bk, Hv]
            q_idx, k_idx = tile_indices((bq, bk), 0, q_start, k_start)
            return forward_step(math, q, k, v, carry, q_idx, k_idx, limits, masked=masked)

        return body

    carry = (
        jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
        jnp.full((bq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
    )
    carry = _three_ranges(key_blocks(math, q_start, bq, bk, limits), make_body, carry)
    out, lse = forward_finish(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse.reshape(bq)


def _dq_kernel(
    q_len_ref, kv_len_ref, offset_ref, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref,
    dq_ref, *, math: TileMath, bq: int, bk: int,
):
    limits = _limits(q_len_ref, kv_len_ref, offset_ref)
    q_start = pl.program_id(0) * bq
    q, do = q_ref[...], do_ref[...]  # [bq, H], [bq, Hv]
    lse2, delta = lse2_ref[...][:, None], delta_ref[...][:, None]  # [bq, 1]

    def make_body(masked):
        def body(j, dq):
            k_start = pl.multiple_of(j * bk, bk)
            k = k_ref[pl.ds(k_start, bk), :]
            v = v_ref[pl.ds(k_start, bk), :]
            q_idx, k_idx = tile_indices((bq, bk), 0, q_start, k_start)
            return dq_step(
                math, q, k, v, do, lse2, delta, dq, q_idx, k_idx, limits, masked=masked
            )

        return body

    dq = jnp.zeros(q_ref.shape, jnp.float32)
    dq = _three_ranges(key_blocks(math, q_start, bq, bk, limits), make_body, dq)
    dq_ref[...] = (dq * math.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_len_ref, kv_len_ref, offset_ref, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref,
    dk_ref, dv_ref, *, math: TileMath, bq: int, bk: int, groups: int,
):
    limits = _limits(q_len_ref, kv_len_ref, offset_ref)
    k_start = pl.program_id(0) * bk
    k, v = k_ref[...], v_ref[...]  # [bk, H], [bk, Hv]
    ranges = query_blocks(math, k_start, bk, bq, limits)

    def one_head(g, carry):  # the G query heads that share this kv head
        def make_body(masked):
            def body(i, carry):
                q_start = pl.multiple_of(i * bq, bq)
                rows = pl.ds(q_start, bq)
                q = q_ref[rows, g, :]  # [bq, H]
                do = do_ref[rows, g, :]  # [bq, Hv]
                lse2 = lse2_ref[g, rows][None, :]  # [1, bq]
                delta = delta_ref[g, rows][None, :]
                q_idx, k_idx = tile_indices((bk, bq), 1, q_start, k_start)
                return dkv_step(
                    math, q, k, v, do, lse2, delta, carry, q_idx, k_idx, limits, masked=masked
                )

            return body

        return _three_ranges(ranges, make_body, carry)

    zeros = (jnp.zeros(k_ref.shape, jnp.float32), jnp.zeros(v_ref.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, groups, one_head, zeros)
    dk_ref[...] = (dk * math.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _per_example():
    return pl.BlockSpec((None,), lambda i, b, h: (b,))


def _params(cfg: KernelConfig, which: int) -> plt.CompilerParams:
    return plt.CompilerParams(num_warps=cfg.num_warps[which], num_stages=cfg.num_stages[which])


def forward(q, k, v, limits: Limits, cfg: KernelConfig):
    """`q [B, Tp, N, H]`, `k [B, Sp, K, H]`, `v [B, Sp, K, Hv]` -> `(out, lse [B, N, Tp])`."""
    B, T, N, H = q.shape
    S, Hv, G = k.shape[1], v.shape[-1], cfg.groups
    bq, bk = cfg.blocks.fwd
    kv_spec = lambda d: pl.BlockSpec((None, S, None, d), lambda i, b, n: (b, 0, lax.div(n, G), 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, math=cfg.math, bq=bq, bk=bk),
        grid=(T // bq, B, N),
        in_specs=[_per_example()] * 3 + [
            pl.BlockSpec((None, bq, None, H), lambda i, b, n: (b, i, n, 0)),
            kv_spec(H),
            kv_spec(Hv),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, Hv), lambda i, b, n: (b, i, n, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, T, N, Hv), q.dtype),
            jax.ShapeDtypeStruct((B, N, T), jnp.float32),
        ],
        compiler_params=_params(cfg, 0),
        interpret=cfg.interpret,
        name="flaxattn_flash_forward",
    )(*limits, q, k, v)


def backward(q, k, v, do, lse2, delta, limits: Limits, cfg: KernelConfig):
    """Gradients `(dq, dk, dv)` from the residuals; `lse2` and `delta` are `[B, N, Tp]` f32."""
    B, T, N, H = q.shape
    S, K, Hv, G = k.shape[1], k.shape[2], v.shape[-1], cfg.groups

    bq, bk = cfg.blocks.dq
    kv_spec = lambda d: pl.BlockSpec((None, S, None, d), lambda i, b, n: (b, 0, lax.div(n, G), 0))
    q_spec = lambda d: pl.BlockSpec((None, bq, None, d), lambda i, b, n: (b, i, n, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, math=cfg.math, bq=bq, bk=bk),
        grid=(T // bq, B, N),
        in_specs=[_per_example()] * 3
        + [q_spec(H), kv_spec(H), kv_spec(Hv), q_spec(Hv), row_spec, row_spec],
        out_specs=q_spec(H),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(cfg, 1),
        interpret=cfg.interpret,
        name="flaxattn_flash_dq",
    )(*limits, q, k, v, do, lse2, delta)

    bq, bk = cfg.blocks.dkv
    # Group the query heads by kv head, [B, T, K, G, ·]: a free reshape, no copy.
    grouped = lambda x: x.reshape(B, T, K, G, x.shape[-1])
    group_spec = lambda d: pl.BlockSpec((None, T, None, G, d), lambda j, b, h: (b, 0, h, 0, 0))
    kv_block = lambda d: pl.BlockSpec((None, bk, None, d), lambda j, b, h: (b, j, h, 0))
    group_rows = pl.BlockSpec((None, None, G, T), lambda j, b, h: (b, h, 0, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, math=cfg.math, bq=bq, bk=bk, groups=G),
        grid=(S // bk, B, K),
        in_specs=[_per_example()] * 3
        + [group_spec(H), kv_block(H), kv_block(Hv), group_spec(Hv), group_rows, group_rows],
        out_specs=[kv_block(H), kv_block(Hv)],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        compiler_params=_params(cfg, 2),
        interpret=cfg.interpret,
        name="flaxattn_flash_dkv",
    )(*limits, grouped(q), k, v, grouped(do), lse2.reshape(B, K, G, T),
      delta.reshape(B, K, G, T))
    return dq, dk, dv
