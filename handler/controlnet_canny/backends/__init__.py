"""What makes one kind of device fast, kept out of the model files (plain math named after the checkpoint).

A backend is chosen per device when the pipeline loads. It may swap layers of the loaded model for faster twins
that compute the same thing (packed weights, an attention kernel), and it owns what the pipeline must do
differently per device: when to synchronise before reading a clock, how many samples to decode at once.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..config import reject_unknown_keys

if TYPE_CHECKING:
    from ..lora import LoRAPatch

# Runs the networks of every denoising step (and the text encoder) once at a latent size (height, width), as a
# request does: the backend watches which layers see which shapes.
Probe = Callable[[tuple[int, int]], None]


class Applicable(Protocol):
    """LoRAs ready for a model: `with applicable.applied(model):` evaluations run with them."""

    def applied(self, model: nn.Module) -> AbstractContextManager[None]: ...


@dataclass(frozen=True)
class BackendOptions:
    """The `handler.backend` section of model-config.yaml (also `generate.py --backend KEY=VALUE`)."""
    prepack: str = "auto"  # CPU: auto (measured per layer class), all, none
    winograd: str = "auto"  # CPU, fp32: auto (3x3 convolutions by Winograd up to the largest map it won at), none
    attention: str = "auto"  # CPU: auto (measured), torch, or a kernel variant such as avx512 / avx2
    calibration_cache: str = "default"  # CPU: directory of the measured choices; default: ~/.cache/...; "": none
    decoder_layout: str = "channels_last"  # CPU: the VAE decoder's memory format: channels_last or contiguous
    lora_fusion: str = "auto"  # CPU: auto (fused where the hooks measured slower, once that pays), fused, unfused
    lora_cache_mib: str = "4096"  # CPU: fused copies of the LoRA sets used last, at most this many MiB
    allocator: str = "retain"  # CPU: retain (malloc keeps freed memory for the next step), system (as the C library does)

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> BackendOptions:
        reject_unknown_keys(section, cls, "backend")
        options = cls(**{k: str(v) for k, v in section.items()})
        if options.prepack not in ("auto", "all", "none"):
            raise ValueError(f"backend.prepack must be auto, all or none, got {options.prepack!r}")
        if options.winograd not in ("auto", "none"):
            raise ValueError(f"backend.winograd must be auto or none, got {options.winograd!r}")
        if options.decoder_layout not in ("channels_last", "contiguous"):
            raise ValueError("backend.decoder_layout must be channels_last or contiguous, "
                             f"got {options.decoder_layout!r}")
        if options.lora_fusion not in ("auto", "fused", "unfused"):
            raise ValueError(f"backend.lora_fusion must be auto, fused or unfused, got {options.lora_fusion!r}")
        if options.allocator not in ("retain", "system"):
            raise ValueError(f"backend.allocator must be retain or system, got {options.allocator!r}")
        if not options.lora_cache_mib.isdigit():
            raise ValueError(f"backend.lora_cache_mib must be a whole number of MiB, got {options.lora_cache_mib!r}")
        return options


class Backend:
    """The plain PyTorch path: any device torch runs on, nothing swapped."""

    decode_batch = 1  # samples per VAE decode: its activations are the largest tensors of a request

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype

    def prepare(self, model: nn.Module, probe: Probe, latent_sizes: list[tuple[int, int]], model_id: str) -> None:
        """Called once on the loaded model, before any request; `model_id` names its architecture."""

    def prepare_decoder(self, decoder: nn.Module) -> None:
        """A decoder loaded after `prepare` (the adapter store's TAESD), laid out as this backend runs decoders."""

    def idle(self) -> None:
        """No request is in flight: what the backend keeps between steps may go back."""

    def synchronize(self) -> None:
        """Waits for queued device work, so that a clock read or a progress event tells the truth."""

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the device, in one copy."""
        return tensor.to(self.device)

    def lora_application(self, patch: LoRAPatch, model: nn.Module) -> Applicable:
        """How `patch` (LoRAs on the UNet) is applied to `model`'s evaluations: here by its unfused hooks."""
        return patch

    def summary(self) -> str:
        return f"{self.device.type}: plain PyTorch"


def select(device: torch.device, dtype: torch.dtype, options: BackendOptions) -> Backend:
    if device.type == "cpu":
        from .cpu import CpuBackend

        return CpuBackend(device, dtype, options)
    if device.type == "cuda":
        from .cuda import CudaBackend

        return CudaBackend(device, dtype)
    return Backend(device, dtype)
