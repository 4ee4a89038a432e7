#!/usr/bin/env bash
# Set-up and the demo in one command: installs the Wasm target and Python client, builds the
# plugins and the gateway, then runs the gateway with the example echo and chat backends
# (it prints the chat page's and the dashboard's URLs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
# setup.sh built every binary with --workspace, as the tests do; `cargo run -p` would resolve
# features for one package and compile the gateway again, so run the binary it built.
exec "${CARGO_TARGET_DIR:-target}/release/demo"
