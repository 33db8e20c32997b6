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
- The loops have *scalar* bounds: a scan over `(b, i)`, then a `fori_loop` over exactly the
  key blocks that `Visibility.key_range` allows, so blocks emptied by causal, window or length
  masks cost nothing. A `lax.cond` also keeps the elementwise mask off blocks that the
  structured masks leave fully visible, and no mask is built at all when nothing can be hidden.
  (Under a user's `jax.vmap` over the lengths JAX turns these into selects: still correct, with
  less skipping.)
- 16-bit inputs (bf16, fp16) are multiplied in their own dtype, accumulating in float32, and
  the weights are rounded to it for the `p v` products (as FlashAttention does on GPUs, and
  PyTorch's CPU kernel): bf16 dots run on AMX units or tensor cores, about 3x float32 dots
  on the AVX-512/AMX CPU. Scores, softmax and accumulators stay float32.
- The backward is a `jax.custom_vjp` that recomputes each block from `q, k, v` and the saved
  logsumexp instead of storing `[T, S]` weights. Key blocks are outside and query blocks inside,
  so dK and dV accumulate in block-sized carries and only dQ (and dbias) are updated in place.
  The cotangent of the logsumexp (`∂lse/∂s = p`) is honoured, so that callers such as ring
  attention can merge partial results by their logsumexp.

`score_mod` and `mask_mod` are evaluated per block on global indices `q_idx [bq, 1]`,
`kv_idx [1, bk]`; `score_mod` is vmapped over heads, so it sees `[bq, bk]` scores as in the
reference kernel. Arrays they close over are hoisted with `jax.closure_convert`, so closing over
traced values works under jit and vmap. Gradients flow through `score_mod`: to the scores, and to
the floating-point arrays it closes over (a learned relative-position table, ALiBi slopes), summed
over blocks. `mask_mod` is boolean, so nothing flows through it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jaxtyping import Bool, Float

from flaxattn.kernels._single_head import MaskMod, ScoreMod
from flaxattn.kernels._visibility import Limits, Visibility

# Default blocks, tuned on the 2-core AVX-512 CPU at N=8, H=64 (benchmarks/blocked_cpu.py).
# XLA:CPU's dots (YNNPACK) are more efficient the more work each call has, so blocks are large;
# a long unmasked forward does best with tall query blocks (1024 x 128: ~8% faster at T=4096),
# while causal/window masks want 512-row blocks, which waste less on the diagonal, and the
# backward is fastest at 512 x 256 whatever the forward used.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 256
LONG_UNMASKED_BLOCKS = (1024, 128)  # forward only, T >= LONG_UNMASKED_FROM, no structured mask
LONG_UNMASKED_FROM = 2048


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _even_block(length: int, target: int) -> int:
    """The smallest block `<= target` (a multiple of 8) that covers `length` in as few blocks
    as `target` does, so that padding stays small."""
    if length <= target:
        return length
    blocks = -(-length // target)
    return _round_up(-(-length // blocks), 8)


def default_block_sizes(T: int, S: int, *, masked: bool = True) -> tuple[int, int]:
    """`(block_q, block_k)` for lengths `T, S`: the tuned defaults, evened out over the length
    (no padding when the lengths are multiples of the defaults). `masked=False` (no causal,
    window or length mask) picks the long-unmasked blocks from `LONG_UNMASKED_FROM` on."""
    bq, bk = DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K
    if not masked and min(T, S) >= LONG_UNMASKED_FROM:
        bq, bk = LONG_UNMASKED_BLOCKS
    return _even_block(T, bq), _even_block(S, bk)


def _backward_blocks(T: int, S: int, bq: int, bk: int) -> tuple[int, int]:
    """The backward's blocks for padded lengths `T, S` (multiples of the forward's `bq, bk`):
    the default 512 x 256 where they divide the lengths, else the forward's."""
    bq = DEFAULT_BLOCK_Q if T % DEFAULT_BLOCK_Q == 0 else bq
    bk = DEFAULT_BLOCK_K if S % DEFAULT_BLOCK_K == 0 else bk
    return bq, bk


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static part of one call: padded sizes, blocks, masking and the per-block functions."""

    B: int
    T: int  # padded query length, nq · bq
    S: int  # padded key length, nk · bk
    K: int
    G: int
    H: int
    Hv: int
    bq: int
    bk: int
    dtype: Any  # the products' operand dtype: the inputs' if 16-bit, else float32
    scale_at: str  # where the logit scale applies: "query", "scores" or "softmax" (_scale_at)
    backward_blocks: tuple[int, int]  # the backward's (bq, bk): they divide T and S too
    visibility: Visibility  # is_causal / window / alignment only; lengths travel as Limits
    masking: str  # "never", "edges" (blocks the structured masks cut) or "always"
    # score_mod / mask_mod closure-converted for the forward's tile orientation (rows: scores
    # [K, G, bq, bk], q_idx [bq, 1], kv_idx [1, bk]) and the backward's (cols: [K, bk, G, bq],
    # q_idx [1, bq], kv_idx [bk, 1]); both elementwise, so each sees the same values.
    score_mod: tuple[Callable, Callable] | None  # (s, q_idx, kv_idx, *consts) -> s
    mask_mod: tuple[Callable, Callable] | None  # (q_idx, kv_idx, *consts) -> bool

    @property
    def N(self) -> int:
        return self.K * self.G

    @property
    def M(self) -> int:
        """Rows of one kv head's block: its G query heads times bq queries."""
        return self.G * self.bq

    @property
    def nq(self) -> int:
        return self.T // self.bq

    @property
    def nk(self) -> int:
        return self.S // self.bk


class _Mods(NamedTuple):
    """Arrays hoisted out of the `score_mod` / `mask_mod` closures, per tile orientation
    (custom_vjp arguments: the same arrays appear in both orientations)."""

    score_rows: tuple[Array, ...] = ()
    score_cols: tuple[Array, ...] = ()
    mask_rows: tuple[Array, ...] = ()
    mask_cols: tuple[Array, ...] = ()


def _pad_axis(x: Array, axis: int, size: int) -> Array:
    if x.shape[axis] in (1, size):
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


class _Prepared(NamedTuple):
    """One call's plan and its padded operands (what the forward and the backward share)."""

    plan: _Plan
    q: Array
    k: Array
    v: Array
    bias: Array | None
    mask: Array | None
    limits: Limits
    scale: Array
    mods: _Mods


def _product_dtype(dtype: Any) -> Any:
    """The products' operand dtype: 16-bit inputs (bf16, fp16) their own, with float32
    accumulation, as FlashAttention on GPUs (bf16 dots use AMX or tensor cores); else float32."""
    return dtype if jnp.dtype(dtype).itemsize == 2 else jnp.float32


def _scale_at(dtype: Any, scale: float | Array, bias: Array | None, score_mod) -> str:
    """Where the logit scale is applied.

    - "query": float32 products; the query block is scaled once per block (an `[M, H]`
      multiply instead of an `[M, bk]` one per tile).
    - "scores": 16-bit products stay exact products of the inputs (a scaled 16-bit query would
      be rounded again), so the float32 score tile is scaled, before bias and score_mod.
    - "softmax": as "scores", but with no bias or score_mod and a known positive scale the
      row maximum is taken on the raw products and scaled after (`max(c·s) = c·max(s)` for
      `c > 0`, rounding is monotone), so the scaling fuses into the exponential instead of
      costing its own pass over the tile.
    """
    if dtype == jnp.float32:
        return "query"
    if bias is None and score_mod is None and isinstance(scale, float) and scale > 0:
        return "softmax"
    return "scores"


def _prepare(
    query, key, value, bias, mask, visibility, limits, scale, score_mod, mask_mod, block_sizes
) -> _Prepared:
    """Pick the blocks, pad, and hoist the mods (the public entry has validated the inputs)."""
    visibility = Visibility() if visibility is None else visibility
    B, T, N, H = query.shape
    S, K, Hv = key.shape[1], key.shape[2], value.shape[3]
    G = N // K
    structured = not visibility.is_trivial or limits is not None
    if block_sizes is None:
        bq, bk = default_block_sizes(T, S, masked=structured)
    else:
        bq, bk = min(int(block_sizes[0]), T), min(int(block_sizes[1]), S)
    Tp, Sp = _round_up(T, bq), _round_up(S, bk)

    if limits is None:
        limits = visibility.limits(B, T, S)
    else:
        if visibility.q_lengths is not None or visibility.kv_lengths is not None:
            raise ValueError("pass lengths either in visibility or in limits, not both")
        limits = Limits(*(jnp.broadcast_to(jnp.asarray(x, jnp.int32), (B,)) for x in limits))
    # Padded keys are hidden by kv_len (padded queries need no mask: their rows are dropped).
    # The offset keeps the unpadded lengths, so alignment is unchanged.
    limits = Limits(
        jnp.clip(limits.q_len, 0, T), jnp.clip(limits.kv_len, 0, S), limits.offset
    )

    if mask is not None or mask_mod is not None:
        masking = "always"
    elif not structured and Sp == S:
        masking = "never"
    else:
        masking = "edges"

    # The mods, per orientation: index shapes, then the per-head score_mod (vmapped over K
    # and G) with its score tile shape.
    idx = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    rows = (idx(bq, 1), idx(1, bk))
    cols = (idx(1, bq), idx(bk, 1))
    mods = _Mods()
    converted_score_mod = converted_mask_mod = None
    if score_mod is not None:
        tile = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
        per_head_rows = jax.vmap(jax.vmap(score_mod, (0, None, None)), (0, None, None))
        per_head_cols = jax.vmap(jax.vmap(score_mod, (1, None, None), 1), (0, None, None))
        fn_rows, consts_rows = jax.closure_convert(per_head_rows, tile(K, G, bq, bk), *rows)
        fn_cols, consts_cols = jax.closure_convert(per_head_cols, tile(K, bk, G, bq), *cols)
        converted_score_mod = (fn_rows, fn_cols)
        mods = mods._replace(score_rows=tuple(consts_rows), score_cols=tuple(consts_cols))
    if mask_mod is not None:
        fn_rows, consts_rows = jax.closure_convert(mask_mod, *rows)
        fn_cols, consts_cols = jax.closure_convert(mask_mod, *cols)
        converted_mask_mod = (fn_rows, fn_cols)
        mods = mods._replace(mask_rows=tuple(consts_rows), mask_cols=tuple(consts_cols))

    # The mods were converted for (bq, bk) tiles, so with mods the backward keeps those blocks.
    backward_blocks = (bq, bk)
    if block_sizes is None and score_mod is None and mask_mod is None:
        backward_blocks = _backward_blocks(Tp, Sp, bq, bk)
    dtype = _product_dtype(query.dtype)
    plan = _Plan(
        B=B, T=Tp, S=Sp, K=K, G=G, H=H, Hv=Hv, bq=bq, bk=bk, dtype=dtype,
        scale_at=_scale_at(dtype, scale, bias, score_mod), backward_blocks=backward_blocks,
        visibility=dataclasses.replace(visibility, q_lengths=None, kv_lengths=None),
        masking=masking, score_mod=converted_score_mod, mask_mod=converted_mask_mod,
    )
    if bias is not None:
        bias = _pad_axis(_pad_axis(bias, 2, Tp), 3, Sp)
    if mask is not None:
        mask = _pad_axis(_pad_axis(mask, 2, Tp), 3, Sp)
    return _Prepared(
        plan, _pad_axis(query, 1, Tp), _pad_axis(key, 1, Sp), _pad_axis(value, 1, Sp),
        bias, mask, limits, jnp.asarray(scale, jnp.float32), mods,
    )


def blocked_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S K H"],
    value: Float[Array, "B S K Hv"],
    *,
    bias: Float[Array, "B N T S"] | None = None,
    mask: Bool[Array, "B N T S"] | None = None,
    visibility: Visibility | None = None,
    limits: Limits | None = None,
    scale: float | Array = 1.0,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    block_sizes: tuple[int, int] | None = None,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B N T"]]:
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
    p = _prepare(
        query, key, value, bias, mask, visibility, limits, scale, score_mod, mask_mod,
        block_sizes,
    )
    out, lse = _attention(*p)
    return out[:, :T], lse[:, :, :T]


def blocked_attention_grads(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S K H"],
    value: Float[Array, "B S K Hv"],
    out: Float[Array, "B T N Hv"],
    lse: Float[Array, "B N T"],
    d_out: Float[Array, "B T N Hv"],
    d_lse: Float[Array, "B N T"] | None = None,
    *,
    bias: Float[Array, "B N T S"] | None = None,
    mask: Bool[Array, "B N T S"] | None = None,
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
    p = _prepare(
        query, key, value, bias, mask, visibility, limits, scale, None, mask_mod, block_sizes
    )
    plan = p.plan
    bq, bk = plan.backward_blocks
    pad_rows = lambda x: _pad_axis(x, 1, plan.T)
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, plan.T - T)), constant_values=-jnp.inf)
    d_lse = jnp.zeros_like(lse) if d_lse is None else _pad_axis(d_lse, 2, plan.T)
    dq, dk, dv, dbias, _ = _backward(
        dataclasses.replace(plan, bq=bq, bk=bk), p.q, p.k, p.v, p.bias, p.mask, p.limits,
        p.scale, p.mods, pad_rows(out), lse, pad_rows(d_out), d_lse, dtype=jnp.float32,
    )
    if dbias is not None:
        dbias = dbias[:, :, : bias.shape[2], : bias.shape[3]]
    return dq[:, :T], dk[:, :S], dv[:, :S], dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan, q, k, v, bias, mask, limits, scale, mods):
    return _forward(plan, q, k, v, bias, mask, limits, scale, mods)


def _attention_fwd(plan, q, k, v, bias, mask, limits, scale, mods):
    out, lse = _forward(plan, q, k, v, bias, mask, limits, scale, mods)
    return (out, lse), (q, k, v, bias, mask, limits, scale, mods, out, lse)


def _attention_bwd(plan, residuals, cotangents):
    q, k, v, bias, mask, limits, scale, mods, out, lse = residuals
    d_out, d_lse = cotangents
    bq, bk = plan.backward_blocks
    dq, dk, dv, dbias, d_score_consts = _backward(
        dataclasses.replace(plan, bq=bq, bk=bk),
        q, k, v, bias, mask, limits, scale, mods, out, lse, d_out, d_lse,
    )
    # Only the backward's (cols) copies of the score_mod arrays get their gradient; the same
    # arrays passed as the rows copies get none, so JAX's sum of the two is the gradient.
    nothing = lambda consts: tuple(None for _ in consts)
    d_mods = _Mods(
        nothing(mods.score_rows), d_score_consts, nothing(mods.mask_rows), nothing(mods.mask_cols)
    )
    return dq, dk, dv, dbias, None, None, None, d_mods


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------- block pieces


def _example_limits(limits: Limits, b: Array) -> Limits:
    return Limits(limits.q_len[b], limits.kv_len[b], limits.offset[b])


def _rows(x: Array, b: Array, start: Array, size: int) -> Array:
    """`x[b, start:start + size]` of a `[B, L, ...]` array, without copying the example."""
    starts = (b, start) + (0,) * (x.ndim - 2)
    return lax.dynamic_slice(x, starts, (1, size) + x.shape[2:])[0]


def _add_rows(x: Array, block: Array, b: Array, start: Array) -> Array:
    """`x[b, start:start + len(block)] += block`, in place."""
    starts = (b, start) + (0,) * (x.ndim - 2)
    current = lax.dynamic_slice(x, starts, (1,) + block.shape)
    return lax.dynamic_update_slice(x, current + block[None], starts)


def _heads_major(x: Array, K: int, dtype: Any) -> Array:
    """`[L, N, H]` -> `[K, G·L, H]` (the rows of one kv head's G query heads) in `dtype`."""
    L, N, H = x.shape
    x = x.astype(dtype).reshape(L, K, N // K, H).transpose(1, 2, 0, 3)  # [K, G, L, H]
    return x.reshape(K, N // K * L, H)


def _query_block(plan: _Plan, x: Array, scale: Array) -> Array:
    """`[bq, N, H]` -> the `[K, G·bq, H]` query operand of the products, scaled if
    `plan.scale_at == "query"`."""
    qs = _heads_major(x, plan.K, plan.dtype)
    return qs * scale if plan.scale_at == "query" else qs


def _softmax_scores(plan: _Plan, s: Array, scale: Array) -> Array:
    """The scores the softmax exponentiates: `_logits`' tile, scaled if
    `plan.scale_at == "softmax"` (which left it unscaled)."""
    return s * scale if plan.scale_at == "softmax" else s


def _rows_major(x: Array, L: int) -> Array:
    """`[K, G·L, H]` -> `[L, N, H]`, the inverse of `_heads_major`."""
    K, M, H = x.shape
    return x.reshape(K, M // L, L, H).transpose(2, 0, 1, 3).reshape(L, M // L * K, H)


def _broadcast_block(x: Array, plan: _Plan, b, q_start, kv_start) -> Array:
    """The `[K|1, G|1, bq|1, bk|1]` block of a `[B|1, N|1, T|1, S|1]` bias or mask."""
    nb, nn, nt, ns = x.shape
    starts = (b if nb > 1 else 0, 0, q_start if nt > 1 else 0, kv_start if ns > 1 else 0)
    sizes = (1, nn, plan.bq if nt > 1 else 1, plan.bk if ns > 1 else 1)
    block = lax.dynamic_slice(x, starts, sizes)[0]
    heads = (plan.K, plan.G) if nn > 1 else (1, 1)
    return block.reshape(heads + block.shape[1:])


def _block_is_full(plan: _Plan, lim: Limits, q_start, kv_start) -> Array:
    """Whether the structured masks leave the whole block visible.

    Each query row sees one contiguous key interval whose ends never decrease with the row
    (lengths, causal and window masks all have this shape), so checking the four corners with
    `Visibility.visible` is exact.
    """
    vis = plan.visibility
    q_last, kv_last = q_start + plan.bq - 1, kv_start + plan.bk - 1
    corners = [vis.visible(qi, ki, lim) for qi in (q_start, q_last) for ki in (kv_start, kv_last)]
    return functools.reduce(jnp.logical_and, corners)


def _key_block_range(plan: _Plan, q_start, lim: Limits) -> tuple[Array, Array]:
    """`[j_lo, j_hi)`: the key blocks that some query in `[q_start, q_start + bq)` can see."""
    lo, hi = plan.visibility.key_range(q_start, q_start + plan.bq, lim)
    j_lo = lo // plan.bk
    j_hi = jnp.where(hi > lo, (hi + plan.bk - 1) // plan.bk, j_lo)
    return j_lo, j_hi


@dataclasses.dataclass(frozen=True)
class _Block:
    """Where a block sits: example `b`, first query `q_start`, first key `kv_start`."""

    b: Array
    q_start: Array
    kv_start: Array
    limits: Limits


def _logits(plan: _Plan, qs, kb, scale, bias, mods: _Mods, mask, at: _Block, masked: bool,
            cols: bool = False):
    """One block's scores, hidden entries -inf; also, for the backward, the visible mask (or
    None) and score_mod's VJP (or None).

    `qs` is the query block `[K, G·bq, H]` from `_query_block`, `kb` the key block `[K, bk, H]`
    (both in `plan.dtype`); `scale` multiplies the scores if `plan.scale_at == "scores"`. The
    tile is `[K, G·bq, bk]` (rows: queries down, as the forward's softmax wants) or, with `cols`,
    `[K, bk, G·bq]` (keys down: every backward matmul is then a plain or NT product, which are
    about twice as fast on CPU as products that contract a tile's leading axis).
    """
    K, G, bq, bk = plan.K, plan.G, plan.bq, plan.bk
    if cols:
        s = jnp.einsum("ksh,kmh->ksm", kb, qs, preferred_element_type=jnp.float32)
        tile = (K, bk, G, bq)
        q_idx = at.q_start + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
        kv_idx = at.kv_start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
        orient = lambda block: block.transpose(0, 3, 1, 2)  # [K|1, G|1, bq|1, bk|1] -> tile
        spread = lambda visible: visible[:, None, :]  # [bk, bq] -> [bk, 1, bq]
    else:
        s = jnp.einsum("kmh,ksh->kms", qs, kb, preferred_element_type=jnp.float32)
        tile = (K, G, bq, bk)
        q_idx = at.q_start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        kv_idx = at.kv_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        orient = spread = lambda x: x
    if plan.scale_at == "scores":
        s = s * scale
    flat = s.shape
    if bias is not None:
        block = _broadcast_block(bias, plan, at.b, at.q_start, at.kv_start)
        s = s.reshape(tile) + orient(block).astype(jnp.float32)
    mod_vjp = None
    if plan.score_mod is not None:
        fn, consts = plan.score_mod[cols], (mods.score_cols if cols else mods.score_rows)
        s, mod_vjp = jax.vjp(lambda s, *c: fn(s, q_idx, kv_idx, *c), s.reshape(tile), *consts)
        s = s.astype(jnp.float32)
    visible = None
    if masked:
        visible = plan.visibility.visible(q_idx, kv_idx, at.limits)
        if plan.mask_mod is not None:
            consts = mods.mask_cols if cols else mods.mask_rows
            visible = visible & plan.mask_mod[cols](q_idx, kv_idx, *consts)
        visible = spread(visible)
        if mask is not None:
            visible = visible & orient(_broadcast_block(mask, plan, at.b, at.q_start, at.kv_start))
        s = jnp.where(visible, s.reshape(tile), -jnp.inf)
    return s.reshape(flat), visible, mod_vjp


def _masked_or_not(plan: _Plan, step: Callable, at: _Block, carry: Any, skip: Array | None = None):
    """Run `step(carry, masked)` with the mask only where the block needs it.

    With `skip`, `step` returns `(carry, block_results)`, and a skipped block leaves the carry
    unchanged and gives zero results.
    """
    if plan.masking != "edges":
        branches = [functools.partial(step, masked=plan.masking == "always")]
        which = jnp.int32(0)
    else:
        branches = [functools.partial(step, masked=False), functools.partial(step, masked=True)]
        full = _block_is_full(plan, at.limits, at.q_start, at.kv_start)
        which = jnp.where(full, 0, 1)
    if skip is not None:
        zeros = lambda x: jnp.zeros(x.shape, x.dtype)
        results = jax.eval_shape(branches[0], carry)[1]
        branches.append(lambda carry: (carry, jax.tree.map(zeros, results)))
        which = jnp.where(skip, len(branches) - 1, which)
    if len(branches) == 1:
        return branches[0](carry)
    return lax.switch(which, branches, carry)


# ----------------------------------------------------------------------------- forward


def _forward(plan: _Plan, q, k, v, bias, mask, limits, scale, mods: _Mods):
    K, bq, bk, M = plan.K, plan.bq, plan.bk, plan.M

    def query_block(index):
        b, i = index // plan.nq, index % plan.nq
        lim = _example_limits(limits, b)
        q_start = i * bq
        qs = _query_block(plan, _rows(q, b, q_start, bq), scale)  # [K, M, H]

        def body(j, carry):
            at = _Block(b, q_start, j * bk, lim)

            def step(carry, masked):
                m, total, acc = carry
                kb = _heads_major(_rows(k, b, at.kv_start, bk), K, plan.dtype)  # [K, bk, H]
                vb = _heads_major(_rows(v, b, at.kv_start, bk), K, plan.dtype)  # [K, bk, Hv]
                s, _, _ = _logits(plan, qs, kb, scale, bias, mods, mask, at, masked)  # [K, M, bk]
                row_max = s.max(axis=-1)
                if plan.scale_at == "softmax":
                    row_max = row_max * scale
                m_new = jnp.maximum(m, row_max)
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all hidden so far: keep 0s
                p = jnp.exp(_softmax_scores(plan, s, scale) - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                total = alpha * total + p.sum(axis=-1)
                pv = jnp.einsum(
                    "kms,ksv->kmv", p.astype(plan.dtype), vb, preferred_element_type=jnp.float32
                )
                return m_new, total, alpha[..., None] * acc + pv

            return _masked_or_not(plan, step, at, carry)

        j_lo, j_hi = _key_block_range(plan, q_start, lim)
        init = (
            jnp.full((K, M), -jnp.inf, jnp.float32),
            jnp.zeros((K, M), jnp.float32),
            jnp.zeros((K, M, plan.Hv), jnp.float32),
        )
        m, total, acc = lax.fori_loop(j_lo, j_hi, body, init)
        empty = total == 0.0
        total = jnp.where(empty, 1.0, total)
        out = acc / total[..., None]  # [K, M, Hv]
        lse = jnp.where(empty, -jnp.inf, m + jnp.log(total))  # [K, M]
        return _rows_major(out, bq).astype(q.dtype), lse

    out, lse = lax.map(query_block, jnp.arange(plan.B * plan.nq))
    # out [B·nq, bq, N, Hv]; lse [B·nq, K, G·bq] = [B·nq, N, bq]
    out = out.reshape(plan.B, plan.T, plan.N, plan.Hv)
    lse = lse.reshape(plan.B, plan.nq, plan.N, bq).transpose(0, 2, 1, 3)
    return out, lse.reshape(plan.B, plan.N, plan.T)


# ----------------------------------------------------------------------------- backward


def _backward(
    plan: _Plan, q, k, v, bias, mask, limits, scale, mods, out, lse, d_out, d_lse, dtype=None
):
    """Gradients by recomputation, block by block, on key-major tiles (`ᵀ`: `[K, bk, G·bq]`):

        pᵀ = exp(sᵀ - lse)   dV += pᵀ dO   dpᵀ = V dOᵀ   dsᵀ = pᵀ ⊙ (dpᵀ - rowsum(dO ⊙ O) + dlse)
        dK += dsᵀ q·scale    dQᵀ += scale · Kᵀ dsᵀ
    """
    K, G, bq, bk, nq = plan.K, plan.G, plan.bq, plan.bk, plan.nq
    # Row terms [B, K, G, T]: delta = rowsum(dO ⊙ O) - dlse, and the logsumexp with empty
    # rows at +inf so that exp(s - lse) is 0 there rather than NaN.
    delta = jnp.einsum(
        "btnv,btnv->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32)
    ) - d_lse.astype(jnp.float32)
    delta = delta.reshape(plan.B, K, G, plan.T)
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse).reshape(plan.B, K, G, plan.T)

    # The key range of every query block: block (i, j) is computed iff j meets range i.
    q_starts = jnp.arange(nq) * bq
    lo, hi = plan.visibility.key_range(
        q_starts, q_starts + bq, Limits(*(x[:, None] for x in limits))
    )  # [B, nq]

    def key_block(carry, index):
        b, j = index // plan.nk, index % plan.nk
        lim = _example_limits(limits, b)
        kv_start = j * bk
        kb = _heads_major(_rows(k, b, kv_start, bk), K, plan.dtype)  # [K, bk, H]
        k_t = kb.transpose(0, 2, 1)  # [K, H, bk]
        vb = _heads_major(_rows(v, b, kv_start, bk), K, plan.dtype)  # [K, bk, Hv]
        needed = (hi[b] > lo[b]) & (lo[b] < kv_start + bk) & (hi[b] > kv_start)  # [nq]
        any_needed = needed.any()
        i_lo = jnp.where(any_needed, jnp.argmax(needed), 0)
        i_hi = jnp.where(any_needed, nq - jnp.argmax(needed[::-1]), 0)

        def rows(x, q_start):  # [B, K, G, T] -> [K, 1, G·bq]
            x = lax.dynamic_slice(x, (b, 0, 0, q_start), (1, K, G, bq))
            return x.reshape(K, 1, G * bq)

        def body(i, carry):
            at = _Block(b, i * bq, kv_start, lim)

            def step(carry, masked):
                dk, dv, dconsts = carry
                qs = _query_block(plan, _rows(q, b, at.q_start, bq), scale)  # [K, M, H]
                do = _heads_major(_rows(d_out, b, at.q_start, bq), K, plan.dtype)  # [K, M, Hv]
                s_t, visible, mod_vjp = _logits(
                    plan, qs, kb, scale, bias, mods, mask, at, masked, cols=True
                )  # [K, bk, M]
                p_t = jnp.exp(_softmax_scores(plan, s_t, scale) - rows(lse, at.q_start))
                dv = dv + jnp.einsum(
                    "ksm,kmv->ksv", p_t.astype(plan.dtype), do, preferred_element_type=jnp.float32
                )
                dp_t = jnp.einsum("ksv,kmv->ksm", vb, do, preferred_element_type=jnp.float32)
                ds_t = p_t * (dp_t - rows(delta, at.q_start))
                if mod_vjp is not None:
                    ds_t, *d_block_consts = mod_vjp(ds_t.reshape(K, bk, G, bq))
                    dconsts = tuple(a + c for a, c in zip(dconsts, d_block_consts, strict=True))
                    if visible is not None:  # hidden entries may hold anything, even NaN
                        ds_t = jnp.where(visible, ds_t, 0.0)
                    ds_t = ds_t.reshape(K, bk, G * bq)
                ds_p = ds_t.astype(plan.dtype)
                dk = dk + jnp.einsum("ksm,kmh->ksh", ds_p, qs, preferred_element_type=jnp.float32)
                dq_t = jnp.einsum("khs,ksm->khm", k_t, ds_p, preferred_element_type=jnp.float32)
                dq_block = (dq_t * scale).reshape(K, plan.H, G, bq).transpose(3, 0, 2, 1)
                dbias_block = None if bias is None else _bias_block_grad(plan, ds_t, bias.shape)
                return (dk, dv, dconsts), (dq_block.reshape(bq, plan.N, plan.H), dbias_block)

            # dQ and dbias are whole-length arrays: they are updated here, outside the switch,
            # because a buffer passed through a conditional is copied at every step.
            dk, dv, dq, dbias, dconsts = carry
            (dk, dv, dconsts), (dq_block, dbias_block) = _masked_or_not(
                plan, step, at, (dk, dv, dconsts), skip=~needed[i]
            )
            dq = _add_rows(dq, dq_block, b, at.q_start)
            if dbias is not None:
                dbias = _add_bias_block(dbias, dbias_block, at)
            return dk, dv, dq, dbias, dconsts

        dq, dbias, dconsts = carry
        init = (
            jnp.zeros((K, bk, plan.H), jnp.float32),
            jnp.zeros((K, bk, plan.Hv), jnp.float32),
            dq,
            dbias,
            dconsts,
        )
        dk, dv, dq, dbias, dconsts = lax.fori_loop(i_lo, i_hi, body, init)
        if plan.scale_at != "query":  # the products used unscaled queries
            dk = dk * scale
        dk = _rows_major(dk, bk)  # [bk, K, H]
        dv = _rows_major(dv, bk)  # [bk, K, Hv]
        return (dq, dbias, dconsts), (dk, dv)

    dq = jnp.zeros((plan.B, plan.T, plan.N, plan.H), jnp.float32)
    dbias = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
    dconsts = tuple(jnp.zeros(c.shape, jnp.float32) for c in mods.score_cols)
    (dq, dbias, dconsts), (dk, dv) = lax.scan(
        key_block, (dq, dbias, dconsts), jnp.arange(plan.B * plan.nk)
    )
    dk = dk.reshape(plan.B, plan.S, K, plan.H)
    dv = dv.reshape(plan.B, plan.S, K, plan.Hv)
    dconsts = tuple(d.astype(c.dtype) for d, c in zip(dconsts, mods.score_cols, strict=True))
    if dtype is not None:  # the caller sums several blocks' shares: keep float32
        return dq.astype(dtype), dk.astype(dtype), dv.astype(dtype), dbias, dconsts
    dbias = None if dbias is None else dbias.astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, dconsts


def _bias_block_grad(plan: _Plan, ds_t: Array, bias_shape: tuple[int, ...]) -> Array:
    """A block's `dsᵀ [K, bk, G·bq]` as its `[N|1, bq|1, bk|1]` share of the gradient of a
    `[B|1, N|1, T|1, S|1]` bias: summed over the axes along which the bias broadcasts."""
    _, nn, nt, ns = bias_shape
    ds = ds_t.reshape(plan.K, plan.bk, plan.G, plan.bq).transpose(0, 2, 3, 1)
    ds = ds.reshape(plan.N, plan.bq, plan.bk)
    axes = tuple(a for a, size in enumerate((nn, nt, ns)) if size == 1)
    return ds.sum(axis=axes, keepdims=True) if axes else ds


def _add_bias_block(dbias: Array, block: Array, at: _Block) -> Array:
    """`dbias[b, :, q_start:, kv_start:] += block` (offsets only along the axes dbias has)."""
    nb, _, nt, ns = dbias.shape
    starts = (at.b if nb > 1 else 0, 0, at.q_start if nt > 1 else 0, at.kv_start if ns > 1 else 0)
    current = lax.dynamic_slice(dbias, starts, (1,) + block.shape)
    return lax.dynamic_update_slice(dbias, current + block[None], starts)
