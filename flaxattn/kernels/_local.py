"""Sliding-window (local) attention at O(T·w) cost: banded key blocks, not a masked `[T, S]`.

Query block `i` (positions `i·b .. i·b + b - 1`, moved by the causal offset) can only see keys
in `[i·b + offset - left, i·b + b - 1 + offset + right]`, which lie in at most
`nk = ceil((b - 1 + left + right) / b) + 1` consecutive key blocks. Those are gathered
(`gathered_block_attention`) and the exact window applied inside them, so the result equals
exact attention with `local_window_size=(left, right)` while each query reads
`nk·b ≈ left + right + 2b` keys. Under `is_causal` the right side is 0.

Reference: Beltagy, Peters, Cohan, "Longformer: The Long-Document Transformer" (2020);
Child et al., "Generating Long Sequences with Sparse Transformers" (2019).
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import numpy as np
from jax import Array
from jaxtyping import Float

from flaxattn.kernels._block_sparse import RowGroup, gathered_block_attention
from flaxattn.kernels._linear import check_inputs, unbatched
from flaxattn.kernels._single_head import MaskMod, ScoreMod
from flaxattn.kernels._visibility import Limits


def default_block_size(left: int, right: int) -> int:
    """A power of two near a quarter of the window, in [16, 128]: few wasted keys per query
    (`nk·b - (left + right + 1)` is below `2b`) without tiny blocks."""
    return int(np.clip(2 ** int(np.ceil(np.log2(max((left + right) / 4, 1)))), 16, 128))


def local_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S K H"],
    value: Float[Array, "B S K Hv"],
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    local_window_size: int | tuple[int, int] | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    block_size: int | None = None,
) -> Float[Array, "B T N Hv"]:
    """Exact sliding-window attention in O(T·w) time and memory.

    Equals `dot_product_attention(..., local_window_size=(left, right))` (query at position
    `p` sees keys in `[p - left, p + right]`), computed on the band of key blocks around each
    query block only.

    Args:
      query: `[B, T, N, H]` (or `[T, N, H]`).
      key: `[B, S, K, H]`; `K` divides `N`.
      value: `[B, S, K, Hv]`.
      bias, mask, scale, is_causal, query_seq_lengths, key_value_seq_lengths,
        causal_alignment, score_mod, mask_mod: as in `dot_product_attention`.
      local_window_size: required; `w` or `(left, right)`, each side smaller than `S`.
      block_size: positions per block; default `default_block_size(left, right)`.

    Returns:
      `[B, T, N, Hv]` in the input dtype; a query with nothing visible gives 0.
    """
    if local_window_size is None:
        raise ValueError(
            "local_attention needs local_window_size (w or (left, right)); for full attention "
            "use dot_product_attention."
        )
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
    left, right = visibility.window
    if is_causal:
        right = 0
    b = default_block_size(left, right) if block_size is None else int(block_size)
    if b < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size}.")
    num_q_blocks, num_kv_blocks = -(-dims.T // b), -(-dims.S // b)
    nk = -(-(b - 1 + left + right) // b) + 1
    rows = np.arange(num_q_blocks)

    def band(limits: Limits) -> list[RowGroup]:
        # The first key block each query block can see; the offset is per example.
        first = jnp.floor_divide(rows * b + limits.offset - left, b)  # [R]
        idx = first[:, None] + jnp.arange(nk)  # [R, nk]
        valid = (idx >= 0) & (idx < num_kv_blocks)
        return [RowGroup(rows, jnp.clip(idx, 0, num_kv_blocks - 1), valid)]

    return gathered_block_attention(
        query,
        key,
        value,
        plan=band,
        block_size=b,
        bias=bias,
        mask=mask,
        visibility=visibility,
        scale=1.0 / dims.H**0.5 if scale is None else scale,
        score_mod=score_mod,
        mask_mod=mask_mod,
    )


local_attention = unbatched(local_attention)
