"""The container files are read by their real linters, and the entrypoint behaves as the
image relies on: it empties the metrics directory before gunicorn, and passes other
commands through. The HEALTHCHECK script probes the address gunicorn binds."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.stack.process import free_port, require_binary
from tests.app_server import app_server

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
VENV_BIN = str(Path(sys.executable).parent)


def run(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "loadtests/Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    hadolint = require_binary("hadolint", why="Dockerfile lint", extra_dirs=[VENV_BIN])
    result = run(hadolint, "--failure-threshold", "warning", dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def shell_scripts() -> list[Path]:
    """Every shell script in the repository: *.sh, the nginx image's *.envsh, CI's run."""
    found = [ROOT / ".ci" / "run"]
    for pattern in ("*.sh", "*.envsh"):
        found += [p for p in ROOT.rglob(pattern) if ".venv" not in p.relative_to(ROOT).parts]
    return sorted(found)


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = require_binary("shellcheck", why="shell script lint (apt: shellcheck)")
    scripts = shell_scripts()
    assert {ENTRYPOINT, ROOT / "nginx" / "entrypoint.d" / "19-app-limits.envsh"} <= set(scripts)
    result = run(shellcheck, *map(str, scripts))
    assert result.returncode == 0, result.stdout + result.stderr


def entrypoint_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APP_")}
    return env | {
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "APP_ENV": "test",
        "APP_DATA_DIR": str(tmp_path / "data"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
    }


def test_serve_runs_gunicorn_with_the_shipped_config(tmp_path: Path) -> None:
    # Emptying the metrics directory at start is gunicorn.conf.py's (tests/test_gunicorn.py).
    result = run(str(ENTRYPOINT), "serve", "--check-config", env=entrypoint_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_serve_refuses_an_unsafe_configuration_in_one_message(tmp_path: Path) -> None:
    """The image's default command with a weak secret: the reason, as `python -m app`
    gives it, not gunicorn's "Failed to read config file" and a traceback before it."""
    weak = "weak-secret-value"
    env = entrypoint_env(tmp_path) | {"APP_ENV": "production", "APP_SECRET_KEY": weak}
    refused = run(str(ENTRYPOINT), "serve", env=env)
    assert refused.returncode == 1
    assert refused.stderr.startswith("configuration refused: ")
    assert "APP_SECRET_KEY must be at least 32 bytes" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert weak not in refused.stdout + refused.stderr


def test_other_commands_pass_through(tmp_path: Path) -> None:
    result = run(str(ENTRYPOINT), "python", "-m", "app", "--help", env=entrypoint_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "create-superuser" in result.stdout


def test_healthcheck_probes_the_port_gunicorn_binds(tmp_path: Path) -> None:
    env = entrypoint_env(tmp_path) | {"APP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/app.db"}
    with app_server(tmp_path, env, tmp_path / "server.log") as (base, _):
        port = base.rsplit(":", 1)[1]
        serving = run(
            sys.executable, str(HEALTHCHECK), env=env | {"GUNICORN_BIND": f"0.0.0.0:{port}"}
        )
        assert serving.returncode == 0, serving.stderr
        # A container given a proxy for its outbound calls still probes itself directly.
        proxy = f"http://127.0.0.1:{free_port()}"
        proxied = env | {"GUNICORN_BIND": f"0.0.0.0:{port}"}
        proxied |= {"HTTP_PROXY": proxy, "http_proxy": proxy, "ALL_PROXY": proxy}
        through_proxy = run(sys.executable, str(HEALTHCHECK), env=proxied)
        assert through_proxy.returncode == 0, through_proxy.stderr
        elsewhere = env | {"GUNICORN_BIND": f"0.0.0.0:{free_port()}"}
        refused = run(sys.executable, str(HEALTHCHECK), env=elsewhere)
        assert refused.returncode == 1
        assert "/health/live" in refused.stderr
