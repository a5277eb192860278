"""Faults against a live TorchServe: a worker killed in the middle of a generation, clients that disconnect
mid-generation, checkpoints that are missing, truncated, of the wrong architecture or would run code.

Every wait is bounded; the broken-model server is stopped at the end of the module.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
import torch

from live_server import (ROOT, build_model, config_with_free_ports, free_ports, require_java, running_torchserve,
                         wait_until)

HANDLER_FAILURES = ("could not be prepared", "generation failed", "could not be encoded")
LONG = {"ddim_steps": 100}  # about 5 s on the tiny model: long enough to be interrupted


class PingSampler:
    """Samples /ping and the workers' states every 0.1 s (at most 600 samples) until stopped."""

    def __init__(self, server):
        self.server, self.samples, self._stop = server, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.samples) < 600:
            try:
                ping = self.server.ping()
                states = [w["status"] for w in self.server.workers()]
                self.samples.append((time.monotonic(), ping.status_code, ping.json().get("status"), states))
            except (requests.RequestException, ValueError):
                pass
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


def _predict_lines(server) -> int:
    return server.ts_log().count("Flushing req.cmd PREDICT")


def _kill_when_generating(server, pid: int, predicts_before: int, started: threading.Event | None) -> None:
    """SIGKILL the worker once its generation has begun: the stream's first progress event, else the frontend
    having handed the request over (its PREDICT log line) plus half a second of the about 5 s generation."""
    if started is not None:
        assert started.wait(60), "the generation did not start"
    else:
        wait_until(lambda: _predict_lines(server) > predicts_before, 60, "the request reaching the worker")
        time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_worker_killed_mid_generation(server, stream):
    old_pid = server.ready_worker_pids()[0]
    outcome: dict = {}
    started = threading.Event()

    def send() -> None:
        if not stream:
            outcome["response"] = server.predict({**LONG, "output": "json"}, timeout=120)
            return
        events = []
        try:
            with server.predict({**LONG, "stream": "true"}, stream=True, timeout=120) as response:
                outcome["response"] = response
                for line in response.iter_lines():
                    if line:
                        events.append(json.loads(line))
                        started.set()
        except requests.RequestException as err:
            outcome["error"] = err
        outcome["events"] = events

    with PingSampler(server) as sampler:
        client = threading.Thread(target=send)
        before = _predict_lines(server)
        client.start()
        _kill_when_generating(server, old_pid, before, started if stream else None)
        client.join(timeout=120)
        assert not client.is_alive()
        # TorchServe starts a new worker (after a 1 s back-off) and the next request succeeds.
        wait_until(lambda: [p for p in server.ready_worker_pids() if p != old_pid], 120, "a replacement worker")
        recovered = time.monotonic()
        after = server.predict({"seed": 1})
        time.sleep(0.3)
    assert after.status_code == 200, after.text

    if stream:
        # The 200 went out with the first event; the connection then breaks, with no result line.
        assert outcome["response"].status_code == 200
        assert outcome["events"] and outcome["events"][0]["event"] == "progress"
        assert all(e["event"] == "progress" for e in outcome["events"]), outcome["events"][-1]
        assert "error" in outcome, "the stream ended cleanly although its worker died"
    else:
        response = outcome["response"]
        assert 500 <= response.status_code < 600 and response.status_code != 503, response.text
        assert response.json()["message"] == "Worker died."  # TorchServe's own answer (HTTP 507)

    # /ping: Unhealthy only while no worker was up (no sample after the replacement was READY says otherwise).
    assert sampler.samples, "no /ping sample"
    for at, code, status, states in sampler.samples:
        if status != "Healthy":
            assert code == 500 and "READY" not in states and at <= recovered, (code, status, states)
        elif "READY" in states:
            assert code == 200
    assert sampler.samples[-1][1:3] == (200, "Healthy")


def test_client_disconnects_mid_generation(server):
    """A streamed client that goes away: dropped at the next step (tests/test_scheduling.py times it). A plain
    client's closed connection is not seen by TorchServe 0.12 until the response is written: that generation
    runs to its end (its client may cancel it instead), and the worker stays the same process throughout."""
    pid = server.ready_worker_pids()[0]
    failures = sum(server.model_log().count(f) for f in HANDLER_FAILURES)
    done = server.model_log().count(" done: ")
    with server.predict({**LONG, "stream": "true"}, stream=True, timeout=60) as response:
        first = next(line for line in response.iter_lines() if line)
        assert json.loads(first)["event"] == "progress"
    with pytest.raises(requests.exceptions.ReadTimeout):
        server.predict(LONG, timeout=0.5)
    wait_until(lambda: server.model_log().count(" done: ") >= done + 1, 120, "the plain client's generation ending")
    response = server.predict({"seed": 2})
    assert response.status_code == 200, response.text
    assert server.ready_worker_pids() == [pid]
    assert "dropped: its client closed the connection" in server.model_log()
    assert sum(server.model_log().count(f) for f in HANDLER_FAILURES) == failures


# --- checkpoints that cannot load ---------------------------------------------------------------------------------

class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


BROKEN = {  # model name -> what its load error must say
    "missing": ["no such checkpoint file"],
    "truncated": ["not a readable checkpoint", "truncated"],
    "wrongarch": ["does not fit this architecture", "missing keys: "],
    "runscode": ["refused", "could run code", "GLOBAL posix.system"],
}


@pytest.fixture(scope="module")
def broken(tiny_checkpoint, tiny_dir):
    """A TorchServe whose only models cannot load: a checkpoint deleted after the build, one cut in half, the
    v1.1 control-only file alone (the wrong architecture for a full model), one whose pickle would run code."""
    if require_java():
        pytest.skip(require_java())
    with tempfile.TemporaryDirectory(prefix="torchserve_broken_") as tmp:
        tmp = Path(tmp)
        files, store = tmp / "files", tmp / "model_store"
        files.mkdir()
        data = tiny_checkpoint.read_bytes()
        (files / "truncated.pth").write_bytes(data[: len(data) // 2])
        shutil.copy(tiny_checkpoint, files / "missing.pth")
        marker = tmp / "code_ran"
        torch.save({"state_dict": _RunsCode(marker)}, files / "runscode.pth")
        checkpoints = {"missing": files / "missing.pth", "truncated": files / "truncated.pth",
                       "wrongarch": tiny_dir / "control_tiny_v11_canny.pth", "runscode": files / "runscode.pth"}
        for name, checkpoint in checkpoints.items():
            # /ping turns Unhealthy once a model's workers have failed to come back for maxRetryTimeoutInSec
            # (model-config.yaml: 300 s); 5 s here keeps the wait short.
            build_model(store, [checkpoint], name=name, sets=["handler.threads=1", "maxRetryTimeoutInSec=5"])
        (store / "missing" / "missing.pth").unlink()
        with running_torchserve(store, tmp, {"load_models": ",".join(BROKEN)}, ready=None) as server:
            # Bounded: the first load attempt of all four models (about 20 s on two busy cores).
            wait_until(lambda: all(f"model {name} cannot be loaded" in server.model_log() for name in BROKEN), 120,
                       "every broken model's load error", log=server.log_dir / "model_log.log")
            yield server, marker


@pytest.mark.parametrize("name", BROKEN)
def test_bad_checkpoint_fails_the_load_with_a_clear_message(broken, name):
    server, _ = broken
    lines = [line for line in server.model_log().splitlines() if f"model {name} cannot be loaded: " in line]
    message = lines[0].split(f"model {name} cannot be loaded: ", 1)[1]
    assert f"/{name}/" in message and ".pth" in message, message  # names the file (in TorchServe's model link)
    for fragment in BROKEN[name]:
        assert fragment in message, message
    assert not [w for w in server.workers(name) if w["status"] == "READY"]


def test_failed_loads_log_no_traceback_and_back_off(broken):
    server, _ = broken
    log = server.model_log()
    assert "Traceback" not in log and "Backend worker process died" not in log
    assert "weights_only` set to `False`" not in log  # no advice to load the file unsafely
    # TorchServe retries a worker that failed to start, with a growing back-off (1, 1, 2, 3, 5, 8, ... s).
    assert "Retry worker" in server.ts_log()
    for name in BROKEN:
        assert 1 <= log.count(f"model {name} cannot be loaded") <= 8


def test_code_in_a_checkpoint_never_runs(broken):
    _, marker = broken
    assert not marker.exists()


def test_ping_is_unhealthy_without_workers(broken):
    server, _ = broken
    wait_until(lambda: server.ping().status_code == 500, 30, "/ping reporting the missing workers")
    assert server.ping().json() == {"status": "Unhealthy"}
    # A prediction waits in the model's queue for a worker that never comes (503 only once the queue is full).
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{server.inference}/predictions/missing", headers=server.auth(),
                      files={"image": ("a.png", b"x")}, data={"prompt": "a"}, timeout=2)


@pytest.mark.parametrize("case", ["truncated", "wrongarch", "missing config"])
def test_generate_cli_reports_a_broken_model_in_one_line(tmp_path, tiny_checkpoint, tiny_dir, case):
    """scripts/generate.py: a checkpoint or architecture file that cannot load is one `error:` line, no traceback."""
    checkpoint, config = tiny_checkpoint, ROOT / "handler" / "controlnet_canny" / "configs" / "cldm_tiny.yaml"
    if case == "truncated":
        checkpoint = tmp_path / "truncated.pth"
        data = tiny_checkpoint.read_bytes()
        checkpoint.write_bytes(data[: len(data) // 2])
    elif case == "wrongarch":
        checkpoint = tiny_dir / "control_tiny_v11_canny.pth"
    else:
        config = tmp_path / "no_such.yaml"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--checkpoint", str(checkpoint),
                             "--config", str(config), "--image", str(ROOT / "tests" / "data" / "house.png"),
                             "--prompt", "a house", "--image-resolution", "64", "--ddim-steps", "1",
                             "--out", str(tmp_path / "out.zip")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out.zip").exists()


@pytest.mark.parametrize("steps, ok", [(100, True), (101, False)])
def test_generate_cli_bounds_ddim_steps_like_the_server(tmp_path, steps, ok):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--checkpoint", "none.pth",
                             "--image", str(ROOT / "tests" / "data" / "house.png"), "--prompt", "a",
                             "--ddim-steps", str(steps)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if ok:  # valid parameters: it goes on to the checkpoint, which does not exist
        assert "no such checkpoint" in result.stderr or "No such file" in result.stderr, result.stderr
    else:
        assert result.stderr.strip() == "error: ddim_steps: must be between 1 and 100, got 101", result.stderr


def test_a_second_serve_sh_instance_is_its_own(server, tiny_checkpoint, tmp_path):
    """scripts/serve.sh beside a running instance (the session's server, also started by serve.sh): its own pid
    file and temporary directory under its RUN_DIR, a banner naming the command that stops it, and that command
    stops it alone."""
    store = tmp_path / "model_store"
    build_model(store, [tiny_checkpoint], sets=["handler.threads=1"])
    inference, _, _ = config_with_free_ports(tmp_path / "config.properties", free_ports(5))
    run_dir = tmp_path / "second"
    env = {**os.environ, "RUN_DIR": str(run_dir), "TS_CONFIG": str(tmp_path / "config.properties"),
           "MODEL_STORE": str(store), "WAIT_S": "240"}
    serve_sh = str(ROOT / "scripts" / "serve.sh")
    started = subprocess.run([serve_sh, "start"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        assert f"Stop it with: RUN_DIR={run_dir} scripts/serve.sh stop" in started.stdout, started.stdout
        pid = int((run_dir / "tmp" / ".model_server.pid").read_text())
        key = json.loads((run_dir / "key_file.json").read_text())["inference"]["key"]
        assert requests.get(f"{inference}/ping", headers={"Authorization": f"Bearer {key}"}, timeout=10).ok
    finally:
        stopped = subprocess.run([serve_sh, "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    wait_until(lambda: not psutil.pid_exists(pid), 60, "the second instance's exit")
    assert server.ping().status_code == 200  # the first instance serves on
