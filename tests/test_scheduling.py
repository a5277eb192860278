"""Step-level scheduling on TorchServe's continuous batching, against a live TorchServe (tiny model, one worker):
cheap work is answered during a long generation, a request that joins mid-flight gets its own pixels, a
streamed client that goes away and an explicit cancel free the worker within a step, and worker threads follow
the live worker count as workers are scaled.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from live_server import ROOT, require_java, tiny_server, wait_until

LONG = {"ddim_steps": 100, "image_resolution": 256}  # seconds of steps on the tiny model


class Background:
    """A request sent from a thread; `response` and `seconds` once it is answered."""

    def __init__(self, send):
        self.response, self.error, self.seconds = None, None, None
        self._thread = threading.Thread(target=self._run, args=(send,), daemon=True)
        self._started = time.monotonic()
        self._thread.start()

    def _run(self, send) -> None:
        try:
            self.response = send()
        except Exception as err:  # surfaced by `wait`
            self.error = err
        self.seconds = time.monotonic() - self._started

    @property
    def answered(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float) -> requests.Response:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"no answer within {timeout} s"
        if self.error is not None:
            raise self.error
        return self.response


def _images(response: requests.Response) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in response.json()["images"]]


def _step_seconds(server) -> float:
    """One step of LONG alone on this machine, from a short run of the same shape."""
    started = time.monotonic()
    assert server.predict({**LONG, "ddim_steps": 10}).status_code == 200
    return (time.monotonic() - started) / 10


def test_edges_and_few_step_requests_answered_during_a_long_generation(server):
    step = _step_seconds(server)
    long = Background(lambda: server.predict({**LONG, "seed": 1}, timeout=300))
    time.sleep(1.0)
    started = time.monotonic()
    edges = server.predict({"mode": "edges"}, timeout=60)
    edges_seconds = time.monotonic() - started
    started = time.monotonic()
    quick = server.predict({"ddim_steps": 1, "seed": 3}, timeout=60)
    quick_seconds = time.monotonic() - started
    assert edges.status_code == 200 and quick.status_code == 200
    assert not long.answered, "the long generation ended before the cheap requests: make LONG longer"
    # answered within a few of the long request's steps (it steps on between them), not after its 100
    assert edges_seconds < 0.5 + 4 * step and quick_seconds < 0.5 + 4 * step, (edges_seconds, quick_seconds, step)
    assert long.wait(300).status_code == 200


def test_request_joining_mid_flight_gets_the_pixels_it_gets_alone(server):
    joiner = {"seed": 77, "ddim_steps": 8, "num_samples": 2, "eta": 0.5, "output": "json", "prompt": "a barn",
              "image_resolution": LONG["image_resolution"]}
    long = Background(lambda: server.predict({**LONG, "seed": 5, "output": "json"}, timeout=300))
    time.sleep(1.0)
    log_before = len(server.model_log())
    joined = server.predict(joiner, timeout=120)
    assert not long.answered
    assert joined.status_code == 200, joined.text
    assert "evaluating 2 request(s) in 1 evaluation(s) of 3 sample(s)" in server.model_log()[log_before:]
    assert long.wait(300).status_code == 200
    alone = server.predict(joiner, timeout=120)
    for together, single in zip(_images(joined), _images(alone), strict=True):
        assert np.abs(together.astype(int) - single).max() <= 1


def test_streamed_client_that_goes_away_frees_the_worker_within_a_step(server):
    step = _step_seconds(server)
    with server.predict({**LONG, "stream": "true"}, stream=True, timeout=60) as response:
        assert response.headers["Content-Type"] == "application/x-ndjson"
        first = next(line for line in response.iter_lines() if line)
        assert json.loads(first)["event"] == "progress"
    dropped = server.model_log().count("dropped: its client closed the connection")
    started = time.monotonic()
    after = server.predict({"ddim_steps": 4, "seed": 9})
    assert after.status_code == 200
    assert time.monotonic() - started < 1.0 + 8 * step  # not behind the 99 steps left
    wait_until(lambda: server.model_log().count("dropped: its client closed the connection") > dropped, 10,
               "the model log showing the request dropped")


def test_cancel_stops_a_generation_within_a_step(server):
    step = _step_seconds(server)
    long = Background(lambda: server.predict({**LONG, "request_id": "cancel-me-1"}, timeout=300))
    time.sleep(1.0)
    started = time.monotonic()
    cancel = requests.post(server.url, json={"mode": "cancel", "request_id": "cancel-me-1"}, headers=server.auth(),
                           timeout=60)
    assert cancel.status_code == 202 and cancel.json() == {"request_id": "cancel-me-1", "cancel": "accepted"}
    stopped = long.wait(60)
    assert stopped.status_code == 409 and stopped.json()["field"] == "request_id"
    assert time.monotonic() - started < 1.0 + 4 * step
    assert "(request_id cancel-me-1) cancelled" in server.model_log()
    after = server.predict({"ddim_steps": 2, "seed": 4})
    assert after.status_code == 200


def test_cancel_of_a_streamed_request_ends_its_stream_with_an_error_event(server):
    with server.predict({**LONG, "stream": "true", "request_id": "cancel-me-2"}, stream=True, timeout=60) as response:
        lines = response.iter_lines()
        assert json.loads(next(line for line in lines if line))["event"] == "progress"
        cancel = requests.post(server.url, json={"mode": "cancel", "request_id": "cancel-me-2"},
                               headers=server.auth(), timeout=60)
        assert cancel.status_code == 202
        events = [json.loads(line) for line in lines if line]
    assert events[-1]["event"] == "error" and events[-1]["field"] == "request_id"
    assert "cancelled" in events[-1]["error"] and len(events) < 50


def test_a_cancel_that_arrives_first_refuses_the_request(server):
    cancel = requests.post(server.url, json={"mode": "cancel", "request_id": "early-1"}, headers=server.auth(),
                           timeout=60)
    assert cancel.status_code == 202
    refused = server.predict({"request_id": "early-1"})
    assert refused.status_code == 409 and refused.json()["field"] == "request_id"
    assert server.predict({"request_id": "early-1"}).status_code == 200  # a cancel stops one request


def test_non_streamed_responses_carry_no_torchserve_header(server):
    long = Background(lambda: server.predict({**LONG, "ddim_steps": 30}, timeout=300))
    time.sleep(0.5)
    short = server.predict({"ddim_steps": 3, "output": "png"})
    assert short.status_code == 200 and short.headers["Content-Type"] == "image/png"
    assert "ts_stream_next" not in short.headers and "Transfer-Encoding" not in short.headers
    assert "ts_stream_next" not in long.wait(300).headers


@pytest.mark.parametrize("command", ["generate", "sweep"])
def test_client_ctrl_c_cancels_what_it_started(server, tmp_path, command):
    cancelled = server.model_log().count(") cancelled")
    args = [sys.executable, str(ROOT / "scripts" / "client.py"), "--url", server.inference,
            "--key-file", str(server.run_dir / "key_file.json"), command, "--image", str(ROOT / "tests/data/house.png"),
            "--out", str(tmp_path / "out")]
    steps = [f"ddim_steps={LONG['ddim_steps']}", f"image_resolution={LONG['image_resolution']}"]
    if command == "generate":
        args += ["--prompt", "a house", *(a for step in steps for a in ("--param", step))]
    else:
        args += ["--prompt", "a house", "--seed", "1", "2", "--concurrency", "2",
                 *(a for step in steps for a in ("--param", step))]
    before = len(server.model_log())
    client = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: " admitted: " in server.model_log()[before:], 30, "the generation starting")
    time.sleep(1.0)
    client.send_signal(signal.SIGINT)
    _, stderr = client.communicate(timeout=60)
    assert client.returncode != 0 and "cancelled" in stderr, stderr
    expected = 1 if command == "generate" else 2
    wait_until(lambda: server.model_log().count(") cancelled") >= cancelled + expected, 10,
               f"{expected} cancel(s) in the model log")


@pytest.fixture(scope="module")
def scalable_server(tiny_checkpoint):
    """Threads from the cores (handler.threads 0), so that they follow the workers."""
    if require_java():
        pytest.skip(require_java())
    with tiny_server(tiny_checkpoint, sets=["handler.threads=0", "maxWorkers=1"],
                     prefix="torchserve_scale_") as ts:
        yield ts


def test_scaling_one_two_one_never_oversubscribes_the_cores(scalable_server):
    server = scalable_server
    cores = len(os.sched_getaffinity(0))

    def scale(workers: int) -> None:
        response = requests.put(f"{server.management}/models/{server.model}",
                                params={"min_worker": workers, "max_worker": workers, "synchronous": "true"},
                                headers=server.auth("management"), timeout=180)
        assert response.status_code in (200, 202), response.text
        wait_until(lambda: [w["status"] for w in server.workers()] == ["READY"] * workers, 120,
                   f"{workers} READY worker(s)")

    def served_threads(count: int) -> list[tuple[int, int]]:
        """(threads, live workers) of the requests served, `count` of them sent at once."""
        before = len(server.model_log())
        sent = [Background(lambda seed=seed: server.predict({"seed": seed, "ddim_steps": 20}, timeout=120))
                for seed in range(count)]
        assert all(request.wait(120).status_code == 200 for request in sent)
        return [(int(threads), int(live)) for threads, live in
                re.findall(r" done: .* threads (\d+) \((\d+) live worker", server.model_log()[before:])]

    for workers in (1, 2, 1):
        scale(workers)
        # a worker stopped by the scale-down may still be exiting for a moment after describe drops it; the
        # others then count it, for at most a second (WORKER_CHECK_SECONDS): fewer threads, never more
        served_threads(2)
        time.sleep(1.5)
        served = served_threads(4)
        assert served, "no request logged"
        assert all(threads * live <= cores for threads, live in served), served
        assert all(live == workers for _, live in served), served
        assert all(threads == max(1, cores // workers) for threads, _ in served), served


def test_cancel_reaches_the_request_on_another_worker(scalable_server):
    """Two workers: the cancel call goes to whichever is idle, the request runs on the other (to its end within
    one call, TorchServe 0.12's limit): the shared cancel board stops it between two of its steps."""
    server = scalable_server
    response = requests.put(f"{server.management}/models/{server.model}",
                            params={"min_worker": 2, "max_worker": 2, "synchronous": "true"},
                            headers=server.auth("management"), timeout=180)
    assert response.status_code in (200, 202), response.text
    wait_until(lambda: [w["status"] for w in server.workers()] == ["READY"] * 2, 120, "2 READY workers")
    long = Background(lambda: server.predict({**LONG, "request_id": "far-away-1"}, timeout=300))
    wait_until(lambda: "request_id far-away-1" in server.model_log(), 30, "the request admitted")
    time.sleep(0.5)
    cancel = requests.post(server.url, json={"mode": "cancel", "request_id": "far-away-1"}, headers=server.auth(),
                           timeout=60)
    assert cancel.status_code == 202
    started = time.monotonic()
    stopped = long.wait(60)
    assert stopped.status_code == 409 and time.monotonic() - started < 5
    log = server.model_log()
    admitted_by = re.search(r"\[INFO \] (W-\d+)-\S+ MODEL_LOG - request \S+ admitted: .*request_id far-away-1", log)
    cancelled_by = re.search(r"\[INFO \] (W-\d+)-\S+ MODEL_LOG - cancel requested for request_id far-away-1", log)
    assert admitted_by and cancelled_by and admitted_by.group(1) != cancelled_by.group(1), "one worker took both"
