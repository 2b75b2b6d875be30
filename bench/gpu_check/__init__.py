"""One command for every GPU figure of issue 18: `make gpu-check` or `python -m bench.gpu_check`.

On one GPU, in at most 8 minutes including model builds (random weights at real size, nothing
downloaded), one markdown report and one JSON (in $OUT when set, else bench/results/gpu-check-<date>.*;
the markdown is printed last). Sections, most valuable first, each in a process of its own with its own
time limit, results flushed after every step (bench.gpu_check.runner):

  ceilings        a. the card's bf16/fp16 matmul TFLOP/s and copy GB/s, measured here (the "of peak" base)
  http_bge        c. gateway over HTTP, bge shape: 1,000 / 10,000 docs, 16 and 64 clients x 20 docs,
                     3-doc requests beside 10,000 docs vs alone, /v1/models' budget, process GPU memory
  qwen3_gateway   f. Qwen3-4B nf4, plain entry, over HTTP: memory after load / after 2 x 320 docs, pairs/s
  qwen3_official  f. the official Qwen3-Reranker code on the same checkpoint, nf4, batch 32 x 512
  peers           d. FlagReranker fp16 and CrossEncoder fp16 at batch 32 / 128, a sorted fp16 loop
  table_encoders  b. memory/speed of XLM-R large and GTE (engine warm-up; real tokens; of measured peak)
  t4_gte          e. GTE padded (no varlen kernel on a T4) under a 15 GiB per-process cap: 10,000 docs (20 of
                     8,192 tokens), 16 clients
  parity          g. padding_free off vs on: scores (max |diff|, Spearman) and speed
  table_qwen3     b. the same table for Qwen3-4B nf4
  event_loop      h. what one 20-document request costs the event loop on this host (bench.event_loop)

    python -m bench.gpu_check                       # on a GPU
    python -m bench.gpu_check --smoke               # every section on this CPU with tiny models (~3 min)
    python -m bench.gpu_check --sections http_bge,peers --limit peers=200 --budget-s 400

On the GPU machine of the device tool (no package index there): `make gpu-wheels` here first (fills .whl/:
the wheels the image lacks, ~25 MB, and the MiniLM tokenizer), then run, with `carry: [".whl"]` and
timeout_s 600:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; python3 -m compileall -q -j 16 /tmp/site . >/dev/null 2>&1; PYTHONUNBUFFERED=1 timeout 560 python3 -m bench.gpu_check

The machine gets the tree without .git: the report names the commit `make gpu-wheels` wrote in .whl/COMMIT
(GPU_CHECK_COMMIT overrides it). pip installs without compiling and the image may not write bytecode on
import, so compileall compiles the wheels and the tree once, on every core, rather than each of the check's
~25 processes compiling what it imports (transformers alone: ~1 s a process). The device tool sets OUT:
gpu-check.md, gpu-check.json and gpu-check-logs.tar.gz come back from there. The check's own deadline
(480 s) ends it well inside `timeout 560`; on SIGTERM it still ends its sections and writes the report.
"""
