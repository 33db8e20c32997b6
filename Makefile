# Two commands do all the set-up on a fresh clone: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo tour test test-all lint bench gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job: train the reverse task (about 3 minutes on a 2-core CPU), export its attention
# and draw the figures, all under runs/reverse. Run again, it resumes from the last checkpoint.
demo: $(STAMP)
	$(PY) experiments/train.py --task reverse --workdir runs/reverse --resume

# A short tour of the kernels (runs them, compares with jax.nn, prints).
tour: $(STAMP)
	$(PY) experiments/demo.py

# Two pytest processes: the suite on 2 workers, then the tests that need 8 CPU devices (XLA
# creates them only at start-up, so they cannot share a process with the others).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15
	$(PY) -m pytest -q -m 'multidevice and not slow' --durations=5

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 -m 'not multidevice'
	$(PY) -m pytest -q -m multidevice

lint: $(STAMP)
	$(VENV)/bin/ruff check flaxattn experiments tests benchmarks

# On a machine with an NVIDIA GPU (e.g. the device tool's H200): the Pallas tests compiled and
# the GPU timings, written under $(OUT) (default benchmarks/results/gpu_check); < 8 minutes.
gpu-check:
	bash benchmarks/gpu_check.sh
