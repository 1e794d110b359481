"""Pre-extracted latents: the directory format written by ``data.extract_latents`` and a
dataset that trains from it.

Layout of a latent directory (``out=`` of the extraction, ``data.root=`` of ``data=latents``)::

    <root>/
        shard_00000.safetensors   clips [0, shard_size): tensors ``latents`` (n, C, T', H', W')
        shard_00001.safetensors   and ``labels`` (n,) int64; the header metadata (key
        ...                       ``linvid_shard``) holds each clip's source path, frame
                                  indices, label (and caption), and the extraction settings;
                                  with a text encoder also ``text`` (n, L, D) caption
                                  embeddings trimmed to the shard's longest caption and
                                  ``text_lengths`` (n,) tokens per caption
        empty_caption.safetensors with a text encoder: the embedding of "" (caption dropout)
        skipped_files.txt         files the extraction skipped, ``path<TAB>reason`` per line
        manifest.json             written last, once every shard is complete

Every file is written atomically (temporary file + rename), so a directory either has a
``manifest.json`` that describes complete shards, or it is an unfinished extraction that
re-running the same command completes.

``LatentDataset`` refuses, with the reason, a directory without a manifest, one whose
manifest and shards disagree, latents made by another VAE than the run's ``vae`` config,
and a ``data.num_classes`` smaller than the labels present.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import Dataset

from configs.schema import config_path
from data import vae as vae_module
from data.text import pad_embeddings

FORMAT = "linvid-latents"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SKIPPED_NAME = "skipped_files.txt"
EMPTY_CAPTION_NAME = "empty_caption.safetensors"  # caption extractions: the embedding of "" (caption dropout)
SHARD_METADATA_KEY = "linvid_shard"
# Keys a data=latents config may hold; num_workers and fps are read by train.py.
CONFIG_KEYS = ("name", "root", "num_classes", "fps", "num_workers", "caption_dropout")


class LatentDirectoryError(ValueError):
    """A latent directory is missing, unfinished, inconsistent, or does not match the run."""


def shard_name(shard: int) -> str:
    return f"shard_{shard:05d}.safetensors"


def shard_files(root: Path) -> list[Path]:
    """Shard files present in ``root`` (complete ones only: temporaries are hidden files)."""
    return sorted(root.glob("shard_*.safetensors"))


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: the same value always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- VAE identity


def vae_identity_key(vae_cfg: Mapping) -> dict[str, str]:
    """``build_vae(vae_cfg).identity_key()`` without loading the weights.

    For diffusers VAEs the model is instantiated from its config.json on the meta device
    (no memory, no weight reads), which is all the identity (name, path, config hash of
    config.json and the latent scaling) depends on. Falls back to loading the VAE if that
    is not possible. Raises the same errors as ``build_vae`` for bad configs.
    """
    cfg = vae_cfg if isinstance(vae_cfg, DictConfig) else OmegaConf.create(dict(vae_cfg))
    vae_class = vae_module.VAE_REGISTRY.get(cfg.get("name"))
    if vae_class is None or not issubclass(vae_class, vae_module.DiffusersVAE):
        return vae_module.build_vae(cfg).identity_key()  # unknown names fail there; identity is free
    unknown = [key for key in cfg if key not in vae_class.config_keys]
    if unknown:
        return vae_module.build_vae(cfg).identity_key()  # raises the usual "unknown key(s)" error
    path = vae_module._required_path(cfg)
    config_json = vae_module._read_config_json(path, vae_class)
    options = {key: cfg[key] for key in vae_class.config_keys if key in cfg and key not in ("name", "path")}
    try:
        import diffusers
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = getattr(diffusers, vae_class.model_class_name).from_config(config_json)
    except Exception:  # an exotic config: load it the normal way
        return vae_module.build_vae(cfg).identity_key()
    return vae_class(model, path, config_json, **options).identity_key()


def describe_vae(key: Mapping) -> str:
    where = f" at {key['path']}" if key.get("path") else ""
    return f"the {key.get('name')} VAE{where} (config hash {str(key.get('config_hash'))[:12]})"


def same_vae(a: Mapping, b: Mapping) -> bool:
    """Same VAE name and config hash (a moved VAE folder is still the same VAE)."""
    return a.get("name") == b.get("name") and a.get("config_hash") == b.get("config_hash")


# --------------------------------------------------------------------------- manifest


def _unfinished_hint(root: Path) -> str:
    return (
        f"re-run the same `python -m data.extract_latents ... out={root}` command to finish it "
        "(completed shards are kept)"
    )


def read_manifest(root: str | os.PathLike) -> dict:
    """The parsed ``manifest.json`` of a latent directory, with a clear error when absent."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise LatentDirectoryError(
            f"latent directory data.root={root} does not exist; create it with "
            f"`python -m data.extract_latents data=videos data.root=<videos> vae=<vae> out={root}`"
        )
    path = root / MANIFEST_NAME
    if not path.is_file():
        shards = shard_files(root)
        if shards:
            raise LatentDirectoryError(
                f"latent directory {root} has {len(shards)} shard file(s) but no {MANIFEST_NAME}: "
                f"the extraction is unfinished (interrupted, or still running); {_unfinished_hint(root)}"
            )
        raise LatentDirectoryError(
            f"{root} has no {MANIFEST_NAME}, so it is not a (finished) latent directory; create one with "
            f"`python -m data.extract_latents data=videos data.root=<videos> vae=<vae> out={root}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise LatentDirectoryError(f"{path} is not valid JSON ({error}); {_unfinished_hint(root)}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LatentDirectoryError(f"{path} is not a linvid latent manifest (format {FORMAT!r} expected)")
    if manifest.get("version") != FORMAT_VERSION:
        raise LatentDirectoryError(
            f"{path} has format version {manifest.get('version')}; this linvid reads version {FORMAT_VERSION}: "
            "re-extract the latents"
        )
    return manifest


def _check_config(data_cfg: Mapping) -> None:
    if data_cfg.get("name") != "latents":
        raise LatentDirectoryError(f"LatentDataset needs a data=latents config, got data.name={data_cfg.get('name')!r}")
    unknown = [key for key in data_cfg if key not in CONFIG_KEYS]
    if unknown:
        raise LatentDirectoryError(
            f"unknown key(s) {unknown} in the data=latents config; valid keys: {', '.join(CONFIG_KEYS)} "
            "(clip settings are fixed at extraction time and read from the manifest)"
        )
    missing = [key for key in ("num_classes",) if key not in data_cfg]
    if missing:  # configs/data/latents.yaml is the home of the defaults
        raise LatentDirectoryError(f"the data=latents config lacks key(s) {missing}; see configs/data/latents.yaml")
    num_classes = data_cfg.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise LatentDirectoryError(f"data.num_classes must be an integer >= 0, got {num_classes!r}")


def latent_root(data_cfg: Mapping) -> Path:
    """The latent directory of a ``data=latents`` config, after checking the config's keys."""
    _check_config(data_cfg)
    root = config_path(data_cfg, "root")
    if root is None:
        raise LatentDirectoryError(
            "data.root is not set: pass data.root=<latent directory written by python -m data.extract_latents>"
        )
    return root


# --------------------------------------------------------------------------- dataset


class LatentDataset(Dataset):
    """Latent clips from a directory written by ``python -m data.extract_latents``.

    Shards are opened lazily with ``safetensors.safe_open`` (memory-mapped) in the process
    that reads them, e.g. each DataLoader worker; only the labels are held in memory.

    Keys: ``index`` or ``(index, sample_seed)`` (the seed is unused: a clip was fixed at
    extraction). Items: ``{"latents": float32 (C, T, H, W), "label": int64 scalar,
    "index": int}``, plus ``"text"``: float32 (max_length, D) caption embeddings zero-padded
    after the caption's tokens, when the extraction had a text encoder.

    Args:
        root: the latent directory.
        num_classes: the run's ``data.num_classes`` (0 = unconditional); checked against
            the labels present. None skips the check.
        vae_key: the run VAE's ``identity_key()``; checked against the VAE that made the
            latents. None skips the check.
    """

    def __init__(self, root: str | os.PathLike, *, num_classes: int | None = None,
                 vae_key: Mapping | None = None):
        self.root = Path(root).expanduser()
        self.manifest = read_manifest(self.root)
        self.latent_shape: tuple[int, ...] = tuple(int(n) for n in self.manifest["latent_shape"])
        self.skipped: list[tuple[str, str]] = []  # bad files were skipped at extraction (see skipped_files.txt)
        self.fps = self.manifest.get("fps")
        text_encoder = self.manifest.get("text_encoder")  # caption extractions only
        self.has_text = text_encoder is not None
        self.text_max_length = int(text_encoder["max_length"]) if self.has_text else 0
        if self.has_text and not (self.root / EMPTY_CAPTION_NAME).is_file():
            raise self._refuse(f"{EMPTY_CAPTION_NAME} is missing: {_unfinished_hint(self.root)}")
        if vae_key is not None:
            self._check_vae(vae_key)
        self._locations, labels = self._check_shards()
        self.labels = torch.tensor(labels, dtype=torch.int64)
        if num_classes is not None:
            self._check_num_classes(num_classes)
        self.num_classes = num_classes if num_classes is not None else self.manifest.get("num_classes", 0)
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, data_cfg: Mapping, *, vae_cfg: Mapping) -> "LatentDataset":
        """The dataset of a ``data=latents`` config, checked against the run's ``vae`` config."""
        root = latent_root(data_cfg)
        read_manifest(root)  # a missing directory or manifest is the first thing to report
        return cls(root, num_classes=data_cfg["num_classes"], vae_key=vae_identity_key(vae_cfg))

    def _refuse(self, reason: str) -> LatentDirectoryError:
        return LatentDirectoryError(f"latent directory {self.root} refused: {reason}")

    def _check_vae(self, vae_key: Mapping) -> None:
        made_by = self.manifest.get("vae", {})
        if not same_vae(made_by, vae_key):
            raise self._refuse(
                f"its latents were made by {describe_vae(made_by)}, but this run's vae config names "
                f"{describe_vae(vae_key)}; training on them would learn another VAE's latent space and "
                f"decode to garbage. Use the extraction's VAE (vae={made_by.get('name')}"
                + (f" vae.path={made_by['path']}" if made_by.get("path") else "")
                + ") or re-extract with this one."
            )

    def _check_shards(self) -> tuple[list[tuple[int, int]], list[int]]:
        """(shard, row) of every clip and the labels, after checking shards against the manifest."""
        manifest, shape = self.manifest, list(self.latent_shape)
        shards, clips = manifest["shards"], manifest["clips"]
        hint = "re-run the extraction into a new out= directory"
        if sum(s["num_clips"] for s in shards) != manifest["num_clips"] or len(clips) != manifest["num_clips"]:
            raise self._refuse(
                f"{MANIFEST_NAME} is inconsistent: num_clips={manifest['num_clips']}, {len(clips)} clip entries, "
                f"shards hold {sum(s['num_clips'] for s in shards)}; {hint}"
            )
        listed = {s["file"] for s in shards}
        extra = [p.name for p in shard_files(self.root) if p.name not in listed]
        if extra:
            raise self._refuse(f"shard file(s) {extra} are not in {MANIFEST_NAME} (latents of another extraction?); {hint}")
        locations, labels = [], []
        for shard, entry in enumerate(shards):
            path = self.root / entry["file"]
            if not path.is_file():
                raise self._refuse(f"{MANIFEST_NAME} lists {entry['file']} but the file is missing; {hint}")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise self._refuse(f"{entry['file']} has {size} bytes, {MANIFEST_NAME} says {entry['bytes']}; {hint}")
            try:
                with safe_open(str(path), framework="pt") as handle:
                    latent_shape = list(handle.get_slice("latents").get_shape())
                    shard_labels = handle.get_tensor("labels").tolist()
                    has_text = "text" in handle.keys()
            except Exception as error:
                raise self._refuse(f"{entry['file']} is unreadable ({type(error).__name__}: {error}); {hint}") from error
            if has_text != self.has_text:
                raise self._refuse(f"{entry['file']} {'has' if has_text else 'lacks'} caption embeddings, unlike "
                                   f"{MANIFEST_NAME}; {hint}")
            if latent_shape[1:] != shape:
                raise self._refuse(
                    f"{entry['file']} holds latents shaped {latent_shape[1:]} per clip, but {MANIFEST_NAME} says "
                    f"{shape}; {hint}"
                )
            if latent_shape[0] != entry["num_clips"] or len(shard_labels) != entry["num_clips"]:
                raise self._refuse(
                    f"{entry['file']} holds {latent_shape[0]} rows ({len(shard_labels)} labels), but "
                    f"{MANIFEST_NAME} says {entry['num_clips']} clips; {hint}"
                )
            start = len(locations)
            expected = [clip["label"] for clip in clips[start : start + entry["num_clips"]]]
            if shard_labels != expected:
                raise self._refuse(f"the labels in {entry['file']} differ from {MANIFEST_NAME}'s; {hint}")
            locations.extend((shard, row) for row in range(entry["num_clips"]))
            labels.extend(shard_labels)
        if not locations:
            raise self._refuse("it holds no clips")
        return locations, labels

    def _check_num_classes(self, num_classes: int) -> None:
        extracted = self.manifest.get("num_classes", 0)
        if num_classes == 0:
            return
        if extracted == 0:
            raise self._refuse(
                f"data.num_classes={num_classes}, but the latents were extracted without labels "
                "(data.num_classes=0 at extraction): train with data.num_classes=0, or re-extract with labels"
            )
        needed = int(self.labels.max()) + 1
        if num_classes < needed:
            raise self._refuse(
                f"data.num_classes={num_classes} is smaller than the labels present (0..{needed - 1}; "
                f"the extraction had {extracted} classes): set data.num_classes={extracted}"
            )

    # ----------------------------------------------------------------- items

    def __len__(self) -> int:
        return len(self._locations)

    def _handle(self, shard: int):
        if os.getpid() != self._pid:  # a forked DataLoader worker: open its own handles
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            path = self.root / self.manifest["shards"][shard]["file"]
            self._handles[shard] = safe_open(str(path), framework="pt")
        return self._handles[shard]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __getitem__(self, key) -> dict[str, Any]:
        if isinstance(key, (tuple, list)) and len(key) == 2:
            index = int(key[0])
        elif isinstance(key, int) or (torch.is_tensor(key) and key.ndim == 0) or hasattr(key, "__index__"):
            index = int(key)
        else:
            raise TypeError(f"dataset key must be an int or (index, sample_seed), got {key!r}")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latent clips")
        shard, row = self._locations[index]
        latents = self._handle(shard).get_slice("latents")[row : row + 1]
        item = {"latents": latents[0].float(), "label": self.labels[index].clone(), "index": index}
        if self.has_text:
            length = int(self._handle(shard).get_slice("text_lengths")[row : row + 1][0])
            text = self._handle(shard).get_slice("text")[row : row + 1][0, :length]
            item["text"] = pad_embeddings(text.float(), self.text_max_length)
        return item

    def empty_caption(self) -> Tensor:
        """(max_length, D) float32 embedding of the empty caption (caption dropout, unconditional guidance)."""
        with safe_open(str(self.root / EMPTY_CAPTION_NAME), framework="pt") as handle:
            length = int(handle.get_tensor("text_lengths")[0])
            return pad_embeddings(handle.get_tensor("text")[0, :length].float(), self.text_max_length)

    def clip_info(self, index: int) -> dict:
        """Source path, frame indices, label, shard and row of clip ``index`` (from the manifest)."""
        return dict(self.manifest["clips"][index])
