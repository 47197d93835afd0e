#!/usr/bin/env bash
# Installs Debian's headless Chromium and its WebDriver (chromium-driver) for the dashboard's
# browser test. Idempotent: does nothing when both are present. Needs root (or sudo) for
# apt-get; without either it says so and exits 0, and the browser test skips with a message.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1; }
if have chromium && have chromedriver; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    SUDO=""
elif have sudo && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "browser-deps: chromium is missing and this user cannot run apt-get; the browser test will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || true
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
have chromium && have chromedriver
