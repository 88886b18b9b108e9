#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests and the
# integration tests against real SoftHSM2 tokens, SQLite and PostgreSQL.
#
# PostgreSQL: the tests use postgres://postgres@127.0.0.1:5432/test (trust
# auth), or KEYWARD_TEST_POSTGRES_URL. They fail, not skip, without it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-packages.sh
ensure_packages "${RUNTIME_PACKAGES[@]}" "${TEST_PACKAGES[@]}"
ensure_pkilint
ensure_otlp_proto

pg_url="${KEYWARD_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
if ! psql "$pg_url" -qAtc 'select 1' >/dev/null 2>&1; then
  # A local cluster that is installed but stopped is started; anything else
  # is the caller's to provide.
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start >&2 || true
    sleep 2
  fi
  psql "$pg_url" -qAtc 'select 1' >/dev/null || {
    echo "keyward: PostgreSQL is not reachable at $pg_url; start one or set KEYWARD_TEST_POSTGRES_URL" >&2
    exit 1
  }
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "keyward: installing cargo-nextest (tests run one process each: SoftHSM2 reads its config per process)" >&2
  cargo install cargo-nextest --locked
fi

cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --quiet
cargo nextest run --locked --no-fail-fast "$@"
