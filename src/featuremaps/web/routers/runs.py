"""Runs: ``POST /api/runs`` (a job to poll), the list, one run's state, its input picture, one file
of its folder, and the whole folder as a zip (streamed)."""

from __future__ import annotations

import asyncio
import mimetypes
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Send

from ...errors import FormError, NotFound, NotReady
from ...runs import zip_run
from ..deps import IMMUTABLE, Cached, get_cached, get_options, get_viewer, png
from ..forms import parse_run_form, read_picture
from ..jobs import Viewer
from ..limits import BodyTimeout, BodyTooLarge

router = APIRouter(prefix="/api/runs")
#: A run's index.html is shown as a document of its own: no scripts, no access to the viewer.
FILE_POLICY = "sandbox; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"


@router.post("", status_code=202)
async def create_run(
    request: Request, viewer: Annotated[Viewer, Depends(get_viewer)], opts: Annotated[dict, Depends(get_options)]
) -> JSONResponse:
    try:
        form = await request.form(max_files=2, max_fields=16, max_part_size=64 * 1024)
    except (BodyTooLarge, BodyTimeout):
        raise
    except HTTPException as exc:  # malformed multipart
        raise FormError(f"cannot read the form: {exc.detail}") from None
    try:
        req, picture = parse_run_form(form, opts, client=request.client.host if request.client else "")
        # admitted (or refused with a 413/429) before the upload is read or decoded
        job = await run_in_threadpool(viewer.admit, req)
        if not job.is_finished:
            try:
                image = await read_picture(viewer, job, picture, opts)
            except BaseException:
                viewer.discard(job)
                raise
            viewer.enqueue(job, image)
    finally:
        await form.close()
    return JSONResponse(
        job.to_dict(), status_code=202, headers={"Location": f"/api/runs/{job.id}", "Cache-Control": "no-store"}
    )


@router.get("")
def list_runs(viewer: Annotated[Viewer, Depends(get_viewer)]) -> JSONResponse:
    items = []
    for job in reversed(viewer.jobs()):
        d = job.to_dict()
        d.pop("layers", None)
        items.append(d)
    return JSONResponse({"runs": items}, headers={"Cache-Control": "no-store"})


@router.get("/{run_id}")
def get_run(run_id: str, viewer: Annotated[Viewer, Depends(get_viewer)]) -> JSONResponse:
    return JSONResponse(viewer.job(run_id).to_dict(), headers={"Cache-Control": "no-store"})


@router.get("/{run_id}/input.png")
def input_png(
    run_id: str, viewer: Annotated[Viewer, Depends(get_viewer)], cached: Annotated[Cached, Depends(get_cached)]
) -> Response:
    viewer.job(run_id)

    def make() -> bytes:
        image = viewer.data(run_id).image
        if image is None:
            raise NotFound("this run has no input picture")
        return png(image)

    return cached(f"{run_id}|input", "image/png", make)


@router.get("/{run_id}/download")
async def download(run_id: str, viewer: Annotated[Viewer, Depends(get_viewer)]) -> Response:
    """The run folder as a zip, made while it is sent (nothing is written to disk, a few MB are
    held however slowly the client reads); at most ``max_downloads`` at once (429 beyond)."""
    job = viewer.job(run_id)
    if job.state != "done":
        raise NotReady(f"run {run_id} is {job.state}; its folder can be downloaded once it is done")
    folder = viewer.folder(run_id)
    release = viewer.take_download(run_id)
    model = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(job.info.get("model") or "run"))[:40]
    mode = str(job.info.get("mode") or "")
    return ZipResponse(
        folder,
        release,
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="featuremaps-{model}-{mode}-{run_id}.zip"',
            "Cache-Control": "private, max-age=3600",
        },
    )


#: Longest path (bytes) and path component a run file may have; anything else is no file of a run.
MAX_PATH, MAX_NAME = 1024, 255


@router.get("/{run_id}/files/{path:path}")
def run_file(request: Request, run_id: str, path: str, viewer: Annotated[Viewer, Depends(get_viewer)]) -> FileResponse:
    job = viewer.job(run_id)
    if job.state != "done":
        raise NotReady(f"run {run_id} is {job.state}; its files are there once it is done")
    root = viewer.folder(run_id).resolve()
    missing = NotFound("no such file in this run")
    # the route's pattern lets a trailing newline go (``$`` matches before it): check the raw path
    raw = str(request.scope.get("path", ""))
    if not raw.endswith(f"/{run_id}/files/{path}"):
        raise missing
    if not path or len(path.encode("utf-8", "replace")) > MAX_PATH or any(ord(c) < 32 or c in "\\\x7f" for c in path):
        raise missing
    parts = path.split("/")
    if any(
        not p or p in ("..", ".") or p.startswith(".") or len(p.encode("utf-8", "replace")) > MAX_NAME for p in parts
    ):
        raise missing
    try:
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise missing
    except (OSError, ValueError):  # names the file system refuses
        raise missing from None
    media = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if target.suffix == ".npy":
        media = "application/octet-stream"
    return FileResponse(
        target, media_type=media, headers={"Cache-Control": IMMUTABLE, "Content-Security-Policy": FILE_POLICY}
    )


#: Bytes per piece of a streamed zip, and pieces made ahead of what the client has taken.
ZIP_CHUNK, ZIP_AHEAD = 1 << 20, 4
#: Seconds the zip waits for a client that takes nothing before it gives up.
ZIP_STALL_S = 120.0


class _Pipe:
    """What ``runs.zip_run`` writes into: pieces of :data:`ZIP_CHUNK` bytes handed to the event
    loop, at most :data:`ZIP_AHEAD` ahead of the client (the writer waits for it, then gives up)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, out: asyncio.Queue, cancelled: threading.Event):
        self.loop, self.out, self.cancelled = loop, out, cancelled
        self.slots = threading.Semaphore(ZIP_AHEAD)
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        self.buf += data
        if len(self.buf) >= ZIP_CHUNK:
            self.send(bytes(self.buf))
            self.buf.clear()
        return len(data)

    def flush(self) -> None:
        pass

    def send(self, item: object) -> None:
        deadline = time.monotonic() + ZIP_STALL_S
        while not self.slots.acquire(timeout=0.5):
            if self.cancelled.is_set() or time.monotonic() > deadline:
                raise OSError("the client stopped reading the download")
        if self.cancelled.is_set():
            raise OSError("the download was cancelled")
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


async def zip_stream(folder: Path, release: Callable[[], None], cancelled: threading.Event) -> AsyncIterator[bytes]:
    """``runs.zip_run(folder)`` as it is made, in a thread of its own; ``cancelled`` stops it."""
    loop = asyncio.get_running_loop()
    out: asyncio.Queue = asyncio.Queue()
    pipe = _Pipe(loop, out, cancelled)
    done = object()

    def produce() -> None:
        try:
            zip_run(folder, pipe)
            if pipe.buf:
                pipe.send(bytes(pipe.buf))
            pipe.send(done)
        except BaseException as exc:  # the consumer stops on it
            if not cancelled.is_set():
                loop.call_soon_threadsafe(out.put_nowait, exc)
        finally:
            release()  # the folder is read (or given up on): its slot goes, whatever the consumer does

    thread = threading.Thread(target=produce, name="featuremaps-zip", daemon=True)
    try:
        thread.start()
        while True:
            item = await out.get()
            pipe.slots.release()
            if item is done:
                return
            if isinstance(item, BaseException):
                return  # the zip is cut short: the client sees a truncated file, the server goes on
            yield item  # type: ignore[misc]
    finally:
        cancelled.set()
        release()


class ZipResponse(StreamingResponse):
    """A run folder zipped while it is sent (:func:`zip_stream`). When the client goes away (or is
    cut off for not reading), the server stops sending without closing the stream it was reading;
    this response ends the zip itself, so that its thread and its download slot go at once."""

    def __init__(self, folder: Path, release: Callable[[], None], **kwargs: Any):
        self._cancelled = threading.Event()
        self._release = release
        super().__init__(zip_stream(folder, release, self._cancelled), **kwargs)

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            self._cancelled.set()
            self._release()
