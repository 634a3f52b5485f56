"""The shipped nginx templates, rendered as the native stack renders them (and as the nginx
image's entrypoint does for compose), are accepted by the real `nginx -t`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from deploy.stack.nginx import TEMPLATES, NginxServer, render, template_values
from deploy.stack.process import require_binary

COMPOSE_VALUES = {  # what docker-compose.yml gives the nginx service
    "NGINX_LISTEN_PORT": "80",
    "NGINX_STATUS_PORT": "8081",
    "NGINX_UPSTREAM": "api:8000",
    "APP_MAX_UPLOAD_BYTES": "10485760",
    "APP_MAX_BATCH_FILES": "10",
}


def rendered(server: NginxServer) -> str:
    return "\n".join(p.read_text() for p in sorted(server.conf_dir.rglob("*.conf")))


def test_nginx_accepts_the_rendered_configuration(tmp_path: Path) -> None:
    server = NginxServer(tmp_path / "nginx", upstream="127.0.0.1:8000")
    server.write_config()
    report = server.check_config()
    assert "test is successful" in report
    text = rendered(server)
    assert "${" not in text  # every template variable has a value
    assert "server_tokens off;" in text


def test_nginx_t_really_reads_the_files(tmp_path: Path) -> None:
    server = NginxServer(tmp_path / "nginx", upstream="127.0.0.1:8000")
    server.write_config()
    site = server.conf_dir / "sites" / "api.conf"
    site.write_text(
        site.read_text().replace("proxy_request_buffering off;", "proxy_request_buffering maybe;")
    )
    # check_config renders again from the templates, so run nginx -t on the broken copy here.
    import subprocess

    result = subprocess.run(server._nginx("-t"), capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "proxy_request_buffering" in result.stderr


@pytest.mark.parametrize("cap", [1024 * 1024, 10 * 1024 * 1024])
def test_upload_body_limits_follow_the_apps_cap(tmp_path: Path, cap: int) -> None:
    server = NginxServer(
        tmp_path / "nginx", upstream="127.0.0.1:8000", env={"APP_MAX_UPLOAD_BYTES": str(cap)}
    )
    server.write_config()
    site = (server.conf_dir / "sites" / "api.conf").read_text()
    limits = re.findall(r"client_max_body_size (\d+);", site)
    # One file plus multipart framing; a batch of APP_MAX_BATCH_FILES (10) of those.
    assert limits == [str(cap + 65536), str((cap + 65536) * 10)]


def test_nginx_accepts_the_compose_rendering(tmp_path: Path) -> None:
    # nginx -t resolves upstream names, and there is no `api` host outside compose: only
    # that one value is replaced. Listening on 80 is not tried by -t.
    values = template_values(
        {"PATH": "/usr/bin:/bin"} | COMPOSE_VALUES | {"NGINX_UPSTREAM": "127.0.0.1:8000"}
    )
    conf = render(values | {"NGINX_RUN_DIR": str(tmp_path / "run")}, tmp_path / "conf")
    (tmp_path / "run").mkdir()
    nginx = require_binary("nginx", why="nginx -t", extra_dirs=["/usr/sbin"])
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", "/dev/stderr"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "conf" / "nginx.conf").read_text()
    assert "access_log /dev/stdout edge_json;" in text


def test_the_compose_values_render_every_variable() -> None:
    values = template_values({"PATH": "/usr/bin:/bin"} | COMPOSE_VALUES)
    assert values["NGINX_LISTEN"] == "80"
    assert values["NGINX_STATUS_LISTEN"] == "8081"
    assert values["NGINX_ACCESS_LOG"] == "/dev/stdout"
    used = {
        match
        for template in TEMPLATES.rglob("*.template")
        for match in re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", template.read_text())
    }
    assert used <= values.keys(), used - values.keys()
