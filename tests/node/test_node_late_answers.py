"""An answer sent as the client's deadline passes: grpc logs a traceback at ERROR for it, and the
node's log says it in one INFO line instead (node/interceptor.py AnswerTooLate). Real calls over
loopback, through the node's interceptor, with deadlines of a few milliseconds so that some of them
pass exactly while the handler answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys

import grpc
import pytest

from node.interceptor import AnswerTooLate, ErrorInterceptor


def grpc_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == AnswerTooLate.LOGGER]


async def calls_ending_as_answered(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Random deadlines around the handlers' answer times until grpc has logged a few late answers
    (about 30 in 4,000 calls on a 2-core box); returns its records."""
    rng = random.Random(0)

    async def stream(request, context):
        await asyncio.sleep(rng.uniform(0, 0.004))
        yield b"token"

    async def unary(request, context):
        await asyncio.sleep(rng.uniform(0, 0.004))
        return b"ack"

    server = grpc.aio.server(interceptors=[ErrorInterceptor("/t.")])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Worker", {
        "Submit": grpc.unary_stream_rpc_method_handler(stream),
        "Acknowledge": grpc.unary_unary_rpc_method_handler(unary)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def one(channel: grpc.aio.Channel) -> None:
        timeout = rng.uniform(0.0005, 0.005)
        with contextlib.suppress(grpc.aio.AioRpcError):     # DEADLINE_EXCEEDED, the point
            if rng.random() < 0.5:
                _ = [m async for m in channel.unary_stream("/t.Worker/Submit")(b"", timeout=timeout)]
            else:
                await channel.unary_unary("/t.Worker/Acknowledge")(b"", timeout=timeout)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(2000):
                await asyncio.gather(*(one(channel) for _ in range(10)))
                if len(grpc_records(caplog)) >= 3:
                    break
    finally:
        await server.stop(None)
    return grpc_records(caplog)


@pytest.fixture
def grpc_logger_bare():
    """The filter is process-wide once installed; each test starts and ends without it."""
    logger = logging.getLogger(AnswerTooLate.LOGGER)
    kept = logger.filters[:]
    logger.filters = [f for f in kept if not isinstance(f, AnswerTooLate)]
    yield logger
    logger.filters = kept


@pytest.mark.asyncio
async def test_grpc_alone_logs_a_traceback_for_an_answer_after_the_deadline(grpc_logger_bare, caplog):
    """What the filter is for: without it, the node's log had ERROR tracebacks for a client's
    deadline (once in a CI soak)."""
    caplog.set_level(logging.INFO)
    records = await calls_ending_as_answered(caplog)
    assert records, "no call ended as it was answered in 20,000 tries"
    assert all(r.levelno == logging.ERROR and r.exc_info for r in records)


@pytest.mark.asyncio
async def test_the_node_logs_an_answer_after_the_deadline_in_one_info_line(grpc_logger_bare, caplog):
    AnswerTooLate.install()
    AnswerTooLate.install()     # a second gRPC service in the process does not add a second filter
    assert sum(isinstance(f, AnswerTooLate) for f in grpc_logger_bare.filters) == 1
    caplog.set_level(logging.INFO)
    records = await calls_ending_as_answered(caplog)
    assert records, "no call ended as it was answered in 20,000 tries"
    for record in records:
        assert record.levelno == logging.INFO and not record.exc_info
        assert record.getMessage().startswith(("/t.Worker/Submit: the call ended", "/t.Worker/Acknowledge: "))
    assert "Traceback" not in caplog.text


def record_of(exc: BaseException, message: str) -> logging.LogRecord:
    try:
        raise exc
    except type(exc):
        return logging.getLogger(AnswerTooLate.LOGGER).makeRecord(
            AnswerTooLate.LOGGER, logging.ERROR, "server.pyx.pxi", 710, message, (), sys.exc_info())


def test_the_filter_leaves_grpc_errors_of_other_kinds_and_respects_the_log_level(grpc_logger_bare):
    from grpc._cython import cygrpc     # grpc's private module: the exception grpc itself raises there
    other = record_of(RuntimeError("a serializer bug"), "Unexpected [RuntimeError] raised by servicer method [/x]")
    assert AnswerTooLate().filter(other) and other.levelno == logging.ERROR and other.exc_info
    grpc_logger_bare.setLevel(logging.WARNING)
    try:
        late = record_of(cygrpc.ExecuteBatchError("Failed execute_batch"),
                         "ExecuteBatchError raised in core by servicer method [/x]")
        assert not AnswerTooLate().filter(late)      # an INFO line, and the log shows WARNING and up
    finally:
        grpc_logger_bare.setLevel(logging.NOTSET)
