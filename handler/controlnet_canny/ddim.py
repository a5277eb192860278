"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models"), as the reference computes it.

Small pure functions: the schedule, the visited timesteps, and one sampler over an eps-model callable.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> eps, guidance already applied
NoiseFn = Callable[[], torch.Tensor]  # fresh standard-normal noise of x's shape (per-sample generators)
StepCallback = Callable[[int, int], None]  # (steps done, steps in all)


def alphas_cumprod(linear_start: float, linear_end: float, timesteps: int) -> torch.Tensor:
    """Stable Diffusion's "scaled linear" betas: linspace in sqrt space, squared; products taken in float64."""
    betas = np.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=np.float64) ** 2
    return torch.from_numpy(np.cumprod(1.0 - betas)).float()


def ddim_timesteps(steps: int, train_timesteps: int = 1000) -> list[int]:
    """The reference's "uniform" discretisation, ascending: 0, c, 2c, ... below 1000, each + 1 (c = 1000 // steps).

    When 1000 is not a multiple of `steps` this visits more than `steps` steps (30 gives 31); kept so that
    images match the reference's for every setting. Where c divides 999 (steps 3, 9, 27, 37) the last one
    would be step 1000, past the schedule, which crashes the reference; it is dropped here.
    """
    if not 1 <= steps <= train_timesteps:
        raise ValueError(f"steps must be in [1, {train_timesteps}], got {steps}")
    return [t + 1 for t in range(0, train_timesteps, train_timesteps // steps) if t + 1 < train_timesteps]


def sample_ddim(
    eps_model: EpsModel,
    x: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    eta: torch.Tensor,
    noise: NoiseFn,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Runs DDIM from x = x_T over `timesteps` (ascending; visited high to low) and returns x_0.

    Eq. 12 of the DDIM paper with a_t = alphas_cumprod[t]:
        x0     = (x - sqrt(1 - a_t) e) / sqrt(a_t)
        x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) e + sigma z
    and Eq. 16 for sigma = eta sqrt((1 - a_prev)/(1 - a_t) (1 - a_t/a_prev)). At the last step a_prev is
    alphas_cumprod[0], not 1 (the reference's choice). `eta` holds one value per sample, shape (B, 1, 1, 1).
    """
    a = alphas_cumprod[list(timesteps)]
    a_prev = torch.cat([alphas_cumprod[:1], a[:-1]])
    sigmas_unit = ((1 - a_prev.double()) / (1 - a.double()) * (1 - a.double() / a_prev.double())).sqrt().float()
    eta = eta.to(x.device, torch.float32)
    stochastic = bool((eta > 0).any())  # decided once: a per-step check would sync a GPU every step
    total = len(timesteps)
    for done, index in enumerate(reversed(range(total))):
        t = torch.full((x.shape[0],), timesteps[index], device=x.device, dtype=torch.long)
        e = eps_model(x, t).float()
        a_t, a_p, sigma = a[index], a_prev[index], eta * sigmas_unit[index]
        x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
        x = a_p.sqrt() * x0 + (1 - a_p - sigma**2).sqrt() * e
        if stochastic:
            x = x + sigma * noise()
        if callback is not None:
            callback(done + 1, total)
    return x
