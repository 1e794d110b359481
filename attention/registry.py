"""Build attention cores and layers from config nodes.

A config node is a mapping ``{name: softmax|linear|hla|mhla, <variant settings>}``
(see ``configs/attention/*.yaml``). A hybrid node ``{name: hybrid, pattern: [...],
variants: {key: node, ...}}`` assigns ``variants[pattern[i % len(pattern)]]`` to
block i, e.g. pattern [mhla, mhla, softmax] keeps softmax in every third block.
:data:`VARIANTS` is the one list of variant names.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from .cores import AttentionCore, HLACore, LinearCore, MHLACore, SoftmaxCore
from .layers import AttentionLayer
from .mhla import Grid

ATTENTION_CORES: dict[str, type[AttentionCore]] = {
    "softmax": SoftmaxCore,
    "linear": LinearCore,
    "hla": HLACore,
    "mhla": MHLACore,
}
VARIANTS: tuple[str, ...] = tuple(ATTENTION_CORES)


def _plain(node) -> dict:
    """An OmegaConf node or mapping -> a plain dict."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(node)


def variant_settings(name: str) -> list[str]:
    """Names of the settings a variant accepts besides ``name``."""
    params = inspect.signature(ATTENTION_CORES[name].__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_attention_core(config: Mapping, *, dim: int, num_heads: int, grid: Grid | None = None) -> AttentionCore:
    """The core of one single-variant config node (no projections).

    ``grid`` is a reference token grid for settings that need one (MHLA ``layout: auto``).
    Raises ValueError naming bad settings.
    """
    settings = _plain(config)
    name = settings.pop("name", None)
    if name not in ATTENTION_CORES:
        raise ValueError(
            f"attention.name={name!r} is not valid; choose one of {sorted(ATTENTION_CORES)} "
            f"(or 'hybrid' with a pattern, for per-layer choices)"
        )
    valid = variant_settings(name)
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ValueError(f"attention.{name}: unknown setting(s) {unknown}; valid settings: {valid}")
    return ATTENTION_CORES[name](dim, num_heads, grid, **settings)


def build_attention(
    config: Mapping, *, dim: int, num_heads: int, grid: Grid | None = None, qk_norm: str = "per_head"
) -> AttentionLayer:
    """One attention layer (projections + core) from a single-variant config node."""
    core = build_attention_core(config, dim=dim, num_heads=num_heads, grid=grid)
    return AttentionLayer(dim, num_heads, core, qk_norm=qk_norm)


def layer_configs(config: Mapping, depth: int) -> list[dict]:
    """The single-variant config node for each of ``depth`` blocks."""
    settings = _plain(config)
    if settings.get("name") != "hybrid":
        return [settings] * depth
    pattern, variants = settings.get("pattern"), settings.get("variants") or {}
    extra = sorted(set(settings) - {"name", "pattern", "variants"})
    if extra:
        raise ValueError(f"attention.hybrid: unknown setting(s) {extra}; valid settings: ['pattern', 'variants']")
    if not pattern:
        raise ValueError("attention.hybrid.pattern must be a non-empty list of keys of attention.hybrid.variants")
    missing = [key for key in pattern if key not in variants]
    if missing:
        raise ValueError(
            f"attention.hybrid.pattern names {missing}, which are not in attention.hybrid.variants "
            f"(available: {sorted(variants)})"
        )
    return [variants[pattern[i % len(pattern)]] for i in range(depth)]


def build_attention_layers(
    config: Mapping,
    *,
    depth: int,
    dim: int,
    num_heads: int,
    grid: Grid | None = None,
    qk_norm: str = "per_head",
) -> list[AttentionLayer]:
    """``depth`` layers for the DiT's blocks, following a single or hybrid config node."""
    return [
        build_attention(node, dim=dim, num_heads=num_heads, grid=grid, qk_norm=qk_norm)
        for node in layer_configs(config, depth)
    ]
