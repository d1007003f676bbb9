"""The deployment files under docker/: what the Compose schema and hadolint cannot see.

`just lint` validates docker/compose.yaml against the Compose Specification and lints the Dockerfile.
These tests check that the files agree with Keel and with each other: one image for every role, the
replicas and Redis settings production needs, environment variables that Keel really reads (so a typo
cannot silently fall back to a default), and a final image stage that runs as a non-root user with a
working liveness probe and no build tools.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import opentelemetry.sdk.environment_variables as otel_env
import pytest
import yaml

from keel.main import cli, db
from keel.main.health import livez
from keel.main.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"

# Role -> the `keel` subcommand its container runs.
KEEL_ROLES = {"api": "serve", "worker": "worker", "cron": "cron", "migrate": "migrate"}
# Variables of the official postgres image (its documented environment).
POSTGRES_IMAGE_VARS = {
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_DB",
    "POSTGRES_INITDB_ARGS",
    "POSTGRES_INITDB_WALDIR",
    "POSTGRES_HOST_AUTH_METHOD",
}
OTEL_STANDARD_VARS = {v for k, v in vars(otel_env).items() if k.startswith("OTEL_") and isinstance(v, str)}
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# --- readers -------------------------------------------------------------------------------------------


class _RecordingEnv(dict[str, str]):
    """An empty environment that remembers every variable asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)


def keel_setting_names() -> set[str]:
    """The variables ``load_settings`` reads: asked of an empty environment, every lookup happens."""
    env = _RecordingEnv()
    load_settings(env)
    return env.asked


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                out[key] = value
        return out


def dockerfile_stages() -> list[Stage]:
    text = (DOCKER / "Dockerfile").read_text()
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: list[Stage] = []
    for instruction in logical:
        keyword, _, args = instruction.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            base, _, alias = args.partition(" AS ")
            stages.append(Stage(base=base.strip(), name=alias.strip() or None))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def final_stage() -> Stage:
    return dockerfile_stages()[-1]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    result = compose()["services"]
    assert isinstance(result, dict)
    return result


@dataclass(frozen=True)
class EnvExample:
    values: dict[str, str]  # active assignments
    named: set[str]  # every variable named, commented-out examples included
    undocumented: list[str]  # assignments with no comment line right above them


def env_example() -> EnvExample:
    assignment = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
    values: dict[str, str] = {}
    named: set[str] = set()
    undocumented: list[str] = []
    previous = ""
    for raw in (DOCKER / ".env.example").read_text().splitlines():
        line = raw.strip()
        if not line:
            previous = ""
            continue
        if match := assignment.match(line):
            commented, key, value = match.groups()
            named.add(key)
            if not previous.startswith("#") or assignment.match(previous):
                undocumented.append(key)
            if not commented:
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                    value = value[1:-1]
                values[key] = value
        previous = line
    return EnvExample(values, named, undocumented)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation, for the forms this project uses: ``${VAR}``, ``${VAR:-default}`` (nested
    defaults allowed) and ``$$``. Anything else fails the test instead of passing unchecked."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, j = 0, i
            while True:
                if text.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                if text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            name, sep, default = text[i + 2 : j].partition(":-")
            assert NAME.fullmatch(name), f"unsupported interpolation ${{{text[i + 2 : j]}}}"
            out.append((env.get(name) or interpolate(default, env)) if sep else env.get(name, ""))
            i = j + 1
        else:
            assert text[i] != "$" or not NAME.match(text, i + 1), f"use ${{...}} in {text!r}"
            out.append(text[i])
            i += 1
    return "".join(out)


def interpolated_names(value: object) -> set[str]:
    if isinstance(value, str):
        return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", value.replace("$$", "")))
    if isinstance(value, dict):
        return set().union(*(interpolated_names(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(interpolated_names(v) for v in value)) if value else set()
    return set()


def container_env(role: str, dotenv: Mapping[str, str]) -> dict[str, str]:
    """A Keel container's environment as Compose builds it: image ENV < env_file < environment."""
    env = dict(final_stage().env())
    env.update(dotenv)
    for key, value in services()[role]["environment"].items():
        env[key] = interpolate(str(value), dotenv)
    return env


# --- one image, the roles and their wiring ----------------------------------------------------------


def test_every_keel_role_runs_the_one_image_built_from_the_repository_root() -> None:
    svcs = services()
    built = {name for name, svc in svcs.items() if "build" in svc}
    assert built == set(KEEL_ROLES)
    images = {(svcs[r]["image"], json.dumps(svcs[r]["build"], sort_keys=True)) for r in KEEL_ROLES}
    assert len(images) == 1, images
    (image, build), *_ = images
    assert json.loads(build) == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert (DOCKER / "..").resolve() == REPO
    others = {name for name, svc in svcs.items() if name not in KEEL_ROLES and svc.get("image") == image}
    assert not others


def test_each_role_runs_its_keel_subcommand(monkeypatch: pytest.MonkeyPatch) -> None:
    assert final_stage().all("ENTRYPOINT") == ['["keel"]']
    called: list[str] = []
    for subcommand in set(KEEL_ROLES.values()):
        monkeypatch.setattr(cli, f"_{subcommand}", lambda _args, s=subcommand: called.append(s) or 0)
    for role, subcommand in KEEL_ROLES.items():
        command = services()[role]["command"]
        assert command[0] == subcommand, role
        # Parsed by Keel's own CLI: an unknown option or a bad value would exit 2 here.
        assert cli.main(command) == 0
        assert called[-1] == subcommand


def test_api_and_workers_are_replicated_and_cron_is_single() -> None:
    svcs = services()
    assert svcs["api"]["deploy"]["replicas"] >= 2
    assert svcs["worker"]["deploy"]["replicas"] >= 2
    assert svcs["cron"]["deploy"]["replicas"] == 1


def test_start_order_migrations_first_then_the_roles_that_need_the_schema() -> None:
    svcs = services()
    assert svcs["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for role in ("api", "worker", "cron"):
        deps = svcs[role]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", role
        assert deps["redis"]["condition"] == "service_healthy", role
    assert svcs["proxy"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert "healthcheck" in svcs["postgres"]
    assert "healthcheck" in svcs["redis"]
    for role in ("migrate", "worker", "cron"):  # they serve no /livez, so the image's probe must be off
        assert svcs[role]["healthcheck"] == {"disable": True}, role


def test_redis_never_evicts_and_persists_queued_jobs() -> None:
    command = services()["redis"]["command"]
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--appendonly"] == "yes"
    assert any(v.endswith(":/data") for v in services()["redis"]["volumes"])


def test_api_and_worker_share_one_volume_on_the_data_dir() -> None:
    data_dir = final_stage().env()["KEEL_DATA_DIR"]
    mounts = {}
    for role in ("api", "worker"):
        [mount] = [v for v in services()[role]["volumes"] if v.split(":")[1] == data_dir]
        mounts[role] = mount.split(":")[0]
    assert mounts["api"] == mounts["worker"]
    assert mounts["api"] in compose()["volumes"]  # a named volume, not a host path


def test_the_proxy_balances_over_every_api_replica() -> None:
    conf = (DOCKER / "nginx.conf").read_text()
    proxy = services()["proxy"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    port = final_stage().env()["KEEL_PORT"]
    # Re-resolved through Docker's DNS, which answers with one address per replica.
    assert re.search(rf"^\s*server api:{port} resolve;", conf, re.M)
    assert re.search(r"^\s*resolver 127\.0\.0\.11 ", conf, re.M)
    [listen] = re.findall(r"^\s*listen (\d+);", conf, re.M)
    [published] = proxy["ports"]
    assert published.split(":")[-1] == listen
    assert "ports" not in services()["api"]  # only the proxy is published


# --- environment --------------------------------------------------------------------------------------


def test_every_variable_in_env_example_is_documented_and_read_by_keel_or_a_standard_one() -> None:
    example = env_example()
    assert not example.undocumented, f"no comment line above: {example.undocumented}"
    keel = keel_setting_names()
    unknown = {
        name
        for name in example.named
        if name not in keel
        and not (name.startswith("OTEL_") and name in OTEL_STANDARD_VARS)
        and not (name.startswith("POSTGRES_") and name in POSTGRES_IMAGE_VARS)
    }
    assert not unknown, f"read by nothing: {sorted(unknown)}"
    assert {n for n in example.named if n.startswith("POSTGRES_")} <= interpolated_names(compose())


def test_every_variable_compose_interpolates_is_in_env_example() -> None:
    assert interpolated_names(compose()) <= env_example().named


def test_keel_containers_set_only_variables_keel_reads() -> None:
    keel = keel_setting_names()
    for role in KEEL_ROLES:
        names = set(services()[role]["environment"])
        assert names <= keel | OTEL_STANDARD_VARS, (role, names - keel - OTEL_STANDARD_VARS)
    image_keel_vars = {k for k in final_stage().env() if k.startswith("KEEL_")}
    assert image_keel_vars <= keel | {"KEEL_MIGRATIONS_DIR"}


@pytest.mark.parametrize("dotenv", ["none", "example"])
def test_each_role_gets_valid_production_settings(dotenv: str) -> None:
    values = env_example().values if dotenv == "example" else {}
    names = set()
    for role in KEEL_ROLES:
        env = container_env(role, values)
        settings = load_settings(env)  # raises SettingsError on any bad value
        assert settings.database_url.startswith("postgresql+asyncpg://"), role
        assert "@postgres:5432/" in settings.database_url
        assert settings.redis_url == "redis://redis:6379/0"
        assert settings.host == "0.0.0.0"
        assert settings.data_dir == Path("/var/lib/keel")
        assert settings.log_json is True
        assert not settings.should_migrate_on_start  # only the migrate role changes the schema
        assert settings.otel_endpoint == "http://otel-collector:4318"
        names.add(settings.service_name)
    assert len(names) == len(KEEL_ROLES)  # every role tells its spans apart


def test_the_database_url_follows_the_postgres_service_credentials() -> None:
    values = {"POSTGRES_USER": "u1", "POSTGRES_PASSWORD": "p1", "POSTGRES_DB": "d1"}
    env = container_env("api", values)
    assert load_settings(env).database_url == "postgresql+asyncpg://u1:p1@postgres:5432/d1"
    pg_env = {k: interpolate(str(v), values) for k, v in services()["postgres"]["environment"].items()}
    assert pg_env == {"POSTGRES_USER": "u1", "POSTGRES_PASSWORD": "p1", "POSTGRES_DB": "d1"}


def test_a_hosted_tracing_backend_replaces_the_bundled_collector() -> None:
    values = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otlp.example.com", "OTEL_EXPORTER_OTLP_HEADERS": "x-k=v"}
    env = container_env("worker", values)
    assert load_settings(env).otel_endpoint == "https://otlp.example.com"
    assert env["OTEL_EXPORTER_OTLP_HEADERS"] == "x-k=v"


def test_the_collector_receives_on_the_endpoint_keel_uses_and_exports_to_jaeger() -> None:
    config = yaml.safe_load((DOCKER / "otel-collector.yaml").read_text())
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"] == "0.0.0.0:4318"
    assert "grpc" in config["receivers"]["otlp"]["protocols"]
    [pipeline] = config["service"]["pipelines"].values()
    assert pipeline["receivers"] == ["otlp"]
    assert "batch" in pipeline["processors"]
    [exporter] = pipeline["exporters"]
    assert config["exporters"][exporter]["endpoint"].split(":")[0] == "jaeger"
    assert "jaeger" in services()
    assert services()["jaeger"]["ports"] == ["16686:16686"]


# --- the image ----------------------------------------------------------------------------------------


def test_final_stage_runs_as_a_non_root_user() -> None:
    [user] = final_stage().all("USER")
    assert user.split(":")[0] not in {"root", "0"}


def test_final_stage_has_no_build_tools() -> None:
    stages = dockerfile_stages()
    final = stages[-1]
    assert final.base == stages[0].base  # the venv's interpreter is a symlink into the base image
    build_tools = re.compile(r"\b(apt-get|apt|apk|pip|uv|gcc|g\+\+|make|build-essential)\b")
    for run in final.all("RUN"):
        assert not build_tools.search(run), run
    copied = [args.split()[1:] for args in final.all("COPY") if args.startswith("--from=")]
    assert copied == [["/opt/keel/venv", "/opt/keel/venv"]]


def test_final_stage_points_keel_at_the_migrations_it_ships(monkeypatch: pytest.MonkeyPatch) -> None:
    final = final_stage()
    [destination] = [args.split()[-1] for args in final.all("COPY") if args.split()[0] == "migrations"]
    target = final.env()["KEEL_MIGRATIONS_DIR"]
    assert target == destination
    monkeypatch.setenv("KEEL_MIGRATIONS_DIR", target)
    assert db.migrations_dir() == Path(target)


def test_the_build_context_admits_exactly_what_the_dockerfile_copies() -> None:
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert lines[0] == "*"
    admitted = {line[1:].strip("/") for line in lines if line.startswith("!")}
    sources = set()
    for stage in dockerfile_stages():
        for args in stage.all("COPY"):
            if not args.startswith("--from="):
                sources.update(p.strip("/").removeprefix("./") for p in args.split()[:-1])
    assert sources == admitted
    assert all((REPO / s).exists() for s in sources)


class _Probe(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/livez" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def probe_server() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _Probe)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_healthcheck_probes_livez_with_python_alone(probe_server: HTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    [healthcheck] = final_stage().all("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert "--interval=" in options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    assert "/livez" in argv[2]
    assert "/livez" in livez.paths  # a route Keel serves, touching no dependency
    port = str(probe_server.server_address[1])

    def run() -> int:
        env = {"KEEL_PORT": port, "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30).returncode

    assert run() == 0
    monkeypatch.setattr(_Probe, "status", 503)
    assert run() != 0
    probe_server.shutdown()
    probe_server.server_close()
    assert run() != 0  # nothing listening
