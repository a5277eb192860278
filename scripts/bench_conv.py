#!/usr/bin/env python3
"""3x3 convolutions alone: plain, oneDNN-packed and Winograd F(2x2) and F(4x4), on the SD 1.5 UNet's shapes.

Prints per shape (batch 2, as under classifier-free guidance, fp32) the median milliseconds of a call of each,
alternated within each round, and each Winograd tile's error: the largest deviation from a float64 convolution,
relative to the output's largest magnitude, beside the direct fp32 convolution's own. These are the numbers the
backend's calibration weighs per layer class at load (`backends/cpu.py`) and docs/benchmarks.md quotes.
To see a CPU without AVX-512: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (env).
Usage: scripts/bench_conv.py [--threads 2] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "handler"))

from controlnet_canny.backends import cpu_prepack, cpu_winograd  # noqa: E402

# (input channels, output channels, height, width): the UNet's levels at 256 px (32x32 latent) and 512 px (64x64),
# a landscape map, and the decoder's concatenated inputs
SHAPES = [(320, 320, 32, 32), (320, 320, 64, 64), (640, 640, 16, 16), (640, 640, 32, 40), (1280, 1280, 4, 4),
          (1280, 1280, 8, 8), (1280, 1280, 16, 16), (960, 320, 64, 64), (2560, 1280, 8, 8)]


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).abs().max() / exact.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transforms = cpu_winograd.load()
    if transforms is None:
        sys.exit("the Winograd transforms do not build or run here (they need AVX2 and a C compiler)")
    print(f"fp32, batch 2, {args.threads} thread(s), median of {args.rounds} (wall ms), torch's CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, transforms {transforms.variant}")
    print(f"{'in -> out @ map':>22} {'plain':>8} {'packed':>8} {'F(2x2)':>8} {'F(4x4)':>8}"
          "   error: direct / F(2x2) / F(4x4)")
    torch.manual_seed(0)
    with torch.inference_mode():
        for c_in, c_out, height, width in SHAPES:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1).requires_grad_(False)
            x = torch.randn(2, c_in, height, width)
            positions = 2 * height * width
            candidates = {"plain": conv, "packed": cpu_prepack.packed_twin(conv)} | {
                f"F({tile}x{tile})": cpu_winograd.WinogradConv2d(conv, tile, positions, transforms)
                for tile in cpu_winograd.TILES}
            times = {name: [] for name in candidates}
            for _ in range(args.rounds + 1):  # the first round warms up (oneDNN builds its primitives)
                for name, layer in candidates.items():
                    start = time.perf_counter()
                    layer(x)
                    times[name].append(time.perf_counter() - start)
            exact = nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
            errors = [relative_error(candidates[name](x), exact) for name in ("plain", "F(2x2)", "F(4x4)")]
            print(f"{f'{c_in} -> {c_out} @ {height}x{width}':>22} "
                  + " ".join(f"{1e3 * statistics.median(t[1:]):8.1f}" for t in times.values())
                  + "   " + " / ".join(f"{e:.1e}" for e in errors))


if __name__ == "__main__":
    main()
