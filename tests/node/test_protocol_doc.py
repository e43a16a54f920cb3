"""docs/protocol.md's test vector, recomputed with the project's own code: the wire protocol's document
cannot drift from the keys, the signing input, the encoding and the digests the node uses."""

from __future__ import annotations

import hashlib
import re
import struct

from dspark.v1 import job_pb2
from dspark.v1.envelope_pb2 import Envelope
from node.admission import SignedJob, open_job
from node.envelope import DOMAIN, digest, pae, seal
from node.identity import Identity, public_key_from_peer_id, verify_signature
from node.receipts import billed_amount, output_digest
from node_harness import ROOT

DOC = ROOT / "docs" / "protocol.md"
SECTION = "## 12. Test vector"
CLIENT_SEED = bytes(range(32))
WORKER_SEED = bytes(range(32, 64))
OUTPUT_IDS = [1, 2, 300]
# What the doc's inputs say, word for word, so a change to them without new outputs fails too.
DOC_INPUTS = ("00112233445566778899aabbccddeeff", '"HuggingFaceTB/SmolLM2-135M-Instruct"',
              '{role "system", content "You are terse."}', '{role "user", content "Name a prime number."}',
              'temperature 0.7, top_p 0.9, max_new_tokens 32, seed 7, stop ["\\n"]',
              "max_price_per_mtok_micros        250000", "issued_at_ms                     1764633600000",
              "expires_at_ms                    1764633900000", "max_price_per_gpu_second_micros  3000",
              "the bytes 0 to 31", "the bytes 32 to 63", "the ids [1, 2, 300]")


def vector_job() -> tuple[Identity, Identity, Envelope]:
    client, worker = Identity.from_seed(CLIENT_SEED), Identity.from_seed(WORKER_SEED)
    request = job_pb2.JobRequest(
        job_id=bytes.fromhex("00112233445566778899aabbccddeeff"), worker_peer_id=worker.peer_id,
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        chat=job_pb2.ChatPrompt(messages=[job_pb2.ChatMessage(role="system", content="You are terse."),
                                          job_pb2.ChatMessage(role="user", content="Name a prime number.")]),
        sampling=job_pb2.SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=32, seed=7, stop=["\n"]),
        max_price_per_mtok_micros=250_000, issued_at_ms=1_764_633_600_000, expires_at_ms=1_764_633_900_000,
        max_price_per_gpu_second_micros=3000)
    return client, worker, seal(client, request)


def expected_values() -> dict[str, str]:
    """Every value the doc's vector lists, by its name there (bytes as hex)."""
    client, worker, envelope = vector_job()
    return {
        "client_public_key": client.public_key.hex(), "client_peer_id": client.peer_id,
        "worker_public_key": worker.public_key.hex(), "worker_peer_id": worker.peer_id,
        "payload": envelope.payload.hex(), "pae": pae(envelope.payload_type, envelope.payload).hex(),
        "signature": envelope.signature.hex(),
        "envelope": envelope.SerializeToString(deterministic=True).hex(), "job_digest": digest(envelope).hex(),
        "output_digest": output_digest(OUTPUT_IDS).hex(),
    }


def render(values: dict[str, str]) -> str:
    """The block as the doc shows it: `name (N bytes):` then the hex in lines of 64 characters; a
    peer ID on the name's line. (`python tests/node/test_protocol_doc.py` prints it.)"""
    lines = []
    for name, value in values.items():
        if name.endswith("peer_id"):
            lines.append(f"{name}: {value}")
            continue
        lines.append(f"{name} ({len(value) // 2} bytes):")
        lines += [f"  {value[i:i + 64]}" for i in range(0, len(value), 64)]
    return "\n".join(lines) + "\n"


def doc_section(text: str | None = None) -> str:
    return (DOC.read_text() if text is None else text).split(SECTION, 1)[1].split("\n## ", 1)[0]


def doc_values(text: str | None = None) -> dict[str, str]:
    block = re.search(r"```text\n(.*?)```", doc_section(text), flags=re.S).group(1)
    values: dict[str, str] = {}
    name = None
    for line in block.splitlines():
        head = re.fullmatch(r"([a-z_]+)(?: \((\d+) bytes\))?:\s*(\S*)", line)
        if head:
            name = head.group(1)
            values[name] = head.group(3)
        elif line.strip():
            assert name is not None and line.startswith("  "), f"stray line in the vector: {line!r}"
            values[name] += line.strip()
    return values


def test_the_documented_vector_is_what_the_code_computes():
    assert doc_values() == expected_values()


def test_the_documented_byte_counts_are_right():
    block = re.search(r"```text\n(.*?)```", doc_section(), flags=re.S).group(1)
    values = doc_values()
    for name, count in re.findall(r"^([a-z_]+) \((\d+) bytes\):", block, flags=re.M):
        assert len(values[name]) == 2 * int(count), name


def test_the_documented_inputs_are_the_ones_computed_from():
    section = doc_section()
    for text in DOC_INPUTS:
        assert text in section, text


def test_the_vector_is_a_job_the_node_would_open():
    """The node's own checks agree: the signature verifies over PAE, and the digest it binds receipts
    to is the sha256 of the documented envelope bytes (the canonical encoding)."""
    values = doc_values()
    envelope = Envelope.FromString(bytes.fromhex(values["envelope"]))
    job = open_job(envelope)
    assert isinstance(job, SignedJob)
    assert job.digest.hex() == values["job_digest"]
    assert digest(envelope) == hashlib.sha256(bytes.fromhex(values["envelope"])).digest()
    assert job.request.worker_peer_id == values["worker_peer_id"]
    worker_key = public_key_from_peer_id(values["worker_peer_id"])
    assert worker_key.hex() == values["worker_public_key"]
    signed = bytes.fromhex(values["pae"])
    assert signed.startswith(DOMAIN + struct.pack("<Q", len(b"dspark.v1.JobRequest")) + b"dspark.v1.JobRequest")
    assert verify_signature(bytes.fromhex(values["client_public_key"]), bytes.fromhex(values["signature"]), signed)


def test_the_documented_billing_examples():
    section = DOC.read_text().split("## 9. Verifying a receipt", 1)[1].split("\n## ", 1)[0]
    assert "6 + 750 = **756**" in section and billed_amount(24, 250_000, 0.25, 3000) == 756
    assert "6 + 1 = **7**" in section and billed_amount(24, 250_000, 2.5e-06, 400_000) == 7
    assert 2.5e-06 * 1e6 == 2.5 and round(2.5e-06 * 1e6) == 2


def test_a_changed_hex_digit_in_the_doc_fails():
    """The comparison is strict: one changed character of any documented value is caught."""
    text = DOC.read_text()
    for value in expected_values().values():
        line = value[:64] if len(value) > 52 else value
        changed = text.replace(line, ("0" if line[0] != "0" else "1") + line[1:], 1)
        assert changed != text, value
        assert doc_values(changed) != expected_values()


if __name__ == "__main__":
    print(render(expected_values()), end="")
