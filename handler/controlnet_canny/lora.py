"""LoRA files as AUTOMATIC1111, ComfyUI and diffusers users have them, read onto this model's layers and applied
without changing its weights.

A LoRA adds `scale * up(down(x))` to a layer's output, scale = alpha / rank where the file gives alpha (per layer,
or in the LoraConfig diffusers saves with it), else 1: kohya's, A1111's and diffusers' rule.
Files name layers in one of four layouts (`read_lora`); the UNet's names are diffusers' or the original (LDM)
ones, mapped to ours from the UNet config. Only the UNet and the CLIP text encoder are patched: the tools
users train and use LoRAs with patch neither the ControlNet nor the VAE.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_files import SAFETENSORS_SUFFIXES, AdapterError, read_adapter_file, tensor_dict
from .config import UNetConfig
from .unet import TokenProjection

UNET_PREFIX = "model.diffusion_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
LAYOUTS = ("kohya", "kohya-ldm", "peft", "diffusers-old")
SAVED_CONFIG_KEY = "lora_adapter_metadata"  # diffusers' `save_lora_weights(..., unet_lora_adapter_metadata=...)`
_LISTED = 10

# A ResBlock's layers (ours: the original's) and their diffusers names.
_RESNET_LAYERS = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
                  "skip_connection": "conv_shortcut"}
# The older diffusers attention-processor spelling of a layer, and the layer it means.
_PROCESSOR_LAYERS = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_OLD_TEXT_LAYERS = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


@dataclass(frozen=True)
class Target:
    """A layer a LoRA may patch: its weight's shape, and how it is applied (a TokenProjection is a linear)."""
    weight_shape: tuple[int, ...]
    kind: str  # "linear" | "conv"
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)


def lora_targets(model: nn.Module) -> dict[str, Target]:
    """Every layer of the UNet and the text encoder a LoRA may patch, by module path (the checkpoint key without
    `.weight`). Reads the plain model's layer types: call it before a backend swaps layers for twins."""
    targets: dict[str, Target] = {}
    for prefix in (UNET_PREFIX, TEXT_ENCODER_PREFIX):
        for name, module in model.get_submodule(prefix.rstrip(".")).named_modules(prefix=prefix.rstrip(".")):
            if isinstance(module, (nn.Linear, TokenProjection)):
                targets[name] = Target(tuple(module.weight.shape), "linear")
            elif isinstance(module, nn.Conv2d):
                if module.groups != 1 or module.dilation != (1, 1) or isinstance(module.padding, str):
                    raise ValueError(f"{name}: a LoRA cannot patch a grouped, dilated or 'same'-padded convolution")
                targets[name] = Target(tuple(module.weight.shape), "conv", tuple(module.stride),
                                       tuple(module.padding))
    return targets


def diffusers_unet_blocks(cfg: UNetConfig) -> dict[str, str]:
    """Our UNet's blocks (the original's `input_blocks.4.1`, ...) -> diffusers' UNet2DConditionModel names
    (`down_blocks.1.attentions.0`, ...), laid out as `unet.UNetModel` builds them from `cfg`."""
    blocks = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "input_blocks.0.0": "conv_in", "out.2": "conv_out",
              "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
              "middle_block.2": "mid_block.resnets.1"}
    levels = len(cfg.channel_mult)
    index, ds = 1, 1
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            blocks[f"input_blocks.{index}.0"] = f"down_blocks.{level}.resnets.{j}"
            if ds in cfg.attention_resolutions:
                blocks[f"input_blocks.{index}.1"] = f"down_blocks.{level}.attentions.{j}"
            index += 1
        if level != levels - 1:
            blocks[f"input_blocks.{index}.0"] = f"down_blocks.{level}.downsamplers.0"
            index, ds = index + 1, ds * 2
    index = 0
    for level in reversed(range(levels)):
        up = levels - 1 - level
        for j in range(cfg.num_res_blocks + 1):
            blocks[f"output_blocks.{index}.0"] = f"up_blocks.{up}.resnets.{j}"
            inner = 1
            if ds in cfg.attention_resolutions:
                blocks[f"output_blocks.{index}.1"] = f"up_blocks.{up}.attentions.{j}"
                inner = 2
            if level and j == cfg.num_res_blocks:
                blocks[f"output_blocks.{index}.{inner}"] = f"up_blocks.{up}.upsamplers.0"
                ds //= 2
            index += 1
    return blocks


def _diffusers_unet_name(path: str, blocks: dict[str, str]) -> str:
    parts = path.split(".")
    depth = 3 if parts[0] in ("input_blocks", "output_blocks") else 2
    block, rest = ".".join(parts[:depth]), ".".join(parts[depth:])
    if block not in blocks:
        raise ValueError(f"{UNET_PREFIX}{path}: no diffusers name for block {block}")
    name = blocks[block]
    if ".resnets." in name:
        return f"{name}.{_RESNET_LAYERS[rest]}"
    if "samplers." in name:  # Downsample.op, Upsample.conv
        return f"{name}.conv"
    return f"{name}.{rest}" if rest else name


@dataclass(frozen=True)
class LayerNames:
    """Each target's names in the files' spellings: diffusers' module path (`unet.` / `text_encoder.` prefixed)
    and the original one (the UNet under `model.diffusion_model.`, the text encoder as diffusers')."""
    diffusers: dict[str, str]  # our path -> "unet.down_blocks.0.resnets.0.conv1" / "text_encoder.text_model...."
    original: dict[str, str]  # our path -> "unet.input_blocks.1.0.in_layers.2" / "text_encoder.text_model...."

    @classmethod
    def of(cls, targets: dict[str, Target], unet_config: UNetConfig) -> LayerNames:
        blocks = diffusers_unet_blocks(unet_config)
        diffusers, original = {}, {}
        for path in targets:
            if path.startswith(UNET_PREFIX):
                inner = path.removeprefix(UNET_PREFIX)
                diffusers[path] = "unet." + _diffusers_unet_name(inner, blocks)
                original[path] = "unet." + inner
            else:
                diffusers[path] = original[path] = "text_encoder." + path.removeprefix(TEXT_ENCODER_PREFIX)
        return cls(diffusers, original)

    def kohya(self, path: str, ldm: bool = False) -> str:
        """`lora_unet_down_blocks_0_resnets_0_conv1` (`ldm`: `lora_unet_input_blocks_1_0_in_layers_2`),
        `lora_te_text_model_encoder_layers_0_mlp_fc1`."""
        name = (self.original if ldm else self.diffusers)[path]
        component, inner = name.split(".", 1)
        return ("lora_unet_" if component == "unet" else "lora_te_") + inner.replace(".", "_")


@dataclass(frozen=True)
class LoRALayer:
    """One layer's factors, fp32 on the CPU: `down` shaped as the target's weight with `rank` outputs ((r, in) for
    a linear, (r, in, kh, kw) for a convolution), `up` (out, r); the layer adds scale * up(down(x))."""
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    target: Target

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class LoRA:
    layers: dict[str, LoRALayer]  # our module path -> factors
    layout: str  # one of LAYOUTS

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())

    @property
    def parameters(self) -> int:
        return sum(layer.down.numel() + layer.up.numel() for layer in self.layers.values())

    @property
    def touches_unet(self) -> bool:
        return any(path.startswith(UNET_PREFIX) for path in self.layers)

    @property
    def touches_text_encoder(self) -> bool:
        return any(path.startswith(TEXT_ENCODER_PREFIX) for path in self.layers)


def _listing(items: Sequence[str]) -> str:
    items = sorted(items)
    more = f" ... and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return ", ".join(items[:_LISTED]) + more


def _layout(name: str, keys: Sequence[str]) -> str:
    sdxl = [k for k in keys if k.startswith(("lora_te1_", "lora_te2_"))]
    if sdxl:
        raise AdapterError(f"{name}: an SDXL LoRA (keys {_listing(sdxl)} are for SDXL's two text encoders); "
                           "this model is Stable Diffusion 1.5")
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if any(part in k for k in keys for part in (".lora.down.", "_lora.down.", ".lora_linear_layer.down.")):
        return "diffusers-old"
    raise AdapterError(f"{name}: not a LoRA in a known layout (kohya lora_unet_/lora_te_, diffusers/PEFT lora_A/"
                       f"lora_B, older diffusers lora.down/lora.up); keys: {_listing(keys)}")


def _split_kohya(key: str) -> tuple[str, str] | None:
    module, _, suffix = key.partition(".")
    part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
    return None if part is None else (module, part)


def _split_peft(key: str) -> tuple[str, str] | None:
    for suffix, part in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha")):
        if key.endswith(suffix):
            return key.removesuffix(suffix), part
    return None


def _split_old_diffusers(key: str) -> tuple[str, str] | None:
    for suffix, part in ((".lora.down.weight", "down"), (".lora.up.weight", "up"),
                         (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
                         (".down.weight", "down"), (".up.weight", "up"), (".alpha", "alpha")):
        if key.endswith(suffix):
            module = key.removesuffix(suffix)
            parent, _, last = module.rpartition(".")
            if last in _PROCESSOR_LAYERS:  # the attention processors' spelling
                if parent.startswith("text_encoder."):
                    return f"{parent}.{_OLD_TEXT_LAYERS[last]}", part
                return f"{parent.removesuffix('.processor')}.{_PROCESSOR_LAYERS[last]}", part
            # only that spelling has its factors right under the module
            return None if suffix in (".down.weight", ".up.weight") else (module, part)
    return None


def _module_table(names: LayerNames, layout: str) -> dict[str, tuple[str, str]]:
    """The module names a file of this layout may use -> (our path, the naming: "diffusers" | "ldm")."""
    table: dict[str, tuple[str, str]] = {}
    for path in names.diffusers:
        if layout == "kohya":
            table[names.kohya(path)] = (path, "diffusers")
            table.setdefault(names.kohya(path, ldm=True), (path, "ldm"))
        else:
            name = names.diffusers[path]
            table[name] = (path, "diffusers")
            if name.startswith("text_encoder.text_model."):  # transformers >= 5 saves CLIPTextModel flattened
                table["text_encoder." + name.removeprefix("text_encoder.text_model.")] = (path, "diffusers")
    return table


def _factor(name: str, key: str, tensor: torch.Tensor, expected: tuple[int | None, ...]) -> torch.Tensor:
    """`tensor` as `expected` = (rows, columns, *kernel), None where the file's rank goes; a 1x1 kernel (or a
    linear's none) may be given either way."""
    shape, kernel = tuple(tensor.shape), expected[2:]
    fits = (len(shape) >= 2 and all(e is None or e == s for e, s in zip(expected[:2], shape))
            and (shape[2:] == kernel or (all(k == 1 for k in kernel) and shape[2:] in ((), (1, 1)))))
    if not fits:
        core = ", ".join("r" if e is None else str(e) for e in expected[:2])
        wanted = [f"({core}{''.join(f', {k}' for k in kernel)})"]
        if all(k == 1 for k in kernel):
            wanted = [f"({core})", f"({core}, 1, 1)"]
        raise AdapterError(f"{name}: {key} has shape {shape}, this model's layer needs {' or '.join(wanted)} "
                           "(r: the LoRA's rank)")
    return tensor.float().reshape(*shape[:2], *kernel)


@dataclass(frozen=True)
class SavedConfig:
    """The LoraConfig that diffusers may save in a file's safetensors metadata, per component ("unet",
    "text_encoder"): where a layer has no alpha key, its scale is this alpha (or its `alpha_pattern`'s, matched
    as PEFT matches it) over the rank, or over the rank's square root with `use_rslora`."""
    lora_alpha: float
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def scale(self, module: str, rank: int) -> float:
        alpha = next((value for pattern, value in self.alpha_pattern.items()
                      if re.match(rf"(.*\.)?({pattern})$", module)), self.lora_alpha)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def saved_configs(path: str | Path) -> dict[str, SavedConfig]:
    """The components' `SavedConfig`s in a safetensors file's metadata (none in other files)."""
    path = Path(path)
    if path.suffix not in SAFETENSORS_SUFFIXES:
        return {}
    from safetensors import safe_open

    with safe_open(path, "pt") as file:
        raw = (file.metadata() or {}).get(SAVED_CONFIG_KEY)
    if not raw:
        return {}
    try:
        fields: dict[str, dict] = {}
        for key, value in json.loads(raw).items():
            component, _, name = key.partition(".")
            fields.setdefault(component, {})[name] = value
        configs = {component: SavedConfig(float(config["lora_alpha"]),
                                          {str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
                                          bool(config.get("use_rslora", False)))
                   for component, config in fields.items() if "lora_alpha" in config}
        for config in configs.values():
            for pattern in config.alpha_pattern:
                re.compile(pattern)
        return configs
    except (ValueError, TypeError, AttributeError, re.error) as err:
        raise AdapterError(f"{path.name}: unreadable {SAVED_CONFIG_KEY} in the safetensors metadata ({err})") from None


def read_lora(path: str | Path, targets: dict[str, Target], unet_config: UNetConfig) -> LoRA:
    """The LoRA in `path` on this model's layers, or an AdapterError naming the file and what does not fit.

    Layouts: "kohya" (kohya-ss / A1111 `lora_unet_*` with diffusers' block names, as LCM-LoRA and most files,
    and `lora_te_*`; LoCon convolutions included), "kohya-ldm" (the same with the original's block names,
    `lora_unet_input_blocks_4_1_...`), "peft" (diffusers' `unet.<path>.lora_A.weight`, `text_encoder.<path>...`)
    and "diffusers-old" (`unet.<path>.lora.down.weight`, `...attn1.processor.to_q_lora.down.weight`).
    Any of them may carry `alpha` per layer; diffusers' layouts may instead carry the LoraConfig diffusers saves
    (`SavedConfig`).
    """
    name = Path(path).name
    content = tensor_dict(path, read_adapter_file(path))
    layout = _layout(name, list(content))
    split = {"kohya": _split_kohya, "peft": _split_peft, "diffusers-old": _split_old_diffusers}[layout]
    table = _module_table(LayerNames.of(targets, unet_config), layout)
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    modules: dict[str, str] = {}  # our path -> the file's module name
    namings: set[str] = set()
    unknown: list[str] = []
    for key, tensor in content.items():
        split_key = split(key)
        module = table.get(split_key[0]) if split_key else None
        if module is None:
            unknown.append(key)
            continue
        (our_path, naming), part = module, split_key[1]
        if part in parts.setdefault(our_path, {}):
            raise AdapterError(f"{name}: {parts[our_path][part][0]} and {key} are both the {part} of {our_path}")
        parts[our_path][part] = (key, tensor)
        modules[our_path] = split_key[0]
        if our_path.startswith(UNET_PREFIX):
            namings.add(naming)
    if unknown:
        raise AdapterError(f"{name}: {len(unknown)} keys name no layer of this model's UNet or text encoder "
                           f"({layout} layout): {_listing(unknown)}")
    configs = saved_configs(path) if layout in ("peft", "diffusers-old") else {}
    layers = {}
    for our_path, found in sorted(parts.items()):
        missing = [part for part in ("down", "up") if part not in found]
        if missing:
            present = ", ".join(sorted(key for key, _ in found.values()))
            raise AdapterError(f"{name}: {present} without the {' and '.join(missing)} half of {our_path}")
        component, _, module = modules[our_path].partition(".")
        layers[our_path] = _layer(name, our_path, found, targets[our_path], configs.get(component), module)
    if layout == "kohya" and "ldm" in namings:
        layout = "kohya-ldm"
    return LoRA(layers, layout)


def _layer(name: str, our_path: str, found: dict[str, tuple[str, torch.Tensor]], target: Target,
           config: SavedConfig | None, module: str) -> LoRALayer:
    (down_key, down), (up_key, up) = found["down"], found["up"]
    out_features, in_features, *kernel = target.weight_shape
    if target.kind == "linear":
        kernel = []  # a TokenProjection's 1x1 weight: applied as a linear
    down = _factor(name, down_key, down, (None, in_features, *kernel))
    up = _factor(name, up_key, up, (out_features, None))
    if down.shape[0] != up.shape[1]:
        raise AdapterError(f"{name}: rank mismatch in {our_path}: {down_key} has rank {down.shape[0]}, "
                           f"{up_key} has rank {up.shape[1]}")
    scale = 1.0 if config is None else config.scale(module, down.shape[0])
    if "alpha" in found:
        alpha_key, alpha = found["alpha"]
        if alpha.numel() != 1:
            raise AdapterError(f"{name}: {alpha_key} has shape {tuple(alpha.shape)}, a single number expected")
        scale = alpha.float().item() / down.shape[0]
    return LoRALayer(down.contiguous(), up.contiguous(), scale, target)


@dataclass(frozen=True)
class PatchedLayer:
    """Several LoRAs on one layer: their factors concatenated along the rank, each LoRA's weight * scale in `up`."""
    down: torch.Tensor  # (R, in) or (R, in, kh, kw)
    up: torch.Tensor  # (out, R) for a linear, (out, R, 1, 1) for a convolution
    target: Target

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.target.kind == "conv":
            return F.conv2d(F.conv2d(x, self.down, stride=self.target.stride, padding=self.target.padding), self.up)
        return F.linear(F.linear(x, self.down), self.up)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """The forward hook: the layer's output plus the LoRAs' term on its input, added in place so that the
        output keeps the memory layout its layer chose (the next layer's kernels, and so their rounding, follow
        it)."""
        return output.add_(self.delta(args[0]))


@dataclass(frozen=True)
class LoRAPatch:
    """LoRAs with their weights, ready to apply to a model's layers without changing its weights."""
    layers: dict[str, PatchedLayer]
    loras: tuple[tuple[LoRA, float], ...] = field(repr=False)

    @classmethod
    def build(cls, loras: Sequence[tuple[LoRA, float]], device: torch.device | str,
              dtype: torch.dtype) -> LoRAPatch:
        """Per layer, one down and one up product whatever the number of LoRAs; computed in `dtype` on `device`."""
        gathered: dict[str, list[tuple[LoRALayer, float]]] = {}
        for lora, weight in loras:
            if weight == 0:  # adds nothing: not computed at all
                continue
            for path, layer in lora.layers.items():
                gathered.setdefault(path, []).append((layer, weight))
        layers = {}
        for path, parts in gathered.items():
            target = parts[0][0].target
            down = torch.cat([layer.down for layer, _ in parts])
            up = torch.cat([layer.up * (weight * layer.scale) for layer, weight in parts], dim=1)
            if target.kind == "conv":
                up = up[:, :, None, None]
            layers[path] = PatchedLayer(down.to(device, dtype).contiguous(), up.to(device, dtype).contiguous(),
                                        target)
        return cls(layers, tuple(loras))

    def _only(self, prefix: str) -> LoRAPatch:
        return LoRAPatch({p: layer for p, layer in self.layers.items() if p.startswith(prefix)}, self.loras)

    def without(self, paths: Collection[str]) -> LoRAPatch:
        """The patch on its other layers."""
        return LoRAPatch({p: layer for p, layer in self.layers.items() if p not in paths}, self.loras)

    def unet_only(self) -> LoRAPatch:
        return self._only(UNET_PREFIX)

    def text_encoder_only(self) -> LoRAPatch:
        return self._only(TEXT_ENCODER_PREFIX)

    def __bool__(self) -> bool:
        return bool(self.layers)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Within the block, `model`'s layers at the patched paths (whatever module sits there: a backend's twin
        keeps the path) add the LoRAs' term to their output; the hooks are removed on exit, error or not."""
        handles = []
        try:
            for path, layer in self.layers.items():
                handles.append(model.get_submodule(path).register_forward_hook(layer))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def merged_weight(self, path: str, base_weight: torch.Tensor) -> torch.Tensor:
        """`base_weight` + the LoRAs' weighted up @ down at `path`, in fp32 from the LoRAs' own fp32 factors,
        shaped as `base_weight` (the fused alternative to `applied`)."""
        merged = base_weight.detach().float().cpu().clone()
        for lora, weight in self.loras:
            layer = lora.layers.get(path)
            if layer is not None:
                merged += (weight * layer.scale * (layer.up @ layer.down.flatten(1))).reshape(merged.shape)
        return merged
