"""Settings for tls, auth, http and log: from the file or the environment; bad ones named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.settings import AuthSettings, ConfigError, TlsSettings, load_settings
from proxy.sync.config import load_sync_config
from tests.support.config import load_config


def test_file_and_environment(tmp_path: Path) -> None:
    settings = load_config(
        tmp_path,
        {
            "tls": {"cert": "/certs/certs.pem"},
            "auth": {"htpasswd": {"path": "/auth/htpasswd"}, "protect_metrics": False},
            "http": {"draintimeout": "2m"},
        },
    )
    assert settings.tls == TlsSettings(Path("/certs/certs.pem"))
    assert settings.auth == AuthSettings(Path("/auth/htpasswd"), "registry-cache", False)
    assert settings.drain_timeout == 120.0

    settings = load_config(
        tmp_path,
        {"tls": {"cert": "/file.pem"}},
        {
            "REGISTRY_HTTP_TLS_CERTIFICATE": "/env/cert.pem",
            "REGISTRY_HTTP_TLS_KEY": "/env/key.pem",
            "REGISTRY_AUTH": "htpasswd",
            "REGISTRY_AUTH_HTPASSWD_PATH": "/env/htpasswd",
            "REGISTRY_AUTH_HTPASSWD_REALM": "Corp Registry",
        },
    )
    assert settings.tls == TlsSettings(Path("/env/cert.pem"), Path("/env/key.pem"))
    assert settings.auth == AuthSettings(Path("/env/htpasswd"), "Corp Registry", True)

    defaults = load_config(tmp_path, {})
    assert (defaults.tls, defaults.auth, defaults.drain_timeout) == (None, None, 60.0)


@pytest.mark.parametrize(
    ("config", "env", "message"),
    [
        ({"tls": {"crt": "/x"}}, {}, "unknown configuration key tls.crt"),
        ({"tls": {"key": "/k.pem"}}, {}, "tls.key: a key without a certificate"),
        ({}, {"REGISTRY_HTTP_TLS_KEY": "/k.pem"}, "REGISTRY_HTTP_TLS_KEY: a key without"),
        ({}, {"REGISTRY_AUTH": "token"}, "REGISTRY_AUTH: only htpasswd is supported"),
        ({}, {"REGISTRY_AUTH": "htpasswd"}, "auth.htpasswd.path (REGISTRY_AUTH_HTPASSWD_PATH)"),
        ({"auth": {"htpasswd": {"realm": "x"}}}, {}, "auth.htpasswd.path"),
        ({"auth": {"htpasswd": {"path": "/h", "realm": 'a"b'}}}, {}, "auth.htpasswd.realm"),
        ({"auth": {"htpasswd": {"path": "/h"}, "protect_metrics": "yes"}}, {}, "protect_metrics"),
        ({"auth": {"basic": {}}}, {}, "unknown configuration key auth.basic"),
        ({"http": {"draintimeout": "soon"}}, {}, "http.draintimeout"),
        ({"log": {"format": "xml"}}, {}, "log.format: expected text or json"),
        ({}, {"LOG_FORMAT": "yaml"}, "LOG_FORMAT: expected text or json"),
        ({"log": {"level": "INFO"}, "log_level": "INFO"}, {}, "give only one"),
        ({"log": {"level": "LOUD"}}, {}, "log.level: expected DEBUG"),
        ({"log": {"access": "off"}}, {}, "log.access: expected true or false"),
        ({"cleaner": {"maxsize": 5368709120.0}}, {}, "cleaner.maxsize: expected a size"),
        ({"http": {"draintimeout": [1]}}, {}, "http.draintimeout: expected a duration"),
        ({"manifest_ttl": {"a": 1}}, {}, "manifest_ttl: expected a duration"),
        ({"manifest_ttl": float("inf")}, {}, "manifest_ttl: a duration must be finite"),
        ({}, {"CLEANER_THRESHOLD_PERCENTAGE": "nan"}, "CLEANER_THRESHOLD_PERCENTAGE: expected a"),
        ({"cleaner": {"threshold_percentage": "inf"}}, {}, "cleaner.threshold_percentage"),
    ],
)
def test_bad_values_name_their_key(
    tmp_path: Path, config: dict[str, Any], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, config, env)
    assert message in str(caught.value)


def test_every_example_configuration_loads() -> None:
    examples = Path(__file__).parent.parent / "config"
    assert sorted(path.name for path in examples.iterdir()) == ["registry-cache.yml", "regsync.yml"]
    assert load_settings(examples / "registry-cache.yml", {}).drain_timeout == 60.0
    sync = load_sync_config(examples / "regsync.yml", env={"HUB_USER": "hub"})
    assert not sync.warnings
    assert [entry.pin for entry in sync.entries] == [True, False]
