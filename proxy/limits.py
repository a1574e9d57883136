"""A cap on connections per client address, so one host cannot take every connection.

aiohttp already closes a connection that sends no complete request within its keep-alive
timeout (slowloris), and back-pressure keeps a slow reader from costing more than a socket
buffer; what it lacks is a per-address limit. This hooks the server's connection bookkeeping:
a connection over the limit is answered `429 TOOMANYREQUESTS` and closed before it is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from typing import Any, Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = ["ConnectionLimiter"]

log = logging.getLogger(__name__)

_BODY: Final = json.dumps(
    {"errors": [{"code": "TOOMANYREQUESTS", "message": "too many connections from this address"}]}
).encode()
_REFUSAL: Final = (
    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(_BODY) + _BODY
)


def _address(transport: asyncio.BaseTransport) -> str:
    peer: Any = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"


class ConnectionLimiter:
    """Counts open connections per client address on one aiohttp server."""

    def __init__(self, per_address: int) -> None:
        self.per_address = per_address
        self.open: Counter[str] = Counter()
        self._addresses: dict[RequestHandler, str] = {}

    def install(self, server: web.Server) -> None:
        """Wrap the server's connection callbacks (instance attributes, so only this one)."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            address = _address(transport)
            self._addresses[handler] = address
            self.open[address] += 1
            if self.open[address] > self.per_address:
                log.warning("refusing a connection from %s: %d open", address, self.open[address])
                transport.write(_REFUSAL)
                # Closed once aiohttp's handler has started: closing here would run
                # connection_lost before it, which aiohttp does not expect.
                asyncio.get_running_loop().call_soon(transport.close)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            address = self._addresses.pop(handler, None)
            if address is not None:
                self.open[address] -= 1
                if not self.open[address]:
                    del self.open[address]
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]
