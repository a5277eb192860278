#!/usr/bin/env python3
"""Writes deterministic adapter files for a model config in the layouts users bring them, into an adapter store
(`DIR/loras/`, ...): seeded random weights, so their effect is noise, in exactly the real key layouts.

LoRA layouts (`write_lora`): "kohya" (kohya-ss / A1111 keys with diffusers' block names and LoCon convolutions,
the LCM-LoRA layout), "kohya-ldm" (the same with the original's block names), "peft" (diffusers' `lora_A`/`lora_B`)
and "diffusers-old" (`lora.down`/`lora.up`, attention processors' `to_q_lora`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "handler"))

from controlnet_canny.config import CONFIG_DIR, ModelConfig, load_config  # noqa: E402
from controlnet_canny.lora import (  # noqa: E402
    LAYOUTS, SAVED_CONFIG_KEY, TEXT_ENCODER_PREFIX, LayerNames, Target, lora_targets,
)
from controlnet_canny.model import ControlLDM  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "artifacts" / "tiny" / "adapters"


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    else:
        torch.save(tensors, path)
    return path


# ------------------------------------------------------------------------------------------------------ LoRA


def model_targets(config: ModelConfig) -> dict[str, Target]:
    with torch.device("meta"):
        return lora_targets(ControlLDM(config))


def lora_factors(config: ModelConfig, rank: int = 4, seed: int = 0, unet: bool = True, text_encoder: bool = True,
                 convs: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Our module path -> (down, up), shaped as the files hold them: a 1x1 or kxk convolution's and a transformer
    projection's (a Conv2d in SD 1.5) down (r, in, kh, kw) and up (out, r, 1, 1), a linear's (r, in), (out, r).
    `convs`: the 3x3 convolutions too (LoCon, as LCM-LoRA); the 1x1 ones always."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for path, target in model_targets(config).items():
        in_text = path.startswith(TEXT_ENCODER_PREFIX)
        if (in_text and not text_encoder) or (not in_text and not unet):
            continue
        out_features, in_features, *kernel = target.weight_shape
        if not convs and kernel not in ([], [1, 1]):
            continue
        fan_in = in_features * (kernel[0] * kernel[1] if kernel else 1)
        down = torch.randn(rank, in_features, *kernel, generator=generator) / fan_in ** 0.5
        up = 0.5 * torch.randn(out_features, rank, *([1, 1] if kernel else []), generator=generator) / rank ** 0.5
        factors[path] = (down, up)
    return factors


def _old_diffusers_module(name: str) -> tuple[str, str]:
    """A layer's module in the older diffusers layout and its factors' infix: the attention processors' spelling
    (`attn1.processor.to_q_lora`, `to_out_lora`) for the UNet's attentions, `to_q_lora`, ... and
    `lora_linear_layer` in the text encoder, `lora` elsewhere."""
    projections = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora",
                   "q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    module, _, layer = name.removesuffix(".0").rpartition(".")
    layer += ".0" if name.endswith(".to_out.0") else ""
    if name.startswith("unet.") and module.endswith((".attn1", ".attn2")):
        return f"{module}.processor.{projections[layer]}", ""
    if name.startswith("text_encoder."):
        return (f"{module}.{projections[layer]}", "") if layer in projections else (name, "lora_linear_layer")
    return name, "lora"


def lora_state_dict(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], config: ModelConfig, layout: str,
                    alpha: float | None = None) -> dict[str, torch.Tensor]:
    """`factors` keyed as a file of `layout` keys them; `alpha` (None: not written) for every layer."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    names = LayerNames.of(model_targets(config), config.unet)
    tensors = {}
    for path, (down, up) in factors.items():
        if layout in ("kohya", "kohya-ldm"):
            module = names.kohya(path, ldm=layout == "kohya-ldm")
            parts = {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up}
        elif layout == "peft":
            module = names.diffusers[path]
            parts = {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}
        else:
            module, infix = _old_diffusers_module(names.diffusers[path])
            dot = f".{infix}." if infix else "."
            parts = {f"{module}{dot}down.weight": down, f"{module}{dot}up.weight": up}
        tensors.update(parts)
        if alpha is not None:
            tensors[f"{module}.alpha"] = torch.tensor(float(alpha))
    return tensors


def saved_config_metadata(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], config: ModelConfig,
                          lora_alpha: float, alpha_pattern: dict[str, float] | None = None) -> dict[str, str]:
    """The safetensors metadata in which diffusers' `save_lora_weights` keeps each component's LoraConfig."""
    names = LayerNames.of(model_targets(config), config.unet)
    fields: dict[str, object] = {}
    for component in ("unet", "text_encoder"):
        modules = [names.diffusers[p].removeprefix(f"{component}.") for p in factors
                   if names.diffusers[p].startswith(f"{component}.")]
        if modules:
            rank = next(iter(factors.values()))[0].shape[0]
            fields.update({f"{component}.r": rank, f"{component}.lora_alpha": lora_alpha,
                           f"{component}.alpha_pattern": alpha_pattern or {}, f"{component}.rank_pattern": {},
                           f"{component}.target_modules": sorted(modules)})
    return {SAVED_CONFIG_KEY: json.dumps(fields, indent=2, sort_keys=True)}


def write_lora(path: str | Path, config: ModelConfig, layout: str, rank: int = 4, seed: int = 0,
               alpha: float | None = None, unet: bool = True, text_encoder: bool = True, convs: bool = True,
               saved_alpha: float | None = None, saved_alpha_pattern: dict[str, float] | None = None) -> Path:
    """A LoRA file of `layout` (safetensors, or a torch pickle for .pt/.bin/...) with seeded random factors: the
    same arguments give the same factors in every layout. `alpha`: written per layer (None: not written);
    `saved_alpha` (and `saved_alpha_pattern`): a safetensors file's metadata holds the LoraConfig diffusers saves."""
    factors = lora_factors(config, rank, seed, unet, text_encoder, convs)
    metadata = None if saved_alpha is None else saved_config_metadata(factors, config, saved_alpha,
                                                                      saved_alpha_pattern)
    return _save(Path(path), lora_state_dict(factors, config, layout, alpha), metadata)


# ------------------------------------------------------------------------------------------------------- CLI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "cldm_tiny.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="the adapter store to fill")
    args = parser.parse_args()

    config = load_config(args.config)
    for layout in LAYOUTS:
        # kohya files carry alphas (here half the rank, so scale 0.5); diffusers' layouts none (scale 1)
        alpha = args.rank / 2 if layout.startswith("kohya") else None
        print(write_lora(args.out_dir / "loras" / f"tiny_{layout}.safetensors", config, layout, args.rank,
                         args.seed, alpha))


if __name__ == "__main__":
    main()
