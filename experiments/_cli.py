"""Shared command-line plumbing for every ``experiments/*.py`` script.

Bad user input (a bad flag, a missing file, an unwritable directory, a bad ``key=value``
override) ends the program with ONE line ``error: ...`` on stderr and exit code 2, never a
usage dump or a traceback; Ctrl-C exits with 130. Set ``FLAXATTN_DEBUG=1`` to get the full
traceback of a converted error instead.

    from _cli import CliError, make_parser, run_cli

    def main(argv=None):
        args = make_parser(__doc__).parse_args(argv)
        ...

    if __name__ == "__main__":
        run_cli(main)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

# `python experiments/x.py` puts experiments/ on sys.path (so `import _cli` works); put the
# repository root there too so `import flaxattn` works from a clone that is not pip-installed.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)

USER_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
    ValueError,
)


class CliError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


def _fail(message: str) -> NoReturn:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's default prints usage first
        _fail(f"{message} (see {self.prog} --help)")


def make_parser(description: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    return _Parser(description=description, **kwargs)


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename}"
    return str(err) or type(err).__name__


def run_cli(
    main: Callable[[list[str] | None], int | None], argv: list[str] | None = None
) -> NoReturn:
    """Run ``main(argv)`` and exit with its return code (None means 0)."""
    try:
        code = main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (CliError, *USER_ERRORS) as err:
        if os.environ.get("FLAXATTN_DEBUG"):
            raise
        _fail(_describe(err))
    sys.exit(int(code or 0))


_TRUE = {"1", "true", "yes", "on", "t", "y"}
_FALSE = {"0", "false", "no", "off", "f", "n"}


def _coerce(text: str, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(text, arg)
            except (ValueError, TypeError) as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, args))}")
    if origin is tuple:
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(p.strip(), args[0]) for p in parts)
        if len(parts) != len(args):
            raise ValueError(f"expected {len(args)} comma-separated values")
        return tuple(_coerce(p.strip(), a) for p, a in zip(parts, args, strict=True))
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise ValueError("expected true or false")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    if tp is str or tp is Any:
        return text
    raise TypeError(f"cannot set a field of type {tp} from the command line")


def parse_overrides(pairs: list[str] | None, config_cls: type) -> dict[str, Any]:
    """Parse ``key=value`` strings into typed values for ``dataclasses.replace(config, **d)``."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise CliError(f"override {pair!r} is not of the form key=value")
        if key not in fields:
            raise CliError(
                f"unknown config key {key!r} for {config_cls.__name__}; "
                f"known keys: {', '.join(sorted(fields))}"
            )
        try:
            out[key] = _coerce(value, hints.get(key, str))
        except (ValueError, TypeError) as err:
            raise CliError(f"bad value {value!r} for {key}: {err}") from None
    return out


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and make sure files can be written in it."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CliError(f"cannot write to directory {str(p)!r}: {err.strerror or err}") from None
    return p


def check_readable_file(path: str | os.PathLike) -> Path:
    """Make sure ``path`` is an existing, readable regular file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CliError(f"no such file: {str(p)!r}")
    if not p.is_file():
        raise CliError(f"not a regular file: {str(p)!r}")
    try:
        with p.open("rb") as f:
            f.read(1)
    except OSError as err:
        raise CliError(f"cannot read {str(p)!r}: {err.strerror or err}") from None
    return p
