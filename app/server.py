"""The uvicorn options the service always runs with: ``python -m app serve`` passes them
to uvicorn, and gunicorn's workers get them too (deploy/gunicorn.conf.py). A module of
its own so that gunicorn's master can import it without importing the application."""

from typing import Any

from app.realtime.schemas import SERVER_MAX_FRAME_BYTES

SERVER_OPTIONS: dict[str, Any] = {
    # The largest websocket frame the server buffers before the app sees it.
    "ws_max_size": SERVER_MAX_FRAME_BYTES,
    # No `Server: uvicorn` header: it would name the software to every client.
    "server_header": False,
}
