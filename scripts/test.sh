#!/usr/bin/env bash
# The project's test command (README, "Two commands"; docs/testing.md). On a fresh Debian machine it installs what the tests need
# when it is missing (as root: apt-get update, then apt-get install -y), then checks formatting and lints and
# runs every test. The tests start their own PostgreSQL servers on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== cargo fuzz (a short run of every target; docs/testing.md, \"Fuzzing\")"
bash scripts/fuzz.sh 10
echo "== the documentation's commands (README's tour, docs/*.md; scripts/doc-commands.sh)"
bash scripts/doc-commands.sh
