"""An asyncio client of the NkSERVICE External API, over tcp, tls, ws and wss.

`Client` is the connection; `call` is a one-shot helper for scripts; errors answered by the
server are raised as `ApiError`.
"""

from nkservice.client.client import Client, EventStream, call
from nkservice.errors import ApiError, ErrorCode

__all__ = ["ApiError", "Client", "ErrorCode", "EventStream", "call"]
