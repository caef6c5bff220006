"""Python plugins (PROTOCOL.md §8): what a plugin is (`loader.py` turns a service's
`plugins` list into links of its chain).

A plugin is an object with a `name`, the names of the plugins it `depends` on, a way to
read its own settings (the `[services.NAME.plugin.PLUGIN]` table), and a `link` for a
service: a `Link` of the service logic chain, which may take part in any hook — decide
logins and subscriptions, answer the requests of its own classes (or core commands), see
client events and sessions come and go — and pass (`CONTINUE`) what it does not decide.

A service names its plugins by built-in name (`gelf`) or as `package.module:attribute`
(a `Plugin` instance, or a class of one made with no arguments). The plugins a listed one
depends on are added when left out. The chain has each plugin above the ones it depends on
(a plugin can refine what its dependencies do), otherwise in the order listed.
"""

from __future__ import annotations

from typing import Any

from nkservice.errors import ConfigError
from nkservice.service.config import ServiceConfig
from nkservice.service.logic import Link


class Plugin:
    """Subclass it; override `depends`, `settings` and `link`."""

    name = ""
    depends: tuple[str, ...] = ()

    def settings(self, table: dict[str, Any], where: str) -> Any:
        """Check this plugin's settings table and return what `link` needs. `where` is the
        table's name for error messages (`services.demo.plugin.NAME.`); raise
        `ConfigError` naming the key. By default a plugin takes no settings."""
        if table:
            raise ConfigError(f"{where}{sorted(table)[0]}", "unknown key", syntax=True)
        return None

    def link(self, service: ServiceConfig, settings: Any) -> Link:
        """The plugin's link in the chain of `service`, with its checked `settings`."""
        raise NotImplementedError
