"""Liveness never touches the database; readiness reports it, including when it is down."""

from pathlib import Path

from fastapi.testclient import TestClient

from app import migrate
from app.main import create_app
from deploy.stack.postgres import PostgresServer
from tests.conftest import make_settings

HEALTHY = {"status": "ok", "checks": {"database": "ok", "redis": "disabled"}}
DOWN = {"status": "unavailable", "checks": {"database": "unavailable", "redis": "disabled"}}


def test_live_and_ready(client: TestClient) -> None:
    live = client.get("/health/live")
    assert live.json() == {"status": "ok", "checks": {}}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == HEALTHY
    # No cache between a load balancer and the instance may answer for it.
    assert live.headers["cache-control"] == ready.headers["cache-control"] == "no-store"


def test_readiness_follows_a_postgres_that_stops_and_comes_back(tmp_path: Path) -> None:
    with PostgresServer(tmp_path / "pg") as server:
        server.create_database("app")
        migrate.upgrade(server.url("app"))
        settings = make_settings(server.url("app"), tmp_path / "data", health_timeout_seconds=2)
        with TestClient(create_app(settings)) as client:
            assert client.get("/health/ready").json() == HEALTHY

            server.stop(mode="immediate")
            ready = client.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json() == DOWN
            assert client.get("/health/live").status_code == 200

            server.start()
            ready = client.get("/health/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json() == HEALTHY


def test_unreachable_database_is_not_ready_but_alive(tmp_path: Path) -> None:
    settings = make_settings(
        "postgresql+asyncpg://nobody@127.0.0.1:9/none", tmp_path, health_timeout_seconds=1
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/health/ready").status_code == 503
        assert client.get("/health/live").status_code == 200


def test_probes_and_scrapes_by_address_pass_the_allowed_hosts(
    database_url: str, tmp_path: Path
) -> None:
    """The image's HEALTHCHECK asks 127.0.0.1:8000, a kubelet the pod's IP, Prometheus
    the instance's address: with APP_ALLOWED_HOSTS set to the public name they got 400s,
    so every instance was unhealthy (restarted, never ready) and unscraped."""
    settings = make_settings(
        database_url,
        tmp_path / "data",
        allowed_hosts=["api.example.com"],
        metrics_allowed_networks=["127.0.0.0/8"],
    )
    app = create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1:8000", client=("127.0.0.1", 5000)) as client:
        assert client.get("/health/live").status_code == 200
        assert client.get("/health/ready").json() == HEALTHY
        assert client.get("/metrics").status_code == 200
        # Everything else still answers the public name only.
        assert client.get("/api/v1/items").status_code == 400
        public = client.get("/api/v1/items", headers={"Host": "api.example.com"})
        assert public.status_code == 200
