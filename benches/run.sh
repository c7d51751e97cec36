#!/usr/bin/env bash
# The end-to-end benchmark in one command: installs PgBouncer and pgbench when missing, builds the router and
# the harness in release mode, and runs them. Arguments go to the harness (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer)
command -v pgbench >/dev/null 2>&1 || need+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
fi
export PATH="$PATH:/usr/sbin"
ulimit -n 65536 2>/dev/null || true
cargo build --release -p router -p benches --bins
exec target/release/e2e "$@"
