"""The Kubernetes manifests in k8s/: valid against the API schemas (kubernetes-validate, offline, strict: no
unknown fields) of the oldest Kubernetes version it has schemas for (1.25; the manifests need 1.23, as documented)
and a recent one, and consistent with each other and with the server and the image (readiness on a READY worker,
ports, labels, user, threads, the config's settings); the tiny overlay rendered as kustomize renders it."""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BASE = K8S / "base"
TINY = K8S / "overlays" / "tiny"
VERSIONS = ["1.25.0", "1.33.0"]
CORE = ["configmap.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "networkpolicy.yaml"]
MINIMUM_KUBERNETES = "1.23"  # autoscaling/v2 (hpa.yaml); networkpolicy.yaml's kubernetes.io/metadata.name: 1.21


def load(name: str, directory: Path = BASE) -> dict:
    documents = [d for d in yaml.safe_load_all((directory / name).read_text()) if d]
    assert len(documents) == 1, name
    return documents[0]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", CORE)
def test_manifest_is_valid(name, version):
    kubernetes_validate.validate(load(name), version, strict=True)


def test_kustomization_lists_every_core_manifest():
    kustomization = load("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(CORE)
    assert sorted(p.name for p in BASE.glob("*.yaml")) == sorted([*CORE, "kustomization.yaml"])
    assert load("kustomization.yaml", K8S)["resources"] == ["base"]  # kubectl apply -k k8s/: the base as it is
    assert sorted(p.name for p in K8S.glob("*.yaml")) == ["kustomization.yaml", "podmonitor.yaml"]


def test_the_minimum_kubernetes_version_is_documented_where_the_manifests_are():
    assert load("hpa.yaml")["apiVersion"] == "autoscaling/v2"  # served from 1.23
    namespaces = [rule["from"][0].get("namespaceSelector", {}).get("matchLabels", {})
                  for rule in load("networkpolicy.yaml")["spec"]["ingress"]]
    assert {"kubernetes.io/metadata.name": "monitoring"} in namespaces  # set by Kubernetes from 1.21
    assert f"Kubernetes {MINIMUM_KUBERNETES} or later" in (ROOT / "docs" / "kserve.md").read_text()
    assert f"Kubernetes {MINIMUM_KUBERNETES}" in (K8S / "kustomization.yaml").read_text()


def test_docs_give_the_hpa_threshold_of_hpa_yaml():
    [metric] = load("hpa.yaml")["spec"]["metrics"]
    threshold = metric["resource"]["target"]["averageUtilization"]
    docs = (ROOT / "docs" / "kserve.md").read_text()
    assert set(re.findall(r"on CPU \((\d+) ?%", docs)) == {str(threshold)}


def strategic_merge(base, patch):
    """The part of Kubernetes' strategic merge patch that the overlays use: maps merge key by key, a list of named
    maps (containers, env, ports, volumes: their patchMergeKey is `name`) merges item by name, anything else is
    replaced. Checked against kubectl's own kustomize where kubectl is installed."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in base + patch):
        merged = [copy.deepcopy(item) for item in base]
        names = [item["name"] for item in merged]
        for item in patch:
            if item["name"] in names:
                merged[names.index(item["name"])] = strategic_merge(merged[names.index(item["name"])], item)
            else:
                merged.append(item)
        return merged
    return patch


def render(overlay: Path) -> list[dict]:
    """An overlay whose resources are one base directory and whose patches are strategic-merge patches of objects
    named in that base, rendered: the base's documents in its order, each patched where kind and name match."""
    kustomization = load("kustomization.yaml", overlay)
    assert set(kustomization) == {"apiVersion", "kind", "resources", "patches"}, "render() knows no other fields"
    [base_dir] = [(overlay / entry).resolve() for entry in kustomization["resources"]]
    documents = [load(name, base_dir) for name in load("kustomization.yaml", base_dir)["resources"]]
    for entry in kustomization["patches"]:
        assert set(entry) == {"path"}, "render() knows strategic-merge patch files only"
        patch = load(entry["path"], overlay)
        [index] = [i for i, d in enumerate(documents)
                   if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])]
        documents[index] = strategic_merge(documents[index], patch)
    return documents


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_render_agrees_with_kubectl_kustomize():
    rendered = subprocess.run(["kubectl", "kustomize", str(TINY)], capture_output=True, text=True, check=True).stdout
    by_kind = {d["kind"]: d for d in yaml.safe_load_all(rendered) if d}
    assert by_kind == {d["kind"]: d for d in render(TINY)}


@pytest.mark.parametrize("version", VERSIONS)
def test_tiny_overlay_is_valid(version):
    for document in render(TINY):
        kubernetes_validate.validate(document, version, strict=True)


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _gibibytes(quantity: str) -> float:
    units = {"Mi": 2**-10, "Gi": 1}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_tiny_overlay_changes_only_the_pods_resources_and_fits_a_two_cpu_node_twice():
    base, tiny = [load(name) for name in CORE], render(TINY)
    assert [d["kind"] for d in tiny] == [d["kind"] for d in base]
    for original, overlaid in zip(base, tiny):
        if original["kind"] == "Deployment":
            (container,) = overlaid["spec"]["template"]["spec"]["containers"]
            without_resources = copy.deepcopy(overlaid)
            without_resources["spec"]["template"]["spec"]["containers"][0]["resources"] = (
                original["spec"]["template"]["spec"]["containers"][0]["resources"])
            assert without_resources == original
        else:
            assert overlaid == original
    # the default stays sized for the real model; the overlay's pod: two replicas (scripts/k8s_smoke.sh scales to 2)
    # within 1.5 of a 2-CPU node's cores, room for two tiny workers (about 1.2 GiB with the JVM, 2.1 GiB with two)
    assert load("deployment.yaml")["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "4"
    assert 2 * _cpus(container["resources"]["requests"]["cpu"]) <= 1.5
    assert _gibibytes(container["resources"]["limits"]["memory"]) >= 2.5
    assert _gibibytes(container["resources"]["requests"]["memory"]) <= _gibibytes(container["resources"]["limits"]["memory"])


def _pod():
    deployment = load("deployment.yaml")
    return deployment, deployment["spec"]["template"]


def test_ready_means_a_worker_is_ready_and_alive_means_torchserve_answers():
    _, template = _pod()
    (container,) = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "metrics": 8082}
    for probe in ("startupProbe", "readinessProbe"):  # scripts/ready.py: a READY worker in the management API
        command = container[probe]["exec"]["command"]
        assert command[:2] == [".venv/bin/python", "scripts/ready.py"], probe
        assert float(command[command.index("--timeout") + 1]) < container[probe]["timeoutSeconds"], probe
    assert container["livenessProbe"]["httpGet"] == {"path": "/ping", "port": "http"}
    # ready.py asks the management API without a key: it must be on the pod's loopback with token auth off
    pod_config = load("configmap.yaml")["data"]["config.properties"]
    assert "disable_token_authorization=true" in pod_config and "management_address=http://127.0.0.1:" in pod_config
    # liveness must not fire before TorchServe itself gives up on a worker (maxRetryTimeoutInSec)
    model_config = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60
    assert model_config["maxRetryTimeoutInSec"] >= 60
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= model_config["startupTimeout"]


def test_threads_follow_the_cpu_request_and_the_hpa_target_is_below_a_busy_pod(monkeypatch):
    from serving import ServingConfig

    _, template = _pod()
    (container,) = template["spec"]["containers"]
    [cpus] = [e for e in container["env"] if e["name"] == "CONTROLNET_CPUS"]
    assert cpus["valueFrom"]["resourceFieldRef"] == {"containerName": container["name"], "resource": "requests.cpu",
                                                     "divisor": "1"}
    assert "cpu" not in container["resources"].get("limits", {})  # no CFS throttling of the worker's threads
    config = ServingConfig.from_mapping({"checkpoints": ["x.pth"], "model_config": "x.yaml"})
    monkeypatch.setenv("CONTROLNET_CPUS", container["resources"]["requests"]["cpu"])
    assert config.worker_threads(1) == int(container["resources"]["requests"]["cpu"])
    assert config.worker_threads(2) == int(container["resources"]["requests"]["cpu"]) // 2
    # a busy pod uses about its request (100%); the target must leave room before requests queue
    [metric] = load("hpa.yaml")["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and 40 <= metric["resource"]["target"]["averageUtilization"] <= 70


def test_pod_runs_the_image_that_make_image_builds():
    _, template = _pod()
    (container,) = template["spec"]["containers"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert container["image"] == f"controlnet-canny:{version}"
    assert f"IMAGE:-{container['image']}" in (ROOT / "scripts" / "build_image.sh").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert (template["spec"]["securityContext"]["runAsUser"], template["spec"]["securityContext"]["runAsGroup"]) == (
        int(user[1]), int(user[2]))
    assert re.search(r"^EXPOSE 8080 8081 8082$", dockerfile, re.M)


def test_pod_is_locked_down():
    _, template = _pod()
    spec = template["spec"]
    (container,) = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/app/artifacts/serve", "/etc/torchserve"} <= mounts  # the only writable places + the config
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TS_CONFIG"] == "/etc/torchserve/config.properties"
    assert container["args"] == ["scripts/serve.sh", "foreground"]  # forwards SIGTERM to TorchServe


def test_service_hpa_and_monitoring_select_the_pods():
    deployment, template = _pod()
    labels = template["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    service = load("service.yaml")
    assert service["spec"]["selector"] == labels
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http", "metrics"}
    hpa = load("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    policy = load("networkpolicy.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"] == labels
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {"http", "metrics"}
    annotations = template["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "8082", "prometheus.io/path": "/metrics"}
    monitor = load("podmonitor.yaml", K8S)  # a CRD: no schema in kubernetes-validate; checked against the pods here
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"]["matchLabels"] == labels
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]


def test_pod_config_differs_from_the_shipped_one_only_where_documented():
    def parse(text: str) -> dict:
        pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#"))
        return {k.strip(): v.strip() for k, v in pairs}

    pod = parse(load("configmap.yaml")["data"]["config.properties"])
    shipped = parse((ROOT / "config.properties").read_text())
    changed = {k for k in shipped.keys() | pod.keys() if shipped.get(k) != pod.get(k)}
    # token_expiration_min: left out, no tokens in the pod
    assert changed == {"inference_address", "metrics_address", "disable_token_authorization", "token_expiration_min"}
    assert pod["inference_address"] == "http://0.0.0.0:8080" and pod["metrics_address"] == "http://0.0.0.0:8082"
    assert pod["management_address"] == "http://127.0.0.1:8081"  # management never leaves the pod
    assert pod["enable_model_api"] == "false"
