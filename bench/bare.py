"""A bare aiohttp server that answers every request with one fixed manifest.

It does nothing a cache must do (no parsing, no lookup, no log), so its requests per second
and p99 under the same load generator are the floor for any aiohttp server on the machine:
the manifest rows compare registry-cache against it as well as against the baseline.

Run as `python -m bench.bare PORT BODY_FILE MEDIA_TYPE`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aiohttp import web

__all__ = ["app"]


def app(body: bytes, media_type: str) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=media_type)

    application = web.Application()
    application.router.add_route("*", "/{path:.*}", answer)
    return application


if __name__ == "__main__":
    port, body_file, media_type = sys.argv[1:4]
    web.run_app(
        app(Path(body_file).read_bytes(), media_type),
        host="127.0.0.1",
        port=int(port),
        access_log=None,
        print=None,
    )
