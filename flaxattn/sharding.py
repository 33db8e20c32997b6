"""Mesh helpers for data × sequence parallel training, on JAX's own machinery.

A training loop needs four things, all here:

    mesh = make_mesh(data=2, seq=4)                     # 8 devices: axes ('data', 'seq')
    params = replicate(params, mesh)                    # every device holds the parameters
    batch = shard_batch(batch, mesh)                    # [B, T, ...]: B on 'data', T on 'seq'
    attention_fn = sequence_parallel_attention(mesh)    # ring attention over 'seq', B on 'data'

and then the same `jax.jit`-ed step as on one device: XLA inserts the gradient all-reduce over
'data' and 'seq', and attention is the only place where tokens of different shards meet (all
other layers are position-wise). With `seq=1` the attention function is plain
`dot_product_attention`, so nothing changes for data parallelism alone.

Multi-host: call `jax.distributed.initialize()` first on every process. `make_mesh` then spans
all processes' devices, and `shard_batch` assembles the global batch from each process's
local slice (`jax.make_array_from_process_local_data`), so the loop is the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flaxattn.kernels import dot_product_attention
from flaxattn.kernels._ring import make_ring_attention_fn

DATA_AXIS = "data"
SEQ_AXIS = "seq"


def make_mesh(
    data: int | None = None, seq: int = 1, *, devices: Sequence[Any] | None = None
) -> Mesh:
    """A `('data', 'seq')` mesh of `data × seq` devices (`jax.make_mesh`, Auto axes).

    Args:
      data: size of the data-parallel axis; default all devices divided by `seq`.
      seq: size of the sequence-parallel (ring attention) axis.
      devices: devices to use; default `jax.devices()` (every process's, after
        `jax.distributed.initialize`).

    Returns:
      A `jax.sharding.Mesh` with axis names `('data', 'seq')`.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(seq, (int, np.integer)) or seq < 1:
        raise ValueError(f"seq must be a positive int, got {seq!r}.")
    if data is None:
        if len(devices) % seq:
            raise ValueError(
                f"seq={seq} does not divide the number of devices ({len(devices)}); pass data "
                "explicitly or pick another seq."
            )
        data = len(devices) // seq
    if not isinstance(data, (int, np.integer)) or data < 1:
        raise ValueError(f"data must be a positive int, got {data!r}.")
    if data * seq > len(devices):
        raise ValueError(
            f"a mesh of data={data} × seq={seq} needs {data * seq} devices, but only "
            f"{len(devices)} are available (on CPU, set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={data * seq} before importing jax)."
        )
    return jax.make_mesh(
        (data, seq),
        (DATA_AXIS, SEQ_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[: data * seq],
    )


def batch_spec(ndim: int, *, shard_sequence: bool = True) -> P:
    """`PartitionSpec` of a `[B, T, ...]` array: `B` on 'data', `T` on 'seq' (rank >= 2)."""
    if ndim == 0:
        return P()
    if ndim == 1 or not shard_sequence:
        return P(DATA_AXIS)
    return P(DATA_AXIS, SEQ_AXIS)


def shard_batch(batch: Any, mesh: Mesh, *, shard_sequence: bool = True) -> Any:
    """Place a pytree of `[B, T, ...]` arrays on the mesh: `B` on 'data', `T` on 'seq'.

    Rank-1 leaves (per-example labels, lengths) are sharded on 'data' only. On several
    processes each one passes its local slice of the batch (`B / process_count` rows) and
    gets the global array.

    Args:
      batch: pytree of arrays with the batch axis first.
      mesh: from `make_mesh`.
      shard_sequence: also shard axis 1 over 'seq' (False: replicate it).

    Returns:
      The same pytree of `jax.Array`s with `NamedSharding`s.
    """

    def place(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        spec = batch_spec(x.ndim, shard_sequence=shard_sequence)
        for axis, name in enumerate(spec):
            size = mesh.shape[name]
            local = x.shape[axis] * (jax.process_count() if axis == 0 else 1)
            if local % size:
                raise ValueError(
                    f"shard_batch: axis {axis} of a leaf with shape {tuple(x.shape)} has "
                    f"global size {local}, not divisible by mesh axis {name!r} of size {size}."
                )
        sharding = NamedSharding(mesh, spec)
        if jax.process_count() > 1:
            return jax.make_array_from_process_local_data(sharding, x)
        return jax.device_put(x, sharding)

    return jax.tree.map(place, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put every leaf (parameters, optimiser state) on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def sequence_parallel_attention(mesh: Mesh, *, layout: str = "zigzag") -> Callable[..., Any]:
    """An `attention_fn` for the modules: ring attention over 'seq', batch on 'data'.

    With a 'seq' axis of size 1 it is `dot_product_attention` itself (nothing to ring).

    Args:
      mesh: from `make_mesh`.
      layout: ring layout (`'zigzag'` balances causal work; see `ring_attention`).

    Returns:
      A function with `dot_product_attention`'s signature.
    """
    if mesh.shape[SEQ_AXIS] == 1:
        return dot_product_attention
    return make_ring_attention_fn(mesh, SEQ_AXIS, layout=layout, batch_axis=DATA_AXIS)
