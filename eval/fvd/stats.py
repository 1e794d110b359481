"""Fréchet distance between Gaussians of features, and their streaming statistics.

d² = ‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2·tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2} in float64, covariance with
ddof = 1 (TF-GAN's convention), the trace term from symmetric eigendecompositions (never
``scipy.linalg.sqrtm``). :class:`FeatureStats` accumulates Σx, Σxxᵀ and n so that thousands of
clips never sit in memory at once and statistics merge across processes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from configs.files import atomic_output_path


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
            with safe_open(str(path), framework="numpy") as f:
                arrays = {k: f.get_tensor(k) for k in ("sum", "sum_outer", "n")}
                meta = (f.metadata() or {}).get("metadata", "{}")
        return cls.from_dict({"n": int(arrays["n"][0] if arrays["n"].ndim else arrays["n"]),
                              "sum": arrays["sum"], "sum_outer": arrays["sum_outer"],
                              "metadata": json.loads(meta)})
