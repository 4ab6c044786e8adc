"""Upstreams that come and go: the set named by ``--upstreams-file``, kept in step with it.

The roster reads the file (:mod:`gateway.upstreams_file`), resolves its ``dns`` entries and
reconciles what it finds with the upstreams the gateway has, through a small
:class:`Members` interface (the runtime's :class:`~gateway.membership.Membership`), so this
module knows nothing of windows, metrics or the scheduler. Its loop runs every health
interval and at once on SIGHUP (:meth:`Roster.wake`):

- **reload**: on SIGHUP or when the file's mtime changed. An invalid file (or one that cannot
  be read) is refused: logged, counted as ``refused``, and the last good set is kept;
- **resolve**: every ``dns`` entry through the event loop's ``getaddrinfo``, each time (a
  Kubernetes headless service lists its ready pods this way). A failed lookup keeps the
  addresses it last resolved to (logged once per failure streak): a DNS hiccup must not
  drain every server behind the name;
- **reconcile** (:func:`plan`): a name not yet present is **added**: it starts as a
  never-answered upstream (:mod:`gateway.upstreams`), gets no work until its health check
  passes, and the health loop is woken to check it now. A present name no longer wanted
  **drains**: it takes no new work, its in-flight requests finish, and a preempted request
  that was on it resumes elsewhere (a draining window is not usable, so the scheduler never
  sends anything back there). A draining name that is wanted again is **undrained**. Once a
  draining upstream has nothing in flight it is **forgotten** everywhere (health checks,
  window, window sizing, metrics scraping, metric series, status page).

**Overflow** upstreams (``overflow = true``) are cold or extra capacity. They are health
checked and drained like the others, but the scheduler sends a request to one only when no
primary window has room for it and its queue wait would breach its class's budget (see
:mod:`gateway.overflow`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gateway.config import ConfigError
from gateway.upstreams import upstream_name
from gateway.upstreams_file import DnsEntry, Entry, UrlEntry, load_upstreams_file

log = logging.getLogger("gateway.roster")

#: Longest wait for one name's lookup (a timeout is an OSError: the addresses are kept).
RESOLVE_TIMEOUT_S = 5.0

#: ``(host, port)`` to the addresses it resolves to; raises OSError when it cannot.
Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class Member:
    """What the roster needs to know of a present upstream."""

    overflow: bool
    draining: bool


@dataclass(frozen=True, slots=True)
class Plan:
    """The changes that turn the present set into the wanted one (names, or name to target)."""

    add: dict[str, UrlEntry] = field(default_factory=dict)
    drain: tuple[str, ...] = ()
    undrain: dict[str, UrlEntry] = field(default_factory=dict)
    reflag: dict[str, UrlEntry] = field(default_factory=dict)  # its overflow flag changed

    def __bool__(self) -> bool:
        return bool(self.add or self.drain or self.undrain or self.reflag)


class Members(Protocol):
    """The gateway's upstreams, as the roster changes them."""

    def present(self) -> Mapping[str, Member]: ...
    def add(self, name: str, target: UrlEntry) -> None: ...
    def drain(self, name: str) -> None: ...
    def undrain(self, name: str, target: UrlEntry) -> None: ...
    def set_overflow(self, name: str, overflow: bool) -> None: ...
    def forget_drained(self) -> list[str]: ...


def plan(present: Mapping[str, Member], wanted: Mapping[str, UrlEntry]) -> Plan:
    """Pure reconciliation: what to add, drain, undrain and re-flag."""
    add = {n: t for n, t in wanted.items() if n not in present}
    drain = tuple(n for n, m in present.items() if n not in wanted and not m.draining)
    undrain = {n: t for n, t in wanted.items() if n in present and present[n].draining}
    reflag = {
        n: t
        for n, t in wanted.items()
        if n in present and not present[n].draining and present[n].overflow != t.overflow
    }
    return Plan(add, drain, undrain, reflag)


def targets(
    entries: tuple[Entry, ...], resolved: Mapping[DnsEntry, list[str]]
) -> dict[str, UrlEntry]:
    """The upstreams the entries name, by metric name; the first entry naming one wins."""
    wanted: dict[str, UrlEntry] = {}
    for entry in entries:
        if isinstance(entry, UrlEntry):
            urls = [entry.url]
        else:
            urls = [_url(entry, address) for address in resolved.get(entry, [])]
        for url in urls:
            wanted.setdefault(upstream_name(url), UrlEntry(url, entry.overflow))
    return wanted


def _url(entry: DnsEntry, address: str) -> str:
    host = f"[{address}]" if ":" in address else address  # an IPv6 address
    return f"{entry.scheme}://{host}:{entry.port}"


async def getaddrinfo(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (TCP), sorted, without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class Roster:
    """Keeps the gateway's upstreams in step with the upstreams file. One event loop owns it."""

    def __init__(
        self,
        path: Path,
        entries: tuple[Entry, ...],
        members: Members,
        interval_s: float,
        *,
        resolve: Resolver = getaddrinfo,
        on_reload: Callable[[bool], None] = lambda ok: None,
    ) -> None:
        """``entries`` is the file as loaded at start (an invalid file stops the start);
        ``on_reload(ok)`` counts each reload, good or refused."""
        self._path = path
        self._entries = entries
        self._members = members
        self._interval_s = interval_s
        self._resolve = resolve
        self._on_reload = on_reload
        self._mtime = _mtime(path)
        self._resolved: dict[DnsEntry, list[str]] = {}
        self._dns_errors: set[DnsEntry] = set()
        self._wake = asyncio.Event()
        self._reload_next = False

    def wake(self) -> None:
        """Reload the file now (SIGHUP): safe to call from a signal handler on the loop."""
        self._reload_next = True
        self._wake.set()

    async def run(self) -> None:
        """Refresh forever (cancel to stop): every interval, and at once when woken."""
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug here must not freeze the set: log it, go on
                log.exception("refreshing the upstreams failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._wake.wait()
            self._wake.clear()

    async def refresh(self) -> Plan:
        """One pass: reload if asked or changed, resolve, reconcile, forget the drained."""
        mtime = _mtime(self._path)
        if self._reload_next or mtime != self._mtime:
            self._reload_next, self._mtime = False, mtime
            self.reload()
        for entry in self._entries:
            if isinstance(entry, DnsEntry):
                await self._lookup(entry)
        wanted = targets(self._entries, self._resolved)
        changes = plan(self._members.present(), wanted)
        self._apply(changes)
        for name in self._members.forget_drained():
            log.info("upstream %s drained and forgotten", name)
        return changes

    def reload(self) -> bool:
        """Read the file again; keep the last good entries (and say why) if it is invalid."""
        try:
            entries = load_upstreams_file(self._path)
        except ConfigError as exc:
            log.error("upstreams file reload refused, keeping the current upstreams: %s", exc)
            self._on_reload(False)
            return False
        self._entries = entries
        # Forget lookups of names no longer listed, so a re-listed name is looked up afresh.
        self._resolved = {e: a for e, a in self._resolved.items() if e in entries}
        log.info("upstreams file reloaded: %d entries", len(entries))
        self._on_reload(True)
        return True

    async def _lookup(self, entry: DnsEntry) -> None:
        try:
            # A resolver that hangs must not stall the loop that also forgets drained servers.
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                addresses = await self._resolve(entry.host, entry.port)
            if not addresses:
                raise OSError("no addresses")
        except OSError as exc:
            if entry not in self._dns_errors:  # once per failure streak
                kept = ", ".join(self._resolved.get(entry, [])) or "none"
                log.warning("cannot resolve %s (keeping %s): %s", entry.host, kept, exc)
            self._dns_errors.add(entry)
            return
        if entry in self._dns_errors:
            self._dns_errors.discard(entry)
            log.info("resolving %s again", entry.host)
        self._resolved[entry] = addresses

    def _apply(self, changes: Plan) -> None:
        for name, target in changes.add.items():
            log.info("upstream %s added%s; checking its health", name, _role(target))
            self._members.add(name, target)
        for name in changes.drain:
            log.info("upstream %s removed: draining (no new work, in-flight work finishes)", name)
            self._members.drain(name)
        for name, target in changes.undrain.items():
            log.info("upstream %s listed again: its drain is cancelled", name)
            self._members.undrain(name, target)
        for name, target in changes.reflag.items():
            log.info("upstream %s is now%s", name, _role(target) or " a primary")
            self._members.set_overflow(name, target.overflow)


def _role(target: UrlEntry) -> str:
    return " as overflow" if target.overflow else ""


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None  # gone: the reload that follows refuses it and keeps the set
