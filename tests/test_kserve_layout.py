"""KServe's storage layout, served the way a container would: `scripts/build_mar.py --format mar` into
model-store/, k8s/kserve/config.properties as config/config.properties (its ports swapped for free loopback
ones), TorchServe started by `scripts/serve.sh foreground` with TS_CONFIG and MODEL_STORE pointing there.
Checks the archive serves on TorchServe's KServe v1 path (what KServe's model server forwards to) and on
the native one, and that SIGTERM (a pod's deletion, `docker stop`) stops everything within seconds.
"""
from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from live_server import HOUSE, ROOT, TINY_CONFIG, free_ports, require_java, wait_until


@pytest.fixture(scope="module")
def kserve(tiny_checkpoint):
    if require_java():
        pytest.skip(require_java())
    with tempfile.TemporaryDirectory(prefix="kserve_layout_") as tmp:
        tmp = Path(tmp)
        store, config = tmp / "mnt" / "model-store", tmp / "mnt" / "config" / "config.properties"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--format", "mar",
                        "--checkpoint", str(tiny_checkpoint), "--arch-config", str(TINY_CONFIG),
                        "--export-path", str(store), "--set", "handler.threads=1"], check=True, capture_output=True)
        inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
        text = (ROOT / "k8s" / "kserve" / "config.properties").read_text()
        for name, value in [("inference_address", f"http://127.0.0.1:{inference}"),
                            ("management_address", f"http://127.0.0.1:{management}"),
                            ("metrics_address", f"http://127.0.0.1:{metrics}"),
                            ("grpc_inference_port", grpc_inference), ("grpc_management_port", grpc_management),
                            ("model_store", store)]:
            text, count = re.subn(rf"^{name}=.*$", f"{name}={value}", text, flags=re.M)
            assert count == 1, name
        config.parent.mkdir(parents=True)
        config.write_text(text)
        (tmp / "tmp").mkdir()
        env = {**os.environ, "TS_CONFIG": str(config), "MODEL_STORE": str(store), "RUN_DIR": str(tmp / "run"),
               "TMPDIR": str(tmp / "tmp"), "TEMP": str(tmp / "tmp")}
        process = subprocess.Popen([str(ROOT / "scripts" / "serve.sh"), "foreground"], env=env, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{inference}"
        try:
            wait_until(lambda: requests.get(f"{base}/ping", timeout=5).json()["status"] == "Healthy"
                       and requests.get(f"http://127.0.0.1:{management}/models/controlnet", timeout=5).json()[0]
                       ["workers"][0]["status"] == "READY", 180, "the archived model's worker becoming READY",
                       process, tmp / "run" / "logs" / "ts_log.log")
            yield base, store, process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_archive_holds_everything(kserve):
    _, store, _ = kserve
    assert sorted(p.name for p in store.iterdir()) == ["controlnet.mar"]
    with zipfile.ZipFile(store / "controlnet.mar") as archive:
        names = set(archive.namelist())
        assert {"MAR-INF/MANIFEST.json", "controlnet_handler.py", "serving.py", "model-config.yaml",
                "control_tiny_canny.pth", "cldm_tiny.yaml", "controlnet_canny/pipeline.py"} <= names
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())  # no deflating weights
        config = yaml.safe_load(archive.read("model-config.yaml"))
    assert config["handler"]["checkpoints"] == ["control_tiny_canny.pth"]


def test_kserve_v1_path_and_native_path_serve(kserve):
    base, _, _ = kserve
    body = {"prompt": "a house", "ddim_steps": 2, "seed": 4, "output": "json", "image": base64.b64encode(HOUSE).decode()}
    # KServe's model server forwards the client's JSON to TorchServe's /v1/models/<name>:predict, no key.
    forwarded = requests.post(f"{base}/v1/models/controlnet:predict", json=body, timeout=120)
    assert forwarded.status_code == 200, forwarded.text
    assert forwarded.json()["parameters"]["seeds"] == [4]
    native = requests.post(f"{base}/predictions/controlnet", files={"image": ("a.png", HOUSE)},
                           data={"prompt": "a house", "ddim_steps": 2, "seed": 4, "output": "json"}, timeout=120)
    assert native.status_code == 200 and native.json()["images"] == forwarded.json()["images"]
    refused = requests.post(f"{base}/v1/models/controlnet:predict", json={"instances": [body]}, timeout=60)
    assert refused.status_code == 400 and refused.json()["field"] == "instances"  # no KServe envelope


def test_sigterm_stops_everything(kserve):
    _, _, process = kserve
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    assert any("java" in p.name() for p in family)
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert time.monotonic() - start < 30
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, alive
