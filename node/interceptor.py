"""The one server interceptor: malformed requests and unexpected exceptions become clean statuses.

A request whose bytes do not parse is refused with INVALID_ARGUMENT before the servicer sees it;
an exception the servicer did not expect becomes INTERNAL with a request id, and the traceback goes
to the log under that id. A peer never sees a traceback or an exception's text. A call the client
ended while its answer was being sent is one line in the log, not a traceback (AnswerTooLate).
"""

from __future__ import annotations

import contextvars
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "dspark-request-id"
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class _Malformed:
    """Stands in for a request whose bytes did not parse, so the handler can refuse it cleanly."""


MALFORMED = _Malformed()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data) if deserializer else data
        except Exception:  # protobuf raises DecodeError, and others on deeply broken input
            return MALFORMED
    return parse


async def _fail(context: grpc.aio.ServicerContext, method: str, rid: str) -> None:
    log.exception("request %s (%s) failed", rid, method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})",
                        trailing_metadata=((REQUEST_ID_KEY, rid),))


def _unary(inner: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        rid = secrets.token_hex(6)
        request_id.set(rid)
        if request is MALFORMED:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request bytes are not a valid message")
        try:
            return await inner(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception:
            await _fail(context, method, rid)
    return behavior


def _stream(inner: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., AsyncIterator[Any]]:
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        rid = secrets.token_hex(6)
        request_id.set(rid)
        if request is MALFORMED:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request bytes are not a valid message")
        try:
            async for item in inner(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception:
            await _fail(context, method, rid)
    return behavior


class AnswerTooLate(logging.Filter):
    """grpc's aio server logs a traceback at ERROR ("ExecuteBatchError raised in core by servicer
    method [...]") when a handler's answer or status goes out after the call ended on the wire: the
    client's deadline passed, or it went away, at that moment. It is the client's own doing and
    nothing it still waits for is lost (a job's cancellation or receipt does not depend on it), so the
    record becomes one INFO line. Installed on grpc's logger by `install` (once per process)."""

    LOGGER = "grpc._cython.cygrpc"

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if type(exc).__name__ != "ExecuteBatchError":   # the class lives in grpc's private module
            return True
        method = re.search(r"\[(.*)\]", record.getMessage())
        record.msg = "%s: the call ended (the client's deadline passed, or it left) as its answer was sent"
        record.args = (method.group(1) if method else "a call",)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)

    @classmethod
    def install(cls) -> None:
        logger = logging.getLogger(cls.LOGGER)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Applies to the methods under `prefix` (our service); health and reflection are grpc's own."""

    def __init__(self, prefix: str = "/dspark.v1."):
        self._prefix = prefix

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        parse = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return handler._replace(request_deserializer=parse, unary_unary=_unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(request_deserializer=parse, unary_stream=_stream(handler.unary_stream, method))
        return handler
