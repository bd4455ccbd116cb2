"""The one error class of the portrait package."""

from __future__ import annotations

from featuremaps.errors import FeatureMapsError


class PortraitError(FeatureMapsError, ValueError):
    """A channel portrait cannot be made with the options or the network callable given."""
