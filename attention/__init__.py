"""linvid attention library: softmax, linear, HLA and MHLA behind one interface.

Functional cores (efficient; quadratic oracles in :mod:`attention.reference`)::

    softmax_attention(q, k, v)
    linear_attention(q, k, v, *, normalize=True, eps=1e-6)
    hla_attention(q_factors, k_factors, v, *, normalize=True, eps=1e-6)
    mhla_attention(q, k, v, block_index, mixing, *, normalize=True, eps=1e-6)

Layers for the DiT are built from config nodes with :func:`build_attention` /
:func:`build_attention_layers`; 3D RoPE lives in :class:`Rope3D`.
"""

from .functional import hla_attention, linear_attention, mhla_attention, softmax_attention
from .layers import (
    AttentionLayer,
    Constrained,
    HLAAttention,
    LinearAttention,
    MHLAAttention,
    SoftmaxAttention,
    mhla_auto_layout,
    mhla_block_index,
    mhla_locality_mixing,
    mhla_valid_layouts,
    constrain_,
)
from .registry import ATTENTION_LAYERS, build_attention, build_attention_layers, layer_configs
from .rope import Rope3D

__all__ = [
    "softmax_attention",
    "linear_attention",
    "hla_attention",
    "mhla_attention",
    "AttentionLayer",
    "Constrained",
    "constrain_",
    "SoftmaxAttention",
    "LinearAttention",
    "HLAAttention",
    "MHLAAttention",
    "ATTENTION_LAYERS",
    "build_attention",
    "build_attention_layers",
    "layer_configs",
    "mhla_auto_layout",
    "mhla_block_index",
    "mhla_locality_mixing",
    "mhla_valid_layouts",
    "Rope3D",
]
