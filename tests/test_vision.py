"""Image modules: ViT, SE, CBAM and the CNN; shapes, jit/grad, capture leaves outputs alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxattn import analysis
from flaxattn.nn import (
    CBAM,
    CNNClassifier,
    PatchEmbedding,
    SqueezeExcitation,
    VisionTransformer,
    capture_attention,
    capture_image_attention,
    head_interventions,
    sinusoidal_2d,
)


def _images(B=2, H=8, W=8, C=1, seed=0):
    return jax.random.uniform(jax.random.key(seed), (B, H, W, C))


def test_patch_embedding_order_and_errors():
    emb = PatchEmbedding(4, 1, 16, rngs=nnx.Rngs(0))
    x = _images(H=8, W=12)
    out = emb(x)
    assert out.shape == (2, 6, 16)
    # Patch (0, 1) is token 1: it holds pixels [0:4, 4:8].
    patch = x[:, 0:4, 4:8, :].reshape(2, 16)
    np.testing.assert_allclose(out[:, 1], emb.proj(patch), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of patch"):
        emb(_images(H=6, W=8))


def test_patch_embedding_rejects_rank3(unchecked):
    emb = PatchEmbedding(4, 1, 16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="images must be"):
        emb(jnp.zeros((2, 8, 8)))


def test_sinusoidal_2d_distinguishes_every_patch():
    pe = np.asarray(sinusoidal_2d(3, 4, 16))
    assert pe.shape == (12, 16)
    assert len({row.tobytes() for row in pe}) == 12


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "relative"])
def test_vit_shapes_grad_capture(positional):
    model = VisionTransformer((8, 8), 2, 1, 10, d_model=16, num_heads=2, num_layers=2, d_ff=32,
                              positional=positional, rngs=nnx.Rngs(0))
    x = _images()
    logits = nnx.jit(lambda m, x: m(x))(model, x)
    assert logits.shape == (2, 10)
    out, captured = capture_attention(model, x)
    np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-5)
    assert len(captured) == 2
    for w in captured.values():
        assert w.shape == (2, 2, 17, 17)
    maps = analysis.rollout_maps(list(captured.values()), grid=model.grid, prefix=1)
    assert maps.shape == (2, 2, 4, 4)

    def loss(m):
        return m(x).sum()

    grads = nnx.grad(loss)(model)
    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0


def test_vit_head_interventions_change_output():
    model = VisionTransformer((8, 8), 4, 1, 10, d_model=16, num_heads=2, num_layers=1, d_ff=32,
                              rngs=nnx.Rngs(0))
    x = _images()
    base = model(x)
    with head_interventions(model, masks={"layers/0/self_attention": [True, False]}):
        ablated = model(x)
    assert not np.allclose(base, ablated)
    np.testing.assert_allclose(model(x), base)


def test_vit_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positional"):
        VisionTransformer((8, 8), 2, 1, 10, positional="rope", rngs=nnx.Rngs(0))
    model = VisionTransformer((8, 8), 2, 1, 10, d_model=16, num_heads=2, num_layers=1, d_ff=16,
                              rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="images must be"):
        model(_images(H=4, W=8))


def test_se_and_cbam_blocks():
    x = _images(H=6, W=5, C=8)
    se = SqueezeExcitation(8, rngs=nnx.Rngs(0))
    w = se.weights(x)
    assert w.shape == (2, 8) and bool(((w > 0) & (w < 1)).all())
    np.testing.assert_allclose(se(x), x * w[:, None, None, :], rtol=1e-6)
    cbam = CBAM(8, kernel=3, rngs=nnx.Rngs(0))
    assert cbam(x).shape == x.shape
    assert cbam.spatial_map(x).shape == (2, 6, 5)


@pytest.mark.parametrize("block", ["se", "cbam"])
def test_cnn_capture_jit_grad(block):
    model = CNNClassifier(1, 10, widths=(4, 8), block=block, kernel=3, rngs=nnx.Rngs(0))
    x = _images(H=8, W=8)
    logits = nnx.jit(lambda m, x: m(x))(model, x)
    assert logits.shape == (2, 10)
    out, maps = capture_image_attention(model, x)
    np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-5)
    assert set(maps["channel"]) == {"blocks/0", "blocks/1"}
    assert maps["channel"]["blocks/1"].shape == (2, 8)
    if block == "cbam":
        assert maps["spatial"]["blocks/0"].shape == (2, 8, 8)
        assert maps["spatial"]["blocks/1"].shape == (2, 4, 4)
    else:
        assert maps["spatial"] == {}
    # Capture inside jit, and no state left behind afterwards.
    jitted = nnx.jit(lambda m, x: capture_image_attention(m, x))(model, x)
    np.testing.assert_allclose(jitted[1]["channel"]["blocks/0"], maps["channel"]["blocks/0"],
                               rtol=1e-5)
    assert not nnx.state(model, nnx.Intermediate)
    grads = nnx.grad(lambda m: m(x).sum())(model)
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)) > 0
