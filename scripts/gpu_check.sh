#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU, run in a copy of the repository:
#
#   scripts/gpu_check.sh
#
#   1. parity: tests/test_parity_diffusers.py on the GPU in fp32 (CONTROLNET_TEST_DEVICE=cuda)
#   2. drift: the tiny model's images on the GPU in fp32, fp16 and bf16 against fp32 on CPU (bench.py --drift)
#   3. serve: one request through TorchServe with the worker on the GPU in fp16 (scripts/serve.sh, client.py)
#   4. bench: full-size SD 1.5 + ControlNet, ours vs diffusers on the GPU in fp16 and bf16, 512x512 and 512x704
#      (bench.py --device cuda; writes a 5.7 GB synthetic checkpoint to ~/.cache once)
#   5. compile: ours under torch.compile at 512x512 in fp16, its compile time apart (bench.py --compile)
#
# Each check runs under a time limit, under 10 minutes in all once installed; a failed one does not stop the
# others, and a summary ends the output. Exit status 1 when a check failed.
# Set-up when .venv is missing: `make setup-test` (requirements-test.txt: torch 2.14.1 from PyPI, CUDA
# included); offline, point pip at a folder of wheels: PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels.
# SYSTEM_TORCH=1 instead keeps the machine's own torch and torchvision (a venv with --system-site-packages,
# the other requirements installed into it).
# Environment: OUT (a folder: the whole output goes to $OUT/gpu_check.log, the benchmark tables to
# $OUT/bench.md, the served sample to $OUT/served_sample.png), PYTHON (the interpreter that makes .venv,
# default python3), BENCH_ARGS and COMPILE_ARGS (bench.py's options for checks 4 and 5; COMPILE_ARGS empty
# skips 5), DEVICE (default cuda; DEVICE=cpu with tiny-model BENCH_ARGS and no COMPILE_ARGS runs the same
# checks on a CPU, to test this script).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEVICE=${DEVICE:-cuda}
BENCH_ARGS=${BENCH_ARGS---shapes 1:1 4:3 --sizes 512 --steps 10 --whole-image}
COMPILE_ARGS=${COMPILE_ARGS---shapes 1:1 --sizes 512 --precisions fp16 --steps 10 --no-diffusers --compile}
PY=$ROOT/.venv/bin/python
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH=$ROOT/handler PYTHONUNBUFFERED=1
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
if [ "$DEVICE" = cuda ]; then
  SERVE_PRECISION=fp16
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
else
  SERVE_PRECISION=fp32
fi

if [ ! -x "$PY" ]; then
  echo "== set-up: .venv"
  if [ -n "${SYSTEM_TORCH:-}" ]; then
    grep -hv -e '^-r' -e '^torch==' -e '^torchvision==' requirements.txt requirements-test.txt > "$WORK/requirements.txt"
    "${PYTHON:-python3}" -m venv --system-site-packages .venv && "$PY" -m pip install -q -r "$WORK/requirements.txt" &&
      "$PY" -m pip install -q --no-deps -e .
  else
    make setup-test PYTHON="${PYTHON:-python3}"
  fi || { echo "set-up failed: pip could not install the requirements"; exit 1; }
fi
if ! "$PY" -c "import sys, torch; sys.exit('$DEVICE' == 'cuda' and not torch.cuda.is_available())"; then
  "$PY" -c "import torch; print(f'torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no usable GPU')"
  exit 1
fi
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
"$PY" scripts/make_tiny_checkpoint.py >/dev/null || exit 1

RESULTS=()
check() {  # NAME SECONDS COMMAND...: runs the command (or a function below) under a time limit
  local name=$1 limit=$2 status start=$SECONDS
  shift 2
  echo
  echo "== $name (limit ${limit} s): $*"
  timeout --kill-after=20 "$limit" bash -c '"$@"' "$name" "$@"
  status=$?
  case $status in
    0) RESULTS+=("PASS $name ($((SECONDS - start)) s)") ;;
    124|137) RESULTS+=("FAIL $name: over its ${limit} s limit") ;;
    *) RESULTS+=("FAIL $name: exit status $status") ;;
  esac
}

bench() {  # bench.py's options; its table is appended to bench.md
  set -o pipefail
  "$PY" scripts/bench.py --device "$DEVICE" "$@" | tee -a "${OUT:-$WORK}/bench.md"
}

serve_one_request() {
  local status=0 url
  "$PY" scripts/build_mar.py --export-path "$MODEL_STORE" \
    --set handler.device="$DEVICE" --set handler.precision="$SERVE_PRECISION" || return 1
  if ! scripts/serve.sh start; then
    tail -n 40 "$RUN_DIR/logs/model_log.log"
    return 1
  fi
  url=$(sed -n 's/^inference_address=//p' "${TS_CONFIG:-config.properties}" | tail -n 1)
  "$PY" scripts/client.py --url "$url" --key-file "$RUN_DIR/key_file.json" generate --image tests/data/house.png \
    --prompt "a house" --param seed=1 --out "$WORK/result" || status=1
  # The worker logs where it loaded the model: the request must have run there, not on a fallback.
  if ! grep -o "loaded .* on $DEVICE[:0-9]* with" "$RUN_DIR/logs/model_log.log"; then
    echo "no worker loaded on $DEVICE"
    status=1
  fi
  ls -l "$WORK/result" || status=1
  if [ -n "${OUT:-}" ] && [ -f "$WORK/result/sample_00.png" ]; then
    cp "$WORK/result/sample_00.png" "$OUT/served_sample.png"
  fi
  return $status
}

export MODEL_STORE=$WORK/model_store RUN_DIR=$WORK/run WAIT_S=90
export PY DEVICE SERVE_PRECISION WORK
export -f bench serve_one_request

check parity 100 env CONTROLNET_TEST_DEVICE="$DEVICE" "$PY" -m pytest tests/test_parity_diffusers.py -q -p no:cacheprovider
check drift 60 "$PY" scripts/bench.py --drift --device "$DEVICE"
if command -v java >/dev/null; then
  check serve 90 serve_one_request
  scripts/serve.sh stop >/dev/null 2>&1  # also after a time-out: TorchServe runs in the background
else
  RESULTS+=("SKIPPED serve: TorchServe needs Java 11 or later, and java is not on PATH")
fi
# shellcheck disable=SC2086  # lists of options
check bench 200 bench $BENCH_ARGS
if [ -n "$COMPILE_ARGS" ]; then
  # shellcheck disable=SC2086
  check compile 140 bench $COMPILE_ARGS
fi

echo
echo "== summary ($DEVICE)"
printf '%s\n' "${RESULTS[@]}"
! printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'
