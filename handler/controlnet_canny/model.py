"""The whole ControlNet-canny model, laid out exactly as the original checkpoint's top-level keys."""
from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .controlnet import ControlNet
from .text_encoder import FrozenCLIPEmbedder
from .unet import UNetModel
from .vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.diffusion_model = UNetModel(cfg.unet)


class ControlLDM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.model = DiffusionWrapper(cfg)
        self.control_model = ControlNet(cfg.control)
        self.first_stage_model = AutoencoderKL(cfg.vae, cfg.schedule.scale_factor)
        self.cond_stage_model = FrozenCLIPEmbedder(cfg.text)
