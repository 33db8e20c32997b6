"""Data (and sequence) parallelism with ``jax.sharding`` meshes over all devices.

The mesh is :func:`flaxattn.sharding.make_mesh`'s ``('data', 'seq')``. By default 'seq' has
size 1: parameters and optimizer state are replicated and each batch is split along its
leading (example) axis. ``mesh='data=D,seq=S'`` also splits the sequence axis (axis 1) of
every batch array whose length ``S`` divides; XLA's SPMD partitioner propagates that sharding
through the position-wise layers, and attention runs as ring attention over 'seq' (see
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

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxattn import sharding
from flaxattn.sharding import DATA_AXIS, SEQ_AXIS


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


def training_mesh(data_parallel: int = 0, mesh: str = "") -> Mesh:
    """The run's mesh (`flaxattn.sharding.make_mesh`) from the config fields: the one that
    ``mesh`` (see :func:`parse_mesh`) describes, else ``data_parallel`` devices on 'data' (0:
    all of them). Errors name the field."""
    try:
        if mesh:
            return sharding.make_mesh(**parse_mesh(mesh))
        return sharding.make_mesh(data_parallel or None)
    except ValueError as e:
        setting = f"mesh={mesh!r}" if mesh else f"data_parallel={data_parallel}"
        raise ValueError(f"{setting}: {e}") from None


def attention_for_mesh(mesh: Mesh) -> Callable[..., Any] | None:
    """The ``attention_fn`` a task's Transformer is built with on the training ``mesh``.

    With a 'seq' axis of size > 1: :func:`flaxattn.sharding.mesh_attention`, ring attention
    over 'seq' that falls back to ``dot_product_attention`` for the calls the ring cannot take
    (``T = 1`` with a KV cache, lengths not a multiple of 2 x seq, a batch not a multiple of
    'data', an explicit ``implementation``, attention dropout), with the same result. Its
    ``counts`` record which path each traced call took; the loop writes them to the metrics.

    Otherwise None: the modules' default, ``flaxattn.dot_product_attention``.
    """
    if mesh.shape.get(SEQ_AXIS, 1) > 1:
        return sharding.mesh_attention(mesh)
    return None


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    n = mesh.shape[DATA_AXIS]
    if batch_size % n:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the {n} devices on the "
            f"'{DATA_AXIS}' mesh axis; choose a multiple of {n} or set data_parallel / mesh"
        )


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, *, shard: bool = True):
    """Global arrays of the global ``batch`` (the same on every process): examples over 'data'
    and axis 1 over 'seq' where it divides, or replicated (``shard=False``)."""
    if not shard:
        return {k: sharding.global_array(v, replicated(mesh)) for k, v in batch.items()}
    return sharding.shard_batch(dict(batch), mesh, sequence="where_divisible", whole=True)
