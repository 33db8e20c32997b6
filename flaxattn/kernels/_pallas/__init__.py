"""Pallas flash-attention kernels (`implementation='pallas'`): forward, dq and dk/dv.

Two kernel families share one tile math (`_tiles.py`):

* `_triton.py`, for NVIDIA (and AMD) GPUs through the Pallas Triton lowering: one program per
  query block (forward, dq) or key block (dk/dv), `fori_loop`s over the visible blocks only.
* `_tpu.py`, for TPUs through Mosaic: the key (or query) blocks are the innermost, sequential
  grid axis, accumulators live in VMEM scratch, and per-example lengths are scalar-prefetched so
  that skipped blocks are neither computed nor copied.

What has been verified, and where (be careful what you rely on):

* Both families run in Pallas interpret mode on CPU and are tested there (tests/test_pallas.py)
  against a naive reference: outputs, logsumexp and gradients.
* Both lower without error for their real targets from a CPU machine (`lower(
  lowering_platforms=('cuda',))` emits Triton IR; `('tpu',)` emits Mosaic), which checks the
  Pallas-level rules (block shapes, supported primitives). That is not a compile: Triton's PTX
  generation and Mosaic's layout passes run only on the device.
* Neither has ever run on a GPU or a TPU: no accelerator was available when they were
  written. Their speed is unmeasured and their default block sizes and warp counts untuned.
"""

from flaxattn.kernels._pallas._attention import BACKENDS, pallas_attention

__all__ = ["BACKENDS", "pallas_attention"]
