"""The TPU kernels, written for the Pallas Mosaic TPU lowering.

Mosaic has no per-program loops over HBM refs as the Triton kernels use; instead the grid's last
axis walks the block plan's list (`flaxattn.kernels._plan`) of key blocks (forward, dq) or of
`(query head of the group, query block)` pairs (dk/dv) sequentially ("arbitrary"), with float32
accumulators in VMEM scratch. The plan's counts, indices and full flags and the per-example
lengths are scalar-prefetched: the index maps fetch the listed block, and past the count the
list repeats its last block, so the pipeline sees the same block index and issues no copy, while
`pl.when` skips the compute (as splash attention does). The layout inside is `[B, N, T, H]` (the
wrapper transposes), whose last two block dims, `(block, H)`, are what Mosaic's (8, 128) tiling
wants; the running max and sum are lane-replicated `[bq, 128]`, as in jax's own TPU kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

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

LANES = 128


def _limits(b, q_len_ref, kv_len_ref, offset_ref) -> Limits:
    return Limits(q_len_ref[b], kv_len_ref[b], offset_ref[b])


def _row(b, shared: bool):
    """The plan's batch index of example `b`."""
    return 0 if shared else b


def _when_listed(n, count_ref, full_ref, at, run):
    """Call `run(masked)` at list position `n` if it holds a block (`n < count`), unmasked
    where the plan marks the block full. `at` indexes the plan's row."""
    listed = n < count_ref[at]
    full = full_ref[(*at, n)] != 0
    pl.when(listed & full)(lambda: run(False))
    pl.when(listed & jnp.logical_not(full))(lambda: run(True))


def _forward_kernel(
    q_len_ref, kv_len_ref, offset_ref, count_ref, index_ref, full_ref, q_ref, k_ref, v_ref,
    o_ref, lse_ref, m_ref, l_ref, acc_ref, *, math: TileMath, bq: int, bk: int, shared: bool,
):
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    limits = _limits(b, q_len_ref, kv_len_ref, offset_ref)
    at = (_row(b, shared), i)
    j = index_ref[(*at, t)]

    @pl.when(t == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def run(masked):
        q_idx, k_idx = tile_indices((bq, bk), 0, i * bq, j * bk)
        carry = (acc_ref[...], m_ref[...][:, :1], l_ref[...][:, :1])
        acc, row_max, row_sum = forward_step(
            math, q_ref[...], k_ref[...], v_ref[...], carry, q_idx, k_idx, limits, masked=masked
        )
        acc_ref[...] = acc
        m_ref[...] = jnp.broadcast_to(row_max, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(row_sum, l_ref.shape)

    _when_listed(t, count_ref, full_ref, at, run)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        out, lse = forward_finish(acc_ref[...], m_ref[...][:, :1], l_ref[...][:, :1])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _dq_kernel(
    q_len_ref, kv_len_ref, offset_ref, count_ref, index_ref, full_ref, q_ref, k_ref, v_ref,
    do_ref, lse2_ref, delta_ref, dq_ref, dq_acc_ref, *, math: TileMath, bq: int, bk: int,
    shared: bool,
):
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    limits = _limits(b, q_len_ref, kv_len_ref, offset_ref)
    at = (_row(b, shared), i)
    j = index_ref[(*at, t)]

    @pl.when(t == 0)
    def _init():
        dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

    def run(masked):
        q_idx, k_idx = tile_indices((bq, bk), 0, i * bq, j * bk)
        lse2 = jnp.expand_dims(lse2_ref[0], -1)  # [bq, 1]
        delta = jnp.expand_dims(delta_ref[0], -1)
        dq_acc_ref[...] = dq_step(
            math, q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse2, delta,
            dq_acc_ref[...], q_idx, k_idx, limits, masked=masked,
        )

    _when_listed(t, count_ref, full_ref, at, run)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_acc_ref[...] * math.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_len_ref, kv_len_ref, offset_ref, count_ref, index_ref, full_ref, q_ref, k_ref, v_ref,
    do_ref, lse2_ref, delta_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref, *, math: TileMath,
    bq: int, bk: int, nq: int, shared: bool,
):
    b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    n = lax.rem(t, nq)  # list position; t // nq is the query head within the group
    limits = _limits(b, q_len_ref, kv_len_ref, offset_ref)
    at = (_row(b, shared), j)
    i = index_ref[(*at, n)]

    @pl.when(t == 0)
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    def run(masked):
        q_idx, k_idx = tile_indices((bk, bq), 1, i * bq, j * bk)
        dk, dv = dkv_step(
            math, q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse2_ref[...],
            delta_ref[...], (dk_acc_ref[...], dv_acc_ref[...]), q_idx, k_idx, limits,
            masked=masked,
        )
        dk_acc_ref[...] = dk
        dv_acc_ref[...] = dv

    _when_listed(n, count_ref, full_ref, at, run)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * math.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _kv_index_map(cfg: KernelConfig, shared: bool):
    """Index map of a K or V block for grid `(b, n, i, t)`: kv head `n // G`, the `t`-th key
    block the plan lists for query block `i` (past the count, the last one again)."""

    def index(b, n, i, t, q_len, kv_len, offset, count, kv_index, full):
        return b, lax.div(n, cfg.groups), kv_index[_row(b, shared), i, t], 0

    return index


def _prefetch(limits: Limits, count, index, full) -> tuple:
    """The scalar-prefetched arrays: lengths, then the plan's count, indices and full flags."""
    return (*limits, count, index, full.astype(jnp.int32))


def _interpret(cfg: KernelConfig):
    # True: Pallas's generic interpreter; a `pltpu.InterpretParams` simulates the TPU more
    # faithfully (DMAs, VMEM, parallel grid order) and more slowly.
    return cfg.interpret


def _params(semantics) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=semantics)


_SEQUENTIAL_LAST = ("parallel", "parallel", "parallel", "arbitrary")


def forward(q, k, v, limits: Limits, plan: BlockPlan, cfg: KernelConfig):
    """`q [B, Tp, N, H]`, `k [B, Sp, K, H]`, `v [B, Sp, K, Hv]` -> `(out, lse [B, N, Tp])`;
    `plan` has the forward's blocks."""
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, heads, length, H]
    B, N, T, H = q.shape
    S, Hv = k.shape[2], v.shape[-1]
    bq, bk = cfg.blocks.fwd
    nk = S // bk
    shared = plan.kv_count.shape[0] == 1
    kv_index = _kv_index_map(cfg, shared)
    q_index = lambda b, n, i, j, *refs: (b, n, i, 0)
    prefetch = _prefetch(limits, plan.kv_count, plan.kv_index, plan.kv_full)
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, math=cfg.math, bq=bq, bk=bk, shared=shared),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(B, N, T // bq, nk),
            in_specs=[
                pl.BlockSpec((None, None, bq, H), q_index),
                pl.BlockSpec((None, None, bk, H), kv_index),
                pl.BlockSpec((None, None, bk, Hv), kv_index),
            ],
            out_specs=[
                pl.BlockSpec((None, None, bq, Hv), q_index),
                pl.BlockSpec((None, None, bq, LANES), q_index),
            ],
            scratch_shapes=[
                pltpu.VMEM((bq, LANES), jnp.float32),  # running max (base 2)
                pltpu.VMEM((bq, LANES), jnp.float32),  # running sum
                pltpu.VMEM((bq, Hv), jnp.float32),  # output accumulator
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((B, N, T, Hv), q.dtype),
            jax.ShapeDtypeStruct((B, N, T, LANES), jnp.float32),
        ],
        compiler_params=_params(_SEQUENTIAL_LAST),
        interpret=_interpret(cfg),
        name="flaxattn_flash_forward_tpu",
    )(*prefetch, q, k, v)
    return jnp.swapaxes(out, 1, 2), lse[..., 0]


def backward(q, k, v, do, lse2, delta, limits: Limits, plans, cfg: KernelConfig):
    """Gradients `(dq, dk, dv)`; `lse2` and `delta` are `[B, N, Tp]` f32; `plans` has the dq
    kernel's and the dk/dv kernel's block plans."""
    q, k, v, do = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, do))  # [B, heads, length, ·]
    B, N, T, H = q.shape
    K, S, Hv, G = k.shape[1], k.shape[2], v.shape[-1], cfg.groups
    lse2, delta = lse2[:, :, None, :], delta[:, :, None, :]  # [B, N, 1, T]: rows on lanes
    dq_plan, dkv_plan = plans

    bq, bk = cfg.blocks.dq
    nk = S // bk
    shared = dq_plan.kv_count.shape[0] == 1
    kv_index = _kv_index_map(cfg, shared)
    q_index = lambda b, n, i, j, *refs: (b, n, i, 0)
    row_index = lambda b, n, i, j, *refs: (b, n, 0, i)
    prefetch = _prefetch(limits, dq_plan.kv_count, dq_plan.kv_index, dq_plan.kv_full)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, math=cfg.math, bq=bq, bk=bk, shared=shared),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(B, N, T // bq, nk),
            in_specs=[
                pl.BlockSpec((None, None, bq, H), q_index),
                pl.BlockSpec((None, None, bk, H), kv_index),
                pl.BlockSpec((None, None, bk, Hv), kv_index),
                pl.BlockSpec((None, None, bq, Hv), q_index),
                pl.BlockSpec((None, None, 1, bq), row_index),
                pl.BlockSpec((None, None, 1, bq), row_index),
            ],
            out_specs=pl.BlockSpec((None, None, bq, H), q_index),
            scratch_shapes=[pltpu.VMEM((bq, H), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(_SEQUENTIAL_LAST),
        interpret=_interpret(cfg),
        name="flaxattn_flash_dq_tpu",
    )(*prefetch, q, k, v, do, lse2, delta)

    bq, bk = cfg.blocks.dkv
    nq = T // bq
    shared = dkv_plan.q_count.shape[0] == 1
    prefetch = _prefetch(limits, dkv_plan.q_count, dkv_plan.q_index, dkv_plan.q_full)

    def q_block(b, h, j, t, refs):
        q_index = refs[4]  # the plan's lists: [P, nk, nq]
        return h * G + lax.div(t, nq), q_index[_row(b, shared), j, lax.rem(t, nq)]

    def q_index(b, h, j, t, *refs):
        n, i = q_block(b, h, j, t, refs)
        return b, n, i, 0

    def row_index(b, h, j, t, *refs):
        n, i = q_block(b, h, j, t, refs)
        return b, n, 0, i

    kv_index = lambda b, h, j, t, *refs: (b, h, j, 0)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, math=cfg.math, bq=bq, bk=bk, nq=nq, shared=shared),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(B, K, S // bk, G * nq),
            in_specs=[
                pl.BlockSpec((None, None, bq, H), q_index),
                pl.BlockSpec((None, None, bk, H), kv_index),
                pl.BlockSpec((None, None, bk, Hv), kv_index),
                pl.BlockSpec((None, None, bq, Hv), q_index),
                pl.BlockSpec((None, None, 1, bq), row_index),
                pl.BlockSpec((None, None, 1, bq), row_index),
            ],
            out_specs=[
                pl.BlockSpec((None, None, bk, H), kv_index),
                pl.BlockSpec((None, None, bk, Hv), kv_index),
            ],
            scratch_shapes=[
                pltpu.VMEM((bk, H), jnp.float32),
                pltpu.VMEM((bk, Hv), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        compiler_params=_params(_SEQUENTIAL_LAST),
        interpret=_interpret(cfg),
        name="flaxattn_flash_dkv_tpu",
    )(*prefetch, q, k, v, do, lse2, delta)
    return tuple(jnp.swapaxes(x, 1, 2) for x in (dq, dk, dv))
