"""Form fields sent more than once (`-F loras=a:1 -F loras=b:0.5`): TorchServe 0.12's frontend forwards each part
as a parameter of its own, its Python worker merges them by name (the last wins) unless the handler's wrapper of
`Service.retrieve_data_for_inference` is installed; the parser takes a list for `loras` alone."""
from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "handler"))  # the handler's modules, as TorchServe loads them

import serving  # noqa: E402
from controlnet_canny.params import ParamError  # noqa: E402

FORM = {"Content-Type": "multipart/form-data; boundary=x"}
URLENCODED = {"Content-Type": "application/x-www-form-urlencoded"}
TINY = {"checkpoints": ["control_tiny_canny.pth"], "model_config": "cldm_tiny.yaml",
        "limits": {"image_resolution": [64, 768]}, "defaults": {"image_resolution": 64}}


@pytest.fixture(scope="module")
def config() -> serving.ServingConfig:
    return serving.ServingConfig.from_mapping(TINY)


@pytest.fixture(scope="module")
def house_png(house_image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(house_image).save(buffer, "PNG")
    return buffer.getvalue()


def frontend_request(request_id: str, parts: list[tuple[str, bytes, str]], headers: dict[str, str]) -> dict:
    """One request of a predict batch as TorchServe 0.12's worker decodes it from its frontend (ts/protocol/
    otf_message_handler.py): a form's parts in the order sent, text parts with an empty content type."""
    return {"requestId": request_id.encode(),
            "parameters": [{"name": name, "contentType": content_type, "value": bytearray(value)}
                           for name, value, content_type in parts],
            "headers": [{"name": name.encode(), "value": value.encode()} for name, value in headers.items()]}


REPEATED = frontend_request("r1", [("loras", b"a:1", ""), ("prompt", b"x", ""), ("loras", b"b:0.5", ""),
                                   ("image", b"PNG", "image/png"), ("loras", b"c:2", "")],
                            {"Content-Type": "multipart/form-data; boundary=q", "Accept": "image/png"})
SINGLE = frontend_request("r2", [("prompt", b"y", ""), ("image", b"JPG", "image/jpeg")],
                          {"Content-Type": "multipart/form-data; boundary=z"})


# --- the wrapper of TorchServe's merge -------------------------------------------------------------------

def test_torchserve_alone_keeps_the_last_of_a_repeated_field():
    from ts.service import Service

    _, rows, _ = Service.retrieve_data_for_inference([REPEATED])
    assert rows[0]["loras"] == b"c:2"


def test_wrapper_lists_a_repeated_field_in_order_and_leaves_the_rest_as_torchserve_makes_it():
    from ts.service import Service

    original = Service.retrieve_data_for_inference
    wrapped = serving.keeping_repeated_fields(original)
    headers, rows, request_ids = wrapped([REPEATED, SINGLE])
    plain_headers, plain_rows, plain_ids = original([REPEATED, SINGLE])
    assert rows[0]["loras"] == [b"a:1", b"b:0.5", b"c:2"]
    assert {k: v for k, v in rows[0].items() if k != "loras"} == {k: v for k, v in plain_rows[0].items() if k != "loras"}
    assert rows[1] == plain_rows[1] == {"prompt": b"y", "image": b"JPG"}
    assert request_ids == plain_ids == {0: "r1", 1: "r2"}
    for ours, theirs in zip(headers, plain_headers):  # the part and request headers, content types included
        assert ours.get_request_properties() == theirs.get_request_properties()
    assert headers[0].get_request_property("image") == {"content-type": "image/png"}
    assert headers[0].get_request_property("Accept") == "image/png"
    with pytest.raises(ValueError):  # TorchServe's own refusals stay
        wrapped(None)


def test_handler_installs_the_wrapper_once_and_torchserves_predict_uses_it(monkeypatch):
    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.service import Service

    import controlnet_handler

    monkeypatch.setattr(Service, "retrieve_data_for_inference", Service.__dict__["retrieve_data_for_inference"])
    controlnet_handler.keep_repeated_fields()
    installed = Service.retrieve_data_for_inference
    controlnet_handler.keep_repeated_fields()
    assert Service.retrieve_data_for_inference is installed
    _, rows, _ = Service.retrieve_data_for_inference([REPEATED])
    assert rows[0]["loras"] == [b"a:1", b"b:0.5", b"c:2"]  # wrapped once: a second wrap would nest the lists

    seen = []
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    service = Service("probe", "/nonexistent", None, lambda data, context: seen.extend(data) or ["ok"] * len(data),
                      None, 2, metrics_cache=metrics)
    service.set_cl_socket(None)
    service.predict([REPEATED, SINGLE])  # the worker's own call path: Service.predict -> the entry point
    assert seen[0]["loras"] == [b"a:1", b"b:0.5", b"c:2"] and seen[1]["prompt"] == b"y"


# --- the parser -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [FORM, URLENCODED])
def test_repeated_loras_parts_give_every_lora_in_order(config, house_png, headers):
    row = {"prompt": bytearray(b"a house <lora:d:0.25>"), "loras": [bytearray(b"a:1"), bytearray(b"b:0.5,c:2")],
           "image": bytearray(house_png)}
    request = serving.parse_request(row, headers, config)
    assert request.params.loras == (("a", 1.0), ("b", 0.5), ("c", 2.0), ("d", 0.25))


def test_one_loras_part_and_a_json_list_still_parse(config, house_png):
    one = serving.parse_request({"prompt": b"a", "loras": b"a:1,b:0.5", "image": house_png}, FORM, config)
    listed = serving.parse_request({"body": {"prompt": "a", "loras": ["a:1", "b:0.5"],
                                             "image": base64.b64encode(house_png).decode()}},
                                   {"Content-Type": "application/json"}, config)
    assert one.params.loras == listed.params.loras == (("a", 1.0), ("b", 0.5))


@pytest.mark.parametrize("name, values", [
    ("prompt", [b"a house", b"a barn"]),
    ("seed", [b"1", b"1"]),  # equal values too: the client meant one of them
    ("mode", [b"edges", b"generate"]),
    ("output", [b"zip", b"png"]),
    ("request_id", [b"one", b"two"]),
    ("image", None),
    ("control_image", None),
    ("init_image", None),
])
@pytest.mark.parametrize("headers", [FORM, URLENCODED])
def test_a_repeated_single_valued_field_is_refused_by_name(config, house_png, name, values, headers):
    row = {"prompt": b"a", "image": house_png, name: values or [house_png, house_png]}
    with pytest.raises(ParamError) as caught:
        serving.parse_request(row, headers, config)
    assert caught.value.field == name
    assert "given more than once" in str(caught.value) and "loras" in str(caught.value)
    response = serving.param_error_response(caught.value)
    assert response.status == 400 and json.loads(response.body)["field"] == name


def test_a_repeated_unknown_field_is_refused_as_unknown(config, house_png):
    with pytest.raises(ParamError, match="unknown field") as caught:
        serving.parse_request({"prompt": b"a", "image": house_png, "colour": [b"red", b"blue"]}, FORM, config)
    assert caught.value.field == "colour"


def test_a_json_list_is_a_value_not_a_repetition(config, house_png):
    body = {"prompt": ["a", "b"], "image": base64.b64encode(house_png).decode()}
    with pytest.raises(ParamError) as caught:
        serving.parse_request({"body": body}, {"Content-Type": "application/json"}, config)
    assert caught.value.field == "prompt" and "more than once" not in str(caught.value)


def multipart(parts: list[tuple[str, str | tuple]]) -> tuple[bytes, str]:
    prepared = requests.Request("POST", "http://localhost/", data=[p for p in parts if isinstance(p[1], str)],
                                files=[p for p in parts if not isinstance(p[1], str)]).prepare()
    return prepared.body, prepared.headers["Content-Type"]


def test_a_multipart_body_the_handler_decodes_itself_keeps_repeated_parts(config, house_png):
    """TorchServe decodes only a lower-case multipart/form-data; other spellings reach the parser whole."""
    body, content_type = multipart([("prompt", "a"), ("loras", "a:1"), ("loras", "b:0.5"),
                                    ("image", ("house.png", house_png))])
    headers = {"Content-Type": content_type.replace("multipart/form-data", "Multipart/Form-Data")}
    request = serving.parse_request({"body": bytearray(body)}, headers, config)
    assert request.params.loras == (("a", 1.0), ("b", 0.5))
    assert np.array_equal(request.image, serving.parse_request(
        {"prompt": b"a", "image": house_png}, FORM, config).image)

    body, content_type = multipart([("prompt", "a"), ("prompt", "b"), ("image", ("house.png", house_png))])
    with pytest.raises(ParamError, match="given more than once") as caught:
        serving.parse_request({"body": body}, {"Content-Type": content_type.replace("multipart/form-data", "MULTIPART/FORM-DATA")}, config)
    assert caught.value.field == "prompt"


# --- a live TorchServe ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_server(tiny_checkpoint, tmp_path_factory):
    """The tiny model on a throwaway TorchServe whose adapter store holds the LoRAs `first` and `second`."""
    from live_server import TINY_CONFIG, require_java, tiny_server
    from make_tiny_adapters import write_lora

    from controlnet_canny.config import load_config

    if require_java():
        pytest.skip(require_java())
    store = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(("first", "second")):
        write_lora(store / "loras" / f"{name}.safetensors", load_config(TINY_CONFIG), "kohya", seed=seed)
    with tiny_server(tiny_checkpoint, sets=[f"handler.adapters={store}"]) as server:
        yield server


def post_form(server, fields: list[tuple[str, str]], image: bool = True) -> requests.Response:
    """`fields` as text parts in this order (repeated names included), the house as the image part; without the
    image, an application/x-www-form-urlencoded body."""
    from live_server import HOUSE, STEPS

    files = {"image": ("house.png", HOUSE)} if image else None
    data = [("ddim_steps", str(STEPS)), ("output", "json"), *fields] if image else fields
    return requests.post(server.url, data=data, files=files, headers=server.auth(), timeout=120)


@pytest.mark.server
def test_live_repeated_loras_parts_all_reach_the_pipeline_in_order(lora_server):
    response = post_form(lora_server, [("prompt", "a house"), ("loras", "first:1"), ("loras", "second:0.5")])
    assert response.status_code == 200, response.text
    parameters = response.json()["parameters"]
    assert parameters["loras"] == ["first:1", "second:0.5"]
    assert [(lora["name"], lora["weight"]) for lora in parameters["adapters"]["loras"]] == [("first", 1.0), ("second", 0.5)]


@pytest.mark.server
def test_live_unknown_lora_in_the_first_part_fails_the_request(lora_server):
    """The last part alone names a LoRA of the store: only the whole list gets the first part refused."""
    response = post_form(lora_server, [("prompt", "a house"), ("loras", "missing:1"), ("loras", "second:0.5")])
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["field"] == "loras" and "'missing'" in answer["error"], answer


@pytest.mark.server
def test_live_repeated_single_valued_fields_are_refused(lora_server):
    response = post_form(lora_server, [("prompt", "a house"), ("prompt", "a barn")])
    assert response.status_code == 400 and response.json()["field"] == "prompt", response.text
    assert "given more than once" in response.json()["error"]
    # application/x-www-form-urlencoded: TorchServe forwards its repeated fields the same way
    assert post_form(lora_server, [("mode", "adapters")], image=False).status_code == 200
    response = post_form(lora_server, [("mode", "adapters"), ("mode", "adapters")], image=False)
    assert response.status_code == 400 and response.json()["field"] == "mode", response.text
