"""Observability with the real tools: Debian's Prometheus scraping a live TorchServe (the tiny model), promtool on the
alert rules (monitoring/alerts.yaml and its unit tests), and the Grafana dashboard checked against a live /metrics.

The binaries come from Debian's `prometheus` package (.ci/run installs it); without them these tests skip."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
import yaml
from live_server import free_ports, wait_until

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
DASHBOARD = json.loads((MONITORING / "grafana-dashboard.json").read_text())
RULES = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package is not installed")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian's prometheus package) is not installed")

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
# the metrics the alert rules take from elsewhere than the service (kube-state-metrics)
EXTERNAL_METRICS = {"kube_deployment_status_replicas_available"}


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, keywords, label names or values)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = re.findall(r"(?<![\w.])([A-Za-z_:][\w:]*)\b(?!\s*\()", text)
    return {name for name in names if name not in PROMQL_WORDS and not re.fullmatch(r"\d+(e\d+)?", name)}


def exported_names(metrics_text: str) -> set[str]:
    """Every series name a /metrics page declares or carries (a histogram's _bucket, _sum and _count included)."""
    names = set()
    for line in metrics_text.splitlines():
        if match := re.match(r"# TYPE (\S+) (\w+)", line):
            names.add(match[1])
            if match[2] == "histogram":
                names |= {f"{match[1]}_bucket", f"{match[1]}_sum", f"{match[1]}_count"}
        elif line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][\w:]*", line)[0])
    return names


def dashboard_expressions() -> list[str]:
    return [target["expr"] for panel in DASHBOARD["panels"] for target in panel["targets"]]


def alert_expressions() -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for group in RULES["groups"] for rule in group["rules"]}


def test_metric_names_reads_names_only():
    assert metric_names('sum by (le, instance) (rate(Foo_bucket{Phase="a b", x=~"y"}[5m])) / 1e6 > 0.75 * 32') == {
        "Foo_bucket"}
    assert metric_names("max(up) == 0 or vector(0) + bar:rate5m") == {"up", "bar:rate5m"}


def test_dashboard_is_a_grafana_dashboard_on_a_prometheus_datasource():
    assert DASHBOARD["uid"] and DASHBOARD["panels"]
    assert [v["name"] for v in DASHBOARD["templating"]["list"]] == ["datasource"]
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]


@needs_promtool
def test_alert_rules_pass_promtool_and_their_unit_tests():
    for command in (["check", "rules", "alerts.yaml"], ["test", "rules", "alerts_test.yaml"]):
        result = subprocess.run([PROMTOOL, *command], cwd=MONITORING, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_what_operators_need():
    assert set(alert_expressions()) == {"ControlNetNoWorkerReady", "ControlNetQueueNearlyFull", "ControlNetErrorRate",
                                        "ControlNetSamplingP95High"}
    queue_size = re.search(r"^job_queue_size=(\d+)$", (ROOT / "config.properties").read_text(), re.M)[1]
    assert f"> 0.75 * {queue_size}" in alert_expressions()["ControlNetQueueNearlyFull"]


@pytest.mark.server
def test_dashboard_and_alerts_read_only_metrics_the_service_exports(server):
    assert server.predict().status_code == 200  # handler metrics appear with their first event
    assert server.predict({"ddim_steps": 0}).status_code == 400
    exported = exported_names(requests.get(f"{server.metrics}/metrics", timeout=10).text)
    on_dashboard = set().union(*map(metric_names, dashboard_expressions()))
    in_alerts = set().union(*map(metric_names, alert_expressions().values()))
    assert "ControlNetPhaseSeconds_bucket" in on_dashboard and "Requests5XX" in in_alerts
    assert on_dashboard - exported == set()
    assert in_alerts - exported == EXTERNAL_METRICS


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params) -> dict:
        response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expression: str) -> list[dict]:
        return self.get("query", query=expression)["result"]

    def value(self, expression: str) -> float:
        results = self.query(expression)
        return float(results[0]["value"][1]) if results else math.nan


@pytest.fixture
def prometheus(server):
    """Debian's Prometheus on a free loopback port, its storage in a temporary directory, scraping `server` every
    second and evaluating monitoring/alerts.yaml; stopped and removed afterwards."""
    if PROMETHEUS is None:
        pytest.skip("Debian's prometheus package is not installed")
    (port,) = free_ports(1)
    with tempfile.TemporaryDirectory(prefix="prometheus_test_") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(MONITORING / "alerts.yaml")],
            "scrape_configs": [{"job_name": "controlnet-canny", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [urlparse(server.metrics).netloc]}]}],
        }))
        log = Path(tmp) / "prometheus.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
                 f"--web.listen-address=127.0.0.1:{port}"], stdout=output, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: requests.get(f"{url}/-/ready", timeout=5).ok, 60, "Prometheus ready", process, log)
            yield Prometheus(url)
        finally:
            process.terminate()
            process.wait(timeout=60)


@pytest.mark.server
def test_prometheus_scrapes_latency_quantiles_and_error_counters(server, prometheus):
    def target_up() -> bool:
        (target,) = prometheus.get("targets")["activeTargets"]
        return target["health"] == "up"

    wait_until(target_up, 60, "the TorchServe target up")
    assert prometheus.value('up{job="controlnet-canny"}') == 1

    # rate() needs two scrapes around new events: generate until the p95 of the last minute is a number
    p95 = 'histogram_quantile(0.95, sum by (le) (rate(ControlNetPhaseSeconds_bucket{Phase="sampling"}[1m])))'
    deadline = time.monotonic() + 90
    while math.isnan(prometheus.value(p95)) and time.monotonic() < deadline:
        assert server.predict().status_code == 200
        assert server.predict({"ddim_steps": 0}).status_code == 400
        time.sleep(2.5)
    assert 0 < prometheus.value(p95) <= 10  # seconds; the histogram's buckets end at 10 s

    assert prometheus.value('sum(ControlNetErrors{Reason="ddim_steps"})') >= 1
    assert prometheus.value("sum(Requests4XX)") >= 1
    assert prometheus.value("sum(ts_inference_requests_total)") >= 1

    # every dashboard panel is valid PromQL with data, and the rules evaluate without errors
    for expression in dashboard_expressions():
        if "Requests5XX" not in expression:  # no 5xx yet on a healthy server
            assert prometheus.query(expression), expression
    wait_until(lambda: all(rule["lastEvaluation"] != "0001-01-01T00:00:00Z" for group in prometheus.get("rules")["groups"]
                           for rule in group["rules"]), 30, "the alert rules evaluated")
    rules = [rule for group in prometheus.get("rules")["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == set(alert_expressions())
    assert all(rule["health"] == "ok" for rule in rules), rules
