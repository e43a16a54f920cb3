"""The gateway's settings, validated once at start (`dspark-node gateway`): embedded defaults < TOML
file (`--config`) < `DSPARK_GATEWAY_*` environment < the flags given, as the node's are layered."""

from __future__ import annotations

import stat
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from node import keepalive
from node.client import MAX_JOB_TIMEOUT_S, idle_timeout_problem
from node.config import DEFAULT_DATA_DIR, ListenAddress, P2PConfig, is_loopback, split_host_port
from node.settings import ConfigError, LayeredSettings, StrList, read_toml

MIN_API_KEY_CHARS = 16


class GatewayConfig(LayeredSettings):
    model_config = SettingsConfigDict(env_prefix="DSPARK_GATEWAY_", extra="forbid", frozen=True)
    listen: ListenAddress = "127.0.0.1:8080"
    bootstrap: StrList = Field(default_factory=list)
    mdns: bool = False
    data_dir: Path = DEFAULT_DATA_DIR / "gateway"
    key: Path | None = None                       # default: <data_dir>/client.key
    max_price_per_mtok_micros: int | None = Field(None, ge=0, lt=2**63)
    max_price_per_gpu_second_micros: int | None = Field(None, ge=0, lt=2**63)   # 0: no time charge
    budget_micros: int | None = Field(None, ge=0, lt=2**63)   # per API key; None = unlimited
    api_keys: StrList = Field(default_factory=list)
    tls: str = Field("auto", pattern="^(auto|on|off)$")
    attempts: int = Field(3, ge=1, le=16)
    timeout_s: float = Field(600.0, gt=0, le=MAX_JOB_TIMEOUT_S)
    idle_timeout_s: float = keepalive.IDLE_TIMEOUT_S

    @field_validator("idle_timeout_s")
    @classmethod
    def _above_heartbeat(cls, value: float) -> float:
        problem = idle_timeout_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap(cls, addrs: list[str]) -> list[str]:
        try:
            return P2PConfig(listen=[], bootstrap=addrs).bootstrap   # the node's own multiaddr check
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        # No comma: DSPARK_GATEWAY_API_KEYS may list keys comma-separated, and a key holding one
        # would silently become two shorter keys, each accepted.
        for key in keys:
            if len(key) < MIN_API_KEY_CHARS or not key.isprintable() or " " in key or "," in key:
                raise ValueError(f"an API key must be at least {MIN_API_KEY_CHARS} printable characters "
                                 "without spaces or commas")
        return keys

    @field_validator("data_dir", "key", mode="before")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        # Path("") is ".": an empty DSPARK_GATEWAY_DATA_DIR (a variable the deployment left unset) put
        # the client key and the receipt store in whatever directory the gateway was started from.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; give a path (or leave the setting out for its default)")
        return value

    @field_validator("data_dir", "key")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @model_validator(mode="after")
    def _exposed_needs_keys(self) -> GatewayConfig:
        host, _ = split_host_port(self.listen)
        if not is_loopback(host) and not self.api_keys:
            raise ValueError(f"listen {self.listen!r} is not a loopback address: give --api-key (or api_keys in "
                             "the --config file, or DSPARK_GATEWAY_API_KEYS) so only holders of a key can spend "
                             "through this gateway")
        if not self.bootstrap and not self.mdns:
            raise ValueError("give --bootstrap MULTIADDR (or --mdns) to join the peer network (bootstrap or mdns "
                             "in the --config file or the environment)")
        return self

    @property
    def key_path(self) -> Path:
        return self.key if self.key is not None else self.data_dir / "client.key"


def refuse_readable_keys(path: Path) -> None:
    """Raise ConfigError if the --config file `path` holds API keys that users other than its owner
    may read or change.

    A refusal, not a warning: a key is the operator's money, as the node's key is, and the node
    refuses a node.key others can read; a warning would scroll past in a service's log while the
    keys stay readable. Where the file must be shared (a group-readable config, a container's
    mount), the keys belong in DSPARK_GATEWAY_API_KEYS."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077 and read_toml(path).get("api_keys"):
        raise ConfigError(f"config file {path} holds api_keys and has mode {mode:o}: users other than its owner "
                          f"can read them and spend through this gateway; chmod 600 {path}")
