"""What a stranger's bytes may ask of Pillow: the one decode policy of files, uploads, the batch job, Ray Data and the
runtime (runtime/imageio.py decodes through it; docs/serving.md, "Threat model").

Two rules, both applied before a single pixel is decoded:

- **Formats**: only the decoders of the formats this tool documents (``ALLOWED_FORMATS``) ever see the data. Pillow
  otherwise tries every plugin it has: an EPS or PS upload would run Ghostscript where it is installed, and PSD, ICO,
  PCX, FITS, … would reach decoders no user of this project needs.
- **Pixels**: ``Image.open`` is lazy — it reads the header, which states the size (and a TIFF's tile size, which the
  decoder allocates whole). Both pixel counts are checked there against ``max_pixels``, so a 48 KB PNG whose header
  says 20000 × 20000 costs a header read, not 1.2 GB. Pillow's own
  decompression-bomb limit (a warning above ``Image.MAX_IMAGE_PIXELS``, an error above twice that) stays in force
  behind ours, and its error is reported as ours: ``max_pixels`` may not exceed Pillow's warning limit, so an image
  that Pillow warns of is always over ours too.

Everything Pillow raises while it opens or decodes hostile data (an OSError for a truncated file, a SyntaxError or
struct.error from a plugin that misparses, …) is this file's fault, not the caller's: it becomes ``UnreadableImage``.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

from PIL import Image

# Pillow's format names, in the order Pillow tries them; GIF and the multi-page formats give their first frame
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "TIFF", "GIF")
FORMAT_NAMES = "PNG, JPEG, BMP, WebP, TIFF or GIF"
# 50 MP: a 48 MP phone photo (8064 × 6048) and the full-size JPEGs of most cameras (45 MP) pass; what costs more to
# decode than any photo a 32 or 64 px model could use is refused. Memory per decode: docs/serving.md.
MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """This file cannot be used as an input; the message says why."""


class UnreadableImage(ImageError):
    """The data is not an image in an allowed format, or cannot be decoded (a service answers 415)."""


class TooManyPixels(ImageError):
    """The image's header asks for more pixels than the limit (a service answers 413)."""


def pillow_limit() -> int | None:
    """Pixels above which Pillow warns of a decompression bomb (None where a program switched its check off)."""
    return Image.MAX_IMAGE_PIXELS


def check_max_pixels(max_pixels: int) -> int:
    """``max_pixels``, or ValueError where it is not a limit this policy can keep."""
    ceiling = pillow_limit()
    if max_pixels < 1 or (ceiling is not None and max_pixels > ceiling):
        raise ValueError(f"--max-pixels {max_pixels}: choose 1 to {ceiling:,} (Pillow's decompression-bomb limit, "
                         "above which it warns)")
    return max_pixels


def open_image(source: Path | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """``source`` (a file, or the bytes of an upload) opened in an allowed format with its header read and its
    pixel count checked; nothing decoded yet. The caller closes it. UnreadableImage or TooManyPixels."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise TooManyPixels(f"image is {bomb_pixels(e)} pixels, over the limit of {max_pixels:,} (--max-pixels; "
                            "Pillow refused it as a decompression bomb)") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage(f"cannot read image: not a {FORMAT_NAMES} file") from None
    except Exception as e:  # noqa: BLE001  (any plugin's failure on hostile data: this file cannot be read)
        raise UnreadableImage(f"cannot read image: {short(e)}") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise TooManyPixels(f"image is {w}×{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                            "(--max-pixels)")
    tile = tiff_tile(img)
    if tile[0] * tile[1] > max_pixels:
        img.close()          # the decoder allocates a whole tile: a 161-byte 32×32 TIFF of 45984² tiles took 2 GB
        raise TooManyPixels(f"TIFF of {w}×{h} in tiles of {tile[0]}×{tile[1]} = {tile[0] * tile[1]:,} pixels, over "
                            f"the limit of {max_pixels:,} (--max-pixels)")
    return img


def decode_pixels(img: Image.Image) -> int:
    """The pixels a decoder allocates for ``img``: its own, or a TIFF tile's where that is larger."""
    tile = tiff_tile(img)
    return max(img.size[0] * img.size[1], tile[0] * tile[1])


def tiff_tile(img: Image.Image) -> tuple[int, int]:
    """A tiled TIFF's tile size (TileWidth, TileLength) from its header; (0, 0) for any other image."""
    tags = getattr(img, "tag_v2", None) if img.format == "TIFF" else None
    return (int(tags[322]), int(tags[323])) if tags is not None and 322 in tags and 323 in tags else (0, 0)


def decoded(img: Image.Image) -> Image.Image:
    """``img`` with its pixels decoded (its first frame), or UnreadableImage / TooManyPixels."""
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise TooManyPixels(f"image is too large to decode ({e})") from None
    except Exception as e:  # noqa: BLE001  (truncated data, strips past the end, a plugin's misparse, …)
        raise UnreadableImage(f"cannot read image: {img.format} data cannot be decoded ({short(e)})") from None
    return img


def first_frame_note(img: Image.Image) -> list[str]:
    """A note where ``img`` has more frames than the one read (an animated GIF, PNG or WebP; a multi-page TIFF).
    Asked before decoding: Pillow finds out by seeking, which would drop pixels already decoded."""
    try:
        animated = bool(getattr(img, "is_animated", False))
    except Exception:  # noqa: BLE001  (a broken second frame does not spoil the first)
        animated = False
    return [f"the first frame of a multi-frame {img.format} (the others are ignored)"] if animated else []


def bomb_pixels(error: Exception) -> str:
    """The pixel count in Pillow's decompression-bomb message ("Image size (N pixels) exceeds …"), or "too many"."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(found.group(1)):,}" if found else "too many"


def short(error: Exception, limit: int = 200) -> str:
    """An exception as one short line for a report or an answer."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"
