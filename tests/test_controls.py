"""The controls of issue 11 on the tiny model: samplers, guidance window, control modes, control maps, img2img,
long prompts, control_fidelity, and the sampling loop's contract (noise drawn up front, device syncs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from controlnet_canny import samplers
from controlnet_canny.params import GenerationParams, ParamError
from controlnet_canny.pipeline import control_steps
from controlnet_canny.preprocess import canny, resize_image

from conftest import clearly_differ, max_diff

STEPS = 4


def _params(**kwargs) -> GenerationParams:
    return GenerationParams(**{"prompt": "a house", "image_resolution": 64, "ddim_steps": STEPS, "seed": 11, **kwargs})


def _run(pipe, image, control_image=None, init_image=None, **kwargs) -> list[np.ndarray]:
    return pipe.generate([pipe.prepare(image, _params(**kwargs), control_image, init_image)])[0].images


@pytest.fixture(scope="module")
def baseline(tiny_pipeline, house_image) -> np.ndarray:
    return _run(tiny_pipeline, house_image)[0]


@pytest.fixture(scope="module")
def edge_map(house_image) -> np.ndarray:
    return canny(resize_image(house_image, 64), 100, 200)


@pytest.fixture
def controlnet_calls(tiny_pipeline, monkeypatch) -> list[int]:
    calls = []
    control_model = tiny_pipeline.model.control_model
    forward = control_model.forward

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(control_model, "forward", counting)
    return calls


def test_control_steps_as_diffusers():
    # diffusers: keep = 1 - (i / n < start or (i + 1) / n > end)
    assert control_steps(10, 0.1, 0.7) == [False] + [True] * 6 + [False] * 3
    assert control_steps(4, 0.0, 1.0) == [True] * 4
    assert control_steps(4, 0.5, 1.0) == [False, False, True, True]
    assert control_steps(4, 0.0, 0.2) == [False] * 4


def test_controlnet_runs_only_inside_the_window(tiny_pipeline, house_image, controlnet_calls):
    _run(tiny_pipeline, house_image, guidance_start=0.5)
    assert len(controlnet_calls) == 2
    controlnet_calls.clear()
    _run(tiny_pipeline, house_image)
    assert len(controlnet_calls) == STEPS


def test_window_without_steps_is_no_control(tiny_pipeline, house_image, controlnet_calls):
    skipped = _run(tiny_pipeline, house_image, guidance_end=0.2)[0]
    assert controlnet_calls == []
    # residuals times strength 0 add exact zeros: the same image as no ControlNet at all
    assert skipped.tobytes() == _run(tiny_pipeline, house_image, strength=0.0)[0].tobytes()


def test_window_matters(tiny_pipeline, house_image, baseline):
    assert clearly_differ(_run(tiny_pipeline, house_image, guidance_start=0.5)[0], baseline)
    full = _run(tiny_pipeline, house_image, guidance_start=0.0, guidance_end=1.0)[0]
    assert full.tobytes() == baseline.tobytes()


def test_control_mode_control_is_guess_mode(tiny_pipeline, house_image, baseline, controlnet_calls):
    control = _run(tiny_pipeline, house_image, control_mode="control")[0]
    assert controlnet_calls == [1] * STEPS  # the conditional half only
    assert control.tobytes() == _run(tiny_pipeline, house_image, guess_mode=True)[0].tobytes()
    assert clearly_differ(control, baseline)


def test_control_mode_prompt(tiny_pipeline, house_image, baseline, controlnet_calls):
    prompt = _run(tiny_pipeline, house_image, control_mode="prompt")[0]
    assert controlnet_calls == [1] * STEPS  # both halves, which share their rows until the first cross-attention
    assert clearly_differ(prompt, baseline)
    assert clearly_differ(prompt, _run(tiny_pipeline, house_image, control_mode="control")[0])


def test_control_mode_prompt_scales(tiny_pipeline, house_image, monkeypatch):
    """prompt = balanced with the soft scales strength * 0.825^(12 - i) on both halves: balanced at strength s
    with those scales forced gives the same image."""
    from controlnet_canny import pipeline as pipeline_module

    prompt = _run(tiny_pipeline, house_image, control_mode="prompt", strength=0.7)[0]
    monkeypatch.setattr(pipeline_module, "control_scales", lambda strength, soft: [
        strength * 0.825 ** (12 - i) for i in range(13)])
    assert _run(tiny_pipeline, house_image, strength=0.7)[0].tobytes() == prompt.tobytes()


def test_control_image_replaces_canny(tiny_pipeline, house_image, edge_map, baseline):
    small = resize_image(house_image, 64)  # an image sized like the map
    prepared = tiny_pipeline.prepare(small, _params(low_threshold=1, high_threshold=1), edge_map)
    np.testing.assert_array_equal(prepared.edge_map, edge_map)
    assert _run(tiny_pipeline, small, edge_map)[0].tobytes() == baseline.tobytes()
    assert _run(tiny_pipeline, None, edge_map)[0].tobytes() == baseline.tobytes()  # the map alone
    rgb = np.repeat(edge_map[:, :, None], 3, axis=2)
    assert _run(tiny_pipeline, None, rgb)[0].tobytes() == baseline.tobytes()  # grey or RGB: the same hint


def test_control_image_is_not_recannied(tiny_pipeline, house_image, monkeypatch):
    """The map reaches the hint encoder as sent (the tiny model's hint encoder barely reacts to its input, so
    this is checked at its input rather than in the images)."""
    white = np.full((96, 128), 255, np.uint8)  # canny would find no edge in it
    colour = np.zeros((96, 128, 3), np.uint8)
    colour[..., 1] = 255
    hints = []
    control_model = tiny_pipeline.model.control_model
    encode_hint = control_model.encode_hint
    monkeypatch.setattr(control_model, "encode_hint", lambda hint: hints.append(hint) or encode_hint(hint))
    for control_map in (white, colour):
        prepared = tiny_pipeline.prepare(house_image, _params(ddim_steps=1), control_map)
        assert prepared.edge_map.shape == (64, 64, *control_map.shape[2:])  # resized, channels kept
        tiny_pipeline.generate([prepared])
    assert hints[0].shape == (1, 3, 64, 64) and (hints[0] == 1.0).all()
    assert (hints[1][:, 1] == 1.0).all() and (hints[1][:, [0, 2]] == 0.0).all()  # RGB maps keep their channels


def test_control_image_sized_like_image(tiny_pipeline, house_image):
    with pytest.raises(ParamError) as err:
        tiny_pipeline.prepare(house_image, _params(), np.zeros((64, 64), np.uint8))
    assert err.value.field == "control_image" and "128x96" in err.value.message


def test_width_height_and_resize_modes(tiny_pipeline, house_image):
    shapes = {}
    for mode in ("crop_and_resize", "just_resize", "resize_and_fill"):
        prepared = tiny_pipeline.prepare(house_image, _params(width=256, height=64, resize_mode=mode))
        assert prepared.edge_map.shape == (64, 256) and prepared.image.shape == (64, 256, 3)
        shapes[mode] = prepared.edge_map
    assert not np.array_equal(shapes["crop_and_resize"], shapes["just_resize"])
    assert not shapes["resize_and_fill"][:, :80].any()  # the fill: no image, no edges (the seam makes none)
    image = tiny_pipeline.generate([tiny_pipeline.prepare(house_image, _params(width=256, height=64))])[0].images[0]
    assert image.shape == (64, 256, 3)


@pytest.mark.parametrize("sampler, karras", [("dpmpp_2m", False), ("dpmpp_2m", True), ("euler_a", False),
                                             ("unipc", False), ("unipc", True)])
def test_samplers_batched_equal_alone(tiny_pipeline, house_image, baseline, sampler, karras):
    params = dict(sampler=sampler, karras=karras, ddim_steps=3)
    pair = _run(tiny_pipeline, house_image, num_samples=2, seed=40, **params)
    for i, image in enumerate(pair):  # ancestral noise included: a sample's draws are its own generator's
        assert max_diff(image, _run(tiny_pipeline, house_image, seed=40 + i, **params)[0]) <= 1
    assert clearly_differ(pair[0], pair[1])
    assert pair[0].std() > 5


def test_samplers_differ(tiny_pipeline, house_image):
    images = {s: _run(tiny_pipeline, house_image, sampler=s)[0] for s in ("ddim", "dpmpp_2m", "euler_a", "unipc")}
    assert clearly_differ(images["ddim"], images["euler_a"]) and clearly_differ(images["dpmpp_2m"], images["euler_a"])


def test_eta_is_ddims_only(tiny_pipeline, house_image):
    # the v1.1 demo's defaults set eta 1; another sampler ignores it rather than failing every request
    assert _run(tiny_pipeline, house_image, sampler="unipc", eta=1.0)[0].tobytes() == \
        _run(tiny_pipeline, house_image, sampler="unipc")[0].tobytes()


def test_img2img(tiny_pipeline, house_image, baseline):
    init = np.full((40, 200, 3), (200, 40, 40), np.uint8)  # another aspect ratio: fitted by resize_mode
    calls = []
    prepared = tiny_pipeline.prepare(house_image, _params(ddim_steps=10, denoising_strength=0.5), init_image=init)
    assert prepared.init_image.shape == (64, 64, 3)
    (result,) = tiny_pipeline.generate([prepared], lambda done, total: calls.append((done, total)))
    assert result.steps == 5 and calls[-1] == (5, 5)
    red = result.images[0].astype(int)
    assert clearly_differ(result.images[0], _run(tiny_pipeline, house_image, ddim_steps=10)[0])
    weaker = _run(tiny_pipeline, house_image, init_image=init, ddim_steps=10, denoising_strength=0.2)[0]
    assert clearly_differ(weaker, result.images[0]) and red.std() > 1


def test_img2img_strength_without_steps_refused(tiny_pipeline, house_image):
    with pytest.raises(ParamError) as err:
        tiny_pipeline.prepare(house_image, _params(ddim_steps=4, denoising_strength=0.1),
                              init_image=np.zeros((64, 64, 3), np.uint8))
    assert err.value.field == "denoising_strength"


def test_steps_a_sampler_cannot_take_refused(tiny_pipeline, house_image):
    with pytest.raises(ParamError) as err:
        tiny_pipeline.prepare(house_image, _params(sampler="dpmpp_2m", ddim_steps=1000))
    assert err.value.field == "ddim_steps" and "999" in err.value.message
    assert tiny_pipeline.prepare(house_image, _params(ddim_steps=1000)).params.ddim_steps == 1000  # ddim can


def test_img2img_batched_equal_alone(tiny_pipeline, house_image):
    init = house_image[::-1].copy()
    params = dict(ddim_steps=4, denoising_strength=0.75, eta=0.5)
    a = tiny_pipeline.prepare(house_image, _params(seed=3, num_samples=2, **params), init_image=init)
    b = tiny_pipeline.prepare(house_image, _params(seed=30, **{**params, "eta": 0.0}), init_image=init)
    together = [r.images for r in tiny_pipeline.generate([a, b])]
    assert max_diff(together[0][1], tiny_pipeline.generate([a])[0].images[1]) <= 1
    assert max_diff(together[1][0], tiny_pipeline.generate([b])[0].images[0]) <= 1


LONG = ", ".join(f"a tall red house number {i}" for i in range(14))  # 97 tokens, 102 with a_prompt


def test_truncated_prompt_warns(tiny_pipeline, house_image):
    assert tiny_pipeline.prepare(house_image, _params()).warnings == ()
    prepared = tiny_pipeline.prepare(house_image, _params(prompt=LONG, n_prompt=LONG))
    assert [w.split(":")[0] for w in prepared.warnings] == ["prompt", "n_prompt"]
    assert "75" in prepared.warnings[0] and "long_prompt" in prepared.warnings[0]
    assert tiny_pipeline.start(prepared).conditioning.cond.shape[1] == 77


def test_long_prompt(tiny_pipeline, house_image):
    short = tiny_pipeline.prepare(house_image, _params(long_prompt=True))
    assert tiny_pipeline.start(short).conditioning.cond.shape[1] == 77 and short.warnings == ()
    long = tiny_pipeline.prepare(house_image, _params(prompt=LONG, long_prompt=True))
    assert tiny_pipeline.start(long).conditioning.cond.shape[1] == 2 * 77 and long.warnings == ()
    truncated = _run(tiny_pipeline, house_image, prompt=LONG)[0]
    chunked = tiny_pipeline.generate([long])[0].images[0]
    assert clearly_differ(chunked, truncated)
    # a short prompt: the same context either way
    assert _run(tiny_pipeline, house_image, long_prompt=True)[0].tobytes() == \
        _run(tiny_pipeline, house_image)[0].tobytes()


def test_control_fidelity_per_sample(tiny_pipeline, house_image):
    (result,) = tiny_pipeline.generate([tiny_pipeline.prepare(house_image, _params(num_samples=2))])
    scores = result.control_fidelity
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)


def test_noise_drawn_before_the_first_step(tiny_pipeline, house_image, monkeypatch):
    """Every draw (x_T, then each step's: euler_a draws every step) happens in `start`; `step` draws nothing,
    so nothing is copied to the device per step."""
    draws = []
    randn = torch.randn

    def counting(*args, **kwargs):
        draws.append(kwargs.get("generator") is not None)
        return randn(*args, **kwargs)

    sampling = tiny_pipeline.start(tiny_pipeline.prepare(house_image, _params(sampler="euler_a", num_samples=2)))
    assert sampling.noise.shape[:2] == (1 + STEPS, 2)
    monkeypatch.setattr(torch, "randn", counting)
    while not sampling.finished:
        tiny_pipeline.step([sampling])
    assert draws == []
    assert tiny_pipeline.finish([sampling])[0].images[0].shape == (64, 64, 3)


def test_eta_noise_order_unchanged(tiny_pipeline, house_image):
    """A sample's generator draws x_T, then one tensor per step (eta > 0): as before the draws moved up front."""
    sampling = tiny_pipeline.start(tiny_pipeline.prepare(house_image, _params(eta=0.5)))
    generator = torch.Generator("cpu").manual_seed(11)
    expected = torch.stack([torch.randn((1, 4, 8, 8), generator=generator) for _ in range(1 + STEPS)])
    assert torch.equal(sampling.noise, expected)


def test_progress_and_timers_synchronise(tiny_pipeline, house_image, monkeypatch):
    events = []
    monkeypatch.setattr(tiny_pipeline.backend, "synchronize", lambda: events.append("sync"))
    tiny_pipeline.generate([tiny_pipeline.prepare(house_image, _params())], lambda done, total: events.append(done))
    steps = [i for i, event in enumerate(events) if event != "sync"]
    assert [events[i] for i in steps] == list(range(1, STEPS + 1))
    assert all(events[i - 1] == "sync" for i in steps)  # each progress event after a sync
    # and one before the text and sampling timers are read (decoding ends in a copy to the host, which waits)
    assert events == ["sync"] + [e for i in range(1, STEPS + 1) for e in ("sync", i)] + ["sync"]


def test_samplers_contract_used(tiny_pipeline, house_image, monkeypatch):
    plans = []
    plan = samplers.plan
    prepared = tiny_pipeline.prepare(house_image, _params(sampler="dpmpp_2m", karras=True, ddim_steps=3))
    monkeypatch.setattr(samplers, "plan", lambda *args, **kwargs: plans.append((args, kwargs)) or plan(*args, **kwargs))
    tiny_pipeline.generate([prepared])
    (args, kwargs), = plans
    assert args[:2] == ("dpmpp_2m", 3) and kwargs["karras"] is True and kwargs["denoising_strength"] == 1.0


@pytest.fixture
def unet_rows(tiny_pipeline, monkeypatch) -> list[int]:
    """The eps rows (samples x guidance halves) of every UNet evaluation: its output's, as the input x is shared by
    both halves and widened inside."""
    rows = []
    unet = tiny_pipeline.model.model.diffusion_model
    forward = unet.forward

    def counting(*args, **kwargs):
        eps = forward(*args, **kwargs)
        rows.append(eps.shape[0])
        return eps

    monkeypatch.setattr(unet, "forward", counting)
    return rows


@pytest.mark.parametrize("scale, halves", [(1.0, 1), (1.5, 2)])
def test_lcm_at_scale_1_evaluates_one_half(tiny_pipeline, house_image, unet_rows, scale, halves):
    """LCM's recipe runs at guidance scale 1, where the unconditional half adds nothing: one pass per step."""
    _run(tiny_pipeline, house_image, sampler="lcm", scale=scale, num_samples=2)
    assert unet_rows == [2 * halves] * STEPS


def test_lcm_noise_from_each_samples_generator(tiny_pipeline, house_image):
    """lcm's draws, up front in the documented order: x_T, then one per step but the last (LCMScheduler returns the
    last step's denoised estimate without noise); a sample is the same alone as in a batch."""
    prepared = tiny_pipeline.prepare(house_image, _params(sampler="lcm", scale=1.0, num_samples=2, seed=40))
    generators = [torch.Generator("cpu").manual_seed(s) for s in (40, 41)]
    draws = [torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in generators]) for _ in range(STEPS)]
    assert torch.equal(tiny_pipeline.start(prepared).noise, torch.stack(draws))
    pair = tiny_pipeline.generate([prepared])[0].images
    for i, image in enumerate(pair):
        assert max_diff(image, _run(tiny_pipeline, house_image, sampler="lcm", scale=1.0, seed=40 + i)[0]) <= 1
    assert clearly_differ(pair[0], pair[1])


def test_lcm_steps_beyond_its_schedule_refused(tiny_pipeline, house_image):
    """LCMScheduler takes at most original_inference_steps (50) steps."""
    with pytest.raises(ParamError) as err:
        tiny_pipeline.prepare(house_image, _params(sampler="lcm", ddim_steps=51))
    assert err.value.field == "ddim_steps" and "[1, 50]" in err.value.message
    assert tiny_pipeline.prepare(house_image, _params(sampler="lcm", ddim_steps=50)).params.ddim_steps == 50


def test_lcm_ignores_eta_as_the_other_samplers(tiny_pipeline, house_image):
    assert _run(tiny_pipeline, house_image, sampler="lcm", eta=1.0)[0].tobytes() == \
        _run(tiny_pipeline, house_image, sampler="lcm")[0].tobytes()
