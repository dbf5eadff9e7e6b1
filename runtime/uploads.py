"""An upload's way into a replica (runtime/serve.py): its body read within a byte budget and a time limit, the image
part of a multipart body found, and the image decoded off the event loop by the decode policy
(runtime/decode_policy.py) — the one place where a stranger's bytes meet a C library, so every cost is bounded:

- **Bytes**: a body over ``max_body_bytes`` is refused (413); the bodies that a replica holds, received but not yet
  decoded, over all its requests, stay under ``max_pending_bytes`` (503 beyond it), so a flood of large uploads is
  refused rather than held.
- **Time**: a body not received within ``receive_timeout_s`` (a client that declares a body and never sends it) is
  answered 408 and its bytes let go.
- **Pixels and decoders**: the header is read first (only the allowed formats' decoders ever see the data, and a
  header stating more than ``max_pixels`` is refused with 413 before any pixel is decoded); then the image decodes in
  one of two lanes, threads of their own: images up to ``LARGE_PIXELS`` in the common lane, larger ones in the large
  lane (``large_decodes`` threads, as many more waiting at most, 503 beyond), so that a flood of big uploads never
  stands in front of ordinary ones. The event loop never decodes: ``/healthz`` and small requests are answered while
  large images decode.

What one replica can hold at most for its uploads is then ``max_pending_bytes`` of bodies plus
``large_decodes`` × (the memory of a decode at ``max_pixels``: up to 822 MB measured at 50 MP) + one decode at
``LARGE_PIXELS`` (docs/serving.md).
"""
from __future__ import annotations

import asyncio
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
from starlette.requests import ClientDisconnect

from .decode_policy import MAX_PIXELS, TooManyPixels, UnreadableImage, decode_pixels, open_image
from .imageio import ImageError, model_input

# Above this many pixels an image decodes in the large lane: a 4 MP JPEG decodes in ~40 ms on one core, a 50 MP PNG
# in about a second (docs/serving.md)
LARGE_PIXELS = 4_000_000


class RequestError(Exception):
    """A request the service refuses: HTTP ``status`` and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    """What one replica spends on uploads at most (the module docstring)."""
    max_body_bytes: int = 20 * 2**20
    max_pending_bytes: int = 80 * 2**20
    receive_timeout_s: float = 30.0
    max_pixels: int = MAX_PIXELS
    large_decodes: int = 1

    def __post_init__(self) -> None:
        if self.max_pending_bytes < self.max_body_bytes:
            raise ValueError(f"the bytes held for decoding ({self.max_pending_bytes}) must be at least one body's "
                             f"limit ({self.max_body_bytes}): a body at the limit could never be taken")


# parts of a multipart body looked at for the file, at most (a form holds one file and perhaps a few fields)
MAX_PARTS = 16
BOUNDARY = re.compile(r'boundary="?([^";]{1,200})"?', re.IGNORECASE)


def image_bytes(body: bytes, content_type: str) -> bytes:
    """The image in a request body: the body itself, or the first file part of a multipart/form-data body. The parts
    are found with ``bytes.find`` on the boundary (linear in the body, in C): Python's email parser spent 25-32 s
    and 0.3-0.7 GB on a 20 MB body of newlines or of 300,000 tiny parts, holding the event loop (measured)."""
    if not content_type.lower().startswith("multipart/"):
        return body
    found = BOUNDARY.search(content_type)
    if not found:
        raise RequestError(415, "multipart body without a boundary in its Content-Type")
    delimiter = b"--" + found.group(1).encode("latin-1")
    at = body.find(delimiter)
    for _ in range(MAX_PARTS):
        if at < 0 or body[at + len(delimiter):at + len(delimiter) + 2] == b"--":     # no more parts
            break
        start = at + len(delimiter)
        end = body.find(b"\r\n" + delimiter, start)
        part = body[start:end if end >= 0 else len(body)]
        headers, separator, payload = part.partition(b"\r\n\r\n")
        head = headers.decode("latin-1").lower()
        if separator and ("filename=" in head or "content-type: image/" in head):
            return payload
        at = end + 2 if end >= 0 else -1
    raise RequestError(415, "the multipart body has no file part (among its first 16): send the image as a file "
                            "field, or as the raw body")


class Uploads:
    """A replica's uploads: ``await uploads.image(request)`` is the request's model input (3×S×S float32, notes) or a
    RequestError. ``decoding`` counts the requests past their body whose decode is not over (running or waiting),
    which the replica counts in its admission line. What a request holds (its bytes, its place in a lane) is let go
    when its decode is over, not when its client leaves: a decode already running finishes on its thread, and until
    then it counts."""

    def __init__(self, limits: UploadLimits, size: int, resize: bool) -> None:
        self.limits, self.size, self.resize = limits, size, resize
        self.common = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self.large = ThreadPoolExecutor(max_workers=limits.large_decodes, thread_name_prefix="decode-large")
        self.pending_bytes = 0               # bodies received and not yet decoded, over all requests
        self.decoding = 0
        self.large_load = 0                  # images in the large lane, decoding or waiting

    async def image(self, request, admit: Callable[[], None] = lambda: None) -> tuple[np.ndarray, list[str]]:
        """The request's model input; ``admit()`` is called once its body is in, before its decode counts (the
        replica's line check: others may have come in while this body was read)."""
        loop = asyncio.get_running_loop()
        ticket = Ticket(self)
        work: Future | None = None           # the decode step whose end lets the ticket go
        try:
            try:
                body = await asyncio.wait_for(self.receive(request, ticket), self.limits.receive_timeout_s)
            except asyncio.TimeoutError:
                raise RequestError(408, f"the body was not received within {self.limits.receive_timeout_s} s "
                                        "(--receive-timeout-s)") from None
            data = image_bytes(body, request.headers.get("content-type", ""))
            del body
            if not data:
                raise RequestError(415, "empty body: send the image (PNG, JPEG, ...) as the request body")
            admit()
            ticket.decoding()
            work = self.common.submit(self.first_step, data)
            decoded, value = await asyncio.wrap_future(work)
            if decoded:
                return value
            if self.large_load >= 2 * self.limits.large_decodes:
                value.close()
                raise RequestError(503, f"the replica is decoding {self.large_load} images of over "
                                        f"{LARGE_PIXELS:,} pixels (--large-decodes); retry shortly")
            ticket.in_large_lane()
            work = self.large.submit(self.finished, value)
            return await asyncio.wrap_future(work)
        finally:
            if work is None:
                ticket.release()
            else:                            # at once where the step is over (or was dropped before it started)
                work.add_done_callback(lambda _: loop.call_soon_threadsafe(ticket.release))

    async def receive(self, request, ticket: Ticket) -> bytes:
        limits = self.limits
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise RequestError(413, f"body of {int(declared)} bytes is over the limit of {limits.max_body_bytes} "
                                    "(--max-body-mb)")
        chunks = []
        try:
            async for chunk in request.stream():
                self.take(chunk, ticket)
                chunks.append(chunk)
        except ClientDisconnect:     # its client left: nobody reads the answer, and it is no fault of the service
            raise RequestError(400, "the client left before its body was received") from None
        return b"".join(chunks)

    def take(self, chunk: bytes, ticket: Ticket) -> None:
        """One chunk of a body counted against the body's limit and the replica's byte budget."""
        limits = self.limits
        ticket.hold(len(chunk))
        if ticket.bytes > limits.max_body_bytes:
            raise RequestError(413, f"body is over the limit of {limits.max_body_bytes} bytes (--max-body-mb)")
        if self.pending_bytes > limits.max_pending_bytes:
            raise RequestError(503, f"the replica holds {limits.max_pending_bytes} bytes of uploads waiting to "
                                    "be decoded (--max-pending-mb); retry shortly")

    def first_step(self, data: bytes) -> tuple[bool, object]:
        """(True, the model input) for an image up to LARGE_PIXELS, decoded here; (False, the opened image) for a
        larger one, to finish in the large lane."""
        img = self.opened(data)
        if decode_pixels(img) > LARGE_PIXELS:
            return False, img
        return True, self.finished(img)

    def opened(self, data: bytes):
        try:
            return open_image(data, self.limits.max_pixels)
        except ImageError as e:
            raise refusal(e) from None

    def finished(self, img) -> tuple[np.ndarray, list[str]]:
        try:
            return model_input(img, self.resize, self.size)
        except ImageError as e:
            raise refusal(e) from None


def refusal(error: ImageError) -> RequestError:
    """The answer to an image the decode policy or the model set refuses: 413 too many pixels, 415 not an image it
    can read, 422 one the models cannot take."""
    if isinstance(error, TooManyPixels):
        return RequestError(413, str(error))
    if isinstance(error, UnreadableImage):
        return RequestError(415, str(error))
    return RequestError(422, str(error).replace("pass --resize", "the service was started with --no-resize"))


class Ticket:
    """What one upload holds on the replica (bytes of its body, a place among the decodes and in the large lane),
    let go once."""

    def __init__(self, uploads: Uploads) -> None:
        self.uploads, self.bytes, self.counted, self.large = uploads, 0, False, False

    def hold(self, n: int) -> None:
        self.bytes += n
        self.uploads.pending_bytes += n

    def decoding(self) -> None:
        self.counted = True
        self.uploads.decoding += 1

    def in_large_lane(self) -> None:
        self.large = True
        self.uploads.large_load += 1

    def release(self) -> None:
        uploads = self.uploads
        uploads.pending_bytes -= self.bytes
        uploads.decoding -= self.counted
        uploads.large_load -= self.large
        self.bytes, self.counted, self.large = 0, False, False
