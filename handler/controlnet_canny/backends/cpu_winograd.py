"""3x3 convolutions by Winograd's minimal filtering F(m x m, 3 x 3), m = 2 or 4 (Lavin & Gray 2016, "Fast
Algorithms for Convolutional Neural Networks", section 4), on CPUs in fp32.

Each (m + 2) x (m + 2) input tile d gives an m x m output tile Y = A^T [(G g G^T) * (B^T d B)] A (eq. 8): per
output, (m + 2)^2 / m^2 products instead of 9 multiply-adds (4 for F(2x2), 2.25 for F(4x4)). The element-wise
products of all tiles are (m + 2)^2 matrix products [tiles x C_in] @ U_k, U = G g G^T computed once ((m + 2)^2 / 9
of the weight's size) and packed for oneDNN's matrix product (torch's batched one runs MKL's AVX2 kernels on AMD
CPUs, AVX-512 or not). The transforms B^T . B and A^T . A run in C (`cpu_winograd.c`, compiled at load for this
CPU): one pass each over channels-last data.

Rounding grows with the tile (F(4x4)'s is about 20x F(2x2)'s, which is about a direct fp32 convolution's; measured
in docs/benchmarks.md): fine in fp32, too much for bf16.

Which tile beats oneDNN's direct convolution, and up to which map, depends on the CPU and the layer (larger
tiles need larger maps to pay for their larger weights), so `backends.cpu` installs one per layer class with the
largest input it measured faster at: a larger batch runs in parts of that size, a larger map by the plain
convolution it replaced (whose weight stays in the memory-mapped checkpoint until then, so the twin holds only U).
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch
from torch import nn

from . import cpu_build

SOURCE = Path(__file__).with_name("cpu_winograd.c")
LANES = 16  # channels per step of the C transforms (LANES in cpu_winograd.c): channel counts must be multiples of it
# G of F(m x m, 3 x 3) per tile side m, for the interpolation points the C transforms use
G = {2: torch.tensor([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], dtype=torch.float64),
     4: torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                      [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)}
TILES = tuple(G)

_scratch = threading.local()  # per thread: the transformed input, kept between calls (see `_transformed_input`)


class Transforms:
    """The compiled transforms of every tile side, for one instruction set."""

    def __init__(self, library: ctypes.CDLL, variant: str):
        self.variant = variant
        self.input, self.output = {}, {}
        for tile in TILES:
            self.input[tile] = getattr(library, f"winograd_f{tile}_input")
            self.input[tile].argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int]
            self.output[tile] = getattr(library, f"winograd_f{tile}_output")
            self.output[tile].argtypes = ([ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 4
                                          + [ctypes.c_void_p, ctypes.c_int])


def load() -> Transforms | None:
    """The transforms compiled for the widest instruction set this CPU (and torch) runs, or None (logged) where
    none is or they do not build: Winograd is then not offered."""
    variant = next((v for v in cpu_build.ISAS if cpu_build.runnable(v)), None)
    library = None if variant is None else cpu_build.build(SOURCE, variant)
    return None if library is None else Transforms(library, variant)


def applicable(module: nn.Module, dtype: torch.dtype) -> bool:
    return (dtype == torch.float32 and type(module) is nn.Conv2d and module.kernel_size == (3, 3)
            and module.stride == (1, 1) and module.padding == (1, 1) and module.dilation == (1, 1)
            and module.groups == 1 and module.padding_mode == "zeros"
            and module.in_channels % LANES == 0 and module.out_channels % LANES == 0)


def _transformed_input(numel: int) -> torch.Tensor:
    """Room for a transformed input, reused: it is the largest buffer of a convolution (at 512 px, 40-70 MB in
    the UNet, up to half a GB at the VAE decoder's 512-channel maps), and one allocated per call would be mapped
    and page-faulted afresh every time."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch.buffer = torch.empty(numel)
    return buffer[:numel]


class WinogradConv2d(nn.Module):
    """`conv` by F(tile x tile, 3 x 3) on inputs of at most `max_positions` (batch x height x width): a larger
    batch in parts, a larger map by `conv` itself."""

    def __init__(self, conv: nn.Conv2d, tile: int, max_positions: int, transforms: Transforms):
        super().__init__()
        g = G[tile]
        # U[a * (tile + 2) + b] = (G w G^T)[a][b] for every (out, in) channel pair: one product by G (x) G
        transformed = torch.kron(g, g).float() @ conv.weight.detach().float().reshape(-1, 9).T
        self.weights = [torch.ops.mkldnn._reorder_linear_weight(u)
                        for u in transformed.view(len(g) ** 2, *conv.weight.shape[:2])]
        self.bias = None if conv.bias is None else conv.bias.detach().float().contiguous()
        self.conv = conv
        self.tile = tile
        self.max_positions = max_positions
        self._input, self._output = transforms.input[tile], transforms.output[tile]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        if height * width > self.max_positions:
            return self.conv(x)
        out = torch.empty(n, self.conv.out_channels, height, width, memory_format=torch.channels_last)
        part = self.max_positions // (height * width)
        for start in range(0, n, part):
            self._winograd(x[start:start + part].contiguous(memory_format=torch.channels_last),
                           out[start:start + part])
        # in the layout it came in: a channels-last model (the VAE decoder) keeps its maps channels-last
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()

    def _winograd(self, x: torch.Tensor, out: torch.Tensor) -> None:
        n, channels, height, width = x.shape
        tiles = n * -(-height // self.tile) * -(-width // self.tile)
        threads = torch.get_num_threads()
        v = _transformed_input(len(self.weights) * tiles * channels).view(len(self.weights), tiles, channels)
        self._input(x.data_ptr(), n, height, width, channels, v.data_ptr(), threads)
        products = [torch.ops.mkldnn._linear_pointwise(v[k], u, None, "none", [], "")
                    for k, u in enumerate(self.weights)]
        addresses = (ctypes.c_void_p * len(products))(*(m.data_ptr() for m in products))
        self._output(addresses, None if self.bias is None else self.bias.data_ptr(), n, height, width,
                     out.shape[1], out.data_ptr(), threads)
