"""Samplers as pure step functions: a per-request plan, a small state, one step per eps-model call.

The caller owns the eps-model call, so that one batched forward can serve requests at different steps, each
with its own sampler state:

    p = plan("dpmpp_2m", 20, alphas_cumprod)
    state = start(p, noise)                       # x_T, or an init image noised to p's first timestep
    while not done(p, state):
        x, t = model_input(p, state)
        state = step(p, state, eps_model(x, t), next_noise() if takes_noise(p, state) else None)
    latents = result(p, state)

Noise is drawn in a fixed order per sample: x_T (or the img2img noise) first, then `noise_draws` more, one per
step that takes noise (the first `noise_draws` steps: every step, or every step but the last for lcm), so the
caller can draw all of it up front from per-sample generators.

Samplers and the references they match step for step (to rounding, fp32) for SD 1.5's schedule:
- ddim: the reference's DDIM (Song et al. 2021, eq. 12 and 16), as `ddim.sample_ddim`, bit for bit.
- dpmpp_2m: DPM-Solver++(2M) (Lu et al. 2022, algorithm 2), as diffusers' DPMSolverMultistepScheduler.
- euler_a: ancestral Euler, as k-diffusion's sample_euler_ancestral and diffusers' EulerAncestralDiscreteScheduler.
- unipc: UniPC-2 with B(h) = e^h - 1 and the UniC corrector (Zhao et al. 2023), as diffusers'
  UniPCMultistepScheduler.
- lcm: multistep latent consistency sampling (Luo et al. 2023, "Latent Consistency Models"), as diffusers'
  LCMScheduler with its defaults (original_inference_steps 50, timestep_scaling 10, prediction_type "epsilon");
  its timesteps are LCM's own, which steps_offset and timestep_spacing do not change; set_alpha_to_one would
  only matter below timestep 0, which LCM never reaches. Its last step's result is LCM's `denoised`.
The diffusers schedulers are configured as SD 1.5's scheduler config: beta_schedule "scaled_linear", beta_start
0.00085, beta_end 0.012, num_train_timesteps 1000, steps_offset 1, everything else the class default (so
timestep_spacing "linspace", prediction_type "epsilon", solver_order 2, final_sigmas_type "zero",
lower_order_final True; dpmpp_2m: algorithm_type "dpmsolver++", solver_type "midpoint"; unipc: predict_x0
True, solver_type "bh2", no disabled corrector steps); `karras=True` is their use_karras_sigmas=True.
img2img follows diffusers' img2img pipelines: of S steps the last min(int(S * strength), S) are run, from the
init latents noised (the scheduler's add_noise) to the first of them. For DDIM, S is the number of the
reference's timesteps (31 for 30 steps; `ddim.ddim_timesteps`). For lcm too: StableDiffusionControlNetImg2ImgPipeline
takes the last steps of LCMScheduler's whole schedule (not LatentConsistencyModelImg2ImgPipeline's
set_timesteps(strength=...), a schedule of S steps below the strength's timestep, which has no ControlNet).

The scheduler coefficients are computed in float32 the way diffusers computes them, so that the same eps gives
the same latents to a few ulp; the reference's DDIM keeps its float64-derived ones.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .ddim import ddim_timesteps

SAMPLERS = ("ddim", "dpmpp_2m", "euler_a", "unipc", "lcm")
KARRAS_SAMPLERS = ("dpmpp_2m", "unipc")
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5: the paper's choice
# LCM (Luo et al. 2023) as diffusers' LCMScheduler defaults: the distillation schedule of 50 evenly spaced
# timesteps (skipping step k = 1000 / 50) that its steps are chosen from, hence at most 50 steps; and the
# boundary conditions' sigma_data of consistency models (Song et al. 2023), taken at timesteps scaled by 10
# (LCM's t / 0.1).
LCM_ORIGINAL_STEPS = 50
LCM_TIMESTEP_SCALING = 10.0
LCM_SIGMA_DATA = 0.5


@dataclass(frozen=True)
class Plan:
    """Everything about one request's sampling that does not depend on the latents. Tensors live on the CPU.

    `alphas_cumprod` and `sigmas` are the same noise levels in two forms, sigma = sqrt((1 - a) / a): one per
    step, for the x that step starts from, then one for the x it ends at. DDIM computes with a (the
    reference's table, and alphas_cumprod[0] after the last step) and lcm with a too (1 after its last step,
    whose result is x_0); the others with sigma (interpolated as diffusers does, 0 after the last step).
    """
    sampler: str
    timesteps: torch.Tensor  # (n,) what the eps-model sees per step, in visiting order; float for euler_a
    alphas_cumprod: torch.Tensor  # (n + 1,) float32
    sigmas: torch.Tensor  # (n + 1,) float32
    eta: float  # DDIM's eta (eq. 16); 0 for the others
    denoising_strength: float  # below 1: img2img, the last steps only, from noised init latents
    noise_draws: int  # standard-normal tensors of x's shape that `step` consumes after the first one

    @property
    def steps(self) -> int:
        return len(self.timesteps)


@dataclass(frozen=True)
class State:
    index: int  # steps done
    x: torch.Tensor  # float32 latents the next step starts from (euler_a: in sigma space, x0 + sigma eps)
    x0_history: tuple[torch.Tensor, ...] = ()  # multistep samplers: data predictions of the last steps, newest last
    before_last_step: torch.Tensor | None = None  # unipc: x that the last step started from, for the corrector


def plan(
    sampler: str,
    steps: int,
    alphas_cumprod: torch.Tensor,
    *,
    karras: bool = False,
    eta: float = 0.0,
    denoising_strength: float = 1.0,
) -> Plan:
    """The timesteps and noise levels of `steps` steps of `sampler` over the training schedule `alphas_cumprod`.

    Raises ValueError naming the argument that is out of range (sampler, steps, karras, eta, denoising_strength).
    """
    train_timesteps = len(alphas_cumprod)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    # The multistep samplers' rounded "linspace" timesteps repeat beyond train_timesteps - 1 steps (h = 0); LCM's
    # are a subset of its distillation schedule (LCMScheduler refuses more steps than it has).
    max_steps = {"dpmpp_2m": train_timesteps - 1, "unipc": train_timesteps - 1,
                 "lcm": LCM_ORIGINAL_STEPS}.get(sampler, train_timesteps)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= max_steps:
        raise ValueError(f"steps must be an integer in [1, {max_steps}] for {sampler}, got {steps!r}")
    if karras and sampler not in KARRAS_SAMPLERS:
        raise ValueError(f"karras applies to {' and '.join(KARRAS_SAMPLERS)} only, not to {sampler}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta applies to ddim only; {sampler} needs eta 0, got {eta!r}")
    if not 0.0 < denoising_strength <= 1.0:
        raise ValueError(f"denoising_strength must be in (0, 1], got {denoising_strength!r}")

    alphas_cumprod = alphas_cumprod.float().cpu()
    if sampler == "ddim":
        timesteps = torch.tensor(ddim_timesteps(steps, train_timesteps)[::-1])
        levels = torch.cat([alphas_cumprod[timesteps], alphas_cumprod[:1]])
        schedule_alphas, schedule_sigmas = levels, ((1 - levels) / levels).sqrt()
    elif sampler == "lcm":
        timesteps = _lcm_timesteps(steps, train_timesteps)
        levels = torch.cat([alphas_cumprod[timesteps], torch.ones(1)])  # the last step ends at x_0: sigma 0
        schedule_alphas, schedule_sigmas = levels, ((1 - levels) / levels).sqrt()
    else:
        timesteps, schedule_sigmas = _sigma_schedule(sampler, steps, alphas_cumprod, karras)
        schedule_alphas = 1 / (1 + schedule_sigmas**2)

    # img2img (diffusers' get_timesteps): keep the last int(S * strength) of the S steps.
    total = len(timesteps)
    kept = min(int(total * denoising_strength), total)
    if kept == 0:
        raise ValueError(
            f"denoising_strength {denoising_strength} keeps no step of {total}; it must be at least {1 / total:.3g}"
        )
    first = total - kept
    noise_draws = {"ddim": kept if eta > 0 else 0, "euler_a": kept, "lcm": kept - 1}.get(sampler, 0)
    return Plan(
        sampler, timesteps[first:], schedule_alphas[first:], schedule_sigmas[first:], eta, denoising_strength,
        noise_draws,
    )


def _sigma_schedule(sampler: str, steps: int, alphas_cumprod: torch.Tensor, karras: bool):
    """Timesteps and sigmas (with the final 0) as diffusers' set_timesteps computes them ("linspace" spacing)."""
    train_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()  # float32, as diffusers
    last = len(train_sigmas) - 1
    if sampler == "euler_a":
        timesteps = np.linspace(0, last, steps, dtype=np.float32)[::-1].copy()
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        timesteps = torch.from_numpy(timesteps)
    elif karras:
        # Karras et al. 2022, eq. 5: sigma_i = (max^(1/rho) + i/(S-1) (min^(1/rho) - max^(1/rho)))^rho between the
        # schedule's smallest and largest sigma; each model timestep is the sigma's position on the training
        # schedule, linear in log sigma, rounded.
        low, high = float(train_sigmas[0]) ** (1 / KARRAS_RHO), float(train_sigmas[-1]) ** (1 / KARRAS_RHO)
        sigmas = (high + np.linspace(0, 1, steps) * (low - high)) ** KARRAS_RHO
        positions = np.interp(np.log(np.maximum(sigmas, 1e-10)), np.log(train_sigmas), np.arange(len(train_sigmas)))
        timesteps = torch.from_numpy(positions.round().astype(np.int64))
    else:
        timesteps = np.linspace(0, last, steps + 1).round()[::-1][:-1].astype(np.int64)
        sigmas = train_sigmas[timesteps]
        timesteps = torch.from_numpy(timesteps)
    return timesteps, torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))


def _lcm_timesteps(steps: int, train_timesteps: int) -> torch.Tensor:
    """LCMScheduler.set_timesteps: `steps` timesteps at evenly spaced (floored) positions of the distillation
    schedule k - 1, 2k - 1, ..., LCM_ORIGINAL_STEPS k - 1 (k = train_timesteps // LCM_ORIGINAL_STEPS), from
    its top down."""
    k = train_timesteps // LCM_ORIGINAL_STEPS
    distillation = torch.arange(LCM_ORIGINAL_STEPS, 0, -1) * k - 1
    positions = np.floor(np.linspace(0, LCM_ORIGINAL_STEPS, steps, endpoint=False)).astype(np.int64)
    return distillation[torch.from_numpy(positions)]


def start(plan: Plan, noise: torch.Tensor, init_latents: torch.Tensor | None = None) -> State:
    """x_T from standard-normal `noise`; or, for img2img, `init_latents` noised to the plan's first timestep
    (q(x_t | x_0): sqrt(a) x_0 + sqrt(1 - a) noise, which is x_0 + sigma noise in euler_a's sigma space)."""
    noise = noise.float()
    if init_latents is None:
        if plan.denoising_strength < 1:
            raise ValueError("init_latents: needed when denoising_strength < 1 (img2img)")
        x = noise * plan.sigmas[0] if plan.sampler == "euler_a" else noise
        return State(0, x)
    init_latents = init_latents.float()
    if plan.sampler in ("ddim", "lcm"):
        a = plan.alphas_cumprod[0]
        x = a**0.5 * init_latents + (1 - a) ** 0.5 * noise
    elif plan.sampler == "euler_a":
        x = init_latents + noise * plan.sigmas[0]
    else:
        alpha, sigma, _ = _alpha_sigma_lambda(plan.sigmas[0])
        x = alpha * init_latents + sigma * noise
    return State(0, x)


def model_input(plan: Plan, state: State) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents the eps-model sees at this step (euler_a scales them back to unit variance, as diffusers'
    scale_model_input) and the timestep, one per row."""
    t = plan.timesteps[state.index]
    timesteps = torch.full((state.x.shape[0],), t.item(), device=state.x.device, dtype=t.dtype)
    if plan.sampler == "euler_a":
        return state.x / (plan.sigmas[state.index] ** 2 + 1) ** 0.5, timesteps
    return state.x, timesteps


def step(plan: Plan, state: State, eps: torch.Tensor, noise: torch.Tensor | None) -> State:
    """One step from `state` given the eps-model's output for `model_input(plan, state)`."""
    if done(plan, state):
        raise ValueError(f"the plan's {plan.steps} steps are done")
    if (noise is None) == takes_noise(plan, state):
        raise ValueError(f"noise: {plan.sampler} with eta {plan.eta} takes "
                         f"{'one' if takes_noise(plan, state) else 'no'} noise tensor at step {state.index}")
    eps = eps.float()
    if plan.sampler == "ddim":
        return _ddim_step(plan, state, eps, noise)
    if plan.sampler == "euler_a":
        return _euler_ancestral_step(plan, state, eps, noise)
    if plan.sampler == "dpmpp_2m":
        return _dpmpp_2m_step(plan, state, eps)
    if plan.sampler == "lcm":
        return _lcm_step(plan, state, eps, noise)
    return _unipc_step(plan, state, eps)


def denoised(plan: Plan, state: State, eps: torch.Tensor) -> torch.Tensor:
    """The data prediction x0 that `eps` implies for the x this step starts from (what previews show): x0 = x -
    sigma eps in euler_a's sigma space, (x - sigma_t eps) / alpha_t in the variance-preserving space of the others."""
    if plan.sampler == "euler_a":
        return state.x - plan.sigmas[state.index] * eps.float()
    return _data_prediction(plan, state, eps.float())


def takes_noise(plan: Plan, state: State) -> bool:
    """Whether the step from `state` consumes a noise tensor: the first `noise_draws` steps do."""
    return state.index < plan.noise_draws


def done(plan: Plan, state: State) -> bool:
    return state.index == plan.steps


def result(plan: Plan, state: State) -> torch.Tensor:
    """The x_0 latents once every step is done."""
    if not done(plan, state):
        raise ValueError(f"{state.index} of {plan.steps} steps done")
    return state.x


def _ddim_step(plan: Plan, state: State, eps: torch.Tensor, noise: torch.Tensor | None) -> State:
    """DDIM, Song et al. 2021, eq. 12 with a_t this step's alphas_cumprod and a_prev the next one's:
        x0     = (x - sqrt(1 - a_t) e) / sqrt(a_t)
        x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) e + sigma z
    and eq. 16, sigma = eta sqrt((1 - a_prev)/(1 - a_t) (1 - a_t/a_prev)), taken in float64 as the reference.
    """
    a_t, a_prev = plan.alphas_cumprod[state.index], plan.alphas_cumprod[state.index + 1]
    unit_sigma = ((1 - a_prev.double()) / (1 - a_t.double()) * (1 - a_t.double() / a_prev.double())).sqrt().float()
    sigma = torch.tensor(plan.eta, dtype=torch.float32) * unit_sigma
    x0 = (state.x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
    if noise is not None:
        x = x + sigma * noise.float()
    return State(state.index + 1, x)


def _euler_ancestral_step(plan: Plan, state: State, eps: torch.Tensor, noise: torch.Tensor) -> State:
    """Ancestral Euler in sigma space (x = x0 + sigma eps), as k-diffusion's sample_euler_ancestral (eta 1):
    an Euler step of the probability-flow ODE dx/dsigma = (x - x0)/sigma (Karras et al. 2022, eq. 3) down to
    sigma_down, then fresh noise of scale sigma_up, where sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) /
    sigma^2 (the DDPM posterior's noise) and sigma_down^2 = sigma_next^2 - sigma_up^2."""
    sigma, sigma_next = plan.sigmas[state.index], plan.sigmas[state.index + 1]
    x0 = state.x - sigma * eps
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    derivative = (state.x - x0) / sigma
    x = state.x + derivative * (sigma_down - sigma)
    return State(state.index + 1, x + noise.float() * sigma_up)


def _lcm_step(plan: Plan, state: State, eps: torch.Tensor, noise: torch.Tensor | None) -> State:
    """Multistep latent consistency sampling (Luo et al. 2023, section 4: the consistency function parameterised
    by the eps-model, and its multistep sampling), at timestep t with a_t this step's alphas_cumprod:
        x0       = (x - sqrt(1 - a_t) e) / sqrt(a_t)
        denoised = c_skip(t) x + c_out(t) x0,   c_skip = s^2 / (T^2 + s^2),  c_out = T / sqrt(T^2 + s^2),
    the consistency-model parameterisation whose c_skip(0) = 1, c_out(0) = 0 enforce the boundary condition
    f(x, 0) = x (Song et al. 2023, section 3), with s = sigma_data and T = t scaled by LCM_TIMESTEP_SCALING; then
    fresh noise z takes the estimate to the next timestep's level, x_next = sqrt(a_next) denoised +
    sqrt(1 - a_next) z. The last step returns `denoised` itself (no noise), as LCMScheduler does.
    """
    i = state.index
    scaled_t = plan.timesteps[i] * LCM_TIMESTEP_SCALING  # float32, as diffusers computes it from a tensor timestep
    c_skip = LCM_SIGMA_DATA**2 / (scaled_t**2 + LCM_SIGMA_DATA**2)
    c_out = scaled_t / (scaled_t**2 + LCM_SIGMA_DATA**2) ** 0.5
    a_t = plan.alphas_cumprod[i]
    x0 = (state.x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    denoised = c_out * x0 + c_skip * state.x
    if noise is None:
        return State(i + 1, denoised)
    a_next = plan.alphas_cumprod[i + 1]
    return State(i + 1, a_next.sqrt() * denoised + (1 - a_next).sqrt() * noise.float())


def _alpha_sigma_lambda(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The variance-preserving alpha_t = 1/sqrt(1 + sigma^2), sigma_t = sigma alpha_t, and the half log-SNR
    lambda_t = log(alpha_t / sigma_t) that DPM-Solver and UniPC step in."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    sigma_vp = sigma * alpha
    return alpha, sigma_vp, torch.log(alpha) - torch.log(sigma_vp)


def _data_prediction(plan: Plan, state: State, eps: torch.Tensor) -> torch.Tensor:
    alpha, sigma, _ = _alpha_sigma_lambda(plan.sigmas[state.index])
    return (state.x - sigma * eps) / alpha


def _dpmpp_2m_step(plan: Plan, state: State, eps: torch.Tensor) -> State:
    """DPM-Solver++(2M), Lu et al. 2022, algorithm 2, from s = this step to t = the next, h = lambda_t - lambda_s:
        x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) (D0 + D1 / 2),   D0 = x0_s,  D1 = (x0_s - x0_prev) / r,
    with r = (lambda_s - lambda_prev) / h. The first step (no history) and the last one (to sigma 0) are
    first order, D1 = 0: DPM-Solver++(1), which is DDIM.
    """
    i = state.index
    _, sigma_s, lambda_s = _alpha_sigma_lambda(plan.sigmas[i])
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(plan.sigmas[i + 1])
    x0 = _data_prediction(plan, state, eps)
    h = lambda_t - lambda_s
    phi = alpha_t * (torch.exp(-h) - 1.0)
    x = (sigma_t / sigma_s) * state.x - phi * x0
    if state.x0_history and i + 1 < plan.steps:
        _, _, lambda_prev = _alpha_sigma_lambda(plan.sigmas[i - 1])
        r = (lambda_s - lambda_prev) / h
        x = x - 0.5 * phi * ((1.0 / r) * (x0 - state.x0_history[-1]))
    return State(i + 1, x, (x0,))


def _unipc_step(plan: Plan, state: State, eps: torch.Tensor) -> State:
    """UniPC (Zhao et al. 2023), order 2, B(h) = e^h - 1 ("bh2"), data prediction, as diffusers' defaults.

    First UniC corrects x_i (the last predictor's output, where eps was just evaluated) using this new data
    prediction, with the order the last predictor had; then UniP predicts x_{i+1}. The order is
    min(2, steps done + 1, steps left): first order at the first and the last step.
    """
    i = state.index
    x0 = _data_prediction(plan, state, eps)
    x = state.x
    if i > 0:
        x = _unipc_update(plan, i - 1, state.before_last_step, state.x0_history, min(2, i, plan.steps - i + 1), x0)
    history = (*state.x0_history, x0)[-2:]
    x_next = _unipc_update(plan, i, x, history, min(2, i + 1, plan.steps - i))
    return State(i + 1, x_next, history, x)


def _unipc_update(
    plan: Plan, s: int, x: torch.Tensor, x0_history: tuple[torch.Tensor, ...], order: int,
    x0_at_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """From x at step s to step t = s + 1 (UniPC's algorithms 1 and 2 in the B(h) form, data prediction):
        x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) m_s - alpha_t B(h) sum_k rho_k D_k,
    h = lambda_t - lambda_s, m the data predictions (newest last in `x0_history`, m_s the newest), D_1 =
    (m_prev - m_s) / r_1 with r_1 = (lambda_prev - lambda_s) / h. The predictor UniP has rho_1 = 1/2 at order
    2. With `x0_at_t` it is the corrector UniC: it adds D_t = m_t - m_s with its own rho, the rhos solving
    R rho = g / B(h) (order 2; 1/2 at order 1), as diffusers does.
    """
    _, sigma_s, lambda_s = _alpha_sigma_lambda(plan.sigmas[s])
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(plan.sigmas[s + 1])
    h = lambda_t - lambda_s
    hh = -h  # data prediction integrates in -lambda
    h_phi_1 = b_h = torch.expm1(hh)  # "bh2": B(h) = e^h - 1 = h phi_1(h)
    m_s = x0_history[-1]
    x_t = sigma_t / sigma_s * x - alpha_t * h_phi_1 * m_s
    if order == 2:
        _, _, lambda_prev = _alpha_sigma_lambda(plan.sigmas[s - 1])
        r = (lambda_prev - lambda_s) / h
        d1 = (x0_history[-2] - m_s) / r
    if x0_at_t is None:
        return x_t if order == 1 else x_t - alpha_t * b_h * (0.5 * d1)
    if order == 1:
        return x_t - alpha_t * b_h * (0.5 * (x0_at_t - m_s))
    rhos = torch.linalg.solve(torch.stack([torch.ones(2), torch.stack([r, torch.ones(())])]), _unipc_g(hh, b_h))
    return x_t - alpha_t * b_h * (rhos[0] * d1 + rhos[-1] * (x0_at_t - m_s))


def _unipc_g(hh: torch.Tensor, b_h: torch.Tensor) -> torch.Tensor:
    """g_k / B(h) for k = 1, 2: g_k = k! phi_(k+1)(hh), phi_1(hh) = (e^hh - 1)/hh, phi_(k+1) = (phi_k - 1/k!)/hh."""
    phi = torch.expm1(hh) / hh - 1
    first = phi * 1 / b_h
    phi = phi / hh - 1 / 2
    return torch.stack([first, phi * 2 / b_h])
