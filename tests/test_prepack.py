"""Packed oneDNN weights (controlnet_canny.backends.cpu_prepack): same results as the plain layers, at every input shape."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from controlnet_canny.backends import cpu_prepack as prepack
from controlnet_canny.backends.cpu_prepack import PackedConv2d, PackedLinear
from controlnet_canny.unet import TokenProjection

pytestmark = pytest.mark.skipif(
    not prepack.supported(torch.device("cpu"), torch.float32), reason="this torch build has no oneDNN"
)
# fp32: rounding only (sums blocked differently). bf16: both sides round their output to bf16 (2^-8 relative),
# so one ulp apart at most, on values of magnitude up to ~4 here.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 4 * 2**-7}
DTYPES = [torch.float32] + (
    [torch.bfloat16] if prepack.supported(torch.device("cpu"), torch.bfloat16) else []
)


def _relative_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max().clamp(min=1)).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
def test_packed_conv_matches_plain_at_any_shape(dtype, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(48, 32, 3, stride=stride, padding=1).to(dtype).requires_grad_(False)
    packed = PackedConv2d(conv)
    # packed once, then run at batch sizes and sizes it was never told about (requests vary)
    for shape in [(1, 48, 8, 8), (2, 48, 4, 4), (4, 48, 16, 10), (3, 48, 1, 1)]:
        x = torch.randn(shape, dtype=dtype)
        with torch.inference_mode():
            ours, theirs = packed(x), conv(x)
        assert ours.shape == theirs.shape and ours.dtype == dtype
        assert _relative_diff(ours, theirs) <= TOLERANCES[dtype], shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_plain_at_any_shape(dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(40, 24, bias=bias).to(dtype).requires_grad_(False)
    packed = PackedLinear(linear)
    for shape in [(1, 40), (2, 77, 40), (3, 5, 40)]:
        x = torch.randn(shape, dtype=dtype)
        with torch.inference_mode():
            ours, theirs = packed(x), linear(x)
        assert ours.shape == theirs.shape and ours.dtype == dtype
        assert _relative_diff(ours, theirs) <= TOLERANCES[dtype], shape


def test_install_twins_replaces_the_chosen_linears_token_projections_and_spatial_convs_only():
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Sequential(nn.SiLU(), nn.Linear(8, 8)), nn.GroupNorm(2, 8),
        TokenProjection(8), nn.Linear(8, 8),
    ).requires_grad_(False)
    x = torch.randn(2, 8, 5, 5)
    not_chosen = model[5]

    def forward():
        return model[4](model[2](model[1](model[0](x)).flatten(2).transpose(1, 2)))

    with torch.inference_mode():
        expected = forward()
        prepack.install_twins(model, lambda layer: None if layer is not_chosen else prepack.packed_twin)
        got = forward()
    assert [type(m) for m in (model[0], model[1], model[2][1], model[3], model[4], model[5])] == [
        PackedConv2d, nn.Conv2d, PackedLinear, nn.GroupNorm, PackedLinear, nn.Linear
    ]
    assert _relative_diff(got, expected) <= TOLERANCES[torch.float32]


def test_token_projection_is_the_checkpoints_1x1_convolution():
    torch.manual_seed(0)
    projection = TokenProjection(6).requires_grad_(False)
    assert projection.weight.shape == (6, 6, 1, 1)  # loads the checkpoint's key as it is
    x = torch.randn(2, 6, 3, 4)
    as_conv = nn.functional.conv2d(x, projection.weight, projection.bias).flatten(2).transpose(1, 2)
    assert torch.allclose(projection(x.flatten(2).transpose(1, 2)), as_conv, atol=1e-6)


def test_unsupported_targets_stay_plain():
    assert not prepack.supported(torch.device("cuda"), torch.float16)
    assert not prepack.supported(torch.device("cpu"), torch.float16)
    assert not prepack.supported(torch.device("cpu"), torch.float64)
