"""The prepared GPU check (benchmarks/gpu_check.sh) dry-runs on the CPU at tiny size, so the
command a GPU session runs first is known to work before it costs device time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_writes_its_results(tmp_path):
    env = dict(os.environ, GPU_CHECK_TINY="1", OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "pytest exit: 0" in (tmp_path / "gpu_check_tests.txt").read_text()
    assert "gpu_bench exit: 0" in (tmp_path / "gpu_bench_log.txt").read_text()
    assert "jax" in (tmp_path / "gpu_check_device.txt").read_text()
    report = (tmp_path / "gpu_bench.txt").read_text()
    records = [json.loads(line) for line in report.splitlines() if line.startswith("{")]
    assert len(records) == 4 * 4  # (documents, backward) x implementations, causal only
    ran = {(r["implementation"], r["status"] == "ok") for r in records}
    assert {("pallas", True), ("blocked", True), ("xla", True), ("cudnn", False)} <= ran
    for r in records:
        if r["status"] == "ok" and r["max_abs_diff_vs_xla"] is not None:
            assert r["max_abs_diff_vs_xla"] < 5e-2, r  # bf16 outputs of magnitude ~1
