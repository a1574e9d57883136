"""Settings loaded the way the service loads them: a YAML file, then the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from proxy.settings import Settings, load_settings


def load_config(
    tmp_path: Path, config: dict[str, Any], env: dict[str, str] | None = None
) -> Settings:
    """`config` written as the configuration file, loaded with `env` as the environment."""
    path = tmp_path / "registry-cache.yml"
    path.write_text(yaml.safe_dump(config))
    return load_settings(path, env or {})
