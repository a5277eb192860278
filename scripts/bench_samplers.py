#!/usr/bin/env python3
"""Samplers side by side: seconds per image at a size (full-size SD 1.5 + ControlNet architecture, random
weights, as scripts/bench.py), and on the tiny model the mean abs difference of each sampler's final latents
from a 100-step DDIM run of the same seeds: evidence that a sampler converges towards the same result in fewer
steps, not a claim about image quality (the tiny model's random weights make no images).

    .venv/bin/python scripts/bench_samplers.py --size 512 --runs ddim:20 dpmpp_2m:10
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "handler"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import random_pipeline  # noqa: E402
from controlnet_canny import samplers  # noqa: E402
from controlnet_canny.config import CONFIG_DIR  # noqa: E402
from controlnet_canny.params import GenerationParams  # noqa: E402
from controlnet_canny.pipeline import ControlNetCannyPipeline  # noqa: E402


def run_spec(text: str) -> tuple[str, int, bool]:
    """'dpmpp_2m:10' or 'dpmpp_2m+karras:10' -> (sampler, steps, karras)."""
    name, steps = text.split(":")
    return name.removesuffix("+karras"), int(steps), name.endswith("+karras")


def params(sampler: str, steps: int, karras: bool, size: int, seed: int) -> GenerationParams:
    return GenerationParams(prompt="a house", image_resolution=size, ddim_steps=steps, sampler=sampler, karras=karras,
                            seed=seed)


def seconds_per_image(pipe: ControlNetCannyPipeline, spec: tuple[str, int, bool], size: int) -> float:
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    start = time.perf_counter()
    pipe.generate([pipe.prepare(image, params(*spec, size, 0))])
    return time.perf_counter() - start


def final_latents(pipe: ControlNetCannyPipeline, spec: tuple[str, int, bool], image: np.ndarray, seeds: list[int]):
    batch = [pipe.prepare(image, params(*spec, 64, seed)) for seed in seeds]
    sampling = pipe.start(batch)
    while sampling.done < sampling.total:
        pipe.step(sampling)
    return torch.cat([samplers.result(plan, state) for plan, state in zip(sampling.plans, sampling.states)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", nargs="+", default=["ddim:20", "dpmpp_2m:10"], help="SAMPLER[+karras]:STEPS")
    parser.add_argument("--no-timing", action="store_true", help="only the tiny model's latent differences")
    parser.add_argument("--seeds", type=int, default=8, help="tiny model: samples per sampler")
    args = parser.parse_args()
    runs = [run_spec(text) for text in args.runs]
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"], capture_output=True, text=True).stdout
    print(f"# {platform.node()}: {cpu.strip()}, {torch.get_num_threads()} threads, torch {torch.__version__}")

    with tempfile.TemporaryDirectory() as tiny:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), "--out-dir", tiny],
                       check=True, capture_output=True)
        pipe = ControlNetCannyPipeline.load([Path(tiny) / "control_tiny_canny.pth"], CONFIG_DIR / "cldm_tiny.yaml",
                                            "cpu", "fp32")
    image = np.asarray(__import__("cv2").imread(str(ROOT / "tests" / "data" / "house.png")))[:, :, ::-1].copy()
    seeds = list(range(args.seeds))
    reference = final_latents(pipe, ("ddim", 100, False), image, seeds)
    differences = {spec: (final_latents(pipe, spec, image, seeds) - reference).abs().mean().item() for spec in runs}
    del pipe

    timed = {}
    if not args.no_timing:
        pipe = random_pipeline(torch.float32)
        seconds_per_image(pipe, ("ddim", 1, False), args.size)  # warm-up: first-call costs
        timed = {spec: seconds_per_image(pipe, spec, args.size) for spec in runs}
    print(f"| sampler | steps | s/image at {args.size} fp32 | mean abs latent diff from DDIM 100 (tiny model, "
          f"{args.seeds} seeds; reference mean abs {reference.abs().mean().item():.3g}) |")
    print("|---|---|---|---|")
    for spec in runs:
        seconds = f"{timed[spec]:.1f}" if spec in timed else "-"
        print(f"| {spec[0]}{' karras' if spec[2] else ''} | {spec[1]} | {seconds} | {differences[spec]:.3g} |")


if __name__ == "__main__":
    main()
