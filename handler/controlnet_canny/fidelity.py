"""`control_fidelity`: how closely a generated image follows its control map, one number per sample for filtering
synthetic data sets. No reference system defines it; the definition is here.

The output image is re-cannied with the request's thresholds (the same `preprocess.canny` that made the control
map), and its edges are compared with the control map's as an F1 score within a pixel tolerance:
- precision: the fraction of output edge pixels within `tolerance` pixels (Euclidean) of a control edge pixel;
- recall: the fraction of control edge pixels within `tolerance` pixels of an output edge pixel;
- F1 = 2 P R / (P + R), in [0, 1].
The tolerance lets an edge drawn a pixel or two away from the control's still count as following it.

Empty maps, where P or R would divide by zero: two empty maps agree (1.0, nothing asked and nothing drawn);
one empty map against a non-empty one is 0.0.
"""
from __future__ import annotations

import cv2
import numpy as np

from .preprocess import canny

DEFAULT_TOLERANCE = 2.0  # pixels
EDGE_LEVEL = 128  # a control map's edge pixels: white (canny's are 255), whatever grey a user's own map uses


def _distance_to(edges: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance from every pixel to the nearest True pixel of `edges` (which has one)."""
    return cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def edge_f1(edges: np.ndarray, reference: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> float:
    """F1 of boolean edge map `edges` against `reference` (same shape), edge pixels matching within `tolerance`."""
    if edges.shape != reference.shape:
        raise ValueError(f"edge maps differ in shape: {edges.shape} and {reference.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    if not edges.any() or not reference.any():
        return float(not edges.any() and not reference.any())
    precision = float(np.mean(_distance_to(reference)[edges] <= tolerance))
    recall = float(np.mean(_distance_to(edges)[reference] <= tolerance))
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def control_fidelity(
    image: np.ndarray, control_map: np.ndarray, low_threshold: int, high_threshold: int,
    tolerance: float = DEFAULT_TOLERANCE,
) -> float:
    """F1 of `image`'s (H, W, 3) uint8 canny edges against `control_map` (H, W) uint8 (edges >= 128)."""
    return edge_f1(canny(image, low_threshold, high_threshold) > 0, control_map >= EDGE_LEVEL, tolerance)
