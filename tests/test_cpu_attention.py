"""The attention kernel (controlnet_canny.backends.cpu_attention): torch's accuracy at every shape the models use."""
from __future__ import annotations

import functools
import tempfile

import numpy as np
import pytest
import torch

from controlnet_canny.backends import BackendOptions, cpu_attention, cpu_build
from controlnet_canny.params import GenerationParams
from controlnet_canny.pipeline import ControlNetCannyPipeline
from controlnet_canny.unet import CrossAttention, multihead_attention

from conftest import TINY_CONFIG

# Every (dtype, variant) this CPU runs: on an AVX-512 machine the AVX2 variant is tested too. Where none runs,
# the tests below that need no kernel prove that attention stays on torch's.
KERNELS = [(dtype, variant) for dtype in (torch.float32, torch.bfloat16) for variant in cpu_attention.variants(dtype)]


def _kernel_id(dtype, variant):
    return f"{str(dtype).removeprefix('torch.')}-{variant}"


@functools.cache
def _kernel(dtype, variant):
    loaded = cpu_attention.load(dtype, variant)
    assert loaded is not None, "the CPU runs the kernel but it did not compile"
    return loaded


@pytest.fixture(params=KERNELS, ids=[_kernel_id(*k) for k in KERNELS])
def kernel(request):
    return _kernel(*request.param)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _inputs(dtype, batch, queries, keys, heads, dim, logit_scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, heads * dim, generator=generator) for n in (queries, keys, keys))
    return (q * logit_scale).to(dtype), k.to(dtype), v.to(dtype)


def _error(out, q, k, v, heads):
    return (out.double() - multihead_attention(q.double(), k.double(), v.double(), heads)).abs().max().item()


def _tolerance(q, k, v, heads):
    """torch's own error at this dtype, with room for rounding in a different order (1 bf16 or 64 fp32 ulps)."""
    return 1.5 * _error(multihead_attention(q, k, v, heads), q, k, v, heads) + {torch.bfloat16: 2**-9, torch.float32: 2**-18}[q.dtype]


# (batch, queries, keys, heads, dim): the SD 1.5 levels (heads of 40, 80, 160 against themselves and 77 text
# tokens), a merged self-attention (token_merging_ratio 0.3 at 256 px: 1024 - 307 tokens), the tiny model's (4, 8),
# and sizes that fill no tile exactly.
SHAPES = [
    (2, 1024, 1024, 8, 40), (1, 1024, 77, 8, 40), (2, 256, 256, 8, 80), (2, 64, 77, 8, 160), (2, 16, 16, 8, 160),
    (2, 717, 717, 8, 40),
    (1, 64, 64, 8, 4), (2, 16, 77, 8, 8), (3, 5, 3, 5, 8), (1, 1, 1, 1, 2), (2, 33, 17, 2, 48), (1, 100, 97, 3, 18),
]
# bf16 multiplies in pairs (odd head dims go to torch: tested below); fp32 takes odd head dims too.
CASES = [(dtype, variant, shape) for dtype, variant in KERNELS
         for shape in SHAPES + ([(2, 9, 40, 3, 5), (1, 20, 7, 1, 1)] if dtype == torch.float32 else [])]


@pytest.mark.parametrize("dtype, variant, shape", CASES, ids=[f"{_kernel_id(d, v)}-{s}" for d, v, s in CASES])
def test_as_accurate_as_torch(dtype, variant, shape, threads):
    kernel = _kernel(dtype, variant)
    q, k, v = _inputs(dtype, *shape)
    assert kernel.takes(q, k, v, shape[3])
    out = kernel(q, k, v, shape[3])
    assert out.shape == q.shape and out.dtype == kernel.dtype
    # Same arithmetic, sums in another order: errors of the same size, not the same bits.
    assert _error(out, q, k, v, shape[3]) <= _tolerance(q, k, v, shape[3])


def test_peaked_and_flat_softmax(kernel):
    for logit_scale in (0.0, 30.0):  # uniform weights; one key takes nearly all (exp underflows elsewhere)
        q, k, v = _inputs(kernel.dtype, 2, 100, 77, 4, 40, logit_scale)
        out = kernel(q, k, v, 4)
        assert torch.isfinite(out).all()
        assert _error(out, q, k, v, 4) <= _tolerance(q, k, v, 4)


def test_strided_views(kernel, threads):
    """Token and batch strides as the linears' outputs and slices give them."""
    wide = _inputs(kernel.dtype, 3, 50, 50, 4, 40)
    q, k, v = (t[:, ::2, :] for t in wide)  # every other token
    assert not q.is_contiguous()
    assert torch.equal(kernel(q, k, v, 4), kernel(*(t.contiguous() for t in (q, k, v)), 4))


REFUSED = [(*kernel, case) for kernel in KERNELS for case in ("other dtype", "head dim over 160")]
REFUSED += [(torch.bfloat16, variant, "odd head dim") for variant in cpu_attention.variants(torch.bfloat16)]


@pytest.mark.parametrize("kernel_dtype, variant, case", REFUSED, ids=[f"{_kernel_id(d, v)}-{c}" for d, v, c in REFUSED])
def test_what_it_does_not_take_goes_to_torch(kernel_dtype, variant, case):
    kernel = _kernel(kernel_dtype, variant)
    dtype = {torch.float32: torch.bfloat16, torch.bfloat16: torch.float32}[kernel_dtype] if case == "other dtype" else kernel_dtype
    heads, dim = {"odd head dim": (2, 5), "head dim over 160": (1, 168)}.get(case, (2, 8))
    q, k, v = _inputs(dtype, 2, 6, 6, heads, dim)
    assert not kernel.takes(q, k, v, heads)
    assert torch.equal(kernel(q, k, v, heads), multihead_attention(q, k, v, heads))


# /proc/cpuinfo flags (the relevant ones) of CPU classes, and the variants each runs for fp32 and bf16.
AVX512 = {"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"}
CPU_CLASSES = {
    "zen4": (AVX512 | {"avx512_bf16"}, ["avx512", "avx2"], ["avx512"]),
    "skylake-x": (AVX512, ["avx512", "avx2"], []),
    "zen3": ({"avx", "avx2", "fma"}, ["avx2"], []),
    "sandy-bridge": ({"avx"}, [], []),
    "not x86-64": (set(), [], []),
}


@pytest.mark.parametrize("cpu", CPU_CLASSES)
def test_variants_follow_thecpu_flags(monkeypatch, cpu):
    flags, fp32, bf16 = CPU_CLASSES[cpu]
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: flags)
    # torch on such a CPU runs with its widest capability (checked apart: the variants follow it)
    capability = "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "DEFAULT"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu_attention.variants(torch.float32) == fp32
    assert cpu_attention.variants(torch.bfloat16) == bf16
    assert cpu_attention.variants(torch.float16) == []


def test_a_variant_the_cpu_cannot_run_is_not_built(monkeypatch):
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: CPU_CLASSES["zen3"][0])
    monkeypatch.setattr(cpu_build.subprocess, "run", lambda *args, **kwargs: pytest.fail("compiled"))
    assert cpu_attention.load(torch.float32, "avx512") is None
    assert cpu_attention.load(torch.bfloat16, "avx512") is None


@pytest.mark.parametrize("compiler", ["false", "/nonexistent/cc"])
def test_without_a_working_compiler_attention_stays_on_torch(monkeypatch, tmp_path, compiler):
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: CPU_CLASSES["zen3"][0])  # gets to the compiler anywhere
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cpu_attention.load(torch.float32, "avx2") is None
    assert list(tmp_path.iterdir()) == []  # the build directory is gone


TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@pytest.mark.parametrize("dtype, variant", KERNELS, ids=[_kernel_id(*k) for k in KERNELS])
def test_load_leaves_nothing_on_disk(monkeypatch, tmp_path, dtype, variant):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    kernel = cpu_attention.load(dtype, variant)
    assert kernel is not None and kernel.name == f"kernel-{variant}-{TYPE_NAMES[dtype]}"
    assert list(tmp_path.iterdir()) == []


def _attention_kernels(pipeline):
    attentions = [m for m in pipeline.model.modules() if isinstance(m, CrossAttention)]
    assert attentions
    return {m.attend.name if isinstance(m.attend, cpu_attention.CpuAttention) else m.attend for m in attentions}


@pytest.mark.skipif("avx512" not in cpu_attention.variants(torch.bfloat16), reason="no AVX-512 BF16 on this CPU")
def test_bf16_kernel_drifts_from_fp32_no_more_than_torchs_bf16_attention(tiny_checkpoint, house_image):
    def image(precision: str, attention: str):
        pipe = ControlNetCannyPipeline.load([tiny_checkpoint], TINY_CONFIG, "cpu", precision,
                                            BackendOptions(attention=attention, calibration_cache=""))
        params = GenerationParams(prompt="a house", seed=3, ddim_steps=4, image_resolution=64)
        return pipe, pipe.generate([pipe.prepare(house_image, params)])[0].images[0].astype(int)

    _, reference = image("fp32", "torch")
    kernel_pipe, with_kernel = image("bf16", "avx512")
    _, with_torch = image("bf16", "torch")
    assert _attention_kernels(kernel_pipe) == {"kernel-avx512-bf16"}
    # bf16's own drift from fp32 on the tiny model is about 10 levels of 255 at the worst pixel (measured with
    # either attention and packing choice); the kernel may add a rounding step's worth, not more
    assert np.abs(with_kernel - reference).max() <= np.abs(with_torch - reference).max() + 2


@pytest.mark.parametrize("cpu", ["sandy-bridge", "not x86-64"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_where_no_variant_runs_attention_is_torchs(tiny_checkpoint, monkeypatch, cpu, precision):
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: CPU_CLASSES[cpu][0])
    pipeline = ControlNetCannyPipeline.load([tiny_checkpoint], TINY_CONFIG, device="cpu", precision=precision)
    assert _attention_kernels(pipeline) == {multihead_attention}


def test_without_the_kernel_attention_is_torchs(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("CC", "false")
    pipeline = ControlNetCannyPipeline.load([tiny_checkpoint], TINY_CONFIG, device="cpu", precision="fp32")
    assert _attention_kernels(pipeline) == {multihead_attention}


def test_variants_stay_within_the_instruction_sets_torch_runs_with(monkeypatch):
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: CPU_CLASSES["zen4"][0])
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cpu_attention.variants(torch.float32) == ["avx2"]
    assert cpu_attention.variants(torch.bfloat16) == []
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert cpu_attention.variants(torch.float32) == []


def test_a_library_that_cannot_be_mapped_leaves_attention_to_torch(monkeypatch):
    variant = cpu_attention.variants(torch.float32)[:1]
    if not variant:
        pytest.skip("no kernel variant runs on this CPU: nothing is compiled or mapped")

    def noexec(path):
        raise OSError(f"{path}: failed to map segment from shared object")

    monkeypatch.setattr(cpu_build.ctypes, "CDLL", noexec)
    assert cpu_attention.load(torch.float32, variant[0]) is None
