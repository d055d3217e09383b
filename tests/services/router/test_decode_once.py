"""Decode once: the router validates an upload once and sends every dependency the same compact PNG."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from image_factories import make_dicom, make_noise_image
from PIL import Image
from router_fakes import FakeStack, build_router

import services.router.service as router_service
from services.common.images import NORMALISED_MAX_SIDE, decode_image, normalise


class RecordingStack(FakeStack):
    """The fakes, also keeping the image bytes the classifier and the retriever received."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, list[bytes]] = {"classifier": [], "retriever": []}

    def classifier(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/classify":
            self.images["classifier"].append(_file_part(request))
        return super().classifier(request)

    def retriever(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/retrieve":
            self.images["retriever"].append(_file_part(request))
        return super().retriever(request)

    def generator_image(self) -> bytes:
        url = self.generator_bodies[-1]["messages"][0]["content"][0]["image_url"]["url"]
        prefix = "data:image/png;base64,"
        assert url.startswith(prefix)
        return base64.b64decode(url[len(prefix) :])


def _file_part(request: httpx.Request) -> bytes:
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    for part in request.content.split(b"--" + boundary):
        if b"filename=" in part:
            return part.partition(b"\r\n\r\n")[2][: -len(b"\r\n")]
    raise AssertionError("no file part in the request")


async def ask(stack: FakeStack, upload: bytes) -> httpx.Response:
    async with build_router(stack) as client:
        response = await client.post(
            "/vqa", files={"image": ("upload", upload, "application/octet-stream")}, data={"question": "Q?"}
        )
    assert response.status_code == 200, response.text
    return response


async def test_a_large_upload_is_decoded_once_and_sent_downstream_small(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decodes: list[int] = []

    def counting_decode(data: bytes, limits=None):
        decodes.append(len(data))
        return decode_image(data, limits)

    monkeypatch.setattr(router_service, "decode_image", counting_decode)
    upload = make_noise_image((1200, 900), seed=3)  # noise does not compress: a few MB of PNG
    stack = RecordingStack()
    await ask(stack, upload)

    assert decodes == [len(upload)]
    sent = stack.images["classifier"][0]
    assert stack.images["retriever"] == [sent]
    assert stack.generator_image() == sent  # one normalised PNG for all three
    image = Image.open(io.BytesIO(sent))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (NORMALISED_MAX_SIDE, 384))
    assert len(sent) * 4 < len(upload)


async def test_a_small_upload_keeps_its_pixels_and_dicom_arrives_as_png() -> None:
    upload = make_noise_image((64, 48), seed=1)
    stack = RecordingStack()
    await ask(stack, upload)
    sent = Image.open(io.BytesIO(stack.images["classifier"][0]))
    assert sent.size == (64, 48)
    assert np.array_equal(np.asarray(sent), np.asarray(Image.open(io.BytesIO(upload)).convert("RGB")))

    dicom = make_dicom()
    stack = RecordingStack()
    await ask(stack, dicom)
    received = Image.open(io.BytesIO(stack.images["retriever"][0]))
    assert received.format == "PNG" and received.mode == "RGB"
    assert np.array_equal(np.asarray(received), np.asarray(decode_image(dicom).image))


@pytest.mark.parametrize(
    ("mode", "size", "max_side", "expected"),
    [
        ("RGB", (2000, 1000), 512, (512, 256)),
        ("L", (300, 900), 512, (171, 512)),  # portrait, grey in: RGB out
        ("RGBA", (512, 512), 512, (512, 512)),  # at the cap: kept
        ("RGB", (4000, 20), 512, (512, 8)),  # the short side stays acceptable (>= the decoder's minimum)
        ("RGB", (100, 60), 32, (32, 19)),
    ],
)
def test_normalise_caps_the_longest_side_and_keeps_the_aspect_ratio(
    mode: str, size: tuple[int, int], max_side: int, expected: tuple[int, int]
) -> None:
    png = normalise(Image.new(mode, size, 128), max_side=max_side)
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", expected)
    assert decode_image(png).image.size == expected  # what the services receive, they accept


def test_normalise_is_stable_on_its_own_output() -> None:
    once = normalise(decode_image(make_noise_image((700, 300), seed=2)).image)
    assert normalise(decode_image(once).image) == once
    with pytest.raises(ValueError, match="max_side"):
        normalise(Image.new("RGB", (8, 8)), max_side=0)
