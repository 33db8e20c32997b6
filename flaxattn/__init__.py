"""flaxattn: attention mechanisms for JAX and Flax.

Axis alphabet (used in every shape, einsum and docstring):

    B  batch                 T  query length        S  key/value length
    N  query heads           K  key/value heads     G  = N / K, query heads per kv head
    H  head dim (D in single-head kernels, Dv for values)

Layers, bottom to top: `flaxattn.kernels` (pure functions, no Flax), `flaxattn.nn`
(flax.nnx modules), `flaxattn.analysis` / `flaxattn.interp` / `flaxattn.viz` / `flaxattn.export`,
and the `experiments/` command-line programs. Masks are booleans where True means attend; a
query with nothing visible gets output 0.

This namespace holds what most users need; everything else lives in the subpackages.
"""

from flaxattn._deprecated import module_getattr
from flaxattn.kernels import (
    additive_attention,
    alibi_bias,
    causal_mask,
    choose_implementation,
    combine_masks,
    dot_product_attention,
    implementations,
    padding_mask,
    ring_attention,
    ring_attention_fn,
    scored_attention,
    t5_relative_bias,
    window_mask,
)
from flaxattn.kernels.efficient import (
    block_sparse_attention,
    favor_attention,
    linear_attention,
    local_attention,
)

__version__ = "0.2.0"

__all__ = [
    "additive_attention",
    "alibi_bias",
    "block_sparse_attention",
    "causal_mask",
    "choose_implementation",
    "combine_masks",
    "dot_product_attention",
    "favor_attention",
    "implementations",
    "linear_attention",
    "local_attention",
    "padding_mask",
    "ring_attention",
    "ring_attention_fn",
    "scored_attention",
    "t5_relative_bias",
    "window_mask",
]

__getattr__ = module_getattr(
    __name__,
    {
        "attention": ("flaxattn.kernels", "scored_attention"),
        "make_ring_attention_fn": ("flaxattn.kernels", "ring_attention_fn"),
        "alibi_slopes": ("flaxattn.kernels", "alibi_slopes"),
    },
)
