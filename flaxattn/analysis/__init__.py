"""Statistics of attention weights: what a head looks at, how far, how sharply.

Every function takes weights ``[B, N, T, S]`` (numpy or JAX arrays; the result is numpy) and
optional validity information, in any combination:

- ``query_lengths`` / ``key_lengths`` ``[B]``: query ``i`` is valid when ``i < query_lengths[b]``
  and key ``j`` when ``j < key_lengths[b]`` (right padding);
- ``mask``: boolean, True = valid, broadcastable to ``[B, N, T, S]`` (e.g. a causal mask).

A *valid row* is a valid query with at least one valid key. Rows are read as distributions over
their valid keys: the weights on valid keys are renormalised to sum to 1 (a no-op for weights
computed with the same mask) and rows whose valid mass is 0 are left out. Per-head results are
means over the valid rows of all examples (``per_example=True`` keeps the batch axis).

Pattern scores (:mod:`flaxattn.analysis._patterns`): previous-token, induction, diagonal,
anti-diagonal, sink and positional scores per head, and ``pattern_scores`` for ``[L, N]`` tables.

This module imports numpy only (JAX arrays are converted with ``np.asarray``).
"""

from flaxattn.analysis._patterns import (
    PATTERN_SCORES,
    anti_diagonal_score,
    diagonal_score,
    induction_score,
    induction_target,
    pattern_scores,
    positional_score,
    previous_token_score,
)
from flaxattn.analysis._pointing import (
    box_iou,
    patch_map,
    pointing_chance,
    pointing_game,
    rollout_maps,
    upsample_map,
)
from flaxattn.analysis._stats import (
    MarkedMass,
    alignment_accuracy,
    anti_diagonal_target,
    attention_rollout,
    head_entropy,
    layer_head_stats,
    marked_token_mass,
    mean_attention_distance,
    row_distributions,
    sink_mass,
    topk_compress,
    topk_decompress,
    valid_mask,
)

__all__ = [
    "upsample_map",
    "rollout_maps",
    "pointing_game",
    "pointing_chance",
    "patch_map",
    "box_iou",
    "MarkedMass",
    "PATTERN_SCORES",
    "alignment_accuracy",
    "anti_diagonal_score",
    "anti_diagonal_target",
    "attention_rollout",
    "diagonal_score",
    "head_entropy",
    "induction_score",
    "induction_target",
    "layer_head_stats",
    "marked_token_mass",
    "mean_attention_distance",
    "pattern_scores",
    "positional_score",
    "previous_token_score",
    "row_distributions",
    "sink_mass",
    "topk_compress",
    "topk_decompress",
    "valid_mask",
]
