"""The one form parser of the viewer: ``POST /api/runs`` -> a checked :class:`RunRequest`.

Every field is checked against the app's allow-lists and limits with the library's own option
checks (:mod:`featuremaps.options`); a refusal is a :class:`~featuremaps.errors.ParamError` (400)
or :class:`~featuremaps.errors.FormError` (422) with a one-line message.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from ..errors import FormError, LayerError, ParamError
from ..images import list_samples, load_image
from ..models import is_user_spec
from ..options import check_mode
from .jobs import LAYER_CHOICES, LAYER_SPEC_RE, RunRequest

#: Largest and smallest input size a request may ask for.
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 1024


def normalize_weights(w: str) -> str:
    """A weights choice as the allow-list spells it: ``random``, or an upper-case torchvision name."""
    w = str(w).strip()
    return "random" if w.lower() == "random" else w.upper()


def _model(fields: Mapping[str, str], opts: Mapping[str, Any]) -> str:
    model = fields.get("model", opts["models"][0]).strip()
    if model.lower().replace("-", "_") in opts["models"] and not is_user_spec(model):
        model = model.lower().replace("-", "_")
    if model not in opts["models"]:
        raise ParamError(
            f"model {model[:60]!r} is not offered by this viewer; choose one of {', '.join(opts['models'])}"
        )
    return model


def _weights(fields: Mapping[str, str], opts: Mapping[str, Any]) -> str:
    choice = fields.get("weights", (opts["weights"] or [f"checkpoint:{opts['checkpoints'][0]}"])[0]).strip()
    if choice.lower().startswith("checkpoint:"):
        key = choice.split(":", 1)[1]
        if key not in opts["checkpoints"]:
            raise ParamError(
                f"no checkpoint {key[:60]!r} is offered; choose one of {', '.join(opts['checkpoints']) or '(none)'}"
            )
        return f"checkpoint:{key}"
    choice = normalize_weights(choice)
    if choice not in opts["weights"]:
        offered = opts["weights"] + [f"checkpoint:{k}" for k in opts["checkpoints"]]
        raise ParamError(f"weights {choice[:40]!r} are not offered; choose one of {', '.join(offered)}")
    return choice


def _mode(fields: Mapping[str, str]) -> str:
    try:
        return check_mode(fields.get("mode", "network").strip().lower())
    except LayerError as exc:
        raise FormError(str(exc)) from None


def _layers(fields: Mapping[str, str]) -> str:
    layers = fields.get("layers", "default").strip() or "default"
    if layers.lower() in LAYER_CHOICES:
        return layers.lower()
    if len(layers) > 300 or not LAYER_SPEC_RE.fullmatch(layers):
        raise FormError(f"layers must be one of {', '.join(LAYER_CHOICES)} or comma-separated layer names/globs")
    return layers


def _size(fields: Mapping[str, str], opts: Mapping[str, Any]) -> int | None:
    text = fields.get("size", "").strip()
    if not text:
        return None
    try:
        size = int(text)
    except ValueError:
        raise FormError(f"size must be a whole number of pixels, not {text[:20]!r}") from None
    if not MIN_INPUT_SIZE <= size <= opts["max_input_size"]:
        raise FormError(f"size must be between {MIN_INPUT_SIZE} and {opts['max_input_size']} pixels")
    return size


async def parse_run_form(form: FormData, opts: Mapping[str, Any], *, too_large: type[Exception]) -> RunRequest:
    """The run a form asks for, its image decoded and checked (``load_image``); ``too_large`` is
    raised for an upload over ``opts["max_upload_bytes"]``."""
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    upload = form.get("image")
    model, weights, mode = _model(fields, opts), _weights(fields, opts), _mode(fields)
    layers, size = _layers(fields), _size(fields, opts)
    sample = fields.get("sample", "").strip()
    has_file = isinstance(upload, UploadFile) and bool(upload.filename or upload.size)
    if has_file and sample:
        raise ParamError("send either an image file or a sample name, not both")
    if has_file:
        assert isinstance(upload, UploadFile)
        data = await upload.read(opts["max_upload_bytes"] + 1)
        if len(data) > opts["max_upload_bytes"]:
            raise too_large(opts["max_upload_bytes"])
        name = Path(upload.filename or "upload").name[:80] or "upload"
        image = await run_in_threadpool(load_image, data, name=name, max_pixels=opts["max_image_pixels"])
        source = name
    elif sample:
        if sample.removeprefix("sample:") not in list_samples():
            raise ParamError(f"unknown sample {sample[:40]!r}; choose one of {', '.join(list_samples())}")
        source = "sample:" + sample.removeprefix("sample:")
        image = await run_in_threadpool(load_image, source)
    else:
        raise ParamError("no image: upload an image file (field 'image') or choose a sample (field 'sample')")
    return RunRequest(model=model, weights=weights, mode=mode, layers=layers, size=size, image=image, source=source)
