"""How long ``GET /metrics`` takes under gunicorn with 4 workers (multiprocess mode).

Why: with ``PROMETHEUS_MULTIPROC_DIR`` every scrape reads and merges all the workers'
mmap files and formats every series (app/observability/exposition.py), so its cost grows
with workers x routes x statuses. A scrape that gets slow delays the scraper and occupies
a worker thread. Target: median under 50 ms.

What: the real service under ``gunicorn -c deploy/gunicorn.conf.py`` (4 workers, SQLite
migrated first, JSON logs to a file). Once every worker is up, every operation in
``/openapi.json`` is called anonymously, as a user and as an admin, with small ints for
path parameters and ``{}`` as body (mostly 4xx — every status is a new series), over new
connections from several threads so every worker serves traffic; plus unknown paths,
wrong methods, probes and the docs. Then 30 scrapes are timed from the client (new
connection each, wall time to the last byte) in the Prometheus text format, and 30 with
the ``Accept`` header Prometheus itself sends (OpenMetrics). The same files rendered
in-process, without HTTP, show how much of the time is rendering.

Run from the repository root: ``.venv/bin/python bench/metrics_render.py``.
"""

import argparse
import http.client
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from _common import (
    REPO,
    Round,
    clean_env,
    command_line,
    fmt_interval,
    free_port,
    load_average,
    machine,
    now,
    round_interval,
    run_cli,
    terminate,
    verdict,
    wait_until,
    write_section,
)

CONFIG = REPO / "deploy" / "gunicorn.conf.py"
TARGET_MS = 50.0
# What Prometheus (2.x/3.x) sends by default: it prefers OpenMetrics.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
ADMIN = ("bench-admin", "admin@example.com", "bench-admin-password")
USER = ("bench-user", "user@example.com", "bench-user-password")
# Beyond the OpenAPI operations: unknown paths, wrong methods, probes, docs.
EXTRA_REQUESTS = [
    ("GET", "/no/such/page"),
    ("GET", "/api/v1/nope"),
    ("GET", "/wp-login.php"),
    ("GET", "/.env"),
    ("GET", "/api/v1/items/not-a-number"),
    ("PUT", "/api/v1/items"),
    ("DELETE", "/health/live"),
    ("GET", "/health/live"),
    ("GET", "/health/ready"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
]


@dataclass
class Measured:
    statuses: Counter[int]
    served: int
    files: tuple[int, int]
    text_ms: list[float]
    open_ms: list[float]
    render_ms: list[float]
    text_body: bytes
    open_body: bytes


@dataclass
class Reply:
    status: int
    body: bytes
    seconds: float


class Client:
    """One new connection per request, as a scraper or a fresh client would open."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.statuses: Counter[int] = Counter()
        self._lock = threading.Lock()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        start = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        with self._lock:
            self.statuses[response.status] += 1
        return Reply(response.status, data, time.perf_counter() - start)

    def json(self, method: str, path: str, payload: object, token: str | None = None) -> Reply:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.request(method, path, json.dumps(payload).encode(), headers)

    def token(self, username: str, password: str) -> str:
        form = urllib.parse.urlencode({"username": username, "password": password}).encode()
        reply = self.request(
            "POST",
            "/api/v1/auth/token",
            form,
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        if reply.status != 200:
            raise RuntimeError(f"login failed: {reply.status} {reply.body[:200]!r}")
        return str(json.loads(reply.body)["access_token"])


def operations(spec: dict) -> list[tuple[str, str]]:
    """(method, path template) of every operation; DELETEs last, so the rest finds data."""
    found = [
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    ]
    return sorted(found, key=lambda operation: operation[0] == "DELETE")


def exercise(client: Client, threads: int) -> None:
    """Call every route in several ways, from several threads."""
    spec = json.loads(client.request("GET", "/openapi.json").body)
    username, email, password = USER
    client.json(
        "POST",
        "/api/v1/auth/register",
        {"email": email, "username": username, "password": password},
    )
    tokens = [None, client.token(username, password), client.token(ADMIN[0], ADMIN[2])]
    client.json("POST", "/api/v1/items", {"title": "bench", "price": 1.5}, tokens[1])

    def call(method: str, template: str, n: int, token: str | None) -> None:
        path = re.sub(r"\{[^}]+\}", str(n), template)
        if method in {"POST", "PUT", "PATCH"}:
            client.json(method, path, {}, token)
        else:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            client.request(method, path, headers=headers)

    ops = operations(spec)
    with ThreadPoolExecutor(threads) as pool:
        for deletes in (False, True):
            jobs = [
                pool.submit(call, method, template, n, token)
                for method, template in ops
                if (method == "DELETE") == deletes
                for token in tokens
                for n in (1, 2, 3)
            ]
            jobs += [
                pool.submit(client.request, method, path)
                for method, path in EXTRA_REQUESTS * 3
                if not deletes
            ]
            for job in jobs:
                job.result()


def workers_with_traffic(multiproc: Path, workers: list[psutil.Process]) -> int:
    # A worker writes histogram_<pid>.db once it has served an HTTP request.
    return sum((multiproc / f"histogram_{worker.pid}.db").exists() for worker in workers)


def time_scrapes(client: Client, count: int, accept: str | None) -> tuple[list[float], bytes]:
    headers = {"Accept": accept} if accept else {}
    client.request("GET", "/metrics", headers=headers)  # warm-up, not timed
    replies = [client.request("GET", "/metrics", headers=headers) for _ in range(count)]
    if any(reply.status != 200 for reply in replies):
        raise RuntimeError("a scrape failed")
    return [reply.seconds * 1000 for reply in replies], replies[-1].body


def time_in_process(multiproc: Path, count: int) -> list[float]:
    timings = []
    for _ in range(count):
        start = time.perf_counter()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(multiproc))
        generate_latest(registry)
        timings.append((time.perf_counter() - start) * 1000)
    return timings


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def summary(values: list[float]) -> str:
    return (
        f"{statistics.median(values):.1f} | {percentile(values, 0.95):.1f} | "
        f"{min(values):.1f} | {max(values):.1f}"
    )


def describe(body: bytes) -> tuple[int, int, int, list[tuple[str, int]]]:
    """Lines, samples, metric families and the families with the most samples."""
    lines = body.decode().splitlines()
    samples = [line for line in lines if line and not line.startswith("#")]
    families = [line.split()[2] for line in lines if line.startswith("# TYPE ")]
    per_family: Counter[str] = Counter()
    for sample in samples:
        name = sample.split("{", 1)[0].split(" ", 1)[0]
        family = next((f for f in families if name == f or name.startswith(f + "_")), name)
        per_family[family] += 1
    return len(lines), len(samples), len(families), per_family.most_common(5)


def stop(process: subprocess.Popen[bytes], workers: list[psutil.Process]) -> None:
    terminate(process, timeout=40)  # gunicorn: graceful shutdown of the workers
    for worker in workers:  # only ours: psutil checks the pid was not reused
        if worker.is_running():
            worker.kill()


def measure(args: argparse.Namespace, workdir: Path) -> Measured:
    data, multiproc, log = workdir / "data", workdir / "prometheus", workdir / "gunicorn.log"
    data.mkdir()
    multiproc.mkdir()
    port = free_port()
    env = clean_env(
        WEB_CONCURRENCY=str(args.workers),
        GUNICORN_BIND=f"127.0.0.1:{port}",
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
        APP_ENV="test",
        APP_DATA_DIR=str(data),
        APP_DATABASE_URL=f"sqlite+aiosqlite:///{data}/app.db",
        APP_LOG_FORMAT="json",
    )
    run_cli(["migrate"], env, workdir)
    username, email, password = ADMIN
    superuser = ["create-superuser", "--email", email, "--username", username]
    run_cli(superuser, env | {"APP_SUPERUSER_PASSWORD": password}, workdir)

    client = Client(port)
    workers: list[psutil.Process] = []
    with log.open("wb") as out:
        gunicorn = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(CONFIG)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    try:

        def ready() -> bool:
            if gunicorn.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{log.read_text()}")
            workers[:] = psutil.Process(gunicorn.pid).children()
            # Each worker's system sampler writes its gauges once its lifespan has started.
            sampling = all(
                (multiproc / f"gauge_livemostrecent_{worker.pid}.db").exists() for worker in workers
            )
            if len(workers) != args.workers or not sampling:
                return False
            try:
                return client.request("GET", "/health/ready").status == 200
            except OSError:
                return False

        wait_until(f"gunicorn with {args.workers} workers", ready, timeout=120)
        exercise(client, args.threads)
        tries = 0
        while workers_with_traffic(multiproc, workers) < len(workers) and tries < 200:
            client.request("GET", "/health/live")
            tries += 1
        served = workers_with_traffic(multiproc, workers)
        statuses = Counter(client.statuses)
        text_ms, text_body = time_scrapes(client, args.scrapes, None)
        open_ms, open_body = time_scrapes(client, args.scrapes, PROMETHEUS_ACCEPT)
        render_ms = time_in_process(multiproc, args.scrapes)
        files = list(multiproc.glob("*.db"))
        files_bytes = sum(file.stat().st_size for file in files)
    finally:
        stop(gunicorn, workers)
    return Measured(
        statuses,
        served,
        (len(files), files_bytes),
        text_ms,
        open_ms,
        render_ms,
        text_body,
        open_body,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--threads", type=int, default=8, help="client threads for the traffic")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()

    started = now().strftime("%Y-%m-%d %H:%M:%S UTC")
    load = load_average()
    begin = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-metrics-render-"))
    try:
        measured = measure(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    text = report(measured, args, started, load, time.monotonic() - begin)
    print(text)
    if not args.no_write:
        write_section("metrics_render", text)


def median_ms(scrapes: Sequence[Round]) -> float:
    return statistics.median(scrape[0] for scrape in scrapes)


def report(m: Measured, args: argparse.Namespace, started: str, load: str, seconds: float) -> str:
    timings = {
        "client, Prometheus text (`Accept` absent)": m.text_ms,
        f"client, OpenMetrics (`Accept: {PROMETHEUS_ACCEPT.split(',')[0]},…`)": m.open_ms,
        "in-process render of the same files (no HTTP)": m.render_ms,
    }
    scrapes = [(ms,) for ms in m.text_ms]
    median = median_ms(scrapes)
    interval = round_interval(scrapes, median_ms)
    lines, samples, families, top = describe(m.text_body)
    open_lines = len(m.open_body.decode().splitlines())
    status_list = ", ".join(f"{status}: {count}" for status, count in sorted(m.statuses.items()))
    rows = ["| scrape | median ms | p95 ms | min ms | max ms |", "|---|---:|---:|---:|---:|"]
    rows += [f"| {name} | {summary(values)} |" for name, values in timings.items()]
    heavy = ", ".join(f"`{name}` {count}" for name, count in top)
    return "\n".join(
        [
            f"## 2. `/metrics` render time, multiprocess mode — {started}",
            "",
            f"Command: `{command_line()}`",
            "",
            machine(
                {
                    "load average at start": load,
                    "setup": f"`gunicorn -c deploy/gunicorn.conf.py`, {args.workers} uvicorn "
                    f"workers on {psutil.cpu_count()} CPUs, SQLite, JSON logs to a file; "
                    f"{args.scrapes} sequential scrapes per row, each on a new connection, "
                    "after one untimed scrape",
                }
            ),
            "",
            *rows,
            "",
            f"**Median scrape (Prometheus text, from the client) = {median:.1f} ms** "
            f"({fmt_interval(interval)}, over resamples of the scrapes) — target < "
            f"{TARGET_MS:.0f} ms: **{verdict(interval, TARGET_MS, at_least=False)}**.",
            "",
            f"- Traffic before the scrapes: {m.statuses.total()} requests on new connections from "
            f"{args.threads} threads, covering every operation in `/openapi.json` (anonymous, "
            f"user, admin; ids 1-3; `{{}}` bodies) plus unknown paths, wrong methods, probes "
            f"and docs. Statuses seen: {status_list}.",
            f"- Workers that served traffic: {m.served} of {args.workers}.",
            f"- Output: {lines} lines, {samples} samples in {families} metric families, "
            f"{len(m.text_body):,} bytes (OpenMetrics: {open_lines} lines, "
            f"{len(m.open_body):,} bytes). Most samples: {heavy}.",
            f"- Multiprocess directory: {m.files[0]} files, {m.files[1] / 1e6:.1f} MB.",
            "",
            "Client time is the wall time from connecting to the last byte, so it includes "
            "the worker's thread hand-off and HTTP; the in-process row is prometheus_client's "
            "MultiProcessCollector + generate_latest over the same files. Noisy machine: "
            "compare rows of this run with each other, not with other runs.",
            "",
            f"Total time: {seconds:.0f} s.",
        ]
    )


if __name__ == "__main__":
    main()
