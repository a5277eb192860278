#!/usr/bin/env python3
"""Bounded load test of the TorchServe endpoint (`make load`).

Starts its own TorchServe on loopback with the tiny model (the shipped config.properties and model-config.yaml
on free ports, token authorization on) unless --url is given, then:

1. steady load: --clients concurrent clients send generations (multipart, zip output) for --duration seconds
   or --max-requests requests, whichever comes first; every response must be a 200 with a valid bundle
   (the sample PNGs decode at the asked size and carry their seeds, params.yaml agrees); with fewer clients
   than the job queue holds, any other status (503 included) is unexpected. Reports status counts, p50/p95/max
   latency, requests/s and images/s;
2. overflow: --burst simultaneous requests, more than the job queue holds (job_queue_size, 32): the surplus
   must get TorchServe's 503 quickly, the rest valid bundles;
3. recovery: --recovery sequential requests after the burst, all 200;
4. mixed: --mixed requests from --clients clients, every other one hostile (scripts/hostile.py: decode stalls,
   memory amplification, conversion crashes, cost bombs, oversized echoes, unacceptable Accept, malformed
   multipart): each hostile request must get its expected refusal (or, for the costly-to-decode uploads that are
   in range, a 200), every normal one a valid bundle, and the worker must stay the same process. Reports the
   worker's resident memory: VmRSS before and after, VmHWM (its peak over its life) after.

Prints a JSON summary (also written to --out) and exits 1 when a check fails. Only ever sends to the server it
started or to --url; every loop is bounded in count and time.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import threading
import time
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "handler"))

import hostile  # noqa: E402
from controlnet_canny.bundle import read_png_parameters  # noqa: E402
from live_server import HOUSE, png_header_only, tiny_server  # noqa: E402

TINY = ROOT / "artifacts" / "tiny" / "control_tiny_canny.pth"


def check_bundle(content: bytes, seed: int, samples: int, size: int) -> str | None:
    """None when `content` is the bundle asked for, else what is wrong with it."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as bundle:
            names = [f"sample_{i:02d}.png" for i in range(samples)] + ["edge_map.png", "params.yaml"]
            if bundle.namelist() != names:
                return f"entries {bundle.namelist()}"
            params = yaml.safe_load(bundle.read("params.yaml"))
            if params["seeds"] != [seed + i for i in range(samples)]:
                return f"seeds {params['seeds']}"
            for i in range(samples):
                png = bundle.read(f"sample_{i:02d}.png")
                if Image.open(io.BytesIO(png)).size != (size, size):
                    return f"sample {i} size"
                if read_png_parameters(png)["seed"] != seed + i:
                    return f"sample {i} seed"
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, TypeError, yaml.YAMLError) as err:
        return f"{type(err).__name__}: {err}"
    return None


class Load:
    def __init__(self, url: str, key: str, steps: int):
        self.url, self.headers, self.steps = url, {"Authorization": f"Bearer {key}"}, steps
        self.lock = threading.Lock()
        self.local = threading.local()

    def session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        return self.local.session

    def one(self, seed: int, samples: int, steps: int | None = None) -> dict:
        """One generation; its status, latency, images and (for a 200) whether the bundle is valid."""
        fields = {"prompt": "a house", "seed": seed, "num_samples": samples, "ddim_steps": steps or self.steps}
        start = time.perf_counter()
        try:
            response = self.session().post(self.url, headers=self.headers, files={"image": ("house.png", HOUSE)},
                                           data={k: str(v) for k, v in fields.items()}, timeout=600)
        except requests.RequestException as err:
            return {"status": "error", "seconds": time.perf_counter() - start, "detail": repr(err)[:200]}
        seconds = time.perf_counter() - start
        result = {"status": response.status_code, "seconds": seconds, "images": 0}
        if response.status_code == 200:
            problem = check_bundle(response.content, seed, samples, 64)
            result["images"] = samples if problem is None else 0
            if problem:
                result["invalid"] = problem
        else:
            result["detail"] = response.text[:300]
        return result


def _malformed_multipart() -> dict:
    body, content_type = hostile.multipart([(b'Content-Disposition: form-data; name=""', b"x")])
    return {"data": body, "headers": {"Content-Type": content_type}}


# (name, requests keyword arguments, the statuses it may get). Built once: some take a second to encode.
HOSTILE = [
    ("JPEG 4096x4096 repeating its last scan", lambda: {"files": {"image": ("a.jpg", hostile.progressive_jpeg_repeating_scans(4096, 200))}, "data": {"prompt": "a"}}, (400,)),
    ("JPEG 4096x4096 progressive, in range", lambda: {"files": {"image": ("a.jpg", hostile.progressive_jpeg_repeating_scans(4096, 0))}, "data": {"mode": "edges"}}, (200,)),
    ("RGBA WebP 4096x4096 of a few hundred bytes", lambda: {"files": {"image": ("a.webp", hostile.flat_rgba_webp(4096))}, "data": {"mode": "edges"}}, (200,)),
    ("palette PNG with a 400-entry tRNS", lambda: {"files": {"image": ("a.png", hostile.palette_png_with_long_trns(8, 400))}, "data": {"prompt": "a"}}, (400,)),
    ("4:1 image at image_resolution 768", lambda: {"files": {"image": ("a.png", hostile.elongated_png(256, 64))}, "data": {"prompt": "a", "image_resolution": "768"}}, (400,)),
    ("PNG header declaring 60000x60000", lambda: {"files": {"image": ("a.png", png_header_only(60000, 60000))}, "data": {"prompt": "a"}}, (400,)),
    ("unknown field with a 1 MB name", lambda: {"files": {"image": ("a.png", HOUSE)}, "data": {"prompt": "a", "z" * 2**20: "1"}}, (400,)),
    ("Accept: text/html", lambda: {"files": {"image": ("a.png", HOUSE)}, "data": {"prompt": "a"}, "headers": {"Accept": "text/html"}}, (406,)),
    ("multipart part with an empty name", _malformed_multipart, (500,)),  # TorchServe's frontend, before the handler
]


def rss_kib(pid: int) -> dict:
    """The process's resident memory now (VmRSS) and at its peak so far (VmHWM), KiB."""
    values = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(values[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def mixed(load: Load, clients: int, total: int, worker: int | None) -> dict:
    """Every other request hostile; hostile requests get their expected status, normal ones valid bundles."""
    built = [(name, make(), statuses) for name, make, statuses in HOSTILE]
    before = rss_kib(worker) if worker else None
    results: list[dict] = []
    hostile_wrong: list[dict] = []
    counter = iter(range(total))

    def client() -> None:
        session = requests.Session()
        while (n := next(counter, None)) is not None:
            if n % 2 == 0:
                result = load.one(seed=20000 + n, samples=1)
                with load.lock:
                    results.append(result)
                continue
            name, kwargs, statuses = built[(n // 2) % len(built)]
            try:
                response = session.post(load.url, timeout=600, **{**kwargs, "headers": {**load.headers, **kwargs.get("headers", {})}})
                status, text = response.status_code, response.text[:200]
            except requests.RequestException as err:
                status, text = "error", repr(err)[:200]
            if status not in statuses:
                with load.lock:
                    hostile_wrong.append({"case": name, "status": status, "detail": text})

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    summary = summarize(results, time.monotonic() - start)
    summary["hostile_requests"] = total // 2
    summary["hostile_unexpected"] = hostile_wrong[:20]
    if worker:
        summary["worker_memory_kib"] = {**{f"{k}_before": v for k, v in before.items()},
                                        **{f"{k}_after": v for k, v in rss_kib(worker).items()}}
    return summary


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize(results: list[dict], seconds: float, expected: tuple = (200,)) -> dict:
    ok = [r["seconds"] for r in results if r["status"] == 200]
    return {
        "requests": len(results),
        "wall_seconds": round(seconds, 1),
        "status_counts": dict(sorted(Counter(str(r["status"]) for r in results).items())),
        "unexpected": [r for r in results if r["status"] not in expected][:10],
        "invalid_bundles": [r["invalid"] for r in results if "invalid" in r][:10],
        "latency_200_seconds": {
            "p50": round(percentile(ok, 50), 3) if ok else None,
            "p95": round(percentile(ok, 95), 3) if ok else None,
            "max": round(max(ok), 3) if ok else None,
        },
        "throughput": {
            "requests_per_second": round(len(ok) / seconds, 2),
            "images_per_second": round(sum(r["images"] for r in results) / seconds, 2),
        },
    }


def steady(load: Load, clients: int, duration: float, max_requests: int) -> dict:
    results: list[dict] = []
    deadline = time.monotonic() + duration
    counter = iter(range(max_requests))

    def client(index: int) -> None:
        while time.monotonic() < deadline:
            with load.lock:
                n = next(counter, None)
            if n is None:
                return
            result = load.one(seed=1000 * index + n, samples=1 + n % 2)
            with load.lock:
                results.append(result)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize(results, time.monotonic() - start)


def overflow(load: Load, burst: int, steps: int) -> dict:
    barrier = threading.Barrier(burst)

    def send(n: int) -> dict:
        barrier.wait(timeout=60)
        return load.one(seed=n, samples=1, steps=steps)

    start = time.monotonic()
    with ThreadPoolExecutor(burst) as pool:
        results = list(pool.map(send, range(burst)))
    summary = summarize(results, time.monotonic() - start, expected=(200, 503))
    refused = [r for r in results if r["status"] == 503]
    summary["503_latency_max_seconds"] = round(max(r["seconds"] for r in refused), 3) if refused else None
    summary["503_body"] = refused[0]["detail"] if refused else None
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients in the steady phase")
    parser.add_argument("--duration", type=float, default=120, help="seconds of steady load (at most)")
    parser.add_argument("--max-requests", type=int, default=3000, help="requests of steady load (at most)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per generation (64x64, tiny model)")
    parser.add_argument("--burst", type=int, default=80, help="simultaneous requests of the overflow phase")
    parser.add_argument("--burst-steps", type=int, default=30, help="DDIM steps in the burst (slow: the queue fills)")
    parser.add_argument("--recovery", type=int, default=10, help="sequential requests after the burst")
    parser.add_argument("--mixed", type=int, default=90, help="requests of the mixed run, every other one hostile")
    parser.add_argument("--url", help="an already running endpoint .../predictions/<model> (else one is started)")
    parser.add_argument("--key", help="its inference key (with --url)")
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 1 <= args.burst <= 256 or args.duration > 900 or not 0 <= args.mixed <= 2000:
        parser.error("clients 1-64, burst 1-256, duration at most 900 s, mixed 0-2000")

    def run(url: str, key: str, worker: int | None = None) -> dict:
        load = Load(url, key, args.steps)
        report = {"settings": {k: v for k, v in vars(args).items() if k not in ("key", "out")}}
        report["steady"] = steady(load, args.clients, args.duration, args.max_requests)
        report["overflow"] = overflow(load, args.burst, args.burst_steps)
        start = time.monotonic()
        report["recovery"] = summarize([load.one(seed=9000 + i, samples=1) for i in range(args.recovery)],
                                       time.monotonic() - start)
        report["mixed"] = mixed(load, args.clients, args.mixed, worker)
        return report

    if args.url:
        report = run(args.url, args.key or "")
    else:
        if not TINY.is_file():
            sys.exit(f"error: {TINY} is missing; run `make tiny` first")
        with tiny_server(TINY, prefix="torchserve_load_") as server:  # one torch thread per worker
            worker = server.ready_worker_pids()[0]
            report = run(server.url, server.key("inference"), worker)
            report["server"] = {"worker_pid_at_start": worker, "worker_pids_at_end": server.ready_worker_pids()}

    steady_report, burst = report["steady"], report["overflow"]
    checks = {
        "steady: no unexpected status": not steady_report["unexpected"],
        "steady: every 200 a valid bundle": not steady_report["invalid_bundles"],
        "overflow: surplus refused with 503": burst["status_counts"].get("503", 0) > 0,
        "overflow: only 200 (valid bundles) and 503": not burst["unexpected"] and not burst["invalid_bundles"],
        "recovery: all 200 with valid bundles": report["recovery"]["status_counts"] == {"200": args.recovery}
                                                 and not report["recovery"]["invalid_bundles"],
        "mixed: every normal request a valid bundle": not report["mixed"]["unexpected"]
                                                      and not report["mixed"]["invalid_bundles"],
        "mixed: every hostile request refused as expected": not report["mixed"]["hostile_unexpected"],
    }
    if "server" in report:
        checks["the same worker process throughout"] = report["server"]["worker_pids_at_end"] == [
            report["server"]["worker_pid_at_start"]]
    report["checks"] = checks
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
