#!/usr/bin/env python3
"""TAESD's decoder beside the full VAE decoder, on one (1, 4, 64, 64) latent (a 512x512 image), on CPU.

Random weights: TAESD at its real size, the VAE from configs/cldm_v15.yaml. TAESD runs plain, with channels_last
tensors, with oneDNN-packed 3x3 convolutions (`backends.cpu_prepack.packed_twin`) and with both (packed+cl),
alternated within each round.
Prints the fastest of --rounds runs per variant and dtype: wall ms, and the calling thread's CPU ms, which on a
shared machine counts less of the other tenants' load (with one thread every kernel runs in the calling thread).
Usage: scripts/bench_taesd.py [--threads 1] [--rounds 3] [--no-vae]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "handler"))

from controlnet_canny.backends import cpu_prepack  # noqa: E402
from controlnet_canny.backends.cpu import cpu_model  # noqa: E402
from controlnet_canny.config import CONFIG_DIR, load_config  # noqa: E402
from controlnet_canny.taesd import TinyAutoencoder  # noqa: E402
from controlnet_canny.vae import AutoencoderKL  # noqa: E402


def packed(model: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(model)
    cpu_prepack.install_twins(twin, lambda layer: cpu_prepack.packed_twin)
    return twin


def variants(dtype: torch.dtype, with_vae: bool) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    torch.manual_seed(0)
    taesd = TinyAutoencoder(with_encoder=False).requires_grad_(False).to(dtype=dtype)
    channels_last = copy.deepcopy(taesd).to(memory_format=torch.channels_last)
    runs = {
        "taesd": taesd.decode,
        "taesd channels_last": lambda z: channels_last.decode(z.to(memory_format=torch.channels_last)),
    }
    if cpu_prepack.supported(torch.device("cpu"), dtype):
        runs["taesd packed"] = packed(taesd).decode
        packed_channels_last = packed(channels_last)
        runs["taesd packed+cl"] = lambda z: packed_channels_last.decode(z.to(memory_format=torch.channels_last))
    if with_vae:
        cfg = load_config(CONFIG_DIR / "cldm_v15.yaml")
        vae = AutoencoderKL(cfg.vae, cfg.schedule.scale_factor).requires_grad_(False).to(dtype=dtype)
        runs["vae"] = vae.decode
        if cpu_prepack.supported(torch.device("cpu"), dtype):
            runs["vae packed"] = packed(vae).decode
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-vae", action="store_true", help="TAESD's variants only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, {args.threads} thread(s), torch {torch.__version__}, fastest of {args.rounds}")
    print(f"{'dtype':>9} {'variant':<20} {'wall ms':>9} {'CPU ms':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        runs = variants(dtype, not args.no_vae)
        latents = torch.randn(1, 4, 64, 64, dtype=dtype)
        wall = {name: [] for name in runs}
        cpu = {name: [] for name in runs}
        with torch.inference_mode():
            reference = runs["taesd"](latents).float()
            for name, run in runs.items():
                if name.startswith("taesd "):
                    assert (run(latents).float() - reference).abs().max() < 0.05, name
            for _ in range(args.rounds):
                for name, run in runs.items():
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    run(latents)
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.thread_time() - start_cpu)
        for name in runs:
            print(f"{str(dtype).removeprefix('torch.'):>9} {name:<20} {1000 * min(wall[name]):9.1f} "
                  f"{1000 * min(cpu[name]):9.1f}")


if __name__ == "__main__":
    main()
