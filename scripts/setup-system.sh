#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo use, when they are missing.
# Usage: scripts/setup-system.sh [extra-package ...]
set -euo pipefail

# command-to-package map: the test suite and the demo need these tools.
declare -A wanted=(
  [curl]=curl
  [ip]=iproute2
  [iptables]=iptables
  [node]=nodejs
  [stunnel4]=stunnel4
  [prometheus]=prometheus
)
missing=()
for cmd in "${!wanted[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}")
done
# Debian's own python3 makes virtual environments only with python3-venv (it brings ensurepip).
"${PYTHON:-python3}" -c "import ensurepip, venv" >/dev/null 2>&1 || missing+=(python3-venv)
for pkg in "$@"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-system: missing packages: ${missing[*]} (not root or no apt-get: install them by hand;" \
       "tests that need them will skip with a reason)" >&2
  exit 0
fi
echo "setup-system: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian's prometheus package starts a system service; the project runs its own.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
pkill -x prometheus-node-exporter >/dev/null 2>&1 || true
exit 0
