"""The serving layer without a server: request parsing, output negotiation, batching groups, response
encoding, and the TorchServe handler driven through a real `ts.context.Context`."""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "handler"))  # the handler's modules, as TorchServe loads them

import serving  # noqa: E402
from controlnet_canny.bundle import read_png_parameters  # noqa: E402
from controlnet_canny.config import CONFIG_DIR  # noqa: E402
from controlnet_canny.params import ParamError  # noqa: E402
from controlnet_canny.pipeline import Prepared  # noqa: E402

FORM = {"Content-Type": "multipart/form-data; boundary=x"}
JSON = {"Content-Type": "application/json"}
TINY = {"checkpoints": ["control_tiny_canny.pth"], "model_config": "cldm_tiny.yaml",
        "limits": {"image_resolution": [64, 768]}, "defaults": {"image_resolution": 64}}


def png_bytes(image: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def config() -> serving.ServingConfig:
    return serving.ServingConfig.from_mapping(TINY)


@pytest.fixture(scope="module")
def house_png(house_image) -> bytes:
    return png_bytes(house_image)


def form(fields: dict, image: bytes | None) -> dict:
    row = {name: str(value).encode() for name, value in fields.items()}
    if image is not None:
        row["image"] = image
    return row


# --- configuration --------------------------------------------------------------------------------------

def test_config_defaults_and_limits_apply(config, house_png):
    request = serving.parse_request(form({"prompt": "a"}, house_png), FORM, config)
    assert request.params.image_resolution == 64
    with pytest.raises(ParamError, match="between 64 and 768"):
        serving.parse_request(form({"prompt": "a", "image_resolution": 32}, house_png), FORM, config)


@pytest.mark.parametrize("section, message", [
    ({**TINY, "colour": 1}, "unknown keys"),
    ({**TINY, "checkpoints": []}, "checkpoints is required"),
    ({**TINY, "precision": "fp8"}, "precision"),
    ({**TINY, "defaults": {"ddim_steps": 0}}, "defaults.ddim_steps"),
    ({**TINY, "defaults": {"prompt": "x"}}, "cannot have defaults"),
    ({**TINY, "limits": {"steps": [1, 2]}}, "limits: unknown keys"),
])
def test_config_mistakes_are_named(section, message):
    with pytest.raises(ValueError, match=message):
        serving.ServingConfig.from_mapping(section)


def test_model_config_template_is_valid_once_filled():
    """handler/model-config.yaml with what scripts/build_mar.py fills in."""
    section = yaml.safe_load(Path(serving.__file__).with_name("model-config.yaml").read_text())["handler"]
    config = serving.ServingConfig.from_mapping({**section, "checkpoints": ["a.pth"], "model_config": "cldm_v15.yaml"})
    assert config.worker_threads(workers=1) >= 1


# --- request parsing ------------------------------------------------------------------------------------

def test_multipart_and_json_give_the_same_request(config, house_png):
    fields = {"prompt": "a house", "seed": 7, "strength": 0.5, "guess_mode": "true"}
    from_form = serving.parse_request(form(fields, house_png), FORM, config)
    body = {**fields, "guess_mode": True, "image": base64.b64encode(house_png).decode()}
    from_json = serving.parse_request({"body": body}, JSON, config)
    assert from_form.params == from_json.params
    assert np.array_equal(from_form.image, from_json.image)
    assert from_form.params.guess_mode is True and from_form.params.seed == 7


@pytest.mark.parametrize("fields, accept, expected", [
    ({}, None, "zip"),
    ({}, "*/*", "zip"),
    ({}, "image/png", "png"),
    ({}, "application/json, image/png", "json"),
    ({}, "text/html, */*;q=0.1", "zip"),
    ({}, "application/zip;q=0.2, application/json;q=0.9", "json"),  # q-values rank, not the order
    ({}, "image/*, application/json;q=0.5", "png"),
    ({}, "application/*;q=0.8, application/zip;q=0", "json"),  # the most specific range decides: zip refused
    ({}, "IMAGE/PNG;Q=1", "png"),
    ({}, ";;, q=0.5", "zip"),  # nothing parses: as if absent
    ({"num_samples": "2"}, "image/png, application/zip", "zip"),  # png holds one image: the next acceptable
    ({"num_samples": "2"}, "image/png;q=1, application/json;q=0.3", "json"),
    ({"mode": "edges", "num_samples": "2"}, "image/png", "png"),  # the edge map alone
    ({"output": "json"}, "image/png", "json"),  # the field wins over the header
    ({"stream": "true"}, None, "json"),
])
def test_output_format(config, house_png, fields, accept, expected):
    headers = {**FORM, **({"Accept": accept} if accept else {})}
    assert serving.parse_request(form({"prompt": "a", **fields}, house_png), headers, config).output == expected


@pytest.mark.parametrize("fields, accept", [
    ({}, "text/html"),
    ({}, "*/*;q=0"),
    ({}, "application/zip;q=0, application/json;q=0, image/png;q=0, text/*"),
    ({"num_samples": "3"}, "image/png"),  # png cannot hold three samples, and nothing else is accepted
])
def test_unacceptable_accept_is_406(config, house_png, fields, accept):
    with pytest.raises(serving.NotAcceptable) as err:
        serving.parse_request(form({"prompt": "a", **fields}, house_png), {**FORM, "Accept": accept}, config)
    response = serving.param_error_response(err.value)
    assert response.status == 406 and json.loads(response.body)["field"] == "Accept", response


@pytest.mark.parametrize("row, headers, field, fragment", [
    ({"prompt": b"a"}, FORM, "image", "is required"),
    ({"image": b"x"}, FORM, "image", "not a valid"),
    ({"prompt": b"a", "image": "<svg/>"}, FORM, "image", "not a valid"),  # a text part, decoded by TorchServe
    ({"prompt": b"a", "colour": b"red"}, FORM, "colour", "unknown field"),
    ({"prompt": b"\xff\xfe"}, FORM, "prompt", "UTF-8"),
    ({"prompt": b"a", "ddim_steps": b"0"}, FORM, "ddim_steps", "between 1 and 100"),
    ({"prompt": b"a", "output": b"gif"}, FORM, "output", "zip, png, json"),
    ({"prompt": b"a", "mode": b"paint"}, FORM, "mode", "generate, edges"),
    ({"prompt": b"a", "stream": b"maybe"}, FORM, "stream", "true or false"),
    ({"prompt": b"a", "stream": b"1", "output": b"zip"}, FORM, "stream", "output=json"),
    ({"prompt": b"a", "num_samples": b"2", "output": b"png"}, FORM, "output", "num_samples is 2"),
    ({"prompt": b"a", "preview_every": b"2"}, FORM, "preview_every", "stream=true"),
    ({"prompt": b"a", "stream": b"1", "preview_every": b"-1"}, FORM, "preview_every", "between 0 and 100"),
    ({"prompt": b"a", "stream": b"1", "preview_every": b"101"}, FORM, "preview_every", "between 0 and 100"),
    ({"prompt": b"a", "stream": b"1", "preview_every": b"x"}, FORM, "preview_every", "integer"),
    ({"prompt": b"a", "guidance_interval": b"6,1"}, FORM, "guidance_interval", "low < high"),
    ({"body": bytearray(b'{"prompt":')}, JSON, "body", "not valid JSON"),
    ({"body": [1, 2]}, JSON, "body", "JSON object"),
    ({"body": {"prompt": "a", "image": "***"}}, JSON, "image", "base64"),
    ({"body": {"prompt": "a", "image": 5}}, JSON, "image", "base64 text"),
    ({"body": {"prompt": "a", "output": ["zip"]}}, JSON, "output", "zip, png, json"),
    ({"body": {"prompt": "a", "mode": {"edges": 1}}}, JSON, "mode", "generate, edges"),
    ({"body": b"prompt=a"}, {"Content-Type": "text/plain"}, "Content-Type", "multipart/form-data"),
])
def test_client_mistakes_name_the_field(config, house_png, row, headers, field, fragment):
    row = dict(row)
    if field not in ("image", "body", "Content-Type") and "body" not in row:
        row["image"] = house_png
    with pytest.raises(ParamError) as caught:
        serving.parse_request(row, headers, config)
    assert caught.value.field == field
    assert fragment in str(caught.value)


def test_image_size_caps(house_png):
    small = serving.ServingConfig.from_mapping({**TINY, "max_image_bytes": 100, "max_image_pixels": 10**6})
    with pytest.raises(ParamError, match="at most 100"):
        serving.parse_request(form({"prompt": "a"}, house_png), FORM, small)
    with pytest.raises(ParamError, match="at most 100"):  # refused before base64 decoding
        serving.parse_request({"body": {"prompt": "a", "image": "A" * 1000}}, JSON, small)
    few_pixels = serving.ServingConfig.from_mapping({**TINY, "max_image_pixels": 1000})
    with pytest.raises(ParamError, match="pixels"):
        serving.parse_request(form({"prompt": "a"}, house_png), FORM, few_pixels)


def test_edges_mode_needs_no_prompt(config, house_png):
    request = serving.parse_request(form({"mode": "edges", "low_threshold": 50}, house_png), FORM, config)
    assert request.mode == "edges" and request.params.low_threshold == 50


def test_gray_and_rgba_images(config, house_image):
    gray = png_bytes(house_image[:, :, 0])
    rgba = png_bytes(np.dstack([house_image, np.full(house_image.shape[:2], 128, np.uint8)]))
    for data in (gray, rgba):
        image = serving.parse_request(form({"prompt": "a"}, data), FORM, config).image
        assert image.shape == house_image.shape and image.dtype == np.uint8


# --- batching and encoding ------------------------------------------------------------------------------

def fake_prepared(config, num_samples=1, steps=20, size=64, seed=1) -> Prepared:
    params = serving.parse_params({"prompt": "a", "num_samples": num_samples, "ddim_steps": steps, "seed": seed}, config.limits)
    return Prepared(params, np.zeros((size, size, 3), np.uint8), np.zeros((size, size), np.uint8))


def test_encoded_results_carry_parameters_and_seeds(config):
    prepared = fake_prepared(config, num_samples=2, seed=40)
    images = [np.full((64, 64, 3), value, np.uint8) for value in (10, 20)]
    parameters = serving.effective_parameters(prepared, {"model": "controlnet", "model_version": "1.0"}, 20)
    request = serving.ServingRequest(prepared.params, prepared.image, "zip", False, "generate")

    bundle = serving.encode_result(request, prepared, images, parameters)
    assert bundle.content_type == "application/zip" and bundle.headers["X-Seeds"] == "40,41"
    with zipfile.ZipFile(io.BytesIO(bundle.body)) as archive:
        assert archive.namelist() == ["sample_00.png", "sample_01.png", "edge_map.png", "params.yaml"]
        written = yaml.safe_load(archive.read("params.yaml"))
        assert read_png_parameters(archive.read("sample_01.png"))["seed"] == 41
        assert read_png_parameters(archive.read("edge_map.png"))["seeds"] == [40, 41]
    assert written["seeds"] == [40, 41] and written["ddim_steps_visited"] == 20 and written["model_version"] == "1.0"

    as_json = serving.encode_result(dataclasses.replace(request, output="json"), prepared, images, parameters)
    body = json.loads(as_json.body)
    assert len(body["images"]) == 2 and body["parameters"]["seeds"] == [40, 41]
    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))))
    assert (first == 10).all()

    edges = serving.encode_result(serving.ServingRequest(prepared.params, prepared.image, "png", False, "edges"),
                                  prepared, None, serving.effective_parameters(prepared, {}, None))
    assert edges.content_type == "image/png" and "X-Seeds" not in edges.headers


def test_errors_stream_lines_and_metric_reasons():
    response = serving.param_error_response(ParamError("scale", "must be between 0.1 and 30.0, got 99"))
    assert response.status == 400
    assert json.loads(response.body) == {"error": "scale: must be between 0.1 and 30.0, got 99", "field": "scale"}
    assert json.loads(serving.stream_final_line(response)) == {"event": "error", **json.loads(response.body)}
    assert json.loads(serving.progress_event(3, 20)) == {"event": "progress", "step": 3, "steps": 20}
    assert serving.error_reason("scale") == "scale"
    assert serving.error_reason("whatever-a-client-sends") == "unknown_field"


# --- the handler over a real TorchServe context -------------------------------------------------------

@pytest.fixture(scope="module")
def handler(tiny_checkpoint, tmp_path_factory):
    import torch
    import ts
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    from controlnet_handler import ControlNetHandler

    model_dir = tmp_path_factory.mktemp("model")
    shutil.copy(tiny_checkpoint, model_dir)
    shutil.copy(CONFIG_DIR / "cldm_tiny.yaml", model_dir)
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    context = Context("controlnet", str(model_dir), {"model": {"modelVersion": "1.0"}}, 4, None, "0.12.0",
                      metrics=metrics, model_yaml_config={"maxWorkers": 1, "handler": {**TINY, "threads": 1}})
    threads = torch.get_num_threads()
    instance = ControlNetHandler()
    instance.initialize(context)
    yield instance, context
    torch.set_num_threads(threads)


def run_batch(handler, rows: list[tuple[dict, dict]], on_call=None, arrive_at: list[int] | None = None,
              leave_at: dict[int, int] | None = None):
    """TorchServe's ContinuousBatching as the handler sees it: `handle` is called with every request that has not
    had its last response, until each has. A request the handler leaves out of a call's response is sent again
    whole; one answered with ts_stream_next true is sent again without its parameters. Returns each request's
    status and headers (of its first response, as the client sees them) and its body (a stream's chunks joined).
    `on_call(call, ids)` runs before each call with the TorchServe ids it sends; row i joins at call arrive_at[i];
    a streamed row i in leave_at stops being sent at that call (its client went away: no answer)."""
    from ts.context import RequestProcessor
    from ts.protocol.otf_message_handler import create_predict_response

    instance, context = handler
    arrive_at = arrive_at or [0] * len(rows)
    leave_at = leave_at or {}
    pending: dict[str, int] = {}
    streaming: set[str] = set()
    first: dict[int, tuple] = {}
    chunks: dict[int, list[bytes]] = {i: [] for i in range(len(rows))}
    for call in range(1000):
        pending.update({f"request-{i}": i for i in range(len(rows)) if arrive_at[i] == call})
        for request_id, i in list(pending.items()):
            if leave_at.get(i) == call:
                assert request_id in streaming, "only a stream's client can be seen to go"
                del pending[request_id]
                first.setdefault(i, (None, {}))
        if not pending and call > max(arrive_at):
            break
        order = list(pending.items())
        if on_call is not None:
            on_call(call, [request_id for request_id, _ in order])
        context.request_processor = [RequestProcessor(dict(rows[i][1])) for _, i in order]
        context.request_ids = {k: request_id for k, (request_id, _) in enumerate(order)}
        context.metrics.request_ids = context.request_ids
        bodies = instance.handle([{} if r in streaming else rows[i][0] for r, i in order], context)
        assert len(bodies) == len(order)
        create_predict_response(bodies, context.request_ids, "Prediction success", 200, context)  # sets ts_stream_next
        for k, (request_id, i) in enumerate(order):
            if k not in context.request_ids:
                continue  # no response yet
            headers = context.get_response_headers(k)
            first.setdefault(i, (context.get_response_status(k)[0], dict(headers)))
            chunks[i].append(bodies[k])
            if headers.get("ts_stream_next") == "true":
                streaming.add(request_id)
            else:
                del pending[request_id]
    assert not pending, "requests never answered"
    return [(*first[i], b"".join(chunks[i])) for i in range(len(rows))]


def images_of(body: bytes) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))).astype(int) for png in json.loads(body)["images"]]


def test_handler_batch_isolates_a_bad_request_and_matches_single_requests(handler, house_png):
    good_a = form({"prompt": "a house", "seed": 11, "ddim_steps": 4, "output": "json"}, house_png)
    good_b = form({"prompt": "a barn", "seed": 22, "strength": 0.6, "num_samples": 2, "ddim_steps": 4, "output": "json"}, house_png)
    bad = form({"prompt": "x", "scale": 99}, house_png)
    batched = run_batch(handler, [(good_a, FORM), (bad, FORM), (good_b, FORM)])
    assert [status for status, _, _ in batched] == [200, 400, 200]
    assert json.loads(batched[1][2])["field"] == "scale"
    assert batched[2][1]["X-Seeds"] == "22,23"
    for row, (_, _, body) in ((good_a, batched[0]), (good_b, batched[2])):
        [(status, _, alone)] = run_batch(handler, [(row, FORM)])
        assert status == 200
        for together, single in zip(images_of(body), images_of(alone)):
            assert np.abs(together - single).max() <= 1  # per-sample seeds: batching does not change a result


# --- the controls of issue 11 ---------------------------------------------------------------------------

def test_control_and_init_images_multipart_and_json(config, house_png, house_image):
    edges = np.zeros(house_image.shape[:2], np.uint8)
    edges[10:20] = 255
    control_png, init_png = png_bytes(edges), png_bytes(house_image[:40])
    fields = {"prompt": "a", "sampler": "unipc", "control_mode": "prompt", "guidance_end": 0.5}
    row = {**form(fields, house_png), "control_image": control_png, "init_image": init_png}
    from_form = serving.parse_request(row, FORM, config)
    body = {**fields, **{name: base64.b64encode(data).decode()
                         for name, data in (("image", house_png), ("control_image", control_png), ("init_image", init_png))}}
    from_json = serving.parse_request({"body": body}, JSON, config)
    for request in (from_form, from_json):
        assert np.array_equal(request.control_image, edges) and request.control_image.ndim == 2
        assert request.init_image.shape == (40, 128, 3)
        assert request.params.sampler == "unipc" and request.params.guidance_end == 0.5
        assert request.digests == {"control_image": hashlib.sha256(control_png).hexdigest(),
                                   "init_image": hashlib.sha256(init_png).hexdigest()}
    only_map = serving.parse_request({**form({"prompt": "a"}, None), "control_image": control_png}, FORM, config)
    assert only_map.image is None and only_map.control_image is not None


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "I;16"])
def test_control_image_must_be_8_bit_grey_or_rgb(config, house_png, mode):
    image = Image.new("RGB", (128, 96), (255, 255, 255)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    with pytest.raises(ParamError) as err:
        serving.parse_request({**form({"prompt": "a"}, house_png), "control_image": buffer.getvalue()}, FORM, config)
    assert err.value.field == "control_image" and "8-bit grey or RGB" in err.value.message


@pytest.mark.parametrize("name", ["control_image", "init_image"])
def test_image_fields_validated_by_name(config, house_png, name):
    for data in (b"not an image", b""):
        with pytest.raises(ParamError) as err:
            serving.parse_request({**form({"prompt": "a"}, house_png), name: data}, FORM, config)
        assert err.value.field == name
    with pytest.raises(ParamError) as err:
        serving.parse_request({"body": {"prompt": "a", "image": base64.b64encode(house_png).decode(), name: "%%"}},
                              JSON, config)
    assert err.value.field == name and "base64" in err.value.message


def test_image_or_control_image_required(config):
    with pytest.raises(ParamError) as err:
        serving.parse_request(form({"prompt": "a"}, None), FORM, config)
    assert err.value.field == "image" and "control_image" in err.value.message


def test_effective_parameters_of_the_controls(config):
    prepared = dataclasses.replace(fake_prepared(config, num_samples=2, seed=40), warnings=("prompt: cut",))
    digests = {"init_image": "ab" * 32}
    parameters = serving.effective_parameters(prepared, {}, 20, digests, [0.25, 0.5])
    assert parameters["warnings"] == ["prompt: cut"] and parameters["control_fidelity"] == [0.25, 0.5]
    assert parameters["init_image"] == "ab" * 32 and parameters["control_image"] is None
    for name in ("sampler", "karras", "guidance_start", "guidance_end", "control_mode", "resize_mode", "width",
                 "height", "denoising_strength", "long_prompt"):
        assert name in parameters, name
    images = [np.zeros((64, 64, 3), np.uint8)] * 2
    request = serving.ServingRequest(prepared.params, prepared.image, "zip", False, "generate")
    with zipfile.ZipFile(io.BytesIO(serving.encode_result(request, prepared, images, parameters).body)) as archive:
        assert yaml.safe_load(archive.read("params.yaml"))["control_fidelity"] == [0.25, 0.5]
        assert read_png_parameters(archive.read("sample_01.png"))["control_fidelity"] == [0.5]  # its own
    edges = serving.effective_parameters(prepared, {}, None)
    assert edges["control_fidelity"] is None and edges["warnings"] == ["prompt: cut"]


def test_handler_serves_the_controls(handler, house_png, house_image):
    edges = np.zeros((96, 128, 3), np.uint8)
    edges[40:50, :, 0] = 255
    fields = {"prompt": "a house", "seed": 5, "ddim_steps": 4, "output": "json", "sampler": "euler_a",
              "guidance_start": 0.25, "control_mode": "control", "denoising_strength": 0.5, "resize_mode": "just_resize"}
    row = {**form(fields, None), "control_image": png_bytes(edges), "init_image": png_bytes(house_image[:50])}
    [(status, headers, body)] = run_batch(handler, [(row, FORM)])
    assert status == 200, body
    parameters = json.loads(body)["parameters"]
    assert parameters["ddim_steps_visited"] == 2 and parameters["sampler"] == "euler_a"
    assert len(parameters["control_fidelity"]) == 1 and parameters["control_image"] is not None
    edge_map = np.asarray(Image.open(io.BytesIO(base64.b64decode(json.loads(body)["edge_map"]))))
    assert edge_map.shape == (64, 64, 3) and edge_map[..., 1:].max() == 0  # the map sent, resized, not re-cannied
    bad = {**form({**fields, "denoising_strength": 0.01}, None), "control_image": png_bytes(edges),
           "init_image": png_bytes(house_image)}
    [(status, _, body)] = run_batch(handler, [(bad, FORM)])
    assert status == 400 and json.loads(body)["field"] == "denoising_strength"


# --- step-level scheduling (issue 12), TorchServe's continuous batching emulated by run_batch ---------------------

def test_handler_steps_held_requests_one_call_at_a_time(handler, house_png):
    fields = {"prompt": "a house", "seed": 3, "ddim_steps": 4, "output": "json"}
    calls = []
    [(status, headers, body)] = run_batch(handler, [(form(fields, house_png), FORM)],
                                          on_call=lambda call, ids: calls.append(ids))
    assert status == 200 and "ts_stream_next" not in headers
    assert len(calls) == 4  # one step per call; answered at the fourth
    assert json.loads(body)["parameters"]["ddim_steps_visited"] == 4


def test_handler_request_joining_mid_flight_equals_alone(handler, house_png):
    long = form({"prompt": "a house", "seed": 3, "ddim_steps": 8, "output": "json"}, house_png)
    late = form({"prompt": "a barn", "seed": 9, "ddim_steps": 4, "num_samples": 2, "eta": 0.5, "output": "json",
                 "stream": "true"}, house_png)
    together = run_batch(handler, [(long, FORM), (late, FORM)], arrive_at=[0, 3])
    assert [status for status, _, _ in together] == [200, 200]
    streamed = together[1][2].splitlines()
    assert [json.loads(line)["step"] for line in streamed[:-1]] == [1, 2, 3, 4]
    result = json.loads(streamed[-1])
    [(_, _, alone)] = run_batch(handler, [(late, FORM)])
    alone_result = json.loads(alone.splitlines()[-1])
    for a, b in zip(result["images"], alone_result["images"], strict=True):
        assert np.abs(images_of(json.dumps({"images": [a]}).encode())[0] -
                      images_of(json.dumps({"images": [b]}).encode())[0]).max() <= 1


def test_handler_answers_edges_and_refusals_in_the_call_they_arrive(handler, house_png):
    long = form({"prompt": "a house", "seed": 3, "ddim_steps": 10, "output": "json"}, house_png)
    edges = form({"mode": "edges", "output": "png"}, house_png)
    bad = form({"prompt": "x", "scale": 99}, house_png)
    calls = []
    results = run_batch(handler, [(long, FORM), (edges, FORM), (bad, FORM)], arrive_at=[0, 2, 2],
                        on_call=lambda call, ids: calls.append(len(ids)))
    assert [status for status, _, _ in results] == [200, 200, 400]
    assert calls[:4] == [1, 1, 3, 1]  # both answered in the call they came in: only the long one is sent again


def test_handler_drops_a_stream_whose_client_went(handler, house_png):
    instance, _ = handler
    stream = form({"prompt": "a house", "seed": 3, "ddim_steps": 10, "stream": "true"}, house_png)
    other = form({"prompt": "a house", "seed": 4, "ddim_steps": 3, "output": "json"}, house_png)
    results = run_batch(handler, [(stream, FORM), (other, FORM)], arrive_at=[0, 3], leave_at={0: 3})
    assert results[1][0] == 200
    assert instance.held == {}


def test_handler_cancel_stops_the_request_it_names(handler, house_png):
    target = form({"prompt": "a house", "seed": 3, "ddim_steps": 10, "output": "json", "request_id": "job-7"},
                  house_png)
    cancel = ({"body": {"mode": "cancel", "request_id": "job-7"}}, {"Content-Type": "application/json"})
    calls = []
    results = run_batch(handler, [(target, FORM), cancel], arrive_at=[0, 2], on_call=lambda c, ids: calls.append(ids))
    assert results[1][0] == 202 and json.loads(results[1][2]) == {"request_id": "job-7", "cancel": "accepted"}
    assert results[0][0] == 409 and json.loads(results[0][2])["field"] == "request_id"
    assert len(calls) == 3  # stopped in the call the cancel came in, before its step


def test_handler_runs_to_the_end_in_one_call_when_not_alone(handler, house_png, monkeypatch):
    """TorchServe 0.12 stalls a worker's next step while another worker idles: with two, one call does it all."""
    instance, _ = handler
    monkeypatch.setattr(instance, "workers", instance.workers)  # restored after: the later tests run alone
    monkeypatch.setattr(serving, "live_workers", lambda fallback: 2)
    monkeypatch.setattr(instance, "threads_checked", 0.0)
    stream = form({"prompt": "a house", "seed": 3, "ddim_steps": 4, "stream": "true"}, house_png)
    calls = []
    [(status, headers, body)] = run_batch(handler, [(stream, FORM)], on_call=lambda c, ids: calls.append(ids))
    monkeypatch.setattr(instance, "threads_checked", 0.0)
    assert status == 200 and len(calls) == 1 and "ts_stream_next" not in headers
    events = [json.loads(line) for line in body.splitlines()]
    assert [e.get("step") for e in events] == [1, 2, 3, 4, None] and events[-1]["event"] == "result"


def test_the_backend_is_told_when_no_request_is_in_flight(handler, house_png, monkeypatch):
    """Once a call leaves nothing held, and not between the steps of a held request (the CPU backend then hands
    its retained heap back: the next step would fault it in again)."""
    instance, _ = handler
    held_when_idle = []
    monkeypatch.setattr(instance.pipeline.backend, "idle", lambda: held_when_idle.append(len(instance.held)))
    stream = form({"prompt": "a house", "seed": 3, "ddim_steps": 3, "stream": "true"}, house_png)
    calls = []
    [(status, _, _)] = run_batch(handler, [(stream, FORM)], on_call=lambda c, ids: calls.append(ids))
    assert status == 200 and len(calls) >= 3 and held_when_idle == [0]


@pytest.mark.parametrize("value", ["", "a" * 65, "has space", "../x", 5])
def test_request_id_is_checked(config, house_png, value):
    with pytest.raises(ParamError) as err:
        serving.parse_request({"body": {"prompt": "x", "image": base64.b64encode(house_png).decode(), "request_id": value}},
                              {"Content-Type": "application/json"}, config)
    assert err.value.field == "request_id"


def test_cancel_takes_request_id_alone(config):
    with pytest.raises(ParamError) as err:
        serving.parse_request({"body": {"mode": "cancel"}}, {"Content-Type": "application/json"}, config)
    assert err.value.field == "request_id"
    with pytest.raises(ParamError) as err:
        serving.parse_request({"body": {"mode": "cancel", "request_id": "a", "prompt": "x"}},
                              {"Content-Type": "application/json"}, config)
    assert err.value.field == "prompt"
    assert serving.parse_request({"body": {"mode": "cancel", "request_id": "a"}}, {"Content-Type": "application/json"},
                                 config) == serving.CancelRequest("a")


def test_cancel_board(tmp_path, monkeypatch):
    board = serving.CancelBoard(tmp_path / "cancels", ttl=60, capacity=3)
    assert not board.take("a")
    board.post("../../etc/passwd")
    assert [p.name for p in (tmp_path / "cancels").iterdir()] != ["passwd"]  # named by digest, never by the text
    other = serving.CancelBoard(tmp_path / "cancels")  # another worker of the same instance
    assert other.take("../../etc/passwd") and not other.take("../../etc/passwd")
    board.post("b")
    board.post("c")
    board.post("d")
    with pytest.raises(serving.TooManyCancels):
        board.post("e")
    later = time.time() + 61
    monkeypatch.setattr(serving.time, "time", lambda: later)
    board.sweep(force=True)
    assert not (tmp_path / "cancels").exists()  # expired, and the directory with them
    board.post("e")
    assert board.take("e")


def test_live_workers_counts_the_frontends_worker_children(tmp_path, monkeypatch):
    parent = os.getppid()
    for pid, ppid, command in ((11, parent, b"python ts/model_service_worker.py --sock-name x"),
                               (12, parent, b"python ts/model_service_worker.py --sock-name y"),
                               (13, parent, b"java -cp serve"), (14, 1, b"python ts/model_service_worker.py")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (python (x)) S {ppid} 0 0")
        (tmp_path / str(pid) / "cmdline").write_bytes(command.replace(b" ", b"\0"))
    (tmp_path / "self").mkdir()
    assert serving.live_workers(5, tmp_path) == 2
    assert serving.live_workers(5, tmp_path / "missing") == 5
