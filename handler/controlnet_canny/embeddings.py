"""Textual-inversion embeddings from AUTOMATIC1111 and diffusers files: n learned vectors that a prompt's
occurrences of the embedding's name stand for (`text_encoder.EmbeddingIndex` does the matching).

Layouts read (the keys each tool writes; SD 1.x only):
- AUTOMATIC1111 `.pt`: {"string_to_param": {"*": (n, width)}, "string_to_token", "name", "step", ...};
- AUTOMATIC1111 `.safetensors`: {"emb_params": (n, width)};
- diffusers `learned_embeds.bin` / `.safetensors`: {token: (width,) or (n, width)}, one entry;
- a bare tensor saved with torch.save, which diffusers' `load_textual_inversion` also takes.
The name is the file's stem in every layout (as the webui does); the token or "name" stored inside is not used.
SDXL's {"clip_l", "clip_g"} pair is refused: it is made for two text encoders this model does not have.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapter_files import AdapterError, read_adapter_file

MAX_VECTORS = 75  # one chunk's worth of token slots: an embedding is never split across chunks
SDXL_KEYS = ("clip_l", "clip_g")


@dataclass(frozen=True, eq=False)
class Embedding:
    """`vectors`: (n, width) float32 on the CPU, taking n token slots of a prompt in place of the name."""

    vectors: torch.Tensor

    def __post_init__(self):
        if self.vectors.ndim != 2 or not 1 <= self.vectors.shape[0] <= MAX_VECTORS:
            raise ValueError(f"an embedding is (n, width) vectors with n from 1 to {MAX_VECTORS}, "
                             f"not {tuple(self.vectors.shape)}")

    @property
    def length(self) -> int:
        return self.vectors.shape[0]


def read_embedding(path: str | Path, width: int) -> Embedding:
    """The embedding in `path` for a text encoder of `width`, or an AdapterError naming the file and what is wrong."""
    path = Path(path)
    vectors = _stored_vectors(path, read_adapter_file(path))
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not vectors.is_floating_point():
        raise AdapterError(f"{path.name}: the embedding is a {vectors.dtype} tensor of shape {tuple(vectors.shape)}; "
                           "expected floating-point (n, width) vectors")
    if vectors.shape[1] != width:
        raise AdapterError(f"{path.name}: vectors of width {vectors.shape[1]}, but this model's text encoder has width "
                           f"{width} (an embedding trained for another base model)")
    if not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise AdapterError(f"{path.name}: {vectors.shape[0]} vectors; an embedding has 1 to {MAX_VECTORS}")
    vectors = vectors.detach().to(device="cpu", dtype=torch.float32).clone()
    if not torch.isfinite(vectors).all():
        raise AdapterError(f"{path.name}: the vectors hold NaN or infinite values")
    return Embedding(vectors)


def _stored_vectors(path: Path, content: Any) -> torch.Tensor:
    if isinstance(content, torch.Tensor):
        return content
    if not isinstance(content, dict):
        raise AdapterError(f"{path.name}: holds a {type(content).__name__}, not a textual-inversion embedding")
    keys = ", ".join(sorted(map(str, content))[:8])
    if any(key in content for key in SDXL_KEYS):
        raise AdapterError(f"{path.name}: an SDXL embedding (clip_l/clip_g vectors for SDXL's two text encoders); "
                           "this model is Stable Diffusion 1.x, with one text encoder")
    if "string_to_param" in content:
        params = content["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else type(params).__name__
            raise AdapterError(f"{path.name}: string_to_param must hold one tensor (one term), it holds {count}")
        where, value = "string_to_param", next(iter(params.values()))
    elif "emb_params" in content:
        where, value = "emb_params", content["emb_params"]
    elif len(content) == 1:
        where, value = next(iter(content)), next(iter(content.values()))
    else:
        raise AdapterError(f"{path.name}: not a textual-inversion embedding (keys: {keys}); expected string_to_param, "
                           "emb_params or a single token")
    if not isinstance(value, torch.Tensor):
        raise AdapterError(f"{path.name}: {where} holds a {type(value).__name__}, not a tensor of vectors")
    return value
