"""Serving the explorer with uvicorn: on a socket bound here, so that a port in use is a clear
error and port 0 gives a free port whose URL is known before serving starts."""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


class PortInUse(OSError):
    """The port asked for is taken by another server."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``127.0.0.1``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port).

    Raises:
        PortInUse: another server listens there; the message suggests ``--port``.
        OSError: the address cannot be bound (unknown host, no permission), named.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535 (0: any free port), got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that name it, and without it
    # Nagle's algorithm and delayed ACKs add 40 ms to every small response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"port {port} on {host} is already in use by another program: choose another "
                "with --port PORT, or leave --port out to take a free one"
            ) from None
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def server_for(app: Any) -> uvicorn.Server:
    """A uvicorn server for ``app``, quiet but for warnings."""
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))


def serve(app: Any, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until interrupted (Ctrl-C)."""
    server_for(app).run(sockets=[sock])


@contextmanager
def serving(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` from a background thread for the block; yields its base URL.

    For tests and benchmarks: the server stops, and its socket closes, when the block ends.
    """
    sock = bind(host, port)
    server = server_for(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the explorer server did not start")
            time.sleep(0.01)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
