"""Loading the real checkpoint formats into a ControlLDM, with every mismatch named.

Formats: the v1.0 combined file (`control_sd15_canny.pth`), an SD 1.5 base (`.ckpt`, nested under
`state_dict`, or `.safetensors`) followed by a control-only file (v1.1). Pickles are only ever read with
`weights_only=True`; tensors are memory-mapped and converted once, straight to the serving dtype and
device, so no second full copy of the weights exists at any time.
"""
from __future__ import annotations

import ctypes
import mmap
import pickle
import sys
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

# img2img's part, loaded apart from the model when first needed (vae.load_encoder).
VAE_ENCODER_PREFIXES = ("first_stage_model.encoder.", "first_stage_model.quant_conv.")
# Present in real files, not used by text-to-image inference.
IGNORED_PREFIXES = (*VAE_ENCODER_PREFIXES, "model_ema.")
IGNORED_KEYS = frozenset({
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
})
_LISTED = 10  # keys named per problem in an error message
MADV_DONTNEED, MADV_PAGEOUT = 4, 21
_ALIGNMENT = 64  # bytes: what torch's CPU allocator guarantees
if sys.platform == "linux":
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
else:
    _madvise = None


class CheckpointError(ValueError):
    """A checkpoint that cannot serve this architecture; the message names the file and the keys."""


def is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of one file, memory-mapped where the format allows."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                return load_file(path, device="cpu")
            except SafetensorError as err:  # truncated or corrupt header: not one of the types caught below
                raise ValueError(str(err)) from None
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        # torch's message opens with advice to retry unsafely; name the offending global instead (a global of a
        # blocked module such as os/posix comes without the "WeightsUnpickler error:" prefix)
        found = (re.search(r"WeightsUnpickler error: (.*?)(?: Please |\n|$)", str(err))
                 or re.search(r"^(.*\bGLOBAL\b.*?)\s*$", str(err), re.M))
        detail = found.group(1) if found else "an object that is not a tensor"
        raise CheckpointError(
            f"{path}: refused: the file holds objects other than tensors, and unpickling them could run code "
            f"({detail})"
        ) from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a torch/safetensors file: {err})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def advise_pages(tensor: torch.Tensor, advice: int) -> None:
    """madvise(2) over the whole pages of `tensor`'s storage (nothing off Linux)."""
    if _madvise is None:
        return
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _madvise(first, last - first, advice)


def _drop_resident_pages(tensor: torch.Tensor) -> None:
    """Takes a converted tensor's memory-mapped source pages out of this process's resident set.

    Converting to bf16 or moving to a GPU reads every fp32 page of the file; without this the whole file
    would stay resident beside the converted weights until loading ends. The mapping is file-backed and
    never written, so a later read (a key sharing the storage) just faults the page back in from the file.
    """
    advise_pages(tensor, MADV_DONTNEED)


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def load_weights(
    model: nn.Module, checkpoints: list[str | Path], device: torch.device, dtype: torch.dtype,
    only: tuple[str, ...] | None = None,
) -> None:
    """Fills `model` (built on the meta device) from `checkpoints`; a later file overrides an earlier one per key.

    `only`: the key prefixes of a part loaded on its own (the VAE encoder); the files' other keys are skipped.
    By default every key that inference uses is read, and the ignored ones skipped.
    """
    if not checkpoints:
        raise CheckpointError("no checkpoint given")
    expected = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    unexpected: list[str] = []
    skipped = (lambda key: not key.startswith(only)) if only else is_ignored
    for path in map(Path, checkpoints):
        for key, value in read_state_dict(path).items():
            if skipped(key):
                continue
            if key not in expected:
                unexpected.append(f"{key} ({path.name})")
                continue
            tensors[key], origin[key] = value, path
    problems = []
    missing = set(expected) - set(tensors)
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    wrong = [
        f"{key} ({origin[key].name}): {tuple(value.shape)} in the file, {tuple(expected[key].shape)} expected"
        for key, value in tensors.items()
        if value.shape != expected[key].shape
    ]
    if wrong:
        problems.append(f"shape mismatches: {_listing(wrong)}")
    if problems:
        files = ", ".join(str(p) for p in checkpoints)
        raise CheckpointError(f"checkpoint {files} does not fit this architecture: " + "; ".join(problems))
    converted = {}
    for key in list(tensors):
        source = tensors.pop(key)
        converted[key] = source.to(device=device, dtype=dtype)
        if converted[key].data_ptr() % _ALIGNMENT:
            # safetensors views sit at 4-byte offsets; oneDNN's rounding depends on a weight's alignment
            # (measured on a 1x1 conv), and the same weights must give the same images from any file
            converted[key] = converted[key].clone()
        if converted[key].data_ptr() != source.data_ptr() and origin[key].suffix != ".safetensors":
            _drop_resident_pages(source)
    model.load_state_dict(converted, strict=True, assign=True)
    model.requires_grad_(False)
