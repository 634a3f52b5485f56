"""The image's HEALTHCHECK: exit 0 if the API answers /health/live on the address gunicorn
binds (``GUNICORN_BIND``, as in gunicorn.conf.py), else 1.

It reads the bind address instead of assuming port 8000, so a container started with
another ``GUNICORN_BIND`` is not reported unhealthy while it serves. Standard library
only: it runs every interval and must not import the application. TCP binds only.
"""

import os
import sys
import urllib.request

DEFAULT_BIND = "0.0.0.0:8000"
# A wildcard bind listens on loopback too; a specific address must be asked directly.
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}  # noqa: S104 - recognised, not bound


def live_url(bind: str) -> str:
    host, _, port = bind.rpartition(":")
    if host in _WILDCARDS:
        host = "127.0.0.1"
    return f"http://{host}:{port}/health/live"


# No proxy: urlopen would send this request to HTTP_PROXY when the container has one (for
# its outbound calls), and an API serving on loopback would be reported unhealthy.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def main() -> int:
    url = live_url(os.environ.get("GUNICORN_BIND") or DEFAULT_BIND)
    try:
        with _DIRECT.open(url, timeout=2) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:  # refused, timed out, or an HTTP error status
        sys.stderr.write(f"{url}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
