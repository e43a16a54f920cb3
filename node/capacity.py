"""What this node offers right now, as an unsigned CapacityAdvert (signed by whoever sends it).

The gRPC service seals it for GetCapacity, the p2p layer for gossip. Throughput comes from the
jobs that recently finished (the JobFinished events that carry each receipt's stats), so the
advert reports what the node measured, not what it hopes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Protocol

from dspark.v1.advert_pb2 import CapacityAdvert, GpuInfo, ModelOffer
from engine.api import EngineInfo
from node.config import NodeConfig
from node.events import Event, JobFinished, NodeDraining

_RECENT_JOBS = 32


class EngineLoad(Protocol):
    """The two numbers of the engine the advert needs (AsyncEngine has them)."""
    free_slots: int
    queue_depth: int


class CapacityTracker:
    """Callable: `tracker()` -> the current CapacityAdvert. Cheap, no I/O, callable from any thread."""

    def __init__(self, config: NodeConfig, peer_id: str, info: EngineInfo, gpu: GpuInfo, engine_load: EngineLoad):
        self._config = config
        self._peer_id = peer_id
        self._info = info
        self._gpu = gpu
        self._engine = engine_load
        self._recent: deque[tuple[int, float]] = deque(maxlen=_RECENT_JOBS)   # (tokens, device seconds)
        self._lock = threading.Lock()
        self._sequence = 0
        self._draining = False
        # Filled in by the gRPC service once it is listening (the port may have been 0).
        self.grpc_endpoint = config.p2p.announce_grpc or config.grpc_listen
        self.tls_cert_sha256 = b""

    def observe(self, event: Event) -> None:
        """EventBus subscriber: remember the throughput of finished jobs that produced tokens, and
        that the node is draining (its adverts say so from then on, so clients stop choosing it)."""
        if isinstance(event, NodeDraining):
            self._draining = True
        if isinstance(event, JobFinished) and event.stats.output_tokens:
            # Per billed GPU-second (the job's share of the device), not per second its user waited:
            # clients turn a time price into a token price with it (node/p2p/selection.py), and under
            # batching it is the node's throughput, where the wall time would give one user's speed.
            with self._lock:
                self._recent.append((event.stats.output_tokens, event.stats.device_seconds))

    def tokens_per_second(self) -> float:
        with self._lock:
            tokens = sum(t for t, _ in self._recent)
            busy = sum(b for _, b in self._recent)
        return tokens / busy if busy > 0 else 0.0

    def _next_sequence(self, now_ms: int) -> int:
        # Strictly increasing per peer, across restarts too (receivers drop older adverts): the
        # millisecond clock, bumped when two adverts fall in the same millisecond.
        with self._lock:
            self._sequence = max(self._sequence + 1, now_ms)
            return self._sequence

    def __call__(self) -> CapacityAdvert:
        now_ms = int(time.time() * 1000)
        info = self._info
        advert = CapacityAdvert(
            peer_id=self._peer_id,
            listen_addrs=list(self._config.p2p.listen),
            grpc_endpoint=self.grpc_endpoint,
            gpu=self._gpu,
            models=[ModelOffer(id=info.model_id, digest=info.model_digest, drafter=info.drafter_id,
                               drafter_digest=info.drafter_digest, max_context=info.max_context)],
            price_per_mtok_micros=self._config.pricing.price_for(info.model_id),
            price_per_gpu_second_micros=self._config.pricing.per_gpu_second_micros,
            free_slots=max(0, self._engine.free_slots),
            queue_depth=max(0, self._engine.queue_depth),
            tokens_per_second=self.tokens_per_second(),
            sequence=self._next_sequence(now_ms),
            ttl_seconds=self._config.p2p.advert_ttl_s,
            issued_at_ms=now_ms,
            tls_cert_sha256=self.tls_cert_sha256,
        )
        return mark_draining(advert) if self._draining else advert


def mark_draining(advert: CapacityAdvert) -> CapacityAdvert:
    """The advert of a node shutting down: it takes no job, and says so in the field clients check and,
    for clients built before that field, with no free slot."""
    advert.draining, advert.free_slots = True, 0
    return advert
