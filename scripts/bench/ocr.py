#!/usr/bin/env python3
"""OCR speed and accuracy: onebox's OCR engine against tesseract alone and ocrmypdf.

Makes, from known text (seeded): a scanned-looking PDF (pages drawn with Pillow at
300 dpi in DejaVu Serif and DejaVu Sans, then skewed, blurred and noised, stored as
JPEG, no text layer) and a PDF of the same text with a text layer. Then reads them:

  (a) onebox: the scan as `--workers` documents of consecutive pages (a document is read
      by one pool process, page by page), through the running OCR daemon and the
      router's POST /v1/ocr (streamed), as an app would
  (b) the tesseract CLI directly on the same JPEG page images, `--workers` at a time
  (c) `ocrmypdf --sidecar` on the scanned PDF with `--jobs` = `--workers`, when installed
  (d) onebox on the text-layer PDF (its fast path: no OCR)

and prints pages/s and the character error rate against the known text for each, the
targets met or not (onebox >= 0.9x tesseract's pages/s, onebox CER <= 2%, the text
layer >= 50x faster than OCR), and last one JSON object with every figure. (a) and (b)
run in interleaved rounds (--repeat), the best of each counting; tesseract runs at the
pool's niceness in (b) and (c) as in (a). Run it on a quiet machine.

Usage: .venv/bin/python scripts/bench/ocr.py [--quick] [--workers N] [--pages N] [--repeat N]
       [--no-ocrmypdf] [--keep DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import ctypes
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from daemons.ocr.settings import OcrSettings  # noqa: E402

DPI = 300
PAGE_PX = (2550, 3300)  # US Letter at 300 dpi
MARGIN_PX = 250
FONT_PX = 44  # 10.5 pt at 300 dpi
LINE_PX = 62
FONTS = ("DejaVu Serif", "DejaVu Sans")
SEED = 20240611
DEADLINE_S = 3600.0
PAGE_MARK = re.compile(r"<!-- page \d+ -->\n")

WORDS = """the of and to in is was for on that with as by at from his her they be this have not are but
had which one all were when we there can an your their said if do will each about how up out them then she
many some so these would other into has more two like him see time could no make than first been its who
now people my made over did down only way find use may water long little very after words called just where
most know get through back much before go good new write our used me man too any day same right look think
also around another came come work three word must because does part even place well such here take why
things help put years different away again off went old number great tell men say small every found still
between name should home big give air line set own under read last never us left end along while might next
sound below saw something thought both few those always looked show large often together asked house world
going want school important until form food keep children feet land side without boy once animals life
enough took sometimes four head above kind began almost live page got earth need far hand high year mother
light parts country father let night following picture being study second eyes soon times story boys since
white days ever paper hard near sentence better best across during today others however sure means knew try
told young miles sun ways thing whole hear example heard several change answer room sea against top turned
learn point city play toward five using himself usually river mountain window garden winter morning""".split()


# -- the documents ------------------------------------------------------------------------------


def find_font(family: str, size: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, str]:
    found = shutil.which("fc-match") and subprocess.run(["fc-match", "-f", "%{file}", family],
                                                         capture_output=True, text=True).stdout
    if found and Path(found).exists() and family.split()[0].lower() in Path(found).name.lower():
        return ImageFont.truetype(found, size), Path(found).name
    return ImageFont.load_default(size=size), "Pillow's default font"


def sentences(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        if rng.random() < 0.25:
            words.append(str(rng.randint(2, 1999)))
        s = " ".join(words)
        out.append(s[0].upper() + s[1:] + rng.choice(".....,?;"))
    return " ".join(out)


def draw_page(rng: random.Random, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> tuple[Image.Image, str]:
    image = Image.new("L", PAGE_PX, 255)
    draw = ImageDraw.Draw(image)
    width = PAGE_PX[0] - 2 * MARGIN_PX
    y, lines = MARGIN_PX, []
    while y < PAGE_PX[1] - MARGIN_PX - LINE_PX:
        line = ""
        for word in sentences(rng, rng.randint(2, 4)).split():
            candidate = f"{line} {word}".strip()
            if line and draw.textlength(candidate, font=font) > width:
                if y >= PAGE_PX[1] - MARGIN_PX - LINE_PX:
                    break
                draw.text((MARGIN_PX, y), line, font=font, fill=0)
                lines.append(line)
                y += LINE_PX
                line = word
            else:
                line = candidate
        if line and y < PAGE_PX[1] - MARGIN_PX - LINE_PX:
            draw.text((MARGIN_PX, y), line, font=font, fill=0)
            lines.append(line)
            y += LINE_PX
        y += LINE_PX // 2  # paragraph gap
    return image, "\n".join(lines)


def scanify(rng: random.Random, image: Image.Image) -> Image.Image:
    """What a flatbed does to a page: a little skew, blur, sensor noise, a grey background."""
    image = image.rotate(rng.uniform(-0.8, 0.8), resample=Image.Resampling.BICUBIC, fillcolor=255)
    image = image.filter(ImageFilter.GaussianBlur(0.7))
    image = Image.blend(image, Image.effect_noise(image.size, 18), 0.12)
    return image.point(lambda v: min(255, v + 10))


def make_corpus(work: Path, pages: int) -> tuple[list[Path], list[str], list[str]]:
    """Page JPEGs and their true text; the fonts used."""
    rng = random.Random(SEED)
    fonts = [find_font(family, FONT_PX) for family in FONTS]
    jpegs, texts = [], []
    for i in range(pages):
        font, _ = fonts[i % len(fonts)]
        image, text = draw_page(rng, font)
        path = work / f"page-{i + 1:03d}.jpg"
        scanify(rng, image).save(path, quality=85, dpi=(DPI, DPI))
        jpegs.append(path)
        texts.append(text)
    return jpegs, texts, [name for _, name in fonts]


def scanned_pdf(path: Path, jpegs: list[Path]) -> Path:
    """The JPEGs as PDF pages, embedded as they are (the same pixels tesseract gets in (b))."""
    pdf = pdfium.PdfDocument.new()
    for jpeg in jpegs:
        w, h = (v * 72 / DPI for v in Image.open(jpeg).size)
        page = pdf.new_page(w, h)
        image = pdfium.PdfImage.new(pdf)
        image.load_jpeg(str(jpeg), inline=False)
        image.set_matrix(pdfium.PdfMatrix().scale(w, h))
        page.insert_obj(image)
        page.gen_content()
        page.close()
    pdf.save(path)
    pdf.close()
    return path


def text_pdf(path: Path, texts: list[str]) -> Path:
    pdf = pdfium.PdfDocument.new()
    for text in texts:
        page = pdf.new_page(612, 792)
        y = 740.0
        for line in text.split("\n"):
            obj = pdfium_c.FPDFPageObj_NewTextObj(pdf.raw, b"Helvetica", ctypes.c_float(10))
            buf = ctypes.create_string_buffer((line + "\0").encode("utf-16-le"))
            pdfium_c.FPDFText_SetText(obj, ctypes.cast(buf, ctypes.POINTER(pdfium_c.FPDF_WCHAR)))
            pdfium_c.FPDFPageObj_Transform(obj, 1, 0, 0, 1, 54, y)
            pdfium_c.FPDFPage_InsertObject(page.raw, obj)
            y -= 13
        page.gen_content()
        page.close()
    pdf.save(path)
    pdf.close()
    return path


def split_pdf(path: Path, parts: int) -> list[Path]:
    """The PDF as `parts` PDFs of consecutive pages, as even as they come."""
    src = pdfium.PdfDocument(path)
    total = len(src)
    bounds = [round(i * total / parts) for i in range(parts + 1)]
    out = []
    for i in range(parts):
        if bounds[i] == bounds[i + 1]:
            continue
        part = pdfium.PdfDocument.new()
        part.import_pages(src, list(range(bounds[i], bounds[i + 1])))
        target = path.with_name(f"{path.stem}-part{i + 1}.pdf")
        part.save(target)
        part.close()
        out.append(target)
    src.close()
    return out


# -- measuring ----------------------------------------------------------------------------------


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, one numpy row at a time (insertions by a running minimum)."""
    if not a or not b:
        return max(len(a), len(b))
    bb = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    ramp = np.arange(len(b) + 1)
    row = ramp.copy()
    for i, ca in enumerate(a.encode("utf-32-le").decode("utf-32-le"), 1):
        sub = row[:-1] + (bb != ord(ca))
        cand = np.empty_like(row)
        cand[0] = i
        cand[1:] = np.minimum(row[1:] + 1, sub)
        row = np.minimum.accumulate(cand - ramp) + ramp
    return int(row[-1])


def cer(got: list[str], want: list[str]) -> float:
    """Character error rate over all pages (page by page, spaces normalized)."""
    errors = total = 0
    for i, truth in enumerate(want):
        t = " ".join(truth.split())
        g = " ".join(got[i].split()) if i < len(got) else ""
        errors += edit_distance(g, t)
        total += len(t)
    return errors / max(1, total)


class Progress:
    """One stderr line every few seconds while a stage runs."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.started = self.last = time.monotonic()
        self._lock = threading.Lock()

    def start(self) -> None:
        self.started = self.last = time.monotonic()
        print(f"{self.label}: {self.total} pages ...", file=sys.stderr, flush=True)

    def step(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self.last >= 3.0 or self.done == self.total:
                self.last = now
                elapsed = now - self.started
                print(f"  {self.label}: {self.done}/{self.total} pages, {elapsed:.1f} s, "
                      f"{self.done / elapsed:.2f} pages/s", file=sys.stderr, flush=True)


class Onebox:
    """A router and the OCR daemon in a temp dir, as `onebox up` runs them; documents go
    in its inbox and are read through POST /v1/ocr, streamed page by page."""

    def __init__(self, directory: Path, workers: int) -> None:
        from daemons import config, registry
        from daemons.ctl.launcher import Suite

        self.inbox = directory / "state" / "inbox"
        self.inbox.mkdir(parents=True)
        cfg = directory / "onebox.toml"
        cfg.write_text(f'[paths]\nruntime_dir = "{directory}/run"\nstate_dir = "{directory}/state"\n'
                       f'[log]\nlevel = "info"\n[ocr]\nworkers = {workers}\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("ONEBOX") and k != "NOTIFY_SOCKET"}
        self.suite = Suite(cfg, env, directory / "run", log_dir=directory)
        try:
            self.suite.start_all(registry.instances(config.load(cfg, env)), wait=120)
        except BaseException:
            self.suite.stop()
            raise

    def read(self, pdf: Path, progress: Progress | None, **options: Any) -> str:
        """One document's Markdown (its pages in order, with their markers)."""
        target = self.inbox / pdf.name
        if not target.exists():
            shutil.copy(pdf, target)
        pages: dict[int, str] = {}
        with self.suite.client(timeout=DEADLINE_S) as c, c.stream(
                "POST", "/v1/ocr", json={"path": str(target), "stream": True, **options},
                headers={"X-Request-Timeout": str(DEADLINE_S)}) as r:
            if r.status_code != 200:
                raise SystemExit(f"onebox refused {pdf.name}: {r.status_code} {r.read().decode()[:300]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise SystemExit(f"onebox failed {pdf.name}: {event['error']}")
                if event.get("object") == "ocr.page":
                    pages[int(event["page"])] = str(event["markdown"])
                    if progress:
                        progress.step()
        return "".join(md for _, md in sorted(pages.items()))

    def stop(self) -> None:
        self.suite.stop(15)


def run_onebox(onebox: Onebox, pdf_paths: list[Path], workers: int, progress: Progress | None = None
               ) -> tuple[float, list[str]]:
    """Read the PDFs through the running daemon, all at once: (wall seconds, each PDF's
    Markdown). A warm-up page per worker first, so pool start-up is not counted (a
    running daemon has it behind it)."""
    with cf.ThreadPoolExecutor(max(workers, len(pdf_paths))) as ex:
        list(ex.map(lambda _: onebox.read(pdf_paths[0], None, max_pages=1), range(workers)))
        if progress:
            progress.start()
        started = time.monotonic()
        texts = list(ex.map(lambda p: onebox.read(p, progress), pdf_paths))
    return time.monotonic() - started, texts


def run_tesseract(jpegs: list[Path], workers: int, nice: int, progress: Progress) -> tuple[float, list[str]]:
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}

    def one(path: Path) -> str:
        done = subprocess.run(["nice", "-n", str(nice), "tesseract", str(path), "stdout", "--psm", "3", "-l", "eng"],
                              capture_output=True, text=True, env=env, check=True)
        progress.step()
        return done.stdout

    progress.start()
    started = time.monotonic()
    with cf.ThreadPoolExecutor(workers) as pool:
        texts = list(pool.map(one, jpegs))
    return time.monotonic() - started, texts


def run_ocrmypdf(pdf: Path, work: Path, workers: int, nice: int) -> tuple[float, list[str]] | str:
    exe = shutil.which("ocrmypdf")
    if not exe:
        return "ocrmypdf is not installed (apt-get install ocrmypdf)"
    sidecar = work / "ocrmypdf.txt"
    cmd = ["nice", "-n", str(nice), exe, "-l", "eng", "--jobs", str(workers), "--output-type", "pdf",
           "--optimize", "0", "--sidecar", str(sidecar), "--quiet", str(pdf), str(work / "ocrmypdf.pdf")]
    print(f"ocrmypdf: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_THREAD_LIMIT": "1"})
    seconds = time.monotonic() - started
    if done.returncode != 0:
        return f"ocrmypdf failed (exit {done.returncode}): {done.stderr.strip()[-300:]}"
    return seconds, sidecar.read_text().split("\f")


# -- main -----------------------------------------------------------------------------------------


def pages_of(markdowns: list[str]) -> list[str]:
    """The pages of the documents, in order, cut at onebox's page markers."""
    return [page for md in markdowns for page in PAGE_MARK.split(md)[1:]]


def figures(seconds: float, pages: int, texts: list[str] | None, truth: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"seconds": round(seconds, 3), "pages_per_s": round(pages / seconds, 3)}
    if texts is not None:
        out["cer"] = round(cer(texts, truth), 5)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Stages: (a) onebox OCR, (b) tesseract CLI, (c) ocrmypdf, "
                                            "(d) onebox on the text-layer PDF.")
    parser.add_argument("--quick", action="store_true", help="4 scanned pages instead of 20 (a smoke run)")
    parser.add_argument("--pages", type=int, help="scanned pages (default 20, 4 with --quick)")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4),
                        help="pool processes / parallel tesseracts / ocrmypdf jobs (default: cores, at most 4)")
    parser.add_argument("--repeat", type=int, help="rounds of (a) and (b), the best of each counts (default 2, 1 "
                                                   "with --quick)")
    parser.add_argument("--no-ocrmypdf", action="store_true", help="skip (c)")
    parser.add_argument("--keep", type=Path, help="write the documents here and keep them (default: a temp dir)")
    args = parser.parse_args()
    pages = args.pages or (4 if args.quick else 20)
    repeat = args.repeat or (1 if args.quick else 2)
    if not shutil.which("tesseract"):
        print("tesseract is not installed (apt-get install tesseract-ocr tesseract-ocr-eng)", file=sys.stderr)
        return 1
    nice = OcrSettings().nice
    with contextlib.ExitStack() as stack:
        work: Path = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onebox-ocr-")))
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        jpegs, truth, fonts = make_corpus(work, pages)
        scan = scanned_pdf(work / "scanned.pdf", jpegs)
        texts_pdf = text_pdf(work / "text-layer.pdf", truth)
        parts = split_pdf(scan, args.workers)
        print(f"made {pages} scanned pages ({', '.join(fonts)}) and a text-layer PDF in "
              f"{time.monotonic() - t0:.1f} s; {args.workers} workers", file=sys.stderr, flush=True)

        onebox = Onebox(work / "onebox", args.workers)
        stack.callback(onebox.stop)
        a: dict[str, Any] | None = None
        b: dict[str, Any] | None = None
        for round_ in range(1, repeat + 1):
            # Interleaved rounds, best of each: a noisy neighbour then hurts both alike.
            tag = f" (round {round_}/{repeat})" if repeat > 1 else ""
            seconds, docs = run_onebox(onebox, parts, args.workers,
                                       Progress(f"(a) onebox, {len(parts)} documents{tag}", pages))
            if a is None or seconds < a["seconds"]:
                a = figures(seconds, pages, pages_of(docs), truth)
            seconds, tess = run_tesseract(jpegs, args.workers, nice, Progress(f"(b) tesseract CLI{tag}", pages))
            if b is None or seconds < b["seconds"]:
                b = figures(seconds, pages, tess, truth)
        assert a is not None and b is not None
        c: dict[str, Any]
        if args.no_ocrmypdf:
            c = {"skipped": "--no-ocrmypdf"}
        else:
            got = run_ocrmypdf(scan, work, args.workers, nice)
            c = {"skipped": got} if isinstance(got, str) else figures(got[0], pages, got[1], truth)
        seconds, text_docs = run_onebox(onebox, [texts_pdf], 1, Progress("(d) onebox, text layer", pages))
        d = figures(seconds, pages, pages_of(text_docs), truth)

    targets = {
        "onebox_vs_tesseract_ge_0.9": a["pages_per_s"] >= 0.9 * b["pages_per_s"],
        "onebox_cer_le_2pct": a["cer"] <= 0.02,
        "text_layer_ge_50x_ocr": d["pages_per_s"] >= 50 * a["pages_per_s"],
    }
    print()
    print(f"{'':24} {'seconds':>8} {'pages/s':>8} {'CER':>8}")
    for name, f in (("(a) onebox OCR", a), ("(b) tesseract CLI", b), ("(c) ocrmypdf --sidecar", c),
                    ("(d) onebox text layer", d)):
        if "skipped" in f:
            print(f"{name:24} skipped: {f['skipped']}")
        else:
            print(f"{name:24} {f['seconds']:8.2f} {f['pages_per_s']:8.2f} {f['cer'] * 100:7.2f}%")
    print(f"onebox / tesseract pages/s: {a['pages_per_s'] / b['pages_per_s']:.3f}")
    print(f"text layer / onebox OCR pages/s: {d['pages_per_s'] / a['pages_per_s']:.0f}x")
    for name, ok in targets.items():
        print(f"target {name}: {'yes' if ok else 'no'}")
    print(json.dumps({"pages": pages, "workers": args.workers, "repeat": repeat, "fonts": fonts, "onebox": a, "tesseract": b,
                      "ocrmypdf": c, "text_layer": d, "targets": targets}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
