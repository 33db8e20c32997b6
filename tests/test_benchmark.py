"""The benchmark: the tiny sweep in-process (schema, errors, plots) and the CLI's bad flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flaxattn.bench import (
    IMPLEMENTATIONS,
    PRESETS,
    RECORD_FIELDS,
    Implementation,
    format_table,
    load_records,
    missing_fields,
    plot_records,
    register,
    run_sweep,
)

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
        out_tol, grad_tol = TOLERANCE[r["dtype"]]
        assert r["max_abs_error"] <= out_tol, (name, r["max_abs_error"])
        if r["pass"] == "fwd+bwd":
            assert r["max_abs_grad_error"] <= grad_tol, (name, r["max_abs_grad_error"])
        assert 0 < r["time_min_s"] <= r["time_median_s"] <= r["time_max_s"]
        assert r["repeats"] == 1 and r["compile_seconds"] > 0
        assert r["tflops"] > 0 and r["fraction_of_peak"] > 0 and r["matmul_tflops"] > 0
        assert r["temp_memory_bytes"] is not None
        assert r["device"] and r["jax_version"] and r["command"] == "pytest"


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
