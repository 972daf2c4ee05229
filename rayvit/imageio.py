"""Safe decoding of untrusted image bytes into the uint8 arrays the model takes.

The server and offline tools decode a file the same way: ``Image.open`` on the
bytes (only the formats listed in ``FORMATS``), a pixel-count check on the
header *before* any pixel is decoded (decompression bombs never allocate), a
full ``load`` (truncated data is an error, not grey pixels), then
``rayvit.preprocess.to_uint8_array`` for every mode, EXIF rotation, 16-bit,
alpha and animation. What comes out goes to ``preprocess_arrays``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from rayvit.preprocess import to_uint8_array

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


class ImageError(ValueError):
    """An image that cannot be used; ``str(exc)`` is a reason fit for a client."""


class UndecodableImageError(ImageError):
    """Empty, truncated, corrupt or not an image of an accepted format."""


class ImageTooLargeError(ImageError):
    """More pixels than allowed (checked on the header, before decoding)."""


def limit_pil_pixels(max_pixels: int) -> None:
    """Set PIL's own bomb guard to ``max_pixels`` (it errors above twice that).

    ``decode_image`` checks the size itself before decoding; this makes every
    other ``Image.open`` in the process refuse absurd sizes too.
    """
    Image.MAX_IMAGE_PIXELS = max(int(max_pixels), 1)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes of one image file -> ``(H, W, 3)`` uint8, or ``ImageError``."""
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
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise UndecodableImageError(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} pixels, over the limit of {max_pixels} pixels"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image.load()
                return to_uint8_array(image)
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"image is too large ({exc})") from None
        except MemoryError:
            raise ImageTooLargeError("image is too large to decode") from None
        except Exception as exc:
            # PIL raises many types for corrupt data (OSError, ValueError,
            # SyntaxError, struct.error, IndexError, ...): all mean "bad image".
            raise UndecodableImageError(f"image data is truncated or corrupt ({_reason(exc)})") from None


def read_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file on disk, decoded exactly as the server decodes an upload."""
    return decode_image(Path(path).read_bytes(), max_pixels)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    reason = text[0] if text else type(exc).__name__
    return reason[:200]
