"""The one error class of the channel atlas (folders it cannot write or read raise :class:`~featuremaps.errors.RunError`)."""

from __future__ import annotations

from ..errors import FeatureMapsError


class AtlasError(FeatureMapsError, ValueError):
    """An atlas cannot be made or read with the inputs or options given (no images, bad layer, top-k...)."""
