"""Deprecated: the timing helpers moved to `flaxattn.bench` (removed in flaxattn 0.3)."""

from flaxattn._deprecated import module_getattr

_NAMES = ("Timing", "attention_flops", "compiled_call", "compiled_temp_bytes",
          "matmul_flops_per_second", "square_matmul", "time_interleaved", "time_jitted")
__getattr__ = module_getattr(__name__, {name: ("flaxattn.bench", name) for name in _NAMES})
