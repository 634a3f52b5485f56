"""gunicorn settings for the API: uvicorn workers, multiprocess metrics, structlog logs.

Every value comes from the environment, so this one file serves the container image,
compose, Kubernetes and the native stack:

- ``WEB_CONCURRENCY`` workers (default: the CPUs this process may run on; the count is
  passed on to the settings, which refuse in-process backends with several workers),
  ``GUNICORN_BIND`` (default
  ``0.0.0.0:8000``), ``GUNICORN_TIMEOUT``, ``GUNICORN_GRACEFUL_TIMEOUT``,
  ``GUNICORN_KEEPALIVE`` (keep it above the proxy's upstream keep-alive timeout),
  ``GUNICORN_MAX_REQUESTS`` (+ 10 % jitter so workers do not recycle together);
- ``APP_FORWARDED_ALLOW_IPS``, ``APP_LOG_LEVEL`` and ``APP_LOG_FORMAT`` from the service
  settings, which are validated here, before any worker starts.

Metrics: prometheus_client picks its multiprocess backend when it is first imported, so
``PROMETHEUS_MULTIPROC_DIR`` is settled before anything imports it. The directory is
emptied when the master starts (stale files from a previous run would add up), each
worker gets a slot number 0…workers-1 in ``APP_WORKER_ID`` (reused by its replacement and
across reloads), and a dead worker's live gauges are removed in ``child_exit``.
"""

import asyncio
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, ClassVar

if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prometheus-multiproc-")

from gunicorn.arbiter import Arbiter
from gunicorn.workers.base import Worker
from prometheus_client import multiprocess
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from app.observability import WORKER_ID_ENV
from app.observability.logging import capture_warnings, dict_config
from app.server import SERVER_OPTIONS
from app.settings import load_or_exit

# Settled before the settings are read: they are validated for this many workers.
workers = int(os.environ.get("WEB_CONCURRENCY") or len(os.sched_getaffinity(0)))
os.environ["WEB_CONCURRENCY"] = str(workers)
# Refused, gunicorn would print "Failed to read config file" and this file's traceback
# before the reason.
_settings = load_or_exit()


timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
# A stopping worker (a deploy's SIGTERM, a max_requests recycle) stops telling the master it
# is alive, and is killed after the shorter of these two (a timeout of 0 is none). Before
# that, uvicorn cancels the requests still running (uploads may run for minutes), so they
# clean up after themselves: staged files removed, outcomes counted; killed, they would
# leave both undone.
SHUTDOWN_SECONDS = max(1, min(timeout or graceful_timeout, graceful_timeout) - 5)


# How long a quick shutdown (SIGINT, SIGQUIT) leaves the handlers of closed sockets to end
# by themselves, as after a SIGTERM, before it cancels what still runs.
QUICK_SHUTDOWN_SECONDS = 1.0
# How long after that the answers of what was cancelled (a 503, a 1012) have to reach their
# clients before the connections still open are dropped.
QUICK_DRAIN_SECONDS = 0.5


class ServiceWorker(UvicornWorker):
    """uvicorn's gunicorn worker, with the server options ``python -m app serve`` sets too,
    a bounded graceful shutdown and a quick one."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        **UvicornWorker.CONFIG_KWARGS,
        **SERVER_OPTIONS,
        "timeout_graceful_shutdown": SHUTDOWN_SECONDS,
    }

    async def _serve(self) -> None:
        # UvicornWorker's, but for its SIGQUIT handler (gunicorn's quick shutdown, on a SIGINT
        # or SIGQUIT to the master), which only marks the gunicorn worker as stopping, a flag
        # uvicorn never reads (Kludex/uvicorn-worker#2): the master waited out its graceful
        # timeout, then SIGKILLed the workers, their lifespan shutdown not run.
        self.config.app = self.wsgi
        server = Server(config=self.config)
        asyncio.get_running_loop().add_signal_handler(signal.SIGQUIT, self._quit, server)
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    @staticmethod
    def _quit(server: Server) -> None:
        """Stop at once, not after the graceful window: the server closes every connection
        now (websockets with 1012, which their handlers see and end on), what still runs a
        moment later is cancelled (a request in flight is a 503, an upload cleans up), the
        connections still open are dropped, and the lifespan shutdown runs (access lines
        written, connections closed)."""
        server.should_exit = True

        def cancel_the_rest() -> None:
            for task in server.server_state.tasks:
                task.cancel()

        def drop_the_rest() -> None:
            # A closed connection lingers until its client has read what is left to send
            # it, and uvicorn waits for every connection before the lifespan shutdown: a
            # client that reads nothing (a stalled download, a websocket that pings without
            # reading the pongs) held the quick shutdown for the whole graceful window.
            for connection in list(server.server_state.connections):
                connection.transport.abort()

        loop = asyncio.get_running_loop()
        loop.call_later(QUICK_SHUTDOWN_SECONDS, cancel_the_rest)
        loop.call_later(QUICK_SHUTDOWN_SECONDS + QUICK_DRAIN_SECONDS, drop_the_rest)


wsgi_app = "app.main:create_app()"
worker_class = ServiceWorker
bind = [os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")]
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "75"))
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "10000"))
max_requests_jitter = max_requests // 10
forwarded_allow_ips = _settings.forwarded_allow_ips
proxy_allow_ips = _settings.forwarded_allow_ips

# The runtime control socket (gunicornc) is a management surface nobody here uses, and its
# default path under $HOME would be shared by every gunicorn of the user (and is not
# writable on a read-only root filesystem).
control_socket_disable = True

accesslog = None  # the app writes one structured access line per request
errorlog = "-"
loglevel = _settings.log_level.lower()
logconfig_dict = dict_config(_settings.log_level, _settings.effective_log_format)
capture_warnings()


# What prometheus_client (a file per metric type and process) and the service's processes
# (their flock files) leave in PROMETHEUS_MULTIPROC_DIR.
_METRICS_FILE = re.compile(r"(counter|histogram|summary|gauge_[a-z]+)_\d+\.db|[a-z-]+\.lock")


def foreign_files(directory: Path) -> list[str]:
    """What ``directory`` holds that no run of the service wrote there."""
    if not directory.is_dir():
        return []
    return sorted(
        entry.name
        for entry in directory.iterdir()
        if entry.is_symlink() or not entry.is_file() or not _METRICS_FILE.fullmatch(entry.name)
    )


# Emptied at start (on_starting): a path mistyped to name a data volume (APP_DATA_DIR, the
# uploads) would lose its files, so a directory holding anything else is refused instead.
if _foreign := foreign_files(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])):
    sys.exit(
        f"configuration refused: PROMETHEUS_MULTIPROC_DIR holds files that are not metrics "
        f"({', '.join(_foreign[:3])}); give the metrics a directory of their own"
    )


def on_starting(server: Arbiter) -> None:
    # A previous run's files would be added to this run's counters. Only those go: the
    # directory itself may be a volume of its own.
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        entry.unlink(missing_ok=True)


def pre_fork(server: Arbiter, worker: Worker) -> None:
    # The lowest slot none of the workers that stay holds. gunicorn stops the oldest workers
    # beyond num_workers (the old ones once a reload's (HUP) new ones are started, the oldest
    # on a TTOU), so the new one stays with the youngest num_workers-1 others: a replacement
    # inherits the slot of the worker it replaces, and the workers left hold 0…workers-1
    # once each (after a TTOU, once the rest are replaced or reloaded).
    youngest = sorted(server.WORKERS.values(), key=lambda other: other.age, reverse=True)
    held = {other.slot for other in youngest[: server.num_workers - 1]}  # type: ignore[attr-defined]
    worker.slot = min(set(range(server.num_workers)) - held)  # type: ignore[attr-defined]


def post_fork(server: Arbiter, worker: Worker) -> None:
    os.environ[WORKER_ID_ENV] = str(worker.slot)  # type: ignore[attr-defined]


def child_exit(server: Arbiter, worker: Worker) -> None:
    multiprocess.mark_process_dead(worker.pid)
