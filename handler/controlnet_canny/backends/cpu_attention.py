"""Multi-head attention on AVX-512 CPUs by a C kernel compiled at load (`cpu_attention.c`), bf16 and fp32.

torch's CPU flash-attention kernel runs bf16 at its fp32 rate unless the CPU has AMX: measured on a
2-core Zen 4 machine at 4096 tokens and head dim 40 (the 512x512 UNet's top level), 130 GFLOP/s against
250 for this kernel's bf16, and attention was 40% of a 512x512 bf16 step; its fp32 runs 1.1-1.3x torch's.
The kernel does the same arithmetic (see its header); results differ from torch's by rounding.

It is compiled with the machine's C compiler into a temporary directory that is removed once the library is
loaded. Without a compiler, on another CPU, or for shapes it does not take (head dims over 160, odd ones
in bf16), attention falls back to `unet.multihead_attention`.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..unet import multihead_attention

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.c")
MAX_HEAD_DIM = 160
AVX512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"}
# per dtype: the library's function and the CPU flags it needs
KERNELS = {torch.bfloat16: ("attention_bf16", AVX512 | {"avx512_bf16"}), torch.float32: ("attention_fp32", AVX512)}
COMPILE_FLAGS = ["-O3", "-std=c11", "-fopenmp", "-shared", "-fPIC", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512dq",
                 "-mavx512vl"]

_Strides = ctypes.c_int64 * 2


def _cpu_flags() -> set[str]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines() if line.startswith("flags")), set())


def variants(dtype: torch.dtype) -> list[str]:
    """The kernel builds this CPU runs for `dtype`."""
    runs = (dtype in KERNELS and sys.platform == "linux" and platform.machine().lower() in ("x86_64", "amd64")
            and KERNELS[dtype][1] <= _cpu_flags())
    return ["avx512"] if runs else []


class CpuAttention:
    """Drop-in for `unet.multihead_attention` ([batch, tokens, heads * dim] in and out) at one dtype."""

    def __init__(self, library: ctypes.CDLL, dtype: torch.dtype, variant: str):
        self.dtype = dtype
        self.name = f"kernel-{variant}-{str(dtype).removeprefix('torch.')}"
        self._kernel = getattr(library, KERNELS[dtype][0])
        self._kernel.restype = ctypes.c_int
        self._kernel.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [_Strides] * 4
                                 + [ctypes.c_float, ctypes.c_int])

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
    """The compiled kernel for `dtype`, or None (logged) where no C compiler builds it."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler: attention stays on torch's kernel")
        return None
    with tempfile.TemporaryDirectory(prefix="cpu-attention-") as build:
        library_path = Path(build) / "cpu_attention.so"
        try:
            subprocess.run([compiler, *COMPILE_FLAGS, "-o", str(library_path), str(SOURCE)],
                           check=True, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", None) or error
            log.warning("attention kernel did not compile (%s): staying on torch's kernel", str(detail).strip()[-500:])
            return None
        # The loaded library stays mapped after its file is removed with the directory.
        return CpuAttention(ctypes.CDLL(str(library_path)), dtype, variant)
