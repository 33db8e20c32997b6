/* The explorer's state, controls, keyboard, URL fragment and start-up.
 *
 * State: view, example, layer (index), head (position in the layer's heads, -1 = mean of
 * heads), heads (positions overlaid in the head view; null = all), rollout (bool), query (the
 * text view's query, -1 = mean over queries), scope (statistics over "all" examples or
 * "example"), padding (the matrix view shows padded positions). The URL fragment holds it with layer paths and head numbers, e.g.
 * #view=matrix&example=2&layer=decoder%2Flayers%2F0%2Fcross_attention&head=3
 * Tests read window.FlaxAttnExplorer (state, model, ready, readyMs).
 */
(function (FA) {
  "use strict";

  const VIEWS = ["model", "head", "matrix", "stats", "text", "image"];
  const $ = (id) => document.getElementById(id);
  const el = (...args) => FA.colors.el(...args);

  const app = {
    model: null,
    data: null,
    state: null,
    scales: null,
    views: FA.views,
  };

  // ---------------------------------------------------------------- state and fragment

  function clampState(s) {
    const m = app.model;
    if (!VIEWS.includes(s.view) || (s.view === "image" && !FA.views.image.available(app))) {
      s.view = m.layers.length ? "model" : "image";
    }
    if (!m.layers.length) s.view = "image"; // an export of image maps only
    const wrap = (x, n) => ((x % n) + n) % n;
    s.example = wrap(s.example | 0, m.B);
    s.layer = Math.max(0, Math.min(m.layers.length - 1, s.layer | 0));
    const N = m.layers.length ? m.layers[s.layer].N : 0;
    s.head = s.head < 0 ? -1 : Math.min(N - 1, s.head | 0);
    if (s.heads !== null) s.heads = s.heads.filter((h) => h >= 0 && h < N);
    s.rollout = Boolean(s.rollout) && m.rolloutOf(s.layer) !== null;
    const T = m.layers.length ? m.layers[s.layer].T : 0;
    s.query = s.query < 0 || s.query >= T ? -1 : s.query | 0;
    if (s.scope !== "example") s.scope = "all";
    s.padding = Boolean(s.padding);
    return s;
  }

  function fragmentOf(s) {
    const m = app.model;
    const layer = m.layers[s.layer];
    const p = new URLSearchParams();
    p.set("view", s.view);
    p.set("example", String(s.example));
    if (layer) {
      p.set("layer", layer.path);
      p.set("head", s.head < 0 ? "mean" : String(layer.heads[s.head]));
      if (s.heads !== null) p.set("heads", s.heads.map((h) => layer.heads[h]).join(","));
    }
    if (s.rollout) p.set("rollout", "1");
    if (s.query >= 0) p.set("query", String(s.query));
    if (s.scope !== "all") p.set("scope", s.scope);
    if (s.padding) p.set("padding", "1");
    return p.toString();
  }

  /** The state a fragment describes, on top of `base`; unknown names are ignored. */
  function stateFromFragment(fragment, base) {
    const s = Object.assign({}, base);
    const p = new URLSearchParams(fragment.replace(/^#/, ""));
    const m = app.model;
    if (p.has("view")) s.view = p.get("view");
    if (p.has("example")) s.example = parseInt(p.get("example"), 10) || 0;
    if (p.has("layer")) {
      const i = m.layers.findIndex((l) => l.path === p.get("layer"));
      if (i >= 0) s.layer = i;
    }
    const layer = m.layers[s.layer];
    if (p.has("head") && layer) {
      const h = p.get("head");
      s.head = h === "mean" ? -1 : Math.max(0, layer.heads.indexOf(parseInt(h, 10)));
    }
    if (p.has("heads") && layer) {
      s.heads = p.get("heads").split(",").filter((x) => x !== "")
        .map((x) => layer.heads.indexOf(parseInt(x, 10))).filter((h) => h >= 0);
    }
    s.rollout = p.get("rollout") === "1";
    if (p.has("query")) s.query = parseInt(p.get("query"), 10);
    if (p.has("scope")) s.scope = p.get("scope");
    s.padding = p.get("padding") === "1";
    return s;
  }

  function writeFragment() {
    const fragment = "#" + fragmentOf(app.state);
    if (location.hash === fragment) return;
    try {
      history.replaceState(null, "", fragment);
    } catch (err) {
      // about:srcdoc (a notebook's iframe) has no URL of its own to rewrite: keep the state.
    }
  }

  app.setState = function (patch) {
    const s = Object.assign({}, app.state, patch);
    if ("layer" in patch && patch.layer !== app.state.layer && !("heads" in patch)) {
      s.heads = app.state.heads; // clampState drops heads the new layer lacks
    }
    app.state = clampState(s);
    writeFragment();
    render();
  };

  /** Open head position h of layer l in a view (the matrix by default). */
  app.open = function (l, h, view) {
    app.setState({ layer: l, head: h, view: view || "matrix", rollout: false });
  };

  // ---------------------------------------------------------------- what the views show

  app.layer = () => app.model.layers[app.state.layer];

  /**
   * The matrix the matrix and text views show: one head, the mean of heads, or the rollout
   * up to the current layer. Returns {matrix, title, layer, rollout, bits, maxError}.
   */
  app.current = function () {
    const s = app.state;
    const layer = app.layer();
    if (s.rollout) {
      const r = app.model.rolloutOf(s.layer);
      const upTo = r.layers.indexOf(s.layer) + 1;
      return {
        matrix: r.matrix(s.example, s.layer), layer, rollout: r, bits: r.bits,
        maxError: r.maxError,
        title: `rollout of the ${r.kind} stack through ${upTo} of ${r.layers.length} ` +
          `layer${upTo > 1 ? "s" : ""} (mean of heads), up to ${layer.path}`,
      };
    }
    return {
      matrix: layer.matrix(s.example, s.head), layer, rollout: null, bits: layer.bits,
      maxError: layer.maxError,
      title: `${layer.label()}, ${layer.headLabel(s.head)}, example ${s.example}`,
    };
  };

  app.legend = (opts) => FA.colors.renderLegend($("legend"), opts);

  // ---------------------------------------------------------------- tooltip

  app.tooltip = {
    show(event, lines, attrs) {
      const tip = $("tooltip");
      tip.textContent = lines.join("\n");
      for (const name of Object.keys(tip.dataset)) delete tip.dataset[name];
      Object.assign(tip.dataset, attrs || {});
      tip.hidden = false;
      const pad = 14;
      const w = tip.offsetWidth, h = tip.offsetHeight;
      let x = event.clientX + pad, y = event.clientY + pad;
      if (x + w > window.innerWidth - 4) x = event.clientX - w - pad;
      if (y + h > window.innerHeight - 4) y = event.clientY - h - pad;
      tip.style.left = `${Math.max(4, x)}px`;
      tip.style.top = `${Math.max(4, y)}px`;
    },
    hide() { $("tooltip").hidden = true; },
  };

  /** A token as the page prints it: visible whitespace, shortened past `width`. */
  app.tokenText = function (token, width) {
    const special = { " ": "␣", "\n": "\\n", "\t": "\\t", "": "·" };
    let text = token in special ? special[token] : String(token).replace(/\n/g, "\\n");
    width = width || 14;
    return text.length <= width ? text : text.slice(0, width - 1) + "…";
  };

  // ---------------------------------------------------------------- controls

  function exampleLabel(b) {
    const m = app.model;
    const tokens = (m.keyTokens || m.queryTokens)[b];
    const n = (m.keyLengths || m.queryLengths)[b];
    const shown = tokens.slice(0, n);
    const joiner = shown.every((t) => t.length <= 1) ? "" : " ";
    let text = shown.join(joiner);
    if (text.length > 36) text = text.slice(0, 35) + "…";
    const extras = Object.entries(m.data.extras.scalars).map(([k, v]) => `${k} ${v[b]}`);
    return (text ? `${b}: ${text}` : `example ${b}`) + (extras.length ? ` (${extras.join(", ")})` : "");
  }

  function fillSelect(select, options, value) {
    const current = Array.from(select.options).map((o) => o.value + "\u0000" + o.text).join("\n");
    const wanted = options.map(([v, t]) => v + "\u0000" + t).join("\n");
    if (current !== wanted) {
      select.replaceChildren(...options.map(([v, t]) => el("option", { value: v, text: t })));
    }
    select.value = String(value);
  }

  function renderControls() {
    const s = app.state, m = app.model;
    for (const button of document.querySelectorAll(".tabs button")) {
      const selected = button.dataset.view === s.view;
      button.setAttribute("aria-selected", String(selected));
    }
    fillSelect($("sel-example"), Array.from({ length: m.B }, (_, b) => [b, exampleLabel(b)]), s.example);
    fillSelect($("sel-layer"), m.layers.map((l, i) => [i, l.label() + (l.topk ? ` top-${l.topk}` : "")]), s.layer);
    const layer = app.layer();
    const heads = layer ? layer.heads.map((h, i) => [i, `head ${h}`]) : [];
    fillSelect($("sel-head"), [...heads, [-1, "mean of heads"]], s.head);
    const rollout = m.layers.length ? m.rolloutOf(s.layer) : null;
    $("chk-rollout").disabled = rollout === null;
    $("chk-rollout").checked = s.rollout;
    $("lbl-rollout").textContent = rollout === null ? "Rollout (n/a)" : `Rollout (${rollout.kind} stack)`;
    $("lbl-rollout").title = rollout === null ? "this layer is not in a self-attention stack"
      : "attention rollout (Abnar & Zuidema 2020) through the stack up to this layer";
    $("lbl-rollout").classList.toggle("disabled", rollout === null);
    const headless = ["model", "stats"].includes(s.view) || s.rollout;
    $("sel-head").disabled = headless && s.view !== "model";
  }

  function render() {
    renderControls();
    app.tooltip.hide();
    for (const name of VIEWS) {
      const section = $(`view-${name}`);
      const active = name === app.state.view;
      section.hidden = !active;
      if (!active) section.replaceChildren();
    }
    FA.views[app.state.view].render($(`view-${app.state.view}`), app);
  }

  function onKey(event) {
    const target = event.target;
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    if (target && ["INPUT", "SELECT", "TEXTAREA"].includes(target.tagName)) return;
    const s = app.state;
    const layer = app.layer();
    const N = layer ? layer.N : 1;
    const step = (x, d, n) => (((x + d) % n) + n) % n;
    let patch = null;
    switch (event.key) {
      case "ArrowLeft": patch = { head: step(Math.max(s.head, 0), -1, N) }; break;
      case "ArrowRight": patch = { head: s.head < 0 ? 0 : step(s.head, 1, N) }; break;
      case "ArrowUp": patch = { layer: step(s.layer, -1, app.model.layers.length) }; break;
      case "ArrowDown": patch = { layer: step(s.layer, 1, app.model.layers.length) }; break;
      case "PageUp": patch = { example: s.example - 1 }; break;
      case "PageDown": patch = { example: s.example + 1 }; break;
      case "r": case "R":
        patch = { rollout: !s.rollout }; break;
      default:
        if (/^[1-6]$/.test(event.key)) {
          const view = VIEWS[parseInt(event.key, 10) - 1];
          if (!$(`tab-${view}`).hidden) patch = { view };
        }
    }
    if (patch === null) return;
    if ("head" in patch && s.view === "head") patch.heads = [patch.head];
    event.preventDefault();
    app.setState(patch);
  }

  function bindControls() {
    for (const button of document.querySelectorAll(".tabs button")) {
      button.addEventListener("click", () => app.setState({ view: button.dataset.view }));
    }
    $("sel-example").addEventListener("change", (e) => app.setState({ example: +e.target.value }));
    $("sel-layer").addEventListener("change", (e) => app.setState({ layer: +e.target.value }));
    $("sel-head").addEventListener("change", (e) => {
      const head = +e.target.value;
      app.setState(app.state.view === "head" ? { head, heads: head < 0 ? null : [head] } : { head });
    });
    $("chk-rollout").addEventListener("change", (e) => app.setState({ rollout: e.target.checked }));
    document.addEventListener("keydown", onKey);
    window.addEventListener("hashchange", () => {
      app.state = clampState(stateFromFragment(location.hash, app.state));
      render();
    });
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(render, 150);
    });
  }

  function subtitle() {
    const d = app.data, m = app.model;
    const meta = d.meta || {};
    const parts = [];
    if (meta.task) parts.push(`task ${meta.task}`);
    if (meta.step !== null && meta.step !== undefined) parts.push(`step ${meta.step}`);
    parts.push(`${m.B} example${m.B === 1 ? "" : "s"}`, `${m.layers.length} layers`);
    const topk = m.layers.filter((l) => l.topk !== null);
    if (topk.length) {
      parts.push(`bounded export: ${topk.length} of ${m.layers.length} layers keep only ` +
        `the top ${topk[0].topk} weights per row`);
    }
    if (meta.created) parts.push(`exported ${meta.created.slice(0, 19).replace("T", " ")}`);
    if (m.layers.length) {
      const bound = m.maxError < 1e-3 ? m.maxError.toExponential(1) : m.maxError.toPrecision(2);
      parts.push(`weights stored as ${m.bits}-bit codes, each within ${bound} of the exported value`);
    }
    return parts.join(" · ");
  }

  async function start() {
    const status = $("status");
    const exposed = window.FlaxAttnExplorer = { ready: false, app };
    try {
      app.data = JSON.parse($("flaxattn-data").textContent);
      app.model = await FA.data.load(app.data);
      app.scales = {
        heat: new FA.colors.Scale(app.data.colormap),
        text: new FA.colors.Scale(app.data.textColormap),
      };
      $("subtitle").textContent = subtitle();
      $("tab-image").hidden = !FA.views.image.available(app);
      if (!app.model.layers.length) { // image maps only: no layer, head or rollout to choose
        for (const view of VIEWS.slice(0, 5)) $(`tab-${view}`).hidden = true;
        for (const id of ["sel-layer", "sel-head", "chk-rollout", "keys-help"]) {
          const control = $(id);
          control.hidden = true;
          if (control.labels) for (const label of control.labels) label.hidden = true;
        }
        const rollout = $("chk-rollout").parentElement;
        rollout.hidden = true;
      }
      const init = app.data.initial;
      const base = { view: init.view, example: init.example, layer: init.layer, head: init.head,
                     heads: null, rollout: false, query: init.query, scope: "all", padding: false };
      app.state = clampState(stateFromFragment(location.hash, base));
      bindControls();
      status.hidden = true;
      render();
      writeFragment();
      exposed.model = app.model;
      exposed.readyMs = performance.now();
      exposed.ready = true;
      document.body.dataset.ready = "true";
    } catch (err) {
      status.textContent = `The explorer could not start: ${err.message}`;
      status.classList.add("error");
      document.body.dataset.ready = "error";
      console.error(err);
    }
  }

  FA.app = app;
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})(window.FlaxAttn = window.FlaxAttn || {});
