"""The implementations a benchmark can run: a registry that others extend with `register`.

Every entry is a function `(q [B, T, N, H], k [B, S, K, H], v [B, S, K, H], *, causal) ->
out [B, T, N, H]` plus when it can run. Adding one (an efficient variant, say) is one call:

    register(Implementation("linear", lambda q, k, v, *, causal: ..., "linear attention"))

What the error is measured against depends on the implementation: exact ones against float64
softmax attention; exact-on-a-pattern ones (`pattern`: local windows, block-sparse layouts)
against float64 softmax attention masked by that pattern; approximate ones (`approximate`:
linear, FAVOR+) have no exact reference of their own, so their distance from exact softmax is
recorded separately, as `approx_error`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

AttentionFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Where:
    """What an implementation may ask about the place it would run.

    Attributes:
      platform: `jax.default_backend()`: `'cpu'`, `'gpu'` or `'tpu'`.
      device_kind: e.g. `'cpu'`, `'NVIDIA H100 80GB HBM3'`, `'TPU v5 lite'`.
      allow_interpret: whether a Pallas kernel may run in interpret mode here (the `tiny`
        preset on CPU: a correctness check, not a timing).
      dtype: the point's dtype name.
      head_dim: the point's head dim.
    """

    platform: str
    device_kind: str
    allow_interpret: bool
    dtype: str
    head_dim: int


@dataclasses.dataclass(frozen=True)
class Pattern:
    """The query-key pairs an exact-on-a-pattern implementation computes.

    Attributes:
      name: how the records describe it, e.g. `'window (256, 0)'`.
      visible: `(rows [r], T, S, causal) -> [r, S]` bool: which keys the query rows see,
        causal masking included (numpy, so that the float64 reference can use it).
    """

    name: str
    visible: Callable[[np.ndarray, int, int, bool], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One attention implementation as the benchmark sees it.

    Attributes:
      name: the name used on the command line and in the records.
      fn: `(q, k, v, *, causal) -> out`.
      description: one line for the README and `--help`.
      quadratic_memory: it materialises `[B, N, T, S]` logits or weights, so the memory
        budget applies to it.
      unavailable: `Where -> reason or None`: why it cannot run there (recorded as
        `'unsupported'`).
      interpreted: `Where -> bool`: it runs in Pallas interpret mode there (timings are of the
        interpreter; plots leave it out).
      pattern: for exact attention restricted to a pattern (a window, a block layout): the
        pattern, so that the reference is masked the same way and FLOPs count visible pairs.
      approximate: not softmax attention (linear, FAVOR+): `max_abs_error` stays empty and
        `approx_error` holds the distance from exact softmax; FLOPs are not counted.
    """

    name: str
    fn: AttentionFn
    description: str
    quadratic_memory: bool = False
    unavailable: Callable[[Where], str | None] = lambda where: None
    interpreted: Callable[[Where], bool] = lambda where: False
    pattern: Pattern | None = None
    approximate: bool = False


IMPLEMENTATIONS: dict[str, Implementation] = {}


def register(impl: Implementation, *, replace: bool = False) -> Implementation:
    """Add `impl` to the registry (a `ValueError` if the name is taken, unless `replace`)."""
    if impl.name in IMPLEMENTATIONS and not replace:
        raise ValueError(f"an implementation named {impl.name!r} is already registered")
    IMPLEMENTATIONS[impl.name] = impl
    return impl


def _flaxattn(implementation: str) -> AttentionFn:
    def fn(q, k, v, *, causal):
        import flaxattn

        return flaxattn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=implementation
        )

    return fn


def from_registry(implementation: str, fn: AttentionFn | None = None, **fields) -> Implementation:
    """The benchmark entry of `flaxattn.kernels`' `implementation`: its description, what it
    supports and where it runs are read from the kernel registry, not restated here.

    Args:
      implementation: a registered implementation's name.
      fn: the call to time (default `dot_product_attention(..., implementation=name)`).
      **fields: other `Implementation` fields (`name`, `description`, `pattern`, ...).
    """
    from flaxattn.kernels import get_implementation

    name = implementation
    impl = get_implementation(name)

    def unavailable(where: Where) -> str | None:
        why = impl.unavailable(where.platform)
        if why is None and where.dtype not in impl.dtypes:
            why = f"implementation={name!r} takes {sorted(impl.dtypes)}, not {where.dtype}"
        if why is None and impl.interpreted(where.platform) and not where.allow_interpret:
            why = (
                f"implementation={name!r} runs interpreted on {where.platform} (a correctness "
                "check, not a timing): --preset tiny"
            )
        return why

    defaults = dict(
        name=name, fn=fn or _flaxattn(name), description=impl.description,
        quadratic_memory=impl.quadratic_memory, unavailable=unavailable,
        interpreted=lambda where: impl.interpreted(where.platform),
        approximate=impl.kind == "approximate",
    )
    return Implementation(**{**defaults, **fields})


def _flax_linen(q, k, v, *, causal):
    import flax.linen as nn

    groups = q.shape[2] // k.shape[2]  # linen wants one kv head per query head
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    mask = None
    if causal:
        mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
    return nn.dot_product_attention(q, k, v, mask=mask)


def _flax_nnx(q, k, v, *, causal):
    from flax import nnx

    return nnx.dot_product_attention(q, k, v, is_causal=causal)


def window_pattern(window: int) -> Pattern:
    """Query `p` sees keys `[p - w, p + w]` (`[p - w, p]` if causal), `w = min(window, S - 1)`:
    a window wider than the keys is the whole sequence, and `local_attention` refuses it."""

    def visible(rows, T, S, causal):
        del T
        w = min(window, S - 1)
        delta = np.arange(S)[None, :] - np.asarray(rows)[:, None]  # [r, S]: key - query
        return (delta >= -w) & (delta <= (0 if causal else w))

    return Pattern(f"window min({window}, S - 1) each side", visible)


def block_layout_pattern(block_size: int, **bigbird) -> Pattern:
    """BigBird's block layout (`bigbird_block_layout(**bigbird)`) expanded to positions."""
    from flaxattn.kernels._block_sparse import bigbird_block_layout

    def visible(rows, T, S, causal):
        b = block_size
        layout = bigbird_block_layout(-(-T // b), -(-S // b), is_causal=causal, **bigbird)
        rows = np.asarray(rows)
        out = layout[rows // b][:, np.arange(S) // b]  # [r, S]
        if causal:
            out &= np.arange(S)[None, :] <= rows[:, None]
        return out

    args = ", ".join(f"{k}={v}" for k, v in bigbird.items())
    return Pattern(f"BigBird blocks b={block_size}" + (f" {args}" if args else ""), visible)


def local_implementation(window: int, name: str | None = None) -> Implementation:
    """`flaxattn.local_attention` with `w = min(window, S - 1)` keys on each side (left only if
    causal): exact on that window."""

    def fn(q, k, v, *, causal):
        from flaxattn.kernels.efficient import local_attention

        w = min(window, k.shape[1] - 1)
        return local_attention(q, k, v, is_causal=causal, local_window_size=(w, w))

    return from_registry(
        "local", fn, name=name or f"local_w{window}",
        description=f"flaxattn.local_attention, window min({window}, S - 1) each side (left "
        "only if causal): exact on the window, O(T·w)",
        pattern=window_pattern(window),
    )


def block_sparse_implementation(
    block_size: int, name: str | None = None, **bigbird
) -> Implementation:
    """`flaxattn.block_sparse_attention` with BigBird's layout: exact on the layout."""

    def fn(q, k, v, *, causal):
        from flaxattn.kernels.efficient import block_sparse_attention

        return block_sparse_attention(q, k, v, is_causal=causal, block_size=block_size, **bigbird)

    return from_registry(
        "block_sparse", fn, name=name or f"block_sparse_b{block_size}",
        description=f"flaxattn.block_sparse_attention, BigBird global+window+random blocks of "
        f"{block_size}: exact on the layout",
        pattern=block_layout_pattern(block_size, **bigbird),
    )


def _linear(q, k, v, *, causal):
    from flaxattn.kernels.efficient import linear_attention

    return linear_attention(q, k, v, is_causal=causal)


@functools.cache
def _favor_projection(num_features: int, head_dim: int) -> jax.Array:
    from flaxattn.kernels.efficient import favor_projection

    # A constant, not drawn again inside every call; one jit instead of eager op-by-op
    # dispatch (3.6 s -> 1.5 s on the 2-core CPU, most of it the QR's compile).
    with jax.ensure_compile_time_eval():
        draw = jax.jit(favor_projection, static_argnums=(1, 2))
        return draw(jax.random.key(0), num_features, head_dim)


def favor_implementation(num_features: int, name: str | None = None) -> Implementation:
    """`flaxattn.favor_attention` with a fixed orthogonal projection of `num_features` rows."""

    def fn(q, k, v, *, causal):
        from flaxattn.kernels.efficient import favor_attention

        projection = _favor_projection(num_features, q.shape[-1])
        return favor_attention(q, k, v, is_causal=causal, projection=projection)

    return from_registry(
        "favor", fn, name=name or f"favor_m{num_features}",
        description=f"flaxattn.favor_attention, {num_features} orthogonal random features "
        "(seed 0): approximates softmax",
    )


for _impl in (
    from_registry("reference"),
    from_registry("blocked"),
    from_registry("pallas"),
    from_registry("xla"),
    from_registry("cudnn"),
    Implementation(
        "flax_linen", _flax_linen,
        "flax.linen.dot_product_attention (kv heads repeated for GQA, dense causal mask)",
        quadratic_memory=True,
    ),
    Implementation(
        "flax_nnx", _flax_nnx,
        "flax.nnx.dot_product_attention (delegates to jax.nn with implementation=None)",
        quadratic_memory=True,
    ),
    from_registry("linear", _linear),
    favor_implementation(256, name="favor"),
    local_implementation(256, name="local"),
    block_sparse_implementation(64, name="block_sparse"),
):
    register(_impl)
