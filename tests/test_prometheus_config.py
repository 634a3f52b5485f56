"""The shipped Prometheus configuration, read by the real promtool and run by the real
prometheus: one prometheus.yml whose targets come only from targets/<job>.yml (file_sd),
so compose and the native stack differ by their target files alone. The Grafana
dashboard's queries are parsed by promtool as well (Grafana itself cannot run here)."""

import http.server
import json
import math
import re
import shutil
import sqlite3
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from app.observability import metrics
from deploy.stack.process import free_port, require_binary, wait_for
from tests.app_server import answers, sqlite_server

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


@dataclass
class Prometheus:
    base_url: str
    targets: dict[str, str]  # job: the address of its target
    process: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now."""
        url = f"{self.base_url}/api/v1/query?query={urllib.parse.quote(expr)}"
        result: list[dict[str, Any]] = get_json(url)["data"]["result"]
        return result

    def values(self, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
        """``expr`` now, by the values of ``labels``: a missing key is "no data"."""
        return {
            tuple(sample["metric"].get(label, "") for label in labels): float(sample["value"][1])
            for sample in self.query(expr)
        }

    def wait_until(self, expr: str, what: str) -> None:
        """Until ``expr`` has data (a filter such as ``== 1`` included): Prometheus has
        scraped that far."""
        wait_for(
            lambda: bool(self.query(expr)),
            timeout=60,
            what=what,
            process=self.process,
            log_path=self.log,
        )


@contextmanager
def running_prometheus(
    directory: Path, targets: Mapping[str, str], interval: str | None = None
) -> Iterator[Prometheus]:
    """The real prometheus on a copy of the shipped config in ``directory``, scraping
    ``targets`` (job: address; the other jobs an address nothing listens on, prometheus
    itself). ``interval`` replaces the 15 s of scrapes and rule evaluations, for tests
    that need several scrapes and cannot wait for them at the shipped pace."""
    binary = require_binary("prometheus", why="runs the shipped config (apt: prometheus)")
    copied = copy_config(directory / "config")
    if interval is not None:
        shipped = config()
        shipped["global"] |= dict.fromkeys(
            ("scrape_interval", "scrape_timeout", "evaluation_interval"), interval
        )
        copied.write_text(yaml.safe_dump(shipped), encoding="utf-8")
    port = free_port()
    nobody = free_port()  # nothing listens there: those jobs are discovered but down
    addresses = dict.fromkeys(JOBS, f"127.0.0.1:{nobody}")
    addresses |= {"prometheus": f"127.0.0.1:{port}", **targets}
    for job, target in addresses.items():
        (directory / "config" / "targets" / f"{job}.yml").write_text(
            yaml.safe_dump([{"targets": [target]}]), encoding="utf-8"
        )
    log = directory / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={copied}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={directory / 'data'}",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        # Its API answers 503 until the storage is open.
        wait_for(
            lambda: answers(f"{base}/-/ready"),
            timeout=60,
            what="prometheus ready",
            process=process,
            log_path=log,
        )
        yield Prometheus(base, addresses, process, log)
    finally:
        process.terminate()
        process.wait(timeout=30)


def target_health(prometheus: Prometheus, job: str) -> str | None:
    active = get_json(f"{prometheus.base_url}/api/v1/targets")["data"]["activeTargets"]
    states = [t["health"] for t in active if t["labels"]["job"] == job]
    return states[0] if states else None


def test_prometheus_discovers_the_targets_from_file_sd(tmp_path: Path, metrics_server: int) -> None:
    api = f"127.0.0.1:{metrics_server}"
    with running_prometheus(tmp_path, {"api": api}) as prometheus:
        # The first scrape comes within one scrape interval (15 s) of discovery.
        wait_for(
            lambda: target_health(prometheus, "api") == "up",
            timeout=90,
            what="the api target up",
            process=prometheus.process,
            log_path=prometheus.log,
        )
        base = prometheus.base_url
        active = get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
        by_job = {t["labels"]["job"]: t for t in active}
        assert sorted(by_job) == sorted(JOBS)
        for job, target in by_job.items():
            assert target["discoveredLabels"]["__meta_filepath"].endswith(f"targets/{job}.yml")
            assert target["labels"]["instance"] == prometheus.targets[job]
        assert by_job["api"]["scrapeUrl"] == f"http://{api}/metrics"

        result = prometheus.query('http_requests_total{job="api"}')
        assert [sample["value"][1] for sample in result] == ["42"]

        groups = get_json(f"{base}/api/v1/rules")["data"]["groups"]
        assert {rule["name"] for group in groups for rule in group["rules"]} >= {
            "job:http_requests:rate5m"
        }


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


# --- the dashboards and rules evaluated by the real prometheus on the real service ---------

RULES = PROMETHEUS_DIR / "rules"
RECORDS = ("job:http_requests:rate5m", "job:http_request_errors:ratio_rate5m")


def panel_expr(title: str, legend: str | None = None) -> str:
    """The query of the overview panel ``title`` (its ``legend`` one, if several), Grafana
    variables replaced as for promtool."""
    dashboard = json.loads((DASHBOARDS / "service-overview.json").read_text(encoding="utf-8"))
    (panel,) = (panel for panel in panels(dashboard) if panel["title"] == title)
    (target,) = (t for t in panel["targets"] if legend in (None, t.get("legendFormat")))
    expr: str = target["expr"]
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def rule_expr(record: str) -> str:
    """The expression of the recording rule ``record``, to evaluate now rather than wait
    for its next evaluation."""
    for path in RULES.glob("*.yml"):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                if rule.get("record") == record:
                    expr: str = rule["expr"]
                    return expr
    raise AssertionError(f"no recording rule {record}")


@contextmanager
def scraped_service(tmp_path: Path) -> Iterator[tuple[str, Prometheus]]:
    """The service (``python -m app serve`` on SQLite under ``tmp_path``) and the real
    prometheus scraping it every second: the service's base URL and the prometheus."""
    with (
        sqlite_server(tmp_path, tmp_path / "server.log") as base,
        running_prometheus(
            tmp_path / "prometheus", {"api": base.removeprefix("http://")}, interval="1s"
        ) as prometheus,
    ):
        yield base, prometheus


@contextmanager
def items_table_hidden(database: Path) -> Iterator[None]:
    """The items table renamed away: the service's reads of it fail (a real 500)."""
    with sqlite3.connect(database) as connection:
        connection.execute("ALTER TABLE items RENAME TO items_hidden")
    try:
        yield
    finally:
        with sqlite3.connect(database) as connection:
            connection.execute("ALTER TABLE items_hidden RENAME TO items")


def test_a_routes_first_server_error_shows_on_the_dashboard(tmp_path: Path) -> None:
    """Rare errors are the ones a counter series born with its first error hides: its
    first scraped value is already 1, so rate() and increase() saw nothing."""
    items, item = ("GET", "/api/v1/items"), ("GET", "/api/v1/items/{item_id}")
    with scraped_service(tmp_path) as (base, prometheus):

        def traffic() -> None:
            assert httpx2.get(f"{base}/api/v1/items").status_code == 200
            assert httpx2.get(f"{base}/api/v1/items/1").status_code == 404

        # The routes' first requests create their series; rate() needs the traffic after
        # a scrape has seen them.
        traffic()
        prometheus.wait_until(
            'http_requests_total{route="/api/v1/items/{item_id}",status="404"} == 1',
            "the routes' series scraped",
        )
        traffic()
        prometheus.wait_until(
            'http_requests_total{route="/api/v1/items/{item_id}",status="404"} == 2',
            "the traffic scraped",
        )
        # Traffic and no error: a ratio of 0, not "no data".
        assert prometheus.values(panel_expr("Error ratio (5xx)")) == {(): 0}
        per_route = panel_expr("5xx ratio per route")
        assert prometheus.values(per_route, "method", "route") == {items: 0, item: 0}
        assert prometheus.values(rule_expr("job:http_request_errors:ratio_rate5m")) == {(): 0}

        with items_table_hidden(tmp_path / "app.db"):
            # A query no earlier request cached: it reaches the database.
            assert httpx2.get(f"{base}/api/v1/items?q=uncached").status_code == 500
        prometheus.wait_until(
            'http_requests_total{route="/api/v1/items",status="500"} == 1', "the 500 scraped"
        )
        increase = prometheus.values('sum(increase(http_requests_total{status=~"5.."}[1m]))')
        assert increase[()] > 0
        assert prometheus.values(panel_expr("Error ratio (5xx)"))[()] > 0
        ratios = prometheus.values(per_route, "method", "route")
        assert ratios[items] > 0
        assert ratios[item] == 0
        assert prometheus.values(rule_expr("job:http_request_errors:ratio_rate5m"))[()] > 0


def test_scrapes_and_probes_are_no_traffic_on_the_dashboard(tmp_path: Path) -> None:
    """An idle service, only scraped and probed: no HTTP panel or rule may show traffic,
    concurrency or latency (a scrape is always in progress while it renders, and its
    duration became the p95 against the latency objective), nor an error ratio."""
    with sqlite_server(tmp_path, tmp_path / "server.log") as base:
        # A route with traffic before the first scrape and none after: idle in every window.
        assert httpx2.get(f"{base}/api/v1/items").status_code == 200
        api = {"api": base.removeprefix("http://")}
        with running_prometheus(tmp_path / "prometheus", api, interval="1s") as prometheus:
            for probes in (1, 2):
                assert httpx2.get(f"{base}/health/ready").status_code == 200
                prometheus.wait_until(
                    f'http_requests_total{{route="/health/ready",status="200"}} == {probes}',
                    "the probe scraped",
                )
            prometheus.wait_until(
                'http_requests_total{route="/metrics",status="200"} >= 3', "scrapes counted"
            )
            exprs = [
                *((where, expr) for where, expr in expressions() if "http_" in expr),
                *((record, rule_expr(record)) for record in RECORDS),
            ]
            for where, expr in exprs:
                shown = prometheus.values(expr, "method", "route", "status").values()
                # NaN: a quantile of no observations, no value on a panel.
                assert all(v == 0 or math.isnan(v) for v in shown), (where, expr, shown)
            # No traffic, no error ratio: not a 0/0 that panels would draw as NaN.
            for expr in (
                panel_expr("Error ratio (5xx)"),
                panel_expr("5xx ratio per route"),
                rule_expr("job:http_request_errors:ratio_rate5m"),
            ):
                assert prometheus.query(expr) == [], expr
