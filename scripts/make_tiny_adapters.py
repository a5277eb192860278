#!/usr/bin/env python3
"""Writes deterministic synthetic adapter files in the real key layouts that other tools' files use.

Random weights from a seed, for the tests and for trying the adapter store by hand; their outputs are noise.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "handler"))

from controlnet_canny.taesd import DIFFUSERS_INDEX_OFFSET, LATENT_CHANNELS, TaesdDecoder, TaesdEncoder  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "artifacts" / "tiny_adapters"

# ---- TAESD ----------------------------------------------------------------------------------------------------

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


# ---- embeddings -----------------------------------------------------------------------------------------------

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


# ---- command line ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for layout in TAESD_LAYOUTS:
        for path in write_taesd(args.out_dir / "taesd" / layout, layout, args.seed):
            print(path)


if __name__ == "__main__":
    main()
