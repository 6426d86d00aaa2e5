"""Faults under load: the whole suite serves chat, RAG, search, embedding and OCR traffic
while ingestion is busy, and each daemon in turn is killed with SIGKILL (then restarted,
as systemd or the person running `onebox up` would) or stopped with SIGSTOP for longer
than its liveness (a hung process, not a dead one). What every request saw is recorded,
so the checks and the report can say per fault: which errors, whether any request hung
past its deadline, how long until that daemon's kind of request worked again, and
whether a document or a ledger row was lost or written twice.

tests/faults/test_faults_under_load.py runs one round in CI; `scripts/faults` runs the
long variant (more rounds, more users) and prints the figures and a JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from daemons.index.schema import MIGRATIONS as INDEX_MIGRATIONS
from daemons.ledger import open_ledger
from daemons.store import Database
from tests.harness import Suite, write_config
from tests.ocr_docs import PAGES, scan
from tests.test_ingest import files

EMBED_GGUF = "all_minilm_l6_v2/all-MiniLM-L6-v2.f16.gguf"
DEADLINE_S = 20.0  # each request's X-Request-Timeout
SLACK_S = 3.0  # past DEADLINE_S + SLACK_S a request hung
KILLED = ("router", "infer", "embed", "ocr", "ingest")
# What proves each daemon is back: a request of that kind succeeding after the fault.
PROBES = {"router": ("chat", "embed", "search"), "infer": ("chat",), "embed": ("embed",), "ocr": ("ocr",),
          "ingest": ("ingested",)}
LEDGERED = ("chat", "stream", "rag", "embed")  # kinds that write a ledger row


def config_text(root: Path) -> str:
    return (f'[embeddings.minilm]\npath = "{EMBED_GGUF}"\nthreads = 1\n'
            "[ocr]\nworkers = 1\n"
            "[ingest]\nsettle_s = 0.3\nbackoff_s = 0.2\nbackoff_max_s = 2.0\nmax_attempts = 5\n"
            "chunk_tokens = 96\nchunk_overlap = 8\n"
            f'[collections.docs]\nfolder = "{root / "inbox" / "docs"}"\n')


@dataclass
class Outcome:
    kind: str
    started: float
    ended: float
    ok: bool
    status: int | None = None  # HTTP status; None when the connection failed
    error: str = ""  # "" when ok; else what the client saw
    request_id: str | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def classify(r: httpx.Response) -> str:
    """An error response as a short label; 'no OpenAI error body' is itself a finding."""
    try:
        err = r.json()["error"]
        return f"{r.status_code} {err.get('code') or err['type']}"
    except (ValueError, KeyError, TypeError):
        return f"{r.status_code} no OpenAI error body"


class Load:
    """Users, each a thread looping over one kind of request until stopped."""

    def __init__(self, suite: Suite, users: dict[str, int], think_s: float = 0.3) -> None:
        self.suite = suite
        self.think_s = think_s
        self.users = users
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        png = io.BytesIO()
        scan(PAGES[0]).save(png, format="PNG", dpi=(300, 300))
        self.png = png.getvalue()

    def start(self) -> None:
        for kind, count in self.users.items():
            for i in range(count):
                t = threading.Thread(target=self._user, args=(kind, i), name=f"load-{kind}-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def finish(self, timeout: float = DEADLINE_S + 2 * SLACK_S) -> list[str]:
        """Stop the users; the names of any still stuck after `timeout` (a hang)."""
        self.stop.set()
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]

    def add(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def _user(self, kind: str, i: int) -> None:
        transport = httpx.HTTPTransport(uds=str(self.suite.api_socket))
        # The client's own timeout is past the deadline: the router must answer first.
        with httpx.Client(transport=transport, base_url="http://onebox", timeout=DEADLINE_S + SLACK_S,
                          headers={"X-Request-Timeout": str(DEADLINE_S)}) as c:
            n = 0
            while not self.stop.is_set():
                n += 1
                started = time.monotonic()
                try:
                    outcome = getattr(self, f"_{kind}")(c, f"{kind}{i}-{n}")
                except httpx.TimeoutException as exc:
                    outcome = Outcome(kind, started, 0.0, False, None, f"client timeout ({type(exc).__name__})")
                except httpx.TransportError as exc:
                    outcome = Outcome(kind, started, 0.0, False, None, f"connection: {type(exc).__name__}")
                outcome.started, outcome.ended = started, time.monotonic()
                self.add(outcome)
                # A person's pause between requests; a failed one is retried a little later.
                self.stop.wait(self.think_s if outcome.ok else 2 * self.think_s)

    def _answer(self, kind: str, r: httpx.Response) -> Outcome:
        rid = r.headers.get("x-request-id")
        if r.status_code == 200:
            return Outcome(kind, 0, 0, True, 200, "", rid)
        return Outcome(kind, 0, 0, False, r.status_code, classify(r), rid)

    def _chat(self, c: httpx.Client, tag: str) -> Outcome:
        body = {"model": "smollm2", "max_tokens": 12, "temperature": 0.7,
                "messages": [{"role": "user", "content": f"Say something short about the number {tag}."}]}
        return self._answer("chat", c.post("/v1/chat/completions", json=body))

    def _rag(self, c: httpx.Client, tag: str) -> Outcome:
        body = {"model": "smollm2", "max_tokens": 12, "rag": {"collection": "docs", "k": 3},
                "messages": [{"role": "user", "content": "Which harbour did the ferry leave from?"}]}
        return self._answer("rag", c.post("/v1/chat/completions", json=body))

    def _stream(self, c: httpx.Client, tag: str) -> Outcome:
        body = {"model": "smollm2", "max_tokens": 12, "stream": True,
                "messages": [{"role": "user", "content": f"Count to five ({tag})."}]}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return self._answer("stream", r)
            rid = r.headers.get("x-request-id")
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    return Outcome("stream", 0, 0, True, 200, "", rid)
                if line.startswith("data: ") and '"error"' in line[:20]:
                    err = json.loads(line[6:])["error"]
                    return Outcome("stream", 0, 0, False, 200, f"stream error {err.get('code') or err['type']}", rid)
            return Outcome("stream", 0, 0, False, 200, "stream ended without [DONE]", rid)

    def _embed(self, c: httpx.Client, tag: str) -> Outcome:
        body = {"model": "minilm", "input": [f"passage {tag} about ferries", "another short passage"]}
        return self._answer("embed", c.post("/v1/embeddings", json=body))

    def _search(self, c: httpx.Client, tag: str) -> Outcome:
        return self._answer("search", c.post("/v1/search", json={"query": "ferry harbour timetable", "k": 3}))

    def _ocr(self, c: httpx.Client, tag: str) -> Outcome:
        out = self._answer("ocr", c.post("/v1/ocr", content=self.png, headers={"Content-Type": "image/png"}))
        self.stop.wait(1.0)  # OCR is heavy: a page every second or two is plenty
        return out


class Dropper:
    """Drops a new, distinct text file into the inbox at a steady pace."""

    def __init__(self, folder: Path, every_s: float = 1.5) -> None:
        self.folder = folder
        self.every_s = every_s
        self.dropped: list[tuple[Path, float]] = []
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dropper", daemon=True)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def finish(self) -> None:
        self.stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            path = self.folder / f"log{n:05d}.md"
            words = " ".join(f"entry{n}w{j}" for j in range(25))
            tmp = path.with_suffix(".part")
            tmp.write_text(f"# Harbour log {n}\n\nThe ferry left harbour {n % 7} on time. {words}\n")
            os.rename(tmp, path)  # whole files only; half-written ones are another test's business
            self.dropped.append((path, time.monotonic()))
            self.stop.wait(self.every_s)


def indexed(suite: Suite) -> int:
    return sum(1 for r in files(suite).values() if r["state"] == "indexed")


def progress_at(suite: Suite, timeout: float) -> float | None:
    """When one more file than now was seen indexed (monotonic), or None. Under chat load
    ingestion yields to inference (up to [ingest] max_yield_s), so this can take a while."""
    before = indexed(suite)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if indexed(suite) > before:
            return time.monotonic()
        time.sleep(0.2)
    return None


@dataclass
class Fault:
    daemon: str
    how: str  # "kill" or "stop"
    at: float = 0.0
    restarted: float = 0.0  # a new process READY (kill), SIGCONT sent (stop)
    recovered: float | None = None
    until: float = 0.0  # end of the window whose requests belong to this fault
    errors: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    longest_s: float = 0.0

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered is None else self.recovered - self.at

    def summary(self) -> dict[str, Any]:
        return {"daemon": self.daemon, "fault": self.how, "requests": self.requests,
                "errors": dict(self.errors), "longest_s": round(self.longest_s, 2),
                "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 2),
                "restart_s": round(self.restarted - self.at, 2)}


def label(name: str) -> str:
    return {"infer": "infer@smollm2", "embed": "embed@minilm"}.get(name, name)


def start(suite: Suite, name: str) -> None:
    args = {"infer": ("smollm2",), "embed": ("minilm",)}.get(name, ())
    suite.start_daemon(name, *args)


def inject(suite: Suite, load: Load, dropper: Dropper, fault: Fault, stop_s: float, restart_after_s: float) -> None:
    child = suite.children[label(fault.daemon)]
    fault.at = time.monotonic()
    if fault.how == "kill":
        child.signal(signal.SIGKILL)
        end = time.monotonic() + 10
        while child.exit_code() is None and time.monotonic() < end:
            time.sleep(0.02)
        # A supervisor's pause before the restart (systemd: RestartSec=).
        time.sleep(restart_after_s)
        start(suite, fault.daemon)
    else:
        child.signal(signal.SIGSTOP)
        time.sleep(stop_s)
        child.signal(signal.SIGCONT)
    fault.restarted = time.monotonic()
    kinds = PROBES[fault.daemon]
    if kinds == ("ingested",):
        fault.recovered = progress_at(suite, timeout=90)
        return
    end = time.monotonic() + 90
    while time.monotonic() < end:
        with load._lock:
            done = [o for o in load.outcomes if o.kind in kinds and o.ok and o.started >= fault.restarted - 0.001]
        if all(any(o.kind == k for o in done) for k in kinds if load.users.get(k)):
            fault.recovered = min(o.ended for o in done) if done else time.monotonic()
            return
        time.sleep(0.1)


def check_documents(suite: Suite, dropper: Dropper, timeout: float = 180.0) -> dict[str, Any]:
    """Every dropped file indexed once, as one document, its chunks once each."""
    paths = [str(p) for p, _ in dropper.dropped]
    end = time.monotonic() + timeout
    while True:
        rows = files(suite)
        states = Counter(rows.get(p, {}).get("state") for p in paths)
        if states.get("indexed", 0) + states.get("quarantined", 0) == len(paths) or time.monotonic() > end:
            break
        time.sleep(0.3)
    db = Database(suite.dir / "state" / "index.db", readonly=True, migrations=INDEX_MIGRATIONS)
    try:
        integrity = db.value("PRAGMA integrity_check")
        ids = [rows[p]["document_id"] for p in paths if rows.get(p, {}).get("state") == "indexed"]
        dup_chunks = db.value("SELECT count(*) FROM (SELECT document_id, seq FROM chunks "
                              "GROUP BY document_id, seq HAVING count(*) > 1)")
        chunks = db.value("SELECT count(*) FROM chunks")
        vectors = db.value("SELECT count(*) FROM chunk_vectors")
        orphans = db.value("SELECT count(*) FROM documents d WHERE NOT EXISTS "
                           "(SELECT 1 FROM chunks c WHERE c.document_id = d.id)")
    finally:
        db.close()
    return {"dropped": len(paths), "states": dict(states), "documents": len(set(ids)),
            "duplicate_chunks": dup_chunks, "chunks": chunks, "vectors": vectors, "empty_documents": orphans,
            "integrity": integrity,
            "quarantined": {p: rows[p].get("reason") for p in paths if rows.get(p, {}).get("state") == "quarantined"}}


def check_ledger(suite: Suite, outcomes: list[Outcome]) -> dict[str, Any]:
    """Each answered call has exactly one ledger row; no request id twice."""
    db = open_ledger(suite.dir / "state" / "ledger.db", readonly=True)
    try:
        counts = {str(r): int(n) for r, n in db.all("SELECT request_id, count(*) FROM calls GROUP BY request_id")}
        integrity = db.value("PRAGMA integrity_check")
    finally:
        db.close()
    answered = [o.request_id for o in outcomes if o.ok and o.kind in LEDGERED and o.request_id]
    missing = [r for r in answered if counts.get(r, 0) == 0]
    return {"answered": len(answered), "rows": sum(counts.values()), "missing": missing,
            "duplicated": [r for r, n in counts.items() if n > 1], "integrity": integrity}


@contextmanager
def full_suite(root: Path) -> Iterator[Suite]:
    # Liveness 1.5 s (production: 3 s): a SIGSTOP of a few seconds is well past it, and a
    # busy 2-core box does not make a live daemon look dead, as the tests' usual 0.6 s can.
    suite = Suite(root, write_config(root, extra=config_text(root), heartbeat=0.5))
    try:
        suite.start_documents(ready_timeout=90)
        yield suite
    finally:
        suite.stop()


@dataclass
class Report:
    faults: list[Fault]
    hung: list[Outcome]
    stuck_users: list[str]
    unexplained: list[Outcome]  # errors without an OpenAI body, outside a router fault
    documents: dict[str, Any]
    ledger: dict[str, Any]
    alive: dict[str, bool]
    totals: Counter[str]

    def lines(self) -> list[str]:
        out = [f"{'fault':<14}{'requests':>9}{'longest s':>11}{'restart s':>11}{'recovery s':>12}  errors seen"]
        for f in self.faults:
            rec = "never" if f.recovery_s is None else f"{f.recovery_s:.2f}"
            errs = ", ".join(f"{k} x{n}" for k, n in f.errors.most_common()) or "none"
            out.append(f"{f.how + ' ' + f.daemon:<14}{f.requests:>9}{f.longest_s:>11.2f}"
                       f"{f.restarted - f.at:>11.2f}{rec:>12}  {errs}")
        d, lg = self.documents, self.ledger
        out.append(f"requests: {dict(self.totals)}; hung past deadline: {len(self.hung)}; "
                   f"errors without an OpenAI body: {len(self.unexplained)}")
        out.append(f"documents: {d['dropped']} dropped, states {d['states']}, {d['duplicate_chunks']} duplicate "
                   f"chunks, index integrity {d['integrity']}")
        out.append(f"ledger: {lg['answered']} answered calls, {len(lg['missing'])} without a row, "
                   f"{len(lg['duplicated'])} request ids twice, integrity {lg['integrity']}")
        return out

    def json(self) -> dict[str, Any]:
        return {"faults": [f.summary() for f in self.faults], "hung": len(self.hung),
                "unexplained": len(self.unexplained), "requests": dict(self.totals),
                "documents": {k: v for k, v in self.documents.items() if k != "quarantined"},
                "ledger": {"answered": self.ledger["answered"], "missing": len(self.ledger["missing"]),
                           "duplicated": len(self.ledger["duplicated"])}}


def run(suite: Suite, users: dict[str, int], rounds: int = 1, calm_s: float = 4.0, stop_s: float = 3.0,
        restart_after_s: float = 1.0, stopped: tuple[str, ...] = ("infer",)) -> Report:
    dropper = Dropper(suite.dir / "inbox" / "docs")
    load = Load(suite, users)
    dropper.start()
    load.start()
    faults: list[Fault] = []
    try:
        time.sleep(calm_s)
        for _ in range(rounds):
            plan = [Fault(d, "kill") for d in KILLED] + [Fault(d, "stop") for d in stopped]
            for fault in plan:
                inject(suite, load, dropper, fault, stop_s, restart_after_s)
                time.sleep(calm_s)
                fault.until = time.monotonic()
                faults.append(fault)
    finally:
        stuck = load.finish()
        dropper.finish()
    outcomes = list(load.outcomes)
    windows = [(f, faults[i - 1].until if i else 0.0) for i, f in enumerate(faults)]
    for o in outcomes:
        for f, since in windows:
            if since <= o.started < f.until:
                f.requests += 1
                f.longest_s = max(f.longest_s, o.seconds)
                if not o.ok:
                    f.errors[f"{o.kind}: {o.error}"] += 1
                break
    hung = [o for o in outcomes if o.seconds > DEADLINE_S + SLACK_S or "client timeout" in o.error]
    # A dead router cannot answer: its clients see the connection fail. Anything else
    # must be a clear HTTP error.
    router_down = [(f.at, f.restarted + 1.0) for f in faults if f.daemon == "router"]
    unexplained = [o for o in outcomes if not o.ok and ("no OpenAI" in o.error or (
        o.status is None and not any(a <= o.ended and o.started <= b for a, b in router_down)))]
    alive = {name: child.exit_code() is None for name, child in suite.children.items()}
    return Report(faults, hung, stuck, unexplained, check_documents(suite, dropper), check_ledger(suite, outcomes),
                  alive, Counter("ok" if o.ok else "error" for o in outcomes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/faults", description=(
        "Faults under load: run the whole suite in a temp dir under chat, RAG, search, embedding and OCR "
        "traffic with ingestion busy, kill -9 each daemon in turn and SIGSTOP the inference daemon past "
        "its liveness; print per fault the errors seen and the recovery time, then the document and "
        "ledger checks, and a JSON line."))
    parser.add_argument("--rounds", type=int, default=3, help="times through every fault (default 3)")
    parser.add_argument("--users", type=int, default=8, help="chat users (default 8; plus RAG, stream, "
                        "embed, search and OCR users)")
    parser.add_argument("--calm", type=float, default=6.0, help="seconds of plain load around each fault")
    parser.add_argument("--stop", type=float, default=5.0, help="seconds a SIGSTOPped daemon stays stopped")
    args = parser.parse_args(argv)
    users = {"chat": args.users, "stream": max(1, args.users // 2), "rag": max(1, args.users // 4),
             "embed": 2, "search": 2, "ocr": 1}
    with tempfile.TemporaryDirectory(prefix="onebox-faults-") as d, full_suite(Path(d)) as suite:
        report = run(suite, users, rounds=args.rounds, calm_s=args.calm, stop_s=args.stop,
                     stopped=("infer", "embed"))
        for line in report.lines():
            print(line)
        print(json.dumps({"bench": "faults", **report.json()}))
    bad = report.hung or report.unexplained or report.ledger["missing"] or report.ledger["duplicated"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
