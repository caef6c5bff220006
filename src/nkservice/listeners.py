"""A service's listening sockets, and changing them while the service runs (PROTOCOL.md §2).

The URLs of a service that share a host and port share one socket (`tcp`+`ws`, or
`tls`+`wss`). When a definition changes, `ServiceListeners.change` binds the sockets it
adds first and returns a `ListenerChange`: the caller makes its other changes and then
commits (the removed sockets close) or undoes it (the added ones close). A socket whose URLs
or certificate change is bound again on its address, so the gap in which new connections
are refused is the time of one `bind` call. Closing a listening socket never touches the
connections it accepted: they stay until they end or the service stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from nkservice.errors import ConfigError
from nkservice.protocol.connection import Limits
from nkservice.service.config import ListenUrl, ServiceConfig, TlsConfig
from nkservice.transport.base import Accept
from nkservice.transport.http import Site
from nkservice.transport.listener import listen

log = logging.getLogger(__name__)

Address = tuple[str, int, bool]  # host, port (as bound: never 0), secure


@dataclass(frozen=True, slots=True)
class Port:
    """The URLs of one service that share a host and port: one listening socket."""

    host: str
    port: int
    urls: tuple[ListenUrl, ...]
    tls: TlsConfig | None  # for tls and wss: a new certificate needs a new socket

    def same_socket(self, other: Port) -> bool:
        """Would `other` be served by this port's socket? (Port 0 is any port.)"""
        return (self.host, self.tls, {(u.scheme, u.path) for u in self.urls}) == (
            other.host, other.tls, {(u.scheme, u.path) for u in other.urls})


def ports_of(definition: ServiceConfig) -> list[Port]:
    """Group a service's URLs into sockets. Port 0 asks for any free port: the plain URLs
    of a host get one, the secure ones another."""
    grouped: dict[tuple[str, int, bool], list[ListenUrl]] = defaultdict(list)
    for url in definition.listen:
        grouped[(url.host, url.port, url.secure)].append(url)
    ports = [Port(host, port, tuple(urls), definition.tls if secure else None)
             for (host, port, secure), urls in grouped.items()]
    numbered = [(p.host, p.port) for p in ports if p.port]
    if len(numbered) != len(set(numbered)):
        raise ConfigError(f"{definition.table}.listen", "a port mixes secure and plain URLs; "
                          "only tcp+ws or tls+wss may share a port")
    return ports


def tls_context(definition: ServiceConfig) -> ssl.SSLContext:
    where, tls = definition.table, definition.tls
    if not tls.certfile:
        raise ConfigError(f"{where}.tls.certfile",
                          "tls and wss URLs need a certificate (and tls.keyfile)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.certfile, tls.keyfile or None)
        if tls.cafile:
            context.load_verify_locations(tls.cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}.tls", str(exc)) from exc
    if tls.verify_client:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass(slots=True)
class _Bound:
    port: Port
    server: asyncio.Server
    tls: ssl.SSLContext | None
    bound_port: int  # the port's number, or the one the kernel chose for port 0

    @property
    def address(self) -> Address:
        return self.port.host, self.bound_port, self.port.tls is not None


class ServiceListeners:
    """The listening sockets of one service. `limits` is read for each new connection, so
    a change of `max_message_size` or `login_timeout` needs no new socket."""

    def __init__(self, service: str, accept: Accept, limits: Callable[[], Limits], *,
                 shared: bool = False, site: Site | None = None) -> None:
        """`shared`: the node's other workers listen on the same ports (SO_REUSEPORT).
        `site`: answers the plain HTTP requests of its WebSocket listeners."""
        self.service = service
        self._accept = accept
        self._limits = limits
        self._shared = shared
        self._site = site
        self._bound: dict[Address, _Bound] = {}

    def urls(self) -> list[str]:
        """The listen URLs with the ports actually bound (port 0 → the real one)."""
        return [f"{url.scheme}://{url.host}:{bound.bound_port}{url.path}"
                for bound in self._bound.values() for url in bound.port.urls]

    def addresses(self) -> set[tuple[str, int]]:
        """The hosts and ports it holds (port 0 as the one bound)."""
        return {(bound.port.host, bound.bound_port) for bound in self._bound.values()}

    async def change(self, definition: ServiceConfig, *, renew_tls: bool = False
                     ) -> ListenerChange:
        """Bind what `definition` adds or changes; a `ConfigError` naming `listen` (or
        `tls`) leaves everything as it was. `renew_tls`: read the certificate files again
        (the definition names the same files, their contents may be new)."""
        ports = ports_of(definition)
        needs_tls = any(port.tls is not None for port in ports)
        context = tls_context(definition) if needs_tls else None
        change = ListenerChange()
        kept: set[Address] = set()
        try:
            for port in ports:
                old = self._holder(port, kept)
                if old is not None:
                    if old.port.same_socket(port) and not (renew_tls and port.tls):
                        kept.add(old.address)
                        continue
                    old.server.close()  # the same address: it must be let go of first
                    change.replaced.append(old)
                    del self._bound[old.address]
                new = await self._bind(port, context, definition)
                self._bound[new.address] = new
                change.added.append(new.address)
                kept.add(new.address)
        except BaseException:
            await self.undo(change)
            raise
        change.removed = [bound for address, bound in self._bound.items()
                          if address not in kept]
        return change

    def _holder(self, port: Port, taken: set[Address]) -> _Bound | None:
        """The socket that holds `port`'s address; for port 0, one bound at port 0 that
        serves the same URLs, if any (the kernel chose its number)."""
        if port.port:
            return self._bound.get((port.host, port.port, port.tls is not None))
        return next((bound for bound in self._bound.values()
                     if bound.port.port == 0 and bound.address not in taken
                     and bound.port.same_socket(port)), None)

    def commit(self, change: ListenerChange) -> None:
        """Keep the new sockets; close those the definition no longer has."""
        for old in change.removed:
            old.server.close()
            self._bound.pop(old.address, None)

    async def undo(self, change: ListenerChange) -> None:
        """Close what `change` bound, and bind again what it replaced, as it was."""
        for address in change.added:
            added = self._bound.pop(address, None)
            if added is not None:
                added.server.close()
        for old in change.replaced:
            try:
                server = await self._listen(old.port, old.tls, old.bound_port)
            except OSError as exc:
                log.error("service %s: could not listen again on %s:%d: %s", self.service,
                          old.port.host, old.bound_port, exc)
                continue
            self._bound[old.address] = _Bound(old.port, server, old.tls, old.bound_port)

    async def _bind(self, port: Port, context: ssl.SSLContext | None,
                    definition: ServiceConfig) -> _Bound:
        tls = context if port.tls is not None else None
        where = f"{definition.table}.listen"
        try:
            server = await self._listen(port, tls, port.port)
        except OSError as exc:
            why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise ConfigError(where, f"cannot listen on {port.host}:{port.port}: {why}") from exc
        if not server.sockets:  # uvloop, out of file descriptors, says nothing else
            server.close()
            raise ConfigError(where, f"cannot listen on {port.host}:{port.port}: no socket "
                              "could be opened (too many open files?)")
        return _Bound(port, server, tls, int(server.sockets[0].getsockname()[1]))

    async def _listen(self, port: Port, tls: ssl.SSLContext | None, number: int
                      ) -> asyncio.Server:
        return await listen(self._accept, port.host, number,
                            lines=any(not url.is_websocket for url in port.urls),
                            websocket_paths={url.path for url in port.urls if url.is_websocket},
                            tls=tls, limits=self._limits, shared=self._shared,
                            site=self._site)

    def close(self) -> None:
        """Stop accepting (the connections already accepted are the service's to close)."""
        for bound in self._bound.values():
            bound.server.close()
        self._bound.clear()


@dataclass(slots=True)
class ListenerChange:
    """What `ServiceListeners.change` did, until it is committed or undone."""

    added: list[Address] = field(default_factory=list)
    replaced: list[_Bound] = field(default_factory=list)  # closed already, for `undo`
    removed: list[_Bound] = field(default_factory=list)  # still open, until `commit`
