#!/usr/bin/env bash
# The project's test command (README, "Two commands"; docs/testing.md). On a fresh Debian machine it installs what the tests need
# when it is missing (as root: apt-get update, then apt-get install -y), then checks formatting and lints and
# runs every test. The tests start their own PostgreSQL servers on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/deps.sh

# Each step says when it starts (seconds since the start), and none may hang: a step past its limit fails
# (the test harness names a test running for over 60 s; scripts/doc-commands.sh names what was running).
step() { echo "== [${SECONDS} s] $*"; }
# A fresh build without incremental state (3.9 GiB of disk less), as CI's disk is shared. Say what is free, so a
# "No space left on device" from a test reads against it.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
step "disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free where the build goes, $(df -h --output=avail "${TMPDIR:-/tmp}" | tail -1 | tr -d ' ') in ${TMPDIR:-/tmp}"
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "cargo test"
timeout --kill-after=30 3000 cargo test --workspace
step "cargo fuzz (a short run of every target; docs/testing.md, \"Fuzzing\")"
timeout --kill-after=30 1200 bash scripts/fuzz.sh 10
step "the documentation's commands (README's tour, docs/*.md; scripts/doc-commands.sh)"
bash scripts/doc-commands.sh
step "done"
