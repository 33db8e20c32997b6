"""experiments/_cli.py and the plot CLI: bad input is one line on stderr and exit code 2."""

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import _cli  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 10
    lr: float = 1e-3
    causal: bool = True
    task: str = "reverse"
    window: tuple[int, ...] = (64, 0)
    pair: tuple[int, int] = (1, 2)
    bound: Optional[int] = None  # noqa: UP045 - the Optional spelling must work too
    seed: int | None = 0
    impl: Literal["reference", "blocked"] = "reference"


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def test_parse_overrides_coerces_types():
    got = _cli.parse_overrides(
        [
            "steps=200",
            "lr=3e-4",
            "causal=false",
            "task=sort",
            "window=128,0",
            "pair=(3, 4)",
            "bound=5",
            "seed=none",
            "impl=blocked",
            "task=a=b",
        ],
        Config,
    )
    assert got == dict(
        steps=200,
        lr=3e-4,
        causal=False,
        task="a=b",
        window=(128, 0),
        pair=(3, 4),
        bound=5,
        seed=None,
        impl="blocked",
    )
    assert dataclasses.replace(Config(), **got).steps == 200
    assert _cli.parse_overrides(None, Config) == {}


@pytest.mark.parametrize(
    "pair, message",
    [
        ("stepz=3", "unknown config key 'stepz'"),
        ("steps=ten", "bad value 'ten' for steps: expected an integer"),
        ("causal=maybe", "expected true or false"),
        ("pair=1,2,3", "expected 2"),
        ("impl=flash", "expected one of reference, blocked"),
        ("steps", "not of the form key=value"),
    ],
)
def test_parse_overrides_errors(pair, message):
    with pytest.raises(_cli.CliError, match=message):
        _cli.parse_overrides([pair], Config)


def test_parser_error_is_one_line(capsys):
    parser = _cli.make_parser("demo")
    parser.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--n", "x"])
    assert exc.value.code == 2
    assert "invalid int value" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "error, code",
    [
        (_cli.CliError("bad input"), 2),
        (FileNotFoundError(2, "No such file or directory", "/x.txt"), 2),
        (PermissionError(13, "Permission denied", "/root/x"), 2),
        (ValueError("bad override"), 2),
        (KeyboardInterrupt(), 130),
    ],
)
def test_run_cli_converts_errors(capsys, error, code):
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as exc:
        _cli.run_cli(main, [])
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    if code == 2:
        _one_error_line(err)
    if isinstance(error, FileNotFoundError):
        assert "No such file or directory: /x.txt" in err


def test_run_cli_return_codes():
    for ret, code in ((None, 0), (0, 0), (3, 3)):
        with pytest.raises(SystemExit) as exc:
            _cli.run_cli(lambda argv, r=ret: r, [])
        assert exc.value.code == code


def test_checks(tmp_path):
    assert _cli.check_writable_dir(tmp_path / "a" / "b").is_dir()
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(_cli.CliError, match="cannot write to directory"):
        _cli.check_writable_dir(afile / "sub")
    assert _cli.check_readable_file(afile) == afile
    with pytest.raises(_cli.CliError, match="no such file"):
        _cli.check_readable_file(tmp_path / "missing")
    with pytest.raises(_cli.CliError, match="not a regular file"):
        _cli.check_readable_file(tmp_path)


def _plot(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "plot.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


@pytest.fixture(scope="module")
def export_file(tmp_path_factory):
    from flaxattn.export import save_attention

    w = np.full((1, 2, 3, 3), 1 / 3, dtype=np.float32)
    return save_attention(
        tmp_path_factory.mktemp("exp") / "attn.npz",
        layers={"lm/0": w},
        kinds="self",
        query_tokens=[["a", "b", "c"]],
        meta={"task": "lm"},
    )


def test_plot_cli_bad_input(tmp_path, export_file):
    afile = tmp_path / "file.txt"
    afile.write_text("not an export")
    cases = [
        ((export_file, "--out", tmp_path, "--bogus"), "unrecognized arguments"),
        ((export_file,), "--out"),
        ((export_file, "--out", tmp_path, "--kind", "pie"), "invalid choice"),
        ((tmp_path / "missing.npz", "--out", tmp_path), "no such file"),
        ((afile, "--out", tmp_path), "not a flaxattn attention export"),
        ((export_file, "--out", afile / "sub"), "cannot write to directory"),
        ((export_file, "--out", tmp_path, "--head", "x"), "--head"),
        ((export_file, "--out", tmp_path, "--layer", "nope"), "no layer 'nope'"),
    ]
    for args, message in cases:
        res = _plot(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert message in _one_error_line(res.stderr), (args, res.stderr)


def test_plot_cli_writes_figures(tmp_path, export_file):
    res = _plot(
        export_file,
        "--out",
        tmp_path / "figs",
        "--kind",
        "heatmap",
        "--format",
        "svg",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    out = list((tmp_path / "figs").iterdir())
    assert [p.suffix for p in out] == [".svg"] and out[0].stat().st_size > 0
