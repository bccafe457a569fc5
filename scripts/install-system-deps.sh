#!/usr/bin/env bash
# Install the real Prometheus, Alertmanager and VictoriaMetrics from Debian when their binaries
# are missing.
#
# The tests and the demo run the real `prometheus` and `promtool`; the scale-out tests run
# VictoriaMetrics (`victoria-metrics`, single node) as the analytics' store; nothing else in the
# project needs root. Services are not started: there is no init system on CI machines,
# and the tests start their own instances on loopback ports.
set -euo pipefail

needed=(prometheus promtool prometheus-alertmanager amtool victoria-metrics)
missing=()
for bin in "${needed[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "system-deps: prometheus, promtool, alertmanager, amtool and victoria-metrics already installed"
    exit 0
fi
echo "system-deps: missing ${missing[*]}; installing prometheus, prometheus-alertmanager and victoria-metrics"

if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: apt-get not found. Install Prometheus 2.x (prometheus, promtool) and" >&2
    echo "Alertmanager (prometheus-alertmanager, amtool) and VictoriaMetrics (victoria-metrics)" >&2
    echo "yourself and put them on PATH." >&2
    exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "system-deps: not root and sudo is not available; run as root:" >&2
        echo "  apt-get update && apt-get install -y prometheus prometheus-alertmanager victoria-metrics" >&2
        exit 1
    fi
fi

# Stop the packages' maintainer scripts from starting services (there is no systemd here,
# and we never want the packaged daemons running): policy-rc.d exit 101 means "not allowed".
# Only add one when none exists, and remove only the one we added.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"
    added_policy=1
fi
cleanup() {
    if [ "$added_policy" -eq 1 ]; then "${SUDO[@]}" rm -f "$policy"; fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
# A failing service start in a postinst must not hide a successful install, so the
# binaries are checked below rather than trusting apt-get's exit status alone.
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    prometheus prometheus-alertmanager victoria-metrics || echo "system-deps: apt-get install exited $?; checking binaries"

for bin in "${needed[@]}"; do
    if ! command -v "$bin" >/dev/null 2>&1; then
        echo "system-deps: $bin is still missing after apt-get install" >&2
        exit 1
    fi
done
prometheus --version 2>&1 | head -n 1
