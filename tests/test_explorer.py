"""flaxattn.viz explorer, without a browser: the weight encoding (hand-worked codes, round trip
within the stated error), the page's embedded data against the export and flaxattn.analysis,
self-containment, bad input, the notebook object and experiments/view.py."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from explorer_exports import (
    classifier_export,
    cnn_export,
    seq2seq_export,
    softmax_weights,
    vit_export,
)

from flaxattn import analysis, viz
from flaxattn.export import ExportFormatError, load_attention, save_attention
from flaxattn.viz._explorer_data import (
    AUTO_16_BITS_MAX_CELLS,
    choose_bits,
    decode_codes,
    encode_codes,
    quantise,
)

ROOT = Path(__file__).resolve().parent.parent


def page_data(page: str) -> dict:
    """The JSON the page embeds (the <script type="application/json"> element)."""
    m = re.search(r'<script type="application/json" id="flaxattn-data">(.*?)</script>', page, re.S)
    assert m, "no embedded data"
    return json.loads(m.group(1))


def decoded_layer(entry: dict, B: int) -> np.ndarray:
    """A layer's weights ``[B, N, T, S]`` decoded from the page as the page's script does."""
    dtype = np.uint8 if entry["bits"] == 8 else np.uint16
    N, T, S = len(entry["heads"]), entry["T"], entry["S"]
    scale = (entry["hi"] - entry["lo"]) / (2 ** entry["bits"] - 1)
    if entry["topk"] is None:
        return entry["lo"] + decode_codes(entry["codes"], dtype, (B, N, T, S)) * scale
    k = entry["topk"]
    values = entry["lo"] + decode_codes(entry["codes"], dtype, (B, N, T, k)) * scale
    index_type = np.uint16 if entry["indexBits"] == 16 else np.uint32
    indices = decode_codes(entry["indices"], index_type, (B, N, T, k)).astype(np.int64)
    return analysis.topk_decompress(values, indices, S)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("exports")
    return {
        "s2s": seq2seq_export(d / "s2s.npz"),
        "topk": seq2seq_export(d / "topk.npz", top_k=2),
        "cls": classifier_export(d / "cls.npz"),
    }


# ----------------------------------------------------------------------------- encoding


def test_quantise_hand_worked_codes():
    q8 = quantise([0.0, 1 / 255, 0.5, 0.7, 1.0], 8)
    # 0.5 * 255 = 127.5 rounds to the even 128; 0.7 * 255 = 178.5 rounds to 178.
    assert q8.codes.tolist() == [0, 1, 128, 178, 255] and q8.codes.dtype == np.uint8
    assert (q8.lo, q8.hi, q8.step, q8.max_error) == (0.0, 1.0, 1 / 255, 1 / 510)
    np.testing.assert_array_equal(q8.decode(), [0.0, 1 / 255, 128 / 255, 178 / 255, 1.0])
    q16 = quantise([0.0, 0.5, 1.0], 16)
    assert q16.codes.tolist() == [0, 32768, 65535] and q16.codes.dtype == np.uint16
    assert q16.max_error == 1 / 131070
    # Values outside [0, 1] widen the range to [min, max].
    q = quantise([-0.5, 0.0, 2.0], 8)
    assert (q.lo, q.hi) == (-0.5, 2.0) and q.codes.tolist() == [0, 51, 255]


@pytest.mark.parametrize("bits", [8, 16])
def test_round_trip_within_the_stated_error(bits, rng):
    w = softmax_weights(rng, 2, 3, 5, 40, sharp=4.0)
    q = quantise(w, bits)
    text = encode_codes(q.codes)
    codes = decode_codes(text, q.codes.dtype, w.shape)
    np.testing.assert_array_equal(codes, q.codes)
    err = np.abs(q.decode() - w.astype(np.float64)).max()
    assert err <= q.max_error + 1e-12
    assert err > q.max_error / 4  # the bound is tight, not vacuous
    assert q.max_error == pytest.approx(0.5 / (2**bits - 1))


def test_encoding_is_little_endian_deflate_base64():
    import base64
    import zlib

    raw = zlib.decompress(base64.b64decode(encode_codes(np.array([1, 258], np.uint16))))
    assert raw == bytes([1, 0, 2, 1])
    with pytest.raises(TypeError, match="unsigned"):
        encode_codes(np.array([1.0]))


@pytest.mark.usefixtures("unchecked")
def test_bits_choice_and_bad_values():
    assert choose_bits(None, AUTO_16_BITS_MAX_CELLS) == 16
    assert choose_bits(None, AUTO_16_BITS_MAX_CELLS + 1) == 8
    assert choose_bits(8, 10) == 8
    for bad in (7, True, "8"):
        with pytest.raises(ValueError, match="bits must be 8, 16 or None"):
            choose_bits(bad, 10)
    with pytest.raises(ValueError, match="layer 'x' holds NaN"):
        quantise([0.5, np.nan], 8, name="layer 'x'")


# ----------------------------------------------------------------------------- the page


@pytest.mark.parametrize("name, bits", [("s2s", None), ("s2s", 8), ("topk", None), ("cls", None)])
def test_embedded_weights_round_trip(exports, name, bits):
    export = load_attention(exports[name])
    data = page_data(viz.explorer_html(export, bits=bits))
    assert sorted(e["path"] for e in data["layers"]) == sorted(export.paths)
    for entry in data["layers"]:
        assert entry["bits"] == (bits or 16)
        assert entry["maxError"] == pytest.approx(0.5 / (2 ** entry["bits"] - 1))
        expected = export.layers[entry["path"]]
        got = decoded_layer(entry, export.num_examples)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= entry["maxError"] + 1e-12
        assert (entry["topk"] is not None) == export.is_topk(entry["path"])


def test_layers_in_model_order_with_kinds_and_causal_flags(exports):
    data = page_data(viz.explorer_html(exports["s2s"]))
    got = [(e["path"], e["kind"], e["causal"]) for e in data["layers"]]
    assert got == [
        ("encoder/layers/0/attention", "encoder", False),
        ("encoder/layers/1/attention", "encoder", False),
        ("decoder/layers/0/self_attention", "self", True),
        ("decoder/layers/0/cross_attention", "cross", False),
    ]
    # The default layer is the last cross layer; head 0; the model view.
    assert data["initial"] == {"view": "model", "example": 0, "layer": 3, "head": 0, "query": -1}


def test_statistics_are_flaxattn_analysis_numbers(exports):
    export = load_attention(exports["s2s"])
    data = page_data(viz.explorer_html(export))
    paths = [e["path"] for e in data["layers"]]
    expected = analysis.layer_head_stats(
        {p: export.layers[p] for p in paths}, {p: export.lengths(p) for p in paths}, unit="bits"
    )
    for key in ("entropy", "distance", "sink"):
        np.testing.assert_allclose(np.array(data["stats"]["all"][key], float), expected[key],
                                   atol=1e-6)  # fmt: skip
    p = paths[3]
    ql, kl = export.lengths(p)
    one = analysis.head_entropy(export.layers[p], query_lengths=ql, key_lengths=kl, unit="bits",
                                per_example=True)  # fmt: skip
    np.testing.assert_allclose(np.array(data["stats"]["perExample"]["entropy"])[:, 3], one,
                               atol=1e-6)  # fmt: skip


def test_rollout_of_each_stack_equals_attention_rollout(exports):
    export = load_attention(exports["s2s"])
    data = page_data(viz.explorer_html(export))
    assert [(r["kind"], r["layers"], r["causal"]) for r in data["rollouts"]] == [
        ("encoder", [0, 1], False),
        ("self", [2], True),
    ]
    r = data["rollouts"][0]
    B, S = export.num_examples, 7
    got = r["lo"] + decode_codes(r["codes"], np.uint16, (2, B, S, S)) * (r["hi"] - r["lo"]) / 65535
    kl = export.key_lengths
    for b in range(B):
        n = kl[b]
        ws = [
            export.layers[f"encoder/layers/{i}/attention"][b : b + 1, :, :n, :n] for i in range(2)
        ]
        expected = analysis.attention_rollout(ws, return_all=True)[:, 0]
        np.testing.assert_allclose(got[:, b, : kl[b], : kl[b]], expected, atol=r["maxError"] + 1e-9)


def test_classifier_extras_and_marks(exports):
    data = page_data(viz.explorer_html(exports["cls"], view="text", layer="pool"))
    assert data["extras"]["scalars"] == {"label": [1, 0], "prediction": [1, 0]}
    assert data["extras"]["marks"]["marked"] == [[0, 0, 0, 1, 0, 1], [0, 1, 0, 0, 0, 0]]
    assert (
        data["initial"]["view"] == "text"
        and data["layers"][data["initial"]["layer"]]["path"] == "pool"
    )


def test_page_is_self_contained(exports):
    page = viz.explorer_html(exports["s2s"])
    assert page.startswith("<!doctype html>")
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # Nothing is loaded from anywhere: no src/href but data: URIs, no fetch, no imports.
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert all(r.startswith("data:") for r in refs), refs
    for needle in ("fetch(", "XMLHttpRequest", "import(", "<link rel=\"stylesheet", "@import",
                   "WebSocket", "sendBeacon"):  # fmt: skip
        assert needle not in page, needle
    assert set(re.findall(r"https?://[^\s\"']+", page)) == {"http://www.w3.org/2000/svg"}  # SVG
    # Every script of the package is inlined.
    assert page.count("<script>") == 9


def test_hostile_tokens_cannot_break_the_page(tmp_path, rng):
    tokens = [["</script><script>alert(1)</script>", "{{CSS}}", "<!--", "&amp;"]]
    w = softmax_weights(rng, 1, 1, 4, 4)
    path = save_attention(tmp_path / "x.npz", layers={"l": w}, kinds="self", query_tokens=tokens)
    page = viz.explorer_html(path)
    assert page.count("</script>") == 10  # the data element and the nine scripts, no more
    assert page_data(page)["tokens"]["query"] == tokens
    assert "alert(1)</script>" not in page


@pytest.mark.parametrize(
    "kwargs, error, needles",
    [
        (dict(layer="decoder/nope"), ValueError, ["no layer 'decoder/nope'", "encoder/layers/0"]),
        (dict(layer="decoder/layers/0/cross_attention", head=9), ValueError,
         ["head 9", "heads are [0, 1, 2, 3]"]),
        (dict(head="first"), TypeError, ["head number or 'mean'", "'first'"]),
        (dict(example=3), ValueError, ["example must be in [0, 3)", "got 3"]),
        (dict(view="graph"), ValueError, ["view must be one of", "'graph'"]),
        (dict(view="image"), ValueError, ["image fields"]),
        (dict(bits=12), ValueError, ["bits must be 8, 16 or None", "12"]),
        (dict(layers="mlp/*"), ValueError, ["select no layer", "mlp/*"]),
        (dict(cmap="nonsense"), ValueError, ["colormap 'nonsense'"]),
    ],
    ids=["unknown-layer", "unknown-head", "bad-head-type", "example-range", "unknown-view",
         "image-without-image", "bad-bits", "layers-select-none", "bad-cmap"],
)  # fmt: skip
def test_bad_arguments_raise_clear_errors(exports, kwargs, error, needles):
    with pytest.raises(error) as info:
        viz.explorer_html(exports["s2s"], **kwargs)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_not_an_export_and_nan_weights(tmp_path, rng):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(3))
    with pytest.raises(ExportFormatError, match="not a flaxattn attention export"):
        viz.explorer_html(bad)
    with pytest.raises(TypeError, match="AttentionExport or a path"):
        viz.explorer_html(42)
    w = softmax_weights(rng, 1, 1, 3, 3)
    w[0, 0, 0, 0] = np.nan
    path = save_attention(tmp_path / "nan.npz", layers={"l": w}, kinds="self",
                          query_tokens=[list("abc")])  # fmt: skip
    with pytest.raises(ValueError, match="layer 'l' holds NaN"):
        viz.explorer_html(path)


def test_layers_filter_keeps_only_the_chosen_layers(exports):
    data = page_data(viz.explorer_html(exports["s2s"], layers="decoder/*", head="mean"))
    assert [e["path"] for e in data["layers"]] == ["decoder/layers/0/self_attention",
                                                   "decoder/layers/0/cross_attention"]  # fmt: skip
    assert data["initial"]["head"] == -1
    with pytest.raises(ValueError, match="not among the layers selected"):
        viz.explorer_html(exports["s2s"], layers="decoder/*", layer="encoder/layers/0/attention")


def test_notebook_object_and_save(exports, tmp_path):
    explorer = viz.explore(exports["cls"], height=500)
    frame = explorer._repr_html_()
    assert frame.startswith('<iframe srcdoc="') and "height:500px" in frame
    srcdoc = re.search(r'srcdoc="([^"]*)"', frame).group(1)
    assert html.unescape(srcdoc) == explorer.html
    out = explorer.save(tmp_path / "sub" / "v.html")
    assert out.read_text() == explorer.html
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    path = viz.save_explorer(exports["cls"], tmp_path / "w.html")
    assert page_data(path.read_text())["examples"] == 2


def test_image_fields_are_embedded(tmp_path):
    export = load_attention(vit_export(tmp_path / "vit.npz"))
    data = page_data(viz.explorer_html(export, view="image"))
    image = data["image"]
    assert (image["shape"], image["grid"], image["patch"], image["prefix"]) == (
        [16, 16, 3], [4, 4], [4, 4], 1)  # fmt: skip
    assert image["box"] == [[4, 8, 8, 12], [8, 0, 12, 8]]
    codes = decode_codes(image["pixels"], np.uint8, (2, 16, 16, 3))
    pixels = image["pixelLo"] + codes * (image["pixelHi"] - image["pixelLo"]) / 255
    assert np.abs(pixels - export.image.pixels).max() <= 1 / 510 + 1e-9
    assert data["initial"]["view"] == "image"
    assert data["initial"]["query"] == 0  # the class token
    assert image["spatial"] == [] and image["channel"] == []


def test_export_of_image_maps_only(tmp_path):
    export = load_attention(cnn_export(tmp_path / "cnn.npz"))
    data = page_data(viz.explorer_html(export))
    assert data["layers"] == [] and data["rollouts"] == []
    assert data["initial"]["view"] == "image"
    image = data["image"]
    assert image["shape"] == [12, 12, 1] and image["grid"] is None and image["prefix"] == 0
    (sp,) = image["spatial"]
    assert sp["path"] == "cbam/spatial" and sp["shape"] == [4, 4]
    got = sp["lo"] + decode_codes(sp["codes"], np.uint16, (2, 4, 4)) * (sp["hi"] - sp["lo"]) / 65535
    assert np.abs(got - export.spatial["cbam/spatial"]).max() <= sp["maxError"] + 1e-12
    (ch,) = image["channel"]
    np.testing.assert_allclose(ch["values"], export.channel["cbam/channel"], atol=1e-6)
    with pytest.raises(ValueError, match="view 'matrix' needs attention layers"):
        viz.explorer_html(export, view="matrix")


# ----------------------------------------------------------------------------- the CLI


def _view(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("FLAXATTN_DEBUG", None)
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "view.py"), *args],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip


def _view_in_process(capsys, *args: str) -> tuple[int, str]:
    """experiments/view.py run in this process (as run_cli runs it): exit code and stderr."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import _cli
        import view
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    with pytest.raises(SystemExit) as info:
        _cli.run_cli(view.main, list(args))
    return info.value.code, capsys.readouterr().err


def test_view_cli_writes_the_page_and_reports_bad_input(exports, tmp_path, capsys, monkeypatch):
    out = tmp_path / "v.html"
    proc = _view(str(exports["s2s"]), "--out", str(out), "--view", "matrix", "--head", "2")
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "MB" in proc.stdout
    data = page_data(out.read_text())
    assert data["initial"]["view"] == "matrix" and data["initial"]["head"] == 2

    not_export = tmp_path / "notes.txt"
    not_export.write_text("hello")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [
        ([str(not_export), "--out", str(out)], ["not a flaxattn attention export"]),
        ([str(tmp_path / "missing.npz"), "--out", str(out)], ["no such file", "missing.npz"]),
        ([str(exports["s2s"]), "--out", str(out), "--layer", "dec/0"], ["no layer 'dec/0'"]),
        ([str(exports["s2s"]), "--out", str(out), "--head", "7"], ["head 7", "heads are"]),
        ([str(exports["s2s"]), "--out", str(out), "--head", "x"], ["--head", "'x'"]),
        ([str(exports["s2s"]), "--out", str(blocker / "v.html")], ["cannot write", "a-file"]),
        ([str(exports["s2s"]), "--out", str(tmp_path)], ["is a directory"]),
        ([str(exports["s2s"]), "--out", str(out), "--bits", "4"], ["--bits"]),
    ]
    monkeypatch.delenv("FLAXATTN_DEBUG", raising=False)
    for args, needles in cases:
        code, err = _view_in_process(capsys, *args)
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
