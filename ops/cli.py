"""`rerank-gateway`: serve, check, plan, tune, keys."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Before torch is imported (OpenMP reads it once): idle intra-op threads sleep instead of spinning. A CPU
# stream's spinning helpers took the cores the event loop and the tokenizer needed, so a search beside bulk
# batches waited longer for both. Measured in docs/tenancy.md, "Fair scheduling". An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from core.config import RegistryError, detect_gpu_type, load_registry
from core.host import cuda_device_name

DEFAULT_REGISTRY = Path(__file__).resolve().parent.parent / "registry.yaml"


def _registry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default=str(DEFAULT_REGISTRY), help="registry YAML (default: %(default)s)")


def _load(path: str):
    try:
        return load_registry(path)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from observability import logs
    from server import http_server
    from gateway.app import create_app
    from server.lifecycle import Lifecycle

    registry = _load(args.registry)
    # SIGHUP re-reads the registry file (as does POST /admin/reload).
    # SIGTERM drains (bounded by server.drain_timeout_s) and exits 0; see server/http_server.py.
    lifecycle = Lifecycle()
    app = create_app(registry, registry_path=args.registry, reload_on_sighup=True, lifecycle=lifecycle)
    log_options = logs.configure(args.log_format)  # after create_app, which sets up Litestar's logging
    if args.host not in ("127.0.0.1", "localhost", "::1") and not registry.tenants:
        logging.getLogger("rerank_gateway").warning(
            "serving on %s with no tenants configured: anyone who can reach this address can use it", args.host
        )
    if args.watch_registry:
        from serving import registry_watch

        registry_watch.install(app, args.registry, args.watch_registry)
    http_server.serve(app, host=args.host, port=args.port, settings=registry.server, lifecycle=lifecycle, **log_options)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    registry = _load(args.registry)
    print(f"ok: {args.registry}: {len(registry.models)} models, default {registry.default_model!r}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from ops.plan import plan, render

    registry = _load(args.registry)
    if args.rps is not None:
        return _plan_capacity(registry, args)
    device_name = cuda_device_name()
    gpu_type = args.gpu or detect_gpu_type(registry, device_name)
    if args.gpu and args.gpu != "cpu" and args.gpu not in registry.gpu_types:
        print(f"error: --gpu {args.gpu!r}: not 'cpu' and not one of {', '.join(registry.gpu_types)}", file=sys.stderr)
        return 2
    print(f"device: {device_name or 'no GPU'} -> profile key {gpu_type!r}")
    card = plan(registry, gpu_type)
    print(render(card))
    return 0 if card.ok else 1


def _plan_capacity(registry, args: argparse.Namespace) -> int:
    from core.config import name_index
    from ops import capacity

    if args.docs is None or args.doc_tokens is None:
        print("error: --rps needs --docs and --doc-tokens", file=sys.stderr)
        return 2
    if args.rps <= 0 or args.docs < 1 or args.doc_tokens < 1 or not 0 < args.target_utilization <= 1:
        print("error: --rps must be > 0, --docs and --doc-tokens >= 1, --target-utilization in (0, 1]", file=sys.stderr)
        return 2
    names = name_index(registry)
    if args.model and args.model not in names:
        print(f"error: --model {args.model!r}: not a model id or alias", file=sys.stderr)
        return 2
    demand = capacity.Demand(args.rps, args.docs, args.doc_tokens, args.query_tokens, args.target_utilization)
    sizes = capacity.plan_capacity(registry, demand, [names[args.model]] if args.model else None)
    print(capacity.render(registry, demand, sizes))
    return 0 if any(s.measured for s in sizes) else 1


def cmd_registry_sync(args: argparse.Namespace) -> int:
    from ops import registry_sync

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return registry_sync.sync(Path(args.base), [Path(p) for p in args.overlay], Path(args.out), watch_s=args.watch)


def cmd_tune(args: argparse.Namespace) -> int:
    from core.config import name_index
    from ops.tune import profile_yaml, tune

    registry = _load(args.registry)
    model_id = name_index(registry).get(args.model)
    if model_id is None:
        print(f"error: {args.model!r} is not a model id or alias in {args.registry}", file=sys.stderr)
        return 2
    if registry.models[model_id].backend == "remote":
        print(f"error: {args.model!r} is answered by a remote upstream: there is nothing to tune here", file=sys.stderr)
        return 2
    gpu_type = args.gpu or detect_gpu_type(registry, cuda_device_name())
    budgets = tuple(int(b) for b in args.budgets.split(","))
    result = tune(registry, model_id, gpu_type, budgets=budgets, pairs=args.pairs, rounds=args.rounds,
                  log=lambda line: print(line, file=sys.stderr, flush=True))
    print(profile_yaml(result), end="")
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    import secrets

    from tenancy.auth import key_sha256

    key = "rg-" + secrets.token_urlsafe(32)
    digest = key_sha256(key)
    who = "the admin endpoints" if args.admin else f"tenant {args.tenant!r}"
    print(f"# API key for {who}; shown only this once, store it now:")
    print(key)
    print("# Paste into the registry (the gateway keeps only the hash):")
    if args.admin:
        print(f"admin_api_key_sha256: {digest}")
    else:
        print("tenants:")
        print(f"  {args.tenant}:")
        print(f"    api_key_sha256: {digest}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as `main` reads it; an error exits 2 with argparse's message (tests/test_readme.py
    holds every `rerank-gateway` command of the README to it)."""
    parser = argparse.ArgumentParser(prog="rerank-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP gateway")
    _registry_arg(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--log-format", choices=["text", "json"], default="text", help="json: one object per line, with the request id")
    serve.add_argument("--watch-registry", type=float, metavar="SECONDS", help="poll the registry file and reload it when it changes")
    serve.set_defaults(func=cmd_serve)
    sync = sub.add_parser("registry-sync", help="write a registry merged from a base file and overlays (Kubernetes: ConfigMap + Secret)")
    sync.add_argument("--base", required=True, help="the registry (e.g. a mounted ConfigMap)")
    sync.add_argument("--overlay", action="append", default=[], help="YAML laid over it (e.g. tenant key hashes from a Secret); repeatable")
    sync.add_argument("--out", required=True, help="where the gateway reads its registry")
    sync.add_argument("--watch", type=float, metavar="SECONDS", help="keep running, rewriting on change (a sidecar)")
    sync.set_defaults(func=cmd_registry_sync)
    check = sub.add_parser("check", help="validate a registry; exit non-zero on errors")
    _registry_arg(check)
    check.set_defaults(func=cmd_check)
    plan = sub.add_parser(
        "plan", help="each model's profile and memory (weights + one full batch) on the detected or named GPU type"
    )
    _registry_arg(plan)
    plan.add_argument("--gpu", help="plan for this GPU type key (or 'cpu') instead of the detected one; exit 1 if it does not fit")
    # Capacity (ops.capacity): with --rps, workers per GPU type (or CPU cores) from measured profiles.
    plan.add_argument("--rps", type=float, help="capacity mode: requests per second to serve")
    plan.add_argument("--docs", type=int, help="documents per request")
    plan.add_argument("--doc-tokens", type=int, help="tokens per document")
    plan.add_argument("--query-tokens", type=int, default=32, help="tokens per query (default: %(default)s)")
    plan.add_argument("--target-utilization", type=float, default=0.7, help="share of measured throughput to plan for (default: %(default)s)")
    plan.add_argument("--model", help="only this model (id or alias)")
    plan.set_defaults(func=cmd_plan)
    tune = sub.add_parser("tune", help="measure pairs/s and peak memory across token budgets here; print the profile to paste")
    _registry_arg(tune)
    tune.add_argument("model", help="model id or alias in the registry")
    tune.add_argument("--budgets", default="512,1024,2048,4096,8192,16384", help="max_batch_tokens to try (default %(default)s)")
    tune.add_argument("--pairs", type=int, default=400, help="mixed-length pairs per round (default %(default)s)")
    tune.add_argument("--rounds", type=int, default=2, help="rounds per budget, best kept (default %(default)s)")
    tune.add_argument("--gpu", help="the profile key to tune for (default: the detected one)")
    tune.set_defaults(func=cmd_tune)
    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    new = keys.add_parser("new", help="print a fresh random key and the api_key_sha256 line for the registry")
    new.add_argument("tenant", nargs="?", help="the tenant the key is for")
    new.add_argument("--admin", action="store_true", help="a key for the admin endpoints (admin_api_key_sha256)")
    new.set_defaults(func=cmd_keys_new)
    args = parser.parse_args(argv)
    if args.command == "keys" and not args.admin and not args.tenant:
        parser.error("keys new: name a tenant, or pass --admin")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
