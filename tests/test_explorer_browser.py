"""The explorer page in a real browser: Debian's Chromium, headless, driven by selenium through
Debian's chromedriver, opening the generated files from file:// with the network switched off.

One browser serves the whole module. Without chromium and chromedriver (or selenium) the tests
skip, unless the environment variable CI is "true": there they fail, so CI cannot pass without
running them (.ci/run installs the browser).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from explorer_exports import (
    classifier_export,
    cnn_export,
    large_export,
    seq2seq_export,
    vit_export,
)

from flaxattn import analysis, viz
from flaxattn.export import load_attention

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1280,900",
)  # fmt: skip
CROSS = "decoder/layers/0/cross_attention"
SELF = "decoder/layers/0/self_attention"


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for name in ("chromium", "chromedriver"):
        if shutil.which(name) is None:
            return f"{name} is not on PATH (apt-get install -y chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    why = _missing()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the browser tests cannot run: {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.binary_location = shutil.which("chromium")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        browser.set_network_conditions(offline=True, latency=0, download_throughput=0,
                                       upload_throughput=0)  # fmt: skip
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    d = tmp_path_factory.mktemp("pages")
    out = {}
    for name, make, kwargs in (
        ("s2s", seq2seq_export, {}),
        ("topk", lambda p: seq2seq_export(p, top_k=2), {}),
        ("cls", classifier_export, {"view": "text", "layer": "pool"}),
        ("vit", vit_export, {"view": "image"}),
        ("cnn", cnn_export, {}),
    ):
        export = make(d / f"{name}.npz")
        out[name] = (
            viz.save_explorer(export, d / f"{name}.html", **kwargs),
            load_attention(export),
        )
    return out


def open_page(driver, path: Path, fragment: str = "", timeout: float = 10.0) -> float:
    """Load ``path`` afresh (never a same-document fragment change); the seconds until ready."""
    driver.get("about:blank")
    driver.get_log("browser")  # drop what earlier pages logged
    start = time.perf_counter()
    driver.get(path.resolve().as_uri() + (f"#{fragment}" if fragment else ""))
    while time.perf_counter() - start < timeout:
        ready = driver.execute_script("return document.body && document.body.dataset.ready")
        if ready == "true":
            return time.perf_counter() - start
        assert ready != "error", driver.find_element("id", "status").text
        time.sleep(0.02)
    raise AssertionError(f"{path} not ready after {timeout} s")


def state(driver) -> dict:
    return driver.execute_script("return Object.assign({}, FlaxAttnExplorer.app.state)")


def fragment(driver) -> dict:
    from urllib.parse import parse_qsl, urlsplit

    return dict(parse_qsl(urlsplit(driver.current_url).fragment))


def errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def hover_cell(driver, i: int, j: int):
    """Move the mouse to the centre of matrix cell (i, j); return the tooltip element."""
    from selenium.webdriver import ActionChains

    canvas = driver.find_element("css selector", "#view-matrix canvas")
    geo = {k: float(canvas.get_attribute(f"data-{k}")) for k in ("x0", "y0", "cell")}
    rect = canvas.rect
    x = geo["x0"] + (j + 0.5) * geo["cell"] - rect["width"] / 2
    y = geo["y0"] + (i + 0.5) * geo["cell"] - rect["height"] / 2
    ActionChains(driver).move_to_element_with_offset(canvas, int(round(x)), int(round(y))).perform()
    tip = driver.find_element("id", "tooltip")
    assert tip.is_displayed()
    return tip


def test_opens_offline_without_errors_or_requests(driver, pages):
    path, export = pages["s2s"]
    open_page(driver, path)
    assert errors(driver) == []
    # Only the page itself was loaded: no script, style, image or font from anywhere.
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert driver.get_network_conditions()["offline"] is True
    assert driver.title == "reverse: attention explorer"
    subtitle = driver.find_element("id", "subtitle").text
    assert "16-bit codes, each within 7.6e-6 of the exported value" in subtitle
    # The page's Content-Security-Policy refuses any request its scripts might try.
    outcome = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('https://example.org/x.js').then(() => done('loaded'), (e) => done(e.name));"
    )
    assert outcome == "TypeError"
    assert any("Content Security Policy" in e["message"] for e in driver.get_log("browser"))


def test_model_view_shows_every_layer_and_head_and_opens_one(driver, pages):
    path, export = pages["s2s"]
    open_page(driver, path)
    thumbs = driver.find_elements("css selector", "#view-model button.thumb")
    assert len(thumbs) == 4 * 4  # L x N
    assert {(t.get_attribute("data-layer"), t.get_attribute("data-head")) for t in thumbs} == {
        (str(layer), str(head)) for layer in range(4) for head in range(4)
    }
    target = driver.find_element(
        "css selector", '#view-model button.thumb[data-layer="2"][data-head="3"]'
    )
    target.click()
    s = state(driver)
    assert (s["view"], s["layer"], s["head"]) == ("matrix", 2, 3)
    assert driver.find_element("id", "view-matrix").is_displayed()
    assert not driver.find_element("id", "view-model").is_displayed()
    heading = driver.find_element("css selector", "#view-matrix h2").text
    assert SELF in heading and "head 3" in heading
    assert fragment(driver) == {"view": "matrix", "example": "0", "layer": SELF, "head": "3"}
    assert errors(driver) == []


@pytest.mark.parametrize("side", ["query", "key"])
def test_head_view_hover_shows_exactly_the_row_or_column(driver, pages, side):
    from selenium.webdriver import ActionChains

    path, export = pages["s2s"]
    example, index = 1, 2
    open_page(driver, path, f"view=head&example={example}&layer={CROSS}&heads=0,2")
    canvas_lines = driver.find_elements("css selector", "#view-head svg line")
    assert canvas_lines == []  # nothing focused yet
    tok = driver.find_element(
        "css selector", f'#view-head .tok[data-side="{side}"][data-index="{index}"]'
    )
    ActionChains(driver).move_to_element(tok).perform()
    lines = driver.find_elements("css selector", "#view-head svg line.attn-line")
    got = {
        (int(ln.get_attribute("data-head")), int(ln.get_attribute("data-query")),
         int(ln.get_attribute("data-key"))): float(ln.get_attribute("stroke-opacity"))
        for ln in lines
    }  # fmt: skip
    w = export.layers[CROSS][example]  # [N, T, S]
    ql, kl = (int(x[example]) for x in export.lengths(CROSS))
    pairs = [(index, j) for j in range(kl)] if side == "query" else [(i, index) for i in range(ql)]
    expected = {(h, i, j): float(w[h, i, j]) for h in (0, 2) for i, j in pairs}
    assert set(got) == set(expected) and len(lines) == len(expected)
    bound = 0.5 / 65535 + 1e-9
    for key, opacity in got.items():
        assert abs(opacity - expected[key]) <= bound, (key, opacity, expected[key])
    colours = {ln.get_attribute("data-head"): ln.get_attribute("stroke") for ln in lines}
    assert len(set(colours.values())) == 2  # the two heads in distinct colours
    assert "hover" in tok.get_attribute("class")
    # Moving away shows every line again (the SVG layer empties).
    ActionChains(driver).move_to_element(
        driver.find_element("css selector", "#view-head h2")
    ).perform()
    assert driver.find_elements("css selector", "#view-head svg line") == []
    assert errors(driver) == []


def test_head_toggles_change_the_heads_shown(driver, pages):
    from selenium.webdriver import ActionChains

    path, _ = pages["s2s"]
    open_page(driver, path, f"view=head&layer={CROSS}")
    assert state(driver)["heads"] is None  # all heads
    driver.find_element("id", "head-toggle-1").click()
    assert state(driver)["heads"] == [0, 2, 3]
    assert fragment(driver)["heads"] == "0,2,3"
    tok = driver.find_element("css selector", '#view-head .tok[data-side="query"][data-index="0"]')
    ActionChains(driver).move_to_element(tok).perform()
    heads = {ln.get_attribute("data-head")
             for ln in driver.find_elements("css selector", "#view-head svg line")}  # fmt: skip
    assert heads == {"0", "2", "3"}


def test_matrix_tooltip_equals_the_exported_weight(driver, pages):
    path, export = pages["s2s"]
    example, head = 2, 1
    open_page(driver, path, f"view=matrix&example={example}&layer={SELF}&head={head}")
    w = export.layers[SELF][example, head]
    q_len = int(export.query_lengths[example])
    for i, j in [(3, 1), (q_len - 1, 0), (5, 5)]:
        tip = hover_cell(driver, i, j)
        assert tip.get_attribute("data-state") == "value"
        assert (int(tip.get_attribute("data-query")), int(tip.get_attribute("data-key"))) == (i, j)
        exact = float(tip.get_attribute("data-value"))
        assert abs(exact - float(w[i, j])) <= 0.5 / 65535 + 1e-12
        shown = float(re.search(r"weight (\d\.\d{4})", tip.text).group(1))
        assert abs(shown - float(w[i, j])) <= 0.5e-4 + 0.5 / 65535
    # Masked cells say so instead of showing a number: above the diagonal, and padding.
    tip = hover_cell(driver, 1, 4)
    assert tip.get_attribute("data-state") == "causal" and "masked (causal)" in tip.text
    # Padding is left out unless asked for; then its cells are masked too.
    open_page(driver, path, f"view=matrix&example=1&layer={SELF}&head={head}")
    q_len = int(export.query_lengths[1])
    canvas = driver.find_element("css selector", "#view-matrix canvas")
    assert canvas.get_attribute("data-rows") == str(q_len)
    driver.find_element("id", "chk-padding").click()
    assert state(driver)["padding"] is True and fragment(driver)["padding"] == "1"
    canvas = driver.find_element("css selector", "#view-matrix canvas")
    assert canvas.get_attribute("data-rows") == str(export.query_tokens.shape[1])
    tip = hover_cell(driver, q_len, 0)
    assert tip.get_attribute("data-state") == "padding" and "masked (padding)" in tip.text
    assert errors(driver) == []


def test_masked_cells_are_drawn_distinct_from_zero(driver, pages):
    path, export = pages["s2s"]
    open_page(driver, path, f"view=matrix&example=1&layer={SELF}&head=0")
    canvas = driver.find_element("css selector", "#view-matrix canvas")
    geo = {k: float(canvas.get_attribute(f"data-{k}")) for k in ("x0", "y0", "cell")}

    def colour(i, j):  # the centre pixel of a cell, on the canvas's backing store
        return driver.execute_script(
            "const c = arguments[0], r = c.width / c.clientWidth;"
            "return Array.from(c.getContext('2d').getImageData("
            "Math.floor(arguments[1] * r), Math.floor(arguments[2] * r), 1, 1).data);",
            canvas,
            geo["x0"] + (j + 0.3) * geo["cell"],
            geo["y0"] + (i + 0.3) * geo["cell"],
        )

    zero_colour = driver.execute_script("return FlaxAttnExplorer.app.scales.heat.rgb(0)")
    masked = colour(0, 3)  # causal
    assert masked[:3] != zero_colour
    assert max(abs(a - b) for a, b in zip(masked[:3], zero_colour, strict=True)) > 60


def test_selectors_keys_and_fragment_restore_a_view(driver, pages):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    path, export = pages["s2s"]
    open_page(driver, path, "view=matrix")
    Select(driver.find_element("id", "sel-example")).select_by_value("2")
    Select(driver.find_element("id", "sel-layer")).select_by_value("1")
    Select(driver.find_element("id", "sel-head")).select_by_value("3")
    s = state(driver)
    assert (s["view"], s["example"], s["layer"], s["head"]) == ("matrix", 2, 1, 3)
    # Arrow keys: right = next head (wrapping), down = next layer; PageDown = next example.
    body = driver.find_element("tag name", "body")
    driver.execute_script("document.activeElement.blur()")
    body.send_keys(Keys.ARROW_RIGHT)
    body.send_keys(Keys.ARROW_DOWN)
    body.send_keys(Keys.PAGE_DOWN)
    s = state(driver)
    assert (s["example"], s["layer"], s["head"]) == (0, 2, 0)
    body.send_keys("4")  # the fourth view: statistics
    assert state(driver)["view"] == "stats"
    saved = driver.current_url.split("#", 1)[1]
    assert fragment(driver) == {"view": "stats", "example": "0", "layer": SELF, "head": "0"}

    # A fresh load with that fragment restores the same view.
    open_page(driver, path, saved)
    s = state(driver)
    assert (s["view"], s["example"], s["layer"], s["head"]) == ("stats", 0, 2, 0)
    assert Select(driver.find_element("id", "sel-layer")).first_selected_option.text.startswith(
        SELF
    )
    # And a fragment typed in (a hash change) moves the page there.
    driver.execute_script(f"location.hash = 'view=matrix&example=1&layer={CROSS}&head=mean'")
    time.sleep(0.1)
    s = state(driver)
    assert (s["view"], s["example"], s["layer"], s["head"]) == ("matrix", 1, 3, -1)
    assert "mean of heads" in driver.find_element("css selector", "#view-matrix h2").text
    assert errors(driver) == []


def test_statistics_match_analysis_and_click_opens_the_head(driver, pages):
    path, export = pages["s2s"]
    open_page(driver, path, "view=stats")
    cells = driver.find_elements("css selector", 'table.stats[data-stat="entropy"] td.stat')
    assert len(cells) == 16
    w = export.layers[CROSS]
    expected = analysis.head_entropy(w, query_lengths=export.query_lengths,
                                     key_lengths=export.key_lengths, unit="bits")  # fmt: skip
    selector = 'table.stats[data-stat="entropy"] td[data-layer="3"][data-head="2"]'
    cell = driver.find_element("css selector", selector)
    assert float(cell.get_attribute("data-value")) == pytest.approx(expected[2], abs=1e-6)
    assert cell.text == f"{expected[2]:.2f}"
    cell.click()
    s = state(driver)
    assert (s["view"], s["layer"], s["head"]) == ("matrix", 3, 2)


def test_rollout_toggle_shows_the_rollout(driver, pages):
    path, export = pages["s2s"]
    layer = "encoder/layers/1/attention"
    open_page(driver, path, f"view=matrix&example=0&layer={layer}")
    box = driver.find_element("id", "chk-rollout")
    assert box.is_enabled() and not box.is_selected()
    box.click()
    assert state(driver)["rollout"] is True and fragment(driver)["rollout"] == "1"
    assert "rollout" in driver.find_element("css selector", "#view-matrix h2").text
    n = int(export.key_lengths[0])
    ws = [export.layers[f"encoder/layers/{i}/attention"][:1, :, :n, :n] for i in range(2)]
    expected = analysis.attention_rollout(ws)[0]
    tip = hover_cell(driver, 2, 4)
    assert "rolled-out attention" in tip.text
    assert float(tip.get_attribute("data-value")) == pytest.approx(expected[2, 4], abs=1e-4)
    # The cross layer is in no self-attention stack: the toggle is off and disabled there.
    driver.execute_script(f"location.hash = 'view=matrix&layer={CROSS}'")
    time.sleep(0.1)
    assert not driver.find_element("id", "chk-rollout").is_enabled()


def test_text_view_colours_tokens_and_frames_marked_ones(driver, pages):
    path, export = pages["cls"]
    open_page(driver, path)
    assert state(driver)["view"] == "text"
    spans = driver.find_elements("css selector", "#view-text .tk")
    assert [s.text for s in spans] == ["the", "film", "was", "great", "and", "moving"]
    marked = [s for s in spans if "marked" in s.get_attribute("class")]
    assert [s.text for s in marked] == ["great", "moving"]
    w = export.layers["pool"][0, 0, 0]
    for s, expected in zip(spans, w[:6], strict=True):
        assert float(s.get_attribute("data-weight")) == pytest.approx(expected, abs=1e-4)
    heading = driver.find_element("css selector", "#view-text h2").text
    assert "label 1" in heading and "prediction 1" in heading
    assert errors(driver) == []


def test_topk_export_is_shown_as_such(driver, pages):
    path, export = pages["topk"]
    open_page(driver, path, f"view=matrix&example=0&layer={CROSS}&head=0")
    assert "top-2" in driver.find_element("css selector", "#view-matrix h2").text
    assert "top" in driver.find_element("id", "subtitle").text
    legend = driver.find_element("id", "legend").text
    assert "not stored (top-k export)" in legend
    values, indices = export.topk_values[CROSS][0, 0], export.topk_indices[CROSS][0, 0]
    kept = set(int(j) for j in indices[1])
    stored = next(iter(kept))
    dropped = next(j for j in range(int(export.key_lengths[0])) if j not in kept)
    assert hover_cell(driver, 1, dropped).get_attribute("data-state") == "not-stored"
    tip = hover_cell(driver, 1, stored)
    r = list(indices[1]).index(stored)
    assert float(tip.get_attribute("data-value")) == pytest.approx(values[1, r], abs=1e-4)


def test_notebook_frame_runs_the_page(driver, pages, tmp_path):
    """explore(...)._repr_html_() (an iframe with the page as srcdoc) works as a notebook
    output: the page starts inside the frame even though it cannot rewrite its URL there."""
    path, export = pages["cls"]
    host = tmp_path / "notebook.html"
    host.write_text(
        "<!doctype html><title>nb</title>" + viz.explore(export, layer="pool")._repr_html_()
    )
    driver.get("about:blank")
    driver.get(host.resolve().as_uri())
    driver.switch_to.frame(driver.find_element("tag name", "iframe"))
    try:
        for _ in range(200):
            if driver.execute_script("return document.body && document.body.dataset.ready"):
                break
            time.sleep(0.02)
        assert driver.execute_script("return document.body.dataset.ready") == "true"
        assert len(driver.find_elements("css selector", "#view-model button.thumb")) == 3
        driver.find_element("css selector", "#view-model button.thumb").click()
        assert state(driver)["view"] == "matrix"
    finally:
        driver.switch_to.default_content()
    assert errors(driver) == []


def test_screenshots_of_every_view(driver, pages, tmp_path):
    from selenium.webdriver import ActionChains

    path, _ = pages["s2s"]
    for view, extra in [("model", ""), ("head", f"&layer={CROSS}"), ("matrix", f"&layer={SELF}"),
                        ("stats", ""), ("text", f"&layer={CROSS}&query=2")]:  # fmt: skip
        open_page(driver, path, f"view={view}{extra}")
        if view == "head":
            tok = driver.find_element(
                "css selector", '#view-head .tok[data-side="query"][data-index="1"]'
            )
            ActionChains(driver).move_to_element(tok).perform()
        shot = tmp_path / f"explorer_{view}.png"
        assert driver.save_screenshot(str(shot))
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert errors(driver) == []


TARGET = dict(L=6, N=8, T=256, B=8)  # the issue's example: 25.2M weights, under 10 MB and 2 s
TARGET_CELLS = 6 * 8 * 256 * 256 * 8


def _size_and_open_time(driver, tmp_path, shape):
    export = large_export(tmp_path / "large.npz", **shape)
    page = viz.save_explorer(export, tmp_path / "large.html", bits=8)
    seconds = open_page(driver, page, timeout=30)
    in_page = driver.execute_script("return FlaxAttnExplorer.readyMs") / 1000
    thumbs = len(driver.find_elements("css selector", "#view-model button.thumb"))
    assert thumbs == shape["L"] * shape["N"]
    assert errors(driver) == []
    size = page.stat().st_size
    print(
        f"{shape}: {size / 1e6:.2f} MB, ready {seconds:.2f} s after the request "
        f"({in_page:.2f} s by the page's clock)"
    )
    return size, seconds


def test_page_size_and_open_time_small(driver, tmp_path):
    """A twelfth of the target at full length (2 layers x 2 heads x 256 tokens x 2 examples),
    8-bit as the target is: as many bytes per weight as the target may use, plus the scripts."""
    shape = dict(L=2, N=2, T=256, B=2)
    size, seconds = _size_and_open_time(driver, tmp_path, shape)
    cells = np.prod(list(shape.values())) * shape["T"]
    assert size < 10e6 * cells / TARGET_CELLS + 100_000
    assert seconds < 2.0


@pytest.mark.slow
def test_page_size_and_open_time_of_the_issue_target(driver, tmp_path):
    """6 layers x 8 heads x 256 tokens x 8 examples of diffuse weights (the worst case for
    compression): the page must stay under 10 MB and be ready in under 2 s."""
    size, seconds = _size_and_open_time(driver, tmp_path, TARGET)
    assert size < 10e6
    assert seconds < 2.0


def test_weights_decoded_in_the_page_equal_the_export(driver, pages):
    """Every weight the page decodes (all layers, heads, examples) is within the stated error."""
    path, export = pages["s2s"]
    open_page(driver, path)
    names = driver.execute_script("return FlaxAttnExplorer.model.layers.map((l) => l.path)")
    assert sorted(names) == sorted(export.paths)
    for layer_index, name in enumerate(names):
        got = np.array(driver.execute_script(
            "const l = FlaxAttnExplorer.model.layers[arguments[0]], out = [];"
            "for (let b = 0; b < FlaxAttnExplorer.model.B; b++) {"
            "  const heads = []; for (let h = 0; h < l.N; h++) {"
            "    const m = l.matrix(b, h), rows = [];"
            "    for (let i = 0; i < m.T; i++)"
            "      rows.push(Array.from(m.values.slice(i * m.S, (i + 1) * m.S)));"
            "    heads.push(rows); } out.push(heads); } return out;", layer_index))  # fmt: skip
        assert got.shape == export.layers[name].shape
        assert np.abs(got - export.layers[name]).max() <= 0.5 / 65535 + 1e-12


def test_image_view_shows_attention_over_the_patches(driver, pages):
    from selenium.webdriver import ActionChains

    path, export = pages["vit"]
    layer = "encoder/layers/1/attention"
    open_page(driver, path)
    assert state(driver)["view"] == "image" and state(driver)["query"] == 0
    canvas = driver.find_element("css selector", "#view-image canvas[data-weights]")
    bound = 0.5 / 65535 + 1e-9

    def shown(query):
        assert canvas.get_attribute("data-query") == str(query)
        weights = np.array(json.loads(canvas.get_attribute("data-weights")))
        expected = export.layers[layer][0, 0, query, 1:17]  # the 16 patch tokens
        assert np.abs(weights - expected).max() <= bound

    shown(0)  # the class token's row
    # Hovering patch (2, 1) shows that patch's row; clicking keeps it.
    scale = canvas.rect["width"] / 16
    dx = (1 * 4 + 2) * scale - canvas.rect["width"] / 2
    dy = (2 * 4 + 2) * scale - canvas.rect["height"] / 2
    ActionChains(driver).move_to_element_with_offset(canvas, int(dx), int(dy)).perform()
    shown(1 + 2 * 4 + 1)
    assert "patch (2, 1) = token 10" in driver.find_element("id", "tooltip").text
    ActionChains(driver).click().perform()
    assert state(driver)["query"] == 10 and fragment(driver)["query"] == "10"
    canvas = driver.find_element("css selector", "#view-image canvas[data-weights]")
    shown(10)
    # The ground-truth box is drawn in orange on the input: its left edge at pixel column 8.
    plain = driver.find_element("css selector", "#view-image figure canvas")
    rgb = driver.execute_script(
        "const c = arguments[0];"
        "const x = Math.round(arguments[1] * c.width), y = Math.round(arguments[2] * c.height);"
        "return Array.from(c.getContext('2d').getImageData(x, y, 1, 1).data).slice(0, 3);",
        plain, 8 / 16, 6 / 16)  # fmt: skip
    assert max(abs(a - b) for a, b in zip(rgb, (0xE6, 0x9F, 0x00), strict=True)) < 40, rgb
    assert errors(driver) == []


def test_image_maps_only_export(driver, pages):
    path, export = pages["cnn"]
    open_page(driver, path)
    tabs = driver.find_elements("css selector", ".tabs button")
    visible = [t.get_attribute("data-view") for t in tabs if t.is_displayed()]
    assert visible == ["image"]
    spatial = driver.find_element("css selector", "#view-image canvas.spatial")
    values = np.array(json.loads(spatial.get_attribute("data-values")))
    assert (
        np.abs(values - export.spatial["cbam/spatial"][0].reshape(-1)).max() <= 0.5 / 65535 + 1e-9
    )
    bars = driver.find_elements("css selector", "#view-image svg.channel rect")
    got = [float(b.get_attribute("data-value")) for b in bars]
    np.testing.assert_allclose(got, export.channel["cbam/channel"][0], atol=1e-6)
    assert errors(driver) == []
