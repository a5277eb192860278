"""TAESD: both file layouts load to the same modules, match diffusers' AutoencoderTiny, and bad files are refused."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from controlnet_canny.adapter_files import AdapterError
from controlnet_canny.taesd import TinyAutoencoder, read_taesd
from make_tiny_adapters import write_taesd

BLOCK_KEYS = [f"conv.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]


def madebyollin_shapes(role: str) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of madebyollin's files, spelled out from his architecture, apart from our modules."""
    conv = (64, 64, 3, 3)
    if role == "decoder":
        # 0 clamp, 1 conv(4, 64), 2 ReLU, then per stage 3 blocks, upsample, conv without bias; block, conv(64, 3)
        shapes = {"1.weight": (64, 4, 3, 3), "1.bias": (64,), "19.weight": (3, 64, 3, 3), "19.bias": (3,)}
        blocks, plain_convs = [3, 4, 5, 8, 9, 10, 13, 14, 15, 18], [7, 12, 17]
    else:
        # 0 conv(3, 64), 1 block, then per stage a strided conv without bias and 3 blocks; conv(64, 4)
        shapes = {"0.weight": (64, 3, 3, 3), "0.bias": (64,), "14.weight": (4, 64, 3, 3), "14.bias": (4,)}
        blocks, plain_convs = [1, 3, 4, 5, 7, 8, 9, 11, 12, 13], [2, 6, 10]
    for index in blocks:
        shapes.update({f"{index}.{key}": conv if key.endswith("weight") else (64,) for key in BLOCK_KEYS})
    shapes.update({f"{index}.weight": conv for index in plain_convs})
    return shapes


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("taesd")
    return {
        "madebyollin": write_taesd(root / "madebyollin", "madebyollin", seed=3),
        "madebyollin_pth": write_taesd(root / "madebyollin_pth", "madebyollin", seed=3, suffix=".pth"),
        "diffusers": write_taesd(root / "diffusers", "diffusers", seed=3),
    }


@pytest.fixture(scope="module")
def taesd(files) -> TinyAutoencoder:
    return read_taesd(files["madebyollin"])


def latents(seed: int = 0, shape=(2, 4, 6, 5)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def images01(seed: int = 0, shape=(2, 3, 48, 40)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_madebyollin_files_have_his_keys_and_shapes(files):
    decoder, encoder = (load_file(path) for path in files["madebyollin"])
    assert {key: tuple(value.shape) for key, value in decoder.items()} == madebyollin_shapes("decoder")
    assert {key: tuple(value.shape) for key, value in encoder.items()} == madebyollin_shapes("encoder")
    assert [path.name for path in files["madebyollin"]] == ["taesd_decoder.safetensors", "taesd_encoder.safetensors"]


def test_layouts_load_to_the_same_modules_and_outputs(files, taesd):
    z, x = latents(), images01()
    for layout in ("madebyollin_pth", "diffusers"):
        other = read_taesd(files[layout])
        assert other.state_dict().keys() == taesd.state_dict().keys()
        for key, value in taesd.state_dict().items():
            assert torch.equal(other.state_dict()[key], value), (layout, key)
        assert torch.equal(other.decode(z), taesd.decode(z))
        assert torch.equal(other.encode(x), taesd.encode(x))


def test_decoder_alone_loads_and_has_no_encoder(files):
    decoder_only = read_taesd(files["madebyollin"][:1])
    assert decoder_only.encoder is None
    assert decoder_only.decode(latents()).shape == (2, 3, 48, 40)
    with pytest.raises(ValueError, match="no encoder"):
        decoder_only.encode(images01())


def test_shapes_ranges_and_dtypes(taesd):
    z = latents(shape=(1, 4, 5, 7))
    decoded = taesd.decode(z)
    assert decoded.shape == (1, 3, 40, 56) and decoded.dtype == torch.float32
    assert decoded.min() >= 0 and decoded.max() <= 1
    # The synthetic weights keep most pixels inside (0, 1): the clamp hides little in the comparisons below.
    assert ((decoded > 0) & (decoded < 1)).float().mean() > 0.9
    assert taesd.encode(images01(shape=(1, 3, 40, 56))).shape == (1, 4, 5, 7)


def test_bfloat16(files):
    taesd_bf16 = read_taesd(files["madebyollin"]).to(dtype=torch.bfloat16)
    reference = read_taesd(files["madebyollin"])
    decoded = taesd_bf16.decode(latents())
    assert decoded.dtype == torch.bfloat16
    assert (decoded.float() - reference.decode(latents())).abs().max() < 0.05
    assert taesd_bf16.encode(images01()).dtype == torch.bfloat16


def test_deterministic(files, tmp_path):
    again = write_taesd(tmp_path / "again", "madebyollin", seed=3)
    assert [path.read_bytes() for path in again] == [path.read_bytes() for path in files["madebyollin"]]
    other_seed = write_taesd(tmp_path / "other", "madebyollin", seed=4)
    assert other_seed[0].read_bytes() != again[0].read_bytes()
    first, second = read_taesd(files["madebyollin"]), read_taesd(files["madebyollin"])
    assert torch.equal(first.decode(latents()), second.decode(latents()))
    assert torch.equal(first.encode(images01()), first.encode(images01()))


def test_reading_leaves_the_global_random_state_alone(files):
    before = torch.get_rng_state()
    read_taesd(files["diffusers"])
    assert torch.equal(torch.get_rng_state(), before)


# ---- parity with diffusers' AutoencoderTiny ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_taesd(files):
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.AutoencoderTiny()  # its defaults are TAESD for SD 1.x
    model.load_state_dict(load_file(files["diffusers"][0]), strict=True)
    return model.eval()


def test_decode_matches_diffusers(taesd, diffusers_taesd):
    z = latents(seed=5)
    with torch.no_grad():
        theirs = diffusers_taesd.decode(z).sample  # [-1, 1], unclamped
    raw = taesd.decoder(z)
    assert (raw - (theirs + 1) / 2).abs().max() < 1e-5
    assert (taesd.decode(z) - ((theirs + 1) / 2).clamp(0, 1)).abs().max() < 1e-5
    assert theirs.std(dim=(2, 3)).mean() > 0.1  # images that vary across pixels: a misplaced layer would show


def test_decode_clamps_like_diffusers_postprocessing(files, diffusers_taesd):
    """diffusers leaves the decoder's output unclamped ([-1, 1] nominally); its pipelines clamp when postprocessing."""
    brighter = read_taesd(files["madebyollin"])
    brighter.decoder[-1].bias += 0.4
    z = latents(seed=7)
    assert brighter.decoder(z).max() > 1.05
    with torch.no_grad():
        theirs = diffusers_taesd.decode(z).sample + 0.8  # the same bias, on their [-1, 1] scale
    decoded = brighter.decode(z)
    assert (decoded == 1).any()
    assert (decoded - ((theirs + 1) / 2).clamp(0, 1)).abs().max() < 1e-5


def test_encode_matches_diffusers(taesd, diffusers_taesd):
    x = images01(seed=6)
    with torch.no_grad():
        theirs = diffusers_taesd.encode(x * 2 - 1).latents * diffusers_taesd.config.scaling_factor
    assert diffusers_taesd.config.scaling_factor == 1.0
    assert (taesd.encode(x) - theirs).abs().max() < 1e-5
    assert theirs.std(dim=(2, 3)).mean() > 0.05


# ---- refused files ----------------------------------------------------------------------------------------------


def rewritten(path: Path, tmp_path: Path, change) -> Path:
    """A copy of `path` (same name, in tmp_path) with `change` applied to its tensors."""
    tensors = load_file(path)
    change(tensors)
    out = tmp_path / path.name
    save_file(tensors, out)
    return out


def test_missing_key_is_named(files, tmp_path):
    broken = rewritten(files["madebyollin"][0], tmp_path, lambda t: t.pop("8.conv.2.bias"))
    with pytest.raises(AdapterError, match=r"taesd_decoder\.safetensors: .*missing keys: 8\.conv\.2\.bias"):
        read_taesd([broken, files["madebyollin"][1]])


def test_missing_key_is_named_in_diffusers_terms(files, tmp_path):
    broken = rewritten(files["diffusers"][0], tmp_path, lambda t: t.pop("decoder.layers.7.conv.2.bias"))
    with pytest.raises(AdapterError, match=r"diffusion_pytorch_model\.safetensors: .*decoder.*"
                                           r"missing keys: decoder\.layers\.7\.conv\.2\.bias"):
        read_taesd([broken])


def test_unknown_keys_are_named(files, tmp_path):
    def add_skip(tensors):
        tensors["3.skip.weight"] = torch.zeros(64, 64, 1, 1)

    broken = rewritten(files["madebyollin"][0], tmp_path, add_skip)
    with pytest.raises(AdapterError, match=r"taesd_decoder\.safetensors: .*unknown keys: 3\.skip\.weight"):
        read_taesd([broken])

    def add_foreign(tensors):
        tensors["quant_conv.weight"] = torch.zeros(8, 8, 1, 1)

    broken = rewritten(files["diffusers"][0], tmp_path, add_foreign)
    with pytest.raises(AdapterError, match=r"diffusion_pytorch_model\.safetensors: .*quant_conv\.weight"):
        read_taesd([broken])


def test_wrong_shape_is_named(files, tmp_path):
    def shrink(tensors):
        tensors["14.weight"] = tensors["14.weight"][:, :, :1, :1].contiguous()

    broken = rewritten(files["madebyollin"][1], tmp_path, shrink)
    with pytest.raises(AdapterError, match=re.escape("taesd_encoder.safetensors: does not fit TAESD's encoder: "
                                                     "shape mismatches: 14.weight: (4, 64, 1, 1) in the file, "
                                                     "(4, 64, 3, 3) expected")):
        read_taesd([files["madebyollin"][0], broken])


def test_integer_tensor_is_refused(files, tmp_path):
    def to_int(tensors):
        tensors["19.bias"] = tensors["19.bias"].to(torch.int32)

    broken = rewritten(files["madebyollin"][0], tmp_path, to_int)
    with pytest.raises(AdapterError, match=r"not floating point: 19\.bias"):
        read_taesd([broken])


@pytest.mark.parametrize("role, key, shape", [("decoder", "1.weight", (64, 16, 3, 3)),
                                              ("encoder", "14.weight", (16, 64, 3, 3))])
def test_16_latent_channels_are_refused_by_name(files, tmp_path, role, key, shape):
    def widen(tensors):
        tensors[key] = torch.zeros(shape)
        if role == "encoder":
            tensors["14.bias"] = torch.zeros(16)

    path = files["madebyollin"][0 if role == "decoder" else 1]
    broken = rewritten(path, tmp_path, widen)
    others = [other for other in files["madebyollin"] if other != path]
    with pytest.raises(AdapterError, match=rf"{path.name}: a TAESD {role} for 16 latent channels .*taesd3 and taef1"):
        read_taesd([broken, *others])


def test_16_latent_channels_in_diffusers_layout(files, tmp_path):
    def widen(tensors):
        tensors["decoder.layers.0.weight"] = torch.zeros(64, 16, 3, 3)

    broken = rewritten(files["diffusers"][0], tmp_path, widen)
    with pytest.raises(AdapterError, match=r"16 latent channels \(decoder\.layers\.0\.weight has shape"):
        read_taesd([broken])


def test_pickled_object_is_refused(files, tmp_path):
    tensors = load_file(files["madebyollin"][0])
    tensors["settings"] = argparse.Namespace(scale=1)
    evil = tmp_path / "taesd_decoder.pth"
    torch.save(tensors, evil)
    with pytest.raises(AdapterError, match=r"taesd_decoder\.pth: refused"):
        read_taesd([evil])


def test_file_sets_without_exactly_one_decoder_are_refused(files, tmp_path):
    decoder, encoder = files["madebyollin"]
    with pytest.raises(AdapterError, match="taesd_encoder.safetensors: no TAESD decoder"):
        read_taesd([encoder])
    with pytest.raises(AdapterError, match="a second TAESD decoder"):
        read_taesd([decoder, *files["diffusers"]])
    with pytest.raises(AdapterError, match="no file given"):
        read_taesd([])


def test_other_files_are_not_taken_for_taesd(tmp_path):
    vae = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3)}, vae)
    with pytest.raises(AdapterError, match=r"vae\.safetensors: not a TAESD file"):
        read_taesd([vae])


def test_a_bad_encoder_fails_the_whole_read(files, tmp_path):
    broken = rewritten(files["madebyollin"][1], tmp_path, lambda t: t.pop("0.bias"))
    with pytest.raises(AdapterError, match=r"taesd_encoder\.safetensors: .*missing keys: 0\.bias"):
        read_taesd([files["madebyollin"][0], broken])
