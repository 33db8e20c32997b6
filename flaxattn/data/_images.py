"""Image data: scikit-learn's bundled 8x8 digits, and a cluttered localisation task built on them.

Both are numpy only and need no download (``sklearn.datasets.load_digits`` reads a file that
ships inside scikit-learn). Pixels are float32 in [0, 1], images ``[B, H, W]``.

- :func:`digits_split`: the 1,797 digits split into train and test by ``seed``.
- :func:`cluttered_batch`: a digit pasted at a random place on a ``canvas x canvas`` image with
  clutter fragments cut from other digits; the label is the digit's class and ``boxes [B, 4]``
  its tight box ``(top, left, bottom, right)`` (bottom and right exclusive). Test images use
  only test digits (digit and fragments), so they share no pixels with training images.
"""

from __future__ import annotations

import functools

import numpy as np

DIGIT_SIZE = 8
NUM_DIGIT_CLASSES = 10
TEST_FRACTION = 0.2


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)  # [1797, 8, 8], ints 0..16 in the file
    return images, bunch.target.astype(np.int32)


@functools.lru_cache(maxsize=8)
def digits_split(seed: int) -> dict[str, np.ndarray]:
    """The digits split by ``seed``: ``train_images [Ntr, 8, 8]``, ``train_labels [Ntr]``,
    ``test_images [Nte, 8, 8]``, ``test_labels [Nte]`` (20% test, every image in one part)."""
    images, labels = _all_digits()
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x6D1]).permutation(len(images))
    n_test = int(round(TEST_FRACTION * len(images)))
    test, train = order[:n_test], order[n_test:]
    out = {
        "train_images": images[train], "train_labels": labels[train],
        "test_images": images[test], "test_labels": labels[test],
        "train_index": train, "test_index": test,
    }  # fmt: skip
    for v in out.values():
        v.setflags(write=False)
    return out


def digits_batch(n: int, *, rng: np.random.Generator, seed: int, split: str) -> dict:
    """``n`` digits drawn (with replacement) from ``split`` ('train' or 'test') of
    :func:`digits_split` ``(seed)``: ``images [n, 8, 8]`` float32, ``labels [n]`` int32."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = digits_split(seed)
    index = rng.integers(0, len(d[f"{split}_labels"]), size=n)
    return {"images": d[f"{split}_images"][index], "labels": d[f"{split}_labels"][index]}


def digits_test_set(seed: int, n: int | None = None) -> dict:
    """The first ``n`` (default all) test digits in split order: ``images``, ``labels``."""
    d = digits_split(seed)
    n = len(d["test_labels"]) if n is None else min(n, len(d["test_labels"]))
    return {"images": d["test_images"][:n], "labels": d["test_labels"][:n]}


def _tight_box(digit: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(digit.max(1) > 0)
    cols = np.flatnonzero(digit.max(0) > 0)
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def cluttered_batch(
    n: int,
    *,
    rng: np.random.Generator,
    seed: int,
    split: str,
    canvas: int = 32,
    num_clutter: int = 4,
    clutter_size: int = 4,
    scale: int = 1,
) -> dict:
    """``n`` cluttered images of one digit each.

    Args:
      n: examples.
      rng: the randomness of this batch (positions, digits, fragments).
      seed: selects the digits' train/test split (:func:`digits_split`).
      split: 'train' or 'test': digits and fragments come from that part only.
      canvas: image side in pixels.
      num_clutter: fragments per image; they are placed outside the digit's box.
      clutter_size: fragment side in pixels (a crop of another digit, before ``scale``).
      scale: the digit and fragments are enlarged ``scale`` times (nearest neighbour).

    Returns:
      ``images [n, canvas, canvas]`` float32 in [0, 1], ``labels [n]`` int32, ``boxes [n, 4]``
      int32 ``(top, left, bottom, right)`` of the digit's nonzero pixels.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    side = DIGIT_SIZE * scale
    if canvas < side:
        raise ValueError(f"canvas must be >= the digit's {side} pixels, got {canvas}")
    if not 1 <= clutter_size <= DIGIT_SIZE:
        raise ValueError(f"clutter_size must be in [1, {DIGIT_SIZE}], got {clutter_size}")
    d = digits_split(seed)
    pool, pool_labels = d[f"{split}_images"], d[f"{split}_labels"]
    images = np.zeros((n, canvas, canvas), np.float32)
    labels = np.zeros((n,), np.int32)
    boxes = np.zeros((n, 4), np.int32)
    fs = clutter_size * scale
    for i in range(n):
        k = rng.integers(len(pool))
        digit = np.kron(pool[k], np.ones((scale, scale), np.float32))
        top, left = rng.integers(0, canvas - side + 1, size=2)
        t, lft, b, r = _tight_box(digit)
        box = (top + t, left + lft, top + b, left + r)
        for _ in range(num_clutter):
            # Fragments must not touch the digit's box, so the label stays the only digit.
            for _attempt in range(20):
                y, x = rng.integers(0, canvas - fs + 1, size=2)
                if y >= box[2] or y + fs <= box[0] or x >= box[3] or x + fs <= box[1]:
                    break
            else:
                continue
            src = pool[rng.integers(len(pool))]
            sy, sx = rng.integers(0, DIGIT_SIZE - clutter_size + 1, size=2)
            piece = src[sy : sy + clutter_size, sx : sx + clutter_size]
            piece = np.kron(piece, np.ones((scale, scale), np.float32))
            region = images[i, y : y + fs, x : x + fs]
            np.maximum(region, piece, out=region)
        region = images[i, top : top + side, left : left + side]
        np.maximum(region, digit, out=region)
        labels[i] = pool_labels[k]
        boxes[i] = box
    return {"images": images, "labels": labels, "boxes": boxes}
