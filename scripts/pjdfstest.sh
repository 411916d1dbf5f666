#!/usr/bin/env bash
# Run the POSIX file system test suite pjdfstest (the Rust port from crates.io)
# in a directory and write one line per test case to a result file:
#
#   PASS chmod::clear_isgid_bit
#   FAIL rename::exdev_target
#   SKIP link::link_count_max
#
# sorted by name, so that two runs (e.g. ext4 and vessel-fs) can be compared
# with diff/comm. The script exits 0 even when test cases fail; it exits
# non-zero only when it cannot run the suite at all (bad arguments, install
# failure, missing users, output it cannot parse).
#
# Usage: scripts/pjdfstest.sh DIR RESULT_FILE [TEST_PATTERN...]
#   DIR          directory to test in (must exist; the script makes a temporary
#                directory inside it and removes it when done). DIR and every
#                parent must be searchable by the users "nobody" and "tests":
#                a FUSE mount therefore needs allow_other.
#   RESULT_FILE  where the PASS/FAIL/SKIP list goes; the full pjdfstest output
#                is kept next to it as RESULT_FILE.log (failure reasons are there).
#   TEST_PATTERN optional substrings of test case names (e.g. rename chmod::).
#
# Needs root (tests switch users, chown, mknod). Creates the system user and
# group "tests" if missing (pjdfstest needs two unprivileged users: nobody and tests).
#
# Environment:
#   PJDFSTEST_ROOT           install dir for `cargo install --root` (default /var/cache/vessel/pjdfstest)
#   PJDFSTEST_VERSION        crate version (default 0.2.2)
#   PJDFSTEST_JOBS           cargo build jobs (default 1)
#   PJDFSTEST_TIMEOUT        seconds for the whole run (default 900)
#   PJDFSTEST_FEATURES       opt-in features for the generated config (default:
#                            "posix_fallocate rename_ctime utime_now utimensat";
#                            `pjdfstest -l` lists all; chflags / nfsv4_acls /
#                            stat_st_birthtime are not for Linux)
#   PJDFSTEST_NAPTIME        seconds between timestamp-changing steps (default 0.01;
#                            must exceed the file system's timestamp granularity)
#   PJDFSTEST_CONFIG         use this TOML config instead of generating one
#   PJDFSTEST_SECONDARY_FS   directory on another file system for the EXDEV tests;
#                            default "auto": a fresh directory in /dev/shm when that
#                            is a different file system than DIR; "none" to skip them.
#
# If the suite does not finish (timeout, crash), the cases that ran are still
# listed and the line "FAIL pjdfstest::run_completed" is added; a finished run
# lists "PASS pjdfstest::run_completed".
set -euo pipefail

die() { echo "pjdfstest.sh: error: $*" >&2; exit 2; }
warn() { echo "pjdfstest.sh: warning: $*" >&2; }

[ $# -ge 2 ] || die "usage: $0 DIR RESULT_FILE [TEST_PATTERN...]"
dir=$1
out=$2
shift 2

PJDFSTEST_ROOT=${PJDFSTEST_ROOT:-/var/cache/vessel/pjdfstest}
PJDFSTEST_VERSION=${PJDFSTEST_VERSION:-0.2.2}
PJDFSTEST_JOBS=${PJDFSTEST_JOBS:-1}
PJDFSTEST_TIMEOUT=${PJDFSTEST_TIMEOUT:-900}
PJDFSTEST_FEATURES=${PJDFSTEST_FEATURES:-posix_fallocate rename_ctime utime_now utimensat}
PJDFSTEST_NAPTIME=${PJDFSTEST_NAPTIME:-0.01}
PJDFSTEST_SECONDARY_FS=${PJDFSTEST_SECONDARY_FS:-auto}

[ "$(id -u)" -eq 0 ] || die "must run as root (pjdfstest switches users, chowns and calls mknod)"
[ -d "$dir" ] || die "test directory '$dir' does not exist or is not a directory"
dir=$(cd "$dir" && pwd -P)
out_dir=$(dirname -- "$out")
[ -d "$out_dir" ] || die "directory of the result file '$out_dir' does not exist"
log="$out.log"

# --- install -----------------------------------------------------------------
bin="$PJDFSTEST_ROOT/bin/pjdfstest"
if [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null)" = "pjdfstest $PJDFSTEST_VERSION" ]; then
    :
else
    if ! command -v cargo >/dev/null 2>&1 && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
        PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found in PATH; needed to install pjdfstest $PJDFSTEST_VERSION"
    mkdir -p "$PJDFSTEST_ROOT" || die "cannot create PJDFSTEST_ROOT '$PJDFSTEST_ROOT'"
    echo "==> installing pjdfstest $PJDFSTEST_VERSION into $PJDFSTEST_ROOT" >&2
    start=$SECONDS
    if ! nice -n 10 cargo install --locked --force "pjdfstest@$PJDFSTEST_VERSION" \
            --root "$PJDFSTEST_ROOT" -j "$PJDFSTEST_JOBS" >&2; then
        die "cargo install pjdfstest@$PJDFSTEST_VERSION failed (see the output above)"
    fi
    echo "==> installed in $((SECONDS - start)) s" >&2
    [ -x "$bin" ] || die "cargo install succeeded but '$bin' is missing"
fi

# --- dummy users -------------------------------------------------------------
getent passwd nobody >/dev/null || die "user 'nobody' does not exist"
if ! getent passwd tests >/dev/null; then
    echo "==> creating system user and group 'tests' for pjdfstest" >&2
    useradd --system --user-group --no-create-home --home-dir / \
        --shell /usr/sbin/nologin --comment "Dummy user for pjdfstest" tests \
        || die "cannot create user 'tests' (pjdfstest needs it)"
fi
group_of() { # user -> name of its primary group
    local gid
    gid=$(id -g "$1") || return 1
    getent group "$gid" | cut -d: -f1
}
nobody_group=$(group_of nobody) || true
tests_group=$(group_of tests) || true
[ -n "$nobody_group" ] || die "the primary group of 'nobody' has no name in the group database"
[ -n "$tests_group" ] || die "the primary group of 'tests' has no name in the group database"

# The unprivileged users must reach DIR (permissions, or a FUSE mount without allow_other).
if command -v runuser >/dev/null 2>&1; then
    timeout 20 runuser -u nobody -- test -x "$dir" \
        || die "user 'nobody' cannot search '$dir' (check the mode of it and its parents; a FUSE mount needs allow_other)"
fi

# --- config ------------------------------------------------------------------
tmp=$(mktemp -d /tmp/pjdfstest-sh.XXXXXX)
sec=""
# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
    rm -rf "$tmp"
    if [ -n "$sec" ] && [ "$PJDFSTEST_SECONDARY_FS" = auto ]; then rm -rf "$sec"; fi
}
trap cleanup EXIT

if [ -n "${PJDFSTEST_CONFIG:-}" ]; then
    [ -r "$PJDFSTEST_CONFIG" ] || die "PJDFSTEST_CONFIG '$PJDFSTEST_CONFIG' is not readable"
    cfg=$PJDFSTEST_CONFIG
else
    cfg="$tmp/pjdfstest.toml"
    {
        echo "[features]"
        for f in $PJDFSTEST_FEATURES; do echo "$f = {}"; done
        echo
        echo "[settings]"
        echo "naptime = $PJDFSTEST_NAPTIME"
        echo "allow_remount = false"
        echo
        echo "[dummy_auth]"
        echo "entries = [[\"nobody\", \"$nobody_group\"], [\"tests\", \"$tests_group\"]]"
    } >"$cfg"
fi

sec_args=()
case "$PJDFSTEST_SECONDARY_FS" in
none | "") ;;
auto)
    if [ -d /dev/shm ] && [ "$(stat -c %d /dev/shm)" != "$(stat -c %d "$dir")" ]; then
        sec=$(mktemp -d /dev/shm/pjdfstest-secondary.XXXXXX)
        chmod 0755 "$sec"
        sec_args=(-s "$sec")
    else
        warn "no secondary file system found; the exdev_target cases will be skipped"
    fi
    ;;
*)
    [ -d "$PJDFSTEST_SECONDARY_FS" ] || die "PJDFSTEST_SECONDARY_FS '$PJDFSTEST_SECONDARY_FS' is not a directory"
    sec=$PJDFSTEST_SECONDARY_FS
    sec_args=(-s "$sec")
    ;;
esac

# --- run ---------------------------------------------------------------------
# Run in a fresh subdirectory, removed afterwards even if pjdfstest was killed.
work=$(mktemp -d "$dir/pjdfstest.XXXXXX") || die "cannot create a directory in '$dir'"
chmod 0755 "$work"
patterns=()
if [ $# -gt 0 ]; then patterns=(-- "$@"); fi
echo "==> pjdfstest $PJDFSTEST_VERSION in $dir (log: $log)" >&2
start=$SECONDS
set +e
NO_COLOR=1 RUST_BACKTRACE=${RUST_BACKTRACE:-0} \
    timeout --kill-after=30 "$PJDFSTEST_TIMEOUT" \
    "$bin" -c "$cfg" -p "$work" "${sec_args[@]}" "${patterns[@]}" >"$log" 2>&1
rc=$?
set -e
elapsed=$((SECONDS - start))
timeout 120 rm -rf "$work" || warn "could not remove '$work'"

# Result lines look like "<name><spaces><status>"; panic messages and
# backtraces are indented or never end in a status word.
parsed="$tmp/parsed"
sed -E -n \
    -e 's/^([A-Za-z0-9_:]+) +ok$/PASS \1/p' \
    -e 's/^([A-Za-z0-9_:]+) +PASSED UNEXPECTEDLY$/PASS \1/p' \
    -e 's/^([A-Za-z0-9_:]+) +skipped$/SKIP \1/p' \
    -e 's/^([A-Za-z0-9_:]+) +FAILED$/FAIL \1/p' \
    -e 's/^([A-Za-z0-9_:]+) +failed as expected$/FAIL \1/p' \
    "$log" >"$parsed"

summary=$(grep -E '^Summary: ' "$log" | tail -n 1 || true)
if [ -n "$summary" ]; then
    total=$(sed -E -n 's/.* ([0-9]+) total$/\1/p' <<<"$summary")
    got=$(wc -l <"$parsed")
    [ "$total" = "$got" ] || die "parsed $got result lines but pjdfstest reports $total cases ($summary); see $log"
    echo "PASS pjdfstest::run_completed" >>"$parsed"
else
    case $rc in
    124 | 137) warn "pjdfstest did not finish within ${PJDFSTEST_TIMEOUT}s; the list is partial" ;;
    *) warn "pjdfstest stopped without a summary (exit code $rc); the list is partial; see $log" ;;
    esac
    [ -s "$parsed" ] || grep -v '^$' "$log" | tail -n 5 >&2 || true
    echo "FAIL pjdfstest::run_completed" >>"$parsed"
fi

dups=$(awk '{print $2}' "$parsed" | sort | uniq -d)
[ -z "$dups" ] || die "duplicate test case names in the output: $dups"
LC_ALL=C sort -k2,2 "$parsed" >"$out.tmp"
mv "$out.tmp" "$out"

pass=$(grep -c '^PASS ' "$out" || true)
fail=$(grep -c '^FAIL ' "$out" || true)
skip=$(grep -c '^SKIP ' "$out" || true)
echo "pjdfstest summary: PASS=$pass FAIL=$fail SKIP=$skip in ${elapsed}s (results: $out)"
if [ "$fail" -gt 0 ]; then
    grep '^FAIL ' "$out" | sed 's/^/  /'
fi
exit 0
