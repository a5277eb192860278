"""img2img's VAE encoder (`vae.VAEEncoder`, `vae.load_encoder`) against diffusers 0.42.1 on the tiny checkpoint.

diffusers' AutoencoderKL is built from diffusers' own config for `cldm_tiny.yaml` and loaded strictly with its own
converter of the original keys, as tests/test_parity_diffusers.py does for the decoder. The init latents are
compared with what `StableDiffusionControlNetImg2ImgPipeline.prepare_latents` itself computes.
"""
from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, StableDiffusionControlNetImg2ImgPipeline  # noqa: E402
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import TINY_CONFIG  # noqa: E402
from controlnet_canny.checkpoint import CheckpointError, load_weights, read_state_dict  # noqa: E402
from controlnet_canny.config import load_config  # noqa: E402
from controlnet_canny.model import ControlLDM  # noqa: E402
from controlnet_canny.vae import load_encoder, to_unit_range  # noqa: E402

TOL = 1e-5  # fp32, absolute: observed ~1e-7
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def config():
    return load_config(TINY_CONFIG)


@pytest.fixture(scope="module")
def encoder(config, tiny_checkpoint):
    return load_encoder(config, [tiny_checkpoint], CPU, torch.float32)


@pytest.fixture(scope="module")
def diffusers_vae(tiny_checkpoint) -> AutoencoderKL:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # image_size deprecation notice
        config = sfu.create_vae_diffusers_config_from_ldm(OmegaConf.to_container(OmegaConf.load(TINY_CONFIG)), {},
                                                          image_size=64)
    vae = AutoencoderKL(**config).eval()
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(dict(read_state_dict(tiny_checkpoint)), config), strict=True)
    return vae


@pytest.fixture(scope="module")
def images(house_image) -> np.ndarray:
    """Two 64x64 uint8 RGB images: the house, and seeded noise."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return np.stack([house_image[:64, :64], noise])


def _max_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return (ours.double() - theirs.double()).abs().max().item()


def test_unit_range_is_diffusers_preprocessing(images):
    ours = to_unit_range(images)
    processor = VaeImageProcessor(vae_scale_factor=8)
    theirs = torch.cat([processor.preprocess(Image.fromarray(image)) for image in images])
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
    assert torch.equal(to_unit_range(images[0]), ours[:1])  # one (H, W, 3) image is a batch of one


def test_posterior_matches_diffusers(encoder, diffusers_vae, images):
    x = to_unit_range(images)
    with torch.inference_mode():
        mean, std = encoder.posterior(x)
        theirs = diffusers_vae.encode(x).latent_dist
    assert mean.shape == (2, 4, 8, 8)
    # Non-trivial references, or equality would prove nothing: a wrong layer moves the mean by O(0.1).
    assert theirs.mean.abs().max() > 0.05 and (theirs.std - 1).abs().max() > 1e-3
    assert _max_diff(mean, theirs.mean) < TOL
    assert _max_diff(std, theirs.std) < TOL
    with torch.inference_mode():
        # `sample_mode="argmax"` in diffusers' retrieve_latents: the mean, scaled.
        assert _max_diff(encoder.encode(x), diffusers_vae.config.scaling_factor * theirs.mode()) < TOL


def test_sampled_init_latents_match_diffusers_img2img(encoder, diffusers_vae, images):
    """With a generator per sample, as our pipeline seeds them: the posterior sample and the initial noise drawn
    after it from the same generator, against `StableDiffusionControlNetImg2ImgPipeline.prepare_latents`."""
    image = to_unit_range(images[:1])
    seeds = [1234, 1235]
    recorded = {}

    def add_noise(original, noise, timestep):
        recorded.update(original=original, noise=noise)
        return original

    fake_pipeline = types.SimpleNamespace(vae=diffusers_vae, scheduler=types.SimpleNamespace(add_noise=add_noise))
    with torch.inference_mode():
        StableDiffusionControlNetImg2ImgPipeline.prepare_latents(
            fake_pipeline, image, torch.tensor([501]), batch_size=1, num_images_per_prompt=len(seeds),
            dtype=torch.float32, device=CPU, generator=[torch.Generator().manual_seed(s) for s in seeds],
        )
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        ours = encoder.encode(image, generators)
        noise = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in generators])
        mean = encoder.encode(image)
    assert ours.shape == (2, 4, 8, 8)
    assert _max_diff(ours, recorded["original"]) < TOL
    assert torch.equal(noise, recorded["noise"])  # the generators were left where diffusers leaves them
    assert _max_diff(ours[0], ours[1]) > 0.1 and _max_diff(ours, mean.expand_as(ours)) > 0.1  # really sampled
    # Each sample depends on its own seed only: alone or beside another, the same.
    with torch.inference_mode():
        alone = encoder.encode(image, [torch.Generator().manual_seed(seeds[1])])
    assert torch.equal(alone[0], ours[1])


def test_one_generator_per_image_or_one_image(encoder, images):
    x = to_unit_range(images)
    generators = [torch.Generator().manual_seed(s) for s in range(3)]
    with torch.inference_mode(), pytest.raises(ValueError, match="3 generators for 2 images"):
        encoder.encode(x, generators)
    with torch.inference_mode():
        assert encoder.encode(x, generators[:2]).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("files", [
    ["control_tiny_canny.pth"],
    ["control_tiny_canny.safetensors"],
    ["tiny_sd15_base.ckpt", "control_tiny_v11_canny.pth"],
    ["tiny_sd15_base.safetensors", "control_tiny_v11_canny.safetensors"],
], ids=["v10-pth", "v10-safetensors", "v11-ckpt+pth", "v11-safetensors"])
def test_loads_from_every_format(config, tiny_dir, files):
    encoder = load_encoder(config, [tiny_dir / f for f in files], CPU, torch.float32)
    in_file = read_state_dict(tiny_dir / files[0])
    state = encoder.state_dict()
    assert len(state) == len([k for k in in_file if k.startswith("first_stage_model.encoder.")]) + 2
    for key, value in state.items():
        assert value.device == CPU and torch.equal(value, in_file[f"first_stage_model.{key}"]), key


def test_loads_in_the_serving_dtype(config, tiny_checkpoint, encoder, images):
    half = load_encoder(config, [tiny_checkpoint], CPU, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    x = to_unit_range(images)
    with torch.inference_mode():
        latents, reference = half.encode(x), encoder.encode(x)
    assert latents.dtype == torch.float32 and 0 < _max_diff(latents, reference) < 0.05 * reference.abs().max()


@pytest.mark.parametrize("dropped", ["first_stage_model.encoder.", "first_stage_model.quant_conv."])
def test_missing_encoder_fails_only_for_img2img(config, tiny_checkpoint, tmp_path, dropped):
    """A checkpoint without the encoder still loads the text-to-image model; asking for the encoder names what is
    missing."""
    state = {k: v for k, v in read_state_dict(tiny_checkpoint).items() if not k.startswith(dropped)}
    path = tmp_path / "no_encoder.pth"
    torch.save(state, path)
    with torch.device("meta"):
        model = ControlLDM(config)
    load_weights(model, [path], CPU, torch.float32)
    with pytest.raises(CheckpointError) as err:
        load_encoder(config, [path], CPU, torch.float32)
    message = str(err.value)
    assert message.startswith("img2img needs the VAE encoder") and "no_encoder.pth" in message
    assert f"missing keys: {dropped}" in message and "unexpected" not in message
    kept = next(p for p in ("first_stage_model.encoder.", "first_stage_model.quant_conv.") if p != dropped)
    assert kept not in message  # only what is missing is named
