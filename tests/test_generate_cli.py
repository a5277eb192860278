"""scripts/generate.py end to end, as a user runs it: tiny checkpoint, 64x64, result bundle."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from dataclasses import fields
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from controlnet_canny.bundle import read_png_parameters
from controlnet_canny.params import GenerationParams

from conftest import ROOT, TINY_CONFIG

SCRIPT = ROOT / "scripts" / "generate.py"
# 4 steps, not 3: ddim_timesteps(3) reaches index 1000 (see test_seeds.test_steps_where_timesteps_reach_1000).
ARGS = ["--image-resolution", "64", "--ddim-steps", "4", "--num-samples", "2", "--seed", "7",
        "--prompt", "a house", "--n-prompt", "lowres", "--strength", "0.8", "--scale", "7.5", "--eta", "0.25",
        "--low-threshold", "50", "--high-threshold", "150", "--precision", "fp32", "--device", "cpu",
        # Levers pinned, not timed: on a busy machine two runs may time them apart and choose packed or plain
        # convolutions, which round differently, and the runs here are compared pixel for pixel.
        "--backend", "prepack=none", "--backend", "winograd=none", "--backend", "attention=torch"]
EXPECTED = {
    "prompt": "a house", "a_prompt": "best quality, extremely detailed", "n_prompt": "lowres", "num_samples": 2,
    "image_resolution": 64, "ddim_steps": 4, "guess_mode": False, "strength": 0.8, "scale": 7.5, "seed": 7,
    "eta": 0.25, "low_threshold": 50, "high_threshold": 150,
}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the tiny model is 100x slower with 2 threads on 2 busy cores
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory, house_image) -> Path:
    path = tmp_path_factory.mktemp("cli_in") / "house.png"
    Image.fromarray(house_image).save(path)
    return path


def _generate(tmp_path_factory, image_path, checkpoints: list[Path], name: str) -> zipfile.ZipFile:
    out_dir = tmp_path_factory.mktemp(name)
    out = out_dir / "result.zip"
    flags = [arg for path in checkpoints for arg in ("--checkpoint", str(path))]
    result = _run([*flags, "--config", str(TINY_CONFIG), "--image", str(image_path), *ARGS, "--out", str(out)], out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out_dir.iterdir()) == ["result.zip"]  # nothing else written
    return zipfile.ZipFile(out)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_checkpoint, image_path) -> zipfile.ZipFile:
    return _generate(tmp_path_factory, image_path, [tiny_checkpoint], "cli_a")


@pytest.fixture(scope="module")
def bundle_again(tmp_path_factory, tiny_checkpoint, image_path) -> zipfile.ZipFile:
    return _generate(tmp_path_factory, image_path, [tiny_checkpoint], "cli_b")


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_bundle_contents(bundle):
    assert sorted(bundle.namelist()) == ["edge_map.png", "params.yaml", "sample_00.png", "sample_01.png"]
    for name in ("sample_00.png", "sample_01.png"):
        pixels = _pixels(bundle.read(name))
        assert pixels.shape == (64, 64, 3) and pixels.std() > 5
    assert not np.array_equal(_pixels(bundle.read("sample_00.png")), _pixels(bundle.read("sample_01.png")))


def test_params_yaml_has_every_parameter(bundle):
    params = yaml.safe_load(bundle.read("params.yaml"))
    assert params["seeds"] == [7, 8]
    assert {f.name for f in fields(GenerationParams)} <= set(params)
    for key, value in EXPECTED.items():
        assert params[key] == value, key


def test_sample_pngs_carry_their_seed(bundle):
    for i, name in enumerate(("sample_00.png", "sample_01.png")):
        embedded = read_png_parameters(bundle.read(name))
        assert embedded["seed"] == 7 + i and embedded["prompt"] == "a house" and embedded["scale"] == 7.5


def test_edge_map_is_the_canny_of_the_resized_input(bundle, house_image):
    edges = cv2.imdecode(np.frombuffer(bundle.read("edge_map.png"), np.uint8), cv2.IMREAD_UNCHANGED)
    resized = cv2.resize(house_image, (64, 64), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(edges if edges.ndim == 2 else edges[:, :, 0], cv2.Canny(resized, 50, 150))


def test_deterministic_across_runs(bundle, bundle_again):
    for name in ("sample_00.png", "sample_01.png", "edge_map.png", "params.yaml"):
        assert bundle.read(name) == bundle_again.read(name), name


def test_v11_pair(tmp_path_factory, tiny_dir, image_path, bundle):
    split = _generate(tmp_path_factory, image_path,
                      [tiny_dir / "tiny_sd15_base.ckpt", tiny_dir / "control_tiny_v11_canny.pth"], "cli_v11")
    for name in ("sample_00.png", "sample_01.png"):  # same weights: same pixels (the PNG text names the files)
        np.testing.assert_array_equal(_pixels(split.read(name)), _pixels(bundle.read(name)))
    assert yaml.safe_load(split.read("params.yaml"))["seeds"] == [7, 8]


def test_bad_image_reported(tmp_path, tiny_checkpoint):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    result = _run(["--checkpoint", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--image", str(not_image),
                   "--prompt", "x", "--out", str(tmp_path / "r.zip")], tmp_path)
    assert result.returncode != 0
    assert "--image" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r.zip").exists()


def test_controls_and_own_control_map(tmp_path, tiny_checkpoint, house_image):
    edges = cv2.Canny(cv2.resize(house_image, (64, 64), interpolation=cv2.INTER_AREA), 50, 150)
    control, init = tmp_path / "edges.png", tmp_path / "init.png"
    Image.fromarray(edges).save(control)
    Image.fromarray(house_image[::-1]).save(init)
    out = tmp_path / "r.zip"
    long_prompt = " ".join(["house"] * 90)
    result = _run(["--checkpoint", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--control-image", str(control),
                   "--init-image", str(init), "--denoising-strength", "0.5", "--sampler", "unipc", "--karras",
                   "--control-mode", "prompt", "--guidance-end", "0.5", "--guidance-interval", "0.5,6",
                   "--ddim-steps", "4", "--prompt", long_prompt,
                   "--image-resolution", "64", "--seed", "3", "--device", "cpu", "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: prompt: " in result.stderr  # truncated at 75 tokens, said so
    bundle = zipfile.ZipFile(out)
    params = yaml.safe_load(bundle.read("params.yaml"))
    assert params["sampler"] == "unipc" and params["karras"] is True and params["control_mode"] == "prompt"
    assert params["guidance_interval"] == [0.5, 6.0]
    assert params["ddim_steps_visited"] == 2 and len(params["control_fidelity"]) == 1
    assert len(params["warnings"]) == 1 and len(params["init_image"]) == len(params["control_image"]) == 64
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(bundle.read("edge_map.png"), np.uint8),
                                               cv2.IMREAD_UNCHANGED), edges)


def test_bad_control_value_reported(tmp_path, tiny_checkpoint, image_path):
    result = _run(["--checkpoint", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--image", str(image_path),
                   "--prompt", "x", "--guidance-start", "0.8", "--guidance-end", "0.5", "--out", str(tmp_path / "r.zip")],
                  tmp_path)
    assert result.returncode != 0 and "guidance_end" in result.stderr and "Traceback" not in result.stderr


def test_lcm_sampler(tmp_path, tiny_checkpoint, image_path):
    common = ["--checkpoint", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--image", str(image_path),
              "--prompt", "a house", "--image-resolution", "64", "--device", "cpu", "--sampler", "lcm", "--scale", "1"]
    out = tmp_path / "r.zip"
    result = _run([*common, "--ddim-steps", "4", "--seed", "5", "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    params = yaml.safe_load(zipfile.ZipFile(out).read("params.yaml"))
    assert (params["sampler"], params["ddim_steps_visited"], params["scale"]) == ("lcm", 4, 1.0)
    refused = _run([*common, "--ddim-steps", "51", "--out", str(tmp_path / "no.zip")], tmp_path)
    assert refused.returncode != 0 and "ddim_steps" in refused.stderr and "Traceback" not in refused.stderr
