"""Image ingestion: what every service accepts, what it refuses and with which error.

Files are built on the fly by the builders in this folder's conftest.py.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image, features
from pydicom.pixels import get_decoder
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

from services.common.errors import (
    InvalidInput,
    PayloadTooLarge,
    ServiceError,
    UnprocessableImage,
    UnsupportedMediaType,
)
from services.common.images import (
    DecodedImage,
    ImageLimits,
    decode_data_url,
    decode_image,
    encode_png,
    sniff_format,
    to_data_url,
)

RED = (200, 30, 30)


def pixels(decoded: DecodedImage) -> np.ndarray:
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (decoded.width, decoded.height)
    return np.asarray(decoded.image).astype(int)


def assert_colour(actual, expected, tolerance: int = 0) -> None:
    assert np.abs(np.asarray(actual, dtype=int) - np.asarray(expected, dtype=int)).max() <= tolerance, actual


# ------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize(
    ("pil_format", "expected", "tolerance"),
    [
        ("PNG", "png", 0),
        ("JPEG", "jpeg", 8),
        ("GIF", "gif", 0),
        ("WEBP", "webp", 8),
        ("BMP", "bmp", 0),
        ("TIFF", "tiff", 0),
    ],
)
def test_common_formats_decode_to_rgb(pil_bytes, pil_format, expected, tolerance):
    data = pil_bytes(Image.new("RGB", (32, 24), RED), pil_format)
    assert sniff_format(data) == expected

    decoded = decode_image(data)

    assert (decoded.format, decoded.width, decoded.height) == (expected, 32, 24)
    assert decoded.warnings == ()
    assert_colour(pixels(decoded)[12, 16], RED, tolerance)


def test_sniff_uses_magic_bytes_only(make_dicom):
    assert sniff_format(make_dicom()) == "dicom"
    assert sniff_format(make_dicom(preamble=False)) == "dicom"
    for junk in (
        b"%PDF-1.7\n",
        b"hello world, not an image",
        b"RIFF\x00\x00\x00\x00WAVEfmt ",
        b"BM" + bytes(30),
    ):
        assert sniff_format(junk) is None


# ------------------------------------------------------------------------------------------ refusals


def test_empty_file_is_invalid_input():
    with pytest.raises(InvalidInput, match="empty file"):
        decode_image(b"")


def test_too_many_bytes_names_the_limit(make_noise_image):
    data = make_noise_image()
    with pytest.raises(PayloadTooLarge, match="limit is 100 bytes") as info:
        decode_image(data, ImageLimits(max_bytes=100))
    assert str(len(data)) in info.value.message


@pytest.mark.parametrize("data", [b"%PDF-1.7\n%...", b"GIF90a" + bytes(40), bytes(300), b"\x00"])
def test_unknown_magic_lists_accepted_formats(data):
    with pytest.raises(UnsupportedMediaType, match="unrecognised image format") as info:
        decode_image(data)
    for name in ("PNG", "JPEG", "DICOM"):
        assert name in info.value.message


@pytest.mark.parametrize("pil_format", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file_is_unprocessable(make_noise_image, truncate, pil_format, keep):
    data = truncate(make_noise_image(fmt=pil_format), keep)
    with pytest.raises(UnprocessableImage, match=f"{pil_format} image is truncated or corrupt"):
        decode_image(data)


def test_png_magic_followed_by_garbage_is_unprocessable():
    with pytest.raises(UnprocessableImage, match="starts like a PNG image but its header is corrupt"):
        decode_image(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))


def test_png_with_corrupt_pixel_data_is_unprocessable(make_noise_image):
    data = bytearray(make_noise_image())
    data[len(data) // 2] ^= 0xFF  # inside IDAT: CRC or zlib stream now wrong
    with pytest.raises(UnprocessableImage, match="PNG image is truncated or corrupt"):
        decode_image(bytes(data))


@pytest.mark.parametrize("size", [(1, 1), (7, 100), (100, 4)])
def test_tiny_sides_are_refused(make_png, size):
    with pytest.raises(InvalidInput, match="at least 8 pixels"):
        decode_image(make_png(size))


def test_overlong_side_is_refused(make_png):
    with pytest.raises(InvalidInput, match="no side may exceed 16384 pixels"):
        decode_image(make_png((20000, 8), mode="L", colour=0))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [(20000, 20000), (10000, 10000), (7000, 6000)])
def test_decompression_bomb_header_is_refused_before_decoding(make_png_declaring, side):
    # The pixel data does not match the header: reaching the decoder would give 422, not 413.
    with pytest.raises(PayloadTooLarge, match="pixel"):
        decode_image(make_png_declaring(*side))


def test_pixel_limit_is_configurable(make_png):
    with pytest.raises(PayloadTooLarge, match=r"32x24 = 768 pixels; the limit is 500 pixels"):
        decode_image(make_png((32, 24)), ImageLimits(max_pixels=500))
    assert decode_image(make_png((32, 24)), ImageLimits(max_pixels=768)).width == 32


def test_inconsistent_limits_are_a_programming_error():
    with pytest.raises(ValueError, match="min_side"):
        ImageLimits(min_side=100, max_side=10)


# ------------------------------------------------------------------------------------------ pixel modes


def test_16bit_png_is_stretched_not_black(make_png):
    # A 12-bit radiograph in a 16-bit PNG: naive conversion would leave it nearly black.
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (16, 1))
    decoded = decode_image(make_png(array=ramp))

    assert decoded.source_mode.startswith("I")
    row = pixels(decoded)[5, :, 0]
    assert row.min() == 0 and row.max() == 255
    assert np.all(np.diff(row) >= 0) and np.count_nonzero(np.diff(row)) > 50  # order kept, detail kept


def test_16bit_narrow_range_uses_actual_min_max(make_png):
    ramp = np.tile(np.arange(1000, 1064, dtype=np.uint16), (8, 1))
    row = pixels(decode_image(make_png(array=ramp)))[0, :, 0]
    assert (row[0], row[-1]) == (0, 255)


def test_float_tiff_is_stretched(pil_bytes):
    values = np.tile(np.linspace(-1.0, 1.0, 16, dtype=np.float32), (8, 1))
    decoded = decode_image(pil_bytes(Image.fromarray(values, mode="F"), "TIFF"))
    assert decoded.source_mode == "F"
    row = pixels(decoded)[0, :, 0]
    assert (row[0], row[-1]) == (0, 255) and np.all(np.diff(row) > 0)


def test_cmyk_jpeg_becomes_rgb(make_jpeg):
    decoded = decode_image(make_jpeg(mode="CMYK", colour=(0, 255, 255, 0)))
    assert decoded.source_mode == "CMYK"
    assert_colour(pixels(decoded)[10, 10], (255, 0, 0), 8)


def test_palette_transparency_is_composited_on_black(pil_bytes):
    image = Image.new("P", (16, 8), 0)
    image.putpalette([255, 255, 255, 200, 30, 30] + [0] * 762)
    image.paste(1, (8, 0, 16, 8))
    decoded = decode_image(pil_bytes(image, "PNG", transparency=0))

    assert decoded.source_mode == "P"
    out = pixels(decoded)
    assert_colour(out[4, 2], (0, 0, 0))  # transparent white -> black, not white
    assert_colour(out[4, 12], RED)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_black(make_png, mode):
    colour = (250, 250, 250, 0) if mode == "RGBA" else (250, 0)
    array = np.array(Image.new(mode, (12, 8), colour))
    array[:, 4:8, -1] = 255
    array[:, 8:, -1] = 128
    decoded = decode_image(make_png(array=array))

    assert decoded.source_mode == mode
    out = pixels(decoded)
    assert_colour(out[0, 0], (0, 0, 0))
    assert_colour(out[0, 5], (250, 250, 250))
    assert_colour(out[0, 10], (125, 125, 125), 2)


def test_exif_orientation_is_applied(make_jpeg):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste(Image.new("RGB", (20, 20), (255, 0, 0)), (0, 0))  # left half red
    decoded = decode_image(make_jpeg(image=stored, exif_orientation=6))

    # Orientation 6: rotate 90° clockwise to display -> the stored left half ends up on top.
    assert (decoded.width, decoded.height) == (20, 40)
    out = pixels(decoded)
    assert_colour(out[5, 10], (255, 0, 0), 40)
    assert_colour(out[35, 10], (0, 0, 255), 40)


@pytest.mark.parametrize(
    ("pil_format", "expected_warning"),
    [
        ("GIF", "animated image"),
        ("PNG", "animated image"),
        ("WEBP", "animated image"),
        ("TIFF", "multi-page TIFF"),
    ],
)
def test_multi_frame_images_keep_first_frame_and_warn(make_animated, pil_format, expected_warning):
    decoded = decode_image(make_animated(pil_format, colours=((255, 0, 0), (0, 0, 255))))
    assert len(decoded.warnings) == 1
    assert decoded.warnings[0].startswith(expected_warning) and "2" in decoded.warnings[0]
    assert_colour(pixels(decoded)[8, 8], (255, 0, 0), 8)


# ------------------------------------------------------------------------------------------ DICOM

# Raw values, stored with slope 1 / intercept -1024 -> HU -1024, -160, 0, 40, 240, 3071, ...
CT_RAW = np.tile(np.array([0, 864, 1024, 1064, 1264, 4095, 4095, 4095], dtype=np.uint16), (8, 1))
# Window 40/400 (DICOM linear): <= -160 -> 0, 0 -> 102, 40 -> 128, > 239 -> 255.
CT_WINDOWED = [0, 0, 102, 128, 255, 255, 255, 255]


def test_dicom_applies_rescale_then_window(make_dicom):
    data = make_dicom(CT_RAW, bits_stored=12, rescale=(1, -1024), window=(40, 400))
    decoded = decode_image(data)

    assert (decoded.format, decoded.source_mode, decoded.width, decoded.height) == (
        "dicom",
        "MONOCHROME2",
        8,
        8,
    )
    out = pixels(decoded)
    assert out[3, :, 0].tolist() == CT_WINDOWED
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])


def test_dicom_multi_valued_window_uses_first(make_dicom):
    data = make_dicom(CT_RAW, rescale=(1, -1024), window=([40, 500], [400, 2000]))
    assert pixels(decode_image(data))[0, :, 0].tolist() == CT_WINDOWED


def test_dicom_without_window_uses_min_max(make_dicom):
    ramp = np.tile(np.linspace(0, 4095, 16).astype(np.uint16), (8, 1))
    row = pixels(decode_image(make_dicom(ramp, bits_stored=12)))[0, :, 0]
    assert (row[0], row[-1]) == (0, 255) and np.all(np.diff(row) > 0)


def test_dicom_signed_pixels(make_dicom):
    ramp = np.tile(np.arange(-2000, 2000, 250, dtype=np.int16), (8, 1))
    row = pixels(decode_image(make_dicom(ramp)))[0, :, 0]
    assert (row[0], row[-1]) == (0, 255) and np.all(np.diff(row) > 0)


def test_dicom_monochrome1_is_inverted(make_dicom):
    values = np.zeros((8, 8), dtype=np.uint16)
    values[:, 4:] = 4000  # high value: dark in MONOCHROME1
    out = pixels(decode_image(make_dicom(values, photometric="MONOCHROME1")))
    assert out[0, 6, 0] == 0 and out[0, 1, 0] == 255

    windowed = pixels(
        decode_image(make_dicom(CT_RAW, photometric="MONOCHROME1", rescale=(1, -1024), window=(40, 400)))
    )
    assert windowed[0, :, 0].tolist() == [255 - v for v in CT_WINDOWED]


def test_dicom_rgb(make_dicom):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:, :4] = (10, 200, 30)
    rgb[:, 4:] = (250, 5, 100)
    decoded = decode_image(make_dicom(rgb, photometric="RGB"))
    assert decoded.source_mode == "RGB"
    assert np.array_equal(pixels(decoded), rgb)


def test_dicom_multi_frame_keeps_first_frame(make_dicom):
    frames = np.stack([np.tile(np.arange(8, dtype=np.uint16), (8, 1)) * step for step in (1, 100)])
    frames[1] = frames[1][:, ::-1]  # second frame runs the other way
    decoded = decode_image(make_dicom(frames))
    assert decoded.warnings == ("multi-frame DICOM: first frame used (2 frames)",)
    row = pixels(decoded)[0, :, 0]
    assert row[0] == 0 and row[-1] == 255


def test_dicom_without_preamble(make_dicom):
    decoded = decode_image(make_dicom(CT_RAW, rescale=(1, -1024), window=(40, 400), preamble=False))
    assert decoded.format == "dicom"
    assert pixels(decoded)[0, :, 0].tolist() == CT_WINDOWED


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_dicom_bare_dataset_without_file_meta(make_dicom, implicit_vr):
    data = make_dicom(CT_RAW, rescale=(1, -1024), window=(40, 400), file_meta=False, implicit_vr=implicit_vr)
    assert sniff_format(data) == "dicom"
    assert pixels(decode_image(data))[0, :, 0].tolist() == CT_WINDOWED


def test_dicom_without_pixel_data_is_invalid(make_dicom):
    with pytest.raises(InvalidInput, match="DICOM file has no pixel data"):
        decode_image(make_dicom(pixel_data=False))


@pytest.mark.skipif(get_decoder(JPEGLSLossless).is_available, reason="a JPEG-LS decoder is installed")
def test_dicom_compressed_without_decoder_is_unsupported(make_dicom):
    data = make_dicom(
        np.zeros((8, 8), np.uint16),
        transfer_syntax=JPEGLSLossless,
        encapsulated_frames=[b"\xff\xd8" + bytes(30)],
    )
    with pytest.raises(UnsupportedMediaType, match="no decoder") as info:
        decode_image(data)
    assert "JPEG-LS Lossless" in info.value.message and JPEGLSLossless in info.value.message


def test_dicom_jpeg2000_with_garbage_codestream(make_dicom):
    data = make_dicom(
        np.zeros((8, 8), np.uint16), transfer_syntax=JPEG2000Lossless, encapsulated_frames=[b"\x00junk" * 8]
    )
    if get_decoder(JPEG2000Lossless).is_available:  # Pillow's openjpeg decodes J2K: the data is bad
        with pytest.raises(UnprocessableImage, match="DICOM pixel data could not be decoded"):
            decode_image(data)
    else:
        with pytest.raises(UnsupportedMediaType, match=f"JPEG 2000.*{JPEG2000Lossless}"):
            decode_image(data)


@pytest.mark.skipif(
    not (features.check("jpg_2000") and get_decoder(JPEG2000Lossless).is_available), reason="no J2K codec"
)
def test_dicom_jpeg2000_decodes_when_a_decoder_is_installed(make_dicom, pil_bytes):
    values = np.tile(np.arange(0, 4000, 250, dtype=np.uint16), (8, 1))
    codestream = pil_bytes(Image.fromarray(values), "JPEG2000", no_jp2=True, irreversible=False)
    decoded = decode_image(
        make_dicom(values, transfer_syntax=JPEG2000Lossless, encapsulated_frames=[codestream])
    )
    row = pixels(decoded)[0, :, 0]
    assert (row[0], row[-1]) == (0, 255) and np.all(np.diff(row) > 0)


def test_dicom_deflated_is_refused(make_dicom):
    with pytest.raises(UnsupportedMediaType, match="Deflated"):
        decode_image(make_dicom(transfer_syntax=DeflatedExplicitVRLittleEndian))


def test_dicom_truncated_pixel_data_is_unprocessable(make_dicom, truncate):
    data = truncate(make_dicom(np.zeros((64, 64), np.uint16)), 0.7)
    with pytest.raises(
        UnprocessableImage, match=r"DICOM pixel data could not be decoded.*less than expected"
    ):
        decode_image(data)


def test_dicom_header_bomb_is_refused_before_decoding(make_dicom):
    data = make_dicom(np.zeros((8, 8), np.uint16), rows_columns=(20000, 20000))
    with pytest.raises(PayloadTooLarge, match="20000x20000"):
        decode_image(data)


def test_dicom_tiny_image_is_refused(make_dicom):
    with pytest.raises(InvalidInput, match="at least 8 pixels"):
        decode_image(make_dicom(np.zeros((4, 4), np.uint16)))


# ------------------------------------------------------------------------------------------ data URLs


def test_data_url_round_trip():
    original = Image.fromarray(np.random.default_rng(1).integers(0, 256, (12, 20, 3), dtype=np.uint8))
    png = encode_png(original)
    assert encode_png(original) == png  # deterministic
    url = to_data_url(png)
    assert url.startswith("data:image/png;base64,")

    decoded = decode_data_url(url)
    assert decoded.format == "png"
    assert np.array_equal(np.asarray(decoded.image), np.asarray(original))


def test_data_url_declared_type_is_not_trusted(make_png):
    payload = base64.b64encode(make_png()).decode()
    wrapped = "\n".join(payload[i : i + 60] for i in range(0, len(payload), 60))  # MIME line wrapping
    assert decode_data_url(f"data:image/jpeg;base64,{wrapped}").format == "png"
    with pytest.raises(UnsupportedMediaType):
        decode_data_url("data:image/png;base64," + base64.b64encode(b"%PDF-1.7 not an image").decode())


def test_encode_png_converts_modes_png_cannot_hold():
    assert encode_png(Image.new("CMYK", (8, 8))).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="PNG"):
        to_data_url(b"\xff\xd8\xff not png")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://example.com/x.png", "http URLs are not fetched"),
        ("HTTPS://example.com/x.png", "https URLs are not fetched"),
        ("file:///etc/passwd", "file URLs are not fetched"),
        ("/etc/passwd", "must be a data URL"),
        ("C:\\images\\x.png", "must be a data URL"),
        ("data:image/png,%89PNG%0D%0A", "must be base64-encoded"),
        ("data:image/png;base64", "no ','"),
        ("data:text/plain;base64,aGVsbG8=", "media type must be image/"),
        ("data:image/png;base64,@@@not base64@@@", "not valid base64"),
    ],
)
def test_data_url_refusals_name_the_problem(url, problem):
    with pytest.raises(InvalidInput, match=problem) as info:
        decode_data_url(url)
    assert info.value.param == "image_url"


def test_data_url_size_is_checked_before_decoding():
    url = "data:image/png;base64," + "A" * 1000
    with pytest.raises(PayloadTooLarge, match="100 bytes"):
        decode_data_url(url, ImageLimits(max_bytes=100))


# ------------------------------------------------------------------------------------------ robustness


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL and pydicom warn about the damage they meet
def test_mangled_uploads_only_raise_service_errors(make_noise_image, make_animated, make_dicom, make_jpeg):
    """Random damage to valid files must end in a 4xx ServiceError (or a decode), never a 500."""
    seeds = [
        make_noise_image((16, 16)),
        make_noise_image((16, 16), fmt="JPEG"),
        make_jpeg(exif_orientation=6),
        make_animated("GIF"),
        make_animated("PNG"),
        make_animated("WEBP"),
        make_animated("TIFF"),
        make_dicom(CT_RAW, rescale=(1, -1024), window=(40, 400)),
        make_dicom(CT_RAW, file_meta=False, implicit_vr=True),
    ]
    rng = np.random.default_rng(1234)
    for seed in seeds:
        for _ in range(60):
            data = bytearray(seed)
            position = int(rng.integers(len(data)))
            if rng.integers(2):
                data[position : position + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
            else:
                del data[position:]
            try:
                decoded = decode_image(bytes(data))
            except ServiceError as exc:
                assert 400 <= exc.status_code < 500 and exc.message
            else:
                assert decoded.image.mode == "RGB"
