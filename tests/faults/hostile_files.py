"""Hostile files for tests/faults/test_hostile_inbox.py, each written in milliseconds:
PDFs by hand (10,000 pages, encrypted), images whose headers claim billions of pixels,
zip bombs named .docx (honest, lying about their sizes, dense XML), and a memory sampler
for a process tree."""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import zlib
from pathlib import Path

PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _rc4(key: bytes, data: bytes) -> bytes:
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out = bytearray()
    i = j = 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def _pdf(objects: list[bytes], trailer: bytes = b"") -> bytes:
    """A PDF of these objects (1-based; 1 is the catalog), with a correct xref table."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R %s>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer, xref)
    return bytes(out)


def many_pages_pdf(path: Path, pages: int) -> Path:
    """`pages` pages sharing one content stream and one font: ~40 bytes a page."""
    first = 5  # objects 1-4: catalog, pages, content, font
    kids = b" ".join(b"%d 0 R" % (first + i) for i in range(pages))
    content = b"BT /F1 12 Tf 72 720 Td (The same page again, and again.) Tj ET"
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Count %d /Kids [%s] /MediaBox [0 0 612 792] "
               b"/Resources << /Font << /F1 4 0 R >> >> >>" % (pages, kids),
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    objects += [b"<< /Type /Page /Parent 2 0 R /Contents 3 0 R >>"] * pages
    path.write_bytes(_pdf(objects))
    return path


def encrypted_pdf(path: Path, user_password: bytes = b"secret", owner_password: bytes = b"owner") -> Path:
    """A one-page PDF under the standard security handler (revision 2, RC4 40-bit) that
    needs `user_password` to open (PDF 1.7 reference, algorithms 3.2-3.4)."""
    file_id = hashlib.md5(path.name.encode()).digest()
    permissions = -44
    o = _rc4(hashlib.md5((owner_password + PAD)[:32]).digest()[:5], (user_password + PAD)[:32])
    key = hashlib.md5((user_password + PAD)[:32] + o + struct.pack("<i", permissions) + file_id).digest()[:5]
    u = _rc4(key, PAD)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Count 1 /Kids [3 0 R] >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>",
               b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>" % (o.hex().encode(), u.hex().encode(),
                                                                            permissions)]
    path.write_bytes(_pdf(objects, b"/Encrypt 4 0 R /ID [<%s> <%s>] " % (file_id.hex().encode(),
                                                                          file_id.hex().encode())))
    return path


def jpeg_claiming(path: Path, width: int, height: int) -> Path:
    """A JPEG whose frame header (SOF0) claims width x height grey pixels."""
    sof = struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0])
    dqt = bytes([0]) + bytes([1] * 64)
    sos = bytes([1, 1, 0x00, 0, 63, 0])
    def seg(marker: int, data: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(data) + 2) + data
    path.write_bytes(b"\xff\xd8" + seg(0xDB, dqt) + seg(0xC0, sof) + seg(0xDA, sos) + b"\x00" * 64 + b"\xff\xd9")
    return path


DOCX_TYPES = (b'<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
              b'<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
              b'<Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" '
              b'ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/>'
              b'</Types>')
DOCX_RELS = (b'<?xml version="1.0"?>'
             b'<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
             b'<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/'
             b'officeDocument" Target="word/document.xml"/></Relationships>')
MIB = 1 << 20


def _zeros_deflated(mib: int) -> tuple[bytes, int]:
    """A raw deflate stream of `mib` MiB of zeros and its CRC-32, made in milliseconds:
    after a full flush deflate starts afresh, so one flushed MiB repeats byte for byte."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(MIB)) + c.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    zero = bytes(MIB)
    for _ in range(mib):
        crc = zlib.crc32(zero, crc)
    return block * mib + c.flush(zlib.Z_FINISH), crc


def _zip(path: Path, members: list[tuple[bytes, bytes, int, int, int]]) -> Path:
    """A zip written by hand: (name, data, method, crc, declared size) per member, so
    the declared size can lie."""
    out = bytearray()
    central = bytearray()
    for name, data, method, crc, size in members:
        offset = len(out)
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0x21, crc, len(data), size, len(name), 0)
        out += b"PK\x03\x04" + fields + name + data
        central += (b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, offset)
                    + name)
    end = struct.pack("<HHHHIIH", 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + b"PK\x05\x06" + end))
    return path


def _stored(name: bytes, data: bytes) -> tuple[bytes, bytes, int, int, int]:
    return name, data, 0, zlib.crc32(data), len(data)


def zip_bomb_docx(path: Path, mib: int = 1024) -> Path:
    """A .docx whose document.xml is `mib` MiB of zeros, honestly declared: ~1 KiB per MiB on disk."""
    data, crc = _zeros_deflated(mib)
    return _zip(path, [_stored(b"[Content_Types].xml", DOCX_TYPES), _stored(b"_rels/.rels", DOCX_RELS),
                       (b"word/document.xml", data, 8, crc, mib * MIB)])


def lying_docx(path: Path, mib: int = 256, claimed: int = 1000) -> Path:
    """A .docx whose document.xml declares `claimed` bytes but inflates to `mib` MiB."""
    data, crc = _zeros_deflated(mib)
    return _zip(path, [_stored(b"[Content_Types].xml", DOCX_TYPES), _stored(b"_rels/.rels", DOCX_RELS),
                       (b"word/document.xml", data, 8, crc, claimed)])


def dense_xml_docx(path: Path, mib: int = 24) -> Path:
    """A .docx of `mib` MiB of empty paragraphs: ~60 KB on disk, an XML tree of
    gigabytes (python-docx took 190 s and 1.5 GB for 40 MiB before max_zip_ratio)."""
    body = (b'<?xml version="1.0"?><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/'
            b'main"><w:body>' + b"<w:p/>" * (mib * MIB // 6) + b"</w:body></w:document>")
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = c.compress(body) + c.flush()
    return _zip(path, [_stored(b"[Content_Types].xml", DOCX_TYPES), _stored(b"_rels/.rels", DOCX_RELS),
                       (b"word/document.xml", data, 8, zlib.crc32(body), len(body))])


class MemorySampler(threading.Thread):
    """The resident memory of each named process and everything under it (an OCR pool
    and its tesseracts), summed, every `interval_s`; `peaks` holds the highest sums
    seen. A sum over a tree counts shared pages twice: an upper bound of what the
    unit's cgroup is charged for (which MemoryMax= limits)."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.2) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.pids = pids
        self.interval_s = interval_s
        self.peaks: dict[str, int] = dict.fromkeys(pids, 0)
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            for name, pid in self.pids.items():
                self.peaks[name] = max(self.peaks[name], tree_rss(pid))
            self.samples += 1

    def stop(self) -> dict[str, int]:
        self._done.set()
        self.join(5)
        return self.peaks


PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(pid: int) -> int:
    """Bytes resident in `pid` and its descendants now (0 for processes already gone)."""
    total, todo, seen = 0, [pid], set[int]()
    while todo and len(seen) < 1000:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def high_water(pid: int) -> int:
    """VmHWM: the most memory `pid` itself ever had resident, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def unit_memory_max(unit: Path) -> int:
    """MemoryMax= of a systemd unit file, in bytes."""
    for line in unit.read_text().splitlines():
        if line.startswith("MemoryMax="):
            value = line.split("=", 1)[1].strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(value[-1:], 1)
            return int(value.rstrip("KMGT")) * scale
    raise AssertionError(f"{unit} has no MemoryMax=")
