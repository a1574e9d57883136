"""Logs: JSON lines for collectors (log.format or LOG_FORMAT); an access log that can go."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.logs import AccessLines, access_members
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


async def test_access_lines_are_written_once_per_loop_turn_in_the_records_formats() -> None:
    for json_lines in (True, False):
        stream = io.StringIO()
        lines = AccessLines(stream, json_lines)
        for status in (200, 404, 206):
            lines.add(_members(status=status))
        assert stream.getvalue() == ""
        await asyncio.sleep(0)
        written = stream.getvalue().splitlines()
        assert len(written) == 3
        if json_lines:
            entries = [json.loads(line) for line in written]
            assert [e["status"] for e in entries] == [200, 404, 206]
            assert {e["logger"] for e in entries} == {"registry_cache.access"}
            stamp = dt.datetime.fromisoformat(entries[0]["time"])
        else:
            stamp_text, _, payload = written[1].partition(" INFO registry_cache.access ")
            assert json.loads(payload)["status"] == 404
            stamp = dt.datetime.strptime(stamp_text, "%Y-%m-%d %H:%M:%S,%f").astimezone()
        assert abs(stamp.timestamp() - time.time()) < 60


def _members(status: int) -> str:
    return access_members(
        method="GET",
        path="/v2/",
        status=status,
        size=0,
        cache=None,
        duration_ms=0.5,
        remote="127.0.0.1",
        user=None,
    )


_text = st.text()
_ACCESS_FIELDS = st.fixed_dictionaries(
    {
        "method": _text,
        "path": _text,
        "status": st.integers(),
        "size": st.integers(min_value=0),
        "cache": st.none() | _text,
        "duration_ms": st.floats(allow_nan=False, allow_infinity=False),
        "remote": st.none() | _text,
        "user": st.none() | _text,
    }
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # a loaded CI machine
@given(_ACCESS_FIELDS)
def test_access_members_are_written_as_json_dumps_writes_them(fields: dict[str, Any]) -> None:
    order = ("method", "path", "status", "size", "cache", "duration_ms", "remote", "user")
    as_logged = {("bytes" if key == "size" else key): fields[key] for key in order}
    assert "{" + access_members(**fields) + "}" == json.dumps(as_logged)
