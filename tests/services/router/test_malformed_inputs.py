"""A corpus of malformed uploads and fields, sent through the router's public API (``/vqa``, ``/report``).

The router runs in-process over the HTTP-level fakes of ``tests/router_fakes.py``. Every refused input must
get its documented status (README "Serving": not an image 415, corrupt 422, too large 413, bad field 400;
the codes are those of ``services/common/images.py``), the one error envelope, a message that names the
problem, and must cost no call to any dependency. Inputs that are odd but legitimate (16-bit, CMYK,
palette, EXIF-rotated, animated, multi-frame DICOM) are accepted, normalised as documented, and the
response says so in ``warnings`` where the image gate drops frames.

Files are built lazily (a builder per case), so collecting the module costs nothing.
"""

from __future__ import annotations

import base64
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from image_factories import (
    make_animated,
    make_dicom,
    make_jpeg,
    make_noise_image,
    make_png,
    make_png_declaring,
    pil_bytes,
    truncate,
)
from PIL import Image
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)
from router_fakes import FakeStack, build_router

ROUTES = ("/vqa", "/report")
ENVELOPE_FIELDS = {"message", "type", "param", "code"}
QUESTION = "Is there a pleural effusion?"
RED = (255, 0, 0)


# ------------------------------------------------------------------------------------------ builders


def _flip_byte_in_idat(data: bytes) -> bytes:
    """A PNG whose compressed pixel data has one byte flipped (CRC and zlib stream now wrong)."""
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF
    return bytes(corrupt)


def _png_with_bad_header_crc() -> bytes:
    data = bytearray(make_png())
    data[29:33] = b"\x00\x00\x00\x00"  # IHDR CRC
    return bytes(data)


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose SOF0 header claims ``width`` x ``height`` (a bomb header)."""
    data = bytearray(make_jpeg((16, 16)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif_declaring(width: int, height: int) -> bytes:
    data = bytearray(pil_bytes(Image.new("P", (16, 16)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen size
    return bytes(data)


def _real_bomb() -> bytes:
    """6500 x 6500 black 1-bit pixels (42 M, over the 40 M default) in about 5 KB of PNG."""
    return make_png((6500, 6500), mode="1", colour=0)


def _undecodable_transfer_syntax() -> UID:
    """A compressed DICOM transfer syntax no installed pydicom plugin decodes."""
    for uid in (JPEGLSLossless, JPEGLSNearLossless, JPEGLosslessSV1, HTJ2KLossless):
        if not get_decoder(uid).is_available:
            return uid
    pytest.skip("every compressed transfer syntax has a decoder here")


def _dicom_undecodable() -> bytes:
    return make_dicom(
        np.zeros((8, 8), np.uint16),
        transfer_syntax=_undecodable_transfer_syntax(),
        encapsulated_frames=[b"\xff\xd8" + bytes(30)],
    )


def _dicom_unknown_transfer_syntax() -> bytes:
    data = make_dicom()
    known = b"1.2.840.10008.1.2.1\x00"  # Explicit VR Little Endian, padded to even length
    assert known in data
    return data.replace(known, b"1.2.3.4.5.6.7.8.9.0\x00")  # same length: the file stays well-formed


def _tiff_pages() -> bytes:
    return make_animated("TIFF", colours=(RED, (0, 0, 255)))


# ------------------------------------------------------------------------------------------ refusals


@dataclass(frozen=True)
class Refused:
    """A malformed upload and what the router must answer."""

    id: str
    build: Callable[[], bytes]
    status: int
    code: str  # the envelope's machine code
    needle: str  # a piece of the message that names the problem (case-insensitive)
    overrides: dict[str, Any] = field(default_factory=dict)


def _r(case_id: str, build: Callable[[], bytes], status: int, code: str, needle: str, **kw: Any):
    return pytest.param(Refused(case_id, build, status, code, needle, kw), id=case_id)


REFUSED = [
    # not an image at all: 415, the message lists what is accepted
    _r("pdf", lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", 415, "unsupported_media_type", "unrecognised"),
    _r("text", lambda: b"hello, this is not an image", 415, "unsupported_media_type", "PNG, JPEG"),
    _r("zip", lambda: b"PK\x03\x04" + bytes(60), 415, "unsupported_media_type", "unrecognised"),
    _r("svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg"/>', 415, "unsupported_media_type", "DICOM"),
    _r("html", lambda: b"<!doctype html><img src=x>", 415, "unsupported_media_type", "unrecognised"),
    _r(
        "png-first-byte-wrong",
        lambda: b"\x88" + make_png()[1:],
        415,
        "unsupported_media_type",
        "unrecognised",
    ),
    _r("gif90a-magic", lambda: b"GIF90a" + bytes(40), 415, "unsupported_media_type", "unrecognised"),
    # starts like an image, but is truncated or corrupt: 422
    _r(
        "png-truncated",
        lambda: truncate(make_noise_image(fmt="PNG")),
        422,
        "invalid_image",
        "PNG image is truncated or corrupt",
    ),
    _r(
        "jpeg-truncated",
        lambda: truncate(make_noise_image(fmt="JPEG")),
        422,
        "invalid_image",
        "JPEG image is truncated or corrupt",
    ),
    _r(
        "gif-truncated",
        lambda: truncate(make_noise_image(fmt="GIF")),
        422,
        "invalid_image",
        "GIF image is truncated or corrupt",
    ),
    _r(
        "png-corrupt-pixels",
        lambda: _flip_byte_in_idat(make_noise_image()),
        422,
        "invalid_image",
        "truncated or corrupt",
    ),
    _r("png-header-crc", _png_with_bad_header_crc, 422, "invalid_image", "header is corrupt"),
    _r(
        "png-magic-then-garbage",
        lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
        422,
        "invalid_image",
        "starts like a PNG",
    ),
    _r(
        "jpeg-magic-then-garbage",
        lambda: b"\xff\xd8\xff" + bytes(range(256)) * 4,
        422,
        "invalid_image",
        "starts like a JPEG",
    ),
    # decompression bombs: refused from the header, before any pixel is decoded: 413
    _r("png-bomb-header", lambda: make_png_declaring(30000, 30000), 413, "too_many_pixels", "pixel"),
    _r("png-bomb-real", _real_bomb, 413, "too_many_pixels", "6500x6500"),
    _r("jpeg-bomb-header", lambda: _jpeg_declaring(60000, 60000), 413, "too_many_pixels", "pixel"),
    _r("gif-bomb-header", lambda: _gif_declaring(65000, 65000), 413, "too_many_pixels", "pixel"),
    _r(
        "dicom-bomb-header",
        lambda: make_dicom(np.zeros((8, 8), np.uint16), rows_columns=(20000, 20000)),
        413,
        "too_many_pixels",
        "20000x20000",
    ),
    _r(
        "over-configured-pixel-limit",
        lambda: make_png((64, 64)),
        413,
        "too_many_pixels",
        "4096 pixels",
        max_image_pixels=1000,
    ),
    # sizes
    _r("zero-bytes", lambda: b"", 400, "empty_file", "empty"),
    _r(
        "over-byte-limit",
        lambda: make_noise_image((64, 64)),
        413,
        "file_too_large",
        "1000 bytes",
        max_image_bytes=1000,
    ),
    _r("1x1", lambda: make_png((1, 1)), 400, "image_too_small", "at least 8 pixels"),
    _r("7x100", lambda: make_png((7, 100)), 400, "image_too_small", "at least 8 pixels"),
    _r(
        "side-over-16384",
        lambda: make_png_declaring(20000, 8),
        400,
        "image_side_too_large",
        "no side may exceed 16384",
    ),
    # DICOM
    _r(
        "dicom-no-pixel-data",
        lambda: make_dicom(pixel_data=False),
        400,
        "dicom_no_pixel_data",
        "no pixel data",
    ),
    _r(
        "dicom-compressed-no-decoder",
        _dicom_undecodable,
        415,
        "unsupported_transfer_syntax",
        "send the file uncompressed",
    ),
    _r(
        "dicom-deflated",
        lambda: make_dicom(transfer_syntax=DeflatedExplicitVRLittleEndian),
        415,
        "unsupported_transfer_syntax",
        "Deflated",
    ),
    _r(
        "dicom-unknown-transfer-syntax",
        _dicom_unknown_transfer_syntax,
        415,
        "unsupported_transfer_syntax",
        "not a known transfer syntax",
    ),
    _r(
        "dicom-truncated-pixels",
        lambda: truncate(make_dicom(np.zeros((64, 64), np.uint16)), 0.7),
        422,
        "invalid_image",
        "DICOM pixel data could not be decoded",
    ),
    _r(
        "dicom-4x4",
        lambda: make_dicom(np.zeros((4, 4), np.uint16)),
        400,
        "image_too_small",
        "at least 8 pixels",
    ),
]


def _form(route: str) -> dict[str, str]:
    return {"question": QUESTION} if route == "/vqa" else {}


def assert_envelope(response: httpx.Response, status: int, code: str, needle: str) -> None:
    """The one error envelope, the expected status and code, and a message naming the problem."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ENVELOPE_FIELDS, error
    assert error["type"] == "invalid_request_error", error
    assert error["code"] == code, error
    assert needle.lower() in error["message"].lower(), error
    assert response.headers.get("X-Request-ID")


def assert_no_dependency_called(stack: FakeStack) -> None:
    assert stack.classifier_calls == 0
    assert not stack.retriever_forms
    assert not stack.generator_bodies, "nothing reaches the generator on bad input"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", REFUSED)
async def test_malformed_upload_gets_its_documented_4xx(route: str, case: Refused) -> None:
    stack = FakeStack()
    data = case.build()
    async with build_router(stack, **case.overrides) as client:
        # The declared type is a lie on purpose: the router must go by the bytes only.
        response = await client.post(
            route, files={"image": ("scan.png", data, "image/png")}, data=_form(route)
        )
    assert_envelope(response, case.status, case.code, case.needle)
    assert_no_dependency_called(stack)


# ------------------------------------------------------------------------------------------ accepted


def _generator_image(stack: FakeStack) -> Image.Image:
    """The image the generator received (a PNG data URL), decoded."""
    url = stack.generator_bodies[-1]["messages"][0]["content"][0]["image_url"]["url"]
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))
    image.load()
    return image


def _close(actual: Any, expected: Any, tolerance: int) -> bool:
    return bool(np.abs(np.asarray(actual, int) - np.asarray(expected, int)).max() <= tolerance)


def _check_16bit(image: Image.Image, warnings: list[str]) -> None:
    row = np.asarray(image.convert("L"))[2]
    assert (row.min(), row.max()) == (0, 255), "a 12-bit ramp in 16 bits is stretched, not left black"
    assert np.all(np.diff(row.astype(int)) >= 0)
    assert warnings == []


def _check_red(image: Image.Image, warnings: list[str]) -> None:
    assert _close(np.asarray(image.convert("RGB"))[4, 4], RED, 10)
    assert warnings == []


def _check_palette(image: Image.Image, warnings: list[str]) -> None:
    pixels = np.asarray(image.convert("RGB"))
    assert _close(pixels[4, 2], (0, 0, 0), 0), "transparent palette entry is composited on black"
    assert _close(pixels[4, 12], (200, 30, 30), 0)
    assert warnings == []


def _check_exif(image: Image.Image, warnings: list[str]) -> None:
    assert image.size == (20, 40), "EXIF orientation 6 turns the stored 40x20 image upright"
    pixels = np.asarray(image.convert("RGB"))
    assert _close(pixels[5, 10], RED, 40) and _close(pixels[35, 10], (0, 0, 255), 40)
    assert warnings == []


def _first_frame(expected_warning: str) -> Callable[[Image.Image, list[str]], None]:
    def check(image: Image.Image, warnings: list[str]) -> None:
        assert _close(np.asarray(image.convert("RGB"))[8, 8], RED, 8), "the first frame is used"
        assert len(warnings) == 1 and warnings[0].startswith(expected_warning), warnings
        assert "2 " in warnings[0]

    return check


def _check_dicom_frames(image: Image.Image, warnings: list[str]) -> None:
    assert image.size == (8, 8)
    assert warnings == ["multi-frame DICOM: first frame used (2 frames)"]


def _check_size(width: int, height: int) -> Callable[[Image.Image, list[str]], None]:
    def check(image: Image.Image, warnings: list[str]) -> None:
        assert image.size == (width, height)
        assert image.mode == "RGB"
        assert warnings == []

    return check


def _ramp_16bit() -> bytes:
    return make_png(array=np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (8, 1)))


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (16, 8), 0)
    image.putpalette([255, 255, 255, 200, 30, 30] + [0] * 762)
    image.paste(1, (8, 0, 16, 8))
    return pil_bytes(image, "PNG", transparency=0)


def _exif_rotated() -> bytes:
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste(Image.new("RGB", (20, 20), RED), (0, 0))  # left half red
    return make_jpeg(image=stored, exif_orientation=6)


def _dicom_two_frames() -> bytes:
    frames = np.stack([np.tile(np.arange(8, dtype=np.uint16), (8, 1)) * step for step in (1, 100)])
    return make_dicom(frames)


ACCEPTED = [
    pytest.param(_ramp_16bit, _check_16bit, id="png-16bit"),
    pytest.param(lambda: make_jpeg(mode="CMYK", colour=(0, 255, 255, 0)), _check_red, id="jpeg-cmyk"),
    pytest.param(_palette_with_transparency, _check_palette, id="png-palette-transparency"),
    pytest.param(lambda: pil_bytes(Image.new("RGB", (16, 16), RED), "GIF"), _check_red, id="gif-palette"),
    pytest.param(_exif_rotated, _check_exif, id="jpeg-exif-rotated"),
    pytest.param(lambda: make_animated("GIF"), _first_frame("animated image"), id="gif-animated"),
    pytest.param(lambda: make_animated("PNG"), _first_frame("animated image"), id="apng"),
    pytest.param(_tiff_pages, _first_frame("multi-page TIFF"), id="tiff-multi-page"),
    pytest.param(_dicom_two_frames, _check_dicom_frames, id="dicom-multi-frame"),
    pytest.param(lambda: make_dicom(preamble=False), _check_size(16, 16), id="dicom-no-preamble"),
    pytest.param(lambda: make_png((8, 8)), _check_size(8, 8), id="8x8-minimum"),
    pytest.param(lambda: make_png((16, 16), mode="RGBA", colour=(255, 0, 0, 255)), _check_red, id="png-rgba"),
    pytest.param(lambda: make_jpeg((16, 16), mode="L", colour=90), _check_size(16, 16), id="jpeg-grey"),
    pytest.param(lambda: pil_bytes(Image.new("RGB", (16, 16), RED), "WEBP"), _check_red, id="webp"),
    pytest.param(lambda: pil_bytes(Image.new("RGB", (16, 16), RED), "BMP"), _check_red, id="bmp"),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("build", "check"), ACCEPTED)
async def test_odd_but_valid_upload_is_accepted_and_normalised(
    route: str, build: Callable[[], bytes], check: Callable[[Image.Image, list[str]], None]
) -> None:
    stack = FakeStack()
    async with build_router(stack) as client:
        response = await client.post(
            route, files={"image": ("upload.bin", build(), "application/octet-stream")}, data=_form(route)
        )
    assert response.status_code == 200, response.text
    image = _generator_image(stack)
    assert image.mode == "RGB", "every dependency receives 8-bit RGB"
    check(image, response.json()["warnings"])


async def test_declared_name_and_type_are_ignored_for_a_real_image() -> None:
    """A PNG sent as ``scan.dcm`` / ``application/dicom`` is decoded as the PNG it is."""
    stack = FakeStack()
    async with build_router(stack) as client:
        response = await client.post(
            "/vqa", files={"image": ("scan.dcm", make_png((16, 16)), "application/dicom")}, data=_form("/vqa")
        )
    assert response.status_code == 200, response.text
    assert _generator_image(stack).size == (16, 16)


# ------------------------------------------------------------------------------------------ fields


@dataclass(frozen=True)
class BadForm:
    """A well-formed image with a bad field, or a broken multipart body, and the expected answer."""

    form: dict[str, str]
    needle: str
    status: int = 400
    code: str = "invalid_input"


def _f(case_id: str, form: dict[str, str], needle: str, **kw: Any):
    return pytest.param(BadForm(form, needle, **kw), id=case_id)


BAD_FIELDS_BOTH = [
    _f("domain-unknown", {"domain": "cardiology"}, "domain"),
    _f("domain-100k-chars", {"domain": "r" * 100_000}, "domain"),
    _f("retrieval-unknown", {"retrieval": "maybe"}, "retrieval"),
    _f("k-max-zero", {"k_max": "0"}, "k_max"),
    _f("k-max-40-digits", {"k_max": "9" * 40}, "k_max"),
    _f("k-max-float", {"k_max": "2.5"}, "k_max"),
    _f("gamma-negative", {"gamma": "-0.1"}, "gamma"),
    _f("gamma-nan", {"gamma": "nan"}, "gamma"),
    _f("gamma-inf", {"gamma": "inf"}, "gamma"),
    _f("temperature-nan", {"temperature": "nan"}, "temperature"),
    _f("temperature-above-2", {"temperature": "2.5"}, "temperature"),
    _f("max-tokens-over-ceiling", {"max_tokens": "99999"}, "max_tokens"),
    _f("max-tokens-text", {"max_tokens": "many"}, "max_tokens"),
    _f("field-over-1mib", {"domain": "x" * (1024 * 1024 + 10)}, "maximum size"),
    _f("over-1000-fields", {f"extra{i}": "x" for i in range(1001)}, "too many fields"),
]
BAD_FIELDS_VQA = [
    _f("question-missing", {"question": None}, "'question' is required"),  # type: ignore[dict-item]
    _f("question-blank", {"question": "   \t "}, "question"),
    _f("question-2001-chars", {"question": "q" * 2001}, "longer than 2000 characters"),
    _f("question-2-mib", {"question": "q" * (2 * 1024 * 1024)}, "maximum size"),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", BAD_FIELDS_BOTH)
async def test_bad_field_is_400_naming_the_field(route: str, case: BadForm) -> None:
    stack = FakeStack()
    form = {**_form(route), **case.form}
    async with build_router(stack) as client:
        response = await client.post(route, files={"image": ("x.png", make_png(), "image/png")}, data=form)
    assert_envelope(response, case.status, case.code, case.needle)
    assert_no_dependency_called(stack)


@pytest.mark.parametrize("case", BAD_FIELDS_VQA)
async def test_bad_question_is_400(case: BadForm) -> None:
    stack = FakeStack()
    form = {k: v for k, v in {**_form("/vqa"), **case.form}.items() if v is not None}
    async with build_router(stack) as client:
        response = await client.post("/vqa", files={"image": ("x.png", make_png(), "image/png")}, data=form)
    assert_envelope(response, case.status, case.code, case.needle)
    assert_no_dependency_called(stack)


# ------------------------------------------------------------------------------------------ multipart

BOUNDARY = "mmedrag-test-boundary"


def _multipart(parts: list[tuple[bytes, bytes]], *, close: bool = True) -> bytes:
    """A hand-written multipart body: (Content-Disposition and other headers, payload) per part."""
    body = b""
    for headers, payload in parts:
        body += b"--" + BOUNDARY.encode() + b"\r\n" + headers + b"\r\n\r\n" + payload + b"\r\n"
    return body + (b"--" + BOUNDARY.encode() + b"--\r\n" if close else b"")


def _question_part(payload: bytes) -> tuple[bytes, bytes]:
    return b'Content-Disposition: form-data; name="question"', payload


def _image_part(filename: bytes = b"x.png", payload: bytes | None = None) -> tuple[bytes, bytes]:
    headers = b'Content-Disposition: form-data; name="image"; filename="' + filename + b'"\r\n'
    return headers + b"Content-Type: image/png", make_png() if payload is None else payload


MULTIPART_CT = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def _raw(content: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return {"content": content, "headers": MULTIPART_CT if headers is None else headers}


BROKEN_BODIES = [
    pytest.param(
        lambda: _raw(_multipart([_question_part(QUESTION.encode())])),
        "'image' is required",
        id="multipart-without-file",
    ),
    pytest.param(
        lambda: {"files": {"scan": ("x.png", make_png(), "image/png")}, "data": {"question": QUESTION}},
        "'image' is required",
        id="file-under-another-name",
    ),
    pytest.param(
        lambda: {"data": {"image": "iVBORw0KGgo=", "question": QUESTION}, "files": {"x": ("x", b"1")}},
        "image",
        id="image-as-text-field",
    ),
    pytest.param(
        lambda: {"data": {"image": "iVBORw0KGgo=", "question": QUESTION}},
        "image",
        id="urlencoded-form",
    ),
    pytest.param(lambda: {"json": {"image": "x", "question": QUESTION}}, "image", id="json-body"),
    pytest.param(lambda: {"content": b""}, "'image' is required", id="empty-body"),
    pytest.param(
        lambda: _raw(
            _multipart([_question_part(b"q?"), _image_part()]), {"content-type": "multipart/form-data"}
        ),
        "boundary",
        id="multipart-without-boundary",
    ),
    pytest.param(
        lambda: _raw(_multipart([(b"Content-Disposition: form-data", b"x"), _image_part()])),
        '"name" must be provided',
        id="part-without-name",
    ),
    pytest.param(
        lambda: _raw(_multipart([_question_part(b"q?"), _image_part()], close=False)[:-200]),
        "image",
        id="body-cut-short",
    ),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("request_kwargs", "needle"), BROKEN_BODIES)
async def test_broken_request_body_is_400(
    route: str, request_kwargs: Callable[[], dict[str, Any]], needle: str
):
    stack = FakeStack()
    async with build_router(stack) as client:
        response = await client.post(route, **request_kwargs())
    assert_envelope(response, 400, "invalid_input", needle)
    assert_no_dependency_called(stack)


# ------------------------------------------------------------------------------------------ text encoding


async def test_non_utf8_question_is_refused_not_garbled() -> None:
    """Question bytes that are not UTF-8 are a 400 naming the encoding, never silently re-decoded.

    Starlette's form parser falls back to Latin-1 for a part that is not valid in the declared charset
    (UTF-8 by default), so without a check the model would get mojibake (``"... ÿþÃ(?"``) and answer it.
    """
    stack = FakeStack()
    body = _multipart([_question_part(b"Is there an effusion \xff\xfe\xc3(?"), _image_part()])
    async with build_router(stack) as client:
        response = await client.post("/vqa", **_raw(body))
    assert_envelope(response, 400, "invalid_input", "UTF-8")
    assert_no_dependency_called(stack)


async def test_utf8_question_reaches_the_model_unchanged() -> None:
    """The control for the test above: real UTF-8 (accents, CJK, emoji) passes through byte-exact."""
    stack = FakeStack()
    question = "Y a-t-il un épanchement pleural ? 胸水はありますか 🫁"
    body = _multipart([_question_part(question.encode()), _image_part()])
    async with build_router(stack) as client:
        response = await client.post("/vqa", **_raw(body))
    assert response.status_code == 200, response.text
    assert question in stack.generator_bodies[0]["messages"][0]["content"][1]["text"]


async def test_non_utf8_file_name_does_not_matter() -> None:
    """The upload's file name is never used, so bytes that are not UTF-8 in it are harmless."""
    stack = FakeStack()
    body = _multipart([_question_part(QUESTION.encode()), _image_part(filename=b"\xe9\xff\xfe.png")])
    async with build_router(stack) as client:
        response = await client.post("/vqa", **_raw(body))
    assert response.status_code == 200, response.text
