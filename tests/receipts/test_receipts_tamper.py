"""`receipts verify` against a ledger file edited behind the node's back: every edit is caught and
the first bad row is named."""

from __future__ import annotations

import hashlib

import pytest
from receipts_helpers import CLIENT, OTHER_CLIENT, WORKER, bill

from dspark.v1.envelope_pb2 import Envelope
from dspark.v1.receipt_pb2 import Receipt
from node.envelope import seal
from node.ledger import LEDGER_FILE, Ledger
from node.ledger_audit import audit_ledger
from node.receipts import acknowledgment


@pytest.fixture
def filled(ledger):
    """Six receipts, the first acknowledged, then the writer closed (as after a daemon stop)."""
    envelopes = [bill(ledger, n, output_ids=tuple(range(n + 1))) for n in range(6)]
    ledger.acknowledge(acknowledgment(CLIENT, envelopes[0]))
    ledger.close()
    return envelopes


def audit(data_dir):
    reader = Ledger.open_readonly(data_dir / LEDGER_FILE)
    report = audit_ledger(reader)
    reader.close()
    return report


def test_untouched_ledger_verifies(data_dir, filled, cli):
    code, out, _ = cli("verify", "--data-dir", str(data_dir))
    assert code == 0
    assert out.startswith("ok: 6 receipts")
    assert "1 acknowledged" in out


def test_edited_amount_column_is_named(data_dir, filled, tamper, cli):
    tamper("UPDATE receipts SET amount_micros = amount_micros + 1000 WHERE sequence = 4")
    code, _, err = cli("verify", "--data-dir", str(data_dir))
    assert code == 1
    assert "first bad row: sequence 4" in err
    assert "amount_micros column" in err


def test_edited_signed_amount_is_named(data_dir, filled, tamper):
    envelope = Envelope.FromString(_envelope_bytes(data_dir, 3))
    receipt = Receipt.FromString(envelope.payload)
    receipt.amount_micros *= 100
    envelope.payload = receipt.SerializeToString(deterministic=True)
    tamper(f"UPDATE receipts SET envelope = x'{envelope.SerializeToString(deterministic=True).hex()}'"
           " WHERE sequence = 3")
    report = audit(data_dir)
    assert report.problems[0].sequence == 3
    assert "digest column" in report.problems[0].message


def test_edited_receipt_with_recomputed_digest_fails_the_signature(data_dir, filled, tamper):
    envelope = Envelope.FromString(_envelope_bytes(data_dir, 2))
    receipt = Receipt.FromString(envelope.payload)
    receipt.output_tokens, receipt.amount_micros = 10**6, receipt.amount_micros * 10**6
    envelope.payload = receipt.SerializeToString(deterministic=True)
    data = envelope.SerializeToString(deterministic=True)
    tamper(f"UPDATE receipts SET envelope = x'{data.hex()}', digest = x'{_sha256(data).hex()}' WHERE sequence = 2")
    report = audit(data_dir)
    assert report.problems[0].sequence == 2
    assert "signature" in report.problems[0].message


def test_deleted_row_is_named(data_dir, filled, tamper, cli):
    tamper("DELETE FROM receipts WHERE sequence = 3")
    code, _, err = cli("verify", "--data-dir", str(data_dir))
    assert code == 1
    assert "first bad row: sequence 4" in err
    assert "receipt 3 is missing" in err
    # The jobs table still says job 2 finished with receipt 3.
    assert "is marked finished but its receipt (sequence 3) is missing" in err


def test_deleted_newest_row_is_caught_by_the_jobs_table(data_dir, filled, tamper):
    tamper("DELETE FROM receipts WHERE sequence = 6")
    report = audit(data_dir)
    assert not report.ok
    assert "receipt (sequence 6) is missing" in report.problems[0].message


def test_reordered_rows_are_named(data_dir, filled, tamper):
    # Swap the contents of rows 2 and 5, keeping the sequence column in order.
    columns = "client_key, job_id, digest, issued_at_ms, outcome, output_tokens, amount_micros, envelope"
    tamper("CREATE TEMP TABLE saved AS SELECT * FROM receipts WHERE sequence IN (2, 5)",
           "DELETE FROM receipts WHERE sequence IN (2, 5)",
           f"INSERT INTO receipts (sequence, {columns}) SELECT 7 - sequence, {columns} FROM saved")
    report = audit(data_dir)
    assert report.problems[0].sequence == 2
    assert "says sequence 5" in report.problems[0].message
    assert {p.sequence for p in report.problems} >= {2, 5}


def test_receipt_signed_by_another_key_is_named(data_dir, filled, tamper):
    forged = seal(OTHER_CLIENT, Receipt.FromString(Envelope.FromString(_envelope_bytes(data_dir, 5)).payload))
    data = forged.SerializeToString(deterministic=True)
    tamper(f"UPDATE receipts SET envelope = x'{data.hex()}', digest = x'{_sha256(data).hex()}' WHERE sequence = 5")
    report = audit(data_dir)
    assert report.problems[0].sequence == 5
    assert "not signed by the worker" in report.problems[0].message


def test_forged_acknowledgment_is_named(data_dir, filled, tamper):
    forged = acknowledgment(OTHER_CLIENT, filled[0]).SerializeToString(deterministic=True)
    tamper(f"UPDATE acknowledgments SET envelope = x'{forged.hex()}' WHERE sequence = 1")
    report = audit(data_dir)
    assert report.problems[0].sequence == 1
    assert "acknowledgment is invalid" in report.problems[0].message


def test_verify_against_an_expected_peer_id(data_dir, filled, cli):
    code, out, err = cli("verify", "--data-dir", str(data_dir), "--peer-id", OTHER_CLIENT.peer_id)
    # One line naming both peers, not one "not signed by the worker's key" per receipt.
    assert (code, out, len(err.splitlines())) == (1, "", 1), err
    assert f"belongs to peer ID {WORKER.peer_id} (the key it stores), not to {OTHER_CLIENT.peer_id}" in err
    assert cli("verify", "--data-dir", str(data_dir), "--peer-id", WORKER.peer_id)[0] == 0
    code, _, err = cli("verify", "--data-dir", str(data_dir), "--peer-id", "not-a-peer-id")
    assert code == 2
    assert "base58" in err
    code, out, err = cli("verify", "--data-dir", str(data_dir), "--peer-id", "")    # `--peer-id "$UNSET"`
    assert (code, out) == (2, "") and "'' is not a peer ID" in err


@pytest.mark.parametrize("value", ["x'00'", "'text'"])
def test_verify_against_a_peer_id_names_a_damaged_ledger_key(data_dir, filled, tamper, cli, value):
    tamper(f"UPDATE meta SET value = {value} WHERE key = 'worker_public_key'")
    code, _, err = cli("verify", "--data-dir", str(data_dir), "--peer-id", WORKER.peer_id)
    assert (code, len(err.splitlines())) == (1, 1), err
    assert "a key that is not an Ed25519 public key (the ledger's meta table is damaged)" in err


def _envelope_bytes(data_dir, sequence: int) -> bytes:
    reader = Ledger.open_readonly(data_dir / LEDGER_FILE)
    row = next(r for r in reader.rows() if r.sequence == sequence)
    reader.close()
    return row.envelope_bytes


def _amount_edited(data_dir, sequence: int) -> tuple[Receipt, bytes]:
    """Receipt `sequence` with 1000 micros more, in its envelope as stored (the signature left as it was)."""
    data = Envelope.FromString(_envelope_bytes(data_dir, sequence))
    receipt = Receipt.FromString(data.payload)
    receipt.amount_micros += 1000
    data.payload = receipt.SerializeToString(deterministic=True)
    return receipt, data.SerializeToString(deterministic=True)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@pytest.mark.parametrize("damage,message", [
    ("DROP TABLE acknowledgments", "no such table: acknowledgments"),
    ("UPDATE receipts SET envelope = CAST(envelope AS TEXT) WHERE sequence = 3",
     "Could not decode to UTF-8 column 'envelope'"),
])
@pytest.mark.parametrize("action", ["verify", "list", "export"])
def test_a_damaged_ledger_does_not_verify_and_gives_no_traceback(data_dir, filled, tamper, cli, damage, message,
                                                                 action):
    tamper(damage)
    code, out, err = cli(action, "--data-dir", str(data_dir))
    assert (code, out) == (1, "")
    assert f"receipts {action}: FAILED: the ledger cannot be read ({message})" in err and "does not verify" in err
    assert err.isascii()    # the undecodable bytes SQLite quotes are not echoed


@pytest.mark.parametrize("action", ["verify", "list", "export"])
def test_a_truncated_ledger_does_not_verify(data_dir, filled, cli, action):
    """Damaged pages are a damaged ledger (exit 1), not a file that is no ledger at all (exit 2)."""
    path = data_dir / LEDGER_FILE
    path.write_bytes(path.read_bytes()[:4096])      # the first page only, as a copy cut short leaves it
    code, out, err = cli(action, "--data-dir", str(data_dir))
    assert (code, out) == (1, "")
    assert f"receipts {action}: FAILED: the ledger cannot be read (database disk image is malformed)" in err


def test_export_of_a_ledger_with_a_text_envelope_is_refused_before_any_output(data_dir, filled, tamper, cli):
    tamper("UPDATE receipts SET envelope = hex(envelope) WHERE sequence = 4")
    code, out, err = cli("export", "--data-dir", str(data_dir))
    assert (code, out) == (1, "")
    assert "sequence 4: the stored envelope is text, not bytes" in err


def test_export_to_stdout_writes_nothing_when_a_later_receipt_does_not_verify(data_dir, filled, tamper, cli):
    _, edited = _amount_edited(data_dir, 5)
    tamper(f"UPDATE receipts SET envelope = x'{edited.hex()}', digest = x'{_sha256(edited).hex()}' WHERE sequence = 5")
    code, out, err = cli("export", "--data-dir", str(data_dir))
    assert (code, out) == (1, "")       # receipts 1-4 verify, yet none of them is printed
    assert "sequence 5:" in err and "signature does not verify" in err


@pytest.mark.parametrize("edit", ["hex(envelope)", "'any valid UTF-8 text'"])
def test_an_envelope_stored_as_text_does_not_verify_and_gives_no_traceback(data_dir, filled, tamper, cli, edit):
    # SQLite types values, not columns: TEXT that decodes reaches Python as str, which protobuf and
    # hashlib refuse with a TypeError.
    tamper(f"UPDATE receipts SET envelope = {edit} WHERE sequence = 3")
    code, out, err = cli("verify", "--data-dir", str(data_dir))
    assert (code, out) == (1, "")
    assert "first bad row: sequence 3: job " in err and "the stored envelope is text, not bytes" in err
    job_id = Receipt.FromString(filled[2].payload).job_id.hex()
    code, out, err = cli("show", job_id, "--data-dir", str(data_dir))
    assert (code, out) == (1, "")
    assert err == "receipts show: FAILED: sequence 3: the stored envelope is text, not bytes; run `receipts verify`\n"


def test_an_acknowledgment_stored_as_text_does_not_verify(data_dir, filled, tamper, cli):
    tamper("UPDATE acknowledgments SET envelope = hex(envelope) WHERE sequence = 1")
    code, _, err = cli("verify", "--data-dir", str(data_dir))
    assert code == 1
    assert "first bad row: sequence 1: job " in err and "the stored acknowledgment is text, not bytes" in err


def test_show_of_an_envelope_that_does_not_parse_does_not_verify(data_dir, filled, tamper, cli):
    tamper(f"UPDATE receipts SET envelope = x'ff', digest = x'{_sha256(bytes([255])).hex()}' WHERE sequence = 4")
    code, out, err = cli("show", Receipt.FromString(filled[3].payload).job_id.hex(), "--data-dir", str(data_dir))
    assert (code, out) == (1, "")
    assert "FAILED: sequence 4: the stored envelope is not a valid Envelope" in err


@pytest.mark.parametrize("edit,period,message", [
    # moved into a period it was not issued in: billed there, and missing from its own
    ("UPDATE receipts SET issued_at_ms = 1 WHERE sequence = 3", ("--until", "1000"),
     "issued_at_ms column 1 differs from the signed receipt's"),
    # the Merkle leaf is the digest column: the root would cover bytes no client holds
    ("UPDATE receipts SET digest = x'" + "ab" * 32 + "' WHERE sequence = 3", (),
     "digest column does not match the stored envelope"),
    ("INSERT INTO acknowledgments SELECT 3, 0, envelope FROM acknowledgments WHERE sequence = 1", (),
     "acknowledgment is invalid: acknowledgment is over a different receipt digest"),
    ("INSERT INTO acknowledgments VALUES (3, 0, x'00')", (), "acknowledgment is invalid"),
])
def test_export_refuses_index_columns_and_acknowledgments_the_signatures_do_not_back(data_dir, filled, tamper, cli,
                                                                                    edit, period, message):
    """Export bills from the signed receipt, but it selects the period, takes the Merkle leaf and counts
    `acknowledged` from the rows beside it: those must agree with what was signed, as verify checks."""
    tamper(edit)
    code, out, err = cli("export", "--data-dir", str(data_dir), *period)
    assert (code, out) == (1, "")
    assert "FAILED: sequence 3: " in err and message in err
    job_id = Receipt.FromString(filled[2].payload).job_id.hex()
    code, out, err = cli("export", "--data-dir", str(data_dir), "--proof", job_id, *period)
    assert (code, out) == (1, "") and message in err


@pytest.mark.parametrize("edits,message", [
    # with its job row too, so that only the chain tells
    (("DELETE FROM receipts WHERE sequence = 3", "DELETE FROM jobs WHERE receipt_sequence = 3"),
     "sequence 4: receipt 3 is missing (deleted?)"),
    (("CREATE TEMP TABLE saved AS SELECT * FROM receipts WHERE sequence IN (2, 5)",
      "DELETE FROM receipts WHERE sequence IN (2, 5)",
      "INSERT INTO receipts SELECT 7 - sequence, client_key, job_id, digest, issued_at_ms, outcome, output_tokens,"
      " amount_micros, envelope FROM saved"),
     "sequence 2: the signed receipt says sequence 5 (rows reordered or swapped)"),
])
def test_export_refuses_a_chain_with_a_row_deleted_or_reordered(data_dir, filled, tamper, cli, edits, message):
    """Otherwise the period's root leaves a receipt out, or takes its leaves out of sequence order, and
    a client holding that receipt cannot prove it under the published root."""
    tamper(*edits)
    code, out, err = cli("export", "--data-dir", str(data_dir))
    assert (code, out) == (1, "")
    assert f"FAILED: {message}" in err


def test_a_period_checks_its_first_receipt_against_the_one_before_it(data_dir, filled, tamper, cli):
    issued = [Receipt.FromString(e.payload).issued_at_ms for e in filled]
    tamper(f"UPDATE receipts SET issued_at_ms = {issued[2] - 1} WHERE sequence = 3",   # kept out of the period
           "UPDATE receipts SET envelope = x'0a00' WHERE sequence = 3")
    code, out, err = cli("export", "--data-dir", str(data_dir), "--since", str(issued[2]))
    assert (code, out) == (1, "")
    assert "FAILED: sequence 4: previous_receipt_digest does not match the previous receipt (chain broken)" in err


@pytest.mark.parametrize("edit,message", [
    ("amount_micros = 7", "amount_micros column 7 differs from the signed receipt's 1"),
    ("envelope = (SELECT envelope FROM receipts WHERE sequence = 2)", "digest column does not match"),
])
def test_show_of_a_receipt_that_does_not_verify_fails_instead_of_printing_it(data_dir, filled, tamper, cli, edit,
                                                                             message):
    # What an operator reads to answer a client's dispute: a bill the worker never signed, or another
    # job's, must not print as this job's.
    tamper(f"UPDATE receipts SET {edit} WHERE sequence = 3")
    code, out, err = cli("show", Receipt.FromString(filled[2].payload).job_id.hex(), "--data-dir", str(data_dir))
    assert (code, out) == (1, "")
    assert err.startswith("receipts show: FAILED: sequence 3: ") and message in err


def test_show_of_a_receipt_signed_over_an_edited_amount_fails(data_dir, filled, tamper, cli):
    receipt, edited = _amount_edited(data_dir, 3)
    tamper(f"UPDATE receipts SET envelope = x'{edited.hex()}', digest = x'{_sha256(edited).hex()}',"
           f" amount_micros = {receipt.amount_micros} WHERE sequence = 3")
    code, out, err = cli("show", receipt.job_id.hex(), "--data-dir", str(data_dir))
    assert (code, out) == (1, "")
    assert "FAILED: sequence 3: " in err and "signature does not verify" in err
