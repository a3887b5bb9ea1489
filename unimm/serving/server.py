"""Running the app with uvicorn: in the foreground (``unimm serve``), or in a background thread on a free
port (tests, benchmarks, notebooks)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def bind_socket(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one), or a one-line ``OSError`` (port taken, say).
    Binding before the model loads makes a taken port fail in a second, not after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def _uvicorn_server(app: FastAPI, access_log: bool) -> uvicorn.Server:
    # log_config=None: uvicorn's records go through the logging the caller set up (the CLI's format).
    config = uvicorn.Config(app, log_config=None, access_log=access_log, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(app: FastAPI, sock: socket.socket, access_log: bool = True) -> None:
    """Serve ``app`` on the bound ``sock`` until Ctrl-C."""
    host, port = sock.getsockname()[:2]
    if host not in LOOPBACK:
        logger.warning("listening on %s: anyone who can reach this machine can use the model", host)
    logger.info("serving on http://%s:%d (the chat page is at /)", host, port)
    _uvicorn_server(app, access_log).run(sockets=[sock])


class BackgroundServer:
    """``with BackgroundServer(app) as server: httpx.get(server.url + "/health")``: the app served by
    uvicorn in a daemon thread on ``host`` and a free port, stopped on exit."""

    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, access_log: bool = False
    ) -> None:
        self.app, self.host, self.requested_port, self.access_log = app, host, port, access_log
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        sock = bind_socket(self.host, self.requested_port)
        self.port = sock.getsockname()[1]
        self._server = _uvicorn_server(self.app, self.access_log)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="unimm-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start; see the log")
            time.sleep(0.01)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
