"""The synchronous engine: a queue, a fixed set of KV-cache slots, and continuous batching.

Each `step()` admits waiting requests into free slots (the tenant holding the fewest first: `slot_order`),
prefills at most `prefill_chunk` prompt tokens (oldest request first, one ragged forward; a prompt's
last chunk also samples its first token), then runs one speculative round over every request whose
prompt is in the cache. A long prompt is thus spread over several steps and the running requests
decode between its chunks instead of waiting for all of it (chunked prefill, as in Sarathi-Serve and
vLLM). Requests join and leave between rounds. `engine/async_engine.py` runs `step()` in a thread
for the node.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import replace

import torch

from engine.api import (EngineInfo, GenerationRequest, GenerationResult, RequestRejected, RoundReport,
                        TokenChunk, share_pass_time)
from engine.config import EngineConfig
from engine.detokenize import DecodeState, Detokenizer
from engine.draft_backoff import DraftBackoff
from engine.drafters.base import Drafter
from engine.loading import LoadedTarget, device_name
from engine.memory import kv_cache_len
from engine.prefix_scheduler import PrefixScheduler
from engine.sampling import first_token
from engine.sequence import Sequence
from engine.spec_round import Schedule, full_block, speculative_round, uncount_dropped

Event = TokenChunk | GenerationResult


def first_stop(text: str, stops: tuple[str, ...], searched: int) -> int | None:
    """Where the earliest stop string in `text` starts, if any; `text[:searched]` held none when it was
    searched last."""
    cuts = [cut for stop in stops if (cut := text.find(stop, max(0, searched - len(stop) + 1))) >= 0]
    return min(cuts) if cuts else None


def slot_order(waiting: Iterable[Sequence], holding: Iterable[Sequence]) -> list[Sequence]:
    """The order in which the waiting requests take free slots: each next one is the oldest request of
    the tenant that would then hold the fewest slots (max-min fair shares of the batch, as a fair
    queue serves flows), ties going to the older request. With one tenant this is arrival order."""
    held = Counter(seq.request.tenant for seq in holding)
    lines: dict[str | None, deque[tuple[int, Sequence]]] = {}
    for arrival, seq in enumerate(waiting):
        lines.setdefault(seq.request.tenant, deque()).append((arrival, seq))
    # (slots held, arrival of its oldest waiting request, tenant): arrivals are unique, so tenants
    # (None among them) are never compared.
    heads = [(held[tenant], line[0][0], tenant) for tenant, line in lines.items()]
    heapq.heapify(heads)
    order = []
    while heads:
        count, _, tenant = heapq.heappop(heads)
        line = lines[tenant]
        order.append(line.popleft()[1])
        if line:
            heapq.heappush(heads, (count + 1, line[0][0], tenant))
    return order


class Engine:
    def __init__(self, config: EngineConfig, target: LoadedTarget, drafter: Drafter,
                 schedule: Schedule = full_block):
        self.config = config
        self.target = target
        self.model = target.model
        self.tokenizer = target.tokenizer
        self.drafter = drafter
        self.detokenizer = Detokenizer(target.tokenizer)
        self.schedule = schedule
        self.cache = self.model.new_cache(config.max_batch, kv_cache_len(config))
        self.free_slots = list(range(config.max_batch - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []   # holding a slot, prompt partly in the cache
        self.active: list[Sequence] = []       # prompt cached, decoding
        # request id -> its place in line for a slot (1: next), as of the last step; replaced whole,
        # so another thread may read it while the engine's runs (AsyncEngine.queue_position).
        self.line: dict[str, int] = {}
        self.cancelled: set[str] = set()
        # Seeds the generators of requests without a seed of their own (their drafts and rejection
        # sampling, engine/sampling.py); a benchmark seeds it for repeatable runs.
        self.rng = random.Random()
        # Only a confidence-driven schedule can decide a draft is not worth verifying.
        confidence_driven = config.scheduler != "static" or config.confidence_threshold > 0
        self.backoff = DraftBackoff() if confidence_driven and drafter.block_size else None
        self.info = EngineInfo(
            model_id=target.model_id, model_digest=target.digest, method=config.method,
            drafter_id="" if drafter.block_size == 0 else drafter.name, drafter_digest=drafter.digest,
            device=device_name(config.device),
            dtype=config.dtype, max_context=config.max_context, max_batch=config.max_batch,
            block_size=drafter.block_size)

    # ---- admission -------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        request.sampling.validate(self.config.max_context - 1)
        n = len(request.prompt_ids)
        if n == 0:
            raise RequestRejected("empty_prompt", "the prompt has no tokens")
        if n + request.sampling.max_new_tokens > self.config.max_context:
            raise RequestRejected(
                "too_long", f"prompt ({n} tokens) + max_new_tokens ({request.sampling.max_new_tokens}) "
                f"exceeds the context of {self.config.max_context} tokens")
        vocab = self.model.args.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in request.prompt_ids):
            raise RequestRejected("bad_tokens", f"prompt token ids must be in [0, {vocab})")

    def add(self, request: GenerationRequest) -> Sequence:
        self.check(request)
        # Requests already waiting take the free slots first; this one waits only past them.
        if len(self.waiting) - len(self.free_slots) >= self.config.max_queue:
            raise RequestRejected("queue_full", f"every slot is taken and {self.config.max_queue} requests "
                                                "are already waiting for one")
        seed = request.sampling.seed if request.sampling.seed is not None else self.rng.getrandbits(63)
        seq = Sequence(request=request, generator=torch.Generator().manual_seed(seed),
                       tokens=list(request.prompt_ids), prompt_len=len(request.prompt_ids))
        self.waiting.append(seq)
        return seq

    def cancel(self, request_id: str) -> bool:
        known = any(s.request_id == request_id for s in (*self.waiting, *self.prefilling, *self.active))
        if known:
            self.cancelled.add(request_id)
        return known

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.active)

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> tuple[list[Event], RoundReport | None]:
        events: list[Event] = []
        for seq in [s for s in (*self.waiting, *self.prefilling, *self.active) if s.request_id in self.cancelled]:
            events.append(self._finish(seq, "cancelled"))
        self.cancelled.clear()
        if self.waiting:
            order = slot_order(self.waiting, (*self.prefilling, *self.active))
            admitted, order = order[:len(self.free_slots)], order[len(self.free_slots):]
            for seq in admitted:
                self.waiting.remove(seq)
                self._admit(seq)
            self.line = {seq.request_id: place for place, seq in enumerate(order, 1)}
        elif self.line:
            self.line = {}
        events.extend(self._emit(self._prefill_step()))
        if not self.active:
            return events, None
        batch = list(self.active)
        ids = [seq.request_id for seq in batch]
        drafting = None
        if self.backoff is not None:
            # A proposal that costs no forward (a lookup hit) is made even for a paused request.
            turns, free = self.backoff.drafting(ids), [self.drafter.free_draft(seq) for seq in batch]
            drafting = [turn or hit for turn, hit in zip(turns, free)]
        report, committed = speculative_round(self.model, self.cache, self.drafter, batch, self.schedule,
                                              self.target.eos_token_ids, self.config.verify_budget, drafting)
        if self.backoff is not None:
            sps = self.schedule.sps if isinstance(self.schedule, PrefixScheduler) else None
            self.backoff.observe(ids, [turn and not hit for turn, hit in zip(turns, free)],
                                 list(map(len, committed)), report,
                                 None if sps is None else 1.0 / sps(report.batch_size, 1))
        events.extend(self._emit(batch))
        return events, report

    def _admit(self, seq: Sequence) -> None:
        seq.stats.queue_seconds = time.perf_counter() - seq.enqueued_at
        seq.stats.prompt_tokens = seq.prompt_len
        seq.slot = self.free_slots.pop()
        self.prefilling.append(seq)

    @torch.inference_mode()
    def _prefill_step(self) -> list[Sequence]:
        """Cache the next prompt chunks (at most `prefill_chunk` tokens, oldest request first) in one
        ragged forward; the requests whose prompt is now complete get their first token and join
        `active`, and are returned."""
        budget, rows = self.config.prefill_chunk, []
        for seq in self.prefilling:
            if budget == 0:
                break
            n = min(budget, seq.prompt_len - seq.kv_len)
            rows.append((seq, n))
            budget -= n
        if not rows:
            return []
        start, dev = time.perf_counter(), self.model.device
        lengths = [n for _, n in rows]
        width = max(lengths)
        tokens = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.empty((len(rows), width), dtype=torch.long)
        for r, (seq, n) in enumerate(rows):
            tokens[r, :n] = torch.tensor(seq.tokens[seq.kv_len:seq.kv_len + n])
            # Padding repeats the last real position: it stays inside the cache and the RoPE table.
            positions[r] = torch.arange(seq.kv_len, seq.kv_len + width).clamp_max(seq.kv_len + n - 1)
        out = self.model.forward(tokens.to(dev), positions.to(dev),
                                 torch.tensor([seq.slot for seq, _ in rows], device=dev), self.cache,
                                 taps=self.drafter.tap_layers, lengths=lengths)
        done = []
        for r, (seq, n) in enumerate(rows):
            seq.kv_len += n
            if out.taps is not None:
                seq.prompt_taps.append(out.taps[r, :n])
            if seq.kv_len == seq.prompt_len:
                seq.tokens.append(first_token(self.model.logits(out.hidden[r, n - 1]), seq.request.sampling,
                                              seq.generator))
                self.drafter.start(seq, torch.cat(seq.prompt_taps) if seq.prompt_taps else None)
                seq.prompt_taps = []
                self.prefilling.remove(seq)
                self.active.append(seq)
                done.append(seq)
        elapsed = time.perf_counter() - start
        for seq, _ in rows:
            seq.stats.prefill_seconds += elapsed
        share_pass_time([(seq.stats, n) for seq, n in rows], elapsed)
        return done

    def _emit(self, seqs: list[Sequence]) -> list[Event]:
        """Decode what the last commit added to each request (one batched tokenizer call), stream it,
        and finish the requests that are done."""
        # The requests with stop strings keep their decode state from before the commit, to replay it
        # token by token when a stop string is found (`_back_to_stop`).
        before = {seq.request_id: replace(seq.decoded) for seq in seqs if seq.request.sampling.stop}
        self.detokenizer.update([(seq.decoded, seq.output_ids) for seq in seqs])
        return [event for seq in seqs for event in self._after_commit(seq, before.get(seq.request_id))]

    def _after_commit(self, seq: Sequence, before: DecodeState | None) -> list[Event]:
        """Stream what the last commit added (`seq.decoded` is up to date), then finish the request
        if it is done. `before`: the decode state before the commit, for a request with stop strings."""
        stops, out = seq.request.sampling.stop, seq.output_ids
        # Until the request ends, its text's last character may be one the next token completes.
        ending = bool(out) and out[-1] in self.target.eos_token_ids or seq.remaining <= 0
        cut = first_stop(seq.decoded.full_text if ending else seq.decoded.settled_text, stops, seq.stop_searched)
        if cut is not None and before is not None:
            cut = self._back_to_stop(seq, before, cut)
        out = seq.output_ids
        seq.stats.output_tokens = len(out)
        decoded = seq.decoded
        text, reason = decoded.full_text, None
        if cut is not None:
            text, reason = text[:cut], "stop"
        seq.stop_searched = len(decoded.text)
        if out and out[-1] in self.target.eos_token_ids:
            reason = "stop"
        elif reason is None and seq.remaining <= 0:
            reason = "length"
        seq.text = text
        events: list[Event] = []
        visible = text
        if not reason:
            # While running, hold back anything a stop string could start with (decoded.text already
            # leaves out an incomplete UTF-8 character). Not below 0: a negative end counts from the end.
            hold = max((len(s) - 1 for s in stops), default=0)
            visible = decoded.text[:max(0, len(decoded.text) - hold)]
        if len(out) > seq.sent_tokens or len(visible) > seq.sent_text_len:
            events.append(TokenChunk(seq.request_id, tuple(out[seq.sent_tokens:]),
                                     visible[seq.sent_text_len:]))
            seq.sent_tokens, seq.sent_text_len = len(out), max(seq.sent_text_len, len(visible))
        if reason:
            events.append(self._finish(seq, reason))
        return events

    def _back_to_stop(self, seq: Sequence, state: DecodeState, cut: int) -> int:
        """Plain decoding stops at the first token whose text completes a stop string; a round that
        committed several tokens (a verified draft block) may have gone past it. Replays the commit's
        tokens one at a time from `state`, drops those after that token (they are neither streamed nor
        counted, as tokens or as accepted drafts), and returns where the stop string starts in the text
        kept."""
        out = seq.output_ids
        for n in range(seq.sent_tokens + 1, len(out)):
            self.detokenizer.update([(state, out[:n])])
            early = first_stop(state.settled_text, seq.request.sampling.stop, seq.stop_searched)
            if early is not None:
                del seq.tokens[seq.prompt_len + n:]
                uncount_dropped(seq, n - seq.sent_tokens)
                seq.decoded = state
                return early
        return cut

    def _finish(self, seq: Sequence, reason: str) -> GenerationResult:
        seq.finish_reason = reason
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.prefilling:
            self.prefilling.remove(seq)
            self.free_slots.append(seq.slot)
            seq.prompt_taps = []
        if seq in self.active:
            self.active.remove(seq)
            self.free_slots.append(seq.slot)
            self.drafter.release(seq)
            if self.backoff is not None:
                self.backoff.release(seq.request_id)
        seq.stats.output_tokens = len(seq.output_ids)
        return GenerationResult(seq.request_id, tuple(seq.output_ids), seq.text, reason, seq.stats)

    def abort_all(self) -> list[GenerationResult]:
        """Cancel everything queued or running (the engine is stopping)."""
        return [self._finish(seq, "cancelled") for seq in [*self.waiting, *self.prefilling, *self.active]]

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run one request to completion (alone or alongside whatever is active)."""
        self.add(request)
        while True:
            events, _ = self.step()
            for event in events:
                if isinstance(event, GenerationResult) and event.request_id == request.request_id:
                    return event
