"""LoRAs fused by the CPU backend into copies of the layers they patch (its twins, with merged weights): the same
result as the unfused hooks within rounding, the model's own layers untouched (requests without LoRAs stay
bit-identical), fused copies kept least recently used first within a memory budget, and the choice, measured or
forced by `handler.backend`."""
from __future__ import annotations

import copy
import gc

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIG
from controlnet_canny.backends import Backend, BackendOptions, cpu_prepack, cpu_winograd
from controlnet_canny.backends.cpu import CpuBackend
from controlnet_canny.backends.cpu_lora import FusedCache, FusedLoRA, LoRAApplication, fused_bytes
from controlnet_canny.checkpoint import load_weights
from controlnet_canny.config import load_config
from controlnet_canny.lora import LoRAPatch, lora_targets, read_lora
from controlnet_canny.model import ControlLDM
from controlnet_canny.params import Limits, parse_params
from controlnet_canny.pipeline import ControlNetCannyPipeline
from make_tiny_adapters import write_lora

CONFIG = load_config(TINY_CONFIG)
CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not cpu_prepack.supported(CPU, torch.float32), reason="no oneDNN packing here")


def _backend(**options) -> CpuBackend:
    return CpuBackend(CPU, torch.float32, BackendOptions(calibration_cache="", **options))


@pytest.fixture(scope="module")
def twins(tiny_checkpoint) -> ControlLDM:
    """The tiny model in fp32 with the CPU backend's three kinds of layer: 3x3 convolutions by Winograd (where its
    transforms build), the other packable layers packed, 1x1 convolutions plain."""
    with torch.device("meta"):
        model = ControlLDM(CONFIG)
    load_weights(model, [tiny_checkpoint], CPU, torch.float32)
    transforms = cpu_winograd.load()

    def twin_of(layer):
        if transforms is not None and cpu_winograd.applicable(layer, torch.float32):
            return lambda plain: cpu_winograd.WinogradConv2d(plain, 2, 1 << 30, transforms)
        return cpu_prepack.packed_twin

    cpu_prepack.install_twins(model, twin_of)
    return model.eval()


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    """Three UNet patches: two LoRAs together (ranks 4 and 8), and each alone."""
    out = tmp_path_factory.mktemp("loras")
    with torch.device("meta"):
        targets = lora_targets(ControlLDM(CONFIG))
    first = read_lora(write_lora(out / "a.safetensors", CONFIG, "kohya", 4, seed=1, alpha=2.0), targets, CONFIG.unet)
    second = read_lora(write_lora(out / "b.safetensors", CONFIG, "peft", 8, seed=2), targets, CONFIG.unet)
    return [LoRAPatch.build(loras, CPU, torch.float32).unet_only()
            for loras in ([(first, 0.7), (second, -0.4)], [(first, 1.0)], [(second, 1.0)])]


def _eps(model: ControlLDM, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    control = [0.5 * torch.randn(2, c, s, s, generator=g)
               for c, s in [(32, 8)] * 3 + [(32, 4)] + [(64, 4)] * 2 + [(64, 2)] * 3 + [(64, 1)] * 4]
    with torch.inference_mode():
        return model.model.diffusion_model(x, torch.tensor([951, 1]), context, control)


def _modules(model, paths):
    return [model.get_submodule(p) for p in paths]


def test_fused_equals_unfused_and_leaves_the_model_as_it_was(twins, patches):
    patch = patches[0]
    backend = _backend(lora_fusion="fused")
    application = backend.lora_application(patch, twins)
    own = _modules(twins, patch.layers)
    kinds = {type(m).__name__ for m in own}
    assert {"PackedLinear", "PackedConv2d", "Conv2d"} <= kinds  # and WinogradConv2d where its transforms build
    base = _eps(twins)
    with patch.applied(twins):
        unfused = _eps(twins)
    with application.applied(twins):
        fused_layers = _modules(twins, patch.layers)
        fused = _eps(twins)
    # each fused layer is the twin the model has at its path, a new one
    assert [type(m) for m in fused_layers] == [type(m) for m in own]
    assert not any(a is b for a, b in zip(fused_layers, own))
    assert all(a is b for a, b in zip(_modules(twins, patch.layers), own))
    scale = unfused.abs().max().item()
    assert (fused - unfused).abs().max().item() <= 1e-4 * scale  # oneDNN's kernels and the merge round differently
    assert (unfused - base).abs().max().item() > 0.05
    assert torch.equal(_eps(twins), base)  # after a fused evaluation, bit-identical


def test_layers_are_restored_on_error(twins, patches):
    application = _backend(lora_fusion="fused").lora_application(patches[1], twins)
    own = _modules(twins, patches[1].layers)
    with pytest.raises(RuntimeError, match="boom"):
        with application.applied(twins):
            raise RuntimeError("boom")
    assert all(a is b for a, b in zip(_modules(twins, patches[1].layers), own))


class Owner:
    """What a fused copy is kept for (a LoRAApplication): weakly referenced."""


def test_fused_copies_are_kept_least_recently_used_first_within_the_budget(twins, patches):
    backend = _backend()
    fused = FusedLoRA(patches[1], twins, backend._twin_like)
    owners = [Owner() for _ in range(4)]
    cache = FusedCache(2 * fused.nbytes)
    assert cache.put(owners[0], fused) and cache.put(owners[1], fused)
    assert cache.get(owners[0]) is fused  # owners[1] is now the least recently used
    assert cache.put(owners[2], fused)
    assert cache.get(owners[1]) is None and cache.get(owners[0]) is fused and cache.get(owners[2]) is fused
    assert len(cache) == 2 and cache.nbytes == 2 * fused.nbytes
    # a copy larger than the whole budget is not kept, and drops nothing
    assert not FusedCache(fused.nbytes - 1).put(owners[3], fused)
    big = FusedLoRA(patches[0], twins, backend._twin_like)
    cache.budget = big.nbytes - 1
    assert not cache.put(owners[3], big) and cache.get(owners[3]) is None
    # an owner collected: its copy goes with it
    collected, kept = owners[0], owners[2]
    del owners, collected
    gc.collect()
    assert len(cache) == 1 and cache.get(kept) is fused


def test_where_no_layer_fits_the_budget_a_set_stays_unfused(twins, patches):
    backend = _backend(lora_fusion="fused", lora_cache_mib="0")
    application = backend.lora_application(patches[1], twins)
    own = _modules(twins, patches[1].layers)
    with patches[1].applied(twins):
        unfused = _eps(twins)
    for _ in range(2):  # the first evaluation measures the hooks, the second finds that none fits
        with application.applied(twins):
            assert all(a is b for a, b in zip(_modules(twins, patches[1].layers), own))
            assert torch.equal(_eps(twins), unfused)
    assert application.choice == "unfused" and len(backend.fused_loras) == 0


def test_over_the_budget_the_layers_whose_hooks_cost_most_per_byte_are_fused(twins, patches):
    """A set whose whole copy exceeds the budget: its first evaluation runs unfused and times each layer's hook;
    then the layers whose hooks took the most time per byte of copy are fused, as many as fit, and the others keep
    their hooks."""
    patch = patches[0]
    backend = _backend(lora_fusion="fused")
    application = backend.lora_application(patch, twins)
    sizes = fused_bytes(patch, twins)
    largest, smallest = max(sizes, key=sizes.get), min(sizes.values())
    backend.fused_loras.budget = sizes[largest] + smallest  # room for the largest layer and one of the smallest
    own = _modules(twins, patch.layers)
    base = _eps(twins)
    with patch.applied(twins):
        unfused = _eps(twins)
    with application.applied(twins):
        assert all(a is b for a, b in zip(_modules(twins, patch.layers), own))
        assert torch.equal(_eps(twins), unfused)
    assert set(application.hook_seconds) == set(patch.layers) and all(application.hook_seconds.values())
    # as if the largest layer's hook were by far the costliest per byte
    application.hook_seconds = dict.fromkeys(patch.layers, 1e-9) | {largest: 1.0}
    with application.applied(twins):
        swapped = {path for path, own_layer in zip(patch.layers, own) if twins.get_submodule(path) is not own_layer}
        partly_fused = _eps(twins)
    assert largest in swapped and len(swapped) == 2 and sum(sizes[path] for path in swapped) == sizes[largest] + smallest
    assert (partly_fused - unfused).abs().max().item() <= 1e-4 * unfused.abs().max().item()
    assert all(a is b for a, b in zip(_modules(twins, patch.layers), own))
    assert torch.equal(_eps(twins), base)


def _swapped(application, model, patch) -> bool:
    """Whether an evaluation under `application` runs on other layers than the model's own (its fused copy)."""
    own = _modules(model, patch.layers)
    with application.applied(model):
        return not any(a is b for a, b in zip(_modules(model, patch.layers), own))


def test_choice_forced(twins, patches):
    patch = patches[1]
    assert Backend(CPU, torch.float32).lora_application(patch, twins) is patch  # other devices: unfused hooks
    assert _backend(lora_fusion="unfused").lora_application(patch, twins) is patch
    assert _swapped(_backend(lora_fusion="fused").lora_application(patch, twins), twins, patch)


def test_choice_measured(twins, patches):
    """auto: the first evaluation runs unfused and is measured; a set whose hooks cost under min_share of it stays
    unfused, another runs unfused until the time its hooks added reaches what building its copy costs."""
    patch = patches[1]
    with patch.applied(twins):
        unfused = _eps(twins)
    for min_share, fuses in ((0.0, True), (float("inf"), False)):
        backend = _backend()
        application = LoRAApplication(patch, "auto", backend.fused_loras, backend._twin_like,
                                      lambda run: (run(), 1e-3)[1], min_share)
        with application.applied(twins):  # measured, unfused
            assert torch.equal(_eps(twins), unfused)
        assert application.unfused_share > 0 and application.unfused_seconds > 0
        backend.fused_loras.seconds_per_byte = 1.0  # a build would cost more than the hooks have added so far
        assert not _swapped(application, twins, patch)
        backend.fused_loras.seconds_per_byte = 0.0
        assert _swapped(application, twins, patch) == fuses
        assert (application.choice == "unfused") != fuses


@pytest.mark.parametrize("options, message", [({"lora_fusion": "always"}, "lora_fusion"),
                                              ({"lora_cache_mib": "1.5"}, "lora_cache_mib")])
def test_bad_options_named(options, message):
    with pytest.raises(ValueError, match=message):
        BackendOptions.from_mapping(options)


def test_pipeline_requests_without_loras_bit_identical_around_a_fused_one(tiny_checkpoint, house_image, tmp_path):
    write_lora(tmp_path / "loras" / "style.safetensors", CONFIG, "kohya", rank=4, seed=1, alpha=2.0)
    pipe = ControlNetCannyPipeline.load([tiny_checkpoint], TINY_CONFIG, "cpu", "fp32",
                                        BackendOptions(lora_fusion="fused"), adapters=tmp_path)

    def image(**fields):
        params = parse_params({"prompt": "a house", "image_resolution": 64, "seed": 7, "ddim_steps": 2, **fields},
                              Limits(image_resolution=(64, 768)))
        return pipe.generate([pipe.prepare(house_image, params)])[0].images[0].astype(int)

    before = image()
    styled = image(loras="style:1")
    assert len(pipe.backend.fused_loras) == 1
    assert np.array_equal(image(), before)
    assert np.abs(styled - before).mean() > 1
