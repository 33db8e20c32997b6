"""Mesh helpers for data × sequence parallel training, on JAX's own machinery.

A training loop needs four things, all here:

    mesh = make_mesh(data=2, seq=4)                     # 8 devices: axes ('data', 'seq')
    params = replicate(params, mesh)                    # every device holds the parameters
    batch = shard_batch(batch, mesh)                    # [B, T, ...]: B on 'data', T on 'seq'
    attention = ring_attention_fn(mesh, "seq", batch_axis="data", layout="zigzag")

and then the same `jax.jit`-ed step as on one device: XLA inserts the gradient all-reduce over
'data' and 'seq', and attention is the only place where tokens of different shards meet (all
other layers are position-wise). With `seq=1` the attention function is plain
`dot_product_attention`, so nothing changes for data parallelism alone. A model that also
decodes or exports (shapes the ring cannot take) uses `ring_attention_fn(..., fallback=True)`:
ring where it can, `dot_product_attention` elsewhere, each call counted.
`mesh_attention(mesh)` gives that for a `make_mesh` mesh (what training uses).

Multi-host: call `jax.distributed.initialize()` first on every process. `make_mesh` then spans
all processes' devices, and `shard_batch` assembles the global batch from each process's
local slice (`jax.make_array_from_process_local_data`), so the loop is the same code. Where
every process holds the whole batch instead (generated from the same seed, as in
`flaxattn.train`), `shard_batch(..., whole=True)` places it: each process puts only its own
devices' shards (`global_array`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from flaxattn._deprecated import warn_deprecated
from flaxattn.kernels import dot_product_attention, ring_attention_fn

DATA_AXIS = "data"
SEQ_AXIS = "seq"


def make_mesh(
    data: int | None = None, seq: int = 1, *, devices: Sequence[Any] | None = None
) -> Mesh:
    """A `('data', 'seq')` mesh of `data × seq` devices (Auto axes): the one mesh maker.

    Args:
      data: size of the data-parallel axis; default all devices divided by `seq`.
      seq: size of the sequence-parallel (ring attention) axis.
      devices: devices to use; default `jax.devices()` (every process's, after
        `jax.distributed.initialize`).

    Returns:
      A `jax.sharding.Mesh` with axis names `('data', 'seq')`. `jax.devices()` lists each
      process's devices together, so neighbours on 'seq' (the ring's hops) share a process
      where 'seq' divides the local device count.

    Raises:
      ValueError: sizes that are not positive ints, more devices than there are, or (with
        several processes) a mesh that leaves some process's devices out.
    """
    devices = list(jax.devices() if devices is None else devices)
    where = f"{len(devices)} devices ({devices[0].platform}"
    where += f", {jax.process_count()} processes)" if jax.process_count() > 1 else ")"
    if not isinstance(seq, (int, np.integer)) or seq < 1:
        raise ValueError(f"seq must be a positive int, got {seq!r}.")
    if data is None:
        if len(devices) % seq:
            raise ValueError(
                f"seq={seq} does not divide the number of devices, {where}; pass data "
                "explicitly or pick another seq."
            )
        data = len(devices) // seq
    if not isinstance(data, (int, np.integer)) or data < 1:
        raise ValueError(f"data must be a positive int, got {data!r}.")
    need = data * seq
    if need > len(devices):
        raise ValueError(
            f"a mesh of data={data} × seq={seq} needs {need} devices, but there are {where} "
            f"(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={need} before "
            "importing jax)."
        )
    if jax.process_count() > 1 and need != len(devices):
        raise ValueError(
            f"a mesh of data={data} × seq={seq} uses {need} of the {where}; a mesh over several "
            "processes must use all of their devices, so that every process takes part."
        )
    grid = np.array(devices[:need]).reshape(data, seq)
    return Mesh(grid, (DATA_AXIS, SEQ_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


SequenceSharding = str  # one of "shard", "replicate", "where_divisible"


def batch_sharding(
    mesh: Mesh, shape: tuple[int, ...], *, sequence: SequenceSharding = "shard"
) -> NamedSharding:
    """The sharding of one `[B, T, ...]` leaf: `B` on 'data' and, by `sequence`, `T` on 'seq'
    (`'shard'`: always, rank >= 2; `'replicate'`: never; `'where_divisible'`: where the
    mesh's 'seq' size divides `T`)."""
    spec = batch_spec(len(shape), shard_sequence=sequence != "replicate")
    seq = mesh.shape.get(SEQ_AXIS, 1)
    if sequence == "where_divisible" and len(shape) >= 2 and shape[1] % seq:
        spec = P(DATA_AXIS)
    return NamedSharding(mesh, spec)


def batch_spec(ndim: int, *, shard_sequence: bool = True) -> P:
    """`PartitionSpec` of a `[B, T, ...]` array: `B` on 'data', `T` on 'seq' (rank >= 2)."""
    if ndim == 0:
        return P()
    if ndim == 1 or not shard_sequence:
        return P(DATA_AXIS)
    return P(DATA_AXIS, SEQ_AXIS)


def shard_batch(
    batch: Any,
    mesh: Mesh,
    *,
    shard_sequence: bool = True,
    sequence: SequenceSharding | None = None,
    whole: bool = False,
) -> Any:
    """Place a pytree of `[B, T, ...]` arrays on the mesh: `B` on 'data', `T` on 'seq': the one
    batch placer.

    Rank-1 leaves (per-example labels, lengths) are sharded on 'data' only.

    Args:
      batch: pytree of arrays with the batch axis first.
      mesh: from `make_mesh`.
      shard_sequence: shard axis 1 over 'seq' (False: replicate it); `sequence` overrides it.
      sequence: `'shard'`, `'replicate'` or `'where_divisible'` (see `batch_sharding`).
      whole: every process holds the whole global batch (generated from one seed, as in
        `flaxattn.train`) and places only its own devices' shards. Default: each process
        passes its local slice (`B / process_count` rows) and gets the global array.

    Returns:
      The same pytree of `jax.Array`s with `NamedSharding`s.
    """
    if sequence is None:
        sequence = "shard" if shard_sequence else "replicate"

    def place(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        sharding = batch_sharding(mesh, x.shape, sequence=sequence)
        processes = 1 if whole else jax.process_count()
        for axis, name in enumerate(sharding.spec):
            size = mesh.shape[name]
            length = x.shape[axis] * (processes if axis == 0 else 1)
            if length % size:
                raise ValueError(
                    f"shard_batch: axis {axis} of a leaf with shape {tuple(x.shape)} has "
                    f"global size {length}, not divisible by mesh axis {name!r} of size {size}."
                )
        if whole:
            return global_array(x, sharding)
        if jax.process_count() > 1:
            return jax.make_array_from_process_local_data(sharding, x)
        return jax.device_put(x, sharding)

    return jax.tree.map(place, batch)


def global_array(value: Any, sharding: Sharding) -> jax.Array:
    """The global `jax.Array` of `value` with `sharding`, from a value every process holds whole.

    Each process slices out the shards of its own devices (`jax.make_array_from_callback`), so
    nothing is sent between processes; the caller guarantees that `value` is the same on every
    process (e.g. generated from the same seed). On one process it equals
    `jax.device_put(value, sharding)`.

    Args:
      value: the whole array (numpy, or anything `np.asarray` takes).
      sharding: e.g. a `NamedSharding` of a mesh over `jax.devices()`.

    Returns:
      A `jax.Array` of `value`'s shape and dtype.
    """
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put every leaf (parameters, optimiser state, PRNG keys) on every device of the mesh.

    On several processes each passes the same tree (as one seed makes it) and places only
    its own devices' copies (`global_array`); on one it equals `jax.device_put`."""
    sharding = NamedSharding(mesh, P())

    def place(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            data = global_array(jax.random.key_data(x), sharding)  # keys as their uint32 data
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return global_array(x, sharding)

    return jax.tree.map(place, tree)


def mesh_attention(mesh: Mesh | AbstractMesh, *, layout: str = "zigzag") -> Callable[..., Any]:
    """The attention function of a model on a `make_mesh` mesh.

    With a 'seq' axis of size > 1, ring attention over 'seq' with the batch on 'data', falling
    back to `dot_product_attention` for the calls the ring cannot take (KV-cache decoding,
    weights, dropout, shapes the layout cannot split; see `ring_attention_fn`), each call
    counted in its `counts`. Otherwise `dot_product_attention` itself: nothing to ring.

    Args:
      mesh: a mesh with 'data' and 'seq' axes.
      layout: the ring layout (`'zigzag'` balances causal work).

    Returns:
      A function with `dot_product_attention`'s signature.
    """
    if SEQ_AXIS not in mesh.shape:
        raise ValueError(
            f"mesh_attention needs a mesh with a {SEQ_AXIS!r} axis, got axes {dict(mesh.shape)}."
        )
    if mesh.shape[SEQ_AXIS] == 1:
        return dot_product_attention
    return ring_attention_fn(mesh, SEQ_AXIS, layout=layout, batch_axis=DATA_AXIS, fallback=True)


def _deprecated(old: str, new: str) -> None:
    warn_deprecated(f"flaxattn.sharding.{old}", new, stacklevel=3)


def sequence_parallel_attention(
    mesh: Mesh, *, layout: str = "zigzag", fallback: bool = False
) -> Callable[..., Any]:
    """Deprecated: `ring_attention_fn(mesh, 'seq', batch_axis='data', layout=layout,
    fallback=fallback)` (or `mesh_attention(mesh)` for the fallback)."""
    _deprecated("sequence_parallel_attention", "flaxattn.ring_attention_fn / mesh_attention")
    if mesh.shape.get(SEQ_AXIS, 1) == 1:
        return dot_product_attention
    return ring_attention_fn(
        mesh, SEQ_AXIS, layout=layout, batch_axis=DATA_AXIS, fallback=fallback
    )


def RingOrDense(mesh: Mesh, *, layout: str = "zigzag") -> Callable[..., Any]:
    """Deprecated: `ring_attention_fn(mesh, 'seq', batch_axis='data', fallback=True)`."""
    _deprecated("RingOrDense", "flaxattn.ring_attention_fn(..., fallback=True)")
    return ring_attention_fn(mesh, SEQ_AXIS, layout=layout, batch_axis=DATA_AXIS, fallback=True)
