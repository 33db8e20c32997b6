"""Symbol-sequence tasks for encoder-decoder models: copy, reverse and sort.

Every example is ``src = x``, ``tgt_in = <bos> y``, ``tgt_out = y <eos>`` with ``y`` the copy,
the reversal or the sorted order of ``x``. Shapes are fixed by ``max_len`` so one compiled
step serves every batch. Held-out sequences never occur in training: examples are split by
content (see :func:`in_test_split`).
"""

from __future__ import annotations

import numpy as np

from flaxattn.data._vocab import SPECIALS, Vocab, in_test_split, pad_batch

SequenceTask = str  # one of "copy", "reverse", "sort"
SEQUENCE_TASKS: tuple[str, ...] = ("copy", "reverse", "sort")
_SYMBOLS = "abcdefghijklmnopqrstuvwxyz0123456789"


def symbol_vocab(num_symbols: int) -> Vocab:
    """Specials followed by ``num_symbols`` single-character symbols ``a b c ...``."""
    if not 2 <= num_symbols <= len(_SYMBOLS):
        raise ValueError(f"num_symbols must be in [2, {len(_SYMBOLS)}], got {num_symbols}")
    return Vocab.build(_SYMBOLS[:num_symbols])


def transform(task: SequenceTask, x: list[int]) -> list[int]:
    """The target of ``task`` for source ids ``x``."""
    if task == "copy":
        return list(x)
    if task == "reverse":
        return list(x[::-1])
    if task == "sort":
        return sorted(x)
    raise ValueError(f"unknown sequence task {task!r}; expected one of {SEQUENCE_TASKS}")


def sequence_batch(
    task: SequenceTask,
    batch_size: int,
    *,
    rng: np.random.Generator,
    vocab: Vocab,
    min_len: int,
    max_len: int,
    split: str = "train",
    test_fraction: float = 0.1,
) -> dict[str, np.ndarray]:
    """A batch of ``task`` examples drawn from ``rng``.

    Returns int32 arrays: ``src [B, max_len]``, ``src_lengths [B]``, ``tgt_in [B, max_len+1]``,
    ``tgt_out [B, max_len+1]``, ``tgt_lengths [B]`` (the number of valid ``tgt_out`` tokens,
    ``<eos>`` included).
    """
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    first = len(SPECIALS)  # the symbols' ids start after the specials
    num_symbols = len(vocab) - first
    srcs, tgt_ins, tgt_outs = [], [], []
    while len(srcs) < batch_size:
        length = int(rng.integers(min_len, max_len + 1))
        x = (rng.integers(0, num_symbols, size=length) + first).tolist()
        if in_test_split(",".join(map(str, x)), test_fraction) != (split == "test"):
            continue
        y = transform(task, x)
        srcs.append(x)
        tgt_ins.append([vocab.bos_id, *y])
        tgt_outs.append([*y, vocab.eos_id])
    src, src_lengths = pad_batch(srcs, max_len, vocab.pad_id)
    tgt_in, _ = pad_batch(tgt_ins, max_len + 1, vocab.pad_id)
    tgt_out, tgt_lengths = pad_batch(tgt_outs, max_len + 1, vocab.pad_id)
    return dict(
        src=src, src_lengths=src_lengths, tgt_in=tgt_in, tgt_out=tgt_out, tgt_lengths=tgt_lengths
    )


def expected_source_position(task: SequenceTask, src: np.ndarray, src_lengths: np.ndarray):
    """For each target position, the source position holding the token it must emit.

    Returns int32 ``[B, max_len+1]`` with ``-1`` where there is no such position (``<eos>``,
    padding). For ``reverse`` this is the anti-diagonal ``L - 1 - t``; for ``copy`` the
    diagonal; for ``sort`` the (stable) rank order.
    """
    bsz, width = src.shape
    out = np.full((bsz, width + 1), -1, dtype=np.int32)
    for b in range(bsz):
        n = int(src_lengths[b])
        if task == "copy":
            out[b, :n] = np.arange(n)
        elif task == "reverse":
            out[b, :n] = np.arange(n)[::-1]
        elif task == "sort":
            out[b, :n] = np.argsort(src[b, :n], kind="stable")
        else:
            raise ValueError(f"unknown sequence task {task!r}; expected one of {SEQUENCE_TASKS}")
    return out
