"""Crafted uploads, each aimed at one way a request could hurt the worker: decode time, memory, a crash in
conversion, a generation far costlier than its size suggests. Small on the wire, built on the fly.

Shared by scripts/load.py (its mixed hostile + normal run) and tests/test_hostile_input.py.
"""
from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def progressive_jpeg_repeating_scans(side: int, extra_scans: int) -> bytes:
    """A gray progressive JPEG of side x side whose final refinement scan is repeated `extra_scans` times: each
    repetition is a few bytes and costs the decoder another pass over every block."""
    out = io.BytesIO()
    Image.new("L", (side, side), 90).save(out, "JPEG", progressive=True, quality=50)
    data = out.getvalue()
    last_scan = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    return data[:end] + data[last_scan:end] * extra_scans + data[end:]


def palette_png_with_long_trns(side: int = 8, entries: int = 300) -> bytes:
    """A palette PNG whose tRNS chunk holds more alpha entries than any palette can have (256)."""
    out = io.BytesIO()
    Image.new("P", (side, side), 1).save(out, "PNG")
    data = out.getvalue()
    end = data.rindex(b"IEND") - 4
    return data[:end] + _chunk(b"tRNS", bytes(range(256)) * (entries // 256) + bytes(entries % 256)) + data[end:]


def flat_rgba_webp(side: int) -> bytes:
    """A lossless, half-transparent side x side WebP: a few hundred bytes that decode to 4 bytes a pixel."""
    out = io.BytesIO()
    Image.new("RGBA", (side, side), (40, 80, 120, 128)).save(out, "WEBP", lossless=True)
    return out.getvalue()


def elongated_png(width: int, height: int) -> bytes:
    """A plain RGB PNG; at 4:1 and a high image_resolution its output is four times the area of a square one."""
    out = io.BytesIO()
    image = Image.new("RGB", (width, height), (200, 200, 200))
    image.paste((20, 20, 20), (width // 4, height // 4, width // 2, height // 2))
    image.save(out, "PNG")
    return out.getvalue()


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"hostile") -> tuple[bytes, str]:
    """A hand-built multipart/form-data body: each part is (raw header lines, content), so that any header
    (a missing name, an unknown transfer encoding or charset) can be sent. Returns (body, Content-Type)."""
    body = b"".join(b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n" for headers, content in parts)
    return body + b"--" + boundary + b"--\r\n", f"multipart/form-data; boundary={boundary.decode()}"
