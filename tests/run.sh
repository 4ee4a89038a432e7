#!/usr/bin/env bash
# The whole test suite: set-up, the plugins' native unit tests, then the workspace's unit and
# end-to-end tests (real sockets, real Wasm plugins, Python websockets, Autobahn via kosoku).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
cargo test --release --manifest-path plugins/Cargo.toml
cargo test --release --workspace
