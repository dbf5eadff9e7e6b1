"""Hostile files against the decode policy (runtime/decode_policy.py) and a replica's upload bounds
(runtime/uploads.py): each is refused with its own error before any pixel is decoded where the header already says
no, the rest of a folder is repaired, and a replica answers /healthz and small requests while large images decode
(blocked on events, not timed). The same files against a live Ray Serve: tests/test_serve.py."""
import asyncio
import io
import json
import logging
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bench.hostile_files import HOSTILE, eps, header_bomb, png_of_zeros, psd, two_frame_gif
from cli import main
from runtime.decode_policy import MAX_PIXELS, TooManyPixels, UnreadableImage, check_max_pixels
from runtime.imageio import ImageError, decode_image

FAST = ["--steps", "2", "--threads", "1", "--backend", "torch", "--quiet"]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_file_gets_its_error(name):
    make, _, status, text = HOSTILE[name]
    with pytest.raises(TooManyPixels if status == 413 else UnreadableImage) as error:
        decode_image(make(), resize=True, size=32)
    assert text in str(error.value)


def test_refused_formats_never_reach_their_decoders(monkeypatch):
    from PIL import EpsImagePlugin, PsdImagePlugin

    assert Image.open(io.BytesIO(psd())).format == "PSD"          # real files that Pillow alone would open
    assert Image.open(io.BytesIO(eps())).format == "EPS"

    def called(*args, **kwargs):
        raise AssertionError("a refused format's plugin was run")
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", called)
    monkeypatch.setattr(PsdImagePlugin.PsdImageFile, "_open", called)
    for data in (eps(), psd()):
        with pytest.raises(UnreadableImage, match="not a PNG, JPEG, BMP, WebP, TIFF or GIF"):
            decode_image(data)


def test_the_pixel_limit_is_read_from_the_header_before_decoding(monkeypatch):
    data = png(np.full((40, 50, 3), 7, np.uint8))
    with pytest.raises(TooManyPixels, match="50×40 = 2,000 pixels, over the limit of 1,999"):
        decode_image(data, resize=True, max_pixels=1999)
    assert decode_image(data, resize=True, max_pixels=2000)[0].shape == (3, 32, 32)
    # a header that lies: 100 MP claimed (above Pillow's own warning limit too), 4 rows of data. Refused at the
    # header, so the decoder never starts
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(TooManyPixels, match="10000×10000"), pytest.warns(Image.DecompressionBombWarning):
        decode_image(png_of_zeros(10000, 10000, rows=4), max_pixels=check_max_pixels(Image.MAX_IMAGE_PIXELS))
    with pytest.raises(TooManyPixels, match="400,000,000 pixels"):
        decode_image(header_bomb(), max_pixels=MAX_PIXELS)


def test_a_size_the_models_cannot_take_is_refused_from_the_header(monkeypatch):
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(ImageError, match="image is 4000×3000, the models take 32×32"):
        decode_image(png_of_zeros(4000, 3000, rows=1), resize=False)
    with pytest.raises(ImageError, match="image is 4000×7: too small"):
        decode_image(png_of_zeros(4000, 7, rows=1), resize=True)


def test_max_pixels_stays_within_pillows_bomb_limit():
    assert check_max_pixels(MAX_PIXELS) == MAX_PIXELS
    for bad in (0, Image.MAX_IMAGE_PIXELS + 1):
        with pytest.raises(ValueError, match="Pillow's decompression-bomb limit"):
            check_max_pixels(bad)


def test_a_tiff_whose_tiles_ask_for_too_many_pixels_is_refused_before_decoding(monkeypatch):
    from bench.hostile_files import tiled_tiff

    assert decode_image(tiled_tiff(64))[0].max() == 7 / 255      # a tile larger than the image is allowed
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(TooManyPixels, match="32×32 in tiles of 45984×45984 = 2,114,528,256 pixels, over the limit"):
        decode_image(tiled_tiff())


def test_the_file_part_of_a_multipart_body_is_found_and_a_flood_of_parts_refused():
    from runtime.uploads import RequestError, image_bytes

    form = "multipart/form-data; boundary=XyZ"
    field = b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
    file = b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\nPNGDATA\r\n--XyZ"
    assert image_bytes(field * 3 + file + b"--\r\n", form) == b"PNGDATA"
    for body in (field * 20 + file + b"--\r\n", b"\n" * 2_000_000, b"--XyZ\r\n" * 300_000):
        with pytest.raises(RequestError, match="no file part"):
            image_bytes(body, form)
    with pytest.raises(RequestError, match="without a boundary"):
        image_bytes(file, "multipart/form-data")


def test_a_gif_gives_its_first_frame_with_a_note():
    image, notes = decode_image(two_frame_gif())
    assert image[:, 0, 0].tolist() == [1.0, 0.0, 0.0]            # red, not the blue second frame
    assert notes[0] == "the first frame of a multi-frame GIF (the others are ignored)"


def test_a_folder_of_hostile_files_is_one_error_row_each_and_the_rest_repaired(tiny_weights, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name, (make, file, _, _) in HOSTILE.items():
        (src / file).write_bytes(make())
    (src / "anim.gif").write_bytes(two_frame_gif())
    (src / "fine.png").write_bytes(png(np.full((32, 32, 3), 99, np.uint8)))
    result = CliRunner().invoke(main, ["repair", "--input", str(src), "--output", str(tmp_path / "out"),
                                       "--weights", str(tiny_weights), *FAST])
    assert result.exit_code == 1, result.output                   # some inputs failed, the run went on
    rows = {r["file"]: r for r in json.loads((tmp_path / "out" / "report.json").read_text())["images"]}
    for name, (_, file, _, text) in HOSTILE.items():
        assert rows[file]["status"] == "error" and text in rows[file]["error"], (name, rows[file])
    assert rows["anim.gif"]["status"] == "repaired" and "first frame" in rows["anim.gif"]["notes"][0]
    assert rows["fine.png"]["status"] == "repaired"
    assert (tmp_path / "out" / "anim.png").exists() and (tmp_path / "out" / "fine.png").exists()


def test_max_pixels_is_an_option_of_repair_and_checked(tiny_weights, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(png(np.full((32, 32, 3), 99, np.uint8)))
    small = CliRunner().invoke(main, ["repair", "--input", str(src), "--output", str(tmp_path / "out"), "--weights",
                                      str(tiny_weights), "--max-pixels", "1000", *FAST])
    assert small.exit_code == 1
    row = json.loads((tmp_path / "out" / "report.json").read_text())["images"][0]
    assert "32×32 = 1,024 pixels, over the limit of 1,000 (--max-pixels)" in row["error"]
    too_big = CliRunner().invoke(main, ["repair", "--input", str(src), "--output", str(tmp_path / "o2"), "--weights",
                                        str(tiny_weights), "--max-pixels", str(10**9), *FAST])
    assert too_big.exit_code == 2 and "--max-pixels" in too_big.output


def test_the_runtime_without_pytorch_keeps_the_same_policy(tiny_bundle, tmp_path):
    from tests.test_runtime import run_without_torch

    src = tmp_path / "in"
    src.mkdir()
    (src / "bomb.png").write_bytes(header_bomb())
    (src / "eps.png").write_bytes(eps())
    (src / "a.png").write_bytes(png(np.full((32, 32, 3), 99, np.uint8)))
    done = run_without_torch("repair", "--bundle", str(tiny_bundle), "--input", str(src), "--output",
                             str(tmp_path / "out"), "--steps", "1", "--threads", "1", "--quiet")
    assert done.returncode == 1, done.stderr
    rows = {r["file"]: r for r in json.loads((tmp_path / "out" / "report.json").read_text())["images"]}
    assert "400,000,000 pixels, over the limit of 50,000,000" in rows["bomb.png"]["error"]
    assert "not a PNG, JPEG" in rows["eps.png"]["error"] and rows["a.png"]["status"] == "repaired"
    refused = run_without_torch("repair", "--bundle", str(tiny_bundle), "--input", str(src), "--output",
                                str(tmp_path / "o2"), "--max-pixels", "0")
    assert refused.returncode == 2 and "--max-pixels" in refused.stderr


# --- a replica's uploads, driven directly (no Ray): Serve hands the replica a starlette Request -----------------------

serve = pytest.importorskip("runtime.serve", reason="needs Ray Serve (pip install 'mssl-repair[serve]')")


def request(path: str = "/v1/repair", body: bytes = b"", method: str = "POST", stall: bool = False):
    """A starlette Request as Serve's proxy passes it; ``stall``: the client sends 10 bytes, then nothing."""
    from starlette.requests import Request

    async def receive():
        if stall:
            if not receive.sent:
                receive.sent = True
                return {"type": "http.request", "body": body[:10], "more_body": True}
            await asyncio.Event().wait()
        return {"type": "http.request", "body": body, "more_body": False}
    receive.sent = False
    headers = [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": method, "path": path, "headers": headers, "query_string": b""},
                   receive)


def stand_in_repair():
    """A batch repair that returns each image as it came, with report fields (no model)."""
    from runtime.folder import image_rows

    def repair(x: np.ndarray) -> list[dict]:
        logits, zero = np.zeros((len(x), 10)), np.zeros(len(x))
        return image_rows(x, x, logits, logits, {}, {}, zero, zero, [str(i) for i in range(10)])
    return repair


def replica(**limits) -> "serve.RepairService":
    from runtime.uploads import UploadLimits

    settings = serve.ServiceSettings(size=32, resize=True, classes=[str(i) for i in range(10)], repair={},
                                     max_batch_size=4, batch_wait_ms=1, max_queued=4,
                                     uploads=UploadLimits(**limits))
    return serve.RepairService(stand_in_repair, settings)


@pytest.fixture
def blocked_decodes(monkeypatch):
    """Every decode waits for ``release`` once it has started (``started`` counts them)."""
    from runtime import uploads

    started, release, real = threading.Semaphore(0), threading.Event(), uploads.model_input

    def waiting(*args, **kwargs):
        started.release()
        assert release.wait(30)
        return real(*args, **kwargs)
    monkeypatch.setattr(uploads, "model_input", waiting)
    return started, release


async def until(semaphore: threading.Semaphore, n: int = 1) -> None:
    for _ in range(n):
        while not semaphore.acquire(blocking=False):
            await asyncio.sleep(0.01)


def test_healthz_and_small_images_are_answered_while_large_ones_decode(blocked_decodes):
    started, release = blocked_decodes
    svc = replica(large_decodes=1)
    large = png_of_zeros(2100, 2000)                               # 4.2 MP: the large lane
    small = png(np.full((32, 32, 3), 50, np.uint8))

    async def scenario():
        first = asyncio.ensure_future(svc(request(body=large)))
        await until(started)                                       # the large lane's one thread is busy
        second = asyncio.ensure_future(svc(request(body=large)))   # waits in the lane
        await asyncio.sleep(0.05)
        third = await svc(request(body=large))                     # the lane is full: refused at once
        health = await svc(request("/healthz", method="GET"))      # answered while the two wait on the event
        small_answer = asyncio.ensure_future(svc(request(body=small)))
        await until(started)                                       # the small image decodes in its own lane
        assert not first.done() and not second.done()
        release.set()
        return third, health, await small_answer, await first, await second

    third, health, small_answer, first, second = asyncio.run(scenario())
    assert health.status_code == 200 and health.body == b"ok\n"
    assert third.status_code == 503 and "--large-decodes" in json.loads(third.body)["error"]
    assert "retry-after" in third.headers
    assert [a.status_code for a in (small_answer, first, second)] == [200, 200, 200]
    assert (svc.uploads.pending_bytes, svc.uploads.decoding, svc.uploads.large_load) == (0, 0, 0)


def test_decodes_count_in_the_line_and_bodies_in_the_byte_budget(blocked_decodes):
    started, release = blocked_decodes
    small = png(np.full((32, 32, 3), 50, np.uint8))
    svc = replica(max_body_bytes=len(small), max_pending_bytes=2 * len(small))

    async def scenario():
        held = [asyncio.ensure_future(svc(request(body=small))) for _ in range(2)]
        await until(started)                                       # one decodes, one waits: both bodies held
        over_budget = await svc(request(body=small))
        svc.settings.max_batch_size, svc.settings.max_queued = 1, 1    # a line of two: the two decoding fill it
        full = await svc(request(body=small))
        release.set()
        return over_budget, full, await asyncio.gather(*held)

    over_budget, full, held = asyncio.run(scenario())
    assert over_budget.status_code == 503 and "--max-pending-mb" in json.loads(over_budget.body)["error"]
    assert full.status_code == 503 and "the service is full" in json.loads(full.body)["error"]
    assert [a.status_code for a in held] == [200, 200]
    assert (svc.uploads.pending_bytes, svc.uploads.decoding) == (0, 0)


def test_a_body_never_sent_is_dropped_after_the_receive_timeout():
    svc = replica(receive_timeout_s=0.2)
    answer = asyncio.run(svc(request(body=png(np.zeros((32, 32, 3), np.uint8)), stall=True)))
    assert answer.status_code == 408 and "--receive-timeout-s" in json.loads(answer.body)["error"]
    assert svc.uploads.pending_bytes == 0


def test_hostile_uploads_get_their_status_and_a_request_id():
    svc = replica()

    async def scenario():
        return {name: await svc(request(body=make())) for name, (make, _, _, _) in HOSTILE.items()}

    for name, answer in asyncio.run(scenario()).items():
        body = json.loads(answer.body)
        assert answer.status_code == HOSTILE[name][2], (name, body)
        assert HOSTILE[name][3] in body["error"] and len(body["request_id"]) == 32, name
    assert (svc.uploads.pending_bytes, svc.uploads.decoding) == (0, 0)


def test_a_batcher_that_dies_fails_its_requests_at_once_and_makes_the_replica_unhealthy(caplog):
    svc = replica()
    logging.getLogger("ray.serve").addHandler(caplog.handler)     # Serve's logger does not reach the root's

    async def broken_gather():
        raise RuntimeError("injected failure in the batcher")
    svc.batcher.gather = broken_gather
    svc.check_health()                                            # healthy until then

    async def scenario():
        answer = await svc(request(body=png(np.zeros((32, 32, 3), np.uint8))))
        return answer, await svc(request("/healthz", method="GET"))

    answer, health = asyncio.run(scenario())
    body = json.loads(answer.body)
    assert answer.status_code == 500 and "injected" not in body["error"] and body["request_id"] in body["error"]
    assert any(body["request_id"] in r.getMessage() for r in caplog.records)   # the detail is in the log
    assert "injected failure" in caplog.text
    assert health.status_code == 503 and "the batcher stopped" in json.loads(health.body)["error"]
    with pytest.raises(RuntimeError, match="the batcher stopped"):
        svc.check_health()
    logging.getLogger("ray.serve").removeHandler(caplog.handler)
