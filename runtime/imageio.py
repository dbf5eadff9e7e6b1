"""Image-folder IO with validation: every file under a folder is an input; each one is read into a 3×S×S float32
array in [0, 1] (S: the model set's working size) or gets a reason why not. Inputs are never modified; PNGs are
written atomically. What may be decoded at all (formats, pixels) is runtime/decode_policy.py's."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .decode_policy import (MAX_PIXELS, ImageError, TooManyPixels, UnreadableImage, decoded,  # noqa: F401
                            first_frame_note, open_image, short)
from .files import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Files this tool writes beside images (cli.py attack, cli.py repair): listed as skipped, not as bad inputs.
METADATA_FILES = ("labels.csv", "attack.json", "report.json", "report.csv", "report.jsonl")
SIZE = 32                                     # the shipped CIFAR-10 set's side; a model set's manifest gives its own


# Smaller images are refused rather than scaled up more than this: a 4×4 thumbnail blown up to 32×32 (or 16×16 to
# 64×64) is a few blurred blocks, nothing a classifier or the repair's tasks can read.
MAX_UPSCALE = 4


@dataclass
class ImageRecord:
    rel: str                                  # path relative to the input folder, with '/'
    image: np.ndarray | None = None           # 3×S×S float32 in [0, 1]
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    skipped: bool = False                     # a metadata file of this tool, not an input


def list_files(root: Path) -> list[Path]:
    """Every regular file under ``root``, recursively, sorted; hidden files and folders (".name") are skipped."""
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def to_rgb8(img: Image.Image, notes: list[str]) -> Image.Image:
    """8-bit RGB, with a note for each conversion made."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        scale = 257.0 if mode.startswith("I;16") or values.max() > 255 else 1.0
        notes.append(f"{'16-bit' if scale > 1 else mode} greyscale converted to 8-bit RGB")
        # in place: one float64 copy of the image at a time (8 bytes a pixel), whatever its size
        np.clip(np.round(np.divide(values, scale, out=values), out=values), 0, 255, out=values)
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        notes.append(f"{mode} converted to RGB (alpha channel dropped)")
    elif mode == "P":
        notes.append("palette image converted to RGB")
    elif mode in ("L", "1"):
        notes.append("greyscale converted to RGB")
    else:
        notes.append(f"{mode} converted to RGB")
    return img.convert("RGB")


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def centre_square(img: Image.Image) -> Image.Image:
    """The largest centred square of ``img`` (so that scaling keeps the aspect ratio)."""
    w, h = img.size
    if w == h:
        return img                                      # no copy of a square image
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def upright(img: Image.Image, notes: list[str]) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (a phone photo taken sideways), with a note if it was."""
    orientation = img.getexif().get(0x0112, 1)          # 0x0112: EXIF Orientation; 1 is upright
    if orientation in (1, None):
        return img
    notes.append(f"turned upright by its EXIF orientation ({orientation})")
    return ImageOps.exif_transpose(img)


def read_image(path: Path, resize: bool = False, size: int = SIZE, *,
               max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """(3×size×size float32 in [0, 1], notes) or ImageError. ``resize``: another size is centre-cropped to a square
    and scaled (bicubic) to size×size."""
    if not is_image_name(path):
        raise ImageError(f"not an image file ({path.suffix or 'no extension'}); "
                         f"readable types: {', '.join(IMAGE_EXTENSIONS)}")
    return decode_image(path, resize, size, max_pixels=max_pixels)


def decode_image(source: Path | bytes, resize: bool = False, size: int = SIZE, *,
                 max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """``read_image`` of a file, or of its bytes (an upload to the service): the one decoding every engine and entry
    point shares, so that the same image gives the same pixels wherever it comes in. UnreadableImage where the data
    is not an image in an allowed format, TooManyPixels where its header asks for more than ``max_pixels``, ImageError
    where it is one the models cannot take."""
    return model_input(open_image(source, max_pixels), resize, size)


def model_input(img: Image.Image, resize: bool = False, size: int = SIZE) -> tuple[np.ndarray, list[str]]:
    """An image opened by ``open_image`` (and closed here), decoded, turned upright, made 8-bit RGB and brought to
    size×size: (3×size×size float32 in [0, 1], notes). A size the models cannot take is refused from the header,
    before decoding. The service runs ``open_image`` and this apart, to decode a large image in a lane of its own."""
    with img:
        notes = first_frame_note(img)
        try:
            check_fits(*upright_size(img), resize, size)
            rgb = to_rgb8(upright(decoded(img), notes), notes)
        except ImageError:
            raise
        except Exception as e:  # noqa: BLE001  (its EXIF or its mode, parsed from the file, is Pillow's to refuse)
            raise UnreadableImage(f"cannot read image: {short(e)}") from None
    if rgb.size != (size, size):
        w, h = rgb.size
        check_fits(w, h, resize, size)              # a PNG turned by EXIF found after its pixels
        square = centre_square(rgb)
        cropped = f"centre-cropped to {square.size[0]}×{square.size[1]} and " if square.size != rgb.size else ""
        notes.append(f"{cropped}resized from {w}×{h} to {size}×{size}")
        rgb = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / 255, notes


def upright_size(img: Image.Image) -> tuple[int, int]:
    """The size ``img`` will have once turned upright (EXIF orientations 5-8 swap its sides), from its header. A PNG
    may keep its EXIF after its pixels, where Pillow finds it only by decoding them: there the header's size is
    taken (the sides of an image refused for its size may then be named in the other order)."""
    w, h = img.size
    if img.format == "PNG" and "exif" not in img.info:
        return w, h
    return (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def check_fits(w: int, h: int, resize: bool, size: int) -> None:
    """ImageError where a w×h image cannot become a size×size model input (another size without ``resize``, or one
    that would be scaled up more than MAX_UPSCALE×)."""
    if (w, h) == (size, size):
        return
    if not resize:
        raise ImageError(f"image is {w}×{h}, the models take {size}×{size} (pass --resize to scale it)")
    if min(w, h) < size / MAX_UPSCALE:
        raise ImageError(f"image is {w}×{h}: too small for {size}×{size} models (they take images with a short "
                         f"side of at least {math.ceil(size / MAX_UPSCALE)} pixels, scaled up at most "
                         f"{MAX_UPSCALE}×)")


def input_root(path: Path) -> Path:
    """The folder that input paths are relative to: ``path`` itself, or the folder of a single image file."""
    return path if path.is_dir() else path.parent


def read_folder(root: Path, *, resize: bool = False, keep_images: bool = True, size: int = SIZE,
                max_pixels: int = MAX_PIXELS) -> list[ImageRecord]:
    """A record per file under ``root`` (or for ``root`` itself where it is a file): its image (dropped again with
    ``keep_images=False``, where only its readability matters), or why it is not an input. Files that are not
    images by their extension (notes, metadata) are skipped, not errors; a file named as an image that cannot be
    read, or whose header asks for more than ``max_pixels``, is an error."""
    records = []
    one_file, base = root.is_file(), input_root(root)
    for path in [root] if one_file else list_files(root):
        record = ImageRecord(path.relative_to(base).as_posix())
        if path.name in METADATA_FILES:
            record.skipped, record.notes = True, ["metadata file of mssl-repair, not an image"]
            records.append(record)
            continue
        if not is_image_name(path) and not one_file:   # a file named on its own is read, or refused, as an image
            record.skipped = True
            record.notes = [f"not an image by its extension ({path.suffix or 'none'}); "
                            f"read as images: {', '.join(IMAGE_EXTENSIONS)}"]
            records.append(record)
            continue
        try:
            image, record.notes = read_image(path, resize, size, max_pixels=max_pixels)
            record.image = image if keep_images else None
        except ImageError as e:
            record.error = str(e)
        records.append(record)
    return records


def quantize(x: np.ndarray) -> np.ndarray:
    """What an 8-bit PNG holds: x rounded to the nearest k/255 (float32)."""
    return (np.round(np.clip(x, 0, 1) * 255) / 255).astype(np.float32)


def encode_png(image: np.ndarray) -> bytes:
    """Lossless 8-bit PNG of a 3×H×W image in [0, 1]."""
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def write_png(path: Path, image: np.ndarray | bytes) -> None:
    """``image`` (3×H×W in [0, 1], or its ``encode_png`` bytes) as a PNG file, written atomically."""
    data = image if isinstance(image, bytes) else encode_png(image)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
