"""flaxattn: attention mechanisms for JAX and Flax.

Axis alphabet (used in every shape, einsum and docstring):

    B  batch                 T  query length        S  key/value length
    N  query heads           K  key/value heads     G  = N / K, query heads per kv head
    H  head dim (D in single-head kernels, Dv for values)

Layers, bottom to top: `flaxattn.kernels` (pure functions, no Flax), `flaxattn.nn`
(flax.nnx modules), analysis and plotting, and the `experiments/` command-line programs.
Masks are booleans where True means attend; a query with nothing visible gets output 0.
"""

from flaxattn.kernels import (
    additive_attention,
    alibi_bias,
    alibi_slopes,
    attention,
    block_sparse_attention,
    causal_mask,
    combine_masks,
    dot_product_attention,
    favor_attention,
    linear_attention,
    local_attention,
    make_ring_attention_fn,
    padding_mask,
    ring_attention,
    t5_relative_bias,
    window_mask,
)

__version__ = "0.1.0"

__all__ = [
    "additive_attention",
    "block_sparse_attention",
    "favor_attention",
    "linear_attention",
    "local_attention",
    "make_ring_attention_fn",
    "ring_attention",
    "alibi_bias",
    "alibi_slopes",
    "attention",
    "causal_mask",
    "combine_masks",
    "dot_product_attention",
    "padding_mask",
    "t5_relative_bias",
    "window_mask",
]
