"""The image data sets and the pointing-game scores on hand-made maps."""

import numpy as np
import pytest

from flaxattn import analysis, data


def test_digits_split_is_seeded_and_disjoint():
    a, b, c = data.digits_split(0), data.digits_split(0), data.digits_split(1)
    np.testing.assert_array_equal(a["test_index"], b["test_index"])
    assert not np.array_equal(a["test_index"], c["test_index"])
    assert not set(a["train_index"]) & set(a["test_index"])
    assert len(a["train_index"]) + len(a["test_index"]) == 1797
    assert a["train_images"].shape[1:] == (8, 8) and a["train_images"].min() >= 0
    assert a["train_images"].max() <= 1


def test_cluttered_deterministic_disjoint_and_boxed():
    kw = dict(seed=0, split="train", canvas=32)
    x = data.cluttered_batch(16, rng=data.make_rng(0, "t", 3), **kw)
    y = data.cluttered_batch(16, rng=data.make_rng(0, "t", 3), **kw)
    z = data.cluttered_batch(16, rng=data.make_rng(0, "t", 4), **kw)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(x["images"], z["images"])
    assert x["images"].shape == (16, 32, 32) and x["boxes"].shape == (16, 4)
    t, lft, b, r = x["boxes"].T
    assert (t >= 0).all() and (t < b).all() and (b <= 32).all() and (lft < r).all()
    # The digit's pixels are inside its box: the box holds the digit's ink.
    for img, (t, lft, b, r) in zip(x["images"], x["boxes"], strict=True):
        assert img[t:b, lft:r].sum() > 0
    # Test images are built from test digits only: each test digit is a test-split image.
    split = data.digits_split(0)
    test = data.cluttered_batch(4, rng=data.make_rng(0, "e"), seed=0, split="test",
                                num_clutter=0)
    for img in test["images"]:
        nz = np.argwhere(img > 0)
        top, left = nz.min(0)
        found = False
        for dy in range(0, 8):
            for dx in range(0, 8):
                y0, x0 = top - dy, left - dx
                if 0 <= y0 <= 24 and 0 <= x0 <= 24:
                    crop = img[y0:y0 + 8, x0:x0 + 8]
                    if np.isclose(crop.sum(), img.sum()):
                        found |= crop.tobytes() in {t.tobytes() for t in split["test_images"]}
        assert found


def test_cluttered_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        data.cluttered_batch(1, rng=data.make_rng(0), seed=0, split="val")
    with pytest.raises(ValueError, match="canvas"):
        data.cluttered_batch(1, rng=data.make_rng(0), seed=0, split="train", canvas=4)


def test_pointing_game_on_hand_made_maps():
    maps = np.zeros((3, 8, 8))
    maps[0, 2, 3] = 1.0  # inside the box
    maps[1, 7, 7] = 1.0  # outside
    maps[2] = 0.5  # flat: the first pixel, (0, 0), is outside the box
    boxes = np.array([[1, 1, 4, 5]] * 3)
    np.testing.assert_array_equal(analysis.pointing_game(maps, boxes), [True, False, False])
    np.testing.assert_allclose(analysis.pointing_chance(boxes, (8, 8)), 12 / 64)


def test_box_iou_on_hand_made_maps():
    maps = np.zeros((2, 8, 8))
    maps[0, 1:4, 1:5] = 1.0  # exactly the box
    maps[1, 2:4, 3:7] = 1.0  # overlaps 2x2 of the 3x4 box; union 12 + 8 - 4
    boxes = np.array([[1, 1, 4, 5]] * 2)
    np.testing.assert_allclose(analysis.box_iou(maps, boxes), [1.0, 4 / 16])
    with pytest.raises(ValueError, match="threshold"):
        analysis.box_iou(maps, boxes, threshold=0.0)


def test_rollout_maps_and_upsampling():
    B, grid = 2, (2, 2)
    T = 1 + 4
    w = np.zeros((B, 1, T, T))
    w[:, :, :, :] = np.eye(T)[None, None]
    w[:, :, 0, :] = 0.0
    w[:, :, 0, 4] = 1.0  # the class token looks at patch (1, 1)
    maps = analysis.rollout_maps([w, w], grid=grid, prefix=1)
    assert maps.shape == (2, B, 2, 2)
    assert np.unravel_index(maps[-1, 0].argmax(), grid) == (1, 1)
    pixels = analysis.upsample_map(maps[-1], (8, 8))
    assert pixels.shape == (B, 8, 8)
    boxes = np.array([[4, 4, 8, 8], [0, 0, 4, 4]])
    np.testing.assert_array_equal(analysis.pointing_game(pixels, boxes), [True, False])
