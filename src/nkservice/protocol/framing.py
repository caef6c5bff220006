"""Cutting byte streams into messages, with the `max_message_size` limit (PROTOCOL.md §2, §1.4).

`LineFramer` is the framing of `tcp` and `tls`: one JSON message per `\\n`-terminated line.
`FragmentAssembler` joins the frames of a fragmented WebSocket message. Neither does I/O:
bytes in, messages out, `MessageTooLarge` when a message would pass the limit (the stream
cannot be trusted after that, so the caller answers and closes).
"""

from __future__ import annotations

from nkservice.errors import ClientError


class MessageTooLarge(ClientError):
    """A message over `max_message_size`."""


class LineFramer:
    __slots__ = ("_buffer", "_max_size")

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Return the complete lines in `data` (plus what came before), without terminators."""
        if self._buffer:
            data = self._buffer + data
        lines = data.split(b"\n")
        rest = lines.pop()
        if len(rest) > self._max_size:
            raise MessageTooLarge
        self._buffer = rest
        messages = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self._max_size:
                raise MessageTooLarge
            if line and not line.isspace():
                messages.append(line)
        return messages


class FragmentAssembler:
    """Collects a WebSocket message split over continuation frames."""

    __slots__ = ("_max_size", "_parts", "_size", "is_text")

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._parts: list[bytes] = []
        self._size = 0
        self.is_text = False

    @property
    def in_progress(self) -> bool:
        return bool(self._parts)

    def start(self, payload: bytes, is_text: bool) -> None:
        self._parts = []
        self._size = 0
        self.is_text = is_text
        self.add(payload)

    def add(self, payload: bytes) -> None:
        self._size += len(payload)
        if self._size > self._max_size:
            self._parts = []
            raise MessageTooLarge
        self._parts.append(payload)

    def finish(self) -> bytes:
        message = b"".join(self._parts)
        self._parts = []
        return message
