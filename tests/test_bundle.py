"""Self-describing results: PNGs that carry their parameters, and the zip bundle."""
from __future__ import annotations

import io
import zipfile

import cv2
import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from controlnet_canny.bundle import encode_png, make_bundle, read_png_parameters

PARAMETERS = {
    "prompt": "猫 in a café, 🐱 — \"quoted\" 'single' \\ back: slash # not a comment",
    "a_prompt": "best quality, extremely detailed",
    "n_prompt": "lowres",
    "num_samples": 2,
    "image_resolution": 512,
    "guess_mode": False,
    "strength": 1.0,
    "scale": 9.0,
    "seed": 7,
    "eta": 0.0,
    "seeds": [7, 8],
    "ddim_steps_visited": None,
}


def _image(h: int = 24, w: int = 40) -> np.ndarray:
    return np.random.RandomState(0).randint(0, 256, (h, w, 3), dtype=np.uint8)


def test_png_round_trip_pixels_rgb():
    image = _image()
    png = encode_png(image, PARAMETERS)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), image)  # RGB in, RGB stored
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), image)


def test_png_round_trip_gray():
    edges = (_image()[:, :, 0] > 128).astype(np.uint8) * 255
    png = encode_png(edges)
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.ndim == 2
    np.testing.assert_array_equal(decoded, edges)


def test_png_parameters_round_trip():
    png = encode_png(_image(), PARAMETERS)
    assert read_png_parameters(png) == PARAMETERS


def test_png_parameters_readable_by_pillow():
    """The iTXt chunk is valid (CRC checked by Pillow) and carries UTF-8 JSON under "parameters"."""
    import json

    image = Image.open(io.BytesIO(encode_png(_image(), PARAMETERS)))
    image.load()
    assert json.loads(image.text["parameters"]) == PARAMETERS


def test_png_without_parameters():
    png = encode_png(_image())
    assert read_png_parameters(png) is None
    assert b"iTXt" not in png


def test_parameters_do_not_change_pixels():
    image = _image()
    with_params = cv2.imdecode(np.frombuffer(encode_png(image, PARAMETERS), np.uint8), cv2.IMREAD_UNCHANGED)
    without = cv2.imdecode(np.frombuffer(encode_png(image), np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(with_params, without)


def _bundle(samples: int = 2, parameters=PARAMETERS) -> zipfile.ZipFile:
    pngs = [encode_png(_image() + i, {**parameters, "seed": 7 + i}) for i in range(samples)]
    edge = encode_png(np.zeros((24, 40), np.uint8))
    data = make_bundle(pngs, edge, parameters)
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.testzip() is None
    return archive


def test_bundle_layout():
    archive = _bundle(3)
    assert archive.namelist() == ["sample_00.png", "sample_01.png", "sample_02.png", "edge_map.png", "params.yaml"]
    for i in range(3):
        png = archive.read(f"sample_{i:02d}.png")
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), _image() + i)
        assert read_png_parameters(png)["seed"] == 7 + i
    assert not np.asarray(Image.open(io.BytesIO(archive.read("edge_map.png")))).any()


def test_bundle_sample_names_beyond_ten():
    names = _bundle(12).namelist()
    assert names[10:12] == ["sample_10.png", "sample_11.png"]


def test_bundle_params_yaml_parses_back():
    text = _bundle().read("params.yaml").decode("utf-8")
    assert yaml.safe_load(text) == PARAMETERS
    assert OmegaConf.to_container(OmegaConf.create(text)) == PARAMETERS
    assert "猫" in text  # readable UTF-8, not escapes


@pytest.mark.parametrize("prompt", ["yes", "null", "1e5", "~", "0o17", "- item", "a ${ b", "${oc.env:HOME}",
                                    "line one\nline two", "  padded  ", ""])
def test_bundle_params_yaml_any_prompt(prompt):
    """Any string a client can send survives as the same string (no YAML typing, no interpolation)."""
    parameters = {**PARAMETERS, "prompt": prompt}
    assert yaml.safe_load(_bundle(1, parameters).read("params.yaml")) == parameters


def test_bundle_tuple_values_as_lists():
    parameters = {**PARAMETERS, "size": (512, 768)}
    assert yaml.safe_load(_bundle(1, parameters).read("params.yaml"))["size"] == [512, 768]
