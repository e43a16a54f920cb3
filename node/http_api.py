"""The JSON API under /api/v1 (documented in docs/api.md), `/metrics`, and the dashboard's files.

Handlers only read: live engine attributes, `Activity` snapshots, and the ledger and capacity
through `asyncio.to_thread` (both may touch SQLite, which must stay off the event loop).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dspark.v1 import advert_pb2
from node.activity import Activity
from node.billing import BillingError, UnverifiedReceipt, load_period, parse_time_ms, write_export
from node.gpu import memory_in_use
from node.identity import Identity
from node.ledger import Ledger, unreadable
from node.live_feed import LiveFeed
from node.metrics import EngineView, NodeMetrics

DASHBOARD_DIR = Path(__file__).parent / "dashboard"
API = "/api/v1"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeView:
    """Everything the handlers read, gathered once by HttpService."""
    identity: Identity
    engine: EngineView
    ledger: Ledger
    capacity: Callable[[], advert_pb2.CapacityAdvert]
    activity: Activity
    metrics: NodeMetrics
    feed: LiveFeed
    listen: dict[str, Any]       # {"grpc": ..., "http": ..., "p2p": [...]}
    bootstrap: tuple[str, ...] = ()     # the peers the node joins the network through (p2p.bootstrap)
    admission: dict[str, Any] = dataclasses.field(default_factory=dict)   # [admission]'s mode and limits


def jsonable(value: Any) -> Any:
    """Plain JSON data from our dataclasses and protobuf messages; bytes as hex, 64-bit ints as numbers
    (protobuf's own JSON mapping would give base64 and strings, unlike the rest of this API)."""
    if isinstance(value, Message):
        return {f.name: [jsonable(v) for v in getattr(value, f.name)] if f.is_repeated
                else jsonable(getattr(value, f.name)) for f in value.DESCRIPTOR.fields}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _rss_bytes() -> int | None:
    """Resident memory of this process (Linux); None where /proc is absent."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _export(ledger: Ledger, fmt: str, since_ms: int | None, until_ms: int | None) -> str:
    out = io.StringIO()
    write_export(load_period(ledger, since_ms, until_ms), fmt, out)
    return out.getvalue()


def _query_problem(request: Request, allowed: frozenset[str]) -> str | None:
    """Why the query string cannot be answered as asked: a parameter the endpoint does not take, or
    one given twice. Ignoring either would answer another question than the one asked (an export
    with a misspelt `since` is a bill for the whole ledger)."""
    keys = [key for key, _ in request.query_params.multi_items() if key != "token"]  # token: AccessGate's
    for key in keys:
        if key not in allowed:
            takes = f"takes only {', '.join(sorted(allowed))}" if allowed else "takes no query parameters"
            return f"unknown query parameter {key!r}: {request.url.path} {takes}"
        if keys.count(key) > 1:
            return f"query parameter {key!r} is given {keys.count(key)} times; give it once"
    return None


def _api_route(name: str, handler: Callable[[Request], Any], *params: str) -> Route:
    """The route for `API/name`, refusing (400) a query the handler does not take."""
    allowed = frozenset(params)

    async def checked(request: Request) -> Response:
        problem = _query_problem(request, allowed)
        if problem is not None:
            return JSONResponse({"error": problem}, status_code=400)
        return await handler(request)
    return Route(f"{API}/{name}", checked)


def error_response(path: str, status: int, problem: str, headers: Mapping[str, str] | None = None) -> Response:
    """An error under the API as `{"error": ...}`, as the API answers everything; elsewhere (the
    dashboard's pages, /metrics) as text, for a person reading it in a browser or a scraper's log."""
    if path.startswith(f"{API}/"):
        return JSONResponse({"error": problem}, status_code=status, headers=headers)
    return PlainTextResponse(f"{problem}\n", status_code=status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's 404 and 405; under the API in words that name the path and the methods it answers."""
    path, problem = request.url.path, exc.detail
    if path.startswith(f"{API}/"):
        allowed = ", ".join(sorted((exc.headers or {}).get("Allow", "").split(", ")))   # Starlette's order varies
        problem = (f"{request.method} is not allowed on {path}; it answers {allowed}"
                   if exc.status_code == 405 else f"no endpoint {path}; docs/api.md lists them")
    return error_response(path, exc.status_code, problem, exc.headers)


HTTP_ERRORS = {404: _http_error, 405: _http_error}


def build_routes(node: NodeView) -> list:
    activity = node.activity

    async def status(request: Request) -> Response:
        info = node.engine.info
        advert = await asyncio.to_thread(node.capacity)
        now = time.time()
        return JSONResponse({
            "peer_id": node.identity.peer_id,
            "started_at": activity.started_at, "uptime_seconds": round(now - activity.started_at, 1),
            "engine": jsonable(info),
            "load": {"active": node.engine.active, "free_slots": node.engine.free_slots,
                     "queue_depth": node.engine.queue_depth},
            "gpu": jsonable(advert.gpu),
            "gpu_memory": jsonable(memory_in_use(info.device)),
            "process_rss_bytes": _rss_bytes(),
            "price_per_mtok_micros": advert.price_per_mtok_micros,
            "price_per_gpu_second_micros": advert.price_per_gpu_second_micros,
            "listen": node.listen,
            "admission": node.admission,
            # null while the node admits jobs; once it stops: since when, and the running jobs' grace
            "draining": activity.draining,
        })

    async def capacity(request: Request) -> Response:
        return JSONResponse(jsonable(await asyncio.to_thread(node.capacity)))

    async def jobs(request: Request) -> Response:
        return JSONResponse(activity.jobs())

    async def series(request: Request) -> Response:
        return JSONResponse(activity.series())

    async def acceptance(request: Request) -> Response:
        return JSONResponse(activity.acceptance())

    async def budget(request: Request) -> Response:
        return JSONResponse(activity.budget())

    async def drafts(request: Request) -> Response:
        return JSONResponse({"sources": activity.draft_sources(), "corpus": jsonable(node.engine.corpus_fill)})

    async def problems(request: Request) -> Response:
        return JSONResponse({"problems": activity.problems(), "refused_by_reason": activity.refused_by_reason()})

    async def peers(request: Request) -> Response:
        return JSONResponse({**activity.peers(), "peer_id": node.identity.peer_id, "listen": node.listen["p2p"],
                             "bootstrap": list(node.bootstrap)})

    async def earnings(request: Request) -> Response:
        totals = await asyncio.to_thread(node.ledger.totals)
        return JSONResponse({
            "receipts": totals.receipts, "amount_micros": totals.amount_micros,
            "output_tokens": totals.output_tokens, "acknowledged": totals.acknowledged,
            "per_client_micros": totals.per_client_micros,
            "other_clients": {"clients": totals.other_clients, "amount_micros": totals.other_clients_micros},
            "recent": [{"sequence": r.sequence, "issued_at_ms": r.issued_at_ms, "client": r.client_key.hex(),
                        "job_id": r.job_id.hex(), "outcome": r.outcome, "output_tokens": r.output_tokens,
                        "amount_micros": r.amount_micros, "acknowledged": r.ack_bytes is not None}
                       for r in totals.recent],
            "export": {fmt: f"{API}/earnings/export?format={fmt}" for fmt in EXPORT_FORMATS}})

    async def export(request: Request) -> Response:
        """The billing export of node/billing.py (receipts re-verified, per-client totals, Merkle root)."""
        fmt = request.query_params.get("format", "jsonl")
        if fmt not in EXPORT_FORMATS:
            return JSONResponse({"error": f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}"},
                                status_code=400)
        try:
            since, until = (parse_time_ms(request.query_params[k]) if k in request.query_params else None
                            for k in ("since", "until"))
            body = await asyncio.to_thread(_export, node.ledger, fmt, since, until)
        except (UnverifiedReceipt, sqlite3.Error) as exc:
            # The request was fine; the node's ledger is not (damaged, or edited behind its back). Its
            # operator must look, so it is logged; the client gets why, and no partial bill.
            problem = unreadable(exc) if isinstance(exc, sqlite3.Error) else str(exc)
            log.warning("billing export refused: %s", problem)
            return JSONResponse({"error": f"{problem}; the export is unavailable until the node's operator "
                                          "repairs the ledger"}, status_code=503)
        except BillingError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return Response(body, media_type=EXPORT_FORMATS[fmt], headers={
            "Content-Disposition": f'attachment; filename="dspark-receipts.{fmt}"'})

    async def events(request: Request) -> Response:
        if node.feed.full:
            return JSONResponse({"error": "too many live dashboards connected"}, status_code=503)
        return StreamingResponse(node.feed.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def metrics(request: Request) -> Response:
        body, content_type = node.metrics.render()
        return Response(body, media_type=content_type)

    async def index(request: Request) -> Response:
        return FileResponse(DASHBOARD_DIR / "index.html", headers={"Cache-Control": "no-store"})

    return [
        Route("/", index),
        Route("/metrics", metrics),
        _api_route("status", status),
        _api_route("capacity", capacity),
        _api_route("jobs", jobs),
        _api_route("series", series),
        _api_route("acceptance", acceptance),
        _api_route("budget", budget),
        _api_route("drafts", drafts),
        _api_route("problems", problems),
        _api_route("peers", peers),
        _api_route("earnings", earnings),
        _api_route("earnings/export", export, "format", "since", "until"),
        _api_route("events", events),
        Mount("/static", StaticFiles(directory=DASHBOARD_DIR), name="static"),
    ]


EXPORT_FORMATS = {"jsonl": "application/x-ndjson", "csv": "text/csv"}
