"""Hostile and malformed input: a corpus of bad requests against the live server, and property-based fuzzing
(hypothesis) of the request parser and the image decoder.

What must hold: no 5xx for any client mistake, every refusal a 400 (413 for an oversized body, 406 for an Accept
that no format meets) whose JSON names the field at fault, and the worker survives all of it (same process before
and after, no handler exception in the model log). The exception, out of the handler's reach: multipart bodies that
TorchServe's frontend cannot decode (test_malformed_multipart_is_refused_by_the_frontend).
"""
from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import math
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
import requests
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import hostile
import serving
from controlnet_canny.bundle import params_yaml
from controlnet_canny.params import Limits, ParamError, check_cost
from controlnet_canny.preprocess import MAX_JPEG_SCANS, decode_image
from live_server import HOUSE, png_header_only

HANDLER_FAILURES = ("could not be prepared", "generation failed", "could not be encoded")


# --- the corpus --------------------------------------------------------------------------------------------------

def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, "PNG")
    return out.getvalue()


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(HOUSE)).convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is patched to declare another size."""
    data = bytearray(_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _png_with_ztxt_bomb(megabytes: int = 64) -> bytes:
    """A valid PNG carrying a compressed text chunk that inflates to `megabytes` MB (about 64 kB on the wire)."""
    compressor = zlib.compressobj(9)
    text = b"".join(compressor.compress(b"\0" * 2**20) for _ in range(megabytes)) + compressor.flush()
    png = _png(8, 8)
    data = b"Comment\0\0" + text
    chunk = struct.pack(">I", len(data)) + b"zTXt" + data + struct.pack(">I", zlib.crc32(b"zTXt" + data))
    return png[:33] + chunk + png[33:]  # after the signature and IHDR


def _gif() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, "GIF")
    return out.getvalue()


def _png_of_exactly(size: int) -> bytes:
    """A valid PNG padded to exactly `size` bytes (decoders stop at IEND)."""
    return HOUSE + b"\0" * (size - len(HOUSE))


B64 = base64.b64encode(HOUSE).decode()
JPEG = _jpeg()
IMAGE_CAP = 1_000_000  # the test server's handler.max_image_bytes (conftest)


def form(fields: dict | None = None, image: bytes | None = HOUSE):
    """A multipart request (requests' keyword arguments); text values as given (bytes stay bytes)."""
    parts = [("image", ("photo.bin", image))] if image is not None else []
    merged = {"prompt": "a house", "ddim_steps": "2", **(fields or {})}
    parts += [(name, (None, value)) for name, value in merged.items() if value is not None]
    return {"files": parts}


def as_json(body=None, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body, allow_nan=True).encode()
    return {"data": data, "headers": {"Content-Type": "application/json"}}


def jbody(**fields):
    return as_json({"prompt": "a house", "ddim_steps": 2, "image": B64, **fields})


# (id, request keyword arguments (or a function making them: large bodies), expected status, field named in the 400 body)
CORPUS = [
    # images
    ("non-image bytes", form(image=b"this is not an image at all"), 400, "image"),
    ("random bytes", form(image=bytes(range(256)) * 8), 400, "image"),
    ("empty image", form(image=b""), 400, "image"),
    ("truncated PNG", form(image=HOUSE[: len(HOUSE) // 2]), 400, "image"),
    ("PNG signature only", form(image=HOUSE[:8]), 400, "image"),
    ("truncated JPEG", form(image=JPEG[: len(JPEG) * 2 // 3]), 400, "image"),
    ("GIF", form(image=_gif()), 400, "image"),
    ("PNG bomb 30000x30000", form(image=png_header_only(30000, 30000)), 400, "image"),
    ("JPEG declaring 65000x65000", form(image=_jpeg_declaring(65000, 65000)), 400, "image"),
    ("PNG zTXt bomb 64 MB", lambda: form(image=_png_with_ztxt_bomb()), 400, "image"),
    ("image over the byte cap", lambda: form(image=b"\x89PNG" + b"\0" * 1_100_000), 400, "image"),
    ("aspect 1:1000", form(image=_png(1, 1000)), 400, "image"),
    ("JPEG of 40 extra scans", form(image=hostile.progressive_jpeg_repeating_scans(512, 40)), 400, "image"),
    ("palette PNG, tRNS of 257 entries", form(image=hostile.palette_png_with_long_trns(4, 257)), 400, "image"),
    ("palette PNG, tRNS of 1000 entries, JSON", jbody(image=base64.b64encode(hostile.palette_png_with_long_trns(
        4, 1000)).decode()), 400, "image"),
    ("4:1 input at resolution 768: output over the area cap", form({"image_resolution": "768"},
                                                                     image=hostile.elongated_png(200, 50)), 400,
     "image_resolution"),
    ("image of exactly the byte cap", lambda: form({"mode": "edges"}, image=_png_of_exactly(IMAGE_CAP)), 200, None),
    ("JSON image of exactly the byte cap", lambda: jbody(mode="edges", image=base64.b64encode(
        _png_of_exactly(IMAGE_CAP)).decode()), 200, None),
    ("image one byte over the cap", lambda: form(image=_png_of_exactly(IMAGE_CAP + 1)), 400, "image"),
    ("JSON image one byte over the cap", lambda: jbody(image=base64.b64encode(_png_of_exactly(IMAGE_CAP + 1))
                                                        .decode()), 400, "image"),
    ("1x1 image", form(image=_png(1, 1)), 200, None),
    ("1x1 gray+alpha image", form(image=_png(1, 1, "LA")), 200, None),
    ("image missing", form(image=None), 400, "image"),
    ("image as a text part", {"files": [("image", ("a.txt", "hello", "text/plain")), ("prompt", (None, "x"))]},
     400, "image"),
    ("JSON image not base64", jbody(image="***not base64***"), 400, "image"),
    ("JSON image as number", jbody(image=5), 400, "image"),
    ("JSON image as list", jbody(image=[B64]), 400, "image"),
    ("JSON image over the cap", lambda: jbody(image="A" * 2_000_000), 400, "image"),
    # bodies and encodings
    ("no Content-Type", {"data": HOUSE}, 400, "Content-Type"),
    ("octet-stream", {"data": HOUSE, "headers": {"Content-Type": "application/octet-stream"}}, 400, "Content-Type"),
    ("multipart without boundary", {"data": b"garbage", "headers": {"Content-Type": "multipart/form-data"}}, 400, "body"),
    ("multipart cut short", {"data": b'--XYZ\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nabc',
                             "headers": {"Content-Type": "multipart/form-data; boundary=XYZ"}}, 400, "image"),
    ("JSON syntax error", as_json(raw=b'{"prompt":'), 400, "body"),
    ("JSON media type in capitals", {**jbody(mode="edges"), "headers": {"Content-Type": "Application/JSON; Charset=UTF-8"}},
     200, None),
    ("JSON media type in capitals, syntax error", {"data": b"{", "headers": {"Content-Type": "APPLICATION/json"}}, 400,
     "body"),
    # TorchServe's frontend decodes only a lower-case multipart/form-data: the handler decodes other spellings
    ("multipart media type in capitals", {**form({"mode": "edges"}), "headers": {"Content-Type": None}}, 200, None),
    ("multipart in capitals, a part without a name", {"data": b'--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n',
                                                      "headers": {"Content-Type": "MULTIPART/form-data; boundary=b"}},
     400, "body"),
    ("multipart in capitals, no parts", {"data": b"--b--\r\n", "headers": {"Content-Type": "Multipart/Form-Data; boundary=b"}},
     400, "body"),
    ("Accept: text/html only", {**form(), "headers": {"Accept": "text/html"}}, 406, "Accept"),
    ("Accept: everything at q=0", {**form(), "headers": {"Accept": "*/*;q=0"}}, 406, "Accept"),
    ("JSON array body", as_json([1, 2]), 400, "body"),
    ("JSON null body", as_json(None), 400, "body"),
    ("JSON string body", as_json("a house"), 400, "body"),
    ("JSON nested 100000 deep", lambda: as_json(raw=b"[" * 100_000 + b"]" * 100_000), 400, "body"),
    ("JSON invalid UTF-8", as_json(raw=b'{"prompt": "\xff\xfe", "image": "' + B64.encode() + b'"}'), 400, "body"),
    ("form invalid UTF-8 prompt", form({"prompt": b"\xff\xfe\xfd"}), 400, "prompt"),
    ("JSON lone surrogate prompt", jbody(prompt="a \ud800 house"), 400, "prompt"),
    ("JSON lone surrogate n_prompt, edges", jbody(n_prompt="\udfff", mode="edges"), 400, "n_prompt"),
    # types
    ("JSON prompt as number", jbody(prompt=5), 400, "prompt"),
    ("JSON prompt as list", jbody(prompt=["a"]), 400, "prompt"),
    ("JSON steps as text", jbody(ddim_steps="many"), 400, "ddim_steps"),
    ("JSON steps as list", jbody(ddim_steps=[2]), 400, "ddim_steps"),
    ("JSON steps as bool", jbody(ddim_steps=True), 400, "ddim_steps"),
    ("JSON steps as 2.5", jbody(ddim_steps=2.5), 400, "ddim_steps"),
    ("JSON seed as object", jbody(seed={"a": 1}), 400, "seed"),
    ("JSON guess_mode as text", jbody(guess_mode="perhaps"), 400, "guess_mode"),
    ("JSON output as list", jbody(output=["zip"]), 400, "output"),
    ("JSON mode as object", jbody(mode={"a": 1}), 400, "mode"),
    ("JSON stream as 2", jbody(stream=2), 400, "stream"),
    ("form steps 1e3", form({"ddim_steps": "1e3"}), 400, "ddim_steps"),
    # NaN, infinities, huge numbers
    ("JSON NaN strength", jbody(strength=math.nan), 400, "strength"),
    ("JSON Infinity scale", jbody(scale=math.inf), 400, "scale"),
    ("JSON -Infinity eta", jbody(eta=-math.inf), 400, "eta"),
    ("form nan strength", form({"strength": "nan"}), 400, "strength"),
    ("form inf scale", form({"scale": "inf"}), 400, "scale"),
    ("form 1e999 eta", form({"eta": "1e999"}), 400, "eta"),
    ("JSON seed 2**80", jbody(seed=2**80), 400, "seed"),
    ("JSON steps 1e308", jbody(ddim_steps=1e308), 400, "ddim_steps"),
    # ranges
    ("num_samples 0", form({"num_samples": "0"}), 400, "num_samples"),
    ("num_samples 13", form({"num_samples": "13"}), 400, "num_samples"),
    ("resolution 832", form({"image_resolution": "832"}), 400, "image_resolution"),
    ("resolution 100", form({"image_resolution": "100"}), 400, "image_resolution"),
    ("steps 0", form({"ddim_steps": "0"}), 400, "ddim_steps"),
    ("steps 101", form({"ddim_steps": "101"}), 400, "ddim_steps"),
    ("scale 0", form({"scale": "0"}), 400, "scale"),
    ("strength -1", form({"strength": "-1"}), 400, "strength"),
    ("eta 2", form({"eta": "2"}), 400, "eta"),
    ("seed -2", form({"seed": "-2"}), 400, "seed"),
    ("low_threshold 0", form({"low_threshold": "0"}), 400, "low_threshold"),
    ("high_threshold 256", form({"high_threshold": "256"}), 400, "high_threshold"),
    ("png with 2 samples", form({"num_samples": "2", "output": "png"}), 400, "output"),
    ("stream with zip", form({"stream": "true", "output": "zip"}), 400, "stream"),
    ("mode sideways", form({"mode": "sideways"}), 400, "mode"),
    # prompts and fields
    ("missing prompt", form({"prompt": None}), 400, "prompt"),
    ("100 kB prompt", form({"prompt": "x" * 100_000}), 400, "prompt"),
    ("100 kB a_prompt", form({"a_prompt": "y" * 100_000}), 400, "a_prompt"),
    ("NUL in prompt", form({"prompt": "a\x00house"}), 200, None),
    ("unknown field", form({"colour": "red"}), 400, "colour"),
    ("unknown field of 200 kB, its name cut", lambda: form({"n" * 200_000: "v"}), 400, "n" * 40 + "..."),
    ("JSON unknown field of 200 kB, its name cut", lambda: jbody(**{"é" * 200_000: 1}), 400, "é" * 40 + "..."),
    ("Content-Type of 6 kB, cut", {"data": b"x", "headers": {"Content-Type": "text/" + "x" * 6000}}, 400,
     "Content-Type"),
    ("5000 unknown fields", {"files": [("image", ("a", HOUSE))] + [(f"f{i}", (None, "v")) for i in range(5000)]}, 400, "f0"),
    # oversized bodies: refused before the handler, by the edge (nginx: client_max_body_size is max_request_size, 32 MiB)
    ("multipart body over 32 MiB", lambda: form(image=b"\0" * 34_000_000), 413, "body"),
    ("JSON body over 32 MiB", lambda: as_json({"prompt": "a", "image": "A" * 40_000_000}), 413, "body"),
]


@pytest.fixture(scope="module")
def survivor(server):
    """The worker serving the corpus, and the model log's count of handler failures before it."""
    pids = server.ready_worker_pids()
    assert len(pids) == 1
    return pids[0], sum(server.model_log().count(f) for f in HANDLER_FAILURES)


@pytest.mark.parametrize("kwargs, status, field", [pytest.param(*case[1:], id=case[0]) for case in CORPUS])
def test_malformed_request_gets_a_clear_4xx(server, survivor, kwargs, status, field):
    kwargs = kwargs() if callable(kwargs) else kwargs
    headers = {**server.auth(), **kwargs.get("headers", {})}
    if headers.get("Content-Type", "") is None:  # requests' multipart body under a capitalised media type
        body, content_type = requests.models.RequestEncodingMixin._encode_files(kwargs["files"], {})
        kwargs = {"data": body}
        headers["Content-Type"] = content_type.replace("multipart/form-data", "Multipart/Form-Data")
    response = requests.post(server.url, timeout=60, **{**kwargs, "headers": headers})
    assert response.status_code == status, response.text[:300]
    if status in (400, 406, 413):
        assert response.headers["Content-Type"] == "application/json"
        assert len(response.content) < 2000, "a client's text echoed whole"
        error = response.json()
        assert error["field"] == field and error["error"].startswith(f"{field}: "), error
    if status == 200:
        with zipfile.ZipFile(io.BytesIO(response.content)) as bundle:
            assert bundle.namelist()[-2:] == ["edge_map.png", "params.yaml"]  # a sample first unless mode=edges


def test_duplicated_fields_are_refused_naming_the_field(server):
    """A repeated form part reaches the handler whole (it undoes TorchServe's merge, tests/test_repeated_fields.py):
    a field that takes one value, given twice, is a 400 naming it rather than a silent choice. JSON cannot repeat
    a key in a parsed object: its parser keeps the last."""
    for parts, field in (
        ([("image", ("a", b"not an image")), ("image", ("b", HOUSE)), ("prompt", (None, "a house"))], "image"),
        ([("image", ("b", HOUSE)), ("prompt", (None, "first")), ("prompt", (None, "second"))], "prompt"),
    ):
        response = requests.post(server.url, files=parts + [("ddim_steps", (None, "2"))], headers=server.auth(),
                                 timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["field"] == field and "more than once" in response.json()["error"]
    raw = b'{"prompt": "first", "prompt": "second", "ddim_steps": 2, "output": "json", "image": "' + B64.encode() + b'"}'
    response = requests.post(server.url, data=raw, headers={**server.auth(), "Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["parameters"]["prompt"] == "second"


MALFORMED_PARTS = [
    # (id, the part's raw header lines, what TorchServe's frontend (Netty's multipart decoder) reports)
    ("part without a name", b"Content-Disposition: form-data", "NullPointerException"),
    ("part with an empty name", b'Content-Disposition: form-data; name=""', "empty name"),
    ("part without Content-Disposition", b"Content-Type: text/plain", "NullPointerException"),
    ("text part in a charset Java lacks", b'Content-Disposition: form-data; name="prompt"\r\n'
                                          b"Content-Type: text/plain; charset=x-none-such", "UnsupportedCharsetException"),
]


@pytest.mark.parametrize("headers, message", [pytest.param(*case[1:], id=case[0]) for case in MALFORMED_PARTS])
def test_malformed_multipart_is_refused_by_the_frontend(server, survivor, headers, message):
    """Bodies that TorchServe's frontend cannot decode never reach the handler: TorchServe 0.12 answers 500 with
    its own JSON (type ErrorDataDecoderException, the Java exception's text) and no setting changes that. The
    README's error table says so; this test notices if a TorchServe upgrade changes it."""
    body, content_type = hostile.multipart([(headers, b"abc"), (b'Content-Disposition: form-data; name="image"; '
                                                                b'filename="a.png"', HOUSE)])
    response = requests.post(server.url, data=body, headers={**server.auth(), "Content-Type": content_type}, timeout=60)
    assert response.status_code == 500, response.text[:300]
    error = response.json()
    assert error["type"] == "ErrorDataDecoderException" and message in error["message"], error


@pytest.mark.parametrize("headers", [b'Content-Disposition: form-data; name="mode"\r\nContent-Transfer-Encoding: x-rot13',
                                     b'Content-Disposition: form-data; name="mode"\r\n'
                                     b"Content-Type: text/plain; charset=iso-8859-1"], ids=["unknown encoding", "latin-1"])
def test_multipart_part_headers_the_frontend_ignores(server, headers):
    body, content_type = hostile.multipart([(headers, b"edges"), (b'Content-Disposition: form-data; name="image"; '
                                                                  b'filename="a.png"', HOUSE)])
    response = requests.post(server.url, data=body, headers={**server.auth(), "Content-Type": content_type}, timeout=60)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/zip", response.text[:300]


def test_accept_picks_a_format_that_holds_the_result(server):
    """Two samples cannot be one PNG: the client's next acceptable format answers, and no error names a field the
    client never sent."""
    response = server.predict({"num_samples": 2}, headers={"Accept": "image/png, application/zip;q=0.5"})
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/zip", response.text[:300]
    response = server.predict({"num_samples": 2}, headers={"Accept": "image/png"})
    assert response.status_code == 406 and response.json()["field"] == "Accept", response.text[:300]


def test_edges_mode_reports_no_seed(server):
    response = server.predict({"mode": "edges", "output": "json", "seed": -1})
    assert response.status_code == 200 and "X-Seeds" not in response.headers
    parameters = response.json()["parameters"]
    assert parameters["seed"] is None and parameters["seeds"] is None and parameters["ddim_steps_visited"] is None


def test_oversized_headers_are_refused(server):
    response = requests.post(server.url, headers={**server.auth(), "X-Big": "a" * 100_000}, timeout=30, **form())
    # the edge's limit (nginx, scripts/serve.sh), before TorchServe's (Netty's) own, answered in the service's JSON
    assert response.status_code == 431 and response.json()["field"] == "headers"


# The parser fuzzed live, in edges mode (no diffusion: milliseconds per request).
LIVE_FIELDS = st.dictionaries(
    st.sampled_from(["prompt", "num_samples", "image_resolution", "strength", "scale", "seed", "eta", "low_threshold",
                     "high_threshold", "guess_mode", "output", "stream", "ddim_steps", "a_prompt", "n_prompt"]),
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=20), st.lists(st.integers(), max_size=2)),
    max_size=6,
)


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fields=LIVE_FIELDS)
def test_live_fuzz_edges_mode(server, survivor, fields):
    body = {**fields, "mode": "edges", "image": B64}
    response = requests.post(server.url, data=json.dumps(body, allow_nan=True),
                             headers={**server.auth(), "Content-Type": "application/json"}, timeout=60)
    assert response.status_code in (200, 400), response.text[:300]
    if response.status_code == 400:
        error = response.json()
        assert error["field"] in body and error["error"].startswith(f"{error['field']}: "), error


def test_worker_survived_everything(server, survivor):
    pid, failures = survivor
    assert server.ready_worker_pids() == [pid], "the worker was replaced: it crashed"
    assert sum(server.model_log().count(f) for f in HANDLER_FAILURES) == failures, "a handler exception was logged"
    assert server.predict({"seed": 1}).status_code == 200


# --- fuzzing the parser (no server) -----------------------------------------------------------------------------

CONFIG_MAPPING = {
    "checkpoints": ["model.pth"], "model_config": "cldm_tiny.yaml", "max_image_bytes": 100_000,
    "limits": {"image_resolution": [64, 768]}, "defaults": {"image_resolution": 64},
}
CONFIG = serving.ServingConfig.from_mapping(CONFIG_MAPPING)
SMALL_PNG = _png(8, 8)
# Any code point (lone surrogates included: JSON's "\ud800" escapes produce them), mixed with pieces known to
# break text handling (hypothesis alone rarely draws a surrogate).
HOSTILE_PIECES = st.sampled_from(["\ud800", "\udfff", "\x00", "\r\n", "${x}", "${", "%s", "{}", "'", '"', "\\",
                                  "\u202e", "\ufeff", "\U0001f3e0", "<|endoftext|>", "a" * 80])
ANY_TEXT = st.lists(st.one_of(HOSTILE_PIECES, st.text(st.characters(codec=None, exclude_categories=()), max_size=6)),
                    max_size=5).map("".join)
NAMES = st.one_of(st.sampled_from(serving.GENERATION_FIELDS + serving.TRANSPORT_FIELDS), st.text(max_size=8))
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                         ANY_TEXT, st.sampled_from(["true", "no", "64", "2", " 7 ", "1e3", "nan", "-1", "zip", "edges"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
IMAGES_B64 = st.one_of(st.just(base64.b64encode(SMALL_PNG).decode()), ANY_TEXT,
                       st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()))
IMAGES_RAW = st.one_of(st.just(SMALL_PNG), st.binary(max_size=256), ANY_TEXT)
CONTENT_TYPES = st.sampled_from(["application/json", "application/json; charset=utf-8", "multipart/form-data; boundary=x",
                                 "application/x-www-form-urlencoded", "text/plain", "", "APPLICATION/JSON", "image/png"])
ACCEPT = st.sampled_from(["", "*/*", "image/png", "application/json", "application/zip;q=0.5, image/png", "text/html", ","])
KNOWN = {*serving.GENERATION_FIELDS, *serving.TRANSPORT_FIELDS, "body", "Content-Type", "Accept"}
FUZZ = settings(max_examples=400, deadline=None, database=None, derandomize=True)


def _check(row: dict, headers: dict) -> None:
    """Either a validated request whose texts every output format can hold, or a ParamError naming its field."""
    try:
        request = serving.parse_request(row, headers, CONFIG)
    except ParamError as err:
        # the field at fault: one the client sent (whatever its name, "" included), a known one, or the body itself
        sent = set(row.get("body") or {}) if isinstance(row.get("body"), dict) else set(row)
        assert err.field in sent | KNOWN and str(err).startswith(f"{err.field}: "), err
        return
    parameters = request.params.to_dict()
    json.dumps(parameters, ensure_ascii=False).encode("utf-8")  # the PNG text chunk
    assert yaml.safe_load(params_yaml(parameters)) == parameters  # params.yaml round-trips
    assert request.image.dtype == np.uint8 and request.image.ndim == 3 and request.image.shape[2] == 3


@FUZZ
@given(body=st.one_of(st.dictionaries(NAMES, JSON_VALUES, max_size=8), JSON_VALUES, st.binary(max_size=32)),
       image=st.one_of(st.none(), IMAGES_B64), content_type=CONTENT_TYPES, accept=ACCEPT)
def test_fuzz_json_requests(body, image, content_type, accept):
    if isinstance(body, dict) and image is not None:
        body = {**body, "image": image}
    _check({"body": body}, {"Content-Type": content_type, "Accept": accept})


@FUZZ
@given(fields=st.dictionaries(NAMES, st.one_of(ANY_TEXT, st.binary(max_size=16)), max_size=8),
       image=st.one_of(st.none(), IMAGES_RAW), content_type=CONTENT_TYPES, accept=ACCEPT)
def test_fuzz_form_requests(fields, image, content_type, accept):
    row = dict(fields)
    if image is not None:
        row["image"] = image
    _check(row, {"content-type": content_type, "accept": accept})


@FUZZ
@given(name=st.sampled_from(serving.GENERATION_FIELDS + serving.TRANSPORT_FIELDS[1:]),
       value=st.one_of(ANY_TEXT, JSON_SCALARS, JSON_VALUES), encoding=st.sampled_from(["json", "form"]))
def test_fuzz_one_field_of_a_valid_request(name, value, encoding):
    """A valid request with one field replaced: the mistakes most likely to slip through validation."""
    if encoding == "json":
        _check({"body": {"prompt": "a house", "image": base64.b64encode(SMALL_PNG).decode(), name: value}},
               {"Content-Type": "application/json"})
    else:
        text = value if isinstance(value, str) else json.dumps(value)
        _check({"prompt": "a house", "image": SMALL_PNG, name: text}, {"Content-Type": "multipart/form-data; boundary=x"})


@FUZZ
@given(data=st.binary(max_size=512))
def test_fuzz_image_bytes(data):
    try:
        image = decode_image(data, 100_000, 10**6)
    except ParamError as err:
        assert err.field == "image"
    else:
        assert image.dtype == np.uint8 and image.ndim == 3


@functools.cache
def _encoded(kind: str) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(HOUSE)).convert("RGB").resize((24, 16)).save(out, kind)
    return out.getvalue()


@FUZZ
@given(kind=st.sampled_from(["PNG", "JPEG", "WEBP"]), cut=st.integers(0, 4000),
       flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)), max_size=6))
def test_fuzz_damaged_images(kind, cut, flips):
    data = bytearray(_encoded(kind))
    for position, mask in flips:
        data[position % len(data)] ^= mask
    data = bytes(data[: max(1, len(data) - cut % len(data))])
    try:
        image = decode_image(data, 100_000, 10**6)
    except ParamError as err:
        assert err.field == "image"
    else:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


# --- decoding and cost bounds (no server) -------------------------------------------------------------------------

def test_jpeg_scans_are_bounded():
    normal = hostile.progressive_jpeg_repeating_scans(64, 0)
    assert decode_image(normal, 10**6, 10**6).shape == (64, 64, 3)
    at_limit = hostile.progressive_jpeg_repeating_scans(64, MAX_JPEG_SCANS - normal.count(b"\xff\xda"))
    assert decode_image(at_limit, 10**6, 10**6).shape == (64, 64, 3)
    with pytest.raises(ParamError, match=f"scans; at most {MAX_JPEG_SCANS}") as err:
        decode_image(hostile.progressive_jpeg_repeating_scans(64, MAX_JPEG_SCANS), 10**6, 10**6)
    assert err.value.field == "image"


@pytest.mark.parametrize("entries", [257, 300, 768])
def test_palette_with_too_long_transparency_is_a_400(entries):
    with pytest.raises(ParamError) as err:
        decode_image(hostile.palette_png_with_long_trns(8, entries), 10**6, 10**6)
    assert err.value.field == "image"


def test_alpha_compositing_holds_no_full_size_float_copy():
    """The numpy memory of decoding a flat 2048x2048 RGBA WebP (about 600 bytes): the decoded RGBA image, whose
    buffer the RGB result reuses, and a band's temporaries, not float32 copies of the whole image (16 bytes a pixel
    each). tests/test_preprocess.py measures the whole process's peak, the decoder's own buffers included."""
    data = hostile.flat_rgba_webp(2048)
    tracemalloc.start()
    try:
        image = decode_image(data, 10**6, 2048 * 2048)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.shape == (2048, 2048, 3) and tuple(image[0, 0]) == (147, 167, 187)
    assert peak < 1.5 * 2048 * 2048 * 4, peak  # the RGBA image: 4 bytes a pixel; before the banding, over 10x


@pytest.mark.parametrize("height, width, samples, steps, field", [
    (768, 3072, 1, 1, "image_resolution"),  # a 4:1 input at 768: four times the area of 768x768
    (832, 768, 1, 1, "image_resolution"),
    (768, 768, 12, 101, "num_samples"),
    (768, 768, 1, 100, None),
    (384, 1536, 12, 100, None),  # 4:1 at 384: the area of 768x768
])
def test_cost_cap(height, width, samples, steps, field):
    params = serving.GenerationParams(prompt="", num_samples=samples, ddim_steps=steps)
    limits = Limits(ddim_steps=(1, 1000))
    if field is None:
        check_cost(params, height, width, limits)
        return
    with pytest.raises(ParamError) as err:
        check_cost(params, height, width, limits)
    assert err.value.field == field and "at most" in err.value.message


def test_cost_cap_is_configurable():
    config = serving.ServingConfig.from_mapping({**CONFIG_MAPPING, "limits": {**CONFIG_MAPPING["limits"],
                                                                              "work": 64 * 20, "output_pixels": 4096}})
    row = {"prompt": b"a", "image": SMALL_PNG, "ddim_steps": b"20"}
    serving.parse_request(row, {"Content-Type": "multipart/form-data; boundary=x"}, config)  # 8x8 latent x 20 steps
    with pytest.raises(ParamError, match="at most 1280 allowed") as err:
        serving.parse_request({**row, "ddim_steps": b"21"}, {"Content-Type": "multipart/form-data; boundary=x"}, config)
    assert err.value.field == "ddim_steps"
    edges = serving.parse_request({**row, "ddim_steps": b"21", "mode": b"edges"},
                                  {"Content-Type": "multipart/form-data; boundary=x"}, config)
    assert edges.mode == "edges"  # no diffusion, no cost


@pytest.mark.parametrize("value", ["many", 0, -5, 1.5, True, [1, 2]])
def test_cost_cap_configuration_is_checked_at_load(value):
    for name in ("work", "output_pixels"):
        with pytest.raises(ValueError, match=f"limits.{name} must be a positive integer"):
            serving.ServingConfig.from_mapping({**CONFIG_MAPPING, "limits": {name: value}})


@pytest.mark.parametrize("size", [99_998, 99_999, 100_000])
def test_base64_size_check_counts_no_padding(size):
    """An image of exactly the cap passes in JSON as in a form, whatever its length modulo 3 (padding)."""
    data = SMALL_PNG + b"\0" * (size - len(SMALL_PNG))
    for row, content_type in [({"body": {"prompt": "a", "image": base64.b64encode(data).decode()}}, "application/json"),
                              ({"prompt": b"a", "image": data}, "multipart/form-data; boundary=x")]:
        assert serving.parse_request(row, {"Content-Type": content_type}, CONFIG).image.shape[2] == 3
    over = data + b"\0"
    with pytest.raises(ParamError, match="is 100001 bytes") if size == 100_000 else contextlib.nullcontext():
        serving.parse_request({"body": {"prompt": "a", "image": base64.b64encode(over).decode()}},
                              {"Content-Type": "application/json"}, CONFIG)
