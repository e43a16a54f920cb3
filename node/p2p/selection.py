"""Which worker a client sends its job to: a pure function over the adverts it has seen.

The policy, in order:
1. Eligible: the worker advertises the model, its prices per million output tokens and per
   GPU-second are within the client's caps (if any; a worker above one would refuse the job), and
   the client has not already failed over away from it.
2. Workers with a free slot come before saturated ones; saturated ones by shortest queue.
3. Then the lower price.
4. Then the higher measured speed (tokens/s from the worker's recent receipts; unmeasured = 0).
5. Then the lower measured latency (the client's GetCapacity round trip; unknown = last).
6. Then the peer ID, so the choice is deterministic.
The client tries the ranked list in order, failing over to the next on refusal or death.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dspark.v1.advert_pb2 import CapacityAdvert


@dataclass(frozen=True)
class Candidate:
    peer_id: str
    grpc_endpoint: str
    price_per_mtok_micros: int
    free_slots: int
    queue_depth: int
    tokens_per_second: float
    tls_cert_sha256: bytes
    latency_s: float | None = None

    @classmethod
    def from_advert(cls, advert: CapacityAdvert, latency_s: float | None = None) -> Candidate:
        return cls(advert.peer_id, advert.grpc_endpoint, advert.price_per_mtok_micros, advert.free_slots,
                   advert.queue_depth, advert.tokens_per_second, bytes(advert.tls_cert_sha256), latency_s)


def _key(c: Candidate) -> tuple:
    saturated = c.free_slots == 0
    speed = c.tokens_per_second if math.isfinite(c.tokens_per_second) else 0.0
    latency = c.latency_s if c.latency_s is not None else math.inf
    return (saturated, c.queue_depth if saturated else 0, c.price_per_mtok_micros, -speed, latency, c.peer_id)


def over_caps(advert: CapacityAdvert, max_price_per_mtok_micros: int | None = None,
              max_price_per_gpu_second_micros: int | None = None) -> str:
    """Which of the worker's prices are above the client's caps ("" when none is): why it is not chosen."""
    over = []
    if max_price_per_mtok_micros is not None and advert.price_per_mtok_micros > max_price_per_mtok_micros:
        over.append(f"{advert.price_per_mtok_micros} micros per million tokens, above the cap of "
                    f"{max_price_per_mtok_micros}")
    if (max_price_per_gpu_second_micros is not None
            and advert.price_per_gpu_second_micros > max_price_per_gpu_second_micros):
        over.append(f"{advert.price_per_gpu_second_micros} micros per GPU-second, above the cap of "
                    f"{max_price_per_gpu_second_micros}")
    return " and ".join(over)


def rank(adverts: Iterable[CapacityAdvert], model: str, max_price_per_mtok_micros: int | None = None,
         exclude: frozenset[str] = frozenset(), latencies: Mapping[str, float] | None = None, *,
         max_price_per_gpu_second_micros: int | None = None) -> list[Candidate]:
    """Candidates for `model`, best first (policy in the module docstring)."""
    latencies = latencies or {}
    eligible = [
        Candidate.from_advert(a, latencies.get(a.peer_id)) for a in adverts
        if any(m.id == model for m in a.models) and a.peer_id not in exclude
        and not over_caps(a, max_price_per_mtok_micros, max_price_per_gpu_second_micros)
    ]
    return sorted(eligible, key=_key)
