"""Testing utilities: one float64 reference of attention and the conformance cases.

`reference` is written from the formulas, independently of flaxattn's kernels (its masks are
built from index arithmetic of its own, not from `Visibility` or the block plan), in float64
numpy, in chunks of query rows so that long sequences fit in memory:

    s = scale · q kᵀ + bias → score_mod;   P = softmax(s) over the visible keys;   O = P V
    dV = Pᵀ dO    dP = dO Vᵀ    dS = P ∘ (dP - rowsum(dO ∘ O) + dlse)    (through score_mod)
    dQ = scale · dS K    dK = scale · dSᵀ Q    dbias = dS (summed over broadcast axes)

A query row with no visible key gives output 0, logsumexp -inf and gradients 0. GQA is the
grouped reshape `N = K·G` (query head `n` uses kv head `n // G`). `score_mod` and `mask_mod`
are the user's JAX functions, evaluated here on float64 index grids (under
`jax.enable_x64`), so the reference needs no knowledge of what they compute.

The tests (`tests/test_conformance.py`) and the benchmarks (`flaxattn.bench`) compare every
implementation with it; `CASES` are the problems the conformance suite runs on each registered
implementation, and `TOLERANCES` the agreement expected per input dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Agreement with the float64 reference, per input dtype: float32 results differ by float32
# rounding; bf16 / fp16 ones by the rounding of the inputs (8- and 11-bit mantissas) and of
# the 16-bit products, on outputs of magnitude ~1.
TOLERANCES = {
    "float32": dict(atol=2e-5, rtol=2e-5),
    "bfloat16": dict(atol=3e-2, rtol=3e-2),
    "float16": dict(atol=4e-3, rtol=4e-3),
}
# Gradients sum over more terms than outputs: a wider margin per dtype.
GRAD_TOLERANCES = {
    "float32": dict(atol=1e-4, rtol=1e-4),
    "bfloat16": dict(atol=1.5e-1, rtol=1e-1),
    "float16": dict(atol=3e-2, rtol=2e-2),
}
# Work on at most this many logits at a time (float64: 256 MiB per array).
CHUNK_ELEMENTS = 1 << 25

Visible = Callable[[np.ndarray], np.ndarray]


class Reference(NamedTuple):
    """The reference's results, float64 numpy.

    Attributes:
      out: `[B, r, N, Hv]` for the rows asked for (all by default).
      lse: `[B, N, r]`, -inf for a row with nothing visible.
      weights: `[B, N, r, S]`, or None unless asked for.
      grads: `(dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, Hv], dbias | None)` for the
        cotangent given, or None.
    """

    out: np.ndarray
    lse: np.ndarray
    weights: np.ndarray | None
    grads: tuple[np.ndarray, ...] | None


def visibility(
    B: int,
    T: int,
    S: int,
    *,
    is_causal: bool = False,
    window: int | tuple[int, int] | None = None,
    q_lengths: Any = None,
    kv_lengths: Any = None,
    causal_alignment: str = "top_left",
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Dense `[B, r, S]` visibility of query `rows` (all by default).

    Query `i` of example `b` sits at key position `p = i` (top-left) or
    `p = kv_len - q_len + i` (bottom-right). It sees key `j` iff `i < q_len`, `j < kv_len`,
    `j <= p` when causal and `p - left <= j <= p + right` with a window.
    """
    rows = np.arange(T) if rows is None else np.asarray(rows)
    q_len = np.full(B, T) if q_lengths is None else np.asarray(q_lengths).reshape(B)
    kv_len = np.full(B, S) if kv_lengths is None else np.asarray(kv_lengths).reshape(B)
    offset = kv_len - q_len if causal_alignment == "bottom_right" else np.zeros(B, int)
    i = rows[None, :, None]
    j = np.arange(S)[None, None, :]
    p = i + offset[:, None, None]
    ok = (i < q_len[:, None, None]) & (j < kv_len[:, None, None])
    if is_causal:
        ok = ok & (j <= p)
    if window is not None:
        left, right = (window, window) if np.isscalar(window) else window
        ok = ok & (j >= p - left) & (j <= p + right)
    return ok


def _chunks(rows: np.ndarray, per_row: int):
    size = max(1, CHUNK_ELEMENTS // max(per_row, 1))
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _modded(score_mod, s: np.ndarray, i: np.ndarray, j: np.ndarray):
    """`score_mod(s, i, j)` in float64 (vmapped over the leading axes, as a kernel sees one
    head's `[r, S]` tile) and its pullback."""
    with jax.enable_x64(True):
        lead = s.shape[:-2]
        flat = jnp.asarray(s).reshape((-1,) + s.shape[-2:])
        fn = jax.vmap(lambda x: score_mod(x, jnp.asarray(i), jnp.asarray(j)))
        out, pull = jax.vjp(fn, flat)
        out = np.asarray(out, np.float64).reshape(s.shape)

        def pullback(ds: np.ndarray) -> np.ndarray:
            with jax.enable_x64(True):
                (d,) = pull(jnp.asarray(ds.reshape(flat.shape)))
                return np.asarray(d, np.float64).reshape(lead + ds.shape[-2:])

    return out, pullback


def _mask_mod(mask_mod, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    with jax.enable_x64(True):
        return np.asarray(jnp.broadcast_to(mask_mod(jnp.asarray(i), jnp.asarray(j)),
                                           (i.shape[0], j.shape[1])), bool)  # fmt: skip


def _rank4(x, dims) -> np.ndarray | None:
    if x is None:
        return None
    x = np.asarray(x)
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _sum_to(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and x.shape[a] > 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def reference(
    query: Any,
    key: Any,
    value: Any,
    bias: Any = None,
    mask: Any = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Any = None,
    key_value_seq_lengths: Any = None,
    local_window_size: int | tuple[int, int] | None = None,
    causal_alignment: str = "top_left",
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    d_out: Any = None,
    d_lse: Any = None,
    return_weights: bool = False,
    rows: np.ndarray | None = None,
    visible: Visible | None = None,
    logits_fn: Callable[[np.ndarray, np.ndarray, int], np.ndarray] | None = None,
) -> Reference:
    """Attention in float64, with `dot_product_attention`'s arguments.

    Args:
      query: `[B, T, N, H]`; key: `[B, S, K, H]`; value: `[B, S, K, Hv]` (any dtype).
      bias, mask, scale, is_causal, query_seq_lengths, key_value_seq_lengths,
        local_window_size, causal_alignment, score_mod, mask_mod: as in
        `dot_product_attention` (bias and mask broadcastable to `[B, N, T, S]`).
      d_out: `[B, T, N, Hv]`, a cotangent of the output: gradients are computed for it.
      d_lse: `[B, N, T]`, a cotangent of the logsumexp too (`∂lse/∂s = P`), or None.
      return_weights: also return the weights.
      rows: compute only these query rows (not with `d_out`).
      visible: `(rows [r]) -> [r, S]` booleans restricting each row further (a benchmark's
        window or block layout).
      logits_fn: `(q [r, D], k [S, E], n) -> [r, S]` replacing `scale · q kᵀ` for query head
        `n` (other score functions: general, additive, cosine); no gradients with it.

    Returns:
      A `Reference`.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (query, key, value))
    B, T, N, H = q.shape
    S, K, Hv = k.shape[1], k.shape[2], v.shape[3]
    G = N // K
    scale = 1.0 / np.sqrt(H) if scale is None else float(scale)
    bias, mask = _rank4(bias, 4), _rank4(mask, 4)
    bias = None if bias is None else bias.astype(np.float64)
    rows = np.arange(T) if rows is None else np.asarray(rows)
    if d_out is not None and len(rows) != T:
        raise ValueError("reference: gradients need every row (rows=None).")
    qg = q.reshape(B, T, K, G, H)
    do = None if d_out is None else np.asarray(d_out, np.float64).reshape(B, T, K, G, Hv)
    dl = np.zeros((B, K, G, T)) if d_lse is None else np.asarray(d_lse, np.float64).reshape(
        B, K, G, T
    )
    out = np.zeros((B, len(rows), K, G, Hv))
    lse = np.zeros((B, K, G, len(rows)))
    weights = np.zeros((B, K, G, len(rows), S)) if return_weights else None
    grads = None
    if do is not None:
        grads = [np.zeros_like(qg), np.zeros_like(k), np.zeros_like(v)]
        dbias = None if bias is None else np.zeros(bias.shape)
    done = 0
    for chunk in _chunks(rows, B * N * S):
        r = len(chunk)
        i, j = chunk[:, None], np.arange(S)[None, :]
        if logits_fn is None:
            s = np.einsum("brkgh,bskh->bkgrs", qg[:, chunk], k, optimize=True) * scale
        else:
            s = np.array([[[np.asarray(logits_fn(qg[b, chunk, kv, g], k[b, :, kv], kv * G + g),
                                       np.float64)
                            for g in range(G)] for kv in range(K)] for b in range(B)])  # fmt: skip
        bias_c = None
        if bias is not None:
            bias_c = np.broadcast_to(bias[:, :, chunk] if bias.shape[2] > 1 else bias,
                                     (B, N, r, S)).reshape(B, K, G, r, S)  # fmt: skip
            s = s + bias_c
        pull = None
        if score_mod is not None:
            s, pull = _modded(score_mod, s, i, j)
        ok = visibility(B, T, S, is_causal=is_causal, window=local_window_size,
                        q_lengths=query_seq_lengths, kv_lengths=key_value_seq_lengths,
                        causal_alignment=causal_alignment, rows=chunk)  # [B, r, S]
        ok = ok[:, None, None]  # [B, 1, 1, r, S]
        if mask is not None:
            m = np.broadcast_to(mask[:, :, chunk] if mask.shape[2] > 1 else mask, (B, N, r, S))
            ok = ok & m.reshape(B, K, G, r, S)
        if mask_mod is not None:
            ok = ok & _mask_mod(mask_mod, i, j)
        if visible is not None:
            ok = ok & np.asarray(visible(chunk), bool)
        ok = np.broadcast_to(ok, s.shape)
        s = np.where(ok, s, -np.inf)
        top = np.where(ok.any(-1, keepdims=True), s.max(-1, keepdims=True, initial=-np.inf), 0.0)
        e = np.where(ok, np.exp(s - top), 0.0)
        total = e.sum(-1, keepdims=True)
        p = e / np.where(total > 0, total, 1.0)  # [B, K, G, r, S]
        o = np.einsum("bkgrs,bskv->brkgv", p, v, optimize=True)
        sl = slice(done, done + r)
        out[:, sl] = o
        with np.errstate(divide="ignore"):
            lse[..., sl] = np.where(total > 0, np.log(np.where(total > 0, total, 1)) + top,
                                    -np.inf)[..., 0]  # fmt: skip
        if weights is not None:
            weights[..., sl, :] = p
        if do is not None:
            do_c = do[:, chunk]
            grads[2] += np.einsum("bkgrs,brkgv->bskv", p, do_c, optimize=True)
            dp = np.einsum("brkgv,bskv->bkgrs", do_c, v, optimize=True)
            delta = np.einsum("brkgv,brkgv->bkgr", do_c, o, optimize=True) - dl[..., chunk]
            ds = p * (dp - delta[..., None])
            if pull is not None:
                ds = np.where(ok, pull(ds), 0.0)
            grads[0][:, chunk] = scale * np.einsum("bkgrs,bskh->brkgh", ds, k, optimize=True)
            grads[1] += scale * np.einsum("bkgrs,brkgh->bskh", ds, qg[:, chunk], optimize=True)
            if dbias is not None:
                d = _sum_to(ds.reshape(B, N, r, S), (dbias.shape[0], dbias.shape[1], r, S))
                if dbias.shape[2] > 1:
                    dbias[:, :, chunk] += d
                else:
                    dbias += _sum_to(d, dbias.shape)
        done += r
    result_grads = None
    if do is not None:
        result_grads = (grads[0].reshape(B, T, N, H), grads[1], grads[2], dbias)
    return Reference(
        out.reshape(B, len(rows), N, Hv),
        lse.reshape(B, N, len(rows)),
        None if weights is None else weights.reshape(B, N, len(rows), S),
        result_grads,
    )


# ----------------------------------------------------------------------------- the cases


def _soft_cap(score, q_idx, kv_idx):
    del q_idx, kv_idx
    return 4.0 * jnp.tanh(score / 4.0)


def _prefix_lm(q_idx, kv_idx):
    return (kv_idx <= q_idx) | (kv_idx < 5)


MODS = {"soft_cap": _soft_cap, "prefix_lm": _prefix_lm}


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem of the conformance suite; `id` is its readable test name.

    Attributes:
      id: the test id, e.g. `"T=7, S=33, causal bottom-right, gqa=2"`.
      B, T, S, N, K, H, Hv: sizes (`Hv` defaults to `H`).
      causal, alignment, window, q_len, kv_len: the structured masks.
      bias: shape of a random bias (rank 4, broadcastable), or None.
      mask: shape of a random mask, or None (a row of it may be empty).
      score_mod, mask_mod: names in `MODS`, or None.
      dropout: a dropout rate (only implementations that support it run it; the suite checks
        its statistics, not the reference).
      blocks: `block_sizes` for the tiled implementations (small, so that blocks are many).
    """

    id: str
    B: int = 2
    T: int = 16
    S: int = 16
    N: int = 4
    K: int = 4
    H: int = 8
    Hv: int | None = None
    causal: bool = False
    alignment: str = "top_left"
    window: tuple[int, int] | None = None
    q_len: tuple[int, ...] | None = None
    kv_len: tuple[int, ...] | None = None
    bias: tuple[int, ...] | None = None
    mask: tuple[int, ...] | None = None
    score_mod: str | None = None
    mask_mod: str | None = None
    dropout: float = 0.0
    blocks: tuple[int, int] | None = (8, 8)

    def keywords(self) -> dict[str, Any]:
        """`dot_product_attention`'s keywords for this case (arrays as numpy)."""
        kw: dict[str, Any] = dict(is_causal=self.causal, causal_alignment=self.alignment)
        if self.window is not None:
            kw["local_window_size"] = self.window
        if self.q_len is not None:
            kw["query_seq_lengths"] = np.asarray(self.q_len, np.int32)
        if self.kv_len is not None:
            kw["key_value_seq_lengths"] = np.asarray(self.kv_len, np.int32)
        if self.score_mod is not None:
            kw["score_mod"] = MODS[self.score_mod]
        if self.mask_mod is not None:
            kw["mask_mod"] = MODS[self.mask_mod]
        return kw

    def inputs(self, dtype: Any = np.float32, seed: int = 0) -> dict[str, Any]:
        """Random `query`, `key`, `value`, `bias`, `mask` and a cotangent `d_out` (numpy).

        Values are rounded to `dtype` (so the reference sees exactly what a kernel does).
        """
        rng = np.random.default_rng(seed + sum(map(ord, self.id)))
        Hv = self.H if self.Hv is None else self.Hv
        shapes = dict(query=(self.B, self.T, self.N, self.H), key=(self.B, self.S, self.K, self.H),
                      value=(self.B, self.S, self.K, Hv), d_out=(self.B, self.T, self.N, Hv))
        out = {
            name: np.asarray(jnp.asarray(rng.standard_normal(shape), dtype).astype(np.float32))
            for name, shape in shapes.items()
        }
        out["bias"] = None
        if self.bias is not None:
            out["bias"] = np.asarray(
                jnp.asarray(0.5 * rng.standard_normal(self.bias), dtype).astype(np.float32)
            )
        out["mask"] = None if self.mask is None else rng.random(self.mask) < 0.7
        return out


CASES: tuple[Case, ...] = (
    Case("T=16, S=16, full"),
    Case("T=1, S=7, decode bottom-right, mqa", T=1, S=7, N=4, K=1, causal=True,
         alignment="bottom_right"),
    Case("T=19, S=19, causal, gqa=2", T=19, S=19, K=2, causal=True),
    Case("T=7, S=33, causal bottom-right, gqa=2", T=7, S=33, K=2, causal=True,
         alignment="bottom_right"),
    Case("T=33, S=7, causal top-left (rows past S see all keys)", T=33, S=7, causal=True),
    Case("T=21, S=30, window (3, 2), lengths", T=21, S=30, window=(3, 2), q_len=(21, 9),
         kv_len=(11, 30)),
    Case("T=16, S=33, causal + window + lengths, bottom-right, gqa=2", T=16, S=33, K=2,
         causal=True, alignment="bottom_right", window=(5, 0), q_len=(16, 9), kv_len=(30, 20)),
    Case("T=33, S=7, empty rows: lengths incl. an empty example", T=33, S=7, causal=True,
         alignment="bottom_right", q_len=(20, 33), kv_len=(0, 7)),
    Case("T=17, S=23, bias [1, N, T, S], Hv=5", T=17, S=23, Hv=5, bias=(1, 4, 17, 23)),
    Case("T=17, S=23, bias [B, 1, 1, S] + causal", T=17, S=23, bias=(2, 1, 1, 23), causal=True),
    Case("T=17, S=23, mask [B, 1, T, S] with empty rows", T=17, S=23, mask=(2, 1, 17, 23)),
    Case("T=25, S=25, soft-cap score_mod", T=25, S=25, score_mod="soft_cap", causal=True),
    Case("T=25, S=25, prefix-LM mask_mod, gqa=2", T=25, S=25, K=2, mask_mod="prefix_lm"),
    Case("T=12, S=12, dropout", T=12, S=12, dropout=0.3),
)
