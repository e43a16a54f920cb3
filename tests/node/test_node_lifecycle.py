"""The supervisor: start in order, stop in reverse, fail fast, time-limited stops, a report."""

from __future__ import annotations

import asyncio
import logging

import pytest

from node.lifecycle import Supervisor


class Part:
    def __init__(self, name: str, log: list[str], fail_start: bool = False, hang_stop: bool = False):
        self.name = name
        self.log = log
        self.fail_start = fail_start
        self.hang_stop = hang_stop

    async def start(self) -> None:
        if self.fail_start:
            raise OSError("port in use")
        self.log.append(f"start {self.name}")

    async def stop(self) -> None:
        if self.hang_stop:
            await asyncio.sleep(60)
        self.log.append(f"stop {self.name}")


class Dying(Part):
    def __init__(self, name: str, log: list[str]):
        super().__init__(name, log)
        self.died = asyncio.Event()

    async def wait(self) -> None:
        await self.died.wait()
        raise RuntimeError("lost its socket")


@pytest.mark.asyncio
async def test_stop_request_stops_all_in_reverse():
    log: list[str] = []
    supervisor = Supervisor([Part("a", log), Part("b", log), Part("c", log)])
    started = asyncio.Event()
    task = asyncio.create_task(supervisor.run(on_started=started.set))
    await asyncio.wait_for(started.wait(), 5)
    supervisor.request_stop()
    report = await asyncio.wait_for(task, 5)
    assert report.ok
    assert log == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]


@pytest.mark.asyncio
async def test_a_failed_start_stops_what_started_and_reports_it():
    log: list[str] = []
    called: list[bool] = []
    supervisor = Supervisor([Part("a", log), Part("b", log, fail_start=True), Part("c", log)])
    report = await asyncio.wait_for(supervisor.run(on_started=lambda: called.append(True)), 5)
    assert log == ["start a", "stop a"]
    assert report.failed == [("b", "start failed: port in use")]
    assert not called


@pytest.mark.asyncio
async def test_a_failed_start_is_one_error_line_naming_the_service_and_the_cause(caplog):
    caplog.set_level(logging.DEBUG, logger="node.lifecycle")
    await asyncio.wait_for(Supervisor([Part("a", []), Part("http", [], fail_start=True)]).run(), 5)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["service http failed to start: port in use"]
    assert errors[0].exc_info is None               # no traceback at ERROR...
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)   # ...only at DEBUG


@pytest.mark.asyncio
async def test_a_dying_service_stops_the_node():
    log: list[str] = []
    dying = Dying("b", log)
    task = asyncio.create_task(Supervisor([Part("a", log), dying]).run())
    await asyncio.sleep(0.05)
    dying.died.set()
    report = await asyncio.wait_for(task, 5)
    assert report.failed == [("b", "died: lost its socket")]
    assert log == ["start a", "start b", "stop b", "stop a"]


@pytest.mark.asyncio
async def test_a_hanging_stop_is_time_limited_and_the_rest_still_stop():
    log: list[str] = []
    supervisor = Supervisor([Part("a", log), Part("b", log, hang_stop=True)], stop_timeout_s=0.2)
    supervisor.request_stop()
    report = await asyncio.wait_for(supervisor.run(), 5)
    # A stop requested before the start: nothing starts, nothing fails.
    assert report.ok and log == []
    supervisor = Supervisor([Part("a", log), Part("b", log, hang_stop=True)], stop_timeout_s=0.2)
    task = asyncio.create_task(supervisor.run(on_started=supervisor.request_stop))
    report = await asyncio.wait_for(task, 5)
    assert report.failed == [("b", "stop timed out after 0.2 s")]
    assert log == ["start a", "start b", "stop a"]
