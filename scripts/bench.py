#!/usr/bin/env python3
"""Benchmark: the full-size SD 1.5 + ControlNet architecture with random weights, beside diffusers.

Compute cost does not depend on weight values, so random weights measure what the real ones would.
Prints one table: seconds per classifier-free-guidance denoising step (ControlNet + UNet, batch 2) for this
project and for diffusers' UNet2DConditionModel + ControlNetModel (same dimensions, dtype and machine, in
the same process), their ratio, seconds per whole image (20 steps, text encoding and VAE decode
included), and the fraction of the machine's measured peak that a step reaches.
`--startup` adds checkpoint-to-ready time and peak RSS for a synthetic full-size v1.0 checkpoint.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "handler"))

from controlnet_canny.config import CONFIG_DIR, load_config  # noqa: E402
from controlnet_canny.model import ControlLDM  # noqa: E402
from controlnet_canny.params import GenerationParams  # noqa: E402
from controlnet_canny.pipeline import PRECISIONS, ControlNetCannyPipeline  # noqa: E402

FULL_CONFIG = CONFIG_DIR / "cldm_v15.yaml"
ROUNDS = 2
SYNTHETIC_CHECKPOINT = Path.home() / ".cache" / "controlnet-canny-bench" / "control_sd15_synthetic.pth"


def peak_rss_gib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20


def random_pipeline(dtype: torch.dtype) -> ControlNetCannyPipeline:
    torch.manual_seed(0)
    cfg = load_config(FULL_CONFIG)
    model = ControlLDM(cfg).to(dtype).requires_grad_(False)
    return ControlNetCannyPipeline(model, cfg, torch.device("cpu"), dtype)


def diffusers_models(dtype: torch.dtype):
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768).to(dtype).eval().requires_grad_(False)
    controlnet = ControlNetModel(cross_attention_dim=768).to(dtype).eval().requires_grad_(False)
    return unet, controlnet


def request(size: int, steps: int, seed: int = 0):
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return image, GenerationParams(prompt="a house", image_resolution=size, ddim_steps=steps, seed=seed)


def time_ours(pipe: ControlNetCannyPipeline, size: int, steps: int) -> tuple[float, float]:
    """(median seconds per step after the first, seconds for the whole image). Text cache cleared first."""
    image, params = request(size, steps)
    pipe._text_cache.clear()
    stamps = []
    start = time.perf_counter()
    pipe.generate([pipe.prepare(image, params)], lambda done, total: stamps.append(time.perf_counter()))
    whole = time.perf_counter() - start
    return statistics.median(np.diff(stamps)), whole


@torch.inference_mode()
def time_diffusers(unet, controlnet, size: int, dtype: torch.dtype, steps: int) -> float:
    latent = size // 8
    x = torch.randn(2, 4, latent, latent, dtype=dtype)
    context = torch.randn(2, 77, 768, dtype=dtype)
    hint = torch.rand(2, 3, size, size, dtype=dtype)
    t = torch.full((2,), 501)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        down, mid = controlnet(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
             mid_block_additional_residual=mid, return_dict=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


@torch.inference_mode()
def step_flops(size: int) -> int:
    """FLOPs of one guided step (ControlNet + UNet at batch 2), counted by torch's flop counter on the meta
    device: there attention runs as plain matmuls (counted), and no layer is packed (the packed oneDNN ops
    have no flop formula). The standard step's count: ours skips the duplicated guidance rows before the
    first cross-attention (`unet.widen`), a few percent of it."""
    latent = size // 8
    with torch.device("meta"):
        model = ControlLDM(load_config(FULL_CONFIG))
        x, context = torch.empty(2, 4, latent, latent), torch.empty(2, 77, 768)
        t, hint = torch.empty(2, dtype=torch.long), torch.empty(2, 320, latent, latent)
        counter = FlopCounterMode(display=False)
        with counter:
            model.model.diffusion_model(x, t, context, model.control_model(x, hint, t, context))
    return counter.get_total_flops()


@torch.inference_mode()
def machine_peak(dtype: torch.dtype) -> float:
    """FLOP/s of the better of a large matmul and a UNet-like conv in this dtype, on this machine."""
    a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    x, w = torch.randn(2, 640, 32, 32, dtype=dtype), torch.randn(640, 640, 3, 3, dtype=dtype)
    best = 0.0
    for flops, fn in ((2 * 4096**3, lambda: a @ b),
                      (2 * 2 * 640 * 640 * 9 * 32 * 32, lambda: torch.nn.functional.conv2d(x, w, padding=1))):
        fn()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        best = max(best, 3 * flops / (time.perf_counter() - start))
    return best


def write_synthetic_checkpoint(path: Path) -> None:
    """A full-size file in the real v1.0 layout (5.7 GB fp32), written once and reused."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_checkpoint import make_state_dict

    path.parent.mkdir(parents=True, exist_ok=True)
    state = make_state_dict(load_config(FULL_CONFIG), seed=0)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.rename(path)


def weights_gib(precision: str) -> float:
    """GiB of the weights a worker serves (the VAE encoder and other unused keys are never loaded)."""
    with torch.device("meta"):
        count = sum(p.numel() for p in ControlLDM(load_config(FULL_CONFIG)).parameters())
    return count * PRECISIONS[precision].itemsize / 2**30


def startup(precision: str) -> tuple[float, float, float]:
    """In a fresh process: (seconds from process start to a pipeline ready to serve, peak RSS GiB when ready,
    peak RSS GiB after serving one 256x256 request). In fp32 on CPU the weights stay memory-mapped, so
    they become resident only as the first request touches them."""
    code = f"""
import sys
import numpy as np
sys.path.insert(0, 'handler')
from controlnet_canny.params import GenerationParams
from controlnet_canny.pipeline import ControlNetCannyPipeline
pipe = ControlNetCannyPipeline.load([{str(SYNTHETIC_CHECKPOINT)!r}], {str(FULL_CONFIG)!r}, 'cpu', {precision!r})
def peak_gib():  # VmHWM: unlike ru_maxrss, not inherited from the (large) benchmark process across fork+exec
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 2**20
print('ready', peak_gib(), flush=True)
image = np.zeros((256, 256, 3), np.uint8)
pipe.generate([pipe.prepare(image, GenerationParams(prompt='a house', image_resolution=256, ddim_steps=1, seed=0))])
print('served', peak_gib(), flush=True)
"""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    ready_line = process.stdout.readline()
    ready_seconds = time.perf_counter() - start
    served_line = process.stdout.readline()
    if process.wait() != 0 or not ready_line.startswith("ready") or not served_line.startswith("served"):
        raise RuntimeError(f"start-up measurement failed ({precision})")
    return ready_seconds, float(ready_line.split()[1]), float(served_line.split()[1])


def service_overhead(url: str, key_file: Path, count: int) -> tuple[float, float]:
    """(median seconds of a tiny-model request through TorchServe, median seconds of the same work in-process).

    Needs the server of `make serve` (tiny model). The in-process figure covers what the handler wraps:
    decode, prepare, generate, PNG and zip encoding; the difference is what TorchServe and HTTP add.
    """
    sys.path.insert(0, str(ROOT / "scripts"))
    from client import Client, read_key

    from controlnet_canny.bundle import encode_png, make_bundle
    from controlnet_canny.preprocess import decode_image

    image_path = ROOT / "tests" / "data" / "house.png"
    # one step: little compute, so its run-to-run noise does not swamp the overhead
    fields = {"prompt": "a house", "image_resolution": 64, "ddim_steps": 1, "seed": 1}
    client = Client(url, "controlnet", read_key(key_file, "inference"))
    served = []
    for _ in range(count):
        start = time.perf_counter()
        client.predict(image_path, fields).raise_for_status()
        served.append(time.perf_counter() - start)
    pipe = ControlNetCannyPipeline.load(
        [ROOT / "artifacts" / "tiny" / "control_tiny_canny.pth"], CONFIG_DIR / "cldm_tiny.yaml", "cpu", "fp32"
    )
    bare = []
    for _ in range(count):
        start = time.perf_counter()
        image = decode_image(image_path.read_bytes(), 2**24, 2**24)
        prepared = pipe.prepare(image, GenerationParams(**fields))
        result = pipe.generate([prepared])
        make_bundle([encode_png(img, {}) for img in result.images[0]], encode_png(prepared.edge_map), {})
        bare.append(time.perf_counter() - start)
    return statistics.median(served), statistics.median(bare)


def bf16_drift() -> dict[str, float]:
    """Max and mean abs difference (uint8 levels) between fp32 and bf16 images of the tiny model, per setting."""
    import cv2

    image = cv2.cvtColor(cv2.imread(str(ROOT / "tests" / "data" / "house.png")), cv2.COLOR_BGR2RGB)
    checkpoint = ROOT / "artifacts" / "tiny" / "control_tiny_canny.pth"
    pipes = {p: ControlNetCannyPipeline.load([checkpoint], CONFIG_DIR / "cldm_tiny.yaml", "cpu", p) for p in ("fp32", "bf16")}
    drift = {}
    for label, extra in (("scale 9, 20 steps", {}), ("scale 1, 20 steps", {"scale": 1.0})):
        params = GenerationParams(prompt="a house", image_resolution=64, seed=1, **extra)
        fp32, bf16 = (pipes[p].generate([pipes[p].prepare(image, params)]).images[0][0].astype(int) for p in pipes)
        drift[label] = (float(np.abs(fp32 - bf16).max()), float(np.abs(fp32 - bf16).mean()))
    return drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(PRECISIONS))
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement (median of all but the first)")
    parser.add_argument("--whole-image", action="store_true", help="also time whole 20-step images")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--startup", action="store_true", help="checkpoint-to-ready time and peak RSS (writes a 5.7 GB file once)")
    parser.add_argument("--drift", action="store_true", help="only report bf16's drift from fp32 on the tiny model")
    parser.add_argument("--service", metavar="URL", help="only measure service overhead against a running "
                        "`make serve` (e.g. http://127.0.0.1:8080)")
    parser.add_argument("--key-file", type=Path, default=ROOT / "artifacts" / "serve" / "key_file.json")
    args = parser.parse_args()
    if args.drift:
        for label, (worst, mean) in bf16_drift().items():
            print(f"tiny model, 64x64, {label}: bf16 vs fp32 images differ by at most {worst:.0f}, "
                  f"on average {mean:.1f} uint8 levels")
        return
    if args.service:
        served, bare = service_overhead(args.service, args.key_file, count=20)
        print(f"tiny 64x64, 1 step, median of 20: through TorchServe {served * 1000:.0f} ms, "
              f"in-process {bare * 1000:.0f} ms, service overhead {(served - bare) * 1000:.0f} ms")
        return

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    header = "| size | dtype | ours s/step | diffusers s/step | speed-up | ours s/image (20 steps) | step TFLOP | % of peak |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for precision in args.precisions:
        dtype = PRECISIONS[precision]
        if dtype == torch.float16:
            continue  # CPU only here; fp16 is a CUDA precision
        peak = machine_peak(dtype)
        pipe = random_pipeline(dtype)
        reference = None if args.no_diffusers else diffusers_models(dtype)
        for size in args.sizes:
            # Alternated, twice, best median of each: a slow spell of a shared machine hits both sides.
            ours, theirs = [], []
            for _ in range(ROUNDS):
                ours.append(time_ours(pipe, size, args.steps)[0])
                if reference:
                    theirs.append(time_diffusers(*reference, size, dtype, args.steps))
            ours, ref = min(ours), min(theirs, default=float("nan"))
            whole = time_ours(pipe, size, 20)[1] if args.whole_image else float("nan")
            flops = step_flops(size)
            print(f"| {size} | {precision} | {ours:.2f} | {ref:.2f} | {ref / ours:.2f}x | {whole:.1f} | "
                  f"{flops / 1e12:.2f} | {100 * flops / ours / peak:.0f}% of {peak / 1e12:.2f} TFLOP/s |", flush=True)
        del pipe, reference
        gc.collect()
    print(f"peak RSS of this process: {peak_rss_gib():.1f} GiB")
    if args.startup:
        if not SYNTHETIC_CHECKPOINT.exists():
            write_synthetic_checkpoint(SYNTHETIC_CHECKPOINT)
        size_gib = SYNTHETIC_CHECKPOINT.stat().st_size / 2**30
        print(f"\nstart-up from {SYNTHETIC_CHECKPOINT} ({size_gib:.1f} GiB):")
        for precision in args.precisions:
            seconds, ready_rss, served_rss = startup(precision)
            weights = weights_gib(precision)
            print(f"  {precision}: ready in {seconds:.1f} s; peak RSS {ready_rss:.2f} GiB when ready, {served_rss:.2f} GiB "
                  f"after one 256x256 request = {served_rss / weights:.2f}x the {weights:.2f} GiB of weights")


if __name__ == "__main__":
    main()
