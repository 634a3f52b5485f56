"""The application factory and its lifespan; nothing else lives here."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from opentelemetry.sdk.trace import TracerProvider

import app
from app import health, migrate
from app.auth.router import router as auth_router
from app.backends import create_backends
from app.backends.storage import LocalStorage
from app.background import BackgroundJobs
from app.db import create_engine, create_sessionmaker
from app.email import Mailer
from app.errors import install_error_handlers
from app.files import service as files_service
from app.files.router import router as files_router
from app.items.cache import ItemCache
from app.items.router import router as items_router
from app.middleware import HttpMiddleware
from app.observability import exposition, tracing
from app.observability.log_output import flush_all
from app.observability.logging import configure_logging
from app.observability.system import SystemSampler
from app.rate_limits import RatePolicy, default_limit
from app.realtime import service as realtime_service
from app.realtime.router import router as realtime_router
from app.security import PasswordHasher, TokenCodec
from app.settings import Settings
from app.users.router import router as users_router


@asynccontextmanager
async def lifespan(application: FastAPI) -> AsyncIterator[None]:
    settings: Settings = application.state.settings
    url = settings.effective_database_url
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.ensure_directory(url)
    engine = create_engine(url, settings)
    provider: TracerProvider | None = application.state.tracer_provider
    if provider is not None:
        tracing.instrument_clients(engine, provider)
    application.state.engine = engine
    # Readiness has a connection of its own: taken from the requests' pool, it waited for
    # one whenever load used them all, and every replica turned unready at once.
    application.state.probe_engine = probe_engine = create_engine(url, settings, connections=1)
    application.state.sessionmaker = create_sessionmaker(engine)
    backends = create_backends(settings, application.state.sessionmaker)
    application.state.backends = backends
    application.state.rate_policy = RatePolicy(backends.limiter, settings)
    application.state.jobs = jobs = BackgroundJobs(settings.background_max_jobs)
    application.state.mailer = Mailer(settings)
    application.state.item_cache = ItemCache(
        backends.cache, settings.cache_item_ttl_seconds, settings.cache_list_ttl_seconds
    )
    application.state.storage = storage = LocalStorage(settings.upload_dir)
    application.state.hasher = PasswordHasher(settings)
    application.state.tokens = TokenCodec(settings)
    sampler = SystemSampler(settings.data_dir, settings.system_metrics_interval_seconds)
    # Each catches its own errors: they end only when cancelled.
    with tracing.untraced():
        loops = [
            asyncio.create_task(sampler.run(), name="system-metrics"),
            asyncio.create_task(files_service.sweep_stale_stages(storage), name="staging-sweep"),
        ]
    try:
        yield
    finally:
        # The server has cancelled the requests still running: uploads clean up first.
        await files_service.drain_uploads(timeout_seconds=5)
        for task in loops:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # First, so that leave events still go out through Redis.
        await realtime_service.close_connections(application)
        await jobs.drain(timeout_seconds=5)
        await backends.close()
        await engine.dispose()
        await probe_engine.dispose()
        if provider is not None:
            tracing.uninstrument_clients()
            provider.shutdown()
        # Access lines held back for a moment are written before the process stops.
        flush_all()


def create_app(
    settings: Settings | None = None, *, tracer_provider: TracerProvider | None = None
) -> FastAPI:
    """Build the service. ``tracer_provider`` overrides the one made from ``OTEL_*``."""
    settings = settings or Settings()
    install_logging(settings)
    docs = settings.docs_enabled
    application = FastAPI(
        title="FastAPI ops service",
        version=app.__version__,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
        # A 404 for /api/v1/items/, not a 307 to a URL built from the Host header.
        redirect_slashes=False,
    )
    application.state.settings = settings
    application.state.tracer_provider = tracer_provider or tracing.tracer_provider_from_env()
    install_error_handlers(application)

    api = APIRouter(prefix="/api/v1", dependencies=[Depends(default_limit)])
    for router in (auth_router, users_router, items_router, files_router, realtime_router):
        api.include_router(router)
    application.include_router(api)
    application.include_router(health.router)
    application.include_router(exposition.router)

    install_middleware(application, settings, traced=application.state.tracer_provider is not None)
    if application.state.tracer_provider is not None:
        tracing.instrument_app(application, application.state.tracer_provider)
    return application


def install_logging(settings: Settings) -> None:
    """Logging as the service configures it (also used by bench/http_overhead.py)."""
    configure_logging(
        settings.log_level,
        settings.effective_log_format,
        flush_seconds=settings.log_flush_seconds,
    )


def install_middleware(application: FastAPI, settings: Settings, *, traced: bool) -> None:
    """Every middleware of the service (tracing aside; ``traced``: whether it is on). A
    function of its own so that bench/http_overhead.py measures exactly this stack on a
    trivial app."""
    # add_middleware wraps: the last added runs first. Order, outermost first:
    # HttpMiddleware (trusted host, request id, security headers, metrics, access line)
    # → CORS → routes (OpenTelemetry, when on, wraps both so every layer sees the span).
    # Rejected hosts are thus counted and logged, with their request id.
    if settings.cors_origins:
        application.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    application.add_middleware(
        HttpMiddleware,
        allowed_hosts=settings.allowed_hosts,
        traced=traced,
        max_body_bytes=settings.max_request_body_bytes,
    )
