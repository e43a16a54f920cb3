"""The engine for an asyncio server: `Engine.step()` runs in one thread that owns the model.

Requests and cancellations cross into the thread through a lock-protected inbox; events come back
to each request's asyncio queue with `call_soon_threadsafe`. Torch releases the GIL inside its
kernels, so the event loop stays responsive while a round runs, and a watchdog on the loop notices
a round that never ends (a hung GPU): see `_watch_for_stall`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator, Callable

from jinja2 import TemplateError

from engine.api import (CorpusFill, EngineFailed, GenerationRequest, GenerationResult, RequestRejected, RoundReport,
                        TokenChunk)
from engine.build import build_engine
from engine.config import EngineConfig
from engine.engine import Engine

log = logging.getLogger(__name__)


class EngineStalled(RuntimeError):
    """A round ran past `EngineConfig.stall_timeout_s`."""


class AsyncEngine:
    name = "engine"

    def __init__(self, engine: Engine, stall_timeout_s: float = 0.0):
        self.engine = engine
        self.stall_timeout_s = stall_timeout_s
        self.info = engine.info
        self.tokenizer = engine.tokenizer
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[tuple[GenerationRequest, asyncio.Queue, asyncio.AbstractEventLoop]] = []
        self._cancels: list[str] = []
        self._queues: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._listeners: list[Callable[[RoundReport], None]] = []
        self._thread: threading.Thread | None = None
        self._running = False
        self._round_started: float | None = None     # monotonic; None while the thread waits for work
        self._watchdog: asyncio.Task | None = None
        self.failure: BaseException | None = None

    # ---- what the node reads ------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids; ValueError when the model's chat template refuses the messages."""
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except TemplateError as exc:   # raise_exception in the template: Gemma's "System role not supported"...
            raise ValueError(f"the model's chat template refuses these messages: {exc}") from None
        return list(ids if isinstance(ids, list) else ids["input_ids"])

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def check(self, request: GenerationRequest) -> None:
        self.engine.check(request)

    @property
    def active(self) -> int:
        """Requests holding a slot: prefilling or decoding."""
        return len(self.engine.prefilling) + len(self.engine.active)

    @property
    def queue_depth(self) -> int:
        return len(self.engine.waiting) + len(self._inbox)

    def queue_position(self, request_id: str) -> int:
        """Requests ahead of this one in line for a slot, plus one; 0 once it holds one (or has
        ended). The engine's line as of its last step (slot_order); a request handed in since waits
        behind that line."""
        line = self.engine.line
        if request_id in line:
            return line[request_id]
        with self._lock:
            arrived = [request.request_id for request, _, _ in self._inbox]
        return len(line) + 1 + arrived.index(request_id) if request_id in arrived else 0

    @property
    def free_slots(self) -> int:
        return max(0, len(self.engine.free_slots) - self.queue_depth)

    @property
    def corpus_fill(self) -> CorpusFill | None:
        return self.engine.drafter.corpus_fill()

    def add_round_listener(self, callback: Callable[[RoundReport], None]) -> None:
        self._listeners.append(callback)

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self._running = True
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(loop,), name="dspark-engine", daemon=True)
        self._thread.start()
        if self.stall_timeout_s:
            self._watchdog = loop.create_task(self._watch_for_stall(), name="engine-watchdog")

    async def wait(self) -> None:
        """Returns when the engine thread ends; raises what killed it (the daemon's supervisor
        watches this to stop the node when the model fails)."""
        await asyncio.shield(self._done)

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        with self._wake:
            self._running = False
            self._wake.notify()
        if isinstance(self.failure, EngineStalled):
            # Its thread is inside a call that does not return; it is a daemon thread and ends with
            # the process. Joining it would hold the node's stop until the supervisor's time limit.
            return
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # ---- requests -----------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk | GenerationResult]:
        self.engine.check(request)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._wake:
            # The engine thread drains the inbox under this lock when it ends: a request is either
            # refused here or answered there.
            if not self._running:
                raise RequestRejected("stopping", "the engine is not running")
            self._inbox.append((request, queue, loop))
            self._wake.notify()
        finished = False
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, GenerationResult):
                    finished = True
                    return
        finally:
            if not finished:  # the consumer went away (client cancelled, deadline): free the slot
                self.cancel(request.request_id)

    def cancel(self, request_id: str) -> bool:
        with self._wake:
            if request_id not in self._queues and all(r.request_id != request_id for r, _, _ in self._inbox):
                return False
            self._cancels.append(request_id)
            self._wake.notify()
        return True

    # ---- the engine thread --------------------------------------------------------------
    def _deliver(self, request_id: str, event) -> None:
        target = self._queues.get(request_id)
        if target is None:
            return
        if isinstance(event, GenerationResult):
            del self._queues[request_id]
        _put(*target, event)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while True:
                with self._wake:
                    while self._running and not (self._inbox or self._cancels or self.engine.has_work):
                        self._wake.wait()
                    if not self._running:
                        break
                    inbox, self._inbox = self._inbox, []
                    cancels, self._cancels = self._cancels, []
                self._round_started = time.monotonic()
                # All registered before any is added: should an add fail beyond a refusal, the
                # handler below answers the whole inbox, not only the requests before it.
                for request, queue, request_loop in inbox:
                    self._queues[request.request_id] = (queue, request_loop)
                for request, _, _ in inbox:
                    try:
                        self.engine.add(request)
                    except RequestRejected as exc:
                        self._deliver(request.request_id, exc)
                        self._queues.pop(request.request_id, None)
                for request_id in cancels:
                    self.engine.cancel(request_id)
                events, report = self.engine.step()
                for event in events:
                    self._deliver(event.request_id, event)
                if report is not None:
                    for listener in self._listeners:
                        listener(report)
                self._round_started = None
        except BaseException as exc:  # the model failed: fail every waiting request, surface it
            log.exception("engine loop failed")
            self.failure = exc
            for request_id in list(self._queues):
                self._deliver(request_id, self._failed())
        finally:
            with self._wake:
                self._running = False
                unserved, self._inbox = self._inbox, []
            # Requests that arrived during the last round never reached the engine: they end too.
            for _, queue, request_loop in unserved:
                _put(queue, request_loop, self._failed() if self.failure
                     else RequestRejected("stopping", "the engine stopped before serving the request"))
            for result in self.engine.abort_all():
                self._deliver(result.request_id, result)
            try:
                loop.call_soon_threadsafe(self._finish_wait)
            except RuntimeError:  # the loop is already closed
                pass

    async def _watch_for_stall(self) -> None:
        """A GPU that hangs (an Xid error, a driver fault) leaves the engine thread in a kernel call
        that never returns. The node would go on advertising and accepting jobs that never finish,
        each client waiting out its deadline. A round past the limit fails every request now, so the
        clients can go to another worker, and ends `wait()`, so the node stops and its supervisor
        (systemd, Docker, Akash) restarts it: a new process gets a new CUDA context."""
        limit = self.stall_timeout_s
        while not self._done.done():
            await asyncio.sleep(min(limit / 4, 5.0))
            started = self._round_started
            elapsed = 0.0 if started is None else time.monotonic() - started
            if elapsed > limit:
                self._fail_stalled(elapsed)
                return

    def _fail_stalled(self, seconds: float) -> None:
        with self._wake:
            self._running = False     # new requests are refused; should the round ever end, the thread ends
            unserved, self._inbox = self._inbox, []
        self.failure = EngineStalled(
            f"engine stalled: a round has run {seconds:.3g} s (engine.stall_timeout_s = {self.stall_timeout_s:g}); "
            f"the device or its driver may be hung, and a restart of the node is the fix")
        log.critical("%s; failing %d request(s) and stopping", self.failure, len(self._queues) + len(unserved))
        # Left in self._queues: should the round end after all, the thread's events for them go to
        # queues nobody reads, and their consumers' cancels still find them.
        waiting = [*self._queues.values(), *((queue, loop) for _, queue, loop in unserved)]
        for queue, request_loop in waiting:
            _put(queue, request_loop, self._failed())
        self._done.set_exception(self.failure)

    def _failed(self) -> EngineFailed:
        """What every request the failure ended is answered with."""
        return EngineFailed(f"engine failed: {self.failure}")

    def _finish_wait(self) -> None:
        if self._done.done():
            return
        if self.failure is not None:
            self._done.set_exception(RuntimeError(f"engine thread failed: {self.failure}"))
        else:
            self._done.set_result(None)


def _put(queue: asyncio.Queue, loop: asyncio.AbstractEventLoop, event) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, event)
    except RuntimeError:  # the request's event loop has closed
        pass


def load_async_engine(config: EngineConfig) -> AsyncEngine:
    return AsyncEngine(build_engine(config), config.stall_timeout_s)
