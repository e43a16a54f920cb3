"""Settings read in layers: field defaults < a TOML file < environment variables < command-line flags.

One mechanism for the node's configuration (node/config.py) and the gateway's (node/gateway/config.py):
`load_settings` builds a `LayeredSettings` subclass from the layers and, when a value is refused,
names the field and the layer it came from (`ConfigError`): the flag, the variable or the file.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ValidationError
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsError

log = logging.getLogger(__name__)

# The parsed TOML file of the load_settings call in progress (a settings class has no per-call file).
_FILE_VALUES: ContextVar[dict[str, Any]] = ContextVar("_FILE_VALUES", default={})


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names each bad field."""


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


class _FileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _FILE_VALUES.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_VALUES.get())


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML file; ConfigError saying why when it cannot be read or parsed."""
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
        # pydantic's "Extra inputs are not permitted" does not say that the name is what is wrong.
        if error["type"] == "extra_forbidden":
            known = _known_settings(self.settings, loc)
            return self._where(loc, "unknown setting") + (f"; {known}" if known else "")
        return self._where(loc, message)

    def _where(self, loc: tuple[int | str, ...], message: str) -> str:
        """`field: message`, with the flag, the variable or the file that gave the value."""
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


# A section with more settings than this is not spelled out when an unknown name is like none of them.
_LISTED_SETTINGS = 15


def _known_settings(settings: type[BaseModel], loc: tuple[int | str, ...]) -> str | None:
    """For the unknown setting at `loc`: the name it was likely meant as, else its section's names if few."""
    model: Any = settings
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    names = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    if close:
        return f"did you mean {close[0]}?"
    if len(names) > _LISTED_SETTINGS:
        return None
    section = f"the settings of [{'.'.join(map(str, loc[:-1]))}]" if len(loc) > 1 else "the top-level settings"
    return f"{section} are {', '.join(names)}"


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


def misspelt_variables(settings: type[BaseSettings], environ: Mapping[str, str]) -> list[str]:
    """Variables with the settings' prefix whose top-level name is no setting but close to one.
    pydantic-settings passes over a variable it has no field for, so a typo in a deployment's
    environment (DSPARK_GRPC_LISTN) left the default in force without a word. Only near misses are
    named: other variables share the prefix (the gateway's DSPARK_GATEWAY_*, the model cache's
    DSPARK_CACHE). A misspelt name inside a section is an error already (extra="forbid")."""
    prefix = str(settings.model_config.get("env_prefix", "")).upper()
    delimiter = settings.model_config.get("env_nested_delimiter") or None
    fields = [name.upper() for name in settings.model_fields]
    found = []
    for variable in sorted(environ):
        if not prefix or not variable.upper().startswith(prefix):
            continue
        name = variable.upper()[len(prefix):]
        head = name.split(delimiter)[0] if delimiter else name
        if head in fields:
            continue
        close = difflib.get_close_matches(head, fields, n=1, cutoff=0.8)
        if close:
            found.append(f"{variable} is not a setting, and is ignored; did you mean "
                         f"{prefix}{close[0]}{name[len(head):]}?")
    return found


def load_settings(settings: type[Settings], path: Path | None = None, overrides: dict[str, Any] | None = None,
                  flag_names: Mapping[str, str] | None = None) -> Settings:
    """`settings` from the TOML file (if given), its environment variables and `overrides` (the flags
    given, nested dicts). A bad value raises ConfigError naming the field and where it came from;
    a value from a flag is named by the flag when `flag_names` maps its field path to one."""
    file_values = read_toml(path) if path is not None else {}
    overrides = overrides or {}
    for warning in misspelt_variables(settings, os.environ):
        log.warning("%s", warning)
    token = _FILE_VALUES.set(file_values)
    try:
        return settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_Layers(settings, path, file_values, overrides, flag_names or {}).describe(exc)) from None
    except SettingsError as exc:
        raise ConfigError(_describe_env(exc, settings)) from None
    finally:
        _FILE_VALUES.reset(token)
