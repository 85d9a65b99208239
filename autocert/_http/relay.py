"""After a 101: bytes pass both ways unparsed, and shutdown still closes WebSockets with 1001.

Frames are not decoded. The relay only follows frame boundaries in what the upstream sends
(a header of 2 to 14 bytes, then a payload it skips over), so that on shutdown it can stop
between two frames and send the client a close frame of its own: code 1001, going away.
The client's reply still reaches the upstream, which so sees an ordinary close handshake.
"""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING, Final

from .exchange import PAUSE_UPSTREAM

if TYPE_CHECKING:
    from .server import HttpConnection
    from .upstream import Upstream

#: Close frame, server to client (unmasked): code 1001 and a short reason.
_REASON: Final = b"server shutting down"
GOING_AWAY_FRAME: Final = bytes([0x88, 2 + len(_REASON)]) + (1001).to_bytes(2, "big") + _REASON
#: How long a WebSocket may take to finish its close once shutdown has sent 1001.
CLOSE_GRACE: Final = 10.0


class FrameCursor:
    """Where frames start in one direction of a WebSocket (RFC 6455 section 5.2).

    Payloads are passed over unread, except a close frame's (at most 125 bytes), whose status
    code it reads (unmasking it when it comes from a client).
    """

    __slots__ = ("_close", "_header", "_mask", "_remaining", "close_code")

    def __init__(self) -> None:
        self._header = b""  # the start of a frame header split across reads
        self._remaining = 0  # payload bytes of the current frame still to come
        self._close: bytearray | None = None  # the payload of a close frame being read
        self._mask = b""
        #: The status code of the first close frame seen (0: none yet, 1005: one without a code).
        self.close_code = 0

    def advance(self, data: bytes, *, stop_at_boundary: bool = False, stop_at_close: bool = False) -> int:
        """Follow ``data``; return how many of its bytes were passed over.

        It stops early at the first point between two frames with ``stop_at_boundary``, and
        before a close frame with ``stop_at_close``, instead of reading on.
        """
        position, size = 0, len(data)
        while position < size:
            if self._remaining:
                step = min(self._remaining, size - position)
                if self._close is not None:
                    self._close += data[position:position + step]
                position += step
                self._remaining -= step
                if not self._remaining and self._close is not None:
                    self._closed()
                continue
            if not self._header and (stop_at_boundary or (stop_at_close and data[position] & 0x0F == 0x8)):
                return position
            header = self._header + data[position:position + 14 - len(self._header)]
            needed = _header_size(header)
            if needed is None or len(header) < needed:
                position += len(header) - len(self._header)
                self._header = header
                return position
            position += needed - len(self._header)
            self._header = b""
            self._remaining = _payload_size(header)
            if header[0] & 0x0F == 0x8:
                self._close = bytearray()
                self._mask = header[needed - 4:needed] if header[1] & 0x80 else b""
                if not self._remaining:
                    self._closed()
        return position

    def _closed(self) -> None:
        payload, self._close = self._close or bytearray(), None
        if self._mask:
            payload = bytearray(byte ^ self._mask[index % 4] for index, byte in enumerate(payload))
        if not self.close_code:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005

    @property
    def at_boundary(self) -> bool:
        return not self._remaining and not self._header


def _header_size(header: bytes) -> int | None:
    if len(header) < 2:
        return None
    length = header[1] & 0x7F
    return 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if header[1] & 0x80 else 0)


def _payload_size(header: bytes) -> int:
    length = header[1] & 0x7F
    if length == 126:
        return int(struct.unpack_from(">H", header, 2)[0])
    if length == 127:
        return int(struct.unpack_from(">Q", header, 2)[0])
    return length


class WebSocketRelay:
    """Joins a client connection and an upstream connection once the upstream switched protocols.

    One thing besides shutdown is not passed through as it is: when the client closes first,
    the upstream's answering close frame reaches the client with the client's own status code
    echoed, as RFC 6455 section 5.5.1 has it, whatever code the upstream put in its reply.
    """

    __slots__ = ("_answering", "_client", "_client_frames", "_closer", "_cursor", "_going_away", "_upstream")

    def __init__(self, client: HttpConnection, upstream: Upstream) -> None:
        self._client = client
        self._upstream = upstream
        self._cursor = FrameCursor()  # what the upstream sends
        self._client_frames = FrameCursor()  # what the client sends, until its close frame
        self._going_away = False
        self._answering = False  # reading the upstream's answer to the client's close frame
        self._closer: asyncio.TimerHandle | None = None

    def track(self, data: bytes) -> None:
        """Bytes from the upstream that were passed on before the relay started."""
        self._cursor.advance(data)

    def from_client(self, data: bytes) -> None:
        if not self._client_frames.close_code:
            self._client_frames.advance(data)
        transport = self._upstream.transport
        if transport is not None:
            transport.write(data)

    def from_upstream(self, data: bytes) -> None:
        cursor = self._cursor
        if self._going_away:
            if cursor.at_boundary:
                return  # the client has had its close frame; nothing more goes to it
            cut = cursor.advance(data, stop_at_boundary=True)
            self._client.transport.write(data[:cut])
            if cursor.at_boundary:
                self._send_close()
            return
        echo = self._client_frames.close_code
        if echo and echo != 1005 and not cursor.close_code:
            # The client has closed: the upstream's next close frame is the answer to it.
            cut = 0 if self._answering else cursor.advance(data, stop_at_close=True)
            if cut:
                self._client.transport.write(data[:cut])
            if cut < len(data):
                self._answering = True
                cursor.advance(data[cut:])
                if cursor.close_code:
                    self._client.transport.write(bytes([0x88, 2]) + echo.to_bytes(2, "big"))
            return
        if cursor.close_code and cursor.at_boundary:
            return  # after a close frame nothing more may be sent
        cursor.advance(data)
        self._client.transport.write(data)

    def going_away(self) -> None:
        """Shutdown: send 1001 at the next frame boundary, then give the close a moment."""
        if self._going_away:
            return
        self._going_away = True
        if self._cursor.at_boundary:
            self._send_close()
        self._closer = asyncio.get_running_loop().call_later(CLOSE_GRACE, self._abort)

    def _send_close(self) -> None:
        transport = self._client.transport
        if not transport.is_closing():
            transport.write(GOING_AWAY_FRAME)

    def _abort(self) -> None:
        self._client.abort()
        self._upstream.abort()

    def client_closed(self) -> None:
        self._upstream.close()
        self._stop()

    def upstream_closed(self) -> None:
        self._client.transport.close()
        self._stop()

    def _stop(self) -> None:
        if self._closer is not None:
            self._closer.cancel()
            self._closer = None

    # flow control: a slow reader on one side pauses reading on the other

    def pause_reading(self) -> None:
        self._upstream.pause_reading()

    def resume_reading(self) -> None:
        self._upstream.resume_reading()

    def upstream_full(self) -> None:
        self._client.pause_reading(PAUSE_UPSTREAM)

    def upstream_drained(self) -> None:
        self._client.resume_reading(PAUSE_UPSTREAM)
