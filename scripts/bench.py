#!/usr/bin/env python3
"""Benchmark: the pipeline the service builds, beside diffusers and OpenVINO, on the image shapes users send.

Ours is loaded as a worker loads it (`ControlNetCannyPipeline.load` from a checkpoint file): for the full
SD 1.5 + ControlNet architecture, a synthetic checkpoint in the real v1.0 key layout with random weights,
written once to ~/.cache (compute cost does not depend on weight values). Output shapes come from the
service's own resize rule applied to a photo of each aspect ratio (`--shapes`, the photo's width:height) at
each `image_resolution` (`--sizes`): 4:3 at 256 gives 256x320, as a request would.

Prints one table: seconds per classifier-free-guidance denoising step (ControlNet + UNet, batch 2) for ours
(median of a real `generate()`'s steps after the first), for diffusers' UNet2DConditionModel + ControlNetModel
of the same dimensions and dtype (alternated with ours in one process), and on CPU for the same two diffusers
models converted to OpenVINO (once per run) and compiled per shape and precision; the ratios to diffusers,
the backend choices ours made, optional whole-image times and the fraction of the machine's measured peak.
`--device cuda` compares fp16 and bf16 on the GPU and, with `--compile`, ours under torch.compile (compile
time apart). `--startup` adds checkpoint-to-ready time and peak RSS; `--drift` and `--service` measure
other things (see their help).

  bench.py                                        # CPU: all shapes at 256 and 512, fp32 and bf16, OpenVINO
  bench.py --shapes 1:1 4:3 --sizes 256 --precisions fp32 --steps 2
  bench.py --device cuda --compile                # GPU: fp16 and bf16, torch.compile
  bench.py --recipes --shapes 1:1 --sizes 512 --precisions bf16   # whole images: samplers and their options
  bench.py --adapters --shapes 1:1 --sizes 512 --precisions bf16  # whole images with LCM-LoRA and TAESD, and diffusers
  bench.py --lora-application --precisions bf16 --no-openvino --repeats 5   # a LoRA unfused, fused, none
  bench.py --allocator --precisions fp32 --steps 3   # steps with the C allocator as shipped and retaining, ours and diffusers'
  bench.py --token-merging 0.5 --sizes 512 768 --shapes 1:1 --precisions bf16   # token merging on against off
  bench.py --decode --shapes 1:1 4:3 --sizes 512  # the VAE decoder plain against the backend's levers on it
  bench.py --config handler/controlnet_canny/configs/cldm_tiny.yaml \\
           --checkpoint artifacts/tiny/control_tiny_canny.pth --sizes 64 128   # the tiny model: a smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "handler"))

from controlnet_canny import samplers  # noqa: E402
from controlnet_canny.backends import BackendOptions, cpu_allocator  # noqa: E402
from controlnet_canny.config import CONFIG_DIR, ModelConfig, UNetConfig, load_config  # noqa: E402
from controlnet_canny.model import ControlLDM  # noqa: E402
from controlnet_canny.params import GenerationParams  # noqa: E402
from controlnet_canny.pipeline import PRECISIONS, ControlNetCannyPipeline  # noqa: E402
from controlnet_canny.preprocess import canny, resize_image  # noqa: E402

FULL_CONFIG = CONFIG_DIR / "cldm_v15.yaml"
TINY_CONFIG = CONFIG_DIR / "cldm_tiny.yaml"
TINY_CHECKPOINT = ROOT / "artifacts" / "tiny" / "control_tiny_canny.pth"
SYNTHETIC_CHECKPOINT = Path.home() / ".cache" / "controlnet-canny-bench" / "control_sd15_synthetic.pth"
ROUNDS = 2
ASPECTS = [(1, 1), (4, 3), (16, 9), (3, 4)]  # the photo's width:height: square, landscape photo and video, portrait
PHOTO_SHORT_SIDE = 720  # the uploaded photo's; the service resizes it to image_resolution
DEFAULT_PRECISIONS = {"cpu": ["fp32", "bf16"], "cuda": ["fp16", "bf16"]}
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # INFERENCE_PRECISION_HINT: forced, never the CPU's default
GUIDANCE_BATCH = 2  # both classifier-free-guidance halves of one sample
TIMESTEP = 501


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    """Timings on a GPU end when its queued work does, not when the launches return."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_gib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20


# ------------------------------------------------------------------------------------------------- shapes


def aspect_ratio(text: str) -> tuple[int, int]:
    """'W:H' of the input photo, e.g. 4:3 (landscape) or 3:4 (portrait), as (W, H)."""
    match = re.fullmatch(r"([1-9][0-9]*):([1-9][0-9]*)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"aspect ratio must be W:H, e.g. 4:3, got {text!r}")
    return int(match[1]), int(match[2])


@cache
def photo(aspect: tuple[int, int]) -> np.ndarray:
    """A random RGB photo of this width:height, short side at least PHOTO_SHORT_SIDE."""
    width, height = aspect
    k = math.ceil(PHOTO_SHORT_SIDE / min(width, height))
    return np.random.default_rng(0).integers(0, 256, (height * k, width * k, 3), dtype=np.uint8)


@dataclass(frozen=True)
class Shape:
    aspect: tuple[int, int]  # the input photo's width:height
    resolution: int  # the request's image_resolution
    height: int  # of the output, as the service computes it
    width: int

    @classmethod
    def of(cls, aspect: tuple[int, int], resolution: int) -> Shape:
        height, width = resize_image(photo(aspect), resolution).shape[:2]
        return cls(aspect, resolution, height, width)

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def photo_label(self) -> str:
        return f"{self.aspect[0]}:{self.aspect[1]}"


# --------------------------------------------------------------------------------------------------- ours


def time_ours(pipe: ControlNetCannyPipeline, shape: Shape, steps: int, fields: dict | None = None
              ) -> tuple[float, float]:
    """(median seconds per step after the first, seconds for the whole request: canny, text encoding with the
    cache cleared, sampling, decoding); `fields`: other request fields than the default's."""
    params = GenerationParams(prompt="a house", image_resolution=shape.resolution, ddim_steps=steps, seed=0,
                              **(fields or {}))
    pipe._text_cache.clear()
    stamps = []

    def stamp(done: int, total: int) -> None:
        synchronize(pipe.device)
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    prepared = pipe.prepare(photo(shape.aspect), params)
    if prepared.edge_map.shape != (shape.height, shape.width):
        raise RuntimeError(f"the service resized a {shape.photo_label} photo at {shape.resolution} to "
                           f"{prepared.edge_map.shape}, not {shape.label}")
    pipe.generate([prepared], stamp)
    whole = time.perf_counter() - start
    return statistics.median(np.diff(stamps)) if steps > 1 else math.nan, whole


def time_compiled(pipe: ControlNetCannyPipeline, shape: Shape, steps: int) -> tuple[float, float]:
    """(seconds per step of ours with its two networks under torch.compile, seconds spent compiling them for
    this shape). Each shape compiles afresh, as a worker would meet it."""
    torch._dynamo.reset()
    compiling = time_ours(pipe, shape, 1)[1]
    warm = time_ours(pipe, shape, 1)[1]
    return time_ours(pipe, shape, steps)[0], compiling - warm


def compile_networks(pipe: ControlNetCannyPipeline) -> None:
    for network in (pipe.model.model.diffusion_model, pipe.model.control_model):
        network.compile(dynamic=False)


def backend_summary(pipe: ControlNetCannyPipeline) -> str:
    return getattr(getattr(pipe, "backend", None), "summary", lambda: "-")()


# ---------------------------------------------------------------------------------------------- diffusers


def attention_levels(unet: UNetConfig) -> list[bool]:
    return [2**level in unet.attention_resolutions for level in range(len(unet.channel_mult))]


def diffusers_dimensions(unet: UNetConfig) -> dict:
    """diffusers' arguments shared by both networks of this config (legacy naming: `attention_head_dim` is
    the number of heads). SD 1.5's are diffusers' defaults."""
    return dict(
        in_channels=unet.in_channels,
        block_out_channels=tuple(unet.model_channels * m for m in unet.channel_mult),
        layers_per_block=unet.num_res_blocks,
        cross_attention_dim=unet.context_dim,
        attention_head_dim=unet.num_heads,
        transformer_layers_per_block=unet.transformer_depth,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels(unet)],
    )


def diffusers_models(cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)
    up_blocks = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels(cfg.unet))]
    with torch.device(device):  # initialised where they run: on a GPU, far faster than on the CPU
        unet = UNet2DConditionModel(out_channels=cfg.unet.out_channels, up_block_types=up_blocks,
                                    **diffusers_dimensions(cfg.unet))
        controlnet = ControlNetModel(conditioning_channels=cfg.control.hint_channels,
                                     **diffusers_dimensions(cfg.control))
    return tuple(m.to(device, dtype).eval().requires_grad_(False) for m in (unet, controlnet))


def step_inputs(cfg: ModelConfig, height: int, width: int, dtype: torch.dtype, device: torch.device,
                batch: int = GUIDANCE_BATCH):
    """(x, t, context, hint) of one step (default: guided, batch 2): latents, timestep, text encodings, edge map."""
    g = torch.Generator().manual_seed(0)
    factor = cfg.latent_factor
    x = torch.randn(batch, cfg.unet.in_channels, height // factor, width // factor, generator=g)
    context = torch.randn(batch, cfg.text.context_length, cfg.unet.context_dim, generator=g)
    hint = torch.rand(batch, cfg.control.hint_channels, height, width, generator=g)
    t = torch.full((batch,), TIMESTEP)
    return x.to(device, dtype), t.to(device), context.to(device, dtype), hint.to(device, dtype)


def diffusers_step(unet, controlnet, x, t, context, hint) -> torch.Tensor:
    down, mid = controlnet(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    return unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False)[0]


@torch.inference_mode()
def time_diffusers(models, cfg: ModelConfig, shape: Shape, dtype: torch.dtype, device: torch.device,
                   steps: int, batch: int = GUIDANCE_BATCH) -> float:
    inputs = step_inputs(cfg, shape.height, shape.width, dtype, device, batch)
    times = []
    for _ in range(steps + 1):
        synchronize(device)
        start = time.perf_counter()
        diffusers_step(*models, *inputs)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


# ----------------------------------------------------------------------------------------------- OpenVINO


class _FlatControlNet(torch.nn.Module):
    """ControlNetModel with positional inputs and its 13 residuals as one flat tuple, for conversion."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, x, t, context, hint):
        down, mid = self.controlnet(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        return (*down, mid)


class _ControlledUNet(torch.nn.Module):
    """UNet2DConditionModel taking the ControlNet's residuals as positional inputs, for conversion."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context, *residuals):
        return self.unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=residuals[:-1],
                         mid_block_additional_residual=residuals[-1], return_dict=False)[0]


class OpenVINOStep:
    """diffusers' two fp32 models converted to OpenVINO once, with dynamic spatial dimensions, then reshaped
    to each static shape and compiled for the CPU (OpenVINO's CPU plugin runs static shapes fastest), the
    inference precision forced to the row's (an AVX512_BF16 CPU would otherwise run fp32 rows in bf16), on as
    many threads as torch uses."""

    def __init__(self, unet, controlnet, cfg: ModelConfig):
        import openvino as ov

        self.cfg, self.core = cfg, ov.Core()
        self.reference = (unet, controlnet)
        self.expected: dict[Shape, torch.Tensor] = {}  # diffusers' fp32 eps per shape
        latent = 8 * cfg.latent_factor  # a small example: 8x8 latents
        x, t, context, hint = step_inputs(cfg, latent, latent, torch.float32, torch.device("cpu"))
        flat_controlnet, controlled_unet = _FlatControlNet(controlnet), _ControlledUNet(unet)
        with torch.inference_mode():
            residuals = flat_controlnet(x, t, context, hint)

        def spatial(tensor: torch.Tensor) -> ov.PartialShape:
            return ov.PartialShape([*tensor.shape[:2], -1, -1])

        start = time.perf_counter()
        fixed = [ov.PartialShape(list(t.shape)), ov.PartialShape(list(context.shape))]
        self.controlnet = ov.convert_model(flat_controlnet, example_input=(x, t, context, hint),
                                           input=[spatial(x), *fixed, spatial(hint)])
        self.unet = ov.convert_model(controlled_unet, example_input=(x, t, context, *residuals),
                                     input=[spatial(x), *fixed, *map(spatial, residuals)])
        self.convert_seconds = time.perf_counter() - start

    def compile(self, shape: Shape, precision: str):
        """(compiled ControlNet, compiled UNet, seconds it took) for one static shape."""
        x, t, context, hint = step_inputs(self.cfg, shape.height, shape.width, torch.float32, torch.device("cpu"))
        self.controlnet.reshape({self.controlnet.inputs[0]: list(x.shape),
                                 self.controlnet.inputs[3]: list(hint.shape)})
        residual_shapes = [list(output.get_shape()) for output in self.controlnet.outputs]
        self.unet.reshape({self.unet.inputs[0]: list(x.shape),
                           **{tensor: s for tensor, s in zip(self.unet.inputs[3:], residual_shapes)}})
        config = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        start = time.perf_counter()
        compiled = [self.core.compile_model(model, "CPU", config) for model in (self.controlnet, self.unet)]
        return *compiled, time.perf_counter() - start

    def time(self, shape: Shape, precision: str, steps: int) -> tuple[float, float, float]:
        """(median seconds per step after the first, seconds of compiling for the shape, the step's largest
        deviation from diffusers' fp32 eps relative to its largest magnitude)."""
        controlnet, unet, compiling = self.compile(shape, precision)
        inputs = step_inputs(self.cfg, shape.height, shape.width, torch.float32, torch.device("cpu"))
        x, t, context, hint = (tensor.numpy() for tensor in inputs)
        control_request, unet_request = controlnet.create_infer_request(), unet.create_infer_request()
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            control_request.infer([x, t, context, hint])
            residuals = [control_request.get_output_tensor(i) for i in range(len(controlnet.outputs))]
            unet_request.infer([x, t, context, *residuals])  # OpenVINO tensors: passed without a copy
            times.append(time.perf_counter() - start)
        eps = torch.from_numpy(unet_request.get_output_tensor(0).data.copy())
        if shape not in self.expected:
            with torch.inference_mode():
                self.expected[shape] = diffusers_step(*self.reference, *inputs)
        expected = self.expected[shape]
        deviation = float((eps - expected).abs().max() / expected.abs().max())
        return statistics.median(times[1:]), compiling, deviation


# -------------------------------------------------------------------------------------- machine, FLOPs, peak


@torch.inference_mode()
def step_flops(config: Path, shape: Shape) -> int:
    """FLOPs of one guided step (ControlNet + UNet at batch 2), counted by torch's flop counter on the meta
    device: there attention runs as plain matmuls (counted), and no layer is packed (the packed oneDNN ops
    have no flop formula). The standard step's count: ours skips the duplicated guidance rows before the
    first cross-attention (`unet.widen`), a few percent of it, and its Winograd convolutions do fewer
    multiplications than the direct ones counted here, so "% of peak" may pass 100%."""
    cfg = load_config(config)
    factor = cfg.latent_factor
    height, width = shape.height // factor, shape.width // factor
    with torch.device("meta"):
        model = ControlLDM(cfg)
        x = torch.empty(GUIDANCE_BATCH, cfg.unet.in_channels, height, width)
        context = torch.empty(GUIDANCE_BATCH, cfg.text.context_length, cfg.unet.context_dim)
        t = torch.empty(GUIDANCE_BATCH, dtype=torch.long)
        hint = torch.empty(GUIDANCE_BATCH, cfg.control.model_channels, height, width)
        counter = FlopCounterMode(display=False)
        with counter:
            model.model.diffusion_model(x, t, context, model.control_model(x, hint, t, context))
    return counter.get_total_flops()


@torch.inference_mode()
def machine_peak(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of the better of a large matmul and a UNet-like conv in this dtype, on this device."""
    a, b = (torch.randn(4096, 4096, device=device, dtype=dtype) for _ in range(2))
    x = torch.randn(2, 640, 32, 32, device=device, dtype=dtype)
    w = torch.randn(640, 640, 3, 3, device=device, dtype=dtype)
    repeats = 3 if device.type == "cpu" else 20
    best = 0.0
    for flops, fn in ((2 * 4096**3, lambda: a @ b),
                      (2 * 2 * 640 * 640 * 9 * 32 * 32, lambda: torch.nn.functional.conv2d(x, w, padding=1))):
        fn()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)
        best = max(best, repeats * flops / (time.perf_counter() - start))
    return best


def cpu_description() -> str:
    """Model name and the widest vector class that matters here (AMX > AVX-512 with bf16 > AVX-512 > AVX2)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags = set(re.search(r"^flags\s*:\s*(.*)$", info, re.M)[1].split()) if "flags" in info else set()
    vector = next((f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags), "no AVX2")
    return f"{name[1] if name else platform.processor() or platform.machine()}, flags class {vector}"


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def machine_header(device: torch.device) -> str:
    line = (f"machine: {cpu_description()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}, oneDNN ISA "
            f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'uncapped')}), diffusers {package_version('diffusers')}, "
            f"openvino {package_version('openvino')}")
    if device.type == "cuda":
        line += f"; GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return line


# ---------------------------------------------------------------------------------------------- token merging


def merging_sampling(pipe: ControlNetCannyPipeline, shape: Shape, steps: int, merging_ratio: float):
    """A started 1-sample request of `steps` steps at this shape with this token_merging_ratio."""
    params = GenerationParams(prompt="a house", image_resolution=shape.resolution, ddim_steps=steps, seed=0,
                              token_merging_ratio=merging_ratio)
    return pipe.start(pipe.prepare(photo(shape.aspect), params))


def attention_milliseconds(pipe: ControlNetCannyPipeline, tokens: int) -> dict[str, float]:
    """ms of one highest-level self-attention call (both guidance halves, SD 1.5's 8 heads of 40) at `tokens`
    tokens: the attention the backend installed, and torch's SDPA."""
    from controlnet_canny.backends.cpu import fastest_seconds
    from controlnet_canny.unet import CrossAttention, multihead_attention

    installed = next(m.attend for m in pipe.model.model.diffusion_model.modules() if isinstance(m, CrossAttention))
    q, k, v = (torch.randn(GUIDANCE_BATCH, tokens, 320, dtype=pipe.dtype, device=pipe.device) for _ in range(3))
    with torch.inference_mode():
        return {name: 1000 * fastest_seconds(lambda: attend(q, k, v, 8))
                for name, attend in (("installed", installed), ("torch", multihead_attention))}


def token_merging_ab(pipe: ControlNetCannyPipeline, shapes: list[Shape], ratio: float, steps: int,
                     repeats: int) -> None:
    """Per guided step (sampling only, no decode), token merging off against `ratio`: two requests, one of each,
    stepped in turn (off then on, then on then off, ...) so that a busy spell of a shared machine hits both sides;
    the first step of each request is not timed. Medians of every timed step, and of each pair's ratio."""
    for shape in shapes:
        times: dict[float, list[float]] = {0.0: [], ratio: []}
        for _ in range(repeats):
            samplings = {side: merging_sampling(pipe, shape, steps, side) for side in (0.0, ratio)}
            for step in range(steps):
                for side in ((0.0, ratio) if step % 2 == 0 else (ratio, 0.0)):
                    start = time.perf_counter()
                    pipe.step([samplings[side]])
                    synchronize(pipe.device)
                    if step:
                        times[side].append(time.perf_counter() - start)
        log(f"{shape.label} {pipe.precision} s/step, in the order of the pairs: off "
            f"{' '.join(f'{t:.3f}' for t in times[0.0])}; ratio {ratio} {' '.join(f'{t:.3f}' for t in times[ratio])}")
        off, on = statistics.median(times[0.0]), statistics.median(times[ratio])
        paired = statistics.median(a / b for a, b in zip(times[0.0], times[ratio]))
        tokens = (shape.height // 8) * (shape.width // 8)
        attention = {n: attention_milliseconds(pipe, n) for n in (tokens, tokens - int(tokens * ratio))}
        print(f"| {shape.label} | {pipe.precision} | {off:.3f} | {on:.3f} | {off / on:.3f}x | {paired:.3f}x | "
              f"{len(times[0.0])} | {min(times[0.0]):.3f}-{max(times[0.0]):.3f} | "
              f"{min(times[ratio]):.3f}-{max(times[ratio]):.3f} | "
              + " | ".join(f"{n}: {ms['installed']:.3g} ({ms['torch']:.3g})" for n, ms in attention.items()) + " |",
              flush=True)


def lora_application(args: argparse.Namespace) -> None:
    """Per denoising step at 512x512, a rank-64 LoRA of the LCM-LoRA layout: none, unfused hooks, fused into the
    backend's twins (and what fusing costs), fused as served (`lora_fusion: fused` within `lora_cache_mib`: in part
    where the whole copy exceeds it), LCM's 1 sample at scale 1 and a guided sample; sides interleaved,
    median and min of `--repeats` steps each (the first of each side untimed), and the hooks' share of a step that
    the backend's `lora_fusion: auto` measures. Then the memory each form holds."""
    from controlnet_canny.backends.cpu import fastest_seconds
    from controlnet_canny.backends.cpu_lora import FusedLoRA, LoRAApplication
    from controlnet_canny.lora import LoRAPatch, read_lora

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_adapters import write_lora

    print(machine_header(args.device))
    for precision in args.precisions:
        pipe = ControlNetCannyPipeline.load([args.checkpoint], args.config, args.device, precision)
        log(f"{precision}: backend {backend_summary(pipe)}")
        with tempfile.TemporaryDirectory() as directory:
            path = write_lora(Path(directory) / "lcm.safetensors", pipe.config, "kohya", rank=64, seed=0, alpha=64)
            lora = read_lora(path, pipe.lora_targets, pipe.config.unet)
        patch = LoRAPatch.build([(lora, 1.0)], pipe.device, pipe.dtype)
        start = time.perf_counter()
        fused = FusedLoRA(patch.unet_only(), pipe.model, pipe.backend._twin_like)
        build = time.perf_counter() - start
        served = LoRAApplication(patch.unet_only(), "fused", pipe.backend.fused_loras, pipe.backend._twin_like,
                                 fastest_seconds, min_share=0.0)
        sides = {"none": contextlib.nullcontext, "unfused": lambda: patch.unet_only().applied(pipe.model),
                 "fused": lambda: fused.applied(pipe.model), "as served": lambda: served.applied(pipe.model)}
        print(f"\n{precision}, 512x512, s/step median (min) of {args.repeats}; fusing the UNet's "
              f"{len(patch.unet_only().layers)} layers took {build:.2f} s")
        print("| request | none | unfused | fused | as served | unfused vs none | fused vs none | as served vs none | "
              "auto measured |\n|---|---|---|---|---|---|---|---|---|")
        for label, fields in (("LCM, 1 sample, scale 1", dict(sampler="lcm", scale=1.0)),
                              ("guided, 1 sample (batch 2)", {})):
            params = GenerationParams(prompt="a house", image_resolution=512, ddim_steps=args.repeats + 1, seed=0,
                                      **fields)
            samplings = {side: pipe.start(pipe.prepare(photo((1, 1)), params)) for side in sides}
            times: dict[str, list[float]] = {side: [] for side in sides}
            for _ in range(2):  # as served: measured at its first evaluation, fused at its second, untimed
                with sides["as served"]():
                    pipe.step([pipe.start(pipe.prepare(photo((1, 1)), params))])
            for step in range(args.repeats + 1):
                order = list(sides)[step % len(sides):] + list(sides)[:step % len(sides)]
                for side in order:
                    with sides[side]():
                        begin = time.perf_counter()
                        pipe.step([samplings[side]])
                        if step:
                            times[side].append(time.perf_counter() - begin)
            median = {side: statistics.median(t) for side, t in times.items()}
            # what the backend's `auto` measures on this request's first evaluation
            application = pipe.backend.lora_application(patch.unet_only(), pipe.model)
            with application.applied(pipe.model):
                pipe.step([pipe.start(pipe.prepare(photo((1, 1)), params))])
            measured = getattr(application, "unfused_share", None)
            choice = {"auto": "fused once it pays"}.get(application.choice, application.choice)
            print(f"| {label} | " + " | ".join(f"{median[s]:.3f} ({min(times[s]):.3f})" for s in sides)
                  + "".join(f" | {median[side] / median['none']:.3f}x" for side in ("unfused", "fused", "as served"))
                  + " | "
                  + ("-" if measured is None else f"+{100 * measured:.0f}%, {choice}") + " |", flush=True)
        factors = sum(t.nbytes for layer in lora.layers.values() for t in (layer.down, layer.up))
        patched = sum(t.nbytes for layer in patch.layers.values() for t in (layer.down, layer.up))
        unet = sum(t.nbytes for layer in patch.unet_only().layers.values() for t in (layer.down, layer.up))
        print(f"memory: LoRA factors as read (fp32) {factors / 2**20:.0f} MiB; the patch in {precision} "
              f"{patched / 2**20:.0f} MiB (UNet {unet / 2**20:.0f} MiB); a fused copy of the UNet's patched layers "
              f"{fused.nbytes / 2**20:.0f} MiB; as served {pipe.backend.fused_loras.nbytes / 2**20:.0f} MiB")
        del pipe, fused, served, patch, lora
        gc.collect()


# ----------------------------------------------------------------------------------- start-up, drift, service


def write_synthetic_checkpoint(path: Path) -> None:
    """A full-size file in the real v1.0 layout (5.7 GB fp32), written once and reused."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_checkpoint import make_state_dict

    path.parent.mkdir(parents=True, exist_ok=True)
    state = make_state_dict(load_config(FULL_CONFIG), seed=0)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.rename(path)


def weights_gib(config: Path, precision: str) -> float:
    """GiB of the weights a worker serves (the VAE encoder and other unused keys are never loaded)."""
    with torch.device("meta"):
        count = sum(p.numel() for p in ControlLDM(load_config(config)).parameters())
    return count * PRECISIONS[precision].itemsize / 2**30


def startup(checkpoint: Path, config: Path, device: str, precision: str) -> tuple[float, float, float]:
    """In a fresh process: (seconds from process start to a pipeline ready to serve, peak RSS GiB when ready,
    peak RSS GiB after serving one 256x256 request). In fp32 on CPU the weights stay memory-mapped, so
    they become resident only as the first request touches them."""
    code = f"""
import sys
import numpy as np
sys.path.insert(0, 'handler')
from controlnet_canny.params import GenerationParams
from controlnet_canny.pipeline import ControlNetCannyPipeline
pipe = ControlNetCannyPipeline.load([{str(checkpoint)!r}], {str(config)!r}, {device!r}, {precision!r})
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
    pipe = ControlNetCannyPipeline.load([TINY_CHECKPOINT], TINY_CONFIG, "cpu", "fp32")
    bare = []
    for _ in range(count):
        start = time.perf_counter()
        image = decode_image(image_path.read_bytes(), 2**24, 2**24)
        prepared = pipe.prepare(image, GenerationParams(**fields))
        (result,) = pipe.generate([prepared])
        make_bundle([encode_png(img, {}) for img in result.images], encode_png(prepared.edge_map), {})
        bare.append(time.perf_counter() - start)
    return statistics.median(served), statistics.median(bare)


# ------------------------------------------------------------------------------------------------ recipes

# An example interval, not a tuned one: for SD 1.5 it leaves out the first 4 and the last 2 of DDIM's 20 steps
# (sigma 11.0 to 5.1, and 0.23, 0.04) and the first 3 of dpmpp_2m's 10 (14.6 to 5.1).
GUIDANCE_INTERVAL = (0.3, 5.0)
TOKEN_MERGING_RATIO = 0.5  # tomesd's and AUTOMATIC1111's usual setting
BASE_RECIPES = {"ddim 20": {"sampler": "ddim", "ddim_steps": 20},
                "dpmpp_2m 10": {"sampler": "dpmpp_2m", "ddim_steps": 10}}
OPTIONS = {"guidance interval": {"guidance_interval": GUIDANCE_INTERVAL},
           f"token merging {TOKEN_MERGING_RATIO}": {"token_merging_ratio": TOKEN_MERGING_RATIO}}


def with_options(bases: dict[str, dict], options: dict[str, dict]) -> dict[str, dict]:
    """Each base recipe alone, with each option, and with all of them ("ddim 20, guidance interval")."""
    combinations = [[], *([name] for name in options), list(options)]
    recipes = {}
    for base, fields in bases.items():
        for chosen in combinations:
            chosen_fields = {key: value for name in chosen for key, value in options[name].items()}
            recipes[", ".join([base, *chosen])] = {**fields, **chosen_fields}
    return recipes


RECIPES = {  # whole images as users ask for them: the request fields besides the prompt and the photo
    **with_options(BASE_RECIPES, OPTIONS),
    "lcm 4 at scale 1": {"sampler": "lcm", "ddim_steps": 4, "scale": 1.0},  # the LCM-LoRA recipe's evaluations
}


def recipe_base(name: str) -> str:
    """The recipe a variant ("ddim 20, guidance interval") changes one option of ("ddim 20")."""
    return name.split(",")[0]


def time_recipe(pipe: ControlNetCannyPipeline, shape: Shape, fields: dict, keep_patches: bool = False
                ) -> dict[str, float]:
    """Seconds of one whole request (canny, text encoding with the cache cleared, sampling, decoding) and of
    its phases as the service reports them; its LoRAs' patch built in it unless `keep_patches`."""
    params = GenerationParams(prompt="a house", image_resolution=shape.resolution, seed=0, **fields)
    pipe._text_cache.clear()
    if not keep_patches:
        pipe._lora_patches.clear()
    start = time.perf_counter()
    (result,) = pipe.generate([pipe.prepare(photo(shape.aspect), params)])
    return {"whole": time.perf_counter() - start, **result.seconds}


def preview_seconds(pipe: ControlNetCannyPipeline, shape: Shape) -> float:
    """Median seconds of one live preview of a one-sample request at `shape`, as the handler makes it: the data
    prediction taken at the step, the latent-to-RGB image, the JPEG."""
    from serving import encode_preview

    sampling = pipe.start(pipe.prepare(photo(shape.aspect), GenerationParams(
        prompt="a house", image_resolution=shape.resolution, seed=0, ddim_steps=20)), preview_every=1)
    eps = torch.randn_like(sampling.state.x)
    runs = []
    for _ in range(20):
        start = time.perf_counter()
        sampling.preview_latents = samplers.denoised(sampling.plan, sampling.state, eps)
        encode_preview(pipe.preview(sampling))
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def tiny_latent_differences() -> tuple[dict[str, float], dict[str, float]]:
    """Per base recipe, the mean abs of the tiny model's final latents (64x64, seed 1); per variant, their mean abs
    difference from its base recipe's: how far the option moves the result (evidence of an effect, not a quality
    measure)."""
    import cv2

    image = cv2.cvtColor(cv2.imread(str(ROOT / "tests" / "data" / "house.png")), cv2.COLOR_BGR2RGB)
    pipe = ControlNetCannyPipeline.load([TINY_CHECKPOINT], TINY_CONFIG, "cpu", "fp32")

    def latents(fields: dict) -> torch.Tensor:
        sampling = pipe.start(pipe.prepare(image, GenerationParams(prompt="a house", image_resolution=64, seed=1,
                                                                   **fields)))
        while not sampling.finished:
            pipe.step([sampling])
        return samplers.result(sampling.plan, sampling.state)

    bases = {name: latents(fields) for name, fields in RECIPES.items() if recipe_base(name) == name}
    differences = {name: float((latents(fields) - bases[recipe_base(name)]).abs().mean())
                   for name, fields in RECIPES.items() if recipe_base(name) != name}
    return {name: float(base.abs().mean()) for name, base in bases.items()}, differences


def recipes(args: argparse.Namespace) -> None:
    """Whole images of each recipe, every shape and precision, ours alone (one process, one after another)."""
    shapes = [Shape.of(aspect, size) for size in args.sizes for aspect in args.shapes]
    print(machine_header(args.device))
    print("| recipe | shape (HxW) | dtype | s/image | text s | sampling s | decoding s | vs its base |")
    print("|---|---|---|---|---|---|---|---|")
    for precision in args.precisions:
        pipe = ControlNetCannyPipeline.load([args.checkpoint], args.config, args.device, precision)
        log(f"{precision}: backend {backend_summary(pipe)}")
        for shape in shapes:
            measured = {}
            for name, fields in RECIPES.items():
                measured[name] = time_recipe(pipe, shape, fields)
                whole = measured[name]["whole"]
                print(f"| {name} | {shape.label} | {precision} | {whole:.1f} | {measured[name]['text']:.2f} | "
                      f"{measured[name]['sampling']:.1f} | {measured[name]['decoding']:.2f} | "
                      f"{ratio(measured[recipe_base(name)]['whole'], whole)} |", flush=True)
            preview = preview_seconds(pipe, shape)
            step = measured["ddim 20"]["sampling"] / 20
            print(f"\nlive preview at {shape.label} {precision}: {preview * 1000:.2f} ms = {100 * preview / step:.3f}% "
                  f"of a ddim step ({step:.2f} s)\n", flush=True)
        del pipe
        gc.collect()
    magnitudes, differences = tiny_latent_differences()
    print("tiny model, 64x64: mean abs of the base recipes' final latents, and of each variant's difference from them:")
    for name, magnitude in magnitudes.items():
        print(f"  {name}: {magnitude:.3g}")
    for name, difference in differences.items():
        print(f"  {name}: {difference:.4f}")


# ---------------------------------------------------------------------------------------- adapters (LoRA, TAESD)

LCM_LORA = "lcm-lora-sdv1-5"  # the file's stem in the bench's adapter store, as users name it
LCM_LORA_RANK = 64  # latent-consistency/lcm-lora-sdv1-5's rank
AB_ROUNDS = 3
DIFFUSERS_TAESD = SYNTHETIC_CHECKPOINT.parent / "taesd-diffusers"
ADAPTER_RECIPES = {  # the request fields besides the prompt and the photo
    "ddim 20 (default)": {},
    "dpmpp_2m 10": {"sampler": "dpmpp_2m", "ddim_steps": 10},
    "lcm 4 at scale 1, LCM-LoRA": {"sampler": "lcm", "ddim_steps": 4, "scale": 1.0, "loras": ((LCM_LORA, 1.0),)},
    "lcm 4 at scale 1, LCM-LoRA, TAESD": {"sampler": "lcm", "ddim_steps": 4, "scale": 1.0, "loras": ((LCM_LORA, 1.0),),
                                          "vae": "taesd"},
}


def write_adapter_store(config_path: Path) -> Path:
    """Once per architecture: a rank-64 LoRA of the whole UNet and text encoder in the LCM-LoRA file's layout (kohya
    keys, diffusers block names, LoCon convolutions), madebyollin's TAESD files in the store and a diffusers-layout
    copy beside it. Returns the store."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_adapters import write_lora, write_taesd

    store, config = SYNTHETIC_CHECKPOINT.parent / f"adapters-{config_path.stem}", load_config(config_path)
    lora = store / "loras" / f"{LCM_LORA}.safetensors"
    if not lora.exists():
        log(f"writing a rank-{LCM_LORA_RANK} LoRA in the LCM-LoRA layout to {lora} (once) ...")
        write_lora(lora, config, "kohya", rank=LCM_LORA_RANK, seed=0, alpha=LCM_LORA_RANK)
    if not (store / "taesd").is_dir():
        write_taesd(store / "taesd", "madebyollin", seed=0)
    if not DIFFUSERS_TAESD.is_dir():
        write_taesd(DIFFUSERS_TAESD, "diffusers", seed=0)
    return store


def diffusers_pipeline(cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    """diffusers' StableDiffusionControlNetPipeline of SD 1.5's dimensions (random weights), its CLIP tokenizer
    built offline from open_clip's BPE file as tests/test_tokenizer.py builds it."""
    import gzip
    import json
    import tempfile

    from diffusers import AutoencoderKL, StableDiffusionControlNetPipeline
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(directory) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer.from_pretrained(directory, pad_token="<|endoftext|>",
                                                  model_max_length=cfg.text.context_length)
    unet, controlnet = diffusers_models(cfg, dtype, device)
    vae_cfg = cfg.vae
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=vae_cfg.z_channels,
                        down_block_types=["DownEncoderBlock2D"] * len(vae_cfg.ch_mult),
                        up_block_types=["UpDecoderBlock2D"] * len(vae_cfg.ch_mult),
                        block_out_channels=[vae_cfg.ch * m for m in vae_cfg.ch_mult],
                        layers_per_block=vae_cfg.num_res_blocks, scaling_factor=cfg.schedule.scale_factor)
    text = cfg.text
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=text.vocab_size, hidden_size=text.width, intermediate_size=text.intermediate,
        num_hidden_layers=text.layers, num_attention_heads=text.heads, max_position_embeddings=text.context_length,
        hidden_act="quick_gelu"))
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet,
        scheduler=diffusers_scheduler("ddim"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def diffusers_scheduler(sampler: str):
    """The scheduler of each of our samplers, configured as SD 1.5's scheduler config has it."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

    sd15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1)
    if sampler == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **sd15)
    if sampler == "dpmpp_2m":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **sd15)
    return LCMScheduler(clip_sample=False, set_alpha_to_one=False, **sd15)


def time_diffusers_recipe(pipe, shape: Shape, fields: dict, device: torch.device) -> float:
    """Seconds of one whole image from diffusers' pipeline: canny on the resized photo, text encoding, the
    steps, the decode (to a numpy array)."""
    from PIL import Image

    params = GenerationParams(prompt="a house", image_resolution=shape.resolution, seed=0,
                              **{k: v for k, v in fields.items() if k not in ("loras", "vae")})
    pipe.scheduler = diffusers_scheduler(params.sampler)
    start = time.perf_counter()
    resized = resize_image(photo(shape.aspect), shape.resolution)
    edges = canny(resized, params.low_threshold, params.high_threshold)
    pipe(params.prompt + ", " + params.a_prompt, image=Image.fromarray(np.stack([edges] * 3, axis=-1)),
         height=shape.height, width=shape.width, num_inference_steps=params.ddim_steps,
         guidance_scale=params.scale, negative_prompt=params.n_prompt,
         generator=torch.Generator().manual_seed(0), output_type="np")
    synchronize(device)
    return time.perf_counter() - start


FRESH_PROCESS = """
import json, sys
sys.path.insert(0, 'scripts')
import bench
print(json.dumps(getattr(bench, sys.argv[1])(*sys.argv[2:])))
"""


def in_fresh_process(function: str, *args: str):
    """bench.`function`(*args) in a new Python process (its allocator and memory its own); what it returns, by JSON."""
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, function, *args], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def diffusers_recipe_times(config: str, precision: str, device: str, shapes: str) -> list:
    """In this fresh process: seconds of each of ADAPTER_RECIPES' whole images from diffusers' pipeline at each of
    `shapes` ([[aspect, resolution], ...] as JSON), its LoRA fused as diffusers fuses one kept on, TAESD as
    AutoencoderTiny; [[aspect, resolution, recipe, seconds], ...]."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    cfg, dtype, device = load_config(Path(config)), PRECISIONS[precision], torch.device(device)
    store = write_adapter_store(Path(config))
    reference = diffusers_pipeline(cfg, dtype, device)
    tiny_autoencoder = AutoencoderTiny()  # SD 1.x's TAESD is its default configuration
    tiny_autoencoder.load_state_dict(load_file(DIFFUSERS_TAESD / "diffusion_pytorch_model.safetensors"))
    times = []
    for name, fields in ADAPTER_RECIPES.items():  # the LoRA recipes last: fused for good
        if fields.get("loras") and not reference.get_list_adapters():
            reference.load_lora_weights(str(store / "loras"), weight_name=f"{LCM_LORA}.safetensors", adapter_name="lcm")
            reference.fuse_lora()  # diffusers' faster way for a LoRA kept on: no low-rank paths per step
        full_vae = reference.vae
        if fields.get("vae") == "taesd":
            reference.vae = tiny_autoencoder.to(device, dtype)
        for aspect, resolution in json.loads(shapes):
            shape = Shape.of(tuple(aspect), resolution)
            times.append([aspect, resolution, name, time_diffusers_recipe(reference, shape, fields, device)])
        reference.vae = full_vae
    return times


def adapter_recipes(args: argparse.Namespace) -> None:
    """Whole images of ADAPTER_RECIPES, ours (the adapter store through the real path) and diffusers', one model in
    memory at a time (fp32 holds three of them badly in 24 GiB)."""
    store = write_adapter_store(args.config)
    shapes = [Shape.of(aspect, size) for size in args.sizes for aspect in args.shapes]
    print(machine_header(args.device))
    for precision in args.precisions:
        # diffusers in a fresh process: as it ships (ours sets this process's allocator, backend.allocator), and all
        # its memory gone before ours loads
        theirs: dict[tuple[Shape, str], float] = {}
        if not args.no_diffusers:
            shapes_json = json.dumps([[s.aspect, s.resolution] for s in shapes])
            for aspect, resolution, name, seconds_taken in in_fresh_process(
                    "diffusers_recipe_times", str(args.config), precision, str(args.device), shapes_json):
                theirs[Shape.of(tuple(aspect), resolution), name] = seconds_taken
        pipe = ControlNetCannyPipeline.load([args.checkpoint], args.config, args.device, precision, adapters=store)
        log(f"{precision}: backend {backend_summary(pipe)}")
        without_store = ControlNetCannyPipeline.load([args.checkpoint], args.config, args.device, precision)
        # a request without adapters, with the store attached and without one, alternated: no slower (at 256 px,
        # the cheapest whole image: what a store could add is per request, not per pixel)
        sides: dict[str, list[float]] = {"with the store": [], "without a store": []}
        for _ in range(AB_ROUNDS):
            for side, served in (("with the store", pipe), ("without a store", without_store)):
                sides[side].append(time_recipe(served, Shape.of((1, 1), 256), {})["whole"])
        print(f"the default request at 256x256 {precision}, best of {AB_ROUNDS}: " +
              ", ".join(f"{side} {min(times):.2f} s" for side, times in sides.items()), flush=True)
        del without_store, served
        gc.collect()
        cpu_allocator.release_free_memory()
        ours: dict[tuple[Shape, str], dict[str, float]] = {}
        first: dict[tuple[Shape, str], float] = {}  # a LoRA set's first request: unfused while the backend measures
        for shape in shapes:
            for name, fields in ADAPTER_RECIPES.items():
                timed = time_recipe(pipe, shape, fields)
                if fields.get("loras"):
                    first[shape, name] = timed["whole"]
                else:
                    ours[shape, name] = timed
        del pipe
        gc.collect()
        cpu_allocator.release_free_memory()  # the pipeline's heap back before the next loads (a worker has one)
        # The image as served once the set is fused (auto fuses a set used often; forced here, built untimed), in
        # part where its whole copy exceeds lora_cache_mib, as auto then fuses it.
        steady = ControlNetCannyPipeline.load([args.checkpoint], args.config, args.device, precision,
                                              BackendOptions(lora_fusion="fused"), adapters=store)
        for shape in shapes:
            for name, fields in ADAPTER_RECIPES.items():
                if fields.get("loras"):
                    time_recipe(steady, shape, fields)
                    ours[shape, name] = time_recipe(steady, shape, fields, keep_patches=True)
        del steady
        gc.collect()
        print("| recipe | shape (HxW) | dtype | ours s/image | ours decoding s | ours, the set's first request s | "
              "diffusers s/image | ours vs diffusers | ours vs ours default |")
        print("|---|---|---|---|---|---|---|---|---|")
        for shape in shapes:
            default = ours[shape, next(iter(ADAPTER_RECIPES))]["whole"]
            for name in ADAPTER_RECIPES:
                whole, diffusers_whole = ours[shape, name]["whole"], theirs.get((shape, name), math.nan)
                print(f"| {name} | {shape.label} | {precision} | {whole:.1f} | {ours[shape, name]['decoding']:.2f} | "
                      f"{seconds(first.get((shape, name), math.nan))} | {seconds(diffusers_whole)} | "
                      f"{ratio(diffusers_whole, whole)} | {ratio(default, whole)} |", flush=True)


# -------------------------------------------------------------------------------------------------- allocator

# The requests a step is timed for: one sample guided (the default: batch 2) and unguided (LCM at scale 1: batch 1)
ALLOCATOR_REQUESTS = {"guided (batch 2)": ({}, GUIDANCE_BATCH),
                      "lcm at scale 1 (batch 1)": ({"sampler": "lcm", "scale": 1.0}, 1)}


def allocator_side(engine: str, allocator: str, checkpoint: str, config: str, precision: str, steps: str) -> dict:
    """In this fresh process: seconds per step of each of ALLOCATOR_REQUESTS at 512x512, ours or diffusers' models,
    with the C allocator as the C library ships it (system) or retaining freed memory (retain), and the peak RSS."""
    shape, dtype, device = Shape.of((1, 1), 512), PRECISIONS[precision], torch.device("cpu")
    seconds = {}
    if engine == "ours":
        pipe = ControlNetCannyPipeline.load([checkpoint], config, device, precision, BackendOptions(allocator=allocator))
        for name, (fields, _) in ALLOCATOR_REQUESTS.items():
            seconds[name] = time_ours(pipe, shape, int(steps) + 1, fields)[0]
    else:
        if allocator == "retain":
            cpu_allocator.retain_freed_memory()
        cfg = load_config(Path(config))
        models = diffusers_models(cfg, dtype, device)
        for name, (_, batch) in ALLOCATOR_REQUESTS.items():
            seconds[name] = time_diffusers(models, cfg, shape, dtype, device, int(steps), batch)
    peak = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) / 2**20
    return {"seconds": seconds, "peak_gib": peak}


def allocator_ab(args: argparse.Namespace) -> None:
    """Ours and diffusers' steps with the allocator as shipped and retaining freed memory, each side in fresh
    processes (the setting is process-wide and not undone), alternated ROUNDS times; the fastest of each."""
    print(machine_header(args.device))
    print("| engine | dtype | request | system s/step | retain s/step | retain vs system | peak RSS GiB, system / retain |")
    print("|---|---|---|---|---|---|---|")
    for precision in args.precisions:
        for engine in ("ours", "diffusers"):
            runs: dict[str, list[dict]] = {"system": [], "retain": []}
            for _ in range(ROUNDS):
                for allocator in runs:
                    runs[allocator].append(in_fresh_process("allocator_side", engine, allocator, str(args.checkpoint),
                                                            str(args.config), precision, str(args.steps)))
                    log(f"{engine} {precision} {allocator}: {runs[allocator][-1]}")
            for name in ALLOCATOR_REQUESTS:
                best = {side: min(run["seconds"][name] for run in side_runs) for side, side_runs in runs.items()}
                peaks = " / ".join(f"{max(run['peak_gib'] for run in side_runs):.2f}" for side_runs in runs.values())
                print(f"| {engine} | {precision} | {name} | {best['system']:.2f} | {best['retain']:.2f} | "
                      f"{ratio(best['system'], best['retain'])} | {peaks} |", flush=True)


# ------------------------------------------------------------------------------------------------- VAE decode

# What the decoder runs with, beside plain (every backend lever off, maps as loaded): one lever at a time, then all.
DECODE_VARIANTS = {
    "channels_last": BackendOptions(prepack="none", winograd="none", attention="torch", calibration_cache=""),
    "layers": BackendOptions(decoder_layout="contiguous", calibration_cache=""),
    "all": BackendOptions(calibration_cache=""),
}


# TAESD (what vae=taesd decodes with) as loaded, and as the CPU backend lays it out (`prepare_decoder`)
TAESD_LAYOUTS = ("plain", "channels_last")


def decode_ab(args: argparse.Namespace) -> None:
    """The full VAE decoder (the config's, random weights) plain beside the CPU backend's levers on it, calibrated
    here as a worker's load does (its added calibration time), and TAESD beside it; one decode of each in turn, min
    of --repeats."""
    from controlnet_canny.backends.cpu import CpuBackend
    from controlnet_canny.pipeline import CALIBRATION_ASPECTS, CALIBRATION_RESOLUTION
    from controlnet_canny.preprocess import output_size
    from controlnet_canny.taesd import TinyAutoencoder
    from controlnet_canny.vae import AutoencoderKL

    cfg = load_config(args.config)
    factor = cfg.latent_factor
    latent_sizes = [(h // factor, w // factor)
                    for h, w in (output_size(ah, aw, CALIBRATION_RESOLUTION) for ah, aw in CALIBRATION_ASPECTS)]
    shapes = [Shape.of(aspect, size) for size in args.sizes for aspect in args.shapes]
    print(machine_header(args.device))
    print("| shape (HxW) | dtype | plain s | " + " | ".join(f"{name} s" for name in DECODE_VARIANTS) + " | all vs plain |"
          " largest difference from plain, of its largest magnitude | "
          + " | ".join(f"TAESD {layout} s" for layout in TAESD_LAYOUTS) + " |")
    print("|---|---|---|" + "---|" * len(DECODE_VARIANTS) + "---|---|" + "---|" * len(TAESD_LAYOUTS))
    for precision in args.precisions:
        dtype = PRECISIONS[precision]
        torch.manual_seed(0)
        plain = AutoencoderKL(cfg.vae, cfg.schedule.scale_factor).to(dtype).eval().requires_grad_(False)
        vaes = {"plain": plain}
        taesds = {"plain": TinyAutoencoder(with_encoder=False).to(dtype=dtype).eval()}  # real size, random weights
        taesds["channels_last"] = copy.deepcopy(taesds["plain"])
        CpuBackend(args.device, dtype, BackendOptions(decoder_layout="channels_last")).prepare_decoder(
            taesds["channels_last"])
        for name, options in DECODE_VARIANTS.items():
            vae = vaes[name] = copy.deepcopy(plain)

            def probe(latent: tuple[int, int], vae=vae) -> None:  # what the pipeline's probe decodes
                vae.decode(torch.zeros(1, cfg.vae.z_channels, *latent, dtype=dtype))

            backend = CpuBackend(args.device, dtype, options)
            start = time.perf_counter()
            backend.prepare(vae, probe, latent_sizes, f"vae-{name}")
            log(f"{precision} {name}: prepared in {time.perf_counter() - start:.1f} s, {backend.summary()}")
        for shape in shapes:
            z = torch.randn(1, cfg.vae.z_channels, shape.height // factor, shape.width // factor,
                            generator=torch.Generator().manual_seed(0)).to(dtype)
            times: dict[str, list[float]] = {name: [] for name in vaes}
            images = {}
            taesd_times: dict[str, list[float]] = {layout: [] for layout in TAESD_LAYOUTS}
            with torch.inference_mode():
                for _ in range(args.repeats):
                    for name, vae in vaes.items():
                        start = time.perf_counter()
                        images[name] = vae.decode(z).float()
                        times[name].append(time.perf_counter() - start)
                    for layout, taesd in taesds.items():
                        start = time.perf_counter()
                        taesd.decode(z)
                        taesd_times[layout].append(time.perf_counter() - start)
            log(f"{shape.label} {precision} s per decode, in turn: "
                + "; ".join(f"{name} {' '.join(f'{t:.2f}' for t in ts)}" for name, ts in times.items()))
            best = {name: min(ts) for name, ts in times.items()}
            difference = (max((images[name] - images["plain"]).abs().max().item() for name in DECODE_VARIANTS)
                          / images["plain"].abs().max().item())
            print(f"| {shape.label} | {precision} | {best['plain']:.2f} | "
                  + " | ".join(f"{best[name]:.2f}" for name in DECODE_VARIANTS)
                  + f" | {ratio(best['plain'], best['all'])} | {difference:.1e} | "
                  + " | ".join(f"{min(ts):.3f}" for ts in taesd_times.values()) + " |", flush=True)
        del vaes, plain
        gc.collect()


def drift(device: torch.device) -> dict[str, tuple[float, float]]:
    """Max and mean abs difference (uint8 levels) between the tiny model's images on CPU in fp32 and in each
    other precision the device runs (on a GPU fp32 too), per setting."""
    import cv2

    image = cv2.cvtColor(cv2.imread(str(ROOT / "tests" / "data" / "house.png")), cv2.COLOR_BGR2RGB)
    cpu = torch.device("cpu")
    candidates = [(device, p) for p in ["fp32", *DEFAULT_PRECISIONS[device.type]] if (device, p) != (cpu, "fp32")]
    pipes = {(d, p): ControlNetCannyPipeline.load([TINY_CHECKPOINT], TINY_CONFIG, d, p)
             for d, p in [(cpu, "fp32"), *candidates]}
    reference = pipes[cpu, "fp32"]
    drifts = {}
    for label, extra in (("scale 9, 20 steps", {}), ("scale 1, 20 steps", {"scale": 1.0})):
        params = GenerationParams(prompt="a house", image_resolution=64, seed=1, **extra)
        expected = reference.generate([reference.prepare(image, params)])[0].images[0].astype(int)
        for d, p in candidates:
            got = pipes[d, p].generate([pipes[d, p].prepare(image, params)])[0].images[0].astype(int)
            drifts[f"{label}, {d.type} {p} vs cpu fp32"] = (float(np.abs(got - expected).max()),
                                                            float(np.abs(got - expected).mean()))
    return drifts


# ------------------------------------------------------------------------------------------------- table


def ratio(reference: float, value: float) -> str:
    return f"{reference / value:.2f}x" if math.isfinite(reference / value) else "-"


def seconds(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "-"


COLUMNS = [
    "shape (HxW)", "photo W:H", "dtype", "ours s/step", "plain s/step", "diffusers s/step", "OpenVINO s/step",
    "ours compiled s/step", "compile s", "ours vs plain", "ours vs diffusers", "OpenVINO vs diffusers", "compiled vs diffusers", "ours s/image (20 steps)",
    "step TFLOP", "ours % of peak", "backend",
]


def print_table(rows: list[dict[str, str]]) -> None:
    """Markdown; the columns of COLUMNS that some row has."""
    columns = [column for column in COLUMNS if any(column in row for row in rows)]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row.get(column, "-") for column in columns) + " |", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--config", type=Path, default=FULL_CONFIG, help="architecture YAML (default: cldm_v15.yaml)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint of that architecture; default for cldm_v15.yaml: "
                        f"a synthetic one, written once to {SYNTHETIC_CHECKPOINT}")
    parser.add_argument("--shapes", nargs="+", default=ASPECTS, type=aspect_ratio, metavar="W:H",
                        help="aspect ratios of the input photo (landscape 4:3, portrait 3:4, ...); "
                             "default 1:1 4:3 16:9 3:4")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image_resolution values")
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS),
                        help="default: fp32 bf16 on cpu, fp16 bf16 on cuda")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement (median of all but the first)")
    parser.add_argument("--whole-image", action="store_true", help="also time whole 20-step requests of ours")
    parser.add_argument("--recipes", action="store_true", help="only time whole images of each of RECIPES (ours), "
                        "with the cost of a live preview and the tiny model's latent difference of each option")
    parser.add_argument("--adapters", action="store_true", help="only time whole images with LCM-LoRA and TAESD from "
                        "an adapter store beside today's default and dpmpp_2m, ours and diffusers' in turn")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--no-plain", action="store_true", help="skip ours with every backend lever off "
                        "(prepack none, winograd none, torch attention)")
    parser.add_argument("--no-openvino", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="with --device cuda: also time ours under torch.compile (compile time apart)")
    parser.add_argument("--startup", action="store_true", help="checkpoint-to-ready time and peak RSS")
    parser.add_argument("--drift", action="store_true", help="only report the drift of the tiny model's images from "
                        "fp32 on CPU, for each other precision the device runs")
    parser.add_argument("--service", metavar="URL", help="only measure service overhead against a running "
                        "`make serve` (e.g. http://127.0.0.1:8080)")
    parser.add_argument("--key-file", type=Path, default=ROOT / "artifacts" / "serve" / "key_file.json")
    parser.add_argument("--token-merging", type=float, metavar="RATIO",
                        help="only time ours per step with token_merging_ratio RATIO against off, step by step in "
                             "turn in one process (--repeats requests of --steps steps each side)")
    parser.add_argument("--repeats", type=int, default=3, help="with --token-merging: requests per side; with "
                        "--decode: decodes per variant; with --lora-application: timed steps per side")
    parser.add_argument("--decode", action="store_true", help="only time the VAE decoder (random weights, no "
                        "checkpoint) plain against the CPU backend's levers on it, one decode of each in turn")
    parser.add_argument("--allocator", action="store_true", help="only time 512x512 steps (guided, and LCM at scale 1) "
                        "of ours and diffusers' with the C allocator as shipped and retaining freed memory, in fresh "
                        "processes")
    parser.add_argument("--lora-application", action="store_true", help="only time 512x512 steps with a rank-64 "
                        "LoRA: none, unfused, fused (and fusing's cost and memory)")
    parser.add_argument("--attention", default="auto", help="with --token-merging: handler.backend.attention (auto: "
                        "measured at load, which a busy machine can sway; or torch, avx512, avx2)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: no CUDA device is usable here (torch {torch.__version__}, "
                     f"built for CUDA {torch.version.cuda or 'none'})")
    args.precisions = args.precisions or DEFAULT_PRECISIONS[args.device]
    if args.decode and args.device != "cpu":
        parser.error("--decode times the CPU backend's levers: --device cpu")
    if args.device == "cpu" and "fp16" in args.precisions:
        parser.error("fp16 is a CUDA precision; on CPU use fp32 or bf16")
    if args.device == "cpu" and args.compile:
        # inductor cannot lower the CPU backend's prepacked oneDNN weights ("weight must be a graph constant")
        parser.error("--compile needs --device cuda (measured on CPU before: docs/benchmarks.md)")
    args.no_openvino = args.no_openvino or args.device == "cuda"  # the CPU peer
    if not args.no_openvino:
        try:
            import openvino  # noqa: F401
        except ImportError:
            parser.error("OpenVINO is not installed: pip install -r requirements-test.txt, or pass --no-openvino")
    if args.checkpoint is None:
        if args.config.resolve() != FULL_CONFIG.resolve():
            parser.error("--checkpoint is needed with a --config other than cldm_v15.yaml")
        args.checkpoint = SYNTHETIC_CHECKPOINT
    args.device = torch.device(args.device)
    return args


def main() -> None:
    args = parse_args()
    if args.drift:
        for label, (worst, mean) in drift(args.device).items():
            print(f"tiny model, 64x64, {label}: images differ by at most {worst:.0f}, on average {mean:.1f} uint8 levels")
        return
    if args.service:
        served, bare = service_overhead(args.service, args.key_file, count=20)
        print(f"tiny 64x64, 1 step, median of 20: through TorchServe {served * 1000:.0f} ms, "
              f"in-process {bare * 1000:.0f} ms, service overhead {(served - bare) * 1000:.0f} ms")
        return
    if args.decode:
        decode_ab(args)
        return
    if args.checkpoint == SYNTHETIC_CHECKPOINT and not SYNTHETIC_CHECKPOINT.exists():
        log(f"writing the synthetic checkpoint {SYNTHETIC_CHECKPOINT} (once) ...")
        write_synthetic_checkpoint(SYNTHETIC_CHECKPOINT)
    if args.recipes:
        recipes(args)
        return
    if args.adapters:
        adapter_recipes(args)
        return
    if args.lora_application:
        lora_application(args)
        return
    if args.allocator:
        allocator_ab(args)
        return

    device, cfg = args.device, load_config(args.config)
    shapes = [Shape.of(aspect, size) for size in args.sizes for aspect in args.shapes]
    if args.token_merging is not None:
        print(machine_header(device))
        print(f"| output HxW | dtype | off s/step | ratio {args.token_merging} s/step | speed-up | paired speed-up | "
              "steps per side | off range | on range | attention ms, tokens: installed (torch) | merged |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for precision in args.precisions:
            pipe = ControlNetCannyPipeline.load([args.checkpoint], args.config, device, precision,
                                                BackendOptions(attention=args.attention))
            log(f"{precision}: backend {backend_summary(pipe)}")
            token_merging_ab(pipe, shapes, args.token_merging, args.steps, args.repeats)
            del pipe
            gc.collect()
        return
    rows: dict[tuple[str, Shape], dict[str, str]] = {}
    times: dict[tuple[str, Shape], dict[str, float]] = {}
    print(machine_header(device))
    for precision in args.precisions:
        dtype = PRECISIONS[precision]
        peak = machine_peak(dtype, device)
        pipe = ControlNetCannyPipeline.load([args.checkpoint], args.config, device, precision)
        log(f"{precision}: backend {backend_summary(pipe)}")
        # The same pipeline with every backend lever off: what no request shape may be slower than.
        plain = None if args.no_plain else ControlNetCannyPipeline.load(
            [args.checkpoint], args.config, device, precision, BackendOptions(prepack="none", winograd="none", attention="torch"))
        reference = None if args.no_diffusers else diffusers_models(cfg, dtype, device)
        for shape in shapes:
            # Alternated, twice, best median of each: a slow spell of a shared machine hits every side.
            ours, bare, theirs = [], [], []
            for _ in range(ROUNDS):
                ours.append(time_ours(pipe, shape, args.steps)[0])
                if plain:
                    bare.append(time_ours(plain, shape, args.steps)[0])
                if reference:
                    theirs.append(time_diffusers(reference, cfg, shape, dtype, device, args.steps))
            measured = times[precision, shape] = {"ours": min(ours), "plain": min(bare, default=math.nan),
                                                  "diffusers": min(theirs, default=math.nan)}
            whole = time_ours(pipe, shape, 20)[1] if args.whole_image else math.nan
            flops = step_flops(args.config, shape)
            rows[precision, shape] = {
                "shape (HxW)": shape.label, "photo W:H": shape.photo_label, "dtype": precision,
                "ours s/step": seconds(measured["ours"]), "plain s/step": seconds(measured["plain"]),
                "diffusers s/step": seconds(measured["diffusers"]),
                "ours vs plain": ratio(measured["plain"], measured["ours"]),
                "ours vs diffusers": ratio(measured["diffusers"], measured["ours"]),
                "ours s/image (20 steps)": seconds(whole),
                "step TFLOP": f"{flops / 1e12:.3g}",
                "ours % of peak": f"{100 * flops / measured['ours'] / peak:.0f}% of {peak / 1e12:.2f} TFLOP/s",
                "backend": backend_summary(pipe),
            }
            log(f"{shape.label} {precision}: ours {measured['ours']:.3f} s/step, plain {measured['plain']:.3f}, "
                f"diffusers {measured['diffusers']:.3f}")
        del reference, plain
        if args.compile:
            compile_networks(pipe)
            for shape in shapes:
                step, compiling = time_compiled(pipe, shape, args.steps)
                rows[precision, shape].update({
                    "ours compiled s/step": seconds(step), "compile s": seconds(compiling),
                    "compiled vs diffusers": ratio(times[precision, shape]["diffusers"], step),
                })
                log(f"{shape.label} {precision}: ours compiled {step:.3f} s/step after {compiling:.1f} s of compiling")
        del pipe
        gc.collect()

    if not args.no_openvino:
        openvino = OpenVINOStep(*diffusers_models(cfg, torch.float32, device), cfg)
        log(f"diffusers' models converted to OpenVINO in {openvino.convert_seconds:.1f} s")
        for precision in args.precisions:
            for shape in shapes:
                step, compiling, deviation = openvino.time(shape, precision, args.steps)
                rows[precision, shape].update({
                    "OpenVINO s/step": seconds(step),
                    "OpenVINO vs diffusers": ratio(times[precision, shape]["diffusers"], step),
                })
                log(f"{shape.label} {precision}: OpenVINO {step:.3f} s/step (compiled in {compiling:.1f} s); its eps "
                    f"deviates from diffusers' fp32 by {deviation:.1e} of its largest magnitude")
        del openvino
        gc.collect()

    print_table(list(rows.values()))
    print(f"peak RSS of this process: {peak_rss_gib():.1f} GiB")
    if args.startup:
        size_gib = args.checkpoint.stat().st_size / 2**30
        print(f"\nstart-up from {args.checkpoint} ({size_gib:.1f} GiB):")
        for precision in args.precisions:
            ready, ready_rss, served_rss = startup(args.checkpoint, args.config, device.type, precision)
            weights = weights_gib(args.config, precision)
            print(f"  {precision}: ready in {ready:.1f} s; peak RSS {ready_rss:.2f} GiB when ready, {served_rss:.2f} GiB "
                  f"after one 256x256 request = {served_rss / weights:.2f}x the {weights:.2f} GiB of weights")


if __name__ == "__main__":
    main()
