"""The VAE (`first_stage_model.*`): the decoder (latents to RGB in [-1, 1]), part of every model, and the
encoder (RGB to latents), which only img2img needs and which is loaded on its own (`load_encoder`)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checkpoint import VAE_ENCODER_PREFIXES, CheckpointError, load_weights
from .config import ModelConfig, VAEConfig
from .unet import Upsample, multihead_attention


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)  # no fp32 upcast here, unlike the UNet's


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place on fresh tensors: at the full-resolution levels each temporary is tens of MB, and the
        # decoder sets a worker's peak memory.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        q, k, v = (rearrange(p(h), "b c h w -> b (h w) c") for p in (self.q, self.k, self.v))
        out = rearrange(multihead_attention(q, k, v, heads=1), "b (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """A stride-2 3x3 convolution after one row and one column of zeros at the bottom and right only (the
    reference pads asymmetrically, not 1 on every side)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class UpLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks)
        )
        if upsample:
            self.upsample = Upsample(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x) if hasattr(self, "upsample") else x


class DownLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks)
        )
        if downsample:
            self.downsample = Downsample(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x) if hasattr(self, "downsample") else x


class Encoder(nn.Module):
    """RGB to the posterior's moments (mean and log-variance stacked on the channels: 2 * z_channels)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        # RGB in as out: the reference's ddconfig `in_channels` equals `out_ch` (3).
        self.conv_in = nn.Conv2d(cfg.out_ch, cfg.ch, 3, padding=1)
        # down[i] takes the previous level's width to widths[i]; all but the deepest halve the resolution.
        in_widths = [cfg.ch, *widths[:-1]]
        self.down = nn.ModuleList(
            DownLevel(in_widths[i], widths[i], cfg.num_res_blocks, downsample=i != len(widths) - 1)
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h)), inplace=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        # up[i] works at width widths[i]; they run from the deepest level (last) to the first.
        self.up = nn.ModuleList(
            UpLevel(widths[min(i + 1, len(widths) - 1)], widths[i], cfg.num_res_blocks + 1, upsample=i != 0)
            for i in range(len(widths))
        )
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class AutoencoderKL(nn.Module):
    """`first_stage_model`, decoder half."""

    def __init__(self, cfg: VAEConfig, scale_factor: float):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)
        # One float32 number, multiplied: dividing by 0.18215 differs in the last bit (spec section 2).
        self.inverse_scale = float(np.float32(1.0 / scale_factor))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents * self.inverse_scale))


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) or (H, W, 3) uint8 to (N, 3, H, W) float32 in [-1, 1], as diffusers' image processor computes
    it (x / 255 * 2 - 1 in float32): the inverse of the decoder's x * 127.5 + 127.5 up to truncation."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).float()
    pixels = pixels[None] if pixels.dim() == 3 else pixels
    return (pixels / 255.0 * 2.0 - 1.0).permute(0, 3, 1, 2)


class VAEEncoder(nn.Module):
    """`first_stage_model`, encoder half: images in [-1, 1] to latents of the diffusion model's scale.

    The latent posterior is a diagonal Gaussian: its mean and log-variance (clamped to [-30, 20]) are the two
    halves of `quant_conv`'s output channels.
    """

    def __init__(self, cfg: VAEConfig, scale_factor: float):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.scale_factor = scale_factor

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, standard deviation), float32, unscaled, for (N, 3, H, W) images in [-1, 1]."""
        weight = self.quant_conv.weight
        moments = self.quant_conv(self.encoder(images.to(weight.device, weight.dtype))).float()
        mean, log_variance = moments.chunk(2, dim=1)
        return mean, torch.exp(0.5 * log_variance.clamp(-30.0, 20.0))

    def encode(self, images: torch.Tensor, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1] to float32 latents times `scale_factor`, (N, z, H/8, W/8) for SD.

        Without generators: the posterior's mean (deterministic). With one CPU generator per output row: a sample
        mean + std * noise, the noise drawn from each row's generator in float32 on the CPU, which is what
        diffusers 0.42.1's StableDiffusionControlNetImg2ImgPipeline does with a list of generators
        (`retrieve_latents` defaults to `sample_mode="sample"`, one image at a time with generator i). That draw
        comes before the generator's initial noise, so a caller matching diffusers encodes first. One image
        (N = 1) may be sampled for several generators: each row is its own sample of that image's posterior,
        as diffusers' repeated image gives.
        """
        latents, std = self.posterior(images)
        if generators is not None:
            if latents.shape[0] not in (1, len(generators)):
                raise ValueError(f"{len(generators)} generators for {latents.shape[0]} images: give one per image, "
                                 "or one image")
            noise = torch.cat([torch.randn((1, *latents.shape[1:]), generator=g) for g in generators])
            latents = latents + std * noise.to(latents.device)
        return latents * self.scale_factor


def load_encoder(
    config: ModelConfig, checkpoints: Sequence[str | Path], device: torch.device, dtype: torch.dtype
) -> VAEEncoder:
    """The VAE encoder from the model's own checkpoint files, through the same loader and key checks.

    Loaded apart from the rest of the model, when the first img2img request needs it, rather than always:
    text-to-image (the reference path, and every request without an init image) never runs it, and it is
    34.2M parameters (137 MB in fp32, 68 MB in bf16) that a worker would otherwise hold for nothing. The
    cost moves to that first img2img request, which reads those weights from the memory-mapped files
    (measured for SD 1.5's encoder from .safetensors on a busy 2-core machine: 1.1 s, +135 MiB resident), and
    a worker's memory grows by that figure once, then stays. A checkpoint without the encoder's keys serves
    text-to-image as before and fails only here, naming the keys.
    """
    with torch.device("meta"):
        encoder = VAEEncoder(config.vae, config.schedule.scale_factor)
    try:
        # named as in the files: `first_stage_model.encoder.*`, `first_stage_model.quant_conv.*`
        load_weights(nn.ModuleDict({"first_stage_model": encoder}), list(checkpoints), device, dtype,
                     only=VAE_ENCODER_PREFIXES)
    except CheckpointError as err:
        raise CheckpointError(f"img2img needs the VAE encoder: {err}") from None
    return encoder.eval()
