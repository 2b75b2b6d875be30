"""The GPU check's markdown: the issue's figures first, then one short block per section. Pure Python (the
runner renders it after every section without importing torch); the JSON holds every detail."""

from __future__ import annotations

import statistics
from typing import Any

from bench.gpu_check.gpu_memory import describe

MAX_CHARS = 10_000


def _n(x: Any, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def _tf(x: Any) -> str:
    """TFLOP/s: whole numbers on a GPU, two decimals for the smoke run's small ones."""
    return "-" if x is None else f"{x:,.0f}" if x >= 10 else f"{x:.2f}"


def _ms(s: Any) -> str:
    return "-" if s is None else f"{s * 1000:,.0f} ms" if s < 10 else f"{s:,.1f} s"


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:.0%}"


def _server(run: dict) -> str:
    """The device-busy, pairs-a-batch and host-CPU cells of a workload measured with http_load.costed."""
    srv = run.get("server") or {}
    cpu = srv.get("cpu_ms_per_pair")
    return f"{_pct(srv.get('device_busy'))} | {_n(srv.get('pairs_per_batch'), ',.1f')} | {'-' if cpu is None else f'{cpu:.3f} ms'} |"


def _steps(run: dict) -> str:
    """A workload's batch steps (http_load.costed's step_ms_per_batch) as "build 0.41/0.40, collate ..."."""
    steps = (run.get("server") or {}).get("step_ms_per_batch") or {}
    return ", ".join(f"{step} {wall:.2f}/{cpu:.2f}" for step, (wall, cpu) in steps.items())


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if a is not None and b else None


def _res(doc: dict, name: str) -> dict:
    return (doc["sections"].get(name) or {}).get("result") or {}


def _best(runs: Any, key: str = "pairs_per_s") -> dict | None:
    if not runs:
        return None
    return max(runs, key=lambda r: r.get(key) or 0)


def _budget(models: Any) -> list[str]:
    out = []
    for mid, m in (models or {}).items():
        ladder = [r for r in (m.get("budget_ladder") or []) if isinstance(r, dict)]
        rungs = ", ".join(f"{(r.get('max_batch_tokens') or 0) // 1024}k:{(r.get('tokens_per_s') or 0) / 1000:,.0f}k" for r in ladder)
        out.append(
            f"- `{mid}`: max_batch_tokens **{_n(m.get('max_batch_tokens'))}**, {m.get('dtype', '?')}"
            + (f"; ladder (tokens:tok/s) {rungs}" if rungs else "")
            + f"; reason: {str(m.get('budget_reason', '-'))[:180]}"
        )
    return out


# How section e names its in-process sorted loop (bench.gpu_check.in_process), followed by its dtype and budget.
LOOP_SYSTEM = "sorted loop"


def _loop_row(peers: dict, docs: int) -> dict:
    systems = peers.get("systems") or {}
    name = next((k for k in systems if k.startswith(LOOP_SYSTEM)), None)
    return (systems.get(name) or {}).get(str(docs)) or {} if name else {}


def figures(doc: dict) -> list[str]:
    c, qg, qo, d = _res(doc, "http_bge"), _res(doc, "qwen3_gateway"), _res(doc, "qwen3_official"), _res(doc, "peers")
    small, large = (doc.get("plan", {}).get("big_docs") or [1000, 10000])[:2]
    big1, big2 = _best(c.get(f"big_{small}")), _best(c.get(f"big_{large}"))
    c16 = c.get("clients_16") or {}
    beside = c.get("beside") or {}
    qreqs = qg.get("requests") or []
    q_gw = _best(qreqs)
    q_off = (qo.get("score") or {}).get("pairs_per_s")
    loop = _loop_row(d, small)
    rows = [
        (f"bge shape, {small:,} docs over HTTP, pairs/s", ">= 8,000", _n(big1 and big1["pairs_per_s"])),
        (f"bge shape, {large:,} docs over HTTP, pairs/s", ">= 8,000", _n(big2 and big2["pairs_per_s"])),
        ("gateway real tok/s / the model's own (sorted loop, device-busy time)", "~0.8",
         _n(_ratio(big1 and big1.get("real_tokens_per_s"), loop.get("device_real_tokens_per_s")), ".2f")),
        ("16 x 20 clients / the big request, pairs/s", ">= 0.8x", _n(_ratio(c16.get("pairs_per_s"), big1 and big1["pairs_per_s"]), ".2f")),
        ("16 x 20 clients p99 / p50", "<= 3", _n(c16.get("p99_over_p50"), ".1f") + f" ({_ms(c16.get('p50_s'))} / {_ms(c16.get('p99_s'))})"),
        (f"3-doc p99 beside {large:,} docs / alone", "<= 3x", _n(beside.get("p99_ratio"), ".1f")),
        ("plain-entry bge process after the workloads", "<= 3 GB", describe(c.get("memory_after_workloads"))),
        ("plain-entry Qwen3-4B nf4 process after 2 requests", "<= 6 GB", describe(qreqs[-1].get("memory_after") if qreqs else None)),
        ("Qwen3 through the gateway / the official code, pairs/s", ">= 2x", _n(_ratio(q_gw and q_gw["pairs_per_s"], q_off), ".2f")),
    ]
    out = ["## Issue 18 figures", "", "| figure | target | this run |", "|---|---|---|"]
    return out + [f"| {a} | {b} | {v} |" for a, b, v in rows]


def sections_table(doc: dict) -> list[str]:
    out = ["| section | status | s | limit | est. |", "|---|---|---:|---:|---:|"]
    for name, s in doc["sections"].items():
        out.append(f"| {name} | {s['status']} | {s['seconds']:.0f} | {s['limit_s']:.0f} | {s['estimate_s']} |")
    return out


def ceilings(r: dict) -> list[str]:
    if not r:
        return []
    bf, fp, cp = r.get("matmul_bf16") or {}, r.get("matmul_fp16") or {}, r.get("copy") or {}
    return [
        f"**a. Ceilings** ({(r.get('device') or {}).get('device', '?')}): matmul {_n(bf.get('n'))}^3 bf16 "
        f"**{_tf(bf.get('tflops'))} TFLOP/s**, fp16 **{_tf(fp.get('tflops'))}** (median of {_n(bf.get('repeats'))}, events, "
        f"random data); device copy **{_n(cp.get('gb_per_s'))} GB/s** (read + write)."
    ]


def http_bge(r: dict, plan: dict) -> list[str]:
    if not r:
        return []
    per_pair = ((r.get("tokens") or {}).get(f"big_{plan['big_docs'][0]}") or {}).get("per_pair")
    out = [f"**c. Gateway over HTTP, bge shape** (ready in {_n(r.get('ready_s'))} s; {_n(per_pair)} real tokens a pair)"]
    out += _budget(r.get("models"))
    out += [
        "", "| workload | pairs/s | real tok/s | TFLOP/s (real) | of peak | p50 | p99 / time | device busy | pairs / batch | host CPU / pair |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in plan["big_docs"]:
        for k, run in enumerate(r.get(f"big_{n}") or [], 1):
            out.append(
                f"| {n:,} docs, run {k} | {_n(run['pairs_per_s'])} | {_n(run['real_tokens_per_s'])} | {_tf(run['tflops'])} | "
                f"{_pct(run['of_peak'])} | | {_ms(run['seconds'])} | {_server(run)}"
            )
    for clients, _ in plan["closed_loops"]:
        c = r.get(f"clients_{clients}")
        if c:
            out.append(
                f"| {clients} clients x {c['docs_per_request']} docs | {_n(c['pairs_per_s'])} | {_n(c['real_tokens_per_s'])} | | | "
                f"{_ms(c['p50_s'])} | {_ms(c['p99_s'])} | {_server(c)}"
            )
    b = r.get("beside") or {}
    if b.get("beside"):
        x = b["beside"]
        out.append(f"| 3 docs beside {b.get('big_docs', 0):,} docs ({x['requests']} req) | | | | | {_ms(x['p50_s'])} | {_ms(x['p99_s'])} | {_server(x)}")
    if b.get("alone"):
        x = b["alone"]
        out.append(f"| 3 docs alone ({x['requests']} req) | | | | | {_ms(x['p50_s'])} | {_ms(x['p99_s'])} | | | |")
    out.append(
        "\nDevice busy: the batches' device time (CUDA events, from /metrics) over the workload's wall time; one CUDA stream "
        "a model, so at most 100% (on a CPU the inference streams' forwards overlap). Host CPU: the gateway process's, all "
        "threads (/proc), a pair scored."
    )
    steps = [(f"{n:,} docs", _best(r.get(f"big_{n}"))) for n in plan["big_docs"]]
    steps += [(f"{clients} clients", r.get(f"clients_{clients}")) for clients, _ in plan["closed_loops"]]
    steps = [(label, _steps(run)) for label, run in steps if run]
    if any(cells for _, cells in steps):
        out.append(
            "\nAn inference thread's time a batch by step, wall / CPU ms (wall holds the waits: the GIL, the device sync): "
            + "; ".join(f"{label}: {cells}" for label, cells in steps if cells) + "."
        )
    out += _gil(r.get("gil_16"))
    for mid, bt in (r.get("batch_time") or {}).items():
        if bt:
            out.append(
                f"\nA `{mid}` batch's device time as the engine learnt it over these workloads: floor **{_n(bt.get('floor_ms'), ',.2f')} ms** "
                f"+ tokens at **{_n(bt.get('tokens_per_s'))} tokens/s** ({_n(bt.get('batches'))} batches)."
            )
    out.append(f"\nProcess GPU memory: after load {describe(r.get('memory_after_load'))}, after the workloads {describe(r.get('memory_after_workloads'))}.")
    return out


def _gil(g: dict | None) -> list[str]:
    """Section c's GIL sample (bench.gil_budget) as one paragraph."""
    if not g:
        return []
    if g.get("error"):
        return [f"\nThe GIL's holder under 16 clients: not sampled ({g['error']})."]
    parts = "; ".join(f"{k} {v:.1f}" for k, v in list(g["us_per_pair"].items())[:8])
    return [
        f"\nThe GIL under 16 more clients x 20 docs ({_n(g['pairs_per_s'])} pairs/s while py-spy sampled it; bench.gil_budget): held "
        f"{_pct(g['gil_share'])} of the wall, **{_n(g['gil_ms_per_request'], ',.2f')} ms a request**, {_n(g['gil_us_per_pair'], ',.1f')} us a pair: "
        f"one process serves at most **{_n(g['gil_bound_pairs_per_s'])} pairs/s** on this host. By what held it, us a pair: {parts}."
    ]


def qwen3(g: dict, o: dict) -> list[str]:
    if not g and not o:
        return []
    out = ["**f. Qwen3-4B nf4** (same documents both ways, every pair cut to max_length)"]
    out += _budget(g.get("models"))
    out += ["", "| path | pairs/s | process memory | detail |", "|---|---:|---:|---|"]
    if g:
        out.append(f"| gateway, after load | | {describe(g.get('memory_after_load'))} | ready in {_n(g.get('ready_s'))} s |")
        for k, run in enumerate(g.get("requests") or [], 1):
            out.append(
                f"| gateway, request {k} ({run['pairs']} docs) | {_n(run['pairs_per_s'], ',.1f')} | {describe(run.get('memory_after'))} | "
                f"finite scores {run.get('finite_scores')} |"
            )
    s = o.get("score") or {}
    if s:
        out.append(
            f"| official code, batch {s.get('batch')} | {_n(s.get('pairs_per_s'), ',.1f')} | {describe(s.get('process'))} | "
            f"allocated max {_n(s.get('max_allocated_gib'), '.2f')} GiB, reserved max {_n(s.get('max_reserved_gib'), '.2f')} GiB, "
            f"widths {s.get('widths')} |"
        )
    return out


def peers(r: dict, c: dict, plan: dict) -> list[str]:
    systems = r.get("systems") or {}
    if not systems and not r.get("flagreranker_import"):
        return []
    sizes = [str(n) for n in plan["big_docs"]]
    out = [
        "**d. In-process, bge shape** (pairs/s, wall time; the gateway's best over HTTP for comparison)", "",
        "| system | " + " | ".join(f"{int(n):,} docs" for n in sizes) + " |", "|---|" + "---:|" * len(sizes),
    ]
    out.append("| gateway over HTTP (c) | " + " | ".join(_n((_best(c.get(f"big_{n}")) or {}).get("pairs_per_s")) for n in sizes) + " |")
    for name, by in systems.items():
        out.append(f"| {name} | " + " | ".join(_n((by.get(n) or {}).get("pairs_per_s")) for n in sizes) + " |")
    for n in sizes:
        row = _loop_row(r, int(n))
        if row.get("device_real_tokens_per_s") is not None:
            out.append(
                f"\nSorted loop at {int(n):,} docs, device-busy time only: {_n(row['device_real_tokens_per_s'])} real tok/s, "
                f"{_tf(row.get('device_tflops'))} TFLOP/s ({_pct(row.get('device_of_peak'))} of the fp16 matmul)."
            )
    if r.get("flagreranker_import"):
        out.append(f"\nFlagEmbedding did not import: `{r['flagreranker_import'][:200]}`")
    return out


def table(*results: dict) -> list[str]:
    rows = [row for r in results for v in r.values() if isinstance(v, list) for row in v if isinstance(row, dict) and "model" in row]
    if not rows:
        return []
    out = [
        "**b. Memory/speed, engine warm-up batch** (mixed lengths at the budget; rates count real tokens; of peak vs a)", "",
        "| model | precision | pairs x len | real/padded | weights GiB | peak GiB | KiB/real tok | real tok/s | TFLOP/s | of peak | typical batch: tok/s, of peak |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for x in rows:
        t = x.get("typical") or {}
        out.append(
            f"| {x['model']} | {x['precision']} | {x['pairs']} x {x['length']} | {x['real_tokens'] / x['padded_tokens']:.2f} | "
            f"{x['weights_gib']:.2f} | {x['peak_gib']:.2f} | {x['activation_kib_per_real_token']:.1f} | {_n(x['real_tokens_per_s'])} | "
            f"{_tf(x['tflops'])} | {_pct(x['of_peak'])} | {(_n(t.get('real_tokens_per_s')) + ', ' + _pct(t.get('of_peak'))) if t else '-'} |"
        )
    return out


def t4(r: dict, plan: dict) -> list[str]:
    if not r:
        return []
    b, c, ld, oom = r.get("big") or {}, r.get("clients_16") or {}, r.get("long_docs") or {}, r.get("oom") or {}
    out = [f"**e. GTE under a T4-like cap** ({'; '.join(r.get('cap') or ['no cap line in the log'])[:160]})"]
    out += _budget(r.get("models"))
    out.append(
        f"- one request of {plan['t4_docs']:,} docs ({ld.get('count', '?')} long, cut to {ld.get('tokens_after_cut')} tokens): "
        f"{'200' if b.get('status') == 200 else 'FAILED'} in {_ms(b.get('seconds'))} ({_n(b.get('pairs_per_s'))} pairs/s); "
        f"OOM lines in the log: {oom.get('log_lines', '?')}; {', '.join(oom.get('metrics') or []) or 'no OOM metric'}"
    )
    if c:
        out.append(f"- 16 clients x {plan['small_docs']} docs: {_n(c.get('pairs_per_s'))} pairs/s, p50 {_ms(c.get('p50_s'))}, p99 {_ms(c.get('p99_s'))}")
    out.append(f"- process memory: after load {describe(r.get('memory_after_load'))}, after {describe(r.get('memory_after_workloads'))}")
    return out


def parity(r: dict) -> list[str]:
    if not r:
        return []
    s, p = r.get("scores") or {}, r.get("pairs_per_s") or {}
    speed = ", ".join(f"{k} " + " / ".join(_n(v) for v in vs) for k, vs in p.items())
    return [
        f"**g. Padded vs packed (bge shape, {s.get('pairs', '?')} pairs, over HTTP)**: max |diff| {_n(s.get('max_abs_diff'), '.2e')}, "
        f"mean {_n(s.get('mean_abs_diff'), '.2e')} (score std {_n(s.get('score_std'), '.3f')}), Spearman {_n(s.get('spearman'), '.4f')}, "
        f"top-10 overlap {_pct(s.get('top10_overlap'))}; pairs/s {speed}."
    ]


def event_loop(r: dict) -> list[str]:
    e = r.get("event_loop")
    if not e:
        return []
    cpu = e.get("cpu_ms_per_request") or []
    ms = statistics.median(cpu) if cpu else None
    # 16 clients x 20 documents at 0.8 x 8,000 pairs/s: 320 requests a second, each on the one loop thread.
    share = f"; at 320 requests/s that is {_pct(ms * 320 / 1000)} of the loop's thread, under the GIL" if ms else ""
    return [
        f"**h. The event loop ({e.get('docs')}-document requests one at a time, in-process)**: {_n(ms, '.2f')} ms of "
        f"its CPU a request (rounds {', '.join(_n(c, '.2f') for c in cpu)}){share}. Per request: {_n(e.get('python_calls'))} "
        f"Python calls, {_n(e.get('loop_callbacks'), '.1f')} loop callbacks, {_n(e.get('tasks'), '.1f')} tasks."
    ]


def problems(doc: dict) -> list[str]:
    out = []
    for name, s in doc["sections"].items():
        for step, msg in (s.get("errors") or {}).items():
            out.append(f"- {name}/{step}: {str(msg)[:220]}")
        if s.get("note"):
            out.append(f"- {name}: {s['note']}")
        if s["status"] in ("timeout", "error") and not s.get("errors"):
            out.append(f"- {name}: {s['status']}; log: `{(s.get('log_tail') or '')[-200:].strip()}`")
    return ["**Problems**", *out] if out else []


def render(doc: dict) -> str:
    meta, plan = doc["meta"], doc.get("plan", {})
    v = meta.get("versions") or {}
    smoke = " (SMOKE: tiny models on a CPU; proves the script, measures nothing)" if meta["mode"] == "smoke" else ""
    head = [
        f"# GPU check, {meta['date']}{smoke}", "",
        f"GPU {meta['gpu']}; host {meta['cpu']}, {meta['cores']} cores; commit {meta['commit']}; wall {_n(meta.get('wall_s'))} s "
        f"of {meta['budget_s']:.0f}; torch {v.get('torch')}, transformers {v.get('transformers')}, bitsandbytes {v.get('bitsandbytes')}, "
        f"sentence-transformers {v.get('sentence-transformers')}, FlagEmbedding {v.get('FlagEmbedding')}. "
        + ("Tiny models (2 layers)." if smoke else "Random weights at real size (bge shape: 24 x 1024 BERT, MiniLM tokenizer).")
        + " Everything else: the JSON beside this file.", "",
    ]
    blocks = [
        figures(doc), sections_table(doc), ceilings(_res(doc, "ceilings")), http_bge(_res(doc, "http_bge"), plan),
        qwen3(_res(doc, "qwen3_gateway"), _res(doc, "qwen3_official")), peers(_res(doc, "peers"), _res(doc, "http_bge"), plan),
        table(_res(doc, "table_encoders"), _res(doc, "table_qwen3")), t4(_res(doc, "t4_gte"), plan), parity(_res(doc, "parity")),
        event_loop(_res(doc, "event_loop")), problems(doc),
    ]
    text = "\n".join(head) + "\n"
    for block in blocks:
        if block:
            text += "\n".join(block) + "\n\n"
    if len(text) > MAX_CHARS:
        text = text[: MAX_CHARS - 80] + "\n\n... (cut at 10,000 characters; the JSON has everything)"
    return text.rstrip()
