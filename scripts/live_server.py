"""A throwaway TorchServe on loopback: the model built from a checkpoint with scripts/build_mar.py, the
repository's config.properties on free ports, started by scripts/serve.sh (so with the configuration it derives:
archives only from this model store), token authorization on, everything it writes (key file, logs, pid file,
sockets, its temporary files, the model store) in one directory, and always stopped.

Used by scripts/load.py and scripts/soak.py and by the integration tests (tests/test_server.py, the hostile-input,
security and reliability tests); free of pytest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parents[1]
SERVE_SH = ROOT / "scripts" / "serve.sh"
HOUSE = (ROOT / "tests" / "data" / "house.png").read_bytes()
TINY_CONFIG = ROOT / "handler" / "controlnet_canny" / "configs" / "cldm_tiny.yaml"
STEPS = 4
MODEL = "controlnet"


@dataclass
class Server:
    inference: str
    management: str
    metrics: str
    run_dir: Path  # serve.sh's RUN_DIR, TorchServe's working directory: key_file.json, logs/, tmp/
    store: Path  # the model store
    process: subprocess.Popen
    model: str = MODEL

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def temp_dir(self) -> Path:
        """TMPDIR / TEMP of the launcher, the JVM and the workers (serve.sh's choice)."""
        return self.run_dir / "tmp"

    def key(self, kind: str) -> str:
        return json.loads((self.run_dir / "key_file.json").read_text())[kind]["key"]

    def auth(self, kind: str = "inference") -> dict:
        return {"Authorization": f"Bearer {self.key(kind)}"}

    @property
    def url(self) -> str:
        return f"{self.inference}/predictions/{self.model}"

    def predict(self, fields: dict | None = None, image: bytes | None = HOUSE, headers: dict | None = None,
                timeout: float = 120, **kwargs) -> requests.Response:
        """A multipart request: the image as a file part, the fields as text parts (None: left out)."""
        files = {"image": ("photo.bin", image)} if image is not None else None
        data = {k: v for k, v in {"prompt": "a house", "ddim_steps": STEPS, **(fields or {})}.items() if v is not None}
        return requests.post(self.url, data=data, files=files, headers={**self.auth(), **(headers or {})},
                             timeout=timeout, **kwargs)

    def describe(self, model: str | None = None) -> dict:
        response = requests.get(f"{self.management}/models/{model or self.model}", headers=self.auth("management"),
                                timeout=10)
        response.raise_for_status()
        return response.json()[0]

    def workers(self, model: str | None = None) -> list[dict]:
        return self.describe(model)["workers"]

    def ready_worker_pids(self, model: str | None = None) -> list[int]:
        return [w["pid"] for w in self.workers(model) if w["status"] == "READY" and w.get("pid", -1) > 0]

    def ping(self) -> requests.Response:
        return requests.get(f"{self.inference}/ping", headers=self.auth(), timeout=10)

    def model_log(self) -> str:
        return _read(self.log_dir / "model_log.log")

    def ts_log(self) -> str:
        return _read(self.log_dir / "ts_log.log")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def config_with_free_ports(path: Path, ports: list[int], settings: Mapping[str, str] | None = None) -> tuple[str, str, str]:
    """The repository's config.properties with free ports (the settings under test stay the shipped ones),
    `settings` replacing or adding lines."""
    names = ["inference_address", "management_address", "metrics_address", "grpc_inference_port", "grpc_management_port"]
    values = [f"http://127.0.0.1:{p}" for p in ports[:3]] + [str(p) for p in ports[3:]]
    text = (ROOT / "config.properties").read_text()
    for name, value in [*zip(names, values), *(settings or {}).items()]:
        text, count = re.subn(rf"^{re.escape(name)}=.*$", lambda _: f"{name}={value}", text, flags=re.M)
        if count == 0:
            text += f"\n{name}={value}\n"
    path.write_text(text)
    return values[0], values[1], values[2]


def wait_until(condition, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None,
               interval: float = 0.5):
    """Polls `condition` (exceptions of a server not up yet count as False) until true; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            if condition():
                return
        except (OSError, ValueError, KeyError, IndexError, requests.RequestException):
            pass
        time.sleep(interval)
    tail = _read(log)[-3000:] if log is not None else ""
    raise AssertionError(f"{what} did not happen within {timeout} s\n{tail}")


def build_model(store: Path, checkpoints: Sequence[Path], name: str = MODEL, sets: Sequence[str] = (),
                arch: Path = TINY_CONFIG) -> Path:
    """scripts/build_mar.py into `store`; `sets` are its --set KEY=VALUE overrides."""
    command = [sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--arch-config", str(arch),
               "--export-path", str(store), "--model-name", name]
    for checkpoint in checkpoints:
        command += ["--checkpoint", str(checkpoint)]
    for setting in sets:
        command += ["--set", setting]
    subprocess.run(command, check=True, capture_output=True)
    return store / name


def require_java() -> str | None:
    """None when TorchServe can run, else why not."""
    return None if shutil.which("java") else "TorchServe needs Java 11 or later on PATH"


@contextmanager
def running_torchserve(store: Path, workdir: Path, settings: Mapping[str, str] | None = None,
                       ready: str | None = MODEL, timeout: float = 180) -> Iterator[Server]:
    """`scripts/serve.sh foreground` on the model store, with RUN_DIR `workdir`/run; waits until model `ready` has
    a READY worker (None: only until the management API answers); stops it and every process it started."""
    run_dir = workdir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    inference, management, metrics = config_with_free_ports(workdir / "config.properties", free_ports(5), settings)
    env = {**os.environ, "RUN_DIR": str(run_dir), "TS_CONFIG": str(workdir / "config.properties"),
           "MODEL_STORE": str(store)}
    process = subprocess.Popen([str(SERVE_SH), "foreground"], cwd=workdir, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = Server(inference, management, metrics, run_dir, store, process)
        log = server.log_dir / "ts_log.log"
        if ready is None:
            wait_until(lambda: (run_dir / "key_file.json").exists() and requests.get(
                f"{management}/models", headers=server.auth("management"), timeout=5).ok,
                timeout, "the management API answering", process, log)
        else:
            wait_until(lambda: any(w["status"] == "READY" for w in server.workers(ready)), timeout,
                       f"model {ready}'s worker becoming READY", process, log)
        yield server
    finally:
        try:
            subprocess.run([str(SERVE_SH), "stop"], cwd=workdir, env=env, capture_output=True, timeout=60)
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:  # serve.sh, the launcher, the JVM and the workers share this process group, which we created
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


@contextmanager
def tiny_server(checkpoint: Path, sets: Sequence[str] = (), settings: Mapping[str, str] | None = None,
                prefix: str = "torchserve_test_", timeout: float = 180) -> Iterator[Server]:
    """The tiny model (one torch thread per worker) on a throwaway TorchServe in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        tmp = Path(tmp)
        build_model(tmp / "model_store", [checkpoint], sets=["handler.threads=1", *sets])
        with running_torchserve(tmp / "model_store", tmp, settings, timeout=timeout) as server:
            yield server


def pipelined(url: str, headers: Mapping[str, str], requests_fields: Sequence[Mapping], timeout: float = 300
              ) -> list[tuple[int, dict[str, str], bytes]]:
    """Multipart POSTs of HOUSE with each of `requests_fields`, written back to back on one HTTP/1.1 connection in
    one write (HTTP pipelining: the server has them all before it answers any); the answers as they come on that
    connection: status, headers (lower-case names), body (de-chunked)."""
    target = urlsplit(url)
    wire = b""
    for fields in requests_fields:
        prepared = requests.Request("POST", url, headers=dict(headers), data=dict(fields),
                                    files={"image": ("house.png", HOUSE)}).prepare()
        head = [f"POST {target.path} HTTP/1.1", f"Host: {target.netloc}",
                *(f"{name}: {value}" for name, value in prepared.headers.items())]
        wire += ("\r\n".join(head) + "\r\n\r\n").encode() + prepared.body
    with socket.create_connection((target.hostname, target.port), timeout=timeout) as connection:
        connection.sendall(wire)
        stream = connection.makefile("rb")
        return [_read_response(stream) for _ in requests_fields]


def _read_response(stream) -> tuple[int, dict[str, str], bytes]:
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline().decode()) not in ("\r\n", ""):
        name, value = line.split(":", 1)
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while (size := int(stream.readline().split(b";")[0], 16)) > 0:
            body += stream.read(size)
            stream.readline()
        stream.readline()
    else:
        body = stream.read(int(headers.get("content-length", 0)))
    return status, headers, body


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with almost no pixel data (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
