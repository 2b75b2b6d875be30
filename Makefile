# Two commands from a fresh machine: `make serve` and `make test`. Both create .venv when missing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8080
REGISTRY ?= registry.yaml

.PHONY: serve test bench check plan clean

# torch goes in first, pinned: 2.13.0 is the CPU build that lies on this machine's disk; letting the
# project's dependencies pull torch would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,onnx,openvino]"
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/rerank-gateway serve --registry $(REGISTRY) --host $(HOST) --port $(PORT)

check: $(STAMP)
	$(VENV)/bin/rerank-gateway check --registry $(REGISTRY)

plan: $(STAMP)
	$(VENV)/bin/rerank-gateway plan --registry $(REGISTRY)

# The rerank benchmark (bench/rerank_bench.py): ~10 min on 2 cores; BENCH_ARGS=--quick for a smoke run.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m bench.rerank_bench $(BENCH_ARGS)

# The limits tests start a real redis-server (Debian package) on 127.0.0.1; install it when missing.
test: $(STAMP)
	command -v redis-server >/dev/null 2>&1 || apt-get install -y -q redis-server || { apt-get update -q && apt-get install -y -q redis-server; }
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
