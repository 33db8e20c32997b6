/* Matrix view: one head's weights (or the mean of heads, or the rollout) as a heatmap with
 * token labels; hovering a cell shows its exact stored value. The canvas carries the cell
 * geometry in data-x0, data-y0 and data-cell (CSS pixels), which the browser tests use. */
(function (FA) {
  "use strict";

  const FONT = '12px ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace';

  function render(root, app) {
    const el = FA.colors.el;
    const CELL = FA.data.CELL;
    const s = app.state;
    root.replaceChildren();
    const layer = app.layer();
    if (!layer) {
      root.append(el("p", { class: "note", text: "This export has no attention layers." }));
      return;
    }
    const cur = app.current();
    const m = cur.matrix;
    const heading = el("h2", { text: cur.title });
    if (layer.topk !== null && !cur.rollout) {
      heading.append(el("span", { class: "badge", text: `top-${layer.topk}: only the ${layer.topk} largest weights of each row are stored` }));
    }
    root.append(heading);
    const ql = cur.rollout ? app.model.layers[cur.rollout.layers[0]].queryLength(s.example)
      : layer.queryLength(s.example);
    const kl = cur.rollout ? ql : layer.keyLength(s.example);
    const padded = ql < m.T || kl < m.S;
    if (padded) {
      const box = el("input", { type: "checkbox", id: "chk-padding" });
      box.checked = s.padding;
      box.addEventListener("change", () => app.setState({ padding: box.checked }));
      root.append(el("div", { class: "controls" }, el("span", { class: "check" }, box,
        el("label", { for: "chk-padding",
                      text: `Show the padding (${m.T - ql} queries, ${m.S - kl} keys, masked)` }))));
    }
    // Rows and columns drawn: the valid ones, or all with the padding.
    const T = s.padding ? m.T : Math.max(1, ql);
    const S = s.padding ? m.S : Math.max(1, kl);

    const qTokens = layer.queryTokens(s.example);
    const kTokens = layer.keyTokens(s.example);
    const probe = document.createElement("canvas").getContext("2d");
    probe.font = FONT;
    const labelWidth = (tokens, n) => {
      let w = 0;
      for (let i = 0; i < n; i++) w = Math.max(w, probe.measureText(app.tokenText(tokens[i]) + " 000").width);
      return Math.min(150, Math.ceil(w) + 10);
    };
    const left = labelWidth(qTokens, T) + 18;
    const top = labelWidth(kTokens, S) + 18;
    const avail = Math.max(200, root.clientWidth - left - 24);
    const cell = Math.max(2, Math.min(36, Math.floor(avail / S)));
    const width = left + cell * S + 8;
    const height = top + cell * T + 8;
    const dpr = Math.min(window.devicePixelRatio || 1, 2);
    const canvas = el("canvas", {
      role: "img",
      "aria-label": `heatmap of ${cur.title}: ${T} queries by ${S} keys; hover a cell for its value`,
    });
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
    Object.assign(canvas.dataset, { x0: left, y0: top, cell, rows: T, cols: S });
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);

    const max = m.max();
    for (let i = 0; i < T; i++) {
      for (let j = 0; j < S; j++) {
        const state = m.cell(i, j);
        const x = left + j * cell, y = top + i * cell;
        if (state === CELL.VALUE) {
          ctx.fillStyle = app.scales.heat.css(m.value(i, j) / max);
          ctx.fillRect(x, y, cell, cell);
        } else {
          FA.colors.drawSpecialCell(ctx, state, x, y, cell, cell);
        }
      }
    }
    // Values in the cells when they fit.
    if (cell >= 30) {
      ctx.font = "11px system-ui, sans-serif";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      for (let i = 0; i < T; i++) {
        for (let j = 0; j < S; j++) {
          if (m.cell(i, j) !== CELL.VALUE) continue;
          const v = m.value(i, j);
          ctx.fillStyle = FA.colors.textOn(app.scales.heat.rgb(v / max));
          ctx.fillText(v.toFixed(2), left + (j + 0.5) * cell, top + (i + 0.5) * cell);
        }
      }
    }

    // Token labels, thinned to one per 14 pixels.
    const every = Math.max(1, Math.ceil(14 / cell));
    const label = (tokens, i) => app.tokenText(tokens[i]) + (every > 1 ? ` ${i}` : "");
    ctx.font = FONT;
    ctx.fillStyle = "#1a1a1a";
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (let i = 0; i < T; i += every) ctx.fillText(label(qTokens, i), left - 6, top + (i + 0.5) * cell);
    ctx.save();
    ctx.translate(left, top - 6);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    for (let j = 0; j < S; j += every) ctx.fillText(label(kTokens, j), 0, (j + 0.5) * cell);
    ctx.restore();
    ctx.font = "600 12px system-ui, sans-serif";
    ctx.fillStyle = "#5a5a5a";
    ctx.textAlign = "left";
    ctx.fillText("keys →", 4, 10);
    ctx.fillText("queries ↓", 4, 26);

    canvas.addEventListener("mousemove", (event) => {
      const r = canvas.getBoundingClientRect();
      const j = Math.floor((event.clientX - r.left - left) / cell);
      const i = Math.floor((event.clientY - r.top - top) / cell);
      if (i < 0 || j < 0 || i >= T || j >= S) { app.tooltip.hide(); return; }
      const state = m.cell(i, j);
      const where = `query ${i} “${app.tokenText(qTokens[i], 24)}” → key ${j} “${app.tokenText(kTokens[j], 24)}”`;
      const names = { [CELL.VALUE]: "value", [CELL.PADDING]: "padding", [CELL.CAUSAL]: "causal",
                      [CELL.NOT_STORED]: "not-stored" };
      let what;
      if (state === CELL.VALUE) {
        what = `${cur.rollout ? "rolled-out attention" : "weight"} ${FA.data.formatWeight(m.value(i, j), cur.bits)}`;
      } else if (state === CELL.NOT_STORED) {
        what = "not stored: outside this row's top-k";
      } else {
        what = state === CELL.CAUSAL ? "masked (causal)" : "masked (padding)";
      }
      const attrs = { query: i, key: j, state: names[state] };
      if (state === CELL.VALUE) attrs.value = String(m.value(i, j));
      app.tooltip.show(event, [where, what], attrs);
    });
    canvas.addEventListener("mouseleave", () => app.tooltip.hide());

    root.append(el("div", { class: "matrix-wrap" }, canvas));
    const shown = (x) => Math.floor(x / m.S) < T && x % m.S < S;
    const masked = m.state.some((x, k) => (x === CELL.PADDING || x === CELL.CAUSAL) && shown(k));
    const notStored = m.state.some((x, k) => x === CELL.NOT_STORED && shown(k));
    app.legend({
      scale: app.scales.heat, max, label: cur.rollout ? "rolled-out attention" : "attention weight",
      masked, notStored,
      notes: ["colours run from 0 to this matrix's largest value"],
    });
  }

  FA.views = FA.views || {};
  FA.views.matrix = { render };
})(window.FlaxAttn = window.FlaxAttn || {});
