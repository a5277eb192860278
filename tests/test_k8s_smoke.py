"""scripts/k8s_smoke.sh without a cluster: shellcheck-clean, and run against a `kubectl` and a `curl` on PATH that
play a cluster's part (each call recorded, the answers a cluster would give) to check what it asks of the cluster,
in which order, that it fails where the cluster misbehaves (a pod Ready before its model loaded, a worker
scale-down answered 500) and that it deletes its namespace whatever happens."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "scripts" / "k8s_smoke.sh"
NAMESPACE = "controlnet-smoke-test"
READY_AT = "2026-12-06T10:00:07Z"

FAKE_KUBECTL = r'''#!PYTHON
"""kubectl as the smoke script calls it; the cluster's state in $FAKE_STATE, every call appended to $FAKE_CALLS."""
import json, os, sys, time

args = sys.argv[1:]
if args[:1] == ["-n"]:
    args = args[2:]
with open(os.environ["FAKE_CALLS"], "a") as calls:
    calls.write(json.dumps(args) + "\n")
state_path = os.environ["FAKE_STATE"]
state = json.load(open(state_path))
scenario = os.environ["FAKE_SCENARIO"]
client = [".venv/bin/python", "scripts/client.py"]

def save():
    json.dump(state, open(state_path, "w"))

if args == ["version", "-o", "json"]:
    print(json.dumps({"clientVersion": {"gitVersion": "v1.32.4"}, "serverVersion": {"gitVersion": "v1.30.2"}}, indent=2))
elif args[:1] == ["kustomize"]:
    print("kind: Deployment\nspec:\n  template:\n    spec:\n      containers:\n        - image: controlnet-canny:0.1.0")
elif args[:2] == ["apply", "-f"]:
    state["applied"] = open(args[2]).read()
elif args[:2] == ["get", "pods"]:
    state["polls"] = state.get("polls", 0) + 1
    ready = state["polls"] >= 3
    print(f"controlnet-canny-abc {'True' if ready else 'False'} {'READY_AT' if ready else ''}")
elif args[:2] == ["exec", "controlnet-canny-abc"] and "grep" in args:
    if scenario == "never_loaded":
        sys.exit(1)
    second = "09" if scenario == "ready_before_loaded" else "05"
    print(f"2026-12-06T10:00:{second},123 [INFO ] W-9000-controlnet_1.0 org.pytorch.serve.wlm.WorkerThread - "
          "W-9000-controlnet_1.0 State change WORKER_STARTED -> WORKER_MODEL_LOADED")
elif args[:1] == ["port-forward"]:
    print("Forwarding from 127.0.0.1:40001 -> 8080\nForwarding from [::1]:40001 -> 8080\n"
          "Forwarding from 127.0.0.1:40002 -> 8082\nForwarding from [::1]:40002 -> 8082", flush=True)
    time.sleep(600)
elif args[:2] == ["scale", "deployment"]:
    state["replicas"] = int(args[3].split("=")[1])
elif args[:2] == ["get", "deployment"]:
    print(f"{state['replicas']} {state['replicas']}", end="")
elif args[:3] == ["exec", "deploy/controlnet-canny", "--"] and args[3:5] == client:
    if args[5] == "scale-workers":
        if scenario == "scale_down_500" and int(args[6]) < state["workers"]:
            print('error: HTTP 500: {"type": "InternalServerException"}', file=sys.stderr)
            sys.exit(1)
        state["workers"] = int(args[6])
    else:
        print(json.dumps([{"workers": [{"id": str(9000 + i), "status": "READY"} for i in range(state["workers"])]}],
                         indent=2))
save()
'''.replace("READY_AT", READY_AT)

FAKE_CURL = r'''#!PYTHON
"""curl as the smoke script calls it: a zip for the generation, Prometheus text for /metrics."""
import json, os, sys

args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as calls:
    calls.write(json.dumps(["curl", *args]) + "\n")
if args[-1].endswith("/metrics"):
    print("ts_inference_requests_total{model_name=\"controlnet\"} 1.0\nControlNetImagesGenerated{Level=\"Model\"} 1.0")
else:
    open(args[args.index("--output") + 1], "wb").write(b"PK\x03\x04 a zip")
    print("200", end="")
'''


def run_smoke(tmp_path: Path, scenario: str = "healthy", image: str | None = None):
    fakes = tmp_path / "bin"
    fakes.mkdir()
    for name, text in (("kubectl", FAKE_KUBECTL), ("curl", FAKE_CURL)):
        (fakes / name).write_text(text.replace("PYTHON", sys.executable, 1))
        (fakes / name).chmod(0o755)
    state, calls = tmp_path / "state.json", tmp_path / "calls"
    state.write_text(json.dumps({"replicas": 1, "workers": 1}))
    env = {**os.environ, "PATH": f"{fakes}:{os.environ['PATH']}", "FAKE_STATE": str(state), "FAKE_CALLS": str(calls),
           "FAKE_SCENARIO": scenario, "NAMESPACE": NAMESPACE, "READY_TIMEOUT": "60"}
    if image:
        env["IMAGE"] = image
    result = subprocess.run(["bash", str(SMOKE)], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                            timeout=120)
    recorded = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return result, recorded, json.loads(state.read_text())


def index(recorded: list[list[str]], *prefix: str) -> int:
    [found] = [i for i, call in enumerate(recorded) if call[:len(prefix)] == list(prefix)]
    return found


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
def test_shellcheck_clean():
    result = subprocess.run(["shellcheck", str(SMOKE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_everything_it_checks_in_order_and_its_namespace_deleted(tmp_path):
    result, recorded, state = run_smoke(tmp_path, image="registry.example/controlnet-canny:0.1.0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed on Kubernetes 1.30.2" in result.stdout
    assert "image: registry.example/controlnet-canny:0.1.0" in state["applied"]
    steps = [
        index(recorded, "create", "namespace", NAMESPACE),
        index(recorded, "apply", "-f"),
        index(recorded, "exec", "controlnet-canny-abc", "--", "grep"),  # the model loaded before Ready
        index(recorded, "port-forward", "pod/controlnet-canny-abc", ":8080", ":8082"),
        index(recorded, "curl", "--silent", "--show-error", "--output"),  # the generation
        index(recorded, "curl", "--silent", "--show-error", "--fail", "http://127.0.0.1:40002/metrics"),
        index(recorded, "delete", "hpa", "controlnet-canny"),
        index(recorded, "scale", "deployment", "controlnet-canny", "--replicas=2"),
        index(recorded, "scale", "deployment", "controlnet-canny", "--replicas=1"),
        index(recorded, "exec", "deploy/controlnet-canny", "--", ".venv/bin/python", "scripts/client.py",
              "scale-workers", "2"),
        index(recorded, "exec", "deploy/controlnet-canny", "--", ".venv/bin/python", "scripts/client.py",
              "scale-workers", "1"),
        index(recorded, "delete", "namespace", NAMESPACE),
    ]
    assert steps == sorted(steps) and steps[-1] == len(recorded) - 1
    assert recorded[steps[4]][-1] == "http://127.0.0.1:40001/predictions/controlnet"
    assert state == {**state, "replicas": 1, "workers": 1}


@pytest.mark.parametrize("scenario, message", [
    ("ready_before_loaded", "before its worker loaded the model"),
    ("never_loaded", "no worker has loaded the model"),
    ("scale_down_500", "scaling the workers to 1 did not answer 200"),
])
def test_fails_where_the_cluster_misbehaves_and_still_deletes_its_namespace(tmp_path, scenario, message):
    result, recorded, _ = run_smoke(tmp_path, scenario)
    assert result.returncode != 0
    assert message in result.stderr
    assert recorded[-1][:3] == ["delete", "namespace", NAMESPACE]
