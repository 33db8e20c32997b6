"""flaxattn.nn: flax.nnx modules and models, thin shells over `flaxattn.kernels`.

Modules hold parameters; every attention computation is a call to a kernel
(`flaxattn.dot_product_attention`, `flaxattn.scored_attention`, `flaxattn.additive_attention`).

- Attention layers: `MultiHeadAttention` (GQA, RoPE, KV cache, head interventions),
  `AdditiveAttention` (Bahdanau), `MultiplicativeAttention` (Luong "general").
- Positions: `sinusoidal_encoding`, `LearnedPositionalEmbedding`, `RoPE`/`apply_rope`,
  `T5RelativeBias`; ALiBi comes from `flaxattn.alibi_bias` through the `bias` path.
- Blocks and models: `TransformerEncoderLayer`, `TransformerDecoderLayer`, the stacks
  `TransformerEncoder`/`TransformerDecoder`, `EncoderDecoderTransformer`, `DecoderLM`,
  `TransformerClassifier`, `RNNAttentionClassifier`, `BahdanauSeq2Seq`, `NadarayaWatson`.
- Images: `VisionTransformer` (`PatchEmbedding`, 2-D positions), `SqueezeExcitation`, `CBAM`,
  `CNNClassifier`; `capture_image_attention` returns their channel / spatial weights.
- Analysis: `capture_attention` returns every attention layer's weights `[B, N, T, S]`;
  `head_interventions` ablates or scales chosen heads of a model.
- Interop with flax: `flax_attention_fn`, `from_flax_nnx`.
"""

from flaxattn.nn._attention import MultiHeadAttention
from flaxattn.nn._blocks import FeedForward, TransformerDecoderLayer, TransformerEncoderLayer
from flaxattn.nn._cache import KVCache
from flaxattn.nn._capture import (
    AttentionWeights,
    CapturedAttention,
    CaptureSpec,
    attention_kinds,
    attention_layers,
    capture_attention,
)
from flaxattn.nn._config import TransformerConfig
from flaxattn.nn._interop import flax_attention_fn, from_flax_nnx
from flaxattn.nn._interventions import HeadIntervention, head_interventions
from flaxattn.nn._kernel_regression import NadarayaWatson
from flaxattn.nn._models import DecoderLM, EncoderDecoderTransformer, TransformerClassifier
from flaxattn.nn._positional import (
    LearnedPositionalEmbedding,
    RoPE,
    T5RelativeBias,
    apply_rope,
    sinusoidal_encoding,
)
from flaxattn.nn._rnn import BahdanauSeq2Seq, RNNAttentionClassifier
from flaxattn.nn._scored_attention import AdditiveAttention, MultiplicativeAttention
from flaxattn.nn._stacks import TransformerDecoder, TransformerEncoder
from flaxattn.nn._vision import (
    CBAM,
    ChannelWeights,
    CNNClassifier,
    PatchEmbedding,
    RelativeBias2D,
    SpatialMap,
    SqueezeExcitation,
    VisionTransformer,
    capture_image_attention,
    image_attention_blocks,
    sinusoidal_2d,
)

__all__ = [
    "sinusoidal_2d",
    "image_attention_blocks",
    "capture_image_attention",
    "VisionTransformer",
    "SqueezeExcitation",
    "SpatialMap",
    "RelativeBias2D",
    "PatchEmbedding",
    "CNNClassifier",
    "ChannelWeights",
    "CBAM",
    "AdditiveAttention",
    "AttentionWeights",
    "BahdanauSeq2Seq",
    "CaptureSpec",
    "CapturedAttention",
    "DecoderLM",
    "EncoderDecoderTransformer",
    "FeedForward",
    "HeadIntervention",
    "KVCache",
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "MultiplicativeAttention",
    "NadarayaWatson",
    "RNNAttentionClassifier",
    "RoPE",
    "T5RelativeBias",
    "TransformerClassifier",
    "TransformerConfig",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "apply_rope",
    "attention_kinds",
    "attention_layers",
    "capture_attention",
    "flax_attention_fn",
    "from_flax_nnx",
    "head_interventions",
    "sinusoidal_encoding",
]
