/* Head view (after bertviz): queries on the left, keys on the right, a line from query i to
 * key j with opacity equal to the weight, one colour per head, heads toggled on and off.
 * Hovering (or focusing) a query shows only its row's lines, a key only its column's.
 *
 * All lines are drawn on a canvas; the hovered row or column is drawn as SVG <line> elements
 * with data-head (the head number), data-query, data-key and stroke-opacity = the weight, which
 * the browser tests read back. The canvas leaves off lines of weight below 1/400 (they would
 * round to transparent) and, past LINE_BUDGET lines, the weakest ones (the page says so).
 */
(function (FA) {
  "use strict";

  const SVG = "http://www.w3.org/2000/svg";
  const WIDTH = 280;
  const LEVELS = 200; // opacity steps of the canvas lines
  const LINE_BUDGET = 6000; // the most canvas lines drawn at once (the hovered ones are all SVG)

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
    const b = s.example;
    const rollout = s.rollout ? app.model.rolloutOf(s.layer) : null;
    // The series of lines: one per active head, or the rollout alone.
    let series;
    if (rollout) {
      series = [{ label: "rollout", color: "#000000", matrix: rollout.matrix(b, s.layer), head: "rollout" }];
    } else {
      const active = s.heads === null ? layer.heads.map((_, h) => h) : s.heads;
      series = active.map((h) => ({
        label: layer.headLabel(h), color: FA.colors.headColor(h, app.data),
        matrix: layer.matrix(b, h), head: String(layer.heads[h]),
      }));
    }
    const title = rollout ? app.current().title : `${layer.label()}, example ${b}`;
    const heading = el("h2", { text: title });
    if (layer.topk !== null && !rollout) {
      heading.append(el("span", { class: "badge", text: `top-${layer.topk}: lines only for stored weights` }));
    }
    root.append(heading);

    // Head toggles.
    const toggles = el("div", { class: "head-toggles", role: "group", "aria-label": "heads shown" });
    if (rollout) {
      toggles.append(el("span", { class: "muted", text: "Rollout: the mean of the heads, rolled out through the stack (turn rollout off to choose heads)." }));
    } else {
      layer.heads.forEach((number, h) => {
        const id = `head-toggle-${h}`;
        const box = el("input", { type: "checkbox", id, "data-head": number });
        box.checked = s.heads === null || s.heads.includes(h);
        box.addEventListener("change", () => {
          const on = layer.heads.map((_, k) => k).filter((k) =>
            k === h ? box.checked : (s.heads === null || s.heads.includes(k)));
          app.setState({ heads: on.length === layer.N ? null : on });
        });
        const swatch = el("span", { class: "sw" });
        swatch.style.background = FA.colors.headColor(h, app.data);
        toggles.append(el("label", { for: id }, box, swatch, `head ${number}`));
      });
      const all = el("button", { type: "button", text: "all heads" });
      all.addEventListener("click", () => app.setState({ heads: null }));
      const none = el("button", { type: "button", text: "no heads" });
      none.addEventListener("click", () => app.setState({ heads: [] }));
      toggles.append(all, none);
    }
    root.append(toggles);

    const qTokens = layer.queryTokens(b).slice(0, layer.queryLength(b));
    const kTokens = layer.keyTokens(b).slice(0, layer.keyLength(b));
    const rows = Math.max(qTokens.length, kTokens.length);
    const rowHeight = rows > 300 ? 14 : rows > 40 ? 20 : 26;
    const height = rows * rowHeight;
    // Each head's lines end a little above or below the token's centre, so heads that agree
    // show as parallel lines rather than one blended line.
    const spread = Math.min(3, (rowHeight - 8) / Math.max(1, series.length - 1));
    const y = (i, k) => i * rowHeight + rowHeight / 2 + (k - (series.length - 1) / 2) * spread;

    const column = (tokens, side) => {
      const col = el("div", { class: `tokcol ${side}` });
      tokens.forEach((t, i) => {
        const tok = el("div", {
          class: "tok", tabindex: "0", "data-side": side === "left" ? "query" : "key",
          "data-index": i, title: String(t),
          "aria-label": `${side === "left" ? "query" : "key"} ${i}: ${t}`,
          text: app.tokenText(t, 24),
        });
        tok.style.height = tok.style.lineHeight = `${rowHeight}px`;
        col.append(tok);
      });
      return col;
    };
    const left = column(qTokens, "left");
    const right = column(kTokens, "right");
    const lines = el("div", { class: "lines" });
    lines.style.width = `${WIDTH}px`;
    lines.style.height = `${height}px`;
    const dpr = Math.min(window.devicePixelRatio || 1, height > 8000 ? 1 : 2);
    const canvas = el("canvas", { "aria-hidden": "true" });
    canvas.width = WIDTH * dpr;
    canvas.height = Math.max(1, Math.round(height * dpr));
    canvas.style.width = `${WIDTH}px`;
    canvas.style.height = `${height}px`;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("width", WIDTH);
    svg.setAttribute("height", height);
    svg.setAttribute("class", "focus-lines");
    svg.setAttribute("aria-hidden", "true");
    lines.append(canvas, svg);

    // The lines on the canvas, grouped by opacity (1/LEVELS steps) so each group is one path.
    // A browser strokes about 10-20 thousand long lines a second without a GPU, so past
    // LINE_BUDGET lines only the strongest groups are drawn (the note says so).
    const groups = series.map(() => new Map());
    const counts = new Float64Array(LEVELS + 1);
    series.forEach((line, k) => {
      const m = line.matrix;
      for (let i = 0; i < qTokens.length; i++) {
        for (let j = 0; j < kTokens.length; j++) {
          if (m.cell(i, j) !== CELL.VALUE) continue;
          const level = Math.round(Math.min(1, m.value(i, j)) * LEVELS);
          if (level <= 0) continue;
          if (!groups[k].has(level)) groups[k].set(level, []);
          groups[k].get(level).push(i, j);
          counts[level] += 1;
        }
      }
    });
    // Whole groups from the most opaque down, while they fit in the budget (the first always).
    let lowest = LEVELS + 1, drawn = 0, total = 0;
    for (let level = 1; level <= LEVELS; level++) total += counts[level];
    for (let level = LEVELS; level >= 1; level--) {
      if (counts[level] === 0) continue;
      if (drawn > 0 && drawn + counts[level] > LINE_BUDGET) break;
      drawn += counts[level];
      lowest = level;
    }
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    ctx.lineWidth = 1.5;
    series.forEach((line, k) => {
      ctx.strokeStyle = line.color;
      for (const [level, pairs] of groups[k]) {
        if (level < lowest) continue;
        ctx.globalAlpha = level / LEVELS;
        ctx.beginPath();
        for (let p = 0; p < pairs.length; p += 2) {
          ctx.moveTo(0, y(pairs[p], k));
          ctx.lineTo(WIDTH, y(pairs[p + 1], k));
        }
        ctx.stroke();
      }
    });

    /** Draw the lines of query i (side "query") or key j (side "key") as SVG elements. */
    function focus(side, index) {
      svg.replaceChildren();
      lines.classList.add("focus");
      series.forEach((line, k) => {
        const m = line.matrix;
        const count = side === "query" ? kTokens.length : qTokens.length;
        for (let t = 0; t < count; t++) {
          const i = side === "query" ? index : t;
          const j = side === "query" ? t : index;
          if (m.cell(i, j) !== CELL.VALUE) continue;
          const w = m.value(i, j);
          const ln = document.createElementNS(SVG, "line");
          ln.setAttribute("class", "attn-line");
          ln.setAttribute("x1", 0);
          ln.setAttribute("y1", y(i, k));
          ln.setAttribute("x2", WIDTH);
          ln.setAttribute("y2", y(j, k));
          ln.setAttribute("stroke", line.color);
          ln.setAttribute("stroke-width", "2");
          ln.setAttribute("stroke-opacity", String(Math.min(1, Math.max(0, w))));
          ln.dataset.head = line.head;
          ln.dataset.query = i;
          ln.dataset.key = j;
          ln.dataset.weight = String(w);
          svg.append(ln);
        }
      });
      for (const tok of root.querySelectorAll(".tok")) {
        tok.classList.toggle("hover", tok.dataset.side === side && +tok.dataset.index === index);
      }
    }
    function unfocus() {
      svg.replaceChildren();
      lines.classList.remove("focus");
      for (const tok of root.querySelectorAll(".tok.hover")) tok.classList.remove("hover");
    }
    for (const tok of [...left.children, ...right.children]) {
      const side = tok.dataset.side, index = +tok.dataset.index;
      tok.addEventListener("mouseenter", () => focus(side, index));
      tok.addEventListener("focus", () => focus(side, index));
      tok.addEventListener("mouseleave", unfocus);
      tok.addEventListener("blur", unfocus);
    }

    const head = (text) => el("div", { class: "colhead", text });
    const leftWrap = el("div", {}, head(layer.kind === "cross" ? "queries" : "queries (attending)"), left);
    const rightWrap = el("div", {}, head("keys (attended to)"), right);
    root.append(el("p", { class: "note", text: "Line opacity = attention weight. Hover or focus " +
      "(Tab) a token to see only its lines: a query's row, or a key's column." +
      (app.data.headColors.length < layer.N ? " Colours repeat after " +
        `${app.data.headColors.length} heads.` : "") }));
    if (drawn < total) {
      root.append(el("p", { class: "note budget", text: `Drawn: the ${drawn} strongest of ` +
        `${total} lines (weights from ${((lowest - 0.5) / LEVELS).toFixed(4)}); hover a ` +
        "token to see every line of its row or column." }));
    }
    root.append(el("div", { class: "headview" }, leftWrap, el("div", {}, head(""), lines), rightWrap));
    app.legend({});
  }

  FA.views = FA.views || {};
  FA.views.head = { render };
})(window.FlaxAttn = window.FlaxAttn || {});
