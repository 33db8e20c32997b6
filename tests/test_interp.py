"""flaxattn.interp: hooks, ablation, patching and logit attribution on small real models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxattn import interp
from flaxattn.nn import (
    DecoderLM,
    EncoderDecoderTransformer,
    TransformerConfig,
    capture_attention,
)

LAYER0, LAYER1 = "decoder/layers/0/self_attention", "decoder/layers/1/self_attention"


def small_lm(**changes) -> DecoderLM:
    # no positions: the model code main checks strictly (rank promotion, jaxtyping) for all
    config = dict(vocab_size=13, d_model=16, num_heads=2, num_layers=2, d_ff=32,
                  positional="none")
    return DecoderLM(TransformerConfig(**{**config, **changes}), rngs=nnx.Rngs(0))


def tokens(seed: int, shape=(3, 9)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, 13)


def next_token_loss(model, b):
    logp = jax.nn.log_softmax(model(b[:, :-1]), axis=-1)
    return -jnp.take_along_axis(logp, b[:, 1:, None], axis=-1).mean()


def silence_head(model: DecoderLM, path: str, head: int) -> None:
    """Zero the head's rows of the output projection: its output provably never reaches the
    residual stream."""
    layer = interp.head_layers(model)[path]
    kernel = layer.out.kernel.get_value()  # [N, H, D]
    layer.out.kernel.set_value(kernel.at[head].set(0.0))


# ----------------------------------------------------------------------------- hooks


def test_head_layers_are_in_model_order_encoder_first_self_before_cross():
    config = TransformerConfig(vocab_size=7, d_model=8, num_heads=2, num_layers=2, d_ff=8,
                               positional="none")
    model = EncoderDecoderTransformer(config, rngs=nnx.Rngs(0))
    assert list(interp.head_layers(model)) == [
        "encoder/layers/0/self_attention", "encoder/layers/1/self_attention",
        "decoder/layers/0/self_attention", "decoder/layers/0/cross_attention",
        "decoder/layers/1/self_attention", "decoder/layers/1/cross_attention",
    ]
    assert list(interp.head_layers(model, "decoder/*/cross_attention")) == [
        "decoder/layers/0/cross_attention", "decoder/layers/1/cross_attention"]
    with pytest.raises(ValueError, match="matches no attention layer"):
        interp.head_layers(model, "nowhere/*")


def test_recorded_outputs_match_the_model_and_weights_match_capture_attention():
    model, b = small_lm(), tokens(0)
    logits, outputs = interp.record_heads(model, lambda m, x: m(x), b)
    np.testing.assert_allclose(logits, model(b), atol=1e-6)
    assert outputs[LAYER0].shape == (3, 9, 2, 8)  # [B, T, N, H]
    _, weights = interp.record_heads(model, lambda m, x: m(x), b, weights=True)
    _, captured = capture_attention(model, b)
    for path in (LAYER0, LAYER1):
        np.testing.assert_allclose(weights[path], captured[path], atol=1e-6)


def test_hooked_restores_the_kernel_after_an_error_and_rejects_unknown_layers():
    model = small_lm()
    layer = interp.head_layers(model)[LAYER0]
    before = layer.attention

    def broken(out, call):
        raise RuntimeError("inside the hook")

    with pytest.raises(RuntimeError, match="inside the hook"), interp.hooked(model,
                                                                             {LAYER0: broken}):
        model(tokens(0))
    assert layer.attention is before
    with pytest.raises(ValueError, match="not MultiHeadAttention layers"), interp.hooked(
        model, {"decoder/nowhere": broken}
    ):
        pass


def test_output_from_the_captured_pattern_reproduces_the_kernel_output_with_gqa():
    model, b = small_lm(num_heads=4, num_kv_heads=2), tokens(1)
    seen = {}

    def hook(out, call):
        seen["out"], seen["again"] = out, call.output_from(call.weights())
        return out

    with interp.hooked(model, {LAYER1: hook}):
        model(b)
    np.testing.assert_allclose(seen["again"], seen["out"], atol=1e-5)


# ----------------------------------------------------------------------------- ablation


def test_zero_ablation_matches_silencing_the_head_and_compiles_the_metric_once():
    model, b = small_lm(), tokens(2)
    traces = []

    def metric(m, x):
        traces.append(1)  # runs once per trace, not per head
        return next_token_loss(m, x)

    table = interp.ablate_heads(model, metric, b)
    assert table.shape == (2, 2)
    assert len(traces) == 1  # one program for all L * N ablations
    for row, path in enumerate((LAYER0, LAYER1)):
        for head in range(2):
            silenced = small_lm()  # the same parameters (same seed), one head's W_O rows zero
            silence_head(silenced, path, head)
            expected = next_token_loss(silenced, b)
            np.testing.assert_allclose(table[row, head], expected, rtol=1e-5)


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_ablating_a_provably_unused_head_changes_nothing(kind):
    model, b = small_lm(), tokens(3)
    silence_head(model, LAYER1, 1)
    clean = float(next_token_loss(model, b))
    table = interp.ablate_heads(model, next_token_loss, b, kind=kind, reference=tokens(4),
                                chunk=2)
    np.testing.assert_allclose(table[1, 1], clean, rtol=1e-6)
    used = np.delete(table.reshape(-1), 3)
    assert np.all(np.abs(used - clean) > 1e-4)  # the other heads do matter


def test_mean_ablation_replaces_a_head_with_its_reference_mean():
    model, b, reference = small_lm(), tokens(5), tokens(6, (4, 9))
    means = interp.mean_head_outputs(model, next_token_loss, reference)
    _, outs = interp.record_heads(model, next_token_loss, reference)
    np.testing.assert_allclose(means[LAYER0], outs[LAYER0].mean(axis=(0, 1)), atol=1e-6)
    table = interp.ablate_heads(model, next_token_loss, b, kind="mean", reference=reference)

    def replace(out, call):
        return out.at[:, :, 0].set(jnp.broadcast_to(means[LAYER0][0], out[:, :, 0].shape))

    with interp.hooked(model, {LAYER0: replace}):
        expected = next_token_loss(model, b)
    np.testing.assert_allclose(table[0, 0], expected, rtol=1e-5)


def test_ablation_rejects_bad_arguments():
    model, b = small_lm(), tokens(0)
    with pytest.raises(ValueError, match="kind must be one of"):
        interp.ablate_heads(model, next_token_loss, b, kind="half")
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        interp.ablate_heads(model, next_token_loss, b, chunk=0)


# ----------------------------------------------------------------------------- patching


@pytest.mark.parametrize("what", ["output", "pattern"])
def test_patching_a_run_into_itself_recovers_exactly_the_clean_metric(what):
    model, clean, corrupted = small_lm(), tokens(7), tokens(8)
    clean_m = float(next_token_loss(model, clean))
    corrupted_m = float(next_token_loss(model, corrupted))
    patched = interp.patch_heads(model, next_token_loss, clean, clean, what=what)
    np.testing.assert_allclose(patched, np.full((2, 2), clean_m), rtol=1e-6)
    recovered = interp.recovered_fraction(patched, clean_m, corrupted_m)
    np.testing.assert_allclose(recovered, np.ones((2, 2)), atol=1e-5)


def test_patching_moves_the_metric_towards_the_source_and_an_unused_head_not_at_all():
    model, clean, corrupted = small_lm(), tokens(9), tokens(10)
    silence_head(model, LAYER0, 0)
    table = interp.patching_table(model, next_token_loss, clean, corrupted, direction="noise")
    assert table["layers"] == [LAYER0, LAYER1]
    np.testing.assert_allclose(table["recovered"][0, 0], 1.0, atol=1e-5)  # unused: no change
    assert np.all(np.abs(table["recovered"].reshape(-1)[1:] - 1.0) > 1e-3)
    # denoising the other way round: the corrupted run with a clean head
    back = interp.patching_table(model, next_token_loss, clean, corrupted, direction="denoise")
    np.testing.assert_allclose(back["recovered"][0, 0], 0.0, atol=1e-5)


def test_patching_rejects_mismatched_batches_and_equal_metrics():
    model = small_lm()
    with pytest.raises(ValueError, match="same shapes"):
        interp.patch_heads(model, next_token_loss, tokens(0), tokens(1, (2, 9)))
    with pytest.raises(ValueError, match="what must be one of"):
        interp.patch_heads(model, next_token_loss, tokens(0), tokens(1), what="keys")
    with pytest.raises(ValueError, match="nothing to recover"):
        interp.recovered_fraction([1.0], 2.0, 2.0)


# ----------------------------------------------------------------------------- attribution


@pytest.mark.parametrize("tie_embeddings", [False, True], ids=["linear head", "tied"])
def test_logit_attribution_sums_with_the_residual_terms_to_the_logit(tie_embeddings):
    model = small_lm(tie_embeddings=tie_embeddings)
    b = tokens(11)
    out = interp.direct_logit_attribution(model, b[:, :-1], b[:, 1:])
    assert out["heads"].shape == (3, 8, 2, 2)  # [B, T, L, N]
    total = out["heads"].sum(axis=(-2, -1)) + out["rest"] + out["bias"]
    np.testing.assert_allclose(total, out["logit"], atol=1e-4)
    expected = jnp.take_along_axis(model(b[:, :-1]), b[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(out["logit"], expected, atol=1e-5)
    jitted = interp.attribution_fn(model)(b[:, :-1], b[:, 1:])
    np.testing.assert_allclose(jitted["heads"], out["heads"], atol=1e-5)


def test_logit_attribution_of_a_silenced_head_is_zero_and_post_ln_is_refused():
    model, b = small_lm(), tokens(12)
    silence_head(model, LAYER1, 0)
    out = interp.direct_logit_attribution(model, b, b)
    np.testing.assert_allclose(out["heads"][..., 1, 0], 0.0, atol=1e-7)
    with pytest.raises(ValueError, match="pre-LN"):
        interp.direct_logit_attribution(small_lm(pre_ln=False), b, b)
    # a ValueError, or jaxtyping's TypeError first when annotations are checked
    with pytest.raises((ValueError, TypeError), match="targets"):
        interp.direct_logit_attribution(model, b, b[:, :-1])


def test_ablating_heads_together_equals_silencing_them_all():
    model, b = small_lm(), tokens(13)
    together = interp.ablate_together(model, next_token_loss, b, {LAYER0: [0], LAYER1: [0, 1]})
    silenced = small_lm()
    for path, head in ((LAYER0, 0), (LAYER1, 0), (LAYER1, 1)):
        silence_head(silenced, path, head)
    np.testing.assert_allclose(together, next_token_loss(silenced, b), rtol=1e-5)
    one = interp.ablate_together(model, next_token_loss, b, {LAYER1: [1]}, kind="mean")
    np.testing.assert_allclose(one, interp.ablate_heads(model, next_token_loss, b,
                                                        kind="mean")[1, 1], rtol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        interp.ablate_together(model, next_token_loss, b, {LAYER1: [2]})
