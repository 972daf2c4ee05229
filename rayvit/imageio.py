"""Safe decoding of untrusted image bytes into the uint8 arrays the model takes.

The server, training and offline tools decode a file the same way: ``Image.open``
on the bytes (only the formats listed in ``FORMATS``), a pixel-count check on
the header *before* any pixel is decoded (decompression bombs never allocate),
a scan-count check on JPEGs (scan bombs never start), a full ``load``
(truncated data is an error, not grey pixels), then
``rayvit.preprocess.to_uint8_array`` for every mode, EXIF rotation, 16-bit,
alpha and animation. What comes out goes to ``preprocess_arrays``.

With ``target_size`` (the model's input side) a large image is reduced while
it is decoded: JPEGs through libjpeg's DCT scaling (``draft``), other formats
by an integer box ``reduce`` right after decoding, before any mode conversion.
Reduction only ever shrinks to a size of at least ``target_size`` on both
sides, so the model still resizes from more pixels than it needs; images up to
twice ``target_size`` on their short side are decoded exactly as without it.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from rayvit.preprocess import resize_uint8, to_uint8_array

#: Container formats accepted from clients (PIL format names).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

#: MIME types of those formats (lower case), as clients send them.
MIME_TYPES = frozenset(
    {
        "image/png",
        "image/apng",
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/webp",
        "image/gif",
        "image/bmp",
        "image/x-bmp",
        "image/x-ms-bmp",
        "image/tiff",
        "image/tiff-fx",
    }
)

#: Default pixel budget of one image (width x height): 5000 x 5000.
DEFAULT_MAX_PIXELS = 25_000_000

#: Most scans a JPEG may have. Baseline JPEGs have 1, progressive ones about 10
#: (up to ~20 from tuned encoders); each scan is a pass over the whole image, so
#: a small file made of thousands of scans costs seconds of CPU ("scan bomb").
DEFAULT_MAX_JPEG_SCANS = 64

_SOS = b"\xff\xda"  # start of scan; inside entropy-coded data 0xFF is always stuffed (FF 00)
#: Modes ``Image.reduce`` cannot handle, and the mode each is reduced in instead.
_REDUCE_AS = {"1": "L", "P": "RGBA", "I;16": "I", "I;16L": "I", "I;16B": "I", "I;16N": "I"}


class ImageError(ValueError):
    """An image that cannot be used; ``str(exc)`` is a reason fit for a client."""


class UndecodableImageError(ImageError):
    """Empty, truncated, corrupt or not an image of an accepted format."""


class ImageTooLargeError(ImageError):
    """More pixels than allowed (checked on the header, before decoding)."""


class ImageTooCostlyError(ImageError):
    """Small, valid data whose decoding costs out of proportion to its size (e.g. a JPEG scan bomb)."""


def limit_pil_pixels(max_pixels: int) -> None:
    """Set PIL's own bomb guard to ``max_pixels`` (it errors above twice that).

    ``decode_image`` checks the size itself before decoding; this makes every
    other ``Image.open`` in the process refuse absurd sizes too.
    """
    Image.MAX_IMAGE_PIXELS = max(int(max_pixels), 1)


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    target_size: int | None = None,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
) -> np.ndarray:
    """Bytes of one image file -> ``(H, W, 3)`` uint8, or ``ImageError``.

    ``target_size``: the side the model needs; larger images come out reduced
    (never below ``target_size`` on either side), which bounds the memory and
    time of every mode conversion.
    """
    with _open(data, max_pixels, target_size, max_jpeg_scans) as image:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image.load()
                return to_uint8_array(_reduce(image, target_size))
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"image is too large ({exc})") from None
        except MemoryError:
            raise ImageTooLargeError("image is too large to decode") from None
        except Exception as exc:
            # PIL raises many types for corrupt data (OSError, ValueError,
            # SyntaxError, struct.error, IndexError, ...): all mean "bad image".
            raise UndecodableImageError(f"image data is truncated or corrupt ({_reason(exc)})") from None


def decode_to_side(
    data: bytes,
    side: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
) -> np.ndarray:
    """Bytes of one image file -> ``(side, side, 3)`` uint8: the one way a file becomes pixels.

    The server (for each upload) and the data pipeline's decode tasks (for each training,
    validation and test image) both call it, so a training image and the same file uploaded
    give the same pixels: decoded by ``decode_image`` (reduced while decoding, never below
    ``side``), then brought to ``side`` by the ``Preprocessor``'s own antialiased resize.
    """
    image = decode_image(data, max_pixels, target_size=side, max_jpeg_scans=max_jpeg_scans)
    return resize_uint8(image, side)


def decoded_size(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    target_size: int | None = None,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
) -> tuple[int, int]:
    """``(width, height)`` that ``decode_image`` will decode, read from the header only.

    With the same checks as ``decode_image``, so a caller can budget a batch of
    files before decoding any of them.
    """
    with _open(data, max_pixels, target_size, max_jpeg_scans) as image:
        width, height = image.size
        return width, height


def _open(data: bytes, max_pixels: int, target_size: int | None, max_jpeg_scans: int) -> Image.Image:
    if not data:
        raise UndecodableImageError("empty image")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.init()  # register every plugin, so ``formats`` names are all known
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image is too large ({exc})") from None
    except UnidentifiedImageError:
        raise UndecodableImageError("not a decodable image (PNG, JPEG, WebP, GIF, BMP or TIFF)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise UndecodableImageError(f"not a decodable image ({_reason(exc)})") from None
    try:
        width, height = image.size
        if width < 1 or height < 1:
            raise UndecodableImageError(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} pixels, over the limit of {max_pixels} pixels"
            )
        if image.format == "JPEG":
            scans = data.count(_SOS)
            if scans > max_jpeg_scans:
                raise ImageTooCostlyError(
                    f"JPEG has {scans} scans, over the limit of {max_jpeg_scans} "
                    "(each scan is a pass over the whole image)"
                )
            if target_size:
                image.draft(None, (target_size, target_size))  # DCT scaling: 1/2, 1/4 or 1/8
    except BaseException:
        image.close()
        raise
    return image


def _reduce(image: Image.Image, target_size: int | None) -> Image.Image:
    """Integer box reduction of a loaded image to at least ``target_size`` a side."""
    if not target_size:
        return image
    factor = min(image.size) // target_size
    if factor < 2:
        return image
    if getattr(image, "is_animated", False):
        image.seek(0)
    exif = image.getexif()
    if image.mode in _REDUCE_AS:
        mode = _REDUCE_AS[image.mode]
        if image.mode == "P" and "transparency" not in image.info:
            mode = "RGB"
        image = image.convert(mode)
    small = image.reduce(factor)
    small.info["exif"] = exif.tobytes()  # EXIF orientation still applies to the reduced image
    return small


def read_image_file(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, target_size: int | None = None
) -> np.ndarray:
    """An image file on disk, decoded exactly as the server decodes an upload."""
    return decode_image(Path(path).read_bytes(), max_pixels, target_size=target_size)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    reason = text[0] if text else type(exc).__name__
    return reason[:200]
