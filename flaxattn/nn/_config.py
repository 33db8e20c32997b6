"""`TransformerConfig`: the one frozen dataclass that sizes every Transformer model."""

from __future__ import annotations

import dataclasses

from flaxattn.kernels import get_implementation
from flaxattn.kernels._validate import check_choice
from flaxattn.nn._checks import check_positive

Positional = str  # one of "sinusoidal", "learned", "rope", "alibi", "t5", "none"
POSITIONAL = ("sinusoidal", "learned", "rope", "alibi", "t5", "none")
ACTIVATIONS = ("gelu", "relu")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes and choices of a Transformer (encoder, decoder, or both).

    Every field but `vocab_size` has a default small enough for a CPU. Invalid combinations
    raise a `ValueError` naming the field when the config is built.
    """

    vocab_size: int  # tokens in the (target) vocabulary; the output layer has this many logits
    d_model: int = 64  # width of the residual stream; must be divisible by num_heads
    num_heads: int = 4  # query heads N per attention layer
    num_kv_heads: int | None = None  # key/value heads K (None = num_heads); K < N gives GQA/MQA
    num_layers: int = 2  # layers in the decoder (and the encoder, unless num_encoder_layers)
    d_ff: int = 256  # hidden width of the position-wise feed-forward block
    max_len: int = 512  # longest sequence with positional='learned' (the table's size)
    dropout_rate: float = 0.0  # dropout on embeddings, sublayer outputs and the FFN hidden layer
    pre_ln: bool = True  # LayerNorm before each sublayer (pre-LN) or after the residual (post-LN)
    positional: Positional = "sinusoidal"  # how positions enter: added, rotated, or as a bias
    implementation: str | None = None  # attention implementation's name (None: the default rule)
    attention_dropout_rate: float = 0.0  # dropout on the attention weights
    num_encoder_layers: int | None = None  # encoder depth (None = num_layers)
    src_vocab_size: int | None = None  # encoder vocabulary (None = vocab_size)
    activation: str = "gelu"  # nonlinearity of the feed-forward block
    normalize_qk: bool = False  # LayerNorm on queries and keys per head (ViT-22B)
    use_bias: bool = True  # biases in the q/k/v/out projections
    tie_embeddings: bool = False  # output logits reuse the (target) token embedding matrix
    rope_base: float = 10_000.0  # RoPE wavelength base (positional='rope')
    t5_num_buckets: int = 32  # relative-position buckets (positional='t5')
    t5_max_distance: int = 128  # distance at which T5 buckets saturate (positional='t5')

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_len"):
            check_positive(name, getattr(self, name))
        for name in ("num_kv_heads", "num_encoder_layers", "src_vocab_size"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})."
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})."
            )
        for name in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        check_choice("positional", self.positional, POSITIONAL)
        check_choice("activation", self.activation, ACTIVATIONS)
        if self.implementation is not None:
            get_implementation(self.implementation)  # unknown names list the registered ones
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError(
                f"positional='rope' needs an even head dim, got d_model / num_heads = "
                f"{self.head_dim}."
            )
        if self.positional == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"positional='sinusoidal' needs an even d_model, got {self.d_model}.")

    @property
    def kv_heads(self) -> int:
        """K, the number of key/value heads."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        """H = d_model / num_heads."""
        return self.d_model // self.num_heads

    @property
    def encoder_layers(self) -> int:
        """Depth of the encoder stack."""
        return self.num_layers if self.num_encoder_layers is None else self.num_encoder_layers

    @property
    def source_vocab_size(self) -> int:
        """Vocabulary of the encoder's input tokens."""
        return self.vocab_size if self.src_vocab_size is None else self.src_vocab_size

