"""One package error, with a subclass per kind of user mistake.

Every message is one line that says what went wrong and what to do about it; the CLI and the
web server print it as it is.
"""

from __future__ import annotations


class FeatureMapsError(Exception):
    """Base class of every error featuremaps raises on purpose."""


class ImageError(FeatureMapsError, ValueError):
    """An image could not be read, or is not usable (corrupt, too large, too small...)."""


class ModelError(FeatureMapsError, ValueError):
    """A model name, user model spec or checkpoint is not usable."""


class WeightsUnavailableError(ModelError):
    """Pretrained weights are neither cached nor downloadable (offline)."""


class LayerError(FeatureMapsError, KeyError):
    """A layer name, pattern or kind matched nothing, or a mode does not fit the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RunError(FeatureMapsError, OSError):
    """A run folder cannot be written or read back."""
