#!/usr/bin/env bash
# Every check CI runs, in order. Run from anywhere: `bash scripts/check.sh`.
#
# 1. Installs redis-server, nats-server (and openssl, for the TLS tests'
#    throwaway CA) from Debian's packages when they are missing (the tests start their own servers on free loopback ports and stop
#    them; nothing here starts a long-lived service).
# 2. cargo fmt --check, clippy with -D warnings, every test (unit, integration
#    against real servers, doctests including the guide), docs with -D warnings,
#    and a build of every example.
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

missing=()
have redis-server || missing+=(redis-server)
have nats-server || missing+=(nats-server)
have openssl || missing+=(openssl)  # the TLS tests make a throwaway CA
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]} from Debian's packages"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The package may start a system-wide daemon; the tests do not use it.
  $sudo service redis-server stop >/dev/null 2>&1 || true
fi
export PATH="$PATH:/usr/sbin"
echo "==> $(redis-server --version | cut -d' ' -f1-3)"
echo "==> nats-server $(nats-server --version 2>&1 | head -n1)"

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy -D warnings"
cargo clippy --workspace --all-targets --all-features -- -D warnings

echo "==> cargo test"
test_log="$(mktemp)"
trap 'rm -f "$test_log"' EXIT
cargo test --workspace --all-features 2>&1 | tee "$test_log"
passed=$(grep -E '^test result: ' "$test_log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result: ' "$test_log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')

echo "==> cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features

echo "==> examples build"
cargo build --workspace --examples --all-features

echo "==> all checks passed"
echo "tests: ${passed} passed, ${failed} failed"
