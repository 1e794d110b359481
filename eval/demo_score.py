"""A quality score for videos generated from the embedded demo data: which shape is it?

The demo clips (:mod:`data.demo`) show one coloured shape moving on a dark background, one
class per shape kind. A generator that learnt the data draws that shape; one that did not
draws coloured blotches. This module trains a small video classifier on real demo clips
and reports, for generated clips:

* ``class_accuracy``: the fraction recognised as the class they were conditioned on
  (None for unconditional runs);
* ``class_probability``: the classifier's mean probability of that class, the graded form of
  ``class_accuracy`` that moves before any clip is recognised (None for unconditional runs);
* ``confident_fraction``: the fraction whose largest shape probability is at least
  ``CONFIDENT``, the score that needs no label;
* ``reject_fraction``: the fraction classified as "no shape";
* ``real_accuracy``: the classifier's accuracy on held-out real clips (the ceiling).

Besides one output per shape the classifier has a "no shape" class, trained on synthetic
non-shapes (noise, scattered coloured patches, smooth blotches, empty background, real
clips drowned in noise), so that noise is rejected instead of being forced into whatever
shape the classifier leans to: pure noise scores about 0, not chance.

Data: the run's demo mp4 files (one round of classes in four held out) plus clips drawn in
memory by the demo's own renderer from seed streams the files never use. The network is a
per-frame convolution stack pooled over the clip. Building is deterministic and takes well
under a minute on a CPU; the result is cached under ``<LINVID_CACHE>/demo_score/`` (weights,
then a JSON record that marks completion), keyed by the demo parameters and
``SCORE_VERSION``.

    python -m eval.demo_score <run dir | checkpoint dir> [num_samples=32 steps=25 cfg_scale=4 frames_png=<file>]

writes ``<run dir>/demo_score/score_step<step>.json`` (read by ``eval.report``);
``train.score_every`` logs the same score during training.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from configs.entry import entry_point
from configs.files import atomic_output_path, atomic_write_text, cache_root
from configs.logs import get_logger
from data.datasets import build_video_dataset
from data.demo import BACKGROUND_RGB, GENERATOR_VERSION, SHAPE_NAMES, render_clip
from dit.checkpoint import checkpoint_step, resolve_checkpoint
from dit.sampling import generate_videos
from eval.generation import cycle_labels, generation_seed, load_sampling_setup

logger = get_logger(__name__)

SCORE_VERSION = 1  # bump when the classifier, its data or its training change: old caches are ignored
CONFIDENT = 0.9  # a clip is "confident" when its largest shape probability reaches this
HELD_OUT_EVERY = 4  # every 4th round of demo clips (one clip per class) is held out
EXTRA_TRAIN_PER_CLASS = 192  # extra real clips per class drawn in memory for training
EXTRA_HELD_OUT_PER_CLASS = 64  # extra real clips per class drawn in memory for the held-out accuracy
EPOCHS = 4
TRAIN_FRAMES = 2  # frames of each clip per training example (scoring uses every frame)
BATCH = 32
LR = 3e-3
BUILD_SEED = 1234
_TRAIN_STREAM, _HELD_OUT_STREAM = 0x7A11, 0x4E1D  # seed-sequence words the demo files never use


class DemoScoreError(ValueError):
    """The demo score cannot be computed for this run (e.g. its data is not the demo)."""


def is_demo_run(run_cfg: Mapping) -> bool:
    """Whether a run trained on the embedded demo data, the only data the score knows."""
    return run_cfg["data"]["name"] == "demo"


def demo_spec(data_cfg: Mapping) -> dict:
    """The demo generation parameters of a ``data=demo`` node: what the cached classifier is keyed by."""
    if data_cfg.get("name") != "demo":
        raise DemoScoreError("the demo score needs data=demo (it knows only the demo's shapes); "
                             f"this run used data={data_cfg.get('name')!r} (use eval.fvd for other data)")
    return {"generator_version": GENERATOR_VERSION,
            "num_videos": int(data_cfg["num_videos"]), "num_classes": int(data_cfg["num_classes"]),
            "num_frames": int(data_cfg["num_frames"]), "resolution": int(data_cfg["resolution"]),
            "fps": float(data_cfg["fps"]), "seed": int(data_cfg.get("seed", 0))}


def class_names(spec: Mapping) -> tuple[str, ...]:
    """Shape classes: the first ``num_classes`` shapes, or all of them for unconditional data."""
    return SHAPE_NAMES[: spec["num_classes"]] if spec["num_classes"] > 0 else SHAPE_NAMES


def cache_key(spec: Mapping) -> str:
    """Hash of the score version and a ``demo_spec``: the cached classifier's file name."""
    text = json.dumps({"version": SCORE_VERSION, **spec}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ the network


class DemoClassifier(nn.Module):
    """(N, 3, T, H, W) in [-1, 1] -> logits (N, K + 1); the last class is "no shape".

    2D convolutions applied to every frame (shared weights), then average and max
    pooling over time and space, then a linear head. Motion is not needed to tell the
    shapes apart; pooling over all frames makes a clip whose shape changes from frame
    to frame unconfident.
    """

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.num_classes = num_classes
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        )
        self.head = nn.Linear(8 * w, num_classes + 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, t, h, w = x.shape
        features = self.features(x.transpose(1, 2).reshape(n * t, c, h, w))
        features = features.view(n, t, features.shape[1], -1)  # (N, T, C', H'·W')
        pooled = torch.cat([features.mean((1, 3)), features.amax((1, 3))], dim=1)
        return self.head(pooled)


def videos_to_input(videos: np.ndarray | Tensor) -> Tensor:
    """uint8 (N, T, H, W, 3) -> float32 (N, 3, T, H, W) in [-1, 1]."""
    videos = torch.as_tensor(np.asarray(videos))
    if videos.dtype != torch.uint8 or videos.dim() != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be uint8 (N, T, H, W, 3), got {videos.dtype} {tuple(videos.shape)}")
    return videos.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------ data


def _render(shape: str, spec: Mapping, stream: int, index: int) -> np.ndarray:
    rng = np.random.default_rng([spec["seed"], stream, index])
    return render_clip(shape, spec["num_frames"], spec["resolution"], rng)


def _extra_real(spec: Mapping, stream: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Real clips drawn in memory, ``per_class`` of each class, from seeds the demo files never use."""
    names = class_names(spec)
    clips, labels = [], []
    for i in range(per_class * len(names)):
        label = i % len(names)
        clips.append(_render(names[label], spec, stream, i))
        labels.append(label)
    return np.stack(clips), np.array(labels)


def _demo_files(data_cfg: Mapping, spec: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The demo's mp4 clips as uint8 (N, T, H, W, 3), their class labels and held-out flags."""
    dataset = build_video_dataset(data_cfg, seed=0)
    clips = [((dataset[i]["video"].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
             for i in range(len(dataset))]
    names = class_names(spec)
    labels = np.array([names.index(entry.path.stem.split("_", 1)[1]) for entry in dataset.entries])
    rounds = np.array([int(entry.path.stem.split("_", 1)[0]) for entry in dataset.entries]) // max(1, spec["num_classes"])
    held_out = rounds % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    if not held_out.any() and rounds.max() > 0:  # fewer than HELD_OUT_EVERY rounds: hold out the last one
        held_out = rounds == rounds.max()
    return np.stack(clips), labels, held_out


def _box_blur(x: Tensor) -> Tensor:
    """3×3 spatial box blur of (N, 3, T, H, W)."""
    n, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(n * t, c, h, w)
    frames = F.avg_pool2d(F.pad(frames, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return frames.view(n, t, c, h, w).transpose(1, 2)


def _negatives(count: int, spec: Mapping, generator: torch.Generator) -> Tensor:
    """``count`` synthetic "no shape" clips (N, 3, T, H, W) in [-1, 1], several kinds in turn."""
    t, size = spec["num_frames"], spec["resolution"]
    background = torch.tensor(BACKGROUND_RGB).view(3, 1, 1, 1) / 127.5 - 1
    out = []
    for i in range(count):
        kind = i % 6
        u = lambda *shape: torch.rand(shape, generator=generator)
        g = lambda *shape: torch.randn(shape, generator=generator)
        if kind == 0:  # Gaussian noise around a random level
            clip = (u(1) * 1.6 - 1.2) + (0.1 + 0.9 * u(1)) * g(3, t, size, size)
        elif kind == 1:  # uniform noise (what random uint8 pixels are)
            clip = u(3, t, size, size) * 2 - 1
        elif kind == 2:  # scattered coloured patches on the background, changing over time or not
            patch = int([2, 4, 4, 8][int(u(1) * 4)])
            cells = -(-size // patch)
            frames = 1 if u(1) < 0.5 else t
            on = (u(1, frames, cells, cells) < 0.05 + 0.35 * u(1)).float()
            colour = u(3, frames, cells, cells) * 2 - 1
            grid = on * colour + (1 - on) * background
            clip = grid.repeat_interleave(patch, -1).repeat_interleave(patch, -2)[..., :size, :size].expand(3, t, size, size)
        elif kind == 3:  # smooth colour blotches: low-resolution noise upsampled
            low = u(3, max(1, t // 4), 4, 4) * 2 - 1
            clip = F.interpolate(low[None], size=(t, size, size), mode="trilinear", align_corners=False)[0]
        elif kind == 4:  # empty background with a little noise
            clip = background + 0.1 * u(1) * g(3, t, size, size)
        else:  # a real clip drowned in noise (flow time ≥ 0.85)
            shape = SHAPE_NAMES[int(u(1) * len(SHAPE_NAMES))]
            rng = np.random.default_rng([spec["seed"], 0x0DD, i])
            real = torch.from_numpy(render_clip(shape, t, size, rng)).permute(3, 0, 1, 2).float() / 127.5 - 1
            amount = 0.85 + 0.15 * u(1)
            clip = (1 - amount) * real + amount * g(3, t, size, size)
        out.append(clip.clamp(-1, 1))
    return torch.stack(out)


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mild corruptions a good generator may still make: noise, blur, colour jitter, flips."""
    n = x.shape[0]
    u = lambda *shape: torch.rand(shape, generator=generator)
    blur = (u(n) < 0.3).view(n, 1, 1, 1, 1)
    x = torch.where(blur, _box_blur(x), x)
    x = x * (1 + 0.2 * (u(n, 3, 1, 1, 1) - 0.5)) + 0.1 * (u(n, 1, 1, 1, 1) - 0.5)
    x = x + 0.12 * u(n, 1, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    flip = (u(n) < 0.5).view(n, 1, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)  # every demo shape is symmetric left-right
    reverse = (u(n) < 0.5).view(n, 1, 1, 1, 1)
    return torch.where(reverse, x.flip(2), x).clamp(-1, 1)


# ------------------------------------------------------------------------------------ build, cache, load


@torch.no_grad()
def classify_videos(classifier: DemoClassifier, videos: np.ndarray | Tensor, batch_size: int = 64) -> Tensor:
    """Class probabilities (N, K + 1) of uint8 videos (N, T, H, W, 3), or float (N, 3, T, H, W) in [-1, 1]."""
    x = videos if isinstance(videos, Tensor) and videos.is_floating_point() else videos_to_input(videos)
    was_training = classifier.training
    classifier.eval()
    probs = [F.softmax(classifier(x[i : i + batch_size]), dim=1) for i in range(0, len(x), batch_size)]
    classifier.train(was_training)
    return torch.cat(probs) if probs else torch.zeros(0, classifier.num_classes + 1)


def build_demo_classifier(data_cfg: Mapping, *, epochs: int = EPOCHS,
                          extra_train_per_class: int = EXTRA_TRAIN_PER_CLASS,
                          extra_held_out_per_class: int = EXTRA_HELD_OUT_PER_CLASS) -> tuple[DemoClassifier, dict]:
    """Train the classifier on real demo clips (no cache); return it and its record.

    ``data_cfg``: a ``data=demo`` config node; the demo mp4 files are generated under its
    ``root`` if missing. The record holds the spec,
    class names, held-out accuracies and counts, and the build time. The cached
    classifier (:func:`load_demo_classifier`) uses the default sizes; smaller ones are for tests.
    """
    spec = demo_spec(data_cfg)
    names = class_names(spec)
    start = time.perf_counter()
    files, file_labels, held_out = _demo_files(data_cfg, spec)
    extra_train, extra_train_labels = _extra_real(spec, _TRAIN_STREAM, extra_train_per_class)
    extra_test, extra_test_labels = _extra_real(spec, _HELD_OUT_STREAM, extra_held_out_per_class)
    real_train = videos_to_input(np.concatenate([files[~held_out], extra_train]))
    real_train_labels = torch.from_numpy(np.concatenate([file_labels[~held_out], extra_train_labels]))

    generator = torch.Generator().manual_seed(BUILD_SEED)
    num_negative = max(len(real_train) // len(names), 64)
    negatives = _negatives(num_negative, spec, generator)
    x = torch.cat([real_train, negatives])
    y = torch.cat([real_train_labels, torch.full((num_negative,), len(names))])

    torch.manual_seed(BUILD_SEED)
    classifier = DemoClassifier(len(names))
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=LR, weight_decay=1e-4)
    total = epochs * math.ceil(len(x) / BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=total, pct_start=0.15)
    classifier.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), BATCH):
            index = order[i : i + BATCH]
            frames = torch.randperm(x.shape[2], generator=generator)[:TRAIN_FRAMES].sort().values
            batch = _augment(x[index][:, :, frames], generator)
            loss = F.cross_entropy(classifier(batch), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        logger.debug("demo classifier epoch %d/%d: loss %.4f", epoch + 1, epochs, loss.item())
    classifier.eval()

    def accuracy(clips: np.ndarray, labels: np.ndarray) -> float:
        return float((classify_videos(classifier, clips).argmax(1).numpy() == labels).mean()) if len(labels) else None

    held_clips = np.concatenate([files[held_out], extra_test])
    held_labels = np.concatenate([file_labels[held_out], extra_test_labels])
    noise_check = _negatives(64, spec, torch.Generator().manual_seed(BUILD_SEED + 1))
    record = {
        "version": SCORE_VERSION,
        "spec": spec,
        "classes": list(names) + ["no shape"],
        "real_accuracy": accuracy(held_clips, held_labels),
        "real_accuracy_demo_files": accuracy(files[held_out], file_labels[held_out]),
        "held_out_clips": len(held_labels),
        "held_out_demo_files": int(held_out.sum()),
        "train_clips": len(real_train),
        "train_negatives": int(num_negative),
        "negatives_rejected": float((classify_videos(classifier, noise_check).argmax(1) == len(names)).float().mean()),
        "epochs": epochs,
        "build_seconds": round(time.perf_counter() - start, 2),
        "torch_threads": torch.get_num_threads(),
    }
    return classifier, record


def classifier_paths(spec: Mapping, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(weights, record) files of the cached classifier for a demo spec."""
    directory = Path(cache_dir).expanduser() if cache_dir else cache_root() / "demo_score"
    key = cache_key(spec)
    return directory / f"classifier_{key}.safetensors", directory / f"classifier_{key}.json"


def load_demo_classifier(data_cfg: Mapping, *, cache_dir: str | Path | None = None,
                         rebuild: bool = False) -> tuple[DemoClassifier, dict]:
    """The cached classifier for this demo data, built and cached first if missing; (classifier, record).

    The record says ``"cached": true`` when it was read from disk.
    """
    spec = demo_spec(data_cfg)
    weights, record_file = classifier_paths(spec, cache_dir)
    if not rebuild and weights.is_file() and record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("version") == SCORE_VERSION and record.get("spec") == spec:
            classifier = DemoClassifier(len(class_names(spec)))
            classifier.load_state_dict(load_file(weights))
            return classifier.eval(), {**record, "cached": True}
    logger.info("Building the demo-score classifier (cached in %s)", weights.parent)
    classifier, record = build_demo_classifier(data_cfg)
    weights.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_path(weights) as temporary:  # weights first: the record marks completion
        save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(temporary))
    atomic_write_text(record_file, json.dumps(record, indent=2) + "\n")
    return classifier, {**record, "cached": False}


# ------------------------------------------------------------------------------------ scores


def score_videos(videos: np.ndarray, labels: Sequence[int] | None, classifier: DemoClassifier,
                 record: Mapping | None = None) -> dict[str, Any]:
    """Score generated uint8 videos (N, T, H, W, 3) conditioned on ``labels`` (None: unconditional).

    Returns ``class_accuracy`` (fraction whose predicted class, "no shape" included, is
    their label; None without labels), ``class_probability`` (mean probability of their
    label; None without labels), ``confident_fraction`` (largest shape probability
    ≥ CONFIDENT), ``reject_fraction`` (predicted "no shape"), ``real_accuracy`` (from
    ``record``: the held-out ceiling), ``num_clips`` and the predicted class counts.
    """
    probs = classify_videos(classifier, videos)
    if not len(probs):
        raise DemoScoreError("no videos to score: pass at least one")
    k = classifier.num_classes
    predicted = probs.argmax(1)
    class_accuracy = class_probability = None
    if labels is not None:
        labels_t = torch.as_tensor(list(labels), dtype=torch.long)
        if len(labels_t) != len(probs):
            raise DemoScoreError(f"{len(probs)} videos but {len(labels_t)} labels: pass one label per video")
        class_accuracy = float((predicted == labels_t).float().mean())
        class_probability = float(probs[torch.arange(len(probs)), labels_t].mean())
    return {
        "class_accuracy": class_accuracy,
        "class_probability": class_probability,
        "confident_fraction": float((probs[:, :k].amax(1) >= CONFIDENT).float().mean()),
        "reject_fraction": float((predicted == k).float().mean()),
        "real_accuracy": None if record is None else record.get("real_accuracy"),
        "num_clips": len(probs),
        "predicted_counts": torch.bincount(predicted, minlength=k + 1).tolist(),
    }


def generate_demo_videos(model: nn.Module, decode: Callable[[Tensor], Tensor], run_cfg: Mapping, *,
                         num_samples: int, steps: int, cfg_scale: float, seed: int, batch_size: int,
                         device: torch.device | str) -> tuple[np.ndarray, list[int] | None]:
    """uint8 videos (N, T, H, W, 3) from ``model`` and their labels: labels cycle over the classes
    and sample i starts from the noise of ``generation_seed(seed, i)`` (sample.py's conventions)."""
    labels = cycle_labels(None, num_samples, int(run_cfg["data"]["num_classes"]))
    videos = generate_videos(model, decode, seeds=[generation_seed(seed, i) for i in range(num_samples)],
                             labels=labels, steps=steps, cfg_scale=cfg_scale,
                             shift=float(run_cfg["train"]["time_shift"]), batch_size=batch_size, device=device)
    return videos, labels


def score_model(model: nn.Module, decode: Callable[[Tensor], Tensor], run_cfg: Mapping, *,
                classifier: DemoClassifier, record: Mapping | None = None, **generation: Any) -> dict[str, Any]:
    """Score the videos :func:`generate_demo_videos` makes with ``generation``'s settings."""
    videos, labels = generate_demo_videos(model, decode, run_cfg, **generation)
    return score_videos(videos, labels, classifier, record)


FRAMES_SHOWN = 4  # frames per clip in the real-versus-generated picture, evenly spaced


def write_frames_png(path: Path, videos: np.ndarray, labels: Sequence[int] | None, data_cfg: Mapping,
                     title: str) -> None:
    """A PNG with, for each class, frames of one real demo clip beside frames of one generated clip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = demo_spec(data_cfg)
    names = class_names(spec)
    real, real_labels, _ = _demo_files(data_cfg, spec)
    rows = range(len(names)) if labels is not None else range(min(len(names), len(videos)))
    frames = np.linspace(0, videos.shape[1] - 1, FRAMES_SHOWN).round().astype(int)
    figure, axes = plt.subplots(len(rows), 2 * FRAMES_SHOWN, figsize=(2 * FRAMES_SHOWN, len(rows) + 0.6),
                                squeeze=False)
    for row in rows:
        generated = videos[list(labels).index(row)] if labels is not None else videos[row]
        real_clip = real[list(real_labels).index(row)] if labels is not None else real[row]
        for j, frame in enumerate(frames):
            for column, clip in ((j, real_clip), (FRAMES_SHOWN + j, generated)):
                axes[row, column].imshow(clip[frame], interpolation="nearest")
                axes[row, column].set_xticks([]), axes[row, column].set_yticks([])
        axes[row, 0].set_ylabel(names[row] if labels is not None else "", fontsize=8)
    axes[0, 0].set_title("real", fontsize=8, loc="left")
    axes[0, FRAMES_SHOWN].set_title("generated", fontsize=8, loc="left")
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    with atomic_output_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)


def headline(score: Mapping[str, Any]) -> str:
    """One line for logs and summaries: the class accuracy (or confident fraction) and its ceiling."""
    main = (f"class accuracy {score['class_accuracy']:.1%}" if score["class_accuracy"] is not None
            else f"confident {score['confident_fraction']:.1%}")
    ceiling = f" (held-out real clips: {score['real_accuracy']:.1%})" if score["real_accuracy"] is not None else ""
    return (f"demo score: {main} of {score['num_clips']} generated clips, {score['reject_fraction']:.1%} "
            f"rejected as no shape{ceiling}")


def default_result_path(checkpoint: Path) -> Path:
    """``<run dir>/demo_score/score_step<step>.json``."""
    return checkpoint.parent.parent / "demo_score" / f"score_step{checkpoint_step(checkpoint):08d}.json"


@entry_point("demo_score", positional_key="checkpoint")
def main(cfg: DictConfig) -> dict[str, Any]:
    """Score a checkpoint's generated videos; write and return the result record."""
    start = time.perf_counter()
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, vae, run_cfg = load_sampling_setup(checkpoint, device, cfg.model_weights)
    classifier, record = load_demo_classifier(run_cfg.data)
    ready = time.perf_counter()
    videos, labels = generate_demo_videos(model, vae.decode, run_cfg, num_samples=cfg.num_samples, steps=cfg.steps,
                                          cfg_scale=cfg.cfg_scale, seed=cfg.seed, batch_size=cfg.batch_size,
                                          device=device)
    result = score_videos(videos, labels, classifier, record)
    result.update({
        "checkpoint": {"path": str(checkpoint.resolve()), "step": checkpoint_step(checkpoint),
                       "weights": cfg.model_weights},
        "sampling": {"num_samples": cfg.num_samples, "steps": cfg.steps, "cfg_scale": cfg.cfg_scale, "seed": cfg.seed},
        "classifier": {key: record[key] for key in ("real_accuracy", "held_out_clips", "negatives_rejected", "cached")},
        "setup_s": round(ready - start, 2), "score_s": round(time.perf_counter() - ready, 2),
    })
    out = Path(cfg.out) if cfg.out else default_result_path(checkpoint)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    logger.info("%s; written to %s", headline(result), out)
    if cfg.frames_png:
        write_frames_png(Path(cfg.frames_png), videos, labels, run_cfg.data,
                         f"step {result['checkpoint']['step']}, {run_cfg.attention.name}: {headline(result)}")
        logger.info("real and generated frames: %s", cfg.frames_png)
    return result


if __name__ == "__main__":
    main()
