"""The ring's public entry points: `ring_attention`, `ring_attention_fn` and its registry entry."""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from jax import Array
from jax.sharding import AbstractMesh, Mesh
from jaxtyping import ArrayLike, Float

from flaxattn.kernels import _validate as V
from flaxattn.kernels._call import Call, Result, finish, prepare
from flaxattn.kernels._registry import ALL_FEATURES, Implementation, register, run
from flaxattn.kernels._ring._layout import LAYOUTS, Layout, relayout, ring_permutation
from flaxattn.kernels._ring._loops import batch_axes, ring_core
from flaxattn.kernels._ring._pair import RingConfig


def _mesh_axis(mesh: Mesh | AbstractMesh, name: str, setting: str) -> int:
    if name not in mesh.axis_names:
        raise ValueError(
            f"{setting}={name!r} is not an axis of the mesh; its axes are "
            f"{list(mesh.axis_names)} with sizes {dict(mesh.shape)}."
        )
    return int(mesh.shape[name])


@dataclasses.dataclass(frozen=True, eq=False)
class RingOptions:
    """Where and how a ring runs (what `ring_attention` takes beyond the attention call).

    Attributes:
      mesh: a `jax.sharding.Mesh` containing `axis_name`.
      axis_name: the mesh axis the sequence is sharded over.
      layout: `'contiguous'`, `'zigzag'` or `'striped'` (see the package docstring).
      batch_axis: mesh axis (or axes) the batch is sharded over, or None (replicated).
      sequence_in_layout: the inputs are already in `layout` order.
    """

    mesh: Mesh | AbstractMesh
    axis_name: str
    layout: Layout = "contiguous"
    batch_axis: str | tuple[str, ...] | None = None
    sequence_in_layout: bool = False

    def __post_init__(self):
        if not isinstance(self.mesh, (Mesh, AbstractMesh)):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}.")
        V.check_choice("layout", self.layout, LAYOUTS)
        _mesh_axis(self.mesh, self.axis_name, "axis_name")
        for name in batch_axes(self.batch_axis):
            _mesh_axis(self.mesh, name, "batch_axis")

    @property
    def num_shards(self) -> int:
        return int(self.mesh.shape[self.axis_name])

    def cannot_ring(self, call: Call) -> str | None:
        """Why this ring cannot take `call`'s shapes (None: it can): the one check behind
        `ring_attention`'s errors and `ring_attention_fn(fallback=True)`'s choice."""
        dims, P = call.dims, self.num_shards
        batch_shards = 1
        for name in batch_axes(self.batch_axis):
            batch_shards *= int(self.mesh.shape[name])
        if dims.B % batch_shards:
            return (
                f"batch_axis={self.batch_axis!r} has {batch_shards} shards, which does not "
                f"divide the batch size B={dims.B}"
            )
        # The relayout moves whole chunks: 2P of them for zig-zag, P × P rows for striped.
        parts, why = P, ""
        if self.layout == "zigzag":
            parts, why = 2 * P, f" (2 × {P})"
        elif self.layout == "striped" and not self.sequence_in_layout:
            parts, why = P**2, f" ({P}²)"
        for what, length in (("query length T", dims.T), ("key/value length S", dims.S)):
            if length % parts == 0:
                continue
            if parts == P:
                return (
                    f"mesh axis {self.axis_name!r} has size {P}, which does not divide the "
                    f"{what}={length}; pad the sequence or pick another mesh"
                )
            return (
                f"layout={self.layout!r} on mesh axis {self.axis_name!r} of size {P} needs the "
                f"{what}={length} to be a multiple of {parts}{why}; pad the sequence or pick "
                "another mesh or layout"
            )
        window = call.visibility.window
        if window is not None and max(window) >= dims.S:
            return (
                f"local_window_size={window!r} is larger than the sequence (S={dims.S}): each "
                "side must be smaller than S; pass no window for full attention"
            )
        return None


def _run(call: Call, *, options: RingOptions | None = None) -> Result:
    """The registry's entry: `call` as ring attention with `options`."""
    reason = options.cannot_ring(call)
    if reason is not None:
        raise ValueError(f"ring attention: {reason}.")
    dims, vis = call.dims, call.visibility
    P, layout = options.num_shards, options.layout
    q_perm = ring_permutation(dims.T, P, layout)
    kv_perm = ring_permutation(dims.S, P, layout)
    cfg = RingConfig(
        axis_name=options.axis_name,
        num_shards=P,
        batch_axis=options.batch_axis,
        visibility=dataclasses.replace(vis, q_lengths=None, kv_lengths=None),
        mask_mod=call.mask_mod,
        scale=float(call.scale),
        q_table=q_perm.reshape(P, -1),
        kv_table=kv_perm.reshape(P, -1),
        chunks=2 if layout == "zigzag" else 1,
        stride=P if layout == "striped" else 1,
        # A window is not a window on the local indices of strided positions: dense there.
        flash=not (layout == "striped" and vis.window is not None),
    )
    if options.sequence_in_layout or layout == "contiguous":
        to_layout = from_layout = lambda x, axis: x
        columns = lambda x: x
    else:
        move = functools.partial(
            relayout, mesh=options.mesh, axis_name=options.axis_name,
            batch_axis=options.batch_axis, layout=layout,
        )
        to_layout = lambda x, axis: move(x, axis=axis, inverse=False)
        from_layout = lambda x, axis: move(x, axis=axis, inverse=True)

        def columns(x):  # the key axis of a bias or mask is whole on every shard: a local take
            return x if x is None or x.shape[3] == 1 else jnp.take(x, kv_perm, axis=3)

    out, lse = ring_core(cfg, options.mesh)(
        to_layout(call.query, 1),
        to_layout(call.key, 1),
        to_layout(call.value, 1),
        to_layout(columns(call.bias), 2),
        to_layout(columns(call.mask), 2),
        vis.limits(dims.B, dims.T, dims.S),
    )
    return Result(from_layout(out, 1), from_layout(lse, 2))


RING = register(
    Implementation(
        "ring",
        _run,
        "ring attention: the sequence sharded over a mesh axis, K/V passed round by ppermute, "
        "each step flash-style",
        # The ring's pairs run the blocked kernel (no weights, no dropout); it keeps its own
        # blocks (block_sizes is ignored) and a static scale, and score_mod would have to see
        # global positions.
        supports=ALL_FEATURES - {"score_mod", "dropout", "weights", "traced_scale"},
        options=("options",),
        required=("options",),
    )
)


def ring_attention(
    query: Float[ArrayLike, "B T N H"],
    key: Float[ArrayLike, "B S K H"],
    value: Float[ArrayLike, "B S K Hv"],
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    mesh: Mesh | AbstractMesh,
    axis_name: str,
    layout: Layout = "contiguous",
    batch_axis: str | tuple[str, ...] | None = None,
    sequence_in_layout: bool = False,
    **keywords: Any,
) -> Array | tuple[Array, Array]:
    """Sequence-parallel attention over mesh axis `axis_name`; same result as one device.

        output = softmax(scale · Q Kᵀ + bias, masked) V

    The query and key sequences are split into `P = mesh.shape[axis_name]` shards; K/V shards
    go round the ring with `ppermute`, each device merges its partial results by logsumexp,
    and the backward pass rings again (see `flaxattn.kernels._ring`). Masks and lengths mean
    what they mean in `dot_product_attention`, a row with nothing visible gives 0, and logits
    and accumulation are float32.

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
      layout: `'contiguous'`, `'zigzag'` (balanced causal work, the empty half skipped) or
        `'striped'`. The inputs are moved into it on the mesh (zig-zag: two `ppermute`s;
        striped: one `all_to_all`, needing `T` and `S` divisible by `P²`) and the output back.
      batch_axis: mesh axis (or axes) the batch is sharded over, e.g. `'data'` in a
        data × sequence mesh; the batch size must be divisible by its size. Default: none, the
        batch is replicated over the other mesh axes.
      sequence_in_layout: the sequence axes of the inputs (and bias/mask rows and columns)
        are already in `layout` order, e.g. because the tokens and their position ids were
        permuted once with `to_ring_layout` at the model input; then nothing is moved and the
        output stays in that order. Lengths, causality and windows still refer to the natural
        positions.
      **keywords: `dot_product_attention`'s keywords (`scale`, `is_causal`, lengths,
        `local_window_size` with each side smaller than `S`, `causal_alignment`, `mask_mod`
        on global positions, `return_residual`; `block_sizes` is ignored: each pair picks
        its own blocks); the ones the ring does not support (`score_mod`, dropout,
        `return_weights`, a traced scale) raise a `ValueError`.

    Returns:
      `output [B, T, N, Hv]` in the input dtype, or `(output, logsumexp [B, T, N])`.
    """
    options = RingOptions(mesh, axis_name, layout, batch_axis, sequence_in_layout)
    call = prepare(query, key, value, bias, mask, caller="ring_attention", **keywords)
    return finish(call, RING(call, options=options))


RING_COUNT = "ring"  # the key of ring calls in `RingAttentionFn.counts`


class RingAttentionFn:
    """An `attention_fn` with `dot_product_attention`'s signature that runs ring attention.

    Made by `ring_attention_fn`. With `fallback=False` every call is ring attention, and one the
    ring cannot take raises its `ValueError`. With `fallback=True` a call the ring cannot take
    runs `dot_product_attention` with all its arguments instead, on whatever sharding its
    inputs have. The policy, decided per call from static shapes and options (so at trace time,
    and the same for every execution of a compiled program), asks the registry what the ring
    supports (no `score_mod`, dropout, `return_weights`, named `implementation`, ...) and the
    ring's own shape rules (`RingOptions.cannot_ring`: batch divisible by the data axis, `T` and
    `S` by what the layout needs, a window narrower than `S`), so KV-cache decoding (`T = 1`) or
    a cross-attention to a short source fall back. Both paths compute the same function (tested
    in tests/test_ring.py), so the choice changes only speed and memory, never results. Nothing
    is silent: `counts` holds, per traced call, `'ring'` or `'dense: <reason>'`.

    Attributes:
      options: the ring's `RingOptions`.
      fallback: whether calls the ring cannot take run densely.
      counts: `collections.Counter` of traced calls by path (`'ring'`, `'dense: ...'`).
    """

    def __init__(self, options: RingOptions, *, fallback: bool = False):
        self.options = options
        self.fallback = fallback
        self.counts: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        o = self.options
        return (
            f"ring_attention_fn(mesh={dict(o.mesh.shape)}, axis_name={o.axis_name!r}, "
            f"layout={o.layout!r}, batch_axis={o.batch_axis!r}, fallback={self.fallback})"
        )

    def dense_reason(self, query, key, value=None, bias=None, mask=None, **keywords) -> str | None:
        """Why a call with these arguments cannot ring (None: it can); `value` defaults to
        `key`. The arguments are checked as `dot_product_attention` checks them."""
        value = key if value is None else value
        return self._reason(prepare(query, key, value, bias, mask, **keywords))

    def _reason(self, call: Call) -> str | None:
        if call.implementation is not None:
            return "implementation given"
        what = RING.unsupported(call)
        if what is not None:
            return f"{what} given"
        return self.options.cannot_ring(call)

    def __call__(self, query, key, value, bias=None, mask=None, **keywords):
        """`dot_product_attention(query, key, value, bias, mask, **keywords)`, by the ring."""
        call = prepare(query, key, value, bias, mask, caller="ring attention_fn", **keywords)
        reason = self._reason(call)
        if reason is None or not self.fallback:
            self.counts[RING_COUNT] += 1
            if call.implementation is not None:
                raise ValueError(
                    "a ring attention_fn runs ring attention: it takes no implementation= "
                    f"(got {call.implementation!r})."
                )
            return finish(call, RING(call, options=self.options))
        self.counts[f"dense: {reason}"] += 1
        return finish(call, run(call))


def ring_attention_fn(
    mesh: Mesh | AbstractMesh,
    axis_name: str = "seq",
    *,
    layout: Layout = "contiguous",
    batch_axis: str | tuple[str, ...] | None = None,
    sequence_in_layout: bool = False,
    fallback: bool = False,
) -> Callable[..., Array]:
    """An `attention_fn` with `dot_product_attention`'s signature that runs `ring_attention`.

    For `flaxattn.nn` modules (`attention=ring_attention_fn(mesh, 'seq')`) or any code written
    against `dot_product_attention`; the one way to get a ring `attention_fn`.

    Args:
      mesh: the device mesh.
      axis_name: the mesh axis the sequence is sharded over.
      layout, batch_axis, sequence_in_layout: as in `ring_attention`.
      fallback: run the calls the ring cannot take (decoding, short sources, weights, ...)
        with `dot_product_attention` instead of raising; see `RingAttentionFn`.

    Returns:
      A `RingAttentionFn`.
    """
    options = RingOptions(mesh, axis_name, layout, batch_axis, sequence_in_layout)
    return RingAttentionFn(options, fallback=fallback)
