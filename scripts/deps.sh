#!/usr/bin/env bash
# Install the system packages Vessel needs to build, run and test on Debian 12.
# Idempotent; sourced by quickstart.sh and test.sh.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "vessel: run this as root (it installs packages and manages namespaces, mounts and cgroups)" >&2
  exit 1
fi
PKGS=(pkg-config gcc libseccomp-dev busybox-static debootstrap iproute2 util-linux tar runc fuse3 fuse-overlayfs e2fsprogs nftables etcd-server protobuf-compiler)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  for c in "$HOME/.cargo/bin" /usr/local/cargo/bin; do [ -x "$c/cargo" ] && export PATH="$c:$PATH"; done
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "vessel: no Rust toolchain found: install one with rustup (https://rustup.rs), Rust 1.85 or newer" >&2
  exit 1
fi
