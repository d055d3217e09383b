"""Image ingestion shared by every service: untrusted bytes in, one 8-bit RGB ``PIL.Image`` out.

Every upload passes the same gate, in this order, so a hostile file costs as little as possible:

1. size of the bytes (``PayloadTooLarge``), emptiness (``InvalidInput``);
2. the format, from magic bytes only, never from a file name or a declared content type
   (``UnsupportedMediaType`` lists what is accepted);
3. the dimensions, read from the header before any pixel is decoded: too many pixels is a
   decompression bomb (``PayloadTooLarge``), a side outside ``[min_side, max_side]`` is ``InvalidInput``;
4. the pixels, fully loaded so a truncated or corrupt file fails here (``UnprocessableImage``) and not
   later inside a model. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never enabled;
5. normalisation to RGB: EXIF orientation applied; alpha composited onto black (radiographs and fundus
   photographs have black surroundings, so transparent borders look like the rest of the background);
   16-bit and float grey levels stretched from their actual min..max to 0..255 (a 12-bit radiograph
   stored in a 16-bit PNG would otherwise be almost black); DICOM goes through its modality LUT
   (rescale slope/intercept), then its first VOI window (or min..max) and MONOCHROME1 inversion.

Animated GIF/APNG/WebP, multi-page TIFF and multi-frame DICOM keep their first frame and say so in
``DecodedImage.warnings``.

The functions are synchronous and pure: no global state is changed. PIL's process-wide
``MAX_IMAGE_PIXELS`` is left alone; when its guard fires inside ``Image.open`` (more than ~179M pixels) the
``DecompressionBombError`` becomes ``PayloadTooLarge`` too, and its ``DecompressionBombWarning`` (above ~89M
pixels) may be logged just before our own, lower limit refuses the image. Decoding is CPU work: async
routes call ``decode_image`` through ``anyio.to_thread.run_sync``.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from services.common.errors import (
    InvalidInput,
    PayloadTooLarge,
    ServiceError,
    UnprocessableImage,
    UnsupportedMediaType,
)

__all__ = [
    "ACCEPTED_FORMATS",
    "NORMALISED_MAX_SIDE",
    "DecodedImage",
    "ImageLimits",
    "decode_data_url",
    "decode_image",
    "encode_png",
    "normalise",
    "sniff_format",
    "to_data_url",
]

ACCEPTED_FORMATS = ("png", "jpeg", "gif", "webp", "bmp", "tiff", "dicom")
_ACCEPTED_TEXT = "PNG, JPEG, GIF, WebP, BMP, TIFF and DICOM"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}
# Our format name -> the one PIL plugin allowed to open it (no guessing across plugins).
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF"}
# Value representations that may follow a little-endian tag in an explicit-VR DICOM stream.
_DICOM_VRS = frozenset(
    re.findall(
        rb"[A-Z]{2}",
        b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT"
        b" UV",
    )
)
_DEFLATED_TS = b"1.2.840.10008.1.2.1.99"
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
# Errors PIL raises on a bad header or bad pixel data (truncation shows up as OSError).
_PIL_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    struct.error,
    zlib.error,
)


@dataclass(frozen=True)
class ImageLimits:
    """What an upload may be; services expose these through their settings."""

    max_bytes: int = 20 * 1024 * 1024
    # width*height read from the header, checked before decoding (decompression-bomb guard)
    max_pixels: int = 40_000_000
    # refuse 1x1 pixels, tracking pixels and other images no model can read
    min_side: int = 8
    max_side: int = 16384

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels, self.min_side, self.max_side) < 1:
            raise ValueError("image limits must be positive")
        if self.min_side > self.max_side:
            raise ValueError("min_side must not exceed max_side")


@dataclass(frozen=True)
class DecodedImage:
    """A decoded upload, ready for a model."""

    image: Image.Image  # mode RGB, EXIF orientation applied
    format: str  # one of ACCEPTED_FORMATS
    width: int  # after orientation
    height: int
    source_mode: str  # PIL mode before conversion ("I;16", "CMYK", "P") or DICOM photometric interpretation
    warnings: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- sniffing


def _looks_like_bare_dicom(data: bytes) -> bool:
    """A DICOM stream without the 128-byte preamble: it starts with a group 0002 or 0008 element."""
    if len(data) < 12 or data[0:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    if int.from_bytes(data[2:4], "little") >= 0x1000:  # first elements of those groups are low
        return False
    if data[4:6] in _DICOM_VRS:  # explicit VR little endian
        return True
    length = int.from_bytes(data[4:8], "little")  # implicit VR: a plausible 4-byte length
    return 0 < length < min(len(data), 1024)


def sniff_format(data: bytes) -> str | None:
    """The image format from the magic bytes (one of ``ACCEPTED_FORMATS``), or None."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if len(data) >= 12 and data[0:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(_TIFF_MAGICS):
        return "tiff"
    if data[128:132] == b"DICM":
        return "dicom"
    if (
        len(data) >= 18
        and data.startswith(b"BM")
        and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES
    ):
        return "bmp"
    if _looks_like_bare_dicom(data):
        return "dicom"
    return None


# ---------------------------------------------------------------------------------------------- checks


def _reason(exc: BaseException) -> str:
    """A library's error text fit for a client: first line, no object addresses, bounded length."""
    text = str(exc).strip() or type(exc).__name__
    text = _OBJECT_REPR.sub("the data", " ".join(text.split()))
    return text if len(text) <= 300 else text[:297] + "..."


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _check_dimensions(width: int, height: int, limits: ImageLimits) -> None:
    """Refuse on header dimensions alone, before a single pixel is decoded."""
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels} pixels",
            code="too_many_pixels",
        )
    if min(width, height) < limits.min_side:
        raise InvalidInput(
            f"image is {width}x{height} pixels; each side must be at least {limits.min_side} pixels",
            code="image_too_small",
        )
    if max(width, height) > limits.max_side:
        raise InvalidInput(
            f"image is {width}x{height} pixels; no side may exceed {limits.max_side} pixels",
            code="image_side_too_large",
        )


# ---------------------------------------------------------------------------------------------- pixels


def _stretch(values: np.ndarray) -> np.ndarray:
    """Map the actual min..max of the finite values to 0..255 (a constant image becomes black)."""
    values = values.astype(np.float64, copy=False)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    lo = float(values[finite].min())
    hi = float(values[finite].max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = np.where(finite, (values - lo) * (255.0 / (hi - lo)), 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _on_black(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, (0, 0, 0))
    background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return background


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; see the module docstring for the choices."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("1", "L"):
        return img.convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_stretch(np.asarray(img)), mode="L").convert("RGB")
    if mode == "P":
        if "transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA"):
            return _on_black(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        return _on_black(img.convert("RGBA"))
    try:  # CMYK, YCbCr, LAB, HSV, RGBX
        return img.convert("RGB")
    except ValueError as exc:
        raise UnprocessableImage(f"pixel mode {mode} cannot be converted to RGB") from exc


def _frame_warning(fmt: str, frames: int) -> str:
    if fmt == "tiff":
        return f"multi-page TIFF: first page used ({frames} pages)"
    if fmt == "jpeg":
        return f"multi-picture JPEG: first picture used ({frames} pictures)"
    return f"animated image: first frame used ({frames} frames)"


def _decode_with_pil(data: bytes, fmt: str, limits: ImageLimits) -> DecodedImage:
    name = _PIL_FORMATS[fmt]
    try:
        img = Image.open(io.BytesIO(data), formats=[name])
    except Image.DecompressionBombError as exc:  # PIL's own guard fired before ours could
        raise PayloadTooLarge(
            f"image dimensions exceed the pixel limit ({_reason(exc)})", code="too_many_pixels"
        ) from exc
    except (Image.UnidentifiedImageError, *_PIL_DECODE_ERRORS) as exc:
        raise UnprocessableImage(f"the file starts like a {name} image but its header is corrupt") from exc

    warnings: list[str] = []
    with img:
        width, height = img.size
        _check_dimensions(width, height, limits)
        source_mode = img.mode
        try:
            frames = getattr(img, "n_frames", 1)  # walks the frame headers; damaged ones fail here
            if frames > 1:
                warnings.append(_frame_warning(fmt, frames))
            img.load()
        except Image.DecompressionBombError as exc:
            raise PayloadTooLarge(
                f"image exceeds the pixel limit ({_reason(exc)})", code="too_many_pixels"
            ) from exc
        except _PIL_DECODE_ERRORS as exc:
            raise UnprocessableImage(f"{name} image is truncated or corrupt: {_reason(exc)}") from exc
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception:  # a broken EXIF block must not cost the user the image
            oriented = img.copy()
            warnings.append("EXIF orientation could not be read; image used as stored")
        try:
            rgb = _pil_to_rgb(oriented)
        except _PIL_DECODE_ERRORS as exc:
            raise UnprocessableImage(f"{name} image could not be converted to RGB: {_reason(exc)}") from exc
    return DecodedImage(
        image=rgb,
        format=fmt,
        width=rgb.width,
        height=rgb.height,
        source_mode=source_mode,
        warnings=tuple(warnings),
    )


# ---------------------------------------------------------------------------------------------- DICOM


def _first_number(value: object) -> float | None:
    """First value of a possibly multi-valued DS element, or None when absent or not a finite number."""
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI windowing to 0..255 (DICOM PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT, SIGMOID)."""
    if function == "LINEAR_EXACT":
        unit = (values - (center - width / 2)) / width
    elif function == "SIGMOID":
        unit = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -500, 500)))
    else:
        unit = (values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5
    return np.clip(np.rint(np.clip(unit, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


def _dicom_grey(arr: np.ndarray, ds: Dataset, photometric: str, warnings: list[str]) -> np.ndarray:
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    center = _first_number(getattr(ds, "WindowCenter", None))
    width = _first_number(getattr(ds, "WindowWidth", None))
    if center is not None and width is not None and width > 0:
        function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
        out = _window(values, center, width, function)
    else:
        if center is not None or width is not None:
            warnings.append("DICOM window is incomplete or invalid; min..max used instead")
        out = _stretch(values)
    if photometric == "MONOCHROME1":  # low values are white in MONOCHROME1
        out = 255 - out
    return out


def _dicom_colour(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    bits = int(getattr(ds, "BitsStored", 0) or 0) or arr.dtype.itemsize * 8
    scaled = arr.astype(np.float64) * (255.0 / (2**bits - 1))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _transfer_syntax(ds: Dataset) -> UID | None:
    """The file's transfer syntax; for a bare dataset without file meta, the encoding it was read with."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if "TransferSyntaxUID" not in meta:
        implicit, little = getattr(ds, "original_encoding", (None, None))
        if implicit is None or little is None:
            return None
        if implicit:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    return meta.TransferSyntaxUID


def _dicom_geometry(ds: Dataset) -> tuple[int, int, int, int, str]:
    """Rows, columns, samples per pixel, frames and photometric interpretation, from the header only."""
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InvalidInput("DICOM file has no pixel data", code="dicom_no_pixel_data")
    if "Rows" not in ds or "Columns" not in ds:
        raise UnprocessableImage("DICOM file has pixel data but no Rows/Columns")
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel") or 1)
    frames = int(ds.get("NumberOfFrames") or 1)
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    return rows, columns, samples, frames, photometric


def _check_transfer_syntax(ds: Dataset) -> None:
    """Refuse compressed pixel data we have no decoder for (415), before trying to decode it."""
    transfer_syntax = _transfer_syntax(ds)
    if transfer_syntax is None:
        return
    if not transfer_syntax.is_transfer_syntax:
        raise UnsupportedMediaType(
            f"DICOM transfer syntax {transfer_syntax} is not a known transfer syntax",
            code="unsupported_transfer_syntax",
        )
    if not transfer_syntax.is_compressed:
        return
    label = f"{transfer_syntax.name} ({transfer_syntax})"
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as exc:
        raise UnsupportedMediaType(
            f"DICOM transfer syntax {label} is not supported; send the file uncompressed "
            "(Explicit VR Little Endian)",
            code="unsupported_transfer_syntax",
        ) from exc
    if not decoder.is_available:
        raise UnsupportedMediaType(
            f"DICOM transfer syntax {label} is compressed and no decoder for it is installed; send "
            "the file uncompressed (Explicit VR Little Endian)",
            code="unsupported_transfer_syntax",
        )


def _decode_dicom(data: bytes, limits: ImageLimits) -> DecodedImage:
    if _DEFLATED_TS in data[:4096]:
        raise UnsupportedMediaType(
            "DICOM transfer syntax Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99) is not "
            "accepted (it can inflate without bound); send the file uncompressed",
            code="unsupported_transfer_syntax",
        )
    has_preamble = data[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except Exception as exc:  # pydicom raises many types on malformed input
        raise UnprocessableImage(f"DICOM file could not be parsed: {_reason(exc)}") from exc

    try:
        rows, columns, samples, frames, photometric = _dicom_geometry(ds)
        _check_dimensions(columns, rows, limits)
        _check_transfer_syntax(ds)
    except ServiceError:
        raise
    except Exception as exc:  # a force-read or damaged header fails on first access to an element
        raise UnprocessableImage(f"DICOM header is malformed: {_reason(exc)}") from exc

    warnings: list[str] = []
    if frames > 1:
        warnings.append(f"multi-frame DICOM: first frame used ({frames} frames)")
    try:
        arr = pixel_array(ds, index=0 if frames > 1 else None)
        if samples == 1 and photometric == "PALETTE COLOR":
            rgb = _dicom_colour(np.asarray(apply_color_lut(arr, ds)), ds)
        elif samples == 1:
            rgb = np.repeat(_dicom_grey(arr, ds, photometric, warnings)[..., None], 3, axis=2)
        elif samples == 3:
            rgb = _dicom_colour(arr, ds)
        else:
            raise UnsupportedMediaType(
                f"DICOM with {samples} samples per pixel ({photometric}) is not supported",
                code="unsupported_photometric_interpretation",
            )
    except ServiceError:
        raise
    except Exception as exc:
        raise UnprocessableImage(f"DICOM pixel data could not be decoded: {_reason(exc)}") from exc
    if rgb.shape != (rows, columns, 3):
        raise UnprocessableImage(f"DICOM pixel data has shape {rgb.shape}, expected {rows}x{columns}")
    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB")
    return DecodedImage(
        image=image,
        format="dicom",
        width=image.width,
        height=image.height,
        source_mode=photometric,
        warnings=tuple(warnings),
    )


# ---------------------------------------------------------------------------------------------- public


def decode_image(data: bytes, limits: ImageLimits | None = None) -> DecodedImage:
    """Validate and decode an uploaded image into 8-bit RGB, or raise the matching ServiceError."""
    limits = limits or ImageLimits()
    if not data:
        raise InvalidInput("empty file: no image bytes were received", code="empty_file")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(
            f"image is {len(data)} bytes ({_mib(len(data))}); the limit is {limits.max_bytes} bytes "
            f"({_mib(limits.max_bytes)})",
            code="file_too_large",
        )
    fmt = sniff_format(bytes(data[:256]))
    if fmt is None:
        raise UnsupportedMediaType(f"unrecognised image format; accepted formats are {_ACCEPTED_TEXT}")
    data = bytes(data)
    if fmt == "dicom":
        return _decode_dicom(data, limits)
    return _decode_with_pil(data, fmt, limits)


_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes of an image (modes PNG cannot hold are converted to RGB); deterministic."""
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# Longest side of the image the router sends downstream: above every model's input size (CLIP 224,
# LLaVA-Med 336), far below a 10 MB upload's.
NORMALISED_MAX_SIDE = 512


def normalise(image: Image.Image, *, max_side: int = NORMALISED_MAX_SIDE) -> bytes:
    """The compact form of a decoded image that services pass on: 8-bit RGB PNG, longest side at most
    ``max_side``.

    Decode once at the edge, then send this (tens to hundreds of KB) instead of the original upload (up
    to tens of MB) to each downstream service. The aspect ratio is kept (the short side never drops
    below the decoder's minimum side, so the result is always accepted again); smaller images are not
    enlarged, only re-encoded.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    longest = max(rgb.size)
    if longest > max_side:
        floor = ImageLimits().min_side
        width, height = (
            max(min(side, floor), round(side * max_side / longest)) if side != longest else max_side
            for side in rgb.size
        )
        # reducing_gap: a cheap integer reduction first, then the filter; much faster on huge images
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return encode_png(rgb)


def to_data_url(png_bytes: bytes) -> str:
    """``data:image/png;base64,...``: how images travel to the generator (never as fetchable URLs)."""
    if not png_bytes.startswith(_PNG_MAGIC):
        raise ValueError("to_data_url expects PNG bytes; encode the image with encode_png first")
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")


def _describe(url: str) -> str:
    return repr(url[:40] + ("..." if len(url) > 40 else ""))


def decode_data_url(url: str, limits: ImageLimits | None = None) -> DecodedImage:
    """Decode a ``data:image/<type>;base64,<data>`` URL (an OpenAI ``image_url`` part).

    Nothing is ever fetched: http(s) URLs, file paths and other schemes are refused with InvalidInput.
    The declared media type must be ``image/*`` but the format is still taken from the magic bytes.
    """
    limits = limits or ImageLimits()
    if not isinstance(url, str):
        raise InvalidInput("image_url must be a string data URL", param="image_url")
    url = url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https", "ftp", "file"):
        raise InvalidInput(
            f"{scheme} URLs are not fetched; send the image inline as a data URL (data:image/png;base64,...)",
            param="image_url",
            code="image_url_not_data_url",
        )
    if scheme != "data":
        raise InvalidInput(
            f"image_url must be a data URL (data:image/png;base64,...); got {_describe(url)} "
            "(remote URLs and file paths are not accepted)",
            param="image_url",
            code="image_url_not_data_url",
        )
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise InvalidInput("malformed data URL: no ',' before the data", param="image_url")
    parts = [part.strip().lower() for part in header.split(";")]
    media_type = parts[0]
    if not media_type.startswith("image/"):
        raise InvalidInput(
            f"data URL media type must be image/*, got {media_type or 'none'!r}", param="image_url"
        )
    if parts[-1] != "base64":
        raise InvalidInput("data URL must be base64-encoded (';base64,' before the data)", param="image_url")
    payload = "".join(payload.split())  # line-wrapped base64 is common
    max_chars = 4 * math.ceil(limits.max_bytes / 3)
    if len(payload) > max_chars:
        raise PayloadTooLarge(
            f"data URL holds more than {limits.max_bytes} bytes ({_mib(limits.max_bytes)}), the image limit",
            code="file_too_large",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(
            f"data URL payload is not valid base64 ({_reason(exc)})", param="image_url"
        ) from exc
    return decode_image(data, limits)
