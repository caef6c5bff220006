"""Reading the node configuration (PROTOCOL.md §11) and password hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from nkservice.errors import ConfigError
from nkservice.node import Node
from nkservice.service.config import (
    config_warnings,
    load_config,
    parse_node_config,
)
from nkservice.service.passwords import check_password, hash_password


def test_embedded_default() -> None:
    config = load_config(None)
    assert config.uses_default_password
    assert [str(url) for url in config.core.listen] == ["ws://127.0.0.1:9010/",
                                                         "tcp://127.0.0.1:9010"]
    assert config.core.limits.request_timeout == 5.0
    assert config.core.limits.ping_interval == 60.0
    assert config.services == {}


def test_a_full_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("""
[node]
data_dir = "state"
[admin]
user = "root"
password = "x"
[services.demo]
listen = ["wss://0.0.0.0/", "tls://example.org"]
admin = { user = "demo-admin", password = "pw" }
users = { alice = "pw1" }
ping_interval = 0.5
max_message_size = 2048
tls = { certfile = "cert.pem" }
permissions = { user = ["core.user.list"] }
""")
    (tmp_path / "cert.pem").write_text("")
    config = load_config(path)
    assert config.data_dir == tmp_path / "state"
    demo = config.services["demo"]
    assert [(u.scheme, u.host, u.port, u.path) for u in demo.listen] == [
        ("wss", "0.0.0.0", 9011, "/"), ("tls", "example.org", 9011, "")]
    assert demo.limits.ping_interval == 0.5 and demo.limits.max_message_size == 2048
    assert demo.tls.certfile == str(tmp_path / "cert.pem")
    assert demo.permissions == {"user": ("core.user.list",)}
    assert not config.uses_default_password


@pytest.mark.parametrize(("table", "message"), [
    ({"nodes": {}}, "nodes: unknown key"),
    ({"services": {"demo": {"listen": ["http://x:1"]}}}, "scheme"),
    ({"services": {"demo": {"ping_interval": "5"}}}, "services.demo.ping_interval"),
    ({"services": {"demo": {"ping_interval": -1}}}, "services.demo.ping_interval"),
    ({"services": {"demo": {"max_queue": 1.5}}}, "services.demo.max_queue"),
    ({"services": {"demo": {"users": {"a": 1}}}}, "services.demo.users.a"),
    ({"services": {"demo": {"tls": {"cert": "x"}}}}, "services.demo.tls.cert"),
    ({"services": {"core": {}}}, "services.core"),
    ({"admin": {"password": True}}, "admin.password"),
    ({"services": {"demo": {"plugin": {"x": 1}}}}, "services.demo.plugin.x"),
    ({"services": {"demo": {"script": "a.lua", "script_code": "x = 1"}}},
     "services.demo.script_code: give script"),
    ({"node": {"cluster": "http://127.0.0.1:4222"}}, "node.cluster: 'http"),
    ({"services": {"demo": {"tls": {"certfile": "missing.pem"}}}},
     "services.demo.tls.certfile: no such file: missing.pem"),
    ({"core": {"tls": {"certfile": "c.pem", "keyfile": "k.pem"}}}, "core.tls.certfile"),
])
def test_bad_config_names_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_node_config(table, Path("."))


async def test_two_services_on_one_port_are_refused() -> None:
    config = parse_node_config({"services": {
        "a": {"listen": ["tcp://127.0.0.1:9555"]},
        "b": {"listen": ["ws://127.0.0.1:9555/"]}}}, Path("."))
    with pytest.raises(ConfigError, match="both listen"):
        await Node(config).start()


async def test_secure_and_plain_may_not_share_a_port() -> None:
    config = parse_node_config({"core": {"listen": ["tcp://127.0.0.1:9556",
                                                     "wss://127.0.0.1:9556/"]}}, Path("."))
    with pytest.raises(ConfigError, match="mixes"):
        await Node(config).start()


async def test_tls_urls_need_a_certificate() -> None:
    config = parse_node_config({"core": {"listen": ["tls://127.0.0.1:0"]}}, Path("."))
    with pytest.raises(ConfigError, match="certfile"):
        await Node(config).start()


def test_what_is_accepted_but_doubtful_is_warned_about() -> None:
    config = parse_node_config({
        "node": {"workers": 4},
        "services": {"quiet": {}, "logs": {"listen": ["tcp://127.0.0.1:0"],
                                           "gelf": {"host": "127.0.0.1"}}},
        "core": {"script": ""},  # empty: as good as left out
    }, Path("."))
    assert config_warnings(config) == [
        "services.quiet.listen is empty: nobody can connect to this service",
        "services.logs.gelf: a host without the gelf plugin in services.logs.plugins: session "
        "logs go to the node's log",
    ]
    assert config_warnings(load_config(None)) == []


def test_hashed_passwords() -> None:
    stored = hash_password("s3cret")
    assert stored.startswith("scrypt$")
    assert check_password("s3cret", stored)
    assert not check_password("s3cre", stored)
    assert not check_password(None, stored)
    assert not check_password("x", "scrypt$broken")
    assert check_password("plain", "plain") and not check_password("plain", "Plain")
