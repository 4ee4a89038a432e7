#!/usr/bin/env bash
# Builds the gateway to deploy.
#
#   bash gateway/build-dist.sh         # target/dist/wasmgate: the `dist` profile (fat LTO, one
#                                      # codegen unit); ~11 minutes on 2 cores
#   bash gateway/build-dist.sh --pgo   # target/pgo/wasmgate: the same, laid out by a profile of
#                                      # the benchmark's connect and echo scenarios; ~30 minutes
#
# Profile-guided: an instrumented build of the gateway serves the benchmark harness's connect
# scenario (plain, HS256 and RS256 auth, wss) and its echo scenarios (no plugins, a message
# hook, three plugins) for a few seconds each; the final build is optimised by what those
# runs executed. A new connection's path is long and flat (no function above 1% of it), so
# code layout is most of what there is to gain (BENCHMARKS.md, "Reconnect cost, sixth round").
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  "") exec cargo build --profile dist -p wasmgate --bin wasmgate ;;
  --pgo) ;;
  *) echo "usage: $0 [--pgo]" >&2; exit 2 ;;
esac

host=$(rustc -vV | sed -n 's/^host: //p')
rustup component add llvm-tools
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
work="$PWD/target/pgo"
rm -rf "$work/profiles" "$work/merged.profdata"
mkdir -p "$work/profiles"

# What the training runs: the benchmark harness, its echo backend and the plugins.
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --release -p wasmgate-bench -p wasmgate-examples
cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml

# With --target, RUSTFLAGS reach the gateway's crates but not build scripts or proc macros,
# which have nothing to profile.
build() {
  RUSTFLAGS="$1" cargo build --profile dist -p wasmgate --bin wasmgate --target "$host" --target-dir "$work/target"
}
build "-Cprofile-generate=$work/profiles"
export WASMGATE_BENCH_GATEWAY="$work/target/$host/dist/wasmgate"
target/release/wasmgate-bench --quick --only wasmgate,wasmgate-auth,wasmgate-rs256,wasmgate-tls,wasmgate-auth-tls --scenario connect
target/release/wasmgate-bench --quick --only wasmgate,wasmgate-hook,wasmgate-3 --scenario echo-64-50,echo-64-1000,echo-16k-50
"$profdata" merge -o "$work/merged.profdata" "$work/profiles"

build "-Cprofile-use=$work/merged.profdata"
cp "$work/target/$host/dist/wasmgate" "$work/wasmgate"
echo "built $work/wasmgate"
