"""Running the viewer with uvicorn: :func:`serve` (what ``featuremaps serve`` calls) and
:class:`ServerThread` (the same server in a background thread, for tests and notebooks)."""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import time
import webbrowser
from typing import Any

from ..errors import ViewerError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    host = host.strip().strip("[]")
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket on ``host:port``; ``port=0`` picks a free port."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = host.strip("[]")
    if shown in ("0.0.0.0", "::", ""):
        shown = "127.0.0.1"
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def _uvicorn_server(app: Any, log_level: str) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=3, timeout_keep_alive=10, server_header=False
    )
    return uvicorn.Server(config)


def _app_for(host: str, create_app_kwargs: dict[str, Any]) -> Any:
    from .app import create_app

    kwargs = dict(create_app_kwargs)
    if "allowed_hosts" not in kwargs and is_loopback(host):
        # Against DNS rebinding: a page from elsewhere cannot reach a loopback viewer by name.
        kwargs["allowed_hosts"] = [*LOOPBACK_NAMES, host.strip("[]")]
    return create_app(**kwargs)


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    open_browser: bool = False,
    log_level: str = "warning",
    **create_app_kwargs: Any,
) -> None:
    """Run the viewer until interrupted (Ctrl-C).

    Binds ``host:port`` (``port=0``: a free port), prints ``featuremaps viewer: http://HOST:PORT/``,
    and warns on stderr when ``host`` is not a loopback address (the viewer has no login).
    Other keyword arguments go to :func:`featuremaps.web.create_app`.
    """
    app = _app_for(host, create_app_kwargs)
    try:
        sock = bind(host, port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ViewerError(
            f"cannot listen on {host}:{port} ({reason}); choose another --port (0 picks a free one) or --host"
        ) from None
    url = url_of(sock, host)
    if not is_loopback(host):
        print(
            f"warning: the viewer listens on {host}, so other machines can reach it and run models on this one; "
            "it has no login — use --host 127.0.0.1 unless that is what you want",
            file=sys.stderr,
            flush=True,
        )
    print(f"featuremaps viewer: {url}", flush=True)
    server = _uvicorn_server(app, log_level)
    if open_browser:
        threading.Timer(0.8, webbrowser.open, args=(url,)).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class ServerThread:
    """The viewer served by uvicorn in a background thread (``with ServerThread(app) as url: ...``)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.sock = bind(host, port)
        self.url = url_of(self.sock, host)
        self.server = _uvicorn_server(app, log_level)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="featuremaps-viewer"
        )

    def start(self, timeout: float = 20.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the viewer did not start")
            time.sleep(0.02)
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
