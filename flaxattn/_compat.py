"""Values kept only for the deprecated names of `flaxattn._deprecated` (removed in 0.3)."""

from flaxattn.kernels import implementations

# What `choose_implementation` now reads from the registry's 'blocked' entry.
BLOCKED_MIN_KV_LENGTH = implementations()["blocked"].min_kv_length
# The old tuple of names: the general softmax implementations (0.1 had no others in it); the
# registry (`flaxattn.kernels.implementations()`) replaces it.
IMPLEMENTATIONS = tuple(
    name for name, impl in implementations().items()
    if impl.kind == "exact" and not impl.needs and not impl.required
)  # fmt: skip
