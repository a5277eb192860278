# ControlNet canny on TorchServe, serving the embedded tiny model (mount a model store for real weights).
#
#   docker build -t controlnet-canny .                                  # CPU
#   docker build -t controlnet-canny --build-arg TORCH_VARIANT=cu128 .  # CUDA (run with --gpus all)
#   docker run --rm -p 127.0.0.1:8080-8082:8080-8082 controlnet-canny
#
# The API keys are in /app/artifacts/serve/key_file.json inside the container (docker exec ... cat it).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# Which PyTorch wheel index torch comes from: cpu, or a CUDA variant such as cu128 (the CUDA runtime
# ships inside those wheels; the host needs only the driver and the NVIDIA container toolkit).
ARG TORCH_VARIANT=cpu
ENV PIP_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT} \
    PIP_EXTRA_INDEX_URL=https://pypi.org/simple \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Java runs TorchServe's frontend; make runs the same set-up as `make serve` outside a container; a worker
# serving bf16 on an AVX-512 BF16 CPU compiles its attention kernel with gcc at load (backends/cpu_attention.c).
# Debian's security updates move these versions, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless make gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 serve
WORKDIR /app
COPY --chown=serve:serve . .
USER serve

# `make mar`: the virtual environment, the tiny checkpoint and the model directory in model_store/.
# Published ports need TorchServe listening on the container's interfaces, not its loopback; publish them on
# the host's loopback (as above) or behind a TLS proxy. gRPC stays on the container's loopback.
RUN make mar \
    && sed 's#=http://127.0.0.1:#=http://0.0.0.0:#' config.properties > artifacts/container.properties
ENV TS_CONFIG=/app/artifacts/container.properties

EXPOSE 8080 8081 8082
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD [".venv/bin/python", "scripts/client.py", "ping"]
CMD ["scripts/serve.sh", "foreground"]
