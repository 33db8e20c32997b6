"""KV-cache decoding: token by token and chunk by chunk equal the full causal forward
(float32, 1e-5), with every positional scheme; generate / greedy_decode; cache errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from nn_testing import VOCAB, assert_close, rngs, tiny_config, tokens

import flaxattn.nn as fnn

T = 7
CHUNKS = (3, 1, 3)  # a prefill chunk, one token, then a chunk again


def _lm(**overrides) -> fnn.DecoderLM:
    return fnn.DecoderLM(tiny_config(**overrides), rngs=rngs())


def _feed(step, model: nnx.Module, toks: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
    """Logits of `toks` fed to `step(model, chunk)` in chunks of `sizes`, from a fresh cache
    longer than T (its empty slots must stay invisible)."""
    model.init_cache(toks.shape[0], T + 2)
    bounds = [0, *itertools.accumulate(sizes)]
    return np.concatenate([step(model, toks[:, a:b]) for a, b in itertools.pairwise(bounds)], 1)


@pytest.mark.parametrize(
    "positional, pre_ln, num_layers, implementation",
    [("rope", True, 2, None), ("sinusoidal", False, 1, "xla"), ("learned", True, 1, "blocked"),
     ("alibi", True, 1, None), ("t5", False, 1, None)],
)
def test_decoder_lm_cache_matches_full_forward(positional, pre_ln, num_layers, implementation):
    model = _lm(positional=positional, pre_ln=pre_ln, num_layers=num_layers,
                implementation=implementation)
    toks = tokens(0, (2, T))
    full = nnx.jit(lambda m, t: m(t))(model, toks)
    step = nnx.jit(lambda m, t: m(t, decode=True))  # one compile per chunk size
    assert_close(_feed(step, model, toks, (1,) * T), full)
    assert_close(_feed(step, model, toks, CHUNKS), full)


@pytest.mark.parametrize("positional", ["rope", "t5"])
def test_encoder_decoder_cache_matches_full_forward(positional):
    model = fnn.EncoderDecoderTransformer(tiny_config(positional=positional), rngs=rngs())
    src, tgt = tokens(1, (2, 5)), tokens(2, (2, T))
    src_lengths = np.array([5, 3], np.int32)
    memory = nnx.jit(lambda m: m.encode(src, src_lengths=src_lengths))(model)
    decode = lambda m, t, **kw: m.decode(t, memory, src_lengths=src_lengths, **kw)
    full = nnx.jit(decode)(model, tgt)
    step = nnx.jit(lambda m, t: decode(m, t, decode=True))
    assert_close(_feed(step, model, tgt, (1,) * T), full)
    assert_close(_feed(step, model, tgt, CHUNKS), full)


def test_generate_greedy_follows_the_full_forward():
    model = _lm(positional="rope")
    prompt = tokens(3, (2, 3))
    out = model.generate(prompt, 4, rng=jax.random.key(0, impl="rbg"), greedy=True)
    assert out.shape == (2, 7) and out.dtype == jnp.int32
    assert_close(out[:, :3], prompt, atol=0)
    # Each new token is the argmax of the full (uncached) forward over what precedes it.
    logits = nnx.jit(lambda m, t: m(t))(model, out[:, :-1])
    assert_close(out[:, 3:], np.argmax(logits[:, 2:], axis=-1), atol=0)
    assert model.decoder.layers[0].self_attention.cache is None  # the model is untouched


def test_generate_sampling():
    model = _lm(positional="rope")
    prompt = tokens(3, (2, 3))
    key = lambda seed: jax.random.key(seed, impl="rbg")
    sample = lambda seed: model.generate(prompt, 5, rng=key(seed), temperature=2.0, top_k=3)
    first = sample(0)
    assert first.shape == (2, 8)
    assert np.all((first >= 0) & (first < VOCAB))
    assert_close(sample(0), first, atol=0)  # same key, same tokens
    assert not np.all(sample(1) == first)


def test_encoder_decoder_greedy_decode_follows_the_full_forward():
    model = fnn.EncoderDecoderTransformer(tiny_config(positional="learned"), rngs=rngs())
    src, src_lengths = tokens(1, (2, 5)), jnp.array([5, 3])
    out = model.greedy_decode(src, src_lengths, max_length=5, bos_id=1)
    assert out.shape == (2, 5)
    tgt_in = np.concatenate([np.ones((2, 1), np.int32), out[:, :-1]], axis=1)
    logits = nnx.jit(lambda m: m(src, tgt_in, src_lengths=src_lengths))(model)
    assert_close(out, np.argmax(logits, axis=-1), atol=0)


def test_cache_overflow_raises_and_never_wraps():
    layer = fnn.MultiHeadAttention(4, 16, rngs=rngs())
    x = np.ones((1, 3, 16), np.float32)
    layer.init_cache(1, 4)
    layer(x, decode=True, is_causal=True)
    with pytest.raises(ValueError, match=r"KV cache overflow: writing 3 position\(s\) at index 3 "
                                         r"goes past the cache's max_length=4"):
        layer(x, decode=True, is_causal=True)
    # Under jit the index is traced: the same check runs on the device's answer.
    layer.init_cache(1, 4)
    step = nnx.jit(lambda layer, x: layer(x, decode=True, is_causal=True))
    step(layer, x[:, :2])
    step(layer, x[:, :2])
    with pytest.raises(Exception, match="KV cache overflow.*max_length=4"):
        jax.block_until_ready(step(layer, x[:, :2]))


@pytest.mark.usefixtures("unchecked")
def test_model_errors():
    model = _lm(positional="learned")
    with pytest.raises(ValueError, match="decode=True needs a KV cache: call init_cache"):
        model(tokens(0, (1, 2)), decode=True)
    with pytest.raises(ValueError, match=r"max_length \(30\) exceeds max_len=24"):
        model.init_cache(1, 30)
    with pytest.raises(ValueError, match=r"sequence length 25 exceeds max_len=24"):
        model(tokens(0, (1, 25)))
    with pytest.raises(ValueError, match=r"KV cache of shape \(2, 4, 2, 4\)"):
        model.init_cache(2, 4)
        model(tokens(0, (3, 1)), decode=True)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(tokens(0, (1, 2)), 2, rng=jax.random.key(0, impl="rbg"), temperature=0.0)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 13\]"):
        model.generate(tokens(0, (1, 2)), 2, rng=jax.random.key(0, impl="rbg"), top_k=20)
    with pytest.raises(ValueError, match="prompt must be an int array"):
        model.generate(np.ones((1, 2)), 2, rng=jax.random.key(0, impl="rbg"))
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        fnn.EncoderDecoderTransformer(tiny_config(), rngs=rngs()).greedy_decode(
            tokens(0, (1, 2)), max_length=0, bos_id=1)
