"""scripts/client.py without a server: the sweep grid (the seed axis with num_samples, the new axes, input digests)
and the management commands' key."""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import client  # noqa: E402


def _grid(*args: str) -> list[dict]:
    return client.grid(client.parse_args(["sweep", "--image", "in.png", "--out", "out", "--prompt", "p", *args]))


def _image_seeds(items: list[dict]) -> list[int]:
    return [item["seed"] + i for item in items for i in range(int(item.get("num_samples", 1)))]


def test_seed_axis_steps_by_num_samples():
    """The issue's case: seeds 0 and 1 with two samples each made seed 1 twice."""
    items = _grid("--seed", "0:1:1", "--param", "num_samples=2")
    assert [item["seed"] for item in items] == [0]
    assert _image_seeds(items) == [0, 1]


@pytest.mark.parametrize("seeds, samples", [("0:9:1", 4), ("0:99:1", 3), ("5", 2), ("0:20:2", 2), ("0:20:3", 2)])
def test_no_image_seed_twice(seeds, samples):
    items = _grid("--seed", seeds, "--strength", "0.5", "1", "--param", f"num_samples={samples}")
    for strength in (0.5, 1.0):
        image_seeds = _image_seeds([item for item in items if item["strength"] == strength])
        assert len(image_seeds) == len(set(image_seeds))
        assert set(client.numbers(seeds, int)) <= set(image_seeds)  # every seed asked for is made


def test_one_sample_per_seed_unchanged():
    assert [item["seed"] for item in _grid("--seed", "1:3:1")] == [1, 2, 3]


def test_new_axes_sweep():
    items = _grid("--sampler", "ddim", "dpmpp_2m", "--guidance-end", "0.5:1:0.5", "--control-mode", "balanced",
                  "control", "--denoising-strength", "0.3", "--resize-mode", "just_resize", "--karras", "false",
                  "--ddim-steps", "10", "20", "--token-merging-ratio", "0:0.5:0.5")
    assert len(items) == 2 * 2 * 2 * 2 * 2
    assert {item["sampler"] for item in items} == {"ddim", "dpmpp_2m"}
    assert {item["guidance_end"] for item in items} == {0.5, 1.0} and {item["ddim_steps"] for item in items} == {10, 20}
    assert {item["token_merging_ratio"] for item in items} == {0.0, 0.5}


def test_inputs_digest(tmp_path):
    image, control = tmp_path / "a.png", tmp_path / "b.png"
    image.write_bytes(b"image")
    control.write_bytes(b"map")
    alone = client.inputs_digest({"image": image})
    assert alone == __import__("hashlib").sha1(b"image").hexdigest()  # as before: older sweeps resume
    assert client.inputs_digest({"image": image, "control_image": control}) != alone
    assert client.inputs_digest({"image": image, "init_image": control}) != \
        client.inputs_digest({"image": image, "control_image": control})


def test_management_commands_send_the_key_only_where_torchserve_wrote_one(tmp_path):
    """In the Kubernetes pods token authorization is off and TorchServe writes no key file: describe and
    scale-workers then send no key; with a key file they send its management key."""
    assert client.management_headers(tmp_path / "key_file.json") == {}
    (tmp_path / "key_file.json").write_text('{"management": {"key": "m123"}, "inference": {"key": "i456"}}')
    assert client.management_headers(tmp_path / "key_file.json") == {"Authorization": "Bearer m123"}
