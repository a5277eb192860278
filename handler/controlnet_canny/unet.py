"""The SD 1.5 UNet (`model.diffusion_model.*`) and the blocks it shares with the ControlNet.

Attribute names mirror the original checkpoint keys (`input_blocks.1.0.in_layers.2.weight`, ...),
so the original weights load with no key-mapping table.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import UNetConfig
from .token_merging import BipartiteMatching, TokenMerging


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer DDPM steps, cos half first (the reference's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def widen(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` tiled along the batch to `rows` rows.

    The networks take the latents at batch B and the text context at batch kB (classifier-free guidance:
    k = 2, conditional rows then unconditional ones). Until the first cross-attention reads the context,
    the k copies would be identical, so they are computed once and widened there (and wherever a narrow
    tensor meets a wide one); the result equals the one of a forward on k stacked copies of the latents.
    """
    return x if x.shape[0] == rows else x.repeat(rows // x.shape[0], *[1] * (x.dim() - 1))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in fp32 whatever the serving dtype (as the reference)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(32, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + widen(self.emb_layers(emb), h.shape[0])[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head (the reference's scale); [batch, tokens, heads * d] in and out. The one
    attention of every network here (UNet, ControlNet, the VAE's single head, CLIP's causal text tower)."""
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v, is_causal=causal), "b h n d -> b n (h d)")


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self.attend = multihead_attention  # a backend may swap in a kernel computing the same (backends.cpu)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        return self.to_out(self.attend(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                matching: BipartiteMatching | None = None) -> torch.Tensor:
        if matching is None:
            x = widen(x + self.attn1(self.norm1(x)), context.shape[0])
        else:  # token merging: the self-attention sees the merged tokens only
            x = widen(x + matching.unmerge(self.attn1(matching.merge(self.norm1(x)))), context.shape[0])
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class TokenProjection(nn.Conv2d):
    """The transformer's 1x1 convolution (a Conv2d in the checkpoint, weight [C, C, 1, 1]) applied to tokens
    [batch, tokens, C]: the linear it is, on the layout the transformer blocks work in (no transposes around it)."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, self.weight.flatten(1), self.bias)


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int):
        super().__init__()
        self.norm = GroupNorm32(channels, eps=1e-6)
        self.proj_in = TokenProjection(channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = TokenProjection(channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                token_merging: TokenMerging | None = None) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))
        for block in self.transformer_blocks:
            # each block matches its own input, with its own draw of destinations (tomesd's order)
            h = block(h, context, None if token_merging is None else token_merging.matching(h, height, width))
        return widen(x, h.shape[0]) + rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=height, w=width)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A block whose layers take what they need: the timestep embedding, the text context, or neither."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                token_merging: TokenMerging | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, token_merging)
            else:
                x = layer(x)
        return x


def _time_embed(model_channels: int) -> nn.Sequential:
    dim = model_channels * 4
    return nn.Sequential(nn.Linear(model_channels, dim), nn.SiLU(), nn.Linear(dim, dim))


def _transformer(cfg: UNetConfig, channels: int) -> SpatialTransformer:
    return SpatialTransformer(channels, cfg.num_heads, channels // cfg.num_heads, cfg.transformer_depth, cfg.context_dim)


def build_encoder(cfg: UNetConfig) -> tuple[nn.ModuleList, TimestepEmbedSequential, list[int]]:
    """The input blocks and middle block (identical in the UNet and the ControlNet), and each input block's width."""
    emb_dim = cfg.model_channels * 4
    input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, cfg.model_channels, 3, padding=1))])
    widths = [cfg.model_channels]
    ch, ds = cfg.model_channels, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * cfg.model_channels)]
            ch = mult * cfg.model_channels
            if ds in cfg.attention_resolutions:
                layers.append(_transformer(cfg, ch))
            input_blocks.append(TimestepEmbedSequential(*layers))
            widths.append(ch)
        if level != len(cfg.channel_mult) - 1:
            input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
            widths.append(ch)
            ds *= 2
    middle_block = TimestepEmbedSequential(ResBlock(ch, emb_dim, ch), _transformer(cfg, ch), ResBlock(ch, emb_dim, ch))
    return input_blocks, middle_block, widths


class UNetModel(nn.Module):
    """eps(x_t, t, context, control): the ControlledUnetModel, control added to skips and middle output.

    x and t at batch B, context and the result at batch kB (see `widen`); control residuals at either.
    `token_merging` (off when None) merges in the transformers at x's own resolution (`token_merging`).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.model_channels = cfg.model_channels
        self.time_embed = _time_embed(cfg.model_channels)
        self.input_blocks, self.middle_block, widths = build_encoder(cfg)
        emb_dim = cfg.model_channels * 4
        self.output_blocks = nn.ModuleList()
        ch = widths[-1]
        ds = 2 ** (len(cfg.channel_mult) - 1)
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + widths.pop(), emb_dim, cfg.model_channels * mult)]
                ch = cfg.model_channels * mult
                if ds in cfg.attention_resolutions:
                    layers.append(_transformer(cfg, ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(cfg.model_channels, cfg.out_channels, 3, padding=1))

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, control: list[torch.Tensor] | None,
        token_merging: TokenMerging | None = None,
    ) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))

        def merging_at(h: torch.Tensor) -> TokenMerging | None:  # tomesd's max_downsample 1
            return token_merging if h.shape[-2:] == x.shape[-2:] else None

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context, merging_at(h))
            skips.append(h)
        h = widen(self.middle_block(h, emb, context), context.shape[0])
        if control is not None:
            h = h + widen(control[-1], h.shape[0])
        for j, block in enumerate(self.output_blocks):
            skip = widen(skips.pop(), h.shape[0])
            if control is not None:
                skip = skip + widen(control[-2 - j], h.shape[0])
            h = block(torch.cat([h, skip], dim=1), emb, context, merging_at(h))
        return self.out(h)
