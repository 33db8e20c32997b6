"""The per-device ring loops (inside `shard_map`) and the custom-VJP core around them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from flaxattn.kernels._plan import EMPTY, classify
from flaxattn.kernels._ring._layout import shard_map
from flaxattn.kernels._ring._pair import (
    RingConfig,
    block_backward,
    block_forward,
    flash_backward,
    flash_forward,
    merge,
)
from flaxattn.kernels._visibility import Limits


def _chunk_bounds(table: np.ndarray, chunks: int) -> tuple[Array, Array]:
    """Per shard and chunk, `[min, max + 1)` of the global positions: `[P, chunks]` each."""
    parts = table.reshape(table.shape[0], chunks, -1)
    return jnp.asarray(parts.min(-1)), jnp.asarray(parts.max(-1) + 1)


def _nonempty_pairs(cfg: RingConfig, shard, src, limits: Limits) -> dict[tuple[int, int], Array]:
    """For each (query chunk, key chunk) pair: whether any query in it may see any key.

    The block plan's `classify` on the chunks' position ranges: exact for contiguous chunks,
    conservative for strided ones (their hulls), so an empty pair is never computed and a
    non-empty one never skipped.
    """
    q_lo, q_hi = _chunk_bounds(cfg.q_table, cfg.chunks)
    k_lo, k_hi = _chunk_bounds(cfg.kv_table, cfg.chunks)
    return {
        (ci, kj): jnp.any(
            classify(cfg.visibility, limits, q_lo[shard, ci], q_hi[shard, ci], k_lo[src, kj],
                     k_hi[src, kj]) != EMPTY
        )  # over the batch [B]
        for ci in range(cfg.chunks)
        for kj in range(cfg.chunks)
    }


class _Block:
    """Static slicing of one shard's step into `chunks × chunks` (query chunk, key chunk) pairs.

    `bias` and `mask` are the shard's `[b, n, Tl|1, S|1]` rows; a step first takes the columns
    of the visiting block (traced offset), then each pair its static sub-block.
    """

    def __init__(self, cfg: RingConfig, Tl: int, Sl: int):
        self.c, self.tc, self.sc, self.Sl = cfg.chunks, Tl // cfg.chunks, Sl // cfg.chunks, Sl

    def columns(self, x, src):
        if x is None or x.shape[3] == 1:
            return x
        return jax.lax.dynamic_slice_in_dim(x, src * self.Sl, self.Sl, axis=3)

    def rows(self, x, ci, axis=1):
        return jax.lax.slice_in_dim(x, ci * self.tc, (ci + 1) * self.tc, axis=axis)

    def keys(self, x, kj, axis=1):
        return jax.lax.slice_in_dim(x, kj * self.sc, (kj + 1) * self.sc, axis=axis)

    def pair(self, x, ci, kj):
        """The `(ci, kj)` sub-block of a `[b, n, Tl|1, Sl|1]` bias or mask."""
        if x is None:
            return None
        if x.shape[2] > 1:
            x = self.rows(x, ci, axis=2)
        if x.shape[3] > 1:
            x = self.keys(x, kj, axis=3)
        return x


def _ring_forward_body(cfg: RingConfig, q, k, v, bias, mask, limits):
    """Per shard: `q [B, Tl, N, H]`, `k, v [B, Sl, K, *]`, `bias, mask [b, n, Tl|1, S|1]`.

    Returns `(out [B, Tl, N, Hv] f32, lse [B, N, Tl] f32)`.
    """
    B, Tl, N, H = q.shape
    Sl, K, Hv = k.shape[1], k.shape[2], v.shape[3]
    G = N // K
    nP, blk = cfg.num_shards, _Block(cfg, Tl, Sl)
    shard = jax.lax.axis_index(cfg.axis_name)
    q = q.reshape(B, Tl, K, G, H)
    q_pos = jnp.asarray(cfg.q_table)[shard]
    kv_table = jnp.asarray(cfg.kv_table)
    ring = [(i, (i + 1) % nP) for i in range(nP)]
    pair_forward = flash_forward if cfg.flash else block_forward

    def empty(t):
        return (
            jnp.zeros((B, t, K, G, Hv), jnp.float32),
            jnp.full((B, K, G, t), -jnp.inf, jnp.float32),
        )

    def attend(acc, k, v, src):
        nonempty = _nonempty_pairs(cfg, shard, src, limits)
        kv_pos = kv_table[src]
        bias_s, mask_s = blk.columns(bias, src), blk.columns(mask, src)
        outs, lses = [], []
        for ci in range(blk.c):
            part = empty(blk.tc)
            for kj in range(blk.c):
                args = (
                    blk.rows(q, ci),
                    blk.keys(k, kj),
                    blk.keys(v, kj),
                    blk.pair(bias_s, ci, kj),
                    blk.pair(mask_s, ci, kj),
                    blk.rows(q_pos, ci, 0),
                    blk.keys(kv_pos, kj, 0),
                    limits,
                )
                block = jax.lax.cond(
                    nonempty[ci, kj],
                    lambda *a: pair_forward(cfg, *a),
                    lambda *a: empty(blk.tc),
                    *args,
                )
                part = merge(part, block)
            outs.append(part[0])
            lses.append(part[1])
        return merge(acc, (jnp.concatenate(outs, 1), jnp.concatenate(lses, 3)))

    def step(carry, s):
        acc, k, v = carry
        # Send first: the transfer does not depend on this step's compute, so they can overlap.
        k_next, v_next = jax.lax.ppermute((k, v), cfg.axis_name, ring)
        acc = attend(acc, k, v, (shard - s) % nP)
        return (acc, k_next, v_next), None

    (acc, k, v), _ = jax.lax.scan(step, (empty(Tl), k, v), jnp.arange(nP - 1))
    out, lse = attend(acc, k, v, (shard - (nP - 1)) % nP)
    return out.reshape(B, Tl, N, Hv), lse.reshape(B, N, Tl)


def _ring_backward_body(cfg: RingConfig, q, k, v, bias, mask, limits, out, lse, dout, dlse):
    """Per shard: the second ring. Returns `(dq, dk, dv, dbias)` for this shard's inputs."""
    B, Tl, N, H = q.shape
    Sl, K, Hv = k.shape[1], k.shape[2], v.shape[3]
    G = N // K
    nP, blk = cfg.num_shards, _Block(cfg, Tl, Sl)
    shard = jax.lax.axis_index(cfg.axis_name)
    q = q.reshape(B, Tl, K, G, H)
    out = out.reshape(B, Tl, K, G, Hv)
    dout = dout.astype(jnp.float32).reshape(B, Tl, K, G, Hv)
    lse = lse.reshape(B, K, G, Tl)
    dlse = dlse.astype(jnp.float32).reshape(B, K, G, Tl)
    q_pos = jnp.asarray(cfg.q_table)[shard]
    kv_table = jnp.asarray(cfg.kv_table)
    ring = [(i, (i + 1) % nP) for i in range(nP)]
    pair_backward = flash_backward if cfg.flash else block_backward

    def skip(q, k, v, bias, *rest):  # an empty pair: zero gradients, nothing computed
        return (
            jnp.zeros((B, blk.tc, K, G, H), jnp.float32),
            jnp.zeros((B, blk.sc, K, H), jnp.float32),
            jnp.zeros((B, blk.sc, K, Hv), jnp.float32),
            None if bias is None else jnp.zeros(bias.shape, jnp.float32),
        )

    def attend(grads, k, v, src):
        dq, dbias, dk, dv = grads
        nonempty = _nonempty_pairs(cfg, shard, src, limits)
        kv_pos = kv_table[src]
        bias_s, mask_s = blk.columns(bias, src), blk.columns(mask, src)
        dq_rows, db_rows = [], []
        dk_cols = [0.0] * blk.c
        dv_cols = [0.0] * blk.c
        for ci in range(blk.c):
            dq_c, db_c = 0.0, []
            for kj in range(blk.c):
                bias_p = blk.pair(bias_s, ci, kj)
                args = (
                    blk.rows(q, ci),
                    blk.keys(k, kj),
                    blk.keys(v, kj),
                    bias_p,
                    blk.pair(mask_s, ci, kj),
                    blk.rows(q_pos, ci, 0),
                    blk.keys(kv_pos, kj, 0),
                    limits,
                    blk.rows(out, ci),
                    blk.rows(lse, ci, 3),
                    blk.rows(dout, ci),
                    blk.rows(dlse, ci, 3),
                )
                compute = lambda *a: pair_backward(cfg, *a)
                gq, gk, gv, gb = jax.lax.cond(nonempty[ci, kj], compute, skip, *args)
                dq_c += gq
                dk_cols[kj] += gk
                dv_cols[kj] += gv
                db_c.append(gb)
            dq_rows.append(dq_c)
            if bias is not None:  # this query chunk's bias rows over the visiting block
                db_rows.append(jnp.concatenate(db_c, 3) if bias.shape[3] > 1 else sum(db_c))
        dq = dq + jnp.concatenate(dq_rows, 1)
        dk = dk + jnp.concatenate(dk_cols, 1)
        dv = dv + jnp.concatenate(dv_cols, 1)
        if bias is not None:
            db = jnp.concatenate(db_rows, 2) if bias.shape[2] > 1 else sum(db_rows)
            if bias.shape[3] > 1:
                db = jax.lax.dynamic_slice_in_dim(dbias, src * Sl, Sl, axis=3) + db
                dbias = jax.lax.dynamic_update_slice_in_dim(dbias, db, src * Sl, axis=3)
            else:
                dbias = dbias + db
        return dq, dbias, dk, dv

    def step(carry, s):
        grads, k, v = carry
        k_next, v_next = jax.lax.ppermute((k, v), cfg.axis_name, ring)
        dq, dbias, dk, dv = attend(grads, k, v, (shard - s) % nP)
        # dk, dv travel with their block; they leave once this step has added to them.
        dk, dv = jax.lax.ppermute((dk, dv), cfg.axis_name, ring)
        return ((dq, dbias, dk, dv), k_next, v_next), None

    grads = (
        jnp.zeros((B, Tl, K, G, H), jnp.float32),
        None if bias is None else jnp.zeros(bias.shape, jnp.float32),
        jnp.zeros((B, Sl, K, H), jnp.float32),
        jnp.zeros((B, Sl, K, Hv), jnp.float32),
    )
    (grads, k, v), _ = jax.lax.scan(step, (grads, k, v), jnp.arange(nP - 1))
    dq, dbias, dk, dv = attend(grads, k, v, (shard - (nP - 1)) % nP)
    dk, dv = jax.lax.ppermute((dk, dv), cfg.axis_name, ring)  # home: block r back on shard r
    if bias is not None:
        # Where the bias is replicated (no query axis, or no batch axis), every shard holds
        # part of the gradient of the same values: sum them.
        axes = ((cfg.axis_name,) if bias.shape[2] == 1 else ()) + (
            batch_axes(cfg.batch_axis) if bias.shape[0] == 1 else ()
        )
        if axes:
            dbias = jax.lax.psum(dbias, axes)
    return dq.reshape(B, Tl, N, H), dk, dv, dbias


def batch_axes(batch_axis) -> tuple[str, ...]:
    if batch_axis is None:
        return ()
    return tuple(batch_axis) if isinstance(batch_axis, (tuple, list)) else (batch_axis,)


# shard_map and custom_vjp around the bodies.


def _specs(cfg: RingConfig, bias, mask):
    """PartitionSpecs: sequence on the ring axis, batch on `batch_axis` (if any)."""
    bax = cfg.batch_axis
    seq = P(bax, cfg.axis_name, None, None)  # q, k, v, out, dout

    def dense(x):  # [b, n, T|1, S|1]: rows with their queries, all columns on every shard
        if x is None:
            return None
        return P(
            bax if x.shape[0] > 1 else None, None, cfg.axis_name if x.shape[2] > 1 else None, None
        )

    limits = Limits(P(bax), P(bax), P(bax))
    lse = P(bax, None, cfg.axis_name)
    return seq, dense(bias), dense(mask), limits, lse


def ring_core(cfg: RingConfig, mesh: Mesh | AbstractMesh):
    """`(q, k, v, bias, mask, limits) -> (out, lse)` on global arrays, with a ring backward."""

    def fwd_map(q, k, v, bias, mask, limits):
        seq, bias_s, mask_s, limits_s, lse_s = _specs(cfg, bias, mask)
        body = functools.partial(_ring_forward_body, cfg)
        in_specs = (seq, seq, seq, bias_s, mask_s, limits_s)
        return shard_map(body, mesh, in_specs, (seq, lse_s), q, k, v, bias, mask, limits)

    @jax.custom_vjp
    def core(q, k, v, bias, mask, limits):
        out, lse = fwd_map(q, k, v, bias, mask, limits)
        return out.astype(q.dtype), lse

    def core_fwd(q, k, v, bias, mask, limits):
        out, lse = fwd_map(q, k, v, bias, mask, limits)
        out = out.astype(q.dtype)
        return (out, lse), (q, k, v, bias, mask, limits, out, lse)

    def core_bwd(res, cotangents):
        q, k, v, bias, mask, limits, out, lse = res
        dout, dlse = cotangents
        seq, bias_s, mask_s, limits_s, lse_s = _specs(cfg, bias, mask)
        body = functools.partial(_ring_backward_body, cfg)
        in_specs = (seq, seq, seq, bias_s, mask_s, limits_s, seq, lse_s, seq, lse_s)
        args = (q, k, v, bias, mask, limits, out, lse, dout, dlse)
        dq, dk, dv, dbias = shard_map(body, mesh, in_specs, (seq, seq, seq, bias_s), *args)
        cast = lambda g, x: None if x is None else g.astype(x.dtype)
        none_limits = Limits(None, None, None)
        return cast(dq, q), cast(dk, k), cast(dv, v), cast(dbias, bias), None, none_limits

    core.defvjp(core_fwd, core_bwd)
    return core
