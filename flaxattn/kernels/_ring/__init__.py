"""Ring attention: the sequence axis sharded over a mesh axis, K/V travelling round the ring.

Each of the `P` devices on mesh axis `axis_name` holds `T/P` queries and `S/P` keys and values.
For `P` steps, every device attends its queries to the K/V block it currently holds, merges the
partial result into a running `(output, logsumexp)` pair, and passes the block to its
neighbour with `jax.lax.ppermute` (the send is issued before the step's compute, so XLA may
overlap the two). No device ever holds more than one visiting K/V block.

Each step is flash-style: every (query chunk, key chunk) pair is one call of the blocked
kernel (`blocked_attention`, with `Limits` that place the chunks' local indices at their global
positions, and `mask_mod` shifted to the same), so a step's temporaries are O(T/P) and its
fixed-size tiles, never the `[T/P, S/P]` logits. One exception stays dense (`_block_forward`,
`_block_backward`): `layout='striped'` with a local window, because positions `r + P·i` against
`s + P·j` make the window's ends depend on the traced shard pair, while the blocked kernel's
window is static; causal masks and lengths are exact on strided indices and stay flash-style.

The backward pass is a second ring (a `jax.custom_vjp`, not autodiff through the forward
scan): K and V go round again, each step computes its block's share of the gradients from the
saved output and logsumexp (`blocked_attention_grads`), and the key/value gradients travel with
their block until one last `ppermute` brings them home. Per-device memory is O(T/P) for every
residual and every temporary (the dense striped-window exception aside).

Load balancing for causal attention comes from the sequence *layout*: which global positions
each device holds. `'contiguous'` gives device `r` positions `[r·L, (r+1)·L)`, so under a
causal mask the last device works at every step while the first idles. `'zigzag'` cuts the
sequence into `2P` chunks and gives device `r` chunks `r` and `2P-1-r`: every device then has
the same visible work at every step (half a block after the first), and the invisible half is
skipped. `'striped'` gives device `r` positions `r, r+P, r+2P, ...` (Striped Attention,
Brandon et al. 2023): every block pair is about half visible, which balances the masked work;
the pair is then causal on its local indices, so the blocked kernel skips its invisible half
at its own block granularity (once the shard is longer than one block).
`ring_attention` permutes the sequence into the layout before the ring and back after it
(`to_ring_layout` / `from_ring_layout`, also usable on their own).

The package, by job: `_layout.py` (layouts and moving a sharded sequence between them),
`_pair.py` (the maths of one query chunk against one key chunk), `_loops.py` (the per-device
forward and backward rings inside `shard_map`, and the custom VJP around them) and `_api.py`
(`ring_attention`, `ring_attention_fn` and the registry entry `'ring'`).

Reference: Liu, Zaharia, Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite
Context" (2023); zig-zag ordering as in Llama 3 context parallelism and ring-flash-attention.
"""

from flaxattn.kernels._ring._api import (
    RING,
    RingAttentionFn,
    RingOptions,
    ring_attention,
    ring_attention_fn,
)
from flaxattn.kernels._ring._layout import (
    LAYOUTS,
    Layout,
    from_ring_layout,
    ring_permutation,
    to_ring_layout,
)

__all__ = [
    "LAYOUTS",
    "RING",
    "Layout",
    "RingAttentionFn",
    "RingOptions",
    "from_ring_layout",
    "ring_attention",
    "ring_attention_fn",
    "ring_permutation",
    "to_ring_layout",
]
