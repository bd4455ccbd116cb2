"""Guards every request passes: a byte limit and a time limit on request bodies (413, 408), the Host
allow-list (against DNS rebinding) and the same-origin check on POSTs (403), and safe response
headers."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Room for the multipart framing and the small form fields around the uploaded file.
FORM_OVERHEAD = 64 * 1024


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the upload is larger than the limit of {_mb(limit)}; use a smaller image")


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request did not arrive within {seconds:g} s; try again on a faster connection")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with a 413, by Content-Length before reading and
    by counting while reading (chunked uploads), and bodies that take longer than ``timeout``
    seconds to arrive (a client that sends a byte now and then) with a 408."""

    def __init__(self, app: ASGIApp, limit: int, message_limit: int, timeout: float = 120.0):
        self.app, self.limit, self.message_limit, self.timeout = app, limit, message_limit, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            # Read (and drop) a bounded amount of the body so that the client sees the answer
            # instead of a reset connection, then answer.
            drained, more = 0, True
            while more and drained < self.limit + 256 * 2**20:
                message = await receive()
                if message["type"] != "http.request":
                    break
                drained += len(message.get("body", b""))
                more = message.get("more_body", False)
            response = JSONResponse(
                {"detail": BodyTooLarge(self.message_limit).detail}, status_code=413, headers={"Connection": "close"}
            )
            await response(scope, receive, send)
            return
        seen = 0
        deadline = time.monotonic() + self.timeout

        async def counting_receive() -> Message:
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), max(0.001, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.message_limit)
            return message

        await self.app(scope, counting_receive, send)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def request_guard(allowed_hosts: Sequence[str] | None, *, allow_ip_hosts: bool = False) -> Callable:
    """The middleware that checks the Host header against ``allowed_hosts`` (None: any; with
    ``allow_ip_hosts`` any IP address too: a DNS rebinding needs a name) and refuses cross-site
    POSTs (an ``Origin`` of another host, ``Origin: null`` from sandboxed frames and ``data:``
    pages, ``Sec-Fetch-Site: cross-site``), and adds ``nosniff`` and ``no-referrer`` to every
    response."""
    hosts = {h.lower().strip("[]") for h in allowed_hosts} if allowed_hosts else None

    async def guard(request: Request, call_next: Callable) -> Response:
        host = (request.headers.get("host") or "").lower()
        if hosts is not None:
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
            if name not in hosts and not (allow_ip_hosts and _is_ip(name)):
                return JSONResponse(
                    {
                        "detail": f"host {host[:80]!r} is not allowed; start the viewer with --allow-host NAME to accept it"
                    },
                    status_code=400,
                )
        if request.method == "POST":
            origin = request.headers.get("origin")
            cross = request.headers.get("sec-fetch-site", "").lower() == "cross-site"
            if cross or (
                origin is not None and (origin.strip().lower() == "null" or urlsplit(origin).netloc.lower() != host)
            ):
                return JSONResponse({"detail": "cross-site requests are not allowed"}, status_code=403)
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    return guard
