"""Helpers shared by the benchmarks: free ports, the machine description, RESULTS.md.

RESULTS.md holds one section per benchmark; a run replaces its own section (dated) and
keeps the others, so running one script never loses the others' latest results.
"""

import http.client
import os
import platform
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
SECTIONS = ("http_overhead", "metrics_render", "upload_throughput")
PACKAGES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "gunicorn",
    "uvicorn-worker",
    "prometheus_client",
    "structlog",
    "prometheus-fastapi-instrumentator",
)
BOOTSTRAP_LEVEL = 0.9
BOOTSTRAP_RESAMPLES = 2000
# Fewer rounds give no interval: resamples of one round are that round, whatever the
# noise, and of two or three hardly more, so one favourable run would read "met".
MIN_ROUNDS = 5
HEADER = """# Benchmark results

Written by the scripts in this directory (see README.md); each run replaces its own
section. Machines here are small and noisy: compare numbers **within one section**
(one run), never across runs or machines.
"""
# Variables that would change what the service does; the benchmarks set their own.
_FOREIGN_ENV_PREFIXES = (
    "APP_",
    "OTEL_",
    "PROMETHEUS_MULTIPROC_DIR",
    "WEB_CONCURRENCY",
    "GUNICORN_",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV_PREFIXES)}
    return env | extra


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def command_line() -> str:
    """The command that started this run, relative to the repository root."""

    def rel(path: str) -> str:
        try:
            return str(Path(path).absolute().relative_to(REPO))
        except ValueError:
            return path

    return shlex.join([rel(sys.executable), rel(sys.argv[0]), *sys.argv[1:]])


def require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (see bench/README.md)")


def load_average() -> str:
    """Other work on the machine skews results; recorded at the start of a run."""
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def machine(extra: dict[str, str] | None = None) -> str:
    """A markdown list describing the machine and the software under test."""
    cpu_model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    versions = ", ".join(f"{name} {package_version(name)}" for name in PACKAGES)
    lines = {
        "nproc": f"{nproc} ({cpu_model})",
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
        "code": code_version(),
        **(extra or {}),
    }
    return "\n".join(f"- {key}: {value}" for key, value in lines.items())


def code_version() -> str:
    """The commit measured, and whether the service's code differed from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "app", "deploy", "migrations").splitlines()
    if not changed:
        return f"commit {commit}, clean"
    return f"commit {commit} + uncommitted changes to {len(changed)} paths in the service"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


# One round: a value per configuration, measured back to back.
Round = Sequence[float]


def round_interval(
    rounds: Sequence[Round],
    statistic: Callable[[Sequence[Round]], float | None],
    level: float = BOOTSTRAP_LEVEL,
) -> tuple[float, float] | None:
    """How far ``statistic`` of these rounds could be moved by the machine's noise: its
    ``level`` percentile interval over resamples (with replacement) of whole rounds.
    Whole rounds, because the configurations of one round ran back to back on the machine
    as it then was. Seeded, so the same data gives the same interval. None with fewer
    than MIN_ROUNDS rounds, or if the statistic has no value for some resample (a
    baseline within noise of zero)."""
    if len(rounds) < MIN_ROUNDS:
        return None
    rng = random.Random(0)  # noqa: S311 - resampling, not secrets
    values = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        value = statistic([rounds[rng.randrange(len(rounds))] for _ in rounds])
        if value is None:
            return None
        values.append(value)
    values.sort()
    tail = int((1 - level) / 2 * len(values))
    return values[tail], values[-1 - tail]


def verdict(interval: tuple[float, float] | None, target: float, *, at_least: bool) -> str:
    """ "met" only if the whole interval is on the target's side, "NOT met" if all of it is
    on the other side; otherwise this run cannot tell."""
    if interval is None:
        return "not settled (no interval)"
    low, high = interval
    if (low >= target) if at_least else (high <= target):
        return "met"
    if (high < target) if at_least else (low > target):
        return "NOT met"
    return "not settled: the interval spans the target"


def fmt_interval(interval: tuple[float, float] | None) -> str:
    if interval is None:
        return f"no interval: fewer than {MIN_ROUNDS} rounds, or a baseline within noise of zero"
    return f"{BOOTSTRAP_LEVEL:.0%} interval {interval[0]:.2f} to {interval[1]:.2f}"


def write_section(name: str, body: str) -> None:
    """Rewrite RESULTS.md with ``body`` as section ``name``, keeping the other sections."""
    existing = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
    sections: dict[str, str] = {}
    for known in SECTIONS:
        found = re.search(
            rf"<!-- {known}:start -->\n(.*?)\n<!-- {known}:end -->", existing, flags=re.S
        )
        if found:
            sections[known] = found.group(1)
    sections[name] = body.strip()
    parts = [HEADER]
    for known in SECTIONS:
        if known in sections:
            parts.append(f"<!-- {known}:start -->\n{sections[known]}\n<!-- {known}:end -->\n")
    RESULTS.write_text("\n".join(parts), encoding="utf-8")


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def await_server(
    name: str,
    process: subprocess.Popen[bytes],
    log: Path,
    port: int,
    path: str,
    check: Callable[[http.client.HTTPResponse], None] | None = None,
) -> None:
    """Wait until the server answers ``GET path`` with 200 (``check`` may refuse the
    answer by raising). A server that exits or never answers is stopped and reported
    with its log."""

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"the {name} server exited; see {log}:\n{log.read_text()}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", path)
            response = connection.getresponse()
        except OSError:
            return False
        if check is not None:
            check(response)
        return response.status == 200

    try:
        wait_until(f"the {name} server", answers)
    except BaseException:
        terminate(process)
        raise


def terminate(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a server we started: SIGTERM, then SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> None:
    """``python -m app ARGS`` (migrate, create-superuser); its output only on failure."""
    done = subprocess.run(
        [sys.executable, "-m", "app", *args], env=env, cwd=cwd, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"python -m app {args[0]} failed:\n{done.stdout}{done.stderr}")
