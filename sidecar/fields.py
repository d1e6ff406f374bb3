"""Reading YAML mappings into typed values, collecting every problem with its path.

A :class:`Fields` wraps one mapping at one path (``credentials.billing-oauth``). Each
accessor returns a typed value or a default and, on a problem, records a
:class:`~sidecar.errors.ConfigError` instead of raising, so that ``validate`` can print
every problem at once. :meth:`Fields.done` reports the keys nobody asked for.

Secrets are a type (:class:`Secret`) whose repr and str are masked; the value is only
reachable through :meth:`Secret.reveal`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, overload
from urllib.parse import urlsplit

from sidecar.errors import ConfigError

MISSING: Any = object()

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``500ms``, ``30s``, ``5m``, ``1h``, ``1d`` -> seconds; raises ValueError otherwise."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError("must be a duration such as 500ms, 30s, 5m or 1h")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def format_duration(seconds: float) -> str:
    for unit in ("h", "m", "s"):
        n = seconds / _UNIT_SECONDS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    return f"{int(seconds * 1000)}ms"


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret value: masked in every repr, str, dump and message."""

    _value: str = field(repr=False)
    source: str = "value"  # value | env:NAME | file:PATH (names, never the value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<redacted>, source={self.source!r})"

    __str__ = __repr__


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


def parse_listen(text: str) -> ListenAddress:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535) or not host:
        raise ValueError("must be HOST:PORT, for example 127.0.0.1:17001")
    return ListenAddress(host.strip("[]"), int(port))


class Fields:
    """One mapping being read at one config path; problems go into a shared list.

    Accessors are named for what they read (``text``, ``flag``, ``integer``, ``text_list``), never
    after a builtin: a method named ``str`` would shadow ``str`` in every annotation of the class.
    """

    def __init__(self, raw: Any, path: str, errors: list[ConfigError], base_dir: Path | None = None) -> None:
        self.path = path
        self.errors = errors
        self.base_dir = base_dir or Path(".")
        self._used: set[str] = set()
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            self.error("", f"must be a mapping, got {_kind(raw)}")
            raw = {}
        self.raw: Mapping[str, Any] = raw

    # -- plumbing -------------------------------------------------------------------
    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        self.errors.append(ConfigError(self.at(key) if key else self.path, message))

    def has(self, key: str) -> bool:
        return key in self.raw

    def keys(self) -> list[str]:
        return [str(k) for k in self.raw]

    def _get(self, key: str, default: Any, required: bool) -> Any:
        self._used.add(key)
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key]
        if required:
            self.error(key, "is required")
        return default

    def done(self) -> None:
        """Report every key that no accessor asked for."""
        for key in self.raw:
            if key not in self._used:
                self.error(str(key), "unknown key")

    # -- scalars --------------------------------------------------------------------
    @overload
    def text(self, key: str, default: str, *, required: bool = False) -> str: ...
    @overload
    def text(self, key: str, default: None = None, *, required: bool = False) -> str | None: ...

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self._get(key, MISSING, required)
        if value is MISSING:
            return default
        if not isinstance(value, str) or (required and not value):
            self.error(key, f"must be a non-empty string, got {_kind(value)}")
            return default
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default, False)
        if not isinstance(value, bool):
            self.error(key, f"must be true or false, got {_kind(value)}")
            return default
        return value

    @overload
    def integer(self, key: str, default: int, *, minimum: int = 0, required: bool = False) -> int: ...
    @overload
    def integer(self, key: str, default: int | None = None, *, minimum: int = 0,
                required: bool = False) -> int | None: ...

    def integer(self, key: str, default: int | None = None, *, minimum: int = 0,
                required: bool = False) -> int | None:
        value = self._get(key, default, required)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.error(key, f"must be an integer >= {minimum}, got {_kind(value)}")
            return default
        return value

    @overload
    def choice(self, key: str, options: Iterable[str], default: str, *, required: bool = False) -> str: ...
    @overload
    def choice(self, key: str, options: Iterable[str], default: None = None, *,
               required: bool = False) -> str | None: ...

    def choice(self, key: str, options: Iterable[str], default: str | None = None, *,
               required: bool = False) -> str | None:
        allowed = list(options)
        value = self.text(key, default, required=required)
        if value is not None and value not in allowed:
            self.error(key, f"must be one of {', '.join(allowed)}, got {value!r}")
            return default
        return value

    @overload
    def duration(self, key: str, default: str | float, *, required: bool = False) -> float: ...
    @overload
    def duration(self, key: str, default: None = None, *, required: bool = False) -> float | None: ...

    def duration(self, key: str, default: str | float | None = None, *, required: bool = False) -> float | None:
        """Seconds, from ``500ms``, ``30s``, ``5m``, ``1h`` or ``1d``; a string default is parsed the same way."""
        value = self._get(key, MISSING, required)
        if value is MISSING:
            return _seconds(default)
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.error(key, f"{exc}, got {_kind(value)}")
            return _seconds(default)

    def text_list(self, key: str, default: Iterable[str] = (), *, required: bool = False) -> tuple[str, ...]:
        value = self._get(key, MISSING, required)
        if value is MISSING:
            return tuple(default)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.error(key, f"must be a list of non-empty strings, got {_kind(value)}")
            return tuple(default)
        return tuple(value)

    def listen(self, key: str, default: str) -> ListenAddress:
        text = self.text(key, default)
        try:
            return parse_listen(text)
        except ValueError as exc:
            self.error(key, str(exc))
            return parse_listen(default)

    def url(self, key: str, *, required: bool = False, https_unless_loopback: bool = False,
            schemes: tuple[str, ...] = ("http", "https")) -> str | None:
        text = self.text(key, None, required=required)
        if text is None:
            return None
        parts = urlsplit(text)
        if parts.scheme not in schemes or not parts.hostname:
            self.error(key, f"must be an absolute {' or '.join(schemes)} URL, got {_without_userinfo(text)!r}")
            return None
        if https_unless_loopback and parts.scheme != "https" and not is_loopback_host(parts.hostname):
            self.error(key, "must be an https URL (http is allowed only on loopback hosts)")
            return None
        return text

    def path_value(self, key: str, *, required: bool = False, must_exist: bool = False) -> Path | None:
        text = self.text(key, None, required=required)
        if text is None:
            return None
        path = Path(text)
        path = path if path.is_absolute() else self.base_dir / path
        if must_exist and not path.is_file():
            self.error(key, f"file not found or not readable: {text}")
        return path

    def secret(self, key: str, *, required: bool = False) -> Secret | None:
        value = self._get(key, None, required)
        if value is None:
            return None
        return read_secret(value, self.at(key), self.errors, self.base_dir)

    # -- nesting --------------------------------------------------------------------
    def sub(self, key: str, *, required: bool = False) -> Fields:
        return Fields(self._get(key, None, required), self.at(key), self.errors, self.base_dir)

    def items(self, key: str, *, required: bool = False) -> list[Fields]:
        """A list of mappings, each read at ``key[i]``."""
        value = self._get(key, [], required)
        if not isinstance(value, list):
            self.error(key, f"must be a list, got {_kind(value)}")
            return []
        return [Fields(v, self.at(f"{key}[{i}]"), self.errors, self.base_dir) for i, v in enumerate(value)]

    def raw_value(self, key: str) -> Any:
        return self._get(key, None, False)

    def mapping(self, key: str) -> dict[str, Any]:
        value = self._get(key, {}, False)
        if not isinstance(value, Mapping):
            self.error(key, f"must be a mapping, got {_kind(value)}")
            return {}
        return {str(k): v for k, v in value.items()}


def read_secret(value: Any, path: str, errors: list[ConfigError], base_dir: Path) -> Secret | None:
    """A secret reference: ``{value: ...}``, ``{from_env: NAME}`` or ``{from_file: PATH}``.

    A plain string is accepted as ``{value: ...}`` only where a config names it so
    (for example ``revocation.redis_url``); here it is an error, so that secrets are
    never pasted into config by accident.
    """
    expected = "must be exactly one of {value: ...}, {from_env: NAME}, {from_file: PATH}"
    if not isinstance(value, dict):  # one problem, said once (the value itself is never echoed)
        errors.append(ConfigError(path, f"{expected}, got {_kind(value)}"))
        return None
    f = Fields(value, path, errors, base_dir)
    kinds = [k for k in ("value", "from_env", "from_file") if f.has(k)]
    if len(kinds) != 1:
        f.error("", expected)
        return None
    kind = kinds[0]
    ref = f.text(kind, required=True)
    f.done()
    if ref is None:
        return None
    if kind == "value":
        return Secret(ref, "value")
    if kind == "from_env":
        if ref not in os.environ:
            f.error("from_env", f"environment variable {ref} is not set")
            return None
        return Secret(os.environ[ref], f"env:{ref}")
    file_path = Path(ref) if Path(ref).is_absolute() else base_dir / ref
    try:
        return Secret(file_path.read_text().strip(), f"file:{ref}")
    except OSError as exc:
        f.error("from_file", f"cannot read secret file {ref}: {exc.strerror or 'unreadable'}")
        return None


def _seconds(default: str | float | None) -> float | None:
    return parse_duration(default) if isinstance(default, str) else default


def _without_userinfo(url: str) -> str:
    """A URL for a message, with any user info (it may hold a password) masked."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="<redacted>@" + parts.netloc.rpartition("@")[2]).geturl()


def _kind(value: Any) -> str:
    """Describe a value by its type only: a wrong value may be a secret."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__
