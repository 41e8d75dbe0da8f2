#!/usr/bin/env bash
# Installs what building and testing this project needs on a fresh Debian 12 machine,
# idempotently (as root, or with sudo): the C build prerequisites of the Rust crates,
# the PostgreSQL server binaries and the pinned Python venv (.venv) with the test
# services. Installs only what is missing; runs `apt-get update` only if it must.
set -euo pipefail

# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# libpq-dev: system libpq; cmake, libcurl4-openssl-dev, libsasl2-dev, libssl-dev:
# librdkafka built from source by the rdkafka crate; python3-venv: the services' venv.
APT_PACKAGES=(build-essential pkg-config libpq-dev libssl-dev cmake libcurl4-openssl-dev
  libsasl2-dev python3-venv)
# `setup.sh --tests` (test.sh) adds what only the tests need: chromium and
# chromium-driver for the console's browser test (tests/console_browser.rs),
# and valgrind for the bench's test; `setup.sh --bench` (bench.sh) adds
# valgrind, whose callgrind counts the capture's instructions per event.
if [[ ${1:-} == --tests ]]; then
  APT_PACKAGES+=(chromium chromium-driver valgrind)
elif [[ ${1:-} == --bench ]]; then
  APT_PACKAGES+=(valgrind)
elif [[ -n ${1:-} ]]; then
  die "usage: scripts/setup.sh [--tests | --bench]"
fi

setup() {
  apt_ensure "${APT_PACKAGES[@]}"
  ensure_pg_server
  ensure_venv
}
with_install_lock setup

if ! command -v cargo >/dev/null; then
  if [[ -x $HOME/.cargo/bin/cargo ]]; then
    die "cargo is installed in $HOME/.cargo/bin but not on PATH: export PATH=\"\$HOME/.cargo/bin:\$PATH\""
  fi
  die "cargo not found: install the Rust toolchain (rustup, with rustfmt and clippy) first"
fi
for c in fmt clippy; do
  cargo "$c" --version >/dev/null 2>&1 || die "cargo $c is missing: rustup component add ${c/fmt/rustfmt}"
done
log "setup: ok ($(cargo --version), PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'), venv $VENV_DIR)"
