"""linvid attention library: softmax, linear, HLA and MHLA behind one interface.

Functional cores (efficient; quadratic oracles in :mod:`attention.reference`)::

    softmax_attention(q, k, v)
    linear_attention(q, k, v, *, normalize=True, eps=1e-6)
    hla_attention(q_factors, k_factors, v, *, normalize=True, eps=1e-6)
    hla_tied_attention(q_factor, k_factor, v, order, *, normalize=True, eps=1e-6)
    mhla_attention(q, k, v, block_index, mixing, *, normalize=True, eps=1e-6)

Variant cores (:mod:`attention.cores`, no projections) and the DiT's layer
(:class:`AttentionLayer`: projections + core) are built from config nodes with
:func:`build_attention_core`, :func:`build_attention` and :func:`build_attention_layers`;
:data:`VARIANTS` lists the variant names. The token grid and the RoPE tables
(:func:`rope_tables`, float32 whatever the model dtype) are given per call.
Parameter constraints (MHLA's mixing in [0, 1]) go through :class:`Constrained` and
:func:`constrain_`.
"""

from .constraints import Constrained, constrain_, parameter_constraints, unit_interval
from .cores import AttentionCore, HLACore, LinearCore, MHLACore, SoftmaxCore
from .functional import guard_denominator, hla_attention, hla_tied_attention, linear_attention, softmax_attention
from .layers import QK_NORMS, AttentionLayer
from .mhla import (
    BlockPlan,
    mhla_attention,
    mhla_auto_layout,
    mhla_block_index,
    mhla_grid_attention,
    mhla_grid_plan,
    mhla_index_plan,
    mhla_locality_mixing,
    mhla_valid_layouts,
)
from .registry import (
    ATTENTION_CORES,
    VARIANTS,
    build_attention,
    build_attention_core,
    build_attention_layers,
    layer_configs,
    variant_settings,
)
from .rope import RotaryTables, apply_rope, rope_axis_dims, rope_tables, rotary_tables_from_wan
from .symmetric import symmetric_monomials, symmetric_power_features

__all__ = [
    "softmax_attention",
    "linear_attention",
    "hla_attention",
    "hla_tied_attention",
    "symmetric_power_features",
    "symmetric_monomials",
    "mhla_attention",
    "mhla_grid_attention",
    "guard_denominator",
    "AttentionCore",
    "SoftmaxCore",
    "LinearCore",
    "HLACore",
    "MHLACore",
    "AttentionLayer",
    "QK_NORMS",
    "ATTENTION_CORES",
    "VARIANTS",
    "build_attention_core",
    "build_attention",
    "build_attention_layers",
    "layer_configs",
    "variant_settings",
    "BlockPlan",
    "mhla_auto_layout",
    "mhla_block_index",
    "mhla_grid_plan",
    "mhla_index_plan",
    "mhla_locality_mixing",
    "mhla_valid_layouts",
    "RotaryTables",
    "rope_tables",
    "apply_rope",
    "rope_axis_dims",
    "rotary_tables_from_wan",
    "Constrained",
    "constrain_",
    "parameter_constraints",
    "unit_interval",
]
