"""One pair of a ring step: local queries against one chunk of the visiting K/V block, at
global positions; flash-style by the blocked kernel, or dense where local limits would not be
exact (`layout='striped'` with a window)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import Array
from jaxtyping import ArrayLike, Float

from flaxattn.kernels._blocked import blocked_attention, blocked_attention_grads
from flaxattn.kernels._single_head import MaskMod
from flaxattn.kernels._softmax import masked_softmax
from flaxattn.kernels._visibility import Limits, Visibility


@dataclasses.dataclass(frozen=True, eq=False)
class RingConfig:
    """Everything static about one ring_attention call."""

    axis_name: str
    num_shards: int
    batch_axis: str | tuple[str, ...] | None
    visibility: Visibility  # without lengths: they travel as Limits arrays
    mask_mod: MaskMod | None
    scale: float
    q_table: np.ndarray  # [P, T/P] global query positions held by each shard
    kv_table: np.ndarray  # [P, S/P]
    chunks: int  # sub-blocks per shard, each a contiguous slice, skipped when empty
    stride: int  # within a chunk, positions are `start + stride·i` (P for striped, else 1)
    flash: bool  # pairs by the blocked kernel; False where local limits are not exact


def _grouped(x: ArrayLike | None, K: int) -> Array | None:
    """`[B|1, N|1, t|1, s|1]` -> `[B|1, K|1, G|1, t|1, s|1]` (query heads grouped by kv head)."""
    if x is None:
        return None
    b, n, t, s = x.shape
    return x.reshape(b, K, n // K, t, s) if n > 1 else x[:, :, None]


def _visible(cfg: RingConfig, q_pos, kv_pos, limits: Limits, mask, K: int) -> Array:
    """`[B|1, K|1, G|1, t, s]` visibility at global positions, with the dense mask if any."""
    per_example = Limits(*(x[:, None, None] for x in limits))
    vis = cfg.visibility.visible(q_pos[None, :, None], kv_pos[None, None, :], per_example)
    if cfg.mask_mod is not None:
        vis &= cfg.mask_mod(q_pos[:, None], kv_pos[None, :])[None]
    vis = vis[:, None, None]  # [B, 1, 1, t, s]
    return vis if mask is None else vis & _grouped(mask, K)


def _logits(cfg, q, k, bias):
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    logits = logits * cfg.scale
    if bias is not None:
        logits = logits + _grouped(bias, k.shape[2]).astype(jnp.float32)
    return logits


def block_forward(cfg, q, k, v, bias, mask, q_pos, kv_pos, limits):
    """Dense: `(out [B, t, K, G, Hv] f32, lse [B, K, G, t] f32)` of queries `q` on one block."""
    logits = _logits(cfg, q, k, bias)  # [B, K, G, t, s]
    weights, lse = masked_softmax(logits, _visible(cfg, q_pos, kv_pos, limits, mask, k.shape[2]))
    out = jnp.einsum("BKGTS,BSKV->BTKGV", weights, v.astype(jnp.float32))
    return out, lse


def block_backward(cfg, q, k, v, bias, mask, q_pos, kv_pos, limits, out, lse, dout, dlse):
    """Dense: this block's share `(dq, dk, dv, dbias|None)` of the gradients, from the whole
    attention's `out [B, t, K, G, Hv]`, `lse [B, K, G, t]` and cotangents `dout`, `dlse`."""
    # d lse / d logits = p, so a cotangent on lse enters exactly like -delta.
    delta = jnp.einsum("BTKGV,BTKGV->BKGT", dout, out.astype(jnp.float32)) - dlse
    logits = _logits(cfg, q, k, bias)
    visible = _visible(cfg, q_pos, kv_pos, limits, mask, k.shape[2])
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]
    p = jnp.where(visible, jnp.exp(logits - lse), 0.0)  # [B, K, G, t, s]
    dv = jnp.einsum("BKGTS,BTKGV->BSKV", p, dout)
    dp = jnp.einsum("BTKGV,BSKV->BKGTS", dout, v.astype(jnp.float32))
    ds = p * (dp - delta[..., None])  # d loss / d logits
    dq = jnp.einsum("BKGTS,BSKH->BTKGH", ds, k.astype(jnp.float32)) * cfg.scale
    dk = jnp.einsum("BKGTS,BTKGH->BSKH", ds, q.astype(jnp.float32)) * cfg.scale
    dbias = None
    if bias is not None:
        B, N = q.shape[0], q.shape[2] * q.shape[3]
        dbias = _reduce_to(ds.reshape((B, N) + ds.shape[3:]), bias.shape)
    return dq, dk, dv, dbias


def _reduce_to(x: ArrayLike, shape: tuple[int, ...]) -> Array:
    """Sum `x` over the axes where `shape` is 1 (the gradient of a broadcast)."""
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] > 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _local_limits(
    cfg: RingConfig, q0: ArrayLike, k0: ArrayLike, t: int, s: int, limits: Limits
) -> Limits:
    """The global `limits` ([B]) of queries `q0 + σ·i` (`i < t`) against keys `k0 + σ·j`
    (`j < s`), `σ = cfg.stride`, as limits on the local indices `i, j`.

    Exact for causal and lengths at any stride (`σ·j + k0 <= σ·i + q0 + offset` iff
    `j <= i + floor((q0 - k0 + offset) / σ)`; `σ·i + q0 < q_len` iff `i < ceil((q_len - q0) / σ)`),
    and for a window at stride 1 only.
    """
    st = cfg.stride
    ceil = lambda x: -(-x // st)
    return Limits(
        jnp.clip(ceil(limits.q_len - q0), 0, t),
        jnp.clip(ceil(limits.kv_len - k0), 0, s),
        (limits.offset + q0 - k0) // st,
    )


def _local_mask_mod(cfg: RingConfig, q0: ArrayLike, k0: ArrayLike) -> MaskMod | None:
    """The global-position `mask_mod` on the blocked kernel's local indices."""
    if cfg.mask_mod is None:
        return None
    st, mod = cfg.stride, cfg.mask_mod
    return lambda qi, ki: mod(q0 + st * qi, k0 + st * ki)


def _as_heads(x: ArrayLike) -> Array:
    """`[B, t, K, G, *]` -> `[B, t, N, *]` (rows) or `[B, K, G, t]` -> `[B, N, t]` (lse)."""
    if x.ndim == 4:
        return x.reshape(x.shape[0], -1, x.shape[3])
    return x.reshape(x.shape[:2] + (-1, x.shape[4]))


def _pair_options(
    cfg: RingConfig, bias, mask, q_pos: ArrayLike, kv_pos: ArrayLike, t: int, s: int, limits: Limits
) -> dict[str, Any]:
    """The blocked kernel's keywords for one pair, forward and backward alike: its bias and
    mask block, and the structured masks placed at the chunks' global positions."""
    return dict(
        bias=bias,
        mask=mask,
        visibility=cfg.visibility,
        limits=_local_limits(cfg, q_pos[0], kv_pos[0], t, s, limits),
        scale=cfg.scale,
        mask_mod=_local_mask_mod(cfg, q_pos[0], kv_pos[0]),
    )


def flash_forward(
    cfg: RingConfig,
    q: Float[ArrayLike, "B t K G H"],
    k: Float[ArrayLike, "B s K H"],
    v: Float[ArrayLike, "B s K Hv"],
    bias: ArrayLike | None,
    mask: ArrayLike | None,
    q_pos: ArrayLike,
    kv_pos: ArrayLike,
    limits: Limits,
) -> tuple[Float[ArrayLike, "B t K G Hv"], Float[ArrayLike, "B K G t"]]:
    """`block_forward` by the blocked kernel: O(t) temporaries instead of `[B, N, t, s]`.

    `q_pos [t]`, `kv_pos [s]` are the chunks' global positions (`start + stride·i`), `limits`
    the global `[B]` limits; `bias`, `mask` the pair's `[b, n, t|1, s|1]` block.
    """
    B, t, K, G, _ = q.shape
    out, lse = blocked_attention(
        _as_heads(q).astype(jnp.float32),  # out comes in q's dtype: float32 for the merge
        k,
        v,
        **_pair_options(cfg, bias, mask, q_pos, kv_pos, t, k.shape[1], limits),
    )  # [B, t, N, Hv], [B, N, t]
    return out.reshape(B, t, K, G, -1), lse.reshape(B, K, G, t)


def flash_backward(
    cfg: RingConfig,
    q: Float[ArrayLike, "B t K G H"],
    k: Float[ArrayLike, "B s K H"],
    v: Float[ArrayLike, "B s K Hv"],
    bias: ArrayLike | None,
    mask: ArrayLike | None,
    q_pos: ArrayLike,
    kv_pos: ArrayLike,
    limits: Limits,
    out: Float[ArrayLike, "B t K G Hv"],
    lse: Float[ArrayLike, "B K G t"],
    dout: Float[ArrayLike, "B t K G Hv"],
    dlse: Float[ArrayLike, "B K G t"],
) -> tuple[Array, Array, Array, Array | None]:
    """`block_backward` by the blocked kernel's backward, O(t) temporaries: this pair's share
    `(dq [B, t, K, G, H], dk [B, s, K, H], dv [B, s, K, Hv], dbias|None)`, all float32, from
    the whole attention's `out` and `lse` (over every key block, not only this one)."""
    B, t, K, G, H = q.shape
    dq, dk, dv, dbias = blocked_attention_grads(
        _as_heads(q),
        k,
        v,
        _as_heads(out),
        _as_heads(lse),
        _as_heads(dout),
        _as_heads(dlse),
        **_pair_options(cfg, bias, mask, q_pos, kv_pos, t, k.shape[1], limits),
    )
    return dq.reshape(B, t, K, G, H), dk, dv, dbias


def merge(a, b):
    """Merge two normalised partial results `(out, lse)` over disjoint key sets."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    top = jnp.maximum(lse_a, lse_b)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    total = jnp.exp(lse_a - top) + jnp.exp(lse_b - top)
    lse = jnp.where(total > 0.0, jnp.log(jnp.where(total > 0.0, total, 1.0)) + top, -jnp.inf)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    # lse [B, K, G, t] scales out [B, t, K, G, V]
    scale_a = jnp.moveaxis(jnp.exp(lse_a - safe), 3, 1)[..., None]
    scale_b = jnp.moveaxis(jnp.exp(lse_b - safe), 3, 1)[..., None]
    return out_a * scale_a + out_b * scale_b, lse
