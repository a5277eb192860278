"""Image + prompt to images: canny, CLIP text encoding, DDIM with classifier-free guidance, VAE decoding.

Framework-free (no TorchServe import): the handler, `scripts/generate.py`, the tests and the benchmark all
drive this class.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import ddim, samplers
from .backends import Backend, BackendOptions, select
from .backends.cpu import has_native_bf16, slowdown_of_emulated_bf16
from .checkpoint import load_weights
from .config import CONFIG_DIR, ModelConfig, load_config
from .model import ControlLDM
from .ddim import StepCallback
from .fidelity import control_fidelity
from .params import GenerationParams, ParamError
from .preprocess import MAX_ASPECT, canny, fit, fitted_edges, output_size, resize_image
from .text_encoder import chunk_ids, is_truncated, match_lengths, token_count
from .unet import widen
from .vae import VAEEncoder, load_encoder, to_unit_range

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = ("auto", *PRECISIONS)
GUESS_MODE_DECAY = 0.825
TEXT_CACHE_SIZE = 64
# The backend measures its levers on the shapes of outputs this short side gives in these aspect ratios (height,
# width): the service's smallest images, square, landscape and portrait, as users send them.
CALIBRATION_RESOLUTION = 256
CALIBRATION_ASPECTS = ((1, 1), (3, 4), (9, 16), (4, 3))

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: fp16 on CUDA, bf16 on CPUs that compute it natively (AVX512_BF16 or AMX), fp32 elsewhere."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {list(PRECISION_CHOICES)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if precision != "auto":
        if precision == "bf16" and device.type == "cpu" and not has_native_bf16():
            log.warning("bf16 on a CPU without native bf16 (no AVX512_BF16 or AMX): a bf16 matrix product runs %.0fx "
                        "slower than fp32 here (measured now); precision auto or fp32 is faster",
                        slowdown_of_emulated_bf16())
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if device.type == "cpu" and has_native_bf16() else "fp32"


def control_scales(strength: float, soft: bool, count: int = 13) -> list[float]:
    """Soft weights (the reference's guess mode; control_mode prompt and control) weaken the shallow residuals:
    strength * 0.825^(12 - i)."""
    if soft:
        return [strength * GUESS_MODE_DECAY ** float(count - 1 - i) for i in range(count)]
    return [strength] * count


@dataclass(frozen=True)
class Prepared:
    """One request after preprocessing: seed resolved, image resized, edges detected (or the client's map)."""
    params: GenerationParams
    image: np.ndarray | None  # (H, W, 3) uint8, resized; None when only a control map was sent
    edge_map: np.ndarray  # (H, W) or (H, W, 3) uint8: exactly what conditions the model (white edges for canny)
    init_image: np.ndarray | None = None  # (H, W, 3) uint8, img2img's start, resized to the output
    context_chunks: int = 1  # 77-token chunks of the text context (long_prompt), equal for prompt and negative
    warnings: tuple[str, ...] = ()

    @property
    def seeds(self) -> list[int]:
        return [self.params.seed + i for i in range(self.params.num_samples)]

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one sampler batch (strength, scale, eta, seeds may differ)."""
        p = self.params
        img2img = p.denoising_strength if self.init_image is not None else None
        return (self.edge_map.shape[:2], p.ddim_steps, p.sampler, p.karras, img2img, p.effective_control_mode,
                p.guidance_start, p.guidance_end, p.scale == 1.0, self.context_chunks)


@dataclass
class BatchResult:
    images: list[list[np.ndarray]]  # per request, its samples as (H, W, 3) uint8
    seconds: dict[str, float] = field(default_factory=dict)  # per phase: text, sampling, decoding
    steps: int = 0  # sampler steps visited
    control_fidelity: list[list[float]] = field(default_factory=list)  # per request, per sample


@dataclass
class Sampling:
    """One sampler batch in flight, advanced by `ControlNetCannyPipeline.step`: one batched model evaluation per
    call, then each request's own sampler step on its rows (requests differ in eta, say)."""
    batch: list[Prepared]
    plans: list[samplers.Plan]  # per request
    states: list[samplers.State]  # per request
    noise: list[torch.Tensor]  # per request, on the device: (1 + plan.noise_draws, samples, C, h, w), x_T first
    eps: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]  # (x, t, run the ControlNet) -> guided eps
    control_steps: list[bool]  # per step: whether the ControlNet acts (guidance_start / guidance_end)
    seconds: dict[str, float]
    started: float  # perf_counter at the start of sampling
    done: int = 0

    @property
    def total(self) -> int:
        return self.plans[0].steps


def _hint_planes(control_map: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) uint8: a grey map repeated on the three channels the hint encoder takes."""
    planes = control_map[None] if control_map.ndim == 2 else control_map.transpose(2, 0, 1)
    return np.ascontiguousarray(np.broadcast_to(planes, (3, *control_map.shape[:2]))[None])


def control_steps(total: int, start: float, end: float) -> list[bool]:
    """diffusers' control_guidance_start/end: step i (of `total`, in sampling order) runs the ControlNet unless
    i / total < start or (i + 1) / total > end."""
    return [not (i / total < start or (i + 1) / total > end) for i in range(total)]


class ControlNetCannyPipeline:
    def __init__(self, model: ControlLDM, config: ModelConfig, device: torch.device, dtype: torch.dtype,
                 backend_options: BackendOptions = BackendOptions()):
        """Takes ownership of `model` (loaded, on `device`): the device's backend may swap its layers for faster
        twins that compute the same thing (see `backends`)."""
        self.model = model.eval()
        self.config = config
        self.device = device
        self.dtype = dtype
        self.alphas_cumprod = ddim.alphas_cumprod(
            config.schedule.linear_start, config.schedule.linear_end, config.schedule.timesteps
        )
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.checkpoints: list[Path] = []  # `load` sets them: img2img reads the VAE encoder from them when needed
        self._encoder: VAEEncoder | None = None
        self.backend: Backend = select(device, dtype, backend_options)
        factor = config.latent_factor
        latent_sizes = [(h // factor, w // factor)
                        for h, w in (output_size(ah, aw, CALIBRATION_RESOLUTION) for ah, aw in CALIBRATION_ASPECTS)]
        self.backend.prepare(self.model, self._probe, latent_sizes, hashlib.sha256(repr(config).encode()).hexdigest()[:16])
        log.info("backend %s", self.backend.summary())

    @property
    def precision(self) -> str:
        return next(name for name, dtype in PRECISIONS.items() if dtype == self.dtype)

    @classmethod
    def load(
        cls,
        checkpoints: Sequence[str | Path],
        config: str | Path = CONFIG_DIR / "cldm_v15.yaml",
        device: str | torch.device | None = None,
        precision: str = "auto",
        backend_options: BackendOptions = BackendOptions(),
    ) -> ControlNetCannyPipeline:
        device = torch.device(device) if device is not None else default_device()
        dtype = PRECISIONS[resolve_precision(precision, device)]
        cfg = load_config(config)
        with torch.device("meta"):
            model = ControlLDM(cfg)
        load_weights(model, list(checkpoints), device, dtype)
        pipeline = cls(model, cfg, device, dtype, backend_options)
        pipeline.checkpoints = [Path(c) for c in checkpoints]
        return pipeline

    def _probe(self, latent_size: tuple[int, int]) -> None:
        """The text encoder and one guided step of a one-sample request at this latent size, as `generate` runs
        them (the backend watches it to see the shapes each layer gets)."""
        height, width = latent_size
        context = self.model.cond_stage_model([""])
        hint_features = torch.zeros(1, self.config.unet.model_channels, height, width, device=self.device,
                                    dtype=self.dtype)
        scales = torch.ones(1, 13, device=self.device, dtype=self.dtype)
        guidance = torch.ones(1, 1, 1, 1, device=self.device)
        eps = self._guided_eps(context, context, hint_features, scales, guidance, "balanced", False)
        latents = torch.zeros(1, self.config.unet.in_channels, height, width, device=self.device)
        eps(latents, torch.ones(1, dtype=torch.long, device=self.device), True)

    def prepare(self, image: np.ndarray | None, params: GenerationParams, control_image: np.ndarray | None = None,
                init_image: np.ndarray | None = None) -> Prepared:
        """Resolves the seed and brings every image to the output size. That size is the reference's (from
        image_resolution and the aspect ratio of `image`, else of `control_image`) or width x height; an image
        of another aspect ratio reaches it by params.resize_mode. `control_image` replaces the canny map."""
        params = params.with_resolved_seed()
        if image is not None and control_image is not None and control_image.shape[:2] != image.shape[:2]:
            raise ParamError("control_image", f"is {control_image.shape[1]}x{control_image.shape[0]}; it must be "
                                              f"sized like image ({image.shape[1]}x{image.shape[0]})")
        source = image if image is not None else control_image
        if params.width:
            height, width = params.height, params.width
        else:
            height, width = output_size(*source.shape[:2], params.image_resolution)
            if max(height, width) > MAX_ASPECT * params.image_resolution:
                raise ParamError("image", f"aspect ratio {source.shape[1]}:{source.shape[0]} is beyond {MAX_ASPECT}:1")
        mode = params.resize_mode
        resized = edges = None
        if image is not None and params.width:
            resized, edges = fitted_edges(image, height, width, mode, params.low_threshold, params.high_threshold)
        elif image is not None:  # the reference's own resize: its aspect ratio differs by the rounding to 64 only
            resized = resize_image(image, params.image_resolution)
            edges = canny(resized, params.low_threshold, params.high_threshold)
        if control_image is not None:
            edges = fit(control_image, height, width, mode if params.width else "just_resize", is_map=True)
        init = fit(init_image, height, width, mode) if init_image is not None else None
        self._check_plan(params, init is not None)
        return Prepared(params, resized, edges, init, *self._prompt_length(params))

    def _check_plan(self, params: GenerationParams, img2img: bool) -> None:
        """Steps a sampler cannot take (dpmpp_2m beyond 999), or an img2img strength that keeps no step, are the
        client's mistakes: refused here, naming the field, rather than failing the sampler batch."""
        checks = [("ddim_steps", 1.0)] + ([("denoising_strength", params.denoising_strength)] if img2img else [])
        for field, strength in checks:
            try:
                samplers.plan(params.sampler, params.ddim_steps, self.alphas_cumprod, karras=params.karras,
                              denoising_strength=strength)
            except ValueError as err:
                raise ParamError(field, str(err)) from None

    def _prompt_length(self, params: GenerationParams) -> tuple[int, tuple[str, ...]]:
        """The context's 77-token chunks (long_prompt: as many as the longer of prompt and negative need), and a
        warning for each prompt cut at 75 tokens (without long_prompt, the reference's truncation)."""
        length = self.model.cond_stage_model.context_length
        texts = {"prompt": params.prompt + ", " + params.a_prompt, "n_prompt": params.n_prompt}
        if params.long_prompt:
            return max(len(chunk_ids(text, length)) for text in texts.values()), ()
        return 1, tuple(
            f"{name}: {token_count(text)} tokens{' with a_prompt' if name == 'prompt' else ''}; the text model read "
            f"the first {length - 2} and the rest was cut (long_prompt=true reads them all)"
            for name, text in texts.items() if is_truncated(text, length)
        )

    @torch.inference_mode()
    def encode_text(self, prompt: str, chunked: bool = False) -> torch.Tensor:
        """(1, 77, width) context, or (1, 77 k, width) for a long prompt `chunked`; an LRU cache spares
        re-encoding repeated prompts (the default negative)."""
        text_model = self.model.cond_stage_model
        chunked = chunked and is_truncated(prompt, text_model.context_length)  # one chunk is the plain context
        key = ("chunked", prompt) if chunked else prompt
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        context = text_model.encode_chunked(prompt) if chunked else text_model([prompt])
        self._text_cache[key] = context
        if len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return context

    def generate(self, batch: Sequence[Prepared], callback: StepCallback | None = None) -> BatchResult:
        """Samples every request of `batch` (equal `batch_key`s) in one sampler batch: start, step, finish."""
        sampling = self.start(batch)
        while sampling.done < sampling.total:
            self.step(sampling)
            if callback is not None:
                self.backend.synchronize()  # a progress event means that step has run, not that it was queued
                callback(sampling.done, sampling.total)
        return self.finish(sampling)

    @torch.inference_mode()
    def start(self, batch: Sequence[Prepared]) -> Sampling:
        """Text contexts, control features, and every noise draw of the batch, before the first step.

        Sample i of a request with seed s has its own CPU generator seeded s + i, which draws, in this order,
        img2img's latent sample, x_T, then each step's noise: a sample is the same alone or batched, on CPU or
        CUDA. All of it is copied to the device at once (no copy, and no sync, per step).
        """
        if len({p.batch_key for p in batch}) != 1:
            raise ValueError("requests in one batch must share image size, sampler, steps, control mode and "
                             "window, scale == 1, img2img strength and prompt length")
        first = batch[0].params
        height, width = batch[0].edge_map.shape[:2]
        factor = self.config.latent_factor
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        counts = [p.params.num_samples for p in batch]

        def per_sample(values: list) -> list:
            return [v for v, n in zip(values, counts) for _ in range(n)]

        def rows(tensors: list[torch.Tensor]) -> torch.Tensor:  # one row per request to one per sample
            return torch.cat([t.expand(n, *t.shape[1:]) for t, n in zip(tensors, counts)])

        cond, uncond = (rows(list(half)) for half in zip(*(self._contexts(p.params) for p in batch)))
        self.backend.synchronize()
        seconds["text"] = time.perf_counter() - started

        started = time.perf_counter()
        hints = torch.cat([torch.from_numpy(_hint_planes(p.edge_map)) for p in batch])
        hint_features = rows(list(self.model.control_model.encode_hint(
            hints.to(self.device, torch.float32).div(255.0).to(self.dtype)).split(1)))
        mode = first.effective_control_mode
        scales = torch.tensor(per_sample([control_scales(p.params.strength, mode != "balanced") for p in batch]),
                              dtype=self.dtype).to(self.device)
        guidance = torch.tensor(per_sample([p.params.scale for p in batch]))[:, None, None, None].to(self.device)
        img2img = batch[0].init_image is not None
        plans = [samplers.plan(
            first.sampler, first.ddim_steps, self.alphas_cumprod, karras=first.karras,
            eta=p.params.eta if first.sampler == "ddim" else 0.0,  # eta is DDIM's; the others ignore it
            denoising_strength=first.denoising_strength if img2img else 1.0,
        ) for p in batch]
        generators = [[torch.Generator("cpu").manual_seed(s) for s in p.seeds] for p in batch]
        init_latents = self._init_latents(batch, generators) if img2img else [None] * len(batch)
        shape = (1, self.config.unet.in_channels, height // factor, width // factor)
        draws = [torch.stack([torch.cat([torch.randn(shape, generator=g) for g in request_generators])
                              for _ in range(1 + plan.noise_draws)])
                 for plan, request_generators in zip(plans, generators)]
        on_device = self.backend.to_device(torch.cat([d.flatten() for d in draws])).split([d.numel() for d in draws])
        noise = [flat.view(d.shape) for flat, d in zip(on_device, draws)]
        states = [samplers.start(plan, n[0], init) for plan, n, init in zip(plans, noise, init_latents)]
        eps = self._guided_eps(cond, uncond, hint_features, scales, guidance, mode, first.scale == 1.0)
        return Sampling(list(batch), plans, states, noise, eps,
                        control_steps(plans[0].steps, first.guidance_start, first.guidance_end), seconds, started)

    @torch.inference_mode()
    def step(self, sampling: Sampling) -> None:
        """One step: one batched, guided model evaluation (the ControlNet only inside its window), then each
        request's sampler step on its rows."""
        inputs = [samplers.model_input(plan, state) for plan, state in zip(sampling.plans, sampling.states)]
        e = sampling.eps(torch.cat([x for x, _ in inputs]), torch.cat([t for _, t in inputs]),
                         sampling.control_steps[sampling.done])
        rows = e.split([p.params.num_samples for p in sampling.batch])
        sampling.states = [
            samplers.step(plan, state, request_eps, noise[1 + sampling.done] if plan.noise_draws else None)
            for plan, state, request_eps, noise in zip(sampling.plans, sampling.states, rows, sampling.noise)
        ]
        sampling.done += 1

    @torch.inference_mode()
    def finish(self, sampling: Sampling) -> BatchResult:
        """Decodes the latents and scores each sample's edges against its control map."""
        self.backend.synchronize()
        seconds = dict(sampling.seconds, sampling=time.perf_counter() - sampling.started)
        started = time.perf_counter()
        latents = torch.cat([samplers.result(plan, state) for plan, state in zip(sampling.plans, sampling.states)])
        step = self.backend.decode_batch
        decoded = [image for i in range(0, len(latents), step) for image in self._decode(latents[i:i + step])]
        seconds["decoding"] = time.perf_counter() - started  # no sync needed: decoding ends in a copy to the host
        images, fidelity, offset = [], [], 0
        for p in sampling.batch:
            samples = decoded[offset:offset + p.params.num_samples]
            images.append(samples)
            edges = p.edge_map if p.edge_map.ndim == 2 else p.edge_map.max(axis=2)  # an RGB map: edges in any channel
            fidelity.append([control_fidelity(image, edges, p.params.low_threshold, p.params.high_threshold)
                             for image in samples])
            offset += p.params.num_samples
        return BatchResult(images, seconds, sampling.total, fidelity)

    def _contexts(self, params: GenerationParams) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditional (prompt, a_prompt) and unconditional (n_prompt) contexts of one request, of equal length."""
        long = params.long_prompt
        cond = self.encode_text(params.prompt + ", " + params.a_prompt, long)
        uncond = self.encode_text(params.n_prompt, long)
        return match_lengths(cond, uncond, self.encode_text("")) if long else (cond, uncond)

    def _init_latents(self, batch: Sequence[Prepared], generators: list[list[torch.Generator]]) -> list[torch.Tensor]:
        """img2img's start, per request: each sample's own draw from the VAE posterior of the request's init image
        (as diffusers' StableDiffusionControlNetImg2ImgPipeline does with one generator per image)."""
        encoder = self._vae_encoder()
        return [encoder.encode(to_unit_range(p.init_image), request_generators).to(self.device)
                for p, request_generators in zip(batch, generators)]

    def _vae_encoder(self) -> VAEEncoder:
        """Loaded when the first img2img request needs it (text-to-image never does)."""
        if self._encoder is None:
            self._encoder = load_encoder(self.config, self.checkpoints, self.device, self.dtype)
        return self._encoder

    def _guided_eps(self, cond, uncond, hint_features, scales, guidance, control_mode: str, conditional_only: bool):
        """eps = e_uncond + scale (e_cond - e_uncond), both halves in one batched forward.

        control_mode (sd-webui-controlnet's, README): balanced and prompt run the ControlNet on both halves;
        control (the reference's guess mode) on the conditional half only: the unconditional half's residuals
        are zeros, which add nothing. Outside guidance_start/end the ControlNet does not run at all.
        """
        unet, control_model = self.model.model.diffusion_model, self.model.control_model

        def scaled_control(x, t, context):
            residuals = control_model(x, hint_features, t, context)
            # a residual has one row per sample, or one per sample and guidance half (unet.widen): same scales
            return [r * widen(scales, r.shape[0])[:, i, None, None, None] for i, r in enumerate(residuals)]

        def eps(x: torch.Tensor, t: torch.Tensor, with_control: bool) -> torch.Tensor:
            x = x.to(self.dtype)
            if conditional_only:
                return unet(x, t, cond, scaled_control(x, t, cond) if with_control else None).float()
            context = torch.cat([cond, uncond])
            if not with_control:
                control = None
            elif control_mode == "control":
                control = [torch.cat([r, torch.zeros_like(r)]) for r in scaled_control(x, t, cond)]
            else:
                control = scaled_control(x, t, context)
            # Both halves share x and t: the networks compute the rows before the first cross-attention once.
            e_cond, e_uncond = unet(x, t, context, control).float().chunk(2)
            return e_uncond + guidance * (e_cond - e_uncond)

        return eps

    def _decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Latents to (H, W, 3) uint8 images: x * 127.5 + 127.5, clipped and truncated (no rounding) as the
        reference; quantised on the device, so one uint8 copy leaves it."""
        x = self.model.first_stage_model.decode(latents.to(self.dtype)).float()
        pixels = (x.permute(0, 2, 3, 1) * 127.5 + 127.5).clamp_(0, 255).to(torch.uint8)
        return list(pixels.cpu().numpy())
