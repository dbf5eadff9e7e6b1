"""Hostile image files, made on the spot (nothing of an attacker's is committed): what the decode policy
(runtime/decode_policy.py) and the service's upload bounds (runtime/uploads.py) are tested and measured against.

Each maker returns the file's bytes; ``HOSTILE`` names them with the answer a service owes them (the folder reader
gives each an error row).
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_zeros(width: int, height: int, rows: int | None = None) -> bytes:
    """An 8-bit RGB PNG whose header says ``width`` × ``height``, with ``rows`` rows of zero pixels in its data (all
    of them by default: a real image of that size that compresses to ~1/1000)."""
    compressor, row = zlib.compressobj(9), b"\0" * (1 + 3 * width)       # filter byte 0, then the pixels
    idat = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def header_bomb(side: int = 20000) -> bytes:
    """A PNG of a few hundred bytes whose header says side × side (20000²: 1.2 GB of pixels once decoded)."""
    return png_of_zeros(side, side, rows=4)


def small_file_big_png(side: int = 9000) -> bytes:
    """A real side × side PNG of zeros: ~240 KB on the wire, 243 MB of pixels decoded at 9000²."""
    return png_of_zeros(side, side)


def eps() -> bytes:
    """An Encapsulated PostScript file: Pillow would hand it to Ghostscript where Ghostscript is installed."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n%%EndComments\n"
            b"newpath 0 0 moveto 32 32 lineto stroke\nshowpage\n%%EOF\n")


def psd(side: int = 32) -> bytes:
    """A minimal Photoshop file (RGB, 8-bit, raw): a format Pillow reads and this tool does not take."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, side, side, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + bytes(3 * side * side)


def ico(side: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 30)).save(buffer, "ICO", sizes=[(side, side)])
    return buffer.getvalue()


def two_frame_gif(side: int = 32) -> bytes:
    """An animated GIF: a red frame, then a blue one (the tool reads the first)."""
    buffer = io.BytesIO()
    red, blue = Image.new("RGB", (side, side), (255, 0, 0)), Image.new("RGB", (side, side), (0, 0, 255))
    red.save(buffer, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    return buffer.getvalue()


def noise(side: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def truncated_jpeg(side: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(side)).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    return data[:len(data) // 2]


def lying_tiff(side: int = 32) -> bytes:
    """An uncompressed TIFF whose StripOffsets point 10 MB past its end."""
    buffer = io.BytesIO()
    Image.fromarray(noise(side)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * i
        tag, kind, count, _ = struct.unpack_from("<HHII", data, at)
        if tag == 273:                                   # StripOffsets
            struct.pack_into("<HHII", data, at, tag, kind, count, 10_000_000)
    return bytes(data)


def tiled_tiff(tile: int = 45984) -> bytes:
    """A 32×32 greyscale TIFF of a few hundred bytes whose one deflated tile is declared tile × tile: Pillow's decoder
    allocates the whole tile (45984²: 2 GB) before it finds the data short."""
    data = zlib.compress(b"\x07" * 64 * 64)
    entries = [(256, 3, 32), (257, 3, 32), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1), (322, 4, tile),
               (323, 4, tile), (324, 4, None), (325, 4, len(data))]
    start = 8 + 2 + 12 * len(entries) + 4                        # the tile's data right after the one IFD
    ifd = b"".join(struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else
                   struct.pack("<I", start if value is None else value)) for tag, kind, value in entries)
    return b"II*\x00" + struct.pack("<IH", 8, len(entries)) + ifd + b"\0" * 4 + data


# name -> (maker, file name in a folder, the service's status, what the folder's error row says)
HOSTILE = {
    "header_bomb": (header_bomb, "bomb.png", 413, "400,000,000 pixels, over the limit"),
    "small_file_big_png": (small_file_big_png, "big9000.png", 413, "9000×9000"),
    "eps": (eps, "eps.png", 415, "not a PNG, JPEG"),
    "psd": (psd, "photoshop.png", 415, "not a PNG, JPEG"),
    "ico": (ico, "icon.png", 415, "not a PNG, JPEG"),
    "truncated_jpeg": (truncated_jpeg, "cut.jpg", 415, "cannot be decoded"),
    "lying_tiff": (lying_tiff, "strips.tif", 415, "cannot be decoded"),
    "tiled_tiff": (tiled_tiff, "tiles.tif", 413, "in tiles of 45984×45984"),
}
