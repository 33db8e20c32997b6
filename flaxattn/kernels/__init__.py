"""flaxattn.kernels: pure functional attention (no Flax), one head at a time, vmapped once."""

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
    "causal_mask",
    "causal_mask_mod",
    "choose_implementation",
    "combine_masks",
    "cosine_score",
    "document_mask_mod",
    "dot_product_attention",
    "dot_product_score",
    "general_score",
    "masked_softmax",
    "or_masks",
    "padding_mask",
    "prefix_lm_mask_mod",
    "reference_attention",
    "relative_bias_score_mod",
    "relative_position_buckets",
    "scaled_dot_product_score",
    "single_head_attention",
    "t5_relative_bias",
    "soft_cap_score_mod",
    "window_mask",
]
