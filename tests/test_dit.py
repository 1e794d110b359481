"""The video DiT, the rectified-flow objective and the Euler sampler."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from attention import apply_rope, constrain_, rope_tables
from dit.flow import (
    draw_noise_and_time,
    euler_sample,
    rectified_flow_loss,
    sample_flow_time,
    shift_time,
)
from dit.model import VideoDiT, build_dit
from dit.sampling import generate_videos, videos_to_uint8
from tests.paths import CONFIG_DIR

VARIANTS = [
    {"name": "softmax"},
    {"name": "linear"},
    {"name": "hla", "rank": 4},
    {"name": "mhla"},
    {"name": "hybrid", "pattern": ["m", "s"], "variants": {"m": {"name": "mhla", "gate": True}, "s": {"name": "softmax"}}},
]


def tiny_dit(attention=None, *, input_size=(3, 10, 14), patch_size=(1, 2, 2), num_classes=5, **overrides):
    settings = dict(
        in_channels=3, input_size=input_size, patch_size=patch_size, hidden_size=48, depth=2, num_heads=3,
        mlp_ratio=2.0, num_classes=num_classes, class_dropout_prob=0.1, attention=attention or {"name": "mhla"},
    )
    settings.update(overrides)
    torch.manual_seed(0)
    return VideoDiT(**settings)


def randomize_zero_init(model):
    """adaLN-Zero starts as the identity; perturb it so tests see every path."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    return model


@pytest.mark.parametrize("attention", VARIANTS, ids=lambda a: a["name"])
@pytest.mark.parametrize("input_size,patch_size", [((3, 10, 14), (1, 2, 2)), ((5, 3, 7), (1, 1, 1)), ((4, 6, 6), (2, 3, 2))])
def test_output_shape_on_odd_grids(attention, input_size, patch_size):
    model = randomize_zero_init(tiny_dit(attention, input_size=input_size, patch_size=patch_size))
    x = torch.randn(2, 3, *input_size)
    out = model(x, torch.rand(2), torch.tensor([0, 4]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unpatchify_inverts_patch_layout():
    model = tiny_dit(input_size=(4, 6, 6), patch_size=(2, 3, 2))
    x = torch.randn(2, 3, 4, 6, 6)
    pt, ph, pw = model.patch_size
    gt, gh, gw = model.grid
    # tokens holding each patch's pixels, ordered (pt, ph, pw, C) as the final layer emits them
    patches = x.view(2, 3, gt, pt, gh, ph, gw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(2, gt * gh * gw, -1)
    assert torch.equal(model.unpatchify(patches), x)


def test_classifier_free_guidance_combines_conditional_and_unconditional():
    model = randomize_zero_init(tiny_dit()).eval()
    x, t, y = torch.randn(2, 3, 3, 10, 14), torch.rand(2), torch.tensor([1, 3])
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, model.num_classes))
    assert not torch.allclose(cond, uncond)
    guided = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
    assert torch.allclose(guided, uncond + 4.0 * (cond - uncond), atol=1e-5)
    assert torch.equal(model.forward_with_cfg(x, t, y, cfg_scale=1.0), cond)
    # dropping a label is the same as passing the "no label" class
    assert torch.allclose(model(x, t, y, drop_labels=torch.tensor([True, True])), uncond, atol=1e-6)


def test_unconditional_model_ignores_labels():
    model = randomize_zero_init(tiny_dit(num_classes=0))
    x, t = torch.randn(1, 3, 3, 10, 14), torch.rand(1)
    assert model.y_embedder is None
    assert torch.equal(model(x, t), model.forward_with_cfg(x, t, torch.tensor([0]), cfg_scale=3.0))


@pytest.mark.parametrize("attention", VARIANTS[:4], ids=lambda a: a["name"])
def test_gradient_checkpointing_gives_the_same_gradients(attention):
    grads = []
    for checkpointing in (False, True):
        model = randomize_zero_init(tiny_dit(attention, gradient_checkpointing=checkpointing))
        x = torch.randn(2, 3, 3, 10, 14, generator=torch.Generator().manual_seed(1))
        model(x, torch.tensor([0.3, 0.7]), torch.tensor([0, 2])).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


def test_bad_patch_size_raises():
    with pytest.raises(ValueError, match=r"model.patch_size=\[1, 4, 4\] must divide the latent clip size"):
        tiny_dit(input_size=(3, 10, 14), patch_size=(1, 4, 4))


def test_dit_xl2_forward_macs_match_the_paper():
    """DiT-XL/2 at 256² (32×32×4 latents) is 118.6 G multiply-accumulates per forward."""
    with torch.device("meta"):
        model = VideoDiT(in_channels=4, input_size=(1, 32, 32), patch_size=(1, 2, 2), hidden_size=1152, depth=28,
                         num_heads=16, mlp_ratio=4.0, num_classes=1000, class_dropout_prob=0.1,
                         attention={"name": "softmax"})
    assert round(model.macs_per_sample() / 1e9, 1) == 118.6


def test_linear_attention_dit_counts_fewer_flops_at_long_sequences():
    kwargs = dict(input_size=(16, 32, 32), patch_size=(1, 2, 2), hidden_size=384, num_heads=6)
    with torch.device("meta"):
        softmax = tiny_dit({"name": "softmax"}, **kwargs).macs_per_sample()
        mhla = tiny_dit({"name": "mhla"}, **kwargs).macs_per_sample()
    assert mhla < 0.5 * softmax


def test_constraints_are_applied_to_every_mhla_block():
    model = tiny_dit({"name": "mhla"})
    with torch.no_grad():
        for block in model.blocks:
            block.attn.core.mixing.fill_(2.0)
    constrain_(model)
    assert all(block.attn.core.mixing.max() == 1.0 for block in model.blocks)


@pytest.mark.parametrize("attention", VARIANTS, ids=lambda a: a["name"])
def test_one_model_runs_on_other_clip_sizes(attention):
    model = randomize_zero_init(tiny_dit(attention, input_size=(3, 10, 14)))
    for size in [(3, 10, 14), (1, 6, 6), (5, 4, 18), (2, 2, 2)]:
        x = torch.randn(1, 3, *size)
        out = model(x, torch.rand(1), torch.tensor([1]))
        assert out.shape == x.shape and torch.isfinite(out).all(), size
    with pytest.raises(ValueError, match=r"divisible by the patch size \[1, 2, 2\]"):
        model(torch.randn(1, 3, 3, 9, 14), torch.rand(1))
    grid = model.token_grid(torch.zeros(1, 3, 5, 4, 18))
    assert grid == (5, 2, 9) and model.macs_per_sample(grid) < model.macs_per_sample()


def test_bf16_model_uses_exact_float32_rope_tables(monkeypatch):
    model = randomize_zero_init(tiny_dit({"name": "softmax"})).to(torch.bfloat16)
    seen = []

    def recording_rope(x, tables):
        seen.append(tables)
        return apply_rope(x, tables)

    monkeypatch.setattr("attention.cores.apply_rope", recording_rope)
    x = torch.randn(2, 3, 3, 10, 14, dtype=torch.bfloat16)
    out = model(x, torch.rand(2, dtype=torch.bfloat16), torch.tensor([0, 1]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    exact = rope_tables(16, (3, 5, 7), dtype=torch.float64)
    assert len(seen) == 2 * len(model.blocks)  # q and k of every block
    for tables in seen:
        assert tables.cos.dtype == tables.sin.dtype == torch.float32
        assert (tables.cos.double() - exact.cos).abs().max() < 1e-7
        assert (tables.sin.double() - exact.sin).abs().max() < 1e-7
    assert not any(buffer.numel() for buffer in model.buffers())  # no table is a buffer that .to() could round


def test_build_dit_passes_qk_norm_and_refuses_bad_values():
    model_cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / "tiny.yaml"))
    assert model_cfg["qk_norm"] == "per_head"
    kwargs = dict(in_channels=3, input_size=(2, 8, 8), num_classes=0)
    model = build_dit({**model_cfg, "qk_norm": "across_heads"}, {"name": "linear"}, **kwargs)
    assert all(block.attn.q_norm.weight.shape == (96,) for block in model.blocks)
    assert build_dit(model_cfg, {"name": "linear"}, **kwargs).blocks[0].attn.q_norm.weight.shape == (24,)
    message = r"model.qk_norm='global' is not valid; choose one of \['per_head', 'across_heads'\]"
    with pytest.raises(ValueError, match=message):
        build_dit({**model_cfg, "qk_norm": "global"}, {"name": "linear"}, **kwargs)
    with pytest.raises(ValueError, match="model.qk_norm is missing"):
        build_dit({k: v for k, v in model_cfg.items() if k != "qk_norm"}, {"name": "linear"}, **kwargs)
    assert math.prod(model.grid) == model.num_tokens == 8  # (2, 8, 8) latents in (1, 4, 4) patches


def test_data_prediction_returns_the_velocity_of_its_clean_clip():
    velocity = randomize_zero_init(tiny_dit({"name": "softmax"}))
    data = randomize_zero_init(tiny_dit({"name": "softmax"}, prediction="data"))
    data.load_state_dict(velocity.state_dict())
    x, y = torch.randn(3, 3, 3, 10, 14), torch.tensor([0, 1, 2])
    t = torch.tensor([0.9, 0.3, 0.01])
    clean = velocity(x, t, y)  # the same network's raw output, read as x̂₀ by the data model
    expected = (x - clean) / torch.tensor([0.9, 0.3, 0.05]).view(-1, 1, 1, 1, 1)  # t clamped at 0.05
    torch.testing.assert_close(data(x, t, y), expected)
    with pytest.raises(ValueError, match=r"model.prediction='eps' is not valid; choose one of \['velocity', 'data'\]"):
        tiny_dit(prediction="eps")
    model_cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / "tiny.yaml"))
    with pytest.raises(ValueError, match="model.prediction is missing"):
        build_dit({k: v for k, v in model_cfg.items() if k != "prediction"}, {"name": "linear"}, in_channels=3,
                  input_size=(2, 8, 8), num_classes=0)


# ------------------------------------------------------------------------------- flow


def test_flow_time_sampling_and_shift():
    generator = torch.Generator().manual_seed(0)
    t = sample_flow_time(10000, mean=0.0, std=1.0, shift=1.0, generator=generator)
    assert 0 < t.min() and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.02
    shifted = sample_flow_time(10000, mean=0.0, std=1.0, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert shifted.mean() > t.mean()
    assert torch.allclose(shift_time(torch.tensor([0.0, 0.5, 1.0]), 3.0), torch.tensor([0.0, 0.75, 1.0]))


def test_loss_is_zero_for_the_true_velocity_and_uses_the_generator():
    x0 = torch.randn(3, 2, 1, 4, 4)

    def oracle(x_t, t):  # knows x0, so v = (x_t - x0) / t = noise - x0
        return (x_t - x0) / t.view(-1, 1, 1, 1, 1)

    def draw(seed):
        return draw_noise_and_time(x0.shape, torch.Generator().manual_seed(seed), time_mean=0.0, time_std=1.0,
                                   time_shift=1.0)

    loss = rectified_flow_loss(oracle, x0, *draw(0))
    assert loss.dtype == torch.float32 and loss.item() < 1e-8
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    a = rectified_flow_loss(zero, x0, *draw(1))
    b = rectified_flow_loss(zero, x0, *draw(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_sampler_transports_noise_to_a_point_mass(shift):
    """For data concentrated at c the exact velocity is (x − c)/t; the sampler must land on c."""
    target = torch.tensor([[1.5, -2.0, 0.25]])
    noise = torch.randn(1, 3, generator=torch.Generator().manual_seed(0))
    out = euler_sample(lambda x, t: (x - target) / t.view(-1, 1), noise, steps=7, shift=shift)
    assert torch.allclose(out, target, atol=1e-5)


def test_generated_videos_are_deterministic_and_independent_of_batching():
    model = randomize_zero_init(tiny_dit(input_size=(2, 4, 4)))
    decode = lambda z: z.clamp(-1, 1)  # noqa: E731 (identity VAE)
    kwargs = dict(labels=[0, 1, 2], steps=3, cfg_scale=2.0, shift=1.0, device="cpu")
    a = generate_videos(model, decode, seeds=[5, 6, 7], batch_size=3, **kwargs)
    b = generate_videos(model, decode, seeds=[5, 6, 7], batch_size=1, **kwargs)
    assert a.shape == (3, 2, 4, 4, 3) and a.dtype.name == "uint8"
    assert (a == b).all()


def test_videos_to_uint8_range():
    video = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 1, 1)
    assert videos_to_uint8(video)[0, :, 0, 0, 0].tolist() == [0, 128, 255, 255]
