"""Shared fixtures: the tiny checkpoint (generated once per session, in the real key layout) and its pipeline."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "handler" / "controlnet_canny" / "configs" / "cldm_tiny.yaml"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tiny model's forwards are too small to split: on a shared 2-core machine two intra-op threads
    slow them down 100x (one also leaves a core to the TorchServe worker of the integration tests)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _calibration_cache(tmp_path_factory):
    """The CPU backend caches its measured choices under $XDG_CACHE_HOME: the tests' own, removed with them (also
    for the TorchServe workers they start, which inherit the environment)."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = before


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


BATCH_DELAY_MS = 200  # long enough for concurrent test requests to meet in one batch, short for the others


@pytest.fixture(scope="session")
def server(tiny_checkpoint):
    """One TorchServe for the integration tests (test_server, test_hostile_input, test_security, test_faults'
    worker tests): the tiny model on loopback, token authorization on, a 1 MB image cap; always stopped."""
    from live_server import require_java, tiny_server

    if require_java():
        pytest.skip(require_java())
    with tiny_server(tiny_checkpoint, sets=[f"maxBatchDelay={BATCH_DELAY_MS}", "handler.max_image_bytes=1000000"]) as ts:
        yield ts


@pytest.fixture(scope="session")
def house_image() -> np.ndarray:
    """A small synthetic RGB scene with clear edges (tests/data/house.png, also used by `make generate`)."""
    import cv2

    return cv2.cvtColor(cv2.imread(str(ROOT / "tests" / "data" / "house.png")), cv2.COLOR_BGR2RGB)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    """The largest difference of two uint8 images, in levels."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def clearly_differ(a: np.ndarray, b: np.ndarray) -> bool:
    """More than the +-1 level that summation order can explain (the tiny model's effects are modest)."""
    return max_diff(a, b) > 3
