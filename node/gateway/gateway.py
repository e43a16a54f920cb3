"""The gateway's work behind the HTTP layer: one long-lived network membership, jobs run with the
network's selection and failover, receipts verified, kept and countersigned, budgets per key."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from dspark.v1.advert_pb2 import CapacityAdvert
from node.client import ClientError, JobRefused, JobResult, WorkerClient
from node.gateway.config import GatewayConfig
from node.gateway.errors import ApiError, network_error
from node.gateway.openai_schema import JobParams, ModelCard, ModelList
from node.gateway.pool import WorkerPool
from node.gateway.receipt_store import STORE_FILE, ReceiptStore
from node.identity import Identity
from node.p2p.discovery import Discovery
from node.p2p.failover import NetworkResult, NoWorkerError, run_with_failover
from node.p2p.recent_failures import RecentFailures
from node.receipts import acknowledgment

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, config: GatewayConfig, identity: Identity):
        self.config = config
        self.identity = identity
        self.discovery = Discovery(identity, config.bootstrap, mdns=config.mdns)
        self.store = ReceiptStore.open(config.data_dir / STORE_FILE, identity.public_key)
        self._spent: dict[str, int] = {}     # account -> micros, loaded from the store on first use
        self.pool = WorkerPool()
        self.recent_failures = RecentFailures()

    async def start(self) -> None:
        await self.discovery.start()

    async def stop(self) -> None:
        try:
            await self.pool.close()
            await self.discovery.stop()
        finally:
            # Off the loop, as every other store call: closing waits for a write still in its thread
            # (the store's lock) and checkpoints the WAL.
            await asyncio.to_thread(self.store.close)

    def models(self) -> ModelList:
        return model_list(live.advert for live in self.discovery.adverts())

    def check_model(self, model: str) -> None:
        if not any(live.advert.models for live in self.discovery.adverts()):
            raise ApiError(503, "no worker serving a model is visible on the peer network", code="no_workers")
        if not self.discovery.adverts(model):
            raise ApiError(404, f"the model {model!r} does not exist on the network (GET /v1/models lists "
                                "what workers serve)", param="model", code="model_not_found")

    async def check_budget(self, account: str) -> None:
        budget = self.config.budget_micros
        if budget is None:
            return
        if account not in self._spent:
            self._spent[account] = await asyncio.to_thread(self.store.spent, account)
        if self._spent[account] >= budget:
            raise ApiError(402, f"this key's budget of {budget} micro-units is spent "
                                f"({self._spent[account]} billed)", code="budget_exhausted")

    async def run(self, params: JobParams, account: str, on_text: Callable[[str], None],
                  on_worker: Callable[[str], None] | None = None) -> NetworkResult:
        """Run the job; a worker failing is replaced by the next one. Once a streamed request's first
        token has gone out the call ends instead (the client has text that cannot be taken back); a
        whole answer is sent from the final result only, so it fails over at any point. Raises
        ApiError on what the client must be told."""
        async def keep_receipt(client: WorkerClient, result: JobResult) -> None:
            await self._keep(client, result, account)

        try:
            result = await run_with_failover(
                self.discovery, self.identity, params.model, params.prompt, max_new_tokens=params.max_new_tokens,
                temperature=params.temperature, top_p=params.top_p, seed=params.seed, stop=params.stop,
                max_price_per_mtok_micros=self.config.max_price_per_mtok_micros,
                max_price_per_gpu_second_micros=self.config.max_price_per_gpu_second_micros, tls=self.config.tls,
                timeout_s=self.config.timeout_s, idle_timeout_s=self.config.idle_timeout_s,
                max_attempts=self.config.attempts, on_text=on_text, on_worker=on_worker, on_completed=keep_receipt,
                failover_after_output=not params.stream, discovery_wait_s=0.0, connect=self.pool.connect,
                demoted=self.recent_failures.demoted())
        except NoWorkerError as exc:
            self.recent_failures.record(exc.attempts)
            raise network_error(exc, params.model, "messages" if "chat" in params.prompt else "prompt") from None
        self.recent_failures.record(result.attempts)
        return result

    async def _keep(self, client: WorkerClient, result: JobResult, account: str) -> None:
        """The receipt (verified by WorkerClient.run) is stored with the gateway's acknowledgment
        before the worker is sent that acknowledgment, so the gateway's copy never lags."""
        ack = acknowledgment(self.identity, result.receipt_envelope)
        await asyncio.to_thread(self.store.add, result.receipt_envelope, result.receipt, ack, account)
        if account in self._spent:
            self._spent[account] += result.receipt.amount_micros
        try:
            await client.acknowledge(result.receipt_envelope, ack=ack)
        except (JobRefused, ClientError) as exc:   # the receipt is kept; the worker lacks our countersignature
            log.warning("worker %s did not take the acknowledgment of job %s: %s", client.peer_id,
                        result.job_id.hex(), exc)


def model_list(adverts: Iterable[CapacityAdvert]) -> ModelList:
    """Each model workers advertise now, with its best price and best measured speed. A draining
    worker (shutting down) takes no job, so it is no worker of any model here."""
    cards: dict[str, dict] = {}
    for advert in adverts:
        if advert.draining:
            continue
        for offer in advert.models:
            card = cards.setdefault(offer.id, {"workers": 0, "best_price_per_mtok_micros": None,
                                               "tokens_per_second": 0.0, "free_slots": 0, "drafters": [],
                                               "max_context": 0})
            card["workers"] += 1
            price = card["best_price_per_mtok_micros"]
            card["best_price_per_mtok_micros"] = min(advert.price_per_mtok_micros, price if price is not None
                                                     else advert.price_per_mtok_micros)
            card["tokens_per_second"] = max(card["tokens_per_second"], advert.tokens_per_second)
            card["free_slots"] += advert.free_slots
            card["max_context"] = max(card["max_context"], offer.max_context)
            if offer.drafter and offer.drafter not in card["drafters"]:
                card["drafters"].append(offer.drafter)
    return ModelList(data=[ModelCard(id=model, dspark=card) for model, card in sorted(cards.items())])
