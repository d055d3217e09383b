"""Builders of image files, good and malformed, written on the fly (no binary fixtures in the repo).

Each builder is a plain function returning ``bytes``. ``tests/`` is on ``sys.path`` (pytest
``pythonpath``), so any test imports them: ``from image_factories import make_png``; the conftest of
``tests/services/common`` also exposes them as fixtures of the same names.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

Colour = tuple[int, ...] | int


def pil_bytes(image: Image.Image, fmt: str, **save_kwargs) -> bytes:
    """Any PIL image saved in a format PIL writes ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def make_png(
    size: tuple[int, int] = (32, 24),
    *,
    mode: str = "RGB",
    colour: Colour = (200, 30, 30),
    array: np.ndarray | None = None,
    **save_kwargs,
) -> bytes:
    """A PNG filled with one colour, or holding ``array`` (uint16 2-D -> 16-bit greyscale PNG)."""
    image = Image.fromarray(array) if array is not None else Image.new(mode, size, colour)
    return pil_bytes(image, "PNG", **save_kwargs)


def make_jpeg(
    size: tuple[int, int] = (32, 24),
    *,
    mode: str = "RGB",
    colour: Colour = (200, 30, 30),
    image: Image.Image | None = None,
    exif_orientation: int | None = None,
    quality: int = 95,
) -> bytes:
    """A JPEG of one colour (or of ``image``), optionally tagged with an EXIF orientation."""
    image = image if image is not None else Image.new(mode, size, colour)
    kwargs: dict = {"quality": quality}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    return pil_bytes(image, "JPEG", **kwargs)


def make_noise_image(size: tuple[int, int] = (64, 64), *, fmt: str = "PNG", seed: int = 0) -> bytes:
    """Random RGB pixels: incompressible, so cutting the file in half really cuts pixel data."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return pil_bytes(Image.fromarray(array, mode="RGB"), fmt)


def make_animated(
    fmt: str = "GIF", colours: Sequence[tuple[int, int, int]] = ((255, 0, 0), (0, 0, 255)), size=(16, 16)
) -> bytes:
    """An animated GIF/PNG (APNG)/WebP, or a multi-page TIFF: one frame per colour."""
    frames = [Image.new("RGB", size, colour) for colour in colours]
    return pil_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def truncate(data: bytes, keep: float = 0.5) -> bytes:
    """The first ``keep`` fraction of a file, as an interrupted upload leaves it."""
    return data[: int(len(data) * keep)]


def make_png_declaring(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR claims ``width`` x ``height`` (CRC fixed): a bomb header."""
    data = bytearray(make_png((8, 8), mode="L", colour=0))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def make_dicom(
    pixels: np.ndarray | None = None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[object, object] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    encapsulated_frames: Sequence[bytes] | None = None,
    rows_columns: tuple[int, int] | None = None,
    pixel_data: bool = True,
    preamble: bool = True,
    file_meta: bool = True,
    implicit_vr: bool = False,
) -> bytes:
    """A DICOM Part 10 file written by pydicom.

    ``pixels``: (rows, cols) or (frames, rows, cols) grey, or (rows, cols, 3) / (frames, rows, cols, 3)
    when ``photometric`` is "RGB"; uint8/uint16/int16 (int16 sets PixelRepresentation 1).
    ``rescale`` = (slope, intercept); ``window`` = (center, width), each a number or a list (multi-valued).
    ``encapsulated_frames`` stores those bytes as compressed pixel data (use with a compressed
    ``transfer_syntax``). ``preamble=False`` drops the 128-byte preamble and "DICM"; ``file_meta=False``
    writes a bare little-endian dataset (no preamble, no group 0002), implicit VR if ``implicit_vr``.
    """
    if pixels is None:
        pixels = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)
    colour = photometric in ("RGB", "YBR_FULL")
    samples = 3 if colour else 1
    frame_ndim = 3 if colour else 2
    frames = pixels.shape[0] if pixels.ndim > frame_ndim else 1
    rows, columns = rows_columns or (pixels.shape[-3:-1] if colour else pixels.shape[-2:])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.PatientID = "TEST"
    ds.Rows, ds.Columns = int(rows), int(columns)
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    bits_allocated = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if colour:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_data:
        if encapsulated_frames is not None:
            ds.PixelData = encapsulate(list(encapsulated_frames))
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PixelData = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
            ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
    buffer = io.BytesIO()
    if not file_meta:
        del ds.file_meta
        ds.save_as(buffer, implicit_vr=implicit_vr, little_endian=True)
        return buffer.getvalue()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    return data if preamble else data[132:]
