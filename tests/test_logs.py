"""Logs: JSON lines for collectors (log.format or LOG_FORMAT); an access log that can go."""

from __future__ import annotations

import json

from tests.conftest import StartProxy
from tests.support.registry import Registry
from tests.test_pull import one_upstream


def test_json_lines_carry_access_fields_at_the_top_level(
    upstream: Registry, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(one_upstream(upstream), {"LOG_FORMAT": "json"})
    assert proxy.get("/v2/test.local/app/manifests/v1")[0] == 404
    proxy.stop()

    lines = [json.loads(line) for line in proxy.log().splitlines()]
    assert lines and all({"time", "level", "logger"} <= line.keys() for line in lines)
    (access,) = [line for line in lines if line.get("path") == "/v2/test.local/app/manifests/v1"]
    assert access["logger"] == "registry_cache.access"
    assert (access["method"], access["status"]) == ("GET", 404)
    assert any("serving upstreams" in line.get("message", "") for line in lines)


def test_access_log_can_be_turned_off(upstream: Registry, start_proxy: StartProxy) -> None:
    proxy = start_proxy({**one_upstream(upstream), "log": {"access": False, "level": "info"}})
    assert proxy.get("/v2/")[0] == 200
    proxy.stop()
    assert proxy.access_log() == []
    assert "serving upstreams" in proxy.log()
