"""The blocked implementation: flash-style attention in plain JAX, O(T) memory.

    for each example b and query block i:                       # a scan over B · nq blocks
        m, l, acc = -inf, 0, 0                                   # [K, G·bq], [K, G·bq, Hv]
        for each key block j that some query of block i sees:    # dynamic bounds: real skipping
            s   = scale · q_i k_jᵀ + bias → score_mod → mask       # [K, G·bq, bk], float32
            m'  = max(m, rowmax s);  p = exp(s - m')
            l   = l · exp(m - m') + rowsum p;  acc = acc · exp(m - m') + p v_j
        out_i = acc / l;  lse_i = m + log l                       # 0 and -inf for an empty row

(Dao et al. 2022, "FlashAttention"; the online softmax of Milakov & Gimelshein 2018.)

Design choices, each for speed on CPU (measured by benchmarks/blocked_cpu.py):
- All heads of one example go through each block together: every matmul is one batched
  `[K, G·bq, H] x [K, H, bk]`, and the loop overhead is paid once per block, not per head.
  GQA is the grouped reshape `N = K·G` (the G query heads of a kv head are extra rows), so keys
  and values are never repeated.
- The loops visit what the block plan (`flaxattn.kernels._plan`) lists: a map over `(b, i)`,
  then a `fori_loop` over exactly the key blocks query block `i` sees (the backward: over the
  query blocks that see key block `j`), so blocks emptied by causal, window or length masks
  cost nothing. A `lax.cond` keeps the elementwise mask off the blocks the plan marks full,
  and no mask is built at all when nothing can be hidden. (Under a user's `jax.vmap` over the
  lengths JAX turns these into selects: still correct, with less skipping.)
- 16-bit inputs (bf16, fp16) are multiplied in their own dtype, accumulating in float32, and
  the weights are rounded to it for the `p v` products (as FlashAttention does on GPUs, and
  PyTorch's CPU kernel): bf16 dots run on AMX units or tensor cores, about 3x float32 dots
  on the AVX-512/AMX CPU. Scores, softmax and accumulators stay float32.
- The backward is a `jax.custom_vjp` that recomputes each block from `q, k, v` and the saved
  logsumexp instead of storing `[T, S]` weights (`_backward.py`).

`score_mod` and `mask_mod` are evaluated per block on global indices `q_idx [bq, 1]`,
`kv_idx [1, bk]`; `score_mod` is vmapped over heads, so it sees `[bq, bk]` scores as in the
reference kernel. Arrays they close over are hoisted with `jax.closure_convert`, so closing over
traced values works under jit and vmap. Gradients flow through `score_mod`: to the scores, and to
the floating-point arrays it closes over (a learned relative-position table, ALiBi slopes), summed
over blocks. `mask_mod` is boolean, so nothing flows through it.

The package: `_setup.py` (block sizes, padding, the block plans, hoisting the modifiers),
`_tiles.py` (one block's slices and score tile), `_forward.py`, `_backward.py`, and here the
custom VJP, the entry points and the registry entry.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike, Bool, Float

from flaxattn.kernels._blocked._backward import backward
from flaxattn.kernels._blocked._forward import forward
from flaxattn.kernels._blocked._setup import (
    DEFAULT_BLOCK_K,
    DEFAULT_BLOCK_Q,
    LONG_UNMASKED_BLOCKS,
    LONG_UNMASKED_FROM,
    Mods,
    default_block_sizes,
    pad_axis,
    prepare,
)
from flaxattn.kernels._call import Call, Result
from flaxattn.kernels._registry import ALL_FEATURES, Implementation, register
from flaxattn.kernels._single_head import MaskMod, ScoreMod
from flaxattn.kernels._visibility import Limits, Visibility

__all__ = [
    "DEFAULT_BLOCK_K",
    "DEFAULT_BLOCK_Q",
    "LONG_UNMASKED_BLOCKS",
    "LONG_UNMASKED_FROM",
    "blocked_attention",
    "blocked_attention_grads",
    "default_block_sizes",
    "prepare",
]


def blocked_attention(
    query: Float[ArrayLike, "B T N H"],
    key: Float[ArrayLike, "B S K H"],
    value: Float[ArrayLike, "B S K Hv"],
    *,
    bias: Float[ArrayLike, "#B #N #T #S"] | None = None,
    mask: Bool[ArrayLike, "#B #N #T #S"] | None = None,
    visibility: Visibility | None = None,
    limits: Limits | None = None,
    scale: float | Array = 1.0,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    block_sizes: tuple[int, int] | None = None,
) -> tuple[Float[ArrayLike, "B T N Hv"], Float[ArrayLike, "B N T"]]:
    """Flash-style attention: online softmax over key blocks, O(T) memory, custom VJP.

    Inputs are assumed validated (as by `flaxattn.dot_product_attention`).

    Args:
      query: `[B, T, N, H]`.
      key: `[B, S, K, H]`, `K` divides `N`.
      value: `[B, S, K, Hv]`.
      bias: float, rank 4, each axis 1 or full: broadcastable to `[B, N, T, S]`. Its gradient
        has its own shape (summed over the broadcast axes).
      mask: booleans (True = attend), broadcast like `bias`.
      visibility: causal / window / length masks, the same object the reference kernel uses.
      limits: explicit per-example `Limits` (`[B]` or scalars) instead of the visibility's
        lengths and alignment, for callers that attend one piece of a longer sequence (ring
        attention: the offset places these queries relative to these keys). Then
        `visibility` must carry no lengths.
      scale: logit multiplier (not differentiated).
      score_mod: `(score, q_idx, kv_idx) -> score` on the indices into these `query` and
        `key` arrays (not block-local; with `limits`, the piece's own), after the bias.
      mask_mod: `(q_idx, kv_idx) -> bool`, combined with the other masks by "and".
      block_sizes: `(block_q, block_k)`; default `default_block_sizes(T, S)`. Lengths that are
        not multiples are padded internally and the padding is masked.

    Returns:
      `(output [B, T, N, Hv] in query's dtype, logsumexp [B, N, T] float32)`; a row with
      nothing visible has output 0 and logsumexp -inf.
    """
    T = query.shape[1]
    p = prepare(
        query, key, value, bias, mask, visibility, limits, scale, score_mod, mask_mod,
        block_sizes,
    )
    out, lse = _attention(*p)
    return out[:, :T], lse[:, :, :T]


def blocked_attention_grads(
    query: Float[ArrayLike, "B T N H"],
    key: Float[ArrayLike, "B S K H"],
    value: Float[ArrayLike, "B S K Hv"],
    out: Float[ArrayLike, "B T N Hv"],
    lse: Float[ArrayLike, "B N T"],
    d_out: Float[ArrayLike, "B T N Hv"],
    d_lse: Float[ArrayLike, "B N T"] | None = None,
    *,
    bias: Float[ArrayLike, "#B #N #T #S"] | None = None,
    mask: Bool[ArrayLike, "#B #N #T #S"] | None = None,
    visibility: Visibility | None = None,
    limits: Limits | None = None,
    scale: float | Array = 1.0,
    mask_mod: MaskMod | None = None,
    block_sizes: tuple[int, int] | None = None,
) -> tuple[Array, Array, Array, Array | None]:
    """The blocked backward on its own: gradients of these keys' share of an attention whose
    softmax statistics are given.

    With `out` and `lse` of the whole attention (every key block, not only these), the result
    is this block's exact contribution to `(dq, dk, dv, dbias)`: ring attention sums it over
    the K/V blocks that visit a device. With this call's own `out, lse` it is the VJP of
    `blocked_attention`.

    Args:
      query, key, value, bias, mask, visibility, limits, scale, mask_mod, block_sizes: as for
        `blocked_attention` (no `score_mod`).
      out: `[B, T, N, Hv]`, the attention output the cotangent belongs to.
      lse: `[B, N, T]` float32, its logsumexp (-inf for an empty row).
      d_out: `[B, T, N, Hv]`, the output cotangent.
      d_lse: `[B, N, T]`, the logsumexp cotangent (None: zero).

    Returns:
      `(dq [B, T, N, H] float32, dk [B, S, K, H] float32, dv [B, S, K, Hv] float32,
      dbias in bias's shape, float32, or None)`.
    """
    T, S = query.shape[1], key.shape[1]
    p = prepare(
        query, key, value, bias, mask, visibility, limits, scale, None, mask_mod, block_sizes
    )
    t = p.tiling
    pad_rows = lambda x: pad_axis(x, 1, t.T)
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, t.T - T)), constant_values=-jnp.inf)
    d_lse = jnp.zeros_like(lse) if d_lse is None else pad_axis(d_lse, 2, t.T)
    dq, dk, dv, dbias, _ = backward(
        t.for_backward(), p.q, p.k, p.v, p.bias, p.mask, p.limits, p.scale, p.mods,
        pad_rows(out), lse, pad_rows(d_out), d_lse, p.plans.backward, dtype=jnp.float32,
    )
    if dbias is not None:
        dbias = dbias[:, :, : bias.shape[2], : bias.shape[3]]
    return dq[:, :T], dk[:, :S], dv[:, :S], dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(t, q, k, v, bias, mask, limits, scale, mods, plans):
    return forward(t, q, k, v, bias, mask, limits, scale, mods, plans.forward)


def _attention_fwd(t, q, k, v, bias, mask, limits, scale, mods, plans):
    out, lse = forward(t, q, k, v, bias, mask, limits, scale, mods, plans.forward)
    return (out, lse), (q, k, v, bias, mask, limits, scale, mods, plans, out, lse)


def _attention_bwd(t, residuals, cotangents):
    q, k, v, bias, mask, limits, scale, mods, plans, out, lse = residuals
    d_out, d_lse = cotangents
    dq, dk, dv, dbias, d_score_consts = backward(
        t.for_backward(), q, k, v, bias, mask, limits, scale, mods, out, lse, d_out, d_lse,
        plans.backward,
    )
    # Only the backward's (cols) copies of the score_mod arrays get their gradient; the same
    # arrays passed as the rows copies get none, so JAX's sum of the two is the gradient.
    nothing = lambda consts: tuple(None for _ in consts)
    d_mods = Mods(
        nothing(mods.score_rows), d_score_consts, nothing(mods.mask_rows), nothing(mods.mask_cols)
    )
    d_plans = jax.tree.map(lambda _: None, plans)
    return dq, dk, dv, dbias, None, None, None, d_mods, d_plans


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------- registry


def run(call: Call) -> Result:
    """The registry's entry: the call's operands through `blocked_attention`."""
    out, lse = blocked_attention(
        call.query, call.key, call.value, bias=call.bias, mask=call.mask,
        visibility=call.visibility, scale=call.scale, score_mod=call.score_mod,
        mask_mod=call.mask_mod, block_sizes=call.block_sizes,
    )
    return Result(out, lse)


register(
    Implementation(
        "blocked",
        run,
        "flash-style in plain JAX: online softmax over key blocks, O(T) memory, empty blocks "
        "skipped, a custom_vjp backward that recomputes blocks",
        # It never forms the [T, S] weights: none to return, none to drop out.
        supports=ALL_FEATURES - {"weights", "dropout"},
        # Below this many keys the loop overhead outweighs the [T, S] it saves.
        min_kv_length=256,
    )
)
