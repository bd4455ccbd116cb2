"""Load an image from anything a user may hand over, as an 8-bit RGB PIL image.

:func:`load_image` accepts a file path, ``"sample:NAME"``, an http(s) URL, bytes, a binary file
object, a PIL image, a numpy array or a torch tensor. Whatever goes wrong (missing file, not an
image, truncated data, decompression bomb, image too small...) becomes an
:class:`~featuremaps.errors.ImageError` with a one-line message that names the source.

Bundled samples: the drawn ``"edge"`` test sheet (:func:`edge_image`) and four public-domain / CC0
photographs (see ``samples/LICENSES.md``).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import math
import os
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from .errors import ImageError

#: Largest image, in pixels (width * height), that :func:`load_image` decodes by default.
MAX_PIXELS: int = 64_000_000
#: Largest download, in bytes, that :func:`load_image` accepts from a URL.
MAX_DOWNLOAD_BYTES: int = 50 * 1024 * 1024
#: Seconds to wait for a URL to connect or send data.
URL_TIMEOUT: float = 10.0
#: Seconds a whole URL download may take, connecting, headers and body together (a server that
#: sends a byte every few seconds never trips :data:`URL_TIMEOUT`, which counts per wait).
URL_DEADLINE: float = 60.0

#: Photographs bundled in ``featuremaps/samples/``: sample name -> file name.
SAMPLE_FILES: dict[str, str] = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
}
#: Every sample name, for ``load_image("sample:NAME")``; ``"edge"`` is drawn, the rest are photos.
SAMPLES: tuple[str, ...] = ("edge", *SAMPLE_FILES)

_SAMPLE_PREFIX = "sample:"
_OTHER_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_URL_PREFIXES = ("http://", "https://")
_CHUNK = 64 * 1024
_FLOAT_TOLERANCE = 1e-4
_MAX_NAME = 120
_ACCEPTED = (
    "a file path, 'sample:NAME', an http(s) URL, bytes, a binary file object, a PIL image, "
    "a numpy array or a torch tensor"
)
# What a PIL decoder may raise on broken data (UnidentifiedImageError is handled before).
_DECODE_ERRORS = (OSError, EOFError, SyntaxError, ValueError, IndexError, struct.error, zlib.error)


# --------------------------------------------------------------------------- samples


def list_samples() -> list[str]:
    """Names of the bundled samples, usable as ``load_image("sample:NAME")``."""
    return list(SAMPLES)


def _sample_name(name: str) -> str:
    key = name[len(_SAMPLE_PREFIX) :] if name.startswith(_SAMPLE_PREFIX) else name
    key = key.strip().lower()
    if key not in SAMPLES:
        raise ImageError(f"unknown sample {_one_line(name)!r} — available samples: {', '.join(SAMPLES)}")
    return key


def _sample_resource(key: str) -> Any:
    return resources.files(__package__ or "featuremaps").joinpath("samples", SAMPLE_FILES[key])


def _read_sample(key: str) -> bytes:
    try:
        return bytes(_sample_resource(key).read_bytes())
    except OSError as exc:
        raise ImageError(
            f"sample:{key} is missing from the installed package ({_one_line(exc)}) — reinstall featuremaps"
        ) from None


def sample_path(name: str) -> Path:
    """File of a bundled sample photograph (``"chelsea"`` or ``"sample:chelsea"``)."""
    key = _sample_name(name)
    if key not in SAMPLE_FILES:
        raise ImageError(
            f"sample {key!r} is drawn, not a file — use edge_image() or "
            f"load_image('sample:{key}'); photo samples: {', '.join(SAMPLE_FILES)}"
        )
    path = Path(os.fspath(_sample_resource(key)))
    if not path.is_file():
        raise ImageError(f"sample:{key} is missing from the installed package ({path}) — reinstall featuremaps")
    return path


def edge_image(size: int = 224) -> Image.Image:
    """The "edge" test sheet: black geometric strokes on white, drawn deterministically.

    Lines at 0, 30, 45, 60, 90, 120 and 135 degrees, circles, triangles, rectangles and a diamond
    (outlined and filled), spread over the whole square including near its borders.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 16:
        raise ImageError(f"edge_image size must be an integer of at least 16, not {size!r}")
    s = size / 224.0
    width = max(1, round(3 * s))
    canvas = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(canvas)

    def pt(x: float, y: float) -> tuple[int, int]:
        return (round(x * s), round(y * s))

    def box(x0: float, y0: float, x1: float, y1: float) -> list[tuple[int, int]]:
        return [pt(x0, y0), pt(x1 - 1, y1 - 1)]

    def line(cx: float, cy: float, angle: float, length: float) -> None:
        dx = math.cos(math.radians(angle)) * length / 2
        dy = -math.sin(math.radians(angle)) * length / 2  # y grows downwards
        draw.line([pt(cx - dx, cy - dy), pt(cx + dx, cy + dy)], fill=0, width=width)

    # The sheet is a 4x4 grid of 56-pixel cells (at size 224); the outer shapes sit a few pixels
    # from the image border, so border effects of deep layers show up.
    # Row 0
    for y in (8, 20, 32, 44):  # horizontal lines (0 deg)
        line(28, y, 0, 44)
    draw.ellipse(box(62, 6, 106, 50), outline=0, width=width)  # circle outline
    draw.polygon([pt(140, 6), pt(163, 48), pt(117, 48)], outline=0, width=width)  # triangle
    for x in (180, 192, 204, 216):  # vertical lines (90 deg)
        line(x, 28, 90, 44)
    # Row 1
    draw.rectangle(box(8, 66, 48, 102), fill=0)  # filled rectangle
    line(84, 84, 45, 50)
    line(140, 84, 30, 48)
    draw.ellipse(box(174, 64, 214, 104), fill=0)  # filled circle
    # Row 2
    line(28, 140, 135, 50)
    draw.polygon([pt(84, 118), pt(106, 140), pt(84, 162), pt(62, 140)], outline=0, width=width)
    draw.rectangle(box(118, 122, 162, 158), outline=0, width=width)  # rectangle outline
    line(196, 140, 60, 48)
    # Row 3
    draw.polygon([pt(6, 216), pt(28, 176), pt(50, 216)], fill=0)  # filled triangle
    for r in (20, 12, 5):  # concentric circles
        draw.ellipse(box(84 - r, 196 - r, 84 + r, 196 + r), outline=0, width=width)
    line(140, 196, 120, 48)
    draw.rectangle(box(176, 176, 218, 218), outline=0, width=width)  # square with a diamond in it
    draw.polygon([pt(197, 182), pt(211, 196), pt(197, 210), pt(183, 196)], fill=0)
    return canvas.convert("RGB")


# --------------------------------------------------------------------------- naming


def _one_line(text: object, limit: int = _MAX_NAME) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _is_url(source: object) -> bool:
    return isinstance(source, str) and source[:8].lower().startswith(_URL_PREFIXES)


def _is_torch_tensor(source: object) -> bool:
    if not type(source).__module__.startswith("torch"):
        return False
    import torch

    return isinstance(source, torch.Tensor)


def describe_source(source: object) -> str:
    """Short human name of an image source, for messages and manifests."""
    if isinstance(source, str):
        if source.startswith(_SAMPLE_PREFIX):
            return _one_line(source.strip())
        if _is_url(source):
            return _one_line(source.strip(), 200)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return _one_line(Path(path).name or path or "''")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(source, Image.Image):
        filename = getattr(source, "filename", "")
        return _one_line(Path(filename).name) if filename else "PIL image"
    if isinstance(source, np.ndarray):
        return "array"
    if _is_torch_tensor(source):
        return "tensor"
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        return _one_line(Path(name).name) if isinstance(name, str) and name else "uploaded file"
    return type(source).__name__


def _is(label: str) -> str:
    return "are" if label == "uploaded bytes" else "is"


def _label(source: object) -> str:
    """How error messages name a source: like describe_source, with 'URL ' / 'uploaded bytes'."""
    if _is_url(source):
        return "URL " + describe_source(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "uploaded bytes"
    return describe_source(source)


# --------------------------------------------------------------------------- loading


def load_image(
    source: Any,
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
    min_size: int = 1,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Load ``source`` as a fully decoded 8-bit RGB PIL image, EXIF orientation applied.

    ``name`` replaces the source's name in error messages. Images with more than ``max_pixels``
    pixels are refused before decoding; images narrower or shorter than ``min_size`` are refused.
    Transparent pixels are composited onto white. ``draft=(w, h)``: a JPEG is decoded at the
    smallest of its reduced scales (1/2, 1/4, 1/8, Pillow's ``draft``) that is still at least
    ``w x h``, which costs a fraction of the memory and time of a full decode when the picture is
    about to be resized anyway (see :func:`decoded_size`); other formats are decoded in full.
    Raises :class:`ImageError` for every problem.
    """
    label = _one_line(name) if name else _label(source)
    if isinstance(source, str) and source.startswith(_SAMPLE_PREFIX):
        key = _sample_name(source)
        if key == "edge":
            image = edge_image(224)
        else:
            image = _decode(io.BytesIO(_read_sample(key)), label, max_pixels, draft)
    elif _is_url(source):
        data = _fetch(source.strip(), label)
        image = _decode_bytes(data, label, max_pixels, draft)
    elif isinstance(source, str) and _OTHER_SCHEME.match(source):
        raise ImageError(
            f"{_one_line(source, 200)} is not an http:// or https:// URL — download the image "
            "and pass its file path, or use an http(s) URL"
        )
    elif isinstance(source, (str, os.PathLike)):
        image = _load_path(source, label, max_pixels, draft)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _decode_bytes(bytes(source), label, max_pixels, draft)
    elif isinstance(source, Image.Image):
        image = _from_pil(source, label, max_pixels)
    elif isinstance(source, np.ndarray):
        image = _from_array(source, label, max_pixels)
    elif _is_torch_tensor(source):
        image = _from_array(_tensor_to_numpy(source), label, max_pixels)
    elif hasattr(source, "read"):
        image = _decode_bytes(_read_stream(source, label), label, max_pixels, draft)
    else:
        raise ImageError(f"cannot load an image from an object of type {type(source).__name__} — pass {_ACCEPTED}")
    _check_min_size(image, label, min_size)
    return image


def _check_min_size(image: Image.Image, label: str, min_size: int) -> None:
    w, h = image.size
    if w < min_size or h < min_size:
        raise ImageError(
            f"{label} {_is(label)} {w}x{h} pixels; this model needs at least {min_size}x{min_size} — use a larger image"
        )


def _check_pixels(size: tuple[int, int], label: str, max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageError(
            f"{label} {_is(label)} {w}x{h} pixels ({w * h:,} pixels), more than the limit of "
            f"{max_pixels:,} pixels — resize it first, or raise max_pixels if you trust the file"
        )


def decoded_size(
    data: bytes, *, name: str | None = None, max_pixels: int = MAX_PIXELS, draft: tuple[int, int] | None = None
) -> tuple[int, int]:
    """The ``(width, height)`` that :func:`load_image` ``(data, draft=draft)`` decodes ``data`` to,
    read from the image's header without decoding it: what the decode will cost in memory is
    known before it starts (about 3 bytes per pixel, twice while converting).

    Raises:
        ImageError: not an image, empty, or over ``max_pixels`` (the same messages as :func:`load_image`).
    """
    label = _one_line(name) if name else _label(data)
    if not data:
        raise ImageError(f"{label} {_is(label)} empty (0 bytes) — send the image file's contents")
    with _decoding(label), Image.open(io.BytesIO(data)) as image:
        _check_pixels(image.size, label, max_pixels)
        _apply_draft(image, draft)
        return (int(image.size[0]), int(image.size[1]))


def _apply_draft(image: Image.Image, draft: tuple[int, int] | None) -> None:
    """Ask a JPEG for its smallest reduced scale that still covers ``draft`` (before decoding)."""
    if draft is None or image.format != "JPEG":
        return
    w, h = (max(1, int(v)) for v in draft)
    image.draft(None, (w, h))


def _not_an_image(label: str) -> str:
    return f"{label} {_is(label)} not an image that can be read — pass a PNG, JPEG, BMP, GIF, TIFF or WebP image"


def _load_path(
    source: str | os.PathLike[str], label: str, max_pixels: int, draft: tuple[int, int] | None = None
) -> Image.Image:
    raw = os.fsdecode(os.fspath(source))
    if not raw.strip():
        raise ImageError("the image path is empty — pass the path of an image file")
    path = Path(raw).expanduser()
    shown = _one_line(raw, 200)
    is_dir = f"{shown} is a directory, not an image file — pass the path of an image file"
    if path.is_dir():
        raise ImageError(is_dir)
    try:
        with open(path, "rb") as fp:
            if os.fstat(fp.fileno()).st_size == 0:
                raise ImageError(f"{label} {_is(label)} empty (0 bytes) — re-save or re-download the image")
            return _decode(fp, label, max_pixels, draft)
    except FileNotFoundError:
        raise ImageError(f"image file {shown} not found — check the path") from None
    except PermissionError:
        raise ImageError(f"{shown} cannot be read (permission denied) — check its permissions") from None
    except IsADirectoryError:
        raise ImageError(is_dir) from None
    except OSError as exc:  # ImageError is not an OSError, so it passes through
        raise ImageError(f"{shown} cannot be read ({_one_line(exc)}) — check the file") from None


def _read_stream(stream: Any, label: str) -> bytes:
    try:
        data = stream.read()
    except (OSError, ValueError) as exc:
        raise ImageError(f"{label} cannot be read ({_one_line(exc)}) — pass an open binary file") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"{label} gave {type(data).__name__}, not bytes — open the file in binary mode ('rb')")
    return bytes(data)


def _decode_bytes(data: bytes, label: str, max_pixels: int, draft: tuple[int, int] | None = None) -> Image.Image:
    if not data:
        raise ImageError(f"{label} {_is(label)} empty (0 bytes) — send the image file's contents")
    return _decode(io.BytesIO(data), label, max_pixels, draft)


def _decode(fp: Any, label: str, max_pixels: int, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open, size-check (from the header), decode (a JPEG at reduced scale with ``draft``) and
    convert one image from a binary stream."""
    with _decoding(label):
        image = Image.open(fp)
        _check_pixels(image.size, label, max_pixels)
        _apply_draft(image, draft)
        image.load()
        return _finish(image, label)


@contextlib.contextmanager
def _decoding(label: str) -> Iterator[None]:
    """Pillow's errors while opening or decoding ``label`` as one-line ImageErrors. The pixel limit
    is ours (checked before decoding), so PIL's own warning is silenced; its hard
    DecompressionBombError becomes an ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"{label} {_is(label)} too large to decode safely ({_one_line(exc, 200)}) — resize it first"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(_not_an_image(label)) from None
    except _DECODE_ERRORS as exc:
        raise ImageError(_corrupt(label, exc)) from None


def _corrupt(label: str, exc: BaseException) -> str:
    return f"{label} {_is(label)} truncated or corrupt ({_one_line(exc)}) — re-save or re-download the image"


def _from_pil(image: Image.Image, label: str, max_pixels: int) -> Image.Image:
    _check_pixels(image.size, label, max_pixels)
    try:
        image.load()
    except _DECODE_ERRORS as exc:
        raise ImageError(_corrupt(label, exc)) from None
    return _finish(image, label)


def _finish(image: Image.Image, label: str) -> Image.Image:
    """Apply EXIF orientation and convert to RGB; always returns a new image."""
    try:
        rotated = ImageOps.exif_transpose(image)
    except Exception:  # broken EXIF metadata is no reason to refuse the pixels
        rotated = image
    rgb = _to_rgb(rotated, label)
    if rgb is image:
        rgb = rgb.copy()
    rgb.load()
    return rgb


# --------------------------------------------------------------------------- colour modes


def _flatten_alpha(rgba: Image.Image) -> Image.Image:
    """Composite an RGBA image onto white and drop the alpha channel."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _scale16(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded (65535 -> 255, 32768 -> 128)."""
    wide = values.astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _normalize(values: np.ndarray) -> np.ndarray:
    """Min-max normalize to 0..255 (a constant image becomes zeros; NaN/inf become the minimum)."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    values = np.where(finite, values, lo)
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    mode = image.mode
    has_transparency = image.info.get("transparency") is not None
    if mode == "RGB" and not has_transparency:
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if mode in ("RGBa", "La"):  # premultiplied alpha
            image = image.convert("RGBA" if mode == "RGBa" else "LA")
        return _flatten_alpha(image.convert("RGBA"))
    if mode == "P":
        palette_alpha = image.palette is not None and image.palette.mode == "RGBA"
        if has_transparency or palette_alpha:
            return _flatten_alpha(image.convert("RGBA"))
        return image.convert("RGB")
    if mode.startswith("I;16"):
        return _gray_to_rgb(_scale16(np.asarray(image)))
    if mode == "I":
        values = np.asarray(image)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return _gray_to_rgb(_scale16(values))
        return _gray_to_rgb(_normalize(values))
    if mode == "F":
        return _gray_to_rgb(_normalize(np.asarray(image)))
    if has_transparency and mode in ("1", "L", "RGB"):
        return _flatten_alpha(image.convert("RGBA"))
    try:
        return image.convert("RGB")  # 1, L, CMYK, YCbCr, HSV...
    except (ValueError, OSError) as exc:
        raise ImageError(
            f"{label} has colour mode {mode}, which cannot be converted to RGB ({_one_line(exc)}) "
            "— save it as an RGB or grayscale image"
        ) from None


# --------------------------------------------------------------------------- arrays and tensors


def _tensor_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.is_complex():
        return tensor.numpy()  # refused with a clear message by _from_array
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.numpy()


def _from_array(array: np.ndarray, label: str, max_pixels: int) -> Image.Image:
    """HxW, HxWx1/3/4 or 1/3/4xHxW (an optional leading batch axis of 1) -> RGB image."""
    shape = array.shape
    if array.ndim == 4 and shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(
            f"{label} has shape {shape}; expected HxW, HxWx1, HxWx3, HxWx4 or 1/3/4xHxW — pass a single image"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{label} has shape {shape}, which holds no pixels — pass a non-empty image")
    _check_pixels((array.shape[1], array.shape[0]), label, max_pixels)
    pixels = _array_to_uint8(array, label)
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if image.mode == "RGBA":
        return _flatten_alpha(image)
    return image.convert("RGB")


def _array_to_uint8(array: np.ndarray, label: str) -> np.ndarray:
    dtype = array.dtype
    if dtype == np.uint8:
        return array
    if dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if dtype == np.uint16:
        return _scale16(array)
    if np.issubdtype(dtype, np.floating):
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise ImageError(f"{label} contains NaN or infinite values — pass finite floats in [0, 1] or uint8")
        lo, hi = float(values.min()), float(values.max())
        if lo < -_FLOAT_TOLERANCE or hi > 1 + _FLOAT_TOLERANCE:
            raise ImageError(
                f"{label} has float values from {lo:.4g} to {hi:.4g}, outside [0, 1] — scale it "
                "to [0, 1] (undo any normalization) or pass uint8 values 0..255"
            )
        return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    if np.issubdtype(dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if lo >= 0 and hi <= 255:
            return array.astype(np.uint8)
        raise ImageError(
            f"{label} has {dtype} values from {lo} to {hi}, outside 0..255 "
            "— pass uint8 (0..255), uint16 (0..65535) or floats in [0, 1]"
        )
    raise ImageError(
        f"{label} has dtype {dtype}, which is not an image type — pass uint8, uint16, bool or floats in [0, 1]"
    )


# --------------------------------------------------------------------------- URLs


class _Deadline:
    """The overall time limit of one download: when it is up, the download's sockets are shut down,
    which ends a read blocked on a server that trickles (each byte restarts the per-read timeout)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._watched: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            for s in self._watched:
                s.close()
            self._watched.clear()

    def watch(self, sock: socket.socket) -> None:
        """Watch a new connection (through a duplicate of its socket: TLS takes the original over)."""
        dup = sock.dup()
        with self._lock:
            self._watched.append(dup)
            if self.expired:
                _shutdown(dup)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for s in self._watched:
                _shutdown(s)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib's opener, with every connection it makes (redirects too) watched by ``deadline``."""

    def watched(cls: type) -> type:
        class Watched(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)

                def connect(*a: Any, **k: Any) -> socket.socket:
                    sock = socket.create_connection(*a, **k)
                    deadline.watch(sock)
                    return sock

                self._create_connection = connect

        return Watched

    class HTTP(urllib.request.HTTPHandler):
        def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
            return super().do_open(watched(http_class), req, **kwargs)

    class HTTPS(urllib.request.HTTPSHandler):
        def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
            return super().do_open(watched(http_class), req, **kwargs)

    return urllib.request.build_opener(HTTP, HTTPS)


def _fetch(url: str, label: str) -> bytes:
    """Download ``url``: at most MAX_DOWNLOAD_BYTES, URL_TIMEOUT seconds per wait, URL_DEADLINE
    seconds in all."""
    limit, timeout, shown = MAX_DOWNLOAD_BYTES, URL_TIMEOUT, label
    too_large = f"{shown} is larger than the download limit of {limit:,} bytes — download and resize the image first"
    request = urllib.request.Request(url, headers={"User-Agent": "featuremaps"})
    deadline = _Deadline(URL_DEADLINE)
    start = time.monotonic()
    try:
        with deadline, _opener(deadline).open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.strip().isdigit() and int(declared) > limit:
                raise ImageError(too_large)
            chunks: list[bytes] = []
            total = 0
            while chunk := response.read1(_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise ImageError(too_large)
                chunks.append(chunk)
                if time.monotonic() - start > deadline.seconds:
                    break
            if deadline.expired or time.monotonic() - start > deadline.seconds:
                raise ImageError(_too_slow(shown, deadline.seconds))
    except ImageError:
        raise
    except urllib.error.HTTPError as exc:
        raise ImageError(f"{shown} returned HTTP {exc.code} {_one_line(exc.reason)} — check the address") from None
    except TimeoutError:
        if deadline.expired:
            raise ImageError(_too_slow(shown, deadline.seconds)) from None
        raise ImageError(_timed_out(shown, timeout)) from None
    except urllib.error.URLError as exc:
        if deadline.expired:
            raise ImageError(_too_slow(shown, deadline.seconds)) from None
        if isinstance(exc.reason, TimeoutError):
            raise ImageError(_timed_out(shown, timeout)) from None
        raise ImageError(
            f"{shown} is unreachable ({_one_line(exc.reason)}) — check the address and the network"
        ) from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # reset, bad status, bad URL
        if deadline.expired:
            raise ImageError(_too_slow(shown, deadline.seconds)) from None
        raise ImageError(
            f"{shown} could not be downloaded ({_one_line(exc) or type(exc).__name__}) "
            "— check the address and the network"
        ) from None
    return b"".join(chunks)


def _too_slow(shown: str, seconds: float) -> str:
    return (
        f"{shown} took longer than {seconds:g} s to download (the server sends too slowly) "
        "— download the image first and pass its file"
    )


def _timed_out(shown: str, timeout: float) -> str:
    return f"{shown} timed out after {timeout:g} s — check the address and the network, or download the image first"
