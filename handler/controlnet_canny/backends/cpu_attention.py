"""Multi-head attention on x86-64 CPUs by a C kernel compiled at load (`cpu_attention.c`), per instruction set.

Variants: "avx512" (fp32; bf16 where the CPU has AVX-512 BF16) and "avx2" (fp32, AVX2 + FMA). `variants(dtype)`
lists those this CPU runs; the caller times them against torch's SDPA and installs the fastest.

torch's CPU flash-attention kernel runs bf16 at its fp32 rate unless the CPU has AMX; this kernel multiplies
bf16 pairs natively and tiles for the head dims the UNet has (figures: docs/benchmarks.md). It does the same
arithmetic (see its header); results differ from torch's by rounding.

Each variant is compiled at load (`cpu_build`). Without a compiler, on another CPU, or for shapes it does not
take (head dims over 160, odd ones in bf16), attention stays on `unet.multihead_attention`.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch
from torch import nn

from ..unet import CrossAttention, multihead_attention
from . import cpu_build

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.c")
MAX_HEAD_DIM = 160
# per dtype: its name in the library's functions (attention_<name>), and the variants that have one, each with
# the CPU flags that function needs beyond its variant's
KERNELS = {torch.float32: ("fp32", {"avx512": set(), "avx2": set()}),
           torch.bfloat16: ("bf16", {"avx512": {"avx512_bf16"}})}

_Strides = ctypes.c_int64 * 2


def variants(dtype: torch.dtype) -> list[str]:
    """The kernel variants this CPU can run for `dtype`, widest instruction set first; [] where none."""
    if dtype not in KERNELS:
        return []
    return [variant for variant, extra in KERNELS[dtype][1].items() if cpu_build.runnable(variant, extra)]


class CpuAttention:
    """Drop-in for `unet.multihead_attention` ([batch, tokens, heads * dim] in and out) at one dtype."""

    def __init__(self, library: ctypes.CDLL, dtype: torch.dtype, variant: str):
        self.dtype = dtype
        type_name = KERNELS[dtype][0]
        self.name = f"kernel-{variant}-{type_name}"
        self._kernel = getattr(library, f"attention_{type_name}")
        self._kernel.restype = ctypes.c_int
        self._kernel.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [_Strides] * 4
                                 + [ctypes.c_float, ctypes.c_int])

    def __repr__(self) -> str:
        return self.name

    def takes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
        dim = q.shape[-1] // heads
        return (all(t.dtype == self.dtype and t.device.type == "cpu" and t.dim() == 3 and t.stride(-1) == 1
                    for t in (q, k, v))
                and q.shape[0] == k.shape[0] == v.shape[0] and k.shape[1] == v.shape[1]
                and q.shape[-1] == k.shape[-1] == v.shape[-1] == heads * dim and dim <= MAX_HEAD_DIM
                and (dim % 2 == 0 or self.dtype == torch.float32))  # bf16 multiplies in pairs

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        if not self.takes(q, k, v, heads):
            return multihead_attention(q, k, v, heads)
        batch, queries, width = q.shape
        dim = width // heads
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        status = self._kernel(*(t.data_ptr() for t in (q, k, v, out)), batch, heads, queries, k.shape[1], dim,
                              *(_Strides(t.stride(0), t.stride(1)) for t in (q, k, v, out)), dim ** -0.5,
                              torch.get_num_threads())  # what the handler set, as torch's ops use
        if status:
            raise MemoryError("attention kernel: out of memory for its workspace")
        return out


def load(dtype: torch.dtype, variant: str) -> CpuAttention | None:
    """The compiled kernel `variant` for `dtype`, or None (logged) where this CPU cannot run it or it does not
    build."""
    if variant not in variants(dtype):
        log.warning("attention kernel %s for %s: not for this CPU", variant, dtype)
        return None
    library = cpu_build.build(SOURCE, variant)
    return None if library is None else CpuAttention(library, dtype, variant)


def install(model: nn.Module, kernel: CpuAttention) -> None:
    """Every CrossAttention of `model` attends with `kernel` (shapes it does not take still go to torch)."""
    for module in model.modules():
        if isinstance(module, CrossAttention):
            module.attend = kernel
    log.info("attention: %s", kernel.name)
