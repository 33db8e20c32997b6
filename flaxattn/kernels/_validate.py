"""Input checks for the public entry points: clear errors at trace time, naming the argument."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jaxtyping import ArrayLike


class Dims(NamedTuple):
    """The named sizes of a batched attention call (see the axis alphabet in `flaxattn`)."""

    B: int
    T: int
    S: int
    N: int
    K: int
    H: int
    Hv: int


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Raise ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")


def check_arrays(**arrays: object) -> None:
    """Raise TypeError unless each keyword argument is an array (has a shape and a dtype)."""
    for name, x in arrays.items():
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}.")


def check_static(name: str, value: object, kind: str) -> None:
    """Raise TypeError if `value` is traced: it decides the program's structure, not its data."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static Python {kind}, not a traced value (mark it static or close "
            f"over it instead of passing it through jax.jit), got {value}."
        )


def check_scale(scale: object, head_dim: int) -> float | Array:
    """The logit scale: `1 / sqrt(head_dim)` by default, a float, or (as in jax.nn) a traced
    scalar."""
    if scale is None:
        return 1.0 / (head_dim**0.5)
    if isinstance(scale, jax.core.Tracer):
        if scale.shape != ():
            raise ValueError(f"scale must be a scalar, got shape {tuple(scale.shape)}.")
        return scale
    try:
        return float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a number, got {scale!r}.") from None


def check_qkv(
    query: ArrayLike, key: ArrayLike, value: ArrayLike, *, same_head_dim: bool = True
) -> Dims:
    """Check `query [B, T, N, H]`, `key [B, S, K, H]`, `value [B, S, K, Hv]` (rank 4)."""
    check_arrays(query=query, key=key, value=value)
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, length, heads, head_dim] (or rank 3 without "
                f"batch), got shape {tuple(x.shape)}."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}.")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            "query, key and value must have one dtype, got "
            f"{query.dtype}, {key.dtype} and {value.dtype}."
        )
    B, T, N, H = query.shape
    _, S, K, Hk = key.shape
    if key.shape[0] != B:
        raise ValueError(f"key batch size must equal query's ({B}), got key shape {key.shape}.")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"value must have key's [batch, length, heads] = {tuple(key.shape[:3])}, got value "
            f"shape {tuple(value.shape)}."
        )
    if same_head_dim and Hk != H:
        raise ValueError(
            f"key head_dim must equal query head_dim ({H}), got key shape {tuple(key.shape)}."
        )
    if H == 0 or Hk == 0:
        raise ValueError(
            f"head_dim must be at least 1, got query shape {tuple(query.shape)} and key shape "
            f"{tuple(key.shape)}."
        )
    if K == 0 or N % K != 0:
        raise ValueError(
            f"key heads ({K}) must divide query heads ({N}) for grouped-query attention; got "
            f"query shape {tuple(query.shape)} and key shape {tuple(key.shape)}."
        )
    return Dims(B, T, S, N, K, H, value.shape[3])


def check_broadcastable(
    name: str, x: ArrayLike | None, dims: Dims, *, boolean: bool
) -> Array | None:
    """Check that `x` broadcasts to `[B, N, T, S]` and return it as rank 4.

    Each axis must be 1 or the full size (missing leading axes count as 1), so nothing
    broadcasts by accident.
    """
    if x is None:
        return None
    x = jnp.asarray(x)
    target = (dims.B, dims.N, dims.T, dims.S)
    if boolean and x.dtype != jnp.bool_:
        raise TypeError(
            f"{name} must be boolean (True = attend); pass an additive mask as bias. Got dtype "
            f"{x.dtype}."
        )
    if not boolean and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}.")
    shape = (1,) * (4 - x.ndim) + tuple(x.shape)
    if x.ndim > 4 or any(s not in (1, t) for s, t in zip(shape, target, strict=False)):
        raise ValueError(
            f"{name} must be broadcastable to [B, N, T, S] = {list(target)} (each axis 1 or full), "
            f"got shape {tuple(x.shape)}."
        )
    return x.reshape(shape)


def check_lengths(name: str, x: ArrayLike | None, batch: int) -> Array | None:
    """Check a `[B]` integer array of sequence lengths."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.shape != (batch,):
        raise ValueError(f"{name} must have shape [B] = [{batch}], got shape {tuple(x.shape)}.")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}.")
    return x.astype(jnp.int32)


def check_window(local_window_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """Normalise `local_window_size` to `(left, right)` non-negative ints."""
    if local_window_size is None:
        return None
    window = local_window_size
    if isinstance(window, (int, np.integer)):
        window = (int(window), int(window))
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or not all(isinstance(w, (int, np.integer)) and w >= 0 for w in window)
    ):
        raise ValueError(
            "local_window_size must be a non-negative int or a (left, right) pair of them, got "
            f"{local_window_size!r}."
        )
    return int(window[0]), int(window[1])


def check_dropout(rate: float, key: ArrayLike | None) -> None:
    """Check the dropout rate (a static number in [0, 1)) and that a single PRNG key comes
    with it (`jax.random.key(...)`, or a legacy `jax.random.PRNGKey(...)` uint32 array)."""
    check_static("dropout_rate", rate, "float")
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise TypeError(f"dropout_rate must be a number, got {rate!r}.") from None
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {rate}.")
    if rate > 0.0 and key is None:
        raise ValueError(f"dropout_rate={rate} needs an explicit PRNG key in dropout_key.")
    if rate > 0.0:
        dtype = getattr(key, "dtype", None)
        shape = tuple(getattr(key, "shape", ()))
        typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
        legacy = dtype == jnp.uint32 and len(shape) == 1
        if not (typed or legacy):
            raise TypeError(
                "dropout_key must be one PRNG key, jax.random.key(seed) (shape ()) or "
                f"jax.random.PRNGKey(seed); got {type(key).__name__} with dtype {dtype} and "
                f"shape {shape}."
            )
