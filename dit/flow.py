"""Rectified flow: the training objective and the Euler sampler.

Convention (flow time t in [0, 1], 0 = data, 1 = noise):

    x_t = (1 − t)·x₀ + t·ε,      the model predicts v = dx_t/dt = ε − x₀.

Training draws t from a logit-normal, u = sigmoid(mean + std·z), optionally shifted
towards noise: t = shift·u / (1 + (shift − 1)·u) (SD3's shift; shift = 1 is none).
Sampling integrates from t = 1 to 0 with diffusers' ``FlowMatchEulerDiscreteScheduler``
using the same shift.

All randomness comes from explicit ``torch.Generator`` objects (the trainer seeds one
per sample from its global stream position), so that a step is a pure function of the
seed and the data position: this is what makes resume bitwise exact and results
independent of the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Warp flow times towards noise: shift·t / (1 + (shift − 1)·t)."""
    return shift * t / (1 + (shift - 1) * t)


def sample_flow_time(batch: int, *, mean: float, std: float, shift: float, generator: torch.Generator) -> Tensor:
    """(batch,) float32 flow times from a shifted logit-normal, on the generator's device."""
    z = torch.randn(batch, generator=generator, device=generator.device)
    return shift_time(torch.sigmoid(mean + std * z), shift)


def rectified_flow_loss(
    model: Callable[..., Tensor],
    x0: Tensor,
    *,
    labels: Tensor | None,
    drop_labels: Tensor | None,
    time_mean: float,
    time_std: float,
    time_shift: float,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    t: Tensor | None = None,
) -> Tensor:
    """Mean squared error between the predicted and true velocity, in float32.

    x0: clean latents (B, C, T, H, W). Either ``generator`` draws the noise ε (like x0)
    and the flow times t (B,) on its device (CPU by default, so runs are reproducible
    across devices), or the caller passes both ``noise`` and ``t`` (e.g. drawn per
    sample, see ``train.sample_randomness``); they are moved to x0's device.
    """
    if noise is None or t is None:
        if generator is None:
            raise ValueError("rectified_flow_loss needs a generator, or both noise and t")
        noise = torch.randn(x0.shape, generator=generator, device=generator.device)
        t = sample_flow_time(x0.shape[0], mean=time_mean, std=time_std, shift=time_shift, generator=generator)
    noise, t = noise.to(x0.device, torch.float32), t.to(x0.device, torch.float32)
    t_b = t.view(-1, *([1] * (x0.dim() - 1)))
    x0 = x0.float()
    x_t = (1 - t_b) * x0 + t_b * noise
    prediction = model(x_t.to(x0.dtype), t, labels, drop_labels)
    return F.mse_loss(prediction.float(), noise - x0)


def flow_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    """The diffusers Euler scheduler for our convention (t = sigma = timestep / 1000)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


@torch.no_grad()
def euler_sample(
    velocity: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    *,
    steps: int,
    shift: float,
) -> Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 1 (noise) to 0 with ``steps`` Euler steps.

    velocity: maps x (B, ...) and t (B,) to a tensor like x (e.g. a guided model).
    noise: (B, ...) the starting point x_1. Returns x_0 in noise's dtype.
    """
    if steps < 1:
        raise ValueError(f"sampling steps must be ≥ 1, got {steps}")
    scheduler = flow_scheduler(shift)
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise
    for timestep in scheduler.timesteps:
        t = (timestep / scheduler.config.num_train_timesteps).expand(x.shape[0]).to(x.dtype)
        x = scheduler.step(velocity(x, t), timestep, x).prev_sample
    return x
