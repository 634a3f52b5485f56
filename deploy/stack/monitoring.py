"""Prometheus and the exporters of the native stack, from the machine's packages.

Prometheus runs the shipped `monitoring/prometheus/prometheus.yml`. That file takes every
target from `targets/<job>.yml` next to it (file-based discovery), which is the one thing
that differs between compose and this stack: the config and its rules are copied into the
stack's directory unchanged and this stack's own target files are written beside them.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from deploy.stack.process import ProgramServer, answers_ok, require_binary

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "monitoring" / "prometheus"
_WHY = "the native stack's monitoring runs {package} (Debian: apt-get install {package})"


class PrometheusServer(ProgramServer):
    """Prometheus scraping `targets` ({job: ["host:port", …]}) and itself (job prometheus).

    Layout: `base_dir/config` (prometheus.yml, rules/, targets/), `base_dir/data` (TSDB),
    `base_dir/prometheus.log`.
    """

    what = "prometheus"

    def __init__(self, base_dir: Path, targets: Mapping[str, Sequence[str]]) -> None:
        super().__init__(base_dir, "prometheus.log")
        self.targets = targets
        self.config_dir = base_dir / "config"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def write_config(self) -> Path:
        shutil.rmtree(self.config_dir, ignore_errors=True)
        shutil.copytree(PROMETHEUS_DIR, self.config_dir, ignore=shutil.ignore_patterns("targets"))
        (self.config_dir / "targets").mkdir()
        targets = {**self.targets, "prometheus": [f"{self.host}:{self.port}"]}
        for job, addresses in targets.items():
            listed = ", ".join(repr(address) for address in addresses)
            (self.config_dir / "targets" / f"{job}.yml").write_text(f"- targets: [{listed}]\n")
        return self.config_dir / "prometheus.yml"

    def command(self) -> list[str]:
        prometheus = require_binary("prometheus", why=_WHY.format(package="prometheus"))
        return [
            prometheus,
            f"--config.file={self.write_config()}",
            f"--storage.tsdb.path={self.base_dir / 'data'}",
            f"--web.listen-address={self.host}:{self.port}",
        ]

    def ready(self) -> bool:
        return answers_ok(f"{self.url}/-/ready")


class Exporter(ProgramServer):
    """One of Debian's Prometheus exporters, serving /metrics on its own port."""

    def __init__(
        self,
        base_dir: Path,
        package: str,
        arguments: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(base_dir, f"{package}.log")
        self.what = package
        self.package = package
        self.arguments = list(arguments)
        self.env = None if env is None else dict(env)

    @property
    def name(self) -> str:
        """`nginx-exporter` for `prometheus-nginx-exporter`."""
        return self.package.removeprefix("prometheus-")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        binary = require_binary(self.package, why=_WHY.format(package=self.package))
        # Debian's exporters take both -flag and --flag spellings for their Go flags.
        return [binary, f"--web.listen-address={self.address}", *self.arguments]

    def environment(self) -> dict[str, str] | None:
        return self.env

    def ready(self) -> bool:
        return answers_ok(f"http://{self.address}/metrics")
