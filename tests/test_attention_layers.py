"""Attention cores and layers, the registry, hybrids, constraints and configuration errors."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attention import (
    VARIANTS,
    AttentionLayer,
    Constrained,
    HLACore,
    MHLACore,
    SoftmaxCore,
    apply_rope,
    build_attention,
    build_attention_core,
    build_attention_layers,
    constrain_,
    mhla_auto_layout,
    mhla_block_index,
    mhla_locality_mixing,
    parameter_constraints,
    rope_tables,
)
from attention.reference import linear_attention_reference, mhla_attention_reference
from tests.paths import CONFIG_DIR


def config_node(name: str) -> dict:
    """The shipped config of a variant, as the trainer would pass it."""
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "attention" / f"{name}.yaml"))


def test_registry_lists_every_shipped_variant():
    assert VARIANTS == ("softmax", "linear", "hla", "mhla")
    for name in VARIANTS:
        assert (CONFIG_DIR / "attention" / f"{name}.yaml").exists()


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("grid", [(3, 5, 7), (1, 1, 1), (2, 3, 1)])
def test_shipped_configs_build_and_reach_every_parameter(name, grid):
    torch.manual_seed(0)
    layer = build_attention(config_node(name), dim=64, num_heads=4, grid=grid)
    x = torch.randn(2, math.prod(grid), 64)
    out = layer(x, grid, rope_tables(16, grid))
    assert out.shape == x.shape
    out.square().mean().backward()
    for pname, param in layer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        if math.prod(grid) > 1 or "mixing" not in pname:
            assert param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize(
    "settings",
    [
        {"name": "hla", "order": 1, "rank": 8, "factors": "untied"},
        {"name": "hla", "order": 3, "rank": 4, "normalize": False, "factors": "untied"},
        {"name": "hla", "order": 4, "rank": 2},
        {"name": "hla", "order": 4, "rank": 2, "form": "state", "normalize": False},
        {"name": "hla", "factors": "untied", "rank": 6, "activation": "softplus"},
        {"name": "hla", "factors": "untied", "order": 2, "form": "value_modulation"},
        {"name": "hla", "rank": None},
        {"name": "mhla", "layout": [3, 1, 7], "gate": True, "normalize": True},
        {"name": "mhla", "layout": [2, 2, 3], "normalize": True},  # uneven blocks on (3, 5, 7)
        {"name": "mhla", "layout": [4, 6, 8], "gate": True},  # larger than the grid: empty blocks
        {"name": "mhla", "layout": [1, 1, 1], "mixing_init": "uniform", "feature_map": "elu"},
        {"name": "linear", "normalize": False, "feature_map": "elu"},
    ],
)
def test_variant_settings_forward_backward(settings):
    grid = (3, 5, 7)
    layer = build_attention(settings, dim=48, num_heads=3, grid=grid)
    x = torch.randn(2, 105, 48, requires_grad=True)
    out = layer(x, grid, rope_tables(16, grid))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_layers_work_without_rope():
    for name in VARIANTS:
        layer = build_attention(config_node(name), dim=32, num_heads=2, grid=(2, 2, 3))
        assert layer(torch.randn(1, 12, 32), (2, 2, 3)).shape == (1, 12, 32)


@pytest.mark.parametrize("name", VARIANTS)
def test_one_layer_serves_any_grid(name):
    """Built with a reference grid, run on odd grids, uneven MHLA blocks, a grid smaller than the layout, T = 1."""
    torch.manual_seed(0)
    layer = build_attention(config_node(name), dim=48, num_heads=2, grid=(4, 8, 8))  # MHLA auto: (1, 4, 4)
    for grid in [(4, 8, 8), (3, 5, 7), (1, 9, 6), (1, 2, 3), (1, 1, 1), (5, 3, 2)]:
        x = torch.randn(2, math.prod(grid), 48, requires_grad=True)
        out = layer(x, grid, rope_tables(24, grid))
        assert out.shape == x.shape and torch.isfinite(out).all(), grid
        out.square().mean().backward()
        assert torch.isfinite(x.grad).all(), grid


@pytest.mark.parametrize("grid", [(2, 4, 4), (3, 5, 3), (1, 1, 2)])
@pytest.mark.parametrize("normalize", [True, False])
def test_mhla_core_matches_explicit_attention_with_rope(grid, normalize):
    """Numerator uses rotated features, normaliser un-rotated ones (spec §4); any grid."""
    torch.manual_seed(0)
    core = MHLACore(32, 2, layout=[2, 2, 1], normalize=normalize).double()
    with torch.no_grad():
        core.mixing.uniform_(0.1, 1.0)
    n = math.prod(grid)
    rope = rope_tables(16, grid, dtype=torch.float64)
    q, k, v = (torch.randn(1, 2, n, 16, dtype=torch.float64) for _ in range(3))
    out = core.core(core.core_inputs(q, k, grid, rope), v, grid)
    fq, fk = core.features(q), core.features(k)
    block_index = mhla_block_index(grid, core.layout)
    numerator = mhla_attention_reference(
        apply_rope(fq, rope), apply_rope(fk, rope), v, block_index, core.mixing, normalize=False
    )
    if normalize:
        ones = torch.ones_like(v[..., :1])
        denominator = mhla_attention_reference(fq, fk, ones, block_index, core.mixing, normalize=False)
        numerator = numerator / (denominator + core.eps)
    assert torch.allclose(out, numerator, atol=1e-10)
    expected = numerator if normalize else core.out_norm(numerator)
    assert torch.allclose(core(q, k, v, grid, rope), expected, atol=1e-10)


def test_linear_layer_is_mhla_layer_with_one_block():
    grid = (2, 3, 3)
    torch.manual_seed(0)
    mhla = build_attention({"name": "mhla", "layout": [1, 1, 1], "normalize": True}, dim=32, num_heads=2)
    linear = build_attention({"name": "linear", "normalize": True}, dim=32, num_heads=2)
    linear.load_state_dict(mhla.state_dict(), strict=False)
    x = torch.randn(2, 18, 32)
    rope = rope_tables(16, grid)
    assert torch.allclose(mhla(x, grid, rope), linear(x, grid, rope), atol=1e-5)


def test_tied_hla_with_identity_factor_is_taylor_softmax_of_rotated_logits():
    grid = (1, 2, 5)
    layer = build_attention({"name": "hla", "order": 2, "rank": None}, dim=16, num_heads=1).double()
    rope = rope_tables(16, grid, dtype=torch.float64)
    q, k, v = (torch.randn(1, 1, 10, 16, dtype=torch.float64) for _ in range(3))
    rq, rk = apply_rope(q, rope), apply_rope(k, rope)
    logits = rq @ rk.transpose(-1, -2) / 4.0
    weights = (1 + logits / 2) ** 2
    expected = (weights @ v) / (weights.sum(-1, keepdim=True) + 1e-6)
    assert torch.allclose(layer.core(q, k, v, grid, rope), expected, atol=1e-10)


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_is_output_norm_of_core_of_core_inputs(name):
    grid = (2, 3, 4)
    torch.manual_seed(0)
    core = build_attention_core({**config_node(name), "normalize": False} if name != "softmax" else config_node(name),
                                dim=32, num_heads=2, grid=grid)
    rope = rope_tables(16, grid)
    q, k, v = (torch.randn(2, 2, 24, 16) for _ in range(3))
    inputs = core.core_inputs(q, k, grid, rope)
    assert isinstance(inputs, tuple) and all(t.shape[:3] == (2, 2, 24) for t in inputs)
    out = core.core(inputs, v, grid)
    if core.out_norm is not None:
        out = core.out_norm(out)
    assert torch.equal(core(q, k, v, grid, rope), out)
    x = torch.randn(2, 24, 32)
    assert torch.equal(core.gate(x, x), x)  # no gate configured


def test_cores_hold_only_their_own_parameters():
    cores = {name: build_attention_core(config_node(name), dim=32, num_heads=2, grid=(2, 4, 4)) for name in VARIANTS}
    names = {name: sorted(n for n, _ in core.named_parameters()) for name, core in cores.items()}
    assert names == {"softmax": [], "linear": [], "hla": ["down.weight"], "mhla": ["mixing", "out_norm.weight"]}
    gated = build_attention_core({"name": "mhla", "layout": [1, 2, 2], "gate": True}, dim=32, num_heads=2)
    assert {"gate_proj.weight", "gate_proj.bias"} <= {n for n, _ in gated.named_parameters()}


def test_across_heads_qk_norm_has_width_sized_weights_and_normalises_before_the_split():
    grid = (1, 2, 3)
    torch.manual_seed(0)
    layer = build_attention({"name": "softmax"}, dim=24, num_heads=2, qk_norm="across_heads")
    assert layer.q_norm.weight.shape == layer.k_norm.weight.shape == (24,)
    with torch.no_grad():
        layer.q_norm.weight.uniform_(0.5, 2.0)
        layer.k_norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 6, 24)
    q, k, v = layer.qkv(x).chunk(3, dim=-1)
    q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + 1e-6) * layer.q_norm.weight
    k = k * torch.rsqrt(k.square().mean(-1, keepdim=True) + 1e-6) * layer.k_norm.weight
    heads = [t.view(2, 6, 2, 12).transpose(1, 2) for t in (q, k, v)]
    expected = layer.proj(layer.core(*heads, grid).transpose(1, 2).reshape(2, 6, 24))
    assert torch.allclose(layer(x, grid), expected, atol=1e-5)
    per_head = build_attention({"name": "softmax"}, dim=24, num_heads=2)
    assert per_head.q_norm.weight.shape == (12,)


def test_softmax_layer_equals_wan_self_attention():
    """qk_norm=across_heads + rope_tables reproduce diffusers' Wan2.1 self-attention exactly."""
    transformer_wan = pytest.importorskip("diffusers.models.transformers.transformer_wan")
    torch.manual_seed(0)
    processor = transformer_wan.WanAttnProcessor()
    wan = transformer_wan.WanAttention(dim=24, heads=2, dim_head=12, eps=1e-6, processor=processor)
    rotary = transformer_wan.WanRotaryPosEmbed(attention_head_dim=12, patch_size=(1, 2, 2), max_seq_len=32)
    with torch.no_grad():
        for norm in (wan.norm_q, wan.norm_k):
            norm.weight.uniform_(0.5, 2.0)
    grid = (3, 4, 5)
    rotary_emb = rotary(torch.zeros(1, 16, grid[0], 2 * grid[1], 2 * grid[2]))
    layer = AttentionLayer(24, 2, SoftmaxCore(24, 2), qk_norm="across_heads")
    with torch.no_grad():
        layer.qkv.weight.copy_(torch.cat([wan.to_q.weight, wan.to_k.weight, wan.to_v.weight]))
        layer.qkv.bias.copy_(torch.cat([wan.to_q.bias, wan.to_k.bias, wan.to_v.bias]))
        layer.q_norm.weight.copy_(wan.norm_q.weight)
        layer.k_norm.weight.copy_(wan.norm_k.weight)
        layer.proj.load_state_dict(wan.to_out[0].state_dict())
    x = torch.randn(2, math.prod(grid), 24)
    expected = wan(x, rotary_emb=rotary_emb)
    assert torch.allclose(layer(x, grid, rope_tables(12, grid)), expected, atol=1e-5)


def test_hybrid_pattern_from_hydra_config():
    with initialize_config_dir(config_dir=str(CONFIG_DIR / "attention"), version_base="1.3"):
        cfg = compose(config_name="hybrid")
    layers = build_attention_layers(cfg, depth=7, dim=32, num_heads=2, grid=(2, 3, 3))
    assert [layer.variant for layer in layers] == ["mhla", "mhla", "softmax"] * 2 + ["mhla"]
    custom = {"name": "hybrid", "pattern": ["a", "b"], "variants": {"a": {"name": "hla"}, "b": {"name": "linear"}}}
    layers = build_attention_layers(custom, depth=3, dim=32, num_heads=2, qk_norm="across_heads")
    assert [layer.variant for layer in layers] == ["hla", "linear", "hla"]
    assert all(layer.qk_norm == "across_heads" for layer in layers)


def test_mhla_constraint_keeps_mixing_in_unit_interval():
    layer = build_attention({"name": "mhla", "layout": [2, 2, 2]}, dim=32, num_heads=2)
    assert isinstance(layer.core, Constrained)
    with torch.no_grad():
        layer.core.mixing.copy_(torch.linspace(-2, 3, layer.core.mixing.numel()).view_as(layer.core.mixing))
    [(name, parameter, project)] = parameter_constraints(layer)
    assert name == "core.mixing" and parameter is layer.core.mixing
    assert torch.equal(project(torch.tensor([-1.0, 0.5, 2.0])), torch.tensor([0.0, 0.5, 1.0]))
    constrain_(layer)
    assert layer.core.mixing.min() == 0 and layer.core.mixing.max() == 1
    assert not layer.core.mixing.requires_grad or layer.core.mixing.grad is None


def test_constrain_reaches_every_constrained_module_and_only_those():
    variants = {"m": {"name": "mhla", "layout": [1, 2, 2]}, "s": {"name": "softmax"}}
    hybrid = {"name": "hybrid", "pattern": ["m", "s"], "variants": variants}
    layers = torch.nn.ModuleList(build_attention_layers(hybrid, depth=4, dim=32, num_heads=2))
    with torch.no_grad():
        for p in layers.parameters():
            p.fill_(2.0)
    constrain_(layers)
    assert [name for name, _, _ in parameter_constraints(layers)] == ["0.core.mixing", "2.core.mixing"]
    assert layers[0].core.mixing.max() == 1 and layers[2].core.mixing.max() == 1
    assert layers[1].qkv.weight.max() == 2.0 and layers[0].qkv.weight.max() == 2.0


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
    assert mhla_auto_layout((32, 16, 16)) == (4, 4, 4)
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
    layer = build_attention({"name": "mhla"}, dim=32, num_heads=2, grid=(4, 8, 8))
    assert layer.core.layout == (1, 4, 4) and layer.core.mixing.shape == (16, 16)


def test_attention_macs_follow_the_spec():
    grid = (4, 8, 8)
    n, heads, d, dim = 256, 4, 16, 64
    projections = 4 * n * dim**2
    softmax = build_attention({"name": "softmax"}, dim=dim, num_heads=4)
    assert softmax.core.macs(grid) == 2 * heads * n * n * d
    assert softmax.macs(grid) == projections + 2 * heads * n * n * d
    assert build_attention_core({"name": "linear"}, dim=dim, num_heads=4).macs(grid) == 2 * heads * n * d * (d + 1)
    down_maps = 2 * heads * n * d * 4  # the shared d×4 map on q and k
    kronecker = build_attention_core({"name": "hla", "order": 2, "rank": 4, "form": "state"}, dim=dim, num_heads=4)
    assert kronecker.macs(grid) == 2 * heads * n * 25 * (d + 1) + down_maps  # R = 5² Kronecker features
    symmetric = build_attention_core({"name": "hla", "order": 2, "rank": 4, "form": "symmetric"}, dim=dim, num_heads=4)
    assert symmetric.macs(grid) == 2 * heads * n * 15 * (d + 1) + down_maps  # R = C(6, 2) symmetric features
    mhla = build_attention_core({"name": "mhla", "layout": [1, 4, 4], "gate": True}, dim=dim, num_heads=4)
    assert mhla.macs(grid) == heads * (2 * n * d * d + 16**2 * d * d) + n * dim**2
    assert mhla.macs((1, 4, 4)) == heads * (2 * 16 * d * d + 16**2 * d * d) + 16 * dim**2  # per-call grid


BAD_CONFIGS = [
    ({"name": "flash"}, "attention.name='flash' is not valid; choose one of ['hla', 'linear', 'mhla', 'softmax']"),
    ({"name": "hla", "order": 5}, "attention.hla.order=5 is not valid; choose one of [1, 2, 3, 4]"),
    ({"name": "hla", "order": 7}, "attention.hla.order=7 is not valid; choose one of [1, 2, 3, 4]"),
    ({"name": "hla", "order": 0}, "attention.hla.order=0"),
    ({"name": "hla", "order": 3}, "attention.hla.order=3 is not valid with attention.hla.factors=tied"),
    ({"name": "hla", "order": 1}, "choose one of [2, 4], or attention.hla.factors=untied for [1, 2, 3, 4]"),
    ({"name": "hla", "factors": "shared"}, "choose one of ['tied', 'untied']"),
    ({"name": "hla", "rank": 99}, "attention.hla.rank=99 is not valid"),
    ({"name": "hla", "heads": 2}, "attention.hla: unknown setting(s) ['heads']; valid settings:"),
    ({"name": "hla", "form": "fast"}, "attention.hla.form='fast' is not valid; choose one of ['auto', 'symmetric'"),
    ({"name": "hla", "factors": "untied", "form": "symmetric"}, "attention.hla.form='symmetric' is not valid with"),
    ({"name": "mhla", "layout": [0, 2, 2]}, "attention.mhla.layout=[0, 2, 2] is not valid; use 'auto' or three"),
    ({"name": "mhla", "layout": [2, 2]}, "attention.mhla.layout=[2, 2] is not valid"),
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


def test_auto_layout_without_a_reference_grid_is_refused():
    with pytest.raises(ValueError, match=r"attention.mhla.layout='auto' needs a reference token grid"):
        build_attention_core({"name": "mhla"}, dim=32, num_heads=2)
    assert build_attention_core({"name": "mhla", "layout": [1, 2, 2]}, dim=32, num_heads=2).layout == (1, 2, 2)


def test_bad_qk_norm_is_refused():
    message = r"model.qk_norm='rms' is not valid; choose one of \['per_head', 'across_heads'\]"
    with pytest.raises(ValueError, match=message):
        build_attention({"name": "softmax"}, dim=32, num_heads=2, qk_norm="rms")


@pytest.mark.parametrize("dim,heads", [(64, 3), (20, 5), (36, 9)])
def test_dims_that_do_not_fit_raise(dim, heads):
    with pytest.raises(ValueError, match="divisible|head dimension"):
        build_attention({"name": "softmax"}, dim=dim, num_heads=heads, grid=(1, 2, 2))


def test_wrong_token_count_is_refused():
    layer = build_attention({"name": "linear"}, dim=32, num_heads=2)
    with pytest.raises(ValueError, match=r"does not match the token grid \(2, 2, 2\) \(8 tokens\)"):
        layer(torch.randn(1, 9, 32), (2, 2, 2))


def test_layer_reference_equivalence_in_float64():
    """The linear core equals the explicit oracle on its own features."""
    core = build_attention_core({"name": "linear"}, dim=16, num_heads=1).double()
    q, k, v = (torch.randn(1, 1, 9, 16, dtype=torch.float64) for _ in range(3))
    expected = linear_attention_reference(core.features(q), core.features(k), v)
    assert torch.allclose(core(q, k, v, (1, 3, 3)), expected, atol=1e-10)


def test_hla_core_inputs_are_the_tied_taylor_factors():
    core = HLACore(16, 1, order=2, rank=4)
    q, k = torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16)
    q_factor, _ = core.core_inputs(q, k, (1, 2, 3))
    assert q_factor.shape == (1, 1, 6, 5)
    assert torch.equal(q_factor[..., 0], torch.ones(1, 1, 6))
    assert torch.allclose(q_factor[..., 1:], core.down(q) / math.sqrt(2 * 4.0))
    untied = HLACore(16, 1, order=3, rank=4, factors="untied")
    assert len(untied.core_inputs(q, k, (1, 2, 3))) == 6


def test_rope_tables_are_float32_and_match_wan():
    transformer_wan = pytest.importorskip("diffusers.models.transformers.transformer_wan")
    from attention import rotary_tables_from_wan

    rotary = transformer_wan.WanRotaryPosEmbed(attention_head_dim=12, patch_size=(1, 2, 2), max_seq_len=32)
    for grid in [(3, 4, 5), (1, 1, 1), (7, 2, 9)]:
        wan = rotary_tables_from_wan(rotary(torch.zeros(1, 16, grid[0], 2 * grid[1], 2 * grid[2])))
        ours = rope_tables(12, grid)
        assert ours.cos.dtype == ours.sin.dtype == torch.float32 and ours.cos.shape == (math.prod(grid), 6)
        assert torch.equal(ours.cos, wan.cos) and torch.equal(ours.sin, wan.sin)


def test_apply_rope_rotates_in_float32_and_keeps_the_dtype():
    grid = (2, 3, 4)
    tables = rope_tables(12, grid)
    x = torch.randn(2, 3, 24, 12)
    exact = apply_rope(x.double(), rope_tables(12, grid, dtype=torch.float64))
    assert (apply_rope(x, tables).double() - exact).abs().max() < 1e-6
    low = apply_rope(x.bfloat16(), tables)
    assert low.dtype == torch.bfloat16
    assert torch.equal(low, apply_rope(x.bfloat16().float(), tables).bfloat16())  # fp32 math, one final rounding
    with pytest.raises(ValueError, match="apply_rope"):
        apply_rope(torch.randn(1, 1, 5, 12), tables)
