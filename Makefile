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

test: $(VENV)/.installed-test
	$(PY) -m pytest

clean:
	rm -rf artifacts model_store/*.mar logs
