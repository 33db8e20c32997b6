"""Running a sweep: one JSON record per (point, implementation, pass), never a crash.

Each record holds the shape, the timing (jit compile separately, warm-up, median of repeats),
FLOPs and TFLOP/s, the fraction of a same-dtype matmul measured in the same run, compiled
temporary memory, the device's peak memory where it reports one, and the error against a
float64 numpy reference: exact softmax, or softmax on the implementation's pattern (window,
block layout) for exact-on-a-pattern ones; approximations (linear, FAVOR+) record their
distance from exact softmax as `approx_error` instead, and no FLOPs. Out-of-memory and
unsupported combinations become records with a `status` saying so; so does any other
failure (`'error: ...'`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform as platform_lib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxattn import testing
from flaxattn.bench._implementations import IMPLEMENTATIONS, Implementation, Pattern, Where
from flaxattn.bench._sweep import Point, Sweep, check_sweep, points
from flaxattn.bench._timing import (
    attention_flops,
    compiled_temp_bytes,
    matmul_flops_per_second,
    time_jitted,
)

# Every record has exactly these keys (None where a value does not apply; see `reason`).
RECORD_FIELDS = (
    "implementation", "seq_len", "kv_seq_len", "head_dim", "num_heads", "num_kv_heads",
    "batch", "dtype", "causal", "pass", "status", "reason", "interpret",
    "time_median_s", "time_min_s", "time_max_s", "repeats", "compile_seconds",
    "flops", "tflops", "matmul_tflops", "fraction_of_peak",
    "temp_memory_bytes", "peak_device_memory_bytes",
    "max_abs_error", "max_abs_grad_error", "approx_error", "approx_grad_error", "error_reference",
    "device", "device_kind", "platform", "jax_version", "jaxlib_version", "flax_version",
    "preset", "command", "timestamp",
)
# The float64 reference covers every query row (and the gradients) up to this many logits;
# above it, the output is compared on `Sweep.error_rows` rows and the gradients are not.
FULL_REFERENCE_LOGITS = 1 << 25


def device_name() -> str:
    """A readable name: the GPU/TPU kind, or the CPU model and core count."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return device.device_kind
    model = platform_lib.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores)"


def environment(preset: str, command: str) -> dict[str, Any]:
    """The fields every record of this run shares."""
    import flax
    import jaxlib

    device = jax.devices()[0]
    return {
        "device": device_name(),
        "device_kind": device.device_kind,
        "platform": jax.default_backend(),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "flax_version": flax.__version__,
        "preset": preset,
        "command": command,
    }


def _is_oom(err: BaseException) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _describe(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"error: {type(err).__name__}: {first[:300]}"


def _peak_device_memory() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


class _Reference:
    """The float64 references of one point, each computed once and shared by every
    implementation: exact softmax, and softmax masked by each pattern that is asked for."""

    def __init__(self, point: Point, arrays, error_rows: int):
        self.point, self.arrays = point, arrays
        T = point.seq_len
        self.full = point.batch * point.num_heads * T * T <= FULL_REFERENCE_LOGITS
        self.rows = None if self.full else np.unique(np.linspace(0, T - 1, error_rows).astype(int))
        self._forward: dict[str | None, np.ndarray] = {}
        self._gradients: dict[str | None, Any] = {}

    def description(self, pattern: Pattern | None = None, approximate: bool = False) -> str:
        what = "float64 numpy softmax"
        if pattern is not None:
            what += f" on {pattern.name}"
        if approximate:
            what = f"approximation: approx_error is the distance from {what}"
        if self.full:
            return f"{what}, all rows"
        return f"{what}, {len(self.rows)} of {self.point.seq_len} query rows, no gradients"

    def _as_f64(self):
        return [np.asarray(x.astype(jnp.float32), np.float64) for x in self.arrays]

    def _visible(self, pattern: Pattern | None):
        if pattern is None:
            return None
        T = self.point.seq_len
        return lambda rows: pattern.visible(rows, T, T, self.point.causal)

    def forward(self, pattern: Pattern | None = None) -> np.ndarray:
        name = None if pattern is None else pattern.name
        if name not in self._forward:
            q, k, v, _ = self._as_f64()
            self._forward[name] = testing.reference(
                q, k, v, scale=self.point.head_dim**-0.5, is_causal=self.point.causal,
                rows=self.rows, visible=self._visible(pattern),
            ).out
        return self._forward[name]

    def gradients(self, pattern: Pattern | None = None):
        name = None if pattern is None else pattern.name
        if name not in self._gradients and self.full:
            q, k, v, d_out = self._as_f64()
            self._gradients[name] = testing.reference(
                q, k, v, d_out=d_out, scale=self.point.head_dim**-0.5,
                is_causal=self.point.causal, visible=self._visible(pattern),
            ).grads[:3]
        return self._gradients.get(name)

    def errors(self, result, pattern: Pattern | None = None) -> tuple[float, float | None]:
        """`(max |out - ref|, max |grad - ref| or None)` for a forward or forward+backward,
        against softmax attention restricted to `pattern` (all pairs if None)."""
        out, grads = (result, None) if not isinstance(result, tuple) else (result[0], result[1:])
        out = np.asarray(out.astype(jnp.float32), np.float64)
        if self.rows is not None:
            out = out[:, self.rows]
        out_error = float(np.max(np.abs(out - self.forward(pattern))))
        if grads is None or self.gradients(pattern) is None:
            return out_error, None
        grad_error = max(
            float(np.max(np.abs(np.asarray(g.astype(jnp.float32), np.float64) - r)))
            for g, r in zip(grads, self.gradients(pattern), strict=True)
        )
        return out_error, grad_error


def visible_pairs(pattern: Pattern, point: Point, chunk_rows: int = 1024) -> int:
    """How many (query, key) pairs `pattern` computes at `point` (counted in row chunks)."""
    T = point.seq_len
    return sum(
        int(pattern.visible(np.arange(start, min(start + chunk_rows, T)), T, T, point.causal).sum())
        for start in range(0, T, chunk_rows)
    )


def _flops(impl: Implementation, point: Point, pass_: str) -> float | None:
    """Useful FLOPs: dense (halved if causal), the visible pairs of a pattern, none for an
    approximation (its work is not softmax attention's)."""
    if impl.approximate:
        return None
    if impl.pattern is None:
        return attention_flops(
            point.batch, point.num_heads, point.seq_len, point.seq_len, point.head_dim,
            causal=point.causal, backward=pass_ != "fwd",
        )
    pairs = visible_pairs(impl.pattern, point)
    return 4.0 * point.batch * point.num_heads * pairs * point.head_dim * (
        3.5 if pass_ != "fwd" else 1.0)


def _inputs(point: Point):
    """`q, k, v [B, T|S, N|K, H]` and an output cotangent, standard normal, in the dtype."""
    B, T, H = point.batch, point.seq_len, point.head_dim
    q_shape, kv_shape = (B, T, point.num_heads, H), (B, T, point.num_kv_heads, H)
    keys = jax.random.split(jax.random.key(T * 7919 + H), 4)
    return [
        jax.random.normal(key, shape, jnp.float32).astype(point.dtype)
        for key, shape in zip(keys, (q_shape, kv_shape, kv_shape, q_shape), strict=True)
    ]


def _program(impl: Implementation, pass_: str, causal: bool) -> Callable:
    """The function that is timed: forward, or forward and the gradients for a cotangent."""
    if pass_ == "fwd":
        return lambda q, k, v: impl.fn(q, k, v, causal=causal)

    def forward_backward(q, k, v, d_out):
        out, pullback = jax.vjp(lambda q, k, v: impl.fn(q, k, v, causal=causal), q, k, v)
        return (out, *pullback(d_out))

    return forward_backward


def _skip_reason(impl, pass_, point, sweep, history) -> str | None:
    B, N, T = point.batch, point.num_heads, point.seq_len
    if impl.quadratic_memory and sweep.memory_budget_gb is not None:
        # logits and weights in float32; the backward keeps about twice as many.
        estimate = B * N * T * T * 4 * (2 if pass_ == "fwd" else 4)
        if estimate > sweep.memory_budget_gb * 2**30:
            return (
                f"materialises [B, N, T, S]: ~{estimate / 2**30:.1f} GiB > memory budget "
                f"{sweep.memory_budget_gb:g} GiB"
            )
    previous = history.get((impl.name, pass_, _setting(point)))
    if sweep.max_seconds is not None and previous is not None:
        prev_len, prev_time = previous
        predicted = prev_time * (T / prev_len) ** 2
        if predicted > sweep.max_seconds:
            return (
                f"predicted {predicted:.0f} s per call (T² from {prev_time:.2f} s at "
                f"T={prev_len}) > time budget {sweep.max_seconds:g} s"
            )
    return None


def _setting(point: Point) -> Point:
    return dataclasses.replace(point, seq_len=0)


def run_point(
    impl: Implementation, pass_: str, point: Point, arrays, reference: _Reference,
    sweep: Sweep, where: Where, peak_flops: float, history: dict,
) -> dict[str, Any]:
    """Benchmark one implementation on one point; the record's status says how it went."""
    record: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
    record.update(
        implementation=impl.name, seq_len=point.seq_len, kv_seq_len=point.seq_len,
        head_dim=point.head_dim, num_heads=point.num_heads, num_kv_heads=point.num_kv_heads,
        batch=point.batch, dtype=point.dtype, causal=point.causal, interpret=False,
        matmul_tflops=peak_flops / 1e12,
        error_reference=reference.description(impl.pattern, impl.approximate),
    )
    record["pass"] = pass_
    reason = impl.unavailable(where)
    if reason is not None:
        return {**record, "status": "unsupported", "reason": reason}
    reason = _skip_reason(impl, pass_, point, sweep, history)
    if reason is not None:
        return {**record, "status": "skipped", "reason": reason}
    if impl.interpreted(where):
        record.update(
            interpret=True,
            reason="Pallas interpret mode: checks correctness; the time is the interpreter's",
        )
    fn = _program(impl, pass_, point.causal)
    args = arrays[:3] if pass_ == "fwd" else arrays
    try:
        timing = time_jitted(fn, *args, repeats=sweep.repeats)
        temp = compiled_temp_bytes(fn, *args)
        result = jax.block_until_ready(jax.jit(fn)(*args))
        out_error, grad_error = reference.errors(result, impl.pattern)
    except Exception as err:  # noqa: BLE001 - every failure becomes a record
        return {**record, "status": "oom" if _is_oom(err) else _describe(err)}
    flops = _flops(impl, point, pass_)
    errors = {"max_abs_error": out_error, "max_abs_grad_error": grad_error}
    if impl.approximate:  # no exact reference of its own: the distance is the approximation's
        errors = {"approx_error": out_error, "approx_grad_error": grad_error}
    history[(impl.name, pass_, _setting(point))] = (point.seq_len, timing.median)
    return {
        **record,
        "status": "ok",
        "time_median_s": timing.median,
        "time_min_s": timing.min,
        "time_max_s": timing.max,
        "repeats": timing.repeats,
        "compile_seconds": timing.compile_seconds,
        "flops": flops,
        "tflops": None if flops is None else flops / timing.median / 1e12,
        "fraction_of_peak": None if flops is None else flops / timing.median / peak_flops,
        "temp_memory_bytes": temp,
        "peak_device_memory_bytes": _peak_device_memory(),
        **errors,
    }


def run_sweep(
    sweep: Sweep,
    *,
    preset: str,
    command: str,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every point × implementation × pass of `sweep`; append each record to `out` (JSONL).

    Args:
      sweep: what to run.
      preset: the preset's name (recorded; `'tiny'` lets Pallas run interpreted on CPU).
      command: the command line (recorded).
      out: JSON-lines file, rewritten from the start; None keeps records in memory only.
      progress: show a tqdm progress bar on stderr.

    Returns:
      The records, in the order they ran.
    """
    from tqdm.auto import tqdm

    check_sweep(sweep, IMPLEMENTATIONS)
    impls = [IMPLEMENTATIONS[name] for name in sweep.implementations]
    shared = environment(preset, command)
    peaks = {  # the ceiling: a same-dtype matmul measured in this run
        dtype: matmul_flops_per_second(sweep.matmul_size, jnp.dtype(dtype), repeats=3)
        for dtype in sweep.dtypes
    }
    sweep_points = points(sweep)
    history: dict = {}
    records = []
    sink = open(out, "w") if out is not None else None  # noqa: SIM115 - closed below
    bar = tqdm(
        total=len(sweep_points) * len(impls) * len(sweep.passes), disable=not progress,
        unit="run", file=sys.stderr, dynamic_ncols=True,
    )
    try:
        for point in sweep_points:
            arrays = _inputs(point)
            reference = _Reference(point, arrays, sweep.error_rows)
            where = Where(
                platform=shared["platform"], device_kind=shared["device_kind"],
                allow_interpret=preset == "tiny", dtype=point.dtype, head_dim=point.head_dim,
            )
            for impl in impls:
                for pass_ in sweep.passes:
                    bar.set_postfix_str(
                        f"{impl.name} T={point.seq_len} {point.dtype} {pass_}", refresh=False
                    )
                    record = run_point(
                        impl, pass_, point, arrays, reference, sweep, where,
                        peaks[point.dtype], history,
                    )
                    record.update(shared, timestamp=_now())
                    records.append(record)
                    if sink is not None:
                        sink.write(json.dumps(record) + "\n")
                        sink.flush()
                    bar.update()
            del arrays, reference
            jax.clear_caches()  # compiled programs of finished points hold memory
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    return records


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON-lines results file."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def missing_fields(records: Iterable[dict[str, Any]]) -> list[tuple[int, list[str]]]:
    """`(index, missing keys)` for every record without all of `RECORD_FIELDS`."""
    return [
        (i, [k for k in RECORD_FIELDS if k not in r])
        for i, r in enumerate(records)
        if any(k not in r for k in RECORD_FIELDS)
    ]
