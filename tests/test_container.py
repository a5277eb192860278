"""The container image (`make image`), run with podman the way docs/serving.md runs it: a read-only root file system
with tmpfs where TorchServe writes, every capability dropped, the ports published on loopback.

Skipped where podman is missing or the image has not been built (`make image`; .ci/run builds it where podman is).
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import uuid
import zipfile
from pathlib import Path

import pytest
import requests
from live_server import HOUSE, free_ports, pipelined, wait_until

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/controlnet-canny:0.1.0"  # scripts/build_image.sh's default tag, as podman names it
PODMAN = shutil.which("podman")
USER_ID = 10001  # the Dockerfile's USER
STOP_TIMEOUT = 30
# What TorchServe writes: its working directory (keys, logs, and serve.sh's TMPDIR under it: the JVM's and the
# workers' files, among them the attention kernel, which is loaded from there: exec; U: owned by the container's
# user) and /tmp.
TMPFS = ["/tmp:rw,exec,nosuid,nodev,size=1g", "/app/artifacts/serve:rw,exec,nosuid,nodev,size=256m,mode=0700,U"]


def vm_options() -> list[str]:
    """What these VMs need: runc where crun refuses hybrid cgroups ("cgroups in hybrid mode not supported"), and
    open-file and process limits that the runtime may set without CAP_SYS_RESOURCE (podman's defaults fail with
    "error setting rlimit ... operation not permitted"; so does nproc above the kernel's pid_max, 32768 here)."""
    return (["--runtime=runc"] if shutil.which("runc") else []) + ["--ulimit=nofile=16384", "--ulimit=nproc=8192"]


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PODMAN, *args], capture_output=True, text=True, check=check, timeout=timeout)


def _image_present() -> bool:
    return PODMAN is not None and podman("image", "exists", IMAGE, check=False).returncode == 0


pytestmark = [pytest.mark.server,
              pytest.mark.skipif(PODMAN is None, reason="podman is not installed (apt-get install -y podman)"),
              pytest.mark.skipif(not _image_present(), reason=f"no image {IMAGE}: make image")]


class Container:
    def __init__(self, name: str, ports: list[int]):
        self.name = name
        self.inference, self.management, self.metrics = (f"http://127.0.0.1:{p}" for p in ports)

    def exec(self, *command: str, check: bool = False) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *command, check=check)

    def key(self, kind: str) -> str:
        keys = json.loads(self.exec("cat", "/app/artifacts/serve/key_file.json", check=True).stdout)
        return keys[kind]["key"]

    def auth(self, kind: str = "inference") -> dict:
        return {"Authorization": f"Bearer {self.key(kind)}"}

    def healthcheck(self) -> bool:
        """The image's HEALTHCHECK, run now (podman's timers need systemd); True when it passed."""
        return podman("healthcheck", "run", self.name, check=False).returncode == 0

    def health(self) -> str:
        return podman("inspect", "--format", "{{.State.Health.Status}}", self.name).stdout.strip()

    def ready_workers(self) -> int:
        response = requests.get(f"{self.management}/models/controlnet", headers=self.auth("management"), timeout=10)
        response.raise_for_status()
        return sum(w["status"] == "READY" for w in response.json()[0]["workers"])

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return (result.stdout + result.stderr)[-4000:]


@pytest.fixture(scope="module")
def container():
    name = f"controlnet-test-{uuid.uuid4().hex[:8]}"
    ports = free_ports(3)
    command = ["run", "--detach", "--name", name, "--read-only", "--read-only-tmpfs=false",
               "--cap-drop=ALL", "--security-opt=no-new-privileges", f"--stop-timeout={STOP_TIMEOUT}",
               "--env=CONTROLNET_CPUS=1",  # as k8s/base/deployment.yaml sets it from the CPU request
               *vm_options(),
               *(f"--tmpfs={mount}" for mount in TMPFS),
               *(f"--publish=127.0.0.1:{host}:{inside}" for host, inside in zip(ports, (8080, 8081, 8082))),
               IMAGE]
    podman(*command)
    try:
        yield Container(name, ports)
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def test_healthy_only_once_a_worker_is_ready(container):
    # healthcheck and describe agree at every poll, whatever the phase of the start (nothing up, JVM up, worker loading)
    def ready_now() -> bool:
        try:
            return container.ready_workers() > 0
        except (OSError, ValueError, KeyError, subprocess.CalledProcessError, requests.RequestException):
            return False  # not up yet: no key file, nothing listening

    def agrees_and_healthy() -> bool:
        before = ready_now()
        healthy = container.healthcheck()
        after = ready_now()
        if before == after:
            assert healthy == after
        return healthy

    assert not container.healthcheck()  # just started: no worker can be READY yet
    wait_until(agrees_and_healthy, 300, "the healthcheck passing", interval=1)
    assert container.health() == "healthy", container.logs()

    # no worker while /ping stays 200: unhealthy; a worker again: healthy
    scale = f"{container.management}/models/controlnet"
    requests.put(scale, params={"min_worker": 0, "max_worker": 0},
                 headers=container.auth("management"), timeout=60).raise_for_status()
    wait_until(lambda: container.ready_workers() == 0, 60, "the worker gone")
    assert requests.get(f"{container.inference}/ping", headers=container.auth(), timeout=10).status_code == 200
    assert not container.healthcheck()
    requests.put(scale, params={"min_worker": 1, "max_worker": 1}, headers=container.auth("management"),
                 timeout=60).raise_for_status()
    wait_until(container.healthcheck, 120, "the healthcheck passing again")


def test_runs_as_a_user_that_cannot_change_the_application(container):
    assert container.exec("id", "-u", check=True).stdout.strip() == str(USER_ID)
    for path in ("/app", "/app/handler", "/app/handler/serving.py", "/app/.venv/pyvenv.cfg", "/app/.venv/lib",
                 "/app/model_store/controlnet/MAR-INF/MANIFEST.json", "/app/scripts/serve.sh"):
        assert container.exec("test", "-e", path).returncode == 0, path
        owner = container.exec("stat", "-c", "%u %A", path, check=True).stdout.split()
        assert owner[0] == "0" and owner[1][5] != "w" and owner[1][8] != "w", (path, owner)  # root's, read-only to others
    # the root file system is read-only (even where permissions would allow); the tmpfs mounts are writable
    for path in ("/app/handler/new.py", "/etc/new", "/app/.venv/new"):
        result = container.exec("touch", path)
        assert result.returncode != 0, path
    assert "Read-only file system" in container.exec("touch", "/var/tmp/new").stderr
    for path in ("/tmp/new", "/app/artifacts/serve/new"):
        assert container.exec("touch", path).returncode == 0, path


def test_token_authorization_and_a_curl_generation(container):
    url = f"{container.inference}/predictions/controlnet"
    refused = requests.post(url, files={"image": HOUSE}, data={"prompt": "a house"}, timeout=60)
    assert refused.status_code == 400 and "InvalidKeyException" in refused.text  # TorchServe 0.12's answer
    wrong = requests.get(f"{container.management}/models/controlnet", headers=container.auth("inference"), timeout=10)
    assert wrong.status_code == 400  # the inference key does not open management

    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail", "-H", f"Authorization: Bearer {container.key('inference')}",
         "-F", f"image=@{ROOT / 'tests' / 'data' / 'house.png'}", "-F", "prompt=a house", "-F", "ddim_steps=4",
         "-F", "seed=42", url], capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(io.BytesIO(result.stdout)) as bundle:
        assert {"sample_00.png", "edge_map.png", "params.yaml"} <= set(bundle.namelist())


def test_the_images_demo_adapter_store_lists_and_serves(container):
    """The image's tiny model comes with its demo adapter store (build_mar.py writes it in `make mar`): listed
    through the client inside the image, and a generation with a LoRA, the prompt's tag and the TAESD records
    them."""
    listed = container.exec(".venv/bin/python", "scripts/client.py", "adapters", check=True)
    kinds = {entry["name"]: entry["kind"] for entry in json.loads(listed.stdout)}
    assert kinds["tiny_kohya"] == "lora" and kinds["tiny_embedding"] == "embedding" and kinds["taesd_decoder"] == "taesd"
    response = requests.post(f"{container.inference}/predictions/controlnet", headers=container.auth(),
                             files={"image": HOUSE}, timeout=300,
                             data={"prompt": "a house <lora:tiny_peft:0.5>", "loras": "tiny_kohya:1", "vae": "taesd",
                                   "ddim_steps": 2, "output": "json"})
    assert response.status_code == 200, response.text
    adapters = response.json()["parameters"]["adapters"]
    assert [lora["name"] for lora in adapters["loras"]] == ["tiny_kohya", "tiny_peft"]
    assert len(adapters["taesd"]) == 2


def test_metrics_are_published_without_a_key(container):
    assert requests.post(f"{container.inference}/predictions/controlnet", headers=container.auth(),
                         files={"image": HOUSE}, data={"mode": "edges", "output": "png"}, timeout=120).status_code == 200
    text = requests.get(f"{container.metrics}/metrics", timeout=10).text
    assert "ts_inference_requests_total" in text and "ControlNetPhaseSeconds_bucket" in text


def test_the_worker_takes_its_threads_from_controlnet_cpus_and_compiles_its_kernel(container):
    model_log = container.exec("cat", "/app/artifacts/serve/logs/model_log.log", check=True).stdout
    assert "on cpu with 1 threads" in model_log
    # the CPU backend measured its levers and logged its choices; where the CPU runs a kernel variant, gcc in the
    # image and a TMPDIR it may load the library from let it compile (a failure is logged as "did not compile")
    assert "backend cpu: prepack" in model_log
    if {"avx2", "fma"} <= set(Path("/proc/cpuinfo").read_text().split()):
        assert not any(failed in model_log for failed in ("did not compile", "did not load", "no C compiler"))


def test_workers_scale_one_two_one_through_the_management_api_inside_the_image(container):
    """As docs/serving.md has operators do it in a container or a pod, where there is no curl: scripts/client.py's
    management commands. Each synchronous scale answers 200 (the client exits 1 on anything else), down as well as
    up: TorchServe 0.12 stops a worker by running the program `kill`, which the image must have (procps)."""
    client = [".venv/bin/python", "scripts/client.py"]
    for workers in (2, 1):
        scaled = container.exec(*client, "scale-workers", str(workers))
        assert scaled.returncode == 0, scaled.stdout + scaled.stderr + container.logs()
        described = container.exec(*client, "describe", check=True)
        assert [w["status"] for w in json.loads(described.stdout)[0]["workers"]] == ["READY"] * workers
        assert container.ready_workers() == workers  # the same seen from outside, over the published port


def test_pipelined_requests_are_answered_in_order_through_the_edge(container):
    """A slow generation and an edge map pipelined on one connection to the published port: the image's edge
    (nginx, scripts/serve.sh) answers them in request order."""
    generation, edge_map = pipelined(f"{container.inference}/predictions/controlnet", container.auth(), [
        {"prompt": "a house", "ddim_steps": 40, "seed": 1, "output": "json"}, {"mode": "edges", "output": "png"}])
    assert generation[0] == 200 and json.loads(generation[2])["parameters"]["seeds"] == [1], generation[:2]
    assert edge_map[0] == 200 and edge_map[2].startswith(b"\x89PNG"), edge_map[:2]


def test_podman_stop_ends_it_gracefully_within_its_timeout(container):
    # last in this module: the container is gone afterwards
    stopped = podman("stop", container.name, timeout=STOP_TIMEOUT + 60)
    assert "SIGKILL" not in stopped.stderr, stopped.stderr
    state = json.loads(podman("inspect", "--format", "{{json .State}}", container.name).stdout)
    assert state["ExitCode"] == 0, container.logs()
