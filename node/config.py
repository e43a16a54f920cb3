"""The node's configuration: embedded defaults < TOML file < `DSPARK_*` environment < CLI flags.

Loaded and validated once at start (`load_config`), then passed down; a bad value is refused with
a message naming the field and where it came from (`ConfigError`), before anything is written to
the data dir. The layering itself (`LayeredSettings`, `load_settings`) is shared with the gateway's
settings (node/gateway/config.py).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import multiaddr
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from engine.config import EMBEDDED_MODEL, EMBEDDED_MODEL_ID, EngineConfig
from node.identity import IdentityError, public_key_from_peer_id

DEFAULT_DATA_DIR = Path("~/.local/share/dspark-node")
# The parsed TOML file of the load_settings call in progress (a settings class has no per-call file).
_FILE_VALUES: ContextVar[dict[str, Any]] = ContextVar("_FILE_VALUES", default={})


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


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names each bad field."""


def split_host_port(value: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) -> (host, port); raises ValueError naming the problem."""
    host, sep, port_text = value.rpartition(":")
    # isascii: str.isdigit() also takes '²' (which int() refuses) and '٣' (which int() reads as 3).
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{value!r} is not HOST:PORT")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} in {value!r} is above 65535")
    return host.strip("[]"), port


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


def _split_list(value: Any) -> Any:
    # From the environment a list comes as one string: a JSON list, or comma-separated values
    # (multiaddrs, peer IDs, hex keys and the gateway's API keys never contain a comma); '' is the
    # empty list.
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{value!r} is not a JSON list; write [\"a\", \"b\"] or a,b") from None
    return [item.strip() for item in value.split(",") if item.strip()]


# NoDecode: pydantic-settings would json-decode the variable itself and fail on a plain multiaddr.
StrList = Annotated[list[str], NoDecode, BeforeValidator(_split_list)]


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
    rate_per_minute: int = Field(120, ge=1, description="jobs admitted per client per minute")
    max_concurrent_per_client: int = Field(8, ge=1)
    max_queue: int = Field(64, ge=0, description="jobs waiting for an engine slot before refusing")
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


class LayeredSettings(BaseSettings):
    """Settings read from, lowest first: field defaults, the TOML file of the `load_settings` call
    in progress, the environment (under the subclass's `env_prefix`), then init kwargs (flags)."""

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # CLI flags arrive as init kwargs (highest), then the environment, then the TOML file.
        # No .env or secrets dir: one place per setting.
        return init_settings, env_settings, _FileSource(settings_cls)


class NodeConfig(LayeredSettings):
    model_config = SettingsConfigDict(env_prefix="DSPARK_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = DEFAULT_DATA_DIR
    grpc_listen: ListenAddress = "127.0.0.1:7440"
    http_listen: ListenAddress = "127.0.0.1:7441"
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

    @property
    def grpc_tls(self) -> bool:
        """Whether the gRPC port serves TLS (plaintext only on loopback, or when set to 'off')."""
        if self.tls.mode == "auto":
            return not is_loopback(split_host_port(self.grpc_listen)[0])
        return self.tls.mode == "on"


class _FileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _FILE_VALUES.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_VALUES.get())


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give the TOML file") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:     # TOML is UTF-8; tomllib lets the decoder's error through
        raise ConfigError(f"config file {path} is not valid TOML: byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start} is not UTF-8") from None


def _given(values: dict[str, Any], loc: tuple[int | str, ...]) -> bool:
    """Whether `values` (nested dicts) hold the setting at `loc` (a list or table given whole counts)."""
    node: Any = values
    for part in loc:
        if not isinstance(node, dict):
            break
        if part not in node:
            return False
        node = node[part]
    return bool(loc)


@dataclass(frozen=True)
class _Layers:
    """What one load was given, to say where each refused value came from."""
    settings: type[BaseSettings]
    path: Path | None
    file: dict[str, Any]
    flags: dict[str, Any]
    flag_names: Mapping[str, str]     # field path ("p2p.listen") -> the flag that sets it

    def describe(self, exc: ValidationError) -> str:
        origin = f"{self.path}, environment and flags" if self.path is not None else "environment and flags"
        return "\n".join([f"invalid configuration ({origin}):", *("  " + self._line(e) for e in exc.errors())])

    def _line(self, error: Any) -> str:
        loc, message = tuple(error["loc"]), error["msg"].removeprefix("Value error, ")
        if not loc:          # a check across fields: its message names them
            return message
        field = ".".join(str(part) for part in loc)
        if _given(self.flags, loc):
            flag = self.flag_names.get(".".join(part for part in loc if isinstance(part, str)))
            return f"{flag}: {message}" if flag else f"{field}: {message} (from a flag)"
        variable = self._variable(loc)
        if variable is not None:
            return f"{field}: {message} (from {variable})"
        if _given(self.file, loc):
            return f"{field}: {message} (in {self.path})"
        return f"{field}: {message}"

    def _variable(self, loc: tuple[int | str, ...]) -> str | None:
        """The environment variable that set the value at `loc`: its own, or its section's (as JSON)."""
        prefix = self.settings.model_config.get("env_prefix", "")
        delimiter = self.settings.model_config.get("env_nested_delimiter")
        keys = [part for part in loc if isinstance(part, str)]
        names = {name.upper(): name for name in os.environ}
        for depth in range(len(keys) if delimiter else 1, 0, -1):
            name = names.get((prefix + (delimiter or "").join(keys[:depth])).upper())
            if name is not None:
                return name
        return None


def _describe_env(exc: SettingsError, settings: type[BaseSettings]) -> str:
    """pydantic-settings could not parse a variable of `settings` (a table or list that is not JSON)."""
    prefix = settings.model_config.get("env_prefix", "")
    delimiter = settings.model_config.get("env_nested_delimiter")
    field = re.search(r'field "([^"]+)"', str(exc))
    name = f"{prefix}{field.group(1)}".upper() if field else prefix
    names = sorted(variable for variable in os.environ
                   if variable.upper() == name or (delimiter and variable.upper().startswith(name + delimiter)))
    cause = f": {exc.__cause__}" if exc.__cause__ else ""
    return (f"invalid configuration (environment): cannot parse {' or '.join(names) or name}{cause}; "
            "a table in the environment is JSON ('{\"KEY\": 5}'), a list is JSON ('[\"a\", \"b\"]') "
            "or comma-separated (a,b)")


Settings = TypeVar("Settings", bound=LayeredSettings)


def load_settings(settings: type[Settings], path: Path | None = None, overrides: dict[str, Any] | None = None,
                  flag_names: Mapping[str, str] | None = None) -> Settings:
    """`settings` from the TOML file (if given), its environment variables and `overrides` (the flags
    given, nested dicts). A bad value raises ConfigError naming the field and where it came from;
    a value from a flag is named by the flag when `flag_names` maps its field path to one."""
    file_values = _read_toml(path) if path is not None else {}
    overrides = overrides or {}
    token = _FILE_VALUES.set(file_values)
    try:
        return settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_Layers(settings, path, file_values, overrides, flag_names or {}).describe(exc)) from None
    except SettingsError as exc:
        raise ConfigError(_describe_env(exc, settings)) from None
    finally:
        _FILE_VALUES.reset(token)


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None,
                flag_names: Mapping[str, str] | None = None) -> NodeConfig:
    """Build the NodeConfig from TOML (if given), `DSPARK_*` env and `overrides` (CLI flags, nested dicts)."""
    return load_settings(NodeConfig, path, overrides, flag_names)
