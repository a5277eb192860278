"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for
Convolutional Neural Networks", section 4.1), in plain torch ops (CPU, fp32).

Each 4x4 input tile d (stride 2) gives a 2x2 output tile Y = A^T [(G g G^T) * (B^T d B)] A (eq. 8): 16
element-wise products instead of 36 multiply-adds, done as 16 matrix products of the tiles [tiles x C_in] by the
transformed weights U = G g G^T [C_in x C_out] (computed once: 16/9 of the weight's size), packed for oneDNN's
matrix product (torch's batched one runs MKL's AVX2 kernels on AMD CPUs, AVX-512 or not). B^T and A^T
hold only 0 and +-1, so both transforms are additions of strided views of the channels-last input and of the
products: no tile is ever gathered. fp32 only: the transforms cost a few bits (1e-6 to 5e-6 of the output's
magnitude, tested), too many for bf16.

Whether it beats oneDNN's direct convolution depends on the CPU and on the feature map (its gain shrinks as
maps grow), so `backends.cpu` installs it per layer class with the largest input it measured faster at: a larger
batch runs in parts of that size, a larger map by the plain convolution it replaced (whose weight stays in the
memory-mapped checkpoint until then, so the twin holds only U).
"""
from __future__ import annotations

import torch
from torch import nn

G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float32)


def applicable(module: nn.Module, dtype: torch.dtype) -> bool:
    return (dtype == torch.float32 and type(module) is nn.Conv2d and module.kernel_size == (3, 3)
            and module.stride == (1, 1) and module.padding == (1, 1) and module.dilation == (1, 1)
            and module.groups == 1 and module.padding_mode == "zeros")


def _taps(x: torch.Tensor, dim: int, tiles: int) -> list[torch.Tensor]:
    """Element k (0..3) of every tile along `dim` (tiles 4 wide at stride 2): four strided views."""
    before = (slice(None),) * dim
    return [x[(*before, slice(k, k + 2 * tiles - 1, 2))] for k in range(4)]


def _input_transform(d: list[torch.Tensor], out: torch.Tensor) -> None:
    """out[j] = (B^T d)_j along the tiles' axis, B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]."""
    torch.sub(d[0], d[2], out=out[0])
    torch.add(d[1], d[2], out=out[1])
    torch.sub(d[2], d[1], out=out[2])
    torch.sub(d[1], d[3], out=out[3])


def _output_transform(m: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    """out[i] = (A^T m)_i along the tiles' axis, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]."""
    torch.add(m[0], m[1], out=out[0]).add_(m[2])
    torch.sub(m[1], m[2], out=out[1]).sub_(m[3])


class WinogradConv2d(nn.Module):
    """`conv` by Winograd on inputs of at most `max_positions` (batch x height x width): a larger batch in parts,
    a larger map by `conv` itself."""

    def __init__(self, conv: nn.Conv2d, max_positions: int):
        super().__init__()
        weight = conv.weight.detach().float()
        # U = G g G^T for every (output, input) channel pair, as 16 (C_out, C_in) matrices (linear weights)
        transformed = torch.einsum("ai,kcij,bj->abkc", G, weight, G).reshape(16, *weight.shape[:2])
        self.weights = [torch.ops.mkldnn._reorder_linear_weight(u.contiguous()) for u in transformed]
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.conv = conv
        self.max_positions = max_positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        if height * width > self.max_positions:
            return self.conv(x)
        out = x.new_empty(n, self.conv.out_channels, height, width)
        part = self.max_positions // (height * width)
        for start in range(0, n, part):
            self._winograd(x[start:start + part], out[start:start + part])
        return out

    def _winograd(self, x: torch.Tensor, out: torch.Tensor) -> None:
        n, channels, height, width = x.shape
        rows, cols = (height + 1) // 2, (width + 1) // 2
        # channels last with zero padding 1 (and one more row / column on an odd side): tiles are views of it
        padded = x.new_zeros(n, 2 * rows + 2, 2 * cols + 2, channels)
        padded[:, 1:height + 1, 1:width + 1] = x.permute(0, 2, 3, 1)
        by_rows = x.new_empty(4, n, rows, 2 * cols + 2, channels)
        _input_transform(_taps(padded, 1, rows), by_rows)
        v = x.new_empty(4, 4, n, rows, cols, channels)
        for a in range(4):
            _input_transform(_taps(by_rows[a], 2, cols), v[a])
        tiles = v.view(16, n * rows * cols, channels)
        m = [torch.ops.mkldnn._linear_pointwise(tiles[i], u, None, "none", [], "").view(n, rows, cols, -1)
             for i, u in enumerate(self.weights)]  # m[4a + b]
        out_channels = out.shape[1]
        by_rows = x.new_empty(2, 4, n, rows, cols, out_channels)
        for b in range(4):
            _output_transform(m[b::4], list(by_rows[:, b]))
        y = x.new_empty(n, rows, 2, cols, 2, out_channels)
        for i in range(2):
            _output_transform(list(by_rows[i]), [y[:, :, i, :, 0], y[:, :, i, :, 1]])
        y = y.view(n, 2 * rows, 2 * cols, out_channels)[:, :height, :width].permute(0, 3, 1, 2)
        if self.bias is None:
            out.copy_(y)
        else:
            torch.add(y, self.bias[:, None, None], out=out)
