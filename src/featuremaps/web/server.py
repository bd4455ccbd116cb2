"""Running the viewer with uvicorn: :func:`serve` (what ``featuremaps serve`` calls) and
:class:`ServerThread` (the same server in a background thread, for tests and notebooks).

Connections are bounded (:func:`guarded_protocol`): at most ``max_connections`` at once, well under
the process's file descriptor limit (so ``accept()`` never fails), idle ones closed first to make
room for a new one; a client gets ``header_timeout`` seconds to send a request's headers and
``keep_alive`` seconds between requests, and a response it stops reading is cut after
``write_timeout`` seconds. Repeated log lines (``accept()`` errors, malformed requests) are
rate-limited (:class:`RateLimitedLog`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import threading
import time
import webbrowser
from typing import Any

from ..errors import ViewerError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
#: Connections at once (at most), and file descriptors kept for the rest of the viewer (run files,
#: zips, models) under the process's limit.
MAX_CONNECTIONS = 256
FD_RESERVE = 64
#: Connections asyncio may accept in one go (the listen backlog too): each holds a descriptor until
#: the protocol closes the idle ones it makes room with, so a burst must fit in the reserve.
ACCEPT_BURST = FD_RESERVE // 2
#: Seconds a client may take to send a request's headers, to send the next request on a kept-alive
#: connection, and to take anything of a response it is sent.
HEADER_TIMEOUT = 10.0
KEEP_ALIVE = 5
WRITE_TIMEOUT = 60.0


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


def connection_limit(requested: int | None = None) -> int:
    """How many connections the server keeps at once: ``requested`` (default
    :data:`MAX_CONNECTIONS`), at most the file descriptor limit less the descriptors open already
    and :data:`FD_RESERVE` (the soft limit is raised to the hard one first, up to 8192)."""
    soft = 1024
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
        if soft != resource.RLIM_INFINITY and soft < want:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                soft = want
            except (ValueError, OSError):
                pass
        if soft == resource.RLIM_INFINITY:
            soft = 8192
    except ImportError:  # pragma: no cover - not POSIX
        pass
    try:  # what the process has open already (the model libraries, the store, the log)
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    return max(8, min(int(requested or MAX_CONNECTIONS), int(soft) - in_use - FD_RESERVE))


def guarded_protocol(
    max_connections: int, *, header_timeout: float = HEADER_TIMEOUT, write_timeout: float = WRITE_TIMEOUT
) -> type:
    """uvicorn's h11 protocol with the viewer's connection rules (see the module's doc)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Guarded(H11Protocol):
        _header_timer: Any = None
        _write_timer: Any = None
        _idle_since = 0.0
        _cycle_when_armed: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._idle_since = self.loop.time()
            self._arm_header_timer()
            if len(self.connections) > max_connections:
                self._make_room()

        def _busy(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _make_room(self) -> None:
            idle = [
                c
                for c in self.connections
                if c is not self and isinstance(c, Guarded) and not c._busy() and not c.transport.is_closing()
            ]
            victim = min(idle, key=lambda c: c._idle_since) if idle else self  # all busy: the newcomer goes
            victim.transport.close()

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._cycle_when_armed = self.cycle
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_late)

        def _headers_too_late(self) -> None:
            self._header_timer = None
            if self.cycle is self._cycle_when_armed and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._cycle_when_armed:
                self._header_timer.cancel()  # a whole request's headers arrived
                self._header_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle_since = self.loop.time()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(write_timeout, self._reader_too_slow)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _reader_too_slow(self) -> None:
            self._write_timer = None
            self.transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._header_timer, self._write_timer):
                if timer is not None:
                    timer.cancel()
            self._header_timer = self._write_timer = None
            super().connection_lost(exc)

    return Guarded


class RateLimitedLog(logging.Filter):
    """Lets through at most ``per_window`` records of one message every ``window`` seconds, and
    says how many were left out when the next one passes (a flood of ``accept()`` errors or bad
    requests must not fill the log)."""

    def __init__(self, per_window: int = 5, window: float = 60.0):
        super().__init__()
        self.per_window, self.window = per_window, window
        self._seen: dict[tuple[str, str], list[float]] = {}  # key -> [window start, count, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        with self._lock:
            state = self._seen.get(key)
            if state is None or now - state[0] > self.window:
                dropped = int(state[2]) if state is not None else 0
                self._seen[key] = [now, 1, 0]
                if len(self._seen) > 1000:
                    self._seen = {k: v for k, v in self._seen.items() if now - v[0] <= self.window}
                if dropped:
                    record.msg = f"{record.msg} ({dropped} more like it in the last {self.window:g} s were not logged)"
                return True
            if state[1] < self.per_window:
                state[1] += 1
                return True
            state[2] += 1
            return False


def quiet_floods() -> None:
    """Rate-limit the loggers a flood of connections writes to (once per process)."""
    for name in ("asyncio", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitedLog) for f in logger.filters):
            logger.addFilter(RateLimitedLog())


def _uvicorn_server(
    app: Any,
    log_level: str,
    *,
    max_connections: int | None = None,
    header_timeout: float = HEADER_TIMEOUT,
    keep_alive: int = KEEP_ALIVE,
    write_timeout: float = WRITE_TIMEOUT,
) -> Any:
    import uvicorn

    limit = connection_limit(max_connections)
    quiet_floods()
    config = uvicorn.Config(
        app,
        http=guarded_protocol(limit, header_timeout=header_timeout, write_timeout=write_timeout),
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=3,
        timeout_keep_alive=keep_alive,
        # uvicorn's own limit answers 503 once as many connections are open as it allows; the
        # protocol keeps them at ``limit`` by closing idle ones first, so uvicorn's is one above it
        limit_concurrency=limit + 1,
        backlog=ACCEPT_BURST,
        server_header=False,
    )
    return uvicorn.Server(config)


def allowed_hosts_for(host: str, extra: list[str] | tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """The ``Host`` names a viewer bound to ``host`` answers (against DNS rebinding: a page from
    elsewhere cannot reach it by a name of its own): the loopback names, the bound address, on a
    non-loopback bind this machine's names and any IP address, and ``extra`` (``--allow-host``).
    Returns the names and whether IP addresses are accepted."""
    names = [*LOOPBACK_NAMES, host.strip("[]")]
    ips = False
    if not is_loopback(host):
        ips = True
        for name in (socket.gethostname(), socket.getfqdn()):
            if name and name not in names:
                names.append(name)
    names += [h.strip().lower().strip("[]") for h in extra if h.strip()]
    return [n for n in dict.fromkeys(n.lower() for n in names) if n not in ("0.0.0.0", "::", "")], ips


def _app_for(host: str, create_app_kwargs: dict[str, Any]) -> Any:
    from .app import create_app

    kwargs = dict(create_app_kwargs)
    extra = kwargs.pop("allow_hosts", None) or ()
    if "allowed_hosts" not in kwargs:
        kwargs["allowed_hosts"], kwargs["allow_ip_hosts"] = allowed_hosts_for(host, list(extra))
    return create_app(**kwargs)


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    open_browser: bool = False,
    log_level: str = "warning",
    allow_hosts: list[str] | tuple[str, ...] = (),
    max_connections: int | None = None,
    header_timeout: float = HEADER_TIMEOUT,
    keep_alive: int = KEEP_ALIVE,
    write_timeout: float = WRITE_TIMEOUT,
    **create_app_kwargs: Any,
) -> None:
    """Run the viewer until interrupted (Ctrl-C).

    Binds ``host:port`` (``port=0``: a free port), prints ``featuremaps viewer: http://HOST:PORT/``,
    and warns on stderr when ``host`` is not a loopback address (the viewer has no login). Every
    bind answers only the ``Host`` names of :func:`allowed_hosts_for` (``allow_hosts`` adds some).
    Connections follow :func:`guarded_protocol`'s rules. Other keyword arguments go to
    :func:`featuremaps.web.create_app`.
    """
    # freed memory goes back to the system soon (featuremaps.memory): RSS tracks the memory budget
    os.environ.setdefault("FEATUREMAPS_REUSE_MEMORY", "64")
    create_app_kwargs.setdefault("run_dir", default_run_dir())
    try:
        sock = bind(host, port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ViewerError(
            f"cannot listen on {host}:{port} ({reason}); choose another --port (0 picks a free one) or --host"
        ) from None
    try:
        app = _app_for(host, {**create_app_kwargs, "allow_hosts": allow_hosts})
    except BaseException:
        sock.close()
        raise
    url = url_of(sock, host)
    if not is_loopback(host):
        names = ", ".join(n for n in app.state.allowed_hosts if n not in LOOPBACK_NAMES)
        print(
            f"warning: the viewer listens on {host}, so other machines can reach it and run models on this one; "
            "it has no login — use --host 127.0.0.1 unless that is what you want. Against DNS rebinding it "
            f"answers only requests for this machine's addresses and names ({names}, localhost); "
            "add a name with --allow-host NAME",
            file=sys.stderr,
            flush=True,
        )
    print(f"featuremaps viewer: {url}", flush=True)
    server = _uvicorn_server(
        app,
        log_level,
        max_connections=max_connections,
        header_timeout=header_timeout,
        keep_alive=keep_alive,
        write_timeout=write_timeout,
    )
    if open_browser:
        threading.Timer(0.8, webbrowser.open, args=(url,)).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        app.state.viewer.close()  # also when the server never started: the store's lock goes


def default_run_dir() -> str:
    """Where ``serve`` keeps its runs unless told (``--run-dir``): ``$XDG_CACHE_HOME/featuremaps/viewer``
    (``~/.cache/featuremaps/viewer``), reused by the next start, bounded by ``--max-disk``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "featuremaps", "viewer")


class ServerThread:
    """The viewer served by uvicorn in a background thread (``with ServerThread(app) as url: ...``),
    with the same connection rules as :func:`serve` (``server_options`` go to them)."""

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", **server_options: Any
    ):
        self.app = app
        self.sock = bind(host, port)
        self.url = url_of(self.sock, host)
        self.server = _uvicorn_server(app, log_level, **server_options)
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
