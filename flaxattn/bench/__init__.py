"""flaxattn.bench: benchmark attention implementations on whatever machine this is.

`python experiments/benchmark.py` is the command line; this package is the library under it:

* `Sweep` and `PRESETS` (`tiny`, `cpu`, `gpu`, `tpu`): lengths, head dims, heads, GQA ratios,
  dtypes, causal or not, forward and forward+backward.
* `IMPLEMENTATIONS` and `register`: the registry of what can be compared (flaxattn's reference,
  blocked and Pallas kernels, jax.nn with XLA and cuDNN, flax.linen and flax.nnx, and the
  efficient variants `linear`, `favor`, `local` and `block_sparse`). `local_implementation`,
  `block_sparse_implementation` and `favor_implementation` build other settings of the last
  three; a `Pattern` tells the runner what an exact-on-a-pattern variant is compared with.
* `run_sweep`: one JSON record per point, implementation and pass (fields `RECORD_FIELDS`;
  approximations put their distance from exact softmax in `approx_error`),
  with statuses `ok`, `oom`, `unsupported`, `skipped` (memory or time budget) and
  `error: ...`.
* `format_table` and `plot_records`: the terminal / markdown table and the PNG plots.
* Timing, shared by every benchmark script (`benchmarks/*.py`): `time_jitted` (jit, warm up,
  block, median of repeats), `time_interleaved` (peers called in alternation so ratios share
  the load), `compiled_call`, `compiled_temp_bytes`, `square_matmul` /
  `matmul_flops_per_second` (the machine's ceiling) and `attention_flops`.

`IMPLEMENTATIONS` holds the benchmark's entries: the kernel registry's implementations
(`from_registry`: description, dtypes, platforms and memory read from
`flaxattn.kernels.implementations()`) plus peers that are not flaxattn's (flax.linen, flax.nnx).
"""

from flaxattn.bench._implementations import (
    IMPLEMENTATIONS,
    Implementation,
    Pattern,
    Where,
    block_sparse_implementation,
    favor_implementation,
    from_registry,
    local_implementation,
    register,
)
from flaxattn.bench._report import format_table, plot_records
from flaxattn.bench._runner import (
    RECORD_FIELDS,
    device_name,
    load_records,
    missing_fields,
    run_sweep,
)
from flaxattn.bench._sweep import PASSES, PRESETS, Point, Sweep, check_sweep, points
from flaxattn.bench._timing import (
    Timing,
    attention_flops,
    compiled_call,
    compiled_temp_bytes,
    matmul_flops_per_second,
    square_matmul,
    time_interleaved,
    time_jitted,
)

__all__ = [
    "IMPLEMENTATIONS",
    "PASSES",
    "PRESETS",
    "RECORD_FIELDS",
    "Implementation",
    "Pattern",
    "Point",
    "Sweep",
    "Timing",
    "Where",
    "attention_flops",
    "block_sparse_implementation",
    "check_sweep",
    "compiled_call",
    "compiled_temp_bytes",
    "device_name",
    "favor_implementation",
    "format_table",
    "from_registry",
    "load_records",
    "local_implementation",
    "matmul_flops_per_second",
    "missing_fields",
    "plot_records",
    "points",
    "register",
    "run_sweep",
    "square_matmul",
    "time_interleaved",
    "time_jitted",
]
