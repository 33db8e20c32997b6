/* Model view: a thumbnail of every layer x head for the chosen example; click one to open it
 * in the matrix view. Each thumbnail is scaled to its own largest weight. */
(function (FA) {
  "use strict";
  const CELL = () => FA.data.CELL;

  /** Draw the first `rows` x `cols` cells of matrix m into a canvas, one pixel per cell. */
  function paint(canvas, m, scale, rows, cols) {
    canvas.width = cols;
    canvas.height = rows;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(cols, rows);
    const px = image.data;
    const max = m.max();
    const { VALUE, NOT_STORED } = CELL();
    for (let i = 0; i < rows; i++) {
      for (let j = 0; j < cols; j++) {
        const x = i * m.S + j, p = 4 * (i * cols + j);
        const c = m.state[x] === VALUE ? scale.rgb(m.values[x] / max)
          : m.state[x] === NOT_STORED ? FA.colors.NOT_STORED : FA.colors.MASKED;
        px[p] = c[0];
        px[p + 1] = c[1];
        px[p + 2] = c[2];
        px[p + 3] = 255;
      }
    }
    ctx.putImageData(image, 0, 0);
  }

  /** A row label that may wrap after each "/" of a layer path (never inside a name). */
  function breakable(text) {
    const label = FA.colors.el("div", { class: "rowlabel", title: text });
    text.split("/").forEach((part, i, parts) => {
      label.append(part + (i < parts.length - 1 ? "/" : ""));
      if (i < parts.length - 1) label.append(document.createElement("wbr"));
    });
    return label;
  }

  function render(root, app) {
    const el = FA.colors.el;
    const m = app.model, s = app.state;
    const nMax = Math.max(1, ...m.layers.map((l) => l.N));
    root.replaceChildren();
    root.append(el("h2", { text: `All layers and heads, example ${s.example}` }));
    if (!m.layers.length) {
      root.append(el("p", { class: "note", text: "This export has no attention layers." }));
      app.legend({});
      return;
    }
    const labelWidth = 190, gap = 6, border = 4; // as in .model-grid and .thumb
    const avail = root.clientWidth - labelWidth - nMax * (gap + border) - 2;
    const size = Math.max(44, Math.min(150, Math.floor(avail / nMax)));
    const grid = el("div", { class: "model-grid", role: "grid",
                             "aria-label": "thumbnails of every layer and head" });
    grid.style.gridTemplateColumns = `${labelWidth}px repeat(${nMax}, ${size + 4}px)`;
    grid.append(el("div", { class: "collabel", text: "layer \\ head" }));
    for (let h = 0; h < nMax; h++) {
      const heads = new Set(m.layers.map((l) => (h < l.N ? l.heads[h] : null)));
      heads.delete(null);
      grid.append(el("div", { class: "collabel", text: heads.size === 1 ? String([...heads][0]) : `#${h}` }));
    }
    let any = false;
    m.layers.forEach((layer, l) => {
      grid.append(breakable(layer.label() + (layer.topk ? ` top-${layer.topk}` : "")));
      for (let h = 0; h < nMax; h++) {
        if (h >= layer.N) { grid.append(el("div")); continue; }
        // The valid part only: padding would fill most of a short example's thumbnail.
        const rows = Math.max(1, layer.queryLength(s.example));
        const cols = Math.max(1, layer.keyLength(s.example));
        const matrix = layer.matrix(s.example, h);
        any = any || layer.causal;
        const canvas = el("canvas");
        paint(canvas, matrix, app.scales.heat, rows, cols);
        canvas.style.width = `${size}px`;
        canvas.style.height = `${Math.max(8, Math.round(size * Math.min(rows / cols, 2)))}px`;
        canvas.style.imageRendering = cols <= size ? "pixelated" : "auto";
        const button = el("button", {
          type: "button", class: "thumb", "data-layer": l, "data-head": h,
          "aria-label": `open ${layer.label()}, ${layer.headLabel(h)}`,
          title: `${layer.label()}, ${layer.headLabel(h)}: click to open`,
        }, canvas);
        if (l === s.layer && h === s.head) button.classList.add("current");
        button.addEventListener("click", () => app.open(l, h, "matrix"));
        grid.append(button);
      }
    });
    root.append(grid);
    root.append(el("p", { class: "note", text: "Rows: queries, columns: keys, padding left " +
      "out. Each thumbnail is scaled to its own largest weight. Click a thumbnail (or focus it and " +
      "press Enter) to open that head in the matrix view." }));
    const topk = m.layers.some((l) => l.topk !== null);
    app.legend({ scale: app.scales.heat, max: 1, label: "weight / largest weight of the head",
                 masked: any, maskedText: "masked (causal)", notStored: topk });
  }

  FA.views = FA.views || {};
  FA.views.model = { render };
})(window.FlaxAttn = window.FlaxAttn || {});
