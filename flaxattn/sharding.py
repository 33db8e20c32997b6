"""Mesh helpers for data × sequence parallel training, on JAX's own machinery.

A training loop needs four things, all here:

    mesh = make_mesh(data=2, seq=4)                     # 8 devices: axes ('data', 'seq')
    params = replicate(params, mesh)                    # every device holds the parameters
    batch = shard_batch(batch, mesh)                    # [B, T, ...]: B on 'data', T on 'seq'
    attention_fn = sequence_parallel_attention(mesh)    # ring attention over 'seq', B on 'data'

and then the same `jax.jit`-ed step as on one device: XLA inserts the gradient all-reduce over
'data' and 'seq', and attention is the only place where tokens of different shards meet (all
other layers are position-wise). With `seq=1` the attention function is plain
`dot_product_attention`, so nothing changes for data parallelism alone. A model that also
decodes or exports (shapes the ring cannot take) uses `sequence_parallel_attention(mesh,
fallback=True)`: ring where it can, `dot_product_attention` elsewhere, each call counted.

Multi-host: call `jax.distributed.initialize()` first on every process. `make_mesh` then spans
all processes' devices, and `shard_batch` assembles the global batch from each process's
local slice (`jax.make_array_from_process_local_data`), so the loop is the same code. Where
every process holds the whole batch instead (generated from the same seed, as in
`flaxattn.train`), `global_array` places it: each process puts only its own devices' shards.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, Sharding
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


def sequence_parallel_attention(
    mesh: Mesh, *, layout: str = "zigzag", fallback: bool = False
) -> Callable[..., Any]:
    """An `attention_fn` for the modules: ring attention over 'seq', batch on 'data'.

    With a 'seq' axis of size 1 it is `dot_product_attention` itself (nothing to ring).

    Args:
      mesh: from `make_mesh` (or any mesh with a 'seq' and a 'data' axis).
      layout: ring layout (`'zigzag'` balances causal work; see `ring_attention`).
      fallback: False: every call is ring attention, and a call the ring cannot take
        raises `make_ring_attention_fn`'s ValueError. True: a `RingOrDense`, which rings
        the calls the ring can take and runs the others with `dot_product_attention`,
        counting each kind in its `counts` (for a model that also decodes, exports or
        evaluates at other shapes).

    Returns:
      A function with `dot_product_attention`'s signature.
    """
    if SEQ_AXIS not in mesh.shape:
        raise ValueError(
            f"sequence_parallel_attention needs a mesh with a {SEQ_AXIS!r} axis, got axes "
            f"{dict(mesh.shape)}."
        )
    if mesh.shape[SEQ_AXIS] == 1:
        return dot_product_attention
    if fallback:
        return RingOrDense(mesh, layout=layout)
    return make_ring_attention_fn(mesh, SEQ_AXIS, layout=layout, batch_axis=DATA_AXIS)


RING = "ring"  # the key of ring calls in `RingOrDense.counts`


class RingOrDense:
    """An `attention_fn` that runs ring attention where it can, else `dot_product_attention`.

    The policy, decided per call from static shapes and options (so at trace time, and the
    same for every execution of a compiled program): ring attention over 'seq' (batch on
    'data') unless one of these holds, in which case the call runs `dot_product_attention`
    with all its arguments, on whatever sharding its inputs have:

    - `implementation`, `score_mod`, `dropout_rate > 0` or `return_weights` is given: only
      the single-device kernels have them;
    - the batch `B` is not a multiple of the 'data' axis size;
    - the query length `T` or the key length `S` is not a multiple of what the layout needs
      (`P` for contiguous, `2P` for zigzag, `P²` for striped; `P` the 'seq' size), as in
      KV-cache decoding (`T = 1`) or a cross-attention to a short source;
    - a `local_window_size` side reaches `S` (the ring asks for a smaller window).

    Both paths compute the same function (tested in tests/test_ring.py), so the choice only
    changes speed and memory, never results. Nothing is silent: `counts` holds, per traced
    call, `'ring'` or `'dense: <reason>'`, and the training loop writes them to the run's
    metrics. Shapes the ring cannot take at all still reach `dot_product_attention`'s own
    checks, and `make_ring_attention_fn` stays strict for direct users.

    Args:
      mesh: a mesh with 'seq' (size > 1) and 'data' axes.
      layout: ring layout, see `ring_attention`.

    Attributes:
      counts: `collections.Counter` of traced calls by path (`'ring'`, `'dense: ...'`).
    """

    def __init__(self, mesh: Mesh, *, layout: str = "zigzag"):
        self.mesh = mesh
        self.layout = layout
        self.counts: collections.Counter[str] = collections.Counter()
        self._ring = make_ring_attention_fn(mesh, SEQ_AXIS, layout=layout, batch_axis=DATA_AXIS)

    def __repr__(self) -> str:
        return f"RingOrDense(mesh={dict(self.mesh.shape)}, layout={self.layout!r})"

    def dense_reason(self, query: Any, key: Any, **kwargs: Any) -> str | None:
        """Why a call with these arguments cannot ring (None: it can).

        Args:
          query: `[B, T, N, H]` or `[T, N, H]`.
          key: `[B, S, K, H]` or `[S, K, H]`.
          **kwargs: `dot_product_attention`'s keyword arguments.
        """
        for name in ("implementation", "score_mod"):
            if kwargs.get(name) is not None:
                return f"{name} given"
        if kwargs.get("dropout_rate", 0.0) > 0.0:
            return "attention dropout"
        if kwargs.get("return_weights", False):
            return "return_weights"
        B = query.shape[0] if query.ndim == 4 else 1
        T, S = query.shape[-3], key.shape[-3]
        data = self.mesh.shape.get(DATA_AXIS, 1)
        if B % data:
            return f"batch {B} not a multiple of {DATA_AXIS}={data}"
        P_ = self.mesh.shape[SEQ_AXIS]
        parts = {"zigzag": 2 * P_, "striped": P_ * P_}.get(self.layout, P_)
        for name, length in (("T", T), ("S", S)):
            if length % parts:
                return f"{name}={length} not a multiple of {parts} ({self.layout}, seq={P_})"
        window = kwargs.get("local_window_size")
        if window is not None and max(np.atleast_1d(window)) >= S:
            return f"local_window_size {window} reaches S={S}"
        return None

    def __call__(self, query, key, value, bias=None, mask=None, **kwargs):
        """`dot_product_attention(query, key, value, bias, mask, **kwargs)`, by ring if it can."""
        reason = self.dense_reason(query, key, **kwargs)
        self.counts[RING if reason is None else f"dense: {reason}"] += 1
        if reason is None:
            return self._ring(query, key, value, bias, mask, **kwargs)
        return dot_product_attention(query, key, value, bias, mask, **kwargs)
