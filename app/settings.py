"""Service configuration: one pydantic-settings class, environment prefix ``APP_``.

The class refuses unsafe combinations instead of documenting them: in production a
missing or weak secret, SQLite, or password hashing below OWASP's minimum stop the
process at start-up, before it can accept a request.
"""

import contextlib
import ipaddress
import itertools
import os
import secrets
import sys
import urllib.parse
from pathlib import Path
from typing import Annotated, Literal

import limits
from fastapi import Depends, Request
from pydantic import (
    AfterValidator,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

MIN_SECRET_BYTES = 32
# What placeholder secrets are made of; six letters or more, so that a random secret
# contains one only by a chance of about one in ten million.
PLACEHOLDER_WORDS = (
    "change",
    "default",
    "example",
    "insecure",
    "password",
    "placeholder",
    "replace",
    "sample",
    "secret",
)
# How long a repeated or counting run must be to refuse a secret (``is_strong_secret``).
PATTERN_CHARS = 8
# OWASP password storage cheat sheet, Argon2id minimum: m=19 MiB, t=2, p=1.
OWASP_ARGON2_MEMORY_KIB = 19 * 1024
OWASP_ARGON2_TIME_COST = 2
OWASP_ARGON2_PARALLELISM = 1
# Rather than asyncpg's 60 s: the service's requests and `python -m app migrate` alike.
DB_CONNECT_TIMEOUT_SECONDS = 5.0

CommaList = Annotated[list[str], NoDecode]

# The async drivers the service is built on; any other URL failed only when first used,
# with a driver's traceback ("Can't load plugin: sqlalchemy.dialects:postgres").
DATABASE_DRIVERS = ("postgresql+asyncpg", "sqlite+aiosqlite")
REDIS_SCHEMES = ("redis", "rediss", "unix")


def _valid_rate_limit(value: str) -> str:
    limits.parse(value)  # "10/minute", "5/15 minutes"; raises ValueError otherwise
    return value


RateLimitString = Annotated[str, AfterValidator(_valid_rate_limit)]


class Settings(BaseSettings):
    # hide_input_in_errors: a refused configuration must not print the secret it refused.
    model_config = SettingsConfigDict(
        env_prefix="APP_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    env: Literal["development", "production", "test"] = "development"
    secret_key: SecretStr | None = None
    database_url: str | None = None
    redis_url: str | None = None
    redis_timeout_seconds: float = Field(default=0.25, gt=0)
    redis_breaker_seconds: float = Field(default=1.0, ge=0)
    cache_item_ttl_seconds: float = Field(default=300, gt=0)
    cache_list_ttl_seconds: float = Field(default=30, gt=0)
    cache_epoch_sync_seconds: float = Field(default=1.0, gt=0)
    rate_limit_default: RateLimitString = "300/minute"
    rate_limit_login: RateLimitString = "10/minute"
    rate_limit_login_failures: RateLimitString = "5/15 minutes"
    rate_limit_register: RateLimitString = "5/minute"
    rate_limit_uploads: RateLimitString = "30/minute"
    rate_limit_auth_fallback: RateLimitString = "3/minute"
    # Chat and private messages per user, all of their sockets together.
    rate_limit_chat_messages: RateLimitString = "20/10 seconds"
    # Open chat and notification sockets per user, across workers and replicas with Redis.
    ws_max_sockets_per_user: int = Field(default=20, ge=1)
    smtp_host: str | None = None
    smtp_port: int = Field(default=587, gt=0, le=65535)
    smtp_starttls: bool = True
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str = "no-reply@localhost"
    smtp_timeout_seconds: float = Field(default=10, gt=0)
    # Mail sent at once by one process: a mail server that is slow or down is not also
    # flooded with connections, each one held until it times out.
    smtp_max_connections: int = Field(default=2, ge=1, le=100)
    # Attempts per mail in all, when the server answers 4xx or cannot be reached (app/email.py).
    smtp_send_attempts: int = Field(default=4, ge=1, le=20)
    # Jobs of one kind (audit, email) in flight in one process, beyond which new ones are
    # dropped (counted and logged): a stalled dependency must not grow memory without end.
    background_max_jobs: int = Field(default=1000, ge=1)
    # gunicorn's worker count: in-process backends cannot be shared between workers.
    web_concurrency: int = Field(default=1, ge=1, validation_alias="WEB_CONCURRENCY")
    data_dir: Path = Path("./var")
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    max_batch_files: int = Field(default=10, gt=0)
    # Below Pillow's own 89.5 MP warning threshold: checked from the header, before decoding.
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    # Peak memory one image may take to be checked, cleaned and thumbnailed: it lowers the
    # pixel cap of the formats that cost more per pixel (app/files/images.py).
    max_image_memory_bytes: int = Field(default=320 * 1024 * 1024, gt=0)
    # Images decoded at once per process: each takes up to max_image_memory_bytes while it is.
    image_concurrency: int = Field(default=1, ge=1)
    # Any other request body (JSON, the login form), which is read whole before validation.
    max_request_body_bytes: int = Field(default=1024 * 1024, gt=0)
    log_format: Literal["json", "console"] | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # How long access lines may wait to be written together (app/observability/log_output.py).
    log_flush_seconds: float = Field(default=1.0, ge=0, le=60)
    metrics_allowed_networks: Annotated[list[IPvAnyNetwork], NoDecode] = []
    system_metrics_interval_seconds: float = Field(default=5.0, gt=0)

    cors_origins: CommaList = []
    allowed_hosts: CommaList = ["*"]
    forwarded_allow_ips: str = "127.0.0.1"
    docs_enabled: bool = True

    jwt_issuer: str = "fastapi-ops-service"
    jwt_audience: str = "fastapi-ops-service:api"
    access_token_ttl_seconds: int = Field(default=15 * 60, gt=0)
    refresh_token_ttl_seconds: int = Field(default=14 * 24 * 3600, gt=0)

    argon2_memory_kib: int = Field(default=OWASP_ARGON2_MEMORY_KIB, ge=OWASP_ARGON2_MEMORY_KIB)
    argon2_time_cost: int = Field(default=OWASP_ARGON2_TIME_COST, ge=OWASP_ARGON2_TIME_COST)
    argon2_parallelism: int = Field(default=OWASP_ARGON2_PARALLELISM, ge=OWASP_ARGON2_PARALLELISM)

    health_timeout_seconds: float = Field(default=1.0, gt=0)
    db_pool_size: int = Field(default=10, gt=0)
    db_max_overflow: int = Field(default=10, ge=0)
    # Fail fast (503) rather than hold a request for asyncpg's 60 s / SQLAlchemy's 30 s.
    db_connect_timeout_seconds: float = Field(default=DB_CONNECT_TIMEOUT_SECONDS, gt=0)
    db_pool_timeout_seconds: float = Field(default=10.0, gt=0)

    @field_validator("cors_origins", "allowed_hosts", "metrics_allowed_networks", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("secret_key", "redis_url", "smtp_host", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `APP_SECRET_KEY=` as .env.example has it, until filled in: an empty JWT key made
        # every login a 500, an empty Redis URL failed at start, and with an empty SMTP host
        # every e-mail was sent to a host named ""; unset, the service generates a development
        # secret, uses its in-process backends and logs e-mail instead of sending it.
        return None if value == "" else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: object) -> object:
        # `APP_LOG_LEVEL=info`, as most tools spell it, refused to start the service.
        return value.upper() if isinstance(value, str) else value

    # The messages name what is accepted, never the value: a URL carries its password.
    @field_validator("database_url")
    @classmethod
    def _supported_database_url(cls, value: str | None) -> str | None:
        if not value:
            return value
        try:
            driver = make_url(value).drivername
        except ArgumentError:
            raise ValueError(
                "APP_DATABASE_URL is not a URL: use "
                "postgresql+asyncpg://user:password@host:port/name"
            ) from None
        if driver not in DATABASE_DRIVERS:
            raise ValueError(
                f"APP_DATABASE_URL: {driver}:// is not supported, use "
                "postgresql+asyncpg://user:password@host:port/name (or sqlite+aiosqlite:///path)"
            )
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _addresses_or_networks(cls, value: str) -> str:
        # Read as uvicorn and gunicorn read it, except that they take an entry that is not
        # an address ("172.28.0.l0", "10.0.0.1/8") for a Unix socket's name and trust no
        # proxy by it: every client then had nginx's address, one login limit for all.
        for entry in filter(None, (part.strip() for part in value.split(","))):
            try:
                if "/" in entry:
                    ipaddress.ip_network(entry)
                elif entry != "*":
                    ipaddress.ip_address(entry)
            except ValueError:
                raise ValueError(
                    f"APP_FORWARDED_ALLOW_IPS: {entry!r} is not an IP address or network"
                    " (172.28.0.10, 10.0.0.0/8, or * for any)"
                ) from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _supported_redis_url(cls, value: str | None) -> str | None:
        if value is not None and urllib.parse.urlsplit(value).scheme not in REDIS_SCHEMES:
            raise ValueError(
                "APP_REDIS_URL must be redis://[:password@]host:port/db, rediss://… or unix://…"
            )
        return value

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> "Settings":
        if self.env != "production":
            return self
        problems = []
        if self.secret_key is None:
            problems.append("APP_SECRET_KEY is required")
        elif not is_strong_secret(self.secret_key.get_secret_value()):
            problems.append(
                f"APP_SECRET_KEY must be at least {MIN_SECRET_BYTES} bytes of random data"
            )
        if self.effective_database_url.startswith("sqlite"):
            problems.append("APP_DATABASE_URL must point to PostgreSQL, not SQLite")
        if self.redis_url is None and self.web_concurrency > 1:
            problems.append(
                "APP_REDIS_URL is required with more than one worker (WEB_CONCURRENCY > 1): "
                "caches, rate limits and chat would otherwise differ per worker"
            )
        if problems:
            raise ValueError("unsafe production configuration: " + "; ".join(problems))
        return self

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'app.db'}"

    @property
    def upload_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")

    @property
    def effective_log_format(self) -> Literal["json", "console"]:
        return self.log_format or ("json" if self.env == "production" else "console")

    def signing_key(self) -> str:
        """The JWT signing secret.

        Outside production a generated secret is kept in the data directory, so tokens
        survive a restart and every worker sharing the directory agrees on it; production
        always sets it (validated).
        """
        if self.secret_key is not None:
            return self.secret_key.get_secret_value()
        return _persistent_dev_secret(self.data_dir)


def load_or_exit() -> Settings:
    """The settings from the environment, for a process starting (``python -m app``,
    gunicorn's config): if refused, it exits 1 with the reasons, in one message without a
    traceback, and without the refused values (``hide_input_in_errors``)."""
    try:
        return Settings()
    except ValidationError as exc:
        sys.exit(f"configuration refused: {exc}")


def is_strong_secret(value: str) -> bool:
    """Whether ``value`` looks like random data, as far as a string can tell: at least
    ``MIN_SECRET_BYTES`` bytes with at least 10 distinct characters ("aaaa…" is long), no
    ``PLACEHOLDER_WORDS`` ("your-secret-key-here-change-in-production"), and no run of
    ``PATTERN_CHARS`` characters repeated ("0123456789" * 4) or counting up or down
    ("abcdefgh", "87654321"). Hex, base64 and passphrases pass: a random secret fails the
    last three only by a chance of about one in a million."""
    if len(value.encode()) < MIN_SECRET_BYTES or len(set(value)) < 10:
        return False
    if any(word in value.lower() for word in PLACEHOLDER_WORDS):
        return False
    runs = [value[start : start + PATTERN_CHARS] for start in range(len(value) - PATTERN_CHARS + 1)]
    return len(set(runs)) == len(runs) and not any(map(_counts, runs))


def _counts(run: str) -> bool:
    """Whether each character of ``run`` is the one after, or each the one before, the last."""
    steps = {ord(b) - ord(a) for a, b in itertools.pairwise(run)}
    return steps in ({1}, {-1})


def _persistent_dev_secret(data_dir: Path) -> str:
    path = data_dir / "secret_key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".secret_key.{secrets.token_hex(8)}"
        tmp.write_text(secrets.token_urlsafe(48), encoding="utf-8")
        tmp.chmod(0o600)
        # link() is atomic and fails if the name exists: two workers starting together
        # agree on whichever secret was linked first, and nobody reads a half-written file.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        tmp.unlink()
    return path.read_text(encoding="utf-8").strip()


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]
