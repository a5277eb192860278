#!/usr/bin/env bash
# Starts TorchServe on the model in model_store/ (build it first: `make mar`; `make serve` does it all),
# waits until it answers, and prints how to call it. Stops it with `stop`; `foreground` is for containers.
#
#   scripts/serve.sh [start|stop|foreground]
#
# TorchServe writes key_file.json (the API keys) to its working directory: that is RUN_DIR, with the logs, the
# instance's temporary directory (TMPDIR: the launcher's pid file, which `stop` reads, and the workers' files) and
# the configuration TorchServe really runs with (effective.properties, below). A second instance needs only its own
# RUN_DIR (and its own ports in TS_CONFIG); `stop` with the same RUN_DIR stops that instance alone.
# Environment: TS_CONFIG (default: config.properties), RUN_DIR (default: artifacts/serve), MODEL_STORE (default:
# model_store), WAIT_S (how long `start` waits for the model to load, default 900: the real checkpoint from a
# cold disk takes minutes).
#
# The inference API is served through an edge, nginx, listening on TS_CONFIG's inference_address; TorchServe's
# own inference API listens on a Unix socket in RUN_DIR. TorchServe's frontend writes each answer when it is ready,
# and under the handler's continuous batching a quick request finishes before a slow one sent earlier: two
# requests pipelined on one HTTP/1.1 connection would get each other's answers. nginx reads a connection's next
# request only once it has sent the answer to the previous one. Management and metrics are TorchServe's directly.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG=$(realpath "${TS_CONFIG:-$ROOT/config.properties}")
RUN_DIR=$(realpath -m "${RUN_DIR:-$ROOT/artifacts/serve}")
STORE=$(realpath -m "${MODEL_STORE:-$ROOT/model_store}")
BIN=$ROOT/.venv/bin
export LOG_LOCATION=$RUN_DIR/logs METRICS_LOCATION=$RUN_DIR/logs
# TMPDIR: the launcher's pid file and the workers' temporary files; TEMP: the JVM's (java.io.tmpdir).
export TMPDIR=$RUN_DIR/tmp TEMP=$RUN_DIR/tmp
unset TS_CONFIG_FILE  # it would make TorchServe read another file than the effective configuration below
mkdir -p "$LOG_LOCATION" "$TMPDIR"
cd "$RUN_DIR"

setting() { sed -n "s/^$1=//p" "$CONFIG" | tail -n 1; }
INFERENCE_URL=$(setting inference_address)
case "$INFERENCE_URL" in
  http://*) ;;
  *) echo "inference_address must be http://HOST:PORT (the edge's; TLS belongs to a proxy in front): $INFERENCE_URL" >&2
     exit 2 ;;
esac
INFERENCE_SOCKET=$TMPDIR/inference.sock
PID_FILE=$TMPDIR/.model_server.pid  # where the torchserve launcher records the server's pid

# The edge (see above). Bodies and answers pass through as they come (no buffering: streamed progress events
# reach the client at once); a closed client connection closes the one to TorchServe. As root, nginx would run
# its worker as nobody, who cannot reach RUN_DIR: the same user runs it.
NGINX_CONFIG=$RUN_DIR/nginx.conf
NGINX_PID_FILE=$TMPDIR/nginx.pid
NGINX=(nginx -p "$RUN_DIR" -e "$LOG_LOCATION/nginx_error.log" -c "$NGINX_CONFIG")
NGINX_USER=
if [ "$(id -u)" = 0 ]; then
  NGINX_USER="user root;"
fi
cat > "$NGINX_CONFIG" <<EOF
# Written by scripts/serve.sh from $CONFIG: the edge in front of TorchServe's inference API.
$NGINX_USER
daemon off;  # a child of this script, in its process group: stopped with it
worker_processes 1;
pid $NGINX_PID_FILE;
error_log $LOG_LOCATION/nginx_error.log warn;
events {
  worker_connections 1024;
}
http {
  access_log off;  # TorchServe's access_log.log has every request
  server_tokens off;
  client_body_temp_path $TMPDIR/nginx_body;
  proxy_temp_path $TMPDIR/nginx_proxy;
  fastcgi_temp_path $TMPDIR/nginx_fastcgi;
  uwsgi_temp_path $TMPDIR/nginx_uwsgi;
  scgi_temp_path $TMPDIR/nginx_scgi;
  client_max_body_size $(setting max_request_size);
  large_client_header_buffers 4 8k;  # named in the 431 below
  proxy_request_buffering off;
  proxy_buffering off;
  proxy_read_timeout $(setting default_response_timeout)s;
  proxy_send_timeout $(setting default_response_timeout)s;
  server {
    listen ${INFERENCE_URL#http://};
    location / {
      proxy_pass http://unix:$INFERENCE_SOCKET:;
      proxy_http_version 1.1;  # chunked answers (streams) pass through chunked
    }
    # What the edge refuses itself is answered like the handler's refusals: JSON naming what is over which limit.
    error_page 413 @body_too_large;
    error_page 494 =431 @headers_too_large;  # 494: nginx's own code for headers over large_client_header_buffers
    location @body_too_large {
      default_type application/json;
      return 413 '{"error": "body: over the $(setting max_request_size) bytes allowed (max_request_size)", "field": "body"}\n';
    }
    location @headers_too_large {
      default_type application/json;
      return 431 '{"error": "headers: over the 8 KiB allowed per line, 32 KiB in all", "field": "headers"}\n';
    }
  }
}
EOF

# The configuration TorchServe runs with: TS_CONFIG, then allowed_urls anchored to this model store (the last
# occurrence of a key wins). Model registration is off (enable_model_api=false), but the workflow API is not, and
# a workflow's handler is Python that TorchServe runs; its archive must come from an allowed URL or the workflow
# store (the model store). The pattern admits a plain file name directly in this store (no slash, %-escape or
# leading dot: no way out of it). The path is quoted for Java's regex (\Q...\E, each backslash doubled for the
# properties file), so no backslash may be in it.
case "$STORE" in
  *\\*) echo "MODEL_STORE must not contain a backslash: $STORE" >&2; exit 2 ;;
esac
EFFECTIVE_CONFIG=$RUN_DIR/effective.properties
{
  cat "$CONFIG"
  printf '\n# Appended by scripts/serve.sh: archives only from this model store.\n'
  printf 'allowed_urls=file://\\\\Q%s\\\\E/[A-Za-z0-9_][A-Za-z0-9_.-]*\n' "$STORE"
  printf 'workflow_store=%s\n' "$STORE"
  printf '# Appended by scripts/serve.sh: the inference API behind the edge (nginx.conf) only.\n'
  printf 'inference_address=unix:%s\n' "$INFERENCE_SOCKET"
} > "$EFFECTIVE_CONFIG"
TS_ARGS=(--ts-config "$EFFECTIVE_CONFIG" --model-store "$STORE" --ncs)
if [ "$RUN_DIR" = "$(realpath -m "$ROOT/artifacts/serve")" ]; then
  STOP_COMMAND="make stop"
else
  STOP_COMMAND="RUN_DIR=$RUN_DIR scripts/serve.sh stop"
fi

already_running() {
  if kill -0 "$(cat "$PID_FILE" 2>/dev/null)" 2>/dev/null; then
    echo "TorchServe is running already in $RUN_DIR ($STOP_COMMAND)" >&2
    exit 1
  fi
}
# Started once TorchServe is known not to run here: its socket and nginx's pid file are a stopped instance's. The pid
# file appears once nginx listens.
start_edge() {
  if ! command -v nginx >/dev/null; then
    echo "nginx is missing (the edge in front of TorchServe's inference API): apt-get install -y nginx" >&2
    exit 1
  fi
  rm -f "$INFERENCE_SOCKET" "$NGINX_PID_FILE"
  "${NGINX[@]}" </dev/null >/dev/null 2>&1 &
  local edge=$!
  until [ -s "$NGINX_PID_FILE" ]; do
    if ! kill -0 "$edge" 2>/dev/null; then
      echo "The edge (nginx) did not start on ${INFERENCE_URL#http://}:" >&2
      tail -n 3 "$LOG_LOCATION/nginx_error.log" >&2
      exit 1
    fi
    sleep 0.1
  done
}
stop_edge() {
  if [ -s "$NGINX_PID_FILE" ]; then
    "${NGINX[@]}" -s stop
  fi
}

case "${1:-start}" in
  stop)
    STATUS=0
    "$BIN/torchserve" --stop || STATUS=$?
    stop_edge
    exit "$STATUS"
    ;;
  foreground)
    # TorchServe's launcher neither handles nor forwards SIGTERM, and as a container's PID 1 it would ignore it:
    # `docker stop` and a pod's deletion would wait for SIGKILL. On TERM/INT, stop TorchServe the regular way.
    already_running
    start_edge
    trap stop_edge EXIT
    "$BIN/torchserve" --start --foreground "${TS_ARGS[@]}" &
    LAUNCHER=$!
    trap '"$BIN/torchserve" --stop >/dev/null 2>&1 || true' TERM INT
    STATUS=0
    wait "$LAUNCHER" || STATUS=$?
    if kill -0 "$LAUNCHER" 2>/dev/null; then  # a signal ended the wait early: wait for the stop to finish
      STATUS=0
      wait "$LAUNCHER" || STATUS=$?
    fi
    exit "$STATUS"
    ;;
  start)
    if ! command -v java >/dev/null && [ ! -x "${JAVA_HOME:-/nonexistent}/bin/java" ]; then
      echo "TorchServe needs Java 11 or later (java is not on PATH, JAVA_HOME is not set)" >&2
      exit 1
    fi
    already_running
    start_edge
    trap stop_edge EXIT  # until TorchServe serves: the edge stays only with it
    # The console repeats ts_log.log without rotation: in the background only the log files are kept.
    if ! "$BIN/torchserve" --start "${TS_ARGS[@]}" >/dev/null 2>&1; then
      echo "TorchServe did not start; see $LOG_LOCATION/ts_log.log" >&2
      exit 1
    fi
    echo "Waiting for TorchServe and the model (logs: $LOG_LOCATION) ..."
    for _ in $(seq 1 "${WAIT_S:-900}"); do
      if ! kill -0 "$(cat "$PID_FILE" 2>/dev/null)" 2>/dev/null; then
        echo "TorchServe exited; see $LOG_LOCATION/ts_log.log" >&2
        exit 1
      fi
      # Ready once a worker of the model is READY (TorchServe's /ping answers 200 while the model still loads).
      if "$BIN/python" "$ROOT/scripts/ready.py" --config "$CONFIG" --key-file "$RUN_DIR/key_file.json" 2>/dev/null; then
        cat <<EOF

TorchServe is serving "controlnet" at $INFERENCE_URL (management $(setting management_address), metrics $(setting metrics_address)).
API keys: $RUN_DIR/key_file.json

  KEY=\$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["inference"]["key"])' $RUN_DIR/key_file.json)
  curl -H "Authorization: Bearer \$KEY" -F image=@tests/data/house.png -F prompt="a house" \\
       -o result.zip $INFERENCE_URL/predictions/controlnet
  .venv/bin/python scripts/client.py generate --image tests/data/house.png --prompt "a house" --out result/

Stop it with: $STOP_COMMAND
EOF
        trap - EXIT
        exit 0
      fi
      sleep 1
    done
    echo "The model was not ready after ${WAIT_S:-900} s; see $LOG_LOCATION/ts_log.log and model_log.log" >&2
    exit 1
    ;;
  *)
    echo "usage: $0 [start|stop|foreground]" >&2
    exit 2
    ;;
esac
