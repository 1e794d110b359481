"""A tiny offline Wan2.1 text-to-video stack saved to local folders, for CPU tests (a helper module).

``save_tiny_wan_pipeline(root)`` writes, like a Wan pipeline folder, ``transformer/`` (a randomly
initialised ``WanTransformer3DModel``: 2 blocks, 2 heads of 12), ``vae/`` (a tiny
``AutoencoderKLWan``, 4 latent channels), ``text_encoder/`` (a tiny ``UMT5EncoderModel``) and
``tokenizer/`` (a word-level tokenizer with Wan's pad and end tokens). Seeded: the same call
writes the same models. ``save_captioned_videos(folder)`` writes mp4 clips and a CSV manifest
with captions (and one row with an empty caption).
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from tests.vae_fixtures import save_tiny_vae
from tests.video_fixtures import encode_video, make_frames

WORDS = "a red green blue car ball cube moving left right fast slow on dark background blurry".split()
TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                        out_channels=4, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
CAPTIONS = ["a red car moving left", "a blue ball moving right", "a green cube on dark background",
            "a red ball moving fast", "a blue car moving slow"]


def tiny_transformer(seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**{**TINY_TRANSFORMER, **overrides})


def save_tiny_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    return path


def save_tiny_text_encoder(path: Path, seed: int = 0) -> Path:
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                            relative_attention_num_buckets=8))
    model.save_pretrained(path)
    return path


def save_tiny_wan_pipeline(root: Path) -> Path:
    """transformer/, vae/, text_encoder/ and tokenizer/ of a tiny Wan2.1 under ``root``."""
    root = Path(root)
    tiny_transformer().save_pretrained(root / "transformer")
    save_tiny_vae("wan", root / "vae")
    save_tiny_text_encoder(root / "text_encoder")
    save_tiny_tokenizer(root / "tokenizer")
    return root


def save_captioned_videos(folder: Path, num_frames: int = 9, size: int = 16) -> Path:
    """mp4 clips with a ``manifest.csv`` (path,caption); one more row has an empty caption. Returns the manifest."""
    folder = Path(folder)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        name = f"clip{i}.mp4"
        encode_video(folder / name, make_frames(num_frames, size, size, seed=i), fps=8)
        rows.append((name, caption))
    encode_video(folder / "uncaptioned.mp4", make_frames(num_frames, size, size, seed=99), fps=8)
    rows.append(("uncaptioned.mp4", ""))
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "caption"])
        writer.writerows(rows)
    return manifest
