"""guidance_interval (issue 22): classifier-free guidance only at the steps whose sigma lies in (low, high].

The pipeline is checked against a reference loop written here from the definition: the tiny ControlNet + UNet
evaluated once per guidance half (no batching), guidance w inside the interval and the conditional prediction
alone outside, stepped by the reference's DDIM (`ddim.sample_ddim`) and by diffusers' DPMSolverMultistepScheduler.
"""
from __future__ import annotations

import io
import math
import zipfile

import pytest
import torch
import yaml

from controlnet_canny import ddim, samplers
from controlnet_canny.params import GenerationParams, ParamError, parse_params
from controlnet_canny.pipeline import guided_steps

from live_server import wait_until
from test_samplers import sd15_scheduler
from test_server import scrape

STEPS = 8
SCALE = 7.5
# diffusers 0.42's set_timesteps calls np.array(tensor) in a way numpy 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _params(**kwargs) -> GenerationParams:
    return GenerationParams(**{"prompt": "a house", "image_resolution": 64, "ddim_steps": STEPS, "seed": 5,
                               "scale": SCALE, **kwargs})


def _sample(pipe, image, **kwargs):
    """The pipeline's final latents and the Sampling that made them."""
    sampling = pipe.start(pipe.prepare(image, _params(**kwargs)))
    while not sampling.finished:
        pipe.step([sampling])
    return samplers.result(sampling.plan, sampling.state), sampling


def _reference_eps(model, sampling, interval, sigma_of):
    """eps(x, t) by the definition: each half its own forward; guidance only where low < sigma(t) <= high."""
    c = sampling.conditioning
    unet, control_model = model.model.diffusion_model, model.control_model

    @torch.inference_mode()
    def eps(x, t):
        def half(context):
            return unet(x, t, context, control_model(x, c.hint_features, t, context)).float()

        e_cond = half(c.cond)
        low, high = interval
        if not low < sigma_of(t) <= high:
            return e_cond
        e_uncond = half(c.uncond)
        return e_uncond + SCALE * (e_cond - e_uncond)

    return eps


def test_guided_steps():
    sigmas = torch.tensor([14.0, 6.0, 3.0, 1.0, 0.5])
    assert guided_steps(sigmas, 7.5, None) == [True] * 5
    assert guided_steps(sigmas, 1.0, None) == [False] * 5
    assert guided_steps(sigmas, 1.0, (0.0, 100.0)) == [False] * 5
    # (low, high]: a sigma equal to high is inside, one equal to low is not
    assert guided_steps(sigmas, 7.5, (1.0, 6.0)) == [False, True, True, False, False]
    assert guided_steps(sigmas, 7.5, (0.0, 0.1)) == [False] * 5


@pytest.mark.parametrize("interval", [(0.5, 6.0), (1.0, 100.0)], ids=["middle", "one-sided"])
def test_ddim_matches_the_reference_loop(tiny_pipeline, house_image, interval):
    ours, sampling = _sample(tiny_pipeline, house_image, guidance_interval=interval)
    a = tiny_pipeline.alphas_cumprod
    timesteps = ddim.ddim_timesteps(STEPS)
    guided = sampling.guided_steps
    assert True in guided and False in guided  # the interval cuts: the comparison means something

    def sigma_of(t):
        level = a[int(t[0])]
        return math.sqrt((1 - level) / level)

    reference = ddim.sample_ddim(_reference_eps(tiny_pipeline.model, sampling, interval, sigma_of),
                                 sampling.noise[0].clone(), timesteps, a, torch.zeros(1, 1, 1, 1), lambda: None)
    assert (ours - reference).abs().max() <= 1e-4
    plain, _ = _sample(tiny_pipeline, house_image)
    assert (ours - plain).abs().max() > 0.01  # the cut steps changed the result, far beyond the tolerance


def test_dpmpp_2m_matches_the_reference_loop(tiny_pipeline, house_image):
    interval = (0.5, 6.0)
    ours, sampling = _sample(tiny_pipeline, house_image, sampler="dpmpp_2m", guidance_interval=interval)
    scheduler = sd15_scheduler("dpmpp_2m")
    scheduler.set_timesteps(STEPS)
    sigma_at = dict(zip(scheduler.timesteps.tolist(), scheduler.sigmas.tolist()))
    assert sampling.guided_steps == [interval[0] < sigma_at[t] <= interval[1] for t in scheduler.timesteps.tolist()]
    assert True in sampling.guided_steps and False in sampling.guided_steps
    eps = _reference_eps(tiny_pipeline.model, sampling, interval, lambda t: sigma_at[int(t[0])])
    x = sampling.noise[0].clone()
    for t in scheduler.timesteps:
        x = scheduler.step(eps(x, t.repeat(len(x))), t, x).prev_sample
    assert (ours - x).abs().max() <= 1e-4


def test_unconditional_rows_run_only_inside_the_interval(tiny_pipeline, house_image, monkeypatch):
    unet = tiny_pipeline.model.model.diffusion_model
    rows, forward = [], unet.forward
    # the context has a row per sample and guidance half (x and t have one per sample: unet.widen)
    monkeypatch.setattr(unet, "forward", lambda x, t, context, *a: rows.append(len(context)) or forward(x, t, context, *a))
    _, sampling = _sample(tiny_pipeline, house_image, num_samples=2, guidance_interval=(0.5, 6.0))
    assert rows == [4 if guided else 2 for guided in sampling.guided_steps]


def test_off_by_default_and_an_interval_holding_every_sigma_changes_nothing(tiny_pipeline, house_image):
    plain, sampling = _sample(tiny_pipeline, house_image)
    assert sampling.guided_steps == [True] * sampling.total
    everything, _ = _sample(tiny_pipeline, house_image, guidance_interval=(0.0, 1000.0))
    assert torch.equal(plain, everything)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_a_request_with_an_interval_batched_equals_itself_alone(tiny_pipeline, house_image, sampler):
    pipe = tiny_pipeline
    alone, _ = _sample(pipe, house_image, sampler=sampler, guidance_interval=(0.5, 6.0))
    with_interval = pipe.start(pipe.prepare(house_image, _params(sampler=sampler, guidance_interval=(0.5, 6.0))))
    without = pipe.start(pipe.prepare(house_image, _params(seed=9)))
    shared = 0
    while not with_interval.finished:
        groups = pipe.groups([s for s in (with_interval, without) if not s.finished])
        shared += any(len(g) == 2 for g in groups)
        for group in groups:
            pipe.step(group)
    assert shared > 0  # the two shared evaluations where both were guided
    # equal to rounding: a batch of other rows may sum in another order
    assert (samplers.result(with_interval.plan, with_interval.state) - alone).abs().max() <= 1e-4


@pytest.mark.parametrize("value,expected", [
    ("0.5,6", (0.5, 6.0)), ([0, 14.6], (0.0, 14.6)), (" 1 , 2 ", (1.0, 2.0)), (None, None), ("none", None),
])
def test_parse(value, expected):
    assert parse_params({"prompt": "p", "guidance_interval": value}).guidance_interval == expected


@pytest.mark.parametrize("value", ["6,0.5", "1,1", "-1,2", "1", [1, 2, 3], "a,b", [1, float("inf")], {"low": 1}])
def test_parse_refuses(value):
    with pytest.raises(ParamError) as err:
        parse_params({"prompt": "p", "guidance_interval": value})
    assert err.value.field == "guidance_interval"


def test_reported_as_a_list():
    params = parse_params({"prompt": "p", "guidance_interval": "0.5,6"})
    assert params.to_dict()["guidance_interval"] == [0.5, 6.0]


@pytest.mark.server
def test_served_reported_and_counted(server):
    def conditional_steps() -> float:
        return sum(value for labels, value in scrape(server).get("ControlNetDenoisingSteps", [])
                   if labels.get("Guidance") == "conditional")

    before = conditional_steps()
    # the tiny server's 4 DDIM steps start at sigma 4.12, 1.62, 0.70, 0.04: two of them inside (0.5, 2]
    response = server.predict({"guidance_interval": "0.5,2", "seed": 4})
    assert response.status_code == 200, response.text
    params = yaml.safe_load(zipfile.ZipFile(io.BytesIO(response.content)).read("params.yaml"))
    assert params["guidance_interval"] == [0.5, 2.0]
    wait_until(lambda: conditional_steps() - before >= 2, 15, "two conditional-only evaluations on /metrics")
    refused = server.predict({"guidance_interval": "2,0.5"})
    assert refused.status_code == 400 and refused.json()["field"] == "guidance_interval"


def test_token_merging_outside_the_interval_is_tomesds_odd_batch(tiny_pipeline, house_image):
    # a step that runs the conditional half alone has no guidance pair to share places: the top-left ones, no draw
    sampling = tiny_pipeline.start(tiny_pipeline.prepare(house_image, _params(guidance_interval=(0.5, 6.0),
                                                                              token_merging_ratio=0.5)))
    drawn = []
    while not sampling.finished:
        drawn.append(sampling.token_merging().generators is not None)
        tiny_pipeline.step([sampling])
    assert drawn == sampling.guided_steps and True in drawn and False in drawn
