"""Upload throughput and server memory of ``POST /api/v1/files``, against a bare copy.

Why: uploads are streamed (app/files/multipart.py, app/files/service.py) so that a large
file never sits in memory and a size cap applies while it arrives. Streaming adds work
per network chunk — the multipart push parser, the UTF-8 probe, and per MiB a thread hop
that hashes (SHA-256) and writes it while the next MiB arrives — on top of what any
server must do to land the bytes on disk. This measures that price in throughput and
checks that memory stays flat with the file size. Target: the API's throughput is at
least 0.8 x the bare copy's.

What: two uvicorn servers (one worker, uvloop + httptools, uvicorn's access log off, as
``python -m app serve`` runs them), each pinned to CPU 0 if the machine has 2+ CPUs:

- ``api``: ``python -m app serve`` — the real service (SQLite migrated first, JSON logs to
  a file, local storage, ``APP_MAX_UPLOAD_BYTES`` = 128 MiB, the upload rate limit raised);
  a user registers and logs in, each upload carries its bearer token and is deleted again
  (untimed) afterwards;
- ``bare``: a one-route Starlette app that reads ``request.stream()``, writes each chunk
  to a temporary file (blocking writes in the event loop: the cheapest way to land the
  bytes), fsyncs it at the end, deletes it and answers the byte count;
- ``bare-threaded`` (diagnostic): a second route of the same server that writes each
  chunk from a worker thread, as app/backends/storage.py does;
- ``bare-hashed`` (diagnostic): a third route, ``bare`` plus SHA-256 of every chunk in the
  event loop — the cheapest server that also owes a digest, as the API does.

The client (this script, pinned to CPU 1 with ``taskset -p`` while it uploads) sends 1, 10
and 100 MiB of ASCII text as a ``multipart/form-data`` body with one ``file`` part
(``x.txt``, ``text/plain``), streamed from a generator in 1 MiB chunks with an exact
``Content-Length``, over a kept-alive httpx2 connection. Each size is repeated (api, bare,
bare-threaded, bare-hashed, api, …) after an untimed warm-up upload; the report takes
medians. The target compares ``api`` with ``bare``. Throughput is file bytes / wall time
from the first byte sent to the response read (MB = 10^6 bytes).

Memory: before each upload the server's peak RSS (``VmHWM``) is reset to its current RSS
(``5`` into ``/proc/<pid>/clear_refs``, Linux ≥ 4.0); after it ``VmHWM`` minus that value
is the upload's peak RSS increase. Where the reset is refused, ``VmHWM`` only grows and
the increase is counted from the idle server's ``VmHWM`` instead (sizes run smallest first).

Run from the repository root: ``.venv/bin/python bench/upload_throughput.py``.
"""

import argparse
import contextlib
import functools
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
import httpx2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

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
    package_version,
    require_tools,
    round_interval,
    run_cli,
    terminate,
    verdict,
    write_section,
)

SERVER_CPU = "0"
CLIENT_CPU = "1"
TARGET_RATIO = 0.8
MIB = 1024 * 1024
SIZES_MIB = (1, 10, 100)
MAX_UPLOAD_BYTES = 128 * MIB
CONFIGS = ("api", "bare", "bare-threaded", "bare-hashed")
SERVERS = ("api", "bare")  # the other configurations are routes of the bare server
UPLOAD_PATHS = {
    "api": "/api/v1/files",
    "bare": "/upload",
    "bare-threaded": "/upload-threaded",
    "bare-hashed": "/upload-hashed",
}
USER = ("bench-uploader", "uploader@example.com", "bench-uploader-password")
BOUNDARY = "bench-upload-throughput-boundary-7c1f"
# 1 MiB of printable ASCII in lines: valid UTF-8 text, no binary signature at its start.
_LINE = b"The quick brown fox jumps over the lazy dog; 0123456789 streaming upload bench.\n"
CHUNK = (_LINE * (MIB // len(_LINE) + 1))[:MIB]


@dataclass
class Run:
    config: str
    size: int  # file bytes
    seconds: float
    rss_increase: int  # bytes
    cpu_seconds: float  # the server's, all threads, while it took this upload

    @property
    def cpu_ms(self) -> float:
        return self.cpu_seconds * 1000

    @property
    def mb_per_s(self) -> float:
        return self.size / self.seconds / 1e6


@dataclass
class Server:
    config: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    token: str | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# --- the bare server (a child process: `upload_throughput.py _serve PORT DIR`) ---


def build_bare_app(directory: Path) -> Starlette:
    async def copy(request: Request, threaded: bool = False, hashed: bool = False) -> JSONResponse:
        received = 0
        digest = hashlib.sha256()
        fd, name = tempfile.mkstemp(dir=directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                async for chunk in request.stream():
                    if hashed:  # the whole body, framing included: the cost is the same
                        digest.update(chunk)
                    if threaded:  # as app/backends/storage.py writes: off the event loop
                        await anyio.to_thread.run_sync(file.write, chunk)
                    else:
                        file.write(chunk)
                    received += len(chunk)
                file.flush()
                os.fsync(file.fileno())
        finally:
            os.unlink(name)
        reply = {"bytes": received, "sha256": digest.hexdigest() if hashed else None}
        return JSONResponse(reply, status_code=201)

    async def upload(request: Request) -> JSONResponse:
        return await copy(request)

    async def upload_threaded(request: Request) -> JSONResponse:
        return await copy(request, threaded=True)

    async def upload_hashed(request: Request) -> JSONResponse:
        return await copy(request, hashed=True)

    async def ping(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/upload", upload, methods=["POST"]),
            Route("/upload-threaded", upload_threaded, methods=["POST"]),
            Route("/upload-hashed", upload_hashed, methods=["POST"]),
            Route("/ping", ping),
        ],
    )


def serve_bare(port: int, directory: Path) -> None:
    import uvicorn
    from app.server import SERVER_OPTIONS

    # The settings `python -m app serve` passes (app/cli.py), minus the factory.
    uvicorn.run(
        build_bare_app(directory),
        host="127.0.0.1",
        port=port,
        proxy_headers=True,
        log_config=None,
        access_log=False,
        **SERVER_OPTIONS,
    )


# --- the driver ---


def pinned(command: list[str], cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu, *command] if cpu is not None else command


def start(config: str, workdir: Path, server_cpu: str | None) -> Server:
    port = free_port()
    data = workdir / config
    data.mkdir()
    log = workdir / f"{config}.log"
    if config == "api":
        env = clean_env(
            APP_ENV="test",
            APP_DATA_DIR=str(data),
            APP_DATABASE_URL=f"sqlite+aiosqlite:///{data}/app.db",
            APP_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
            APP_RATE_LIMIT_UPLOADS="100000/minute",
            APP_LOG_FORMAT="json",
        )
        run_cli(["migrate"], env, workdir)
        command = [sys.executable, "-m", "app", "serve", "--port", str(port)]
        probe = "/health/ready"
    else:
        env = clean_env()
        command = [sys.executable, str(Path(__file__).resolve()), "_serve", str(port), str(data)]
        probe = "/ping"
    with log.open("wb") as out:
        process = subprocess.Popen(
            pinned(command, server_cpu), stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=env
        )
    await_server(config, process, log, port, probe)
    return Server(config, port, process, log)


def stop(server: Server) -> None:
    terminate(server.process)


def login(client: httpx2.Client, server: Server) -> None:
    username, email, password = USER
    registered = client.post(
        f"{server.base}/api/v1/auth/register",
        json={"email": email, "username": username, "password": password},
    )
    if registered.status_code != 201:
        raise RuntimeError(f"register: {registered.status_code} {registered.text}")
    token = client.post(
        f"{server.base}/api/v1/auth/token", data={"username": username, "password": password}
    )
    if token.status_code != 200:
        raise RuntimeError(f"login: {token.status_code} {token.text}")
    server.token = token.json()["access_token"]


# --- server memory (/proc/<pid>/status) ---


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """CPU time of all the process's threads so far, from the scheduler's nanosecond
    counters (``/proc/<pid>/stat`` counts 10 ms ticks, as long as a 1 MiB upload takes).
    A thread that ends between two readings takes its time with it; the service's worker
    threads outlive an upload."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with (
            contextlib.suppress(FileNotFoundError, ProcessLookupError),
            open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as schedstat,
        ):
            total += int(schedstat.read().split()[0])
    return total / 1e9


def reset_peak(pid: int) -> bool:
    """Set VmHWM back to the current RSS; False where the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


# --- one upload ---


def multipart(size: int) -> tuple[Iterator[bytes], int]:
    """The body as a generator (1 MiB chunks, never the whole file) and its exact length."""
    head = (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="file"; filename="x.txt"\r\n'
        "Content-Type: text/plain\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        left = size
        while left > 0:
            chunk = CHUNK if left >= len(CHUNK) else CHUNK[:left]
            left -= len(chunk)
            yield chunk
        yield tail

    return body(), len(head) + size + len(tail)


def upload(
    client: httpx2.Client, server: Server, config: str, size: int, resettable: bool, idle: int
) -> Run:
    pid = server.process.pid
    if resettable:
        reset_peak(pid)
    before = status_kib(pid, "VmHWM") if resettable else idle
    body, length = multipart(size)
    headers = {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(length),
    }
    if server.token:
        headers["Authorization"] = f"Bearer {server.token}"
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()
    response = client.post(f"{server.base}{UPLOAD_PATHS[config]}", content=body, headers=headers)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu_before
    peak = status_kib(pid, "VmHWM")
    check(config, response, size, length)
    if config == "api":  # untimed: keeps the disk use bounded
        deleted = client.delete(
            f"{server.base}/api/v1/files/{response.json()['id']}",
            headers={"Authorization": f"Bearer {server.token}"},
        )
        if deleted.status_code != 204:
            raise RuntimeError(f"delete: {deleted.status_code} {deleted.text}")
    return Run(config, size, seconds, (peak - before) * 1024, cpu)


def check(config: str, response: httpx2.Response, size: int, length: int) -> None:
    """Guards the set-up: the whole file arrived and (api) was accepted as text."""
    if response.status_code != 201:
        raise RuntimeError(f"{config}: {response.status_code} {response.text[:500]}")
    reply = response.json()
    if config == "api":
        if reply["size"] != size or reply["content_type"] != "text/plain":
            raise RuntimeError(f"api: unexpected reply {reply}")
    elif reply["bytes"] != length:
        raise RuntimeError(f"{config}: received {reply['bytes']} of {length} bytes")
    elif config == "bare-hashed" and reply["sha256"] != body_sha256(size):
        raise RuntimeError(f"{config}: wrong digest {reply['sha256']}")


@functools.cache
def body_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for chunk in multipart(size)[0]:
        digest.update(chunk)
    return digest.hexdigest()


# --- the report ---


def report(
    runs: list[Run],
    server_memory: dict[str, str],
    resettable: bool,
    pinning: str,
    repeats: str,
    started: str,
    load: str,
) -> str:
    def of(config: str, size_mib: int) -> list[Run]:
        return [r for r in runs if r.config == config and r.size == size_mib * MIB]

    rows = [
        "| file | api MB/s | bare MB/s | **api / bare** | bare-threaded MB/s | "
        "api / bare-threaded | bare-hashed MB/s | api / bare-hashed | api peak RSS increase | "
        "bare peak RSS increase |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cpu_rows = [
        "| file | api | bare | bare-threaded | bare-hashed | api - bare | api / bare |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ratios: dict[int, float] = {}
    verdicts: dict[int, str] = {}
    ratio_texts: list[str] = []
    hashing_ceiling: dict[int, float] = {}
    for size in SIZES_MIB:
        mb = {c: statistics.median(r.mb_per_s for r in of(c, size)) for c in CONFIGS}
        rss = {c: max(r.rss_increase for r in of(c, size)) / MIB for c in CONFIGS}
        rounds = [
            (api.mb_per_s, bare.mb_per_s)
            for api, bare in zip(of("api", size), of("bare", size), strict=True)
        ]
        ratios[size] = api_over_bare(rounds)
        interval = round_interval(rounds, api_over_bare)
        verdicts[size] = verdict(interval, TARGET_RATIO, at_least=True)
        ratio_texts.append(
            f"{size} MiB **{ratios[size]:.2f}** ({fmt_interval(interval)}): **{verdicts[size]}**"
        )
        hashing_ceiling[size] = mb["bare-hashed"] / mb["bare"]
        cpu = {c: statistics.median(r.cpu_ms for r in of(c, size)) for c in CONFIGS}
        cpu_rows.append(
            f"| {size} MiB | {cpu['api']:.2f} | {cpu['bare']:.2f} | {cpu['bare-threaded']:.2f} "
            f"| {cpu['bare-hashed']:.2f} | {cpu['api'] - cpu['bare']:+.2f} | "
            f"{cpu['api'] / cpu['bare']:.1f} |"
        )
        rows.append(
            f"| {size} MiB | {mb['api']:.1f} | {mb['bare']:.1f} | **{ratios[size]:.2f}** | "
            f"{mb['bare-threaded']:.1f} | {mb['api'] / mb['bare-threaded']:.2f} | "
            f"{mb['bare-hashed']:.1f} | {mb['api'] / mb['bare-hashed']:.2f} | "
            f"{rss['api']:.1f} MiB | {max(rss[c] for c in CONFIGS if c != 'api'):.1f} MiB |"
        )
    per_run = [
        "| file | config | MB/s of each run | server CPU ms of each run | "
        "peak RSS increase of each run (MiB) |",
        "|---|---|---|---|---|",
    ]
    for size in SIZES_MIB:
        for config in CONFIGS:
            config_runs = of(config, size)
            speeds = ", ".join(f"{r.mb_per_s:.1f}" for r in config_runs)
            cpus = ", ".join(f"{r.cpu_ms:.1f}" for r in config_runs)
            rss = ", ".join(f"{r.rss_increase / MIB:.1f}" for r in config_runs)
            per_run.append(f"| {size} MiB | {config} | {speeds} | {cpus} | {rss} |")
    overall = (
        "every size meets it"
        if all(v == "met" for v in verdicts.values())
        else "not every size meets it"
    )
    ceiling_list = ", ".join(f"{hashing_ceiling[s]:.2f} ({s} MiB)" for s in SIZES_MIB)
    memory = (
        "Peak RSS increase = `VmHWM` after the upload minus the RSS just before it (peak "
        "reset through `/proc/<pid>/clear_refs` before each upload); the table shows the "
        "largest of the repeats."
        if resettable
        else "Peak RSS increase = `VmHWM` after the upload minus the idle server's `VmHWM` "
        "(the kernel refused to reset the peak, so it only grows; sizes ran smallest "
        "first); the table shows the largest of the repeats."
    )
    return "\n".join(
        [
            f"## 3. Upload throughput and memory, API vs bare streaming copy — {started}",
            "",
            f"Command: `{command_line()}`",
            "",
            machine(
                {
                    "httpx2": package_version("httpx2"),
                    "python-multipart": package_version("python-multipart"),
                    "load average at start": load,
                    "setup": f"{pinning}; one uvicorn worker each (uvloop + httptools, "
                    f"uvicorn access log off); `api` = `python -m app serve`, SQLite, local "
                    f"storage, JSON logs to a file; `bare` = one Starlette route copying "
                    f"`request.stream()` to a temporary file + fsync; interleaved uploads "
                    f"(api, bare, bare-threaded, bare-hashed, …), {repeats} of 1, 10 and "
                    f"100 MiB, after one untimed 1 MiB warm-up each; medians",
                    "server memory": "; ".join(server_memory.values()),
                }
            ),
            "",
            *rows,
            "",
            f"api / bare throughput, target ≥ {TARGET_RATIO} (**{overall}**): "
            f"{'; '.join(ratio_texts)}.",
            "",
            f"The interval: the ratio's {BOOTSTRAP_LEVEL:.0%} range over resamples of the "
            "rounds (each an api and a bare upload back to back; whole rounds, with "
            "replacement), i.e. how far this machine's noise moves it; a size meets the "
            "target only if all of its interval does.",
            "",
            "Server CPU per upload (ms, medians): the user + system time of all the "
            "server's threads from the upload's first byte sent to its response read "
            "(`/proc/<pid>/task/*/schedstat`). Throughput also counts waits (fsyncs, the "
            "client, the loopback); this is what each server's own work costs.",
            "",
            *cpu_rows,
            "",
            f"For scale, bare-hashed / bare: {ceiling_list}. That is what hashing every "
            "byte costs on its own: the API owes each file's SHA-256, so on one CPU a "
            "server that does nothing else but copy and hash reaches that fraction of "
            "`bare`.",
            "",
            "`bare-hashed` (diagnostic, not part of the target) is the bare route also "
            "feeding every chunk to SHA-256 (hashlib) in the event loop: the API must hash "
            "every byte for the record's `sha256` and `bare` does not, so `bare-hashed` is "
            "the cheapest server with that duty and `api / bare-hashed` what the rest of the "
            "API's work costs. With the server on one CPU, hashing cannot overlap the "
            "copy; the API can still pass `bare-hashed` on large files because it starts "
            "the disk's writeback after each MiB, where the bare routes wait for the whole "
            "file in their final fsync.",
            "",
            "`bare-threaded` (diagnostic, not part of the target) is the bare route writing "
            "each chunk from a worker thread (the service's local storage gathers chunks to "
            "1 MiB per hop), so "
            "`bare` vs `bare-threaded` is the price of that thread hop alone and "
            "`api / bare-threaded` is what the rest of the API's work costs. Blocking writes "
            "also stop `bare` reading the socket whenever the kernel throttles dirty pages, "
            "so on a slow disk it can fall below a server that writes off the loop: no "
            "bare route is a strict upper bound.",
            "",
            "MB/s = file bytes (1, 10, 100 MiB of ASCII text) / wall time from the first byte "
            "sent to the response read, MB = 10^6 bytes; the multipart framing (~200 bytes) is "
            "not counted. Both servers land the bytes on disk and fsync them; the API also "
            "parses the multipart body and UTF-8-checks every chunk, hashes (SHA-256) and "
            "writes the chunks from a worker thread 1 MiB at a time (starting their writeback "
            "to the disk), one write in flight while the next MiB arrives, and, in one last "
            "hop, the rest, "
            "an fsync of the staged file, its rename and an fsync of the directory; commits "
            "a row (SQLite, one more fsync), and runs the whole production "
            "middleware stack and authentication once per request. "
            f"{memory} Noisy machine: compare the rows of this run with each other, not with "
            "other runs.",
            "",
            "Each run:",
            "",
            *per_run,
        ]
    )


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_serve":
        serve_bare(int(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats",
        default="21,11,5",
        help="uploads per configuration of 1, 10 and 100 MiB (comma-separated)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    try:
        repeats = dict(zip(SIZES_MIB, map(int, args.repeats.split(",")), strict=True))
    except ValueError:
        parser.error("--repeats takes three integers, e.g. 21,11,5")
    if min(repeats.values()) < 1:
        parser.error("--repeats must be at least 1 each")

    cpus = sorted(os.sched_getaffinity(0))
    pin = {int(SERVER_CPU), int(CLIENT_CPU)} <= set(cpus)
    if pin:
        require_tools("taskset")
    pinning = (
        f"servers pinned to CPU {SERVER_CPU}, client (this script) to CPU {CLIENT_CPU} (`taskset`)"
        if pin
        else "fewer than 2 CPUs: nothing pinned, client and servers share the CPU"
    )

    started = now().strftime("%Y-%m-%d %H:%M:%S UTC")
    load = load_average()
    begin = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-upload-throughput-"))
    servers: dict[str, Server] = {}
    runs: list[Run] = []
    idle: dict[str, int] = {}
    try:
        for name in SERVERS:
            servers[name] = start(name, workdir, SERVER_CPU if pin else None)
        # Every configuration but api is a route of the bare server.
        server_of = {c: servers["api" if c == "api" else "bare"] for c in CONFIGS}
        if pin:  # the client is this process; its original CPUs come back in `finally`
            taskset_pid(CLIENT_CPU)
        with httpx2.Client(timeout=120) as client:
            login(client, servers["api"])
            idle = {name: status_kib(s.process.pid, "VmHWM") for name, s in servers.items()}
            idle_rss = {name: status_kib(s.process.pid, "VmRSS") for name, s in servers.items()}
            resettable = all(reset_peak(s.process.pid) for s in servers.values())
            for config in CONFIGS:  # warm-up: code paths, connection, files
                server = server_of[config]
                upload(client, server, config, MIB, resettable, idle[server.config])
            for size in SIZES_MIB:
                for round_number in range(1, repeats[size] + 1):
                    for config in CONFIGS:
                        server = server_of[config]
                        run = upload(
                            client, server, config, size * MIB, resettable, idle[server.config]
                        )
                        runs.append(run)
                        print(
                            f"{size:3d} MiB round {round_number} {config:13} "
                            f"{run.mb_per_s:7.1f} MB/s  CPU {run.cpu_ms:6.1f} ms  peak RSS "
                            f"+{run.rss_increase / MIB:.1f} MiB",
                            flush=True,
                        )
            end_rss = {name: status_kib(s.process.pid, "VmRSS") for name, s in servers.items()}
    finally:
        if pin:
            taskset_pid(",".join(map(str, cpus)))
        for server in servers.values():
            stop(server)
        shutil.rmtree(workdir, ignore_errors=True)
    repeats_text = "/".join(str(repeats[size]) for size in SIZES_MIB)
    memory = {
        name: f"{name} VmHWM {idle[name] / 1024:.1f} MiB, VmRSS {idle_rss[name] / 1024:.1f} MiB "
        f"idle → {end_rss[name] / 1024:.1f} MiB after the last upload"
        for name in SERVERS
    }
    text = report(runs, memory, resettable, pinning, repeats_text, started, load)
    text += f"\n\nTotal time: {time.monotonic() - begin:.0f} s.\n"
    print()
    print(text)
    if not args.no_write:
        write_section("upload_throughput", text)


def api_over_bare(rounds: Sequence[Round]) -> float:
    """median api MB/s / median bare MB/s; rounds hold (api, bare)."""
    api, bare = (statistics.median(column) for column in zip(*rounds, strict=True))
    return api / bare


def taskset_pid(cpus: str) -> None:
    """Pin this process (the client) to ``cpus``, as http_overhead pins wrk."""
    subprocess.run(
        ["taskset", "-p", "-c", cpus, str(os.getpid())], check=True, stdout=subprocess.DEVNULL
    )


if __name__ == "__main__":
    main()
