"""The router's page and ``/preview`` in-process: files served, offline-safe, labelled, thumbnails right."""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser

import httpx
import numpy as np
import pytest
from image_factories import make_dicom, make_jpeg, make_png
from PIL import Image
from router_fakes import FakeStack, build_router_app

from services.common.images import decode_image
from services.router.web import THUMBNAIL_SIDE, WEB_DIR, make_thumbnail


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = build_router_app(FakeStack(), max_image_bytes=200_000)  # build_app attaches the page
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
        yield c


async def _preview(client: httpx.AsyncClient, data: bytes, name: str = "x.png") -> httpx.Response:
    return await client.post("/preview", files={"image": (name, data, "application/octet-stream")})


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


class _Controls(HTMLParser):
    """Collects form controls, labels and every URL the page refers to."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: list[dict[str, str | None]] = []
        self.label_targets: set[str] = set()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("input", "select", "textarea"):
            self.controls.append(a)
        if tag == "label" and a.get("for"):
            self.label_targets.add(a["for"] or "")
        for key in ("src", "href", "action"):
            if a.get(key):
                self.urls.append(a[key] or "")


async def test_page_and_its_files_are_served(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="static/app.js"' in page.text and 'href="static/app.css"' in page.text
    css = await client.get("/static/app.css")
    js = await client.get("/static/app.js")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert js.text == (WEB_DIR / "app.js").read_text(encoding="utf-8")
    assert (await client.get("/static/../web.py")).status_code == 404


async def test_the_page_needs_nothing_from_another_host() -> None:
    for name in ("index.html", "app.css", "app.js"):
        text = (WEB_DIR / name).read_text(encoding="utf-8")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import", text), name
    parser = _Controls()
    parser.feed((WEB_DIR / "index.html").read_text(encoding="utf-8"))
    assert parser.urls and all(not u.startswith(("/", "http")) or u == "data:," for u in parser.urls)


def test_every_control_has_a_label() -> None:
    parser = _Controls()
    parser.feed((WEB_DIR / "index.html").read_text(encoding="utf-8"))
    names = {c.get("id") for c in parser.controls}
    assert {
        "image",
        "question",
        "domain",
        "retrieval",
        "k_max",
        "api-key",
        "task-vqa",
        "task-report",
    } <= names
    unlabelled = [
        c for c in parser.controls if c.get("id") not in parser.label_targets and not c.get("aria-label")
    ]
    assert unlabelled == []


async def test_page_is_not_in_the_openapi_schema_but_preview_is(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/" not in paths
    assert "/preview" in paths and "415" in paths["/preview"]["post"]["responses"]
    assert "/vqa" in paths


async def test_preview_shrinks_a_large_image_and_keeps_its_shape(client: httpx.AsyncClient) -> None:
    response = await _preview(client, make_jpeg((1024, 640), colour=(30, 120, 200)), "big.jpg")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["cache-control"] == "no-store"
    assert (response.headers["x-image-format"], response.headers["x-image-width"]) == ("jpeg", "1024")
    thumbnail = Image.open(io.BytesIO(response.content))
    assert thumbnail.format == "PNG" and thumbnail.size == (THUMBNAIL_SIDE, 320)
    assert thumbnail.convert("RGB").getpixel((10, 10)) == pytest.approx((30, 120, 200), abs=3)


async def test_preview_renders_dicom_as_the_pipeline_decodes_it(client: httpx.AsyncClient) -> None:
    pixels = (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 7) % 4096
    dicom = make_dicom(pixels)
    response = await _preview(client, dicom, "scan.dcm")
    assert response.status_code == 200, response.text
    assert response.headers["x-image-format"] == "dicom"
    thumbnail = Image.open(io.BytesIO(response.content)).convert("RGB")
    assert thumbnail.size == (48, 40)  # small images are never enlarged
    assert np.array_equal(np.asarray(thumbnail), np.asarray(decode_image(dicom).image))


async def test_preview_reports_decode_warnings(client: httpx.AsyncClient) -> None:
    frames = np.stack([np.full((16, 16), v, dtype=np.uint16) for v in (10, 200)])
    response = await _preview(client, make_dicom(frames), "cine.dcm")
    assert response.status_code == 200
    assert "first frame used" in response.headers["x-image-warnings"]


async def test_preview_refuses_a_text_file_with_the_envelope(client: httpx.AsyncClient) -> None:
    response = await _preview(client, b"patient notes, not an image\n" * 4, "notes.txt")
    assert response.status_code == 415
    error = _error(response)
    assert error["code"] == "unsupported_media_type"
    assert error["message"].startswith("unrecognised image format")


@pytest.mark.parametrize(
    ("files", "status", "param"),
    [
        (None, 400, "image"),
        ({"image": ("empty.png", b"", "image/png")}, 400, "image"),
        ({"image": ("huge.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 300_000, "image/png")}, 413, "image"),
    ],
    ids=["missing", "empty", "too-large"],
)
async def test_preview_refuses_bad_uploads(
    client: httpx.AsyncClient, files: dict | None, status: int, param: str
) -> None:
    response = await client.post("/preview", files=files, data={"x": "1"} if files is None else None)
    assert response.status_code == status
    assert _error(response)["param"] == param


def test_make_thumbnail_bounds_the_longest_side() -> None:
    png, decoded = make_thumbnail(make_png((300, 900)), max_side=90)
    assert Image.open(io.BytesIO(png)).size == (30, 90)
    assert (decoded.width, decoded.height, decoded.format) == (300, 900, "png")


async def test_the_api_still_answers_beside_the_page(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/vqa",
        files={"image": ("x.png", make_png(), "image/png")},
        data={"question": "Is there an effusion?"},
    )
    assert response.status_code == 200 and response.json()["answer"] == "yes"
