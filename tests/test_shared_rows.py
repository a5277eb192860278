"""Guidance halves share x and t: rows computed once before the first cross-attention (unet.widen) must give
what a forward on the stacked copies gives.

Both are the same math; they differ only in rounding (GEMM blocking changes with the batch size, and the
backend's packed kernels round differently again), so each is held to the exact result, computed in float64
on the same weights: sharing the rows may not add more than the stacked forward's own float32 rounding error.
"""
from __future__ import annotations

import pytest
import torch

from controlnet_canny.checkpoint import load_weights
from controlnet_canny.config import load_config
from controlnet_canny.model import ControlLDM
from controlnet_canny.unet import widen

from conftest import TINY_CONFIG

# The shared rows' error may be this many times the stacked forward's (measured: 0.8-1.2x, AVX-512 and AVX2 code
# paths, at a 32x32 latent, the smallest a 256-px request has; at 8x8 the tiny model's 1x1 middle block, GroupNorm
# over two values a group, amplifies either side's rounding up to 17x, so it proves nothing there).
ERROR_RATIO = 3.0


@pytest.fixture(scope="module")
def exact_model(tiny_checkpoint) -> ControlLDM:
    with torch.device("meta"):
        model = ControlLDM(load_config(TINY_CONFIG))
    load_weights(model, [tiny_checkpoint], torch.device("cpu"), torch.float64)
    return model.eval()


def _inputs(batch: int, latent: int = 32, context_dim: int = 32):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.tensor([901, 51][:batch])
    context = torch.randn(2 * batch, 77, context_dim, generator=g)  # conditional rows, then unconditional ones
    return x, t, context


def _assert_no_less_exact(narrow: torch.Tensor, stacked: torch.Tensor, exact: torch.Tensor) -> None:
    assert narrow.shape == stacked.shape == exact.shape
    scale = exact.abs().max().item()
    narrow_error = (narrow.double() - exact).abs().max().item()
    stacked_error = (stacked.double() - exact).abs().max().item()
    assert narrow_error <= ERROR_RATIO * stacked_error + 1e-6 * scale, (narrow_error, stacked_error)


def test_widen_tiles_the_batch():
    x = torch.arange(6.0).view(3, 2)
    assert torch.equal(widen(x, 6), torch.cat([x, x]))
    assert widen(x, 3) is x


def test_controlnet_with_shared_rows_matches_stacked_batch(tiny_pipeline, exact_model):
    control = tiny_pipeline.model.control_model
    x, t, context = _inputs(batch=2)
    hint = (torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(6)) > 0.8).float()
    with torch.inference_mode():
        features = control.encode_hint(hint)
        narrow = control(x, features, t, context)
        stacked = control(torch.cat([x, x]), torch.cat([features, features]), torch.cat([t, t]), context)
        exact_features = exact_model.control_model.encode_hint(hint.double())
        exact = exact_model.control_model(torch.cat([x, x]).double(), torch.cat([exact_features, exact_features]),
                                          torch.cat([t, t]), context.double())
    assert len(narrow) == len(stacked) == 13
    assert narrow[0].shape[0] == 2  # before any cross-attention: computed once per sample
    assert narrow[-1].shape[0] == 4
    for a, b, c in zip(narrow, stacked, exact):
        _assert_no_less_exact(widen(a, 4), b, c)


def test_unet_with_shared_rows_matches_stacked_batch(tiny_pipeline, exact_model):
    unet = tiny_pipeline.model.model.diffusion_model
    x, t, context = _inputs(batch=2)
    shapes = [r.shape for r in exact_model.control_model(
        torch.cat([x, x]).double(), torch.zeros(4, 32, 32, 32, dtype=torch.float64), torch.cat([t, t]), context.double())]
    g = torch.Generator().manual_seed(7)
    # residuals of mixed widths, as the ControlNet returns them with shared rows
    control = [torch.randn((2 if i < 2 else 4, *s[1:]), generator=g) for i, s in enumerate(shapes)]
    wide = [widen(r, 4) for r in control]
    with torch.inference_mode():
        narrow = unet(x, t, context, control)
        stacked = unet(torch.cat([x, x]), torch.cat([t, t]), context, wide)
        exact = exact_model.model.diffusion_model(torch.cat([x, x]).double(), torch.cat([t, t]), context.double(),
                                                  [r.double() for r in wide])
    _assert_no_less_exact(narrow, stacked, exact)
