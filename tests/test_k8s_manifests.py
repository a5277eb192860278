"""The Kubernetes manifests in k8s/: valid against the API schemas (kubernetes-validate, offline, strict: no
unknown fields) of the oldest and newest Kubernetes versions we claim, and consistent with each other and
with the server and the image (readiness on a READY worker, ports, labels, user, threads, the config's settings)."""
from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
VERSIONS = ["1.29.0", "1.33.0"]  # autoscaling/v2, networking.k8s.io/v1, policy: all GA since 1.23
CORE = ["configmap.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "networkpolicy.yaml"]


def load(name: str) -> dict:
    documents = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
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
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted([*CORE, "kustomization.yaml", "podmonitor.yaml"])


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
    monitor = load("podmonitor.yaml")  # a CRD: no schema in kubernetes-validate; checked against the pods here
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
