"""Attention layers, the registry, hybrids and configuration errors."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attention import (
    MHLAAttention,
    Rope3D,
    build_attention,
    build_attention_layers,
    mhla_auto_layout,
    mhla_block_index,
    mhla_locality_mixing,
)
from attention.reference import linear_attention_reference, mhla_attention_reference
from tests.paths import CONFIG_DIR

VARIANTS = ["softmax", "linear", "hla", "mhla"]


def config_node(name: str) -> dict:
    """The shipped config of a variant, as the trainer would pass it."""
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "attention" / f"{name}.yaml"))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("grid", [(3, 5, 7), (1, 1, 1), (2, 3, 1)])
def test_shipped_configs_build_and_reach_every_parameter(name, grid):
    torch.manual_seed(0)
    layer = build_attention(config_node(name), dim=64, num_heads=4, grid=grid)
    x = torch.randn(2, math.prod(grid), 64)
    out = layer(x, Rope3D(16, grid))
    assert out.shape == x.shape
    out.square().mean().backward()
    for pname, param in layer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        if math.prod(grid) > 1 or "mixing" not in pname:
            assert param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize(
    "settings",
    [
        {"name": "hla", "order": 1, "rank": 8},
        {"name": "hla", "order": 3, "rank": 4, "normalize": False},
        {"name": "hla", "order": 4, "rank": 2},
        {"name": "hla", "factors": "untied", "rank": 6, "activation": "softplus"},
        {"name": "hla", "rank": None},
        {"name": "mhla", "layout": [3, 1, 7], "gate": True, "normalize": True},
        {"name": "mhla", "layout": [1, 1, 1], "mixing_init": "uniform", "feature_map": "elu"},
        {"name": "linear", "normalize": False, "feature_map": "elu"},
    ],
)
def test_variant_settings_forward_backward(settings):
    grid = (3, 5, 7)
    layer = build_attention(settings, dim=48, num_heads=3, grid=grid)
    x = torch.randn(2, 105, 48, requires_grad=True)
    out = layer(x, Rope3D(16, grid))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_layers_work_without_rope():
    for name in VARIANTS:
        layer = build_attention(config_node(name), dim=32, num_heads=2, grid=(2, 2, 3))
        assert layer(torch.randn(1, 12, 32)).shape == (1, 12, 32)


def test_mhla_layer_core_matches_explicit_attention_with_rope():
    """Numerator uses rotated features, normaliser un-rotated ones (spec §4)."""
    grid = (2, 4, 4)
    torch.manual_seed(0)
    layer = MHLAAttention(32, 2, grid, layout=[2, 2, 1], normalize=True).double()
    rope = Rope3D(16, grid).double()
    q, k, v = (torch.randn(1, 2, 32, 16, dtype=torch.float64) for _ in range(3))
    out = layer.core(q, k, v, rope)
    fq, fk = layer.features(q), layer.features(k)
    numerator = mhla_attention_reference(rope(fq), rope(fk), v, layer.block_index, layer.mixing, normalize=False)
    ones = torch.ones_like(v[..., :1])
    denominator = mhla_attention_reference(fq, fk, ones, layer.block_index, layer.mixing, normalize=False)
    assert torch.allclose(out, numerator / (denominator + layer.eps), atol=1e-10)


def test_linear_layer_is_mhla_layer_with_one_block():
    grid = (2, 3, 3)
    torch.manual_seed(0)
    mhla = build_attention({"name": "mhla", "layout": [1, 1, 1], "normalize": True}, dim=32, num_heads=2, grid=grid)
    linear = build_attention({"name": "linear", "normalize": True}, dim=32, num_heads=2, grid=grid)
    linear.load_state_dict(mhla.state_dict(), strict=False)
    x = torch.randn(2, 18, 32)
    rope = Rope3D(16, grid)
    assert torch.allclose(mhla(x, rope), linear(x, rope), atol=1e-5)


def test_tied_hla_with_identity_factor_is_taylor_softmax_of_rotated_logits():
    grid = (1, 2, 5)
    layer = build_attention({"name": "hla", "order": 2, "rank": None}, dim=16, num_heads=1, grid=grid).double()
    rope = Rope3D(16, grid).double()
    q, k, v = (torch.randn(1, 1, 10, 16, dtype=torch.float64) for _ in range(3))
    rq, rk = rope(q), rope(k)
    logits = rq @ rk.transpose(-1, -2) / 4.0
    weights = (1 + logits / 2) ** 2
    expected = (weights @ v) / (weights.sum(-1, keepdim=True) + 1e-6)
    assert torch.allclose(layer.core(q, k, v, rope), expected, atol=1e-10)


def test_hybrid_pattern_from_hydra_config():
    with initialize_config_dir(config_dir=str(CONFIG_DIR / "attention"), version_base="1.3"):
        cfg = compose(config_name="hybrid")
    layers = build_attention_layers(cfg, depth=7, dim=32, num_heads=2, grid=(2, 3, 3))
    assert [layer.variant for layer in layers] == ["mhla", "mhla", "softmax"] * 2 + ["mhla"]
    custom = {"name": "hybrid", "pattern": ["a", "b"], "variants": {"a": {"name": "hla"}, "b": {"name": "linear"}}}
    layers = build_attention_layers(custom, depth=3, dim=32, num_heads=2, grid=(2, 3, 3))
    assert [layer.variant for layer in layers] == ["hla", "linear", "hla"]


def test_mhla_clamp_keeps_mixing_in_unit_interval():
    layer = MHLAAttention(32, 2, (2, 4, 4), layout=[2, 2, 2])
    with torch.no_grad():
        layer.mixing.copy_(torch.linspace(-2, 3, layer.mixing.numel()).view_as(layer.mixing))
    layer.clamp_mixing_()
    assert layer.mixing.min() >= 0 and layer.mixing.max() <= 1
    assert layer.mixing.min() == 0 and layer.mixing.max() == 1


def test_mhla_locality_init_rows_sum_to_one_and_prefer_neighbours():
    mixing = mhla_locality_mixing((2, 3, 3))
    assert torch.allclose(mixing.sum(1), torch.ones(18))
    assert (mixing >= 0).all()
    # Block 0 weighs itself most and its farthest block (the opposite corner) not at all.
    assert mixing[0].argmax() == 0 and mixing[0, 17] == 0
    assert mhla_locality_mixing((1, 1, 1)).item() == 1.0


def test_mhla_auto_layout_and_block_index():
    assert mhla_auto_layout((4, 8, 8)) == (1, 4, 4)  # 16 blocks of 4x2x2 tokens
    assert mhla_auto_layout((16, 16, 16)) == (4, 4, 4)
    assert mhla_auto_layout((3, 5, 7)) == (1, 1, 7)
    for grid in [(4, 8, 8), (3, 5, 7), (1, 1, 1), (16, 16, 16), (2, 9, 9)]:
        layout = mhla_auto_layout(grid)
        num_tokens = math.prod(grid)
        assert math.prod(layout) ** 2 <= num_tokens
        assert all(g % m == 0 for g, m in zip(grid, layout))
    index = mhla_block_index((2, 4, 4), (2, 2, 2))
    assert torch.equal(torch.bincount(index), torch.full((8,), 4))
    assert index[0] == 0 and index[-1] == 7
    # token (t=1, h=0, w=3) -> block (1, 0, 1) = (1*2 + 0)*2 + 1 = 5
    assert index[(1 * 4 + 0) * 4 + 3] == 5


def test_attention_layer_core_macs_follow_the_spec():
    grid = (4, 8, 8)
    n, heads, d = 256, 4, 16
    assert build_attention({"name": "softmax"}, dim=64, num_heads=4, grid=grid).core_macs() == 2 * heads * n * n * d
    assert build_attention({"name": "linear"}, dim=64, num_heads=4, grid=grid).core_macs() == 2 * heads * n * d * (d + 1)
    hla = build_attention({"name": "hla", "order": 2, "rank": 4}, dim=64, num_heads=4, grid=grid)
    assert hla.core_macs() == 2 * heads * n * 25 * (d + 1)


BAD_CONFIGS = [
    ({"name": "flash"}, "attention.name='flash' is not valid; choose one of ['hla', 'linear', 'mhla', 'softmax']"),
    ({"name": "hla", "order": 5}, "attention.hla.order=5 is not valid; choose one of [1, 2, 3, 4]"),
    ({"name": "hla", "order": 0}, "attention.hla.order=0"),
    ({"name": "hla", "factors": "shared"}, "choose one of ['tied', 'untied']"),
    ({"name": "hla", "rank": 99}, "attention.hla.rank=99 is not valid"),
    ({"name": "hla", "heads": 2}, "attention.hla: unknown setting(s) ['heads']; valid settings:"),
    ({"name": "mhla", "layout": [3, 2, 2]}, "attention.mhla.layout=[3, 2, 2] does not divide the token grid [4, 6, 6]; valid layouts: auto"),
    ({"name": "mhla", "layout": "big"}, "attention.mhla.layout='big' is not valid"),
    ({"name": "mhla", "mixing_init": "random"}, "choose one of ['locality', 'uniform']"),
    ({"name": "linear", "feature_map": "tanh"}, "attention.linear.feature_map='tanh' is not valid"),
    ({"name": "hybrid", "pattern": ["x"], "variants": {}}, "attention.hybrid.pattern names ['x']"),
]


@pytest.mark.parametrize("settings,message", BAD_CONFIGS)
def test_bad_configs_raise_at_construction(settings, message):
    with pytest.raises(ValueError) as excinfo:
        build_attention_layers(settings, depth=2, dim=64, num_heads=4, grid=(4, 6, 6))
    assert message in str(excinfo.value)


@pytest.mark.parametrize("dim,heads", [(64, 3), (20, 5), (36, 9)])
def test_dims_that_do_not_fit_raise(dim, heads):
    with pytest.raises(ValueError, match="divisible|head dimension"):
        build_attention({"name": "softmax"}, dim=dim, num_heads=heads, grid=(1, 2, 2))


def test_wrong_token_count_is_refused():
    layer = build_attention({"name": "linear"}, dim=32, num_heads=2, grid=(2, 2, 2))
    with pytest.raises(ValueError, match="built for 8 tokens"):
        layer(torch.randn(1, 9, 32))


def test_layer_reference_equivalence_in_float64():
    """The linear layer's core equals the explicit oracle on its own features."""
    layer = build_attention({"name": "linear"}, dim=16, num_heads=1, grid=(1, 3, 3)).double()
    q, k, v = (torch.randn(1, 1, 9, 16, dtype=torch.float64) for _ in range(3))
    expected = linear_attention_reference(layer.features(q), layer.features(k), v)
    assert torch.allclose(layer.core(q, k, v, None), expected, atol=1e-10)
