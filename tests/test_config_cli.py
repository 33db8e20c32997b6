"""Every training config field, driven with bad values through `experiments/train.py --set`:
each answer is one `error:` line naming the field, exit code 2, no traceback.

The cases are generated from the config dataclasses, so a new field is covered (or its
test fails) without editing this file. `--show-config` makes an accepted value exit 0 at
once, so a value that slips through the checks fails the test instead of starting a run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from flaxattn.train import CONFIGS, default_config

ROOT = Path(__file__).resolve().parent.parent

# Fields whose smallest usable value is 1, so 0 is also wrong (the others reject -1).
POSITIVE = {
    "batch_size", "log_every", "keep_checkpoints", "eval_examples",
    "d_model", "num_heads", "num_kv_heads", "num_layers", "d_ff", "num_symbols", "min_len",
    "max_len", "embed_dim", "hidden_dim", "n_train", "n_test", "learning_rate", "temperature",
    "vocab", "context", "min_segment", "max_segment",
    "patch", "cnn_width", "cnn_stages", "reduction", "cbam_kernel", "canvas", "clutter_size",
    "digit_scale",
}  # fmt: skip
# Bad values of the string fields (no generic bad string exists: any text is a str).
BAD_STRINGS = {
    "positional": ["absolute"],
    "implementation": ["fastest"],
    "model": ["lstm"],
    "cell": ["rnn"],
    "pool": ["max"],
    "mesh": ["data=0", "seq=2", "data=2,data=2"],
    "text": ["/bin/ls", "/nonexistent/corpus.txt", "{latin1}"],
}
# Values that are fine alone and wrong together.
INCONSISTENT = [
    ("reverse", ["min_len=6", "max_len=5"], "min_len"),
    ("reverse", ["d_model=64", "num_heads=3"], "num_heads"),
    ("reverse", ["num_heads=4", "num_kv_heads=3"], "num_kv_heads"),
    ("reverse", ["positional=rope", "d_model=12", "num_heads=4"], "rope"),
    ("reverse", ["dropout_rate=1.0"], "dropout_rate"),
    ("charlm", ["context=1"], "context"),
    ("induction", ["min_segment=10", "max_segment=9"], "max_segment"),
    ("induction", ["num_layers=1"], "num_layers"),
]


def _bad_values(name: str, tp) -> list[str]:
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    base = args[0]
    if base is bool:
        return ["maybe"]
    if base is int:
        return ["-1", "1.5", "many"] + (["0"] if name in POSITIVE else [])
    if base is float:
        return ["-1", "nan", "many"] + (["0"] if name in POSITIVE else [])
    return BAD_STRINGS[name]


def _cases():
    seen = set()
    for task, cls in CONFIGS.items():
        if cls in seen:
            continue
        seen.add(cls)
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name == "task":
                continue
            for value in _bad_values(field.name, hints[field.name]):
                yield pytest.param(task, [f"{field.name}={value}"], field.name,
                                   id=f"{task}-{field.name}={value}")  # fmt: skip
    for task, pairs, needle in INCONSISTENT:
        yield pytest.param(task, pairs, needle, id=f"{task}-{'+'.join(pairs)}")


@pytest.fixture(scope="module")
def train_cli():
    if str(ROOT / "experiments") not in sys.path:  # as `python experiments/train.py` has it
        sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "experiments" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def latin1(tmp_path) -> str:
    path = tmp_path / "latin1.txt"
    path.write_bytes("naïve café, déjà vu\n".encode("latin-1") * 10)
    return str(path)


@pytest.mark.parametrize("task, pairs, needle", list(_cases()))
def test_every_field_rejects_bad_values(train_cli, capsys, tmp_path, latin1, task, pairs,
                                        needle):  # fmt: skip
    from _cli import run_cli  # experiments/ is on sys.path (the fixture)

    pairs = [p.replace("{latin1}", latin1) for p in pairs]
    argv = ["--task", task, "--workdir", str(tmp_path / "w"), "--show-config", "--set", *pairs]
    with pytest.raises(SystemExit) as exit_:
        run_cli(train_cli.main, argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, f"{pairs} was accepted: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


def test_the_defaults_and_typed_values_pass(train_cli, capsys, tmp_path):
    """The same path accepts every default config (so the cases above fail for their value)."""
    from _cli import run_cli

    for task in CONFIGS:
        with pytest.raises(SystemExit) as exit_:
            run_cli(train_cli.main, ["--task", task, "--workdir", str(tmp_path), "--show-config"])
        assert exit_.value.code == 0, capsys.readouterr().err
    capsys.readouterr()


@pytest.mark.usefixtures("unchecked")
def test_python_callers_get_the_same_checks():
    """A config made in Python checks itself: wrong types are TypeErrors naming the field."""
    config = default_config("reverse")
    with pytest.raises(TypeError, match=r"steps must be int, got '10' \(str\)"):
        dataclasses.replace(config, steps="10")
    with pytest.raises(TypeError, match="figures must be bool"):
        dataclasses.replace(config, figures=1)
    with pytest.raises(ValueError, match="num_heads must be >= 1, got 0"):
        dataclasses.replace(config, num_heads=0)
    assert dataclasses.replace(config, learning_rate=1).learning_rate == 1  # an int is a float


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--task", "reverse", "--set", "num_heads=0"], "num_heads must be >= 1, got 0"),
        (["--task", "charlm", "--text", "/bin/ls"], "binary file"),
    ],
)
def test_the_reported_cases_in_a_real_process(tmp_path, args, needle):
    """The two commands the issue reported (a ZeroDivisionError, a binary file trained on)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "train.py"), *args, "--workdir",
         str(tmp_path / "w")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
