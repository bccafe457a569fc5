#!/usr/bin/env bash
# Install the prometheus-operator CRD validators the chart tests use (make crd-schemas).
#
# npm @kubernetes-models/prometheus-operator carries the operator's CRD schemas compiled into
# validator functions (ajv); tests/helm/validate-crds.mjs runs them on the chart's rendered
# ServiceMonitors, PodMonitors and PrometheusRules. The exact versions are locked in
# tests/helm/package-lock.json and installed with `npm ci` into DEST (git-ignored).
# Node.js and npm come from Debian when missing (Node >= 18).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-.cache/crd-schemas}"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "crd-schemas: node or npm missing; installing nodejs and npm from Debian"
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "crd-schemas: apt-get not found; install Node.js >= 18 with npm and retry" >&2
        exit 1
    fi
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO=(sudo)
        else
            echo "crd-schemas: not root and no sudo; run: apt-get install -y nodejs npm" >&2
            exit 1
        fi
    fi
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        nodejs npm
fi

major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$major" -lt 18 ]; then
    echo "crd-schemas: Node.js $(node --version) is too old; 18 or newer is needed" >&2
    exit 1
fi

mkdir -p "$dest"
cp "$here/package.json" "$here/package-lock.json" "$dest/"
(cd "$dest" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
echo "crd-schemas: installed $(cd "$dest" && node -p 'require("./node_modules/@kubernetes-models/prometheus-operator/package.json").version' 2>/dev/null || echo '?') into $dest"
