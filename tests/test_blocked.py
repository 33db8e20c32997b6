"""What is particular to the blocked (flash-style) kernel: block sizes, padding, the 16-bit
products, where the scale goes, block skipping, memory, and pieces of a longer sequence.

Its agreement with the float64 reference on every masking feature is the conformance suite's
(tests/test_conformance.py); here it is compared with the reference implementation (checked
there too), differentiably, with a cotangent on the logsumexp as well. Small block sizes such
as (8, 16) give many blocks, ragged edges and padding at small T, S.
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import flaxattn
from flaxattn.kernels._blocked import (
    DEFAULT_BLOCK_Q,
    blocked_attention,
    default_block_sizes,
    prepare,
)
from flaxattn.kernels._reference import reference_attention
from flaxattn.kernels._visibility import Visibility

BLOCKS = (8, 16)


# ----------------------------------------------------------------------------- helpers


def _inputs(B=2, T=19, S=37, N=4, K=2, H=8, Hv=None, dtype=jnp.float32, seed=0):
    # numpy, not jax.random: eager jax.random compiles a program per shape.
    rng = np.random.default_rng(seed)
    shapes = [(B, T, N, H), (B, S, K, H), (B, S, K, Hv or H)]
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes)
    return q, k, v


def _visibility(kw) -> Visibility:
    return Visibility(
        is_causal=kw.get("causal", False),
        window=kw.get("window"),
        q_lengths=kw.get("q_lengths"),
        kv_lengths=kw.get("kv_lengths"),
        causal_alignment=kw.get("alignment", "top_left"),
    )


def _blocked(q, k, v, bias=None, *, block_sizes=BLOCKS, **kw):
    return blocked_attention(
        q, k, v, bias=bias, mask=kw.get("mask"), visibility=_visibility(kw),
        scale=1.0 / np.sqrt(q.shape[-1]), score_mod=kw.get("score_mod"),
        mask_mod=kw.get("mask_mod"), block_sizes=block_sizes,
    )


def naive_attention(q, k, v, *, bias=None, scale=None, **kw):
    """The reference implementation (itself checked against the float64 reference of
    `flaxattn.testing` by the conformance suite) in float32: `(out, lse)`, differentiable."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    out, _, lse = reference_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
        bias=None if bias is None else bias.astype(jnp.float32), mask=kw.get("mask"),
        visibility=_visibility(kw), score_mod=kw.get("score_mod"), mask_mod=kw.get("mask_mod"),
        score_fn=lambda q, k: (q @ k.T) * scale,
    )
    return out, lse


def _naive(q, k, v, bias=None, **kw):
    return naive_attention(q, k, v, bias=bias, **kw)


def _outputs_and_grads(attn, q, k, v, bias):
    """`(out, lse, grads)` in one jitted function: grads (w.r.t. q, k, v and bias if given) of
    a scalar that uses both outputs, so the lse cotangent is exercised too."""

    rng = np.random.default_rng(1)  # the same cotangents for every attn

    def run(q, k, v, bias):
        primals = (q, k, v) if bias is None else (q, k, v, bias)
        (out, lse), pullback = jax.vjp(lambda *a: attn(*a[:3], *a[3:]), *primals)
        ct_out = jnp.asarray(rng.standard_normal(out.shape, np.float32), out.dtype)
        ct_lse = jnp.where(jnp.isfinite(lse), rng.standard_normal(lse.shape, np.float32), 0.0)
        return out, lse, pullback((ct_out, ct_lse))

    return _jit(run)(q, k, v, bias)


def _fast_compile_options() -> dict:
    """The tests check numbers, not speed: these XLA:CPU options compile ~3x faster. Dropped if
    this jaxlib does not know them."""
    options = {
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
        "xla_cpu_use_fusion_emitters": False,
    }
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
    except Exception:  # an unknown option on an older or newer jaxlib
        return {}
    return options


COMPILE_OPTIONS = _fast_compile_options()


def _jit(fn):
    return jax.jit(fn, compiler_options=COMPILE_OPTIONS)


def _compare(q, k, v, bias=None, *, atol=2e-5, grad_atol=1e-4, block_sizes=BLOCKS, **kw):
    """Forward, lse and gradients (q, k, v, bias) of blocked vs naive, both under jit."""
    blocked = functools.partial(_blocked, block_sizes=block_sizes, **kw)
    naive = functools.partial(_naive, **kw)
    out, lse, grads = _outputs_and_grads(blocked, q, k, v, bias)
    ref_out, ref_lse, ref_grads = _outputs_and_grads(naive, q, k, v, bias)
    assert out.shape == ref_out.shape and out.dtype == q.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_out, atol=atol, rtol=1e-5)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=atol, rtol=1e-5)
    for name, g, r in zip(["q", "k", "v", "bias"], grads, ref_grads, strict=False):
        assert g.shape == r.shape, name
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, r, atol=grad_atol, rtol=1e-4, err_msg=f"d{name}")
    return out, lse, grads


# ----------------------------------------------------------------------------- forward + grads


# Every axis is broadcast (size 1) in some case and full in another.
@pytest.mark.parametrize(
    "bias_shape", [(2, 4, 19, 37), (1, 4, 1, 37), (2, 1, 19, 1)],
    ids=lambda s: "bias " + "x".join(map(str, s)),
)
def test_bias_broadcasting_and_gradient(bias_shape):
    q, k, v = _inputs()
    bias = jnp.asarray(np.random.default_rng(3).standard_normal(bias_shape, np.float32))
    _, _, grads = _compare(q, k, v, bias, causal=True, alignment="bottom_right")
    assert grads[3].shape == bias_shape


@pytest.mark.parametrize(
    "shape, causal",
    [
        (dict(B=1, T=1, S=1, N=2, K=1), True),
        (dict(B=2, T=1, S=29, N=4, K=4), True),  # T=1 decoding against a cache
        (dict(B=2, T=29, S=1, N=4, K=2), False),
        (dict(B=1, T=40, S=40, N=4, K=1), True),  # MQA, lengths multiples of the blocks
        (dict(B=1, T=23, S=17, N=6, K=3, Hv=5), False),  # odd sizes, value dim != key dim
    ],
    ids=lambda x: ", ".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else
    ("causal bottom_right" if x else "full"),
)
def test_shapes(shape, causal):
    q, k, v = _inputs(**shape)
    _compare(q, k, v, causal=causal, alignment="bottom_right")


def test_default_block_sizes_single_block_and_padding():
    # One block each way (defaults cover T, S) and a ragged multi-block split of S = 700.
    q, k, v = _inputs(B=1, T=9, S=700, N=2, K=1)
    _compare(q, k, v, causal=True, alignment="bottom_right", block_sizes=None)
    bq, bk = default_block_sizes(700, 4096)
    assert bq % 8 == 0 and bq <= DEFAULT_BLOCK_Q and -(-700 // bq) == -(-700 // DEFAULT_BLOCK_Q)
    assert 4096 % bk == 0
    assert default_block_sizes(64, 1) == (64, 1)


def test_long_unmasked_forward_blocks_and_separate_backward_blocks(monkeypatch):
    # The default blocks of a long unmasked call are tall (forward) and the backward re-blocks
    # to its own defaults: shrink the tuned sizes so this path runs at a small T, with a bias
    # so dbias is accumulated on the backward's blocks.
    from flaxattn.kernels._blocked import _setup

    monkeypatch.setattr(_setup, "LONG_UNMASKED_FROM", 64)
    monkeypatch.setattr(_setup, "LONG_UNMASKED_BLOCKS", (64, 16))
    monkeypatch.setattr(_setup, "DEFAULT_BLOCK_Q", 32)
    monkeypatch.setattr(_setup, "DEFAULT_BLOCK_K", 32)
    assert _setup.default_block_sizes(128, 96, masked=False) == (64, 16)
    assert _setup.default_block_sizes(128, 96, masked=True) == (32, 32)
    assert _setup._backward_blocks(128, 96, 64, 16) == (32, 32)
    assert _setup._backward_blocks(128, 80, 64, 16) == (32, 16)  # 32 does not divide 80
    q, k, v = _inputs(B=1, T=128, S=96, N=2, K=1)
    bias = jnp.asarray(0.1 * np.random.default_rng(3).standard_normal((1, 2, 128, 96)), jnp.float32)
    _compare(q, k, v, bias, block_sizes=None)


def test_document_mask_mod_closing_over_traced_ids():
    # mask_mod closes over arrays that are jit arguments: works, and grads flow to q, k, v.
    q, k, v = _inputs(B=1, T=24, S=24)
    ids = jnp.array([0] * 7 + [1] * 10 + [2] * 7)

    @_jit
    def both(q, k, v, ids):
        mod = flaxattn.kernels.document_mask_mod(ids)
        blocked = lambda q: _blocked(q, k, v, mask_mod=mod, causal=True)[0].sum()
        naive = lambda q: _naive(q, k, v, mask_mod=mod, causal=True)[0].sum()
        return jax.grad(blocked)(q), jax.grad(naive)(q)

    got, want = both(q, k, v, ids)
    np.testing.assert_allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------------------- empty rows


def test_fully_masked_rows_are_zero_with_finite_gradients():
    q, k, v = _inputs(B=3, T=19, S=37)
    mask = np.ones((3, 1, 19, 37), bool)
    mask[:, :, 4] = False  # row 4 hidden everywhere
    kw = dict(
        mask=mask,
        q_lengths=jnp.array([19, 12, 19]),  # rows 12.. of example 1 are padding
        kv_lengths=jnp.array([37, 37, 0]),  # example 2 sees no key at all
    )
    out, lse, grads = _compare(q, k, v, **kw)
    assert np.all(out[:, 4] == 0) and np.all(np.isneginf(lse[:, :, 4]))
    assert np.all(out[1, 12:] == 0) and np.all(out[2] == 0)
    assert np.all(grads[0][2] == 0) and np.all(grads[0][1, 12:] == 0)


def test_rows_before_the_first_key_under_bottom_right_causal():
    # T > S, bottom-right: the first T - S queries precede every key.
    q, k, v = _inputs(B=1, T=30, S=10)
    out, lse, _ = _compare(q, k, v, causal=True, alignment="bottom_right")
    assert np.all(out[:, :20] == 0) and np.all(np.isneginf(lse[:, :, :20]))


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_within_tolerance_of_float32(dtype):
    """bf16/fp16 inputs give the input dtype out; stated tolerance: 1e-2 absolute on unit-
    normal inputs (the float32 result of the same rounded inputs, then one output rounding)."""
    q, k, v = _inputs(dtype=dtype)
    blocked = functools.partial(_blocked, causal=True)
    out, lse, grads = _outputs_and_grads(blocked, q, k, v, None)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_out, ref_lse, ref_grads = _outputs_and_grads(
        functools.partial(_naive, causal=True), *f32, None
    )
    assert out.dtype == dtype and lse.dtype == jnp.float32
    np.testing.assert_allclose(out.astype(jnp.float32), ref_out, atol=1e-2)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-3)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(g.astype(jnp.float32), r, atol=5e-2, rtol=5e-2)


SCALE_PLACEMENTS = [
    # (case, scale, with bias, where _prepare puts the scale)
    ("positive float: max on raw products", 0.3, False, "softmax"),
    ("with a bias: scaled score tile", 0.3, True, "scores"),
    ("negative float", -0.3, False, "scores"),
    ("traced scale", jnp.float32(0.3), False, "scores"),
]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("case,scale,with_bias,placement", SCALE_PLACEMENTS,
                         ids=[c[0] for c in SCALE_PLACEMENTS])
def test_low_precision_scale_placements(dtype, case, scale, with_bias, placement):
    """16-bit products take unscaled inputs; wherever the scale is then applied, the result is
    the float32 attention of the same rounded inputs, forward and gradients."""
    q, k, v = _inputs(T=21, S=35, dtype=dtype)
    bias = None
    if with_bias:
        bias = jnp.asarray(np.random.default_rng(3).standard_normal((1, 4, 21, 35)), dtype)
    kw = dict(visibility=Visibility(is_causal=True), scale=scale, block_sizes=BLOCKS)
    prepared = prepare(q, k, v, bias, None, kw["visibility"], None, scale, None, None, BLOCKS)
    assert prepared.tiling.scale_at == placement and prepared.tiling.dtype == dtype

    out, lse, grads = _outputs_and_grads(
        lambda q, k, v, *b: blocked_attention(q, k, v, bias=b[0] if b else None, **kw),
        q, k, v, bias,
    )
    f32 = [None if x is None else x.astype(jnp.float32) for x in (q, k, v, bias)]
    ref_out, ref_lse, ref_grads = _outputs_and_grads(
        lambda q, k, v, *b: naive_attention(
            q, k, v, bias=b[0] if b else None, scale=float(scale), causal=True
        ),
        *f32,
    )
    np.testing.assert_allclose(out.astype(jnp.float32), ref_out, atol=1e-2)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-3)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g.astype(jnp.float32), r, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_products_take_the_input_dtype_and_accumulate_in_float32(dtype):
    """Every matmul of the forward and backward multiplies operands of the input dtype (16-bit
    stays 16-bit: bf16 dots run on AMX or tensor cores) and accumulates in float32."""
    q, k, v = _inputs(dtype=dtype)
    f = lambda q, k, v: blocked_attention(q, k, v, scale=0.5, block_sizes=BLOCKS)[0].sum()
    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    def dots(jaxpr, in_loop=False):  # the tile products: dots inside the block loops
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and in_loop:
                yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from dots(sub, in_loop or eqn.primitive.name == "while")

    found = list(dots(jaxpr.jaxpr))
    assert len(found) >= 7  # forward: QKᵀ, PV; backward: QKᵀ, dV, dP, dK, dQ
    for eqn in found:
        assert [x.aval.dtype for x in eqn.invars] == [dtype, dtype], eqn
        assert eqn.outvars[0].aval.dtype == jnp.float32, eqn


# ----------------------------------------------------------------------------- transformations


def _public(q, k, v, **kw):
    return flaxattn.dot_product_attention(q, k, v, implementation="blocked", block_sizes=BLOCKS,
                                          **kw)


def test_public_entry_matches_reference_with_residual():
    q, k, v = _inputs(B=2, T=33, S=45, N=4, K=2)
    lengths = jnp.array([45, 20])
    kw = dict(is_causal=True, key_value_seq_lengths=lengths, causal_alignment="bottom_right",
              local_window_size=(9, 0), return_residual=True)
    def run(impl):
        attn = lambda q, k, v: flaxattn.dot_product_attention(
            q, k, v, implementation=impl, block_sizes=BLOCKS, **kw
        )
        # A loss through both outputs of the public function (the residual is the lse).
        loss = lambda *a: sum(
            jnp.sum(jnp.sin(jnp.where(jnp.isfinite(x), x, 0.0))) for x in attn(*a)
        )
        return attn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)

    (out, res), grads = _jit(lambda: run("blocked"))()
    (ref_out, ref_res), ref_grads = _jit(lambda: run("reference"))()
    np.testing.assert_allclose(out, ref_out, atol=2e-5)
    np.testing.assert_allclose(res, ref_res, atol=2e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-4)


def test_default_implementation_uses_blocked_for_long_keys():
    q, k, v = _inputs(B=1, T=8, S=300, N=2, K=1)
    out = _jit(lambda q, k, v: flaxattn.dot_product_attention(q, k, v, is_causal=True))(q, k, v)
    want = naive_attention(q, k, v, causal=True)[0]
    np.testing.assert_allclose(out, want, atol=2e-5)


def test_vmap_over_an_extra_leading_axis():
    q, k, v = _inputs(B=2, T=19, S=37)
    qs, ks, vs = (jnp.asarray(np.stack([x, 2.0 * x, -x])) for x in (q, k, v))
    lengths = jnp.array([[37, 5], [10, 37], [0, 20]])

    def one(q, k, v, lengths):
        return _public(q, k, v, is_causal=True, key_value_seq_lengths=lengths)

    naive = lambda q, k, v, n: naive_attention(q, k, v, causal=True, kv_lengths=n)[0]

    def outputs_and_grads(attn):
        loss = lambda q, k, v, n: jnp.sum(jnp.sin(attn(q, k, v, n)))
        return _jit(lambda *a: (jax.vmap(attn)(*a), jax.vmap(jax.grad(loss))(*a)))(
            qs, ks, vs, lengths
        )

    got, grads = outputs_and_grads(one)
    want, want_grads = outputs_and_grads(naive)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(grads, want_grads, atol=1e-4)


def test_check_grads():
    q, k, v = _inputs(B=1, T=11, S=13, N=2, K=1, H=4)
    bias = jnp.asarray(0.1 * np.random.default_rng(5).standard_normal((1, 2, 11, 13), np.float32))
    fn = jax.jit(lambda q, k, v, bias: _blocked(q, k, v, bias, causal=True, window=(4, 2))[0])
    check_grads(fn, (q, k, v, bias), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)


def test_gradient_flows_into_arrays_that_score_mod_closes_over():
    q, k, v = _inputs(B=1, T=20, S=27)

    def loss(attn, table):
        mod = flaxattn.kernels.relative_bias_score_mod(table, 3)
        return jnp.sum(jnp.sin(attn(q, k, v, score_mod=mod, causal=True)[0]))

    table = jnp.asarray(np.linspace(-1.0, 1.0, 7, dtype=np.float32))
    got = _jit(jax.grad(functools.partial(loss, _blocked)))(table)
    want = _jit(jax.grad(functools.partial(loss, _naive)))(table)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got).max() > 1e-2


# ----------------------------------------------------------------------------- memory, skipping


def test_compiled_temp_memory_grows_linearly():
    """Temp bytes of forward and forward+backward at T = 1024, 2048, 4096: each doubling of T
    at most x2.5 (quadratic would be x4), and far below one [N, T, S] float32 array."""

    def temp(T, backward):
        x = jax.ShapeDtypeStruct((1, T, 4, 32), jnp.float32)
        fwd = lambda q, k, v: blocked_attention(
            q, k, v, visibility=Visibility(is_causal=True), scale=0.2, block_sizes=(128, 128)
        )[0]
        fn = fwd if not backward else lambda q, k, v, do: jax.vjp(fwd, q, k, v)[1](do)
        args = (x,) * (4 if backward else 3)
        # As flaxattn.bench.compiled_temp_bytes, with the fast-compile options (they
        # leave buffer assignment, hence the figure, unchanged).
        return _jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

    for backward in (False, True):
        sizes = [temp(T, backward) for T in (1024, 2048, 4096)]
        assert sizes[1] <= 2.5 * sizes[0] and sizes[2] <= 2.5 * sizes[1], sizes
        assert sizes[2] < 4 * 4096 * 4096 * 4 / 16, sizes


def _block_counter(**kw):
    """A compiled forward (T = S = 128, blocks of 16, so 8 x 8 blocks) whose mask_mod reports
    each evaluation, i.e. each computed block; returns `count(q_len, kv_len)`."""
    calls = []

    def counting_mod(q_idx, kv_idx):
        jax.debug.callback(lambda i, j: calls.append((int(i), int(j))), q_idx[0, 0], kv_idx[0, 0])
        return jnp.ones((q_idx.shape[0], kv_idx.shape[1]), bool)

    q, k, v = _inputs(B=1, T=128, S=128, N=2, K=1)
    run = _jit(lambda q_len, kv_len: _blocked(
        q, k, v, block_sizes=(16, 16), mask_mod=counting_mod, q_lengths=q_len, kv_lengths=kv_len,
        **kw,
    )[0])

    def count(q_len=128, kv_len=128):
        calls.clear()
        jax.block_until_ready(run(jnp.array([q_len]), jnp.array([kv_len])))
        jax.effects_barrier()
        assert len(set(calls)) == len(calls)  # each block once
        return len(calls)

    return count


def test_masked_blocks_are_skipped_not_computed():
    # The loop bounds are runtime values: one compiled program, different lengths.
    count = _block_counter()
    assert count() == 64
    assert count(kv_len=40) == 24  # only 3 key blocks hold keys
    assert count(q_len=20) == 16  # query blocks past q_len are skipped entirely
    assert count(q_len=0, kv_len=0) == 0
    assert _block_counter(causal=True)() == 36  # lower triangle + diagonal
    # Window of +-10 around the diagonal: each query block touches 2 or 3 key blocks.
    assert _block_counter(window=(10, 10))() == 22


# ----------------------------------------------------------------------------- sequence pieces


def test_explicit_limits_and_grads_of_key_pieces_sum_to_the_whole():
    """`limits=` places queries against one piece of the keys (the offset is the position of
    query 0 relative to the piece's first key), and `blocked_attention_grads` with the whole
    attention's `(out, lse)` gives that piece's exact share: the shares of two pieces sum to
    the naive reference's gradients, and the pieces' outputs merge to the naive output."""
    from flaxattn.kernels._blocked import blocked_attention_grads
    from flaxattn.kernels._visibility import Limits

    B, T, S, N, K, H, split = 2, 37, 53, 4, 2, 16, 20
    q, k, v = _inputs(B, T, S, N, K, H, seed=3)
    do = jax.random.normal(jax.random.key(4), (B, T, N, H))
    q_len, kv_len = jnp.array([30, 37]), jnp.array([53, 40])
    offset = kv_len - q_len  # bottom-right alignment, written out
    naive = lambda q, k, v: naive_attention(
        q, k, v, scale=0.3, causal=True, alignment="bottom_right", q_lengths=q_len,
        kv_lengths=kv_len,
    )[0]
    out, vjp = jax.vjp(naive, q, k, v)
    dq, dk, dv = vjp(do)
    # The whole attention's lse, from the kernel over all keys (checked against naive first).
    vis = Visibility(is_causal=True)
    whole = Limits(q_len, kv_len, offset)
    o_all, lse = blocked_attention(q, k, v, visibility=vis, limits=whole, scale=0.3,
                                   block_sizes=BLOCKS)
    np.testing.assert_allclose(o_all, out, atol=2e-5)
    pieces = [
        (slice(0, split), Limits(q_len, jnp.minimum(kv_len, split), offset)),
        (slice(split, S), Limits(q_len, jnp.clip(kv_len - split, 0, None), offset - split)),
    ]
    grads = [
        blocked_attention_grads(
            q, k[:, keys], v[:, keys], out, lse, do, visibility=vis, limits=lim, scale=0.3,
            block_sizes=BLOCKS,
        )
        for keys, lim in pieces
    ]
    np.testing.assert_allclose(grads[0][0] + grads[1][0], dq, atol=2e-5)
    np.testing.assert_allclose(jnp.concatenate([g[1] for g in grads], 1), dk, atol=2e-5)
    np.testing.assert_allclose(jnp.concatenate([g[2] for g in grads], 1), dv, atol=2e-5)
    parts = [
        blocked_attention(q, k[:, keys], v[:, keys], visibility=vis, limits=lim, scale=0.3)
        for keys, lim in pieces
    ]
    top = jnp.maximum(parts[0][1], parts[1][1])
    w = [jnp.exp(jnp.where(jnp.isfinite(lse_i), lse_i - top, -jnp.inf)) for _, lse_i in parts]
    merged = sum(o * jnp.moveaxis(wi / (w[0] + w[1]), 2, 1)[..., None]
                 for (o, _), wi in zip(parts, w, strict=True))
    valid = (jnp.arange(T)[None, :] < q_len[:, None])[:, :, None, None]
    np.testing.assert_allclose(jnp.where(valid, merged, 0.0), jnp.where(valid, out, 0.0),
                               atol=2e-5)


@pytest.mark.parametrize("T", [256, 1024])
def test_bfloat16_gradients_with_one_and_several_query_blocks(T):
    """bf16 backward at H=64 with one query block (T=256) and several (T=1024): XLA:CPU once
    failed at run time ('no bf16 x bf16 = f32 DotThunk') on the single-block layout."""
    from flaxattn.testing import GRAD_TOLERANCES, reference

    r = np.random.default_rng(0)
    q, k, v, dout = (r.standard_normal((1, T, 2, 64)).astype(np.float32) for _ in range(4))
    cast = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, dout)]
    fn = lambda q, k, v: flaxattn.dot_product_attention(q, k, v, implementation="blocked")
    grads = jax.jit(lambda q, k, v, d: jax.vjp(fn, q, k, v)[1](d))(*cast)  # as in a train step
    rounded = [np.asarray(x.astype(jnp.float32)) for x in cast]
    want = reference(*rounded[:3], d_out=rounded[3]).grads
    for got, expected in zip(grads, want[:3], strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float32), expected,
                                   **GRAD_TOLERANCES["bfloat16"])  # fmt: skip
