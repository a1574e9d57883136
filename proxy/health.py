"""`registry-cache health`: ask the running cache's /healthz or /readyz, for container probes.

Slim images have no curl, and podman turns an HTTP probe into one; this command reads the same
settings as the server, so it knows the port and whether to speak TLS.
"""

from __future__ import annotations

import ssl
import sys
import urllib.error
import urllib.request

from .settings import Settings

__all__ = ["check"]

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def check(settings: Settings, path: str = "/healthz", timeout: float = 5.0) -> int:
    """0 when the cache answers 200 on `path`, 1 otherwise (with the reason on stderr)."""
    host = _WILDCARDS.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.tls else "http"
    # Liveness of our own process, on its own address: the certificate may name another host.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    url = f"{scheme}://{host}:{settings.port}{path}"
    try:
        with opener.open(url, timeout=timeout) as response:
            if response.status == 200:
                return 0
            print(f"{url}: HTTP {response.status}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
    return 1
