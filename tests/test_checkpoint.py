"""The checkpoint loader: every supported format gives the same weights; every mismatch is named; pickles
that would run code are refused; unused keys are ignored; weights land in the requested dtype, off meta."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from controlnet_canny.checkpoint import CheckpointError, is_ignored, load_weights, read_state_dict
from controlnet_canny.config import load_config
from controlnet_canny.model import ControlLDM
from controlnet_canny.pipeline import ControlNetCannyPipeline

from conftest import TINY_CONFIG

CONTROL_KEY = "control_model.zero_convs.0.0.weight"
UNET_KEY = "model.diffusion_model.out.2.weight"


def _load_model(paths, dtype=torch.float32) -> ControlLDM:
    with torch.device("meta"):
        model = ControlLDM(load_config(TINY_CONFIG))
    load_weights(model, [Path(p) for p in paths], torch.device("cpu"), dtype)
    return model


@pytest.fixture(scope="module")
def v10_state(tiny_dir) -> dict[str, torch.Tensor]:
    return dict(torch.load(tiny_dir / "control_tiny_canny.pth", weights_only=True))


@pytest.fixture(scope="module")
def reference_weights(tiny_dir) -> dict[str, torch.Tensor]:
    return _load_model([tiny_dir / "control_tiny_canny.pth"]).state_dict()


def _assert_same_weights(model: ControlLDM, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


# --- every format gives identical weights ------------------------------------------------------------------

@pytest.mark.parametrize("files", [
    ["control_tiny_canny.safetensors"],
    ["tiny_sd15_base.ckpt", "control_tiny_v11_canny.pth"],
    ["tiny_sd15_base.safetensors", "control_tiny_v11_canny.safetensors"],
    ["tiny_sd15_base.ckpt", "control_tiny_v11_canny.safetensors"],
], ids=["v10-safetensors", "v11-ckpt+pth", "v11-safetensors", "v11-mixed"])
def test_formats_load_identical_weights(tiny_dir, reference_weights, files):
    _assert_same_weights(_load_model([tiny_dir / f for f in files]), reference_weights)


def test_v10_weights_are_the_files_tensors(reference_weights, v10_state):
    """The loaded model holds exactly the file's tensors (not a fresh initialisation)."""
    for key, value in reference_weights.items():
        assert torch.equal(value, v10_state[key]), key


def test_ckpt_is_nested_under_state_dict_with_ema(tiny_dir):
    """The fixture really exercises the nested `.ckpt` layout with `model_ema.*` keys."""
    raw = torch.load(tiny_dir / "tiny_sd15_base.ckpt", weights_only=True)
    assert set(raw) == {"state_dict"}
    assert any(k.startswith("model_ema.") for k in raw["state_dict"])
    flat = read_state_dict(tiny_dir / "tiny_sd15_base.ckpt")
    assert UNET_KEY in flat and not any(k.startswith("control_model.") for k in flat)


def test_later_file_overrides_earlier(tiny_dir, v10_state, tmp_path):
    control = {k: v + 1.0 for k, v in v10_state.items() if k.startswith("control_model.")}
    torch.save(control, tmp_path / "control_other.pth")
    model = _load_model([tiny_dir / "control_tiny_canny.pth", tmp_path / "control_other.pth"])
    state = model.state_dict()
    assert torch.equal(state[CONTROL_KEY], v10_state[CONTROL_KEY] + 1.0)
    assert torch.equal(state[UNET_KEY], v10_state[UNET_KEY])


def test_pipeline_images_identical_across_formats(tiny_dir, tiny_pipeline, house_image):
    from controlnet_canny.params import GenerationParams

    params = GenerationParams(prompt="a house", image_resolution=64, ddim_steps=2, seed=3)
    split = ControlNetCannyPipeline.load(
        [tiny_dir / "tiny_sd15_base.safetensors", tiny_dir / "control_tiny_v11_canny.pth"], TINY_CONFIG, device="cpu",
        precision="fp32",
    )
    images = [pipe.generate([pipe.prepare(house_image, params)])[0].images[0] for pipe in (tiny_pipeline, split)]
    assert images[0].shape == (64, 64, 3)
    assert images[0].tobytes() == images[1].tobytes()


# --- unused keys are ignored --------------------------------------------------------------------------------

def test_unused_keys_present_and_ignored(v10_state, tiny_dir, tmp_path):
    # The fixture carries each kind of unused key that the real files carry ...
    keys = set(v10_state)
    assert any(k.startswith("first_stage_model.encoder.") for k in keys)
    assert any(k.startswith("first_stage_model.quant_conv.") for k in keys)
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in keys
    assert {"betas", "alphas_cumprod", "alphas_cumprod_prev", "logvar"} <= keys
    # ... plus the rest of the real files' schedule buffers and EMA copies.
    extra = dict(v10_state)
    for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                 "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"):
        extra[name] = torch.zeros(1000)
    extra["model_ema.diffusion_modelout2weight"] = torch.zeros(3)
    extra["model_ema.decay"] = torch.tensor(0.9999)
    torch.save(extra, tmp_path / "full.pth")
    model = _load_model([tmp_path / "full.pth"])
    assert not any(is_ignored(k) for k in model.state_dict())
    assert torch.equal(model.state_dict()[UNET_KEY], v10_state[UNET_KEY])


@pytest.mark.parametrize("key", [
    "first_stage_model.post_quant_conv.weight", "first_stage_model.decoder.conv_in.weight",
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    "model.diffusion_model.input_blocks.0.0.weight", "control_model.input_hint_block.0.weight",
])
def test_needed_keys_are_not_ignored(key):
    assert not is_ignored(key)


# --- mismatches are named ------------------------------------------------------------------------------------

def test_missing_key_named_with_file(v10_state, tmp_path):
    broken = dict(v10_state)
    del broken[CONTROL_KEY]
    path = tmp_path / "missing_one.pth"
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as err:
        _load_model([path])
    message = str(err.value)
    assert "missing" in message and CONTROL_KEY in message and "missing_one.pth" in message
    assert "unexpected" not in message


def test_base_alone_names_missing_control_keys(tiny_dir):
    with pytest.raises(CheckpointError) as err:
        _load_model([tiny_dir / "tiny_sd15_base.ckpt"])
    message = str(err.value)
    assert "missing" in message and "control_model." in message and "tiny_sd15_base.ckpt" in message
    assert "more" in message  # many keys: the listing is capped, and says so


def test_unexpected_key_named_with_file(v10_state, tmp_path):
    broken = dict(v10_state)
    broken["control_model.extra_block.weight"] = torch.zeros(2)
    torch.save(broken, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError) as err:
        _load_model([tmp_path / "extra.pth"])
    message = str(err.value)
    assert "unexpected" in message and "control_model.extra_block.weight (extra.pth)" in message
    assert "missing" not in message


def test_wrong_shape_named_with_both_shapes(v10_state, tmp_path):
    broken = dict(v10_state)
    expected = tuple(broken[UNET_KEY].shape)
    broken[UNET_KEY] = torch.zeros(expected[0] + 1, *expected[1:])
    torch.save(broken, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError) as err:
        _load_model([tmp_path / "shape.pth"])
    message = str(err.value)
    assert UNET_KEY in message and "shape.pth" in message
    assert str((expected[0] + 1, *expected[1:])) in message and str(expected) in message


def test_v11_control_file_with_wrong_shape_names_it(tiny_dir, v10_state, tmp_path):
    control = {k: v for k, v in v10_state.items() if k.startswith("control_model.")}
    control[CONTROL_KEY] = torch.zeros(1, 1, 1, 1)
    torch.save(control, tmp_path / "control_bad.pth")
    with pytest.raises(CheckpointError) as err:
        _load_model([tiny_dir / "tiny_sd15_base.ckpt", tmp_path / "control_bad.pth"])
    assert f"{CONTROL_KEY} (control_bad.pth)" in str(err.value)


# --- unreadable and hostile files ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["control_tiny_canny.pth", "control_tiny_canny.safetensors", "tiny_sd15_base.ckpt"])
def test_truncated_file_named(tiny_dir, tmp_path, name):
    data = (tiny_dir / name).read_bytes()
    path = tmp_path / ("cut_" + name)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert str(path) in str(err.value)


def test_not_a_checkpoint_named(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights")
    with pytest.raises(CheckpointError, match="notes.pth"):
        read_state_dict(path)


def test_state_dict_of_non_tensors_refused(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"a": 1, "b": [2, 3]}, path)
    with pytest.raises(CheckpointError, match="odd.pth.*not a state dict of tensors"):
        read_state_dict(path)


def test_missing_path_refused(tmp_path):
    path = tmp_path / "nowhere" / "control.pth"
    with pytest.raises(CheckpointError, match="no such checkpoint file") as err:
        ControlNetCannyPipeline.load([path], TINY_CONFIG, device="cpu")
    assert str(path) in str(err.value)


def test_no_checkpoint_refused():
    with pytest.raises(CheckpointError):
        _load_model([])


class _Payload:
    """Unpickling this runs `exec`, which writes the marker file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_code_executing_pickle_refused(tmp_path, v10_state, layout):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    state = {UNET_KEY: v10_state[UNET_KEY], "control_model.evil": _Payload(marker)}
    if layout == "zip":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    if layout == "zip":
        assert "refused" in str(err.value) and "GLOBAL exec" in str(err.value)
        assert "\x1b" not in str(err.value) and "weights_only" not in str(err.value)  # no advice to load unsafely
        # The payload is live: an unsafe load would have run it.
        torch.load(path, weights_only=False)
        assert marker.read_text() == "pwned"


# --- dtype and device -----------------------------------------------------------------------------------------

def test_bf16_load_no_meta(tiny_checkpoint, reference_weights):
    model = _load_model([tiny_checkpoint], torch.bfloat16)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    assert tensors
    for name, tensor in tensors:
        assert tensor.device.type == "cpu", name
        assert not tensor.is_meta, name
        assert tensor.dtype == torch.bfloat16, name
        assert not tensor.requires_grad, name
    assert torch.equal(model.state_dict()[UNET_KEY], reference_weights[UNET_KEY].to(torch.bfloat16))


def test_fp32_load_no_meta(tiny_pipeline):
    for name, tensor in list(tiny_pipeline.model.named_parameters()) + list(tiny_pipeline.model.named_buffers()):
        assert not tensor.is_meta and tensor.dtype == torch.float32, name


def test_unknown_precision_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="precision"):
        ControlNetCannyPipeline.load([tiny_checkpoint], TINY_CONFIG, device="cpu", precision="fp8")


def test_bf16_conversion_releases_pages_without_corrupting_shared_storage(tmp_path):
    """Two keys viewing one storage in the file: releasing the first one's mapped pages after converting it
    must leave the second intact (file-backed pages fault back in from the file)."""
    from torch import nn

    from controlnet_canny.checkpoint import load_weights

    shared = torch.randn(2, 4096)
    path = tmp_path / "shared.pth"
    torch.save({"0.weight": shared[0].view(64, 64), "1.weight": shared[1].view(64, 64)}, path)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    load_weights(model, [path], torch.device("cpu"), torch.bfloat16)
    assert torch.equal(model[0].weight, shared[0].view(64, 64).bfloat16())
    assert torch.equal(model[1].weight, shared[1].view(64, 64).bfloat16())
