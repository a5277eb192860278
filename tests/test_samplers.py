"""The samplers, step for step against diffusers' schedulers and the reference's DDIM, driven by the tiny model.

Both sides get the same eps function (the tiny ControlNet + UNet, conditional only) and the same noise, drawn
from per-sample CPU generators in the pipeline's order (x_T first, then one tensor per step where the sampler
takes one). Each side evaluates eps on its own latents, so a wrong step shows up in every later one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, LCMScheduler, UniPCMultistepScheduler,
)

from controlnet_canny import ddim, samplers  # noqa: E402

# SD 1.5's scheduler config (runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json), loaded into each
# scheduler class as users swap schedulers (`from_config`): keys a class does not have are ignored, and every
# option the file does not set is the class default.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}
DIFFUSERS = {
    "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler, "euler_a": EulerAncestralDiscreteScheduler,
    "unipc": UniPCMultistepScheduler, "lcm": LCMScheduler,
}


def sd15_scheduler(sampler: str, **options):
    return DIFFUSERS[sampler].from_config(SD15_SCHEDULER_CONFIG, **options)


# diffusers 0.42's set_timesteps calls np.array(tensor) in a way numpy 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
LATENT_SHAPE = (1, 4, 8, 8)
TOL = 1e-5


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def draw(gens: list[torch.Generator]) -> torch.Tensor:
    """One standard-normal tensor per sample, each from its own generator (the pipeline's noise())."""
    return torch.cat([torch.randn(LATENT_SHAPE, generator=g) for g in gens])


@pytest.fixture(scope="module")
def tiny_eps(tiny_pipeline, house_image):
    """eps(x, t) of the tiny ControlNet + UNet for two rows, conditioned on a prompt and the house's edges."""
    from controlnet_canny.preprocess import canny, resize_image

    model = tiny_pipeline.model
    context = tiny_pipeline.encode_text("a house").repeat(2, 1, 1)
    edges = canny(resize_image(house_image, 64), 100, 200)
    hint = torch.from_numpy(np.repeat(edges[None, None], 3, axis=1)).float().div(255.0)
    with torch.inference_mode():
        hint_features = model.control_model.encode_hint(hint).repeat(2, 1, 1, 1)

    @torch.inference_mode()
    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        control = model.control_model(x, hint_features[: len(x)], t, context[: len(x)])
        return model.model.diffusion_model(x, t, context[: len(x)], control)

    return eps


def run_ours(plan, eps, gens, init_latents=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(model inputs, latents after each step)."""
    state = samplers.start(plan, draw(gens), init_latents)
    inputs, latents = [], []
    while not samplers.done(plan, state):
        x, t = samplers.model_input(plan, state)
        assert t.shape == (len(x),) and (t == plan.timesteps[state.index]).all()
        inputs.append(x)
        state = samplers.step(plan, state, eps(x, t), draw(gens) if samplers.takes_noise(plan, state) else None)
        latents.append(state.x)
    assert len(latents) == plan.steps and torch.equal(samplers.result(plan, state), latents[-1])
    return inputs, latents


def run_diffusers(scheduler, steps, strength, eps, gens, init_latents=None, eta=0.0):
    """As diffusers' (img2img) pipelines drive a scheduler: (timesteps, model inputs, latents after each step)."""
    scheduler.set_timesteps(steps)
    if init_latents is None:
        timesteps = scheduler.timesteps
        x = draw(gens) * scheduler.init_noise_sigma
    else:  # StableDiffusionControlNetImg2ImgPipeline.get_timesteps and prepare_latents
        kept = min(int(steps * strength), steps)
        timesteps = scheduler.timesteps[steps - kept:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(steps - kept)
        x = scheduler.add_noise(init_latents, draw(gens), timesteps[:1].repeat(len(init_latents)))
    inputs, latents = [], []
    for t in timesteps:
        model_input = scheduler.scale_model_input(x, t)
        inputs.append(model_input)
        e = eps(model_input, t.repeat(len(x)))
        if isinstance(scheduler, (EulerAncestralDiscreteScheduler, LCMScheduler)):
            x = scheduler.step(e, t, x, generator=gens).prev_sample
        elif isinstance(scheduler, DDIMScheduler):
            x = scheduler.step(e, t, x, eta=eta, variance_noise=draw(gens) if eta else None).prev_sample
        else:
            x = scheduler.step(e, t, x).prev_sample
        latents.append(x)
    return timesteps, inputs, latents


CASES = [
    ("ddim", False), ("dpmpp_2m", False), ("dpmpp_2m", True), ("euler_a", False), ("unipc", False), ("unipc", True),
    ("lcm", False),
]


@pytest.mark.parametrize("strength", [1.0, 0.5], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("steps", [10, 20, 25])
@pytest.mark.parametrize("sampler,karras", CASES, ids=[f"{s}{'-karras' if k else ''}" for s, k in CASES])
def test_step_for_step_as_diffusers(tiny_eps, sampler, karras, steps, strength):
    scheduler = sd15_scheduler(sampler, **({"use_karras_sigmas": True} if karras else {}))
    # The plan gets diffusers' float32 alphas_cumprod, so that the schedules are the same to the bit.
    plan = samplers.plan(sampler, steps, scheduler.alphas_cumprod, karras=karras, denoising_strength=strength)
    init = None if strength == 1.0 else torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7)) * 3
    timesteps, their_inputs, theirs = run_diffusers(scheduler, steps, strength, tiny_eps, generators([5, 6]), init)
    our_inputs, ours = run_ours(plan, tiny_eps, generators([5, 6]), init)

    assert plan.timesteps.dtype == timesteps.dtype and torch.equal(plan.timesteps, timesteps)
    assert plan.steps == (steps if strength == 1.0 else steps // 2)
    assert theirs[-1].abs().max() > 1  # the model moved the latents: "equal" means something
    for k, (x, y) in enumerate(zip(our_inputs, their_inputs)):
        assert (x - y).abs().max() <= TOL, f"model input of step {k}"
    for k, (x, y) in enumerate(zip(ours, theirs)):
        assert (x - y).abs().max() <= TOL, f"latents after step {k} (t={timesteps[k]})"


@pytest.mark.parametrize("steps,strength", [(1, 1.0), (2, 1.0), (4, 1.0), (8, 1.0), (50, 1.0), (4, 0.5), (50, 0.3)])
def test_lcm_as_diffusers_at_its_step_counts(tiny_eps, steps, strength):
    """LCM's few-step recipes and its longest schedule (original_inference_steps): each step's noise drawn from the
    sample's own generator after x_T (diffusers draws it in its step, ours up front; none at the last step), and
    the result LCMScheduler's `denoised` at the last step, which diffusers' pipelines return as the latents. Down
    to t = 259 (4 steps) c_skip is under 4e-8 and c_out within 1e-7 of 1: the 8 and 50 step runs (down to t = 19)
    are the ones that check the boundary-condition scalings (a sigma_data of 0.6 fails them)."""
    scheduler = sd15_scheduler("lcm")
    plan = samplers.plan("lcm", steps, scheduler.alphas_cumprod, denoising_strength=strength)
    init = None if strength == 1.0 else torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7)) * 3
    timesteps, _, theirs = run_diffusers(scheduler, steps, strength, tiny_eps, generators([5, 6]), init)
    _, ours = run_ours(plan, tiny_eps, generators([5, 6]), init)

    assert torch.equal(plan.timesteps, timesteps) and plan.noise_draws == len(timesteps) - 1
    assert theirs[-1].abs().max() > 1
    differences = [(x - y).abs().max().item() for x, y in zip(ours, theirs)]
    print(f"lcm {steps} steps, strength {strength}: max latent difference {max(differences):.2e}")
    assert max(differences) <= TOL, differences


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_as_diffusers(tiny_eps, eta):
    """diffusers takes DDIM's sigma (eq. 16) in float32, the reference in float64: equal to rounding (measured: up
    to 6 float32 ulps of the latents' magnitude after 10 steps; allowed: 16)."""
    scheduler = sd15_scheduler("ddim")
    plan = samplers.plan("ddim", 10, scheduler.alphas_cumprod, eta=eta)
    assert plan.noise_draws == 10
    _, _, theirs = run_diffusers(scheduler, 10, 1.0, tiny_eps, generators([8, 9]), eta=eta)
    _, ours = run_ours(plan, tiny_eps, generators([8, 9]))
    for k, (x, y) in enumerate(zip(ours, theirs)):
        assert (x - y).abs().max() <= 16 * torch.finfo(torch.float32).eps * y.abs().max(), f"latents after step {k}"


def row_wise_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth eps that treats every row alone and exactly the same way at any batch size."""
    t = t.float()[:, None, None, None]
    return torch.tanh(0.3 * x) * torch.cos(t / 157.0) + 0.1 * torch.sin(x * (1 + t / 500.0))


def sample_ddim(eps, seeds, steps, etas) -> torch.Tensor:
    """`ddim.sample_ddim` as the pipeline calls it: one row per sample, each with its eta and generator."""
    gens = generators(seeds)
    return ddim.sample_ddim(
        eps, draw(gens), ddim.ddim_timesteps(steps), ddim.alphas_cumprod(0.00085, 0.012, 1000),
        torch.tensor(etas)[:, None, None, None], lambda: draw(gens),
    )


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("steps", [4, 20, 30])
def test_ddim_bit_identical_to_sample_ddim(tiny_eps, steps, eta):
    """At the reference's timesteps (31 of them for 30 steps), to the bit."""
    plan = samplers.plan("ddim", steps, ddim.alphas_cumprod(0.00085, 0.012, 1000), eta=eta)
    assert plan.timesteps.tolist() == ddim.ddim_timesteps(steps)[::-1]
    _, ours = run_ours(plan, tiny_eps, generators([3, 4]))
    assert torch.equal(ours[-1], sample_ddim(tiny_eps, [3, 4], steps, [eta, eta]))


def test_ddim_mixed_eta_batch_bit_identical_to_sample_ddim():
    """`sample_ddim` runs requests with eta 0 and eta > 0 in one batch (and draws noise for all rows); each
    request's own plan gives its rows, to the bit."""
    reference = sample_ddim(row_wise_eps, [3, 4, 5], 20, [0.0, 0.7, 0.7])
    alphas_cumprod = ddim.alphas_cumprod(0.00085, 0.012, 1000)
    _, alone = run_ours(samplers.plan("ddim", 20, alphas_cumprod), row_wise_eps, generators([3]))
    _, pair = run_ours(samplers.plan("ddim", 20, alphas_cumprod, eta=0.7), row_wise_eps, generators([4, 5]))
    assert torch.equal(torch.cat([alone[-1], pair[-1]]), reference)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("dpmpp_2m", 0.0), ("euler_a", 0.0),
                                         ("unipc", 0.0), ("lcm", 0.0)])
def test_batch_equals_each_sample_alone(sampler, eta):
    """Per-sample generators: sample i of a batch is the sample run alone with seed s + i, ancestral noise too."""
    plan = samplers.plan(sampler, 8, ddim.alphas_cumprod(0.00085, 0.012, 1000), eta=eta)
    _, batch = run_ours(plan, row_wise_eps, generators([20, 21]))
    _, first = run_ours(plan, row_wise_eps, generators([20]))
    _, second = run_ours(plan, row_wise_eps, generators([21]))
    assert torch.equal(batch[-1], torch.cat([first[-1], second[-1]]))
    assert (first[-1] - second[-1]).abs().max() > 0.1


def test_samplers_differ():
    """Every sampler (and Karras' schedule) is its own: the parity tests above cannot pass by comparing one
    sampler with another."""
    alphas_cumprod = ddim.alphas_cumprod(0.00085, 0.012, 1000)
    finals = {}
    for name, karras in CASES:
        plan = samplers.plan(name, 10, alphas_cumprod, karras=karras)
        finals[name, karras] = run_ours(plan, row_wise_eps, generators([1]))[1][-1]
    keys = list(finals)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert (finals[a] - finals[b]).abs().max() > 1e-3, (a, b)


def test_noise_draws():
    alphas_cumprod = ddim.alphas_cumprod(0.00085, 0.012, 1000)
    assert samplers.plan("ddim", 20, alphas_cumprod).noise_draws == 0
    assert samplers.plan("ddim", 20, alphas_cumprod, eta=0.5).noise_draws == 20
    assert samplers.plan("ddim", 20, alphas_cumprod, eta=0.5, denoising_strength=0.5).noise_draws == 10
    assert samplers.plan("euler_a", 20, alphas_cumprod).noise_draws == 20
    assert samplers.plan("euler_a", 20, alphas_cumprod, denoising_strength=0.25).noise_draws == 5
    assert samplers.plan("dpmpp_2m", 20, alphas_cumprod, karras=True).noise_draws == 0
    assert samplers.plan("unipc", 20, alphas_cumprod).noise_draws == 0
    # lcm re-noises after every step but the last, whose result is the denoised estimate itself
    assert samplers.plan("lcm", 4, alphas_cumprod).noise_draws == 3
    assert samplers.plan("lcm", 1, alphas_cumprod).noise_draws == 0
    assert samplers.plan("lcm", 8, alphas_cumprod, denoising_strength=0.5).noise_draws == 3


@pytest.mark.parametrize("arguments,field", [
    (dict(sampler="dpm++"), "sampler"),
    (dict(steps=0), "steps"),
    (dict(steps=1001), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(sampler="dpmpp_2m", steps=1000), "steps"),
    (dict(sampler="unipc", steps=1000), "steps"),
    (dict(sampler="ddim", karras=True), "karras"),
    (dict(sampler="euler_a", karras=True), "karras"),
    (dict(sampler="dpmpp_2m", eta=0.5), "eta"),
    (dict(sampler="ddim", eta=-0.1), "eta"),
    (dict(sampler="lcm", steps=51), "steps"),  # LCMScheduler: at most original_inference_steps (50)
    (dict(sampler="lcm", karras=True), "karras"),
    (dict(sampler="lcm", eta=0.5), "eta"),
    (dict(denoising_strength=0.0), "denoising_strength"),
    (dict(denoising_strength=1.5), "denoising_strength"),
    (dict(steps=4, denoising_strength=0.2), "denoising_strength"),  # int(4 * 0.2) = 0 steps
])
def test_plan_rejects(arguments, field):
    arguments = {"sampler": "ddim", "steps": 20, **arguments}
    with pytest.raises(ValueError, match=f"^{field}"):
        samplers.plan(arguments.pop("sampler"), arguments.pop("steps"), ddim.alphas_cumprod(0.00085, 0.012, 1000),
                      **arguments)


@pytest.mark.parametrize("sampler,karras,steps", [
    ("ddim", False, 1000), ("dpmpp_2m", False, 999), ("dpmpp_2m", True, 999), ("euler_a", False, 1000),
    ("unipc", False, 999), ("unipc", True, 999), ("lcm", False, 50),
])
def test_longest_plans_stay_finite(sampler, karras, steps):
    plan = samplers.plan(sampler, steps, ddim.alphas_cumprod(0.00085, 0.012, 1000), karras=karras)
    assert torch.isfinite(run_ours(plan, row_wise_eps, generators([0]))[1][-1]).all()


def test_misuse_is_an_error():
    alphas_cumprod = ddim.alphas_cumprod(0.00085, 0.012, 1000)
    x = torch.zeros((1, 4, 8, 8))
    with pytest.raises(ValueError, match="^init_latents"):
        samplers.start(samplers.plan("unipc", 10, alphas_cumprod, denoising_strength=0.5), x)
    plan = samplers.plan("euler_a", 1, alphas_cumprod)
    state = samplers.start(plan, x)
    with pytest.raises(ValueError, match="^noise"):
        samplers.step(plan, state, x, None)
    with pytest.raises(ValueError, match="steps done"):
        samplers.result(plan, state)
    state = samplers.step(plan, state, x, x)
    with pytest.raises(ValueError, match="done"):
        samplers.step(plan, state, x, x)
    with pytest.raises(ValueError, match="^noise"):
        samplers.step(samplers.plan("ddim", 10, alphas_cumprod), state, x, x)
    plan = samplers.plan("lcm", 2, alphas_cumprod)
    state = samplers.step(plan, samplers.start(plan, x), x, x)
    with pytest.raises(ValueError, match="^noise.*no noise tensor at step 1"):  # lcm's last step takes none
        samplers.step(plan, state, x, x)
