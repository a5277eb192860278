"""Numerical parity with diffusers + transformers on the tiny checkpoint (fp32, CPU, no network).

The tiny original-format state dict is converted with diffusers' OWN converters for original (LDM)
checkpoints (`diffusers.loaders.single_file_utils`), loaded strictly into diffusers / transformers models
built from configs equivalent to `cldm_tiny.yaml`, and every stage of our pipeline is compared with them:
text encoder, the 13 ControlNet residuals, the controlled UNet's eps, a whole DDIM run with classifier-free
guidance (driven through `ControlNetCannyPipeline.generate`), the VAE decode, and an LCM run against diffusers'
own StableDiffusionControlNetPipeline.

Sizes are tiny (64x64 images, 8x8 latents) so the module runs in seconds on two CPU cores.
"""
from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from conftest import TINY_CONFIG  # noqa: E402
from controlnet_canny import ddim, samplers, token_merging  # noqa: E402
from controlnet_canny.checkpoint import load_weights, read_state_dict  # noqa: E402
from controlnet_canny.config import load_config  # noqa: E402
from controlnet_canny.model import ControlLDM  # noqa: E402
from controlnet_canny.params import GenerationParams  # noqa: E402
from controlnet_canny.text_encoder import tokenize  # noqa: E402

# Max abs diff relative to the reference's largest magnitude (at least 1), everywhere below unless a comment
# says otherwise. On CPU our convolutions and linears run oneDNN's packed kernels (controlnet_canny.backends.cpu_prepack),
# which round differently from the plain ones diffusers calls: observed up to 1.6e-4 on the middle residual,
# whose GroupNorm at the tiny model's 1x1 middle resolution normalizes two values per group (ill-conditioned),
# and 1e-5 or less elsewhere. A wrong layer shows up as O(1).
TOL = 1e-3
SCALE_FACTOR = 0.18215
INV_SCALE = float(np.float32(1.0 / SCALE_FACTOR))  # spec section 2: one float32 factor, multiplied
# scripts/gpu_check.sh runs this module on a GPU: CONTROLNET_TEST_DEVICE=cuda.
DEVICE = torch.device(os.environ.get("CONTROLNET_TEST_DEVICE", "cpu"))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = TOL, what: str = "") -> float:
    diff = max_diff(ours, theirs)
    magnitude = theirs.abs().max().item()
    # The references must be non-trivial, or "equal" would prove nothing.
    assert magnitude > 1e-2, f"{what}: reference output is ~0"
    print(f"{what}: max abs diff {diff:.2e} (reference max {magnitude:.3g})")
    assert diff <= tol * max(1.0, magnitude), f"{what}: max abs diff {diff:.3g} > {tol:g} x {max(1.0, magnitude):.3g}"
    return diff


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def original_yaml() -> dict:
    return OmegaConf.to_container(OmegaConf.load(TINY_CONFIG))


@pytest.fixture(scope="module")
def original_state(tiny_checkpoint) -> dict[str, torch.Tensor]:
    """The original-format state dict (all keys, including the unused ones a real file has)."""
    return dict(read_state_dict(tiny_checkpoint))


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline, tiny_checkpoint):
    if DEVICE.type == "cpu":
        yield tiny_pipeline
        return
    from controlnet_canny.pipeline import ControlNetCannyPipeline

    # fp32 means fp32 here: cuDNN would run the convolutions of both sides in TF32 by default
    allow_tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    yield ControlNetCannyPipeline.load([tiny_checkpoint], TINY_CONFIG, DEVICE, "fp32")
    torch.backends.cudnn.allow_tf32 = allow_tf32


@pytest.fixture(scope="module")
def model(pipeline):
    return pipeline.model


def _unet_config(original_yaml) -> dict:
    """Hand-written diffusers config for the tiny UNet, checked against diffusers' own LDM config creator."""
    cfg = load_config(TINY_CONFIG).unet
    config = dict(
        sample_size=8,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],  # attention at ds 1, 2, 4
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
        layers_per_block=cfg.num_res_blocks,
        cross_attention_dim=cfg.context_dim,
        # diffusers' legacy naming for SD 1.x: `attention_head_dim` is the NUMBER of heads (8), each of
        # channels / 8 dims, exactly the reference's num_heads 8 (verified numerically below).
        attention_head_dim=cfg.num_heads,
        use_linear_projection=False,
        transformer_layers_per_block=cfg.transformer_depth,
        norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,  # cos half first
        freq_shift=0,
        act_fn="silu",
        upcast_attention=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # image_size deprecation notice
        theirs = sfu.create_unet_diffusers_config_from_ldm(original_yaml, {}, image_size=64)
    for key, value in theirs.items():
        if value is not None:
            assert config.get(key, value) == value, f"unet config {key}: ours {config.get(key)}, diffusers {value}"
    return config


def _converted(model_class, config: dict, converter, original_state: dict):
    """A diffusers model built from `config`, loaded strictly with diffusers' own conversion of the original keys."""
    model = model_class(**config).eval()
    model.load_state_dict(converter(original_state, config), strict=True)
    return model.to(DEVICE)


@pytest.fixture(scope="module")
def diffusers_unet(original_state, original_yaml) -> UNet2DConditionModel:
    return _converted(UNet2DConditionModel, _unet_config(original_yaml), sfu.convert_ldm_unet_checkpoint, original_state)


@pytest.fixture(scope="module")
def diffusers_controlnet(original_state, original_yaml) -> ControlNetModel:
    unet_config = _unet_config(original_yaml)
    # `create_controlnet_diffusers_config_from_ldm` cannot be called in diffusers 0.42.1 (it calls
    # `create_unet_diffusers_config_from_ldm` without its `checkpoint` argument: TypeError), so its mapping is
    # reproduced here: the UNet's encoder settings plus the hint channels.
    config = dict(
        conditioning_channels=original_yaml["model"]["params"]["control_stage_config"]["params"]["hint_channels"],
        **{k: unet_config[k] for k in (
            "in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "transformer_layers_per_block", "norm_num_groups",
            "norm_eps", "flip_sin_to_cos", "freq_shift", "act_fn", "upcast_attention",
        )},
        conditioning_embedding_out_channels=(16, 32, 96, 256),  # the reference's fixed hint encoder
        controlnet_conditioning_channel_order="rgb",
        global_pool_conditions=False,
    )
    return _converted(ControlNetModel, config, sfu.convert_controlnet_checkpoint, original_state)


@pytest.fixture(scope="module")
def diffusers_vae(original_state, original_yaml) -> AutoencoderKL:
    dd = original_yaml["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    config = dict(
        in_channels=dd["in_channels"],
        out_channels=dd["out_ch"],
        down_block_types=["DownEncoderBlock2D"] * len(dd["ch_mult"]),
        up_block_types=["UpDecoderBlock2D"] * len(dd["ch_mult"]),
        block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]],
        latent_channels=dd["z_channels"],
        layers_per_block=dd["num_res_blocks"],
        norm_num_groups=32,
        act_fn="silu",
        sample_size=64,
        scaling_factor=SCALE_FACTOR,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sfu.create_vae_diffusers_config_from_ldm(original_yaml, {}, image_size=64)
    for key, value in theirs.items():
        assert config[key] == value, f"vae config {key}: ours {config[key]}, diffusers {value}"
    # The tiny checkpoint carries the (unused) VAE encoder too, as real files do, so the load is strict.
    return _converted(AutoencoderKL, config, sfu.convert_ldm_vae_checkpoint, original_state)


@pytest.fixture(scope="module")
def hf_text_encoder(original_state) -> CLIPTextModel:
    text = load_config(TINY_CONFIG).text
    config = CLIPTextConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.width,
        intermediate_size=text.intermediate,
        num_hidden_layers=text.layers,
        num_attention_heads=text.heads,
        max_position_embeddings=text.context_length,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        bos_token_id=49406,
        eos_token_id=49407,
    )
    encoder = CLIPTextModel(config).eval()
    converted = sfu.convert_ldm_clip_checkpoint(original_state)
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); diffusers' own
    # create_diffusers_clip_model_from_ldm strips the prefix the same way. `position_ids` is a
    # non-persistent buffer in transformers (not in the state dict), hence dropped before the strict load.
    if not hasattr(encoder, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    converted = {k: v for k, v in converted.items() if not k.endswith("embeddings.position_ids")}
    encoder.load_state_dict(converted, strict=True)
    return encoder.to(DEVICE)


def _hf_context(encoder: CLIPTextModel, ids: torch.Tensor) -> torch.Tensor:
    return encoder(input_ids=ids).last_hidden_state


# ------------------------------------------------------------------------------------------------- tests


def test_ddim_timesteps():
    assert ddim.ddim_timesteps(20) == list(range(1, 1000, 50))
    assert ddim.ddim_timesteps(20)[:3] == [1, 51, 101] and ddim.ddim_timesteps(20)[-1] == 951
    # Reference quirk, kept: 1000 % 30 != 0 visits 31 steps (c = 33: 1, 34, ..., 991).
    steps30 = ddim.ddim_timesteps(30)
    assert len(steps30) == 31 and steps30[0] == 1 and steps30[-1] == 991


def test_ddim_timesteps_match_diffusers_scheduler():
    scheduler = _reference_scheduler()
    scheduler.set_timesteps(20)
    assert scheduler.timesteps.tolist() == ddim.ddim_timesteps(20)[::-1]


def test_alphas_cumprod_matches_diffusers():
    ours = ddim.alphas_cumprod(0.00085, 0.012, 1000)
    theirs = _reference_scheduler().alphas_cumprod
    # Ours is a float64 cumprod rounded to float32 (spec section 3); diffusers' is a float32 cumprod, which
    # drifts by a few ulp (observed ~2e-7 absolute). Both are the same schedule.
    assert max_diff(ours, theirs) < 1e-6


def test_text_encoder_matches_clip_text_model(model, hf_text_encoder):
    ids = torch.tensor([
        tokenize("a photo of a cat"),
        tokenize(""),
        tokenize("a house, best quality, extremely detailed"),
        torch.randint(0, 49408, (77,), generator=torch.Generator().manual_seed(0)).tolist(),
    ]).to(DEVICE)
    with torch.inference_mode():
        ours = model.cond_stage_model.transformer.text_model(ids)
        theirs = _hf_context(hf_text_encoder, ids)
        # FrozenCLIPEmbedder (prompt strings in) is the same computation.
        via_prompts = model.cond_stage_model(["a photo of a cat", ""])
    assert_close(ours, theirs, what="text encoder last hidden state")
    assert torch.equal(via_prompts, ours[:2])


def _control_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    hint = (torch.rand(batch, 3, 64, 64, generator=g) > 0.8).float()  # edge-map-like 0/1 image
    t = torch.tensor([951, 1][:batch])
    context = torch.randn(batch, 77, 32, generator=g)
    return x.to(DEVICE), hint.to(DEVICE), t.to(DEVICE), context.to(DEVICE)


def test_controlnet_residuals_match(model, diffusers_controlnet):
    x, hint, t, context = _control_inputs()
    with torch.inference_mode():
        ours = model.control_model(x, model.control_model.encode_hint(hint), t, context)
        down, mid = diffusers_controlnet(
            x, t, encoder_hidden_states=context, controlnet_cond=hint, conditioning_scale=1.0, return_dict=False
        )
    theirs = [*down, mid]
    assert len(ours) == len(theirs) == 13
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, what=f"control residual {i}")


def test_unet_eps_with_control_matches(model, diffusers_unet):
    x, _, t, context = _control_inputs(seed=2)
    g = torch.Generator().manual_seed(3)
    unet = model.model.diffusion_model
    with torch.inference_mode():
        shapes = [r.shape for r in model.control_model(x, torch.zeros(2, 32, 8, 8, device=DEVICE), t, context)]
        control = [0.5 * torch.randn(s, generator=g).to(DEVICE) for s in shapes]
        ours = unet(x, t, context, control)
        theirs = diffusers_unet(
            x, t, encoder_hidden_states=context,
            down_block_additional_residuals=tuple(control[:-1]), mid_block_additional_residual=control[-1],
        ).sample
        ours_plain = unet(x, t, context, None)
        theirs_plain = diffusers_unet(x, t, encoder_hidden_states=context).sample
    assert_close(ours, theirs, what="UNet eps with control")
    assert_close(ours_plain, theirs_plain, what="UNet eps without control")
    assert max_diff(ours, ours_plain) > 1e-2  # the control residuals do enter the UNet


def test_vae_decode_matches(model, diffusers_vae, tiny_checkpoint):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.inference_mode():
        ours = model.first_stage_model.decode(latents)
        # Scaled the same way (one float32 factor, multiplied), not diffusers' `latents / scaling_factor`.
        theirs = diffusers_vae.decode(latents * INV_SCALE).sample
    assert ours.shape == (2, 3, 64, 64)
    assert_close(ours, theirs, what="VAE decode")  # observed ~6e-6 on outputs up to ~2: fp32 rounding, ...
    # ... as float64 shows (our VAE has no float32 upcasts, so it runs in float64 as is): observed ~1e-14.
    with torch.device("meta"):
        ours64 = ControlLDM(load_config(TINY_CONFIG))
    load_weights(ours64, [tiny_checkpoint], DEVICE, torch.float64)  # plain layers: float64 packs not
    ours64, theirs64 = ours64.first_stage_model, copy.deepcopy(diffusers_vae).double()
    with torch.inference_mode():
        assert_close(ours64.decode(latents.double()), theirs64.decode(latents.double() * INV_SCALE).sample,
                     tol=1e-12, what="VAE decode, float64")


def _reference_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type="epsilon",
    )


class DiffusersGuidedEps:
    """eps(x, t) with classifier-free guidance and ControlNet: diffusers models driven by hand, as
    `StableDiffusionControlNetPipeline` does (residuals times their scales; in guess mode the ControlNet sees the
    conditional half only and the unconditional half gets no control).

    `layout="diffusers"`: the guidance batch is [uncond, cond] and the hint is embedded inside every ControlNet
    call at the full batch, as diffusers does it. `layout="ours"`: [cond, uncond], and the hint embedded once at
    batch 1 then repeated, as our pipeline does; values are the same, only the rounding of batched kernels can
    differ (the hint embedding at batch 1 vs 4 differs by ~7e-8).
    """

    def __init__(self, unet, controlnet, cond, uncond, hint, scales, guidance, guess_mode, layout):
        self.unet, self.controlnet = unet, controlnet
        self.cond, self.uncond, self.hint = cond, uncond, hint
        self.scales, self.guidance, self.guess_mode = scales, guidance, guess_mode
        self.cond_first = layout == "ours"
        self.hint_features = controlnet.controlnet_cond_embedding(hint[:1]) if self.cond_first else None
        assert layout in ("ours", "diffusers") and (hint == hint[:1]).all()

    def _controlnet(self, x, t, context, hint):
        if self.hint_features is None:
            return self.controlnet(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        features = torch.cat([self.hint_features] * x.shape[0])
        handle = self.controlnet.controlnet_cond_embedding.register_forward_hook(lambda *_: features)
        try:
            return self.controlnet(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        finally:
            handle.remove()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        halves = [self.cond, self.uncond] if self.cond_first else [self.uncond, self.cond]
        x2, context = torch.cat([x, x]), torch.cat(halves)
        if self.guess_mode:
            down, mid = self._controlnet(x, t, self.cond, self.hint)
            residuals = [torch.cat([r, torch.zeros_like(r)] if self.cond_first else [torch.zeros_like(r), r])
                         for r in (*down, mid)]
        else:
            down, mid = self._controlnet(x2, t, context, torch.cat([self.hint, self.hint]))
            residuals = [*down, mid]
        residuals = [r * s for r, s in zip(residuals, self.scales)]
        eps = self.unet(
            x2, t, encoder_hidden_states=context,
            down_block_additional_residuals=tuple(residuals[:-1]), mid_block_additional_residual=residuals[-1],
        ).sample
        first, second = eps.chunk(2)
        e_cond, e_uncond = (first, second) if self.cond_first else (second, first)
        return e_uncond + self.guidance * (e_cond - e_uncond)


@pytest.mark.parametrize("guess_mode", [False, True], ids=["normal", "guess_mode"])
def test_full_ddim_run_with_guidance_matches(
    pipeline, house_image, hf_text_encoder, diffusers_unet, diffusers_controlnet, diffusers_vae, monkeypatch,
    guess_mode,
):
    """`generate` end to end (2 samples, CFG scale 9, strength 0.8, 20 steps, eta 0) vs diffusers' DDIMScheduler
    driving diffusers' UNet + ControlNet by hand.

    Why two comparisons: with random tiny weights eps does not predict the noise, the latents grow to |x| ~ 40
    (SD's stay ~4) and the guided dynamics are chaotic: a 7e-8 rounding difference in the hint features (batch
    1 vs 4 kernels) grows to 1e-4..1e-2 over 20 steps, depending on the seed; our own pipeline differs from
    ITSELF by up to 1.3e-2 between 1 and 2 CPU threads. So:
    1. every step is compared from the same input x_k (teacher forcing), with diffusers exactly as it computes
       (its batch layout, its float32 schedule): no amplification, 1e-4 with a wide margin;
    2. the whole free-running trajectory x_T -> x_0 is compared with the rounding noise sources aligned (our
       batch layout, the reference's float64-derived schedule): then it is bit-exact, compared at 1e-4.
    """
    params = GenerationParams(
        prompt="a red house", num_samples=2, image_resolution=64, ddim_steps=20, strength=0.8, scale=9.0,
        seed=1234, eta=0.0, guess_mode=guess_mode,
    )
    prepared = pipeline.prepare(house_image, params)
    assert prepared.edge_map.shape == (64, 64) and prepared.edge_map.any()

    # Record what our sampler feeds its eps model at every step (x_k, t_k) and what it returns at the end.
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    finals: list[torch.Tensor] = []
    original_model_input, original_result = samplers.model_input, samplers.result

    def recording_model_input(plan, state):
        x, t = original_model_input(plan, state)
        steps.append((x.detach().clone(), t.detach().clone()))
        return x, t

    def recording_result(plan, state):
        out = original_result(plan, state)
        finals.append(out.detach().clone())
        return out

    monkeypatch.setattr(samplers, "model_input", recording_model_input)
    monkeypatch.setattr(samplers, "result", recording_result)
    (result,) = pipeline.generate([prepared])
    ours_images = np.stack(result.images)
    (ours_final,) = finals
    assert [int(t[0]) for _, t in steps] == ddim.ddim_timesteps(20)[::-1] and result.steps == 20

    n = params.num_samples
    with torch.inference_mode():
        cond = _hf_context(hf_text_encoder, torch.tensor([tokenize(params.prompt + ", " + params.a_prompt)] * n).to(DEVICE))
        uncond = _hf_context(hf_text_encoder, torch.tensor([tokenize(params.n_prompt)] * n).to(DEVICE))
        hint = torch.from_numpy(prepared.edge_map).float().div(255.0)[None, None].repeat(n, 3, 1, 1).to(DEVICE)
        scales = [params.strength * 0.825 ** (12 - i) for i in range(13)] if guess_mode else [params.strength] * 13
        models = (diffusers_unet, diffusers_controlnet, cond, uncond, hint, scales, params.scale, guess_mode)
        noise = torch.cat([
            torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(params.seed + i)) for i in range(n)
        ]).to(DEVICE)
        assert torch.equal(steps[0][0], noise)  # same x_T: per-sample CPU generators seeded seed + i

        # 1. Teacher forcing: from OUR x_k, diffusers' guided eps and DDIMScheduler step must land on OUR x_{k+1}.
        scheduler = _reference_scheduler()
        scheduler.set_timesteps(params.ddim_steps)
        assert scheduler.timesteps.tolist() == [int(t[0]) for _, t in steps]
        eps_model = DiffusersGuidedEps(*models, layout="diffusers")
        step_diffs = []
        for k, (x, t) in enumerate(steps):
            ours_next = steps[k + 1][0] if k + 1 < len(steps) else ours_final
            theirs_next = scheduler.step(eps_model(x, t[0]), int(t[0]), x, eta=0.0).prev_sample
            step_diffs.append(assert_close(ours_next, theirs_next, what=f"DDIM step {k} (t={int(t[0])})"))

        # 2. Free-running from the same x_T, rounding noise sources aligned.
        scheduler = _reference_scheduler()
        scheduler.set_timesteps(params.ddim_steps)
        scheduler.alphas_cumprod = ddim.alphas_cumprod(0.00085, 0.012, 1000)  # float64 cumprod, as the reference
        scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]  # set_alpha_to_one=False
        eps_model = DiffusersGuidedEps(*models, layout="ours")
        latents = noise.clone()
        for t in scheduler.timesteps:
            latents = scheduler.step(eps_model(latents, t), t, latents, eta=0.0).prev_sample

        # 3. Diffusers' VAE decoding our final latents, through the reference's uint8 conversion.
        decoded = diffusers_vae.decode(ours_final * INV_SCALE).sample
    print(f"max per-step diff {max(step_diffs):.2e}")

    assert ours_final.shape == (2, 4, 8, 8)
    assert max_diff(ours_final[0], ours_final[1]) > 1e-1  # different seeds, different samples
    assert_close(ours_final, latents, what="final latents, free-running")
    theirs_images = (decoded.permute(0, 2, 3, 1) * 127.5 + 127.5).cpu().numpy().clip(0, 255).astype(np.uint8)
    # Floats agree to ~1e-5, but truncation to uint8 may flip a level at an integer boundary.
    level_diff = np.abs(ours_images.astype(int) - theirs_images.astype(int))
    assert level_diff.max() <= 1 and (level_diff == 0).mean() > 0.99


@pytest.mark.parametrize("case", ["img2img_window", "prompt_mode"])
def test_controls_match_diffusers_step_for_step(
    tiny_pipeline, house_image, hf_text_encoder, diffusers_unet, diffusers_controlnet, diffusers_vae, monkeypatch, case,
):
    """img2img with a guidance window, as StableDiffusionControlNetImg2ImgPipeline computes it (get_timesteps,
    prepare_latents with one generator per sample, controlnet_keep); and control_mode=prompt, sd-webui-controlnet's
    soft weights on both guidance halves. Teacher forcing as in the test above: from our x_k, diffusers' guided eps
    and DDIMScheduler step land on our x_{k+1}."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    img2img = case == "img2img_window"
    controls = {"denoising_strength": 0.5, "guidance_start": 0.2, "guidance_end": 0.8} if img2img else \
        {"control_mode": "prompt"}
    params = GenerationParams(prompt="a red house", num_samples=2, image_resolution=64, ddim_steps=20, strength=0.8,
                              scale=9.0, seed=77, eta=0.0, **controls)
    init = np.ascontiguousarray(house_image[::-1, ::-1]) if img2img else None
    prepared = tiny_pipeline.prepare(house_image, params, init_image=init)

    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    finals: list[torch.Tensor] = []
    original_model_input, original_result = samplers.model_input, samplers.result
    monkeypatch.setattr(samplers, "model_input", lambda plan, state: steps.append(
        tuple(v.detach().clone() for v in original_model_input(plan, state))) or steps[-1])
    monkeypatch.setattr(samplers, "result", lambda plan, state: finals.append(
        original_result(plan, state).detach().clone()) or finals[-1])
    tiny_pipeline.generate([prepared])
    (ours_final,) = finals

    n = params.num_samples
    with torch.inference_mode():
        cond = _hf_context(hf_text_encoder, torch.tensor([tokenize(params.prompt + ", " + params.a_prompt)] * n))
        uncond = _hf_context(hf_text_encoder, torch.tensor([tokenize(params.n_prompt)] * n))
        hint = torch.from_numpy(prepared.edge_map).float().div(255.0)[None, None].repeat(n, 3, 1, 1)
        soft = params.control_mode != "balanced"
        scales = [params.strength * 0.825 ** (12 - i) for i in range(13)] if soft else [params.strength] * 13
        scheduler = _reference_scheduler()
        scheduler.set_timesteps(params.ddim_steps)
        timesteps = scheduler.timesteps
        generators = [torch.Generator("cpu").manual_seed(params.seed + i) for i in range(n)]
        if img2img:
            kept = min(int(params.ddim_steps * params.denoising_strength), params.ddim_steps)
            timesteps = timesteps[params.ddim_steps - kept:]
            pixels = VaeImageProcessor(vae_scale_factor=8).preprocess(Image.fromarray(prepared.init_image))
            init_latents = SCALE_FACTOR * torch.cat(
                [diffusers_vae.encode(pixels).latent_dist.sample(generator=g) for g in generators])
            noise = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in generators])
            start = scheduler.add_noise(init_latents, noise, timesteps[:1])
        else:
            start = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in generators])
        assert [int(t[0]) for _, t in steps] == timesteps.tolist()
        assert_close(steps[0][0], start, tol=1e-5, what="the first step's x")

        total = len(timesteps)
        keep = [not (i / total < params.guidance_start or (i + 1) / total > params.guidance_end) for i in range(total)]
        assert keep == ([False] * 2 + [True] * 6 + [False] * 2 if img2img else [True] * total)
        models = (diffusers_unet, diffusers_controlnet, cond, uncond, hint)
        with_control = DiffusersGuidedEps(*models, scales, params.scale, False, layout="diffusers")
        without = DiffusersGuidedEps(*models, [0.0] * 13, params.scale, False, layout="diffusers")  # keep 0
        for k, (x, t) in enumerate(steps):
            ours_next = steps[k + 1][0] if k + 1 < len(steps) else ours_final
            eps = (with_control if keep[k] else without)(x, t[0])
            theirs_next = scheduler.step(eps, t[0], x, eta=0.0).prev_sample
            assert_close(ours_next, theirs_next, what=f"{case} step {k} (t={int(t[0])})")


@pytest.mark.parametrize("scale", [1.0, 1.5], ids=["one_pass", "guided"])
def test_lcm_run_matches_diffusers_controlnet_pipeline(
    pipeline, house_image, hf_text_encoder, diffusers_unet, diffusers_controlnet, diffusers_vae, monkeypatch, scale,
):
    """`generate` with sampler=lcm (4 steps, 2 samples) vs diffusers' own StableDiffusionControlNetPipeline with an
    LCMScheduler from SD 1.5's scheduler config (as LCM-LoRA users swap it in), on the same models, edge map,
    prompt contexts and per-sample generators: x_T and each step's noise drawn by the pipeline and the scheduler,
    and the latents it returns (output_type "latent"), LCM's denoised estimate at the last step. Scale 1 is LCM's
    recipe (one pass on both sides); 1.5 adds classifier-free guidance.

    Free-running, as users run either pipeline: the schedules differ by float32 rounding (diffusers' cumprod in
    float32, the reference's in float64) and the kernels by theirs (oneDNN's packed ones here, batch layouts).
    Over 4 steps that stays at the rounding level: observed 1e-5 to 4e-5 on latents of magnitude 49 (under
    1e-6 of it) with 1 or 2 threads, compared at 1e-4 of it as the DDIM run above. A wrong step is O(1).
    """
    from diffusers import LCMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    from test_samplers import SD15_SCHEDULER_CONFIG

    params = GenerationParams(prompt="a red house", num_samples=2, image_resolution=64, ddim_steps=4, strength=0.8,
                              scale=scale, seed=321, sampler="lcm")
    prepared = pipeline.prepare(house_image, params)
    finals: list[torch.Tensor] = []
    original_result = samplers.result
    monkeypatch.setattr(samplers, "result", lambda plan, state: finals.append(
        original_result(plan, state).detach().clone()) or finals[-1])
    (result,) = pipeline.generate([prepared])
    (ours,) = finals
    assert result.steps == 4

    n = params.num_samples
    theirs_pipeline = StableDiffusionControlNetPipeline(
        vae=diffusers_vae, text_encoder=hf_text_encoder, tokenizer=None, unet=diffusers_unet,
        controlnet=diffusers_controlnet, scheduler=LCMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    theirs_pipeline.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        prompts = [params.prompt + ", " + params.a_prompt, params.n_prompt]
        cond, uncond = (_hf_context(hf_text_encoder, torch.tensor([tokenize(text)] * n).to(DEVICE)) for text in prompts)
        theirs = theirs_pipeline(
            prompt_embeds=cond, negative_prompt_embeds=uncond, image=Image.fromarray(prepared.edge_map).convert("RGB"),
            height=64, width=64, num_inference_steps=params.ddim_steps, guidance_scale=params.scale,
            controlnet_conditioning_scale=params.strength, output_type="latent",
            generator=[torch.Generator("cpu").manual_seed(s) for s in prepared.seeds],
        ).images
    assert theirs_pipeline.scheduler.timesteps.tolist() == [999, 759, 499, 259]
    assert max_diff(ours[0], ours[1]) > 1e-1  # different seeds, different samples
    assert_close(ours, theirs, tol=1e-4, what=f"lcm final latents at scale {scale}")


# --------------------------------------------------------------------------------------------- token merging


class _MarginRecordingMatching(token_merging.BipartiteMatching):
    """The matching, recording how far each of its decisions is from a tie: between a source's best and second best
    destination, and between the last source merged and the first kept."""

    def __init__(self, metric, places, height, width, merges):
        super().__init__(metric, places, height, width, merges)
        unit = metric / metric.norm(dim=-1, keepdim=True)
        similarity = unit.gather(1, self.sources[..., None].expand(-1, -1, unit.shape[-1])) @ \
            unit.gather(1, self.destinations[..., None].expand(-1, -1, unit.shape[-1])).transpose(-1, -2)
        two_best = similarity.topk(2, dim=-1).values
        margins = [(two_best[..., 0] - two_best[..., 1]).min().item()]
        if 0 < self.merges < self.sources.shape[1]:
            ranked = two_best[..., 0].sort(dim=-1, descending=True).values
            margins.append((ranked[:, self.merges - 1] - ranked[:, self.merges]).min().item())
        MARGINS.append(min(margins))


MARGINS: list[float] = []


@pytest.mark.parametrize("ratio, use_rand", [(0.5, False), (0.3, False), (0.5, True), (0.75, True)])
def test_unet_with_token_merging_matches_tomesd(model, diffusers_unet, monkeypatch, ratio, use_rand):
    """Ours against `tomesd.apply_patch(unet, ratio, use_rand=...)` on diffusers' UNet, its other arguments at their
    defaults (what the service serves: merge the self-attention's input at the highest resolution only, 2x2 cells,
    mean), the control residuals added.

    use_rand=False: the top-left place of each cell, on two samples (two rows, each its own x and t).
    use_rand=True: the same draws on both sides. tomesd draws each block's places from one generator, created on
    first use unless one is there: it is given a generator seeded like ours, and one guided sample is evaluated (its
    two guidance halves are tomesd's batch of two, which shares the places), twice, so that the second evaluation's
    draws continue each generator's sequence in the same order (5 blocks at the highest resolution, in the order the
    blocks run).

    The matching is discrete (a maximum, a ranking): where two of its candidates are within rounding of each other,
    the 1e-7 by which the two sides' hidden states differ decides between them, and the outputs differ by 1e-3. So
    the inputs are ones whose decisions are all clear (checked: a test input with a near tie fails, naming it)."""
    tomesd = pytest.importorskip("tomesd")
    from controlnet_canny.token_merging import TokenMerging

    monkeypatch.setattr(token_merging, "BipartiteMatching", _MarginRecordingMatching)

    theirs_unet = tomesd.apply_patch(copy.deepcopy(diffusers_unet), ratio=ratio, use_rand=use_rand)
    unet = model.model.diffusion_model
    x, _, t, context = _control_inputs(seed=5)
    if use_rand:
        seed = 1234
        theirs_unet._tome_info["args"]["generator"] = torch.Generator("cpu").manual_seed(seed)
        merging = TokenMerging(ratio, [torch.Generator("cpu").manual_seed(seed)])
        x, evaluations = x[:1], [t[:1], t[1:]]  # one sample: its two guidance halves are the rows
    else:
        merging = TokenMerging(ratio, None)
        evaluations = [t]
    g = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        shapes = [r.shape for r in model.control_model(x, torch.zeros(len(x), 32, 8, 8, device=DEVICE), t[:len(x)],
                                                         context)]
        control = [0.5 * torch.randn(s, generator=g).to(DEVICE) for s in shapes]
        for step in evaluations:
            rows = context.shape[0] // x.shape[0]
            MARGINS.clear()
            ours = unet(x, step, context, control, merging)
            assert len(MARGINS) == 5 and min(MARGINS) > 1e-5, f"a test input with a near tie in the matching: {MARGINS}"
            theirs = theirs_unet(
                x.repeat(rows, 1, 1, 1), step.repeat(rows), encoder_hidden_states=context,
                down_block_additional_residuals=tuple(control[:-1]), mid_block_additional_residual=control[-1],
            ).sample
            assert_close(ours, theirs, tol=1e-5, what=f"UNet eps, token merging {ratio}, use_rand {use_rand}, t {step}")
            # merging changes the result (the tests above compare unmerged eps), and the drawn places are not the
            # top-left ones
            assert max_diff(ours, unet(x, step, context, control)) > 1e-3
            if use_rand:
                assert max_diff(ours, unet(x, step, context, control, TokenMerging(ratio, None))) > 1e-3
