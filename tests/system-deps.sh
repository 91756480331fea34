#!/usr/bin/env bash
# System services some tests need: a single-node Slurm (tests/slurm/start_slurm.sh) and Debian's
# Chromium for the report test. Installed and started when we are root on Debian/Ubuntu (CI is);
# elsewhere this says which tests will be skipped, and why, instead of failing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "tests/system-deps.sh: not root on a Debian-like system; the Slurm and browser tests will be skipped" >&2
    exit 0
fi
if ! command -v chromium >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
bash tests/slurm/start_slurm.sh
