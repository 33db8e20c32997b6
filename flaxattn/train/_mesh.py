"""Data (and sequence) parallelism with ``jax.sharding`` meshes over all devices.

By default the mesh is 1-D, ``('data',)``: parameters and optimizer state are replicated and
each batch is split along its leading (example) axis. ``mesh='data=D,seq=S'`` makes a 2-D
``('data', 'seq')`` mesh that also splits the sequence axis (axis 1) of every batch array
whose length ``S`` divides; XLA's SPMD partitioner propagates that sharding through the
position-wise layers, and attention runs as ring attention over 'seq' (see
:func:`attention_for_mesh`). ``jax.jit`` adds the gradient all-reduce, so the training step
is the same program on one device or many, on CPU, GPU or TPU.

Several processes (after ``jax.distributed.initialize()``, one per host) run the same code:
the mesh spans ``jax.devices()``, every process's, so its sizes are global, and every process
generates the same global batch from the seed, of which it places only the shards of its own
devices (:func:`flaxattn.sharding.global_array`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxattn.sharding import DATA_AXIS, SEQ_AXIS, global_array, sequence_parallel_attention


def parse_mesh(spec: str) -> dict[str, int]:
    """``'data=4,seq=2'`` -> ``{'data': 4, 'seq': 2}`` (axes in that order; seq optional)."""
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, size = part.partition("=")
        name = name.strip()
        if not sep or name not in (DATA_AXIS, SEQ_AXIS) or name in axes:
            raise ValueError(f"mesh={spec!r}: expected 'data=D' or 'data=D,seq=S' (each axis once)")
        if not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"mesh={spec!r}: the size of axis {name!r} must be a positive int")
        axes[name] = int(size)
    if DATA_AXIS not in axes:
        raise ValueError(f"mesh={spec!r}: the 'data' axis is required, e.g. 'data=1,seq=4'")
    return {DATA_AXIS: axes[DATA_AXIS], SEQ_AXIS: axes.get(SEQ_AXIS, 1)}


def make_mesh(num_devices: int = 0, spec: str = "") -> Mesh:
    """The training mesh: ``('data',)`` over ``num_devices`` devices (0: all of them), or the
    ``('data', 'seq')`` mesh that ``spec`` (see :func:`parse_mesh`) describes.

    The devices are ``jax.devices()``: every process's after ``jax.distributed.initialize``
    (the local ones otherwise). A mesh over several processes must use all their devices, so
    that every process takes part in every step."""
    devices = jax.devices()
    where = f"{len(devices)} devices ({devices[0].platform}"
    where += f", {jax.process_count()} processes)" if jax.process_count() > 1 else ")"
    if spec:
        axes = parse_mesh(spec)
        need = axes[DATA_AXIS] * axes[SEQ_AXIS]
        if need > len(devices):
            raise ValueError(f"mesh={spec!r} needs {need} devices but there are {where}")
        setting = f"mesh={spec!r}"
    else:
        if num_devices < 0 or num_devices > len(devices):
            raise ValueError(f"data_parallel={num_devices} but there are {where}")
        need = num_devices or len(devices)
        axes = {DATA_AXIS: need}
        setting = f"data_parallel={num_devices}"
    if jax.process_count() > 1 and need != len(devices):
        raise ValueError(
            f"{setting} uses {need} of the {where}; a mesh over several processes must use "
            "all of their devices"
        )
    # jax.devices() lists each process's devices together, so neighbours on 'seq' (the ring's
    # hops) share a process where 'seq' divides the local device count.
    grid = np.array(devices[:need]).reshape(tuple(axes.values()))
    return Mesh(grid, tuple(axes))


def attention_for_mesh(mesh: Mesh) -> Callable[..., Any] | None:
    """The ``attention_fn`` a task's Transformer is built with on the training ``mesh``.

    With a 'seq' axis of size > 1: ``sequence_parallel_attention(mesh, fallback=True)``, a
    :class:`flaxattn.sharding.RingOrDense`. Self-attention over the sharded sequence then runs
    ring attention (K/V blocks passed round the 'seq' axis with ``ppermute``) instead of the
    K/V all-gather XLA's partitioner would insert. The same model also evaluates, decodes
    greedily and exports; calls the ring cannot take (``T = 1`` with a KV cache, lengths not a
    multiple of 2 x seq, a batch not a multiple of 'data', an explicit ``implementation``,
    attention dropout) run ``dot_product_attention``, with the same result. Its ``counts``
    record which path each traced call took; the loop writes them to the metrics.

    Otherwise None: the modules' default, ``flaxattn.dot_product_attention``.
    """
    if mesh.shape.get(SEQ_AXIS, 1) > 1:
        return sequence_parallel_attention(mesh, fallback=True)
    return None


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Examples over 'data'; axis 1 over 'seq' too when the mesh has one and it divides."""
    seq = mesh.shape.get(SEQ_AXIS, 1)
    if seq > 1 and len(shape) >= 2 and shape[1] % seq == 0:
        return NamedSharding(mesh, PartitionSpec(DATA_AXIS, SEQ_AXIS))
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    n = mesh.shape[DATA_AXIS]
    if batch_size % n:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the {n} devices on the "
            f"'{DATA_AXIS}' mesh axis; choose a multiple of {n} or set data_parallel / mesh"
        )


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, *, shard: bool = True):
    """Global arrays of the global ``batch`` (the same on every process): split over the mesh
    (see :func:`batch_sharding`), or replicated. Each process places only the shards of its
    own devices (:func:`flaxattn.sharding.global_array`)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = global_array(v, batch_sharding(mesh, v.shape) if shard else replicated(mesh))
    return out
