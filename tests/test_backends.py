"""Backends: the CPU levers are chosen by measurement (mocked here, so that each decision rule is tested on any
machine), cached, and can be forced; precision `auto`; the device contract the pipeline keeps (clocks and
progress read after a synchronisation, batched decoding)."""
from __future__ import annotations

import ctypes
import logging
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from controlnet_canny import pipeline as pipeline_module
from controlnet_canny.backends import Backend, BackendOptions, cpu, cpu_prepack, cpu_winograd
from controlnet_canny.backends.cpu_prepack import PackedConv2d, PackedLinear
from controlnet_canny.params import GenerationParams
from controlnet_canny.pipeline import ControlNetCannyPipeline, resolve_precision
from controlnet_canny.unet import CrossAttention, TokenProjection, multihead_attention

from conftest import TINY_CONFIG

needs_onednn = pytest.mark.skipif(not cpu_prepack.supported(torch.device("cpu"), torch.float32),
                                  reason="this torch build has no oneDNN: nothing to pack")


def _load(checkpoint, tmp_path, **options) -> ControlNetCannyPipeline:
    options.setdefault("calibration_cache", str(tmp_path))
    return ControlNetCannyPipeline.load([checkpoint], TINY_CONFIG, "cpu", "fp32", BackendOptions(**options))


class _Timed:
    """Stands in for the clock: a run's "seconds" are given by `cost(layer, input)`, not measured."""

    def __init__(self, monkeypatch, cost):
        self.calls = 0
        twin = cpu_prepack.packed_twin

        def tagged_twin(layer):
            packed = twin(layer)
            packed.plain_type = type(layer)
            return packed

        def fastest_seconds(run):
            self.calls += 1
            self.last = None
            run()
            return cost(*self.last)

        def record(module, args):
            self.last = (module, args[0])

        monkeypatch.setattr(cpu_prepack, "packed_twin", tagged_twin)
        monkeypatch.setattr(cpu, "fastest_seconds", fastest_seconds)
        self.hooks = [nn.modules.module.register_module_forward_pre_hook(record)]

    def close(self):
        for hook in self.hooks:
            hook.remove()


def _packed(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (PackedConv2d, PackedLinear))]


def _winograd(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (m.tile, m.max_positions) for name, m in model.named_modules()
            if isinstance(m, cpu_winograd.WinogradConv2d)}


def _plain_packable(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if cpu_prepack.packable(m)]


@needs_onednn
@pytest.mark.parametrize("durations, runs, expected", [
    ([0.009, 0.004, 0.005], 3, 0.004),  # a slow first run (a primitive built for a new shape) is not the figure
    ([0.030, 0.040, 0.001], 2, 0.030),  # two runs past the budget: no third
    ([0.001] * 9, 3, 0.001),
])
def test_a_candidate_is_timed_by_its_fastest_of_two_or_three_runs(monkeypatch, durations, runs, expected):
    starts_and_ends = np.cumsum(np.column_stack([np.zeros(len(durations)), durations]).ravel())
    clock, calls = iter(starts_and_ends), []
    monkeypatch.setattr(cpu.time, "perf_counter", lambda: next(clock))
    assert cpu.fastest_seconds(lambda: calls.append(1)) == pytest.approx(expected)
    assert len(calls) == runs


def test_packing_is_kept_only_for_layer_classes_that_win_at_every_shape(tiny_checkpoint, tmp_path, monkeypatch):
    # packed halves every layer's time, except convolutions on landscape inputs, where it doubles it (the cliff
    # seen on an AVX2 machine): every convolution sees a landscape shape, so none may be packed
    def cost(layer, x):
        packed = isinstance(layer, (PackedConv2d, PackedLinear))
        if packed and isinstance(layer, PackedConv2d) and x.shape[-1] > x.shape[-2]:
            return 2.0
        return 0.5 if packed else 1.0

    timed = _Timed(monkeypatch, cost)
    try:
        pipe = _load(tiny_checkpoint, tmp_path, attention="torch")
    finally:
        timed.close()
    model = pipe.model
    packed = _packed(model)
    assert packed, "linears win everywhere: they must be packed"
    assert all(isinstance(model.get_submodule(name), PackedLinear) for name in packed
               if not name.startswith("first_stage_model."))
    per_step = ("model.diffusion_model.", "control_model.", "cond_stage_model.")
    left_plain = _plain_packable(model)
    # every linear the denoising step and the text encoder run is packed...
    assert not [n for n in left_plain if n.startswith(per_step) and type(model.get_submodule(n)) in (nn.Linear, TokenProjection)
                and not n.startswith("control_model.input_hint_block")]
    # ...no spatial convolution of the denoising networks is, and the hint encoder, which the probe does not run,
    # stays plain
    assert any(n.startswith("model.diffusion_model.input_blocks.1.0.in_layers") for n in left_plain)
    assert any(n.startswith("control_model.input_hint_block") for n in left_plain)
    # The VAE decoder's convolutions are timed on the square size's maps only (`cpu._record_shapes`): a cliff on
    # landscape maps alone goes unseen there, and they are packed.
    assert all(isinstance(m, PackedConv2d) for m in _decoder_layers(model).values())
    assert "prepack" in pipe.backend.summary() and "measured" in pipe.backend.summary()


@needs_onednn
def test_measured_choices_are_cached_and_reused(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu.CpuWatch, "others_share", lambda self: 0.0)  # a busy machine's choices are not cached
    first = _load(tiny_checkpoint, tmp_path)
    assert len(list(tmp_path.glob("calibration-*.json"))) == 1

    def measure_again(*args):
        raise AssertionError("a cached choice was measured again")

    monkeypatch.setattr(cpu.CpuBackend, "_measure", measure_again)
    second = _load(tiny_checkpoint, tmp_path)
    assert _packed(second.model) == _packed(first.model)
    assert _winograd(second.model) == _winograd(first.model)
    assert {type(m.attend) for m in second.model.modules() if isinstance(m, CrossAttention)} == \
        {type(m.attend) for m in first.model.modules() if isinstance(m, CrossAttention)}
    assert "cached" in second.backend.summary()


@needs_onednn
def test_choices_timed_on_a_busy_machine_are_used_but_not_cached(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cpu.CpuWatch, "others_share", lambda self: 0.4)
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        busy = _load(tiny_checkpoint, tmp_path)
    assert not list(tmp_path.glob("calibration-*.json"))
    assert "others took 40% of the CPUs, not cached" in busy.backend.summary()
    assert "not cached, the next load measures again" in caplog.text
    monkeypatch.setattr(cpu.CpuWatch, "others_share", lambda self: 0.02)
    quiet = _load(tiny_checkpoint, tmp_path)
    assert len(list(tmp_path.glob("calibration-*.json"))) == 1 and "not cached" not in quiet.backend.summary()


def test_the_share_of_the_cpus_others_took_while_timing(monkeypatch):
    readings = iter([(100.0, 10.0), (108.0, 15.0)])  # (every process, this one) CPU seconds
    clock = iter([50.0, 60.0])
    monkeypatch.setattr(cpu, "cpu_seconds", lambda: next(readings))
    monkeypatch.setattr(cpu.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(cpu, "usable_cpus", lambda: {0, 3})
    assert cpu.CpuWatch().others_share() == pytest.approx((8 - 5) / (10 * 2))


def test_cpu_seconds_count_this_process_on_the_cpus_it_runs_on(monkeypatch):
    cpus = sorted(os.sched_getaffinity(0))
    others = set(cpus[1:])

    def busy_elsewhere() -> float:
        with monkeypatch.context() as patch:
            patch.setattr(cpu, "usable_cpus", lambda: others)
            return cpu.cpu_seconds()[0]

    os.sched_setaffinity(0, cpus[:1])  # the busy loop's CPU is then known
    try:
        busy, own = cpu.cpu_seconds()
        elsewhere = busy_elsewhere()
        deadline = time.process_time() + 0.3
        while time.process_time() < deadline:
            pass
        busy_after, own_after = cpu.cpu_seconds()
        elsewhere_after = busy_elsewhere()
    finally:
        os.sched_setaffinity(0, cpus)
    assert own_after - own >= 0.25
    assert busy_after - busy >= 0.8 * (own_after - own)  # its CPU's busy time includes ours (10 ms ticks)
    if others:  # and the loop is not counted on the CPUs it did not run on (quiet there during the test)
        assert elsewhere_after - elsewhere < 0.5 * (own_after - own)


def test_workers_loading_at_once_measure_one_after_another(tmp_path):
    measured = []

    def load():
        cache = cpu.CalibrationCache(tmp_path, torch.float32)
        with cache.exclusive():
            if "model" not in cache.entries:
                measured.append(1)
                time.sleep(0.2)  # the other worker arrives while this one measures
                cache.entries["model"] = {"packed": []}
                cache.save()
        return cache.entries["model"]

    workers = [threading.Thread(target=load) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(measured) == 1
    assert list(tmp_path.iterdir()) == [cpu.CalibrationCache(tmp_path, torch.float32).path]  # no lock file left


@needs_onednn
def test_no_cache_directory_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    _load(tiny_checkpoint, tmp_path, calibration_cache="")
    assert not list(tmp_path.rglob("*.json"))


@needs_onednn
def test_forced_choices(tiny_checkpoint, tmp_path):
    none = _load(tiny_checkpoint, tmp_path, prepack="none", attention="torch")
    assert _packed(none.model) == []
    assert all(m.attend is multihead_attention for m in none.model.modules() if isinstance(m, CrossAttention))
    everything = _load(tiny_checkpoint, tmp_path, prepack="all", winograd="none", attention="torch")
    per_step = ("model.diffusion_model.", "control_model.", "cond_stage_model.")
    assert not [n for n in _plain_packable(everything.model) if n.startswith(per_step)
                and not n.startswith("control_model.input_hint_block")]
    with pytest.raises(ValueError, match="backend.attention"):
        _load(tiny_checkpoint, tmp_path, attention="avx9000")
    with pytest.raises(ValueError, match="backend.prepack"):
        BackendOptions.from_mapping({"prepack": "sometimes"})
    assert _winograd(_load(tiny_checkpoint, tmp_path, winograd="none").model) == {}
    with pytest.raises(ValueError, match="backend.winograd"):
        BackendOptions.from_mapping({"winograd": "always"})
    with pytest.raises(ValueError, match="unknown keys"):
        BackendOptions.from_mapping({"packing": "all"})
    with pytest.raises(ValueError, match="backend.decoder_layout"):
        BackendOptions.from_mapping({"decoder_layout": "nhwc"})
    with pytest.raises(ValueError, match="backend.allocator"):
        BackendOptions.from_mapping({"allocator": "jemalloc"})


ALLOCATION_FAULTS = """
import resource, sys
import torch
from controlnet_canny.backends import BackendOptions
from controlnet_canny.pipeline import ControlNetCannyPipeline

pipe = ControlNetCannyPipeline.load([sys.argv[1]], sys.argv[2], "cpu", "fp32",
                                    BackendOptions(allocator=sys.argv[3], calibration_cache=sys.argv[4]))

def faults():  # page faults of allocating, filling and freeing 64 MiB, over glibc's largest mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2**24).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss_mib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024

faults()
print(pipe.backend.summary())
print(faults())
held = rss_mib()
pipe.backend.idle()
print(held - rss_mib())
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="not glibc: no mallopt")
@pytest.mark.parametrize("allocator", ["retain", "system"])
def test_the_allocator_retains_freed_memory_unless_told_not_to(tiny_checkpoint, tmp_path, allocator):
    """In a fresh process (the setting is process-wide): with `retain`, a step's large allocation reuses the pages
    the previous one freed, until the backend is idle; with `system`, glibc maps it afresh and every page faults
    again."""
    run = subprocess.run([sys.executable, "-c", ALLOCATION_FAULTS, str(tiny_checkpoint), str(TINY_CONFIG), allocator,
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary, faults, released_mib = run.stdout.splitlines()[-3:]
    assert f"allocator {allocator}" in summary
    pages = 2**26 // resource.getpagesize()
    assert int(faults) < pages // 10 if allocator == "retain" else int(faults) >= pages * 9 // 10
    # idle, the retained 64 MiB go back to the kernel (with `system` they already went)
    assert float(released_mib) > 48 if allocator == "retain" else abs(float(released_mib)) < 16


class _FakeKernel:
    def __init__(self, name):
        self.name = name

    def __call__(self, q, k, v, heads):
        return multihead_attention(q, k, v, heads)


@pytest.mark.parametrize("kernel_seconds, expected", [(0.5, "kernel-fake"), (0.97, "torch"), (2.0, "torch")])
def test_attention_kernel_is_kept_only_where_it_measured_faster(tiny_checkpoint, tmp_path, monkeypatch,
                                                                kernel_seconds, expected):
    monkeypatch.setattr(cpu.cpu_attention, "variants", lambda dtype: ["fake"])
    monkeypatch.setattr(cpu.cpu_attention, "load", lambda dtype, variant: _FakeKernel(f"kernel-{variant}"))
    monkeypatch.setattr(cpu, "_attention_seconds",
                        lambda attend, shapes, dtype: 1.0 if attend is multihead_attention else kernel_seconds)
    pipe = _load(tiny_checkpoint, tmp_path, prepack="none")
    attends = {m.attend.name if isinstance(m.attend, _FakeKernel) else "torch"
               for m in pipe.model.modules() if isinstance(m, CrossAttention)}
    assert attends == {expected}
    assert f"attention {expected}" in pipe.backend.summary()


def test_a_cpu_without_kernel_attends_with_torch(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu.cpu_attention, "variants", lambda dtype: [])
    pipe = _load(tiny_checkpoint, tmp_path, prepack="none")
    assert all(m.attend is multihead_attention for m in pipe.model.modules() if isinstance(m, CrossAttention))


@pytest.mark.parametrize("device, native_bf16, expected", [
    ("cpu", True, "bf16"), ("cpu", False, "fp32"), ("cuda", False, "fp16"), ("meta", True, "fp32"),
])
def test_precision_auto(monkeypatch, device, native_bf16, expected):
    monkeypatch.setattr(pipeline_module, "has_native_bf16", lambda: native_bf16)
    assert resolve_precision("auto", torch.device(device)) == expected


@pytest.mark.parametrize("flags, capability, expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", True), ({"avx2", "amx_bf16"}, "AVX512", True),
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX2", False), ({"avx2", "avx512f"}, "AVX512", False),
])
def test_native_bf16_needs_the_flags_and_torchs_capability(monkeypatch, flags, capability, expected):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu.has_native_bf16() is expected


def test_explicit_bf16_without_native_bf16_warns_with_the_measured_cost(monkeypatch, caplog):
    monkeypatch.setattr(pipeline_module, "has_native_bf16", lambda: False)
    monkeypatch.setattr(pipeline_module, "slowdown_of_emulated_bf16", lambda: 27.0)
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert "27x slower than fp32" in caplog.text
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", torch.device("cpu"))


class _CountingBackend(Backend):
    """The device contract, observed: the pipeline synchronises before reading a clock, decodes in batches and
    tells the backend when it is idle."""

    decode_batch = 2

    def __init__(self, events: list):
        super().__init__(torch.device("cpu"), torch.float32)
        self.events = events

    def synchronize(self) -> None:
        self.events.append("sync")

    def idle(self) -> None:
        self.events.append("idle")


def test_clocks_read_after_a_synchronisation_and_decoding_is_batched(tiny_pipeline, house_image, monkeypatch):
    events: list = []
    monkeypatch.setattr(tiny_pipeline, "backend", _CountingBackend(events))
    decode = tiny_pipeline._decode

    def spy_decode(latents, taesd=None):
        events.append(("decode", latents.shape[0]))
        return decode(latents, taesd)

    monkeypatch.setattr(tiny_pipeline, "_decode", spy_decode)
    monkeypatch.setattr(pipeline_module.time, "perf_counter", lambda: events.append("clock") or 0.0)
    prepared = tiny_pipeline.prepare(house_image, GenerationParams(prompt="a house", num_samples=3, ddim_steps=2,
                                                                   image_resolution=64, seed=1))
    (result,) = tiny_pipeline.generate([prepared])
    assert [e for e in events if isinstance(e, tuple)] == [("decode", 2), ("decode", 1)]
    clocks = [i for i, e in enumerate(events) if e == "clock"]
    # every phase's closing clock follows a synchronisation: text and sampling end with queued device work
    assert events[clocks[1] - 1] == "sync" and events[clocks[3] - 1] == "sync"
    assert len(result.images) == 3 and all(image.dtype == np.uint8 for image in result.images)
    assert events[-1] == "idle" and events.count("idle") == 1  # once the batch is done, not between its steps


def test_shapes_carried_from_the_reference_probe_are_those_each_size_runs(tiny_pipeline):
    sizes = [(32, 32), (32, 40), (32, 56), (40, 32)]
    carried_layers, channels_last, carried_attention = cpu._record_shapes(tiny_pipeline.model, tiny_pipeline._probe,
                                                                           sizes)
    decoder = tiny_pipeline.model.first_stage_model.decoder
    seen: dict = {}
    seen_attention: dict = {}
    seen_channels_last = set()
    probed = []

    def record_layer(m, args):
        if m not in set(decoder.modules()) or probed[-1] == sizes[0]:  # the decoder's: at the first size only
            seen.setdefault(m, set()).add(tuple(args[0].shape))
        if args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous():
            seen_channels_last.add(m)

    hooks = [m.register_forward_pre_hook(record_layer) for m in carried_layers]
    attentions = [m for m in tiny_pipeline.model.modules() if isinstance(m, CrossAttention)]
    swapped = [(m, m.attend) for m in attentions]

    def record(q, k, v, heads):
        key = (tuple(q.shape), tuple(k.shape), heads)
        seen_attention[key] = seen_attention.get(key, 0) + 1
        return multihead_attention(q, k, v, heads)

    for m in attentions:
        m.attend = record
    try:
        with torch.inference_mode():
            for size in sizes:
                probed.append(size)
                tiny_pipeline._probe(size)
    finally:
        for hook in hooks:
            hook.remove()
        for m, attend in swapped:
            m.attend = attend
    assert seen == carried_layers
    assert seen_attention == carried_attention
    decoder_layers = {m for m in carried_layers if m in set(decoder.modules())}
    assert decoder_layers and {(m.in_channels, m.out_channels) for m in decoder_layers} >= {(32, 32), (64, 64)}
    # the decoder's maps arrive channels-last (its default layout on CPU) but for the latents (conv_in's input).
    # (Outside it, this pipeline's packed twins can give the UNet's 1x2 deepest maps at the reference latent
    # strides of either layout; the calibration watches the model before any twin is installed.)
    assert seen_channels_last & decoder_layers == channels_last & decoder_layers == decoder_layers - {decoder.conv_in}


# --- Winograd 3x3 convolutions ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def transforms():
    loaded = cpu_winograd.load()
    if loaded is None:
        pytest.skip("the Winograd transforms do not build or run here (they need AVX2 and a C compiler)")
    return loaded


# Measured error of the output, relative to its largest magnitude, on the UNet's 320-2560 channel convolutions
# (scripts/bench_conv.py, docs/benchmarks.md): F(2x2) 7e-7..1.3e-6, F(4x4) 1.3e-5..3e-5 (a direct fp32 convolution:
# 3e-7..5e-6 by its kernel). The bounds leave 3-8x of that; a wrong tap or coefficient is off by ~1.
TOLERANCE = {2: 1e-5, 4: 1e-4}


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("tile", cpu_winograd.TILES)
@pytest.mark.parametrize("batch, channels, out_channels, height, width, bias", [
    (2, 16, 32, 8, 8, True), (1, 32, 16, 5, 7, True), (3, 16, 16, 1, 1, False), (2, 32, 16, 4, 10, True),
    (1, 64, 64, 9, 6, True), (2, 640, 640, 8, 10, True),  # the last: a UNet level's channels, as the model runs
])
def test_winograd_convolution_equals_the_direct_one(transforms, tile, batch, channels, out_channels, height, width,
                                                    bias):
    conv = nn.Conv2d(channels, out_channels, 3, padding=1, bias=bias).requires_grad_(False)
    x = torch.randn(batch, channels, height, width)
    with torch.inference_mode():
        expected = conv(x)
        got = cpu_winograd.WinogradConv2d(conv, tile, batch * height * width, transforms)(x)
    assert got.shape == expected.shape and got.is_contiguous()
    assert _relative_error(got, expected) < TOLERANCE[tile]


@pytest.mark.parametrize("tile", cpu_winograd.TILES)
def test_winograd_keeps_a_channels_last_map_channels_last(transforms, tile):
    conv = nn.Conv2d(32, 16, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 32, 6, 10).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = cpu_winograd.WinogradConv2d(conv, tile, 2 * 6 * 10, transforms)(x)
        expected = conv(x.contiguous())
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    assert _relative_error(got, expected) < TOLERANCE[tile]


@pytest.mark.parametrize("tile", cpu_winograd.TILES)
def test_winograd_runs_a_larger_batch_in_parts_and_a_larger_map_by_the_convolution_it_replaced(transforms, tile):
    conv = nn.Conv2d(16, 32, 3, padding=1).requires_grad_(False)
    calls = []
    hook = conv.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    twin = cpu_winograd.WinogradConv2d(conv, tile, 2 * 8 * 8, transforms)
    with torch.inference_mode():
        for shape in [(2, 16, 8, 8), (1, 16, 8, 16), (5, 16, 8, 8), (3, 16, 5, 7)]:  # at most 2 x 8 x 8 per part
            x = torch.randn(shape)
            expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
            assert _relative_error(twin(x), expected) < TOLERANCE[tile]
        assert calls == []
        twin(torch.randn(1, 16, 8, 17))
    hook.remove()
    assert calls == [(1, 16, 8, 17)]


def test_winograd_takes_plain_3x3_fp32_convolutions_of_whole_lanes_only():
    assert cpu_winograd.applicable(nn.Conv2d(16, 32, 3, padding=1), torch.float32)
    assert not cpu_winograd.applicable(nn.Conv2d(16, 32, 3, padding=1), torch.bfloat16)
    for other in (nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.Conv2d(16, 16, 1),
                  nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.Conv2d(16, 16, 3, padding=2, dilation=2),
                  nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"), nn.Linear(16, 16),
                  nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)):  # the C transforms take 16 lanes
        assert not cpu_winograd.applicable(other, torch.float32)


# The calibration shapes of one class: a square and a landscape map, batch 2. The largest has 2 x 8 x 16 = 256
# positions, at twice its sides 1024.
CLASS_SHAPES = [(2, 16, 8, 8), (2, 16, 8, 16)]


@needs_onednn
@pytest.mark.parametrize("prepack, packed_seconds, f2_wins_up_to, f4_seconds, expected", [
    ("none", None, 10**6, 1.0, (False, 2, 1024)),  # wins at every size timed: up to twice the sides
    ("none", None, 1000, 1.0, (False, 2, 256)),  # loses at twice the sides: up to the calibration shapes
    ("none", None, 200, 1.0, (False, 0, 0)),  # loses at a calibration shape: never
    ("auto", 0.4, 10**6, 1.0, (True, 0, 0)),  # packed is faster still: packed alone
    ("auto", 0.8, 10**6, 1.0, (True, 2, 1024)),  # both win: Winograd over packed, packed beyond Winograd's bound
    ("auto", 2.0, 1000, 1.0, (False, 2, 256)),  # packing loses: Winograd over plain
    ("none", None, 10**6, 0.3, (False, 4, 1024)),  # F(4x4) beats F(2x2) everywhere: the larger tile
    ("none", None, 10**6, 0.49, (False, 2, 1024)),  # F(4x4) within timing noise of F(2x2): the smaller tile
    ("none", None, 200, 0.3, (False, 4, 1024)),  # F(4x4) wins where F(2x2) loses: the larger tile
])
def test_winograd_runs_the_faster_tile_up_to_the_largest_input_it_won_at(monkeypatch, transforms, prepack,
                                                                         packed_seconds, f2_wins_up_to, f4_seconds,
                                                                         expected):
    def cost(layer, x):
        if isinstance(layer, cpu_winograd.WinogradConv2d):
            if layer.tile == 4:
                return f4_seconds
            return 0.5 if cpu._positions(x.shape) <= f2_wins_up_to else 2.0
        return packed_seconds if isinstance(layer, PackedConv2d) else 1.0

    timed = _Timed(monkeypatch, cost)
    try:
        backend = cpu.CpuBackend(torch.device("cpu"), torch.float32, BackendOptions(prepack=prepack))
        chosen = backend._choose_twin(nn.Conv2d(16, 16, 3, padding=1).requires_grad_(False), CLASS_SHAPES)
    finally:
        timed.close()
    assert chosen == expected


@needs_onednn
@pytest.mark.parametrize("tile", cpu_winograd.TILES)
def test_winograd_installed_where_it_won_gives_the_plain_image(tiny_checkpoint, tmp_path, monkeypatch, house_image,
                                                               transforms, tile):
    """Winograd (`tile` the faster) wins over packed convolutions, which win over plain: every 3x3 convolution the
    probe runs gets Winograd instead of packing (larger maps run plain: no second copy of a weight); the images
    stay those of the plain pipeline."""
    def cost(layer, x):
        if isinstance(layer, cpu_winograd.WinogradConv2d):
            return 0.5 if layer.tile == tile else 0.6
        return 0.8 if isinstance(layer, (PackedConv2d, PackedLinear)) else 1.0

    timed = _Timed(monkeypatch, cost)
    try:
        pipe = _load(tiny_checkpoint, tmp_path, attention="torch")
    finally:
        timed.close()
    winograd = _winograd(pipe.model)
    probed = ("model.diffusion_model.", "control_model.", "first_stage_model.decoder.")
    assert winograd and all(n.startswith(probed) for n in winograd)
    assert any(n.startswith("first_stage_model.decoder.up.0.") for n in winograd)
    assert {chosen for chosen, _ in winograd.values()} == {tile}
    assert not any(n.startswith("control_model.input_hint_block") for n in winograd)  # the probe does not time it
    assert all(type(pipe.model.get_submodule(n).conv) is nn.Conv2d for n in winograd)
    assert _packed(pipe.model), "the linears won packed"
    assert f"{len(winograd)} F({tile}x{tile})" in pipe.backend.summary()
    plain = _load(tiny_checkpoint, tmp_path, prepack="none", winograd="none", attention="torch", calibration_cache="")
    params = GenerationParams(prompt="a house", image_resolution=64, ddim_steps=3, seed=4)
    image = pipe.generate([pipe.prepare(house_image, params)])[0].images[0]
    reference = plain.generate([plain.prepare(house_image, params)])[0].images[0]
    assert np.abs(image.astype(int) - reference).max() <= 1


@needs_onednn
def test_without_the_transforms_no_convolution_gets_winograd(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")
    assert cpu_winograd.load() is None
    pipe = _load(tiny_checkpoint, tmp_path, attention="torch")
    assert _winograd(pipe.model) == {}
    assert "0 F(2x2), 0 F(4x4) convolutions" in pipe.backend.summary()


# --- the VAE decoder ----------------------------------------------------------------------------------------------

def _decoder_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder's packable layers (or their twins), by name: its 3x3 convolutions."""
    decoder = model.first_stage_model.decoder
    replaced = {m.conv for m in decoder.modules() if isinstance(m, cpu_winograd.WinogradConv2d)}
    return {name: m for name, m in decoder.named_modules() if isinstance(m, (PackedConv2d, cpu_winograd.WinogradConv2d))
            or cpu_prepack.packable(m) and m not in replaced}


def _decoded(pipe: ControlNetCannyPipeline) -> torch.Tensor:
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return pipe.model.first_stage_model.decode(latents).contiguous()


@pytest.fixture(scope="module")
def plain_decoded(tiny_checkpoint, tmp_path_factory) -> torch.Tensor:
    """The tiny decoder's output with every lever off and its maps as loaded."""
    plain = _load(tiny_checkpoint, tmp_path_factory.mktemp("plain"), prepack="none", winograd="none",
                  attention="torch", decoder_layout="contiguous", calibration_cache="")
    assert all(type(m) is nn.Conv2d and m.weight.is_contiguous() for m in _decoder_layers(plain.model).values())
    return _decoded(plain)


@needs_onednn
def test_the_decoders_layers_are_calibrated_on_its_channels_last_maps(tiny_checkpoint, tmp_path, monkeypatch,
                                                                      plain_decoded):
    """Packing wins everywhere (Winograd is off): every 3x3 convolution of the decoder is packed, after being
    timed on channels-last maps of the sizes the probe's decode carried over; the decoded image stays."""
    layouts: dict[str, set[bool]] = {}

    def cost(layer, x):
        if isinstance(layer, PackedConv2d) or type(layer) is nn.Conv2d:
            layouts.setdefault(type(layer).__name__, set()).add(x.is_contiguous(memory_format=torch.channels_last)
                                                                and not x.is_contiguous())
        return 0.5 if isinstance(layer, (PackedConv2d, PackedLinear)) else 1.0

    timed = _Timed(monkeypatch, cost)
    try:
        pipe = _load(tiny_checkpoint, tmp_path, winograd="none", attention="torch")
    finally:
        timed.close()
    layers = _decoder_layers(pipe.model)
    assert set(layers) >= {"conv_in", "conv_out", "mid.block_1.conv1", "up.0.block.0.conv1", "up.1.upsample.conv"}
    assert all(isinstance(m, PackedConv2d) for m in layers.values())
    assert {True, False} == layouts["Conv2d"] == layouts["PackedConv2d"]  # the decoder's maps, and the UNet's
    assert (_decoded(pipe) - plain_decoded).abs().max() <= 1e-5 * plain_decoded.abs().max()


@needs_onednn
def test_prepack_all_packs_the_decoder_and_keeps_its_image(tiny_checkpoint, tmp_path, plain_decoded):
    pipe = _load(tiny_checkpoint, tmp_path, prepack="all", winograd="none", attention="torch")
    assert all(isinstance(m, PackedConv2d) for m in _decoder_layers(pipe.model).values())
    assert (_decoded(pipe) - plain_decoded).abs().max() <= 1e-5 * plain_decoded.abs().max()


@needs_onednn
@pytest.mark.parametrize("tile", cpu_winograd.TILES)
def test_winograd_in_the_decoder_keeps_its_image(tiny_checkpoint, tmp_path, monkeypatch, transforms, tile,
                                                 plain_decoded):
    def cost(layer, x):
        if isinstance(layer, cpu_winograd.WinogradConv2d):
            return 0.5 if layer.tile == tile else 0.6
        return 1.0

    timed = _Timed(monkeypatch, cost)
    try:
        pipe = _load(tiny_checkpoint, tmp_path, attention="torch")
    finally:
        timed.close()
    layers = _decoder_layers(pipe.model)
    winograd = [name for name, m in layers.items() if isinstance(m, cpu_winograd.WinogradConv2d)]
    # every 3x3 convolution of whole lanes in and out: all but conv_in (4 channels in) and conv_out (3 out)
    assert sorted(winograd) == sorted(set(layers) - {"conv_in", "conv_out"})
    decoded = _decoded(pipe)
    assert decoded.shape == plain_decoded.shape
    assert (decoded - plain_decoded).abs().max() <= TOLERANCE[tile] * plain_decoded.abs().max()


@needs_onednn
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_prepack_none_and_winograd_none_leave_the_decoder_plain(tiny_checkpoint, tmp_path, plain_decoded, layout):
    pipe = _load(tiny_checkpoint, tmp_path, prepack="none", winograd="none", decoder_layout=layout)
    layers = _decoder_layers(pipe.model)
    assert layers and all(type(m) is nn.Conv2d for m in layers.values())
    channels_last = layout == "channels_last"
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) is channels_last for m in layers.values())
    with torch.inference_mode():
        latents = torch.randn(1, 4, 8, 8)
        assert pipe.model.first_stage_model.decoder(latents).is_contiguous() is not channels_last
    assert (_decoded(pipe) - plain_decoded).abs().max() <= 1e-5 * plain_decoded.abs().max()


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_the_stores_taesd_is_laid_out_as_the_decoder_and_decodes_the_same(tiny_checkpoint, tmp_path, layout):
    from make_tiny_adapters import write_taesd

    from controlnet_canny.taesd import read_taesd

    files = write_taesd(tmp_path / "store" / "taesd", "madebyollin", seed=0)
    pipe = _load(tiny_checkpoint, tmp_path, prepack="none", winograd="none", decoder_layout=layout)
    pipe.attach_adapters(tmp_path / "store")
    taesd = pipe._store_taesd()
    convolutions = [m for m in taesd.modules() if isinstance(m, nn.Conv2d)]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) is (layout == "channels_last")
                                for m in convolutions if m.kernel_size != (1, 1))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    as_loaded = read_taesd(files).decode(latents)
    assert (taesd.decode(latents) - as_loaded).abs().max() <= 1e-5 * as_loaded.abs().max()
