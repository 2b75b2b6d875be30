"""Which ASGI server enforces connection hygiene? Probes a trivial ASGI app under each candidate server on
loopback and reports what the server does to hostile connections (no model, no gateway: the server alone).

    python -m bench.asgi_server_probe [--servers uvicorn,hypercorn,granian,gateway] [--wait 12]

Each probe: a connection that sends nothing; one that sends its headers a byte a second; one that sends
headers then its body a byte a second; a 100 KiB header; 500 small headers; and a normal request's latency
while 2,000 connections trickle headers. Every server is asked for a 5 s keep-alive / read timeout where it
has one. `gateway` is server.http_server (uvicorn's h11 protocol with our timers and caps).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

APP = textwrap.dedent(
    """
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                m = await receive()
                if m["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"}); return
        more = True
        while more:
            m = await receive(); more = m.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})
    """
)

GATEWAY_RUNNER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from probe_app import app
    from core.config import ServerSettings
    from server.http_server import serve
    serve(app, host="127.0.0.1", port={port}, settings=ServerSettings(header_timeout_s=5, body_timeout_s=5, keep_alive_timeout_s=5, max_connections=4000))
    """
)


def command(server: str, port: int, workdir: Path) -> list[str]:
    py = sys.executable
    if server == "uvicorn":
        return [py, "-m", "uvicorn", "probe_app:app", "--port", str(port), "--timeout-keep-alive", "5", "--log-level", "warning"]
    if server == "hypercorn":
        return [py, "-m", "hypercorn", "probe_app:app", "-b", f"127.0.0.1:{port}", "--keep-alive", "5", "--read-timeout", "5"]
    if server == "granian":
        return [py, "-m", "granian", "--interface", "asgi", "--port", str(port), "--http", "1",
                "--http1-header-read-timeout", "5000", "--http1-keep-alive", "--log-level", "warning", "probe_app:app"]
    if server == "gateway":
        runner = workdir / "gateway_runner.py"
        runner.write_text(GATEWAY_RUNNER.format(repo=str(Path(__file__).resolve().parent.parent), port=port))
        return [py, str(runner)]
    raise ValueError(server)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_after(port: int, chunks: list[bytes], every_s: float, limit_s: float) -> str:
    """Send `chunks` one per `every_s` (then nothing); seconds until the server closes, or '>limit'."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(0.05)
    start = time.monotonic()
    i = 0
    next_send = start
    try:
        while time.monotonic() - start < limit_s:
            if i < len(chunks) and time.monotonic() >= next_send:
                try:
                    s.sendall(chunks[i])
                except OSError:
                    return f"{time.monotonic() - start:.1f}s (reset)"
                i += 1
                next_send += every_s
            try:
                data = s.recv(65536)
                if not data:
                    return f"{time.monotonic() - start:.1f}s"
                return f"{time.monotonic() - start:.1f}s ({data.split(b' ', 2)[1].decode(errors='replace')})"
            except socket.timeout:
                continue
            except OSError:
                return f"{time.monotonic() - start:.1f}s (reset)"
        return f">{limit_s:g}s"
    finally:
        s.close()


def status_of(port: int, raw: bytes) -> str:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(raw)
        data = s.recv(65536)
        return data.split(b" ", 2)[1].decode() if data else "closed"
    except OSError as exc:
        return type(exc).__name__
    finally:
        s.close()


def latency_under_stall(port: int, n: int) -> str:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.setblocking(True)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        time.sleep(0.5)
        start = time.monotonic()
        status = status_of(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return f"{status} in {time.monotonic() - start:.3f}s"
    except OSError as exc:
        return f"{type(exc).__name__} after {len(socks)} connections"
    finally:
        for s in socks:
            s.close()


def probe(server: str, wait_s: float) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "probe_app.py").write_text(APP)
        port = free_port()
        env = {**os.environ, "PYTHONPATH": f"{workdir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.Popen(command(server, port, workdir), cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        return {"error": "did not start"}
                    time.sleep(0.2)
            head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 40 + b"\r\n\r\n"
            post = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
            return {
                "silent connection closed after": closed_after(port, [], 1, wait_s),
                "headers 1 byte/s closed after": closed_after(port, [bytes([b]) for b in head], 1, wait_s),
                "body 1 byte/s closed after": closed_after(port, [post] + [b"x"] * 100, 1, wait_s),
                "100 KiB header": status_of(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 102400 + b"\r\n\r\n"),
                "500 headers": status_of(port, b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n"),
                "normal request with 2,000 stalled": latency_under_stall(port, 2000),
            }
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", default="uvicorn,hypercorn,granian,gateway")
    parser.add_argument("--wait", type=float, default=12.0, help="seconds to wait for a server to close a stalled connection")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    for server in args.servers.split(","):
        print(f"== {server}", flush=True)
        for key, value in probe(server, args.wait).items():
            print(f"  {key}: {value}", flush=True)


if __name__ == "__main__":
    main()
