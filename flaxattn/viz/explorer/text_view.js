/* Text view (for classifiers above all): the key tokens of the chosen layer coloured by the
 * attention they receive from one query (e.g. a classifier's <pool> token) or on average over
 * the valid queries; tokens marked in the export (extra/marked, e.g. sentiment words) are
 * framed. Each token carries its weight in data-weight. */
(function (FA) {
  "use strict";

  function render(root, app) {
    const el = FA.colors.el;
    const CELL = FA.data.CELL;
    const s = app.state, b = s.example;
    root.replaceChildren();
    const layer = app.layer();
    if (!layer) {
      root.append(el("p", { class: "note", text: "This export has no attention layers." }));
      return;
    }
    const cur = app.current();
    const m = cur.matrix;
    const qTokens = layer.queryTokens(b), kTokens = layer.keyTokens(b);
    const ql = layer.queryLength(b), kl = layer.keyLength(b);

    const scalars = Object.entries(app.data.extras.scalars).map(([k, v]) => `${k} ${v[b]}`);
    root.append(el("h2", { text: `${cur.title}` + (scalars.length ? ` · ${scalars.join(", ")}` : "") }));

    // Which query's attention.
    const pick = el("select", { id: "sel-query" });
    pick.append(el("option", { value: "-1", text: ql === 1 ? `0: ${app.tokenText(qTokens[0])}` : "mean over the queries" }));
    if (ql > 1) {
      for (let i = 0; i < ql; i++) pick.append(el("option", { value: i, text: `${i}: ${app.tokenText(qTokens[i])}` }));
    }
    pick.value = String(s.query < ql ? s.query : -1);
    pick.addEventListener("change", () => app.setState({ query: +pick.value }));
    root.append(el("div", { class: "controls" }, el("label", { for: "sel-query", text: "Attention from" }), pick));

    // The weight each key receives.
    const weights = new Float64Array(kl);
    const stored = new Uint8Array(kl);
    const rows = s.query >= 0 && s.query < ql ? [s.query] : Array.from({ length: ql }, (_, i) => i);
    for (const i of rows) {
      for (let j = 0; j < kl; j++) {
        const state = m.cell(i, j);
        if (state === CELL.VALUE) { weights[j] += m.value(i, j) / rows.length; stored[j] = 1; }
      }
    }
    let max = 1e-6;
    for (let j = 0; j < kl; j++) max = Math.max(max, weights[j]);

    const marksAll = app.data.extras.marks.marked;
    const marks = marksAll && marksAll[b].length === layer.S ? marksAll[b] : null;
    const text = el("div", { class: "textview", role: "list", "aria-label": "tokens coloured by attention" });
    for (let j = 0; j < kl; j++) {
      const rgb = app.scales.text.rgb(weights[j] / max);
      const span = el("span", {
        class: "tk", role: "listitem", "data-index": j, "data-weight": String(weights[j]),
        title: `${kTokens[j]}: ${FA.data.formatWeight(weights[j], cur.bits)}` +
          (marks && marks[j] ? " (marked)" : "") + (stored[j] ? "" : " (masked or not stored)"),
        text: app.tokenText(kTokens[j], 30),
      });
      span.style.background = `rgb(${rgb.join(",")})`;
      span.style.color = FA.colors.textOn(rgb);
      if (marks && marks[j]) span.classList.add("marked");
      text.append(span, " ");
    }
    root.append(text);
    const noteParts = [rows.length > 1 ? `Mean over ${rows.length} queries.` : "One query's row."];
    if (marks) noteParts.push("Framed, bold tokens are marked in the export (extra/marked).");
    if (layer.topk !== null && !cur.rollout) noteParts.push("Top-k export: weights not stored count as 0.");
    root.append(el("p", { class: "note", text: noteParts.join(" ") }));
    app.legend({ scale: app.scales.text, max, label: "attention received" });
  }

  FA.views = FA.views || {};
  FA.views.text = { render };
})(window.FlaxAttn = window.FlaxAttn || {});
