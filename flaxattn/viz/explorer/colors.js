/* Colour scales, the masked / not-stored cell styles and the legend.
 *
 * Sequential scales are 256-entry tables sampled from matplotlib in Python (viridis by
 * default: perceptually uniform and colour-blind safe). Overlaid heads use the Okabe-Ito
 * palette. Masked cells are grey and hatched; cells a top-k export did not store are white
 * with a grey dot: neither can be read as a weight of zero.
 */
(function (FA) {
  "use strict";

  function parseTable(hex) {
    const table = new Uint8Array(256 * 3);
    for (let i = 0; i < 256 * 3; i++) table[i] = parseInt(hex.substr(2 * i, 2), 16);
    return table;
  }

  class Scale {
    constructor(hex) { this.table = parseTable(hex); }
    /** [r, g, b] for t in [0, 1]. */
    rgb(t) {
      const k = 3 * Math.max(0, Math.min(255, Math.round(t * 255)));
      return [this.table[k], this.table[k + 1], this.table[k + 2]];
    }
    css(t) { const c = this.rgb(t); return `rgb(${c[0]},${c[1]},${c[2]})`; }
    gradient() {
      const stops = [];
      for (let i = 0; i <= 16; i++) stops.push(`${this.css(i / 16)} ${(100 * i / 16).toFixed(1)}%`);
      return `linear-gradient(to right, ${stops.join(", ")})`;
    }
  }

  /** Black or white, whichever reads better on the background [r, g, b]. */
  function textOn(rgb) {
    const lum = (0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]) / 255;
    return lum > 0.5 ? "#000" : "#fff";
  }

  const MASKED = [208, 208, 208];
  const MASKED_HATCH = "#8c8c8c";
  const NOT_STORED = [255, 255, 255];

  /** Fill cell (x, y, w, h) of a canvas in the style of a masked or not-stored cell. */
  function drawSpecialCell(ctx, state, x, y, w, h) {
    const CELL = FA.data.CELL;
    if (state === CELL.NOT_STORED) {
      ctx.fillStyle = "#fff";
      ctx.fillRect(x, y, w, h);
      if (w >= 6) {
        ctx.fillStyle = MASKED_HATCH;
        ctx.beginPath();
        ctx.arc(x + w / 2, y + h / 2, Math.max(1, w / 8), 0, 2 * Math.PI);
        ctx.fill();
      }
      return;
    }
    ctx.fillStyle = "#d0d0d0";
    ctx.fillRect(x, y, w, h);
    if (w >= 5) {
      ctx.save();
      ctx.beginPath();
      ctx.rect(x, y, w, h);
      ctx.clip();
      ctx.strokeStyle = MASKED_HATCH;
      ctx.lineWidth = 1;
      ctx.beginPath();
      for (let d = -h; d < w; d += 4) {
        ctx.moveTo(x + d, y + h);
        ctx.lineTo(x + d + h, y);
      }
      ctx.stroke();
      ctx.restore();
    }
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }

  function tickText(v) {
    if (v === 0) return "0";
    if (v >= 0.1) return v.toFixed(2);
    return v.toPrecision(2);
  }

  /**
   * Fill the legend: the colour bar of `scale` from 0 (or `min`) to `max` with its label, the
   * swatches that apply, and notes (quantisation, normalisation).
   */
  function renderLegend(root, opts) {
    root.replaceChildren();
    root.hidden = !(opts.scale || opts.masked || opts.notStored || (opts.notes || []).length);
    if (opts.scale) {
      const min = opts.min || 0;
      const bar = el("span", { class: "bar", role: "img",
        "aria-label": `colour scale from ${tickText(min)} to ${tickText(opts.max)}` });
      bar.style.background = opts.scale.gradient();
      const labels = opts.ticks || [min, (min + opts.max) / 2, opts.max].map(tickText);
      const ticks = el("span", { class: "ticks" }, ...labels.map((text) => el("span", { text })));
      root.append(el("span", { class: "scale" },
        el("span", { text: opts.label || "attention weight" }),
        el("span", {}, bar, el("br"), ticks)));
    }
    if (opts.masked) {
      root.append(el("span", {}, el("span", { class: "swatch masked" }),
        opts.maskedText || "masked (padding or causal)"));
    }
    if (opts.notStored) {
      root.append(el("span", {}, el("span", { class: "swatch notstored" }),
        "not stored (top-k export)"));
    }
    for (const note of opts.notes || []) root.append(el("span", { class: "muted", text: note }));
  }

  FA.colors = {
    Scale, textOn, drawSpecialCell, renderLegend, el, tickText,
    MASKED, NOT_STORED,
    headColor(h, data) { return data.headColors[h % data.headColors.length]; },
  };
})(window.FlaxAttn = window.FlaxAttn || {});
