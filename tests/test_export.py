"""flaxattn.export: the .npz schema round-trips exactly; writes are atomic; bad files are named."""

import json
import os
import zipfile

import numpy as np
import pytest

import flaxattn
from flaxattn import analysis
from flaxattn.export import (
    AttentionExport,
    ExportFormatError,
    load_attention,
    save_attention,
)

B, N, T, S = 2, 3, 5, 4


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def seq2seq():
    rng = np.random.default_rng(0)
    return dict(
        layers={
            "encoder/layers_0/attention": _softmax(rng.normal(size=(B, N, S, S))),
            "decoder/layers_0/self": _softmax(rng.normal(size=(B, N, T, T))),
            "decoder/layers_0/cross": _softmax(rng.normal(size=(B, N, T, S))),
        },
        kinds={
            "encoder/layers_0/attention": "self",  # stored as 'encoder' (key_tokens given)
            "decoder/layers_0/self": "self",
            "decoder/layers_0/cross": "cross",
        },
        query_tokens=[["<bos>", "c", "b", "a", "<eos>"], ["<bos>", "b", "a"]],  # ragged
        key_tokens=np.array([["a", "b", "c", "</s>"], ["a", "b", "</s>", "<pad>"]]),
        query_lengths=np.array([5, 3]),
        key_lengths=np.array([4, 3]),
        meta={"task": "reverse", "config": {"d_model": 32, "lengths": (3, 8)}, "step": np.int64(7)},
    )


def test_roundtrip_exact(tmp_path, seq2seq):
    path = save_attention(tmp_path / "attn.npz", **seq2seq, extras={"label": np.array([1, 0])})
    x = load_attention(path)
    assert isinstance(x, AttentionExport)
    assert x.paths == tuple(seq2seq["layers"])
    assert x.kinds == {
        "encoder/layers_0/attention": "encoder",
        "decoder/layers_0/self": "self",
        "decoder/layers_0/cross": "cross",
    }
    for p, w in seq2seq["layers"].items():
        assert x.layers[p].dtype == np.float32
        np.testing.assert_array_equal(x.layers[p], w)
        np.testing.assert_array_equal(x.heads[p], np.arange(N))
    assert x.query_tokens.tolist() == [
        ["<bos>", "c", "b", "a", "<eos>"],
        ["<bos>", "b", "a", "", ""],
    ]
    np.testing.assert_array_equal(x.key_tokens, seq2seq["key_tokens"])
    np.testing.assert_array_equal(x.query_lengths, [5, 3])
    np.testing.assert_array_equal(x.key_lengths, [4, 3])
    np.testing.assert_array_equal(x.extras["label"], [1, 0])
    assert x.meta["task"] == "reverse" and x.meta["step"] == 7
    assert x.meta["config"] == {"d_model": 32, "lengths": [3, 8]}
    assert x.meta["flaxattn_version"] == flaxattn.__version__ and "created" in x.meta
    # Tokens and lengths of each layer follow its kind.
    q, k = x.tokens("encoder/layers_0/attention")
    assert q is x.key_tokens and k is x.key_tokens
    q, k = x.tokens("decoder/layers_0/cross")
    assert q is x.query_tokens and k is x.key_tokens
    ql, kl = x.lengths("decoder/layers_0/self")
    np.testing.assert_array_equal(kl, [5, 3])
    # Plain numpy reads it without pickles.
    with np.load(path, allow_pickle=False) as raw:
        assert str(raw["format"]) == "flaxattn.attention"
        assert json.loads(str(raw["meta"]))["task"] == "reverse"


def test_bounded_topk_heads_and_layers(tmp_path, seq2seq):
    path = save_attention(
        tmp_path / "b.npz",
        **seq2seq,
        top_k=2,
        heads=[2, 0],
        layer_filter="decoder/*",
        dtype=np.float16,
    )
    x = load_attention(path)
    assert x.paths == ("decoder/layers_0/self", "decoder/layers_0/cross")
    for p in x.paths:
        full = seq2seq["layers"][p][:, [2, 0]].astype(np.float16)
        v, i = analysis.topk_compress(full, 2)
        assert x.is_topk(p)
        np.testing.assert_array_equal(x.topk_values[p], v)
        np.testing.assert_array_equal(x.topk_indices[p], i)
        np.testing.assert_array_equal(x.heads[p], [2, 0])
        dense = x.layers[p]
        assert dense.shape == full.shape[:3] + (full.shape[3],)
        np.testing.assert_array_equal(dense, analysis.topk_decompress(v, i, full.shape[3]))
    assert x.meta["bounded"]["top_k"] == 2 and x.meta["bounded"]["heads"] == [2, 0]


def test_precomputed_topk_pairs(tmp_path, seq2seq):
    cross = seq2seq["layers"]["decoder/layers_0/cross"]
    v, i = analysis.topk_compress(cross[:, :2], 3)
    x = load_attention(
        save_attention(
            tmp_path / "p.npz",
            layers={"dec/cross": (v, i)},
            kinds="cross",
            stored_heads=[1, 2],
            query_tokens=seq2seq["query_tokens"],
            key_tokens=seq2seq["key_tokens"],
        )
    )
    np.testing.assert_array_equal(x.topk_values["dec/cross"], v)
    np.testing.assert_array_equal(x.topk_indices["dec/cross"], i)
    np.testing.assert_array_equal(x.heads["dec/cross"], [1, 2])


def test_write_is_atomic(tmp_path, seq2seq, monkeypatch):
    target = tmp_path / "attn.npz"
    target.write_bytes(b"old contents")

    def broken_savez(file, **arrays):
        file.write(b"PK partial data")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_attention(target, **seq2seq)
    assert target.read_bytes() == b"old contents"  # untouched, no partial file
    assert os.listdir(tmp_path) == ["attn.npz"]  # and no temporary left behind
    monkeypatch.undo()
    save_attention(tmp_path / "fresh.npz", **seq2seq)
    assert sorted(os.listdir(tmp_path)) == ["attn.npz", "fresh.npz"]


def test_not_an_export(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ExportFormatError, match="not a flaxattn attention export"):
        load_attention(text)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.arange(3))
    with pytest.raises(ExportFormatError, match="no 'format' entry"):
        load_attention(other)
    npy = tmp_path / "a.npy"
    np.save(npy, np.arange(3))
    with pytest.raises(ExportFormatError):
        load_attention(npy)
    broken = tmp_path / "broken.npz"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("format.npy", b"garbage")
    with pytest.raises(ExportFormatError):
        load_attention(broken)
    with pytest.raises(FileNotFoundError):
        load_attention(tmp_path / "missing.npz")


def test_tampered_export_is_rejected(tmp_path, seq2seq):
    path = save_attention(tmp_path / "a.npz", **seq2seq)
    with np.load(path) as raw:
        data = dict(raw)
    data["layer/decoder/layers_0/cross"] = data["layer/decoder/layers_0/cross"][:, :, :2]
    np.savez(tmp_path / "bad.npz", **data)
    with pytest.raises(ExportFormatError, match="shape"):
        load_attention(tmp_path / "bad.npz")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(kinds={"x": "self"}), "kind of layer"),
        (dict(key_tokens=None, key_lengths=None), "shape"),
        (dict(key_tokens=None, key_lengths=None, kinds="cross"), "key_tokens, which is None"),
        (dict(query_lengths=[9, 1]), "query_lengths"),
        (dict(layer_filter="nothing*"), "selects no layer"),
        (dict(heads=[5]), "out of range"),
        (dict(top_k=0), "top_k"),
        (dict(query_tokens=[["a"] * 5]), "examples"),
    ],
)
def test_save_validates(tmp_path, seq2seq, change, message):
    with pytest.raises(ValueError, match=message):
        save_attention(tmp_path / "x.npz", **{**seq2seq, **change})
    assert not (tmp_path / "x.npz").exists()


# ----------------------------------------------------------------------------- version 2: images


@pytest.fixture
def vit_export():
    """A 2-layer ViT-like export: a class token and a 2 x 2 grid of 4 x 4 patches on 8 x 8."""
    rng = np.random.default_rng(1)
    tokens = ["<cls>"] + [f"p{r},{c}" for r in range(2) for c in range(2)]
    return dict(
        layers={
            f"encoder/layers/{i}/self_attention": _softmax(rng.normal(size=(B, N, 5, 5)))
            for i in range(2)
        },  # fmt: skip
        kinds="self",
        query_tokens=[tokens] * B,
        image={
            "pixels": rng.uniform(size=(B, 8, 8)).astype(np.float32),
            "box": np.array([[0, 0, 4, 4], [2, 3, 8, 8]]),
            "grid": (2, 2),
            "patch": (4, 4),
            "prefix": 1,
        },
        extras={"label": np.array([3, 7])},
    )


def test_v2_image_roundtrip(tmp_path, vit_export):
    x = load_attention(save_attention(tmp_path / "vit.npz", **vit_export))
    assert x.format_version == 2
    image = vit_export["image"]
    np.testing.assert_array_equal(x.image.pixels, image["pixels"])
    assert x.image.pixels.dtype == np.float32
    np.testing.assert_array_equal(x.image.box, image["box"])
    assert x.image.box.dtype == np.int32
    assert (x.image.grid, x.image.patch, x.image.prefix) == ((2, 2), (4, 4), 1)
    assert x.image.size == (8, 8) and x.image.num_patches == 4
    assert x.spatial == {} and x.channel == {}
    for p, w in vit_export["layers"].items():
        np.testing.assert_array_equal(x.layers[p], w)
    with np.load(tmp_path / "vit.npz", allow_pickle=False) as raw:  # the schema's entry names
        assert int(raw["format_version"]) == 2
        assert raw["image/grid"].tolist() == [2, 2] and raw["image/grid"].dtype == np.int32
        assert raw["image/prefix"].shape == () and int(raw["image/prefix"]) == 1


def test_v2_maps_only_export(tmp_path):
    """A CNN with SE and CBAM: channel and spatial maps, colour images, no attention layers."""
    rng = np.random.default_rng(2)
    spatial = {"blocks/1/cbam": rng.uniform(size=(B, 4, 4)).astype(np.float32)}
    channel = {"blocks/0/se": rng.uniform(size=(B, 16)), "blocks/1/cbam": rng.uniform(size=(B, 32))}
    pixels = rng.uniform(size=(B, 8, 8, 3))
    x = load_attention(
        save_attention(
            tmp_path / "cnn.npz",
            layers={},
            kinds={},
            image={"pixels": pixels},
            spatial=spatial,
            channel=channel,
            extras={"label": np.array([1, 2])},
        )
    )
    assert x.paths == () and len(x.layers) == 0
    assert x.num_examples == B and x.query_tokens.shape == (B, 0)
    assert x.image.box is None and x.image.grid is None and x.image.patch is None
    assert x.image.prefix == 0 and x.image.pixels.shape == (B, 8, 8, 3)
    np.testing.assert_allclose(x.image.pixels, pixels.astype(np.float32))
    np.testing.assert_array_equal(x.spatial["blocks/1/cbam"], spatial["blocks/1/cbam"])
    assert sorted(x.channel) == ["blocks/0/se", "blocks/1/cbam"]
    assert x.channel["blocks/0/se"].dtype == np.float32
    np.testing.assert_array_equal(x.extras["label"], [1, 2])


def _version_1_file(path, seq2seq):
    """An export as flaxattn wrote it before images existed (format_version 1)."""
    meta = {"task": "reverse", "config": None, "step": 3, "flaxattn_version": "0.1.0",
            "created": "2026-01-01T00:00:00+00:00"}  # fmt: skip
    arrays = {
        "format": np.array("flaxattn.attention"),
        "format_version": np.array(1),
        "layer_paths": np.array(["decoder/layers_0/cross"]),
        "kind/decoder/layers_0/cross": np.array("cross"),
        "layer/decoder/layers_0/cross": seq2seq["layers"]["decoder/layers_0/cross"],
        "query_tokens": np.array([["<bos>", "c", "b", "a", "<eos>"]] * B),
        "query_lengths": np.array([5, 5]),
        "key_tokens": seq2seq["key_tokens"],
        "key_lengths": seq2seq["key_lengths"],
        "meta": np.array(json.dumps(meta)),
    }
    np.savez_compressed(path, **arrays)
    return path


def test_reads_version_1(tmp_path, seq2seq):
    x = load_attention(_version_1_file(tmp_path / "v1.npz", seq2seq))
    assert x.format_version == 1
    assert x.image is None and x.spatial == {} and x.channel == {}
    np.testing.assert_array_equal(
        x.layers["decoder/layers_0/cross"], seq2seq["layers"]["decoder/layers_0/cross"]
    )
    assert x.meta["step"] == 3


def test_unknown_version_is_rejected(tmp_path, seq2seq):
    path = save_attention(tmp_path / "a.npz", **seq2seq)
    with np.load(path) as raw:
        data = dict(raw)
    data["format_version"] = np.array(3)
    np.savez(tmp_path / "v3.npz", **data)
    with pytest.raises(ExportFormatError, match="format_version 3"):
        load_attention(tmp_path / "v3.npz")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(pixels=np.full((B, 8, 8), 1.5, np.float32)), r"lie in \[0, 1\]"),
        (dict(pixels=np.zeros((B, 8), np.float32)), r"\[B, Hi, Wi\]"),
        (dict(pixels=np.zeros((3, 8, 8), np.float32)), "3 examples, expected 2"),
        (dict(pixels=np.zeros((B, 8, 8), np.uint8)), "must be float"),
        (dict(box=np.array([[0, 0, 4, 4], [2, 3, 9, 8]])), "bottom <= 8"),
        (dict(box=np.array([[0, 0, 4, 4], [5, 3, 5, 8]])), "top < bottom"),
        (dict(box=np.zeros((B, 3), int)), r"\[B=2, 4\]"),
        (dict(patch=None), "grid and patch come together"),
        (dict(grid=(1, 2)), "must cover the image: rows 1 x 4"),
        (dict(grid=(3, 2)), "must cover the image: rows 3 x 4"),
        (dict(patch=(0, 4)), "2 positive integers"),
        (dict(prefix=2), "fewer than image prefix 2"),
        (dict(prefix=-1), "non-negative int"),
        (dict(colour="red"), "unknown keys"),
    ],
)
def test_save_validates_image(tmp_path, vit_export, change, message):
    vit_export["image"] = {**vit_export["image"], **change}
    with pytest.raises(ValueError, match=message):
        save_attention(tmp_path / "x.npz", **vit_export)
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(spatial={"cbam": np.zeros((B, 4))}), r"spatial\['cbam'\] must be float \[B, h, w\]"),
        (dict(channel={"se": np.zeros((B, 4), int)}), r"channel\['se'\] must be float \[B, C\]"),
        (dict(spatial={"cbam": np.zeros((B + 1, 4, 4))}), "has 2 examples, expected 3"),
        (dict(channel={"": np.zeros((B, 4))}), "non-empty strings"),
        (dict(spatial=None, channel=None), "nothing to export"),
        (dict(query_tokens=[["a"]] * B), "without attention layers"),
    ],
)
def test_save_validates_maps(tmp_path, change, message):
    given = dict(layers={}, kinds={}, channel={"se": np.zeros((B, 4))}) | change
    with pytest.raises(ValueError, match=message):
        save_attention(tmp_path / "x.npz", **given)


def test_tampered_v2_is_rejected(tmp_path, vit_export):
    path = save_attention(tmp_path / "a.npz", **vit_export)
    with np.load(path) as raw:
        data = dict(raw)
    for key, value, message in [
        ("image/pixels", None, "without image/pixels"),
        ("image/box", np.array([[0, 0, 4, 4]]), "image box"),
        ("image/prefix", np.array(3), "fewer than the image's prefix"),
        ("channel/se", np.zeros((B, 2, 2), np.float32), "channel/se has shape"),
    ]:
        bad = dict(data)
        if value is None:
            del bad[key]
        else:
            bad[key] = value
        np.savez(tmp_path / "bad.npz", **bad)
        with pytest.raises(ExportFormatError, match=message):
            load_attention(tmp_path / "bad.npz")
