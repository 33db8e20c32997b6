"""Vocabularies, tokenisers and padding: the small shared pieces every task generator uses."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


@dataclasses.dataclass(frozen=True)
class Vocab:
    """A fixed token <-> id table whose first four entries are ``<pad> <bos> <eos> <unk>``.

    Id 0 is padding everywhere in flaxattn, so a zero-filled array is an empty batch.
    """

    tokens: tuple[str, ...]  # id -> token; tokens[:4] == SPECIALS

    pad_id = 0
    bos_id = 1
    eos_id = 2
    unk_id = 3

    def __post_init__(self):
        if self.tokens[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"Vocab.tokens must start with {SPECIALS}, got {self.tokens[:4]}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("Vocab.tokens has duplicates")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    @classmethod
    def build(cls, symbols: Iterable[str]) -> Vocab:
        """The specials followed by ``symbols`` in the order given (deduplicated)."""
        return cls(SPECIALS + tuple(dict.fromkeys(s for s in symbols if s not in SPECIALS)))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Token strings -> ids; unknown tokens map to ``<unk>``."""
        index = self._index
        return [index.get(t, self.unk_id) for t in tokens]

    def decode(self, ids: Iterable[int] | np.ndarray, *, strip: bool = True) -> list[str]:
        """Ids -> token strings. With ``strip``, stop at ``<eos>`` and drop ``<pad>``/``<bos>``."""
        out = []
        for i in ids:
            i = int(i)
            if strip and i == self.eos_id:
                break
            if strip and i in (self.pad_id, self.bos_id):
                continue
            out.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
        return out


def char_tokenize(text: str) -> list[str]:
    """One token per character."""
    return list(text)


def word_tokenize(text: str) -> list[str]:
    """Whitespace-separated words."""
    return text.split()


def pad_batch(
    seqs: Sequence[Sequence[int]], width: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id sequences to ``[B, width]`` int32; returns ``(ids, lengths [B])``."""
    ids = np.full((len(seqs), width), pad_id, dtype=np.int32)
    lengths = np.zeros((len(seqs),), dtype=np.int32)
    for b, seq in enumerate(seqs):
        if len(seq) > width:
            raise ValueError(f"sequence {b} has length {len(seq)} > width {width}")
        ids[b, : len(seq)] = seq
        lengths[b] = len(seq)
    return ids, lengths


def in_test_split(key: str, test_fraction: float) -> bool:
    """Deterministic train/test split by content: the same example always lands on one side.

    Uses CRC32 (not Python's salted ``hash``) so the split is identical across processes.
    """
    return (zlib.crc32(key.encode()) % 10_000) < int(round(test_fraction * 10_000))


def make_rng(seed: int, *stream: int | str) -> np.random.Generator:
    """A numpy Generator that depends only on ``seed`` and the ``stream`` labels (ints or str)."""
    words = [int(seed) & 0xFFFFFFFF]
    for s in stream:
        words.append(zlib.crc32(s.encode()) if isinstance(s, str) else int(s) & 0xFFFFFFFF)
    return np.random.default_rng(words)
