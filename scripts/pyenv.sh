#!/usr/bin/env bash
# The Python environment of the producer example and its tests: a venv in
# target/pyenv with examples/python/requirements.txt installed. Idempotent:
# does nothing when the venv already has every package of the current
# requirements file. Used by scripts/check.sh; run it by hand before
# `cargo test --test envelope_schema` or `pytest tests/python`.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/pyenv
requirements=examples/python/requirements.txt
stamp="$venv/.requirements"
python="$venv/bin/python"

fail() {
  echo "scripts/pyenv.sh: $*" >&2
  exit 1
}

if [ -x "$python" ] && cmp -s "$requirements" "$stamp" \
  && "$python" -c 'import nats, httpx, pytest, jsonschema, rfc3339_validator' 2>/dev/null; then
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

echo "==> installing the Python packages of $requirements into $venv"
"$python" -m pip install --quiet --disable-pip-version-check -r "$requirements" \
  || fail "pip could not install $requirements into $venv (is the package index reachable?)"
"$python" -c 'import nats, httpx, pytest, jsonschema, rfc3339_validator' \
  || fail "the venv $venv lacks a package after pip install"
cp "$requirements" "$stamp"
