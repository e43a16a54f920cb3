"""One lifecycle for every long-running part of the daemon, and the supervisor that runs them.

Services start in order; if one fails to start, or one that can die (it has `wait()`) dies while
running, the supervisor stops everything already started, in reverse order, each within a time
limit, and reports what failed. A stop request (SIGTERM) takes the same path with no failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@runtime_checkable
class Watchable(Protocol):
    """A service with background work exposes `wait()`: it returns or raises when that work ends."""

    async def wait(self) -> None: ...


@dataclass
class SupervisorReport:
    failed: list[tuple[str, str]] = field(default_factory=list)    # (service, what happened)

    @property
    def ok(self) -> bool:
        return not self.failed


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line; its type where it has none (e.g. a bare TimeoutError)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class Supervisor:
    def __init__(self, services: list[Service], stop_timeout_s: float = 30.0):
        self._services = services
        self._stop_timeout_s = stop_timeout_s
        self._stop_requested = asyncio.Event()

    def request_stop(self) -> None:
        """Safe to call from a signal handler on the loop; idempotent."""
        self._stop_requested.set()

    async def run(self, on_started: Callable[[], None] | None = None) -> SupervisorReport:
        """Start all, call `on_started`, run until a stop request or a failure, stop all; never
        raises for a service."""
        report = SupervisorReport()
        started: list[Service] = []
        for service in self._services:
            if self._stop_requested.is_set():
                break
            try:
                await service.start()
            except Exception as exc:
                # An expected failure (a port taken since the pre-check, a bad file): the operator needs
                # the service and the cause on one line; the traceback only helps a developer.
                log.error("service %s failed to start: %s", service.name, _one_line(exc))
                log.debug("service %s start failure", service.name, exc_info=True)
                report.failed.append((service.name, f"start failed: {exc}"))
                break
            started.append(service)
            log.info("service %s started", service.name)
        if report.ok and len(started) == len(self._services):
            if on_started is not None:
                on_started()
            await self._wait(started, report)
        await self._stop_all(started, report)
        return report

    async def _wait(self, started: list[Service], report: SupervisorReport) -> None:
        watchers = {asyncio.create_task(s.wait(), name=f"wait-{s.name}"): s
                    for s in started if isinstance(s, Watchable)}
        stop = asyncio.create_task(self._stop_requested.wait())
        done, _ = await asyncio.wait([stop, *watchers], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is stop:
                continue
            service = watchers[task]
            exc = task.exception()
            reason = f"died: {exc}" if exc else "exited unexpectedly"
            log.error("service %s %s; stopping the node", service.name, reason)
            report.failed.append((service.name, reason))
        for task in (stop, *watchers):
            task.cancel()
        await asyncio.gather(stop, *watchers, return_exceptions=True)

    async def _stop_all(self, started: list[Service], report: SupervisorReport) -> None:
        for service in reversed(started):
            try:
                await asyncio.wait_for(service.stop(), self._stop_timeout_s)
            except TimeoutError:
                log.error("service %s did not stop within %g s", service.name, self._stop_timeout_s)
                report.failed.append((service.name, f"stop timed out after {self._stop_timeout_s:g} s"))
            except Exception as exc:
                log.exception("service %s failed to stop", service.name)
                report.failed.append((service.name, f"stop failed: {exc}"))
            else:
                log.info("service %s stopped", service.name)
