"""`fidelity.control_fidelity` / `edge_f1` on constructed edge maps and images whose answer is known."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from controlnet_canny.fidelity import control_fidelity, edge_f1
from controlnet_canny.preprocess import canny

LOW, HIGH = 100, 200  # the reference demo's defaults
SIZE = 64


def _lines(*columns: int, rows: slice = slice(8, 56)) -> np.ndarray:
    """A boolean edge map with one vertical line per column."""
    edges = np.zeros((SIZE, SIZE), dtype=bool)
    for column in columns:
        edges[rows, column] = True
    return edges


def _squares(*corners: tuple[int, int], side: int = 16) -> np.ndarray:
    """An RGB uint8 image: white filled squares on black."""
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    for top, left in corners:
        image[top:top + side, left:left + side] = 255
    return image


# --- edge_f1 on edge maps --------------------------------------------------------------------------------------

def test_identical_maps_score_one():
    edges = _lines(10, 30)
    assert edge_f1(edges, edges) == 1.0 and edge_f1(edges, edges, tolerance=0) == 1.0


def test_far_disjoint_edges_score_zero():
    assert edge_f1(_lines(10), _lines(40)) == 0.0
    assert edge_f1(_lines(10), _lines(13), tolerance=2) == 0.0  # 3 px apart: beyond 2 px


@pytest.mark.parametrize("shift", [1, 2])
def test_shifted_edge_within_tolerance_scores_one(shift):
    assert edge_f1(_lines(10 + shift), _lines(10), tolerance=2) == 1.0
    assert edge_f1(_lines(10 + shift), _lines(10), tolerance=0) == 0.0


def test_tolerance_is_euclidean():
    diagonal = np.zeros((SIZE, SIZE), dtype=bool)
    diagonal[21, 11] = True  # sqrt(2) from (20, 10)
    point = np.zeros((SIZE, SIZE), dtype=bool)
    point[20, 10] = True
    assert edge_f1(diagonal, point, tolerance=1.5) == 1.0 and edge_f1(diagonal, point, tolerance=1.4) == 0.0


def test_half_the_edges_missing_scores_two_thirds():
    # precision 1 (every drawn edge is in the control), recall 1/2: F1 = 2 * 1 * 0.5 / 1.5
    assert edge_f1(_lines(10), _lines(10, 40)) == pytest.approx(2 / 3, abs=1e-12)
    # the converse: extra edges the control does not have (precision 1/2, recall 1)
    assert edge_f1(_lines(10, 40), _lines(10)) == pytest.approx(2 / 3, abs=1e-12)


def test_precision_and_recall_counted_in_pixels():
    # control: a 48-px line; output: that line's first 12 px plus a far 36-px line.
    output = _lines(10, rows=slice(8, 20)) | _lines(40, rows=slice(20, 56))
    # exact matches only: precision = 12 / 48, recall = 12 / 48
    assert edge_f1(output, _lines(10), tolerance=0) == pytest.approx(0.25, abs=1e-12)
    # within 2 px, the control line's next 2 pixels are found too: recall = 14 / 48
    assert edge_f1(output, _lines(10), tolerance=2) == pytest.approx(2 * 12 * 14 / (48 * (12 + 14)), abs=1e-12)


def test_empty_maps_need_no_division():
    empty = np.zeros((SIZE, SIZE), dtype=bool)
    assert edge_f1(empty, empty) == 1.0  # nothing asked, nothing drawn
    assert edge_f1(_lines(10), empty) == 0.0
    assert edge_f1(empty, _lines(10)) == 0.0


def test_shape_mismatch_and_negative_tolerance_refused():
    with pytest.raises(ValueError, match="shape"):
        edge_f1(_lines(10), np.zeros((SIZE, SIZE + 1), dtype=bool))
    with pytest.raises(ValueError, match="tolerance"):
        edge_f1(_lines(10), _lines(10), tolerance=-1)


# --- control_fidelity on images -------------------------------------------------------------------------------

def test_image_whose_edges_are_the_control_map_scores_one():
    image = _squares((8, 8), (36, 36))
    control = canny(image, LOW, HIGH)
    assert control.any()
    assert control_fidelity(image, control, LOW, HIGH) == 1.0


def test_image_shifted_by_one_pixel():
    control = canny(_squares((20, 20)), LOW, HIGH)
    shifted = _squares((20, 21))
    assert control_fidelity(shifted, control, LOW, HIGH, tolerance=2) == 1.0
    strict = control_fidelity(shifted, control, LOW, HIGH, tolerance=0)
    assert 0.0 < strict < 0.9  # the square's top and bottom still overlap; its sides moved


def test_image_far_from_the_control_scores_zero():
    control = canny(_squares((4, 4), side=12), LOW, HIGH)
    assert control_fidelity(_squares((40, 40), side=12), control, LOW, HIGH) == 0.0


def test_image_missing_half_the_control_edges():
    control = canny(_squares((8, 8), (36, 36)), LOW, HIGH)  # two equal squares: equal edge pixel counts
    assert control_fidelity(_squares((8, 8)), control, LOW, HIGH) == pytest.approx(2 / 3, abs=1e-12)


def test_request_thresholds_are_used():
    """A faint square is an edge at low thresholds only: the score follows the thresholds it is given."""
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    image[20:44, 20:44] = 20  # a Sobel response of 80 (160 at the corners): under the high threshold 200
    control = canny(image, 10, 20)
    assert control.any() and not canny(image, LOW, HIGH).any()
    assert control_fidelity(image, control, 10, 20) == 1.0
    assert control_fidelity(image, control, LOW, HIGH) == 0.0  # nothing drawn at the demo's thresholds


def test_user_control_map_edges_are_the_bright_pixels():
    image = _squares((20, 20))
    edges = canny(image, LOW, HIGH)
    grey_map = np.where(edges > 0, 200, 30).astype(np.uint8)  # a user's own map: light edges on dark grey
    assert control_fidelity(image, grey_map, LOW, HIGH) == 1.0
    blurred = cv2.GaussianBlur(edges, (3, 3), 0)  # anti-aliased: only its bright core counts
    assert control_fidelity(image, blurred, LOW, HIGH) > 0.9
