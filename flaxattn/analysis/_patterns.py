"""What pattern a head follows: scores of attention weights against known target patterns.

Each score is the mean, over the valid query rows that have a target, of the attention mass a
head puts on the target keys of the row (1 = always exactly there, 0 = never). Weights are
``[B, N, T, S]`` (self-attention, T = S, key j at the same position as query j), validity as in
:mod:`flaxattn.analysis._stats` (``query_lengths`` / ``key_lengths`` ``[B]``, ``mask``).

- previous-token: the key just before the query (``j = i - 1``);
- induction (Olsson et al. 2022): the keys just after an earlier occurrence of the query's
  token (``j - 1 < i`` with ``tokens[j - 1] == tokens[i]``): the head that copies what came
  next last time;
- diagonal / anti-diagonal: ``j = i + offset`` / ``j = S_b - 1 - i`` (S_b the valid keys);
- sink: the first key;
- positional: how much of a head's weight variance is the same on every input, ``1 - mean over
  cells of the variance across examples / the total variance`` (1: a fixed pattern, position
  only; near 0: the pattern depends on the content).

Like the rest of :mod:`flaxattn.analysis`, numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from flaxattn.analysis._stats import _reduce, row_distributions, sink_mass

PATTERN_SCORES = ("previous_token", "induction", "diagonal", "anti_diagonal", "sink",
                  "positional")


def _target_score(weights, target: np.ndarray, query_lengths, key_lengths, mask) -> np.ndarray:
    """Mean mass on the boolean ``target [B, 1|N, T, S]`` over valid rows with a target: [N]."""
    p, valid, rows = row_distributions(weights, query_lengths, key_lengths, mask)
    target = np.broadcast_to(target, p.shape) & valid
    rows = rows & target.any(-1)
    return _reduce(np.where(target, p, 0.0).sum(-1), rows, per_example=False)


def _shape(weights) -> tuple[int, int, int, int]:
    shape = np.shape(weights)
    if len(shape) != 4:
        raise ValueError(f"weights must have shape [B, N, T, S], got shape {shape}")
    return shape


def diagonal_score(weights, *, offset: int = 0, query_lengths=None, key_lengths=None,
                   mask=None) -> np.ndarray:
    """Mean weight on key ``i + offset`` for query ``i`` (offset -1: previous token): ``[N]``.

    Args:
      weights: ``[B, N, T, S]``.
      offset: key position minus query position.
      query_lengths, key_lengths: ``[B]`` valid lengths; mask: broadcastable to the weights.

    Returns:
      ``[N]``; NaN for a head with no row that has such a key.
    """
    _, _, T, S = _shape(weights)
    target = np.arange(S)[None, :] == np.arange(T)[:, None] + offset  # [T, S]
    return _target_score(weights, target[None, None], query_lengths, key_lengths, mask)


def previous_token_score(weights, *, query_lengths=None, key_lengths=None,
                         mask=None) -> np.ndarray:
    """Mean weight on the previous token (``diagonal_score`` with offset -1): ``[N]``."""
    return diagonal_score(weights, offset=-1, query_lengths=query_lengths,
                          key_lengths=key_lengths, mask=mask)


def anti_diagonal_score(weights, *, query_lengths=None, key_lengths=None,
                        mask=None) -> np.ndarray:
    """Mean weight on key ``S_b - 1 - i`` (the mirror position, S_b valid keys): ``[N]``."""
    B, _, T, S = _shape(weights)
    kl = np.full(B, S) if key_lengths is None else np.asarray(key_lengths).reshape(-1)
    if kl.shape != (B,):
        raise ValueError(f"key_lengths must have shape [{B}], got {kl.shape}")
    mirror = kl[:, None] - 1 - np.arange(T)[None, :]  # [B, T]
    target = np.arange(S)[None, None, :] == mirror[:, :, None]  # [B, T, S]
    return _target_score(weights, target[:, None], query_lengths, key_lengths, mask)


def induction_target(tokens) -> np.ndarray:
    """``[B, T, T]`` bool: key ``j`` follows an earlier occurrence of query ``i``'s token.

    ``target[b, i, j] = j >= 1 and j - 1 < i and tokens[b, j - 1] == tokens[b, i]``: the keys
    an induction head attends to (``j <= i``, so causal attention can reach them).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [B, T], got shape {tokens.shape}")
    B, T = tokens.shape
    before = np.concatenate([np.full((B, 1), -1), tokens[:, :-1]], axis=1)  # token at j - 1
    same = tokens[:, :, None] == before[:, None, :]  # [B, T(i), T(j)]
    earlier = (np.arange(T)[None, :] >= 1) & (np.arange(T)[None, :] - 1 < np.arange(T)[:, None])
    return same & earlier[None]


def induction_score(weights, tokens, *, query_lengths=None, key_lengths=None,
                    mask=None) -> np.ndarray:
    """Mean weight on the tokens after earlier occurrences of the query's token: ``[N]``.

    Args:
      weights: ``[B, N, T, T]`` self-attention weights.
      tokens: ``[B, T]`` the input tokens.
      query_lengths, key_lengths: ``[B]`` valid lengths; mask: broadcastable to the weights.

    Returns:
      ``[N]``, over the rows whose token occurred before (NaN for a head with none).
    """
    B, _, T, S = _shape(weights)
    if np.shape(tokens) != (B, T) or S != T:
        raise ValueError(f"tokens must have shape [B, T] = [{B}, {T}] for self-attention "
                         f"weights [B, N, T, T], got tokens {np.shape(tokens)}, S={S}")
    return _target_score(weights, induction_target(tokens)[:, None], query_lengths, key_lengths,
                         mask)


def positional_score(weights, *, query_lengths=None, key_lengths=None, mask=None) -> np.ndarray:
    """Share of the weights' variance that is the same on every input: ``[N]``.

    ``1 - mean_{i,j} Var_b w[b, n, i, j] / Var_{b,i,j} w[b, n, i, j]`` over the valid cells
    (cells valid in every example): 1 for a pattern fixed by position, near 0 when it follows
    the content. Needs B >= 2.
    """
    B = _shape(weights)[0]
    if B < 2:
        raise ValueError(f"positional_score needs at least 2 examples, got B={B}")
    p, valid, _ = row_distributions(weights, query_lengths, key_lengths, mask)
    cells = valid.all(axis=0)  # [N, T, S]: compared across every example
    within = p.var(axis=0)  # [N, T, S]
    out = np.full(p.shape[1], np.nan)
    for n in range(p.shape[1]):
        c = cells[n]
        total = p[:, n][:, c].var()
        if c.any() and total > 0:
            out[n] = 1.0 - within[n][c].mean() / total
    return out


def pattern_scores(
    layers: Mapping[str, np.ndarray],
    tokens=None,
    *,
    query_lengths=None,
) -> dict[str, np.ndarray]:
    """Every score of :data:`PATTERN_SCORES` for each self-attention layer: ``{name: [L, N]}``.

    Args:
      layers: ``{layer path: weights [B, N, T, T]}`` (e.g. from ``capture_attention``), rows
        in the order given.
      tokens: ``[B, T]`` input tokens, for the induction score (NaN without them).
      query_lengths: ``[B]`` valid lengths (keys too: self-attention).

    Returns:
      ``{score: [L, max N]}`` (NaN where a layer has fewer heads or a score has no rows).
    """
    names = list(layers)
    if not names:
        raise ValueError("pattern_scores needs at least one layer")
    n_max = max(_shape(layers[k])[1] for k in names)
    out = {k: np.full((len(names), n_max), np.nan) for k in PATTERN_SCORES}
    lengths = dict(query_lengths=query_lengths, key_lengths=query_lengths)
    for row, name in enumerate(names):
        w = np.asarray(layers[name], dtype=np.float64)
        N = w.shape[1]
        out["previous_token"][row, :N] = previous_token_score(w, **lengths)
        out["diagonal"][row, :N] = diagonal_score(w, **lengths)
        out["anti_diagonal"][row, :N] = anti_diagonal_score(w, **lengths)
        out["sink"][row, :N] = sink_mass(w, **lengths)
        if w.shape[0] >= 2:
            out["positional"][row, :N] = positional_score(w, **lengths)
        if tokens is not None:
            out["induction"][row, :N] = induction_score(w, tokens, **lengths)
    return out
