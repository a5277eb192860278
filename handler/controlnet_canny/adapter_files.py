"""Reading the files users bring from other tools (LoRA, embeddings, TAESD) safely, with errors that name the file.

safetensors files are read as they are; pickles (.pt, .pth, .bin, .ckpt) only with `weights_only=True`, which builds
tensors, containers, numbers and strings and refuses any other object (unpickling one could run code).
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SUFFIXES = (*SAFETENSORS_SUFFIXES, *PICKLE_SUFFIXES)


class AdapterError(ValueError):
    """An adapter file that cannot be used with this model; the message names the file and what is wrong."""


def read_adapter_file(path: str | Path) -> Any:
    """The file's content: a dict of tensors for safetensors, whatever tensors-and-containers a pickle holds."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise AdapterError(f"{path.name}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}")
    try:
        if path.suffix in SAFETENSORS_SUFFIXES:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                return load_file(path, device="cpu")
            except SafetensorError as err:
                raise AdapterError(f"{path.name}: not a readable safetensors file ({err})") from None
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise AdapterError(f"{path.name}: refused: the file holds objects other than tensors, containers, numbers and "
                           "strings, and unpickling them could run code") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        if isinstance(err, AdapterError):
            raise
        raise AdapterError(f"{path.name}: not a readable torch or safetensors file ({err})") from None


def tensor_dict(path: str | Path, content: Any) -> dict[str, torch.Tensor]:
    """`content` as a flat dict of tensors (a "state_dict" entry unwrapped), or an AdapterError naming `path`."""
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not content:
        raise AdapterError(f"{Path(path).name}: not a dict of tensors")
    wrong = sorted(str(k) for k, v in content.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if wrong:
        raise AdapterError(f"{Path(path).name}: entries that are not tensors: {', '.join(wrong[:5])}")
    return content
