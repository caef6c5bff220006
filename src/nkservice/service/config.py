"""Node configuration and service definitions (PROTOCOL.md §11), read once at the edge.

`load_config(path)` reads the TOML file (or nothing: the embedded default) into frozen
dataclasses; everything below the node receives these, never raw tables. Unknown keys and
values of the wrong type are refused with the key's full name, so a typo in a config file
fails the start instead of being silently ignored.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from nkservice.errors import ConfigError
from nkservice.protocol.connection import Limits

DEFAULT_ADMIN = ("admin", "admin")
DEFAULT_CORE_LISTEN = ("ws://127.0.0.1:9010/", "tcp://127.0.0.1:9010")
DEFAULT_PORTS = {"tcp": 9010, "ws": 9010, "tls": 9011, "wss": 9011}
SCHEMES = tuple(DEFAULT_PORTS)


T = TypeVar("T")
N = TypeVar("N", int, float)


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str  # plain text or "scrypt$..." (see passwords.py)


@dataclass(frozen=True, slots=True)
class ListenUrl:
    scheme: str
    host: str
    port: int
    path: str  # WebSocket request path; "" for tcp and tls

    @property
    def secure(self) -> bool:
        return self.scheme in ("tls", "wss")

    @property
    def is_websocket(self) -> bool:
        return self.scheme in ("ws", "wss")

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    certfile: str = ""
    keyfile: str = ""
    cafile: str = ""
    verify_client: bool = False


@dataclass(frozen=True, slots=True)
class GelfConfig:
    host: str = ""
    port: int = 12201


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    listen: tuple[ListenUrl, ...] = ()
    admin: Credentials | None = None
    users: dict[str, str] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()
    plugin: dict[str, dict[str, Any]] = field(default_factory=dict)  # each plugin's settings
    script: str = ""
    script_code: str = ""
    limits: Limits = field(default_factory=Limits)
    login_failure_delay: float = 0.1  # the first failed login's delay; doubles, at most 5 s
    resume_window: float = 0.0
    resume_buffer: int = 100
    max_subscriptions: int = 10_000  # per session (§5.2)
    lua_timeout: float = 1.0
    lua_memory: int = 16 * 1024 * 1024
    tls: TlsConfig = field(default_factory=TlsConfig)
    gelf: GelfConfig = field(default_factory=GelfConfig)
    permissions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    origin: str = "config"  # or "api": created at run time, kept in the node's store
    source: dict[str, Any] = field(default_factory=dict, compare=False)
    """The table it was read from, as written: an update changes some of its keys."""

    @property
    def table(self) -> str:
        """Where the service is defined, to name its keys in messages (`services.demo`)."""
        return "core" if self.name == "core" else f"services.{self.name}"


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """`[http]`: what the node serves over plain HTTP (docs/operations.md)."""

    dashboard: bool = True  # GET / on the core service's WebSocket listeners
    # Where /metrics, /healthz and /readyz are: "core" (the core service's WebSocket
    # listeners), a listener of their own (host, port), or nowhere (None).
    metrics: str | tuple[str, int] | None = "core"
    public: bool = False  # they may answer on a listener that is not loopback
    token: str = ""  # if set, they need "Authorization: Bearer <token>"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    admin: Credentials
    core: ServiceConfig
    services: dict[str, ServiceConfig]
    data_dir: Path = Path(".nkservice")
    workers: int = 1
    cluster: str = ""
    log_format: str = "text"  # or "json": one JSON object per line
    http: HttpConfig = HttpConfig()
    base_dir: Path = Path(".")  # relative file names (scripts, TLS files) start here

    @property
    def uses_default_password(self) -> bool:
        return (self.admin.user, self.admin.password) == DEFAULT_ADMIN


def load_config(path: Path | None) -> NodeConfig:
    if path is None:
        return parse_node_config({}, Path.cwd())
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(path), str(exc)) from exc
    return parse_node_config(table, path.parent)


def config_warnings(config: NodeConfig) -> list[str]:
    """What is accepted but probably not what the operator meant, to log at start."""
    warnings = []
    for service in (config.core, *config.services.values()):
        where = service.table
        if not service.listen:
            warnings.append(f"{where}.listen is empty: nobody can connect to this service")
        if service.gelf.host and "gelf" not in service.plugins:
            warnings.append(f"{where}.gelf: a host without the gelf plugin in "
                            f"{where}.plugins: session logs go to the node's log")
    return warnings


def parse_node_config(table: dict[str, Any], base_dir: Path) -> NodeConfig:
    _known(table, "", {"node", "admin", "core", "services", "http"})
    node = _table(table, "node")
    _known(node, "node.", {"data_dir", "workers", "cluster", "log_format"})
    log_format = _get(node, "node.log_format", str, "text")
    if log_format not in ("text", "json"):
        raise ConfigError("node.log_format", f"{log_format!r}: expected 'text' or 'json'")
    admin = _table(table, "admin")
    _known(admin, "admin.", {"user", "password"})
    core = {"listen": list(DEFAULT_CORE_LISTEN), **_table(table, "core")}
    services = {
        name: parse_service(name, _table(_table(table, "services"), name), base_dir,
                            where=f"services.{name}.")
        for name in _table(table, "services")
    }
    if "core" in services:
        raise ConfigError("services.core", "the name 'core' is the [core] table's")
    for name in services:
        check_service_name(name, f"services.{name}")
    data_dir = Path(_get(node, "node.data_dir", str, ".nkservice"))
    return NodeConfig(
        admin=Credentials(_get(admin, "admin.user", str, DEFAULT_ADMIN[0]),
                          _get(admin, "admin.password", str, DEFAULT_ADMIN[1])),
        core=parse_service("core", core, base_dir, where="core."),
        services=services,
        data_dir=data_dir if data_dir.is_absolute() else base_dir / data_dir,
        workers=_get(node, "node.workers", int, 1),
        cluster=_cluster_url(_get(node, "node.cluster", str, "")),
        log_format=log_format,
        http=_http(_table(table, "http")),
        base_dir=base_dir,
    )


def _http(table: dict[str, Any]) -> HttpConfig:
    _known(table, "http.", {"dashboard", "metrics", "public", "token"})
    where = _get(table, "http.metrics", str, "core")
    metrics: str | tuple[str, int] | None = where if where == "core" else None
    if where not in ("core", ""):
        parts = urlsplit(where)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "http" or not parts.hostname or port is None or parts.path not in (
                "", "/"):
            raise ConfigError("http.metrics", f"{where!r}: expected \"core\", \"\" or "
                              "http://HOST:PORT")
        metrics = (parts.hostname, port)
    return HttpConfig(dashboard=_get(table, "http.dashboard", bool, True), metrics=metrics,
                      public=_get(table, "http.public", bool, False),
                      token=_get(table, "http.token", str, ""))


_LIMIT_KEYS = {f.name for f in fields(Limits)}
_SERVICE_KEYS = {
    "listen", "admin", "users", "plugins", "plugin", "script", "script_code", "login_failure_delay",
    "resume_window", "resume_buffer", "max_subscriptions", "lua_timeout",
    "lua_memory", "tls", "gelf", "permissions",
} | _LIMIT_KEYS


SERVICE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def check_service_name(name: str, key: str) -> None:
    """A service's name is a plain identifier: it appears in URLs, logs and bus subjects."""
    if not SERVICE_NAME.fullmatch(name):
        raise ConfigError(key, f"{name!r} is not a service name: letters, digits, '_' and "
                          "'-', starting with a letter or '_', at most 64")


def parse_service(name: str, table: dict[str, Any], base_dir: Path, *, where: str = "",
                  origin: str = "config") -> ServiceConfig:
    """A service definition from a TOML table or a `create_service` JSON object."""
    _known(table, where, _SERVICE_KEYS)
    listen = _get(table, f"{where}listen", list, [])
    admin = table.get("admin")
    if admin is not None:
        admin = _as(admin, f"{where}admin", dict)
        _known(admin, f"{where}admin.", {"user", "password"})
        admin = Credentials(_get(admin, f"{where}admin.user", str, ""),
                            _get(admin, f"{where}admin.password", str, ""))
    users = _get(table, f"{where}users", dict, {})
    for user, password in users.items():
        _as(password, f"{where}users.{user}", str)
    tls = _get(table, f"{where}tls", dict, {})
    _known(tls, f"{where}tls.", {f.name for f in fields(TlsConfig)})
    gelf = _get(table, f"{where}gelf", dict, {})
    _known(gelf, f"{where}gelf.", {"host", "port"})
    permissions = _get(table, f"{where}permissions", dict, {})
    plugin_tables = _get(table, f"{where}plugin", dict, {})
    for plugin, settings in plugin_tables.items():
        _as(settings, f"{where}plugin.{plugin}", dict)
    defaults = Limits()
    limits = Limits(**{
        key: _number(table, f"{where}{key}", type(getattr(defaults, key)), getattr(defaults, key))
        for key in _LIMIT_KEYS
    })
    script = _get(table, f"{where}script", str, "")
    if script and table.get("script_code"):
        raise ConfigError(f"{where}script_code", "give script (a file) or script_code, not both")
    return ServiceConfig(
        name=name,
        listen=tuple(parse_listen_url(_as(url, f"{where}listen", str), f"{where}listen")
                     for url in listen),
        admin=admin,
        users=dict(users),
        plugins=tuple(_as(p, f"{where}plugins", str) for p in _get(table, f"{where}plugins",
                                                                   list, [])),
        plugin=plugin_tables,
        script=str(base_dir / script) if script else "",
        script_code=_get(table, f"{where}script_code", str, ""),
        limits=limits,
        login_failure_delay=_number(table, f"{where}login_failure_delay", float, 0.1),
        resume_window=_number(table, f"{where}resume_window", float, 0.0),
        resume_buffer=_number(table, f"{where}resume_buffer", int, 100),
        max_subscriptions=_number(table, f"{where}max_subscriptions", int, 10_000),
        lua_timeout=_number(table, f"{where}lua_timeout", float, 1.0),
        lua_memory=_number(table, f"{where}lua_memory", int, 16 * 1024 * 1024),
        tls=TlsConfig(
            certfile=_path(tls, f"{where}tls.certfile", base_dir),
            keyfile=_path(tls, f"{where}tls.keyfile", base_dir),
            cafile=_path(tls, f"{where}tls.cafile", base_dir),
            verify_client=_get(tls, f"{where}tls.verify_client", bool, False),
        ),
        gelf=GelfConfig(_get(gelf, f"{where}gelf.host", str, ""),
                        _get(gelf, f"{where}gelf.port", int, 12201)),
        permissions={
            role: tuple(_as(p, f"{where}permissions.{role}", str)
                        for p in _as(patterns, f"{where}permissions.{role}", list))
            for role, patterns in permissions.items()
        },
        origin=origin,
        source=dict(table),
    )


_SECRET_WORDS = ("password", "secret", "token", "key")
HIDDEN = "<hidden>"


def public_definition(service: ServiceConfig) -> dict[str, Any]:
    """A service's definition with every key of §11, for `get_service`: no secret in it
    (passwords are left out; users are listed by name; plugin settings whose name says
    password, secret, token or key are hidden; TLS files are named, not read)."""
    limits = asdict(service.limits)
    return {
        "name": service.name,
        "origin": service.origin,
        "listen": [str(url) for url in service.listen],
        "admin": {"user": service.admin.user} if service.admin else None,
        "users": sorted(service.users),
        "plugins": list(service.plugins),
        "plugin": {plugin: {key: HIDDEN if any(w in key.lower() for w in _SECRET_WORDS)
                            else value for key, value in settings.items()}
                   for plugin, settings in service.plugin.items()},
        "script": service.script,
        "script_code": service.script_code,
        **limits,
        "login_failure_delay": service.login_failure_delay,
        "resume_window": service.resume_window,
        "resume_buffer": service.resume_buffer,
        "max_subscriptions": service.max_subscriptions,
        "lua_timeout": service.lua_timeout,
        "lua_memory": service.lua_memory,
        "tls": asdict(service.tls),
        "gelf": asdict(service.gelf),
        "permissions": {role: list(patterns) for role, patterns in service.permissions.items()},
    }


def _cluster_url(value: str) -> str:
    """`node.cluster`: NATS server URLs, comma-separated (any one will do to join)."""
    for url in filter(None, (part.strip() for part in value.split(","))):
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
            raise ConfigError("node.cluster", f"{url!r} is not a NATS URL "
                              "(nats://HOST:PORT)")
    return value


def parse_listen_url(url: str, key: str = "listen") -> ListenUrl:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(key, f"{url!r}: {exc}") from exc
    if parts.scheme not in SCHEMES:
        raise ConfigError(key, f"{url!r}: the scheme must be one of {', '.join(SCHEMES)}")
    if not parts.hostname:
        raise ConfigError(key, f"{url!r}: a host is needed")
    ws = parts.scheme in ("ws", "wss")
    return ListenUrl(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port if port is not None else DEFAULT_PORTS[parts.scheme],
        path=(parts.path or "/") if ws else "",
    )


def _known(table: dict[str, Any], where: str, keys: set[str]) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}", "unknown key", syntax=True)


def _table(table: dict[str, Any], key: str) -> dict[str, Any]:
    return _get(table, key, dict, {})


def _as(value: Any, key: str, kind: type[T]) -> T:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(key, f"expected {kind.__name__}, got {value!r}", syntax=True)
    return value


def _get(table: dict[str, Any], key: str, kind: type[T], default: T) -> T:
    name = key.rsplit(".", 1)[-1]
    return _as(table[name], key, kind) if name in table else default


def _number(table: dict[str, Any], key: str, kind: type[N], default: N) -> N:
    name = key.rsplit(".", 1)[-1]
    if name not in table:
        return default
    value = table[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(key, f"expected a non-negative number, got {value!r}",
                          syntax=not isinstance(value, int | float) or isinstance(value, bool))
    if kind is int and not isinstance(value, int):
        raise ConfigError(key, f"expected a whole number, got {value!r}", syntax=True)
    return kind(value)


def _path(table: dict[str, Any], key: str, base_dir: Path) -> str:
    """A file the node will read: it must be there (named in full when it is not)."""
    value = _get(table, key, str, "")
    if not value:
        return ""
    path = base_dir / value
    if not path.is_file():
        raise ConfigError(key, f"no such file: {path}")
    return str(path)
