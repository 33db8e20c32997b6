"""Date normalisation: many human formats -> ISO ``YYYY-MM-DD``, the classic alignment demo.

``"21 November 2026"``, ``"11/21/26"``, ``"Nov 21, 2026"``, ``"2026.11.21"``,
``"Saturday, 21 Nov 2026"`` ... all map to ``"2026-11-21"``. Each format fixes the order of
its fields (slashes are always month/day/year, dots with the day first are day.month.year),
so the target is a function of the source. Two-digit years pivot at 50: ``26`` is 2026 and
``87`` is 1987, and dates are drawn from 1950-01-01 to 2049-12-31.

Because each source is built from its fields, the character span of the year, month and day
is known; :func:`date_batch` returns it as ``src_fields`` so cross-attention can be scored
against it (``tgt_fields`` says which field each output character belongs to).
"""

from __future__ import annotations

import datetime as dt
import string

import numpy as np

from flaxattn.data._vocab import Vocab, in_test_split, pad_batch

# Field ids used in src_fields / tgt_fields.
OTHER, YEAR, MONTH, DAY = 0, 1, 2, 3
FIELD_NAMES = {YEAR: "year", MONTH: "month", DAY: "day"}

_FIRST = dt.date(1950, 1, 1).toordinal()
_LAST = dt.date(2049, 12, 31).toordinal()
_MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August",
    "September", "October", "November", "December",
]  # fmt: skip
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MAX_SOURCE_LEN = 28
TARGET_LEN = 10  # "YYYY-MM-DD"
_TARGET_FIELDS = [YEAR] * 4 + [OTHER] + [MONTH] * 2 + [OTHER] + [DAY] * 2

Part = tuple[str, int]  # a piece of source text and the field it belongs to


def _ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th') }"


def _yy(d: dt.date) -> str:
    return f"{d.year % 100:02d}"


def _mon(d: dt.date) -> str:
    return _MONTHS[d.month - 1][:3]


def _formats(d: dt.date) -> list[list[Part]]:
    """``d`` written in every source format, each as a list of (text, field) parts."""
    Y, M, D, O = YEAR, MONTH, DAY, OTHER  # noqa: E741 -- field letters keep the table readable
    month, wday = _MONTHS[d.month - 1], _WEEKDAYS[d.weekday()]
    return [
        [(str(d.day), D), (" ", O), (month, M), (" ", O), (str(d.year), Y)],
        [(f"{d.month:02d}", M), ("/", O), (f"{d.day:02d}", D), ("/", O), (_yy(d), Y)],
        [(str(d.month), M), ("/", O), (str(d.day), D), ("/", O), (str(d.year), Y)],
        [(_mon(d), M), (" ", O), (str(d.day), D), (", ", O), (str(d.year), Y)],
        [(str(d.year), Y), (".", O), (f"{d.month:02d}", M), (".", O),
                   (f"{d.day:02d}", D)],
        [(f"{wday}, ", O), (str(d.day), D), (" ", O), (_mon(d), M), (" ", O),
                   (str(d.year), Y)],
        [(str(d.day), D), (".", O), (str(d.month), M), (".", O), (str(d.year), Y)],
        [(month, M), (" ", O), (_ordinal(d.day), D), (", ", O), (str(d.year), Y)],
        [(f"{d.day:02d}", D), ("-", O), (_mon(d), M), ("-", O), (str(d.year), Y)],
        [("the ", O), (_ordinal(d.day), D), (" of ", O), (month, M), (" ", O),
                   (str(d.year), Y)],
        [(str(d.year), Y), ("/", O), (str(d.month), M), ("/", O), (str(d.day), D)],
        [(str(d.day), D), (" ", O), (_mon(d).lower(), M), (" ", O), (_yy(d), Y)],
        [(wday[:3], O), (" ", O), (_mon(d), M), (" ", O), (str(d.day), D), (" ", O),
                   (str(d.year), Y)],
        [(month.upper(), M), (" ", O), (str(d.day), D), (" ", O), (str(d.year), Y)],
    ]  # fmt: skip


NUM_FORMATS = len(_formats(dt.date(2000, 1, 1)))
DATE_ALPHABET = string.ascii_letters + string.digits + " ,./-"


def date_vocab() -> Vocab:
    """Character vocabulary shared by sources and targets."""
    return Vocab.build(DATE_ALPHABET)


def format_date(d: dt.date, fmt: int) -> tuple[str, list[int]]:
    """Source text of ``d`` in format ``fmt`` and the field id of each character."""
    parts = _formats(d)[fmt]
    text = "".join(p for p, _ in parts)
    fields = [f for p, f in parts for _ in p]
    return text, fields


def date_batch(
    batch_size: int,
    *,
    rng: np.random.Generator,
    vocab: Vocab,
    split: str = "train",
    test_fraction: float = 0.1,
) -> dict[str, np.ndarray]:
    """A batch of (human date, ISO date) pairs; held-out dates never occur in training.

    Returns int32 arrays ``src [B, 28]``, ``src_lengths``, ``tgt_in [B, 11]`` (``<bos>`` + ISO),
    ``tgt_out [B, 11]`` (ISO + ``<eos>``), ``tgt_lengths``, ``src_fields [B, 28]`` and
    ``tgt_fields [B, 11]`` (0 other, 1 year, 2 month, 3 day), and ``fmt [B]``.
    """
    srcs, src_fields, tgts, fmts = [], [], [], []
    while len(srcs) < batch_size:
        d = dt.date.fromordinal(int(rng.integers(_FIRST, _LAST + 1)))
        fmt = int(rng.integers(0, NUM_FORMATS))
        if in_test_split(d.isoformat(), test_fraction) != (split == "test"):
            continue
        text, fields = format_date(d, fmt)
        srcs.append(vocab.encode(text))
        src_fields.append(fields)
        tgts.append(vocab.encode(d.isoformat()))
        fmts.append(fmt)
    src, src_lengths = pad_batch(srcs, MAX_SOURCE_LEN, vocab.pad_id)
    fields, _ = pad_batch(src_fields, MAX_SOURCE_LEN, OTHER)
    tgt_in, _ = pad_batch([[vocab.bos_id, *t] for t in tgts], TARGET_LEN + 1, vocab.pad_id)
    tgt_out, tgt_lengths = pad_batch([[*t, vocab.eos_id] for t in tgts], TARGET_LEN + 1)
    tgt_fields = np.tile(np.array([*_TARGET_FIELDS, OTHER], np.int32), (batch_size, 1))
    return dict(
        src=src, src_lengths=src_lengths, tgt_in=tgt_in, tgt_out=tgt_out,
        tgt_lengths=tgt_lengths, src_fields=fields, tgt_fields=tgt_fields,
        fmt=np.asarray(fmts, np.int32),
    )  # fmt: skip
