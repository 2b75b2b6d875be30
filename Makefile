# Two commands from a fresh machine: `make serve` and `make test`. Both create .venv when missing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8080
REGISTRY ?= registry.yaml

.PHONY: install serve test test-slow-cpu bench check plan clean gpu-check gpu-wheels gpu-wheels-verify

# torch goes in first, pinned: 2.13.0 is the CPU build that lies on this machine's disk; letting the
# project's dependencies pull torch would download a multi-GB CUDA build.
# The container images (docker/) run this same target with their own TORCH_INDEX / EXTRAS / VENV, so the
# images and a developer's .venv cannot drift apart (tests/test_deploy.py checks it).
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS      ?= onnx,openvino
# pip compiles what it installs to bytecode on one core; compileall does it on every core. A fresh
# `make .venv/.installed-test` on a 2-core AMD EPYC, two pairs: 86.8 -> 62.7 s and 99.5 -> 82.6 s. The bytecode
# must be written at install: processes started with PYTHONDONTWRITEBYTECODE (this machine's default) would
# otherwise compile torch at every start (importing the test set: 18 s instead of 8). A few files of the
# libraries are written for newer Pythons and do not compile, as under pip: -qq and `|| true` pass them by.
PIP_INSTALL := $(PY) -m pip install -q --no-compile
COMPILE     := $(PY) -m compileall -qq -j 0 $(VENV)/lib || true
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP_INSTALL) $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP_INSTALL) -e "$(if $(EXTRAS),.[$(EXTRAS)],.)"
	$(COMPILE)
	touch $(STAMP)

# The test extra (pytest, the SDKs, the reference libraries: FlagEmbedding, sentence-transformers) on top,
# for `make test` and `make bench` only: `make serve` installs none of it.
TEST_STAMP := $(VENV)/.installed-test
COMMA      := ,
$(TEST_STAMP): $(STAMP)
	$(PIP_INSTALL) -e ".[test$(if $(EXTRAS),$(COMMA)$(EXTRAS))]"
	$(COMPILE)
	touch $(TEST_STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/rerank-gateway serve --registry $(REGISTRY) --host $(HOST) --port $(PORT)

check: $(STAMP)
	$(VENV)/bin/rerank-gateway check --registry $(REGISTRY)

plan: $(STAMP)
	$(VENV)/bin/rerank-gateway plan --registry $(REGISTRY)

# Infinity, a system of the benchmark, in a virtualenv of its own: infinity-emb 0.0.78 pins numpy and
# transformers older than the project's. Same torch (the CPU build on disk).
INFINITY_VENV := .venv-infinity
$(INFINITY_VENV)/.installed:
	test -x $(INFINITY_VENV)/bin/python || python3 -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/python -m pip install -q torch==2.13.0
	$(INFINITY_VENV)/bin/python -m pip install -q "infinity-emb[server,torch]==0.0.78"
	touch $@

# The rerank benchmark (bench/rerank_bench.py): ~10 min on 2 cores; BENCH_ARGS=--quick for a smoke run.
bench: $(TEST_STAMP) $(INFINITY_VENV)/.installed
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m bench.rerank_bench $(BENCH_ARGS)

# Every GPU figure of issue 18 in one run on one GPU (bench/gpu_check, <= 8 min, real-size random weights):
# markdown + JSON in $$OUT or bench/results/. GPU_CHECK_ARGS=--smoke runs it all on a CPU with tiny models.
gpu-check: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m bench.gpu_check $(GPU_CHECK_ARGS)

# For a GPU machine with no package index (the device tool's, Python 3.12): the wheels it lacks and the
# MiniLM tokenizer into .whl/ (~23 MB); gpu-wheels-verify runs the smoke check with only the image's
# packages + those wheels (.venv-gpuimage, ~5 min). The command to run there: bench/gpu_check/__init__.py.
gpu-wheels: $(STAMP)
	$(PY) -m bench.gpu_check.wheels download

gpu-wheels-verify: gpu-wheels
	$(PY) -m bench.gpu_check.wheels verify

# The limits tests start a real redis-server (Debian package) on 127.0.0.1; install it when missing.
# Two parts: the suite on TEST_WORKERS pytest-xdist workers (whole files per worker, so a module's server
# starts once; the slowest files first, tests/conftest.SLOWEST_FILES), then the tests marked `serial`
# (wall-time latency and deadlines) alone. One pytest uses about one core (CPU time / wall 1.07, 2-core
# Intel Xeon); there the suite took 461 s in one process and 228 + 99 s in these two parts. A part that
# PYTEST_ARGS leaves empty (pytest's exit code 5) is not a failure.
# Workers: the cores the gateway would use here (core.host.cpu_cores: affinity capped by a CPU quota); with
# one (a container limited to one CPU), no workers: 0 runs the suite in one process.
TEST_WORKERS ?= $(shell $(PY) -c "from core.host import cpu_cores; cores = cpu_cores(); print(cores if cores > 1 else 0)")
PYTEST := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/python -m pytest -q
test: $(TEST_STAMP)
	command -v redis-server >/dev/null 2>&1 || apt-get install -y -q redis-server || { apt-get update -q && apt-get install -y -q redis-server; }
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PYTEST) -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

# `make test` as on the project's slow machine kind (AMD EPYC, no AMX / AVX512-BF16, fp32, ~3x slower), on an
# Intel Xeon: bench/slow_cpu.sh hides the CPU's bf16 flags, caps MKL at AVX2 and gives each core a CPU quota
# (SLOW_CPU_SHARE, default 0.45). Needs root. The suite must stay under 12 minutes there. On two workers it
# took 603 + 186 s (2026-12-06): the quota is shared, so a second worker gains nothing there, while a suite
# in one process gets 0.9 of a core for its one busy thread, twice what a core of the slow kind gives.
test-slow-cpu: $(STAMP)
	bench/slow_cpu.sh $(MAKE) test

clean:
	rm -rf $(VENV) $(INFINITY_VENV) .venv-gpuimage .pytest_cache
