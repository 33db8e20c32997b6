"""The README's code examples run as written (the kernel and module sections).

Blocks are taken from the README itself, so the documentation cannot drift from the library.
The sharding example needs 8 devices and is covered by tests/test_ring.py instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = ("## Using the kernels in your own JAX code", "## Building models from flax.nnx")


def _python_blocks(section: str) -> list[str]:
    """The ```python blocks between `section` and the next `## ` heading."""
    text = README.read_text()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    body = text[start : end if end >= 0 else len(text)]
    return re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)


def test_kernel_examples_run_and_agree_with_jax_nn():
    blocks = _python_blocks(SECTIONS[0])
    assert len(blocks) == 2, "the kernel section's examples moved: update this test"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    import jax

    q, k, v, out = (namespace[name] for name in ("q", "k", "v", "out"))
    assert out.shape == q.shape
    assert namespace["weights"].shape == (2, 8, 1024, 1024)
    assert namespace["o"].shape == (1024, 64) and namespace["w"].shape == (1024, 1024)
    causal = jax.jit(lambda q, k, v: namespace["flaxattn"].dot_product_attention(
        q, k, v, is_causal=True))(q, k, v)
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(causal, expected, atol=2e-5)


def test_module_example_runs():
    (block,) = _python_blocks(SECTIONS[1])
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["logits"].shape == (2, 16, 100)
    assert namespace["text"].shape[0] == 2
    assert namespace["y"].shape == (2, 10, 64)
    assert namespace["captured"]


def test_the_implementation_table_is_the_registry():
    """The README's table of implementations is `support_table()`, so it cannot drift."""
    from flaxattn.kernels._registry import support_table

    assert support_table() in README.read_text()
