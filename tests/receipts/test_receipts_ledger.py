"""The ledger: hash chain, billed-once idempotence, replay cache, acknowledgments, recovery."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest
from receipts_helpers import CLIENT, OTHER_CLIENT, WORKER, bill, job_digest, job_id, outcome

from dspark.v1.receipt_pb2 import Receipt
from node.envelope import digest
from node.identity import Identity
from node.ledger import LEDGER_FILE, Ledger, LedgerError
from node.ledger_audit import audit_ledger
from node.receipts import GENESIS_DIGEST, acknowledgment, verify_receipt


def test_durability_settings(ledger):
    conn = ledger._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_receipts_form_a_hash_chain_from_sequence_one(ledger):
    envelopes = [bill(ledger, n) for n in range(4)]
    receipts = [Receipt.FromString(e.payload) for e in envelopes]
    assert [r.sequence for r in receipts] == [1, 2, 3, 4]
    assert receipts[0].previous_receipt_digest == GENESIS_DIGEST
    for before, receipt in zip(envelopes, receipts[1:]):
        assert receipt.previous_receipt_digest == digest(before)
    assert audit_ledger(ledger).ok


def test_a_job_id_is_admitted_once_per_client(ledger):
    assert ledger.register_job(CLIENT.public_key, job_id(1), job_digest(CLIENT, 1), 0)
    assert not ledger.register_job(CLIENT.public_key, job_id(1), job_digest(CLIENT, 1), 0)
    # The same job id from another client is another job.
    assert ledger.register_job(OTHER_CLIENT.public_key, job_id(1), job_digest(OTHER_CLIENT, 1), 0)


def test_replay_cache_survives_a_restart(data_dir, ledger):
    bill(ledger, 1)
    ledger.close()
    reopened = Ledger.open(data_dir / LEDGER_FILE, WORKER)
    assert not reopened.register_job(CLIENT.public_key, job_id(1), job_digest(CLIENT, 1), 0)
    reopened.close()


def test_duplicate_submissions_are_billed_once(ledger):
    first = bill(ledger, 1)
    # A retried submission: refused by the replay cache, and finishing it again returns the same receipt.
    again = bill(ledger, 1, output_ids=(1, 2, 3, 4, 5, 6), price_mtok=10**9)
    assert again == first
    with ThreadPoolExecutor(4) as pool:  # concurrent finishes of one job (the service uses threads)
        results = list(pool.map(lambda _: ledger.finish_job(outcome(1)), range(8)))
    assert all(r == first for r in results)
    totals = ledger.totals()
    assert totals.receipts == 1
    assert totals.amount_micros == Receipt.FromString(first.payload).amount_micros


def test_failed_and_cancelled_jobs_get_receipts_for_what_was_produced(ledger):
    cancelled = Receipt.FromString(bill(ledger, 1, outcome="cancelled", output_ids=(4, 5)).payload)
    failed = Receipt.FromString(bill(ledger, 2, outcome="failed", output_ids=()).payload)
    assert (cancelled.outcome, cancelled.output_tokens) == ("cancelled", 2)
    assert (failed.outcome, failed.output_tokens, failed.amount_micros) == ("failed", 0, 0)


def test_unknown_or_mismatched_jobs_are_refused_without_writing(ledger):
    with pytest.raises(LedgerError, match="never registered"):
        ledger.finish_job(outcome(9))
    ledger.register_job(CLIENT.public_key, job_id(9), b"\x01" * 32, 0)
    with pytest.raises(LedgerError, match="another job digest"):
        ledger.finish_job(outcome(9))
    assert ledger.totals().receipts == 0
    assert ledger.receipt(CLIENT.public_key, job_id(9)) is None


def test_receipts_table_is_append_only(ledger):
    bill(ledger, 1)
    for statement in ("UPDATE receipts SET amount_micros = 0", "DELETE FROM receipts"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            ledger._conn.execute(statement)


def test_acknowledgments_are_stored_beside_their_receipt(ledger):
    envelope = bill(ledger, 1)
    bill(ledger, 2)
    assert ledger.acknowledge(acknowledgment(CLIENT, envelope)) == 1
    assert ledger.acknowledge(acknowledgment(CLIENT, envelope)) == 1  # a retry is harmless
    assert ledger.totals().acknowledged == 1
    assert [row.ack_bytes is not None for row in ledger.rows()] == [True, False]
    assert audit_ledger(ledger).acknowledged == 1


def test_acknowledgments_that_do_not_hold_are_refused(data_dir, ledger):
    envelope = bill(ledger, 1)
    with pytest.raises(LedgerError, match="client"):
        ledger.acknowledge(acknowledgment(OTHER_CLIENT, envelope))
    forged = acknowledgment(CLIENT, envelope)
    forged.signature = bytes(64)
    with pytest.raises(LedgerError, match="signature"):
        ledger.acknowledge(forged)
    other_ledger = Ledger.open(data_dir / "other.sqlite3", WORKER)
    other_ledger_receipt = bill(other_ledger, 1, output_ids=(99,))
    other_ledger.close()
    with pytest.raises(LedgerError, match="does not hold"):
        ledger.acknowledge(acknowledgment(CLIENT, other_ledger_receipt))
    assert ledger.totals().acknowledged == 0


def test_recover_gives_running_jobs_a_failed_zero_receipt(data_dir, ledger):
    bill(ledger, 1)
    ledger.register_job(CLIENT.public_key, job_id(2), job_digest(CLIENT, 2), 0)  # a crash here
    ledger.close()
    reopened = Ledger.open(data_dir / LEDGER_FILE, WORKER)
    assert reopened.recover() == 1
    assert reopened.recover() == 0
    receipt = verify_receipt(reopened.receipt(CLIENT.public_key, job_id(2)), WORKER.peer_id, [])
    assert (receipt.outcome, receipt.sequence, receipt.amount_micros) == ("failed", 2, 0)
    assert audit_ledger(reopened).ok
    reopened.close()


def test_a_ledger_belongs_to_one_node_key(data_dir, ledger):
    bill(ledger, 1)
    with pytest.raises(LedgerError, match="another node key"):
        Ledger.open(data_dir / LEDGER_FILE, Identity.generate())


def test_read_only_ledger_refuses_writes_and_reads_while_the_writer_is_open(data_dir, ledger):
    bill(ledger, 1)
    reader = Ledger.open_readonly(data_dir / LEDGER_FILE)
    with pytest.raises(LedgerError, match="read-only"):
        reader.register_job(CLIENT.public_key, job_id(5), job_digest(CLIENT, 5), 0)
    bill(ledger, 2)
    assert [row.sequence for row in reader.rows()] == [1, 2]
    reader.close()
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger.open_readonly(data_dir / "absent.sqlite3")


def test_totals_per_client_and_recent(ledger):
    a = [Receipt.FromString(bill(ledger, n).payload).amount_micros for n in range(3)]
    b = Receipt.FromString(bill(ledger, 7, client=OTHER_CLIENT, output_ids=tuple(range(5000))).payload)
    totals = ledger.totals(recent=2)
    assert totals.per_client_micros == {CLIENT.public_key.hex(): sum(a),
                                        OTHER_CLIENT.public_key.hex(): b.amount_micros}
    assert [row.sequence for row in totals.recent] == [4, 3]
    assert totals.output_tokens == 3 * 3 + 5000
    # Later calls carry the sums on over the new receipts only.
    extra = Receipt.FromString(bill(ledger, 8, client=OTHER_CLIENT, output_ids=(1,) * 40).payload).amount_micros
    again = ledger.totals(recent=1)
    assert (again.receipts, again.output_tokens) == (5, 3 * 3 + 5000 + 40)
    assert again.per_client_micros[OTHER_CLIENT.public_key.hex()] == b.amount_micros + extra
    assert again.amount_micros == sum(a) + b.amount_micros + extra


def test_concurrent_jobs_get_distinct_sequences_in_one_chain(ledger):
    with ThreadPoolExecutor(4) as pool:
        envelopes = list(pool.map(lambda n: bill(ledger, n), range(40)))
    assert sorted(Receipt.FromString(e.payload).sequence for e in envelopes) == list(range(1, 41))
    assert audit_ledger(ledger).ok


def test_a_file_that_is_not_a_ledger_is_refused(tmp_path):
    other = tmp_path / "other.sqlite3"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', x'39')")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="schema version 1"):
        Ledger.open_readonly(other)
    (tmp_path / "garbage.sqlite3").write_bytes(b"not a database at all" * 100)
    with pytest.raises(LedgerError, match="not a dspark-node ledger"):
        Ledger.open_readonly(tmp_path / "garbage.sqlite3")
    with pytest.raises(LedgerError, match="cannot open the ledger"):
        Ledger.open(tmp_path / "garbage.sqlite3", WORKER)


def test_a_ledger_of_a_newer_schema_is_refused_untouched(data_dir, ledger, tamper):
    bill(ledger, 1)
    ledger.close()
    # What a newer node might have written: another version, and an index this version would create.
    tamper("UPDATE meta SET value = x'32' WHERE key = 'schema_version'", "DROP INDEX receipts_issued")
    before = (data_dir / LEDGER_FILE).read_bytes()
    with pytest.raises(LedgerError, match=r"not a dspark-node ledger of schema version 1 \(found version '2'\)"):
        Ledger.open(data_dir / LEDGER_FILE, WORKER)
    assert (data_dir / LEDGER_FILE).read_bytes() == before


def test_a_ledger_path_that_is_a_directory_is_refused(tmp_path):
    (tmp_path / LEDGER_FILE).mkdir()
    with pytest.raises(LedgerError, match="cannot open the ledger"):
        Ledger.open(tmp_path / LEDGER_FILE, WORKER)


def test_an_amount_too_large_to_store_is_refused_and_nothing_is_written(ledger):
    ledger.register_job(CLIENT.public_key, job_id(1), job_digest(CLIENT, 1), 0)
    with pytest.raises(ValueError, match="largest the ledger stores"):
        ledger.finish_job(outcome(1, price_gpu_s=2**63 - 1, decode=10.0))
    assert ledger.receipt(CLIENT.public_key, job_id(1)) is None
    assert ledger.recover() == 1   # still 'running', so a restart would bill it as failed


def test_a_clock_stepped_back_never_issues_a_receipt_before_the_previous_one(ledger, monkeypatch, cli, data_dir):
    """Periods are cut on issued_at_ms: once [t0, t1) is exported and its root published, a receipt
    issued before t1 by a clock an NTP step set back would land in the closed period and be billed
    in none (or change the published root)."""
    clock = iter([1_000_000, 1_000_000, 400_000, 400_000])     # register, finish; register, finish
    monkeypatch.setattr("node.ledger._now_ms", lambda: next(clock))
    first, second = (Receipt.FromString(bill(ledger, n).payload) for n in (1, 2))
    assert second.issued_at_ms == first.issued_at_ms == 1_000_000
    assert audit_ledger(ledger).ok
    code, out, _ = cli("export", "--data-dir", str(data_dir), "--until", "1000000")
    assert code == 0 and '"receipts":0' in out
