"""The FVD protocol: what makes two FVD numbers comparable.

Default = StyleGAN-V / Latte "fvd2048_16f": 2048 real and 2048 generated clips of 16
consecutive frames; uint8 frames -> [-1, 1]; full-frame bilinear resize to 224x224 (no crop);
features = the 400 pre-softmax logits of the Kinetics-400 I3D averaged over time; Fréchet
distance between the two Gaussians (float64, covariance ddof=1, trace term from a symmetric
eigendecomposition). Every result records clips, frames, stride, resolution, real split and
the weights' SHA-256 (docs/evaluation.md). FVD is biased upward by roughly 1/n: never compare
numbers computed with different n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data.training_data import TrainingData
from eval.fvd.i3d import MIN_FRAMES, RESOLUTION

DEFAULT_NUM_FRAMES = 16
DEFAULT_STRIDE = 1
DEFAULT_MAX_CLIPS = 2048
RESIZE_DESCRIPTION = (
    "full-frame bilinear resize to 224x224 with torch.nn.functional.interpolate "
    "(align_corners=False, antialias=False), no crop"
)


class FVDError(RuntimeError):
    """A user-facing reason why an FVD cannot be computed as asked."""


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


def checkpoint_protocol(run_cfg: Any, num_frames: int | None = None,
                        max_clips: int = DEFAULT_MAX_CLIPS) -> Protocol:
    """The protocol for a run: ``num_frames`` (default min(16, clip frames)) of its clips, its frame stride.

    Raises FVDError when the run's clips are shorter than I3D's 9-frame minimum, before any work.
    """
    data = TrainingData.of_run(run_cfg)
    clip_frames = data.clip_frames()
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
    return Protocol(num_frames=num_frames, stride=data.frame_sampling()[0], max_clips=max_clips)
