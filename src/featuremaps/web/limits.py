"""Guards every request passes: a byte limit on request bodies (413), the Host allow-list (against DNS
rebinding) and the same-origin check on POSTs (403), and safe response headers."""

from __future__ import annotations

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


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with a 413, by Content-Length before reading and
    by counting while reading (chunked uploads)."""

    def __init__(self, app: ASGIApp, limit: int, message_limit: int):
        self.app, self.limit, self.message_limit = app, limit, message_limit

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

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.message_limit)
            return message

        await self.app(scope, counting_receive, send)


def request_guard(allowed_hosts: Sequence[str] | None) -> Callable:
    """The middleware that checks the Host header against ``allowed_hosts`` (None: any) and refuses
    cross-site POSTs, and adds ``nosniff`` and ``no-referrer`` to every response."""
    hosts = {h.lower().strip("[]") for h in allowed_hosts} if allowed_hosts else None

    async def guard(request: Request, call_next: Callable) -> Response:
        if hosts is not None:
            host = (request.headers.get("host") or "").lower()
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
            if name not in hosts:
                return JSONResponse({"detail": f"host {host!r} is not allowed"}, status_code=400)
        if request.method == "POST":
            origin = request.headers.get("origin")
            if (
                origin
                and origin != "null"
                and urlsplit(origin).netloc.lower() != (request.headers.get("host") or "").lower()
            ):
                return JSONResponse({"detail": "cross-site requests are not allowed"}, status_code=403)
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    return guard
