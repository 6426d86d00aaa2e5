"""OcrEngine end to end: real worker processes, real tesseract, documents made here.

The engine is driven through its own seam (submit/cancel, replies to an Emitter); the
emitter here just records what the engine sent. Scans are rendered with Pillow's
bundled font at about 300 dpi and read back; the encrypted PDF comes from qpdf.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from daemons.bus.errors import RequestError
from daemons.bus.worker import Request
from daemons.ocr.engine import OcrEngine
from daemons.ocr.settings import OcrSettings
from tests.ocr_docs import DPI, PAGES, cer, png_claiming, scan, scanned_pdf, text_of, text_pdf

WAIT_S = 30.0


# -- what the engine sends -----------------------------------------------------------------


class Collector:
    """Records every reply, per request, in order (thread-safe, as the bus's Emitter)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.messages: dict[str, list[tuple[str, Any]]] = {}

    def _add(self, rid: str, kind: str, data: Any) -> None:
        with self._cond:
            self.messages.setdefault(rid, []).append((kind, data))
            self._cond.notify_all()

    def partial(self, request_id: str, data: dict[str, Any]) -> None:
        self._add(request_id, "partial", data)

    def final(self, request_id: str, data: dict[str, Any]) -> None:
        self._add(request_id, "final", data)

    def error(self, request_id: str, code: int, message: str) -> None:
        self._add(request_id, "error", (code, message))

    def of(self, rid: str) -> list[tuple[str, Any]]:
        with self._cond:
            return list(self.messages.get(rid, []))

    def wait_for(self, rid: str, kinds: tuple[str, ...], timeout: float = WAIT_S) -> list[tuple[str, Any]]:
        with self._cond:
            ok = self._cond.wait_for(lambda: any(k in kinds for k, _ in self.messages.get(rid, [])), timeout)
            assert ok, f"no {kinds} for {rid} within {timeout} s; got {self.messages.get(rid)}"
            return list(self.messages[rid])


def submit(engine: OcrEngine, path: Path | str, deadline_s: float = 60.0, **body: Any) -> str:
    rid = uuid.uuid4().hex[:8]
    engine.submit(Request(rid, time.time() + deadline_s, {"path": str(path), **body}))
    return rid


def read(engine: OcrEngine, out: Collector, path: Path | str, **body: Any) -> tuple[list[dict[str, Any]], Any]:
    """Submit and wait: the partials and the final; fails the test on an error."""
    rid = submit(engine, path, **body)
    messages = out.wait_for(rid, ("final", "error"))
    assert messages[-1][0] == "final", messages[-1]
    return [data for kind, data in messages[:-1]], messages[-1][1]


def refusal(engine: OcrEngine, out: Collector, path: Path | str, **body: Any) -> tuple[int, str]:
    """The refusal of a document, at submit or as an ERROR reply."""
    try:
        rid = submit(engine, path, **body)
    except RequestError as exc:
        return exc.code, exc.message
    kind, data = out.wait_for(rid, ("final", "error"))[-1]
    assert kind == "error", f"expected a refusal, got {kind} {data}"
    return int(data[0]), str(data[1])


def wait_until(predicate: Any, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ocr")
    (root / "allowed").mkdir()
    (root / "outside").mkdir()
    return root / "allowed"


def make_engine(docs: Path, **settings: Any) -> tuple[OcrEngine, Collector]:
    out = Collector()
    engine = OcrEngine(OcrSettings(allowed_dirs=(str(docs),), **settings), out)
    engine.start()
    return engine, out


@pytest.fixture(scope="module")
def long_pdf(docs: Path) -> Path:
    return scanned_pdf(docs / "long.pdf", PAGES * 4)


@pytest.fixture(scope="module")
def pool(docs: Path) -> Iterator[tuple[OcrEngine, Collector]]:
    engine, out = make_engine(docs, workers=2)
    yield engine, out
    engine.stop(10)


# -- tests ------------------------------------------------------------------------------------------


def test_text_layer_pdf_is_read_without_tesseract(docs: Path) -> None:
    # This engine's tesseract does not exist: a document that reaches OCR fails, so the
    # text-layer PDF succeeding proves its pages never did.
    engine, out = make_engine(docs, tesseract_cmd=str(docs / "no-such-tesseract"))
    try:
        started = time.monotonic()
        partials, final = read(engine, out, text_pdf(docs / "text.pdf", PAGES))
        assert [p["method"] for p in partials] == ["text"] * 4
        assert [p["page"] for p in partials] == [1, 2, 3, 4] and {p["pages"] for p in partials} == {4}
        assert all(p["confidence"] is None for p in partials)
        assert partials[0]["markdown"].startswith("<!-- page 1 -->\n")
        assert cer(text_of(partials), "\n".join(PAGES)) == 0.0
        assert final["text_pages"] == 4 and final["ocr_pages"] == 0 and final["pages"] == 4
        assert time.monotonic() - started < 10
        code, message = refusal(engine, out, scanned_pdf(docs / "needs-ocr.pdf", PAGES[:1]))
        assert code == 500 and "tesseract" in message and "not found" in message
        wait_until(lambda: engine.status_map()["pages"] == {"done": 4, "ocr": 0, "text": 4})
    finally:
        engine.stop(10)


@pytest.mark.parametrize("kind", ["pdf", "png", "jpeg", "tiff", "webp"])
def test_scans_are_read(pool: tuple[OcrEngine, Collector], docs: Path, kind: str) -> None:
    engine, out = pool
    texts = PAGES[:2] if kind in ("pdf", "tiff") else PAGES[:1]
    path = docs / f"scan.{kind}"
    if kind == "pdf":
        scanned_pdf(path, texts)
    else:
        images = [scan(t) for t in texts]
        options: dict[str, Any] = {"quality": 90} if kind in ("jpeg", "webp") else {}
        images[0].save(path, format=kind.upper(), save_all=len(images) > 1, append_images=images[1:],
                       dpi=(DPI, DPI), **options)
    partials, final = read(engine, out, path)
    assert [p["page"] for p in partials] == list(range(1, len(texts) + 1))
    assert all(p["method"] == "ocr" and p["confidence"] > 80 for p in partials)
    for p, want in zip(partials, texts):
        assert cer(text_of([p]), want) <= 0.05, (p["markdown"], want)
        assert p["chars"] == len(p["markdown"].split("\n", 1)[1]) - 1
    assert final["ocr_pages"] == len(texts) and final["text_pages"] == 0 and final["mean_confidence"] > 80


def test_part_of_a_document(pool: tuple[OcrEngine, Collector], long_pdf: Path) -> None:
    engine, out = pool
    partials, final = read(engine, out, long_pdf, first_page=3, max_pages=2)
    assert [(p["page"], p["pages"]) for p in partials] == [(3, 16), (4, 16)]
    assert final["pages"] == 2
    assert cer(text_of(partials), "\n".join(PAGES[2:4])) <= 0.05


def test_junk_text_layer_is_ocred(pool: tuple[OcrEngine, Collector], docs: Path) -> None:
    engine, out = pool
    junk = "~'. ,_ -:;' ~~ ^' .,. ' ' -- ., ~ ;' . '' ,, ~ ^ :: ." * 2
    partials, _ = read(engine, out, text_pdf(docs / "junk.pdf", [junk], under=scan(PAGES[2])))
    assert partials[0]["method"] == "ocr"
    assert cer(text_of(partials), PAGES[2]) <= 0.05


def test_bad_documents_are_refused_and_the_next_is_read(pool: tuple[OcrEngine, Collector], docs: Path) -> None:
    engine, out = pool
    outside = docs.parent / "outside"
    (docs / "empty.pdf").write_bytes(b"")
    whole = text_pdf(docs / "whole.pdf", PAGES[:2]).read_bytes()
    (docs / "truncated.pdf").write_bytes(whole[: len(whole) // 2])
    (docs / "notes.txt").write_text("not a document\n")
    scan(PAGES[0]).save(outside / "secret.png")
    (docs / "escape.png").symlink_to(outside / "secret.png")
    png_claiming(docs / "bomb.png", 30000, 30000)
    scan(PAGES[0]).save(docs / "poster.pdf", resolution=10)  # 190 x 36 inches: 615 Mpx at 300 dpi
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"path": docs / "empty.pdf"}, 422, "empty"),
        ({"path": docs / "truncated.pdf"}, 422, "corrupt or truncated"),
        ({"path": docs / "bomb.png"}, 413, "too many pixels"),
        ({"path": docs / "poster.pdf"}, 413, "too many pixels at 300 dpi"),
        ({"path": docs / "notes.txt"}, 415, "unsupported file type"),
        ({"path": docs / "missing.pdf"}, 400, "not found"),
        ({"path": outside / "secret.png"}, 400, "outside the allowed directories"),
        ({"path": docs / "escape.png"}, 400, "outside the allowed directories"),
        ({"path": str(docs / ".." / "outside" / "secret.png")}, 400, "outside the allowed directories"),
        ({"path": "relative/scan.png"}, 400, "must be absolute"),
        ({"path": docs}, 400, "directory"),
        ({"path": docs / "whole.pdf", "dpi": 5000}, 400, '"dpi"'),
        ({"path": docs / "whole.pdf", "first_page": 9}, 400, "past the last page"),
    ]
    qpdf = shutil.which("qpdf")
    if qpdf:
        subprocess.run([qpdf, "--encrypt", "secret", "owner", "256", "--", str(docs / "whole.pdf"),
                        str(docs / "encrypted.pdf")], check=True)
        cases.append(({"path": docs / "encrypted.pdf"}, 422, "encrypted"))
    scanned_pdf(docs / "one.pdf", PAGES[:1])
    cases.append(({"path": docs / "one.pdf", "languages": "eng+xyz"}, 400, "not installed: xyz"))
    for body, code, words in cases:
        path = body.pop("path")
        got = refusal(engine, out, path, **body)
        assert got[0] == code and words in got[1], (path, body, got)
        assert "Traceback" not in got[1]
    partials, final = read(engine, out, docs / "whole.pdf")
    assert final["pages"] == 2 and cer(text_of(partials), "\n".join(PAGES[:2])) == 0.0
    if not qpdf:
        pytest.skip("qpdf is not installed (apt-get install qpdf): the encrypted PDF was not tried")


def test_killed_worker_fails_only_its_document(pool: tuple[OcrEngine, Collector], docs: Path,
                                              long_pdf: Path) -> None:
    engine, out = pool
    restarts = engine.status_map()["restarts"]
    rid = submit(engine, long_pdf)
    out.wait_for(rid, ("partial",))

    def worker_pid() -> int | None:
        return next((p["pid"] for p in engine.status_map()["processes"] if p["request"] == rid), None)

    wait_until(lambda: worker_pid() is not None)
    pid = worker_pid()
    assert pid is not None
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    os.kill(pid, signal.SIGKILL)
    kind, (code, message) = out.wait_for(rid, ("error", "final"))[-1]
    assert kind == "error" and code == 500 and "died (signal 9, SIGKILL)" in message, message
    assert len(out.of(rid)) - 1 < 16
    partials, final = read(engine, out, docs / "one.pdf")
    assert final["pages"] == 1 and cer(text_of(partials), PAGES[0]) <= 0.05
    wait_until(lambda: engine.status_map()["restarts"] == restarts + 1)
    assert engine.alive()


def test_cancel_stops_the_pages(pool: tuple[OcrEngine, Collector], docs: Path, long_pdf: Path) -> None:
    engine, out = pool
    rid = submit(engine, long_pdf)
    out.wait_for(rid, ("partial",))
    engine.cancel(rid)
    sent = len(out.of(rid))
    wait_until(lambda: all(p["request"] != rid for p in engine.status_map()["processes"]))
    assert len(out.of(rid)) == sent and all(kind == "partial" for kind, _ in out.of(rid))
    assert sent < 16
    partials, _ = read(engine, out, docs / "one.pdf")
    assert cer(text_of(partials), PAGES[0]) <= 0.05


def test_deadline_stops_a_document_with_504(pool: tuple[OcrEngine, Collector], docs: Path,
                                            long_pdf: Path) -> None:
    engine, out = pool
    rid = submit(engine, long_pdf, deadline_s=0.5)
    kind, (code, message) = out.wait_for(rid, ("error", "final"))[-1]
    assert kind == "error" and code == 504 and "deadline" in message
    late = submit(engine, docs / "one.pdf", deadline_s=-1)
    assert out.wait_for(late, ("error", "final"))[-1][1][0] == 504


@pytest.fixture(scope="module")
def strict(docs: Path) -> Iterator[tuple[OcrEngine, Collector]]:
    """One worker, a queue of one, half a second a page."""
    # Not niced: its timeouts are short, and must not fire on a busy machine.
    engine, out = make_engine(docs, workers=1, queue=1, page_timeout_s=0.5, kill_grace_s=2.0, nice=0)
    yield engine, out
    engine.stop(10)


def test_full_queue_is_refused_with_503(strict: tuple[OcrEngine, Collector], long_pdf: Path) -> None:
    engine, out = strict
    taken: list[str] = []
    with pytest.raises(RequestError) as refused:
        for _ in range(3):
            taken.append(submit(engine, long_pdf))
    assert refused.value.code == 503 and "queue is full" in refused.value.message
    for rid in taken:
        engine.cancel(rid)
    # The status map is the dispatcher's snapshot from its last turn.
    wait_until(lambda: engine.status_map()["documents"]["cancelled"] == len(taken)
               and engine.status_map()["busy"] == 0 and engine.status_map()["queue"] == 0)


def test_slow_page_times_out_with_422(strict: tuple[OcrEngine, Collector], docs: Path) -> None:
    engine, out = strict
    # Tesseract takes seconds over dense noise (3.7 s here), past page_timeout_s.
    noise = Image.effect_noise((4500, 4500), 60).point(lambda v: 255 if v > 128 else 0)
    noise.save(docs / "noise.png", compress_level=1)
    started = time.monotonic()
    code, message = refusal(engine, out, docs / "noise.png")
    assert code == 422 and "page timeout" in message, message
    assert time.monotonic() - started < 2.5


def test_silent_worker_is_killed_and_replaced(strict: tuple[OcrEngine, Collector], docs: Path) -> None:
    engine, out = strict
    one = scanned_pdf(docs / "one.pdf", PAGES[:1])
    wait_until(lambda: engine.status_map()["processes"][0]["pid"] is not None)
    before = engine.status_map()
    pid = before["processes"][0]["pid"]
    # A stopped process says nothing, as one hung in a decoder would.
    os.kill(pid, signal.SIGSTOP)
    code, message = refusal(engine, out, one)
    assert code == 422 and "took longer than the page timeout" in message, message
    wait_until(lambda: engine.status_map()["restarts"] == before["restarts"] + 1)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    partials, _ = read(engine, out, one)
    assert cer(text_of(partials), PAGES[0]) <= 0.05
    wait_until(lambda: engine.status().startswith("0/1 workers busy"))
    assert engine.alive()
