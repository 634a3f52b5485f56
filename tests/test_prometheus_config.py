"""The shipped Prometheus configuration, read by the real promtool and run by the real
prometheus: one prometheus.yml whose targets come only from targets/<job>.yml (file_sd),
so compose and the native stack differ by their target files alone. The Grafana
dashboards' queries are parsed by promtool as well (Grafana itself cannot run here), cover
every metric the service exports, and are evaluated by the real prometheus scraping the
real service."""

import http.server
import io
import json
import math
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from PIL import Image
from prometheus_client.metrics import MetricWrapperBase
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

import app.main  # noqa: F401 - every module that defines a metric, as the service loads them
from app.observability.system import block_device_of
from deploy.stack.process import free_port, require_binary, wait_for
from tests.api import PASSWORD
from tests.app_server import answers, signed_up, sqlite_server

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
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


def exported_samples() -> dict[str, set[str]]:
    """Every metric family the service defines, by the name the README's table gives it
    (counters with ``_total``), with the names of the samples Prometheus stores for it.
    Found in every module of the service that defines one, so a metric added anywhere
    later is found too."""
    families: dict[str, set[str]] = {}
    for name, module in list(sys.modules.items()):
        if name != "app" and not name.startswith("app."):
            continue
        for wrapper in vars(module).values():
            if not isinstance(wrapper, MetricWrapperBase):
                continue
            base = wrapper._name
            kind = wrapper._type
            if kind == "counter":
                families[f"{base}_total"] = {f"{base}_total"}
            elif kind == "histogram":
                families[base] = {f"{base}_bucket", f"{base}_count", f"{base}_sum"}
            elif kind == "summary":
                families[base] = {base, f"{base}_count", f"{base}_sum"}
            else:
                families[base] = {base}
    assert len(families) > 30
    return families


def readme_metrics() -> set[str]:
    """The metric names of the README's metrics table (its first column)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("### Metrics (`GET /metrics`)", 1)[1].split("\n### ", 1)[0]
    return {
        name
        for line in section.splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([a-z_]+)`", line.split("|")[1])
    }


# PromQL words that look like metric names: binary operators and modifiers.
PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "bool", "offset"}
PROMQL_KEYWORDS |= {"group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects, with or without a ``{…}`` selector: strings,
    label matchers, ranges and grouping labels removed, then every name not called as a
    function."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = re.findall(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:]|\s*\()", expr)
    return {name for name in names if name.lower() not in PROMQL_KEYWORDS}


def test_metric_names_are_found_with_or_without_a_selector() -> None:
    expr = (
        'sum by (le, route) (rate(a_bucket{route!~"/x|by(y)"}[1m])) / ignoring(state) '
        "b_total offset 5m > 0 and on (instance) c unless histogram_quantile(0.9, d[5m]) or 1e3"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d"}


def test_dashboards_are_provisionable() -> None:
    uids, titles, panel_titles = set(), set(), []
    for path in dashboard_files():
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        assert dashboard["uid"] not in uids
        uids.add(dashboard["uid"])
        assert dashboard["title"]
        assert dashboard["title"] not in titles
        titles.add(dashboard["title"])
        assert "id" not in dashboard or dashboard["id"] is None  # provisioning assigns it
        ids = [panel["id"] for panel in panels(dashboard)]
        assert len(ids) == len(set(ids)), path.name
        # Each links to the others: the folder's tag on every one, and a link by that tag.
        assert "fastapi-ops-service" in dashboard["tags"], path.name
        assert {"type": "dashboards", "tags": ["fastapi-ops-service"]}.items() <= (
            dashboard["links"][0].items()
        ), path.name
        panel_titles += [panel["title"] for panel in panels(dashboard)]
        # Laid out without overlaps (a collapsed row's panels are placed when it opens).
        cells: dict[tuple[int, int], str] = {}
        for panel in dashboard["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, panel["title"]
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                    cells[x, y] = panel["title"]
        for panel in panels(dashboard):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target.get("datasource", panel["datasource"])["uid"] == DATASOURCE_UID
    # Panels are found by their title (panel_expr), whichever dashboard they are on.
    assert len(panel_titles) == len(set(panel_titles))


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
    known = {"up"}.union(*exported_samples().values())
    for where, expr in expressions():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        for name in names:
            assert name in known, f"{where}: {name} is not exported by the service"


# Metric families deliberately on no panel, each with the reason. Empty: every family the
# service exports has one. A family added later fails the test below until it gets a
# panel, or an entry here saying why it needs none.
UNCHARTED: dict[str, str] = {}


def uncharted(families: Mapping[str, set[str]], exprs: list[tuple[str, str]]) -> list[str]:
    """The families none of ``exprs`` reads."""
    queried = set().union(*(metric_names(expr) for _, expr in exprs))
    return sorted(family for family, samples in families.items() if not samples & queried)


def test_every_exported_metric_is_on_a_dashboard() -> None:
    """The families are the code's (every module of the service) and the README's table:
    an SRE paged at night has only the dashboards, so a metric without a panel is one
    nobody sees."""
    families = exported_samples()
    # A README name the code lacks is test_metrics' failure; here it is one more to chart.
    families |= {name: {name} for name in readme_metrics() - set(families)}
    missing = [name for name in uncharted(families, expressions()) if name not in UNCHARTED]
    assert missing == [], f"no dashboard panel reads {missing}; add one, or to UNCHARTED"
    # An exclusion names an exported family that no panel reads, or it is stale.
    assert set(UNCHARTED) <= set(families)
    assert set(UNCHARTED) <= set(uncharted(families, expressions()))


def test_a_metric_without_a_panel_fails_the_coverage_check() -> None:
    families = {**exported_samples(), "new_feature_events_total": {"new_feature_events_total"}}
    assert uncharted(families, expressions()) == ["new_feature_events_total"]


# Grafana unit ids (its valueFormats) the dashboards use: a typo shows raw numbers.
UNITS = {"short", "percentunit", "s", "bytes", "Bps", "reqps", "ops", "cps"}
# Families per worker (labelled ``worker``, its gunicorn slot) and of the host (one
# worker samples them: never per worker, never multiplied by the worker count).
PER_WORKER = re.compile(r"\bapp_(?:worker_\w+|system_sample_failures_total)")
HOST = re.compile(r"\bapp_host_\w+")


def test_panels_have_units_legends_and_follow_the_zoom() -> None:
    for path in dashboard_files():
        for panel in panels(json.loads(path.read_text(encoding="utf-8"))):
            if panel["type"] == "row":
                continue
            where = f"{path.name}: {panel['title']}"
            assert panel["description"], where
            assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, where
            for target in panel["targets"]:
                expr, legend = target["expr"], target["legendFormat"]
                assert legend, where
                # Windows follow Grafana's: a rate over $__rate_interval, a count over the
                # time range; a fixed [5m] would not follow the zoom or the scrape interval.
                for window in re.findall(r"\[([^\]]*)\]", expr):
                    assert window in ("$__rate_interval", "$__range"), (where, expr)
                if "up{" not in expr:
                    assert 'job="api"' in expr, (where, expr)
                if HOST.search(expr):
                    assert "worker" not in expr + legend, (where, expr)
                # A per-worker family is drawn per worker, or reduced to one value (a stat).
                if PER_WORKER.search(expr) and panel["type"] == "timeseries":
                    assert "{{worker}}" in legend, (where, legend)
                    if re.match(r"(sum|avg|max|min|count)\b", expr):
                        assert "by (instance, worker)" in expr, (where, expr)


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
    """The query of the panel ``title`` (its ``legend`` one, if several), on whichever
    dashboard it is, Grafana variables replaced as for promtool."""
    (panel,) = (
        panel
        for path in dashboard_files()
        for panel in panels(json.loads(path.read_text(encoding="utf-8")))
        if panel["title"] == title
    )
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
def scraped_service(tmp_path: Path, **settings: str) -> Iterator[tuple[str, Prometheus]]:
    """The service (``python -m app serve`` on SQLite under ``tmp_path``, with ``settings``)
    and the real prometheus scraping it every second: the service's base URL and the
    prometheus."""
    with (
        sqlite_server(tmp_path, tmp_path / "server.log", **settings) as base,
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


# --- the resources and features dashboards on the real service after traffic -------------

NEW_DASHBOARDS = ("service-resources.json", "service-features.json")
CHAT = "/api/v1/ws/chat/lobby"
CHAT_ROUTE = "/api/v1/ws/chat/{room}"


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def tokens(base: str, username: str, password: str = PASSWORD) -> httpx2.Response:
    return httpx2.post(
        f"{base}/api/v1/auth/token", data={"username": username, "password": password}
    )


@contextmanager
def chat(base: str, token: str | None = None, query: str = "") -> Iterator[ClientConnection]:
    """A chat socket in the lobby, past its history and its own join."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with ws_connect(
        f"ws://{base.removeprefix('http://')}{CHAT}{query}",
        additional_headers=headers,
        proxy=None,
        open_timeout=10,
    ) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "history"
        assert json.loads(ws.recv(timeout=10))["type"] == "join"
        yield ws


def test_the_resources_and_features_panels_show_the_traffic(tmp_path: Path) -> None:
    """One service and one prometheus for every panel: before traffic, every series a panel
    needs at 0 is scraped (a series born with its first event shows no increase); then
    logins, a refresh-token reuse, an upload, cache lookups, sockets and a refusal. After
    that every panel of the two dashboards has data, and the key ones the traffic."""
    settings = {
        # A failure budget of 2: the third wrong password is refused (locked, a 429). Per
        # day: the sliding window forgets a share of the failures at a window's boundary.
        "APP_RATE_LIMIT_LOGIN_FAILURES": "2/day",
        "APP_SYSTEM_METRICS_INTERVAL_SECONDS": "0.5",
        "APP_CACHE_LIST_TTL_SECONDS": "600",  # the page a miss stored is still there
    }
    with scraped_service(tmp_path, **settings) as (base, prometheus), ExitStack() as sockets:
        api = 'job="api"'
        prometheus.wait_until(f"app_host_cpu_utilisation_ratio{{{api}}}", "a host sample")
        prometheus.wait_until(
            f"count(rate_limit_rejections_total{{{api}}} == 0) == 6", "the limits' series at 0"
        )
        alice, bob = signed_up(base, "alice"), signed_up(base, "bob")
        # A cache miss, and the route's HTTP series created before the scrape below.
        assert httpx2.get(f"{base}/api/v1/items").status_code == 200
        # Alice's socket creates the route's series; Bob's, after a scrape, counts.
        sockets.enter_context(chat(base, alice))
        sockets_open = f'websocket_connections_active{{{api},route="{CHAT_ROUTE}"}}'
        prometheus.wait_until(f"{sockets_open} == 1", "the socket scraped")
        bob_socket = sockets.enter_context(chat(base, bob))
        bob_socket.send(json.dumps({"type": "message", "content": "hello"}))
        assert json.loads(bob_socket.recv(timeout=10))["type"] == "message"
        with pytest.raises(InvalidStatus), chat(base, query=f"?token={alice}"):
            pass  # a token in the URL: refused with a 403 before the handshake

        # Carol's session is revoked by the reuse: not one whose socket the test holds.
        carol = {"email": "carol@example.com", "username": "carol", "password": PASSWORD}
        assert httpx2.post(f"{base}/api/v1/auth/register", json=carol).status_code == 201
        refresh = tokens(base, "carol").json()["refresh_token"]
        for outcome in ("success", "reuse_detected"):
            response = httpx2.post(f"{base}/api/v1/auth/refresh", json={"refresh_token": refresh})
            assert response.status_code == (200 if outcome == "success" else 401), outcome
        guesses = []
        while 429 not in guesses and len(guesses) < 5:
            guesses.append(tokens(base, "bob", "wrong password").status_code)
        assert guesses[-1] == 429
        assert set(guesses[:-1]) == {401}
        headers = {"Authorization": f"Bearer {bob}"}
        upload = httpx2.post(
            f"{base}/api/v1/files",
            files={"file": ("pic.png", png(), "image/png")},
            headers=headers,
        )
        assert upload.status_code == 201, upload.text
        assert httpx2.get(f"{base}/api/v1/items").status_code == 200  # a hit

        for scraped in (
            f"{sockets_open} == 2",
            f'auth_logins_total{{{api},outcome="locked"}} == 1',
            f'uploads_total{{{api},outcome="ok"}} == 1',
            f'cache_requests_total{{{api},result="hit"}} == 1',
            f'background_tasks_total{{{api},task="audit",outcome="success"}} > 0',
        ):
            prometheus.wait_until(scraped, scraped)

        # Every query of the two dashboards has data; the data volume's IO only when the
        # data directory is on a block device (not tmpfs, overlay or NFS).
        no_block_device = block_device_of(tmp_path / "data") is None
        for where, expr in expressions():
            if not where.startswith(NEW_DASHBOARDS):
                continue
            if "app_host_disk_io_bytes_total" in expr and no_block_device:
                assert prometheus.query(expr) == [], where
                continue
            assert prometheus.query(expr), f"{where}: no data from {expr}"

        def by(title: str, *labels: str) -> dict[tuple[str, ...], float]:
            return prometheus.values(panel_expr(title), *labels)

        logins = by("Logins by outcome", "outcome")
        assert all(logins[(o,)] > 0 for o in ("success", "invalid_credentials", "locked"))
        refreshes = by("Token refreshes by outcome", "outcome")
        assert refreshes[("success",)] > 0
        assert refreshes[("reuse_detected",)] > 0
        # increase() extrapolates a little past the last sample.
        assert by("Refresh-token reuse")[()] == pytest.approx(1, rel=0.2)
        assert 0 < by("Failed logins")[()] < 1
        assert by("Rate-limit rejections by limit", "limit")[("login-failures",)] > 0
        uploads = by("Uploads by outcome", "outcome")
        assert uploads[("ok",)] > 0
        assert uploads[("no_space",)] == 0
        assert by("Upload bytes accepted")[()] > 0
        p95 = prometheus.values(panel_expr("Thumbnail duration", "p95"))[()]
        assert 0 < p95 <= 10
        lookups = by("Cache lookups by result", "result")
        assert lookups[("hit",)] > 0
        assert lookups[("miss",)] > 0
        assert lookups[("error",)] == 0
        assert 0 < by("Cache hit ratio")[()] < 1
        assert by("Open WebSocket connections", "route") == {(CHAT_ROUTE,): 2}
        assert by("WebSocket connections opened", "route")[(CHAT_ROUTE,)] > 0
        refusals = by("WebSocket refusals by reason", "reason")
        assert refusals[("credentials_in_url",)] > 0
        assert refusals[("socket_cap",)] == 0
        messages = by("WebSocket messages", "route", "direction")
        assert messages[(CHAT_ROUTE, "received")] > 0
        assert messages[(CHAT_ROUTE, "sent")] > 0
        jobs = by("Background jobs by task and outcome", "task", "outcome")
        assert jobs[("audit", "success")] > 0
        assert jobs[("audit", "failure")] == 0
        assert by("Background jobs lost")[()] == 0

        # Resources: the host once, not per worker; each worker under its slot.
        instance = prometheus.targets["api"]
        assert by("Host CPU utilisation", "instance").keys() == {(instance,)}
        assert 0 <= by("Host CPU")[()] <= 1
        assert 0 < by("Host memory available")[()] < 1
        assert 0 < by("Data volume free")[()] < 1
        assert by("Load average", "period").keys() == {("1m",), ("5m",), ("15m",)}
        assert by("Network", "direction").keys() == {("receive",), ("transmit",)}
        for title in ("Worker resident memory", "Open file descriptors", "Threads"):
            values = by(title, "instance", "worker")
            assert values.keys() == {(instance, "0")}, title
            assert values[instance, "0"] > 0, title
        assert by("Worker CPU", "worker")[("0",)] > 0
        assert by("Event-loop lag", "worker")[("0",)] >= 0
        assert by("Failed system samples per worker", "worker") == {("0",): 0}
        # The HTTP body panels of the overview count the upload and the pages.
        for legend in ("received", "sent"):
            body = prometheus.values(panel_expr("Body bytes received and sent", legend))
            assert body[()] > 0, legend
        per_route = by("Response bytes per route", "method", "route")
        assert per_route[("GET", "/api/v1/items")] > 0
