"""NVIDIA GPUs: kernels are queued asynchronously, so clocks and progress events wait for the device first."""
from __future__ import annotations

import torch

from . import Backend


class CudaBackend(Backend):
    # Decoding several samples at once fills the GPU; the activations of four 768x768 samples fit a 16 GB card.
    decode_batch = 4

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Asynchronous, from pinned memory: the host goes on queueing work while the noise travels."""
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def summary(self) -> str:
        return f"{self.device}: plain PyTorch on {torch.cuda.get_device_name(self.device)}"
