#!/usr/bin/env bash
# Checks the Kubernetes manifests on your cluster (your kubectl context) end to end, in a namespace of its own that
# it deletes when it ends, passed or not:
#   1. applies the manifests (default: the tiny overlay, k8s/overlays/tiny) into a new namespace;
#   2. waits for a Ready pod and fails if the pod turned Ready before TorchServe had loaded the model (the pod's
#      Ready time against the worker's WORKER_MODEL_LOADED line in ts_log.log);
#   3. sends a generation through a port-forward, and reads /metrics there;
#   4. scales the Deployment to 2 and back to 1 (after deleting the HorizontalPodAutoscaler, which owns the count);
#   5. scales the workers inside a pod to 2 and back to 1 through the management API (scripts/client.py
#      scale-workers run with kubectl exec: the image has no curl), each answered 200, and describes them.
#
#   scripts/k8s_smoke.sh
#
# Environment: MANIFESTS (a kustomization directory, default k8s/overlays/tiny), IMAGE (the image the cluster pulls,
# default the manifests' controlnet-canny:0.1.0), NAMESPACE (default controlnet-smoke-<random>; it must not exist),
# READY_TIMEOUT (seconds for a pod to be Ready, default 900: the real checkpoint from a cold disk).
# Needs kubectl and curl. Kubernetes 1.23 or later (docs/kserve.md).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MANIFESTS=${MANIFESTS:-$ROOT/k8s/overlays/tiny}
NAMESPACE=${NAMESPACE:-controlnet-smoke-$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')}
READY_TIMEOUT=${READY_TIMEOUT:-900}
SELECTOR=app.kubernetes.io/name=controlnet-canny,app.kubernetes.io/component=server
CLIENT=(.venv/bin/python scripts/client.py)  # inside the pod, in the image's working directory /app

step() { echo "k8s smoke: $*"; }
fail() { echo "k8s smoke: FAILED: $*" >&2; exit 1; }
k() { kubectl -n "$NAMESPACE" "$@"; }
for tool in kubectl curl; do
  command -v "$tool" >/dev/null || fail "$tool is missing"
done

WORK=$(mktemp -d)
FORWARD_PID=
CREATED=
cleanup() {
  local status=$?
  [ -n "$FORWARD_PID" ] && kill "$FORWARD_PID" 2>/dev/null
  if [ -n "$CREATED" ]; then
    step "deleting namespace $NAMESPACE and everything in it"
    kubectl delete namespace "$NAMESPACE" --wait=true --timeout=300s >/dev/null || status=1
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

SERVER_VERSION=$(kubectl version -o json | sed -n '/"serverVersion"/,/}/s/.*"gitVersion": *"v\([^"]*\)".*/\1/p')
[ -n "$SERVER_VERSION" ] || fail "no server version: is the context $(kubectl config current-context) reachable?"
IFS=. read -r MAJOR MINOR _ <<< "$SERVER_VERSION"
if [ "$MAJOR" -lt 1 ] || { [ "$MAJOR" = 1 ] && [ "${MINOR%%[!0-9]*}" -lt 23 ]; }; then
  fail "Kubernetes $SERVER_VERSION: the manifests need 1.23 or later (autoscaling/v2)"
fi
step "Kubernetes $SERVER_VERSION, manifests $MANIFESTS, namespace $NAMESPACE"

kubectl create namespace "$NAMESPACE" >/dev/null
CREATED=1
kubectl kustomize "$MANIFESTS" > "$WORK/manifests.yaml"
if [ -n "${IMAGE:-}" ]; then
  sed -i "s#^\( *\(- \)\{0,1\}image: \)controlnet-canny:.*#\1$IMAGE#" "$WORK/manifests.yaml"
fi
k apply -f "$WORK/manifests.yaml"

# The first Ready pod; its Ready time must not come before its worker loaded the model.
ready_pod() {  # the name of a Ready pod, if any, and the time it turned Ready
  local ready='.status.conditions[?(@.type=="Ready")]'
  k get pods -l "$SELECTOR" -o jsonpath="{range .items[*]}{.metadata.name} {$ready.status} {$ready.lastTransitionTime}{\"\\n\"}{end}" |
    awk '$2 == "True" { print $1, $3; exit }'
}
step "waiting up to $READY_TIMEOUT s for a Ready pod"
POD=
for _ in $(seq 1 "$READY_TIMEOUT"); do
  read -r POD READY_AT <<< "$(ready_pod)" || true
  [ -n "$POD" ] && break
  sleep 1
done
[ -n "$POD" ] || { k get pods -l "$SELECTOR" -o wide >&2; fail "no pod was Ready within $READY_TIMEOUT s"; }
# TorchServe's log times are the container's clock (UTC) in ISO 8601 with milliseconds: compare to the second.
LOADED_LINE=$(k exec "$POD" -- grep -m1 "State change WORKER_STARTED -> WORKER_MODEL_LOADED" \
  /app/artifacts/serve/logs/ts_log.log) || fail "pod $POD is Ready but no worker has loaded the model"
LOADED_AT=${LOADED_LINE:0:19}
READY_AT=${READY_AT%Z}
if [[ "$READY_AT" < "$LOADED_AT" ]]; then
  fail "pod $POD turned Ready at $READY_AT, before its worker loaded the model ($LOADED_AT)"
fi
step "pod $POD Ready at $READY_AT, its worker loaded at $LOADED_AT"

# A generation and the metrics through a port-forward to that pod (the Service's ports: 8080 and 8082).
kubectl -n "$NAMESPACE" port-forward "pod/$POD" :8080 :8082 > "$WORK/forward.log" 2>&1 &  # $!: kubectl itself
FORWARD_PID=$!
for _ in $(seq 1 30); do
  [ "$(grep -c '^Forwarding from 127.0.0.1:' "$WORK/forward.log")" = 2 ] && break
  kill -0 "$FORWARD_PID" 2>/dev/null || fail "kubectl port-forward ended: $(cat "$WORK/forward.log")"
  sleep 1
done
INFERENCE_PORT=$(sed -n 's/^Forwarding from 127.0.0.1:\([0-9]*\) -> 8080$/\1/p' "$WORK/forward.log")
METRICS_PORT=$(sed -n 's/^Forwarding from 127.0.0.1:\([0-9]*\) -> 8082$/\1/p' "$WORK/forward.log")
if [ -z "$INFERENCE_PORT" ] || [ -z "$METRICS_PORT" ]; then fail "no port-forward: $(cat "$WORK/forward.log")"; fi
STATUS=$(curl --silent --show-error --output "$WORK/result.zip" --write-out '%{http_code}' \
  -F "image=@$ROOT/tests/data/house.png" -F prompt="a house" -F ddim_steps=4 -F seed=1 \
  "http://127.0.0.1:$INFERENCE_PORT/predictions/controlnet")
[ "$STATUS" = 200 ] || fail "the generation answered HTTP $STATUS: $(head -c 500 "$WORK/result.zip")"
[ "$(head -c 2 "$WORK/result.zip")" = PK ] || fail "the generation's answer is not a zip"
step "a generation through the port-forward: HTTP 200, a zip"
curl --silent --show-error --fail "http://127.0.0.1:$METRICS_PORT/metrics" > "$WORK/metrics.txt"
for metric in ts_inference_requests_total ControlNetImagesGenerated; do
  grep -q "^$metric" "$WORK/metrics.txt" || fail "/metrics has no $metric"
done
step "/metrics has TorchServe's and the handler's metrics"
kill "$FORWARD_PID" 2>/dev/null || true
FORWARD_PID=

# The Deployment to 2 pods and back. The HorizontalPodAutoscaler owns the count and would undo a change by hand.
k delete hpa controlnet-canny >/dev/null
deployment_counts() { k get deployment controlnet-canny -o jsonpath='{.status.replicas} {.status.readyReplicas}'; }
scale_deployment() {
  k scale deployment controlnet-canny --replicas="$1" >/dev/null
  for _ in $(seq 1 "$READY_TIMEOUT"); do
    [ "$(deployment_counts)" = "$1 $1" ] && { step "Deployment at $1 Ready pod(s)"; return; }
    sleep 1
  done
  fail "the Deployment did not reach $1 Ready pod(s) within $READY_TIMEOUT s (replicas, ready: $(deployment_counts))"
}
scale_deployment 2
scale_deployment 1

# The workers inside a pod, through the management API on the pod's loopback.
for workers in 2 1; do
  k exec deploy/controlnet-canny -- "${CLIENT[@]}" scale-workers "$workers" ||
    fail "scaling the workers to $workers did not answer 200"
  READY_WORKERS=$(k exec deploy/controlnet-canny -- "${CLIENT[@]}" describe | grep -c '"status": "READY"' || true)
  [ "$READY_WORKERS" = "$workers" ] || fail "$READY_WORKERS READY worker(s) described after scaling to $workers"
  step "$workers READY worker(s) in the pod"
done

step "passed on Kubernetes $SERVER_VERSION"
