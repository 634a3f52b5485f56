"""The API as it runs in production: gunicorn with `deploy/gunicorn.conf.py`, uvicorn
workers, the Prometheus multiprocess directory, JSON logs. The image's entrypoint runs the
same configuration; only the environment differs."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from deploy.stack.process import ProgramServer, answers_ok, run_logged

GUNICORN_CONF = Path(__file__).resolve().parents[1] / "gunicorn.conf.py"


class ApiServer(ProgramServer):
    """gunicorn serving the app with the `APP_*` settings in `env`.

    Layout: `base_dir/data` (APP_DATA_DIR: uploads), `base_dir/prometheus` (multiprocess
    metrics, emptied on every start), `base_dir/api.log` (JSON lines), `base_dir/migrate.log`.
    """

    what = "gunicorn"
    # Above gunicorn's graceful timeout (30 s), so requests in flight can finish.
    stop_timeout = 40.0

    def __init__(self, base_dir: Path, env: Mapping[str, str], workers: int = 2) -> None:
        super().__init__(base_dir, "api.log")
        self.env = dict(env)
        self.workers = workers

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def environment(self) -> dict[str, str]:
        return self.env | {
            "APP_DATA_DIR": str((self.base_dir / "data").resolve()),
            "PROMETHEUS_MULTIPROC_DIR": str((self.base_dir / "prometheus").resolve()),
            "WEB_CONCURRENCY": str(self.workers),
            "GUNICORN_BIND": f"{self.host}:{self.port}",
        }

    def command(self) -> list[str]:
        return [sys.executable, "-m", "gunicorn", "--config", str(GUNICORN_CONF)]

    def ready(self) -> bool:
        return answers_ok(f"{self.url}/health/ready")

    def migrate(self) -> None:
        """`python -m app migrate`, as compose's one-shot `migrate` service runs it."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        run_logged(
            [sys.executable, "-m", "app", "migrate"],
            self.base_dir / "migrate.log",
            what="python -m app migrate",
            env=self.env,
            cwd=self.base_dir,
        )
