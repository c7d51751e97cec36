#!/usr/bin/env bash
# The soak test (docs/testing.md, "Soak test"): thousands of clients through the release `shard-router` binary for
# minutes, on a Patroni shard and a plain one, with clients cut off mid-statement, a shard killed and
# restarted and a Patroni switchover; then it checks for clean errors, no leaked server connection and the
# router's RSS back to its baseline. Installs what it needs when missing (like scripts/test.sh).
#
#   bash scripts/soak.sh                              # 2000 clients, 300 s in 6 rounds
#   bash scripts/soak.sh --clients 500 --seconds 60   # any of: --clients N --seconds S --rounds R --keys K
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/deps.sh

# Every client holds a socket to the router and the router one per client: raise the open-file limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 8192 ]; then
  echo "scripts/soak.sh: the open-file limit is $(ulimit -n); thousands of clients need more (ulimit -n 20000)" >&2
  exit 1
fi

echo "== building the release router and the soak driver"
cargo build --release -p router -p integration --bin shard-router --bin soak
echo "== soak"
exec target/release/soak --router target/release/shard-router "$@"
