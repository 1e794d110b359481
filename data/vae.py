"""Video VAEs behind one small interface: pixel space, per-frame image VAEs, Wan and CogVideoX.

Every VAE maps a clip to *scaled* latents the diffusion model trains on and back:

    video   (B, 3, T, H, W)   float in [-1, 1]
    latents (B, C, T', H', W') float32, normalised (roughly zero mean / unit variance)

with ``(C, T', H', W') = vae.latent_shape(T, H, W)``. The latent normalisation is always
``z_scaled = (z - shift) * scale`` with per-channel ``shift`` / ``scale`` read from the VAE's
own config (``shift_factor``/``scaling_factor`` or ``latents_mean``/``latents_std``), so the
rest of the framework never needs to know which VAE produced its latents.

Weights are only ever loaded from a local diffusers folder (``vae.path``); nothing is
fetched from a model hub. Use ``build_vae(cfg.vae)`` to get one.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

# Keys of config.json that describe how the file was written, not the VAE itself; they are
# left out of the config hash so re-saving a VAE with another diffusers version keeps its
# latents valid.
_CONFIG_METADATA_KEYS = ("_diffusers_version", "_name_or_path")


# --------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------


class VideoVAE(nn.Module, abc.ABC):
    """Abstract video VAE: ``encode`` clips to scaled latents and ``decode`` them back.

    Subclasses set the attributes below and implement the abstract methods.

    Clip shape rule (checked by ``latent_shape``): ``num_frames = frame_multiple * k + 1``
    (any count >= 1 when ``frame_multiple`` is 1) and height, width divisible by
    ``spatial_compression``. Then ``T' = (T - 1) // temporal_compression + 1`` and
    ``H' = H // spatial_compression``, ``W' = W // spatial_compression``.
    """

    name: str
    latent_channels: int
    temporal_compression: int = 1
    spatial_compression: int = 1
    frame_multiple: int = 1
    config_keys: tuple[str, ...] = ("name",)  # keys its configs/vae/*.yaml may hold

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Latent shape ``(C, T', H', W')`` of a clip of ``num_frames`` frames of ``height x width``.

        Raises ValueError naming this VAE, the requested clip shape, the rule it breaks and the
        nearest valid values.
        """
        problems = self._frame_problems(num_frames) + self._spatial_problems(height, width)
        if problems:
            raise ValueError(
                f"The {self.name} VAE cannot encode a clip of {num_frames} frames at "
                f"{height}x{width} (height x width): " + "; ".join(problems) + ". "
                "Change the clip length / resolution in the data config or pick another vae."
            )
        return (
            self.latent_channels,
            (num_frames - 1) // self.temporal_compression + 1,
            height // self.spatial_compression,
            width // self.spatial_compression,
        )

    def _frame_problems(self, num_frames: int) -> list[str]:
        m = self.frame_multiple
        if num_frames >= 1 and (num_frames - 1) % m == 0:
            return []
        if m == 1:
            return [f"{self.name} needs num_frames >= 1"]
        below, above = _nearest_valid(num_frames - 1, m)
        examples = " or ".join(str(v + 1) for v in (below, above) if v is not None)
        return [
            f"{self.name} needs num_frames = {m}k+1, e.g. {examples} "
            f"(nearest to the requested {num_frames})"
        ]

    def _spatial_problems(self, height: int, width: int) -> list[str]:
        s = self.spatial_compression
        problems = []
        for dim, size in (("height", height), ("width", width)):
            if size < s or size % s:
                below, above = _nearest_valid(size, s, minimum=s)
                nearest = " or ".join(str(v) for v in (below, above) if v is not None)
                problems.append(
                    f"{self.name} needs {dim} divisible by {s} (it compresses space {s}x); "
                    f"nearest valid {dim}: {nearest} (requested {size})"
                )
        return problems

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: DictConfig, device: str | torch.device, dtype: torch.dtype) -> "VideoVAE":
        """Build from a validated ``configs/vae/*.yaml`` node (called by ``build_vae``)."""

    @abc.abstractmethod
    def encode(self, video: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, T, H, W) float in [-1, 1] -> scaled latents (B, C, T', H', W') float32.

        Deterministic (posterior mean) unless ``sample=True`` (then drawn with ``generator``).
        """

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, C, T', H', W') -> video (B, 3, T, H, W) float32 clamped to [-1, 1]."""

    @abc.abstractmethod
    def identity_key(self) -> dict[str, str]:
        """What latent manifests record to tell whether cached latents came from this VAE."""

    def _check_video(self, video: Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(
                f"{self.name} VAE encodes videos shaped (B, 3, T, H, W); got {tuple(video.shape)}"
            )
        self.latent_shape(*video.shape[2:])

    def _check_latents(self, latents: Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"{self.name} VAE decodes latents shaped (B, {self.latent_channels}, T', H', W'); "
                f"got {tuple(latents.shape)}"
            )


def _nearest_valid(value: int, multiple: int, minimum: int = 0) -> tuple[int | None, int]:
    """Closest multiples of ``multiple`` (>= ``minimum``) below and above ``value``."""
    below = (value // multiple) * multiple
    if below < minimum:
        return None, minimum
    return below, below + multiple


# --------------------------------------------------------------------------------------
# Pixel space
# --------------------------------------------------------------------------------------


class IdentityVAE(VideoVAE):
    """Pixel space: the latents are the video itself (3 channels, no compression)."""

    name = "identity"
    latent_channels = 3

    @classmethod
    def from_config(cls, cfg: DictConfig, device: str | torch.device, dtype: torch.dtype) -> "IdentityVAE":
        return cls()

    @torch.no_grad()
    def encode(self, video: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> the same values as float32 (no copy if already float32)."""
        self._check_video(video)
        return video.float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B, 3, T, H, W) -> the same values as float32, clamped to [-1, 1]."""
        self._check_latents(latents)
        return latents.float().clamp(-1.0, 1.0)

    def identity_key(self) -> dict[str, str]:
        return {"name": "identity", "config_hash": "identity"}


# --------------------------------------------------------------------------------------
# diffusers VAEs
# --------------------------------------------------------------------------------------


class DiffusersVAE(VideoVAE):
    """Shared machinery of the diffusers-backed VAEs.

    Subclasses name the diffusers class (``model_class_name``) and read their compression
    factors and latent normalisation from the loaded model's config in ``_describe``.
    ``self.model`` is the frozen diffusers VAE (eval mode, ``requires_grad_(False)``).
    """

    model_class_name: str
    config_keys = ("name", "path", "scaling_factor")

    def __init__(self, model: nn.Module, path: str, config_json: dict, scaling_factor: float | None = None):
        super().__init__()
        self.model = model
        self.path = path
        shift, scale = self._describe(model.config, scaling_factor)
        # Plain float32 CPU tensors (C,), not buffers: `.to(dtype)` on the module must not round them.
        self.shift = _per_channel(shift, self.latent_channels, "shift")
        self.scale = _per_channel(scale, self.latent_channels, "scale")
        self._config_hash = _config_hash(config_json, self.shift, self.scale)

    @abc.abstractmethod
    def _describe(self, config: Any, scaling_factor: float | None) -> tuple[Any, Any]:
        """Set latent_channels / compressions / frame_multiple from ``config``; return (shift, scale).

        ``shift`` / ``scale`` are scalars or per-channel lists: latents = (z - shift) * scale.
        """

    # ---- loading ----------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: DictConfig, device: str | torch.device, dtype: torch.dtype) -> "DiffusersVAE":
        path = _required_path(cfg)
        config_json = _read_config_json(path, cls)
        model = _load_frozen(cls.model_class_name, path, device, dtype)
        options = {key: cfg[key] for key in cls.config_keys if key in cfg and key not in ("name", "path")}
        return cls(model, path, config_json, **options)

    # ---- encode / decode --------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, T, H, W) float in [-1, 1] -> scaled latents (B, C, T', H', W') float32.

        Uses the posterior mean unless ``sample=True``.
        """
        self._check_video(video)
        video = video.to(device=self.model.device, dtype=self.model.dtype)
        z = self._encode_raw(video, sample, generator).float()
        return (z - _bcast(self.shift, z)) * _bcast(self.scale, z)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, C, T', H', W') -> video (B, 3, T, H, W) float32 clamped to [-1, 1]."""
        self._check_latents(latents)
        z = latents.to(device=self.model.device, dtype=torch.float32)
        z = z / _bcast(self.scale, z) + _bcast(self.shift, z)
        return self._decode_raw(z.to(self.model.dtype)).float().clamp(-1.0, 1.0)

    def _encode_raw(self, video: Tensor, sample: bool, generator: torch.Generator | None) -> Tensor:
        """(B, 3, T, H, W) in the model dtype -> unscaled latents (B, C, T', H', W')."""
        return _pick_latent(self.model.encode(video).latent_dist, sample, generator)

    def _decode_raw(self, z: Tensor) -> Tensor:
        """Unscaled latents (B, C, T', H', W') in the model dtype -> video (B, 3, T, H, W)."""
        return self.model.decode(z).sample

    # ---- identity ---------------------------------------------------------------------

    def identity_key(self) -> dict[str, str]:
        """{"name", "path", "config_hash"}: the hash covers config.json and the latent scaling."""
        return {"name": self.name, "path": self.path, "config_hash": self._config_hash}


class ImageVAE(DiffusersVAE):
    """A 2D ``AutoencoderKL`` (SD, SDXL, SD3, FLUX VAEs) applied to every frame on its own.

    Frames are folded into the batch and run ``frame_chunk`` at a time to bound memory.
    Scaling: ``(z - shift_factor) * scaling_factor`` (shift_factor 0 when the config has none).
    """

    name = "image"
    model_class_name = "AutoencoderKL"
    config_keys = ("name", "path", "scaling_factor", "frame_chunk")

    def __init__(
        self,
        model: nn.Module,
        path: str,
        config_json: dict,
        scaling_factor: float | None = None,
        frame_chunk: int = 32,
    ):
        super().__init__(model, path, config_json, scaling_factor)
        if int(frame_chunk) < 1:
            raise ValueError(f"vae.frame_chunk must be a positive number of frames; got {frame_chunk}")
        self.frame_chunk = int(frame_chunk)

    def _describe(self, config, scaling_factor):
        self.latent_channels = config.latent_channels
        self.spatial_compression = 2 ** (len(config.block_out_channels) - 1)
        return _shift_and_scaling_factor(config, scaling_factor)

    def _encode_raw(self, video, sample, generator):
        def encode_frames(frames: Tensor) -> Tensor:
            return _pick_latent(self.model.encode(frames).latent_dist, sample, generator)

        return _per_frame(encode_frames, video, self.frame_chunk)

    def _decode_raw(self, z):
        return _per_frame(lambda frames: self.model.decode(frames).sample, z, self.frame_chunk)


class WanVAE(DiffusersVAE):
    """Wan 2.1 / 2.2 causal video VAE (``AutoencoderKLWan``).

    The first frame is encoded alone, then every 4 frames become one latent frame, so clips need
    ``num_frames = 4k+1``. Normalisation: ``(z - latents_mean) / latents_std * scaling_factor``
    (per channel; ``scaling_factor`` defaults to 1).
    """

    name = "wan"
    model_class_name = "AutoencoderKLWan"
    # diffusers' AutoencoderKLWan._encode feeds the encoder 1 frame, then chunks of 4 frames.
    _ENCODER_CHUNK_FRAMES = 4

    def _describe(self, config, scaling_factor):
        self.latent_channels = config.z_dim
        self.spatial_compression = 2 ** (len(config.dim_mult) - 1) * (config.patch_size or 1)
        self.temporal_compression = 2 ** sum(bool(d) for d in config.temperal_downsample)
        if self.temporal_compression != self._ENCODER_CHUNK_FRAMES:
            raise ValueError(
                f"The wan VAE at vae.path={self.path} compresses time {self.temporal_compression}x "
                f"(temperal_downsample={list(config.temperal_downsample)}), but diffusers encodes Wan "
                f"clips in chunks of {self._ENCODER_CHUNK_FRAMES} frames; only 4x temporal "
                "compression (two True entries) gives consistent latents."
            )
        self.frame_multiple = self.temporal_compression
        mean, std = config.latents_mean, config.latents_std
        if mean is None or std is None:
            raise ValueError(f"The wan VAE config at vae.path={self.path} lacks latents_mean/latents_std")
        scaling = 1.0 if scaling_factor is None else float(scaling_factor)
        return mean, [scaling / s for s in std]


class CogVideoXVAE(DiffusersVAE):
    """CogVideoX causal video VAE (``AutoencoderKLCogVideoX``), input layout (B, C, T, H, W).

    Encoding keeps the first frame and averages the rest in pairs at each temporal downsample,
    so ``T' = (T - 1) / 4 + 1``. Decoding runs the latents in chunks of
    ``num_latent_frames_batch_size`` (2) after an odd first chunk; an even latent count decodes
    to the wrong number of frames, so clips need ``T'`` odd: ``num_frames = 8k+1`` (9, 17, 49).
    Scaling: ``(z - shift_factor) * scaling_factor``.
    """

    name = "cogvideox"
    model_class_name = "AutoencoderKLCogVideoX"

    def _describe(self, config, scaling_factor):
        self.latent_channels = config.latent_channels
        num_downsamples = len(config.block_out_channels) - 1
        self.spatial_compression = 2**num_downsamples
        # Only the first log2(ratio) down blocks compress time, and there is no downsample in the last.
        time_downsamples = min(int(math.log2(config.temporal_compression_ratio)), num_downsamples)
        self.temporal_compression = 2**time_downsamples
        self.frame_multiple = self.temporal_compression * self.model.num_latent_frames_batch_size
        return _shift_and_scaling_factor(config, scaling_factor)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _required_path(cfg: DictConfig) -> str:
    """The local VAE folder named by ``vae.path``; a clear error when it is unset or missing."""
    name = cfg.get("name", "?")
    if OmegaConf.is_missing(cfg, "path") or not cfg.get("path"):
        raise ValueError(
            f"vae.path is not set for vae={name}: set it to a local diffusers VAE folder "
            f"(with config.json), e.g. `vae.path=/models/my-{name}-vae`"
        )
    path = Path(str(cfg.path)).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"vae.path={cfg.path} is not a local folder. VAEs are loaded from local folders only "
            "(no model hub): download the weights first and point vae.path at that folder."
        )
    return str(path.resolve())


def _read_config_json(path: str, vae_class: type[DiffusersVAE]) -> dict:
    """config.json of the VAE folder, checked to hold the diffusers class ``vae_class`` expects."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        is_pipeline = (Path(path) / "vae").is_dir()
        hint = " (it looks like a pipeline folder: use its vae/ subfolder)" if is_pipeline else ""
        raise FileNotFoundError(
            f"vae.path={path} has no config.json{hint}; point vae.path at a diffusers VAE folder "
            "holding config.json and diffusion_pytorch_model.safetensors"
        )
    config = json.loads(config_file.read_text())
    found = config.get("_class_name")
    if found is not None and found != vae_class.model_class_name:
        matching = [n for n, c in VAE_REGISTRY.items() if getattr(c, "model_class_name", None) == found]
        fix = f"use vae={matching[0]}" if matching else "point vae.path at a matching VAE"
        raise ValueError(
            f"vae.path={path} holds {found} weights, but vae={vae_class.name} expects "
            f"{vae_class.model_class_name}: {fix}"
        )
    return config


def _load_frozen(class_name: str, path: str, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """``from_pretrained`` a diffusers class from a local folder, in eval mode without gradients."""
    import diffusers  # imported lazily: pixel-space runs never need it

    model_class = getattr(diffusers, class_name)
    model = model_class.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def _shift_and_scaling_factor(config: Any, scaling_factor: float | None) -> tuple[float, float]:
    """(shift_factor or 0, yaml override or config scaling_factor) of a KL autoencoder config."""
    shift = getattr(config, "shift_factor", None) or 0.0
    scale = config.scaling_factor if scaling_factor is None else scaling_factor
    return float(shift), float(scale)


def _per_channel(value: float | list[float], channels: int, what: str) -> Tensor:
    """A scalar or per-channel list as a float32 tensor of shape (channels,)."""
    tensor = torch.as_tensor(value, dtype=torch.float32).flatten()
    if tensor.numel() == 1:
        return tensor.expand(channels).clone()
    if tensor.numel() != channels:
        raise ValueError(f"VAE latent {what} has {tensor.numel()} values for {channels} latent channels")
    return tensor


def _bcast(per_channel: Tensor, like: Tensor) -> Tensor:
    """(C,) -> (1, C, 1, 1, 1) on ``like``'s device, to broadcast over (B, C, T, H, W)."""
    return per_channel.to(like.device).view(1, -1, 1, 1, 1)


def _config_hash(config_json: dict, shift: Tensor, scale: Tensor) -> str:
    """sha256 of canonical JSON of config.json (minus writer metadata) and the (C,) shift/scale."""
    config = {k: v for k, v in config_json.items() if k not in _CONFIG_METADATA_KEYS}
    record = {"config": config, "shift": shift.tolist(), "scale": scale.tolist()}
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _pick_latent(posterior: Any, sample: bool, generator: torch.Generator | None) -> Tensor:
    """Posterior mean, or a draw from it when ``sample``."""
    return posterior.sample(generator) if sample else posterior.mean


def _per_frame(fn: Callable[[Tensor], Tensor], video: Tensor, chunk: int) -> Tensor:
    """Apply a 2D ``fn`` ((N, C, H, W) -> (N, C', H', W')) to every frame of (B, C, T, H, W).

    Frames are folded into the batch and processed ``chunk`` at a time; returns (B, C', T, H', W').
    """
    b, c, t, h, w = video.shape
    frames = video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    out = torch.cat([fn(part) for part in frames.split(chunk)])
    return out.reshape(b, t, *out.shape[1:]).permute(0, 2, 1, 3, 4)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

VAE_REGISTRY: dict[str, type[VideoVAE]] = {
    "identity": IdentityVAE,
    "image": ImageVAE,
    "wan": WanVAE,
    "cogvideox": CogVideoXVAE,
}


def build_vae(
    vae_cfg: DictConfig | dict,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VideoVAE:
    """Build the VAE described by a ``configs/vae/*.yaml`` node (dispatch on ``vae_cfg.name``).

    Diffusers VAEs load from the local folder ``vae_cfg.path`` onto ``device`` in ``dtype``,
    frozen and in eval mode. Unknown names or keys raise ValueError listing the valid ones.
    """
    cfg = vae_cfg if isinstance(vae_cfg, DictConfig) else OmegaConf.create(vae_cfg)
    name = cfg.get("name")
    if name not in VAE_REGISTRY:
        raise ValueError(f"Unknown vae.name={name!r}; valid names: {', '.join(VAE_REGISTRY)}")
    vae_class = VAE_REGISTRY[name]
    unknown = [key for key in cfg if key not in vae_class.config_keys]
    if unknown:
        valid = ", ".join(vae_class.config_keys)
        raise ValueError(f"Unknown key(s) {unknown} in the vae={name} config; valid keys: {valid}")
    return vae_class.from_config(cfg, device, dtype)
