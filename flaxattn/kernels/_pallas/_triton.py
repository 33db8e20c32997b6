"""The GPU kernels, written with the Pallas Triton lowering's conventions.

One program per `(query block, batch, head)` for the forward and dq kernels and per
`(key block, batch, kv head)` for dk/dv. Each program walks the key (or query) blocks that the
block plan lists for it (`flaxattn.kernels._plan`: the plan's count, indices and full flags
arrive as index arrays), with a `fori_loop` that applies the mask only to blocks not marked
full; blocks outside the list are never loaded (causal, window and length block skipping).
K and V are indexed by `n // G`, so GQA never repeats them; dk/dv loop over the `G` query
heads of their kv head.

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
    tile_indices,
)
from flaxattn.kernels._plan import BlockPlan
from flaxattn.kernels._visibility import Limits


def _limits(q_len_ref, kv_len_ref, offset_ref) -> Limits:
    return Limits(q_len_ref[...], kv_len_ref[...], offset_ref[...])


def _listed_blocks(count_ref, index_ref, full_ref, step, carry):
    """Run `step(block, masked, carry)` for each block the plan lists: `count_ref` of them,
    `index_ref[n]` each, masked unless `full_ref[n]` says the block is fully visible."""

    def body(n, carry):
        block = index_ref[n]
        return lax.cond(
            full_ref[n] != 0,
            lambda c: step(block, False, c),
            lambda c: step(block, True, c),
            carry,
        )

    return lax.fori_loop(0, count_ref[...], body, carry)


def _forward_kernel(
    q_len_ref, kv_len_ref, offset_ref, count_ref, index_ref, full_ref, q_ref, k_ref, v_ref,
    o_ref, lse_ref, *, math: TileMath, bq: int, bk: int,
):
    limits = _limits(q_len_ref, kv_len_ref, offset_ref)
    q_start = pl.program_id(0) * bq
    q = q_ref[...]  # [bq, H]

    def step(j, masked, carry):
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]  # [bk, H]
        v = v_ref[pl.ds(k_start, bk), :]  # [bk, Hv]
        q_idx, k_idx = tile_indices((bq, bk), 0, q_start, k_start)
        return forward_step(math, q, k, v, carry, q_idx, k_idx, limits, masked=masked)

    carry = (
        jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
        jnp.full((bq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
    )
    carry = _listed_blocks(count_ref, index_ref, full_ref, step, carry)
    out, lse = forward_finish(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse.reshape(bq)


def _dq_kernel(
    q_len_ref, kv_len_ref, offset_ref, count_ref, index_ref, full_ref, q_ref, k_ref, v_ref,
    do_ref, lse2_ref, delta_ref, dq_ref, *, math: TileMath, bq: int, bk: int,
):
    limits = _limits(q_len_ref, kv_len_ref, offset_ref)
    q_start = pl.program_id(0) * bq
    q, do = q_ref[...], do_ref[...]  # [bq, H], [bq, Hv]
    lse2, delta = lse2_ref[...][:, None], delta_ref[...][:, None]  # [bq, 1]

    def step(j, masked, dq):
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        q_idx, k_idx = tile_indices((bq, bk), 0, q_start, k_start)
        return dq_step(math, q, k, v, do, lse2, delta, dq, q_idx, k_idx, limits, masked=masked)

    dq = jnp.zeros(q_ref.shape, jnp.float32)
    dq = _listed_blocks(count_ref, index_ref, full_ref, step, dq)
    dq_ref[...] = (dq * math.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_len_ref, kv_len_ref, offset_ref, count_ref, index_ref, full_ref, q_ref, k_ref, v_ref,
    do_ref, lse2_ref, delta_ref, dk_ref, dv_ref, *, math: TileMath, bq: int, bk: int,
    groups: int,
):
    limits = _limits(q_len_ref, kv_len_ref, offset_ref)
    k_start = pl.program_id(0) * bk
    k, v = k_ref[...], v_ref[...]  # [bk, H], [bk, Hv]

    def one_head(g, carry):  # the G query heads that share this kv head
        def step(i, masked, carry):
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

        return _listed_blocks(count_ref, index_ref, full_ref, step, carry)

    zeros = (jnp.zeros(k_ref.shape, jnp.float32), jnp.zeros(v_ref.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, groups, one_head, zeros)
    dk_ref[...] = (dk * math.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _per_example():
    return pl.BlockSpec((None,), lambda i, b, h: (b,))


def _plan_specs(count: jax.Array, index: jax.Array, full: jax.Array):
    """The plan's `[P, n]` count and `[P, n, m]` lists as inputs of a grid `(n, B, heads)`:
    each program reads its row (the lists padded to a power of two, as Triton's blocks must
    be; the loop never reads past the count). Returns `(arrays, specs)`."""
    shared = count.shape[0] == 1
    row = lambda i, b: (0 if shared else b, i)
    width = max(1, 1 << (index.shape[-1] - 1).bit_length())
    pad = ((0, 0), (0, 0), (0, width - index.shape[-1]))
    arrays = (count, jnp.pad(index, pad), jnp.pad(full.astype(jnp.int32), pad))
    specs = [
        pl.BlockSpec((None, None), lambda i, b, h: row(i, b)),
        pl.BlockSpec((None, None, width), lambda i, b, h: (*row(i, b), 0)),
        pl.BlockSpec((None, None, width), lambda i, b, h: (*row(i, b), 0)),
    ]
    return arrays, specs


def _params(cfg: KernelConfig, which: int) -> plt.CompilerParams:
    return plt.CompilerParams(num_warps=cfg.num_warps[which], num_stages=cfg.num_stages[which])


def forward(q, k, v, limits: Limits, plan: BlockPlan, cfg: KernelConfig):
    """`q [B, Tp, N, H]`, `k [B, Sp, K, H]`, `v [B, Sp, K, Hv]` -> `(out, lse [B, N, Tp])`;
    `plan` has the forward's blocks."""
    B, T, N, H = q.shape
    S, Hv, G = k.shape[1], v.shape[-1], cfg.groups
    bq, bk = cfg.blocks.fwd
    lists, list_specs = _plan_specs(plan.kv_count, plan.kv_index, plan.kv_full)
    kv_spec = lambda d: pl.BlockSpec((None, S, None, d), lambda i, b, n: (b, 0, lax.div(n, G), 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, math=cfg.math, bq=bq, bk=bk),
        grid=(T // bq, B, N),
        in_specs=[_per_example()] * 3 + list_specs + [
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
    )(*limits, *lists, q, k, v)


def backward(q, k, v, do, lse2, delta, limits: Limits, plans, cfg: KernelConfig):
    """Gradients `(dq, dk, dv)` from the residuals; `lse2` and `delta` are `[B, N, Tp]` f32;
    `plans` has the dq kernel's and the dk/dv kernel's block plans."""
    B, T, N, H = q.shape
    S, K, Hv, G = k.shape[1], k.shape[2], v.shape[-1], cfg.groups
    dq_plan, dkv_plan = plans

    bq, bk = cfg.blocks.dq
    lists, list_specs = _plan_specs(dq_plan.kv_count, dq_plan.kv_index, dq_plan.kv_full)
    kv_spec = lambda d: pl.BlockSpec((None, S, None, d), lambda i, b, n: (b, 0, lax.div(n, G), 0))
    q_spec = lambda d: pl.BlockSpec((None, bq, None, d), lambda i, b, n: (b, i, n, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, math=cfg.math, bq=bq, bk=bk),
        grid=(T // bq, B, N),
        in_specs=[_per_example()] * 3 + list_specs
        + [q_spec(H), kv_spec(H), kv_spec(Hv), q_spec(Hv), row_spec, row_spec],
        out_specs=q_spec(H),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(cfg, 1),
        interpret=cfg.interpret,
        name="flaxattn_flash_dq",
    )(*limits, *lists, q, k, v, do, lse2, delta)

    bq, bk = cfg.blocks.dkv
    lists, list_specs = _plan_specs(dkv_plan.q_count, dkv_plan.q_index, dkv_plan.q_full)
    # Group the query heads by kv head, [B, T, K, G, ·]: a free reshape, no copy.
    grouped = lambda x: x.reshape(B, T, K, G, x.shape[-1])
    group_spec = lambda d: pl.BlockSpec((None, T, None, G, d), lambda j, b, h: (b, 0, h, 0, 0))
    kv_block = lambda d: pl.BlockSpec((None, bk, None, d), lambda j, b, h: (b, j, h, 0))
    group_rows = pl.BlockSpec((None, None, G, T), lambda j, b, h: (b, h, 0, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, math=cfg.math, bq=bq, bk=bk, groups=G),
        grid=(S // bk, B, K),
        in_specs=[_per_example()] * 3 + list_specs
        + [group_spec(H), kv_block(H), kv_block(Hv), group_spec(Hv), group_rows, group_rows],
        out_specs=[kv_block(H), kv_block(Hv)],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        compiler_params=_params(cfg, 2),
        interpret=cfg.interpret,
        name="flaxattn_flash_dkv",
    )(*limits, *lists, grouped(q), k, v, grouped(do), lse2.reshape(B, K, G, T),
      delta.reshape(B, K, G, T))
    return dq, dk, dv
