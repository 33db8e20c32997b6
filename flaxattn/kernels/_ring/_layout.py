"""Ring layouts: which global positions each shard holds, and moving a sharded sequence
between the natural order and a layout on the mesh (without gathering it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import ArrayLike

from flaxattn.kernels import _validate as V

Layout = str  # one of "contiguous", "zigzag", "striped"
LAYOUTS = ("contiguous", "zigzag", "striped")

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


def to_ring_layout(x: ArrayLike, num_shards: int, layout: Layout, axis: int = 1) -> Array:
    """Reorder the sequence axis of `x` (default 1, as in `[B, T, N, H]`) into `layout`."""
    return jnp.take(x, ring_permutation(x.shape[axis], num_shards, layout), axis=axis)


def from_ring_layout(x: ArrayLike, num_shards: int, layout: Layout, axis: int = 1) -> Array:
    """Inverse of `to_ring_layout`: back to the natural order of the sequence."""
    perm = ring_permutation(x.shape[axis], num_shards, layout)
    return jnp.take(x, np.argsort(perm), axis=axis)


def _relayout_shard(x: ArrayLike, axis_name: str, nP: int, layout: str, inverse: bool) -> Array:
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


def shard_map(body, mesh: Mesh | AbstractMesh, in_specs, out_specs, *args):
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


def relayout(x, mesh, axis_name, batch_axis, layout, axis, inverse):
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

    return shard_map(body, mesh, (spec,), spec, x)
