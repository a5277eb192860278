"""Image decoding and the reference's canny preprocessing (spec section 4, steps 1-3)."""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps

from controlnet_canny.params import ParamError
from controlnet_canny.preprocess import MAX_ASPECT, canny, decode_image, output_size, resize_image, to_rgb

BIG = 10**8
HANDLER = Path(__file__).resolve().parents[1] / "handler"


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def _reference_hwc3(x: np.ndarray) -> np.ndarray:
    """The reference's HWC3 (annotator/util.py), the oracle for gray and RGBA handling."""
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 3:
        return x
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, 0:3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


# --- output size: short side to the resolution, sides rounded half-to-even to multiples of 64 -----------------

@pytest.mark.parametrize("h, w, res, expected", [
    (32, 80, 64, (64, 128)),     # 80 * 2 / 64 = 2.5 -> 2 (half to even; half-up would give 192)
    (32, 112, 64, (64, 256)),    # 112 * 2 / 64 = 3.5 -> 4 (half to even; half-down would give 192)
    (80, 32, 64, (128, 64)),     # the same, portrait
    (64, 96, 64, (64, 128)),     # k = 1: 96 / 64 = 1.5 -> 2
    (64, 160, 64, (64, 128)),    # 2.5 -> 2
    (512, 1312, 512, (512, 1280)),  # 20.5 -> 20
    (512, 1376, 512, (512, 1408)),  # 21.5 -> 22
    (480, 640, 512, (512, 704)),  # 640 * 1.0667 / 64 = 10.67 -> 11
    (1000, 750, 512, (704, 512)),  # 1000 * 0.6827 / 64 = 10.67 -> 11
    (300, 300, 256, (256, 256)),
])
def test_output_size(h, w, res, expected):
    assert output_size(h, w, res) == expected


def test_output_size_matches_reference_formula():
    """The reference: k = res / min(H, W); side = int(np.round(side * k / 64.0)) * 64, over many shapes."""
    rng = np.random.RandomState(1)
    for h, w in rng.randint(16, 2000, (300, 2)):
        for res in (256, 512, 768):
            k = float(res) / min(h, w)
            assert output_size(int(h), int(w), res) == (int(np.round(h * k / 64.0)) * 64, int(np.round(w * k / 64.0)) * 64)


# --- interpolation: LANCZOS4 when enlarging (k > 1), AREA otherwise -----------------------------------------

@pytest.mark.parametrize("h, w, res, right, wrong", [
    (48, 64, 64, cv2.INTER_LANCZOS4, cv2.INTER_AREA),   # k = 1.33 > 1
    (128, 160, 64, cv2.INTER_AREA, cv2.INTER_LANCZOS4),  # k = 0.5
    (64, 96, 64, cv2.INTER_AREA, cv2.INTER_LANCZOS4),   # k == 1 exactly: AREA, though the width grows 96 -> 128
])
def test_resize_interpolation(h, w, res, right, wrong):
    image = _noise(h, w)
    out = resize_image(image, res)
    new_h, new_w = output_size(h, w, res)
    assert out.shape == (new_h, new_w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, cv2.resize(image, (new_w, new_h), interpolation=right))
    assert not np.array_equal(out, cv2.resize(image, (new_w, new_h), interpolation=wrong))


@pytest.mark.parametrize("h, w", [(64, 300), (300, 64), (64, 4000)])
def test_extreme_aspect_ratio_refused(h, w):
    with pytest.raises(ParamError) as err:
        resize_image(np.zeros((h, w, 3), np.uint8), 64)
    assert err.value.field == "image" and "aspect" in err.value.message


def test_aspect_limit_itself_allowed():
    assert resize_image(np.zeros((64, 64 * MAX_ASPECT, 3), np.uint8), 64).shape == (64, 64 * MAX_ASPECT, 3)


# --- colour handling ------------------------------------------------------------------------------------------

def test_gray_png_gives_three_equal_channels():
    gray = np.random.RandomState(2).randint(0, 256, (20, 30), dtype=np.uint8)
    out = decode_image(_encode(Image.fromarray(gray, "L"), "PNG"), BIG, BIG)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)
    np.testing.assert_array_equal(out, _reference_hwc3(gray))


def test_16bit_gray_png_scaled_not_clipped():
    wide = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0, 257, ..., 65535
    ok, png = cv2.imencode(".png", wide)
    assert ok
    out = decode_image(png.tobytes(), BIG, BIG)
    np.testing.assert_array_equal(out[:, :, 0], (wide >> 8).astype(np.uint8))
    np.testing.assert_array_equal(out, cv2.cvtColor(cv2.imdecode(png, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))


def test_rgb_png_round_trip():
    image = _noise(17, 23)
    np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(image), "PNG"), BIG, BIG), image)


def test_rgba_composited_over_white_truncated():
    pixels = np.array([[[100, 50, 0, 128], [0, 0, 0, 51], [9, 200, 30, 0], [7, 8, 9, 255]]], np.uint8)
    out = decode_image(_encode(Image.fromarray(pixels, "RGBA"), "PNG"), BIG, BIG)
    # rgb * a + 255 * (1 - a) in float32, truncated: 100 -> 177.196 -> 177; 0 at a = 128/255 -> 126.99999 -> 126
    expected = np.array([[[177, 152, 126], [204, 204, 204], [255, 255, 255], [7, 8, 9]]], np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_rgba_matches_reference_for_every_alpha():
    rng = np.random.RandomState(3)
    pixels = np.concatenate([rng.randint(0, 256, (256, 16, 3)), np.repeat(np.arange(256)[:, None, None], 16, 1)], 2)
    pixels = pixels.astype(np.uint8)
    out = decode_image(_encode(Image.fromarray(pixels, "RGBA"), "PNG"), BIG, BIG)
    np.testing.assert_array_equal(out, _reference_hwc3(pixels))
    assert not np.array_equal(out, pixels[:, :, :3])  # alpha was not simply dropped


def test_gray_alpha_composited():
    la = np.array([[[10, 0], [10, 255], [200, 128]]], np.uint8)
    out = decode_image(_encode(Image.fromarray(la, "LA"), "PNG"), BIG, BIG)
    rgba = np.concatenate([np.repeat(la[:, :, :1], 3, 2), la[:, :, 1:]], 2)
    np.testing.assert_array_equal(out, _reference_hwc3(rgba))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [10, 10, 10]


def test_palette_with_transparency():
    image = Image.fromarray(np.array([[0, 1, 2, 0]], np.uint8), "P")
    image.putpalette([100, 50, 0, 10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 9))
    data = _encode(image, "PNG", transparency=bytes([255, 0, 128]))
    out = decode_image(data, BIG, BIG)
    expected_2 = _reference_hwc3(np.array([[[200, 100, 50, 128]]], np.uint8))[0, 0]
    assert out[0].tolist() == [[100, 50, 0], [255, 255, 255], expected_2.tolist(), [100, 50, 0]]


def test_palette_single_transparent_index():
    image = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    image.putpalette([1, 2, 3, 4, 5, 6] + [0] * (256 * 3 - 6))
    out = decode_image(_encode(image, "PNG", transparency=1), BIG, BIG)
    assert out[0].tolist() == [[1, 2, 3], [255, 255, 255]]


def test_to_rgb_plain_rgb_untouched():
    image = _noise(5, 6)
    np.testing.assert_array_equal(to_rgb(Image.fromarray(image)), image)


def test_jpeg_and_webp_accepted():
    image = _noise(16, 24)
    for fmt, kwargs in (("JPEG", {"quality": 95}), ("WEBP", {"lossless": True})):
        out = decode_image(_encode(Image.fromarray(image), fmt, **kwargs), BIG, BIG)
        assert out.shape == (16, 24, 3)
    np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(image), "WEBP", lossless=True), BIG, BIG), image)


def _pillow_rgb(data: bytes) -> np.ndarray:
    """Pillow's own decode of the same file, upright: what the WebP path must equal."""
    return to_rgb(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))


@pytest.mark.parametrize("alpha", [False, True])
@pytest.mark.parametrize("kwargs", [{"lossless": True}, {"quality": 30}, {"quality": 90}])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_webp_decodes_as_pillow_does(alpha, kwargs, orientation):
    image = cv2.GaussianBlur(_noise(60, 90), (0, 0), 2)
    if alpha:
        image = np.dstack([image, np.tile(np.arange(90, dtype=np.uint8) * 2, (60, 1))])
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    data = _encode(Image.fromarray(image), "WEBP", exif=exif.tobytes(), **kwargs)
    decoded = decode_image(data, BIG, BIG)
    assert decoded.shape == ((60, 90, 3) if orientation in (1, 3) else (90, 60, 3))
    np.testing.assert_array_equal(decoded, _pillow_rgb(data))


def test_webp_peak_memory_is_one_decoded_image_and_a_copy():
    """A 4096x4096 RGBA WebP of a few hundred bytes: the worker's peak grows by about two RGBA images (OpenCV's
    decode and its result), not Pillow's three (252 MiB) plus the RGB (48 MiB)."""
    script = """
import io, sys
from PIL import Image
sys.path.insert(0, sys.argv[1])
from controlnet_canny.preprocess import decode_image
buffer = io.BytesIO()
Image.new("RGBA", (4096, 4096), (10, 200, 30, 128)).save(buffer, "WEBP", lossless=True)
data = buffer.getvalue()
status = lambda key: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
open("/proc/self/clear_refs", "w").write("5")
start = status("VmRSS")
image = decode_image(data, 2**24, 2**24)
print((status("VmHWM") - start) / 1024, image.shape)
"""
    out = subprocess.run([sys.executable, "-c", script, str(HANDLER)], capture_output=True, text=True, check=True)
    peak_mib = float(out.stdout.split()[0])
    assert "(4096, 4096, 3)" in out.stdout
    assert peak_mib < 2.5 * 64, out.stdout  # 64 MiB: the decoded RGBA image


# --- canny on the 3-channel image ---------------------------------------------------------------------------

def _iso_luminance_image() -> np.ndarray:
    """Red and green halves of (nearly) the same gray value: an edge in colour, none in luminance."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = (255, 0, 0)
    image[:, 32:] = (0, 130, 0)  # 0.587 * 130 = 76.3, as 0.299 * 255 = 76.2
    image[20:44, 20:44] = (40, 40, 220)
    return image


def test_canny_on_rgb_not_gray():
    image = _iso_luminance_image()
    edges = canny(image, 100, 200)
    assert edges.shape == (64, 64) and edges.dtype == np.uint8
    np.testing.assert_array_equal(edges, cv2.Canny(image, 100, 200))
    gray_edges = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 100, 200)
    assert not np.array_equal(edges, gray_edges)
    assert edges[:, 30:34].any() and not gray_edges[:5, 30:34].any()  # the red/green border


def test_canny_thresholds_matter():
    image = cv2.GaussianBlur(_noise(64, 64), (5, 5), 0)
    low, high = canny(image, 20, 40), canny(image, 200, 255)
    np.testing.assert_array_equal(low, cv2.Canny(image, 20, 40))
    assert (low > 0).sum() > (high > 0).sum() > 0


def test_prepare_edge_map_is_canny_of_resized(tiny_pipeline, house_image):
    from controlnet_canny.params import GenerationParams

    prepared = tiny_pipeline.prepare(house_image, GenerationParams(prompt="x", image_resolution=64, seed=1,
                                                                   low_threshold=50, high_threshold=150))
    resized = cv2.resize(house_image, (64, 64), interpolation=cv2.INTER_AREA)  # 96x128 -> k = 2/3
    np.testing.assert_array_equal(prepared.image, resized)
    np.testing.assert_array_equal(prepared.edge_map, cv2.Canny(resized, 50, 150))
    assert prepared.edge_map.any()


# --- refusals, all naming the field ---------------------------------------------------------------------------

def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _refused(data: bytes, max_bytes: int = BIG, max_pixels: int = BIG, field: str = "image") -> ParamError:
    with pytest.raises(ParamError) as err:
        decode_image(data, max_bytes, max_pixels, field=field)
    assert err.value.field == field and str(err.value).startswith(field + ":")
    return err.value


def test_non_image_refused():
    assert "not a valid" in _refused(b"hello, this is not an image").message


def test_empty_refused():
    _refused(b"")


def test_truncated_png_refused():
    data = _encode(Image.fromarray(_noise(40, 50)), "PNG")
    assert "not a valid" in _refused(data[: len(data) // 2]).message


def test_truncated_jpeg_refused():
    data = _encode(Image.fromarray(_noise(40, 50)), "JPEG")
    _refused(data[: len(data) // 2])


def test_too_many_bytes_refused():
    data = _encode(Image.fromarray(_noise(40, 50)), "PNG")
    error = _refused(data, max_bytes=len(data) - 1)
    assert str(len(data) - 1) in error.message
    assert decode_image(data, len(data), BIG).shape == (40, 50, 3)  # the limit itself is allowed


def test_too_many_pixels_checked_before_decoding():
    """A header that declares 5000x5000 over 64 bytes of data: refused on the size, not on the missing data."""
    error = _refused(_png_declaring(5000, 5000), max_pixels=1_000_000)
    assert "5000x5000" in error.message and "1000000" in error.message


def test_decompression_bomb_refused():
    error = _refused(_png_declaring(20000, 20000), max_pixels=BIG * 10)
    assert "pixels" in error.message


def test_pixel_limit_itself_allowed():
    data = _encode(Image.fromarray(_noise(10, 10)), "PNG")
    assert decode_image(data, BIG, 100).shape == (10, 10, 3)
    _refused(data, max_pixels=99)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_refused(fmt):
    data = _encode(Image.fromarray(_noise(8, 8)), fmt)
    assert "PNG" in _refused(data).message


def test_custom_field_named():
    _refused(b"junk", field="--image")


def test_16bit_gray_png_with_transparent_value():
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + struct.pack(">HHH", 0x0000, 0x1234, 0x80FF)  # filter byte, then three 16-bit gray pixels
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 1, 16, 0, 0, 0, 0))
           + chunk(b"tRNS", struct.pack(">H", 0x1234)) + chunk(b"IDAT", zlib.compress(row)) + chunk(b"IEND", b""))
    out = decode_image(png, BIG, BIG)
    assert out[0].tolist() == [[0, 0, 0], [255, 255, 255], [0x80, 0x80, 0x80]]


def test_exif_orientation_is_applied():
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise) comes out upright."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red in the stored (sideways) pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="PNG", exif=exif)
    upright = decode_image(buffer.getvalue(), max_bytes=10**6, max_pixels=10**6)
    assert upright.shape == (40, 20, 3)
    assert tuple(upright[0, 10]) == (255, 0, 0) and tuple(upright[-1, 10]) == (0, 0, 0)
