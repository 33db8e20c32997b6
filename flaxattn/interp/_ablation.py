"""Head ablation sweeps: a metric with each head's output zeroed or replaced by its mean.

All `L * N` ablations run as one jitted program: the replaced head is a one-hot `[L, N]`
selector, and `jax.lax.map` (vmapped in chunks of `chunk`) runs the model once per selector,
so there is one compilation, not `L * N`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array
from jaxtyping import Float

from flaxattn.interp._hooks import as_function, head_layers, hooked, num_heads, record_heads

Metric = Callable[[nnx.Module, Any], Array]  # (model, batch) -> scalar
ABLATIONS = ("zero", "mean")


def replace_heads(
    selected: Float[Array, " N"], replacement: Array
) -> Callable[[Array, Any], Array]:
    """A head hook: output of the heads where `selected` > 0 replaced by `replacement`.

    `replacement` broadcasts to `[B, T, N, H]` (e.g. `[N, H]`, a mean per head, or `[B, T, N,
    H]`, another run's output); the other heads keep their output.
    """

    def hook(out: Array, call: Any) -> Array:
        chosen = (selected > 0)[None, None, :, None]  # [1, 1, N, 1]
        return jnp.where(chosen, jnp.broadcast_to(replacement, out.shape), out)

    return hook


def head_selectors(L: int, N: int) -> Float[Array, "LN L N"]:
    """`[L * N, L, N]`: one-hot selectors, head `(l, n)` at row `l * N + n`."""
    return jnp.eye(L * N, dtype=jnp.float32).reshape(L * N, L, N)


def sweep_heads(
    model: nnx.Module,
    metric: Metric,
    batch: Any,
    replacements: dict[str, Array],
    *,
    chunk: int | None = None,
) -> np.ndarray:
    """The metric with each head `(l, n)` of `replacements`' layers replaced in turn: `[L, N]`.

    Args:
      model: the model.
      metric: `metric(model, batch)`, a scalar (traced under jit).
      batch: any pytree of arrays the metric takes.
      replacements: `{layer path: array broadcastable to [B, T, N, H]}`, rows in that order.
      chunk: selectors evaluated at once (None: all `L * N` vmapped together).

    Returns:
      `[L, N]` float64.
    """
    paths = list(replacements)
    N = num_heads(head_layers(model, paths))
    L = len(paths)
    rebuild, state = as_function(model)

    def one(state, batch, replacements, selector):  # selector [L, N]
        m = rebuild(state)
        hooks = {p: replace_heads(selector[i], replacements[p]) for i, p in enumerate(paths)}
        with hooked(m, hooks):
            return jnp.asarray(metric(m, batch), jnp.float32)

    @jax.jit
    def sweep(state, batch, replacements):
        return jax.lax.map(lambda s: one(state, batch, replacements, s), head_selectors(L, N),
                           batch_size=chunk or L * N)

    return np.asarray(sweep(state, batch, replacements), np.float64).reshape(L, N)


def mean_head_outputs(
    model: nnx.Module, metric: Metric, reference: Any, layers: Sequence[str] | str | None = None
) -> dict[str, Float[Array, "N H"]]:
    """Each head's output `[N, H]` averaged over the examples and positions of `reference`."""
    rebuild, state = as_function(model)

    @jax.jit
    def outputs(state, reference):
        return record_heads(rebuild(state), metric, reference, layers=layers)[1]

    return {p: o.mean(axis=(0, 1)) for p, o in outputs(state, reference).items()}


def ablate_heads(
    model: nnx.Module,
    metric: Metric,
    batch: Any,
    *,
    kind: str = "zero",
    reference: Any = None,
    layers: Sequence[str] | str | None = None,
    chunk: int | None = None,
) -> np.ndarray:
    """The metric with each head ablated in turn, as an `[L, N]` table.

    Zero ablation sets the head's output (before the output projection) to 0; mean ablation
    sets it to its mean over the examples and positions of `reference` (default `batch`),
    which keeps the layer's typical output and removes only what depends on the input.

    Args:
      model: the model.
      metric: `metric(model, batch)` -> scalar (e.g. a loss), traced under jit.
      batch: the input of the metric.
      kind: `'zero'` or `'mean'`.
      reference: the batch the means are taken over (mean ablation; default `batch`).
      layers: paths or patterns of the layers (rows, in model order); None = all.
      chunk: ablations run at once (None: all).

    Returns:
      `[L, N]` float64: the metric with head `(l, n)` ablated.
    """
    if kind not in ABLATIONS:
        raise ValueError(f"kind must be one of {ABLATIONS}, got {kind!r}.")
    if chunk is not None and (not isinstance(chunk, int) or chunk <= 0):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}.")
    paths = list(head_layers(model, layers))
    if kind == "zero":
        replacements = {p: jnp.zeros((), jnp.float32) for p in paths}
    else:
        replacements = mean_head_outputs(model, metric, batch if reference is None else reference,
                                         paths)
    return sweep_heads(model, metric, batch, replacements, chunk=chunk)


def ablate_together(
    model: nnx.Module,
    metric: Metric,
    batch: Any,
    heads: Mapping[str, Sequence[int]],
    *,
    kind: str = "zero",
    reference: Any = None,
) -> float:
    """The metric with a group of heads ablated at once (e.g. every induction head).

    Args:
      model, metric, batch, kind, reference: as in `ablate_heads`.
      heads: `{layer path: [head, ...]}`, the heads to ablate together.

    Returns:
      The metric, a float.
    """
    if kind not in ABLATIONS:
        raise ValueError(f"kind must be one of {ABLATIONS}, got {kind!r}.")
    layers = head_layers(model, list(heads))
    N = num_heads(layers)
    bad = {p: list(h) for p, h in heads.items() if any(not 0 <= i < N for i in h)}
    if bad:
        raise ValueError(f"heads: {bad} out of range for num_heads={N}.")
    if kind == "zero":
        replacements = {p: jnp.zeros((), jnp.float32) for p in heads}
    else:
        replacements = mean_head_outputs(model, metric, batch if reference is None else reference,
                                         list(heads))
    selectors = {p: jnp.zeros(N, jnp.float32).at[jnp.asarray(list(h), jnp.int32)].set(1.0)
                 for p, h in heads.items()}
    rebuild, state = as_function(model)

    @jax.jit
    def run(state, batch, replacements, selectors):
        m = rebuild(state)
        with hooked(m, {p: replace_heads(selectors[p], replacements[p]) for p in heads}):
            return jnp.asarray(metric(m, batch), jnp.float32)

    return float(run(state, batch, replacements, selectors))
