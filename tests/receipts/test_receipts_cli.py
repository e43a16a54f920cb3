"""`dspark-node receipts list|show|export|verify-proof` on a real ledger file."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import time

import pytest
from receipts_helpers import CLIENT, OTHER_CLIENT, WORKER, bill, job_id

from dspark.v1.envelope_pb2 import Envelope
from dspark.v1.receipt_pb2 import Acknowledgment, Receipt
from node.billing import parse_time_ms
from node.envelope import seal
from node.merkle import merkle_root
from node.receipts import acknowledgment, verify_receipt


@pytest.fixture
def two_periods(ledger):
    """Jobs 0-2 (CLIENT), then a boundary, then jobs 3-4 (CLIENT) and 5 (OTHER_CLIENT)."""
    first = [bill(ledger, n, output_ids=tuple(range(10 * (n + 1)))) for n in range(3)]
    ledger.acknowledge(acknowledgment(CLIENT, first[1]))
    time.sleep(0.005)
    boundary = int(time.time() * 1000)
    time.sleep(0.005)
    second = [bill(ledger, n, output_ids=tuple(range(10 * (n + 1)))) for n in (3, 4)]
    second.append(bill(ledger, 5, client=OTHER_CLIENT, output_ids=tuple(range(2000))))
    return first, second, boundary


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_list_and_show(data_dir, two_periods, cli):
    code, out, _ = cli("list", "--data-dir", str(data_dir), "--limit", "4")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:2] == ["SEQ", "ISSUED"]
    assert [int(line.split()[0]) for line in lines[1:]] == [6, 5, 4, 3]
    code, out, _ = cli("list", "--data-dir", str(data_dir), "--client", OTHER_CLIENT.public_key.hex())
    assert [int(line.split()[0]) for line in out.splitlines()[1:]] == [6]

    code, out, _ = cli("show", "--data-dir", str(data_dir), job_id(1).hex())
    shown = json.loads(out)
    assert (shown["sequence"], shown["output_tokens"], shown["acknowledged"]) == (2, 20, True)
    envelope = Envelope.FromString(base64.b64decode(shown["envelope"]))
    assert verify_receipt(envelope, WORKER.peer_id, list(range(20))).amount_micros == shown["amount_micros"]


def test_export_jsonl_for_a_period_has_totals_and_root(data_dir, two_periods, cli):
    _, second, boundary = two_periods
    code, out, err = cli("export", "--data-dir", str(data_dir), "--since", str(boundary))
    assert code == 0
    records = _records(out)
    receipts = [r for r in records if r["record"] == "receipt"]
    assert [r["sequence"] for r in receipts] == [4, 5, 6]
    signed = [Receipt.FromString(e.payload) for e in second]
    totals = {r["client"]: r for r in records if r["record"] == "client_total"}
    assert totals[CLIENT.public_key.hex()]["amount_micros"] == sum(r.amount_micros for r in signed[:2])
    assert totals[OTHER_CLIENT.public_key.hex()]["output_tokens"] == 2000
    period = records[-1]
    assert period["record"] == "period" and period["receipts"] == 3
    assert period["amount_micros"] == sum(r.amount_micros for r in signed)
    digests = [bytes.fromhex(r["receipt_digest"]) for r in receipts]
    assert period["merkle_root"] == merkle_root(digests).hex()
    assert period["merkle_root"] in err


def test_export_csv_to_a_file(data_dir, two_periods, cli, tmp_path):
    first, _, boundary = two_periods
    target = tmp_path / "bill.csv"
    code, _, _ = cli("export", "--data-dir", str(data_dir), "--format", "csv", "--until", str(boundary),
                     "--output", str(target))
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    assert code == 0
    assert [r["record"] for r in rows] == ["receipt"] * 3 + ["client_total", "period"]
    assert [int(r["amount_micros"]) for r in rows[:3]] == [Receipt.FromString(e.payload).amount_micros for e in first]
    assert rows[3]["acknowledged"] == "1"
    assert not list(tmp_path.glob(".bill.csv.*"))  # no temporary file left behind


def test_an_empty_period_is_a_valid_export(data_dir, two_periods, cli):
    code, out, _ = cli("export", "--data-dir", str(data_dir), "--until", "1970-01-02")
    period = _records(out)[-1]
    assert code == 0 and len(_records(out)) == 1
    assert (period["receipts"], period["amount_micros"], period["first_sequence"]) == (0, 0, None)
    assert period["merkle_root"] == hashlib.sha256(b"").hexdigest()


def test_inclusion_proof_round_trip_and_tampering(data_dir, two_periods, cli, tmp_path):
    _, _, boundary = two_periods
    root = _records(cli("export", "--data-dir", str(data_dir), "--since", str(boundary))[1])[-1]["merkle_root"]
    code, out, _ = cli("export", "--data-dir", str(data_dir), "--since", str(boundary), "--proof", job_id(4).hex())
    proof = json.loads(out)
    assert code == 0 and proof["merkle_root"] == root and proof["tree_size"] == 3 and proof["leaf_index"] == 1
    path = tmp_path / "proof.json"
    path.write_text(out)
    code, out, _ = cli("verify-proof", str(path), "--root", root)
    assert code == 0 and out.startswith("ok:")

    assert f"job {job_id(4).hex()}, sequence 5" in out and f"signed by {WORKER.peer_id}" in out
    assert cli("verify-proof", str(path), "--root", root, "--peer-id", WORKER.peer_id)[0] == 0

    altered = {"path": [p[:-2] + ("00" if p[-2:] != "00" else "11") for p in proof["path"]],
               "leaf_index": 2, "receipt_digest": proof["path"][0], "job_id": job_id(3).hex(),
               "client": OTHER_CLIENT.public_key.hex(), "sequence": 4, "since_ms": boundary + 10**9,
               "merkle_root": root[:-2] + ("00" if root[-2:] != "00" else "11")}
    for key, value in altered.items():
        path.write_text(json.dumps(proof | {key: value}))
        code, _, err = cli("verify-proof", str(path), "--root", root)
        assert code == 1 and "FAILED" in err, key
    path.write_text(json.dumps(proof))
    assert cli("verify-proof", str(path), "--root", "00" * 32)[0] == 1
    code, _, err = cli("verify-proof", str(path), "--root", root, "--peer-id", OTHER_CLIENT.peer_id)
    assert code == 1 and "not signed by the worker's key" in err
    code, out, err = cli("verify-proof", str(path), "--root", root, "--peer-id", "")   # not "any worker"
    assert (code, out) == (1, "") and "'' is not a peer ID" in err


def _forged_proof(envelope: bytes, **fields) -> dict:
    """A one-leaf proof over `envelope` whose root is computed to match, as a forger would."""
    leaf = hashlib.sha256(envelope).digest()
    return {"merkle_rule": "rfc6962-sha256", "job_id": job_id(1).hex(), "client": CLIENT.public_key.hex(),
            "sequence": 1, "since_ms": None, "until_ms": None, "receipt_digest": leaf.hex(), "leaf_index": 0,
            "tree_size": 1, "path": [], "merkle_root": merkle_root([leaf]).hex(),
            "envelope": base64.b64encode(envelope).decode()} | fields


def _signed(identity, message) -> bytes:
    return seal(identity, message).SerializeToString()


@pytest.mark.parametrize("forgery,message", [
    ("not_an_envelope", "not a dspark Envelope"),
    ("edited_after_signing", "signature does not verify"),
    ("acknowledgment_not_receipt", "expected 'dspark.v1.Receipt'"),
    ("signed_by_another_key", "not its signer"),
    ("breaks_the_billing_rule", "billing rule gives"),
])
def test_verify_proof_refuses_a_forged_receipt_even_under_its_own_root(cli, tmp_path, ledger, forgery, message):
    genuine = bill(ledger, 1)
    receipt = Receipt.FromString(genuine.payload)
    if forgery == "not_an_envelope":
        envelope = b"anything"
    elif forgery == "edited_after_signing":
        receipt.amount_micros *= 1000
        envelope = Envelope(payload_type=genuine.payload_type, payload=receipt.SerializeToString(),
                            public_key=genuine.public_key, signature=genuine.signature).SerializeToString()
    elif forgery == "acknowledgment_not_receipt":
        envelope = _signed(WORKER, Acknowledgment(worker_peer_id=WORKER.peer_id, sequence=1))
    elif forgery == "signed_by_another_key":   # a receipt the forger signed, naming the real worker
        envelope = _signed(OTHER_CLIENT, receipt)
    else:
        receipt.amount_micros += 1
        envelope = _signed(WORKER, receipt)
    proof = _forged_proof(envelope)
    path = tmp_path / "forged.json"
    path.write_text(json.dumps(proof))
    code, out, err = cli("verify-proof", str(path), "--root", proof["merkle_root"])
    assert (code, out) == (1, "") and message in err


def test_verify_proof_requires_an_independent_root(cli, tmp_path, ledger):
    path = tmp_path / "proof.json"
    path.write_text(json.dumps(_forged_proof(bill(ledger, 1).SerializeToString())))
    code, out, err = cli("verify-proof", str(path))
    assert (code, out) == (2, "") and "--root is required" in err
    assert cli("verify-proof", str(path), "--root", json.loads(path.read_text())["merkle_root"])[0] == 0


@pytest.mark.parametrize("argv,message", [
    (["export", "--since", "yesterday"], "neither unix milliseconds nor an ISO 8601"),
    (["export", "--since", "2026-02-01", "--until", "2026-01-01"], "must be before until"),
    (["export", "--since", "99999999999999999999999"], "out of range"),
    (["export", "--until", "-1"], "out of range"),
    (["export", "--since", "0001-01-01"], "out of range"),
    (["export", "--since", "\u00b2"], "neither unix milliseconds"),
    (["show", "zz"], "not hexadecimal"),
    (["show", "ff" * 16], "no receipt for job"),
    (["list", "--client", "abcd"], "must be 32 bytes"),
    (["list", "--client", ""], "--client is empty"),                 # not every client's receipts
    (["export", "--proof", ""], "--proof job id is empty"),          # not the whole period's bill
    (["show", ""], "job id is empty"),
    (["list", "--limit", "0"], "--limit must be from 1 to 2^63-1, got 0"),
    (["list", "--limit", str(2**63)], "--limit must be from 1 to 2^63-1"),
    (["export", "--proof", "ff" * 16], "no receipt for job"),
])
def test_bad_arguments_are_refused_with_a_message(data_dir, two_periods, cli, argv, message):
    code, out, err = cli(argv[0], "--data-dir", str(data_dir), *argv[1:])
    assert (code, out) == (2, "")
    assert message in err


@pytest.mark.parametrize("target", ["a-directory", "no-such-dir/bill.csv"])
def test_export_to_an_output_it_cannot_write_names_it_and_leaves_nothing(data_dir, two_periods, cli, tmp_path,
                                                                          target):
    out_dir = tmp_path / "out"
    (out_dir / "a-directory").mkdir(parents=True)
    code, out, err = cli("export", "--data-dir", str(data_dir), "--output", str(out_dir / target))
    assert code == 2 and f"--output {out_dir / target}: cannot write there (" in err
    assert "merkle root" not in err                      # no summary of an export that was not written
    assert [p.name for p in out_dir.iterdir()] == ["a-directory"] and not any((out_dir / "a-directory").iterdir())


def test_data_dir_with_a_tilde_is_the_home_directory_as_for_run(data_dir, two_periods, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    code, out, _ = cli("verify", f"--data-dir=~/{data_dir.relative_to(tmp_path)}")   # no shell expands it there
    assert code == 0 and out.startswith("ok: 6 receipts")


@pytest.mark.parametrize("target", ["ledger.sqlite3", "node.key", "bill.csv"])
def test_export_never_writes_into_the_data_dir(data_dir, two_periods, cli, monkeypatch, target):
    before = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    monkeypatch.chdir(data_dir.parent)                   # a relative --output names the same file
    code, out, err = cli("export", "--data-dir", str(data_dir), "--output", f"{data_dir.name}/{target}")
    assert (code, out) == (2, "") and "is inside the data dir" in err
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == before
    assert cli("verify", "--data-dir", str(data_dir))[0] == 0


def test_missing_ledger_and_bad_proof_files(tmp_path, cli):
    code, _, err = cli("verify", "--data-dir", str(tmp_path / "nowhere"))
    assert code == 2 and "no ledger at" in err
    bad = tmp_path / "proof.json"
    bad.write_text("[1, 2]")
    assert cli("verify-proof", str(bad))[0] == 2
    bad.write_bytes(bytes(range(128, 256)))
    code, _, err = cli("verify-proof", str(bad), "--root", "00" * 32)
    assert code == 2 and f"{bad} is not JSON (not UTF-8 text)" in err
    bad.write_text('{"merkle_rule": "rfc6962-sha256"}')
    code, _, err = cli("verify-proof", str(bad), "--root", "00" * 32)
    assert code == 1 and "malformed proof" in err
    bad.write_text(json.dumps(_forged_proof(b"x", sequence="1")))
    code, _, err = cli("verify-proof", str(bad), "--root", "00" * 32)
    assert code == 1 and "sequence must be an integer" in err


@pytest.mark.parametrize("text,why", [("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                                      ('{"leaf_index": ' + "9" * 5000 + "}", "Exceeds the limit (4300 digits)")])
def test_a_proof_file_json_cannot_hold_is_refused_without_a_traceback(tmp_path, cli, text, why):
    # A proof comes from the other side of a dispute: json.loads raised RecursionError and a plain
    # ValueError here, not JSONDecodeError.
    bad = tmp_path / "proof.json"
    bad.write_text(text)
    code, out, err = cli("verify-proof", str(bad), "--root", "00" * 32)
    assert (code, out) == (2, "")
    assert err.startswith(f"receipts verify-proof: {bad} is not JSON: ") and why in err


@pytest.mark.parametrize("text,ms", [("5323-03-08T23:53:11.011992", 105_816_239_591_011),
                                     ("9999-12-31T23:59:59.999999", 253_402_300_799_999),
                                     ("2026-12-02T10:00:00.0009+00:00", 1_796_205_600_000)])
def test_an_iso_period_bound_is_the_millisecond_it_names(text, ms):
    # Through float seconds, a far date's sub-millisecond digits rounded up into the next millisecond,
    # and a receipt issued then fell on the wrong side of the bound.
    assert parse_time_ms(text) == ms
