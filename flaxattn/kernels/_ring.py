"""Ring attention: the sequence axis sharded over a mesh axis, K/V travelling round the ring.

Each of the `P` devices on mesh axis `axis_name` holds `T/P` queries and `S/P` keys and values.
For `P` steps, every device attends its queries to the K/V block it currently holds, merges the
partial result into a running `(output, logsumexp)` pair, and passes the block to its
neighbour with `jax.lax.ppermute` (the send is issued before the step's compute, so XLA may
overlap the two). No device ever holds more than one visiting K/V block.

Each step is flash-style: every (query chunk, key chunk) pair is one call of the blocked
kernel (`blocked_attention`, with `Limits` that place the chunks' local indices at their global
positions, and `mask_mod` shifted to the same), so a step's temporaries are O(T/P) and its
fixed-size tiles, never the `[T/P, S/P]` logits. One exception stays dense (`_block_forward`,
`_block_backward`): `layout='striped'` with a local window, because positions `r + P·i` against
`s + P·j` make the window's ends depend on the traced shard pair, while the blocked kernel's
window is static; causal masks and lengths are exact on strided indices and stay flash-style.

The backward pass is a second ring (a `jax.custom_vjp`, not autodiff through the forward
scan): K and V go round again, each step computes its block's share of the gradients from the
saved output and logsumexp (`blocked_attention_grads`), and the key/value gradients travel with
their block until one last `ppermute` brings them home. Per-device memory is O(T/P) for every
residual and every temporary (the dense striped-window exception aside).

Load balancing for causal attention comes from the sequence *layout*: which global positions
each device holds. `'contiguous'` gives device `r` positions `[r·L, (r+1)·L)`, so under a
causal mask the last device works at every step while the first idles. `'zigzag'` cuts the
sequence into `2P` chunks and gives device `r` chunks `r` and `2P-1-r`: every device then has
the same visible work at every step (half a block after the first), and the invisible half is
skipped. `'striped'` gives device `r` positions `r, r+P, r+2P, ...` (Striped Attention,
Brandon et al. 2023): every block pair is about half visible, which balances the masked work;
the pair is then causal on its local indices, so the blocked kernel skips its invisible half
at its own block granularity (once the shard is longer than one block).
`ring_attention` permutes the sequence into the layout before the ring and back after it
(`to_ring_layout` / `from_ring_layout`, also usable on their own).

Reference: Liu, Zaharia, Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite
Context" (2023); zig-zag ordering as in Llama 3 context parallelism and ring-flash-attention.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Float

from flaxattn.kernels import _validate as V
from flaxattn.kernels._blocked import blocked_attention, blocked_attention_grads
from flaxattn.kernels._single_head import MaskMod
from flaxattn.kernels._softmax import masked_softmax
from flaxattn.kernels._visibility import CAUSAL_ALIGNMENTS, Limits, Visibility

Layout = Literal["contiguous", "zigzag", "striped"]
LAYOUTS = ("contiguous", "zigzag", "striped")


# ----------------------------------------------------------------------------------------------
# Layouts


def ring_permutation(length: int, num_shards: int, layout: Layout = "contiguous") -> np.ndarray:
    """Global positions in ring order: shard `r` holds `perm[r·L:(r+1)·L]`, `L = length / P`.

    - `'contiguous'`: `arange(length)`.
    - `'zigzag'`: the sequence in `2P` equal chunks; shard `r` holds chunks `r` and `2P-1-r`
      (so `length` must be divisible by `2P`).
    - `'striped'`: shard `r` holds positions `r, r+P, r+2P, ...`.

    Args:
      length: sequence length.
      num_shards: `P`, the size of the mesh axis.
      layout: one of `LAYOUTS`.

    Returns:
      `perm`, int array `[length]`: `x_in_layout = x[perm]`, and `x = x_in_layout[argsort(perm)]`.
    """
    V.check_choice("layout", layout, LAYOUTS)
    parts = 2 * num_shards if layout == "zigzag" else num_shards
    if length % parts:
        what = f"2 × the mesh axis size ({parts})" if layout == "zigzag" else f"{parts}"
        raise ValueError(
            f"layout={layout!r} needs a sequence length divisible by {what}, got length {length}."
        )
    positions = np.arange(length)
    if layout == "contiguous":
        return positions
    if layout == "striped":
        return positions.reshape(length // num_shards, num_shards).T.reshape(-1)
    chunks = positions.reshape(parts, length // parts)
    order = [c for r in range(num_shards) for c in (r, parts - 1 - r)]
    return chunks[order].reshape(-1)


def to_ring_layout(x: Array, num_shards: int, layout: Layout, axis: int = 1) -> Array:
    """Reorder the sequence axis of `x` (default 1, as in `[B, T, N, H]`) into `layout`."""
    return jnp.take(x, ring_permutation(x.shape[axis], num_shards, layout), axis=axis)


def from_ring_layout(x: Array, num_shards: int, layout: Layout, axis: int = 1) -> Array:
    """Inverse of `to_ring_layout`: back to the natural order of the sequence."""
    perm = ring_permutation(x.shape[axis], num_shards, layout)
    return jnp.take(x, np.argsort(perm), axis=axis)


def _relayout_shard(x: Array, axis_name: str, nP: int, layout: str, inverse: bool) -> Array:
    """Inside shard_map: one shard of the natural order <-> one shard of `layout`, axis 0.

    Zig-zag moves each half-shard with a `ppermute` (shard `r` of the natural order holds
    chunks `2r, 2r+1`; zig-zag shard `d` holds chunks `d, 2P-1-d`). Striped is an `all_to_all`
    (every shard sends `L/P` positions to each other shard). Neither gathers the sequence.
    """
    r = jax.lax.axis_index(axis_name)
    L = x.shape[0]
    if layout == "striped":
        if not inverse:  # position j = i·P + d of this shard goes to shard d, row r·L/P + i
            y = jnp.swapaxes(x.reshape((L // nP, nP) + x.shape[1:]), 0, 1)  # [P dest, L/P]
            return jax.lax.all_to_all(y, axis_name, 0, 0, tiled=True).reshape(x.shape)
        y = x.reshape((nP, L // nP) + x.shape[1:])  # [P source-shard, L/P]
        y = jax.lax.all_to_all(y, axis_name, 0, 0, tiled=True)  # [P shard d, L/P]
        return jnp.swapaxes(y, 0, 1).reshape(x.shape)
    # zig-zag: chunk c of 2P lives on natural shard c // 2 and on zig-zag shard min(c, 2P-1-c).
    h = L // 2
    first, second = x[:h], x[h:]
    chunks = 2 * nP
    zig = lambda c: min(c, chunks - 1 - c)
    if not inverse:  # natural shard r sends chunk 2r (first half) and 2r + 1 (second half)
        even = jax.lax.ppermute(first, axis_name, [(i, zig(2 * i)) for i in range(nP)])
        odd = jax.lax.ppermute(second, axis_name, [(i, zig(2 * i + 1)) for i in range(nP)])
        # zig-zag shard d holds chunk d first: the even one when d is even.
        d_even = r % 2 == 0
        return jnp.concatenate([jnp.where(d_even, even, odd), jnp.where(d_even, odd, even)], axis=0)
    d_even = r % 2 == 0
    even_part = jnp.where(d_even, first, second)
    odd_part = jnp.where(d_even, second, first)
    even_chunk = lambda d: d if d % 2 == 0 else chunks - 1 - d
    odd_chunk = lambda d: chunks - 1 - d if d % 2 == 0 else d
    even = jax.lax.ppermute(even_part, axis_name, [(d, even_chunk(d) // 2) for d in range(nP)])
    odd = jax.lax.ppermute(odd_part, axis_name, [(d, odd_chunk(d) // 2) for d in range(nP)])
    return jnp.concatenate([even, odd], axis=0)


def _shard_map(body, mesh: Mesh, in_specs, out_specs, *args):
    """`jax.shard_map(body)(*args)`; on a mesh with Explicit axes (the default of
    `jax.make_mesh`) the inputs are first resharded to `in_specs`, which shard_map then
    requires, where on Auto axes it reshards by itself."""
    if any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        reshard = lambda x, spec: None if x is None else jax.reshard(x, NamedSharding(mesh, spec))
        args = tuple(
            jax.tree.map(reshard, a, spec, is_leaf=lambda x: x is None)
            if a is not None and spec is not None
            else a
            for a, spec in zip(args, in_specs, strict=True)
        )
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
        *args
    )


def _relayout(x, mesh, axis_name, batch_axis, layout, axis, inverse):
    """Move the sharded sequence axis `axis` of `x` into (or out of) `layout` on the mesh."""
    if x is None or layout == "contiguous" or x.shape[axis] == 1:
        return x
    nP = int(mesh.shape[axis_name])
    spec = [None] * x.ndim
    spec[axis] = axis_name
    if x.shape[0] > 1:
        spec[0] = batch_axis
    spec = P(*spec)

    def body(x):
        x = jnp.moveaxis(x, axis, 0)
        return jnp.moveaxis(_relayout_shard(x, axis_name, nP, layout, inverse), 0, axis)

    return _shard_map(body, mesh, (spec,), spec, x)


# ----------------------------------------------------------------------------------------------
# One pair: local queries against one chunk of the visiting K/V block, at global positions;
# flash-style by the blocked kernel, or dense where local limits would not be exact.


@dataclasses.dataclass(frozen=True, eq=False)
class _Config:
    """Everything static about one ring_attention call."""

    axis_name: str
    num_shards: int
    batch_axis: str | tuple[str, ...] | None
    visibility: Visibility  # without lengths: they travel as Limits arrays
    mask_mod: MaskMod | None
    scale: float
    q_table: np.ndarray  # [P, T/P] global query positions held by each shard
    kv_table: np.ndarray  # [P, S/P]
    chunks: int  # sub-blocks per shard, each a contiguous slice, skipped when empty
    stride: int  # within a chunk, positions are `start + stride·i` (P for striped, else 1)
    flash: bool  # pairs by the blocked kernel; False where local limits are not exact


def _grouped(x: Array | None, K: int) -> Array | None:
    """`[B|1, N|1, t|1, s|1]` -> `[B|1, K|1, G|1, t|1, s|1]` (query heads grouped by kv head)."""
    if x is None:
        return None
    b, n, t, s = x.shape
    return x.reshape(b, K, n // K, t, s) if n > 1 else x[:, :, None]


def _visible(cfg: _Config, q_pos, kv_pos, limits: Limits, mask, K: int) -> Array:
    """`[B|1, K|1, G|1, t, s]` visibility at global positions, with the dense mask if any."""
    per_example = Limits(*(x[:, None, None] for x in limits))
    vis = cfg.visibility.visible(q_pos[None, :, None], kv_pos[None, None, :], per_example)
    if cfg.mask_mod is not None:
        vis &= cfg.mask_mod(q_pos[:, None], kv_pos[None, :])[None]
    vis = vis[:, None, None]  # [B, 1, 1, t, s]
    return vis if mask is None else vis & _grouped(mask, K)


def _logits(cfg, q, k, bias):
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    logits = logits * cfg.scale
    if bias is not None:
        logits = logits + _grouped(bias, k.shape[2]).astype(jnp.float32)
    return logits


def _block_forward(cfg, q, k, v, bias, mask, q_pos, kv_pos, limits):
    """Dense: `(out [B, t, K, G, Hv] f32, lse [B, K, G, t] f32)` of queries `q` on one block."""
    logits = _logits(cfg, q, k, bias)  # [B, K, G, t, s]
    weights, lse = masked_softmax(logits, _visible(cfg, q_pos, kv_pos, limits, mask, k.shape[2]))
    out = jnp.einsum("BKGTS,BSKV->BTKGV", weights, v.astype(jnp.float32))
    return out, lse


def _block_backward(cfg, q, k, v, bias, mask, q_pos, kv_pos, limits, out, lse, dout, dlse):
    """Dense: this block's share `(dq, dk, dv, dbias|None)` of the gradients, from the whole
    attention's `out [B, t, K, G, Hv]`, `lse [B, K, G, t]` and cotangents `dout`, `dlse`."""
    # d lse / d logits = p, so a cotangent on lse enters exactly like -delta.
    delta = jnp.einsum("BTKGV,BTKGV->BKGT", dout, out.astype(jnp.float32)) - dlse
    logits = _logits(cfg, q, k, bias)
    visible = _visible(cfg, q_pos, kv_pos, limits, mask, k.shape[2])
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]
    p = jnp.where(visible, jnp.exp(logits - lse), 0.0)  # [B, K, G, t, s]
    dv = jnp.einsum("BKGTS,BTKGV->BSKV", p, dout)
    dp = jnp.einsum("BTKGV,BSKV->BKGTS", dout, v.astype(jnp.float32))
    ds = p * (dp - delta[..., None])  # d loss / d logits
    dq = jnp.einsum("BKGTS,BSKH->BTKGH", ds, k.astype(jnp.float32)) * cfg.scale
    dk = jnp.einsum("BKGTS,BTKGH->BSKH", ds, q.astype(jnp.float32)) * cfg.scale
    dbias = None
    if bias is not None:
        B, N = q.shape[0], q.shape[2] * q.shape[3]
        dbias = _reduce_to(ds.reshape((B, N) + ds.shape[3:]), bias.shape)
    return dq, dk, dv, dbias


def _reduce_to(x: Array, shape: tuple[int, ...]) -> Array:
    """Sum `x` over the axes where `shape` is 1 (the gradient of a broadcast)."""
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] > 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _local_limits(cfg: _Config, q0: Array, k0: Array, t: int, s: int, limits: Limits) -> Limits:
    """The global `limits` ([B]) of queries `q0 + σ·i` (`i < t`) against keys `k0 + σ·j`
    (`j < s`), `σ = cfg.stride`, as limits on the local indices `i, j`.

    Exact for causal and lengths at any stride (`σ·j + k0 <= σ·i + q0 + offset` iff
    `j <= i + floor((q0 - k0 + offset) / σ)`; `σ·i + q0 < q_len` iff `i < ceil((q_len - q0) / σ)`),
    and for a window at stride 1 only.
    """
    st = cfg.stride
    ceil = lambda x: -(-x // st)
    return Limits(
        jnp.clip(ceil(limits.q_len - q0), 0, t),
        jnp.clip(ceil(limits.kv_len - k0), 0, s),
        (limits.offset + q0 - k0) // st,
    )


def _local_mask_mod(cfg: _Config, q0: Array, k0: Array) -> MaskMod | None:
    """The global-position `mask_mod` on the blocked kernel's local indices."""
    if cfg.mask_mod is None:
        return None
    st, mod = cfg.stride, cfg.mask_mod
    return lambda qi, ki: mod(q0 + st * qi, k0 + st * ki)


def _as_heads(x: Array) -> Array:
    """`[B, t, K, G, *]` -> `[B, t, N, *]` (rows) or `[B, K, G, t]` -> `[B, N, t]` (lse)."""
    if x.ndim == 4:
        return x.reshape(x.shape[0], -1, x.shape[3])
    return x.reshape(x.shape[:2] + (-1, x.shape[4]))


def _pair_options(
    cfg: _Config, bias, mask, q_pos: Array, kv_pos: Array, t: int, s: int, limits: Limits
) -> dict[str, Any]:
    """The blocked kernel's keywords for one pair, forward and backward alike: its bias and
    mask block, and the structured masks placed at the chunks' global positions."""
    return dict(
        bias=bias,
        mask=mask,
        visibility=cfg.visibility,
        limits=_local_limits(cfg, q_pos[0], kv_pos[0], t, s, limits),
        scale=cfg.scale,
        mask_mod=_local_mask_mod(cfg, q_pos[0], kv_pos[0]),
    )


def _flash_forward(
    cfg: _Config,
    q: Float[Array, "B t K G H"],
    k: Float[Array, "B s K H"],
    v: Float[Array, "B s K Hv"],
    bias: Array | None,
    mask: Array | None,
    q_pos: Array,
    kv_pos: Array,
    limits: Limits,
) -> tuple[Float[Array, "B t K G Hv"], Float[Array, "B K G t"]]:
    """`_block_forward` by the blocked kernel: O(t) temporaries instead of `[B, N, t, s]`.

    `q_pos [t]`, `kv_pos [s]` are the chunks' global positions (`start + stride·i`), `limits`
    the global `[B]` limits; `bias`, `mask` the pair's `[b, n, t|1, s|1]` block.
    """
    B, t, K, G, _ = q.shape
    out, lse = blocked_attention(
        _as_heads(q).astype(jnp.float32),  # out comes in q's dtype: float32 for the merge
        k,
        v,
        **_pair_options(cfg, bias, mask, q_pos, kv_pos, t, k.shape[1], limits),
    )  # [B, t, N, Hv], [B, N, t]
    return out.reshape(B, t, K, G, -1), lse.reshape(B, K, G, t)


def _flash_backward(
    cfg: _Config,
    q: Float[Array, "B t K G H"],
    k: Float[Array, "B s K H"],
    v: Float[Array, "B s K Hv"],
    bias: Array | None,
    mask: Array | None,
    q_pos: Array,
    kv_pos: Array,
    limits: Limits,
    out: Float[Array, "B t K G Hv"],
    lse: Float[Array, "B K G t"],
    dout: Float[Array, "B t K G Hv"],
    dlse: Float[Array, "B K G t"],
) -> tuple[Array, Array, Array, Array | None]:
    """`_block_backward` by the blocked kernel's backward, O(t) temporaries: this pair's share
    `(dq [B, t, K, G, H], dk [B, s, K, H], dv [B, s, K, Hv], dbias|None)`, all float32, from
    the whole attention's `out` and `lse` (over every key block, not only this one)."""
    B, t, K, G, H = q.shape
    dq, dk, dv, dbias = blocked_attention_grads(
        _as_heads(q),
        k,
        v,
        _as_heads(out),
        _as_heads(lse),
        _as_heads(dout),
        _as_heads(dlse),
        **_pair_options(cfg, bias, mask, q_pos, kv_pos, t, k.shape[1], limits),
    )
    return dq.reshape(B, t, K, G, H), dk, dv, dbias


def _merge(a, b):
    """Merge two normalised partial results `(out, lse)` over disjoint key sets."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    top = jnp.maximum(lse_a, lse_b)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    total = jnp.exp(lse_a - top) + jnp.exp(lse_b - top)
    lse = jnp.where(total > 0.0, jnp.log(jnp.where(total > 0.0, total, 1.0)) + top, -jnp.inf)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    # lse [B, K, G, t] scales out [B, t, K, G, V]
    scale_a = jnp.moveaxis(jnp.exp(lse_a - safe), 3, 1)[..., None]
    scale_b = jnp.moveaxis(jnp.exp(lse_b - safe), 3, 1)[..., None]
    return out_a * scale_a + out_b * scale_b, lse


# ----------------------------------------------------------------------------------------------
# The per-device ring bodies (run inside shard_map).


def _chunk_bounds(table: np.ndarray, chunks: int) -> tuple[Array, Array]:
    """Per shard and chunk, `[min, max + 1)` of the global positions: `[P, chunks]` each."""
    parts = table.reshape(table.shape[0], chunks, -1)
    return jnp.asarray(parts.min(-1)), jnp.asarray(parts.max(-1) + 1)


def _nonempty_pairs(cfg: _Config, shard, src, limits: Limits) -> dict[tuple[int, int], Array]:
    """For each (query chunk, key chunk) pair: whether any query in it may see any key.

    A test on position ranges: exact for contiguous chunks, conservative for strided ones, so
    an empty pair is never computed and a non-empty one never skipped.
    """
    q_lo, q_hi = _chunk_bounds(cfg.q_table, cfg.chunks)
    k_lo, k_hi = _chunk_bounds(cfg.kv_table, cfg.chunks)
    nonempty = {}
    for ci in range(cfg.chunks):
        lo, hi = cfg.visibility.key_range(q_lo[shard, ci], q_hi[shard, ci], limits)  # [B]
        for kj in range(cfg.chunks):
            lo_k = jnp.maximum(lo, k_lo[src, kj])
            hi_k = jnp.minimum(hi, k_hi[src, kj])
            nonempty[ci, kj] = jnp.any(lo_k < hi_k)
    return nonempty


class _Block:
    """Static slicing of one shard's step into `chunks × chunks` (query chunk, key chunk) pairs.

    `bias` and `mask` are the shard's `[b, n, Tl|1, S|1]` rows; a step first takes the columns
    of the visiting block (traced offset), then each pair its static sub-block.
    """

    def __init__(self, cfg: _Config, Tl: int, Sl: int):
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


def _ring_forward_body(cfg: _Config, q, k, v, bias, mask, limits):
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
    pair_forward = _flash_forward if cfg.flash else _block_forward

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
                part = _merge(part, block)
            outs.append(part[0])
            lses.append(part[1])
        return _merge(acc, (jnp.concatenate(outs, 1), jnp.concatenate(lses, 3)))

    def step(carry, s):
        acc, k, v = carry
        # Send first: the transfer does not depend on this step's compute, so they can overlap.
        k_next, v_next = jax.lax.ppermute((k, v), cfg.axis_name, ring)
        acc = attend(acc, k, v, (shard - s) % nP)
        return (acc, k_next, v_next), None

    (acc, k, v), _ = jax.lax.scan(step, (empty(Tl), k, v), jnp.arange(nP - 1))
    out, lse = attend(acc, k, v, (shard - (nP - 1)) % nP)
    return out.reshape(B, Tl, N, Hv), lse.reshape(B, N, Tl)


def _ring_backward_body(cfg: _Config, q, k, v, bias, mask, limits, out, lse, dout, dlse):
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
    pair_backward = _flash_backward if cfg.flash else _block_backward

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
            _axes(cfg.batch_axis) if bias.shape[0] == 1 else ()
        )
        if axes:
            dbias = jax.lax.psum(dbias, axes)
    return dq.reshape(B, Tl, N, H), dk, dv, dbias


def _axes(batch_axis) -> tuple[str, ...]:
    if batch_axis is None:
        return ()
    return tuple(batch_axis) if isinstance(batch_axis, (tuple, list)) else (batch_axis,)


# ----------------------------------------------------------------------------------------------
# shard_map and custom_vjp around the bodies.


def _specs(cfg: _Config, bias, mask):
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


def _ring_core(cfg: _Config, mesh: Mesh):
    """`(q, k, v, bias, mask, limits) -> (out, lse)` on global arrays, with a ring backward."""

    def fwd_map(q, k, v, bias, mask, limits):
        seq, bias_s, mask_s, limits_s, lse_s = _specs(cfg, bias, mask)
        body = functools.partial(_ring_forward_body, cfg)
        in_specs = (seq, seq, seq, bias_s, mask_s, limits_s)
        return _shard_map(body, mesh, in_specs, (seq, lse_s), q, k, v, bias, mask, limits)

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
        dq, dk, dv, dbias = _shard_map(body, mesh, in_specs, (seq, seq, seq, bias_s), *args)
        cast = lambda g, x: None if x is None else g.astype(x.dtype)
        none_limits = Limits(None, None, None)
        return cast(dq, q), cast(dk, k), cast(dv, v), cast(dbias, bias), None, none_limits

    core.defvjp(core_fwd, core_bwd)
    return core


# ----------------------------------------------------------------------------------------------
# Public entry points.


def _mesh_axis(mesh: Mesh, name: str, setting: str) -> int:
    if name not in mesh.axis_names:
        raise ValueError(
            f"{setting}={name!r} is not an axis of the mesh; its axes are "
            f"{list(mesh.axis_names)} with sizes {dict(mesh.shape)}."
        )
    return int(mesh.shape[name])


def ring_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S K H"],
    value: Float[Array, "B S K Hv"],
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    mesh: Mesh,
    axis_name: str,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    scale: float | None = None,
    layout: Layout = "contiguous",
    batch_axis: str | tuple[str, ...] | None = None,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    mask_mod: MaskMod | None = None,
    return_residual: bool = False,
    sequence_in_layout: bool = False,
) -> Array | tuple[Array, Array]:
    """Sequence-parallel attention over mesh axis `axis_name`; same result as one device.

        output = softmax(scale · Q Kᵀ + bias, masked) V

    The query and key sequences are split into `P = mesh.shape[axis_name]` shards; K/V shards
    go round the ring with `ppermute`, each device merges its partial results by logsumexp,
    and the backward pass rings again (see the module docstring). Masks and lengths mean what
    they mean in `dot_product_attention`, a row with nothing visible gives 0, and logits and
    accumulation are float32.

    Args:
      query: `[B, T, N, H]` (or `[T, N, H]`), in natural sequence order.
      key: `[B, S, K, H]`; `K` divides `N` (GQA).
      value: `[B, S, K, Hv]`.
      bias: broadcastable to `[B, N, T, S]` (each axis 1 or full); differentiable. Its rows
        are sharded with the queries and each shard holds all `S` columns of its rows.
      mask: booleans, same broadcasting as `bias`, True = attend.
      mesh: a `jax.sharding.Mesh` containing `axis_name`.
      axis_name: the mesh axis the sequence is sharded over; its size must divide `T` and `S`
        (`2·P` must, for `layout='zigzag'`).
      is_causal: hide keys after each query's position.
      query_seq_lengths: `[B]` int; rows past the length are output 0.
      key_value_seq_lengths: `[B]` int; keys past the length are hidden.
      local_window_size: `w` or `(left, right)`, each side smaller than `S`.
      scale: logit multiplier; default `1 / sqrt(H)`.
      layout: `'contiguous'`, `'zigzag'` (balanced causal work, the empty half skipped) or
        `'striped'`. The inputs are moved into it on the mesh (zig-zag: two `ppermute`s;
        striped: one `all_to_all`, needing `T` and `S` divisible by `P²`) and the output back.
      batch_axis: mesh axis (or axes) the batch is sharded over, e.g. `'data'` in a
        data × sequence mesh; the batch size must be divisible by its size. Default: none, the
        batch is replicated over the other mesh axes.
      causal_alignment: `'top_left'` or `'bottom_right'`, as in `dot_product_attention`.
      mask_mod: `(q_idx, kv_idx) -> bool` on global positions (not differentiated).
      return_residual: also return the logsumexp `[B, T, N]`.
      sequence_in_layout: the sequence axes of the inputs (and bias/mask rows and columns)
        are already in `layout` order, e.g. because the tokens and their position ids were
        permuted once with `to_ring_layout` at the model input; then nothing is moved and the
        output stays in that order. Lengths, causality and windows still refer to the natural
        positions.

    Returns:
      `output [B, T, N, Hv]` in the input dtype, or `(output, logsumexp)`.
    """
    if query.ndim == 3 and key.ndim == 3 and value.ndim == 3:
        add = lambda x: None if x is None else jnp.asarray(x)[None]
        results = ring_attention(
            query[None],
            key[None],
            value[None],
            add(bias),
            add(mask),
            mesh=mesh,
            axis_name=axis_name,
            is_causal=is_causal,
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
            local_window_size=local_window_size,
            scale=scale,
            layout=layout,
            batch_axis=batch_axis,
            causal_alignment=causal_alignment,
            mask_mod=mask_mod,
            return_residual=return_residual,
            sequence_in_layout=sequence_in_layout,
        )
        return jax.tree.map(lambda x: x[0], results)
    dims = V.check_qkv(query, key, value)
    V.check_choice("layout", layout, LAYOUTS)
    V.check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    num_shards = _mesh_axis(mesh, axis_name, "axis_name")
    batch_shards = 1
    for name in _axes(batch_axis):
        batch_shards *= _mesh_axis(mesh, name, "batch_axis")
    if dims.B % batch_shards:
        raise ValueError(
            f"batch_axis={batch_axis!r} has {batch_shards} shards, which does not divide the "
            f"batch size B={dims.B}."
        )
    # The relayout moves whole chunks: 2P of them for zig-zag, P × P rows for striped.
    parts, why = num_shards, ""
    if layout == "zigzag":
        parts, why = 2 * num_shards, f" (2 × {num_shards})"
    elif layout == "striped" and not sequence_in_layout:
        parts, why = num_shards**2, f" ({num_shards}²)"
    for what, length in (("query length T", dims.T), ("key/value length S", dims.S)):
        if length % parts == 0:
            continue
        if parts == num_shards:
            raise ValueError(
                f"mesh axis {axis_name!r} has size {num_shards}, which does not divide the "
                f"{what}={length}; pad the sequence or pick another mesh."
            )
        raise ValueError(
            f"layout={layout!r} on mesh axis {axis_name!r} of size {num_shards} needs the "
            f"{what}={length} to be a multiple of {parts}{why}; pad the sequence or pick "
            "another mesh or layout."
        )
    window = V.check_window(local_window_size)
    if window is not None and max(window) >= dims.S:
        raise ValueError(
            f"local_window_size={local_window_size!r} is larger than the sequence (S={dims.S}): "
            "each side must be smaller than S; pass no window for full attention."
        )
    bias = V.check_broadcastable("bias", bias, dims, boolean=False)
    mask = V.check_broadcastable("mask", mask, dims, boolean=True)
    visibility = Visibility(
        is_causal=bool(is_causal),
        window=window,
        q_lengths=V.check_lengths("query_seq_lengths", query_seq_lengths, dims.B),
        kv_lengths=V.check_lengths("key_value_seq_lengths", key_value_seq_lengths, dims.B),
        causal_alignment=causal_alignment,
    )
    limits = visibility.limits(dims.B, dims.T, dims.S)
    q_perm = ring_permutation(dims.T, num_shards, layout)
    kv_perm = ring_permutation(dims.S, num_shards, layout)
    cfg = _Config(
        axis_name=axis_name,
        num_shards=num_shards,
        batch_axis=batch_axis,
        visibility=dataclasses.replace(visibility, q_lengths=None, kv_lengths=None),
        mask_mod=mask_mod,
        scale=1.0 / (dims.H**0.5) if scale is None else float(scale),
        q_table=q_perm.reshape(num_shards, -1),
        kv_table=kv_perm.reshape(num_shards, -1),
        chunks=2 if layout == "zigzag" else 1,
        stride=num_shards if layout == "striped" else 1,
        # A window is not a window on the local indices of strided positions: dense there.
        flash=not (layout == "striped" and window is not None),
    )

    if sequence_in_layout:
        to_layout = from_layout = lambda x, axis: x
    else:
        move = functools.partial(
            _relayout, mesh=mesh, axis_name=axis_name, batch_axis=batch_axis, layout=layout
        )
        to_layout = lambda x, axis: move(x, axis=axis, inverse=False)
        from_layout = lambda x, axis: move(x, axis=axis, inverse=True)

    def columns(x):  # the key axis of a bias or mask is whole on every shard: a local take
        if x is None or x.shape[3] == 1 or sequence_in_layout or layout == "contiguous":
            return x
        return jnp.take(x, kv_perm, axis=3)

    out, lse = _ring_core(cfg, mesh)(
        to_layout(query, 1),
        to_layout(key, 1),
        to_layout(value, 1),
        to_layout(columns(bias), 2),
        to_layout(columns(mask), 2),
        limits,
    )
    out = from_layout(out, 1)
    if not return_residual:
        return out
    return out, jnp.swapaxes(from_layout(lse, 2), 1, 2).astype(query.dtype)


_RING_OPTIONS = ("layout", "batch_axis", "sequence_in_layout")


def make_ring_attention_fn(mesh: Mesh, axis_name: str, **opts: Any) -> Callable[..., Array]:
    """An `attention_fn` with `dot_product_attention`'s signature that runs `ring_attention`.

    For `flaxattn.nn` modules (`attention_fn=make_ring_attention_fn(mesh, 'seq')`) or any
    code written against `dot_product_attention`. Options that only the single-device kernels
    have (weights, dropout, `score_mod`, a named `implementation`) raise a ValueError rather
    than being ignored.

    Args:
      mesh: the device mesh.
      axis_name: the mesh axis the sequence is sharded over.
      **opts: ring options fixed for every call: `layout`, `batch_axis`,
        `sequence_in_layout`.

    Returns:
      `attention_fn(query, key, value, bias=None, mask=None, **kwargs)`.
    """
    _mesh_axis(mesh, axis_name, "axis_name")
    for name in opts:
        if name not in _RING_OPTIONS:
            raise ValueError(
                f"make_ring_attention_fn got unknown option {name!r}; options are "
                f"{list(_RING_OPTIONS)} (pass masking keywords at call time)."
            )

    def attention_fn(
        query,
        key,
        value,
        bias=None,
        mask=None,
        *,
        scale=None,
        is_causal=False,
        query_seq_lengths=None,
        key_value_seq_lengths=None,
        local_window_size=None,
        implementation=None,
        return_residual=False,
        causal_alignment="top_left",
        score_mod=None,
        mask_mod=None,
        dropout_rate=0.0,
        dropout_key=None,
        return_weights=False,
        block_sizes=None,
    ):
        del dropout_key, block_sizes  # no dropout (checked below); the ring sets its blocks
        unsupported = {
            "implementation": implementation is not None,
            "score_mod": score_mod is not None,
            "dropout_rate": dropout_rate > 0.0,
            "return_weights": return_weights,
        }
        for name, used in unsupported.items():
            if used:
                raise ValueError(f"ring attention does not support {name}.")
        return ring_attention(
            query,
            key,
            value,
            bias,
            mask,
            mesh=mesh,
            axis_name=axis_name,
            scale=scale,
            is_causal=is_causal,
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
            local_window_size=local_window_size,
            causal_alignment=causal_alignment,
            mask_mod=mask_mod,
            return_residual=return_residual,
            **opts,
        )

    return attention_fn
