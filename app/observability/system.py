"""Host and worker-process metrics sampled with psutil, off the request path.

Custom collectors and ``ProcessCollector`` do not work in prometheus_client's
multiprocess mode (the scraping process would report itself), so each worker samples on
a timer and writes plain metrics that the multiprocess files carry:

- Worker series are labelled ``worker`` with the worker's slot (``APP_WORKER_ID``, set by
  deploy/gunicorn.conf.py; ``0`` for a single process), not its pid: a replacement worker
  takes over the slot, so series survive restarts and their number stays bounded.
  Gauges use ``livemostrecent`` (a dead worker's values disappear); CPU seconds are a
  counter incremented by deltas, which the multiprocess files sum into a monotonic series
  per slot across restarts.
- Host series are written by one worker at a time, gauges with ``mostrecent``, so they are
  not multiplied by the number of workers: the one holding an exclusive lock on a file in
  the multiprocess directory. The kernel releases it when that worker dies, whatever its
  slot, and another worker takes it at its next sample (a slot number could not say which
  worker is left after a reload or a scale-down). Every worker reads the host's CPU times
  and byte counters at each sample all the same, so that the one taking over counts from
  its reading of an interval ago: from its own first, the host's CPU would read idle and
  the bytes since the last holder's last sample would never be counted.

A sample that fails (a volume gone, a /proc file missing in some sandbox) is counted in
``app_system_sample_failures_total`` and sampling goes on: the error is logged when
failures start and the recovery when they stop, not once per interval.
"""

import asyncio
import contextlib
import fcntl
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import psutil
from prometheus_client import Counter, Gauge

from app.observability import WORKER_ID_ENV
from app.observability.logging import get_logger
from app.observability.metrics import multiprocess_enabled
from app.observability.outages import OutageLog

logger = get_logger(__name__)

LAG_PROBE_SECONDS = 0.25
# The lag gauge shows the largest delay over this long, several scrape intervals: over
# one sampling interval only, most stalls were gone before Prometheus came by.
LAG_WINDOW_SECONDS = 60.0

WORKER_RSS = Gauge(
    "app_worker_resident_memory_bytes",
    "Resident memory of the worker process.",
    ["worker"],
    multiprocess_mode="livemostrecent",
)
WORKER_FDS = Gauge(
    "app_worker_open_fds",
    "Open file descriptors of the worker process.",
    ["worker"],
    multiprocess_mode="livemostrecent",
)
WORKER_THREADS = Gauge(
    "app_worker_threads",
    "Threads of the worker process.",
    ["worker"],
    multiprocess_mode="livemostrecent",
)
WORKER_LOOP_LAG = Gauge(
    "app_worker_event_loop_lag_seconds",
    "Largest event-loop delay seen in the last minute.",
    ["worker"],
    multiprocess_mode="livemostrecent",
)
WORKER_CPU = Counter(
    "app_worker_cpu_seconds_total", "CPU time used by the worker slot.", ["worker"]
)
SAMPLE_FAILURES = Counter(
    "app_system_sample_failures_total",
    "System metrics samples that failed; the series they would have updated are stale.",
    ["worker"],
)
HOST_CPU = Gauge(
    "app_host_cpu_utilisation_ratio",
    "Host CPU utilisation since the previous sample (0-1).",
    multiprocess_mode="mostrecent",
)
HOST_LOAD = Gauge(
    "app_host_load_average",
    "Host load average.",
    ["period"],
    multiprocess_mode="mostrecent",
)
HOST_MEMORY = Gauge(
    "app_host_memory_bytes",
    "Host memory.",
    ["state"],
    multiprocess_mode="mostrecent",
)
HOST_SWAP = Gauge(
    "app_host_swap_bytes",
    "Host swap.",
    ["state"],
    multiprocess_mode="mostrecent",
)
HOST_DISK = Gauge(
    "app_host_disk_bytes",
    "Filesystem holding the data directory (database, uploads).",
    ["volume", "state"],
    multiprocess_mode="mostrecent",
)
HOST_DISK_IO = Counter(
    "app_host_disk_io_bytes_total",
    "Bytes read and written on the device of the data directory.",
    ["volume", "direction"],
)
HOST_NETWORK = Counter("app_host_network_bytes_total", "Host network traffic.", ["direction"])


def worker_id() -> str:
    return os.environ.get(WORKER_ID_ENV, "0")


@dataclass
class _Previous:
    """Last cumulative readings, so counters are incremented by deltas. A worker's CPU
    time counts from 0 (its start): a forked worker's own begins there."""

    cpu_seconds: float = 0.0
    disk: dict[str, float] = field(default_factory=dict)
    network: dict[str, float] = field(default_factory=dict)


class SystemSampler:
    def __init__(self, data_dir: Path, interval_seconds: float) -> None:
        self.data_dir = data_dir
        self.interval = interval_seconds
        self.worker = worker_id()
        self.host_lease = HostLease()
        self.process = psutil.Process()
        self.device = block_device_of(data_dir)
        self.previous = _Previous()
        self.lags: deque[tuple[float, float]] = deque()  # (when, largest lag) per interval
        self.max_lag = 0.0
        self.cpu_primed = False
        self.outage = OutageLog(
            logger, "system metrics: sampling failed", "system metrics: sampling recovered"
        )
        SAMPLE_FAILURES.labels(self.worker)  # 0 until a sample fails, not a missing series

    async def run(self) -> None:
        """Sample now and then every interval, until cancelled; the worker's CPU time once
        more then, so what it used since the last sample is counted too."""
        loop = asyncio.get_running_loop()
        next_sample = loop.time()
        try:
            while True:
                if loop.time() >= next_sample:
                    await self._sample_once()
                    next_sample = loop.time() + self.interval
                before = loop.time()
                await asyncio.sleep(LAG_PROBE_SECONDS)
                self.max_lag = max(self.max_lag, loop.time() - before - LAG_PROBE_SECONDS)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # counted while sampling went on
                self._sample_cpu()
            raise

    async def _sample_once(self) -> None:
        try:
            await anyio.to_thread.run_sync(self.sample)
        except Exception:
            SAMPLE_FAILURES.labels(self.worker).inc()
            self.outage.failed()
        else:
            self.outage.succeeded()

    def sample(self) -> None:
        """One sample of every series. A part that fails (the data volume gone) leaves the
        others sampled; its error is raised once they are."""
        parts = [
            self._sample_worker,
            self._sample_cpu,
            self._sample_lag,
            self._sample_host_cpu,
            self._sample_disk_io,
            self._sample_network,
        ]
        if self.host_lease.held():
            parts += [self._sample_host, self._sample_disk]
        errors = []
        for part in parts:
            try:
                part()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _sample_worker(self) -> None:
        with self.process.oneshot():
            WORKER_RSS.labels(self.worker).set(self.process.memory_info().rss)
            WORKER_FDS.labels(self.worker).set(self.process.num_fds())
            WORKER_THREADS.labels(self.worker).set(self.process.num_threads())

    def _sample_cpu(self) -> None:
        times = self.process.cpu_times()
        cpu_seconds = times.user + times.system
        WORKER_CPU.labels(self.worker).inc(max(cpu_seconds - self.previous.cpu_seconds, 0.0))
        self.previous.cpu_seconds = cpu_seconds

    def _sample_lag(self) -> None:
        now = time.monotonic()
        self.lags.append((now, self.max_lag))
        self.max_lag = 0.0
        while self.lags[0][0] < now - LAG_WINDOW_SECONDS:
            self.lags.popleft()
        WORKER_LOOP_LAG.labels(self.worker).set(max(lag for _, lag in self.lags))

    def _sample_host_cpu(self) -> None:
        # Read by every worker (see the module); psutil's first reading compares with
        # nothing (it is 0.0).
        utilisation = psutil.cpu_percent(interval=None) / 100
        if self.cpu_primed and self.host_lease.held():
            HOST_CPU.set(utilisation)
        self.cpu_primed = True

    def _sample_host(self) -> None:
        for period, value in zip(("1m", "5m", "15m"), os.getloadavg(), strict=True):
            HOST_LOAD.labels(period).set(value)
        memory = psutil.virtual_memory()
        for state in ("total", "available", "used"):
            HOST_MEMORY.labels(state).set(getattr(memory, state))
        swap = psutil.swap_memory()
        for state in ("total", "used"):
            HOST_SWAP.labels(state).set(getattr(swap, state))

    def _sample_disk(self) -> None:
        disk = psutil.disk_usage(str(self.data_dir))
        for state in ("total", "used", "free"):
            HOST_DISK.labels("data", state).set(getattr(disk, state))

    def _sample_disk_io(self) -> None:
        if self.device is not None:
            counters = psutil.disk_io_counters(perdisk=True).get(self.device)
            if counters is not None:
                self._increment(
                    HOST_DISK_IO,
                    self.previous.disk,
                    {"read": counters.read_bytes, "write": counters.write_bytes},
                    "data",
                )

    def _sample_network(self) -> None:
        network = psutil.net_io_counters()
        self._increment(
            HOST_NETWORK,
            self.previous.network,
            {"receive": network.bytes_recv, "transmit": network.bytes_sent},
        )

    def _increment(
        self, counter: Counter, previous: dict[str, float], current: dict[str, float], *labels: str
    ) -> None:
        """Count the host's bytes since the previous reading, if this worker samples the
        host; read by every worker (see the module)."""
        held = self.host_lease.held()
        for direction, value in current.items():
            if held and direction in previous:
                counter.labels(*labels, direction).inc(max(value - previous[direction], 0))
            previous[direction] = value


class HostLease:
    """Whether this process is the one that samples the host (see the module).

    Without a multiprocess directory the process is alone and always is. Once held, the
    lock is kept until the process ends; it is never given back, so it never moves
    between two live workers."""

    LOCK_FILE = "host-sampler.lock"

    def __init__(self) -> None:
        self._held = not multiprocess_enabled()
        self._fd: int | None = None

    def held(self) -> bool:
        if not self._held:
            if self._fd is None:
                path = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]) / self.LOCK_FILE
                self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._held = True
        return self._held


def block_device_of(path: Path) -> str | None:
    """The kernel's name (``vda1``, ``dm-0``, ``nvme0n1p2``) of the block device holding
    ``path``, as psutil's per-disk counters name it, when there is one: found from the
    device number, as mount tables name it ``/dev/mapper/…`` or ``/dev/root``."""
    try:
        device = os.stat(path).st_dev
        sysfs = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
        name = sysfs.resolve(strict=True).name
        known = psutil.disk_io_counters(perdisk=True)
    except OSError:  # no block device (tmpfs, overlayfs, NFS), or no /sys or /proc here
        return None
    return name if name in known else None
