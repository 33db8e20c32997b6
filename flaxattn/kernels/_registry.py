"""The registry of implementations: one object per backend, stating once what it supports.

Each backend module builds one `Implementation` (its `run`, the features it supports, the
dtypes and platforms it runs on) and calls `register` once; `flaxattn.kernels` imports the
backend modules, so importing flaxattn fills the registry. Everything that needs to know what
an implementation can do asks it here: `dot_product_attention`, `choose_implementation`, the
modules, the ring's fallback policy and the benchmarks. "Implementation X does not support Y"
is raised in exactly one place, `Implementation.check`, with the same wording for every backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import jax

from flaxattn.kernels._call import Call, Result

# Every feature a call can need, with how error messages name it (the argument that asks
# for it). `Call.uses(feature)` tells whether a call needs one.
FEATURES: dict[str, str] = {
    "bias": "bias",
    "mask": "mask",
    "causal": "is_causal",
    "bottom_right": "causal_alignment='bottom_right'",
    "window": "local_window_size",
    "lengths": "query_seq_lengths / key_value_seq_lengths",
    "gqa": "grouped-query attention (K < N)",
    "value_head_dim": "a value head dim Hv != H",
    "score_mod": "score_mod",
    "mask_mod": "mask_mod",
    "mod_arrays": "a score_mod or mask_mod that closes over arrays",
    "dropout": "dropout_rate",
    "weights": "return_weights",
    "residual": "return_residual",
    "traced_scale": "a traced scale",
}
ALL_FEATURES = frozenset(FEATURES)
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
PLATFORMS = frozenset({"cpu", "gpu", "tpu"})

Kind = str  # one of "exact", "pattern", "approximate"


@dataclasses.dataclass(frozen=True, eq=False)
class Implementation:
    """One attention implementation.

    Attributes:
      name: what `implementation=` takes.
      run: `run(call, **options) -> Result`; the call is validated already.
      description: one line for tables and `--help`.
      supports: the `FEATURES` it implements; a call that needs another one is refused.
      kind: `'exact'` (softmax attention, equal to the reference), `'pattern'` (exact
        softmax attention restricted to a fixed pattern: a window, a block layout) or
        `'approximate'` (a different similarity: linear attention, random features).
      dtypes: the input dtypes it takes.
      platforms: where it runs (`jax.default_backend()`: cpu, gpu, tpu).
      dtypes_on: per platform, the input dtypes it takes there if fewer than `dtypes`.
      options: keyword options of `run` beyond the call (e.g. a ring's `mesh`);
      required: the options without which it cannot run (then only its own entry point,
        which passes them, can call it).
      needs: `FEATURES` every call must use (a sliding-window implementation needs a window).
      min_kv_length: `choose_implementation` prefers it only from this many keys on.
      quadratic_memory: it materialises `[B, N, T, S]` logits or weights.
      bias_grad: gradients flow to `bias` (stated for the README's table).
      residual_grad: gradients flow through the logsumexp of `return_residual=True`; False
        for the jax.nn delegates, whose residual is a constant to autodiff (jax 0.10).
      zero_empty_rows: a query row with no visible key gives output 0 (flaxattn's convention);
        False for the jax.nn delegates, which give the average of all values there.
      interpreted: `platform -> bool`: it runs interpreted there (Pallas on CPU): correct,
        but not a timing.
    """

    name: str
    run: Callable[..., Result]
    description: str
    supports: frozenset[str] = ALL_FEATURES
    kind: Kind = "exact"
    dtypes: frozenset[str] = FLOAT_DTYPES
    platforms: frozenset[str] = PLATFORMS
    dtypes_on: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    needs: frozenset[str] = frozenset()
    min_kv_length: int = 0
    quadratic_memory: bool = False
    bias_grad: bool = True
    residual_grad: bool = True
    zero_empty_rows: bool = True
    interpreted: Callable[[str], bool] = lambda platform: False

    def __post_init__(self):
        unknown = (set(self.supports) | set(self.needs)) - ALL_FEATURES
        if unknown:
            raise ValueError(f"{self.name}: unknown features {sorted(unknown)}")

    def unavailable(self, platform: str | None = None) -> str | None:
        """Why it cannot run on `platform` (default: JAX's default backend), or None."""
        platform = jax.default_backend() if platform is None else platform
        if platform not in self.platforms:
            return (
                f"implementation={self.name!r} runs on {', '.join(sorted(self.platforms))}, "
                f"not on this machine's {platform!r} backend"
            )
        return None

    def available(self, platform: str | None = None) -> bool:
        """Whether it runs on `platform` (default: JAX's default backend)."""
        return self.unavailable(platform) is None

    def unsupported(self, call: Call) -> str | None:
        """The first thing `call` needs that this implementation lacks (its message), or None."""
        dtype = str(call.query.dtype)
        if dtype not in self.dtypes:
            return f"inputs of dtype {dtype}"
        platform = jax.default_backend()
        if dtype not in self.dtypes_on.get(platform, self.dtypes):
            return f"inputs of dtype {dtype} on the {platform!r} backend"
        for feature in FEATURES:
            if feature not in self.supports and call.uses(feature):
                return FEATURES[feature]
        return None

    def lacks(self, call: Call) -> str | None:
        """The first feature it needs that `call` does not use (its message), or None."""
        for feature in sorted(self.needs):
            if not call.uses(feature):
                return FEATURES[feature]
        return None

    def check(self, call: Call, **options) -> None:
        """Raise the registry's `ValueError` if this implementation cannot run `call` here."""
        why = self.unavailable()
        if why is not None:
            raise ValueError(f"{why}.")
        missing = [name for name in self.required if options.get(name) is None]
        if missing:
            raise ValueError(
                f"implementation={self.name!r} needs {', '.join(missing)}; call it through its "
                "own entry point (e.g. flaxattn.ring_attention / ring_attention_fn)."
            )
        what = self.unsupported(call)
        if what is not None:
            able = [i.name for i in _REGISTRY.values() if i.kind == "exact" and i.can_run(call)]
            others = f"; implementations that do: {', '.join(able)}" if able else ""
            raise ValueError(f"implementation={self.name!r} does not support {what}{others}.")
        what = self.lacks(call)
        if what is not None:
            raise ValueError(f"implementation={self.name!r} needs {what}.")

    def can_run(self, call: Call) -> bool:
        """Whether it runs `call` here without options of its own."""
        return (
            not self.required
            and self.unavailable() is None
            and self.unsupported(call) is None
            and self.lacks(call) is None
        )

    def __call__(self, call: Call, **options) -> Result:
        """`run(call, **options)` after `check`."""
        self.check(call, **options)
        return self.run(call, **options)


_REGISTRY: dict[str, Implementation] = {}

# `choose_implementation` tries these in order (see its docstring).
DEFAULT_ORDER = ("blocked", "reference")


def register(impl: Implementation, *, replace: bool = False) -> Implementation:
    """Add `impl` to the registry; a `ValueError` if its name is taken (unless `replace`)."""
    if not isinstance(impl, Implementation):
        raise TypeError(f"register takes an Implementation, got {type(impl).__name__}.")
    if impl.name in _REGISTRY and not replace:
        raise ValueError(f"an implementation named {impl.name!r} is already registered.")
    _REGISTRY[impl.name] = impl
    return impl


def implementations() -> dict[str, Implementation]:
    """Every registered implementation, by name, in registration order."""
    return dict(_REGISTRY)


def get_implementation(name: str) -> Implementation:
    """The implementation called `name`; a `ValueError` listing the names otherwise."""
    if isinstance(name, Implementation):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"implementation must be one of {list(_REGISTRY)}, got {name!r}.")
    return _REGISTRY[name]


def choose_implementation(
    *,
    kv_length: int,
    needs_weights: bool = False,
    dropout: bool = False,
    features: Iterable[str] = (),
    backend: str | None = None,
) -> str:
    """The rule that `implementation=None` follows; cheap and deterministic.

    The first implementation of `DEFAULT_ORDER` (`'blocked'`, then `'reference'`) that runs on
    this backend, supports every feature asked for and whose `min_kv_length` is reached.
    With the registry as shipped that means:

    1. Returning weights or applying dropout needs the `[T, S]` weights: `'reference'`.
    2. Fewer than 256 keys: `'reference'` (one fused softmax is fastest).
    3. Otherwise `'blocked'`: O(T) memory, skips masked blocks, on every backend.

    Args:
      kv_length: `S`, the number of keys.
      needs_weights: the weights are returned (feature `weights`).
      dropout: dropout on the weights (feature `dropout`).
      features: any other `FEATURES` the call needs.
      backend: the platform (default `jax.default_backend()`).

    Returns:
      The implementation's name.
    """
    wanted = set(features) | ({"weights"} if needs_weights else set())
    wanted |= {"dropout"} if dropout else set()
    for name in DEFAULT_ORDER:
        impl = _REGISTRY.get(name)
        if (
            impl is not None
            and impl.unavailable(backend) is None
            and wanted <= impl.supports
            and kv_length >= impl.min_kv_length
        ):
            return name
    raise ValueError(f"no implementation in {DEFAULT_ORDER} supports {sorted(wanted)}.")


def run(call: Call) -> Result:
    """Run `call` by the implementation it names, or by `choose_implementation`'s choice."""
    name = call.implementation
    if name is None:
        wanted = [f for f in FEATURES if f != "mod_arrays" and call.uses(f)]
        name = choose_implementation(kv_length=call.dims.S, features=wanted)
    return get_implementation(name)(call)


# The columns of `support_table`, in the order a reader compares backends.
_TABLE_FEATURES = ("mask", "bias", "causal", "bottom_right", "window", "lengths", "gqa",
                   "score_mod", "mask_mod", "dropout", "weights")  # fmt: skip


def support_table() -> str:
    """The registry as a markdown table: one row per implementation, one column per feature.

    The README's table is this output (a test keeps them equal), so the documentation cannot
    drift from what the implementations state.

    Returns:
      The table's markdown text, ending with a newline.
    """
    head = ["name", "kind", *_TABLE_FEATURES, "dtypes", "platforms", "O(T) memory"]
    rows = ["| " + " | ".join(f"`{h}`" if h in FEATURES else h for h in head) + " |",
            "|" + " --- |" * len(head)]  # fmt: skip
    for impl in _REGISTRY.values():
        cells = [f"`{impl.name}`", impl.kind]
        cells += ["yes" if f in impl.supports else "" for f in _TABLE_FEATURES]
        dtypes = ", ".join(d.replace("float", "f") for d in sorted(impl.dtypes))
        cells += [dtypes, ", ".join(sorted(impl.platforms)), "" if impl.quadratic_memory else "yes"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"

