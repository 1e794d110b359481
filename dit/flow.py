"""Rectified flow: the training objective and the Euler sampler.

Convention (flow time t in [0, 1], 0 = data, 1 = noise):

    x_t = (1 − t)·x₀ + t·ε,      the model predicts v = dx_t/dt = ε − x₀.

Training draws t from a logit-normal, u = sigmoid(mean + std·z), optionally shifted
towards noise: t = shift·u / (1 + (shift − 1)·u) (SD3's shift; shift = 1 is none).
Sampling integrates from t = 1 to 0 with diffusers' ``FlowMatchEulerDiscreteScheduler``
using the same shift.

All randomness comes from explicit ``torch.Generator`` objects (the trainer seeds one
per sample from its global stream position, :func:`training_randomness`), so that a step
is a pure function of the seed and the data position: this is what makes resume bitwise
exact and results independent of the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Warp flow times towards noise: shift·t / (1 + (shift − 1)·t)."""
    return shift * t / (1 + (shift - 1) * t)


def sample_flow_time(batch: int, *, mean: float, std: float, shift: float, generator: torch.Generator) -> Tensor:
    """(batch,) float32 flow times from a shifted logit-normal, on the generator's device."""
    z = torch.randn(batch, generator=generator, device=generator.device)
    return shift_time(torch.sigmoid(mean + std * z), shift)


def draw_noise_and_time(shape: Sequence[int], generator: torch.Generator, *, time_mean: float, time_std: float,
                        time_shift: float) -> tuple[Tensor, Tensor]:
    """Noise ε of ``shape`` (B, ...) and flow times t (B,) from one generator (benchmarks, tests)."""
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device)
    return noise, sample_flow_time(shape[0], mean=time_mean, std=time_std, shift=time_shift, generator=generator)


def training_randomness(seed: int, positions: Sequence[int], latent_shape: Sequence[int], *, time_mean: float,
                        time_std: float, time_shift: float, dropout_prob: float) -> tuple[Tensor, Tensor, Tensor]:
    """Noise ε (B, C, T, H, W), flow times t (B,) and conditioning-dropout flags (B,) bool of a micro-batch.

    ``positions`` are the samples' global positions in the data stream. Each sample's values
    come from a CPU generator seeded by (seed, its position), so a sample is trained on
    identically whichever rank, micro-step or process count it falls to: 2 processes × batch
    b, 1 process × batch 2b and 1 process × batch b × 2 accumulation steps are the same
    training, and a resumed run draws exactly what an uninterrupted one would.
    """
    noise, times, drops = [], [], []
    for position in positions:
        state = np.random.SeedSequence([seed, position, 0xF10]).generate_state(2)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        noise.append(torch.randn(tuple(latent_shape), generator=generator))
        times.append(sample_flow_time(1, mean=time_mean, std=time_std, shift=time_shift, generator=generator))
        drops.append(torch.rand(1, generator=generator) < dropout_prob)
    return torch.stack(noise), torch.cat(times), torch.cat(drops)


def noisy_latents(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 − t)·x₀ + t·ε in float32 on x0's device; x0, noise (B, C, T, H, W), t (B,)."""
    t_b = t.to(x0.device, torch.float32).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t_b) * x0.float() + t_b * noise.to(x0.device, torch.float32)


def rectified_flow_loss(model: Callable[..., Tensor], x0: Tensor, noise: Tensor, t: Tensor,
                        **conditioning: Any) -> Tensor:
    """Mean squared error between the predicted and the true velocity ε − x₀, in float32.

    x0, noise: (B, C, T, H, W); t: (B,) flow times in [0, 1] (moved to x0's device).
    The model is called as ``model(x_t, t, **conditioning)`` (e.g. ``y=labels,
    drop_labels=...`` for the class-conditional DiT) and returns a tensor like x_t.
    """
    x_t = noisy_latents(x0, noise, t)
    prediction = model(x_t, t.to(x0.device, torch.float32), **conditioning)
    return F.mse_loss(prediction.float(), noise.to(x0.device, torch.float32) - x0.float())


def flow_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    """The diffusers Euler scheduler for our convention (t = sigma = timestep / 1000).

    diffusers is imported here, not at the top: it loads ``torch._dynamo`` (seconds on a CPU),
    which a command that fails on its config, or trains without sampling, never needs.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

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
