"""Generation parameters: the reference demo's defaults and ranges (spec section 4), with field-named errors."""
from __future__ import annotations

import math

import pytest

from controlnet_canny.params import MAX_SEED, GenerationParams, Limits, ParamError, parse_params
from controlnet_canny.pipeline import control_scales


def _error(raw, limits: Limits = Limits()) -> ParamError:
    with pytest.raises(ParamError) as err:
        parse_params(raw, limits)
    assert str(err.value).startswith(err.value.field + ": ")
    return err.value


def test_defaults_are_the_reference_demos():
    params = parse_params({"prompt": "a house"})
    assert params.to_dict() == {
        "prompt": "a house",
        "a_prompt": "best quality, extremely detailed",
        "n_prompt": "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, "
                    "cropped, worst quality, low quality",
        "num_samples": 1,
        "image_resolution": 512,
        "ddim_steps": 20,
        "guess_mode": False,
        "strength": 1.0,
        "scale": 9.0,
        "seed": -1,
        "eta": 0.0,
        "low_threshold": 100,
        "high_threshold": 200,
        "sampler": "ddim",
        "karras": False,
        "guidance_start": 0.0,
        "guidance_end": 1.0,
        "control_mode": "balanced",
        "resize_mode": "crop_and_resize",
        "width": 0,
        "height": 0,
        "denoising_strength": 0.75,
        "long_prompt": False,
        "guidance_interval": None,
        "token_merging_ratio": 0.0,
        "loras": [],
        "vae": "full",
    }


def test_default_limits_are_the_reference_demos():
    limits = Limits()
    assert limits.num_samples == (1, 12)
    assert limits.image_resolution == (256, 768)
    assert limits.strength == (0.0, 2.0)
    assert limits.low_threshold == (1, 255) and limits.high_threshold == (1, 255)
    assert limits.ddim_steps == (1, 100)
    assert limits.scale == (0.1, 30.0)
    assert limits.seed == (-1, 2**31 - 1) and MAX_SEED == 2147483647


def test_form_strings_coerced():
    params = parse_params({
        "prompt": "p", "num_samples": " 3 ", "image_resolution": "640", "ddim_steps": "30", "guess_mode": "true",
        "strength": "1.5", "scale": "7", "seed": "42", "eta": "0.5", "low_threshold": "50", "high_threshold": "150",
    })
    assert (params.num_samples, params.image_resolution, params.ddim_steps, params.guess_mode) == (3, 640, 30, True)
    assert (params.strength, params.scale, params.seed, params.eta) == (1.5, 7.0, 42, 0.5)
    assert (params.low_threshold, params.high_threshold) == (50, 150)
    assert isinstance(params.num_samples, int) and isinstance(params.scale, float)


@pytest.mark.parametrize("value, expected", [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("on", True), (True, True), (1, True),
    ("false", False), ("0", False), ("no", False), ("off", False), (False, False), (0, False),
])
def test_guess_mode_values(value, expected):
    assert parse_params({"prompt": "p", "guess_mode": value}).guess_mode is expected


@pytest.mark.parametrize("value", ["maybe", 2, 0.5, None, [True]])
def test_guess_mode_bad_values(value):
    assert _error({"prompt": "p", "guess_mode": value}).field == "guess_mode"


def test_integral_float_accepted_for_int():
    assert parse_params({"prompt": "p", "ddim_steps": 25.0}).ddim_steps == 25


@pytest.mark.parametrize("field, low, high, below, above", [
    ("num_samples", 1, 12, 0, 13),
    ("image_resolution", 256, 768, 192, 832),
    ("ddim_steps", 1, 100, 0, 101),
    ("strength", 0.0, 2.0, -0.01, 2.01),
    ("scale", 0.1, 30.0, 0.09, 30.01),
    ("seed", -1, 2**31 - 1, -2, 2**31),
    ("eta", 0.0, 1.0, -0.1, 1.1),
    ("low_threshold", 1, 255, 0, 256),
    ("high_threshold", 1, 255, 0, 256),
    ("denoising_strength", 0.0, 1.0, -0.01, 1.01),
    ("token_merging_ratio", 0.0, 0.75, -0.01, 0.76),
])
def test_ranges_enforced(field, low, high, below, above):
    for ok in (low, high):
        assert getattr(parse_params({"prompt": "p", field: ok}), field) == ok
    for bad in (below, above):
        error = _error({"prompt": "p", field: bad})
        assert error.field == field
        assert str(low) in error.message and str(high) in error.message


@pytest.mark.parametrize("field", ["strength", "scale", "eta"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf", "-Infinity"])
def test_non_finite_refused(field, value):
    error = _error({"prompt": "p", field: value})
    assert error.field == field and "finite" in error.message


@pytest.mark.parametrize("field", ["num_samples", "ddim_steps", "seed", "image_resolution", "low_threshold"])
@pytest.mark.parametrize("value", [math.nan, math.inf, "nan", 2.5, "2.5", "ten", None, [1]])
def test_bad_int_refused(field, value):
    assert _error({"prompt": "p", field: value}).field == field


@pytest.mark.parametrize("field", ["num_samples", "ddim_steps", "seed", "low_threshold", "high_threshold"])
@pytest.mark.parametrize("value", [True, False])
def test_boolean_for_int_refused(field, value):
    error = _error({"prompt": "p", field: value})
    assert error.field == field and "boolean" in error.message


@pytest.mark.parametrize("field", ["strength", "scale", "eta"])
def test_boolean_for_float_refused(field):
    assert _error({"prompt": "p", field: True}).field == field


@pytest.mark.parametrize("value", [None, "x", [1.0]])
def test_bad_float_refused(value):
    assert _error({"prompt": "p", "scale": value}).field == "scale"


def test_unknown_field_refused():
    error = _error({"prompt": "p", "steps": 20})
    assert error.field == "steps" and "unknown" in error.message and "ddim_steps" in error.message


def test_prompt_required():
    assert _error({"num_samples": 1}).field == "prompt"
    assert _error({}).field == "prompt"


def test_empty_prompt_allowed():
    assert parse_params({"prompt": ""}).prompt == ""


@pytest.mark.parametrize("field", ["prompt", "a_prompt", "n_prompt"])
def test_text_length_capped(field):
    raw = {"prompt": "p", field: "x" * 2000}
    assert getattr(parse_params(raw), field) == "x" * 2000
    error = _error({**raw, field: "x" * 2001})
    assert error.field == field and "2000" in error.message


@pytest.mark.parametrize("field", ["prompt", "a_prompt", "n_prompt"])
def test_text_must_be_string(field):
    assert _error({"prompt": "p", field: 5}).field == field


def test_non_ascii_prompt_kept():
    assert parse_params({"prompt": "猫 in a café 🐱"}).prompt == "猫 in a café 🐱"


@pytest.mark.parametrize("value", [300, 257, 320 + 32])
def test_image_resolution_multiple_of_64(value):
    error = _error({"prompt": "p", "image_resolution": value})
    assert error.field == "image_resolution" and "64" in error.message


def test_image_resolution_multiples_accepted():
    for value in range(256, 769, 64):
        assert parse_params({"prompt": "p", "image_resolution": value}).image_resolution == value


def test_limits_from_mapping_overrides():
    limits = Limits.from_mapping({"image_resolution": [64, 1024], "num_samples": [1, 2], "prompt_chars": 10})
    assert limits.image_resolution == (64, 1024) and limits.num_samples == (1, 2) and limits.prompt_chars == 10
    assert limits.scale == Limits().scale  # untouched
    assert parse_params({"prompt": "p", "image_resolution": 64}, limits).image_resolution == 64
    assert parse_params({"prompt": "p", "image_resolution": 1024}, limits).image_resolution == 1024
    assert _error({"prompt": "p", "image_resolution": 64}).field == "image_resolution"  # default limits unchanged
    assert _error({"prompt": "p", "num_samples": 3}, limits).field == "num_samples"
    assert _error({"prompt": "x" * 11}, limits).field == "prompt"


def test_limits_from_mapping_unknown_refused():
    with pytest.raises(ValueError, match="max_samples"):
        Limits.from_mapping({"max_samples": [1, 2]})


def test_resolution_step_configurable():
    limits = Limits.from_mapping({"image_resolution": [64, 1024]})
    assert parse_params({"prompt": "p", "image_resolution": 96}, limits, resolution_step=32).image_resolution == 96
    with pytest.raises(ParamError):
        parse_params({"prompt": "p", "image_resolution": 96}, limits)


def test_seed_resolution():
    fixed = GenerationParams(prompt="p", seed=1234)
    assert fixed.with_resolved_seed() == fixed
    assert GenerationParams(prompt="p", seed=0).with_resolved_seed().seed == 0
    resolved = [GenerationParams(prompt="p").with_resolved_seed() for _ in range(8)]
    for params in resolved:
        assert 0 <= params.seed <= MAX_SEED and params.prompt == "p"
    assert len({p.seed for p in resolved}) > 1  # random, not a constant


def test_params_frozen():
    params = GenerationParams(prompt="p")
    with pytest.raises(Exception):
        params.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("strength", [1.0, 0.5, 2.0])
def test_control_scales(strength):
    assert control_scales(strength, False) == [strength] * 13
    guess = control_scales(strength, True)
    assert len(guess) == 13
    for i, value in enumerate(guess):
        assert value == pytest.approx(strength * 0.825 ** (12 - i), rel=1e-12)
    assert guess[12] == strength and guess[0] == pytest.approx(strength * 0.0994140, rel=1e-5)
    assert guess == sorted(guess)  # deep (middle) residuals keep the most


@pytest.mark.parametrize("field, choices", [
    ("sampler", ("ddim", "dpmpp_2m", "euler_a", "unipc")),
    ("control_mode", ("balanced", "prompt", "control")),
    ("resize_mode", ("crop_and_resize", "just_resize", "resize_and_fill")),
])
def test_choices(field, choices):
    for choice in choices:
        assert getattr(parse_params({"prompt": "p", field: choice}), field) == choice
    for bad in ("DDIM", "", "euler", 1, None, ["ddim"]):
        error = _error({"prompt": "p", field: bad})
        assert error.field == field and all(choice in error.message for choice in choices)


def test_karras_only_where_the_sampler_has_it():
    for sampler in ("dpmpp_2m", "unipc"):
        assert parse_params({"prompt": "p", "sampler": sampler, "karras": "true"}).karras is True
    for sampler in ("ddim", "euler_a"):
        error = _error({"prompt": "p", "sampler": sampler, "karras": True})
        assert error.field == "karras" and sampler in error.message and "dpmpp_2m" in error.message


def test_guidance_window_range():
    params = parse_params({"prompt": "p", "guidance_start": "0.25", "guidance_end": 0.75})
    assert (params.guidance_start, params.guidance_end) == (0.25, 0.75)
    for field in ("guidance_start", "guidance_end"):
        for bad in (-0.01, 1.01, "nan", True):
            assert _error({"prompt": "p", field: bad}).field == field


@pytest.mark.parametrize("start, end", [(0.5, 0.5), (0.6, 0.4), (1.0, 1.0)])
def test_guidance_window_must_be_open(start, end):
    error = _error({"prompt": "p", "guidance_start": start, "guidance_end": end})
    assert error.field == "guidance_end" and str(start) in error.message


def test_guess_mode_is_control_mode_control():
    assert parse_params({"prompt": "p", "guess_mode": True}).effective_control_mode == "control"
    assert parse_params({"prompt": "p", "guess_mode": True, "control_mode": "control"}).effective_control_mode == "control"
    assert parse_params({"prompt": "p", "control_mode": "prompt"}).effective_control_mode == "prompt"
    assert parse_params({"prompt": "p"}).effective_control_mode == "balanced"
    error = _error({"prompt": "p", "guess_mode": True, "control_mode": "prompt"})
    assert error.field == "guess_mode" and "prompt" in error.message


def test_width_and_height():
    params = parse_params({"prompt": "p", "width": "768", "height": 512})
    assert (params.width, params.height) == (768, 512)
    assert _error({"prompt": "p", "width": 512}).field == "height"
    assert _error({"prompt": "p", "height": 512}).field == "width"
    for field in ("width", "height"):
        other = "height" if field == "width" else "width"
        assert _error({"prompt": "p", field: 320 + 32, other: 512}).field == field
        error = _error({"prompt": "p", field: 832, other: 512})
        assert error.field == field and "256" in error.message and "768" in error.message
        assert _error({"prompt": "p", field: 192, other: 512}).field == field


def test_lcm_sampler():
    params = parse_params({"prompt": "p", "sampler": "lcm", "ddim_steps": "4", "scale": "1"})
    assert (params.sampler, params.ddim_steps, params.scale) == ("lcm", 4, 1.0)
    error = _error({"prompt": "p", "sampler": "lcm", "karras": "true"})
    assert error.field == "karras" and "lcm" in error.message


def test_loras_field_and_prompt_tags():
    params = parse_params({"prompt": "a house <lora:lcm:0.5>, <lora:style>", "loras": ["detail:-0.3", ["x y", 2]]})
    assert params.prompt == "a house , "  # the tags go, as AUTOMATIC1111 takes them out
    assert params.loras == (("detail", -0.3), ("x y", 2.0), ("lcm", 0.5), ("style", 1.0))
    assert params.to_dict()["loras"] == ["detail:-0.3", "x y:2", "lcm:0.5", "style:1"]
    # the recorded parameters give the same request back (no tag applied twice)
    assert parse_params(params.to_dict()) == params
    # form fields: repeated (a list), or one text with commas
    assert parse_params({"prompt": "p", "loras": "a:1, b:0.25"}).loras == (("a", 1.0), ("b", 0.25))
    assert parse_params({"prompt": "p", "loras": ["a:1", "b"]}).loras == (("a", 1.0), ("b", 1.0))
    assert parse_params({"prompt": "p", "loras": ""}).loras == ()


@pytest.mark.parametrize("raw, field, words", [
    ({"loras": "a:4.5"}, "loras", ["a", "-4", "4", "4.5"]),
    ({"loras": "a:nan"}, "loras", ["finite"]),
    ({"loras": "../secrets:1"}, "loras", ["'../secrets'", "name"]),
    ({"loras": [3]}, "loras", ["name:weight"]),
    ({"loras": {"a": 1}}, "loras", ["list"]),
    ({"loras": ",".join(f"l{i}" for i in range(9))}, "loras", ["9", "at most 8"]),
    ({"loras": "a", "prompt": "p <lora:a:0.5>"}, "loras", ["a", "more than once"]),
    ({"prompt": "p <lora:a:b:c>"}, "prompt", ["number", "b:c"]),
    ({"prompt": "p <lora:a:9>"}, "prompt", ["between"]),
    ({"n_prompt": "<lora:a>"}, "n_prompt", ["prompt only"]),
    ({"vae": "tiny"}, "vae", ["full", "taesd"]),
])
def test_lora_and_vae_mistakes_name_the_field(raw, field, words):
    error = _error({"prompt": "p", **raw})
    assert error.field == field
    for word in words:
        assert word in error.message


def test_lora_limits_from_configuration():
    limits = Limits.from_mapping({"lora_weight": [0, 1], "loras": 1})
    assert _error({"prompt": "p", "loras": "a:1.5"}, limits).field == "loras"
    assert _error({"prompt": "p", "loras": "a,b"}, limits).field == "loras"
    assert parse_params({"prompt": "p <lora:a:0.5>"}, limits).loras == (("a", 0.5),)
