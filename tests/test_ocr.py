"""The OCR daemon end to end: router + onebox-ocr with real tesseract, documents made
here (tests/ocr_docs.py), through POST /v1/ocr: uploads, raw bodies, inbox paths, SSE."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Suite, write_config
from tests.ocr_docs import PAGES, cer, png_claiming, scan, scanned_pdf, text_pdf

OCR = "[ocr]\nworkers = 2\nmax_file_bytes = 4194304\n"


@pytest.fixture(scope="module")
def osuite() -> Iterator[Suite]:
    with tempfile.TemporaryDirectory(prefix="onebox-") as d:
        suite = Suite(Path(d), write_config(Path(d), extra=OCR))
        try:
            suite.start_router()
            suite.start_daemon("ocr")
            suite.wait_for(lambda c: c.get("/ready").json()["services"].get("ocr") == 1, 20, "the OCR worker")
            (Path(d) / "state" / "inbox").mkdir(parents=True, exist_ok=True)
            yield suite
        finally:
            suite.stop()


def inbox(s: Suite) -> Path:
    return s.dir / "state" / "inbox"


def png_bytes(text: str) -> bytes:
    buf = io.BytesIO()
    scan(text).save(buf, format="PNG", dpi=(300, 300))
    return buf.getvalue()


def test_multipart_upload_of_a_scanned_pdf(osuite: Suite) -> None:
    pdf = scanned_pdf(osuite.dir / "scan.pdf", PAGES[:2])
    with osuite.client() as c:
        r = c.post("/v1/ocr", files={"file": ("scan.pdf", pdf.read_bytes(), "application/pdf")})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["object"] == "ocr.document" and doc["usage"] == {"pages": 2, "ocr_pages": 2, "text_pages": 0}
    assert [p["method"] for p in doc["pages"]] == ["ocr", "ocr"] and all(p["confidence"] > 80 for p in doc["pages"])
    assert "<!-- page 1" in doc["markdown"] and "<!-- page 2" in doc["markdown"]
    body = "\n".join(line for line in doc["markdown"].splitlines() if not line.startswith("<!--"))
    assert cer(body, "\n".join(PAGES[:2])) <= 0.02
    assert not list((osuite.dir / "state" / "uploads").iterdir()), "the upload was not removed"


def test_raw_body_image_and_options(osuite: Suite) -> None:
    with osuite.client() as c:
        r = c.post("/v1/ocr", content=png_bytes(PAGES[2]), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        assert cer(r.json()["markdown"].split("\n", 1)[1], PAGES[2]) <= 0.02
        bad = c.post("/v1/ocr?dpi=lots", content=png_bytes("x"), headers={"Content-Type": "image/png"})
        assert bad.status_code == 400 and "dpi" in bad.json()["error"]["message"]


def test_text_layer_pdf_by_inbox_path_streamed(osuite: Suite) -> None:
    pdf = text_pdf(inbox(osuite) / "report.pdf", PAGES)
    with osuite.client() as c, c.stream("POST", "/v1/ocr", json={"path": str(pdf), "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    pages = [json.loads(e) for e in events[:-2]]
    done = json.loads(events[-2])
    assert [p["page"] for p in pages] == [1, 2, 3, 4] and all(p["method"] == "text" for p in pages)
    assert done["object"] == "ocr.document" and done["usage"]["text_pages"] == 4


def test_bad_documents_are_clear_errors_and_the_daemon_keeps_serving(osuite: Suite) -> None:
    whole = text_pdf(osuite.dir / "whole.pdf", PAGES[:2]).read_bytes()
    bomb = png_claiming(osuite.dir / "bomb.png", 30000, 30000).read_bytes()
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"content": b"", "headers": {"Content-Type": "application/pdf"}}, 422, "empty"),
        ({"content": whole[: len(whole) // 2], "headers": {"Content-Type": "application/pdf"}}, 422,
         "corrupt or truncated"),
        ({"content": bomb, "headers": {"Content-Type": "image/png"}}, 413, "too many pixels"),
        ({"content": b"just some text\n", "headers": {"Content-Type": "application/octet-stream"}}, 415,
         "unsupported file type"),
        ({"content": b"x" * (5 * 1024 * 1024), "headers": {"Content-Type": "application/pdf"}}, 413, "larger than"),
        ({"json": {"path": "/etc/passwd"}}, 400, "inside the inbox"),
        ({"json": {"path": str(inbox(osuite) / ".." / "onebox.toml")}}, 400, "inside the inbox"),
        ({"content": b"{}", "headers": {"Content-Type": "text/plain"}}, 415, "multipart/form-data"),
        ({"files": {"other": ("a.png", b"x", "image/png")}}, 400, 'named "file"'),
    ]
    (inbox(osuite) / "escape.pdf").unlink(missing_ok=True)
    (inbox(osuite) / "escape.pdf").symlink_to(osuite.dir / "whole.pdf")
    cases.append(({"json": {"path": str(inbox(osuite) / "escape.pdf")}}, 400, "inside the inbox"))
    qpdf = shutil.which("qpdf")
    if qpdf:
        enc = osuite.dir / "encrypted.pdf"
        subprocess.run([qpdf, "--encrypt", "secret", "owner", "256", "--", str(osuite.dir / "whole.pdf"), str(enc)],
                       check=True)
        cases.append(({"content": enc.read_bytes(), "headers": {"Content-Type": "application/pdf"}}, 422,
                      "encrypted"))
    with osuite.client() as c:
        for kw, code, words in cases:
            r = c.post("/v1/ocr", **kw)
            assert r.status_code == code and words in r.json()["error"]["message"], (kw.keys(), code, r.text[:300])
            assert "Traceback" not in r.text
        ok = c.post("/v1/ocr", content=whole, headers={"Content-Type": "application/pdf"})
        assert ok.status_code == 200 and ok.json()["usage"]["pages"] == 2
    assert osuite.children["ocr"].exit_code() is None
    assert not list((osuite.dir / "state" / "uploads").iterdir()), "uploads left behind"
    assert qpdf, "qpdf is not installed (scripts/setup installs it): the encrypted PDF was not tried"


def test_killed_pool_process_fails_only_its_document(osuite: Suite) -> None:
    long = scanned_pdf(inbox(osuite) / "long.pdf", PAGES * 5)
    result: dict[str, httpx.Response] = {}

    def go() -> None:
        with osuite.client(timeout=120) as c:
            result["r"] = c.post("/v1/ocr", json={"path": str(long)})

    t = threading.Thread(target=go)
    t.start()
    body = osuite.wait_status(lambda b: any(p["request"] for p in b["services"]["ocr"]["workers"][0]["processes"]),
                              timeout=20, what="an OCR worker busy with the document")
    victim = next(p["pid"] for p in body["services"]["ocr"]["workers"][0]["processes"] if p["request"])
    import os
    os.kill(victim, signal.SIGKILL)
    t.join(60)
    r = result["r"]
    assert r.status_code == 500 and "died" in r.json()["error"]["message"], r.text
    with osuite.client() as c:
        ok = c.post("/v1/ocr", content=png_bytes(PAGES[0]), headers={"Content-Type": "image/png"})
        assert ok.status_code == 200, ok.text
    body = osuite.wait_status(lambda b: b["services"]["ocr"]["workers"][0]["restarts"] >= 1, what="the restart count")
    assert osuite.children["ocr"].exit_code() is None


def test_ocr_daemon_down_is_503(fresh_dir: Path) -> None:
    suite = Suite(fresh_dir, write_config(fresh_dir, extra=OCR))
    try:
        suite.start_router()
        with suite.client() as c:
            r = c.post("/v1/ocr", content=png_bytes("x"), headers={"Content-Type": "image/png"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker" and "Retry-After" in r.headers
    finally:
        suite.stop()


def test_missing_language_pack_stops_the_daemon_with_78(fresh_dir: Path) -> None:
    suite = Suite(fresh_dir, write_config(fresh_dir, extra='[ocr]\nlanguages = "eng+xyz"\n'))
    try:
        child = suite.start_daemon("ocr", wait=False)
        deadline = time.monotonic() + 30
        while child.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert child.exit_code() == 78
        assert "not installed: xyz" in suite.log_text("ocr")
    finally:
        suite.stop()
