"""Runs: ``POST /api/runs`` (a job to poll), the list, one run's state, its input picture, one file
of its folder, and the whole folder as a zip."""

from __future__ import annotations

import mimetypes
import os
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from ...errors import FormError, NotFound, NotReady
from ..deps import IMMUTABLE, Cached, get_cached, get_options, get_viewer, png
from ..forms import parse_run_form
from ..jobs import Viewer
from ..limits import BodyTooLarge

router = APIRouter(prefix="/api/runs")
#: A run's index.html is shown as a document of its own: no scripts, no access to the viewer.
FILE_POLICY = "sandbox; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"


@router.post("", status_code=202)
async def create_run(
    request: Request, viewer: Annotated[Viewer, Depends(get_viewer)], opts: Annotated[dict, Depends(get_options)]
) -> JSONResponse:
    try:
        form = await request.form(max_files=2, max_fields=16, max_part_size=64 * 1024)
    except BodyTooLarge:
        raise
    except HTTPException as exc:  # malformed multipart
        raise FormError(f"cannot read the form: {exc.detail}") from None
    try:
        run = await parse_run_form(form, opts, too_large=BodyTooLarge)
    finally:
        await form.close()
    job = viewer.submit(run)
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
        maps = viewer.maps(run_id)
        if maps.image is None:
            raise NotFound("this run has no input picture")
        return png(maps.image)

    return cached(f"{run_id}|input", "image/png", make)


@router.get("/{run_id}/download")
async def download(run_id: str, viewer: Annotated[Viewer, Depends(get_viewer)]) -> Response:
    job = viewer.job(run_id)
    if job.state != "done":
        raise NotReady(f"run {run_id} is {job.state}; its folder can be downloaded once it is done")
    folder = viewer.folder(run_id)
    path = await run_in_threadpool(_zip, folder)
    model = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(job.info.get("model") or "run"))[:40]
    mode = str(job.info.get("mode") or "")
    return FileResponse(
        path,
        media_type="application/zip",
        background=BackgroundTask(os.remove, path),
        headers={
            "Content-Disposition": f'attachment; filename="featuremaps-{model}-{mode}-{run_id}.zip"',
            "Cache-Control": "private, max-age=3600",
        },
    )


@router.get("/{run_id}/files/{path:path}")
def run_file(run_id: str, path: str, viewer: Annotated[Viewer, Depends(get_viewer)]) -> FileResponse:
    job = viewer.job(run_id)
    if job.state != "done":
        raise NotReady(f"run {run_id} is {job.state}; its files are there once it is done")
    root = viewer.folder(run_id).resolve()
    parts = Path(path).parts
    if (
        not path
        or any(p in ("..", ".") or p.startswith(".") for p in parts)
        or Path(path).is_absolute()
        or "\\" in path
    ):
        raise NotFound("no such file in this run")
    target = (root / path).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        raise NotFound("no such file in this run")
    media = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if target.suffix == ".npy":
        media = "application/octet-stream"
    return FileResponse(
        target, media_type=media, headers={"Cache-Control": IMMUTABLE, "Content-Security-Policy": FILE_POLICY}
    )


def _zip(folder: Path) -> str:
    """The run folder zipped into a temporary file (streamed from disk, never held in memory)."""
    import tempfile

    from ...runs import zip_run

    fd, path = tempfile.mkstemp(prefix="featuremaps-", suffix=".zip")
    try:
        with os.fdopen(fd, "wb") as f:
            zip_run(folder, f)
    except BaseException:
        os.remove(path)
        raise
    return path
