"""Faults under load, one round (tests/faults/drill.py; `scripts/faults` is the long
variant): under chat, streamed chat, RAG, embedding, search and OCR traffic with
ingestion busy, each daemon is killed with SIGKILL and restarted, and the inference
daemon is SIGSTOPped past its liveness. No request may hang past its deadline, every
error is a clear HTTP error (a dead router's clients see their connection fail), each
daemon's kind of request works again on its own once it is back, and no document or
ledger row is lost or written twice."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.faults import drill


# While the router is down, httpcore's Unix-socket connect leaks the socket it failed to
# connect (closed by the garbage collector, with a ResourceWarning): the test client's
# leak, not a daemon's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.timeout(900)
def test_kill_and_stop_each_daemon_under_load() -> None:
    users = {"chat": 2, "stream": 2, "rag": 1, "embed": 1, "search": 1, "ocr": 1}
    with tempfile.TemporaryDirectory(prefix="onebox-") as d, drill.full_suite(Path(d)) as suite:
        report = drill.run(suite, users, rounds=1, calm_s=3.0, stop_s=4.0)
        print("\n".join(report.lines()))
        assert not report.stuck_users, report.stuck_users
        assert not report.hung, report.hung[:5]
        assert not report.unexplained, report.unexplained[:5]
        for fault in report.faults:
            assert fault.recovered is not None, f"{fault.how} {fault.daemon}: never recovered"
        assert all(report.alive.values()), report.alive
        docs = report.documents
        assert docs["states"] == {"indexed": docs["dropped"]}, docs["quarantined"]
        assert docs["documents"] == docs["dropped"] and docs["duplicate_chunks"] == 0
        assert docs["chunks"] == docs["vectors"] and docs["empty_documents"] == 0
        assert docs["integrity"] == "ok"
        ledger = report.ledger
        assert ledger["answered"] > 0 and not ledger["missing"] and not ledger["duplicated"], ledger
        assert ledger["integrity"] == "ok"
        # Each kind of request succeeded again after every fault.
        assert report.totals["ok"] > 30
