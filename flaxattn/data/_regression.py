"""Synthetic 1-D regression for Nadaraya-Watson attention pooling (Zhang et al., *Dive into
Deep Learning*, section 11.2): ``y = 2 sin(x) + x^0.8 + noise`` on ``x`` in ``[0, 5)``."""

from __future__ import annotations

import numpy as np


def regression_target(x: np.ndarray) -> np.ndarray:
    """The noise-free function being regressed."""
    return 2 * np.sin(x) + x**0.8


def nadaraya_watson_data(
    n_train: int = 50, n_test: int = 50, *, rng: np.random.Generator, noise: float = 0.5
) -> dict[str, np.ndarray]:
    """``x_train [n]`` (sorted), ``y_train [n]`` (noisy), ``x_test [m]`` (a grid), ``y_test [m]``
    (noise-free), all float32."""
    x_train = np.sort(rng.random(n_train) * 5).astype(np.float32)
    y_train = regression_target(x_train) + rng.normal(0.0, noise, n_train)
    x_test = np.linspace(0, 5, n_test, endpoint=False, dtype=np.float32)
    return dict(
        x_train=x_train,
        y_train=y_train.astype(np.float32),
        x_test=x_test,
        y_test=regression_target(x_test).astype(np.float32),
    )


def leave_one_out(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each training point, the keys and values of all the others: ``[n, n-1]`` each.

    Training a bandwidth against its own point would make the kernel collapse onto it.
    """
    n = len(x)
    others = ~np.eye(n, dtype=bool)  # row i: every point but i
    keys = np.broadcast_to(x, (n, n))[others].reshape(n, n - 1)
    values = np.broadcast_to(y, (n, n))[others].reshape(n, n - 1)
    return keys, values
