"""The gateway's HTTP API (OpenAI-compatible), a Starlette app served by uvicorn:
POST /v1/chat/completions, POST /v1/completions (JSON, or server-sent events with `stream`),
GET /v1/models. Access: with API keys, every request needs `Authorization: Bearer KEY`; without
(loopback only, see config.py), the Host header must name a loopback host (no DNS rebinding), and
an Origin header, if any, a loopback origin (no web page of another site).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Literal, NoReturn
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from node.config import is_loopback
from node.envelope import digest
from node.gateway.errors import ApiError
from node.gateway.gateway import Gateway
from node.gateway.openai_schema import (ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                                        ChatMessageOut, ChunkDelta, Completion, CompletionChoice,
                                        CompletionChunk, Extension, JobParams, Usage, parse_request)
from node.gateway.receipt_store import account_of
from node.http_server import _host_of
from node.p2p.failover import NetworkResult

Kind = Literal["chat", "completion"]
MAX_BODY_BYTES = 4 * 1024 * 1024      # a prompt far beyond any worker's context still fits
CLIENT_LEFT = 499     # nginx's "client closed request": the status of a response nobody reads
log = logging.getLogger(__name__)


def _extension(outcome: NetworkResult) -> Extension:
    result = outcome.result
    return Extension(worker=outcome.worker, receipt_digest=digest(result.receipt_envelope).hex(),
                     receipt_sequence=result.receipt.sequence, tau=result.receipt.tau,
                     amount_micros=result.receipt.amount_micros, job_id=result.job_id.hex(),
                     failovers=len(outcome.attempts) - 1)


def _usage(outcome: NetworkResult) -> Usage:
    receipt = outcome.result.receipt
    return Usage(prompt_tokens=receipt.prompt_tokens, completion_tokens=receipt.output_tokens,
                 total_tokens=receipt.prompt_tokens + receipt.output_tokens)


def _receipt_headers(outcome: NetworkResult) -> dict[str, str]:
    result = outcome.result
    return {"x-dspark-receipt": digest(result.receipt_envelope).hex(), "x-dspark-worker": outcome.worker,
            "x-dspark-tau": f"{result.receipt.tau:.4f}"}


async def _error_response(_request: Request, exc: Exception) -> Response:
    return _as_api_error(exc).response()


async def _route_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (no such route: 404, wrong method: 405) in OpenAI's error body, as
    every other error, so an SDK shows what was wrong rather than a bare "Not Found"."""
    response = ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}").response()
    response.headers.update(exc.headers or {})     # 405's Allow
    return response


def _as_api_error(exc: BaseException) -> ApiError:
    """An ApiError as it is; anything else is a bug: logged here, and the client gets a reference
    to the log line, never the exception text."""
    if isinstance(exc, ApiError):
        return exc
    reference = secrets.token_hex(6)
    log.error("unexpected error (reference %s)", reference, exc_info=exc)
    return ApiError(500, f"internal error in the gateway (reference {reference} in its log)")


def _json_body(raw: bytes) -> object:
    try:
        return json.loads(raw, parse_constant=_not_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}") from None
    except ValueError:       # an integer of more digits than Python converts (4300): no parameter takes one
        raise ApiError(400, "the request body holds a number of thousands of digits") from None
    except RecursionError:   # a few hundred KB of "[" nest deeper than the parser recurses
        raise ApiError(400, "the request body nests too deeply to be a request") from None


def _not_json(constant: str) -> NoReturn:
    """json.loads takes NaN and Infinity, which JSON has not: a NaN temperature would be refused as
    "not <= 2", which names the wrong fault."""
    raise ApiError(400, f"the request body is not JSON: {constant} is not a JSON number")


class GatewayApp:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self._keys = [k.encode() for k in gateway.config.api_keys]
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/completions", self._completion, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
        ], exception_handlers={HTTPException: _route_error, ApiError: _error_response, Exception: _error_response})

    def _account(self, request: Request) -> str:
        """The spending account of the request's key; raises 401/403."""
        if not self._keys:
            if not is_loopback(_host_of(request.headers.get("host", ""))):
                raise ApiError(403, "this gateway serves loopback clients only (Host header is not a loopback "
                                    "name)", code="forbidden_host")
            # A web page elsewhere may still post to the loopback gateway (a "simple" no-cors request
            # needs no preflight, and the body is read as JSON whatever its Content-Type), spending
            # this machine's budget; a browser names the page in Origin, which SDKs and curl do not send.
            origin = request.headers.get("origin")
            if origin is not None and not is_loopback(urlsplit(origin).hostname or ""):
                raise ApiError(403, f"this gateway without API keys serves no web page of another site (Origin "
                                    f"{origin!r})", code="forbidden_origin")
            return account_of(None)
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:     # the scheme is case-insensitive (RFC 9110, 11.1)
            raise ApiError(401, "this gateway needs an API key: Authorization: Bearer KEY", code="missing_api_key")
        if not any(hmac.compare_digest(key.encode(), known) for known in self._keys):
            raise ApiError(403, "the API key is not one this gateway accepts", code="invalid_api_key")
        return account_of(key)

    async def _models(self, request: Request) -> Response:
        self._account(request)
        return JSONResponse(self.gateway.models().model_dump())

    async def _chat(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    async def _completion(self, request: Request) -> Response:
        return await self._complete(request, "completion")

    async def _complete(self, request: Request, kind: Kind) -> Response:
        account = self._account(request)
        raw = bytearray()
        try:
            async for part in request.stream():     # read at most MAX_BODY_BYTES, whatever Content-Length says
                raw += part
                if len(raw) > MAX_BODY_BYTES:
                    raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
        except ClientDisconnect:        # gone while sending its request (a timeout, a Ctrl-C): not a fault here
            return Response(status_code=CLIENT_LEFT)
        params = parse_request(kind, _json_body(raw))
        self.gateway.check_model(params.model)
        await self.gateway.check_budget(account)
        stream = _Stream(kind, params)
        task = asyncio.create_task(self.gateway.run(params, account, stream.queue.put_nowait, stream.set_worker))
        try:
            if not params.stream:
                outcome = await _unless_client_leaves(request, task, task)
                return JSONResponse(stream.whole(outcome).model_dump(), headers=_receipt_headers(outcome))
            task.add_done_callback(lambda _: stream.queue.put_nowait(None))     # the end of the text
            # Hold the response until the first token (or the end): errors before it are plain HTTP errors.
            first = await _unless_client_leaves(request, task, asyncio.ensure_future(stream.queue.get()))
        except _ClientLeft:
            return Response(status_code=CLIENT_LEFT)
        if first is None:
            task.result()          # raises the ApiError of a job that failed before any text
        return StreamingResponse(stream.events(task, first), media_type="text/event-stream",
                                 headers={"x-dspark-worker": stream.worker, "cache-control": "no-cache"})


class _ClientLeft(Exception):
    pass


async def _client_gone(request: Request) -> None:
    """Returns when the client closes its connection. Called once the body is read: a receive() then
    has nothing but the disconnect to wait for."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, job: asyncio.Task, step: asyncio.Future):
    """The result of `step` (the job, or its first text), unless the client leaves before it: then
    the job is cancelled on its worker and _ClientLeft raised. uvicorn does not cancel a handler
    whose client has gone, so without this a whole answer nobody waits for any more (an SDK's
    timeout, a Ctrl-C) would run to its end, and be billed; a stream, to its first token."""
    gone = asyncio.create_task(_client_gone(request))
    try:
        await asyncio.wait((step, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not step.done():      # the client left, or the gateway is stopping
            step.cancel()
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError, ApiError):
                await job
    if step.cancelled():
        raise _ClientLeft
    return step.result()


class _Stream:
    """One request's chunks in OpenAI's format, fed by the job's streamed text."""

    def __init__(self, kind: Kind, params: JobParams):
        self.kind = kind
        self.params = params
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()   # streamed text, then None at the end
        self.worker = ""
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def set_worker(self, peer_id: str) -> None:
        self.worker = peer_id

    def whole(self, outcome: NetworkResult) -> ChatCompletion | Completion:
        result = outcome.result
        common = dict(id=self.id, created=self.created, model=self.params.model, usage=_usage(outcome),
                      dspark=_extension(outcome))
        if self.kind == "chat":
            return ChatCompletion(choices=[ChatChoice(message=ChatMessageOut(content=result.text),
                                                      finish_reason=result.finish_reason)], **common)
        return Completion(choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
                          **common)

    def _chunk(self, text: str | None, finish: str | None = None, **extra) -> str:
        common = dict(id=self.id, created=self.created, model=self.params.model, **extra)
        if self.kind == "chat":
            choices = [] if extra.get("usage") else [ChatChunkChoice(
                delta=ChunkDelta(role="assistant" if text == "" and finish is None else None, content=text),
                finish_reason=finish)]
            body = ChatCompletionChunk(choices=choices, **common)
        else:
            choices = [] if extra.get("usage") else [CompletionChoice(text=text or "", finish_reason=finish)]
            body = CompletionChunk(choices=choices, **common)
        return f"data: {body.model_dump_json()}\n\n"

    async def events(self, task: asyncio.Task[NetworkResult], first: str | None) -> AsyncIterator[str]:
        try:
            if self.kind == "chat":
                yield self._chunk("")           # OpenAI's first chunk: the role, no text
            text = first
            while text is not None:
                if text:
                    yield self._chunk(text)
                text = await self.queue.get()
            try:
                outcome = task.result()
            except Exception as exc:          # e.g. the worker died after the first token: end with an error
                yield f"data: {json.dumps(_as_api_error(exc).body())}\n\n"
                return
            yield self._chunk(None if self.kind == "chat" else "", outcome.result.finish_reason,
                              dspark=_extension(outcome))
            if self.params.include_usage:
                yield self._chunk(None, usage=_usage(outcome))
            yield "data: [DONE]\n\n"
        finally:
            if not task.done():                # the client went away: stop the job on its worker
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ApiError):
                    await task
