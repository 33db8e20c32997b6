"""Hooks on the attention kernel of a model's layers, to read or replace each head's output.

`MultiHeadAttention` calls `self.attention(q, k, v, bias, mask, **visibility)` for the
attention itself (`[B, T, N, H]`, before the output projection). `hooked` swaps that attribute
for a wrapper for the duration of a `with` block (as `flaxattn.nn.capture_attention` sets its
capture spec), so a hook sees every head's output and the call that made it, and may return
another output. No model code changes, and parameters are never touched.

Glossary of shapes: B batch, T query length, S key length, N query heads, K key/value heads,
H head dim, L attention layers (rows of the `[L, N]` tables).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax import Array
from jaxtyping import Float

from flaxattn.kernels import dot_product_attention
from flaxattn.nn import MultiHeadAttention, attention_layers
from flaxattn.nn._capture import CaptureSpec, capture_reference_weights

_NOT_VISIBILITY = ("dropout_rate", "dropout_key", "implementation")


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """The arguments of one attention-kernel call: q `[B, T, N, H]`, k, v `[B, S, K, H]`."""

    query: Array
    key: Array
    value: Array
    bias: Array | None
    mask: Array | None
    kwargs: Mapping[str, Any]

    def weights(self) -> Float[Array, "B N T S"]:
        """The call's attention weights `[B, N, T, S]` (reference kernel, float32, no dropout)."""
        visibility = {k: v for k, v in self.kwargs.items() if k not in _NOT_VISIBILITY}
        return capture_reference_weights(CaptureSpec(), self.query, self.key, self.value,
                                         self.bias, self.mask, **visibility)

    def output_from(self, weights: Float[Array, "B N T S"]) -> Float[Array, "B T N H"]:
        """The output `[B, T, N, H]` these heads would give with attention `weights`."""
        N, K = self.query.shape[2], self.value.shape[2]
        value = jnp.repeat(self.value, N // K, axis=2)  # [B, S, N, H]: GQA groups
        return jnp.einsum("BNTS,BSNH->BTNH", weights, value.astype(jnp.float32)).astype(
            self.query.dtype
        )


HeadHook = Callable[[Array, KernelCall], Array]  # (output [B, T, N, H], call) -> output


def _model_order(path: str) -> tuple:
    """Encoder before decoder, layer numbers as numbers, self- before cross-attention."""
    parts = path.split("/")
    numbers = tuple(int(p) for p in parts if re.fullmatch(r"\d+", p))
    return (0 if parts[0].startswith("encoder") else 1, numbers, "cross" in parts[-1], path)


def head_layers(
    model: nnx.Module, layers: Sequence[str] | str | None = None
) -> dict[str, MultiHeadAttention]:
    """The `MultiHeadAttention` layers of `model` in model order: the rows of `[L, N]` tables.

    Args:
      model: the model.
      layers: paths or `fnmatch` patterns (e.g. `'decoder/layers/*/cross_attention'`); None = all.

    Returns:
      `{path: layer}`, encoder first, then by layer number, self- before cross-attention.
    """
    found = {p: m for p, m in attention_layers(model).items() if isinstance(m, MultiHeadAttention)}
    if not found:
        raise ValueError(f"model: {type(model).__name__} has no MultiHeadAttention layer.")
    chosen = found
    if layers is not None:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        chosen = {}
        for pattern in patterns:
            matches = [p for p in found if fnmatch.fnmatchcase(p, pattern)]
            if not matches:
                raise ValueError(f"layers: {pattern!r} matches no attention layer; the model has "
                                 f"{sorted(found)}.")
            chosen.update({p: found[p] for p in matches})
    return {p: chosen[p] for p in sorted(chosen, key=_model_order)}


def num_heads(layers: Mapping[str, MultiHeadAttention]) -> int:
    """N, the heads of every layer (a ValueError if the layers differ: no `[L, N]` table)."""
    counts = {p: m.num_heads for p, m in layers.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"layers: every layer needs the same number of heads for an [L, N] "
                         f"table, got {counts}.")
    return next(iter(counts.values()))


def _kernel(attention: str | Callable | None) -> Callable[..., Array]:
    """The kernel callable a `MultiHeadAttention` with this `attention` setting calls."""
    if attention is None:
        return dot_product_attention
    if isinstance(attention, str):
        return functools.partial(dot_product_attention, implementation=attention)
    return attention


def _wrap(kernel: Callable[..., Array], hook: HeadHook) -> Callable[..., Array]:
    def hooked_kernel(query, key, value, bias=None, mask=None, **kwargs):
        out = kernel(query, key, value, bias, mask, **kwargs)  # [B, T, N, H]
        new = hook(out, KernelCall(query, key, value, bias, mask, kwargs))
        if new.shape != out.shape:
            raise ValueError(f"a head hook must return the output's shape {out.shape}, "
                             f"got {new.shape}.")
        return new.astype(out.dtype)

    return hooked_kernel


@contextlib.contextmanager
def hooked(model: nnx.Module, hooks: Mapping[str, HeadHook]) -> Iterator[nnx.Module]:
    """Within the block, layer `path`'s attention output passes through `hooks[path]`.

        with hooked(model, {"decoder/layers/0/self_attention": lambda out, call: 0 * out}):
            logits = model(tokens)        # layer 0's heads contribute only the out bias

    Args:
      model: the model (typically merged inside a jitted function).
      hooks: `{layer path: hook}`; a hook takes the kernel's output `[B, T, N, H]` and the
        `KernelCall` (with `.weights()`), and returns the output to use, of the same shape.

    The layers' `attention` attributes are restored on exit, also after an error.
    """
    layers = head_layers(model)
    unknown = sorted(set(hooks) - set(layers))
    if unknown:
        raise ValueError(f"hooks: {unknown} are not MultiHeadAttention layers of the model; "
                         f"those are {sorted(layers)}.")
    originals = {path: layers[path].attention for path in hooks}
    try:
        for path, hook in hooks.items():
            layers[path].attention = _wrap(_kernel(originals[path]), hook)
        yield model
    finally:
        for path, original in originals.items():
            layers[path].attention = original


def record_heads(
    model: nnx.Module,
    fn: Callable[..., Any],
    *args: Any,
    layers: Sequence[str] | str | None = None,
    weights: bool = False,
) -> tuple[Any, dict[str, Array]]:
    """Run `fn(model, *args)` and return its result with each layer's per-head output.

    Args:
      model: the model.
      fn: a function of the model and `args` (e.g. a loss).
      layers: paths or patterns of the layers to record (None = all).
      weights: record the attention weights `[B, N, T, S]` instead of the outputs.

    Returns:
      `(fn's result, {path: [B, T, N, H]})` (or `[B, N, T, S]` with `weights`). A layer called
      more than once keeps its last call.
    """
    seen: dict[str, Array] = {}

    def keep(path: str) -> HeadHook:
        def hook(out: Array, call: KernelCall) -> Array:
            seen[path] = call.weights() if weights else out
            return out

        return hook

    paths = head_layers(model, layers)
    with hooked(model, {p: keep(p) for p in paths}):
        result = fn(model, *args)
    missing = sorted(set(paths) - set(seen))
    if missing:
        raise ValueError(f"fn did not call the attention layers {missing}.")
    return result, {p: seen[p] for p in paths}


def as_function(model: nnx.Module) -> tuple[Callable[[nnx.State], nnx.Module], nnx.State]:
    """`(rebuild, state)`: `rebuild(state)` is a fresh copy of `model`, for use inside `jit`."""
    graphdef, state = nnx.split(model)
    return (lambda s: nnx.merge(graphdef, s, copy=True)), state
