"""Image + prompt to images: canny, CLIP text encoding, DDIM with classifier-free guidance, VAE decoding.

Framework-free (no TorchServe import): the handler, `scripts/generate.py`, the tests and the benchmark all
drive this class.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import ddim
from .backends import cpu_attention, cpu_prepack as prepack
from .checkpoint import load_weights
from .config import CONFIG_DIR, ModelConfig, load_config
from .model import ControlLDM
from .params import GenerationParams
from .preprocess import canny, resize_image
from .unet import widen

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GUESS_MODE_DECAY = 0.825
TEXT_CACHE_SIZE = 64


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def control_scales(strength: float, guess_mode: bool, count: int = 13) -> list[float]:
    """Guess mode weakens the shallow residuals: strength * 0.825^(12 - i)."""
    if guess_mode:
        return [strength * GUESS_MODE_DECAY ** float(count - 1 - i) for i in range(count)]
    return [strength] * count


@dataclass(frozen=True)
class Prepared:
    """One request after preprocessing: seed resolved, image resized, edges detected."""
    params: GenerationParams
    image: np.ndarray  # (H, W, 3) uint8, resized
    edge_map: np.ndarray  # (H, W) uint8, white edges: exactly what conditions the model

    @property
    def seeds(self) -> list[int]:
        return [self.params.seed + i for i in range(self.params.num_samples)]

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one sampler batch (strength, scale, eta, seeds may differ)."""
        p = self.params
        return (self.edge_map.shape, p.ddim_steps, p.guess_mode, p.scale == 1.0)


@dataclass
class BatchResult:
    images: list[list[np.ndarray]]  # per request, its samples as (H, W, 3) uint8
    seconds: dict[str, float] = field(default_factory=dict)  # per phase: text, sampling, decoding
    steps: int = 0  # DDIM steps visited


class ControlNetCannyPipeline:
    def __init__(self, model: ControlLDM, config: ModelConfig, device: torch.device, dtype: torch.dtype):
        """Takes ownership of `model` (loaded, on `device`): on CPU its weights get packed for oneDNN, and its
        attention runs on the AVX-512 kernel where the CPU has it."""
        self.model = model.eval()
        if prepack.supported(device, dtype):
            prepack.prepack(model)
        if device.type == "cpu" and "avx512" in cpu_attention.variants(dtype):
            kernel = cpu_attention.load(dtype, "avx512")
            if kernel is not None:
                cpu_attention.install(model, kernel)
        self.config = config
        self.device = device
        self.dtype = dtype
        self.alphas_cumprod = ddim.alphas_cumprod(
            config.schedule.linear_start, config.schedule.linear_end, config.schedule.timesteps
        )
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def load(
        cls,
        checkpoints: Sequence[str | Path],
        config: str | Path = CONFIG_DIR / "cldm_v15.yaml",
        device: str | torch.device | None = None,
        precision: str = "fp32",
    ) -> ControlNetCannyPipeline:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        device = torch.device(device) if device is not None else default_device()
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        cfg = load_config(config)
        with torch.device("meta"):
            model = ControlLDM(cfg)
        load_weights(model, list(checkpoints), device, PRECISIONS[precision])
        return cls(model, cfg, device, PRECISIONS[precision])

    def prepare(self, image: np.ndarray, params: GenerationParams) -> Prepared:
        params = params.with_resolved_seed()
        resized = resize_image(image, params.image_resolution)
        return Prepared(params, resized, canny(resized, params.low_threshold, params.high_threshold))

    @torch.inference_mode()
    def encode_text(self, prompt: str) -> torch.Tensor:
        """(1, 77, width) context; an LRU cache spares re-encoding repeated prompts (the default negative)."""
        if prompt in self._text_cache:
            self._text_cache.move_to_end(prompt)
            return self._text_cache[prompt]
        context = self.model.cond_stage_model([prompt])
        self._text_cache[prompt] = context
        if len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return context

    @torch.inference_mode()
    def generate(self, batch: Sequence[Prepared], callback: ddim.StepCallback | None = None) -> BatchResult:
        """Samples every request of `batch` (equal `batch_key`s) in one sampler batch.

        Sample i of a request with seed s starts from its own CPU generator seeded s + i, which also draws
        its eta noise, so a sample is the same whether it runs alone or batched, on CPU or CUDA.
        """
        if len({p.batch_key for p in batch}) != 1:
            raise ValueError("requests in one batch must share image size, steps, guess mode and scale == 1")
        first = batch[0].params
        height, width = batch[0].edge_map.shape
        factor = self.config.latent_factor
        seconds: dict[str, float] = {}
        start = time.perf_counter()

        def per_sample(values: list) -> list:
            return [v for p, v in zip(batch, values) for _ in range(p.params.num_samples)]

        cond = torch.cat(per_sample([self.encode_text(p.params.prompt + ", " + p.params.a_prompt) for p in batch]))
        uncond = torch.cat(per_sample([self.encode_text(p.params.n_prompt) for p in batch]))
        seconds["text"] = time.perf_counter() - start

        start = time.perf_counter()
        hints = torch.cat([
            torch.from_numpy(np.repeat(p.edge_map[None, None], 3, axis=1)).to(self.device, torch.float32) / 255.0
            for p in batch
        ])
        hint_features = torch.repeat_interleave(
            self.model.control_model.encode_hint(hints.to(self.dtype)),
            torch.tensor([p.params.num_samples for p in batch], device=self.device), dim=0,
        )
        scales = torch.tensor(
            per_sample([control_scales(p.params.strength, p.params.guess_mode) for p in batch]),
            device=self.device, dtype=self.dtype,
        )
        guidance = torch.tensor(per_sample([p.params.scale for p in batch]), device=self.device)[:, None, None, None]
        eta = torch.tensor(per_sample([p.params.eta for p in batch]))[:, None, None, None]
        generators = [torch.Generator("cpu").manual_seed(s) for p in batch for s in p.seeds]
        shape = (1, self.config.unet.in_channels, height // factor, width // factor)

        def noise() -> torch.Tensor:
            return torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device)

        eps_model = self._guided_eps(cond, uncond, hint_features, scales, guidance, first.guess_mode, first.scale == 1.0)
        timesteps = ddim.ddim_timesteps(first.ddim_steps, self.config.schedule.timesteps)
        latents = ddim.sample_ddim(eps_model, noise(), timesteps, self.alphas_cumprod, eta, noise, callback)
        seconds["sampling"] = time.perf_counter() - start

        start = time.perf_counter()
        decoded = [self._decode(latent[None]) for latent in latents]
        seconds["decoding"] = time.perf_counter() - start
        images, offset = [], 0
        for p in batch:
            images.append(decoded[offset:offset + p.params.num_samples])
            offset += p.params.num_samples
        return BatchResult(images, seconds, len(timesteps))

    def _guided_eps(self, cond, uncond, hint_features, scales, guidance, guess_mode: bool, conditional_only: bool):
        """eps = e_uncond + scale (e_cond - e_uncond), both halves in one batched forward.

        Guess mode runs the unconditional half without control: its residuals are zeros, which adds nothing.
        """
        unet, control_model = self.model.model.diffusion_model, self.model.control_model

        def scaled_control(x, t, context):
            residuals = control_model(x, hint_features, t, context)
            # a residual has one row per sample, or one per sample and guidance half (unet.widen): same scales
            return [r * widen(scales, r.shape[0])[:, i, None, None, None] for i, r in enumerate(residuals)]

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x = x.to(self.dtype)
            if conditional_only:
                return unet(x, t, cond, scaled_control(x, t, cond))
            context = torch.cat([cond, uncond])
            if guess_mode:
                control = [torch.cat([r, torch.zeros_like(r)]) for r in scaled_control(x, t, cond)]
            else:
                control = scaled_control(x, t, context)
            # Both halves share x and t: the networks compute the rows before the first cross-attention once.
            e_cond, e_uncond = unet(x, t, context, control).float().chunk(2)
            return e_uncond + guidance * (e_cond - e_uncond)

        return eps

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents to (H, W, 3) uint8: x * 127.5 + 127.5, clipped and truncated (no rounding) as the reference."""
        x = self.model.first_stage_model.decode(latents.to(self.dtype)).float()
        x = (x[0].permute(1, 2, 0) * 127.5 + 127.5).cpu().numpy()
        return x.clip(0, 255).astype(np.uint8)
