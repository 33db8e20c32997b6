"""Linear attention (Katharopoulos et al., 2020) and the kernelised core it shares with FAVOR+.

Softmax attention weighs key `j` for query `i` by `exp(q_i · k_j)`; kernelised attention
replaces that similarity with `φ(q_i) · φ(k_j)` for a positive feature map `φ`, so

    out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ  /  φ(q_i)ᵀ Σ_j φ(k_j)                      # O(T·F·Hv)

and the sums over keys are computed once instead of once per query. Causal attention needs
prefix sums instead: the sequence is cut into chunks of `C` positions, each chunk attends to
itself with an explicit `[C, C]` causal mask and to all earlier chunks through an exclusive
cumulative sum of the per-chunk `φ(k) vᵀ` states, O(T·(C + Hv)·F) in all.

Masks, lengths and biases are honoured, never ignored. Anything that depends on the key alone
(key lengths, a mask or bias with a query axis of 1) is folded into `φ(k_j)`, as a weight
`exp(bias_j)` or 0 (in softmax attention a bias multiplies the similarity by `exp(bias)`), and
keeps the O(T) cost. Anything that couples queries and keys (a mask or bias with a query axis,
a local window, causal attention with `T != S` or a per-example causal offset) is applied to
the explicit `[T, S]` similarities: exact for the variant, but O(T·S). The rule is in
`kernelized_attention`.

Reference: Katharopoulos, Vyas, Pappas, Fleuret, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention" (ICML 2020).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Bool, Float

from flaxattn.kernels import _validate as V
from flaxattn.kernels._reference import _split_heads
from flaxattn.kernels._visibility import CAUSAL_ALIGNMENTS, Limits, Visibility

FeatureMap = Callable[[Array], Array]
DEFAULT_CHUNK_SIZE = 64


def elu_feature_map(x: Float[Array, "... H"]) -> Float[Array, "... H"]:
    """`φ(x) = elu(x) + 1`, positive everywhere (Katharopoulos et al.)."""
    return jax.nn.elu(x) + 1.0


def _safe_divide(num: Array, den: Array) -> Array:
    """`num / den`, 0 where `den == 0` (a query that sees nothing), with finite gradients."""
    ok = den > 0.0
    return jnp.where(ok[..., None], num / jnp.where(ok, den, 1.0)[..., None], 0.0)


def _all_keys(phi_q: Float[Array, "T F"], phi_k: Float[Array, "S F"], v: Float[Array, "S Dv"]):
    """Every query sees every (weighted) key: `(num [T, Dv], den [T])` in O((T + S)·F·Dv)."""
    kv = jnp.einsum("sf,sv->fv", phi_k, v)  # [F, Dv]
    return phi_q @ kv, phi_q @ jnp.sum(phi_k, axis=0)


def _causal_chunked(
    phi_q: Float[Array, "T F"], phi_k: Float[Array, "T F"], v: Float[Array, "T Dv"], chunk: int
):
    """Query `i` sees keys `j <= i` (`T == S`): `(num [T, Dv], den [T])` by chunked prefix sums."""
    T = phi_q.shape[0]
    n = -(-T // chunk)
    pad = lambda x: jnp.pad(x, ((0, n * chunk - T), (0, 0))).reshape(n, chunk, -1)
    qc, kc, vc = pad(phi_q), pad(phi_k), pad(v)  # [n, C, F], [n, C, F], [n, C, Dv]
    kv = jnp.einsum("ncf,ncv->nfv", kc, vc)  # [n, F, Dv]: each chunk's state
    z = jnp.sum(kc, axis=1)  # [n, F]
    exclusive = lambda x: jnp.concatenate([jnp.zeros_like(x[:1]), jnp.cumsum(x[:-1], 0)], 0)
    kv_before, z_before = exclusive(kv), exclusive(z)  # states of all earlier chunks
    within = jnp.einsum("ncf,ndf->ncd", qc, kc) * jnp.tril(jnp.ones((chunk, chunk)))  # [n, C, C]
    num = jnp.einsum("ncd,ndv->ncv", within, vc) + jnp.einsum("ncf,nfv->ncv", qc, kv_before)
    den = jnp.sum(within, axis=-1) + jnp.einsum("ncf,nf->nc", qc, z_before)
    return num.reshape(n * chunk, -1)[:T], den.reshape(-1)[:T]


def _dense(
    phi_q: Float[Array, "T F"],
    phi_k: Float[Array, "S F"],
    v: Float[Array, "S Dv"],
    weight: Float[Array, "T S"],
):
    """Explicit similarities times `weight` (0 where hidden): exact, O(T·S)."""
    a = (phi_q @ phi_k.T) * weight  # [T, S]
    return a @ v, jnp.sum(a, axis=-1)


def _fast_causal(visibility: Visibility, T: int, S: int) -> bool:
    """Whether causal attention can use prefix sums: query `i` sits at key `i` in every example."""
    if T != S:
        return False
    if visibility.causal_alignment == "top_left":
        return True
    return visibility.q_lengths is None and visibility.kv_lengths is None


def kernelized_attention(
    phi_q: Float[Array, "B T N F"],
    phi_k: Float[Array, "B S K F"],
    value: Float[Array, "B S K Hv"],
    *,
    bias: Float[Array, "B N T S"] | None = None,
    mask: Bool[Array, "B N T S"] | None = None,
    visibility: Visibility | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Float[Array, "B T N Hv"]:
    """Attention with similarity `φ(q)·φ(k)` from precomputed non-negative features.

    The rule (static, from shapes and flags): when nothing couples a query with a key except
    causality at equal positions, i.e. no window, `bias` and `mask` with a query axis of 1,
    and causal only with `T == S` at a zero offset, the cost is O(T): keys are weighted and
    summed once (non-causal) or by chunked prefix sums (causal). Otherwise the `[T, S]`
    similarities are formed and masked explicitly.

    Args:
      phi_q: `[B, T, N, F]` query features, non-negative.
      phi_k: `[B, S, K, F]` key features, non-negative; `K` divides `N`.
      value: `[B, S, K, Hv]`.
      bias: rank 4, broadcastable to `[B, N, T, S]`: multiplies the similarity by `exp(bias)`.
      mask: booleans, same broadcasting, True = attend.
      visibility: causal / window / lengths.
      chunk_size: `C` of the causal prefix sums.

    Returns:
      `[B, T, N, Hv]` float32; a query with nothing visible gives 0.
    """
    visibility = Visibility() if visibility is None else visibility
    B, T, N, _ = phi_q.shape
    S, K = phi_k.shape[1], phi_k.shape[2]
    G = N // K
    limits = visibility.limits(B, T, S)
    coupled = (
        visibility.window is not None
        or (bias is not None and bias.shape[2] > 1)
        or (mask is not None and mask.shape[2] > 1)
        or (visibility.is_causal and not _fast_causal(visibility, T, S))
    )
    q = phi_q.astype(jnp.float32).reshape(B, T, K, G, -1)
    bias, bias_axes = _split_heads(bias, K, G)
    mask, mask_axes = _split_heads(mask, K, G)
    q_idx = jnp.arange(T)[:, None]
    kv_idx = jnp.arange(S)[None, :]

    def one_head(q, k, v, bias, mask, limits: Limits):
        # q [T, F], k [S, F], v [S, Dv]; bias, mask [T|1, S|1]; limits scalars.
        if coupled:
            visible = visibility.visible(q_idx, kv_idx, limits)
            if mask is not None:
                visible &= mask
            weight = jnp.where(visible, 1.0, 0.0)
            if bias is not None:  # exp(bias - max) is safe; the max cancels in num / den
                b = bias.astype(jnp.float32)
                weight = weight * jnp.exp(b - jax.lax.stop_gradient(jnp.max(b)))
            num, den = _dense(q, k, v, weight)
        else:
            keep = kv_idx[0] < limits.kv_len  # [S]
            if mask is not None:
                keep &= mask[0]
            key_weight = jnp.where(keep, 1.0, 0.0)
            if bias is not None:
                b = bias[0].astype(jnp.float32)
                key_weight = key_weight * jnp.exp(b - jax.lax.stop_gradient(jnp.max(b)))
            k = k * key_weight[:, None]
            if visibility.is_causal:
                num, den = _causal_chunked(q, k, v, chunk_size)
            else:
                num, den = _all_keys(q, k, v)
            den = jnp.where(q_idx[:, 0] < limits.q_len, den, 0.0)  # padded queries see nothing
        return _safe_divide(num, den)

    per_group = jax.vmap(one_head, in_axes=(1, None, None, bias_axes[2], mask_axes[2], None))
    per_kv_head = jax.vmap(per_group, in_axes=(1, 1, 1, bias_axes[1], mask_axes[1], None))
    per_example = jax.vmap(per_kv_head, in_axes=(0, 0, 0, bias_axes[0], mask_axes[0], 0))
    out = per_example(q, phi_k.astype(jnp.float32), value.astype(jnp.float32), bias, mask, limits)
    return jnp.moveaxis(out, 3, 1).reshape(B, T, N, -1)  # [B, K, G, T, Hv] -> [B, T, N, Hv]


def check_inputs(
    query,
    key,
    value,
    bias,
    mask,
    *,
    is_causal,
    query_seq_lengths,
    key_value_seq_lengths,
    local_window_size,
    causal_alignment,
):
    """The common validation of the efficient variants: `(dims, bias, mask, visibility)`."""
    dims = V.check_qkv(query, key, value)
    V.check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    window = V.check_window(local_window_size)
    if window is not None and max(window) >= dims.S:
        raise ValueError(
            f"local_window_size={local_window_size!r} is larger than the sequence (S={dims.S}): "
            "each side must be smaller than S; pass no window for full attention."
        )
    visibility = Visibility(
        is_causal=bool(is_causal),
        window=window,
        q_lengths=V.check_lengths("query_seq_lengths", query_seq_lengths, dims.B),
        kv_lengths=V.check_lengths("key_value_seq_lengths", key_value_seq_lengths, dims.B),
        causal_alignment=causal_alignment,
    )
    bias = V.check_broadcastable("bias", bias, dims, boolean=False)
    mask = V.check_broadcastable("mask", mask, dims, boolean=True)
    return dims, bias, mask, visibility


def unbatched(fn: Callable[..., Array]) -> Callable[..., Array]:
    """Let `fn(query, key, value, bias, mask, **kw)` also take `[T, N, H]` inputs (no batch)."""

    @functools.wraps(fn)
    def wrapped(query, key, value, bias=None, mask=None, **kwargs):
        if query.ndim == 3 and key.ndim == 3 and value.ndim == 3:
            add = lambda x: None if x is None else jnp.asarray(x)[None]
            return fn(query[None], key[None], value[None], add(bias), add(mask), **kwargs)[0]
        return fn(query, key, value, bias, mask, **kwargs)

    return wrapped


def linear_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S K H"],
    value: Float[Array, "B S K Hv"],
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    feature_map: FeatureMap = elu_feature_map,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Float[Array, "B T N Hv"]:
    """Linear attention, `φ(q)·φ(k)` with `φ = elu + 1`, in O(T) time and memory.

        out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j)      over the visible keys j

    Same calling convention as `dot_product_attention`. Causal attention (with `T == S`) uses
    chunked prefix sums; key lengths and key-only masks and biases keep the O(T) cost; masks,
    biases or windows that couple queries and keys are honoured exactly at O(T·S) cost (see
    `kernelized_attention` for the rule). A query with nothing visible gives 0.

    Args:
      query: `[B, T, N, H]` (or `[T, N, H]`).
      key: `[B, S, K, H]`; `K` divides `N`.
      value: `[B, S, K, Hv]`.
      bias: broadcastable to `[B, N, T, S]`; multiplies the similarity by `exp(bias)`.
      mask: booleans, broadcastable to `[B, N, T, S]`, True = attend.
      scale: queries are multiplied by `scale` before the feature map; default 1 (none),
        as in Katharopoulos et al.
      is_causal, query_seq_lengths, key_value_seq_lengths, local_window_size,
        causal_alignment: as in `dot_product_attention`.
      feature_map: `φ`, elementwise and positive; default `elu(x) + 1`.
      chunk_size: chunk length of the causal prefix sums.

    Returns:
      `[B, T, N, Hv]` in the input dtype.
    """
    dims, bias, mask, visibility = check_inputs(
        query,
        key,
        value,
        bias,
        mask,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        causal_alignment=causal_alignment,
    )
    del dims
    q = query.astype(jnp.float32) * (1.0 if scale is None else float(scale))
    out = kernelized_attention(
        feature_map(q),
        feature_map(key.astype(jnp.float32)),
        value,
        bias=bias,
        mask=mask,
        visibility=visibility,
        chunk_size=chunk_size,
    )
    return out.astype(query.dtype)


linear_attention = unbatched(linear_attention)
