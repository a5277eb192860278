"""Request parsing and response encoding for the TorchServe handler, free of TorchServe so that unit tests
can drive it without a server.

A request is a multipart form (image file parts plus text fields) or a JSON object (images as base64): `image`
(canny runs on it), `control_image` (the client's own control map instead) and `init_image` (img2img). Besides the
generation parameters of `controlnet_canny.params`, transport fields: `output` (zip | png | json, else the Accept
header decides), `stream` (newline-delimited JSON progress events, then the result), `preview_every` (a stream's
progress events carry a preview image every n steps), `request_id` (the client's
name for the request, which a cancel call names) and `mode` (generate | edges: the edge map alone, no diffusion |
cancel: stop the request of that request_id | adapters: the adapter store's listing).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from controlnet_canny.bundle import encode_png, make_bundle
from controlnet_canny.backends import BackendOptions
from controlnet_canny.config import reject_unknown_keys
from controlnet_canny.params import GenerationParams, Limits, ParamError, as_bool, as_int, check_cost, parse_params
from controlnet_canny.pipeline import NO_ADAPTERS, PRECISION_CHOICES, Prepared, Sampling
from controlnet_canny.preprocess import checked_output_size, decode_control_map, decode_image

GENERATION_FIELDS = tuple(f.name for f in fields(GenerationParams))
IMAGE_FIELDS = ("image", "control_image", "init_image")
TRANSPORT_FIELDS = (*IMAGE_FIELDS, "output", "stream", "preview_every", "mode", "request_id")
MULTI_VALUED_FIELDS = ("loras",)  # the fields a form may repeat: each part one value, in the order sent
MODES = ("generate", "edges", "cancel", "adapters")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
OUTPUT_TYPES = {"zip": "application/zip", "png": "image/png", "json": "application/json"}
PREVIEW_JPEG_QUALITY = 80
STREAM_TYPE = "application/x-ndjson"
DEFAULT_OUTPUT = "zip"
ECHO_CHARS = 40  # how much of a client's value or name an error message repeats


class NotAcceptable(ParamError):
    """No response format the client accepts (406)."""
    status = 406


class Conflict(ParamError):
    """A request_id that another request in flight has (409)."""
    status = 409


class TooManyCancels(ParamError):
    """More pending cancels than the board keeps (503: try again when some have expired)."""
    status = 503


@dataclass(frozen=True)
class ServingConfig:
    """The `handler:` section of model-config.yaml. Paths are relative to the model directory."""
    checkpoints: tuple[str, ...]
    model_config: str
    precision: str = "auto"  # auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32
    device: str = "auto"  # auto: the GPU TorchServe assigns to the worker, else the pipeline's choice
    threads: int = 0  # torch threads per worker; 0: the usable cores divided by the live workers
    max_image_bytes: int = 16 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_batch_samples: int = 12  # samples per model evaluation; bounds memory when held requests ask many
    adapters: str = "adapters"  # the adapter store's directory (LoRAs, embeddings, TAESD); "": none
    max_adapter_bytes: int = 2**31  # an adapter file's size cap
    limits: Limits = Limits()
    defaults: Mapping[str, Any] = field(default_factory=dict)  # request field defaults, e.g. image_resolution
    backend: BackendOptions = BackendOptions()

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> ServingConfig:
        """Validates the section so that a configuration mistake fails the build or the worker start, not a request."""
        reject_unknown_keys(section, cls, "handler")
        for required in ("checkpoints", "model_config"):
            if not section.get(required):
                raise ValueError(f"handler.{required} is required (scripts/build_mar.py sets it)")
        if section.get("precision", "auto") not in PRECISION_CHOICES:
            raise ValueError(f"handler.precision must be one of {list(PRECISION_CHOICES)}, got {section['precision']!r}")
        values = dict(section)
        values["checkpoints"] = tuple(section["checkpoints"])
        values["limits"] = Limits.from_mapping(section.get("limits") or {})
        values["defaults"] = dict(section.get("defaults") or {})
        try:
            values["backend"] = BackendOptions.from_mapping(section.get("backend") or {})
        except ValueError as err:
            raise ValueError(f"handler.{err}") from None
        config = cls(**values)
        allowed = set(GENERATION_FIELDS) - {"prompt"}  # the prompt is always the client's
        if set(config.defaults) - allowed:
            raise ValueError(f"handler.defaults: {sorted(set(config.defaults) - allowed)} cannot have defaults; allowed: {sorted(allowed)}")
        try:
            parse_params({"prompt": "", **config.defaults}, config.limits)
        except ParamError as err:
            raise ValueError(f"handler.defaults.{err.field}: {err.message}") from None
        return config

    def worker_threads(self, workers: int) -> int:
        """handler.threads, else the usable cores shared by `workers` workers."""
        if self.threads:
            return self.threads
        # CONTROLNET_CPUS: the cores this server may use where the affinity shows more (a pod's CPU request)
        cores = int(os.environ.get("CONTROLNET_CPUS") or len(os.sched_getaffinity(0)))
        return max(1, cores // max(1, workers))


def live_workers(fallback: int, proc: Path = Path("/proc")) -> int:
    """TorchServe's worker processes of this instance, this one included: the children of this process's parent
    (the frontend) that run ts/model_service_worker.py. `fallback` where /proc cannot tell (not Linux)."""
    parent = os.getppid()
    try:
        entries = [entry for entry in os.scandir(proc) if entry.name.isdigit()]
    except OSError:
        return fallback
    count = 0
    for entry in entries:
        try:
            stat = (Path(entry.path) / "stat").read_text()
            # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after its last ")"
            if int(stat.rsplit(")", 1)[1].split()[1]) != parent:
                continue
            count += b"model_service_worker" in (Path(entry.path) / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):  # a process that ended while being read
            continue
    return max(1, count)


class CancelBoard:
    """Cancel calls, shared by the workers of one TorchServe instance through a directory: an empty file per
    request_id, named by its sha256 so that no client text becomes a path. Whichever worker takes a cancel call
    posts it; the worker holding that request takes it before its next step, and a request that arrives after
    its cancel is refused. Entries expire after `ttl` seconds (a cancel for a request that never comes), at most
    `capacity` are kept, and the directory goes when it is empty."""

    def __init__(self, directory: Path, ttl: float = 600.0, capacity: int = 4096):
        self.directory, self.ttl, self.capacity = directory, ttl, capacity
        self.swept = 0.0

    def _entry(self, request_id: str) -> Path:
        return self.directory / hashlib.sha256(request_id.encode()).hexdigest()

    def post(self, request_id: str) -> None:
        self.sweep(force=True)
        if self.directory.is_dir() and len(os.listdir(self.directory)) >= self.capacity:
            raise TooManyCancels("request_id", f"{self.capacity} cancels are pending; try again later")
        for _ in range(2):  # another worker may remove the directory between the two calls
            self.directory.mkdir(mode=0o700, exist_ok=True)
            try:
                self._entry(request_id).touch()
                return
            except FileNotFoundError:
                continue

    def take(self, request_id: str) -> bool:
        """Whether a cancel for `request_id` is pending; taking it removes it."""
        self.sweep()
        try:
            self._entry(request_id).unlink()
            return True
        except FileNotFoundError:
            return False

    def sweep(self, force: bool = False) -> None:
        """Removes expired entries, and the directory once empty (at most once a second unless forced)."""
        now = time.time()
        if not force and now - self.swept < 1.0:
            return
        self.swept = now
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        for entry in entries:
            try:
                if now - entry.stat().st_mtime > self.ttl:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue
        try:
            self.directory.rmdir()
        except OSError:  # not empty, or gone
            pass


@dataclass(frozen=True)
class ServingRequest:
    params: GenerationParams
    image: np.ndarray  # (H, W, 3) uint8 RGB
    output: str  # a key of OUTPUT_TYPES
    stream: bool
    mode: str  # one of MODES
    control_image: np.ndarray | None = None  # (H, W) or (H, W, 3) uint8, sized like `image`
    init_image: np.ndarray | None = None  # (H, W, 3) uint8 RGB, any size
    digests: Mapping[str, str] = field(default_factory=dict)  # control_image / init_image: sha256 of the bytes sent
    request_id: str | None = None  # the client's name for it, which a cancel call names
    preview_every: int = 0  # a stream's progress events carry a preview every n steps; 0: none


@dataclass
class Held:
    """A request a worker holds between its admission and its last response."""
    request: ServingRequest
    sampling: Sampling
    events_sent: int = 0  # responses a stream has had (the first one carries the HTTP status and headers)


@dataclass(frozen=True)
class CancelRequest:
    """mode=cancel: stop the request that the client named `request_id`."""
    request_id: str


@dataclass(frozen=True)
class AdaptersRequest:
    """mode=adapters: the adapter store's listing."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def _echo(text: str) -> str:
    """A client's text as an error message repeats it: cut, so that a 1 MB field name is not sent back."""
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "..."


def _header(headers: Mapping[str, Any], name: str) -> str:
    """Header lookup by case-insensitive name; TorchServe passes the names as the client spelled them."""
    for key, value in headers.items():
        if key.lower() == name and isinstance(value, str):
            return value
    return ""


def keeping_repeated_fields(retrieve):
    """TorchServe's `Service.retrieve_data_for_inference` wrapped so that a field sent more than once reaches the
    handler as the list of its values in the order sent. TorchServe 0.12's frontend forwards every part of a form
    (multipart or urlencoded) as a parameter of its own, but that function merges them into a dict by name, which
    keeps the last. Names sent once, the headers and the request ids stay exactly what TorchServe makes of them."""
    def retrieve_keeping_repeats(batch):
        headers, rows, request_ids = retrieve(batch)
        for row, request in zip(rows, batch):
            values: dict[str, list] = {}
            for parameter in request["parameters"]:
                values.setdefault(parameter["name"], []).append(parameter["value"])
            row.update({name: sent for name, sent in values.items() if len(sent) > 1})
        return headers, rows, request_ids

    retrieve_keeping_repeats.keeps_repeated_fields = True
    return retrieve_keeping_repeats


def _form_text(name: str, value: Any) -> Any:
    if isinstance(value, list):  # a repeated field (keeping_repeated_fields)
        return [_form_text(name, item) for item in value]
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ParamError(name, "is not UTF-8 text") from None
    return value


def request_fields(row: Mapping[str, Any], headers: Mapping[str, Any]) -> dict[str, Any]:
    """The client's fields, whatever the encoding. TorchServe hands a JSON body over as {"body": parsed} (the raw
    bytes when it is not valid JSON) and a form as one entry per name (bytes; a list of them for a name the form
    repeats, which only MULTI_VALUED_FIELDS may be). Media types are case-insensitive
    (RFC 9110); TorchServe parses only an exact `application/json`, so other spellings are parsed here."""
    content_type = _header(headers, "content-type").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = row.get("body", {})
        if isinstance(body, (bytes, bytearray)):
            try:
                body = json.loads(bytes(body).decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise ParamError("body", "is not valid JSON") from None
        if not isinstance(body, dict):
            raise ParamError("body", f"must be a JSON object, got {type(body).__name__}")
        return dict(body)
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        if set(row) == {"body"} and content_type == "multipart/form-data":
            row = _multipart_fields(row["body"], _header(headers, "content-type"))
        if set(row) == {"body"}:  # TorchServe found no form fields and handed the raw body over
            raise ParamError("body", f"is not a {content_type} body with fields (is the multipart boundary missing?)")
        for name, value in row.items():  # a list: the form sent the field more than once; unknown names are refused later
            if isinstance(value, list) and name in TRANSPORT_FIELDS + GENERATION_FIELDS and name not in MULTI_VALUED_FIELDS:
                raise ParamError(name, f"is given more than once; only {', '.join(MULTI_VALUED_FIELDS)} may be repeated")
        fields = {name: _form_text(name, value) for name, value in row.items() if name not in IMAGE_FIELDS}
        for name in IMAGE_FIELDS:  # TorchServe hands a text/* part over as str when it is UTF-8, which no image is
            if name in row:
                image = row[name]
                fields[name] = image.encode("utf-8", "surrogatepass") if isinstance(image, str) else image
        return fields
    raise ParamError("Content-Type", f"must be multipart/form-data or application/json, got {_echo(content_type) or 'none'!r}")


def _multipart_fields(body: Any, content_type: str) -> dict[str, Any]:
    """A multipart body TorchServe left undecoded (its frontend decodes only a lower-case multipart/form-data),
    one entry per name (a list of the values of a name given more than once); {"body": body} when it holds none."""
    if not isinstance(body, (bytes, bytearray)):
        return {"body": body}
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    message = BytesParser(policy=policy.HTTP).parsebytes(head + bytes(body))
    parts = list(message.iter_parts()) if message.is_multipart() else []
    if not parts:
        return {"body": body}
    values: dict[str, list[bytes]] = {}
    for part in parts:
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise ParamError("body", "has a multipart part without a name")
        values.setdefault(name, []).append(part.get_payload(decode=True) or b"")
    return {name: sent[0] if len(sent) == 1 else sent for name, sent in values.items()}


def _image_bytes(value: Any, max_bytes: int, name: str = "image") -> bytes:
    """A form part carries the file itself; JSON carries base64 text."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise ParamError(name, f"must be base64 text in JSON, got {type(value).__name__}")
    # refused before decoding, by the exact decoded size: 3 bytes per 4 characters, less the padding
    size = len(value) * 3 // 4 - min(2, len(value) - len(value.rstrip("=")))
    if size > max_bytes:
        raise ParamError(name, f"is {size} bytes; at most {max_bytes} allowed")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ParamError(name, "is not valid base64") from None


def _accept_ranges(accept: str) -> list[tuple[str, float]]:
    """The media ranges of an Accept header with their q-values, in the client's order; malformed entries skipped."""
    ranges = []
    for entry in accept.split(","):
        media, *parameters = (part.strip() for part in entry.split(";"))
        if media.count("/") != 1:
            continue
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = -1.0
        if 0.0 <= quality <= 1.0:
            ranges.append((media.lower(), quality))
    return ranges


def _output_from_accept(accept: str, formats: Sequence[str]) -> str:
    """The format of `formats` (in the server's order of preference) that the Accept header rates highest: each
    format takes the q of the most specific range matching it; ties go to the range the client listed first.
    No Accept (or none that parses): the default; nothing acceptable: NotAcceptable."""
    ranges = _accept_ranges(accept)
    if not ranges:
        return DEFAULT_OUTPUT
    best = None
    for preference, name in enumerate(formats):
        media = OUTPUT_TYPES[name]
        matches = [(media_range.count("*"), index, quality) for index, (media_range, quality) in enumerate(ranges)
                   if media_range in (media, media.split("/")[0] + "/*", "*/*")]
        if matches:
            _, index, quality = min(matches)  # the most specific range decides
            if quality > 0 and (best is None or (-quality, index, preference) < best[0]):
                best = ((-quality, index, preference), name)
    if best is None:
        offered = ", ".join(OUTPUT_TYPES[name] for name in formats)
        raise NotAcceptable("Accept", f"none of {offered} is acceptable, got {_echo(accept)!r}")
    return best[1]


def _request_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not REQUEST_ID.fullmatch(value):
        raise ParamError("request_id", f"must be 1 to 64 characters of A-Z a-z 0-9 . _ : -, got {_echo(str(value))!r}")
    return value


def _preview_every(value: Any, stream: bool, max_steps: int) -> int:
    steps = as_int("preview_every", value)
    if not 0 <= steps <= max_steps:
        raise ParamError("preview_every", f"must be between 0 and {max_steps}, got {steps}")
    if steps and not stream:
        raise ParamError("preview_every", "previews travel in a stream's progress events; add stream=true")
    return steps


def parse_request(row: Mapping[str, Any], headers: Mapping[str, Any],
                  config: ServingConfig) -> ServingRequest | CancelRequest | AdaptersRequest:
    """One TorchServe request row to a validated request; every client mistake is a ParamError naming its field."""
    raw = request_fields(row, headers)
    unknown = sorted(set(raw) - set(GENERATION_FIELDS) - set(TRANSPORT_FIELDS))
    if unknown:
        raise ParamError(_echo(unknown[0]), f"unknown field; known fields: {', '.join(TRANSPORT_FIELDS + GENERATION_FIELDS)}")
    mode = raw.pop("mode", "generate")
    if mode not in MODES:
        raise ParamError("mode", f"must be one of {', '.join(MODES)}, got {str(mode)[:40]!r}")
    request_id = _request_id(raw.pop("request_id", None))
    if mode == "cancel":
        if request_id is None:
            raise ParamError("request_id", "is required with mode=cancel: the request_id of the request to stop")
        if raw:
            raise ParamError(_echo(sorted(raw)[0]), "mode=cancel takes request_id alone")
        return CancelRequest(request_id)
    if mode == "adapters":
        if raw or request_id is not None:
            raise ParamError(_echo(sorted(raw)[0]) if raw else "request_id", "mode=adapters takes no other field")
        return AdaptersRequest()
    stream = as_bool("stream", raw.pop("stream", False))
    output = raw.pop("output", None)
    if output not in (None, *OUTPUT_TYPES):  # a tuple: JSON may send unhashable values
        raise ParamError("output", f"must be one of {', '.join(OUTPUT_TYPES)}, got {str(output)[:40]!r}")
    if stream:
        if output not in (None, "json"):
            raise ParamError("stream", "a stream ends with the JSON result; use output=json or leave output unset")
        output = "json"
    preview_every = _preview_every(raw.pop("preview_every", 0), stream, config.limits.ddim_steps[1])
    if "image" not in raw and "control_image" not in raw:
        raise ParamError("image", "is required (or a control_image): a PNG, JPEG or WebP file part, or base64 text in JSON")
    sent = {name: _image_bytes(raw.pop(name), config.max_image_bytes, name) for name in IMAGE_FIELDS if name in raw}
    limits = (config.max_image_bytes, config.max_image_pixels)
    image = decode_image(sent["image"], *limits) if "image" in sent else None
    control = decode_control_map(sent["control_image"], *limits) if "control_image" in sent else None
    init = decode_image(sent["init_image"], *limits, field="init_image") if "init_image" in sent else None
    digests = {name: hashlib.sha256(sent[name]).hexdigest() for name in ("control_image", "init_image") if name in sent}
    if mode == "edges":
        raw.setdefault("prompt", "")  # no diffusion: the prompt plays no part
    params = parse_params({**config.defaults, **raw}, config.limits)
    one_image = mode == "edges" or params.num_samples == 1
    if output is None:  # only formats that can hold the result are negotiated: png holds one image
        output = _output_from_accept(_header(headers, "accept"), ("zip", "json", "png") if one_image else ("zip", "json"))
    if output == "png" and not one_image:
        raise ParamError("output", f"png holds one image but num_samples is {params.num_samples}; use zip or json")
    if mode == "generate":
        if params.width:
            height, width = params.height, params.width
        else:
            height, width = checked_output_size(*(image if image is not None else control).shape[:2],
                                                params.image_resolution)
        check_cost(params, height, width, config.limits)
    return ServingRequest(params, image, output, stream, mode, control, init, digests, request_id, preview_every)


def effective_parameters(prepared: Prepared, model: Mapping[str, Any], steps: int | None,
                         digests: Mapping[str, str] | None = None,
                         control_fidelity: Sequence[float] | None = None) -> dict[str, Any]:
    """Everything needed to reproduce a result: the parameters with the seed resolved, the seeds of all
    samples, the size generated, the model, the sampler steps visited, the sha256 of a control_image /
    init_image sent, and what the result says about itself: warnings (a truncated prompt) and each sample's
    control_fidelity. In edges mode (steps None) no noise is drawn: seed, seeds and control_fidelity are None, and
    no adapter is used.
    The server and scripts/generate.py both report exactly this."""
    height, width = prepared.edge_map.shape[:2]
    generated = steps is not None
    digests = digests or {}
    return {
        **prepared.params.to_dict(),
        "seed": prepared.params.seed if generated else None,
        "seeds": prepared.seeds if generated else None,
        "ddim_steps_visited": steps,
        "height": height,
        "width": width,
        "control_image": digests.get("control_image"),
        "init_image": digests.get("init_image"),
        "warnings": list(prepared.warnings),
        "control_fidelity": None if control_fidelity is None else [round(f, 4) for f in control_fidelity],
        "adapters": (prepared.adapters if generated else NO_ADAPTERS).record(),
        **model,
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sample_pngs(prepared: Prepared, images: Sequence[np.ndarray], parameters: Mapping[str, Any]) -> list[bytes]:
    """Each sample's PNG carries `parameters` with its own seed and its own control_fidelity: that seed with
    num_samples=1 reproduces it, and gives those parameters."""
    fidelity = parameters.get("control_fidelity") or [None] * len(images)
    return [encode_png(image, {**parameters, "seed": seed, "control_fidelity": [score]})
            for image, seed, score in zip(images, prepared.seeds, fidelity)]


def encode_result(request: ServingRequest, prepared: Prepared, images: Sequence[np.ndarray] | None,
                  parameters: Mapping[str, Any]) -> Response:
    """The result in the asked format; every PNG carries `parameters` (a sample's with its own seed).
    `images` is None in edges mode."""
    edge_png = encode_png(prepared.edge_map, parameters)
    samples = sample_pngs(prepared, images or [], parameters)
    seed_header = {"X-Seeds": ",".join(map(str, prepared.seeds))} if images is not None else {}
    stem = f"controlnet_{prepared.params.seed}" if images is not None else "edge_map"
    if request.output == "json":
        body = {"parameters": dict(parameters), "images": [_b64(png) for png in samples], "edge_map": _b64(edge_png)}
        return Response(200, json.dumps(body).encode(), OUTPUT_TYPES["json"], seed_header)
    if request.output == "png":
        png = samples[0] if samples else edge_png
        return Response(200, png, OUTPUT_TYPES["png"], {**seed_header, "Content-Disposition": f'attachment; filename="{stem}.png"'})
    return Response(200, make_bundle(samples, edge_png, parameters), OUTPUT_TYPES["zip"],
                    {**seed_header, "Content-Disposition": f'attachment; filename="{stem}.zip"'})


def error_response(status: int, error: str, field_name: str | None) -> Response:
    body = json.dumps({"error": error, "field": field_name}).encode()
    return Response(status, body, OUTPUT_TYPES["json"])


def param_error_response(err: ParamError) -> Response:
    return error_response(err.status, str(err), err.field)


def adapters_response(listing: Sequence[Mapping[str, Any]] | None) -> Response:
    """The adapter store's files (name, kind, rank, vectors, size, sha256, error); null without a store."""
    return Response(200, json.dumps({"adapters": None if listing is None else list(listing)}).encode(),
                    OUTPUT_TYPES["json"])


def cancel_accepted_response(request_id: str) -> Response:
    """202: the worker holding the request stops it before its next step (it answers 409)."""
    return Response(202, json.dumps({"request_id": request_id, "cancel": "accepted"}).encode(), OUTPUT_TYPES["json"])


def cancelled_response(request_id: str) -> Response:
    return error_response(409, f"request_id: cancelled by a mode=cancel call for {request_id!r}", "request_id")


def encode_preview(image: np.ndarray) -> bytes:
    """A preview image (RGB uint8) as JPEG: a tenth of a PNG's bytes for a picture that is only a glimpse."""
    ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, PREVIEW_JPEG_QUALITY])
    if not ok:
        raise ValueError("the preview could not be encoded as JPEG")
    return jpeg.tobytes()


def progress_event(done: int, total: int, preview_jpeg: bytes | None = None) -> bytes:
    event: dict[str, Any] = {"event": "progress", "step": done, "steps": total}
    if preview_jpeg is not None:
        event["preview"] = _b64(preview_jpeg)
    return json.dumps(event).encode() + b"\n"


def stream_final_line(response: Response) -> bytes:
    """The last line of a stream: the JSON result, or the error (the HTTP status, 200, left with the first event)."""
    event = "result" if response.status == 200 else "error"
    return json.dumps({"event": event, **json.loads(response.body)}).encode() + b"\n"


def error_reason(field_name: str | None) -> str:
    """A metric label from a fixed set: the field at fault when it is a known one (clients choose unknown names)."""
    known = set(GENERATION_FIELDS) | set(TRANSPORT_FIELDS) | {"body", "Content-Type", "Accept"}
    return field_name if field_name in known else "unknown_field"
