"""The uvicorn options the service always runs with: ``python -m app serve`` passes them
to uvicorn, and gunicorn's workers get them too (deploy/gunicorn.conf.py). A module of
its own so that gunicorn's master can import it without importing the application."""

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from app.realtime.schemas import SERVER_MAX_FRAME_BYTES


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets protocol (the one it picks by default), but a client that sends
    pings without reading the pongs is no longer read. uvicorn writes each pong as its
    ping arrives, whatever the write buffer holds, so such a client, one that has not even
    authenticated, grew a worker's memory by its pings' size (60 MiB in 4 s). Here reading
    stops once the pongs fill the transport's buffer and resumes as they drain: the
    client's own sends block instead, as for the app's messages."""

    pong_paused = False

    def handle_ping(self) -> None:
        super().handle_ping()
        if not self.writable.is_set() and not self.pong_paused:
            self.pong_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.pong_paused:
            self.pong_paused = False
            if not self.read_paused:  # paused for the app as well: receive() resumes it
                self.transport.resume_reading()

    async def receive(self) -> Any:
        message = await super().receive()
        if self.pong_paused:  # the app has read, but the pongs have not drained yet
            self.transport.pause_reading()
        return message


SERVER_OPTIONS: dict[str, Any] = {
    # The largest websocket frame the server buffers before the app sees it.
    "ws_max_size": SERVER_MAX_FRAME_BYTES,
    "ws": WebSocketProtocol,
    # No `Server: uvicorn` header: it would name the software to every client.
    "server_header": False,
}
