"""The settings class refuses unsafe production configurations and parses env lists."""

import base64
import random
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings

STRONG = "kM9v-Qz2xT7rL0pWn5sB8yHc3dFj6gAe"
POSTGRES = "postgresql+asyncpg://app@db/app"


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_production_with_strong_secret_and_postgres_starts() -> None:
    production = settings(env="production", secret_key=STRONG, database_url=POSTGRES)
    assert production.signing_key() == STRONG


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"database_url": POSTGRES}, "APP_SECRET_KEY is required"),
        ({"database_url": POSTGRES, "secret_key": "short"}, "at least 32 bytes"),
        ({"database_url": POSTGRES, "secret_key": "a" * 64}, "at least 32 bytes"),
        ({"secret_key": STRONG}, "not SQLite"),
        ({"secret_key": STRONG, "database_url": "sqlite+aiosqlite:///x.db"}, "not SQLite"),
    ],
)
def test_production_refuses_unsafe_configuration(values: dict, complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        settings(env="production", **values)


@pytest.mark.parametrize(
    "secret",
    [
        "your-secret-key-here-change-in-production",
        "please-replace-me-with-32-random-bytes",
        "0123456789" * 4,
        "abcdefghijklmnopqrstuvwxyz123456",
        "Zq8#" + "tralala-" * 4 + "kV2!",
    ],
)
def test_production_refuses_a_placeholder_secret(secret: str) -> None:
    with pytest.raises(ValidationError, match="at least 32 bytes of random data"):
        settings(env="production", secret_key=secret, database_url=POSTGRES)


def test_production_accepts_random_secrets_however_they_are_written() -> None:
    """``secrets.token_urlsafe(32)``, ``openssl rand -hex 32``, ``openssl rand -base64 32``:
    random bytes are never taken for a placeholder (seeded, so every run checks the same)."""
    rng = random.Random(32)
    for _ in range(500):
        raw = rng.randbytes(32)
        for secret in (
            base64.urlsafe_b64encode(raw).rstrip(b"=").decode(),
            raw.hex(),
            base64.b64encode(raw).decode(),
        ):
            assert settings(env="production", secret_key=secret, database_url=POSTGRES)


def test_production_is_refused_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_ENV", "production")
    with pytest.raises(ValidationError, match="APP_SECRET_KEY is required"):
        Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "values",
    [{"argon2_memory_kib": 8192}, {"argon2_time_cost": 1}, {"argon2_parallelism": 0}],
)
def test_password_hashing_below_owasp_minimum_is_refused(values: dict) -> None:
    with pytest.raises(ValidationError):
        settings(**values)


def test_development_secret_is_generated_once_and_kept(tmp_path: Path) -> None:
    first = settings(data_dir=tmp_path).signing_key()
    second = settings(data_dir=tmp_path).signing_key()
    assert first == second
    assert len(first) >= 32
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600
    assert settings(data_dir=tmp_path / "other").signing_key() != first


def test_embedded_default_database_lives_in_the_data_dir(tmp_path: Path) -> None:
    embedded = settings(data_dir=tmp_path)
    assert embedded.effective_database_url == f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    assert embedded.is_sqlite


def test_lists_come_from_comma_separated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_ALLOWED_HOSTS", "api.example.com, *.example.org")
    monkeypatch.setenv("APP_CORS_ORIGINS", "https://a.example.com")
    loaded = Settings(_env_file=None)  # type: ignore[call-arg]
    assert loaded.allowed_hosts == ["api.example.com", "*.example.org"]
    assert loaded.cors_origins == ["https://a.example.com"]


README = Path(__file__).resolve().parents[1] / "README.md"
# Defaults the reference describes in words, because they are derived from something else:
# the data directory, APP_ENV, or the CPUs gunicorn may run on (deploy/gunicorn.conf.py).
DERIVED_DEFAULTS = {"APP_DATABASE_URL", "APP_LOG_FORMAT", "WEB_CONCURRENCY"}


def setting_names() -> dict[str, str]:
    """Each setting's variable and its field name."""
    return {
        alias if isinstance(alias := field.validation_alias, str) else f"APP_{name.upper()}": name
        for name, field in Settings.model_fields.items()
    }


def reference_defaults() -> dict[str, str | None]:
    """The configuration reference's rows: variable → documented default, the text between
    backticks (``None`` when the default is told in words: "unset", "empty (CORS off)"). A
    row naming several variables (`A` / `B`) gives each its own default (`1` / `2`)."""
    readme = README.read_text()
    section = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    section = section.split("**Deployment variables**", 1)[0]
    rows: dict[str, str | None] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = line.split("|")
        names = re.findall(r"`([A-Z0-9_]+)`", cells[1])
        defaults = re.findall(r"`([^`]*)`", cells[2])
        # Values that do not pair up with the names describe a derived default.
        paired = len(defaults) == len(names)
        rows.update(zip(names, defaults, strict=True) if paired else dict.fromkeys(names))
    return rows


def test_the_readme_documents_every_setting() -> None:
    """The configuration reference is the operators' list: a setting missing from it is
    one nobody knows how to set."""
    readme = README.read_text()
    # The first cell of a table row names one variable or several (`A` / `B`).
    documented = {
        name
        for line in readme.splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([A-Z0-9_]+)`", line.split("|")[1])
    }
    names = list(setting_names())
    assert len(names) > 40
    assert [name for name in names if name not in documented] == []


def test_the_readme_gives_every_setting_its_real_default() -> None:
    """A default the reference gets wrong is a limit or timeout operators plan with and do
    not get: each documented value, parsed as the environment would give it, must be the
    field's default, and a setting without one (unset, generated) must not show a value."""
    documented = reference_defaults()
    checked = []
    for variable, field in setting_names().items():
        if variable in DERIVED_DEFAULTS:
            continue
        default = Settings.model_fields[field].default
        text = documented[variable]
        if default is None or default == []:
            assert text is None, f"{variable}: the README gives {text!r}, the code has none"
            continue
        assert text is not None, f"{variable}: the README gives no default, the code {default!r}"
        parsed = getattr(settings(**{field: text}), field)
        assert parsed == default, f"{variable}: the README says {text!r}, the code {default!r}"
        checked.append(variable)
    assert len(checked) > 35


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"database_url": "postgres://app:pw-in-url@db/app"}, "postgres:// is not supported"),
        ({"database_url": "postgresql://app:pw-in-url@db/app"}, "postgresql:// is not"),
        ({"database_url": "app:pw-in-url@db:5432/app"}, "APP_DATABASE_URL is not a URL"),
        ({"redis_url": "pw-in-url@redis:6379"}, "APP_REDIS_URL must be redis://"),
        ({"redis_url": "http://:pw-in-url@redis:6379/0"}, "APP_REDIS_URL must be redis://"),
    ],
)
def test_an_unusable_url_is_refused_at_start_without_its_password(
    values: dict, complaint: str
) -> None:
    """Before, these started and failed at the first connection, or at start-up, with a
    driver's traceback ("Can't load plugin: sqlalchemy.dialects:postgres")."""
    with pytest.raises(ValidationError, match=re.escape(complaint)) as refused:
        settings(**values)
    assert "pw-in-url" not in str(refused.value)


def test_an_empty_redis_url_means_the_embedded_backends() -> None:
    assert settings(redis_url="").redis_url is None


def test_an_empty_secret_key_is_a_missing_one(tmp_path: Path) -> None:
    """`cp .env.example .env` leaves `APP_SECRET_KEY=`: a development server signed its
    tokens with an empty key, which PyJWT refuses, so every login was a 500."""
    development = settings(secret_key="", data_dir=tmp_path)
    assert len(development.signing_key()) >= 32  # the generated one
    with pytest.raises(ValidationError, match="APP_SECRET_KEY is required"):
        settings(env="production", secret_key="", database_url=POSTGRES)


@pytest.mark.parametrize("typo", ["172.28.0.l0", "10.0.0.1/8", "10.0.0.0/33", "nginx"])
def test_a_trusted_proxy_that_is_no_address_is_refused(typo: str) -> None:
    """uvicorn took these for Unix socket names and trusted no proxy by them: behind nginx,
    every client had nginx's address and they all shared one login rate limit."""
    with pytest.raises(ValidationError, match=re.escape(f"{typo!r} is not an IP address")):
        settings(forwarded_allow_ips=f"127.0.0.1, {typo}")


@pytest.mark.parametrize("proxies", ["127.0.0.1", "172.28.0.10, 10.0.0.0/8", "::1", "*"])
def test_trusted_proxies_by_address_or_network(proxies: str) -> None:
    assert settings(forwarded_allow_ips=proxies).forwarded_allow_ips == proxies


def test_an_empty_smtp_host_means_mail_is_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    """`APP_SMTP_HOST=` (a template's blank line) was taken for a host named "": every
    e-mail was sent to no server instead of being logged, as documented for an unset host."""
    monkeypatch.setenv("APP_SMTP_HOST", "")
    assert Settings(_env_file=None).smtp_host is None  # type: ignore[call-arg]


@pytest.mark.parametrize("level", ["info", "Debug", "WARNING"])
def test_the_log_level_in_any_case(level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`APP_LOG_LEVEL=info` refused to start the service: only upper case was accepted."""
    monkeypatch.setenv("APP_LOG_LEVEL", level)
    assert Settings(_env_file=None).log_level == level.upper()  # type: ignore[call-arg]
