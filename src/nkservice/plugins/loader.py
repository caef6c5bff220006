"""Turning a service's `plugins` list into links of its logic chain (PROTOCOL.md §8).

A name is a built-in plugin's (`gelf`) or `package.module:attribute` (a `Plugin` instance,
or a class of one made with no arguments). The plugins a listed one depends on are added
when left out. The chain has each plugin above the ones it depends on (a plugin can refine
what its dependencies do), otherwise in the order listed. Every failure is a `ConfigError`
naming the key.
"""

from __future__ import annotations

import importlib

from nkservice.errors import ConfigError
from nkservice.plugins.api import Plugin
from nkservice.plugins.gelf import GelfPlugin
from nkservice.service.config import ServiceConfig
from nkservice.service.logic import Link

BUILTINS: dict[str, type[Plugin]] = {"gelf": GelfPlugin}


def resolve(name: str, where: str) -> Plugin:
    """A plugin from its built-in name or `package.module:attribute`."""
    if ":" not in name:
        builtin = BUILTINS.get(name)
        if builtin is None:
            raise ConfigError(where, f"no built-in plugin {name!r} (built-in: "
                              f"{', '.join(sorted(BUILTINS))}; others are named "
                              "package.module:attribute)")
        return builtin()
    module_name, _, attribute = name.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(where, f"cannot load plugin {name!r}: {exc}") from exc
    plugin = target() if isinstance(target, type) else target
    if not isinstance(plugin, Plugin):
        raise ConfigError(where, f"{name!r} is not a nkservice Plugin")
    if not plugin.name:
        plugin.name = name
    return plugin


def ordered(names: tuple[str, ...], where: str) -> list[Plugin]:
    """The plugins of a service, with their dependencies, top of the chain first."""
    found: dict[str, Plugin] = {}
    pending = list(names)
    while pending:
        name = pending.pop(0)
        if name not in found:
            plugin = resolve(name, where)
            found[name] = plugin
            pending.extend(plugin.depends)
    chain: list[Plugin] = []
    placing: list[str] = []

    def place(name: str) -> None:
        """Depth first: a plugin goes below everything that depends on it."""
        if name in placing:
            raise ConfigError(where, "plugins depend on each other in a circle: "
                              f"{' -> '.join([*placing[placing.index(name):], name])}")
        if found[name] in chain:
            return
        placing.append(name)
        for dependency in found[name].depends:
            place(dependency)
        placing.pop()
        chain.append(found[name])

    for name in reversed(list(found)):
        place(name)
    chain.reverse()  # dependencies were placed first, the listed order backwards
    return chain


def plugin_links(service: ServiceConfig, where: str) -> list[Link]:
    """The links of a service's plugins, top first, each with its checked settings.
    `where` names the service's table in messages (`services.demo.`)."""
    names, tables = service.plugins, service.plugin
    plugins = ordered(names, f"{where}plugins")
    known = {plugin.name for plugin in plugins} | set(names)
    for name in tables:
        if name not in known:
            raise ConfigError(f"{where}plugin.{name}",
                              f"no plugin of that name in {where}plugins")
    return [plugin.link(service, plugin.settings(dict(tables.get(plugin.name, {})),
                                                 f"{where}plugin.{plugin.name}."))
            for plugin in plugins]
