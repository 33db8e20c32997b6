/* Decoding of the embedded export, and access to its weights.
 *
 * Each layer's weights arrive as base64 text of deflated little-endian integer codes (see
 * flaxattn/viz/_explorer_data.py); a code c stands for lo + c * (hi - lo) / (2^bits - 1).
 * Dense layers hold codes [B, N, T, S]; top-k layers hold codes and key indices [B, N, T, k].
 * Rollouts hold codes [L, B, T, T] for the layers of one self-attention stack.
 */
(function (FA) {
  "use strict";

  // What a cell of a matrix is. Everything but VALUE is drawn distinct from a zero weight.
  const CELL = { VALUE: 0, PADDING: 1, CAUSAL: 2, NOT_STORED: 3 };

  function base64ToBytes(text) {
    const binary = atob(text);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  async function inflate(bytes) {
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this browser has no DecompressionStream (the Compression Streams " +
                      "standard: Chromium 80+, Firefox 113+, Safari 16.4+)");
    }
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

  /** Unsigned integer codes of `bits` (8, 16 or 32) bits from the page's base64 text. */
  async function decodeCodes(text, bits) {
    const bytes = await inflate(base64ToBytes(text));
    if (bits === 8) return bytes;
    const width = bits / 8;
    const n = bytes.length / width;
    const Type = bits === 16 ? Uint16Array : Uint32Array;
    if (LITTLE_ENDIAN) return new Type(bytes.buffer, bytes.byteOffset, n);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
    const out = new Type(n);
    for (let i = 0; i < n; i++) {
      out[i] = bits === 16 ? view.getUint16(2 * i, true) : view.getUint32(4 * i, true);
    }
    return out;
  }

  /** A dense matrix of one head (or a mean, or a rollout) with the state of every cell. */
  class Matrix {
    constructor(T, S) {
      this.T = T;
      this.S = S;
      this.values = new Float64Array(T * S);
      this.state = new Uint8Array(T * S);
    }
    value(i, j) { return this.values[i * this.S + j]; }
    cell(i, j) { return this.state[i * this.S + j]; }
    /** The largest weight of the valid cells (at least a tiny positive number). */
    max() {
      let m = 0;
      for (let x = 0; x < this.values.length; x++) {
        if (this.state[x] === CELL.VALUE && this.values[x] > m) m = this.values[x];
      }
      return m > 0 ? m : 1e-6;
    }
  }

  class Layer {
    constructor(spec, index, model) {
      Object.assign(this, spec);
      this.index = index;
      this.model = model;
      this.N = spec.heads.length;
      this.scale = (spec.hi - spec.lo) / (Math.pow(2, spec.bits) - 1);
      delete this.codes;
      delete this.indices;
    }

    async decode(spec) {
      this.codes = await decodeCodes(spec.codes, spec.bits);
      if (spec.topk !== null) this.idx = await decodeCodes(spec.indices, spec.indexBits);
      const per = this.topk === null ? this.T * this.S : this.T * this.topk;
      const expected = this.model.B * this.N * per;
      if (this.codes.length !== expected) {
        throw new Error(`layer ${this.path}: ${this.codes.length} codes, expected ${expected}`);
      }
    }

    /** The tokens on the query and key axes of example b. */
    queryTokens(b) { return this.kind === "encoder" ? this.model.keyTokens[b] : this.model.queryTokens[b]; }
    keyTokens(b) { return this.kind === "self" ? this.model.queryTokens[b] : this.model.keyTokens[b]; }
    queryLength(b) { return this.kind === "encoder" ? this.model.keyLengths[b] : this.model.queryLengths[b]; }
    keyLength(b) { return this.kind === "self" ? this.model.queryLengths[b] : this.model.keyLengths[b]; }

    /** Whether cell (i, j) of example b is masked (PADDING, CAUSAL) or VALUE by position. */
    positionState(b, i, j) {
      if (i >= this.queryLength(b) || j >= this.keyLength(b)) return CELL.PADDING;
      if (this.causal && j > i) return CELL.CAUSAL;
      return CELL.VALUE;
    }

    /** Set every cell of `m` to PADDING, CAUSAL or VALUE by its position in example b. */
    fillStates(m, b) {
      const ql = this.queryLength(b), kl = this.keyLength(b);
      for (let i = 0; i < m.T; i++) {
        for (let j = 0; j < m.S; j++) {
          m.state[i * m.S + j] = i >= ql || j >= kl ? CELL.PADDING
            : this.causal && j > i ? CELL.CAUSAL : CELL.VALUE;
        }
      }
    }

    /** The weights of head position h (or the mean of the heads for h = -1) of example b. */
    matrix(b, h) {
      if (h < 0) return this.meanMatrix(b);
      const m = new Matrix(this.T, this.S);
      const base = (b * this.N + h) * this.T;
      this.fillStates(m, b);
      if (this.topk === null) {
        const off = base * this.S;
        for (let x = 0; x < this.T * this.S; x++) m.values[x] = this.lo + this.codes[off + x] * this.scale;
      } else {
        const stored = new Uint8Array(this.T * this.S);
        for (let i = 0; i < this.T; i++) {
          const off = (base + i) * this.topk;
          for (let r = 0; r < this.topk; r++) {
            const j = this.idx[off + r];
            m.values[i * this.S + j] = this.lo + this.codes[off + r] * this.scale;
            stored[i * this.S + j] = 1;
          }
        }
        for (let x = 0; x < stored.length; x++) {
          if (!stored[x] && m.state[x] === CELL.VALUE) m.state[x] = CELL.NOT_STORED;
        }
      }
      return m;
    }

    /** The mean over heads; in a top-k layer a weight a head did not store counts as 0. */
    meanMatrix(b) {
      const mean = new Matrix(this.T, this.S);
      mean.state.fill(CELL.NOT_STORED);
      for (let h = 0; h < this.N; h++) {
        const m = this.matrix(b, h);
        for (let x = 0; x < m.values.length; x++) {
          mean.values[x] += m.values[x] / this.N;
          if (m.state[x] !== CELL.NOT_STORED) mean.state[x] = m.state[x];
        }
      }
      return mean;
    }

    headLabel(h) { return h < 0 ? "mean of heads" : `head ${this.heads[h]}`; }
    label() { return `${this.path} (${this.kind})`; }
  }

  /** Attention rollout up to each layer of one self-attention stack. */
  class Rollout {
    constructor(spec, model) {
      this.kind = spec.kind;
      this.layers = spec.layers;
      this.causal = spec.causal;
      this.lo = spec.lo;
      this.hi = spec.hi;
      this.bits = spec.bits;
      this.maxError = spec.maxError;
      this.scale = (spec.hi - spec.lo) / (Math.pow(2, spec.bits) - 1);
      this.model = model;
    }
    async decode(spec) { this.codes = await decodeCodes(spec.codes, spec.bits); }

    /** The rollout through the stack's layers up to and including layer index `layer`. */
    matrix(b, layer) {
      const first = this.model.layers[this.layers[0]];
      const step = this.layers.indexOf(layer);
      const T = first.T;
      const m = new Matrix(T, T);
      const off = (step * this.model.B + b) * T * T;
      first.fillStates(m, b);
      for (let x = 0; x < T * T; x++) {
        m.values[x] = this.lo + this.codes[off + x] * this.scale;
        if (m.state[x] === CELL.VALUE && this.causal && x % T > Math.floor(x / T)) {
          m.state[x] = CELL.CAUSAL;
        }
      }
      return m;
    }
  }

  /** Decode everything the page embeds; resolves to the model the views read. */
  async function load(data) {
    const model = {
      data,
      B: data.examples,
      queryTokens: data.tokens.query,
      keyTokens: data.tokens.key,
      queryLengths: data.lengths.query,
      keyLengths: data.lengths.key,
      layers: [],
      rollouts: [],
    };
    model.layers = data.layers.map((spec, i) => new Layer(spec, i, model));
    model.rollouts = data.rollouts.map((spec) => new Rollout(spec, model));
    model.image = data.image ? Object.assign({}, data.image) : null;
    const image = model.image;
    await Promise.all([
      ...model.layers.map((layer, i) => layer.decode(data.layers[i])),
      ...model.rollouts.map((r, i) => r.decode(data.rollouts[i])),
      // Image pixels as 8-bit codes [B, Hi, Wi, C]; spatial maps as 16-bit codes [B, h, w].
      image && image.pixels ? decodeCodes(image.pixels, 8).then((c) => { image.pixelCodes = c; }) : null,
      ...(image ? image.spatial.map(async (sp, i) => {
        image.spatial[i] = Object.assign({}, sp, { codes: await decodeCodes(sp.codes, sp.bits) });
      }) : []),
    ]);
    if (image) delete image.pixels;
    // The page text keeps only what is needed to render; the base64 strings can go.
    data.layers.forEach((spec) => { delete spec.codes; delete spec.indices; });
    data.rollouts.forEach((spec) => { delete spec.codes; });
    model.rolloutOf = (layerIndex) =>
      model.rollouts.find((r) => r.layers.includes(layerIndex)) || null;
    model.bits = data.layers.length ? data.layers[0].bits : 16;
    model.maxError = Math.max(0, ...data.layers.map((l) => l.maxError));
    return model;
  }

  /** A weight as the page prints it: the decimals the stored precision supports, and the
   * magnitude of a small nonzero weight that those decimals would round to 0. */
  function formatWeight(v, bits) {
    const digits = bits >= 16 ? 4 : 3;
    const text = v.toFixed(digits);
    return v > 0 && v < 0.5 * Math.pow(10, -digits) ? `${text} (${v.toExponential(1)})` : text;
  }

  FA.data = { CELL, Matrix, load, decodeCodes, formatWeight };
})(window.FlaxAttn = window.FlaxAttn || {});
