"""The ``featuremaps`` command line (typer): :mod:`~featuremaps.cli.common` holds the app, its shared
options and error handling, :mod:`~featuremaps.cli.commands` the commands. Importing it does not
import torch: ``--help``, ``--version`` and option mistakes answer at once.
"""

from __future__ import annotations

from . import (  # noqa: F401  (registers the commands on the app)
    atlas,
    cam,
    commands,
    portrait,
)
from .common import Terminated, app, main

__all__ = ["Terminated", "app", "main"]
