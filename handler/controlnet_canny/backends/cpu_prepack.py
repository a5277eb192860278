"""Convolution and linear weights laid out once, at load, in oneDNN's blocked format (CPU only).

`F.conv2d` and `F.linear` on CPU take weights in the plain PyTorch layout, so oneDNN may reorder a weight into
its blocked layout on every call; at the UNet's deepest levels (1280 channels, a few latent pixels) that reorder
can cost more than the convolution itself. Whether packing pays depends on the CPU and the input shape (on some
it is slower), so `backends.cpu` packs only the layer classes where it measured faster (figures:
docs/benchmarks.md). Same operations, same accumulation precision: results change only by float rounding.

They are the oneDNN ops that torch.compile's weight-freezing passes use on CPU, called directly: the
gain without a compile step at start-up.
"""
from __future__ import annotations

import platform
from collections.abc import Callable

import torch
from torch import nn

from ..checkpoint import MADV_PAGEOUT, advise_pages
from ..unet import TokenProjection


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # measured on x86-64 only; oneDNN runs other kernels on ARM
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.groups = conv.groups
        self.weight = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight.detach(), self.padding, self.stride, self.dilation, self.groups
        )
        self.bias = None if conv.bias is None else conv.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], ""
        )


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear | TokenProjection):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().flatten(1))
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def packable(module: nn.Module) -> bool:
    if type(module) in (nn.Linear, TokenProjection):
        return True
    # 1x1 convolutions are plain GEMMs that run well unpacked; packed without a fixed input size, oneDNN
    # picks a layout it then reorders from on every call (measured 17x slower).
    return (type(module) is nn.Conv2d and module.kernel_size != (1, 1) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _page_out(tensor: torch.Tensor) -> None:
    """Asks the kernel to reclaim a no-longer-used weight's pages.

    fp32 weights on CPU are still memory-mapped from the checkpoint when they get packed: packing reads every
    page, which would leave the whole file resident beside the packed copy. MADV_PAGEOUT reclaims those
    clean file-backed pages and never discards data (anonymous memory without swap just stays), so it is
    safe on any tensor.
    """
    advise_pages(tensor, MADV_PAGEOUT)


def packed_twin(layer: nn.Module) -> nn.Module:
    return PackedConv2d(layer) if type(layer) is nn.Conv2d else PackedLinear(layer)


def install_twins(model: nn.Module, twin_of: Callable[[nn.Module], Callable[[nn.Module], nn.Module] | None]) -> None:
    """Replaces each packable layer of `model` (loaded, on CPU) for which `twin_of` gives a twin's constructor
    (`packed_twin`, or a `cpu_winograd.WinogradConv2d`'s) by that twin.

    The replacements keep their attribute paths; they are for inference only (no state_dict round trip).
    """
    # Only the parents are listed, so each plain layer is freed as soon as its twin replaces it: peak memory
    # grows by one layer, not by a second copy of the model.
    targets = [(parent, name, twin) for parent in model.modules() for name, child in parent.named_children()
               if packable(child) and (twin := twin_of(child)) is not None]
    for parent, name, twin in targets:
        plain = getattr(parent, name)
        setattr(parent, name, twin(plain))
        _page_out(plain.weight)
