"""Scoring image attention maps against where the object is: the pointing game and box IoU.

Maps are ``[B, h, w]`` over the whole image (any non-negative scores; a coarser map than the
image, e.g. one value per patch, is upsampled with :func:`upsample_map`); boxes are ``[B, 4]``
``(top, left, bottom, right)`` in pixels with bottom and right exclusive. numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flaxattn.analysis._stats import attention_rollout


def _check(maps, boxes) -> tuple[np.ndarray, np.ndarray]:
    maps, boxes = np.asarray(maps, np.float64), np.asarray(boxes)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [B, H, W], got shape {maps.shape}")
    if boxes.shape != (maps.shape[0], 4):
        raise ValueError(f"boxes must be [B={maps.shape[0]}, 4], got shape {boxes.shape}")
    return maps, boxes.astype(np.int64)


def upsample_map(maps, size: tuple[int, int]) -> np.ndarray:
    """``[B, h, w]`` -> ``[B, H, W]`` by repeating each cell (``H % h == 0 == W % w``)."""
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [B, h, w], got shape {maps.shape}")
    (h, w), (H, W) = maps.shape[1:], size
    if H % h or W % w:
        raise ValueError(f"size {size} is not a multiple of the map's {(h, w)}")
    return np.repeat(np.repeat(maps, H // h, axis=1), W // w, axis=2)


def pointing_game(maps, boxes) -> np.ndarray:
    """``[B]`` bool: the map's maximum lies inside the box (Zhang et al., 2016).

    The maximum is the first maximal pixel in row-major order, so a flat map scores no better
    than the single pixel ``(0, 0)`` (ties never count as hits by themselves).
    """
    maps, boxes = _check(maps, boxes)
    B, H, W = maps.shape
    y, x = np.divmod(maps.reshape(B, -1).argmax(-1), W)
    return (y >= boxes[:, 0]) & (y < boxes[:, 2]) & (x >= boxes[:, 1]) & (x < boxes[:, 3])


def pointing_chance(boxes, size: tuple[int, int]) -> np.ndarray:
    """``[B]``: box area / image area, the hit rate of a uniformly random point."""
    boxes = np.asarray(boxes, np.int64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return area / float(size[0] * size[1])


def box_iou(maps, boxes, *, threshold: float = 0.5) -> np.ndarray:
    """``[B]``: IoU of the box with the bounding box of the map's pixels ``>= threshold * max``."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    maps, boxes = _check(maps, boxes)
    out = np.zeros(len(maps))
    for i, (m, (t, lft, b, r)) in enumerate(zip(maps, boxes, strict=True)):
        on = m >= threshold * m.max()
        ys, xs = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
        pt, pl, pb, pr = ys[0], xs[0], ys[-1] + 1, xs[-1] + 1
        inter = max(0, min(b, pb) - max(t, pt)) * max(0, min(r, pr) - max(lft, pl))
        union = (b - t) * (r - lft) + (pb - pt) * (pr - pl) - inter
        out[i] = inter / union if union > 0 else 0.0
    return out


def patch_map(rows, grid: tuple[int, int], prefix: int = 0) -> np.ndarray:
    """Attention rows over tokens ``[..., T]`` -> maps over the patch grid ``[..., rows, cols]``
    (the ``prefix`` non-patch tokens, e.g. a class token, are dropped)."""
    rows = np.asarray(rows)
    gr, gc = grid
    if rows.shape[-1] != prefix + gr * gc:
        raise ValueError(f"rows have {rows.shape[-1]} tokens, expected prefix {prefix} + "
                         f"{gr} x {gc} patches")  # fmt: skip
    return rows[..., prefix:].reshape(*rows.shape[:-1], gr, gc)


def rollout_maps(
    layers: Sequence,
    *,
    grid: tuple[int, int],
    prefix: int = 1,
    query: int = 0,
    residual: float = 0.5,
) -> np.ndarray:
    """Attention rollout of token ``query`` (the class token) onto the patch grid, per layer.

    ``layers``: self-attention weights ``[B, N, T, T]``, bottom first, with ``T = prefix +
    rows * cols``. Returns ``[L, B, rows, cols]``: entry ``l`` is the rollout through layers
    ``0..l`` (see :func:`flaxattn.analysis.attention_rollout`); upsample to pixels with
    :func:`upsample_map`.
    """
    rolled = attention_rollout(layers, residual=residual, return_all=True)  # [L, B, T, T]
    return patch_map(rolled[:, :, query, :], grid, prefix)
