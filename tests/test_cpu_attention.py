"""The attention kernel (controlnet_canny.backends.cpu_attention): torch's accuracy at every shape the models use."""
from __future__ import annotations

import functools
import tempfile

import numpy as np
import pytest
import torch

from controlnet_canny.backends import cpu_attention
from controlnet_canny.params import GenerationParams
from controlnet_canny.pipeline import ControlNetCannyPipeline
from controlnet_canny.unet import CrossAttention, multihead_attention

from conftest import TINY_CONFIG

DTYPES = [dtype for dtype in (torch.float32, torch.bfloat16) if cpu_attention.supported(torch.device("cpu"), dtype)]
pytestmark = pytest.mark.skipif(not DTYPES, reason="no AVX-512 on this CPU")


@functools.cache
def _kernel(dtype):
    loaded = cpu_attention.load(dtype)
    assert loaded is not None, "the CPU takes the kernel but it did not compile"
    return loaded


@pytest.fixture(params=DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
def kernel(request):
    return _kernel(request.param)


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
# tokens), the tiny model's (4, 8), and sizes that fill no tile exactly.
SHAPES = [
    (2, 1024, 1024, 8, 40), (1, 1024, 77, 8, 40), (2, 256, 256, 8, 80), (2, 64, 77, 8, 160), (2, 16, 16, 8, 160),
    (1, 64, 64, 8, 4), (2, 16, 77, 8, 8), (3, 5, 3, 5, 8), (1, 1, 1, 1, 2), (2, 33, 17, 2, 48), (1, 100, 97, 3, 18),
]
# bf16 multiplies in pairs (odd head dims go to torch: tested below); fp32 takes odd head dims too.
CASES = [(dtype, shape) for dtype in DTYPES
         for shape in SHAPES + ([(2, 9, 40, 3, 5), (1, 20, 7, 1, 1)] if dtype == torch.float32 else [])]


@pytest.mark.parametrize("dtype, shape", CASES, ids=[f"{str(d).removeprefix('torch.')}-{s}" for d, s in CASES])
def test_as_accurate_as_torch(dtype, shape, threads):
    kernel = _kernel(dtype)
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


REFUSED = [(kernel_dtype, case) for kernel_dtype in DTYPES for case in ("other dtype", "head dim over 160")]
REFUSED += [(torch.bfloat16, "odd head dim")] if torch.bfloat16 in DTYPES else []


@pytest.mark.parametrize("kernel_dtype, case", REFUSED, ids=[f"{str(d).removeprefix('torch.')}-{c}" for d, c in REFUSED])
def test_what_it_does_not_take_goes_to_torch(kernel_dtype, case):
    kernel = _kernel(kernel_dtype)
    dtype = {torch.float32: torch.bfloat16, torch.bfloat16: torch.float32}[kernel_dtype] if case == "other dtype" else kernel_dtype
    heads, dim = {"odd head dim": (2, 5), "head dim over 160": (1, 168)}.get(case, (2, 8))
    q, k, v = _inputs(dtype, 2, 6, 6, heads, dim)
    assert not kernel.takes(q, k, v, heads)
    assert torch.equal(kernel(q, k, v, heads), multihead_attention(q, k, v, heads))


@pytest.mark.parametrize("compiler", ["false", "/nonexistent/cc"])
def test_without_a_working_compiler_attention_stays_on_torch(monkeypatch, tmp_path, compiler):
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cpu_attention.load(DTYPES[0]) is None
    assert list(tmp_path.iterdir()) == []  # the build directory is gone


def test_load_leaves_nothing_on_disk(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cpu_attention.load(DTYPES[0]) is not None
    assert list(tmp_path.iterdir()) == []


def _attention_kernels(pipeline):
    attentions = [m for m in pipeline.model.modules() if isinstance(m, CrossAttention)]
    assert attentions
    return {m.attend.dtype if isinstance(m.attend, cpu_attention.CpuAttention) else m.attend for m in attentions}


def test_pipelines_attend_with_the_kernel_of_their_dtype(tiny_pipeline):
    assert _attention_kernels(tiny_pipeline) == {torch.float32}


@pytest.mark.skipif(torch.bfloat16 not in DTYPES, reason="no AVX-512 BF16 on this CPU")
def test_bf16_pipeline_stays_close_to_fp32(tiny_checkpoint, tiny_pipeline, house_image):
    bf16 = ControlNetCannyPipeline.load([tiny_checkpoint], TINY_CONFIG, device="cpu", precision="bf16")
    assert _attention_kernels(bf16) == {torch.bfloat16}
    params = GenerationParams(prompt="a house", seed=3, ddim_steps=4, image_resolution=64)
    image, reference = (pipe.generate([pipe.prepare(house_image, params)]).images[0][0].astype(int)
                        for pipe in (bf16, tiny_pipeline))
    # bf16's drift from fp32 on the tiny model (`bench.py --drift`): a few levels of 255.
    assert np.abs(image - reference).max() <= 8


def test_without_the_kernel_attention_is_torchs(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("CC", "false")
    pipeline = ControlNetCannyPipeline.load([tiny_checkpoint], TINY_CONFIG, device="cpu", precision="fp32")
    assert _attention_kernels(pipeline) == {multihead_attention}
