"""The one validator: every public entry point turns its arguments into a `Call` here.

`prepare(query, key, value, bias, mask, **keywords)` checks everything once, at trace time, and
returns a `Call`: the rank-4 operands, the named sizes, the static mask structure, the length
arrays, the scale, the modifiers and dropout. Implementations receive a `Call` and never check
their inputs again; `finish(call, result)` assembles what the caller asked for. Entry points
that take `dot_product_attention`'s keywords (`ring_attention`, the ring `attention_fn`, the
efficient variants) pass them through `**keywords` instead of spelling them out again.

Unbatched inputs (`[T, N, H]`) get a batch axis of 1 here and lose it in `finish`: the only
place where rank 3 is handled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike

from flaxattn.kernels import _validate as V
from flaxattn.kernels._single_head import MaskMod, ScoreMod
from flaxattn.kernels._visibility import CAUSAL_ALIGNMENTS, Visibility

# The keyword arguments of `dot_product_attention` after `query, key, value, bias, mask`,
# with their defaults: the one list every entry point that shares the convention accepts.
KEYWORDS: Mapping[str, Any] = {
    "scale": None,
    "is_causal": False,
    "query_seq_lengths": None,
    "key_value_seq_lengths": None,
    "local_window_size": None,
    "implementation": None,
    "return_residual": False,
    "causal_alignment": "top_left",
    "score_mod": None,
    "mask_mod": None,
    "dropout_rate": 0.0,
    "dropout_key": None,
    "return_weights": False,
    "block_sizes": None,
}


@dataclasses.dataclass(frozen=True, eq=False)
class Call:
    """One validated attention call.

    Attributes:
      query: `[B, T, N, H]`.
      key: `[B, S, K, H]`, `K` divides `N`.
      value: `[B, S, K, Hv]`.
      bias: rank 4, each axis 1 or full (broadcastable to `[B, N, T, S]`), or None.
      mask: booleans, same broadcasting, True = attend, or None.
      dims: the named sizes.
      visibility: causal / window / alignment (static) and the `[B]` length arrays.
      scale: the logit multiplier, a float or a traced scalar.
      score_mod: `(score, q_idx, kv_idx) -> score`, or None.
      mask_mod: `(q_idx, kv_idx) -> bool`, or None.
      dropout_rate: a float in [0, 1).
      dropout_key: the PRNG key when `dropout_rate > 0`.
      implementation: the name asked for, or None for `choose_implementation`'s rule.
      return_residual: the caller wants the logsumexp `[B, T, N]` too.
      return_weights: the caller wants the weights `[B, N, T, S]` too.
      block_sizes: `(block_q, block_k)` for the tiled implementations (a tuning hint: the
        others have no blocks and ignore it), or None.
      unbatched: the inputs came without a batch axis; `finish` removes it again.
    """

    query: ArrayLike
    key: ArrayLike
    value: ArrayLike
    bias: ArrayLike | None
    mask: ArrayLike | None
    dims: V.Dims
    visibility: Visibility
    scale: float | Array
    score_mod: ScoreMod | None = None
    mask_mod: MaskMod | None = None
    dropout_rate: float = 0.0
    dropout_key: ArrayLike | None = None
    implementation: Any = None
    return_residual: bool = False
    return_weights: bool = False
    block_sizes: tuple[int, int] | None = None
    unbatched: bool = False

    def uses(self, feature: str) -> bool:
        """Whether this call needs `feature` (a key of `flaxattn.kernels._registry.FEATURES`)."""
        return _USES[feature](self)

    def replace(self, **changes: Any) -> Call:
        """A copy with some attributes changed."""
        return dataclasses.replace(self, **changes)


def _closes_over_arrays(call: Call) -> bool:
    """Whether score_mod or mask_mod captures arrays (traced once here, on tiny inputs)."""
    for fn, n_scores in ((call.score_mod, 1), (call.mask_mod, 0)):
        if fn is None:
            continue
        shapes = [jax.ShapeDtypeStruct((2, 2), jnp.float32)] * n_scores
        shapes += [jax.ShapeDtypeStruct((2, 2), jnp.int32)] * 2
        if jax.make_jaxpr(fn)(*shapes).consts:
            return True
    return False


_USES: dict[str, Callable[[Call], bool]] = {
    "bias": lambda c: c.bias is not None,
    "mask": lambda c: c.mask is not None,
    "causal": lambda c: c.visibility.is_causal,
    "bottom_right": lambda c: c.visibility.causal_alignment == "bottom_right",
    "window": lambda c: c.visibility.window is not None,
    "lengths": lambda c: c.visibility.q_lengths is not None or c.visibility.kv_lengths is not None,
    "gqa": lambda c: c.dims.K < c.dims.N,
    "value_head_dim": lambda c: c.dims.Hv != c.dims.H,
    "score_mod": lambda c: c.score_mod is not None,
    "mask_mod": lambda c: c.mask_mod is not None,
    "mod_arrays": _closes_over_arrays,
    "dropout": lambda c: c.dropout_rate > 0.0,
    "weights": lambda c: c.return_weights,
    "residual": lambda c: c.return_residual,
    "traced_scale": lambda c: isinstance(c.scale, jax.core.Tracer),
}


class Result(NamedTuple):
    """What an implementation returns for a `Call` (None where it has nothing to give).

    Attributes:
      out: `[B, T, N, Hv]` in the input dtype.
      lse: `[B, N, T]` float32 logsumexp (-inf for an empty row), or None.
      weights: `[B, N, T, S]` float32, or None.
    """

    out: ArrayLike
    lse: ArrayLike | None = None
    weights: ArrayLike | None = None


def _check_keywords(caller: str, keywords: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(keywords) - set(KEYWORDS))
    if unknown:
        raise TypeError(
            f"{caller}() got an unexpected keyword argument {unknown[0]!r}; it takes "
            f"{', '.join(KEYWORDS)}."
        )
    return {**KEYWORDS, **keywords}


def _check_block_sizes(block_sizes: Any) -> tuple[int, int] | None:
    if block_sizes is None:
        return None
    if (
        not isinstance(block_sizes, (tuple, list))
        or len(block_sizes) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block_sizes)
    ):
        raise ValueError(
            f"block_sizes must be a (block_q, block_k) pair of positive ints, got {block_sizes!r}."
        )
    return int(block_sizes[0]), int(block_sizes[1])


def prepare(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    caller: str = "dot_product_attention",
    same_head_dim: bool = True,
    **keywords: Any,
) -> Call:
    """Check a call's arguments and return its `Call` (a `ValueError` / `TypeError` naming the
    argument, with the expected and the given value, for anything wrong).

    Args:
      query: `[B, T, N, H]`, or `[T, N, H]` without batch (then key and value too).
      key: `[B, S, K, H]`.
      value: `[B, S, K, Hv]`.
      bias: broadcastable to `[B, N, T, S]` (each axis 1 or full), or None.
      mask: booleans, same broadcasting, or None.
      caller: the public function's name, for error messages.
      same_head_dim: key and query must share `H` (False for score functions that map
        between head dims).
      **keywords: any of `KEYWORDS` (the keyword arguments of `dot_product_attention`).

    Returns:
      The `Call`.
    """
    kw = _check_keywords(caller, keywords)
    V.check_arrays(query=query, key=key, value=value)
    if not query.ndim == key.ndim == value.ndim:
        raise ValueError(
            "query, key and value must all have rank 4 [batch, length, heads, head_dim] or all "
            f"rank 3 (unbatched), got shapes {tuple(query.shape)}, {tuple(key.shape)} and "
            f"{tuple(value.shape)}."
        )
    unbatched = query.ndim == 3
    if unbatched:
        # Bias and mask keep their shapes: like any rank < 4 mask they broadcast from the right
        # against [1, N, T, S], and a rank-4 one (as jax.nn takes) stays as it is.
        query, key, value = query[None], key[None], value[None]
    dims = V.check_qkv(query, key, value, same_head_dim=same_head_dim)
    V.check_choice("causal_alignment", kw["causal_alignment"], CAUSAL_ALIGNMENTS)
    V.check_static("is_causal", kw["is_causal"], "bool")
    V.check_dropout(kw["dropout_rate"], kw["dropout_key"])
    for name in ("return_residual", "return_weights"):
        V.check_static(name, kw[name], "bool")
    visibility = Visibility(
        is_causal=bool(kw["is_causal"]),
        window=V.check_window(kw["local_window_size"]),
        q_lengths=V.check_lengths("query_seq_lengths", kw["query_seq_lengths"], dims.B),
        kv_lengths=V.check_lengths("key_value_seq_lengths", kw["key_value_seq_lengths"], dims.B),
        causal_alignment=kw["causal_alignment"],
    )
    for name in ("score_mod", "mask_mod"):
        if kw[name] is not None and not callable(kw[name]):
            raise TypeError(f"{name} must be a function, got {type(kw[name]).__name__}.")
    return Call(
        query=query,
        key=key,
        value=value,
        bias=V.check_broadcastable("bias", bias, dims, boolean=False),
        mask=V.check_broadcastable("mask", mask, dims, boolean=True),
        dims=dims,
        visibility=visibility,
        scale=V.check_scale(kw["scale"], dims.H),
        score_mod=kw["score_mod"],
        mask_mod=kw["mask_mod"],
        dropout_rate=float(kw["dropout_rate"]),
        dropout_key=kw["dropout_key"],
        implementation=kw["implementation"],
        return_residual=bool(kw["return_residual"]),
        return_weights=bool(kw["return_weights"]),
        block_sizes=_check_block_sizes(kw["block_sizes"]),
        unbatched=unbatched,
    )


def finish(call: Call, result: Result) -> Array | tuple[Array, ...]:
    """The caller's return value: `out`, then the residual `[B, T, N]` and the weights
    `[B, N, T, S]` if asked for, without the batch axis for unbatched inputs."""
    results = (result.out,)
    if call.return_residual:
        results += (jnp.swapaxes(result.lse, 1, 2).astype(call.query.dtype),)
    if call.return_weights:
        results += (result.weights,)
    if call.unbatched:
        results = tuple(x[0] for x in results)
    return results[0] if len(results) == 1 else results
