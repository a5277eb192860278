"""Guidance halves share x and t: rows computed once before the first cross-attention (unet.widen) must give
what a forward on the stacked copies gives."""
from __future__ import annotations

import torch

from controlnet_canny.unet import widen

# Same math; only GEMM blocking differs with the batch size (fp32 rounding), amplified up to ~2e-4 by the
# tiny model's 1x1 middle block (GroupNorm over two values per group), as in test_parity_diffusers.
TOL = 1e-3


def _inputs(batch: int, latent: int = 8, context_dim: int = 32):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.tensor([901, 51][:batch])
    context = torch.randn(2 * batch, 77, context_dim, generator=g)  # conditional rows, then unconditional ones
    return x, t, context


def _assert_close(narrow: torch.Tensor, stacked: torch.Tensor) -> None:
    assert narrow.shape == stacked.shape
    assert (narrow - stacked).abs().max().item() <= TOL * max(1.0, stacked.abs().max().item())


def test_widen_tiles_the_batch():
    x = torch.arange(6.0).view(3, 2)
    assert torch.equal(widen(x, 6), torch.cat([x, x]))
    assert widen(x, 3) is x


def test_controlnet_with_shared_rows_matches_stacked_batch(tiny_pipeline):
    control = tiny_pipeline.model.control_model
    x, t, context = _inputs(batch=2)
    hint = control.encode_hint((torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6)) > 0.8).float())
    with torch.inference_mode():
        narrow = control(x, hint, t, context)
        stacked = control(torch.cat([x, x]), torch.cat([hint, hint]), torch.cat([t, t]), context)
    assert len(narrow) == len(stacked) == 13
    assert narrow[0].shape[0] == 2  # before any cross-attention: computed once per sample
    assert narrow[-1].shape[0] == 4
    for a, b in zip(narrow, stacked):
        _assert_close(widen(a, 4), b)


def test_unet_with_shared_rows_matches_stacked_batch(tiny_pipeline):
    unet = tiny_pipeline.model.model.diffusion_model
    x, t, context = _inputs(batch=2)
    shapes = [r.shape for r in tiny_pipeline.model.control_model(
        torch.cat([x, x]), torch.zeros(4, 32, 8, 8), torch.cat([t, t]), context)]
    g = torch.Generator().manual_seed(7)
    # residuals of mixed widths, as the ControlNet returns them with shared rows
    control = [torch.randn((2 if i < 2 else 4, *s[1:]), generator=g) for i, s in enumerate(shapes)]
    with torch.inference_mode():
        narrow = unet(x, t, context, control)
        stacked = unet(torch.cat([x, x]), torch.cat([t, t]), context, [widen(r, 4) for r in control])
    _assert_close(narrow, stacked)
