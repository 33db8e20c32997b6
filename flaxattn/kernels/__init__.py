"""flaxattn.kernels: pure functional attention (no Flax), one head at a time, vmapped once."""

from flaxattn.kernels import efficient
from flaxattn.kernels._api import (
    BLOCKED_MIN_KV_LENGTH,
    IMPLEMENTATIONS,
    additive_attention,
    attention,
    choose_implementation,
    dot_product_attention,
)
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
from flaxattn.kernels._reference import reference_attention
from flaxattn.kernels._ring import (
    from_ring_layout,
    make_ring_attention_fn,
    ring_attention,
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
from flaxattn.kernels._single_head import (
    MaskMod,
    ScoreMod,
    attention_parts,
    attention_weights,
)
from flaxattn.kernels._single_head import attention as single_head_attention
from flaxattn.kernels._softmax import masked_softmax
from flaxattn.kernels._visibility import Limits, Visibility
from flaxattn.kernels.efficient import (
    bigbird_block_layout,
    block_sparse_attention,
    favor_attention,
    favor_projection,
    linear_attention,
    local_attention,
)

__all__ = [
    "BLOCKED_MIN_KV_LENGTH",
    "IMPLEMENTATIONS",
    "Limits",
    "MaskMod",
    "ScoreMod",
    "Visibility",
    "additive_attention",
    "additive_score",
    "alibi_bias",
    "alibi_score_mod",
    "alibi_slopes",
    "and_masks",
    "attention",
    "attention_parts",
    "attention_weights",
    "bigbird_block_layout",
    "block_sparse_attention",
    "causal_mask",
    "causal_mask_mod",
    "choose_implementation",
    "combine_masks",
    "cosine_score",
    "document_mask_mod",
    "dot_product_attention",
    "dot_product_score",
    "efficient",
    "favor_attention",
    "favor_projection",
    "from_ring_layout",
    "general_score",
    "linear_attention",
    "local_attention",
    "make_ring_attention_fn",
    "masked_softmax",
    "or_masks",
    "padding_mask",
    "prefix_lm_mask_mod",
    "reference_attention",
    "relative_bias_score_mod",
    "relative_position_buckets",
    "ring_attention",
    "ring_permutation",
    "scaled_dot_product_score",
    "single_head_attention",
    "soft_cap_score_mod",
    "t5_relative_bias",
    "to_ring_layout",
    "window_mask",
]
