"""Generation parameters: the reference demo's defaults and ranges, parsing with errors that name the field."""
from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .config import reject_unknown_keys
from .samplers import KARRAS_SAMPLERS, SAMPLERS
from .token_merging import MAX_RATIO as MAX_MERGING_RATIO

DEFAULT_A_PROMPT = "best quality, extremely detailed"
DEFAULT_N_PROMPT = (
    "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, worst quality, low quality"
)
MAX_SEED = 2**31 - 1
CONTROL_MODES = ("balanced", "prompt", "control")
VAES = ("full", "taesd")
# AUTOMATIC1111's extra-network syntax for a LoRA in the prompt: <lora:name> or <lora:name:weight>
LORA_TAG = re.compile(r"<lora:([^:<>]*)(?::([^<>]*))?>")
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ ()+-]{0,127}")
RESIZE_MODES = ("crop_and_resize", "just_resize", "resize_and_fill")


class ParamError(ValueError):
    """A client mistake in one field; `field` names it, the message says the allowed values."""
    status = 400  # the HTTP status it gets when served

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    a_prompt: str = DEFAULT_A_PROMPT
    n_prompt: str = DEFAULT_N_PROMPT
    num_samples: int = 1
    image_resolution: int = 512
    ddim_steps: int = 20
    guess_mode: bool = False
    strength: float = 1.0
    scale: float = 9.0
    seed: int = -1
    eta: float = 0.0
    low_threshold: int = 100
    high_threshold: int = 200
    sampler: str = "ddim"
    karras: bool = False
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "balanced"
    resize_mode: str = "crop_and_resize"
    width: int = 0  # 0 with height 0: the reference's size, from image_resolution and the image's aspect ratio
    height: int = 0
    denoising_strength: float = 0.75
    long_prompt: bool = False
    # (low, high] in sigma: the unconditional pass runs only at steps whose sigma lies inside; None: at every step
    guidance_interval: tuple[float, float] | None = None
    token_merging_ratio: float = 0.0  # tomesd's ratio (controlnet_canny.token_merging); 0: off
    # LoRAs of the adapter store by name, with their weights: the `loras` field and the prompt's <lora:name:w> tags
    # (taken out of the prompt), in order
    loras: tuple[tuple[str, float], ...] = ()
    vae: str = "full"  # full: the checkpoint's VAE; taesd: the adapter store's tiny autoencoder

    @property
    def effective_control_mode(self) -> str:
        """guess_mode is the reference's name for control_mode=control."""
        return "control" if self.guess_mode else self.control_mode

    def with_resolved_seed(self) -> GenerationParams:
        """seed -1 means random; the resolved seed is what gets reported, so any result can be reproduced."""
        return self if self.seed != -1 else replace(self, seed=secrets.randbelow(MAX_SEED + 1))

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if self.guidance_interval is not None:  # a list: YAML's safe dumper and JSON write no tuples alike
            values["guidance_interval"] = list(self.guidance_interval)
        values["loras"] = [f"{name}:{weight:g}" for name, weight in self.loras]  # as the field takes them
        return values


@dataclass(frozen=True)
class Limits:
    """Allowed ranges; the defaults are the reference demo's. Any of them can be overridden from configuration."""
    prompt_chars: int = 2000
    num_samples: tuple[int, int] = (1, 12)
    image_resolution: tuple[int, int] = (256, 768)
    ddim_steps: tuple[int, int] = (1, 100)
    strength: tuple[float, float] = (0.0, 2.0)
    scale: tuple[float, float] = (0.1, 30.0)
    seed: tuple[int, int] = (-1, MAX_SEED)
    eta: tuple[float, float] = (0.0, 1.0)
    low_threshold: tuple[int, int] = (1, 255)
    high_threshold: tuple[int, int] = (1, 255)
    # The cost of a generation. A wide input at a high image_resolution makes an output of up to 4x a square's
    # area, and attention's cost grows with the square of the area: the output is capped at the area of the
    # largest square image_resolution allows (768 x 768). The sampler's work, latent pixels (output / 64) x
    # samples x DDIM steps, is capped at what the largest square request of the other ranges needs (96 x 96 x 12 x
    # 100); lower it to what the worker's machine does within responseTimeout (docs/serving.md has the figures).
    output_pixels: int = 768 * 768
    work: int = 96 * 96 * 12 * 100
    guidance_start: tuple[float, float] = (0.0, 1.0)
    guidance_end: tuple[float, float] = (0.0, 1.0)
    denoising_strength: tuple[float, float] = (0.0, 1.0)
    token_merging_ratio: tuple[float, float] = (0.0, MAX_MERGING_RATIO)
    lora_weight: tuple[float, float] = (-4.0, 4.0)
    loras: int = 8  # LoRAs per request

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any]) -> Limits:
        reject_unknown_keys(overrides, cls, "limits")
        for name in set(overrides) & set(_SCALAR_LIMITS):
            if isinstance(overrides[name], bool) or not isinstance(overrides[name], int) or overrides[name] < 1:
                raise ValueError(f"limits.{name} must be a positive integer, got {overrides[name]!r}")
        return replace(cls(), **{k: v if k in _SCALAR_LIMITS else tuple(v) for k, v in overrides.items()})


_SCALAR_LIMITS = ("prompt_chars", "output_pixels", "work", "loras")
_TEXT_FIELDS = ("prompt", "a_prompt", "n_prompt")
CHOICES = {"sampler": SAMPLERS, "control_mode": CONTROL_MODES, "resize_mode": RESIZE_MODES, "vae": VAES}
_SIZE_FIELDS = ("width", "height")  # 0 (the reference's size) or within the image_resolution limits
_TYPES = {f.name: f.type for f in fields(GenerationParams)}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def as_int(field: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ParamError(field, f"must be an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ParamError(field, f"must be an integer, got {value!r:.40}")


def _as_float(field: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ParamError(field, "must be a number, got a boolean")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ParamError(field, f"must be a number, got {value!r:.40}") from None
    if not math.isfinite(number):
        raise ParamError(field, f"must be a finite number, got {value!r:.40}")
    return number


def _as_interval(field: str, value: Any) -> tuple[float, float] | None:
    """A JSON list [low, high] or the text "low,high" (null or "none": no interval): 0 <= low < high, finite."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    bounds = value.split(",") if isinstance(value, str) else value
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
        raise ParamError(field, f"must be two numbers low,high (a JSON list or the text \"low,high\"), got {value!r:.40}")
    low, high = (_as_float(field, bound) for bound in bounds)
    if not 0 <= low < high:
        raise ParamError(field, f"must have 0 <= low < high, got low {low}, high {high}")
    return low, high


def _lora_entry(field: str, entry: Any, limits: Limits) -> tuple[str, float]:
    """One LoRA: "name:weight" or "name" (weight 1), as text; a [name, weight] pair in JSON."""
    if isinstance(entry, str):
        name, separator, weight = entry.strip().rpartition(":")
        name, weight = (name, weight) if separator else (weight, 1.0)
    elif isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str):
        name, weight = entry
    else:
        raise ParamError(field, f"entries are \"name:weight\" text or [name, weight] pairs, got {entry!r:.40}")
    name = name.strip()
    if not ADAPTER_NAME.fullmatch(name):
        raise ParamError(field, f"{name[:40]!r} is not an adapter name (a file's stem: letters, digits, space . _ ( ) + -)")
    value = _as_float(field, weight)
    low, high = limits.lora_weight
    if not low <= value <= high:
        raise ParamError(field, f"{name}: the weight must be between {low:g} and {high:g}, got {value:g}")
    return name, value


def _as_loras(field: str, value: Any, limits: Limits) -> tuple[tuple[str, float], ...]:
    """A JSON list of entries, repeated form fields (a list), or one text of entries separated by commas."""
    if isinstance(value, str):
        entries = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        entries = [part for item in value for part in (item.split(",") if isinstance(item, str) else [item])
                   if not isinstance(part, str) or part.strip()]
    else:
        raise ParamError(field, f"must be a list of \"name:weight\" entries, got {type(value).__name__}")
    if len(entries) > limits.loras:
        raise ParamError(field, f"{len(entries)} LoRAs; at most {limits.loras} per request")
    return tuple(_lora_entry(field, entry, limits) for entry in entries)


def _prompt_loras(prompt: str, limits: Limits) -> tuple[str, tuple[tuple[str, float], ...]]:
    """The prompt without its <lora:name:weight> tags (AUTOMATIC1111's syntax), and those LoRAs in order."""
    tags = LORA_TAG.findall(prompt)
    if len(tags) > limits.loras:
        raise ParamError("prompt", f"{len(tags)} <lora:...> tags; at most {limits.loras} per request")
    loras = tuple(_lora_entry("prompt", [name, weight or 1.0], limits) for name, weight in tags)
    return LORA_TAG.sub("", prompt), loras


def as_bool(field: str, value: Any) -> bool:
    """A JSON boolean, or a form value: true/false, 1/0, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ParamError(field, f"must be true or false, got {value!r:.40}")


def _as_text(field: str, value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise ParamError(field, f"must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise ParamError(field, f"is {len(value)} characters long; at most {max_chars} allowed")
    try:  # JSON's "\ud800" escapes decode to lone surrogates, which no UTF-8 output (PNG text, YAML) can hold
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ParamError(field, f"is not valid Unicode: a lone surrogate at character {err.start}") from None
    return value


def parse_params(raw: Mapping[str, Any], limits: Limits = Limits(), resolution_step: int = 64) -> GenerationParams:
    """Builds validated parameters from JSON values or form strings; unknown fields are refused (typos)."""
    unknown = sorted(set(raw) - set(_TYPES))
    if unknown:
        raise ParamError(unknown[0], f"unknown field; known fields: {', '.join(_TYPES)}")
    if "prompt" not in raw:
        raise ParamError("prompt", "is required")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        kind = _TYPES[name]
        if name in _TEXT_FIELDS:
            values[name] = _as_text(name, value, limits.prompt_chars)
            continue
        if name in CHOICES:
            if value not in CHOICES[name]:  # a tuple: JSON may send unhashable values
                raise ParamError(name, f"must be one of {', '.join(CHOICES[name])}, got {str(value)[:40]!r}")
            values[name] = value
            continue
        if name == "guidance_interval":
            values[name] = _as_interval(name, value)
            continue
        if name == "loras":
            values[name] = _as_loras(name, value, limits)
            continue
        parsed = {"int": as_int, "float": _as_float, "bool": as_bool}[kind](name, value)
        if kind != "bool":
            low, high = getattr(limits, "image_resolution" if name in _SIZE_FIELDS else name)
            if name in _SIZE_FIELDS and parsed == 0:
                values[name] = parsed
                continue
            if not low <= parsed <= high:
                raise ParamError(name, f"must be between {low} and {high}, got {parsed}")
        values[name] = parsed
    values["prompt"], tagged = _prompt_loras(values["prompt"], limits)
    for name in ("a_prompt", "n_prompt"):
        if LORA_TAG.search(values.get(name, "")):
            raise ParamError(name, "<lora:...> tags apply from the prompt only")
    values["loras"] = values.get("loras", ()) + tagged
    if len(values["loras"]) > limits.loras:
        raise ParamError("loras", f"{len(values['loras'])} LoRAs with the prompt's tags; at most {limits.loras} per request")
    params = GenerationParams(**values)
    if params.image_resolution % resolution_step:
        raise ParamError("image_resolution", f"must be a multiple of {resolution_step}, got {params.image_resolution}")
    _check_combinations(params, resolution_step)
    return params


def check_cost(params: GenerationParams, height: int, width: int, limits: Limits = Limits()) -> None:
    """Refuses a generation of a height x width output whose cost is over `limits` (output_pixels, work)."""
    if height * width > limits.output_pixels:
        raise ParamError("image_resolution", f"the output would be {width}x{height} = {height * width} pixels; at most "
                         f"{limits.output_pixels} allowed (a lower image_resolution or a less elongated image)")
    work = (height // 8) * (width // 8) * params.num_samples * params.ddim_steps
    if work > limits.work:
        field = "num_samples" if params.num_samples > 1 else "ddim_steps"
        raise ParamError(field, f"{width // 8}x{height // 8} latent pixels x {params.num_samples} samples x "
                         f"{params.ddim_steps} steps = {work}; at most {limits.work} allowed")


def _check_combinations(params: GenerationParams, resolution_step: int) -> None:
    """Fields that are valid alone but not together."""
    for name in _SIZE_FIELDS:
        if getattr(params, name) % resolution_step:
            raise ParamError(name, f"must be a multiple of {resolution_step}, got {getattr(params, name)}")
    if (params.width == 0) != (params.height == 0):
        missing = "height" if params.height == 0 else "width"
        raise ParamError(missing, "width and height go together: give both, or neither for the reference's size")
    if params.guidance_start >= params.guidance_end:
        raise ParamError("guidance_end", f"must be greater than guidance_start ({params.guidance_start}), "
                                         f"got {params.guidance_end}")
    if params.karras and params.sampler not in KARRAS_SAMPLERS:
        raise ParamError("karras", f"applies to the samplers {', '.join(KARRAS_SAMPLERS)}, not to {params.sampler}")
    names = [name for name, _ in params.loras]
    if len(names) > len(set(names)):
        repeated = next(name for name in names if names.count(name) > 1)
        raise ParamError("loras", f"{repeated} is given more than once (the loras field and the prompt's tags together)")
    if params.guess_mode and params.control_mode == "prompt":
        raise ParamError("guess_mode", "is control_mode=control, which contradicts control_mode=prompt")
