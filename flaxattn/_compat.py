"""Values kept only for the deprecated names of `flaxattn._deprecated` (removed in 0.3)."""

from flaxattn.kernels import implementations

# What `choose_implementation` now reads from the registry's 'blocked' entry.
BLOCKED_MIN_KV_LENGTH = implementations()["blocked"].min_kv_length
# The old tuple of names; the registry (`flaxattn.kernels.implementations()`) replaces it.
IMPLEMENTATIONS = tuple(implementations())
