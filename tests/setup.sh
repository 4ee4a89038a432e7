#!/usr/bin/env bash
# Installs what the demo and the test suite need on a fresh machine and builds the plugins.
# Safe to run again: every step skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the end-to-end tests start for real: Redis (cluster tests), stunnel (Autobahn
# through the TLS listener), Chromium and its driver (browser tests), procps (`kill`: the
# session tests stop and resume a backend with SIGSTOP/SIGCONT).
APT_PACKAGES="redis-server stunnel4 chromium chromium-driver procps"
missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
fi

rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

# Plugins (plugins/ and the test fixtures in tests/plugins/) compile to Wasm components.
cargo build --release --quiet --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
bash examples/plugins/build.sh   # the example plugins in Python, JavaScript and C
# The gateway and example binaries that process-level tests and the demo run.
cargo build --release --quiet --workspace --bins
