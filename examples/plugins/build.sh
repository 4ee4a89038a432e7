#!/usr/bin/env bash
# Builds the example plugins written in other languages into examples/plugins/<lang>/build/:
#   python/build/allowlist.wasm     componentize-py (pip, into the repo's .venv)
#   js/build/router.wasm            ComponentizeJS (npm, into js/node_modules)
#   c/build/least_active.wasm       wit-bindgen c + clang + wasm-tools (cargo install, apt)
# Installs each toolchain first when it is missing or not the pinned version. Safe to run
# again: a component newer than its sources is not rebuilt. Prints nothing on success; on a
# failure prints the failing step's output and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")"
HERE=$(pwd)
ROOT=$(cd ../.. && pwd)
WIT="$ROOT/sdk/wit"

COMPONENTIZE_PY_VERSION=0.25.1
COMPONENTIZE_JS_VERSION=0.23.0   # also pinned in js/package.json and js/package-lock.json
WIT_BINDGEN_VERSION=0.63.0       # the wit-bindgen the Rust SDK uses
WASM_TOOLS_VERSION=1.263.0
APT_PACKAGES=(clang-19 lld-19 wasi-libc libclang-rt-19-dev-wasm32)
export PATH="$HOME/.cargo/bin:$PATH"

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

# step NAME COMMAND...: runs COMMAND with its output captured; on failure shows it and stops.
step() {
  local name=$1
  shift
  if ! "$@" >"$LOG" 2>&1; then
    echo "examples/plugins/build.sh: $name failed:" >&2
    cat "$LOG" >&2
    exit 1
  fi
}

# stale OUTPUT SOURCE...: true when OUTPUT is missing or older than a source (or this script).
stale() {
  local out=$1
  shift
  [ -f "$out" ] || return 0
  [ -n "$(find "$@" "$HERE/build.sh" -newer "$out" -print -quit)" ]
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@"
}

# --- toolchains ---------------------------------------------------------------------------

missing=()
command -v clang-19 >/dev/null || missing+=(clang-19)
[ -x /usr/lib/llvm-19/bin/wasm-ld ] || missing+=(lld-19)
[ -f /usr/lib/wasm32-wasi/libc.a ] || missing+=(wasi-libc)
[ -f /usr/lib/llvm-19/lib/clang/19/lib/wasi/libclang_rt.builtins-wasm32.a ] || missing+=(libclang-rt-19-dev-wasm32)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  step "apt-get install ${missing[*]}" apt_install "${missing[@]}"
fi

if [ ! -x "$ROOT/.venv/bin/python" ]; then
  step "python3 -m venv .venv" python3 -m venv "$ROOT/.venv"
fi
COMPONENTIZE_PY="$ROOT/.venv/bin/componentize-py"
if [ "$("$COMPONENTIZE_PY" --version 2>/dev/null)" != "componentize-py $COMPONENTIZE_PY_VERSION" ]; then
  step "pip install componentize-py" "$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check \
    "componentize-py==$COMPONENTIZE_PY_VERSION"
fi

COMPONENTIZE_JS="$HERE/js/node_modules/@bytecodealliance/componentize-js"
if [ "$(node -p "require('$COMPONENTIZE_JS/package.json').version" 2>/dev/null)" != "$COMPONENTIZE_JS_VERSION" ]; then
  (cd js && step "npm ci (componentize-js)" npm ci --no-audit --no-fund --silent)
fi

if [ "$(wit-bindgen --version 2>/dev/null)" != "wit-bindgen-cli $WIT_BINDGEN_VERSION" ]; then
  # Only the C generator: a much shorter build than every language's.
  step "cargo install wit-bindgen-cli" cargo install --quiet --locked wit-bindgen-cli --version "$WIT_BINDGEN_VERSION" \
    --no-default-features --features c
fi
if [ "$(wasm-tools --version 2>/dev/null | cut -d' ' -f1-2)" != "wasm-tools $WASM_TOOLS_VERSION" ]; then
  # Only the subcommands used here: a much shorter build than the default set.
  step "cargo install wasm-tools" cargo install --quiet --locked wasm-tools --version "$WASM_TOOLS_VERSION" \
    --no-default-features --features component,validate,print
fi

# --- Python: handshake-plugin world, team allowlist ----------------------------------------

if stale python/build/allowlist.wasm python/app.py "$WIT"; then
  mkdir -p python/build
  rm -rf python/build/bindings
  # Bindings for test_app.py and editors; componentize makes its own.
  step "componentize-py bindings" "$COMPONENTIZE_PY" -d "$WIT" -w handshake-plugin bindings python/build/bindings
  (cd python && step "componentize-py componentize" "$COMPONENTIZE_PY" -d "$WIT" -w handshake-plugin \
    componentize app -o build/allowlist.wasm.tmp)
  mv python/build/allowlist.wasm.tmp python/build/allowlist.wasm
fi

# --- JavaScript: handshake-plugin world, header router ---------------------------------------

if stale js/build/router.wasm js/router.js js/package-lock.json "$WIT"; then
  mkdir -p js/build
  # wasi:http is not given to plugins: leave it (and fetch-event) out.
  (cd js && step "componentize-js" node "$COMPONENTIZE_JS/src/cli.js" router.js --wit "$WIT" \
    --world-name handshake-plugin --disable http fetch-event -o build/router.wasm.tmp)
  mv js/build/router.wasm.tmp js/build/router.wasm
fi

# --- C: balancer-plugin world, least active ---------------------------------------------

if stale c/build/least_active.wasm c/least_active.c c/rank.c c/rank.h "$WIT"; then
  mkdir -p c/build
  rm -rf c/build/gen
  step "wit-bindgen c" wit-bindgen c "$WIT" --world balancer-plugin --out-dir c/build/gen
  # A core module (reactor: no main) against Debian's wasi-libc; it imports no WASI at all,
  # so wasm-tools needs no preview1 adapter to make it a component.
  step "clang (wasm32)" clang-19 --target=wasm32-wasi --sysroot=/usr -O2 -mexec-model=reactor \
    -Wall -Wextra -Werror -Ic/build/gen -Wl,--strip-debug -o c/build/least_active.core.wasm \
    c/least_active.c c/rank.c c/build/gen/balancer_plugin.c c/build/gen/balancer_plugin_component_type.o
  step "wasm-tools component new" wasm-tools component new c/build/least_active.core.wasm \
    -o c/build/least_active.wasm.tmp
  step "wasm-tools validate" wasm-tools validate c/build/least_active.wasm.tmp
  mv c/build/least_active.wasm.tmp c/build/least_active.wasm
fi
