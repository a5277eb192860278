#!/usr/bin/env python3
"""Exit 0 when the model has a worker READY, that is when the server can answer a generation; else 1.

The readiness signal of `scripts/serve.sh start`, the image's HEALTHCHECK and the Kubernetes probes.
TorchServe's /ping is no such signal: it answers 200 while the worker is still loading the model (seconds for
the tiny model, minutes for the real checkpoint). This asks the management API's describe instead, which
neither queues behind generations nor runs the handler, so a busy server stays ready.

The management address and whether token authorization is on come from TorchServe's config (TS_CONFIG, as
scripts/serve.sh reads it); with authorization on, the management key comes from key_file.json in TorchServe's
working directory (RUN_DIR). A wildcard listen address is asked on loopback. Standard library only: it runs
every few seconds as a probe.

  scripts/ready.py [--model controlnet] [--config FILE] [--key-file FILE] [--timeout 5]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def settings(config: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in config.read_text().splitlines()
             if "=" in line and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def management_url(config: dict[str, str]) -> str:
    address = config.get("management_address", "http://127.0.0.1:8081")
    return address.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")


def ready_workers(url: str, model: str, key: str | None, timeout: float) -> int:
    request = urllib.request.Request(f"{url}/models/{model}",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        described = json.load(response)
    return sum(worker.get("status") == "READY" for entry in described for worker in entry.get("workers", []))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    run_dir = Path(os.environ.get("RUN_DIR", ROOT / "artifacts" / "serve"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="controlnet")
    parser.add_argument("--config", type=Path, default=Path(os.environ.get("TS_CONFIG", ROOT / "config.properties")))
    parser.add_argument("--key-file", type=Path, default=run_dir / "key_file.json")
    parser.add_argument("--timeout", type=float, default=5, help="seconds for the management API to answer")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = settings(args.config)
    key = None
    if config.get("disable_token_authorization", "false").lower() != "true":
        try:
            key = json.loads(args.key_file.read_text())["management"]["key"]
        except (OSError, ValueError, KeyError) as error:
            print(f"not ready: no management key in {args.key_file} ({error})", file=sys.stderr)
            return 1
    try:
        count = ready_workers(management_url(config), args.model, key, args.timeout)
    except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors: not up, model not there yet
        print(f"not ready: {error}", file=sys.stderr)
        return 1
    if count == 0:
        print(f"not ready: model {args.model} has no READY worker", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
