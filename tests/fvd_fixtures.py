"""Stand-ins for the I3D in FVD pipeline tests (a helper module, not a test module)."""

import torch
import torch.nn.functional as F
from torch import nn

from eval.fvd.i3d import I3D


class StubFeatures(nn.Module):
    """Cheap stand-in for I3D in pipeline tests: (N, 3, T, 224, 224) -> (N, 400)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("proj", torch.randn(3 * 8 * 8, 400, generator=torch.Generator().manual_seed(0)))
        self.weights_sha256 = "stub-sha"
        self.weights_path = "stub"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        I3D.check_input(x)
        return F.adaptive_avg_pool3d(x, (1, 8, 8)).flatten(1) @ self.proj


class PretrainedStub(StubFeatures):
    """A stand-in that claims pretrained weights: exercises the reporting path of real FVDs cheaply."""

    weights_source = "test stand-in claiming pretrained weights"
