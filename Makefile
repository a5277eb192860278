# Two commands do all set-up on a fresh machine:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TINY := artifacts/tiny/control_tiny_canny.pth

.PHONY: setup setup-test tiny generate test bench clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(TINY): $(VENV)/.installed scripts/make_tiny_checkpoint.py handler/controlnet_canny/configs/cldm_tiny.yaml
	$(PY) scripts/make_tiny_checkpoint.py

tiny: $(TINY)

# Offline generation on the embedded tiny model (no server).
generate: $(TINY)
	$(PY) scripts/generate.py --checkpoint $(TINY) --config handler/controlnet_canny/configs/cldm_tiny.yaml \
		--image tests/data/house.png --prompt "a house" --image-resolution 64 --out artifacts/result.zip

test: $(VENV)/.installed-test nginx
	$(PY) -m pytest

# The edge that scripts/serve.sh puts in front of TorchServe's inference API: Debian's nginx, installed here where it
# is missing and this runs as root with apt-get; elsewhere install nginx yourself.
.PHONY: nginx
nginx:
	@command -v nginx >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; } \
		|| { echo "nginx is needed (scripts/serve.sh's edge): apt-get install -y nginx" >&2; exit 1; }

# Performance figures for docs/benchmarks.md: the pipeline loaded from a synthetic full-size checkpoint (5.7 GB,
# written once to ~/.cache) beside diffusers and OpenVINO, per step, on square, landscape and portrait outputs at
# 256 and 512, fp32 and bf16; whole square images; start-up; drift. Hours on two cores; see docs/benchmarks.md.
# Service overhead needs the server: make serve && .venv/bin/python scripts/bench.py --service http://127.0.0.1:8080
# A GPU machine: scripts/gpu_check.sh (parity, drift and benchmark on CUDA, one request served there).
bench: $(VENV)/.installed-test $(TINY)
	$(PY) scripts/bench.py --startup
	$(PY) scripts/bench.py --shapes 1:1 --whole-image --no-diffusers --no-openvino
	$(PY) scripts/bench.py --drift

clean:
	rm -rf artifacts model_store/controlnet logs

# Serving. The model directory (TorchServe's "no-archive" format, see scripts/build_mar.py) from the tiny checkpoint.
MAR := model_store/controlnet/MAR-INF/MANIFEST.json
.PHONY: mar serve stop

$(MAR): $(TINY) scripts/build_mar.py scripts/make_tiny_adapters.py handler/controlnet_handler.py handler/serving.py handler/model-config.yaml \
		$(wildcard handler/controlnet_canny/*.py handler/controlnet_canny/configs/*.yaml)
	$(PY) scripts/build_mar.py

mar: $(MAR)

# Starts TorchServe in the background on 127.0.0.1:8080-8082 and prints how to call it.
serve: $(MAR) nginx
	scripts/serve.sh start

stop:
	scripts/serve.sh stop

# Reliability runs against a TorchServe they start on loopback (tiny model), bounded in time and requests;
# figures in docs/reliability.md. The JSON summaries go to artifacts/reliability/.
.PHONY: load soak
load: $(VENV)/.installed $(TINY) nginx
	$(PY) scripts/load.py --out artifacts/reliability/load.json

soak: $(VENV)/.installed $(TINY) nginx
	$(PY) scripts/soak.py --out artifacts/reliability/soak.json

# The container image, built with podman on a Debian base that mmdebstrap makes (no image registry needed) and pip
# set up as this machine's: scripts/build_image.sh (IMAGE, BASE_IMAGE, BUILD_ARGS pass through). docs/serving.md.
.PHONY: image
image:
	scripts/build_image.sh
