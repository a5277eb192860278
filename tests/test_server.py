"""Integration tests against a real TorchServe on loopback, started once for the module on free ports with
the tiny model (64x64, few DDIM steps), token authorization on, and always stopped.

Everything TorchServe writes (key file, logs, its pid file, sockets, the model store) stays in one temporary
directory, removed at the end.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from controlnet_canny.bundle import read_png_parameters
from controlnet_canny.config import CONFIG_DIR
from controlnet_canny.preprocess import canny, decode_image, resize_image

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOUSE = (ROOT / "tests" / "data" / "house.png").read_bytes()
STEPS = 4
BATCH_DELAY_MS = 200  # long enough for concurrent test requests to meet in one batch, short for the others


@dataclass
class Server:
    inference: str
    management: str
    metrics: str
    run_dir: Path
    log_dir: Path

    def key(self, kind: str) -> str:
        return json.loads((self.run_dir / "key_file.json").read_text())[kind]["key"]

    def auth(self, kind: str = "inference") -> dict:
        return {"Authorization": f"Bearer {self.key(kind)}"}

    def predict(self, fields: dict | None = None, image: bytes | None = HOUSE, headers: dict | None = None,
                **kwargs) -> requests.Response:
        """A multipart request: the image as a file part, the fields as text parts (None: left out)."""
        files = {"image": ("photo.bin", image)} if image is not None else None
        data = {k: v for k, v in {"prompt": "a house", "ddim_steps": STEPS, **(fields or {})}.items() if v is not None}
        return requests.post(f"{self.inference}/predictions/controlnet", data=data, files=files,
                             headers={**self.auth(), **(headers or {})}, timeout=120, **kwargs)

    def describe(self) -> dict:
        response = requests.get(f"{self.management}/models/controlnet", headers=self.auth("management"), timeout=10)
        response.raise_for_status()
        return response.json()[0]

    def model_log(self) -> str:
        return (self.log_dir / "model_log.log").read_text(errors="replace")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def config_with_free_ports(path: Path, ports: list[int]) -> tuple[str, str, str]:
    """The repository's config.properties with free ports: the settings under test stay the shipped ones."""
    names = ["inference_address", "management_address", "metrics_address", "grpc_inference_port", "grpc_management_port"]
    values = [f"http://127.0.0.1:{p}" for p in ports[:3]] + [str(p) for p in ports[3:]]
    text = (ROOT / "config.properties").read_text()
    for name, value in zip(names, values):
        text, count = re.subn(rf"^{name}=.*$", f"{name}={value}", text, flags=re.M)
        assert count == 1, name
    path.write_text(text)
    return values[0], values[1], values[2]


def wait_until(condition, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            if condition():
                return
        except (OSError, ValueError, KeyError, requests.RequestException):
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"{what} did not happen within {timeout} s\n{tail}")


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 11 or later on PATH")
    with tempfile.TemporaryDirectory(prefix="torchserve_test_") as tmp:
        tmp = Path(tmp)
        store, run_dir, temp, logs = (tmp / name for name in ("model_store", "run", "tmp", "logs"))
        for directory in (store, run_dir, temp, logs):
            directory.mkdir()
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--checkpoint", str(tiny_checkpoint),
             "--arch-config", str(CONFIG_DIR / "cldm_tiny.yaml"), "--export-path", str(store),
             "--set", f"maxBatchDelay={BATCH_DELAY_MS}", "--set", "handler.threads=1",
             "--set", "handler.max_image_bytes=1000000"],
            check=True, capture_output=True,
        )
        inference, management, metrics = config_with_free_ports(tmp / "config.properties", free_ports(5))
        # TEMP: the JVM's temporary directory (worker sockets, model links); TMPDIR: the launcher's pid file.
        env = {**os.environ, "TMPDIR": str(temp), "TEMP": str(temp), "LOG_LOCATION": str(logs), "METRICS_LOCATION": str(logs)}
        command = [str(BIN / "torchserve"), "--ts-config", str(tmp / "config.properties"), "--model-store", str(store), "--ncs"]
        process = subprocess.Popen([*command, "--start", "--foreground"], cwd=run_dir, env=env, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ts = Server(inference, management, metrics, run_dir, logs)
            wait_until(lambda: any(w["status"] == "READY" for w in ts.describe()["workers"]), 180,
                       "the model's worker becoming READY", process, logs / "ts_log.log")
            yield ts
        finally:
            subprocess.run([str(BIN / "torchserve"), "--stop"], cwd=run_dir, env=env, capture_output=True, timeout=60)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            try:  # the launcher, the JVM and the workers share this process group, which we created
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(int)


def test_generation_as_zip_bundle(server):
    response = server.predict({"seed": 123, "num_samples": 2})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/zip"
    assert response.headers["X-Seeds"] == "123,124"
    with zipfile.ZipFile(io.BytesIO(response.content)) as bundle:
        assert bundle.namelist() == ["sample_00.png", "sample_01.png", "edge_map.png", "params.yaml"]
        params = yaml.safe_load(bundle.read("params.yaml"))
        assert [read_png_parameters(bundle.read(f"sample_0{i}.png"))["seed"] for i in (0, 1)] == [123, 124]
        assert read_png_parameters(bundle.read("edge_map.png"))["seeds"] == [123, 124]
        assert png_pixels(bundle.read("sample_00.png")).shape == (64, 64, 3)
    assert params["seeds"] == [123, 124] and params["seed"] == 123
    assert params["model"] == "controlnet" and params["model_version"] == "1.0"
    assert params["ddim_steps_visited"] == STEPS and params["image_resolution"] == 64
    expected = {"prompt", "a_prompt", "n_prompt", "num_samples", "image_resolution", "ddim_steps", "guess_mode",
                "strength", "scale", "seed", "eta", "low_threshold", "high_threshold"}
    assert expected <= set(params)


def test_json_input_and_every_output_format(server):
    """JSON with a base64 image; the format by the output field or the Accept header; all agree."""
    body = {"prompt": "a house", "ddim_steps": STEPS, "seed": 9, "image": base64.b64encode(HOUSE).decode()}
    url = f"{server.inference}/predictions/controlnet"
    as_json = requests.post(url, json={**body, "output": "json"}, headers=server.auth(), timeout=120)
    as_png = requests.post(url, json=body, headers={**server.auth(), "Accept": "image/png"}, timeout=120)
    as_zip = requests.post(url, json=body, headers=server.auth(), timeout=120)
    assert [r.status_code for r in (as_json, as_png, as_zip)] == [200, 200, 200]
    assert as_png.headers["Content-Type"] == "image/png" and as_png.headers["X-Seeds"] == "9"
    result = as_json.json()
    assert result["parameters"]["seeds"] == [9]
    assert read_png_parameters(as_png.content)["seed"] == 9
    with zipfile.ZipFile(io.BytesIO(as_zip.content)) as bundle:
        from_zip = bundle.read("sample_00.png")
    assert base64.b64decode(result["images"][0]) == as_png.content == from_zip  # same seed, same bytes


@pytest.mark.parametrize("fields, image, field, fragment", [
    ({"ddim_steps": 500}, HOUSE, "ddim_steps", "between 1 and 100"),
    ({"image_resolution": 100}, HOUSE, "image_resolution", "multiple of 64"),
    ({"colour": "red"}, HOUSE, "colour", "unknown field"),
    ({"prompt": None}, HOUSE, "prompt", "required"),
    ({}, b"GIF89a not really", "image", "not a valid"),
    ({}, None, "image", "required"),
    ({}, b"\0" * 1_200_000, "image", "at most 1000000"),
    ({"num_samples": 2, "output": "png"}, HOUSE, "output", "num_samples"),
    ({"stream": "true", "output": "zip"}, HOUSE, "stream", "output=json"),
])
def test_client_mistakes_get_a_400_naming_the_field(server, fields, image, field, fragment):
    response = server.predict(fields, image=image)
    assert response.status_code == 400, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()
    assert error["field"] == field and fragment in error["error"]


def test_bad_json_bomb_and_missing_token(server):
    url = f"{server.inference}/predictions/controlnet"
    bad_json = requests.post(url, data=b'{"prompt":', headers={**server.auth(), "Content-Type": "application/json"}, timeout=60)
    assert bad_json.status_code == 400 and bad_json.json()["field"] == "body"
    # A PNG header declaring 30000 x 30000 pixels: refused before any pixel is decoded.
    bomb = png_header_only(30000, 30000)
    response = server.predict(image=bomb)
    assert response.status_code == 400 and "pixels" in response.json()["error"]
    no_token = requests.post(url, files={"image": ("x.png", HOUSE)}, data={"prompt": "a"}, timeout=60)
    assert no_token.status_code == 400 and "Token Authorization failed" in no_token.text  # TorchServe's own answer


def png_header_only(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_edges_mode_is_fast_and_exact(server):
    start = time.perf_counter()
    response = server.predict({"mode": "edges", "output": "png", "low_threshold": 50, "high_threshold": 150})
    elapsed = time.perf_counter() - start
    assert response.status_code == 200, response.text
    assert elapsed < 1.0, f"edge map took {elapsed:.2f} s"
    expected = canny(resize_image(decode_image(HOUSE, 10**7, 10**7), 64), 50, 150)
    assert np.array_equal(png_pixels(response.content), expected)
    assert "X-Seeds" not in response.headers


def test_streamed_progress_then_result(server):
    with server.predict({"stream": "true", "seed": 5}, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/x-ndjson"
        assert response.headers["Transfer-Encoding"] == "chunked" and response.headers["X-Seeds"] == "5"
        events = [json.loads(line) for line in response.iter_lines() if line]
    assert [e["step"] for e in events[:-1]] == list(range(1, STEPS + 1))
    assert all(e == {"event": "progress", "step": e["step"], "steps": STEPS} for e in events[:-1])
    assert events[-1]["event"] == "result" and events[-1]["parameters"]["seeds"] == [5]
    assert len(events[-1]["images"]) == 1


def result_images(response: requests.Response) -> list[np.ndarray]:
    """The samples of a JSON answer, or of the last line of a streamed one."""
    lines = response.content.splitlines()
    result = json.loads(lines[-1]) if response.headers["Content-Type"] == "application/x-ndjson" else response.json()
    return [png_pixels(base64.b64decode(png)) for png in result["images"]]


def test_batch_isolates_a_bad_request_and_equals_single_requests(server):
    requests_fields = [
        {"seed": 11, "stream": "true"},  # streams its progress while batched with the others
        {"seed": 22, "strength": 0.6, "num_samples": 2, "prompt": "a barn", "output": "json"},
        {"seed": 33, "scale": 99},  # out of range
    ]
    log_lines = server.model_log().count("sampler batch:")
    responses: list = [None] * len(requests_fields)
    barrier = threading.Barrier(len(requests_fields))

    def send(index: int) -> None:
        barrier.wait()
        responses[index] = server.predict(requests_fields[index])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests_fields))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in responses] == [200, 200, 400]
    assert responses[2].json()["field"] == "scale"
    wait_until(lambda: server.model_log().count("sampler batch:") > log_lines, 10, "the batch log line")
    assert "sampler batch: 2 request(s), 3 image(s)" in server.model_log()  # both good ones sampled together

    for fields, batched in zip(requests_fields[:2], responses[:2]):
        alone = server.predict({**fields, "stream": None, "output": "json"})
        assert alone.status_code == 200
        for together, single in zip(result_images(batched), result_images(alone), strict=True):
            assert np.abs(together - single).max() <= 1


def test_scaling_workers_one_two_one(server):
    def scale(workers: int) -> None:
        response = requests.put(
            f"{server.management}/models/controlnet",
            params={"min_worker": workers, "max_worker": workers, "synchronous": "true"},
            headers=server.auth("management"), timeout=180,
        )
        assert response.status_code in (200, 202), response.text
        wait_until(lambda: [w["status"] for w in server.describe()["workers"]] == ["READY"] * workers, 120,
                   f"{workers} READY worker(s)")
        generated = server.predict({"seed": workers})
        assert generated.status_code == 200, generated.text

    for workers in (2, 1):
        scale(workers)


def scrape(server) -> dict[str, list[tuple[dict, float]]]:
    samples: dict[str, list[tuple[dict, float]]] = {}
    text = requests.get(f"{server.metrics}/metrics", timeout=10).text
    for name, labels, value in re.findall(r"^(\w+)\{(.*?),?\} (\S+)$", text, re.M):
        samples.setdefault(name, []).append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return samples


def test_prometheus_metrics(server):
    assert server.predict({"num_samples": 2}).status_code == 200
    assert server.predict({"ddim_steps": 0}).status_code == 400

    def reported() -> bool:
        metrics = scrape(server)
        return "ControlNetImagesGenerated" in metrics and any(
            labels.get("Reason") == "ddim_steps" for labels, _ in metrics.get("ControlNetErrors", []))

    wait_until(reported, 15, "the handler's metrics on /metrics")
    metrics = scrape(server)
    total = lambda name, **want: sum(v for labels, v in metrics[name] if want.items() <= labels.items())  # noqa: E731
    assert total("ControlNetImagesGenerated") >= 2
    assert total("ControlNetDenoisingSteps") >= STEPS and total("ControlNetDenoisingSteps") % STEPS == 0
    assert total("ControlNetErrors", Reason="ddim_steps") >= 1
    for phase in ("preprocess", "text", "sampling", "decoding"):
        assert total("ControlNetPhaseSeconds_count", Phase=phase) >= 1, phase
    assert 0 < total("ControlNetPhaseSeconds_sum", Phase="sampling") < 60
    assert total("ts_inference_requests_total") >= 2  # TorchServe's own metrics are still there


def run_client(server, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "scripts" / "client.py"), "--url", server.inference,
               "--management-url", server.management, "--key-file", str(server.run_dir / "key_file.json"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_client_generate_ping_and_ready(server, tmp_path):
    assert run_client(server, "ping").returncode == 0
    assert run_client(server, "ready").returncode == 0
    done = run_client(server, "generate", "--image", str(ROOT / "tests" / "data" / "house.png"), "--prompt", "a house",
                      "--param", f"ddim_steps={STEPS}", "--param", "seed=3", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["edge_map.png", "params.json", "sample_00.png"]
    assert json.loads((tmp_path / "out" / "params.json").read_text())["seeds"] == [3]
    assert f"{STEPS}/{STEPS}" in done.stderr  # the progress bar reached the end


def test_client_sweep_writes_a_manifest_and_resumes(server, tmp_path):
    out = tmp_path / "dataset"
    common = ["sweep", "--image", str(ROOT / "tests" / "data" / "house.png"), "--out", str(out),
              "--prompt", "a house", "--strength", "0.5", "1.0", "--param", "ddim_steps=2", "--concurrency", "2"]
    first = run_client(server, *common, "--seed", "1:2:1")
    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert {(r["seed"], r["strength"]) for r in rows} == {(1, 0.5), (1, 1.0), (2, 0.5), (2, 1.0)}
    for row in rows:
        assert read_png_parameters((out / row["file"]).read_bytes())["seed"] == row["seed"]
        assert row["ddim_steps"] == 2 and row["prompt"] == "a house" and row["model"] == "controlnet"
    first_files = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    second = run_client(server, *common, "--seed", "1:3:1")
    assert second.returncode == 0, second.stderr
    assert "6 items in the grid, 4 already in" in second.stdout
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and sorted(r["seed"] for r in rows) == [1, 1, 2, 2, 3, 3]
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in first_files.items())  # not redone
