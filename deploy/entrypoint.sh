#!/bin/sh
# The container's defaults: the files the HAProxy + registries stack mounted, used when present.
# Explicit variables win. Runs `registry-cache "$@"` (serve, health, du, ...).
set -eu
if [ -z "${REGISTRY_HTTP_TLS_CERTIFICATE:-}" ] && [ -f /certs/certs.pem ]; then
  export REGISTRY_HTTP_TLS_CERTIFICATE=/certs/certs.pem
fi
if [ -z "${PULL_SECRET:-}" ] && [ -f /pull-secret.json ]; then
  export PULL_SECRET=/pull-secret.json
fi
exec registry-cache "$@"
