"""Efficient attention variants, each with `dot_product_attention`'s calling convention.

| function | cost | what it computes |
| --- | --- | --- |
| `linear_attention` | O(T) | `φ(q)·φ(k)` similarities, `φ = elu + 1`; causal by prefix sums |
| `favor_attention` | O(T·M) | softmax approximated with `M` positive random features (FAVOR+) |
| `local_attention` | O(T·w) | exact sliding-window attention on banded key blocks |
| `block_sparse_attention` | O(T·nk·b) | exact, on BigBird's global + window + random blocks |

`local_attention` and `block_sparse_attention` are exact (they equal masked softmax
attention); `linear_attention` is a different model, and `favor_attention` an unbiased
approximation of the softmax similarities whose error falls as `M` grows. Masks, lengths and
biases are honoured by all four; for the two kernelised ones, masks and biases that couple
queries with keys cost O(T·S) (see `kernelized_attention`).

    from flaxattn.kernels.efficient import linear_attention, favor_attention
    out = favor_attention(q, k, v, is_causal=True, feature_key=jax.random.key(0))
"""

from flaxattn.kernels._block_sparse import (
    bigbird_block_layout,
    block_sparse_attention,
    gathered_block_attention,
)
from flaxattn.kernels._favor import favor_attention, favor_projection
from flaxattn.kernels._linear import elu_feature_map, kernelized_attention, linear_attention
from flaxattn.kernels._local import local_attention

__all__ = [
    "bigbird_block_layout",
    "block_sparse_attention",
    "elu_feature_map",
    "favor_attention",
    "favor_projection",
    "gathered_block_attention",
    "kernelized_attention",
    "linear_attention",
    "local_attention",
]
