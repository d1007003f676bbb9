"""`keel serve` as users run it: a real server process on loopback, embedded default, real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.servers import free_port

KEEL = str(Path(sys.executable).parent / "keel")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEL_", "OTEL_"))} | {
        "KEEL_DATA_DIR": str(tmp_path / "data"),
        "KEEL_PORT": str(port),
        "KEEL_LOG_JSON": "true",
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
