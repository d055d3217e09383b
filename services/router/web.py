"""The router's browser page: ``GET /``, its static files under ``/static`` and ``POST /preview``.

The page is three plain files in ``web/`` (HTML, CSS, JavaScript) shipped as package data: no build step,
nothing fetched from another host, so it works offline and behind a strict Content-Security-Policy. It
calls the public API (``/vqa``, ``/report``) exactly as any client does. ``/preview`` exists because a
browser cannot show a DICOM file: the server decodes the upload through the same gate as ``/vqa`` and
answers a small PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, FastAPI, File, Request, UploadFile
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

from services.common.errors import ErrorResponse
from services.common.images import DecodedImage, ImageLimits, decode_image, encode_png
from services.router.api import IMAGE_ERRORS, AuthenticatedFormRoute, read_upload
from services.router.auth import require_api_key

WEB_DIR = Path(__file__).with_name("web")
THUMBNAIL_SIDE = 512
# Everything the page needs comes from this origin; blob: is the thumbnail object URL.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PREVIEW_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422)}

web = APIRouter(tags=["web"])
uploads = APIRouter(tags=["web"], route_class=AuthenticatedFormRoute)  # the key before the body


def make_thumbnail(
    data: bytes, limits: ImageLimits | None = None, max_side: int = THUMBNAIL_SIDE
) -> tuple[bytes, DecodedImage]:
    """PNG bytes of the decoded upload, no side longer than ``max_side``, and the decoded image itself."""
    decoded = decode_image(data, limits)
    thumbnail = decoded.image.copy()
    thumbnail.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return encode_png(thumbnail), decoded


@web.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The page to try the service."""
    return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@uploads.post(
    "/preview",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "PNG thumbnail of the decoded image."},
        **PREVIEW_ERRORS,
    },
    summary="A PNG thumbnail of an uploaded image (DICOM included)",
    operation_id="router-preview",
    dependencies=[Depends(require_api_key)],
)
async def preview(
    request: Request,
    image: Annotated[UploadFile, File(description="PNG, JPEG or DICOM file.")],
) -> Response:
    """Decode the upload with the limits of ``/vqa`` and answer a thumbnail the browser can show."""
    pipeline = request.app.state.pipeline
    data = await read_upload(image, pipeline, request)  # the audit line gets its size and hash
    try:
        png, decoded = await anyio.to_thread.run_sync(make_thumbnail, data, pipeline.limits)
    except IMAGE_ERRORS as error:
        error.param = error.param or "image"
        raise
    headers = {
        "Cache-Control": "no-store",  # a patient image: never kept by a shared cache
        "X-Image-Format": decoded.format,
        "X-Image-Width": str(decoded.width),
        "X-Image-Height": str(decoded.height),
    }
    if decoded.warnings:
        text = "; ".join(decoded.warnings)
        headers["X-Image-Warnings"] = text.encode("latin-1", "replace").decode("latin-1")
    return Response(png, media_type="image/png", headers=headers)


def attach_web(app: FastAPI) -> None:
    """Add the page (``GET /``), its files (``/static``) and ``POST /preview`` to the router app."""
    app.include_router(web)
    app.include_router(uploads)
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
