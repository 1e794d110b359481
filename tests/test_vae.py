"""Tests of data/vae.py on tiny random diffusers VAEs saved to local folders (CPU, offline)."""

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from omegaconf import OmegaConf

from data.vae import VAE_REGISTRY, build_vae
from tests.paths import CONFIG_DIR
from tests.vae_fixtures import save_tiny_vae

VAE_CONFIGS = CONFIG_DIR / "vae"
DIFFUSERS_VAES = ("image", "wan", "cogvideox")

# A valid clip per VAE: (num_frames, height, width). Width != height catches H/W mix-ups.
CLIP = {"image": (3, 16, 24), "wan": (9, 16, 24), "cogvideox": (17, 16, 24)}
# Expected latent shape (C, T', H', W') of CLIP: 4 channels, 8x spatial, 4x temporal (video VAEs).
EXPECTED_LATENT = {"image": (4, 3, 2, 3), "wan": (4, 3, 2, 3), "cogvideox": (4, 5, 2, 3)}


def vae_cfg(name, path=None, **extra):
    """The shipped configs/vae/<name>.yaml with ``path`` (and any extra keys) filled in."""
    cfg = OmegaConf.load(VAE_CONFIGS / f"{name}.yaml")
    if path is not None:
        cfg.path = str(path)
    for key, value in extra.items():
        cfg[key] = value
    return cfg


def random_clip(num_frames, height, width, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, num_frames, height, width, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    """vae.name -> folder holding a tiny saved VAE of that kind."""
    root = tmp_path_factory.mktemp("vaes")
    return {name: save_tiny_vae(name, root / name) for name in DIFFUSERS_VAES}


@pytest.fixture(scope="module")
def vaes(vae_dirs):
    """vae.name -> VideoVAE built through build_vae from the shipped yaml."""
    return {name: build_vae(vae_cfg(name, path)) for name, path in vae_dirs.items()}


@pytest.fixture(scope="module")
def round_trips(vaes):
    """vae.name -> (clip, encode(clip), decode(encode(clip))) for CLIP[name], batch 2."""
    out = {}
    for name, vae in vaes.items():
        clip = random_clip(*CLIP[name], batch=2)
        latents = vae.encode(clip)
        out[name] = (clip, latents, vae.decode(latents))
    return out


def raw_latent_and_decode(vae, clip):
    """Unscaled posterior mean and its decoding straight through diffusers (frame loop for 2D VAEs)."""
    model = vae.model
    if vae.name == "image":
        frames = range(clip.shape[2])
        z = torch.stack([model.encode(clip[:, :, t]).latent_dist.mean for t in frames], dim=2)
        video = torch.stack([model.decode(z[:, :, t]).sample for t in frames], dim=2)
    else:
        z = model.encode(clip).latent_dist.mean
        video = model.decode(z).sample
    return z, video


def expected_scaling(name, config):
    """(shift, scale) per channel, computed from the VAE's config the way each model documents it."""
    if name == "wan":
        return torch.tensor(config.latents_mean), 1.0 / torch.tensor(config.latents_std)
    shift = torch.full((config.latent_channels,), float(config.get("shift_factor") or 0.0))
    return shift, torch.full((config.latent_channels,), float(config.scaling_factor))


def per_channel(values):
    return values.view(1, -1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------
# identity
# ---------------------------------------------------------------------------------------------


def test_identity_round_trip_is_exact_and_decode_clamps():
    vae = build_vae(OmegaConf.load(VAE_CONFIGS / "identity.yaml"))
    clip = random_clip(5, 6, 7)
    assert vae.latent_shape(5, 6, 7) == (3, 5, 6, 7)
    assert (vae.latent_channels, vae.temporal_compression, vae.spatial_compression) == (3, 1, 1)
    assert torch.equal(vae.decode(vae.encode(clip)), clip)
    assert torch.equal(vae.decode(clip * 3), (clip * 3).clamp(-1, 1))
    assert vae.identity_key() == {"name": "identity", "config_hash": "identity"}


# ---------------------------------------------------------------------------------------------
# diffusers VAEs: shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIFFUSERS_VAES)
def test_loaded_frozen_with_compressions_from_config(vaes, name):
    vae = vaes[name]
    assert vae.name == name
    assert vae.latent_channels == 4 and vae.spatial_compression == 8
    assert vae.temporal_compression == (1 if name == "image" else 4)
    assert not vae.model.training
    assert not any(p.requires_grad for p in vae.model.parameters())


@pytest.mark.parametrize("name", DIFFUSERS_VAES)
def test_latent_shape_matches_encode_output(vaes, round_trips, name):
    vae = vaes[name]
    clip, latents, _ = round_trips[name]
    assert vae.latent_shape(*CLIP[name]) == EXPECTED_LATENT[name]
    assert latents.shape == (2, *EXPECTED_LATENT[name]) and latents.dtype == torch.float32
    single_frame = vae.encode(random_clip(1, 8, 16))
    assert single_frame.shape[1:] == vae.latent_shape(1, 8, 16) == (4, 1, 1, 2)


@pytest.mark.parametrize(
    "name, num_frames, rule, nearest",
    [("wan", 6, "num_frames = 4k+1", "5 or 9"), ("wan", 0, "num_frames = 4k+1", "1"),
     ("cogvideox", 13, "num_frames = 8k+1", "9 or 17"), ("cogvideox", 5, "num_frames = 8k+1", "1 or 9")],
)
def test_invalid_frame_count_names_vae_rule_and_nearest_values(vaes, name, num_frames, rule, nearest):
    with pytest.raises(ValueError) as error:
        vaes[name].latent_shape(num_frames, 16, 16)
    message = str(error.value)
    for part in (name, f"{num_frames} frames at 16x16", rule, f"e.g. {nearest}"):
        assert part in message


@pytest.mark.parametrize("name", DIFFUSERS_VAES)
def test_invalid_spatial_size_names_rule_and_nearest_values(vaes, name):
    num_frames = CLIP[name][0]
    with pytest.raises(ValueError) as error:
        vaes[name].latent_shape(num_frames, 30, 4)
    message = str(error.value)
    assert f"{num_frames} frames at 30x4" in message
    assert "height divisible by 8" in message and "nearest valid height: 24 or 32" in message
    assert "width divisible by 8" in message and "nearest valid width: 8" in message


def test_encode_checks_the_clip_before_running_the_vae(vaes):
    with pytest.raises(ValueError, match="4k\\+1"):
        vaes["wan"].encode(random_clip(6, 16, 16))
    with pytest.raises(ValueError, match="\\(B, 3, T, H, W\\)"):
        vaes["wan"].encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(ValueError, match="\\(B, 4, T', H', W'\\)"):
        vaes["wan"].decode(torch.zeros(1, 3, 2, 2, 2))


# ---------------------------------------------------------------------------------------------
# diffusers VAEs: values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIFFUSERS_VAES)
def test_round_trip_keeps_shape_and_range(round_trips, name):
    clip, _, video = round_trips[name]
    assert video.shape == clip.shape and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1


@pytest.mark.parametrize("name", DIFFUSERS_VAES)
def test_scaling_applied_on_encode_and_undone_on_decode(vaes, round_trips, name):
    vae = vaes[name]
    clip, latents, video = round_trips[name]
    raw_z, raw_video = raw_latent_and_decode(vae, clip)
    shift, scale = expected_scaling(name, vae.model.config)
    assert (scale - 1).abs().max() > 0.05  # the fixtures scale visibly (image and wan also shift)
    expected = (raw_z - per_channel(shift)) * per_channel(scale)
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(video, raw_video.clamp(-1, 1), atol=1e-5, rtol=1e-4)
    # The check is sensitive: decoding the scaled latents without undoing the scaling differs.
    first = (lambda x: x[:, :, 0]) if name == "image" else (lambda x: x)
    not_undone = vae.model.decode(first(latents)).sample.clamp(-1, 1)
    assert (not_undone - first(raw_video).clamp(-1, 1)).abs().max() > 1e-3


def test_scaling_factor_override_from_yaml(vae_dirs, vaes):
    override = build_vae(vae_cfg("image", vae_dirs["image"], scaling_factor=2.0))
    clip = random_clip(*CLIP["image"])
    default = vaes["image"].encode(clip)  # (z - 0.1) * 0.5 with shift/scaling from config.json
    torch.testing.assert_close(override.encode(clip), default / 0.5 * 2.0, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ("wan", "cogvideox"))
def test_sample_draws_from_posterior_reproducibly(vaes, name):
    vae, clip = vaes[name], random_clip(5 if name == "wan" else 9, 16, 16)
    draw = lambda seed: vae.encode(clip, sample=True, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    assert not torch.equal(draw(1), vae.encode(clip))


def test_image_frame_chunks_do_not_change_results(vae_dirs, vaes, round_trips):
    clip, latents, video = round_trips["image"]  # batch 2 x 3 frames = 6 images
    chunked = build_vae(vae_cfg("image", vae_dirs["image"], frame_chunk=4))
    torch.testing.assert_close(chunked.encode(clip), latents, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked.decode(latents), video, atol=1e-5, rtol=1e-4)


def test_dtype_is_applied_and_outputs_are_float32(vae_dirs):
    vae = build_vae(vae_cfg("image", vae_dirs["image"]), dtype=torch.bfloat16)
    assert vae.model.dtype == torch.bfloat16
    latents = vae.encode(random_clip(2, 16, 16))
    assert latents.dtype == torch.float32 and vae.decode(latents).dtype == torch.float32
    assert vae.identity_key() == build_vae(vae_cfg("image", vae_dirs["image"])).identity_key()


# ---------------------------------------------------------------------------------------------
# identity keys
# ---------------------------------------------------------------------------------------------

# A config.json change per VAE that leaves the latent scaling alone.
CONFIG_CHANGE = {"image": {"sample_size": 64}, "wan": {"dropout": 0.1}, "cogvideox": {"sample_height": 64}}


@pytest.mark.parametrize("name", DIFFUSERS_VAES)
def test_identity_key_stable_across_loads_and_tracks_the_config(vae_dirs, vaes, tmp_path, name):
    key = vaes[name].identity_key()
    assert set(key) == {"name", "path", "config_hash"} and key["name"] == name
    assert key["path"] == str(Path(vae_dirs[name]).resolve()) and len(key["config_hash"]) == 64
    assert build_vae(vae_cfg(name, vae_dirs[name])).identity_key() == key

    changed = save_tiny_vae(name, tmp_path / "changed", **CONFIG_CHANGE[name])
    assert build_vae(vae_cfg(name, changed)).identity_key()["config_hash"] != key["config_hash"]
    rescaled = build_vae(vae_cfg(name, vae_dirs[name], scaling_factor=3.0))
    assert rescaled.identity_key()["config_hash"] != key["config_hash"]


def test_identity_key_ignores_the_diffusers_version_that_wrote_the_config(vae_dirs, tmp_path):
    copy = Path(shutil.copytree(vae_dirs["wan"], tmp_path / "wan"))
    config = json.loads((copy / "config.json").read_text())
    config["_diffusers_version"] = "0.0.1"
    (copy / "config.json").write_text(json.dumps(config))
    original = build_vae(vae_cfg("wan", vae_dirs["wan"])).identity_key()["config_hash"]
    assert build_vae(vae_cfg("wan", copy)).identity_key()["config_hash"] == original


# ---------------------------------------------------------------------------------------------
# build_vae errors
# ---------------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as error:
        build_vae(OmegaConf.create({"name": "sdxl"}))
    assert "'sdxl'" in str(error.value)
    for name in VAE_REGISTRY:
        assert name in str(error.value)


@pytest.mark.parametrize("name", DIFFUSERS_VAES)
def test_shipped_yaml_keys_and_missing_path(name):
    cfg = vae_cfg(name)
    assert tuple(cfg.keys()) == VAE_REGISTRY[name].config_keys
    assert OmegaConf.is_missing(cfg, "path") and cfg.scaling_factor is None
    with pytest.raises(ValueError, match="vae.path is not set"):
        build_vae(cfg)
    with pytest.raises(ValueError, match="vae.path is not set"):
        build_vae(vae_cfg(name, ""))


def test_path_must_be_a_local_vae_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="vae.path=.* is not a local folder"):
        build_vae(vae_cfg("wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"))
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json .*use its vae/ subfolder"):
        build_vae(vae_cfg("wan", tmp_path))


def test_vae_kind_must_match_the_folder(vae_dirs):
    with pytest.raises(ValueError, match="holds AutoencoderKLCogVideoX weights.*use vae=cogvideox"):
        build_vae(vae_cfg("wan", vae_dirs["cogvideox"]))


def test_unknown_yaml_key_lists_valid_keys(vae_dirs):
    with pytest.raises(ValueError, match="\\['frame_chunk'\\].*valid keys: name, path, scaling_factor"):
        build_vae(vae_cfg("wan", vae_dirs["wan"], frame_chunk=8))


def test_wan_without_4x_temporal_compression_is_refused(tmp_path):
    path = save_tiny_vae("wan", tmp_path / "wan2x", temperal_downsample=[False, True, False])
    with pytest.raises(ValueError, match="compresses time 2x"):
        build_vae(vae_cfg("wan", path))


def test_wan22_style_patchified_vae_compresses_space_16x(tmp_path):
    path = save_tiny_vae(
        "wan", tmp_path / "wan22", is_residual=True, patch_size=2, in_channels=12, out_channels=12,
        base_dim=8, scale_factor_spatial=16,
    )
    vae = build_vae(vae_cfg("wan", path))
    clip = random_clip(5, 16, 32)
    latents = vae.encode(clip)
    assert vae.spatial_compression == 16
    assert latents.shape[1:] == vae.latent_shape(5, 16, 32) == (4, 2, 1, 2)
    assert vae.decode(latents).shape == clip.shape
