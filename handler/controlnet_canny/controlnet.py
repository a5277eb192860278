"""The ControlNet (`control_model.*`): a trainable copy of the UNet encoder, steered by the edge map."""
from __future__ import annotations

import torch
from torch import nn

from .config import UNetConfig
from .unet import _time_embed, build_encoder, timestep_embedding

HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)  # fixed in the reference, not part of the YAML
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)


class ControlNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.model_channels = cfg.model_channels
        self.time_embed = _time_embed(cfg.model_channels)
        hint_layers: list[nn.Module] = []
        ch = cfg.hint_channels
        for out_ch, stride in zip(HINT_CHANNELS, HINT_STRIDES):
            hint_layers += [nn.Conv2d(ch, out_ch, 3, stride=stride, padding=1), nn.SiLU()]
            ch = out_ch
        hint_layers.append(nn.Conv2d(ch, cfg.model_channels, 3, padding=1))
        self.input_hint_block = nn.Sequential(*hint_layers)
        self.input_blocks, self.middle_block, widths = build_encoder(cfg)
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(w, w, 1)) for w in widths)
        self.middle_block_out = nn.Sequential(nn.Conv2d(widths[-1], widths[-1], 1))

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """The hint encoder depends on the edge map alone: run it once per request, not once per step."""
        return self.input_hint_block(hint)

    def forward(
        self, x: torch.Tensor, hint_features: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> list[torch.Tensor]:
        """The 13 control residuals: one per input block, then the middle block's.

        x, timesteps and hint_features at batch B, context at batch kB; a residual comes out at B or kB rows
        (`unet.widen`).
        """
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        h = self.input_blocks[0](x, emb, context) + hint_features
        outs = [self.zero_convs[0](h)]
        for block, zero_conv in zip(self.input_blocks[1:], self.zero_convs[1:]):
            h = block(h, emb, context)
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs
