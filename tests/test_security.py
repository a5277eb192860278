"""Security: token authorization on by default, every port on loopback (in config.properties and in the
running server's sockets), no model or workflow registration over HTTP (no uploaded handler ever runs), no code
from a checkpoint's pickle, request size caps. A checkpoint that would run code is also refused at a live model load in test_faults.py (its
server of broken models serves all the bad-checkpoint checks).
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest
import requests
import torch

from controlnet_canny.checkpoint import CheckpointError, read_state_dict
from live_server import HOUSE, ROOT


def properties(path: Path = ROOT / "config.properties") -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def test_shipped_config_is_locked_down():
    config = properties()
    for name in ("inference_address", "management_address", "metrics_address"):
        assert urlparse(config[name]).hostname == "127.0.0.1", name
    for name in ("grpc_inference_address", "grpc_management_address"):
        assert config[name] == "127.0.0.1", name
    assert config["disable_token_authorization"] == "false"
    assert config["enable_model_api"] == "false"
    assert config["install_py_dep_per_model"] == "false"
    assert not re.search(r"https?|s3|gs", config["allowed_urls"]), "models only from the model store"
    assert int(config["max_request_size"]) <= 32 * 2**20
    assert "enable_envvars_config" not in config or config["enable_envvars_config"] == "false"  # no TS_* overrides


def _server_processes(server) -> list[psutil.Process]:
    launcher = psutil.Process(server.process.pid)
    return [launcher, *launcher.children(recursive=True)]


def test_running_server_listens_on_loopback_only(server):
    listening = []
    for process in _server_processes(server):
        try:
            listening += [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    ports = {c.laddr.port for c in listening}
    expected = {urlparse(url).port for url in (server.inference, server.management, server.metrics)}
    assert expected <= ports, (expected, ports)
    assert len(ports) >= 5, ports  # and the two gRPC ports
    for connection in listening:
        address = ipaddress.ip_address(connection.laddr.ip)
        address = getattr(address, "ipv4_mapped", None) or address  # Java's IPv6 sockets: ::ffff:127.0.0.1
        assert address.is_loopback, connection


def test_key_file_is_private(server):
    mode = stat.S_IMODE(os.stat(server.run_dir / "key_file.json").st_mode)
    assert mode & 0o077 == 0, oct(mode)


def _refused(response: requests.Response) -> bool:
    return response.status_code == 400 and "InvalidKeyException" in response.text


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrongkey"}, {"Authorization": "wrongkey"},
                                     "management", "API"], ids=["none", "wrong", "no-bearer", "management-key", "api-key"])
def test_inference_needs_the_inference_key(server, headers):
    if isinstance(headers, str):
        headers = server.auth(headers)
    prediction = requests.post(server.url, headers=headers, files={"image": ("a.png", HOUSE)}, data={"prompt": "a"},
                               timeout=30)
    assert _refused(prediction), prediction.text
    ping = requests.get(f"{server.inference}/ping", headers=headers, timeout=10)
    assert _refused(ping), ping.text


@pytest.mark.parametrize("key", [None, "inference"])
def test_management_needs_the_management_key(server, key):
    headers = server.auth(key) if key else {}
    for method, path in [("GET", "/models"), ("GET", "/models/controlnet"),
                         ("PUT", "/models/controlnet?min_worker=0&max_worker=0")]:
        response = requests.request(method, f"{server.management}{path}", headers=headers, timeout=30)
        assert _refused(response), (method, path, response.text)
    assert server.workers()  # the PUT did not scale the model away


@pytest.mark.parametrize("url", [
    "controlnet",  # the model store's own directory, under another name
    "http://127.0.0.1:9/controlnet.mar",  # a URL (loopback, closed port: nothing is ever fetched)
    "file:///etc/passwd",
])
def test_model_registration_is_disabled(server, url):
    response = requests.post(f"{server.management}/models", params={"url": url, "model_name": "intruder"},
                             headers=server.auth("management"), timeout=30)
    # enable_model_api=false: TorchServe answers as if the method did not exist
    assert response.status_code == 405 and "MethodNotAllowedException" in response.text, response.text
    listed = requests.get(f"{server.management}/models", headers=server.auth("management"), timeout=30).json()
    assert [m["modelName"] for m in listed["models"]] == ["controlnet"]


def _workflow_archive(path: Path, marker: Path) -> Path:
    """A TorchServe workflow archive (.war) whose handler, a Python module, writes `marker` when it is imported:
    registering it would start workers that import it."""
    handler = f"open({str(marker)!r}, 'w').write('ran')\n\ndef step(data, context):\n    return data\n"
    manifest = {"createdOn": "01/01/2026 00:00:00", "archiverVersion": "0.2.15", "runtime": "python",
                "workflow": {"workflowName": "intruder", "specFile": "spec.yaml", "handler": "intruder.py"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as war:
        war.writestr("WAR-INF/MANIFEST.json", json.dumps(manifest))
        war.writestr("spec.yaml", "models:\n  min-workers: 1\n  max-workers: 1\ndag:\n  first: [second]\n")
        war.writestr("intruder.py", handler)
    return path


def test_workflow_registration_runs_no_code(server, tmp_path):
    """The workflow API cannot be switched off in TorchServe 0.12; scripts/serve.sh anchors allowed_urls to this
    deployment's model store, so no archive from anywhere else is fetched, whatever the URL's spelling."""
    marker = tmp_path / "code_ran"
    war = _workflow_archive(tmp_path / "model_store" / "intruder.war", marker)  # a directory named like a store
    escapes = "%2F".join([".."] * len(server.store.parts) + [p for p in war.parts[1:]])
    urls = [
        war.as_uri(),
        f"FILE://{war}",  # TorchServe matches allowed_urls case-insensitively
        f"file://{server.store}/{escapes}",  # out of the store by %-escaped slashes
        f"file://{server.store}/../{war.relative_to('/')}",
        "intruder.war",  # a name: looked up in the workflow store, the model store, which has none
        str(war),
    ]
    headers = server.auth("management")
    for url in urls:
        response = requests.post(f"{server.management}/workflows", params={"url": url, "workflow_name": "intruder"},
                                 headers=headers, timeout=120)
        assert not marker.exists(), f"the workflow handler ran ({url})"
        assert 400 <= response.status_code < 500, (url, response.status_code, response.text)
    models = requests.post(f"{server.management}/models", params={"url": war.as_uri()}, headers=headers, timeout=30)
    assert models.status_code == 405, models.text
    listed = requests.get(f"{server.management}/workflows", headers=headers, timeout=30).json()
    assert listed["workflows"] == [], listed
    assert [m["modelName"] for m in requests.get(f"{server.management}/models", headers=headers, timeout=30)
            .json()["models"]] == ["controlnet"]
    assert not marker.exists() and sorted(p.name for p in server.store.iterdir()) == ["controlnet"]


def test_model_deletion_is_disabled(server):
    response = requests.delete(f"{server.management}/models/controlnet", headers=server.auth("management"), timeout=30)
    assert response.status_code == 405 and "MethodNotAllowedException" in response.text, response.text
    assert server.predict({"mode": "edges", "output": "png"}).status_code == 200


class _SystemCall:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_whose_pickle_runs_code_is_refused(tmp_path):
    """A global of a blocked module (os.system): refused with its name, no advice to load it unsafely."""
    marker, path = tmp_path / "code_ran", tmp_path / "evil.pth"
    torch.save({"state_dict": _SystemCall(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    message = str(err.value)
    assert str(path) in message and "refused" in message and "GLOBAL posix.system" in message, message
    assert "weights_only" not in message
    assert not marker.exists()


def test_request_size_caps(server):
    """TorchServe refuses a body over max_request_size (32 MiB) with 413 before any handler runs, with or
    without a declared length; the handler caps the image itself (400 naming the field)."""
    too_big = requests.post(server.url, headers=server.auth(), files={"image": ("a.png", b"\0" * (33 * 2**20))},
                            data={"prompt": "a"}, timeout=60)
    assert too_big.status_code == 413

    def chunks():
        for _ in range(40):
            yield b"\0" * 2**20

    chunked = requests.post(server.url, headers={**server.auth(), "Content-Type": "application/json"}, data=chunks(),
                            timeout=60)
    assert chunked.status_code == 413
    over_image_cap = server.predict(image=b"\x89PNG" + b"\0" * 1_100_000)  # the test server's cap: 1 MB
    assert over_image_cap.status_code == 400 and over_image_cap.json()["field"] == "image"
    assert server.predict({"mode": "edges", "output": "png"}).status_code == 200  # and it serves on
