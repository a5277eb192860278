#!/usr/bin/env python3
"""Attention alone: every kernel variant this CPU runs against torch's SDPA, on the SD 1.5 UNet's shapes.

Prints the median milliseconds of a call (batch 2 x 8 heads, as under classifier-free guidance) per shape, with
the implementations alternated within each round so that load on a shared machine hits them alike. On a loaded
machine wall time mostly measures the other processes: `--cpu-time` (one thread) times this process's CPU time.
To see torch as a CPU without AVX-512 runs it: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (env).
Usage: scripts/bench_attention.py [--dtype fp32|bf16] [--threads 2 | --cpu-time] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "handler"))

from controlnet_canny.backends import cpu_attention  # noqa: E402
from controlnet_canny.unet import multihead_attention  # noqa: E402

HEADS = 8
# (queries, keys, head dim): self-attention at each UNet level of 512x512 (4096 tokens) and 256x256 (1024)
# outputs, and the top level's cross-attention to the 77 text tokens.
SHAPES = [(4096, 4096, 40), (1024, 1024, 80), (256, 256, 160), (64, 64, 160),
          (1024, 1024, 40), (256, 256, 80), (4096, 77, 40), (1024, 77, 40)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cpu-time", action="store_true", help="one thread, timed by process CPU time")
    args = parser.parse_args()
    if args.cpu_time:
        args.threads = 1
    clock = time.process_time if args.cpu_time else time.perf_counter
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(args.threads)
    kernels = [cpu_attention.load(dtype, variant) for variant in cpu_attention.variants(dtype)]
    candidates = {"torch-sdpa": multihead_attention} | {k.name: k for k in kernels if k is not None}
    print(f"{args.dtype}, {args.threads} thread(s), batch 2 x {HEADS} heads, median of {args.rounds} "
          f"({'CPU' if args.cpu_time else 'wall'} ms), torch's CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'queries x keys, dim':>22} " + " ".join(f"{name:>18}" for name in candidates))
    for queries, keys, dim in SHAPES:
        q, k, v = (torch.randn(2, n, HEADS * dim).to(dtype) for n in (queries, keys, keys))
        times = {name: [] for name in candidates}
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, attend in candidates.items():
                start = clock()
                attend(q, k, v, HEADS)
                times[name].append(clock() - start)
        medians = {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}
        print(f"{f'{queries} x {keys}, {dim}':>22} "
              + " ".join(f"{medians[name]:>9.2f} ({medians['torch-sdpa'] / medians[name]:4.2f}x)" for name in candidates))


if __name__ == "__main__":
    main()
