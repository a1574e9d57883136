"""The main configuration: pull-secret keys, upstream names, bad values named by their key."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from proxy.settings import ConfigError, load_settings
from tests.support.config import load_config


def _secret(tmp_path: Path, auths: dict[str, Any]) -> dict[str, str]:
    path = tmp_path / "pull-secret.json"
    path.write_text(json.dumps({"auths": auths}))
    return {"PULL_SECRET": str(path)}


def _auth(login: str) -> dict[str, str]:
    return {"auth": base64.b64encode(login.encode()).decode()}


def test_pull_secret_keys_become_hosts_and_paths_scope_their_logins(tmp_path: Path) -> None:
    env = _secret(
        tmp_path,
        {
            "quay.io/myorg": _auth("org:org-secret"),
            "quay.io/myorg/team": _auth("team:t"),
            "https://ghcr.io/": _auth("gh:g"),
            "http://myreg.local:5000": _auth("my:m"),
            "https://index.docker.io/v1/": _auth("hub:h"),
        },
    )
    upstreams = load_config(tmp_path, {"upstreams": [{"name": "docker.io"}]}, env).upstreams
    assert sorted(upstreams) == ["docker.io", "ghcr.io", "myreg.local:5000", "quay.io"]
    assert upstreams["myreg.local:5000"].url == "https://myreg.local:5000"
    assert upstreams["ghcr.io"].login_for("any/repo") == ("gh", "g")
    assert upstreams["docker.io"].login_for("library/alpine") == ("hub", "h")
    quay = upstreams["quay.io"]
    assert quay.login_for("myorg/team/app") == ("team", "t")
    assert quay.login_for("myorg/app") == ("org", "org-secret")
    assert quay.login_for("myorgx/app") is None
    assert quay.has_credentials and "org-secret" not in repr(quay)


@pytest.mark.parametrize(
    ("config", "auths", "message"),
    [
        ({"upstreams": [{"name": "Quay.io"}]}, {}, "upstreams[0].name: expected a registry host"),
        ({"upstreams": [{"name": "quay.io/org"}]}, {}, "upstreams[0].name"),
        ({}, {"https://ghcr.io/": {"auth": "%%"}}, "pull_secret auths[https://ghcr.io/].auth"),
    ],
)
def test_bad_upstream_names_are_refused(
    tmp_path: Path, config: dict[str, Any], auths: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, config, _secret(tmp_path, auths))
    assert message in str(caught.value)


def test_systemd_install_gives_the_example_configuration_the_units_data_directory(
    tmp_path: Path,
) -> None:
    """The unit sets no data directory of its own: the installed file must name it, so that
    admin commands given that file see the server's cache."""
    repository = Path(__file__).parent.parent
    unit = (repository / "deploy" / "registry-cache.service").read_text()
    match = re.search(r"sed 's\|(.+?)\|(.+?)\|'", unit)
    assert match is not None
    example = (repository / "config" / "registry-cache.yml").read_text()
    installed = tmp_path / "registry-cache.yml"
    installed.write_text(re.sub(match[1], match[2], example, flags=re.MULTILINE))
    assert load_settings(installed, {}).storage_root == Path("/var/lib/registry-cache")
    assert "StateDirectory=registry-cache\n" in unit
    assert "ROOTDIRECTORY" not in unit


def test_logins_the_cache_cannot_use_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A login a credential helper holds, or a key no client can name as an upstream, costs
    that login, not the start of the cache; a key's case does not matter, as in DNS."""
    auths = {
        "https://index.docker.io/v1/": {},
        "*.gcr.io": _auth("w:wild"),
        "https://Quay.IO/": _auth("q:quay-pw"),
    }
    upstreams = load_config(tmp_path, {}, _secret(tmp_path, auths)).upstreams
    assert upstreams["docker.io"].login_for("library/alpine") is None
    assert upstreams["quay.io"].login_for("org/app") == ("q", "quay-pw")
    assert "pull_secret auths[https://index.docker.io/v1/]: no credentials" in caplog.text
    assert "pull_secret auths[*.gcr.io]: expected a registry host" in caplog.text
