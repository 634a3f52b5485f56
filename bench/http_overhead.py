"""Per-request server CPU cost of the production middleware stack, against baselines.

Why: the service writes its own HTTP metrics and access log middleware instead of using
prometheus-fastapi-instrumentator (see app/observability/http_metrics.py). This
measures what that stack costs per request compared with a bare FastAPI app and with the
instrumentator, so the choice rests on numbers from this machine. Target: the full
stack's overhead over bare is at most half the instrumentator's.

What: each configuration serves ``GET /ping`` → ``{"ok": true}`` from its own uvicorn
process (one worker, uvloop + httptools, uvicorn's own access log off as in production),
pinned to CPU 0, logging to a file. ``wrk`` pinned to CPU 1 loads it; the server's CPU time
(user + system, psutil) before and after the timed run divided by the requests wrk
completed gives CPU µs per request. Configurations are interleaved and repeated; the
report takes medians. Only ratios within one run are meaningful on a noisy machine.

Configurations. The three of the target are the same trivial app — ``FastAPI()`` (its 4
docs routes) plus ``/ping`` — and differ only in their middleware:

- ``bare``: no middleware;
- ``full``: every middleware the service installs (``app.main.install_middleware``, the
  function ``create_app`` calls: request id, access log with its JSON line, metrics,
  security headers, trusted host), logging configured as in production (JSON, INFO);
- ``instrumentator``: ``Instrumentator(registry=…).instrument(app)`` instead, with a
  registry of its own (in the default one the service's metrics, registered on import,
  would clash with its names, and it would silently record nothing).

Diagnostics, not part of the target:

- ``full-quiet-log``: ``full`` with the log level at WARNING, so the access line is
  dropped before it is rendered or written (the middleware still runs);
- ``service-routes``: ``create_app(settings)`` without any middleware, plus ``/ping``
  after the service's whole route table, so ``service-routes - bare`` is what FastAPI's
  router costs to reach the last route: a property of the route table, not of middleware;
- ``service-full``: ``create_app(settings)`` plus ``/ping`` — the production app as it is;
- ``service-instrumentator`` (optional, to keep the default run near 3 minutes):
  ``service-routes`` plus the instrumentator, to compare with ``service-full`` on the
  service's real route table.

After the wrk rounds, the same apps (all but ``service-*``) are measured once more in
process: their ASGI interface called in a loop, without HTTP, in a process of each
configuration's own pinned to CPU 0 — a low-noise diagnostic of the middleware alone,
reported beside the target, not instead of it. Last, where valgrind is installed, the
instructions each of those apps executes per request, counted by valgrind (cachegrind,
no cache simulation) over two runs of N and 2N requests: deterministic, so free of the
machine's noise, but blind to what an instruction costs (cache misses, the kernel).

Run from the repository root: ``.venv/bin/python bench/http_overhead.py``.
"""

import argparse
import http.client
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from fastapi import FastAPI

from _common import (
    BOOTSTRAP_LEVEL,
    Round,
    await_server,
    clean_env,
    command_line,
    fmt_interval,
    free_port,
    load_average,
    machine,
    now,
    require_tools,
    round_interval,
    terminate,
    verdict,
    write_section,
)

REQUIRED = ("bare", "full", "instrumentator")
DIAGNOSTIC = ("full-quiet-log", "service-routes", "service-full")
OPTIONAL = ("service-instrumentator",)
CONFIGS = REQUIRED + DIAGNOSTIC + OPTIONAL
DEFAULT_CONFIGS = REQUIRED + DIAGNOSTIC
WITH_REQUEST_ID = ("full", "full-quiet-log", "service-full")
# Configurations whose log must hold one access line per request, and one that must hold none.
LOGGING_EVERY_REQUEST = ("full", "service-full")
QUIET = "full-quiet-log"
SERVER_CPU = "0"
CLIENT_CPU = "1"
TARGET_RATIO = 0.5


@dataclass
class Run:
    config: str
    requests: int
    seconds: float
    cpu_seconds: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu_seconds / self.requests * 1e6

    @property
    def utilisation(self) -> float:
        return self.cpu_seconds / self.seconds


@dataclass
class Server:
    config: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ping"

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system


# --- the server side (a child process: `http_overhead.py _serve CONFIG PORT DATA_DIR`) ---


async def ping() -> dict[str, bool]:
    return {"ok": True}


def build_app(config: str, data_dir: Path) -> FastAPI:
    from app.main import create_app, install_logging, install_middleware
    from app.settings import Settings

    settings = Settings(
        _env_file=None,
        env="test",
        data_dir=data_dir,
        log_format="json",
        log_level="WARNING" if config == QUIET else "INFO",
    )
    if config.startswith("service"):
        application = create_app(settings)
        if config != "service-full":
            application.user_middleware.clear()  # the stack is built on the first request
    else:
        application = FastAPI()
        if config in ("full", QUIET):
            # As create_app does: access lines are rendered by the service's logging.
            install_logging(settings)
            # Tracing off, as in production unless an OTLP endpoint is configured.
            install_middleware(application, settings, traced=False)
    if config in ("instrumentator", "service-instrumentator"):
        from prometheus_client import CollectorRegistry
        from prometheus_fastapi_instrumentator import Instrumentator

        # A registry of its own: importing app.main above registered the service's
        # http_requests_total & co. in the default one, and on a name clash the
        # instrumentator silently records nothing at all (it did, in runs before
        # 2026-11-29). Kept on the app so that the set-up checks can read it.
        application.state.instrumentator_registry = CollectorRegistry()
        Instrumentator(registry=application.state.instrumentator_registry).instrument(application)
    application.add_api_route("/ping", ping, methods=["GET"])
    return application


def serve(config: str, port: int, data_dir: Path) -> None:
    import uvicorn
    from app.server import SERVER_OPTIONS

    # As `python -m app serve` does: the app logs (and writes access lines) itself, and
    # the server runs with the service's options (one response header fewer for all).
    uvicorn.run(
        build_app(config, data_dir),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        **SERVER_OPTIONS,
    )


# --- in process (a child: `http_overhead.py _drive CONFIG REQUESTS DATA_DIR RESULT`) ---


def drive(config: str, requests: int, data_dir: Path, result: Path) -> None:
    """Call the app's ASGI interface ``requests`` times, without a server or a socket, and
    write the process's CPU µs per request (all threads: the access lines' rendering and
    writing included) to ``result``. What differs between configurations is then only
    their middleware, without the noise of HTTP parsing and the kernel's network path."""
    import uvloop

    application = build_app(config, data_dir)
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": "/ping",
        "raw_path": b"/ping",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"accept", b"*/*")],
    }
    request = {"type": "http.request", "body": b"", "more_body": False}
    # Counted, not kept: holding every response would grow the heap (and the garbage
    # collector's work) while the loop is timed.
    statuses: Counter[int] = Counter()
    last_start: list[dict[str, Any]] = [{}]

    async def receive() -> dict[str, Any]:
        return request

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses[message["status"]] += 1
            last_start[0] = message

    async def serve(count: int) -> None:
        for _ in range(count):
            # A fresh scope per request, as the server makes one (the stack writes to it).
            await application({**scope, "headers": list(scope["headers"])}, receive, send)

    loop = uvloop.new_event_loop()
    loop.run_until_complete(serve(max(requests // 5, 1000)))  # warm-up
    before = time.process_time()
    loop.run_until_complete(serve(requests))
    cpu_us = (time.process_time() - before) / requests * 1e6
    loop.close()
    # Guards the set-up, as the HTTP runs do: every request was answered, the production
    # middleware ran exactly where it should, and the instrumentator really counted.
    headers = {name for name, _ in last_start[0]["headers"]}
    if set(statuses) != {200}:
        raise RuntimeError(f"{config}: statuses {dict(statuses)}")
    if (b"x-request-id" in headers) != (config in WITH_REQUEST_ID):
        raise RuntimeError(f"{config}: unexpected headers {sorted(headers)}")
    if config == "instrumentator":
        counted = application.state.instrumentator_registry.get_sample_value(
            "http_requests_total", {"handler": "/ping", "method": "GET", "status": "2xx"}
        )
        if counted != statuses.total():
            raise RuntimeError(f"instrumentator counted {counted} of {statuses.total()} requests")
    result.write_text(f"{cpu_us}\n")


# --- the driver ---


def start(config: str, workdir: Path) -> Server:
    port = free_port()
    data_dir = workdir / config
    data_dir.mkdir()
    log = workdir / f"{config}.log"
    command = [
        "taskset",
        "-c",
        SERVER_CPU,
        sys.executable,
        str(Path(__file__).resolve()),
        "_serve",
        config,
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, str(port), str(data_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=clean_env(),
        )

    def has_the_middleware(response: http.client.HTTPResponse) -> None:
        # Guards the set-up: the production middleware runs exactly where it should.
        if (response.getheader("X-Request-ID") is not None) != (config in WITH_REQUEST_ID):
            raise RuntimeError(f"{config}: unexpected headers {response.getheaders()}")

    await_server(config, process, log, port, "/ping", has_the_middleware)
    return Server(config, port, process, log)


def stop(server: Server) -> None:
    terminate(server.process)


def in_process(config: str, requests: int, workdir: Path, round_number: int) -> float:
    """CPU µs per request of ``config`` driven in process (``drive``), in a child of its
    own pinned to the server's CPU: each configuration sets up logging and metrics of its
    own, as its server does."""
    data_dir = workdir / f"drive-{config}-{round_number}"
    data_dir.mkdir()
    result = data_dir / "cpu_us"
    log = workdir / f"drive-{config}.log"
    command = [
        "taskset", "-c", SERVER_CPU, sys.executable, str(Path(__file__).resolve()),
        "_drive", config, str(requests), str(data_dir), str(result),
    ]  # fmt: skip
    with log.open("ab") as out:
        subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=clean_env(), check=True
        )
    return float(result.read_text())


def wrk(url: str, seconds: int, connections: int) -> tuple[int, float]:
    """Completed requests and the duration wrk reports; refuses errors and non-2xx."""
    output = subprocess.run(
        ["taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", output)
    if not found or "Non-2xx" in output or "Socket errors" in output:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[found.group(3)]
    return int(found.group(1)), float(found.group(2)) * scale


def measure(server: Server, seconds: int, warmup: int, connections: int) -> Run:
    wrk(server.url, warmup, connections)
    before = server.cpu_seconds()
    requests, elapsed = wrk(server.url, seconds, connections)
    after = server.cpu_seconds()
    return Run(server.config, requests, elapsed, after - before)


def report(
    runs: list[Run], configs: list[str], args: argparse.Namespace, started: str, load: str
) -> str:
    by_config = {config: [run for run in runs if run.config == config] for config in configs}
    median_cpu = {c: statistics.median(r.cpu_us for r in rs) for c, rs in by_config.items()}
    bare = median_cpu["bare"]
    overhead = {config: cpu - bare for config, cpu in median_cpu.items()}
    rounds = [
        (bare_run.cpu_us, full.cpu_us, instr.cpu_us)
        for bare_run, full, instr in zip(
            by_config["bare"], by_config["full"], by_config["instrumentator"], strict=True
        )
    ]
    ratio = target_ratio(rounds)
    interval = round_interval(rounds, target_ratio)
    rows = [
        "| config | req/s | server CPU µs/req | overhead over bare µs/req | server CPU busy |",
        "|---|---:|---:|---:|---:|",
    ]
    for config, config_runs in by_config.items():
        rps = statistics.median(run.rps for run in config_runs)
        busy = statistics.median(run.utilisation for run in config_runs)
        rows.append(
            f"| {config} | {rps:,.0f} | {median_cpu[config]:.1f} | "
            f"{overhead[config]:+.1f} | {busy:.0%} |"
        )
    per_run = ["| config | CPU µs/req of each run | req/s of each run |", "|---|---|---|"]
    for config, config_runs in by_config.items():
        cpu = ", ".join(f"{run.cpu_us:.1f}" for run in config_runs)
        rps = ", ".join(f"{run.rps:,.0f}" for run in config_runs)
        per_run.append(f"| {config} | {cpu} | {rps} |")
    notes = [
        f"**(full - bare) / (instrumentator - bare) = {overhead['full']:.1f} / "
        f"{overhead['instrumentator']:.1f} = {fmt_ratio(ratio)}** ({fmt_interval(interval)}) "
        f"— target ≤ {TARGET_RATIO}: **{verdict(interval, TARGET_RATIO, at_least=False)}**.",
        "",
        f"The interval: the ratio's {BOOTSTRAP_LEVEL:.0%} range over resamples of the "
        "rounds (whole rounds, with replacement), i.e. how far this machine's noise moves "
        "it; the target counts as met only if all of the interval is within it.",
    ]
    per_round = [fmt_ratio(full - bare, instr - bare) for bare, full, instr in rounds]
    notes.append(f"The same ratio within each round: {', '.join(per_round)}.")
    notes += breakdown(median_cpu)
    return "\n".join(
        [
            f"## 1. Per-request cost of the middleware stack — {started}",
            "",
            f"Command: `{command_line()}`",
            "",
            machine(
                {
                    "wrk": _wrk_version(),
                    "load average at start": load,
                    "setup": f"server pinned to CPU {SERVER_CPU} (one uvicorn worker, uvloop "
                    f"+ httptools, logs to a file), `taskset -c {CLIENT_CPU} wrk -t1 "
                    f"-c{args.connections} -d{args.duration:g}s` after a {args.warmup:g} s "
                    f"warm-up; {args.repeats} interleaved rounds, medians",
                }
            ),
            "",
            *rows,
            "",
            *notes,
            "",
            "Server CPU µs/req = (user + system CPU time of the uvicorn process during the "
            "timed run) / requests wrk completed; it counts everything the server does "
            "(HTTP parsing, routing, middleware, logging), so the *overhead* column is "
            "what each configuration adds to a bare app. `server CPU busy` near 100 % means "
            "the server, not wrk, was the bottleneck. Machines here are noisy: only the "
            "ratios within this run mean anything; absolute numbers move between runs. A "
            "load average above ~0.5 at the start means other work shared the CPUs.",
            "",
            "`bare`, `full` and `instrumentator` are the same app (`FastAPI()`, its 4 docs "
            "routes and `/ping`) and differ only in their middleware: `full` gets every "
            "middleware `create_app` installs (`app.main.install_middleware`) with the "
            "shipped defaults (`APP_ALLOWED_HOSTS=*`, CORS off) and JSON access lines at "
            "INFO; `instrumentator` records into a registry of its own (checked: in process "
            "it counted every request; before 2026-11-29 it shared the service's registry "
            "and recorded nothing, see bench/README.md). The `service-*` configurations "
            "put `/ping` after the service's real route table; what FastAPI's router "
            "spends to get there is a property of the route table, not of the middleware, "
            "so they are diagnostics, not the target.",
            "",
            "Each run:",
            "",
            *per_run,
        ]
    )


def report_in_process(cpu: dict[str, list[float]], requests: int) -> str:
    """The diagnostic without HTTP: medians, the target's ratio, the ratio of each round."""
    median = {config: statistics.median(values) for config, values in cpu.items()}
    overhead = {config: value - median["bare"] for config, value in median.items()}
    rows = [
        "| config | CPU µs/req | overhead over bare µs/req | CPU µs/req of each run |",
        "|---|---:|---:|---|",
    ]
    for config, values in cpu.items():
        each = ", ".join(f"{value:.1f}" for value in values)
        rows.append(f"| {config} | {median[config]:.1f} | {overhead[config]:+.1f} | {each} |")
    rounds = list(zip(cpu["bare"], cpu["full"], cpu["instrumentator"], strict=True))
    per_round = [fmt_ratio(full - bare, instr - bare) for bare, full, instr in rounds]
    return "\n".join(
        [
            "In process (diagnostic, not the target): the same apps' ASGI interface called "
            f"directly, {requests:,} requests per run after a warm-up, in a process of each "
            f"configuration's own pinned to CPU {SERVER_CPU}, interleaved rounds; CPU "
            "µs/req = the process's CPU time (all threads, so the access lines' rendering "
            "and writing count) / requests. No HTTP parsing, sockets or kernel network "
            "path: what differs between the rows is their middleware alone, with far less "
            "noise than through wrk — but in a tight loop, where code runs from warm "
            "caches, so every cost is lower than between two real requests.",
            "",
            *rows,
            "",
            f"**In process: (full - bare) / (instrumentator - bare) = "
            f"{overhead['full']:.1f} / {overhead['instrumentator']:.1f} = "
            f"{fmt_ratio(overhead['full'], overhead['instrumentator'])}** "
            f"({fmt_interval(round_interval(rounds, target_ratio))}); each round: "
            f"{', '.join(per_round)}."
            + (
                f" The access line alone (full - {QUIET}): {median['full'] - median[QUIET]:+.1f}"
                f" µs/req, {fmt_ratio(median['full'] - median[QUIET], overhead['instrumentator'])}"
                " of the instrumentator's whole overhead."
                if QUIET in median
                else ""
            ),
        ]
    )


def instructions(config: str, requests: int, workdir: Path) -> float:
    """User-space instructions per request of ``config`` driven in process (``drive``),
    counted by valgrind: the difference between runs of ``requests`` and twice as many,
    whose start, import and warm-up (the same in both) it cancels. Hash seeds are fixed
    so that the two runs differ in nothing else."""
    totals = []
    for count in (requests, 2 * requests):
        data_dir = workdir / f"instructions-{config}-{count}"
        data_dir.mkdir()
        command = [
            "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
            sys.executable, str(Path(__file__).resolve()),
            "_drive", config, str(count), str(data_dir), str(data_dir / "cpu_us"),
        ]  # fmt: skip
        ran = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=workdir,
            env=clean_env(PYTHONHASHSEED="0"),
            check=True,
        )
        found = re.search(r"I\s+refs:\s+([\d,]+)", ran.stderr)
        if found is None:
            raise RuntimeError(f"no instruction count from valgrind:\n{ran.stderr[-2000:]}")
        totals.append(int(found.group(1).replace(",", "")))
    return (totals[1] - totals[0]) / requests


def report_instructions(counts: dict[str, float], requests: int) -> str:
    overhead = {config: count - counts["bare"] for config, count in counts.items()}
    rows = [
        "| config | instructions/req | over bare |",
        "|---|---:|---:|",
        *(
            f"| {config} | {count:,.0f} | {overhead[config]:+,.0f} |"
            for config, count in counts.items()
        ),
    ]
    return "\n".join(
        [
            "Instructions (diagnostic, not the target): the in-process apps under valgrind "
            f"(cachegrind, no cache simulation), user-space instructions of a run of "
            f"{2 * requests:,} requests minus one of {requests:,}, divided by {requests:,}. "
            "Deterministic (the same code gives the same count, whatever else the machine "
            "does), so it says without noise how much work each stack adds; it does not "
            "say what that work costs in time (cache misses, the kernel's part of writing "
            "the access lines), which is what the CPU µs above measure.",
            "",
            *rows,
            "",
            f"**In instructions: (full - bare) / (instrumentator - bare) = "
            f"{overhead['full']:,.0f} / {overhead['instrumentator']:,.0f} = "
            f"{fmt_ratio(overhead['full'], overhead['instrumentator'])}**.",
        ]
    )


def target_ratio(rounds: Sequence[Round]) -> float | None:
    """(full - bare) / (instrumentator - bare) of the medians; rounds hold (bare, full,
    instrumentator)."""
    bare, full, instr = (statistics.median(column) for column in zip(*rounds, strict=True))
    return (full - bare) / (instr - bare) if instr > bare else None


def fmt_ratio(numerator: float | None, denominator: float = 1.0) -> str:
    """A ratio, or why there is none (a baseline within noise of zero)."""
    if numerator is None or denominator <= 0:
        return "n/a (denominator ≤ 0: within noise)"
    return f"{numerator / denominator:.2f}"


def breakdown(cpu: dict[str, float]) -> list[str]:
    """Where ``full``'s overhead goes, and the diagnostics that ran (differences of medians)."""
    lines = ["", "Diagnostics (differences of medians, µs/req):", ""]
    if QUIET in cpu:
        lines += [
            f"- rendering and writing the JSON access line (full - {QUIET}): "
            f"{cpu['full'] - cpu[QUIET]:+.1f}",
            f"- the rest of the stack, line dropped before rendering ({QUIET} - bare): "
            f"{cpu[QUIET] - cpu['bare']:+.1f}",
        ]
    if "service-routes" in cpu:
        routes = cpu["service-routes"]
        lines.append(
            f"- FastAPI's router reaching `/ping` after the service's route table, no "
            f"middleware (service-routes - bare): {routes - cpu['bare']:+.1f}"
        )
        if "service-full" in cpu:
            lines.append(
                f"- the production app as it is: service-full - bare "
                f"{cpu['service-full'] - cpu['bare']:+.1f}, of which the middleware on that "
                f"route table (service-full - service-routes) {cpu['service-full'] - routes:+.1f}"
            )
        if "service-instrumentator" in cpu:
            lines.append(
                f"- the instrumentator on the service's route table (service-instrumentator"
                f" - service-routes): {cpu['service-instrumentator'] - routes:+.1f}"
            )
    return lines if len(lines) > 3 else []


def _access_lines(log: Path) -> int:
    with log.open("rb") as lines:
        return sum(1 for line in lines if b'"logger":"app.access"' in line)


def _wrk_version() -> str:
    output = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    return output.split("[")[0].strip() or "unknown"


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "_serve":
        serve(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
        return
    if len(sys.argv) == 6 and sys.argv[1] == "_drive":
        drive(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Many short rounds rather than a few long ones: the noise here comes and goes in
    # spells of seconds, and only rounds resampled show how far it moves the ratio.
    parser.add_argument("--duration", type=int, default=2, help="seconds per timed run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per run")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated, among {','.join(CONFIGS)}; the first three are required",
    )
    parser.add_argument(
        "--in-process-requests",
        type=int,
        default=20000,
        help="requests per in-process run (the diagnostic without HTTP); 0 skips it",
    )
    parser.add_argument(
        "--instruction-requests",
        type=int,
        default=1000,
        help="N of the instruction counts under valgrind (runs of N and 2N requests); "
        "0 skips them, as does a machine without valgrind",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    configs = [config.strip() for config in args.configs.split(",") if config.strip()]
    if not set(REQUIRED) <= set(configs) or not set(configs) <= set(CONFIGS):
        parser.error(f"--configs must include {','.join(REQUIRED)} and only known ones")
    if args.repeats < 1 or args.duration < 1:
        parser.error("--repeats and --duration must be at least 1")
    require_tools("wrk", "taskset")
    if not {0, 1} <= set(psutil.Process().cpu_affinity() or []):
        sys.exit("needs CPUs 0 and 1 (server and client are pinned apart)")

    started = now().strftime("%Y-%m-%d %H:%M:%S UTC")
    load = load_average()
    workdir = Path(tempfile.mkdtemp(prefix="bench-http-overhead-"))
    servers: dict[str, Server] = {}
    runs: list[Run] = []
    begin = time.monotonic()
    try:
        for config in configs:
            servers[config] = start(config, workdir)
        for round_number in range(1, args.repeats + 1):
            for config in configs:
                run = measure(servers[config], args.duration, args.warmup, args.connections)
                runs.append(run)
                print(
                    f"round {round_number} {config:22} {run.rps:9,.0f} req/s "
                    f"{run.cpu_us:7.1f} µs/req  busy {run.utilisation:.0%}",
                    flush=True,
                )
        access_lines = {config: _access_lines(servers[config].log) for config in configs}
        for server in servers.values():
            stop(server)  # the in-process runs use the server's CPU
        driven = [config for config in configs if not config.startswith("service")]
        in_process_cpu: dict[str, list[float]] = {config: [] for config in driven}
        for round_number in range(1, args.repeats + 1 if args.in_process_requests else 1):
            for config in driven:
                cpu_us = in_process(config, args.in_process_requests, workdir, round_number)
                in_process_cpu[config].append(cpu_us)
                print(f"in process, round {round_number} {config:22} {cpu_us:7.1f} µs/req")
        counted = args.instruction_requests and shutil.which("valgrind")
        instruction_counts = {}
        for config in driven if counted else ():
            instruction_counts[config] = instructions(config, args.instruction_requests, workdir)
            print(f"instructions {config:22} {instruction_counts[config]:,.0f} per request")
        for config in driven if args.in_process_requests else ():
            lines = _access_lines(workdir / f"drive-{config}.log")
            # The warm-up's lines are in the log too.
            if (lines >= args.repeats * args.in_process_requests) != (
                config in LOGGING_EVERY_REQUEST
            ):
                sys.exit(f"{config} wrote {lines} access lines in process")
    finally:
        for server in servers.values():
            stop(server)
        shutil.rmtree(workdir, ignore_errors=True)
    # Guards the set-up: the line is written where it should be, and only there.
    for config in configs:
        requests = sum(run.requests for run in runs if run.config == config)
        if config in LOGGING_EVERY_REQUEST and access_lines[config] < requests:
            sys.exit(f"{config} wrote {access_lines[config]} access lines for {requests} requests")
        if config not in LOGGING_EVERY_REQUEST and access_lines[config]:
            sys.exit(f"{config} wrote {access_lines[config]} access lines; expected none")
    text = report(runs, configs, args, started, load)
    if args.in_process_requests:
        text += "\n\n" + report_in_process(in_process_cpu, args.in_process_requests)
    if instruction_counts:
        text += "\n\n" + report_instructions(instruction_counts, args.instruction_requests)
    text += f"\n\nTotal time: {time.monotonic() - begin:.0f} s.\n"
    print()
    print(text)
    if not args.no_write:
        write_section("http_overhead", text)


if __name__ == "__main__":
    main()
