"""The featuremaps web viewer: ``create_app(...)`` makes the FastAPI app, ``serve(...)`` runs it.

``featuremaps serve`` (the CLI) calls :func:`serve`; tests and other programs can mount or run
the app from :func:`create_app` themselves. See :mod:`featuremaps.web.app` for the endpoints.
"""

from __future__ import annotations

from .app import create_app
from .server import bind, is_loopback, serve

__all__ = ["bind", "create_app", "is_loopback", "serve"]
