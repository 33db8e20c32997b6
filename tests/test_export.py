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
