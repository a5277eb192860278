"""The adapter store end to end: one real TorchServe (on loopback, token authorization on) serving the tiny model
with an adapter store in its model directory (scripts/make_tiny_adapters.py's demo store, a LoRA per layout, an
embedding and TAESD, plus a rank-2 UNet-only LoRA), and the command-line tools: scripts/client.py against that
server, scripts/generate.py on the same store. Files are added, broken and removed while it serves: the store's
hot pickup makes them visible within about a second, no restart.

The server runs fp32 (this CPU would pick bf16) so that its pixels can be compared with in-process pipelines."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from conftest import BATCH_DELAY_MS, TINY_CONFIG, clearly_differ, max_diff
from controlnet_canny.adapters import FOLDERS
from controlnet_canny.bundle import read_png_parameters
from controlnet_canny.config import load_config
from controlnet_canny.params import GenerationParams, Limits, parse_params
from controlnet_canny.preprocess import decode_image
from live_server import HOUSE, ROOT, STEPS, Server, build_model, require_java, running_torchserve
from make_tiny_adapters import write_demo_store, write_embedding, write_lora

pytestmark = pytest.mark.server

HOUSE_FILE = ROOT / "tests" / "data" / "house.png"
HOUSE_B64 = base64.b64encode(HOUSE).decode()
LORAS = ("detail", "tiny_diffusers-old", "tiny_kohya", "tiny_kohya-ldm", "tiny_peft")
PICKUP_SECONDS = 5  # the store looks again at most once a second; the rest is slack for a loaded machine
WORKER_DEATH = ("Backend worker process died", "Worker disconnected", "Retry worker")  # TorchServe's own lines


@dataclass
class Served:
    server: Server
    store: Path  # the adapter store inside the served model directory

    def sha256(self, relative: str) -> str:
        return hashlib.sha256((self.store / relative).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    if require_java():
        pytest.skip(require_java())
    config = load_config(TINY_CONFIG)
    with tempfile.TemporaryDirectory(prefix="torchserve_adapters_") as tmp:
        tmp = Path(tmp)
        # LoRAs unfused: these tests compare one LoRA set's images across requests byte for byte, and `auto` fuses a
        # set after a few requests, which rounds differently (fused serving: tests/test_lora_fusion.py)
        model_dir = build_model(tmp / "model_store", [tiny_checkpoint], sets=[
            "handler.threads=1", "handler.precision=fp32", f"maxBatchDelay={BATCH_DELAY_MS}",
            "handler.backend.lora_fusion=unfused"])
        store = model_dir / "adapters"  # model-config.yaml's default handler.adapters
        write_demo_store(store, config)
        write_lora(store / "loras" / "detail.safetensors", config, "peft", rank=2, seed=2, text_encoder=False)
        with running_torchserve(tmp / "model_store", tmp) as server:
            yield Served(server, store)


# --- helpers ----------------------------------------------------------------------------------------------

def body(**fields: Any) -> dict[str, Any]:
    """A JSON generation request (fields None: left out)."""
    base = {"prompt": "a house", "ddim_steps": STEPS, "seed": 7, "output": "json", "image": HOUSE_B64}
    return {k: v for k, v in {**base, **fields}.items() if v is not None}


def post(served: Served, payload: dict[str, Any], headers: dict[str, str] | None = None, **kwargs) -> requests.Response:
    return requests.post(served.server.url, json=payload, headers={**served.server.auth(), **(headers or {})},
                         timeout=120, **kwargs)


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def image_of(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    (png,) = response.json()["images"]
    return png_pixels(base64.b64decode(png))


def listing(served: Served) -> dict[str, dict]:
    response = post(served, {"mode": "adapters"})
    assert response.status_code == 200, response.text
    return {entry["name"]: entry for entry in response.json()["adapters"]}


def poll(condition: Callable[[], Any], timeout: float = PICKUP_SECONDS, what: str = "the store's change") -> Any:
    """`condition()`'s first truthy value, tried every 0.1 s; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {timeout} s")
        time.sleep(0.1)


def expected_listing(store: Path) -> dict[str, dict]:
    """What the listing must say of each file, from the files themselves."""
    expected = {}
    for folder, kind in FOLDERS.items():
        for path in sorted((store / folder).iterdir()):
            entry = {"name": path.stem, "kind": kind, "file": f"{folder}/{path.name}", "size": path.stat().st_size,
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            if kind == "lora":
                entry.update({"rank": 2, "layout": "peft"} if path.stem == "detail"
                             else {"rank": 4, "layout": path.stem.removeprefix("tiny_")})
            elif kind == "embedding":
                entry["vectors"] = 2
            expected[path.stem] = entry
    return expected


def run_client(served: Served, *args: str) -> subprocess.CompletedProcess:
    server = served.server
    command = [sys.executable, str(ROOT / "scripts" / "client.py"), "--url", server.inference,
               "--management-url", server.management, "--key-file", str(server.run_dir / "key_file.json"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def worker_deaths(served: Served) -> list[str]:
    logs = served.server.ts_log() + served.server.model_log()
    return [line for line in WORKER_DEATH if line in logs]


# --- the listing ------------------------------------------------------------------------------------------

def test_listing_names_every_file_with_kind_size_sha256_and_rank(served):
    expected = expected_listing(served.store)
    assert set(expected) == {*LORAS, "tiny_embedding", "taesd_decoder", "taesd_encoder"}
    response = post(served, {"mode": "adapters"})
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    answer = response.json()["adapters"]
    assert {entry["name"]: entry for entry in answer} == expected  # no error on any of them
    listed = run_client(served, "adapters")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == answer


# --- generation -------------------------------------------------------------------------------------------

def every_adapter_record(served: Served) -> dict:
    return {
        "loras": [{"name": "detail", "weight": 1.0, "sha256": served.sha256("loras/detail.safetensors")},
                  {"name": "tiny_peft", "weight": 0.5, "sha256": served.sha256("loras/tiny_peft.safetensors")},
                  {"name": "tiny_kohya", "weight": 0.5, "sha256": served.sha256("loras/tiny_kohya.safetensors")}],
        "embeddings": [{"name": "tiny_embedding", "sha256": served.sha256("embeddings/tiny_embedding.pt")}],
        "taesd": [{"file": "taesd/taesd_decoder.safetensors", "sha256": served.sha256("taesd/taesd_decoder.safetensors")},
                  {"file": "taesd/taesd_encoder.safetensors", "sha256": served.sha256("taesd/taesd_encoder.safetensors")}],
    }


EVERY_ADAPTER = {"prompt": "a tiny_embedding house <lora:tiny_kohya:0.5>", "loras": ["detail:1", "tiny_peft:0.5"],
                 "vae": "taesd"}


def test_every_adapter_in_one_request_is_recorded_in_every_output_format(served):
    """Two LoRAs in the field, one as a prompt tag, an embedding by name, TAESD: zip, PNG and JSON answers all
    record each file with its sha256, and hold the same image."""
    record = every_adapter_record(served)
    as_json = post(served, body(**EVERY_ADAPTER))
    assert as_json.status_code == 200, as_json.text
    parameters = as_json.json()["parameters"]
    assert parameters["adapters"] == record
    assert parameters["loras"] == ["detail:1", "tiny_peft:0.5", "tiny_kohya:0.5"] and parameters["vae"] == "taesd"
    assert parameters["prompt"] == "a tiny_embedding house "  # the tag taken out, the embedding's name kept

    as_png = post(served, body(**EVERY_ADAPTER, output=None), headers={"Accept": "image/png"})
    assert as_png.status_code == 200 and as_png.headers["Content-Type"] == "image/png", as_png.text
    assert read_png_parameters(as_png.content)["adapters"] == record

    as_zip = post(served, body(**EVERY_ADAPTER, output="zip"))
    assert as_zip.status_code == 200 and as_zip.headers["Content-Type"] == "application/zip", as_zip.text
    with zipfile.ZipFile(io.BytesIO(as_zip.content)) as bundle:
        assert yaml.safe_load(bundle.read("params.yaml"))["adapters"] == record
        assert read_png_parameters(bundle.read("sample_00.png"))["adapters"] == record
        from_zip = bundle.read("sample_00.png")
    assert base64.b64decode(as_json.json()["images"][0]) == as_png.content == from_zip

    plain = post(served, body())
    assert plain.json()["parameters"]["adapters"] == {"loras": [], "embeddings": [], "taesd": []}
    assert clearly_differ(image_of(as_json), image_of(plain))


def test_repeated_multipart_loras_parts_are_the_json_list(served):
    data = [("prompt", EVERY_ADAPTER["prompt"]), ("ddim_steps", str(STEPS)), ("seed", "7"), ("output", "json"),
            ("loras", "detail:1"), ("vae", "taesd"), ("loras", "tiny_peft:0.5")]
    form = requests.post(served.server.url, data=data, files={"image": ("house.png", HOUSE)},
                         headers=served.server.auth(), timeout=120)
    assert form.status_code == 200, form.text
    assert form.json()["parameters"]["adapters"] == every_adapter_record(served)
    assert np.array_equal(image_of(form), image_of(post(served, body(**EVERY_ADAPTER))))


def test_a_request_without_adapters_answers_what_a_pipeline_without_a_store_gives(served, tiny_pipeline):
    """Up to one level: each process's CPU backend measures its own levers (prepack, attention kernel), and another
    choice moves a pixel by one level."""
    response = post(served, body(seed=9))
    parameters = response.json()["parameters"]
    params = parse_params({f.name: parameters[f.name] for f in fields(GenerationParams)}, Limits(image_resolution=(64, 768)))
    assert params.seed == 9 and params.loras == () and params.vae == "full"
    (expected,) = tiny_pipeline.generate([tiny_pipeline.prepare(decode_image(HOUSE, 10**7, 10**7), params)])[0].images
    assert max_diff(image_of(response), expected) <= 1


def test_an_edge_map_records_no_adapter(served):
    """mode=edges runs no diffusion: the names are still checked, but no file plays a part in the answer."""
    edges = post(served, body(mode="edges", **EVERY_ADAPTER))
    assert edges.status_code == 200, edges.text
    assert edges.json()["parameters"]["adapters"] == {"loras": [], "embeddings": [], "taesd": []}
    plain = post(served, body(mode="edges"))
    edge_maps = [png_pixels(base64.b64decode(r.json()["edge_map"])) for r in (edges, plain)]
    assert np.array_equal(*edge_maps)
    assert post(served, body(mode="edges", loras=["nope:1"])).status_code == 400


# --- client mistakes and bad files ------------------------------------------------------------------------

@pytest.mark.parametrize("fields, field, fragments", [
    ({"loras": ["nope:1"]}, "loras", ["'nope'", ", ".join(LORAS)]),
    ({"loras": "tiny_kohya:0.5,nope:1"}, "loras", ["'nope'"]),
    ({"loras": ["tiny_kohya:4.5"]}, "loras", ["between -4 and 4", "4.5"]),
    ({"prompt": "a house <lora:tiny_kohya:-5>"}, "prompt", ["between -4 and 4"]),
    ({"prompt": "a house <lora:nope:1>"}, "loras", ["'nope'"]),  # the tag's name is checked in the store
    ({"vae": "tiny"}, "vae", ["full", "taesd"]),
])
def test_unknown_adapters_and_weights_out_of_range_are_400s_naming_the_field(served, fields, field, fragments):
    response = post(served, body(**fields))
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["field"] == field, answer
    for fragment in fragments:
        assert fragment in answer["error"], answer


def preview_sizes(served: Served, **fields: Any) -> list[tuple[int, int]]:
    """The sizes of a stream's previews (one every step)."""
    with post(served, body(stream="true", preview_every=1, **fields), stream=True) as response:
        assert response.status_code == 200, response.text
        events = [json.loads(line) for line in response.iter_lines() if line]
    assert events[-1]["event"] == "result"
    return [Image.open(io.BytesIO(base64.b64decode(e["preview"]))).size for e in events[:-1] if "preview" in e]


def test_vae_taesd_without_a_usable_taesd_is_a_400_and_previews_fall_back(served):
    """TAESD's folder taken away, then back with a file that is no checkpoint: vae=taesd is refused naming the
    field, previews fall back to the latent's colours (the latent's size), the full VAE still decodes."""
    taesd, away = served.store / "taesd", served.store.parent / "taesd.away"
    taesd.rename(away)
    try:
        poll(lambda: not any(e["kind"] == "taesd" for e in listing(served).values()), what="TAESD's removal")
        response = post(served, body(vae="taesd"))
        assert response.status_code == 400, response.text
        assert response.json()["field"] == "vae" and "taesd/" in response.json()["error"]
        assert preview_sizes(served) == [(8, 8)] * (STEPS - 1)
        taesd.mkdir()
        (taesd / "taesd_decoder.pth").write_bytes(b"not a checkpoint")
        entry = poll(lambda: listing(served).get("taesd_decoder"), what="the broken TAESD")
        assert "error" in entry
        response = post(served, body(vae="taesd"))
        assert response.status_code == 400, response.text
        assert response.json()["field"] == "vae" and "unusable" in response.json()["error"]
        assert preview_sizes(served) == [(8, 8)] * (STEPS - 1)
        assert post(served, body(seed=1)).status_code == 200
    finally:
        shutil.rmtree(taesd, ignore_errors=True)
        away.rename(taesd)
    poll(lambda: {"taesd_decoder", "taesd_encoder"} <= {n for n, e in listing(served).items() if "error" not in e},
         what="TAESD's return")
    assert post(served, body(vae="taesd")).status_code == 200


def test_a_broken_file_dropped_in_while_serving_is_listed_refused_and_harms_nothing_else(served):
    pids = served.server.ready_worker_pids()
    truncated = (served.store / "loras" / "tiny_kohya.safetensors").read_bytes()[:500]
    broken = served.store / "loras" / "broken.safetensors"
    broken.write_bytes(truncated)
    try:
        entry = poll(lambda: listing(served).get("broken"), what="the broken file")
        assert entry["kind"] == "lora" and entry["size"] == 500
        assert entry["sha256"] == hashlib.sha256(truncated).hexdigest()
        assert "broken.safetensors" in entry["error"] and "rank" not in entry
        for loras in (["broken:1"], ["tiny_kohya:1", "broken:0.5"]):
            refused = post(served, body(loras=loras))
            assert refused.status_code == 400, refused.text
            answer = refused.json()
            assert answer["field"] == "loras" and "broken" in answer["error"] and "unusable" in answer["error"]
        still = post(served, body(loras=["tiny_kohya:1", "detail:0.5"]))
        assert [lora["name"] for lora in still.json()["parameters"]["adapters"]["loras"]] == ["tiny_kohya", "detail"]
        assert all("error" not in e for name, e in listing(served).items() if name != "broken")
    finally:
        broken.unlink()
    assert served.server.ready_worker_pids() == pids and worker_deaths(served) == []
    assert "Traceback" not in served.server.model_log()  # a bad file is a warning and a 400, never an exception


def test_a_lora_copied_in_while_serving_is_usable_at_once_and_gone_when_removed(served):
    fresh = served.store / "loras" / "fresh.safetensors"
    shutil.copyfile(served.store / "loras" / "detail.safetensors", fresh)
    try:
        entry = poll(lambda: (e := listing(served).get("fresh")) and "error" not in e and e, what="the new LoRA")
        assert entry["sha256"] == served.sha256("loras/detail.safetensors") and entry["rank"] == 2
        used = post(served, body(loras=["fresh:1"]))
        assert used.json()["parameters"]["adapters"]["loras"] == [
            {"name": "fresh", "weight": 1.0, "sha256": entry["sha256"]}]
        assert np.array_equal(image_of(used), image_of(post(served, body(loras=["detail:1"]))))  # the same file
    finally:
        fresh.unlink()
    poll(lambda: "fresh" not in listing(served), what="the LoRA's removal")
    gone = post(served, body(loras=["fresh:1"]))
    assert gone.status_code == 400 and gone.json()["field"] == "loras" and "'fresh'" in gone.json()["error"]


def test_an_embedding_added_while_serving_changes_its_prompt_and_its_removal_restores_it(served):
    """The prompt's text-encoder context is cached: an embedding's arrival and removal must reach it."""
    plain = post(served, body(prompt="a glossy house"))
    assert plain.json()["parameters"]["adapters"]["embeddings"] == []
    glossy = served.store / "embeddings" / "glossy.pt"
    write_embedding(glossy, load_config(TINY_CONFIG).text.width, 2, seed=9)
    try:
        poll(lambda: (e := listing(served).get("glossy")) and "error" not in e, what="the new embedding")
        used = post(served, body(prompt="a glossy house"))
        assert used.json()["parameters"]["adapters"]["embeddings"] == [
            {"name": "glossy", "sha256": served.sha256("embeddings/glossy.pt")}]
        assert clearly_differ(image_of(used), image_of(plain))
    finally:
        glossy.unlink()
    poll(lambda: "glossy" not in listing(served), what="the embedding's removal")
    again = post(served, body(prompt="a glossy house"))
    assert again.json()["parameters"]["adapters"]["embeddings"] == []
    assert np.array_equal(image_of(again), image_of(plain))


def test_a_lora_replaced_then_removed_during_a_request_leaves_that_request_as_it_began(served):
    """The request resolved its LoRA when admitted: the file rewritten with other weights, then removed, between
    its steps changes neither its image nor its record; the listing follows the files meanwhile."""
    steps = 60  # a few seconds: the store looks again at most once a second
    moving = served.store / "loras" / "moving.safetensors"
    shutil.copyfile(served.store / "loras" / "detail.safetensors", moving)
    sha = served.sha256("loras/detail.safetensors")
    try:
        poll(lambda: listing(served).get("moving", {}).get("sha256") == sha, what="the new LoRA")
        log_before = len(served.server.model_log())
        with post(served, body(loras=["moving:1"], ddim_steps=steps, stream="true"), stream=True) as response:
            lines = response.iter_lines()
            assert json.loads(next(lines))["step"] == 1
            replacement = moving.with_suffix(".part")
            shutil.copyfile(served.store / "loras" / "tiny_peft.safetensors", replacement)
            replacement.replace(moving)  # as an operator updates a file: written aside, renamed over
            poll(lambda: listing(served)["moving"]["sha256"] == served.sha256("loras/tiny_peft.safetensors"),
                 what="the rewrite")
            moving.unlink()
            poll(lambda: "moving" not in listing(served), what="the removal")
            events = [json.loads(line) for line in lines if line]
    finally:
        moving.unlink(missing_ok=True)
    result = events[-1]
    assert result["event"] == "result" and events[-2]["step"] == events[-2]["steps"]
    assert result["parameters"]["adapters"]["loras"] == [{"name": "moving", "weight": 1.0, "sha256": sha}]
    log = served.server.model_log()[log_before:]
    changes = re.findall(r"adapter store .*|request \S+ done", log)
    # the rewrite came while it ran (the removal too, or just after its last step on a fast machine)
    assert "lora moving" in changes[0] and any(change.endswith(" done") for change in changes[1:]), changes
    alone = post(served, body(loras=["detail:1"], ddim_steps=steps))
    assert np.array_equal(png_pixels(base64.b64decode(result["images"][0])), image_of(alone))


# --- batching and streaming -------------------------------------------------------------------------------

def test_concurrent_requests_with_other_loras_evaluate_apart_in_the_same_steps(served):
    requests_fields = [{"loras": ["tiny_kohya:1"], "seed": 21}, {"loras": ["detail:1"], "seed": 22}, {"seed": 23}]
    log_before = len(served.server.model_log())
    responses: list = [None] * len(requests_fields)
    barrier = threading.Barrier(len(requests_fields))

    def send(index: int) -> None:
        barrier.wait()
        responses[index] = post(served, body(**requests_fields[index]))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests_fields))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in responses] == [200, 200, 200], [r.text for r in responses]
    poll(lambda: "evaluating 3 request(s) in 3 evaluation(s) of 1+1+1 sample(s)"
         in served.server.model_log()[log_before:], what="one step evaluating the three apart")
    for fields, batched in zip(requests_fields, responses):
        recorded = batched.json()["parameters"]["adapters"]["loras"]
        assert [lora["name"] for lora in recorded] == [entry.split(":")[0] for entry in fields.get("loras", [])]
        assert max_diff(image_of(batched), image_of(post(served, body(**fields)))) <= 1


def test_streamed_previews_are_taesd_decodes_of_the_outputs_size(served):
    assert preview_sizes(served, seed=3) == [(64, 64)] * (STEPS - 1)  # none with the last step: the result follows


# --- the command-line tools -------------------------------------------------------------------------------

def run_generate(tiny_checkpoint: Path, out: Path, store: Path | None, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "scripts" / "generate.py"), "--checkpoint", str(tiny_checkpoint),
               "--config", str(TINY_CONFIG), "--image", str(HOUSE_FILE), "--prompt", "a house",
               "--image-resolution", "64", "--ddim-steps", str(STEPS), "--seed", "5", "--precision", "fp32",
               "--out", str(out), *(["--adapters", str(store)] if store is not None else []), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_generate_py_uses_the_store_records_it_and_matches_the_server(served, tiny_checkpoint, tmp_path):
    done = run_generate(tiny_checkpoint, tmp_path / "result.zip", served.store, "--loras", "tiny_kohya:0.5",
                        "--loras", "detail:-1", "--vae", "taesd")
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(tmp_path / "result.zip") as bundle:
        params = yaml.safe_load(bundle.read("params.yaml"))
        offline = png_pixels(bundle.read("sample_00.png"))
    record = every_adapter_record(served)
    assert params["adapters"] == {
        "loras": [{"name": "tiny_kohya", "weight": 0.5, "sha256": served.sha256("loras/tiny_kohya.safetensors")},
                  {"name": "detail", "weight": -1.0, "sha256": served.sha256("loras/detail.safetensors")}],
        "embeddings": [], "taesd": record["taesd"]}
    online = post(served, body(seed=5, loras=["tiny_kohya:0.5", "detail:-1"], vae="taesd"))
    assert max_diff(offline, image_of(online)) <= 1


@pytest.mark.parametrize("store, args, fragments", [
    ("served", ["--loras", "nope:1"], ["loras", "'nope'", "tiny_kohya"]),
    ("served", ["--prompt", "a house <lora:tiny_kohya:9>"], ["prompt", "between -4 and 4"]),
    (None, ["--loras", "tiny_kohya:1"], ["loras", "give --adapters DIR"]),
    (None, ["--vae", "taesd"], ["vae", "give --adapters DIR"]),
    ("missing", ["--loras", "tiny_kohya:1"], ["missing: not a directory"]),
])
def test_generate_py_refuses_what_it_cannot_use_naming_it(served, tiny_checkpoint, tmp_path, store, args, fragments):
    store = {"served": served.store, None: None, "missing": tmp_path / "missing"}[store]
    unmeasured = ["--backend", "prepack=none", "--backend", "winograd=none", "--backend", "attention=torch"]
    refused = run_generate(tiny_checkpoint, tmp_path / "result.zip", store, *args, *unmeasured)
    assert refused.returncode != 0
    for fragment in fragments:
        assert fragment in refused.stderr, refused.stderr
    assert not (tmp_path / "result.zip").exists()


def test_client_generate_with_a_lora_saves_its_record_and_taesd_previews(served, tmp_path):
    done = run_client(served, "generate", "--image", str(HOUSE_FILE), "--prompt", "a house", "--lora", "tiny_peft=0.5",
                      "--param", f"ddim_steps={STEPS}", "--param", "seed=2", "--preview-every", "1",
                      "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    params = json.loads((tmp_path / "out" / "params.json").read_text())
    assert params["adapters"]["loras"] == [
        {"name": "tiny_peft", "weight": 0.5, "sha256": served.sha256("loras/tiny_peft.safetensors")}]
    previews = sorted((tmp_path / "out" / "previews").iterdir())
    assert len(previews) == STEPS - 1 and all(Image.open(p).size == (64, 64) for p in previews)
    refused = run_client(served, "generate", "--image", str(HOUSE_FILE), "--prompt", "a house", "--lora", "nope=1",
                         "--out", str(tmp_path / "refused"))
    assert refused.returncode != 0 and "HTTP 400" in refused.stderr and "'nope'" in refused.stderr, refused.stderr
    assert not (tmp_path / "refused").exists()


def test_client_sweep_over_a_lora_weight_records_it_and_resumes(served, tmp_path):
    out = tmp_path / "dataset"
    command = ["sweep", "--image", str(HOUSE_FILE), "--out", str(out), "--prompt", "a house", "--seed", "4",
               "--lora", "tiny_kohya=0:1:0.5", "--param", f"ddim_steps={STEPS}", "--concurrency", "2"]
    first = run_client(served, *command)
    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    sha = served.sha256("loras/tiny_kohya.safetensors")
    assert sorted(row["request"]["loras"] for row in rows) == ["tiny_kohya:0", "tiny_kohya:0.5", "tiny_kohya:1"]
    for row in rows:
        weight = float(row["request"]["loras"].split(":")[1])
        assert row["loras"] == [f"tiny_kohya:{weight:g}"]
        assert row["adapters"] == {"loras": [{"name": "tiny_kohya", "weight": weight, "sha256": sha}],
                                   "embeddings": [], "taesd": []}
        assert read_png_parameters((out / row["file"]).read_bytes())["adapters"] == row["adapters"]
    images = {row["request"]["loras"]: png_pixels((out / row["file"]).read_bytes()) for row in rows}
    assert clearly_differ(images["tiny_kohya:0"], images["tiny_kohya:1"])
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    again = run_client(served, *command)
    assert again.returncode == 0, again.stderr
    assert "3 items in the grid, 3 already in" in again.stdout
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == written
