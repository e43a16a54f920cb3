"""The node's HTTP service: metrics, JSON API and dashboard, served by uvicorn on the daemon's loop.

Access: bound to a loopback address, anyone on this machine may read it, but only with a Host
header naming a loopback host (a web page elsewhere cannot reach it by DNS rebinding). Bound to
any other address it refuses to start without `dashboard.token`. With a token set, every request
needs it: `Authorization: Bearer TOKEN`, `?token=TOKEN` (which also sets a cookie, so the page's
own requests and its event stream carry it), or that cookie. A refusal (421, 401) under /api/v1 is
`{"error": ...}`, as the API's other errors are, so a script reads one shape; elsewhere, on the
dashboard's pages and /metrics, it stays text, for a person at a browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
from collections.abc import Callable
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dspark.v1 import advert_pb2
from node.activity import Activity
from node.config import NodeConfig, is_loopback, split_host_port
from node.events import EventBus
from node.http_api import HTTP_ERRORS, NodeView, build_routes, error_response
from node.identity import Identity
from node.ledger import Ledger
from node.live_feed import LiveFeed
from node.metrics import EngineView, NodeMetrics

log = logging.getLogger(__name__)
COOKIE = "dspark_dashboard_token"
STOP_SECONDS = 3.0
FINAL_VIEW_S = 1.5


class HttpConfigError(ValueError):
    """The HTTP listen address or the dashboard token cannot be used; the message says why."""


def _host_of(header: str) -> str:
    """The host name of a Host header (`name`, `name:port`, `[v6]:port`), lower-cased."""
    if header.startswith("["):
        return header[1:header.find("]")].lower()
    return header.rsplit(":", 1)[0].lower()


class AccessGate:
    """ASGI middleware enforcing the access rules in the module docstring."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is None:
            host = headers.get("host", "")
            if not is_loopback(_host_of(host)):
                return await error_response(scope["path"], 421, f"Host {host!r} is not a loopback name; this "
                                            "node's dashboard is local only")(scope, receive, send)
            return await self.app(scope, receive, send)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        if query and self._matches(query):
            return await self.app(scope, receive, self._with_cookie(send))
        bearer = headers.get("authorization", "")
        cookie = _cookie(headers.get("cookie", ""), COOKIE)
        if (bearer.startswith("Bearer ") and self._matches(bearer[7:].strip())) or (cookie and self._matches(cookie)):
            return await self.app(scope, receive, send)
        await error_response(scope["path"], 401, "this node's dashboard needs its token: Authorization: Bearer TOKEN "
                             "or ?token=TOKEN (the node's dashboard.token setting, DSPARK_DASHBOARD__TOKEN)",
                             {"WWW-Authenticate": "Bearer"})(scope, receive, send)

    def _matches(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), self.token)

    def _with_cookie(self, send: Send) -> Send:
        cookie = f"{COOKIE}={self.token.decode()}; Path=/; HttpOnly; SameSite=Strict".encode()

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)
        return send_with_cookie


def _cookie(header: str, name: str) -> str:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the daemon owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class HttpService:
    name = "http"

    def __init__(self, config: NodeConfig, identity: Identity, engine: EngineView, ledger: Ledger, events: EventBus,
                 capacity: Callable[[], advert_pb2.CapacityAdvert]) -> None:
        self.host, self._port = split_host_port(config.http_listen)
        token = config.dashboard.token    # its length and alphabet are checked by DashboardConfig
        if not is_loopback(self.host) and not token:
            raise HttpConfigError(
                f"http_listen {config.http_listen!r} is not a loopback address: set dashboard.token "
                "(DSPARK_DASHBOARD__TOKEN) so only holders of the token can read the dashboard")
        activity = Activity(events)
        self.metrics = NodeMetrics(events, engine, identity.peer_id)
        self.feed = LiveFeed(events, activity)
        self._view = view = NodeView(identity=identity, engine=engine, ledger=ledger, capacity=capacity,
                                     activity=activity, metrics=self.metrics, feed=self.feed,
                                     listen={"grpc": config.grpc_listen, "http": config.http_listen,
                                             "p2p": list(config.p2p.listen)},
                                     bootstrap=tuple(config.p2p.bootstrap),
                                     # what a refused client met: the operator reads it beside the refusals
                                     admission=config.admission.model_dump(exclude={"allow", "deny"}))
        self.app = AccessGate(Starlette(routes=build_routes(view), exception_handlers=HTTP_ERRORS), token)
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None

    @property
    def port(self) -> int:
        """The bound port (the chosen one when http_listen asked for port 0)."""
        return self._port

    def others_listen_on(self, grpc: str, p2p: list[str]) -> None:
        """The gRPC and libp2p addresses as bound, once those services listen: the config's may say
        port 0, which the status would otherwise report as the node's address."""
        self._view.listen.update(grpc=grpc, p2p=list(p2p))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._port))
        except OSError as exc:
            sock.close()
            raise HttpConfigError(f"cannot listen on {self.host}:{self._port} for HTTP: {exc.strerror}") from None
        self._port = sock.getsockname()[1]
        self._view.listen["http"] = self.url.removeprefix("http://")
        self.feed.bind(asyncio.get_running_loop())
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=STOP_SECONDS)
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-server")
        while not self._server.started:
            if self._task.done():  # startup failed: surface its exception
                sock.close()
                self._task.result()
                raise HttpConfigError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("dashboard and metrics on %s", self.url)

    async def wait(self) -> None:
        """Returns (or raises) only if the server stops without being asked to (the supervisor watches)."""
        if self._task is not None:
            await asyncio.shield(self._task)
            raise RuntimeError("the HTTP server stopped on its own")

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        if self.feed.connected:
            # The drained jobs' last events reach open dashboards as this service stops; a dashboard
            # reloads its panels half a second after an event. Stopped at once, it never showed the
            # last jobs finished: it went from running to unreachable.
            await asyncio.sleep(FINAL_VIEW_S)
        self.feed.close()
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, timeout=STOP_SECONDS + 2)
        finally:
            self._server = None
            self._task = None
