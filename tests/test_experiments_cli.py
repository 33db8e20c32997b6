"""experiments/train.py and experiments/export.py: bad input gives one line and exit code 2;
a tiny run and an export work end to end through the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flaxattn.export import load_attention

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("FLAXATTN_DEBUG", None)
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)  # fmt: skip


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def a_file(tmp_path) -> Path:
    f = tmp_path / "regular-file"
    f.write_text("x")
    return f


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--task", "translate", "--workdir", "{tmp}/w"], ["translate", "reverse"]),
        (["--task", "charlm", "--workdir", "{tmp}/w", "--text", "{tmp}/missing.txt"],
         ["missing.txt"]),
        (["--task", "reverse", "--workdir", "{file}/sub"], ["cannot write", "regular-file"]),
        (["--task", "reverse", "--workdir", "{tmp}/w", "--set", "d_model=wide"],
         ["d_model", "integer"]),
        (["--task", "reverse", "--workdir", "{tmp}/w", "--set", "colour=red"], ["colour"]),
        (["--task", "reverse", "--workdir", "{tmp}/w", "--set", "num_heads=3"], ["num_heads"]),
        (["--task", "sentiment", "--workdir", "{tmp}/w", "--text", "{file}"], ["--text"]),
        (["--task", "reverse", "--workdir", "{tmp}/w", "--process-id", "1"],
         ["--process-id", "--distributed"]),
        (["--task", "reverse", "--workdir", "{tmp}/w", "--distributed", "--coordinator", "host"],
         ["--coordinator", "HOST:PORT"]),
        (["--task", "reverse", "--workdir", "{tmp}/w", "--distributed", "--num-processes", "0"],
         ["--num-processes"]),
        (["--task", "reverse", "--workdir", "{tmp}/w", "--distributed", "--num-processes", "2",
          "--process-id", "2"], ["--process-id", "0 to 1"]),
    ],
    ids=["unknown-task", "missing-text", "unwritable-workdir", "bad-value", "unknown-key",
         "invalid-config", "text-for-wrong-task", "process-id-without-distributed",
         "bad-coordinator", "no-processes", "process-id-out-of-range"],
)  # fmt: skip
def test_train_cli_bad_input_is_one_line_and_exit_2(args, needles, tmp_path, a_file):
    args = [a.format(tmp=tmp_path, file=a_file) for a in args]
    _one_line_error(_run("train.py", *args), *needles)


def test_export_cli_without_checkpoints_is_one_line_and_exit_2(tmp_path):
    _one_line_error(_run("export.py", "--workdir", str(tmp_path)), "no checkpoints")


def test_train_then_export_through_the_command_line(tmp_path):
    work = tmp_path / "run"
    tiny = ["d_model=16", "num_heads=2", "d_ff=32", "max_len=5", "eval_examples=8",
            "export_examples=2", "eval_every=0", "figures=false", "batch_size=8"]  # fmt: skip
    proc = _run("train.py", "--task", "reverse", "--workdir", str(work), "--steps", "2",
                "--no-progress", "--set", *tiny)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exact_match=" in proc.stdout
    assert {"metrics.jsonl", "checkpoints", "attention.npz", "results.json"} <= {
        p.name for p in work.iterdir()
    }
    again = _run("train.py", "--task", "reverse", "--workdir", str(work), "--steps", "2",
                 "--set", *tiny)  # fmt: skip
    _one_line_error(again, "--resume")
    out = tmp_path / "mine.npz"
    proc = _run("export.py", "--workdir", str(work), "--out", str(out), "--input", "abcd", "dc",
                "--top-k", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = load_attention(out)
    assert export.num_examples == 2 and export.meta["step"] == 2
    assert export.key_tokens[0, :4].tolist() == ["a", "b", "c", "d"]
    assert export.key_lengths.tolist() == [4, 2]
    assert export.is_topk("decoder/layers/0/cross_attention")
    _one_line_error(_run("export.py", "--workdir", str(work), "--input", "xyz"), "vocabulary")
