"""The shape of a request handler on aiohttp's low-level server, and of a wrapper around one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

__all__ = ["Guard", "Handler"]

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Guard = Callable[[Handler], Handler]
"""Wraps a route's handler with what every answer needs (`proxy.app`'s `_counted` and client
auth)."""
