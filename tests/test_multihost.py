"""Multi-host training, for real: two processes on one machine train as one process does.

Two ``experiments/train.py --distributed`` processes with 2 forced CPU devices each join
through ``jax.distributed`` on 127.0.0.1 (CPU collectives: gloo, jaxlib's default) and train
charlm on a data=4 mesh over their 4 devices (batch shards and the gradient all-reduce cross
the processes); one process with 4 forced CPU devices trains the same mesh. The loss curves
agree, and only process 0 writes metrics and results. (A data=2 x seq=2 mesh, ring attention
included, agrees as well but compiles for twice as long.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
TINY = ["context=16", "d_model=16", "num_heads=2", "num_layers=1", "d_ff=32", "batch_size=8",
        "log_every=1", "eval_every=0", "checkpoint_every=0", "eval_examples=4",
        "export_examples=2", "num_samples=0", "figures=false", "dropout_rate=0.1"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(workdir: Path, text: Path, devices: int, *flags: str) -> subprocess.Popen:
    """``train.py`` on ``devices`` forced CPU devices, on the data=4 mesh."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")  # fmt: skip
    env.pop("FLAXATTN_DEBUG", None)
    command = [sys.executable, str(ROOT / "experiments" / "train.py"), "--task", "charlm",
               "--workdir", str(workdir), "--text", str(text), "--steps", str(STEPS),
               "--mesh", "data=4", "--no-progress", *flags, "--set", *TINY]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _wait(procs: dict[str, subprocess.Popen], timeout: float) -> dict[str, tuple[int, str, str]]:
    out = {}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=timeout)
            out[name] = (proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():  # a process left waiting for its peer
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return out


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_as_one_process_with_their_devices(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("a small corpus for a multi-host run. " * 20, encoding="utf-8")
    shared, single = tmp_path / "two-processes", tmp_path / "one-process"
    coordinator = ["--distributed", "--coordinator", f"127.0.0.1:{_free_port()}",
                   "--num-processes", "2"]  # fmt: skip
    done = _wait(
        {
            "process 0": _train(shared, text, 2, *coordinator, "--process-id", "0"),
            "process 1": _train(shared, text, 2, *coordinator, "--process-id", "1"),
            "single": _train(single, text, 4),
        },
        timeout=300,
    )
    for name, (code, _, stderr) in done.items():
        assert code == 0, (name, stderr[-3000:])
    assert f"charlm: step {STEPS}" in done["process 0"][1]
    # Process 0 reports for all (process 1's stdout has only gloo's C++ connection messages).
    assert "charlm:" not in done["process 1"][1] and "wrote" not in done["process 1"][1]

    runs = {"shared": _records(shared), "single": _records(single)}
    meta = {name: records[0] for name, records in runs.items()}
    assert meta["shared"]["processes"] == 2 and meta["single"]["processes"] == 1
    assert meta["shared"]["mesh"] == meta["single"]["mesh"] == "data=4,seq=1"
    # One writer: every step recorded once (two writers would have doubled the records).
    losses = {n: [r["loss"] for r in rs if r["split"] == "train"] for n, rs in runs.items()}
    steps = [r["step"] for r in runs["shared"] if r["split"] == "train"]
    assert steps == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses["shared"], losses["single"], rtol=0, atol=1e-5)
    results = {n: json.loads((d / "results.json").read_text()) for n, d in
               (("shared", shared), ("single", single))}  # fmt: skip
    assert results["shared"]["processes"] == 2 and results["shared"]["devices"] == 4
    assert abs(results["shared"]["bits_per_char"] - results["single"]["bits_per_char"]) < 1e-5
    assert (shared / "attention.npz").is_file()
    # Both processes saved the checkpoint; orbax renames it into place once both finished.
    assert (shared / "checkpoints" / str(STEPS) / "state").is_dir()
