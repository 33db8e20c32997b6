/* Statistics view: entropy, mean attention distance and sink (first-token) mass per layer x
 * head, computed in Python by flaxattn.analysis from the exact weights, over all examples or
 * for the chosen one. Click (or Enter on) a cell to open that head in the matrix view. */
(function (FA) {
  "use strict";

  const STATS = [
    ["entropy", (unit) => `entropy (${unit})`, "how spread out each row is: 0 = one key"],
    ["distance", () => "mean attention distance (positions)", "how far queries look"],
    ["sink", () => "sink mass (weight on the first key)", "attention parked on the first token"],
  ];

  function render(root, app) {
    const el = FA.colors.el;
    const s = app.state, m = app.model, stats = app.data.stats;
    root.replaceChildren();
    root.append(el("h2", { text: s.scope === "all" ? `Per-head statistics over all ${m.B} examples`
                                                  : `Per-head statistics of example ${s.example}` }));
    const scope = el("div", { class: "scope", role: "radiogroup", "aria-label": "statistics over" });
    for (const [value, text] of [["all", "all examples"], ["example", "the chosen example"]]) {
      const id = `scope-${value}`;
      const radio = el("input", { type: "radio", name: "scope", id, value });
      radio.checked = s.scope === value;
      radio.addEventListener("change", () => app.setState({ scope: value }));
      scope.append(el("span", {}, radio, el("label", { for: id, text: ` ${text}` })));
    }
    root.append(scope);
    const tables = el("div", { class: "stats-tables" });
    const nMax = Math.max(1, ...m.layers.map((l) => l.N));
    for (const [key, title, hint] of STATS) {
      const values = s.scope === "all" ? stats.all[key] : stats.perExample[key][s.example];
      const finite = values.flat().filter((v) => v !== null);
      let lo = finite.length ? Math.min(...finite) : 0;
      let hi = finite.length ? Math.max(...finite) : 1;
      if (key === "sink") lo = 0;
      if (hi <= lo) hi = lo + 1e-6;
      const table = el("table", { class: "stats", "data-stat": key });
      table.append(el("caption", { text: title(stats.unit), title: hint }));
      const headRow = el("tr", {}, el("th", { scope: "col", text: "layer \\ head" }));
      for (let h = 0; h < nMax; h++) {
        const numbers = new Set(m.layers.filter((l) => h < l.N).map((l) => l.heads[h]));
        headRow.append(el("th", { scope: "col", text: numbers.size === 1 ? String([...numbers][0]) : `#${h}` }));
      }
      table.append(el("thead", {}, headRow));
      const body = el("tbody");
      m.layers.forEach((layer, l) => {
        const row = el("tr", {}, el("th", { scope: "row", text: layer.label(), title: layer.path }));
        for (let h = 0; h < nMax; h++) {
          const v = h < layer.N ? values[l][h] : null;
          if (v === null) { row.append(el("td", { class: "none", text: "–", title: "no value" })); continue; }
          const t = (v - lo) / (hi - lo);
          const rgb = app.scales.heat.rgb(t);
          const td = el("td", {
            class: "stat", tabindex: "0", "data-layer": l, "data-head": h,
            "data-value": String(v),
            "aria-label": `${title(stats.unit)} of ${layer.label()}, ${layer.headLabel(h)}: ${v}; open`,
            text: Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2),
          });
          td.style.background = `rgb(${rgb.join(",")})`;
          td.style.color = FA.colors.textOn(rgb);
          if (l === s.layer && h === s.head) td.classList.add("current");
          const open = () => app.open(l, h, "matrix");
          td.addEventListener("click", open);
          td.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
          row.append(td);
        }
        body.append(row);
      });
      table.append(body);
      tables.append(table);
    }
    root.append(tables);
    root.append(el("p", { class: "note", text: "Computed by flaxattn.analysis " +
      "(head_entropy, mean_attention_distance, sink_mass) from the exact weights, as means " +
      "over the valid query rows. Each table is coloured from its smallest to its largest " +
      "value (sink mass from 0). Click a cell to open that head." }));
    app.legend({ scale: app.scales.heat, max: 1, ticks: ["low", "", "high"],
                 label: "within each table" });
  }

  FA.views = FA.views || {};
  FA.views.stats = { render };
})(window.FlaxAttn = window.FlaxAttn || {});
