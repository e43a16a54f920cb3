"""Which worker a client sends its job to: a pure function over the adverts it has seen.

The policy, in order:
1. Eligible: the worker advertises the model, is not draining (shutting down: it would refuse the
   job), its prices per million output tokens and per GPU-second are within the client's caps (if
   any; a worker above one would refuse the job), and the client has not already failed over away
   from it.
2. Workers with a free slot come before saturated ones; saturated ones by shortest queue.
3. Then the lower price per million output tokens, the time charge included: the GPU-second price
   over the advertised speed (output tokens per billed GPU-second of its recent jobs: a job's
   GPU-seconds are its share of the device's time, node/receipts.py). A worker with no measured
   speed yet is priced as if it made one token a second: an unknown speed is no licence to bill
   time, and a worker that slow has nothing to sell.
   Ranked on the token price alone, a worker advertising 0 per token and any price per GPU-second
   came first, and a client without a GPU-second cap paid it. (A worker that overstates its speed
   to look cheap still bills at most the wall time the client waited: the client refuses more.)
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


UNMEASURED_TOKENS_PER_SECOND = 1.0     # the speed a time price is counted at before any is measured


@dataclass(frozen=True)
class Candidate:
    peer_id: str
    grpc_endpoint: str
    price_per_mtok_micros: int
    price_per_gpu_second_micros: int
    free_slots: int
    queue_depth: int
    tokens_per_second: float
    tls_cert_sha256: bytes
    latency_s: float | None = None

    @classmethod
    def from_advert(cls, advert: CapacityAdvert, latency_s: float | None = None) -> Candidate:
        return cls(advert.peer_id, advert.grpc_endpoint, advert.price_per_mtok_micros,
                   advert.price_per_gpu_second_micros, advert.free_slots, advert.queue_depth,
                   advert.tokens_per_second, bytes(advert.tls_cert_sha256), latency_s)

    @property
    def speed(self) -> float:
        """Advertised tokens per billed GPU-second; 0 when unmeasured (or not a finite positive number)."""
        return self.tokens_per_second if math.isfinite(self.tokens_per_second) and self.tokens_per_second > 0 else 0.0

    @property
    def price_per_mtok_with_time(self) -> float:
        """What a million output tokens cost at the advertised speed (module docstring, rule 3)."""
        speed = self.speed or UNMEASURED_TOKENS_PER_SECOND
        return self.price_per_mtok_micros + self.price_per_gpu_second_micros * 1e6 / speed


def _key(c: Candidate) -> tuple:
    saturated = c.free_slots == 0
    latency = c.latency_s if c.latency_s is not None else math.inf
    return (saturated, c.queue_depth if saturated else 0, c.price_per_mtok_with_time, -c.speed, latency, c.peer_id)


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
         max_price_per_gpu_second_micros: int | None = None, demoted: frozenset[str] = frozenset()
         ) -> list[Candidate]:
    """Candidates for `model`, best first (policy in the module docstring); `demoted` workers (a
    long-lived client's recent failures) come after all the others, in the same order among themselves."""
    latencies = latencies or {}
    eligible = [
        Candidate.from_advert(a, latencies.get(a.peer_id)) for a in adverts
        if any(m.id == model for m in a.models) and a.peer_id not in exclude and not a.draining
        and not over_caps(a, max_price_per_mtok_micros, max_price_per_gpu_second_micros)
    ]
    return sorted(eligible, key=lambda c: (c.peer_id in demoted, _key(c)))
