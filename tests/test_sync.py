"""The sync worker: regsync's configuration and behaviour, against real registries."""

from __future__ import annotations

import asyncio
import datetime
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import pty
import re
import select as select_module
import struct
import subprocess
import sys
import termios
import time
import tty
import urllib.parse
import urllib.request
import zoneinfo
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cache import open_cache
from proxy.errors import RegistryError
from proxy.manifest import OCI_INDEX, OCI_MANIFEST, Manifest
from proxy.metrics import Metrics
from proxy.reference import Digest
from proxy.settings import ConfigError, load_settings
from proxy.sync.config import RATE_LIMIT_RETRY_MIN, Retention, load_sync_config
from proxy.sync.copy import children
from proxy.sync.endpoints import Endpoints
from proxy.sync.filters import SemverRange, TagFilter, Version, anchored, select
from proxy.sync.progress import SILENT, Bars
from proxy.sync.remote import Remote
from proxy.sync.retention import to_retire
from proxy.sync.schedule import Cron, Every, parse_schedule
from proxy.sync.targets import CacheDestination
from proxy.sync.template import Template, TemplateError
from proxy.sync.worker import Worker
from tests.conftest import CREDS, StartProxy, refused_start
from tests.support import skopeo
from tests.support.images import Image, push, write_layout
from tests.support.proxy import Proxy
from tests.support.registry import Registry
from tests.support.standin import StandIn, blob_files
from tests.support.wait import wait_for
from tests.test_pull import one_upstream

NOW = datetime.datetime(2026, 11, 23, 14, 5, 9).astimezone()
WORKSHOP_BACKUP = (
    '{{ $t := time.Now }}{{printf "bkup-%s-%d%02d%02d" .Ref.Tag $t.Year $t.Month $t.Day}}'
)


# -- helpers ----------------------------------------------------------------------------------


def image(tmp_path: Path, name: str, seed: int, platforms: bool = False) -> Image:
    return write_layout(
        tmp_path / f"layout-{name}",
        name,
        [("linux", "amd64"), ("linux", "arm64")] if platforms else None,
        [2_000, 3_000],
        seed=seed,
    )


def tags(registry: Registry, repository: str) -> set[str]:
    request = urllib.request.Request(f"{registry.url}/v2/{repository}/tags/list")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return set(json.load(response).get("tags") or [])
    except urllib.error.HTTPError as error:
        error.close()
        return set()


def digest(ref: str, creds: str | None = None) -> str:
    return "sha256:" + hashlib.sha256(skopeo.inspect_raw(f"docker://{ref}", creds)).hexdigest()


def sync_command(
    workdir: Path,
    cache_config: dict[str, Any],
    sync_config: dict[str, Any] | str,
    *args: str,
    env: dict[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `registry-cache ... sync ... <args>`."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "registry-cache.yml"
    if not config.exists():
        config.write_text(
            yaml.safe_dump({"storage": {"root": str(workdir / "data")}, **cache_config})
        )
    sync_path = workdir / "sync.yml"
    sync_path.write_text(
        sync_config if isinstance(sync_config, str) else yaml.safe_dump(sync_config)
    )
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "CLEANER_", "SYNC_"))
    }
    environment.update(env or {})
    command = [
        sys.executable,
        "-m",
        "proxy.cli",
        "--config",
        str(config),
        "sync",
        "--sync-config",
        str(sync_path),
        *args,
    ]
    return command, environment


def sync(
    workdir: Path,
    cache_config: dict[str, Any],
    sync_config: dict[str, Any] | str,
    *args: str,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`registry-cache --config ... sync --sync-config ... <args>` as an operator runs it."""
    command, environment = sync_command(workdir, cache_config, sync_config, *args, env=env)
    return subprocess.run(
        command, capture_output=True, text=True, env=environment, timeout=120, check=False
    )


def sync_on_terminal(
    workdir: Path, cache_config: dict[str, Any], sync_config: dict[str, Any], *args: str
) -> tuple[int, str, str]:
    """`sync` with stderr on a pseudo-terminal (raw, 100 columns, so what the program wrote is
    what we read): exit status, stdout, and the terminal's output."""
    command, environment = sync_command(workdir, cache_config, sync_config, *args)
    master, slave = pty.openpty()
    tty.setraw(slave)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=slave, env=environment, text=True
        ) as process:
            os.close(slave)
            slave = -1
            screen = bytearray()
            deadline = time.monotonic() + 120
            while True:  # until EOF: every copy of the slave side closed, i.e. the CLI exited
                remaining = deadline - time.monotonic()
                assert remaining > 0, screen.decode(errors="replace")[-2000:]
                readable, _, _ = select_module.select([master], [], [], remaining)
                if not readable:
                    continue
                try:
                    data = os.read(master, 65536)
                except OSError as error:  # Linux reports the closed slave side as EIO
                    if error.errno != errno.EIO:
                        raise
                    break
                if not data:
                    break
                screen += data
            stdout, _ = process.communicate(timeout=30)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return process.returncode, stdout, screen.decode()


def plain(registry: Registry, name: str | None = None) -> dict[str, str]:
    return {"registry": name or registry.host, "hostname": registry.host, "tls": "disabled"}


# -- configuration, templates, filters, schedules ---------------------------------------------


def test_template_subset_follows_go_semantics(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("  s3cret\n")
    env = {"HUB_USER": "hubuser"}
    data = {"Ref": {"Tag": "3", "Repository": "library/alpine", "Registry": "localhost:5000"}}
    assert Template.parse(WORKSHOP_BACKUP).render(data, now=lambda: NOW) == "bkup-3-20261123"
    assert Template.parse('{{env "HUB_USER"}}').render(env=env) == "hubuser"
    assert Template.parse(f'{{{{file "{secret}"}}}}').render() == "s3cret"
    assert Template.parse('{{file "/nonexistent"}}x').render() == "x"
    rendered = Template.parse(
        '{{$t := time.Now}}{{$t.Month}} {{printf "%s|%d|%5s|%-3d|" $t.Month $t.Month "a" 7}}'
        '{{- " trimmed" -}}   {{ .Ref.Registry }}/{{.Ref.Repository}}:{{ "X" | lower }}'
        '{{/* comment */}}{{ printf "%s" (upper "y") }}'
    ).render(data, now=lambda: NOW)
    assert rendered == "November November|11|    a|7  | trimmedlocalhost:5000/library/alpine:xY"
    for bad in [
        "{{if .X}}y{{end}}",
        "{{ nofunc }}",
        "{{ .Missing }}",
        '{{printf "%d" "s"}}',
        "{{ $u }}",
        "{{ .Ref",
        '{{printf "%s %s" "a"}}',
    ]:
        with pytest.raises(TemplateError):
            Template.parse(bad).render(data)


def test_tag_filters_are_anchored_and_semver_ranges_follow_masterminds() -> None:
    tags_ = ["latest", "3", "3.13", "3.14", "3.15", "3x13", "13", "2.0.0", "1.2.0-rc.1", "edge"]
    allow = TagFilter(allow=anchored(["latest", "3", "3.13"], "allow"))
    assert select(tags_, [allow]) == ["3", "3.13", "3x13", "latest"]
    deny = TagFilter(allow=anchored([r"3\..*"], "a"), deny=anchored([r"3\.15"], "d"))
    semver = TagFilter(semver=(SemverRange.parse(">=3.14 <4", "s"), SemverRange.parse("^2", "s")))
    assert select(tags_, [deny]) == ["3.13", "3.14"]
    assert select(tags_, [semver]) == ["2.0.0", "3.14", "3.15"]
    assert select(tags_, [deny, semver]) == ["2.0.0", "3.13", "3.14", "3.15"]  # tagSets: OR
    pre = SemverRange.parse(">=1.2.0-rc.0", "s")
    assert pre.matches(Version.parse("1.2.0-rc.1"))  # type: ignore[arg-type]
    assert not SemverRange.parse(">=1", "s").matches(Version.parse("1.2.0-rc.1"))  # type: ignore[arg-type]
    assert SemverRange.parse("~1.2", "s").matches(Version.parse("v1.2.9"))  # type: ignore[arg-type]
    assert not SemverRange.parse("1.x || 3", "s").matches(Version.parse("2.5"))  # type: ignore[arg-type]
    assert SemverRange.parse("1.2 - 1.4", "s").matches(Version.parse("1.4.7"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="semver"):
        SemverRange.parse(">=one", "s")


def test_schedule_and_interval_parsing() -> None:
    monday = datetime.datetime(2026, 11, 23, 10, 5).astimezone()
    assert parse_schedule("15 1 * * *", "1h", "s") == Cron("15 1 * * *")  # schedule wins
    assert parse_schedule("15 1 * * *", None, "s").next_after(monday) == monday.replace(  # type: ignore[union-attr]
        day=24, hour=1, minute=15
    )
    assert parse_schedule("@daily", None, "s").next_after(monday) == monday.replace(  # type: ignore[union-attr]
        day=24, hour=0, minute=0
    )
    utc = parse_schedule("CRON_TZ=UTC 0 3 * * *", None, "s")
    assert utc == Cron("0 3 * * *", zoneinfo.ZoneInfo("UTC"))
    paris = datetime.datetime(2026, 11, 23, 10, 5, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    assert utc.next_after(paris) == datetime.datetime(2026, 11, 24, 3, tzinfo=datetime.UTC)
    assert parse_schedule("TZ=Europe/Paris @daily", None, "s").next_after(paris) == paris.replace(  # type: ignore[union-attr]
        day=24, hour=0, minute=0
    )
    assert parse_schedule("@every 90m", None, "s") == Every(5400)
    assert parse_schedule(None, "60m", "s") == Every(3600)
    assert parse_schedule(None, "1h30m", "s") == Every(5400)
    assert parse_schedule(None, None, "s") is None
    for schedule, interval in [("* * *", None), ("61 * * * *", None), (None, "soon"), (None, "0s")]:
        with pytest.raises(ConfigError, match="s\\."):
            parse_schedule(schedule, interval, "s")


def test_retention_keeps_the_newest_and_never_the_denied() -> None:
    found = ["0.8.0", "0.9.0", "1.0.0", "1.1.0", "2.0.0", "latest"]
    rule = Retention(keep=2, deny=anchored([r"1\.0\.0"], "deny"))
    assert to_retire(found, rule) == ["0.8.0", "0.9.0"]
    assert to_retire(found, Retention(keep=4, sort="name")) == ["0.8.0", "0.9.0"]
    day = datetime.timedelta(days=1)
    created = {"a": NOW, "b": NOW - day, "c": NOW + day, "d": None}
    assert to_retire(list(created), Retention(keep=1, sort="date"), created) == ["b", "a"]


def test_regsync_file_with_extensions_and_defaults_loads(tmp_path: Path) -> None:
    path = tmp_path / "regsync.yml"
    path.write_text(
        """
version: 1
x-common: &tags {allow: ["3\\\\.\\\\d+"]}
creds:
  - registry: docker.io
    user: '{{env "HUB_USER"}}'
    pass: '{{env "HUB_PASS"}}'
    reqPerSec: 2
    credHelper: docker-credential-x
defaults:
  parallel: 3
  interval: 6h
  ratelimit: {min: 100, retry: 1m}
  referrers: true
sync:
  - source: alpine
    target: localhost:5000/library/alpine
    type: repository
    tags: *tags
    schedule: "15 1 * * *"
  - source: quay.io/podman/hello:latest
    pin: true
    platforms: [linux/amd64]
    colour: blue
"""
    )
    config = load_sync_config(path, env={"HUB_USER": "u", "HUB_PASS": "pw-secret"})
    assert config.parallel == 3
    assert config.creds[0].user == "u" and config.creds[0].password == "pw-secret"
    assert "pw-secret" not in repr(config.creds[0])
    first, second = config.entries
    assert first.schedule == Cron("15 1 * * *") and first.tags[0].matches("3.14")
    assert first.ratelimit.min == 100 and first.ratelimit.retry == RATE_LIMIT_RETRY_MIN
    assert str(second.target) == "cache/quay.io/podman/hello:latest" and second.pin
    assert second.schedule == Every(6 * 3600)
    assert any("credHelper is not supported" in w for w in config.warnings)
    assert any("colour is not a regsync key" in w for w in config.warnings)
    for bad, message in [
        ("sync: [{source: alpine, type: image}]", "needs a tag"),
        ("sync: [{source: 'a:1', target: 'localhost:5000/a', pin: true}]", "pin"),
        ("sync: [{source: 'a:1', target: cache/quay.io/a}]", "own repository"),
        ("sync: [{source: a, type: repository, tags: {allow: ['(']}}]", "regular expression"),
        ("version: 2", "version"),
        ("defaults: {parallel: many}", "defaults.parallel: expected a whole number"),
        ("sync: [{source: a, type: repository, tags: {allow: [3.10]}}]", "tags.allow.*quote"),
        ("sync: [{source: 'a:1', schedule: 'CRON_TZ=Mars/Base 0 3 * * *'}]", "time zone"),
    ]:
        path.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            load_sync_config(path)


def test_a_bad_sync_file_stops_the_server_at_start(tmp_path: Path) -> None:
    path = tmp_path / "regsync.yml"
    path.write_text("version: 2")
    said = refused_start(tmp_path / "cache", {"sync": {"config": str(path)}})
    assert "configuration error" in said and "version" in said


def test_templates_see_the_entry_under_regsyncs_go_names(tmp_path: Path) -> None:
    path = tmp_path / "regsync.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "defaults": {"interval": "1h"},
                "sync": [
                    {
                        "source": "quay.io/podman/{{.Sync.Type}}:{{.Sync.Interval}}",
                        "target": "localhost:5000/{{.Sync.Source}}",
                        "type": "image",
                    }
                ],
            }
        )
    )
    [entry] = load_sync_config(path).entries
    assert str(entry.source) == "quay.io/podman/image:1h"
    assert str(entry.target) == "localhost:5000/quay.io/podman/image:1h"
    assert entry.template_view["Target"] == str(entry.target)


def test_an_entrys_ratelimit_merges_with_the_defaults_field_by_field(tmp_path: Path) -> None:
    path = tmp_path / "regsync.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "defaults": {"ratelimit": {"min": 100, "retry": "20m"}},
                "sync": [
                    {"source": "a:1", "ratelimit": {"retry": "30m"}},
                    {"source": "b:1", "ratelimit": {"min": 5}},
                    {"source": "c:1"},
                ],
            }
        )
    )
    limits = [(e.ratelimit.min, e.ratelimit.retry) for e in load_sync_config(path).entries]
    assert limits == [(100, 1800.0), (5, 1200.0), (100, 1200.0)]


# -- copies between real registries -----------------------------------------------------------


@pytest.fixture
def target(tmp_path: Path) -> Any:
    with Registry(tmp_path / "target") as registry:
        yield registry


def test_tags_on_one_image_copied_at_once_write_its_content_once(
    tmp_path: Path, upstream: Registry, target: Registry
) -> None:
    # Copied at the same moment, two tags' copies of one image raced on distribution's
    # in-place link files (a 500 or a 400 now and then); one at a time, the second finds
    # everything there.
    multi = image(tmp_path, "multi", 7, platforms=True)
    for tag in ("a", "b", "c"):
        push(multi, upstream.host, "app", tag)
    config = {
        "version": 1,
        "creds": [plain(upstream), plain(target)],
        "defaults": {"parallel": 3},
        "sync": [
            {"source": f"{upstream.host}/app", "target": f"{target.host}/dup", "type": "repository"}
        ],
    }
    target.clear_requests()

    done = sync(tmp_path / "c", {}, config, "once")

    assert done.returncode == 0, done.stdout + done.stderr
    assert tags(target, "dup") == {"a", "b", "c"}
    writes = Counter(
        entry.path if "/manifests/" in entry.path else entry.query.partition("digest=")[2]
        for entry in target.entries()
        if entry.method == "PUT" and entry.path.startswith("/v2/dup/")
    )
    by_digest = {key: n for key, n in writes.items() if "sha256" in key}
    assert by_digest and set(by_digest.values()) == {1}, writes
    assert [writes[f"/v2/dup/manifests/{tag}"] for tag in "abc"] == [1, 1, 1]


def test_image_and_repository_entries_copy_exactly_the_expected_tags(
    tmp_path: Path, upstream: Registry, target: Registry
) -> None:
    multi = image(tmp_path, "multi", 1, platforms=True)
    single = image(tmp_path, "single", 2)
    for tag in ("1.0.0", "1.2.0", "2.0.0", "dev"):
        push(single, upstream.host, "app", tag)
    push(multi, upstream.host, "app", "1.1.0")
    push(multi, upstream.host, "app", "latest")
    src, dst = upstream.host, target.host
    config = {
        "version": 1,
        "creds": [plain(upstream), plain(target)],
        "defaults": {"parallel": 2},
        "sync": [
            {
                "source": f"{src}/app",
                "target": f"{dst}/filtered",
                "type": "repository",
                "tags": {"allow": [r"1\..*", "latest", "2"], "deny": [r"1\.0\..*"]},
            },
            {
                "source": f"{src}/app",
                "target": f"{dst}/semver",
                "type": "repository",
                "tags": {"semverRange": [">=1.1 <2"]},
            },
            {
                "source": f"{src}/app:1.1.0",
                "target": f"{dst}/arm:only",
                "type": "image",
                "platform": "linux/arm64",
            },
            {"source": f"{src}/app:1.1.0", "target": f"{dst}/multi", "type": "image"},
        ],
    }
    check = sync(tmp_path / "c", {}, config, "check")
    assert check.returncode == 0, check.stderr
    assert f"would copy {src}/app:1.1.0" in check.stdout
    assert tags(target, "filtered") == set()

    done = sync(tmp_path / "c", {}, config, "once")
    assert done.returncode == 0, done.stdout + done.stderr
    assert tags(target, "filtered") == {"1.1.0", "1.2.0", "latest"}
    assert tags(target, "semver") == {"1.1.0", "1.2.0"}
    assert digest(f"{dst}/filtered:latest") == multi.digest
    assert digest(f"{dst}/semver:1.2.0") == single.digest
    assert digest(f"{dst}/arm:only") == multi.platform_manifests["linux/arm64"]
    skopeo.copy(f"docker://{dst}/multi:1.1.0", f"dir:{tmp_path / 'multi'}")
    copied = skopeo.read_dir_copy(tmp_path / "multi")
    assert (copied.digest, copied.manifests, copied.blobs) == (
        multi.digest,
        multi.manifests,
        multi.blobs,
    )
    assert "ENTRY" in done.stdout and "COPIED" in done.stdout

    upstream.clear_requests()
    again = sync(tmp_path / "c", {}, config, "once")
    assert again.returncode == 0, again.stderr
    requests = upstream.requests()
    assert not [r for r in requests if "/blobs/" in r[1]]
    manifest_gets = {path for method, path in requests if method == "GET" and "/manifests/" in path}
    # Only `platform` resolves the index again, as regsync does.
    assert manifest_gets <= {f"/v2/app/manifests/{multi.digest}"}
    assert {m for m, p in requests if "/manifests/" in p} <= {"HEAD", "GET"}
    assert " 0  " in again.stdout.splitlines()[1]


def test_json_logs_leave_stdout_to_the_summary(
    tmp_path: Path, upstream: Registry, target: Registry
) -> None:
    push(image(tmp_path, "logged", 16), upstream.host, "app", "v1")
    config = {
        "creds": [plain(upstream), plain(target)],
        "sync": [{"source": f"{upstream.host}/app:v1", "target": f"{target.host}/app:v1"}],
    }
    done = sync(tmp_path / "c", {}, config, "once", env={"LOG_FORMAT": "json"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ENTRY") and '"level"' not in done.stdout
    assert json.loads(done.stderr.splitlines()[0])["level"]


def test_moved_source_tag_is_copied_again_and_the_old_one_kept_as_backup(
    tmp_path: Path, upstream: Registry, target: Registry
) -> None:
    old, new = image(tmp_path, "old", 3), image(tmp_path, "new", 4)
    push(old, upstream.host, "app", "stable")
    config = {
        "creds": [plain(upstream), plain(target)],
        "defaults": {"backup": "bak-{{.Ref.Tag}}-{{.Sync.Type}}"},
        "sync": [{"source": f"{upstream.host}/app:stable", "target": f"{target.host}/app"}],
    }
    assert sync(tmp_path / "c", {}, config, "once").returncode == 0
    assert digest(f"{target.host}/app:stable") == old.digest
    push(new, upstream.host, "app", "stable")
    moved = sync(tmp_path / "c", {}, config, "once")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert digest(f"{target.host}/app:stable") == new.digest
    assert digest(f"{target.host}/app:bak-stable-image") == old.digest


def digest_tag(of: str, suffix: str = "") -> str:
    """The cosign-style tag of a digest: `sha256-<hex><suffix>`."""
    return of.replace(":", "-") + suffix


def test_digest_tags_come_along_for_the_image_and_its_platforms(
    tmp_path: Path, upstream: Registry, target: Registry
) -> None:
    multi = image(tmp_path, "multi", 21, platforms=True)
    signature, attestation, stray = (image(tmp_path, n, 22 + i) for i, n in enumerate("sat"))
    arm = multi.platform_manifests["linux/arm64"]
    push(multi, upstream.host, "app", "v1")
    push(signature, upstream.host, "app", digest_tag(multi.digest, ".sig"))
    push(attestation, upstream.host, "app", digest_tag(arm, ".att"))
    push(stray, upstream.host, "app", digest_tag(signature.digest.replace("a", "b"), ".sig"))
    source = f"{upstream.host}/app:v1"
    config = {
        "creds": [plain(upstream), plain(target)],
        "sync": [
            {"source": source, "target": f"{target.host}/signed", "digestTags": True},
            {"source": source, "target": f"{target.host}/bare"},
        ],
    }
    done = sync(tmp_path / "c", {}, config, "once")
    assert done.returncode == 0, done.stdout + done.stderr
    wanted = {"v1", digest_tag(multi.digest, ".sig"), digest_tag(arm, ".att")}
    assert tags(target, "signed") == wanted
    assert tags(target, "bare") == {"v1"}
    assert digest(f"{target.host}/signed:{digest_tag(multi.digest, '.sig')}") == signature.digest
    assert digest(f"{target.host}/signed:{digest_tag(arm, '.att')}") == attestation.digest

    # An up-to-date image still gets a signature added later, as with regsync.
    push(stray, upstream.host, "app", digest_tag(multi.digest, ".sbom"))
    again = sync(tmp_path / "c", {}, config, "once")
    assert again.returncode == 0, again.stdout + again.stderr
    assert tags(target, "signed") == wanted | {digest_tag(multi.digest, ".sbom")}


def put(registry: Registry, repository: str, kind: str, data: bytes, media_type: str = "") -> str:
    """Push a blob (`kind` "blobs") or a manifest (`kind` "manifests/<ref>") with plain HTTP; the
    digest. A test source needs artifacts that skopeo does not make."""
    pushed = "sha256:" + hashlib.sha256(data).hexdigest()
    url = f"{registry.url}/v2/{repository}/{kind}"
    if kind == "blobs":
        start = urllib.request.Request(f"{url}/uploads/", method="POST")
        with urllib.request.urlopen(start, timeout=10) as response:
            location = response.headers["Location"]
        separator = "&" if "?" in location else "?"
        url = f"{urllib.parse.urljoin(registry.url, location)}{separator}digest={pushed}"
    request = urllib.request.Request(url, data=data, method="PUT")
    request.add_header("Content-Type", media_type or "application/octet-stream")
    with urllib.request.urlopen(request, timeout=10):
        return pushed


def artifact(registry: Registry, repository: str, subject: Image, kind: str) -> dict[str, Any]:
    """An OCI 1.1 artifact referring to `subject`, pushed by digest; its index descriptor."""
    empty = put(registry, repository, "blobs", b"{}")
    content = f"{kind} of {subject.digest}".encode()
    layer = put(registry, repository, "blobs", content)
    artifact_type = f"application/vnd.example.{kind}"
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "text/plain", "digest": layer, "size": len(content)}],
        "subject": {
            "mediaType": subject.media_type,
            "digest": subject.digest,
            "size": subject.size,
        },
    }
    data = json.dumps(document).encode()
    manifest = "sha256:" + hashlib.sha256(data).hexdigest()
    put(registry, repository, f"manifests/{manifest}", data, OCI_MANIFEST)
    return {
        "mediaType": OCI_MANIFEST,
        "digest": manifest,
        "size": len(data),
        "artifactType": artifact_type,
    }


def referrers_index(registry: Registry, repository: str, subject: str) -> list[str]:
    """The digests the fallback tag index of `subject` lists (the referrers tag schema)."""
    raw = skopeo.inspect_raw(f"docker://{registry.host}/{repository}:{digest_tag(subject)}")
    return sorted(d["digest"] for d in json.loads(raw)["manifests"])


def test_referrers_are_copied_and_listed_under_the_fallback_tag(
    tmp_path: Path, upstream: Registry, target: Registry
) -> None:
    subject = image(tmp_path, "subject", 31)
    push(subject, upstream.host, "app", "v1")
    signature = artifact(upstream, "app", subject, "signature")
    sbom = artifact(upstream, "app", subject, "sbom")
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [signature, sbom]}
    put(
        upstream,
        "app",
        f"manifests/{digest_tag(subject.digest)}",
        json.dumps(index).encode(),
        OCI_INDEX,
    )
    source = f"{upstream.host}/app:v1"
    only_signatures = [{"artifactType": signature["artifactType"]}]
    config = {
        "creds": [plain(upstream), plain(target)],
        "defaults": {"referrers": True},
        "sync": [
            {"source": source, "target": f"{target.host}/all"},
            {"source": source, "target": f"{target.host}/some", "referrerFilters": only_signatures},
            {"source": source, "target": f"{target.host}/none", "referrers": False},
        ],
    }
    done = sync(tmp_path / "c", {}, config, "once")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not load_sync_config(tmp_path / "c" / "sync.yml").warnings
    both = sorted([signature["digest"], sbom["digest"]])
    assert referrers_index(target, "all", subject.digest) == both
    assert referrers_index(target, "some", subject.digest) == [signature["digest"]]
    assert tags(target, "none") == {"v1"}
    for referrer in (signature, sbom):
        copied = f"{target.host}/all@{referrer['digest']}"
        assert digest(copied) == referrer["digest"]
        assert json.loads(skopeo.inspect_raw(f"docker://{copied}"))["subject"]["digest"] == (
            subject.digest
        )


def test_wrong_password_fails_only_its_entry(
    tmp_path: Path, basic_upstream: Registry, target: Registry
) -> None:
    pushed = image(tmp_path, "private", 5)
    push(pushed, basic_upstream.host, "app", "v1", creds=CREDS)
    token = tmp_path / "token"
    token.write_text("wonderland\n")
    config = {
        "creds": [
            {
                **plain(basic_upstream, "good.example"),
                "user": '{{env "SRC_USER"}}',
                "pass": f'{{{{file "{token}"}}}}',
            },
            {**plain(basic_upstream, "bad.example"), "user": "alice", "pass": "not-it"},
            plain(target),
        ],
        "sync": [
            {"source": "good.example/app:v1", "target": f"{target.host}/good:v1"},
            {"source": "bad.example/app:v1", "target": f"{target.host}/bad:v1"},
        ],
    }
    result = sync(tmp_path / "c", {}, config, "once", env={"SRC_USER": "alice"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "good.example/app:v1" not in result.stdout.split("error", 1)[-1], result.stdout
    assert digest(f"{target.host}/good:v1") == pushed.digest
    assert tags(target, "bad") == set()
    errors = [line for line in result.stdout.splitlines() if line.startswith("error")]
    assert len(errors) == 1
    assert "bad.example/app:v1" in errors[0] and "401" in errors[0]
    assert "not-it" not in result.stdout + result.stderr
    assert "wonderland" not in result.stdout + result.stderr


def test_a_corrupt_source_fails_only_its_entry(tmp_path: Path, upstream: Registry) -> None:
    served = image(tmp_path, "p", 6)
    good = image(tmp_path, "ok", 7)
    push(good, upstream.host, "good", "v1")
    with StandIn(served, "q/app") as standin:
        standin.corrupt = {served.layers[0]}
        cache = {
            "upstreams": [
                {"name": "bad.local", "url": standin.url},
                {"name": "test.local", "url": upstream.url},
            ],
            "default_upstream": "test.local",
        }
        config = {"sync": [{"source": "bad.local/q/app:p"}, {"source": "test.local/good:v1"}]}
        result = sync(tmp_path / "c", cache, config, "once")
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "does not match its digest" in errors[0], result.stdout
    assert "Traceback" not in result.stderr
    data = tmp_path / "c" / "data"
    assert {d.removeprefix("sha256:") for d in good.blobs} <= blob_files(data)


async def test_tag_lists_follow_the_sources_own_page_tokens(tmp_path: Path) -> None:
    served = image(tmp_path, "p", 6)
    with StandIn(served, "q/app") as standin:
        standin.tags = [f"t{n}" for n in range(5)]
        standin.page_size = 2  # with Quay's opaque `next_page` tokens
        host = f"127.0.0.1:{standin.port}"
        path = tmp_path / "sync.yml"
        entry = {"source": f"{host}/q/app", "target": f"{host}/x", "type": "repository"}
        path.write_text(
            yaml.safe_dump({"creds": [{"registry": host, "tls": "disabled"}], "sync": [entry]})
        )
        endpoints = Endpoints(load_settings(None, env={}), load_sync_config(path), Metrics(), None)
        try:
            # Bounded: a client that does not follow the tokens asks for page 1 forever.
            listed = await asyncio.wait_for(endpoints.remote(host).tags("q/app"), timeout=60)
            assert listed == standin.tags
        finally:
            await endpoints.close()


def test_platforms_match_with_their_default_variants() -> None:
    """Docker Hub's indexes list `linux/arm64/v8`, which `linux/arm64` names (as in regclient)."""
    listed = [("arm64", "v8"), ("arm", "v7"), ("amd64", None)]
    entries = [
        {
            "mediaType": OCI_MANIFEST,
            "digest": f"sha256:{n:064x}",
            "size": 1,
            "platform": {"os": "linux", "architecture": arch, **({"variant": v} if v else {})},
        }
        for n, (arch, v) in enumerate(listed)
    ]
    data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    index = Manifest(Digest.of(data), OCI_INDEX, data)
    picked = children(index, ["linux/arm64", "linux/arm", "linux/AMD64"])
    assert [entry["digest"] for entry in picked] == [entry["digest"] for entry in entries]
    assert children(index, ["linux/arm64/v7"]) == []


async def test_rate_limit_waits_without_a_slot_and_is_counted(
    tmp_path: Path, target: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    served = image(tmp_path, "limited", 6)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    with StandIn(served, "lim/app") as standin:
        # The check's HEAD sees 0; the gate re-checks: 0, then 5 (< min 10), then plenty.
        standin.rate_limits = [0, 0, 5, 100]
        host = f"127.0.0.1:{standin.port}"
        path = tmp_path / "sync.yml"
        path.write_text(
            yaml.safe_dump(
                {
                    "creds": [{"registry": host, "tls": "disabled"}, plain(target)],
                    "defaults": {"ratelimit": {"min": 10, "retry": "15m"}},
                    "sync": [
                        {"source": f"{host}/lim/app:limited", "target": f"{target.host}/lim:v1"}
                    ],
                }
            )
        )
        config = load_sync_config(path)
        metrics = Metrics()
        endpoints = Endpoints(load_settings(None, env={}), config, metrics, None)
        caplog.set_level(logging.INFO, "registry_cache.sync")
        try:
            [result] = await Worker(config, endpoints, metrics, sleep=sleep).run_all()
        finally:
            await endpoints.close()
        heads = standin.requests[("HEAD", "/v2/lim/app/manifests/limited")]
    assert result.ok and result.copied == 1, result.errors
    assert waits == [900.0, 900.0]
    assert heads == 4
    assert (
        metrics.registry.get_sample_value(
            "registry_cache_sync_ratelimit_waits_total", {"registry": host}
        )
        == 2
    )
    logged = [
        json.loads(r.getMessage()) for r in caplog.records if "ratelimit_wait" in r.getMessage()
    ]
    assert [(e["remaining"], e["min"], e["wait_seconds"]) for e in logged] == [
        (0, 10, 900.0),
        (5, 10, 900.0),
    ]
    assert digest(f"{target.host}/lim:v1") == served.digest


def test_retention_dry_run_shows_and_real_run_deletes_only_the_tags(
    tmp_path: Path, upstream: Registry, target: Registry
) -> None:
    release = image(tmp_path, "release", 7)
    for tag in ("1.0.0", "1.1.0", "2.0.0"):
        push(release, upstream.host, "rel", tag)
    for tag in ("0.8.0", "0.9.0"):
        push(release, target.host, "rel", tag)  # the same image: only tags may go
    config = {
        "creds": [plain(upstream), plain(target)],
        "sync": [
            {
                "source": f"{upstream.host}/rel",
                "target": f"{target.host}/rel",
                "type": "repository",
                "tags": {"semverRange": [">=0"]},
                "retention": {"keep": 2, "sort": "semver", "deny": [r"1\.0\.0"]},
            }
        ],
    }
    dry = sync(tmp_path / "c", {}, config, "once", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would delete {target.host}/rel:0.8.0" in dry.stdout
    assert f"would delete {target.host}/rel:0.9.0" in dry.stdout
    assert tags(target, "rel") == {"0.8.0", "0.9.0"}

    real = sync(tmp_path / "c", {}, config, "once")
    assert real.returncode == 0, real.stdout + real.stderr
    assert tags(target, "rel") == {"1.0.0", "1.1.0", "2.0.0"}
    assert digest(f"{target.host}/rel:2.0.0") == release.digest


def test_sync_into_the_cache_pins_against_the_cleaner(tmp_path: Path, upstream: Registry) -> None:
    wanted = image(tmp_path, "wanted", 8, platforms=True)
    other = image(tmp_path, "other", 9)
    push(wanted, upstream.host, "app", "v1")
    push(other, upstream.host, "other", "v1")
    proxy = Proxy(
        tmp_path / "proxy",
        {
            "upstreams": [{"name": "test.local", "url": upstream.url}],
            "default_upstream": "test.local",
            "cleaner": {"maxsize": "1K", "threshold_percentage": 0},
        },
    )
    proxy.config_path.write_text(yaml.safe_dump(proxy.config))
    config = {
        "sync": [
            {
                "source": "test.local/app",
                "type": "repository",
                "pin": True,
                "tags": {"allow": ["v1"]},
                "platforms": ["linux/amd64"],
            }
        ]
    }
    result = sync(proxy.workdir, {}, config, "once")
    assert result.returncode == 0, result.stdout + result.stderr
    amd64 = wanted.platform_manifests["linux/amd64"]
    arm64_layers = set(wanted.layers) - set(
        json.dumps(json.loads(wanted.manifests[amd64])).split('"')
    )
    held = blob_files(proxy.data)
    assert amd64.removeprefix("sha256:") in held
    assert not {layer.removeprefix("sha256:") for layer in arm64_layers} & held

    with proxy:
        skopeo.copy(f"docker://{proxy.host}/test.local/other:v1", f"dir:{tmp_path / 'other'}")
        upstream.stop()
        cleaned = proxy.admin("clean")
        assert cleaned.returncode == 0, cleaned.stderr
        assert "evicted" in cleaned.stdout
        skopeo.copy(
            f"docker://{proxy.host}/test.local/app:v1",
            f"dir:{tmp_path / 'pulled'}",
            all=False,
            extra=["--override-os", "linux", "--override-arch", "amd64"],
        )
        pulled = skopeo.read_dir_copy(tmp_path / "pulled")
        assert pulled.digest == amd64
        evicted = skopeo.copy(
            f"docker://{proxy.host}/test.local/other:v1", f"dir:{tmp_path / 'gone'}", check=False
        )
        assert evicted.returncode != 0


def test_the_server_keeps_its_budget_when_a_sync_beside_it_stores(
    tmp_path: Path, upstream: Registry
) -> None:
    """What another process stores (`sync once` beside the server) counts against the budget
    within seconds, not at the next scheduled pass (an hour here)."""
    wanted = image(tmp_path, "wanted", 19)
    push(wanted, upstream.host, "app", "v1")
    budget = {"maxsize": "1K", "threshold_percentage": 0, "runevery": "1h"}
    proxy = Proxy(tmp_path / "proxy", {**one_upstream(upstream), "cleaner": budget})
    proxy.config_path.write_text(yaml.safe_dump(proxy.config))
    with proxy:
        config = {"sync": [{"source": "test.local/app:v1", "type": "image"}]}
        result = sync(proxy.workdir, {}, config, "once")
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for(lambda: proxy.metric("evicted_items_total") > 0, "the server to evict")
        assert proxy.metric("cache_size_bytes") <= 1000
        stored = wanted.total_blob_size + len(wanted.raw)
        assert proxy.metric("evicted_bytes_total") >= stored - 1000


async def test_creds_log_in_and_throttle_for_entries_into_the_cache(
    tmp_path: Path, basic_upstream: Registry
) -> None:
    wanted = image(tmp_path, "wanted", 15)
    push(wanted, basic_upstream.host, "app", "v1", creds=CREDS)
    cache = one_upstream(basic_upstream)
    login = {"registry": "test.local", "user": "alice", "pass": "wonderland"}
    config = {
        "creds": [{**login, "reqPerSec": 50, "reqConcurrent": 1}],
        "sync": [{"source": "test.local/app:v1", "type": "image"}],
    }
    result = sync(tmp_path / "c", cache, config, "once")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {b.removeprefix("sha256:") for b in wanted.blobs} <= blob_files(tmp_path / "c" / "data")

    settings = load_settings(tmp_path / "c" / "registry-cache.yml", env={})
    sync_config = load_sync_config(tmp_path / "c" / "sync.yml")
    async with open_cache(settings, Metrics()) as opened:
        endpoints = Endpoints(settings, sync_config, Metrics(), opened)
        throttle = endpoints.source(sync_config.entries[0]).throttle
        await endpoints.close()
    assert (throttle.per_second, throttle.concurrent) == (50, 1)


async def test_a_copy_into_a_cache_whose_disk_is_full_fails_saying_so(
    tmp_path: Path, upstream: Registry
) -> None:
    """While the disk is full the cache hands out uncached transfers; a sync copy must fail
    with the reason, not pass for done (it would store nothing) nor crash on the transfer."""
    wanted = image(tmp_path, "wanted", 17)
    push(wanted, upstream.host, "app", "v1")
    config = tmp_path / "registry-cache.yml"
    config.write_text(
        yaml.safe_dump({**one_upstream(upstream), "storage": {"root": str(tmp_path / "data")}})
    )
    async with open_cache(load_settings(config, env={}), Metrics()) as cache:
        cache.fetcher.write_failed(OSError(errno.ENOSPC, "No space left on device"), 1)
        destination = CacheDestination(cache, "test.local", "app")
        source = Remote("test.local", cache.upstreams["test.local"])
        with pytest.raises(RegistryError, match="disk is full"):
            await destination.copy(source, "app", wanted.digest, "v1", ())
        assert await cache.metadata.tag("test.local", "app", "v1") is None


def test_a_sync_beside_the_server_leaves_its_parked_downloads_alone(
    tmp_path: Path, upstream: Registry
) -> None:
    """A cut download parked under `partial/` is the server's to resume or drop: a command run
    beside it (its cleaner budgets those files, its fetcher may be resuming one) fetches on
    its own instead of taking the file over."""
    wanted = image(tmp_path, "wanted", 18)
    push(wanted, upstream.host, "app", "v1")
    layer = wanted.layers[0]
    start = wanted.blob_bytes(layer)[:1000]
    parked = tmp_path / "c" / "data" / "partial" / layer.replace(":", "-")
    parked.parent.mkdir(parents=True)
    parked.write_bytes(start)

    config = {"sync": [{"source": "test.local/app:v1", "type": "image"}]}
    result = sync(tmp_path / "c", one_upstream(upstream), config, "once")
    assert result.returncode == 0, result.stdout + result.stderr
    assert layer.removeprefix("sha256:") in blob_files(tmp_path / "c" / "data")
    assert parked.read_bytes() == start


def test_regsync_workshop_file_runs_against_local_registries(
    tmp_path: Path, basic_upstream: Registry, target: Registry
) -> None:
    busybox, alpine, alpine3 = (
        image(tmp_path, n, s) for n, s in [("bb", 10), ("al", 11), ("a3", 12)]
    )
    push(busybox, basic_upstream.host, "library/busybox", "latest", creds=CREDS)
    for tag in ("latest", "3.13", "3.14", "3.15", "edge"):
        push(alpine, basic_upstream.host, "library/alpine", tag, creds=CREDS)
    push(alpine3, basic_upstream.host, "library/alpine", "3", creds=CREDS)
    hub_token = tmp_path / "hub_token"
    hub_token.write_text("wonderland\n")
    local = target.host
    regsync_yml = f"""\
version: 1
creds:
  - registry: {local}
    tls: disabled
  - registry: docker.io
    user: "{{{{env \\"HUB_USER\\"}}}}"
    pass: "{{{{file \\"{hub_token}\\"}}}}"
defaults:
  ratelimit:
    min: 60
    retry: 15m
  parallel: 2
  interval: 60m
  backup: {json.dumps(WORKSHOP_BACKUP)}
sync:
  - source: busybox:latest
    target: {local}/library/busybox:latest
    type: image
  - source: alpine
    target: {local}/library/alpine
    type: repository
    tags:
      allow:
      - "latest"
      - "3"
      - "3.13"
      - "3.14"
"""
    cache = {"upstreams": [{"name": "docker.io", "url": basic_upstream.url}]}
    env = {"HUB_USER": "alice"}
    first = sync(tmp_path / "c", cache, regsync_yml, "once", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert tags(target, "library/alpine") == {"latest", "3", "3.13", "3.14"}
    assert digest(f"{local}/library/alpine:3") == alpine3.digest
    assert digest(f"{local}/library/busybox:latest") == busybox.digest

    push(alpine, basic_upstream.host, "library/alpine", "3", creds=CREDS)
    days = {datetime.date.today()}
    second = sync(tmp_path / "c", cache, regsync_yml, "once", env=env)
    days.add(datetime.date.today())
    assert second.returncode == 0, second.stdout + second.stderr
    assert digest(f"{local}/library/alpine:3") == alpine.digest
    backups = tags(target, "library/alpine") - {"latest", "3", "3.13", "3.14"}
    assert len(backups) == 1 and backups <= {f"bkup-3-{d:%Y%m%d}" for d in days}
    assert digest(f"{local}/library/alpine:{backups.pop()}") == alpine3.digest


def test_the_server_runs_its_sync_entries(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    mirrored = image(tmp_path, "mirrored", 13)
    push(mirrored, upstream.host, "mirrored", "v1")
    sync_file = tmp_path / "sync.yml"
    sync_file.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "defaults": {"interval": "1h"},
                "sync": [{"source": "test.local/mirrored:v1", "type": "image", "pin": True}],
            }
        )
    )
    proxy = start_proxy(
        {
            "upstreams": [{"name": "test.local", "url": upstream.url}],
            "default_upstream": "test.local",
            "sync": {"config": str(sync_file)},
        }
    )

    # The server's first pass copies what is missing, without any client asking.
    deadline = time.monotonic() + 30
    while not {b.removeprefix("sha256:") for b in mirrored.blobs} <= blob_files(proxy.data):
        assert time.monotonic() < deadline, proxy.log()[-2000:]
        time.sleep(0.1)
    upstream.stop()
    skopeo.copy(f"docker://{proxy.host}/test.local/mirrored:v1", f"dir:{tmp_path / 'out'}")
    assert skopeo.read_dir_copy(tmp_path / "out").digest == mirrored.digest
    entry = "test.local/mirrored:v1 -> cache/test.local/mirrored:v1"
    assert proxy.metric("sync_runs_total", f'entry="{entry}",result="ok"') == 1

    # The status page shows the run and the next tick of its one-hour interval.
    def shown_entries() -> list[dict[str, Any]]:
        return list(json.loads(proxy.get("/status.json")[2])["sync"])

    wait_for(lambda: shown_entries()[0]["next_run"] is not None, "the next tick to be planned")
    (shown,) = shown_entries()
    assert (shown["name"], shown["result"]) == (entry, "1 copied, 0 skipped")
    assert shown["last_run"] <= time.time() < shown["next_run"] <= time.time() + 3600


def test_a_pinned_entry_is_held_from_the_start_of_its_copy(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    """With a budget smaller than what a pinned entry holds, the server's cleaner runs while
    the entry copies; it must not take the entry's first image before the entry pins it."""
    first, second = image(tmp_path, "first", 20), image(tmp_path, "second", 21)
    push(first, upstream.host, "mirrored", "one")
    push(second, upstream.host, "mirrored", "two")
    sync_file = tmp_path / "sync.yml"
    entry = {"source": "test.local/mirrored", "type": "repository", "pin": True}
    sync_file.write_text(yaml.safe_dump({"defaults": {"interval": "1h"}, "sync": [entry]}))
    proxy = start_proxy(
        {
            **one_upstream(upstream),
            "cleaner": {"maxsize": "1K", "threshold_percentage": 0},
            "sync": {"config": str(sync_file)},
        }
    )
    name = "test.local/mirrored -> cache/test.local/mirrored"
    wait_for(
        lambda: (
            sum(
                proxy.metric("sync_runs_total", f'entry="{name}",result="{result}"')
                for result in ("ok", "failed")
            )
            > 0
        ),
        "the first sync run",
    )
    assert proxy.metric("sync_runs_total", f'entry="{name}",result="ok"') == 1, proxy.log()
    held = {b.removeprefix("sha256:") for i in (first, second) for b in i.blobs}
    assert held <= blob_files(proxy.data)
    assert proxy.metric("evicted_items_total") == 0


# -- progress ---------------------------------------------------------------------------------


def progress_config(upstream: Registry, target: Registry, name: str) -> dict[str, Any]:
    """One entry into a registry, one into the cache: both ways of copying a blob."""
    return {
        "creds": [plain(upstream), plain(target)],
        "sync": [
            {"source": f"{upstream.host}/big:v1", "target": f"{target.host}/{name}:v1"},
            {"source": "test.local/big:v1", "type": "image"},
        ],
    }


def test_progress_bars_on_a_terminal_and_none_in_a_pipe(
    tmp_path: Path, upstream: Registry, target: Registry
) -> None:
    big = write_layout(tmp_path / "layout-big", "big", None, [2 * 1024 * 1024], seed=14)
    push(big, upstream.host, "big", "v1")
    [layer] = big.layers
    short = layer.removeprefix("sha256:")[:12]
    cache = {
        "upstreams": [{"name": "test.local", "url": upstream.url}],
        "default_upstream": "test.local",
    }

    status, stdout, screen = sync_on_terminal(
        tmp_path / "tty", cache, progress_config(upstream, target, "tty"), "once"
    )
    assert status == 0, stdout + screen
    assert digest(f"{target.host}/tty:v1") == big.digest
    # Each copy's last drawing ends its line: 100% of the layer, labelled with its reference.
    finished = [line for line in re.split(r"[\r\n]", screen) if short in line and "100%" in line]
    assert any(f"{upstream.host}/big:v1 {short}" in line for line in finished), screen
    assert any(f"test.local/big:v1 {short}" in line for line in finished), screen
    assert all("[" + "#" * 24 + "]" in line and "MiB / " in line for line in finished)
    assert re.search(rf"\r[^\r\n]*{short}[^\r\n]*100% \[#+\]\x1b\[K\n", screen), screen
    drawn = [line.removesuffix("\x1b[K") for line in re.split(r"[\r\n]", screen)]
    assert max(len(line) for line in drawn if short in line) <= 100  # never wraps
    assert "ENTRY" in stdout and "\r" not in stdout  # the summary stays plain

    piped = sync(tmp_path / "pipe", cache, progress_config(upstream, target, "pipe"), "once")
    assert piped.returncode == 0, piped.stdout + piped.stderr
    assert digest(f"{target.host}/pipe:v1") == big.digest
    assert "\r" not in piped.stderr and "\x1b" not in piped.stderr
    assert short not in piped.stderr.replace(layer, "")  # no bars, only whole digests in logs
    assert piped.stderr.count('"event": "sync.copied"') == 2


async def test_bars_redraw_at_most_once_an_interval() -> None:
    """A copy of a thousand chunks within one interval draws twice: first chunk and last."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    now = [0.0]
    terminal = Terminal()
    bars = Bars(terminal, interval=0.1, clock=lambda: now[0])

    async def chunks(count: int, step: float) -> AsyncIterator[bytes]:
        for _ in range(count):
            now[0] += step
            yield b"x" * 1024

    copied = [c async for c in bars.track("ref abc", 1024 * 1000, chunks(1000, 2**-20))]
    assert len(copied) == 1000
    assert terminal.getvalue().count("\r") == 2
    assert terminal.getvalue().endswith("1000 KiB / 1000 KiB 100% [" + "#" * 24 + "]\x1b[K\n")
    now[0] = 0.0
    terminal = Terminal()
    bars = Bars(terminal, interval=0.125, clock=lambda: now[0])
    slow = [c async for c in bars.track("ref def", None, chunks(10, 0.0625))]
    assert len(slow) == 10
    assert terminal.getvalue().count("\r") == 5 + 1  # every other chunk, then the end

    # A log line mid-copy first erases the partly drawn bar; a finished bar is left alone.
    terminal = Terminal()
    bars = Bars(terminal, clock=lambda: now[0])
    stream = bars.track("ref ghi", 2048, chunks(2, 1.0))
    await anext(stream)
    bars.clear()
    assert terminal.getvalue().endswith("\r\x1b[K")
    assert [c async for c in stream] == [b"x" * 1024]
    drawn = terminal.getvalue()
    bars.clear()
    assert terminal.getvalue() == drawn and drawn.endswith("100% [" + "#" * 24 + "]\x1b[K\n")
    untouched = chunks(1, 0)
    assert SILENT.track("x", 1, untouched) is untouched
