#!/usr/bin/env python3
"""Soak test (`make soak`): many small generations against one worker, watching its memory and the temporary
directories.

Starts its own TorchServe on loopback with the tiny model (the shipped configuration on free ports, its own
TMPDIR) and sends --requests generations (64x64, few DDIM steps) from --clients clients, cycling through the
request variants (zip, json, png, stream, edges; one or two samples) so that the first requests already use
every code path. After every request it samples the worker's resident memory (VmRSS in /proc/<pid>/status;
the worker's pid from the management API) and the frontend's.

Checks: every response valid; the same worker process from start to end; worker RSS growth below --max-growth
(5 %) from request --baseline (20) to the end; no file left behind in the server's temporary directory (its
TMPDIR, where the workers and the JVM write) compared with request --baseline, nor a new entry in the system
temporary directory created by the server's processes (reported: other programs may write there too).
Prints a JSON summary (also written to --out) and exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]

from live_server import HOUSE, tiny_server  # noqa: E402

TINY = ROOT / "artifacts" / "tiny" / "control_tiny_canny.pth"
# (fields, expected content type); the edges variant runs no diffusion.
VARIANTS = [
    ({"num_samples": 1}, "application/zip"),
    ({"num_samples": 2, "output": "json"}, "application/json"),
    ({"output": "png"}, "image/png"),
    ({"stream": "true"}, "application/x-ndjson"),
    ({"num_samples": 2}, "application/zip"),
    ({"mode": "edges", "output": "png"}, "image/png"),
]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for {pid}")


def files_under(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")} if directory.exists() else set()


def valid(response: requests.Response, fields: dict, content_type: str) -> str | None:
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    if response.headers.get("Content-Type") != content_type:
        return f"content type {response.headers.get('Content-Type')}"
    samples = int(fields.get("num_samples", 1))
    try:
        if content_type == "application/zip":
            with zipfile.ZipFile(io.BytesIO(response.content)) as bundle:
                if len(bundle.namelist()) != samples + 2:
                    return f"entries {bundle.namelist()}"
        elif content_type == "application/json":
            if len(response.json()["images"]) != samples:
                return "images"
        elif content_type == "application/x-ndjson":
            last = json.loads(response.content.splitlines()[-1])
            if last["event"] != "result" or not base64.b64decode(last["images"][0]):
                return f"last event {last['event']}"
        elif not response.content.startswith(b"\x89PNG"):
            return "not a PNG"
    except (zipfile.BadZipFile, KeyError, ValueError, IndexError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def soak(server, requests_total: int, clients: int, steps: int, baseline: int, deadline: float) -> dict:
    worker = server.ready_worker_pids()[0]
    frontend = next(p.pid for p in psutil.Process(server.process.pid).children(recursive=True) if "java" in p.name())
    system_tmp = Path(tempfile.gettempdir())
    ours = {server.temp_dir.parts[len(system_tmp.parts)]} if server.temp_dir.is_relative_to(system_tmp) else set()
    tmp_before = {p.name for p in system_tmp.iterdir()}
    samples: list[dict] = []
    problems: list[str] = []
    marks: dict = {}
    lock = threading.Lock()
    counter = iter(range(requests_total))
    session_local = threading.local()

    def client() -> None:
        session = session_local.session = requests.Session()
        while time.monotonic() < deadline:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            fields, content_type = VARIANTS[n % len(VARIANTS)]
            fields = {"prompt": "a house", "ddim_steps": steps, "seed": n, **fields}
            start = time.perf_counter()
            response = session.post(server.url, headers=server.auth(), files={"image": ("house.png", HOUSE)},
                                    data={k: str(v) for k, v in fields.items()}, timeout=300)
            seconds = time.perf_counter() - start
            problem = valid(response, fields, content_type)
            with lock:
                done = len(samples) + 1
                samples.append({"n": done, "seconds": round(seconds, 3), "worker_rss_kib": rss_kib(worker),
                                "frontend_rss_kib": rss_kib(frontend), "generation": fields.get("mode") != "edges"})
                if problem:
                    problems.append(f"request {n}: {problem}")
                if done == baseline:
                    marks["server_tmp_at_baseline"] = files_under(server.temp_dir)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - start
    time.sleep(1)  # let the last responses' files (if any) settle
    server_tmp_end = files_under(server.temp_dir)
    leftovers = sorted(server_tmp_end - marks.get("server_tmp_at_baseline", server_tmp_end))
    system_new = sorted({p.name for p in system_tmp.iterdir()} - tmp_before - ours)

    at_baseline = samples[baseline - 1] if len(samples) >= baseline else None
    end = samples[-1] if samples else None
    growth = None
    if at_baseline and end:
        growth = (end["worker_rss_kib"] - at_baseline["worker_rss_kib"]) / at_baseline["worker_rss_kib"] * 100
    seconds = sorted(s["seconds"] for s in samples)
    return {
        "requests": len(samples),
        "generations": sum(s["generation"] for s in samples),
        "wall_seconds": round(wall, 1),
        "requests_per_second": round(len(samples) / wall, 2) if wall else None,
        "latency_seconds": {"p50": seconds[len(seconds) // 2], "p95": seconds[int(len(seconds) * 0.95) - 1],
                            "max": seconds[-1]} if seconds else None,
        "problems": problems[:20],
        "worker_pid": {"start": worker, "end": server.ready_worker_pids()},
        "worker_rss_kib": {"first": samples[0]["worker_rss_kib"] if samples else None,
                           f"at_request_{baseline}": at_baseline and at_baseline["worker_rss_kib"],
                           "max": max(s["worker_rss_kib"] for s in samples) if samples else None,
                           "end": end and end["worker_rss_kib"]},
        "worker_rss_growth_percent": round(growth, 2) if growth is not None else None,
        "frontend_rss_kib": {f"at_request_{baseline}": at_baseline and at_baseline["frontend_rss_kib"],
                             "end": end and end["frontend_rss_kib"]},
        "server_tmp_files": {"at_baseline": len(marks.get("server_tmp_at_baseline", ())), "end": len(server_tmp_end),
                             "left_behind": leftovers[:50]},
        "system_tmp_new_entries": system_new[:50],
        "rss_trace_every_20": [s["worker_rss_kib"] for s in samples[::20]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600,
                        help="requests; one in six is an edge map, the others generations (at least 200 needed)")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps per generation (64x64, tiny model)")
    parser.add_argument("--baseline", type=int, default=20, help="the request from which RSS growth is measured")
    parser.add_argument("--max-growth", type=float, default=5.0, help="allowed worker RSS growth, percent")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long")
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = parser.parse_args(argv)
    if not args.baseline < args.requests <= 5000 or not 1 <= args.clients <= 16:
        parser.error("baseline < requests <= 5000, clients 1-16")
    if not TINY.is_file():
        sys.exit(f"error: {TINY} is missing; run `make tiny` first")

    with tiny_server(TINY, prefix="torchserve_soak_") as server:
        report = {"settings": {k: v for k, v in vars(args).items() if k != "out"}}
        report["soak"] = soak(server, args.requests, args.clients, args.steps, args.baseline,
                              time.monotonic() + args.max_seconds)
    result = report["soak"]
    growth = result["worker_rss_growth_percent"]
    report["checks"] = {
        f"at least 200 generations ({result['generations']})": result["generations"] >= 200,
        "every response valid": not result["problems"],
        "the same worker process throughout": result["worker_pid"]["end"] == [result["worker_pid"]["start"]],
        f"worker RSS growth below {args.max_growth} % from request {args.baseline}": growth is not None
                                                                                  and growth < args.max_growth,
        "no file left behind in the server's temporary directory": not result["server_tmp_files"]["left_behind"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
