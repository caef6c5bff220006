"""The node: configuration → services → listening sockets, and a clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from nkservice.errors import ConfigError
from nkservice.events.bus import Bus, LocalBus
from nkservice.events.fanout import Events
from nkservice.plugins.loader import plugin_links
from nkservice.plugins.lua import LuaLogic
from nkservice.service.callbacks import LocalCallbacks
from nkservice.service.config import (
    Credentials,
    ListenUrl,
    NodeConfig,
    ServiceConfig,
    config_warnings,
)
from nkservice.service.contracts import CallbackRegistry, SessionRegistry
from nkservice.service.logic import Link
from nkservice.service.registry import LocalSessionRegistry
from nkservice.service.service import Service
from nkservice.transport.listener import listen

log = logging.getLogger(__name__)

SHUTDOWN_DRAIN = 0.1  # seconds given to transports to flush their close frames


@dataclass(frozen=True, slots=True)
class _Port:
    """The URLs of one service that share a host and port: one listening socket."""

    host: str
    port: int
    urls: tuple[ListenUrl, ...]

    @property
    def secure(self) -> bool:
        return self.urls[0].secure


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.services: dict[str, Service] = {}
        # The seams a cluster replaces; one process needs nothing more than these.
        self.bus: Bus = LocalBus()
        self.events = Events(self.bus)
        self.registry: SessionRegistry = LocalSessionRegistry(self.events)
        self.callbacks: CallbackRegistry = LocalCallbacks()
        self._servers: dict[str, list[tuple[_Port, asyncio.Server]]] = {}

    # -- Directory -------------------------------------------------------------------------

    @property
    def admin(self) -> Credentials:
        return self.config.admin

    def find_service(self, name: str) -> Service | None:
        return self.services.get(name)

    # -- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.config.uses_default_password:
            log.warning("the global admin logs in with the default password (admin/admin): "
                        "for local use only; set [admin] in the config file")
        for warning in config_warnings(self.config):
            log.warning("%s", warning)
        definitions = [self.config.core, *self.config.services.values()]
        ports = {d.name: _ports_of(d) for d in definitions}
        _check_no_port_shared(ports)
        try:
            for definition in definitions:
                await self.start_service(definition, ports[definition.name])
        except BaseException:
            await self.stop()
            raise

    async def start_service(self, definition: ServiceConfig, ports: list[_Port]) -> None:
        where = f"{definition.table}."
        logic = [*plugin_links(definition, where), *_script_links(definition, where)]
        service = Service(definition, self, logic)
        self.services[definition.name] = service
        await service.start()
        tls = _tls_context(definition) if any(p.secure for p in ports) else None
        servers = self._servers.setdefault(definition.name, [])
        for port in ports:
            server = await listen(
                service.accept, port.host, port.port,
                lines=any(not url.is_websocket for url in port.urls),
                websocket_paths={url.path for url in port.urls if url.is_websocket},
                tls=tls if port.secure else None,
                max_message_size=definition.limits.max_message_size,
                login_timeout=definition.limits.login_timeout,
            )
            servers.append((port, server))
        for url in self.urls(definition.name):
            log.info("service %s listening on %s", definition.name, url)

    def urls(self, service: str) -> list[str]:
        """The service's listen URLs with the ports actually bound (port 0 → the real one)."""
        found: list[str] = []
        for port, server in self._servers.get(service, []):
            bound = server.sockets[0].getsockname()[1] if server.sockets else port.port
            found.extend(f"{u.scheme}://{u.host}:{bound}{u.path}" for u in port.urls)
        return found

    async def stop(self) -> None:
        """Stop accepting, close every connection (telling it why), let the closes flush."""
        for servers in self._servers.values():
            for _, server in servers:
                server.close()
        for service in self.services.values():
            service.stop("server shutting down")
        await asyncio.sleep(SHUTDOWN_DRAIN)
        self._servers.clear()


def _script_links(definition: ServiceConfig, where: str) -> list[Link]:
    """The service's Lua script, if it has one: below its plugins, above the callbacks."""
    if definition.script:
        key = f"{where}script"
        try:
            source = Path(definition.script).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{key}: cannot read {definition.script}: {exc}") from exc
    elif definition.script_code:
        key, source = f"{where}script_code", definition.script_code
    else:
        return []
    return [LuaLogic(source, name=definition.name, timeout=definition.lua_timeout,
                     memory=definition.lua_memory, where=key)]


def _ports_of(definition: ServiceConfig) -> list[_Port]:
    """Group URLs into sockets: tcp+ws (or tls+wss) on one host and port share one.

    Port 0 asks for any free port: the plain URLs of a host get one, the secure ones another.
    """
    grouped: dict[tuple[str, int, bool], list[ListenUrl]] = defaultdict(list)
    for url in definition.listen:
        grouped[(url.host, url.port, url.secure)].append(url)
    ports = [_Port(host, port, tuple(urls)) for (host, port, _), urls in grouped.items()]
    numbered = [(p.host, p.port) for p in ports if p.port]
    if len(numbered) != len(set(numbered)):
        raise ConfigError(f"{definition.name}: a port mixes secure and plain URLs; only "
                          "tcp+ws or tls+wss may share a port")
    return ports


def _check_no_port_shared(ports: dict[str, list[_Port]]) -> None:
    owner: dict[tuple[str, int], str] = {}
    for service, service_ports in ports.items():
        for port in service_ports:
            key = (port.host, port.port)
            if port.port and key in owner:
                raise ConfigError(f"services {owner[key]} and {service} both listen on "
                                  f"{port.host}:{port.port}")
            owner[key] = service


def _tls_context(definition: ServiceConfig) -> ssl.SSLContext:
    where, tls = definition.table, definition.tls
    if not tls.certfile:
        raise ConfigError(f"{where}: tls and wss URLs need tls.certfile (and tls.keyfile)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.certfile, tls.keyfile or None)
        if tls.cafile:
            context.load_verify_locations(tls.cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}.tls: {exc}") from exc
    if tls.verify_client:
        context.verify_mode = ssl.CERT_REQUIRED
    return context
