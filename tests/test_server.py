"""Integration tests against a real TorchServe on loopback (the `server` fixture of conftest.py: started once
per session on free ports with the tiny model (64x64, few DDIM steps), token authorization on, always stopped).

Everything TorchServe writes (key file, logs, its pid file, sockets, the model store) stays in one temporary
directory, removed at the end.
"""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from controlnet_canny.bundle import read_png_parameters
from controlnet_canny.preprocess import canny, decode_image, resize_image
from live_server import HOUSE, ROOT, STEPS, png_header_only, wait_until

pytestmark = pytest.mark.server

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
    log_before = len(server.model_log())
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
    # both good ones sampled together, one model evaluation per step
    assert "evaluating 2 request(s) in 1 evaluation(s) of 3 sample(s)" in server.model_log()[log_before:]

    for fields, batched in zip(requests_fields[:2], responses[:2]):
        alone = server.predict({**fields, "stream": None, "output": "json"})
        assert alone.status_code == 200
        for together, single in zip(result_images(batched), result_images(alone), strict=True):
            assert np.abs(together - single).max() <= 1


def test_scaling_workers_one_two_one(server):
    """Through scripts/client.py's management commands, as an operator runs them inside the container or a pod
    (kubectl exec): a synchronous scale answers 200 up and down (down, TorchServe 0.12 runs the program `kill`; in
    an image without it the answer is a 500), and describe shows the new count at once."""
    for workers in (2, 1):
        scaled = run_client(server, "scale-workers", str(workers))
        assert scaled.returncode == 0, scaled.stdout + scaled.stderr  # the client exits 1 on any answer but 200
        described = run_client(server, "describe")
        assert described.returncode == 0, described.stderr
        assert [w["status"] for w in json.loads(described.stdout)[0]["workers"]] == ["READY"] * workers
        generated = server.predict({"seed": workers})
        assert generated.status_code == 200, generated.text


def scrape(server) -> dict[str, list[tuple[dict, float]]]:
    samples: dict[str, list[tuple[dict, float]]] = {}
    text = requests.get(f"{server.metrics}/metrics", timeout=10).text
    for name, labels, value in re.findall(r"^(\w+)\{(.*?),?\} (\S+)$", text, re.M):
        samples.setdefault(name, []).append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return samples


def test_prometheus_metrics(server):
    """The handler's metrics count this test's requests (deltas: the session's server has served other tests)."""
    def totals():
        metrics = scrape(server)
        return lambda name, **want: sum(v for labels, v in metrics.get(name, []) if want.items() <= labels.items())

    before = totals()
    assert server.predict({"num_samples": 2}).status_code == 200
    assert server.predict({"ddim_steps": 0}).status_code == 400

    def delta(name: str, **want) -> float:
        return totals()(name, **want) - before(name, **want)

    wait_until(lambda: delta("ControlNetImagesGenerated") >= 2 and delta("ControlNetErrors", Reason="ddim_steps") >= 1,
               15, "the handler's metrics on /metrics")
    assert delta("ControlNetDenoisingSteps") >= STEPS and delta("ControlNetDenoisingSteps") % STEPS == 0
    for phase in ("preprocess", "text", "sampling", "decoding"):
        assert delta("ControlNetPhaseSeconds_count", Phase=phase) >= 1, phase
    assert 0 < delta("ControlNetPhaseSeconds_sum", Phase="sampling") < 60
    assert delta("ts_inference_requests_total") >= 2  # TorchServe's own metrics are still there


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


def test_controls_through_torchserve(server):
    """Issue 11's controls end to end: a control map sent as a file (multipart), img2img, a sampler, the
    guidance window, control_mode and resize_mode echoed; the per-sample control_fidelity as a metric."""
    edges = canny(resize_image(decode_image(HOUSE, 10**7, 10**7), 64), 50, 150)
    control = io.BytesIO()
    Image.fromarray(edges).save(control, "PNG")
    fields = {"seed": 4, "num_samples": 2, "output": "json", "sampler": "dpmpp_2m", "karras": "true",
              "guidance_start": 0.1, "guidance_end": 0.9, "control_mode": "prompt", "resize_mode": "resize_and_fill",
              "denoising_strength": 0.75, "width": 64, "height": 64, "ddim_steps": 4}
    files = {"control_image": ("edges.png", control.getvalue()), "init_image": ("init.png", HOUSE)}
    response = requests.post(server.url, data={"prompt": "a house", **fields}, files=files, headers=server.auth(),
                             timeout=120)
    assert response.status_code == 200, response.text
    result = response.json()
    parameters = result["parameters"]
    for name in ("sampler", "guidance_start", "guidance_end", "control_mode", "resize_mode", "denoising_strength"):
        assert parameters[name] == fields[name], name
    assert parameters["karras"] is True and parameters["ddim_steps_visited"] == 3  # int(4 * 0.75) steps
    assert len(parameters["control_fidelity"]) == 2 and parameters["warnings"] == []
    assert len(parameters["control_image"]) == 64 and len(parameters["init_image"]) == 64  # sha256 hex
    assert np.array_equal(png_pixels(base64.b64decode(result["edge_map"])), edges)  # the map sent, not re-cannied
    assert read_png_parameters(base64.b64decode(result["images"][1]))["control_fidelity"] == \
        [parameters["control_fidelity"][1]]

    bad = requests.post(server.url, data={"prompt": "a house", "sampler": "plms"}, files={"image": HOUSE},
                        headers=server.auth(), timeout=120)
    assert bad.status_code == 400 and bad.json()["field"] == "sampler"

    def fidelity_count() -> float:
        return sum(v for _, v in scrape(server).get("ControlNetControlFidelity_count", []))

    wait_until(lambda: fidelity_count() >= 2, 15, "ControlNetControlFidelity on /metrics")


def test_lcm_through_torchserve(server):
    """sampler=lcm at LCM's recipe (4 steps, scale 1) end to end: params.yaml says so; steps beyond LCM's
    schedule (50) are a 400 naming ddim_steps."""
    response = server.predict({"sampler": "lcm", "ddim_steps": 4, "scale": 1, "seed": 8})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as bundle:
        params = yaml.safe_load(bundle.read("params.yaml"))
        assert png_pixels(bundle.read("sample_00.png")).shape == (64, 64, 3)
    assert (params["sampler"], params["ddim_steps"], params["ddim_steps_visited"]) == ("lcm", 4, 4)
    assert params["scale"] == 1.0 and params["karras"] is False and params["seeds"] == [8]

    too_many = server.predict({"sampler": "lcm", "ddim_steps": 51})
    assert too_many.status_code == 400 and too_many.json()["field"] == "ddim_steps", too_many.text
    assert "50" in too_many.json()["error"]


def test_long_prompt_warning_through_torchserve(server):
    prompt = " ".join(["house"] * 100)
    truncated = server.predict({"prompt": prompt, "output": "json", "seed": 1}).json()["parameters"]
    assert [w.split(":")[0] for w in truncated["warnings"]] == ["prompt"]
    chunked = server.predict({"prompt": prompt, "output": "json", "seed": 1, "long_prompt": "true"})
    assert chunked.status_code == 200 and chunked.json()["parameters"]["warnings"] == []


def test_client_sweep_never_repeats_a_seed(server, tmp_path):
    out = tmp_path / "dataset"
    done = run_client(server, "sweep", "--image", str(ROOT / "tests" / "data" / "house.png"), "--out", str(out),
                      "--prompt", "a house", "--seed", "0:3:1", "--sampler", "ddim", "euler_a",
                      "--param", "num_samples=2", "--param", "ddim_steps=2")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted((r["sampler"], r["seed"]) for r in rows) == [(s, i) for s in ("ddim", "euler_a") for i in range(4)]
    assert all(isinstance(r["control_fidelity"], float) for r in rows)


def test_token_merging_through_torchserve(server):
    """token_merging_ratio end to end: 200 with the ratio in params.yaml and each PNG's parameters, an image other
    than ratio 0's, the same again for the same seed; out of its range, a 400 naming the field and the range."""
    def sample(ratio: float) -> tuple[np.ndarray, dict, dict]:
        response = server.predict({"seed": 31, "token_merging_ratio": ratio})
        assert response.status_code == 200, response.text
        with zipfile.ZipFile(io.BytesIO(response.content)) as bundle:
            png = bundle.read("sample_00.png")
            return png_pixels(png), yaml.safe_load(bundle.read("params.yaml")), read_png_parameters(png)

    merged, params, png_params = sample(0.5)
    assert params["token_merging_ratio"] == 0.5 and png_params["token_merging_ratio"] == 0.5
    assert np.abs(merged - sample(0.0)[0]).max() > 3
    assert np.array_equal(merged, sample(0.5)[0])

    refused = server.predict({"token_merging_ratio": 0.8})
    assert refused.status_code == 400
    assert refused.json()["field"] == "token_merging_ratio" and "0.75" in refused.json()["error"]
