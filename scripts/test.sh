#!/usr/bin/env bash
# Quick start, step 2: the whole test suite (unit tests and root tests with real VEs).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
echo "==> cargo fmt / clippy"
if cargo fmt --version >/dev/null 2>&1; then cargo fmt --all -- --check; fi
if cargo clippy --version >/dev/null 2>&1; then cargo clippy -q --workspace --all-targets --release -- -D warnings; fi
echo "==> tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --release --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite (cargo's last line is a crate's doc tests).
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
