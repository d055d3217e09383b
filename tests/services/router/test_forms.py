"""The router's forms as clients send them: strict text decoding, blank fields, errors that name the image.

The router runs in-process over the HTTP-level fakes of ``tests/router_fakes.py``; multipart bodies are
written by hand where the test is about their bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from image_factories import make_png
from router_fakes import FakeStack, build_router

from services.common.logging import AUDIT_LOGGER, make_handler

BOUNDARY = "form-test-boundary"
QUESTION = "Is there a pleural effusion?"


def _multipart(*parts: tuple[bytes, bytes], charset: str | None = None) -> dict[str, Any]:
    """Request kwargs for a hand-written multipart body: (part headers, payload) per part."""
    body = b""
    for headers, payload in parts:
        body += b"--" + BOUNDARY.encode() + b"\r\n" + headers + b"\r\n\r\n" + payload + b"\r\n"
    body += b"--" + BOUNDARY.encode() + b"--\r\n"
    content_type = f"multipart/form-data; boundary={BOUNDARY}" + (f"; charset={charset}" if charset else "")
    return {"content": body, "headers": {"content-type": content_type}}


def _text(name: str, payload: bytes, content_type: bytes | None = None) -> tuple[bytes, bytes]:
    headers = b'Content-Disposition: form-data; name="' + name.encode() + b'"'
    if content_type:
        headers += b"\r\nContent-Type: " + content_type
    return headers, payload


def _image(payload: bytes | None = None) -> tuple[bytes, bytes]:
    headers = b'Content-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png'
    return headers, make_png() if payload is None else payload


def _prompt(stack: FakeStack) -> str:
    """The text part of the one prompt the generator received."""
    (body,) = stack.generator_bodies
    return body["messages"][0]["content"][1]["text"]


def _assert_refused(response: httpx.Response, stack: FakeStack, status: int, param: str, needle: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert needle in error["message"], error
    assert stack.classifier_calls == 0 and not stack.retriever_forms and not stack.generator_bodies


# ------------------------------------------------------------------------------------------ text encoding


async def test_non_utf8_question_is_400_naming_the_field_and_the_byte() -> None:
    stack = FakeStack()
    request = _multipart(_text("question", b"Is there an effusion \xff\xfe?"), _image())
    async with build_router(stack) as client:
        response = await client.post("/vqa", **request)
    _assert_refused(response, stack, 400, "question", "not valid UTF-8 text (byte 0xff at position 21)")
    assert response.json()["error"]["code"] == "invalid_input"


@pytest.mark.parametrize("route", ["/vqa", "/report"])
async def test_a_non_utf8_option_is_refused_too(route: str) -> None:
    stack = FakeStack()
    parts = [_text("domain", b"radiolog\xe9"), _image()]
    if route == "/vqa":
        parts.append(_text("question", QUESTION.encode()))
    async with build_router(stack) as client:
        response = await client.post(route, **_multipart(*parts))
    _assert_refused(response, stack, 400, "domain", "UTF-8")


async def test_utf8_accents_reach_the_model_unchanged() -> None:
    """The control: "café" sent as UTF-8 (two bytes for é) is the question the model gets."""
    stack = FakeStack()
    question = "Le café a-t-il un épanchement ?"
    request = _multipart(_text("question", question.encode("utf-8")), _image())
    async with build_router(stack) as client:
        response = await client.post("/vqa", **request)
    assert response.status_code == 200, response.text
    assert question in _prompt(stack)


@pytest.mark.parametrize(
    ("part_type", "request_charset"),
    [(b"text/plain; charset=iso-8859-1", None), (None, "iso-8859-1")],
    ids=["declared-by-the-part", "declared-by-the-request"],
)
async def test_a_declared_charset_is_honoured(part_type: bytes | None, request_charset: str | None) -> None:
    """Latin-1 bytes are fine when the sender says they are Latin-1: "caf\\xe9" is "café"."""
    stack = FakeStack()
    parts = (_text("question", b"Is the caf\xe9 open?", part_type), _image())
    async with build_router(stack) as client:
        response = await client.post("/vqa", **_multipart(*parts, charset=request_charset))
    assert response.status_code == 200, response.text
    assert "Is the café open?" in _prompt(stack)


async def test_a_part_declaring_utf8_is_held_to_it() -> None:
    stack = FakeStack()
    parts = (_text("question", b"caf\xe9?", b"text/plain; charset=utf-8"), _image())
    async with build_router(stack) as client:
        response = await client.post("/vqa", **_multipart(*parts))
    _assert_refused(response, stack, 400, "question", "not valid UTF-8")


@pytest.mark.parametrize(
    ("part_type", "request_charset", "param"),
    [(b"text/plain; charset=klingon-8", None, "question"), (None, "klingon-8", None)],
    ids=["part", "request"],
)
async def test_an_unknown_charset_is_400(
    part_type: bytes | None, request_charset: str | None, param: str | None
) -> None:
    stack = FakeStack()
    parts = (_text("question", QUESTION.encode(), part_type), _image())
    async with build_router(stack) as client:
        response = await client.post("/vqa", **_multipart(*parts, charset=request_charset))
    _assert_refused(response, stack, 400, param, "unknown charset 'klingon-8'")  # type: ignore[arg-type]


async def test_file_parts_are_not_decoded_as_text() -> None:
    """An image full of bytes that are not UTF-8 (PNG's first byte is 0x89) is the file it is."""
    stack = FakeStack()
    png = make_png((16, 16))
    assert png.startswith(b"\x89")
    request = _multipart(_text("question", QUESTION.encode()), _image(png))
    async with build_router(stack) as client:
        response = await client.post("/vqa", **request)
    assert response.status_code == 200, response.text


async def test_starlette_limits_still_apply() -> None:
    """Parsing through our parser keeps Starlette's per-field limit (1 MiB) and its 400."""
    stack = FakeStack()
    request = _multipart(_text("question", b"q" * (1024 * 1024 + 1)), _image())
    async with build_router(stack) as client:
        response = await client.post("/vqa", **request)
    assert response.status_code == 400
    assert "maximum size" in response.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ blank fields


@pytest.mark.parametrize("route", ["/vqa", "/report"])
async def test_blank_optional_fields_are_absent(route: str) -> None:
    """What an HTML form sends for inputs left blank: every option takes its default, no 400."""
    stack = FakeStack()
    blanks = {name: "" for name in ("domain", "retrieval", "k_max", "gamma", "max_tokens", "temperature")}
    form = {**blanks, **({"question": QUESTION} if route == "/vqa" else {})}
    async with build_router(stack) as client:
        response = await client.post(route, files={"image": ("x.png", make_png(), "image/png")}, data=form)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["domain"]["source"] == "classifier" and stack.classifier_calls == 1
    assert body["retrieval"]["mode"] == "adaptive"
    (retrieval,) = stack.retriever_forms
    assert retrieval["k_max"] == "10" and retrieval["strategy"] == "adaptive" and "gamma" not in retrieval
    (generation,) = stack.generator_bodies
    assert generation["max_tokens"] == (32 if route == "/vqa" else 256)
    assert generation["temperature"] == 0.0


async def test_a_blank_question_is_reported_missing() -> None:
    stack = FakeStack()
    async with build_router(stack) as client:
        response = await client.post(
            "/vqa", files={"image": ("x.png", make_png(), "image/png")}, data={"question": ""}
        )
    _assert_refused(response, stack, 400, "question", "'question' is required")


async def test_a_filled_option_is_still_checked() -> None:
    stack = FakeStack()
    async with build_router(stack) as client:
        response = await client.post(
            "/vqa",
            files={"image": ("x.png", make_png(), "image/png")},
            data={"question": QUESTION, "k_max": " "},
        )
    _assert_refused(response, stack, 400, "k_max", "k_max")


# ------------------------------------------------------------------------------------------ image errors


@pytest.mark.parametrize("route", ["/vqa", "/report", "/preview"])
@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"hello, not an image", 415, "unsupported_media_type"),
        (make_png((1, 1)), 400, "image_too_small"),
        (make_png()[:60], 422, "invalid_image"),
        (b"", 400, "empty_file"),
    ],
    ids=["not-an-image", "too-small", "truncated", "empty"],
)
async def test_image_errors_name_the_image(route: str, data: bytes, status: int, code: str) -> None:
    stack = FakeStack()
    form = {"question": QUESTION} if route == "/vqa" else {}
    async with build_router(stack) as client:
        response = await client.post(route, files={"image": ("x.png", data, "image/png")}, data=form)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, "image")


async def test_field_errors_keep_their_own_param() -> None:
    stack = FakeStack()
    async with build_router(stack) as client:
        response = await client.post(
            "/vqa",
            files={"image": ("x.png", make_png(), "image/png")},
            data={"question": QUESTION, "k_max": "999"},
        )
    assert response.status_code == 400 and response.json()["error"]["param"] == "k_max"


# ------------------------------------------------------------------------------------------ /preview audit


@pytest.fixture
def audit_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = make_handler("router", "json", stream)
    audit = logging.getLogger(AUDIT_LOGGER)
    level = audit.level
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        audit.removeHandler(handler)
        audit.setLevel(level)


async def test_preview_audit_line_has_the_image_size_and_hash(audit_lines: io.StringIO) -> None:
    png = make_png((40, 30))
    async with build_router(FakeStack()) as client:
        response = await client.post("/preview", files={"image": ("x.png", png, "image/png")})
    assert response.status_code == 200
    (line,) = [json.loads(text) for text in audit_lines.getvalue().splitlines()]
    assert line["route"] == "/preview" and line["status"] == 200
    assert line["image_bytes"] == len(png)
    assert line["image_sha256"] == hashlib.sha256(png).hexdigest()[:16]
