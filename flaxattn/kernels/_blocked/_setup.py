"""One call's set-up: block sizes, padding, the block plan, and the modifiers made hoistable."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike

from flaxattn.kernels._plan import BlockPlan, plan_blocks
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


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _even_block(length: int, target: int) -> int:
    """The smallest block `<= target` (a multiple of 8) that covers `length` in as few blocks
    as `target` does, so that padding stays small."""
    if length <= target:
        return length
    blocks = -(-length // target)
    return round_up(-(-length // blocks), 8)


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
class Tiling:
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

    def for_backward(self) -> Tiling:
        """The same call with the backward's blocks."""
        bq, bk = self.backward_blocks
        return dataclasses.replace(self, bq=bq, bk=bk)


class Mods(NamedTuple):
    """Arrays hoisted out of the `score_mod` / `mask_mod` closures, per tile orientation
    (custom_vjp arguments: the same arrays appear in both orientations)."""

    score_rows: tuple[Array, ...] = ()
    score_cols: tuple[Array, ...] = ()
    mask_rows: tuple[Array, ...] = ()
    mask_cols: tuple[Array, ...] = ()


class Plans(NamedTuple):
    """The block plans of the forward's and the backward's blocks (the same when they agree)."""

    forward: BlockPlan
    backward: BlockPlan


class Prepared(NamedTuple):
    """One call's tiling, its padded operands and its block plans (what both passes share)."""

    tiling: Tiling
    q: ArrayLike
    k: ArrayLike
    v: ArrayLike
    bias: ArrayLike | None
    mask: ArrayLike | None
    limits: Limits
    scale: ArrayLike
    mods: Mods
    plans: Plans


def pad_axis(x: ArrayLike, axis: int, size: int) -> Array:
    if x.shape[axis] in (1, size):
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _product_dtype(dtype: Any) -> Any:
    """The products' operand dtype: 16-bit inputs (bf16, fp16) their own, with float32
    accumulation, as FlashAttention on GPUs (bf16 dots use AMX or tensor cores); else float32."""
    return dtype if jnp.dtype(dtype).itemsize == 2 else jnp.float32


def _scale_at(dtype: Any, scale: float | Array, bias: ArrayLike | None, score_mod) -> str:
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


def _hoist_mods(score_mod, mask_mod, K: int, G: int, bq: int, bk: int):
    """The mods closure-converted for both tile orientations, and the arrays they close over.

    `score_mod` is vmapped over the K and G heads of a tile, so it sees `[bq, bk]` scores as in
    the reference kernel. Arrays it closes over become explicit arguments (`jax.closure_convert`),
    so closing over traced values works under jit and vmap, and gradients reach them.
    """
    idx = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    rows = (idx(bq, 1), idx(1, bk))
    cols = (idx(1, bq), idx(bk, 1))
    mods = Mods()
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
    return converted_score_mod, converted_mask_mod, mods


def prepare(
    query, key, value, bias, mask, visibility, limits, scale, score_mod, mask_mod, block_sizes
) -> Prepared:
    """Pick the blocks, pad, plan the blocks and hoist the mods (inputs are validated)."""
    visibility = Visibility() if visibility is None else visibility
    B, T, N, H = query.shape
    S, K, Hv = key.shape[1], key.shape[2], value.shape[3]
    G = N // K
    structured = not visibility.is_trivial or limits is not None
    if block_sizes is None:
        bq, bk = default_block_sizes(T, S, masked=structured)
    else:
        bq, bk = min(int(block_sizes[0]), T), min(int(block_sizes[1]), S)
    Tp, Sp = round_up(T, bq), round_up(S, bk)

    # Lengths the same for every example share one plan.
    shared = limits is None and visibility.q_lengths is None and visibility.kv_lengths is None
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

    score_fns, mask_fns, mods = _hoist_mods(score_mod, mask_mod, K, G, bq, bk)
    # The mods were converted for (bq, bk) tiles, so with mods the backward keeps those blocks.
    backward_blocks = (bq, bk)
    if block_sizes is None and score_mod is None and mask_mod is None:
        backward_blocks = _backward_blocks(Tp, Sp, bq, bk)
    dtype = _product_dtype(query.dtype)
    structure = dataclasses.replace(visibility, q_lengths=None, kv_lengths=None)
    tiling = Tiling(
        B=B, T=Tp, S=Sp, K=K, G=G, H=H, Hv=Hv, bq=bq, bk=bk, dtype=dtype,
        scale_at=_scale_at(dtype, scale, bias, score_mod), backward_blocks=backward_blocks,
        visibility=structure, masking=masking, score_mod=score_fns, mask_mod=mask_fns,
    )
    plan = lambda bq, bk: plan_blocks(
        structure, limits, Tp, Sp, bq, bk, masked=masking == "always", shared=shared
    )
    forward_plan = plan(bq, bk)
    backward_plan = forward_plan if backward_blocks == (bq, bk) else plan(*backward_blocks)
    if bias is not None:
        bias = pad_axis(pad_axis(bias, 2, Tp), 3, Sp)
    if mask is not None:
        mask = pad_axis(pad_axis(mask, 2, Tp), 3, Sp)
    return Prepared(
        tiling, pad_axis(query, 1, Tp), pad_axis(key, 1, Sp), pad_axis(value, 1, Sp),
        bias, mask, limits, jnp.asarray(scale, jnp.float32), mods,
        Plans(forward_plan, backward_plan),
    )
