"""The float64 numpy reference every implementation is compared with, in row chunks.

Written from the formulas (not from flaxattn's kernels), top-left causal, `T = S` or not:

    P = softmax(scale · Q Kᵀ, causal mask)      O = P V
    dV = Pᵀ dO    dP = dO Vᵀ    dS = P ∘ (dP - rowsum(dO ∘ O))
    dQ = scale · dS K    dK = scale · dSᵀ Q

GQA is the grouped reshape `N = K·G`, so keys and values are not repeated. An optional
`visible(rows [r]) -> [r, S]` restricts each row to a pattern (a local window, a block
layout) on top of the causal mask; a row that sees nothing gives 0.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Visible = Callable[[np.ndarray], np.ndarray]

# Work on at most this many logits at a time (float64: 256 MiB per [B, N, rows, S] array).
CHUNK_ELEMENTS = 1 << 25


def _chunks(rows: np.ndarray, per_row: int):
    size = max(1, CHUNK_ELEMENTS // max(per_row, 1))
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _probabilities(q_rows, k, rows, scale, causal, pattern: Visible | None = None):
    """`P [B, K, G, r, S]` for the query rows `rows` (q_rows `[B, r, K, G, H]`)."""
    logits = np.einsum("brkgh,bskh->bkgrs", q_rows, k, optimize=True) * scale
    visible = np.ones((len(rows), k.shape[1]), bool)  # [r, S]
    if causal:
        visible &= np.arange(k.shape[1])[None, :] <= rows[:, None]
    if pattern is not None:
        visible &= pattern(rows)
    logits = np.where(visible, logits, -np.inf)
    top = logits.max(axis=-1, keepdims=True)
    p = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    total = p.sum(axis=-1, keepdims=True)
    return p / np.where(total > 0, total, 1.0)


def reference_forward(
    q, k, v, *, scale: float, causal: bool, rows=None, pattern: Visible | None = None
) -> np.ndarray:
    """Output rows `[B, r, N, Hv]` in float64 (all rows if `rows` is None)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    K = k.shape[2]
    rows = np.arange(T) if rows is None else np.asarray(rows)
    out = np.empty((B, len(rows), N, v.shape[-1]))
    grouped = q.reshape(B, T, K, N // K, H)
    done = 0
    for chunk in _chunks(rows, B * N * k.shape[1]):
        p = _probabilities(grouped[:, chunk], k, chunk, scale, causal, pattern)
        o = np.einsum("bkgrs,bskv->brkgv", p, v, optimize=True)
        out[:, done : done + len(chunk)] = o.reshape(B, len(chunk), N, -1)
        done += len(chunk)
    return out


def reference_gradients(
    q, k, v, d_out, *, scale: float, causal: bool, pattern: Visible | None = None
):
    """`(out, dq, dk, dv)` in float64 for the cotangent `d_out [B, T, N, Hv]`."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    B, T, N, H = q.shape
    K, Hv = k.shape[2], v.shape[-1]
    G = N // K
    grouped_q = q.reshape(B, T, K, G, H)
    grouped_do = d_out.reshape(B, T, K, G, Hv)
    out = np.empty((B, T, K, G, Hv))
    dq = np.empty_like(grouped_q)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    for chunk in _chunks(np.arange(T), B * N * k.shape[1]):
        q_c, do_c = grouped_q[:, chunk], grouped_do[:, chunk]
        p = _probabilities(q_c, k, chunk, scale, causal, pattern)  # [B, K, G, r, S]
        o = np.einsum("bkgrs,bskv->brkgv", p, v, optimize=True)
        out[:, chunk] = o
        dv += np.einsum("bkgrs,brkgv->bskv", p, do_c, optimize=True)
        dp = np.einsum("brkgv,bskv->bkgrs", do_c, v, optimize=True)
        delta = np.einsum("brkgv,brkgv->bkgr", do_c, o, optimize=True)
        ds = p * (dp - delta[..., None])
        dq[:, chunk] = scale * np.einsum("bkgrs,bskh->brkgh", ds, k, optimize=True)
        dk += scale * np.einsum("bkgrs,brkgh->bskh", ds, q_c, optimize=True)
    return out.reshape(B, T, N, Hv), dq.reshape(B, T, N, H), dk, dv
