"""The upstreams file (``--upstreams-file``): which vLLM servers to use, read and validated.

Plain logic, no I/O besides reading the file; resolving ``dns`` entries and applying the set
are :mod:`gateway.roster`'s. The format::

    [[upstream]]
    url = "http://10.0.0.5:8000"

    [[upstream]]
    dns = "vllm-headless.default.svc.cluster.local"  # every address it resolves to
    port = 8000                                       # required with dns
    scheme = "http"                                   # optional with dns (http or https)

    [[upstream]]
    url = "http://10.0.0.9:8000"
    overflow = true  # cold capacity: see gateway.roster

Anything else (an unknown key, a ``url`` and a ``dns`` in one entry, a port out of range, the
same URL twice, no entry at all) is a :class:`~gateway.config.ConfigError` naming the entry
and what is wrong: at start the gateway refuses to run, on a reload the old set is kept.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.config import ConfigError

_KEYS = {"url", "dns", "port", "scheme", "overflow"}
_SCHEMES = ("http", "https")


@dataclass(frozen=True, slots=True)
class UrlEntry:
    """One upstream at a fixed base URL (no trailing slash)."""

    url: str
    overflow: bool = False


@dataclass(frozen=True, slots=True)
class DnsEntry:
    """Every address ``host`` resolves to, each at ``scheme://address:port``."""

    host: str
    port: int
    scheme: str = "http"
    overflow: bool = False


Entry = UrlEntry | DnsEntry


def load_upstreams_file(path: Path) -> tuple[Entry, ...]:
    """The file's entries, in order. Raises ConfigError if it cannot be read or is invalid."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the upstreams file {path}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the upstreams file {path} is not valid TOML: {exc}") from None
    return parse_upstreams(data, str(path))


def parse_upstreams(data: dict[str, Any], source: str = "the upstreams file") -> tuple[Entry, ...]:
    """Validate the parsed TOML of an upstreams file."""
    unknown = sorted(set(data) - {"upstream"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(unknown)}")
    raw = data.get("upstream")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: needs at least one [[upstream]] entry")
    entries = tuple(_entry(item, f"{source}: upstream #{i + 1}") for i, item in enumerate(raw))
    seen: set[str] = set()
    for entry in entries:
        key = entry.url if isinstance(entry, UrlEntry) else f"dns {entry.host}:{entry.port}"
        if key in seen:
            raise ConfigError(f"{source}: {key} is listed twice")
        seen.add(key)
    return entries


def _entry(item: object, where: str) -> Entry:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table ([[upstream]])")
    unknown = sorted(set(item) - _KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})"
        )
    overflow = item.get("overflow", False)
    if not isinstance(overflow, bool):
        raise ConfigError(f"{where}: overflow must be true or false")
    if ("url" in item) == ("dns" in item):
        raise ConfigError(f"{where}: give exactly one of url or dns")
    if "url" in item:
        for key in ("port", "scheme"):
            if key in item:
                raise ConfigError(f"{where}: {key} goes with dns; put it in the url")
        return UrlEntry(_url(item["url"], where), overflow)
    host, port, scheme = item["dns"], item.get("port"), item.get("scheme", "http")
    if not isinstance(host, str) or not host.strip() or any(c in host for c in "/: "):
        raise ConfigError(f"{where}: dns must be a host name, like vllm.default.svc")
    if port is None:
        raise ConfigError(f"{where}: port is required with dns")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"{where}: port must be an integer from 1 to 65535, got {port!r}")
    if scheme not in _SCHEMES:
        raise ConfigError(f"{where}: scheme must be http or https, got {scheme!r}")
    return DnsEntry(host.strip(), port, scheme, overflow)


def _url(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: url must be a string like http://10.0.0.5:8000")
    url = value.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError as exc:
        raise ConfigError(f"{where}: url {value!r} is invalid: {exc}") from None
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise ConfigError(f"{where}: url must be http(s)://host[:port], got {value!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: url {value!r} must not have a query or fragment")
    return url
