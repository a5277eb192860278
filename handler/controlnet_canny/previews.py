"""Live previews: what the latents being denoised look like, for the price of a matrix product.

SD 1.5's four latent channels map nearly linearly to RGB; the factors are the ones ComfyUI's "latent2rgb" and
AUTOMATIC1111's "Approx cheap" previews use, fitted by their authors on decoded images. They apply to the latents
the sampler works on (scaled by the VAE's 0.18215) and give RGB in [-1, 1].
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch

LATENT_RGB_FACTORS = torch.tensor([  # (latent channel, R G B)
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
])
MAX_PREVIEW_SIDE = 256


def latent_rgb(latents: torch.Tensor) -> np.ndarray:
    """(N, 4, h, w) latents -> (N, h, w, 3) uint8, one pixel per latent pixel."""
    rgb = torch.einsum("nchw,cr->nhwr", latents.float().cpu(), LATENT_RGB_FACTORS)
    return ((rgb + 1) * 127.5).clamp_(0, 255).to(torch.uint8).numpy()


def preview_grid(images: Sequence[np.ndarray] | np.ndarray, max_side: int = MAX_PREVIEW_SIDE) -> np.ndarray:
    """The images of one request's samples on a near-square grid, shrunk (never enlarged) to fit max_side."""
    count = len(images)
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    height, width = images[0].shape[:2]
    grid = np.zeros((rows * height, columns * width, 3), np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    scale = max_side / max(grid.shape[:2])
    if scale >= 1:
        return grid
    size = (max(1, round(grid.shape[1] * scale)), max(1, round(grid.shape[0] * scale)))
    return cv2.resize(grid, size, interpolation=cv2.INTER_AREA)
