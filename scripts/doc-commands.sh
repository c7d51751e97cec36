#!/usr/bin/env bash
# Runs every command the documentation shows: the fenced blocks whose info string is exactly `sh` in
# README.md and docs/*.md (blocks marked `sh no-run`, `csv`, `sql`, `text` are not run).
#
#   bash scripts/doc-commands.sh [FILE.md ...]
#
# Each file's `sh` blocks run in order in one bash shell (set -euo pipefail) in a scratch copy of the
# repository's examples/ and deploy/, with the debug `shard-router` and `rebalance` on PATH. README.md's tour starts its
# own demo; for every docs/*.md file a fresh `shard-router demo` runs first (four local shards, the router on
# 127.0.0.1:6432, its config in ./shard-router-demo.csv) and is stopped after. A block that fails stops the
# run with its file, line and output. Expected output in the docs is written as `#` comments, which bash
# skips. A file's commands that have not finished in DOC_COMMANDS_TIMEOUT_S seconds (default 600) fail the
# same way, with what was running and listening at that moment: a hang is a failure, never a stuck CI.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
[ $# -gt 0 ] || set -- README.md docs/*.md

cargo build --quiet --bin shard-router --bin rebalance
export PATH="$root/target/debug:$PATH"
command -v pg_isready >/dev/null || { echo "$0: pg_isready missing (apt-get install postgresql-client)" >&2; exit 1; }

limit="${DOC_COMMANDS_TIMEOUT_S:-600}"
work="$(mktemp -d /tmp/doc-commands.XXXXXX)"
# The demo runs PostgreSQL as the postgres user when started as root: it must be able to reach the scratch dir.
chmod 755 "$work"
demo_pid=""
stop_demo() {
  if [ -n "$demo_pid" ]; then
    # SIGINT: the demo stops its shards and removes their data.
    kill -INT "$demo_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$demo_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$demo_pid" 2>/dev/null || true
    demo_pid=""
  fi
  # A demo the README's tour started in the background.
  pkill -INT -f "shard-router demo" 2>/dev/null || true
  for _ in $(seq 1 100); do pgrep -f "shard-router demo" >/dev/null || break; sleep 0.1; done
}
# DOC_COMMANDS_KEEP=1 keeps the scratch directory (each file's commands.sh and out.log) and names it.
cleanup() {
  stop_demo
  if [ -n "${DOC_COMMANDS_KEEP:-}" ]; then echo "== kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# Extracts the `sh` blocks of a markdown file as one script, each block preceded by a marker naming its line.
extract() {
  awk -v file="$1" '
    /^```/ {
      if (inblock) { inblock = 0; print "# <<< end of block"; next }
      info = substr($0, 4); gsub(/[ \t]+$/, "", info)
      if (info == "sh") { inblock = 1; print "__doc_block " file " " NR; next }
      skipping = !skipping; next
    }
    inblock { print }
  ' "$1"
}

failed=0
for f in "$@"; do
  [ -f "$f" ] || { echo "$0: no file $f" >&2; exit 2; }
  n=$(extract "$f" | grep -c '^__doc_block ' || true)
  [ "$n" -gt 0 ] || { echo "== $f: no commands"; continue; }
  dir="$work/$(basename "$f" .md)"
  mkdir -p "$dir"
  cp -r examples deploy "$dir/"
  chmod -R a+rX "$dir"
  if [ "$(basename "$f")" != README.md ]; then
    (cd "$dir" && exec shard-router demo > demo.log 2>&1) &
    demo_pid=$!
    # (Two minutes at most, however long each probe takes.)
    ready_by=$((SECONDS + 120))
    while [ "$SECONDS" -lt "$ready_by" ]; do
      pg_isready -q -t 2 -h 127.0.0.1 -p 6432 && [ -f "$dir/shard-router-demo.csv" ] && break
      sleep 0.2
    done
    pg_isready -q -t 2 -h 127.0.0.1 -p 6432 || {
      echo "$0: the demo did not start in 120 s (its log, then what listens on 6432)"
      cat "$dir/demo.log"
      ss -ltnp 2>/dev/null | grep ':6432 ' || true
      exit 1
    }
  fi
  echo "== $f: $n blocks"
  {
    echo 'set -euo pipefail'
    echo '__doc_block() { echo "-- $1:$2" >&2; }'
    extract "$f"
  } > "$dir/commands.sh"
  # In a session of their own (setsid), so that commands still running at the time limit are named, then
  # stopped as one process group.
  (cd "$dir" && exec setsid bash "$dir/commands.sh" > "$dir/out.log" 2>&1) &
  commands=$!
  for _ in $(seq 1 $((limit * 10))); do kill -0 "$commands" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$commands" 2>/dev/null; then
    where=$(grep '^-- ' "$dir/out.log" | tail -1 | cut -c4-)
    echo "FAILED: a command of $where did not finish in ${limit} s (its output, then what was running and listening)"
    tail -40 "$dir/out.log"
    echo "-- processes"
    ps -eo pid,ppid,etimes,stat,args --forest | grep -E 'shard-router|rebalance|postgres|psql|pg_isready|commands.sh' | grep -v grep || true
    echo "-- listening"
    ss -ltnp 2>/dev/null | grep -E ':6432 |shard-router|postgres' || true
    [ -f "$dir/demo.log" ] && { echo "-- demo.log"; tail -40 "$dir/demo.log"; }
    kill -TERM -- "-$commands" 2>/dev/null || true
    sleep 2
    kill -KILL -- "-$commands" 2>/dev/null || true
    wait "$commands" 2>/dev/null || true
    failed=1
  elif ! wait "$commands"; then
    where=$(grep '^-- ' "$dir/out.log" | tail -1 | cut -c4-)
    echo "FAILED: a command of $where (output below)"
    tail -40 "$dir/out.log"
    failed=1
  fi
  stop_demo
  [ "$failed" = 0 ] || exit 1
done
echo "== every documented command ran"
