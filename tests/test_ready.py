"""scripts/ready.py, the readiness signal of scripts/serve.sh, the image's HEALTHCHECK and the Kubernetes probes: ready
only while a worker of the model is READY, never on TorchServe's /ping alone."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from live_server import require_java, tiny_server, wait_until

ROOT = Path(__file__).resolve().parents[1]
READY = ROOT / "scripts" / "ready.py"


def ready(config: Path, key_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(READY), "--config", str(config), "--key-file", str(key_file)],
                          capture_output=True, text=True, timeout=30)


class FakeManagement:
    """A management API that answers describe with the given worker statuses and records the headers it got."""

    def __init__(self, statuses: list[str]):
        self.statuses, self.authorizations = statuses, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.authorizations.append(self.headers.get("Authorization"))
                body = json.dumps([{"modelName": "controlnet", "workers": [{"status": s} for s in outer.statuses]}])
                self.send_response(200 if self.path == "/models/controlnet" else 404)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def config(self, path: Path, token_auth: bool) -> Path:
        # a wildcard address, as in the container's config: asked on loopback
        path.write_text(f"management_address=http://0.0.0.0:{self.http.server_port}\n"
                        f"disable_token_authorization={'false' if token_auth else 'true'}\n")
        return path


@pytest.fixture
def management():
    fakes = []

    def make(statuses):
        fakes.append(FakeManagement(statuses))
        return fakes[-1]

    yield make
    for fake in fakes:
        fake.http.shutdown()


def test_without_token_authorization_no_key_is_needed_or_sent(management, tmp_path):
    fake = management(["UNLOADING", "READY"])
    config = fake.config(tmp_path / "config.properties", token_auth=False)
    assert ready(config, tmp_path / "absent.json").returncode == 0
    assert fake.authorizations == [None]
    fake.statuses = ["UNLOADING"]
    result = ready(config, tmp_path / "absent.json")
    assert result.returncode == 1 and "no READY worker" in result.stderr


def test_with_token_authorization_the_management_key_is_sent(management, tmp_path):
    fake = management(["READY"])
    config = fake.config(tmp_path / "config.properties", token_auth=True)
    result = ready(config, tmp_path / "absent.json")
    assert result.returncode == 1 and "no management key" in result.stderr and fake.authorizations == []
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"management": {"key": "m-key"}, "inference": {"key": "i-key"}}))
    assert ready(config, key_file).returncode == 0
    assert fake.authorizations == ["Bearer m-key"]


def test_nothing_listening_is_not_ready(tmp_path):
    from live_server import free_ports

    (port,) = free_ports(1)
    config = tmp_path / "config.properties"
    config.write_text(f"management_address=http://127.0.0.1:{port}\ndisable_token_authorization=true\n")
    assert ready(config, tmp_path / "absent.json").returncode == 1


@pytest.mark.server
def test_not_ready_until_a_worker_is_while_ping_says_healthy(tiny_checkpoint):
    if require_java():
        pytest.skip(require_java())
    with tiny_server(tiny_checkpoint, prefix="torchserve_ready_") as server:
        config, key_file = server.run_dir.parent / "config.properties", server.run_dir / "key_file.json"
        assert ready(config, key_file).returncode == 0

        # no worker: /ping stays 200 "Healthy", the model cannot serve
        scale = f"{server.management}/models/{server.model}"
        requests.put(scale, params={"min_worker": 0, "max_worker": 0},
                     headers=server.auth("management"), timeout=60).raise_for_status()
        wait_until(lambda: server.workers() == [], 60, "the worker gone")
        assert server.ping().status_code == 200
        result = ready(config, key_file)
        assert result.returncode == 1 and "no READY worker" in result.stderr

        # a worker starts and loads the model: ready.py agrees with describe at every poll, and says ready at the end
        requests.put(scale, params={"min_worker": 1, "max_worker": 1}, headers=server.auth("management"),
                     timeout=60).raise_for_status()
        def agrees_and_ready() -> bool:
            before = bool(server.ready_worker_pids())
            answer = ready(config, key_file).returncode == 0
            after = bool(server.ready_worker_pids())
            if before == after:
                assert answer == after
            return answer

        wait_until(agrees_and_ready, 120, "ready.py saying ready", interval=0.2)
        assert server.ready_worker_pids()
