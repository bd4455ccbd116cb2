"""Every error featuremaps raises on purpose: one package error, with a subclass per kind of mistake.

Every message is one line that says what went wrong and what to do about it; the CLI prints it as
it is (exit code 1) and the web viewer sends it as ``{"detail": ...}`` with the HTTP status that
:data:`featuremaps.web.app.STATUS` gives each class.

::

    FeatureMapsError
    ├── OptionError          an option value (mode, reduction, norm, channels, colormap, size...)
    │   ├── ReductionError   a reduction spec (mean, max, l2, std, topk:K...)
    │   └── RenderError      a drawing option or input (norm, colormap, channel, page...)
    ├── ImageError           an image that cannot be read or used
    ├── ModelError           a model name, user model or checkpoint
    │   └── WeightsUnavailableError   pretrained weights neither cached nor downloadable
    ├── LayerError           a layer name, pattern or kind that matches nothing; a mode that does not fit
    ├── RunError             a folder that cannot be written, replaced or read back
    └── ViewerError          the web viewer's own refusals
        ├── ParamError       a bad query or form parameter (400)
        │   └── FormError    a form field that is malformed or out of range (422)
        ├── NotFound         no such layer, channel or file (404)
        ├── UnknownRun       no such run (404)
        ├── NotReady         the run has no maps yet (409)
        ├── SlowClient       a request that does not arrive in time (408)
        ├── TooLarge         a run over the viewer's memory or disk budget, an upload over its limit (413)
        └── Busy             too many runs waiting (429)
"""

from __future__ import annotations


class FeatureMapsError(Exception):
    """Base class of every error featuremaps raises on purpose."""


class _OneLine:
    """For errors that also derive from KeyError, which would quote the message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class OptionError(FeatureMapsError, ValueError):
    """An option value is not one featuremaps knows (mode, reduction, norm, channels, colormap...)."""


class ReductionError(OptionError):
    """A reduction spec is not one featuremaps knows."""


class RenderError(OptionError):
    """A rendering option is not usable (norm, colormap, channel, page, input...)."""


class ImageError(FeatureMapsError, ValueError):
    """An image could not be read, or is not usable (corrupt, too large, too small...)."""


class ModelError(FeatureMapsError, ValueError):
    """A model name, user model spec or checkpoint is not usable."""


class WeightsUnavailableError(ModelError):
    """Pretrained weights are neither cached nor downloadable (offline)."""


class LayerError(_OneLine, FeatureMapsError, KeyError):
    """A layer name, pattern or kind matched nothing, or a mode does not fit the model."""


class RunError(FeatureMapsError, OSError):
    """A folder cannot be written, replaced or read back."""


class ViewerError(FeatureMapsError):
    """A refusal of the web viewer (each subclass has its HTTP status)."""


class ParamError(ViewerError, ValueError):
    """A query or form parameter is not usable (HTTP 400)."""


class FormError(ParamError):
    """A form field is malformed or out of range: an unknown mode, a size too large... (HTTP 422)."""


class NotFound(ViewerError, LookupError):
    """No such layer, channel or file (HTTP 404)."""


class UnknownRun(_OneLine, ViewerError, KeyError):
    """No such run (HTTP 404)."""


class NotReady(ViewerError):
    """The run has no maps (yet): queued, running or failed (HTTP 409)."""


class SlowClient(ViewerError):
    """A request (its body) did not arrive within the viewer's time limit (HTTP 408)."""


class TooLarge(ViewerError):
    """A run would take more memory or disk than the viewer's budget allows (HTTP 413)."""


class Busy(ViewerError):
    """Too many runs are waiting already (HTTP 429)."""
