"""Structured JSON logs with a request id, over real HTTP against `rerank-gateway serve --log-format json`,
and the registry following its files (`serve --watch-registry`, `rerank-gateway registry-sync`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from tests.conftest import MINILM, REPO, serve_process
from tenancy.auth import key_sha256

KEY, NEW_KEY = "rg-test-key-one", "rg-test-key-two"


def _registry(tenants: dict) -> dict:
    return {
        "default_model": "minilm",
        "models": {"minilm": {"backend": "embedding", "source": MINILM, "max_length": 64, "cpu_streams": 1, "runtime": "torch"}},
        "usage": {"path": None},
        "tenants": tenants,
    }


def _rerank(url: str, key: str, **headers: str | bytes) -> httpx.Response:
    body = {"query": "what is a cat", "documents": ["a cat is an animal", "paris is in france"]}
    return httpx.post(f"{url}/v1/rerank", json=body, headers={"Authorization": f"Bearer {key}", **headers}, timeout=60)


def _wait(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_request_id_end_to_end_in_json_logs_and_registry_file_watch(tmp_path):
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(_registry({"acme": {"api_key_sha256": key_sha256(KEY)}})))
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log, serve_process(path, log=log, extra_args=("--log-format", "json", "--watch-registry", "0.2")) as (url, _):
        given = _rerank(url, KEY, **{"X-Request-Id": "trace-abc.123"})
        assert given.status_code == 200 and given.headers["x-request-id"] == "trace-abc.123"
        fresh = [_rerank(url, KEY).headers["x-request-id"] for _ in range(2)]
        assert all(re.fullmatch(r"[0-9a-f]{32}", r) for r in fresh) and fresh[0] != fresh[1]
        # An id that could forge log lines or headers (spaces, too long) is replaced, not echoed.
        for hostile in ("a b", "x" * 200, "id\u00e9".encode("utf-8")):
            got = _rerank(url, KEY, **{"X-Request-Id": hostile}).headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", got)
        # Refused requests carry it too.
        denied = _rerank(url, "wrong-key", **{"X-Request-Id": "denied-1"})
        assert denied.status_code == 401 and denied.headers["x-request-id"] == "denied-1"

        # The registry file changes: the watcher reloads it without a restart (the new key works, the old one not).
        assert _rerank(url, NEW_KEY).status_code == 401
        path.write_text(yaml.safe_dump(_registry({"acme": {"api_key_sha256": key_sha256(NEW_KEY)}})))
        assert _wait(lambda: _rerank(url, NEW_KEY).status_code == 200)
        assert _rerank(url, KEY).status_code == 401
        # An invalid file is refused; the running configuration stays.
        path.write_text("default_model: nope\nmodels: {}\n")
        assert _wait(lambda: "reload refused" in log_path.read_text())
        assert _rerank(url, NEW_KEY).status_code == 200

    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]  # every line is JSON
    access = {r["request_id"]: r for r in lines if r["logger"] == "rerank_gateway.access"}
    ok = access["trace-abc.123"]
    assert (ok["status"], ok["path"], ok["method"], ok["tenant"], ok["model"]) == (200, "/v1/rerank", "POST", "acme", "minilm")
    assert ok["duration_ms"] > 0 and ok["level"] == "info" and ok["ts"].endswith("+00:00")
    assert access["denied-1"]["status"] == 401 and access["denied-1"]["tenant"] is None
    assert all(r not in access or access[r]["status"] == 200 for r in fresh)
    assert any("changed; reloading" in r["message"] for r in lines)
    assert any(r["level"] == "error" and "reload refused" in r["message"] for r in lines)


def _swap(path, data: dict) -> None:
    """Replace a file as the kubelet replaces a mounted Secret: whole, never half-written."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(yaml.safe_dump(data))
    os.replace(tmp, path)


def _sync(*args: str, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ops.cli", "registry-sync", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_registry_sync_lays_secret_fragments_over_the_configmap(tmp_path):
    base, secret, out = tmp_path / "registry.yaml", tmp_path / "tenants.yaml", tmp_path / "run" / "registry.yaml"
    base.write_text(yaml.safe_dump({**_registry({}), "server": {"request_timeout_s": 30}}))
    secret.write_text(yaml.safe_dump({"tenants": {"acme": {"api_key_sha256": key_sha256(KEY)}}}))
    done = _sync("--base", str(base), "--overlay", str(secret), "--out", str(out))
    assert done.returncode == 0, done.stderr
    merged = yaml.safe_load(out.read_text())
    assert merged["tenants"]["acme"]["api_key_sha256"] == key_sha256(KEY) and merged["server"]["request_timeout_s"] == 30

    # A fragment that makes the registry invalid: refused, exit 2, the last good file kept.
    secret.write_text(yaml.safe_dump({"tenants": {"acme": {"api_key_sha256": "not-a-hash"}}}))
    bad = _sync("--base", str(base), "--overlay", str(secret), "--out", str(out))
    assert bad.returncode == 2 and "not a lowercase hex sha256" in bad.stderr
    assert yaml.safe_load(out.read_text()) == merged

    # An empty fragment (a Secret caught empty) is refused too: it must not drop every tenant.
    secret.write_text("")
    empty = _sync("--base", str(base), "--overlay", str(secret), "--out", str(out))
    assert empty.returncode == 2 and "non-empty mapping" in empty.stderr
    assert yaml.safe_load(out.read_text()) == merged

    # As a sidecar (--watch): a rotated key lands in the served file.
    _swap(secret, {"tenants": {"acme": {"api_key_sha256": [key_sha256(KEY), key_sha256(NEW_KEY)]}}})
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "registry-sync", "--base", str(base), "--overlay", str(secret), "--out", str(out), "--watch", "0.1"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait(lambda: isinstance(yaml.safe_load(out.read_text())["tenants"]["acme"]["api_key_sha256"], list))
        _swap(secret, {"tenants": {"acme": {"api_key_sha256": key_sha256(NEW_KEY)}}})
        assert _wait(lambda: yaml.safe_load(out.read_text())["tenants"]["acme"]["api_key_sha256"] == key_sha256(NEW_KEY))
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
