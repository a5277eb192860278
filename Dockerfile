# ControlNet canny on TorchServe, serving the embedded tiny model (mount a model store for real weights).
#
#   docker build -t controlnet-canny:0.1.0 .                                  # CPU
#   docker build -t controlnet-canny:0.1.0 --build-arg TORCH_VARIANT=cu128 .  # CUDA (run with --gpus all)
#   docker run --rm -p 127.0.0.1:8080-8082:8080-8082 controlnet-canny:0.1.0
#
# Without a reachable image registry, `make image` makes the base with mmdebstrap and builds with podman
# (docs/serving.md, "Container"). The API keys are in /app/artifacts/serve/key_file.json inside the container.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# The build stage: the virtual environment, the tiny checkpoint and the model directory (`make mar`, the set-up
# of `make serve`), with make and pip's settings that the runtime image does not keep.
FROM ${BASE_IMAGE} AS build
# Where pip finds packages. By default torch comes from PyTorch's index for TORCH_VARIANT (cpu, or a CUDA
# variant such as cu128 whose wheels carry the CUDA runtime: the host needs only the driver and the NVIDIA
# container toolkit) and the rest from PyPI; `make image` passes the build machine's own pip settings.
ARG TORCH_VARIANT=cpu
ARG PIP_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG PIP_EXTRA_INDEX_URL=https://pypi.org/simple
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Debian's security updates move these versions, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# The requirements first, in a layer of their own that code changes do not invalidate (`make mar` finds them
# installed).
COPY requirements.txt .
RUN python3 -m venv .venv && .venv/bin/python -m pip install -r requirements.txt
COPY . .
# Published ports need TorchServe listening on the container's interfaces, not its loopback; publish them on
# the host's loopback (as above) or behind a TLS proxy. gRPC stays on the container's loopback.
RUN make mar \
    && sed 's#=http://127.0.0.1:#=http://0.0.0.0:#' config.properties > artifacts/container.properties \
    && rm -rf artifacts/tiny

# The runtime: Java for TorchServe's frontend, gcc because a worker compiles its C kernels for the machine's CPU
# when it loads the model (handler/controlnet_canny/backends/cpu_attention.c, cpu_winograd.c), procps because the
# frontend stops a worker it scales down by running the program `kill -9 <pid>` (without it the management API
# answers 500 to a scale-down; the frontend's other external commands are in docs/serving.md, "Container"), nginx
# for the edge that scripts/serve.sh puts in front of the inference API (pipelined requests answered in order).
# The application,
# its environment and the model directory belong to root: the server's user reads them and writes only to
# TorchServe's working directory (keys, logs) and to /tmp.
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless gcc libc6-dev procps nginx \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
    && useradd --uid 10001 --user-group --home-dir /tmp --no-create-home --shell /usr/sbin/nologin serve
COPY --from=build /app /app
RUN install -d -o serve -g serve -m 700 /app/artifacts/serve
WORKDIR /app
USER 10001:10001
# XDG_CACHE_HOME: the CPU backend's measured choices (backends/cpu.py); mount a volume there to keep them
# across restarts, else a new container measures again when its worker loads.
ENV TS_CONFIG=/app/artifacts/container.properties \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

EXPOSE 8080 8081 8082
# Healthy once a worker of the model is READY (scripts/ready.py: the management API's describe, with the
# management key); TorchServe's /ping answers 200 while the model is still loading. The start period covers
# the real checkpoint's load from a cold disk (model-config.yaml's startupTimeout).
HEALTHCHECK --interval=10s --timeout=10s --start-period=900s --retries=3 \
    CMD [".venv/bin/python", "scripts/ready.py"]
CMD ["scripts/serve.sh", "foreground"]
