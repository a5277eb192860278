#!/usr/bin/env python3
"""Writes deterministic adapter files for a model config in the layouts users bring them, into an adapter store
(`DIR/loras/`, `DIR/embeddings/`, `DIR/taesd/`): seeded random weights, so their effect is noise, in exactly the
real key layouts.

LoRA layouts (`write_lora`): "kohya" (kohya-ss / A1111 keys with diffusers' block names and LoCon convolutions,
the LCM-LoRA layout), "kohya-ldm" (the same with the original's block names), "peft" (diffusers' `lora_A`/`lora_B`)
and "diffusers-old" (`lora.down`/`lora.up`, attention processors' `to_q_lora`). Embeddings (`write_embedding`):
AUTOMATIC1111's .pt and .safetensors, diffusers' learned_embeds. TAESD (`write_taesd`): madebyollin's decoder and
encoder files, diffusers' AutoencoderTiny file.

  make_tiny_adapters.py --out-dir DIR     # the tiny model's demo store: a LoRA per layout, an embedding, a TAESD
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "handler"))

from controlnet_canny.config import CONFIG_DIR, ModelConfig, load_config  # noqa: E402
from controlnet_canny.lora import (  # noqa: E402
    LAYOUTS, SAVED_CONFIG_KEY, TEXT_ENCODER_PREFIX, LayerNames, Target, lora_targets,
)
from controlnet_canny.model import ControlLDM  # noqa: E402
from controlnet_canny.taesd import DIFFUSERS_INDEX_OFFSET, LATENT_CHANNELS, TaesdDecoder, TaesdEncoder  # noqa: E402

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


# ------------------------------------------------------------------------------------------------ embeddings

EMBEDDING_LAYOUTS = ("a1111-pt", "a1111-safetensors", "diffusers")


def write_embedding(path: str | Path, width: int, vectors: int, layout: str = "a1111-pt",
                    seed: int = 0) -> torch.Tensor:
    """A textual-inversion embedding of `vectors` x `width` values at `path`; returns the (vectors, width) values.

    - "a1111-pt": AUTOMATIC1111's `Embedding.save` (a pickle: string_to_param {"*": trained tensor} beside
      string_to_token, name, step, sd_checkpoint, sd_checkpoint_name);
    - "a1111-safetensors": the webui's safetensors form, {"emb_params": tensor};
    - "diffusers": the textual_inversion training script's learned_embeds, {placeholder token: tensor}, a
      (width,) vector for one vector as the sd-concepts-library files hold, else (vectors, width); a pickle
      for .bin, safetensors for .safetensors.
    """
    path = Path(path)
    values = torch.randn(vectors, width, generator=torch.Generator().manual_seed(seed))
    if layout == "a1111-pt":
        torch.save({
            "string_to_token": {"*": 265},
            "string_to_param": {"*": values.clone().requires_grad_(True)},  # the webui saves the trained leaf
            "name": path.stem,
            "step": 3000,
            "sd_checkpoint": "a9263745",
            "sd_checkpoint_name": "v1-5-pruned-emaonly",
        }, path)
    elif layout == "a1111-safetensors":
        save_file({"emb_params": values.clone()}, path)
    elif layout == "diffusers":
        state = {f"<{path.stem}>": values[0].clone() if vectors == 1 else values.clone()}
        if path.suffix == ".safetensors":
            save_file(state, path)
        else:
            torch.save(state, path)
    else:
        raise ValueError(f"unknown embedding layout {layout!r}; one of {', '.join(EMBEDDING_LAYOUTS)}")
    return values


# ----------------------------------------------------------------------------------------------------- TAESD

TAESD_LAYOUTS = ("madebyollin", "diffusers")


def taesd_halves(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """TAESD's real-size decoder and encoder weights, keyed as in madebyollin's files."""
    generator = torch.Generator().manual_seed(seed)
    decoder, encoder = TaesdDecoder(), TaesdEncoder()
    for module in (decoder, encoder):
        with torch.no_grad():
            for value in module.state_dict().values():
                # Convolutions at 0.65 of He's scale keep the activations of order 1 through the ~40 ReLU
                # convolutions (at 1.0 they grow 100-fold, at 0.5 the images come out nearly flat); biases
                # nonzero so that each of them visibly matters.
                fan_in = value[0].numel() if value.ndim > 1 else 1
                scale = (2 / fan_in) ** 0.5 * (0.65 if value.ndim > 1 else 0.1)
                value.copy_(torch.randn(value.shape, generator=generator) * scale)
            if module is decoder:
                # Images centred on 0.5 per colour, as trained ones are, so that the clamp to [0, 1] hides little.
                probe = torch.randn((1, LATENT_CHANNELS, 8, 8), generator=generator)
                decoder[-1].bias += 0.5 - decoder(probe).mean(dim=(0, 2, 3))
    return {"decoder": decoder.state_dict(), "encoder": encoder.state_dict()}


def write_taesd(directory: str | Path, layout: str = "madebyollin", seed: int = 0,
                suffix: str = ".safetensors") -> list[Path]:
    """madebyollin's `taesd_decoder{suffix}` + `taesd_encoder{suffix}`, or diffusers' one
    `diffusion_pytorch_model.safetensors` (AutoencoderTiny: `decoder.layers.{i}`, `encoder.layers.{i}`)."""
    if layout not in TAESD_LAYOUTS:
        raise ValueError(f"layout {layout!r}: one of {', '.join(TAESD_LAYOUTS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    halves = taesd_halves(seed)
    if layout == "diffusers":
        state = {}
        for role, half in halves.items():
            for key, value in half.items():
                index, rest = key.split(".", 1)
                state[f"{role}.layers.{int(index) - DIFFUSERS_INDEX_OFFSET[role]}.{rest}"] = value
        path = directory / "diffusion_pytorch_model.safetensors"
        save_file(state, path)
        return [path]
    paths = []
    for role, half in halves.items():
        path = directory / f"taesd_{role}{suffix}"
        if suffix == ".safetensors":
            save_file(half, path)
        else:
            torch.save(half, path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------------- CLI


def write_demo_store(root: Path, config: ModelConfig, rank: int = 4, seed: int = 0) -> list[Path]:
    """An adapter store for `config`: a LoRA in each layout (kohya files with alphas of half the rank, so scale
    0.5; diffusers' layouts without, scale 1), a two-vector embedding, madebyollin's TAESD files."""
    written = [write_lora(root / "loras" / f"tiny_{layout}.safetensors", config, layout, rank, seed,
                          rank / 2 if layout.startswith("kohya") else None) for layout in LAYOUTS]
    (root / "embeddings").mkdir(parents=True, exist_ok=True)
    write_embedding(root / "embeddings" / "tiny_embedding.pt", config.text.width, 2, seed=seed)
    written.append(root / "embeddings" / "tiny_embedding.pt")
    written += write_taesd(root / "taesd", "madebyollin", seed)
    for path in written:  # safetensors writes 0600: the image's server user (not the builder) must read them
        path.chmod(0o644)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "cldm_tiny.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="the adapter store to fill")
    args = parser.parse_args()
    for path in write_demo_store(args.out_dir, load_config(args.config), args.rank, args.seed):
        print(path)


if __name__ == "__main__":
    main()
