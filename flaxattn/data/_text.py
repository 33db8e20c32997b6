"""Character-level text: a local file, by default the Python standard library's own sources.

Nothing is downloaded: the default corpus is a few modules of the running interpreter's
standard library, found through ``sysconfig`` (they exist wherever Python does).
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from pathlib import Path

import numpy as np

from flaxattn.data._vocab import Vocab

DEFAULT_STDLIB_MODULES = ("textwrap.py", "difflib.py", "heapq.py", "fractions.py", "calendar.py")


def default_text_paths() -> list[Path]:
    """The standard-library source files of the default corpus that exist on this machine."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = [stdlib / name for name in DEFAULT_STDLIB_MODULES if (stdlib / name).is_file()]
    if not paths:  # an unusual layout: fall back to whatever modules are there
        paths = sorted(stdlib.glob("*.py"))[:5]
    if not paths:
        raise FileNotFoundError(f"no Python sources found under {stdlib}")
    return paths


def read_text_file(path: str | os.PathLike) -> str:
    """The contents of a UTF-8 text file; ``ValueError`` for a binary or non-UTF-8 file.

    A NUL byte marks a binary file (text never has one); otherwise the first undecodable byte
    is reported with its offset, so a Latin-1 file can be re-encoded rather than trained on
    as garbage.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise ValueError(f"text={str(p)!r}: cannot read it ({err.strerror or err})") from None
    if b"\0" in data[:65536]:
        raise ValueError(f"text={str(p)!r} is a binary file, expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"text={str(p)!r} is not UTF-8 text (byte {err.start}: {data[err.start]:#04x})"
        ) from None


def load_text(path: str | os.PathLike | None = None, *, max_chars: int | None = None) -> str:
    """The text of ``path`` (UTF-8, undecodable bytes replaced), or the default corpus."""
    if path is not None:
        text = read_text_file(path)
    else:  # the standard library's sources; a stray undecodable byte does not matter there
        text = "\n".join(
            p.read_text(encoding="utf-8", errors="replace") for p in default_text_paths()
        )
    if max_chars is not None:
        text = text[:max_chars]
    if len(text) < 2:
        raise ValueError(f"text {path or 'corpus'} has fewer than 2 characters")
    return text


@dataclasses.dataclass(frozen=True)
class CharCorpus:
    """A text split into training and validation ids (the last ``val_fraction``, contiguous)."""

    vocab: Vocab
    train_ids: np.ndarray  # int32 [n_train]
    val_ids: np.ndarray  # int32 [n_val]

    @classmethod
    def from_text(cls, text: str, *, val_fraction: float = 0.1) -> CharCorpus:
        vocab = Vocab.build(sorted(set(text)))
        ids = np.asarray(vocab.encode(text), np.int32)
        n_val = max(2, int(len(ids) * val_fraction))
        if len(ids) - n_val < 2:
            raise ValueError(f"text of {len(ids)} characters is too short to split")
        return cls(vocab=vocab, train_ids=ids[:-n_val], val_ids=ids[-n_val:])


def char_windows(
    ids: np.ndarray, batch_size: int, length: int, *, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random windows for next-character prediction: ``inputs``/``targets`` ``[B, length]``.

    Texts shorter than ``length + 1`` give shorter windows, padded; ``lengths [B]`` says how
    much of each row is real.
    """
    width = min(length, len(ids) - 1)
    starts = rng.integers(0, len(ids) - width, size=batch_size)
    rows = np.stack([ids[s : s + width + 1] for s in starts])  # [B, width+1]
    inputs = np.zeros((batch_size, length), np.int32)
    targets = np.zeros((batch_size, length), np.int32)
    inputs[:, :width], targets[:, :width] = rows[:, :-1], rows[:, 1:]
    return dict(inputs=inputs, targets=targets, lengths=np.full((batch_size,), width, np.int32))


def sequential_windows(ids: np.ndarray, length: int, max_windows: int) -> dict[str, np.ndarray]:
    """Non-overlapping windows from the start of ``ids``: a fixed evaluation set."""
    width = min(length, len(ids) - 1)
    count = max(1, min(max_windows, (len(ids) - 1) // width))
    rows = np.stack([ids[i * width : i * width + width + 1] for i in range(count)])
    inputs = np.zeros((count, length), np.int32)
    targets = np.zeros((count, length), np.int32)
    inputs[:, :width], targets[:, :width] = rows[:, :-1], rows[:, 1:]
    return dict(inputs=inputs, targets=targets, lengths=np.full((count,), width, np.int32))
