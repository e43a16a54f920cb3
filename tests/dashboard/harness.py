"""A node's HTTP side, running for tests: real HttpService on a loopback socket, real Ledger file,
real CapacityTracker and EventBus, on an asyncio loop in its own thread (so sync Playwright and
plain HTTP clients can drive it from the test thread).

Jobs are played the way the gRPC service plays them: register in the ledger, publish JobAdmitted,
JobProgress and EngineRound events, then sign the receipt with `Ledger.finish_job` and publish
JobFinished with the receipt's amount and sequence.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path

from dspark.v1.advert_pb2 import GpuInfo
from engine.api import DraftCounts
from dspark.v1.receipt_pb2 import Receipt
from node.capacity import CapacityTracker
from node.config import NodeConfig
from node.events import EventBus, JobAdmitted, JobFinished, JobProgress
from node.http_server import HttpService
from node.identity import Identity
from node.ledger import Ledger
from node.receipts import JobOutcome

from .factories import EngineState, engine_info, engine_round, stats

# Where the browser tests leave their screenshots (not committed), and how they start Debian's Chromium.
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


class NodeUnderTest:
    def __init__(self, data_dir: Path, token: str | None = None, http_listen: str = "127.0.0.1:0",
                 pricing: dict | None = None) -> None:
        self.identity = Identity.generate()
        self.config = NodeConfig(data_dir=data_dir, http_listen=http_listen, dashboard={"token": token},
                                 pricing=pricing or {})
        self.ledger = Ledger.open(data_dir / "ledger.sqlite3", self.identity)
        self.bus = EventBus()
        self.engine = EngineState(engine_info())
        self.capacity = CapacityTracker(self.config, self.identity.peer_id, self.engine.info,
                                        GpuInfo(name="cpu", count=0), self.engine)
        self.bus.subscribe(self.capacity.observe)
        self.http = HttpService(self.config, self.identity, self.engine, self.ledger, self.bus, self.capacity)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="http-loop", daemon=True)

    def start(self) -> NodeUnderTest:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.http.start(), self.loop).result(timeout=30)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.http.stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
        self.ledger.close()

    @property
    def url(self) -> str:
        return self.http.url

    def admit(self, job_id: bytes, client: Identity, prompt_tokens: int = 12, max_new_tokens: int = 64) -> None:
        self.ledger.register_job(client.public_key, job_id, hashlib.sha256(job_id).digest(),
                                 int(time.time() * 1000) + 60_000)
        self.engine.active += 1
        self.engine.free_slots -= 1
        self.bus.publish(JobAdmitted(job_id=job_id.hex(), client=client.public_key.hex(),
                                     prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens))

    def progress(self, job_id: bytes, tokens: int, elapsed: float, budgets: tuple[int, ...] = (4,)) -> None:
        self.bus.publish(engine_round(budgets, accepted=sum(budgets) // 2, seconds=0.05))
        self.bus.publish(JobProgress(job_id=job_id.hex(), output_tokens=tokens, elapsed_seconds=elapsed,
                                     first_token=tokens == 1))

    def finish(self, job_id: bytes, client: Identity, tokens: int, outcome: str = "completed",
               corpus: DraftCounts | None = None) -> Receipt:
        s = stats(tokens, rounds=max(1, tokens // 3), reached=[8, 6, 4], accepted_at=[6, 4, 2], corpus=corpus)
        envelope = self.ledger.finish_job(JobOutcome(
            job_id=job_id, client_key=client.public_key, job_digest=hashlib.sha256(job_id).digest(),
            model=self.engine.info.model_id, model_digest=self.engine.info.model_digest, drafter="ngram",
            drafter_digest=b"", outcome=outcome, stats=s, output_ids=tuple(range(tokens)), device="cpu",
            price_per_mtok_micros=self.config.pricing.per_mtok_micros, price_per_gpu_second_micros=0))
        receipt = Receipt.FromString(envelope.payload)
        self.engine.active -= 1
        self.engine.free_slots += 1
        self.bus.publish(JobFinished(job_id=job_id.hex(), client=client.public_key.hex(), outcome=outcome, stats=s,
                                     amount_micros=receipt.amount_micros, receipt_sequence=receipt.sequence,
                                     time_to_first_token=0.2))
        return receipt


def new_job_id() -> bytes:
    return os.urandom(16)
