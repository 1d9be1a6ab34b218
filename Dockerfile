# syntax=docker/dockerfile:1
# GPU image of the ST-Adapter video inference server (gRPC, HTTP + Prometheus metrics).
#
#   docker build -t stadapter-serve .
#   docker run --gpus all -p 127.0.0.1:50051:50051 -p 127.0.0.1:8000:8000 -p 127.0.0.1:9090:9090 \
#       -v "$PWD/model_repository:/models" -e STADAPTER_ADMIN_TOKEN="$(cat admin.token)" stadapter-serve
#
# Anything after the image name is appended to the server's flags (e.g. --max-batch-size 64).
# The repository volume must be writable by uid 10001 for RegisterTask/UnregisterTask.
#
# torch 2.14.1's Linux wheel on PyPI is built for CUDA 13.0 and onnxruntime-gpu 1.31.1 for
# CUDA 13 + cuDNN 9; both bring their CUDA libraries as nvidia-* wheels, so the base image
# only has to be a CUDA 13 userland that the NVIDIA container runtime can give the driver to.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    STADAPTER_ADDRESS=127.0.0.1:50051

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY stadapter ./stadapter
COPY stadapter_api ./stadapter_api
COPY server ./server
COPY clients ./clients
COPY export ./export
COPY training ./training
# torch==2.14.1 is pinned in pyproject.toml; onnxruntime-gpu replaces the CPU onnxruntime.
# hadolint ignore=DL3013
RUN pip install "onnxruntime-gpu[cuda,cudnn]==1.31.1" ".[server,export-gpu]"

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin stadapter \
    && mkdir -p /models \
    && chown stadapter:stadapter /models
USER 10001:10001

VOLUME ["/models"]
# gRPC (stadapter.v1, grpc.health.v1, reflection), HTTP (OIP v2 REST, /v2/health/{live,ready}, multipart
# upload) and Prometheus metrics (HTTP /metrics)
EXPOSE 50051 8000 9090

# grpc.health.v1 Check through the client CLI: exit 0 only while SERVING (NOT_SERVING while draining).
# With --tls-cert, also set STADAPTER_TLS_CA to a CA file in the container (its cert must name 127.0.0.1).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-m", "clients", "health", "--timeout", "5", "--retries", "0"]

ENTRYPOINT ["python", "-m", "server", "--model-repository", "/models", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8000", "--metrics-port", "9090"]
CMD []
