"""flaxattn.interp: what heads do, measured on the model (ablation, patching, attribution).

Everything works through one hook: `MultiHeadAttention` calls `self.attention` (a kernel) for
the attention itself, and `hooked` swaps it for a wrapper that can read or replace each head's
output `[B, T, N, H]` (or recompute it from another attention pattern), with no change to
model code. The results are plain arrays, `[L, N]` per layer (rows in model order, see
`head_layers`) and head; `flaxattn.viz.plot_head_table` draws them.

- `ablate_heads`: a metric with each head zero- or mean-ablated, one jitted program for all;
  `ablate_together`: a group of heads at once.
- `patch_heads`, `patching_table`, `recovered_fraction`: activation patching of a head's
  output or pattern between a clean and a corrupted run.
- `direct_logit_attribution`: each head's direct contribution to a logit of a `DecoderLM`.
- `hooked`, `record_heads`, `head_layers`, `KernelCall`: the hook itself.

Scores of the patterns (previous-token, induction, ...) need only the weights: they are in
`flaxattn.analysis` (`pattern_scores`).
"""

from flaxattn.interp._ablation import (
    ABLATIONS,
    ablate_heads,
    ablate_together,
    mean_head_outputs,
    sweep_heads,
)
from flaxattn.interp._attribution import attribution_fn, direct_logit_attribution
from flaxattn.interp._hooks import KernelCall, head_layers, hooked, record_heads
from flaxattn.interp._patching import (
    DIRECTIONS,
    PATCH_WHAT,
    patch_heads,
    patching_table,
    recovered_fraction,
)

__all__ = [
    "ABLATIONS",
    "DIRECTIONS",
    "PATCH_WHAT",
    "KernelCall",
    "ablate_heads",
    "ablate_together",
    "attribution_fn",
    "direct_logit_attribution",
    "head_layers",
    "hooked",
    "mean_head_outputs",
    "patch_heads",
    "patching_table",
    "record_heads",
    "recovered_fraction",
    "sweep_heads",
]
