"""FastAPI dependencies of the viewer's routes: the app's :class:`~featuremaps.web.jobs.Viewer`,
its picture maker (:class:`~featuremaps.web.tiles.Tiles`) and options, and the one way a picture
or a per-layer JSON is answered: with an ``ETag``, ``304`` on ``If-None-Match``, and the shared
bounded PNG cache."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from .. import render
from ..version import __version__
from .jobs import Viewer
from .tiles import Tiles

IMMUTABLE = "public, max-age=31536000, immutable"
#: Bumped when pictures change for the same parameters, so that old ETags stop matching.
RENDER_VERSION = f"{__version__}-2"


def get_viewer(request: Request) -> Viewer:
    return request.app.state.viewer


def get_tiles(request: Request) -> Tiles:
    return request.app.state.renderer


def get_options(request: Request) -> dict[str, Any]:
    return request.app.state.options


def etag_of(key: str) -> str:
    return '"' + hashlib.sha1(f"{RENDER_VERSION}|{key}".encode()).hexdigest()[:24] + '"'


def _not_modified(request: Request, etag: str) -> bool:
    header = request.headers.get("if-none-match")
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return etag in tags or "*" in tags


def png(image: Any) -> bytes:
    return render.to_png_bytes(image)


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Cached:
    """Answers for content that never changes for its key (run id + every drawing parameter)."""

    request: Request
    viewer: Viewer

    def __call__(self, key: str, media_type: str, make: Callable[[], bytes], *, store: bool = True) -> Response:
        etag = etag_of(key)
        headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
        if _not_modified(self.request, etag):
            return Response(status_code=304, headers=headers)
        data = self.viewer.png_cache.get(key) if store else None
        if data is None:
            data = make()
            if store:
                self.viewer.png_cache.put(key, data)
        return Response(data, media_type=media_type, headers=headers)


def get_cached(request: Request) -> Cached:
    return Cached(request, request.app.state.viewer)
