"""``tomopipe serve``: bind, print the URL (with the token when the address is not loopback), and
serve the app with uvicorn until interrupted."""

from __future__ import annotations

import socket
from pathlib import Path

from tomopipe.errors import TomopipeError

from .app import create_app
from .security import is_loopback, new_token


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: any free port); a clear error when taken."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit TCP_NODELAY: without it a keep-alive response written as headers +
    # body waits for the client's delayed ACK (Nagle), ~45 ms a request instead of ~4 ms (measured).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as error:
        sock.close()
        raise TomopipeError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int, token: str | None) -> str:
    """The URL to open: the loopback name itself, or this machine's name for a wildcard address."""
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "[::]") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def _print(message: str) -> None:
    print(message, flush=True)


def serve(project: str | Path, host: str = "127.0.0.1", port: int = 8765, echo=_print) -> int:
    """Serve the project's UI until interrupted (Ctrl-C). A non-loopback ``host`` gets a fresh token."""
    import uvicorn

    token = None if is_loopback(host) else new_token()
    app = create_app(project, token=token)
    sock = bind_socket(host, port)
    actual_port = sock.getsockname()[1]
    echo(f"tomopipe serve: project {Path(project).resolve()}")
    echo(f"open {url_of(host, actual_port, token)}" + ("" if token is None else
                                                       "   (the token is needed from any other machine)"))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
