"""Caption embeddings for text-to-video DiTs, as Wan2.1 conditions on them.

A local, diffusers-style UMT5 text encoder folder (e.g. a Wan pipeline's ``text_encoder/``)
turns captions into embeddings (B, L, D): each caption is tokenised (padding to
``max_length`` tokens, Wan: 512), encoded with its attention mask, trimmed to its real
tokens and zero-padded back to ``max_length`` — no mask is passed to the transformer.
The tokenizer is read from the sibling ``tokenizer/`` folder or from the same folder.
Nothing is fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path

import torch
from torch import Tensor

ENCODER_CLASSES = ("UMT5EncoderModel", "T5EncoderModel")


class TextEncoderError(ValueError):
    """The text encoder folder is missing, incomplete, or holds another kind of model."""


def clean_caption(text: str) -> str:
    """A caption as Wan's pipeline cleans prompts: HTML entities unescaped, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(str(text)))).strip()


def _tokenizer_folder(path: Path) -> Path:
    for folder in (path.parent / "tokenizer", path):
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return folder
    raise TextEncoderError(
        f"text_encoder.path={path} has no tokenizer: expected tokenizer files (tokenizer_config.json / "
        f"tokenizer.json) in {path.parent / 'tokenizer'} (a Wan pipeline's tokenizer/) or in {path} itself"
    )


def _encoder_config(path: Path) -> dict:
    if not path.is_dir():
        raise TextEncoderError(
            f"text_encoder.path={path} is not a local folder. Text encoders are loaded from local folders only "
            "(no model hub): point it at a Wan pipeline's text_encoder/ folder"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TextEncoderError(f"text_encoder.path={path} has no config.json; point it at a transformers UMT5 "
                               "encoder folder (config.json + model weights), e.g. a Wan pipeline's text_encoder/")
    config = json.loads(config_file.read_text())
    found = (config.get("architectures") or [config.get("_class_name") or "a model of unknown class"])[0]
    if found not in ENCODER_CLASSES:
        raise TextEncoderError(f"text_encoder.path={path} holds {found}, not a UMT5/T5 encoder "
                               f"({' or '.join(ENCODER_CLASSES)})")
    return config


class TextEncoder:
    """A frozen local UMT5 encoder and its tokenizer.

    Args:
        path: the encoder folder (config.json + weights).
        max_length: tokens per caption (Wan: 512); embeddings are zero-padded to it.
        device, dtype: where and how the encoder runs.
    """

    def __init__(self, path: str | Path, *, max_length: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        import transformers  # only text-to-video runs need it

        self.path = Path(path).expanduser().resolve()
        config = _encoder_config(self.path)
        self.max_length = int(max_length)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(_tokenizer_folder(self.path)),
                                                                    local_files_only=True)
        model_class = getattr(transformers, config["architectures"][0])
        self.model = model_class.from_pretrained(str(self.path), local_files_only=True, torch_dtype=dtype)
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.dim = int(self.model.config.d_model)
        record = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")}
        self._config_hash = hashlib.sha256(json.dumps({"config": record, "max_length": self.max_length},
                                                      sort_keys=True).encode()).hexdigest()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(embeddings (B, max_length, D) float32, zero after each caption's tokens; lengths (B,) int64)."""
        tokens = self.tokenizer([clean_caption(c) for c in captions], padding="max_length", max_length=self.max_length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        device = self.model.device
        hidden = self.model(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state
        lengths = tokens.attention_mask.gt(0).sum(dim=1).long()
        keep = torch.arange(self.max_length)[None, :] < lengths[:, None]
        return (hidden.float().cpu() * keep[..., None]), lengths

    def identity_key(self) -> dict[str, str]:
        """What latent manifests record to tell which encoder (and length) made their caption embeddings."""
        return {"path": str(self.path), "config_hash": self._config_hash, "max_length": self.max_length}


def pad_embeddings(embeddings: Tensor, length: int) -> Tensor:
    """(L, D) or (B, L, D) trimmed caption embeddings -> zero-padded to ``length`` tokens."""
    missing = length - embeddings.shape[-2]
    if missing < 0:
        raise ValueError(f"caption embeddings of {embeddings.shape[-2]} tokens exceed the {length} of the model")
    pad = embeddings.new_zeros(*embeddings.shape[:-2], missing, embeddings.shape[-1])
    return torch.cat([embeddings, pad], dim=-2)
