#!/usr/bin/env python3
"""Writes small synthetic adapter files in the real layouts the tools users come from write them, for tests.

Random values from a seed; the layouts (keys, nesting, dtypes, extra entries) are the real ones.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# ----------------------------------------------------------------------------------------- embeddings

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
