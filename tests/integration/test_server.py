"""`keel serve` as users run it: a real server process on loopback, embedded default, real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.support.servers import free_port

KEEL = str(Path(sys.executable).parent / "keel")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with serve(tmp_path) as running:
        yield running


@contextmanager
def serve(tmp_path: Path, **settings: str) -> Iterator[tuple[str, Path]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEL_", "OTEL_"))} | {
        "KEEL_DATA_DIR": str(tmp_path / "data"),
        "KEEL_PORT": str(port),
        "KEEL_LOG_JSON": "true",
        **settings,
    }
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([KEEL, "serve"], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/livez", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + log.read_text())
            time.sleep(0.1)
        yield base, log
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_embedded_default_serves_signup_create_read(server: tuple[str, Path], tmp_path: Path) -> None:
    base, log = server
    with httpx.Client(base_url=base, timeout=10) as http:
        r = http.post("/v1/signup", json={"organization": "Acme", "owner_email": "o@acme.test", "owner_name": "O"})
        assert r.status_code == 201, r.text
        token = r.json()["api_key"]["token"]
        auth = {"Authorization": f"Bearer {token}"}
        r = http.post("/v1/users", json={"email": "ada@acme.test", "name": "Ada"}, headers=auth)
        assert r.status_code == 201, r.text
        user = r.json()
        r = http.get(f"/v1/users/{user['id']}", headers={**auth, "X-Request-ID": "from-curl-1"})
        assert r.status_code == 200
        assert r.json()["email"] == "ada@acme.test"
        assert r.headers["x-request-id"] == "from-curl-1"

        assert http.get("/healthz").json()["status"] == "pass"
        docs = http.get("/docs")
        assert docs.status_code == 200
        assert "text/html" in docs.headers["content-type"]
        spec = http.get("/openapi.json").json()
        assert spec["openapi"].startswith("3.1")

    # The embedded default created its SQLite file under the data dir, migrations applied.
    assert (tmp_path / "data" / "keel.db").exists()
    time.sleep(0.2)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    served = [line for line in lines if line.get("request_id") == "from-curl-1"]
    assert served
    assert served[0]["msg"] == "request served"
    assert token not in log.read_text()


def _signup(http: httpx.Client, n: int, forwarded_for: str) -> int:
    body = {"organization": f"Org {n}", "owner_email": f"o{n}@org.test", "owner_name": "O"}
    return http.post("/v1/signup", json=body, headers={"X-Forwarded-For": forwarded_for}).status_code


@pytest.mark.parametrize("trusted", [True, False])
def test_the_client_address_comes_from_x_forwarded_for_only_behind_a_trusted_proxy(
    tmp_path: Path, trusted: bool
) -> None:
    settings = {"KEEL_SIGNUP_RATE_LIMIT_PER_HOUR": "1"}
    if trusted:
        settings["KEEL_TRUSTED_PROXIES"] = "127.0.0.1/32, ::1"
    with serve(tmp_path, **settings) as (base, _), httpx.Client(base_url=base, timeout=10) as http:
        # Two clients behind the balancer, one signup each: distinct limits only when the proxy is trusted.
        assert _signup(http, 1, "203.0.113.7") == 201
        assert _signup(http, 2, "198.51.100.9") == (201 if trusted else 429)
        # A client cannot escape its limit by prepending a forged address: the nearest untrusted hop counts.
        assert _signup(http, 3, "192.0.2.1, 203.0.113.7") == 429
