"""Fixtures of the client tests."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import pytest

from nkservice.client import Client


@pytest.fixture
def make_client(client_tls: ssl.SSLContext) -> Callable[..., Client]:
    """A client of a URL, trusting the test CA on tls and wss."""
    def make(url: str, **options: Any) -> Client:
        secure = url.startswith(("tls://", "wss://"))
        return Client(url, ssl=client_tls if secure else None, **options)

    return make
