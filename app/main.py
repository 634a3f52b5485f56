"""The application factory and its lifespan; nothing else lives here."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from sqlalchemy.engine import make_url

import app
from app import health
from app.auth.router import router as auth_router
from app.db import create_engine, create_sessionmaker
from app.errors import install_error_handlers
from app.items.router import router as items_router
from app.middleware import RequestIdMiddleware, SecurityHeadersMiddleware, TrustedHostMiddleware
from app.security import PasswordHasher, TokenCodec
from app.settings import Settings
from app.users.router import router as users_router


@asynccontextmanager
async def lifespan(application: FastAPI) -> AsyncIterator[None]:
    settings: Settings = application.state.settings
    url = settings.effective_database_url
    if settings.is_sqlite and (path := make_url(url).database):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, settings)
    application.state.engine = engine
    application.state.sessionmaker = create_sessionmaker(engine)
    application.state.hasher = PasswordHasher(settings)
    application.state.tokens = TokenCodec(settings)
    try:
        yield
    finally:
        await engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    docs = settings.docs_enabled
    application = FastAPI(
        title="FastAPI ops service",
        version=app.__version__,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    application.state.settings = settings
    install_error_handlers(application)

    api = APIRouter(prefix="/api/v1")
    for router in (auth_router, users_router, items_router):
        api.include_router(router)
    application.include_router(api)
    application.include_router(health.router)

    # add_middleware wraps: the last added runs first. Order, outermost first:
    # request id → security headers → trusted host → CORS → routes.
    if settings.cors_origins:
        application.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    application.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts)
    application.add_middleware(SecurityHeadersMiddleware)
    application.add_middleware(RequestIdMiddleware)
    return application
