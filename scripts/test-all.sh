#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs the system and npm packages the
# tests need (scripts/test-deps.sh), then checks formatting, lints, runs the tests and builds the
# docs.
# This is the README's test command, and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

# The event log's OS-keyring test runs a private D-Bus session bus with gnome-keyring.
missing=()
command -v dbus-daemon >/dev/null 2>&1 || missing+=(dbus-daemon)
command -v gnome-keyring-daemon >/dev/null 2>&1 || missing+=(gnome-keyring)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

bash scripts/test-deps.sh

# Two cores: keep memory and scheduling predictable.
export CARGO_TERM_COLOR=never
export CARGO_INCREMENTAL=0

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The commands the tests run keep their trust record (see docs/gateway.md) in a folder of this
# run's own, not the user's, unless a test names its own.
XDG_DATA_HOME="$(mktemp -d)" cargo test --workspace --locked
# Public docs: broken or private intra-doc links fail (reuses clippy's dependency metadata).
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
