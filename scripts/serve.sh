#!/usr/bin/env bash
# Starts keyward on its embedded defaults: a SoftHSM2 token, a SQLite
# database and a self-signed CA under ./keyward-data (created on first
# start), HTTPS on 127.0.0.1:7443. Extra arguments go to `keyward serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-packages.sh
ensure_packages "${RUNTIME_PACKAGES[@]}"
exec cargo run --release --locked -- serve "$@"
