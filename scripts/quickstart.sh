#!/usr/bin/env bash
# Quick start, step 1: install what is needed, build Vessel, start the node on this
# machine, build the busybox template, run a VE, run a command in it and list it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
echo "==> building vessel (release)"
cargo build --release -q -p vessel
install -m 0755 target/release/vessel /usr/local/bin/vessel
if ! vessel status >/dev/null 2>&1; then
  vessel up
fi
vessel template show busybox >/dev/null 2>&1 || vessel template build busybox
if ! vessel ve show demo >/dev/null 2>&1; then
  vessel ve create demo --template busybox --memory 256M --cpus 0.5 --pids 512 --start
elif [ "$(vessel ve show demo --json | sed -n 's/.*"status": "\([a-z]*\)".*/\1/p')" != running ]; then
  vessel ve start demo
fi
echo "==> running a command in VE demo"
vessel ve exec demo -- sh -c 'echo "hello from $(hostname): uid $(id -u), $(ps | wc -l) processes, $(ip -4 -o addr show eth0 | awk "{print \$4}")"'
vessel ve list
echo "==> done. Try: vessel ve exec -t demo -- sh    |    vessel template build debian"
