"""Sliding-window (local) attention at O(T·w) cost: banded key blocks, not a masked `[T, S]`.

Query block `i` (positions `i·b .. i·b + b - 1`, moved by the causal offset) can only see keys
in `[i·b + offset - left, i·b + b - 1 + offset + right]`, which lie in at most
`nk = ceil((b - 1 + left + right) / b) + 1` consecutive key blocks. Those are gathered
(`gathered_block_attention`) and the exact window applied inside them, so the result equals
exact attention with `local_window_size=(left, right)` while each query reads
`nk·b ≈ left + right + 2b` keys. When the offset is the same for every example (top-left
alignment, or no lengths) the band is a constant with exactly the blocks it needs, one fewer
than the bound above when the offset is block-aligned. Under `is_causal` the right side is 0.

Reference: Beltagy, Peters, Cohan, "Longformer: The Long-Document Transformer" (2020);
Child et al., "Generating Long Sequences with Sparse Transformers" (2019).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jaxtyping import ArrayLike, Float

from flaxattn.kernels._block_sparse import (
    GATHERED_SUPPORTS,
    RowGroup,
    gathered_block_attention,
)
from flaxattn.kernels._call import Call, Result, finish, prepare
from flaxattn.kernels._linear import window_below_length
from flaxattn.kernels._registry import Implementation, get_implementation, register
from flaxattn.kernels._visibility import Limits


def default_block_size(left: int, right: int) -> int:
    """A power of two near half the window, in [16, 256].

    Wasted keys per query (`nk·b - (left + right + 1)`) stay below `2b`, and the per-block
    matmuls `[b, H] x [H, nk·b]` are big enough to run well: on the 2-core CPU (causal, T=8192,
    H=64, 8 heads) the best sizes measured were 32 for w=64, 128 for w=256 and 256 for
    w=1024, each 1.3-1.6x faster than a quarter of the window.
    """
    return int(np.clip(2 ** int(np.ceil(np.log2(max((left + right) / 2, 1)))), 16, 256))


def _static_offset(
    T: int, S: int, alignment: str, q_lengths: ArrayLike | None, kv_lengths: ArrayLike | None
) -> int | None:
    """Where query 0 sits on the key axis when that is the same for every example, else None
    (bottom-right alignment with lengths moves each example differently)."""
    if alignment == "top_left":
        return 0
    if q_lengths is None and kv_lengths is None:
        return S - T
    return None


def local_attention(
    query: Float[ArrayLike, "*B T N H"],
    key: Float[ArrayLike, "*B S K H"],
    value: Float[ArrayLike, "*B S K Hv"],
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    local_window_size: int | tuple[int, int] | None = None,
    block_size: int | None = None,
    method: str | None = None,
    **keywords: Any,
) -> Float[Array, "*B T N Hv"]:
    """Exact sliding-window attention in O(T·w) time and memory.

    Equals `dot_product_attention(..., local_window_size=(left, right))` (query at position
    `p` sees keys in `[p - left, p + right]`), computed on the key blocks around each query
    block only, by one of two methods:

    - `'band'`: the band of `block_size` key blocks of every query block is gathered into a
      static-shape `[R, nk·b]` tile (no loops with data-dependent bounds: suits accelerators
      and `vmap`).
    - `'blocked'`: the flash-style blocked kernel, whose loops visit only the key blocks that
      the window reaches (`dot_product_attention(..., implementation='blocked')`). On the CPU
      its large tiles make it about 2x faster than the band (T=16384, w=256, causal:
      0.36 s vs 0.74 s), so it is the default there.

    Args:
      query: `[B, T, N, H]` (or `[T, N, H]`).
      key: `[B, S, K, H]`; `K` divides `N`.
      value: `[B, S, K, Hv]`.
      bias, mask: as in `dot_product_attention`.
      local_window_size: required; `w` or `(left, right)`, each side smaller than `S`.
      block_size: positions per block; default `default_block_size(left, right)` for the
        band, the blocked kernel's defaults for `'blocked'`.
      method: `'band'` or `'blocked'`; default `'blocked'` on the CPU, `'band'` elsewhere.
      **keywords: `dot_product_attention`'s other keywords (`scale`, `is_causal`, lengths,
        `causal_alignment`, `score_mod`, `mask_mod`); others it does not support raise a
        `ValueError`.

    Returns:
      `[B, T, N, Hv]` in the input dtype; a query with nothing visible gives 0.
    """
    call = prepare(query, key, value, bias, mask, caller="local_attention",
                   local_window_size=local_window_size, **keywords)
    return finish(call, LOCAL(call, block_size=block_size, method=method))


def _run_local(
    call: Call, *, block_size: int | None = None, method: str | None = None
) -> Result:
    vis = call.visibility
    window_below_length(call, "local_attention")
    if method is None:
        method = "blocked" if jax.default_backend() == "cpu" else "band"
    if method not in ("band", "blocked"):
        raise ValueError(f"method must be 'band' or 'blocked', got {method!r}.")
    if block_size is not None and int(block_size) < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size}.")
    if method == "blocked":
        blocks = None if block_size is None else (int(block_size),) * 2
        return get_implementation("blocked")(call.replace(block_sizes=blocks))
    dims = call.dims
    left, right = vis.window
    if vis.is_causal:
        right = 0
    b = default_block_size(left, right) if block_size is None else int(block_size)
    num_q_blocks, num_kv_blocks = -(-dims.T // b), -(-dims.S // b)
    rows = np.arange(num_q_blocks)
    offset = _static_offset(dims.T, dims.S, vis.causal_alignment, vis.q_lengths, vis.kv_lengths)
    if offset is not None:
        # Query block i sees key blocks i + lo .. i + hi: the band is a constant, and it is
        # one block narrower than the worst case below whenever the offset is block-aligned
        # (6 -> 5 blocks at w = 256, b = 64: a sixth of the work saved).
        lo, hi = (offset - left) // b, (b - 1 + offset + right) // b
        idx = rows[:, None] + np.arange(lo, hi + 1)  # [R, nk]
        valid = (idx >= 0) & (idx < num_kv_blocks)
        static_band = [RowGroup(rows, np.clip(idx, 0, num_kv_blocks - 1), valid)]

        def band(limits: Limits) -> list[RowGroup]:
            del limits
            return static_band

    else:
        # The offset is per example: allow for any alignment of the window with the blocks.
        nk = -(-(b - 1 + left + right) // b) + 1

        def band(limits: Limits) -> list[RowGroup]:
            first = jnp.floor_divide(rows * b + limits.offset - left, b)  # [R]
            idx = first[:, None] + jnp.arange(nk)[None, :]  # [R, nk]
            valid = (idx >= 0) & (idx < num_kv_blocks)
            return [RowGroup(rows, jnp.clip(idx, 0, num_kv_blocks - 1), valid)]

    out = gathered_block_attention(
        call.query, call.key, call.value, plan=band, block_size=b, bias=call.bias,
        mask=call.mask, visibility=vis, scale=call.scale, score_mod=call.score_mod,
        mask_mod=call.mask_mod,
    )
    return Result(out)


LOCAL = register(
    Implementation(
        "local", _run_local,
        "exact sliding-window attention on the band of key blocks around each query block, "
        "O(T·w)",
        supports=GATHERED_SUPPORTS, needs=frozenset({"window"}), options=("block_size", "method"),
    )
)
