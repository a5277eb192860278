"""sd-webui-controlnet's resize modes (`preprocess.fit`) on constructed images whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from controlnet_canny.preprocess import fit, fitted_edges


def _bands(height: int, width: int) -> np.ndarray:
    """Vertical bands of one colour per column block: where each column lands shows the geometry."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 4] = (255, 0, 0)
    image[:, width // 4: width // 2] = (0, 255, 0)
    image[:, width // 2: 3 * width // 4] = (0, 0, 255)
    image[:, 3 * width // 4:] = (255, 255, 255)
    return image


def test_just_resize_stretches():
    out = fit(_bands(40, 80), 40, 40, "just_resize")
    assert out.shape == (40, 40, 3)
    assert (out[:, 2] == (255, 0, 0)).all() and (out[:, -3] == (255, 255, 255)).all()  # all four bands kept


def test_crop_and_resize_covers_and_crops_the_centre():
    out = fit(_bands(40, 80), 40, 40, "crop_and_resize")  # scale 1, the centre 40 columns
    np.testing.assert_array_equal(out, _bands(40, 80)[:, 20:60])
    out = fit(_bands(20, 40), 40, 40, "crop_and_resize")  # scaled x2 to 40x80, then cropped
    assert out.shape == (40, 40, 3)
    assert (out[:, 2] == (0, 255, 0)).all() and (out[:, -3] == (0, 0, 255)).all()  # the outer bands cut off


def test_resize_and_fill_fits_inside_on_the_border_median():
    image = np.full((20, 40, 3), 30, np.uint8)
    image[5:15, 10:30] = 200
    out = fit(image, 40, 40, "resize_and_fill")  # scaled x1 (fits), centred, 10 rows above and below
    assert out.shape == (40, 40, 3)
    np.testing.assert_array_equal(out[10:30], image)
    assert (out[:10] == 30).all() and (out[30:] == 30).all()  # the median colour of the border


def test_resize_and_fill_rounds_the_scaled_size_as_webui():
    out = fit(np.full((30, 70, 3), 9, np.uint8), 64, 64, "resize_and_fill")  # scale 64/70: 27.43 -> 27 rows
    assert out.shape == (64, 64, 3) and (out == 9).all()


def test_maps_keep_their_channels():
    assert fit(np.zeros((30, 50), np.uint8), 64, 64, "resize_and_fill", is_map=True).shape == (64, 64)
    assert fit(np.zeros((30, 50, 3), np.uint8), 64, 64, "crop_and_resize", is_map=True).shape == (64, 64, 3)


def test_fill_pads_the_edge_map_not_the_photo():
    """A photo whose border differs from its inside: filling the photo before canny would draw the seam."""
    image = np.full((32, 64, 3), 250, np.uint8)
    image[:, :2] = image[:, -2:] = 0  # a dark border; median of the border: 250 (most of it)
    fitted, edges = fitted_edges(image, 64, 64, "resize_and_fill", 100, 200)
    assert fitted.shape == (64, 64, 3) and edges.shape == (64, 64)
    assert not edges[:16].any() and not edges[48:].any()  # the filled rows: no edge at the seam
    assert edges[16:48].any()  # the photo's own edges remain


@pytest.mark.parametrize("mode", ["crop_and_resize", "just_resize", "resize_and_fill"])
def test_same_aspect_same_size_is_identity(mode):
    image = _bands(64, 128)
    np.testing.assert_array_equal(fit(image, 64, 128, mode), image)
