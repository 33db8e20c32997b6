"""Statistics of attention weights (see :mod:`flaxattn.analysis` for the conventions)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MarkedMass",
    "alignment_accuracy",
    "anti_diagonal_target",
    "attention_rollout",
    "head_entropy",
    "layer_head_stats",
    "marked_token_mass",
    "mean_attention_distance",
    "row_distributions",
    "sink_mass",
    "topk_compress",
    "topk_decompress",
    "valid_mask",
]


def _weights(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 4:
        raise ValueError(f"weights must be [B, N, T, S], got shape {w.shape}")
    return w


def valid_mask(shape, query_lengths=None, key_lengths=None, mask=None) -> np.ndarray:
    """Boolean ``[B, N|1, T, S]`` validity of each cell (True = valid)."""
    B, N, T, S = shape
    valid = np.ones((B, 1, T, S), dtype=bool)
    if query_lengths is not None:
        ql = np.asarray(query_lengths).reshape(-1)
        if ql.shape != (B,):
            raise ValueError(f"query_lengths must have shape [{B}], got {ql.shape}")
        valid &= (np.arange(T)[None, :] < ql[:, None])[:, None, :, None]
    if key_lengths is not None:
        kl = np.asarray(key_lengths).reshape(-1)
        if kl.shape != (B,):
            raise ValueError(f"key_lengths must have shape [{B}], got {kl.shape}")
        valid &= (np.arange(S)[None, :] < kl[:, None])[:, None, None, :]
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.ndim != 4:
            m = m.reshape((1,) * (4 - m.ndim) + m.shape)
        try:
            valid = valid & m
        except ValueError:
            raise ValueError(f"mask of shape {m.shape} does not broadcast to {shape}") from None
        if valid.shape[0] != B or valid.shape[2:] != (T, S):
            raise ValueError(f"mask of shape {m.shape} does not broadcast to {shape}")
    return valid


def row_distributions(weights, query_lengths=None, key_lengths=None, mask=None):
    """``(p, valid, rows)``: renormalised rows ``[B,N,T,S]``, cell and row validity."""
    w = _weights(weights)
    valid = valid_mask(w.shape, query_lengths, key_lengths, mask)
    w = np.where(valid, w, 0.0)
    mass = w.sum(-1, keepdims=True)
    rows = mass[..., 0] > 0  # [B, N, T]
    p = w / np.where(mass > 0, mass, 1.0)
    return p, np.broadcast_to(valid, w.shape), rows


def _reduce(values: np.ndarray, rows: np.ndarray, per_example: bool) -> np.ndarray:
    """Mean of ``values [B,N,T]`` over valid rows: ``[N]`` (or ``[B, N]``); NaN where none."""
    axes = (2,) if per_example else (0, 2)
    count = rows.sum(axis=axes)
    total = np.where(rows, values, 0.0).sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def head_entropy(
    weights,
    *,
    query_lengths=None,
    key_lengths=None,
    mask=None,
    unit: str = "nats",
    per_example: bool = False,
) -> np.ndarray:
    """Mean row entropy ``-sum_j p_ij log p_ij`` per head: ``[N]`` (``[B, N]`` per example).

    0 for a head that always looks at one key; ``log(n)`` for uniform attention over n keys.
    """
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit must be 'nats' or 'bits', got {unit!r}")
    p, _, rows = row_distributions(weights, query_lengths, key_lengths, mask)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    if unit == "bits":
        h = h / np.log(2.0)
    return _reduce(h, rows, per_example)


def _positions(offset, B: int, L: int) -> np.ndarray:
    off = np.broadcast_to(np.asarray(offset, dtype=np.float64).reshape(-1, 1), (B, 1))
    return off + np.arange(L)[None, :]  # [B, L]


def mean_attention_distance(
    weights,
    *,
    query_lengths=None,
    key_lengths=None,
    mask=None,
    query_offset=0,
    key_offset=0,
    per_example: bool = False,
) -> np.ndarray:
    """Mean ``sum_j p_ij |pos_q(i) - pos_k(j)|`` per head, in positions: ``[N]`` (or ``[B, N]``).

    Query ``i`` sits at ``query_offset + i`` and key ``j`` at ``key_offset + j`` (scalars or
    ``[B]``), e.g. ``query_offset = key_lengths - query_lengths`` for bottom-right alignment.
    """
    p, _, rows = row_distributions(weights, query_lengths, key_lengths, mask)
    B, _, T, S = p.shape
    qpos, kpos = _positions(query_offset, B, T), _positions(key_offset, B, S)
    dist = np.abs(qpos[:, :, None] - kpos[:, None, :])[:, None]  # [B, 1, T, S]
    return _reduce((p * dist).sum(-1), rows, per_example)


def sink_mass(
    weights,
    *,
    query_lengths=None,
    key_lengths=None,
    mask=None,
    sink_index: int = 0,
    per_example: bool = False,
) -> np.ndarray:
    """Mean attention on key ``sink_index`` (the first token by default) per head: ``[N]``."""
    p, _, rows = row_distributions(weights, query_lengths, key_lengths, mask)
    if not -p.shape[-1] <= sink_index < p.shape[-1]:
        raise ValueError(f"sink_index {sink_index} out of range for {p.shape[-1]} keys")
    return _reduce(p[..., sink_index], rows, per_example)


def layer_head_stats(
    layers: Mapping[str, np.ndarray],
    lengths: Mapping[str, tuple] | None = None,
    *,
    unit: str = "nats",
) -> dict[str, np.ndarray]:
    """Entropy, mean distance and sink mass per layer and head: each ``[L, max N]`` (NaN pad).

    ``lengths[path] = (query_lengths, key_lengths)`` gives the valid lengths of each layer.
    """
    names = list(layers)
    if not names:
        raise ValueError("layer_head_stats needs at least one layer")
    n_max = max(np.shape(layers[k])[1] for k in names)
    out = {k: np.full((len(names), n_max), np.nan) for k in ("entropy", "distance", "sink")}
    for i, name in enumerate(names):
        ql, kl = (lengths or {}).get(name, (None, None))
        kw = dict(query_lengths=ql, key_lengths=kl)
        w = layers[name]
        n = np.shape(w)[1]
        out["entropy"][i, :n] = head_entropy(w, unit=unit, **kw)
        out["distance"][i, :n] = mean_attention_distance(w, **kw)
        out["sink"][i, :n] = sink_mass(w, **kw)
    return out


def attention_rollout(
    layers: Sequence,
    *,
    head_reduce: str = "mean",
    residual: float = 0.5,
    return_all: bool = False,
) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020) through a stack of self-attention layers.

    ``layers``: ``[B, N, T, T]`` weights, bottom layer first. Each layer's heads are reduced
    (``head_reduce``), mixed with the residual stream ``A = (1 - residual) W + residual I``,
    rows renormalised, and the layers multiplied: ``R = A_L ... A_2 A_1``. ``R[b, i, j]`` is how
    much output position ``i`` of the top layer draws on input token ``j``. Returns ``[B, T, T]``,
    or ``[L, B, T, T]`` (the rollout up to each layer) with ``return_all``.
    """
    if not len(layers):
        raise ValueError("attention_rollout needs at least one layer")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1], got {residual}")
    reduce = {"mean": np.mean, "max": np.max, "min": np.min}.get(head_reduce)
    if reduce is None:
        raise ValueError(f"head_reduce must be 'mean', 'max' or 'min', got {head_reduce!r}")
    result, steps = None, []
    for index, layer in enumerate(layers):
        w = _weights(layer)
        if w.shape[-1] != w.shape[-2]:
            raise ValueError(
                f"rollout needs self-attention [B, N, T, T]; layer {index} is {w.shape}"
            )
        if result is not None and w.shape[-1] != result.shape[-1]:
            raise ValueError(f"layer {index} has length {w.shape[-1]}, not {result.shape[-1]}")
        a = (1.0 - residual) * reduce(w, axis=1) + residual * np.eye(w.shape[-1])
        a = a / np.where(a.sum(-1, keepdims=True) > 0, a.sum(-1, keepdims=True), 1.0)
        result = a if result is None else a @ result
        steps.append(result)
    return np.stack(steps) if return_all else result


@dataclass(frozen=True)
class MarkedMass:
    """Attention mass on marked tokens and what uniform attention would give.

    ``mass[n]``: mean (over examples and valid rows) of the weight head ``n`` puts on marked
    keys; ``baseline``: mean fraction of marked tokens among the valid keys, i.e. the mass of
    uniform attention. ``ratio = mass / baseline`` (> 1: attention prefers marked tokens).
    """

    mass: np.ndarray  # [N]
    baseline: float
    per_example_mass: np.ndarray  # [B, N]
    per_example_baseline: np.ndarray  # [B]

    @property
    def ratio(self) -> np.ndarray:
        return self.mass / self.baseline if self.baseline > 0 else np.full_like(self.mass, np.nan)

    @property
    def mean_mass(self) -> float:
        """The mass averaged over heads."""
        return float(np.nanmean(self.mass))


def marked_token_mass(
    weights, marked, *, query_lengths=None, key_lengths=None, mask=None
) -> MarkedMass:
    """Attention mass on marked keys (e.g. sentiment words) vs the uniform baseline.

    ``weights``: ``[B, N, T, S]``, or ``[B, S]`` for one pooling distribution per example.
    ``marked``: boolean ``[B, S]``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 2:
        w = w[:, None, None, :]
    w = _weights(w)
    m = np.asarray(marked, dtype=bool)
    if m.shape != (w.shape[0], w.shape[3]):
        raise ValueError(f"marked must be [B, S] = {(w.shape[0], w.shape[3])}, got {m.shape}")
    p, valid, rows = row_distributions(w, query_lengths, key_lengths, mask)
    per_example = _reduce((p * m[:, None, None, :]).sum(-1), rows, per_example=True)
    keys = valid.any(axis=(1, 2))  # [B, S]: keys valid for some row
    n_keys = keys.sum(-1)
    base = np.where(n_keys > 0, (keys & m).sum(-1) / np.maximum(n_keys, 1), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no valid row
        mass = np.nanmean(per_example, axis=0)
        baseline = float(np.nanmean(base)) if base.size else float("nan")
    return MarkedMass(mass, baseline, per_example, base)


def anti_diagonal_target(
    key_lengths,
    num_queries: int,
    *,
    query_start: int = 0,
    key_start: int = 0,
    key_trailing: int = 0,
) -> np.ndarray:
    """Target alignment ``[B, T]`` for a reversal task (-1 where there is none).

    Example ``b`` has ``L = key_lengths[b] - key_start - key_trailing`` content tokens
    (``key_start`` leading and ``key_trailing`` trailing specials such as BOS/EOS); query
    ``query_start + i`` should attend to key ``key_start + L - 1 - i`` for ``i < L``.
    """
    kl = np.asarray(key_lengths).reshape(-1)
    L = kl - key_start - key_trailing
    i = np.arange(num_queries)[None, :] - query_start
    target = key_start + L[:, None] - 1 - i
    return np.where((i >= 0) & (i < L[:, None]), target, -1).astype(np.int64)


def alignment_accuracy(
    weights,
    target,
    *,
    query_lengths=None,
    key_lengths=None,
    mask=None,
    heads: str | int = "mean",
):
    """Fraction of queries whose argmax key is the target key.

    ``target``: int ``[B, T]`` with the key index for each query (-1 = not scored), or boolean
    ``[B, T, S]`` marking the acceptable keys (a row with none is not scored). Invalid queries
    are not scored and the argmax runs over valid keys only. ``heads``: ``"mean"`` scores the
    head-averaged weights (a float), ``"each"`` every head (``[N]``), an int one head.
    """
    w = _weights(weights)
    B, N, T, S = w.shape
    valid = valid_mask(w.shape, query_lengths, key_lengths, mask)
    w = np.where(valid, w, -np.inf)
    if heads == "mean":
        w = np.where(np.isfinite(w), w, 0.0).mean(1, keepdims=True)
        w = np.where(valid.any(1, keepdims=True), w, -np.inf)
    elif isinstance(heads, (int, np.integer)) and not isinstance(heads, bool):
        if not -N <= heads < N:
            raise ValueError(f"head {heads} out of range for {N} heads")
        w, valid = w[:, [heads]], valid[:, [heads]] if valid.shape[1] > 1 else valid
    elif heads != "each":
        raise ValueError(f"heads must be 'mean', 'each' or a head index, got {heads!r}")
    t = np.asarray(target)
    if t.dtype == bool:
        if t.shape != (B, T, S):
            raise ValueError(f"a boolean target must be [B, T, S] = {(B, T, S)}, got {t.shape}")
        accept, scored = t, t.any(-1)
    else:
        if t.shape != (B, T):
            raise ValueError(f"an index target must be [B, T] = {(B, T)}, got {t.shape}")
        accept = t[..., None] == np.arange(S)
        scored = t >= 0
    rows = np.isfinite(w).any(-1)  # [B, n, T]
    scored = scored[:, None] & rows & valid.any(-1).any(1, keepdims=True)
    best = np.argmax(np.where(np.isfinite(w), w, -np.inf), axis=-1)  # [B, n, T]
    accept = np.broadcast_to(accept[:, None], (B, best.shape[1], T, S))
    hit = np.take_along_axis(accept, best[..., None], -1)
    hit = hit[..., 0] & scored
    count = scored.sum(axis=(0, 2))
    acc = np.where(count > 0, hit.sum(axis=(0, 2)) / np.maximum(count, 1), np.nan)
    return float(acc[0]) if heads != "each" else acc


def topk_compress(weights, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest weights of each row: ``(values, indices)``, each ``[..., k]``.

    Sorted by decreasing weight (ties by increasing key index); ``k`` is clamped to ``S``.
    Values keep the input dtype; indices are int32.
    """
    w = np.asarray(weights)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    S = w.shape[-1]
    k = min(int(k), S)
    if k < S:
        part = np.argpartition(-w, k - 1, axis=-1)[..., :k]
    else:
        part = np.broadcast_to(np.arange(S), w.shape)
    vals = np.take_along_axis(w, part, -1)
    order = np.lexsort((part, -vals), axis=-1)
    idx = np.take_along_axis(part, order, -1).astype(np.int32)
    return np.take_along_axis(w, idx, -1), idx


def topk_decompress(values, indices, num_keys: int) -> np.ndarray:
    """Dense ``[..., num_keys]`` weights from :func:`topk_compress` output (zeros elsewhere)."""
    values, indices = np.asarray(values), np.asarray(indices)
    if values.shape != indices.shape:
        raise ValueError(f"values {values.shape} and indices {indices.shape} differ in shape")
    if indices.size and (indices.min() < 0 or indices.max() >= num_keys):
        raise ValueError(f"top-k indices out of range for {num_keys} keys")
    dense = np.zeros(values.shape[:-1] + (num_keys,), dtype=values.dtype)
    np.put_along_axis(dense, indices.astype(np.int64), values, -1)
    return dense
