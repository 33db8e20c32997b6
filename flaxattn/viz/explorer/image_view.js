/* Image view: attention over the input image, for exports with image fields (export format
 * version 2: image/pixels, image/grid, image/patch, image/prefix, optional image/box,
 * spatial/<path> and channel/<path>). Filled in when the export format carries images. */
(function (FA) {
  "use strict";

  function available(app) {
    return Boolean(app.data && app.data.image);
  }

  function render(root, app) {
    root.replaceChildren(FA.colors.el("p", { class: "note", text: "This export has no image." }));
    app.legend({});
  }

  FA.views = FA.views || {};
  FA.views.image = { render, available };
})(window.FlaxAttn = window.FlaxAttn || {});
