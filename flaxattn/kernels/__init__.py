"""flaxattn.kernels: pure functional attention (no Flax), one head at a time, vmapped once.

- Entry points, all with `dot_product_attention`'s calling convention: `dot_product_attention`
  (a drop-in for jax.nn's), `scored_attention` (any score function), `additive_attention`,
  `ring_attention` / `ring_attention_fn` (sequence parallel over a mesh), and the efficient
  variants in `flaxattn.kernels.efficient`.
- The registry: `implementations()`, `get_implementation`, `register`, `Implementation`,
  `FEATURES`, `choose_implementation`.
- One head: `single_head_attention`, `attention_weights`, `masked_softmax`, the score functions.
- Masks and biases: dense helpers (`causal_mask`, ...), index modifiers (`causal_mask_mod`,
  `soft_cap_score_mod`, ...), head-dependent biases (`alibi_bias`, `t5_relative_bias`).

Importing this package registers every built-in implementation (one import line each below).
"""

# The built-in implementations, one registration each (adding a backend adds one line).
from flaxattn.kernels import _reference, _blocked, _pallas, _xla  # noqa: F401, I001
from flaxattn.kernels import _linear, _favor, _local, _block_sparse, _ring  # noqa: F401, I001

from flaxattn._deprecated import module_getattr
from flaxattn.kernels._api import additive_attention, dot_product_attention, scored_attention
from flaxattn.kernels._biases import (
    alibi_bias,
    alibi_slopes,
    relative_position_buckets,
    t5_relative_bias,
)
from flaxattn.kernels._masks import (
    alibi_score_mod,
    and_masks,
    causal_mask,
    causal_mask_mod,
    combine_masks,
    document_mask_mod,
    or_masks,
    padding_mask,
    prefix_lm_mask_mod,
    relative_bias_score_mod,
    soft_cap_score_mod,
    window_mask,
)
from flaxattn.kernels._registry import (
    FEATURES,
    Implementation,
    choose_implementation,
    get_implementation,
    implementations,
    register,
)
from flaxattn.kernels._ring import (
    from_ring_layout,
    ring_attention,
    ring_attention_fn,
    ring_permutation,
    to_ring_layout,
)
from flaxattn.kernels._scores import (
    additive_score,
    cosine_score,
    dot_product_score,
    general_score,
    scaled_dot_product_score,
)
from flaxattn.kernels._single_head import MaskMod, ScoreMod, attention_weights
from flaxattn.kernels._single_head import attention as single_head_attention
from flaxattn.kernels._softmax import masked_softmax

__all__ = [
    "FEATURES",
    "Implementation",
    "MaskMod",
    "ScoreMod",
    "additive_attention",
    "additive_score",
    "alibi_bias",
    "alibi_score_mod",
    "alibi_slopes",
    "and_masks",
    "attention_weights",
    "causal_mask",
    "causal_mask_mod",
    "choose_implementation",
    "combine_masks",
    "cosine_score",
    "document_mask_mod",
    "dot_product_attention",
    "dot_product_score",
    "from_ring_layout",
    "general_score",
    "get_implementation",
    "implementations",
    "masked_softmax",
    "or_masks",
    "padding_mask",
    "prefix_lm_mask_mod",
    "register",
    "relative_bias_score_mod",
    "relative_position_buckets",
    "ring_attention",
    "ring_attention_fn",
    "ring_permutation",
    "scaled_dot_product_score",
    "scored_attention",
    "single_head_attention",
    "soft_cap_score_mod",
    "t5_relative_bias",
    "to_ring_layout",
    "window_mask",
]

_EFFICIENT = "flaxattn.kernels.efficient"
__getattr__ = module_getattr(
    __name__,
    {
        "attention": ("flaxattn.kernels", "scored_attention"),
        "make_ring_attention_fn": ("flaxattn.kernels", "ring_attention_fn"),
        "IMPLEMENTATIONS": ("flaxattn._compat", "IMPLEMENTATIONS"),
        "BLOCKED_MIN_KV_LENGTH": ("flaxattn._compat", "BLOCKED_MIN_KV_LENGTH"),
        "Limits": ("flaxattn.kernels._visibility", "Limits"),
        "Visibility": ("flaxattn.kernels._visibility", "Visibility"),
        "attention_parts": ("flaxattn.kernels._single_head", "attention_parts"),
        "reference_attention": ("flaxattn.kernels._reference", "reference_attention"),
        "linear_attention": (_EFFICIENT, "linear_attention"),
        "favor_attention": (_EFFICIENT, "favor_attention"),
        "local_attention": (_EFFICIENT, "local_attention"),
        "block_sparse_attention": (_EFFICIENT, "block_sparse_attention"),
        "bigbird_block_layout": (_EFFICIENT, "bigbird_block_layout"),
        "favor_projection": (_EFFICIENT, "favor_projection"),
    },
)
