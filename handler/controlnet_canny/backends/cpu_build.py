"""C kernels of the CPU backend, compiled at load by the machine's C compiler for one x86-64 instruction set.

A variant is built with that set's compiler flags only, so its library runs on every CPU that has the set. The
library is compiled into a temporary directory that is removed once it is loaded. Without a compiler, on another
CPU or where the library cannot be mapped, `build` returns None and the caller stays on torch's kernels.
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

log = logging.getLogger(__name__)

# per variant: the CPU flags its library needs and the compiler flags that target exactly those, widest first
ISAS = {
    "avx512": ({"avx512f", "avx512bw", "avx512dq", "avx512vl", "fma"},
               ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma"]),
    "avx2": ({"avx2", "fma"}, ["-mavx2", "-mfma"]),
}
COMPILE_FLAGS = ["-O3", "-std=c11", "-fopenmp", "-shared", "-fPIC"]


def cpu_flags() -> set[str]:
    """The x86-64 feature flags of this CPU, as Linux reports them; empty on other machines."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines() if line.startswith("flags")),
                set())


def runnable(variant: str, extra_flags: set[str] = frozenset()) -> bool:
    """This CPU has the variant's instruction set (and `extra_flags`), and torch runs with it: an operator who
    lowers torch's (ATEN_CPU_CAPABILITY=avx2, say) lowers the kernels' too."""
    capability = torch.backends.cpu.get_cpu_capability()
    allowed = {"avx512", "avx2"} if "AVX512" in capability else {"avx2"} if "AVX2" in capability else set()
    return variant in allowed and ISAS[variant][0] | extra_flags <= cpu_flags()


def build(source: Path, variant: str) -> ctypes.CDLL | None:
    """`source` compiled for `variant` and loaded, or None (logged) where no C compiler builds it or the
    library cannot be mapped."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler: %s not built, torch's kernels run instead", source.name)
        return None
    with tempfile.TemporaryDirectory(prefix=f"{source.stem}-") as directory:
        library_path = Path(directory) / f"{source.stem}_{variant}.so"
        try:
            subprocess.run([compiler, *COMPILE_FLAGS, *ISAS[variant][1], "-o", str(library_path), str(source)],
                           check=True, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", None) or error
            log.warning("%s (%s) did not compile (%s): torch's kernels run instead", source.name, variant,
                        str(detail).strip()[-500:])
            return None
        try:  # the loaded library stays mapped after its file is removed with the directory
            return ctypes.CDLL(str(library_path))
        except OSError as error:  # e.g. a TMPDIR mounted noexec
            log.warning("%s (%s) did not load (%s): torch's kernels run instead", source.name, variant, error)
            return None
