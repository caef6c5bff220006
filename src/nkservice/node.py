"""The node: configuration → services → listening sockets; services changed while it runs;
a clean shutdown.

The services of the config file start first, and their failures stop the start: the file
is wrong. The services created by API come next, from the store under `data_dir`; one that
no longer starts (a port taken meanwhile, a certificate gone) is logged and skipped, so one
bad definition never keeps the others down.

Creating, updating and stopping a service (PROTOCOL.md §6) happen one at a time, and each
either happens whole or changes nothing: what can fail (the definition, its plugins and
script, its certificate, its sockets, the store) is done before anything running is
touched, and undone when a later step fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nkservice.cluster.bus import NatsBus
from nkservice.cluster.callbacks import ClusterCallbacks
from nkservice.cluster.kv_store import KvServiceStore
from nkservice.cluster.node import Cluster
from nkservice.cluster.registry import ClusterRegistry
from nkservice.cluster.rpc import Reply
from nkservice.errors import ApiError, ConfigError, ErrorCode
from nkservice.events.bus import Bus, LocalBus
from nkservice.events.fanout import Events
from nkservice.events.index import Topic
from nkservice.listeners import ServiceListeners, ports_of
from nkservice.metrics import Labels, Metrics, Uncounted, merge, render
from nkservice.plugins.loader import plugin_links
from nkservice.plugins.lua import LuaLogic
from nkservice.service.callbacks import LocalCallbacks
from nkservice.service.config import (
    Credentials,
    NodeConfig,
    ServiceConfig,
    check_service_name,
    config_warnings,
    parse_service,
    public_definition,
)
from nkservice.service.contracts import CallbackRegistry, SessionRegistry
from nkservice.service.logic import Link
from nkservice.service.registry import LocalSessionRegistry
from nkservice.service.service import Service
from nkservice.service.store import FileServiceStore, ServiceStore
from nkservice.site import NodeSite
from nkservice.transport.http import listen_http

log = logging.getLogger(__name__)

SHUTDOWN_DRAIN = 0.1  # seconds given to transports to flush their close frames
UNTIL_RESTART = ("a service of the config file: this lasts until the node restarts, "
                 "which reads the file again")
# How long the process that changed a service of the config file waits for the cluster's
# other processes to make the same change (loading a Lua script takes up to lua_timeout).
FOLLOW_TIMEOUT = 10.0


class Node:
    def __init__(self, config: NodeConfig, store: ServiceStore | None = None, *,
                 worker: bool = False) -> None:
        """`worker`: one of the node's worker processes, which share its listening ports."""
        self.config = config
        self.worker = worker
        self.services: dict[str, Service] = {}
        # The seams a cluster replaces; one process needs nothing more than the local ones.
        self.cluster = Cluster(config.cluster) if config.cluster else None
        self.bus: Bus = (NatsBus(self.cluster.link, self.cluster.process) if self.cluster
                         else LocalBus())
        self.metrics = Metrics(self._gauges) if config.http.metrics else Uncounted()
        self.events = Events(self.bus, self.metrics)
        local = LocalSessionRegistry(self.events)
        self.registry: SessionRegistry = (ClusterRegistry(local, self.cluster.rpc)
                                          if self.cluster else local)
        self.cluster_callbacks = (ClusterCallbacks(LocalCallbacks(self.metrics),
                                                   self.cluster.link, self.cluster.rpc)
                                  if self.cluster else None)
        self.callbacks: CallbackRegistry = (self.cluster_callbacks
                                            or LocalCallbacks(self.metrics))
        # A scrape adds up the processes of this node: the workers of one supervisor.
        self.node_id = (f"{socket.gethostname()}-{os.getppid()}" if worker
                        else self.cluster.process if self.cluster else "")
        http = config.http
        self._core_site = (NodeSite(self, http, dashboard=http.dashboard,
                                    operations=http.metrics == "core")
                           if http.dashboard or http.metrics == "core" else None)
        self._operations: asyncio.Server | None = None  # [http] metrics = "http://…"
        self._started_at = time.monotonic()
        self._ready = False
        self.store: ServiceStore = store or FileServiceStore(config.data_dir / "services")
        self._own_store = store is None
        self._watching: asyncio.Task[None] | None = None
        self._applying: set[asyncio.Task[None]] = set()
        self._listeners: dict[str, ServiceListeners] = {}
        self._ports: dict[tuple[str, int], str] = {}  # each held host and port: its service
        self._held: dict[str, set[tuple[str, int]]] = {}  # each service's
        self._changing = asyncio.Lock()  # one create, update or stop at a time

    # -- Directory -------------------------------------------------------------------------

    @property
    def admin(self) -> Credentials:
        return self.config.admin

    def find_service(self, name: str) -> Service | None:
        return self.services.get(name)

    def cluster_state(self) -> dict[str, Any] | None:
        return self.cluster.state if self.cluster is not None else None

    # -- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.config.uses_default_password:
            log.warning("the global admin logs in with the default password (admin/admin): "
                        "for local use only; set [admin] in the config file")
        for warning in config_warnings(self.config):
            log.warning("%s", warning)
        shared: KvServiceStore | None = None
        if self.cluster is not None:
            await self.cluster.start()
            assert self.cluster_callbacks is not None
            self.cluster_callbacks.start()
            self.cluster.rpc.serve("metrics", lambda request, reply: reply.ok(
                {"node": self.node_id, "m": self.metrics.snapshot()}))
            self.cluster.rpc.serve("config_service", self._serve_config_change)
            if self._own_store:  # the cluster's services are where every process sees them
                self.store = shared = KvServiceStore(self.cluster.link.client)
        try:
            for definition in (self.config.core, *self.config.services.values()):
                await self._start(definition)
            if shared is not None:  # from before the load: no change falls in between
                self._watching = asyncio.get_running_loop().create_task(
                    shared.watch(self._stored_elsewhere))
            async with self._changing:  # what the watch brings waits for the load
                await self._start_stored()
            await self._listen_operations()
        except BaseException:
            await self.stop()
            raise
        self._ready = True

    async def _listen_operations(self) -> None:
        """`[http] metrics = "http://HOST:PORT"`: metrics and health on a socket of their own."""
        where = self.config.http.metrics
        if not isinstance(where, tuple):
            return
        host, port = where
        site = NodeSite(self, self.config.http, dashboard=False, operations=True)
        try:
            self._operations = await listen_http(site, host, port, shared=self.worker)
        except OSError as exc:
            why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise ConfigError("http.metrics", f"cannot listen on {host}:{port}: {why}"
                              ) from exc
        log.info("metrics and health on http://%s:%d/metrics", host,
                 self._operations.sockets[0].getsockname()[1])

    async def _start_stored(self) -> None:
        for name, table in (await self.store.load()).items():
            if name == "core" or name in self.config.services:
                log.warning("the stored service %s is not started: the config file defines "
                            "a service of that name", name)
                continue
            try:
                await self._start(self._parse(name, _without_name(table), "api"))
            except ConfigError as error:
                log.error("the service %s, created by API, did not start: %s", name, error)
            except Exception:  # a plugin's own failure: it must not keep the others down
                log.exception("the service %s, created by API, did not start", name)

    async def _start(self, definition: ServiceConfig, *, publish: bool = True) -> Service:
        """Start a service and its sockets; a failure leaves nothing of it behind."""
        name = definition.name
        self._check_ports_free(definition)
        service = Service(definition, self, await _logic(definition))
        listeners = ServiceListeners(name, service.accept, lambda: service.config.limits,
                                     shared=self.worker,
                                     site=self._core_site if name == "core" else None)
        await service.start()
        try:
            listeners.commit(await listeners.change(definition))
        except BaseException:
            service.stop("the service did not start")
            raise
        self.services[name] = service
        self._listeners[name] = listeners
        self._hold_ports(name)
        for url in listeners.urls():
            log.info("service %s listening on %s", name, url)
        if publish:
            self._publish("start", name)
        return service

    def urls(self, service: str) -> list[str]:
        """The service's listen URLs with the ports actually bound (port 0 → the real one)."""
        listeners = self._listeners.get(service)
        return listeners.urls() if listeners is not None else []

    def operations_port(self) -> int | None:
        """The port of `[http] metrics = "http://…"` as bound (port 0 → the real one)."""
        if self._operations is None:
            return None
        return int(self._operations.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting, close every connection (telling it why), let the closes flush."""
        self._ready = False
        if self._operations is not None:
            self._operations.close()
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # or NATS closed
                await self._watching
        for listeners in self._listeners.values():
            listeners.close()
        for service in self.services.values():
            service.stop("server shutting down")
        await asyncio.sleep(SHUTDOWN_DRAIN)
        self._listeners.clear()
        if self.cluster is not None:
            await self.cluster.stop()

    # -- the `service` commands (§6) -------------------------------------------------------

    async def create_service(self, name: str, definition: dict[str, Any]) -> dict[str, Any]:
        async with self._changing:
            check_service_name(name, "name")
            if name == "core":
                raise ApiError(ErrorCode.invalid_value, "name: 'core' is the core service's")
            if name in self.config.services:
                raise ApiError(ErrorCode.service_already_exists,
                               f"{name} is a service of the config file")
            if name in self.services:
                raise ApiError(ErrorCode.service_already_exists, name)
            service = await self._start(self._parse(name, definition, "api"))
            try:
                await self._keep(name, definition, new=True)
            except BaseException:
                await self._remove(service, "the service could not be stored")
                raise
            return {"name": name}

    async def update_service(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        async with self._changing:
            service = self._changeable(name)
            definition = await self._update(service, changes, publish=True)
            log.info("service %s updated (%s); listening on %s", name,
                     ", ".join(sorted(changes)) or "no keys", ", ".join(self.urls(name)))
        return await self._config_change_told(definition, {"name": name}, changes)

    async def _update(self, service: Service, changes: dict[str, Any], *, publish: bool
                      ) -> ServiceConfig:
        table = {key: value for key, value in {**service.config.source, **changes}.items()
                 if value is not None}
        return await self._change(service, table, renew_tls="tls" in changes,
                                  keep=service.config.origin == "api", publish=publish)

    async def _change(self, service: Service, table: dict[str, Any], *, renew_tls: bool,
                      keep: bool, publish: bool) -> ServiceConfig:
        """Give a running service the definition `table`, whole or not at all (`keep`: in
        the store too; `publish`: said in a `core/service/update` event, by the process
        the change was asked of alone)."""
        name = service.name
        definition = self._parse(name, table, service.config.origin)
        self._check_ports_free(definition)
        chain = await service.new_chain(definition, await _logic(definition))
        listeners = self._listeners[name]
        try:
            change = await listeners.change(definition, renew_tls=renew_tls)
        except BaseException:
            chain.stop()
            raise
        try:
            if keep:
                await self._keep(name, table)
        except BaseException:
            await listeners.undo(change)
            chain.stop()
            raise
        listeners.commit(change)
        self._hold_ports(name)
        service.reconfigure(definition, chain)
        if publish:
            self._publish("update", name)
        return definition

    async def stop_service(self, name: str) -> dict[str, Any]:
        async with self._changing:
            service = self._changeable(name)
            if service.config.origin == "api":
                await self._keep(name, None)
            await self._remove(service, "the service was stopped")
            log.info("service %s stopped", name)
        return await self._config_change_told(service.config, {}, None)

    # A service of the config file is not in the store, which the other processes follow:
    # its change is told to them (every process of the cluster reads the same file), and
    # answered once they have made it too.

    async def _config_change_told(self, definition: ServiceConfig, answer: dict[str, Any],
                                  changes: dict[str, Any] | None) -> dict[str, Any]:
        """The answer to an update (`changes`) or stop (None) made here; for a service of
        the config file, once the cluster's other processes made it too."""
        if definition.origin != "config":
            return answer
        note = UNTIL_RESTART
        if self.cluster is not None and (others := len(self.cluster.rpc.members())):
            done = await self.cluster.rpc.gather(
                "config_service", {"name": definition.name, "changes": changes},
                timeout=FOLLOW_TIMEOUT)
            if missed := others - len(done):
                note += (f"; {missed} of the cluster's {others} other processes did not "
                         f"make the change (their logs say why)")
                log.warning("service %s: %d of %d other processes did not make the change",
                            definition.name, missed, others)
        return {**answer, "origin": "config", "note": note}

    def _serve_config_change(self, request: dict[str, Any], reply: Reply) -> None:
        task = asyncio.get_running_loop().create_task(self._follow_config_change(
            str(request.get("name")), request.get("changes"), str(request.get("from")),
            reply))
        self._applying.add(task)
        task.add_done_callback(self._applying.discard)

    async def _follow_config_change(self, name: str, changes: dict[str, Any] | None,
                                    asker: str, reply: Reply) -> None:
        """Another process updated (`changes`) or stopped (None) a service of the config
        file: the same here (said once, by that process)."""
        async with self._changing:
            service = self.services.get(name)
            if service is None or service.config.origin != "config":  # not here (any more)
                reply.ok()
                return
            try:
                if changes is None:
                    await self._remove(service, "the service was stopped", publish=False)
                else:
                    await self._update(service, changes, publish=False)
            except Exception as error:
                why = str(error) if isinstance(error, ConfigError | ApiError) else repr(error)
                log.error("service %s, as process %s changed it, cannot run here: %s", name,
                          asker, why)
                reply.error(ApiError(ErrorCode.invalid_value, why))
                return
            log.info("service %s %s by process %s", name,
                     "stopped" if changes is None else "updated", asker)
            reply.ok()

    async def list_services(self) -> list[dict[str, Any]]:
        listing = []
        for name, service in list(self.services.items()):
            users = await self.registry.users(name)
            listing.append({"name": name, "listen": self.urls(name),
                            "sessions": sum(len(ids) for ids in users.values()),
                            "origin": service.config.origin})
        return listing

    def get_service(self, name: str) -> dict[str, Any]:
        service = self.services.get(name)
        if service is None:
            raise ApiError(ErrorCode.service_not_found, name)
        return public_definition(service.config)

    # -- NodeStatus: what /metrics, /healthz and /readyz say -------------------------------

    async def scrape(self) -> bytes:
        snapshots = [self.metrics.snapshot()]
        if self.cluster is not None:
            snapshots += [answer["m"] for answer in await self.cluster.rpc.gather("metrics", {})
                          if isinstance(answer, dict) and answer.get("node") == self.node_id]
        return render(merge(snapshots))

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "pid": os.getpid(),
                "uptime": round(time.monotonic() - self._started_at, 3)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready: started, every service listening, and in a cluster NATS connected or the
        process serving on its own meanwhile (degraded)."""
        listening = {name: self.urls(name) for name in self.services}
        ready = self._ready and all(listening.values())
        return ready, {"ready": ready, "services": listening,
                       "cluster": self.cluster_state()}

    def _gauges(self) -> Iterator[tuple[str, Labels, float]]:
        """What a snapshot reads as it is now."""
        for name, service in self.services.items():
            transports = Counter(caller.transport for caller in service.connections)
            for transport, count in transports.items():
                yield "nkservice_connections", (name, transport), count
            yield "nkservice_sessions", (name,), sum(
                1 for caller in service.connections if caller.session_id)
            lua = sum(link.seconds for link in service.logic.links
                      if isinstance(link, LuaLogic))
            if lua:
                yield "nkservice_lua_seconds", (name,), lua

    # -- the other processes of a cluster ----------------------------------------------------

    def _stored_elsewhere(self, name: str, table: dict[str, Any] | None) -> None:
        """The store changed (any process, this one too): make this process match it."""
        task = asyncio.get_running_loop().create_task(self._match_store(name, table))
        self._applying.add(task)
        task.add_done_callback(self._applying.discard)

    async def _match_store(self, name: str, stored: dict[str, Any] | None) -> None:
        async with self._changing:
            service = self.services.get(name)
            if name == "core" or name in self.config.services:
                return  # the config file's: never from the store
            try:
                if stored is None:
                    if service is not None:
                        await self._remove(service, "the service was stopped", publish=False)
                        log.info("service %s stopped by another process", name)
                    return
                table = _without_name(stored)
                if service is None:
                    await self._start(self._parse(name, table, "api"), publish=False)
                    log.info("service %s created by another process", name)
                elif table != service.config.source:
                    renew = table.get("tls") != service.config.source.get("tls")
                    await self._change(service, table, renew_tls=renew, keep=False,
                                       publish=False)
                    log.info("service %s updated by another process", name)
            except ConfigError as error:
                log.error("service %s, as another process stored it, cannot run here: %s",
                          name, error)
            except Exception:
                log.exception("service %s: following the store failed", name)

    # -- helpers ---------------------------------------------------------------------------

    def _parse(self, name: str, table: dict[str, Any], origin: str) -> ServiceConfig:
        return parse_service(name, table, self.config.base_dir, where=f"services.{name}.",
                             origin=origin)

    async def _keep(self, name: str, table: dict[str, Any] | None, *, new: bool = False
                    ) -> None:
        """Store a definition (None: delete it; `new`: unless another process of the
        cluster stored that name first); a failure of the disk is said in words."""
        try:
            if table is None:
                await self.store.delete(name)
            else:
                await self.store.save(name, {"name": name, **table}, new=new)
        except FileExistsError:
            raise ApiError(ErrorCode.service_already_exists, name) from None
        except OSError as exc:
            log.error("service %s: the store failed: %s", name, exc)
            raise ApiError(ErrorCode.internal_error, f"the service's definition could not be "
                           f"stored: {exc.strerror or exc}") from exc

    def _changeable(self, name: str) -> Service:
        if name == "core":  # the admin's own way in comes from the config file only
            raise ApiError(ErrorCode.invalid_value, "name: the core service is the config "
                           "file's [core]")
        service = self.services.get(name)
        if service is None:
            raise ApiError(ErrorCode.service_not_found, name)
        return service

    async def _remove(self, service: Service, reason: str, *, publish: bool = True) -> None:
        """Free the sockets, close the sessions (telling them `reason`), drop the rest."""
        if publish:
            self._publish("stop", service.name)
        self._listeners.pop(service.name).close()
        self._release_ports(service.name)
        del self.services[service.name]
        service.stop(reason)

    def _check_ports_free(self, definition: ServiceConfig) -> None:
        """A port another service holds is refused by name (the OS would only say "address
        in use"). One look-up per port: a node may run thousands of services."""
        for port in ports_of(definition):
            other = self._ports.get((port.host, port.port))
            if port.port and other is not None and other != definition.name:
                raise ConfigError(f"{definition.table}.listen",
                                  f"services {other} and {definition.name} both listen "
                                  f"on {port.host}:{port.port}")

    def _hold_ports(self, name: str) -> None:
        """Note the addresses a service's sockets hold now (after a start or an update)."""
        self._release_ports(name)
        held = self._held[name] = self._listeners[name].addresses()
        self._ports.update(dict.fromkeys(held, name))

    def _release_ports(self, name: str) -> None:
        for address in self._held.pop(name, ()):
            self._ports.pop(address, None)

    def _publish(self, what: str, name: str) -> None:
        """`core/service/start|stop|update` in the core service (§5.4)."""
        body = {"listen": self.urls(name), "origin": self.services[name].config.origin}
        self.events.publish(Topic("core", "core", "service", what, name), body)



def _without_name(table: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in table.items() if key != "name"}


async def _logic(definition: ServiceConfig) -> list[Link]:
    """The links of a service's plugins and Lua script, top first; the script runs in a
    thread as it loads (it may take up to lua_timeout)."""
    where = f"{definition.table}."
    return [*plugin_links(definition, where),
            *await asyncio.to_thread(_script_links, definition, where)]


def _script_links(definition: ServiceConfig, where: str) -> list[Link]:
    """The service's Lua script, if it has one: below its plugins, above the callbacks."""
    if definition.script:
        key = f"{where}script"
        try:
            source = Path(definition.script).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(key, f"cannot read {definition.script}: {exc}") from exc
    elif definition.script_code:
        key, source = f"{where}script_code", definition.script_code
    else:
        return []
    return [LuaLogic(source, name=definition.name, timeout=definition.lua_timeout,
                     memory=definition.lua_memory, where=key)]
