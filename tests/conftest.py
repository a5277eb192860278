"""Shared fixtures: the tiny checkpoint (generated once per session, in the real key layout) and its pipeline."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "handler" / "controlnet_canny" / "configs" / "cldm_tiny.yaml"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """All tiny checkpoint formats: v1.0 .pth, the v1.1 split pair, .safetensors copies."""
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), "--out-dir", str(out), "--split", "--safetensors"],
        check=True, capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dir) -> Path:
    return tiny_dir / "control_tiny_canny.pth"


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint):
    from controlnet_canny.pipeline import ControlNetCannyPipeline

    return ControlNetCannyPipeline.load([tiny_checkpoint], TINY_CONFIG, device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def house_image() -> np.ndarray:
    """A synthetic RGB scene with clear edges (no binary test data in the repository)."""
    import cv2

    image = np.full((96, 128, 3), 200, np.uint8)
    cv2.rectangle(image, (30, 40), (98, 90), (120, 60, 40), -1)
    cv2.fillPoly(image, [np.array([[24, 42], [64, 10], [104, 42]])], (40, 40, 160))
    cv2.rectangle(image, (55, 60), (72, 90), (30, 90, 30), -1)
    return image
