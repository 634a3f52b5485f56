"""The shipped Prometheus configuration, read by the real promtool and run by the real
prometheus: one prometheus.yml whose targets come only from targets/<job>.yml (file_sd),
so compose and the native stack differ by their target files alone. The Grafana
dashboard's queries are parsed by promtool as well (Grafana itself cannot run here)."""

import http.server
import json
import re
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.observability import metrics
from deploy.stack.process import free_port, require_binary, wait_for

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "monitoring" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARDS = ROOT / "monitoring" / "grafana" / "dashboards"
JOBS = ["api", "nginx", "postgres", "redis", "prometheus"]
DATASOURCE_UID = "prometheus"
# Grafana's built-in interval variables, replaced by a concrete range before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def promtool() -> str:
    return require_binary("promtool", why="Prometheus config checks (apt: prometheus)")


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )


def config() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    return data


def copy_config(destination: Path) -> Path:
    """The configuration directory as the native stack lays it out: prometheus.yml and
    rules/ copied, targets/ its own."""
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copy(CONFIG, destination / "prometheus.yml")
    shutil.copytree(PROMETHEUS_DIR / "rules", destination / "rules")
    shutil.copytree(PROMETHEUS_DIR / "targets", destination / "targets")
    return destination / "prometheus.yml"


# --- structure: the contract other deployments build on -----------------------------------


def test_every_job_takes_its_targets_from_its_own_relative_file() -> None:
    data = config()
    jobs = {job["job_name"]: job for job in data["scrape_configs"]}
    assert list(jobs) == JOBS
    for name, job in jobs.items():
        assert set(job) <= {"job_name", "metrics_path", "file_sd_configs"}, name
        assert job["file_sd_configs"] == [{"files": [f"targets/{name}.yml"]}], name
        assert (PROMETHEUS_DIR / "targets" / f"{name}.yml").is_file(), name
    assert jobs["api"]["metrics_path"] == "/metrics"
    assert data["rule_files"] == ["rules/*.yml"]
    assert data["global"]["scrape_interval"] == "15s"
    timeout = int(data["global"]["scrape_timeout"].removesuffix("s"))
    assert 0 < timeout < 15


# --- promtool -----------------------------------------------------------------------------


def test_promtool_accepts_the_shipped_config() -> None:
    result = run_promtool("check", "config", str(CONFIG))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # A missing targets file is only a warning to promtool; here it is an error.
    assert "WARNING" not in output, output
    assert re.search(r"SUCCESS: [1-9]\d* rules? found", output), output


@pytest.mark.parametrize("job", JOBS)
def test_promtool_reads_each_targets_file(tmp_path: Path, job: str) -> None:
    copied = copy_config(tmp_path)
    assert run_promtool("check", "config", str(copied)).returncode == 0
    (tmp_path / "targets" / f"{job}.yml").write_text("- targetz: [host:1]\n", encoding="utf-8")
    result = run_promtool("check", "config", str(copied))
    assert result.returncode != 0
    assert f"targets/{job}.yml" in result.stdout + result.stderr


def test_promtool_reads_the_rule_files(tmp_path: Path) -> None:
    copied = copy_config(tmp_path)
    (tmp_path / "rules" / "broken.yml").write_text(
        "groups:\n  - name: broken\n    rules:\n      - record: x:y\n        expr: sum(\n",
        encoding="utf-8",
    )
    result = run_promtool("check", "config", str(copied))
    assert result.returncode != 0
    assert "broken.yml" in result.stdout + result.stderr


def test_recording_rules_pass_promtool() -> None:
    rule_files = sorted(str(p) for p in (PROMETHEUS_DIR / "rules").glob("*.yml"))
    assert rule_files
    result = run_promtool("check", "rules", *rule_files)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the real prometheus, discovering a served target from file_sd -------------------------

EXPOSITION = (
    b"# HELP http_requests_total HTTP requests handled.\n"
    b"# TYPE http_requests_total counter\n"
    b'http_requests_total{method="GET",route="/api/v1/items",status="200"} 42\n'
)


class MetricsHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        # Only the configured metrics_path answers: a wrong path shows as the target down.
        if self.path != "/metrics":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(EXPOSITION)))
        self.end_headers()
        self.wfile.write(EXPOSITION)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def metrics_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MetricsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - local test server
        data: dict[str, Any] = json.load(response)
        return data


def test_prometheus_discovers_the_targets_from_file_sd(tmp_path: Path, metrics_server: int) -> None:
    binary = require_binary("prometheus", why="runs the shipped config (apt: prometheus)")
    copied = copy_config(tmp_path / "config")
    port = free_port()
    nobody = free_port()  # nothing listens there: those jobs are discovered but down
    targets = dict.fromkeys(JOBS, f"127.0.0.1:{nobody}")
    targets |= {"api": f"127.0.0.1:{metrics_server}", "prometheus": f"127.0.0.1:{port}"}
    for job, target in targets.items():
        (tmp_path / "config" / "targets" / f"{job}.yml").write_text(
            yaml.safe_dump([{"targets": [target]}]), encoding="utf-8"
        )
    log = tmp_path / "prometheus.log"
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={copied}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:

        def health(job: str) -> str | None:
            active = get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
            states = [t["health"] for t in active if t["labels"]["job"] == job]
            return states[0] if states else None

        def ready() -> bool:
            try:
                return health("api") == "up"
            except OSError:
                return False

        # The first scrape comes within one scrape interval (15 s) of discovery.
        wait_for(ready, timeout=90, what="the api target up", process=process, log_path=log)
        active = get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
        by_job = {t["labels"]["job"]: t for t in active}
        assert sorted(by_job) == sorted(JOBS)
        for job, target in by_job.items():
            assert target["discoveredLabels"]["__meta_filepath"].endswith(f"targets/{job}.yml")
            assert target["labels"]["instance"] == targets[job]
        assert by_job["api"]["scrapeUrl"] == f"http://127.0.0.1:{metrics_server}/metrics"

        query = urllib.parse.quote('http_requests_total{job="api"}')
        result = get_json(f"{base}/api/v1/query?query={query}")["data"]["result"]
        assert [sample["value"][1] for sample in result] == ["42"]

        groups = get_json(f"{base}/api/v1/rules")["data"]["groups"]
        assert {rule["name"] for group in groups for rule in group["rules"]} >= {
            "job:http_requests:rate5m"
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


# --- the Grafana dashboards' queries --------------------------------------------------------


def dashboard_files() -> list[Path]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, "no dashboard"
    return files


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # inside collapsed rows


def expressions() -> list[tuple[str, str]]:
    """(dashboard file: panel title, expr) of every query, Grafana variables replaced."""
    found = []
    for path in dashboard_files():
        for panel in panels(json.loads(path.read_text(encoding="utf-8"))):
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                assert "$" not in expr, f"unknown variable in {panel['title']!r}: {expr}"
                found.append((f"{path.name}: {panel['title']}", expr))
    return found


def test_dashboards_are_provisionable() -> None:
    uids = set()
    for path in dashboard_files():
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        assert dashboard["uid"] not in uids
        uids.add(dashboard["uid"])
        assert dashboard["title"]
        assert "id" not in dashboard or dashboard["id"] is None  # provisioning assigns it
        ids = [panel["id"] for panel in panels(dashboard)]
        assert len(ids) == len(set(ids)), path.name
        for panel in panels(dashboard):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target.get("datasource", panel["datasource"])["uid"] == DATASOURCE_UID


def test_dashboard_overview_covers_the_golden_signals() -> None:
    exprs = " ".join(expr for _, expr in expressions())
    for needle in (
        "rate(http_requests_total",
        'status=~"5.."',
        "histogram_quantile(0.95",
        "http_request_duration_seconds_bucket",
        "http_requests_in_progress",
        "by (method, route)",
    ):
        assert needle in exprs, needle


def test_dashboard_queries_use_metrics_the_service_exports() -> None:
    known = {"up"}
    for collector in vars(metrics).values():
        name = getattr(collector, "_name", None)
        kind = getattr(collector, "_type", None)
        if name is None:
            continue
        if kind == "counter":
            known.add(f"{name}_total")
        elif kind == "histogram":
            known |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        else:
            known |= {name, f"{name}_count", f"{name}_sum"}
    for where, expr in expressions():
        for selector in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr):
            assert selector in known, f"{where}: {selector} is not exported by the service"


def rules_file_for(exprs: list[tuple[str, str]], path: Path) -> Path:
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    return path


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    exprs = expressions()
    result = run_promtool("check", "rules", str(rules_file_for(exprs, tmp_path / "q.yml")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_a_broken_query_fails_the_parse_check(tmp_path: Path) -> None:
    exprs = [*expressions(), ("broken", "sum by (le (rate(http_requests_total[1m]))")]
    result = run_promtool("check", "rules", str(rules_file_for(exprs, tmp_path / "q.yml")))
    assert result.returncode != 0
