"""Tests of featuremaps.images: sources, colour modes, failures, samples and the edge sheet."""

from __future__ import annotations

import http.server
import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from featuremaps import images
from featuremaps.errors import FeatureMapsError, ImageError
from featuremaps.images import (
    SAMPLES,
    describe_source,
    edge_image,
    list_samples,
    load_image,
    sample_path,
)

# --------------------------------------------------------------------------- helpers


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_png(width: int, height: int, *, with_data: bool = True) -> bytes:
    """A valid 1-bit grayscale PNG of any size, built without allocating the pixels."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
    if with_data:
        row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
        compressor = zlib.compressobj(9)
        body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
        out += png_chunk(b"IDAT", body)
    return out + png_chunk(b"IEND", b"")


def noise(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def assert_one_line(exc: pytest.ExceptionInfo[ImageError]) -> None:
    message = str(exc.value)
    assert message and "\n" not in message


# --------------------------------------------------------------------------- sources


def test_path_str_and_pathlike(tmp_path: Path) -> None:
    src = noise((30, 20))
    file = tmp_path / "photo.png"
    src.save(file)
    for source in (file, str(file)):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (30, 20)
        assert np.array_equal(pixels(image), pixels(src))


def test_bytes_bytearray_filelike_and_pil() -> None:
    src = noise((12, 9))
    data = encode(src)
    for source in (data, bytearray(data), memoryview(data), io.BytesIO(data), src):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (12, 9)
        assert np.array_equal(pixels(image), pixels(src))


def test_pil_input_is_not_modified() -> None:
    src = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    out = load_image(src)
    assert src.mode == "RGBA" and src.getpixel((0, 0)) == (10, 20, 30, 0)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert load_image(rgb) is not rgb


def test_lazy_pil_image_is_loaded(tmp_path: Path) -> None:
    file = tmp_path / "lazy.png"
    noise((8, 8)).save(file)
    with Image.open(file) as lazy:
        image = load_image(lazy)
    assert image.mode == "RGB" and image.size == (8, 8)
    with Image.open(file) as opened:
        assert describe_source(opened) == "lazy.png"


def test_name_replaces_the_source_in_messages() -> None:
    with pytest.raises(ImageError, match=r"^upload\.png is not an image"):
        load_image(b"hello", name="upload.png")


def test_text_mode_file_object_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("hello")
    with open(file) as text, pytest.raises(ImageError, match=r"notes\.txt gave str.*binary mode"):
        load_image(text)


# --------------------------------------------------------------------------- colour modes


def test_rgba_transparent_pixel_becomes_white() -> None:
    rgba = Image.new("RGBA", (2, 1), (200, 10, 10, 0))
    rgba.putpixel((1, 0), (200, 10, 10, 255))
    image = load_image(encode(rgba))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (200, 10, 10)


def test_rgba_half_transparent_is_composited() -> None:
    image = load_image(Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert image.getpixel((0, 0)) == (127, 127, 127)


def test_la_alpha_composited_onto_white() -> None:
    la = Image.new("LA", (2, 1), (100, 0))
    la.putpixel((1, 0), (100, 255))
    image = load_image(encode(la))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (100, 100, 100)


def test_grayscale_and_bilevel() -> None:
    assert load_image(Image.new("L", (3, 3), 77)).getpixel((1, 1)) == (77, 77, 77)
    one = Image.new("1", (2, 1), 0)
    one.putpixel((1, 0), 1)
    image = load_image(encode(one))
    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((1, 0)) == (255, 255, 255)


def test_palette_with_transparency() -> None:
    pal = Image.new("P", (3, 1), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    pal.putpixel((1, 0), 1)
    pal.putpixel((2, 0), 2)
    data = encode(pal, transparency=0)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    image = load_image(data)
    assert [image.getpixel((x, 0)) for x in range(3)] == [(255, 255, 255), (255, 0, 0), (0, 0, 255)]


def test_palette_without_transparency() -> None:
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    pal.putpixel((1, 0), 1)
    image = load_image(encode(pal))
    assert [image.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (10, 200, 30)]


def test_gif_palette_transparency() -> None:
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([9, 9, 9, 0, 255, 0] + [0] * (256 * 3 - 6))
    pal.putpixel((1, 0), 1)
    image = load_image(encode(pal, "GIF", transparency=0))
    assert [image.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 255, 0)]


def test_rgb_png_with_transparent_colour_key() -> None:
    rgb = Image.new("RGB", (2, 1), (1, 2, 3))
    rgb.putpixel((1, 0), (50, 60, 70))
    image = load_image(encode(rgb, transparency=(1, 2, 3)))
    assert [image.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (50, 60, 70)]


def test_16bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image = load_image(data)
    assert image.mode == "RGB"
    assert pixels(image)[0, :, 0].tolist() == [0, 1, 128, 255]
    assert pixels(image)[0, 3].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_modes(mode: str) -> None:
    fmt = ">HH" if mode == "I;16B" else "<HH"
    src = Image.frombytes(mode, (2, 1), struct.pack(fmt, 65535, 32768))
    assert src.mode == mode
    assert pixels(load_image(src))[0, :, 0].tolist() == [255, 128]


def test_32bit_int_mode() -> None:
    in_range = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert in_range.mode == "I"
    assert pixels(load_image(in_range))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-100, 0, 100_000]], dtype=np.int32))
    assert pixels(load_image(wide))[0, :, 0].tolist() == [0, 0, 255]


def test_float_mode_min_max_normalized() -> None:
    image = load_image(Image.fromarray(np.array([[-1.0, 0.0, 3.0]], dtype=np.float32)))
    assert image.mode == "RGB"
    assert pixels(image)[0, :, 0].tolist() == [0, 64, 255]
    constant = load_image(Image.fromarray(np.full((2, 2), 7.5, dtype=np.float32)))
    assert pixels(constant).max() == 0


def test_cmyk_tiff_matches_pil_conversion(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (3, 1), (0, 255, 255, 0))
    cmyk.putpixel((1, 0), (0, 0, 0, 255))
    cmyk.putpixel((2, 0), (50, 100, 150, 20))
    file = tmp_path / "print.tiff"
    cmyk.save(file)
    image = load_image(file)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((1, 0)) == (0, 0, 0)
    assert np.array_equal(pixels(image), pixels(Image.open(file).convert("RGB")))


def test_ycbcr_matches_pil_conversion() -> None:
    ycc = Image.new("YCbCr", (2, 2), (120, 90, 200))
    image = load_image(ycc)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == ycc.convert("RGB").getpixel((0, 0))


def test_exif_orientation_is_applied() -> None:
    src = Image.new("RGB", (40, 20), (0, 0, 255))
    src.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    image = load_image(encode(src, exif=exif))
    assert image.size == (20, 40)
    assert image.getpixel((19, 0)) == (255, 0, 0)
    assert image.getpixel((0, 0)) == (0, 0, 255)


def test_exif_orientation_jpeg() -> None:
    src = Image.new("RGB", (64, 32), (0, 0, 0))
    src.paste((255, 255, 255), (0, 0, 16, 16))  # white block top-left
    exif = Image.Exif()
    exif[0x0112] = 8  # display needs a 90 degree counter-clockwise turn
    image = load_image(encode(src, "JPEG", exif=exif, quality=95))
    assert image.size == (32, 64)
    assert min(image.getpixel((4, 60))) > 200  # top-left went to bottom-left
    assert max(image.getpixel((28, 4))) < 50


# --------------------------------------------------------------------------- arrays and tensors


def test_array_grayscale_and_channels() -> None:
    gray = np.array([[0, 128], [255, 7]], dtype=np.uint8)
    assert pixels(load_image(gray))[1, 1].tolist() == [7, 7, 7]
    assert pixels(load_image(gray[..., None]))[0, 1].tolist() == [128, 128, 128]
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[1, 2] = (1, 2, 3)
    image = load_image(rgb)
    assert image.size == (3, 2) and image.getpixel((2, 1)) == (1, 2, 3)


def test_array_rgba_composited() -> None:
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)
    rgba[0, 1] = (10, 20, 30, 255)
    image = load_image(rgba)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (10, 20, 30)


def test_array_uint16_bool_float() -> None:
    u16 = np.array([[65535, 32768, 0]], dtype=np.uint16)
    assert pixels(load_image(u16))[0, :, 0].tolist() == [255, 128, 0]
    flags = np.array([[True, False]])
    assert pixels(load_image(flags))[0, :, 0].tolist() == [255, 0]
    floats = np.array([[0.0, 0.5, 1.0, 1.00001, -0.00001]], dtype=np.float32)
    assert pixels(load_image(floats))[0, :, 0].tolist() == [0, 128, 255, 255, 0]


def test_array_small_ints_accepted() -> None:
    ints = np.array([[0, 100, 255]], dtype=np.int64)
    assert pixels(load_image(ints))[0, :, 0].tolist() == [0, 100, 255]
    match = r"^array has int64 values from -1 to 300, outside 0\.\.255"
    with pytest.raises(ImageError, match=match):
        load_image(np.array([[-1, 300]]))


def test_array_channels_first() -> None:
    chw = np.zeros((3, 5, 7), np.float32)
    chw[0, 4, 6] = 1.0  # red at x=6, y=4
    image = load_image(chw)
    assert image.size == (7, 5)
    assert image.getpixel((6, 4)) == (255, 0, 0)
    one = np.full((1, 5, 7), 200, np.uint8)
    assert load_image(one).size == (7, 5)
    batch = np.zeros((1, 3, 5, 7), np.uint8)
    assert load_image(batch).size == (7, 5)


def test_float_array_out_of_range() -> None:
    match = r"^array has float values from -2\.1 to 2\.6, outside \[0, 1\] — scale it to \[0, 1\]"
    with pytest.raises(ImageError, match=match):
        load_image(np.array([[-2.1, 2.6]], dtype=np.float64))
    with pytest.raises(ImageError, match=r"NaN or infinite"):
        load_image(np.array([[0.0, np.nan]]))


def test_bad_arrays() -> None:
    with pytest.raises(ImageError, match=r"^array has shape \(2, 5, 5, 3\)"):
        load_image(np.zeros((2, 5, 5, 3), np.uint8))
    with pytest.raises(ImageError, match=r"^array has shape \(5, 5, 2\)"):
        load_image(np.zeros((5, 5, 2), np.uint8))
    with pytest.raises(ImageError, match=r"holds no pixels"):
        load_image(np.zeros((0, 5), np.uint8))
    with pytest.raises(ImageError, match=r"dtype complex128"):
        load_image(np.zeros((2, 2), complex))
    match = r"^array is 10x10 pixels \(100 pixels\), more than the limit of 99 pixels"
    with pytest.raises(ImageError, match=match):
        load_image(np.zeros((10, 10), np.uint8), max_pixels=99)


def test_torch_tensor() -> None:
    torch = pytest.importorskip("torch")
    chw = torch.zeros(3, 4, 6)
    chw[1, 3, 5] = 1.0
    image = load_image(chw)
    assert image.size == (6, 4) and image.getpixel((5, 3)) == (0, 255, 0)
    gray = torch.full((4, 6), 255, dtype=torch.uint8)
    assert load_image(gray).getpixel((0, 0)) == (255, 255, 255)
    half = torch.ones(1, 3, 2, 2, dtype=torch.bfloat16, requires_grad=True)
    assert load_image(half).getpixel((1, 1)) == (255, 255, 255)
    assert describe_source(chw) == "tensor"
    with pytest.raises(ImageError, match=r"^tensor has float values from -1 to 1"):
        load_image(torch.linspace(-1, 1, 12).reshape(3, 2, 2))


# --------------------------------------------------------------------------- failures


def test_missing_file(tmp_path: Path) -> None:
    match = r"^image file .*nope\.png not found — check the path$"
    with pytest.raises(ImageError, match=match) as exc:
        load_image(tmp_path / "nope.png")
    assert_one_line(exc)
    assert isinstance(exc.value, FeatureMapsError) and isinstance(exc.value, ValueError)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"is a directory, not an image file"):
        load_image(tmp_path)


def test_empty_path() -> None:
    with pytest.raises(ImageError, match=r"^the image path is empty"):
        load_image("")


def test_empty_file_and_bytes(tmp_path: Path) -> None:
    file = tmp_path / "empty.png"
    file.write_bytes(b"")
    with pytest.raises(ImageError, match=r"^empty\.png is empty \(0 bytes\)"):
        load_image(file)
    with pytest.raises(ImageError, match=r"^uploaded bytes are empty \(0 bytes\)"):
        load_image(b"")
    with pytest.raises(ImageError, match=r"^uploaded file is empty"):
        load_image(io.BytesIO())


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    file = tmp_path / "readme.txt"
    file.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match=r"^readme\.txt is not an image") as exc:
        load_image(file)
    assert_one_line(exc)
    with pytest.raises(ImageError, match=r"^uploaded bytes are not an image"):
        load_image(b"GIF? no")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path: Path, fmt: str) -> None:
    data = encode(noise((64, 64)), fmt)
    file = tmp_path / f"cut.{fmt.lower()}"
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=rf"^cut\.{fmt.lower()} is truncated or corrupt") as exc:
        load_image(file)
    assert_one_line(exc)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_data() -> None:
    data = bytearray(encode(noise((32, 32))))
    data[60:200] = bytes(140)  # smash the compressed pixels, keep the header
    with pytest.raises(ImageError, match=r"^uploaded bytes are truncated or corrupt"):
        load_image(bytes(data))


def test_pixel_limit_from_header() -> None:
    data = encode(Image.new("RGB", (10, 10)))
    match = r"^uploaded bytes are 10x10 pixels \(100 pixels\), more than the limit of 99 pixels"
    with pytest.raises(ImageError, match=match):
        load_image(data, max_pixels=99)
    assert load_image(data, max_pixels=100).size == (10, 10)


def test_big_bilevel_png_refused_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = bilevel_png(9000, 9000)
    assert Image.open(io.BytesIO(data)).size == (9000, 9000)

    def no_decoding(self: object) -> None:
        raise AssertionError("decoded an image that is over the pixel limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    match = r"^uploaded bytes are 9000x9000 pixels \(81,000,000 pixels\), more than the limit of "
    with pytest.raises(ImageError, match=match + "50,000,000 pixels"):
        load_image(data, max_pixels=50_000_000)
    with pytest.raises(ImageError, match=r"more than the limit of 64,000,000 pixels"):
        load_image(data)  # default MAX_PIXELS


def test_pil_decompression_bomb_error_is_converted() -> None:
    data = bilevel_png(20_000, 20_000, with_data=False)  # 400 Mpx: over PIL's own hard limit
    with pytest.raises(ImageError, match=r"^bomb\.png is too large to decode safely"):
        load_image(data, name="bomb.png", max_pixels=10**12)


def test_too_small(tmp_path: Path) -> None:
    file = tmp_path / "photo.png"
    Image.new("RGB", (16, 12)).save(file)
    with pytest.raises(
        ImageError,
        match=r"^photo\.png is 16x12 pixels; this model needs at least 32x32 "
        r"— use a larger image$",
    ):
        load_image(file, min_size=32)
    assert load_image(file, min_size=12).size == (16, 12)


def test_unsupported_type() -> None:
    with pytest.raises(ImageError, match=r"^cannot load an image from an object of type int —"):
        load_image(42)
    with pytest.raises(ImageError, match=r"from an object of type dict — pass a file path"):
        load_image({"a": 1})
    with pytest.raises(ImageError, match=r"^ftp://host/a\.png is not an http:// or https:// URL"):
        load_image("ftp://host/a.png")


def test_unknown_sample() -> None:
    match = (
        r"^unknown sample 'sample:dog' — available samples: "
        r"edge, astronaut, chelsea, coffee, rocket$"
    )
    with pytest.raises(ImageError, match=match):
        load_image("sample:dog")
    with pytest.raises(ImageError, match=r"unknown sample 'dog'"):
        sample_path("dog")
    with pytest.raises(ImageError, match=r"sample 'edge' is drawn"):
        sample_path("edge")


# --------------------------------------------------------------------------- URLs


class _Handler(http.server.BaseHTTPRequestHandler):
    root: Path

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        if self.path == "/missing.png":
            self.send_error(404, "Not Found")
        elif self.path == "/huge":  # no Content-Length: the size is only found while reading
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            for _ in range(8):
                self.wfile.write(b"\x00" * 1024)
        elif self.path == "/huge-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif self.path == "/slow":
            time.sleep(1.0)
            self.send_response(200)
            self.end_headers()
        else:
            file = self.root / self.path.lstrip("/")
            if not file.is_file():
                self.send_error(404, "Not Found")
                return
            body = file.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the client hanging up early is expected in these tests


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[str]:
    handler = type("Handler", (_Handler,), {"root": tmp_path})
    httpd = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_url_loads(server: str, tmp_path: Path) -> None:
    src = noise((20, 10))
    src.save(tmp_path / "pic.png")
    image = load_image(f"{server}/pic.png")
    assert image.size == (20, 10) and np.array_equal(pixels(image), pixels(src))
    assert describe_source(f"{server}/pic.png") == f"{server}/pic.png"


def test_url_404(server: str) -> None:
    url = f"{server}/missing.png"
    match = rf"^URL {url} returned HTTP 404 Not Found — check the address$"
    with pytest.raises(ImageError, match=match):
        load_image(url)


def test_url_not_an_image(server: str, tmp_path: Path) -> None:
    (tmp_path / "page.html").write_text("<html>hi</html>")
    with pytest.raises(ImageError, match=rf"^URL {server}/page\.html is not an image"):
        load_image(f"{server}/page.html")


def test_url_too_large(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_DOWNLOAD_BYTES", 4096)
    with pytest.raises(ImageError, match=r"/huge is larger than the download limit of 4,096 bytes"):
        load_image(f"{server}/huge")
    with pytest.raises(ImageError, match=r"/huge-declared is larger than the download limit"):
        load_image(f"{server}/huge-declared")


def test_url_timeout(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "URL_TIMEOUT", 0.2)
    with pytest.raises(ImageError, match=r"^URL .*/slow timed out after 0\.2 s"):
        load_image(f"{server}/slow")


def test_url_unreachable() -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    match = rf"^URL http://127\.0\.0\.1:{port}/x\.png is unreachable \(.+\) — check the address"
    with pytest.raises(ImageError, match=match) as exc:
        load_image(f"http://127.0.0.1:{port}/x.png")
    assert_one_line(exc)


# --------------------------------------------------------------------------- samples and names


def test_sample_list() -> None:
    assert list_samples() == ["edge", "astronaut", "chelsea", "coffee", "rocket"]
    assert list(SAMPLES) == list_samples()


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("astronaut", (512, 512)),
        ("chelsea", (451, 300)),
        ("coffee", (600, 400)),
        ("rocket", (640, 427)),
    ],
)
def test_photo_samples(name: str, size: tuple[int, int]) -> None:
    image = load_image(f"sample:{name}")
    assert image.mode == "RGB" and image.size == size
    path = sample_path(name)
    assert path.is_file() and path.parent.name == "samples"
    assert (path.parent / "LICENSES.md").is_file()
    assert load_image(path).size == size


def test_edge_sample() -> None:
    image = load_image("sample:edge")
    assert image.tobytes() == edge_image(224).tobytes()


def test_edge_image() -> None:
    first, second = edge_image(224), edge_image()
    assert first.mode == "RGB" and first.size == (224, 224)
    assert first.tobytes() == second.tobytes()
    gray = pixels(first)[..., 0]
    assert set(np.unique(pixels(first)).tolist()) == {0, 255}
    dark = float((gray < 128).mean())
    assert 0.03 < dark < 0.40
    for strip in (gray[:12], gray[-12:], gray[:, :12], gray[:, -12:]):
        assert (strip < 128).mean() > 0.05  # shapes reach close to every border
    quadrants = [gray[:112, :112], gray[:112, 112:], gray[112:, :112], gray[112:, 112:]]
    assert all((q < 128).mean() > 0.03 for q in quadrants)  # spread over the whole sheet
    big = edge_image(448)
    assert big.size == (448, 448) and big.mode == "RGB"
    assert 0.03 < float((pixels(big)[..., 0] < 128).mean()) < 0.40


def test_describe_source(tmp_path: Path) -> None:
    assert describe_source(tmp_path / "a" / "photo.jpg") == "photo.jpg"
    assert describe_source("pics/cat.png") == "cat.png"
    assert describe_source("sample:edge") == "sample:edge"
    assert describe_source("https://example.com/x.png") == "https://example.com/x.png"
    assert describe_source(b"abc") == "bytes"
    assert describe_source(np.zeros((2, 2))) == "array"
    assert describe_source(Image.new("RGB", (1, 1))) == "PIL image"
    assert describe_source(io.BytesIO(b"")) == "uploaded file"
