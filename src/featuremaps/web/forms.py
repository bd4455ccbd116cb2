"""The one form parser of the viewer: ``POST /api/runs`` -> a checked :class:`RunRequest` and
where its picture comes from, then (once the run is admitted) the picture itself.

Every field is checked against the app's allow-lists and limits with the library's own option
checks (:mod:`featuremaps.options`); a refusal is a :class:`~featuremaps.errors.ParamError` (400)
or :class:`~featuremaps.errors.FormError` (422) with a one-line message. Nothing is decoded before
the run is admitted: a busy viewer answers 429 without touching the upload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from ..errors import FormError, LayerError, ParamError, TooLarge
from ..images import decoded_size, list_samples, load_image
from ..models import is_user_spec
from ..options import check_mode
from .jobs import LAYER_CHOICES, LAYER_SPEC_RE, Job, RunRequest, Viewer

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


@dataclass(frozen=True)
class Picture:
    """The image a form names, not read yet: an uploaded file or a bundled sample."""

    upload: UploadFile | None
    sample: str | None
    name: str


def parse_run_form(form: FormData, opts: Mapping[str, Any], *, client: str = "") -> tuple[RunRequest, Picture]:
    """The run a form asks for (without its image) and where its image comes from; nothing is
    read or decoded yet, so that the run can be admitted (or refused) first."""
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
        if upload.size is not None and upload.size > opts["max_upload_bytes"]:
            raise UploadTooLarge(opts["max_upload_bytes"])
        name = Path(upload.filename or "upload").name[:80] or "upload"
        picture = Picture(upload, None, name)
    elif sample:
        if sample.removeprefix("sample:") not in list_samples():
            raise ParamError(f"unknown sample {sample[:40]!r}; choose one of {', '.join(list_samples())}")
        picture = Picture(None, sample.removeprefix("sample:"), "sample:" + sample.removeprefix("sample:"))
    else:
        raise ParamError("no image: upload an image file (field 'image') or choose a sample (field 'sample')")
    req = RunRequest(
        model=model, weights=weights, mode=mode, layers=layers, size=size, image=None, source=picture.name,
        client=client,
    )  # fmt: skip
    return req, picture


class UploadTooLarge(TooLarge):
    """An upload over the limit (413)."""

    def __init__(self, limit: int):
        super().__init__(f"the upload is larger than the limit of {_mb(limit)}; use a smaller image")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


async def read_picture(viewer: Viewer, job: Job, picture: Picture, opts: Mapping[str, Any]) -> Image.Image:
    """The admitted run's picture, decoded within the memory budget (its size read from the header
    first; a JPEG decoded at the smallest scale that still covers the model's input) and resized
    to the model's input at once: a queued run holds that small picture, never the upload."""
    req = job.request
    assert req is not None
    if picture.upload is not None:
        data = await picture.upload.read(opts["max_upload_bytes"] + 1)
        if len(data) > opts["max_upload_bytes"]:
            raise UploadTooLarge(opts["max_upload_bytes"])
        return await run_in_threadpool(_decode_upload, viewer, job, data, picture.name, opts["max_image_pixels"])
    return await run_in_threadpool(lambda: viewer.fit_picture(req, load_image(picture.name)))


def _decode_upload(viewer: Viewer, job: Job, data: bytes, name: str, max_pixels: int) -> Image.Image:
    req = job.request
    assert req is not None
    w, h = viewer.input_size(req)
    draft = (max(w, h), max(w, h))
    dw, dh = decoded_size(data, name=name, max_pixels=max_pixels, draft=draft)
    need = 2 * 4 * dw * dh + 3 * w * h  # the decoded picture, its RGB conversion, the resized one
    with viewer.reserved(("decode", job.id), need, what=f"decoding {name} ({dw}x{dh} pixels)"):
        image = load_image(data, name=name, max_pixels=max_pixels, draft=draft)
        return viewer.fit_picture(req, image)
