"""Awaiting the answer to a request the server sent to a client (a `Waiter` on a future)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nkservice.errors import ApiError, ErrorCode
from nkservice.protocol.messages import Response


class FutureWaiter:
    """Resolves a future with the client's response; reports each ack to `on_ack`."""

    __slots__ = ("_future", "_on_ack")

    def __init__(self, on_ack: Callable[[], None] | None = None) -> None:
        self._future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._on_ack = on_ack

    def answered(self, response: Response) -> None:
        if not self._future.done():
            self._future.set_result(response)

    def acked(self) -> None:
        if self._on_ack is not None and not self._future.done():
            self._on_ack()

    def failed(self, error: ApiError) -> None:
        if not self._future.done():
            self._future.set_exception(error)

    async def response(self, within: float | None = None) -> Response:
        """The response; `ApiError(timeout)` after `within` seconds, if given."""
        try:
            return await asyncio.wait_for(self._future, within)
        except TimeoutError:
            raise ApiError(ErrorCode.timeout) from None
