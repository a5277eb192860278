"""Architecture read from an omegaconf YAML in the original `cldm_v15.yaml` format, and the key check every
section of model-config.yaml shares."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).parent / "configs"


def reject_unknown_keys(section: Mapping[str, Any], schema: type, where: str) -> None:
    """A configuration section (of model-config.yaml) may only name the fields of its dataclass: a typo fails the
    build or the worker start instead of being ignored."""
    known = sorted(f.name for f in fields(schema))
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {known}")


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_heads: int
    transformer_depth: int
    context_dim: int
    out_channels: int = 4  # UNet only
    hint_channels: int = 3  # ControlNet only


@dataclass(frozen=True)
class VAEConfig:
    z_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    out_ch: int
    embed_dim: int


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text tower; the defaults are ViT-L/14's, which the original YAML implies."""
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    vocab_size: int = 49408
    context_length: int = 77


@dataclass(frozen=True)
class ScheduleConfig:
    linear_start: float
    linear_end: float
    timesteps: int
    scale_factor: float


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig
    control: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig
    schedule: ScheduleConfig

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.ch_mult) - 1)


def _unet(params, **extra) -> UNetConfig:
    unsupported = {
        "use_linear_in_transformer": False, "use_scale_shift_norm": False, "legacy": False,
        "use_spatial_transformer": True, "num_head_channels": -1,
    }
    for key, expected in unsupported.items():
        if key in params and params[key] != expected:
            raise ValueError(f"unsupported architecture option {key}={params[key]} (expected {expected})")
    return UNetConfig(
        in_channels=params.in_channels,
        model_channels=params.model_channels,
        channel_mult=tuple(params.channel_mult),
        num_res_blocks=params.num_res_blocks,
        attention_resolutions=tuple(params.attention_resolutions),
        num_heads=params.num_heads,
        transformer_depth=params.get("transformer_depth", 1),
        context_dim=params.context_dim,
        **extra,
    )


def load_config(path: str | Path) -> ModelConfig:
    root = OmegaConf.load(path)
    p = root.model.params
    dd = p.first_stage_config.params.ddconfig
    if list(dd.attn_resolutions):
        raise ValueError("VAE attention at up-sampling resolutions is not supported (attn_resolutions must be [])")
    text = TextEncoderConfig(**root.get("text_encoder", {}))
    unet = _unet(p.unet_config.params, out_channels=p.unet_config.params.out_channels)
    control = _unet(p.control_stage_config.params, hint_channels=p.control_stage_config.params.hint_channels)
    if unet.context_dim != text.width or control.context_dim != text.width:
        raise ValueError(f"context_dim must equal the text encoder width {text.width}")
    return ModelConfig(
        unet=unet,
        control=control,
        vae=VAEConfig(
            z_channels=dd.z_channels, ch=dd.ch, ch_mult=tuple(dd.ch_mult),
            num_res_blocks=dd.num_res_blocks, out_ch=dd.out_ch,
            embed_dim=p.first_stage_config.params.embed_dim,
        ),
        text=text,
        schedule=ScheduleConfig(
            linear_start=p.linear_start, linear_end=p.linear_end,
            timesteps=p.timesteps, scale_factor=p.scale_factor,
        ),
    )
