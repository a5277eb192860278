"""Image decoding and validation, and the reference's canny preprocessing (spec section 4)."""
from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageOps

from .params import ParamError

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_ASPECT = 4  # bounds the generated size whatever the input shape
# A progressive JPEG decodes scan by scan, each a pass over the whole image, so a small file repeating scans holds
# the worker for minutes. Encoders write at most about 10 per image (libjpeg's progression), plus a thumbnail's.
MAX_JPEG_SCANS = 32
COMPOSITE_PIXELS = 2**16  # alpha is composited in bands of about this many pixels: float32 temporaries stay small
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                  5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                  8: Image.Transpose.ROTATE_90}  # EXIF orientation to the turn that makes it upright (ImageOps')


def decode_image(data: bytes, max_bytes: int, max_pixels: int, field: str = "image") -> np.ndarray:
    """Bytes to HWC uint8 RGB. The format is read from the content, never a file name; size is checked
    from the header before any pixel is decoded (decompression bombs)."""
    return _open_image(data, max_bytes, max_pixels, field, to_rgb)


def _open_image(data: bytes, max_bytes: int, max_pixels: int, field: str, convert: Callable[[Image.Image], np.ndarray],
                modes: tuple[str, ...] | None = None) -> np.ndarray:
    """Decoded, upright and converted to an array; `modes`: the only pixel modes accepted (None: any)."""
    if not data:
        raise ParamError(field, "is empty")
    if len(data) > max_bytes:
        raise ParamError(field, f"is {len(data)} bytes; at most {max_bytes} allowed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ParamError(field, f"is {width}x{height} = {width * height} pixels; at most {max_pixels} allowed")
            if image.format == "JPEG":
                # FF DA starts a scan; entropy-coded data never holds it (an FF there is followed by 00 or a
                # restart marker), so this counts every scan (and those of an embedded thumbnail, bounded too)
                scans = data.count(b"\xff\xda")
                if scans > MAX_JPEG_SCANS:
                    raise ParamError(field, f"is a JPEG of {scans} scans; at most {MAX_JPEG_SCANS} allowed")
            if modes is not None and (image.mode not in modes or "transparency" in image.info):
                transparency = " with transparency" if "transparency" in image.info else ""
                raise ParamError(field, f"must be an 8-bit grey or RGB image, got mode {image.mode}{transparency}")
            if image.format == "WEBP" and not getattr(image, "is_animated", False):
                return _webp_pixels(data, image)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # phone photos: stored sideways, EXIF says how to turn
            return convert(image)  # inside: a malformed palette or transparency fails only at conversion
    except ParamError:
        raise
    except Image.DecompressionBombError:
        raise ParamError(field, f"declares too many pixels; at most {max_pixels} allowed") from None
    except Exception as err:  # Pillow raises many types for corrupt data; all are the client's mistake
        raise ParamError(field, f"is not a valid {'/'.join(FORMATS)} image ({type(err).__name__})") from None


def _webp_pixels(data: bytes, header: Image.Image) -> np.ndarray:
    """A still WebP, decoded by OpenCV's libwebp into one buffer (Pillow's animation decoder holds three copies of
    the canvas: a 4096 x 4096 RGBA peaks at about 250 MiB there, 134 MiB here), the same pixels as Pillow's (tested):
    RGB, alpha composited over white in place, turned upright by its EXIF orientation as `ImageOps.exif_transpose`."""
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None or pixels.ndim != 3 or pixels.shape[:2] != header.size[::-1]:
        raise ValueError("undecodable WebP")
    if pixels.shape[2] == 4:
        rgba = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA, dst=pixels)
        height, width = rgba.shape[:2]
        # in place: row r's RGB ends before row r + 1's RGBA starts, and a band is read before it is written
        rgb = rgba.reshape(-1)[:height * width * 3].reshape(height, width, 3)
        rgb = over_white(lambda top, bottom: rgba[top:bottom], rgb)
    else:
        rgb = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB, dst=pixels)
    method = EXIF_TRANSPOSE.get(header.getexif().get(ExifTags.Base.Orientation, 1))
    return rgb if method is None else np.asarray(Image.fromarray(rgb).transpose(method))


def over_white(rgba_rows: Callable[[int, int], np.ndarray], rgb: np.ndarray) -> np.ndarray:
    """An RGBA image, read as `rgba_rows(top, bottom)` (uint8), composited over white into `rgb` (H, W, 3) as the
    reference does: rgb * a + 255 * (1 - a) in float32, truncated. A band of rows at a time, so that beyond the image
    and the result only a band's float32 temporaries are held (the whole image in float32 is 16 bytes a pixel)."""
    height, width = rgb.shape[:2]
    rows = max(1, COMPOSITE_PIXELS // width)
    for top in range(0, height, rows):
        band = rgba_rows(top, min(height, top + rows)).astype(np.float32)
        alpha = band[:, :, 3:4] / 255.0
        rgb[top:top + len(band)] = (band[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return rgb


def to_rgb(image: Image.Image) -> np.ndarray:
    """Gray repeated to 3 channels; alpha composited over white as the reference (`over_white`)."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B"):  # 16-bit gray PNG: Pillow's convert would clip at 255
        wide = np.asarray(image).astype(np.int64)
        gray = Image.fromarray((wide.clip(0, 65535) >> 8).astype(np.uint8), "L")
        if "transparency" in image.info:  # tRNS names one 16-bit gray value as transparent
            alpha = np.where(wide == image.info["transparency"], 0, 255).astype(np.uint8)
            gray = Image.merge("LA", (gray, Image.fromarray(alpha, "L")))
        image = gray
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if not has_alpha:
        return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    width, height = image.size
    return over_white(lambda top, bottom: np.asarray(image.crop((0, top, width, bottom))),
                      np.empty((height, width, 3), np.uint8))


def output_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """Short side to `resolution`, each side then rounded to a multiple of 64 (numpy round: half to even)."""
    k = float(resolution) / min(height, width)
    return int(np.round(height * k / 64.0)) * 64, int(np.round(width * k / 64.0)) * 64


def checked_output_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """output_size, refused beyond MAX_ASPECT."""
    new_height, new_width = output_size(height, width, resolution)
    if max(new_height, new_width) > MAX_ASPECT * resolution:
        raise ParamError("image", f"aspect ratio {width}:{height} is beyond {MAX_ASPECT}:1")
    return new_height, new_width


def resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
    height, width = image.shape[:2]
    new_height, new_width = checked_output_size(height, width, resolution)
    k = float(resolution) / min(height, width)
    interpolation = cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA
    return cv2.resize(image, (new_width, new_height), interpolation=interpolation)


def canny(image: np.ndarray, low_threshold: int, high_threshold: int) -> np.ndarray:
    """Edge map (H, W) uint8 of the 3-channel image itself: a grayscale conversion gives a different map."""
    return cv2.Canny(image, low_threshold, high_threshold)


def _resize(image: np.ndarray, height: int, width: int, is_map: bool) -> np.ndarray:
    """Photos as the reference resizes them (Lanczos up, area down); control maps as sd-webui-controlnet's
    `high_quality_resize` picks its interpolation (cubic up, area down), without its binary-map re-thinning."""
    if image.shape[:2] == (height, width):
        return image
    bigger = height * width > image.shape[0] * image.shape[1]
    interpolation = (cv2.INTER_CUBIC if is_map else cv2.INTER_LANCZOS4) if bigger else cv2.INTER_AREA
    return cv2.resize(image, (width, height), interpolation=interpolation)


def _crop_or_fill(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centred on (height, width): cropped where larger, on the median colour of its border where smaller."""
    top, left = max(0, (image.shape[0] - height) // 2), max(0, (image.shape[1] - width) // 2)
    image = image[top:top + height, left:left + width]
    if image.shape[:2] == (height, width):
        return image
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    canvas = np.empty((height, width, *image.shape[2:]), image.dtype)
    canvas[...] = np.median(border, axis=0).astype(image.dtype)
    top, left = (height - image.shape[0]) // 2, (width - image.shape[1]) // 2
    canvas[top:top + image.shape[0], left:left + image.shape[1]] = image
    return canvas


def fit(image: np.ndarray, height: int, width: int, mode: str, is_map: bool = False) -> np.ndarray:
    """sd-webui-controlnet's resize modes, onto (height, width):
    just_resize: stretched; crop_and_resize: scaled to cover, centre cropped; resize_and_fill: scaled to fit
    inside, centred on the median colour of its border. Scaled sizes are rounded half to even, as there."""
    if mode == "just_resize":
        return _resize(image, height, width, is_map)
    scale = (max if mode == "crop_and_resize" else min)(height / image.shape[0], width / image.shape[1])
    scaled = _resize(image, int(np.round(image.shape[0] * scale)), int(np.round(image.shape[1] * scale)), is_map)
    return _crop_or_fill(scaled, height, width)


def fitted_edges(image: np.ndarray, height: int, width: int, mode: str, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, edge map) at (height, width). resize_and_fill pads the edge map, not the photo before canny
    (as sd-webui-controlnet pads the detected map), so the seam adds no edge."""
    if mode != "resize_and_fill":
        fitted = fit(image, height, width, mode)
        return fitted, canny(fitted, low, high)
    scale = min(height / image.shape[0], width / image.shape[1])
    scaled = _resize(image, int(np.round(image.shape[0] * scale)), int(np.round(image.shape[1] * scale)), False)
    return _crop_or_fill(scaled, height, width), _crop_or_fill(canny(scaled, low, high), height, width)


def decode_control_map(data: bytes, max_bytes: int, max_pixels: int, field: str = "control_image") -> np.ndarray:
    """A control map as sent: 8-bit grey (H, W) or RGB (H, W, 3). Nothing is converted (alpha, palette, 16 bits
    are refused: their conversion would change what the model sees)."""
    return _open_image(data, max_bytes, max_pixels, field, lambda image: np.ascontiguousarray(np.asarray(image)),
                       modes=("L", "RGB"))
