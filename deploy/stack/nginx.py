"""nginx in front of the API, from the shipped templates in `nginx/`.

Compose hands `nginx/templates` to the nginx image, whose entrypoint sources
`nginx/entrypoint.d/*.envsh` and then renders every `*.template` with envsubst. This module
does the same for the native stack: the same script computes the values, the same
`${NAME}` substitution (only names that are set) writes the same files, so the two
deployments cannot drift apart.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from deploy.stack.process import (
    ProgramServer,
    accepts_tcp,
    free_port,
    prepare_dir_for_user,
    require_binary,
)

NGINX_DIR = Path(__file__).resolve().parents[2] / "nginx"
TEMPLATES = NGINX_DIR / "templates"
LIMITS_SCRIPT = NGINX_DIR / "entrypoint.d" / "19-app-limits.envsh"

_WHY = "the edge of the native stack is nginx (Debian: apt-get install nginx)"
# envsubst replaces both forms for every name it was given.
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
# The user nginx's workers run as when the master is root (no `user` directive).
_WORKER_USER = "nobody"


def template_values(env: Mapping[str, str]) -> dict[str, str]:
    """`env` after the limits script has added its defaults and derived values."""
    result = subprocess.run(
        ["sh", "-c", '. "$1" && env -0', "sh", str(LIMITS_SCRIPT)],  # noqa: S607
        env=dict(env),
        capture_output=True,
        check=True,
    )
    items = result.stdout.decode().split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


def render(values: Mapping[str, str], out_dir: Path) -> Path:
    """Write every template into `out_dir` (same relative paths); returns nginx.conf's path."""

    def substitute(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        return values.get(name, match[0])

    for template in sorted(TEMPLATES.rglob("*.template")):
        target = out_dir / template.relative_to(TEMPLATES).with_suffix("")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_VARIABLE.sub(substitute, template.read_text()))
    return out_dir / "nginx.conf"


class NginxServer(ProgramServer):
    """nginx proxying to `upstream` (host:port), listening on `port` (free if None).

    Layout: `base_dir/conf` (the rendered files), `base_dir/run` (pid, temp files),
    `base_dir/access.log` (JSON lines), `base_dir/error.log`.
    """

    what = "nginx"
    # Graceful: stop accepting, finish the requests in flight, then exit.
    stop_signal = signal.SIGQUIT

    def __init__(
        self,
        base_dir: Path,
        upstream: str,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(base_dir, "error.log")
        self.upstream = upstream
        self._port = port
        self.status_port = free_port()
        self.env = dict(env or {})
        self.conf_dir = base_dir / "conf"
        self.run_dir = base_dir / "run"
        self.access_log = base_dir / "access.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def status_url(self) -> str:
        return f"http://{self.host}:{self.status_port}/stub_status"

    def write_config(self) -> Path:
        """Render the templates for this server; returns the path of nginx.conf."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._port is None:
            self._port = free_port()
        values = template_values(
            self.env
            | {
                "NGINX_LISTEN": f"{self.host}:{self.port}",
                "NGINX_STATUS_LISTEN": f"{self.host}:{self.status_port}",
                "NGINX_UPSTREAM": self.upstream,
                "NGINX_RUN_DIR": str(self.run_dir.resolve()),
                "NGINX_ACCESS_LOG": str(self.access_log.resolve()),
                "NGINX_ERROR_LOG": str(self.log_path.resolve()),
            }
        )
        # Workers run as nobody when the master is root, and write their temp files here.
        if os.geteuid() == 0:
            prepare_dir_for_user(self.run_dir, _WORKER_USER)
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        return render(values, self.conf_dir)

    def check_config(self) -> str:
        """`nginx -t` on the files `write_config()` wrote; returns its report or raises."""
        result = subprocess.run(self._nginx("-t"), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{result.stderr}")
        return result.stderr

    def command(self) -> list[str]:
        self.write_config()
        return self._nginx("-g", "daemon off;")

    def ready(self) -> bool:
        return accepts_tcp(self.host, self.port) and accepts_tcp(self.host, self.status_port)

    def _nginx(self, *arguments: str) -> list[str]:
        nginx = require_binary("nginx", why=_WHY, extra_dirs=["/usr/sbin"])
        return [
            nginx,
            "-p", str(self.base_dir.resolve()),
            "-c", str((self.conf_dir / "nginx.conf").resolve()),
            # Where nginx logs before it has read error_log from the configuration.
            "-e", str(self.log_path.resolve()),
            *arguments,
        ]  # fmt: skip
