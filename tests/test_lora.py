"""LoRA files: every layout read onto the tiny model's layers, the errors a bad file gives, the unfused application
(hooks) against merged weights, and parity with diffusers' `load_lora_weights` + `set_adapters` (fp32, CPU).

The files are written by scripts/make_tiny_adapters.py in the real key layouts, with seeded random factors.
"""
from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import warnings

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from conftest import ROOT, TINY_CONFIG
from controlnet_canny.adapter_files import AdapterError
from controlnet_canny.checkpoint import load_weights, read_state_dict
from controlnet_canny.config import load_config
from controlnet_canny.lora import (
    LAYOUTS, TEXT_ENCODER_PREFIX, UNET_PREFIX, LayerNames, LoRAPatch, Target, lora_targets, read_lora,
)
from controlnet_canny.model import ControlLDM
from controlnet_canny.unet import UNetModel
from make_tiny_adapters import lora_factors, lora_state_dict, write_lora

CONFIG = load_config(TINY_CONFIG)
RANK = 4
# fp32 on the plain layers: what remains is summation order (observed ~1e-6 on eps of magnitude ~5)
TOL = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str, tol: float = TOL) -> None:
    magnitude = theirs.abs().max().item()
    assert magnitude > 1e-2, f"{what}: reference output is ~0"
    diff = max_diff(ours, theirs)
    print(f"{what}: max abs diff {diff:.2e} (reference max {magnitude:.3g})")
    assert diff <= tol * max(1.0, magnitude), f"{what}: {diff:.3g} > {tol:g} x {max(1.0, magnitude):.3g}"


@pytest.fixture(scope="module")
def targets():
    with torch.device("meta"):
        return lora_targets(ControlLDM(CONFIG))


@pytest.fixture(scope="module")
def plain_model(tiny_checkpoint) -> ControlLDM:
    """The tiny model on plain PyTorch layers (no backend twins), fp32."""
    with torch.device("meta"):
        model = ControlLDM(CONFIG)
    load_weights(model, [tiny_checkpoint], torch.device("cpu"), torch.float32)
    return model.eval()


def _inputs(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([951, 1])
    context = torch.randn(2, 77, 32, generator=g)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    control = [0.5 * torch.randn(2, c, s, s, generator=g)
               for c, s in [(32, 8)] * 3 + [(32, 4)] + [(64, 4)] * 2 + [(64, 2)] * 3 + [(64, 1)] * 4]
    return x, t, context, ids, control


def _outputs(model: ControlLDM, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's eps (with control residuals) and the text encoder's context."""
    x, t, context, ids, control = inputs
    with torch.inference_mode():
        return (model.model.diffusion_model(x, t, context, control),
                model.cond_stage_model.transformer.text_model(ids))


def _expected_layers(factors, alpha: float | None):
    """Our path -> (down, up as (out, r), scale) as `read_lora` should give them."""
    return {path: (down, up.flatten(1), 1.0 if alpha is None else alpha / RANK) for path, (down, up) in factors.items()}


def _assert_layers(lora, expected, targets):
    assert set(lora.layers) == set(expected)
    for path, (down, up, scale) in expected.items():
        layer = lora.layers[path]
        kernel = targets[path].weight_shape[2:] if targets[path].kind == "conv" else ()
        assert torch.equal(layer.down, down.reshape(RANK, -1, *kernel)), path
        assert torch.equal(layer.up, up), path
        assert layer.scale == scale and layer.target == targets[path]
        assert layer.down.dtype == layer.up.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ targets


def test_targets_are_the_unet_and_text_encoder_layers(targets):
    assert all(p.startswith((UNET_PREFIX, TEXT_ENCODER_PREFIX)) for p in targets)  # no ControlNet, no VAE
    unet = [p for p in targets if p.startswith(UNET_PREFIX)]
    text = [p for p in targets if p.startswith(TEXT_ENCODER_PREFIX)]
    assert len(text) == 6 * CONFIG.text.layers
    assert targets[f"{UNET_PREFIX}input_blocks.1.1.proj_in"] == Target((32, 32, 1, 1), "linear")
    assert targets[f"{UNET_PREFIX}input_blocks.3.0.op"] == Target((32, 32, 3, 3), "conv", (2, 2), (1, 1))
    assert targets[f"{UNET_PREFIX}input_blocks.4.0.skip_connection"] == Target((64, 32, 1, 1), "conv")
    assert targets[f"{UNET_PREFIX}time_embed.0"] == Target((128, 32), "linear")
    # every weight of the UNet's linears and convolutions, none else
    with torch.device("meta"):
        unet_keys = {k.removesuffix(".weight") for k, v in ControlLDM(CONFIG).state_dict().items()
                     if k.startswith(UNET_PREFIX) and k.endswith(".weight") and v.ndim in (2, 4)}
    assert set(unet) == unet_keys


VARIANT = dict(channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[2])


@pytest.mark.parametrize("variant", [{}, VARIANT], ids=["tiny", "attention_at_one_level"])
def test_unet_names_are_diffusers_own_conversion(variant, tiny_checkpoint):
    """Each target's diffusers name holds, after diffusers' own conversion of an original checkpoint, the same
    weight as our path: the block mapping follows the UNet config (the variant has one res block per level and
    attention at the middle level only, so up-samplers and attentions sit at other indices)."""
    from diffusers.loaders import single_file_utils as sfu

    original = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG))
    original["model"]["params"]["unet_config"]["params"].update(variant)
    cfg = dataclasses.replace(CONFIG.unet, **{k: tuple(v) if isinstance(v, list) else v for k, v in variant.items()})
    torch.manual_seed(0)
    state = {f"{UNET_PREFIX}{k}": torch.randn(v.shape) for k, v in UNetModel(cfg).state_dict().items()}
    if not variant:  # and the text encoder's names against diffusers' conversion of the real tiny file
        state.update(read_state_dict(tiny_checkpoint))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet_config = sfu.create_unet_diffusers_config_from_ldm(original, {}, image_size=64)
    converted = {f"unet.{k}": v for k, v in sfu.convert_ldm_unet_checkpoint(state, unet_config).items()}
    if not variant:
        converted.update({f"text_encoder.{k}": v for k, v in sfu.convert_ldm_clip_checkpoint(state).items()})
    with torch.device("meta"):
        targets = lora_targets(ControlLDM(dataclasses.replace(CONFIG, unet=cfg, control=cfg)))
    names = LayerNames.of(targets, cfg)
    checked = 0
    for path, name in names.diffusers.items():
        if path.startswith(TEXT_ENCODER_PREFIX) and variant:
            continue
        assert torch.equal(converted[f"{name}.weight"], state[f"{path}.weight"]), (path, name)
        checked += 1
    assert checked == len(targets) - (6 * CONFIG.text.layers if variant else 0)


# ------------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_reads_the_same_layers(layout, targets, tmp_path):
    alpha = 2.0
    path = write_lora(tmp_path / f"lora_{layout}.safetensors", CONFIG, layout, RANK, seed=7, alpha=alpha)
    lora = read_lora(path, targets, CONFIG.unet)
    assert lora.layout == layout
    _assert_layers(lora, _expected_layers(lora_factors(CONFIG, RANK, seed=7), alpha), targets)
    assert lora.rank == RANK and lora.touches_unet and lora.touches_text_encoder
    assert len(lora.layers) == len(targets)  # LoCon: every convolution too
    assert lora.parameters == sum(RANK * (t.weight_shape[0] + t.weight_shape[1] * (
        t.weight_shape[2] * t.weight_shape[3] if t.kind == "conv" else 1)) for t in targets.values())


def test_pickled_lora_without_alphas(targets, tmp_path):
    path = write_lora(tmp_path / "lora.pt", CONFIG, "kohya", RANK, seed=3, text_encoder=False, convs=False)
    lora = read_lora(path, targets, CONFIG.unet)
    assert lora.touches_unet and not lora.touches_text_encoder
    _assert_layers(lora, _expected_layers(lora_factors(CONFIG, RANK, 3, text_encoder=False, convs=False), None),
                   targets)
    assert all(targets[p].kind == "linear" or targets[p].weight_shape[2:] == (1, 1) for p in lora.layers)


def test_text_encoder_only_lora(targets, tmp_path):
    path = write_lora(tmp_path / "te.safetensors", CONFIG, "peft", RANK, unet=False)
    lora = read_lora(path, targets, CONFIG.unet)
    assert lora.touches_text_encoder and not lora.touches_unet and lora.layout == "peft"


def _rewritten(tmp_path, name, tensors) -> str:
    save_file(tensors, tmp_path / name)
    return tmp_path / name


def test_other_spellings(targets, tmp_path):
    """The older diffusers layout without the attention-processor spelling (`attn1.to_q.lora.down.weight`), and
    PEFT text-encoder keys as transformers >= 5 saves a flattened CLIPTextModel (no `text_model.`)."""
    factors = lora_factors(CONFIG, RANK, seed=5)
    expected = _expected_layers(factors, None)
    old = lora_state_dict(factors, CONFIG, "diffusers-old")
    plain = {k.replace(".processor.to_out_lora.", ".to_out.0.lora.").replace(".processor.to_q_lora.", ".to_q.lora.")
             .replace(".processor.to_k_lora.", ".to_k.lora.").replace(".processor.to_v_lora.", ".to_v.lora."): v
             for k, v in old.items()}
    assert not any(".processor." in k for k in plain) and any(".attn1.to_out.0.lora.down." in k for k in plain)
    _assert_layers(read_lora(_rewritten(tmp_path, "plain.safetensors", plain), targets, CONFIG.unet), expected, targets)
    peft = lora_state_dict(factors, CONFIG, "peft")
    flat = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in peft.items()}
    _assert_layers(read_lora(_rewritten(tmp_path, "flat.safetensors", flat), targets, CONFIG.unet), expected, targets)


def test_alpha_per_layer(targets, tmp_path):
    tensors = lora_state_dict(lora_factors(CONFIG, RANK), CONFIG, "kohya", alpha=RANK)
    tensors["lora_unet_conv_in.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    del tensors["lora_unet_conv_out.alpha"]
    lora = read_lora(_rewritten(tmp_path, "alphas.safetensors", tensors), targets, CONFIG.unet)
    assert lora.layers[f"{UNET_PREFIX}input_blocks.0.0"].scale == 1 / RANK
    assert lora.layers[f"{UNET_PREFIX}out.2"].scale == 1.0  # no alpha: scale 1
    assert lora.layers[f"{UNET_PREFIX}time_embed.0"].scale == 1.0  # alpha == rank


SAVED_PATTERN = {"conv_in": 2.0, "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_q": 1.0}


def test_saved_config_scales(targets, tmp_path):
    """diffusers' saved LoraConfig (safetensors metadata): its alpha, or its alpha_pattern's, over the rank; an
    alpha key still wins."""
    path = write_lora(tmp_path / "saved.safetensors", CONFIG, "peft", RANK, text_encoder=False, saved_alpha=6.0,
                      saved_alpha_pattern=SAVED_PATTERN)
    lora = read_lora(path, targets, CONFIG.unet)
    scales = {path: layer.scale for path, layer in lora.layers.items()}
    assert scales.pop(f"{UNET_PREFIX}input_blocks.0.0") == 2.0 / RANK
    assert scales.pop(f"{UNET_PREFIX}output_blocks.11.1.transformer_blocks.0.attn2.to_q") == 1.0 / RANK
    assert set(scales.values()) == {6.0 / RANK}
    tensors = load_file(path)
    tensors["unet.conv_out.alpha"] = torch.tensor(1.0)
    save_file(tensors, path, metadata={"lora_adapter_metadata": '{"unet.lora_alpha": 6, "unet.use_rslora": true}'})
    lora = read_lora(path, targets, CONFIG.unet)
    assert lora.layers[f"{UNET_PREFIX}out.2"].scale == 1.0 / RANK
    assert lora.layers[f"{UNET_PREFIX}input_blocks.0.0"].scale == 6.0 / RANK ** 0.5
    for broken in ('{"unet.lora_alpha": "many"}', '{"unet.lora_alpha": 1, "unet.alpha_pattern": {"(": 2}}', "{"):
        save_file(tensors, path, metadata={"lora_adapter_metadata": broken})
        with pytest.raises(AdapterError, match="saved.safetensors: unreadable lora_adapter_metadata"):
            read_lora(path, targets, CONFIG.unet)


# ------------------------------------------------------------------------------------------------- errors


def _kohya(**overrides):
    tensors = lora_state_dict(lora_factors(CONFIG, RANK), CONFIG, "kohya", alpha=2.0)
    for key, value in overrides.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    return tensors


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize("tensors, message", [
    (lambda: _kohya(**{"lora_unet_down_blocks_9_resnets_0_conv1.lora_down.weight": torch.zeros(4, 32, 3, 3),
                       "lora_unet_foo.lora_up.weight": torch.zeros(4, 4)}),
     "2 keys name no layer of this model's UNet or text encoder (kohya layout): "
     "lora_unet_down_blocks_9_resnets_0_conv1.lora_down.weight, lora_unet_foo.lora_up.weight"),
    (lambda: _kohya(**{f"{Q}.dora_scale": torch.ones(1, 32)}), f"{Q}.dora_scale"),
    (lambda: _kohya(**{"lora_unet_down_blocks_0_attentions_0_norm.weight": torch.ones(32)}),
     "lora_unet_down_blocks_0_attentions_0_norm.weight"),
    (lambda: _kohya(**{f"{Q}.lora_down.weight": torch.zeros(4, 33)}),
     f"{Q}.lora_down.weight has shape (4, 33), this model's layer needs (r, 32) or (r, 32, 1, 1)"),
    (lambda: _kohya(**{"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 1, 1)}),
     "lora_unet_conv_in.lora_down.weight has shape (4, 4, 1, 1), this model's layer needs (r, 4, 3, 3)"),
    (lambda: _kohya(**{f"{Q}.lora_up.weight": torch.zeros(32, 4, 3, 3)}), f"{Q}.lora_up.weight has shape"),
    (lambda: _kohya(**{f"{Q}.lora_up.weight": None}),
     f"{Q}.alpha, {Q}.lora_down.weight without the up half of {UNET_PREFIX}input_blocks.1.1.transformer_blocks.0."
     "attn1.to_q"),
    (lambda: _kohya(**{f"{Q}.lora_down.weight": None, f"{Q}.lora_up.weight": None}), "without the down and up half"),
    (lambda: _kohya(**{f"{Q}.lora_up.weight": torch.zeros(32, 3)}),
     f"rank mismatch in {UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn1.to_q: {Q}.lora_down.weight has "
     f"rank 4, {Q}.lora_up.weight has rank 3"),
    (lambda: _kohya(**{f"{Q}.alpha": torch.ones(2)}), f"{Q}.alpha has shape (2,), a single number expected"),
    (lambda: _kohya(**{"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight":
                       torch.zeros(4, 32)}), "are both the down of"),
    (lambda: {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
              **_kohya()}, "an SDXL LoRA"),
    (lambda: {"emb_params": torch.zeros(2, 32)}, "not a LoRA in a known layout"),
    (lambda: {**lora_state_dict(lora_factors(CONFIG, RANK), CONFIG, "peft"),
              "unet.down_blocks.0.resnets.0.conv1.lora.down.weight": torch.zeros(4, 32, 3, 3)},
     "1 keys name no layer of this model's UNet or text encoder (peft layout)"),
], ids=["unknown", "dora", "stray", "linear_shape", "conv_kernel", "up_kernel", "no_up", "no_factors", "rank_mismatch",
        "alpha_shape", "twice", "sdxl", "no_lora", "mixed_layouts"])
def test_bad_lora_named_error(tensors, message, targets, tmp_path):
    path = _rewritten(tmp_path, "bad.safetensors", tensors())
    with pytest.raises(AdapterError) as error:
        read_lora(path, targets, CONFIG.unet)
    assert str(error.value).startswith("bad.safetensors: ") and message in str(error.value), str(error.value)
    assert isinstance(error.value, ValueError)


class Payload:
    """Any class: unpickling an instance of one could run code."""


def test_unsafe_or_broken_files_refused(targets, tmp_path):
    torch.save({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3), "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(AdapterError, match="evil.pt: refused"):
        read_lora(tmp_path / "evil.pt", targets, CONFIG.unet)
    path = write_lora(tmp_path / "cut.safetensors", CONFIG, "kohya", RANK)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AdapterError, match="cut.safetensors: not a readable safetensors file"):
        read_lora(path, targets, CONFIG.unet)


# ---------------------------------------------------------------------------------------------- applying


@pytest.fixture(scope="module")
def two_loras(targets, tmp_path_factory):
    out = tmp_path_factory.mktemp("loras")
    first = read_lora(write_lora(out / "a.safetensors", CONFIG, "kohya", RANK, seed=1, alpha=2.0), targets, CONFIG.unet)
    second = read_lora(write_lora(out / "b.safetensors", CONFIG, "peft", 8, seed=2), targets, CONFIG.unet)
    return first, second


def _hook_counts(model, paths):
    return [len(model.get_submodule(p)._forward_hooks) for p in paths]


def test_hooks_removed_on_exit_and_on_error(plain_model, two_loras):
    patch = LoRAPatch.build([(two_loras[0], 1.0)], "cpu", torch.float32)
    paths = list(patch.layers)
    assert _hook_counts(plain_model, paths) == [0] * len(paths)
    with patch.applied(plain_model):
        assert _hook_counts(plain_model, paths) == [1] * len(paths)
    assert _hook_counts(plain_model, paths) == [0] * len(paths)
    with pytest.raises(RuntimeError, match="boom"):
        with patch.applied(plain_model):
            raise RuntimeError("boom")
    assert _hook_counts(plain_model, paths) == [0] * len(paths)
    # a path the model lacks: the hooks placed before it are removed too
    broken = LoRAPatch({**patch.layers, "model.diffusion_model.nowhere": next(iter(patch.layers.values()))}, ())
    with pytest.raises(AttributeError):
        with broken.applied(plain_model):
            pass
    assert _hook_counts(plain_model, paths) == [0] * len(paths)


def test_weight_zero_is_bit_identical(plain_model, two_loras):
    inputs = _inputs()
    before = _outputs(plain_model, inputs)
    with LoRAPatch.build([(two_loras[0], 0.0), (two_loras[1], 0.0)], "cpu", torch.float32).applied(plain_model):
        during = _outputs(plain_model, inputs)
    for a, b in zip(before, during):
        assert torch.equal(a, b)


def test_parts_apply_where_they_run(two_loras):
    patch = LoRAPatch.build(list(zip(two_loras, (1.0, 0.5))), "cpu", torch.float32)
    unet, text = patch.unet_only(), patch.text_encoder_only()
    assert set(unet.layers) | set(text.layers) == set(patch.layers) and not set(unet.layers) & set(text.layers)
    assert all(p.startswith(UNET_PREFIX) for p in unet.layers) and all(p.startswith(TEXT_ENCODER_PREFIX)
                                                                       for p in text.layers)
    layer = patch.layers[f"{UNET_PREFIX}input_blocks.0.0"]  # ranks 4 + 8 concatenated, the weights in `up`
    assert layer.down.shape == (12, 4, 3, 3) and layer.up.shape == (32, 12, 1, 1)
    assert not LoRAPatch.build([], "cpu", torch.float32)
    assert LoRAPatch.build([(two_loras[0], 1.0)], "cpu", torch.bfloat16).layers[
        f"{UNET_PREFIX}out.2"].down.dtype == torch.bfloat16


def test_unfused_equals_merged_weights(plain_model, two_loras):
    loras = [(two_loras[0], 0.7), (two_loras[1], -0.4)]
    patch = LoRAPatch.build(loras, "cpu", torch.float32)
    inputs = _inputs()
    base = _outputs(plain_model, inputs)
    with patch.applied(plain_model):
        unfused = _outputs(plain_model, inputs)
    merged_model = copy.deepcopy(plain_model)
    with torch.no_grad():
        for path in patch.layers:
            module = merged_model.get_submodule(path)
            module.weight.copy_(patch.merged_weight(path, module.weight))
    merged = _outputs(merged_model, inputs)
    for what, a, b, c in zip(("UNet eps", "text context"), unfused, merged, base):
        assert_close(a, b, what)
        assert max_diff(a, c) > 0.05, f"{what}: the LoRAs change nothing"


def test_applied_in_bf16(tiny_checkpoint, plain_model, two_loras):
    """Computed in the serving dtype: a bf16 model with a bf16 patch lands near the fp32 result, far from no LoRA."""
    with torch.device("meta"):
        model = ControlLDM(CONFIG)
    load_weights(model, [tiny_checkpoint], torch.device("cpu"), torch.bfloat16)
    loras = [(two_loras[0], 1.0), (two_loras[1], 0.5)]
    x, t, context, ids, control = _inputs()
    low = (x.bfloat16(), t, context.bfloat16(), ids, [c.bfloat16() for c in control])
    with LoRAPatch.build(loras, "cpu", torch.bfloat16).applied(model):
        ours = _outputs(model, low)
    with LoRAPatch.build(loras, "cpu", torch.float32).applied(plain_model):
        reference = _outputs(plain_model, (x, t, context, ids, control))
    base = _outputs(plain_model, (x, t, context, ids, control))
    for what, a, b, c in zip(("UNet eps", "text context"), ours, reference, base):
        assert a.dtype == torch.bfloat16
        print(f"{what}: bf16 vs fp32 {max_diff(a, b):.3g}, LoRA effect {max_diff(b, c):.3g}")
        assert max_diff(a, b) < 0.2 * max_diff(b, c)


def test_hooks_act_on_backend_twins(plain_model, two_loras):
    """The CPU backend's packed twins keep the paths: the patch finds them and adds the same term."""
    from controlnet_canny.backends import cpu_prepack

    if not cpu_prepack.supported(torch.device("cpu"), torch.float32):
        pytest.skip("oneDNN packing is not supported here")
    twins = copy.deepcopy(plain_model)
    cpu_prepack.install_twins(twins, lambda layer: cpu_prepack.packed_twin)
    patch = LoRAPatch.build([(two_loras[0], 1.0), (two_loras[1], 0.5)], "cpu", torch.float32)
    kinds = {type(twins.get_submodule(p)).__name__ for p in patch.layers}
    assert {"PackedLinear", "PackedConv2d"} <= kinds
    inputs = _inputs()
    with patch.applied(plain_model):
        plain = _outputs(plain_model, inputs)
    with patch.applied(twins):
        packed = _outputs(twins, inputs)
    for what, a, b in zip(("UNet eps", "text context"), packed, plain):
        assert_close(a, b, what, tol=1e-4)  # oneDNN's packed kernels round differently


# ----------------------------------------------------------------------------------------- vs diffusers

from test_parity_diffusers import (  # noqa: E402,F401  (module fixtures)
    _reference_scheduler, diffusers_unet, hf_text_encoder, original_state, original_yaml,
)


@pytest.mark.parametrize("layouts", [("kohya", "peft"), ("diffusers-old", "kohya")], ids=["kohya+peft", "old+kohya"])
def test_two_loras_match_diffusers(layouts, plain_model, diffusers_unet, hf_text_encoder, targets, tmp_path):
    """diffusers' `load_lora_weights` of two files (their UNet and text-encoder halves) and `set_adapters` with two
    weights, against ours with the same files and weights: UNet eps with ControlNet residuals, text context."""
    from diffusers import StableDiffusionPipeline

    weights = (0.8, -0.6)
    files = [write_lora(tmp_path / f"{i}_{layout}.safetensors", CONFIG, layout, RANK + 4 * i, seed=10 + i,
                        alpha=3.0 if layout == "kohya" else None) for i, layout in enumerate(layouts)]
    theirs_pipe = StableDiffusionPipeline(
        vae=None, text_encoder=copy.deepcopy(hf_text_encoder), tokenizer=None, unet=copy.deepcopy(diffusers_unet),
        scheduler=_reference_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    names = [f"lora{i}" for i in range(len(files))]
    for name, path in zip(names, files):
        theirs_pipe.load_lora_weights(str(path), adapter_name=name)
    theirs_pipe.set_adapters(names, list(weights))

    x, t, context, ids, control = _inputs(seed=4)
    with torch.inference_mode():
        theirs_eps = theirs_pipe.unet(x, t, encoder_hidden_states=context,
                                      down_block_additional_residuals=tuple(control[:-1]),
                                      mid_block_additional_residual=control[-1]).sample
        theirs_context = theirs_pipe.text_encoder(input_ids=ids).last_hidden_state
    loras = [read_lora(path, targets, CONFIG.unet) for path in files]
    assert [lora.layout for lora in loras] == list(layouts)
    patch = LoRAPatch.build(list(zip(loras, weights)), "cpu", torch.float32)
    base_eps, base_context = _outputs(plain_model, (x, t, context, ids, control))
    with patch.unet_only().applied(plain_model), patch.text_encoder_only().applied(plain_model):
        ours_eps, ours_context = _outputs(plain_model, (x, t, context, ids, control))
    assert_close(ours_eps, theirs_eps, "UNet eps with control, two LoRAs")
    assert_close(ours_context, theirs_context, "text context, two LoRAs")
    assert max_diff(ours_eps, base_eps) > 0.05 and max_diff(ours_context, base_context) > 0.05


def test_alphas_per_layer_match_diffusers(plain_model, diffusers_unet, hf_text_encoder, targets, tmp_path):
    """A kohya file whose alphas differ per layer. Not on the attention projections: diffusers 0.42.1 derives
    their per-layer alpha's name from the attention-processor spelling (`...attn1.processor.to_q_lora...`),
    which matches no module, and gives them the file's most common alpha (kohya and A1111: their own)."""
    from diffusers import StableDiffusionPipeline

    tensors = lora_state_dict(lora_factors(CONFIG, RANK, seed=41), CONFIG, "kohya", alpha=2.0)
    for key in tensors:
        if key.endswith(".alpha") and ("resnets_0" in key or "conv_in" in key or "_proj_in" in key):
            tensors[key] = torch.tensor(0.5)
    path = _rewritten(tmp_path, "alphas.safetensors", tensors)
    theirs_pipe = StableDiffusionPipeline(
        vae=None, text_encoder=copy.deepcopy(hf_text_encoder), tokenizer=None, unet=copy.deepcopy(diffusers_unet),
        scheduler=_reference_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    theirs_pipe.load_lora_weights(str(path))
    x, t, context, ids, control = _inputs(seed=7)
    with torch.inference_mode():
        theirs = theirs_pipe.unet(x, t, encoder_hidden_states=context,
                                  down_block_additional_residuals=tuple(control[:-1]),
                                  mid_block_additional_residual=control[-1]).sample
    lora = read_lora(path, targets, CONFIG.unet)
    assert {layer.scale for layer in lora.layers.values()} == {0.5 / RANK, 2.0 / RANK}
    with LoRAPatch.build([(lora, 1.0)], "cpu", torch.float32).applied(plain_model):
        ours = _outputs(plain_model, (x, t, context, ids, control))[0]
    assert_close(ours, theirs, "UNet eps with control, per-layer alphas")


def test_saved_config_matches_diffusers(plain_model, diffusers_unet, hf_text_encoder, targets, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = write_lora(tmp_path / "saved.safetensors", CONFIG, "peft", RANK, seed=31, text_encoder=False,
                      saved_alpha=6.0, saved_alpha_pattern=SAVED_PATTERN)
    theirs_pipe = StableDiffusionPipeline(
        vae=None, text_encoder=copy.deepcopy(hf_text_encoder), tokenizer=None, unet=copy.deepcopy(diffusers_unet),
        scheduler=_reference_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    theirs_pipe.load_lora_weights(str(path), adapter_name="saved")
    theirs_pipe.set_adapters(["saved"], [0.9])
    x, t, context, ids, control = _inputs(seed=6)
    with torch.inference_mode():
        theirs = theirs_pipe.unet(x, t, encoder_hidden_states=context,
                                  down_block_additional_residuals=tuple(control[:-1]),
                                  mid_block_additional_residual=control[-1]).sample
    with LoRAPatch.build([(read_lora(path, targets, CONFIG.unet), 0.9)], "cpu", torch.float32).applied(plain_model):
        ours = _outputs(plain_model, (x, t, context, ids, control))[0]
    assert_close(ours, theirs, "UNet eps with control, LoRA with a saved LoraConfig")


def test_kohya_text_encoder_half_matches_diffusers(plain_model, diffusers_unet, hf_text_encoder, targets, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = write_lora(tmp_path / "te.safetensors", CONFIG, "kohya", RANK, seed=21, alpha=1.0, unet=False)
    theirs_pipe = StableDiffusionPipeline(
        vae=None, text_encoder=copy.deepcopy(hf_text_encoder), tokenizer=None, unet=copy.deepcopy(diffusers_unet),
        scheduler=_reference_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    theirs_pipe.load_lora_weights(str(path))
    ids = _inputs(seed=5)[3]
    with torch.inference_mode():
        theirs = theirs_pipe.text_encoder(input_ids=ids).last_hidden_state
    with LoRAPatch.build([(read_lora(path, targets, CONFIG.unet), 1.0)], "cpu", torch.float32).applied(plain_model):
        with torch.inference_mode():
            ours = plain_model.cond_stage_model.transformer.text_model(ids)
    assert_close(ours, theirs, "text context, kohya text-encoder LoRA")


# ------------------------------------------------------------------------------------------------- script


def test_script_fills_a_store(targets, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_adapters.py"), "--out-dir", str(tmp_path),
                    "--rank", "2"], check=True, capture_output=True)
    files = sorted((tmp_path / "loras").iterdir())
    assert [f.name for f in files] == sorted(f"tiny_{layout}.safetensors" for layout in LAYOUTS)
    for path in files:
        lora = read_lora(path, targets, CONFIG.unet)
        assert path.stem == f"tiny_{lora.layout}" and lora.rank == 2
        assert {layer.scale for layer in lora.layers.values()} == ({0.5} if "kohya" in lora.layout else {1.0})
    assert load_file(files[0])  # plain safetensors
