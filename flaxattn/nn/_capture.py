"""Capturing attention weights: `capture_attention(model, ...)` and what layers need for it.

Mechanism: every attention layer mixes in `Capturable`. `capture_attention` sets a
`CaptureSpec` on the chosen layers, runs the model under `nnx.capture(..., AttentionWeights)`,
and resets the spec. A layer with a spec sows its weights (an `nnx.Intermediate` subclass),
so a normal call neither computes nor stores them. The weights are the softmax before
dropout, float32, computed by the reference kernel whatever `implementation` produced the
output, so the output itself is untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array
from jaxtyping import ArrayLike

from flaxattn.kernels import dot_product_attention


class AttentionWeights(nnx.Intermediate):
    """Sown attention weights `[B, N', T, S]` float32, or top-k `(values, indices)`."""


@dataclasses.dataclass(frozen=True)
class CaptureSpec:
    """What a capturing layer records."""

    heads: tuple[int, ...] | None = None  # query heads kept, in this order (None = all)
    top_k: int | None = None  # keep only the k largest weights per row, with their key indices


class Capturable:
    """Mixin of every attention layer: its `kind` and the recording of its weights.

    Attributes:
      kind: `'self'` or `'cross'` (set by the block that owns the layer).
      capture: a `CaptureSpec` while `capture_attention` runs, else None.
    """

    kind: str
    capture: CaptureSpec | None = None
    num_heads: int

    def record_weights(self, weights: ArrayLike) -> None:
        """Select heads / top-k from full weights `[B, N, T, S]` and sow them."""
        if self.capture.heads is not None:
            weights = weights[:, jnp.asarray(self.capture.heads)]
        if self.capture.top_k is not None:
            weights = _top_k(weights, self.capture.top_k)
        self.sow_captured(weights)

    def sow_captured(self, captured: ArrayLike | tuple[Array, Array]) -> None:
        """Sow already-selected weights (as `capture_reference_weights` returns them)."""
        self.sow(AttentionWeights, "weights", captured)


def _top_k(weights: ArrayLike, k: int) -> tuple[Array, Array]:
    if k > weights.shape[-1]:
        raise ValueError(f"top_k ({k}) exceeds the number of keys S={weights.shape[-1]}.")
    values, indices = jax.lax.top_k(weights, k)
    return values, indices.astype(jnp.int32)


def capture_reference_weights(
    spec: CaptureSpec,
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None,
    mask: ArrayLike | None,
    **visibility: Any,
) -> Array | tuple[Array, Array]:
    """Weights of the chosen heads by the reference kernel, one head at a time.

    One head at a time (a `lax.map`) keeps the transient memory at one `[B, T, S]`; with
    `top_k` only `[B, N', T, k]` is kept.

    Args:
      spec: heads and top-k.
      query: `[B, T, N, H]`; key, value: `[B, S, K, H]`.
      bias, mask: broadcastable to `[B, N, T, S]`.
      **visibility: the kernel's masking arguments (is_causal, lengths, causal_alignment, ...).

    Returns:
      `[B, N', T, S]` float32, or `(values, indices)` `[B, N', T, k]`.
    """
    N, K = query.shape[2], key.shape[2]
    heads = jnp.arange(N) if spec.heads is None else jnp.asarray(spec.heads)

    def take(x: ArrayLike | None, head: ArrayLike, axis: int) -> Array | None:
        if x is None or x.shape[axis] == 1:
            return x
        return jax.lax.dynamic_index_in_dim(x, head, axis)

    bias = None if bias is None else _rank4(bias)
    mask = None if mask is None else _rank4(mask)

    def one_head(head: ArrayLike):
        kv_head = head // (N // K)
        _, weights = dot_product_attention(
            take(query, head, 2), take(key, kv_head, 2), take(value, kv_head, 2),
            take(bias, head, 1), take(mask, head, 1), implementation="reference",
            return_weights=True, **visibility,
        )  # [B, 1, T, S]
        weights = weights[:, 0]  # [B, T, S]
        return weights if spec.top_k is None else _top_k(weights, spec.top_k)

    per_head = jax.lax.map(one_head, heads)  # [N', B, T, S|k]
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), per_head)


def _rank4(x: ArrayLike) -> Array:
    x = jnp.asarray(x)
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


class CapturedAttention(dict):
    """`{layer path: weights}` from `capture_attention`, plus `kinds`: `{layer path: kind}`.

    A pytree (so it can leave `jit`); `kinds` travels as static data.
    """

    def __init__(self, weights: dict[str, Any], kinds: dict[str, str]):
        super().__init__(weights)
        self.kinds = dict(kinds)


jax.tree_util.register_pytree_with_keys(
    CapturedAttention,
    lambda c: (
        tuple((jax.tree_util.DictKey(k), c[k]) for k in sorted(c)),
        (tuple(sorted(c)), tuple(sorted(c.kinds.items()))),
    ),
    lambda aux, children: CapturedAttention(dict(zip(aux[0], children, strict=True)), dict(aux[1])),
)


def attention_layers(model: nnx.Module) -> dict[str, Capturable]:
    """Every attention layer of `model`, keyed by its module path joined with '/'."""
    return {
        "/".join(str(p) for p in path): module
        for path, module in nnx.iter_modules(model)
        if isinstance(module, Capturable)
    }


def attention_kinds(model: nnx.Module) -> dict[str, str]:
    """`{layer path: 'self' | 'cross'}` for every attention layer of `model`."""
    return {path: layer.kind for path, layer in attention_layers(model).items()}


def capture_attention(
    model: nnx.Module | Callable[..., Any],
    *args: Any,
    layers: Sequence[str] | None = None,
    heads: Sequence[int] | None = None,
    top_k: int | None = None,
    **kwargs: Any,
) -> tuple[Any, CapturedAttention]:
    """Run `model(*args, **kwargs)` and return its output with the weights of its attention.

    The output is the same as without capture: the weights are recomputed beside it by the
    reference kernel (softmax before dropout), for every implementation.

    Args:
      model: an `nnx.Module`, or a bound method of one (e.g. `model.encode`).
      *args, **kwargs: passed to the call.
      layers: paths or `fnmatch` patterns (e.g. `'decoder/layers/*/cross_attention'`) of the
        layers to capture; None = all. A name that matches no layer is an error.
      heads: query-head indices to keep in every captured layer; None = all.
      top_k: keep only the `top_k` largest weights of each row and their key indices.

    Returns:
      `(output, captured)`. `captured[path]` is `[B, N', T, S]` float32, or with `top_k` a
      pair `(values [B, N', T, k] float32, indices [B, N', T, k] int32)`. Empty query rows
      (padding) are zeros. `captured.kinds[path]` is `'self'` or `'cross'`. A layer called
      more than once in the call has entries `path`, `path@1`, `path@2`, ...
    """
    root = model.__self__ if hasattr(model, "__self__") else model
    if not isinstance(root, nnx.Module):
        raise TypeError(
            f"model must be an nnx.Module or a bound method of one, got {type(model).__name__}."
        )
    found = attention_layers(root)
    chosen = _select_layers(found, layers)
    spec = CaptureSpec(heads=None if heads is None else tuple(int(h) for h in heads), top_k=top_k)
    _check_spec(spec, chosen)
    with temporarily("capture", ((layer, spec) for layer in chosen.values())):
        output, state = nnx.capture(model, AttentionWeights)(*args, **kwargs)
    weights, kinds = {}, {}
    for path, variable in nnx.to_flat_state(state):
        name = "/".join(str(p) for p in path[:-1])  # drop the sown name, 'weights'
        for i, value in enumerate(variable.get_value()):
            entry = name if i == 0 else f"{name}@{i}"
            weights[entry] = value
            kinds[entry] = found[name].kind
    return output, CapturedAttention(weights, kinds)


@contextlib.contextmanager
def temporarily(name: str, settings: Iterable[tuple[nnx.Module, Any]]) -> Iterator[None]:
    """Set attribute `name` of each `(layer, value)` pair for the block, then back to None."""
    settings = list(settings)
    for layer, value in settings:
        setattr(layer, name, value)
    try:
        yield
    finally:
        for layer, _ in settings:
            setattr(layer, name, None)


def _select_layers(
    found: dict[str, Capturable], layers: Sequence[str] | None
) -> dict[str, Capturable]:
    if layers is None:
        return found
    if isinstance(layers, str):
        layers = [layers]
    chosen = {}
    for pattern in layers:
        matches = [path for path in found if fnmatch.fnmatchcase(path, pattern)]
        if not matches:
            raise ValueError(
                f"layers: {pattern!r} matches no attention layer; the model has {sorted(found)}."
            )
        chosen.update({path: found[path] for path in matches})
    return chosen


def _check_spec(spec: CaptureSpec, chosen: dict[str, Capturable]) -> None:
    if spec.top_k is not None and (not isinstance(spec.top_k, int) or spec.top_k <= 0):
        raise ValueError(f"top_k must be a positive int, got {spec.top_k!r}.")
    if spec.heads is None:
        return
    for path, layer in chosen.items():
        bad = [h for h in spec.heads if not 0 <= h < layer.num_heads]
        if bad:
            raise ValueError(
                f"heads: {bad} out of range for layer {path!r} with num_heads={layer.num_heads}."
            )
