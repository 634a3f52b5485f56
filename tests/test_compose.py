"""The compose stack (docker-compose.yml, .env.example) and the configuration it mounts.

No Docker engine runs here, so the file is checked the way its users would trip over it:
against the compose specification's schema with check-jsonschema, and by cross-checks
between the compose file and the repository (mounted paths, documented variables, real
settings, the nginx/api/Prometheus addresses agreeing). Grafana and the OpenTelemetry
collector cannot run here either: their files get structural checks, and the dashboard
queries are parsed by promtool in test_prometheus_config.py.
"""

import ast
import ipaddress
import os
import py_compile
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from app.main import create_app
from app.settings import Settings
from deploy.stack.nginx import render, template_values
from deploy.stack.process import accepts_tcp, free_port, require_binary, wait_for
from tests.container import Podman, base_image, ulimit_options
from tests.edge import FakeDns, echo_api

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
VENV_BIN = str(Path(sys.executable).parent)
GRAFANA = ROOT / "monitoring" / "grafana"
OTEL_CONFIG = ROOT / "monitoring" / "otel-collector" / "config.yml"
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"

# `${NAME}`, `${NAME:-default}`, `${NAME:?error}`; `$$` is an escaped dollar.
INTERPOLATION = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?")
SECRETS = {"APP_SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
# Services started by a plain `docker compose up` (no profile).
DEFAULT_SERVICES = {
    "api",
    "migrate",
    "postgres",
    "redis",
    "nginx",
    "prometheus",
    "grafana",
    "nginx-exporter",
    "postgres-exporter",
    "redis-exporter",
}
PROFILES = {
    "otel-collector": "tracing",
    "jaeger": "tracing",
    "locust-master": "loadtest",
    "locust-worker": "loadtest",
}


def load_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def env_example() -> dict[str, str | None]:
    """Every variable .env.example mentions: its value when set, None when only shown
    commented out (documented, with the default in the comment)."""
    found: dict[str, str | None] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if match := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            found[match[1]] = match[2]
        elif match := re.fullmatch(r"#([A-Z][A-Z0-9_]*)=(.*)", line):
            found.setdefault(match[1], None)
    return found


def commented_value(name: str) -> str:
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.startswith(f"#{name}="):
            return line.split("=", 1)[1]
    raise AssertionError(f"{name} is not shown in .env.example")


def default_of(value: str) -> str | None:
    """The default of a `${NAME:-default}` value, None for anything else."""
    match = re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-(.*)\}", value)
    return None if match is None else match[1]


def bind_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(source relative to the repository, target) of each bind mount from the repository."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            yield source[2:], target


def published(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host address or "", host port, container port) of each published port."""
    result = []
    for port in service.get("ports", []):
        match = re.fullmatch(
            r"(?:(?P<address>[0-9.]+):)?(?P<host>\$\{[^}]+\}|\d+):(?P<container>\d+)", str(port)
        )
        assert match is not None, f"unexpected port syntax: {port}"
        result.append((match["address"] or "", match["host"], match["container"]))
    return result


# --- the compose specification ------------------------------------------------------------


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    binary = require_binary(
        "check-jsonschema", why="compose-spec validation (dev extra)", extra_dirs=[VENV_BIN]
    )
    return subprocess.run(
        [binary, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    result = check_jsonschema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_validation_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    # A typo a user could make: the validator must catch it, or the test above means nothing.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE_FILE.read_text(encoding="utf-8").replace(
            "stop_grace_period: 45s", "stop_grace_periode: 45s"
        ),
        encoding="utf-8",
    )
    assert "stop_grace_periode" in broken.read_text(encoding="utf-8")
    result = check_jsonschema(broken)
    assert result.returncode != 0
    assert "stop_grace_periode" in result.stdout + result.stderr


# --- the repository and the environment ---------------------------------------------------


def test_services_and_profiles(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == DEFAULT_SERVICES | set(PROFILES)
    for name, service in services.items():
        assert service.get("profiles", []) == ([PROFILES[name]] if name in PROFILES else [])


def test_mounted_repository_files_exist(services: dict[str, dict[str, Any]]) -> None:
    mounts = [
        (name, source)
        for name, service in services.items()
        for source, _ in bind_mounts(service)
        if not source.startswith("nginx/")
    ]
    assert len(mounts) >= 5, mounts  # prometheus, grafana (2), otel, locust
    missing = [(name, source) for name, source in mounts if not (ROOT / source).exists()]
    assert not missing


def test_nginx_mounts_exist_and_the_limits_script_runs_before_the_templates(
    services: dict[str, dict[str, Any]],
) -> None:
    mounts = dict(bind_mounts(services["nginx"]))
    assert set(mounts) == {"nginx/templates", "nginx/entrypoint.d/19-app-limits.envsh"}
    for source in mounts:
        assert (ROOT / source).exists(), source
    # The image's entrypoint sources *.envsh files in name order and skips those that are
    # not executable; 20-envsubst-on-templates.sh renders the templates.
    script = ROOT / "nginx" / "entrypoint.d" / "19-app-limits.envsh"
    assert os.access(script, os.X_OK), f"{script.name} must be executable (git mode 100755)"
    target = mounts["nginx/entrypoint.d/19-app-limits.envsh"]
    assert target.startswith("/docker-entrypoint.d/")
    assert Path(target).name < "20-envsubst-on-templates.sh"


def test_every_interpolated_variable_is_documented_in_env_example() -> None:
    used = {m["name"] for m in INTERPOLATION.finditer(COMPOSE_FILE.read_text(encoding="utf-8"))}
    documented = set(env_example())
    assert used >= SECRETS
    assert used - documented == set(), "used in docker-compose.yml, missing in .env.example"
    assert documented - used == set(), "in .env.example, but docker-compose.yml ignores it"


def test_env_example_defaults_match_the_compose_defaults() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    defaults: dict[str, set[str]] = {}
    for match in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}", text):
        defaults.setdefault(match[1], set()).add(match[2])
    for name, values in defaults.items():
        assert len(values) == 1, f"{name} has different defaults: {values}"
        if name == "OTEL_EXPORTER_OTLP_ENDPOINT":
            continue  # empty (off) by default; the example shows the value to turn it on
        assert commented_value(name) == values.pop(), name


def test_secrets_are_required_and_never_given_a_value() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    for match in INTERPOLATION.finditer(text):
        if match["name"] in SECRETS:
            assert match["op"] == ":?", f"{match['name']} must be ${{{match['name']}:?…}}"
    example = env_example()
    for name in SECRETS:
        # Present and empty: `:?` refuses an empty value just as an unset one.
        assert example[name] == "", f"{name} must be left empty in .env.example"
    for name, value in example.items():
        if re.search(r"SECRET|PASSWORD|TOKEN|KEY", name):
            assert not value, f".env.example gives {name} a value"


def test_api_environment_is_made_of_real_settings(services: dict[str, dict[str, Any]]) -> None:
    environment: dict[str, str] = services["api"]["environment"]
    gunicorn_conf = (ROOT / "deploy" / "gunicorn.conf.py").read_text(encoding="utf-8")
    fields = Settings.model_fields
    for name in environment:
        if name.startswith("APP_"):
            field = name.removeprefix("APP_").lower()
            assert field in fields, f"{name} is not a setting of app.settings.Settings"
            assert fields[field].validation_alias is None, name
        elif name.startswith("GUNICORN_"):
            assert f'"{name}"' in gunicorn_conf, f"deploy/gunicorn.conf.py does not read {name}"
        else:
            assert name in {"WEB_CONCURRENCY", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"}
    assert services["migrate"]["environment"] == environment


def test_the_limits_a_load_test_raises_reach_the_api(services: dict[str, dict[str, Any]]) -> None:
    """The locustfile and README tell users to raise these in .env for a load test; the
    compose file passes settings through one by one (no env_file), so one it leaves out
    keeps its default however .env sets it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    load_tests = readme.split("### Load tests", 1)[1].split("\n## ", 1)[0]
    told = set(re.findall(r"APP_RATE_LIMIT_[A-Z_]+", LOCUSTFILE.read_text(encoding="utf-8")))
    told |= set(re.findall(r"APP_RATE_LIMIT_[A-Z_]+", load_tests))
    assert told >= {"APP_RATE_LIMIT_UPLOADS", "APP_RATE_LIMIT_CHAT_MESSAGES"}
    assert told - set(services["api"]["environment"]) == set()


def test_api_environment_defaults_are_the_settings_defaults(
    services: dict[str, dict[str, Any]],
) -> None:
    checked = 0
    for name, value in services["api"]["environment"].items():
        default = default_of(str(value))
        if not name.startswith("APP_") or default is None:
            continue
        field = name.removeprefix("APP_").lower()
        parsed = Settings(_env_file=None, **{field: default})  # type: ignore[call-arg]
        assert getattr(parsed, field) == Settings.model_fields[field].default, name
        checked += 1
    assert checked >= 8


def test_production_settings_accept_the_compose_environment(
    services: dict[str, dict[str, Any]],
) -> None:
    # What the api container gets, with the secrets filled in as .env.example says.
    values = {"APP_SECRET_KEY": "kM9v-Qz2xT7rL0pWn5sB8yHc3dFj6gAe"}
    values |= {"POSTGRES_PASSWORD": "pg-password", "REDIS_PASSWORD": "redis-password"}

    def resolve(value: str) -> str:
        def one(match: re.Match[str]) -> str:
            name, rest = match[1], match[2] or ""
            if name in values:
                return values[name]
            return rest[2:] if rest.startswith(":-") else ""

        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:[-?][^}]*)?\}", one, value)

    environment = {k: resolve(str(v)) for k, v in services["api"]["environment"].items()}
    assert environment["APP_DATABASE_URL"].startswith("postgresql+asyncpg://app:pg-password@")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        **{
            k.removeprefix("APP_").lower(): v
            for k, v in environment.items()
            if k.startswith("APP_")
        },
        WEB_CONCURRENCY=environment["WEB_CONCURRENCY"],
    )
    assert settings.env == "production"
    assert settings.web_concurrency == 2
    assert not settings.is_sqlite


def test_api_waits_for_migrations_and_healthy_data_stores(
    services: dict[str, dict[str, Any]],
) -> None:
    api, migrate = services["api"], services["migrate"]
    assert api["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"},
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    assert migrate["command"] == ["python", "-m", "app", "migrate"]
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert migrate["image"] == api["image"]
    assert api["build"]["context"] == "."
    assert (ROOT / api["build"]["dockerfile"]).is_file()


def test_only_the_edge_and_the_dashboards_are_published(
    services: dict[str, dict[str, Any]],
) -> None:
    publishing = {name for name in DEFAULT_SERVICES if services[name].get("ports")}
    assert publishing == {"nginx", "grafana", "prometheus"}
    ports = {name: published(services[name]) for name in publishing}
    assert ports["nginx"] == [("", "${NGINX_HTTP_PORT:-8080}", "80")]
    assert ports["grafana"] == [("", "${GRAFANA_HTTP_PORT:-3000}", "3000")]
    # No authentication on Prometheus, Jaeger or Locust: loopback only.
    assert ports["prometheus"] == [("127.0.0.1", "${PROMETHEUS_PORT:-9090}", "9090")]
    for name in PROFILES:
        for address, _, _ in published(services[name]):
            assert address == "127.0.0.1", name
    assert "expose" not in services["api"]


def test_long_running_services_restart_and_have_limits(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        limits = service["deploy"]["resources"]["limits"]
        assert limits.get("memory"), f"{name} has no memory limit"
        assert limits.get("cpus"), f"{name} has no CPU limit"
        expected = "no" if name == "migrate" else "unless-stopped"
        assert service.get("restart") == expected, name
        assert service.get("logging", {}).get("options", {}).get("max-size"), name


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service["image"]
        if "build" in service or image == services["api"]["image"]:
            continue
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: {image} has no tag"
        assert "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image} is not pinned"
        assert re.search(r"\d+\.\d+", tag), f"{name}: {image} is not pinned"
    assert services["nginx"]["image"] == "nginx:1.27-alpine"


def test_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    def command(name: str) -> str:
        return " ".join(services[name]["healthcheck"]["test"])

    assert "pg_isready" in command("postgres")
    # TCP, like migrate: the first boot's temporary server answers on the socket only.
    assert "pg_isready -h 127.0.0.1 " in command("postgres")
    assert "redis-cli ping" in command("redis")
    assert "/-/healthy" in command("prometheus")
    assert ":8081/stub_status" in command("nginx")
    assert "/api/health" in command("grafana")
    # The api keeps the image's HEALTHCHECK (/health/live); nginx waits for it.
    assert "healthcheck" not in services["api"]
    assert "HEALTHCHECK" in (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert services["nginx"]["depends_on"]["api"] == {"condition": "service_healthy"}


def test_named_volumes_hold_the_state(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    assert set(compose["volumes"]) == {
        "postgres-data",
        "redis-data",
        "uploads",
        "prometheus-data",
        "grafana-data",
    }
    expected = {
        "postgres": "postgres-data:/var/lib/postgresql/data",
        "redis": "redis-data:/data",
        "api": "uploads:/data",
        "prometheus": "prometheus-data:/prometheus",
        "grafana": "grafana-data:/var/lib/grafana",
    }
    for name, volume in expected.items():
        assert volume in services[name]["volumes"], name


def test_api_runs_read_only_and_stops_gracefully(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]
    for name in ("api", "migrate"):
        assert services[name]["read_only"] is True
        assert any(t.split(":")[0] == "/tmp" for t in services[name]["tmpfs"])  # noqa: S108
        assert services[name]["cap_drop"] == ["ALL"]
    assert "init" not in api  # gunicorn is PID 1 and handles the signals itself
    grace = int(re.fullmatch(r"(\d+)s", api["stop_grace_period"])[1])  # type: ignore[index]
    assert grace > int(api["environment"]["GUNICORN_GRACEFUL_TIMEOUT"])


# What each service may do beyond an unprivileged user's: the images of PostgreSQL and
# Redis start as root to hand their data to their own user, then switch to it.
CAPABILITIES = {
    "postgres": {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"},
    "redis": {"CHOWN", "DAC_OVERRIDE", "SETGID", "SETUID"},
}
# Services whose root filesystem stays writable, each for a reason the compose file gives:
# Grafana and Jaeger write to paths this machine cannot run them to find; Locust is a tool.
WRITABLE_ROOT = {"grafana", "jaeger", "locust-master", "locust-worker"}


def test_every_service_has_only_the_privileges_it_needs(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        assert service.get("cap_drop") == ["ALL"], f"{name} keeps Docker's capabilities"
        assert set(service.get("cap_add", [])) == CAPABILITIES.get(name, set()), name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service.get("read_only", False) is (name not in WRITABLE_ROOT), name
        assert "privileged" not in service, name
    # What PostgreSQL writes besides its volume: the socket and its lock file.
    assert "/var/run/postgresql" in tmpfs_mounts(services["postgres"])


def test_only_nginx_may_forward_client_addresses_and_only_prometheus_scrapes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    (pool,) = compose["networks"]["default"]["ipam"]["config"]
    subnet = ipaddress.ip_network(pool["subnet"])
    dynamic = ipaddress.ip_network(pool["ip_range"])
    assert dynamic.subnet_of(subnet)  # type: ignore[arg-type]
    fixed = {}
    for name in ("nginx", "prometheus"):
        address = ipaddress.ip_address(services[name]["networks"]["default"]["ipv4_address"])
        assert address in subnet, name
        assert address not in dynamic, name
        fixed[name] = str(address)
    environment = services["api"]["environment"]
    assert environment["APP_FORWARDED_ALLOW_IPS"] == fixed["nginx"]
    allowed = environment["APP_METRICS_ALLOWED_NETWORKS"].split(",")
    assert f"{fixed['prometheus']}/32" in allowed
    assert not any(ipaddress.ip_network(n).overlaps(dynamic) for n in allowed)


def test_nginx_gets_the_agreed_environment(services: dict[str, dict[str, Any]]) -> None:
    nginx = services["nginx"]["environment"]
    api = services["api"]["environment"]
    assert nginx == {
        "NGINX_ENVSUBST_OUTPUT_DIR": "/run/nginx",
        "NGINX_LISTEN_PORT": "80",
        "NGINX_STATUS_PORT": "8081",
        "NGINX_UPSTREAM": "api:8000",
        "NGINX_RESOLVER": "127.0.0.11",
        "NGINX_RUN_DIR": "/var/cache/nginx",
        "NGINX_ACCESS_LOG": "/dev/stdout",
        "NGINX_ERROR_LOG": "/dev/stderr",
        "APP_MAX_REQUEST_BODY_BYTES": api["APP_MAX_REQUEST_BODY_BYTES"],
        "APP_MAX_UPLOAD_BYTES": api["APP_MAX_UPLOAD_BYTES"],
        "APP_MAX_BATCH_FILES": api["APP_MAX_BATCH_FILES"],
        "NGINX_EDGE_RATE": "${NGINX_EDGE_RATE:-50r/s}",
        "NGINX_EDGE_BURST": "${NGINX_EDGE_BURST:-100}",
        "NGINX_EDGE_CONNECTIONS": "${NGINX_EDGE_CONNECTIONS:-100}",
        "NGINX_TRUSTED_PROXIES": "${NGINX_TRUSTED_PROXIES:-}",
    }
    assert default_of(nginx["APP_MAX_UPLOAD_BYTES"]) == "10485760"
    assert default_of(nginx["APP_MAX_REQUEST_BODY_BYTES"]) == "1048576"
    assert default_of(nginx["APP_MAX_BATCH_FILES"]) == "10"
    # The same defaults as the limits script's, which the native stack uses.
    script_defaults = template_values({"PATH": os.defpath})
    for name in ("NGINX_EDGE_RATE", "NGINX_EDGE_BURST", "NGINX_EDGE_CONNECTIONS"):
        assert default_of(nginx[name]) == script_defaults[name], name
    # The exporter reads the status port that is published nowhere.
    exporter = services["nginx-exporter"]["command"]
    assert exporter == ["--nginx.scrape-uri=http://nginx:8081/stub_status"]


def test_exporters_connect_with_the_env_credentials(services: dict[str, dict[str, Any]]) -> None:
    dsn = services["postgres-exporter"]["environment"]["DATA_SOURCE_NAME"]
    assert "${POSTGRES_PASSWORD:?" in dsn
    assert "@postgres:5432/" in dsn
    redis = services["redis-exporter"]["environment"]
    assert redis["REDIS_ADDR"] == "redis://redis:6379"
    assert redis["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")


def test_prometheus_targets_name_the_compose_services(
    services: dict[str, dict[str, Any]],
) -> None:
    targets_dir = ROOT / "monitoring" / "prometheus" / "targets"
    expected = {
        "api": "api:8000",
        "nginx": "nginx-exporter:9113",
        "postgres": "postgres-exporter:9187",
        "redis": "redis-exporter:9121",
        "prometheus": "localhost:9090",
    }
    for job, target in expected.items():
        groups = yaml.safe_load((targets_dir / f"{job}.yml").read_text(encoding="utf-8"))
        assert [t for group in groups for t in group["targets"]] == [target], job
        host = target.split(":")[0]
        assert host == "localhost" or host in DEFAULT_SERVICES, job
    assert "./monitoring/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


# --- Grafana (cannot run here: structure only; queries are parsed by promtool) -------------


def test_grafana_datasource_is_the_compose_prometheus() -> None:
    config = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )
    assert config["apiVersion"] == 1
    (datasource,) = config["datasources"]
    assert datasource["uid"] == "prometheus"
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["isDefault"] is True


def test_grafana_dashboard_provider_reads_the_mounted_folder(
    services: dict[str, dict[str, Any]],
) -> None:
    config = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text(encoding="utf-8")
    )
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    mounts = dict(bind_mounts(services["grafana"]))
    assert mounts["monitoring/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert list((GRAFANA / "dashboards").glob("*.json"))


def test_grafana_admin_password_is_required(services: dict[str, dict[str, Any]]) -> None:
    environment = services["grafana"]["environment"]
    assert environment["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


# --- OpenTelemetry collector (cannot run here: structure only) ------------------------------


def test_otel_collector_pipeline_references_defined_components(
    services: dict[str, dict[str, Any]],
) -> None:
    config = yaml.safe_load(OTEL_CONFIG.read_text(encoding="utf-8"))
    service = config["service"]
    assert set(service["extensions"]) <= set(config["extensions"])
    assert service["pipelines"], "no pipeline"
    for name, pipeline in service["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= set(config.get(kind, {})), (name, kind)
        assert pipeline["receivers"], name
        assert pipeline["exporters"], name
    assert service["pipelines"]["traces"]["processors"][0] == "memory_limiter"
    # The app's documented endpoint is this collector's OTLP/HTTP receiver ...
    http = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert commented_value("OTEL_EXPORTER_OTLP_ENDPOINT") == (
        f"http://otel-collector:{http.rsplit(':', 1)[1]}"
    )
    # ... and it forwards to Jaeger's OTLP port, which Jaeger opens when asked to.
    assert config["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    collector = services["otel-collector"]
    target = dict(bind_mounts(collector))["monitoring/otel-collector/config.yml"]
    assert collector["command"] == [f"--config={target}"]


# --- Locust (the file is compiled and its requests checked against the OpenAPI) ------------


def locust_requests() -> set[tuple[str, str]]:
    """(METHOD, path template) of every `self.client.<method>(path, …)` call; module-level
    string constants in f-strings are substituted, other values become `{}`."""
    tree = ast.parse(LOCUSTFILE.read_text(encoding="utf-8"))
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name) and isinstance(node.value.value, str)
    }

    def text(part: ast.expr) -> str:
        if isinstance(part, ast.Constant):
            return str(part.value)
        if isinstance(part, ast.JoinedStr):
            return "".join(text(value) for value in part.values)
        if isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name):
            return constants.get(part.value.id, "{}")
        return "{}"

    found = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "client"
            and node.func.attr in {"get", "post", "put", "patch", "delete"}
        ):
            found.add((node.func.attr.upper(), text(node.args[0])))
    return found


def test_locustfile_compiles_and_requests_only_real_endpoints(tmp_path: Path) -> None:
    py_compile.compile(str(LOCUSTFILE), cfile=str(tmp_path / "locustfile.pyc"), doraise=True)
    app = create_app(Settings(_env_file=None, data_dir=tmp_path))  # type: ignore[call-arg]
    openapi = {
        (method.upper(), re.sub(r"\{[^}]+\}", "{}", path))
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    requests = locust_requests()
    assert requests >= {
        ("POST", "/api/v1/auth/register"),
        ("POST", "/api/v1/auth/token"),
        ("GET", "/api/v1/items"),
        ("GET", "/api/v1/items/{}"),
        ("POST", "/api/v1/items"),
        ("POST", "/api/v1/auth/refresh"),
        ("POST", "/api/v1/files"),
        ("DELETE", "/api/v1/files/{}"),
    }
    assert requests <= openapi, requests - openapi


def test_locust_services_run_the_shipped_locustfile(services: dict[str, dict[str, Any]]) -> None:
    for name in ("locust-master", "locust-worker"):
        service = services[name]
        assert service["build"] == "./loadtests"
        assert service["image"] == f"fastapi-ops-locust:{metadata.version('locust')}"
        assert dict(bind_mounts(service)) == {"loadtests": "/mnt/locust"}
        assert service["command"][:2] == ["-f", "/mnt/locust/locustfile.py"]
    assert "--master" in services["locust-master"]["command"]
    assert services["locust-worker"]["command"][-2:] == ["--master-host", "locust-master"]


def test_the_locust_image_has_the_versions_the_tests_run() -> None:
    """tests/test_loadtests.py runs the scenario with the dev dependencies: the image the
    compose profile builds must hold the same Locust and websockets."""
    dockerfile = (ROOT / "loadtests" / "Dockerfile").read_text()
    assert re.search(r"^FROM locustio/locust:(\S+)$", dockerfile, re.M)[1] == metadata.version(
        "locust"
    )
    assert re.findall(r'"websockets==([^"]+)"', dockerfile) == [metadata.version("websockets")]


# --- nginx, as the compose file configures it ----------------------------------------------


def nginx_environment(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The nginx service's environment with every `${NAME:-default}` at its default."""
    environment: dict[str, str] = services["nginx"]["environment"]
    values = {name: (str(value), default_of(str(value))) for name, value in environment.items()}
    return {
        name: value if default is None else default for name, (value, default) in values.items()
    }


def test_nginx_accepts_the_compose_rendering(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    # Through Docker's DNS, looked up per request, never by nginx -t: `api`, which no resolver
    # here knows, stays as it is; only the run directory is moved somewhere writable.
    values = template_values({"PATH": os.defpath} | nginx_environment(services))
    assert (values["NGINX_UPSTREAM"], values["NGINX_UPSTREAM_MODE"]) == ("api:8000", "resolve")
    values |= {"NGINX_RUN_DIR": str(tmp_path / "run")}
    conf = render(values, tmp_path / "conf")
    (tmp_path / "run").mkdir()
    nginx = require_binary("nginx", why="nginx -t", extra_dirs=["/usr/sbin"])
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", "/dev/stderr"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = "\n".join(p.read_text() for p in sorted((tmp_path / "conf").rglob("*.conf")))
    assert "${" not in text  # the image's envsubst leaves unset names as they are
    assert "access_log /dev/stdout edge_json;" in text
    assert "listen 80 default_server;" in text
    assert "listen 8081;" in text
    assert "client_max_body_size 10551296;" in text  # 10 MiB + 64 KiB of multipart framing
    assert "client_max_body_size 1048576;" in text  # the app's cap on any other body
    assert "resolver 127.0.0.11 valid=5s ipv6=off;" in text


def tmpfs_mounts(service: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Each tmpfs of a service: its path and its options (`size=1m,uid=101` → a dict)."""
    mounts = {}
    for entry in service.get("tmpfs", []):
        path, _, options = entry.partition(":")
        pairs = (option.partition("=") for option in options.split(",") if option)
        mounts[path] = {name: value for name, _, value in pairs}
    return mounts


def nginx_user(services: dict[str, dict[str, Any]]) -> tuple[int, int]:
    uid, gid = (int(part) for part in services["nginx"]["user"].split(":"))
    return uid, gid


def test_nginx_runs_unprivileged_on_a_read_only_root(
    services: dict[str, dict[str, Any]],
) -> None:
    """The edge faces the internet: a compromised worker must find nothing to write but two
    tmpfs, no capability and no root. The nginx image starts as root and keeps CHOWN,
    SETUID, SETGID and NET_BIND_SERVICE for that unless told otherwise."""
    nginx = services["nginx"]
    environment = nginx["environment"]
    uid, gid = nginx_user(services)
    assert uid != 0
    assert gid != 0
    assert nginx["read_only"] is True
    assert nginx["cap_drop"] == ["ALL"]
    assert "cap_add" not in nginx
    assert "no-new-privileges:true" in nginx["security_opt"]
    # Without CAP_NET_BIND_SERVICE the user may bind the container's port 80 only because
    # this network namespace lets anybody bind it.
    (container_port,) = {int(port) for _, _, port in published(nginx)}
    assert container_port == int(environment["NGINX_LISTEN_PORT"])
    assert int(nginx["sysctls"]["net.ipv4.ip_unprivileged_port_start"]) <= container_port
    # The image renders the templates into NGINX_ENVSUBST_OUTPUT_DIR and skips them, with
    # a mere log line, when it cannot write there: nginx would then start on the image's own
    # configuration (its welcome page). So that directory and the run directory are
    # tmpfs the user owns, and nginx reads what was rendered.
    mounts = tmpfs_mounts(nginx)
    output_dir = environment["NGINX_ENVSUBST_OUTPUT_DIR"]
    assert set(mounts) == {output_dir, environment["NGINX_RUN_DIR"]}
    for path, options in mounts.items():
        # Writable to the user (podman takes no uid= option), bounded: it is memory.
        assert int(options["mode"], 8) & 0o1777 == 0o1777, path
        assert options["size"], path
    assert nginx["command"] == ["nginx", "-c", f"{output_dir}/nginx.conf", "-g", "daemon off;"]


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def owned_by(path: Path, uid: int, gid: int) -> Path:
    """A directory only uid:gid may write to, whose ancestors that user may traverse (o+x):
    it stands for a tmpfs that nobody but the container's user writes to."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    for ancestor in path.resolve().parents:
        ancestor.chmod(ancestor.stat().st_mode | 0o001)
    return path


def test_nginx_serves_as_the_compose_user_with_no_capability(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """This machine's nginx run the way the compose service runs the image's: as its user,
    with no capability, on the compose rendering, able to write only where the tmpfs are.
    (The listening ports are free ones: port 80 is the network namespace's business.)"""
    if os.geteuid() != 0:
        pytest.skip("switching to the compose service's user needs root")
    binary = require_binary(
        "nginx", why="nginx as the compose service runs", extra_dirs=["/usr/sbin"]
    )
    uid, gid = nginx_user(services)
    conf_dir = owned_by(tmp_path / "run-nginx", uid, gid)  # NGINX_ENVSUBST_OUTPUT_DIR
    run_dir = owned_by(tmp_path / "var-cache-nginx", uid, gid)  # NGINX_RUN_DIR
    log_path = tmp_path / "nginx.log"
    log_path.touch()
    os.chown(log_path, uid, gid)  # the runtime hands the container's stdio to its user
    listen, status, api_port = free_port(), free_port(), free_port()
    with FakeDns({"api": ["127.0.0.1"]}) as dns, echo_api("127.0.0.1", api_port):
        values = template_values(
            {"PATH": os.defpath}
            | nginx_environment(services)
            | {
                "NGINX_LISTEN": f"127.0.0.1:{listen}",
                "NGINX_STATUS_LISTEN": f"127.0.0.1:{status}",
                "NGINX_UPSTREAM": f"api:{api_port}",
                "NGINX_RESOLVER": f"127.0.0.1:{dns.port}",
                "NGINX_RUN_DIR": str(run_dir),
            }
        )
        assert values["NGINX_ACCESS_LOG"] == "/dev/stdout"
        conf = render(values, conf_dir)
        for path in [conf_dir, *conf_dir.rglob("*")]:
            os.chown(path, uid, gid)  # the image's entrypoint, as that user, writes them
        # The compose command, with this machine's nginx and directory; -e: its built-in
        # error log is a file (the image's is a link to stderr).
        command = services["nginx"]["command"]
        assert command[1:3] == ["-c", f"{values['NGINX_ENVSUBST_OUTPUT_DIR']}/nginx.conf"]
        command = [binary, "-c", str(conf), *command[3:], "-e", "/dev/stderr"]
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=tmp_path,
                user=uid,
                group=gid,
                extra_groups=[],
            )
        try:
            wait_for(
                lambda: accepts_tcp("127.0.0.1", listen) and accepts_tcp("127.0.0.1", status),
                timeout=30,
                what="nginx as the compose user",
                process=process,
                log_path=log_path,
            )
            with httpx2.Client(trust_env=False, timeout=10) as client:
                answer = client.get(f"http://127.0.0.1:{listen}/api/v1/items")
                assert answer.status_code == 200, answer.text
                assert answer.json()["server"] == "127.0.0.1"
                # Past client_body_buffer_size: written to the run directory's temp files.
                posted = client.post(
                    f"http://127.0.0.1:{listen}/api/v1/items", content=b"x" * 65536
                )
                assert posted.status_code == 200, posted.text
                stub = client.get(f"http://127.0.0.1:{status}/stub_status")
                assert stub.status_code == 200
                assert "Active connections" in stub.text
            workers = [
                int(p.parent.name)
                for p in Path("/proc").glob("[0-9]*/status")
                if p.parent.name.isdigit()
                and proc_status(int(p.parent.name)).get("PPid") == str(process.pid)
            ]
            assert workers
            assert (run_dir / "nginx.pid").read_text().strip() == str(process.pid)
            for pid in (process.pid, *workers):
                status_lines = proc_status(pid)
                assert status_lines["Uid"].split() == [str(uid)] * 4, pid
                assert status_lines["Gid"].split() == [str(gid)] * 4, pid
                assert int(status_lines["CapEff"], 16) == 0, pid
                assert int(status_lines["CapPrm"], 16) == 0, pid
        finally:
            process.send_signal(signal.SIGQUIT)
            process.wait(timeout=30)
    logged = log_path.read_text()
    assert "a client request body is buffered to a temporary file" in logged
    assert '"uri":"/api/v1/items"' in logged  # the JSON access log, on the container's stdout
    for level in ("[emerg]", "[alert]", "[crit]"):
        assert level not in logged, logged
    assert (run_dir / "client_body").is_dir()
    # Nothing it wrote lies outside the two directories that stand for the tmpfs.
    written = {
        path for path in tmp_path.rglob("*") if path.lstat().st_uid == uid and path != log_path
    }
    outside = {path for path in written if not {conf_dir, run_dir} & {path, *path.parents}}
    assert not outside, outside


def podman_options(service: dict[str, Any]) -> list[str]:
    """The `podman run` options for what a compose service says about its privileges."""
    options = ["--read-only"] if service.get("read_only") else []
    options += ["--user", service["user"]] if "user" in service else []
    options += [f"--cap-drop={cap}" for cap in service.get("cap_drop", [])]
    options += [f"--cap-add={cap}" for cap in service.get("cap_add", [])]
    options += [f"--security-opt={option}" for option in service.get("security_opt", [])]
    options += [f"--sysctl={name}={value}" for name, value in service.get("sysctls", {}).items()]
    options += [f"--tmpfs={mount}" for mount in service.get("tmpfs", [])]
    return options


@pytest.mark.podman
def test_nginx_starts_and_serves_in_a_container_as_compose_confines_it(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """A real container runtime applies the nginx service's user, read-only root, tmpfs,
    sysctl and capabilities as written in the compose file, and nginx still listens on port
    80 and answers. No registry here: this machine's nginx runs in the local base image,
    and the image's entrypoint (envsubst into NGINX_ENVSUBST_OUTPUT_DIR) is played by a
    copy of the compose rendering made there as the container's user."""
    podman = Podman.find()
    base = base_image(podman, tmp_path)
    binary = Path(require_binary("nginx", why="nginx in a container", extra_dirs=["/usr/sbin"]))
    nginx = services["nginx"]
    values = template_values({"PATH": os.defpath} | nginx_environment(services))
    rendered = render(values, tmp_path / "rendered").parent
    for path in [rendered, *rendered.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o005)  # readable for the container's user
    output_dir = values["NGINX_ENVSUBST_OUTPUT_DIR"]
    name = f"fastapi-ops-compose-nginx-{os.getpid()}"
    podman.run(
        "run", "--detach", "--name", name,
        # Its own network namespace, with nothing but loopback: the checks run inside.
        "--network", "none",
        *podman_options(nginx),
        *ulimit_options(),
        "--volume", f"{binary.resolve()}:/usr/sbin/nginx:ro",
        "--volume", f"{rendered}:/rendered:ro",
        base,
        "sh", "-c", f'cp -R /rendered/. {output_dir}/ && exec "$@"', "entrypoint",
        # The compose command; -e: this nginx's built-in error log is a file.
        *nginx["command"], "-e", "/dev/stderr",
    )  # fmt: skip
    try:

        def inside(script: str) -> subprocess.CompletedProcess[str]:
            return podman.run("exec", name, "python3", "-c", script, check=False)

        probe = (
            "import urllib.request, urllib.error\n"
            "print(urllib.request.urlopen('http://127.0.0.1:8081/stub_status').status)\n"
            "try:\n"
            "    urllib.request.urlopen('http://127.0.0.1:80/metrics')\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code, e.headers['content-type'])\n"
        )
        answered: list[str] = []

        def serving() -> bool:
            running = podman.run("inspect", "--format", "{{.State.Running}}", name).stdout
            if running.strip() != "true":
                logs = podman.run("logs", name, check=False)
                raise RuntimeError(f"nginx exited:\n{logs.stdout}{logs.stderr}")
            result = inside(probe)
            answered[:] = result.stdout.split()
            return result.returncode == 0

        wait_for(serving, timeout=30, what="nginx in its container")
        assert answered == ["200", "404", "application/problem+json"]
        status = inside("print(open('/proc/1/status').read())").stdout
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        uid, gid = nginx_user(services)
        assert fields["Uid"].split() == [str(uid)] * 4
        assert fields["Gid"].split() == [str(gid)] * 4
        for kind in ("CapEff", "CapPrm", "CapBnd"):
            assert int(fields[kind], 16) == 0, kind
        refused = podman.run("exec", name, "touch", "/etc/nginx-was-here", check=False)
        assert "Read-only file system" in refused.stderr
        pid = podman.run("exec", name, "cat", f"{values['NGINX_RUN_DIR']}/nginx.pid").stdout
        assert pid.strip() == "1"
    finally:
        podman.run("rm", "--force", "--time", "0", name, check=False)


# --- secrets stay off command lines -----------------------------------------------------


def test_no_secret_is_on_a_command_line(services: dict[str, dict[str, Any]]) -> None:
    """A command line shows in `docker inspect` (Args), `docker ps --no-trunc` and, while
    the process runs, the host's `ps` for any user; secrets come from the environment."""
    for name, service in services.items():
        for key in ("command", "entrypoint"):
            words = service.get(key) or []
            text = " ".join(words) if isinstance(words, list) else str(words)
            used = {match["name"] for match in INTERPOLATION.finditer(text)}
            assert not used & SECRETS, f"{name}'s {key} holds {used & SECRETS}"
            assert "--requirepass" not in text, name


def test_redis_requires_the_password_its_command_reads_from_the_environment(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The compose command run by this machine's redis-server (its configuration file in the
    test's directory), with a stand-in for the image's entrypoint (which runs the
    redis-server line as the redis user): the password in REDISCLI_AUTH protects Redis,
    and the other settings of the line hold."""
    redis_server = require_binary("redis-server", why="the compose redis command")
    redis_cli = require_binary("redis-cli", why="the compose redis command")
    redis = services["redis"]
    shell, flag, script = redis["command"]
    assert (shell, flag) == ("sh", "-c")
    # The configuration file lies on a tmpfs, never on the data volume (a disk).
    config = re.search(r"> (\S+/redis\.conf)$", script, re.M)[1]  # type: ignore[index]
    assert str(Path(config).parent) in tmpfs_mounts(redis)
    script = script.replace(config, str(tmp_path / "redis.conf"))
    assert set(redis["environment"]) == {"REDISCLI_AUTH"}
    assert redis["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    port = free_port()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "docker-entrypoint.sh"
    stand_in.write_text(
        "#!/bin/sh\n"
        "# The image's entrypoint execs the redis-server line; here on a port of the test's\n"
        "# (after the configuration file, which must come first).\n"
        'server="$1"; config="$2"; shift 2\n'
        f'exec {redis_server} "$config" --port {port} --bind 127.0.0.1 --dir "{tmp_path}" "$@"\n'
    )
    stand_in.chmod(0o755)
    password = "test-password-Xq7_9"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.defpath}", "REDISCLI_AUTH": password}
    log_path = tmp_path / "redis.log"
    with log_path.open("ab") as log:
        # Compose turns `$$` into `$` before the shell sees the script.
        process = subprocess.Popen(
            ["sh", "-c", script.replace("$$", "$")],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        wait_for(
            lambda: accepts_tcp("127.0.0.1", port),
            timeout=30,
            what="redis from the compose command",
            process=process,
            log_path=log_path,
        )

        def cli(*args: str, auth: str | None = password) -> str:
            result = subprocess.run(
                [redis_cli, "-p", str(port), *args],
                env={"REDISCLI_AUTH": auth} if auth else {},
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            return (result.stdout + result.stderr).strip()

        assert "NOAUTH" in cli("ping", auth=None)
        assert "WRONGPASS" in cli("ping", auth="not-the-password")
        assert cli("ping") == "PONG"  # what the healthcheck runs, with REDISCLI_AUTH
        assert cli("config", "get", "appendonly").split() == ["appendonly", "yes"]
        assert cli("config", "get", "maxmemory").split() == ["maxmemory", str(200 * 2**20)]
        policy = cli("config", "get", "maxmemory-policy").split()
        assert policy == ["maxmemory-policy", "volatile-ttl"]
        # The running server's command line, which anyone on the host may read.
        assert password not in Path(f"/proc/{process.pid}/cmdline").read_text()
        # Only the redis user may read the file with the password.
        assert (tmp_path / "redis.conf").stat().st_mode & 0o077 == 0
        assert (tmp_path / "redis.conf").owner() == "redis"
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert password not in log_path.read_text()
