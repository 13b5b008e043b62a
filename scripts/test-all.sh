#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs the system and npm packages the
# tests need (scripts/test-deps.sh), then checks formatting, lints and runs the tests.
# This is the README's test command, and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/test-deps.sh

# Two cores: keep memory and scheduling predictable.
export CARGO_TERM_COLOR=never
export CARGO_INCREMENTAL=0

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
