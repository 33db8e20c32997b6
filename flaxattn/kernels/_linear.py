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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike, Bool, Float

from flaxattn.kernels._call import Call, Result, finish, prepare
from flaxattn.kernels._heads import heads_to_rows, over_heads
from flaxattn.kernels._registry import Implementation, register
from flaxattn.kernels._visibility import Limits, Visibility

FeatureMap = Callable[[Array], Array]
DEFAULT_CHUNK_SIZE = 64


def elu_feature_map(x: Float[ArrayLike, "... H"]) -> Float[Array, "... H"]:
    """`φ(x) = elu(x) + 1`, positive everywhere (Katharopoulos et al.)."""
    return jax.nn.elu(x) + 1.0


def _safe_divide(num: ArrayLike, den: ArrayLike) -> Array:
    """`num / den`, 0 where `den == 0` (a query that sees nothing), with finite gradients."""
    ok = den > 0.0
    return jnp.where(ok[..., None], num / jnp.where(ok, den, 1.0)[..., None], 0.0)


def _all_keys(
    phi_q: Float[ArrayLike, "T F"], phi_k: Float[ArrayLike, "S F"], v: Float[ArrayLike, "S Dv"]
):
    """Every query sees every (weighted) key: `(num [T, Dv], den [T])` in O((T + S)·F·Dv)."""
    kv = jnp.einsum("sf,sv->fv", phi_k, v)  # [F, Dv]
    return phi_q @ kv, phi_q @ jnp.sum(phi_k, axis=0)


def _causal_chunked(
    phi_q: Float[ArrayLike, "T F"],
    phi_k: Float[ArrayLike, "T F"],
    v: Float[ArrayLike, "T Dv"],
    chunk: int,
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
    causal = jnp.tril(jnp.ones((chunk, chunk)))[None]  # [1, C, C]
    within = jnp.einsum("ncf,ndf->ncd", qc, kc) * causal  # [n, C, C]
    num = jnp.einsum("ncd,ndv->ncv", within, vc) + jnp.einsum("ncf,nfv->ncv", qc, kv_before)
    den = jnp.sum(within, axis=-1) + jnp.einsum("ncf,nf->nc", qc, z_before)
    return num.reshape(n * chunk, -1)[:T], den.reshape(-1)[:T]


def _dense(
    phi_q: Float[ArrayLike, "T F"],
    phi_k: Float[ArrayLike, "S F"],
    v: Float[ArrayLike, "S Dv"],
    weight: Float[ArrayLike, "T S"],
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
    phi_q: Float[ArrayLike, "B T N F"],
    phi_k: Float[ArrayLike, "B S K F"],
    value: Float[ArrayLike, "B S K Hv"],
    *,
    bias: Float[ArrayLike, "#B #N #T #S"] | None = None,
    mask: Bool[ArrayLike, "#B #N #T #S"] | None = None,
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
    B, T = phi_q.shape[:2]
    S = phi_k.shape[1]
    limits = visibility.limits(B, T, S)
    coupled = (
        visibility.window is not None
        or (bias is not None and bias.shape[2] > 1)
        or (mask is not None and mask.shape[2] > 1)
        or (visibility.is_causal and not _fast_causal(visibility, T, S))
    )
    q_idx = jnp.arange(T)[:, None]
    kv_idx = jnp.arange(S)[None, :]

    def one_head(q, k, v, bias, mask, head, limits: Limits):
        # q [T, F], k [S, F], v [S, Dv]; bias, mask [T|1, S|1]; limits scalars.
        del head
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

    out = over_heads(
        one_head, phi_q.astype(jnp.float32), phi_k.astype(jnp.float32),
        value.astype(jnp.float32), pairs=(bias, mask), per_example=limits,
    )  # [B, N, T, Hv]
    return heads_to_rows(out)


def window_below_length(call: Call, caller: str) -> None:
    """The efficient variants and the ring take windows narrower than the sequence only."""
    window = call.visibility.window
    if window is not None and max(window) >= call.dims.S:
        given = window[0] if window[0] == window[1] else window
        raise ValueError(
            f"{caller}: local_window_size={given!r} is larger than the sequence "
            f"(S={call.dims.S}): each side must be smaller than S; pass no window for full "
            "attention."
        )


def linear_attention(
    query: Float[ArrayLike, "*B T N H"],
    key: Float[ArrayLike, "*B S K H"],
    value: Float[ArrayLike, "*B S K Hv"],
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    scale: float | None = None,
    feature_map: FeatureMap = elu_feature_map,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **keywords: Any,
) -> Float[Array, "*B T N Hv"]:
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
      feature_map: `φ`, elementwise and positive; default `elu(x) + 1`.
      chunk_size: chunk length of the causal prefix sums.
      **keywords: `dot_product_attention`'s masking keywords (`is_causal`,
        `query_seq_lengths`, `key_value_seq_lengths`, `local_window_size`,
        `causal_alignment`); others it does not support raise a `ValueError`.

    Returns:
      `[B, T, N, Hv]` in the input dtype.
    """
    call = prepare(query, key, value, bias, mask, caller="linear_attention",
                   scale=1.0 if scale is None else scale, **keywords)
    return finish(call, LINEAR(call, feature_map=feature_map, chunk_size=chunk_size))


def _run_linear(
    call: Call, *, feature_map: FeatureMap = elu_feature_map, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Result:
    window_below_length(call, "linear_attention")
    q = call.query.astype(jnp.float32) * call.scale
    out = kernelized_attention(
        feature_map(q), feature_map(call.key.astype(jnp.float32)), call.value,
        bias=call.bias, mask=call.mask, visibility=call.visibility, chunk_size=chunk_size,
    )
    return Result(out.astype(call.query.dtype))


# The kernelised variants keep masks, lengths and biases; they have no logits to modify,
# no weights to return or drop out, and no logsumexp.
KERNELIZED_SUPPORTS = frozenset(
    {"bias", "mask", "causal", "bottom_right", "window", "lengths", "gqa", "value_head_dim",
     "traced_scale"}
)
LINEAR = register(
    Implementation(
        "linear", _run_linear, "linear attention, phi(q)·phi(k) with phi = elu + 1, O(T)",
        supports=KERNELIZED_SUPPORTS, kind="approximate", options=("feature_map", "chunk_size"),
    )
)
