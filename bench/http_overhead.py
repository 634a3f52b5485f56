"""Per-request server CPU cost of the production middleware stack, against baselines.

Why: the service writes its own HTTP metrics and access log middleware instead of using
prometheus-fastapi-instrumentator (see app/observability/http_middleware.py). This
measures what that stack costs per request compared with a bare FastAPI app and with the
instrumentator, so the choice rests on numbers from this machine. Target: the full
stack's overhead over bare is at most half the instrumentator's.

What: each configuration serves ``GET /ping`` → ``{"ok": true}`` from its own uvicorn
process (one worker, uvloop + httptools, uvicorn's own access log off as in production),
pinned to CPU 0, logging to a file. ``wrk`` pinned to CPU 1 loads it; the server's CPU time
(user + system, psutil) before and after the timed run divided by the requests wrk
completed gives CPU µs per request. Configurations are interleaved and repeated; the
report takes medians. Only ratios within one run are meaningful on a noisy machine.

Configurations:

- ``bare``: ``FastAPI()`` plus the route;
- ``full``: ``app.main.create_app(settings)`` plus the route — every production
  middleware (request id, access log, metrics, security headers, trusted host);
- ``instrumentator``: ``FastAPI()`` plus ``Instrumentator().instrument(app)``;
- ``full-quiet-log`` (diagnostic): ``full`` with the ``app.access`` logger at WARNING, so
  no access line is rendered or written (the middleware still runs);
- ``routes-only`` (diagnostic): ``full`` without any of its middleware — the service's
  route table and error handlers, so ``full - routes-only`` is the middleware alone;
- ``metrics-only`` (diagnostic): ``FastAPI()`` plus the service's HttpMetricsMiddleware
  alone — the like-for-like counterpart of the instrumentator;
- ``routes-metrics``, ``routes-instrumentator`` (optional, not run by default to stay
  under 3 minutes): ``routes-only`` plus the service's metrics middleware, or plus the
  instrumentator — both metrics layers on the service's real route table.

Run from the repository root: ``.venv/bin/python bench/http_overhead.py``.
"""

import argparse
import http.client
import logging
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from fastapi import FastAPI

from _common import (
    clean_env,
    command_line,
    free_port,
    load_average,
    machine,
    now,
    require_tools,
    terminate,
    wait_until,
    write_section,
)

REQUIRED = ("bare", "full", "instrumentator")
DIAGNOSTIC = ("full-quiet-log", "routes-only", "metrics-only")
OPTIONAL = ("routes-metrics", "routes-instrumentator")
CONFIGS = REQUIRED + DIAGNOSTIC + OPTIONAL
DEFAULT_CONFIGS = REQUIRED + DIAGNOSTIC
WITH_REQUEST_ID = ("full", "full-quiet-log")
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
    if config.startswith(("full", "routes")):
        from app.main import create_app
        from app.settings import Settings

        settings = Settings(
            _env_file=None, env="test", data_dir=data_dir, log_format="json", log_level="INFO"
        )
        application = create_app(settings)
        if config == "full-quiet-log":
            logging.getLogger("app.access").setLevel(logging.WARNING)
        elif config.startswith("routes"):
            application.user_middleware.clear()  # the stack is built on the first request
    else:
        application = FastAPI()
    if config == "instrumentator":
        from prometheus_fastapi_instrumentator import Instrumentator

        Instrumentator().instrument(application)
    elif config == "routes-instrumentator":
        from prometheus_client import CollectorRegistry
        from prometheus_fastapi_instrumentator import Instrumentator

        # Its own registry: the service already registered http_requests_total & co., and
        # on a name clash the instrumentator silently records nothing at all.
        Instrumentator(registry=CollectorRegistry()).instrument(application)
    elif config in ("metrics-only", "routes-metrics"):
        from app.observability.http_middleware import HttpMetricsMiddleware

        application.add_middleware(HttpMetricsMiddleware)
    application.add_api_route("/ping", ping, methods=["GET"])
    return application


def serve(config: str, port: int, data_dir: Path) -> None:
    import uvicorn

    # As `python -m app serve` does: the app logs (and writes access lines) itself.
    uvicorn.run(
        build_app(config, data_dir),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
    )


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
    server = Server(config, port, process, log)

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{config} server exited; see {log}:\n{log.read_text()}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/ping")
            response = connection.getresponse()
        except OSError:
            return False
        # Guards the set-up: the production middleware runs exactly where it should.
        if (response.getheader("X-Request-ID") is not None) != (config in WITH_REQUEST_ID):
            raise RuntimeError(f"{config}: unexpected headers {response.getheaders()}")
        return response.status == 200

    try:
        wait_until(f"the {config} server", answers)
    except BaseException:
        stop(server)
        raise
    return server


def stop(server: Server) -> None:
    terminate(server.process)


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
    ratio = (
        overhead["full"] / overhead["instrumentator"] if overhead["instrumentator"] > 0 else None
    )
    met = ratio is not None and ratio <= TARGET_RATIO
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
    verdict = "met" if met else "NOT met"
    notes = [
        f"**(full - bare) / (instrumentator - bare) = {overhead['full']:.1f} / "
        f"{overhead['instrumentator']:.1f} = {fmt_ratio(ratio)}** — target ≤ {TARGET_RATIO}: "
        f"**{verdict}**.",
    ]
    per_round = [
        fmt_ratio(full.cpu_us - bare_run.cpu_us, instr.cpu_us - bare_run.cpu_us)
        for bare_run, full, instr in zip(
            by_config["bare"], by_config["full"], by_config["instrumentator"], strict=True
        )
    ]
    notes.append(f"The same ratio within each round: {', '.join(per_round)}.")
    notes += breakdown(median_cpu, overhead["instrumentator"])
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
            "`full` appends `/ping` to the real service's routes, so FastAPI's router and "
            "the route-template lookup of the metrics and access-log middleware walk the "
            "whole route table before matching it (the worst case for a route); `bare`, "
            "`instrumentator` and `metrics-only` have only FastAPI's 4 docs routes before it. "
            "The other configurations are diagnostics that split the cost (see the script's "
            "docstring); they are not part of the target.",
            "",
            "Each run:",
            "",
            *per_run,
        ]
    )


def fmt_ratio(numerator: float | None, denominator: float = 1.0) -> str:
    """A ratio, or why there is none (a baseline within noise of zero)."""
    if numerator is None or denominator <= 0:
        return "n/a (denominator ≤ 0: within noise)"
    return f"{numerator / denominator:.2f}"


def breakdown(cpu: dict[str, float], instrumentator: float) -> list[str]:
    """Where ``full``'s overhead goes, from the diagnostic configurations that ran."""
    lines = []
    if "routes-only" in cpu:
        middleware = cpu["full"] - cpu["routes-only"]
        lines += [
            "",
            "Where `full - bare` goes (differences of medians, µs/req):",
            "",
            f"- the service's route table, no middleware (routes-only - bare): "
            f"{cpu['routes-only'] - cpu['bare']:+.1f}",
            f"- all production middleware (full - routes-only): {middleware:+.1f}, "
            f"i.e. {fmt_ratio(middleware, instrumentator)} x the instrumentator's overhead",
        ]
        if "full-quiet-log" in cpu:
            lines += [
                f"  - of which rendering and writing the JSON access line "
                f"(full - full-quiet-log): {cpu['full'] - cpu['full-quiet-log']:+.1f}",
                f"  - and everything else — request id, access-log middleware minus the line, "
                f"metrics, security headers, trusted host (full-quiet-log - routes-only): "
                f"{cpu['full-quiet-log'] - cpu['routes-only']:+.1f}",
            ]
    elif "full-quiet-log" in cpu:
        lines.append(
            f"Rendering and writing the JSON access line (full - full-quiet-log): "
            f"{cpu['full'] - cpu['full-quiet-log']:+.1f} µs/req."
        )
    if "metrics-only" in cpu:
        lines += [
            "",
            f"Metrics alone, like for like (same 5-route app): the service's "
            f"HttpMetricsMiddleware {cpu['metrics-only'] - cpu['bare']:+.1f} µs/req vs the "
            f"instrumentator's {instrumentator:+.1f} µs/req "
            f"(ratio {fmt_ratio(cpu['metrics-only'] - cpu['bare'], instrumentator)}).",
        ]
    if "routes-only" in cpu and "routes-instrumentator" in cpu:
        theirs = cpu["routes-instrumentator"] - cpu["routes-only"]
        lines += [
            "",
            "On the service's route table (differences from routes-only, µs/req): "
            f"instrumentator {theirs:+.1f}",
        ]
        if "routes-metrics" in cpu:
            ours = cpu["routes-metrics"] - cpu["routes-only"]
            lines[-1] += (
                f", service's metrics middleware {ours:+.1f} (ratio {fmt_ratio(ours, theirs)})"
            )
        middleware = cpu["full"] - cpu["routes-only"]
        lines[-1] += (
            f", all production middleware {middleware:+.1f} "
            f"(ratio {fmt_ratio(middleware, theirs)})."
        )
    return lines


def _wrk_version() -> str:
    output = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    return output.split("[")[0].strip() or "unknown"


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "_serve":
        serve(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per timed run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated, among {','.join(CONFIGS)}; the first three are required",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    configs = [config.strip() for config in args.configs.split(",") if config.strip()]
    if not set(REQUIRED) <= set(configs) or not set(configs) <= set(CONFIGS):
        parser.error(f"--configs must include {','.join(REQUIRED)} and only known ones")
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
                    f"round {round_number} {config:15} {run.rps:9,.0f} req/s "
                    f"{run.cpu_us:7.1f} µs/req  busy {run.utilisation:.0%}",
                    flush=True,
                )
        with servers["full"].log.open("rb") as log:
            full_log_lines = sum(1 for _ in log)
    finally:
        for server in servers.values():
            stop(server)
        shutil.rmtree(workdir, ignore_errors=True)
    full_requests = sum(run.requests for run in runs if run.config == "full")
    if full_log_lines < full_requests:
        sys.exit(f"full wrote {full_log_lines} log lines for {full_requests} requests")
    text = report(runs, configs, args, started, load)
    text += f"\n\nTotal time: {time.monotonic() - begin:.0f} s.\n"
    print()
    print(text)
    if not args.no_write:
        write_section("http_overhead", text)


if __name__ == "__main__":
    main()
