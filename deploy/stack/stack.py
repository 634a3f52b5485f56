"""The compose topology on one machine, from system packages: PostgreSQL, Redis, the
migrations, gunicorn with two workers, nginx in front, Prometheus scraping the API and the
nginx, PostgreSQL and Redis exporters — each a child process of this one.

Everything lives in one directory (`STACK_DIR`): data, rendered configs, and every log.
Reusing the directory reuses the database, the Redis snapshot and the JWT secret.
PostgreSQL runs without fsync (a stack for trying things out, end-to-end tests and load
tests, not a durable database).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import asyncpg

from deploy.stack.api import ApiServer
from deploy.stack.monitoring import Exporter, PrometheusServer
from deploy.stack.nginx import NginxServer
from deploy.stack.postgres import PostgresServer
from deploy.stack.process import ServerProcess
from deploy.stack.redis import RedisServer

DATABASE = "app"
WORKERS = 2
# The stack decides where its data lives and what it talks to; every other APP_* setting
# (and the nginx limits) may come from the caller's environment.
_OWNED = {"APP_DATABASE_URL", "APP_REDIS_URL", "APP_DATA_DIR"}
_PASSED_TO_NGINX = (
    "APP_MAX_REQUEST_BODY_BYTES",
    "APP_MAX_UPLOAD_BYTES",
    "APP_MAX_BATCH_FILES",
    "NGINX_EDGE_",
    "NGINX_TRUSTED_PROXIES",
)


class Stack:
    def __init__(
        self, directory: Path, http_port: int | None = None, env: Mapping[str, str] = os.environ
    ) -> None:
        self.directory = directory.resolve()
        self.env = dict(env)
        self.postgres = PostgresServer(self.directory / "postgres")
        self.redis = RedisServer(self.directory / "redis")
        self.api = ApiServer(self.directory / "api", {}, workers=WORKERS)
        self.nginx = NginxServer(
            self.directory / "nginx",
            upstream="",
            port=http_port,
            env={k: v for k, v in self.env.items() if k.startswith(_PASSED_TO_NGINX)}
            | {"PATH": self.env.get("PATH", os.defpath)},
        )
        self.exporters: list[Exporter] = []
        self.prometheus = PrometheusServer(self.directory / "prometheus", targets={})
        self._started: list[ServerProcess] = []

    def start(self) -> None:
        """Start everything in dependency order; on failure, stop what did start."""
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._run(self.postgres)
            self._create_database()
            self._run(self.redis)
            self.api.env = self._api_env()
            self.api.migrate()
            self._run(self.api)
            self.nginx.upstream = f"{self.api.host}:{self.api.port}"
            self._run(self.nginx)
            exporters_dir = self.directory / "exporters"
            self.exporters = [
                Exporter(
                    exporters_dir,
                    "prometheus-nginx-exporter",
                    [f"-nginx.scrape-uri={self.nginx.status_url}"],
                ),
                Exporter(
                    exporters_dir,
                    "prometheus-postgres-exporter",
                    env={
                        "DATA_SOURCE_NAME": self.postgres.url(DATABASE, driver="postgresql")
                        + "?sslmode=disable",
                        "PATH": self.env.get("PATH", os.defpath),
                    },
                ),
                Exporter(
                    exporters_dir, "prometheus-redis-exporter", [f"-redis.addr={self.redis.url()}"]
                ),
            ]
            for exporter in self.exporters:
                self._run(exporter)
            nginx_exporter, postgres_exporter, redis_exporter = self.exporters
            self.prometheus.targets = {
                "api": [f"{self.api.host}:{self.api.port}"],
                "nginx": [nginx_exporter.address],
                "postgres": [postgres_exporter.address],
                "redis": [redis_exporter.address],
            }
            self._run(self.prometheus)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop everything that was started, last started first."""
        while self._started:
            server = self._started.pop()
            try:
                server.stop()
            except Exception as exc:  # one server failing to stop must not leave the others
                print(f"stack: stopping {server.what} failed: {exc}", flush=True)  # noqa: T201

    def failed(self) -> list[ServerProcess]:
        """The servers that were started and have exited since."""
        return [server for server in self._started if not server.running]

    def endpoints(self) -> dict[str, str]:
        """Service name → URL, in the order they were started."""
        return {
            "postgres": self.postgres.url(DATABASE, driver="postgresql"),
            "redis": self.redis.url(),
            "api": self.api.url,
            "nginx": self.nginx.url,
            "prometheus": self.prometheus.url,
            **{
                e.package.removeprefix("prometheus-"): f"http://{e.address}" for e in self.exporters
            },
        }

    def _run(self, server: ServerProcess) -> None:
        server.start()
        self._started.append(server)

    def _create_database(self) -> None:
        with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # a reused STACK_DIR
            self.postgres.create_database(DATABASE)

    def _api_env(self) -> dict[str, str]:
        defaults = {
            "APP_ENV": "production",
            "APP_SECRET_KEY": self._secret_key(),
            "APP_LOG_FORMAT": "json",
            # nginx connects from here; only its X-Forwarded-For is believed.
            "APP_FORWARDED_ALLOW_IPS": self.nginx.host,
        }
        chosen = {k: v for k, v in self.env.items() if k not in _OWNED}
        return (
            defaults
            | chosen
            | {
                "APP_DATABASE_URL": self.postgres.url(DATABASE),
                "APP_REDIS_URL": self.redis.url(),
            }
        )

    def _secret_key(self) -> str:
        path = self.directory / "secret_key"
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(48))
        return path.read_text().strip()
