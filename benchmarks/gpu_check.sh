#!/usr/bin/env bash
# The prepared GPU check: one call of the device tool, under 8 minutes on one H100/H200.
#
#   device tool:  run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
#   dry run here: GPU_CHECK_TINY=1 OUT=/tmp/gc bash benchmarks/gpu_check.sh    (CPU, interpret)
#
# 1. the device and the versions;  2. the Pallas conformance cases and tests/test_pallas.py,
# compiled for the GPU (not interpreted), every case including the slow ones;  3. the timings of
# benchmarks/gpu_bench.py. Everything is written under $OUT (the device tool brings it back):
# commit it to benchmarks/results/ with the device's name. Each step has its own time limit, so
# a hang in one still leaves the others' results. The H200 image has jax, flax, optax, orbax,
# pytest and hypothesis but not beartype, so the pytest options that need it are replaced.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
tiny=${GPU_CHECK_TINY:-}

{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import jax, jaxlib, flax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, \
'flax', flax.__version__); print(jax.devices())"
} > "$OUT/gpu_check_device.txt" 2>&1
cat "$OUT/gpu_check_device.txt"

if [ -n "$tiny" ]; then
  selection=(tests/test_conformance.py -k "pallas and full and float32")
else
  selection=(tests/test_conformance.py tests/test_pallas.py -k pallas)
fi
timeout 300 $PY -m pytest -q -p no:cacheprovider -o addopts="" -m "not multidevice" \
  "${selection[@]}" --durations=10 2>&1 | tail -n 80 > "$OUT/gpu_check_tests.txt"
echo "pytest exit: ${PIPESTATUS[0]}" >> "$OUT/gpu_check_tests.txt"
tail -n 5 "$OUT/gpu_check_tests.txt"

timeout 240 $PY benchmarks/gpu_bench.py ${tiny:+--tiny --repeats 2} --out "$OUT/gpu_bench.txt" 2>&1 \
  | tail -n 60 > "$OUT/gpu_bench_log.txt"
echo "gpu_bench exit: ${PIPESTATUS[0]}" >> "$OUT/gpu_bench_log.txt"
cat "$OUT/gpu_bench_log.txt"
