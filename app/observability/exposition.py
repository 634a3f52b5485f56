"""``GET /metrics``: Prometheus text, or OpenMetrics when the scraper asks for it.

With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn), every scrape builds a fresh registry
over the workers' files, so any worker answers for all of them. Rendering reads files
and formats thousands of lines, so it runs in a thread, not on the event loop. Access
can be limited to scraper networks with ``APP_METRICS_ALLOWED_NETWORKS``.
"""

import glob
import ipaddress
import os
from collections.abc import Iterable

import anyio
from fastapi import APIRouter, Request, Response
from prometheus_client import REGISTRY, CollectorRegistry, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from app.errors import Forbidden
from app.observability.metrics import multiprocess_enabled
from app.settings import SettingsDep

router = APIRouter(tags=["observability"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, settings: SettingsDep) -> Response:
    networks = settings.metrics_allowed_networks
    if networks and not _client_in(request, networks):
        raise Forbidden("Metrics are not served to this address.")
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    body = await anyio.to_thread.run_sync(lambda: encoder(_registry()))
    return Response(body, headers={"Content-Type": content_type})


def _registry() -> CollectorRegistry:
    if not multiprocess_enabled():
        return REGISTRY
    registry = CollectorRegistry()
    FilesReadyCollector(registry)
    return registry


class FilesReadyCollector(MultiProcessCollector):
    """MultiProcessCollector that skips the files a worker is still creating.

    prometheus_client creates a worker's file empty and sizes it just after; a scrape that
    read it in between failed with ``struct.error`` (a 500 for the whole scrape), as it did
    when workers started (every max_requests recycle). An empty file holds no value yet,
    so nothing is lost by passing it over; the next scrape reads it."""

    def collect(self) -> Iterable[Metric]:
        return self.merge(
            [path for path in glob.glob(os.path.join(self._path, "*.db")) if _sized(path)],
            accumulate=True,
        )


def _sized(path: str) -> bool:
    try:
        return os.path.getsize(path) >= _HEADER_BYTES
    except OSError:  # gone: a dead worker's live gauges are removed
        return False


# What mmap_dict writes first: the used size and a pad, 4 bytes each.
_HEADER_BYTES = 8


def _client_in(
    request: Request, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    if request.client is None:
        return False
    try:
        address = ipaddress.ip_address(request.client.host)
    except ValueError:
        return False
    return any(address in network for network in networks)
