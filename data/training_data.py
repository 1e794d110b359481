"""A run's training data, from its config: the one place that knows what a run trains on.

A run trains on video clips encoded by its VAE on the fly (``data=demo`` / ``data=videos``)
or on latents extracted once by ``python -m data.extract_latents`` (``data=latents``).
Everything that depends on which (the dataset, the latent shape of one sample, the clip
length and frame sampling, the clean latents of a batch, the real videos FVD compares
with) is answered here, so the rest of linvid never checks ``data.name`` itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset

from data.datasets import VideoClipDataset, build_video_dataset, frame_size
from data.latents import LatentDataset, latent_root, read_manifest
from data.vae import VideoVAE, build_vae

DEFAULT_FPS = 8.0  # frame rate of written videos when neither the data config nor a manifest names one


class TrainingData:
    """The training data of one run config (``data`` and ``vae`` nodes and the run ``seed``).

    Args:
        data_cfg: the run's ``data`` node (``configs/data/*.yaml``).
        vae_cfg: the run's ``vae`` node; pre-extracted latents are checked against it.
        seed: the run seed (video clip sampling).
    """

    def __init__(self, data_cfg: Mapping, vae_cfg: Mapping, *, seed: int):
        self.data_cfg, self.vae_cfg, self.seed = data_cfg, vae_cfg, int(seed)
        self.is_latents = data_cfg["name"] == "latents"

    @classmethod
    def of_run(cls, run_cfg: Mapping) -> "TrainingData":
        """The training data of a whole run config (e.g. a checkpoint's ``config.yaml``)."""
        return cls(run_cfg["data"], run_cfg["vae"], seed=run_cfg["seed"])

    # ------------------------------------------------------------------ what one sample is

    def clip_settings(self) -> dict:
        """The clip settings (num_frames, frame_stride, target_fps, resolution, ...) of one sample.

        Pre-extracted latents: the settings fixed at extraction, from their manifest.
        """
        if self.is_latents:
            return dict(read_manifest(latent_root(self.data_cfg))["data"])
        return _plain(self.data_cfg)

    def clip_frames(self) -> int:
        """Frames per training clip, i.e. per generated video."""
        return int(self.clip_settings()["num_frames"])

    def frame_sampling(self) -> tuple[int, float | None]:
        """(frame_stride, target_fps) of the training clips (stride 1 when resampled to a rate)."""
        settings = self.clip_settings()
        target_fps = settings.get("target_fps")
        if target_fps:
            return 1, float(target_fps)
        return int(settings.get("frame_stride") or 1), None

    def fps(self) -> float:
        """Frame rate for written videos: ``data.fps``, else the extraction's, else 8."""
        if self.data_cfg.get("fps"):
            return float(self.data_cfg["fps"])
        if self.is_latents:
            return float(read_manifest(latent_root(self.data_cfg)).get("fps") or DEFAULT_FPS)
        return DEFAULT_FPS

    def has_captions(self) -> bool:
        """Whether the training data holds caption embeddings (latents extracted with a text encoder)."""
        return self.is_latents and "text_encoder" in read_manifest(latent_root(self.data_cfg))

    def text_encoder_identity(self) -> dict:
        """The text encoder (path, config hash, max_length) that made a captioned extraction's embeddings."""
        record = read_manifest(latent_root(self.data_cfg)).get("text_encoder") if self.is_latents else None
        if record is None:
            raise ValueError("this run's training data has no caption embeddings (extract latents with "
                             "text_encoder.path=<a local UMT5 encoder> for text-to-video training)")
        return record

    def latent_shape(self, vae: VideoVAE) -> tuple[int, int, int, int]:
        """Shape (C, T, H, W) of one sample in latent space, from configs (or the manifest) alone.

        Video data: the VAE's latent shape of the configured clip (raises for clips the VAE
        cannot encode). Pre-extracted latents: the shape recorded in their manifest.
        """
        if self.is_latents:
            return tuple(int(n) for n in read_manifest(latent_root(self.data_cfg))["latent_shape"])
        return tuple(vae.latent_shape(self.data_cfg["num_frames"], *frame_size(self.data_cfg["resolution"])))

    # ------------------------------------------------------------------ the data itself

    def vae_config(self) -> Mapping:
        """The run's ``vae`` node, with ``vae=auto`` resolved: identity for video data, the latents' own VAE."""
        if self.vae_cfg["name"] != "auto":
            return self.vae_cfg
        if not self.is_latents:
            return OmegaConf.create({"name": "identity"})
        made_by = read_manifest(latent_root(self.data_cfg))["vae"]
        return OmegaConf.create({key: made_by[key] for key in ("name", "path") if made_by.get(key)})

    def build_vae(self, device: torch.device | str = "cpu") -> VideoVAE:
        """The run's VAE (:meth:`vae_config`) on ``device``: what encodes its clips and decodes its samples."""
        return build_vae(self.vae_config(), device=device)

    def dataset(self, *, centred: bool = False) -> Dataset:
        """The training dataset; items hold ``"latents"`` or ``"video"``, plus ``"label"``.

        ``centred``: video clips taken from the middle of each video instead of at a random
        start (fixed clips for validation and FVD; extracted latents are fixed anyway).
        """
        if self.is_latents:
            return LatentDataset.from_config(self.data_cfg, vae_cfg=self.vae_config())
        cfg = self.data_cfg
        if centred:
            cfg = OmegaConf.create({**_plain(cfg), "random_start": False})
        return build_video_dataset(cfg, seed=self.seed)

    def clean_latents(self, batch: Mapping[str, Tensor], vae: VideoVAE, device: torch.device | str) -> Tensor:
        """x₀ (B, C, T, H, W) float32 on ``device`` of a batch of this dataset (encoded without gradients)."""
        if self.is_latents:
            return batch["latents"].to(device)
        with torch.no_grad():
            return vae.encode(batch["video"].to(device))

    def real_videos(self, dataset: Dataset, indices: Sequence[int], vae: VideoVAE) -> Tensor:
        """(B, 3, T, H, W) float in [-1, 1]: the videos of items ``indices`` as the run sees them.

        Video data: the clips themselves. Latents: decoded by ``vae`` (the run's VAE).
        """
        if self.is_latents:
            return vae.decode(torch.stack([dataset[int(i)]["latents"] for i in indices]))
        return torch.stack([dataset[(int(i), 0)]["video"] for i in indices])

    def describe(self, dataset: Dataset) -> str:
        """Where the training clips come from, for reports."""
        if self.is_latents:
            return f"pre-extracted latents {dataset.root} ({len(dataset)} clips)"
        assert isinstance(dataset, VideoClipDataset)
        return f"data={self.data_cfg['name']} {dataset.source}, {len(dataset)} videos"


def _plain(node: Mapping) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
