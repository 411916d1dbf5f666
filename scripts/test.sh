#!/usr/bin/env bash
# Quick start, step 2: the whole test suite (unit tests and root tests with real VEs).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
echo "==> cargo fmt / clippy"
if cargo fmt --version >/dev/null 2>&1; then cargo fmt --all -- --check; fi
if cargo clippy --version >/dev/null 2>&1; then cargo clippy -q --workspace --all-targets --release -- -D warnings; fi
echo "==> tests"
cargo test --workspace --release -- --test-threads=2
