"""TAESD, madebyollin's tiny autoencoder for SD 1.x latents: a cheap stand-in for the VAE.

The decoder takes the latents the UNet works on (already multiplied by the VAE's scale factor) and gives RGB in
[0, 1]; the encoder takes RGB in [0, 1] and gives such latents. diffusers' `AutoencoderTiny` wraps the same
networks for images in [-1, 1] (in: `x.add(1).div(2)`, out: `x.mul(2).sub(1)`) with a scaling_factor of 1.0.

The modules are `nn.Sequential`s numbered like madebyollin's, so his `taesd_decoder.*` / `taesd_encoder.*` state
dicts load key for key. diffusers' files hold both halves under `decoder.layers.{i}` / `encoder.layers.{i}`: its
decoder applies the clamp outside its `layers`, so its indices are one lower; the encoder's are the same.

taesdxl (for SDXL latents) has exactly taesd's shapes, so it cannot be told apart and would load (and decode SD 1.x
latents with wrong colours); taesd3 and taef1 (SD3, FLUX) have 16 latent channels and are refused.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .adapter_files import AdapterError, read_adapter_file, tensor_dict

CHANNELS = 64
LATENT_CHANNELS = 4
BLOCKS_PER_STAGE = 3
STAGES = 3  # each halves (encoder) or doubles (decoder) the resolution: 8x in all
# madebyollin's index of a layer minus diffusers' index of the same layer
DIFFUSERS_INDEX_OFFSET = {"decoder": 1, "encoder": 0}
# The convolutions that touch the latents: (key, dimension of the weight that holds the latent channels)
LATENT_CONVOLUTIONS = {"decoder": ("1.weight", 1), "encoder": (f"{2 + STAGES * (BLOCKS_PER_STAGE + 1)}.weight", 0)}
_LISTED = 8


def _conv(in_channels: int, out_channels: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Squashes the latents smoothly into (-3, 3), the range TAESD was trained on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Three 3x3 convolutions with a residual connection (every TAESD block keeps its 64 channels: no skip conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(channels, channels), nn.ReLU(inplace=True),
            _conv(channels, channels), nn.ReLU(inplace=True),
            _conv(channels, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).add_(x).relu_()


class TaesdDecoder(nn.Sequential):
    def __init__(self):
        layers: list[nn.Module] = [Clamp(), _conv(LATENT_CHANNELS, CHANNELS), nn.ReLU(inplace=True)]
        for _ in range(STAGES):
            layers += [Block(CHANNELS) for _ in range(BLOCKS_PER_STAGE)]
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(CHANNELS, CHANNELS, bias=False)]
        layers += [Block(CHANNELS), _conv(CHANNELS, 3)]
        super().__init__(*layers)


class TaesdEncoder(nn.Sequential):
    def __init__(self):
        layers: list[nn.Module] = [_conv(3, CHANNELS), Block(CHANNELS)]
        for _ in range(STAGES):
            layers.append(_conv(CHANNELS, CHANNELS, stride=2, bias=False))
            layers += [Block(CHANNELS) for _ in range(BLOCKS_PER_STAGE)]
        layers.append(_conv(CHANNELS, LATENT_CHANNELS))
        super().__init__(*layers)


class TinyAutoencoder(nn.Module):
    """TAESD's decoder and, when its file was given, its encoder; `.to(device, dtype)` moves both."""

    def __init__(self, with_encoder: bool):
        super().__init__()
        self.decoder = TaesdDecoder()
        self.encoder = TaesdEncoder() if with_encoder else None

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 4, h, w) latents of the UNet's scale -> (N, 3, 8h, 8w) RGB in [0, 1], in the module's dtype."""
        return self.decoder(latents.to(self.dtype)).clamp_(0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N, 4, H/8, W/8) latents of the UNet's scale, in the module's dtype."""
        if self.encoder is None:
            raise ValueError("this TAESD has no encoder: its taesd_encoder file was not given")
        return self.encoder(images.to(self.dtype))


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


class _Half:
    """One half's tensors from one file, keyed by madebyollin's names, and how the file itself names them."""

    def __init__(self, path: Path, role: str, layout: str):
        self.path, self.role, self.layout = path, role, layout
        self.tensors: dict[str, torch.Tensor] = {}
        self.file_keys: dict[str, str] = {}

    def file_key(self, key: str) -> str:
        if self.layout == "madebyollin":
            return key
        index, rest = key.split(".", 1)
        return f"{self.role}.layers.{int(index) - DIFFUSERS_INDEX_OFFSET[self.role]}.{rest}"


def _split(path: Path, tensors: dict[str, torch.Tensor]) -> list[_Half]:
    """The file's halves; every key that belongs to none is an AdapterError."""
    if any(key.startswith(("decoder.layers.", "encoder.layers.")) for key in tensors):
        halves = {role: _Half(path, role, "diffusers") for role in DIFFUSERS_INDEX_OFFSET}
        unknown = []
        for file_key, value in tensors.items():
            match = re.fullmatch(r"(decoder|encoder)\.layers\.(\d+)\.(.+)", file_key)
            if match is None:
                unknown.append(file_key)
                continue
            half = halves[match[1]]
            key = f"{int(match[2]) + DIFFUSERS_INDEX_OFFSET[half.role]}.{match[3]}"
            half.tensors[key], half.file_keys[key] = value, file_key
        if unknown:
            raise AdapterError(f"{path.name}: keys that are not TAESD's (diffusers' AutoencoderTiny layout): "
                               f"{_listing(unknown)}")
        return [half for half in halves.values() if half.tensors]
    if not any(key[:1].isdigit() for key in tensors):
        raise AdapterError(f"{path.name}: not a TAESD file: neither madebyollin's layout (keys like 1.weight, "
                           "3.conv.0.weight) nor diffusers' AutoencoderTiny (decoder.layers.*); "
                           f"keys: {_listing(tensors)}")
    # The decoder's layer 0 is the clamp, which has no weights; the encoder's is its first convolution.
    half = _Half(path, "encoder" if "0.weight" in tensors else "decoder", "madebyollin")
    half.tensors = dict(tensors)
    half.file_keys = {key: key for key in tensors}
    return [half]


def _check(half: _Half, expected: dict[str, torch.Tensor]) -> None:
    """Raises an AdapterError naming the file and every wrong, missing or unknown key of `half`."""
    key, dimension = LATENT_CONVOLUTIONS[half.role]
    latent_weight = half.tensors.get(key)
    if latent_weight is not None and latent_weight.ndim == 4 and latent_weight.shape[dimension] != LATENT_CHANNELS:
        raise AdapterError(
            f"{half.path.name}: a TAESD {half.role} for {latent_weight.shape[dimension]} latent channels "
            f"({half.file_key(key)} has shape {tuple(latent_weight.shape)}): made for another model's latents, like "
            f"taesd3 and taef1 for SD3 and FLUX; this model's latents have {LATENT_CHANNELS} channels")
    problems = []
    missing = set(expected) - set(half.tensors)
    if missing:
        problems.append(f"missing keys: {_listing(half.file_key(key) for key in missing)}")
    unknown = set(half.tensors) - set(expected)
    if unknown:
        problems.append(f"unknown keys: {_listing(half.file_keys[key] for key in unknown)}")
    wrong = [f"{half.file_keys[key]}: {tuple(value.shape)} in the file, {tuple(expected[key].shape)} expected"
             for key, value in half.tensors.items() if key in expected and value.shape != expected[key].shape]
    if wrong:
        problems.append(f"shape mismatches: {_listing(wrong)}")
    not_float = [half.file_keys[key] for key, value in half.tensors.items() if not value.is_floating_point()]
    if not_float:
        problems.append(f"not floating point: {_listing(not_float)}")
    if problems:
        raise AdapterError(f"{half.path.name}: does not fit TAESD's {half.role}: " + "; ".join(problems))


def read_taesd(files: Sequence[str | Path]) -> TinyAutoencoder:
    """TAESD in float32 on the CPU from madebyollin's files (decoder, optional encoder) or diffusers' one file.

    Every file is read and every key checked before any weight is loaded: an AdapterError leaves nothing behind.
    """
    paths = [Path(file) for file in files]
    if not paths:
        raise AdapterError("TAESD: no file given")
    halves: dict[str, _Half] = {}
    for path in paths:
        for half in _split(path, tensor_dict(path, read_adapter_file(path))):
            if half.role in halves:
                raise AdapterError(f"{path.name}: a second TAESD {half.role} (the first is in "
                                   f"{halves[half.role].path.name})")
            halves[half.role] = half
    if "decoder" not in halves:
        raise AdapterError(f"{', '.join(path.name for path in paths)}: no TAESD decoder among the files")
    with torch.device("meta"):
        model = TinyAutoencoder(with_encoder="encoder" in halves)
    for role, half in halves.items():
        _check(half, getattr(model, role).state_dict())
    for role, half in halves.items():
        # Fresh float32 copies: file tensors may be float16, or views at unaligned offsets of a safetensors file.
        weights = {key: value.to(torch.float32).clone() for key, value in half.tensors.items()}
        getattr(model, role).load_state_dict(weights, strict=True, assign=True)
    return model.requires_grad_(False).eval()
