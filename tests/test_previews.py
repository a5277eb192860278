"""Live previews (issue 22): the data prediction of every n-th step, through the latent-to-RGB approximation, as
a JPEG in a stream's progress events. A preview never changes the result."""
from __future__ import annotations

import base64
import json

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "handler"))  # the handler's modules, as TorchServe loads them

from controlnet_canny import samplers
from controlnet_canny.params import GenerationParams
from controlnet_canny.previews import LATENT_RGB_FACTORS, latent_rgb, preview_grid

import serving  # noqa: E402

STEPS = 6


def _params(**kwargs) -> GenerationParams:
    return GenerationParams(**{"prompt": "a house", "image_resolution": 64, "ddim_steps": STEPS, "seed": 8, **kwargs})


def _run(pipe, image, preview_every, **kwargs):
    """(the images, {step: preview}) of one request stepped as the handler steps it."""
    sampling = pipe.start(pipe.prepare(image, _params(**kwargs)), preview_every)
    previews = {}
    while not sampling.finished:
        pipe.step([sampling])
        preview = pipe.preview(sampling)
        if preview is not None:
            previews[sampling.done] = preview
    return pipe.finish([sampling])[0].images, previews


def test_latent_rgb_is_the_linear_map():
    latents = torch.zeros(1, 4, 2, 3)
    latents[0, 0] = 1.0  # channel 0 alone: its row of factors, from [-1, 1] to [0, 255]
    latents[0, 3, 1, 2] = -1.0
    rgb = latent_rgb(latents)
    assert rgb.shape == (1, 2, 3, 3) and rgb.dtype == np.uint8
    expected = ((LATENT_RGB_FACTORS[0] + 1) * 127.5).to(torch.uint8).numpy()
    assert np.array_equal(rgb[0, 0, 0], expected)
    expected = ((LATENT_RGB_FACTORS[0] - LATENT_RGB_FACTORS[3] + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(rgb[0, 1, 2], expected)
    assert latent_rgb(torch.full((1, 4, 1, 1), 50.0)).max() == 255  # clipped, not wrapped


@pytest.mark.parametrize("count,size,expected,shrunk", [
    (1, (64, 64), (64, 64), False), (1, (96, 72), (96, 72), False), (2, (64, 64), (64, 128), False),
    (3, (64, 64), (128, 128), False), (12, (96, 96), (192, 256), True), (1, (512, 384), (256, 192), True),
])
def test_grid_fits_the_long_side_and_never_enlarges(count, size, expected, shrunk):
    images = np.random.default_rng(0).integers(0, 255, (count, *size, 3), dtype=np.uint8)
    grid = preview_grid(images)
    assert grid.shape == (*expected, 3) and max(grid.shape[:2]) <= 256
    if not shrunk:  # placed as they are, no resampling
        assert np.array_equal(grid[:size[0], :size[1]], images[0])
        assert np.array_equal(grid[-size[0]:, -size[1]:], images[-1] if count != 3 else np.zeros_like(images[0]))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler_a", "unipc"])
def test_previews_never_change_the_result(tiny_pipeline, house_image, sampler):
    plain, none = _run(tiny_pipeline, house_image, 0, sampler=sampler, num_samples=2)
    previewed, previews = _run(tiny_pipeline, house_image, 2, sampler=sampler, num_samples=2)
    assert none == {}
    steps = tiny_pipeline.start(tiny_pipeline.prepare(house_image, _params(sampler=sampler))).total
    assert sorted(previews) == [s for s in range(2, steps) if s % 2 == 0]  # not the last step: the result follows
    assert all(p.shape == (8, 16, 3) for p in previews.values())  # two 8x8 latents side by side
    for a, b in zip(plain, previewed):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_the_last_steps_prediction_is_the_result(tiny_pipeline, house_image, sampler):
    # these samplers end at sigma 0, where the step's data prediction is what it returns
    sampling = tiny_pipeline.start(tiny_pipeline.prepare(house_image, _params(sampler=sampler)))
    while sampling.done < sampling.total - 1:
        tiny_pipeline.step([sampling])
    before, captured = sampling.state, []
    original = samplers.step
    try:
        samplers.step = lambda plan, state, eps, noise: captured.append(eps) or original(plan, state, eps, noise)
        tiny_pipeline.step([sampling])
    finally:
        samplers.step = original
    prediction = samplers.denoised(sampling.plan, before, captured[0])
    assert torch.allclose(prediction, samplers.result(sampling.plan, sampling.state), atol=1e-5)


def test_progress_event_carries_a_jpeg():
    image = np.random.default_rng(1).integers(0, 255, (64, 128, 3), dtype=np.uint8)
    event = json.loads(serving.progress_event(3, 20, serving.encode_preview(image)))
    assert event["event"] == "progress" and event["step"] == 3 and event["steps"] == 20
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(event["preview"]), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == image.shape
    assert "preview" not in json.loads(serving.progress_event(4, 20))


@pytest.mark.server
def test_stream_carries_previews(server):
    with server.predict({"stream": "true", "seed": 5, "preview_every": "1"}, stream=True) as response:
        assert response.status_code == 200, response.text
        events = [json.loads(line) for line in response.iter_lines() if line]
    progress = [e for e in events if e["event"] == "progress"]
    with_preview = [e for e in progress if "preview" in e]
    assert [e["step"] for e in with_preview] == [e["step"] for e in progress[:-1]]  # each step but the last
    for event in with_preview:
        preview = cv2.imdecode(np.frombuffer(base64.b64decode(event["preview"]), np.uint8), cv2.IMREAD_COLOR)
        assert preview is not None and 0 < max(preview.shape[:2]) <= 256
    assert events[-1]["event"] == "result"


@pytest.mark.server
def test_client_writes_the_frames_and_the_metric_counts_them(server, tmp_path):
    from test_server import ROOT, STEPS, run_client, scrape, wait_until

    out = tmp_path / "out"
    done = run_client(server, "generate", "--image", str(ROOT / "tests" / "data" / "house.png"), "--prompt", "a house",
                      "--param", f"ddim_steps={STEPS}", "--preview-every", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    frames = sorted(p.name for p in (out / "previews").iterdir())
    assert frames == [f"step_{step:02d}.jpg" for step in range(2, STEPS, 2)]
    assert all(cv2.imread(str(out / "previews" / name)) is not None for name in frames)
    assert f"previews: {out / 'previews'}/ ({len(frames)} frames)" in done.stdout
    wait_until(lambda: any(labels.get("Phase") == "preview"
                           for labels, _ in scrape(server).get("ControlNetPhaseSeconds_count", [])),
               15, "the preview phase on /metrics")
