#!/usr/bin/env bash
# The escape battery alone: root inside VEs attacking the host, other VEs, the daemon and the
# admin (tests/escape*.rs; each test performs an attack and asserts that it fails). Part of
# scripts/test.sh; this runs just these, e.g. after changing isolation code.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
exec cargo test --release -p vessel --test escape --test escape_fs --test escape_net --test escape_api -- --test-threads=2 "$@"
