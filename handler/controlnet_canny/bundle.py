"""The self-describing result: PNGs that carry their parameters, and the zip bundle of the original demo."""
from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import yaml

PNG_TEXT_KEY = "parameters"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: np.ndarray, parameters: Mapping[str, Any] | None = None) -> bytes:
    """RGB (H, W, 3) or gray (H, W) uint8 to PNG; `parameters` as JSON in an iTXt chunk (UTF-8, unlike tEXt)."""
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    png = encoded.tobytes()
    if parameters is None:
        return png
    text = json.dumps(parameters, ensure_ascii=False, sort_keys=True).encode("utf-8")
    itxt = _chunk(b"iTXt", PNG_TEXT_KEY.encode("latin-1") + b"\0\0\0\0\0" + text)
    ihdr_end = 8 + 4 + 4 + 13 + 4  # signature, then IHDR's length, type, data and CRC
    return png[:ihdr_end] + itxt + png[ihdr_end:]


def read_png_parameters(png: bytes) -> dict[str, Any] | None:
    """The parameters that `encode_png` embedded, or None."""
    offset = 8
    while offset + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[offset:offset + 8])
        data = png[offset + 8:offset + 8 + length]
        if kind == b"iTXt" and data.startswith(PNG_TEXT_KEY.encode("latin-1") + b"\0"):
            return json.loads(data[len(PNG_TEXT_KEY) + 5:].decode("utf-8"))
        offset += 12 + length
    return None


def sample_name(index: int) -> str:
    return f"sample_{index:02d}.png"


EDGE_MAP_NAME = "edge_map.png"
PARAMS_NAME = "params.yaml"


def params_yaml(parameters: Mapping[str, Any]) -> str:
    """Plain YAML of JSON-like values. Not OmegaConf: it parses "${...}" in a prompt as an interpolation
    (and fails on an unbalanced one), and whoever loads the file with OmegaConf would resolve it."""
    plain = json.loads(json.dumps(dict(parameters)))  # tuples to lists, as the PNG's JSON has them
    return yaml.safe_dump(plain, allow_unicode=True, sort_keys=False, default_flow_style=False)


def make_bundle(samples: Sequence[bytes], edge_map: bytes, parameters: Mapping[str, Any]) -> bytes:
    """Zip of `sample_00.png`..., `edge_map.png` and `params.yaml`. Stored, not deflated: PNGs are compressed."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for i, png in enumerate(samples):
            archive.writestr(sample_name(i), png)
        archive.writestr(EDGE_MAP_NAME, edge_map)
        archive.writestr(PARAMS_NAME, params_yaml(parameters))
    return buffer.getvalue()
