/* Image view, for exports with image fields (export format version 2): the input image with
 * its ground-truth box, the attention of one query over the image's patches (for a layer whose
 * keys are the patch tokens: token prefix + r * cols + c covers patch (r, c)), spatial
 * attention maps (CBAM) over the image and channel attention weights (SE, CBAM) as bars.
 *
 * Hover a patch to see where it attends, click it to keep it. The attention canvas carries
 * data-query and data-weights (rows x cols, the decoded weights), a spatial map's canvas
 * data-values, and each channel bar data-value, which the browser tests read back.
 */
(function (FA) {
  "use strict";

  const DISPLAY = 300; // CSS pixels of the image's longer side
  const BOX = "#E69F00";

  function available(app) {
    return Boolean(app.data && app.data.image);
  }

  /** An offscreen canvas of example b's pixels (grey for one channel, else the first 3). */
  function pixelCanvas(img, b) {
    const [H, W, C] = img.shape;
    const canvas = document.createElement("canvas");
    canvas.width = W;
    canvas.height = H;
    const ctx = canvas.getContext("2d");
    const data = ctx.createImageData(W, H);
    const scale = (img.pixelHi - img.pixelLo) / 255;
    const off = b * H * W * C;
    for (let p = 0; p < H * W; p++) {
      for (let k = 0; k < 3; k++) {
        const code = img.pixelCodes[off + p * C + (C >= 3 ? k : 0)];
        const v = img.pixelLo + code * scale;
        data.data[4 * p + k] = Math.round(255 * Math.max(0, Math.min(1, v)));
      }
      data.data[4 * p + 3] = 255;
    }
    ctx.putImageData(data, 0, 0);
    return canvas;
  }

  /** A canvas of the image's display size with its drawing context (device pixels). */
  function displayCanvas(H, W, label) {
    const el = FA.colors.el;
    const scale = DISPLAY / Math.max(H, W);
    const width = Math.round(W * scale), height = Math.round(H * scale);
    const dpr = Math.min(window.devicePixelRatio || 1, 2);
    const canvas = el("canvas", { role: "img", "aria-label": label });
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    ctx.imageSmoothingEnabled = false;
    return { canvas, ctx, scale, width, height };
  }

  function drawBox(ctx, box, scale) {
    if (!box) return;
    const [top, left, bottom, right] = box;
    const x = left * scale, y = top * scale, w = (right - left) * scale, h = (bottom - top) * scale;
    ctx.lineWidth = 4;
    ctx.strokeStyle = "#000";
    ctx.strokeRect(x, y, w, h);
    ctx.lineWidth = 2;
    ctx.strokeStyle = BOX;
    ctx.strokeRect(x, y, w, h);
  }

  function figure(canvas, caption) {
    const el = FA.colors.el;
    return el("figure", {}, canvas, el("figcaption", { text: caption }));
  }

  /** The layer's attention from query q (or the mean over valid queries for q < 0) to every
   * patch: {weights: Float64Array(rows * cols), max}. */
  function patchWeights(app, m, layer, q, img) {
    const [rows, cols] = img.grid;
    const weights = new Float64Array(rows * cols);
    const ql = layer.queryLength(app.state.example);
    const queries = q >= 0 ? [q] : Array.from({ length: ql }, (_, i) => i);
    for (const i of queries) {
      for (let k = 0; k < rows * cols; k++) {
        const j = img.prefix + k;
        if (m.cell(i, j) === FA.data.CELL.VALUE) weights[k] += m.value(i, j) / queries.length;
      }
    }
    let max = 1e-6;
    for (const w of weights) max = Math.max(max, w);
    return { weights, max };
  }

  function argmax(values) {
    let best = 0;
    for (let x = 1; x < values.length; x++) if (values[x] > values[best]) best = x;
    return best;
  }

  function render(root, app) {
    const el = FA.colors.el;
    const img = app.model.image;
    const s = app.state, b = s.example;
    root.replaceChildren();
    if (!img) {
      root.append(el("p", { class: "note", text: "This export has no image." }));
      app.legend({});
      return;
    }
    root.append(el("h2", { text: `Image of example ${b}` }));
    const panels = el("div", { class: "image-panels" });
    const legend = { notes: [] };
    const base = img.pixelCodes ? pixelCanvas(img, b) : null;
    const [H, W] = img.shape || [1, 1];
    if (base && img.box) legend.notes.push("orange frame: the ground-truth box");

    if (base) {
      const plain = displayCanvas(H, W, `input image of example ${b}`);
      plain.ctx.drawImage(base, 0, 0, plain.width, plain.height);
      drawBox(plain.ctx, img.box && img.box[b], plain.scale);
      panels.append(figure(plain.canvas, `input, ${H} x ${W} pixels` + (img.box ? ", with its box" : "")));
    }

    // Attention over the patches.
    const layer = app.layer();
    const overPatches = base && img.grid && layer && layer.kind !== "cross" &&
      layer.S >= img.prefix + img.grid[0] * img.grid[1];
    if (base && img.grid && !overPatches) {
      root.append(el("p", { class: "note", text: layer ? `The keys of ${layer.label()} are not the image's patches: choose a self-attention layer.` : "" }));
    }
    if (overPatches) {
      const cur = app.current();
      const [rows, cols] = img.grid;
      const [pr, pc] = img.patch;
      const qTokens = layer.queryTokens(b);
      const ql = layer.queryLength(b);
      const pick = el("select", { id: "sel-image-query" });
      pick.append(el("option", { value: "-1", text: "mean over the queries" }));
      for (let i = 0; i < Math.min(img.prefix, ql); i++) {
        pick.append(el("option", { value: i, text: `${i}: ${app.tokenText(qTokens[i])}` }));
      }
      for (let k = 0; k < rows * cols && img.prefix + k < ql; k++) {
        pick.append(el("option", { value: img.prefix + k, text: `patch (${Math.floor(k / cols)}, ${k % cols})` }));
      }
      pick.value = String(s.query);
      pick.addEventListener("change", () => app.setState({ query: +pick.value }));
      root.append(el("div", { class: "controls" },
        el("label", { for: "sel-image-query", text: "Attention from" }), pick,
        el("span", { class: "muted", text: "hover a patch to see where it attends; click to keep it" })));

      const view = displayCanvas(H, W, `attention over the image, ${cur.title}`);
      const draw = (q) => {
        const { weights, max } = patchWeights(app, cur.matrix, layer, q, img);
        const ctx = view.ctx;
        ctx.clearRect(0, 0, view.width, view.height);
        ctx.drawImage(base, 0, 0, view.width, view.height);
        ctx.globalAlpha = 0.65;
        for (let k = 0; k < rows * cols; k++) {
          const r = Math.floor(k / cols), c = k % cols;
          ctx.fillStyle = app.scales.heat.css(weights[k] / max);
          ctx.fillRect(c * pc * view.scale, r * pr * view.scale,
                       Math.min(pc, W - c * pc) * view.scale, Math.min(pr, H - r * pr) * view.scale);
        }
        ctx.globalAlpha = 1;
        if (q >= img.prefix) {
          const k = q - img.prefix, r = Math.floor(k / cols), c = k % cols;
          ctx.setLineDash([4, 3]);
          ctx.lineWidth = 2;
          ctx.strokeStyle = "#fff";
          ctx.strokeRect(c * pc * view.scale + 1, r * pr * view.scale + 1, pc * view.scale - 2, pr * view.scale - 2);
          ctx.setLineDash([]);
        }
        drawBox(ctx, img.box && img.box[b], view.scale);
        view.canvas.dataset.query = String(q);
        view.canvas.dataset.weights = JSON.stringify(Array.from(weights));
        return { weights, max };
      };
      const shown = draw(s.query);
      const patchAt = (event) => {
        const r = view.canvas.getBoundingClientRect();
        const c = Math.floor((event.clientX - r.left) / view.scale / pc);
        const row = Math.floor((event.clientY - r.top) / view.scale / pr);
        return row >= 0 && c >= 0 && row < rows && c < cols ? row * cols + c : -1;
      };
      view.canvas.addEventListener("mousemove", (event) => {
        const k = patchAt(event);
        if (k < 0 || img.prefix + k >= ql) { app.tooltip.hide(); return; }
        const { weights } = draw(img.prefix + k);
        const best = argmax(weights);
        app.tooltip.show(event, [
          `patch (${Math.floor(k / cols)}, ${k % cols}) = token ${img.prefix + k}`,
          `attends most to patch (${Math.floor(best / cols)}, ${best % cols}): ` +
            FA.data.formatWeight(weights[best], cur.bits),
        ], { patch: k });
      });
      view.canvas.addEventListener("mouseleave", () => { app.tooltip.hide(); draw(s.query); });
      view.canvas.addEventListener("click", (event) => {
        const k = patchAt(event);
        if (k >= 0 && img.prefix + k < ql) app.setState({ query: img.prefix + k });
      });
      const from = s.query < 0 ? "mean over the queries" : s.query < img.prefix
        ? `token ${s.query} (${app.tokenText(qTokens[s.query])})` : `patch token ${s.query}`;
      panels.append(figure(view.canvas, `${cur.title}: attention from ${from} to each of the ` +
        `${rows} x ${cols} patches`));
      legend.scale = app.scales.heat;
      legend.max = shown.max;
      legend.label = cur.rollout ? "rolled-out attention" : "attention weight";
    }

    // Spatial maps (CBAM) over the image.
    for (const sp of img.spatial) {
      const [h, w] = sp.shape;
      const values = new Float64Array(h * w);
      const scale = (sp.hi - sp.lo) / (Math.pow(2, sp.bits) - 1);
      let lo = Infinity, hi = -Infinity;
      for (let x = 0; x < h * w; x++) {
        values[x] = sp.lo + sp.codes[b * h * w + x] * scale;
        lo = Math.min(lo, values[x]);
        hi = Math.max(hi, values[x]);
      }
      const view = displayCanvas(base ? H : h, base ? W : w, `spatial attention map ${sp.path}`);
      if (base) view.ctx.drawImage(base, 0, 0, view.width, view.height);
      view.ctx.globalAlpha = base ? 0.65 : 1;
      const cw = view.width / w, ch = view.height / h;
      for (let x = 0; x < h * w; x++) {
        view.ctx.fillStyle = app.scales.heat.css(hi > lo ? (values[x] - lo) / (hi - lo) : 0.5);
        view.ctx.fillRect((x % w) * cw, Math.floor(x / w) * ch, Math.ceil(cw), Math.ceil(ch));
      }
      view.ctx.globalAlpha = 1;
      drawBox(view.ctx, base && img.box && img.box[b], view.scale);
      view.canvas.dataset.path = sp.path;
      view.canvas.dataset.values = JSON.stringify(Array.from(values));
      view.canvas.classList.add("spatial");
      view.canvas.addEventListener("mousemove", (event) => {
        const r = view.canvas.getBoundingClientRect();
        const c = Math.floor((event.clientX - r.left) / cw), row = Math.floor((event.clientY - r.top) / ch);
        if (row < 0 || c < 0 || row >= h || c >= w) { app.tooltip.hide(); return; }
        app.tooltip.show(event, [`${sp.path} cell (${row}, ${c})`, `value ${values[row * w + c].toFixed(4)}`],
                         { value: String(values[row * w + c]) });
      });
      view.canvas.addEventListener("mouseleave", () => app.tooltip.hide());
      panels.append(figure(view.canvas, `spatial attention ${sp.path} (${h} x ${w}), ` +
        `coloured from its smallest ${FA.colors.tickText(lo)} to its largest ${FA.colors.tickText(hi)}`));
    }

    // Channel attention weights as bars.
    for (const ch of img.channel) {
      const values = ch.values[b];
      const C = values.length;
      const width = DISPLAY, height = 120, bar = width / Math.max(C, 1);
      const max = Math.max(1e-6, ...values.map((v) => (v === null ? 0 : v)));
      const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      svg.setAttribute("width", width);
      svg.setAttribute("height", height);
      svg.setAttribute("role", "img");
      svg.setAttribute("aria-label", `channel attention ${ch.path}: ${C} channels`);
      svg.classList.add("channel");
      const axis = document.createElementNS("http://www.w3.org/2000/svg", "line");
      for (const [k, v] of [["x1", 0], ["x2", width], ["y1", height - 0.5], ["y2", height - 0.5]]) {
        axis.setAttribute(k, v);
      }
      axis.setAttribute("stroke", "#555");
      svg.append(axis);
      values.forEach((v, c) => {
        const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
        const hgt = v === null ? 0 : (height - 4) * v / max;
        rect.setAttribute("x", c * bar);
        rect.setAttribute("y", height - hgt);
        rect.setAttribute("width", Math.max(1, bar - (bar > 3 ? 1 : 0)));
        rect.setAttribute("height", hgt);
        rect.setAttribute("fill", "#0072B2");
        rect.dataset.value = String(v);
        rect.dataset.channel = c;
        const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
        title.textContent = `channel ${c}: ${v === null ? "n/a" : v.toFixed(4)}`;
        rect.append(title);
        svg.append(rect);
      });
      panels.append(figure(svg, `channel attention ${ch.path}: ${C} channels, largest ${FA.colors.tickText(max)}`));
    }
    root.append(panels);
    if (!legend.scale && img.spatial.length) {
      Object.assign(legend, { scale: app.scales.heat, max: 1, ticks: ["low", "", "high"],
                              label: "spatial map (each from its min to its max)" });
    }
    app.legend(legend);
  }

  FA.views = FA.views || {};
  FA.views.image = { render, available };
})(window.FlaxAttn = window.FlaxAttn || {});
