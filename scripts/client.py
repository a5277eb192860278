#!/usr/bin/env python3
"""Client of the ControlNet canny TorchServe endpoint.

  client.py ping                                            exit 0 when TorchServe answers /ping Healthy
  client.py ready                                           exit 0 when the model has a worker READY
  client.py describe                                        the management API's description of the model (JSON)
  client.py adapters                                        the adapter store's files: name, kind, rank, size, sha256
  client.py scale-workers 2                                 the model's workers set to 2, waiting until they run
  client.py generate --image in.png --prompt "a house" --out result/
      streams progress (a bar per DDIM step) and saves sample_00.png..., edge_map.png, params.json;
      --preview-every N also saves the live previews as previews/step_NN.jpg while they arrive
  client.py sweep --image in.png --out dataset/ --prompt "a house" "a barn" --seed 0:9:1 --strength 0.5:1.5:0.5
      runs the grid (every combination) with bounded concurrency, writes the images and manifest.jsonl
      (one row per image: every parameter, its own seed and control_fidelity); run it again to resume:
      items already in the manifest are skipped. --lora NAME=0:1:0.25 makes a LoRA's weight an axis too.

Numeric grid values are numbers or inclusive ranges START:STOP:STEP. Other request fields go in
--param NAME=VALUE (e.g. --param ddim_steps=30). The API key is read from TorchServe's key_file.json.
The seed axis lists image seeds: with --param num_samples=N a request makes the images of seeds s .. s+N-1,
so the sweep sends one request per N seeds and never generates a seed twice.

ready, describe and scale-workers call the management API (--management-url) with the management key; where
there is no key file (token authorization off, as in the Kubernetes pods) they send none. Standing in for curl,
which the image does not have: `kubectl exec deploy/controlnet-canny -- .venv/bin/python scripts/client.py
scale-workers 2`.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import requests
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
GRID_AXES = {  # option -> (request field, value type)
    "prompt": ("prompt", str),
    "seed": ("seed", int),
    "strength": ("strength", float),
    "scale": ("scale", float),
    "low_threshold": ("low_threshold", int),
    "high_threshold": ("high_threshold", int),
    "ddim_steps": ("ddim_steps", int),
    "sampler": ("sampler", str),
    "karras": ("karras", str),
    "guidance_start": ("guidance_start", float),
    "guidance_end": ("guidance_end", float),
    "control_mode": ("control_mode", str),
    "resize_mode": ("resize_mode", str),
    "denoising_strength": ("denoising_strength", float),
    "guidance_interval": ("guidance_interval", str),
    "token_merging_ratio": ("token_merging_ratio", float),
}
IMAGE_OPTIONS = ("image", "control_image", "init_image")  # the request's file fields
MANIFEST = "manifest.jsonl"


class Client:
    def __init__(self, url: str, model: str, key: str):
        self.url = url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {key}"}
        self._local = threading.local()  # a requests.Session per thread

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def ping(self) -> bool:
        response = self.session.get(f"{self.url}/ping", headers=self.headers, timeout=10)
        return response.ok and response.json().get("status") == "Healthy"

    def predict(self, images: dict[str, Path], fields: dict, stream: bool = False) -> requests.Response:
        """`images`: file field name (image, control_image, init_image) to path. `fields` may name the request
        (request_id), so that `cancel` can stop it."""
        data = {name: str(value).lower() if isinstance(value, bool) else str(value) for name, value in fields.items()}
        return self.session.post(
            f"{self.url}/predictions/{self.model}", headers=self.headers, data=data,
            files={name: (path.name, path.read_bytes()) for name, path in images.items()}, stream=stream, timeout=3600,
        )

    def cancel(self, request_id: str) -> None:
        """Stops the request of that request_id at its next step, on whichever worker holds it (202)."""
        self.session.post(f"{self.url}/predictions/{self.model}", headers=self.headers,
                          json={"mode": "cancel", "request_id": request_id}, timeout=30)


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_images(args: argparse.Namespace) -> dict[str, Path]:
    images = {name: getattr(args, name) for name in IMAGE_OPTIONS if getattr(args, name) is not None}
    if "image" not in images and "control_image" not in images:
        sys.exit("error: give --image, or --control-image")
    return images


def fail(response: requests.Response) -> None:
    try:
        detail = response.json()
    except ValueError:
        detail = response.text[:500]
    sys.exit(f"error: HTTP {response.status_code}: {detail}")


def save_result(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "edge_map.png", out / "params.json"]
    written[0].write_bytes(base64.b64decode(result["edge_map"]))
    written[1].write_text(json.dumps(result["parameters"], indent=2) + "\n")
    for index, png in enumerate(result["images"]):
        written.append(out / f"sample_{index:02d}.png")
        written[-1].write_bytes(base64.b64decode(png))
    return written


def lora_field(fixed: str | None, weights: list[tuple[str, float]]) -> str:
    """The loras field as text: the fixed --param loras=... entries, then NAME:WEIGHT for each --lora."""
    return ",".join(([fixed] if fixed else []) + [f"{name}:{weight:g}" for name, weight in weights])


def lora_option(text: str) -> tuple[str, str]:
    """--lora NAME=VALUE(S)."""
    name, separator, values = text.rpartition("=")
    if not separator or not name or not values:
        sys.exit(f"error: --lora {text!r}: expected NAME=WEIGHT (or NAME=START:STOP:STEP in a sweep)")
    return name, values


def generate(client: Client, args: argparse.Namespace) -> None:
    request_id = new_request_id()
    fields = {**parse_params(args.param), "prompt": args.prompt, "stream": True, "request_id": request_id}
    if args.lora:
        try:
            weights = [(name, float(value)) for name, value in map(lora_option, args.lora)]
        except ValueError as err:
            sys.exit(f"error: --lora: {err}")
        fields["loras"] = lora_field(fields.get("loras"), weights)
    if args.edges:
        fields["mode"] = "edges"
    if args.preview_every:
        fields["preview_every"] = args.preview_every
    previews = args.out / "previews"
    result = None

    def interrupted() -> None:
        client.cancel(request_id)  # the server stops it at its next step instead of finishing it for nobody
        sys.exit(f"interrupted: request {request_id} cancelled")

    try:
        response = client.predict(request_images(args), fields, stream=True)  # the headers come with the first step
    except KeyboardInterrupt:
        interrupted()
    if response.status_code != 200:
        fail(response)
    with response, tqdm(desc="denoising", unit="step", disable=args.edges) as bar:
        try:  # inside the stream: the cancel reaches the request before the closed connection would drop it
            for line in filter(None, response.iter_lines()):
                event = json.loads(line)
                if event["event"] == "progress":
                    bar.total = event["steps"]
                    bar.update(event["step"] - bar.n)
                    if "preview" in event:
                        previews.mkdir(parents=True, exist_ok=True)
                        frame = previews / f"step_{event['step']:02d}.jpg"
                        frame.write_bytes(base64.b64decode(event["preview"]))
                        bar.set_postfix_str(f"preview {frame}")
                elif event["event"] == "error":
                    sys.exit(f"error: {event['error']}")
                else:
                    result = event
        except KeyboardInterrupt:
            interrupted()
    if result is None:
        sys.exit("error: the stream ended without a result")
    for path in save_result(result, args.out):
        print(path)
    if previews.is_dir():
        print(f"previews: {previews}/ ({len(list(previews.glob('step_*.jpg')))} frames)")
    print(f"seeds: {result['parameters']['seeds']}")
    for warning in result["parameters"].get("warnings") or []:
        print(f"warning: {warning}", file=sys.stderr)


def numbers(text: str, kind: type) -> list:
    """'5' -> [5]; '0.5:1.5:0.5' -> [0.5, 1.0, 1.5] (inclusive). Raises ValueError."""
    if ":" not in text:
        return [kind(text)]
    start, stop, step = (kind(part) for part in text.split(":"))
    if step <= 0:
        raise ValueError(f"{text}: the step must be positive")
    count = int(round((stop - start) / step, 9)) + 1
    return [kind(round(start + i * step, 9)) for i in range(max(count, 0))]


def parse_params(pairs: list[str]) -> dict:
    fields = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"error: --param {pair!r}: expected NAME=VALUE")
        fields[name] = value
    return fields


def grid(args: argparse.Namespace) -> list[dict]:
    axes = []
    for option, (field, kind) in GRID_AXES.items():
        values = getattr(args, option)
        if values:
            try:
                expanded = values if kind is str else [v for text in values for v in numbers(text, kind)]
            except ValueError as err:
                sys.exit(f"error: --{option.replace('_', '-')}: {err}")
            axes.append([(field, value) for value in expanded])
    for name, values in map(lora_option, args.lora):
        try:
            axes.append([("lora", (name, weight)) for weight in numbers(values, float)])
        except ValueError as err:
            sys.exit(f"error: --lora {name}={values}: {err}")
    fixed = parse_params(args.param)
    try:
        samples = int(fixed.get("num_samples", 1))
    except ValueError:
        sys.exit(f"error: --param num_samples={fixed['num_samples']!r}: not an integer")
    axes = [request_seeds(axis, samples) if axis and axis[0][0] == "seed" else axis for axis in axes]
    items = []
    for combination in itertools.product(*axes):
        fields = {**fixed, **{field: value for field, value in combination if field != "lora"}}
        weights = [value for field, value in combination if field == "lora"]
        if weights:
            fields["loras"] = lora_field(fixed.get("loras"), weights)
        items.append(fields)
    return items


def request_seeds(axis: list[tuple[str, int]], samples: int) -> list[tuple[str, int]]:
    """The seed axis lists image seeds; a request with num_samples N makes those of seeds s .. s+N-1. One request
    per seed would make neighbouring requests overlap (seed 1 twice for 0:1:1 with N = 2): a request starts at
    each listed seed that no earlier request covers. -1 (random) stays one request."""
    starts, covered = [], set()
    for _, seed in sorted(axis, key=lambda entry: entry[1]):
        if seed in covered:
            continue
        starts.append(("seed", seed))
        if seed != -1:
            covered.update(range(seed, seed + samples))
    return starts


def item_id(fields: dict, image_digest: str) -> str:
    """Stable across runs and grid changes: names the files and marks the item done in the manifest."""
    return hashlib.sha1(json.dumps([fields, image_digest], sort_keys=True).encode()).hexdigest()[:16]


def inputs_digest(images: dict[str, Path]) -> str:
    """The image's sha1 when it is the only file (as before control_image and init_image: older sweeps resume),
    else the sha1 of every file's sha1 by field name."""
    if set(images) == {"image"}:
        return hashlib.sha1(images["image"].read_bytes()).hexdigest()
    digests = {name: hashlib.sha1(path.read_bytes()).hexdigest() for name, path in images.items()}
    return hashlib.sha1(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def done_items(manifest: Path) -> set[str]:
    done = set()
    if manifest.exists():
        for line in manifest.read_text().splitlines():
            try:
                done.add(json.loads(line)["item"])
            except (ValueError, KeyError):
                continue  # a line cut short by an interrupted run: its item runs again
    return done


def sweep(client: Client, args: argparse.Namespace) -> None:
    items = grid(args)
    if not all("prompt" in fields for fields in items):
        sys.exit("error: give --prompt (one or more) or --param prompt=...")
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = args.out / MANIFEST
    images = request_images(args)
    image_digest = inputs_digest(images)
    done = done_items(manifest)
    pending = [fields for fields in items if item_id(fields, image_digest) not in done]
    print(f"{len(items)} items in the grid, {len(items) - len(pending)} already in {manifest}, {len(pending)} to run")
    if manifest.exists() and manifest.stat().st_size and not manifest.read_bytes().endswith(b"\n"):
        with manifest.open("a") as file:
            file.write("\n")  # end the line an interrupted run left unfinished

    in_flight: set[str] = set()  # request_ids, for the cancels an interrupt sends
    lock = threading.Lock()

    def run(fields: dict) -> dict:
        request_id = new_request_id()
        with lock:
            in_flight.add(request_id)
        try:
            response = client.predict(images, {**fields, "output": "json", "request_id": request_id})
        finally:
            with lock:
                in_flight.discard(request_id)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    failures = 0
    pool = ThreadPoolExecutor(max_workers=args.concurrency)
    try:
        with manifest.open("a") as rows, tqdm(total=len(pending), desc="sweep", unit="item") as bar:
            futures = {pool.submit(run, fields): fields for fields in pending}
            failures = _collect(futures, rows, bar, args, images, image_digest)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        with lock:
            cancelled = sorted(in_flight)
        for request_id in cancelled:
            client.cancel(request_id)
        sys.exit(f"interrupted: {len(cancelled)} request(s) in flight cancelled; run the same command again to resume")
    pool.shutdown()
    if failures:
        sys.exit(f"{failures} item(s) failed; run the same command again to retry them")


def _collect(futures: dict, rows, bar, args: argparse.Namespace, images: dict[str, Path], image_digest: str) -> int:
    """Writes each finished item's images, then its manifest lines; returns how many failed."""
    failures = 0
    for future in as_completed(futures):
        fields = futures[future]
        key = item_id(fields, image_digest)
        bar.update()
        try:
            result = future.result()
        except (RuntimeError, requests.RequestException) as err:
            failures += 1
            tqdm.write(f"item {key} {fields}: {err}")
            continue
        parameters = result["parameters"]
        lines = []
        for index, png in enumerate(result["images"]):
            name = f"{key}_{index:02d}.png"
            (args.out / name).write_bytes(base64.b64decode(png))
            lines.append(json.dumps({
                "item": key, "file": name, "sample_index": index, **parameters, "seed": parameters["seeds"][index],
                "control_fidelity": parameters["control_fidelity"][index],
                "request": fields, "image": str(images["image"]) if "image" in images else None,
                **{f"{name}_file": str(images[name]) for name in IMAGE_OPTIONS[1:] if name in images},
            }))
        rows.write("".join(line + "\n" for line in lines))  # after the images: a listed item is complete
        rows.flush()
    return failures


def adapters(client: Client, args: argparse.Namespace) -> None:
    response = client.session.post(f"{client.url}/predictions/{client.model}", headers=client.headers,
                                   json={"mode": "adapters"}, timeout=60)
    if response.status_code != 200:
        fail(response)
    print(json.dumps(response.json()["adapters"], indent=2))


def read_key(key_file: Path, kind: str) -> str:
    """kind: inference (port 8080) or management (port 8081)."""
    try:
        return json.loads(key_file.read_text())[kind]["key"]
    except (OSError, ValueError, KeyError) as err:
        sys.exit(f"error: cannot read the {kind} key from {key_file} ({err}); is TorchServe running?")


def management_headers(key_file: Path) -> dict[str, str]:
    """The management key's header; none where TorchServe wrote no key file (token authorization off)."""
    return {"Authorization": f"Bearer {read_key(key_file, 'management')}"} if key_file.exists() else {}


def model_url(args: argparse.Namespace) -> str:
    return f"{args.management_url.rstrip('/')}/models/{args.model}"


def model_ready(args: argparse.Namespace) -> bool:
    """/ping turns Healthy once the workers run, before they have loaded the model: ask the management API."""
    response = requests.get(model_url(args), headers=management_headers(args.key_file), timeout=10)
    return response.ok and any(w["status"] == "READY" for model in response.json() for w in model["workers"])


def describe(args: argparse.Namespace) -> None:
    response = requests.get(model_url(args), headers=management_headers(args.key_file), timeout=30)
    if response.status_code != 200:
        fail(response)
    print(json.dumps(response.json(), indent=2))


def scale_workers(args: argparse.Namespace) -> None:
    """Synchronous: TorchServe answers once the workers have started (a new worker loads the model first) or
    stopped; then the workers described are printed."""
    response = requests.put(model_url(args), headers=management_headers(args.key_file), timeout=args.timeout,
                            params={"min_worker": args.workers, "max_worker": args.workers, "synchronous": "true"})
    if response.status_code != 200:
        fail(response)
    print(response.json()["status"])
    described = requests.get(model_url(args), headers=management_headers(args.key_file), timeout=30)
    if described.status_code != 200:
        fail(described)
    for worker in described.json()[0]["workers"]:
        print(f"worker {worker['id']}: {worker['status']}")


def add_image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", type=Path, help="canny runs on it (required unless --control-image is given)")
    parser.add_argument("--control-image", type=Path, help="your own control map, sized like --image, not re-cannied")
    parser.add_argument("--init-image", type=Path, help="img2img: the image to start from")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="controlnet")
    parser.add_argument("--key-file", type=Path, default=ROOT / "artifacts" / "serve" / "key_file.json")
    parser.add_argument("--key", help="the inference key itself (default: read from --key-file)")
    parser.add_argument("--management-url", default="http://127.0.0.1:8081",
                        help="for ready, describe and scale-workers")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ping", help="exit 0 when TorchServe answers /ping Healthy")
    commands.add_parser("ready", help="exit 0 when the model has a worker READY (needs the management key)")
    commands.add_parser("describe", help="the model's description by the management API: workers, batching")
    commands.add_parser("adapters", help="the adapter store's files: name, kind, rank, size, sha256 (or their error)")
    scale = commands.add_parser("scale-workers", help="set the model's worker count, waiting until they run")
    scale.add_argument("workers", type=int, help="minimum and maximum workers (0 stops the model's workers)")
    scale.add_argument("--timeout", type=float, default=900,
                       help="seconds to wait for the answer (new workers load the model first; default 900)")

    one = commands.add_parser("generate", help="one request, with a progress bar")
    add_image_options(one)
    one.add_argument("--prompt", required=True)
    one.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    one.add_argument("--edges", action="store_true", help="the edge map only (no diffusion)")
    one.add_argument("--lora", action="append", default=[], metavar="NAME=WEIGHT",
                     help="a LoRA of the server's adapter store (repeat for more)")
    one.add_argument("--preview-every", type=int, default=0, metavar="N",
                     help="a preview every N steps, written to OUT/previews/step_NN.jpg as it arrives")
    one.add_argument("--out", type=Path, default=Path("result"))

    many = commands.add_parser("sweep", help="a parameter grid, resumable")
    add_image_options(many)
    many.add_argument("--out", type=Path, required=True)
    for option, (_, kind) in GRID_AXES.items():
        many.add_argument("--" + option.replace("_", "-"), nargs="+", metavar="VALUE" if kind is str else "N|A:B:STEP")
    many.add_argument("--lora", action="append", default=[], metavar="NAME=N|A:B:STEP",
                      help="a LoRA whose weight is an axis of the grid (repeat for more)")
    many.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="fixed for every item")
    many.add_argument("--concurrency", type=int, default=2, help="requests in flight at once")
    args = parser.parse_args(argv)
    if args.command == "sweep" and args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.command == "scale-workers" and args.workers < 0:
        parser.error("the worker count must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "ready":
        try:
            sys.exit(0 if model_ready(args) else 1)
        except requests.RequestException:
            sys.exit(1)
    if args.command in ("describe", "scale-workers"):
        {"describe": describe, "scale-workers": scale_workers}[args.command](args)
        return
    client = Client(args.url, args.model, args.key or read_key(args.key_file, "inference"))
    if args.command == "ping":
        try:
            sys.exit(0 if client.ping() else 1)
        except requests.RequestException:
            sys.exit(1)
    {"generate": generate, "sweep": sweep, "adapters": adapters}[args.command](client, args)


if __name__ == "__main__":
    main()
