"""The HTTP connection protocol: uvicorn's h11 protocol with a deadline for the request line and headers, so a
client that sends them byte by byte (slow loris) cannot hold a connection open. uvicorn's own timers cover
idle keep-alive connections only."""
from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class _TimedH11Protocol(H11Protocol):
    """The deadline starts when a connection opens and when the first byte of each later request arrives
    (between requests the keep-alive timeout applies), and ends once the headers are in."""

    header_timeout: float = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)
        super().data_received(data)
        if self._header_timer is not None and self.conn.their_state is not h11.IDLE:
            self._header_timer.cancel()  # the request line and headers are in
            self._header_timer = None

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def timed_h11_protocol(header_timeout: float) -> type[H11Protocol]:
    """The protocol class for uvicorn.Config(http=...), with its header deadline."""
    return type("TimedH11Protocol", (_TimedH11Protocol,), {"header_timeout": header_timeout})
