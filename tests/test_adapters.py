"""The adapter store and per-request adapters through the pipeline: listing, hot pickup, bad files, LoRAs, embeddings
and TAESD in requests, batching of requests with different adapters, and what a result records."""
from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIG
from controlnet_canny import adapters as adapter_store
from controlnet_canny import samplers
from controlnet_canny.backends import BackendOptions
from controlnet_canny.config import load_config
from controlnet_canny.params import GenerationParams, Limits, ParamError, parse_params
from controlnet_canny.pipeline import ControlNetCannyPipeline
from make_tiny_adapters import write_embedding, write_lora, write_taesd

LIMITS = Limits(image_resolution=(64, 768))


@pytest.fixture(scope="module")
def config():
    return load_config(TINY_CONFIG)


@pytest.fixture()
def store(tmp_path, config):
    """A store with two LoRAs (kohya with alphas and LoCon convolutions; PEFT, UNet only), an embedding, a TAESD."""
    root = tmp_path / "adapters"
    write_lora(root / "loras" / "style.safetensors", config, "kohya", rank=4, seed=1, alpha=2.0)
    write_lora(root / "loras" / "detail.safetensors", config, "peft", rank=2, seed=2, text_encoder=False)
    (root / "embeddings").mkdir()
    write_embedding(root / "embeddings" / "shiny.pt", config.text.width, 2, seed=3)
    write_taesd(root / "taesd", "madebyollin", seed=4)
    return root


@pytest.fixture()
def pipe(tiny_checkpoint, store):
    return ControlNetCannyPipeline.load([tiny_checkpoint], TINY_CONFIG, "cpu", "fp32", adapters=store)


def params(prompt: str = "a house", **fields) -> GenerationParams:
    return parse_params({"prompt": prompt, "image_resolution": 64, "seed": 7, "ddim_steps": 3, **fields}, LIMITS)


def final_latents(pipe, prepared_list) -> list[torch.Tensor]:
    samplings = [pipe.start(p) for p in prepared_list]
    while not all(s.finished for s in samplings):
        for group in pipe.groups([s for s in samplings if not s.finished]):
            pipe.step(group)
    return [samplers.result(s.plan, s.state) for s in samplings]


def test_listing_names_every_file_with_kind_rank_size_and_sha256(pipe, store):
    listing = {entry["name"]: entry for entry in pipe.adapters.listing()}
    assert set(listing) == {"style", "detail", "shiny", "taesd_decoder", "taesd_encoder"}
    style = listing["style"]
    path = store / "loras" / "style.safetensors"
    assert style == {"name": "style", "kind": "lora", "file": "loras/style.safetensors", "size": path.stat().st_size,
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "rank": 4, "layout": "kohya"}
    assert (listing["detail"]["rank"], listing["detail"]["layout"]) == (2, "peft")
    assert (listing["shiny"]["kind"], listing["shiny"]["vectors"]) == ("embedding", 2)
    assert listing["taesd_decoder"]["kind"] == "taesd" and "error" not in listing["taesd_decoder"]


def test_a_bad_file_is_listed_with_its_error_and_the_others_stay_usable(pipe, store, house_image, config):
    (store / "loras" / "truncated.safetensors").write_bytes((store / "loras" / "style.safetensors").read_bytes()[:500])
    write_lora(store / "loras" / "other model.safetensors", load_config(TINY_CONFIG.parent / "cldm_v15.yaml"),
               "kohya", rank=1, text_encoder=False, convs=False)
    (store / "loras" / "bad$name.safetensors").write_bytes(b"")
    pipe.adapters.refresh(force=True)
    listing = {entry["name"]: entry for entry in pipe.adapters.listing()}
    assert "truncated.safetensors" in listing["truncated"]["error"]
    assert "no layer of this model" in listing["other model"]["error"]  # SD 1.5's LoRA: layers the tiny model lacks
    assert "not a usable name" in listing["bad$name"]["error"]
    with pytest.raises(ParamError) as error:
        pipe.prepare(house_image, params(loras="truncated:1"))
    assert error.value.field == "loras" and "truncated" in error.value.message and "unusable" in error.value.message
    assert pipe.prepare(house_image, params(loras="style:1")).adapters.loras[0][2].name == "style"


def test_unknown_names_and_a_missing_store_are_the_clients_mistakes(pipe, tiny_pipeline, house_image):
    with pytest.raises(ParamError) as error:
        pipe.prepare(house_image, params(loras="nope:1"))
    assert error.value.field == "loras" and "'nope'" in error.value.message and "detail, style" in error.value.message
    for fields, field in (({"loras": "style"}, "loras"), ({"vae": "taesd"}, "vae")):
        with pytest.raises(ParamError) as error:
            tiny_pipeline.prepare(house_image, params(**fields))
        assert error.value.field == field and "no adapter store" in error.value.message


def test_files_added_replaced_and_removed_are_picked_up_without_a_restart(pipe, store, config, monkeypatch):
    monkeypatch.setattr(adapter_store, "RESCAN_SECONDS", 0.0)
    write_lora(store / "loras" / "new.pt", config, "kohya-ldm", rank=3, seed=5)
    assert {e["name"]: e["rank"] for e in pipe.adapters.listing() if e["kind"] == "lora"}["new"] == 3
    before = pipe.adapters.version
    sha = next(e["sha256"] for e in pipe.adapters.listing() if e["name"] == "new")
    write_lora(store / "loras" / "new.pt", config, "kohya-ldm", rank=3, seed=6)
    os.utime(store / "loras" / "new.pt", ns=(1, 1))  # a rewrite within the file system's time resolution
    assert next(e["sha256"] for e in pipe.adapters.listing() if e["name"] == "new") != sha
    assert pipe.adapters.version > before
    (store / "loras" / "new.pt").unlink()
    shutil.rmtree(store / "taesd")
    names = {e["name"] for e in pipe.adapters.listing()}
    assert "new" not in names and "taesd_decoder" not in names
    assert pipe.adapters.taesd() is None


def test_requests_without_adapters_are_unchanged_by_a_store(tiny_checkpoint, store, house_image):
    """Bit for bit: the backend's levers forced alike on both (timed choices may differ between two loads on a busy
    machine, and round differently)."""
    plain_levers = BackendOptions(prepack="none", winograd="none", attention="torch", calibration_cache="")
    loaded = [ControlNetCannyPipeline.load([tiny_checkpoint], TINY_CONFIG, "cpu", "fp32", plain_levers, adapters)
              for adapters in (store, None)]
    ours, plain = (p.generate([p.prepare(house_image, params())])[0].images[0] for p in loaded)
    assert np.array_equal(ours, plain)


def test_loras_change_the_image_and_weight_zero_changes_nothing(pipe, house_image):
    base, zero, styled = (pipe.generate([pipe.prepare(house_image, params(**f))])[0].images[0]
                          for f in ({}, {"loras": "style:0,detail:0"}, {"loras": "style:1"}))
    assert np.array_equal(base, zero)
    assert np.abs(base.astype(int) - styled.astype(int)).mean() > 1


def test_the_prompt_tag_is_the_field(pipe, house_image):
    tagged = pipe.prepare(house_image, params("a house <lora:style:0.7>"))
    field = pipe.prepare(house_image, params("a house ", loras="style:0.7"))
    assert tagged.params == field.params
    a, b = final_latents(pipe, [tagged, field])
    assert torch.equal(a, b)


def test_requests_with_other_adapters_batch_apart_and_get_what_they_get_alone(pipe, house_image):
    """Equal LoRAs and weights share evaluations; other LoRAs (or none) evaluate apart in the same step, so each
    request's latents are its own run alone's (up to the rounding of another batch size, as for any batch)."""
    fields = [{}, {"loras": "style:1"}, {"loras": "style:1"}, {"loras": "style:0.5"}, {"loras": "detail:1,style:1"}]
    prepared = [pipe.prepare(house_image, params(seed=10 + i, **f)) for i, f in enumerate(fields)]
    alone = [final_latents(pipe, [p])[0] for p in prepared]
    samplings = [pipe.start(p) for p in prepared]
    assert [len(g) for g in pipe.groups(samplings)] == [1, 2, 1, 1]
    together = final_latents(pipe, prepared)
    for a, b in zip(alone, together):
        # the backend's levers may take another kernel at another batch size (Winograd up to a measured input size)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-3 * float(a.abs().max()))
    assert torch.equal(alone[0], together[0])  # evaluated alone in both runs
    unstyled = final_latents(pipe, [pipe.prepare(house_image, params(seed=11))])[0]
    assert (unstyled - together[1]).abs().mean() > 0.1


def test_text_encoder_loras_and_embeddings_change_the_context_and_are_cached_apart(pipe):
    store_adapters = pipe._resolve_adapters(params("a shiny house", loras="style:1"))
    plain = pipe.encode_text("a house")
    with_lora = pipe.encode_text("a house", adapters=store_adapters)
    assert (plain - with_lora).abs().max() > 1e-3
    shiny = pipe.encode_text("a shiny house", adapters=pipe._resolve_adapters(params("a shiny house")))
    literal = pipe.encode_text("a shiny house")
    assert (shiny - literal).abs().max() > 1e-3
    assert torch.equal(pipe.encode_text("a house"), plain)  # the LoRA's context did not take the plain one's place


def test_a_result_records_each_adapter_with_its_sha256(pipe, house_image, store):
    prepared = pipe.prepare(house_image, params("a shiny house <lora:style:0.5>", n_prompt="blurry",
                                                loras="detail:-1", vae="taesd"))
    sha = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in store.rglob("*") if p.is_file()}
    assert prepared.adapters.record() == {
        "loras": [{"name": "detail", "weight": -1.0, "sha256": sha["detail"]},
                  {"name": "style", "weight": 0.5, "sha256": sha["style"]}],
        "embeddings": [{"name": "shiny", "sha256": sha["shiny"]}],
        "taesd": [{"file": "taesd/taesd_decoder.safetensors", "sha256": sha["taesd_decoder"]},
                  {"file": "taesd/taesd_encoder.safetensors", "sha256": sha["taesd_encoder"]}],
    }
    assert prepared.params.prompt == "a shiny house " and prepared.params.loras == (("detail", -1.0), ("style", 0.5))


def test_vae_taesd_decodes_with_the_stores_tiny_autoencoder(pipe, house_image):
    full_prepared, taesd_prepared = (pipe.prepare(house_image, params(vae=v)) for v in ("full", "taesd"))
    (latent,) = final_latents(pipe, [full_prepared])
    taesd = taesd_prepared.adapters.taesd
    expected = (taesd.decode(latent).permute(0, 2, 3, 1) * 255).clamp(0, 255).to(torch.uint8)[0].numpy()
    full, tiny = (r.images[0] for r in pipe.generate([full_prepared, taesd_prepared]))
    assert np.abs(tiny.astype(int) - expected.astype(int)).max() <= 1  # [0, 1] -> [-1, 1] -> levels, truncated
    assert np.abs(tiny.astype(int) - full.astype(int)).mean() > 5  # another decoder


def test_vae_taesd_without_a_taesd_is_refused_naming_the_field(pipe, store, house_image):
    shutil.rmtree(store / "taesd")
    pipe.adapters.refresh(force=True)
    with pytest.raises(ParamError) as error:
        pipe.prepare(house_image, params(vae="taesd"))
    assert error.value.field == "vae" and "taesd/" in error.value.message
    (store / "taesd").mkdir()
    (store / "taesd" / "taesd_decoder.pth").write_bytes(b"not a checkpoint")
    pipe.adapters.refresh(force=True)
    with pytest.raises(ParamError) as error:
        pipe.prepare(house_image, params(vae="taesd"))
    assert error.value.field == "vae" and "unusable" in error.value.message
    assert "error" in next(e for e in pipe.adapters.listing() if e["kind"] == "taesd")


def test_previews_go_through_the_stores_taesd(pipe, house_image):
    sampling = pipe.start(pipe.prepare(house_image, params(ddim_steps=4)), preview_every=1)
    pipe.step([sampling])
    preview = pipe.preview(sampling)
    assert preview.shape == (64, 64, 3)  # TAESD decodes to the image's size; latent_rgb gives the latent's (8x8)


# ----------------------------------------------------------------------------------------- vs diffusers

from test_parity_diffusers import (  # noqa: E402,F401  (module fixtures)
    DEVICE, _hf_context, diffusers_controlnet, diffusers_unet, diffusers_vae, hf_text_encoder, original_state,
    original_yaml,
)


def test_a_two_lora_run_matches_diffusers_controlnet_pipeline(
    pipe, store, house_image, hf_text_encoder, diffusers_unet, diffusers_controlnet, diffusers_vae, monkeypatch,
):
    """A whole LCM run (4 steps, scale 1.5: both guidance halves, 2 samples) with two LoRAs of the store at once
    (kohya with alphas, LoCon and text-encoder layers; PEFT on the UNet), requested by the `loras` field, against
    diffusers' StableDiffusionControlNetPipeline after `load_lora_weights` of the same files and `set_adapters`
    with the same weights: the final latents, free-running as the LCM run of test_parity_diffusers (which it
    compares at 1e-4 of their magnitude, observed 1e-6 of it)."""
    import copy

    from diffusers import LCMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    from controlnet_canny.text_encoder import tokenize
    from test_samplers import SD15_SCHEDULER_CONFIG

    weights = {"style": 0.8, "detail": -0.6}
    prepared = pipe.prepare(house_image, params("a red house", num_samples=2, ddim_steps=4, scale=1.5, seed=321,
                                                sampler="lcm", loras=[f"{n}:{w}" for n, w in weights.items()]))
    (ours,) = final_latents(pipe, [prepared])

    theirs_pipeline = StableDiffusionControlNetPipeline(
        vae=diffusers_vae, text_encoder=copy.deepcopy(hf_text_encoder), tokenizer=None,
        unet=copy.deepcopy(diffusers_unet), controlnet=diffusers_controlnet,
        scheduler=LCMScheduler.from_config(SD15_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    theirs_pipeline.set_progress_bar_config(disable=True)
    for name in weights:
        theirs_pipeline.load_lora_weights(str(store / "loras"), weight_name=f"{name}.safetensors", adapter_name=name)
    theirs_pipeline.set_adapters(list(weights), list(weights.values()))
    p = prepared.params
    with torch.inference_mode():
        cond, uncond = (_hf_context(theirs_pipeline.text_encoder, torch.tensor([tokenize(text)] * 2).to(DEVICE))
                        for text in (p.prompt + ", " + p.a_prompt, p.n_prompt))
        theirs = theirs_pipeline(
            prompt_embeds=cond, negative_prompt_embeds=uncond, image=Image.fromarray(prepared.edge_map).convert("RGB"),
            height=64, width=64, num_inference_steps=p.ddim_steps, guidance_scale=p.scale, output_type="latent",
            generator=[torch.Generator("cpu").manual_seed(s) for s in prepared.seeds],
        ).images
    unstyled = final_latents(pipe, [pipe.prepare(house_image, params("a red house", num_samples=2, ddim_steps=4,
                                                                     scale=1.5, seed=321, sampler="lcm"))])[0]
    magnitude = float(ours.abs().max())
    difference = float((ours - theirs.to(ours.device)).abs().max())
    print(f"two-LoRA LCM run vs diffusers: {difference:.3g} on latents of magnitude {magnitude:.3g}; the LoRAs moved "
          f"them by {float((ours - unstyled).abs().max()):.3g}")
    assert difference <= 1e-4 * magnitude
    assert float((ours - unstyled).abs().max()) > 0.1 * magnitude
