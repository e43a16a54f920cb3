"""The node's configuration: embedded defaults < TOML file < `DSPARK_*` environment < CLI flags.

Loaded and validated once at start (`load_config`), then passed down; a bad value is refused with
a message naming the field and where it came from (`ConfigError`), before anything is written to
the data dir. The layering itself is node/settings.py, shared with the gateway's settings.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import multiaddr
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from engine.config import EMBEDDED_MODEL, EMBEDDED_MODEL_ID, EngineConfig
from node import keepalive
from node.envelope import quoted
from node.identity import IdentityError, public_key_from_peer_id
from node.settings import LayeredSettings, StrList, load_settings

DEFAULT_DATA_DIR = Path("~/.local/share/dspark-node")


# A model is known on the network by the id the engine serves it under (its Hugging Face id, which
# engine/loading.py reports as EngineInfo.model_id); the embedded short name is an alias of it,
# accepted wherever a model is named (pricing keys, `peers` / `submit --model`, the gateway, jobs).
_MODEL_ALIASES = {EMBEDDED_MODEL: EMBEDDED_MODEL_ID}
# Dashboard tokens travel in `?token=` and a cookie: unreserved URL characters need no encoding in
# either (a `+` would read back as a space, a `;` would end the cookie).
DASHBOARD_TOKEN_CHARS = "A-Z a-z 0-9 . _ ~ -"
_DASHBOARD_TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,}")


def model_id(name: str) -> str:
    """The id a model is served and advertised under, for a name someone gave (id or alias)."""
    return _MODEL_ALIASES.get(name, name)


def split_host_port(value: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) -> (host, port); raises ValueError naming the problem.

    HOST is a host name or an IP address: the whole string is what gRPC dials, and gRPC reads a
    prefix such as `unix:`, `ipv4:` or `dns:///` as an address scheme (a peer's advert could name a
    local socket)."""
    host, sep, port_text = value.rpartition(":")
    # isascii: str.isdigit() also takes '²' (which int() refuses) and '٣' (which int() reads as 3).
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{quoted(value)} is not HOST:PORT")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} in {quoted(value)} is above 65535")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not (_HOST_NAME.fullmatch(host) or _is_ip(bare) and (bare == host) == (":" not in bare)):
        raise ValueError(f"{quoted(value)} is not HOST:PORT: the host is neither a host name nor an IP address "
                         "(an IPv6 address in [brackets])")
    return bare, port


_HOST_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_HOST_LABEL}(\.{_HOST_LABEL})*\.?")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _checked_listen(value: str) -> str:
    split_host_port(value)
    return value


ListenAddress = Annotated[str, AfterValidator(_checked_listen)]   # HOST:PORT, checked


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_key_bytes(entry: str) -> bytes:
    """An allow/deny entry (a peer ID or 64 hex characters) -> the raw 32-byte Ed25519 key."""
    if len(entry) == 64:
        try:
            return bytes.fromhex(entry)
        except ValueError:
            pass
    try:
        return public_key_from_peer_id(entry)
    except IdentityError:
        raise ValueError(f"{entry!r} is neither a peer ID (12D3KooW...) nor a 64-hex-digit public key") from None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class P2PConfig(_Section):
    listen: StrList = Field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/7442"])
    bootstrap: StrList = Field(default_factory=list)
    mdns: bool = False
    advert_interval_s: float = Field(5.0, gt=0, le=3600)
    advert_ttl_s: int = Field(30, ge=1, le=86400)
    announce_grpc: str | None = Field(None, description="HOST:PORT clients should dial (default: grpc_listen)")

    @field_validator("listen")
    @classmethod
    def _multiaddrs(cls, addrs: list[str]) -> list[str]:
        for addr in addrs:
            if not addr.strip():     # the multiaddr library takes '' as an address; libp2p listens nowhere on it
                raise ValueError("'' is not a multiaddr; to run without the peer network, give no address "
                                 "(listen = [] in the file, --p2p-listen '' on the command line)")
            try:
                multiaddr.Multiaddr(addr)
            except Exception as exc:  # the multiaddr library raises several unrelated types
                raise ValueError(f"{addr!r} is not a multiaddr (e.g. /ip4/127.0.0.1/tcp/7442): {exc}") from None
        return addrs

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap(cls, addrs: list[str]) -> list[str]:
        # Parsed as the host will parse them, so that a typo is refused here, before the node loads
        # its model and writes to its data dir, not when the host starts. Imported here: libp2p's
        # import is paid only when a bootstrap peer is given.
        if not addrs:
            return addrs
        from node.p2p.host import P2PError, parse_bootstrap
        try:
            parse_bootstrap(tuple(addrs))
        except P2PError as exc:
            raise ValueError(str(exc).removeprefix("bootstrap address ")) from None
        return addrs

    @field_validator("announce_grpc")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value


class AdmissionConfig(_Section):
    mode: Literal["open", "allowlist", "denylist"] = "open"
    allow: StrList = Field(default_factory=list, description="peer IDs or hex public keys")
    deny: StrList = Field(default_factory=list, description="peer IDs or hex public keys")
    rate_per_minute: int = Field(120, ge=1, description=(
        "jobs admitted per client per minute, those refused once tokenized (too long, replayed) included"))
    address_rate_per_minute: int = Field(600, ge=0, description=(
        "Submit calls per source address (IPv4, or IPv6 /64) per minute, whatever keys sign them; 0: no limit. "
        "A gateway sends all its users' jobs from one address: raise this with rate_per_minute for it"))
    max_concurrent_per_client: int = Field(8, ge=1)
    max_concurrent_per_address: int = Field(32, ge=0, description=(
        "jobs per source address (IPv4, or IPv6 /64) being prepared, waiting or running, whatever keys sign them; "
        "0: no limit. Keeps one host from filling the queue; raise it for a gateway of your own"))
    max_queue: int = Field(64, ge=0, description=(
        "jobs waiting for an engine slot (all engine.max_batch taken) before refusing; at most engine.max_queue"))
    clock_skew_s: float = Field(30.0, ge=0, le=3600, description="tolerance on issued_at / expires_at")
    grace_s: float = Field(10.0, ge=0, le=3600, description="on SIGTERM, time running jobs get to finish")

    @field_validator("allow", "deny")
    @classmethod
    def _keys(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            client_key_bytes(entry)
        return entries

    @model_validator(mode="after")
    def _nonempty_allowlist(self) -> AdmissionConfig:
        if self.mode == "allowlist" and not self.allow:
            raise ValueError("mode 'allowlist' with an empty 'allow' list would refuse every client")
        return self


# Prices travel in adverts' and receipts' uint64 fields and bill into SQLite's signed 64-bit integers:
# a larger one would pass here, then fail each advert the node builds.
Price = Annotated[int, Field(ge=0, le=2**63 - 1)]


class PricingConfig(_Section):
    per_mtok_micros: Price = Field(100_000, description="price per million output tokens, micro-units")
    per_model: dict[str, Price] = Field(default_factory=dict, description="keyed by model id or alias")
    per_gpu_second_micros: Price = 0

    @field_validator("per_model")
    @classmethod
    def _by_model_id(cls, prices: dict[str, int]) -> dict[str, int]:
        by_id: dict[str, int] = {}
        for model, price in prices.items():
            if model_id(model) in by_id:
                raise ValueError(f"{model!r} and {model_id(model)!r} name the same model; give one price")
            by_id[model_id(model)] = price
        return by_id

    def price_for(self, model: str) -> int:
        return self.per_model.get(model_id(model), self.per_mtok_micros)


class TlsConfig(_Section):
    mode: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: TLS unless gRPC listens on loopback; off: plaintext everywhere")


class DashboardConfig(_Section):
    token: str | None = None

    @field_validator("token")
    @classmethod
    def _url_and_cookie_safe(cls, token: str | None) -> str | None:
        if token is not None and not _DASHBOARD_TOKEN.fullmatch(token):
            raise ValueError(f"the dashboard token must be at least 16 characters, each one of "
                             f"{DASHBOARD_TOKEN_CHARS} (e.g. `openssl rand -hex 24`)")
        return token


class NodeConfig(LayeredSettings):
    model_config = SettingsConfigDict(env_prefix="DSPARK_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = DEFAULT_DATA_DIR
    grpc_listen: ListenAddress = "127.0.0.1:7440"
    http_listen: ListenAddress = "127.0.0.1:7441"
    heartbeat_s: float = Field(keepalive.HEARTBEAT_S, gt=0, le=keepalive.HEARTBEAT_S, description=(
        "a job with nothing else to send gets a progress event this often; clients give up on a worker "
        "silent for their idle timeout, set above the protocol's HEARTBEAT_S, so never longer"))
    p2p: P2PConfig = Field(default_factory=P2PConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        # Path("") is ".": an empty DSPARK_DATA_DIR (a variable the deployment left unset) would put the
        # node's key and ledger in whatever directory it was started from.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; give the directory for the node's key and ledger")
        return value

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _prices_for_served_model(self) -> NodeConfig:
        # A node serves one model: a price under any other name would never be charged, and an
        # operator who mistyped the name would sell at the default price without knowing.
        served = model_id(self.engine.model)
        for model in self.pricing.per_model:
            if model != served:
                raise ValueError(f"pricing.per_model has a price for {model!r}, but this node serves "
                                 f"{served!r} (engine.model {self.engine.model!r})")
        return self

    @model_validator(mode="after")
    def _queue_within_the_engine(self) -> NodeConfig:
        # The engine refuses a request past its own queue only after the node has accepted the job,
        # which then ends failed: the node's admission must refuse first, with a reason the client
        # can act on (try another worker).
        if self.admission.max_queue > self.engine.max_queue:
            raise ValueError(f"admission.max_queue ({self.admission.max_queue}) exceeds engine.max_queue "
                             f"({self.engine.max_queue}): jobs the node admits would be refused by the engine; "
                             "lower admission.max_queue or raise engine.max_queue")
        return self

    @property
    def grpc_tls(self) -> bool:
        """Whether the gRPC port serves TLS (plaintext only on loopback, or when set to 'off')."""
        if self.tls.mode == "auto":
            return not is_loopback(split_host_port(self.grpc_listen)[0])
        return self.tls.mode == "on"


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None,
                flag_names: Mapping[str, str] | None = None) -> NodeConfig:
    """Build the NodeConfig from TOML (if given), `DSPARK_*` env and `overrides` (CLI flags, nested dicts)."""
    return load_settings(NodeConfig, path, overrides, flag_names)
