"""Block-sparse attention: each query block attends to a list of key blocks, the rest skipped.

The sequence is cut into blocks of `b` positions. A *plan* gives, for groups of query blocks,
the key blocks each one reads (`idx [R, nk]`, padded with `valid = False`). The kernel gathers
exactly those key blocks, so the cost is O(T·nk·b) and a block outside the plan is never
computed, not masked. Inside the gathered blocks the usual element-level visibility (causal,
window, lengths, masks, `mask_mod`) still applies, so the result equals exact attention masked
by the same block pattern.

`block_sparse_attention` uses BigBird's pattern (global + sliding window + random blocks);
`local_attention` (`_local.py`) uses the band of blocks around each query block.

Reference: Zaheer et al., "Big Bird: Transformers for Longer Sequences" (NeurIPS 2020).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import Array
from jaxtyping import ArrayLike, Float

from flaxattn.kernels._call import Call, Result, finish, prepare
from flaxattn.kernels._heads import heads_to_rows, over_heads
from flaxattn.kernels._linear import window_below_length
from flaxattn.kernels._registry import Implementation, register
from flaxattn.kernels._single_head import MaskMod, ScoreMod
from flaxattn.kernels._softmax import masked_softmax
from flaxattn.kernels._visibility import Limits, Visibility

DEFAULT_BLOCK_SIZE = 64


class RowGroup(NamedTuple):
    """Query blocks `rows [R]` (static) each reading key blocks `idx [R, nk]` where `valid`."""

    rows: np.ndarray
    idx: ArrayLike
    valid: ArrayLike


Plan = Callable[[Limits], Sequence[RowGroup]]
"""`plan(limits) -> groups`, called per example (limits are scalars there)."""


def _gather_dense(x: ArrayLike | None, rows: np.ndarray, idx: ArrayLike, b: int) -> Array | None:
    """The `[R, b|1, nk·b|1]` part of a `[Tp|1, Sp|1]` bias or mask that a row group reads."""
    if x is None:
        return None
    t, s = x.shape
    R, nk = idx.shape
    if t > 1 and s > 1:
        x = x.reshape(t // b, b, s // b, b)[rows]  # [R, b, nKB, b]
        x = jnp.take_along_axis(x, idx[:, None, :, None], axis=2)  # [R, b, nk, b]
        return x.reshape(R, b, nk * b)
    if t > 1:
        return x.reshape(t // b, b, 1)[rows]  # [R, b, 1]
    if s > 1:
        return x.reshape(s // b, b)[idx].reshape(R, 1, nk * b)
    return x[None]  # [1, 1, 1]


def gathered_block_attention(
    query: Float[ArrayLike, "B T N H"],
    key: Float[ArrayLike, "B S K H"],
    value: Float[ArrayLike, "B S K Hv"],
    *,
    plan: Plan,
    block_size: int,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    visibility: Visibility | None = None,
    scale: float,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
) -> Float[Array, "B T N Hv"]:
    """Attention computed only on the key blocks that `plan` lists for each query block.

    Inputs are validated already (`bias`, `mask` rank 4). `T` and `S` are padded up to
    multiples of `block_size`; the padding is invisible through the limits. Query blocks that
    no group lists get output 0.

    Returns:
      `[B, T, N, Hv]` in the input dtype.
    """
    visibility = Visibility() if visibility is None else visibility
    B, T = query.shape[:2]
    S = key.shape[1]
    b = block_size
    Tp, Sp = -(-T // b) * b, -(-S // b) * b
    limits = visibility.limits(B, T, S)  # real lengths: padded rows and keys are hidden

    def pad(x, axis, size, broadcast=True):  # a broadcast bias/mask axis of 1 stays 1
        if x is None or (broadcast and x.shape[axis] == 1):
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, size - x.shape[axis])
        return jnp.pad(x, widths)

    offsets = jnp.arange(b)

    def one_head(q, k, v, bias, mask, head, limits: Limits):
        # q [Tp, H], k [Sp, H], v [Sp, Hv]; bias, mask [Tp|1, Sp|1]; limits scalars.
        del head
        q_blocks = q.reshape(Tp // b, b, -1)
        k_blocks, v_blocks = k.reshape(Sp // b, b, -1), v.reshape(Sp // b, b, -1)
        out = jnp.zeros((Tp // b, b, v.shape[-1]), jnp.float32)
        for group in plan(limits):
            R, nk = group.idx.shape
            q_pos = group.rows[:, None] * b + offsets[None, :]  # [R, b]
            kv_pos = (group.idx[:, :, None] * b + offsets[None, None, :]).reshape(R, nk * b)
            kg = k_blocks[group.idx].reshape(R, nk * b, -1)  # [R, nk·b, H]
            vg = v_blocks[group.idx].reshape(R, nk * b, -1)
            logits = (
                jnp.einsum(
                    "rbh,rkh->rbk", q_blocks[group.rows], kg, preferred_element_type=jnp.float32
                )
                * scale
            )  # [R, b, nk·b]
            if bias is not None:
                logits = logits + _gather_dense(bias, group.rows, group.idx, b).astype(jnp.float32)
            qi, ki = q_pos[:, :, None], kv_pos[:, None, :]
            if score_mod is not None:
                logits = score_mod(logits, qi, ki)
            visible = visibility.visible(qi, ki, limits) & (ki >= 0)
            visible &= jnp.repeat(group.valid, b, axis=1)[:, None, :]
            if mask is not None:
                visible &= _gather_dense(mask, group.rows, group.idx, b)
            if mask_mod is not None:
                visible &= mask_mod(qi, ki)
            weights, _ = masked_softmax(logits, visible)
            rows_out = jnp.einsum("rbk,rkv->rbv", weights, vg.astype(jnp.float32))
            # A group of every block (in order: a band) is the whole output; no scatter.
            whole = group.rows.size == Tp // b
            out = rows_out if whole else out.at[group.rows].set(rows_out)
        return out.reshape(Tp, -1)

    out = over_heads(
        one_head, pad(query, 1, Tp, False), pad(key, 1, Sp, False), pad(value, 1, Sp, False),
        pairs=(pad(pad(bias, 2, Tp), 3, Sp), pad(pad(mask, 2, Tp), 3, Sp)), per_example=limits,
    )  # [B, N, Tp, Hv]
    return heads_to_rows(out)[:, :T].astype(query.dtype)


def bigbird_block_layout(
    num_q_blocks: int,
    num_kv_blocks: int,
    *,
    num_global_blocks: int = 1,
    window_blocks: int = 1,
    num_random_blocks: int = 1,
    seed: int = 0,
    is_causal: bool = False,
) -> np.ndarray:
    """BigBird's block pattern `[num_q_blocks, num_kv_blocks]` (True = computed).

    - global: the first `num_global_blocks` query blocks read every key block, and every query
      block reads the first `num_global_blocks` key blocks;
    - window: query block `i` reads key blocks `i - window_blocks .. i + window_blocks`;
    - random: each other query block reads `num_random_blocks` more key blocks, drawn without
      replacement from those not already read (and, if `is_causal`, not after block `i`).

    The pattern is fixed by `seed` (numpy), as in BigBird, so it is static under `jit`.
    """
    for name, n in (
        ("num_global_blocks", num_global_blocks),
        ("window_blocks", window_blocks),
        ("num_random_blocks", num_random_blocks),
    ):
        if n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n}.")
    layout = np.zeros((num_q_blocks, num_kv_blocks), bool)
    layout[:num_global_blocks, :] = True
    layout[:, :num_global_blocks] = True
    for i in range(num_q_blocks):
        layout[i, max(0, i - window_blocks) : i + window_blocks + 1] = True
    rng = np.random.default_rng(seed)
    for i in range(num_global_blocks, num_q_blocks):
        free = ~layout[i]
        if is_causal:
            free[i + 1 :] = False
        choices = np.flatnonzero(free)
        picked = rng.choice(choices, size=min(num_random_blocks, choices.size), replace=False)
        layout[i, picked] = True
    if is_causal:
        layout &= np.tril(np.ones_like(layout))
    return layout


def layout_plan(layout: np.ndarray) -> list[RowGroup]:
    """Row groups for a static block layout: rows bucketed by how many key blocks they read
    (powers of two), each padded to its bucket's largest count; empty rows are left out."""
    counts = layout.sum(axis=1)
    buckets = np.where(counts > 0, np.ceil(np.log2(np.maximum(counts, 1))).astype(int), -1)
    groups = []
    for bucket in np.unique(buckets[buckets >= 0]):
        rows = np.flatnonzero(buckets == bucket)
        nk = int(counts[rows].max())
        idx = np.zeros((rows.size, nk), np.int32)
        valid = np.zeros((rows.size, nk), bool)
        for r, row in enumerate(rows):
            cols = np.flatnonzero(layout[row])
            idx[r, : cols.size] = cols
            valid[r, : cols.size] = True
        groups.append(RowGroup(rows, jnp.asarray(idx), jnp.asarray(valid)))
    return groups


def block_sparse_attention(
    query: Float[ArrayLike, "*B T N H"],
    key: Float[ArrayLike, "*B S K H"],
    value: Float[ArrayLike, "*B S K Hv"],
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    layout: np.ndarray | None = None,
    num_global_blocks: int = 1,
    window_blocks: int = 1,
    num_random_blocks: int = 1,
    seed: int = 0,
    **keywords: Any,
) -> Float[Array, "*B T N Hv"]:
    """BigBird-style block-sparse attention: global, window and random key blocks per query block.

    Equals exact attention masked by the block pattern (expanded to positions) and by the
    usual masks; blocks outside the pattern are skipped, so the cost is
    O(T·(global + window + random)·b) plus O(global·b·S) for the global rows.

    Args:
      query: `[B, T, N, H]` (or `[T, N, H]`).
      key: `[B, S, K, H]`; `K` divides `N`.
      value: `[B, S, K, Hv]`.
      bias, mask: as in `dot_product_attention`; they act inside the computed blocks.
      block_size: `b`, positions per block (`T` and `S` are padded up to a multiple).
      layout: a static bool `[ceil(T/b), ceil(S/b)]` block pattern; default
        `bigbird_block_layout` with the next four arguments.
      num_global_blocks, window_blocks, num_random_blocks, seed: BigBird's pattern.
      **keywords: `dot_product_attention`'s keywords (`scale`, `is_causal`, lengths,
        `local_window_size`, `causal_alignment`, `score_mod`, `mask_mod`); they act inside
        the computed blocks. Others it does not support raise a `ValueError`.

    Returns:
      `[B, T, N, Hv]` in the input dtype; a query with nothing visible gives 0.
    """
    call = prepare(query, key, value, bias, mask, caller="block_sparse_attention", **keywords)
    options = dict(
        block_size=block_size, layout=layout, num_global_blocks=num_global_blocks,
        window_blocks=window_blocks, num_random_blocks=num_random_blocks, seed=seed,
    )
    return finish(call, BLOCK_SPARSE(call, **options))


def _run_block_sparse(
    call: Call,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    layout: np.ndarray | None = None,
    num_global_blocks: int = 1,
    window_blocks: int = 1,
    num_random_blocks: int = 1,
    seed: int = 0,
) -> Result:
    window_below_length(call, "block_sparse_attention")
    dims, is_causal = call.dims, call.visibility.is_causal
    if block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size}.")
    shape = (-(-dims.T // block_size), -(-dims.S // block_size))
    if layout is None:
        layout = bigbird_block_layout(
            *shape,
            num_global_blocks=num_global_blocks,
            window_blocks=window_blocks,
            num_random_blocks=num_random_blocks,
            seed=seed,
            is_causal=is_causal,
        )
    layout = np.asarray(layout, bool)
    if layout.shape != shape:
        raise ValueError(
            f"layout must have shape [ceil(T/b), ceil(S/b)] = {list(shape)} for block_size="
            f"{block_size}, got {layout.shape}."
        )
    if is_causal and call.visibility.causal_alignment == "top_left":
        layout = layout & np.tril(np.ones_like(layout))  # blocks wholly in the future
    groups = layout_plan(layout)
    out = gathered_block_attention(
        call.query, call.key, call.value, plan=lambda limits: groups, block_size=block_size,
        bias=call.bias, mask=call.mask, visibility=call.visibility, scale=call.scale,
        score_mod=call.score_mod, mask_mod=call.mask_mod,
    )
    return Result(out)


# Exact softmax on the gathered blocks: every masking feature applies inside them.
GATHERED_SUPPORTS = frozenset(
    {"bias", "mask", "causal", "bottom_right", "window", "lengths", "gqa", "value_head_dim",
     "score_mod", "mask_mod", "mod_arrays", "traced_scale"}
)
BLOCK_SPARSE = register(
    Implementation(
        "block_sparse", _run_block_sparse,
        "BigBird block-sparse attention: global + window + random key blocks, exact on them",
        supports=GATHERED_SUPPORTS, kind="pattern",
        options=("block_size", "layout", "num_global_blocks", "window_blocks",
                 "num_random_blocks", "seed"),
    )
)
