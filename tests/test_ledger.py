"""daemons/ledger on real SQLite files: batched writes that survive threads, outages and
close(); usage reports with known numbers; API keys and their secret."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemons.ledger import (CallRecord, KeyStore, Ledger, SecretError, load_secret, open_keys, open_ledger,
                            parse_since, totals, usage)
from daemons.store import Database


def ts(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> float:
    return datetime(y, mo, d, h, mi, s, tzinfo=UTC).timestamp()


def call(request_id: str = "r", *, at: float = 1_000.0, principal: str = "alice", model: str = "m",
         provider: str = "local", served_by: str | None = None, cost: float = 0.01, status: int = 200,
         prompt: int | None = 10, completion: int | None = 5, cached: int | None = 0, ttft: float | None = 0.1,
         duration: float = 1.0, error: str | None = None) -> CallRecord:
    return CallRecord(request_id=request_id, at=at, principal=principal, principal_class="interactive", model=model,
                      provider=provider, served_by=served_by or model, kind="chat", prompt_tokens=prompt,
                      completion_tokens=completion, cached_tokens=cached, cost=cost, ttft_s=ttft,
                      duration_s=duration, status=status, error=error)


def request_ids(path: Path) -> list[str]:
    db = open_ledger(path, readonly=True)
    try:
        return [str(r[0]) for r in db.all("SELECT request_id FROM calls ORDER BY id")]
    finally:
        db.close()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


# ---- writing ---------------------------------------------------------------------------


def test_record_before_open_is_written_in_batches_of_batch(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db", flush_s=60, batch=10)
    assert not (tmp_path / "ledger.db").exists()  # __init__ does no I/O
    for i in range(25):
        ledger.record(call(f"r{i}"))
    assert ledger.pending() == 25
    ledger.open()
    assert ledger.flush()
    assert (ledger.written, ledger.batches, ledger.pending()) == (25, 3, 0)  # 10 + 10 + 5
    ledger.close()
    assert request_ids(tmp_path / "ledger.db") == [f"r{i}" for i in range(25)]


def test_a_full_batch_is_written_at_once_a_partial_one_after_flush_s(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db", flush_s=60, batch=10)
    ledger.open()
    for i in range(9):
        ledger.record(call(f"a{i}"))
    time.sleep(0.2)
    assert ledger.written == 0  # neither a full batch nor flush_s yet
    ledger.record(call("a9"))
    assert wait_for(lambda: ledger.written == 10)
    ledger.close()

    quick = Ledger(tmp_path / "quick.db", flush_s=0.05, batch=1000)
    quick.open()
    for i in range(3):
        quick.record(call(f"q{i}"))
    assert wait_for(lambda: quick.written == 3)  # the timer alone, no flush()
    quick.close()
    assert request_ids(tmp_path / "quick.db") == ["q0", "q1", "q2"]


def test_an_awaited_row_is_committed_at_once_and_calls_ending_together_share_a_commit(tmp_path: Path) -> None:
    # flush_s=60: only the awaiting callers wake the writer.
    ledger = Ledger(tmp_path / "ledger.db", flush_s=60, batch=500)
    ledger.open()

    async def answer(i: int) -> bool:
        return await ledger.committed(ledger.record(call(f"w{i}")), timeout=5)

    async def all_of_them() -> list[bool]:
        return await asyncio.gather(*(answer(i) for i in range(200)))

    started = time.monotonic()
    assert asyncio.run(all_of_them()) == [True] * 200
    assert time.monotonic() - started < 5
    assert ledger.written == 200 and ledger.batches < 200  # grouped, not one commit per call
    # Committed means on disk for another connection, before close() writes anything.
    assert sorted(request_ids(tmp_path / "ledger.db")) == sorted(f"w{i}" for i in range(200))
    ledger.close()


def test_a_failing_ledger_does_not_hold_answers_and_keeps_their_rows(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = Ledger(path, flush_s=0.05, batch=5, busy_timeout_ms=20)
    ledger.open()
    other = Database(path)
    other.execute("BEGIN EXCLUSIVE")
    first = asyncio.run(ledger.committed(ledger.record(call("f0")), timeout=10))
    assert first is False  # told when the commit failed, not after the timeout
    started = time.monotonic()
    assert asyncio.run(ledger.committed(ledger.record(call("f1")), timeout=10)) is False
    assert time.monotonic() - started < 0.5  # failing: no wait at all
    other.execute("COMMIT")
    other.close()
    assert ledger.flush(timeout=5)
    ledger.close()
    assert request_ids(path) == ["f0", "f1"]


def test_records_from_many_threads_land_exactly_once(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db", flush_s=0.01, batch=100)
    ledger.open()
    threads, per = 8, 1500
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        start.wait()
        for i in range(per):
            ledger.record(call(f"t{t}-{i}", principal=f"p{t}", cost=0.5))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    ledger.close()
    ids = request_ids(tmp_path / "ledger.db")
    assert len(ids) == threads * per and set(ids) == {f"t{t}-{i}" for t in range(threads) for i in range(per)}
    assert ledger.written == threads * per and ledger.pending() == 0
    # Each thread's rows keep their order: one deque, appended under one lock.
    for t in range(threads):
        mine = [i for i in ids if i.startswith(f"t{t}-")]
        assert mine == [f"t{t}-{i}" for i in range(per)]


def test_close_writes_what_is_pending_and_says_how_many(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ledger = Ledger(tmp_path / "ledger.db", flush_s=60, batch=1000)
    ledger.open()
    for i in range(50):
        ledger.record(call(f"c{i}"))
    assert ledger.pending() == 50 and ledger.written == 0
    with caplog.at_level(logging.INFO, logger="daemons.ledger.write"):
        ledger.close()
    assert len(request_ids(tmp_path / "ledger.db")) == 50
    assert "wrote 50 calls in total" in caplog.text
    with caplog.at_level(logging.ERROR, logger="daemons.ledger.write"):
        ledger.record(call("late"))  # after close: refused loudly, not queued
    assert "late" in caplog.text and ledger.pending() == 0


def test_a_locked_database_keeps_the_rows_until_it_is_free(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ledger.db"
    ledger = Ledger(path, flush_s=0.05, batch=5, busy_timeout_ms=20)
    ledger.open()
    other = Database(path)  # another process holding the write lock
    other.execute("BEGIN EXCLUSIVE")
    with caplog.at_level(logging.ERROR, logger="daemons.ledger.write"):
        for i in range(12):
            ledger.record(call(f"l{i}"))
        assert not ledger.flush(timeout=0.5)  # ~10 tries meanwhile
        assert ledger.pending() == 12 and ledger.written == 0
        errors = [r for r in caplog.records if "cannot write" in r.getMessage()]
        assert len(errors) == 1, "one error per distinct cause, not one per retry"
        assert "Busy" in errors[0].getMessage() or "locked" in errors[0].getMessage()
        other.execute("COMMIT")
        assert ledger.flush(timeout=5)
    assert ledger.pending() == 0 and ledger.written == 12
    ledger.close()
    other.close()
    assert request_ids(path) == [f"l{i}" for i in range(12)]


def test_a_row_the_database_cannot_take_is_skipped_loudly_not_wedging_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ledger = Ledger(tmp_path / "ledger.db", flush_s=60, batch=100)
    ledger.open()
    ledger.record(call("good1"))
    ledger.record(call("bad", prompt={"not": "an int"}))  # type: ignore[arg-type]
    ledger.record(call("good2"))
    with caplog.at_level(logging.ERROR, logger="daemons.ledger.write"):
        assert ledger.flush()
    assert "bad" in caplog.text
    assert (ledger.written, ledger.rejected) == (2, 1)
    ledger.close()
    assert request_ids(tmp_path / "ledger.db") == ["good1", "good2"]


def test_spend_by_principal(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.open()
    for rec in (call("1", at=100, principal="a", cost=1.0), call("2", at=200, principal="a", cost=2.5),
                call("3", at=200, principal="b", cost=0.25), call("4", at=50, principal="c", cost=9.0)):
        ledger.record(rec)
    assert ledger.flush()
    assert ledger.spend_by_principal(100) == pytest.approx({"a": 3.5, "b": 0.25})
    assert ledger.spend_by_principal(150) == pytest.approx({"a": 2.5, "b": 0.25})
    assert ledger.spend_by_principal(1e12) == {}
    ledger.close()


# ---- usage -----------------------------------------------------------------------------

D1 = ts(2026, 11, 1)
D2 = ts(2026, 11, 2)


@pytest.fixture
def ledger_db(tmp_path: Path) -> Iterator[Database]:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.open()
    for rec in (
        call("a1", at=D1 + 10 * 3600, principal="alice", model="small", provider="local", cost=0.5, prompt=10,
             completion=5, cached=0, ttft=0.1, duration=1.0),
        call("a2", at=D1 + 11 * 3600, principal="alice", model="big", provider="openai", served_by="big-2",
             cost=1.5, status=500, prompt=None, completion=None, cached=None, ttft=None, duration=0.2,
             error="upstream 500"),
        call("b1", at=D2 + 9 * 3600, principal="bob", model="small", provider="local", cost=0.25, prompt=100,
             completion=50, cached=20, ttft=0.3, duration=2.0),
        call("old", at=D1 - 1, principal="bob", model="big", provider="openai", cost=9.0),  # the day before
    ):
        ledger.record(rec)
    ledger.close()
    db = open_ledger(tmp_path / "ledger.db", readonly=True)
    yield db
    db.close()


def test_usage_by_principal(ledger_db: Database) -> None:
    rows = usage(ledger_db, D1, None, "principal")
    assert rows == [
        {"principal": "alice", "calls": 2, "errors": 1, "prompt_tokens": 10, "completion_tokens": 5,
         "cached_tokens": 0, "cost": pytest.approx(2.0), "avg_ttft_s": pytest.approx(0.1),
         "avg_duration_s": pytest.approx(0.6)},
        {"principal": "bob", "calls": 1, "errors": 0, "prompt_tokens": 100, "completion_tokens": 50,
         "cached_tokens": 20, "cost": pytest.approx(0.25), "avg_ttft_s": pytest.approx(0.3),
         "avg_duration_s": pytest.approx(2.0)},
    ]
    # Everything: bob's old call makes him the costliest.
    assert [(r["principal"], r["cost"]) for r in usage(ledger_db, None, None, "principal")] == [
        ("bob", pytest.approx(9.25)), ("alice", pytest.approx(2.0))]


def test_usage_by_model_provider_and_day(ledger_db: Database) -> None:
    by_model = usage(ledger_db, D1, None, "model")
    assert [(r["model"], r["calls"], r["cost"]) for r in by_model] == [
        ("big", 1, pytest.approx(1.5)), ("small", 2, pytest.approx(0.75))]
    by_provider = usage(ledger_db, D1, None, "provider")
    assert [(r["provider"], r["calls"], r["errors"], r["prompt_tokens"]) for r in by_provider] == [
        ("openai", 1, 1, 0), ("local", 2, 0, 110)]
    assert by_provider[0]["avg_ttft_s"] is None  # no call there had a first token
    by_day = usage(ledger_db, None, None, "day")
    assert [(r["day"], r["calls"], r["cost"]) for r in by_day] == [
        ("2026-10-31", 1, pytest.approx(9.0)), ("2026-11-01", 2, pytest.approx(2.0)),
        ("2026-11-02", 1, pytest.approx(0.25))]
    # until is exclusive: day 1 alone.
    assert [r["day"] for r in usage(ledger_db, D1, D2, "day")] == ["2026-11-01"]
    with pytest.raises(ValueError, match="expected one of"):
        usage(ledger_db, None, None, "colour")  # type: ignore[arg-type]


def test_totals(ledger_db: Database) -> None:
    t = totals(ledger_db, D1, None)
    assert t == {"calls": 3, "errors": 1, "prompt_tokens": 110, "completion_tokens": 55, "cached_tokens": 20,
                 "cost": pytest.approx(2.25), "avg_ttft_s": pytest.approx(0.2),
                 "avg_duration_s": pytest.approx(3.2 / 3)}
    empty = totals(ledger_db, D2 + 86400, None)
    assert empty == {"calls": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0,
                     "cost": 0.0, "avg_ttft_s": None, "avg_duration_s": None}


# ---- parse_since -----------------------------------------------------------------------

NOW = ts(2026, 11, 5, 15, 30)


@pytest.mark.parametrize(("text", "expected"), [
    ("today", ts(2026, 11, 5)),
    (" Today ", ts(2026, 11, 5)),
    ("yesterday", ts(2026, 11, 4)),
    ("7d", NOW - 7 * 86400),
    ("24h", NOW - 86400),
    ("30m", NOW - 1800),
    ("90s", NOW - 90),
    ("2w", NOW - 14 * 86400),
    ("2026-11-01", ts(2026, 11, 1)),
    ("2026-11-01T09:30", ts(2026, 11, 1, 9, 30)),
    ("2026-11-01 09:30:15", ts(2026, 11, 1, 9, 30, 15)),
    ("2026-11-01T09:30Z", ts(2026, 11, 1, 9, 30)),
    ("2026-11-01T09:30+02:00", ts(2026, 11, 1, 7, 30)),
])
def test_parse_since(text: str, expected: float) -> None:
    assert parse_since(text, NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "soon", "7x", "-3d", "d", "1.5h", "20261101", "2026-13-01",
                                  "2026-11-01T25:00", "last week"])
def test_parse_since_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        parse_since(text, NOW)


# ---- keys ------------------------------------------------------------------------------


@pytest.fixture
def secret(tmp_path: Path) -> bytes:
    return load_secret(tmp_path / "keys.secret")


def test_create_then_authenticate(tmp_path: Path, secret: bytes, caplog: pytest.LogCaptureFixture) -> None:
    store = KeyStore(open_keys(tmp_path / "keys.db"), secret)
    with caplog.at_level(logging.DEBUG):
        info, key = store.create("alice", "laptop")
        assert store.authenticate(key) == info
    assert key.startswith(f"ob-{info.id}-") and len(info.id) == 8 and key.endswith(info.last4)
    assert (info.principal, info.name, info.revoked_at) == ("alice", "laptop", None)
    assert key not in caplog.text and key.split("-", 2)[2] not in caplog.text and info.id in caplog.text
    pub = info.public()
    assert pub["id"] == info.id and pub["revoked"] is False
    assert not any(key.split("-", 2)[2] in str(v) for v in pub.values()) and "hash" not in pub
    assert store.get(info.id) == info and store.get("00000000") is None
    other_info, other_key = store.create("bob")
    assert other_key != key and store.authenticate(other_key) == other_info
    assert [k.id for k in store.list()] == [info.id, other_info.id]


def test_wrong_malformed_and_foreign_keys_are_refused(tmp_path: Path, secret: bytes) -> None:
    store = KeyStore(open_keys(tmp_path / "keys.db"), secret)
    info, key = store.create("alice")
    secret_part = key.split("-", 2)[2]
    flipped = secret_part[:-1] + ("A" if secret_part[-1] != "A" else "B")
    for bad in (f"ob-{info.id}-{flipped}",  # right id, wrong secret
                f"ob-{'0' * 8 if info.id != '0' * 8 else '1' * 8}-{secret_part}",  # right secret, wrong id
                "", "ob-", "ob-xyz", key + "x", key[:-1], " " + key, key.upper(), f"Bearer {key}",
                f"ob-{info.id}{secret_part}", f"ob-{info.id}--{secret_part}"):
        assert store.authenticate(bad) is None, bad
    # The same key text checked under another server secret: unknown.
    foreign = KeyStore(open_keys(tmp_path / "keys.db"), os.urandom(32))
    assert foreign.authenticate(key) is None
    assert store.authenticate(key) == info


def test_revoke_from_another_connection_is_seen_at_once(tmp_path: Path, secret: bytes) -> None:
    router = KeyStore(open_keys(tmp_path / "keys.db", readonly=False), secret)
    command = KeyStore(open_keys(tmp_path / "keys.db"), secret)  # `onebox keys`, another process
    info, key = command.create("alice", "ci")
    assert router.authenticate(key) == info  # created elsewhere: seen on the next call
    assert router.authenticate(key) == info  # (and from the cache)
    revoked = command.revoke(info.id)
    assert revoked is not None and revoked.revoked_at is not None
    assert router.authenticate(key) is None
    again = command.revoke(info.id)
    assert again == revoked  # twice is fine, the first time stays
    assert router.revoke("ffffffff" if info.id != "ffffffff" else "eeeeeeee") is None
    assert router.list() == [] and router.list(include_revoked=True) == [revoked]
    # Revoked by the router's own connection: its own commits do not move data_version.
    info2, key2 = router.create("bob")
    assert router.authenticate(key2) == info2
    router.revoke(info2.id)
    assert router.authenticate(key2) is None


def test_principal_and_name_are_checked(tmp_path: Path, secret: bytes) -> None:
    store = KeyStore(open_keys(tmp_path / "keys.db"), secret)
    for bad in ("", "a b", "x" * 65, "al/ice", "ünï"):
        with pytest.raises(ValueError, match="principal"):
            store.create(bad)
    with pytest.raises(ValueError, match="name"):
        store.create("alice", "line\nbreak")
    assert store.create("unix:alice@host_1.x-y")[0].principal == "unix:alice@host_1.x-y"


def test_keys_db_never_holds_the_key(tmp_path: Path, secret: bytes) -> None:
    db = open_keys(tmp_path / "keys.db")
    store = KeyStore(db, secret)
    made = [store.create(f"p{i}") for i in range(20)]
    files = sorted(tmp_path.glob("keys.db*"))  # the database and its WAL, before and after a checkpoint
    blobs = [f.read_bytes() for f in files]
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    blobs.append((tmp_path / "keys.db").read_bytes())
    assert any(info.id.encode() in blobs[-1] for info, _ in made)  # the scan does look at the data
    for _, key in made:
        for needle in (key.encode(), key.split("-", 2)[2].encode()):
            assert not any(needle in b for b in blobs)


def test_secret_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys.secret"
    first = load_secret(path)
    assert len(first) == 32
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_secret(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["keys.secret"]  # no temporary left behind


def test_a_secret_others_can_read_or_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.secret"
    load_secret(path)
    os.chmod(path, 0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        load_secret(path)
    os.chmod(path, 0o640)
    with pytest.raises(SecretError, match="group or others"):
        load_secret(path)
    short = tmp_path / "short.secret"
    fd = os.open(short, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"x" * 16)
    os.close(fd)
    with pytest.raises(SecretError, match="exactly 32 bytes"):
        load_secret(short)
    with pytest.raises(SecretError, match="at least 32 bytes"):
        KeyStore(open_keys(tmp_path / "keys.db"), b"short")
