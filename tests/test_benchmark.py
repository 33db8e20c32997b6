"""The benchmark: the tiny sweep in-process (schema, errors, plots) and the CLI's bad flags."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from flaxattn.bench import (
    IMPLEMENTATIONS,
    PRESETS,
    RECORD_FIELDS,
    Implementation,
    attention_flops,
    block_sparse_implementation,
    format_table,
    load_records,
    local_implementation,
    missing_fields,
    plot_records,
    register,
    run_sweep,
)
from flaxattn.bench._implementations import window_pattern
from flaxattn.kernels.efficient import bigbird_block_layout

ROOT = Path(__file__).resolve().parent.parent
# Max |error| against the float64 reference, for outputs and gradients of magnitude ~1.
TOLERANCE = {"float32": (1e-5, 1e-4), "bfloat16": (3e-2, 1e-1), "float16": (4e-3, 2e-2)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.jsonl"
    sweep = PRESETS["tiny"]
    assert len(sweep.seq_lens) == 2 and sweep.repeats == 1
    records = run_sweep(sweep, preset="tiny", command="pytest", out=out, progress=False)
    return sweep, records, out


def test_tiny_sweep_records_are_complete_and_accurate(tiny):
    sweep, records, out = tiny
    runs = len(sweep.seq_lens) * len(sweep.causal) * len(sweep.passes)
    assert len(records) == runs * len(sweep.implementations)
    assert load_records(out) == records  # the JSONL file holds the same, one per line
    assert missing_fields(records) == []
    assert all(set(r) == set(RECORD_FIELDS) for r in records)
    for r in records:
        name = f"{r['implementation']} T={r['seq_len']} {r['pass']}"
        if r["implementation"] == "cudnn":  # needs an NVIDIA GPU
            assert r["status"] == "unsupported" and r["reason"], name
            continue
        assert r["status"] == "ok", (name, r["status"], r["reason"])
        assert r["interpret"] == (r["implementation"] == "pallas"), name
        if IMPLEMENTATIONS[r["implementation"]].approximate:
            # No exact reference of its own: the distance from softmax, which is far from 0.
            assert r["max_abs_error"] is None and r["max_abs_grad_error"] is None, name
            assert r["error_reference"].startswith("approximation"), name
            assert 0.1 < r["approx_error"] < 10, (name, r["approx_error"])
            if r["pass"] == "fwd+bwd":
                assert 0 < r["approx_grad_error"] < 100, (name, r["approx_grad_error"])
            assert r["flops"] is None and r["tflops"] is None and r["fraction_of_peak"] is None
        else:
            out_tol, grad_tol = TOLERANCE[r["dtype"]]
            assert r["max_abs_error"] <= out_tol, (name, r["max_abs_error"])
            if r["pass"] == "fwd+bwd":
                assert r["max_abs_grad_error"] <= grad_tol, (name, r["max_abs_grad_error"])
            assert r["approx_error"] is None and r["approx_grad_error"] is None, name
            assert r["tflops"] > 0 and r["fraction_of_peak"] > 0, name
        assert 0 < r["time_min_s"] <= r["time_median_s"] <= r["time_max_s"]
        assert r["repeats"] == 1 and r["compile_seconds"] > 0
        assert r["matmul_tflops"] > 0
        assert r["temp_memory_bytes"] is not None
        assert r["device"] and r["jax_version"] and r["command"] == "pytest"


def test_efficient_variants_are_in_the_tiny_preset(tiny):
    _, records, _ = tiny
    ran = {r["implementation"] for r in records if r["status"] == "ok"}
    assert {"linear", "favor", "local", "block_sparse"} <= ran


def test_window_pattern_by_hand():
    pattern = window_pattern(2)
    rows = np.array([0, 3, 5])
    causal = pattern.visible(rows, 6, 6, True)
    assert causal.astype(int).tolist() == [
        [1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]]
    both = pattern.visible(rows, 6, 6, False)
    assert both.astype(int).tolist() == [
        [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert window_pattern(256).visible(rows, 6, 6, False).all()  # w = min(256, S - 1)


def test_block_pattern_is_the_kernels_layout():
    impl = block_sparse_implementation(4)
    layout = bigbird_block_layout(5, 5, is_causal=False)  # T = 20, blocks of 4
    visible = impl.pattern.visible(np.arange(20), 20, 20, False)
    assert (visible == np.kron(layout, np.ones((4, 4), bool))).all()
    causal = impl.pattern.visible(np.arange(20), 20, 20, True)
    assert not np.triu(causal, 1).any() and np.diag(causal).all()


@pytest.fixture
def small_patterns():
    """A window and a block layout that really cut attention at T = 128."""
    impls = [
        register(local_implementation(16, name="test_local16")),
        register(block_sparse_implementation(16, name="test_block_sparse16")),
    ]
    yield tuple(impl.name for impl in impls)
    for impl in impls:
        del IMPLEMENTATIONS[impl.name]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_pattern_variants_match_the_masked_reference(small_patterns, causal):
    sweep = PRESETS["tiny"].__class__(
        seq_lens=(128,), num_heads=(4,), gqa_ratios=(2,), causal=(causal,),
        implementations=small_patterns, matmul_size=64, repeats=1)
    records = run_sweep(sweep, preset="tiny", command="pytest", progress=False)
    assert missing_fields(records) == []
    by_name = {(r["implementation"], r["pass"]): r for r in records}
    out_tol, grad_tol = TOLERANCE["float32"]
    for name in small_patterns:
        fwd, bwd = by_name[name, "fwd"], by_name[name, "fwd+bwd"]
        assert fwd["status"] == bwd["status"] == "ok", (fwd["status"], bwd["status"])
        assert " on " in fwd["error_reference"], fwd["error_reference"]
        assert fwd["max_abs_error"] <= out_tol and bwd["max_abs_grad_error"] <= grad_tol
        # FLOPs count the pattern's pairs: well under dense attention's.
        dense = attention_flops(1, 4, 128, 128, 64, causal=causal)
        assert fwd["flops"] < 0.8 * dense, (name, fwd["flops"], dense)


def test_pattern_reference_is_not_the_dense_one(small_patterns):
    """A pattern variant's output is far from dense softmax, so the masked reference matters."""
    from flaxattn.bench._runner import _inputs, _Reference
    from flaxattn.bench._sweep import Point

    point = Point(128, 64, 4, 2, "float32", True, 1)
    arrays = _inputs(point)
    reference = _Reference(point, arrays, error_rows=128)
    for name in small_patterns:
        impl = IMPLEMENTATIONS[name]
        out = jax.jit(functools.partial(impl.fn, causal=True))(*arrays[:3])
        assert reference.errors(out, impl.pattern)[0] <= TOLERANCE["float32"][0], name
        assert reference.errors(out)[0] > 0.1, name


def test_table_and_plots(tiny, tmp_path):
    _, records, _ = tiny
    table = format_table(records)
    for name in PRESETS["tiny"].implementations:
        assert name in table
    assert "pallas (interpret)" in table
    paths = plot_records(records, tmp_path / "tiny")
    assert [p.name for p in paths] == [
        "tiny_time.png", "tiny_fraction_of_peak.png", "tiny_memory.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    markdown = format_table(records, markdown=True)
    assert markdown.startswith("| impl |") and markdown.count("\n") == len(records) + 1


def test_budgets_record_skips_instead_of_running(tmp_path):
    sweep = PRESETS["tiny"].__class__(
        seq_lens=(64,), implementations=("xla",), passes=("fwd",), causal=(False,),
        memory_budget_gb=1e-9, matmul_size=64, repeats=1)
    [record] = run_sweep(sweep, preset="tiny", command="pytest", progress=False)
    assert record["status"] == "skipped" and "memory budget" in record["reason"]
    assert missing_fields([record]) == []


def test_registry_is_extensible_and_guards_names():
    with pytest.raises(ValueError, match="already registered"):
        register(Implementation("xla", IMPLEMENTATIONS["xla"].fn, "again"))
    extra = register(Implementation("test_extra", IMPLEMENTATIONS["xla"].fn, "a copy"))
    try:
        assert IMPLEMENTATIONS["test_extra"] is extra
    finally:
        del IMPLEMENTATIONS["test_extra"]


def test_report_mode_reprints_a_past_run(tiny, capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import benchmark
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    _, records, out = tiny
    assert benchmark.main(["--report", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "blocked" in printed and f"results: {out}" in printed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seq-lens", "1024,abc"], "--seq-lens"),
        (["--impls", "blocked,nope"], "nope"),
        (["--preset", "tiny", "--gqa-ratios", "3"], "gqa ratio 3"),
        (["--frobnicate"], "unrecognized"),
    ],
    ids=["bad length", "unknown implementation", "ratio not dividing heads", "unknown flag"],
)
def test_bad_flags_print_one_line_and_exit_2(flags, message):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "benchmark.py"), *flags],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_records_are_json_serialisable(tiny):
    _, records, _ = tiny
    for r in records:
        assert json.loads(json.dumps(r)) == r


def test_time_interleaved_alternates_the_calls():
    # The calls run in alternation (A, B, A, B, ...), warm-up rounds first, and each one's
    # times are its own: a slow call's median is not the fast one's.
    from flaxattn.bench import compiled_call, time_interleaved

    order: list[str] = []

    def call(name, seconds):
        def run():
            order.append(name)
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass

        return run

    timings = time_interleaved({"a": call("a", 0.0), "b": call("b", 0.003)}, repeats=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert timings["a"].repeats == timings["b"].repeats == 3
    assert timings["b"].min >= 0.003 > timings["a"].median
    run, compile_seconds = compiled_call(lambda x: x * 2, np.ones(3, np.float32))
    np.testing.assert_array_equal(run(), np.full(3, 2.0))
    assert compile_seconds > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_matmul_ceiling_accumulates_in_float32(dtype):
    # The ceiling is the matmul as attention's products do it: a float32 result, which on CPU
    # is the fast (AMX) path for bf16 inputs; a bf16 result would understate the ceiling ~4x.
    from flaxattn.bench import square_matmul

    x = jax.numpy.asarray(np.arange(9, dtype=np.float32).reshape(3, 3) / 8, dtype)
    out = square_matmul(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.asarray(x, np.float32) @ np.asarray(x, np.float32))
