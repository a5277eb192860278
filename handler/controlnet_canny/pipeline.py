"""Image + prompt to images: canny, CLIP text encoding, DDIM with classifier-free guidance, VAE decoding.

Framework-free (no TorchServe import): the handler, `scripts/generate.py`, the tests and the benchmark all
drive this class.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import ddim, samplers
from .adapters import AdapterFile, AdapterStore, Readers
from .adapter_files import AdapterError
from .backends import Applicable, Backend, BackendOptions, select
from .backends.cpu import has_native_bf16, slowdown_of_emulated_bf16
from .checkpoint import load_weights
from .embeddings import read_embedding
from .config import CONFIG_DIR, ModelConfig, load_config
from .model import ControlLDM
from .ddim import StepCallback
from .fidelity import control_fidelity
from .lora import LoRAPatch, lora_targets, read_lora
from .params import GenerationParams, ParamError
from .preprocess import MAX_ASPECT, canny, fit, fitted_edges, output_size, resize_image
from .previews import latent_rgb, preview_grid
from .taesd import read_taesd
from .text_encoder import EmbeddingIndex, embeddings_used, is_truncated, match_lengths, token_count
from .token_merging import TokenMerging
from .unet import widen
from .vae import VAEEncoder, load_encoder, to_unit_range

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = ("auto", *PRECISIONS)
GUESS_MODE_DECAY = 0.825
TEXT_CACHE_SIZE = 64
LORA_PATCH_CACHE_SIZE = 4  # LoRA combinations kept ready in the serving dtype (least recently used dropped first)
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
class RequestAdapters:
    """The adapters of one request, resolved in the store when it was prepared (a file changed later does not
    change a request in flight)."""
    loras: tuple[tuple[object, float, AdapterFile], ...] = ()  # (lora.LoRA, weight, its file)
    embeddings: EmbeddingIndex | None = None  # every usable embedding of the store, by name
    used_embeddings: tuple[AdapterFile, ...] = ()  # those the request's prompts use
    taesd: object = None  # taesd.TinyAutoencoder when vae=taesd
    taesd_files: tuple[AdapterFile, ...] = ()

    def lora_key(self, part: str) -> tuple:
        """What identifies the LoRAs acting on `part` (unet | text): equal keys, equal weights there."""
        return tuple((info.sha256, weight) for lora, weight, info in self.loras
                     if getattr(lora, f"touches_{'unet' if part == 'unet' else 'text_encoder'}"))

    def record(self) -> dict:
        """What a result reports of them: each file by name and sha256, so that it can be reproduced."""
        return {
            "loras": [{"name": info.name, "weight": weight, "sha256": info.sha256} for _, weight, info in self.loras],
            "embeddings": [{"name": info.name, "sha256": info.sha256} for info in self.used_embeddings],
            "taesd": [{"file": info.file, "sha256": info.sha256} for info in self.taesd_files],
        }


NO_ADAPTERS = RequestAdapters()


@dataclass(frozen=True)
class Prepared:
    """One request after preprocessing: seed resolved, image resized, edges detected (or the client's map)."""
    params: GenerationParams
    image: np.ndarray | None  # (H, W, 3) uint8, resized; None when only a control map was sent
    edge_map: np.ndarray  # (H, W) or (H, W, 3) uint8: exactly what conditions the model (white edges for canny)
    init_image: np.ndarray | None = None  # (H, W, 3) uint8, img2img's start, resized to the output
    warnings: tuple[str, ...] = ()
    adapters: RequestAdapters = NO_ADAPTERS

    @property
    def seeds(self) -> list[int]:
        return [self.params.seed + i for i in range(self.params.num_samples)]


@dataclass
class Finished:
    """One request's result: its samples as (H, W, 3) uint8, each sample's control fidelity, the steps run, and
    the seconds of each phase (text, sampling, decoding)."""
    images: list[np.ndarray]
    control_fidelity: list[float]
    steps: int
    seconds: dict[str, float]


@dataclass(frozen=True)
class Conditioning:
    """What a guided model evaluation needs besides x and t, one row per sample."""
    cond: torch.Tensor  # (samples, tokens, width) prompt + a_prompt
    uncond: torch.Tensor  # (samples, tokens, width) n_prompt
    hint_features: torch.Tensor  # (samples, channels, h, w) the hint encoder's output
    scales: torch.Tensor  # (samples, 13) ControlNet residual scales
    guidance: torch.Tensor  # (samples, 1, 1, 1) float32 guidance scale
    control_mode: str  # balanced | prompt | control (effective_control_mode)

    @staticmethod
    def rows(parts: Sequence[Conditioning]) -> Conditioning:
        """The conditioning of requests evaluated together (equal control_mode), in order; a request evaluated
        alone keeps its own tensors (no copy per step)."""
        if len(parts) == 1:
            return parts[0]
        return Conditioning(*(torch.cat([getattr(p, name) for p in parts])
                              for name in ("cond", "uncond", "hint_features", "scales", "guidance")),
                            parts[0].control_mode)


@dataclass
class Sampling:
    """One request in flight: its sampler's plan and state, its noise and conditioning. `step` advances any
    number of them by one step each, sharing model evaluations wherever `forward_key`s are equal."""
    prepared: Prepared
    plan: samplers.Plan
    state: samplers.State
    noise: torch.Tensor  # on the device: (1 + plan.noise_draws, samples, C, h, w), x_T first
    conditioning: Conditioning
    control_steps: list[bool]  # per step: whether the ControlNet acts (guidance_start / guidance_end)
    guided_steps: list[bool]  # per step: whether the unconditional half runs (scale != 1, guidance_interval)
    seconds: dict[str, float]
    started: float  # perf_counter at the start of sampling
    preview_every: int = 0  # keep the data prediction of every n-th step for `ControlNetCannyPipeline.preview`
    preview_latents: torch.Tensor | None = None  # that prediction, until a preview takes it
    done: int = 0
    # token_merging_ratio > 0: per sample, the CPU generator (seed + i) of its token merging's places, apart from
    # the noise's generator so that the noise's draws stay as documented
    merging_generators: list[torch.Generator] | None = None
    unet_loras: Applicable | None = None  # the request's LoRAs on the UNet, applied to the evaluations it joins

    @property
    def total(self) -> int:
        return self.plan.steps

    @property
    def finished(self) -> bool:
        return self.done == self.total

    @property
    def samples(self) -> int:
        return self.prepared.params.num_samples

    @property
    def forward_key(self) -> tuple:
        """Requests with equal keys share the next model evaluation whatever their step, sampler, seeds, scales or
        prompts: each row has its own x, t and conditioning."""
        c, guided = self.conditioning, self.guided_steps[self.done]
        return (tuple(self.noise.shape[-2:]), c.cond.shape[1], guided, c.control_mode == "control" and guided,
                self.control_steps[self.done], self.prepared.params.token_merging_ratio,
                self.prepared.adapters.lora_key("unet"))

    @property
    def preview_due(self) -> bool:
        """Whether the step about to run is one whose data prediction a preview shows (never the last step: the
        result itself follows it)."""
        step = self.done + 1
        return self.preview_every > 0 and step % self.preview_every == 0 and step < self.total

    def token_merging(self) -> TokenMerging | None:
        """This request's token merging at its next model evaluation (None: off). A sample evaluated on its
        conditional half alone (scale 1, a step outside guidance_interval) is tomesd's odd batch: the top-left
        places, nothing drawn."""
        ratio = self.prepared.params.token_merging_ratio
        if not ratio:
            return None
        return TokenMerging(ratio, self.merging_generators if self.guided_steps[self.done] else None)


def _hint_planes(control_map: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) uint8: a grey map repeated on the three channels the hint encoder takes."""
    planes = control_map[None] if control_map.ndim == 2 else control_map.transpose(2, 0, 1)
    return np.ascontiguousarray(np.broadcast_to(planes, (3, *control_map.shape[:2]))[None])


def guided_steps(sigmas: torch.Tensor, scale: float, interval: tuple[float, float] | None) -> list[bool]:
    """Per step (of the noise levels `sigmas` the steps start from): whether classifier-free guidance runs both
    halves. Not at scale 1, where the unconditional half adds nothing; with an interval (low, high], only where
    low < sigma <= high (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval...": the
    guidance weight inside the interval, 1 outside)."""
    if scale == 1.0:
        return [False] * len(sigmas)
    if interval is None:
        return [True] * len(sigmas)
    low, high = interval
    return [low < float(sigma) <= high for sigma in sigmas]


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
        # the layers a LoRA may patch, read before the backend swaps any for its twins
        self.lora_targets = lora_targets(self.model)
        self.adapters: AdapterStore | None = None  # `attach_adapters`
        self._lora_patches: OrderedDict[tuple, Applicable] = OrderedDict()
        self._embedding_index: tuple[int, EmbeddingIndex] | None = None  # (the store's version, its index)
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
        adapters: str | Path | None = None,
    ) -> ControlNetCannyPipeline:
        """`adapters`: the adapter store's directory (`attach_adapters`); None: no adapters."""
        device = torch.device(device) if device is not None else default_device()
        dtype = PRECISIONS[resolve_precision(precision, device)]
        cfg = load_config(config)
        with torch.device("meta"):
            model = ControlLDM(cfg)
        load_weights(model, list(checkpoints), device, dtype)
        pipeline = cls(model, cfg, device, dtype, backend_options)
        pipeline.checkpoints = [Path(c) for c in checkpoints]
        if adapters is not None:
            pipeline.attach_adapters(Path(adapters))
        return pipeline

    def attach_adapters(self, root: Path, max_file_bytes: int = 2**31) -> AdapterStore:
        """The adapter store at `root` (`adapters`), its files checked against this model as they are read."""
        def taesd(files):
            autoencoder = read_taesd(files).to(self.device, self.dtype)
            self.backend.prepare_decoder(autoencoder)
            return autoencoder

        readers = Readers(lora=lambda path: read_lora(path, self.lora_targets, self.config.unet),
                          embedding=lambda path: read_embedding(path, self.config.text.width), taesd=taesd)
        self.adapters = AdapterStore(root, readers, max_file_bytes)
        self.adapters.refresh(force=True)
        return self.adapters

    def _probe(self, latent_size: tuple[int, int]) -> None:
        """The text encoder, one guided step and the decode of a one-sample request at this latent size, as
        `generate` and `finish` run them (the backend watches it to see the shapes each layer gets)."""
        height, width = latent_size
        context = self.model.cond_stage_model([""])
        hint_features = torch.zeros(1, self.config.unet.model_channels, height, width, device=self.device,
                                    dtype=self.dtype)
        scales = torch.ones(1, 13, device=self.device, dtype=self.dtype)
        conditioning = Conditioning(context, context, hint_features, scales, torch.ones(1, 1, 1, 1, device=self.device),
                                    "balanced")
        latents = torch.zeros(1, self.config.unet.in_channels, height, width, device=self.device)
        self._guided_eps(latents, torch.ones(1, dtype=torch.long, device=self.device), conditioning, True, True)
        self.model.first_stage_model.decode(latents.to(self.dtype))

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
        adapters = self._resolve_adapters(params)
        return Prepared(params, resized, edges, init, self._prompt_warnings(params, adapters.embeddings), adapters)

    def _resolve_adapters(self, params: GenerationParams) -> RequestAdapters:
        """The request's LoRAs, the store's embeddings and the TAESD it asks for, from the store as it is now; a
        name the store lacks is the client's mistake (ParamError)."""
        if self.adapters is None:
            if params.loras or params.vae != "full":
                field_name = "loras" if params.loras else "vae"
                raise ParamError(field_name, "this server has no adapter store (handler.adapters)")
            return NO_ADAPTERS
        store = self.adapters
        store.refresh()
        loras = tuple((lora, weight, info) for name, weight in params.loras
                      for lora, info in [store.lora(name)])
        known = store.embeddings()
        if self._embedding_index is None or self._embedding_index[0] != store.version:
            self._embedding_index = (store.version, EmbeddingIndex({name: e for name, (e, _) in known.items()}))
        embeddings = self._embedding_index[1]
        used = dict.fromkeys(name for text in (params.prompt, params.a_prompt, params.n_prompt)
                             for name in embeddings_used(text, embeddings))
        taesd, taesd_files = None, ()
        if params.vae == "taesd":
            try:
                found = store.taesd()
            except AdapterError as err:
                raise ParamError("vae", f"the adapter store's TAESD is unusable: {err}") from None
            if found is None:
                raise ParamError("vae", "taesd needs a TAESD in the adapter store (taesd/ is empty)")
            taesd, taesd_files = found[0], tuple(found[1])
        return RequestAdapters(loras, embeddings, tuple(known[name][1] for name in used), taesd, taesd_files)

    def _check_plan(self, params: GenerationParams, img2img: bool) -> None:
        """Steps a sampler cannot take (dpmpp_2m beyond 999), or an img2img strength that keeps no step, are the
        client's mistakes: refused here, naming the field, rather than failing a model evaluation."""
        checks = [("ddim_steps", 1.0)] + ([("denoising_strength", params.denoising_strength)] if img2img else [])
        for field, strength in checks:
            try:
                samplers.plan(params.sampler, params.ddim_steps, self.alphas_cumprod, karras=params.karras,
                              denoising_strength=strength)
            except ValueError as err:
                raise ParamError(field, str(err)) from None

    def _prompt_warnings(self, params: GenerationParams, embeddings: EmbeddingIndex | None) -> tuple[str, ...]:
        """A warning for each prompt cut at 75 tokens (without long_prompt, the reference's truncation)."""
        if params.long_prompt:
            return ()
        length = self.model.cond_stage_model.context_length
        texts = {"prompt": params.prompt + ", " + params.a_prompt, "n_prompt": params.n_prompt}
        return tuple(
            f"{name}: {token_count(text, embeddings)} tokens{' with a_prompt' if name == 'prompt' else ''}; the text "
            f"model read the first {length - 2} and the rest was cut (long_prompt=true reads them all)"
            for name, text in texts.items() if is_truncated(text, length, embeddings)
        )

    @torch.inference_mode()
    def encode_text(self, prompt: str, chunked: bool = False, adapters: RequestAdapters = NO_ADAPTERS) -> torch.Tensor:
        """(1, 77, width) context, or (1, 77 k, width) for a long prompt `chunked`, through the request's
        text-encoder LoRAs and embeddings; an LRU cache spares re-encoding repeated prompts (the default negative)."""
        text_model = self.model.cond_stage_model
        embeddings = adapters.embeddings
        chunked = chunked and is_truncated(prompt, text_model.context_length, embeddings)  # one chunk: the plain context
        used = tuple((info.name, info.sha256) for info in adapters.used_embeddings
                     if info.name in embeddings_used(prompt, embeddings))
        loras = adapters.lora_key("text")
        key = (chunked, prompt, used, loras) if used or loras else (("chunked", prompt) if chunked else prompt)
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        patch = self._lora_patch(adapters, "text")
        with patch.applied(self.model) if patch is not None else nullcontext():
            context = (text_model.encode_chunked(prompt, embeddings) if chunked
                       else text_model([prompt], embeddings))
        self._text_cache[key] = context
        if len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return context

    def generate(self, batch: Sequence[Prepared], callback: StepCallback | None = None) -> list[Finished]:
        """Samples the requests of `batch` together: starts each, steps them all (sharing model evaluations where
        their forward keys allow) until each is done, finishes them. `callback(done, total)` after every step
        of the longest."""
        samplings = [self.start(p) for p in batch]
        total = max(s.total for s in samplings)
        for done in range(1, total + 1):
            for group in self.groups([s for s in samplings if not s.finished]):
                self.step(group)
            if callback is not None:
                self.backend.synchronize()  # a progress event means that step has run, not that it was queued
                callback(done, total)
        finished = self.finish(samplings)
        self.backend.idle()
        return finished

    @torch.inference_mode()
    def start(self, prepared: Prepared, preview_every: int = 0) -> Sampling:
        """Text contexts, control features and every noise draw of one request, before its first step;
        `preview_every` n: every n-th step keeps what `preview` shows.

        Sample i of a request with seed s has its own CPU generator seeded s + i, which draws, in this order,
        img2img's latent sample, x_T, then each step's noise: a sample is the same alone or with others, on CPU
        or CUDA. All of it is copied to the device at once (no copy, and no sync, per step).
        """
        p = prepared.params
        height, width = prepared.edge_map.shape[:2]
        factor = self.config.latent_factor
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        cond, uncond = self._contexts(p, prepared.adapters)
        self.backend.synchronize()
        seconds["text"] = time.perf_counter() - started

        started = time.perf_counter()
        hints = torch.from_numpy(_hint_planes(prepared.edge_map))
        hint_features = self.model.control_model.encode_hint(
            hints.to(self.device, torch.float32).div(255.0).to(self.dtype))
        mode = p.effective_control_mode
        scales = torch.tensor([control_scales(p.strength, mode != "balanced")] * p.num_samples,
                              dtype=self.dtype).to(self.device)
        guidance = torch.full((p.num_samples, 1, 1, 1), p.scale).to(self.device)
        img2img = prepared.init_image is not None
        plan = samplers.plan(
            p.sampler, p.ddim_steps, self.alphas_cumprod, karras=p.karras,
            eta=p.eta if p.sampler == "ddim" else 0.0,  # eta is DDIM's; the others ignore it
            denoising_strength=p.denoising_strength if img2img else 1.0,
        )
        generators = [torch.Generator("cpu").manual_seed(s) for s in prepared.seeds]
        # img2img's start: each sample's own draw from the VAE posterior of the init image (as diffusers'
        # StableDiffusionControlNetImg2ImgPipeline does with one generator per image)
        init_latents = (self._vae_encoder().encode(to_unit_range(prepared.init_image), generators).to(self.device)
                        if img2img else None)
        shape = (1, self.config.unet.in_channels, height // factor, width // factor)
        noise = self.backend.to_device(torch.stack([torch.cat([torch.randn(shape, generator=g) for g in generators])
                                                    for _ in range(1 + plan.noise_draws)]))

        def rows(tensor: torch.Tensor) -> torch.Tensor:  # one row per sample, once, rather than per step
            return tensor.expand(p.num_samples, *tensor.shape[1:]).contiguous()

        conditioning = Conditioning(rows(cond), rows(uncond), rows(hint_features), scales, guidance, mode)
        merging_generators = ([torch.Generator("cpu").manual_seed(s) for s in prepared.seeds]
                              if p.token_merging_ratio else None)
        return Sampling(prepared, plan, samplers.start(plan, noise[0], init_latents), noise, conditioning,
                        control_steps(plan.steps, p.guidance_start, p.guidance_end),
                        guided_steps(plan.sigmas[:-1], p.scale, p.guidance_interval), seconds, started, preview_every,
                        merging_generators=merging_generators, unet_loras=self._lora_patch(prepared.adapters, "unet"))

    def _lora_patch(self, adapters: RequestAdapters, part: str) -> Applicable | None:
        """The request's LoRAs on `part` (unet | text) ready in the serving dtype (on the UNet, applied as the backend
        chooses), shared by the requests of equal LoRAs and weights; None without any."""
        key = (part, adapters.lora_key(part))
        if not key[1]:
            return None
        if key not in self._lora_patches:
            patch = LoRAPatch.build([(lora, weight) for lora, weight, _ in adapters.loras], self.device, self.dtype)
            self._lora_patches[key] = (self.backend.lora_application(patch.unet_only(), self.model) if part == "unet"
                                       else patch.text_encoder_only())
            log.info("LoRAs %s ready for the %s", ", ".join(f"{info.name}:{weight:g}" for _, weight, info in adapters.loras),
                     "UNet" if part == "unet" else "text encoder")
            if len(self._lora_patches) > LORA_PATCH_CACHE_SIZE:
                self._lora_patches.popitem(last=False)
        self._lora_patches.move_to_end(key)
        return self._lora_patches[key]

    @staticmethod
    def groups(samplings: Sequence[Sampling], max_samples: int | None = None) -> list[list[Sampling]]:
        """`samplings` in groups that can share a model evaluation (equal forward_key), each of at most
        `max_samples` samples (a single larger request still makes a group, alone), in arrival order."""
        by_key: dict[tuple, list[list[Sampling]]] = {}
        for sampling in samplings:
            chunks = by_key.setdefault(sampling.forward_key, [[]])
            if chunks[-1] and max_samples is not None and \
                    sum(s.samples for s in chunks[-1]) + sampling.samples > max_samples:
                chunks.append([])
            chunks[-1].append(sampling)
        return [chunk for chunks in by_key.values() for chunk in chunks]

    @torch.inference_mode()
    def step(self, group: Sequence[Sampling]) -> None:
        """One step of every request of `group` (equal forward_key, any step of any sampler): one batched, guided
        model evaluation with each row's own timestep, then each request's sampler step on its rows."""
        if len({s.forward_key for s in group}) != 1:
            raise ValueError("requests evaluated together must share latent size, prompt length, control mode and "
                             "whether guidance and the ControlNet run at their step")
        inputs = [samplers.model_input(s.plan, s.state) for s in group]
        counts = [s.samples for s in group]
        patch = group[0].unet_loras
        with patch.applied(self.model) if patch is not None else nullcontext():
            e = self._guided_eps(torch.cat([x for x, _ in inputs]), torch.cat([t for _, t in inputs]),
                                 Conditioning.rows([s.conditioning for s in group]),
                                 group[0].control_steps[group[0].done], group[0].guided_steps[group[0].done],
                                 TokenMerging.rows([s.token_merging() for s in group]))
        for sampling, request_eps in zip(group, e.split(counts)):
            if sampling.preview_due:
                sampling.preview_latents = samplers.denoised(sampling.plan, sampling.state, request_eps)
            noise = sampling.noise[1 + sampling.done] if samplers.takes_noise(sampling.plan, sampling.state) else None
            sampling.state = samplers.step(sampling.plan, sampling.state, request_eps, noise)
            sampling.done += 1

    @torch.inference_mode()
    def finish(self, samplings: Sequence[Sampling]) -> list[Finished]:
        """Decodes the latents (requests of equal size together, `backend.decode_batch` samples at a time) and
        scores each sample's edges against its control map."""
        self.backend.synchronize()
        ended = time.perf_counter()
        latents = [samplers.result(s.plan, s.state) for s in samplings]
        by_decoder: dict[tuple, list[int]] = {}  # requests of equal size and decoder decode together
        for index, (latent, sampling) in enumerate(zip(latents, samplings)):
            taesd = sampling.prepared.adapters.taesd
            by_decoder.setdefault((tuple(latent.shape[-2:]), id(taesd)), []).append(index)
        decoded: list[list[np.ndarray]] = [[] for _ in samplings]
        step = self.backend.decode_batch
        for indices in by_decoder.values():
            stacked = torch.cat([latents[i] for i in indices])
            decode = partial(self._decode, taesd=samplings[indices[0]].prepared.adapters.taesd)
            images = [image for j in range(0, len(stacked), step) for image in decode(stacked[j:j + step])]
            for i in indices:
                decoded[i], images = images[:samplings[i].samples], images[samplings[i].samples:]
        decoding = time.perf_counter() - ended  # no sync needed: decoding ends in a copy to the host
        results = []
        for sampling, images in zip(samplings, decoded):
            p = sampling.prepared
            edges = p.edge_map if p.edge_map.ndim == 2 else p.edge_map.max(axis=2)  # an RGB map: edges in any channel
            fidelity = [control_fidelity(image, edges, p.params.low_threshold, p.params.high_threshold)
                        for image in images]
            seconds = dict(sampling.seconds, sampling=ended - sampling.started, decoding=decoding)
            results.append(Finished(images, fidelity, sampling.total, seconds))
        return results

    def _contexts(self, params: GenerationParams, adapters: RequestAdapters) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditional (prompt, a_prompt) and unconditional (n_prompt) contexts of one request, of equal length."""
        long = params.long_prompt
        cond = self.encode_text(params.prompt + ", " + params.a_prompt, long, adapters)
        uncond = self.encode_text(params.n_prompt, long, adapters)
        return match_lengths(cond, uncond, self.encode_text("")) if long else (cond, uncond)

    def _vae_encoder(self) -> VAEEncoder:
        """Loaded when the first img2img request needs it (text-to-image never does)."""
        if self._encoder is None:
            self._encoder = load_encoder(self.config, self.checkpoints, self.device, self.dtype)
        return self._encoder

    def preview(self, sampling: Sampling) -> np.ndarray | None:
        """(H, W, 3) uint8: the samples' data prediction at the last step that kept one (`Sampling.preview_due`),
        side by side, through the adapter store's TAESD when it has one, else SD 1.5's latent-to-RGB factors; None
        when no step has kept one since the last call."""
        latents, sampling.preview_latents = sampling.preview_latents, None
        if latents is None:
            return None
        taesd = self._store_taesd()
        return preview_grid(latent_rgb(latents) if taesd is None else self._decode(latents, taesd))

    def _store_taesd(self):
        """The adapter store's TAESD, None without a usable one."""
        try:
            found = self.adapters.taesd() if self.adapters is not None else None
        except AdapterError:
            return None
        return None if found is None else found[0]

    def _guided_eps(self, x: torch.Tensor, t: torch.Tensor, c: Conditioning, with_control: bool,
                    guided: bool, token_merging: TokenMerging | None = None) -> torch.Tensor:
        """eps = e_uncond + scale (e_cond - e_uncond), both halves in one batched forward; e_cond alone where the
        step is not `guided` (scale 1, or outside guidance_interval).

        control_mode (sd-webui-controlnet's, README): balanced and prompt run the ControlNet on both halves;
        control (the reference's guess mode) on the conditional half only: the unconditional half's residuals
        are zeros, which add nothing. Outside guidance_start/end the ControlNet does not run at all.
        """
        unet, control_model = self.model.model.diffusion_model, self.model.control_model
        x = x.to(self.dtype)

        def scaled_control(context):
            residuals = control_model(x, c.hint_features, t, context)
            # a residual has one row per sample, or one per sample and guidance half (unet.widen): same scales
            return [r * widen(c.scales, r.shape[0])[:, i, None, None, None] for i, r in enumerate(residuals)]

        if not guided:
            return unet(x, t, c.cond, scaled_control(c.cond) if with_control else None, token_merging).float()
        context = torch.cat([c.cond, c.uncond])
        if not with_control:
            control = None
        elif c.control_mode == "control":
            control = [torch.cat([r, torch.zeros_like(r)]) for r in scaled_control(c.cond)]
        else:
            control = scaled_control(context)
        # Both halves share x and t: the networks compute the rows before the first cross-attention once.
        e_cond, e_uncond = unet(x, t, context, control, token_merging).float().chunk(2)
        return e_uncond + c.guidance * (e_cond - e_uncond)

    def _decode(self, latents: torch.Tensor, taesd=None) -> list[np.ndarray]:
        """Latents to (H, W, 3) uint8 images: x * 127.5 + 127.5, clipped and truncated (no rounding) as the
        reference; quantised on the device, so one uint8 copy leaves it. `taesd`: through that tiny autoencoder
        (its [0, 1] output mapped to [-1, 1] first, as diffusers' AutoencoderTiny gives it), not the model's VAE."""
        if taesd is None:
            x = self.model.first_stage_model.decode(latents.to(self.dtype)).float()
        else:
            x = taesd.decode(latents.to(self.dtype)).float() * 2.0 - 1.0
        pixels = (x.permute(0, 2, 3, 1) * 127.5 + 127.5).clamp_(0, 255).to(torch.uint8)
        return list(pixels.cpu().numpy())
